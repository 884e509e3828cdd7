"""Shared helpers of the frontend tests: small Relax graphs per pattern, the llvm reference run,
and which real kernels are registered (every kind of the pattern table must be)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

MODELS = Path(__file__).resolve().parent.parent / "models"


def real_kinds() -> set:
    """Kinds the real kernel registry offers. Errors propagate: a broken install fails the tests
    that use it instead of turning them into skips."""
    from tvm_qpu.codegen import registry
    return set(registry.kinds())


def const(a):
    import tvm
    from tvm import relax
    return relax.const(tvm.runtime.tensor(np.ascontiguousarray(a)))


def graph(inputs: dict, body):
    """IRModule whose main takes ``inputs`` ({name: (shape, dtype)}) and returns ``body(bb, *vars)``."""
    from tvm import relax
    bb = relax.BlockBuilder()
    vs = [relax.Var(n, relax.TensorType(list(s), d)) for n, (s, d) in inputs.items()]
    with bb.function("main", vs):
        with bb.dataflow():
            out = body(bb, *vs)
            gv = bb.emit_output(out)
        bb.emit_func_output(gv)
    return bb.get()


def rand(shape, dtype, seed=0):
    rng = np.random.default_rng(seed)
    if np.issubdtype(np.dtype(dtype), np.integer):
        return rng.integers(-100, 100, shape).astype(dtype)
    return rng.standard_normal(shape).astype(dtype)


def llvm_run(mod, *args):
    """Reference: the unpartitioned module on TVM llvm."""
    import tvm
    from tvm import relax
    ex = tvm.compile(relax.transform.FoldConstant()(mod), target="llvm")
    out = relax.VirtualMachine(ex, tvm.cpu())["main"](*[tvm.runtime.tensor(a) for a in args])
    return out.numpy()


# --- one small graph per pattern row family: name -> (module factory, inputs, expected composite) ---

def g_matmul_bias_relu(dtype="float32", m=4, k=16, n=8):
    from tvm import relax
    w = rand((k, n), dtype, 1) if dtype == "float32" else rand((k, n), "int8", 1)
    b = rand((n,), "float32", 2)

    def body(bb, x):
        y = bb.emit(relax.op.matmul(x, const(w)))
        y = bb.emit(relax.op.add(y, const(b)))
        return bb.emit(relax.op.nn.relu(y))
    return graph({"x": ((m, k), dtype)}, body), [rand((m, k), dtype)]


def g_int_matmul(m=4, k=16, n=8, narrow="int8"):
    """MatMulInteger import shape: astype(int8 -> int32) on both sides, int32 accumulate + bias."""
    from tvm import relax
    w = rand((k, n), narrow, 1).astype("int32")       # int32 constant holding int8 values
    b = rand((n,), "int32", 2)

    def body(bb, x):
        xa = bb.emit(relax.op.astype(x, "int32"))
        y = bb.emit(relax.op.matmul(xa, const(w), out_dtype="int32"))
        return bb.emit(relax.op.add(y, const(b)))
    return graph({"x": ((m, k), narrow)}, body), [rand((m, k), narrow)]


def g_conv2d_bias_relu(layout="NCHW"):
    from tvm import relax
    w = rand((6, 3, 3, 3), "float32", 1)
    b = rand((1, 6, 1, 1), "float32", 2)
    shape = (1, 3, 8, 8) if layout == "NCHW" else (1, 8, 8, 3)

    def body(bb, x):
        if layout == "NCHW":
            y = bb.emit(relax.op.nn.conv2d(x, const(w), padding=(1, 1)))
        else:
            y = bb.emit(relax.op.nn.conv2d(x, const(w.transpose(2, 3, 1, 0)), padding=(1, 1), data_layout="NHWC",
                                           kernel_layout="HWIO"))
            return bb.emit(relax.op.nn.relu(y))
        y = bb.emit(relax.op.add(y, const(b)))
        return bb.emit(relax.op.nn.relu(y))
    return graph({"x": (shape, "float32")}, body), [rand(shape, "float32")]


def g_unary(op, shape=(1, 4, 8, 8), dtype="float32", **kw):
    from tvm import relax
    f = {"max_pool2d": lambda x: relax.op.nn.max_pool2d(x, pool_size=2, strides=2),
         "avg_pool2d": lambda x: relax.op.nn.avg_pool2d(x, pool_size=2, strides=2),
         "global_avg_pool2d": lambda x: relax.op.mean(x, axis=[2, 3], keepdims=True),
         "reduce_max": lambda x: relax.op.max(x, axis=kw.get("axis", [1]), keepdims=False),
         "reduce_min": lambda x: relax.op.min(x, axis=kw.get("axis", [1]), keepdims=True),
         "softmax": lambda x: relax.op.nn.softmax(x, axis=kw.get("axis", -1))}[op]
    return graph({"x": (shape, dtype)}, lambda bb, x: bb.emit(f(x))), [rand(shape, dtype)]


def g_attention(heads=4, seq=16, dim=8, mask=False):
    """Q/K/V from [B, S, H*D] -> heads; matmul(Q, permute(K)) * scale (+ mask) -> softmax -> matmul(., V)."""
    from tvm import relax
    d = heads * dim
    m = np.triu(np.full((seq, seq), -1e4, np.float32), 1) if mask else None

    def body(bb, q, k, v):
        def split(t, axes):
            t = bb.emit(relax.op.reshape(t, [1, seq, heads, dim]))
            return bb.emit(relax.op.permute_dims(t, axes))
        qh = split(q, [0, 2, 1, 3])
        kt = split(k, [0, 2, 3, 1])
        vh = split(v, [0, 2, 1, 3])
        s = bb.emit(relax.op.matmul(qh, kt))
        s = bb.emit(relax.op.multiply(s, relax.const(1.0 / np.sqrt(dim), "float32")))
        if mask:
            s = bb.emit(relax.op.add(s, const(m)))
        p = bb.emit(relax.op.nn.softmax(s, axis=-1))
        return bb.emit(relax.op.matmul(p, vh))
    shp = (1, seq, d)
    return (graph({"q": (shp, "float32"), "k": (shp, "float32"), "v": (shp, "float32")}, body),
            [rand(shp, "float32", i) for i in range(3)])


def g_attention_single(seq=8, dim=16):
    """Single-head, 3-D: K transposed with permute_dims(axes=[0, 2, 1])."""
    from tvm import relax

    def body(bb, q, k, v):
        kt = bb.emit(relax.op.permute_dims(k, [0, 2, 1]))
        s = bb.emit(relax.op.matmul(q, kt))
        s = bb.emit(relax.op.divide(s, relax.const(np.sqrt(dim), "float32")))
        p = bb.emit(relax.op.nn.softmax(s, axis=-1))
        return bb.emit(relax.op.matmul(p, v))
    shp = (2, seq, dim)
    return (graph({"q": (shp, "float32"), "k": (shp, "float32"), "v": (shp, "float32")}, body),
            [rand(shp, "float32", i) for i in range(3)])


def g_matmul_clip():
    from tvm import relax
    w = rand((16, 8), "float32", 1)

    def body(bb, x):
        y = bb.emit(relax.op.matmul(x, const(w)))
        return bb.emit(relax.op.clip(y, 0.0, 6.0))
    return graph({"x": ((4, 16), "float32")}, body), [rand((4, 16), "float32")]


def g_gemm_transposed_b():
    """Gemm(transB) with a run-time B: permute_dims(B) folded into transpose_b."""
    from tvm import relax

    def body(bb, x, w):
        wt = bb.emit(relax.op.permute_dims(w, [1, 0]))
        return bb.emit(relax.op.matmul(x, wt))
    return graph({"x": ((4, 16), "float32"), "w": ((8, 16), "float32")}, body), [rand((4, 16), "float32"),
                                                                                rand((8, 16), "float32", 1)]


CASES = {
    # name: (factory, expected composite, expected kind)
    "matmul_bias_relu": (lambda: g_matmul_bias_relu(), "qpu.matmul_bias_relu", "matmul"),
    "int8_matmul_bias": (lambda: g_int_matmul(), "qpu.matmul_bias", "matmul"),
    "int16_matmul_bias": (lambda: g_int_matmul(narrow="int16"), "qpu.matmul_bias", "matmul"),
    "matmul_clip": (g_matmul_clip, "qpu.matmul_clip", "matmul"),
    "gemm_transpose_b": (g_gemm_transposed_b, "qpu.matmul", "matmul"),
    "conv2d_bias_relu": (lambda: g_conv2d_bias_relu(), "qpu.conv2d_bias_relu", "conv2d"),
    "max_pool2d": (lambda: g_unary("max_pool2d"), "qpu.max_pool2d", "max_pool2d"),
    "avg_pool2d": (lambda: g_unary("avg_pool2d"), "qpu.avg_pool2d", "avg_pool2d"),
    "global_avg_pool2d": (lambda: g_unary("global_avg_pool2d"), "qpu.global_avg_pool2d", "global_avg_pool2d"),
    "reduce_max": (lambda: g_unary("reduce_max"), "qpu.reduce_max", "reduce_max"),
    "reduce_min": (lambda: g_unary("reduce_min"), "qpu.reduce_min", "reduce_min"),
    "softmax": (lambda: g_unary("softmax", shape=(3, 10)), "qpu.softmax", "softmax"),
    "attention_multihead": (lambda: g_attention(), "qpu.attention", "attention"),
    "attention_masked": (lambda: g_attention(mask=True), "qpu.attention_mask", "attention"),
    "attention_single_head": (g_attention_single, "qpu.attention_div", "attention"),
}


def sample(name):
    """A small input batch for each bundled model (digits from the bundled test split)."""
    d = np.load(MODELS / "digits_test.npz")
    x = d["x"]
    if name == "lenet5":
        return np.kron(x[:1], np.ones((1, 1, 4, 4), np.float32)).astype(np.float32)
    if name == "mlp":
        return x[:1].reshape(1, 64)
    if name == "transformer_layer":
        return np.random.default_rng(123).standard_normal((1, 16, 32)).astype(np.float32)
    return x[:7] if name == "digits_cnn_batch" else x[:1]


def onnx_model_run(path, feeds, target="qpu", placement="all"):
    """(first output, built library) of an ONNX model built by tvm_qpu for ``target`` and run on
    the emulator."""
    import tvm_qpu
    mod, params = tvm_qpu.from_onnx(path)
    lib = tvm_qpu.build(mod, target=target, params=params, placement=placement)
    r = lib.runner("emulator")
    try:
        return next(iter(r.run(**feeds).values())), lib
    finally:
        r.close()
