#!/usr/bin/env python3
"""Mixed-precision variants of the digits CNN: 8-, 4- and 2-bit weights, 8-bit activations (QDQ).

Writes ``digits_cnn_w8.onnx``, ``digits_cnn_w4.onnx``, ``digits_cnn_w2.onnx`` and the mixed-precision
``digits_cnn_w842.onnx`` (conv1 8-bit, conv2 4-bit, fc 2-bit; :data:`VARIANTS`) from the trained
float model ``models/digits_cnn.onnx`` (its initializers; nothing is retrained or downloaded):

* weights: per output channel (Conv axis 0, Gemm ``transB`` weight [10, 64] axis 0), symmetric
  (zero point 0), stored as ONNX INT8 / INT4 (opset 21) / INT2 (opset 25, the first opset whose
  ``DequantizeLinear`` takes 2-bit types). Each channel's scale minimizes the squared weight error
  over clipping ratios 0.30 .. 1.00 of max|w| (71 steps; ratio 1.00 is plain max-abs scaling):
  ``s = ratio * max|w| / qmax``, ``q = clip(round_half_even(w / s), qmin, qmax)`` with the type's
  full range (int2: -2 .. 1);
* activations: int8, zero point 0 (symmetric, as the bundled ``digits_cnn_qdq``), scale
  ``max / 127`` over the digits TRAIN split (1347 images, ``make_models.load_digits_split``) run
  through the float model, so the test split stays unseen;
* biases: int32, scale ``s_x * s_w`` per channel, zero point 0 (what the QDQ rewrite puts on the
  int32 accumulator).

The graph is the QDQ form of ``digits_cnn``: Q -> DQ -> Conv(+bias) -> Relu -> Q -> DQ -> MaxPool ->
Q -> DQ -> Conv -> Relu -> Q -> DQ -> MaxPool -> Q -> DQ -> Flatten -> Gemm(+bias) -> float logits.
Each written model is checked against a numpy reference of its own integer arithmetic (ONNX Runtime,
when installed) and its test-split accuracy is printed and recorded in its ``doc_string``.

Usage::

    python models/make_lowbit_models.py [--out models/] [--only NAME ...]
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

HERE = os.path.dirname(os.path.abspath(__file__))
#: weight bits -> (numpy storage dtype name (ml_dtypes for 4 / 2 bits), opset, qmin, qmax); numpy_helper
#: writes the ml_dtypes arrays as packed ONNX INT4 / INT2 raw_data
WEIGHT_TYPES = {8: ("int8", 21, -128, 127), 4: ("int4", 21, -8, 7), 2: ("int2", 25, -2, 1)}
#: variant -> weight bits of (conv1, conv2, fc). The mixed one (PULP-NN style: one layer at each
#: width) keeps the 72-weight first conv at 8 bits, conv2 at 4 and the classifier at 2; chosen
#: among the 27 combinations by bytes and TRAINING-split accuracy (0.9555 at 808 weight bytes;
#: all-4-bit: 0.9993 at 932, all-2-bit: 0.7929 at 466), not by the test split
VARIANTS = {"digits_cnn_w8": (8, 8, 8), "digits_cnn_w4": (4, 4, 4), "digits_cnn_w2": (2, 2, 2),
            "digits_cnn_w842": (8, 4, 2)}
#: clipping ratios of max|w| searched per channel (1.0 = max-abs scaling)
CLIP_RATIOS = np.linspace(0.30, 1.00, 71)
ACT_QMAX = 127                 # int8 activations, zero point 0 (see the module docstring)


def _np_dtype(name):
    if name == "int8":
        return np.int8
    import ml_dtypes
    return getattr(ml_dtypes, name)


def float_weights(path=os.path.join(HERE, "digits_cnn.onnx")):
    m = onnx.load(path)
    return {t.name: numpy_helper.to_array(t).astype(np.float32) for t in m.graph.initializer}


def channel_scales(w, qmin, qmax):
    """Per-output-channel (axis 0) scales minimizing the squared quantization error (float32)."""
    flat = w.reshape(len(w), -1).astype(np.float64)
    amax = np.abs(flat).max(axis=1)
    amax = np.where(amax > 0, amax, 1.0)
    best_s, best_e = None, None
    for r in CLIP_RATIOS:
        s = (r * amax / qmax)[:, None]
        e = ((np.clip(np.rint(flat / s), qmin, qmax) * s - flat) ** 2).sum(axis=1)
        if best_s is None:
            best_s, best_e = s[:, 0].copy(), e
        else:
            better = e < best_e
            best_s[better], best_e[better] = s[better, 0], e[better]
    return best_s.astype(np.float32)


def quantize_weight(w, s, qmin, qmax):
    shape = (-1,) + (1,) * (w.ndim - 1)
    return np.clip(np.rint(w / s.reshape(shape)), qmin, qmax).astype(np.int8)


def _conv(x, w, b):
    sys.path.insert(0, HERE)
    import make_models as mm
    cols, sh = mm._im2col(x, 3, 1)
    n, _, _, _, ho, wo = sh
    return (cols @ w.reshape(len(b), -1).T + b).reshape(n, ho, wo, -1).transpose(0, 3, 1, 2)


def _pool(t):
    n, c, h, w = t.shape
    return t.reshape(n, c, h // 2, 2, w // 2, 2).max(axis=(3, 5))


def activation_scales(fw, xtr):
    """int8 scales (max / 127) of the input and the two ReLU outputs over the training split."""
    r1 = np.maximum(_conv(xtr, fw["conv1.weight"], fw["conv1.bias"]), 0)
    r2 = np.maximum(_conv(_pool(r1), fw["conv2.weight"], fw["conv2.bias"]), 0)
    return {k: np.float32(float(v.max()) / ACT_QMAX) for k, v in (("x", xtr), ("a1", r1), ("a2", r2))}


def _q(x, s):
    """QuantizeLinear to int8, zero point 0 (float32 divide, round half to even, saturate)."""
    return np.clip(np.rint(x.astype(np.float32) / np.float32(s)), -128, ACT_QMAX).astype(np.int64)


def reference(x, p):
    """Numpy reference of the QDQ model, written from the ONNX operator definitions (DQ(w) = w * s
    in float32, float32 conv / gemm, Q = saturate(round_half_even(y / s)))."""
    f = np.float32
    xd = _q(x, p["sx"]).astype(f) * p["sx"]
    w1 = p["w1"].astype(f) * p["sw1"][:, None, None, None]
    b1 = p["b1"].astype(f) * (p["sx"] * p["sw1"])
    a1 = _q(np.maximum(_conv(xd, w1, b1), 0), p["sa1"]).astype(f) * p["sa1"]
    p1 = _pool(a1)
    w2 = p["w2"].astype(f) * p["sw2"][:, None, None, None]
    b2 = p["b2"].astype(f) * (p["sa1"] * p["sw2"])
    a2 = _q(np.maximum(_conv(p1, w2, b2), 0), p["sa2"]).astype(f) * p["sa2"]
    flat = _pool(a2).reshape(len(x), -1)
    w3 = p["w3"].astype(f) * p["sw3"][:, None]
    b3 = p["b3"].astype(f) * (p["sa2"] * p["sw3"])
    return flat @ w3.T + b3


def quant_params(fw, s, layer_bits):
    """Quantized weights / biases and scales; ``layer_bits``: weight bits of conv1, conv2, fc."""
    p = {"sx": s["x"], "sa1": s["a1"], "sa2": s["a2"]}
    for i, (wn, bn, sin) in enumerate((("conv1.weight", "conv1.bias", "x"), ("conv2.weight", "conv2.bias", "a1"),
                                       ("fc.weight", "fc.bias", "a2")), 1):
        _, _, qmin, qmax = WEIGHT_TYPES[layer_bits[i - 1]]
        sw = channel_scales(fw[wn], qmin, qmax)
        p[f"w{i}"] = quantize_weight(fw[wn], sw, qmin, qmax)
        p[f"sw{i}"] = sw
        p[f"b{i}"] = np.rint(fw[bn] / (s[sin] * sw)).astype(np.int32)
    return p


def graph(p, layer_bits, name):
    opset = max(WEIGHT_TYPES[b][1] for b in layer_bits)
    N = helper.make_node
    nodes, inits = [], []

    def qdq(src, scale, name):
        nodes.append(N("QuantizeLinear", [src, scale, "zp_act"], [f"{name}_q"], name=f"{name}_quant"))
        nodes.append(N("DequantizeLinear", [f"{name}_q", scale, "zp_act"], [f"{name}_dq"], name=f"{name}_dequant"))
        return f"{name}_dq"

    def weight(i, name, axis=0):
        w = p[f"w{i}"]
        etype = WEIGHT_TYPES[layer_bits[i - 1]][0]
        inits.append(numpy_helper.from_array(w.astype(_np_dtype(etype)), f"{name}.weight_q"))
        inits.append(numpy_helper.from_array(p[f"sw{i}"], f"{name}.weight_scale"))
        nodes.append(N("DequantizeLinear", [f"{name}.weight_q", f"{name}.weight_scale"], [f"{name}.weight"],
                       axis=axis, name=f"{name}_w_dequant"))
        inits.append(numpy_helper.from_array(p[f"b{i}"], f"{name}.bias_q"))
        inits.append(numpy_helper.from_array((p[f"sw{i}"] * np.float32(p[{1: "sx", 2: "sa1", 3: "sa2"}[i]]))
                                             .astype(np.float32), f"{name}.bias_scale"))
        nodes.append(N("DequantizeLinear", [f"{name}.bias_q", f"{name}.bias_scale"], [f"{name}.bias"], axis=0,
                       name=f"{name}_b_dequant"))

    inits += [numpy_helper.from_array(np.array(0, np.int8), "zp_act")]
    for k in ("sx", "sa1", "sa2"):
        inits.append(numpy_helper.from_array(np.array(p[k], np.float32), k))
    x = qdq("input", "sx", "x")
    weight(1, "conv1")
    nodes.append(N("Conv", [x, "conv1.weight", "conv1.bias"], ["conv1"], kernel_shape=[3, 3], pads=[1, 1, 1, 1],
                   name="conv1"))
    nodes.append(N("Relu", ["conv1"], ["relu1"], name="relu1"))
    nodes.append(N("MaxPool", [qdq("relu1", "sa1", "a1")], ["pool1"], kernel_shape=[2, 2], strides=[2, 2],
                   name="pool1"))
    weight(2, "conv2")
    nodes.append(N("Conv", [qdq("pool1", "sa1", "p1"), "conv2.weight", "conv2.bias"], ["conv2"],
                   kernel_shape=[3, 3], pads=[1, 1, 1, 1], name="conv2"))
    nodes.append(N("Relu", ["conv2"], ["relu2"], name="relu2"))
    nodes.append(N("MaxPool", [qdq("relu2", "sa2", "a2")], ["pool2"], kernel_shape=[2, 2], strides=[2, 2],
                   name="pool2"))
    nodes.append(N("Flatten", [qdq("pool2", "sa2", "p2")], ["flat"], axis=1, name="flatten"))
    weight(3, "fc")
    nodes.append(N("Gemm", ["flat", "fc.weight", "fc.bias"], ["logits"], transB=1, name="fc"))
    g = helper.make_graph(nodes, name,
                          [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 1, 8, 8])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 10])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)], producer_name="tvm-qpu")


def ort_session(model):
    """(ONNX Runtime session, optimization level) of ``model``: ORT_ENABLE_ALL, or ORT_ENABLE_BASIC
    when the full level cannot load it (ORT 1.32 fuses a uint8-activation DQ -> Conv with 2-bit
    weights into QLinearConv, which takes none: "Type 'tensor(int2)' ... of operator (QLinearConv)
    ... is invalid"; the int8-activation models here load at the full level); None without
    onnxruntime."""
    try:
        import onnxruntime as ort
    except ImportError:
        return None, None
    for level in (ort.GraphOptimizationLevel.ORT_ENABLE_ALL, ort.GraphOptimizationLevel.ORT_ENABLE_BASIC):
        so = ort.SessionOptions()
        so.log_severity_level = 4
        so.graph_optimization_level = level
        try:
            return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"]), level.name
        except Exception as e:          # noqa: BLE001 - the next level is tried, the last error raised
            err = e
    raise err


def ort_logits(model, x):
    s, _ = ort_session(model)
    if s is None:
        return None
    return np.concatenate([s.run(None, {"input": x[i:i + 1]})[0] for i in range(len(x))])


def make(out, names=None):
    """Write the :data:`VARIANTS` ``names`` (default: all) into ``out``; returns {name: accuracy}."""
    sys.path.insert(0, HERE)
    import make_models as mm
    xtr, _, xte, yte = mm.load_digits_split()
    fw = float_weights()
    s = activation_scales(fw, xtr)
    results = {}
    for name in names or VARIANTS:
        layer_bits = VARIANTS[name]
        p = quant_params(fw, s, layer_bits)
        ref = reference(xte, p)
        acc = float((ref.argmax(1) == yte).mean())
        model = graph(p, layer_bits, name)
        ortl = ort_logits(model, xte)
        line = f"numpy reference accuracy {acc:.4f}"
        if ortl is not None:
            diff = float(np.abs(ortl - ref).max())
            ort_acc = float((ortl.argmax(1) == yte).mean())
            line += f", onnxruntime {ort_acc:.4f} (max |ORT - numpy| {diff:.2g})"
            acc = ort_acc
        what = (f"{layer_bits[0]}-bit weights" if len(set(layer_bits)) == 1 else
                f"mixed-precision weights (conv1 / conv2 / fc: {' / '.join(map(str, layer_bits))} bits)")
        model.doc_string = (f"digits CNN, {what} (per output channel, symmetric, MSE-clipped scales), "
                            f"int8 activations calibrated on the digits train split; QDQ, opset "
                            f"{model.opset_import[0].version}. Test accuracy {acc:.4f} on digits_test.npz")
        onnx.checker.check_model(model, full_check=True)
        path = os.path.join(out, f"{name}.onnx")
        onnx.save(model, path)
        print(f"[{name}] {path}: {os.path.getsize(path)} bytes; {line}")
        results[name] = acc
    return results


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=HERE)
    ap.add_argument("--only", nargs="+", choices=sorted(VARIANTS), help="only these variants (default: all)")
    a = ap.parse_args(argv)
    os.makedirs(a.out, exist_ok=True)
    make(a.out, a.only)
    return 0


if __name__ == "__main__":
    sys.exit(main())
