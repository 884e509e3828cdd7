"""Softmax over the last axis, fp32: ``y = exp(x - max(x)) / sum(exp(x - max(x)))``.

Formula (the numpy reference :func:`reference` implements exactly this)::

    m = max_j x_j                      (NaN elements are skipped by the QPU's fmax; see below)
    e_j = exp2((x_j - m) * log2(e))    (SFU exp, i.e. 2**x)
    s = sum_j e_j
    r = recip(s); r = r * (2 - s * r)  (SFU recip + one Newton step)
    y_j = e_j * (r + (s - s))          (s - s is 0, or NaN when s is inf / NaN: see below)

Optionally (used by the attention fallback) the input is ``x * scale + mask`` with a mask of
shape [rows_per_batch, N] repeated over the leading rows; scale and mask are applied in fp32
before the max.

Special values (identical to numpy on the same formula):

* a row containing NaN: the QPU's fmax ignores NaN (IEEE maxNum) but ``x - m`` is NaN there, its
  exp2 is NaN (or inf on an SFU that maps NaN to inf, as the emulator does), so ``s`` is NaN / inf
  and the ``s - s`` term makes every element of the row NaN - as numpy does;
* a row containing +inf: ``m = inf``, ``inf - inf`` = NaN: the whole row is NaN;
* a row of all -inf: ``m = -inf``, ``-inf - -inf`` = NaN: the whole row is NaN;
* -inf elements in an otherwise finite row give exactly 0.

Layouts (chosen per shape by :func:`choose_layout`):

* ``"lanes_row"`` (N > SHORT_ROW): the 16 lanes run along a row. Rows of up to ``RESIDENT_BLOCKS``
  x 16 elements are loaded once into registers (one pass over memory); longer rows are
  streamed three times (max, sum, output) in unrolled chunks of ``CHUNK`` blocks. Cross-lane
  max / sum use a rotate-by-8/4/2/1 butterfly, leaving the result in every lane.
* ``"lanes_rows"`` (N <= SHORT_ROW): each lane takes a whole row (16 rows per instruction), the
  row's elements are per-lane gathers at stride N, and every reduction is lane-wise.

Work split: ``W`` workgroups (one QPU thread each) take rows (or groups of 16 rows) w, w + W, ...
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .. import asm as A
from ..asm import L, b, mov, nop, sub, add, shl, umul24, eidx, tmuwt, thread_end
from ..instr import MAGIC, RF
from ..plan import BufferSpec, KernelPlan, Launch
from .common import limits_verdict, mov_const
from .gemm import _Pool

S = A.SIGNALS
R_ = A.R
tmua, tmud, null = (MAGIC[n] for n in ("tmua", "tmud", "null"))
F = A.DSL            # float / lane ops by name: F["fmax"], F["exp"], F["rotate"] ...

LOG2E = 1.4426950408889634
#: rows of at most this many elements use the lanes-across-rows layout
SHORT_ROW = 8
#: rows of at most this many 16-lane blocks stay in registers (single pass over memory)
RESIDENT_BLOCKS = 24
#: blocks per unrolled chunk in the streamed (long-row) layout
CHUNK = 8
#: TMU lookups in flight while loading a row
WINDOW = 8
#: workgroups (QPU threads) per launch at most
MAX_WORKERS = 12


@dataclass(frozen=True)
class SoftmaxShape:
    rows: int
    N: int
    scale: float | None = None        # x * scale before the max (None: 1, no multiply)
    mask_rows: int = 0                 # > 0: add mask[row % mask_rows, :] (fp32) after the scale
    num_qpus: int = 12

    @property
    def nblocks(self) -> int:
        return -(-self.N // 16)


def choose_layout(s: SoftmaxShape) -> str:
    return "lanes_rows" if s.N <= SHORT_ROW else "lanes_row"


# ------------------------------------------------------------------------------------------------
# Small shared emitters
# ------------------------------------------------------------------------------------------------
def allreduce(op: str, x, t):
    """Butterfly over the 16 lanes: afterwards every lane of x holds op over all lanes."""
    for k in (8, 4, 2, 1):
        F["rotate"](t, x, k)
        F[op](x, x, t)


def newton_recip(r, s, t):
    """r = 1/s: SFU recip, one Newton step, then + (s - s) so that an inf / NaN sum gives NaN."""
    F["recip"](r, s)
    F["fmul"](t, s, r)
    F["fsub"](t, 2.0, t)
    F["fmul"](r, r, t)
    F["fsub"](t, s, s)
    F["fadd"](r, r, t)


# ------------------------------------------------------------------------------------------------
# lanes_row kernel
# ------------------------------------------------------------------------------------------------
class _RowRegs:
    def __init__(self, s: SoftmaxShape, nres: int):
        p = _Pool()
        for n in ("lane", "inp", "outp", "maskp", "rs", "wstep", "nrows", "row", "nlast", "ninf",
                  "c", "scale", "mrows", "mrow", "c64", "p", "q", "mp", "cnt", "m", "sm", "r", "t", "t2",
                  "d", "mv", "rowstep"):
            setattr(self, n, p.take())
        self.x = p.take(nres)


def _uniforms_row(s, W, in_name, out_name, mask_name):
    nlast = s.N - 16 * (s.nblocks - 1)
    u = [("addr", in_name, 0), ("addr", out_name, 0), ("u32", s.N * 4), ("u32", W * s.N * 4),
         ("u32", s.rows), ("u32", nlast), ("f32", -math.inf), ("f32", LOG2E),
         ("f32", 1.0 if s.scale is None else s.scale), ("u32", W)]
    if s.mask_rows:
        u += [("addr", mask_name, 0), ("u32", s.mask_rows)]
    return u


def _prologue_row(s: SoftmaxShape, g: _RowRegs):
    ld = lambda r: S["ldunifrf"](r)  # noqa: E731
    eidx(g.lane, sig=ld(g.inp))
    nop(sig=ld(g.outp))
    nop(sig=ld(g.rs))
    nop(sig=ld(g.wstep))
    nop(sig=ld(g.nrows))
    nop(sig=ld(g.nlast))
    nop(sig=ld(g.ninf))
    nop(sig=ld(g.c))
    nop(sig=ld(g.scale))
    nop(sig=ld(g.rowstep))
    mov(g.row, RF[3].unpack("ul"))                          # worker w: first row = w
    umul24(g.t, g.row, g.rs)
    shl(g.t2, g.lane, 2)
    add(g.inp, g.inp, g.t)
    add(g.outp, g.outp, g.t)
    add(g.inp, g.inp, g.t2)
    add(g.outp, g.outp, g.t2)
    mov(g.c64, 15)
    add(g.c64, g.c64, 15)
    add(g.c64, g.c64, 15)
    add(g.c64, g.c64, 15)
    add(g.c64, g.c64, 4)                                    # 64 bytes per block
    if s.mask_rows:
        nop(sig=ld(g.maskp))
        nop(sig=ld(g.mrows))
        add(g.maskp, g.maskp, g.t2)
        mov(g.mrow, g.row)
        _mod(g.mrow, g.mrows, g.t)


def _mod(x, n, t):
    """x = x mod n for 0 <= x < 2n... (general: loop of subtracts; x < 65536 rows)."""
    # subtract n while x >= n (flags-based loop, at most rows / mask_rows iterations)
    lbl = f"mod{len(A.Program._stack[-1].items)}"
    A.Program._stack[-1].label(lbl)
    sub(t, x, n, cond="pushn")                              # A = x < n
    b(getattr(R_, lbl + "e"), cond="anya")
    nop()
    nop()
    nop()
    b(getattr(R_, lbl), cond="always")
    mov(x, t)
    nop()
    nop()
    A.Program._stack[-1].label(lbl + "e")


def _load_blocks(s, g, regs, masked_last: bool):
    """Load len(regs) consecutive blocks from p (advancing p; mask blocks from mp too) and apply
    scale / mask; lanes past N in a masked last block become -inf. At most ``WINDOW`` lookups
    are in flight (one word each: the thread's 8-word TMU FIFO share; request queue: 8)."""
    looks = []
    for x in regs:
        looks.append((g.p, x))
        if s.mask_rows:
            looks.append((g.mp, g.mv))
    issued = 0

    def issue():
        nonlocal issued
        ptr, _ = looks[issued]
        mov(tmua, ptr).add(ptr, ptr, g.c64)
        issued += 1
    while issued < min(WINDOW, len(looks)):
        issue()
    for k, (ptr, dst) in enumerate(looks):
        nop(sig=S["ldtmu"](dst))
        if issued < len(looks):
            issue()
        if ptr is g.mp:
            F["fadd"](looks[k - 1][1], looks[k - 1][1], g.mv)
        elif s.scale is not None:
            F["fmul"](dst, dst, g.scale)
    if masked_last:
        sub(null, g.lane, g.nlast, cond="pushn")            # A = lane holds an element
        mov(regs[-1], g.ninf, cond="ifna")


def _exp_blocks(g, regs, dst=None):
    """regs[i] = exp2((regs[i] - m) * log2 e); sum into sm (in place unless dst given)."""
    dst = dst or regs
    for x, y in zip(regs, dst):
        F["fsub"](g.d, x, g.m)
        F["fmul"](g.d, g.d, g.c)
        F["exp"](y, g.d)
        F["fadd"](g.sm, g.sm, y)


def _store_blocks(g, regs, masked_last: bool):
    if masked_last:
        sub(null, g.lane, g.nlast, cond="pushn")
    for i, x in enumerate(regs):
        nop().fmul(tmud, x, g.r)
        cond = "ifa" if (masked_last and i == len(regs) - 1) else None
        mov(tmua, g.q, cond=cond).add(g.q, g.q, g.c64)


def _row_segments(s: SoftmaxShape):
    """(full chunks, tail blocks) of the streamed layout; resident rows are one tail."""
    nb = s.nblocks
    if nb <= RESIDENT_BLOCKS:
        return 0, nb
    full = (nb - 1) // CHUNK                                 # the tail keeps >= 1 block
    return full, nb - full * CHUNK


def softmax_row_kernel(s: SoftmaxShape):
    nb = s.nblocks
    resident = nb <= RESIDENT_BLOCKS
    full, tail = _row_segments(s)
    g = _RowRegs(s, max(tail, CHUNK if full else 0))
    masked = s.N % 16 != 0
    _prologue_row(s, g)

    L.rowloop
    sub(null, g.row, g.nrows, cond="pushn")                 # A = row < rows
    b(R_.done, cond="anyna")
    mov(g.p, g.inp)
    mov(g.q, g.outp)
    mov(g.m, g.ninf)

    def pass_over(body_chunk, body_tail):
        """Run body over the row: `full` chunks in a loop, then the tail (p, mp reset)."""
        mov(g.p, g.inp)
        if s.mask_rows:
            umul24(g.mp, g.mrow, g.rs)
            add(g.mp, g.mp, g.maskp)
        if full:
            mov_const(g.cnt, full)                          # > 15 chunks: not a small immediate
            lbl = f"ch{len(A.Program._stack[-1].items)}"
            A.Program._stack[-1].label(lbl)
            body_chunk()
            sub(g.cnt, g.cnt, 1, cond="pushz")
            b(getattr(R_, lbl), cond="anyna")
            nop()
            nop()
            nop()
        body_tail()

    xt = g.x[:tail]
    if resident:
        pass_over(None, lambda: _load_blocks(s, g, xt, masked))
        for x in xt:
            F["fmax"](g.m, g.m, x)
    else:
        xc = g.x[:CHUNK]

        def max_chunk(regs, msk):
            _load_blocks(s, g, regs, msk)
            for x in regs:
                F["fmax"](g.m, g.m, x)
        pass_over(lambda: max_chunk(xc, False), lambda: max_chunk(xt, masked))
    allreduce("fmax", g.m, g.t)
    mov(g.sm, 0)
    if resident:
        _exp_blocks(g, xt)
    else:
        def sum_chunk(regs, msk):
            _load_blocks(s, g, regs, msk)
            _exp_blocks(g, regs)
        pass_over(lambda: sum_chunk(xc, False), lambda: sum_chunk(xt, masked))
    allreduce("fadd", g.sm, g.t)
    newton_recip(g.r, g.sm, g.t)
    if resident:
        _store_blocks(g, xt, masked)
    else:
        def out_chunk(regs, msk):
            _load_blocks(s, g, regs, msk)
            _exp_blocks(g, regs)
            _store_blocks(g, regs, msk)
        pass_over(lambda: out_chunk(xc, False), lambda: out_chunk(xt, masked))

    _next_row(s, g)
    b(R_.rowloop, cond="always")
    nop()
    nop()
    nop()
    L.done
    tmuwt()
    thread_end()


def _next_row(s, g):
    add(g.inp, g.inp, g.wstep)
    add(g.outp, g.outp, g.wstep)
    add(g.row, g.row, g.rowstep)
    if s.mask_rows:
        add(g.mrow, g.mrow, g.rowstep)
        _mod(g.mrow, g.mrows, g.t)


# ------------------------------------------------------------------------------------------------
# Plans, reference, registry
# ------------------------------------------------------------------------------------------------
def _assemble(fn, *args, name="kernel"):
    prog = A.Program(name)
    with prog:
        fn(*args)
    return prog.words()


def check_limits(s: SoftmaxShape):
    if s.rows < 1 or s.N < 1:
        raise ValueError("softmax needs at least one row of at least one element")
    if s.rows * s.N * 4 >= 1 << 24 or s.rows > 0xFFFF:
        raise ValueError("tensor exceeds the kernel's 24-bit address arithmetic (16 MiB / 65535 rows)")


def workers(s: SoftmaxShape) -> int:
    return max(1, min(s.rows, MAX_WORKERS, s.num_qpus))


def softmax_launch(s: SoftmaxShape, in_name="x", out_name="y", mask_name="mask") -> Launch:
    """The launch computing out = softmax(in * scale + mask) row by row (buffers by name)."""
    check_limits(s)
    W = workers(s)
    return Launch(_assemble(softmax_row_kernel, s, name="softmax"),
                  _uniforms_row(s, W, in_name, out_name, mask_name), (W, 1, 1), 16, s.num_qpus, 1,
                  "softmax")


def in_nbytes(s: SoftmaxShape) -> int:
    """Device bytes of the input: lanes past N in the last block read up to 64 bytes beyond."""
    return s.rows * s.N * 4 + 64


def plan_softmax(s: SoftmaxShape, shape=None, names=("x", "y", "mask"), constants=None) -> KernelPlan:
    shape = tuple(shape or (s.rows, s.N))
    x, y, mk = names
    bufs = [BufferSpec(x, "input", shape, "float32", in_nbytes(s)),
            BufferSpec(y, "output", shape, "float32")]
    consts = {}
    if s.mask_rows:
        role = "weight" if constants and mk in constants else "input"
        bufs.insert(1, BufferSpec(mk, role, (s.mask_rows, s.N), "float32", s.mask_rows * s.N * 4 + 64))
        if role == "weight":
            consts[mk] = np.ascontiguousarray(np.asarray(constants[mk], np.float32))
    return KernelPlan("softmax", bufs, [softmax_launch(s, x, y, mk)], consts,
                      attrs={"rows": s.rows, "N": s.N, "scale": s.scale, "mask_rows": s.mask_rows,
                             "layout": choose_layout(s), "segments": _row_segments(s)},
                      flops=5 * s.rows * s.N, bytes_moved=8 * s.rows * s.N)


def reference(x, scale=None, mask=None) -> np.ndarray:
    """numpy softmax over the last axis with the kernel's formula and special-value semantics
    (scale and mask applied in float32 like the kernel; the rest in float64)."""
    x = np.asarray(x, np.float32)
    with np.errstate(invalid="ignore", over="ignore"):
        if scale is not None:
            x = x * np.float32(scale)
        if mask is not None:
            m2 = np.asarray(mask, np.float32)
            rows = x.reshape(-1, x.shape[-1])
            x = (rows + np.tile(m2, (rows.shape[0] // m2.shape[0], 1))).reshape(x.shape)
        x = x.astype(np.float64)
        m = x.max(axis=-1, keepdims=True)
        e = np.exp(x - m)
        return (e / e.sum(axis=-1, keepdims=True)).astype(np.float32)


def spec_shape(spec) -> SoftmaxShape:
    shape, _ = spec.inputs[0]
    rows = int(np.prod(shape[:-1], dtype=np.int64)) if len(shape) > 1 else 1
    return SoftmaxShape(rows, int(shape[-1]))


def supports(spec):
    if len(spec.inputs) != 1:
        return False, "softmax takes one input"
    shape, dt = spec.inputs[0]
    if dt != "float32":
        return False, f"softmax kernel is fp32 only, got {dt}"
    if len(shape) == 0:
        return False, "softmax of a scalar"
    axis = spec.attrs.get("axis", -1)
    if axis not in (-1, len(shape) - 1):
        return False, f"only the last axis is supported (axis={axis})"
    return limits_verdict(check_limits, spec_shape(spec))


def generate(spec, constants=None) -> KernelPlan:
    s = spec_shape(spec)
    return plan_softmax(s, shape=spec.inputs[0][0])


def estimate(spec, model=None) -> float:
    """Modelled seconds under ``model``: each worker's rows (ceil(rows / W)), a row being the
    instructions of the program's row loop (chunk loops counted ``full`` times) plus one load
    round trip per ``WINDOW`` blocks of every pass over memory (the first pass misses the L2);
    bounded below by the DRAM traffic (input once, output once)."""
    from .common import (timing_model, build_program, round_trip, dram_cycles, seconds, burst_wait,
                         l2_port_cycles, slice_tmu_cycles, slice_burst_queue)
    m = timing_model(model)
    s = spec_shape(spec)
    prog = build_program(softmax_row_kernel, s, name="softmax")
    lab = prog.labels
    row = lab["done"] - lab["rowloop"]
    full, _ = _row_segments(s)
    chunks = sorted(v for k, v in lab.items() if k.startswith("ch"))
    ends = chunks[1:] + [lab["done"]]
    # a chunk loop's body runs `full` times; its code appears once in the row
    for c0, c1 in zip(chunks, ends):
        body = _loop_body_len(prog, c0, c1)
        row += (full - 1) * body
    passes = 3 if full else 1
    waits = -(-s.nblocks // WINDOW)
    W = workers(s)
    burst = min(s.nblocks, WINDOW) * 16 * 4
    # streamed rows wait for each chunk in turn, every worker in the same phase: each first-pass
    # wait queues behind the other workers' chunks; a resident row waits once (workers drift
    # apart, the DRAM bound below covers the sharing)
    rows_ = np.arange(min(s.rows, m.line_bytes))
    per_block = float(np.mean(np.where((rows_ * s.N * 4) % m.line_bytes == 0, 1.0, 2.0)))
    # every window's burst occupies the slice TMU (per lookup its lines and 16 returned words;
    # cycle_model tmu_cycles_per_line / _per_word) and queues behind the bursts of the slice's
    # other workers. A resident row loads its whole window, then computes with the TMU idle:
    # alone the burst adds its own service time, but when the slice's bursts together take at
    # least a worker's cycle without queueing (the row's instructions, a round trip, its own
    # burst) the saturated TMU serves them interleaved, the slice's workers leave it together
    # and compute together, and each row waits the whole slice's bursts. A streamed row's
    # chunk loads overlap the previous chunk's instructions: it waits what they do not cover.
    b_ = min(s.nblocks, WINDOW)
    own = slice_burst_queue(m, 1, b_, per_block, 16)
    whole = slice_burst_queue(m, W, b_, per_block, 16)
    work = row * m.cycles_per_instruction / (waits * passes)          # a window's instructions
    if full:
        queue = max(own, whole - work)
    else:
        queue = whole if whole >= work + round_trip(m, False) + own else own
    first = max(burst_wait(m, W, burst), round_trip(m, True) + queue) if full else round_trip(m, True) + queue
    lat = waits * (first + (passes - 1) * (round_trip(m, False) + queue))
    busiest = -(-s.rows // W) * (row * m.cycles_per_instruction + lat) + lab["rowloop"] * m.cycles_per_instruction
    # roofline of the worker time and the DRAM traffic, plus the first burst of all W workers
    start = 0.0 if full else burst_wait(m, W, burst) - round_trip(m, True)
    # shared L2 port: every pass loads each 64-byte block of the row, the output pass stores it;
    # a block touches one line when its row starts line-aligned, else two
    rows = np.arange(min(s.rows, m.line_bytes))
    per_block = float(np.mean(np.where((rows * s.N * 4) % m.line_bytes == 0, 1.0, 2.0)))
    l2 = l2_port_cycles(m, s.rows * s.nblocks * (passes + 1) * per_block)
    tmu = slice_tmu_cycles(m, s.rows * s.nblocks * passes, per_block, 16, W)
    return seconds(m, max(busiest, dram_cycles(m, 2 * s.rows * s.N * 4), l2, tmu) + start)


def _loop_body_len(prog, start: int, stop: int) -> int:
    """Length of the loop starting at ``start``: up to its backward branch's last delay slot."""
    for i in range(start, stop):
        ins = prog.items[i]
        if ins.kind == "branch" and getattr(ins.target, "name", None) in prog.labels \
                and prog.labels[ins.target.name] == start:
            return i + 4 - start
    raise ValueError("no loop branch found")


def bench_cases():
    """(name, OpSpec, input generator(rng) -> dict of inputs) for the benchmark script."""
    from ..registry import OpSpec
    cases = []
    for rows, n in ((128, 128), (1024, 1000), (4096, 64)):
        spec = OpSpec("softmax", [((rows, n), "float32")], ((rows, n), "float32"), {"axis": -1})
        cases.append((f"softmax_{rows}x{n}", spec,
                      lambda rng, r=rows, n=n: {"x": rng.standard_normal((r, n)).astype(np.float32)}))
    return cases


def _register():
    from ..registry import register
    register("softmax", supports, generate, estimate)


_register()
