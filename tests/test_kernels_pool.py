"""max / avg / global-avg pooling kernels on the emulator against numpy references.

Integers and max pooling are exact; float averages within FP32_TOL x (sum |x| / count)."""
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from tvm_qpu.codegen.kernels import pool as PL, reduce as RD
from tvm_qpu.codegen.plan import run_plan
from tvm_qpu.codegen.registry import OpSpec

DTYPES = ("float32", "int8", "int16", "int32")
FP32_TOL = 1e-5


def _data(rng, shape, dtype, specials=False):
    if dtype == "float32":
        x = (rng.standard_normal(shape) * 10).astype(np.float32)
        if specials:
            flat = x.reshape(-1)
            idx = rng.integers(0, flat.size, min(2, flat.size))
            flat[idx] = rng.choice(np.array([np.nan, np.inf, -np.inf, -0.0], np.float32), idx.size)
        return x
    lo, hi = RD.INT_RANGE[dtype]
    return rng.integers(lo, hi, shape, endpoint=True).astype(dtype)


def _check(dev, g: PL.Pool2D, x):
    out, _ = run_plan(PL.plan_pool(g), dev, data=x)
    ref = PL.reference(g, x)
    assert out.shape == ref.shape == (g.N, g.C, g.OH, g.OW) and out.dtype == ref.dtype
    if g.dtype == "float32" and g.op == "avg":
        absum = PL.reference(g, np.abs(x))
        err = np.abs(out.astype(np.float64) - ref)
        bad = ~(err <= FP32_TOL * np.abs(absum) + 1e-30) & ~(np.isnan(out) & np.isnan(ref)) & ~(out == ref)
        assert not bad.any(), (out[bad], ref[bad])
    else:
        np.testing.assert_array_equal(out, ref)


@st.composite
def pools(draw):
    kh, kw = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    dh, dw = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    H = draw(st.integers((kh - 1) * dh + 1, 11))
    W = draw(st.integers((kw - 1) * dw + 1, 11))
    pads = [draw(st.integers(0, k // 2)) for k in (kh, kw, kh, kw)]
    op = draw(st.sampled_from(("max", "avg")))
    g = PL.Pool2D(draw(st.integers(1, 2)), draw(st.integers(1, 5)), H, W, kh, kw, draw(st.integers(1, 3)),
                  draw(st.integers(1, 3)), *pads, dh, dw, draw(st.booleans()), op, draw(st.booleans()),
                  draw(st.sampled_from(DTYPES)))
    return g, draw(st.integers(0, 2 ** 31))


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(pools())
def test_random_pools(dev, case):
    g, seed = case
    ok, why = PL.supports(_spec(g))
    if not ok:                      # an avg window with nothing to count, or too many registers
        assert why
        try:
            PL.check(g)
        except ValueError:
            return
        assert "registers" in why, why
        return
    _check(dev, g, _data(np.random.default_rng(seed), (g.N, g.C, g.H, g.W), g.dtype, specials=True))


def _spec(g: PL.Pool2D):
    kind = "max_pool2d" if g.op == "max" else "avg_pool2d"
    return OpSpec(kind, [((g.N, g.C, g.H, g.W), g.dtype)], ((g.N, g.C, g.OH, g.OW), g.dtype),
                  {"pool_size": (g.kh, g.kw), "strides": (g.sh, g.sw), "padding": (g.pt, g.pl, g.pb, g.pr),
                   "dilation": (g.dh, g.dw), "ceil_mode": g.ceil_mode, "count_include_pad": g.count_include_pad,
                   "layout": "NCHW"})


EDGE = [
    dict(N=1, C=1, H=1, W=1, kh=1, kw=1),                                          # 1x1
    dict(N=1, C=3, H=13, W=17, kh=3, kw=3, sh=2, sw=2, pt=1, pl=1, pb=1, pr=1),     # primes, pad all sides
    dict(N=2, C=3, H=7, W=9, kh=3, kw=2, sh=2, sw=3, pt=1, pl=0, pb=0, pr=1, ceil_mode=True),
    dict(N=1, C=2, H=5, W=6, kh=2, kw=2, dh=2, dw=2, pt=1, pb=2, pr=1),             # dilation
    dict(N=1, C=5, H=31, W=23, kh=4, kw=4, sh=4, sw=4, ceil_mode=True),            # overhang, no padding
    dict(N=1, C=20, H=4, W=4, kh=2, kw=2, sh=2, sw=2),                             # 4 outputs / plane
    dict(N=1, C=4, H=9, W=9, kh=1, kw=1, sh=3, sw=3),
]


@pytest.mark.parametrize("geo", EDGE)
@pytest.mark.parametrize("op,cip", [("max", False), ("avg", False), ("avg", True)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_edges(dev, geo, op, cip, dtype):
    g = PL.Pool2D(**geo, op=op, count_include_pad=cip, dtype=dtype)
    _check(dev, g, _data(np.random.default_rng(7), (g.N, g.C, g.H, g.W), dtype))


def test_int32_average_wraps_and_truncates(dev):
    g = PL.Pool2D(1, 2, 6, 6, 3, 3, 3, 3, op="avg", dtype="int32")
    x = np.full((1, 2, 6, 6), 2 ** 31 - 1, np.int32)
    x[0, 1] = -7                                           # -63 / 9 = -7 exactly
    x[0, 1, 0, 0] = -8                                      # -64 / 9 = -7 (toward zero, as TVM; floor: -8)
    x[0, 1, 3:, 3:] = 0
    x[0, 1, 3, 3] = -1                                      # -1 / 9 = 0 (issue 13: the QPU gave -1)
    _check(dev, g, x)
    out, _ = run_plan(PL.plan_pool(g), dev, data=x)
    wrapped = ((2 ** 31 - 1) * 9 + 2 ** 31) % 2 ** 32 - 2 ** 31                 # 2**31 - 9: positive
    assert out[0, 1, 0, 0] == -7 and out[0, 1, 1, 1] == 0 and out[0, 0, 0, 0] == wrapped // 9


def test_max_nan_and_inf(dev):
    g = PL.Pool2D(1, 1, 4, 4, 2, 2, 2, 2, op="max", dtype="float32")
    x = np.arange(16, dtype=np.float32).reshape(1, 1, 4, 4)
    x[0, 0, 0, 1] = np.nan
    x[0, 0, 2, 2] = -np.inf
    x[0, 0, 3, 3] = np.inf
    out, _ = run_plan(PL.plan_pool(g), dev, data=x)
    assert np.isnan(out[0, 0, 0, 0]) and out[0, 0, 1, 1] == np.inf and out[0, 0, 1, 0] == 13
    _check(dev, g, x)


#: stride-2 windows the pair kernel takes (vec2 row lookups, the 3-wide ones with a lane rotation):
#: many workers whose runs start mid-row (the warm-up vector), odd W (column 2 ow + 1 outside),
#: ceil overhang, padding on every side, several planes
PAIR = [
    dict(N=1, C=3, H=9, W=50, kh=3, kw=3, sh=2, sw=2, pt=1, pl=1, pb=1, pr=1),
    dict(N=2, C=3, H=8, W=33, kh=3, kw=3, sh=2, sw=2, pt=1, pl=1, pb=0, pr=1, ceil_mode=True),
    dict(N=1, C=4, H=11, W=29, kh=2, kw=3, sh=1, sw=2, pt=0, pl=1, pb=1, pr=0),
    dict(N=1, C=5, H=10, W=37, kh=2, kw=2, sh=2, sw=2, ceil_mode=True),
    dict(N=1, C=2, H=7, W=64, kh=3, kw=2, sh=3, sw=2, pt=1, pb=1),
]


@pytest.mark.parametrize("geo", PAIR)
@pytest.mark.parametrize("op,cip", [("max", False), ("avg", False), ("avg", True)])
@pytest.mark.parametrize("dtype", ("float32", "int32"))
def test_pair_kernel(dev, geo, op, cip, dtype):
    g = PL.Pool2D(**geo, op=op, count_include_pad=cip, dtype=dtype)
    assert PL.pair_mode(g) and PL.kernel_for(g) is PL.pair_kernel
    _check(dev, g, _data(np.random.default_rng(11), (g.N, g.C, g.H, g.W), dtype, specials=dtype == "float32"))


def test_pair_kernel_nan_in_rotated_column(dev):
    """NaN / inf in the odd columns that reach their window through the lane rotation (also at
    a vector's lane 0, whose value comes from the previous vector's lane 15)."""
    g = PL.Pool2D(1, 2, 6, 80, 3, 3, 2, 2, 1, 1, 1, 1, op="max", dtype="float32")
    x = np.random.default_rng(5).standard_normal((1, 2, 6, 80)).astype(np.float32)
    x[0, 0, 1, 31] = np.nan                                # output (0, 0, 16): flat 16, lane 0
    x[0, 1, 0, 15] = np.nan                                # output (1, 0, 8): flat 128, lane 0
    x[0, 1, 3, 41] = np.nan                                # output (1, 1, 21): rotated, lane 5
    x[0, 1, 1, 9] = np.inf
    out, _ = run_plan(PL.plan_pool(g), dev, data=x)
    assert np.isnan(out[0, 0, 0, 16]) and np.isnan(out[0, 1, 0, 8]) and np.isnan(out[0, 1, 1, 21])
    assert out[0, 1, 1, 5] == np.inf and not np.isnan(out[0, 0, 0, [14, 17]]).any()
    _check(dev, g, x)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (2, 3, 7, 5), (1, 17, 3, 3), (1, 2, 40, 41)])
def test_global_avg(dev, dtype, shape):
    x = _data(np.random.default_rng(3), shape, dtype)
    spec = OpSpec("global_avg_pool2d", [(shape, dtype)], ((shape[0], shape[1], 1, 1), dtype), {"layout": "NCHW"})
    assert PL.supports(spec) == (True, "")
    out, _ = run_plan(PL.generate(spec), dev, data=x)
    ref = PL.reference_global(x)
    if dtype == "float32":
        np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5 * np.abs(x).max())
    else:
        np.testing.assert_array_equal(out, ref)


def _global(dev, x):
    shape, dtype = x.shape, str(x.dtype)
    spec = OpSpec("global_avg_pool2d", [(shape, dtype)], ((shape[0], shape[1], 1, 1), dtype), {"layout": "NCHW"})
    assert PL.supports(spec) == (True, "")
    plan = PL.generate(spec)
    out, _ = run_plan(plan, dev, data=x)
    ref = PL.reference_global(x)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    if dtype == "float32":
        absum = PL.reference_global(np.abs(x)).astype(np.float64)
        with np.errstate(invalid="ignore"):
            bad = ~(np.abs(out.astype(np.float64) - ref) <= FP32_TOL * absum + 1e-30) \
                & ~(np.isnan(out) & np.isnan(ref)) & ~(out == ref)
        assert not bad.any(), (out[bad], ref[bad])
    else:
        np.testing.assert_array_equal(out, ref)
    return plan


def _segmented(plan):
    return any(L.name.endswith("_segments") for L in plan.launches)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 32, 144, 144), (1, 5, 33, 37), (2, 3, 31, 35), (1, 1, 1, 1025),
                                   (1, 7, 64, 64), (1, 64, 56, 56)])
def test_global_avg_segment_path(dev, dtype, shape):
    """Few long planes: the segment pass (masked tails, disjoint segments), then the division."""
    x = _data(np.random.default_rng(11), shape, dtype)
    assert _segmented(_global(dev, x))


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.integers(1, 2), st.integers(1, 12), st.integers(1, 60), st.integers(1, 60), st.sampled_from(DTYPES),
       st.integers(0, 2 ** 31))
def test_global_avg_random(dev, N, C, H, W, dtype, seed):
    """Planes of any size (lengths not multiples of 16 / 64): lanes or segment path."""
    W = max(W, 1024 // H + 1) if seed % 2 else W                         # half of them long enough to segment
    _global(dev, _data(np.random.default_rng(seed), (N, C, H, W), dtype, specials=dtype == "float32"))


@pytest.mark.parametrize("dtype", ("int8", "int16", "int32"))
def test_global_avg_integer_limits(dev, dtype):
    """Sums at the dtype limits: int32 wraps modulo 2**32 (numpy int32), division toward zero."""
    lo, hi = RD.INT_RANGE[dtype]
    x = np.full((1, 4, 45, 47), hi, dtype)
    x[0, 1] = lo
    x[0, 2, ::2] = lo
    x[0, 3] = -1
    x[0, 3, 0, 0] = -2                                                   # -(45*47 + 1) / (45*47) = -1
    plan = _global(dev, x)
    assert _segmented(plan)
    out, _ = run_plan(plan, dev, data=x)
    assert out[0, 3, 0, 0] == -1


def test_global_avg_nan_inf(dev):
    x = _data(np.random.default_rng(2), (1, 4, 40, 41), "float32")
    x[0, 0, 17, 3] = np.nan
    x[0, 1, -1, -1] = np.inf
    x[0, 2, 0, 0], x[0, 2, -1, -1] = np.inf, -np.inf
    x[0, 3, 20, 0] = -np.inf
    plan = _global(dev, x)
    assert _segmented(plan)
    out, _ = run_plan(plan, dev, data=x)
    o = out.reshape(-1)
    assert np.isnan(o[0]) and o[1] == np.inf and np.isnan(o[2]) and o[3] == -np.inf


def test_global_estimate_follows_the_plan():
    for shape in ((1, 32, 144, 144), (1, 256, 7, 7)):
        spec = OpSpec("global_avg_pool2d", [(shape, "int32")], ((1, shape[1], 1, 1), "int32"), {"layout": "NCHW"})
        t = PL.estimate(spec)
        from tvm_qpu.runtime.cycle_model import DEFAULT     # the estimate's DRAM bound
        assert t >= (np.prod(shape) + shape[1]) * 4 / DEFAULT.dram_bytes_per_cycle / DEFAULT.clock_hz
        assert (len(PL.generate(spec).launches) == 2) == bool(RD.choose_segments(shape[1], shape[2] * shape[3], "int32"))


def test_registry_contract():
    g = PL.Pool2D(1, 2, 8, 8, 2, 2, 2, 2, op="avg", dtype="int32")
    spec = _spec(g)
    assert PL.supports(spec) == (True, "")
    plan = PL.generate(spec)
    assert plan.buffer("data").role == "input" and plan.buffer("out").role == "output"
    assert plan.buffer("data").nbytes >= 8 * 8 * 2 * 4
    assert PL.estimate(spec) > 0
    too_big = _spec(PL.Pool2D(1, 1, 9, 9, 5, 5, op="max"))
    ok, why = PL.supports(too_big)
    assert not ok and "taps" in why
    wrong_out = OpSpec("max_pool2d", spec.inputs, ((1, 2, 5, 5), "int32"), spec.attrs)
    assert not PL.supports(wrong_out)[0]
    nhwc = OpSpec("max_pool2d", spec.inputs, spec.output, dict(spec.attrs, layout="NHWC"))
    assert not PL.supports(nhwc)[0]
    empty = _spec(PL.Pool2D(1, 1, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0, op="avg"))
    assert PL.supports(empty)[0]


def test_bench_cases_are_valid():
    for name, spec, gen in PL.bench_cases():
        assert PL.supports(spec)[0], name
        x = gen(np.random.default_rng(0))["data"]
        assert x.shape == tuple(spec.inputs[0][0]) and str(x.dtype) == spec.inputs[0][1]


# ------------------------------------------------------------------------------------------------
# independent reference: TVM's llvm build of the same Relax op (tests/reference.py)
# ------------------------------------------------------------------------------------------------
LLVM_CASES = [   # (geometry, dtype, |x| bound: int8 / int16 windows must not overflow TVM's narrow sums)
    (dict(N=1, C=3, H=7, W=9, kh=3, kw=3, sh=2, sw=2, pt=1, pl=1, pb=1, pr=1), "int32", None),
    (dict(N=2, C=2, H=6, W=7, kh=2, kw=3, sh=2, sw=2, pt=1, pl=0, pb=1, pr=1, ceil_mode=True,
          count_include_pad=True), "int8", 14),
    (dict(N=1, C=2, H=8, W=8, kh=2, kw=2, dh=2, dw=2, pt=1, pl=1), "int16", 3000),
    (dict(N=1, C=4, H=9, W=11, kh=3, kw=2, sh=2, sw=3, pb=2, pr=1, ceil_mode=True), "float32", None),
]


@pytest.mark.parametrize("op", ["avg", "max"])
@pytest.mark.parametrize("geo,dtype,bound", LLVM_CASES, ids=[c[1] for c in LLVM_CASES])
def test_matches_tvm_llvm(dev, geo, dtype, bound, op):
    """Pooling equals TVM's llvm build of relax avg_pool2d / max_pool2d: integer averages
    truncate toward zero (issue 13), padding / ceil_mode / dilation / count_include_pad alike."""
    from reference import narrow, tvm_llvm
    g = PL.Pool2D(**geo, op=op, dtype=dtype)
    rng = np.random.default_rng(17)
    x = _data(rng, (g.N, g.C, g.H, g.W), dtype) if bound is None else \
        rng.integers(-bound, bound, (g.N, g.C, g.H, g.W), endpoint=True).astype(dtype)
    out, _ = run_plan(PL.plan_pool(g), dev, data=x)
    ref = tvm_llvm(f"{op}_pool2d", x, pool_size=(g.kh, g.kw), strides=(g.sh, g.sw), padding=(g.pt, g.pl, g.pb, g.pr),
                   dilation=(g.dh, g.dw), ceil_mode=g.ceil_mode, count_include_pad=g.count_include_pad)
    assert out.shape == ref.shape
    if dtype == "float32" and op == "avg":
        np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5 * float(np.abs(x).max()))
    else:
        np.testing.assert_array_equal(out, narrow(ref, dtype))


@pytest.mark.parametrize("shape,dtype,bound", [((2, 3, 5, 7), "int8", 3), ((1, 3, 40, 41), "int32", None),
                                               ((1, 5, 33, 37), "float32", None)])
def test_global_matches_tvm_llvm(dev, shape, dtype, bound):
    """Global average pooling (lanes and segment paths) equals TVM's llvm ``mean(x, [2, 3])``."""
    from reference import narrow, tvm_llvm
    rng = np.random.default_rng(5)
    x = _data(rng, shape, dtype) if bound is None else rng.integers(-bound, bound, shape, endpoint=True).astype(dtype)
    spec = OpSpec("global_avg_pool2d", [(shape, dtype)], ((shape[0], shape[1], 1, 1), dtype), {"layout": "NCHW"})
    out, _ = run_plan(PL.generate(spec), dev, data=x)
    ref = tvm_llvm("mean", x, axis=(2, 3), keepdims=True)
    if dtype == "float32":
        np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5 * float(np.abs(x).max()))
    else:
        np.testing.assert_array_equal(out, narrow(ref, dtype))


def test_int8_overflow_is_a_documented_difference(dev):
    """TVM sums int8 windows in int8: 4 x 127 wraps to -4, average -1. The QPU sums in int32 and
    returns the true average 127 (docs/kernels.md). If TVM ever widens its
    accumulator, this test says so and the note can go."""
    from reference import narrow, tvm_llvm
    x = np.full((1, 1, 2, 2), 127, np.int8)
    g = PL.Pool2D(1, 1, 2, 2, 2, 2, 2, 2, op="avg", dtype="int8")
    out, _ = run_plan(PL.plan_pool(g), dev, data=x)
    assert out.ravel().tolist() == [127]
    assert narrow(tvm_llvm("avg_pool2d", x, pool_size=(2, 2), strides=(2, 2)), "int8").ravel().tolist() == [-1]


# ---- launches over the dispatch budget ---------------------------------------------------------
@pytest.mark.parametrize("geo,op,dtype", [
    (dict(N=1, C=32, H=64, W=64, kh=3, kw=3, sh=2, sw=2, pt=1, pl=1, pb=1, pr=1), "max", "float32"),  # pair
    (dict(N=2, C=8, H=33, W=35, kh=3, kw=2, sh=1, sw=1, pt=1, pb=1, pr=1), "avg", "int32"),           # gather
])
def test_long_pool_splits_into_launches_within_the_budget(dev, geo, op, dtype):
    """A pooling modelled over the dispatch budget (the v3d hang check) becomes several launches
    over runs of output vectors, each modelled within the budget (the plan's launch_seconds, and
    the emulator within the estimate tolerance), with the numpy reference's result. The budget
    is forced small: a third of the whole launch."""
    from tvm_qpu.runtime.cycle_model import DEFAULT
    g = PL.Pool2D(**geo, op=op, dtype=dtype)
    whole = max(PL.launch_cycles(g, DEFAULT)) / DEFAULT.clock_hz
    assert PL.plan_pool(g).attrs["launch_seconds"] == [pytest.approx(whole)]
    assert len(PL.plan_pool(g).launches) == 1                      # the default budget: one launch
    budget = whole / 3
    plan = PL.plan_pool(g, budget_seconds=budget)
    assert len(plan.launches) >= 3 and len(plan.attrs["launch_seconds"]) == len(plan.launches)
    assert max(plan.attrs["launch_seconds"]) <= budget
    x = _data(np.random.default_rng(2), (g.N, g.C, g.H, g.W), dtype, specials=dtype == "float32")
    out, stats = run_plan(plan, dev, data=x)
    assert len(stats) == len(plan.launches)
    assert max(s.seconds for s in stats) <= 1.25 * budget
    np.testing.assert_array_equal(out, PL.reference(g, x))     # max and integer avg: exact
