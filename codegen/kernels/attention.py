"""Single-head attention core: out[z] = softmax(Q[z] K[z]^T * scale (+ mask) (+ causal)) V[z].

Semantics (the numpy :func:`reference` implements exactly these)
-----------------------------------------------------------------
* fp32: ``s = (Q K^T) * scale (+ mask)``; causal sets ``s[i, j] = -inf`` for ``j > i``;
  ``p = softmax(s)`` with the formula and special-value rules of :mod:`.softmax` (a row with a
  NaN / +inf score, or fully masked, is NaN); ``out = p V``.
* integers (Q, K int8 / int16, same dtype; V int8 / int16): ``s_int = Q K^T`` in int32 (smul24,
  exact for |q|, |k| < 2**15 and D * max|q k| < 2**31), ``s = float32(s_int) * scale (+ mask)``
  (``scale`` carries the dequantisation, e.g. s_q * s_k / sqrt(D)); the softmax in fp32;
  ``out = (p @ float32(V)) * v_scale`` in fp32 (attr ``v_scale``, default 1). Output float32.

Fused kernel (every T, Dv whose tile fits the register file; see :func:`choose_tiling`)
---------------------------------------------------------------------------------------
A worker takes ``R`` query rows of one batch entry z at a time and keeps everything in registers:

1. scores: lanes run along keys. ``sc[i][b]`` holds ``s[m0 + i, 16 b : 16 b + 16]``. For each d,
   the R values ``Q[m0 + i, d]`` arrive broadcast through the uniform streams: for fp32 with even
   D and R <= 2 straight from Q (row m0 through ``ldunifarf``, row m0 + 1 through ``ldunifrf``
   after a branch redirects the uniform stream; no Q pack, :func:`q_streams`), else from a packed
   Q panel. The key vectors ``K[16 b + lane, d]`` are 16-lane TMU loads from a packed K panel
   (the GEMM pack with 16-row tiles), issued in pairs (``mov(tmua, ptr)``, ``add(tmua, ptr,
   ktb)``, ``ptr += 2 ktb``). The d loop (two d per iteration, double-buffered Q values) is
   placed by a list scheduler (:class:`_Sched`): products on the mul ALU, accumulates on the add
   ALU, lookups / ldtmu / uniform reads wherever a slot is free, the ldtmu of a block kept about
   ``QK_LOOKAHEAD`` instructions after its lookup (TMU latency).
2. softmax in registers: scale (and log2 e) on the mul ALU, mask / causal / key-padding lanes
   to -inf, row max (lane-wise then a rotate butterfly), ``exp2`` on the SFU, row sum, recip
   + Newton (kept per row for the end: normalisation is deferred to the output).
3. ``P V``: lanes run along Dv in column groups of 16 VW: lane l of group g holds columns
   ``16 VW g + VW l + j`` (``VW`` = 4 / 2 for fp32 V whose rows allow vec4 / vec2 lookups, else
   1; :attr:`AttnShape.VW`). For each key t, ``shuffle(sc[i][t // 16], t % 16)`` broadcasts
   ``p[i, t]`` (add ALU), V row t arrives as NG vecVW lookups (``LA`` lookups ahead, within the
   thread's 8-word share of the TMU output FIFO), and the multiply-adds use three product temporaries; the whole unrolled
   phase is placed by the list scheduler (about R / 2 + R NOV + NG instructions per key).
4. ``out = o * recip(sum)``, vecVW stores (lanes < Dv, rows < S).

Tile order: when the K panel + V about fill the L2 (:func:`sawtooth`), alternate tiles walk the
16-key blocks and the keys backwards, so that the Q / output lines entering the L2 between two
rounds cost a miss or two per cache set instead of an LRU cascade through the whole set. Rows
left after the full rounds of two-row tiles go one per worker as one-row tiles
(:func:`split_rows`), which shortens the last round.

Longer keys (the scores of R >= 1 rows do not fit): the same kernel in flash-attention form
(:func:`_flash_tile`). The keys are split into blocks of 16 KB keys; per block the QK phase
fills the scores of the block, the softmax becomes online (running row max m, lane-wise running
sum l, ``alpha = exp2(m_old - m_new)`` rescales l and the output accumulators), and P V adds the
block's contribution; the last block is emitted separately for its exact key count. Nothing goes
through memory but the inputs and the output. (R, KB) minimise :func:`block_cost`.

Unfused plan (:func:`plan_unfused`; fp32 Q / K with D a multiple of 4, or int8 Q / K with D a
multiple of 16 whose scores are exact in fp32; :func:`unfused_refusal`): K^T by a transpose
launch (:func:`ktrans_kernel`: vec4 row reads, one-line stores; int8 bytes sign-extended and
converted), scores = Q K^T and out = P V as gemm.plan_gemm fp32 GEMMs, P = softmax(scores *
scale (+ mask)) by the softmax kernel (a causal flag becomes a constant -inf mask); integer Q
and V get fp32 copies first (V * v_scale). :func:`choose_path` takes it where its estimate under the default
TimingModel is lower: a fused tile of R query rows re-reads all of K and V (through the shared
L2 port, one line per 64 bytes) for every R rows, and the register file bounds R (R = 2 at
T = Dv = 128), while the GEMMs reuse each operand line across a whole tile of rows and columns;
at 1 x 128 x 128 x 128 the unfused plan is modelled 0.37 ms (fp32) / 0.38 ms (int8) against
0.68 / 0.69 ms fused; int16 stays fused (its scores are not exact in fp32). Small
shapes stay fused (fewer launches, no intermediates). It also takes shapes no fused tile fits.

Packing: two-row Q panels through :func:`qpack2_kernel` (whole 64-byte lines: the two rows
interleaved by shuffles), other Q panels through :func:`tpack_kernel` (lanes along d: 16
elements per lookup and one scattered store); K through the GEMM pack (16-row tiles, whose
64-byte stores suit the 16-key panel). Integer V becomes float32 V * v_scale in a pack
(:func:`kernel_shape`) when the keys are blocked or the footprint is small; otherwise the kernel
converts 8 / 16-bit V lookups itself.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, replace

import numpy as np

from .. import asm as A
from ..asm import L, b, mov, nop, sub, add, shl, shr, umul24, eidx, tmuwt, thread_end
from ..instr import MAGIC, RF, Register, is_imm
from ..plan import BufferSpec, KernelPlan, Launch
from . import gemm as G
from . import reduce as RD
from . import softmax as SM
from .common import TMU_FIFO_WORDS

S_ = A.SIGNALS
R_ = A.R
F = A.DSL
tmua, tmud, tmuc, unifa, null = (MAGIC[n] for n in ("tmua", "tmud", "tmuc", "unifa", "null"))

LOG2E = SM.LOG2E
INT_IN = ("int8", "int16")
#: registers the kernel keeps besides the tiles (pointers, constants, temporaries)
FIXED_REGS = 28
#: K panel + V bytes beyond which alternate tiles walk backwards (:func:`sawtooth`)
SAWTOOTH_BYTES = 64 << 10
#: instructions between a K lookup and its ldtmu the QK schedule aims for (TMU latency 80 cycles)
QK_LOOKAHEAD = 22
#: the largest unrolled P V phase (instructions ~ T * (R + NO * (R + 1))) we generate
MAX_PV_INSTR = 12000
#: most 16-key K blocks of a fused tile / flash block: the QK phase keeps one lookup (1 word)
#: per block in flight, within the thread's TMU FIFO share
K_IN_FLIGHT = TMU_FIFO_WORDS
#: fewest V lookups the P V phase keeps in flight (bounds the V lookup width, :attr:`AttnShape.VW`)
PV_MIN_LOOKAHEAD = 4


@dataclass(frozen=True)
class AttnShape:
    B: int
    S: int
    T: int
    D: int
    Dv: int
    dtype: str = "float32"          # Q and K
    v_dtype: str = "float32"
    scale: float = 1.0
    v_scale: float = 1.0
    causal: bool = False
    mask: bool = False
    num_qpus: int = 12

    @property
    def is_int(self) -> bool:
        return self.dtype in INT_IN

    @property
    def NB(self) -> int:
        return -(-self.T // 16)

    @property
    def NO(self) -> int:
        return -(-self.Dv // 16)

    @property
    def VW(self) -> int:
        """V lookup width (words per lane): lane l of V column group g holds the VW consecutive
        columns 16 VW g + VW l + j. vec4 / vec2 need fp32 V whose rows are VW-word aligned, and
        the thread's FIFO share must keep at least PV_MIN_LOOKAHEAD lookups in flight (vec4 would
        leave 2: one lookup of cover, modelled 29 GOP/s for fp32 128 against 37 with vec2); the
        width of least P V instructions per key wins (then fewer registers, then wider)."""
        if self.v_dtype != "float32":
            return 1

        def cost(w):
            ng = -(-self.Dv // (16 * w))
            return (2 * 2 * ng * w + max(2, 2 * ng - 1), ng * w, -w)
        return min((w for w in (4, 2, 1)
                    if self.Dv % w == 0 and TMU_FIFO_WORDS // w >= PV_MIN_LOOKAHEAD), key=cost)

    @property
    def NG(self) -> int:
        """V lookups per key (column groups of 16 VW)."""
        return -(-self.Dv // (16 * self.VW))

    @property
    def NOV(self) -> int:
        """Output accumulators per row (NG groups of VW registers)."""
        return self.NG * self.VW

    def pv_per_key(self, R: int) -> float:
        """Instructions per key of the scheduled P V phase: R shuffles, 2 R NOV multiply-add
        ops and 2 NG - 1 lookup ops over the two ALUs."""
        return (R + 2 * R * self.NOV + max(2, 2 * self.NG - 1)) / 2


@dataclass(frozen=True)
class AttnTiling:
    R: int
    Dpad: int
    MT: int
    W: int
    #: 16-key blocks per key block (flash mode: the scores of one key block are in registers)
    KB: int = 0
    #: key blocks (1: every score of a row is in registers at once; > 1: online softmax)
    nkb: int = 1

    @property
    def flash(self) -> bool:
        return self.nkb > 1

    def tail_blocks(self, s: "AttnShape") -> int:
        """16-key blocks of the last key block."""
        return s.NB - (self.nkb - 1) * self.KB


# ------------------------------------------------------------------------------------------------
# Registers
# ------------------------------------------------------------------------------------------------
FIXED = ("lane", "qt", "qstep", "kp", "vp", "ot", "ostep", "ors", "k2tb", "ktb", "kwrap",
         "kbl", "Sreg", "ninf", "cvec", "vstep", "cdv", "c64", "ptr", "cnt", "sr")


class _Regs:
    """Allocation (raises ValueError when the tile does not fit). Phase temporaries of the QK and
    softmax phases live in the output accumulators, which are free until P V starts."""

    def __init__(self, s: AttnShape, t: AttnTiling):
        p = G._Pool()
        for n in FIXED:
            setattr(self, n, p.take())
        self.Treg = p.take() if s.T % 16 else None          # only for a partial last key block
        self.dvl = p.take() if s.Dv % (16 * s.VW) else None  # only for a partial last column group
        if s.mask:
            self.mt_ptr, self.mstep, self.l2e = p.take(), p.take(), p.take()
        if s.v_dtype in INT_IN:
            self.cfg4, self.vsc = p.take(), p.take()
        self.vcfg = p.take() if s.VW > 1 else None         # tmuc word: 4 vecN lookups
        R, nb, no = t.R, (t.KB if t.flash else s.NB), s.NOV
        if t.flash:                                # key-block walk and online-softmax state
            for n in ("kb", "vb", "key0", "kbc", "kbstep", "vbstep", "tbk", "big", "kwt"):
                setattr(self, n, p.take())
            self.mrun, self.lrun = p.take(R), p.take(R)
        self.tmp = p.take(3)                       # product temporaries (P V: 3 in flight)
        self.kv = p.take(2)
        self.q = p.take(2 * R)                     # Q values (QK); P broadcasts + recips (PV)
        self.sc = [p.take(nb) for _ in range(R)]
        self.o = [p.take(no) for _ in range(R)]
        if t.flash:                                # o is live across key blocks: own temporaries
            self.m, self.dd, self.tv = p.take(), p.take(), p.take()
            self.mv, self.mp = (p.take(), p.take()) if s.mask else (None, None)
            self.l = None
        else:
            flat = [r for row in self.o for r in row] + list(p.free)
            if len(flat) < 6:
                raise ValueError("attention tile does not fit the register file")
            self.m, self.l, self.dd, self.mv, self.tv, self.mp = flat[:6]


def _fits(s: AttnShape, t: AttnTiling) -> bool:
    try:
        _Regs(s, t)
    except (ValueError, IndexError):             # _Pool.take() of one register raises IndexError
        return False
    return True


def _tiling(s: AttnShape, R: int, KB: int = 0, nkb: int = 1) -> AttnTiling:
    MT = -(-s.S // R)
    return AttnTiling(R, -(-s.D // 2) * 2, MT, max(1, min(MT, s.num_qpus)), KB, nkb)


def block_cost(s: AttnShape, R: int, KB: int) -> float:
    """Modelled instructions per (query row, key) of a flash tile with R rows and 16 KB-key
    blocks: QK (D/2 steps of 2 KB (R + 1) + 2), P V (16 KB (R + NO (R + 1))), softmax and
    rescale (R (8 KB + NO + 40)), tile rounds over the workers."""
    per_block = (s.D / 2) * (2 * KB * (R + 1) + 2) + 16 * KB * s.pv_per_key(R) \
        + R * (8 * KB + s.NOV + 40)
    MT = -(-s.S // R)
    rounds = -(-MT // min(MT, s.num_qpus))
    return per_block * rounds / (16 * KB)


def choose_tiling(s: AttnShape) -> AttnTiling | None:
    """Fused tile: the largest R (query rows per tile, <= 16) whose registers hold every score
    of its rows and whose unrolled P V phase stays within MAX_PV_INSTR. Failing that (long keys),
    the flash tiling: key blocks of 16 KB keys with an online softmax, (R, KB) of least modelled
    cost. None when not even that fits (very large Dv)."""
    return _choose_tiling(kernel_shape(s))


def _choose_tiling(s: AttnShape) -> AttnTiling | None:
    if s.NB <= K_IN_FLIGHT:                          # K lookups in flight must fit the TMU FIFO
        for R in range(min(16, s.S), 0, -1):
            if s.T * s.pv_per_key(R) > MAX_PV_INSTR:
                continue
            t = _tiling(s, R)
            if _fits(s, t):
                return t
    best = None
    for R in range(min(16, s.S), 0, -1):
        for KB in range(min(K_IN_FLIGHT, s.NB), 0, -1):
            if 16 * KB * s.pv_per_key(R) > MAX_PV_INSTR:
                continue
            t = _tiling(s, R, KB, -(-s.NB // KB))
            if t.nkb < 2 or not _fits(s, t):
                continue
            c = block_cost(s, R, KB)
            if best is None or c < best[0]:
                best = (c, t)
            break                                    # smaller KB for this R only costs more
    return None if best is None else best[1]


def _wrap_block(nb: int) -> int:
    """The block the K pointer rests on after the lookups of one d: lookups go in pairs
    (mov(tmua, ptr); add(tmua, ptr, ktb); ptr += 2 ktb), the last pair (or a last single lookup)
    leaves it on block 2 ((nb - 1) // 2)."""
    return 2 * ((nb - 1) // 2)


def vec_config(n: int) -> int:
    """tmuc byte of a per-lane vecN load (py-videocore7 TMULookUpConfig: type 2-4 = vec2-vec4)."""
    return 0x80 | (15 << 3) | n


def q_streams(s: AttnShape, t: AttnTiling) -> int:
    """How the QK phase reads Q: 0 from the packed Q panel (unifa); 1 the Q row itself through
    unifa (R = 1, fp32, even D); 2 rows m0 and m0 + 1 from Q itself, one through unifa and one
    through the uniform stream (redirected by a branch per tile; R = 2, fp32, even D): no Q pack."""
    if s.is_int or t.Dpad != s.D or t.R > 2:
        return 0
    return t.R


def _uniforms(s: AttnShape, t: AttnTiling, names, z0: int = 0):
    """The attention launch's uniforms; ``z0``: the launch's first batch entry (a launch over
    batch entries [z0, z0 + nz) sees them as its z = 0 .. nz - 1: the Q, K panel, V and output
    bases move by z0 batch strides)."""
    qn, kn, vn, on, mn = names
    es_v = G.ITEMSIZE[s.v_dtype]
    qts = t.Dpad * t.R * 4
    qbs = s.S * s.D * 4 if q_streams(s, t) else t.MT * qts
    kbs, vbs, obs = s.NB * t.Dpad * 64, s.T * s.Dv * es_v, s.S * s.Dv * 4
    u = [("addr", qn, z0 * qbs), ("u32", qbs), ("u32", qts),                   # Q panel
         ("addr", kn, z0 * kbs), ("u32", kbs),                                 # K panel
         ("addr", vn, z0 * vbs), ("u32", vbs), ("u32", es_v * s.VW),           # V
         ("addr", on, z0 * obs), ("u32", obs), ("u32", t.R * s.Dv * 4),
         ("u32", s.Dv * 4 - 64 * s.NOV), ("u32", t.MT), ("u32", 2 * t.Dpad * 64), ("u32", t.Dpad * 64),
         ("u32", _wrap_block(t.KB if t.flash else s.NB) * t.Dpad * 64 - 64),
         ("u32", t.Dpad // 2), ("u32", s.S - split_rows(s, t)), ("f32", -math.inf),
         ("f32", s.scale * LOG2E),
         ("u32", 16 * s.VW * es_v), ("u32", (s.Dv - 16 * s.VW * max(0, s.NG - 2)) * es_v),
         ("u32", 64), ("u32", (s.Dv - 16 * s.VW * (s.NG - 1)) // s.VW), ("u32", s.T)]
    if s.mask:
        u += [("addr", mn, 0), ("u32", s.T * 4), ("f32", LOG2E)]
    if s.v_dtype in INT_IN:
        u += [("u32", G.config_word([s.v_dtype] * 4)), ("f32", s.v_scale)]
    if s.VW > 1:
        u += [("u32", vec_config(s.VW) * 0x01010101)]
    if t.flash:                                  # kbstep, vbstep, tbk, big, kwt
        u += [("u32", t.KB * t.Dpad * 64), ("u32", 16 * t.KB * s.Dv * es_v), ("u32", 16 * t.KB),
              ("f32", -np.finfo(np.float32).max), ("u32", _wrap_block(t.tail_blocks(s)) * t.Dpad * 64 - 64)]
    return u


# ------------------------------------------------------------------------------------------------
# The fused kernel
# ------------------------------------------------------------------------------------------------
def _label(prefix):
    return f"{prefix}{len(A.Program._stack[-1].items)}"


def attention_kernel(s: AttnShape, t: AttnTiling):
    g = _Regs(s, t)
    ld = lambda r: S_["ldunifrf"](r)  # noqa: E731
    x = g.tmp[0]
    R, NB = t.R, s.NB
    wk = g.sc[0][0]                                        # worker index (prologue only)
    # ---- prologue ---------------------------------------------------------------------------
    eidx(g.lane, sig=ld(g.qt))
    mov(g.cnt, RF[2].unpack("ul"), sig=ld(x))              # z ; Q batch stride
    umul24(x, x, g.cnt)
    add(g.qt, g.qt, x, sig=ld(x))                          # Q tile stride
    mov(wk, RF[3].unpack("ul"))                            # worker index = first tile
    umul24(g.ptr, x, wk)
    add(g.qt, g.qt, g.ptr)
    mov(g.qstep, x, sig=ld(g.kp))                          # (times W below)
    nop(sig=ld(x))                                         # K batch stride
    umul24(x, x, g.cnt)
    add(g.kp, g.kp, x, sig=ld(g.vp))
    shl(g.sr, g.lane, 2)
    add(g.kp, g.kp, g.sr, sig=ld(x))                       # V batch stride
    umul24(x, x, g.cnt)
    add(g.vp, g.vp, x, sig=ld(x))                          # V element size
    umul24(x, x, g.lane)
    add(g.vp, g.vp, x, sig=ld(g.ot))
    nop(sig=ld(x))                                         # out batch stride
    umul24(x, x, g.cnt)
    add(g.ot, g.ot, x, sig=ld(g.ostep))                    # out tile stride
    umul24(x, g.ostep, wk)
    add(g.ot, g.ot, x)
    shl(x, g.lane, 2 + s.VW.bit_length() - 1)
    add(g.ot, g.ot, x, sig=ld(g.ors))                      # + 4 VW lane
    for r in (None, g.k2tb, g.ktb, g.kwrap, g.kbl, g.Sreg, g.ninf, g.cvec, g.vstep, g.cdv, g.c64,
              g.dvl, g.Treg):
        nop(sig=ld(r if r is not None else x))
    _const(x, t.W)
    umul24(g.qstep, g.qstep, x)
    umul24(g.ostep, g.ostep, x)
    if s.mask:
        nop(sig=ld(g.mt_ptr))
        nop(sig=ld(g.mstep))                               # row stride T * 4
        nop(sig=ld(g.l2e))
        umul24(x, wk, R)
        umul24(x, x, g.mstep)
        add(g.mt_ptr, g.mt_ptr, x)
        add(g.mt_ptr, g.mt_ptr, g.sr)                      # + 4 lane
    if s.v_dtype in INT_IN:
        nop(sig=ld(g.cfg4))
        nop(sig=ld(g.vsc))
    if s.VW > 1:
        nop(sig=ld(g.vcfg))
    if t.flash:
        for r in (g.kbstep, g.vbstep, g.tbk, g.big, g.kwt):
            nop(sig=ld(r))
    umul24(g.sr, wk, R)                                    # first query row of the tile

    # ---- tile loop ----------------------------------------------------------------------------
    L.tloop
    for rev in ((False, True) if sawtooth(s, t) else (False,)):
        sub(null, g.sr, g.Sreg, cond="pushn")              # A = the tile has rows (sr < S)
        b(R_.done, cond="anyna")
        if t.flash:
            _flash_tile(s, t, g)
        else:
            _q_start(s, t, g, g.kp)                        # (its first 3: the exit's delay slots)
            if rev:                                        # start at the last 16-key block
                _start_backwards(s, g)
            _qk_phase(s, t, g, s.NB, g.kwrap, rev)
            _softmax_phase(s, t, g)
            _pv_phase(s, t, g, s.T, g.vp, zero=True, rev=rev)
            if rev:
                _toggle_direction(s, g)
        _store_phase(s, t, g)
        add(g.qt, g.qt, g.qstep)
        _const(x, t.W * R)
        add(g.sr, g.sr, x)
        if s.mask:
            umul24(x, x, g.mstep)
            add(g.mt_ptr, g.mt_ptr, x)
        add(g.ot, g.ot, g.ostep)
    b(R_.tloop, cond="always")
    nop()
    nop()
    nop()
    L.done
    if split_rows(s, t):
        _split_tile(s, t, g)
    tmuwt()
    thread_end()


def split_rows(s: AttnShape, t: AttnTiling) -> int:
    """Rows left after the full rounds of R = 2 tiles (every worker busy) that one-row tiles
    share (one row each for that many workers), instead of ceil(rows / 2) workers running a last
    two-row tile while the others wait; 0 when this does not shorten the last round."""
    if t.flash or t.R != 2:
        return 0
    full = t.R * t.W * (s.S // (t.R * t.W))
    rem = s.S - full
    return rem if full and 0 < rem <= t.W else 0


def sawtooth(s: AttnShape, t: AttnTiling) -> bool:
    """Alternate tiles walk K (16-key blocks) and V (keys) backwards, so that the per-cache-set
    order of the K panel and V lines reverses from one tile round to the next: when K panel + V
    (re-read by every tile) about fill the L2, the lines the Q / output traffic pushes out then
    cost a miss or two instead of a cascade through every line of the set (LRU)."""
    if t.flash:
        return False
    return s.NB * t.Dpad * 64 + s.T * s.Dv * G.ITEMSIZE[s.v_dtype] > SAWTOOTH_BYTES


def _start_backwards(s, g):
    """Turn the walk backwards and point the K pointer at the last 16-key block."""
    _toggle_direction(s, g)
    sub(g.ptr, g.ptr, g.kwrap)
    sub(g.ptr, g.ptr, g.c64)
    if s.NB % 2 == 0:
        sub(g.ptr, g.ptr, g.ktb)                       # (ktb < 0 here)


def _toggle_direction(s, g):
    """Swap the K block step / wrap and the V row step between forward and backward walks
    (each an involution): ktb -> -ktb, kwrap -> -kwrap - 128, cdv -> -cdv - 2 (NG - 2) vstep."""
    F["neg"](g.ktb, g.ktb)
    F["neg"](g.k2tb, g.k2tb)
    F["neg"](g.kwrap, g.kwrap)
    sub(g.kwrap, g.kwrap, g.c64)
    sub(g.kwrap, g.kwrap, g.c64)
    F["neg"](g.cdv, g.cdv)
    for _ in range(2 * (s.NG - 2)):
        sub(g.cdv, g.cdv, g.vstep)


def _split_tile(s, t, g):
    """After the full rounds (sr = S_full + 2 w): worker w < rem takes row S_full + w as a
    one-row tile (Sreg becomes S; the Q / out / mask pointers step back w rows)."""
    import copy
    rem = split_rows(s, t)
    x, y = g.o[0][0], g.o[0][1]                           # free outside the P V phase
    sub(x, g.sr, g.Sreg)
    shr(x, x, 1)                                           # x = w
    sub(null, x, rem, cond="pushn") if rem <= 15 else None
    if rem > 15:
        _const(y, rem)
        sub(null, x, y, cond="pushn")                      # A = w < rem
    b(R_.sdone, cond="allna")
    nop()
    nop()
    nop()
    add(g.sr, g.Sreg, x)                                   # the row
    _const(g.Sreg, s.S)
    if q_streams(s, t):                                    # Q rows in place: back w rows
        _const(y, s.D * 4)
        umul24(y, y, x)
        sub(g.qt, g.qt, y)
    else:                                                  # R = 2 panel: tile S_full / 2 + w // 2
        shr(y, x, 1)
        sub(y, x, y)                                       # w - w // 2 tiles back
        umul24(y, y, t.Dpad * 8) if t.Dpad * 8 <= 15 else None
        if t.Dpad * 8 > 15:
            _const(g.o[0][2], t.Dpad * 8)
            umul24(y, y, g.o[0][2])
        sub(g.qt, g.qt, y)
        F["band"](y, x, 1)
        shl(y, y, 2)
        add(g.qt, g.qt, y)                                 # + 4 (w & 1): the row in the tile
    _const(y, s.Dv * 4)
    umul24(y, y, x)
    sub(g.ot, g.ot, y)
    if s.mask:
        umul24(y, g.mstep, x)
        sub(g.mt_ptr, g.mt_ptr, y)
    t1 = replace(t, R=1)
    g1 = copy.copy(g)
    g1.q, g1.sc, g1.o = [g.q[0], g.q[1]], g.sc[:1], g.o[:1]
    g1.qdummy = None if q_streams(s, t) else g.q[3]      # the other row's panel values
    rev = sawtooth(s, t) and (s.S // (t.R * t.W)) % 2 == 1   # against the last full round
    _q_start(s, t1, g1, g.kp)
    if rev:
        _start_backwards(s, g)
    _qk_phase(s, t1, g1, s.NB, g.kwrap, rev)
    _softmax_phase(s, t1, g1)
    _pv_phase(s, t1, g1, s.T, g.vp, zero=True, rev=rev)
    _store_phase(s, t1, g1)
    L.sdone


def _q_start(s, t, g, kbase):
    """Point the Q streams at the tile (unifa: the panel tile or row m0; with two streams the
    uniform stream at row m0 + 1, or at row m0 when that row does not exist), g.ptr at kbase."""
    if q_streams(s, t) == 2:
        x, y = g.dd, g.cnt
        add(x, g.sr, 1)
        sub(null, x, g.Sreg, cond="pushn")                 # A = row m0 + 1 exists
        shl(y, g.kbl, 3)                                   # D * 4 (Dpad = D)
        mov(x, g.qt)
        add(x, x, y, cond="ifa")
        lbl = _label("qs")
        b(getattr(R_, lbl), cond="always").unif_addr(x)
        mov(unifa, g.qt)
        mov(g.ptr, kbase)
        mov(g.tmp[1], 0)
        A.Program._stack[-1].label(lbl)
    else:
        mov(unifa, g.qt)
        mov(g.ptr, kbase)
        mov(g.tmp[1], 0)


def _qsig(s, t, i):
    """The signal reading Q value i (row m0 + i) of the next d."""
    return S_["ldunifrf"] if (i == 1 and q_streams(s, t) == 2) else S_["ldunifarf"]


def _k_issues(g, NB, wrap, op, after=None):
    """The NB lookups of one d, in pairs: mov(tmua, ptr); add(tmua, ptr, ktb); ptr += 2 ktb (the
    last pair, or a last single lookup, wraps to the first block of the next d). ``op(alu, name,
    *args, after=)`` emits one op (after[pos]: the instruction it must follow); returns the
    instruction of each lookup's address write."""
    out = []
    pos = 0
    while pos < NB:
        a = after[pos] if after else -1
        if pos + 1 < NB:
            out.append(op("any", "mov", tmua, g.ptr, after=a))
            out.append(op("any", "add", tmua, g.ptr, g.ktb, after=after[pos + 1] if after else -1))
            last = pos + 2 >= NB
            op("any", "sub" if last else "add", g.ptr, g.ptr, wrap if last else g.k2tb)
            pos += 2
        else:
            out.append(op("any", "mov", tmua, g.ptr, after=a))
            op("any", "sub", g.ptr, g.ptr, wrap)
            pos += 1
    return out


def _direct_op(alu, name, *args, after=-1, **kw):
    (F[name] if alu in ("add", "any") else (lambda *a: getattr(nop(), name)(*a)))(*args)
    return -1


def _qk_phase(s, t, g, NB, wrap, rev=False):
    """Scores of NB 16-key blocks from g.ptr (the K panel; ``wrap`` returns it to the first block
    of the next d; ``rev``: blocks NB - 1 .. 0, the steps toggled); unifa must have been set to
    the Q tile (>= 3 instructions before the first read). The d loop (two d per iteration,
    double-buffered Q values) is placed by :class:`_Sched`: per d and block one ldtmu, the
    lookup of the next d, R multiply / accumulate pairs."""
    R = t.R
    order = list(range(NB))[::-1] if rev else list(range(NB))
    qa, qb = g.q[:R], g.q[R:]
    flat = [r for row in g.sc for r in row[:NB]]
    for i in range(0, len(flat), 2):                       # scores = 0
        ins = sub(flat[i], flat[i], flat[i])               # integer x - x = 0
        if i + 1 < len(flat):
            ins.sub(flat[i + 1], flat[i + 1], flat[i + 1])
    _k_issues(g, NB, wrap, _direct_op)                     # lookups of d = 0 (>= 3 after unifa)
    dummy = getattr(g, "qdummy", None)
    for i in range(R):
        nop(sig=_qsig(s, t, i)(qa[i]))
    if dummy is not None:
        nop(sig=S_["ldunifarf"](dummy))
    mov(g.cnt, g.kbl)
    mul, acc = ("smul24", "add") if s.is_int else ("fmul", "fadd")

    def body(first_after):
        """One iteration (two d); first_after[pos]: the earliest slot of the first d's pops (their
        lookups were issued by the previous iteration). Returns the schedule and the slots of the
        second d's lookups."""
        sch = _Sched()
        sch.op("any", "sub", g.cnt, g.cnt, 1, cond="pushz")
        tmp = list(g.tmp)
        nt = 0
        issued = list(first_after)
        for par in (0, 1):
            cur, nxt = (qa, qb) if par == 0 else (qb, qa)
            loads = list(nxt) + ([dummy] if dummy is not None else [])
            pops = []
            for pos, bb in enumerate(order):
                kv = g.kv[pos % 2]
                pops.append(sch.op(None, None, sig=S_["ldtmu"](kv), reads=("fifo",),
                                   writes=("fifo",), after=issued[pos]))
                for i in range(R):
                    x = tmp[nt % len(tmp)]
                    nt += 1
                    sch.op("mul", mul, x, kv, cur[i])
                    sch.op("add", acc, g.sc[i][bb], g.sc[i][bb], x)
                if pos % 2 == 1 or pos == NB - 1:          # the next d's lookups of this pair
                    lo = pos - (pos % 2)
                    for q_, c in zip(range(lo, pos + 1), _k_issues_pair(sch, g, NB, wrap, lo, pops)):
                        issued[q_] = c
            for n, r in enumerate(loads):                  # the next d's Q values, stream order
                sig = _qsig(s, t, n) if r is not dummy else S_["ldunifarf"]
                stream = "qs1" if sig is S_["ldunifrf"] else "qs0"
                sch.op(None, None, sig=sig(r), reads=(stream,), writes=(stream,))
        return sch, issued

    # a first pass finds where the second d issues its lookups; the second keeps the first d's
    # pops as far from those issues (across the loop edge) as the second d's are from theirs
    sch, iss = body([-1] * NB)
    L1 = len(sch.slots)
    gap = min(L1 // 2, QK_LOOKAHEAD)
    sch, _ = body([max(-1, c - L1 + gap - 1) for c in iss])
    lbl = _label("qk")
    A.Program._stack[-1].label(lbl)
    while len(sch.slots) < 4:
        sch.slots.append([None, None, None])
    head, tail = sch.slots[:len(sch.slots) - 3], sch.slots[len(sch.slots) - 3:]
    sch.slots = head
    sch.emit()
    b(getattr(R_, lbl), cond="anyna")
    sch.slots = tail
    sch.emit()
    for bb in range(NB):                                   # drain the lookups of d = Dpad
        nop(sig=S_["ldtmu"](g.kv[0]))


def _k_issues_pair(sch, g, NB, wrap, lo, pops):
    """Schedule the next d's lookups of blocks at positions lo (and lo + 1), each after the pop of
    the lookup it replaces in the FIFO."""
    def op(alu, name, *args, after=-1):
        return sch.op(alu, name, *args, after=after, reads=("tmuq",) if args[0] is tmua else (),
                      writes=("tmuq",) if args[0] is tmua else ())
    if lo + 1 < NB:
        last = lo + 2 >= NB
        out = [op("any", "mov", tmua, g.ptr, after=pops[lo]),
               op("any", "add", tmua, g.ptr, g.ktb, after=pops[lo + 1])]
        op("any", "sub" if last else "add", g.ptr, g.ptr, wrap if last else g.k2tb)
    else:
        out = [op("any", "mov", tmua, g.ptr, after=pops[lo])]
        op("any", "sub", g.ptr, g.ptr, wrap)
    return out


def _softmax_phase(s, t, g):
    R, NB = t.R, s.NB
    rcp = g.q[R:]
    for i in range(R):
        row = g.sc[i]
        if s.mask:                                         # mask row sr + i, all blocks
            mov(g.mp, g.mt_ptr)
            if i:
                umul24(g.dd, g.mstep, i)
                add(g.mp, g.mp, g.dd)
            for bb in range(NB):
                mov(tmua, g.mp).add(g.mp, g.mp, g.c64)
        mov(g.m, g.ninf)
        mov(g.tv, g.lane)
        if s.causal:
            add(g.dd, g.sr, i) if i <= 15 else None
        for bb, xr in enumerate(row):
            if s.is_int:
                F["itof"](xr, xr)
            F["fmul"](xr, xr, g.cvec)
            if s.mask:
                nop(sig=S_["ldtmu"](g.mv))
                F["fmul"](g.mv, g.mv, g.l2e)
                F["fadd"](xr, xr, g.mv)
            if bb == NB - 1 and s.T % 16:
                sub(null, g.tv, g.Treg, cond="pushn")      # A = key exists
                mov(xr, g.ninf, cond="ifna")
            if s.causal:
                sub(null, g.dd, g.tv, cond="pushn")        # A = row < key
                mov(xr, g.ninf, cond="ifa")
            F["fmax"](g.m, g.m, xr)
            sub(g.tv, g.tv, -16)
        SM.allreduce("fmax", g.m, g.dd)
        mov(g.l, 0)
        for xr in row:
            F["fsub"](g.dd, xr, g.m)
            F["exp"](xr, g.dd)
            F["fadd"](g.l, g.l, xr)
        SM.allreduce("fadd", g.l, g.dd)
        SM.newton_recip(rcp[i], g.l, g.dd)
        if s.v_dtype in INT_IN:
            F["fmul"](rcp[i], rcp[i], g.vsc)


def _zero(regs):
    for i in range(0, len(regs), 2):
        ins = sub(regs[i], regs[i], regs[i])               # integer x - x = 0
        if i + 1 < len(regs):
            ins.sub(regs[i + 1], regs[i + 1], regs[i + 1])


class _Sched:
    """A list scheduler for straight-line code: ops are placed, in program order, in the earliest
    instruction that respects their register dependencies (read after write: a later
    instruction; write after read: the same or a later one; write after write: later), has the
    ALU slot (or either, ``alu="any"``) and the signal slot free, and stays encodable (no small
    immediate beside a signal, one TMU write, no condition beside a register-writing signal).
    Pseudo-registers (strings) order TMU issues and FIFO pops."""

    TMU = ("tmua", "tmud", "tmuc", "tmuau")

    def __init__(self):
        self.slots = []                 # [add, mul, sig]: (name, args, cond) / Signal
        self.wr, self.rd = {}, {}

    @staticmethod
    def _key(r):
        return r if isinstance(r, str) else (r.name if not r.magic else None)

    def _lb(self, dsts, srcs):
        lb = 0
        for r in srcs:
            k = self._key(r) if not is_imm(r) else None
            if k is not None and k in self.wr:
                lb = max(lb, self.wr[k] + 1)
        for r in dsts:
            k = self._key(r)
            if k is not None:
                lb = max(lb, self.wr.get(k, -1) + 1, self.rd.get(k, 0))
        return lb

    def _ok(self, c, alu, args, sig, cond):
        while len(self.slots) <= c:
            self.slots.append([None, None, None])
        sl = self.slots[c]
        if alu is not None and sl[0 if alu == "add" else 1] is not None:
            return False
        if sig is not None and sl[2] is not None:
            return False
        ops = [o for o in sl[:2] if o is not None] + ([("", args, cond)] if alu else [])
        imm = sum(any(is_imm(a) for a in o[1][1:]) for o in ops)
        has_sig = sl[2] is not None or sig is not None
        if imm > 1 or (imm and has_sig):
            return False
        if sum(isinstance(o[1][0], Register) and o[1][0].name in self.TMU for o in ops) > 1:
            return False
        wsig = sl[2] if sl[2] is not None else sig
        if wsig is not None and wsig.dst is not None and any(o[2] for o in ops):
            return False
        return True

    def op(self, alu, name, *args, sig=None, cond=None, after=-1, reads=(), writes=()):
        """Place ``name(*args)`` on the add / mul / "any" ALU (alu None: a signal alone); returns
        the instruction index."""
        dsts = ([args[0]] if args else []) + ([sig.dst] if sig is not None and sig.dst is not None else [])
        dsts += list(writes)
        srcs = list(args[1:]) + list(reads)
        c = max(after + 1, self._lb(dsts, srcs))
        while True:
            alus = ("add", "mul") if alu == "any" else (alu,)
            for a in alus:
                if self._ok(c, a, args, sig, cond):
                    sl = self.slots[c]
                    if a is not None:
                        sl[0 if a == "add" else 1] = (name, args, cond)
                    if sig is not None:
                        sl[2] = sig
                    for r in srcs:
                        k = self._key(r) if not is_imm(r) else None
                        if k is not None:
                            self.rd[k] = max(self.rd.get(k, 0), c)
                    for r in dsts:
                        k = self._key(r)
                        if k is not None:
                            self.wr[k] = c
                    return c
            c += 1

    def emit(self):
        for add_op, mul_op, sig in self.slots:
            if add_op is not None:
                ins = F[add_op[0]](*add_op[1], cond=add_op[2], sig=sig)
            else:
                ins = nop(sig=sig)
            if mul_op is not None:
                getattr(ins, mul_op[0])(*mul_op[1], cond=mul_op[2])


def _pv_phase(s, t, g, T, vsrc, zero, rev=False):
    """o += p V over T keys (V rows from vsrc on; o zeroed first when ``zero``), scheduled by
    :class:`_Sched`. Per key: R shuffles broadcast p[i, t] (add ALU, immediate lane index); NG
    lookups of VW words per lane (the last two of a row as mov(tmua, ptr), add(tmua, ptr, vstep),
    add(ptr, ptr, cdv)); per word one ldtmu (a signal) and R fmul / fadd pairs through three
    product temporaries. Lookups run LA ahead (LA x VW words: the thread's FIFO share)."""
    R, VW, NG = t.R, s.VW, s.NG
    pb = g.q[:R]
    if zero:
        _zero([r for row in g.o for r in row])
    if rev:                                                # from the last row, backwards
        _const(g.tmp[2], (T - 1) * s.Dv * G.ITEMSIZE[s.v_dtype])
        add(g.ptr, vsrc, g.tmp[2])
    else:
        mov(g.ptr, vsrc)
    int_v = s.v_dtype in INT_IN
    total = T * NG
    keys = list(range(T))[::-1] if rev else list(range(T))
    LA = min(TMU_FIFO_WORDS // VW, total)           # LA lookups of VW words in flight
    sch = _Sched()
    issued = [None] * total                    # instruction of each lookup's address write
    pops = [None] * total                      # instruction of each lookup's last pop

    def issue(m):
        if m >= total:
            return
        gg = m % NG
        aft = pops[m - LA] if m >= LA else -1
        if (int_v or VW > 1) and m % 4 == 0:
            sch.op("any", "mov", tmuc, g.cfg4 if int_v else g.vcfg, reads=("tmuq",), writes=("tmuq",),
                   after=aft)
        if NG >= 2 and gg == NG - 2:
            issued[m] = sch.op("any", "mov", tmua, g.ptr, reads=("tmuq",), writes=("tmuq",), after=aft)
        elif NG >= 2 and gg == NG - 1:
            issued[m] = sch.op("any", "add", tmua, g.ptr, g.vstep, reads=("tmuq",), writes=("tmuq",),
                               after=aft)
            sch.op("any", "add", g.ptr, g.ptr, g.cdv)
        else:
            issued[m] = sch.op("any", "mov", tmua, g.ptr, reads=("tmuq",), writes=("tmuq",), after=aft)
            sch.op("any", "add", g.ptr, g.ptr, g.cdv if NG == 1 else g.vstep)

    for m in range(LA):
        issue(m)
    kv = list(g.kv)
    nk = 0
    tmp = list(g.tmp)
    nt = 0
    for kpos, tt in enumerate(keys):
        bb, j = divmod(tt, 16)
        for i in range(R):
            sch.op("add", "shuffle", pb[i], g.sc[i][bb], j)
        for gg in range(NG):
            m = kpos * NG + gg
            for w in range(VW):
                v = kv[nk % len(kv)]
                nk += 1
                c = sch.op(None, None, sig=S_["ldtmu"](v), reads=("fifo",), writes=("fifo",),
                           after=issued[m])
                if w == VW - 1:
                    pops[m] = c
                if int_v:
                    sch.op("add", "itof", v, v)
                for i in range(R):
                    x = tmp[nt % len(tmp)]
                    nt += 1
                    sch.op("mul", "fmul", x, v, pb[i])
                    sch.op("add", "fadd", g.o[i][gg * VW + w], g.o[i][gg * VW + w], x)
            issue(m + LA)
    sch.emit()
    if int_v or (VW > 1 and total % 4):
        mov(tmuc, -1)


def _const(reg, v: int):
    """reg = v (0 <= v < 2**24) from small immediates (nibbles)."""
    digits = []
    while True:
        digits.append(v & 7)
        v >>= 3
        if not v:
            break
    mov(reg, digits[-1])
    for d in reversed(digits[:-1]):
        shl(reg, reg, 3)
        if d:
            add(reg, reg, d)


def _flash_tile(s, t, g):
    """One tile in key blocks of 16 KB keys: per block QK (scores of the block), online softmax
    (running max and lane-wise running sum per row, o rescaled by exp2(m_old - m_new)), P V;
    the last (tail) block is emitted separately for its exact key count. The running max
    starts at -FLT_MAX so that a block whose keys are all masked gives exp2(-inf - m) = 0 rather
    than NaN; a row fully masked overall ends with sum 0 and o 0, i.e. NaN like the reference."""
    R, KB = t.R, t.KB
    Tb = 16 * KB
    mov(g.kb, g.kp)
    mov(g.vb, g.vp)
    mov(g.key0, 0)
    for i in range(R):
        mov(g.mrun[i], g.big).mov(g.lrun[i], 0)
    _zero([r for row in g.o for r in row])
    if t.nkb > 1:
        _const(g.kbc, t.nkb - 1)
        lbl = _label("kblk")
        A.Program._stack[-1].label(lbl)
        _flash_block(s, t, g, KB, Tb, g.kwrap, tail=False)
        sub(g.kbc, g.kbc, 1, cond="pushz")
        add(g.kb, g.kb, g.kbstep)
        b(getattr(R_, lbl), cond="anyna")
        add(g.vb, g.vb, g.vbstep)
        add(g.key0, g.key0, g.tbk)
        nop()
    nbt = t.tail_blocks(s)
    _flash_block(s, t, g, nbt, s.T - (t.nkb - 1) * Tb, g.kwt, tail=True)
    rcp = g.q[R:]
    for i in range(R):
        SM.allreduce("fadd", g.lrun[i], g.dd)
        SM.newton_recip(rcp[i], g.lrun[i], g.dd)
        if s.v_dtype in INT_IN:
            F["fmul"](rcp[i], rcp[i], g.vsc)


def _flash_block(s, t, g, nb, nkeys, wrap, tail):
    _q_start(s, t, g, g.kb)
    _qk_phase(s, t, g, nb, wrap)
    _softmax_flash(s, t, g, nb, tail)
    _pv_phase(s, t, g, nkeys, g.vb, zero=False)


def _softmax_flash(s, t, g, nb, tail):
    """Online softmax of one key block (keys key0 + 16 bb + lane)."""
    R = t.R
    for i in range(R):
        row = g.sc[i][:nb]
        if s.mask:                                         # mask row sr + i from key0
            shl(g.mp, g.key0, 2)
            add(g.mp, g.mp, g.mt_ptr)
            if i:
                umul24(g.dd, g.mstep, i)
                add(g.mp, g.mp, g.dd)
            for bb in range(nb):
                mov(tmua, g.mp).add(g.mp, g.mp, g.c64)
        mov(g.m, g.ninf)
        add(g.tv, g.lane, g.key0)
        if s.causal:
            add(g.dd, g.sr, i)
        for bb, xr in enumerate(row):
            if s.is_int:
                F["itof"](xr, xr)
            F["fmul"](xr, xr, g.cvec)
            if s.mask:
                nop(sig=S_["ldtmu"](g.mv))
                F["fmul"](g.mv, g.mv, g.l2e)
                F["fadd"](xr, xr, g.mv)
            if tail and bb == nb - 1 and s.T % 16:
                sub(null, g.tv, g.Treg, cond="pushn")      # A = key exists
                mov(xr, g.ninf, cond="ifna")
            if s.causal:
                sub(null, g.dd, g.tv, cond="pushn")        # A = row < key
                mov(xr, g.ninf, cond="ifa")
            F["fmax"](g.m, g.m, xr)
            sub(g.tv, g.tv, -16)
        SM.allreduce("fmax", g.m, g.dd)
        F["fmax"](g.m, g.m, g.mrun[i])                     # new running max (>= -FLT_MAX)
        F["fsub"](g.dd, g.mrun[i], g.m)
        F["exp"](g.dd, g.dd)                               # alpha = exp2(m_old - m_new)
        mov(g.mrun[i], g.m)
        F["fmul"](g.lrun[i], g.lrun[i], g.dd)
        for c in range(s.NOV):
            F["fmul"](g.o[i][c], g.o[i][c], g.dd)
        for xr in row:
            F["fsub"](g.dd, xr, g.m)
            F["exp"](xr, g.dd)
            F["fadd"](g.lrun[i], g.lrun[i], xr)


def _store_phase(s, t, g):
    """out rows = o * recip(sum): per row NG stores of VW words per lane (lanes < dvl in the
    last group), rows < S."""
    R, VW, NG = t.R, s.VW, s.NG
    rcp = g.q[R:]
    step = g.c64 if VW == 1 else g.vstep                  # 64 VW bytes (fp32 V when VW > 1)
    mov(g.ptr, g.ot)
    for i in range(R):
        add(g.cnt, g.sr, i)                                # (dd lives in the o registers)
        for gg in range(NG):
            if gg == 0:
                sub(null, g.cnt, g.Sreg, cond="pushn")      # A = row exists
            if gg == NG - 1 and g.dvl is not None:
                sub(null, g.lane, g.dvl, cond="andn")      # A &= lane < columns of the group
            for w in range(VW):
                nop().fmul(tmud, g.o[i][gg * VW + w], rcp[i])
            mov(tmua, g.ptr, cond="ifa").add(g.ptr, g.ptr, step)
        add(g.ptr, g.ptr, g.ors)                           # ors = Dv * 4 - 64 NOV


# ------------------------------------------------------------------------------------------------
# Transposing pack: lanes along the columns (d), 16 elements per lookup
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PanelLayout:
    """Where element (z, r, c) of an input X[z][r][c] lands in a packed panel (byte offset)::

        z * batch + (r // G) * tile + (r % G) * row + (c >> sh) * hi + (c & (2**sh - 1)) * lo

    Q panel (the ``ldunifarf`` stream: R values per d): G = R, row = 4, sh = 0, hi = 4 R.
    K panel (16-key blocks read by vecN lookups, N = 2**sh consecutive d per lane, 64 N bytes per
    lookup): G = 16, row = 4 N, hi = 64 N, lo = 4."""
    G: int
    tile: int
    row: int
    sh: int
    hi: int
    lo: int
    batch: int


def q_layout(R: int, Dpad: int, MT: int) -> PanelLayout:
    return PanelLayout(R, Dpad * R * 4, 4, 0, 4 * R, 0, MT * Dpad * R * 4)


def k_layout(NB: int, Dpad: int, vec: int) -> PanelLayout:
    return PanelLayout(16, Dpad * 64, 4 * vec, vec.bit_length() - 1, 64 * vec, 4, NB * Dpad * 64)


def tpack_workers(rows: int, g: int, batch: int, num_qpus: int):
    """(workers per batch entry, rows per worker): rows per worker are a multiple of G, so every
    worker starts on a tile boundary."""
    want = max(1, num_qpus // max(1, min(batch, num_qpus)))
    rpw = -(-(-(-rows // want)) // g) * g
    return -(-rows // rpw), rpw


def tpack_uniforms(rows, cols, dtype, lay: PanelLayout, rpw, src, dst):
    es = G.ITEMSIZE[dtype]
    ncb = -(-cols // 16)
    last = ncb - 8 * ((ncb - 1) // 8)                      # lookups of the last chunk
    u = [("addr", src, 0), ("u32", rows * cols * es), ("u32", cols * es), ("u32", es),
         ("u32", 16 * es), ("addr", dst, 0), ("u32", lay.batch), ("u32", lay.tile),
         ("u32", lay.row), ("u32", lay.G), ("u32", rows), ("u32", rpw),
         ("u32", (rpw // lay.G) * lay.tile), ("u32", lay.sh), ("u32", (1 << lay.sh) - 1),
         ("u32", lay.hi), ("u32", lay.lo), ("u32", (16 >> lay.sh) * lay.hi),
         ("u32", cols - 16 * (ncb - 1))]
    if dtype in G.SMALL_INT:
        u += [("u32", G.config_word([dtype] * 4)), ("u32", G.config_word([dtype] * (last % 4 or 4)))]
    return u


def tpack_kernel(cols: int, dtype: str, to_float: bool = False):
    """Workgroup (w, 0, z) copies rows [w rpw, (w + 1) rpw) of X[z] (``cols`` elements each) into
    a panel (:class:`PanelLayout`, from the uniforms), 8/16-bit integers sign-extended to int32.
    Lanes run along the columns: per 16-column block one load and one scattered store (lanes past
    ``cols`` are not stored: panel entries never stored stay zero, which pads d exactly)."""
    p = G._Pool()
    (lane, src, rs, es, es16, dst, tstep, rstep, gr, cnt, ap, bstep, nlast, ri, x, y, v,
     sp) = (p.take() for _ in range(18))
    ld = lambda r: S_["ldunifrf"](r)  # noqa: E731
    small = dtype in G.SMALL_INT
    cfg4, cfgr = (p.take(), p.take()) if small else (None, None)
    fs = p.take() if to_float else None                    # integers -> float32 * fs
    ncb = -(-cols // 16)
    eidx(lane, sig=ld(src))
    mov(y, RF[2].unpack("ul"), sig=ld(x))                  # z ; src batch stride
    umul24(x, x, y)
    add(src, src, x, sig=ld(rs))                           # src row stride
    nop(sig=ld(es))
    nop(sig=ld(es16))
    nop(sig=ld(dst))
    nop(sig=ld(x))                                         # dst batch stride
    umul24(x, x, y)
    add(dst, dst, x, sig=ld(tstep))
    nop(sig=ld(rstep))
    nop(sig=ld(gr))
    nop(sig=ld(cnt))                                       # rows
    mov(y, RF[3].unpack("ul"), sig=ld(v))                  # w ; rows per worker
    umul24(x, y, v)                                        # r0 = w rpw
    sub(cnt, cnt, x)                                       # rows from r0 on
    A.DSL["imin"](cnt, cnt, v)                             # rows of this worker
    umul24(x, x, rs, sig=ld(v))                            # v = tiles-of-rpw step
    add(src, src, x)
    umul24(x, y, v, sig=ld(v))                             # v = sh
    add(dst, dst, x, sig=ld(sp))                           # sp = low mask
    shr(ap, lane, v, sig=ld(x))                            # ap = lane >> sh ; x = hi
    umul24(ap, ap, x, sig=ld(x))                           # x = lo
    A.DSL["band"](sp, lane, sp)
    umul24(sp, sp, x)
    add(ap, ap, sp, sig=ld(bstep))                         # panel lane offset
    nop(sig=ld(nlast))
    if small:
        nop(sig=ld(cfg4))
        nop(sig=ld(cfgr))
    if to_float:
        nop(sig=ld(fs))
    umul24(x, lane, es)
    add(src, src, x)                                       # + es * lane
    mov(ri, 0)
    L.rloop
    sub(null, cnt, 1, cond="pushn")                        # A = no rows left
    b(R_.pend, cond="anya")
    add(sp, dst, ap)
    umul24(x, ri, rstep)
    add(sp, sp, x)                                         # panel address of (row, lane)
    mov(x, src)
    chunks = [list(range(c0, min(ncb, c0 + 8))) for c0 in range(0, ncb, 8)]
    for ch in chunks:
        for n, c in enumerate(ch):
            if small and n % 4 == 0:
                mov(tmuc, cfg4 if (len(ch) - n >= 4 or ch[-1] != ncb - 1) else cfgr)
            mov(tmua, x).add(x, x, es16)
        for c in ch:
            if c == ncb - 1:
                sub(null, lane, nlast, cond="pushn")       # A = lane < columns of the block
            nop(sig=S_["ldtmu"](v))
            if to_float:
                F["itof"](v, v)
                nop().fmul(tmud, v, fs)
            else:
                mov(tmud, v)
            if c == ncb - 1:
                mov(tmua, sp, cond="ifa")
            else:
                mov(tmua, sp).add(sp, sp, bstep)
    add(ri, ri, 1)
    sub(null, ri, gr, cond="pushz")                        # A = tile complete
    b(R_.rloop, cond="always")
    add(dst, dst, tstep, cond="ifa")
    mov(ri, 0, cond="ifa")
    add(src, src, rs).sub(cnt, cnt, 1)
    L.pend
    tmuwt()
    thread_end()


def tpack_launch_cycles(rows, cols, dtype, batch, lay: PanelLayout, num_qpus, model, to_float=False) -> float:
    """Modelled cycles of a :func:`tpack_kernel` launch: the busiest QPU's workgroups, each its
    uniform prologue (one uniform per instruction: the first line a round trip, each further
    one what the stream's prefetch does not cover), then per row its loop instructions and one
    round trip per 8 lookups in flight (the rows are new lines: DRAM misses), then its stores'
    completion; bounded below by the DRAM traffic, the L2 port (a row block's load lines and
    its scattered store's lines) and the slice TMUs."""
    from .common import (round_trip, dram_cycles, l2_port_cycles, lookup_lines, slice_tmu_cycles,
                         loop_lengths, stream_stall_per_line)
    m = model
    cpi = m.cycles_per_instruction
    es = G.ITEMSIZE[dtype]
    W, rpw = tpack_workers(rows, lay.G, batch, num_qpus)
    words = G._assemble(tpack_kernel, cols, dtype, to_float, name="tpack")
    loop = loop_lengths(words)[-1]
    nu = len(tpack_uniforms(rows, cols, dtype, lay, rpw, "s", "d")) + int(to_float)
    ncb = -(-cols // 16)
    miss = round_trip(m, True)
    ulines = -(-nu * 4 // m.line_bytes)
    prologue = miss + (ulines - 1) * stream_stall_per_line(m, m.line_bytes / 4 * cpi, True) \
        + (len(words) - loop) * cpi
    per_qpu = -(-W * batch // max(1, min(m.num_qpus, num_qpus)))
    worker = per_qpu * (prologue + min(rpw, rows) * (loop * cpi + -(-ncb // 8) * miss) + m.store_latency)
    blocks = batch * rows * ncb
    # a scattered store's 16 lanes (columns c) land at (c >> sh) hi + (c & (2**sh - 1)) lo
    span = (15 >> lay.sh) * lay.hi + ((1 << lay.sh) - 1) * lay.lo + 4
    store_lines = min(16.0, lookup_lines(m, span))
    l2 = l2_port_cycles(m, blocks * (lookup_lines(m, 16 * es) + store_lines))
    tmu = slice_tmu_cycles(m, blocks, lookup_lines(m, 16 * es), 16, min(W * batch, m.num_qpus))
    dram = dram_cycles(m, batch * rows * cols * (es + 4))
    return max(worker, max(dram, l2, tmu) + miss)


def _tpack_launch(rows, cols, dtype, batch, lay, src, dst, name, num_qpus, fscale=None):
    W, rpw = tpack_workers(rows, lay.G, batch, num_qpus)
    u = tpack_uniforms(rows, cols, dtype, lay, rpw, src, dst)
    if fscale is not None:
        u.append(("f32", fscale))
    return Launch(G._assemble(tpack_kernel, cols, dtype, fscale is not None, name=name),
                  u, (W, 1, batch), 16, num_qpus, 1, name)


def qpack2_kernel(S: int, D: int, Dpad: int, dtype: str, tpw: int):
    """Q panel of two-row tiles (``q_layout(2, ...)``: per d the values of rows 2 m, 2 m + 1)
    written in whole 64-byte lines: per tile and 16-column block the two row segments are loaded
    (lanes along d; 8/16-bit integers sign-extended), then two stores of 16 consecutive panel
    words, lane l taking row l & 1 at d = 16 c + 8 h + l // 2 (two shuffles and a select).
    Workgroup (w, 0, z) packs tiles [w tpw, (w + 1) tpw) of batch entry z; d in [D, Dpad) is
    zero; a missing second row (odd S) repeats the first."""
    p = G._Pool()
    (lane, src, dst, cnt, r0, x, y, i0, i1, sa, sb, ad, rs) = (p.take() for _ in range(13))
    a = p.take(8)
    bb = p.take(8)
    ld = lambda r: S_["ldunifrf"](r)  # noqa: E731
    es = G.ITEMSIZE[dtype]
    small = dtype in G.SMALL_INT
    cfg = p.take() if small else None
    ncb = -(-D // 16)
    nlast = D - 16 * (ncb - 1)
    MT = -(-S // 2)
    eidx(lane, sig=ld(src))                                # Q
    mov(y, RF[2].unpack("ul"), sig=ld(x))                  # z ; Q batch stride
    umul24(x, x, y)
    add(src, src, x, sig=ld(dst))                          # panel
    nop(sig=ld(x))                                         # panel batch stride
    umul24(x, x, y)
    add(dst, dst, x, sig=ld(rs))                           # Q row stride D es
    if small:
        nop(sig=ld(cfg))
    mov(r0, RF[3].unpack("ul"))                            # w
    _const(x, tpw)
    umul24(r0, r0, x)                                      # first tile
    _const(x, Dpad * 8)
    umul24(x, x, r0)
    add(dst, dst, x)                                       # its panel tile
    shl(r0, r0, 1)                                         # its first row
    umul24(x, r0, rs)
    add(src, src, x)
    umul24(x, lane, es)
    add(src, src, x)                                       # + es lane
    shl(x, lane, 2)
    add(dst, dst, x)                                       # + 4 lane
    shr(i0, lane, 1)
    add(i1, i0, 8)
    _const(cnt, tpw)
    L.tl
    _const(x, S)
    sub(null, r0, x, cond="pushn")                         # A = the tile has rows
    sub(null, cnt, 0, cond="andnz")                        # A &= tiles of this worker left
    b(R_.qend, cond="anyna")
    nop()
    nop()
    nop()
    add(x, r0, 1)
    _const(y, S)
    sub(null, x, y, cond="pushn")                          # A = row r0 + 1 exists
    mov(sb, src)
    add(sb, sb, rs, cond="ifa")
    mov(sa, src)
    mov(ad, dst)
    for c0 in range(0, ncb, 4):
        cs = list(range(c0, min(ncb, c0 + 4)))
        for half in (0, 1):                                # row r0 lookups, then row r1
            if small:
                mov(tmuc, cfg)
            for c in cs:
                reg = sa if half == 0 else sb
                mov(tmua, reg)
                add(reg, reg, 16 * es) if 16 * es <= 15 else None
                if 16 * es > 15:
                    _const(x, 16 * es)
                    add(reg, reg, x)
            if small and len(cs) < 4:
                mov(tmuc, -1)                              # unused config bytes: 32-bit again
        for half in (0, 1):
            for n, c in enumerate(cs):
                nop(sig=S_["ldtmu"]((a if half == 0 else bb)[n]))
        for n, c in enumerate(cs):
            if c == ncb - 1 and nlast < 16:
                sub(null, lane, nlast, cond="pushn")       # A = d < D
                mov(a[n], 0, cond="ifna")
                mov(bb[n], 0, cond="ifna")
            if small:
                pass
            elif dtype != "float32":
                raise ValueError(dtype)
            for h, idx in ((0, i0), (1, i1)):
                lim = Dpad - 16 * c - 8 * h                 # panel words of this store: d < Dpad
                if lim <= 0:
                    continue
                F["shuffle"](x, a[n], idx)
                F["shuffle"](y, bb[n], idx)
                F["band"](null, lane, 1, cond="pushz")     # A = even lane: row r0
                mov(x, y, cond="ifna")
                if lim < 8:
                    sub(null, i0, lim, cond="pushn")       # A = d < Dpad
                mov(tmud, x)
                if lim < 8:
                    mov(tmua, ad, cond="ifa")
                else:
                    mov(tmua, ad)
                _const(x, 64)
                add(ad, ad, x)
    _const(x, Dpad * 8)
    add(dst, dst, x)
    add(src, src, rs)
    add(src, src, rs)
    add(r0, r0, 2)
    b(R_.tl, cond="always")
    sub(cnt, cnt, 1)
    nop()
    nop()
    L.qend
    tmuwt()
    thread_end()


def _qpack2_launch(s: AttnShape, t: AttnTiling, src, dst, name):
    want = max(1, s.num_qpus // max(1, min(s.B, s.num_qpus)))
    tpw = -(-t.MT // want)
    W = -(-t.MT // tpw)
    es = G.ITEMSIZE[s.dtype]
    u = [("addr", src, 0), ("u32", s.S * s.D * es), ("addr", dst, 0), ("u32", t.MT * t.Dpad * 8),
         ("u32", s.D * es)]
    if s.dtype in G.SMALL_INT:
        u.append(("u32", G.config_word([s.dtype] * 4)))
    return Launch(G._assemble(qpack2_kernel, s.S, s.D, t.Dpad, s.dtype, tpw, name=name), u,
                  (W, 1, s.B), 16, s.num_qpus, 1, name)


def v_layout(T: int, Dv: int) -> PanelLayout:
    """Row-major float32 V (the integer -> float32 V pack)."""
    return PanelLayout(1, Dv * 4, 0, 0, 4, 0, T * Dv * 4)


def kernel_shape(s: AttnShape) -> AttnShape:
    """The shape the fused kernel sees. Integer V goes through a pack to float32 V * v_scale
    (vector V lookups, no per-lookup conversion in the P V phase) when the keys are blocked
    (flash: V is re-read from DRAM anyway) or K panel + float V stay well inside the L2; else
    (e.g. T = D = Dv = 128) the kernel converts 8/16-bit V lookups itself and keeps the small
    footprint (the pack's DRAM traffic and the L2 misses would cost more than it saves)."""
    if s.v_dtype in INT_IN:
        sf = replace(s, v_dtype="float32", v_scale=1.0)
        tf = _choose_tiling(sf)
        if tf is not None and (tf.flash or not sawtooth(sf, tf)):
            return sf
    return s


# ------------------------------------------------------------------------------------------------
# Plans
# ------------------------------------------------------------------------------------------------
def _pack_launch(gs: G.GemmShape, gt: G.GemmTiling, a_name, p_name, name):
    groups = gs.batch * gt.MT
    kchunk = max(G.PACK_PF, -(-gs.K * groups // 48), -(-gs.K // 0xFFFF))
    kc = -(-gs.K // kchunk)
    return Launch(G._assemble(G.pack_kernel, gs, gt, name=name),
                  G.pack_uniforms(gs, gt, kchunk, a_name, p_name), (kc, gt.MT, gs.batch), 16,
                  gs.num_qpus, 1, name)


def check_limits(s: AttnShape):
    if min(s.B, s.S, s.T, s.D, s.Dv) < 1:
        raise ValueError("empty attention")
    es = G.ITEMSIZE[s.dtype]
    for what, v in {"q": s.B * s.S * s.D * es, "k": s.B * s.T * s.D * es,
                    "v": s.B * s.T * s.Dv * G.ITEMSIZE[s.v_dtype], "out": s.B * s.S * s.Dv * 4,
                    "k panel": s.B * s.NB * (s.D + 2) * 64}.items():
        if v >= G.UMUL24_LIMIT:
            raise ValueError(f"{what} spans {v} bytes: beyond the kernel's 24-bit address arithmetic")
    if s.B > 0xFFFF:
        raise ValueError("B > 65535")


def plan_attention(s: AttnShape, names=("q", "k", "v", "out", "mask"), path: str | None = None,
                   budget_seconds: float | None = None) -> KernelPlan:
    """The fused plan (pack Q, pack K, attention) or the unfused one (:func:`plan_unfused`):
    ``path`` "fused" / "unfused", or (None) the one of lower estimate (:func:`choose_path`)."""
    check_limits(s)
    path = path or choose_path(s)
    if path not in PATHS:
        raise ValueError(f"attention path {path!r}: one of {PATHS}")
    if path == "unfused":
        why = unfused_refusal(s)
        if why:
            raise ValueError(f"no unfused attention plan: {why}")
        return plan_unfused(s, names)
    return plan_fused(s, names, budget_seconds)


def plan_fused(s: AttnShape, names=("q", "k", "v", "out", "mask"), budget_seconds: float | None = None) -> KernelPlan:
    """Fused plan (pack Q, pack K, attention launches over runs of batch entries,
    :func:`batch_split`), or the 3-launch fallback when no tile fits."""
    check_limits(s)
    s0, s = s, kernel_shape(s)
    t = choose_tiling(s)
    if t is None:
        return plan_attention_fallback(s0, names)
    qn, kn, vn, on, mn = names
    es_v0 = G.ITEMSIZE[s0.v_dtype]
    es, es_v = G.ITEMSIZE[s.dtype], G.ITEMSIZE[s.v_dtype]
    pad_in = lambda K: (G.PACK_PF + t.Dpad - K + 2) * es + 64  # noqa: E731
    qp, kp = qn + "_panel", kn + "_panel"
    bufs = [BufferSpec(qn, "input", (s.B, s.S, s.D), s.dtype, s.B * s.S * s.D * es + pad_in(s.D)),
            BufferSpec(kn, "input", (s.B, s.T, s.D), s.dtype, s.B * s.T * s.D * es + pad_in(s.D)),
            BufferSpec(vn, "input", (s.B, s.T, s.Dv), s0.v_dtype, s.B * s.T * s.Dv * es_v0 + 64)]
    if s.mask:
        bufs.append(BufferSpec(mn, "input", (s.S, s.T), "float32", (s.S + t.R) * s.T * 4 + 64))
    bufs.append(BufferSpec(on, "output", (s.B, s.S, s.Dv), "float32"))
    bufs.append(BufferSpec(qp, "scratch", (s.B * t.MT * t.Dpad * t.R + 2 * t.R + 32,), "float32"))
    bufs.append(BufferSpec(kp, "scratch", (s.B * s.NB * t.Dpad * 16 + 64,), "float32"))
    vp = vn
    if s0 is not s:                                   # integer V -> float32 V * v_scale
        vp = vn + "_panel"
        bufs.append(BufferSpec(vp, "scratch", (s.B * s.T * s.Dv + 16 * s.VW + 16,), "float32"))
    else:                                             # vector lookups read past the last row
        bufs[2] = BufferSpec(vn, "input", (s.B, s.T, s.Dv), s.v_dtype,
                             s.B * s.T * s.Dv * es_v + 64 * s.VW + 64)
    q_in_place = q_streams(s, t) > 0                  # Q rows are read in place (no Q pack)
    if q_in_place:
        bufs = [bf for bf in bufs if bf.name != qp]
        qp = qn
    if q_in_place:
        launches = []
    elif t.R == 2:                                    # whole-line stores of row pairs
        launches = [_qpack2_launch(s, t, qn, qp, "attn_pack_q")]
    else:
        launches = [_tpack_launch(s.S, s.D, s.dtype, s.B, q_layout(t.R, t.Dpad, t.MT), qn, qp,
                                  "attn_pack_q", s.num_qpus)]
    gk = G.GemmShape(s.T, 1, s.D, s.B, a_dtype=s.dtype, num_qpus=s.num_qpus)
    tk = G.GemmTiling(16, 2, 4, t.Dpad, s.NB, 1, 1, 1)          # rows across lanes: 64-byte stores
    launches.append(_pack_launch(gk, tk, kn, kp, "attn_pack_k"))
    if vp != vn:
        launches.append(_tpack_launch(s.T, s.Dv, s0.v_dtype, s.B, v_layout(s.T, s.Dv), vn, vp,
                                      "attn_pack_v", s.num_qpus, fscale=s0.v_scale))
    words = attention_words(s, t)
    nz = batch_split(s0, budget_seconds=budget_seconds)
    for z0 in range(0, s.B, nz):
        launches.append(Launch(words, _uniforms(s, t, (qp, kp, vp, on, mn), z0), (t.W, 1, min(nz, s.B - z0)),
                               16, s.num_qpus, 1, "attention" if nz >= s.B else f"attention_z{z0}"))
    plan = KernelPlan("attention", bufs, launches, {}, attrs=_attrs(s0, t), flops=flops(s0),
                      bytes_moved=s.B * ((s.S + s.T) * s.D * es + s.T * s.Dv * es_v0 + s.S * s.Dv * 4))
    from .common import timing_model, seconds
    m = timing_model(None)
    plan.attrs["launch_seconds"] = [seconds(m, c) for c in fused_launch_cycles(s0, m, plan)]
    return plan


@functools.lru_cache(maxsize=64)
def attention_words(s: AttnShape, t: AttnTiling) -> np.ndarray:
    """The fused kernel's machine words for (kernel shape, tiling): assembled once (the plan,
    its batch split and the estimates all read them)."""
    words = G._assemble(attention_kernel, s, t, name="attention")
    words.setflags(write=False)
    return words


@functools.lru_cache(maxsize=64)
def _attention_loops(s: AttnShape, t: AttnTiling) -> tuple:
    from .common import loop_lengths
    return tuple(loop_lengths(attention_words(s, t)))


def batch_split(s0: AttnShape, model=None, budget_seconds: float | None = None) -> int:
    """Batch entries per attention launch: all of them, or (the launch modelled over the
    dispatch budget, default the v3d hang check's, :func:`.common.dispatch_budget_seconds`) the
    most whose launch fits; the persistent launch keeps every batch resident, so the hang check
    bounds each launch. One entry per launch when even that does not fit (the budget check then
    refuses the plan: a single entry's query tiles are not split)."""
    from .common import timing_model, seconds, dispatch_budget_seconds
    m = timing_model(model)
    budget = dispatch_budget_seconds() if budget_seconds is None else budget_seconds
    s = kernel_shape(s0)
    t = choose_tiling(s)

    def launch(nz):
        return seconds(m, _attention_launch_cycles(s0, s, t, m, nz))
    if launch(s.B) <= budget:
        return s.B
    n = max(2, math.ceil(launch(s.B) / budget))
    while n < s.B and launch(-(-s.B // n)) > budget:
        n += 1
    return max(1, -(-s.B // n))


# ------------------------------------------------------------------------------------------------
# Unfused plan: K^T by a transpose launch, then GEMM (Q K^T), softmax (scale, mask), GEMM (P V)
# ------------------------------------------------------------------------------------------------
PATHS = ("fused", "unfused")
#: most d per transpose workgroup (its loop is unrolled: 14 instructions per 4 d)
KT_MAX_CHUNK = 64


def unfused_refusal(s: AttnShape) -> str:
    """Why the unfused plan cannot take ``s`` ("" when it can): the softmax kernel and the GEMMs
    run in fp32, so Q / K must be fp32, or int8 with every partial sum of Q K^T exact in fp32
    (D * 128 * 128 < 2**24; int16 products are not); V fp32, int8 or int16 (made fp32 V *
    v_scale by a pack); D a multiple of the transpose's lookup (4 fp32 / 16 int8 d per lane);
    and a mask and a causal flag not both (the causal mask is a constant of the plan, the user
    mask an input)."""
    if s.dtype not in ("float32", "int8"):
        return "fp32 or int8 q, k only (int16 scores are not exact in fp32)"
    if s.dtype == "float32" and s.v_dtype != "float32":
        return "fp32 attention needs fp32 v"
    if s.dtype == "int8" and s.D * 128 * 128 >= 1 << 24:
        return "int8 scores beyond fp32's exact integers"
    if s.D % kt_step(s):
        return f"D must be a multiple of {kt_step(s)}"
    if s.mask and s.causal:
        return "a mask input together with causal"
    if s.B * s.T * s.D * 4 >= G.UMUL24_LIMIT:
        return "k beyond the transpose's 24-bit address arithmetic"
    from . import softmax as SMX
    try:                                     # the scores [B * S, T] through the softmax kernel
        SMX.check_limits(SMX.SoftmaxShape(s.B * s.S, s.T, s.scale, 0, s.num_qpus))
    except ValueError as e:
        return f"scores {s.B * s.S} x {s.T}: {e}"
    return ""


def kt_step(s: AttnShape) -> int:
    """d per transpose lookup: a vec4 lookup per lane reads 4 fp32 or 16 int8 d of its key row."""
    return 16 if s.dtype == "int8" else 4


def kt_split(s: AttnShape):
    """(d per workgroup, workgroups along d) of the transpose: chunks of equal size dividing D
    (every stored row of K^T is a row < D), at most KT_MAX_CHUNK d, and enough workgroups for
    the QPUs where D allows."""
    nbt = -(-s.T // 16)
    st = kt_step(s)
    q = s.D // st
    divs = [n for n in range(1, q + 1) if q % n == 0 and st * (q // n) <= KT_MAX_CHUNK]
    divs = divs or [q]
    enough = [n for n in divs if nbt * n * s.B >= s.num_qpus]
    n = enough[0] if enough else divs[-1]
    return s.D // n, n


def ktrans_kernel(kb: "RD.Builder", T: int, D: int, dchunk: int, src: str, dst: str, dtype: str = "float32"):
    """Workgroup (tb, dc, z) writes K^T[z][d][t] = K[z][t][d] (float32) for keys t of block tb
    (16 t, one per lane) and d in chunk dc: per 4 words of the key row one vec4 lookup per lane
    (4 fp32 d, or 16 int8 d: each byte sign-extended by a shift pair and converted by ``itof``),
    then one store of 16 consecutive t (one 64-byte line) per d. Lanes with t >= T neither load
    nor store."""
    es = G.ITEMSIZE[dtype]
    per_word = 4 // es
    lane, t, z, a, d, x = kb.reg(6)
    v = kb.reg(4)
    eidx(lane)
    mov(t, RF[3].unpack("ul"))
    mov(z, RF[2].unpack("ul"))
    shl(t, t, 4)
    add(t, t, lane)                                        # key row of the lane
    umul24(a, z, kb.u32(T * D * es))
    umul24(x, t, kb.u32(D * es))
    add(a, a, x)
    umul24(d, z, kb.u32(D * T * 4))
    shl(x, t, 2)
    add(d, d, x)
    mov(x, RF[3].unpack("uh"))                             # dc
    umul24(lane, x, kb.u32(dchunk * es))
    umul24(x, x, kb.u32(dchunk * T * 4))
    add(a, a, lane)
    add(d, d, x)
    add(a, a, kb.addr(src))
    add(d, d, kb.addr(dst))
    cfg, step, row = kb.u32(RD.VEC4_CFG), kb.u32(16), kb.u32(T * 4)
    sub(null, t, kb.u32(T), cond="pushn")                  # A = t < T
    steps = dchunk // (4 * per_word)
    ahead = min(steps, TMU_FIFO_WORDS // 4)

    def issue():
        mov(tmuc, cfg)
        add(a, a, step).mov(tmua, a, cond="ifa")

    def store(val):
        mov(tmud, val)
        add(d, d, row).mov(tmua, d, cond="ifa")

    for _ in range(ahead):
        issue()
    for k in range(steps):
        for j in range(4):
            nop(sig=S_["ldtmu"](v[j]))
        if k + ahead < steps:
            issue()
        for j in range(4):
            if per_word == 1:
                store(v[j])
                continue
            for byte in range(per_word):                   # little-endian: byte 0 = lowest d
                sh = 32 - 8 * (byte + 1)
                if sh:
                    shl(x, v[j], kb.u32(sh))
                    A.DSL["asr"](x, x, kb.u32(24))
                else:
                    A.DSL["asr"](x, v[j], kb.u32(24))
                F["itof"](x, x)
                store(x)
    tmuwt()
    thread_end()


def _kt_launch(s: AttnShape, src: str, dst: str) -> Launch:
    dchunk, ndc = kt_split(s)
    kb = RD.Builder("attn_transpose_k")
    words, unif = kb.build(ktrans_kernel, s.T, s.D, dchunk, src, dst, s.dtype)
    return Launch(words, unif, (-(-s.T // 16), ndc, s.B), 16, s.num_qpus, 1, "attn_transpose_k")


def kt_launch_cycles(s: AttnShape, model=None) -> float:
    """Modelled cycles of the transpose: per 16 keys x 4 d one vec4 lookup (its lanes in 16 key
    rows: one line each) and four one-line stores, over the shared L2 port, the slice TMUs and
    DRAM (K read, K^T written); a workgroup waits a round trip per lookup beyond the two in
    flight, its instructions from the program."""
    from .common import (timing_model, round_trip, dram_cycles, l2_port_cycles, slice_tmu_cycles,
                         build_program)
    m = timing_model(model)
    dchunk, ndc = kt_split(s)
    nbt = -(-s.T // 16)
    st = kt_step(s)
    lookups = s.B * nbt * (s.D // st)
    rows = min(16, s.T)
    l2 = l2_port_cycles(m, lookups * (rows + st))
    tmu = slice_tmu_cycles(m, lookups, rows, 64, min(m.num_qpus, nbt * ndc * s.B))
    dram = dram_cycles(m, s.B * s.T * s.D * (G.ITEMSIZE[s.dtype] + 4))
    kb = RD.Builder("attn_transpose_k")
    n_instr = len(kb.build(ktrans_kernel, s.T, s.D, dchunk, "k", "kt", s.dtype)[0])
    groups = nbt * ndc * s.B
    per_qpu = -(-groups // max(1, min(m.num_qpus, s.num_qpus)))
    steps = dchunk // st
    busiest = per_qpu * (n_instr * m.cycles_per_instruction
                         + steps * round_trip(m, True) / min(steps, TMU_FIFO_WORDS // 4))
    return max(busiest, l2, tmu, dram) + round_trip(m, True)


def _unfused_specs(s: AttnShape):
    """The (GEMM, softmax, GEMM) OpSpecs of the unfused plan (for their estimates)."""
    from ..registry import OpSpec
    f = "float32"
    qk = OpSpec("matmul", [((s.B, s.S, s.D), f), ((s.B, s.D, s.T), f)], ((s.B, s.S, s.T), f), {})
    sm = OpSpec("softmax", [((s.B, s.S, s.T), f)], ((s.B, s.S, s.T), f), {"axis": -1})
    pv = OpSpec("matmul", [((s.B, s.S, s.T), f), ((s.B, s.T, s.Dv), f)], ((s.B, s.S, s.Dv), f), {})
    return qk, sm, pv


def _float_packs(s: AttnShape, names):
    """The fp32 copies the unfused plan makes of integer operands: [(src, dst, rows, cols,
    dtype, scale, launch name)] -- Q (int8 -> fp32) and V (-> fp32 V * v_scale), row-major."""
    qn, _, vn, _, _ = names
    out = []
    if s.dtype != "float32":
        out.append((qn, qn + "_f", s.S, s.D, s.dtype, 1.0, "attn_float_q"))
    if s.v_dtype != "float32":
        out.append((vn, vn + "_f", s.T, s.Dv, s.v_dtype, s.v_scale, "attn_pack_v"))
    return out


def plan_unfused(s: AttnShape, names=("q", "k", "v", "out", "mask")) -> KernelPlan:
    """K^T = transpose(K) (:func:`ktrans_kernel`), scores = Q @ K^T (GEMM), P = softmax(scores *
    scale (+ mask, or the causal mask as a constant)) (softmax kernel), out = P @ V (GEMM). Every
    intermediate is a scratch buffer; the GEMMs are gemm.plan_gemm's (their packs included), so
    their variants and dispatch splits are the GEMM's own. Same semantics as the fused kernel
    (module docstring): the scale and mask are applied in fp32 before the row max. Integer
    operands run in fp32: int8 Q and K are converted exactly (the transpose converts K; every
    partial sum of Q K^T is an integer below 2**24, so the fp32 GEMM gives s_int exactly) and V
    becomes fp32 V * v_scale (as the fused path's V pack)."""
    from . import softmax as SMX
    from .common import timing_model, seconds
    qn, kn, vn, on, mn = names
    ktn, scn, pn = kn + "_t", on + "_scores", on + "_probs"
    packs = _float_packs(s, names)
    conv = {src: dst for src, dst, *_ in packs}
    qg, vg = conv.get(qn, qn), conv.get(vn, vn)
    qk, _, pv = _unfused_specs(s)
    g1 = G.plan_gemm(G.shape_from_spec(qk), names=(qg, ktn, scn, "bias"))
    g2 = G.plan_gemm(G.shape_from_spec(pv), names=(pn, vg, on, "bias"))
    causal = s.causal and not s.mask
    ss = SMX.SoftmaxShape(s.B * s.S, s.T, s.scale, s.S if (s.mask or causal) else 0, s.num_qpus)
    mask_name = mn if s.mask else on + "_causal"
    sm_launch = SMX.softmax_launch(ss, scn, pn, mask_name)
    kt = _kt_launch(s, kn, ktn)
    es, es_v = G.ITEMSIZE[s.dtype], G.ITEMSIZE[s.v_dtype]
    roles = {qn: "input", kn: "input", vn: "input", on: "output", mn: "input", ktn: "scratch",
             scn: "scratch", pn: "scratch"}
    shapes = {qn: ((s.B, s.S, s.D), s.dtype), kn: ((s.B, s.T, s.D), s.dtype),
              vn: ((s.B, s.T, s.Dv), s.v_dtype), on: ((s.B, s.S, s.Dv), "float32"),
              ktn: ((s.B * s.D * s.T,), "float32"), scn: ((s.B * s.S * s.T,), "float32"),
              pn: ((s.B * s.S * s.T,), "float32")}
    nbytes = {qn: s.B * s.S * s.D * es + 64, kn: s.B * s.T * s.D * es + 64,
              vn: s.B * s.T * s.Dv * es_v + 64, scn: SMX.in_nbytes(ss)}
    for src, dst, rows, cols, *_ in packs:
        roles[dst], shapes[dst] = "scratch", ((s.B * rows * cols,), "float32")
    consts = {}
    if s.mask or causal:
        shapes[mask_name] = ((s.S, s.T), "float32")
        nbytes[mask_name] = s.S * s.T * 4 + 64
        roles[mask_name] = "input" if s.mask else "weight"
        if causal:
            consts[mask_name] = np.where(np.triu(np.ones((s.S, s.T), bool), 1), -np.inf, 0.0).astype(np.float32)
    extra = {}                                       # GEMM-only buffers (the A panels)
    for b in g1.buffers + g2.buffers:
        if b.name in roles:
            nbytes[b.name] = max(nbytes.get(b.name, 0), b.nbytes)
        elif b.name != "bias":
            extra[b.name] = b
    order = [qn, kn, vn] + ([mask_name] if (s.mask or causal) else []) + [on, ktn, scn, pn] \
        + [dst for _, dst, *_ in packs]
    bufs = [BufferSpec(n, roles[n], shapes[n][0], shapes[n][1], nbytes.get(n, 0)) for n in order]
    bufs += list(extra.values())
    m = timing_model(None)
    conv_launches = [_tpack_launch(rows, cols, dt, s.B, v_layout(rows, cols), src, dst, name, s.num_qpus,
                                   fscale=sc) for src, dst, rows, cols, dt, sc, name in packs]
    launches = conv_launches + [kt] + g1.launches + [sm_launch] + g2.launches
    sm_spec = _unfused_specs(s)[1]
    launch_seconds = ([seconds(m, c) for c in _float_pack_cycles(s, packs, m)]
                      + [seconds(m, kt_launch_cycles(s, m))] + list(g1.attrs["launch_seconds"])
                      + [SMX.estimate(sm_spec, m)] + list(g2.attrs["launch_seconds"]))
    attrs = dict(s.__dict__, path="unfused", launch_seconds=launch_seconds)
    return KernelPlan("attention", bufs, launches, consts, attrs=attrs, flops=flops(s),
                      bytes_moved=s.B * ((s.S + s.T) * s.D * es + s.T * s.Dv * es_v + s.S * s.Dv * 4))


def _float_pack_cycles(s: AttnShape, packs, m) -> list:
    return [tpack_launch_cycles(rows, cols, dt, s.B, v_layout(rows, cols), s.num_qpus, m, to_float=True)
            for _, _, rows, cols, dt, _, _ in packs]


def unfused_seconds(s: AttnShape, model=None) -> float:
    """Estimate of the unfused plan: the fp32 conversions, the transpose, and the GEMMs' and the
    softmax's own estimates."""
    from . import softmax as SMX
    from .common import timing_model, seconds
    m = timing_model(model)
    qk, sm, pv = _unfused_specs(s)
    packs = sum(_float_pack_cycles(s, _float_packs(s, ("q", "k", "v", "o", "m")), m))
    return seconds(m, packs + kt_launch_cycles(s, m)) + G.estimate(qk, m) + SMX.estimate(sm, m) \
        + G.estimate(pv, m)


def choose_path(s: AttnShape) -> str:
    """"unfused" where it can take ``s`` and its estimate under the default TimingModel is below
    the fused plan's (the plan must not depend on the model it is later run or estimated under),
    else "fused"."""
    if unfused_refusal(s):
        return "fused"
    if choose_tiling(s) is None:
        return "unfused"
    return "unfused" if unfused_seconds(s) < fused_seconds(s) else "fused"


def flops(s: AttnShape) -> int:
    return 2 * s.B * s.S * s.T * (s.D + s.Dv)


def _attrs(s, t):
    d = dict(s.__dict__)
    d["tiling"] = None if t is None else t.__dict__
    d["fused"] = t is not None
    return d


def plan_attention_fallback(s: AttnShape, names):
    raise ValueError(f"attention T={s.T}, Dv={s.Dv}: no tile fits the register file (not even one "
                     "query row with one 16-key block)")


def reference(s: AttnShape, q, k, v, mask=None) -> np.ndarray:
    """numpy reference with the kernel's semantics (module docstring)."""
    with np.errstate(invalid="ignore", over="ignore"):
        if s.is_int:
            sc = np.matmul(q.astype(np.int64), np.swapaxes(k.astype(np.int64), -1, -2))
            sc = ((sc + (1 << 31)) % (1 << 32) - (1 << 31)).astype(np.float64) * float(np.float32(s.scale))
        else:
            sc = np.matmul(q.astype(np.float64), np.swapaxes(k.astype(np.float64), -1, -2)) * s.scale
        if mask is not None:
            sc = sc + np.asarray(mask, np.float64)
        if s.causal:
            sc = np.where(np.triu(np.ones((s.S, s.T), bool), 1), -np.inf, sc)
        m = sc.max(axis=-1, keepdims=True)
        e = np.exp(sc - m)
        p = e / e.sum(axis=-1, keepdims=True)
        out = np.matmul(p, v.astype(np.float64))
        if s.v_dtype in INT_IN:
            out = out * s.v_scale
        return out.astype(np.float32)


# ------------------------------------------------------------------------------------------------
# Registry
# ------------------------------------------------------------------------------------------------
def spec_shape(spec) -> AttnShape:
    (qs, qd), (ks, _), (vs, vd) = spec.inputs[:3]
    a = spec.attrs
    D = qs[-1]
    return AttnShape(int(qs[0]), int(qs[1]), int(ks[1]), int(D), int(vs[2]), qd, vd,
                     float(a.get("scale", 1.0 / math.sqrt(D))), float(a.get("v_scale", 1.0)),
                     bool(a.get("causal", False)), bool(a.get("mask", False)))


def supports(spec):
    if len(spec.inputs) not in (3, 4):
        return False, "attention takes q, k, v (and an optional mask)"
    (qs, qd), (ks, kd), (vs, vd) = spec.inputs[:3]
    if not (len(qs) == len(ks) == len(vs) == 3):
        return False, "q, k, v must be [B, S, D], [B, T, D], [B, T, Dv]"
    if qs[0] != ks[0] or ks[0] != vs[0] or qs[2] != ks[2] or ks[1] != vs[1]:
        return False, "inconsistent q / k / v shapes"
    if qd != kd:
        return False, "q and k must share a dtype"
    if qd == "float32" and vd != "float32":
        return False, "fp32 attention needs fp32 v"
    if qd != "float32" and (qd not in INT_IN or vd not in INT_IN):
        return False, f"integer attention takes int8/int16 q, k, v (got {qd}, {vd})"
    if bool(spec.attrs.get("mask", False)) != (len(spec.inputs) == 4):
        return False, "attrs['mask'] must match the presence of the mask input"
    s = spec_shape(spec)
    try:
        check_limits(s)
    except ValueError as e:
        return False, str(e)
    if choose_tiling(s) is None and unfused_refusal(s):
        return False, (f"T={s.T}, Dv={s.Dv}: not even one query row with one 16-key block fits "
                       f"the register file, and no unfused plan ({unfused_refusal(s)})")
    return True, ""


def generate(spec, constants=None) -> KernelPlan:
    return plan_attention(spec_shape(spec))


def estimate(spec, model=None) -> float:
    """Modelled seconds of the plan :func:`generate` makes (fused or unfused, :func:`choose_path`)
    under ``model`` (default: the emulator's TimingModel)."""
    s = spec_shape(spec)
    if choose_path(s) == "unfused":
        return unfused_seconds(s, model)
    return fused_seconds(s, model)


def fused_seconds(s0: AttnShape, model=None) -> float:
    """Modelled seconds of the fused attention plan under ``model`` (default: the emulator's
    TimingModel): the sum of :func:`fused_launch_cycles`."""
    from .common import timing_model, seconds
    m = timing_model(model)
    return seconds(m, sum(fused_launch_cycles(s0, m)))


def fused_launch_cycles(s0: AttnShape, model=None, plan=None) -> list:
    """Modelled cycles of each launch of the fused plan under ``model``:

    * K pack: the GEMM pack's cost (:func:`gemm.pack_launch_cycles`);
    * Q / V packs: streaming copies, their DRAM traffic (read + float32 panel written) plus a round
      trip;
    * the fused kernel (per launch over ``nz`` batch entries): :func:`_attention_launch_cycles`.
    """
    from .common import timing_model, round_trip, dram_cycles
    m = timing_model(model)
    s = kernel_shape(s0)
    t = choose_tiling(s)
    if t is None:
        raise ValueError("no fused attention tile fits this shape")
    plan = plan or plan_fused(s0)
    es = G.ITEMSIZE[s.dtype]
    out = []
    for L in plan.launches:
        if L.name == "attn_pack_k":
            gk = G.GemmShape(s.T, 1, s.D, s.B, a_dtype=s.dtype, num_qpus=s.num_qpus)
            tk = G.GemmTiling(16, 2, 4, t.Dpad, s.NB, 1, 1, 1)
            out.append(G.pack_launch_cycles(gk, tk, m))
        elif L.name == "attn_pack_q" and t.R != 2:
            out.append(tpack_launch_cycles(s.S, s.D, s.dtype, s.B, q_layout(t.R, t.Dpad, t.MT), s.num_qpus, m))
        elif L.name == "attn_pack_q":
            out.append(dram_cycles(m, s.B * s.S * s.D * (es + 4)) + round_trip(m, True))
        elif L.name == "attn_pack_v":
            out.append(tpack_launch_cycles(s.T, s.Dv, s0.v_dtype, s.B, v_layout(s.T, s.Dv), s.num_qpus, m,
                                           to_float=True))
        elif L.name.startswith("attention"):
            out.append(_attention_launch_cycles(s0, s, t, m, L.workgroups[2]))
        else:
            raise ValueError(f"attention estimate: unknown launch {L.name!r}")
    return out


def _attention_launch_cycles(s0: AttnShape, s: AttnShape, t: AttnTiling, m, nz: int) -> float:
    """The fused kernel over ``nz`` batch entries: the busiest worker's tiles; a tile's
    instructions come from the program (the tile loop, plus the QK d-loop body for its remaining
    ``Dpad / 2 - 1`` trips; flash tiles from the schedule's per-block counts), and each key's V
    lookups wait what their ``LA``-lookup lead does not cover of a round trip (V lines miss
    once); bounded below by the DRAM traffic, the shared L2 port and the slice TMUs."""
    from .common import (round_trip, dram_cycles, miss_fraction, l2_port_cycles, lookup_lines,
                         slice_tmu_cycles, stream_stall_per_line)
    cpi = m.cycles_per_instruction
    loops = _attention_loops(s, t)
    # a worker's start: its uniform prologue (the first line a round trip, each further one what
    # the stream's prefetch does not cover) and the code outside the tile loop
    nu = len(_uniforms(s, t, ("q", "k", "v", "o", "m")))
    ulines = -(-nu * 4 // m.line_bytes)
    start = round_trip(m, True) + (ulines - 1) * stream_stall_per_line(m, m.line_bytes / 4 * cpi, True) \
        + (len(attention_words(s, t)) - loops[-1]) * cpi
    if t.flash:
        tile = t.nkb * ((t.Dpad // 2) * (2 * t.KB * (t.R + 1) + 2) + 16 * t.KB * s.pv_per_key(t.R)
                        + t.R * (8 * t.KB + s.NOV + 40)) + 2 * t.R * s.NOV
    else:
        tile = loops[-1] + (t.Dpad // 2 - 1) * loops[0]
    v_bytes = nz * s.T * s.Dv * G.ITEMSIZE[s.v_dtype]
    v_miss = miss_fraction(m, v_bytes, nz * t.MT * s.T * s.NG * 16 * s.VW * 4 / m.line_bytes)
    LA = min(8, 16 // s.VW, s.T * s.NG)
    lead = LA / s.NG * s.pv_per_key(t.R) * cpi
    tile_cycles = tile * cpi + s.T * max(0.0, round_trip(m, v_miss) - lead) + round_trip(m, True)
    qpus = max(1, min(m.num_qpus, s.num_qpus))
    rounds = max(-(-nz * t.MT // qpus), -(-t.MT // t.W))
    es, es_v0 = G.ITEMSIZE[s.dtype], G.ITEMSIZE[s0.v_dtype]
    moved = nz * ((s.S + s.T) * s.D * es + s.T * s.Dv * es_v0 + 2 * s.S * s.Dv * 4)
    # shared L2 port: per tile, one K-panel line per 16-key block and d, the V lookups
    # (NG per key, VW elements of V per lane), and the output stores
    v_span = 16 * s.VW * G.ITEMSIZE[s.v_dtype]
    tile_lines = s.NB * t.Dpad + s.T * s.NG * lookup_lines(m, v_span) \
        + t.R * s.NG * lookup_lines(m, 64 * s.VW)
    # slice TMUs: K-panel lookups (16 words) and V lookups (16 VW words)
    tmu = slice_tmu_cycles(m, nz * t.MT * s.NB * t.Dpad, 1, 16, qpus) \
        + slice_tmu_cycles(m, nz * t.MT * s.T * s.NG, lookup_lines(m, v_span), 16 * s.VW, qpus)
    return max(start + rounds * tile_cycles, dram_cycles(m, moved), l2_port_cycles(m, nz * t.MT * tile_lines), tmu)


def longest_dispatch_seconds(spec, model=None) -> float:
    """Modelled seconds of the longest launch of the plan :func:`generate` makes (placement's
    dispatch-budget rule): from the plan's ``launch_seconds`` (default TimingModel), or under
    ``model`` launch by launch for the fused plan."""
    s = spec_shape(spec)
    plan = plan_attention(s)
    if model is None or plan.attrs.get("path") == "unfused":
        return max(plan.attrs["launch_seconds"])
    from .common import seconds
    return seconds(model, max(fused_launch_cycles(s, model, plan)))


def bench_cases():
    """(name, OpSpec, input generator(rng) -> dict) for the benchmark script."""
    from ..registry import OpSpec
    cases = []
    for name, dt in (("attention_fp32_128", "float32"), ("attention_int8_128", "int8"),
                     ("attention_int16_128", "int16")):
        B, S, T, D = 1, 128, 128, 128
        spec = OpSpec("attention", [((B, S, D), dt), ((B, T, D), dt), ((B, T, D), dt)],
                      ((B, S, D), "float32"),
                      {"scale": (1 / math.sqrt(D)) if dt == "float32" else 1e-3, "causal": False,
                       "mask": False})

        def gen(rng, dt=dt, B=B, S=S, T=T, D=D):
            if dt == "float32":
                f = lambda *sh: rng.standard_normal(sh).astype(np.float32)  # noqa: E731
            else:
                f = lambda *sh: rng.integers(-100, 100, sh).astype(dt)  # noqa: E731
            return {"q": f(B, S, D), "k": f(B, T, D), "v": f(B, T, D)}
        cases.append((name, spec, gen))
    return cases


def _register():
    from ..registry import register
    register("attention", supports, generate, estimate)


_register()
