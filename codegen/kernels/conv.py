"""2-D convolution (NCHW) as an implicit GEMM on the GEMM substrate (:mod:`.gemm`).

``out[n, oc, p] = sum_k W[oc, k] * X[n, k, p]`` with k = (c, kh, kw) and p = (oh, ow): the weights
are the A operand (packed into the A panel at compile time, one row per output channel, so the
bias is per row), and the B operand is the im2col matrix *without materialising it*: lane p of a
B row reads input address ``table[p] + offset(k)``, where ``table[p] = (oh*sh*Wp + ow*sw)`` is a
compile-time pixel table and ``offset(k)`` is a per-k-step constant of the kernel's unrolled
block (one block = one input channel's KH x KW taps, or several channels when KH*KW < 4). The B
pointer then advances by one channel plane per block, exactly like a GEMM row block.

Padding: a small launch copies the input into a zero-bordered scratch copy (and pads the channel
count to whole blocks) when the convolution has padding; otherwise the kernel reads the input in
place. Depthwise convolution (groups == C == OC) is a batch of C one-row GEMMs per image.
Outputs: NCHW, float32, or int32 for integer inputs (int8 / uint8 / int16 data and weights), or
int8 / uint8 with the GEMM's requantize epilogue (:class:`.gemm.Requant`: one scale, or one per
output channel, which is the GEMM's row axis "m").
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, replace
from typing import NamedTuple

import numpy as np

from .. import asm as A
from ..asm import L, b, mov, nop, sub, add, shl, umul24, eidx, tmuwt, thread_end
from ..instr import MAGIC, RF
from ..plan import BufferSpec, KernelPlan, Launch
from . import depthwise
from .common import RegisterPool
from .gemm import (INT_DTYPES, ITEMSIZE, REQUANT_BLOCK, SMALL_INT, GemmShape, Requant, check_limits,
                   check_packed_values, choose_tiling, gemm_kernel, gemm_launch_cycles, gemm_uniforms,
                   requant_block, requant_constants, requant_from_attrs, requant_reference, tmu_config,
                   weight_bits_of)

S = A.SIGNALS
R_ = A.R
tmua, tmud, tmuc, null = (MAGIC[n] for n in ("tmua", "tmud", "tmuc", "null"))
MIN_BLOCK = 4               # k-steps per block at least (the GEMM's prefetch depth)


@dataclass(frozen=True)
class ConvShape:
    N: int
    C: int
    H: int
    W: int
    OC: int
    KH: int
    KW: int
    strides: tuple = (1, 1)
    padding: tuple = (0, 0, 0, 0)        # top, left, bottom, right
    dilation: tuple = (1, 1)
    groups: int = 1
    dtype: str = "float32"               # data dtype
    w_dtype: str = "float32"
    bias: bool = False
    activation: object = None
    num_qpus: int = 12
    #: requantize epilogue to int8 / uint8 outputs (gemm.Requant; per-channel scales on axis "m",
    #: the output channel); None: int32 / float32 outputs
    requant: Requant | None = None
    #: 4 / 2-bit weights (spec attr "weight_bits"; ``w_dtype`` int8 / uint8 holds the values and
    #: their sign): packed into the tmu A stream's panel where the estimate says it pays
    #: (:func:`choose_variant`), else stored as 8-bit / 32-bit panel values like int8 weights
    w_bits: int | None = None

    @property
    def out_dtype(self) -> str:
        if self.requant is not None:
            return self.requant.out_dtype
        return "int32" if self.is_int else "float32"

    @property
    def OH(self) -> int:
        pt, _, pb, _ = self.padding
        return (self.H + pt + pb - self.dilation[0] * (self.KH - 1) - 1) // self.strides[0] + 1

    @property
    def OW(self) -> int:
        _, pl, _, pr = self.padding
        return (self.W + pl + pr - self.dilation[1] * (self.KW - 1) - 1) // self.strides[1] + 1

    @property
    def is_int(self) -> bool:
        return self.dtype in INT_DTYPES

    @property
    def depthwise(self) -> bool:
        return self.groups > 1


@dataclass(frozen=True)
class ConvLayout:
    """How the implicit GEMM sees the (padded) input."""
    g: int           # input channels per block
    Cpad: int        # channels rounded up to whole blocks
    Hp: int
    Wp: int
    copy: bool       # a padded scratch copy is made first


def conv_layout(s: ConvShape) -> ConvLayout:
    taps = s.KH * s.KW
    g = 1 if s.depthwise else max(1, math.ceil(MIN_BLOCK / taps))
    Cpad = -(-s.C // g) * g
    pt, pl, pb, pr = s.padding
    copy = any(s.padding) or Cpad != s.C
    return ConvLayout(g, Cpad, s.H + pt + pb, s.W + pl + pr, copy)


def pixel_table(s: ConvShape, lay: ConvLayout, es: int) -> np.ndarray:
    """Byte offset of each output pixel's top-left tap in the (padded) input plane."""
    P = s.OH * s.OW
    NT = -(-P // 16)
    oh, ow = np.divmod(np.arange(P), s.OW)
    tab = np.zeros(NT * 16, dtype=np.int32)
    tab[:P] = (oh * s.strides[0] * lay.Wp + ow * s.strides[1]) * es
    return tab


def block_taps(s: ConvShape, lay: ConvLayout, es: int):
    """(bytes per block, byte offset of each k-step of a block)."""
    plane = lay.Hp * lay.Wp * es
    taps = [cc * plane + (kh * s.dilation[0] * lay.Wp + kw * s.dilation[1]) * es
            for cc in range(lay.g) for kh in range(s.KH) for kw in range(s.KW)]
    return lay.g * plane, tuple(taps)


# ------------------------------------------------------------------------------------------------
# Padding copy: X[n, c, h, w] -> Xp[n, c, h + pt, w + pl] (other entries stay zero)
# ------------------------------------------------------------------------------------------------
def pad_uniforms(s: ConvShape, lay: ConvLayout, x: str, xp: str, n0: int = 0):
    """The padding copy's uniforms; a launch over images ``n0 ..`` (:func:`split_pad`) starts
    both tensors ``n0`` images in."""
    es = ITEMSIZE[s.dtype]
    pt, pl, _, _ = s.padding
    u = [("addr", x, n0 * s.C * s.H * s.W * es), ("u32", s.C * s.H * s.W * es), ("u32", s.H * s.W * es),
         ("u32", s.W * es),
         ("addr", xp, n0 * lay.Cpad * lay.Hp * lay.Wp * es + (pt * lay.Wp + pl) * es), ("u32", lay.Cpad * lay.Hp * lay.Wp * es),
         ("u32", lay.Hp * lay.Wp * es), ("u32", lay.Wp * es), ("u32", s.H), ("u32", s.W), ("u32", es)]
    if s.dtype in SMALL_INT:
        c = tmu_config(s.dtype)
        u.append(("u32", 0xFFFF0000 | (c << 8) | c))     # load and store of one element each
    return u


def pad_kernel(s: ConvShape):
    """Workgroup (c, n) copies one input plane, 16 columns per lookup, masked past W."""
    p = RegisterPool()
    lane, src, dst, srow, drow, h, src0, wleft, es, tmp, v, t2 = (p.take() for _ in range(12))
    sstep, dstep, W_ = p.take(), p.take(), p.take()
    small = s.dtype in SMALL_INT
    cfg = p.take() if small else None
    ld = lambda r: S["ldunifrf"](r)  # noqa: E731

    eidx(lane, sig=ld(src))
    mov(t2, RF[3].unpack("uh"), sig=ld(tmp))                # n ; src image stride
    umul24(tmp, tmp, t2)
    add(src, src, tmp, sig=ld(tmp))                         # src plane stride
    mov(v, RF[3].unpack("ul"))                              # c
    umul24(tmp, tmp, v)
    add(src, src, tmp, sig=ld(sstep))                       # src row stride
    nop(sig=ld(dst))
    nop(sig=ld(tmp))                                        # dst image stride
    umul24(tmp, tmp, t2)
    add(dst, dst, tmp, sig=ld(tmp))                         # dst plane stride
    umul24(tmp, tmp, v)
    add(dst, dst, tmp, sig=ld(dstep))
    nop(sig=ld(h))                                          # H
    nop(sig=ld(W_))                                         # W
    nop(sig=ld(es))
    mov(src0, src)                                          # plane start: a valid address
    umul24(tmp, lane, es)
    add(src, src, tmp)
    add(dst, dst, tmp, sig=ld(cfg) if small else None)
    shl(t2, es, 4)                                          # 16 elements in bytes
    L.row
    mov(srow, src)
    mov(drow, dst)
    mov(wleft, W_)
    L.chunk
    sub(null, lane, wleft, cond="pushn")                    # A = lane < columns left
    mov(tmp, src0, cond="ifna")                             # masked lanes read a valid address
    mov(tmp, srow, cond="ifa")
    if small:
        mov(tmuc, cfg)
    mov(tmua, tmp)
    nop(sig=S["ldtmu"](v))
    mov(tmud, v)
    mov(tmua, drow, cond="ifa")
    sub(wleft, wleft, 15)
    sub(wleft, wleft, 1)                                    # 16 columns done
    sub(null, wleft, 1, cond="pushn")                       # A = no columns left
    add(srow, srow, t2)
    b(R_.chunk, cond="anyna")
    add(drow, drow, t2)
    nop()
    nop()
    sub(h, h, 1, cond="pushz")
    add(src, src, sstep)
    b(R_.row, cond="anyna")
    add(dst, dst, dstep)
    nop()
    nop()
    tmuwt()
    thread_end()


# ------------------------------------------------------------------------------------------------
# Plans
# ------------------------------------------------------------------------------------------------
def gemm_shape_of(s: ConvShape, lay: ConvLayout, a_stream: str = "unifa", packed: bool = False) -> GemmShape:
    """The implicit GEMM of ``s``; ``packed``: its ``w_bits``-bit weights packed into the tmu A
    stream's panel (gemm ``a_bits``)."""
    es = ITEMSIZE[s.dtype]
    P = s.OH * s.OW
    taps = s.KH * s.KW
    block = block_taps(s, lay, es)
    if packed and (s.w_bits is None or a_stream != "tmu"):
        raise ValueError("packed conv weights need weight_bits and the tmu A stream")
    narrow = a_stream == "tmu" and s.w_dtype in SMALL_INT and not packed
    common = dict(a_dtype=s.w_dtype, b_dtype=s.dtype, bias=s.bias, bias_axis="m",
                  activation=s.activation, num_qpus=s.num_qpus, b_table=True, b_block=block,
                  a_stream=a_stream, requant=s.requant,
                  a_panel_dtype=s.w_dtype if narrow else None, a_bits=s.w_bits if packed else None)
    if s.depthwise and s.requant is not None and s.requant.axis is not None:
        raise ValueError("per-channel requantize of a depthwise convolution (the GEMM batch is the channel)")
    if s.depthwise:
        return GemmShape(1, P, taps, s.C, a_batch_stride_elems=taps,
                         b_batch_stride_elems=lay.Hp * lay.Wp, bias_batch_stride=1, **common)
    return GemmShape(s.OC, P, lay.Cpad * taps, s.N, a_batch_stride_elems=0,
                     b_batch_stride_elems=lay.Cpad * lay.Hp * lay.Wp, **common)


def _weight_panel(s: ConvShape, lay: ConvLayout, g: GemmShape, t, weight: np.ndarray) -> np.ndarray:
    """Weights as the GEMM's packed A panel: panel[z][mt][k][i] (+ R zeros of look-ahead), in the
    panel dtype (int8 / uint8 / int16 weights stay narrow in the tmu A stream, else 32-bit words)."""
    if g.a_packed:
        return _packed_weight_panel(s, lay, g, t, weight)
    dt = np.dtype(g.a_panel_dtype) if g.a_panel_dtype else (np.int32 if s.is_int else np.float32)
    taps = s.KH * s.KW
    if s.depthwise:
        wm = weight.reshape(s.C, 1, taps).astype(dt)                  # z = channel, M = 1
    else:
        w = np.zeros((s.OC, lay.Cpad, taps), dtype=dt)
        w[:, : s.C] = weight.reshape(s.OC, s.C, taps)
        wm = w.reshape(1, s.OC, lay.Cpad * taps)
    Z, M, K = wm.shape
    panel = np.zeros((Z, t.MT, t.Kpad, t.R), dtype=dt)
    for mt in range(t.MT):
        rows = wm[:, mt * t.R: (mt + 1) * t.R, :]                     # [Z, r, K]
        panel[:, mt, :K, : rows.shape[1]] = np.swapaxes(rows, 1, 2)
    # look-ahead past the last tile: R words (unifa); PF k-steps of R words + 16 lanes (tmu)
    ahead = t.R * (t.PF + 1) + 16 if g.a_stream == "tmu" else t.R
    return np.concatenate([panel.reshape(-1), np.zeros(ahead, dt)])


def _packed_weight_panel(s: ConvShape, lay: ConvLayout, g: GemmShape, t, weight: np.ndarray) -> np.ndarray:
    """The packed A panel (gemm ``a_bits``): uint32 words ``[mt][kb][w][i]``: for m-tile mt,
    block kb of U k-steps and lane (row) i, word w holds k-steps ``kb U + w G + p`` (p < G,
    ``w G + p < U``; G = 32 / bits) with p = 0 in the top bits, two's complement fields, zeros
    past the block, K and M; + the TMU's look-ahead. Values outside the packed range are refused."""
    bits, G = g.a_bits, g.a_group
    taps = s.KH * s.KW
    w = np.zeros((t.MT * t.R, lay.Cpad, taps), np.int64)
    w[: s.OC, : s.C] = check_packed_values(weight, bits, g.a_dtype != "uint8").reshape(s.OC, s.C, taps)
    U, W = t.U, g.a_block_words(t.U)
    kb = t.Kpad // U
    w = w.reshape(t.MT * t.R, lay.Cpad * taps)
    full = np.zeros((t.MT * t.R, kb, W * G), np.uint64)
    full[:, :, :U] = (w.reshape(t.MT * t.R, kb, U) & ((1 << bits) - 1)).astype(np.uint64)
    shifts = (32 - bits * (np.arange(G, dtype=np.uint64) + 1))
    words = np.bitwise_or.reduce(full.reshape(t.MT * t.R, kb, W, G) << shifts, axis=3).astype(np.uint32)
    panel = words.reshape(t.MT, t.R, kb, W).transpose(0, 2, 3, 1)              # [mt][kb][w][i]
    return np.concatenate([panel.reshape(-1), np.zeros(t.R * (t.PF + 1) + 16, np.uint32)])


def _candidates(s: ConvShape, lay: ConvLayout, a_stream: str | None = None, packed: bool | None = None):
    """GEMM shapes of ``s`` to choose from: each A-stream variant (or ``a_stream``), and for
    low-bit weights the packed panel (tmu stream) beside the unpacked ones (or only ``packed``'s)."""
    out = []
    for v in ((a_stream,) if a_stream else _A_STREAMS()):
        for p in ((False, True) if s.w_bits and v == "tmu" else (False,)):
            if packed is None or p == packed:
                out.append((v, p))
    return out


def _A_STREAMS():
    from .gemm import A_STREAMS
    return A_STREAMS


def choose_variant(s: ConvShape, lay: ConvLayout, model=None, a_stream: str | None = None,
                   packed: bool | None = None) -> GemmShape:
    """The GEMM shape of ``s`` with the A-stream variant of the lowest estimate under ``model``
    (gemm.A_STREAMS: the weights through the unifa stream, or columns through the TMU)."""
    from .gemm import gemm_launch_cycles
    best = None
    for v, p in _candidates(s, lay, a_stream, packed):
        try:
            g = gemm_shape_of(s, lay, v, p)
            t = choose_tiling(g)
            check_limits(g, t)
            if t.R < min(4, g.M):                   # too few rows per tile: not a candidate
                continue
            cyc = gemm_launch_cycles(g, t, model)
        except ValueError:                          # the variant does not take this shape
            continue
        if best is None or cyc < best[0]:
            best = (cyc, g)
    if best is None:
        raise ValueError(f"no A-stream variant takes the convolution {s}")
    return best[1]


def plan_conv(s: ConvShape, weight: np.ndarray, bias: np.ndarray | None = None,
              a_stream: str | None = None, scale: np.ndarray | None = None,
              packed: bool | None = None, budget_seconds: float | None = None) -> KernelPlan:
    """Plan of the convolution; ``a_stream`` forces a GEMM A-stream variant (default: the one of
    the lowest estimate, :func:`choose_variant`); ``packed`` forces (True) or forbids (False) the
    packed panel of ``w_bits``-bit weights (default: by estimate); ``scale``: the
    per-output-channel requantize multipliers when ``s.requant`` has axis "m". A GEMM launch
    modelled over ``budget_seconds`` (default the v3d dispatch budget) is split into launches over
    image groups and output-channel blocks (:func:`split_launches`), each within it."""
    if s.depthwise and not (s.groups == s.C == s.OC):
        raise ValueError("only groups == 1 or depthwise (groups == C == OC) convolutions")
    if s.w_bits is not None:                        # refused, never truncated (packed or not)
        if s.depthwise:
            raise ValueError("packed low-bit weights of a depthwise convolution")
        check_packed_values(weight, s.w_bits, s.w_dtype != "uint8")
    lay = conv_layout(s)
    if a_stream is None and packed is None:
        g = choose_variant(s, lay)
    elif a_stream is not None and (packed is not None or s.w_bits is None):
        g = gemm_shape_of(s, lay, a_stream, bool(packed))  # its own refusal, with the reason
    else:
        g = choose_variant(s, lay, None, a_stream, packed)
    t = choose_tiling(g)
    check_limits(g, t)
    es = ITEMSIZE[s.dtype]
    P = s.OH * s.OW
    out_dt = s.out_dtype
    acc_dt = "int32" if s.is_int else "float32"
    x_bytes = s.N * s.C * s.H * s.W * es
    bufs = [BufferSpec("data", "input", (s.N, s.C, s.H, s.W), s.dtype,
                       x_bytes + (0 if lay.copy else 2 * block_taps(s, lay, es)[0] + 64))]
    consts = {"weight_panel": _weight_panel(s, lay, g, t, np.asarray(weight)),
              "data_table": pixel_table(s, lay, es)}
    bufs.append(BufferSpec("weight_panel", "weight", consts["weight_panel"].shape,
                           str(consts["weight_panel"].dtype)))
    bufs.append(BufferSpec("data_table", "weight", consts["data_table"].shape, "int32"))
    if s.bias:
        bv = np.zeros(s.OC + 16, dtype=acc_dt)
        bv[: s.OC] = np.asarray(bias).reshape(-1)
        consts["bias"] = bv
        bufs.append(BufferSpec("bias", "weight", bv.shape, acc_dt))
    if s.requant is not None and not t.rq_regs:          # the epilogue's parameter blocks
        consts[REQUANT_BLOCK] = requant_block(g, t, scale)
        bufs.append(BufferSpec(REQUANT_BLOCK, "weight", consts[REQUANT_BLOCK].shape, "uint32",
                               consts[REQUANT_BLOCK].nbytes + 64))
    bufs.append(BufferSpec("out", "output", (s.N, s.OC, s.OH, s.OW), out_dt))
    launches = []
    b_name = "data"
    if lay.copy:
        # one spare block of zero planes past the end: the prefetch reads ahead
        padded = (s.N * lay.Cpad + lay.g) * lay.Hp * lay.Wp * es + 64
        bufs.append(BufferSpec("data_padded", "scratch", (padded // es,), s.dtype, padded))
        pad_words = A.assemble(pad_kernel, s, name="conv_pad")
        pads = split_pad(s, budget_seconds=budget_seconds)
        for i, (n0, nb) in enumerate(pads):
            launches.append(Launch(pad_words, pad_uniforms(s, lay, "data", "data_padded", n0),
                                   (s.C, nb, 1), 16, s.num_qpus, 1, "conv_pad" if len(pads) == 1 else f"conv_pad{i}"))
        b_name = "data_padded"
    parts = split_launches(s, lay, g, t, budget_seconds=budget_seconds)
    words = {}
    for i, p in enumerate(parts):
        key = (p.shape.M, p.shape.batch, p.tiling.MT)
        if key not in words:                      # equal blocks share one program
            words[key] = A.assemble(gemm_kernel, p.shape, p.tiling, name="conv")
        u = gemm_uniforms(p.shape, p.tiling, "weight_panel", b_name, "out", "bias" if s.bias else None,
                          p.mt0, (replace(g, batch=p.shape.batch), t))
        u = [("addr", "data_table", 0) if e == ("addr", b_name + "_table", 0) else e for e in u]
        if p.n0:                                  # images n0.. (depthwise: one image per launch)
            shift = {b_name: p.n0 * lay.Cpad * lay.Hp * lay.Wp * es, "out": p.n0 * s.OC * P * ITEMSIZE[out_dt]}
            u = [("addr", e[1], e[2] + shift.get(e[1], 0)) if e[0] == "addr" else e for e in u]
        name = "conv" if len(parts) == 1 or (s.depthwise and len(parts) == s.N) else f"conv_part{i}"
        launches.append(Launch(words[key], u, (p.tiling.Wn, p.tiling.Wm, p.shape.batch), 16, s.num_qpus, 1, name))
    from .common import timing_model, seconds
    m = timing_model(None)
    launch_seconds = ([seconds(m, pad_launch_cycles(replace(s, N=nb), m)) for _, nb in pads] if lay.copy else []) + \
        [seconds(m, gemm_launch_cycles(p.shape, p.tiling, m)) for p in parts]
    return KernelPlan("conv2d", bufs, launches, consts,
                      attrs={**{k: getattr(s, k) for k in s.__dataclass_fields__},
                             "requant": None if s.requant is None else dataclasses.asdict(s.requant),
                             "a_stream": g.a_stream, "a_panel_dtype": g.a_panel_dtype,
                             "weight_packed": g.a_packed,
                             "weight_dtype": (f"{'' if s.w_dtype == 'int8' else 'u'}int{s.w_bits}"
                                              if s.w_bits else s.w_dtype),
                             "tiling": t.__dict__,
                             "block": lay.__dict__,
                             # modelled seconds of each launch (default TimingModel): the v3d
                             # device checks the longest against its dispatch budget
                             "launch_seconds": launch_seconds},
                      flops=2 * s.N * s.OC * P * (s.C // s.groups) * s.KH * s.KW,
                      bytes_moved=x_bytes + s.N * s.OC * P * ITEMSIZE[out_dt] + consts["weight_panel"].nbytes)


class ConvPart(NamedTuple):
    """One GEMM launch of a convolution plan: images ``n0 ..`` (``shape.batch`` of them; one for
    depthwise), output-channel row tiles from ``mt0`` (``tiling.MT`` of them)."""
    n0: int
    mt0: int
    shape: GemmShape
    tiling: object


def split_pad(s: ConvShape, model=None, budget_seconds: float | None = None) -> list:
    """Image runs ``[(n0, images), ...]`` of the padding copy, each modelled
    (:func:`pad_launch_cycles` under ``model``) within ``budget_seconds`` (default
    :func:`.common.dispatch_budget_seconds`): the fewest equal runs; one image per launch when
    nothing fits (the budget check then refuses the plan; one image is under 16 MiB, the GEMM's
    24-bit image stride, far below the budget)."""
    from .common import timing_model, seconds, dispatch_budget_seconds, split_count
    m = timing_model(model)
    budget = dispatch_budget_seconds() if budget_seconds is None else budget_seconds
    size = lambda n: -(-s.N // n)                                   # noqa: E731
    n = split_count(lambda n: seconds(m, pad_launch_cycles(replace(s, N=size(n)), m)) <= budget, s.N)
    return [(n0, min(size(n), s.N - n0)) for n0 in range(0, s.N, size(n))]


def split_launches(s: ConvShape, lay: ConvLayout, g: GemmShape, t, model=None,
                   budget_seconds: float | None = None) -> list:
    """The GEMM launches of the convolution, each modelled (:func:`.gemm.gemm_launch_cycles`
    under ``model``) within ``budget_seconds`` (default :func:`.common.dispatch_budget_seconds`):
    the persistent launch keeps every batch resident, so the v3d hang check (no batch-counter
    progress for 500 ms) bounds each launch. The images (the GEMM's batch) are cut into the
    fewest equal groups that fit; when one image does not fit either, each image's output
    channels (the GEMM's rows) into row blocks (:func:`.gemm.split_rows`). Depthwise through the
    GEMM (one launch per image, its channels the batch) is not cut further. When nothing fits the
    last cut is returned (the caller's budget check then refuses the plan)."""
    from .common import timing_model, seconds, dispatch_budget_seconds, split_count
    from .gemm import gemm_launch_cycles, split_rows
    m = timing_model(model)
    budget = dispatch_budget_seconds() if budget_seconds is None else budget_seconds
    if s.depthwise:
        return [ConvPart(n, 0, g, t) for n in range(s.N)]
    nimg = max(1, g.batch)

    def group(n):                           # size of each of n image groups (the last may be less)
        return -(-nimg // n)

    def fits(n):
        return seconds(m, gemm_launch_cycles(replace(g, batch=group(n)), t, m)) <= budget
    n = split_count(fits, nimg)
    size = group(n)
    parts = []
    for n0 in range(0, nimg, size):
        gi = replace(g, batch=min(size, nimg - n0))
        blocks = [(0, gi, t)] if fits(n) else split_rows(gi, t, m, budget)
        parts += [ConvPart(n0, mt0, bs, bt) for mt0, bs, bt in blocks]
    return parts


def reference(s: ConvShape, x: np.ndarray, w: np.ndarray, bias=None, scale=None) -> np.ndarray:
    """Direct convolution in float64 / int64 (int32 wrap), then the epilogue (and the requantize,
    :func:`.gemm.requant_reference`, with per-channel ``scale``)."""
    if s.requant is not None:
        from dataclasses import replace
        acc = reference(replace(s, requant=None), x, w, bias)
        rq = s.requant
        sc = np.float32(rq.scale) if rq.axis is None else np.asarray(scale, np.float32).reshape(-1, 1, 1)
        return requant_reference(acc, rq, sc)
    pt, pl, pb, pr = s.padding
    big = np.int64 if s.is_int else np.float64
    xp = np.zeros((s.N, s.C, s.H + pt + pb, s.W + pl + pr), big)
    xp[:, :, pt: pt + s.H, pl: pl + s.W] = x
    out = np.zeros((s.N, s.OC, s.OH, s.OW), big)
    sh, sw = s.strides
    dh, dw = s.dilation
    cg = s.C // s.groups
    for kh in range(s.KH):
        for kw in range(s.KW):
            patch = xp[:, :, kh * dh: kh * dh + sh * (s.OH - 1) + 1: sh, kw * dw: kw * dw + sw * (s.OW - 1) + 1: sw]
            if s.groups == 1:
                out += np.einsum("nchw,oc->nohw", patch, w[:, :, kh, kw].astype(big))
            else:
                out += patch * w[:, 0, kh, kw].astype(big)[None, :, None, None]
    if bias is not None:
        out += np.asarray(bias, big)[None, :, None, None]
    if s.is_int:
        out = (out + (1 << 31)) % (1 << 32) - (1 << 31)
    if s.activation == "relu":
        out = np.maximum(out, 0)
    elif isinstance(s.activation, tuple):
        out = np.clip(out, s.activation[1], s.activation[2])
    return out.astype(np.int32 if s.is_int else np.float32)


# ------------------------------------------------------------------------------------------------
# Registry entry: "conv2d"
# ------------------------------------------------------------------------------------------------
def shape_from_spec(spec) -> ConvShape:
    (xs, xdt), (ws, wdt) = spec.inputs[0], spec.inputs[1]
    a = spec.attrs
    if len(xs) != 4 or len(ws) != 4:
        raise ValueError("conv2d needs 4-D data and weight")
    N, C, H, W = (int(v) for v in xs)
    OC, CG, KH, KW = (int(v) for v in ws)
    pad = tuple(int(v) for v in a.get("padding", (0, 0, 0, 0)))
    if len(pad) == 2:
        pad = (pad[0], pad[1], pad[0], pad[1])
    bits, wdt = weight_bits_of(a, str(wdt))
    if bits is not None and str(xdt) not in SMALL_INT:
        raise ValueError(f"packed {bits}-bit weights need 8/16-bit integer data, not {xdt}")
    return ConvShape(N, C, H, W, OC, KH, KW, tuple(int(v) for v in a.get("strides", (1, 1))), pad,
                     tuple(int(v) for v in a.get("dilation", (1, 1))), int(a.get("groups", 1)),
                     str(xdt), str(wdt), bool(a.get("bias", False)), a.get("activation"),
                     int(a.get("num_qpus", 12)), requant_from_attrs(a, str(spec.output[1]), OC, "m"), bits)


def supports(spec) -> tuple:
    try:
        s = shape_from_spec(spec)
        requant_constants(spec)
    except (ValueError, TypeError) as e:
        return False, str(e)
    if spec.attrs.get("layout", "NCHW") != "NCHW":
        return False, f"layout {spec.attrs.get('layout')} (NCHW only)"
    if s.groups != 1 and not (s.groups == s.C == s.OC):
        return False, f"groups={s.groups} (only 1 or depthwise)"
    if s.w_bits is not None and s.groups != 1:
        return False, f"packed {s.w_bits}-bit weights of a grouped / depthwise convolution"
    if (s.dtype in INT_DTYPES) != (s.w_dtype in INT_DTYPES) or \
            (s.dtype not in INT_DTYPES and s.dtype != "float32") or \
            (s.w_dtype not in INT_DTYPES and s.w_dtype != "float32"):
        return False, f"dtypes {s.dtype} x {s.w_dtype} (float32, or integer data and weights)"
    if s.requant is not None and not s.is_int:
        return False, "requantize epilogue on a float convolution"
    if s.requant is not None and s.depthwise and depthwise.try_shape(s) is None:
        return False, "requantize epilogue of a depthwise convolution the depthwise kernel does not take"
    want = s.out_dtype
    if str(spec.output[1]) != want:
        return False, f"output dtype {spec.output[1]} (the kernel produces {want})"
    if s.OH < 1 or s.OW < 1:
        return False, "empty output"
    act = s.activation
    if not (act is None or act == "relu" or (isinstance(act, tuple) and act[0] == "clip")):
        return False, f"activation {act!r}"
    if depthwise.try_shape(s) is not None:
        return True, "ok (depthwise kernel)"
    try:
        lay = conv_layout(s)
        g = gemm_shape_of(s, lay)
        t = choose_tiling(g)
        check_limits(g, t)
    except ValueError as e:
        return False, str(e)
    if t.R < min(4, g.M):
        return False, f"a {s.KH}x{s.KW} kernel leaves too few registers for output rows"
    return True, "ok"


def generate(spec, constants: dict):
    s = shape_from_spec(spec)
    dws = depthwise.try_shape(s)
    if dws is not None:
        return depthwise.plan_depthwise(dws, constants["weight"], constants.get("bias") if s.bias else None,
                                        scale=requant_constants(spec).get("scale"))
    packed = spec.attrs.get("weight_packed")               # forces / forbids the packed panel
    return plan_conv(s, constants["weight"], constants.get("bias") if s.bias else None,
                     spec.attrs.get("a_stream"), requant_constants(spec).get("scale"),
                     None if packed is None else bool(packed))


def pad_launch_cycles(s: ConvShape, model=None) -> float:
    """Modelled cycles of the padding-copy launch: workgroups (c, n), each H rows of 16-element
    chunks; a chunk is the chunk loop's instructions plus one load round trip (the copy waits for
    each load before its store)."""
    from .common import timing_model, loop_lengths, round_trip
    m = timing_model(model)
    cpi = m.cycles_per_instruction
    words = A.assemble(pad_kernel, s, name="conv_pad")
    chunk, row = loop_lengths(words)[:2]
    es = ITEMSIZE[s.dtype]
    miss = min(1.0, 16 * es / m.line_bytes)
    per_chunk = chunk * cpi + m.tmu_latency + miss * m.dram_latency
    per_wg = (len(words) - row) * cpi + s.H * ((row - chunk) * cpi + math.ceil(s.W / 16) * per_chunk) \
        + round_trip(m, True)
    return math.ceil(s.C * s.N / max(1, min(m.num_qpus, s.num_qpus))) * per_wg


def estimate(spec, model=None) -> float:
    """Modelled seconds of the conv2d plan under ``model``: the padding copy (when the plan has
    one) and its GEMM launches (:func:`launch_cycles`), costed like the matmul's GEMM launch."""
    from .common import timing_model, seconds
    m = timing_model(model)
    s = shape_from_spec(spec)
    dws = depthwise.try_shape(s)
    if dws is not None:
        return depthwise.estimate_shape(dws, m)
    return seconds(m, sum(launch_cycles(s, m)))


def launch_cycles(s: ConvShape, model=None) -> list:
    """Modelled cycles of each launch of :func:`plan_conv`'s plan under ``model`` (its variant
    and split chosen as the plan chooses them, :func:`split_launches` under the default budget):
    the padding copy (when the plan has one), then each GEMM launch."""
    from .common import timing_model
    m = timing_model(model)
    lay = conv_layout(s)
    g = choose_variant(s, lay, m)
    t = choose_tiling(g)
    pad = [pad_launch_cycles(replace(s, N=nb), m) for _, nb in split_pad(s, m)] if lay.copy else []
    return pad + [gemm_launch_cycles(p.shape, p.tiling, m) for p in split_launches(s, lay, g, t, m)]


def longest_dispatch_seconds(spec, model=None) -> float:
    """Modelled seconds (under ``model``) of the longest launch of the conv2d plan (placement's
    dispatch-budget rule); for the depthwise kernel (not split) its whole plan."""
    from .common import timing_model, seconds
    m = timing_model(model)
    s = shape_from_spec(spec)
    if depthwise.try_shape(s) is not None:
        return estimate(spec, m)
    return seconds(m, max(launch_cycles(s, m)))


def _register():
    from .. import registry
    registry.register("conv2d", supports, generate, estimate)


_register()
