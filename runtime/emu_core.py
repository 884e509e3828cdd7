"""The QPU emulator's hot loop (numba, ``@njit(cache=True)``).

This module owns the numeric contract between the pre-decoder (:mod:`emu_decode`) and the
interpreter: the op ids, the columns of the instruction table, the state arrays and the fault
codes. Everything here works on plain numpy arrays so that it compiles to machine code and is
cached on disk across processes.

Layout of one pre-decoded instruction (a row of ``code``, int64):

* ``F_KIND`` 0 = ALU, 1 = branch; ``F_SIG`` signal bit mask (``S_*``); ``F_SIGDST`` the
  register a register-writing signal targets (``0..63`` = rf, ``64 + waddr`` = magic);
  ``F_MAXREG`` the highest rf index the instruction touches (checked against the thread's share).
* per ALU (``ADD_BASE`` / ``MUL_BASE`` + offset): ``OP`` op id (``OP_*``), ``DST`` (-1 none, 0..63
  rf, 64 + waddr magic), ``PACK`` (``P_*``), ``UA`` / ``UB`` unpack codes (``U_*``), ``SA`` / ``SB``
  sources (0..63 rf, or ``IMM_FLAG | bits`` for a small immediate), ``COND`` (-1, or 0 ifa,
  1 ifb, 2 ifna, 3 ifnb), ``PF`` push (0, 1 z, 2 n, 3 c), ``UF`` update (0, or 4..15).
* branch: ``B_COND``, ``B_BDI``, ``B_ADDR`` (absolute byte address or signed byte offset),
  ``B_LINK``, ``B_UB``, ``B_BDU``, ``B_RADDR``.

All semantics are documented in ``docs/emulator.md``; the sources are cited there.
"""
from __future__ import annotations

import math
import os
import stat
import tempfile

import numpy as np
from numba import njit
from numba.core import config as _numba_config


def _dir_writable(path: str) -> bool:
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path):
            pass
        return True
    except OSError:
        return False


def ensure_numba_cache_dir() -> str:
    """Make sure the compiled core can be cached across processes.

    numba caches next to this file (``__pycache__``) when it can: editable installs and
    writable site-packages. For a read-only install, unless the user chose ``NUMBA_CACHE_DIR``,
    point numba at ``$XDG_CACHE_HOME/tvm_qpu/numba`` (``~/.cache/...``), or a per-user temp
    directory as a last resort. Returns the directory in use.

    numba loads pickled index files from its cache folder, so a fallback folder is created
    mode 0700 and one that is not a directory of this user's own, or that others may write to
    (a predictable ``/tmp`` name someone else created first), is refused with PermissionError."""
    if _numba_config.CACHE_DIR:
        return _numba_config.CACHE_DIR
    here = os.path.join(os.path.dirname(os.path.abspath(__file__)), "__pycache__")
    if _dir_writable(here):
        return here
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    uid = os.getuid() if hasattr(os, "getuid") else 0
    for cand in (os.path.join(base, "tvm_qpu", "numba"),
                 os.path.join(tempfile.gettempdir(), f"tvm_qpu-numba-{uid}")):
        try:
            os.makedirs(cand, mode=0o700, exist_ok=True)
        except OSError:
            continue
        st = os.lstat(cand)
        problem = ("it is not a directory" if not stat.S_ISDIR(st.st_mode)
                   else f"it belongs to uid {st.st_uid}, not to you (uid {uid})" if st.st_uid != uid
                   else f"others may write to it (mode {stat.S_IMODE(st.st_mode):o})" if st.st_mode & 0o022
                   else "")
        if problem and hasattr(os, "getuid"):
            raise PermissionError(f"refusing the numba cache folder {cand}: {problem}; numba would load "
                                  "pickled code from it. Remove it, or set NUMBA_CACHE_DIR to a folder of "
                                  "your own.")
        if _dir_writable(cand):
            _numba_config.CACHE_DIR = cand
            return cand
    return ""


NUMBA_CACHE_DIR = ensure_numba_cache_dir()

# --------------------------------------------------------------------------------------------
# Op ids: one per operation name of codegen/isa.py (emu_decode maps names -> ids; a test checks
# that every op of isa.OPS has an id here).
# --------------------------------------------------------------------------------------------
OP_NAMES = (
    "nop", "fadd", "faddnf", "fsub", "fmin", "fmax", "fmul", "fcmp", "add", "sub", "mov", "fmov",
    "imin", "imax", "umin", "umax", "shl", "shr", "asr", "ror", "band", "bor", "bxor", "bnot",
    "neg", "clz", "umul24", "smul24", "multop", "vfpack", "vfmin", "vfmax", "vfmul", "vadd",
    "vsub", "quad_rotate", "rotate", "shuffle", "tidx", "eidx", "lr", "vfla", "vflna", "vflb",
    "vflnb", "flafirst", "flnafirst", "barrierid", "tmuwt", "recip", "rsqrt", "rsqrt2", "exp",
    "log", "sin", "ballot", "bcastf", "alleq", "allfeq", "fround", "ftrunc", "ffloor", "fceil",
    "ftoin", "ftoiz", "ftouz", "itof", "utof", "fdx", "fdy", "vpack", "v8pack", "v10pack",
    "ftounorm16", "vftounorm8", "ftosnorm16", "vftosnorm8", "vftounorm10lo", "vftounorm10hi",
    "v11fpack", "flapush", "flbpush", "flpop", "setmsf", "setrevf", "msf", "revf",
    # ops the emulator does not implement (they fault with a clear message; docs/emulator.md
    # says why each has no meaning in a compute dispatch):
    "xcd", "ycd", "fxcd", "fycd", "iid", "sampid", "vpmwt", "ldvpmv_in", "ldvpmd_in", "ldvpmp",
    "ldvpmg_in", "ftoc",
)
OP_ID = {n: i for i, n in enumerate(OP_NAMES)}
#: first op id that the emulator refuses to execute
OP_FIRST_UNSUPPORTED = OP_ID["xcd"]

(OP_NOP, OP_FADD, OP_FADDNF, OP_FSUB, OP_FMIN, OP_FMAX, OP_FMUL, OP_FCMP, OP_ADD, OP_SUB, OP_MOV,
 OP_FMOV, OP_IMIN, OP_IMAX, OP_UMIN, OP_UMAX, OP_SHL, OP_SHR, OP_ASR, OP_ROR, OP_BAND, OP_BOR,
 OP_BXOR, OP_BNOT, OP_NEG, OP_CLZ, OP_UMUL24, OP_SMUL24, OP_MULTOP, OP_VFPACK, OP_VFMIN,
 OP_VFMAX, OP_VFMUL, OP_VADD, OP_VSUB, OP_QUAD_ROTATE, OP_ROTATE, OP_SHUFFLE, OP_TIDX, OP_EIDX,
 OP_LR, OP_VFLA, OP_VFLNA, OP_VFLB, OP_VFLNB, OP_FLAFIRST, OP_FLNAFIRST, OP_BARRIERID, OP_TMUWT,
 OP_RECIP, OP_RSQRT, OP_RSQRT2, OP_EXP, OP_LOG, OP_SIN, OP_BALLOT, OP_BCASTF, OP_ALLEQ,
 OP_ALLFEQ, OP_FROUND, OP_FTRUNC, OP_FFLOOR, OP_FCEIL, OP_FTOIN, OP_FTOIZ, OP_FTOUZ, OP_ITOF,
 OP_UTOF, OP_FDX, OP_FDY, OP_VPACK, OP_V8PACK, OP_V10PACK, OP_FTOUNORM16,
 OP_VFTOUNORM8, OP_FTOSNORM16, OP_VFTOSNORM8, OP_VFTOUNORM10LO, OP_VFTOUNORM10HI, OP_V11FPACK,
 OP_FLAPUSH, OP_FLBPUSH, OP_FLPOP, OP_SETMSF, OP_SETREVF, OP_MSF, OP_REVF) = range(OP_FIRST_UNSUPPORTED)

# unpack codes (normalised over the f32 / f16 / int schemes of isa.py)
U_NONE, U_ABS, U_L, U_H, U_SAT, U_NSAT, U_MAX0, U_R32, U_RL2H, U_RH2L, U_SWAP, U_UL, U_UH, U_IL, U_IH = range(15)
P_NONE, P_L, P_H = 0, 1, 2

# signal bits
S_THRSW, S_LDUNIF, S_LDUNIFA, S_LDUNIFRF, S_LDUNIFARF, S_LDTMU, S_WRTMUC, S_UNSUPPORTED = (
    1, 2, 4, 8, 16, 32, 64, 128)

IMM_FLAG = 1 << 40
MAGIC_BASE = 64

# magic write addresses used by the core (values from isa.MAGIC_WADDR; emu_decode checks them)
W_QUAD, W_NULL, W_UNIFA, W_TMUD, W_TMUA, W_TMUAU = 5, 6, 9, 11, 12, 13
W_SYNCB, W_TMUC, W_TMUDREF, W_TMUOFF, W_REP = 18, 32, 38, 39, 55

# instruction table columns
F_KIND, F_SIG, F_SIGDST, F_MAXREG = 0, 1, 2, 3
ADD_BASE, MUL_BASE = 4, 14
OP, DST, PACK, UA, UB, SA, SB, COND, PF, UF = range(10)
B_COND, B_BDI, B_ADDR, B_LINK, B_UB, B_BDU, B_RADDR = 4, 5, 6, 7, 8, 9, 10
NF = 24

# per-context integer state columns (``ist``)
(ST_STATE, ST_PC, ST_UNIF, ST_UNIFA, ST_LINK, ST_TMUCFG, ST_NDATA, ST_THR_CNT, ST_LAST, ST_END_CNT,
 ST_BR_CNT, ST_BR_TARGET, ST_BR_UNIF, ST_BR_UNIF_SET, ST_FIFO_HEAD, ST_FIFO_COUNT, ST_FIFO_WORDS,
 ST_BARRIER_PEND, ST_WG, ST_SLOT, ST_INSTRS, ST_RTOP_SET) = range(22)
ST_ULINE, ST_UREQ = 22, 24           # two columns each: + stream (0 uniforms, 1 unifa); see below
#: ST_MSF + lane: the lane's multisample flags (4-bit sample mask; 0xF for the lanes < wg_size
#: of a compute workgroup, 0 for the others); ST_REVF: the revolving flag of each lane (bit l)
ST_MSF = 26
ST_REVF = 42
#: ST_LANES: how many lanes of this batch belong to its workgroup (1..16)
ST_LANES = 43
NIST = 44
#: uniform-stream line state (timing only): ST_ULINE + s is the line the stream s reads now,
#: ST_UREQ + s the last line it has requested; FT_URDY + 4 s + (line % 4) when each is ready.
# per-context float state (``fst``): times in QPU cycles
FT_READY, FT_STORE_DONE, FT_LOAD_DONE, FT_BARRIER_ARRIVE, FT_URDY = range(5)
NFST = 4 + 8
# context states
CTX_FREE, CTX_RUN, CTX_BARRIER, CTX_DONE = 0, 1, 2, 3

FIFO_CAP = 16          # ring entries per context (>= the largest allowed FIFO depth)
REQ_RING = 64          # per-QPU ring of in-flight request completion times (>= queue depth)

# global float state (``gst``): G_L2_FREE when the shared L2 takes its next line, G_UCACHE + s
# when slice s's uniform cache can start its next line fill (times in QPU cycles)
G_MEM_FREE, G_NEXT_WG, G_LRU_CLOCK, G_L2_FREE, G_UCACHE = 0, 1, 2, 3, 4
NGST = 4 + 16

# timing parameter vector (``prm``); cycle_model.TimingModel.as_array() fills it
(PR_CPI, PR_TMU_LAT, PR_DRAM_LAT, PR_MEM_BPC, PR_TMU_CPL, PR_REQ_DEPTH, PR_FIFO_WORDS,
 PR_LINE, PR_THREADS, PR_QUANTUM, PR_L2_SETS, PR_L2_WAYS, PR_STORE_LAT, PR_UNIF_PF, PR_L2_CPL,
 PR_QPS, PR_UNIF_CPL, PR_TMU_CPW) = range(18)
NPRM = 18

# statistics (``stats``, int64)
(SX_INSTR, SX_TMU_LOADS, SX_TMU_STORES, SX_BYTES_LOADED, SX_BYTES_STORED, SX_STALL, SX_L2_HITS,
 SX_L2_MISSES, SX_DRAM_BYTES, SX_THRSW, SX_ATOMICS) = range(11)
NSTATS = 11

# launch vector (``wg_dims``): workgroup counts x, y, z; LA_STRICT 1 = our own code (Mesa's
# stricter rules and faults where the published evidence does not fix the hardware's behaviour),
# 0 = foreign code run as the hardware runs it (EmulatorDevice.load_program(hazards="hardware"))
LA_STRICT = 3
NLA = 4

# faults
(FLT_NONE, FLT_BAD_ADDR, FLT_FIFO_EMPTY, FLT_FIFO_OVERFLOW, FLT_BUDGET, FLT_REG_SHARE, FLT_PC_RANGE,
 FLT_UNSUPPORTED_OP, FLT_UNSUPPORTED_MAGIC, FLT_UNSUPPORTED_SIG, FLT_MISALIGNED, FLT_TMUD_OVERFLOW,
 FLT_TMU_OP, FLT_UNIF_ADDR, FLT_DEADLOCK, FLT_UNIF_STALE, FLT_UNIF_REDIRECT) = range(17)
#: ``run`` returns this when the host set its ``stop`` flag (Ctrl-C; checked once per quantum)
FLT_INTERRUPTED = 17
# fault record: [code, ctx, pc, a, b]

PAGE_SHIFT = 12


# --------------------------------------------------------------------------------------------
# Bit helpers
# --------------------------------------------------------------------------------------------
@njit(cache=True, inline="always")
def _flush(u):
    """Flush a denormal float32 bit pattern to a signed zero (the QPU flushes denormals)."""
    if (u & np.uint32(0x7F800000)) == 0:
        return u & np.uint32(0x80000000)
    return u


@njit(cache=True)
def f16_to_f32_bits(h):
    h = np.uint32(h) & np.uint32(0xFFFF)
    sign = (h & np.uint32(0x8000)) << np.uint32(16)
    e = (h >> np.uint32(10)) & np.uint32(0x1F)
    m = h & np.uint32(0x3FF)
    if e == 0:
        return sign                       # zero or denormal (flushed)
    if e == 31:
        return sign | np.uint32(0x7F800000) | (m << np.uint32(13))
    return sign | ((e + np.uint32(112)) << np.uint32(23)) | (m << np.uint32(13))


@njit(cache=True)
def f32_bits_to_f16(x):
    """float32 bits -> float16 bits, round to nearest even, denormal results flushed."""
    x = np.uint32(x)
    sign = (x >> np.uint32(16)) & np.uint32(0x8000)
    e = np.int64((x >> np.uint32(23)) & np.uint32(0xFF))
    m = np.int64(x & np.uint32(0x7FFFFF))
    if e == 0xFF:
        if m != 0:
            return sign | np.uint32(0x7E00)
        return sign | np.uint32(0x7C00)
    ee = e - 112
    if ee >= 31:
        return sign | np.uint32(0x7C00)
    if ee <= 0:
        return sign
    mant = m >> 13
    rem = m & 0x1FFF
    h = (ee << 10) | mant
    if rem > 0x1000 or (rem == 0x1000 and (mant & 1) == 1):
        h += 1
    if h >= 0x7C00:
        h = 0x7C00
    return sign | np.uint32(h)


@njit(cache=True, inline="always")
def _sext(v, bits):
    v = np.int64(v) & ((1 << bits) - 1)
    if v >= (1 << (bits - 1)):
        v -= (1 << bits)
    return v


# --------------------------------------------------------------------------------------------
# Operand unpacking (vector, in place on a 16-lane uint32 row)
# --------------------------------------------------------------------------------------------
@njit(cache=True)
def unpack_f32(S, row, code):
    """Apply a float32 source modifier to 16 lanes of bits, then flush denormals."""
    for l in range(16):
        x = S[row, l]
        if code == U_ABS:
            x = x & np.uint32(0x7FFFFFFF)
        elif code == U_L:
            x = f16_to_f32_bits(x & np.uint32(0xFFFF))
        elif code == U_H:
            x = f16_to_f32_bits(x >> np.uint32(16))
        S[row, l] = _flush(x)


@njit(cache=True)
def unpack_f16pair(S, row, code):
    """Source-1 modifier of vfmin / vfmax / vfmul (a pair of float16 in one word)."""
    for l in range(16):
        x = S[row, l]
        if code == U_R32:
            h = f32_bits_to_f16(_flush(x))
            x = h | (h << np.uint32(16))
        elif code == U_RL2H:
            h = x & np.uint32(0xFFFF)
            x = h | (h << np.uint32(16))
        elif code == U_RH2L:
            h = x >> np.uint32(16)
            x = h | (h << np.uint32(16))
        elif code == U_SWAP:
            x = (x >> np.uint32(16)) | (x << np.uint32(16))
        S[row, l] = x


@njit(cache=True)
def unpack_int(S, row, code):
    for l in range(16):
        x = S[row, l]
        if code == U_UL:
            x = x & np.uint32(0xFFFF)
        elif code == U_UH:
            x = x >> np.uint32(16)
        elif code == U_IL:
            x = np.uint32(_sext(x, 16) & 0xFFFFFFFF)
        elif code == U_IH:
            x = np.uint32(_sext(x >> np.uint32(16), 16) & 0xFFFFFFFF)
        S[row, l] = x


@njit(cache=True)
def pack_f32(S, row, code):
    """Output pack of float results: l / h write the float16 of the result into that half
    (the other half is written as 0)."""
    for l in range(16):
        x = _flush(S[row, l])
        if code == P_L:
            x = f32_bits_to_f16(x)
        elif code == P_H:
            x = f32_bits_to_f16(x) << np.uint32(16)
        S[row, l] = x


# --------------------------------------------------------------------------------------------
# Scalar float helpers
# --------------------------------------------------------------------------------------------
@njit(cache=True, inline="always")
def _fmin_bits(a, b, fa, fb, want_max):
    """IEEE minNum / maxNum on float32 (a NaN operand yields the other operand; -0 < +0)."""
    if fa != fa:
        return b
    if fb != fb:
        return a
    if fa == fb:
        # equal values: order by sign bit (-0 < +0)
        sa = a >> np.uint32(31)
        if want_max:
            return a if sa == 0 else b
        return a if sa == 1 else b
    if (fa < fb) != want_max:
        return a
    return b


@njit(cache=True, inline="always")
def _f2i_sat(x, lo, hi):
    if x != x:
        return 0
    if x <= lo:
        return np.int64(lo)
    if x >= hi:
        return np.int64(hi)
    return np.int64(x)


@njit(cache=True, inline="always")
def _round_half_even(x):
    r = np.floor(x + 0.5)
    if r - x == 0.5 and (r % 2.0) != 0.0:
        r -= 1.0
    return r


@njit(cache=True, inline="always")
def _to_f32_bits(tmpf, tmpu, v):
    tmpf[0] = np.float32(v)
    return _flush(tmpu[0])


# --------------------------------------------------------------------------------------------
# One ALU operation over 16 lanes.
#   a, b: source bits (already unpacked where the op's scheme says so); fa, fb: float views
#   r: result bits; fr: float view; c: carry flag per lane (0/1)
# Returns 0, or a fault code.
# --------------------------------------------------------------------------------------------
@njit(cache=True, inline="always")
def _int_op(op, S, ia, ib, rr, C, alu):
    """imin .. bnot over 16 lanes (inlined into the interpreter's fast path)."""
    m32 = np.int64(0xFFFFFFFF)
    for l in range(16):
        C[alu, l] = 0
    if op == OP_IMIN or op == OP_IMAX:
        for l in range(16):
            sx = _sext(S[ia, l], 32)
            sy = _sext(S[ib, l], 32)
            C[alu, l] = 1 if sx > sy else 0
            v = min(sx, sy) if op == OP_IMIN else max(sx, sy)
            S[rr, l] = np.uint32(v & m32)
    elif op == OP_UMIN or op == OP_UMAX:
        for l in range(16):
            x = S[ia, l]
            y = S[ib, l]
            C[alu, l] = 1 if x > y else 0
            S[rr, l] = min(x, y) if op == OP_UMIN else max(x, y)
    elif op == OP_SHL:
        for l in range(16):
            S[rr, l] = np.uint32((np.int64(S[ia, l]) << (S[ib, l] & np.uint32(31))) & m32)
    elif op == OP_SHR:
        for l in range(16):
            S[rr, l] = S[ia, l] >> (S[ib, l] & np.uint32(31))
    elif op == OP_ASR:
        for l in range(16):
            S[rr, l] = np.uint32((_sext(S[ia, l], 32) >> np.int64(S[ib, l] & np.uint32(31))) & m32)
    elif op == OP_ROR:
        for l in range(16):
            sh = np.int64(S[ib, l] & np.uint32(31))
            xi = np.int64(S[ia, l])
            S[rr, l] = np.uint32(((xi >> sh) | (xi << (32 - sh))) & m32)
    elif op == OP_BAND:
        for l in range(16):
            S[rr, l] = S[ia, l] & S[ib, l]
    elif op == OP_BOR:
        for l in range(16):
            S[rr, l] = S[ia, l] | S[ib, l]
    elif op == OP_BXOR:
        for l in range(16):
            S[rr, l] = S[ia, l] ^ S[ib, l]
    else:  # OP_BNOT
        for l in range(16):
            S[rr, l] = ~S[ia, l]
    return 0
    return 0


@njit(cache=True)
def alu_op(op, ua, ub, pack, S, F, ia, ib, rr, C, alu, FLA, FLB, ctx, ctx_tidx, link, tmpu, tmpf):
    m32 = np.int64(0xFFFFFFFF)
    if op == OP_FMUL or op == OP_FADD or op == OP_FADDNF or op == OP_FSUB or op == OP_FMIN \
            or op == OP_FMAX or op == OP_FCMP:
        unpack_f32(S, ia, ua)
        unpack_f32(S, ib, ub)
        for l in range(16):
            x = F[ia, l]
            y = F[ib, l]
            if op == OP_FMUL:
                F[rr, l] = np.float32(x * y)
            elif op == OP_FADD or op == OP_FADDNF:
                F[rr, l] = np.float32(x + y)
            elif op == OP_FSUB:
                F[rr, l] = np.float32(x - y)
            elif op == OP_FCMP:
                F[rr, l] = np.float32(x - y)
            elif op == OP_FMIN:
                S[rr, l] = _fmin_bits(S[ia, l], S[ib, l], x, y, False)
            else:
                S[rr, l] = _fmin_bits(S[ia, l], S[ib, l], x, y, True)
            # float "carry": x <= y for fcmp (Mesa fge = fcmp(b, a) + pushc); result <= 0 otherwise
            if op == OP_FCMP:
                C[alu, l] = 1 if x <= y else 0
            else:
                C[alu, l] = 1 if F[rr, l] <= 0.0 else 0
        if op == OP_FCMP:
            for l in range(16):
                S[rr, l] = _flush(S[rr, l])
        else:
            pack_f32(S, rr, pack)
        return 0
    if op == OP_ADD or op == OP_SUB:
        for l in range(16):
            x = np.int64(S[ia, l])
            y = np.int64(S[ib, l])
            if op == OP_ADD:
                s = x + y
                C[alu, l] = 1 if s > m32 else 0
            else:
                s = x - y
                C[alu, l] = 1 if x < y else 0
            S[rr, l] = np.uint32(s & m32)
        return 0
    if op == OP_NOP:
        return 0
    if op == OP_MOV:
        unpack_int(S, ia, ua)
        for l in range(16):
            S[rr, l] = S[ia, l]
            C[alu, l] = 0
        return 0
    if op == OP_FMOV:
        code = ua
        if code == U_SAT or code == U_NSAT or code == U_MAX0:
            unpack_f32(S, ia, U_NONE)
        else:
            unpack_f32(S, ia, code)
        for l in range(16):
            x = F[ia, l]
            if code == U_SAT:
                if x != x:
                    x = np.float32(0.0)
                x = min(max(x, np.float32(0.0)), np.float32(1.0))
            elif code == U_NSAT:
                if x != x:
                    x = np.float32(0.0)
                x = min(max(x, np.float32(-1.0)), np.float32(1.0))
            elif code == U_MAX0:
                if x != x or x < 0.0:
                    x = np.float32(0.0)
            F[rr, l] = x
            C[alu, l] = 1 if x <= 0.0 else 0
        pack_f32(S, rr, pack)
        return 0
    if op >= OP_IMIN and op <= OP_BNOT:
        return _int_op(op, S, ia, ib, rr, C, alu)
    if op == OP_NEG:
        for l in range(16):
            S[rr, l] = np.uint32((-np.int64(S[ia, l])) & m32)
            C[alu, l] = 0
        return 0
    if op == OP_CLZ:
        for l in range(16):
            x = S[ia, l]
            n = 0
            bit = np.uint32(0x80000000)
            while n < 32 and (x & bit) == 0:
                n += 1
                bit = bit >> np.uint32(1)
            S[rr, l] = n
            C[alu, l] = 0
        return 0
    if op == OP_UMUL24 or op == OP_SMUL24:
        for l in range(16):
            if op == OP_UMUL24:
                v = (np.int64(S[ia, l]) & 0xFFFFFF) * (np.int64(S[ib, l]) & 0xFFFFFF)
            else:
                v = _sext(S[ia, l], 24) * _sext(S[ib, l], 24)
            S[rr, l] = np.uint32(v & m32)
            C[alu, l] = 0
        return 0
    if op == OP_VFPACK:
        unpack_f32(S, ia, ua)
        unpack_f32(S, ib, ub)
        for l in range(16):
            S[rr, l] = f32_bits_to_f16(S[ia, l]) | (f32_bits_to_f16(S[ib, l]) << np.uint32(16))
            C[alu, l] = 0
        return 0
    if op == OP_VFMIN or op == OP_VFMAX or op == OP_VFMUL:
        unpack_f16pair(S, ia, ua)
        for l in range(16):
            out = np.uint32(0)
            for half in range(2):
                sh = np.uint32(16 * half)
                ha = f16_to_f32_bits((S[ia, l] >> sh) & np.uint32(0xFFFF))
                hb = f16_to_f32_bits((S[ib, l] >> sh) & np.uint32(0xFFFF))
                tmpu[0] = ha
                tmpu[1] = hb
                x = tmpf[0]
                y = tmpf[1]
                if op == OP_VFMUL:
                    tmpf[2] = np.float32(x * y)
                    rb = tmpu[2]
                else:
                    rb = _fmin_bits(ha, hb, x, y, op == OP_VFMAX)
                out |= f32_bits_to_f16(rb) << sh
            S[rr, l] = out
            C[alu, l] = 0
        return 0
    if op == OP_VADD or op == OP_VSUB:
        for l in range(16):
            out = np.uint32(0)
            for half in range(2):
                sh = np.uint32(16 * half)
                x = np.int64((S[ia, l] >> sh) & np.uint32(0xFFFF))
                y = np.int64((S[ib, l] >> sh) & np.uint32(0xFFFF))
                v = x + y if op == OP_VADD else x - y
                out |= np.uint32(v & 0xFFFF) << sh
            S[rr, l] = out
            C[alu, l] = 0
        return 0
    if op == OP_ROTATE:
        n = np.int64(S[ib, 0] & np.uint32(15))
        for l in range(16):
            S[rr, l] = S[ia, (l + n) & 15]
            C[alu, l] = 0
        return 0
    if op == OP_QUAD_ROTATE:
        for l in range(16):
            q = l & 12
            n = np.int64(S[ib, q] & np.uint32(3))
            S[rr, l] = S[ia, q + (((l & 3) + n) & 3)]
            C[alu, l] = 0
        return 0
    if op == OP_SHUFFLE:
        for l in range(16):
            S[rr, l] = S[ia, S[ib, l] & np.uint32(15)]
            C[alu, l] = 0
        return 0
    if op == OP_TIDX or op == OP_EIDX or op == OP_LR or op == OP_BARRIERID or op == OP_TMUWT:
        for l in range(16):
            if op == OP_TIDX:
                S[rr, l] = np.uint32(ctx_tidx)
            elif op == OP_EIDX:
                S[rr, l] = np.uint32(l)
            elif op == OP_LR:
                S[rr, l] = np.uint32(link & m32)
            else:
                S[rr, l] = 0
            C[alu, l] = 0
        return 0
    if op >= OP_VFLA and op <= OP_FLNAFIRST:
        first = -1
        for l in range(16):
            want = FLA[ctx, l] if (op == OP_FLAFIRST or op == OP_VFLA) else (
                1 - FLA[ctx, l] if (op == OP_FLNAFIRST or op == OP_VFLNA) else (
                    FLB[ctx, l] if op == OP_VFLB else 1 - FLB[ctx, l]))
            if op == OP_FLAFIRST or op == OP_FLNAFIRST:
                S[rr, l] = 1 if (want == 1 and first < 0) else 0
                if want == 1 and first < 0:
                    first = l
            else:
                # vfla / vflna / vflb / vflnb: the flag in each 16-bit half (0x00010001)
                S[rr, l] = np.uint32(want) * np.uint32(0x00010001)
            C[alu, l] = 0
        return 0
    if op >= OP_RECIP and op <= OP_SIN:
        unpack_f32(S, ia, U_NONE)
        for l in range(16):
            x = np.float64(F[ia, l])
            if op == OP_RECIP:
                v = 1.0 / x if x != 0.0 else math.copysign(math.inf, x)
            elif op == OP_RSQRT or op == OP_RSQRT2:
                if x == 0.0:
                    v = math.copysign(math.inf, x)
                elif x < 0.0 or x != x:
                    v = math.nan
                else:
                    v = 1.0 / math.sqrt(x)
            elif op == OP_EXP:
                v = 2.0 ** x if x < 200.0 else math.inf
            elif op == OP_LOG:
                if x == 0.0:
                    v = -math.inf
                elif x < 0.0 or x != x:
                    v = math.nan
                else:
                    v = math.log2(x)
            else:
                v = math.sin(math.pi * x) if not math.isinf(x) else math.nan
            S[rr, l] = _to_f32_bits(tmpf, tmpu, v)
            C[alu, l] = 1 if v <= 0.0 else 0
        return 0
    if op == OP_BALLOT:
        mask = np.uint32(0)
        for l in range(16):
            if S[ia, l] != 0:
                mask |= np.uint32(1) << np.uint32(l)
        for l in range(16):
            S[rr, l] = mask
            C[alu, l] = 0
        return 0
    if op == OP_BCASTF:
        v0 = S[ia, 0]
        for l in range(16):
            S[rr, l] = v0
            C[alu, l] = 0
        return 0
    if op == OP_ALLEQ or op == OP_ALLFEQ:
        ok = 1
        for l in range(16):
            if op == OP_ALLEQ:
                if S[ia, l] != S[ia, 0]:
                    ok = 0
            elif not (F[ia, l] == F[ia, 0]):
                ok = 0
        for l in range(16):
            S[rr, l] = ok
            C[alu, l] = 0
        return 0
    if op >= OP_FROUND and op <= OP_FCEIL:
        unpack_f32(S, ia, ua)
        for l in range(16):
            x = np.float64(F[ia, l])
            if x != x or math.isinf(x):
                v = x
            elif op == OP_FROUND:
                v = _round_half_even(x)
            elif op == OP_FTRUNC:
                v = np.trunc(x)
            elif op == OP_FFLOOR:
                v = np.floor(x)
            else:
                v = np.ceil(x)
            if v == 0.0:
                v = math.copysign(0.0, x)
            F[rr, l] = np.float32(v)
            C[alu, l] = 1 if v <= 0.0 else 0
        pack_f32(S, rr, pack)
        return 0
    if op == OP_FTOIN or op == OP_FTOIZ or op == OP_FTOUZ:
        unpack_f32(S, ia, ua)
        for l in range(16):
            x = np.float64(F[ia, l])
            if op == OP_FTOIN:
                v = _f2i_sat(_round_half_even(x) if x == x else x, -2147483648.0, 2147483647.0)
            elif op == OP_FTOIZ:
                v = _f2i_sat(np.trunc(x), -2147483648.0, 2147483647.0)
            else:
                v = _f2i_sat(np.trunc(x), 0.0, 4294967295.0)
            S[rr, l] = np.uint32(v & m32)
            C[alu, l] = 0
        return 0
    if op == OP_ITOF or op == OP_UTOF:
        for l in range(16):
            if op == OP_ITOF:
                v = np.float64(_sext(S[ia, l], 32))
            else:
                v = np.float64(S[ia, l])
            F[rr, l] = np.float32(v)
            C[alu, l] = 1 if v <= 0.0 else 0
        return 0
    if op == OP_FDX or op == OP_FDY:
        unpack_f32(S, ia, ua)
        for l in range(16):
            if op == OP_FDX:
                lo = l & 14
                F[rr, l] = np.float32(F[ia, lo + 1] - F[ia, lo])
            else:
                q = l & 12
                j = l & 1
                F[rr, l] = np.float32(F[ia, q + 2 + j] - F[ia, q + j])
            C[alu, l] = 0
        pack_f32(S, rr, pack)
        return 0
    if op == OP_VPACK or op == OP_V8PACK or op == OP_V10PACK:
        # Mesa nir_opcodes.py: pack_2x32_to_2x16_v3d, pack_4x16_to_4x8_v3d,
        # pack_uint_32_to_r10g10b10a2_v3d
        for l in range(16):
            x = np.int64(S[ia, l])
            y = np.int64(S[ib, l])
            if op == OP_VPACK:
                v = (x & 0xFFFF) | (y << 16)
            elif op == OP_V8PACK:
                v = (x & 0xFF) | ((x & 0xFF0000) >> 8) | ((y & 0xFF) << 16) | ((y & 0xFF0000) << 8)
            else:
                v = (x & 0x3FF) | (((x >> 16) & 0x3FF) << 10) | ((y & 0x3FF) << 20) | (((y >> 16) & 0x3) << 30)
            S[rr, l] = np.uint32(v & m32)
            C[alu, l] = 0
        return 0
    if op == OP_FTOUNORM16 or op == OP_VFTOUNORM8:
        # Mesa nir_opcodes.py: f2unorm_16_v3d = _mesa_float_to_unorm16(x);
        # pack_2x16_to_unorm_2x8_v3d = unorm8 of each float16 half, at bits 0 and 16
        if op == OP_FTOUNORM16:
            unpack_f32(S, ia, U_NONE)
        for l in range(16):
            if op == OP_FTOUNORM16:
                S[rr, l] = np.uint32(_to_unorm(np.float64(F[ia, l]), 65535.0))
            else:
                out = np.uint32(0)
                for half in range(2):
                    tmpu[0] = f16_to_f32_bits((S[ia, l] >> np.uint32(16 * half)) & np.uint32(0xFFFF))
                    out |= np.uint32(_to_unorm(np.float64(tmpf[0]), 255.0)) << np.uint32(16 * half)
                S[rr, l] = out
            C[alu, l] = 0
        return 0
    if op == OP_FTOSNORM16 or op == OP_VFTOSNORM8 or op == OP_VFTOUNORM10LO or op == OP_VFTOUNORM10HI:
        # Mesa nir_opcodes.py / nir_constant_expressions.py: f2snorm_16_v3d = pack_snorm_1x16
        # (a uint16: the int16 in the low half, high half 0); pack_2x16_to_snorm_2x8_v3d = an
        # 8-bit snorm of each float16 half at bits 0 and 16; pack_2x16_to_unorm_2x10_v3d /
        # pack_2x16_to_unorm_10_2_v3d = unorm10 of each half / unorm10 low, unorm2 high
        if op == OP_FTOSNORM16:
            unpack_f32(S, ia, U_NONE)
        for l in range(16):
            if op == OP_FTOSNORM16:
                S[rr, l] = np.uint32(_to_snorm(np.float64(F[ia, l]), 32767.0) & 0xFFFF)
            else:
                out = np.uint32(0)
                for half in range(2):
                    tmpu[0] = f16_to_f32_bits((S[ia, l] >> np.uint32(16 * half)) & np.uint32(0xFFFF))
                    x = np.float64(tmpf[0])
                    if op == OP_VFTOSNORM8:
                        v = _to_snorm(x, 127.0) & 0xFF
                    elif op == OP_VFTOUNORM10LO or half == 0:
                        v = _to_unorm(x, 1023.0)
                    else:
                        v = _to_unorm(x, 3.0)
                    out |= np.uint32(v) << np.uint32(16 * half)
                S[rr, l] = out
            C[alu, l] = 0
        return 0
    if op == OP_V11FPACK:
        # Mesa nir_opcodes.py pack_32_to_r11g11b10_v3d: bits 10:0 = float11 of a's low float16,
        # 21:11 = float11 of a's high half, 31:22 = float10 of b's low half (round to nearest even)
        for l in range(16):
            x = S[ia, l]
            y = S[ib, l]
            v = (_f16_to_small_float(x & np.uint32(0xFFFF), 6)
                 | (_f16_to_small_float(x >> np.uint32(16), 6) << 11)
                 | (_f16_to_small_float(y & np.uint32(0xFFFF), 5) << 22))
            S[rr, l] = np.uint32(v & m32)
            C[alu, l] = 0
        return 0
    if op == OP_FLAPUSH or op == OP_FLBPUSH or op == OP_FLPOP:
        # py-videocore7 tests/test_condition_codes.py (test_cond_flx, run on a Pi 5):
        # flapush d = a << 2 | 3 * A, flbpush d = a << 2 | 3 * B, flpop d = a >> 2 (its flag
        # write happens with the flag pushes, in run)
        for l in range(16):
            x = np.int64(S[ia, l])
            if op == OP_FLPOP:
                v = x >> 2
            else:
                f = FLA[ctx, l] if op == OP_FLAPUSH else FLB[ctx, l]
                v = (x << 2) | (3 if f != 0 else 0)
            S[rr, l] = np.uint32(v & m32)
            C[alu, l] = 0
        return 0
    if op == OP_SETMSF or op == OP_SETREVF:
        # the result is the source (Mesa only ever writes these to a null destination); the
        # flag write happens with the flag pushes, in run
        for l in range(16):
            S[rr, l] = S[ia, l]
            C[alu, l] = 0
        return 0
    return FLT_UNSUPPORTED_OP


@njit(cache=True, inline="always")
def _to_unorm(x, scale):
    """_mesa_float_to_unorm: round-half-even(clamp(x, 0, 1) * scale); NaN -> 0."""
    if x != x or x <= 0.0:
        return 0
    if x >= 1.0:
        return np.int64(scale)
    return np.int64(_round_half_even(x * scale))


@njit(cache=True, inline="always")
def _to_snorm(x, scale):
    """_mesa_float_to_snorm: round-half-even(clamp(x, -1, 1) * scale); NaN -> 0 (signed)."""
    if x != x:
        return np.int64(0)
    if x >= 1.0:
        return np.int64(scale)
    if x <= -1.0:
        return -np.int64(scale)
    return np.int64(_round_half_even(x * scale))


@njit(cache=True)
def _f16_to_small_float(h, mbits):
    """float16 bits -> unsigned 11-bit (mbits 6) or 10-bit (mbits 5) float bits (exponent bias
    15, as float16): round to nearest even; negatives, -0 and -inf -> 0; NaN -> the positive NaN
    (exponent 31, mantissa 1); +inf -> inf; finite values above the largest finite value -> the
    largest finite value (GL_EXT_packed_float); float16 denormals are flushed (-> 0)."""
    h = np.int64(h) & 0xFFFF
    e = (h >> 10) & 0x1F
    m = h & 0x3FF
    exp_max = np.int64(31) << mbits
    if e == 31:
        if m != 0:
            return exp_max | 1
        return 0 if (h & 0x8000) != 0 else exp_max
    if (h & 0x8000) != 0 or e == 0:
        return np.int64(0)
    drop = 10 - mbits
    v = (e << mbits) | (m >> drop)
    rem = m & ((np.int64(1) << drop) - 1)
    half = np.int64(1) << (drop - 1)
    if rem > half or (rem == half and (v & 1) == 1):
        v += 1
    if v >= exp_max:
        v = exp_max - 1
    return v


# --------------------------------------------------------------------------------------------
# Memory helpers
# --------------------------------------------------------------------------------------------
@njit(cache=True, inline="always")
def _addr_ok(page_ok, mem_base, mem_size, addr, size):
    off = addr - mem_base
    if off < 0 or off + size > mem_size:
        return False
    if page_ok[off >> PAGE_SHIFT] == 0:
        return False
    if page_ok[(off + size - 1) >> PAGE_SHIFT] == 0:
        return False
    return True


@njit(cache=True)
def _read_u32(mem32, page_ok, mem_base, addr):
    """Read one word; returns (ok, value)."""
    off = addr - mem_base
    if (addr & 3) != 0 or off < 0 or off + 4 > mem32.shape[0] * 4 or page_ok[off >> PAGE_SHIFT] == 0:
        return False, np.uint32(0)
    return True, mem32[off >> 2]


#: page_ok bit 1: the page holds words a TMU write changed in this dispatch (``wdirty`` has one
#: bit per word; both are cleared after each dispatch)
PAGE_TMU_WRITTEN = 2


@njit(cache=True, inline="always")
def _mark_tmu_written(wdirty, page_ok, off, esize):
    """Record that a TMU store / atomic changed the bytes [off, off + esize) of the arena."""
    for w in range(off >> 2, ((off + esize - 1) >> 2) + 1):
        wdirty[w >> 3] |= np.uint8(1 << (w & 7))
        page_ok[w >> (PAGE_SHIFT - 2)] |= np.uint8(PAGE_TMU_WRITTEN)


@njit(cache=True)
def _next_uniform(ctx, col, pc, mem32, page_ok, mem_base, ist, fault, wdirty):
    """Read the next word of a uniform stream (col: ST_UNIF or ST_UNIFA) and advance the stream.
    Returns (ok, value); on an address outside any buffer ``fault`` says where and ok is False.
    A word that a TMU write changed earlier in this dispatch faults too (FLT_UNIF_STALE): the
    Pi 5's uniform path is not coherent with TMU writes and would return the old value."""
    addr = ist[ctx, col]
    ok, uv = _read_u32(mem32, page_ok, mem_base, addr)
    if not ok:
        fault[0] = FLT_UNIF_ADDR
        fault[1] = ctx
        fault[2] = pc
        fault[3] = addr
        return False, uv
    off = addr - mem_base
    if (page_ok[off >> PAGE_SHIFT] & PAGE_TMU_WRITTEN) != 0:
        w = off >> 2
        if (wdirty[w >> 3] >> (w & 7)) & 1:
            fault[0] = FLT_UNIF_STALE
            fault[1] = ctx
            fault[2] = pc
            fault[3] = addr
            return False, uv
    ist[ctx, col] = addr + 4
    return True, uv


@njit(cache=True, inline="always")
def _set_unifa(ctx, addr, ist):
    """Point the unifa stream at ``addr`` (lane 0 of the value written to unifa)."""
    ist[ctx, ST_UNIFA] = addr
    ist[ctx, ST_ULINE + 1] = -1                # a new unifa stream (timing state)
    ist[ctx, ST_UREQ + 1] = -1


@njit(cache=True)
def _l2_access(tags, lru, gst, line, nsets, nways):
    """Look up one cache line in the shared L2 model; True on a hit (the line is then most
    recently used); on a miss the least recently used way is replaced."""
    s = line % nsets
    gst[G_LRU_CLOCK] += 1.0
    stamp = np.int64(gst[G_LRU_CLOCK])
    victim = 0
    oldest = lru[s, 0]
    for w in range(nways):
        if tags[s, w] == line:
            lru[s, w] = stamp
            return True
        if lru[s, w] < oldest:
            oldest = lru[s, w]
            victim = w
    tags[s, victim] = line
    lru[s, victim] = stamp
    return False


@njit(cache=True)
def _l2_line(line, t, is_store, l2_tags, l2_lru, gst, prm, stats, nsets, nways, line_bytes):
    """One cache line through the shared L2 at time t (timing): the line waits for the L2's port
    (one line per ``PR_L2_CPL`` cycles, shared by every TMU and uniform cache), then hits, or
    moves over the one DRAM channel (a load miss, or a store: written through). Returns when
    the access is done (load data ready / store complete)."""
    start = max(t, gst[G_L2_FREE])
    gst[G_L2_FREE] = start + prm[PR_L2_CPL]
    ready = start + prm[PR_TMU_LAT]
    hit = _l2_access(l2_tags, l2_lru, gst, line, nsets, nways)
    if is_store or not hit:
        mem_start = max(start, gst[G_MEM_FREE])
        gst[G_MEM_FREE] = mem_start + line_bytes / prm[PR_MEM_BPC]
        stats[SX_DRAM_BYTES] += line_bytes
        ready = max(ready, gst[G_MEM_FREE] + (prm[PR_STORE_LAT] if is_store else prm[PR_DRAM_LAT]))
    if not is_store:
        if hit:
            stats[SX_L2_HITS] += 1
        else:
            stats[SX_L2_MISSES] += 1
    return ready


@njit(cache=True)
def _line_fetch(line, t, slc, l2_tags, l2_lru, gst, prm, stats, nsets, nways, line_bytes):
    """Fetch one cache line for a uniform stream of slice ``slc`` at time t: the slice's uniform
    cache fills one line per ``PR_UNIF_CPL`` cycles (shared by the slice's QPUs), through the
    shared L2. Returns when the line is ready."""
    start = max(t, gst[G_UCACHE + slc])
    gst[G_UCACHE + slc] = start + prm[PR_UNIF_CPL]
    return _l2_line(line, start, False, l2_tags, l2_lru, gst, prm, stats, nsets, nways, line_bytes)


@njit(cache=True)
def _uniform_ready(ctx, stream, addr, now, ist, fst, l2_tags, l2_lru, gst, prm, stats, nsets,
                   nways, line_bytes):
    """Timing of a uniform-stream read (stream 0: uniforms, 1: unifa) at ``addr``: the stream
    reads whole lines through the shared L2 and keeps ``PR_UNIF_PF`` lines ahead in flight, like a
    sequential prefetcher. Returns the time the word is available (>= now)."""
    line = addr // line_bytes
    slc = (ctx >> 2) // np.int64(prm[PR_QPS])
    cur = ist[ctx, ST_ULINE + stream]
    base = FT_URDY + 4 * stream
    if line == cur:
        return max(now, fst[ctx, base + line % 4])
    req = ist[ctx, ST_UREQ + stream]
    if not (cur >= 0 and line > cur and line <= req):          # not already in flight: fetch it
        fst[ctx, base + line % 4] = _line_fetch(line, now, slc, l2_tags, l2_lru, gst, prm, stats,
                                                nsets, nways, line_bytes)
        req = line
    ready = fst[ctx, base + line % 4]
    ahead = min(np.int64(prm[PR_UNIF_PF]), 3)
    while req < line + ahead:                                  # keep the look-ahead in flight
        req += 1
        fst[ctx, base + req % 4] = _line_fetch(req, now, slc, l2_tags, l2_lru, gst, prm, stats,
                                               nsets, nways, line_bytes)
    ist[ctx, ST_ULINE + stream] = line
    ist[ctx, ST_UREQ + stream] = req
    return max(now, ready)


# --------------------------------------------------------------------------------------------
# The interpreter
# --------------------------------------------------------------------------------------------
@njit(cache=True, nogil=True)
def run(code, mem8, mem32, page_ok, mem_base, prog_base, unif_base, regs, fregs, fla, flb, ist,
        fst, tmud, fifo, fifo_t, qclock, qcur, qtmu_free, qreq, qreq_head, gst, prm, stats,
        qstats, fault, l2_tags, l2_lru, wg_dims, num_qpus, threads, reg_share, budget, rtop,
        wg_size, wdirty, stop):
    """Run the dispatch until every workgroup has ended, or a fault. Returns the fault code
    (0 on success); ``fault`` then holds [code, ctx, pc, a, b]. Runs without the GIL; another
    thread stops it by setting ``stop[0]`` (FLT_INTERRUPTED, within one quantum)."""
    mem_size = np.int64(mem8.shape[0])
    ncode = code.shape[0]
    cpi = prm[PR_CPI]
    quantum = np.int64(prm[PR_QUANTUM])
    fifo_limit = np.int64(prm[PR_FIFO_WORDS])
    req_depth = np.int64(prm[PR_REQ_DEPTH])
    line_bytes = np.int64(prm[PR_LINE])
    nsets = np.int64(prm[PR_L2_SETS])
    nways = np.int64(prm[PR_L2_WAYS])
    # dispatch unit: a batch of 16 lanes (one QPU thread); a workgroup of wg_size lanes is
    # ceil(wg_size / 16) consecutive batches
    total_wg = wg_dims[0] * wg_dims[1] * wg_dims[2] * ((wg_size + 15) // 16)

    scratch = np.zeros((8, 16), np.uint32)
    fscratch = scratch.view(np.float32)
    carry = np.zeros((2, 16), np.uint8)
    active = np.ones((3, 16), np.uint8)    # row 2: all lanes (signal writes)
    tmpu = np.zeros(4, np.uint32)
    tmpf = tmpu.view(np.float32)
    lines = np.zeros(64, np.int64)
    lane_on = np.zeros(16, np.uint8)
    mq_w = np.zeros(4, np.int64)
    mq_row = np.zeros(4, np.int64)
    mq_act = np.zeros(4, np.int64)

    # ---- initial dispatch: workgroup i -> QPU i % n, thread i // n ----
    for t in range(threads):
        for q in range(num_qpus):
            if np.int64(gst[G_NEXT_WG]) < total_wg:
                _start_wg(q * 4 + t, t, np.int64(gst[G_NEXT_WG]), wg_dims, regs, fla, flb, ist,
                          fst, unif_base, qclock[q], wg_size)
                gst[G_NEXT_WG] += 1.0

    while True:
        if stop[0] != 0:
            fault[0] = FLT_INTERRUPTED
            return FLT_INTERRUPTED
        # ---- pick the QPU with the smallest clock that still has live threads ----
        q = -1
        best = 0.0
        any_barrier = -1
        for qq in range(num_qpus):
            live = False
            for t in range(threads):
                st = ist[qq * 4 + t, ST_STATE]
                if st == CTX_RUN:
                    live = True
                elif st == CTX_BARRIER:
                    any_barrier = qq * 4 + t
            if live and (q < 0 or qclock[qq] < best):
                q = qq
                best = qclock[qq]
        if q < 0:
            if any_barrier >= 0:
                fault[0] = FLT_DEADLOCK
                fault[1] = any_barrier
                fault[2] = ist[any_barrier, ST_PC]
                return FLT_DEADLOCK
            break
        # ---- pick the thread: current if runnable, else round robin; else wait ----
        ctx = -1
        soonest = -1.0
        for k in range(threads):
            t = (qcur[q] + k) % threads
            cx = q * 4 + t
            if ist[cx, ST_STATE] == CTX_RUN:
                if fst[cx, FT_READY] <= qclock[q]:
                    ctx = cx
                    qcur[q] = t
                    break
                if soonest < 0.0 or fst[cx, FT_READY] < soonest:
                    soonest = fst[cx, FT_READY]
        if ctx < 0:
            stall = soonest - qclock[q]
            qstats[q, 1] += np.int64(stall)
            stats[SX_STALL] += np.int64(stall)
            qclock[q] = soonest
            continue

        # ---- execute up to `quantum` instructions of ctx ----
        n_exec = 0
        while n_exec < quantum:
            pc = ist[ctx, ST_PC]
            if pc < 0 or pc >= ncode:
                fault[0] = FLT_PC_RANGE
                fault[1] = ctx
                fault[2] = pc
                return FLT_PC_RANGE
            if stats[SX_INSTR] >= budget:
                fault[0] = FLT_BUDGET
                fault[1] = ctx
                fault[2] = pc
                fault[3] = budget
                return FLT_BUDGET
            row = code[pc]
            if row[F_MAXREG] >= reg_share:
                fault[0] = FLT_REG_SHARE
                fault[1] = ctx
                fault[2] = pc
                fault[3] = row[F_MAXREG]
                fault[4] = reg_share
                return FLT_REG_SHARE
            now = qclock[q]
            stalled = False
            pend_unifa = np.int64(-1)
            new_thrsw = False
            new_branch = False
            sig = row[F_SIG]

            if row[F_KIND] == 1:
                # ---------------- branch ----------------
                cond = row[B_COND]
                taken = False
                if cond == 0:
                    taken = True
                else:
                    anya = False
                    alla = True
                    for l in range(16):
                        if fla[ctx, l] != 0:
                            anya = True
                        else:
                            alla = False
                    if cond == 2:
                        taken = fla[ctx, 0] != 0
                    elif cond == 3:
                        taken = fla[ctx, 0] == 0
                    elif cond == 4:
                        taken = alla
                    elif cond == 5:
                        taken = not alla
                    elif cond == 6:
                        taken = anya
                    elif cond == 7:
                        taken = not anya
                # a uniform-relative / -absolute redirect consumes one uniform
                uval = np.int64(0)
                if row[B_UB] == 1 and row[B_BDU] != 3:
                    ok, uv = _next_uniform(ctx, ST_UNIF, pc, mem32, page_ok, mem_base, ist, fault, wdirty)
                    if not ok:
                        return fault[0]
                    uval = np.int64(uv)
                if taken:
                    bdi = row[B_BDI]
                    if bdi == 0:
                        tgt_addr = row[B_ADDR]
                    elif bdi == 1:
                        tgt_addr = prog_base + (pc + 4) * 8 + row[B_ADDR]
                    elif bdi == 2:
                        tgt_addr = ist[ctx, ST_LINK]
                    else:
                        tgt_addr = np.int64(regs[ctx, row[B_RADDR], 0])
                    off = (tgt_addr & 0xFFFFFFFF) - prog_base
                    if off < 0 or (off & 7) != 0 or (off >> 3) >= ncode:
                        fault[0] = FLT_PC_RANGE
                        fault[1] = ctx
                        fault[2] = pc
                        fault[3] = tgt_addr & 0xFFFFFFFF
                        return FLT_PC_RANGE
                    ist[ctx, ST_BR_TARGET] = off >> 3
                    if row[B_LINK] == 1:
                        ist[ctx, ST_LINK] = prog_base + (pc + 4) * 8
                    if row[B_UB] == 1:
                        bdu = row[B_BDU]
                        if bdu == 0:
                            ist[ctx, ST_BR_UNIF] = uval
                        elif bdu == 1:
                            ist[ctx, ST_BR_UNIF] = (ist[ctx, ST_UNIF] + _sext(uval, 32)) & 0xFFFFFFFF
                        else:
                            # element 1 of the register with bits 2:0 cleared: the one rule that
                            # fits py-videocore7's hardware tests (docs/emulator.md, "Branches")
                            ua = np.int64(regs[ctx, row[B_RADDR], 1])
                            if (ua & 7) != 0 and wg_dims[LA_STRICT] != 0:
                                fault[0] = FLT_UNIF_REDIRECT
                                fault[1] = ctx
                                fault[2] = pc
                                fault[3] = ua
                                return FLT_UNIF_REDIRECT
                            ist[ctx, ST_BR_UNIF] = ua & 0xFFFFFFF8
                        ist[ctx, ST_BR_UNIF_SET] = 1
                    else:
                        ist[ctx, ST_BR_UNIF_SET] = 0
                    new_branch = True
            else:
                # ---------------- ALU instruction ----------------
                if (sig & S_UNSUPPORTED) != 0:
                    fault[0] = FLT_UNSUPPORTED_SIG
                    fault[1] = ctx
                    fault[2] = pc
                    return FLT_UNSUPPORTED_SIG
                for alu in range(2):
                    base = ADD_BASE if alu == 0 else MUL_BASE
                    op = row[base + OP]
                    if op >= OP_FIRST_UNSUPPORTED:
                        fault[0] = FLT_UNSUPPORTED_OP
                        fault[1] = ctx
                        fault[2] = pc
                        fault[3] = op
                        return FLT_UNSUPPORTED_OP
                # read all sources before any write (only for the ALUs that run)
                for k in range(4):
                    base = ADD_BASE if k < 2 else MUL_BASE
                    if row[base + OP] == OP_NOP:
                        continue
                    s = row[base + SA + (k & 1)]
                    if s >= IMM_FLAG:
                        v = np.uint32(s & 0xFFFFFFFF)
                        for l in range(16):
                            scratch[k, l] = v
                    elif s >= 0:
                        for l in range(16):
                            scratch[k, l] = regs[ctx, s, l]
                for alu in range(2):
                    base = ADD_BASE if alu == 0 else MUL_BASE
                    op = row[base + OP]
                    if op == OP_NOP:
                        continue
                    rr = 4 + alu
                    ia = 2 * alu
                    ib = ia + 1
                    plain = row[base + UA] == 0 and row[base + UB] == 0 and row[base + PACK] == 0
                    # fast paths for the common unmodified ops; everything else in alu_op
                    if plain and (op == OP_FMUL or op == OP_FADD or op == OP_FSUB):
                        for l in range(16):
                            x = scratch[ia, l]
                            y = scratch[ib, l]
                            if (x & np.uint32(0x7F800000)) == 0:
                                fscratch[ia, l] = np.float32(0.0) if (x >> np.uint32(31)) == 0 else np.float32(-0.0)
                            if (y & np.uint32(0x7F800000)) == 0:
                                fscratch[ib, l] = np.float32(0.0) if (y >> np.uint32(31)) == 0 else np.float32(-0.0)
                            if op == OP_FMUL:
                                fv = fscratch[ia, l] * fscratch[ib, l]
                            elif op == OP_FADD:
                                fv = fscratch[ia, l] + fscratch[ib, l]
                            else:
                                fv = fscratch[ia, l] - fscratch[ib, l]
                            fscratch[rr, l] = fv
                            u = scratch[rr, l]
                            if (u & np.uint32(0x7F800000)) == 0:
                                scratch[rr, l] = u & np.uint32(0x80000000)
                            carry[alu, l] = 1 if fscratch[rr, l] <= 0.0 else 0
                    elif plain and (op == OP_ADD or op == OP_SUB):
                        for l in range(16):
                            x = np.int64(scratch[ia, l])
                            y = np.int64(scratch[ib, l])
                            if op == OP_ADD:
                                sm = x + y
                                carry[alu, l] = 1 if sm > 0xFFFFFFFF else 0
                            else:
                                sm = x - y
                                carry[alu, l] = 1 if x < y else 0
                            scratch[rr, l] = np.uint32(sm & 0xFFFFFFFF)
                    elif plain and op == OP_MOV:
                        for l in range(16):
                            scratch[rr, l] = scratch[ia, l]
                            carry[alu, l] = 0
                    elif op == OP_MULTOP:
                        # multop leaves the high part of a * b in the hidden rtop register; the
                        # next umul24 adds it, giving the full 32-bit product (Mesa vir_UMUL)
                        for l in range(16):
                            x = np.int64(scratch[ia, l])
                            y = np.int64(scratch[ib, l])
                            full = (x * y) & 0xFFFFFFFF
                            low = ((x & 0xFFFFFF) * (y & 0xFFFFFF)) & 0xFFFFFFFF
                            rtop[ctx, l] = np.uint32((full - low) & 0xFFFFFFFF)
                            scratch[rr, l] = rtop[ctx, l]
                            carry[alu, l] = 0
                        ist[ctx, ST_RTOP_SET] = 1
                    elif op == OP_UMUL24 and ist[ctx, ST_RTOP_SET] == 1:
                        for l in range(16):
                            v = (np.int64(scratch[ia, l]) & 0xFFFFFF) * (np.int64(scratch[ib, l]) & 0xFFFFFF)
                            scratch[rr, l] = np.uint32((v + np.int64(rtop[ctx, l])) & 0xFFFFFFFF)
                            carry[alu, l] = 0
                        ist[ctx, ST_RTOP_SET] = 0
                    elif op >= OP_IMIN and op <= OP_BNOT:
                        _int_op(op, scratch, ia, ib, rr, carry, alu)
                    elif op == OP_SHUFFLE:
                        for l in range(16):
                            scratch[rr, l] = scratch[ia, scratch[ib, l] & np.uint32(15)]
                            carry[alu, l] = 0
                    elif op == OP_MSF or op == OP_REVF:
                        # msf: the lane's 4-bit sample mask (0 for lanes outside the workgroup);
                        # revf: the lane's revolving flag (0 / 1)
                        for l in range(16):
                            if op == OP_MSF:
                                scratch[rr, l] = np.uint32(ist[ctx, ST_MSF + l] & 0xF)
                            else:
                                scratch[rr, l] = np.uint32((ist[ctx, ST_REVF] >> l) & 1)
                            carry[alu, l] = 0
                    else:
                        err = alu_op(op, row[base + UA], row[base + UB], row[base + PACK],
                                     scratch, fscratch, ia, ib, rr, carry, alu, fla, flb, ctx,
                                     _tidx(ctx, threads), ist[ctx, ST_LINK], tmpu, tmpf)
                        if err != 0:
                            fault[0] = err
                            fault[1] = ctx
                            fault[2] = pc
                            fault[3] = op
                            return err
                        if op == OP_TMUWT:
                            if fst[ctx, FT_STORE_DONE] > now:
                                stalled = True
                                now = fst[ctx, FT_STORE_DONE]
                # conditions (evaluated on the flags before this instruction's pushes)
                for alu in range(2):
                    base = ADD_BASE if alu == 0 else MUL_BASE
                    cnd = row[base + COND]
                    if cnd < 0 or row[base + OP] == OP_NOP:
                        continue
                    for l in range(16):
                        if cnd == 0:
                            active[alu, l] = fla[ctx, l]
                        elif cnd == 1:
                            active[alu, l] = flb[ctx, l]
                        elif cnd == 2:
                            active[alu, l] = 1 - fla[ctx, l]
                        else:
                            active[alu, l] = 1 - flb[ctx, l]
                # flpop / setmsf / setrevf (add ALU) write their state on the lanes whose
                # condition holds, before this instruction's flag pushes / updates
                aop = row[ADD_BASE + OP]
                if aop == OP_FLPOP or aop == OP_SETMSF or aop == OP_SETREVF:
                    acnd = row[ADD_BASE + COND]
                    for l in range(16):
                        if acnd >= 0 and active[0, l] == 0:
                            continue
                        x = scratch[0, l]
                        if aop == OP_FLPOP:
                            # the popped 2-bit entry: bit 0 -> A, bit 1 -> B
                            fla[ctx, l] = np.uint8(x & np.uint32(1))
                            flb[ctx, l] = np.uint8((x >> np.uint32(1)) & np.uint32(1))
                        elif aop == OP_SETMSF:
                            ist[ctx, ST_MSF + l] = np.int64(x & np.uint32(0xF))
                        elif (x & np.uint32(1)) != 0:
                            ist[ctx, ST_REVF] |= np.int64(1) << l
                        else:
                            ist[ctx, ST_REVF] &= ~(np.int64(1) << l)
                # flag pushes / updates
                for alu in range(2):
                    base = ADD_BASE if alu == 0 else MUL_BASE
                    pf = row[base + PF]
                    uf = row[base + UF]
                    if pf == 0 and uf == 0:
                        continue
                    rr = 4 + alu
                    op = row[base + OP]
                    is_fcmp = op == OP_FCMP
                    is_float = _is_float_op(op)
                    for l in range(16):
                        v = scratch[rr, l]
                        if is_fcmp:
                            x = fscratch[2 * alu, l]
                            y = fscratch[2 * alu + 1, l]
                            fz = 1 if x == y else 0
                            fn = 1 if x < y else 0
                        elif is_float:
                            fz = 1 if (v & np.uint32(0x7FFFFFFF)) == 0 else 0
                            fn = 1 if fscratch[rr, l] < 0.0 else 0
                        else:
                            fz = 1 if v == 0 else 0
                            fn = np.uint8(v >> np.uint32(31))
                        fc = carry[alu, l]
                        if pf != 0:
                            flb[ctx, l] = fla[ctx, l]
                            fla[ctx, l] = fz if pf == 1 else (fn if pf == 2 else fc)
                        else:
                            kind = (uf - 4) >> 2       # 0 z, 1 n, 2 c
                            sub_ = (uf - 4) & 3       # 0 and, 1 and-not, 2 nor-not, 3 nor
                            fv = fz if kind == 0 else (fn if kind == 1 else fc)
                            av = fla[ctx, l]
                            if sub_ == 0:
                                fla[ctx, l] = av & fv
                            elif sub_ == 1:
                                fla[ctx, l] = av & (1 - fv)
                            elif sub_ == 2:
                                fla[ctx, l] = 1 - (av | (1 - fv))
                            else:
                                fla[ctx, l] = 1 - (av | fv)
                # destination writes: add ALU, then mul ALU (magic ones are queued)
                nm = 0
                for alu in range(2):
                    base = ADD_BASE if alu == 0 else MUL_BASE
                    dst = row[base + DST]
                    if dst < 0 or row[base + OP] == OP_NOP:
                        continue
                    rr = 4 + alu
                    cnd = row[base + COND]
                    if dst < 64:
                        if cnd < 0:
                            for l in range(16):
                                regs[ctx, dst, l] = scratch[rr, l]
                        else:
                            for l in range(16):
                                if active[alu, l] != 0:
                                    regs[ctx, dst, l] = scratch[rr, l]
                    else:
                        if cnd < 0:
                            for l in range(16):
                                active[alu, l] = 1
                        mq_w[nm] = dst - 64
                        mq_row[nm] = rr
                        mq_act[nm] = alu
                        nm += 1
                for phase in range(2):
                    if phase == 1:
                        nm = 0
                        # signals
                        if sig != 0:
                            if (sig & S_WRTMUC) != 0:
                                ok, uv = _next_uniform(ctx, ST_UNIF, pc, mem32, page_ok, mem_base, ist, fault, wdirty)
                                if not ok:
                                    return fault[0]
                                ist[ctx, ST_TMUCFG] = np.int64(uv)
                            if (sig & (S_LDUNIF | S_LDUNIFRF | S_LDUNIFA | S_LDUNIFARF)) != 0:
                                use_a = (sig & (S_LDUNIFA | S_LDUNIFARF)) != 0
                                col = ST_UNIFA if use_a else ST_UNIF
                                uaddr = ist[ctx, col]
                                ok, uv = _next_uniform(ctx, col, pc, mem32, page_ok, mem_base, ist, fault, wdirty)
                                if not ok:
                                    return fault[0]
                                t_u = _uniform_ready(ctx, 1 if use_a else 0, uaddr, now, ist, fst,
                                                     l2_tags, l2_lru, gst, prm, stats, nsets, nways,
                                                     line_bytes)
                                if t_u > now:
                                    stalled = True
                                    now = t_u
                                if pend_unifa >= 0:
                                    # a unifa write in the same instruction takes effect after the
                                    # read (py-videocore7 tests/test_unifa.py case 3, T2 / T3)
                                    _set_unifa(ctx, pend_unifa, ist)
                                    pend_unifa = -1
                                d = row[F_SIGDST] if (sig & (S_LDUNIFRF | S_LDUNIFARF)) != 0 else 0
                                if d < 64:
                                    for l in range(16):
                                        regs[ctx, d, l] = uv
                                else:
                                    for l in range(16):
                                        scratch[6, l] = uv
                                    mq_w[nm] = d - 64
                                    mq_row[nm] = 6
                                    mq_act[nm] = 2
                                    nm += 1
                            if (sig & S_LDTMU) != 0:
                                if ist[ctx, ST_FIFO_COUNT] == 0:
                                    fault[0] = FLT_FIFO_EMPTY
                                    fault[1] = ctx
                                    fault[2] = pc
                                    return FLT_FIFO_EMPTY
                                h = ist[ctx, ST_FIFO_HEAD]
                                if fifo_t[ctx, h] > now:
                                    stalled = True
                                    now = fifo_t[ctx, h]
                                d = row[F_SIGDST]
                                if d < 64:
                                    for l in range(16):
                                        regs[ctx, d, l] = fifo[ctx, h, l]
                                else:
                                    for l in range(16):
                                        scratch[7, l] = fifo[ctx, h, l]
                                    mq_w[nm] = d - 64
                                    mq_row[nm] = 7
                                    mq_act[nm] = 2
                                    nm += 1
                                ist[ctx, ST_FIFO_HEAD] = (h + 1) % FIFO_CAP
                                ist[ctx, ST_FIFO_COUNT] -= 1
                                ist[ctx, ST_FIFO_WORDS] -= 1
                            if (sig & S_THRSW) != 0:
                                new_thrsw = True
                    # magic-register writes queued by this phase (ALU results, then signals)
                    for mk in range(nm):
                        w = mq_w[mk]
                        vrow = mq_row[mk]
                        arow = mq_act[mk]
                        if w == W_NULL:
                            pass
                        elif w == W_REP:
                            v0 = scratch[vrow, 0]
                            for l in range(16):
                                regs[ctx, 0, l] = v0
                        elif w == W_QUAD:
                            for l in range(16):
                                regs[ctx, 0, l] = scratch[vrow, l & 12]
                        elif w == W_UNIFA:
                            if phase == 0 and (sig & (S_LDUNIFA | S_LDUNIFARF)) != 0:
                                # the ldunifa of this instruction reads the old stream first
                                pend_unifa = np.int64(scratch[vrow, 0])
                            else:
                                _set_unifa(ctx, np.int64(scratch[vrow, 0]), ist)
                        elif w == W_TMUC:
                            ist[ctx, ST_TMUCFG] = np.int64(scratch[vrow, 0])
                        elif w == W_TMUD or w == W_TMUDREF or w == W_TMUOFF:
                            n = ist[ctx, ST_NDATA]
                            if n >= 4:
                                fault[0] = FLT_TMUD_OVERFLOW
                                fault[1] = ctx
                                fault[2] = pc
                                return FLT_TMUD_OVERFLOW
                            for l in range(16):
                                tmud[ctx, n, l] = scratch[vrow, l]
                            ist[ctx, ST_NDATA] = n + 1
                        elif w == W_SYNCB:
                            ist[ctx, ST_BARRIER_PEND] = 1
                        elif w == W_TMUA or w == W_TMUAU:
                            if w == W_TMUAU:
                                ok, uv = _next_uniform(ctx, ST_UNIF, pc, mem32, page_ok, mem_base, ist, fault, wdirty)
                                if not ok:
                                    return fault[0]
                                ist[ctx, ST_TMUCFG] = np.int64(uv)
                            # ---- one general TMU lookup (see docs/emulator.md, "TMU") ----
                            cfgw = ist[ctx, ST_TMUCFG] & 0xFFFFFFFF
                            cfg = cfgw & 0xFF
                            ist[ctx, ST_TMUCFG] = (cfgw >> 8) | 0xFF000000
                            per = (cfg >> 7) & 1
                            top = (cfg >> 3) & 15
                            typ = cfg & 7
                            ndata = ist[ctx, ST_NDATA]
                            ist[ctx, ST_NDATA] = 0
                            is_write = ndata > 0

                            # lanes taking part: per-lane mask, or per quad (a quad is active if any lane is)
                            # (lanes beyond the workgroup's last one are disabled)
                            for l in range(16):
                                lane_on[l] = active[arow, l] if l < ist[ctx, ST_LANES] else 0
                            if per == 0:
                                for qq in range(0, 16, 4):
                                    anyq = lane_on[qq] | lane_on[qq + 1] | lane_on[qq + 2] | lane_on[qq + 3]
                                    for l in range(qq, qq + 4):
                                        lane_on[l] = 1 if anyq != 0 else 0

                            # kind: 0 load, 1 store, 2 atomic (returns the old value), 3 cache op (no data)
                            if top == 15:
                                kind = 1 if is_write else 0
                            elif is_write:
                                kind = 2
                            elif top == 8 or top == 9 or top == 10:
                                kind = 2
                            elif top <= 4:
                                kind = 3
                            else:
                                fault[0] = FLT_TMU_OP
                                fault[1] = ctx
                                fault[2] = pc
                                fault[3] = cfg
                                return FLT_TMU_OP

                            # element size in bytes and words per lane
                            if kind == 0 or kind == 1:
                                if typ == 0 or typ == 5:
                                    esize = 1
                                    nwords = 1
                                elif typ == 1 or typ == 6:
                                    esize = 2
                                    nwords = 1
                                elif typ == 7:
                                    esize = 4
                                    nwords = 1
                                else:
                                    nwords = typ            # vec2 .. vec4
                                    esize = 4 * typ
                                if kind == 1 and esize >= 4:
                                    # stores write as many words as were written to tmud
                                    nwords = ndata
                                    esize = 4 * ndata
                            else:
                                esize = 4
                                nwords = 1
                                if top == 3 and is_write and ndata < 2:
                                    fault[0] = FLT_TMU_OP
                                    fault[1] = ctx
                                    fault[2] = pc
                                    fault[3] = cfg
                                    fault[4] = 1
                                    return FLT_TMU_OP
                            ret_words = 0
                            if kind == 0:
                                ret_words = nwords
                            elif kind == 2:
                                ret_words = 1
                            if ret_words > 0:
                                # each thread slot owns 16 / resident threads words
                                held = ist[ctx, ST_FIFO_WORDS] + ret_words
                                if held > fifo_limit:
                                    fault[0] = FLT_FIFO_OVERFLOW
                                    fault[1] = ctx
                                    fault[2] = pc
                                    fault[3] = held
                                    fault[4] = fifo_limit
                                    return FLT_FIFO_OVERFLOW

                            # bounds and alignment
                            if kind != 3:
                                align = 4 if esize >= 4 else esize
                                for l in range(16):
                                    if lane_on[l] == 0:
                                        continue
                                    a = np.int64(scratch[vrow, l])
                                    if (a & (align - 1)) != 0:
                                        fault[0] = FLT_MISALIGNED
                                        fault[1] = ctx
                                        fault[2] = pc
                                        fault[3] = a
                                        fault[4] = l
                                        return FLT_MISALIGNED
                                    if not _addr_ok(page_ok, mem_base, mem8.shape[0], a, esize):
                                        fault[0] = FLT_BAD_ADDR
                                        fault[1] = ctx
                                        fault[2] = pc
                                        fault[3] = a
                                        fault[4] = l
                                        return FLT_BAD_ADDR

                            # ---- functional effect ----
                            h = (ist[ctx, ST_FIFO_HEAD] + ist[ctx, ST_FIFO_COUNT]) % FIFO_CAP
                            for wd in range(ret_words):
                                for l in range(16):
                                    fifo[ctx, (h + wd) % FIFO_CAP, l] = 0
                            nlines = 0
                            for l in range(16):
                                if lane_on[l] == 0:
                                    continue
                                a = np.int64(scratch[vrow, l])
                                off = a - mem_base
                                if kind == 0:
                                    for wd in range(nwords):
                                        if esize == 1:
                                            v = np.int64(mem8[off])
                                            if typ == 0 and v >= 128:
                                                v -= 256
                                        elif esize == 2:
                                            v = np.int64(mem8[off]) | (np.int64(mem8[off + 1]) << 8)
                                            if typ == 1 and v >= 32768:
                                                v -= 65536
                                        else:
                                            v = np.int64(mem32[(off >> 2) + wd])
                                        fifo[ctx, (h + wd) % FIFO_CAP, l] = np.uint32(v & 0xFFFFFFFF)
                                elif kind == 1:
                                    if esize == 1:
                                        mem8[off] = np.uint8(tmud[ctx, 0, l] & np.uint32(0xFF))
                                    elif esize == 2:
                                        v = tmud[ctx, 0, l]
                                        mem8[off] = np.uint8(v & np.uint32(0xFF))
                                        mem8[off + 1] = np.uint8((v >> np.uint32(8)) & np.uint32(0xFF))
                                    else:
                                        for wd in range(nwords):
                                            mem32[(off >> 2) + wd] = tmud[ctx, wd, l]
                                elif kind == 2:
                                    old = mem32[off >> 2]
                                    d = tmud[ctx, 0, l]
                                    o64 = np.int64(old)
                                    d64 = np.int64(d)
                                    if not is_write:
                                        if top == 8:
                                            nv = (o64 + 1) & 0xFFFFFFFF
                                        elif top == 9:
                                            nv = (o64 - 1) & 0xFFFFFFFF
                                        else:
                                            nv = (~o64) & 0xFFFFFFFF
                                    elif top == 0:
                                        nv = (o64 + d64) & 0xFFFFFFFF
                                    elif top == 1:
                                        nv = (o64 - d64) & 0xFFFFFFFF
                                    elif top == 2:
                                        nv = d64
                                    elif top == 3:
                                        nv = np.int64(tmud[ctx, 1, l]) if o64 == d64 else o64
                                    elif top == 4:
                                        nv = min(o64, d64)
                                    elif top == 5:
                                        nv = max(o64, d64)
                                    elif top == 6:
                                        nv = min(_sext(old, 32), _sext(d, 32)) & 0xFFFFFFFF
                                    elif top == 7:
                                        nv = max(_sext(old, 32), _sext(d, 32)) & 0xFFFFFFFF
                                    elif top == 8:
                                        nv = o64 & d64
                                    elif top == 9:
                                        nv = o64 | d64
                                    else:
                                        nv = o64 ^ d64
                                    mem32[off >> 2] = np.uint32(nv)
                                    fifo[ctx, h, l] = old
                                if kind == 1 or kind == 2:
                                    _mark_tmu_written(wdirty, page_ok, off, esize)
                                # distinct cache lines touched (timing); a prefetch (op 0, no data)
                                # fills its lines into the L2
                                if kind != 3 or (top == 0 and off >= 0 and off < mem_size):
                                    first = (off) // line_bytes
                                    last = (off + esize - 1) // line_bytes
                                    for ln in range(first, last + 1):
                                        seen = False
                                        for kl in range(nlines):
                                            if lines[kl] == ln:
                                                seen = True
                                                break
                                        if not seen and nlines < lines.shape[0]:
                                            lines[nlines] = ln
                                            nlines += 1

                            # ---- timing: request queue, TMU throughput, shared L2 / DRAM bandwidth, latency ----
                            stall_to = now
                            if kind != 3 or nlines > 0:
                                oldest = qreq[q, qreq_head[q]]
                                if oldest > stall_to:
                                    stall_to = oldest           # the per-QPU request queue is full
                                # the slice's TMU (shared by its QPUs) takes PR_TMU_CPL cycles per line
                                # and PR_TMU_CPW per 32-bit word it returns
                                active_lanes = 0
                                for l in range(16):
                                    active_lanes += lane_on[l]
                                tmu_i = q // np.int64(prm[PR_QPS])
                                tmu_start = max(stall_to, qtmu_free[tmu_i])
                                qtmu_free[tmu_i] = tmu_start + max(1.0, nlines * prm[PR_TMU_CPL]
                                                                   + active_lanes * ret_words * prm[PR_TMU_CPW])
                                done = tmu_start + prm[PR_TMU_LAT]
                                for kl in range(nlines):
                                    done = max(done, _l2_line(lines[kl], tmu_start + kl * prm[PR_TMU_CPL],
                                                              kind == 1, l2_tags, l2_lru, gst, prm,
                                                              stats, nsets, nways, line_bytes))
                                if kind == 0:
                                    stats[SX_TMU_LOADS] += 1
                                    stats[SX_BYTES_LOADED] += active_lanes * esize
                                elif kind == 1:
                                    stats[SX_TMU_STORES] += 1
                                    stats[SX_BYTES_STORED] += active_lanes * esize
                                elif kind == 2:
                                    stats[SX_ATOMICS] += 1
                                    stats[SX_TMU_STORES] += 1
                                    stats[SX_BYTES_STORED] += active_lanes * 4
                                    stats[SX_BYTES_LOADED] += active_lanes * 4
                                qreq[q, qreq_head[q]] = done
                                qreq_head[q] = (qreq_head[q] + 1) % req_depth
                                if kind == 1 or kind == 2:
                                    fst[ctx, FT_STORE_DONE] = max(fst[ctx, FT_STORE_DONE], done)
                                if ret_words > 0:
                                    fst[ctx, FT_LOAD_DONE] = max(fst[ctx, FT_LOAD_DONE], done)
                                    for wd in range(ret_words):
                                        fifo_t[ctx, (h + wd) % FIFO_CAP] = done
                            if ret_words > 0:
                                ist[ctx, ST_FIFO_COUNT] += ret_words
                                ist[ctx, ST_FIFO_WORDS] += ret_words
                            if stall_to > now:
                                stalled = True
                                now = stall_to
                        else:
                            fault[0] = FLT_UNSUPPORTED_MAGIC
                            fault[1] = ctx
                            fault[2] = pc
                            fault[3] = w
                            return FLT_UNSUPPORTED_MAGIC
            # ---------------- end of instruction: time, delay slots, thread switch ----------------
            stats[SX_INSTR] += 1
            ist[ctx, ST_INSTRS] += 1
            if now > qclock[q]:
                st_c = now - qclock[q]
                stats[SX_STALL] += np.int64(st_c)
                qstats[q, 1] += np.int64(st_c)
            qclock[q] = now + cpi
            qstats[q, 0] += 1
            n_exec += 1

            switch_now = False
            end_now = False
            next_pc = pc + 1
            if ist[ctx, ST_THR_CNT] > 0:
                ist[ctx, ST_THR_CNT] -= 1
                if ist[ctx, ST_THR_CNT] == 0:
                    switch_now = True
            if ist[ctx, ST_END_CNT] > 0:
                ist[ctx, ST_END_CNT] -= 1
                if ist[ctx, ST_END_CNT] == 0:
                    end_now = True
            if ist[ctx, ST_BR_CNT] > 0:
                ist[ctx, ST_BR_CNT] -= 1
                if ist[ctx, ST_BR_CNT] == 0:
                    next_pc = ist[ctx, ST_BR_TARGET]
                    if ist[ctx, ST_BR_UNIF_SET] == 1:
                        ist[ctx, ST_UNIF] = ist[ctx, ST_BR_UNIF]
                        ist[ctx, ST_BR_UNIF_SET] = 0
            if new_branch:
                ist[ctx, ST_BR_CNT] = 3
            if new_thrsw:
                stats[SX_THRSW] += 1
                if ist[ctx, ST_THR_CNT] == 1:
                    # a thrsw right after another (consecutive instructions) marks that switch
                    # as the last (Mesa qpu_schedule.c emit_thrsw: "two THRSWs in a row"); a
                    # thrsw two instructions later is an ordinary switch (below)
                    ist[ctx, ST_LAST] = 1
                elif ist[ctx, ST_LAST] == 2:
                    ist[ctx, ST_END_CNT] = 2       # the thrsw after the last switch ends the thread
                else:
                    ist[ctx, ST_THR_CNT] = 2
            ist[ctx, ST_PC] = next_pc

            if end_now:
                ist[ctx, ST_STATE] = CTX_DONE
                # dispatch the next workgroup into the freed slot
                if np.int64(gst[G_NEXT_WG]) < total_wg:
                    _start_wg(ctx, ctx & 3, np.int64(gst[G_NEXT_WG]), wg_dims, regs, fla, flb,
                              ist, fst, unif_base, qclock[q], wg_size)
                    gst[G_NEXT_WG] += 1.0
                _release_barrier(ist, fst, num_qpus, threads)
                qcur[q] = (qcur[q] + 1) % threads
                break
            if switch_now:
                if ist[ctx, ST_LAST] == 1:
                    ist[ctx, ST_LAST] = 2
                if ist[ctx, ST_BARRIER_PEND] == 1:
                    ist[ctx, ST_BARRIER_PEND] = 0
                    ist[ctx, ST_STATE] = CTX_BARRIER
                    fst[ctx, FT_BARRIER_ARRIVE] = qclock[q]
                    _release_barrier(ist, fst, num_qpus, threads)
                    qcur[q] = (qcur[q] + 1) % threads
                    break
                if threads > 1:
                    # the thread resumes once the loads it issued before switching have returned
                    fst[ctx, FT_READY] = max(qclock[q], fst[ctx, FT_LOAD_DONE])
                    qcur[q] = (qcur[q] + 1) % threads
                    break
            if stalled:
                break
    return 0


@njit(cache=True, inline="always")
def _tidx(ctx, threads):
    """The value ``tidx`` returns: QPU << 2 | thread slot, where the slot of thread t is
    t * 4 / threads (2 threads use slots 0 and 2; py-videocore7 tests/test_parallel.py, run on a
    Pi 5, reads the thread id of a 24-thread launch as (tidx & 0b111110) >> 1)."""
    return (ctx & ~3) | (((ctx & 3) * 4) // threads)


@njit(cache=True, inline="always")
def _is_float_op(op):
    return (op == OP_FADD or op == OP_FADDNF or op == OP_FSUB or op == OP_FMIN or op == OP_FMAX
            or op == OP_FMUL or op == OP_FMOV or (op >= OP_RECIP and op <= OP_SIN)
            or (op >= OP_FROUND and op <= OP_FCEIL) or op == OP_ITOF or op == OP_UTOF
            or op == OP_FDX or op == OP_FDY)


@njit(cache=True)
def _start_wg(ctx, slot, batch, wg_dims, regs, fla, flb, ist, fst, unif_base, t0, wg_size):
    """Start batch ``batch`` of the dispatch in context ``ctx``: batch b of workgroup w = b // nb
    (nb = ceil(wg_size / 16) batches per workgroup, workgroups x fastest). Zeroed registers and
    flags; the compute payload: rf3 = x | y << 16, rf2 = z | local invocation index << (32 - bits)
    with bits = log2(next_pow2(max(wg_size, 64))) (Mesa nir_to_vir.c
    ``local_invocation_index_bits``; the lane's index in its workgroup is 16 * (b % nb) + lane);
    the uniform stream at its start; the multisample flags set (0xF) on the lanes that belong to
    the workgroup and clear on the others."""
    nb = (wg_size + 15) // 16
    wg = batch // nb
    first = 16 * (batch % nb)
    x = wg % wg_dims[0]
    y = (wg // wg_dims[0]) % wg_dims[1]
    z = wg // (wg_dims[0] * wg_dims[1])
    bits = 6
    while (1 << bits) < wg_size:
        bits += 1
    for rgi in range(64):
        for l in range(16):
            regs[ctx, rgi, l] = 0
    for l in range(16):
        fla[ctx, l] = 0
        flb[ctx, l] = 0
        regs[ctx, 3, l] = np.uint32((x & 0xFFFF) | ((y & 0xFFFF) << 16))
        idx = np.int64(first + l) & ((1 << bits) - 1)
        regs[ctx, 2, l] = np.uint32(((z & 0xFFFF) | (idx << (32 - bits))) & 0xFFFFFFFF)
    for k in range(NIST):
        ist[ctx, k] = 0
    for k in range(NFST):
        fst[ctx, k] = 0.0
    ist[ctx, ST_STATE] = CTX_RUN
    ist[ctx, ST_UNIF] = unif_base
    for k in range(2):
        ist[ctx, ST_ULINE + k] = -1
        ist[ctx, ST_UREQ + k] = -1
    ist[ctx, ST_TMUCFG] = 0xFFFFFFFF
    ist[ctx, ST_WG] = wg
    ist[ctx, ST_SLOT] = slot
    ist[ctx, ST_LANES] = min(16, wg_size - first)
    for l in range(16):
        ist[ctx, ST_MSF + l] = 0xF if first + l < wg_size else 0
    fst[ctx, FT_READY] = t0


@njit(cache=True)
def _release_barrier(ist, fst, num_qpus, threads):
    """Release the barrier once every resident thread has arrived at it (or ended)."""
    waiting = 0
    latest = 0.0
    for q in range(num_qpus):
        for t in range(threads):
            cx = q * 4 + t
            st = ist[cx, ST_STATE]
            if st == CTX_RUN:
                return
            if st == CTX_BARRIER:
                waiting += 1
                latest = max(latest, fst[cx, FT_BARRIER_ARRIVE])
    if waiting == 0:
        return
    for q in range(num_qpus):
        for t in range(threads):
            cx = q * 4 + t
            if ist[cx, ST_STATE] == CTX_BARRIER:
                ist[cx, ST_STATE] = CTX_RUN
                fst[cx, FT_READY] = latest
