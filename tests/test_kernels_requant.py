"""The GEMM / conv requantize epilogue (gemm.Requant) on the emulator against numpy written to the spec.

The spec is ONNX QuantizeLinear applied to the int32 accumulator times the float32 multiplier, as
ONNX Runtime's QLinearConv / QLinearMatMul compute it: ``y = float32(acc) * float32(scale)``,
``q = saturate(round_half_even(y) + zero_point)``, then the fused ReLU6 / Clip narrowing ``[lo, hi]``.
The accumulators here come from numpy int64 products, the rounding from ``np.rint`` (half to even)
in float64 on the float32 product, the saturation from ``np.clip``: none of it is the kernel's code.
"""
import numpy as np
import pytest

from tvm_qpu.codegen.kernels.conv import ConvShape, plan_conv
from tvm_qpu.codegen.kernels.gemm import GemmShape, Requant, plan_gemm, supports
from tvm_qpu.codegen.plan import run_plan
from tvm_qpu.codegen.registry import OpSpec

QRANGE = {"int8": (-128, 127), "uint8": (0, 255)}


def spec_requant(acc, scale, zp, lo, hi, dtype):
    """QuantizeLinear(acc * scale) to the spec: float32 product, round half to even, + zero point,
    saturate to [lo, hi] (the dtype's range narrowed by a fused clamp)."""
    y = np.asarray(acc).astype(np.float32) * np.asarray(scale, np.float32)
    q = np.rint(y.astype(np.float64)) + zp
    return np.clip(q, lo, hi).astype(dtype)


def _direct_conv(x, w, b, pad):
    n, c, h, wd = x.shape
    oc, _, kh, kw = w.shape
    xp = np.pad(x.astype(np.int64), ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    oh, ow = h + 2 * pad - kh + 1, wd + 2 * pad - kw + 1
    out = np.zeros((n, oc, oh, ow), np.int64)
    for i in range(kh):
        for j in range(kw):
            out += np.einsum("nchw,oc->nohw", xp[:, :, i:i + oh, j:j + ow], w[:, :, i, j].astype(np.int64))
    return out + (0 if b is None else b.astype(np.int64).reshape(1, -1, 1, 1))


# (M, N, K, scale axis, out dtype, zero point, clamp, a_stream, bias, scale range)
GEMM_CASES = {
    "per_tensor_int8": (5, 20, 30, None, "int8", 3, None, "unifa", True, (5e-4, 2e-3)),
    "per_column_uint8": (17, 33, 40, "n", "uint8", 128, None, "unifa", True, (5e-4, 2e-3)),
    "per_column_int8_tmu_stream": (7, 33, 40, "n", "int8", -7, None, "tmu", True, (5e-4, 2e-3)),
    "per_tensor_uint8_tmu_stream": (9, 18, 20, None, "uint8", 17, None, "tmu", False, (5e-4, 2e-3)),
    "relu6_clamp_many_tiles": (40, 70, 200, "n", "int8", -20, (-20, 30), "unifa", False, (1e-4, 4e-4)),
    # |acc * scale| up to ~1e12: ftoin saturates, the clamp runs before the zero point add (no wrap)
    "saturating_scales": (6, 20, 40, "n", "uint8", 200, None, "unifa", True, (1e5, 1e6)),
    # scale 0.5: every odd accumulator is a .5 tie (round half to even decides)
    "ties": (8, 16, 3, None, "int8", 0, None, "unifa", False, (0.5, 0.5)),
}


@pytest.mark.parametrize("case", list(GEMM_CASES))
def test_gemm_requantize_epilogue_matches_the_spec(dev, case):
    M, N, K, axis, dt, zp, clamp, stream, bias, (s0, s1) = GEMM_CASES[case]
    rng = np.random.default_rng(len(case))
    lo, hi = clamp or QRANGE[dt]
    sc = rng.uniform(s0, s1, N if axis else 1).astype(np.float32)
    rq = Requant(dt, axis, zp, lo, hi, None if axis else float(sc[0]))
    s = GemmShape(M, N, K, a_dtype="int8", b_dtype="int8", bias=bias, requant=rq, a_stream=stream)
    a = rng.integers(-128, 128, (M, K)).astype(np.int8)
    b = rng.integers(-128, 128, (K, N)).astype(np.int8)
    consts = {"B": b}
    acc = a.astype(np.int64) @ b.astype(np.int64)
    if bias:
        consts["bias"] = rng.integers(-3000, 3000, N).astype(np.int32)
        acc = acc + consts["bias"]
    if axis:
        consts["scale"] = sc
    plan = plan_gemm(s, consts)
    assert plan.buffer("C").dtype == dt
    out, _ = run_plan(plan, dev, A=a)
    want = spec_requant(acc, sc if axis else sc[0], zp, lo, hi, dt)
    np.testing.assert_array_equal(np.asarray(out).reshape(M, N), want)
    if case == "saturating_scales":
        assert {lo, hi} <= set(np.unique(want))
    if case == "ties":
        assert np.any(acc % 2 == 1)


# (N, C, H, W, OC, scale axis, out dtype, zero point, clamp, padding, a_stream)
CONV_CASES = {
    "per_channel_int8": (1, 3, 8, 8, 20, "m", "int8", -5, None, 1, None),
    "per_tensor_uint8_batch": (2, 8, 6, 6, 6, None, "uint8", 100, None, 0, None),
    "per_channel_uint8_relu_clamp_tmu": (1, 4, 5, 7, 5, "m", "uint8", 100, (100, 255), 1, "tmu"),
    "per_channel_int8_unifa_three_images": (3, 2, 6, 6, 33, "m", "int8", 0, (0, 90), 1, "unifa"),
}


@pytest.mark.parametrize("case", list(CONV_CASES))
def test_conv_requantize_epilogue_matches_the_spec(dev, case):
    N, C, H, W, OC, axis, dt, zp, clamp, pad, stream = CONV_CASES[case]
    rng = np.random.default_rng(len(case) + 1)
    lo, hi = clamp or QRANGE[dt]
    sc = rng.uniform(1e-3, 1e-2, OC if axis else 1).astype(np.float32)
    rq = Requant(dt, axis, zp, lo, hi, None if axis else float(sc[0]))
    s = ConvShape(N, C, H, W, OC, 3, 3, padding=(pad,) * 4, dtype="int8", w_dtype="int8", bias=True, requant=rq)
    x = rng.integers(-128, 128, (N, C, H, W)).astype(np.int8)
    w = rng.integers(-128, 128, (OC, C, 3, 3)).astype(np.int8)
    b = rng.integers(-5000, 5000, OC).astype(np.int32)
    plan = plan_conv(s, w, b, stream, sc if axis else None)
    out, _ = run_plan(plan, dev, data=x)
    want = spec_requant(_direct_conv(x, w, b, pad), sc.reshape(-1, 1, 1) if axis else sc[0], zp, lo, hi, dt)
    np.testing.assert_array_equal(np.asarray(out).reshape(want.shape), want)


def _spec(out_dt="int8", requant=None, a_dt="int8"):
    attrs = {"input_names": ["A", "B"], "transpose_b": False, "bias": False, "activation": None}
    if requant is not None:
        attrs["requant"] = requant
    return OpSpec("matmul", [((4, 8), a_dt), ((8, 5), a_dt)], ((4, 5), out_dt), attrs)


@pytest.mark.parametrize("requant,words", [
    (dict(scale=0.0, zero_point=0, lo=-128, hi=127), "finite and positive"),
    (dict(scale=float("nan"), zero_point=0, lo=-128, hi=127), "finite and positive"),
    (dict(scale=[0.1, 0.2], zero_point=0, lo=-128, hi=127), "2 values for 5"),
    (dict(scale=[0.1, 0.2, -0.1, 0.2, 0.2], zero_point=0, lo=-128, hi=127), "finite and positive"),
    (dict(scale=0.1, zero_point=0, lo=-129, hi=127), "outside int8"),
    (dict(scale=0.1, zero_point=0, lo=5, hi=4), "outside int8 or empty"),
])
def test_bad_requantize_parameters_are_refused_with_the_reason(requant, words):
    ok, reason = supports(_spec(requant=requant))
    assert not ok and words in reason, reason


def test_requantize_needs_an_integer_gemm_and_an_8_bit_output():
    ok, reason = supports(_spec(requant=dict(scale=0.1, zero_point=0, lo=-128, hi=127), a_dt="float32"))
    assert not ok and "float" in reason
    ok, reason = supports(_spec(out_dt="int16", requant=dict(scale=0.1, zero_point=0, lo=-128, hi=127)))
    assert not ok and "int8 or uint8" in reason
    assert supports(_spec(requant=dict(scale=0.1, zero_point=0, lo=-128, hi=127)))[0]
