"""Reductions: reduce_max / reduce_min over one axis, several axes or the whole tensor
(float32, int8, int16, int32), plus the building blocks pooling reuses (``pool.py``: "sum" with a
divisor = global average pooling).

Plans take the runtime input buffer ``"data"`` and write the output buffer ``"out"``.

Decomposition
-------------
The reduced axes are split into groups of adjacent axes; each group is one *stage* that
reduces a view ``[K0, R, K1]`` (outer, reduced, inner; row-major) to ``[K0, K1]``. Stages run
from the innermost group outwards, each one a launch, chaining through scratch buffers.

Two stage kernels:

* **lanes over outputs** (:func:`lanes_kernel`): each lane owns one output ``(k0, k1)``; a
  16-lane vector covers 16 consecutive outputs, so for ``K1 >= 16`` every load is 16 contiguous
  elements. The reduced axis is walked with a per-lane address that advances by ``K1`` elements:
  fully unrolled when ``R <= 8``, else a loop (8 elements per iteration, 8 loads in flight: a
  thread's share of the TMU output FIFO, :data:`~.common.TMU_FIFO_WORDS`).
  Workers (workgroups, one per QPU) take contiguous runs of vectors; each lane's starting
  offsets come from a small host-made table (``<prefix>_table``, one 16-byte vec4 load).
* **segments** (:func:`segment_kernel`), for ``K1 == 1`` with few rows and long ``R`` (the whole
  tensor, a trailing-axis reduction of a small batch, global average pooling of few planes): each
  row is cut into ``S`` disjoint segments (:func:`segment_bounds`), ``K * S`` a multiple of the
  worker count. A worker streams a segment with 16-lane vec4 loads (256 contiguous bytes per
  lookup; int8/int16 use per-lane typed loads, 16 elements per lookup), 2 lookups in flight (8
  for int8/int16: 8 FIFO words either way). The loop folds the segment's full lookups; the segment's **tail** (fewer than
  ``U * 16 * G`` elements) arrives in the last in-flight lookups, whose words are folded under a
  per-lane flag (element index < segment end); the lookups issued past the tail read on into
  the next segment or the input buffer's padding (:func:`segment_src_bytes`) and are never folded.
  So every element is folded exactly once: max / min / sum alike (integer sums wrap modulo
  2**32 exactly like numpy int32, in any order). The 16 lane partials are combined with
  ``rotate`` and lane 0 stores the segment partial (int32 / float32); a second ``lanes`` stage
  reduces ``[K, S]`` (and applies a divisor: global average pooling).

NaN semantics (float): numpy's -- a NaN anywhere in a reduced set makes the result NaN. The
QPU's fmin / fmax are IEEE minNum / maxNum (a NaN operand is ignored), so the kernels also keep
``max(bits << 1)`` (unsigned) per lane; a value above ``0xff000000`` means a NaN was seen and
the result becomes the quiet NaN ``0x7fc00000``. ``max(-0.0, +0.0)`` may return either zero (they
compare equal, as in numpy's ``==``).

Integers: min / max are exact and keep the input dtype (8/16-bit data are sign-extended by the
TMU and stored back with 8/16-bit TMU stores). "sum" accumulates in int32 (wrapping) and, with a
divisor, divides truncating toward zero (C, and TVM's llvm build of ``mean`` / ``avg_pool2d``:
-7 / 4 = -1), exactly. TVM sums int8 / int16 in the input dtype, so where such a sum overflows
that dtype TVM's mean is the wrapped one and ours the true mean (a deliberate difference,
docs/kernels.md); float sums accumulate in float32
(per lane, then across lanes and segments: not numpy's pairwise order; the pooling tolerance is
1e-5 relative to the sum of |x|).

argmax / argmin (:func:`arg_kernel`, kinds "argmax" / "argmin"): one axis (or None: the flattened
tensor), float32 / int8 / int16 / int32 in, int64 (or int32) indices out, numpy semantics: the
first index of the extreme; float NaN: the index of the first NaN; -0.0 == +0.0 (first wins).
``select_last_index`` is refused. A single lanes pass (lanes over outputs), so it is fast when
there are many outputs; few long rows are instruction-bound on few workers (no segment pass).

Performance model (:func:`estimate`): per stage, the larger of its DRAM traffic and the busiest
worker's TMU occupancy, plus a round trip, all from the TimingModel (runtime/cycle_model.py).
"""
from __future__ import annotations

import math
import struct
from dataclasses import dataclass, replace

import numpy as np

from .. import asm as A
from .. import registry
from ..asm import L, b, mov, nop, sub, add, shl, shr, asr, eidx, tmuwt, thread_end, rotate
from ..instr import MAGIC, RF
from ..plan import BufferSpec, KernelPlan, Launch
from .common import TMU_FIFO_WORDS

S = A.SIGNALS
R_ = A.R
tmua, tmud, tmuc, null = (MAGIC[n] for n in ("tmua", "tmud", "tmuc", "null"))

NUM_QPUS = 12
DTYPES = ("float32", "int8", "int16", "int32")
ITEMSIZE = {"int8": 1, "int16": 2, "int32": 4, "float32": 4, "int64": 8}
TMU_TYPE = {"int8": 0, "int16": 1, "int32": 7, "float32": 7}
VEC4_CFG = 0xFFFFFF00 | 0xFC            # one vec4 lookup, then default 32-bit
NAN_LIMIT = 0xFF000000                  # (bits << 1) above this: a NaN
QNAN = 0x7FC00000
INT_RANGE = {"int8": (-128, 127), "int16": (-32768, 32767), "int32": (-2 ** 31, 2 ** 31 - 1)}
F32_BITS = {"-inf": 0xFF800000, "inf": 0x7F800000}

#: op -> (int ALU op, float ALU op)
ALU = {"max": ("imax", "fmax"), "min": ("imin", "fmin"), "sum": ("add", "fadd")}


def neutral_bits(op: str, dtype: str) -> int:
    """The identity of ``op`` as the 32-bit register value (ints sign-extended)."""
    if dtype == "float32":
        return {"max": F32_BITS["-inf"], "min": F32_BITS["inf"], "sum": 0}[op]
    lo, hi = INT_RANGE[dtype]
    return {"max": lo, "min": hi, "sum": 0}[op] & 0xFFFFFFFF


def tmu_cfg_word(dtype: str) -> int:
    """tmuc word configuring exactly one lookup of ``dtype`` (then the 32-bit default)."""
    return 0xFFFFFF00 | 0x80 | (15 << 3) | TMU_TYPE[dtype]


def f32_bits(x: float) -> int:
    return struct.unpack("<I", struct.pack("<f", float(x)))[0]


# ------------------------------------------------------------------------------------------------
# Kernel builder: registers and a constant pool read from the uniform stream in a prologue
# ------------------------------------------------------------------------------------------------
class Builder:
    """Collects a kernel body; constants requested while emitting it (``u32`` / ``addr``) get a
    register each, loaded by a prologue of ``ldunifrf`` instructions placed in front of the
    body. rf2 / rf3 (the dispatch payload) are never handed out."""

    def __init__(self, name: str):
        self.name = name
        self.free = [RF[0], RF[1]] + [RF[i] for i in range(4, 64)]
        self.consts: dict = {}
        self.order: list = []

    def reg(self, n: int | None = None):
        if n is None:
            if not self.free:
                raise ValueError(f"{self.name}: out of registers")
            return self.free.pop(0)
        return [self.reg() for _ in range(n)]

    def _const(self, key):
        if key not in self.consts:
            r = self.reg()
            self.consts[key] = r
            self.order.append((key, r))
        return self.consts[key]

    def u32(self, v: int):
        return self._const(("u32", int(v) & 0xFFFFFFFF))

    def addr(self, name: str, off: int = 0):
        return self._const(("addr", name, int(off)))

    def build(self, body, *args):
        main = A.Program(self.name)
        with main:
            body(self, *args)
        pro = A.Program(self.name + "_prologue")
        with pro:
            for _, r in self.order:
                nop(sig=S["ldunifrf"](r))
        words = np.concatenate([pro.words(), main.words()]).astype(np.uint64)
        return words, [key for key, _ in self.order]


def _label(prefix: str) -> str:
    return f"{prefix}{len(A.Program._stack[-1].items)}"


def emit_loop(body_instrs, label: str, counter, one):
    """A counted loop: ``counter`` iterations of the emitters in ``body_instrs`` (callables that
    may emit several instructions each); the branch is moved so that the last three body
    instructions fill its delay slots."""
    prog = A.Program._stack[-1]
    prog.label(label)
    start = len(prog.items)
    sub(counter, counter, one, cond="pushz")
    for e in body_instrs:
        e()
    while len(prog.items) - start < 4:
        nop()
    br = b(getattr(R_, label), cond="anyna")
    prog.items.pop()
    prog.items.insert(len(prog.items) - 3, br)


# ------------------------------------------------------------------------------------------------
# Combine step and finalisation, shared with pool.py
# ------------------------------------------------------------------------------------------------
class Acc:
    """Per-lane accumulator state for one reduction op on one dtype."""

    def __init__(self, kb: Builder, op: str, dtype: str):
        self.op, self.dtype = op, dtype
        self.is_float = dtype == "float32"
        self.track_nan = self.is_float and op in ("max", "min")
        self.fn = A.DSL[ALU[op][1 if self.is_float else 0]]
        self.acc = kb.reg()
        self.nacc = kb.reg() if self.track_nan else None
        self.t = kb.reg() if self.track_nan else None
        self.neutral = kb.u32(neutral_bits(op, dtype))

    def init(self):
        ins = mov(self.acc, self.neutral)
        if self.track_nan:
            ins.sub(self.nacc, self.nacc, self.nacc)

    def combine(self, v, sig=None, mul=None, cond=None):
        """Fold register ``v`` into the accumulator. ``sig`` (e.g. the next ldtmu) and ``mul``
        (a callable adding a mul-ALU op, e.g. the next TMU address) ride on the last
        instruction. ``cond`` makes the fold conditional (then no signal may ride)."""
        if self.track_nan:
            self.fn(self.acc, self.acc, v, cond=cond).add(self.t, v, v, cond=cond)
            last = A.DSL["umax"](self.nacc, self.nacc, self.t, sig=sig, cond=cond)
        else:
            last = self.fn(self.acc, self.acc, v, sig=sig, cond=cond)
        if mul is not None:
            mul(last)
        return last

    def lane_reduce(self, kb: Builder):
        """Combine the 16 lanes (every lane ends with the total)."""
        t = kb.reg()
        for sh in (8, 4, 2, 1):
            rotate(t, self.acc, sh)
            self.fn(self.acc, self.acc, t)
            if self.track_nan:
                rotate(t, self.nacc, sh)
                A.DSL["umax"](self.nacc, self.nacc, t)

    def fix_nan(self, kb: Builder):
        if self.track_nan:
            sub(null, kb.u32(NAN_LIMIT), self.nacc, cond="pushc")   # A = NaN seen
            mov(self.acc, kb.u32(QNAN), cond="ifa")


def floor_div_const(kb: Builder, x, c, rc):
    """x <- floor(x / c) for int32 x and 0 < c < 2**15 (per-lane or uniform registers c and
    rc = float32(1 / c)). Long division in two 16-bit digits, each quotient digit estimated in
    float32 and corrected by one step each way (exact)."""
    hi, lo, q1, tt = kb.reg(4)
    r16 = kb.u32(16)
    one = kb.u32(1)
    asr(hi, x, r16)
    shl(lo, x, r16)
    shr(lo, lo, r16)

    def digit(num, q):
        A.DSL["itof"](q, num)
        A.DSL["fmul"](q, q, rc)
        A.DSL["ffloor"](q, q)
        A.DSL["ftoiz"](q, q)
        A.DSL["smul24"](tt, q, c)
        sub(tt, num, tt)                                     # remainder
        mov(null, tt, cond="pushn")                          # A = remainder < 0
        sub(q, q, one, cond="ifa").add(tt, tt, c, cond="ifa")
        sub(null, tt, c, cond="pushn")                       # A = remainder < c
        add(q, q, one, cond="ifna").sub(tt, tt, c, cond="ifna")

    digit(hi, q1)                                            # tt = r1 in [0, c)
    shl(tt, tt, r16)
    A.DSL["bor"](hi, tt, lo)                                 # r1 * 65536 + lo < c * 65536
    digit(hi, x)
    shl(q1, q1, r16)
    add(x, x, q1)


def trunc_div_const(kb: Builder, x, c, rc, c_minus_1):
    """x <- trunc(x / c) (toward zero, C / TVM integer division) for int32 x and 0 < c < 2**15:
    a negative x first gains c - 1 (no overflow: the result stays below c), so the floor
    division of :func:`floor_div_const` rounds it up. ``c_minus_1`` holds c - 1 (per lane or
    uniform)."""
    mov(null, x, cond="pushn")                               # A = x < 0
    add(x, x, c_minus_1, cond="ifa")
    floor_div_const(kb, x, c, rc)


def store_vector(kb: Builder, val, addr, out_dtype: str, cond: str | None = None):
    if ITEMSIZE[out_dtype] < 4:
        mov(tmuc, kb.u32(tmu_cfg_word(out_dtype)))
    mov(tmud, val)
    mov(tmua, addr, cond=cond)


def load_lane_table(kb: Builder, table: str, regs, table_offset: int = 0):
    """Each lane of workgroup x loads 4 words at ``table + table_offset + x * 256 + lane * 16``
    (``table_offset``: the first worker of a launch that covers a run of the table's workers)."""
    lane, t = kb.reg(2)
    eidx(lane)
    mov(t, RF[3].unpack("ul"))
    shl(t, t, 8)
    shl(lane, lane, 4)
    add(t, t, lane)
    add(t, t, kb.addr(table, table_offset))
    mov(tmuc, kb.u32(VEC4_CFG))
    mov(tmua, t)
    for r in regs:
        nop(sig=S["ldtmu"](r))


# ------------------------------------------------------------------------------------------------
# Stage descriptions
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LanesStage:
    """Reduce view [K0, R, K1] of ``src`` (dtype in_dtype) into ``dst`` [K0, K1] (out_dtype)."""
    K0: int
    R: int
    K1: int
    op: str
    in_dtype: str
    out_dtype: str
    src: str
    dst: str
    prefix: str
    divisor: int = 1            # "sum" only: divide by this (float: * 1/d; int: toward zero)
    table_offset: int = 0       # bytes into the lane table of this launch's first worker

    def at_worker(self, w0: int) -> "LanesStage":
        """This stage's launch over the table's workers from ``w0`` (a run of a split stage)."""
        return replace(self, table_offset=w0 * LANE_TABLE_ROW_BYTES)

    @property
    def P(self):
        return self.K0 * self.K1


PF = 8                          # loads in flight in the lanes kernel's loop
UNROLL = 8


#: bytes of one worker's row of a lane table (16 lanes x 4 words)
LANE_TABLE_ROW_BYTES = 16 * 4 * 4


def lanes_layout(st: LanesStage, num_qpus: int = NUM_QPUS, launches: int = 1):
    """(workers, vectors per worker, table) for the lanes kernel: the 16-output vectors in equal
    runs over ``num_qpus`` workers per launch, ``launches`` launches (launch i runs workers
    ``i * num_qpus ..``, :func:`lanes_runs`)."""
    V = -(-st.P // 16)
    chunk = -(-V // (num_qpus * max(1, launches)))
    W = -(-V // chunk)
    es, oes = ITEMSIZE[st.in_dtype], ITEMSIZE[st.out_dtype]
    tab = np.zeros((W, 16, 4), dtype=np.int64)
    for w in range(W):
        end = min(st.P, (w + 1) * chunk * 16)
        o = w * chunk * 16 + np.arange(16)
        k0, k1 = o // st.K1, o % st.K1
        tab[w, :, 0] = (k0 * st.R * st.K1 + k1) * es
        tab[w, :, 1] = o * oes
        tab[w, :, 2] = end - o
        tab[w, :, 3] = k1
    return W, chunk, (tab & 0xFFFFFFFF).astype(np.uint32).view(np.int32)


def lanes_src_bytes(st: LanesStage) -> int:
    """Bytes the lanes kernel may read from ``src`` (tensor + prefetch / partial-vector overrun)."""
    es = ITEMSIZE[st.in_dtype]
    o = -(-st.P // 16) * 16 + 15
    k0, k1 = o // st.K1, o % st.K1
    last = (k0 * st.R * st.K1 + k1 + (st.R + PF) * st.K1) * es
    return max(st.K0 * st.R * st.K1 * es, last) + 64


def lanes_kernel(kb: Builder, st: LanesStage):
    es, oes = ITEMSIZE[st.in_dtype], ITEMSIZE[st.out_dtype]
    small = es < 4
    cfg = kb.u32(tmu_cfg_word(st.in_dtype)) if small else None
    ain, aout, remw, k1, v, p, cnt = kb.reg(7)
    one = kb.u32(1)
    acc = Acc(kb, st.op, st.in_dtype)
    rs = st.K1 * es                                            # bytes between reduced elements
    load_lane_table(kb, st.prefix + "_table", (ain, aout, remw, k1), st.table_offset)
    add(ain, ain, kb.addr(st.src))
    add(aout, aout, kb.addr(st.dst))

    def issue(base, off):
        """TMU load of base + off bytes (preceded by its config word for 8/16-bit data)."""
        if small:
            mov(tmuc, cfg)
        if off == 0:
            mov(tmua, base)
        else:
            nop().add(tmua, base, kb.u32(off))

    L.vloop
    acc.init()
    if st.R <= TMU_FIFO_WORDS:                                  # all R loads fit in the FIFO
        for r in range(st.R):
            issue(ain, r * rs)
        for r in range(st.R):
            nop(sig=S["ldtmu"](v))
            acc.combine(v)
    else:
        for j in range(PF):
            issue(ain, j * rs)
        add(p, ain, kb.u32(PF * rs))                           # next element to issue
        nop(sig=S["ldtmu"](v))

        def step(off):
            def emit():
                if small:
                    mov(tmuc, cfg)
                acc.combine(v, sig=S["ldtmu"](v), mul=lambda i: i.add(tmua, p, kb.u32(off)))
            return emit

        rem = st.R % UNROLL
        for j in range(rem):
            step(j * rs)()
        if rem:
            add(p, p, kb.u32(rem * rs))
        mov(cnt, kb.u32(st.R // UNROLL))
        body = [lambda: nop().add(p, p, kb.u32(UNROLL * rs))]
        body += [step((j - UNROLL) * rs) for j in range(UNROLL)]
        emit_loop(body, _label("rloop"), cnt, one)
        for _ in range(PF - 1):                                # drain the over-issued loads
            nop(sig=S["ldtmu"](v))
    acc.fix_nan(kb)
    if st.divisor != 1:
        _divide(kb, acc, st.divisor)
    sub(null, remw, one, cond="pushn")                         # A = lane beyond this worker's run
    store_vector(kb, acc.acc, aout, st.out_dtype, cond="ifna")
    _advance(kb, st, ain, aout, remw, k1, es, oes)
    sub(null, remw, one, cond="pushn")
    b(R_.vloop, cond="anyna")
    nop()
    nop()
    nop()
    tmuwt()
    thread_end()


def _divide(kb: Builder, acc: Acc, d: int):
    """acc <- acc / d: float32 ``acc * float32(1 / d)``; integers truncated toward zero (TVM)."""
    if acc.is_float:
        A.DSL["fmul"](acc.acc, acc.acc, kb.u32(f32_bits(np.float32(1.0) / np.float32(d))))
    elif d & (d - 1) == 0:
        mov(null, acc.acc, cond="pushn")                      # A = negative: round toward zero
        add(acc.acc, acc.acc, kb.u32(d - 1), cond="ifa")
        asr(acc.acc, acc.acc, kb.u32(d.bit_length() - 1))
    else:
        trunc_div_const(kb, acc.acc, kb.u32(d), kb.u32(f32_bits(np.float32(1.0) / np.float32(d))), kb.u32(d - 1))


def _advance(kb, st: LanesStage, ain, aout, remw, k1, es, oes):
    """Move every lane 16 outputs on: 16 = a * K1 + b; k1 += b with one carry into k0."""
    a_, b_ = divmod(16, st.K1)
    astep = (a_ * st.R * st.K1 + b_) * es
    if b_ == 0:
        add(ain, ain, kb.u32(astep))
    else:
        add(k1, k1, kb.u32(b_)).add(ain, ain, kb.u32(astep))
        sub(null, k1, kb.u32(st.K1), cond="pushn")             # A = no carry
        sub(k1, k1, kb.u32(st.K1), cond="ifna").add(ain, ain, kb.u32((st.R - 1) * st.K1 * es), cond="ifna")
    add(aout, aout, kb.u32(16 * oes)).sub(remw, remw, kb.u32(16))


# ------------------------------------------------------------------------------------------------
# Segment stage (long contiguous rows: min / max / sum)
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SegmentStage:
    K: int
    R: int
    S: int                      # segments per row
    op: str
    dtype: str
    src: str
    dst: str                    # [K, S] partials (then the idle items' slots), int32 / float32
    prefix: str
    num_qpus: int = NUM_QPUS

    @property
    def G(self):                # elements per lane per lookup
        return 4 if ITEMSIZE[self.dtype] == 4 else 1

    @property
    def per(self):              # elements per lookup (16 lanes)
        return 16 * self.G

    @property
    def U(self):                # lookups per loop iteration
        return 4 if self.G == 1 else 1

    @property
    def PF(self):               # lookups in flight: G words each within the thread's FIFO share
        return TMU_FIFO_WORDS // self.G


SEG_MIN_LEN = 1024
SEG_MAX_ROWS = 192


def segment_bounds(R: int, S: int, G: int) -> list:
    """S + 1 element offsets cutting a row of R into S disjoint segments, each at least
    ``R // S`` long, or ``R // S - 15`` when the starts are rounded down to 16 elements (only
    when ``R // S >= 64 * G + 16``): every segment holds at least one loop block (64 elements)
    whenever ``R // S >= 64 * G`` (:func:`choose_segments`)."""
    bs = [s * R // S for s in range(S)]
    if R // S >= 64 * G + 16:
        bs = [x // 16 * 16 for x in bs]
    return bs + [R]


def segment_layout(st: SegmentStage, num_qpus: int | None = None):
    """(workers, items per worker, U, table). Item (k, s) = elements [lo, hi) of row k:
    [start byte, loop lookups (a multiple of U, every one full), elements left after them
    (0 <= left < U * per: folded by the masked drain), out byte]. When ``K * S`` is not a
    multiple of the workers, idle items pad the table: one loop block of the tensor's start,
    stored past the ``K * S`` partials (see :func:`segment_dst_words`)."""
    num_qpus = st.num_qpus if num_qpus is None else num_qpus
    items = st.K * st.S
    W = min(num_qpus, items)
    m = -(-items // W)
    W = -(-items // m)
    es, per, U = ITEMSIZE[st.dtype], st.per, st.U
    tab = np.zeros((W * m, 4), dtype=np.int64)
    bs = segment_bounds(st.R, st.S, st.G)
    for k in range(st.K):
        for s in range(st.S):
            lo, hi = bs[s], bs[s + 1]
            n = (hi - lo) // per // U * U
            if n < U:
                raise ValueError(f"segment of {hi - lo} elements: too short for the segment kernel")
            left = hi - lo - n * per
            assert 0 <= left < st.PF * per
            tab[k * st.S + s] = [(k * st.R + lo) * es, n, left, (k * st.S + s) * 4]
    for i in range(items, W * m):
        tab[i] = [0, U, 0, i * 4]
    return W, m, U, (tab & 0xFFFFFFFF).astype(np.uint32).view(np.int32)


def segment_dst_words(st: SegmentStage) -> int:
    """Words of the partials buffer the segment kernel writes (``K * S`` + idle items)."""
    W, m, _, _ = segment_layout(st)
    return W * m


def segment_src_bytes(st: SegmentStage) -> int:
    """Bytes the segment kernel may read from ``src``: the tensor plus the in-flight lookups
    issued past the end of the last segment (never folded)."""
    return (st.K * st.R + st.PF * st.per) * ITEMSIZE[st.dtype] + 64


def segment_kernel(kb: Builder, st: SegmentStage):
    """Per item: ``PF`` lookups in flight; the loop folds ``n`` full lookups (issuing the
    next ones); the drain pops the last ``PF`` lookups and folds word j of lane l of drain
    lookup i only where ``i * per + l * G + j < left`` (the segment's tail). Lookups past the
    tail read on into the next segment / the buffer padding and are never folded, so every
    element is folded exactly once (sums are exact for integers)."""
    es, G, per, U, PFc = ITEMSIZE[st.dtype], st.G, st.per, st.U, st.PF
    small = es < 4
    _, m, _, _ = segment_layout(st)
    cfg = kb.u32(tmu_cfg_word(st.dtype)) if small else kb.u32(VEC4_CFG)
    one = kb.u32(1)
    lane, lofs, trow, a, rem, n, aout, items = kb.reg(8)
    vs = kb.reg(G)
    acc = Acc(kb, st.op, st.dtype)
    step = kb.u32(per * es)
    eidx(lane)
    mov(trow, RF[3].unpack("ul"))
    A.DSL["umul24"](trow, trow, kb.u32(m * 16))
    add(trow, trow, kb.addr(st.prefix + "_table"))
    mov(items, kb.u32(m))
    A.DSL["umul24"](lofs, lane, kb.u32(G * es))                # lane byte offset in a lookup
    L.item
    mov(tmuc, kb.u32(VEC4_CFG))
    mov(tmua, trow)
    nop(sig=S["ldtmu"](a))
    nop(sig=S["ldtmu"](n))
    nop(sig=S["ldtmu"](rem))
    nop(sig=S["ldtmu"](aout))
    add(a, a, kb.addr(st.src))
    add(a, a, lofs)
    add(aout, aout, kb.addr(st.dst))
    A.DSL["umul24"](vs[0], lane, kb.u32(G))
    sub(rem, rem, vs[0])                                       # tail elements left for this lane
    acc.init()

    def issue():
        mov(tmuc, cfg)
        mov(tmua, a).add(a, a, step)

    for _ in range(PFc):
        issue()

    def chunk():
        ems = []
        for g in range(G):
            ems.append(lambda g=g: nop(sig=S["ldtmu"](vs[g])))
        for g in range(G):
            ems.append(lambda g=g: acc.combine(vs[g]))
        ems.append(lambda: mov(tmuc, cfg))
        ems.append(lambda: mov(tmua, a).add(a, a, step))
        return ems

    body = []
    for _ in range(U):
        body += chunk()
    if U > 1:
        shr(n, n, kb.u32(U.bit_length() - 1))
    emit_loop(body, _label("cloop"), n, one)
    skip = kb.u32(per - G + 1)
    for i in range(PFc):                                       # masked tail
        for g in range(G):
            nop(sig=S["ldtmu"](vs[g]))
        for g in range(G):
            sub(rem, rem, one if (i == 0 or g > 0) else skip, cond="pushn")   # A = past the tail
            acc.combine(vs[g], cond="ifna")
    acc.lane_reduce(kb)
    acc.fix_nan(kb)
    mov(null, lane, cond="pushz")                              # A = lane 0
    mov(tmud, acc.acc)
    mov(tmua, aout, cond="ifa")
    add(trow, trow, kb.u32(16))
    sub(items, items, one, cond="pushz")
    b(R_.item, cond="anyna")
    nop()
    nop()
    nop()
    tmuwt()
    thread_end()


# ------------------------------------------------------------------------------------------------
# argmax / argmin (one axis)
# ------------------------------------------------------------------------------------------------
ARG_OUT_DTYPES = ("int64", "int32")
ARG_PF = 8                      # loads in flight
F32_MAG = 0x7FFFFFFF
F32_INF_MAG = 0x7F800000


def arg_kernel(kb: Builder, st: LanesStage):
    """argmax / argmin of view [K0, R, K1] (``st.op`` "argmax" / "argmin"): lanes over outputs as
    in :func:`lanes_kernel` (same table and advance), one element per loop iteration with
    ``ARG_PF`` loads in flight. Each element becomes an int32 *key* ordered like the value:
    integers as loaded (sign-extended); float32 ``sign ? -|bits| : |bits|`` (so -0.0 == +0.0),
    every NaN the key ``INT_MAX`` (argmax) / ``INT_MIN`` (argmin), which nothing beats. The index
    is taken only when the key strictly beats the best so far: the first extreme (or NaN) wins,
    as numpy's argmax / argmin. The index is stored as int32, or int64 (high word 0)."""
    es = ITEMSIZE[st.in_dtype]
    small = es < 4
    is_max = st.op == "argmax"
    ext = A.DSL["imax" if is_max else "imin"]
    cfg = kb.u32(tmu_cfg_word(st.in_dtype)) if small else None
    ain, aout, remw, k1, v, p, cnt, best, idx, r, t, key = kb.reg(12)
    one, zero = kb.u32(1), kb.u32(0)
    rs = kb.u32(st.K1 * es)
    start_key = kb.u32(-2 ** 31 if is_max else 2 ** 31 - 1)
    load_lane_table(kb, st.prefix + "_table", (ain, aout, remw, k1), st.table_offset)
    add(ain, ain, kb.addr(st.src))
    add(aout, aout, kb.addr(st.dst))
    if st.in_dtype == "float32":
        mag_mask, inf_mag = kb.u32(F32_MAG), kb.u32(F32_INF_MAG)
        nan_key = kb.u32(2 ** 31 - 1 if is_max else -2 ** 31)

    def issue():
        if small:
            mov(tmuc, cfg)
        mov(tmua, p).add(p, p, rs)

    L.vloop
    mov(best, start_key).mov(idx, zero)
    mov(r, zero).mov(p, ain)
    mov(cnt, kb.u32(st.R))
    for _ in range(ARG_PF):
        issue()
    lbl = _label("aloop")
    prog = A.Program._stack[-1]
    prog.label(lbl)
    nop(sig=S["ldtmu"](v))
    issue()
    if st.in_dtype == "float32":
        A.DSL["band"](key, v, mag_mask)
        mov(null, v, cond="pushn")                             # A = sign bit
        sub(key, zero, key, cond="ifa")
        A.DSL["band"](t, v, mag_mask)
        sub(null, inf_mag, t, cond="pushn")                    # A = NaN
        mov(key, nan_key, cond="ifa")
        v = key
    ext(t, best, v)
    sub(null, t, best, cond="pushz")                           # A = not better
    mov(best, t).mov(idx, r, cond="ifna")
    sub(cnt, cnt, one, cond="pushz")
    b(getattr(R_, lbl), cond="anyna")
    add(r, r, one)
    nop()
    nop()
    for _ in range(ARG_PF):                                    # the over-issued loads
        nop(sig=S["ldtmu"](t))
    sub(null, remw, one, cond="pushn")                         # A = lane beyond this worker's run
    mov(tmud, idx)
    mov(tmua, aout, cond="ifna")
    if st.out_dtype == "int64":
        mov(tmud, zero)
        nop().add(tmua, aout, kb.u32(4), cond="ifna")
    _advance(kb, st, ain, aout, remw, k1, es, ITEMSIZE[st.out_dtype])
    sub(null, remw, one, cond="pushn")
    b(R_.vloop, cond="anyna")
    nop()
    nop()
    nop()
    tmuwt()
    thread_end()


def plan_arg(op: str, shape, dtype: str, axis: int, keepdims=False, out_dtype="int64", num_qpus=NUM_QPUS,
             name=None, budget_seconds: float | None = None) -> KernelPlan:
    """Plan ``op`` ("argmax" / "argmin") of ``data`` over one ``axis`` into ``out`` (out_dtype):
    one launch, or (modelled over ``budget_seconds``, default the v3d dispatch budget) several
    over runs of output vectors (:func:`split_lanes`); ``attrs["launch_seconds"]`` models each."""
    shape = tuple(int(s) for s in shape)
    name = name or op
    if len(shape) == 0:
        shape_v, ax = (1,), 0
    else:
        shape_v, ax = shape, int(axis) % len(shape)
    K0 = int(np.prod(shape_v[:ax], dtype=np.int64))
    R = shape_v[ax]
    K1 = int(np.prod(shape_v[ax + 1:], dtype=np.int64))
    out_shape = tuple(1 if i == ax else s for i, s in enumerate(shape)) if keepdims else \
        tuple(s for i, s in enumerate(shape) if i != ax)
    st = LanesStage(K0, R, K1, op, dtype, out_dtype, "data", "out", name)
    n = split_lanes(K0, R, K1, dtype, num_qpus, arg=True, budget_seconds=budget_seconds)
    launches, table_buf, tab = lanes_launch(st, num_qpus, n, arg_kernel, "arg")
    data_bytes = int(np.prod(shape, dtype=np.int64)) * ITEMSIZE[dtype]
    need = lanes_src_bytes(LanesStage(K0, R + ARG_PF, K1, op, dtype, out_dtype, "data", "out", name))
    bufs = [BufferSpec("data", "input", shape, dtype, max(need, data_bytes)),
            BufferSpec("out", "output", out_shape, out_dtype), table_buf]
    out_bytes = K0 * K1 * ITEMSIZE[out_dtype]
    from .common import timing_model, seconds
    m = timing_model(None)
    ls = [seconds(m, c) for c in lanes_launch_cycles(m, K0, R, K1, dtype, num_qpus, n, arg=True)]
    return KernelPlan(name, bufs, launches, {name + "_table": tab},
                      attrs={"op": op, "shape": shape, "dtype": dtype, "axis": ax, "keepdims": keepdims,
                             "launch_seconds": ls},
                      flops=data_bytes // ITEMSIZE[dtype], bytes_moved=data_bytes + out_bytes)


# ------------------------------------------------------------------------------------------------
# Planning
# ------------------------------------------------------------------------------------------------
def norm_axes(axis, ndim: int) -> tuple:
    if axis is None:
        return tuple(range(ndim))
    if isinstance(axis, int):
        axis = (axis,)
    out = sorted({a % ndim if ndim else 0 for a in axis})
    if any(not -ndim <= a < ndim for a in axis):
        raise ValueError(f"axis {axis} out of range for rank {ndim}")
    return tuple(out)


def stage_views(shape, axes) -> list:
    """[(K0, R, K1)] per group of adjacent reduced axes, innermost group first; each view is of
    the tensor left by the previous stages."""
    shape = list(shape)
    red = [i in axes for i in range(len(shape))]
    groups = []
    i = 0
    while i < len(shape):
        if red[i]:
            j = i
            while j < len(shape) and red[j]:
                j += 1
            groups.append((i, j))
            i = j
        else:
            i += 1
    views = []
    for lo, hi in reversed(groups):
        K0 = int(np.prod(shape[:lo], dtype=np.int64))
        R = int(np.prod(shape[lo:hi], dtype=np.int64))
        K1 = int(np.prod(shape[hi:], dtype=np.int64))
        views.append((K0, R, K1))
        shape = shape[:lo] + shape[hi:]
    return views


def _assemble(body, st, name):
    kb = Builder(name)
    return kb.build(body, st)


def acc_dtype(dtype: str) -> str:
    return "float32" if dtype == "float32" else "int32"


def lanes_launch(st: LanesStage, num_qpus=NUM_QPUS, launches: int = 1, kernel=lanes_kernel, stage: str = "lanes"):
    """([launch, ...], table buffer, table) of a lanes stage cut into ``launches`` launches over
    runs of its workers (:func:`lanes_runs`); ``kernel`` (argmax / argmin: :func:`arg_kernel`) is
    named ``<prefix>_<stage>``."""
    W, _, tab = lanes_layout(st, num_qpus, launches)
    out = []
    label = f"{st.prefix}_{stage}"
    for i, (w0, nw, _, _) in enumerate(lanes_runs(st.P, num_qpus, launches)):
        words, unif = _assemble(kernel, st.at_worker(w0), label)
        out.append(Launch(words, unif, (nw, 1, 1), 16, num_qpus, 1,
                          label if launches == 1 else f"{label}_part{i}"))
    buf = BufferSpec(st.prefix + "_table", "weight", tab.shape, "int32")
    return out, buf, tab


def lanes_runs(P: int, num_qpus: int = NUM_QPUS, launches: int = 1) -> list:
    """[(first worker, workers, vectors, vectors of its busiest worker)] of each launch of a
    lanes stage with ``P`` outputs cut into ``launches`` launches (:func:`lanes_layout`)."""
    V = -(-P // 16)
    chunk = -(-V // (num_qpus * max(1, launches)))
    W = -(-V // chunk)
    return [(w0, min(num_qpus, W - w0), min(V, (w0 + num_qpus) * chunk) - w0 * chunk, chunk)
            for w0 in range(0, W, num_qpus)]


def segment_launch(st: SegmentStage, num_qpus=NUM_QPUS):
    W, _, _, tab = segment_layout(st, num_qpus)
    words, unif = _assemble(segment_kernel, st, f"{st.prefix}_segments")
    buf = BufferSpec(st.prefix + "_table", "weight", tab.shape, "int32")
    return Launch(words, unif, (W, 1, 1), 16, num_qpus, 1, f"{st.prefix}_segments"), buf, tab


def choose_segments(K: int, R: int, dtype: str, num_qpus=NUM_QPUS) -> int:
    """Segments per row for the segment stage, or 0 when the lanes kernel is the better fit.
    Preferred: ``K * S`` a multiple of the workers (every worker the same number of items, at
    least 2 per worker for a single row); else the ``S`` (segments >= 64 * G elements) that
    minimises the busiest worker's share, ``ceil(K * S / workers) / S`` rows (idle items pad)."""
    G = 4 if ITEMSIZE[dtype] == 4 else 1
    if K >= SEG_MAX_ROWS or R < SEG_MIN_LEN:
        return 0
    s = num_qpus // math.gcd(K, num_qpus)
    while K * s < 2 * num_qpus and R // (2 * s) >= 64 * G:
        s *= 2
    while s > 1 and R // s < 64 * G:
        s //= 2
    if K * s % min(num_qpus, K * s) == 0:
        return s
    smax = max(1, min(R // (64 * G), 4 * num_qpus))
    return min(range(1, smax + 1), key=lambda c: (-(-K * c // num_qpus) / c, c))


def plan_reduce(op: str, shape, dtype: str, axis=None, keepdims=False, num_qpus=NUM_QPUS,
                divisor: int = 1, name="reduce", budget_seconds: float | None = None) -> KernelPlan:
    """Plan reducing ``data`` (shape, dtype) with ``op`` over ``axis`` into ``out``. A lanes stage
    modelled over ``budget_seconds`` (default the v3d dispatch budget) runs as several launches
    over runs of its output vectors (:func:`split_lanes`); ``attrs["launch_seconds"]`` models
    each launch (:func:`plan_launch_cycles`)."""
    shape = tuple(int(s) for s in shape)
    axes = norm_axes(axis, len(shape))
    out_shape = tuple(1 if i in axes else s for i, s in enumerate(shape)) if keepdims else \
        tuple(s for i, s in enumerate(shape) if i not in axes)
    views = stage_views(shape, axes) or [(int(np.prod(shape, dtype=np.int64)), 1, 1)]
    bufs, consts, launches = [], {}, []
    src, src_dtype = "data", dtype
    in_need = 0
    data_bytes = int(np.prod(shape, dtype=np.int64)) * ITEMSIZE[dtype]
    scratch_need = {}
    for si, (K0, R, K1) in enumerate(views):
        last = si == len(views) - 1
        dst = "out" if last else f"{name}_s{si}"
        dst_dtype = dtype if last else acc_dtype(dtype)
        pre = f"{name}{si}"
        segs = choose_segments(K0, R, src_dtype, num_qpus) if K1 == 1 else 0
        if segs:
            seg = SegmentStage(K0, R, segs, op, src_dtype, src, pre + "_part", pre + "g", num_qpus)
            L1, tb, tab = segment_launch(seg, num_qpus)
            launches.append(L1)
            bufs.append(tb)
            consts[tb.name] = tab
            bufs.append(BufferSpec(pre + "_part", "scratch", (K0 * segs,), acc_dtype(src_dtype), K0 * segs * 4 + 64))
            st = LanesStage(K0, segs, 1, op, acc_dtype(src_dtype), dst_dtype, pre + "_part", dst, pre, divisor if last else 1)
            need = segment_src_bytes(seg)
        else:
            st = LanesStage(K0, R, K1, op, src_dtype, dst_dtype, src, dst, pre, divisor if last else 1)
            need = lanes_src_bytes(st)
        n = split_lanes(K0, segs if segs else R, 1 if segs else K1, acc_dtype(src_dtype) if segs else src_dtype,
                        num_qpus, budget_seconds=budget_seconds)
        L2, tb, tab = lanes_launch(st, num_qpus, n)
        if segs:
            # the partials buffer is read by the second stage: pad it for that stage's over-reads
            bufs[-1] = BufferSpec(pre + "_part", "scratch", (K0 * segs,), acc_dtype(src_dtype),
                                  max(lanes_src_bytes(st), segment_dst_words(seg) * 4 + 64))
        launches += L2
        bufs.append(tb)
        consts[tb.name] = tab
        if src == "data":
            in_need = max(in_need, need)
        else:
            scratch_need[src] = max(scratch_need.get(src, 0), need)
        if not last:
            scratch_need.setdefault(dst, 0)
            scratch_need[dst] = max(scratch_need[dst], K0 * K1 * 4 + 64)
        src, src_dtype = dst, dst_dtype
    for nm, nb in scratch_need.items():
        bufs.append(BufferSpec(nm, "scratch", (nb // 4,), "int32", nb))
    bufs.insert(0, BufferSpec("data", "input", shape, dtype, max(in_need, data_bytes)))
    bufs.insert(1, BufferSpec("out", "output", out_shape, dtype))
    out_bytes = int(np.prod(out_shape, dtype=np.int64)) * ITEMSIZE[dtype]
    from .common import timing_model, seconds
    m = timing_model(None)
    ls = [seconds(m, c) for c in plan_launch_cycles(m, shape, axes, dtype, num_qpus, budget_seconds)]
    assert len(ls) == len(launches)
    return KernelPlan(name, bufs, launches, consts,
                      attrs={"op": op, "shape": shape, "dtype": dtype, "axes": axes, "keepdims": keepdims,
                             "stages": views, "launch_seconds": ls},
                      flops=int(np.prod(shape, dtype=np.int64)), bytes_moved=data_bytes + out_bytes)


# ------------------------------------------------------------------------------------------------
# References
# ------------------------------------------------------------------------------------------------
def trunc_divide(s: np.ndarray, d) -> np.ndarray:
    """Integer division truncated toward zero (C / TVM), elementwise; ``d`` > 0."""
    q = np.abs(s) // d
    return np.where(s < 0, -q, q)


def reference(op: str, x: np.ndarray, axis=None, keepdims=False, divisor: int = 1) -> np.ndarray:
    """numpy reference: np.max / np.min (NaN propagates), dtype kept; "sum": int32 wrapping sum
    then division by ``divisor`` truncated toward zero (integers), float64 sum / divisor
    (float32), cast to the input dtype (the low bits for 8/16-bit integers, like the kernels'
    narrow stores)."""
    axes = norm_axes(axis, x.ndim)
    if op == "sum":
        if x.dtype == np.float32:
            return (x.astype(np.float64).sum(axis=axes, keepdims=keepdims) / divisor).astype(np.float32)
        s = x.astype(np.int64).sum(axis=axes, keepdims=keepdims)
        s = (s + 2 ** 31) % 2 ** 32 - 2 ** 31
        return trunc_divide(s, divisor).astype(x.dtype)
    fn = {"max": np.max, "min": np.min}[op]
    return fn(x, axis=axes, keepdims=keepdims).astype(x.dtype)


# ------------------------------------------------------------------------------------------------
# Registry entries
# ------------------------------------------------------------------------------------------------
def _spec_parts(spec: registry.OpSpec):
    (shape, dtype), = spec.inputs[:1]
    return tuple(shape), dtype


def supports(spec: registry.OpSpec):
    if spec.kind in ("argmax", "argmin"):
        return arg_supports(spec)
    if spec.kind not in ("reduce_max", "reduce_min"):
        return False, f"reduce.py handles reduce_max / reduce_min / argmax / argmin, not {spec.kind}"
    if len(spec.inputs) != 1:
        return False, "one input expected"
    shape, dtype = _spec_parts(spec)
    if dtype not in DTYPES:
        return False, f"dtype {dtype} not supported (float32, int8, int16, int32)"
    if any(int(s) <= 0 for s in shape):
        return False, "empty tensors are not supported"
    if spec.output[1] != dtype:
        return False, "output dtype must equal the input dtype"
    try:
        axes = norm_axes(spec.attrs.get("axis"), len(shape))
    except (ValueError, TypeError) as e:
        return False, str(e)
    n = int(np.prod(shape, dtype=np.int64))
    if n * ITEMSIZE[dtype] >= 1 << 30:
        return False, "tensor larger than 1 GiB"
    for K0, R, K1 in stage_views(shape, axes):
        if -(-K0 * K1 // 16) > 0xFFFF * 16:
            return False, "too many outputs"
    return True, ""


def _arg_axis(spec: registry.OpSpec, ndim: int):
    """The one reduced axis of an argmax / argmin spec (None: the flattened tensor)."""
    ax = spec.attrs.get("axis", None)
    if isinstance(ax, (tuple, list)):
        if len(ax) != 1:
            raise ValueError("argmax / argmin over exactly one axis")
        ax = ax[0]
    if ax is None:
        return None
    ax = int(ax)
    if not -max(ndim, 1) <= ax < max(ndim, 1):
        raise ValueError(f"axis {ax} out of range for rank {ndim}")
    return ax % max(ndim, 1)


def _arg_view(spec: registry.OpSpec):
    """(shape to plan, axis, output shape) of an argmax / argmin spec (axis None flattens)."""
    shape, _ = _spec_parts(spec)
    ax = _arg_axis(spec, len(shape))
    keep = bool(spec.attrs.get("keepdims", False))
    if ax is None:
        n = int(np.prod(shape, dtype=np.int64))
        return (n,), 0, (tuple(1 for _ in shape) if keep else ())
    out = tuple(1 if i == ax else s for i, s in enumerate(shape)) if keep else \
        tuple(s for i, s in enumerate(shape) if i != ax)
    return tuple(shape) if shape else (1,), ax, out


def arg_supports(spec: registry.OpSpec):
    if len(spec.inputs) != 1:
        return False, "one input expected"
    shape, dtype = _spec_parts(spec)
    if dtype not in DTYPES:
        return False, f"dtype {dtype} not supported (float32, int8, int16, int32)"
    if spec.output[1] not in ARG_OUT_DTYPES:
        return False, f"index dtype {spec.output[1]} not supported (int64, int32)"
    if spec.attrs.get("select_last_index"):
        return False, "select_last_index (last extreme) is not supported: numpy's first index only"
    if any(int(s) <= 0 for s in shape):
        return False, "empty tensors are not supported"
    try:
        vshape, ax, out = _arg_view(spec)
    except (ValueError, TypeError) as e:
        return False, str(e)
    if tuple(spec.output[0]) != out:
        return False, f"output shape {tuple(spec.output[0])} != computed {out}"
    n = int(np.prod(shape, dtype=np.int64))
    if n * ITEMSIZE[dtype] >= 1 << 30:
        return False, "tensor larger than 1 GiB"
    if -(-n // vshape[ax] // 16) > 0xFFFF * 16:
        return False, "too many outputs"
    return True, ""


def arg_generate(spec: registry.OpSpec, constants=None) -> KernelPlan:
    """Plan for argmax / argmin: input buffer "data", output buffer "out" (int64 / int32)."""
    ok, why = arg_supports(spec)
    if not ok:
        raise ValueError(why)
    _, dtype = _spec_parts(spec)
    vshape, ax, out = _arg_view(spec)
    plan = plan_arg(spec.kind, vshape, dtype, ax, False, spec.output[1], name=spec.kind)
    if tuple(plan.buffer("out").shape) != out or tuple(plan.buffer("data").shape) != tuple(_spec_parts(spec)[0]):
        o, d = plan.buffer("out"), plan.buffer("data")
        plan.buffers[plan.buffers.index(o)] = BufferSpec("out", "output", out, o.dtype, o.nbytes)
        plan.buffers[plan.buffers.index(d)] = BufferSpec("data", "input", tuple(_spec_parts(spec)[0]), d.dtype, d.nbytes)
    return plan


def arg_estimate(spec: registry.OpSpec, model=None) -> float:
    """Modelled seconds under ``model``: the sum of the arg plan's launches
    (:func:`arg_launch_cycles`)."""
    from .common import timing_model, seconds
    m = timing_model(model)
    return seconds(m, sum(arg_launch_cycles(spec, m)))


def arg_launch_cycles(spec: registry.OpSpec, model=None) -> list:
    """Modelled cycles of each launch of the argmax / argmin plan (:func:`arg_cycles`; cut into
    launches by :func:`split_lanes` as the plan is)."""
    from .common import timing_model
    m = timing_model(model)
    _, dtype = _spec_parts(spec)
    vshape, ax, _ = _arg_view(spec)
    K0 = int(np.prod(vshape[:ax], dtype=np.int64))
    R = vshape[ax]
    K1 = int(np.prod(vshape[ax + 1:], dtype=np.int64))
    n = split_lanes(K0, R, K1, dtype, NUM_QPUS, arg=True)
    return lanes_launch_cycles(m, K0, R, K1, dtype, NUM_QPUS, n, arg=True)


def longest_dispatch_seconds(spec: registry.OpSpec, model=None) -> float:
    """Modelled seconds (under ``model``) of the longest launch of the reduction's plan
    (placement's dispatch-budget rule): reduce_max / reduce_min, argmax / argmin."""
    from .common import timing_model, seconds
    m = timing_model(model)
    if spec.kind in ("argmax", "argmin"):
        return seconds(m, max(arg_launch_cycles(spec, m)))
    shape, dtype = _spec_parts(spec)
    return seconds(m, max(plan_launch_cycles(m, shape, norm_axes(spec.attrs.get("axis"), len(shape)), dtype)))


def generate(spec: registry.OpSpec, constants=None) -> KernelPlan:
    """Plan for reduce_max / reduce_min: input buffer "data", output buffer "out"."""
    ok, why = supports(spec)
    if not ok:
        raise ValueError(why)
    shape, dtype = _spec_parts(spec)
    return plan_reduce(spec.kind.split("_")[1], shape, dtype, spec.attrs.get("axis"),
                       bool(spec.attrs.get("keepdims", False)), name=spec.kind)


def stage_cycles(model, K0: int, R: int, K1: int, dtype: str, segments: bool) -> float:
    """Modelled cycles of one reduction stage over the view [K0, R, K1] in one launch: the
    largest of its DRAM traffic, the shared L2 port (every line each lookup touches) and the
    busiest worker's TMU occupancy, plus one round trip. The lanes kernel makes one lookup per
    reduced element of each 16-output vector, touching the distinct lines of its 16 lanes (one
    line per lane when adjacent outputs are a row apart; :func:`lanes_cycles`); segment stages
    stream contiguous vec4 lookups."""
    from .common import dram_cycles, round_trip, l2_port_cycles, slice_tmu_cycles
    es = ITEMSIZE[dtype]
    n = K0 * R * K1
    if segments:
        traffic = dram_cycles(model, (n + K0 * K1) * es)
        l2 = l2_port_cycles(model, n * es / model.line_bytes + K0)
        lookups = n * es / 256                          # 16 lanes x vec4 (or 16 typed elements)
        tmu = slice_tmu_cycles(model, lookups, 4, 64 if es == 4 else 16, model.num_qpus)
        return max(traffic, l2, tmu) + round_trip(model, True)
    V = -(-(K0 * K1) // 16)
    return lanes_cycles(model, R, K1, dtype, K0 * K1, V, -(-V // min(V, model.num_qpus)), K0 * K1)


def _lane_lines(model, R: int, K1: int, es: int, P: int | None = None) -> float:
    """Mean distinct lines one 16-lane lookup of the lanes kernel touches: lane l of vector v
    reads output o = 16 v + l's element r, byte ((o // K1 * R + r) * K1 + o % K1) * es; counted
    over a sample of the view's vectors and reduced elements (``P`` outputs). Without ``P``:
    adjacent lanes contiguous from a random offset (K1 >= 16), else a reduced row apart."""
    from .common import lookup_lines
    if P is None:
        if K1 >= 16:
            return min(16.0, lookup_lines(model, 16 * es))
        return min(16.0, max(1.0, 16 * R * K1 * es / model.line_bytes))
    V = -(-P // 16)
    vs = np.arange(min(V, 64))                   # alignments repeat within 64 vectors / rows
    rs = np.arange(min(R, 64))
    o = vs[:, None] * 16 + np.arange(16)[None, :]                       # [v, lane]
    on = o < P
    o = np.minimum(o, P - 1)
    base = (o // K1 * R) * K1 + o % K1                                   # element index at r = 0
    addr = (base[:, :, None] + rs[None, None, :] * K1) * es              # [v, lane, r]
    first, last = addr // model.line_bytes, (addr + es - 1) // model.line_bytes
    counts = [len(np.unique(np.concatenate([first[i, on[i], j], last[i, on[i], j]])))
              for i in range(len(vs)) for j in range(len(rs))]
    return float(np.mean(counts))


def lanes_cycles(model, R: int, K1: int, dtype: str, outputs: int, V: int, per_worker: int,
                 P: int | None = None) -> float:
    """Modelled cycles of one lanes launch over ``V`` vectors (``outputs`` outputs) of the view
    [., R, K1] (``P`` outputs in all, for the lookups' lines, :func:`_lane_lines`),
    ``per_worker`` vectors on its busiest worker: the largest of its DRAM traffic, the shared
    L2 port, the slice TMUs and the busiest worker's chain (:func:`lanes_worker_cycles`), plus
    one round trip. A vector whose R elements do not fit the thread's FIFO share keeps PF loads
    in flight and over-issues PF - 1 (drained unused): they are lookups too, and past the last
    slab of a K1 >= 16 view (rows R.. of the last k0) lines nothing else reads. A line two
    lookups share (adjacent vectors of a worker, K1 >= 16) hits the L2 only while the lines the
    active workers read in between (a vector's lookups each) fit it; else every lookup's lines
    miss."""
    from .common import dram_cycles, round_trip, l2_port_cycles, slice_tmu_cycles
    es = ITEMSIZE[dtype]
    lines = _lane_lines(model, R, K1, es, P)
    extra = PF - 1 if R > TMU_FIFO_WORDS else 0
    waste = 0.0
    if extra and K1 >= 16 and P is not None:
        last_slab = min(V, -(-K1 // 16))                 # vectors of the last k0
        waste = last_slab * extra * lines * model.line_bytes
    looks = R + extra
    active = min(V, model.num_qpus)
    between = active * looks * lines * model.line_bytes          # bytes read between two reuses
    if K1 >= 16 and between > model.l2_bytes:      # (a reduced row apart: reused by the next lookup)
        moved = V * looks * lines * model.line_bytes + outputs * es
        miss = 1.0
    else:
        moved = (outputs * R + outputs) * es + waste
        miss = min(1.0, outputs * R * es / model.line_bytes / max(1.0, V * R * lines))
    traffic = dram_cycles(model, moved)
    tmu = max(per_worker * looks * lines * model.tmu_cycles_per_line,
              slice_tmu_cycles(model, V * looks, lines, 16, active))
    l2 = l2_port_cycles(model, V * (looks * lines + 1))
    worker = lanes_worker_cycles(model, R, K1, dtype, per_worker, lines, miss, active)
    return max(traffic, tmu, l2, worker) + round_trip(model, True)


def _lanes_profile(R: int, K1: int, dtype: str) -> tuple:
    """(instructions per reduced element in the lanes kernel's loop, instructions of a vector
    outside it), from the generated program."""
    from .common import loop_lengths
    words, _ = _assemble(lanes_kernel, LanesStage(1, R, K1, "max", dtype, dtype, "data", "out", "probe"),
                         "probe_lanes")
    loops = loop_lengths(words)
    if R <= TMU_FIFO_WORDS or len(loops) < 2:          # unrolled: every element in the vector loop
        return (loops[-1] if loops else len(words)) / max(1, R), 0
    return loops[0] / UNROLL, loops[-1] - loops[0]


def lanes_worker_cycles(model, R: int, K1: int, dtype: str, vectors: int, lines: float, miss: float,
                        active: int) -> float:
    """The busiest worker's chain: per vector its code outside the element loop and one round
    trip before its first element (the loads restart each vector), then each further element
    paced by the slowest of its loop instructions, the round trip over the PF loads in flight
    and its turn on the slice TMU (its lookup's lines and 16 returned words, behind the slice's
    other active workers)."""
    from .common import round_trip
    per_elem, outside = _lanes_profile(R, K1, dtype)
    cpi = model.cycles_per_instruction
    rt = round_trip(model, miss)
    share = min(max(1, active), max(1, model.qpus_per_slice))
    occ = lines * model.tmu_cycles_per_line + 16 * model.tmu_cycles_per_word
    elem = max(per_elem * cpi, rt / PF, share * occ)
    return vectors * (outside * cpi + rt + max(0, R - 1) * elem)


def arg_cycles(model, R: int, K1: int, dtype: str, outputs: int, V: int, per_worker: int, loop: int) -> float:
    """Modelled cycles of one argmax / argmin launch over ``V`` vectors (``outputs`` outputs) of
    the view [., R, K1]: its busiest worker (``per_worker`` vectors) folds one element of its 16
    outputs per iteration of the ``loop``-instruction inner loop; bounded below by the DRAM
    traffic, the L2 port and the slice TMU; plus one round trip."""
    from .common import dram_cycles, round_trip, l2_port_cycles, slice_tmu_cycles
    es = ITEMSIZE[dtype]
    lines = _lane_lines(model, R, K1, es)
    cycles = max(dram_cycles(model, outputs * R * es), per_worker * R * loop * model.cycles_per_instruction,
                 l2_port_cycles(model, V * (R * lines + 1)),
                 slice_tmu_cycles(model, V * R, lines, 16, min(V, model.num_qpus)))
    return cycles + round_trip(model, True)


def _arg_loop(R: int, K1: int, dtype: str) -> int:
    """Instructions of the arg kernel's inner loop (from the generated program)."""
    from .common import loop_lengths
    words, _ = _assemble(arg_kernel, LanesStage(1, R, K1, "argmax", dtype, "int64", "data", "out", "probe"),
                         "probe_arg")
    return loop_lengths(words)[0]


def lanes_launch_cycles(model, K0: int, R: int, K1: int, dtype: str, num_qpus: int = NUM_QPUS,
                        launches: int = 1, arg: bool = False) -> list:
    """Modelled cycles of each launch of a lanes stage (or, ``arg``, the argmax / argmin kernel)
    over the view [K0, R, K1] cut into ``launches`` (:func:`lanes_runs`)."""
    P = K0 * K1
    loop = _arg_loop(R, K1, dtype) if arg else 0
    out = []
    for _, nw, V, chunk in lanes_runs(P, num_qpus, launches):
        outs = min(P, 16 * V)
        if arg:
            out.append(arg_cycles(model, R, K1, dtype, outs, V, chunk, loop))
        elif launches == 1:                      # the whole stage: as stage_cycles
            out.append(stage_cycles(model, K0, R, K1, dtype, False))
        else:
            out.append(lanes_cycles(model, R, K1, dtype, outs, V, chunk, P))
    return out


def split_lanes(K0: int, R: int, K1: int, dtype: str, num_qpus: int = NUM_QPUS, model=None,
                arg: bool = False, budget_seconds: float | None = None) -> int:
    """Launches of a lanes stage (or argmax / argmin kernel) over the view [K0, R, K1]: the
    fewest whose longest is modelled (:func:`lanes_launch_cycles`) within ``budget_seconds``
    (default :func:`.common.dispatch_budget_seconds`). The persistent launch keeps every batch
    resident, so the v3d hang check (no batch-counter progress for 500 ms) bounds each launch.
    One vector per worker and launch when nothing fits (the budget check then refuses it)."""
    from .common import timing_model, seconds, dispatch_budget_seconds
    m = timing_model(model)
    budget = dispatch_budget_seconds() if budget_seconds is None else budget_seconds
    whole = seconds(m, max(lanes_launch_cycles(m, K0, R, K1, dtype, num_qpus, 1, arg)))
    if whole <= budget:
        return 1
    most = -(-(-(-(K0 * K1) // 16)) // num_qpus)
    for n in range(max(2, math.ceil(whole / budget)), most + 1):
        if seconds(m, max(lanes_launch_cycles(m, K0, R, K1, dtype, num_qpus, n, arg))) <= budget:
            return n
    return most


def plan_launch_cycles(model, shape, axes, dtype: str, num_qpus: int = NUM_QPUS,
                       budget_seconds: float | None = None) -> list:
    """Modelled cycles of each launch :func:`plan_reduce` makes (its stages in order; a segment
    pass, then its lanes stage over the [K, S] partials; each lanes stage cut by
    :func:`split_lanes` under the default model and ``budget_seconds``)."""
    out = []
    for K0, R, K1 in stage_views(shape, axes) or [(int(np.prod(shape, dtype=np.int64)), 1, 1)]:
        S = choose_segments(K0, R, dtype, num_qpus) if K1 == 1 else 0
        if S:
            out.append(stage_cycles(model, K0 * S, R // S, 1, dtype, True))
            view = (K0, S, 1, acc_dtype(dtype))
        else:
            view = (K0, R, K1, dtype)
        n = split_lanes(*view, num_qpus, budget_seconds=budget_seconds)
        out += lanes_launch_cycles(model, *view, num_qpus, n)
        dtype = acc_dtype(dtype)                 # the next stage reads this one's partials
    return out


def reduce_cycles(model, shape, axes, dtype: str) -> float:
    """Modelled cycles of all launches of a reduction (a segment pass adds a second lanes stage
    over the [K, S] partials; a lanes stage over the dispatch budget is cut into launches)."""
    return sum(plan_launch_cycles(model, shape, axes, dtype))


def estimate(spec: registry.OpSpec, model=None) -> float:
    """Modelled seconds under ``model`` (default: the emulator's TimingModel): the sum of the
    plan's stages (:func:`reduce_cycles`)."""
    from .common import timing_model, seconds
    m = timing_model(model)
    shape, dtype = _spec_parts(spec)
    axes = norm_axes(spec.attrs.get("axis"), len(shape))
    return seconds(m, reduce_cycles(m, shape, axes, dtype))


def bench_cases():
    """(name, OpSpec, input generator(rng) -> {"data": array}) for the benchmark script."""
    n = 4 << 20

    def gen_i32(rng):
        return {"data": rng.integers(-2 ** 31, 2 ** 31 - 1, n, dtype=np.int64).astype(np.int32)}

    def gen_f32(rng):
        return {"data": rng.standard_normal(n).astype(np.float32)}

    return [
        ("reduce_max int32 4Mi", registry.OpSpec("reduce_max", [((n,), "int32")], ((), "int32"), {"axis": None}), gen_i32),
        ("reduce_min int32 4Mi", registry.OpSpec("reduce_min", [((n,), "int32")], ((), "int32"), {"axis": None}), gen_i32),
        ("reduce_max float32 4Mi", registry.OpSpec("reduce_max", [((n,), "float32")], ((), "float32"), {"axis": None}), gen_f32),
        ("argmax float32 1000x1000 axis 1", registry.OpSpec("argmax", [((1000, 1000), "float32")], ((1000,), "int64"),
                                                           {"axis": 1}),
         lambda rng: {"data": rng.standard_normal((1000, 1000)).astype(np.float32)}),
    ]


registry.register("reduce_max", supports, generate, estimate)
registry.register("reduce_min", supports, generate, estimate)
registry.register("argmax", supports, arg_generate, arg_estimate)
registry.register("argmin", supports, arg_generate, arg_estimate)
