"""The emulator's flag-stack, multisample / revolving-flag and packed-conversion ops against
numpy references written from the documented formats (sources in docs/emulator.md):
flapush / flbpush / flpop (py-videocore7 tests/test_condition_codes.py), msf / setmsf / revf /
setrevf (Mesa nir_to_vir.c), ftosnorm16, vftosnorm8, vftounorm10lo / hi (Mesa nir_opcodes.py and
nir_constant_expressions.py; Khronos data format spec, normalized formats) and v11fpack
(Mesa pack_32_to_r11g11b10_v3d; Khronos unsigned 11- / 10-bit floats, GL_EXT_packed_float)."""
import numpy as np
import pytest

from tvm_qpu.codegen import asm as A
from tvm_qpu.codegen.asm import L, R, b, nop
from tvm_qpu.codegen.instr import RF

from test_emulator_support import IN_REGS, OUT_REGS, f16_bits, f16_to_f32, ftz, run_body

a_, b_, c_, e_ = IN_REGS
d_ = OUT_REGS[0]
ALL = np.arange(16)
RNG = np.random.default_rng(4321)

EDGE = np.array([0.0, -0.0, 1.0, -1.0, 0.5, -0.5, 3.0, -3.0, np.nan, np.inf, -np.inf, 1e-40,
                 -1e-40, 0.3, -0.7, 1.0 / 32767 * 0.5], dtype=np.float32)


def check(got, ref):
    assert np.array_equal(np.asarray(got, np.uint32), np.asarray(ref).astype(np.uint32)), \
        (np.asarray(got, np.uint32), np.asarray(ref).astype(np.uint32))


def vfl(flags):
    """What vfla / vflb return for these flags: the flag in each 16-bit half (0x00010001; py-
    videocore7 test_cond_vflx, docs/emulator.md "Flags")."""
    return np.asarray(flags).astype(np.uint32) * np.uint32(0x00010001)


def rne(x):
    """Round half to even (numpy rounds half to even)."""
    return np.round(x)


def snorm(x, bits):
    """Khronos signed normalized: round(clamp(x, -1, 1) * (2^(b-1) - 1)), two's complement in
    b bits; NaN -> 0 (emulator convention, as for unorm)."""
    s = (1 << (bits - 1)) - 1
    x = np.asarray(x, np.float64)
    with np.errstate(invalid="ignore"):
        v = np.where(np.isnan(x), 0, rne(np.clip(x, -1, 1) * s)).astype(np.int64)
    return (v & ((1 << bits) - 1)).astype(np.uint32)


def unorm(x, bits):
    s = (1 << bits) - 1
    x = np.asarray(x, np.float64)
    with np.errstate(invalid="ignore"):
        return np.where(np.isnan(x), 0, rne(np.clip(x, 0, 1) * s)).astype(np.uint32)


def halves(lo, hi):
    return (np.asarray(lo, np.uint32) & 0xFFFF) | (np.asarray(hi, np.uint32) << 16)


H_EDGE = np.array([0x0000, 0x8000, 0x3C00, 0xBC00, 0x3800, 0xB800, 0x4200, 0xC200, 0x7E00,
                   0x7C00, 0xFC00, 0x0001, 0x83FF, 0x3BFF, 0x1C00, 0x3A00], dtype=np.uint32)
# 0, -0, 1, -1, 0.5, -0.5, 3, -3, nan, inf, -inf, denormal, -denormal, 0.99951, 2^-8, 0.75


# ---------------------------------------------------------------- normalized conversions
def test_ftosnorm16():
    rand = RNG.uniform(-1.5, 1.5, 16).astype(np.float32)
    for x in (EDGE, rand):
        got = run_body(lambda: nop().ftosnorm16(d_, a_), [x])[0]
        check(got, snorm(ftz(x), 16))       # the int16 in the low half, 0 in the high half
    # exact half-way cases round to even: +-(k + 0.5) / 32767
    x = ((np.arange(16) + 0.5) / 32767 * np.where(ALL % 2 == 0, 1, -1)).astype(np.float32)
    got = run_body(lambda: nop().ftosnorm16(d_, a_), [x])[0]
    check(got, snorm(x, 16))


def test_vftosnorm8():
    rnd = f16_bits(RNG.uniform(-1.3, 1.3, 32).astype(np.float32))
    for lo, hi in ((H_EDGE, H_EDGE[::-1]), (rnd[:16], rnd[16:])):
        got = run_body(lambda: nop().vftosnorm8(d_, a_), [halves(lo, hi)])[0]
        check(got, snorm(f16_to_f32(lo), 8) | (snorm(f16_to_f32(hi), 8) << 16))
    # -1 -> -127 (0x81), never -128; +-0 -> 0
    got = run_body(lambda: nop().vftosnorm8(d_, a_), [np.full(16, 0xBC008000, np.uint32)])[0]
    check(got, np.full(16, 0x00810000))


@pytest.mark.parametrize("op", ["vftounorm10lo", "vftounorm10hi"])
def test_vftounorm10(op):
    rnd = f16_bits(RNG.uniform(-0.2, 1.2, 32).astype(np.float32))
    hi_bits = 10 if op == "vftounorm10lo" else 2
    for lo, hi in ((H_EDGE, H_EDGE[::-1]), (rnd[:16], rnd[16:])):
        got = run_body(lambda: getattr(nop(), op)(d_, a_), [halves(lo, hi)])[0]
        check(got, unorm(f16_to_f32(lo), 10) | (unorm(f16_to_f32(hi), hi_bits) << 16))


def test_unorm10_lowering_matches_r10g10b10a2():
    """Mesa's image-store lowering: vfpack(r, g) -> vftounorm10lo, vfpack(b, a) ->
    vftounorm10hi, then v10pack = the R10G10B10A2 unorm word."""
    rgba = RNG.uniform(-0.1, 1.1, (4, 16)).astype(np.float32)
    def body():
        A.vfpack(RF[30], a_, b_)
        A.vfpack(RF[31], c_, e_)
        nop().vftounorm10lo(RF[32], RF[30])
        nop().vftounorm10hi(RF[33], RF[31])
        A.v10pack(d_, RF[32], RF[33])
    got = run_body(body, list(rgba))[0]
    q = [f16_to_f32(f16_bits(c)) for c in rgba]
    ref = unorm(q[0], 10) | (unorm(q[1], 10) << 10) | (unorm(q[2], 10) << 20) | (unorm(q[3], 2) << 30)
    check(got, ref)


# ---------------------------------------------------------------- v11fpack
def small_float(v, mbits):
    """Reference: an unsigned float with 5 exponent bits (bias 15) and mbits mantissa bits,
    computed from the value with float arithmetic (not bit slicing): round to nearest even,
    negatives -> 0, NaN -> exponent 31 mantissa 1, +inf -> inf, too large -> largest finite."""
    out = np.zeros(v.shape, np.uint32)
    emax = 31 << mbits
    for i, x in enumerate(np.asarray(v, np.float64)):
        if np.isnan(x):
            out[i] = emax | 1
        elif x == np.inf:
            out[i] = emax
        elif not x > 0:
            out[i] = 0
        else:
            e = int(np.floor(np.log2(x)))
            m = rne((x / 2.0 ** e - 1.0) * (1 << mbits))
            if m == (1 << mbits):
                e, m = e + 1, 0
            out[i] = min((e + 15) << mbits | int(m), emax - 1)
    return out


def v11_ref(a, bb):
    lo, hi, bl = (f16_to_f32(a & 0xFFFF), f16_to_f32(a >> 16), f16_to_f32(bb & 0xFFFF))
    return small_float(lo, 6) | (small_float(hi, 6) << 11) | (small_float(bl, 5) << 22)


def test_v11fpack():
    specials = H_EDGE.copy()
    # largest float16 (65504 -> clamped to 65024), rounding ties in both widths, 2^-14
    extra = np.array([0x7BFF, 0x7BC0, 0x3C08, 0x3C18, 0x3C10, 0x3C30, 0x0400, 0x3C1F],
                     dtype=np.uint32)
    ins = [halves(specials, specials[::-1]), halves(np.tile(extra, 2), specials),
           f16_bits(RNG.uniform(0, 70000, 16).astype(np.float32)) | (f16_bits(RNG.uniform(-5, 5, 16).astype(np.float32)) << 16),
           RNG.integers(0, 1 << 32, 16, dtype=np.uint64).astype(np.uint32)]
    pairs = [(0, 1), (1, 0), (2, 3), (3, 2), (0, 2), (2, 0), (3, 1), (1, 3)]
    def body():
        for j, (x, y) in enumerate(pairs):
            A.v11fpack(OUT_REGS[j], IN_REGS[x], IN_REGS[y])
    got = run_body(body, ins, n_out=len(pairs))
    for j, (x, y) in enumerate(pairs):
        check(got[j], v11_ref(ins[x], ins[y]))


def test_v11fpack_lowering_of_an_r11g11b10f_store():
    """Mesa pack_11f11f10f: vfpack(r, g), vfpack(b, undef), v11fpack."""
    rgb = np.abs(RNG.normal(0, 100, (3, 16))).astype(np.float32)
    rgb[0, :3] = [0.0, np.inf, 1e6]
    def body():
        A.vfpack(RF[30], a_, b_)
        A.vfpack(RF[31], c_, c_)
        A.v11fpack(d_, RF[30], RF[31])
    got = run_body(body, list(rgb))[0]
    h = [f16_bits(c) for c in rgb]
    check(got, v11_ref(halves(h[0], h[1]), h[2]))


# ---------------------------------------------------------------- flag stack
def test_flag_push_pop_results():
    """py-videocore7 test_cond_flx: A = (x2 & 1) == 0, B = x2 < 0; flapush d = x1 << 2 | 3A,
    flbpush d = x1 << 2 | 3B, flpop d = x1 >> 2."""
    x1 = RNG.integers(0, 1 << 32, 16, dtype=np.uint64).astype(np.uint32)
    x2 = RNG.integers(-1000, 1000, 16).astype(np.int32)
    def body():
        A.mov(A.null, b_, cond="pushn")
        A.band(A.null, b_, 1, cond="pushz")
        A.flapush(OUT_REGS[0], a_)
        A.flbpush(OUT_REGS[1], a_)
        A.flpop(OUT_REGS[2], a_)
    got = run_body(body, [x1, x2.view(np.uint32)], n_out=3)
    fa = ((x2 & 1) == 0).astype(np.uint64)
    fb = (x2 < 0).astype(np.uint64)
    m = np.uint64(0xFFFFFFFF)
    check(got[0], ((x1.astype(np.uint64) << np.uint64(2)) & m) | (np.uint64(3) * fa))
    check(got[1], ((x1.astype(np.uint64) << np.uint64(2)) & m) | (np.uint64(3) * fb))
    check(got[2], x1 >> 2)


def test_flapush_does_not_change_flags():
    def body():
        A.eidx(RF[10])
        A.sub(A.null, RF[10], 3, cond="pushc")       # A = lane < 3
        A.sub(A.null, RF[10], 8, cond="pushc")       # A = lane < 8, B = lane < 3
        A.flapush(RF[12], 0)
        A.flbpush(RF[12], RF[12])
        A.vfla(OUT_REGS[0])
        A.vflb(OUT_REGS[1])
        A.mov(OUT_REGS[2], RF[12])
    got = run_body(body, [], n_out=3)
    check(got[0], vfl(ALL < 8))
    check(got[1], vfl(ALL < 3))
    check(got[2], np.where(ALL < 8, 12, 0) | np.where(ALL < 3, 3, 0))


def test_nested_flag_stack_with_branches():
    """Save A twice, clobber it, pop twice: each pop restores the saved A (and B), and a branch
    on the restored flags goes the saved way."""
    def body():
        A.eidx(RF[10])
        A.mov(d_, 0)
        A.sub(A.null, RF[10], 4, cond="pushc")       # A = lane < 4 (level 1)
        A.flapush(RF[12], 0)
        A.mov(A.null, RF[10], cond="pushz")          # A = lane == 0 (level 2)
        A.flapush(RF[12], RF[12])
        A.mov(A.null, 1, cond="pushz")               # A = 0 everywhere
        b(R.wrong, cond="anya")                      # not taken: A is clear
        nop()
        nop()
        nop()
        A.flpop(RF[12], RF[12])                      # A = B = lane == 0
        A.vfla(OUT_REGS[1])
        A.vflb(OUT_REGS[2])
        b(R.level2, cond="a0")                       # taken: lane 0 holds A
        nop()
        nop()
        nop()
        L.wrong
        A.mov(d_, 15)
        b(R.done, cond="always")
        nop()
        nop()
        nop()
        L.level2
        A.add(d_, d_, 1)
        A.flpop(RF[12], RF[12])                      # A = lane < 4
        A.vfla(OUT_REGS[3])
        b(R.wrong, cond="alla")                      # not taken
        nop()
        nop()
        nop()
        b(R.done, cond="anyna")                      # taken
        A.add(d_, d_, 10)                            # delay slot
        nop()
        nop()
        A.mov(d_, 13)
        L.done
        A.mov(OUT_REGS[4], RF[12])
    got = run_body(body, [], n_out=5)
    check(got[0], np.full(16, 11))
    check(got[1], vfl(ALL == 0))
    check(got[2], vfl(ALL == 0))
    check(got[3], vfl(ALL < 4))
    check(got[4], np.zeros(16))


def test_flpop_flag_write_follows_condition_and_precedes_pushes():
    def body():
        A.eidx(RF[10])
        A.mov(RF[11], 3)                             # entry: A = B = 1
        A.sub(A.null, RF[10], 6, cond="pushc")       # A = lane < 6
        A.flpop(RF[12], RF[11], cond="ifna")         # only lanes >= 6 pop: A = B = 1 there
        A.vfla(OUT_REGS[0])
        A.vflb(OUT_REGS[1])
        # flpop together with a mul push: the pop first, then the push (A -> B)
        A.mov(A.null, 1, cond="pushz")               # A = 0
        A.flpop(RF[12], RF[11]).sub(A.null, RF[10], 2, cond="pushc")
        A.vfla(OUT_REGS[2])
        A.vflb(OUT_REGS[3])
    got = run_body(body, [], n_out=4)
    check(got[0], vfl(np.ones(16)))
    check(got[1], vfl(ALL >= 6))
    check(got[2], vfl(ALL < 2))
    check(got[3], vfl(np.ones(16)))


# ---------------------------------------------------------------- msf / revf
@pytest.mark.parametrize("wg_size", [1, 5, 12, 16])
def test_msf_is_the_workgroup_lane_mask(wg_size):
    # lanes >= wg_size store nothing, so their values are observed through active lanes:
    # ballot (mask of nonzero lanes) and rotate (lane 15 -> lane 0)
    def body():
        A.msf(OUT_REGS[0])
        A.ballot(OUT_REGS[3], OUT_REGS[0])
        A.mov(RF[10], 15)
        A.rotate(OUT_REGS[4], OUT_REGS[0], RF[10])
        A.msf(A.null, cond="pushz")                  # A = inactive lanes (Mesa elect)
        A.flnafirst(OUT_REGS[1])                     # first active lane
        A.mov(OUT_REGS[2], 0)
        b(R.partial, cond="anya")
        nop()
        nop()
        nop()
        A.mov(OUT_REGS[2], 1)                        # whole workgroup active
        L.partial
    got = run_body(body, [], n_out=5, wg_size=wg_size)
    stored = ALL < wg_size
    check(got[0], np.where(stored, 0xF, 0))
    check(got[3], np.where(stored, (1 << wg_size) - 1, 0))
    check(got[4][0], 0xF if wg_size == 16 else 0)
    check(got[1], ALL == 0)
    check(got[2], np.full(16, 1 if wg_size == 16 else 0))


def test_setmsf_and_revf():
    def body():
        A.eidx(RF[10])
        A.band(A.null, RF[10], 1, cond="pushz")      # A = even lanes
        A.setmsf(A.null, 0, cond="ifa")              # discard even lanes (Mesa discard)
        A.msf(OUT_REGS[0])
        A.setmsf(RF[13], RF[10], cond="ifna")        # odd lanes: mask = eidx & 0xF
        A.msf(OUT_REGS[1])
        A.mov(OUT_REGS[2], RF[13], cond="ifna")
        A.revf(OUT_REGS[3])
        A.shr(RF[11], RF[10], 1)
        A.setrevf(A.null, RF[11])                    # revf = bit 0 of the source
        A.revf(OUT_REGS[4])
    got = run_body(body, [], n_out=5)
    odd = ALL % 2 == 1
    check(got[0], np.where(odd, 0xF, 0))
    check(got[1], np.where(odd, ALL & 0xF, 0))
    check(got[2], np.where(odd, ALL, 0))
    check(got[3], np.zeros(16))
    check(got[4], (ALL >> 1) & 1)


def test_msf_per_workgroup_in_a_multi_workgroup_dispatch():
    """Every thread starts with the dispatch's mask, whatever an earlier one did with setmsf."""
    def body():
        A.msf(RF[10])
        A.ballot(d_, RF[10])
        A.setmsf(A.null, 0)
    got = run_body(body, [], wg_size=3, workgroups=(5, 1, 1), threads=2)[0]
    check(got, np.where(ALL < 3, 0b111, 0))
