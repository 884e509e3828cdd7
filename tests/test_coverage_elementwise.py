"""Residual add (+ ReLU / ReLU6), LayerNorm and GELU offloaded from ONNX models (issue 12's last
coverage gap): each model is built the way an exporter writes it, partitioned with placement
"all", run on the emulator and compared with ONNX Runtime; refused forms stay on the CPU with a
reason. (Whether cost placement takes them is a separate question: see
``test_cost_placement_reports_the_figures``.)"""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("tvm")
onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from onnx import helper  # noqa: E402

from test_coverage_gaps import check_against_ort, cpu_ops, make_model, build  # noqa: E402

import tvm_qpu  # noqa: E402


def _rng(seed):
    return np.random.default_rng(seed)


def region_names(lib):
    return [r["name"] for r in lib.report.regions]


@pytest.mark.parametrize("act", ["Relu", "Clip", None])
def test_resnet_residual_add_relu(act, tmp_path):
    """conv + bias -> add(shortcut) -> ReLU / ReLU6 (PyTorch's Clip with min/max inputs)."""
    rng = _rng(1)
    C, H = 8, 10
    inits = {"W": (rng.standard_normal((C, C, 3, 3)) / 8).astype(np.float32), "B": rng.standard_normal(C).astype(np.float32)}
    nodes = [helper.make_node("Conv", ["x", "W", "B"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Add", ["c", "x"], ["s" if act else "y"])]
    if act == "Relu":
        nodes.append(helper.make_node("Relu", ["s"], ["y"]))
    elif act == "Clip":
        inits.update(lo=np.array(0, np.float32), hi=np.array(6, np.float32))
        nodes.append(helper.make_node("Clip", ["s", "lo", "hi"], ["y"]))
    model = make_model(nodes, {"x": (1, C, H, H)}, {"y": (1, C, H, H)}, inits)
    x = (rng.standard_normal((1, C, H, H)) * 3).astype(np.float32)
    lib = check_against_ort(model, {"x": x}, tmp_path)
    add = {"Relu": "qpu.add_relu", "Clip": "qpu.add_clip", None: "qpu.add"}[act]
    assert region_names(lib) == ["qpu.conv2d_bias", add], lib.report.text()
    assert cpu_ops(lib) == []
    if act == "Clip":
        assert lib.regions[1].match.spec.attrs["activation"] == ("clip", 0.0, 6.0)


def test_broadcast_add_stays_on_cpu_with_reason(tmp_path):
    rng = _rng(2)
    nodes = [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Add", ["x", "r"], ["a"]),
             helper.make_node("ReduceMax", ["x"], ["m"], axes=[3], keepdims=1),
             helper.make_node("Add", ["a", "m"], ["y"])]
    model = make_model(nodes, {"x": (1, 4, 5, 6)}, {"y": (1, 4, 5, 6)}, {})
    lib = check_against_ort(model, {"x": rng.standard_normal((1, 4, 5, 6)).astype(np.float32)}, tmp_path)
    assert "qpu.add" in region_names(lib)
    text = lib.report.text()
    assert "differ (the add kernel does not broadcast)" in text, text


@pytest.mark.parametrize("form", ["op", "chain"])
def test_layer_norm(form, tmp_path):
    """ONNX LayerNormalization (opset 17) and the decomposed chain of older exports."""
    rng = _rng(3)
    S, D = 6, 40
    inits = {"g": (1 + rng.standard_normal(D) * 0.1).astype(np.float32), "b": (rng.standard_normal(D) * 0.1).astype(np.float32)}
    if form == "op":
        nodes = [helper.make_node("LayerNormalization", ["x", "g", "b"], ["y"], axis=-1, epsilon=1e-5)]
        opset = 17
    else:
        inits.update(two=np.array(2, np.float32), eps=np.array(1e-5, np.float32))
        nodes = [helper.make_node("ReduceMean", ["x"], ["mu"], axes=[-1], keepdims=1),
                 helper.make_node("Sub", ["x", "mu"], ["d"]),
                 helper.make_node("Pow", ["d", "two"], ["d2"]),
                 helper.make_node("ReduceMean", ["d2"], ["var"], axes=[-1], keepdims=1),
                 helper.make_node("Add", ["var", "eps"], ["ve"]),
                 helper.make_node("Sqrt", ["ve"], ["sd"]),
                 helper.make_node("Div", ["d", "sd"], ["n"]),
                 helper.make_node("Mul", ["n", "g"], ["ng"]),
                 helper.make_node("Add", ["ng", "b"], ["y"])]
        opset = 13
    model = make_model(nodes, {"x": (1, S, D)}, {"y": (1, S, D)}, inits, opset=opset)
    x = (rng.standard_normal((1, S, D)) * 2 + 1).astype(np.float32)
    lib = check_against_ort(model, {"x": x}, tmp_path, rtol=1e-5, atol=1e-5)
    assert region_names(lib) == ["qpu.layer_norm" if form == "op" else "qpu.layer_norm_chain"], lib.report.text()
    assert cpu_ops(lib) == []


@pytest.mark.parametrize("form", ["none", "tanh", "chain", "chain_hf"])
def test_gelu(form, tmp_path):
    """ONNX Gelu (opset 20, both approximations) and the erf chains of older exports."""
    rng = _rng(4)
    inits, opset = {}, 20
    if form in ("none", "tanh"):
        nodes = [helper.make_node("Gelu", ["x"], ["y"], approximate=form)]
    elif form == "chain":             # PyTorch: x * (erf(x / sqrt2) + 1) * 0.5
        inits = {"s": np.array(np.sqrt(2), np.float32), "one": np.array(1, np.float32), "half": np.array(0.5, np.float32)}
        nodes = [helper.make_node("Div", ["x", "s"], ["t"]), helper.make_node("Erf", ["t"], ["e"]),
                 helper.make_node("Add", ["e", "one"], ["p"]), helper.make_node("Mul", ["x", "p"], ["m"]),
                 helper.make_node("Mul", ["m", "half"], ["y"])]
        opset = 13
    else:                             # HuggingFace: x * 0.5 * (1 + erf(x * (1 / sqrt2)))
        inits = {"s": np.array(1 / np.sqrt(2), np.float32), "one": np.array(1, np.float32), "half": np.array(0.5, np.float32)}
        nodes = [helper.make_node("Mul", ["x", "s"], ["t"]), helper.make_node("Erf", ["t"], ["e"]),
                 helper.make_node("Add", ["one", "e"], ["p"]), helper.make_node("Mul", ["x", "half"], ["m"]),
                 helper.make_node("Mul", ["m", "p"], ["y"])]
        opset = 13
    model = make_model(nodes, {"x": (2, 8, 24)}, {"y": (2, 8, 24)}, inits, opset=opset)
    x = (rng.standard_normal((2, 8, 24)) * 3).astype(np.float32)
    lib = check_against_ort(model, {"x": x}, tmp_path, rtol=1e-5, atol=2e-6)
    want = {"none": "qpu.gelu", "tanh": "qpu.gelu_tanh"}.get(form, "qpu.gelu_erf_chain")
    assert region_names(lib) == [want], lib.report.text()
    assert lib.regions[0].match.spec.attrs["approximate"] == ("tanh" if form == "tanh" else "none")


@pytest.mark.parametrize("form,n", [("op", 128), ("chain", 64), ("op", 96)])
def test_bias_add_gelu(form, n, tmp_path):
    """The feed-forward bias add + GELU where no matmul region took the bias add: one add kernel
    pass with a GELU epilogue; a bias length the kernel cannot take (96: not a multiple of 64)
    leaves the add on the CPU and offloads the GELU alone."""
    rng = _rng(8)
    inits = {"bias": rng.standard_normal(n).astype(np.float32)}
    nodes = [helper.make_node("Add", ["x", "bias"], ["h"])]
    if form == "op":
        nodes.append(helper.make_node("Gelu", ["h"], ["y"]))
        opset = 20
    else:
        inits.update(s=np.array(np.sqrt(2), np.float32), one=np.array(1, np.float32), half=np.array(0.5, np.float32))
        nodes += [helper.make_node("Div", ["h", "s"], ["t"]), helper.make_node("Erf", ["t"], ["e"]),
                  helper.make_node("Add", ["e", "one"], ["p"]), helper.make_node("Mul", ["h", "p"], ["m"]),
                  helper.make_node("Mul", ["m", "half"], ["y"])]
        opset = 13
    model = make_model(nodes, {"x": (1, 10, n)}, {"y": (1, 10, n)}, inits, opset=opset)
    x = (rng.standard_normal((1, 10, n)) * 3).astype(np.float32)
    lib = check_against_ort(model, {"x": x}, tmp_path, rtol=1e-5, atol=2e-6)
    if n % 64:
        assert region_names(lib) == ["qpu.gelu"], lib.report.text()
        assert cpu_ops(lib) == ["relax.add"]
        assert "not a multiple of 64" in lib.report.text()
    else:
        assert region_names(lib) == ["qpu.bias_gelu" if form == "op" else "qpu.bias_gelu_erf_chain"], lib.report.text()
        assert lib.regions[0].match.spec.attrs["activation"] == "gelu" and cpu_ops(lib) == []


def test_gelu_chain_with_a_wrong_constant_stays_on_cpu(tmp_path):
    inits = {"s": np.array(2.0, np.float32), "one": np.array(1, np.float32), "half": np.array(0.5, np.float32)}
    nodes = [helper.make_node("Div", ["x", "s"], ["t"]), helper.make_node("Erf", ["t"], ["e"]),
             helper.make_node("Add", ["e", "one"], ["p"]), helper.make_node("Mul", ["x", "p"], ["m"]),
             helper.make_node("Mul", ["m", "half"], ["y"])]
    model = make_model(nodes, {"x": (4, 16)}, {"y": (4, 16)}, inits)
    lib = check_against_ort(model, {"x": _rng(5).standard_normal((4, 16)).astype(np.float32)}, tmp_path)
    assert "qpu.gelu_erf_chain" not in region_names(lib)
    assert "the divisor of x is [2.0], not 1.41421" in lib.report.text(), lib.report.text()


def test_transformer_layer_runs_its_adds_layer_norms_and_gelu_on_the_qpu(tmp_path):
    from frontend_util import MODELS
    import onnxruntime as ort
    mod, params = tvm_qpu.from_onnx(MODELS / "transformer_layer.onnx")
    lib = tvm_qpu.build(mod, target="qpu", placement="all", params=params)
    kinds = [r.match.spec.kind for r in lib.regions]
    assert kinds.count("add") == 2 and kinds.count("layer_norm") == 2 and kinds.count("gelu") == 1, lib.report.text()
    x = _rng(6).standard_normal((1, 16, 32)).astype(np.float32)
    runner = lib.runner("emulator")
    try:
        got = runner.run(input=x)["output"]
    finally:
        runner.close()
    want = ort.InferenceSession(str(MODELS / "transformer_layer.onnx"), providers=["CPUExecutionProvider"]).run(
        None, {"input": x})[0]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)


def test_cost_placement_reports_the_figures():
    """Cost placement decides with the kernels' modelled time: every candidate of these kinds
    carries both figures in the report (whichever side wins)."""
    from frontend_util import MODELS
    mod, params = tvm_qpu.from_onnx(MODELS / "transformer_layer.onnx")
    report = tvm_qpu.partition_report(tvm_qpu.partition(mod, params, placement="cost"))
    cands = [c for c in report.as_dict()["candidates"] if c["pattern"] in ("qpu.add", "qpu.layer_norm", "qpu.gelu_erf_chain")
             and not c["reason"].startswith("refused")]          # (bias adds: refused, a constant operand)
    assert sorted(c["pattern"] for c in cands) == ["qpu.add"] * 2 + ["qpu.gelu_erf_chain"] + ["qpu.layer_norm"] * 2
    for c in cands:
        assert c["reason"].startswith("cost: ") and c["cpu_s"] > 0 and c["qpu_s"] > 0, c
