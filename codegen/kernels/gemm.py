"""GEMM substrate: C[z] = A[z] @ B[z] (+ bias) (+ ReLU / clip); fp32, or integers with int32 accumulation.

Work layout
-----------
Lanes run along N. An output tile is ``R`` rows (R = min(16, M)) by 16 columns; accumulator
``acc[i]`` holds ``C[m0 + i, n0 : n0 + 16]``. For every k:

* the B row ``B[k, n0 : n0 + 16]`` is one 16-lane TMU load (per-lane addresses, so B may be
  row-major or transposed), issued ``PF`` k-steps ahead and popped with ``ldtmu``;
* the R values ``A[m0 + i, k]`` arrive broadcast to all lanes through the ``ldunifarf`` signal,
  from a packed A panel (``panel[z][mt][k][i]``) that the unifa stream walks sequentially;
* each of R instructions dual-issues the multiply on the mul ALU (``fmul`` / ``smul24``) and an
  accumulation on the add ALU (``fadd`` / ``add``), and carries the ``ldunifarf`` of the next A
  value; one more instruction pops the next B row and issues the next TMU load. A k-step is
  R + 1 instructions for 16 R multiply-adds (16/17 of the ALU peak at R = 16), plus a counter and
  a branch instruction per ``U`` k-steps.

A second variant (``GemmShape.a_stream = "tmu"``) does not use the uniform stream: each k-step's
A column (the R panel values) is one per-lane TMU lookup issued ``PF`` k-steps ahead with the B
row, and ``shuffle(a, column, i)`` broadcasts row i; a row then costs two instructions (shuffle
and accumulate on the add ALU, multiply on the mul ALU). The matmul / conv entries pick the
variant with the lower estimate under the TimingModel (:func:`choose_variant`); ``attrs
["a_stream"]`` forces one. Under the calibrated default model the unifa variant is faster; at the
slow end of the uniform cache's unpinned range (no prefetch, slow refill) the tmu variant is, and
its time barely moves over the model's band (scripts/bench_kernels.py).

A is packed at run time by a small launch (:func:`pack_kernel`), except for M = 1 with 32-bit A
(the row itself is the panel). B is read in place with ``PF`` rows of zero padding after its end
for the prefetch. Integer inputs (int8 / uint8 / int16 / int32 within 24 bits) are loaded with the
TMU's sign- or zero-extending types, so int16 B rows move half the bytes of int32 rows and int8 a
quarter; they are multiplied with ``smul24`` (the low 24 bits of each operand, signed) and summed
in int32, wrapping modulo 2**32 like numpy's int32 arithmetic.

Low-bit weights (``GemmShape.b_bits`` / ``a_bits``, 4 or 2; a constant int8 / uint8 B also 8,
where the estimate says it pays: :func:`choose_b_packing`): a constant B is packed by the plan
into 32-bit words of G = 32 / bits consecutive k-steps per column (:func:`pack_weights`), one
lookup per G k-steps, unpacked in registers with ``shl`` and ``asr`` / ``shr`` in ALU slots the
8-bit kernel leaves free (:func:`_kstep_packed`); a convolution's packed A panel works the same
way in the "tmu" A stream (:func:`_kstep_tmu_packed`). docs/kernels.md has the layouts and costs.

Edges: any M, N, K. Lanes beyond N are masked on store; rows beyond M are never stored; K is
padded to a multiple of ``U`` with zeros where that is exact (the padded products are 0 * 0).
Workers: a ``Wn x Wm`` grid of workgroups (x, y) per batch entry (z), one QPU thread each; worker
(wn, wm) takes the tiles (mt, nt) with mt = wm (mod Wm) and nt = wn (mod Wn).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, replace

import numpy as np

from .. import asm as A
from ..asm import L, b, mov, nop, sub, add, shr, shl, umul24, eidx, tmuwt, thread_end
from ..instr import MAGIC, RF
from ..plan import BufferSpec, KernelPlan, Launch
from .common import RegisterPool, TMU_FIFO_WORDS

S = A.SIGNALS
R_ = A.R                     # label references
tmua, tmud, tmuc, unifa, null = (MAGIC[n] for n in ("tmua", "tmud", "tmuc", "unifa", "null"))

#: TMU element type codes (config byte = per-lane << 7 | op 15 (plain) << 3 | type)
TMU_TYPE = {"int8": 0, "int16": 1, "uint8": 5, "uint16": 6, "int32": 7, "uint32": 7, "float32": 7}
ITEMSIZE = {"int8": 1, "uint8": 1, "int16": 2, "uint16": 2, "int32": 4, "uint32": 4, "float32": 4}
INT_DTYPES = ("int8", "uint8", "int16", "int32")
SMALL_INT = ("int8", "uint8", "int16")
UMUL24_LIMIT = 1 << 24


def tmu_config(dtype: str) -> int:
    return 0x80 | (15 << 3) | TMU_TYPE[dtype]


def config_word(dtypes) -> int:
    """The tmuc word configuring the next four lookups (unused bytes: 0xff = 32-bit default)."""
    w = 0
    for i, dt in enumerate(list(dtypes)[:4] + ["uint32"] * (4 - len(list(dtypes)[:4]))):
        w |= tmu_config(dt) << (8 * i)
    return w


# ------------------------------------------------------------------------------------------------
# Packed low-bit weights (4 / 2 bits)
# ------------------------------------------------------------------------------------------------
#: bits per packed weight -> {signed: value range}; a 32-bit word holds 32 // bits values. 8:
#: int8 / uint8 B packed four k-steps per word (chosen by estimate for a constant B, or forced
#: with ``attrs["weight_packed"]``; :func:`packed_int8_candidate`)
PACKED_BITS = {8: {True: (-128, 127), False: (0, 255)}, 4: {True: (-8, 7), False: (0, 15)},
               2: {True: (-2, 1), False: (0, 3)}}
#: the widths a spec may declare with ``weight_bits`` / a packed dtype name (narrower than 8 bits)
WEIGHT_BITS = (4, 2)
#: spec dtypes naming packed weights directly -> (bits, signed) (else int8 / uint8 + "weight_bits")
PACKED_DTYPES = {"int4": (4, True), "uint4": (4, False), "int2": (2, True), "uint2": (2, False)}


def packed_range(bits: int, signed: bool) -> tuple:
    """(lo, hi) of a packed weight value; ValueError for a width other than 8, 4 or 2."""
    if bits not in PACKED_BITS:
        raise ValueError(f"weight_bits {bits!r}: packed weights are 8, 4 or 2 bits")
    return PACKED_BITS[bits][bool(signed)]


def check_packed_values(w: np.ndarray, bits: int, signed: bool, what: str = "weights") -> np.ndarray:
    """``w`` as int64 after checking every value lies in the packed range (never truncated)."""
    lo, hi = packed_range(bits, signed)
    w = np.asarray(w)
    if w.dtype.kind not in "iub":
        raise ValueError(f"{bits}-bit {what} must be integers, got {w.dtype}")
    w = w.astype(np.int64)
    if w.size and (w.min() < lo or w.max() > hi):
        bad = w[(w < lo) | (w > hi)]
        raise ValueError(f"{what}: {bad.size} value(s) outside the {'' if signed else 'u'}int{bits} range "
                         f"[{lo}, {hi}] (e.g. {int(bad.reshape(-1)[0])}); refusing to truncate")
    return w


def pack_weights(w: np.ndarray, bits: int, signed: bool, rows: int, lanes: int) -> np.ndarray:
    """Pack ``w[k, n]`` (values checked by :func:`check_packed_values`) into uint32 words
    ``P[rows, lanes]``: word ``P[q, n]`` holds ``w[q G + p, n]`` (G = 32 // bits) in bits
    ``[32 - bits (p + 1), 32 - bits p)``, k-step p = 0 in the top bits (two's complement for
    signed values); k >= K and n >= N are zeros. The kernel extracts the top field with one
    ``asr`` (signed) / ``shr`` (unsigned) by ``32 - bits`` and moves the next one up with ``shl``
    by ``bits``."""
    w = check_packed_values(w, bits, signed)
    K, N = w.shape
    G = 32 // bits
    if rows * G < K or lanes < N:
        raise ValueError(f"packed layout {rows} x {lanes} words cannot hold {K} x {N} weights")
    full = np.zeros((rows * G, lanes), np.uint64)
    full[:K, :N] = (w & ((1 << bits) - 1)).astype(np.uint64)
    full = full.reshape(rows, G, lanes)
    shifts = (32 - bits * (np.arange(G, dtype=np.uint64) + 1)).reshape(1, G, 1)
    return np.bitwise_or.reduce(full << shifts, axis=1).astype(np.uint32)


# ------------------------------------------------------------------------------------------------
# Problem and tiling
# ------------------------------------------------------------------------------------------------
#: 8-bit output dtypes of the requantize epilogue -> (qmin, qmax)
REQUANT_DTYPES = {"int8": (-128, 127), "uint8": (0, 255)}
#: TMU config word of four 8-bit stores (each writes the low byte of every lane's tmud word); the
#: epilogue writes it before every fourth output row and restores the default (-1) after the tile
STORE8_CONFIG = (0x80 | (15 << 3) | TMU_TYPE["int8"]) * 0x01010101


@dataclass(frozen=True)
class Requant:
    """The requantize epilogue of an integer GEMM (ONNX QuantizeLinear applied to the int32
    accumulator ``acc`` times the float32 multiplier ``scale = s_x s_w / s_y``):

        q = clamp(round_half_even(float32(acc) * scale) + zero_point, lo, hi)

    with float32 ``itof`` (exact below 2**24, else round to nearest even) and a float32 multiply
    (``fmul``: IEEE round to nearest even), ``ftoin`` (round half to even, saturating to int32),
    then the clamp to ``[lo - zero_point, hi - zero_point]`` and the integer zero point add (in
    that order, so a saturated ``ftoin`` cannot wrap); ``[lo, hi]`` lies within the output dtype's range (saturation) and
    narrows it for a fused ReLU6 / Clip. ``axis``: None (one scale, ``scale`` holds it), "m" (one
    scale per output row: a convolution's output channel) or "n" (one per output column: a dense
    layer's output feature); per-channel scales are the constant ``scale`` buffer of the plan."""
    out_dtype: str = "int8"
    axis: str | None = None
    zero_point: int = 0
    lo: int = -128
    hi: int = 127
    scale: float | None = None

    def __post_init__(self):
        if self.out_dtype not in REQUANT_DTYPES:
            raise ValueError(f"requantize output dtype {self.out_dtype} (int8 or uint8)")
        qmin, qmax = REQUANT_DTYPES[self.out_dtype]
        if not (qmin <= self.lo <= self.hi <= qmax):
            raise ValueError(f"requantize clamp [{self.lo}, {self.hi}] outside {self.out_dtype} or empty")
        if not (qmin <= self.zero_point <= qmax):
            raise ValueError(f"zero point {self.zero_point} outside {self.out_dtype}")
        if self.axis not in (None, "m", "n"):
            raise ValueError(f"requantize scale axis {self.axis!r} (None, 'm' or 'n')")
        if self.axis is None:
            sc = np.float32(self.scale if self.scale is not None else np.nan)
            if not (np.isfinite(sc) and sc > 0):
                raise ValueError(f"requantize scale {self.scale} is not finite and positive")


def requant_reference(acc: np.ndarray, rq: Requant, scale) -> np.ndarray:
    """numpy written to :class:`Requant`'s formula (the spec of the kernel's epilogue)."""
    sc = np.asarray(scale, np.float32)
    y = np.asarray(acc).astype(np.float32) * sc                  # float32 product, RNE
    with np.errstate(over="ignore", invalid="ignore"):
        r = np.rint(y.astype(np.float64))                        # half to even
    r = np.clip(r, -2.0 ** 31, 2.0 ** 31 - 1)                    # ftoin saturates to int32
    q = np.clip(r.astype(np.int64) + rq.zero_point, rq.lo, rq.hi)
    return q.astype(rq.out_dtype)


@dataclass(frozen=True)
class GemmShape:
    M: int
    N: int
    K: int
    batch: int = 1
    a_dtype: str = "float32"
    b_dtype: str = "float32"
    transpose_b: bool = False
    bias: bool = False
    activation: object = None          # None | "relu" | ("clip", lo, hi)
    num_qpus: int = 12
    a_batch_stride_elems: int | None = None   # default M*K (0: A broadcast over the batch)
    b_batch_stride_elems: int | None = None   # default K*N (0: B broadcast over the batch)
    #: "n": bias[n] per column (dense layers); "m": bias[m] per row, broadcast through unifa
    #: (convolution: one bias per output channel), with ``bias_batch_stride`` elements per z
    bias_axis: str = "n"
    bias_batch_stride: int = 0
    #: implicit operands (convolution): lane n of B starts at table[n] bytes past the B data of
    #: batch z; a block of U k-steps advances by ``b_block[0]`` bytes and k-step i of a block
    #: sits ``b_block[1][i]`` bytes past the block (None: row-major / transposed B)
    b_table: bool = False
    b_block: tuple | None = None
    #: how the A values reach the lanes: "unifa" (the unifa stream, ``ldunifarf``) or "tmu"
    #: (vector TMU lookups with every lane at the same address, popped with ``ldtmu``; see
    #: :data:`A_STREAMS`)
    a_stream: str = "unifa"
    #: requantize epilogue to 8-bit outputs (integer GEMMs only; None: int32 / float32 out)
    requant: Requant | None = None
    #: dtype of a compile-time A panel (a convolution's weights) when narrower than 32 bits: the
    #: "tmu" A stream reads each k-step's column with the TMU's sign- / zero-extending 8/16-bit
    #: load (configured together with the B row's), so int8 weights move a quarter of the bytes.
    #: None: 32-bit panel words (the "unifa" stream's uniforms are always 32-bit)
    a_panel_dtype: str | None = None
    #: packed constant B (a dense layer's weights): bits per weight value (4 or 2; None: the
    #: width of ``b_dtype``). ``b_dtype`` (int8 / uint8) says whether the values are signed; the
    #: plan packs them (:func:`pack_weights`, :data:`PACKED_BITS`) and the K loop unpacks them in
    #: registers
    b_bits: int | None = None
    #: packed compile-time A panel (a convolution's weights) in the "tmu" A stream: bits per value
    #: (4 or 2; ``a_dtype`` int8 / uint8 says the sign). Each U-k-step block of a panel row is
    #: ceil(U / G) words (:func:`pack_panel_block`); one lookup feeds G k-steps of R rows
    a_bits: int | None = None
    #: block-wise scaled packed B (ONNX block-wise DequantizeLinear along K): every ``k_block``
    #: k-steps the integer accumulators are converted to float, multiplied by that block's
    #: per-column scale and added to float accumulators (output float32); the scales are one
    #: more word row after each block's packed words (:func:`pack_b_blockwise`). None: off
    k_block: int | None = None

    @property
    def a_packed(self) -> bool:
        return self.a_bits is not None

    @property
    def a_group(self) -> int:
        return 32 // self.a_bits if self.a_packed else 1

    @property
    def b_packed(self) -> bool:
        return self.b_bits is not None

    @property
    def b_group(self) -> int:
        """k-steps per B lookup: 32 // b_bits values of consecutive k-steps per packed word."""
        return 32 // self.b_bits if self.b_packed else 1

    @property
    def b_signed(self) -> bool:
        return self.b_dtype != "uint8"

    @property
    def is_int(self) -> bool:
        return self.a_dtype in INT_DTYPES

    @property
    def out_dtype(self) -> str:
        if self.k_block is not None:
            return "float32"
        if self.requant is not None:
            return self.requant.out_dtype
        return "int32" if self.is_int else "float32"

    @property
    def out_es(self) -> int:
        """Bytes per output element."""
        return ITEMSIZE[self.out_dtype]

    @property
    def a_panel_es(self) -> int:
        """Bytes per A panel element (packed: per word)."""
        return 4 if self.a_panel_dtype is None else ITEMSIZE[self.a_panel_dtype]

    def a_block_words(self, U: int) -> int:
        """Packed A: words per panel row and U-k-step block (ceil(U / G))."""
        return -(-U // self.a_group)

    @property
    def kstep_config(self) -> bool:
        """Each k-step's lookups need a TMU config write (an 8/16-bit B row or A column)."""
        return (self.b_dtype in SMALL_INT and not self.b_packed) or self.a_panel_dtype is not None

    @property
    def scale_lookup(self) -> bool:
        """A per-column requantize scale vector is looked up at each tile start."""
        return self.requant is not None and self.requant.axis == "n"

    @property
    def vec_n(self) -> bool:
        """Per-column vectors (an n-axis bias or scale) are read at each column tile."""
        return (self.bias and self.bias_axis == "n") or (self.requant is not None and self.requant.axis == "n")

    @property
    def a_bstride(self) -> int:
        return self.M * self.K if self.a_batch_stride_elems is None else self.a_batch_stride_elems

    @property
    def b_bstride(self) -> int:
        return self.K * self.N if self.b_batch_stride_elems is None else self.b_batch_stride_elems


@dataclass(frozen=True)
class GemmTiling:
    R: int          # rows per tile (accumulator registers)
    U: int          # k-steps per loop iteration
    PF: int         # B rows in flight
    Kpad: int       # K rounded up to a multiple of U
    MT: int
    NT: int
    Wm: int
    Wn: int
    #: the requantize parameters (scale, zero point, bounds, store config) stay in registers loaded
    #: once per worker; False: the epilogue reads them through the unifa stream each tile
    #: (:func:`requant_block`) when holding them would cost rows per tile (R) or unroll (U)
    rq_regs: bool = False



def _worker_grid(MT: int, NT: int, W: int):
    best = None
    for wm in range(1, min(MT, W) + 1):
        wn = max(1, min(NT, W // wm))
        rounds = math.ceil(MT / wm) * math.ceil(NT / wn)
        key = (rounds, -(wm * wn), wm)
        if best is None or key < best[0]:
            best = (key, wm, wn)
    return best[1], best[2]


def _registers_needed(s: GemmShape, R: int, U: int, PF: int, rq_regs: bool = False) -> int:
    """Registers GemmRegs allocates for this configuration (must stay <= 64)."""
    F = U // s.b_group                                      # B lookups per block
    base = 24 + (1 if F < PF else 0) + (1 if s.b_table else 0)
    extra = (2 if s.bias else 0) + (2 if isinstance(s.activation, tuple) else 0) \
        + (1 if s.kstep_config else 0) + (2 * ring_size(U) + 1 if s.a_stream == "tmu" else 0) \
        + _requant_registers(s, rq_regs) + (3 if s.b_packed else 1 if s.a_packed else 0)
    blockwise = (R + 2) if s.k_block else 0                 # float accumulators, scale, its fetch
    return base + extra + F + 5 + R + blockwise


def _requant_registers(s: GemmShape, rq_regs: bool = False) -> int:
    """Registers of the requantize epilogue held across the K loop: the parameter block pointer
    (:func:`requant_block`), or with ``rq_regs`` the parameters themselves (zero point, bounds,
    store config, a per-tensor scale); n axis: + the scale vector's worker base, tile pointer and
    the popped vector; the 4-byte-vector column step when outputs are 8-bit and a vector is per column."""
    rq = s.requant
    if rq is None:
        return 0
    n = (4 + (rq.axis is None) if rq_regs else 1) + {None: 0, "m": 0, "n": 3}[rq.axis]
    return n + (1 if s.vec_n and s.out_es != 4 else 0)


#: A-operand variants. "unifa": the R values of a k-step arrive broadcast through the unifa
#: stream from the packed panel (``ldunifarf``; its speed hinges on the uniform cache). "tmu":
#: the k-step's A column (R values of the panel) is one per-lane TMU lookup (lane i holds
#: A[m0 + i, k]; one FIFO word per k-step, so B and A run ``PF`` k-steps ahead), and
#: ``shuffle(a, col, i)`` broadcasts row i within the QPU: a row costs two instructions (shuffle
#: and accumulate on the add ALU, the multiply on the mul ALU) instead of one, and nothing waits
#: on the uniform stream. :func:`choose_variant` picks the variant with the lower estimate.
A_STREAMS = ("unifa", "tmu")


def ring_size(U: int) -> int:
    """B rows / A columns in the "tmu" variant's register rings: the smallest factor >= 2 of the
    unroll U (k-step j of a block uses entry j mod P, so the pattern repeats every block)."""
    if U < 2:
        raise ValueError("the tmu A-stream variant needs an unroll of at least 2 k-steps (K has no such factor)")
    return next(p for p in range(2, U + 1) if U % p == 0)


#: rows per tile a packed A panel needs: the word pop, the unpack (two add-ALU ops) and the moved
#: accumulations use the last rows of a k-step, after its lookups (:func:`_kstep_tmu_packed`)
PACKED_A_MIN_ROWS = 6


def _a_word_starts(s: GemmShape, U: int) -> list:
    """Block-relative k-steps that start a packed A word."""
    return list(range(0, U, s.a_group))


def _packed_a_prefetch(s: GemmShape, U: int) -> int:
    """B rows in flight with a packed A panel: the most whose window also holds its A words
    (the words starting among those rows) and the tile's bias / scale lookups in the thread's
    TMU FIFO share."""
    starts = set(_a_word_starts(s, U))
    bias_words = (1 if s.bias and s.bias_axis != "m" else 0) + (1 if s.scale_lookup else 0)
    best = 1
    for p in range(1, U + 1):
        words = max(sum((r % U) in starts for r in range(q, q + p)) for q in range(U))
        if p + words + bias_words <= TMU_FIFO_WORDS:
            best = p
    return best


def _packed_a_drain(s: GemmShape, t: GemmTiling) -> int:
    """A words fetched past the end of the K loop (starts among the PF - 1 rows past Kpad)."""
    starts = set(_a_word_starts(s, t.U))
    return sum((r % t.U) in starts for r in range(1, t.PF))


def b_fetches(s: GemmShape, t: GemmTiling) -> int:
    """B lookups per K-loop block: U (one B row per k-step), or U / b_group packed words (+ the
    block's scale row with ``k_block``)."""
    return t.U // s.b_group + (1 if s.k_block else 0)


def check_packed_shape(s: GemmShape):
    """Refuse packed B where the kernel has no packed path (ValueError with the reason)."""
    packed_range(s.b_bits, s.b_signed)
    if s.b_dtype not in ("int8", "uint8"):
        raise ValueError(f"packed {s.b_bits}-bit weights are given as int8 / uint8 values, not {s.b_dtype}")
    if s.a_dtype not in SMALL_INT:
        raise ValueError(f"packed weights need 8/16-bit integer activations, not {s.a_dtype}")
    if s.a_stream != "unifa" or s.b_table or s.b_block is not None:
        raise ValueError("packed B weights run in the unifa A-stream variant of a plain GEMM only")


def check_blockwise_shape(s: GemmShape):
    """Refuse a block-wise scaled GEMM the kernel cannot run (ValueError with the reason)."""
    B = s.k_block
    if not s.b_packed:
        raise ValueError("block-wise scales (k_block) need packed constant B weights (b_bits 8, 4 or 2)")
    check_packed_shape(s)
    if not isinstance(B, int) or B <= 0 or B % s.b_group:
        raise ValueError(f"k_block {B!r}: the scale block must be a positive multiple of the "
                         f"{s.b_group} k-steps one packed {s.b_bits}-bit word holds")
    if B > BLOCKWISE_MAX_BLOCK:
        raise ValueError(f"k_block {B}: blocks longer than {BLOCKWISE_MAX_BLOCK} k-steps are not unrolled")
    if s.K % B:
        raise ValueError(f"K={s.K} is not a multiple of the scale block {B}")
    if s.bias or s.activation is not None or s.requant is not None or s.transpose_b or s.batch != 1:
        raise ValueError("block-wise scales run a plain float32-output GEMM only (no bias, activation, "
                         "requantize, transposed or batched B)")


#: the longest scale block the K loop unrolls (one block per loop iteration)
BLOCKWISE_MAX_BLOCK = 256


def _choose_tiling_blockwise(s: GemmShape) -> GemmTiling:
    """Tiling of a block-wise scaled packed GEMM: one scale block per K-loop iteration (U =
    k_block), all of the TMU FIFO in flight, as many rows per tile as the registers hold."""
    check_blockwise_shape(s)
    PF = TMU_FIFO_WORDS
    U = s.k_block
    R = min(16, s.M)
    while R > 0 and _registers_needed(s, R, U, PF) > 64:
        R -= 1
    if R == 0:
        raise ValueError(f"block-wise GEMM with k_block {U}: {U // s.b_group + 1} lookups per block "
                         "leave no registers for an accumulator row")
    MT, NT = -(-s.M // R), -(-s.N // 16)
    Wm, Wn = _worker_grid(MT, NT, max(1, s.num_qpus))
    return GemmTiling(R, U, PF, s.K, MT, NT, Wm, Wn, False)


def _choose_tiling_packed(s: GemmShape) -> GemmTiling:
    """Tiling of a packed-B GEMM: a block is F packed words (F in 1, 2, 4: U = F G k-steps, K
    padded to whole blocks with zero weights), PF words in flight (all of the thread's TMU FIFO
    beside the tile's bias / scale lookups: a word feeds G k-steps, so few words cover the
    round trip)."""
    check_packed_shape(s)
    G = s.b_group
    words = -(-s.K // G)
    F = 1 if words <= 1 else 2 if words == 2 else 4
    bias_words = (1 if s.bias and s.bias_axis != "m" else 0) + (1 if s.scale_lookup else 0)
    PF = TMU_FIFO_WORDS - bias_words
    R = min(16, s.M)
    while F > 1 and _registers_needed(s, R, F * G, PF) > 64:
        F //= 2
    while _registers_needed(s, R, F * G, PF) > 64:
        R -= 1
    U = F * G
    Kpad = -(-s.K // U) * U
    MT, NT = -(-s.M // R), -(-s.N // 16)
    Wm, Wn = _worker_grid(MT, NT, max(1, s.num_qpus))
    return GemmTiling(R, U, PF, Kpad, MT, NT, Wm, Wn, _rq_regs_fit(s, R, U, PF))


def choose_tiling(s: GemmShape, PF: int = 4) -> GemmTiling:
    if s.a_stream not in A_STREAMS:
        raise ValueError(f"a_stream must be one of {A_STREAMS}, got {s.a_stream!r}")
    if s.k_block is not None:
        return _choose_tiling_blockwise(s)
    if s.b_packed:
        return _choose_tiling_packed(s)
    if s.a_packed:
        packed_range(s.a_bits, s.a_dtype != "uint8")
        if s.a_stream != "tmu" or s.b_block is None or s.a_dtype not in ("int8", "uint8") \
                or s.a_panel_dtype is not None or s.M < PACKED_A_MIN_ROWS:
            raise ValueError("a packed A panel runs in the tmu A stream of a convolution with int8 / uint8 "
                             f"weights and at least {PACKED_A_MIN_ROWS} output channels")
    if s.a_panel_dtype is not None and (s.a_stream != "tmu" or s.a_panel_dtype not in SMALL_INT
                                        or s.a_dtype != s.a_panel_dtype):
        raise ValueError(f"an {s.a_panel_dtype} A panel needs the tmu A stream and {s.a_panel_dtype} A")
    R = min(16, s.M)
    if s.a_stream == "tmu":
        # 2 FIFO words per k-step (B row + A column) within the thread's share of the TMU output
        # FIFO, which the tile prologue's per-column bias lookup also holds while the first PF
        # k-steps are issued
        bias_words = (1 if s.bias and s.bias_axis != "m" else 0) + (1 if s.scale_lookup else 0)
        PF = (TMU_FIFO_WORDS - bias_words) // 2
    if s.b_block is not None:
        U = len(s.b_block[1])
        if s.K % U:
            raise ValueError(f"K={s.K} is not a multiple of the block of {U} k-steps")
        if s.a_stream == "tmu":
            ring_size(U)
        PF = min(PF, U)
        if s.a_packed:
            PF = _packed_a_prefetch(s, U)
        while _registers_needed(s, R, U, PF) > 64 and R > 1:
            R -= 1
        if s.a_packed and R < PACKED_A_MIN_ROWS:
            raise ValueError(f"a packed A panel needs {PACKED_A_MIN_ROWS} rows per tile (R = {R})")
        MT, NT = -(-s.M // R), -(-s.N // 16)
        Wm, Wn = _worker_grid(MT, NT, max(1, s.num_qpus))
        return GemmTiling(R, U, PF, s.K, MT, NT, Wm, Wn, _rq_regs_fit(s, R, U, PF))
    if s.is_int or (not s.transpose_b and s.batch == 1):
        U = 8 if s.K > 32 else 4 if s.K > 8 else 2  # padded B rows are zeros: padding is exact
    else:
        # fp32 with transposed or batched B: rows past K are real data (inf * 0 = NaN), so K
        # itself must be a multiple of U.
        U = next(u for u in (8, 4, 2, 1) if s.K % u == 0)
    if s.a_stream == "tmu":
        ring_size(U)
        PF = min(PF, U)                                     # the prologue addresses rows off[U - PF + r]
    while U > 4 and _registers_needed(s, R, U, PF) > 64:
        U //= 2
    while _registers_needed(s, R, U, PF) > 64 and s.a_stream != "tmu":
        R -= 1
    Kpad = -(-s.K // U) * U
    MT, NT = -(-s.M // R), -(-s.N // 16)
    Wm, Wn = _worker_grid(MT, NT, max(1, s.num_qpus))
    return GemmTiling(R, U, PF, Kpad, MT, NT, Wm, Wn, _rq_regs_fit(s, R, U, PF))


def _rq_regs_fit(s: GemmShape, R: int, U: int, PF: int) -> bool:
    """Hold the requantize parameters in registers (no per-tile unifa read) when they fit beside
    the tiling chosen without them; m-axis row scales always come through the unifa stream."""
    return s.requant is not None and s.requant.axis != "m" and _registers_needed(s, R, U, PF, True) <= 64


# ------------------------------------------------------------------------------------------------
# Register allocation
# ------------------------------------------------------------------------------------------------
# shared with the other kernel modules (older names kept as aliases)
_Pool = RegisterPool


class GemmRegs:
    def __init__(self, s: GemmShape, t: GemmTiling):
        p = _Pool()
        for name in ("lane", "a_ptr", "a_mstep", "b_ptr", "b_nstep", "bks_u", "c_ptr", "c_mstep",
                     "c_nstep", "crs", "mt", "nt", "mrem", "mrem_step",
                     "nrem", "nrem_step", "kblocks", "bp", "cp", "cnt", "tq", "nb", "nc", "nn"):
            setattr(self, name, p.take())
        F = b_fetches(s, t)
        self.bks = p.take() if F < t.PF else None        # prologue row walk (else via off[])
        self.bias_ptr = p.take() if s.bias else None    # n-axis: per worker; m-axis: per m-tile
        self.nbias = p.take() if s.bias else None       # n-axis: per n-tile; m-axis: m step
        self.bzb = p.take() if s.b_table else None      # B data base of this batch entry
        clip = isinstance(s.activation, tuple)
        self.lo, self.hi = (p.take(), p.take()) if clip else (None, None)
        self.cfg1 = p.take() if s.kstep_config else None   # tmuc word: a k-step's 8/16-bit lookups
        rq = s.requant
        self.rq_ptr = self.rq_sptr = self.rq_ns = self.rq_sv = None
        self.rq_held = None
        if rq is not None:
            if t.rq_regs:                                   # the parameters themselves
                self.rq_held = dict(zip(("zp", "lo", "hi", "cfg"), p.take(4)))
                if rq.axis is None:
                    self.rq_held["s"] = (p.take(), None)
            else:
                self.rq_ptr = p.take()                      # parameter block (of this m-tile)
            if rq.axis == "n":
                self.rq_sptr, self.rq_ns, self.rq_sv = p.take(3)   # worker base, tile pointer, vector
        # column step of the 4-byte per-column vectors (the C step when outputs are 4-byte)
        self.vstep = p.take() if s.vec_n and s.out_es != 4 else None
        self.off = p.take(F)
        # packed B: the current word (next value in its top bits), the shl / extract amounts
        # (packed A: ``bw`` is the A word of the k-step's lanes; its shifts are small immediates,
        # its unpack instructions carry no signal)
        self.bw, self.csh, self.cext = p.take(3) if s.b_packed else (None, None, None)
        if s.a_packed:
            self.bw = p.take()
        self.t = p.take(2)
        self.ab = p.take(2)
        self.bv = p.take()
        if s.a_stream == "tmu":                         # A through the TMU
            P = ring_size(t.U)
            self.ap, self.astep = p.take(2)
            self.bvs = [self.bv] + p.take(P - 1)         # B rows by k-step mod P
            self.avec = p.take(P)                       # A columns by k-step mod P
        self.acc = p.take(t.R)
        # block-wise scales: the float accumulators and the popped scale row
        self.facc, self.sc = (p.take(t.R), p.take()) if s.k_block else (None, None)
        if self.vstep is None:
            self.vstep = self.c_nstep


# ------------------------------------------------------------------------------------------------
# Uniforms
# ------------------------------------------------------------------------------------------------
def gemm_uniforms(s: GemmShape, t: GemmTiling, a_name: str, b_name: str, c_name: str,
                  bias_name: str | None, mt0: int = 0, whole: tuple | None = None,
                  scale_name: str = "scale"):
    """The uniform stream of the GEMM launch, in the order the prologue reads it. A row block
    (:func:`split_rows`) passes its first row tile ``mt0`` and the ``(shape, tiling)`` of the
    whole GEMM: A panel, C (and an m-axis bias) start ``mt0`` tiles in, batch strides are the
    whole GEMM's."""
    ws, wt = whole if whole is not None else (s, t)
    es_b = ITEMSIZE[s.b_dtype]
    pes = s.a_panel_es
    a_tile = a_panel_tile_bytes(s, t)
    if s.a_bstride == 0:                        # A shared by every batch entry
        a_bs = 0
    elif a_name.endswith("_panel"):
        a_bs = wt.MT * a_tile
    else:                                       # M == 1: A itself is the panel
        a_bs = s.a_bstride * 4
    bks_u, taps = block_offsets(s, t)
    oes = s.out_es
    c_tile = t.R * s.N * oes
    if s.b_table:                               # B lane bases come from the table b_name + "_table"
        b_ls, b_bs = 4, 0
        b_addr = ("addr", b_name + "_table", 0)
    elif s.b_packed:                            # packed words: lane n reads column n of a word row
        rows, lanes = packed_b_layout(s, t)
        b_ls, b_bs = 4, (rows * lanes * 4 if s.b_bstride else 0)
        b_addr = ("addr", b_name, 0)
    else:
        b_ls = s.K * es_b if s.transpose_b else es_b
        b_bs = s.b_bstride * es_b
        b_addr = ("addr", b_name, 0)
    b_tile = 16 * b_ls
    u = [("addr", a_name, mt0 * a_tile), ("u32", a_bs), ("u32", a_tile), ("u32", t.Wm * a_tile),
         b_addr, ("u32", b_bs), ("u32", b_ls), ("u32", b_tile), ("u32", t.Wn * b_tile)]
    if s.b_table:
        u += [("addr", b_name, 0), ("u32", s.b_bstride * es_b)]
    F = b_fetches(s, t)
    u += ([("u32", bks_u // F)] if F < t.PF else []) + [("u32", bks_u),
          ("addr", c_name, mt0 * c_tile), ("u32", ws.M * ws.N * oes), ("u32", c_tile), ("u32", t.Wm * c_tile),
          ("u32", t.Wn * 16 * oes), ("u32", s.N * oes)]
    if s.bias and s.bias_axis == "n":
        u.append(("addr", bias_name, 0))
    rq = s.requant
    if rq is not None and rq.axis == "n":
        u.append(("addr", scale_name, 0))
    u += [("u32", s.M), ("u32", t.R),
          ("u32", t.Wm * t.R), ("u32", s.N), ("u32", t.Wn * 16), ("u32", t.Kpad // t.U)]
    if isinstance(s.activation, tuple):
        kind = "u32" if s.is_int else "f32"
        u += [(kind, s.activation[1]), (kind, s.activation[2])]
    if s.kstep_config:
        u.append(("u32", kstep_config_word(s)))
    if s.b_packed:                              # shl to the next field, extract the top field
        u += [("u32", s.b_bits), ("u32", 32 - s.b_bits)]
    for j in range(F):          # lookup j of a block fetches lookup j + PF; bp already advanced
        q, r = divmod(j + t.PF, F)
        u.append(("u32", ((q - 1) * bks_u + taps[r]) & 0xFFFFFFFF))
    if s.bias and s.bias_axis == "m":
        u += [("addr", bias_name, mt0 * t.R * 4), ("u32", s.bias_batch_stride * 4), ("u32", t.R * 4),
              ("u32", t.Wm * t.R * 4)]
    if s.a_stream == "tmu":
        u.append(("u32", pes * t.R))                        # A column step per k-step
    if rq is not None and t.rq_regs:
        u += [("u32", int(w)) for w in requant_params(s)]
        if rq.axis is None:
            u.append(("f32", float(np.float32(rq.scale))))
    elif rq is not None:
        blk = requant_block_words(s, t) * 4
        u.append(("addr", REQUANT_BLOCK, mt0 * blk if rq.axis == "m" else 0))
        if rq.axis == "m":
            u.append(("u32", blk))
    if s.vec_n and s.out_es != 4:
        u.append(("u32", t.Wn * 64))
    return u


#: the plan's constant buffer of requantize parameters the epilogue reads through the unifa stream
REQUANT_BLOCK = "requant"
_REQUANT_TAIL = 4                # zero point, lo - zp, hi - zp, store config


def relu_folded(s: GemmShape) -> bool:
    """A ReLU before the requantize is its clamp's lower bound instead (``lo = max(lo, zp)``):
    with a positive multiplier ``round(max(acc, 0) * m) = max(round(acc * m), 0)``."""
    return s.requant is not None and s.activation == "relu"


def requant_params(s: GemmShape) -> np.ndarray:
    """``[zp, lo - zp, hi - zp, store config]`` as uint32 words (lo raised to zp for a folded ReLU)."""
    rq = s.requant
    lo = max(rq.lo, rq.zero_point) if relu_folded(s) else rq.lo
    w = np.array([rq.zero_point, lo - rq.zero_point, rq.hi - rq.zero_point, STORE8_CONFIG], np.int64)
    return (w & 0xFFFFFFFF).astype(np.uint32)


def requant_block_words(s: GemmShape, t: GemmTiling) -> int:
    """Words of one parameter block of :func:`requant_block` (one per m-tile on the m axis)."""
    return {None: 1, "m": 1 + t.R, "n": 0}[s.requant.axis] + _REQUANT_TAIL


def requant_block(s: GemmShape, t: GemmTiling, scale=None) -> np.ndarray:
    """The requantize parameters as the epilogue reads them (uint32 words, float32 scales as bits):
    per tensor ``[scale, zp, lo - zp, hi - zp, cfg]``; m axis one block per m-tile
    ``[step, scale of rows m0 .. m0 + R - 1 (1.0 past M), zp, lo - zp, hi - zp, cfg]`` (step: bytes
    to this worker's next m-tile block, Wm blocks, read when the worker moves on); n axis
    ``[zp, lo - zp, hi - zp, cfg]`` (its scales are the per-column ``scale`` vector); + 16 words
    of the uniform stream's look-ahead. Per-channel ``scale`` values must be finite and positive."""
    rq = s.requant
    tail = requant_params(s)
    if rq.axis == "n":
        blocks = [tail]
    else:
        if rq.axis is None:
            rows = np.array([rq.scale], np.float32).reshape(1, 1)
        else:
            sc = np.asarray(scale, np.float32).reshape(-1)
            if sc.size != s.M or not np.all(np.isfinite(sc) & (sc > 0)):
                raise ValueError(f"requantize scale: {s.M} finite positive float32 values wanted, got {sc.size}")
            rows = np.ones(t.MT * t.R, np.float32)
            rows[: s.M] = sc
            rows = rows.reshape(t.MT, t.R)
        head = [np.array([t.Wm * requant_block_words(s, t) * 4], np.uint32)] if rq.axis == "m" else [
            np.zeros(0, np.uint32)]
        blocks = [np.concatenate(head + [r.view(np.uint32), tail]) for r in rows]
    return np.concatenate(blocks + [np.zeros(16, np.uint32)])


def kstep_config_word(s: GemmShape) -> int:
    """The tmuc word written before a k-step's lookups: the B row's type (byte 0), then in the
    "tmu" stream the A column's (byte 1); 0xff bytes are the default 32-bit lookups."""
    b = tmu_config(s.b_dtype) if s.b_dtype in SMALL_INT else 0xFF
    if s.a_stream != "tmu":
        return 0xFFFFFF00 | b
    a = tmu_config(s.a_panel_dtype) if s.a_panel_dtype is not None else 0xFF
    return 0xFFFF0000 | (a << 8) | b


def a_panel_tile_bytes(s: GemmShape, t: GemmTiling) -> int:
    """Bytes of one m-tile of the A panel: Kpad k-steps of R values, or (packed) Kpad / U
    blocks of ceil(U / G) words of R lanes."""
    if s.a_packed:
        return t.Kpad // t.U * s.a_block_words(t.U) * t.R * 4
    return t.Kpad * t.R * s.a_panel_es


def packed_b_layout(s: GemmShape, t: GemmTiling) -> tuple:
    """(word rows, lanes) of one batch entry of packed B (:func:`pack_weights`): Kpad / G rows
    + PF zero rows the prefetch reads past the end, NT * 16 columns (16 lanes: one 64-byte line
    per lookup); with ``k_block`` + one scale row per block."""
    scale_rows = t.Kpad // t.U if s.k_block else 0
    return t.Kpad // s.b_group + scale_rows + t.PF, t.NT * 16


def block_offsets(s: GemmShape, t: GemmTiling):
    """(bytes a block of U k-steps advances B, byte offset of each k-step within a block)."""
    if s.b_block is not None:
        return int(s.b_block[0]), [int(v) for v in s.b_block[1]]
    if s.b_packed:                              # F word rows per block
        row = packed_b_layout(s, t)[1] * 4
        return b_fetches(s, t) * row, [i * row for i in range(b_fetches(s, t))]
    es_b = ITEMSIZE[s.b_dtype]
    bks = es_b if s.transpose_b else s.N * es_b
    return t.U * bks, [i * bks for i in range(t.U)]


# ------------------------------------------------------------------------------------------------
# The GEMM kernel
# ------------------------------------------------------------------------------------------------
def gemm_kernel(s: GemmShape, t: GemmTiling):
    """Emit the GEMM program (call inside a Program)."""
    g = GemmRegs(s, t)
    ld = lambda r: S["ldunifrf"](r)  # noqa: E731
    tmp = g.tq

    # ---- prologue: uniforms, this worker's starting pointers -------------------------------
    eidx(g.lane, sig=ld(g.a_ptr))                           # a_base
    mov(g.mt, RF[2].unpack("ul"), sig=ld(tmp))              # z ; tmp = a_batch_stride
    umul24(tmp, tmp, g.mt)
    add(g.a_ptr, g.a_ptr, tmp, sig=ld(tmp))                 # tmp = a_tile_stride
    mov(g.nt, RF[3].unpack("uh"))                                    # wm
    umul24(tmp, tmp, g.nt)
    add(g.a_ptr, g.a_ptr, tmp, sig=ld(g.a_mstep))

    nop(sig=ld(g.b_ptr))
    nop(sig=ld(tmp))                                        # b_batch_stride
    umul24(tmp, tmp, g.mt)
    add(g.b_ptr, g.b_ptr, tmp, sig=ld(tmp))                 # tmp = b_lane_stride
    umul24(tmp, tmp, g.lane)
    add(g.b_ptr, g.b_ptr, tmp, sig=ld(tmp))                 # tmp = b_tile_stride
    mov(g.cp, RF[3].unpack("ul"))                           # wn
    umul24(tmp, tmp, g.cp)
    add(g.b_ptr, g.b_ptr, tmp, sig=ld(g.b_nstep))
    if s.b_table:
        nop(sig=ld(g.bzb))                                  # B data base
        nop(sig=ld(tmp))                                    # B data batch stride
        umul24(tmp, tmp, g.mt)
        add(g.bzb, g.bzb, tmp)
    if g.bks is not None:
        nop(sig=ld(g.bks))
    nop(sig=ld(g.bks_u))

    nop(sig=ld(g.c_ptr))
    nop(sig=ld(tmp))                                        # c_batch_stride
    umul24(tmp, tmp, g.mt)
    add(g.c_ptr, g.c_ptr, tmp, sig=ld(tmp))                 # tmp = c_tile_stride
    umul24(tmp, tmp, g.nt)
    add(g.c_ptr, g.c_ptr, tmp, sig=ld(g.c_mstep))
    cs = {1: 0, 4: 2}[s.out_es]                             # log2 of the output element size
    shl(tmp, g.cp, 4 + cs)                                  # 16 es * wn
    nop(sig=ld(g.c_nstep))
    add(g.c_ptr, g.c_ptr, tmp, sig=ld(g.crs))
    if cs:
        shl(g.bp, g.lane, cs)                               # es * lane
    else:
        mov(g.bp, g.lane)
    add(g.c_ptr, g.c_ptr, g.bp)
    if s.vec_n:                                             # 4-byte per-column vectors
        if cs != 2:
            shl(tmp, g.cp, 6)
            shl(g.bp, g.lane, 2)
        add(tmp, tmp, g.bp)                                 # 64 * wn + 4 * lane
    if s.bias and s.bias_axis == "n":
        nop(sig=ld(g.bias_ptr))
        add(g.bias_ptr, g.bias_ptr, tmp)
    if g.rq_ns is not None:
        nop(sig=ld(g.rq_sptr))
        add(g.rq_sptr, g.rq_sptr, tmp)

    nop(sig=ld(g.mrem))                                     # M
    mov(g.mt, g.nt, sig=ld(tmp))                            # mt = wm ; tmp = R
    umul24(tmp, tmp, g.mt)
    sub(g.mrem, g.mrem, tmp, sig=ld(g.mrem_step))           # mrem = M - wm * R
    shl(tmp, g.cp, 4)                                       # 16 * wn
    nop(sig=ld(g.nrem))                                     # N
    sub(g.nrem, g.nrem, tmp, sig=ld(g.nrem_step))           # nrem = N - 16 * wn
    nop(sig=ld(g.kblocks))
    if g.lo is not None:
        nop(sig=ld(g.lo))
        nop(sig=ld(g.hi))
    if g.cfg1 is not None:
        nop(sig=ld(g.cfg1))
    if g.csh is not None:
        nop(sig=ld(g.csh))
        nop(sig=ld(g.cext))
    for r in g.off:
        nop(sig=ld(r))
    if s.bias and s.bias_axis == "m":                       # bias + z * bs + wm * R * 4
        nop(sig=ld(g.bias_ptr))
        mov(g.cp, RF[2].unpack("ul"), sig=ld(tmp))          # z ; bias batch stride
        umul24(tmp, tmp, g.cp)
        add(g.bias_ptr, g.bias_ptr, tmp, sig=ld(tmp))       # tmp = R * 4
        umul24(tmp, tmp, g.mt)                              # mt == wm before the loops
        add(g.bias_ptr, g.bias_ptr, tmp, sig=ld(g.nbias))   # nbias = Wm * R * 4 (m step)
    if s.a_stream == "tmu":
        nop(sig=ld(g.astep))
    if g.rq_held is not None:                               # zp, lo - zp, hi - zp, cfg (, scale)
        for k in ("zp", "lo", "hi", "cfg"):
            nop(sig=ld(g.rq_held[k]))
        if "s" in g.rq_held:
            nop(sig=ld(g.rq_held["s"][0]))
    elif s.requant is not None:
        nop(sig=ld(g.rq_ptr))                               # parameter block
        if s.requant.axis == "m":                           # + wm blocks
            nop(sig=ld(tmp))
            umul24(tmp, tmp, g.mt)                          # mt == wm before the loops
            add(g.rq_ptr, g.rq_ptr, tmp)
    if g.vstep is not g.c_nstep:
        nop(sig=ld(g.vstep))

    # ---- tile loops ----------------------------------------------------------------------
    # loops run while rows / columns remain (mrem = M - mt*R, nn = N - nt*16)
    L.mloop
    sub(null, g.mrem, 1, cond="pushn")                      # A = no rows left
    b(R_.done, cond="anya")
    mov(g.nb, g.b_ptr)                                      # (delay slots)
    mov(g.nc, g.c_ptr)
    mov(g.nn, g.nrem)
    if s.bias and s.bias_axis == "n":
        mov(g.nbias, g.bias_ptr)
    if g.rq_ns is not None:
        mov(g.rq_ns, g.rq_sptr)

    L.nloop
    sub(null, g.nn, 1, cond="pushn")                        # A = no columns left
    b(R_.mnext, cond="anya")
    nop()
    nop()
    nop()

    _tile(s, t, g)

    add(g.nb, g.nb, g.b_nstep)
    add(g.nc, g.nc, g.c_nstep)
    b(R_.nloop, cond="always")
    sub(g.nn, g.nn, g.nrem_step)
    if s.bias and s.bias_axis == "n":
        add(g.nbias, g.nbias, g.vstep)
    else:
        nop()
    if g.rq_ns is not None:
        add(g.rq_ns, g.rq_ns, g.vstep)
    else:
        nop()

    L.mnext
    if s.requant is not None and s.requant.axis == "m":    # next block: its first word is the step
        prog = _current()
        pc = len(prog.items)
        mov(unifa, g.rq_ptr)
        while len(prog.items) - pc < 4:
            nop()
        nop(sig=S["ldunifarf"](g.tq))
        add(g.rq_ptr, g.rq_ptr, g.tq)
    add(g.a_ptr, g.a_ptr, g.a_mstep)
    b(R_.mloop, cond="always")
    add(g.c_ptr, g.c_ptr, g.c_mstep)
    sub(g.mrem, g.mrem, g.mrem_step)
    if s.bias and s.bias_axis == "m":
        add(g.bias_ptr, g.bias_ptr, g.nbias)
    else:
        nop()

    L.done
    tmuwt()
    thread_end()


def _mul(s: GemmShape):
    return "smul24" if s.is_int else "fmul"


def _acc_add(s: GemmShape):
    return A.DSL["add"] if s.is_int else A.DSL["fadd"]


def _tile(s: GemmShape, t: GemmTiling, g: GemmRegs):
    """One R x 16 output tile: prefetch, the K loop, activation and masked stores."""
    R, U, PF = t.R, t.U, t.PF
    mul, acc_add = _mul(s), _acc_add(s)
    small_b = s.kstep_config
    tmu_a = s.a_stream == "tmu"

    if tmu_a:
        _tile_prologue_tmu(s, t, g)
    else:
        _tile_prologue_unifa(s, t, g)
    if s.k_block:
        _zero_pairs(g.facc)

    # ---- K loop --------------------------------------------------------------------------
    kloop = f"k{len(_current().items)}"
    _current().label(kloop)
    block = []                                              # emitters, one per instruction
    # every k-step instruction carries a register-writing signal (no flags possible there), so
    # the counter (and the B pointer advance) get one instruction of their own per block
    block.append(lambda: sub(g.cnt, g.cnt, 1, cond="pushz").add(g.bp, g.bp, g.bks_u))
    for j in range(U):
        if tmu_a and s.a_packed:
            block += _kstep_tmu_packed(s, t, g, j, small_b)
        elif tmu_a:
            block += _kstep_tmu(s, t, g, j, mul, acc_add, small_b)
        elif s.b_packed:
            block += _kstep_packed(s, t, g, j)
        else:
            block += [_kstep_emitter(s, t, g, j, si, mul, acc_add, small_b) for si in range(R + 1)]
    while len(block) < 4:
        block.append(lambda: nop())
    branch_at = len(block) - 3
    for idx, emit in enumerate(block):
        if idx == branch_at:
            b(getattr(R_, kloop), cond="anyna")
        emit()
    if tmu_a:                                               # the last row's product
        acc_add(g.acc[R - 1], g.acc[R - 1], g.t[(R - 1) % 2])
    # drain what was fetched past the end: PF - 1 B rows (unifa), PF - 1 B rows and A columns (tmu)
    drain = (PF - 1) + (_packed_a_drain(s, t) if s.a_packed else (PF - 1) if tmu_a else 0)
    for _ in range(drain):
        nop(sig=S["ldtmu"](g.tq))
    if small_b:
        mov(tmuc, -1)                                       # stores: default 32-bit config bytes
    if s.k_block:                                           # the float sums are the tile's output
        for i in range(R):
            mov(g.acc[i], g.facc[i])
    _tile_epilogue(s, t, g)


def _zero_pairs(regs):
    """Zero ``regs``, two per instruction (add and mul ALU ``sub x, x, x``)."""
    for i in range(0, len(regs), 2):
        ins = sub(regs[i], regs[i], regs[i])
        if i + 1 < len(regs):
            ins.sub(regs[i + 1], regs[i + 1], regs[i + 1])


def _column_tile_base(s: GemmShape, g: GemmRegs):
    """``bp`` = this column tile's B base: from the per-lane base table (convolution's pixel table)
    or the tile's start address."""
    if s.b_table:                                           # lane bases of this column tile
        mov(tmua, g.nb)
        nop(sig=S["ldtmu"](g.tq))
        add(g.bp, g.bzb, g.tq)
    else:
        mov(g.bp, g.nb)


def _scale_ptr(g: GemmRegs):
    """Per-lane address of the column tile's requantize scales (n axis)."""
    return g.rq_ns


def _init_accumulators(s: GemmShape, R: int, g: GemmRegs, bias_m: bool):
    """Both variants' tile start: unless the per-row bias already filled them (unifa), the R
    accumulators start as the popped per-column bias row, or 0 (x - x); two per instruction."""
    if bias_m:
        if s.scale_lookup:
            nop(sig=S["ldtmu"](g.rq_sv))
        return
    if s.bias:
        nop(sig=S["ldtmu"](g.tq))
    if s.scale_lookup:                                      # the tile's scales (after the bias)
        nop(sig=S["ldtmu"](g.rq_sv))
    for i in range(0, R, 2):
        pair = [g.acc[i]] + ([g.acc[i + 1]] if i + 1 < R else [])
        if s.bias:
            ins = mov(pair[0], g.tq)
            if len(pair) > 1:
                ins.mov(pair[1], g.tq)
        else:
            ins = sub(pair[0], pair[0], pair[0])
            if len(pair) > 1:
                ins.sub(pair[1], pair[1], pair[1])


def _tile_prologue_tmu(s: GemmShape, t: GemmTiling, g: GemmRegs):
    """Tile start of the "tmu" variant: the n-axis bias, then k-steps 0..PF-1 in flight (B row,
    then the A column: lane i reads A[m0 + i, k] from the panel); pops the bias, B row 0 and A
    column 0, and zeroes the product the first k-step's first instruction adds."""
    R, PF = t.R, t.PF
    small_b = s.kstep_config
    bias_m = s.bias and s.bias_axis == "m"
    prog = _current()
    if bias_m:                                              # per-row bias: R values via unifa
        unifa_pc = len(prog.items)
        mov(unifa, g.bias_ptr)
    _column_tile_base(s, g)
    pshift = {1: 0, 2: 1, 4: 2}[s.a_panel_es]
    if pshift:
        shl(g.tq, g.lane, pshift)
    else:
        mov(g.tq, g.lane)
    add(g.ap, g.a_ptr, g.tq)                                # lane i: row m0 + i of the panel
    if s.bias and not bias_m:
        mov(tmua, g.nbias)
    if s.scale_lookup:
        mov(tmua, _scale_ptr(g))
    starts = _a_word_starts(s, t.U) if s.a_packed else range(PF)
    for r in range(PF):
        if small_b:
            mov(tmuc, g.cfg1)
        add(tmua, g.bp, g.off[t.U - PF + r])                # row r = off[U - PF + r] past bp
        if r in starts:                                     # A column r (packed: the word it starts)
            mov(tmua, g.ap).add(g.ap, g.ap, g.astep)
    if bias_m:
        while len(prog.items) - unifa_pc < 4:
            nop()
        for i in range(R):
            nop(sig=S["ldunifarf"](g.acc[i]))
    _init_accumulators(s, R, g, bias_m)
    last = g.t[(R - 1) % 2]
    sub(last, last, last, sig=S["ldtmu"](g.bv))             # B row 0; no product before k = 0
    if s.a_packed:                                          # A word 0: k-step 0's column
        mov(g.cnt, g.kblocks, sig=S["ldtmu"](g.bw))
        _unpack_op_signed(s.a_dtype != "uint8")(g.avec[0], g.bw, -s.a_bits)   # by 32 - bits (mod 32)
        shl(g.bw, g.bw, s.a_bits)
    else:
        mov(g.cnt, g.kblocks, sig=S["ldtmu"](g.avec[0]))    # A column 0


def _kstep_tmu(s, t, g, j, mul, acc_add, small_b):
    """Emitters of k-step j in the "tmu" variant. Row i takes two instructions: ``shuffle``
    broadcasts lane i of the A column (add ALU; its mul slot takes this k-step's lookups), then
    the multiply with the B row (mul ALU) beside the accumulation of row i - 1 (add ALU; row
    R - 1 of the previous k-step for i = 0), carrying the pops of the next B row and A column
    (in FIFO order: B, then A) on the last two rows. B rows and A columns rotate through rings
    of :func:`ring_size` registers by k-step."""
    R = t.R
    P = len(g.avec)
    bvj, bvn = g.bvs[j % P], g.bvs[(j + 1) % P]
    col, coln = g.avec[j % P], g.avec[(j + 1) % P]
    fetch = ([lambda i: i.mov(tmuc, g.cfg1)] if small_b else []) + [
        lambda i: i.add(tmua, g.bp, g.off[j]),              # B row k + PF
        lambda i: i.mov(tmua, g.ap),                        # A column k + PF
        lambda i: i.add(g.ap, g.ap, g.astep)]
    pops = {R - 2: bvn, R - 1: coln} if R >= 2 else {}
    out = []
    for i in range(R):
        def shuf(i=i, op=(fetch[i] if i < len(fetch) else None)):
            ins = A.DSL["shuffle"](g.ab[i % 2], col, i)
            if op is not None:
                op(ins)

        def mac(i=i):
            prev = g.acc[i - 1] if i else g.acc[R - 1]
            sig = S["ldtmu"](pops[i]) if i in pops else None
            ins = acc_add(prev, prev, g.t[(i - 1) % 2] if i else g.t[(R - 1) % 2], sig=sig)
            getattr(ins, mul)(g.t[i % 2], bvj, g.ab[i % 2])
        out += [shuf, mac]
    for op in fetch[R:]:                                    # few rows: the rest of the lookups
        out.append(lambda op=op: op(nop()))
    if R == 1:
        out.append(lambda: nop(sig=S["ldtmu"](bvn)))
        out.append(lambda: nop(sig=S["ldtmu"](coln)))
    return out


def _tile_prologue_unifa(s: GemmShape, t: GemmTiling, g: GemmRegs):
    """Tile start of the "unifa" variant: bias, the A stream, B rows 0..PF-1 in flight."""
    R, PF = t.R, t.PF
    small_b = s.kstep_config                                # 8/16-bit B rows (not packed words)
    F = b_fetches(s, t)
    bias_m = s.bias and s.bias_axis == "m"
    prog = _current()
    unifa_pc = len(prog.items)
    mov(unifa, g.bias_ptr if bias_m else g.a_ptr)           # per-row bias first, then the panel
    _column_tile_base(s, g)
    lookups = ([g.nbias] if s.bias and not bias_m else []) + ([_scale_ptr(g)] if s.scale_lookup else []) \
        + ["row"] * PF
    if g.bks is not None:
        mov(g.tq, g.bp)
    # signals to attach to the prefetch instructions: the per-row bias values (after the unifa
    # latency), then nothing; signals never share an instruction with a small immediate.
    pending = [g.acc[i] for i in range(R)] if bias_m else []

    def sig_for_next():
        if pending and len(prog.items) - unifa_pc >= 4:
            return S["ldunifarf"](pending.pop(0))
        return None

    row = 0
    for idx, what in enumerate(lookups):
        if small_b and what == "row":                       # this lookup only: 8/16-bit
            mov(tmuc, g.cfg1, sig=sig_for_next())
        if what != "row":
            mov(tmua, what, sig=sig_for_next())
        elif g.bks is not None:
            mov(tmua, g.tq, sig=sig_for_next()).add(g.tq, g.tq, g.bks)
        else:                                               # row r = off[U - PF + r] past bp
            add(tmua, g.bp, g.off[F - PF + row], sig=sig_for_next())
        row += what == "row"
    while pending:
        sig = sig_for_next()
        nop(sig=sig)
    if bias_m:
        unifa_pc = len(prog.items)
        mov(unifa, g.a_ptr)
    _init_accumulators(s, R, g, bias_m)
    while len(prog.items) - unifa_pc < 4:
        nop()
    nop(sig=S["ldunifarf"](g.ab[0]))                        # A[m0, 0]
    if s.b_packed:                                          # B word 0; k-step 0's value
        mov(g.cnt, g.kblocks, sig=S["ldtmu"](g.bw))
        _unpack_op(s)(g.bv, g.bw, g.cext)
    else:
        mov(g.cnt, g.kblocks, sig=S["ldtmu"](g.bv))         # B row 0


def _tile_epilogue(s: GemmShape, t: GemmTiling, g: GemmRegs):
    """Activation, stores (lanes < columns left; rows < rows left)."""
    R = t.R
    if not relu_folded(s):
        _activation(s, g, R)
    if s.requant is not None:
        _requantize(s, t, g)
    if R <= 15:
        sub(null, g.mrem, R, cond="pushn")                  # A = tile is partial in M
    else:
        sub(g.tq, g.mrem, 15)
        sub(null, g.tq, 1, cond="pushn")
    part = f"p{len(_current().items)}"
    b(getattr(R_, part), cond="anya")
    sub(null, g.lane, g.nn, cond="pushn")                   # (delay) A = lane < columns left
    mov(g.cp, g.nc)
    nop()
    for i in range(R):
        _store_data(s, g, g.acc[i], i)
        mov(tmua, g.cp, cond="ifa").add(g.cp, g.cp, g.crs)
    end = f"e{len(_current().items)}"
    b(getattr(R_, end), cond="always")
    nop()
    nop()
    nop()
    _current().label(part)                                  # partial tile: row i needs mrem > i
    for i in range(R - 1):                                  # (mrem < R: row R-1 is never stored)
        if i >= 1:
            sub(null, g.lane, g.nn, cond="pushn")           # lane mask -> moves to B below
            sub(null, g.mrem, i + 1, cond="pushn")          # A = mrem < i + 1: no more rows
            b(getattr(R_, end), cond="anya")
            nop()
            nop()
            nop()
            cond = "ifb"
        else:
            cond = "ifa"
        _store_data(s, g, g.acc[i], i)
        mov(tmua, g.cp, cond=cond).add(g.cp, g.cp, g.crs)
    _current().label(end)
    if s.requant is not None:
        mov(tmuc, -1)                                       # later lookups: default 32-bit config


def _store_data(s: GemmShape, g: GemmRegs, reg, row: int):
    """Queue output row ``row``'s store data; 8-bit outputs configure the next four stores first
    (every fourth row: the TMU writes the low byte of each lane's word)."""
    if s.requant is not None and row % 4 == 0:
        mov(tmuc, _requant_temps(g)["cfg"])
    mov(tmud, reg)


def _requant_temps(g: GemmRegs) -> dict:
    """Registers holding the requantize parameters in the epilogue: the ones loaded once per worker
    (GemmTiling.rq_regs), or registers the finished K loop frees (the unifa block's)."""
    if g.rq_held is not None:
        return g.rq_held
    return {"s": g.t, "zp": g.ab[0], "lo": g.ab[1], "hi": g.bp, "cfg": g.cnt}


def _requantize(s: GemmShape, t: GemmTiling, g: GemmRegs):
    """The :class:`Requant` epilogue on the R accumulators, in place: ``itof``, ``fmul`` by the
    scale, ``ftoin``, the clamp to ``[lo - zp, hi - zp]``, + zp (the clamp before the add: a
    saturated ``ftoin`` cannot wrap); ``ftoin`` of row i - 1 shares an instruction with the
    ``fmul`` of row i. The parameters (zp, the bounds, the store config, a per-tensor scale) stay
    in registers when they fit beside the tiling (``GemmTiling.rq_regs``); otherwise, and always
    for m-axis row scales, they arrive through the unifa stream (:func:`requant_block`),
    redirected here (the K loop's A stream is finished; the next tile points it back) into
    registers the K loop frees, so the epilogue holds one register across the K loop instead of
    six: fewer rows per tile cost more than these reads (a 32 -> 32 channel conv ran 196 us
    emulated with R = 10 against 121 us at R = 16), while the read's latency costs each tile a
    uniform round trip (a 1 -> 8 channel conv over 64 images: 61.8 us through unifa, 56.6 us held,
    55.8 us with int32 outputs). n-axis scales are the column tile's vector, looked up with the
    bias at the tile start. A ReLU is folded into the clamp (:func:`relu_folded`)."""
    R = t.R
    rq = s.requant
    ops = A.DSL
    acc = g.acc
    tp = _requant_temps(g)
    S0, S1 = tp.get("s", (None, None))                 # (n axis: the vector rq_sv)
    ld = S["ldunifarf"]
    prog = _current()
    held = g.rq_held is not None
    pc = len(prog.items)
    if not held:
        mov(unifa, g.rq_ptr)
    for i in range(R):
        ins = ops["itof"](acc[i], acc[i])
        if rq.axis == "n" and i:                            # the column scales are in a register
            ins.fmul(acc[i - 1], acc[i - 1], g.rq_sv)
    if rq.axis == "n":
        ops["fmul"](acc[R - 1], acc[R - 1], g.rq_sv)
    while not held and len(prog.items) - pc < 4:            # the redirect's latency
        nop()
    params = [] if held else [tp["zp"], tp["lo"], tp["hi"], tp["cfg"]]

    def psig():
        return ld(params.pop(0)) if params else None

    if rq.axis == "n":                                      # products done: ftoin each row
        for i in range(R):
            ops["ftoin"](acc[i], acc[i], sig=psig())
    else:                                                   # ftoin row i-1 (add) | fmul row i (mul)
        if not held:
            nop(sig=ld(S0))                                 # [scale | step, scales.., zp, lo, hi, cfg]
        if rq.axis == "m":
            nop(sig=ld(S0))                                 # (the step word: unused here)
        for i in range(R):
            if rq.axis == "m":                              # row i's scale in S[i % 2]; load row i + 1's
                sc, sig = (S0, S1)[i % 2], (ld((S1, S0)[i % 2]) if i + 1 < R else psig())
            else:
                sc, sig = S0, psig()
            ins = ops["ftoin"](acc[i - 1], acc[i - 1], sig=sig) if i else nop(sig=sig)
            ins.fmul(acc[i], acc[i], sc)
        ops["ftoin"](acc[R - 1], acc[R - 1], sig=psig())
    while params:
        nop(sig=psig())
    for i in range(R):                                      # clamp row i (add) | + zero point row i-1 (mul)
        ops["imax"](acc[i], acc[i], tp["lo"])
        ins = ops["imin"](acc[i], acc[i], tp["hi"])
        if i:
            ins.add(acc[i - 1], acc[i - 1], tp["zp"])
    add(acc[R - 1], acc[R - 1], tp["zp"])


def _kstep_emitter(s, t, g, j, si, mul, acc_add, small_b):
    """Instruction si (0..R) of k-step j of the loop block (see the module docstring)."""
    R = t.R

    def emit():
        if si < R:
            # the value for the next multiply: A[m0+si+1, k], or A[m0, k+1] after the last row
            nxt = g.ab[(si + 1) % 2] if si + 1 < R else g.ab[0]
            sig = S["ldunifarf"](nxt)
            margs = (g.t[si % 2], g.bv, g.ab[si % 2])
            if si >= 1:
                first = acc_add(g.acc[si - 1], g.acc[si - 1], g.t[(si - 1) % 2], sig=sig)
            elif small_b:                                   # configures this k-step's lookup
                first = mov(tmuc, g.cfg1, sig=sig)
            else:
                first = nop(sig=sig)
            getattr(first, mul)(*margs)
        else:
            acc_add(g.acc[R - 1], g.acc[R - 1], g.t[(R - 1) % 2],
                    sig=S["ldtmu"](g.bv)).add(tmua, g.bp, g.off[j])
    return emit


def _unpack_op(s: GemmShape):
    """The op extracting a packed B word's top field: ``asr`` (signed values) or ``shr``."""
    return _unpack_op_signed(s.b_signed)


def _unpack_op_signed(signed: bool):
    return A.DSL["asr" if signed else "shr"]


def _kstep_tmu_packed(s, t, g, j, small_b):
    """Emitters of k-step j of the "tmu" variant with a packed A panel. As :func:`_kstep_tmu`
    (shuffle + multiply per row), but the A column is unpacked from ``bw``, the lanes' current
    word (lane i: row m0 + i), whose top field is the next k-step's value: ``asr`` / ``shr`` into
    the next column register, then ``shl`` to the following field, in the add slots of the
    last two rows' multiply instructions; those rows' accumulations move to their shuffle
    instructions' mul slot (the mul ALU's ``add``). A word is looked up with the B row of the
    k-step that starts it (PF ahead) and popped after that B row, four and three rows before
    the k-step ends (so the unpack that follows has it)."""
    R, U, G, PF = t.R, t.U, s.a_group, t.PF
    P = len(g.avec)
    bvj, bvn = g.bvs[j % P], g.bvs[(j + 1) % P]
    col, coln = g.avec[j % P], g.avec[(j + 1) % P]
    starts = _a_word_starts(s, U)
    issue_a = (j + PF) % U in starts                        # the B row fetched here starts a word
    pop_a = (j + 1) % U in starts                           # k-step j + 1 starts a word
    ext = _unpack_op_signed(s.a_dtype != "uint8")
    fetch = ([lambda i: i.mov(tmuc, g.cfg1)] if small_b else []) + [
        lambda i: i.add(tmua, g.bp, g.off[j])]              # B row k + PF
    if issue_a:
        fetch += [lambda i: i.mov(tmua, g.ap), lambda i: i.add(g.ap, g.ap, g.astep)]
    assert len(fetch) <= R - 2, "PACKED_A_MIN_ROWS"
    pops = {R - 4: bvn}
    if pop_a:
        pops[R - 3] = g.bw
    moved = (R - 2, R - 1)                                  # rows whose add slot unpacks
    out = []
    for i in range(R):
        def shuf(i=i, op=(fetch[i] if i < len(fetch) else None)):
            ins = A.DSL["shuffle"](g.ab[i % 2], col, i)
            if op is not None:
                op(ins)
            elif i in moved:                                # accumulate row i - 1 (mul ALU)
                ins.add(g.acc[i - 1], g.acc[i - 1], g.t[(i - 1) % 2])

        def mac(i=i):
            sig = S["ldtmu"](pops[i]) if i in pops else None
            if i == R - 2:                                  # shift amounts are taken mod 32
                ins = ext(coln, g.bw, -s.a_bits, sig=sig)
            elif i == R - 1:
                ins = shl(g.bw, g.bw, s.a_bits, sig=sig)
            else:
                prev = g.acc[i - 1] if i else g.acc[R - 1]
                ins = add(prev, prev, g.t[(i - 1) % 2] if i else g.t[(R - 1) % 2], sig=sig)
            ins.smul24(g.t[i % 2], bvj, g.ab[i % 2])
        out += [shuf, mac]
    return out


def _kstep_packed(s, t, g, j):
    """Emitters of k-step j of the loop block with packed B (:func:`pack_weights`). ``bv`` holds
    this k-step's weights (one per lane), ``bw`` the packed word with the next k-step's value in
    its top field. The R multiplies and their ``ldunifarf`` are the unpacked kernel's
    (:func:`_kstep_emitter`); instruction 0's free add slot shifts the word (``shl bw, bits``),
    and instruction R extracts the next value (``asr`` / ``shr`` by 32 - bits on the add ALU)
    beside the last row's accumulation, moved to the mul ALU's ``add``. The word's last k-step
    instead pops the next word and issues the lookup PF words ahead (the unpacked kernel's
    instruction R), and one more instruction extracts the new word's first value: R + 1
    instructions per k-step, + 1 per word of G = 32 / bits k-steps.

    Block-wise scales (``k_block`` = U): k-step 0 of a block starts the integer sums (``mov``
    instead of ``add``), the block's last word pops the scale row instead of a word, and
    :func:`_block_fold` follows the last k-step."""
    R, G = t.R, s.b_group
    q, last = j // G, j % G == G - 1                        # word of the block; its last k-step?
    ext = _unpack_op(s)
    acc, tt = g.acc, g.t
    restart = bool(s.k_block) and j == 0                    # the block's first product of each row
    fold = bool(s.k_block) and j == t.U - 1                 # the block's last k-step
    out = []
    for si in range(R + 1):
        def emit(si=si):
            if si < R:
                nxt = g.ab[(si + 1) % 2] if si + 1 < R else g.ab[0]
                sig = S["ldunifarf"](nxt)
                if si >= 1 and restart:
                    first = mov(acc[si - 1], tt[(si - 1) % 2], sig=sig)
                elif si >= 1:
                    first = add(acc[si - 1], acc[si - 1], tt[(si - 1) % 2], sig=sig)
                elif not last:
                    first = shl(g.bw, g.bw, g.csh, sig=sig)
                else:
                    first = nop(sig=sig)
                first.smul24(tt[si % 2], g.bv, g.ab[si % 2])
            elif not last and restart:
                ext(g.bv, g.bw, g.cext).mov(acc[R - 1], tt[(R - 1) % 2])
            elif not last:
                ext(g.bv, g.bw, g.cext).add(acc[R - 1], acc[R - 1], tt[(R - 1) % 2])
            else:
                add(acc[R - 1], acc[R - 1], tt[(R - 1) % 2],
                    sig=S["ldtmu"](g.sc if fold else g.bw)).add(tmua, g.bp, g.off[q])
        out.append(emit)
    if fold:
        out += _block_fold(s, t, g)
    elif last:
        out.append(lambda: ext(g.bv, g.bw, g.cext))
    return out


def _block_fold(s, t, g):
    """Emitters closing a scale block (``k_block``), after its last k-step popped the block's
    scale row into ``sc``: row i's integer sum is converted (``itof``), multiplied by the
    per-column scale (mul ALU, one instruction later) and added to its float accumulator; the
    next block's first packed word is popped (issuing the lookup PF fetches ahead, ``off[F]``)
    and its first value extracted. 2 R + 3 instructions per block."""
    R = t.R
    x, y = g.t                                              # itof result, scaled value
    F = b_fetches(s, t)
    itof, fadd = A.DSL["itof"], A.DSL["fadd"]
    out = []
    for i in range(R + 1):
        def conv(i=i):
            ins = itof(x, g.acc[i]) if i < R else nop()
            if i >= 1:
                ins.fmul(y, x, g.sc)
        out.append(conv)
        if i >= 1:
            def accum(i=i):
                ins = fadd(g.facc[i - 1], g.facc[i - 1], y, sig=S["ldtmu"](g.bw) if i == R else None)
                if i == R:
                    ins.add(tmua, g.bp, g.off[F - 1])
            out.append(accum)
    out.append(lambda: _unpack_op(s)(g.bv, g.bw, g.cext))
    return out


def _activation(s: GemmShape, g: GemmRegs, R: int):
    act = s.activation
    if act is None:
        return
    ops = A.DSL
    if act == "relu":
        fn = ops["imax"] if s.is_int else ops["fmax"]
        for i in range(R):
            fn(g.acc[i], g.acc[i], 0)
    elif isinstance(act, tuple) and act[0] == "clip":
        lo_fn, hi_fn = (ops["imax"], ops["imin"]) if s.is_int else (ops["fmax"], ops["fmin"])
        for i in range(R):
            lo_fn(g.acc[i], g.acc[i], g.lo)
            hi_fn(g.acc[i], g.acc[i], g.hi)
    else:
        raise ValueError(f"unsupported activation {act!r}")


def _current():
    return A.Program._stack[-1]


# ------------------------------------------------------------------------------------------------
# Pack kernel: A[z][m][k] (any supported dtype) -> panel[z][mt][k][i] (int32 / float32)
# ------------------------------------------------------------------------------------------------
PACK_PF = 4


def pack_uniforms(s: GemmShape, t: GemmTiling, kchunk: int, a_name: str, p_name: str,
                  mt0: int = 0, block: GemmShape | None = None):
    """The pack launch's uniforms; a row block (:func:`split_pack`) passes its first row tile
    ``mt0`` and its shape ``block`` (its rows): A and the panel start ``mt0`` tiles in, the
    batch strides stay the whole GEMM's."""
    es = ITEMSIZE[s.a_dtype]
    rows = s.M if block is None else block.M
    u = [("addr", a_name, mt0 * t.R * s.K * es), ("u32", s.a_bstride * es), ("u32", s.K * es), ("u32", es),
         ("addr", p_name, mt0 * t.Kpad * t.R * 4), ("u32", t.MT * t.Kpad * t.R * 4), ("u32", t.Kpad * t.R * 4),
         ("u32", t.R), ("u32", rows), ("u32", s.K), ("u32", kchunk)]
    if s.a_dtype in SMALL_INT:
        u.append(("u32", 0xFFFFFF00 | tmu_config(s.a_dtype)))
    return u


def pack_kernel(s: GemmShape, t: GemmTiling):
    """Workgroup (kc, mt, z) copies A[z][mt*R + lane][k], k in chunk kc, into the panel
    (lanes are rows; rows >= M and lanes >= R are never stored: the scratch panel stays zero)."""
    p = _Pool()
    lane, la, pp, cnt, es, rstep, vmask, tmp, v, r4, kc, m0 = (p.take() for _ in range(12))
    ld = lambda r: S["ldunifrf"](r)  # noqa: E731
    small = s.a_dtype in SMALL_INT
    cfg = p.take() if small else None

    eidx(lane, sig=ld(la))                                  # a_base
    mov(kc, RF[2].unpack("ul"), sig=ld(tmp))                # z ; a_batch_stride
    umul24(tmp, tmp, kc)
    add(la, la, tmp, sig=ld(rstep))                         # a_row_stride
    nop(sig=ld(es))
    nop(sig=ld(pp))                                         # p_base
    nop(sig=ld(tmp))                                        # p_batch_stride
    umul24(tmp, tmp, kc)
    add(pp, pp, tmp, sig=ld(tmp))                           # p_tile_stride
    mov(m0, RF[3].unpack("uh"))                                      # mt
    umul24(tmp, tmp, m0)
    add(pp, pp, tmp, sig=ld(r4))                            # R
    umul24(m0, m0, r4)                                      # m0 = mt * R
    add(v, m0, lane, sig=ld(tmp))                           # row = m0 + lane ; tmp = M
    sub(null, v, tmp, cond="pushn")                         # A = row < M
    sub(null, lane, r4, cond="andn")                        # A &= lane < R
    mov(vmask, 0)
    mov(vmask, -1, cond="ifa")                              # valid lanes: -1
    mov(v, m0, cond="ifna")                                 # invalid lanes read row m0
    umul24(v, v, rstep)
    add(la, la, v)
    shl(tmp, lane, 2)
    add(pp, pp, tmp)                                        # panel lane offset
    shl(r4, r4, 2)                                          # 4 R bytes per panel k-row
    nop(sig=ld(v))                                          # K
    mov(kc, RF[3].unpack("ul"), sig=ld(tmp))                # chunk ; tmp = kchunk
    umul24(kc, kc, tmp)                                     # k0
    sub(cnt, v, kc)                                         # K - k0
    A.DSL["imin"](cnt, cnt, tmp)                            # k-rows of this chunk
    umul24(tmp, kc, es)
    add(la, la, tmp)
    umul24(tmp, kc, r4)
    add(pp, pp, tmp, sig=ld(cfg) if small else None)
    sub(null, cnt, 1, cond="pushn")                         # A = empty chunk
    b(R_.pend, cond="anya")
    nop()
    nop()
    nop()
    for _ in range(PACK_PF):                                # prefetch
        if small:
            mov(tmuc, cfg)
        mov(tmua, la).add(la, la, es)
    L.ploop
    if small:
        mov(null, vmask, cond="pushn").mov(tmuc, cfg)       # A = valid ; config of the next load
    else:
        mov(null, vmask, cond="pushn")
    mov(tmua, la, sig=S["ldtmu"](v)).add(la, la, es)        # issue k + PF, pop k
    sub(cnt, cnt, 1, cond="pushz").mov(tmud, v)             # A = done ; B = valid
    b(R_.ploop, cond="anyna")
    mov(tmua, pp, cond="ifb").add(pp, pp, r4)               # store (delay slot)
    nop()
    nop()
    for _ in range(PACK_PF):
        nop(sig=S["ldtmu"](tmp))
    L.pend
    tmuwt()
    thread_end()


# ------------------------------------------------------------------------------------------------
# Plans
# ------------------------------------------------------------------------------------------------
_assemble = A.assemble


def needs_pack(s: GemmShape, t: GemmTiling) -> bool:
    return not (t.R == 1 and ITEMSIZE[s.a_dtype] == 4 and (s.batch == 1 or t.Kpad == s.K))


def check_limits(s: GemmShape, t: GemmTiling):
    """Refuse shapes whose strides the kernels' 24-bit multiplies cannot take."""
    es_b = ITEMSIZE[s.b_dtype]
    if s.b_packed:                       # 4-byte words, lane-major rows (packed_b_layout)
        rows, lanes = packed_b_layout(s, t)
        b_lane16, b_batch = 64, rows * lanes * 4
    else:
        b_lane16, b_batch = 16 * (s.K * es_b if s.transpose_b else es_b), s.b_bstride * es_b
    spans = {"A panel tile": a_panel_tile_bytes(s, t),
             "B lane stride x 16": b_lane16,
             "C tile": t.R * s.N * s.out_es, "A row": s.K * 4}
    if s.batch > 1:      # batch strides are multiplied by z; with one batch z = 0 and they are unused
        spans.update({"A batch": max(t.MT * t.Kpad * t.R * 4, s.a_bstride * 4), "B batch": b_batch,
                      "C batch": s.M * s.N * s.out_es})
    for what, v in spans.items():
        if v >= UMUL24_LIMIT:
            raise ValueError(f"{what} stride {v} bytes exceeds the kernel's 24-bit address arithmetic")
    if s.batch > 0xFFFF:
        raise ValueError("batch > 65535")



def _row_block(s: GemmShape, t: GemmTiling, mt0: int, mt1: int):
    """(shape, tiling) of the GEMM launch over row tiles [mt0, mt1): the whole GEMM's R, U, PF
    and Kpad (the A panel layout), its own rows, M tiles and worker grid."""
    M = min(s.M, mt1 * t.R) - mt0 * t.R
    bs = replace(s, M=M, a_batch_stride_elems=s.a_bstride)
    MT = mt1 - mt0
    Wm, Wn = _worker_grid(MT, t.NT, max(1, s.num_qpus))
    return bs, replace(t, MT=MT, Wm=Wm, Wn=Wn)


def split_rows(s: GemmShape, t: GemmTiling, model=None, budget_seconds: float | None = None):
    """Row blocks ``[(mt0, shape, tiling), ...]`` of the GEMM launch, each modelled (under
    ``model``; :func:`gemm_launch_cycles`) within ``budget_seconds`` (default
    :func:`.common.dispatch_budget_seconds`): the persistent launch keeps every batch resident, so the
    v3d hang check (no batch-counter progress for 500 ms) bounds each launch, not the GEMM.
    The fewest equal blocks of whole row tiles that fit; one row tile per launch when nothing
    fits (the caller's budget check then refuses it). One block when the whole launch fits."""
    from .common import timing_model, seconds, dispatch_budget_seconds
    m = timing_model(model)
    budget = dispatch_budget_seconds() if budget_seconds is None else budget_seconds

    def blocks(n):
        per = -(-t.MT // n)
        return [(mt0,) + _row_block(s, t, mt0, min(t.MT, mt0 + per)) for mt0 in range(0, t.MT, per)]

    def longest(bl):         # blocks are equal but the last: two distinct launches at most
        return max(seconds(m, gemm_launch_cycles(bs, bt, m)) for _, bs, bt in (bl[0], bl[-1]))

    whole = longest(blocks(1))
    if whole <= budget:
        return blocks(1)
    for n in range(max(2, math.ceil(whole / budget)), t.MT + 1):
        bl = blocks(n)
        if longest(bl) <= budget:
            return bl
    return blocks(t.MT)


def split_pack(s: GemmShape, t: GemmTiling, model=None, budget_seconds: float | None = None):
    """Row blocks ``[(mt0, shape, tiling), ...]`` of the A-panel pack launch (each its own
    k-chunks, :func:`pack_chunks`), each modelled (:func:`pack_launch_cycles` under ``model``)
    within ``budget_seconds`` (default :func:`.common.dispatch_budget_seconds`): the fewest
    equal blocks of whole row tiles; one row tile per launch when nothing fits (the budget check
    then refuses the plan). One block when the whole launch fits."""
    from .common import timing_model, seconds, dispatch_budget_seconds
    m = timing_model(model)
    budget = dispatch_budget_seconds() if budget_seconds is None else budget_seconds

    def blocks(n):
        per = -(-t.MT // n)
        return [(mt0,) + _row_block(s, t, mt0, min(t.MT, mt0 + per)) for mt0 in range(0, t.MT, per)]

    def longest(bl):
        return max(seconds(m, pack_launch_cycles(bs, bt, m)) for _, bs, bt in (bl[0], bl[-1]))
    whole = seconds(m, pack_launch_cycles(s, t, m))
    if whole <= budget:
        return blocks(1)
    for n in range(max(2, math.ceil(whole / budget)), t.MT + 1):
        bl = blocks(n)
        if longest(bl) <= budget:
            return bl
    return blocks(t.MT)


def plan_gemm(s: GemmShape, constants: dict | None = None, names=("A", "B", "C", "bias"),
              budget_seconds: float | None = None) -> KernelPlan:
    """Plan for C = A @ B (+ bias) (+ activation) (requantized to 8 bits with ``s.requant``).
    ``constants`` may hold B (and bias) as weights (and A), and the per-channel requantize
    ``scale`` vector; they are stored in device layout (padded) in the plan. A GEMM launch
    modelled over the dispatch budget is split into row blocks (:func:`split_rows`)."""
    constants = dict(constants or {})
    t = choose_tiling(s)
    check_limits(s, t)
    a_name, b_name, c_name, bias_name = names
    es_a, es_b = ITEMSIZE[s.a_dtype], ITEMSIZE[s.b_dtype]
    pack = needs_pack(s, t)
    batched = s.batch > 1
    a_shape = ((s.batch,) if batched and s.a_bstride else ()) + (s.M, s.K)
    b_shape = ((s.batch,) if batched and s.b_bstride else ()) + ((s.N, s.K) if s.transpose_b else (s.K, s.N))
    c_shape = ((s.batch,) if batched else ()) + (s.M, s.N)
    # B: prefetch reads up to row Kpad + PF - 1 of the last batch entry, lanes up to NT*16 - 1
    b_ls = s.K * es_b if s.transpose_b else es_b
    bks = es_b if s.transpose_b else s.N * es_b
    b_span = (s.batch - 1) * s.b_bstride * es_b + (t.NT * 16 - 1) * b_ls + (t.Kpad + t.PF) * bks + 64
    a_span = max(s.batch, 1) * max(s.a_bstride, s.M * s.K) * es_a + (PACK_PF + t.Kpad - s.K + 2) * es_a + 64
    bufs, out_consts = [], {}

    def role(name):
        return "weight" if name in constants else "input"

    bufs.append(BufferSpec(a_name, role(a_name), a_shape, s.a_dtype, a_span))
    if s.b_packed:                                          # the plan packs the constant weights
        if b_name not in constants:
            raise ValueError(f"packed {s.b_bits}-bit weights (weight_bits) must be the constant B operand")
        out_consts[b_name] = pack_b_blockwise(s, t, constants[b_name], constants.get(BLOCK_SCALE)) \
            if s.k_block else pack_b(s, t, constants[b_name])
        bufs.append(BufferSpec(b_name, "weight", out_consts[b_name].shape, "uint32"))
    else:
        bufs.append(BufferSpec(b_name, role(b_name), b_shape, s.b_dtype, b_span))
    if s.bias:
        bias_dtype = "int32" if s.is_int else "float32"
        bufs.append(BufferSpec(bias_name, "weight", (s.N,), bias_dtype, t.NT * 64 + 64))
        bias = np.zeros(t.NT * 16, dtype=bias_dtype)
        bias[: s.N] = np.asarray(constants[bias_name]).reshape(-1)
        out_consts[bias_name] = bias
    if s.requant is not None and not t.rq_regs:
        blk = requant_block(s, t, constants.get("scale"))
        out_consts[REQUANT_BLOCK] = blk
        bufs.append(BufferSpec(REQUANT_BLOCK, "weight", blk.shape, "uint32", blk.nbytes + 64))
    if s.scale_lookup:
        pad = t.NT * 16
        sc = np.asarray(constants.get("scale", ()), np.float32).reshape(-1)
        if sc.size != s.N or not np.all(np.isfinite(sc) & (sc > 0)):
            raise ValueError(f"requantize scale: {s.N} finite positive float32 values wanted, got {sc.size}")
        vec = np.ones(pad, np.float32)
        vec[:s.N] = sc
        out_consts["scale"] = vec
        bufs.append(BufferSpec("scale", "weight", (pad,), "float32", pad * 4 + 64))
    bufs.append(BufferSpec(c_name, "output", c_shape, s.out_dtype))
    for name in (a_name, b_name):
        if name in constants and name not in out_consts:
            out_consts[name] = np.ascontiguousarray(np.asarray(constants[name]).astype(
                s.a_dtype if name == a_name else s.b_dtype))
    launches = []
    gemm_a = a_name
    if pack:
        p_name = a_name + "_panel"
        # + the look-ahead past the last tile: R words (unifa), PF k-steps of R words (tmu)
        ahead = t.R * (t.PF + 1) + 16 if s.a_stream == "tmu" else t.R
        bufs.append(BufferSpec(p_name, "scratch", (s.batch * t.MT * t.Kpad * t.R + ahead,), "float32"))
        gemm_a = p_name
        pblocks = split_pack(s, t, budget_seconds=budget_seconds)
        words = _assemble(pack_kernel, s, t, name="gemm_pack")
        for i, (mt0, bs, bt) in enumerate(pblocks):
            kchunk, kc = pack_chunks(bs, bt)
            launches.append(Launch(words, pack_uniforms(s, t, kchunk, a_name, p_name, mt0, bs),
                                   (kc, bt.MT, s.batch), 16, s.num_qpus, 1,
                                   "gemm_pack" if len(pblocks) == 1 else f"gemm_pack_rows{i}"))
    blocks = split_rows(s, t, budget_seconds=budget_seconds)
    from .common import timing_model, seconds
    m = timing_model(None)
    launch_seconds = ([seconds(m, pack_launch_cycles(bs, bt, m)) for _, bs, bt in pblocks] if pack else []) + \
        [seconds(m, gemm_launch_cycles(bs, bt, m)) for _, bs, bt in blocks]
    for i, (mt0, bs, bt) in enumerate(blocks):
        launches.append(Launch(_assemble(gemm_kernel, bs, bt, name="gemm"),
                               gemm_uniforms(bs, bt, gemm_a, b_name, c_name, bias_name if s.bias else None,
                                             mt0, (s, t)),
                               (bt.Wn, bt.Wm, s.batch), 16, s.num_qpus, 1,
                               "gemm" if len(blocks) == 1 else f"gemm_rows{i}"))
    return KernelPlan("gemm", bufs, launches, out_consts,
                      attrs={"M": s.M, "N": s.N, "K": s.K, "batch": s.batch, "a_dtype": s.a_dtype,
                             "b_dtype": s.b_dtype, "transpose_b": s.transpose_b, "bias": s.bias,
                             "b_bits": s.b_bits,
                             "weight_dtype": packed_dtype_name(s) if s.b_packed else s.b_dtype,
                             "activation": s.activation, "a_stream": s.a_stream, "tiling": t.__dict__,
                             "out_dtype": s.out_dtype,
                             "requant": None if s.requant is None else s.requant.__dict__,
                             # modelled seconds of each launch (default TimingModel): the v3d
                             # device checks the longest against its dispatch budget
                             "launch_seconds": launch_seconds},
                      flops=2 * s.batch * s.M * s.N * s.K,
                      bytes_moved=s.batch * (s.M * s.K * es_a + s.M * s.N * s.out_es) + b_bytes_moved(s, t))


def packed_dtype_name(s: GemmShape) -> str:
    """The packed weights' dtype as it runs on the QPU (``int4``, ``uint2``, ...)."""
    return f"{'' if s.b_signed else 'u'}int{s.b_bits}"


def b_bytes_moved(s: GemmShape, t: GemmTiling) -> int:
    """Bytes of B the GEMM reads once: every batch entry's K x N values, or its packed words
    (:func:`packed_b_layout` without the prefetch rows)."""
    zb = s.batch if s.b_bstride else 1
    if s.b_packed:
        rows, lanes = packed_b_layout(s, t)
        return max(zb, 1) * (rows - t.PF) * lanes * 4
    return max(s.batch, 1) * s.K * s.N * ITEMSIZE[s.b_dtype]


def pack_b_blockwise(s: GemmShape, t: GemmTiling, b, scale) -> np.ndarray:
    """The constant B ``[K, N]`` of a block-wise scaled GEMM (``k_block`` = B) with its scales
    ``[K / B, N]`` (finite float32) as the kernel reads them: per block, B / G packed word rows
    (:func:`pack_weights`) then one row of the block's float32 scales (lane n: column n; padding
    lanes 0.0); PF zero rows the prefetch reads past the end, + 16 words of the TMU's look-ahead."""
    B = s.k_block
    b = np.asarray(b)
    if b.shape != (s.K, s.N):
        raise ValueError(f"block-wise packed B: shape {b.shape}, wanted {(s.K, s.N)}")
    sc = np.asarray(scale, np.float32)
    if sc.shape != (s.K // B, s.N) or not np.all(np.isfinite(sc)):
        raise ValueError(f"block scales: {s.K // B} x {s.N} finite float32 values wanted, got shape {sc.shape}")
    rows, lanes = packed_b_layout(s, t)
    F = B // s.b_group
    out = np.zeros((rows, lanes), np.uint32)
    for n in range(s.K // B):
        r0 = n * (F + 1)
        out[r0:r0 + F] = pack_weights(b[n * B:(n + 1) * B], s.b_bits, s.b_signed, F, lanes)
        out[r0 + F, :s.N] = sc[n].view(np.uint32)
    return np.concatenate([out.reshape(-1), np.zeros(16, np.uint32)])


#: the plan constant holding a block-wise GEMM's per-block, per-column scales ([K / k_block, N])
BLOCK_SCALE = "block_scale"


def pack_b(s: GemmShape, t: GemmTiling, b) -> np.ndarray:
    """The constant B (``[K, N]``, ``[N, K]`` transposed, with a leading batch axis when B is
    per batch entry; int8 / uint8 values in the packed range) as the kernel's packed words: one
    :func:`pack_weights` layout per batch entry, + 16 words of the TMU's look-ahead."""
    zb = s.batch if s.batch > 1 and s.b_bstride else 1
    shape = (s.N, s.K) if s.transpose_b else (s.K, s.N)
    b = np.asarray(b)
    if b.size != zb * s.K * s.N:
        raise ValueError(f"packed B: {b.size} values for {zb} x {shape}")
    b = b.reshape((zb,) + shape)
    rows, lanes = packed_b_layout(s, t)
    words = [pack_weights(bz.T if s.transpose_b else bz, s.b_bits, s.b_signed, rows, lanes).reshape(-1)
             for bz in b]
    return np.concatenate(words + [np.zeros(16, np.uint32)])


def reference(s: GemmShape, a: np.ndarray, b_: np.ndarray, bias=None, scale=None) -> np.ndarray:
    """numpy reference with the kernel's semantics (int32 wrap; fp32 in float64 then rounded;
    the requantize epilogue by :func:`requant_reference`, per-channel ``scale`` along its axis)."""
    if s.requant is not None:
        acc = reference(replace(s, requant=None), a, b_, bias)
        rq = s.requant
        sc = np.float32(rq.scale) if rq.axis is None else \
            np.asarray(scale, np.float32).reshape((-1, 1) if rq.axis == "m" else (-1,))
        return requant_reference(acc, rq, sc)
    if s.is_int:
        a64, b64 = a.astype(np.int64), b_.astype(np.int64)
        bb = np.swapaxes(b64, -1, -2) if s.transpose_b else b64
        c = np.matmul(a64.reshape(-1, s.M, s.K) if a.ndim == 3 else a64, bb)
        if bias is not None:
            c = c + np.asarray(bias, np.int64)
        c = ((c + (1 << 31)) % (1 << 32) - (1 << 31))
        if s.activation == "relu":
            c = np.maximum(c, 0)
        elif isinstance(s.activation, tuple):
            c = np.clip(c, s.activation[1], s.activation[2])
        return c.astype(np.int32)
    bb = np.swapaxes(b_, -1, -2) if s.transpose_b else b_
    c = np.matmul(a.astype(np.float64), bb.astype(np.float64))
    if bias is not None:
        c = c + np.asarray(bias, np.float64)
    if s.activation == "relu":
        c = np.maximum(c, 0)
    elif isinstance(s.activation, tuple):
        c = np.clip(c, s.activation[1], s.activation[2])
    return c.astype(np.float32)


# ------------------------------------------------------------------------------------------------
# Registry entry: "matmul"
# ------------------------------------------------------------------------------------------------
FLOAT_DTYPES = ("float32",)


def requant_from_attrs(attrs: dict, out_dtype: str, channels: int, channel_axis: str) -> Requant | None:
    """The :class:`Requant` of an OpSpec's ``attrs["requant"]`` (dict: ``scale`` one value or one
    per output channel, ``zero_point``, ``lo``, ``hi``), or None; ValueError for a bad one. The
    spec's output dtype is the requantized dtype."""
    r = attrs.get("requant")
    if r is None:
        return None
    sc = np.asarray(r["scale"], np.float64).reshape(-1)
    if sc.size not in (1, channels):
        raise ValueError(f"requantize scale has {sc.size} values for {channels} output channels")
    return Requant(out_dtype, None if sc.size == 1 else channel_axis, int(r["zero_point"]),
                   int(r["lo"]), int(r["hi"]), float(sc[0]) if sc.size == 1 else None)


def requant_constants(spec) -> dict:
    """{"scale": per-channel float32 scales} of a requantizing spec (empty otherwise)."""
    r = spec.attrs.get("requant")
    if r is None or np.size(r["scale"]) == 1:
        return {}
    sc = np.asarray(r["scale"], np.float64)
    if not np.all(np.isfinite(sc) & (sc > 0)):
        raise ValueError("requantize scales must be finite and positive")
    return {"scale": sc.astype(np.float32)}


def weight_bits_of(attrs: dict, w_dtype: str) -> tuple:
    """(bits, container dtype) of a spec's weights: ``attrs["weight_bits"]`` (4 or 2; absent:
    unpacked) with int8 / uint8 weights (signedness from the dtype, or ``attrs
    ["weight_signed"]`` which must agree), or a packed dtype name (``int4``, ``uint2``, ...:
    :data:`PACKED_DTYPES`); (None, w_dtype) for unpacked weights. ValueError for anything else."""
    bits = attrs.get("weight_bits")
    if w_dtype in PACKED_DTYPES:
        dbits, signed = PACKED_DTYPES[w_dtype]
        if bits is not None and int(bits) != dbits:
            raise ValueError(f"weight_bits {bits} contradicts the weight dtype {w_dtype}")
        bits = dbits
    elif bits is None:
        return None, w_dtype
    else:
        if w_dtype not in ("int8", "uint8"):
            raise ValueError(f"weight_bits {bits}: the weights must be int8 / uint8 values, not {w_dtype}")
        signed = w_dtype == "int8"
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or int(bits) not in WEIGHT_BITS:
        raise ValueError(f"weight_bits {bits!r}: packed weights are 4 or 2 bits")
    if "weight_signed" in attrs and bool(attrs["weight_signed"]) != signed:
        raise ValueError(f"weight_signed={attrs['weight_signed']} contradicts the weight dtype {w_dtype}")
    return int(bits), ("int8" if signed else "uint8")


def shape_from_spec(spec, model=None, b_constant: bool | None = None) -> GemmShape:
    """GemmShape of a matmul OpSpec (batch dims must be equal, or absent / 1 on one side). The
    A-stream variant is ``attrs["a_stream"]`` when given, else the one of the lowest estimate
    under ``model`` (default: the emulator's TimingModel; :func:`choose_variant`). An int8 /
    uint8 B that is a constant (``b_constant``; None: ``attrs["b_constant"]``, absent False) may
    run packed four k-steps per word (:func:`choose_b_packing`; ``attrs["weight_packed"]``
    forces / forbids it)."""
    (ash, adt), (bsh, bdt) = spec.inputs[0], spec.inputs[1]
    tb = bool(spec.attrs.get("transpose_b", False))
    if len(ash) < 2 or len(bsh) < 2:
        raise ValueError("matmul operands must be at least 2-D")
    M, K = int(ash[-2]), int(ash[-1])
    N, Kb = (int(bsh[-2]), int(bsh[-1])) if tb else (int(bsh[-1]), int(bsh[-2]))
    if K != Kb:
        raise ValueError(f"inner dimensions differ: {K} vs {Kb}")
    ab = int(np.prod(ash[:-2], dtype=np.int64)) if len(ash) > 2 else 1
    bb = int(np.prod(bsh[:-2], dtype=np.int64)) if len(bsh) > 2 else 1
    if ab != bb and 1 not in (ab, bb):
        raise ValueError(f"batch dimensions {tuple(ash[:-2])} and {tuple(bsh[:-2])} do not broadcast simply")
    if ab == bb and len(ash) > 2 and len(bsh) > 2 and tuple(ash[:-2]) != tuple(bsh[:-2]):
        raise ValueError("batch dimensions must match exactly")
    batch = max(ab, bb)
    bits, bdt = weight_bits_of(spec.attrs, str(bdt))
    k_block = spec.attrs.get("k_block")
    if k_block is not None and bits is None:                # block-wise 8-bit weights: packed 4 per word
        bits = 8
    s = GemmShape(M, N, K, batch, str(adt), str(bdt), tb, bool(spec.attrs.get("bias", False)),
                  spec.attrs.get("activation"), int(spec.attrs.get("num_qpus", 12)),
                  a_batch_stride_elems=(M * K if ab > 1 else 0) if batch > 1 else None,
                  b_batch_stride_elems=(K * N if bb > 1 else 0) if batch > 1 else None,
                  requant=requant_from_attrs(spec.attrs, str(spec.output[1]), N, "n"), b_bits=bits)
    if k_block is not None:                                 # block-wise scales (spec attr "k_block")
        if isinstance(k_block, bool) or not isinstance(k_block, (int, np.integer)):
            raise ValueError(f"k_block {k_block!r}: the scale block is a number of k-steps")
        s = replace(s, k_block=int(k_block))
        check_blockwise_shape(s)
        return s
    if bits is not None:                                    # packed weights: the unifa variant only
        s = replace(s, a_stream=str(spec.attrs.get("a_stream", "unifa")))
        check_packed_shape(s)
        return s
    if b_constant is None:
        b_constant = bool(spec.attrs.get("b_constant", False))
    packed8 = spec.attrs.get("weight_packed")
    if packed8 is not None and bool(packed8):              # plan_gemm refuses a non-constant B
        s = replace(s, b_bits=8, a_stream=str(spec.attrs.get("a_stream", "unifa")))
        check_packed_shape(s)
        return s
    if "a_stream" in spec.attrs:
        s = replace(s, a_stream=str(spec.attrs["a_stream"]))
        return choose_b_packing(s, model) if b_constant and packed8 is None else s
    if s.a_dtype not in INT_DTYPES + FLOAT_DTYPES or s.b_dtype not in INT_DTYPES + FLOAT_DTYPES:
        return s                                            # supports() refuses it with a reason
    s = choose_variant(s, model)
    return choose_b_packing(s, model) if b_constant and packed8 is None else s


def packed_int8_candidate(s: GemmShape) -> GemmShape | None:
    """``s`` with its int8 / uint8 constant B packed four k-steps per 32-bit word (``b_bits`` 8:
    one 64-byte lookup feeds 4 k-steps instead of one 16-byte lookup per k-step), or None where
    the packed path does not take the shape (:func:`check_packed_shape`)."""
    if s.b_packed or s.b_dtype not in ("int8", "uint8"):
        return None
    cand = replace(s, b_bits=8, a_stream="unifa")
    try:
        check_packed_shape(cand)
        check_limits(cand, choose_tiling(cand))
    except ValueError:
        return None
    return cand


def choose_b_packing(s: GemmShape, model=None) -> GemmShape:
    """``s`` (a constant int8 / uint8 B) or its packed 8-bit form, whichever has the lower
    estimate under ``model`` (:func:`plan_cycles`), as the convolution chooses its panel."""
    cand = packed_int8_candidate(s)
    if cand is None:
        return s
    return cand if plan_cycles(cand, model) < plan_cycles(s, model) else s


def supports(spec) -> tuple:
    try:
        s = shape_from_spec(spec)
        requant_constants(spec)
    except ValueError as e:
        return False, str(e)
    ints = (s.a_dtype in INT_DTYPES, s.b_dtype in INT_DTYPES)
    if ints[0] != ints[1] or not ((s.a_dtype in FLOAT_DTYPES) == (s.b_dtype in FLOAT_DTYPES)):
        return False, f"mixed operand types {s.a_dtype} x {s.b_dtype}"
    if not all(ints) and (s.a_dtype not in FLOAT_DTYPES):
        return False, f"dtype {s.a_dtype} not supported (float32, int8, uint8, int16, int32)"
    if s.requant is not None and not s.is_int:
        return False, "requantize epilogue on a float GEMM"
    want_out = s.out_dtype
    if str(spec.output[1]) != want_out:
        return False, f"output dtype {spec.output[1]} (the kernel produces {want_out})"
    act = s.activation
    if not (act is None or act == "relu" or (isinstance(act, tuple) and act[0] == "clip")):
        return False, f"activation {act!r}"
    try:
        check_limits(s, choose_tiling(s))
    except ValueError as e:
        return False, str(e)
    return True, "ok"


def generate(spec, constants: dict):
    s = shape_from_spec(spec, b_constant=("B" in constants) or None)
    plan = plan_gemm(s, {**constants, **requant_constants(spec)})
    # plan_gemm declares A, B and C with the batch dims flattened ([batch, M, K], or [M, K] for an
    # operand broadcast over the batch); the registry hands the kernel the operands as the spec
    # gives them ([.., M, K] with any number of batch dims, e.g. a 4-D MatMul), so the buffers
    # take the spec's shapes (same elements, same row-major order).
    for name, shape in (("A", spec.inputs[0][0]), ("B", spec.inputs[1][0]), ("C", spec.output[0])):
        if name == "B" and s.b_packed:                      # the plan's own packed words
            continue
        buf = plan.buffer(name)
        if int(np.prod(shape, dtype=np.int64)) != int(np.prod(buf.shape, dtype=np.int64)):
            raise ValueError(f"matmul {name}: spec shape {list(shape)} does not hold the kernel's "
                             f"{list(buf.shape)}")
        buf.shape = tuple(int(d) for d in shape)
    return plan


# ------------------------------------------------------------------------------------------------
# Estimate (modelled seconds under a TimingModel; see kernels/common.py)
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GemmProfile:
    """Instruction counts of the generated GEMM program (from its labels and loops)."""
    prologue: int       # worker prologue (uniforms, pointers), once per workgroup
    tile: int           # one full tile outside the K loop (prologue, drain, stores, loop control)
    kloop: int          # one K-loop block (U k-steps)


@functools.lru_cache(maxsize=256)
def gemm_profile(s: GemmShape, t: GemmTiling, kernel=None) -> GemmProfile:
    """Count the instructions of the program ``kernel`` (default :func:`gemm_kernel`) emits
    (cached: estimates call it for every variant and placement decision)."""
    from .common import build_program, loop_lengths
    prog = build_program(kernel or gemm_kernel, s, t, name="gemm")
    lab = prog.labels
    kloop = loop_lengths(prog.words())[0]
    part = next(v for k, v in lab.items() if k[0] == "p" and k[1:].isdigit())
    end = next(v for k, v in lab.items() if k[0] == "e" and k[1:].isdigit())
    # full-tile path: nloop .. the stores' closing branch (+3 delay slots), then the n-loop footer
    tile = (part - lab["nloop"]) - kloop + (lab["mnext"] - end)
    return GemmProfile(lab["mloop"], tile, kloop)


def _b_lines_per_row(s: GemmShape, line: int) -> float:
    """Distinct cache lines one 16-lane B lookup touches per k-step, on average (packed B: one
    aligned 64-byte word row per ``b_group`` k-steps)."""
    if s.b_packed:                           # (+ a block-wise GEMM's scale row per k_block k-steps)
        return math.ceil(64 / line) * (1 / s.b_group + (1 / s.k_block if s.k_block else 0))
    es = ITEMSIZE[s.b_dtype]
    if s.transpose_b:
        return 16.0
    if s.b_table:                            # lanes read (mostly) consecutive pixels
        return min(16.0, 1.0 + 15 * es / line)
    # row k starts (k N es) mod line bytes into a line; the 16 lanes span 16 es bytes
    offs = [(k * s.N * es) % line for k in range(line)]
    return float(np.mean([(o + 16 * es - 1) // line + 1 for o in offs]))


def b_tile_bytes(s: GemmShape, t: GemmTiling) -> int:
    """Distinct bytes of B one column tile's K loop reads (16 columns over Kpad k-steps, or the
    packed words; a convolution's implicit B: its input planes, bounded by the whole B)."""
    if s.b_packed:
        return t.Kpad // s.b_group * 64
    one = s.K * s.N if not s.b_table else (s.b_bstride or s.K * s.N)
    return min(t.Kpad * 16, one) * ITEMSIZE[s.b_dtype]


def a_tile_reused(s: GemmShape, t: GemmTiling, model) -> bool:
    """Whether a worker's next column tile finds its A m-tile panel still in the L2. A worker
    walks its column tiles inside its row tile (``mloop`` outside ``nloop``), rereading the
    same ``a_panel_tile_bytes``; between two reads of a panel line, the L2 (LRU) sees one tile
    of every active worker: the Wm row tiles' panels (the Wn workers of a row share one) and
    the Wn column tiles' B (the Wm workers of a column share one). The line survives when that
    working set fits the L2 (then the panel misses once per row tile, not once per pass)."""
    if math.ceil(t.NT / t.Wn) <= 1:
        return False                                        # no second column tile to reuse it
    zs = min(max(1, s.batch), max(1, model.num_qpus) // max(1, t.Wn * t.Wm)) if s.batch > 1 else 1
    ws = zs * (t.Wm * a_panel_tile_bytes(s, t) + t.Wn * b_tile_bytes(s, t))
    return ws <= model.l2_bytes


def gemm_launch_cycles(s: GemmShape, t: GemmTiling, model=None, profile: GemmProfile | None = None) -> float:
    """Modelled cycles of one GEMM launch: the busiest QPU's workgroups, each a prologue and its
    tiles. A tile is its straight-line code, plus the K loop at the slowest of (its instructions,
    the slice TMU's occupancy by the k-step's lookups, the shared L2 port, the slice's uniform
    cache for the unifa stream, the round trip over the ``PF`` k-steps in flight) plus the unifa
    stream's stall ("unifa" variant), plus the tile start: one round trip behind the first rows
    of every active worker in the DRAM queue. L2 misses: each distinct line of A and B misses
    once while it fits the L2 (else once per pass over it). The launch is bounded below by its
    DRAM traffic."""
    from .common import timing_model, round_trip, dram_cycles, stream_stall_per_line, miss_fraction
    m = timing_model(model)
    pr = profile or gemm_profile(s, t)
    cpi, line = m.cycles_per_instruction, m.line_bytes
    Z = max(1, s.batch)
    qpus = max(1, min(m.num_qpus, s.num_qpus))
    nwg = t.Wn * t.Wm * Z
    per_qpu = math.ceil(nwg / qpus)
    tiles = math.ceil(t.MT / t.Wm) * math.ceil(t.NT / t.Wn)
    es_b = ITEMSIZE[s.b_dtype]
    # distinct B data (a batch entry's B, or the input planes of a convolution) and A panel
    b_one = (s.b_bstride if s.b_bstride and (s.batch > 1 or s.b_table) else s.K * s.N) * es_b
    G = s.b_group                            # k-steps per B lookup (packed words: 32 / bits)
    if s.b_packed:                           # the packed words of one batch entry
        b_one = b_bytes_moved(replace(s, batch=1), t)
    b_bytes = b_one * (Z if s.b_bstride else 1)
    pes = s.a_panel_es
    a_bytes = (Z if s.a_bstride else 1) * t.MT * a_panel_tile_bytes(s, t)
    # A lookups per k-step (packed A: one word of R lanes per G k-steps, ceil(U / G) per block)
    a_per_k = s.a_block_words(t.U) / t.U if s.a_packed else 1.0
    b_passes = 1 if b_one <= m.l2_bytes else math.ceil(t.MT / t.Wm)
    a_passes = 1 if a_bytes <= m.l2_bytes or a_tile_reused(s, t, m) else math.ceil(t.NT / t.Wn)
    b_rows = _b_lines_per_row(s, line)
    b_miss = miss_fraction(m, b_bytes * b_passes, Z * t.MT * t.NT * t.Kpad * b_rows)
    a_miss = miss_fraction(m, a_bytes * a_passes, Z * t.MT * t.NT * t.Kpad * a_per_k * t.R * pes / line)
    active = min(qpus, nwg)
    per_slice = min(max(1, m.qpus_per_slice), active)     # QPUs sharing a TMU / uniform cache
    a_lines = a_per_k * t.R * pes / line                   # A values of a k-step, in lines
    tmu_lines = b_rows + (a_per_k * max(1.0, t.R * pes / line) if s.a_stream == "tmu" else 0.0)
    kstep_instr = pr.kloop / t.U
    tmu_words = 16 / G + (16 * a_per_k if s.a_stream == "tmu" else 0)  # B row (+ A column) words
    if s.k_block:                            # + the scale row of each block (its fold's
        tmu_words += 16 / s.k_block          # instructions are in the profile's K loop)
    kstep = max(kstep_instr * cpi,
                (tmu_lines * m.tmu_cycles_per_line + tmu_words * m.tmu_cycles_per_word) * per_slice,
                (tmu_lines + a_lines) * m.l2_cycles_per_line * active,
                round_trip(m, max(b_miss, a_miss if s.a_stream == "tmu" else 0.0)) / (t.PF * G))
    if s.a_stream == "unifa":                # one line of A values per line / (4 R) k-steps
        per_line = line / 4.0 / t.R
        kstep = max(kstep, m.uniform_cycles_per_line * per_slice / per_line)
        kstep += stream_stall_per_line(m, per_line * kstep, a_miss) / per_line
    start = round_trip(m, True) + dram_cycles(m, active * t.PF * G * b_rows * line * b_miss)
    tile = pr.tile * cpi + t.Kpad * kstep + start
    # workgroups queue for the QPUs: the busiest QPU runs ceil(nwg / qpus) prologues and about
    # an even share of all tiles, at least one workgroup's tiles
    busiest = per_qpu * pr.prologue * cpi + max(math.ceil(Z * t.MT * t.NT / qpus), tiles) * tile
    traffic = a_bytes * a_passes + b_bytes * b_passes + Z * s.M * s.N * s.out_es
    return max(busiest, dram_cycles(m, traffic))


def pack_launch_cycles(s: GemmShape, t: GemmTiling, model=None) -> float:
    """Modelled cycles of the A-panel pack launch: per workgroup its prologue and ``kchunk``
    iterations of the pack loop, each the slowest of (instructions, TMU occupancy of the row
    gather, the round trip over the PACK_PF loads in flight)."""
    from .common import timing_model, dram_cycles, l2_port_cycles, lookup_lines, slice_tmu_cycles
    m = timing_model(model)
    cpi = m.cycles_per_instruction
    body, total = _pack_profile(s, t)
    kchunk, kc = pack_chunks(s, t)
    nwg = kc * t.MT * max(1, s.batch)
    per_qpu = math.ceil(nwg / max(1, min(m.num_qpus, s.num_qpus)))
    es = ITEMSIZE[s.a_dtype]
    lines = min(t.R, math.ceil(t.R * s.K * es / m.line_bytes))
    miss = es / m.line_bytes                 # a lane's line changes every line_bytes / es k-rows
    it = max(body * cpi, lines * m.tmu_cycles_per_line,
             (m.tmu_latency + miss * m.dram_latency) / PACK_PF)
    prologue = total - body
    busiest = per_qpu * (prologue * cpi + min(kchunk, s.K) * it + m.tmu_latency + m.dram_latency)
    traffic = max(1, s.batch) * (s.M * s.K * es + t.MT * t.Kpad * t.R * 4)     # A in, panel out
    # every k-row of every m-tile: one gather of its valid rows (lanes past M read row m0: its
    # line) and one panel store; each workgroup also gathers PACK_PF rows past its chunk
    valid = [min(t.R, s.M - mt * t.R) for mt in range(t.MT)]
    gather = sum(min(v, math.ceil(v * s.K * es / m.line_bytes)) for v in valid)
    rows = max(1, s.batch) * s.K
    l2 = l2_port_cycles(m, rows * (gather + t.MT * lookup_lines(m, t.R * 4))
                        + nwg * PACK_PF * gather / t.MT)
    tmu = slice_tmu_cycles(m, rows * t.MT, gather / t.MT, 16, min(nwg, m.num_qpus))
    return max(busiest, dram_cycles(m, traffic), l2, tmu)


@functools.lru_cache(maxsize=256)
def _pack_profile(s: GemmShape, t: GemmTiling):
    """(pack loop length, program length) of the pack kernel for ``s``, ``t``."""
    from .common import loop_lengths
    words = _assemble(pack_kernel, s, t, name="gemm_pack")
    return loop_lengths(words)[0], len(words)


def pack_chunks(s: GemmShape, t: GemmTiling):
    """(k-rows per pack workgroup, number of k-chunks) of the pack launch."""
    groups = s.batch * t.MT
    kchunk = max(PACK_PF, -(-s.K * groups // 48))
    kchunk = max(kchunk, -(-s.K // 0xFFFF))
    return kchunk, -(-s.K // kchunk)


def plan_cycles(s: GemmShape, model=None) -> float:
    """Modelled cycles of :func:`plan_gemm`'s launches for ``s`` (its a_stream variant)."""
    t = choose_tiling(s)
    cycles = sum(gemm_launch_cycles(bs, bt, model) for _, bs, bt in split_rows(s, t, model))
    if needs_pack(s, t):
        cycles += sum(pack_launch_cycles(bs, bt, model) for _, bs, bt in split_pack(s, t, model))
    return cycles


def choose_variant(s: GemmShape, model=None) -> GemmShape:
    """``s`` with the A-stream variant (:data:`A_STREAMS`) of the lowest estimate under
    ``model``, among those the shape admits."""
    best = None
    for v in A_STREAMS:
        cand = replace(s, a_stream=v)
        try:
            cyc = plan_cycles(cand, model)
        except ValueError:                                  # the variant does not take this shape
            continue
        if best is None or cyc < best[0]:
            best = (cyc, cand)
    if best is None:
        raise ValueError(f"no A-stream variant takes {s}")
    return best[1]


def estimate(spec, model=None) -> float:
    """Modelled seconds of the matmul plan under ``model`` (default: the emulator's TimingModel):
    the pack launch (when the plan has one) and the GEMM launch, for the variant
    :func:`shape_from_spec` chooses under the same model."""
    from .common import timing_model, seconds
    m = timing_model(model)
    return seconds(m, plan_cycles(shape_from_spec(spec, m), m))


def longest_dispatch_seconds(spec, model=None) -> float:
    """Modelled seconds of the longest single launch of the matmul plan (the pack launch or one
    row block of :func:`split_rows`): what the v3d hang check bounds, unlike :func:`estimate`
    (the sum over launches)."""
    from .common import timing_model, seconds
    m = timing_model(model)
    s = shape_from_spec(spec, m)
    t = choose_tiling(s)
    cycles = [gemm_launch_cycles(bs, bt, m) for _, bs, bt in split_rows(s, t, m)]
    if needs_pack(s, t):
        cycles += [pack_launch_cycles(bs, bt, m) for _, bs, bt in split_pack(s, t, m)]
    return seconds(m, max(cycles))


def _register():
    from .. import registry
    registry.register("matmul", supports, generate, estimate)


_register()
