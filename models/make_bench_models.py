#!/usr/bin/env python3
"""Build the three benchmark-sized ONNX models (random weights, nothing downloaded).

* ``resnet18``: a ResNet-18 (torchvision layout, batch norm folded into conv bias): input
  ``[1,3,224,224]`` -> ``[1,1000]``; Conv, Relu, MaxPool, Add, GlobalAveragePool, Flatten, Gemm.
* ``mobilenetv2``: a MobileNetV2 (width 1.0, the torchvision block table, batch norm folded):
  ``[1,3,224,224]`` -> ``[1,1000]``; Conv (incl. depthwise), Clip (ReLU6), Add, GlobalAveragePool,
  Flatten, Gemm.
* ``bert_layer``: one BERT-base encoder layer (hidden 768, 12 heads, FFN 3072, GELU by Erf,
  post-LayerNorm), sequence 128: ``[1,128,768]`` -> ``[1,128,768]``.

Weights are drawn from a fixed-seed numpy generator, He-scaled so activations stay O(1) through
the network (the benchmark also compares outputs). The files are tens of MB: they are NOT
committed; ``scripts/bench_models.py`` writes them into a cache directory on first use.

Usage::

    python models/make_bench_models.py --out ~/.cache/tvm_qpu/bench [--only resnet18]
"""
from __future__ import annotations

import argparse
import os

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
IR_VERSION = 8


class _Graph:
    """Accumulates nodes and initializers with unique names."""

    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)
        self.nodes, self.inits, self.n = [], [], 0

    def name(self, base):
        self.n += 1
        return f"{base}_{self.n}"

    def const(self, arr, base="w"):
        nm = self.name(base)
        self.inits.append(numpy_helper.from_array(np.asarray(arr), nm))
        return nm

    def node(self, op, inputs, base=None, **attrs):
        out = self.name(base or op.lower())
        self.nodes.append(helper.make_node(op, inputs, [out], name=out, **attrs))
        return out

    def conv(self, x, cin, cout, k, stride=1, groups=1):
        fan_in = (cin // groups) * k * k
        w = (self.rng.standard_normal((cout, cin // groups, k, k)) * np.sqrt(2.0 / fan_in)).astype(np.float32)
        b = (self.rng.standard_normal(cout) * 0.01).astype(np.float32)
        p = k // 2
        return self.node("Conv", [x, self.const(w), self.const(b, "b")], kernel_shape=[k, k],
                         strides=[stride, stride], pads=[p, p, p, p], group=groups)

    def dense(self, x, cin, cout, gemm=False):
        w = (self.rng.standard_normal((cin, cout)) * np.sqrt(1.0 / cin)).astype(np.float32)
        b = (self.rng.standard_normal(cout) * 0.01).astype(np.float32)
        if gemm:
            return self.node("Gemm", [x, self.const(w), self.const(b, "b")])
        return self.node("Add", [self.node("MatMul", [x, self.const(w)]), self.const(b, "b")])

    def model(self, name, inp, in_shape, out, out_shape):
        g = helper.make_graph(self.nodes, name,
                              [helper.make_tensor_value_info(inp, TensorProto.FLOAT, in_shape)],
                              [helper.make_tensor_value_info(out, TensorProto.FLOAT, out_shape)],
                              initializer=self.inits)
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="tvm_qpu")
        m.ir_version = IR_VERSION
        onnx.checker.check_model(m)
        return m


def _relu6(g, x):
    return g.node("Clip", [x, g.const(np.array(0.0, np.float32), "lo"), g.const(np.array(6.0, np.float32), "hi")])


def resnet18(seed: int = 0) -> onnx.ModelProto:
    g = _Graph(seed)
    x = g.node("Relu", [g.conv("input", 3, 64, 7, 2)])
    x = g.node("MaxPool", [x], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
    cin = 64
    for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        for blk in range(2):
            s = stride if blk == 0 else 1
            y = g.node("Relu", [g.conv(x, cin, cout, 3, s)])
            y = g.conv(y, cout, cout, 3)
            sc = g.conv(x, cin, cout, 1, s) if (s != 1 or cin != cout) else x
            x = g.node("Relu", [g.node("Add", [y, sc])])
            cin = cout
    x = g.node("Flatten", [g.node("GlobalAveragePool", [x])])
    out = g.dense(x, 512, 1000, gemm=True)
    return g.model("resnet18", "input", [1, 3, 224, 224], out, [1, 1000])


MBV2_BLOCKS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
               (6, 320, 1, 1))   # (expansion t, channels c, repeats n, first stride s): MobileNetV2 Table 2


def mobilenetv2(seed: int = 0) -> onnx.ModelProto:
    g = _Graph(seed)
    x = _relu6(g, g.conv("input", 3, 32, 3, 2))
    cin = 32
    for t, c, n, s in MBV2_BLOCKS:
        for i in range(n):
            stride = s if i == 0 else 1
            hid = cin * t
            y = _relu6(g, g.conv(x, cin, hid, 1)) if t != 1 else x
            y = _relu6(g, g.conv(y, hid, hid, 3, stride, groups=hid))
            y = g.conv(y, hid, c, 1)
            x = g.node("Add", [x, y]) if stride == 1 and cin == c else y
            cin = c
    x = _relu6(g, g.conv(x, cin, 1280, 1))
    x = g.node("Flatten", [g.node("GlobalAveragePool", [x])])
    out = g.dense(x, 1280, 1000, gemm=True)
    return g.model("mobilenetv2", "input", [1, 3, 224, 224], out, [1, 1000])


def _layernorm(g, x, d):
    return g.node("LayerNormalization", [x, g.const(np.ones(d, np.float32), "gamma"),
                                         g.const(np.zeros(d, np.float32), "beta")], axis=-1, epsilon=1e-12)


def bert_layer(seq: int = 128, hidden: int = 768, heads: int = 12, ffn: int = 3072,
               seed: int = 0) -> onnx.ModelProto:
    g = _Graph(seed)
    hd = hidden // heads
    x = "input"

    def heads_of(t, perm):
        r = g.node("Reshape", [t, g.const(np.array([1, seq, heads, hd], np.int64), "shape")])
        return g.node("Transpose", [r], perm=perm)

    q = heads_of(g.dense(x, hidden, hidden), [0, 2, 1, 3])          # [1,H,S,hd]
    k = heads_of(g.dense(x, hidden, hidden), [0, 2, 3, 1])          # [1,H,hd,S]
    v = heads_of(g.dense(x, hidden, hidden), [0, 2, 1, 3])
    s = g.node("Mul", [g.node("MatMul", [q, k]), g.const(np.array(1.0 / np.sqrt(hd), np.float32), "scale")])
    p = g.node("Softmax", [s], axis=-1)
    a = g.node("Transpose", [g.node("MatMul", [p, v])], perm=[0, 2, 1, 3])
    a = g.node("Reshape", [a, g.const(np.array([1, seq, hidden], np.int64), "shape")])
    x1 = _layernorm(g, g.node("Add", [g.dense(a, hidden, hidden), x]), hidden)
    h = g.dense(x1, hidden, ffn)
    inv_sqrt2 = g.const(np.array(1.0 / np.sqrt(2.0), np.float32), "c")
    erf = g.node("Erf", [g.node("Mul", [h, inv_sqrt2])])
    gelu = g.node("Mul", [g.node("Mul", [h, g.const(np.array(0.5, np.float32), "c")]),
                          g.node("Add", [erf, g.const(np.array(1.0, np.float32), "c")])])
    out = _layernorm(g, g.node("Add", [g.dense(gelu, ffn, hidden), x1]), hidden)
    return g.model("bert_layer", "input", [1, seq, hidden], out, [1, seq, hidden])


BUILDERS = {"resnet18": resnet18, "mobilenetv2": mobilenetv2, "bert_layer": bert_layer}


def ensure(name: str, out_dir) -> str:
    """Path of ``<out_dir>/<name>.onnx``, writing it first if it is missing."""
    if name not in BUILDERS:
        raise KeyError(f"unknown bench model {name!r}: one of {', '.join(BUILDERS)}")
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{name}.onnx")
    if not os.path.exists(path):
        tmp = path + ".tmp"
        onnx.save(BUILDERS[name](), tmp)
        os.replace(tmp, path)
    return path


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.expanduser("~/.cache/tvm_qpu/bench"))
    ap.add_argument("--only", action="append", choices=sorted(BUILDERS))
    a = ap.parse_args(argv)
    for n in a.only or BUILDERS:
        p = ensure(n, a.out)
        print(f"{p}: {os.path.getsize(p) / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
