"""Every implemented add-ALU and mul-ALU op of the emulator against numpy references, with
pack / unpack modifiers, small immediates and edge values (NaN, inf, -0.0, denormals, integer
overflow). References follow the semantics documented in docs/emulator.md (sources cited there)."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from hypothesis.extra import numpy as hnp

from tvm_qpu.codegen import asm as A
from tvm_qpu.codegen.asm import nop
from tvm_qpu.codegen.instr import RF

from test_emulator_support import (EDGE_F32, EDGE_U32, IN_REGS, OUT_REGS, bits, f16_bits,
                                   f16_to_f32, f32, ftz, run_body, same_float)

M = np.uint64(0xFFFFFFFF)
a_, b_ = IN_REGS[0], IN_REGS[1]
d_ = OUT_REGS[0]
RNG = np.random.default_rng(1234)


def u64(x):
    return np.asarray(x, dtype=np.uint32).astype(np.uint64)


def sext(x, nbits):
    x = np.asarray(x, dtype=np.int64) & ((1 << nbits) - 1)
    return np.where(x >= (1 << (nbits - 1)), x - (1 << nbits), x)


INT_BINARY = {
    "add": lambda a, b: (u64(a) + u64(b)) & M,
    "sub": lambda a, b: (u64(a) - u64(b)) & M,
    "imin": lambda a, b: np.minimum(a.view(np.int32), b.view(np.int32)).view(np.uint32),
    "imax": lambda a, b: np.maximum(a.view(np.int32), b.view(np.int32)).view(np.uint32),
    "umin": np.minimum,
    "umax": np.maximum,
    "shl": lambda a, b: (u64(a) << (u64(b) & np.uint64(31))) & M,
    "shr": lambda a, b: a >> (b & 31),
    "asr": lambda a, b: (a.view(np.int32) >> (b & 31).astype(np.int32)).view(np.uint32),
    "ror": lambda a, b: ((u64(a) >> (u64(b) & np.uint64(31))) | (u64(a) << ((np.uint64(32) - (u64(b) & np.uint64(31))) & np.uint64(63)))) & M,
    "band": np.bitwise_and,
    "bor": np.bitwise_or,
    "bxor": np.bitwise_xor,
    "vadd": lambda a, b: ((a & 0xFFFF) + (b & 0xFFFF)) & 0xFFFF | ((((a >> 16) + (b >> 16)) & 0xFFFF) << 16),
    "vsub": lambda a, b: ((a & 0xFFFF) - (b & 0xFFFF)) & 0xFFFF | ((((a >> 16) - (b >> 16)) & 0xFFFF) << 16),
    "rotate": lambda a, b: np.roll(a, -int(b[0] % 16)),
    "quad_rotate": lambda a, b: np.hstack([np.roll(x, -int(y % 4)) for x, y in zip(a.reshape(4, 4), b[::4])]),
    "shuffle": lambda a, b: a[b % 16],
}
# Mesa src/compiler/nir/nir_opcodes.py definitions of the v3d (v71) pack opcodes
INT_BINARY.update({
    "vpack": lambda a, b: (u64(a) & np.uint64(0xFFFF)) | ((u64(b) << np.uint64(16)) & M),
    "v8pack": lambda a, b: ((u64(a) & np.uint64(0xFF)) | ((u64(a) & np.uint64(0xFF0000)) >> np.uint64(8))
                            | ((u64(b) & np.uint64(0xFF)) << np.uint64(16)) | (((u64(b) & np.uint64(0xFF0000)) << np.uint64(8)) & M)),
    "v10pack": lambda a, b: ((u64(a) & np.uint64(0x3FF)) | (((u64(a) >> np.uint64(16)) & np.uint64(0x3FF)) << np.uint64(10))
                             | ((u64(b) & np.uint64(0x3FF)) << np.uint64(20)) | (((u64(b) >> np.uint64(16)) & np.uint64(0x3)) << np.uint64(30))),
})
MUL_INT_BINARY = {
    "add": INT_BINARY["add"],
    "sub": INT_BINARY["sub"],
    "umul24": lambda a, b: (u64(a & 0xFFFFFF) * u64(b & 0xFFFFFF)) & M,
    "smul24": lambda a, b: (sext(a, 24) * sext(b, 24)).astype(np.int64).astype(np.uint64) & M,
}


def check_int(got, ref):
    assert np.array_equal(np.asarray(got, np.uint32), np.asarray(ref).astype(np.uint32))


def run_binary(name, a, b, mul=False):
    fn = getattr(A, name)
    def body():
        if mul:
            nop().__getattr__(name)(d_, a_, b_)
        else:
            fn(d_, a_, b_)
    return run_body(body, [a, b])[0]


@pytest.mark.parametrize("name", sorted(INT_BINARY))
def test_int_binary_add_alu_edges(name):
    a = EDGE_U32
    b = np.roll(EDGE_U32, 5)
    check_int(run_binary(name, a, b), INT_BINARY[name](a, b))


@pytest.mark.parametrize("name", sorted(MUL_INT_BINARY))
def test_int_binary_mul_alu_edges(name):
    a = EDGE_U32
    b = np.roll(EDGE_U32, 3)
    check_int(run_binary(name, a, b, mul=True), MUL_INT_BINARY[name](a, b))


u32_arrays = hnp.arrays(np.uint32, 16, elements=st.integers(0, 2 ** 32 - 1))


@settings(max_examples=15, deadline=None)
@given(name=st.sampled_from(sorted(INT_BINARY)), a=u32_arrays, b=u32_arrays)
def test_int_binary_random(name, a, b):
    check_int(run_binary(name, a, b), INT_BINARY[name](a, b))


@settings(max_examples=8, deadline=None)
@given(name=st.sampled_from(sorted(MUL_INT_BINARY)), a=u32_arrays, b=u32_arrays)
def test_mul_int_binary_random(name, a, b):
    check_int(run_binary(name, a, b, mul=True), MUL_INT_BINARY[name](a, b))


@pytest.mark.parametrize("imm", [0, 1, 5, 15, -1, -16, 0.5, 2.0, 128.0, 0.00390625])
@pytest.mark.parametrize("pos", [0, 1])
def test_small_immediates(imm, pos):
    """add with a small immediate in either operand; the immediate's 32-bit pattern is the
    integer (two's complement) or the float32 bits."""
    a = EDGE_U32
    imm_bits = np.uint32(np.float32(imm).view(np.uint32)) if isinstance(imm, float) else np.uint32(imm & 0xFFFFFFFF)
    def body():
        A.add(d_, imm, a_) if pos == 0 else A.add(d_, a_, imm)
    got = run_body(body, [a])[0]
    check_int(got, (u64(a) + np.uint64(imm_bits)) & M)


def test_small_immediate_on_mul_alu():
    a = np.arange(16, dtype=np.float32)
    got = run_body(lambda: nop().fmul(d_, a_, 0.5), [a])[0]
    assert same_float(got, a * np.float32(0.5))


# ---------------------------------------------------------------- float binary
def fminnum(a, b, want_max):
    a = np.asarray(a, np.float32)
    b = np.asarray(b, np.float32)
    out = np.where(np.isnan(a), b, np.where(np.isnan(b), a, np.fmax(a, b) if want_max else np.fmin(a, b)))
    zero_tie = (a == b)
    sa = (a.view(np.uint32) >> 31) == 1
    pick_a = (~sa) if want_max else sa
    return np.where(zero_tie, np.where(pick_a, a, b), out).astype(np.float32)


FLOAT_BINARY = {
    "fadd": lambda a, b: a + b,
    "faddnf": lambda a, b: a + b,
    "fsub": lambda a, b: a - b,
    "fmul": lambda a, b: a * b,
    "fcmp": lambda a, b: a - b,
    "fmin": lambda a, b: fminnum(a, b, False),
    "fmax": lambda a, b: fminnum(a, b, True),
}


def float_ref(name, a, b):
    with np.errstate(all="ignore"):
        return ftz(FLOAT_BINARY[name](ftz(a), ftz(b)).astype(np.float32))


@pytest.mark.parametrize("name", sorted(FLOAT_BINARY))
def test_float_binary_edges(name):
    for shift in (0, 1, 3, 7, 11):
        a = EDGE_F32
        b = np.roll(EDGE_F32, shift)
        if name == "faddnf" and shift == 0:
            continue            # faddnf with identical operands is not encodable
        got = run_binary(name, a, b, mul=False) if name != "fmul" else run_binary(name, a, b)
        assert same_float(got, float_ref(name, a, b)), (name, shift)


@settings(max_examples=15, deadline=None)
@given(name=st.sampled_from(["fadd", "fsub", "fmul", "fmin", "fmax", "fcmp"]),
       a=hnp.arrays(np.float32, 16, elements=st.floats(width=32)),
       b=hnp.arrays(np.float32, 16, elements=st.floats(width=32)))
def test_float_binary_random(name, a, b):
    assert same_float(run_binary(name, a, b), float_ref(name, a, b))


def test_fmul_on_mul_alu_dual_issue():
    a = RNG.standard_normal(16).astype(np.float32)
    b = RNG.standard_normal(16).astype(np.float32)
    def body():
        A.fadd(OUT_REGS[0], a_, b_).fmul(OUT_REGS[1], a_, b_)
    got = run_body(body, [a, b], n_out=2)
    assert same_float(got[0], ftz(a + b)) and same_float(got[1], ftz(a * b))


F32_UNPACK = {
    "none": lambda x: f32(x),
    "abs": lambda x: np.abs(ftz(f32(x))),
    "l": lambda x: f16_to_f32(x & 0xFFFF),
    "h": lambda x: f16_to_f32(x >> 16),
}


def pack_ref(x, mode):
    x = ftz(x)
    if mode == "none":
        return x.view(np.uint32)
    h = f16_bits(x)
    return h if mode == "l" else (h << 16).astype(np.uint32)


def reg_with(reg, mode, kind):
    if mode == "none":
        return reg
    return reg.pack(mode) if kind == "pack" else reg.unpack(mode)


def half_pairs():
    lo = f16_bits(RNG.uniform(-100, 100, 16).astype(np.float32))
    hi = f16_bits(RNG.uniform(-100, 100, 16).astype(np.float32))
    return (lo | (hi << 16)).astype(np.uint32)


@pytest.mark.parametrize("name", ["fadd", "fsub", "fmul", "fmin", "fmax"])
@pytest.mark.parametrize("pack", ["none", "l", "h"])
@pytest.mark.parametrize("ua,ub", [("abs", "none"), ("l", "h"), ("h", "abs"), ("none", "l")])
def test_float_pack_unpack(name, pack, ua, ub):
    a = half_pairs() if ua in ("l", "h") else RNG.standard_normal(16).astype(np.float32).view(np.uint32)
    b = half_pairs() if ub in ("l", "h") else RNG.standard_normal(16).astype(np.float32).view(np.uint32)
    fn = getattr(A, name)
    def body():
        fn(reg_with(d_, pack, "pack"), reg_with(a_, ua, "unpack"), reg_with(b_, ub, "unpack"))
    got = run_body(body, [a, b])[0]
    with np.errstate(all="ignore"):
        x = F32_UNPACK[ua](a).astype(np.float32)
        y = F32_UNPACK[ub](b).astype(np.float32)
        ref = FLOAT_BINARY[name](ftz(x), ftz(y)).astype(np.float32)
    check_int(got, pack_ref(ref, pack))


# ---------------------------------------------------------------- unary
def round_half_even(x):
    return np.round(x)


def f2i(x, lo, hi, fn):
    x = np.asarray(x, np.float64)
    out = np.where(np.isnan(x), 0, np.clip(np.nan_to_num(fn(x), nan=0, posinf=hi, neginf=lo), lo, hi))
    return out.astype(np.int64).astype(np.uint64) & M


def clz(x):
    return np.array([32 - int(v).bit_length() for v in x], dtype=np.uint32)


UNARY_INT = {
    "mov": lambda a: a,
    "bnot": lambda a: ~a,
    "neg": lambda a: (-(u64(a).astype(np.int64))).astype(np.uint64) & M,
    "clz": clz,
    "itof": lambda a: bits(a.view(np.int32).astype(np.float32)),
    "utof": lambda a: bits(a.astype(np.float32)),
    "ballot": lambda a: np.full(16, int(sum(1 << i for i in range(16) if a[i] != 0)), np.uint32),
    "bcastf": lambda a: np.full(16, a[0], np.uint32),
    "alleq": lambda a: np.full(16, int(np.all(a == a[0])), np.uint32),
}


@pytest.mark.parametrize("name", sorted(UNARY_INT))
def test_unary_int(name):
    fn = getattr(A, name)
    for a in (EDGE_U32, np.full(16, 7, np.uint32), np.zeros(16, np.uint32)):
        got = run_body(lambda: fn(d_, a_), [a])[0]
        check_int(got, UNARY_INT[name](a))


@pytest.mark.parametrize("mode,ref", [
    ("ul", lambda a: a & 0xFFFF), ("uh", lambda a: a >> 16),
    ("il", lambda a: sext(a, 16).astype(np.int64).astype(np.uint64) & M),
    ("ih", lambda a: sext(a >> 16, 16).astype(np.int64).astype(np.uint64) & M)])
def test_mov_int_unpack(mode, ref):
    got = run_body(lambda: A.mov(d_, a_.unpack(mode)), [EDGE_U32])[0]
    check_int(got, ref(EDGE_U32))


FLOAT_UNARY = {
    "fround": round_half_even, "ftrunc": np.trunc, "ffloor": np.floor, "fceil": np.ceil,
}


@pytest.mark.parametrize("name", sorted(FLOAT_UNARY))
def test_float_rounding(name):
    a = np.array([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 2.7, -2.7, 1e20, -0.0, np.inf, -np.inf, 1e-40,
                  0.49999997, 3.0, -7.25], dtype=np.float32)
    got = run_body(lambda: getattr(A, name)(d_, a_), [a])[0]
    with np.errstate(all="ignore"):
        ref = ftz(FLOAT_UNARY[name](ftz(a)).astype(np.float32))
    assert same_float(got, ref)


def test_float_to_int_conversions():
    a = np.array([0.5, 1.5, 2.5, -0.5, -1.5, -2.7, 2.7, 3e9, -3e9, np.nan, np.inf, -np.inf, 1e-40,
                  4e9, 65535.9, -1.0], dtype=np.float32)
    got = run_body(lambda: (A.ftoin(OUT_REGS[0], a_), A.ftoiz(OUT_REGS[1], a_),
                            A.ftouz(OUT_REGS[2], a_)), [a], n_out=3)
    imin, imax = -2 ** 31, 2 ** 31 - 1
    check_int(got[0], f2i(ftz(a), imin, imax, np.round))
    check_int(got[1], f2i(ftz(a), imin, imax, np.trunc))
    check_int(got[2], f2i(ftz(a), 0, 2 ** 32 - 1, np.trunc))


@pytest.mark.parametrize("mode", ["none", "abs", "l", "h", "sat", "nsat", "max0"])
@pytest.mark.parametrize("pack", ["none", "l"])
def test_fmov_modifiers(mode, pack):
    if mode in ("l", "h"):
        a = half_pairs()
    else:
        a = np.array([0.25, -0.25, 1.5, -1.5, 0.0, -0.0, np.nan, np.inf, -np.inf, 1e-40, 0.99,
                      -0.99, 7.0, -7.0, 1.0, -1.0], dtype=np.float32).view(np.uint32)
    got = run_body(lambda: A.fmov(reg_with(d_, pack, "pack"), reg_with(a_, mode, "unpack")), [a])[0]
    x = ftz(F32_UNPACK.get(mode, F32_UNPACK["none"])(a))
    with np.errstate(all="ignore"):
        if mode == "sat":
            x = np.clip(np.nan_to_num(x, nan=0.0), 0, 1).astype(np.float32)
        elif mode == "nsat":
            x = np.clip(np.nan_to_num(x, nan=0.0), -1, 1).astype(np.float32)
        elif mode == "max0":
            x = np.where(np.isnan(x) | (x < 0), np.float32(0), x).astype(np.float32)
    if pack == "none":
        assert same_float(got, x)
    else:
        check_int(got, pack_ref(x, pack))


def test_mul_side_fmov_and_mov():
    a = RNG.standard_normal(16).astype(np.float32)
    got = run_body(lambda: nop().fmov(OUT_REGS[0], a_.unpack("abs")), [a])[0]
    assert same_float(got, np.abs(a))
    got = run_body(lambda: nop().mov(OUT_REGS[0], a_), [a])[0]
    check_int(got, a.view(np.uint32))


def test_fdx_fdy():
    a = RNG.uniform(-10, 10, 16).astype(np.float32)
    got = run_body(lambda: (A.fdx(OUT_REGS[0], a_), A.fdy(OUT_REGS[1], a_)), [a], n_out=2)
    fdx = np.repeat(a[1::2] - a[0::2], 2)
    q = a.reshape(4, 4)
    fdy = np.hstack([np.tile(r[2:4] - r[0:2], 2) for r in q])
    assert same_float(got[0], ftz(fdx)) and same_float(got[1], ftz(fdy))


@pytest.mark.parametrize("name,ref,lo,hi", [
    ("recip", lambda x: 1 / x, 0.001, 1024), ("rsqrt", lambda x: 1 / np.sqrt(x), 0.001, 1024),
    ("rsqrt2", lambda x: 1 / np.sqrt(x), 0.001, 1024), ("exp", np.exp2, -10, 10),
    ("log", np.log2, 0.001, 1024), ("sin", lambda x: np.sin(np.pi * x), -0.5, 0.5)])
def test_sfu_ops(name, ref, lo, hi):
    """SFU results: documented accuracy is 1 ulp of float32 (the emulator rounds the exact
    value); the hardware's approximation error is not published."""
    a = RNG.uniform(lo, hi, 16).astype(np.float32)
    if name == "recip":
        a[:8] = -a[:8]
    got = f32(run_body(lambda: getattr(A, name)(d_, a_), [a])[0])
    r = ref(a.astype(np.float64))
    assert np.allclose(got, r, rtol=2 ** -23, atol=1e-7)


def test_sfu_specials():
    a = np.array([0.0, -0.0, np.inf, -1.0, np.nan, 1e-40, 1.0, 4.0] * 2, dtype=np.float32)
    got = run_body(lambda: (A.recip(OUT_REGS[0], a_),), [a])[0]
    r = f32(got)
    assert r[0] == np.inf and r[1] == -np.inf and r[2] == 0 and r[3] == -1 and np.isnan(r[4])
    assert r[5] == np.inf            # denormal input flushed to +0 -> +inf
    got = f32(run_body(lambda: A.rsqrt(d_, a_), [a])[0])
    assert got[0] == np.inf and np.isnan(got[3]) and got[7] == 0.5
    got = f32(run_body(lambda: A.log(d_, a_), [a])[0])
    assert got[0] == -np.inf and np.isnan(got[3]) and got[6] == 0


def test_allfeq():
    a = np.full(16, 2.0, np.float32)
    a[3] = -0.0
    a[4] = 0.0
    b = np.full(16, np.float32(1.5))
    got = run_body(lambda: (A.allfeq(OUT_REGS[0], a_), A.allfeq(OUT_REGS[1], b_)), [a, b], n_out=2)
    check_int(got[0], np.zeros(16))
    check_int(got[1], np.ones(16))


# ---------------------------------------------------------------- float16 pairs
def vf_ref(op, a_pairs, b_pairs):
    out = []
    for half in (0, 1):
        x = f16_to_f32(a_pairs >> (16 * half))
        y = f16_to_f32(b_pairs >> (16 * half))
        r = {"vfmul": x * y, "vfmin": fminnum(x, y, False), "vfmax": fminnum(x, y, True)}[op]
        out.append(f16_bits(r.astype(np.float32)) << (16 * half))
    return (out[0] | out[1]).astype(np.uint32)


F16_SRC1 = {
    "none": lambda a: a,
    "r32": lambda a: (f16_bits(ftz(f32(a))) * 0x10001).astype(np.uint32),
    "rl2h": lambda a: ((a & 0xFFFF) * 0x10001).astype(np.uint32),
    "rh2l": lambda a: ((a >> 16) * 0x10001).astype(np.uint32),
    "swap": lambda a: ((a >> 16) | (a << 16)).astype(np.uint32),
}


@pytest.mark.parametrize("op", ["vfmul", "vfmin", "vfmax"])
@pytest.mark.parametrize("mode", sorted(F16_SRC1))
def test_f16_pair_ops(op, mode):
    a = RNG.uniform(-50, 50, 16).astype(np.float32).view(np.uint32) if mode == "r32" else half_pairs()
    b = half_pairs()
    fn = getattr(A, op) if op != "vfmul" else (lambda *x: nop().vfmul(*x))
    got = run_body(lambda: fn(d_, reg_with(a_, mode, "unpack"), b_), [a, b])[0]
    check_int(got, vf_ref(op, F16_SRC1[mode](a), b))


@pytest.mark.parametrize("ua,ub", [("none", "none"), ("l", "h"), ("h", "none")])
def test_vfpack(ua, ub):
    a = half_pairs() if ua in ("l", "h") else RNG.uniform(-9, 9, 16).astype(np.float32).view(np.uint32)
    b = half_pairs() if ub in ("l", "h") else RNG.uniform(-9, 9, 16).astype(np.float32).view(np.uint32)
    got = run_body(lambda: A.vfpack(d_, reg_with(a_, ua, "unpack"), reg_with(b_, ub, "unpack")), [a, b])[0]
    ref = f16_bits(F32_UNPACK[ua](a)) | (f16_bits(F32_UNPACK[ub](b)) << 16)
    check_int(got, ref)


def test_f16_conversion_rounding_and_specials():
    """fmov with pack 'l': float32 -> float16 round to nearest even, overflow to inf, NaN kept
    NaN, float16 denormal results flushed to zero."""
    a = np.array([1.0 + 2 ** -11, 1.0 + 3 * 2 ** -11, 65504.0, 65520.0, 1e6, -1e6, np.nan, np.inf,
                  1e-6, -1e-6, 6.1e-5, 2 ** -14, -0.0, 0.1, 1 / 3, 2.0], dtype=np.float32)
    got = run_body(lambda: A.fmov(d_.pack("l"), a_), [a])[0]
    ref = f16_bits(a)
    nan = np.isnan(a)
    assert np.array_equal(got[~nan], ref[~nan])
    assert ((got[nan] & 0x7C00) == 0x7C00).all() and ((got[nan] & 0x3FF) != 0).all()


# ---------------------------------------------------------------- lanes, ids
def test_eidx_tidx_and_payload():
    got = run_body(lambda: (A.eidx(OUT_REGS[0]), A.tidx(OUT_REGS[1]), A.mov(OUT_REGS[2], RF[3]),
                            A.mov(OUT_REGS[3], RF[2])), [], n_out=4)
    check_int(got[0], np.arange(16))
    check_int(got[1], np.zeros(16))
    check_int(got[2], np.zeros(16))


def test_rep_and_quad_broadcast():
    """rep writes element 0 to all lanes of rf0; quad writes lane 4q to lanes 4q..4q+3 of rf0
    (py-videocore7 tests/test_registers.py)."""
    a = np.arange(100, 116, dtype=np.uint32)
    got = run_body(lambda: (A.mov(A.rep, a_), A.mov(OUT_REGS[0], RF[0]), A.mov(A.quad, a_),
                            A.mov(OUT_REGS[1], RF[0])), [a], n_out=2)
    check_int(got[0], np.full(16, 100))
    check_int(got[1], np.repeat(a[::4], 4))


def test_reads_see_values_before_the_instruction():
    """Both ALUs read their sources before either writes (swap in one instruction)."""
    a = np.arange(16, dtype=np.uint32)
    b = a + 100
    def body():
        A.mov(OUT_REGS[0], a_)
        A.mov(OUT_REGS[1], b_)
        A.mov(OUT_REGS[0], OUT_REGS[1]).mov(OUT_REGS[1], OUT_REGS[0])
    got = run_body(body, [a, b], n_out=2)
    check_int(got[0], b)
    check_int(got[1], a)


@settings(max_examples=10, deadline=None)
@given(a=u32_arrays, b=u32_arrays)
def test_multop_umul24_is_a_full_32bit_multiply(a, b):
    """Mesa vir_UMUL = multop then umul24: the pair gives the low 32 bits of a * b; a umul24
    without a preceding multop stays a 24-bit multiply."""
    def body():
        nop().multop(A.null, a_, b_)
        nop().umul24(OUT_REGS[0], a_, b_)
        nop().umul24(OUT_REGS[1], a_, b_)
    got = run_body(body, [a, b], n_out=2)
    check_int(got[0], (u64(a) * u64(b)) & M)
    check_int(got[1], MUL_INT_BINARY["umul24"](a, b))


def unorm(x, scale):
    x = np.asarray(x, np.float64)
    with np.errstate(invalid="ignore"):
        return np.where(np.isnan(x), 0, np.round(np.clip(x, 0, 1) * scale)).astype(np.uint32)


def test_ftounorm16_and_vftounorm8():
    a = np.array([0.0, 1.0, 0.5, -3.0, 7.0, np.nan, 1e-40, 0.25, 1 / 65535 * 0.5, 0.1, 0.9, -0.0,
                  np.inf, -np.inf, 0.75, 0.3], dtype=np.float32)
    got = run_body(lambda: nop().ftounorm16(d_, a_), [a])[0]
    check_int(got, unorm(ftz(a), 65535))
    pairs = half_pairs()
    pairs[:4] = [0x3C00 | (0x3800 << 16), 0xBC00, 0x7E00 | (0x7C00 << 16), 0x3555]   # 1, 0.5, -1, nan, inf, 1/3
    got = run_body(lambda: nop().vftounorm8(d_, a_), [pairs])[0]
    ref = unorm(f16_to_f32(pairs & 0xFFFF), 255) | (unorm(f16_to_f32(pairs >> 16), 255) << 16)
    check_int(got, ref)
