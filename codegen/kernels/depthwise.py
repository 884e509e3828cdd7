"""Depthwise 2-D convolution (NCHW, groups == C == OC; float32, or integer with an int32 or
requantized int8 / uint8 output): a direct kernel.

``out[n, c, oh, ow] = bias[c] + sum_{i, j} W[c, 0, i, j] * x[n, c, oh*sh - pt + i*dh, ow*sw - pl + j*dw]``
(taps outside the input contribute nothing), then the activation (None, ReLU or clip).

The implicit-GEMM conv (:mod:`.conv`) runs a depthwise convolution as C one-row GEMMs, which
wastes the GEMM's row tiling; this kernel does what a depthwise convolution needs instead.

Kernel
------
* **Lanes along output pixels.** A 16-lane vector is 16 consecutive output positions of one
  plane (n, c); each plane's ``OH*OW`` outputs are cut into ``ceil(OH*OW / 16)`` vectors, the
  lanes past the plane's end are dummies (never stored). Every vector therefore belongs to one
  channel, so all lanes share its weights.
* **Weights per plane in registers.** At the start of a plane the T = KH*KW weights (and the
  bias) of its channel are read with T (+1) TMU lookups whose 16 lanes share one address (one
  64-byte line), i.e. broadcast like uniforms, and stay in T registers for the plane's vectors.
* **Taps unrolled.** Per vector, each tap is one 16-lane gather at a constant byte offset from the
  lane's base address, then ``acc += w_t * x``. The taps of the *next* vector are issued while
  the current vector's are folded, min(T, 8) taps ahead (8 words: a thread's share of the TMU
  output FIFO, :data:`~.common.TMU_FIFO_WORDS`); the plane's weights likewise 8 ahead.
* **Padding** is per lane and per tap: tap (i, j) of a lane is valid when row ``ih0 + i*dh <u H``
  and column ``iw0 + j*dw <u W``; an invalid tap loads from a zero line after the weights
  instead, so the accumulation needs no mask (4 instructions per tap). A valid tap always lies
  inside its own plane, so the dummy lanes and the over-issued vector after a plane's last never
  read outside the input.
* **Work split:** the planes' vectors in (plane, vector) order, a contiguous run of equal length
  per worker (one workgroup per QPU); a host table gives each worker its lanes' start state, its
  vector counts and the state of a plane's first vector.

Integer form (``dtype`` int8 / uint8 / int16: a QDQ model's ``x - zero point``): the taps are 8- /
16-bit TMU loads (sign- or zero-extending; one ``tmuc`` write configures the next four), the
weights and the bias int32 words of the plane record, ``acc += smul24(w_t, x)`` with an int32
accumulator (exact: |w|, |x| < 2^23, and the caller bounds the sum), a ReLU / clip on the
accumulator (imax / imin), then either an int32 store or the requantize epilogue of
:class:`.gemm.Requant` (same formula and order as the GEMM's): ``itof``, ``fmul`` by the plane's
float32 multiplier (one more word of its record, so per-tensor and per-channel scales take the
same path), ``ftoin`` (round half to even, saturating), clamp to ``[lo - zp, hi - zp]``, ``+ zp``,
an 8-bit store. ReLU / ReLU6 / Clip of the quantized graph arrive folded into ``[lo, hi]``.

Limits (``check`` says so): float32 data / weights / output, or 8- / 16-bit integer data with
integer weights (int32 or requantized 8-bit output); T <= 15 taps; the registers must suffice
(3x3 and smaller, 1xK / Kx1 up to 15 taps with few constants).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np

from .. import asm as A
from ..asm import L, b, mov, nop, sub, add, shl, eidx, tmuwt, thread_end
from ..instr import RF
from ..plan import BufferSpec, KernelPlan, Launch
from . import reduce as RD
from .common import TMU_FIFO_WORDS
from .gemm import ITEMSIZE, Requant, config_word, requant_reference
from .reduce import Builder, f32_bits, store_vector

S = A.SIGNALS
R_ = A.R
tmua, tmuc, null = RD.tmua, RD.tmuc, RD.null
MAX_TAPS = 15               # taps in flight + the one popped after the next issue <= 16 (TMU FIFO)
ES = 4                      # bytes of a weight record word (float32 / int32)
INT_DATA = ("int8", "uint8", "int16")     # integer data the taps load (sign- / zero-extended)
TABLE = "dw_table"          # per-worker lane table
WEIGHTS = "dw_weights"      # per-plane weight records [N*C, T (+1 bias)]


@dataclass(frozen=True)
class DwShape:
    N: int
    C: int
    H: int
    W: int
    KH: int
    KW: int
    sh: int = 1
    sw: int = 1
    pt: int = 0
    pl: int = 0
    pb: int = 0
    pr: int = 0
    dh: int = 1
    dw: int = 1
    bias: bool = False
    activation: object = None           # None | "relu" | ("clip", lo, hi)
    num_qpus: int = RD.NUM_QPUS
    dtype: str = "float32"              # data: float32, or int8 / uint8 / int16 (integer weights)
    requant: Requant | None = None      # integer only: the requantize epilogue (axis None or "m")

    @property
    def is_int(self) -> bool:
        return self.dtype != "float32"

    @property
    def out_dtype(self) -> str:
        return self.requant.out_dtype if self.requant is not None else ("int32" if self.is_int else "float32")

    @property
    def ies(self) -> int:               # bytes per input element
        return ITEMSIZE[self.dtype]

    @property
    def oes(self) -> int:               # bytes per output element
        return ITEMSIZE[self.out_dtype]

    @property
    def OH(self) -> int:
        return (self.H + self.pt + self.pb - self.dh * (self.KH - 1) - 1) // self.sh + 1

    @property
    def OW(self) -> int:
        return (self.W + self.pl + self.pr - self.dw * (self.KW - 1) - 1) // self.sw + 1

    @property
    def T(self) -> int:
        return self.KH * self.KW

    @property
    def planes(self) -> int:
        return self.N * self.C

    @property
    def PS(self) -> int:                # outputs per plane
        return self.OH * self.OW

    @property
    def record(self) -> int:            # words per plane weight record (taps, bias, requant scale)
        return self.T + (1 if self.bias else 0) + (1 if self.requant is not None else 0)


def check(s: DwShape):
    """Raise ValueError for what the kernel does not take."""
    if min(s.N, s.C, s.H, s.W, s.KH, s.KW, s.sh, s.sw, s.dh, s.dw) < 1 or min(s.pt, s.pl, s.pb, s.pr) < 0:
        raise ValueError("sizes, strides and dilations must be >= 1, paddings >= 0")
    if s.OH < 1 or s.OW < 1:
        raise ValueError("empty output")
    if s.T > MAX_TAPS:
        raise ValueError(f"{s.T} taps: the depthwise kernel unrolls at most {MAX_TAPS}")
    act = s.activation
    if not (act is None or act == "relu" or (isinstance(act, tuple) and act[0] == "clip")):
        raise ValueError(f"activation {act!r}")
    if s.dtype not in ("float32",) + INT_DATA:
        raise ValueError(f"data dtype {s.dtype} (float32, int8, uint8 or int16)")
    if s.requant is not None and not s.is_int:
        raise ValueError("requantize epilogue on a float depthwise convolution")
    if s.requant is not None and s.requant.axis not in (None, "m"):
        raise ValueError(f"requantize scale axis {s.requant.axis!r} (None or 'm': per channel)")
    if s.planes * max(s.H * s.W, s.PS) * ES >= 1 << 30:
        raise ValueError("tensor larger than 1 GiB")
    kernel_program(s)                       # raises ValueError when the registers do not suffice


@functools.lru_cache(maxsize=64)
def kernel_program(s: DwShape) -> tuple:
    """(machine words, uniform keys) of the kernel for ``s`` (cached: supports() builds it too)."""
    kb = Builder("depthwise_conv2d")
    return kb.build(dw_kernel, s)


# ------------------------------------------------------------------------------------------------
# Host tables
# ------------------------------------------------------------------------------------------------
def vectors_per_plane(s: DwShape) -> int:
    return -(-s.PS // 16)


def worker_runs(s: DwShape) -> list:
    """[(first vector, vector count)] per worker over the planes' vectors in (plane, vector)
    order: contiguous runs of equal length (the last one shorter)."""
    total = s.planes * vectors_per_plane(s)
    chunk = -(-total // min(s.num_qpus, total))
    return [(i, min(chunk, total - i)) for i in range(0, total, chunk)]


TABLE_WORDS = 16


def lane_table(s: DwShape) -> np.ndarray:
    """[workers, 16 lanes, 16 words] int32, per lane of a worker (columns):
    0-4  the first vector's tap (0, 0) input offset, ih, iw, output offset, outputs left in its plane
    5-6  vectors to do in the first plane, vectors left after it
    7    weight record offset of the first plane
    8-9  the first plane's input offset, output offset (+ lane)
    10-13 a plane's first vector: ih, iw, tap (0, 0) offset in the plane, outputs left (PS - lane)"""
    Vp = vectors_per_plane(s)
    runs = worker_runs(s)
    lane = np.arange(16)
    tab = np.zeros((len(runs), 16, TABLE_WORDS), dtype=np.int64)

    def state(q):
        oh, ow = q // s.OW, q % s.OW
        ih, iw = oh * s.sh - s.pt, ow * s.sw - s.pl
        return ih, iw, (ih * s.W + iw) * s.ies

    ih0, iw0, rel0 = state(lane)
    for w, (i0, n) in enumerate(runs):
        p0, v0 = divmod(i0, Vp)
        ih, iw, rel = state(v0 * 16 + lane)
        first = min(Vp - v0, n)
        tab[w, :, 0] = p0 * s.H * s.W * s.ies + rel
        tab[w, :, 1], tab[w, :, 2] = ih, iw
        tab[w, :, 3] = (p0 * s.PS + v0 * 16 + lane) * s.oes
        tab[w, :, 4] = s.PS - v0 * 16 - lane
        tab[w, :, 5], tab[w, :, 6] = first, n - first
        tab[w, :, 7] = p0 * s.record * ES
        tab[w, :, 8] = p0 * s.H * s.W * s.ies
        tab[w, :, 9] = (p0 * s.PS + lane) * s.oes
        tab[w, :, 10], tab[w, :, 11], tab[w, :, 12] = ih0, iw0, rel0
        tab[w, :, 13] = s.PS - lane
    return (tab & 0xFFFFFFFF).astype(np.uint32).view(np.int32)


def zero_offset(s: DwShape) -> int:
    """Byte offset of the zero line after the weight records (invalid taps load from it)."""
    return -(-s.planes * s.record * ES // 64) * 64


def requant_scales(s: DwShape, scale=None) -> np.ndarray:
    """float32 [C]: each channel's requantize multiplier (the per-tensor one repeated, or ``scale``
    for per-channel scales)."""
    rq = s.requant
    if rq.axis is None:
        return np.full(s.C, rq.scale, np.float32)
    sc = np.asarray(scale, np.float32).reshape(-1) if scale is not None else np.zeros(0, np.float32)
    if sc.size != s.C or not np.all(np.isfinite(sc) & (sc > 0)):
        raise ValueError(f"per-channel requantize needs {s.C} finite positive scales")
    return sc


def weight_records(s: DwShape, weight: np.ndarray, bias=None, scale=None) -> np.ndarray:
    """32-bit words: per plane (n, c) the channel's taps in (i, j) order (then its bias, then its
    requantize multiplier's float32 bits), then zeros up to and including a 64-byte zero line at
    :func:`zero_offset`. float32 words for a float convolution, int32 (weights, bias) otherwise."""
    dt = np.int32 if s.is_int else np.float32
    wv = np.asarray(weight)
    if s.is_int and (wv.dtype.kind not in "iu" or wv.size and (wv.min() < -(1 << 23) or wv.max() >= 1 << 23)):
        raise ValueError("integer depthwise weights must be integers within 24 bits (smul24)")
    cols = [wv.astype(dt).reshape(s.C, s.T)]
    if s.bias:
        cols.append(np.asarray(bias).astype(dt).reshape(s.C, 1))
    if s.requant is not None:
        cols.append(requant_scales(s, scale).view(np.int32).reshape(s.C, 1))
    w = np.concatenate(cols, axis=1)
    recs = np.zeros(zero_offset(s) // ES + 16, dt)
    recs[: s.planes * s.record] = np.tile(w, (s.N, 1)).reshape(-1)
    return recs


# ------------------------------------------------------------------------------------------------
# The kernel
# ------------------------------------------------------------------------------------------------
def _k(kb: Builder, v: int):
    """A constant operand for an instruction with no other small immediate: the literal when it
    is a small immediate (-16..15), else a register of the constant pool."""
    return int(v) if -16 <= int(v) <= 15 else kb.u32(v)


class _Lanes:
    """Lane state of the vector being issued: address of tap (0, 0), ih0, iw0 and the per-row /
    per-column tap coordinates (for the validity checks)."""

    def __init__(self, kb: Builder, s: DwShape):
        self.a, self.ih, self.iw = kb.reg(3)
        self.u = kb.reg(s.KH)
        self.v = kb.reg(s.KW)


def _coords(kb: Builder, s: DwShape, st: _Lanes):
    for d, src, c in [(st.u[i], st.ih, i * s.dh) for i in range(s.KH)] + \
                     [(st.v[j], st.iw, j * s.dw) for j in range(s.KW)]:
        if c == 0:
            mov(d, src)
        else:
            add(d, src, _k(kb, c))


def _advance(kb: Builder, s: DwShape, st: _Lanes):
    """Every lane moves 16 output positions on inside its plane (column carry into rows; lanes
    past the last row are dummies whose taps fail the row check)."""
    rows, cols = divmod(16, s.OW)
    astep = (rows * s.sh * s.W + cols * s.sw) * s.ies
    add(st.iw, st.iw, kb.u32(cols * s.sw)).add(st.a, st.a, kb.u32(astep))
    sub(null, st.iw, kb.u32(s.OW * s.sw - s.pl), cond="pushn").add(st.ih, st.ih, kb.u32(rows * s.sh))
    sub(st.iw, st.iw, kb.u32(s.OW * s.sw), cond="ifna").add(st.ih, st.ih, kb.u32(s.sh), cond="ifna")
    add(st.a, st.a, kb.u32((s.sh * s.W - s.OW * s.sw) * s.ies), cond="ifna")


def _int_bound(v, lo: bool) -> int:
    """An activation bound on the int32 accumulator: ceil for a lower bound, floor for an upper one
    (the accumulator is an integer), saturated to int32."""
    v = float(np.clip(float(v), -2.0 ** 31, 2.0 ** 31 - 1))
    return int(math.ceil(v) if lo else math.floor(v))


def _activation(kb: Builder, s: DwShape, acc):
    act = s.activation
    if s.is_int:                                  # on the int32 accumulator
        if act == "relu":
            A.DSL["imax"](acc, acc, 0)
        elif isinstance(act, tuple):
            A.DSL["imax"](acc, acc, _k(kb, _int_bound(act[1], True)))
            A.DSL["imin"](acc, acc, _k(kb, _int_bound(act[2], False)))
        return
    if act == "relu":
        A.DSL["fmax"](acc, acc, 0)
    elif isinstance(act, tuple):
        A.DSL["fmax"](acc, acc, kb.u32(f32_bits(act[1])))
        A.DSL["fmin"](acc, acc, kb.u32(f32_bits(act[2])))


def _tap_config(kb: Builder, s: DwShape, t_: int, n: int):
    """Integer data: before tap lookups t_, t_ + 1, .. (every fourth of the ``n`` issued in a row)
    one ``tmuc`` write configures the next min(4, n - t_) lookups as 8- / 16-bit loads (each
    lookup consumes one config byte, then the 32-bit default returns)."""
    if s.is_int and t_ % 4 == 0:
        mov(tmuc, kb.u32(config_word([s.dtype] * min(4, n - t_))))


def _requantize(kb: Builder, s: DwShape, acc, scale):
    """:class:`.gemm.Requant` on the int32 accumulator, in the GEMM epilogue's order: ``itof``,
    ``fmul`` by the plane's multiplier, ``ftoin`` (half to even, saturating), clamp to
    ``[lo - zp, hi - zp]``, ``+ zp`` (the clamp first: a saturated ``ftoin`` cannot wrap)."""
    rq = s.requant
    A.DSL["itof"](acc, acc)
    A.DSL["fmul"](acc, acc, scale)
    A.DSL["ftoin"](acc, acc)
    A.DSL["imax"](acc, acc, _k(kb, rq.lo - rq.zero_point))
    A.DSL["imin"](acc, acc, _k(kb, rq.hi - rq.zero_point))
    if rq.zero_point:
        add(acc, acc, _k(kb, rq.zero_point))


def dw_kernel(kb: Builder, s: DwShape):
    Hr, Wr = kb.u32(s.H), kb.u32(s.W)
    nxt = _Lanes(kb, s)
    w = kb.reg(s.T)
    bias = kb.reg() if s.bias else None
    rq_scale = kb.reg() if s.requant is not None else None
    acc, v, prod, ptr, x, aout, rem, vp, left = kb.reg(9)
    wp, pbase, obase, ih0, iw0, rel0, rem0 = kb.reg(7)
    zaddr = kb.addr(WEIGHTS, zero_offset(s))
    taps = [(i, j) for i in range(s.KH) for j in range(s.KW)]
    off_b = [(i * s.dh * s.W + j * s.dw) * s.ies for i, j in taps]

    def step_ptr(ins, t_):
        """mul-ALU op on ``ins`` moving ptr to tap t_ of the vector being issued."""
        if t_ == 0:
            ins.mov(ptr, nxt.a)
        else:
            ins.add(ptr, ptr, _k(kb, off_b[t_] - off_b[t_ - 1]))

    # ---- this worker's lane table: four vec4 lookups per lane, two at a time ----
    lane, t = v, prod
    eidx(lane)
    mov(t, RF[3].unpack("ul"))
    shl(t, t, 10)
    shl(lane, lane, 6)
    add(t, t, lane)
    add(t, t, kb.addr(TABLE))
    cols = [nxt.a, nxt.ih, nxt.iw, aout, rem, vp, left, wp, pbase, obase, ih0, iw0, rel0, rem0, x, x]
    for half in range(2):
        for q in range(2):
            mov(tmuc, kb.u32(RD.VEC4_CFG))
            if half == 0 and q == 0:
                mov(tmua, t)
            else:
                add(tmua, t, kb.u32(16 * (2 * half + q)))
        for r in cols[8 * half: 8 * half + 8]:
            nop(sig=S["ldtmu"](r))
    add(nxt.a, nxt.a, kb.addr("data"))
    add(aout, aout, kb.addr("out"))
    add(wp, wp, kb.addr(WEIGHTS))
    add(pbase, pbase, kb.addr("data"))
    add(obase, obase, kb.addr("out"))

    # ---- per plane: weights (lookups whose lanes share one address), the first vector's taps ----
    # A tap outside the input loads from a zero line instead (x defaults to zaddr), so the
    # accumulation needs no mask.
    # Lookups run LA ahead in issue order (LA words in flight, the thread's TMU FIFO share).
    T = len(taps)
    LA = min(T, TMU_FIFO_WORDS)
    L.plane
    wregs = w + ([bias] if bias is not None else []) + ([rq_scale] if rq_scale is not None else [])
    for _ in range(min(s.record, TMU_FIFO_WORDS)):
        mov(tmua, wp).add(wp, wp, 4)
    for n_, r in enumerate(wregs):
        nop(sig=S["ldtmu"](r))
        if n_ + TMU_FIFO_WORDS < s.record:
            mov(tmua, wp).add(wp, wp, 4)
    _coords(kb, s, nxt)
    mov(x, zaddr)
    for t_, (i, j) in enumerate(taps[:LA]):
        _tap_config(kb, s, t_, LA)
        step_ptr(sub(null, nxt.u[i], Hr, cond="pushc"), t_)
        sub(null, nxt.v[j], Wr, cond="andc")                   # A = tap valid
        mov(x, ptr, cond="ifa")
        mov(tmua, x).mov(x, zaddr)

    # ---- per vector: fold the current vector's taps while issuing the ones LA ahead (the
    # current vector's last T - LA taps, then the next vector's; nxt advances in between) ----
    L.vloop
    if LA == T:
        _advance(kb, s, nxt)
        _coords(kb, s, nxt)
    if bias is not None:                                       # acc = bias or +0.0 ; pop tap 0
        mov(acc, bias, sig=S["ldtmu"](v))
    else:
        sub(acc, acc, acc, sig=S["ldtmu"](v))
    for t_ in range(T):
        if t_ == T - LA and LA < T:
            _advance(kb, s, nxt)
            _coords(kb, s, nxt)
        k = (t_ + LA) % T                                      # tap index of the lookup issued
        i, j = taps[k]
        _tap_config(kb, s, t_, T)
        step_ptr(sub(null, nxt.u[i], Hr, cond="pushc"), k)
        ins = sub(null, nxt.v[j], Wr, cond="andc")             # A = issued tap valid
        getattr(ins, "smul24" if s.is_int else "fmul")(prod, v, w[t_])
        A.DSL["add" if s.is_int else "fadd"](acc, acc, prod).mov(x, ptr, cond="ifa")
        sig = S["ldtmu"](v) if t_ + 1 < len(taps) else None         # pop tap t + 1
        mov(tmua, x, sig=sig).mov(x, zaddr)
    _activation(kb, s, acc)
    if s.requant is not None:
        _requantize(kb, s, acc, rq_scale)
    sub(null, rem, 1, cond="pushn")                            # A = dummy lane (past the plane)
    # an 8-bit store writes each lane's low byte: the same bytes for int8 and uint8 (in [lo, hi])
    store_vector(kb, acc, aout, "int8" if s.oes == 1 else s.out_dtype, cond="ifna")
    add(aout, aout, kb.u32(16 * s.oes)).sub(rem, rem, kb.u32(16))
    sub(vp, vp, 1, cond="pushz")
    b(R_.vloop, cond="anyna")
    nop()
    nop()
    nop()
    for _ in range(LA):                                        # the over-issued taps
        nop(sig=S["ldtmu"](v))
    # ---- the next plane: its first vector's lanes, min(Vp, left) vectors ----
    add(pbase, pbase, kb.u32(s.H * s.W * s.ies)).add(obase, obase, kb.u32(s.PS * s.oes))
    add(nxt.a, pbase, rel0).mov(nxt.ih, ih0)
    mov(nxt.iw, iw0).mov(aout, obase)
    A.DSL["imin"](vp, left, kb.u32(vectors_per_plane(s)))
    sub(left, left, vp).mov(rem, rem0)
    sub(null, vp, 1, cond="pushn")                             # A = nothing left
    b(R_.plane, cond="anyna")
    nop()
    nop()
    nop()
    tmuwt()
    thread_end()


# ------------------------------------------------------------------------------------------------
# Plan, reference, estimate
# ------------------------------------------------------------------------------------------------
def plan_depthwise(s: DwShape, weight: np.ndarray, bias=None, name: str = "depthwise_conv2d",
                   scale=None) -> KernelPlan:
    """The plan; ``scale``: the per-channel requantize multipliers when ``s.requant.axis == "m"``."""
    check(s)
    tab = lane_table(s)
    recs = weight_records(s, weight, bias, scale)
    words, unif = kernel_program(s)
    words, unif = words.copy(), list(unif)
    bufs = [BufferSpec("data", "input", (s.N, s.C, s.H, s.W), s.dtype, s.planes * s.H * s.W * s.ies + 64),
            BufferSpec("out", "output", (s.N, s.C, s.OH, s.OW), s.out_dtype),
            BufferSpec(TABLE, "weight", tab.shape, "int32"),
            BufferSpec(WEIGHTS, "weight", recs.shape, str(recs.dtype))]
    attrs = {k: (list(v) if isinstance(v, tuple) else v) for k, v in s.__dict__.items()}
    if s.requant is not None:
        import dataclasses
        attrs["requant"] = dataclasses.asdict(s.requant)
    return KernelPlan(name, bufs, [Launch(words, unif, (tab.shape[0], 1, 1), 16, s.num_qpus, 1, name)],
                      {TABLE: tab, WEIGHTS: recs}, attrs=attrs, flops=2 * s.planes * s.PS * s.T,
                      bytes_moved=s.planes * (s.H * s.W * s.ies + s.PS * s.oes))


def reference(s: DwShape, x: np.ndarray, weight: np.ndarray, bias=None, scale=None) -> np.ndarray:
    """numpy, written from the formula in the module docstring (float64 sums; integer: exact
    int64 sums, then :func:`.gemm.requant_reference` for a requantizing shape)."""
    if s.is_int:
        acc = _float_reference(DwShape(**{**s.__dict__, "dtype": "float32", "requant": None,
                                          "activation": None}), x, weight, bias, _exact=True)
        acc = acc.astype(np.int64)
        if s.activation == "relu":
            acc = np.maximum(acc, 0)
        elif isinstance(s.activation, tuple):
            acc = np.clip(acc, _int_bound(s.activation[1], True), _int_bound(s.activation[2], False))
        if s.requant is None:
            return acc.astype(np.int32)
        return requant_reference(acc, s.requant, requant_scales(s, scale).reshape(1, s.C, 1, 1))
    return _float_reference(s, x, weight, bias)


def _float_reference(s: DwShape, x, weight, bias=None, _exact=False):
    xp = np.zeros((s.N, s.C, s.H + s.pt + s.pb + s.sh * s.OH, s.W + s.pl + s.pr + s.sw * s.OW), np.float64)
    xp[:, :, s.pt:s.pt + s.H, s.pl:s.pl + s.W] = x
    w = np.asarray(weight, np.float64).reshape(s.C, s.KH, s.KW)
    out = np.zeros((s.N, s.C, s.OH, s.OW), np.float64)
    for i in range(s.KH):
        for j in range(s.KW):
            win = xp[:, :, i * s.dh: i * s.dh + s.sh * s.OH: s.sh, j * s.dw: j * s.dw + s.sw * s.OW: s.sw]
            out += win[:, :, :s.OH, :s.OW] * w[None, :, i, j, None, None]
    if bias is not None:
        out += np.asarray(bias, np.float64).reshape(1, s.C, 1, 1)
    if s.activation == "relu":
        out = np.maximum(out, 0)
    elif isinstance(s.activation, tuple):
        out = np.clip(out, s.activation[1], s.activation[2])
    return out if _exact else out.astype(np.float32)


def tap_lines(s: DwShape, line_bytes: int, samples: int = 16) -> float:
    """Average distinct lines one tap gather touches, counted from the lanes' addresses as the
    kernel forms them: 16 consecutive outputs of a plane (lanes past its end are dummies), a
    valid tap reads its pixel, an invalid one (padding, dummy lane) the zero line after the
    weights. Every vector and tap of up to ``samples`` planes (their start offsets differ in
    line alignment) is counted."""
    Vp = vectors_per_plane(s)
    q = np.arange(Vp * 16).reshape(Vp, 16)
    oh, ow = q // s.OW, q % s.OW
    total = n = 0
    for p in range(min(s.planes, samples)):
        base = p * s.H * s.W * s.ies
        for i in range(s.KH):
            ih = oh * s.sh - s.pt + i * s.dh
            for j in range(s.KW):
                iw = ow * s.sw - s.pl + j * s.dw
                ok = (ih >= 0) & (ih < s.H) & (iw >= 0) & (iw < s.W) & (q < s.PS)
                ln = np.where(ok, (base + (ih * s.W + iw) * s.ies) // line_bytes, -1)
                srt = np.sort(ln, axis=1)
                total += int((np.diff(srt, axis=1) != 0).sum()) + Vp
                n += Vp
    return total / max(1, n)


def drained_taps(words) -> int:
    """Taps over-issued at a plane's end, read from the program: the ``ldtmu`` pops between the
    per-vector loop's branch (its last delay slot) and the plane loop's branch."""
    from ..instr import decode
    ins = [decode(int(w)) for w in words]
    back = [k for k, i in enumerate(ins) if i.kind == "branch" and not i.absolute
            and isinstance(i.target, int) and i.target < 0]
    if len(back) < 2:
        raise ValueError("depthwise program without its vector and plane loops")
    return sum(1 for i in ins[back[0] + 4: back[1]] if i.kind != "branch" and "ldtmu" in i.sigs)


def estimate_cycles(s: DwShape, model=None) -> float:
    """Modelled cycles of the depthwise launch under ``model`` (default: the emulator's
    TimingModel): the busiest worker's run, bounded below by the shared resources.

    * Instruction counts come from the assembled program (:func:`.common.loop_lengths`): the
      per-vector loop, the plane loop around it, the rest (prologue, epilogue).
    * A vector takes the longer of its loop's instructions and the round trip of its taps (they
      were issued one iteration earlier; an iteration waits on an L2 miss among its T taps).
    * A plane runs its own instructions and waits two round trips: its weight lookups, then its
      first vector's taps.
    * The prologue waits for the lane table: a miss and a hit round trip, behind every worker's
      table lines at the shared L2 port or its slice TMU (all workers read their tables at once).
    * Shared bounds: the DRAM channel (input, output, weights), the L2 port (every line each
      lookup touches: :func:`tap_lines` per tap gather, the taps over-issued at each plane's end
      (:func:`drained_taps`), the stores, the weights, the lane tables) and the busiest slice
      TMU (the loads of the taps, weights and lane tables), plus a round trip at the start and
      one at the end (the last taps and stores)."""
    from .common import (timing_model, loop_lengths, round_trip, dram_cycles, l2_port_cycles,
                         slice_tmu_cycles, lookup_lines, miss_fraction)
    m = timing_model(model)
    cpi = m.cycles_per_instruction
    words, _ = kernel_program(s)
    vloop, ploop = loop_lengths(words)[:2]
    Vp = vectors_per_plane(s)
    runs = worker_runs(s)
    active = len(runs)
    lines = tap_lines(s, m.line_bytes)
    V = s.planes * Vp
    in_bytes = s.planes * s.H * s.W * s.ies
    out_bytes = s.planes * s.PS * s.oes
    w_bytes = s.planes * s.record * ES
    # every distinct input line misses once over all tap lookups; a vector waits on a miss
    # when one of its T taps misses
    tap_miss = miss_fraction(m, in_bytes, V * s.T * lines)
    vec_miss = min(1.0, s.T * lines * tap_miss)
    per_vector = max(vloop * cpi, round_trip(m, vec_miss))
    per_plane = (ploop - vloop) * cpi + round_trip(m, miss_fraction(m, w_bytes, s.planes)) \
        + round_trip(m, vec_miss)
    # the lane table: TABLE_WORDS / 4 vec4 lookups per worker in two halves, its lanes a table
    # row apart; every lookup reads the same lines of the worker's rows (the first misses, the
    # second half hits), and all workers' first lookups queue at the L2 port / slice TMU together
    row = TABLE_WORDS * ES
    table_lines = 16.0 if row >= m.line_bytes else lookup_lines(m, 16 * row, True)
    table_lookups = TABLE_WORDS // 4 * active
    table_tmu = slice_tmu_cycles(m, table_lookups, table_lines, 64, active)
    prologue = (len(words) - ploop) * cpi + round_trip(m, True) + round_trip(m, False) \
        + max(l2_port_cycles(m, active * table_lines), table_tmu * 4 / TABLE_WORDS)

    def planes_of(first, n):
        return (first + n - 1) // Vp - first // Vp + 1

    def run_cycles(first, n):
        return prologue + planes_of(first, n) * per_plane + n * per_vector

    busiest = max(run_cycles(i0, n) for i0, n in runs)
    # line accesses at the L2 port: the tap gathers, the taps over-issued at each plane's end
    # (lanes past the plane: mostly the zero line, one line a tap), the stores, the weights (one
    # lookup per word, all lanes on one line) and the lane tables
    over = sum(planes_of(i0, n) for i0, n in runs) * drained_taps(words)
    l2_lines = V * s.T * lines + over + V * lookup_lines(m, 16 * s.oes) \
        + s.planes * s.record + table_lookups * table_lines
    lookups = V * s.T + over
    shared = max(dram_cycles(m, in_bytes + out_bytes + w_bytes),
                 l2_port_cycles(m, l2_lines),
                 slice_tmu_cycles(m, lookups, lines, 16, active)
                 + slice_tmu_cycles(m, s.planes * s.record, 1, 16, active) + table_tmu)
    return max(busiest, shared + 2 * round_trip(m, True))


def estimate_shape(s: DwShape, model=None) -> float:
    """Modelled seconds of the depthwise launch under ``model`` (:func:`estimate_cycles`)."""
    from .common import timing_model, seconds
    m = timing_model(model)
    return seconds(m, estimate_cycles(s, m))


def shape_of_conv(cs) -> DwShape:
    """The DwShape of a :class:`.conv.ConvShape` (raises ValueError when it is not a depthwise
    convolution this kernel runs: float32, or 8- / 16-bit integer data and weights with the
    requantize epilogue; an integer depthwise convolution with an int32 output stays on the
    implicit-GEMM conv)."""
    if not (cs.groups == cs.C == cs.OC):
        raise ValueError("not a depthwise convolution")
    floats = cs.dtype == cs.w_dtype == "float32"
    ints = cs.dtype in INT_DATA and cs.w_dtype in INT_DATA and cs.requant is not None
    if not (floats or ints):
        raise ValueError(f"dtypes {cs.dtype} x {cs.w_dtype}{' with requantize' if cs.requant else ''} (the "
                         f"depthwise kernel takes float32, or 8- / 16-bit integers with a requantize)")
    pt, pl, pb, pr = cs.padding
    s = DwShape(cs.N, cs.C, cs.H, cs.W, cs.KH, cs.KW, cs.strides[0], cs.strides[1], pt, pl, pb, pr,
                cs.dilation[0], cs.dilation[1], cs.bias, cs.activation, cs.num_qpus,
                dtype=cs.dtype, requant=cs.requant)
    check(s)
    return s


def try_shape(cs) -> DwShape | None:
    """The DwShape for a :class:`.conv.ConvShape` this kernel takes, else None (the implicit-GEMM
    conv handles it). Used by :mod:`.conv`'s registry entry to route depthwise convolutions."""
    try:
        return shape_of_conv(cs)
    except ValueError:
        return None

