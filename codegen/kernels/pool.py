"""2D pooling (NCHW): max_pool2d, avg_pool2d, global_avg_pool2d for float32, int8, int16, int32.

Plans take the runtime input buffer ``"data"`` and write the output buffer ``"out"``.

Semantics
---------
* Output size per axis (PyTorch / ONNX): ``out = floor_or_ceil((H + pt + pb - dh*(kh-1) - 1) / sh) + 1``;
  with ceil_mode the last window must start inside the input or the leading padding, else it
  is dropped.
* max: padded positions never take part (they act as -inf / the dtype minimum); a window with
  no valid position gives that neutral value. Float NaN propagates (as numpy / PyTorch).
  Output dtype = input dtype.
* avg: ``sum / count`` where ``count`` is the number of window taps inside the input, or, with
  ``count_include_pad``, inside the padded extent ``[-pad_before, size + pad_after)`` (taps of a
  ceil_mode overhang beyond the padding never count) -- PyTorch's rule, extended tap-wise to
  dilation. Float: the sum is accumulated in float32 in tap order and multiplied by
  ``float32(1 / count)`` (tolerance: 1e-5 relative to the sum of |x| / count). Integers: the sum
  is accumulated in int32 (wrapping modulo 2**32 like numpy int32) and divided **truncating
  toward zero** (C; TVM's llvm build: -1 / 4 = 0, -7 / 4 = -1), exactly; count < 2**15. Output
  dtype = input dtype. int32 matches TVM bit for bit, wraps included; TVM sums int8 / int16 in
  the input dtype, so where a window's sum overflows that dtype TVM returns the wrapped average
  and we the true one (deliberate; docs/kernels.md).
* global_avg_pool2d = avg over the whole plane (same rounding); it runs as a "sum" reduction of
  :mod:`.reduce`: few long planes take its two-pass segment kernel (each plane cut into disjoint
  segments, the segment tails masked, so every element is summed once; partials in int32 /
  float32, then the division), many short planes its lanes kernel (one lane per plane).

Kernel
------
Lanes own output positions: a 16-lane vector is 16 consecutive outputs of the flattened
``[N*C, OH, OW]`` output (so every store is one aligned 64-byte line for 32-bit outputs). Each
worker (workgroup, one per QPU) takes a contiguous run of vectors; lane starting offsets come
from a host table (``<prefix>_table``: input byte offset of tap (0, 0), ih0, iw0, output offset,
outputs left). Per vector, every lane advances by 16 outputs with constant steps and two carry
steps (column -> row -> plane). Each tap is one 16-lane gather at a constant byte offset from
the lane's base address. The loads of the *next* vector are issued while the current vector's
are folded, min(T, 8) taps ahead (T <= 16; 8 words: a thread's share of the TMU output FIFO).

Padding: taps are checked per lane (row ``ih0 + i*dh <u H``, column ``iw0 + j*dw <u W``); invalid
lanes neither load (masked TMU address write, so no out-of-bounds access) nor fold. Windows that
never leave the input (no padding, no ceil overhang) use a mask-free fast path (one instruction
per tap). Reads past the tensor end (the prefetch of the vector after the last) stay within the
input buffer's padded device size (``BufferSpec.nbytes``).

Pair kernel (:func:`pair_kernel`, chosen by :func:`kernel_for`): 32-bit windows of stride 2
along W with columns ``2 ow + {0, 1}`` (2 wide, no left padding) or ``2 ow + {-1, 0, 1}`` (3 wide,
left padding 1), undilated -- the 2x2/2 and 3x3/2 pad 1 pools of CNNs. Per window row each lane
reads its column pair as one vec2 lookup (a vector's row read is 128 contiguous bytes: 2 lines
instead of 2-3 gathers of 2-3 lines each; the shared L2 port charges every line a lookup
touches), the rows fold into an accumulator per column, and a 3-wide window takes column
``2 ow - 1`` from lane o - 1 by a one-lane ``rotate`` (lane 0 from the previous vector). Only the
tap rows / columns that some output has outside the input are checked.

Not supported (``supports`` says so): more than 16 taps per window (unless the window is the
whole plane: then global average), layouts other than NCHW.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .. import asm as A
from .. import registry
from ..asm import L, b, mov, nop, sub, add, shl, eidx, tmuwt, thread_end
from ..instr import RF
from ..plan import BufferSpec, KernelPlan, Launch
from . import reduce as RD
from .common import TMU_FIFO_WORDS
from .reduce import Acc, Builder, ITEMSIZE, store_vector, trunc_div_const, f32_bits, tmu_cfg_word

S = A.SIGNALS
R_ = A.R
tmua, tmuc, null = RD.tmua, RD.tmuc, RD.null
MAX_TAPS = 16


# ------------------------------------------------------------------------------------------------
# Geometry
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Pool2D:
    N: int
    C: int
    H: int
    W: int
    kh: int
    kw: int
    sh: int = 1
    sw: int = 1
    pt: int = 0
    pl: int = 0
    pb: int = 0
    pr: int = 0
    dh: int = 1
    dw: int = 1
    ceil_mode: bool = False
    op: str = "max"             # max | avg
    count_include_pad: bool = False
    dtype: str = "float32"

    @staticmethod
    def out_size(n, k, s, p0, p1, d, ceil):
        span = n + p0 + p1 - d * (k - 1) - 1
        if span < 0:
            return 0
        o = (-(-span // s) if ceil else span // s) + 1
        if ceil and (o - 1) * s >= n + p0:
            o -= 1
        return o

    @property
    def OH(self):
        return self.out_size(self.H, self.kh, self.sh, self.pt, self.pb, self.dh, self.ceil_mode)

    @property
    def OW(self):
        return self.out_size(self.W, self.kw, self.sw, self.pl, self.pr, self.dw, self.ceil_mode)

    @property
    def T(self):
        return self.kh * self.kw

    @property
    def P(self):
        return self.N * self.C * self.OH * self.OW

    def axis_valid(self, axis: str, padded: bool):
        """[out, k] booleans: tap k of output position o lies in the input (or padded extent)."""
        n, k, s, p0, p1, d, o = ((self.H, self.kh, self.sh, self.pt, self.pb, self.dh, self.OH) if axis == "h"
                                 else (self.W, self.kw, self.sw, self.pl, self.pr, self.dw, self.OW))
        c = np.arange(o)[:, None] * s - p0 + np.arange(k)[None, :] * d
        return (c >= -p0) & (c < n + p1) if padded else (c >= 0) & (c < n)

    @property
    def always_valid(self):
        return bool(self.axis_valid("h", False).all() and self.axis_valid("w", False).all())

    def counts(self):
        """[OH, OW] divisor of avg pooling."""
        vh = self.axis_valid("h", self.count_include_pad).sum(1)
        vw = self.axis_valid("w", self.count_include_pad).sum(1)
        return vh[:, None] * vw[None, :]


# ------------------------------------------------------------------------------------------------
# Host tables
# ------------------------------------------------------------------------------------------------
def _lane_state(g: Pool2D, o):
    o = np.asarray(o, dtype=np.int64)
    ow, oh, nc = o % g.OW, (o // g.OW) % g.OH, o // (g.OW * g.OH)
    ih0, iw0 = oh * g.sh - g.pt, ow * g.sw - g.pl
    return (nc * g.H * g.W + ih0 * g.W + iw0) * ITEMSIZE[g.dtype], ih0, iw0


def pool_layout(g: Pool2D, num_qpus=RD.NUM_QPUS, launches: int = 1):
    """(workers, table): per worker and lane the state of its first vector (input byte offset
    of tap (0, 0), ih0, iw0, output byte offset, outputs left = end - o) and the length of the
    worker's own run (end - o0). The pair kernel's 3-wide windows start one warm-up vector
    early (:func:`pair_kernel`). With ``launches`` > 1 the vectors are cut into
    ``launches * num_qpus`` runs; launch i takes workers [i num_qpus, (i + 1) num_qpus)."""
    V = -(-g.P // 16)
    chunk = -(-V // (num_qpus * max(1, launches)))
    W = -(-V // chunk)
    warmup = pair_mode(g) and PAIR_WINDOWS[(g.kw, g.pl)]
    tab = np.zeros((W, 16, 8), dtype=np.int64)
    for w in range(W):
        o0 = w * chunk * 16
        o = o0 - (16 if warmup and o0 else 0) + np.arange(16)
        end = min(g.P, (w + 1) * chunk * 16)
        off, ih0, iw0 = _lane_state(g, o)
        tab[w, :, 0], tab[w, :, 1], tab[w, :, 2] = off, ih0, iw0
        tab[w, :, 3] = o * ITEMSIZE[g.dtype]
        tab[w, :, 4] = end - o
        tab[w, :, 5] = end - o0
    return W, (tab & 0xFFFFFFFF).astype(np.uint32).view(np.int32)


def input_bytes(g: Pool2D) -> int:
    es = ITEMSIZE[g.dtype]
    V = -(-g.P // 16)
    off, _, _ = _lane_state(g, 16 * V + 31)
    ext = ((g.kh - 1) * g.dh * g.W + (g.kw - 1) * g.dw + 1) * es
    return int(max(g.N * g.C * g.H * g.W * es, off + ext + g.pt * g.W * es + g.pl * es)) + 64


# ------------------------------------------------------------------------------------------------
# The kernel
# ------------------------------------------------------------------------------------------------
class _State:
    """Per-vector lane state: base address of tap (0, 0), ih0, iw0 and, when masked, the
    per-row / per-column tap coordinates."""

    def __init__(self, kb: Builder, g: Pool2D, masked: bool):
        self.a, self.ih, self.iw = kb.reg(3)
        self.u = kb.reg(g.kh) if masked else []
        self.v = kb.reg(g.kw) if masked else []

    def regs(self):
        return [self.a, self.ih, self.iw] + self.u + self.v


def _copy(dst: _State, src: _State):
    pairs = list(zip(dst.regs(), src.regs()))
    for k in range(0, len(pairs), 2):
        ins = mov(pairs[k][0], pairs[k][1])
        if k + 1 < len(pairs):
            ins.mov(pairs[k + 1][0], pairs[k + 1][1])


def _coords(kb: Builder, g: Pool2D, st: _State):
    items = [(st.u[i], st.ih, i * g.dh) for i in range(g.kh)] + [(st.v[j], st.iw, j * g.dw) for j in range(g.kw)]
    for k in range(0, len(items), 2):
        d, s_, c = items[k]
        ins = add(d, s_, kb.u32(c))
        if k + 1 < len(items):
            d2, s2, c2 = items[k + 1]
            ins.add(d2, s2, kb.u32(c2))


def _advance(kb: Builder, g: Pool2D, st: _State):
    es = ITEMSIZE[g.dtype]
    a_, rest = divmod(16, g.OH * g.OW)
    b_, r_ = divmod(rest, g.OW)
    astep = (a_ * g.H * g.W + b_ * g.sh * g.W + r_ * g.sw) * es
    add(st.iw, st.iw, kb.u32(r_ * g.sw)).add(st.a, st.a, kb.u32(astep))
    sub(null, st.iw, kb.u32(g.OW * g.sw - g.pl), cond="pushn").add(st.ih, st.ih, kb.u32(b_ * g.sh))
    sub(st.iw, st.iw, kb.u32(g.OW * g.sw), cond="ifna").add(st.ih, st.ih, kb.u32(g.sh), cond="ifna")
    add(st.a, st.a, kb.u32((g.sh * g.W - g.OW * g.sw) * es), cond="ifna")
    sub(null, st.ih, kb.u32(g.OH * g.sh - g.pt), cond="pushn")
    sub(st.ih, st.ih, kb.u32(g.OH * g.sh), cond="ifna").add(
        st.a, st.a, kb.u32((g.H * g.W - g.OH * g.sh * g.W) * es), cond="ifna")


def _load_lane_table(kb: Builder, prefix: str, table_off: int, lane, t, scaled, dests):
    """Each lane's 8 lane-table words (``pool_layout``: 32 bytes per lane, 512 per worker) by two
    vec4 lookups, received into ``dests`` in order. ``lane`` and ``t`` are scratch, ``scaled``
    receives lane x 32 (may be ``lane`` itself)."""
    eidx(lane)
    mov(t, RF[3].unpack("ul"))
    shl(t, t, 9)
    shl(scaled, lane, 5)
    add(t, t, scaled)
    add(t, t, kb.addr(prefix + "_table", table_off))
    mov(tmuc, kb.u32(RD.VEC4_CFG))
    mov(tmua, t)
    mov(tmuc, kb.u32(RD.VEC4_CFG))
    nop().add(tmua, t, kb.u32(16))
    for r in dests:
        nop(sig=S["ldtmu"](r))


def pool_kernel(kb: Builder, g: Pool2D, prefix: str, table_off: int = 0):
    es = ITEMSIZE[g.dtype]
    small = es < 4
    masked = not g.always_valid
    cfg = kb.u32(tmu_cfg_word(g.dtype)) if small else None
    one = kb.u32(1)
    Hr, Wr = kb.u32(g.H), kb.u32(g.W)
    acc = Acc(kb, "max" if g.op == "max" else "sum", g.dtype)
    cur, nxt = _State(kb, g, masked), _State(kb, g, masked)
    aout, remw, v, tt = kb.reg(4)
    taps = [(i, j) for i in range(g.kh) for j in range(g.kw)]
    off_b = [(i * g.dh * g.W + j * g.dw) * es for i, j in taps]
    # unmasked: one register per tap offset; masked: a running pointer and the (few) deltas
    offs = [kb.u32(o) for o in off_b] if not masked else None
    ptr = kb.reg() if masked else None

    def step_ptr(ins, t_, base):
        """mul-ALU op on ``ins`` moving ptr to tap t_ of the vector at ``base``."""
        if t_ == 0:
            ins.mov(ptr, base)
        else:
            ins.add(ptr, ptr, kb.u32(off_b[t_] - off_b[t_ - 1]))
    counts = g.counts()
    const_count = g.op == "avg" and len(np.unique(counts)) == 1

    lane, t = kb.reg(2)
    _load_lane_table(kb, prefix, table_off, lane, t, lane, (nxt.a, nxt.ih, nxt.iw, aout, remw, tt, tt, tt))
    add(nxt.a, nxt.a, kb.addr("data"))
    add(aout, aout, kb.addr("out"))
    if masked:
        _coords(kb, g, nxt)

    def issue_flags(st: _State, i, j):
        first = sub(null, st.u[i], Hr, cond="pushc")
        sub(null, st.v[j], Wr, cond="andc")
        return first

    # taps run LA ahead in issue order (the current vector's, then the next one's): LA words
    # in flight, within the thread's TMU FIFO share
    T = len(taps)
    LA = min(T, TMU_FIFO_WORDS)

    def ahead(t_):
        """(state, tap index) of the lookup issued while tap t_ of the current vector is folded."""
        k = t_ + LA
        return (cur, k) if k < T else (nxt, k - T)

    # ---- prologue: the first vector's first LA taps ----
    for t_, (i, j) in enumerate(taps[:LA]):
        if small:
            mov(tmuc, cfg)
        if masked:
            step_ptr(issue_flags(nxt, i, j), t_, nxt.a)
            nop().mov(tmua, ptr, cond="ifa")
        else:
            nop().add(tmua, nxt.a, offs[t_])

    L.vloop
    _copy(cur, nxt)
    _advance(kb, g, nxt)
    if masked:
        _coords(kb, g, nxt)
    acc.init()
    if not masked:
        nop(sig=S["ldtmu"](v))
        for t_ in range(len(taps)):
            if small:
                mov(tmuc, cfg)
            sig = S["ldtmu"](v) if t_ + 1 < len(taps) else None
            st_k, k = ahead(t_)
            acc.combine(v, sig=sig, mul=lambda ins, st_k=st_k, k=k: ins.add(tmua, st_k.a, offs[k]))
    else:
        for t_, (i, j) in enumerate(taps):
            st_k, k = ahead(t_)
            step_ptr(issue_flags(cur, i, j), k, st_k.a)        # A = current tap valid
            issue_flags(st_k, *taps[k])                        # B = current, A = issued tap valid
            if small:
                mov(tmuc, cfg, sig=S["ldtmu"](v))
            else:
                nop(sig=S["ldtmu"](v))
            acc.combine(v, cond="ifb", mul=lambda ins: ins.mov(tmua, ptr, cond="ifa"))
    acc.fix_nan(kb)
    if g.op == "avg":
        if const_count:
            RD._divide(kb, acc, int(counts.flat[0]))
        else:
            _dynamic_divide(kb, g, cur, acc)
    sub(null, remw, one, cond="pushn")                         # A = lane past this worker's run
    store_vector(kb, acc.acc, aout, g.dtype, cond="ifna")
    add(aout, aout, kb.u32(16 * es)).sub(remw, remw, kb.u32(16))
    sub(null, remw, one, cond="pushn")
    b(R_.vloop, cond="anyna")
    nop()
    nop()
    nop()
    for _ in range(LA):                                        # the over-issued taps
        nop(sig=S["ldtmu"](v))
    tmuwt()
    thread_end()


# ------------------------------------------------------------------------------------------------
# Pair kernel: stride-2 windows of 2 or 3 columns read as vec2 row lookups
# ------------------------------------------------------------------------------------------------
#: tmuc word: one vec2 lookup (two consecutive 32-bit words per lane), then the 32-bit default
VEC2_CFG = 0xFFFFFF00 | 0x80 | (15 << 3) | 2
#: (kw, pl) of the pair kernel: the window's columns relative to 2 * ow are {0, 1} or {-1, 0, 1}
PAIR_WINDOWS = {(2, 0): False, (3, 1): True}         # -> needs the column 2 ow - 1 (rotated)


def pair_mode(g: Pool2D) -> bool:
    """The pair kernel takes 32-bit windows of stride 2 along W whose columns are ``2 ow + {0, 1}``
    (2 wide, no left padding) or ``2 ow + {-1, 0, 1}`` (3 wide, left padding 1), undilated.
    Lane o reads columns (2 ow, 2 ow + 1) of each window row as one vec2 lookup: a 16-output
    vector's row read is 128 contiguous bytes (2 lines) instead of 2 or 3 gathers of 2-3 lines
    each; column 2 ow - 1 is column 2 (ow - 1) + 1, which lane o - 1 read: a lane rotation."""
    return ITEMSIZE[g.dtype] == 4 and g.sw == 2 and g.dw == 1 and (g.kw, g.pl) in PAIR_WINDOWS


def _needs(g: Pool2D, axis: str):
    """Per tap row (``"h"``) / column (``"w"``): some output's tap falls outside the input."""
    return [not bool(c) for c in g.axis_valid(axis, False).all(axis=0)]


def pair_kernel(kb: Builder, g: Pool2D, prefix: str, table_off: int = 0):
    """Lanes own 16 consecutive outputs as in :func:`pool_kernel`. Per window row i one vec2
    lookup per lane (columns 2 ow, 2 ow + 1, masked on rows some output has outside the input);
    the rows fold into two accumulators, A (column 2 ow) and B (column 2 ow + 1). A 3-wide window
    adds B of lane o - 1 (``rotate`` by one lane; lane 0 takes lane 15 of the previous vector's
    B), invalid for ow = 0 (the padding). A worker whose run does not start a plane row runs one
    warm-up vector before it (stores masked: outputs [o0, end) only, table column 5 = end - o0)
    so that its first lane 0 has the previous vector's B."""
    rot = PAIR_WINDOWS[(g.kw, g.pl)]
    masked = not g.always_valid
    Hr, Wr = kb.u32(g.H), kb.u32(g.W)
    one = kb.u32(1)
    cfg = kb.u32(VEC2_CFG)
    need_row, need_col = _needs(g, "h"), _needs(g, "w")
    cols = ([0] if rot else []) + [g.kw - 2, g.kw - 1]      # taps: rotated (if any), word 0, word 1
    op = "max" if g.op == "max" else "sum"
    acc_a, acc_b = Acc(kb, op, g.dtype), Acc(kb, op, g.dtype)
    cur, nxt = _State(kb, g, masked), _State(kb, g, masked)
    aout, rem, span, va, vb, tt, lane = kb.reg(7)
    prev_b, rb, rp = kb.reg(3) if rot else (None, None, None)
    ptr = kb.reg()
    roff = [kb.u32((i * g.dh * g.W + g.pl) * 4) for i in range(g.kh)]
    counts = g.counts()
    const_count = g.op == "avg" and len(np.unique(counts)) == 1

    _load_lane_table(kb, prefix, table_off, lane, tt, ptr, (nxt.a, nxt.ih, nxt.iw, aout, rem, span, tt, tt))
    add(nxt.a, nxt.a, kb.addr("data"))
    add(aout, aout, kb.addr("out"))
    if masked:
        _coords(kb, g, nxt)
    if rot:
        mov(prev_b, acc_b.neutral)

    def issue(st: _State, i: int):
        """The vec2 lookup of window row i of the vector in ``st``."""
        mov(tmuc, cfg)
        if need_row[i]:
            sub(null, st.u[i], Hr, cond="pushc").add(ptr, st.a, roff[i])
            nop().mov(tmua, ptr, cond="ifa")
        else:
            nop().add(tmua, st.a, roff[i])

    def set_flags(checks):
        """A = every (coordinate register, bound) of ``checks`` is in range (unsigned)."""
        for k, (reg, bound) in enumerate(checks):
            sub(null, reg, bound, cond="pushc" if k == 0 else "andc")
        return "ifa" if checks else None

    def checks(st: _State, i: int, j: int):
        return ([(st.u[i], Hr)] if need_row[i] else []) + ([(st.v[j], Wr)] if need_col[j] else [])

    LA = min(g.kh, TMU_FIFO_WORDS // 2)                    # rows in flight (2 words each)

    def ahead(i):
        k = i + LA
        return (cur, k) if k < g.kh else (nxt, k - g.kh)

    for i in range(LA):
        issue(nxt, i)

    L.vloop
    _copy(cur, nxt)
    _advance(kb, g, nxt)
    if masked:
        _coords(kb, g, nxt)
    acc_a.init()
    acc_b.init()
    for i in range(g.kh):
        nop(sig=S["ldtmu"](va))
        nop(sig=S["ldtmu"](vb))
        issue(*ahead(i))
        ca, cb = checks(cur, i, cols[-2]), checks(cur, i, cols[-1])
        cond = set_flags(ca)
        acc_a.combine(va, cond=cond)
        if cb != ca:
            cond = set_flags(cb)
        acc_b.combine(vb, cond=cond)
    acc_b.fix_nan(kb)
    acc_a.combine(acc_b.acc)
    if rot:
        # rb = B of lane o - 1: rotate by one lane; lane 0 from the previous vector's lane 15
        A.DSL["rotate"](rb, acc_b.acc, 15)
        A.DSL["rotate"](rp, prev_b, 15)
        sub(null, lane, kb.u32(0), cond="pushz")
        mov(rb, rp, cond="ifa").mov(prev_b, acc_b.acc)
        cond = set_flags([(cur.v[0], Wr)] if need_col[0] else [])
        acc_a.combine(rb, cond=cond)
    acc_a.fix_nan(kb)
    if g.op == "avg":
        if const_count:
            RD._divide(kb, acc_a, int(counts.flat[0]))
        else:
            _dynamic_divide(kb, g, cur, acc_a)
    sub(tt, rem, one)
    sub(null, tt, span, cond="pushc")                      # A = o0 <= o < end
    store_vector(kb, acc_a.acc, aout, g.dtype, cond="ifa")
    add(aout, aout, kb.u32(64)).sub(rem, rem, kb.u32(16))
    sub(null, rem, one, cond="pushn")
    b(R_.vloop, cond="anyna")
    nop()
    nop()
    nop()
    for _ in range(2 * LA):                                # the over-issued rows
        nop(sig=S["ldtmu"](va))
    tmuwt()
    thread_end()


def _dynamic_divide(kb: Builder, g: Pool2D, cur: _State, acc: Acc):
    """Per-lane count = rows in range x columns in range; then divide."""
    cr, cc, tmp, rc = kb.reg(4)
    one = kb.u32(1)
    mov(cr, kb.u32(0)).mov(cc, kb.u32(0))
    for coords, lo, n, hi in ((cur.u, g.pt, g.H, g.pb), (cur.v, g.pl, g.W, g.pr)):
        cnt = cr if coords is cur.u else cc
        for c in coords:
            if g.count_include_pad:
                add(tmp, c, kb.u32(lo))
                sub(null, tmp, kb.u32(n + lo + hi), cond="pushc")
            else:
                sub(null, c, kb.u32(n), cond="pushc")
            add(cnt, cnt, one, cond="ifa")
    A.DSL["umul24"](cr, cr, cc)
    A.DSL["itof"](tmp, cr)
    A.DSL["recip"](rc, tmp)
    nop()
    nop()
    if acc.is_float:
        A.DSL["fmul"](acc.acc, acc.acc, rc)
    else:
        sub(cc, cr, one)                                       # count - 1 (cc is free again)
        trunc_div_const(kb, acc.acc, cr, rc, cc)


# ------------------------------------------------------------------------------------------------
# Plans
# ------------------------------------------------------------------------------------------------
def is_global(g: Pool2D) -> bool:
    return (g.OH == 1 and g.OW == 1 and g.kh == g.H and g.kw == g.W and g.dh == 1 and g.dw == 1
            and not any((g.pt, g.pl, g.pb, g.pr)))


def check(g: Pool2D):
    """Raise ValueError for what the kernels do not take."""
    if g.dtype not in RD.DTYPES:
        raise ValueError(f"dtype {g.dtype} not supported (float32, int8, int16, int32)")
    if min(g.N, g.C, g.H, g.W, g.kh, g.kw, g.sh, g.sw, g.dh, g.dw) < 1 or min(g.pt, g.pl, g.pb, g.pr) < 0:
        raise ValueError("sizes, strides and dilations must be >= 1, paddings >= 0")
    if g.OH < 1 or g.OW < 1:
        raise ValueError("empty output")
    if g.op == "avg" and is_global(g):
        _check_global(g.N, g.C, g.H, g.W, g.dtype)
        return
    if g.T > MAX_TAPS:
        raise ValueError(f"{g.T} taps per window: the kernel unrolls at most {MAX_TAPS}")
    if g.op == "avg":
        c = g.counts()
        if c.min() == 0:
            raise ValueError("a window has no position to average over")
        if c.max() >= 1 << 15:
            raise ValueError("window count >= 2**15")
    if g.N * g.C * g.H * g.W * ITEMSIZE[g.dtype] >= 1 << 30:
        raise ValueError("tensor larger than 1 GiB")


def _check_global(N, C, H, W, dtype):
    if dtype not in RD.DTYPES:
        raise ValueError(f"dtype {dtype} not supported")
    if dtype != "float32" and H * W >= 1 << 15:
        raise ValueError("integer global average over >= 2**15 positions")
    if N * C * H * W * ITEMSIZE[dtype] >= 1 << 30:
        raise ValueError("tensor larger than 1 GiB")


def plan_global_avg(N, C, H, W, dtype, name="global_avg_pool2d", budget_seconds: float | None = None) -> KernelPlan:
    """The mean of each plane: a sum reduction (reduce.plan_reduce; its launches each within
    ``budget_seconds``, default the v3d dispatch budget)."""
    _check_global(N, C, H, W, dtype)
    return RD.plan_reduce("sum", (N, C, H, W), dtype, (2, 3), keepdims=True, divisor=H * W, name=name,
                          budget_seconds=budget_seconds)


def plan_pool(g: Pool2D, name: str | None = None, num_qpus=RD.NUM_QPUS,
              budget_seconds: float | None = None) -> KernelPlan:
    """Plan of a window pooling: one launch, or (modelled over ``budget_seconds``, default the
    v3d dispatch budget) several launches over consecutive runs of output vectors
    (:func:`split_launches`), each within it; ``attrs["launch_seconds"]`` models each."""
    check(g)
    name = name or f"{g.op}_pool2d"
    if g.op == "avg" and is_global(g):
        return plan_global_avg(g.N, g.C, g.H, g.W, g.dtype, name, budget_seconds)
    n = split_launches(g, num_qpus, budget_seconds=budget_seconds)
    W, tab = pool_layout(g, num_qpus, n)
    launches = []
    for i, w0 in enumerate(range(0, W, num_qpus)):
        kb = Builder(name)
        words, unif = kb.build(kernel_for(g), g, name, w0 * 16 * 8 * 4)
        launches.append(Launch(words, unif, (min(num_qpus, W - w0), 1, 1), 16, num_qpus, 1,
                               name if n == 1 else f"{name}_part{i}"))
    es = ITEMSIZE[g.dtype]
    in_bytes = g.N * g.C * g.H * g.W * es
    out_bytes = g.P * es
    bufs = [BufferSpec("data", "input", (g.N, g.C, g.H, g.W), g.dtype, input_bytes(g)),
            BufferSpec("out", "output", (g.N, g.C, g.OH, g.OW), g.dtype),
            BufferSpec(name + "_table", "weight", tab.shape, "int32")]
    from .common import timing_model, seconds
    m = timing_model(None)
    attrs = dict(g.__dict__, launch_seconds=[seconds(m, c) for c in launch_cycles(g, m, num_qpus, n)])
    return KernelPlan(name, bufs, launches, {name + "_table": tab}, attrs=attrs, flops=g.P * g.T,
                      bytes_moved=in_bytes + out_bytes)



def split_launches(g: Pool2D, num_qpus=RD.NUM_QPUS, model=None, budget_seconds: float | None = None) -> int:
    """The fewest launches whose longest is modelled (:func:`launch_cycles`) within the budget:
    the persistent launch keeps every batch resident, so the v3d hang check bounds each launch.
    One launch per vector run of a worker when nothing fits (the budget check then refuses it)."""
    from .common import timing_model, seconds, dispatch_budget_seconds
    m = timing_model(model)
    budget = dispatch_budget_seconds() if budget_seconds is None else budget_seconds
    whole = seconds(m, max(launch_cycles(g, m, num_qpus, 1)))
    if whole <= budget:
        return 1
    V = -(-g.P // 16)
    most = -(-V // num_qpus)
    for n in range(max(2, math.ceil(whole / budget)), most + 1):
        if seconds(m, max(launch_cycles(g, m, num_qpus, n))) <= budget:
            return n
    return most


# ------------------------------------------------------------------------------------------------
# numpy reference
# ------------------------------------------------------------------------------------------------
def reference(g: Pool2D, x: np.ndarray) -> np.ndarray:
    """Pooling with the semantics in the module docstring (float64 sums for float)."""
    OH, OW = g.OH, g.OW
    ih = np.arange(OH)[:, None] * g.sh - g.pt + np.arange(g.kh)[None, :] * g.dh      # [OH, kh]
    iw = np.arange(OW)[:, None] * g.sw - g.pl + np.arange(g.kw)[None, :] * g.dw      # [OW, kw]
    vh, vw = (ih >= 0) & (ih < g.H), (iw >= 0) & (iw < g.W)
    gather = x[:, :, np.clip(ih, 0, g.H - 1)[:, None, :, None], np.clip(iw, 0, g.W - 1)[None, :, None, :]]
    valid = vh[:, None, :, None] & vw[None, :, None, :]                               # [OH, OW, kh, kw]
    if g.op == "max":
        if g.dtype == "float32":
            neutral = -np.inf
        else:
            neutral = RD.INT_RANGE[g.dtype][0]
        v = np.where(valid, gather, np.array(neutral, dtype=x.dtype))
        return v.max(axis=(4, 5)).astype(x.dtype)
    cnt = g.counts()
    if g.dtype == "float32":
        s = np.where(valid, gather.astype(np.float64), 0.0).sum(axis=(4, 5))
        return (s / cnt).astype(np.float32)
    s = np.where(valid, gather.astype(np.int64), 0).sum(axis=(4, 5))
    s = (s + 2 ** 31) % 2 ** 32 - 2 ** 31
    return RD.trunc_divide(s, cnt).astype(x.dtype)


def reference_global(x: np.ndarray) -> np.ndarray:
    N, C, H, W = x.shape
    g = Pool2D(N, C, H, W, H, W, op="avg", dtype=str(x.dtype))
    return reference(g, x)


# ------------------------------------------------------------------------------------------------
# Registry
# ------------------------------------------------------------------------------------------------
def spec_to_pool(spec: registry.OpSpec) -> Pool2D:
    (shape, dtype) = spec.inputs[0]
    N, C, H, W = (int(s) for s in shape)
    a = spec.attrs
    if a.get("layout", "NCHW") != "NCHW":
        raise ValueError("only NCHW layout")
    if spec.kind == "global_avg_pool2d":
        return Pool2D(N, C, H, W, H, W, op="avg", dtype=dtype)
    kh, kw = a["pool_size"]
    sh, sw = a.get("strides", (1, 1)) or (1, 1)
    pad = tuple(a.get("padding", (0, 0, 0, 0)) or (0, 0, 0, 0))
    if len(pad) == 2:
        pad = (pad[0], pad[1], pad[0], pad[1])
    dh, dw = a.get("dilation", (1, 1)) or (1, 1)
    return Pool2D(N, C, H, W, int(kh), int(kw), int(sh), int(sw), *(int(p) for p in pad), int(dh), int(dw),
                  bool(a.get("ceil_mode", False)), "max" if spec.kind == "max_pool2d" else "avg",
                  bool(a.get("count_include_pad", False)), dtype)


def supports(spec: registry.OpSpec):
    if spec.kind not in ("max_pool2d", "avg_pool2d", "global_avg_pool2d"):
        return False, f"pool.py does not handle {spec.kind}"
    if len(spec.inputs) != 1 or len(spec.inputs[0][0]) != 4:
        return False, "one NCHW input expected"
    try:
        g = spec_to_pool(spec)
        check(g)
        if spec.output[1] != g.dtype:
            return False, "output dtype must equal the input dtype"
        if tuple(spec.output[0]) != (g.N, g.C, g.OH, g.OW):
            return False, f"output shape {spec.output[0]} != computed {(g.N, g.C, g.OH, g.OW)}"
        if spec.kind != "global_avg_pool2d" and not (g.op == "avg" and is_global(g)):
            _probe_registers(g)
    except (ValueError, KeyError, TypeError) as e:
        return False, str(e)
    return True, ""


def _probe_registers(g: Pool2D):
    Builder("probe").build(kernel_for(g), g, "probe")


def kernel_for(g: Pool2D):
    """The kernel generator of a window pooling: :func:`pair_kernel` where it applies
    (:func:`pair_mode`), else the per-tap gather kernel :func:`pool_kernel`."""
    return pair_kernel if pair_mode(g) else pool_kernel


def generate(spec: registry.OpSpec, constants=None) -> KernelPlan:
    """Plan for max_pool2d / avg_pool2d / global_avg_pool2d: input "data", output "out"."""
    ok, why = supports(spec)
    if not ok:
        raise ValueError(why)
    g = spec_to_pool(spec)
    if spec.kind == "global_avg_pool2d":
        return plan_global_avg(g.N, g.C, g.H, g.W, g.dtype)
    return plan_pool(g, spec.kind)


def lookup_taps(g: Pool2D):
    """The column taps each lookup of a window row reads: one per tap (gather kernel) or the
    pair (2 ow, 2 ow + 1) as one vec2 lookup (pair kernel)."""
    if pair_mode(g):
        return [(g.kw - 2, g.kw - 1)]
    return [(j,) for j in range(g.kw)]


def tap_lines(g: Pool2D, line: int, samples: int = 64) -> float:
    """Average distinct cache lines one lookup of a 16-output vector touches (a tap, or a pair
    of columns for the pair kernel: :func:`lookup_taps`): the lanes' input addresses
    (consecutive flattened outputs, :func:`_lane_state`; taps in the padding read a clamped
    address) for ``samples`` vectors spread over the output, every lookup."""
    es = ITEMSIZE[g.dtype]
    V = -(-g.P // 16)
    total = n = 0
    for v in np.linspace(0, V - 1, min(V, samples)).astype(np.int64):
        o = np.minimum(v * 16 + np.arange(16), g.P - 1)
        _, ih0, iw0 = _lane_state(g, o)
        nc = o // (g.P // (g.N * g.C))
        for kh in range(g.kh):
            ih = np.clip(ih0 + kh * g.dh, 0, g.H - 1)
            for cols in lookup_taps(g):
                iw = np.concatenate([np.clip(iw0 + kw * g.dw, 0, g.W - 1) for kw in cols])
                row = np.tile(nc * g.H + ih, len(cols))
                total += len(np.unique((row * g.W + iw) * es // line))
                n += 1
    return total / max(1, n)


def estimate(spec: registry.OpSpec, model=None) -> float:
    """Modelled seconds under ``model`` (default: the emulator's TimingModel) of the plan
    :func:`generate` makes: the sum of its launches (:func:`launch_cycles`; the split is the
    plan's, chosen under the default model). Global average pooling is the reduction of each
    plane (reduce.reduce_cycles: segment pass or lanes)."""
    from .common import timing_model, seconds
    m = timing_model(model)
    g = spec_to_pool(spec)
    if spec.kind == "global_avg_pool2d" or is_global(g):
        return seconds(m, RD.reduce_cycles(m, (g.N * g.C, g.H * g.W), (1,), g.dtype))
    return seconds(m, sum(launch_cycles(g, m, RD.NUM_QPUS, split_launches(g, RD.NUM_QPUS))))


def longest_dispatch_seconds(spec: registry.OpSpec, model=None) -> float:
    """Modelled seconds (under ``model``) of the longest launch of the plan :func:`generate`
    makes (placement's dispatch-budget rule): a window pooling's (:func:`split_launches`), or
    global average pooling's reduction plan (reduce.plan_launch_cycles: its lanes stage split
    by reduce.split_lanes)."""
    from .common import timing_model, seconds
    m = timing_model(model)
    g = spec_to_pool(spec)
    if spec.kind == "global_avg_pool2d" or is_global(g):          # the reduction's launches
        return seconds(m, max(RD.plan_launch_cycles(m, (g.N * g.C, g.H * g.W), (1,), g.dtype)))
    return seconds(m, max(launch_cycles(g, m, RD.NUM_QPUS, split_launches(g, RD.NUM_QPUS))))


def loop_instructions(g: Pool2D) -> tuple:
    """(instructions of the kernel's vector loop, instructions outside it, uniforms of its
    constant prologue), from the generated program."""
    from .common import loop_lengths
    words, unif = Builder("probe").build(kernel_for(g), g, "probe")
    loop = loop_lengths(words)[-1]
    return loop, len(words) - loop, len(unif)


def launch_cycles(g: Pool2D, model, num_qpus=RD.NUM_QPUS, launches: int = 1) -> list:
    """Modelled cycles of each launch of a window pooling cut into ``launches``: its vectors'
    input and output DRAM traffic, its lookups' lines over the shared L2 port and the slice TMUs
    (one lookup per window tap of every 16-output vector, or one vec2 lookup of the column pair
    per window row for the pair kernel), and its busiest worker's loop instructions; the
    slowest of them, plus one round trip."""
    from .common import (dram_cycles, round_trip, l2_port_cycles, lookup_lines, slice_tmu_cycles,
                         stream_stall_per_line)
    m = model
    es = ITEMSIZE[g.dtype]
    V = -(-g.P // 16)
    W, tab = pool_layout(g, num_qpus, launches)
    chunk = -(-V // (num_qpus * max(1, launches)))
    per_row = lookup_taps(g)
    per_lookup = tap_lines(g, m.line_bytes)
    loop, rest, nu = loop_instructions(g)
    cpi = m.cycles_per_instruction
    miss = round_trip(m, True)
    warm = 1 if pair_mode(g) and PAIR_WINDOWS[(g.kw, g.pl)] else 0
    # a worker: its constant prologue reads nu uniforms (one per instruction: the first line a
    # round trip, each further one what the stream's prefetch does not cover), its table lookup
    # and first vector's lookups wait a round trip each, then each vector waits what its loop
    # does not cover of the next vector's round trip (issued a vector ahead; its lines are new:
    # DRAM misses), then its last stores complete
    ulines = -(-nu * 4 // m.line_bytes)
    prologue = miss + (ulines - 1) * stream_stall_per_line(m, m.line_bytes / 4 * cpi, True)
    worker = prologue + rest * cpi + 2 * miss + (chunk + warm) * max(loop * cpi, miss) + m.store_latency
    out = []
    for w0 in range(0, W, num_qpus):
        nv = min(V, (w0 + num_qpus) * chunk) - w0 * chunk          # vectors of this launch
        active = min(num_qpus, W - w0)
        lookups = nv * g.kh * len(per_row)
        lines = lookups * per_lookup + nv * lookup_lines(m, 16 * es)
        tmu = slice_tmu_cycles(m, lookups, per_lookup, 16 * len(per_row[0]), min(nv, m.num_qpus, active))
        dram = dram_cycles(m, (g.N * g.C * g.H * g.W + g.P) * es * nv / V)
        out.append(max(max(dram, l2_port_cycles(m, lines), tmu) + miss, worker))
    return out


def bench_cases():
    """(name, OpSpec, input generator(rng) -> {"data": array}) for the benchmark script."""
    shp = (1, 32, 144, 144)

    def gen_i32(rng):
        return {"data": rng.integers(-2 ** 28, 2 ** 28, shp, dtype=np.int64).astype(np.int32)}

    def gen_f32(rng):
        return {"data": rng.standard_normal(shp).astype(np.float32)}

    attrs = {"pool_size": (2, 2), "strides": (2, 2), "padding": (0, 0, 0, 0), "dilation": (1, 1),
             "ceil_mode": False, "count_include_pad": False, "layout": "NCHW"}
    a3 = dict(attrs, pool_size=(3, 3), padding=(1, 1, 1, 1))
    out = ((1, 32, 72, 72), "int32")
    return [
        ("avg_pool2d 2x2/2 int32 1x32x144x144", registry.OpSpec("avg_pool2d", [(shp, "int32")], out, attrs), gen_i32),
        ("max_pool2d 2x2/2 int32 1x32x144x144", registry.OpSpec("max_pool2d", [(shp, "int32")], out, attrs), gen_i32),
        ("max_pool2d 3x3/2 pad1 float32 1x32x144x144",
         registry.OpSpec("max_pool2d", [(shp, "float32")], ((1, 32, 72, 72), "float32"), a3), gen_f32),
        ("global_avg_pool2d float32 1x32x144x144",
         registry.OpSpec("global_avg_pool2d", [(shp, "float32")], ((1, 32, 1, 1), "float32"), {"layout": "NCHW"}),
         gen_f32),
        ("global_avg_pool2d int32 1x32x144x144",
         registry.OpSpec("global_avg_pool2d", [(shp, "int32")], ((1, 32, 1, 1), "int32"), {"layout": "NCHW"}),
         gen_i32),
    ]


registry.register("max_pool2d", supports, generate, estimate)
registry.register("avg_pool2d", supports, generate, estimate)
registry.register("global_avg_pool2d", supports, generate, estimate)
