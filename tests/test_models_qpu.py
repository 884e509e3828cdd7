"""Every bundled model built for the qpu target with every supported op offloaded (placement
"all", real kernels on the emulator) equals the llvm-only build: fp32 within FP32_ATOL, integer
models exactly; and the digits CNN keeps its recorded accuracy on the whole bundled test split."""
import numpy as np
import onnx
import pytest

import tvm_qpu
from frontend_util import MODELS, sample

FP32_ATOL = 1e-4           # QPU fp32 sums in a different order than the CPU
#: models whose offloaded ops are integer (their logits must be bit-identical to llvm's)
EXACT = {"digits_cnn_int"}
NAMES = ["digits_cnn", "digits_cnn_batch", "lenet5", "mlp", "transformer_layer", "digits_cnn_qdq", "digits_cnn_int"]


def _run(name, target, x, placement="all"):
    mod, params = tvm_qpu.from_onnx(MODELS / f"{name}.onnx", {"input": list(x.shape)})
    lib = tvm_qpu.build(mod, target=target, params=params, placement=placement if target == "qpu" else "none")
    runner = lib.runner("emulator")
    try:
        return next(iter(runner.run(input=x).values())), [r.info.kind for r in lib.regions]
    finally:
        runner.close()


@pytest.mark.parametrize("name", NAMES)
def test_qpu_build_equals_llvm_build(name):
    x = sample(name)
    got, kinds = _run(name, "qpu", x)
    want, _ = _run(name, "llvm", x)
    assert kinds, f"{name}: nothing was offloaded"
    assert got.shape == want.shape and got.dtype == want.dtype
    if name in EXACT:
        np.testing.assert_array_equal(got, want)
    else:
        np.testing.assert_allclose(got, want, rtol=0, atol=FP32_ATOL)


def test_digits_cnn_keeps_its_accuracy_on_the_qpu():
    d = np.load(MODELS / "digits_test.npz")
    x, y = d["x"], d["y"]
    doc = onnx.load(str(MODELS / "digits_cnn.onnx")).doc_string      # "... test accuracy 0.9778 on ..."
    recorded = float(doc.split("accuracy")[-1].split()[0])
    logits, kinds = _run("digits_cnn_batch", "qpu", x)
    assert {"conv2d", "matmul"} <= set(kinds)
    acc = float((logits.argmax(-1) == y).mean())
    cpu, _ = _run("digits_cnn_batch", "llvm", x)
    assert (logits.argmax(-1) == cpu.argmax(-1)).all()
    assert acc > 0.95
    assert acc == pytest.approx(recorded, abs=5e-5)            # recorded with 4 decimals
