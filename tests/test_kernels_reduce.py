"""reduce_max / reduce_min kernels on the emulator against numpy (exact, NaN propagates)."""
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from tvm_qpu.codegen.kernels import reduce as RD
from tvm_qpu.codegen.plan import run_plan
from tvm_qpu.codegen.registry import OpSpec
from tvm_qpu.runtime.device import open_device

DTYPES = ("float32", "int8", "int16", "int32")


@pytest.fixture(scope="module")
def dev():
    d = open_device("emulator")
    yield d
    d.close()


def _data(rng, shape, dtype, extremes=False):
    if dtype == "float32":
        x = (rng.standard_normal(shape) * 100).astype(np.float32)
    else:
        lo, hi = RD.INT_RANGE[dtype]
        x = rng.integers(lo, hi, shape, endpoint=True).astype(dtype)
    if extremes and x.size:
        flat = x.reshape(-1)
        idx = rng.integers(0, flat.size, min(3, flat.size))
        if dtype == "float32":
            flat[idx] = rng.choice(np.array([np.inf, -np.inf, -0.0, 0.0], np.float32), idx.size)
        else:
            flat[idx] = rng.choice(np.array(RD.INT_RANGE[dtype]), idx.size)
    return x


def _check(dev, op, x, axis, keepdims=False):
    plan = RD.plan_reduce(op, x.shape, str(x.dtype), axis, keepdims)
    out, _ = run_plan(plan, dev, data=x)
    ref = RD.reference(op, x, axis, keepdims)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    np.testing.assert_array_equal(out, ref)     # exact; NaN == NaN here


@st.composite
def cases(draw):
    nd = draw(st.integers(1, 4))
    shape = tuple(draw(st.lists(st.integers(1, 9), min_size=nd, max_size=nd)))
    axes = draw(st.one_of(st.none(), st.lists(st.integers(0, nd - 1), min_size=1, max_size=nd, unique=True)))
    return shape, (None if axes is None else tuple(axes)), draw(st.sampled_from(DTYPES)), \
        draw(st.sampled_from(("max", "min"))), draw(st.booleans()), draw(st.integers(0, 2 ** 31))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cases())
def test_small_shapes(dev, case):
    shape, axes, dtype, op, keep, seed = case
    rng = np.random.default_rng(seed)
    _check(dev, op, _data(rng, shape, dtype, extremes=True), axes, keep)


@pytest.mark.parametrize("shape,axis", [
    ((1,), None), ((37,), 0), ((5, 17), 1), ((5, 17), 0), ((3, 40, 5), 1), ((2, 3, 4), (0, 2)),
    ((4, 33, 17), (1, 2)), ((7, 300), 1), ((7, 301), -1), ((13, 29), None), ((2, 3, 5, 7), (1, 3)),
])
@pytest.mark.parametrize("dtype", DTYPES)
def test_layouts(dev, shape, axis, dtype):
    rng = np.random.default_rng(hash((shape, dtype)) % 2 ** 32)
    for op in ("max", "min"):
        _check(dev, op, _data(rng, shape, dtype), axis)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,axis", [((20011,), None), ((3, 5003), 1), ((2, 4099), None)])
def test_segment_path(dev, dtype, shape, axis):
    """Long rows take the clamped vec4 segment pass + lane rotate + second stage."""
    assert RD.choose_segments(int(np.prod(shape[:-1])) if axis is not None else 1, shape[-1] if axis is not None
                              else int(np.prod(shape)), dtype)
    rng = np.random.default_rng(1)
    x = _data(rng, shape, dtype)
    x.reshape(-1)[-1] = RD.INT_RANGE[dtype][1] if dtype != "float32" else 1e30   # the very last element
    _check(dev, "max", x, axis)
    x.reshape(-1)[0] = RD.INT_RANGE[dtype][0] if dtype != "float32" else -1e30   # the very first
    _check(dev, "min", x, axis)


@pytest.mark.parametrize("n", [5, 300, 20000])
def test_nan_propagates(dev, n):
    rng = np.random.default_rng(n)
    x = _data(rng, (3, n), "float32")
    x[1, n // 2] = np.nan
    x[2, -1] = np.nan
    for op in ("max", "min"):
        _check(dev, op, x, 1)
        _check(dev, op, x, None)


def test_inf_and_signed_zero(dev):
    x = np.array([[-0.0, 0.0, -0.0], [-np.inf, -np.inf, -np.inf], [np.inf, 1.0, -np.inf]], np.float32)
    for op in ("max", "min"):
        _check(dev, op, x, 1)


def test_registry_contract():
    spec = OpSpec("reduce_max", [((4, 5), "int16")], ((4,), "int16"), {"axis": (1,), "keepdims": False})
    assert RD.supports(spec) == (True, "")
    plan = RD.generate(spec)
    assert plan.buffer("data").role == "input" and plan.buffer("out").role == "output"
    assert RD.estimate(spec) > 0
    bad = OpSpec("reduce_max", [((4, 5), "float64")], ((4,), "float64"), {"axis": 1})
    ok, why = RD.supports(bad)
    assert not ok and "float64" in why
    assert not RD.supports(OpSpec("argmax", [((4, 5), "int32")], ((4,), "int64"), {"axis": 1}))[0]
    big = OpSpec("reduce_min", [((1 << 20,), "int32")], ((), "int32"), {"axis": None})
    assert RD.estimate(big) > (1 << 22) / 8.6 / 960e6


def test_bench_cases_are_valid():
    for name, spec, gen in RD.bench_cases():
        assert RD.supports(spec)[0], name
        x = gen(np.random.default_rng(0))["data"]
        assert x.shape == tuple(spec.inputs[0][0]) and str(x.dtype) == spec.inputs[0][1]
