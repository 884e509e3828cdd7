"""Every model in models/: the llvm-only build (through an artifact) equals onnxruntime; the qpu
build equals onnxruntime with the test-double kernels offloading everything they can, and with the
real registry (cost placement); the built executable also runs in a plain relax.VirtualMachine."""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("tvm")
ort = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed")

import qpu_doubles as D  # noqa: E402
from frontend_util import MODELS, sample  # noqa: E402

import tvm_qpu  # noqa: E402

NAMES = ["digits_cnn", "digits_cnn_batch", "digits_cnn_qdq", "digits_cnn_int", "lenet5", "mlp", "transformer_layer"]
# regions the doubles take with placement="all" (kinds, in graph order)
EXPECTED_ALL = {
    "digits_cnn": ["conv2d", "max_pool2d", "conv2d", "max_pool2d", "matmul"],
    "digits_cnn_batch": ["conv2d", "max_pool2d", "conv2d", "max_pool2d", "matmul"],
    "digits_cnn_int": ["matmul", "max_pool2d", "matmul", "max_pool2d", "matmul"],
    "lenet5": ["conv2d", "avg_pool2d", "conv2d", "avg_pool2d", "matmul", "matmul", "matmul"],
    "mlp": ["matmul"] * 3,
    "transformer_layer": ["matmul"] * 3 + ["attention"] + ["matmul"] * 3,
}


def onnxruntime(name, x):
    so = ort.SessionOptions()
    so.log_severity_level = 3
    s = ort.InferenceSession(str(MODELS / f"{name}.onnx"), so, providers=["CPUExecutionProvider"])
    return s.run(None, {"input": x})[0]


def _close(got, want, name):
    assert got.shape == want.shape and got.dtype == want.dtype
    if name in ("digits_cnn_qdq", "digits_cnn_int"):
        # requantisation ties may round one step differently; logits must agree on the class
        np.testing.assert_allclose(got, want, rtol=0, atol=0.05)
        assert (got.argmax(-1) == want.argmax(-1)).all()
    else:
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)


@pytest.mark.parametrize("name", NAMES)
def test_llvm_build_matches_onnxruntime(name, tmp_path):
    x = sample(name)
    mod, params = tvm_qpu.from_onnx(MODELS / f"{name}.onnx")
    lib = tvm_qpu.build(mod, target="llvm", params=params)
    assert not lib.regions and lib.report.placement == "none"
    runner = tvm_qpu.load(lib.save(tmp_path / "m.tar"))
    try:
        out = runner.run(input=x)
    finally:
        runner.close()
    assert list(out) == [o["name"] for o in lib.meta["outputs"]]
    _close(next(iter(out.values())), onnxruntime(name, x), name)


@pytest.mark.parametrize("name", NAMES)
def test_qpu_build_with_doubles_matches_onnxruntime(name, tmp_path, monkeypatch):
    D.install(monkeypatch)
    x = sample(name)
    mod, params = tvm_qpu.from_onnx(MODELS / f"{name}.onnx", {"input": list(x.shape)})  # static batch
    lib = tvm_qpu.build(mod, target="qpu", placement="all", params=params)
    kinds = [r.info.kind for r in lib.regions]
    if name in EXPECTED_ALL:
        assert kinds == EXPECTED_ALL[name], lib.report.text()
    assert kinds, "the doubles should take some op of every model"
    dev = D.DoubleDevice()
    runner = tvm_qpu.load(lib.save(tmp_path / "m.tar"), device=dev)
    try:
        out = next(iter(runner.run(input=x).values()))
        prof = runner.profile({"input": x}, repeat=2)
    finally:
        runner.close()
    assert dev.executions >= len(kinds)
    _close(out, onnxruntime(name, x), name)
    assert len(prof.regions) == len(set(r.key for r in lib.regions))
    assert all(r["calls_per_run"] >= 1 and r["qpu_seconds"] > 0 and r["host_seconds"] > 0 for r in prof.regions)


@pytest.mark.parametrize("name", NAMES)
def test_qpu_build_on_real_registry_matches_onnxruntime(name):
    """Cost placement with whatever real kernels exist (none yet: then everything is on the CPU)."""
    x = sample(name)
    mod, params = tvm_qpu.from_onnx(MODELS / f"{name}.onnx")
    lib = tvm_qpu.build(mod, params=params)
    runner = lib.runner("emulator" if lib.regions else "auto")
    try:
        _close(next(iter(runner.run(input=x).values())), onnxruntime(name, x), name)
    finally:
        runner.close()


def test_plain_relax_vm_runs_built_executable(monkeypatch):
    """No Runner: tvm.relax.VirtualMachine on the executable, plans served by tvm_qpu.run_plan."""
    import tvm
    from tvm import relax
    from tvm_qpu.executor import PlanExecutor
    D.install(monkeypatch)
    x = sample("mlp")
    mod, params = tvm_qpu.from_onnx(MODELS / "mlp.onnx")
    lib = tvm_qpu.build(mod, placement="all", params=params)
    assert "tvm_qpu.submit_plan" in lib.relax_module.script()     # asynchronous regions (default)
    ex = PlanExecutor(D.DoubleDevice())
    for r in lib.regions:
        ex.add(r.plan, r.info)
    try:
        out = relax.VirtualMachine(lib.executable, tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy()
    finally:
        ex.close()
    _close(out, onnxruntime("mlp", x), "mlp")


def test_region_not_loaded_is_a_clear_error(monkeypatch):
    import tvm
    from tvm import relax
    D.install(monkeypatch)
    mod, params = tvm_qpu.from_onnx(MODELS / "mlp.onnx")
    lib = tvm_qpu.build(mod, placement="all", params=params)
    from tvm_qpu import executor
    for r in lib.regions:
        executor._OWNERS.pop(r.key, None)
    vm = relax.VirtualMachine(lib.executable, tvm.cpu())
    with pytest.raises(Exception, match="not loaded in this process"):
        vm["main"](tvm.runtime.tensor(sample("mlp")))


def test_from_onnx_errors(tmp_path):
    with pytest.raises(tvm_qpu.QpuError, match="no such file"):
        tvm_qpu.from_onnx(tmp_path / "missing.onnx")
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08\x07 this is not protobuf")
    with pytest.raises(tvm_qpu.QpuError, match="not a valid ONNX model"):
        tvm_qpu.from_onnx(bad)
    with pytest.raises(tvm_qpu.QpuError, match="unknown input"):
        tvm_qpu.from_onnx(MODELS / "mlp.onnx", {"nope": [1, 64]})


def test_input_shapes_override_batch():
    mod, params = tvm_qpu.from_onnx(MODELS / "digits_cnn_batch.onnx", {"input": [3, 1, 8, 8]})
    lib = tvm_qpu.build(mod, target="llvm", params=params)
    assert lib.meta["inputs"] == [{"name": "input", "shape": [3, 1, 8, 8], "dtype": "float32"}]


def test_build_needs_params_when_weights_are_inputs():
    mod, _ = tvm_qpu.from_onnx(MODELS / "mlp.onnx")
    with pytest.raises(tvm_qpu.QpuError, match="params="):
        tvm_qpu.build(mod)


def test_unknown_target():
    mod, params = tvm_qpu.from_onnx(MODELS / "mlp.onnx")
    with pytest.raises(tvm_qpu.QpuError, match="unknown target"):
        tvm_qpu.build(mod, target="cuda", params=params)
