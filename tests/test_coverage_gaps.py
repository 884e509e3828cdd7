"""Coverage gaps found on real models (issue 12): small ONNX models shaped like the exports that
showed each gap, built here with onnx.helper. Each test checks the partition report (the op is now
offloaded / fused) and that the emulator's result equals ONNX Runtime's."""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("tvm")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

import tvm_qpu  # noqa: E402
from tvm_qpu.backend import QpuWarning  # noqa: E402

F32 = TensorProto.FLOAT


def _rng(seed=0):
    return np.random.default_rng(seed)


def make_model(nodes, inputs: dict, outputs: dict, inits: dict, opset=13):
    """ModelProto from nodes, {input: shape}, {output: shape}, {initializer: array} (float32 I/O)."""
    g = helper.make_graph(nodes, "coverage",
                          [helper.make_tensor_value_info(n, F32, list(s)) for n, s in inputs.items()],
                          [helper.make_tensor_value_info(n, F32, list(s)) for n, s in outputs.items()],
                          [numpy_helper.from_array(np.asarray(v), n) for n, v in inits.items()])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = min(m.ir_version, 8)
    onnx.checker.check_model(m)
    return m


def ort_run(model, feed: dict) -> dict:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, feed)))


def build(model, tmp_path, placement="all"):
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    mod, params = tvm_qpu.from_onnx(path)
    return tvm_qpu.build(mod, target="qpu", placement=placement, params=params)


def run_emulator(lib, feed: dict) -> dict:
    runner = lib.runner("emulator")
    try:
        return runner.run(**feed)
    finally:
        runner.close()


def check_against_ort(model, feed, tmp_path, placement="all", rtol=1e-4, atol=1e-4):
    """Build, run on the emulator, compare every output with ONNX Runtime. Returns the CompiledModule."""
    lib = build(model, tmp_path, placement)
    got = run_emulator(lib, feed)
    want = ort_run(model, feed)
    for name, w in want.items():
        assert got[name].shape == w.shape, lib.report.text()
        np.testing.assert_allclose(got[name], w, rtol=rtol, atol=atol, err_msg=lib.report.text())
    return lib


def cpu_ops(lib) -> list:
    return [c["op"] for c in lib.report.cpu_ops]


# ---------------------------------------------------------------------------------------------
# 1. ReLU6 / Clip fused into the conv and matmul epilogues

def _clip_node(opset, x, y, lo=0.0, hi=6.0, inits=None):
    """Clip as exported: opset >= 11 takes min/max as (initializer) inputs, opset 6 as attributes.
    ``lo``/``hi`` None leaves that bound out."""
    if opset >= 11:
        names = [x]
        for nm, v in (("clip_lo", lo), ("clip_hi", hi)):
            if v is None:
                names.append("")
            else:
                inits[nm] = np.array(v, np.float32)
                names.append(nm)
        while names[-1] == "":
            names.pop()
        return helper.make_node("Clip", names, [y])
    kw = {k: v for k, v in (("min", lo), ("max", hi)) if v is not None}
    return helper.make_node("Clip", [x], [y], **kw)


@pytest.mark.parametrize("opset", [13, 6])
def test_relu6_fused_into_conv_epilogue(opset, tmp_path):
    """Conv + bias + ReLU6 (MobileNetV2's block): one QPU region, no CPU max/min."""
    rng = _rng(1)
    inits = {"W": rng.standard_normal((8, 4, 3, 3)).astype(np.float32),
             "B": rng.standard_normal(8).astype(np.float32)}
    nodes = [helper.make_node("Conv", ["x", "W", "B"], ["y"], pads=[1, 1, 1, 1]),
             _clip_node(opset, "y", "z", inits=inits)]
    model = make_model(nodes, {"x": (1, 4, 10, 10)}, {"z": (1, 8, 10, 10)}, inits, opset=opset)
    x = (2 * rng.standard_normal((1, 4, 10, 10))).astype(np.float32)
    lib = check_against_ort(model, {"x": x}, tmp_path)
    assert [r["name"] for r in lib.report.regions] == ["qpu.conv2d_bias_clip"], lib.report.text()
    assert cpu_ops(lib) == [], lib.report.text()
    assert lib.regions[0].match.spec.attrs["activation"] == ("clip", 0.0, 6.0)
    want = ort_run(model, {"x": x})["z"]
    assert want.min() == 0.0 and want.max() == 6.0          # both bounds are exercised


def test_clip_fused_into_matmul_epilogue(tmp_path):
    """MatMul + bias + Clip(-1, 2) with general bounds."""
    rng = _rng(2)
    inits = {"W": rng.standard_normal((32, 24)).astype(np.float32),
             "B": rng.standard_normal(24).astype(np.float32)}
    nodes = [helper.make_node("MatMul", ["x", "W"], ["y0"]), helper.make_node("Add", ["y0", "B"], ["y"]),
             _clip_node(13, "y", "z", lo=-1.0, hi=2.0, inits=inits)]
    model = make_model(nodes, {"x": (5, 32)}, {"z": (5, 24)}, inits)
    lib = check_against_ort(model, {"x": rng.standard_normal((5, 32)).astype(np.float32)}, tmp_path)
    assert [r["name"] for r in lib.report.regions] == ["qpu.matmul_bias_clip"], lib.report.text()
    assert cpu_ops(lib) == [], lib.report.text()
    assert lib.regions[0].match.spec.attrs["activation"] == ("clip", -1.0, 2.0)


@pytest.mark.parametrize("lo,hi,pattern", [(0.5, None, "qpu.conv2d_clip_min"), (None, 1.5, "qpu.conv2d_clip_max")])
def test_one_sided_clip_fused(lo, hi, pattern, tmp_path):
    rng = _rng(3)
    inits = {"W": rng.standard_normal((4, 2, 3, 3)).astype(np.float32)}
    nodes = [helper.make_node("Conv", ["x", "W"], ["y"]), _clip_node(13, "y", "z", lo=lo, hi=hi, inits=inits)]
    model = make_model(nodes, {"x": (1, 2, 6, 6)}, {"z": (1, 4, 4, 4)}, inits)
    feed = {"x": rng.standard_normal((1, 2, 6, 6)).astype(np.float32)}
    lib = check_against_ort(model, feed, tmp_path)
    assert [r["name"] for r in lib.report.regions] == [pattern], lib.report.text()
    assert cpu_ops(lib) == [], lib.report.text()
    # the infinite bound survives the artifact (plan JSON) round trip
    runner = tvm_qpu.load(lib.save(tmp_path / "m.tar"), device="emulator")
    try:
        got = runner.run(**feed)["z"]
    finally:
        runner.close()
    np.testing.assert_allclose(got, ort_run(model, feed)["z"], rtol=1e-4, atol=1e-4)


def test_clip_with_runtime_bound_stays_on_cpu(tmp_path):
    """A bound that is a graph input is not a constant: the conv is offloaded, the clip is not."""
    rng = _rng(4)
    inits = {"W": rng.standard_normal((4, 2, 3, 3)).astype(np.float32)}
    nodes = [helper.make_node("Conv", ["x", "W"], ["y"]), helper.make_node("Clip", ["y", "lo"], ["z"])]
    g = make_model(nodes, {"x": (1, 2, 6, 6), "lo": ()}, {"z": (1, 4, 4, 4)}, inits)
    feed = {"x": rng.standard_normal((1, 2, 6, 6)).astype(np.float32), "lo": np.array(0.25, np.float32)}
    lib = check_against_ort(g, feed, tmp_path)
    assert [r["name"] for r in lib.report.regions] == ["qpu.conv2d"], lib.report.text()
    assert cpu_ops(lib), lib.report.text()


# ---------------------------------------------------------------------------------------------
# 2. sequence-first [S, 1, D] x W: one [S, D] x W GEMM, not S matrix-vector products

@pytest.mark.parametrize("w_shape", [(32, 48), (1, 32, 48)])
def test_sequence_first_matmul_is_one_gemm(w_shape, tmp_path):
    rng = _rng(5)
    S, D, N = 24, 32, 48
    inits = {"W": rng.standard_normal(w_shape).astype(np.float32), "B": rng.standard_normal(N).astype(np.float32)}
    nodes = [helper.make_node("MatMul", ["x", "W"], ["y0"]), helper.make_node("Add", ["y0", "B"], ["y"])]
    model = make_model(nodes, {"x": (S, 1, D)}, {"y": (S, 1, N)}, inits)
    lib = check_against_ort(model, {"x": rng.standard_normal((S, 1, D)).astype(np.float32)}, tmp_path)
    assert [r["name"] for r in lib.report.regions] == ["qpu.matmul_bias"], lib.report.text()
    spec = lib.regions[0].match.spec
    assert spec.inputs[0][0] == (S, D) and spec.inputs[1][0] == (D, N), spec.describe()   # M = S, no batch
    assert spec.output[0] == (S, N)


def test_batched_activations_times_weight_fold_into_rows(tmp_path):
    """[B, H, S, D] x W [D, N]: all leading dims fold into M (rows)."""
    rng = _rng(6)
    inits = {"W": rng.standard_normal((16, 8)).astype(np.float32)}
    model = make_model([helper.make_node("MatMul", ["x", "W"], ["y"])], {"x": (2, 3, 5, 16)}, {"y": (2, 3, 5, 8)},
                       inits)
    lib = check_against_ort(model, {"x": rng.standard_normal((2, 3, 5, 16)).astype(np.float32)}, tmp_path)
    assert lib.regions[0].match.spec.inputs[0][0] == (30, 16), lib.report.text()


# ---------------------------------------------------------------------------------------------
# 3. attention with q and k each scaled before the matmul (PyTorch's SDPA export)

def _sdpa_model(order: str, masked: bool, B=1, H=2, S=16, D=8):
    """q, k, v [B, H, S, D]; s = sqrt(1/sqrt(D)) on each of q and k^T (``order`` "kt": transpose then
    scale, as torch.onnx exports it; "k": scale then transpose); optional additive [S, S] mask."""
    s = np.array(np.sqrt(1.0 / np.sqrt(D)), np.float32)
    inits = {"sq": s, "sk": s}
    nodes = [helper.make_node("Mul", ["q", "sq"], ["q_s"])]
    if order == "kt":
        nodes += [helper.make_node("Transpose", ["k"], ["k_t"], perm=[0, 1, 3, 2]),
                  helper.make_node("Mul", ["k_t", "sk"], ["k_ts"])]
    else:
        nodes += [helper.make_node("Mul", ["k", "sk"], ["k_s"]),
                  helper.make_node("Transpose", ["k_s"], ["k_ts"], perm=[0, 1, 3, 2])]
    nodes.append(helper.make_node("MatMul", ["q_s", "k_ts"], ["scores"]))
    logits = "scores"
    if masked:
        inits["mask"] = np.triu(np.full((S, S), -1e4, np.float32), 1)
        nodes.append(helper.make_node("Add", ["scores", "mask"], ["masked"]))
        logits = "masked"
    nodes += [helper.make_node("Softmax", [logits], ["p"], axis=-1), helper.make_node("MatMul", ["p", "v"], ["o"])]
    shp = (B, H, S, D)
    return make_model(nodes, {"q": shp, "k": shp, "v": shp}, {"o": shp}, inits), shp


@pytest.mark.parametrize("order,masked,pattern", [("kt", False, "qpu.attention_prescaled"),
                                                  ("kt", True, "qpu.attention_mask_prescaled"),
                                                  ("k", False, "qpu.attention_prescaled_k")])
def test_prescaled_attention_is_fused(order, masked, pattern, tmp_path):
    model, shp = _sdpa_model(order, masked)
    rng = _rng(7)
    feed = {n: rng.standard_normal(shp).astype(np.float32) for n in ("q", "k", "v")}
    lib = check_against_ort(model, feed, tmp_path)
    assert [r["name"] for r in lib.report.regions] == [pattern], lib.report.text()
    spec = lib.regions[0].match.spec
    assert spec.kind == "attention"
    assert spec.attrs["scale"] == pytest.approx(1 / np.sqrt(shp[-1]), rel=1e-6)       # s1 * s2
    assert not [op for op in cpu_ops(lib) if op in ("relax.multiply", "relax.matmul", "relax.nn.softmax")], \
        lib.report.text()


# ---------------------------------------------------------------------------------------------
# 4. one batch needs no batch stride; placement=all offloading nothing warns

def _matmul_spec(a_shape, b_shape):
    from tvm_qpu.codegen.registry import OpSpec
    out = tuple(np.broadcast_shapes(a_shape[:-2], b_shape[:-2])) + (a_shape[-2], b_shape[-1])
    return OpSpec("matmul", [(a_shape, "float32"), (b_shape, "float32")], (out, "float32"),
                  {"transpose_b": False, "bias": False, "activation": None, "input_names": ["A", "B"]})


def test_single_batch_gemm_has_no_batch_stride_limit():
    """1 x 4096 @ 4096 x 4096 (B is 64 MiB: a batch stride beyond 24 bits, but there is one batch)."""
    from tvm_qpu.codegen import registry
    ok, why = registry.supports(_matmul_spec((1, 4096), (4096, 4096)))
    assert ok, why
    # with several batches of B the stride is used (z * stride) and is still refused
    ok, why = registry.supports(_matmul_spec((2, 1, 2048), (2, 2048, 2048)))
    assert not ok and "B batch stride" in why


def test_large_single_batch_matmul_offloaded_with_placement_all(tmp_path):
    """1 x 2048 @ 2048 x 2048: B is exactly 16 MiB (the old check refused it), run on the emulator."""
    rng = _rng(8)
    K = N = 2048
    inits = {"W": rng.standard_normal((K, N)).astype(np.float32)}
    model = make_model([helper.make_node("MatMul", ["x", "W"], ["y"])], {"x": (1, K)}, {"y": (1, N)}, inits)
    lib = check_against_ort(model, {"x": rng.standard_normal((1, K)).astype(np.float32)}, tmp_path, rtol=1e-4,
                            atol=1e-3)
    assert [r["name"] for r in lib.report.regions] == ["qpu.matmul"], lib.report.text()
    assert not lib.report.warnings


def _cpu_only_model():
    """An int32 x int32 MatMul of run-time operands: refused by the pattern check (24-bit multiply)."""
    g = helper.make_graph([helper.make_node("MatMul", ["a", "b"], ["c"])], "int32_matmul",
                          [helper.make_tensor_value_info("a", TensorProto.INT32, [4, 8]),
                           helper.make_tensor_value_info("b", TensorProto.INT32, [8, 5])],
                          [helper.make_tensor_value_info("c", TensorProto.INT32, [4, 5])])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])


def test_placement_all_offloading_nothing_warns(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(_cpu_only_model(), str(path))
    mod, params = tvm_qpu.from_onnx(path)
    with pytest.warns(QpuWarning, match="placement=all offloaded nothing"):
        part = tvm_qpu.partition(mod, params, placement="all")
    report = tvm_qpu.partition_report(part)                 # survives the JSON round trip
    assert len(report.warnings) == 1 and "24-bit" in report.warnings[0]
    assert report.text().startswith("WARNING: placement=all offloaded nothing")
    # placement=cost choosing the CPU is a decision, not a failure: no warning
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error", QpuWarning)
        part = tvm_qpu.partition(mod, params, placement="cost")
    assert not tvm_qpu.partition_report(part).warnings


def test_tvmc_shows_the_warning(tmp_path, capsys):
    from tvm_qpu import cli
    path = tmp_path / "m.onnx"
    onnx.save(_cpu_only_model(), str(path))
    with pytest.warns(QpuWarning):
        assert cli.main(["partition", str(path), "--qpu-placement", "all"]) == 0
    assert "WARNING: placement=all offloaded nothing" in capsys.readouterr().out



# ---------------------------------------------------------------------------------------------
# 6. Conv1d (as a conv2d of height 1) and the 1-D global mean

def test_conv1d_bias_relu_offloaded(tmp_path):
    rng = _rng(9)
    inits = {"W": rng.standard_normal((8, 4, 3)).astype(np.float32), "B": rng.standard_normal(8).astype(np.float32)}
    nodes = [helper.make_node("Conv", ["x", "W", "B"], ["y"], pads=[1, 2], strides=[2], dilations=[2]),
             helper.make_node("Relu", ["y"], ["z"])]
    model = make_model(nodes, {"x": (2, 4, 20)}, {"z": (2, 8, 10)}, inits)
    lib = check_against_ort(model, {"x": rng.standard_normal((2, 4, 20)).astype(np.float32)}, tmp_path)
    assert [r["name"] for r in lib.report.regions] == ["qpu.conv1d_bias_relu"], lib.report.text()
    assert cpu_ops(lib) == [], lib.report.text()
    spec = lib.regions[0].match.spec
    assert spec.inputs[0][0] == (2, 4, 1, 20) and spec.attrs["padding"] == (0, 1, 0, 2)


def test_depthwise_conv1d_offloaded(tmp_path):
    rng = _rng(10)
    inits = {"W": rng.standard_normal((6, 1, 5)).astype(np.float32)}
    nodes = [helper.make_node("Conv", ["x", "W"], ["y"], pads=[2, 2], group=6)]
    model = make_model(nodes, {"x": (1, 6, 32)}, {"y": (1, 6, 32)}, inits)
    lib = check_against_ort(model, {"x": rng.standard_normal((1, 6, 32)).astype(np.float32)}, tmp_path)
    assert [r["name"] for r in lib.report.regions] == ["qpu.conv1d"], lib.report.text()


@pytest.mark.parametrize("node,out", [
    (lambda: helper.make_node("GlobalAveragePool", ["x"], ["y"]), (2, 8, 1)),
    (lambda: helper.make_node("ReduceMean", ["x"], ["y"], axes=[-1], keepdims=0), (2, 8)),
])
def test_1d_global_mean_offloaded(node, out, tmp_path):
    rng = _rng(11)
    model = make_model([node()], {"x": (2, 8, 50)}, {"y": out}, {})
    lib = check_against_ort(model, {"x": rng.standard_normal((2, 8, 50)).astype(np.float32)}, tmp_path,
                            rtol=1e-5, atol=1e-6)
    assert [r["kind"] for r in lib.report.regions] == ["global_avg_pool2d"], lib.report.text()
    assert lib.regions[0].match.spec.inputs[0][0] == (1, 16, 1, 50)


def test_mean_over_leading_axis_stays_on_cpu(tmp_path):
    model = make_model([helper.make_node("ReduceMean", ["x"], ["y"], axes=[1], keepdims=1)], {"x": (2, 8, 5)},
                       {"y": (2, 1, 5)}, {})
    with pytest.warns(QpuWarning, match="offloaded nothing"):
        lib = check_against_ort(model, {"x": _rng(12).standard_normal((2, 8, 5)).astype(np.float32)}, tmp_path)
    assert not lib.regions
    assert "not over the trailing axes" in lib.report.cpu_ops[0]["reason"], lib.report.text()


# ---------------------------------------------------------------------------------------------
# 5. the dedicated depthwise kernel (codegen/kernels/depthwise.py)

def _dw_reference(x, w, b, strides, pads, dil, act):
    """numpy from the definition (float64): zero-padded input, one channel per group."""
    N, C, H, W = x.shape
    _, _, KH, KW = w.shape
    pt, pl, pb, pr = pads
    xp = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (pt, pb), (pl, pr)))
    OH = (H + pt + pb - dil[0] * (KH - 1) - 1) // strides[0] + 1
    OW = (W + pl + pr - dil[1] * (KW - 1) - 1) // strides[1] + 1
    out = np.zeros((N, C, OH, OW))
    for oh in range(OH):
        for ow in range(OW):
            win = xp[:, :, oh * strides[0]: oh * strides[0] + dil[0] * (KH - 1) + 1: dil[0],
                     ow * strides[1]: ow * strides[1] + dil[1] * (KW - 1) + 1: dil[1]]
            out[:, :, oh, ow] = (win * w[None, :, 0].astype(np.float64)).sum(axis=(2, 3))
    if b is not None:
        out += b.reshape(1, C, 1, 1)
    if act == "relu":
        out = np.maximum(out, 0)
    elif act is not None:
        out = np.clip(out, act[1], act[2])
    return out.astype(np.float32)


DW_CASES = [  # N, C, H, W, KH, KW, strides, pads (t, l, b, r), dilation, bias, activation
    (1, 3, 8, 8, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), False, None),
    (2, 5, 7, 9, 3, 3, (2, 2), (1, 1, 1, 1), (1, 1), True, ("clip", 0.0, 6.0)),
    (1, 20, 5, 5, 3, 3, (1, 1), (0, 0, 0, 0), (1, 1), True, "relu"),         # more planes than QPUs
    (1, 3, 11, 6, 2, 3, (1, 2), (0, 2, 1, 0), (2, 1), False, None),           # asymmetric, dilated
    (1, 2, 20, 37, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), True, None),           # rows of > 16 outputs
    (1, 4, 9, 9, 1, 5, (1, 1), (0, 2, 0, 2), (1, 1), False, None),
]


@pytest.mark.parametrize("case", DW_CASES)
def test_depthwise_kernel_matches_numpy(dev, case):
    from tvm_qpu.codegen.kernels import depthwise as DW
    from tvm_qpu.codegen.plan import run_plan
    N, C, H, W, KH, KW, st, pads, dil, bias, act = case
    rng = _rng(13)
    x = (3 * rng.standard_normal((N, C, H, W))).astype(np.float32)
    w = rng.standard_normal((C, 1, KH, KW)).astype(np.float32)
    b = rng.standard_normal(C).astype(np.float32) if bias else None
    s = DW.DwShape(N, C, H, W, KH, KW, *st, *pads, *dil, bias, act)
    out, _ = run_plan(DW.plan_depthwise(s, w, b), dev, data=x)
    want = _dw_reference(x, w, b, st, pads, dil, act)
    assert out.shape == want.shape
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)


def test_depthwise_programs_have_no_hazards():
    from tvm_qpu.codegen.hazards import check_program
    from tvm_qpu.codegen.kernels import depthwise as DW
    for case in DW_CASES:
        N, C, H, W, KH, KW, st, pads, dil, bias, act = case
        words, _ = DW.kernel_program(DW.DwShape(N, C, H, W, KH, KW, *st, *pads, *dil, bias, act))
        assert check_program(words) == [], case


def test_depthwise_limits_are_refused_with_reasons():
    from tvm_qpu.codegen.kernels import depthwise as DW
    with pytest.raises(ValueError, match="25 taps"):
        DW.check(DW.DwShape(1, 4, 9, 9, 5, 5))
    with pytest.raises(ValueError, match="out of registers"):
        DW.check(DW.DwShape(1, 4, 40, 40, 5, 3, bias=True, activation=("clip", 0.0, 6.0)))


def test_mobilenet_depthwise_block_uses_the_depthwise_kernel(tmp_path):
    """Depthwise Conv + bias + ReLU6 (MobileNetV2): fused, planned on the depthwise kernel, = ORT."""
    rng = _rng(14)
    C = 24
    inits = {"W": rng.standard_normal((C, 1, 3, 3)).astype(np.float32), "B": rng.standard_normal(C).astype(np.float32)}
    nodes = [helper.make_node("Conv", ["x", "W", "B"], ["y"], pads=[1, 1, 1, 1], strides=[2, 2], group=C),
             _clip_node(13, "y", "z", inits=inits)]
    model = make_model(nodes, {"x": (1, C, 14, 14)}, {"z": (1, C, 7, 7)}, inits)
    lib = check_against_ort(model, {"x": (2 * rng.standard_normal((1, C, 14, 14))).astype(np.float32)}, tmp_path)
    assert [r["name"] for r in lib.report.regions] == ["qpu.conv2d_bias_clip"], lib.report.text()
    assert lib.regions[0].plan.name == "depthwise_conv2d"
    assert cpu_ops(lib) == [], lib.report.text()


def test_mobilenetv2_inverted_residual_block(tmp_path):
    """1x1 expand + ReLU6, 3x3 depthwise + ReLU6, 1x1 project, residual add (PyTorch export form):
    three QPU regions with the clips fused, and the residual add a fourth (the add kernel)."""
    rng = _rng(15)
    C, E, H = 8, 48, 12
    inits = {"W1": (rng.standard_normal((E, C, 1, 1)) / np.sqrt(C)).astype(np.float32),
             "B1": rng.standard_normal(E).astype(np.float32),
             "W2": rng.standard_normal((E, 1, 3, 3)).astype(np.float32) / 3,
             "B2": rng.standard_normal(E).astype(np.float32),
             "W3": (rng.standard_normal((C, E, 1, 1)) / np.sqrt(E)).astype(np.float32),
             "B3": rng.standard_normal(C).astype(np.float32),
             "lo": np.array(0, np.float32), "hi": np.array(6, np.float32)}
    nodes = [helper.make_node("Conv", ["x", "W1", "B1"], ["e"]),
             helper.make_node("Clip", ["e", "lo", "hi"], ["e6"]),
             helper.make_node("Conv", ["e6", "W2", "B2"], ["d"], pads=[1, 1, 1, 1], group=E),
             helper.make_node("Clip", ["d", "lo", "hi"], ["d6"]),
             helper.make_node("Conv", ["d6", "W3", "B3"], ["p"]),
             helper.make_node("Add", ["x", "p"], ["y"])]
    model = make_model(nodes, {"x": (1, C, H, H)}, {"y": (1, C, H, H)}, inits)
    lib = check_against_ort(model, {"x": rng.standard_normal((1, C, H, H)).astype(np.float32)}, tmp_path)
    assert [r["name"] for r in lib.report.regions] == ["qpu.conv2d_bias_clip", "qpu.conv2d_bias_clip",
                                                      "qpu.conv2d_bias", "qpu.add"], lib.report.text()
    assert cpu_ops(lib) == [], lib.report.text()
    assert [r.plan.name for r in lib.regions][1] == "depthwise_conv2d"


# ---------------------------------------------------------------------------------------------
# 6. a large strided kernel (the 7x7 stride-2 stem) as a stride-1 conv over the space-to-depth

@pytest.mark.parametrize("C,H,k,stride,pad", [(3, 32, 7, 2, 3), (2, 24, 6, 2, 2), (3, 20, 11, 4, 2)])
def test_large_strided_conv_runs_as_space_to_depth(C, H, k, stride, pad, tmp_path):
    rng = _rng(16)
    O = 8
    OH = (H + 2 * pad - k) // stride + 1
    inits = {"W": (rng.standard_normal((O, C, k, k)) / k).astype(np.float32), "B": rng.standard_normal(O).astype(np.float32)}
    nodes = [helper.make_node("Conv", ["x", "W", "B"], ["y"], pads=[pad] * 4, strides=[stride, stride]),
             helper.make_node("Relu", ["y"], ["z"])]
    model = make_model(nodes, {"x": (1, C, H, H)}, {"z": (1, O, OH, OH)}, inits)
    lib = check_against_ort(model, {"x": rng.standard_normal((1, C, H, H)).astype(np.float32)}, tmp_path)
    assert [r["name"] for r in lib.report.regions] == ["qpu.conv2d_bias_relu"], lib.report.text()
    spec = lib.regions[0].match.spec
    assert spec.inputs[0][0] == (1, C * stride * stride, H // stride, H // stride), spec.describe()
    assert spec.attrs["strides"] == (1, 1)


def test_resnet_stem_is_supported_in_space_to_depth_form():
    """The 224x224 7x7 stride-2 stem: refused directly (registers), taken as 4x4 taps over 12 channels."""
    from tvm_qpu.backend import QpuBackend
    from tvm_qpu.codegen import registry
    from tvm_qpu.patterns import Match, RuntimeInput, _spec, _space_to_depth_form
    w = _rng(17).standard_normal((64, 3, 7, 7)).astype(np.float32)
    spec = _spec("conv2d", ["data", "weight"], [((1, 3, 224, 224), "float32"), ((64, 3, 7, 7), "float32")],
                 ((1, 64, 112, 112), "float32"),
                 {"strides": (2, 2), "padding": (3, 3, 3, 3), "dilation": (1, 1), "groups": 1, "layout": "NCHW",
                  "bias": False, "activation": None, "out_dtype": "float32"})
    assert not registry.supports(spec)[0]
    m = Match(spec, {"weight": w}, [RuntimeInput("data", None)])
    alt = _space_to_depth_form(m, None)
    assert alt.spec.inputs[1][0] == (64, 12, 4, 4) and alt.spec.attrs["padding"] == (2, 2, 1, 1)
    m.alternatives.append(alt)
    chosen, ok, _ = QpuBackend(placement="all").choose_form(m)
    assert ok and chosen is alt
