"""Small pieces every kernel generator uses: register allocation (programs are assembled with
:func:`tvm_qpu.codegen.asm.assemble`, ``name=`` naming them in errors)."""
from __future__ import annotations

from ..instr import RF


class RegisterPool:
    """Hands out register-file entries for one program. rf2/rf3 (the compute-dispatch payload)
    come last, so a kernel can read the payload in its prologue before they are reused."""

    def __init__(self):
        self.free = [RF[0], RF[1]] + [RF[i] for i in range(4, 64)] + [RF[2], RF[3]]

    def take(self, n: int | None = None):
        """One register, or a list of ``n``; ValueError when the file is exhausted."""
        want = 1 if n is None else n
        if len(self.free) < want:
            raise ValueError(f"kernel ran out of registers ({want} more wanted, {len(self.free)} left)")
        out, self.free = self.free[:want], self.free[want:]
        return out[0] if n is None else out



#: TMU output FIFO words one thread may hold (lookups issued whose results no ldtmu has popped
#: yet; a vecN lookup holds N, a per-lane typed one 1): each of the 2 threads a QPU runs with
#: the CSD threading bit clear (our launches) owns 16 / 2 of the QPU's 16 words (Mesa
#: nir_to_vir.c ``ntq_tmu_fifo_overflow``: 16 / c->threads). The emulator faults beyond it.
TMU_FIFO_WORDS = 16 // 2
