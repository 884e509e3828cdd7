"""Importers of quantized ONNX operators (tvm_qpu/onnx_quant.py): QOperator models (QLinearConv,
QLinearMatMul, com.microsoft QGemm / QLinearAdd / QLinearGlobalAveragePool / QLinearConcat) and
``quantize_dynamic`` models (ConvInteger).

Expected values come from ONNX Runtime on the same model, and for the integer ops also from a numpy
convolution written to the ONNX spec. QLinear ops: ORT's fused kernels requantize
``float32(acc) * (sx * sw / sy)``, ours ``float32(acc) * float32(sx * sw)`` then ``/ sy``: equal except
at rounding ties (one step; tvm_qpu/quant.py). Our integer accumulators are exact. ORT's x86 kernels
for uint8 activations x int8 weights (u8s8: QLinearConv, ConvInteger, MatMulInteger) add pairs of
products in int16 with saturation (VPMADDUBSW; ORT's quantization docs recommend ``reduce_range``,
7-bit weights, against it): measured here, full-range u8s8 QLinearConv outputs differ from the spec by
up to 17 steps under ORT 1.32 on x86. So every case is held to a numpy reference written to the spec,
and to ORT wherever ORT's kernel is exact (s8s8, u8u8, or u8s8 with 7-bit weights)."""
import re

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import tvm_qpu

from frontend_util import onnx_model_run

ort = pytest.importorskip("onnxruntime")

#: fraction of outputs that must equal ONNX Runtime exactly (the rest: one step, rounding ties)
MIN_EXACT = 0.97
MS = "com.microsoft"


def _init(name, arr):
    return numpy_helper.from_array(np.asarray(arr), name)


def _model(nodes, inputs, outputs, inits, opset=13, ms=False):
    g = helper.make_graph(nodes, "q", inputs, outputs, inits)
    ops = [helper.make_opsetid("", opset)] + ([helper.make_opsetid(MS, 1)] if ms else [])
    m = helper.make_model(g, opset_imports=ops)
    m.ir_version = 8
    onnx.checker.check_model(m)
    return m


def _save(model, tmp_path, name="m.onnx"):
    p = tmp_path / name
    onnx.save(model, p)
    return p


def _ort(path, feeds):
    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return s.run(None, feeds)[0]


_tvm = onnx_model_run      # (first output, library); target "qpu", placement "all" by default


def _steps_from_ort(got, want, step):
    """(largest difference in output steps, fraction identical)."""
    d = np.abs(got.astype(np.float64) - want.astype(np.float64)) / step
    return float(d.max()), float((d < 1e-3).mean())


def _assert_within_one_step(got, want, step=1.0):
    worst, same = _steps_from_ort(got, want, step)
    assert worst <= 1 + 1e-3, f"differs from ONNX Runtime by {worst:.3f} steps"
    assert same >= MIN_EXACT, f"only {same:.3f} of the outputs equal ONNX Runtime's"


def _int_regions(lib):
    """Offloaded conv / matmul regions, each checked to be integer in and integer out (int32
    accumulators, or int8 / uint8 when the requantize runs in the kernel's epilogue)."""
    regs = [r for r in lib.report.regions if r["kind"] in ("conv2d", "matmul")]
    for r in regs:
        assert "float32" not in r["spec"] and re.search(r"-> u?int(8|32)\[", r["spec"]), r["spec"]
    return regs


def conv_ref(x, w, pads=(0, 0, 0, 0), strides=(1, 1), group=1):
    """NCHW / OIHW integer convolution written out (int64), ONNX Conv semantics (pads: top, left,
    bottom, right)."""
    x = np.pad(x.astype(np.int64), ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])))
    n, c, h, wd = x.shape
    m, cg, kh, kw = w.shape
    oh, ow = (h - kh) // strides[0] + 1, (wd - kw) // strides[1] + 1
    out = np.zeros((n, m, oh, ow), np.int64)
    mg = m // group
    for o in range(m):
        g = o // mg
        for i in range(oh):
            for j in range(ow):
                patch = x[:, g * cg:(g + 1) * cg, i * strides[0]:i * strides[0] + kh, j * strides[1]:j * strides[1] + kw]
                out[:, o, i, j] = (patch * w[o].astype(np.int64)).sum(axis=(1, 2, 3))
    return out


# ---------------------------------------------------------------------------------------------
# QLinearConv / QLinearMatMul made with onnx.helper

def _qlinear_conv_model(rng, *, x_dtype=np.uint8, zx=128, w_dtype=np.int8, zw=0, per_channel=True,
                        w_scale=None, y_dtype=np.uint8, zy=100, bias=True, oc=6, c=5, group=1, strides=(1, 1),
                        w_bits=8):
    tp = {np.int8: TensorProto.INT8, np.uint8: TensorProto.UINT8}
    info = np.iinfo(w_dtype)
    lo, hi = (int(info.min), int(info.max)) if w_bits == 8 else (-(1 << (w_bits - 1)), (1 << (w_bits - 1)) - 1)
    w = rng.integers(lo, hi + 1, size=(oc, c // group, 3, 3)).astype(w_dtype)
    sw = (rng.uniform(0.002, 0.01, oc) if per_channel else np.array(0.005)).astype(np.float32)
    if w_scale is not None:
        sw = np.asarray(w_scale, np.float32)
    zwa = np.full(sw.shape, zw, w_dtype)
    sx, sy = np.float32(0.02), np.float32(0.25)
    inits = [_init("sx", sx), _init("zx", np.array(zx, x_dtype)), _init("w", w), _init("sw", sw), _init("zw", zwa),
             _init("sy", sy), _init("zy", np.array(zy, y_dtype))]
    ins = ["x", "sx", "zx", "w", "sw", "zw", "sy", "zy"]
    if bias:
        inits.append(_init("b", rng.integers(-3000, 3000, size=oc).astype(np.int32)))
        ins.append("b")
    node = helper.make_node("QLinearConv", ins, ["y"], pads=[1, 1, 1, 1], group=group, strides=list(strides))
    h = 7
    oh = (h + 2 - 3) // strides[0] + 1
    m = _model([node], [helper.make_tensor_value_info("x", tp[x_dtype], [1, c, h, h])],
               [helper.make_tensor_value_info("y", tp[y_dtype], [1, oc, oh, oh])], inits)
    xi = np.iinfo(x_dtype)
    x = rng.integers(xi.min, xi.max + 1, size=(1, c, h, h)).astype(x_dtype)
    return m, {"x": x}


def qlinear_conv_ref(model, x):
    """ONNX QLinearConv written out: ``acc = conv(x - zx, w - zw) + bias`` (int64), then
    ``saturate(round_half_even(float32(acc) * float32(sx * sw / sy)) + zy)`` (the spec's formula, with
    ONNX Runtime's float32 multiplier)."""
    i = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    at = {a.name: helper.get_attribute_value(a) for a in model.graph.node[0].attribute}
    xs = x.astype(np.int64) - int(i["zx"].reshape(()))
    w = i["w"].astype(np.int64) - i["zw"].astype(np.int64).reshape(-1, 1, 1, 1)
    acc = conv_ref(xs, w, pads=at["pads"], strides=at["strides"], group=at["group"])
    if "b" in i:
        acc = acc + i["b"].astype(np.int64).reshape(1, -1, 1, 1)
    mult = (np.float32(i["sx"]) * i["sw"].astype(np.float32) / np.float32(i["sy"])).astype(np.float32)
    y = np.rint(acc.astype(np.float32) * mult.reshape(-1, 1, 1)) + int(i["zy"].reshape(()))
    info = np.iinfo(i["zy"].dtype)
    return np.clip(y, info.min, info.max).astype(i["zy"].dtype)


QLINEAR_CONV = {
    # case: (model kwargs, ORT's kernel is exact for it)
    "uint8_act_7bit_int8_weights_per_channel": (dict(w_bits=7), True),
    "uint8_act_full_range_int8_weights": (dict(), False),
    "int8_act_per_tensor_no_bias": (dict(x_dtype=np.int8, zx=-5, per_channel=False, bias=False, y_dtype=np.int8,
                                         zy=3), True),
    "uint8_weights_asymmetric_zero_point": (dict(w_dtype=np.uint8, zw=131), True),
    "int8_weights_nonzero_zero_point_strided": (dict(x_dtype=np.int8, zx=9, zw=-7, strides=(2, 2), y_dtype=np.int8, zy=-4), True),
    "depthwise": (dict(oc=6, c=6, group=6, w_bits=7), True),
}


@pytest.mark.parametrize("case", list(QLINEAR_CONV))
def test_qlinear_conv_imports_as_an_integer_region_exact_to_the_spec(case, tmp_path):
    kw, ort_exact = QLINEAR_CONV[case]
    rng = np.random.default_rng(len(case))
    model, feeds = _qlinear_conv_model(rng, **kw)
    path = _save(model, tmp_path)
    got, lib = _tvm(path, feeds)
    assert len(_int_regions(lib)) == 1, lib.report.text()
    assert lib.report.qdq and all(d["accepted"] for d in lib.report.qdq), lib.report.text()
    ref = qlinear_conv_ref(model, feeds["x"])
    assert got.dtype == ref.dtype
    _assert_within_one_step(got, ref)
    if ort_exact:
        _assert_within_one_step(got, _ort(path, feeds))
    cpu, cpu_lib = _tvm(path, feeds, target="llvm", placement="none")
    assert not cpu_lib.report.regions
    np.testing.assert_array_equal(got, cpu)


def test_qlinear_matmul_per_column_uint8_weights_is_exact_to_the_spec_and_matches_ort(tmp_path):
    rng = np.random.default_rng(11)
    k, n = 24, 9
    b = rng.integers(0, 256, size=(k, n)).astype(np.uint8)
    sa, sb, sy = np.float32(0.03), rng.uniform(0.001, 0.004, n).astype(np.float32), np.float32(0.2)
    za, zb, zy = np.array(3, np.uint8), np.full(n, 128, np.uint8), np.array(7, np.uint8)
    inits = [_init("sa", sa), _init("za", za), _init("b", b), _init("sb", sb), _init("zb", zb), _init("sy", sy),
             _init("zy", zy)]
    node = helper.make_node("QLinearMatMul", ["a", "sa", "za", "b", "sb", "zb", "sy", "zy"], ["y"])
    m = _model([node], [helper.make_tensor_value_info("a", TensorProto.UINT8, [5, k])],
               [helper.make_tensor_value_info("y", TensorProto.UINT8, [5, n])], inits)
    path = _save(m, tmp_path)
    a = rng.integers(0, 256, size=(5, k)).astype(np.uint8)
    acc = (a.astype(np.int64) - int(za)) @ (b.astype(np.int64) - zb.astype(np.int64))
    ref = np.clip(np.rint(acc.astype(np.float32) * (sa * sb / sy).astype(np.float32)) + int(zy), 0, 255)
    got, lib = _tvm(path, {"a": a})
    regs = _int_regions(lib)
    assert len(regs) == 1 and regs[0]["spec"].startswith("matmul(int16[5, 24], int8[24, 9]"), lib.report.text()
    _assert_within_one_step(got, ref)
    _assert_within_one_step(got, _ort(path, {"a": a}))


def test_qlinear_matmul_of_two_activations_stays_float_and_matches_ort(tmp_path):
    """Both operands computed at run time (attention's Q K^T): no constant weight, the DQ -> MatMul -> Q
    chain is left as it is and runs the spec's float formula."""
    rng = np.random.default_rng(12)
    inits = [_init("sa", np.float32(0.05)), _init("za", np.array(0, np.int8)), _init("sb", np.float32(0.04)),
             _init("zb", np.array(0, np.int8)), _init("sy", np.float32(1.0)), _init("zy", np.array(0, np.int8))]
    node = helper.make_node("QLinearMatMul", ["a", "sa", "za", "b", "sb", "zb", "sy", "zy"], ["y"])
    m = _model([node], [helper.make_tensor_value_info("a", TensorProto.INT8, [4, 8]),
                        helper.make_tensor_value_info("b", TensorProto.INT8, [8, 3])],
               [helper.make_tensor_value_info("y", TensorProto.INT8, [4, 3])], inits)
    path = _save(m, tmp_path)
    feeds = {"a": rng.integers(-128, 128, (4, 8)).astype(np.int8), "b": rng.integers(-128, 128, (8, 3)).astype(np.int8)}
    got, _ = _tvm(path, feeds, target="llvm", placement="none")
    _assert_within_one_step(got, _ort(path, feeds))


def test_one_element_scale_vectors_are_per_tensor_and_still_integer(tmp_path):
    """x / w / y scales and zero points given as 1-element vectors (some exporters write them so) mean
    per-tensor: the conv is still an integer region, exact to the spec."""
    rng = np.random.default_rng(8)
    model, feeds = _qlinear_conv_model(rng, per_channel=False, w_bits=7)
    for name in ("sx", "zx", "sw", "zw", "sy", "zy"):
        arr = next(numpy_helper.to_array(t) for t in model.graph.initializer if t.name == name)
        _replace_init(model, name, arr.reshape(1))
    path = _save(model, tmp_path)
    got, lib = _tvm(path, feeds)
    assert len(_int_regions(lib)) == 1 and all(d["accepted"] for d in lib.report.qdq), lib.report.text()
    _assert_within_one_step(got, qlinear_conv_ref(model, feeds["x"]))
    _assert_within_one_step(got, _ort(path, feeds))


def test_qgemm_with_alpha_and_float_output_matches_ort(tmp_path):
    """com.microsoft QGemm without y_scale gives float32 ``alpha * A'B' + C`` (C int32 of scale
    alpha * a_scale * b_scale): computed in float on the CPU, within float rounding of ORT."""
    rng = np.random.default_rng(9)
    b = rng.integers(-64, 64, size=(7, 12)).astype(np.int8)                 # transB: [N, K]
    inits = [_init("sa", np.float32(0.04)), _init("za", np.array(120, np.uint8)), _init("b", b),
             _init("sb", np.float32(0.01)), _init("zb", np.array(0, np.int8)),
             _init("c", rng.integers(-500, 500, size=7).astype(np.int32))]
    node = helper.make_node("QGemm", ["a", "sa", "za", "b", "sb", "zb", "c"], ["y"], domain=MS, alpha=0.5, transB=1)
    m = _model([node], [helper.make_tensor_value_info("a", TensorProto.UINT8, [3, 12])],
               [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 7])], inits, ms=True)
    path = _save(m, tmp_path)
    feeds = {"a": rng.integers(0, 256, size=(3, 12)).astype(np.uint8)}
    want = _ort(path, feeds)
    got, _ = _tvm(path, feeds, target="llvm", placement="none")
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


# ---------------------------------------------------------------------------------------------
# bad quantization parameters: exact, on the CPU with the reason, or a clear import error

def test_a_negative_weight_scale_stays_float_with_the_reason_and_matches_ort(tmp_path):
    """A negative scale is well defined (the spec's float formula): the integer rewrite refuses it (its
    ReLU reordering needs positive scales), the conv runs in float32 (a float QPU region), the
    quantize on the CPU."""
    rng = np.random.default_rng(5)
    model, feeds = _qlinear_conv_model(rng, per_channel=False, w_scale=-0.004, bias=False, w_bits=7)
    path = _save(model, tmp_path)
    got, lib = _tvm(path, feeds)
    _assert_within_one_step(got, qlinear_conv_ref(model, feeds["x"]))
    q = lib.report.qdq
    assert q and not q[0]["accepted"] and "zero, negative" in q[0]["reason"], q
    assert all("int32" not in r["spec"] for r in lib.report.regions), lib.report.text()
    _assert_within_one_step(got, _ort(path, feeds))


@pytest.mark.parametrize("scale", [0.0, float("nan")])
def test_a_zero_or_nan_weight_scale_never_becomes_an_integer_region(scale, tmp_path):
    """No defined result to match: the chain is refused (reason in the report) and the model still
    builds and runs in float on the CPU."""
    rng = np.random.default_rng(6)
    model, feeds = _qlinear_conv_model(rng, per_channel=False, w_scale=scale, bias=False)
    path = _save(model, tmp_path)
    mod, params = tvm_qpu.from_onnx(path)
    rep = tvm_qpu.partition_report(tvm_qpu.partition(mod, params, placement="all"))
    assert rep.qdq and not rep.qdq[0]["accepted"] and "zero, negative or non-finite" in rep.qdq[0]["reason"]
    assert not [r for r in rep.regions if r["kind"] == "conv2d" and "int32" in r["spec"]]


BAD_IMPORT = {
    # case: (QLinearConv model kwargs, mutate(model), words in the error)
    "two_dim_weight_scale": (dict(), lambda m: _replace_init(m, "sw", np.full((6, 1), 0.01, np.float32)),
                             "scalar or a 1-D"),
    "float_bias": (dict(), lambda m: _replace_init(m, "b", np.zeros(6, np.float32)), "bias has dtype float32"),
    "per_tensor_output_scale_only": (dict(), lambda m: _replace_init(m, "sy", np.full(6, 0.1, np.float32)),
                                     "output scale must be a scalar"),
}


def _replace_init(model, name, arr):
    for i, t in enumerate(model.graph.initializer):
        if t.name == name:
            model.graph.initializer[i].CopyFrom(_init(name, arr))
    return model


@pytest.mark.parametrize("case", list(BAD_IMPORT))
def test_quantized_nodes_that_break_the_spec_are_refused_at_import_with_the_reason(case, tmp_path):
    kw, mutate, words = BAD_IMPORT[case]
    model, _ = _qlinear_conv_model(np.random.default_rng(0), **kw)
    model = mutate(model)
    path = tmp_path / "bad.onnx"
    onnx.save(model, path)
    with pytest.raises(tvm_qpu.QpuError) as e:
        tvm_qpu.from_onnx(path)
    assert "QLinearConv" in str(e.value) and words in str(e.value), str(e.value)


# ---------------------------------------------------------------------------------------------
# ConvInteger (quantize_dynamic)

@pytest.mark.parametrize("x_dtype,w_dtype,per_channel_zw", [(np.uint8, np.int8, False), (np.uint8, np.uint8, True),
                                                            (np.int8, np.int8, True)])
def test_conv_integer_is_exact_to_the_spec_on_cpu_and_qpu(x_dtype, w_dtype, per_channel_zw, tmp_path):
    tp = {np.int8: TensorProto.INT8, np.uint8: TensorProto.UINT8}
    rng = np.random.default_rng(3)
    xi, wi = np.iinfo(x_dtype), np.iinfo(w_dtype)
    w = rng.integers(wi.min, wi.max + 1, size=(4, 3, 3, 3)).astype(w_dtype)
    zw = (rng.integers(wi.min, wi.max + 1, size=4) if per_channel_zw else np.array(wi.max // 3)).astype(w_dtype)
    zx = np.array(xi.max // 2 - 7, x_dtype)
    node = helper.make_node("ConvInteger", ["x", "w", "zx", "zw"], ["y"], pads=[1, 0, 1, 2], strides=[1, 2])
    m = _model([node], [helper.make_tensor_value_info("x", tp[x_dtype], [2, 3, 6, 7])],
               [helper.make_tensor_value_info("y", TensorProto.INT32, [2, 4, 6, 4])],
               [_init("w", w), _init("zx", zx), _init("zw", zw)])
    path = _save(m, tmp_path)
    x = rng.integers(xi.min, xi.max + 1, size=(2, 3, 6, 7)).astype(x_dtype)
    ref = conv_ref(x.astype(np.int64) - int(zx), w.astype(np.int64) - zw.astype(np.int64).reshape(-1, 1, 1, 1),
                   pads=(1, 0, 1, 2), strides=(1, 2))
    got, lib = _tvm(path, {"x": x})
    regs = _int_regions(lib)
    assert len(regs) == 1 and regs[0]["kind"] == "conv2d", lib.report.text()
    np.testing.assert_array_equal(got, ref)
    cpu, _ = _tvm(path, {"x": x}, target="llvm", placement="none")
    np.testing.assert_array_equal(cpu, ref)


# ---------------------------------------------------------------------------------------------
# models quantized by ONNX Runtime's own quantizer

def _float_cnn(rng):
    """Conv 3x3 (3 -> 8) -> Relu -> MaxPool 2x2 -> Conv 3x3 (8 -> 8) -> Relu -> Flatten -> Gemm (-> 10)."""
    inits = [_init("w1", rng.normal(0, 0.3, (8, 3, 3, 3)).astype(np.float32)),
             _init("b1", rng.normal(0, 0.1, 8).astype(np.float32)),
             _init("w2", rng.normal(0, 0.2, (8, 8, 3, 3)).astype(np.float32)),
             _init("b2", rng.normal(0, 0.1, 8).astype(np.float32)),
             _init("w3", rng.normal(0, 0.2, (10, 72)).astype(np.float32)),
             _init("b3", rng.normal(0, 0.1, 10).astype(np.float32))]
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("MaxPool", ["r1"], ["p1"], kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("Conv", ["p1", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c2"], ["r2"]),
             helper.make_node("Flatten", ["r2"], ["f"]),
             helper.make_node("Gemm", ["f", "w3", "b3"], ["out"], transB=1)]
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 6, 6])],
                  [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 10])], inits)


def _calibration(rng, n=8):
    return [{"x": rng.uniform(-1, 1, (1, 3, 6, 6)).astype(np.float32)} for _ in range(n)]


def _quantize_static(fpath, qpath, data, **kw):
    q = pytest.importorskip("onnxruntime.quantization")

    class Reader(q.CalibrationDataReader):
        def __init__(self):
            self.it = iter(data)

        def get_next(self):
            return next(self.it, None)

    q.quantize_static(str(fpath), str(qpath), Reader(), quant_format=q.QuantFormat.QOperator, **kw)


def _output_step(qpath):
    return float(next(numpy_helper.to_array(i) for i in onnx.load(qpath).graph.initializer
                      if i.name.startswith("out") and i.name.endswith("scale")))


@pytest.mark.parametrize("per_channel,act", [(True, "QInt8"), (False, "QUInt8")])
def test_a_qoperator_model_from_quantize_static_offloads_int8_regions_and_matches_ort(per_channel, act, tmp_path):
    """QLinearConv x2 + com.microsoft QGemm: every one an integer region; the QPU build equals the CPU
    build bit for bit and the int8 logits equal ORT's or are within one output step. uint8 activations
    are quantized with ``reduce_range`` (7-bit weights), as ORT advises on x86, so ORT's own u8s8
    kernels are exact (module docstring)."""
    q = pytest.importorskip("onnxruntime.quantization")
    rng = np.random.default_rng(21)
    fpath, qpath = tmp_path / "f.onnx", tmp_path / "q.onnx"
    onnx.save(_float_cnn(rng), fpath)
    data = _calibration(rng)
    _quantize_static(fpath, qpath, data, per_channel=per_channel, activation_type=getattr(q.QuantType, act),
                     weight_type=q.QuantType.QInt8, reduce_range=act == "QUInt8")
    ops = {n.op_type for n in onnx.load(qpath).graph.node}
    assert {"QLinearConv", "QGemm"} <= ops, ops
    x = {"x": rng.uniform(-1, 1, (1, 3, 6, 6)).astype(np.float32)}
    want = _ort(qpath, x)
    got, lib = _tvm(qpath, x)
    kinds = sorted(r["kind"] for r in _int_regions(lib))
    assert kinds == ["conv2d", "conv2d", "matmul"], lib.report.text()
    assert len(lib.report.qdq) >= 3 and all(d["accepted"] for d in lib.report.qdq), lib.report.text()
    _assert_within_one_step(got, want, _output_step(qpath))
    cpu, _ = _tvm(qpath, x, target="llvm", placement="none")
    np.testing.assert_array_equal(got, cpu)


@pytest.mark.parametrize("per_channel", [False, True])
def test_a_quantize_dynamic_model_imports_offloads_conv_integer_and_matches_ort(per_channel, tmp_path):
    """DynamicQuantizeLinear -> ConvInteger / MatMulInteger -> Cast -> Mul: the integer ops run as
    int16 (x - zero point) x int8 regions; with ``reduce_range`` (7-bit weights, no int16 saturation in
    ORT's kernels) the float outputs equal ORT's to float rounding."""
    q = pytest.importorskip("onnxruntime.quantization")
    rng = np.random.default_rng(22)
    fpath, qpath = tmp_path / "f.onnx", tmp_path / "d.onnx"
    onnx.save(_float_cnn(rng), fpath)
    q.quantize_dynamic(str(fpath), str(qpath), per_channel=per_channel, reduce_range=True,
                       weight_type=q.QuantType.QInt8)
    ops = [n.op_type for n in onnx.load(qpath).graph.node]
    assert ops.count("ConvInteger") == 2 and "MatMulInteger" in ops, ops
    x = {"x": rng.uniform(-1, 1, (1, 3, 6, 6)).astype(np.float32)}
    want = _ort(qpath, x)
    got, lib = _tvm(qpath, x)
    regs = _int_regions(lib)
    assert sorted(r["kind"] for r in regs) == ["conv2d", "conv2d", "matmul"], lib.report.text()
    assert all(", int8[" in r["spec"] for r in regs), lib.report.text()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


# ---------------------------------------------------------------------------------------------
# com.microsoft QLinearAdd, QLinearGlobalAveragePool, QLinearConcat

def test_qlinear_add_global_average_pool_and_concat_match_ort(tmp_path):
    rng = np.random.default_rng(31)
    f = lambda v: np.float32(v)            # noqa: E731
    inits = [_init("sa", f(0.05)), _init("za", np.array(3, np.uint8)), _init("sb", f(0.07)),
             _init("zb", np.array(250, np.uint8)), _init("sc", f(0.09)), _init("zc", np.array(128, np.uint8)),
             _init("sp", f(0.03)), _init("zp", np.array(10, np.uint8)),
             _init("sk", f(0.1)), _init("zk", np.array(0, np.uint8))]
    nodes = [helper.make_node("QLinearAdd", ["a", "sa", "za", "b", "sb", "zb", "sc", "zc"], ["c"], domain=MS),
             helper.make_node("QLinearGlobalAveragePool", ["c", "sc", "zc", "sp", "zp"], ["p"], domain=MS,
                              channels_last=0),
             helper.make_node("QLinearConcat", ["sk", "zk", "p", "sp", "zp", "pb", "sb", "zb"], ["y"], domain=MS,
                              axis=1)]
    u8 = TensorProto.UINT8
    m = _model(nodes, [helper.make_tensor_value_info("a", u8, [1, 4, 5, 5]), helper.make_tensor_value_info("b", u8, [1, 4, 5, 5]),
                       helper.make_tensor_value_info("pb", u8, [1, 2, 1, 1])],
               [helper.make_tensor_value_info("y", u8, [1, 6, 1, 1])], inits, ms=True)
    path = _save(m, tmp_path)
    feeds = {k: rng.integers(0, 256, s).astype(np.uint8) for k, s in
             (("a", (1, 4, 5, 5)), ("b", (1, 4, 5, 5)), ("pb", (1, 2, 1, 1)))}
    want = _ort(path, feeds)
    got, _ = _tvm(path, feeds, target="llvm", placement="none")
    assert got.dtype == np.uint8 and got.shape == want.shape
    worst, _ = _steps_from_ort(got, want, 1.0)
    assert worst <= 1, (got.ravel(), want.ravel())


def test_register_adds_the_converters_to_tvms_frontend_and_unregister_restores_it(tmp_path):
    from tvm.relax.frontend.onnx import from_onnx, onnx_frontend
    from tvm_qpu import onnx_quant
    model, _ = _qlinear_conv_model(np.random.default_rng(0))
    onnx_quant.unregister()
    try:
        assert "QLinearConv" not in onnx_frontend._get_convert_map()
        onnx_quant.register()
        onnx_quant.register()                                # idempotent
        assert set(onnx_quant.converters()) <= set(onnx_frontend._get_convert_map())
        mod = from_onnx(model)                               # TVM's own entry point reads QLinearConv now
        assert "relax.nn.conv2d" in mod.script() or "R.nn.conv2d" in mod.script()
        onnx_quant.unregister()
        assert "QLinearConv" not in onnx_frontend._get_convert_map()
    finally:
        onnx_quant.register()


# ---------------------------------------------------------------------------------------------
# an int8 transformer layer (quantize_static, QDQ)

def _ort_session(path, optimized):
    so = ort.SessionOptions()
    so.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimized
                                   else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def test_an_int8_transformer_layer_runs_its_matmuls_and_attention_on_integer_regions_within_ort_tolerance(tmp_path):
    """models/transformer_layer.onnx quantized by quantize_static (QDQ, int8, per-channel): its six weight
    matmuls (Q, K, V, output projection, both feed-forward) become int8-weight integer regions, and Q K^T
    and P V (two run-time operands, batched over the 4 heads) integer regions too: each operand
    ``q - zero point`` read at run time, int32 accumulation, the requantize in the kernel's epilogue
    (int8 out). The softmax stays float32 (a float QPU region). ORT's own optimized (fused
    QLinearMatMul) run and its unoptimized run (the QDQ graph as written) differ by several output
    steps; ours equals the unoptimized run to one step and is no further from the optimized run than
    ORT's own two runs are from each other (+1 step)."""
    q = pytest.importorskip("onnxruntime.quantization")
    from frontend_util import MODELS
    rng = np.random.default_rng(0)
    data = iter([{"input": rng.normal(0, 1, (1, 16, 32)).astype(np.float32)} for _ in range(16)])

    class Reader(q.CalibrationDataReader):
        def get_next(self):
            return next(data, None)

    qpath = tmp_path / "tq.onnx"
    q.quantize_static(str(MODELS / "transformer_layer.onnx"), str(qpath), Reader(), quant_format=q.QuantFormat.QDQ,
                      per_channel=True, activation_type=q.QuantType.QInt8, weight_type=q.QuantType.QInt8)
    x = rng.normal(0, 1, (1, 16, 32)).astype(np.float32)
    got, lib = _tvm(qpath, {"input": x})
    ints = [r for r in lib.report.regions if re.search(r"-> u?int(8|32)\[", r["spec"])]
    assert all(r["kind"] == "matmul" and "float32" not in r["spec"] for r in ints), lib.report.text()
    weight = [r for r in ints if ", int8[" in r["spec"]]
    assert len(weight) == 6, lib.report.text()
    # Q K^T [1, 4, 16, 8] x [1, 4, 8, 16] and P V [1, 4, 16, 16] x [1, 4, 16, 8]: both operands
    # 4-D (one per head, computed at run time), int8 out through the requantize epilogue
    attn = [r for r in ints if r not in weight]
    assert sorted(re.sub(r"u?int(8|16)", "i", r["spec"]) for r in attn) == \
        ["matmul(i[1, 4, 16, 16], i[1, 4, 16, 8]) -> i[1, 4, 16, 8]",
         "matmul(i[1, 4, 16, 8], i[1, 4, 8, 16]) -> i[1, 4, 16, 16]"], lib.report.text()
    assert all(re.search(r"-> int8\[[^\]]*\]$", r["spec"]) for r in attn), [r["spec"] for r in attn]
    assert sum("run-time" in d["reason"] and d["accepted"] for d in lib.report.qdq) == 2
    floats = [r for r in lib.report.regions if r not in ints]
    # the softmax runs in float; the residual adds, LayerNorms and GELU have float kernels of their
    # own (codegen/kernels/elementwise.py, layernorm.py)
    core = sorted(r["kind"] for r in floats if r["kind"] not in ("add", "layer_norm", "gelu"))
    assert core == ["softmax"], lib.report.text()
    step = _output_step_of_dq(qpath, "output")
    fused = _ort_session(qpath, True).run(None, {"input": x})[0]
    plain = _ort_session(qpath, False).run(None, {"input": x})[0]
    _assert_within_one_step(got, plain, step)
    ort_spread, _ = _steps_from_ort(fused, plain, step)
    worst, _ = _steps_from_ort(got, fused, step)
    assert worst <= ort_spread + 1 + 1e-3, (worst, ort_spread)


def _output_step_of_dq(path, output):
    m = onnx.load(path)
    node = next(n for n in m.graph.node if output in n.output)
    assert node.op_type == "DequantizeLinear"
    return float(next(numpy_helper.to_array(i) for i in m.graph.initializer if i.name == node.input[1]))


@pytest.mark.parametrize("transpose_b,b_type,b_zero,b_runs_as", [(False, np.int8, 0, "int8"),
                                                                 (True, np.uint8, 128, "int8"),
                                                                 (False, np.int8, 7, "int16")])
def test_a_matmul_of_two_run_time_quantized_operands_is_an_integer_region(tmp_path, transpose_b, b_type, b_zero,
                                                                          b_runs_as):
    """DQ(int8 a) x [Transpose](DQ(b)) -> Q with both operands model inputs (attention's Q K^T form,
    batched over 2 heads) runs as an integer QPU region with the requantize epilogue, B read at run
    time as ``b - zb`` in the narrowest dtype (int8 for zb = 0 or uint8 - 128, else int16; a
    Transpose runs on the CPU on the 8-bit tensor); the result is the ONNX spec's (exact integer
    products, one rounding of ``acc * sa * sb / sy``, half to even) within one step at a tie."""
    rng = np.random.default_rng(3)
    tp = {np.int8: TensorProto.INT8, np.uint8: TensorProto.UINT8}
    M, K, N = 8, 24, 12
    sa, za, sb, sy, zy = np.float32(0.05), np.int8(-3), np.float32(0.07), np.float32(0.11), np.int8(5)
    zb = b_type(b_zero)
    b_shape = [1, 2, N, K] if transpose_b else [1, 2, K, N]
    nodes = [helper.make_node("DequantizeLinear", ["a", "sa", "za"], ["af"]),
             helper.make_node("DequantizeLinear", ["b", "sb", "zb"], ["bf"])]
    if transpose_b:
        nodes.append(helper.make_node("Transpose", ["bf"], ["bt"], perm=[0, 1, 3, 2]))
    nodes += [helper.make_node("MatMul", ["af", "bt" if transpose_b else "bf"], ["y"]),
              helper.make_node("QuantizeLinear", ["y", "sy", "zy"], ["yq"])]
    model = _model(nodes, [helper.make_tensor_value_info("a", TensorProto.INT8, [1, 2, M, K]),
                           helper.make_tensor_value_info("b", tp[b_type], b_shape)],
                   [helper.make_tensor_value_info("yq", TensorProto.INT8, [1, 2, M, N])],
                   [_init("sa", sa), _init("za", za), _init("sb", sb), _init("zb", zb),
                    _init("sy", sy), _init("zy", zy)])
    path = _save(model, tmp_path)
    info = np.iinfo(b_type)
    a = rng.integers(-128, 128, (1, 2, M, K), dtype=np.int8)
    b = rng.integers(info.min, int(info.max) + 1, b_shape).astype(b_type)
    got, lib = _tvm(path, {"a": a, "b": b})
    # numpy written to the spec: exact integer matmul of (q - z), y = acc * sa * sb, q = rne(y / sy) + zy
    bt = np.swapaxes(b.astype(np.int64) - int(zb), -1, -2) if transpose_b else b.astype(np.int64) - int(zb)
    acc = (a.astype(np.int64) - int(za)) @ bt
    want = np.clip(np.rint(acc * (np.float64(sa) * np.float64(sb)) / np.float64(sy)) + int(zy), -128, 127)
    regs = _int_regions(lib)
    assert len(regs) == 1 and regs[0]["spec"].startswith("matmul(int16[1, 2, 8, 24], ") and \
        regs[0]["spec"].endswith(f", {b_runs_as}[1, 2, 24, 12]) -> int8[1, 2, 8, 12]"), lib.report.text()
    assert got.dtype == np.int8
    _assert_within_one_step(got, want)
    _assert_within_one_step(got, _ort(path, {"a": a, "b": b}))


def test_a_run_time_quantized_matmul_with_a_float_output_is_an_int32_region_then_a_cpu_dequantize(tmp_path):
    """Without a QuantizeLinear after it, DQ(a) x DQ(b) runs as an int32-output integer region and the
    dequantize ``float32(acc) * float32(sa * sb)`` follows on the CPU; equal to the exact product up
    to float32 rounding."""
    rng = np.random.default_rng(4)
    sa, za, sb, zb = np.float32(0.02), np.uint8(128), np.float32(0.03), np.int8(0)
    nodes = [helper.make_node("DequantizeLinear", ["a", "sa", "za"], ["af"]),
             helper.make_node("DequantizeLinear", ["b", "sb", "zb"], ["bf"]),
             helper.make_node("MatMul", ["af", "bf"], ["y"])]
    model = _model(nodes, [helper.make_tensor_value_info("a", TensorProto.UINT8, [3, 10, 40]),
                           helper.make_tensor_value_info("b", TensorProto.INT8, [3, 40, 6])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 10, 6])],
                   [_init("sa", sa), _init("za", za), _init("sb", sb), _init("zb", zb)])
    path = _save(model, tmp_path)
    a = rng.integers(0, 256, (3, 10, 40), dtype=np.uint8)
    b = rng.integers(-128, 128, (3, 40, 6), dtype=np.int8)
    got, lib = _tvm(path, {"a": a, "b": b})
    regs = _int_regions(lib)
    assert [r["spec"] for r in regs] == ["matmul(int8[3, 10, 40], int8[3, 40, 6]) -> int32[3, 10, 6]"], \
        lib.report.text()
    assert any(c["op"] == "relax.dequantize" for c in lib.report.cpu_ops), lib.report.text()
    want = ((a.astype(np.int64) - 128) @ b.astype(np.int64)) * (np.float64(sa) * np.float64(sb))
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
