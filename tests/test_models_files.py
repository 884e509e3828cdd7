"""The committed ONNX models in models/ (made by models/make_models.py).

For each model: it loads and passes onnx.checker; onnxruntime matches a numpy
forward pass written here from the model's initializers; TVM's Relax ONNX
frontend imports it, and the llvm build run by the Relax VM matches
onnxruntime.  The digits models keep their recorded test accuracy on
models/digits_test.npz.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

MODELS_DIR = Path(__file__).resolve().parent.parent / "models"
DIGITS = ["digits_cnn", "digits_cnn_batch", "digits_cnn_qdq", "digits_cnn_int"]
ALL = DIGITS + ["lenet5", "mlp", "transformer_layer"]
QUANT = {"digits_cnn_qdq", "digits_cnn_int"}


def _path(name):
    return MODELS_DIR / f"{name}.onnx"


@pytest.fixture(scope="module")
def digits():
    d = np.load(MODELS_DIR / "digits_test.npz")
    return d["x"], d["y"]


def _ort():
    try:
        import onnxruntime
    except ImportError:
        pytest.skip("onnxruntime is not installed (pip install onnxruntime)")
    return onnxruntime


_SESSIONS = {}


def ort_run(name, x):
    ort = _ort()
    if name not in _SESSIONS:
        so = ort.SessionOptions()
        so.log_severity_level = 3
        _SESSIONS[name] = ort.InferenceSession(str(_path(name)), so,
                                               providers=["CPUExecutionProvider"])
    return _SESSIONS[name].run(None, {"input": x})[0]


def sample_input(name, digits):
    x, _ = digits
    if name == "lenet5":
        return upscale32(x[:1])
    if name == "mlp":
        return x[:1].reshape(1, 64)
    if name == "transformer_layer":
        return np.random.default_rng(123).standard_normal((1, 16, 32)).astype(np.float32)
    if name == "digits_cnn_batch":
        return x[:7]
    return x[:1]


def upscale32(x):
    return np.kron(x, np.ones((1, 1, 4, 4), np.float32)).astype(np.float32)


def recorded_accuracy(name):
    doc = onnx.load(str(_path(name)), load_external_data=False).doc_string
    m = re.search(r"[Tt]est accuracy (0\.\d+)", doc)
    assert m, f"{name}: no recorded accuracy in doc_string: {doc!r}"
    return float(m.group(1))


# ----------------------------------------------------------------------------
# numpy reference forward passes (independent of make_models.py)


def weights(name):
    m = onnx.load(str(_path(name)))
    return {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}


def conv2d(x, w, b=None, pad=0):
    """NCHW cross-correlation, stride 1, via an explicit loop over kernel offsets."""
    x = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    n, c, h, ww = x.shape
    co, ci, kh, kw = w.shape
    ho, wo = h - kh + 1, ww - kw + 1
    acc_t = np.int64 if np.issubdtype(x.dtype, np.integer) else np.float64
    out = np.zeros((n, co, ho, wo), acc_t)
    for i in range(kh):
        for j in range(kw):
            out += np.einsum("nchw,oc->nohw", x[:, :, i:i + ho, j:j + wo].astype(acc_t),
                             w[:, :, i, j].astype(acc_t))
    if b is not None:
        out += b.reshape(1, -1, 1, 1)
    return out


def pool2(x, kind):
    n, c, h, w = x.shape
    r = x.reshape(n, c, h // 2, 2, w // 2, 2)
    return r.max(axis=(3, 5)) if kind == "max" else r.mean(axis=(3, 5))


def relu(x):
    return np.maximum(x, 0)


def quant(x, scale):
    return np.clip(np.round(np.asarray(x, np.float64) / np.float64(scale)), -128, 127).astype(np.int8)


def ref_digits_cnn(w, x):
    a = pool2(relu(conv2d(x, w["conv1.weight"], w["conv1.bias"], 1)), "max")
    a = pool2(relu(conv2d(a, w["conv2.weight"], w["conv2.bias"], 1)), "max")
    return a.reshape(len(a), -1) @ w["fc.weight"].T.astype(np.float64) + w["fc.bias"]


def ref_lenet5(w, x):
    a = pool2(relu(conv2d(x, w["c1.weight"], w["c1.bias"])), "avg")
    a = pool2(relu(conv2d(a, w["c3.weight"], w["c3.bias"])), "avg")
    a = a.reshape(len(a), -1)
    a = relu(a @ w["f5.weight"].T.astype(np.float64) + w["f5.bias"])
    a = relu(a @ w["f6.weight"].T.astype(np.float64) + w["f6.bias"])
    return a @ w["f7.weight"].T.astype(np.float64) + w["f7.bias"]


def ref_mlp(w, x):
    a = x.astype(np.float64)
    for i in (1, 2, 3):
        a = a @ w[f"fc{i}.weight"].T.astype(np.float64) + w[f"fc{i}.bias"]
        if i < 3:
            a = relu(a)
    return a


def ref_transformer(w, x, heads=4, eps=1e-5):
    b, s, d = x.shape
    hd = d // heads
    x = x.astype(np.float64)

    def split(t):
        return t.reshape(b, s, heads, hd).transpose(0, 2, 1, 3)

    def ln(t, g, beta):
        mu = t.mean(-1, keepdims=True)
        return (t - mu) / np.sqrt(t.var(-1, keepdims=True) + eps) * g + beta

    q, k, v = (split(x @ w[f"W{n}"] + w[f"b{n}"]) for n in "qkv")
    sc = q @ k.transpose(0, 1, 3, 2) / math.sqrt(hd)
    p = np.exp(sc - sc.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    att = (p @ v).transpose(0, 2, 1, 3).reshape(b, s, d) @ w["Wo"] + w["bo"]
    h = ln(x + att, w["ln1_g"], w["ln1_b"])
    f = h @ w["W1"] + w["b1"]
    f = 0.5 * f * (1 + np.vectorize(math.erf)(f / math.sqrt(2)))
    return ln(h + f @ w["W2"] + w["b2"], w["ln2_g"], w["ln2_b"])


def ref_digits_quant(w, x):
    """Integer-exact reference for both int8 digits models (symmetric, zero point 0)."""
    if "conv1.weight_q" in w and w["conv1.weight_q"].ndim == 4:  # QDQ layout
        W1, W2, W3 = w["conv1.weight_q"], w["conv2.weight_q"], w["fc.weight_q"]
        s1, s2, s3 = (float(w[f"{k}.weight_scale"]) for k in ("conv1", "conv2", "fc"))
        sx, sa1, sa2 = (float(w[f"{k}.scale"]) for k in ("x", "a1", "a2"))
        acc_s1, acc_s2, acc_s3 = (float(w[f"{k}.bias_scale"]) for k in ("conv1", "conv2", "fc"))
        assert np.isclose(acc_s1, sx * s1) and np.isclose(acc_s2, sa1 * s2) and np.isclose(acc_s3, sa2 * s3)
    else:  # integer-op layout: weights stored as [C*9, Cout] / [64, 10]
        W1 = w["conv1.weight_q"].T.reshape(8, 1, 3, 3)
        W2 = w["conv2.weight_q"].T.reshape(16, 8, 3, 3)
        W3 = w["fc.weight_q"].T
        sx, sa1, sa2 = (float(w[f"{k}.scale"]) for k in ("x", "a1", "a2"))
        acc_s1, acc_s2, acc_s3 = (float(w[f"{k}.acc_scale"]) for k in ("conv1", "conv2", "fc"))
    xq = quant(x, sx)
    a1 = quant(relu(conv2d(xq, W1, w["conv1.bias_q"], 1).astype(np.float32) * np.float32(acc_s1)), sa1)
    a2 = quant(relu(conv2d(pool2(a1, "max"), W2, w["conv2.bias_q"], 1).astype(np.float32)
                    * np.float32(acc_s2)), sa2)
    f = pool2(a2, "max").reshape(len(x), -1).astype(np.int64)
    return (f @ W3.T.astype(np.int64) + w["fc.bias_q"]).astype(np.float32) * np.float32(acc_s3)


REFS = {
    "digits_cnn": ref_digits_cnn, "digits_cnn_batch": ref_digits_cnn, "lenet5": ref_lenet5,
    "mlp": ref_mlp, "transformer_layer": ref_transformer,
    "digits_cnn_qdq": ref_digits_quant, "digits_cnn_int": ref_digits_quant,
}


# ----------------------------------------------------------------------------
# file checks


@pytest.mark.parametrize("name", ALL)
def test_file_is_valid_onnx(name):
    path = _path(name)
    assert path.exists(), f"{path} missing: run python models/make_models.py"
    assert path.stat().st_size < 1_000_000
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    assert [(o.domain, o.version) for o in model.opset_import] == [("", 17)]
    assert all(n.domain in ("", "ai.onnx") for n in model.graph.node)
    assert [i.name for i in model.graph.input] == ["input"]
    assert len(model.graph.output) == 1
    assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)


def test_digits_test_split(digits):
    x, y = digits
    assert x.dtype == np.float32 and x.shape == (450, 1, 8, 8)
    assert y.dtype == np.int64 and y.shape == (450,)
    assert 0.0 <= x.min() and x.max() <= 1.0 and set(np.unique(y)) == set(range(10))


def test_int_model_uses_only_supported_integer_ops():
    ops = {n.op_type for n in onnx.load(str(_path("digits_cnn_int"))).graph.node}
    assert "MatMulInteger" in ops
    assert not ops & {"Conv", "ConvInteger", "QLinearConv", "QLinearMatMul", "MatMul", "Gemm"}


# ----------------------------------------------------------------------------
# onnxruntime vs numpy


@pytest.mark.parametrize("name", ALL)
def test_onnxruntime_matches_numpy(name, digits):
    x = sample_input(name, digits)
    got = ort_run(name, x)
    want = REFS[name](weights(name), x)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)


@pytest.mark.parametrize("name", ["digits_cnn_batch", "lenet5", "mlp"] + sorted(QUANT))
def test_accuracy_on_digits_test(name, digits):
    x, y = digits
    recorded = recorded_accuracy(name)
    assert recorded > 0.9
    if name == "lenet5":
        x = upscale32(x)
    elif name == "mlp":
        x = x.reshape(len(x), 64)
    # numpy reference over the whole split reproduces the recorded accuracy
    ref_acc = float((REFS[name](weights(name), x).argmax(1) == y).mean())
    assert ref_acc == pytest.approx(recorded, abs=1e-4)
    if name == "digits_cnn_batch":
        pred = ort_run(name, x).argmax(1)
    else:  # batch-1 models
        pred = np.array([ort_run(name, x[i:i + 1]).argmax() for i in range(len(x))])
    assert float((pred == y).mean()) >= recorded - 1e-4


def test_quantized_accuracy_close_to_float():
    f = recorded_accuracy("digits_cnn")
    for name in QUANT:
        assert recorded_accuracy(name) >= f - 0.02


# ----------------------------------------------------------------------------
# TVM Relax (llvm) vs onnxruntime

_VMS = {}


def tvm_vm(name):
    if name not in _VMS:
        tvm = pytest.importorskip("tvm")
        from tvm import relax
        from tvm.relax.frontend.onnx import from_onnx

        mod = from_onnx(onnx.load(str(_path(name))), keep_params_in_input=False)
        mod = relax.transform.FoldConstant()(mod)
        ex = tvm.compile(mod, target="llvm")
        _VMS[name] = (tvm, relax.VirtualMachine(ex, tvm.cpu()))
    return _VMS[name]


def tvm_run(name, x):
    tvm, vm = tvm_vm(name)
    out = vm["main"](tvm.runtime.tensor(np.ascontiguousarray(x)))
    if not hasattr(out, "numpy"):
        out = out[0]
    return out.numpy()


@pytest.mark.parametrize("name", ALL)
def test_tvm_llvm_matches_onnxruntime(name, digits):
    x = sample_input(name, digits)
    want = ort_run(name, x)
    got = tvm_run(name, x)
    assert got.shape == want.shape and got.dtype == want.dtype
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)


@pytest.mark.parametrize("name", ["digits_cnn_batch"] + sorted(QUANT))
def test_tvm_llvm_accuracy_on_digits_test(name, digits):
    x, y = digits
    if name == "digits_cnn_batch":
        got = tvm_run(name, x)
        np.testing.assert_allclose(got, ort_run(name, x), rtol=0, atol=1e-4)
        pred = got.argmax(1)
    else:
        outs = np.concatenate([tvm_run(name, x[i:i + 1]) for i in range(len(x))])
        want = np.concatenate([ort_run(name, x[i:i + 1]) for i in range(len(x))])
        # requantization ties may round differently; allow rare single-step differences
        close = np.abs(outs - want).max(1) <= 1e-4
        assert close.mean() >= 0.99
        pred = outs.argmax(1)
    assert float((pred == y).mean()) >= recorded_accuracy(name) - 0.005
