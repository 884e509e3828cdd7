"""Layer norm kernel on the emulator against numpy written to its spec (float64, biased variance)
and against TVM's llvm build of ``R.nn.layer_norm``.

Tolerance: |y - ref| <= 1e-5 |ref| + 4e-6 (1 + |mean| / std) max|gamma| per row. The kernel sums
in float32 (per lane, then a 16-lane butterfly: relative error ~ N / 16 ULP of the sum), so the
mean is off by a few ULP of max|x|, which shifts every x - mean by that much: relative to the
row's std that is the (1 + |mean| / std) factor; rsqrt is the SFU's (2 ULP on the hardware) plus
one Newton step (~1 ULP); the output's 3 roundings add a few ULP of |ref|.
"""
import numpy as np
import pytest

from tvm_qpu.codegen import registry
from tvm_qpu.codegen.kernels.layernorm import LnShape, plan_layer_norm, reference
from tvm_qpu.codegen.plan import run_plan
from tvm_qpu.codegen.registry import OpSpec


def run(dev, x, g, b, eps=1e-5):
    rows = int(np.prod(x.shape[:-1])) if x.ndim > 1 else 1
    y, _ = run_plan(plan_layer_norm(LnShape(rows, x.shape[-1], eps), x.shape), dev, x=x, gamma=g, beta=b)
    return y


def check(y, ref, x, g):
    assert np.array_equal(np.isnan(y), np.isnan(ref))
    ok = ~np.isnan(ref)
    x64 = x.astype(np.float64)
    mu, sd = x64.mean(-1, keepdims=True), x64.std(-1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        cond = np.where(sd > 0, 1 + np.abs(mu) / sd, 1.0)
    tol = 1e-5 * np.abs(ref) + 4e-6 * cond * np.abs(g).max()
    err = np.abs(y.astype(np.float64) - ref)
    assert np.all(err[ok] <= np.broadcast_to(tol, ref.shape)[ok]), float((err[ok] / np.broadcast_to(tol, ref.shape)[ok]).max())


def data(rows, n, seed, scale=3.0, offset=1.0):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((rows, n)) * scale + offset).astype(np.float32)
    return x, rng.standard_normal(n).astype(np.float32), rng.standard_normal(n).astype(np.float32)


# 1 element; partial blocks; fewer blocks than the 8 in flight; all blocks resident (RESIDENT =
# 20 blocks = 320 elements), one streamed block after them (partial or not); a steady-state loop
# with and without a remainder; more rows than workers
@pytest.mark.parametrize("rows,n", [(1, 1), (3, 17), (16, 32), (5, 100), (13, 200), (2, 320), (3, 321),
                                    (2, 336), (2, 768), (3, 1001)])
def test_random(dev, rows, n):
    x, g, b = data(rows, n, rows * 1000 + n)
    check(run(dev, x, g, b), reference(x, g, b), x, g)


def test_offset_rows_and_epsilon(dev):
    x, g, b = data(6, 300, 1, scale=0.01, offset=50.0)
    for eps in (1e-5, 1e-12, 0.5):
        check(run(dev, x, g, b, eps), reference(x, g, b, eps), x, g)


def test_special_values(dev):
    x, g, b = data(5, 40, 2)
    x[0, 3] = np.nan                                    # NaN -> the row is NaN
    x[1, 7] = np.inf                                    # inf -> inf - inf: NaN row
    x[2, :] = 7.0                                       # constant row -> beta
    y = run(dev, x, g, b)
    assert np.isnan(y[:2]).all()
    np.testing.assert_array_equal(y[2], b)
    ref = reference(x, g, b)
    check(y[2:], ref[2:], x[2:], g)


def test_tolerance_is_not_vacuous(dev):
    x, g, b = data(4, 64, 3)
    ref = reference(x, g, b)
    with pytest.raises(AssertionError):
        check(run(dev, x, g, b, 1e-2), ref, x, g)      # a wrong epsilon is seen
    with pytest.raises(AssertionError):
        check((ref + 1e-4).astype(np.float32), ref, x, g)


@pytest.mark.parametrize("shape", [(1, 16, 32), (4, 97)])
def test_matches_tvm_llvm(dev, shape):
    from reference import tvm_llvm
    rng = np.random.default_rng(7)
    x = (rng.standard_normal(shape) * 2 + 0.5).astype(np.float32)
    g, b = rng.standard_normal(shape[-1]).astype(np.float32), rng.standard_normal(shape[-1]).astype(np.float32)
    want = tvm_llvm("layer_norm", x, g, b, epsilon=1e-5)
    check(run(dev, x, g, b), want.astype(np.float64), x, g)


def _spec(shape, dt="float32", gshape=None, axes=(-1,), eps=1e-5):
    n = shape[-1] if shape else 1
    gs = gshape or (n,)
    return OpSpec("layer_norm", [(shape, dt), (gs, "float32"), (gs, "float32")], (shape, dt),
                  {"axes": axes, "epsilon": eps})


@pytest.mark.parametrize("spec,why", [
    (_spec((4, 8), "float16"), "float32 only"),
    (_spec((4, 8), axes=(0,)), "last axis"),
    (_spec((4, 8), axes=(-2, -1)), "last axis"),
    (_spec((4, 8), gshape=(4, 8)), "are not [8]"),
    (_spec((4, 8), eps=0.0), "epsilon"),
    (_spec((1 << 20, 8)), "24-bit"),
])
def test_refusals_say_why(spec, why):
    ok, reason = registry.supports(spec)
    assert not ok and why in reason
