"""Layer normalisation over the last axis, float32 (``R.nn.layer_norm`` with ``axes=[-1]``, ONNX
LayerNormalization with ``axis=-1``)::

    mean = sum_j x_j / N                       (float32 sum: per lane, then across the 16 lanes)
    var  = sum_j (x_j - mean)^2 / N            (two-pass: the biased variance, as ONNX and TVM)
    r    = rsqrt(var + eps); r = r (1.5 - 0.5 (var + eps) r^2)    (SFU rsqrt + one Newton step)
    y_j  = (x_j - mean) r gamma_j + beta_j

``1 / N`` is the float32 constant multiplied in (not a division). The numpy :func:`reference`
computes the exact formula in float64. Special values: a NaN or inf anywhere in a row makes the
whole row NaN (mean or variance is NaN), as in numpy's formula; a constant row gives ``beta``
(``0 * rsqrt(eps)``).

Layout (softmax.py's "lanes_row"): the 16 lanes run along a row (element ``16 k + lane`` of
block k), one 32-bit word per lane per lookup. ``W <= 12`` workers (one QPU each) take rows
w, w + W, ... The first :data:`RESIDENT` blocks of a row stay in registers after the first pass;
the rest of the row is streamed three times (mean, variance, output; the second and third
passes read it back from the L2: the kernel is bound by the shared L2 port, so every block kept
in registers saves two of its six line accesses), every stream keeping ``8 // streams`` blocks
of lookups in flight (the thread's 8-word TMU FIFO share, :data:`~.common.TMU_FIFO_WORDS`): 8 blocks of x in
the first two passes, 2 blocks of (x, gamma, beta) in the output pass. In a last partial block
the lanes past N read up to 60 bytes beyond the row (the buffers are padded by 64 bytes), count
as 0 in the sums and are not stored.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .. import asm as A
from ..asm import L, add, b, eidx, mov, nop, shl, sub, thread_end, tmuwt, umul24
from ..instr import MAGIC, RF
from ..plan import BufferSpec, KernelPlan, Launch
from .common import TMU_FIFO_WORDS, limits_verdict
from .reduce import Builder, emit_loop, f32_bits, _label

S = A.SIGNALS
F = A.DSL
R_ = A.R
tmua, tmud, null = (MAGIC[n] for n in ("tmua", "tmud", "null"))

NUM_QPUS = 12
UNROLL = 4                        # blocks per iteration of a pass's steady-state loop
NAMES = ("x", "gamma", "beta", "y")


@dataclass(frozen=True)
class LnShape:
    rows: int
    N: int
    eps: float = 1e-5
    num_qpus: int = NUM_QPUS

    @property
    def nblocks(self) -> int:
        return -(-self.N // 16)

    @property
    def nlast(self) -> int:
        return self.N - 16 * (self.nblocks - 1)


#: blocks of a row kept in registers from the first pass for the other two (saves two L2 reads
#: of each: the kernel is bound by the shared L2 port)
RESIDENT = 20


def resident_blocks(s: LnShape) -> int:
    return min(s.nblocks, RESIDENT)


def workers(s: LnShape) -> int:
    return max(1, min(s.rows, s.num_qpus))


def check_limits(s: LnShape):
    if s.rows < 1 or s.N < 1:
        raise ValueError("layer_norm needs at least one row of at least one element")
    if s.rows * s.N * 4 + 64 >= 1 << 24 or s.rows > 0xFFFF:
        raise ValueError("tensor exceeds the kernel's 24-bit address arithmetic (16 MiB / 65535 rows)")
    if not (s.eps > 0 and math.isfinite(s.eps)):
        raise ValueError(f"epsilon must be a positive finite number, got {s.eps}")


class _Counter:
    """Instruction counts of the emitted row loop, for :func:`estimate`: straight-line code and
    (body length, iterations) of each inner loop, per pass."""

    def __init__(self):
        self.loops = []
        self.segments = []              # (streams, misses?, blocks, instructions of one block)


def _stream(kb: Builder, s: LnShape, g, ptrs, vals, per_block, counter, first: int, n: int, miss: bool,
            dests=None):
    """Blocks ``first .. first + n - 1`` of a row, one lookup per stream (``ptrs``, advanced 64
    bytes per lookup), ``8 // len(ptrs)`` blocks in flight. ``per_block(regs, tail, k)`` consumes
    the popped registers of block k (None inside the steady-state loop); ``tail`` is True for a
    partial last block of the row (flag A = lane holds an element). ``dests(k)``: registers to
    pop block k into (resident blocks; then nothing is looped)."""
    win = max(1, TMU_FIFO_WORDS // len(ptrs))
    last = s.nblocks - 1 if s.N % 16 else -1
    prog = A.Program._stack[-1]
    issued = 0

    def issue():
        nonlocal issued
        for p in ptrs:
            mov(tmua, p).add(p, p, g.c64)
        issued += 1

    def block(k, regs):
        for v in regs:
            nop(sig=S["ldtmu"](v))
        if issued < n:
            issue()
        if k == last:
            sub(null, g.lane, g.nlast, cond="pushn")               # A = lane < nlast
        per_block(regs, k == last, k)

    for _ in range(min(win, n)):
        issue()
    steady = 0 if dests else max(0, n - win)
    rem = steady % UNROLL
    for k in range(first, first + rem):
        block(k, vals)
    if steady // UNROLL:
        mov(g.cnt, kb.u32(steady // UNROLL))
        n0 = len(prog.items)

        def blocks():
            for _ in range(UNROLL):
                for v in vals:
                    nop(sig=S["ldtmu"](v))
                for p in ptrs:
                    mov(tmua, p).add(p, p, g.c64)
                per_block(vals, False, None)
        emit_loop([blocks], _label("ln"), g.cnt, g.one)
        issued += steady - rem
        counter.loops.append((len(prog.items) - n0, steady // UNROLL))
    blen = None
    for k in range(first + steady, first + n):
        n0 = len(prog.items)
        block(k, dests(k) if dests else vals)
        if blen is None:
            blen = len(prog.items) - n0 + (0 if issued < n else len(ptrs))
    counter.segments.append((len(ptrs), miss, n, blen))


def _allreduce_add(x, t):
    for k in (8, 4, 2, 1):
        F["rotate"](t, x, k)
        F["fadd"](x, x, t)


class _Regs:
    pass


def ln_kernel(kb: Builder, s: LnShape, counter: _Counter):
    W = workers(s)
    R = resident_blocks(s)
    g = _Regs()
    g.lane, lane4, row, xrow, yrow, px, pg, pb, py, g.cnt = kb.reg(10)
    acc, mean, r, t, d, v, gv, bv = kb.reg(8)
    res = kb.reg(R) if R else []
    g.one = kb.u32(1)
    g.c64 = kb.u32(64)
    g.nlast = kb.u32(s.nlast)
    wstep = kb.u32(W * s.N * 4)
    nb = s.nblocks
    inv_n = kb.u32(f32_bits(np.float32(1.0) / np.float32(s.N)))

    eidx(g.lane)
    shl(lane4, g.lane, 2)
    mov(row, RF[3].unpack("ul"))                                  # worker w: rows w, w + W, ...
    umul24(t, row, kb.u32(s.N * 4))
    add(t, t, lane4)
    add(xrow, t, kb.addr("x"))
    add(yrow, t, kb.addr("y"))

    L.rowloop
    sub(null, row, kb.u32(s.rows), cond="pushn")                 # A = row < rows
    b(R_.done, cond="anyna")
    nop()
    nop()
    nop()
    prog = A.Program._stack[-1]
    counter.row_start = len(prog.items)

    # pass 1: mean (the first R blocks stay in registers for the other passes)
    mov(px, xrow)
    mov(acc, 0)

    def p1(vals, tail, k):
        x, = vals
        if tail:
            mov(x, 0, cond="ifna")
        F["fadd"](acc, acc, x)
    if R:
        _stream(kb, s, g, [px], [v], p1, counter, 0, R, True, dests=lambda k: [res[k]])
    if nb > R:
        _stream(kb, s, g, [px], [v], p1, counter, R, nb - R, True)
    _allreduce_add(acc, t)
    F["fmul"](mean, acc, inv_n)

    # pass 2: variance
    mov(acc, 0)

    def p2(vals, tail, k):
        x, = vals
        F["fsub"](d, x, mean)
        if tail:
            mov(d, 0, cond="ifna")
        F["fmul"](d, d, d)
        F["fadd"](acc, acc, d)
    for k in range(R):
        if k == nb - 1 and s.N % 16:
            sub(null, g.lane, g.nlast, cond="pushn")
        p2([res[k]], k == nb - 1 and s.N % 16 != 0, k)
    if nb > R:
        add(px, xrow, kb.u32(R * 64)) if R else mov(px, xrow)
        _stream(kb, s, g, [px], [v], p2, counter, R, nb - R, False)
    _allreduce_add(acc, t)
    F["fmul"](acc, acc, inv_n)
    F["fadd"](acc, acc, kb.u32(f32_bits(s.eps)))                 # v = var + eps
    F["rsqrt"](r, acc)
    F["fmul"](t, r, r)
    F["fmul"](t, t, acc)
    F["fmul"](t, t, 0.5)
    F["fsub"](t, kb.u32(f32_bits(1.5)), t)
    F["fmul"](r, r, t)                                            # one Newton step

    # pass 3: output
    eidx(pg)
    shl(pg, pg, 2)
    add(pb, pg, kb.addr("beta"))
    add(pg, pg, kb.addr("gamma"))
    mov(py, yrow)

    def out(x, g_, b_, tail):
        F["fsub"](d, x, mean)
        F["fmul"](d, d, r)
        F["fmul"](d, d, g_)
        F["fadd"](tmud, d, b_)
        mov(tmua, py, cond="ifa" if tail else None).add(py, py, g.c64)

    if R:
        _stream(kb, s, g, [pg, pb], [gv, bv], lambda vals, tail, k: out(res[k], *vals, tail), counter,
                0, R, False, dests=lambda k: [gv, bv])
    if nb > R:
        add(px, xrow, kb.u32(R * 64)) if R else mov(px, xrow)
        _stream(kb, s, g, [px, pg, pb], [v, gv, bv], lambda vals, tail, k: out(*vals, tail), counter,
                R, nb - R, False)

    add(xrow, xrow, wstep)
    add(yrow, yrow, wstep)
    add(row, row, kb.u32(W))
    counter.row_end = len(prog.items) + 1                         # + the branch (delay slots: nops)
    b(R_.rowloop, cond="always")
    nop()
    nop()
    nop()
    L.done
    tmuwt()
    thread_end()


def _assemble(s: LnShape):
    kb = Builder("layer_norm")
    c = _Counter()
    words, unif = kb.build(ln_kernel, s, c)
    return words, unif, c


def plan_layer_norm(s: LnShape, shape=None) -> KernelPlan:
    check_limits(s)
    shape = tuple(shape or (s.rows, s.N))
    words, unif, _ = _assemble(s)
    W = workers(s)
    bufs = [BufferSpec("x", "input", shape, "float32", s.rows * s.N * 4 + 64),
            BufferSpec("gamma", "input", (s.N,), "float32", s.N * 4 + 64),
            BufferSpec("beta", "input", (s.N,), "float32", s.N * 4 + 64),
            BufferSpec("y", "output", shape, "float32", s.rows * s.N * 4 + 64)]
    return KernelPlan("layer_norm", bufs, [Launch(words, unif, (W, 1, 1), 16, s.num_qpus, 1, "layer_norm")],
                      attrs={"rows": s.rows, "N": s.N, "eps": s.eps, "workers": W},
                      flops=8 * s.rows * s.N, bytes_moved=8 * s.rows * s.N + 8 * s.N)


def reference(x, gamma, beta, eps=1e-5) -> np.ndarray:
    """numpy layer norm over the last axis (float64, biased variance), rounded to float32."""
    x = np.asarray(x, np.float64)
    with np.errstate(invalid="ignore", over="ignore"):
        mu = x.mean(-1, keepdims=True)
        var = ((x - mu) ** 2).mean(-1, keepdims=True)
        y = (x - mu) / np.sqrt(var + np.float64(np.float32(eps))) * np.asarray(gamma, np.float64) \
            + np.asarray(beta, np.float64)
    return y.astype(np.float32)


# ------------------------------------------------------------------------------------------------
# registry
# ------------------------------------------------------------------------------------------------
def spec_shape(spec) -> LnShape:
    shape, _ = spec.inputs[0]
    rows = int(np.prod(shape[:-1], dtype=np.int64)) if len(shape) > 1 else 1
    return LnShape(rows, int(shape[-1]), float(spec.attrs.get("epsilon", 1e-5)))


def supports(spec):
    if len(spec.inputs) != 3:
        return False, "layer_norm takes data, gamma and beta"
    (shape, dt), (gs, gdt), (bs, bdt) = spec.inputs
    if {dt, gdt, bdt} != {"float32"}:
        return False, f"layer_norm kernel is float32 only, got {dt}, {gdt}, {bdt}"
    if len(shape) == 0:
        return False, "layer_norm of a scalar"
    axes = tuple(spec.attrs.get("axes", (-1,)))
    if len(axes) != 1 or axes[0] % len(shape) != len(shape) - 1:
        return False, f"only the last axis is normalised (axes={list(axes)})"
    if tuple(gs) != (shape[-1],) or tuple(bs) != (shape[-1],):
        return False, f"gamma {list(gs)} / beta {list(bs)} are not [{shape[-1]}]"
    return limits_verdict(check_limits, spec_shape(spec))


def generate(spec, constants=None) -> KernelPlan:
    return plan_layer_norm(spec_shape(spec), spec.inputs[0][0])


def estimate(spec, model=None) -> float:
    """Modelled seconds under ``model``: the busiest worker's rows (``ceil(rows / W)``), a row
    being the row loop's instructions (inner loops counted by their iterations) plus, per pass,
    one round trip for its first lookups and a round trip per window of lookups the
    instructions do not cover (the first pass misses the L2, the other two hit it); bounded
    below by the DRAM channel (x in, y out) and the L2 port (x read once for a resident block,
    three times otherwise; gamma, beta and the store); plus the first uniform line's round trip
    and the last store's latency."""
    from .common import (timing_model, round_trip, dram_cycles, l2_port_cycles, seconds,
                         slice_burst_queue, slice_tmu_cycles)
    m = timing_model(model)
    s = spec_shape(spec)
    words, _, c = _assemble(s)
    cpi = m.cycles_per_instruction
    static = c.row_end - c.row_start + 4 + 5                      # + the row test and its slots
    loop_instr = sum(body * (it - 1) for body, it in c.loops)    # bodies appear once in the code
    row_instr = static + loop_instr
    W = workers(s)
    nb = s.nblocks
    per_lookup = 1.0 if s.N % 16 == 0 else 2.0                    # lines of a 16-word block
    stall = 0.0
    lookups = 0
    for streams, miss, n, blen in c.segments:
        win = max(1, TMU_FIFO_WORDS // streams)
        rt = round_trip(m, miss)
        # each window of lookups occupies the slice TMU (its lines, 16 words each) behind the
        # windows of the slice's other workers, less what the window's instructions cover
        burst = min(win, n)
        work = burst * blen * cpi
        own = slice_burst_queue(m, 1, burst, per_lookup, 16)
        whole = slice_burst_queue(m, W, burst, per_lookup, 16)
        # a saturated slice TMU (its workers' windows take longer than a worker's own cycle)
        # serves them interleaved: the slice's workers wait in step for all of them
        queue = whole if whole >= work + rt + own else max(own, whole - work)
        stall += rt + queue + max(0, n - win) / win * max(0.0, rt + queue - work)
        lookups += n
    per_row = row_instr * cpi + stall
    pro = len(words) - (c.row_end - c.row_start)
    busiest = -(-s.rows // W) * per_row + pro * cpi
    rows_bytes = s.rows * s.N * 4
    dram = dram_cycles(m, 2 * rows_bytes)
    R = resident_blocks(s)
    lines_per_row = 4 * R + 6 * (nb - R)            # x once (resident) or 3 times, gamma, beta, y
    l2 = l2_port_cycles(m, s.rows * lines_per_row * (1.0 if s.N % 16 == 0 else 2.0))
    tmu = slice_tmu_cycles(m, s.rows * lookups, per_lookup, 16, W)
    return seconds(m, round_trip(m, True) + max(busiest, dram, l2, tmu) + m.store_latency)


def bench_cases():
    from ..registry import OpSpec
    cases = []
    for rows, n in ((128, 768), (1024, 256)):
        spec = OpSpec("layer_norm", [((rows, n), "float32"), ((n,), "float32"), ((n,), "float32")],
                      ((rows, n), "float32"), {"axes": (-1,), "epsilon": 1e-5})
        cases.append((f"layer_norm_{rows}x{n}", spec, lambda rng, r=rows, n=n: {
            "x": rng.standard_normal((r, n)).astype(np.float32),
            "gamma": rng.standard_normal(n).astype(np.float32),
            "beta": rng.standard_normal(n).astype(np.float32)}))
    return cases


def _register():
    from ..registry import register
    register("layer_norm", supports, generate, estimate)


_register()
