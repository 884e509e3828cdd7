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
w, w + W, ... Each row is streamed three times (mean, variance, output; the second and third
passes read the row back from the L2), every pass keeping ``8 // streams`` blocks of lookups in
flight (the thread's 8-word TMU FIFO share, :data:`~.common.TMU_FIFO_WORDS`): 8 blocks of x in
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
from .common import TMU_FIFO_WORDS
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
        self.block_len = []             # instructions of one block, per pass


def _stream(kb: Builder, s: LnShape, ptrs, c64, lane, nlast, cnt, one, vals, per_block, counter):
    """One pass over a row: blocks of one lookup per stream (``ptrs``, advanced 64 bytes per
    lookup), ``8 // len(ptrs)`` blocks in flight. ``per_block(vals, tail)`` consumes the popped
    registers; ``tail`` is True for a partial last block (flag A = lane holds an element)."""
    nb = s.nblocks
    win = max(1, TMU_FIFO_WORDS // len(ptrs))
    masked = s.N % 16 != 0

    def issue():
        for p in ptrs:
            mov(tmua, p).add(p, p, c64)

    def pop():
        for v in vals:
            nop(sig=S["ldtmu"](v))

    for _ in range(min(win, nb)):
        issue()
    steady = max(0, nb - win)
    rem = steady % UNROLL
    for _ in range(rem):
        pop()
        issue()
        per_block(vals, False)
    if steady // UNROLL:
        mov(cnt, kb.u32(steady // UNROLL))
        prog = A.Program._stack[-1]
        n0 = len(prog.items)

        def blocks():
            for _ in range(UNROLL):
                pop()
                issue()
                per_block(vals, False)
        emit_loop([blocks], _label("ln"), cnt, one)
        counter.loops.append((len(prog.items) - n0, steady // UNROLL))
    prog = A.Program._stack[-1]
    for k in range(min(win, nb)):
        n0 = len(prog.items)
        pop()
        tail = masked and k == min(win, nb) - 1
        if tail:
            sub(null, lane, nlast, cond="pushn")                  # A = lane < nlast
        per_block(vals, tail)
        if k == 0:                      # a steady block: these instructions and its issues
            counter.block_len.append(len(prog.items) - n0 + len(ptrs))


def _allreduce_add(x, t):
    for k in (8, 4, 2, 1):
        F["rotate"](t, x, k)
        F["fadd"](x, x, t)


def ln_kernel(kb: Builder, s: LnShape, counter: _Counter):
    W = workers(s)
    lane, lane4, row, xrow, yrow, px, pg, pb, py, cnt = kb.reg(10)
    acc, mean, r, t, d, v, gv, bv = kb.reg(8)
    one = kb.u32(1)
    c64 = kb.u32(64)
    nlast = kb.u32(s.nlast)
    wstep = kb.u32(W * s.N * 4)

    eidx(lane)
    shl(lane4, lane, 2)
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

    # pass 1: mean
    mov(px, xrow)
    mov(acc, 0)

    def p1(vals, tail):
        x, = vals
        if tail:
            mov(x, 0, cond="ifna")
        F["fadd"](acc, acc, x)
    _stream(kb, s, [px], c64, lane, nlast, cnt, one, [v], p1, counter)
    _allreduce_add(acc, t)
    F["fmul"](mean, acc, kb.u32(f32_bits(np.float32(1.0) / np.float32(s.N))))

    # pass 2: variance
    mov(px, xrow)
    mov(acc, 0)

    def p2(vals, tail):
        x, = vals
        F["fsub"](d, x, mean)
        if tail:
            mov(d, 0, cond="ifna")
        F["fmul"](d, d, d)
        F["fadd"](acc, acc, d)
    _stream(kb, s, [px], c64, lane, nlast, cnt, one, [v], p2, counter)
    _allreduce_add(acc, t)
    F["fmul"](acc, acc, kb.u32(f32_bits(np.float32(1.0) / np.float32(s.N))))
    F["fadd"](acc, acc, kb.u32(f32_bits(s.eps)))                 # v = var + eps
    F["rsqrt"](r, acc)
    F["fmul"](t, r, r)
    F["fmul"](t, t, acc)
    F["fmul"](t, t, 0.5)
    F["fsub"](t, kb.u32(f32_bits(1.5)), t)
    F["fmul"](r, r, t)                                            # one Newton step

    # pass 3: output
    mov(px, xrow)
    eidx(pg)
    shl(pg, pg, 2)
    add(pb, pg, kb.addr("beta"))
    add(pg, pg, kb.addr("gamma"))
    mov(py, yrow)

    def p3(vals, tail):
        x, g, bb = vals
        F["fsub"](d, x, mean)
        F["fmul"](d, d, r)
        F["fmul"](d, d, g)
        F["fadd"](tmud, d, bb)
        mov(tmua, py, cond="ifa" if tail else None).add(py, py, c64)
    _stream(kb, s, [px, pg, pb], c64, lane, nlast, cnt, one, [v, gv, bv], p3, counter)

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
    try:
        check_limits(spec_shape(spec))
    except ValueError as e:
        return False, str(e)
    return True, ""


def generate(spec, constants=None) -> KernelPlan:
    return plan_layer_norm(spec_shape(spec), spec.inputs[0][0])


def estimate(spec, model=None) -> float:
    """Modelled seconds under ``model``: the busiest worker's rows (``ceil(rows / W)``), a row
    being the row loop's instructions (inner loops counted by their iterations) plus, per pass,
    one round trip for its first lookups and a round trip per window of lookups the
    instructions do not cover (the first pass misses the L2, the other two hit it); bounded
    below by the DRAM channel (x in, y out) and the L2 port (three reads and a store of every
    block); plus the first uniform line's round trip and the last store's latency."""
    from .common import (timing_model, round_trip, dram_cycles, l2_port_cycles, seconds)
    m = timing_model(model)
    s = spec_shape(spec)
    words, _, c = _assemble(s)
    cpi = m.cycles_per_instruction
    static = c.row_end - c.row_start + 4 + 5                      # + the row test and its slots
    loop_instr = sum(body * (it - 1) for body, it in c.loops)    # bodies appear once in the code
    row_instr = static + loop_instr
    W = workers(s)
    nb = s.nblocks
    stall = 0.0
    for (streams, miss), blen in zip(((1, True), (1, False), (3, False)), c.block_len):
        win = max(1, TMU_FIFO_WORDS // streams)
        rt = round_trip(m, miss)
        per_block = blen * cpi
        stall += rt + max(0, nb - win) / win * max(0.0, rt - win * per_block)
    per_row = row_instr * cpi + stall
    pro = len(words) - (c.row_end - c.row_start)
    busiest = -(-s.rows // W) * per_row + pro * cpi
    rows_bytes = s.rows * s.N * 4
    dram = dram_cycles(m, 2 * rows_bytes)
    l2 = l2_port_cycles(m, s.rows * nb * 6 * (1.0 if s.N % 16 == 0 else 2.0))
    return seconds(m, round_trip(m, True) + max(busiest, dram, l2) + m.store_latency)


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
