"""The direct depthwise kernel's integer form with the requantize epilogue
(codegen/kernels/depthwise.py), and QDQ depthwise convolutions fused into it (tvm_qpu/quant.py's
rewrite_requant + the conv2d registry entry).

Expected values: a numpy depthwise convolution written out here (int64, ONNX Conv semantics with
``group == C``: each output channel convolves its own input channel, padding reads the zero point,
i.e. 0 in ``x - zx``), then ONNX QuantizeLinear of ``acc * m`` as QLinearConv computes it (ORT's
MLAS requantize: float32 product, round half to even, + zero point, saturate), and ONNX Runtime on
ORT-quantized models."""
import re

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import tvm_qpu
from tvm_qpu.codegen.kernels import depthwise as DW
from tvm_qpu.codegen.kernels.gemm import Requant

ort = pytest.importorskip("onnxruntime")


def dw_int_ref(x, w, bias, strides, pads, dil):
    """int64 depthwise convolution from the definition (pads: top, left, bottom, right)."""
    N, C, H, W = x.shape
    _, _, KH, KW = w.shape
    pt, pl, pb, pr = pads
    xp = np.pad(x.astype(np.int64), ((0, 0), (0, 0), (pt, pb), (pl, pr)))
    OH = (H + pt + pb - dil[0] * (KH - 1) - 1) // strides[0] + 1
    OW = (W + pl + pr - dil[1] * (KW - 1) - 1) // strides[1] + 1
    out = np.zeros((N, C, OH, OW), np.int64)
    for c in range(C):
        for oh in range(OH):
            for ow in range(OW):
                for i in range(KH):
                    for j in range(KW):
                        out[:, c, oh, ow] += xp[:, c, oh * strides[0] + i * dil[0], ow * strides[1] + j * dil[1]] \
                            * int(w[c, 0, i, j])
    if bias is not None:
        out += bias.astype(np.int64).reshape(1, C, 1, 1)
    return out


def quantize_linear(acc, m, zp, lo, hi):
    """ONNX QuantizeLinear of ``acc * m`` with QLinearConv's float32 requantize (MLAS): float32
    product, round half to even, + zero point, saturated to [lo, hi]."""
    y = acc.astype(np.float32) * np.asarray(m, np.float32)
    return np.clip(np.rint(y).astype(np.int64) + zp, lo, hi)


CASES = [  # N, C, H, W, KH, KW, strides, pads, dilation, bias, dtype, out, zp, lo, hi, per_channel, act
    (1, 8, 10, 10, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), True, "int8", "int8", -5, -128, 127, True, None),
    (2, 5, 9, 7, 3, 3, (2, 2), (1, 1, 1, 1), (1, 1), True, "int16", "uint8", 7, 7, 200, False, None),  # ReLU6-like clamp
    (1, 20, 6, 6, 3, 3, (1, 1), (0, 0, 0, 0), (1, 1), False, "uint8", "int8", 0, 0, 127, True, "relu"),
    (1, 3, 11, 19, 2, 3, (1, 2), (0, 2, 1, 0), (2, 1), True, "int8", "uint8", 128, 0, 255, True, ("clip", -5000.0, 20000.0)),
]


@pytest.mark.parametrize("case", CASES)
def test_integer_depthwise_kernel_requantizes_like_quantize_linear(dev, case):
    from tvm_qpu.codegen.plan import run_plan
    N, C, H, W, KH, KW, st, pads, dil, bias, dt, out, zp, lo, hi, per_ch, act = case
    rng = np.random.default_rng(21)
    info = np.iinfo(dt)
    x = rng.integers(max(info.min, -300), min(info.max, 300) + 1, (N, C, H, W)).astype(dt)
    w = rng.integers(-128, 128, (C, 1, KH, KW)).astype(np.int8)
    b = rng.integers(-5000, 5000, C).astype(np.int32) if bias else None
    acc = dw_int_ref(x, w, b, st, pads, dil)
    # multipliers that spread each channel's accumulators over about +-100 output steps
    m = (rng.uniform(0.5, 2.0, C) * 50 / (acc.std(axis=(0, 2, 3)) + 1)).astype(np.float32)
    rq = Requant(out, "m" if per_ch else None, zp, lo, hi, None if per_ch else float(m[0]))
    s = DW.DwShape(N, C, H, W, KH, KW, *st, *pads, *dil, bias, act, dtype=dt, requant=rq)
    got, _ = run_plan(DW.plan_depthwise(s, w, b, scale=m if per_ch else None), dev, data=x)
    if act == "relu":
        acc = np.maximum(acc, 0)
    elif act is not None:
        acc = np.clip(acc, act[1], act[2]).astype(np.int64)
    mm = (m if per_ch else np.full(C, m[0], np.float32)).reshape(1, C, 1, 1)
    want = quantize_linear(acc, mm, zp, lo, hi)
    assert got.dtype == np.dtype(out) and got.shape == want.shape
    np.testing.assert_array_equal(got.astype(np.int64), want)
    assert len(np.unique(want)) > 20 and ((want == lo).any() or (want == hi).any())   # spread, clamped


def test_integer_depthwise_programs_have_no_hazards_and_bad_shapes_are_refused():
    from tvm_qpu.codegen.hazards import check_program
    for case in CASES:
        N, C, H, W, KH, KW, st, pads, dil, bias, dt, out, zp, lo, hi, per_ch, act = case
        rq = Requant(out, "m" if per_ch else None, zp, lo, hi, None if per_ch else 0.01)
        words, _ = DW.kernel_program(DW.DwShape(N, C, H, W, KH, KW, *st, *pads, *dil, bias, act, dtype=dt, requant=rq))
        assert check_program(words) == [], case
    with pytest.raises(ValueError, match="float depthwise"):
        DW.check(DW.DwShape(1, 4, 8, 8, 3, 3, requant=Requant("int8", None, 0, -128, 127, 0.1)))
    with pytest.raises(ValueError, match="data dtype"):
        DW.check(DW.DwShape(1, 4, 8, 8, 3, 3, dtype="int32"))
    s = DW.DwShape(1, 4, 8, 8, 3, 3, dtype="int8", requant=Requant("int8", "m", 0, -128, 127))
    with pytest.raises(ValueError, match="4 finite positive scales"):
        DW.plan_depthwise(s, np.ones((4, 1, 3, 3), np.int8), scale=np.array([0.1, 0.2, -0.1, 0.3], np.float32))


def _ort_session(path, optimized):
    so = ort.SessionOptions()
    so.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimized
                                   else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("act_type", ["QInt8", "QUInt8"])
def test_an_ort_quantized_mobilenet_block_runs_its_depthwise_conv_requantized_on_the_qpu(tmp_path, act_type):
    """Depthwise 3x3 (stride 2, bias, ReLU6) -> pointwise 1x1 (bias), quantized by ONNX Runtime's
    quantize_static (QDQ, per-channel int8 weights, calibrated on 8 random inputs): both convs are
    integer QPU regions writing 8-bit outputs (the depthwise one on the direct depthwise kernel with
    its requantize epilogue), the pointwise conv reads the depthwise conv's bytes, and the output is
    within one step of ORT's unoptimized run (the QDQ graph as written)."""
    q = pytest.importorskip("onnxruntime.quantization")
    rng = np.random.default_rng(5)
    C, O, H = 16, 24, 14
    w1 = (rng.standard_normal((C, 1, 3, 3)) / 3).astype(np.float32)
    b1 = rng.standard_normal(C).astype(np.float32) * 0.1
    w2 = (rng.standard_normal((O, C, 1, 1)) / 4).astype(np.float32)
    b2 = rng.standard_normal(O).astype(np.float32) * 0.1
    inits = [numpy_helper.from_array(a, n) for a, n in [(w1, "W1"), (b1, "B1"), (w2, "W2"), (b2, "B2"),
                                                       (np.array(0, np.float32), "lo"), (np.array(6, np.float32), "hi")]]
    nodes = [helper.make_node("Conv", ["x", "W1", "B1"], ["d"], pads=[1, 1, 1, 1], strides=[2, 2], group=C),
             helper.make_node("Clip", ["d", "lo", "hi"], ["d6"]),
             helper.make_node("Conv", ["d6", "W2", "B2"], ["y"])]
    g = helper.make_graph(nodes, "mb", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, C, H, H])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, O, H // 2, H // 2])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 8
    fpath, qpath = tmp_path / "mb.onnx", tmp_path / "mbq.onnx"
    onnx.save(m, fpath)
    data = iter([{"x": (2 * rng.standard_normal((1, C, H, H))).astype(np.float32)} for _ in range(8)])

    class Reader(q.CalibrationDataReader):
        def get_next(self):
            return next(data, None)

    q.quantize_static(str(fpath), str(qpath), Reader(), quant_format=q.QuantFormat.QDQ, per_channel=True,
                      activation_type=getattr(q.QuantType, act_type), weight_type=q.QuantType.QInt8)
    x = (2 * rng.standard_normal((1, C, H, H))).astype(np.float32)
    mod, params = tvm_qpu.from_onnx(qpath)
    lib = tvm_qpu.build(mod, target="qpu", params=params, placement="all")
    r = lib.runner("emulator")
    try:
        got = next(iter(r.run(x=x).values()))
    finally:
        r.close()
    convs = [reg for reg in lib.report.regions if reg["kind"] == "conv2d"]
    assert len(convs) == 2, lib.report.text()
    assert all("float32" not in reg["spec"] and re.search(r"-> u?int8\[", reg["spec"]) for reg in convs[:1]), \
        lib.report.text()                   # the depthwise conv: 8-bit in, requantized 8-bit out
    assert "float32" not in convs[1]["spec"], lib.report.text()     # the pointwise conv reads those bytes
    plans = [rg.plan.name for rg in lib.regions]
    assert "depthwise_conv2d" in plans, plans
    dw = next(rg for rg in lib.regions if rg.plan.name == "depthwise_conv2d")
    assert dw.plan.attrs["requant"] is not None and dw.plan.attrs["dtype"] in ("int8", "uint8", "int16")
    qm = onnx.load(qpath)
    out_dq = next(n for n in qm.graph.node if "y" in n.output)
    step = float(next(numpy_helper.to_array(i) for i in qm.graph.initializer if i.name == out_dq.input[1]))
    want = _ort_session(qpath, False).run(None, {"x": x})[0]
    d = np.abs(got.astype(np.float64) - want) / step
    assert d.max() <= 1 + 1e-3, d.max()
    assert (d < 1e-3).mean() >= 0.97, (d < 1e-3).mean()


@pytest.mark.parametrize("dt,C,H,stride,per_channel", [("int8", 32, 28, 2, True), ("int16", 8, 13, 1, False),
                                                        ("uint8", 64, 14, 1, True)])
def test_integer_depthwise_estimate_is_within_the_estimate_tolerance_of_the_emulator(dt, C, H, stride, per_channel):
    """conv2d's estimate (what placement uses) of a requantizing depthwise conv, on the depthwise
    kernel, within tests/test_estimates.py's +-25% of the emulator's modelled time for its plan."""
    from test_estimates import TOLERANCE
    from tvm_qpu.codegen import registry
    from tvm_qpu.codegen.plan import run_plan
    from tvm_qpu.codegen.registry import OpSpec
    from tvm_qpu.runtime.device import open_device
    rng = np.random.default_rng(8)
    oh = (H + 2 - 3) // stride + 1
    scale = list(rng.uniform(1e-3, 1e-2, C)) if per_channel else [0.004]
    spec = OpSpec("conv2d", [((1, C, H, H), dt), ((C, 1, 3, 3), "int8"), ((C,), "int32")], ((1, C, oh, oh), "int8"),
                  {"padding": (1, 1, 1, 1), "strides": (stride, stride), "groups": C, "bias": True,
                   "requant": {"scale": scale, "zero_point": -3, "lo": -128, "hi": 127}})
    ok, why = registry.supports(spec)
    assert ok and "depthwise kernel" in why, why
    consts = {"weight": rng.integers(-128, 128, (C, 1, 3, 3)).astype(np.int8),
              "bias": rng.integers(-999, 999, C).astype(np.int32)}
    plan = registry.generate(spec, consts)
    assert plan.name == "depthwise_conv2d"
    info = np.iinfo(dt)
    x = rng.integers(max(info.min, -200), min(info.max, 200), (1, C, H, H)).astype(dt)
    dev = open_device("emulator")
    try:
        _, stats = run_plan(plan, dev, data=x)
    finally:
        dev.close()
    got = sum(s.seconds for s in stats)
    est = registry.estimate(spec)
    assert abs(est / got - 1) <= TOLERANCE, (est, got)


def test_integer_depthwise_kernel_without_requantize_writes_the_exact_int32_accumulator(dev):
    """The kernel's int32-output form (used directly; conv2d routes int32-output depthwise convs to
    the implicit-GEMM conv): exact sums, ReLU on the accumulator."""
    from tvm_qpu.codegen.plan import run_plan
    rng = np.random.default_rng(22)
    x = rng.integers(-32768, 32768, (1, 6, 9, 11)).astype(np.int16)
    w = rng.integers(-128, 128, (6, 1, 3, 3)).astype(np.int8)
    b = rng.integers(-1 << 20, 1 << 20, 6).astype(np.int32)
    s = DW.DwShape(1, 6, 9, 11, 3, 3, 2, 1, 1, 1, 1, 1, bias=True, activation="relu", dtype="int16")
    got, _ = run_plan(DW.plan_depthwise(s, w, b), dev, data=x)
    want = np.maximum(dw_int_ref(x, w, b, (2, 1), (1, 1, 1, 1), (1, 1)), 0)
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, want)
