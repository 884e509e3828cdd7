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

