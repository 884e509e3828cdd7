"""Depthwise 2-D convolution (NCHW, groups == C == OC, float32): a direct kernel.

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
  the current vector's are folded (T taps in flight, T <= 16; the TMU output FIFO holds 16).
* **Padding** is per lane and per tap, as in :mod:`.pool`: tap (i, j) of a lane is valid when
  row ``ih0 + i*dh <u H`` and column ``iw0 + j*dw <u W``; invalid lanes neither load (masked TMU
  address write) nor accumulate. A valid tap always lies inside its own plane, so the dummy lanes
  and the over-issued vector after a plane's last never read outside the input.
* **Work split:** whole planes, a contiguous run per worker (one workgroup per QPU); a host table
  gives each worker its first plane, plane count and the lanes' start state.

Limits (``supports`` says so): float32 data / weights / output; T <= 16 taps; planes < 2**24 bytes.
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
from .reduce import Builder, f32_bits, store_vector

S = A.SIGNALS
R_ = A.R
tmua, tmuc, null = RD.tmua, RD.tmuc, RD.null
MAX_TAPS = 16
ES = 4                      # float32
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
    def record(self) -> int:            # words per plane weight record
        return self.T + (1 if self.bias else 0)


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
def worker_planes(s: DwShape) -> list:
    """[(first plane, plane count)] per worker: contiguous runs, as even as whole planes allow."""
    W = min(s.num_qpus, s.planes)
    base, extra = divmod(s.planes, W)
    runs, p = [], 0
    for w in range(W):
        n = base + (1 if w < extra else 0)
        runs.append((p, n))
        p += n
    return runs


def lane_table(s: DwShape) -> np.ndarray:
    """[workers, 16 lanes, 8 words]: plane input offset, ih0, iw0, output offset (+ lane), outputs
    left in the plane (PS - lane), weight record offset, planes, tap (0, 0) offset in a plane."""
    runs = worker_planes(s)
    lane = np.arange(16)
    oh, ow = lane // s.OW, lane % s.OW
    ih0, iw0 = oh * s.sh - s.pt, ow * s.sw - s.pl
    rel = (ih0 * s.W + iw0) * ES
    tab = np.zeros((len(runs), 16, 8), dtype=np.int64)
    for w, (p0, n) in enumerate(runs):
        tab[w, :, 0] = p0 * s.H * s.W * ES
        tab[w, :, 1], tab[w, :, 2] = ih0, iw0
        tab[w, :, 3] = p0 * s.PS * ES + lane * ES
        tab[w, :, 4] = s.PS - lane
        tab[w, :, 5] = p0 * s.record * ES
        tab[w, :, 6] = n
        tab[w, :, 7] = rel
    return (tab & 0xFFFFFFFF).astype(np.uint32).view(np.int32)


def weight_records(s: DwShape, weight: np.ndarray, bias=None) -> np.ndarray:
    """[N*C, T (+1)] float32: the channel's taps in (i, j) order (then its bias), per plane."""
    w = np.asarray(weight, np.float32).reshape(s.C, s.T)
    if s.bias:
        w = np.concatenate([w, np.asarray(bias, np.float32).reshape(s.C, 1)], axis=1)
    return np.ascontiguousarray(np.tile(w, (s.N, 1)))


# ------------------------------------------------------------------------------------------------
# The kernel
# ------------------------------------------------------------------------------------------------
def _k(kb: Builder, v: int):
    """A constant operand for an instruction with no other small immediate: the literal when it
    is a small immediate (-16..15), else a register of the constant pool."""
    return int(v) if -16 <= int(v) <= 15 else kb.u32(v)


class _Lanes:
    """Per-vector lane state: the per-row / per-column tap coordinates (for the validity checks)
    and, for the vector being issued, the address of tap (0, 0), ih0 and iw0."""

    def __init__(self, kb: Builder, s: DwShape, full: bool):
        self.a, self.ih, self.iw = kb.reg(3) if full else (None, None, None)
        self.u = kb.reg(s.KH)
        self.v = kb.reg(s.KW)

    def coords(self):
        return self.u + self.v


def _copy(dst: _Lanes, src: _Lanes):
    pairs = list(zip(dst.coords(), src.coords()))
    for k in range(0, len(pairs), 2):
        ins = mov(pairs[k][0], pairs[k][1])
        if k + 1 < len(pairs):
            ins.mov(pairs[k + 1][0], pairs[k + 1][1])


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
    astep = (rows * s.sh * s.W + cols * s.sw) * ES
    add(st.iw, st.iw, kb.u32(cols * s.sw)).add(st.a, st.a, kb.u32(astep))
    sub(null, st.iw, kb.u32(s.OW * s.sw - s.pl), cond="pushn").add(st.ih, st.ih, kb.u32(rows * s.sh))
    sub(st.iw, st.iw, kb.u32(s.OW * s.sw), cond="ifna").add(st.ih, st.ih, kb.u32(s.sh), cond="ifna")
    add(st.a, st.a, kb.u32((s.sh * s.W - s.OW * s.sw) * ES), cond="ifna")


def _activation(kb: Builder, s: DwShape, acc):
    act = s.activation
    if act == "relu":
        A.DSL["fmax"](acc, acc, 0)
    elif isinstance(act, tuple):
        A.DSL["fmax"](acc, acc, kb.u32(f32_bits(act[1])))
        A.DSL["fmin"](acc, acc, kb.u32(f32_bits(act[2])))


def dw_kernel(kb: Builder, s: DwShape):
    Hr, Wr = kb.u32(s.H), kb.u32(s.W)
    cur, nxt = _Lanes(kb, s, False), _Lanes(kb, s, True)
    w = kb.reg(s.T)
    bias = kb.reg() if s.bias else None
    acc, v, prod, ptr, aout, rem = kb.reg(6)
    pbase, ih0, iw0, obase, rem0, wp, npl, rel = kb.reg(8)
    taps = [(i, j) for i in range(s.KH) for j in range(s.KW)]
    off_b = [(i * s.dh * s.W + j * s.dw) * ES for i, j in taps]

    def step_ptr(ins, t_, base):
        """mul-ALU op on ``ins`` moving ptr to tap t_ of the vector at ``base``."""
        if t_ == 0:
            ins.mov(ptr, base)
        else:
            ins.add(ptr, ptr, _k(kb, off_b[t_] - off_b[t_ - 1]))

    def flags(st: _Lanes, i, j):
        first = sub(null, st.u[i], Hr, cond="pushc")
        sub(null, st.v[j], Wr, cond="andc")
        return first

    # ---- this worker's lane table: two vec4 lookups per lane (v, prod as scratch) ----
    lane, t = v, prod
    eidx(lane)
    mov(t, RF[3].unpack("ul"))
    shl(t, t, 9)
    shl(lane, lane, 5)
    add(t, t, lane)
    add(t, t, kb.addr(TABLE))
    mov(tmuc, kb.u32(RD.VEC4_CFG))
    mov(tmua, t)
    mov(tmuc, kb.u32(RD.VEC4_CFG))
    add(tmua, t, kb.u32(16))
    for r in (pbase, ih0, iw0, obase, rem0, wp, npl, rel):
        nop(sig=S["ldtmu"](r))
    add(pbase, pbase, kb.addr("data"))
    add(obase, obase, kb.addr("out"))
    add(wp, wp, kb.addr(WEIGHTS))

    # ---- per plane: weights (broadcast lookups), lane state, the first vector's taps ----
    L.plane
    for _ in range(s.record):
        mov(tmua, wp)
        add(wp, wp, 4)
    for r in w + ([bias] if bias is not None else []):
        nop(sig=S["ldtmu"](r))
    add(nxt.a, pbase, rel).mov(nxt.ih, ih0)
    mov(nxt.iw, iw0).mov(aout, obase)
    mov(rem, rem0)
    _coords(kb, s, nxt)
    for t_, (i, j) in enumerate(taps):
        step_ptr(flags(nxt, i, j), t_, nxt.a)
        nop().mov(tmua, ptr, cond="ifa")

    # ---- per vector ----
    L.vloop
    _copy(cur, nxt)
    _advance(kb, s, nxt)
    _coords(kb, s, nxt)
    if bias is not None:
        mov(acc, bias)
    else:
        sub(acc, acc, acc)                                     # +0.0
    for t_, (i, j) in enumerate(taps):
        step_ptr(flags(cur, i, j), t_, nxt.a)                  # A = current tap valid
        flags(nxt, i, j)                                       # B = current, A = next tap valid
        nop(sig=S["ldtmu"](v))
        mov(tmua, ptr, cond="ifa").fmul(prod, v, w[t_])        # issue next ; w_t * x
        A.DSL["fadd"](acc, acc, prod, cond="ifb")
    _activation(kb, s, acc)
    sub(null, rem, 1, cond="pushn")                            # A = dummy lane (past the plane)
    store_vector(kb, acc, aout, "float32", cond="ifna")
    add(aout, aout, kb.u32(16 * ES)).sub(rem, rem, kb.u32(16))
    sub(null, rem, 1, cond="pushn")
    b(R_.vloop, cond="anyna")
    nop()
    nop()
    nop()
    for _ in taps:                                             # the over-issued vector
        nop(sig=S["ldtmu"](v))
    add(pbase, pbase, kb.u32(s.H * s.W * ES)).add(obase, obase, kb.u32(s.PS * ES))
    sub(npl, npl, 1, cond="pushz")
    b(R_.plane, cond="anyna")
    nop()
    nop()
    nop()
    tmuwt()
    thread_end()


# ------------------------------------------------------------------------------------------------
# Plan, reference, estimate
# ------------------------------------------------------------------------------------------------
def plan_depthwise(s: DwShape, weight: np.ndarray, bias=None, name: str = "depthwise_conv2d") -> KernelPlan:
    check(s)
    tab = lane_table(s)
    recs = weight_records(s, weight, bias)
    words, unif = kernel_program(s)
    words, unif = words.copy(), list(unif)
    bufs = [BufferSpec("data", "input", (s.N, s.C, s.H, s.W), "float32", s.planes * s.H * s.W * ES + 64),
            BufferSpec("out", "output", (s.N, s.C, s.OH, s.OW), "float32"),
            BufferSpec(TABLE, "weight", tab.shape, "int32"),
            BufferSpec(WEIGHTS, "weight", recs.shape, "float32")]
    attrs = {k: (list(v) if isinstance(v, tuple) else v) for k, v in s.__dict__.items()}
    return KernelPlan(name, bufs, [Launch(words, unif, (tab.shape[0], 1, 1), 16, s.num_qpus, 1, name)],
                      {TABLE: tab, WEIGHTS: recs}, attrs=attrs, flops=2 * s.planes * s.PS * s.T,
                      bytes_moved=s.planes * (s.H * s.W + s.PS) * ES)


def reference(s: DwShape, x: np.ndarray, weight: np.ndarray, bias=None) -> np.ndarray:
    """numpy, written from the formula in the module docstring (float64 sums)."""
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
    return out.astype(np.float32)


# Estimate: instructions per vector of the loop above (6 per tap + the fixed part) and per plane,
# for the busiest worker, bounded below by DRAM traffic (as pool.estimate).
EST_PER_TAP = 6
EST_PER_VECTOR = 30
EST_PER_PLANE = 260             # two TMU round trips (weights, first taps) + the over-issue drain


def estimate_shape(s: DwShape) -> float:
    from ...runtime.cycle_model import DEFAULT as T
    vectors = math.ceil(s.PS / 16)
    busiest = max(n for _, n in worker_planes(s))
    cycles = busiest * (vectors * (EST_PER_TAP * s.T + EST_PER_VECTOR) * T.cycles_per_instruction + EST_PER_PLANE)
    traffic = s.planes * (s.H * s.W + s.PS) * ES
    return (max(cycles, traffic / T.dram_bytes_per_cycle) + RD.ESTIMATE_LAUNCH_S * T.clock_hz) / T.clock_hz


def shape_of_conv(cs) -> DwShape:
    """The DwShape of a :class:`.conv.ConvShape` (raises ValueError when it is not depthwise fp32)."""
    if not (cs.groups == cs.C == cs.OC):
        raise ValueError("not a depthwise convolution")
    if cs.dtype != "float32" or cs.w_dtype != "float32":
        raise ValueError(f"dtypes {cs.dtype} x {cs.w_dtype} (the depthwise kernel takes float32)")
    pt, pl, pb, pr = cs.padding
    s = DwShape(cs.N, cs.C, cs.H, cs.W, cs.KH, cs.KW, cs.strides[0], cs.strides[1], pt, pl, pb, pr,
                cs.dilation[0], cs.dilation[1], cs.bias, cs.activation, cs.num_qpus)
    check(s)
    return s


def try_shape(cs) -> DwShape | None:
    """The DwShape for a :class:`.conv.ConvShape` this kernel takes, else None (the implicit-GEMM
    conv handles it). Used by :mod:`.conv`'s registry entry to route depthwise convolutions."""
    try:
        return shape_of_conv(cs)
    except ValueError:
        return None

