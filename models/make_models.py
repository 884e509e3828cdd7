#!/usr/bin/env python3
"""Create the small ONNX models tvm-qpu tests and demos with.

Everything is built here from scratch: weights are trained with a tiny numpy
training loop on scikit-learn's bundled 8x8 digits set (no download) or drawn
from fixed-seed random generators, and the graphs are written node by node
with ``onnx.helper`` (opset 17, IR version 8, standard ONNX ops only, no
external data).

Usage::

    python models/make_models.py [--out models/] [--only NAME] [--list]

NAME is one of: digits_cnn (also writes digits_cnn_batch.onnx and
digits_test.npz), lenet5, mlp, transformer_layer, digits_cnn_qdq (also writes
digits_cnn_int.onnx).  The quantized models reuse the trained digits CNN
weights, which are retrained deterministically when needed.

Needs numpy, onnx and scikit-learn (only for ``load_digits``); onnxruntime is
used, when installed, to double-check each written model against the numpy
forward pass.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
IR_VERSION = 8
SPLIT_SEED = 0  # train/test permutation of the digits set
N_TEST = 450  # test split size (of 1797 samples)

# ----------------------------------------------------------------------------
# data


def load_digits_split():
    """The fixed train/test split: x float32 [N,1,8,8] scaled to [0,1], y int64."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images.astype(np.float32) / np.float32(16.0)).reshape(-1, 1, 8, 8)
    y = d.target.astype(np.int64)
    perm = np.random.default_rng(SPLIT_SEED).permutation(len(y))
    te, tr = perm[:N_TEST], perm[N_TEST:]
    return x[tr], y[tr], x[te], y[te]


def upscale32(x):
    """[N,1,8,8] -> [N,1,32,32] nearest-neighbour (each pixel becomes 4x4)."""
    return np.kron(x, np.ones((1, 1, 4, 4), np.float32)).astype(np.float32)


# ----------------------------------------------------------------------------
# numpy forward / backward layers (float32 training)


def _im2col(x, k, pad):
    """x [N,C,H,W] -> cols [N*Ho*Wo, C*k*k] (row order n,ho,wo; column order c,kh,kw)."""
    if pad:
        x = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    n, c, h, w = x.shape
    ho, wo = h - k + 1, w - k + 1
    win = np.lib.stride_tricks.sliding_window_view(x, (k, k), axis=(2, 3))  # N,C,Ho,Wo,k,k
    cols = win.transpose(0, 2, 3, 1, 4, 5).reshape(n * ho * wo, c * k * k)
    return np.ascontiguousarray(cols), (n, c, h, w, ho, wo)


def _col2im(dcols, shape, k, pad):
    n, c, h, w, ho, wo = shape
    d = dcols.reshape(n, ho, wo, c, k, k)
    dx = np.zeros((n, c, h, w), np.float32)
    for i in range(k):
        for j in range(k):
            dx[:, :, i:i + ho, j:j + wo] += d[:, :, :, :, i, j].transpose(0, 3, 1, 2)
    if pad:
        dx = dx[:, :, pad:-pad, pad:-pad]
    return dx


class Conv:
    def __init__(self, rng, cin, cout, k, pad):
        self.k, self.pad = k, pad
        std = np.sqrt(2.0 / (cin * k * k))
        self.W = (rng.standard_normal((cout, cin, k, k)) * std).astype(np.float32)
        self.b = np.zeros(cout, np.float32)

    def params(self):
        return [self.W, self.b]

    def fwd(self, x):
        cols, self.shape = _im2col(x, self.k, self.pad)
        self.cols = cols
        n, _, _, _, ho, wo = self.shape
        out = cols @ self.W.reshape(len(self.b), -1).T + self.b
        return out.reshape(n, ho, wo, -1).transpose(0, 3, 1, 2)

    def bwd(self, g):
        cout = len(self.b)
        gf = g.transpose(0, 2, 3, 1).reshape(-1, cout)
        self.grads = [(gf.T @ self.cols).reshape(self.W.shape), gf.sum(0)]
        return _col2im(gf @ self.W.reshape(cout, -1), self.shape, self.k, self.pad)


class Linear:
    def __init__(self, rng, fin, fout):
        self.W = (rng.standard_normal((fout, fin)) * np.sqrt(2.0 / fin)).astype(np.float32)
        self.b = np.zeros(fout, np.float32)

    def params(self):
        return [self.W, self.b]

    def fwd(self, x):
        self.x = x
        return x @ self.W.T + self.b

    def bwd(self, g):
        self.grads = [g.T @ self.x, g.sum(0)]
        return g @ self.W


class Relu:
    def params(self):
        return []

    def fwd(self, x):
        self.m = x > 0
        return x * self.m

    def bwd(self, g):
        return g * self.m


class Pool2:
    """2x2 stride-2 pooling, max or average."""

    def __init__(self, kind):
        self.kind = kind

    def params(self):
        return []

    def fwd(self, x):
        n, c, h, w = x.shape
        r = x.reshape(n, c, h // 2, 2, w // 2, 2)
        if self.kind == "max":
            out = r.max(axis=(3, 5))
            self.mask = r == out[:, :, :, None, :, None]
        else:
            out = r.mean(axis=(3, 5))
        self.shape = x.shape
        return out

    def bwd(self, g):
        n, c, h, w = self.shape
        gb = g[:, :, :, None, :, None]
        if self.kind == "max":
            d = self.mask * gb
        else:
            d = np.broadcast_to(gb * np.float32(0.25), (n, c, h // 2, 2, w // 2, 2))
        return d.reshape(self.shape).astype(np.float32)


class Flatten:
    def params(self):
        return []

    def fwd(self, x):
        self.shape = x.shape
        return x.reshape(len(x), -1)

    def bwd(self, g):
        return g.reshape(self.shape)


def forward(layers, x):
    for layer in layers:
        x = layer.fwd(x)
    return x


def train(layers, x, y, *, epochs, lr, batch, seed, wd=1e-4):
    """Adam on softmax cross-entropy; deterministic for a given seed."""
    rng = np.random.default_rng(seed)
    params = [p for layer in layers for p in layer.params()]
    m = [np.zeros_like(p) for p in params]
    v = [np.zeros_like(p) for p in params]
    b1, b2, eps, t = 0.9, 0.999, 1e-8, 0
    for ep in range(epochs):
        lr_ep = lr * 0.5 * (1 + np.cos(np.pi * ep / epochs))  # cosine decay
        order = rng.permutation(len(y))
        for s in range(0, len(y), batch):
            idx = order[s:s + batch]
            logits = forward(layers, x[idx])
            z = logits - logits.max(1, keepdims=True)
            p = np.exp(z)
            p /= p.sum(1, keepdims=True)
            p[np.arange(len(idx)), y[idx]] -= 1
            g = (p / len(idx)).astype(np.float32)
            for layer in reversed(layers):
                g = layer.bwd(g)
            grads = [gr for layer in layers for gr in getattr(layer, "grads", [])]
            t += 1
            for i, (pa, gr) in enumerate(zip(params, grads)):
                gr = gr + wd * pa
                m[i] = b1 * m[i] + (1 - b1) * gr
                v[i] = b2 * v[i] + (1 - b2) * gr * gr
                mh = m[i] / (1 - b1 ** t)
                vh = v[i] / (1 - b2 ** t)
                pa -= (lr_ep * mh / (np.sqrt(vh) + eps)).astype(np.float32)


def accuracy_of(fn, x, y, batch=256):
    pred = np.concatenate([fn(x[i:i + batch]).argmax(1) for i in range(0, len(x), batch)])
    return float((pred == y).mean())


# ----------------------------------------------------------------------------
# onnx helpers


def init(name, arr):
    return numpy_helper.from_array(np.array(arr, order="C"), name)  # keeps 0-d scalars 0-d


def value_info(name, elem, shape):
    return helper.make_tensor_value_info(name, elem, shape)


def save_model(nodes, inputs, outputs, inits, path, name, doc):
    graph = helper.make_graph(nodes, name, inputs, outputs, initializer=inits)
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        ir_version=IR_VERSION,
        producer_name="tvm-qpu models/make_models.py",
    )
    model.doc_string = doc
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, path)
    return model


def describe(path):
    m = onnx.load(path)

    def fmt(v):
        t = v.type.tensor_type
        dims = [d.dim_param if d.dim_param else d.dim_value for d in t.shape.dim]
        return f"{v.name}: {TensorProto.DataType.Name(t.elem_type).lower()} {dims}"

    ops = sorted({n.op_type for n in m.graph.node})
    print(f"  {os.path.basename(path)}  ({os.path.getsize(path)} bytes, opset {OPSET})")
    for v in m.graph.input:
        print("    input  ", fmt(v))
    for v in m.graph.output:
        print("    output ", fmt(v))
    print("    ops    ", ", ".join(ops))


def ort_run(path, feeds):
    """Run with onnxruntime if it is installed, else None."""
    try:
        import onnxruntime as ort
    except ImportError:
        return None
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def ort_check(path, feeds, ref, atol=1e-4):
    out = ort_run(path, feeds)
    if out is None:
        print("    onnxruntime not installed: not cross-checked")
        return
    err = float(np.abs(out[0] - ref).max())
    print(f"    onnxruntime vs numpy: max abs diff {err:.2e}")
    assert err <= atol, (path, err)


# ----------------------------------------------------------------------------
# 1. digits CNN (float)

_DIGITS_CACHE = {}


def digits_cnn_layers():
    return [
        Conv(np.random.default_rng(1), 1, 8, 3, 1), Relu(), Pool2("max"),
        Conv(np.random.default_rng(2), 8, 16, 3, 1), Relu(), Pool2("max"),
        Flatten(), Linear(np.random.default_rng(3), 64, 10),
    ]


def trained_digits_cnn():
    """Train (once per process) the digits CNN; returns (layers, data)."""
    if "cnn" not in _DIGITS_CACHE:
        data = load_digits_split()
        xtr, ytr, xte, yte = data
        layers = digits_cnn_layers()
        t0 = time.time()
        train(layers, xtr, ytr, epochs=40, lr=0.01, batch=32, seed=10)
        print(f"  trained digits CNN in {time.time() - t0:.1f} s")
        _DIGITS_CACHE["cnn"] = (layers, data)
    return _DIGITS_CACHE["cnn"]


def digits_cnn_weights(layers):
    c1, c2, fc = layers[0], layers[3], layers[7]
    return dict(W1=c1.W, B1=c1.b, W2=c2.W, B2=c2.b, W3=fc.W, B3=fc.b)


def digits_cnn_graph(w, batch):
    nodes = [
        helper.make_node("Conv", ["input", "conv1.weight", "conv1.bias"], ["conv1"],
                         kernel_shape=[3, 3], pads=[1, 1, 1, 1], name="conv1"),
        helper.make_node("Relu", ["conv1"], ["relu1"], name="relu1"),
        helper.make_node("MaxPool", ["relu1"], ["pool1"], kernel_shape=[2, 2],
                         strides=[2, 2], name="pool1"),
        helper.make_node("Conv", ["pool1", "conv2.weight", "conv2.bias"], ["conv2"],
                         kernel_shape=[3, 3], pads=[1, 1, 1, 1], name="conv2"),
        helper.make_node("Relu", ["conv2"], ["relu2"], name="relu2"),
        helper.make_node("MaxPool", ["relu2"], ["pool2"], kernel_shape=[2, 2],
                         strides=[2, 2], name="pool2"),
        helper.make_node("Flatten", ["pool2"], ["flat"], axis=1, name="flatten"),
        helper.make_node("Gemm", ["flat", "fc.weight", "fc.bias"], ["logits"],
                         transB=1, name="fc"),
    ]
    inits = [init("conv1.weight", w["W1"]), init("conv1.bias", w["B1"]),
             init("conv2.weight", w["W2"]), init("conv2.bias", w["B2"]),
             init("fc.weight", w["W3"]), init("fc.bias", w["B3"])]
    inputs = [value_info("input", TensorProto.FLOAT, [batch, 1, 8, 8])]
    outputs = [value_info("logits", TensorProto.FLOAT, [batch, 10])]
    return nodes, inputs, outputs, inits


def make_digits_cnn(out):
    layers, (xtr, ytr, xte, yte) = trained_digits_cnn()
    w = digits_cnn_weights(layers)
    acc_tr = accuracy_of(lambda a: forward(layers, a), xtr, ytr)
    acc = accuracy_of(lambda a: forward(layers, a), xte, yte)
    np.savez_compressed(os.path.join(out, "digits_test.npz"), x=xte, y=yte)
    print(f"  wrote digits_test.npz: x float32 {list(xte.shape)}, y int64 {list(yte.shape)}")
    for fname, batch in (("digits_cnn.onnx", 1), ("digits_cnn_batch.onnx", "N")):
        path = os.path.join(out, fname)
        doc = (f"Digits CNN (sklearn 8x8 digits, inputs = pixel/16), numpy-trained; "
               f"test accuracy {acc:.4f} on digits_test.npz")
        save_model(*digits_cnn_graph(w, batch), path, fname[:-5], doc)
        describe(path)
    ort_check(os.path.join(out, "digits_cnn.onnx"), {"input": xte[:1]},
              forward(layers, xte[:1]))
    outs = ort_run(os.path.join(out, "digits_cnn_batch.onnx"), {"input": xte})
    if outs is not None:
        print(f"    onnxruntime accuracy on digits_test.npz: {(outs[0].argmax(1) == yte).mean():.4f}")
    print(f"    accuracy: train {acc_tr:.4f}, test {acc:.4f} (numpy forward, {len(yte)} test samples)")
    return {"digits_cnn": acc}


# ----------------------------------------------------------------------------
# 2. LeNet-5 (trained on digits upscaled to 32x32)


def make_lenet5(out):
    xtr, ytr, xte, yte = load_digits_split()
    xtr32, xte32 = upscale32(xtr), upscale32(xte)
    rng = np.random.default_rng(5)
    layers = [
        Conv(rng, 1, 6, 5, 0), Relu(), Pool2("avg"),
        Conv(rng, 6, 16, 5, 0), Relu(), Pool2("avg"),
        Flatten(), Linear(rng, 400, 120), Relu(), Linear(rng, 120, 84), Relu(),
        Linear(rng, 84, 10),
    ]
    t0 = time.time()
    train(layers, xtr32, ytr, epochs=8, lr=0.003, batch=64, seed=50)
    print(f"  trained LeNet-5 in {time.time() - t0:.1f} s")
    acc = accuracy_of(lambda a: forward(layers, a), xte32, yte)
    c1, c2, f1, f2, f3 = layers[0], layers[3], layers[7], layers[9], layers[11]
    nodes = [
        helper.make_node("Conv", ["input", "c1.weight", "c1.bias"], ["c1"], kernel_shape=[5, 5], name="c1"),
        helper.make_node("Relu", ["c1"], ["r1"], name="r1"),
        helper.make_node("AveragePool", ["r1"], ["s2"], kernel_shape=[2, 2], strides=[2, 2], name="s2"),
        helper.make_node("Conv", ["s2", "c3.weight", "c3.bias"], ["c3"], kernel_shape=[5, 5], name="c3"),
        helper.make_node("Relu", ["c3"], ["r3"], name="r3"),
        helper.make_node("AveragePool", ["r3"], ["s4"], kernel_shape=[2, 2], strides=[2, 2], name="s4"),
        helper.make_node("Flatten", ["s4"], ["flat"], axis=1, name="flatten"),
        helper.make_node("Gemm", ["flat", "f5.weight", "f5.bias"], ["f5"], transB=1, name="f5"),
        helper.make_node("Relu", ["f5"], ["r5"], name="r5"),
        helper.make_node("Gemm", ["r5", "f6.weight", "f6.bias"], ["f6"], transB=1, name="f6"),
        helper.make_node("Relu", ["f6"], ["r6"], name="r6"),
        helper.make_node("Gemm", ["r6", "f7.weight", "f7.bias"], ["logits"], transB=1, name="f7"),
    ]
    inits = [init("c1.weight", c1.W), init("c1.bias", c1.b), init("c3.weight", c2.W),
             init("c3.bias", c2.b), init("f5.weight", f1.W), init("f5.bias", f1.b),
             init("f6.weight", f2.W), init("f6.bias", f2.b), init("f7.weight", f3.W),
             init("f7.bias", f3.b)]
    path = os.path.join(out, "lenet5.onnx")
    doc = (f"LeNet-5 (ReLU, average pooling) trained on sklearn digits upscaled 4x (nearest) "
           f"to 32x32; test accuracy {acc:.4f}")
    save_model(nodes, [value_info("input", TensorProto.FLOAT, [1, 1, 32, 32])],
               [value_info("logits", TensorProto.FLOAT, [1, 10])], inits, path, "lenet5", doc)
    describe(path)
    ort_check(path, {"input": xte32[:1]}, forward(layers, xte32[:1]))
    print(f"    accuracy: test {acc:.4f} (digits_test.npz upscaled with np.kron(x, ones(4,4)))")
    return {"lenet5": acc}


# ----------------------------------------------------------------------------
# 3. MLP 64 -> 128 -> 64 -> 10 (trained on digits)


def make_mlp(out):
    xtr, ytr, xte, yte = load_digits_split()
    xtr, xte = xtr.reshape(-1, 64), xte.reshape(-1, 64)
    rng = np.random.default_rng(7)
    layers = [Linear(rng, 64, 128), Relu(), Linear(rng, 128, 64), Relu(), Linear(rng, 64, 10)]
    t0 = time.time()
    train(layers, xtr, ytr, epochs=40, lr=0.003, batch=32, seed=70)
    print(f"  trained MLP in {time.time() - t0:.1f} s")
    acc = accuracy_of(lambda a: forward(layers, a), xte, yte)
    nodes = [
        helper.make_node("Gemm", ["input", "fc1.weight", "fc1.bias"], ["h1"], transB=1, name="fc1"),
        helper.make_node("Relu", ["h1"], ["a1"], name="relu1"),
        helper.make_node("Gemm", ["a1", "fc2.weight", "fc2.bias"], ["h2"], transB=1, name="fc2"),
        helper.make_node("Relu", ["h2"], ["a2"], name="relu2"),
        helper.make_node("Gemm", ["a2", "fc3.weight", "fc3.bias"], ["logits"], transB=1, name="fc3"),
    ]
    inits = []
    for i, layer in zip((1, 2, 3), layers[::2]):
        inits += [init(f"fc{i}.weight", layer.W), init(f"fc{i}.bias", layer.b)]
    path = os.path.join(out, "mlp.onnx")
    doc = f"MLP 64-128-64-10 trained on sklearn digits (flattened 8x8, pixel/16); test accuracy {acc:.4f}"
    save_model(nodes, [value_info("input", TensorProto.FLOAT, [1, 64])],
               [value_info("logits", TensorProto.FLOAT, [1, 10])], inits, path, "mlp", doc)
    describe(path)
    ort_check(path, {"input": xte[:1]}, forward(layers, xte[:1]))
    print(f"    accuracy: test {acc:.4f} (digits_test.npz reshaped to [N,64])")
    return {"mlp": acc}


# ----------------------------------------------------------------------------
# 4. transformer encoder layer (fixed-seed random weights)

SEQ, DIM, HEADS, FF = 16, 32, 4, 64


def transformer_weights():
    rng = np.random.default_rng(4)

    def mat(i, o):
        return (rng.standard_normal((i, o)) / np.sqrt(i)).astype(np.float32)

    def vec(n, s=0.02):
        return (rng.standard_normal(n) * s).astype(np.float32)

    w = {}
    for n in ("q", "k", "v", "o"):
        w[f"W{n}"], w[f"b{n}"] = mat(DIM, DIM), vec(DIM)
    w["ln1_g"], w["ln1_b"] = 1 + vec(DIM, 0.1), vec(DIM, 0.1)
    w["W1"], w["b1"] = mat(DIM, FF), vec(FF)
    w["W2"], w["b2"] = mat(FF, DIM), vec(DIM)
    w["ln2_g"], w["ln2_b"] = 1 + vec(DIM, 0.1), vec(DIM, 0.1)
    return w


def transformer_reference(x, w, eps=1e-5):
    """numpy forward pass of transformer_layer.onnx, x [B,SEQ,DIM]."""
    hd = DIM // HEADS
    b = x.shape[0]

    def heads(t):
        return t.reshape(b, SEQ, HEADS, hd).transpose(0, 2, 1, 3)

    def ln(t, g, bb):
        mu = t.mean(-1, keepdims=True)
        var = ((t - mu) ** 2).mean(-1, keepdims=True)
        return (t - mu) / np.sqrt(var + eps) * g + bb

    q, k, v = (heads(x @ w[f"W{n}"] + w[f"b{n}"]) for n in "qkv")
    s = (q @ k.transpose(0, 1, 3, 2)) * np.float32(1 / np.sqrt(hd))
    s = np.exp(s - s.max(-1, keepdims=True))
    p = s / s.sum(-1, keepdims=True)
    a = (p @ v).transpose(0, 2, 1, 3).reshape(b, SEQ, DIM)
    h = ln(x + a @ w["Wo"] + w["bo"], w["ln1_g"], w["ln1_b"])
    from math import erf

    f = h @ w["W1"] + w["b1"]
    f = 0.5 * f * (1 + np.vectorize(erf)(f / np.sqrt(2)))
    return ln(h + f @ w["W2"] + w["b2"], w["ln2_g"], w["ln2_b"]).astype(np.float32)


def make_transformer(out):
    w = transformer_weights()
    hd = DIM // HEADS
    N = helper.make_node
    nodes = []
    for n in ("q", "k", "v"):
        nodes += [N("MatMul", ["input", f"W{n}"], [f"{n}_mm"], name=f"{n}_proj"),
                  N("Add", [f"{n}_mm", f"b{n}"], [f"{n}_lin"], name=f"{n}_bias"),
                  N("Reshape", [f"{n}_lin", "heads_shape"], [f"{n}_4d"], name=f"{n}_split_heads")]
    nodes += [
        N("Transpose", ["q_4d"], ["q_h"], perm=[0, 2, 1, 3], name="q_transpose"),  # B,H,S,hd
        N("Transpose", ["k_4d"], ["k_t"], perm=[0, 2, 3, 1], name="k_transpose"),  # B,H,hd,S
        N("Transpose", ["v_4d"], ["v_h"], perm=[0, 2, 1, 3], name="v_transpose"),
        N("MatMul", ["q_h", "k_t"], ["scores"], name="qk"),
        N("Mul", ["scores", "scale"], ["scores_s"], name="scale"),
        N("Softmax", ["scores_s"], ["probs"], axis=-1, name="softmax"),
        N("MatMul", ["probs", "v_h"], ["ctx_h"], name="pv"),
        N("Transpose", ["ctx_h"], ["ctx_t"], perm=[0, 2, 1, 3], name="ctx_transpose"),
        N("Reshape", ["ctx_t", "model_shape"], ["ctx"], name="merge_heads"),
        N("MatMul", ["ctx", "Wo"], ["o_mm"], name="o_proj"),
        N("Add", ["o_mm", "bo"], ["attn"], name="o_bias"),
        N("Add", ["input", "attn"], ["res1"], name="residual1"),
        N("LayerNormalization", ["res1", "ln1_g", "ln1_b"], ["h1"], axis=-1, epsilon=1e-5, name="ln1"),
        N("MatMul", ["h1", "W1"], ["ff1_mm"], name="ff1"),
        N("Add", ["ff1_mm", "b1"], ["ff1"], name="ff1_bias"),
        # GELU(x) = 0.5 * x * (1 + erf(x / sqrt(2)))
        N("Div", ["ff1", "sqrt2"], ["g_div"], name="gelu_div"),
        N("Erf", ["g_div"], ["g_erf"], name="gelu_erf"),
        N("Add", ["g_erf", "one"], ["g_add"], name="gelu_add"),
        N("Mul", ["ff1", "g_add"], ["g_mul"], name="gelu_mul"),
        N("Mul", ["g_mul", "half"], ["gelu"], name="gelu_half"),
        N("MatMul", ["gelu", "W2"], ["ff2_mm"], name="ff2"),
        N("Add", ["ff2_mm", "b2"], ["ff2"], name="ff2_bias"),
        N("Add", ["h1", "ff2"], ["res2"], name="residual2"),
        N("LayerNormalization", ["res2", "ln2_g", "ln2_b"], ["output"], axis=-1, epsilon=1e-5, name="ln2"),
    ]
    inits = [init(k, v) for k, v in w.items()] + [
        init("heads_shape", np.array([0, SEQ, HEADS, hd], np.int64)),
        init("model_shape", np.array([0, SEQ, DIM], np.int64)),
        init("scale", np.array(1 / np.sqrt(hd), np.float32)),
        init("sqrt2", np.array(np.sqrt(2), np.float32)),
        init("one", np.array(1, np.float32)),
        init("half", np.array(0.5, np.float32)),
    ]
    path = os.path.join(out, "transformer_layer.onnx")
    doc = (f"One post-LN transformer encoder layer: seq {SEQ}, dim {DIM}, {HEADS} heads, FF {FF}, "
           f"MatMul/Transpose/Mul/Softmax attention, Erf GELU, LayerNormalization; fixed-seed weights")
    save_model(nodes, [value_info("input", TensorProto.FLOAT, [1, SEQ, DIM])],
               [value_info("output", TensorProto.FLOAT, [1, SEQ, DIM])], inits, path,
               "transformer_layer", doc)
    describe(path)
    x = np.random.default_rng(40).standard_normal((1, SEQ, DIM)).astype(np.float32)
    ort_check(path, {"input": x}, transformer_reference(x, w))
    return {}


# ----------------------------------------------------------------------------
# 5. int8 digits CNN: QDQ and integer-op (MatMulInteger) variants


def quantize(x, s):
    """ONNX QuantizeLinear to int8 with zero point 0 (round half to even, saturate)."""
    return np.clip(np.round(x / np.float32(s)), -128, 127).astype(np.int8)


def calibrate(w, xtr):
    """Per-tensor symmetric int8 scales from max |x| over the training data."""
    def conv(x, W, b):
        cols, sh = _im2col(x, 3, 1)
        n, _, _, _, ho, wo = sh
        return (cols @ W.reshape(len(b), -1).T + b).reshape(n, ho, wo, -1).transpose(0, 3, 1, 2)

    r1 = np.maximum(conv(xtr, w["W1"], w["B1"]), 0)
    p1 = Pool2("max").fwd(r1)
    r2 = np.maximum(conv(p1, w["W2"], w["B2"]), 0)
    s = {
        "x": float(np.abs(xtr).max()) / 127,
        "a1": float(r1.max()) / 127,
        "a2": float(r2.max()) / 127,
    }
    for k in ("W1", "W2", "W3"):
        s[k] = float(np.abs(w[k]).max()) / 127
    return {k: np.float32(v) for k, v in s.items()}


def quant_params(w, s):
    q = {k: quantize(w[k], s[k]) for k in ("W1", "W2", "W3")}
    q["B1"] = np.round(w["B1"] / (s["x"] * s["W1"])).astype(np.int32)
    q["B2"] = np.round(w["B2"] / (s["a1"] * s["W2"])).astype(np.int32)
    q["B3"] = np.round(w["B3"] / (s["a2"] * s["W3"])).astype(np.int32)
    return q


def quant_reference(x, q, s):
    """Integer-exact numpy reference of both int8 models, x [N,1,8,8] float -> logits."""
    def conv_int(xq, Wq, Bq):
        cols, sh = _im2col(xq.astype(np.int64), 3, 1)
        n, _, _, _, ho, wo = sh
        acc = cols @ Wq.reshape(len(Bq), -1).T.astype(np.int64) + Bq
        return acc.reshape(n, ho, wo, -1).transpose(0, 3, 1, 2)

    def pool(t):
        n, c, h, ww = t.shape
        return t.reshape(n, c, h // 2, 2, ww // 2, 2).max(axis=(3, 5))

    xq = quantize(x, s["x"])
    a1 = quantize(np.maximum(conv_int(xq, q["W1"], q["B1"]).astype(np.float32) * (s["x"] * s["W1"]), 0), s["a1"])
    a2 = quantize(np.maximum(conv_int(pool(a1), q["W2"], q["B2"]).astype(np.float32) * (s["a1"] * s["W2"]), 0), s["a2"])
    f = pool(a2).reshape(len(x), -1).astype(np.int64)
    acc = f @ q["W3"].T.astype(np.int64) + q["B3"]
    return acc.astype(np.float32) * (s["a2"] * s["W3"])


def digits_qdq_graph(q, s):
    N = helper.make_node
    nodes = [
        N("QuantizeLinear", ["input", "x.scale", "zp"], ["x_q"], name="x_quant"),
        N("DequantizeLinear", ["x_q", "x.scale", "zp"], ["x_dq"], name="x_dequant"),
        N("DequantizeLinear", ["conv1.weight_q", "conv1.weight_scale", "zp"], ["conv1.weight"], name="w1_dequant"),
        N("DequantizeLinear", ["conv1.bias_q", "conv1.bias_scale", "zp32"], ["conv1.bias"], name="b1_dequant"),
        N("Conv", ["x_dq", "conv1.weight", "conv1.bias"], ["conv1"], kernel_shape=[3, 3], pads=[1, 1, 1, 1], name="conv1"),
        N("Relu", ["conv1"], ["relu1"], name="relu1"),
        N("QuantizeLinear", ["relu1", "a1.scale", "zp"], ["relu1_q"], name="a1_quant"),
        N("DequantizeLinear", ["relu1_q", "a1.scale", "zp"], ["relu1_dq"], name="a1_dequant"),
        N("MaxPool", ["relu1_dq"], ["pool1"], kernel_shape=[2, 2], strides=[2, 2], name="pool1"),
        N("QuantizeLinear", ["pool1", "a1.scale", "zp"], ["pool1_q"], name="p1_quant"),
        N("DequantizeLinear", ["pool1_q", "a1.scale", "zp"], ["pool1_dq"], name="p1_dequant"),
        N("DequantizeLinear", ["conv2.weight_q", "conv2.weight_scale", "zp"], ["conv2.weight"], name="w2_dequant"),
        N("DequantizeLinear", ["conv2.bias_q", "conv2.bias_scale", "zp32"], ["conv2.bias"], name="b2_dequant"),
        N("Conv", ["pool1_dq", "conv2.weight", "conv2.bias"], ["conv2"], kernel_shape=[3, 3], pads=[1, 1, 1, 1], name="conv2"),
        N("Relu", ["conv2"], ["relu2"], name="relu2"),
        N("QuantizeLinear", ["relu2", "a2.scale", "zp"], ["relu2_q"], name="a2_quant"),
        N("DequantizeLinear", ["relu2_q", "a2.scale", "zp"], ["relu2_dq"], name="a2_dequant"),
        N("MaxPool", ["relu2_dq"], ["pool2"], kernel_shape=[2, 2], strides=[2, 2], name="pool2"),
        N("QuantizeLinear", ["pool2", "a2.scale", "zp"], ["pool2_q"], name="p2_quant"),
        N("DequantizeLinear", ["pool2_q", "a2.scale", "zp"], ["pool2_dq"], name="p2_dequant"),
        N("Flatten", ["pool2_dq"], ["flat"], axis=1, name="flatten"),
        N("DequantizeLinear", ["fc.weight_q", "fc.weight_scale", "zp"], ["fc.weight"], name="w3_dequant"),
        N("DequantizeLinear", ["fc.bias_q", "fc.bias_scale", "zp32"], ["fc.bias"], name="b3_dequant"),
        N("Gemm", ["flat", "fc.weight", "fc.bias"], ["logits"], transB=1, name="fc"),
    ]
    f32 = lambda v: np.array(v, np.float32)  # noqa: E731
    inits = [
        init("zp", np.array(0, np.int8)), init("zp32", np.array(0, np.int32)),
        init("x.scale", f32(s["x"])), init("a1.scale", f32(s["a1"])), init("a2.scale", f32(s["a2"])),
        init("conv1.weight_q", q["W1"]), init("conv1.weight_scale", f32(s["W1"])),
        init("conv1.bias_q", q["B1"]), init("conv1.bias_scale", f32(s["x"] * s["W1"])),
        init("conv2.weight_q", q["W2"]), init("conv2.weight_scale", f32(s["W2"])),
        init("conv2.bias_q", q["B2"]), init("conv2.bias_scale", f32(s["a1"] * s["W2"])),
        init("fc.weight_q", q["W3"]), init("fc.weight_scale", f32(s["W3"])),
        init("fc.bias_q", q["B3"]), init("fc.bias_scale", f32(s["a2"] * s["W3"])),
    ]
    return nodes, inits


def im2col_indices(c, h, w, k=3, pad=1):
    """Gather indices into a flattened padded [C,H+2p,W+2p] image: [H*W, C*k*k]."""
    hp, wp = h + 2 * pad, w + 2 * pad
    idx = np.zeros((h * w, c * k * k), np.int64)
    for y in range(h):
        for x in range(w):
            for ci in range(c):
                for i in range(k):
                    for j in range(k):
                        idx[y * w + x, (ci * k + i) * k + j] = ci * hp * wp + (y + i) * wp + (x + j)
    return idx


def digits_int_graph(q, s):
    """Conv as Pad + Gather(im2col) + MatMulInteger; int32 bias Add; requantize with
    DequantizeLinear(int32) -> Relu -> QuantizeLinear; int8 MaxPool; MatMulInteger fc."""
    N = helper.make_node
    nodes = [N("QuantizeLinear", ["input", "x.scale", "zp"], ["x_q"], name="x_quant")]
    inits = [init("zp", np.array(0, np.int8)),
             init("x.scale", np.array(s["x"], np.float32))]
    stages = [  # name, input, C, H, W, Cout, weight, bias, in scale, out scale
        ("conv1", "x_q", 1, 8, 8, 8, q["W1"], q["B1"], s["x"] * s["W1"], "a1"),
        ("conv2", "pool1_q", 8, 4, 4, 16, q["W2"], q["B2"], s["a1"] * s["W2"], "a2"),
    ]
    for i, (nm, src, c, h, w, cout, Wq, Bq, acc_scale, out_s) in enumerate(stages, 1):
        nodes += [
            N("Pad", [src, f"{nm}.pads"], [f"{nm}_pad"], mode="constant", name=f"{nm}_pad"),
            N("Reshape", [f"{nm}_pad", "flat_shape"], [f"{nm}_padflat"], name=f"{nm}_flatten"),
            N("Gather", [f"{nm}_padflat", f"{nm}.im2col"], [f"{nm}_cols"], axis=1, name=f"{nm}_im2col"),
            N("MatMulInteger", [f"{nm}_cols", f"{nm}.weight_q", "zp", "zp"], [f"{nm}_acc"], name=f"{nm}_matmul"),
            N("Add", [f"{nm}_acc", f"{nm}.bias_q"], [f"{nm}_accb"], name=f"{nm}_bias"),
            N("DequantizeLinear", [f"{nm}_accb", f"{nm}.acc_scale"], [f"{nm}_f"], name=f"{nm}_dequant"),
            N("Relu", [f"{nm}_f"], [f"relu{i}"], name=f"relu{i}"),
            N("QuantizeLinear", [f"relu{i}", f"{out_s}.scale", "zp"], [f"relu{i}_q"], name=f"a{i}_quant"),
            N("Reshape", [f"relu{i}_q", f"{nm}.nhwc_shape"], [f"relu{i}_nhwc"], name=f"{nm}_to_nhwc"),
            N("Transpose", [f"relu{i}_nhwc"], [f"relu{i}_nchw"], perm=[0, 3, 1, 2], name=f"{nm}_to_nchw"),
            N("MaxPool", [f"relu{i}_nchw"], [f"pool{i}_q"], kernel_shape=[2, 2], strides=[2, 2], name=f"pool{i}"),
        ]
        inits += [
            init(f"{nm}.pads", np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64)),
            init(f"{nm}.im2col", im2col_indices(c, h, w)),
            init(f"{nm}.weight_q", np.ascontiguousarray(Wq.reshape(cout, -1).T)),  # [C*9, Cout]
            init(f"{nm}.bias_q", Bq),
            init(f"{nm}.acc_scale", np.array(acc_scale, np.float32)),
            init(f"{out_s}.scale", np.array(s[out_s], np.float32)),
            init(f"{nm}.nhwc_shape", np.array([-1, h, w, cout], np.int64)),
        ]
    nodes += [
        N("Flatten", ["pool2_q"], ["flat_q"], axis=1, name="flatten"),
        N("MatMulInteger", ["flat_q", "fc.weight_q", "zp", "zp"], ["fc_acc"], name="fc_matmul"),
        N("Add", ["fc_acc", "fc.bias_q"], ["fc_accb"], name="fc_bias"),
        N("DequantizeLinear", ["fc_accb", "fc.acc_scale"], ["logits"], name="fc_dequant"),
    ]
    inits += [
        init("flat_shape", np.array([0, -1], np.int64)),
        init("fc.weight_q", np.ascontiguousarray(q["W3"].T)),  # [64, 10]
        init("fc.bias_q", q["B3"]),
        init("fc.acc_scale", np.array(s["a2"] * s["W3"], np.float32)),
    ]
    return nodes, inits


def make_digits_quant(out):
    layers, (xtr, ytr, xte, yte) = trained_digits_cnn()
    w = digits_cnn_weights(layers)
    s = calibrate(w, xtr)
    q = quant_params(w, s)
    acc_f = accuracy_of(lambda a: forward(layers, a), xte, yte)
    acc_q = accuracy_of(lambda a: quant_reference(a, q, s), xte, yte)
    scales = ", ".join(f"{k}={float(v):.6g}" for k, v in s.items())
    io = ([value_info("input", TensorProto.FLOAT, [1, 1, 8, 8])],
          [value_info("logits", TensorProto.FLOAT, [1, 10])])
    ref1 = quant_reference(xte[:1], q, s)
    results = {}
    for fname, build, what in (
        ("digits_cnn_qdq.onnx", digits_qdq_graph, "QDQ (QuantizeLinear/DequantizeLinear around float ops)"),
        ("digits_cnn_int.onnx", digits_int_graph, "integer ops (Gather im2col + MatMulInteger, int8 MaxPool)"),
    ):
        nodes, inits = build(q, s)
        path = os.path.join(out, fname)
        doc = (f"int8 digits CNN, {what}; symmetric per-tensor int8 scales (zero point 0) "
               f"calibrated by max|x| on the training split: {scales}; int32 biases. "
               f"Test accuracy {acc_q:.4f} (float model {acc_f:.4f})")
        save_model(nodes, *io, inits, path, fname[:-5], doc)
        describe(path)
        ort_check(path, {"input": xte[:1]}, ref1, atol=1e-4)
        outs = ort_run(path, {"input": xte[:1]})
        if outs is not None:
            pred = [int(np.argmax(ort_run(path, {"input": xte[i:i + 1]})[0])) for i in range(len(yte))]
            print(f"    onnxruntime accuracy on digits_test.npz: {np.mean(np.array(pred) == yte):.4f}")
        results[fname[:-5]] = acc_q
    print(f"    scales: {scales}")
    print(f"    accuracy: float {acc_f:.4f}, int8 {acc_q:.4f} (integer-exact numpy reference, "
          f"{len(yte)} test samples)")
    return results


# ----------------------------------------------------------------------------

MAKERS = {
    "digits_cnn": make_digits_cnn,
    "lenet5": make_lenet5,
    "mlp": make_mlp,
    "transformer_layer": make_transformer,
    "digits_cnn_qdq": make_digits_quant,
}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.path.dirname(os.path.abspath(__file__)),
                    help="output directory (default: the models/ directory)")
    ap.add_argument("--only", choices=sorted(MAKERS), action="append",
                    help="make only this model (repeatable)")
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    summary = {}
    for name in args.only or MAKERS:
        print(f"[{name}]")
        summary.update(MAKERS[name](args.out) or {})
    if summary:
        print("test accuracy: " + ", ".join(f"{k} {v:.4f}" for k, v in summary.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
