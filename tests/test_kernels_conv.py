"""Convolution (implicit GEMM) on the emulator against a direct numpy convolution."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from tvm_qpu.codegen.kernels.conv import ConvShape, plan_conv, reference, supports
from tvm_qpu.codegen.plan import run_plan
from tvm_qpu.codegen.registry import OpSpec

FP32_RTOL = 2e-5


def _run(dev, s: ConvShape, seed=0, a_stream=None):
    rng = np.random.default_rng(seed)
    wshape = (s.OC, s.C // s.groups, s.KH, s.KW)
    if s.is_int:
        lo = 0 if s.dtype == "uint8" else -60
        x = rng.integers(lo, 60, (s.N, s.C, s.H, s.W)).astype(s.dtype)
        w = rng.integers(-60, 60, wshape).astype(s.w_dtype)
        bias = rng.integers(-500, 500, s.OC).astype(np.int32) if s.bias else None
    else:
        x = rng.standard_normal((s.N, s.C, s.H, s.W)).astype(np.float32)
        w = rng.standard_normal(wshape).astype(np.float32)
        bias = rng.standard_normal(s.OC).astype(np.float32) if s.bias else None
    out, _ = run_plan(plan_conv(s, w, bias, a_stream), dev, data=x)
    ref = reference(s, x, w, bias)
    if s.is_int:
        np.testing.assert_array_equal(out, ref)
    else:
        scale = reference(ConvShape(**{**s.__dict__, "bias": False, "activation": None}),
                          np.abs(x), np.abs(w)).astype(np.float64) + 1.0
        assert np.all(np.abs(out.astype(np.float64) - ref) <= FP32_RTOL * scale), np.abs(out - ref).max()


CASES = [
    ConvShape(1, 1, 8, 8, 8, 3, 3, padding=(1, 1, 1, 1), bias=True, activation="relu"),  # digits conv1
    ConvShape(1, 3, 9, 7, 5, 3, 3),
    ConvShape(2, 4, 10, 10, 20, 5, 5, strides=(2, 2), padding=(2, 1, 2, 1)),
    ConvShape(1, 8, 12, 12, 16, 1, 1),
    ConvShape(1, 8, 13, 11, 17, 1, 1, strides=(2, 3)),
    ConvShape(1, 5, 9, 9, 7, 3, 3, dilation=(2, 2), padding=(2, 2, 2, 2)),
    ConvShape(1, 1, 32, 32, 6, 5, 5, bias=True, activation="relu"),                     # LeNet conv1
    ConvShape(1, 6, 11, 11, 6, 3, 3, groups=6, padding=(1, 1, 1, 1), bias=True),         # depthwise
    ConvShape(2, 4, 7, 7, 4, 3, 3, groups=4, strides=(2, 2), padding=(1, 1, 1, 1)),      # depthwise, N=2
    ConvShape(1, 1, 1, 1, 1, 1, 1),
    ConvShape(1, 2, 5, 5, 3, 5, 5, padding=(0, 0, 0, 0)),                                # 1x1 output
    ConvShape(1, 4, 8, 8, 8, 3, 3, padding=(1, 1, 1, 1), dtype="int8", w_dtype="int8", bias=True),
    ConvShape(1, 3, 7, 9, 5, 3, 3, padding=(1, 0, 1, 2), dtype="uint8", w_dtype="int8", activation="relu"),
    ConvShape(1, 3, 6, 6, 4, 2, 2, strides=(2, 2), dtype="int16", w_dtype="int16",
              activation=("clip", -1000, 1000)),
]


@pytest.mark.parametrize("s", CASES, ids=lambda s: f"{s.N}x{s.C}x{s.H}x{s.W}-oc{s.OC}-k{s.KH}x{s.KW}-g{s.groups}-{s.dtype}")
def test_conv_cases(dev, s):
    _run(dev, s)


@settings(max_examples=20, deadline=None)
@given(C=st.integers(1, 6), H=st.integers(3, 12), W=st.integers(3, 12), OC=st.integers(1, 20),
       k=st.sampled_from([(1, 1), (3, 3), (2, 3), (5, 5)]), stride=st.integers(1, 2),
       pad=st.integers(0, 2), dtype=st.sampled_from(["float32", "int8", "int16"]),
       bias=st.booleans(), seed=st.integers(0, 50))
def test_conv_random(dev, C, H, W, OC, k, stride, pad, dtype, bias, seed):
    s = ConvShape(1, C, H, W, OC, k[0], k[1], (stride, stride), (pad, pad, pad, pad),
                  dtype=dtype, w_dtype=dtype, bias=bias)
    if s.OH < 1 or s.OW < 1:
        return
    _run(dev, s, seed)


def test_nchw_only_and_groups_refused():
    base = dict(inputs=[((1, 4, 8, 8), "float32"), ((4, 1, 3, 3), "float32")], output=((1, 4, 6, 6), "float32"))
    ok, why = supports(OpSpec("conv2d", attrs={"groups": 2}, **base))
    assert not ok and "groups" in why
    ok, why = supports(OpSpec("conv2d", attrs={"layout": "NHWC"}, **base))
    assert not ok and "NCHW" in why
    ok, why = supports(OpSpec("conv2d", [((1, 4, 20, 20), "float32"), ((4, 4, 7, 7), "float32")],
                              ((1, 4, 14, 14), "float32")))
    assert not ok and "registers" in why


# ---- independent reference: TVM's llvm build of the same Relax conv2d (tests/reference.py) ----
@pytest.mark.parametrize("s", [
    ConvShape(1, 3, 7, 9, 5, 3, 3, padding=(1, 0, 1, 2), dtype="int8", w_dtype="int8", bias=True, activation="relu"),
    ConvShape(2, 4, 7, 7, 4, 3, 3, groups=4, strides=(2, 2), padding=(1, 1, 1, 1), bias=True),
    ConvShape(1, 5, 9, 9, 7, 3, 3, dilation=(2, 2), padding=(2, 2, 2, 2), activation=("clip", -1.0, 1.5)),
], ids=["int8_pad_bias_relu", "fp32_depthwise_s2", "fp32_dilated_clip"])
def test_matches_tvm_llvm(dev, s):
    """The QPU convolution equals TVM's llvm conv2d (integer operands cast to int32)."""
    from reference import tvm_llvm
    rng = np.random.default_rng(43)
    wshape = (s.OC, s.C // s.groups, s.KH, s.KW)
    if s.is_int:
        x = rng.integers(-128, 128, (s.N, s.C, s.H, s.W)).astype(s.dtype)
        w = rng.integers(-128, 128, wshape).astype(s.w_dtype)
        bias = rng.integers(-5000, 5000, s.OC).astype(np.int32) if s.bias else None
    else:
        x = rng.standard_normal((s.N, s.C, s.H, s.W)).astype(np.float32)
        w = rng.standard_normal(wshape).astype(np.float32)
        bias = rng.standard_normal(s.OC).astype(np.float32) if s.bias else None
    out, _ = run_plan(plan_conv(s, w, bias), dev, data=x)
    ref = tvm_llvm("conv2d", x, w, bias, strides=s.strides, padding=s.padding, dilation=s.dilation, groups=s.groups,
                   activation=s.activation)
    if s.is_int:
        np.testing.assert_array_equal(out, ref)
    else:
        np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


#: the cases the "tmu" A-stream variant takes (a 5x5 block of 25 k-steps needs more registers
#: than the variant's register rings leave)
TMU_CASES = [s for s in CASES if s.KH * s.KW != 25]


@pytest.mark.parametrize("s", TMU_CASES, ids=lambda s: f"{s.N}x{s.C}x{s.H}x{s.W}-oc{s.OC}-k{s.KH}x{s.KW}-g{s.groups}-{s.dtype}")
def test_conv_tmu_variant(dev, s):
    """The weights (the GEMM's A panel) read through the TMU and broadcast with shuffle."""
    _run(dev, s, a_stream="tmu")


def test_conv_tmu_variant_refuses_too_large_blocks_clearly():
    s = ConvShape(1, 2, 5, 5, 3, 5, 5)
    with pytest.raises(ValueError, match="registers"):
        plan_conv(s, np.zeros((3, 2, 5, 5), np.float32), None, "tmu")


# ---- launches over the dispatch budget ---------------------------------------------------------
@pytest.mark.parametrize("s,cut", [
    (ConvShape(3, 4, 10, 10, 40, 3, 3, padding=(1, 1, 1, 1), bias=True, activation="relu"), "rows"),
    (ConvShape(3, 8, 16, 16, 16, 3, 3, dtype="int8", w_dtype="int8"), "images"),
], ids=["fp32-rows", "int8-images"])
def test_long_conv_splits_into_launches_within_the_dispatch_budget(dev, s, cut):
    """A convolution modelled over the dispatch budget (the v3d hang check) becomes several GEMM
    launches over image groups ("images": the budget fits one image) or, when one image is over
    it too, over output-channel blocks of each image ("rows": the budget fits one row tile of one
    image); each is modelled within the budget, the emulator's time of each agrees with its
    modelled figure (the estimate tolerance), and the result is the direct convolution's. The
    budget is forced small so that a small convolution must split."""
    from dataclasses import replace as _replace
    from tvm_qpu.codegen.kernels import conv as CV
    from tvm_qpu.codegen.kernels.common import seconds, timing_model
    from tvm_qpu.codegen.kernels.gemm import _row_block, choose_tiling, gemm_launch_cycles
    m = timing_model(None)
    lay = CV.conv_layout(s)
    g = CV.choose_variant(s, lay)
    t = choose_tiling(g)
    one = _replace(g, batch=1)
    if cut == "rows":
        assert t.MT >= 2
        budget = 1.01 * max(seconds(m, gemm_launch_cycles(*_row_block(one, t, mt, mt + 1), m)) for mt in range(t.MT))
    else:
        budget = 1.01 * seconds(m, gemm_launch_cycles(one, t, m))
    assert seconds(m, gemm_launch_cycles(g, t, m)) > budget                  # the whole launch is over it
    parts = CV.split_launches(s, lay, g, t, budget_seconds=budget)
    if cut == "rows":
        assert len(parts) > s.N and all(p.shape.batch == 1 for p in parts)
        assert sum(p.tiling.MT for p in parts) == s.N * t.MT
    else:
        assert len(parts) >= 2 and sum(p.shape.batch for p in parts) == s.N and all(p.tiling.MT == t.MT for p in parts)
    rng = np.random.default_rng(5)
    wshape = (s.OC, s.C, s.KH, s.KW)
    if s.is_int:
        x = rng.integers(-60, 60, (s.N, s.C, s.H, s.W)).astype(s.dtype)
        w = rng.integers(-60, 60, wshape).astype(s.w_dtype)
        bias = None
    else:
        x = rng.standard_normal((s.N, s.C, s.H, s.W)).astype(np.float32)
        w = rng.standard_normal(wshape).astype(np.float32)
        bias = rng.standard_normal(s.OC).astype(np.float32)
    plan = plan_conv(s, w, bias, budget_seconds=budget)
    gemm_idx = [i for i, L in enumerate(plan.launches) if L.name.startswith("conv_part")]
    assert len(gemm_idx) == len(parts)
    assert len(plan.attrs["launch_seconds"]) == len(plan.launches)          # what the v3d device checks
    assert all(plan.attrs["launch_seconds"][i] <= budget for i in gemm_idx)
    out, stats = run_plan(plan, dev, data=x)
    for i in gemm_idx:
        assert stats[i].seconds == pytest.approx(plan.attrs["launch_seconds"][i], rel=0.25)
    ref = reference(s, x, w, bias)
    if s.is_int:
        np.testing.assert_array_equal(out, ref)
    else:
        np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)
    assert [L.name for L in plan_conv(s, w, bias).launches][-1] == "conv"    # default budget: one launch


def test_long_padding_copy_splits_into_launches_within_the_dispatch_budget(dev):
    """The padding copy modelled over the dispatch budget runs as launches over runs of images
    (conv.split_pad), each modelled within the budget and emulated at most the estimate
    tolerance above it; the convolution reading the padded copy matches the direct convolution. The budget
    is forced just above one image's copy (and one image's GEMM)."""
    from dataclasses import replace as _replace
    from tvm_qpu.codegen.kernels import conv as CV
    from tvm_qpu.codegen.kernels.common import seconds, timing_model
    from tvm_qpu.codegen.kernels.gemm import choose_tiling, gemm_launch_cycles
    s = ConvShape(5, 6, 20, 20, 8, 3, 3, padding=(1, 1, 1, 1), bias=True)
    m = timing_model(None)
    lay = CV.conv_layout(s)
    assert lay.copy
    g = CV.choose_variant(s, lay)
    t = choose_tiling(g)
    budget = 1.01 * max(seconds(m, CV.pad_launch_cycles(_replace(s, N=1), m)),
                        seconds(m, gemm_launch_cycles(_replace(g, batch=1), t, m)))
    assert seconds(m, CV.pad_launch_cycles(s, m)) > 2 * budget
    pads = CV.split_pad(s, budget_seconds=budget)
    assert len(pads) >= 3 and sum(nb for _, nb in pads) == s.N and pads[0][0] == 0
    rng = np.random.default_rng(8)
    x = rng.standard_normal((s.N, s.C, s.H, s.W)).astype(np.float32)
    w = rng.standard_normal((s.OC, s.C, s.KH, s.KW)).astype(np.float32)
    bias = rng.standard_normal(s.OC).astype(np.float32)
    plan = plan_conv(s, w, bias, budget_seconds=budget)
    idx = [i for i, L in enumerate(plan.launches) if L.name.startswith("conv_pad")]
    assert len(idx) == len(pads)
    ls = plan.attrs["launch_seconds"]
    assert len(ls) == len(plan.launches) and max(ls) <= budget
    out, stats = run_plan(plan, dev, data=x)
    for i in idx:          # the copy's model is pessimistic at this size (about 1.4x): the safe side
        assert stats[i].seconds <= 1.25 * ls[i]
    np.testing.assert_allclose(out, reference(s, x, w, bias), rtol=1e-4, atol=1e-4)
