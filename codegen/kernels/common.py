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



# ------------------------------------------------------------------------------------------------
# Estimates: every kernel's ``estimate(spec, model=None)`` reads the emulator's TimingModel
# (runtime/cycle_model.py) through these helpers. No kernel keeps its own clock, bandwidth or
# cycles-per-instruction; the kernel-specific counts (instructions of a loop, of a tile) come from
# the program the generator emits (:func:`loop_lengths`, :func:`label_span`).
# ------------------------------------------------------------------------------------------------
def limits_verdict(check, *args) -> tuple:
    """A kernel's ``supports()`` verdict from its limits check: ``(True, "")`` when
    ``check(*args)`` passes, else ``(False, the ValueError's message)``."""
    try:
        check(*args)
    except ValueError as e:
        return False, str(e)
    return True, ""


def timing_model(model=None):
    """``model``, or the emulator's default TimingModel."""
    if model is None:
        from ...runtime.cycle_model import DEFAULT
        return DEFAULT
    return model


def loop_lengths(words) -> list:
    """Instruction counts of the loops of a program: one entry per backward relative branch, the
    body from the branch target to the branch's last delay slot (3 slots); shortest first, so the
    first entry is the innermost loop."""
    from ..instr import decode
    out = []
    for i, w in enumerate(words):
        ins = decode(int(w))
        if ins.kind == "branch" and not ins.absolute and isinstance(ins.target, int) and ins.target < 0:
            out.append(3 - ins.target + 1)
    return sorted(out)


def build_program(kernel, *args, name: str = "kernel"):
    """Run a kernel-building function in a fresh Program and return the Program (its labels and
    items give the instruction counts of named stretches of code)."""
    from .. import asm
    prog = asm.Program(name)
    with prog:
        kernel(*args)
    return prog


def round_trip(model, miss) -> float:
    """Cycles from a TMU lookup's issue to its data: the L2 hit latency, plus the DRAM latency
    times ``miss`` (True / False, or the fraction of lookups that miss)."""
    return model.tmu_latency + float(miss) * model.dram_latency


def dram_cycles(model, nbytes: float) -> float:
    """Cycles the shared DRAM channel needs for ``nbytes`` of traffic."""
    return nbytes / model.dram_bytes_per_cycle


def burst_wait(model, active: int, nbytes: float, miss=True) -> float:
    """Wait of a worker for a burst of loads of ``nbytes`` when ``active`` workers issue theirs
    at about the same time: one round trip behind the bursts' DRAM transfers (the misses)."""
    return round_trip(model, miss) + dram_cycles(model, active * nbytes * float(miss))


def l2_port_cycles(model, lines: float) -> float:
    """Cycles the shared L2 port needs to serve ``lines`` line accesses (TMU loads and stores of
    every QPU, uniform-cache fills): ``l2_cycles_per_line`` each, one port for all slices."""
    return lines * model.l2_cycles_per_line


def slice_tmu_cycles(model, lookups: float, lines: float, words: float, active: int) -> float:
    """Cycles the busiest slice TMU is occupied by ``lookups`` lookups spread over ``active``
    QPUs (``qpus_per_slice`` share a TMU): per lookup ``tmu_cycles_per_line`` per distinct line
    and ``tmu_cycles_per_word`` per 32-bit word it returns (``words`` = lanes x words per lane)."""
    qps = max(1, model.qpus_per_slice)
    slices = max(1, -(-max(1, active) // qps))
    return lookups / slices * (lines * model.tmu_cycles_per_line + words * model.tmu_cycles_per_word)


def slice_burst_queue(model, active: int, lookups: float, lines: float, words: float) -> float:
    """Cycles the slice TMU needs to serve one burst of ``lookups`` lookups from each of the
    slice's QPUs when ``active`` workers issue theirs in step (``qpus_per_slice`` share a TMU;
    per lookup ``tmu_cycles_per_line`` per distinct line and ``tmu_cycles_per_word`` per word it
    returns): the queue the last burst of the slice waits behind, on top of its round trip."""
    qps = max(1, model.qpus_per_slice)
    return min(max(1, active), qps) * lookups * (lines * model.tmu_cycles_per_line
                                                 + words * model.tmu_cycles_per_word)


def lookup_lines(model, span_bytes: float, aligned: bool = False) -> float:
    """Distinct lines a lookup whose lanes cover ``span_bytes`` contiguous bytes touches: a
    line-aligned start, or (expected) a random 4-byte offset within a line."""
    if aligned:
        return float(-(-int(span_bytes) // model.line_bytes))
    return 1.0 + max(0.0, span_bytes - 4) / model.line_bytes


def miss_fraction(model, unique_bytes: float, touched_lines: float) -> float:
    """Fraction of line lookups that miss the L2 when ``touched_lines`` lookups read
    ``unique_bytes`` of distinct data (each distinct line misses once)."""
    return min(1.0, unique_bytes / model.line_bytes / max(1.0, touched_lines))


def stream_stall_per_line(model, consume_cycles: float, miss) -> float:
    """Stall of a uniform (or unifa) stream per line it reads, when the program consumes a line
    every ``consume_cycles``: the stream keeps ``uniform_prefetch_lines`` lines in flight, so a
    line's fetch starts that many lines early (cycle_model.TimingModel.uniform_prefetch_lines)."""
    return max(0.0, round_trip(model, miss) - model.uniform_prefetch_lines * consume_cycles)


def seconds(model, cycles: float) -> float:
    return cycles / model.clock_hz


def dispatch_budget_seconds() -> float:
    """The longest one GPU dispatch may be modelled to run: the v3d driver's hang check resets a
    job whose batch counter makes no progress for 500 ms, and our persistent launches dispatch
    every batch at once. The one source of truth is
    :data:`tvm_qpu.runtime.v3d.DISPATCH_BUDGET_SECONDS` (read at call time, so tests can patch it);
    every kernel that splits long work into launches reads it through this function."""
    from ...runtime import v3d
    return v3d.DISPATCH_BUDGET_SECONDS


def split_count(fits, most: int, first: int = 1) -> int:
    """The fewest parts ``n`` in ``first .. most`` with ``fits(n)`` true (``most`` when none
    does: the caller's budget check then refuses the plan). ``fits`` must be monotone (more
    parts never make the longest launch longer), so a bisection finds it."""
    lo, hi = max(1, first), max(1, most)
    if lo >= hi or fits(lo):
        return min(lo, hi)
    if not fits(hi):
        return hi
    while hi - lo > 1:                      # fits(hi) and not fits(lo)
        mid = (lo + hi) // 2
        if fits(mid):
            hi = mid
        else:
            lo = mid
    return hi


def mov_const(dst, value: int):
    """``dst = value`` for any non-negative 32-bit ``value``: one small-immediate ``mov`` when the
    value is representable, else built from 4-bit digits (shift left 4, add the next digit)."""
    from .. import asm
    from ..isa import small_imm_code
    try:
        small_imm_code(value)
        return asm.mov(dst, value)
    except ValueError:
        pass
    if value < 0 or value >= 1 << 32:
        raise ValueError(f"constant {value} out of range")
    digits = []
    while value:
        digits.append(value & 15)
        value >>= 4
    asm.mov(dst, digits[-1])
    for d in reversed(digits[:-1]):
        asm.shl(dst, dst, 4)
        if d:
            asm.add(dst, dst, d)


#: TMU output FIFO words one thread may hold (lookups issued whose results no ldtmu has popped
#: yet; a vecN lookup holds N, a per-lane typed one 1): each of the 2 threads a QPU runs with
#: the CSD threading bit clear (our launches) owns 16 / 2 of the QPU's 16 words (Mesa
#: nir_to_vir.c ``ntq_tmu_fifo_overflow``: 16 / c->threads). The emulator faults beyond it.
TMU_FIFO_WORDS = 16 // 2
