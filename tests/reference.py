"""An independent reference for the kernel tests: TVM's own llvm build of the equivalent Relax op.

The kernel modules carry numpy references written to their docstrings; a test that only compares
with them cannot see a semantic choice the kernel and its reference share (issue 13: integer
average pooling floored on both sides while TVM truncates). So every kernel test file also runs a
few representative cases against what TVM computes on the CPU for the same Relax op -- the build a
QPU region replaces.

``tvm_llvm(op, *arrays, **attrs)`` builds a one-op (or, for attention, one-subgraph) Relax function
with the arrays as parameters, compiles it for llvm once per (op, shapes, dtypes, attrs) -- cached
for the process (each xdist worker keeps its own cache) -- and returns the numpy result. Attribute
values must be hashable (tuples, not lists).

TVM 0.27 facts these builds rely on (measured with this module; docs/kernels.md lists them):
* integer ``avg_pool2d`` / ``mean`` sum in the *input* dtype (int8 sums wrap modulo 256) and divide
  with truncation toward zero; the legalized function returns an int64 tensor although Relax
  declares the input dtype -- :func:`narrow` converts it back, refusing values that do not fit;
* integer ``matmul`` / ``conv2d`` are built as ``astype(int32)`` operands (the ONNX importer's
  shape), so they accumulate in int32 and wrap like the QPU's int32 accumulators.
"""
from __future__ import annotations

import functools

import numpy as np

INT_DTYPES = ("int8", "uint8", "int16", "int32")


def _activation(rx, bb, y, act):
    if act is None:
        return y
    if act == "relu":
        return bb.emit(rx.op.nn.relu(y))
    _, lo, hi = act
    return bb.emit(rx.op.clip(y, lo, hi))


def _int32(rx, bb, v):
    return bb.emit(rx.op.astype(v, "int32")) if v.ty.dtype in INT_DTYPES else v


def _matmul(rx, bb, a, b, bias=None, *, transpose_b=False, activation=None):
    a, b = _int32(rx, bb, a), _int32(rx, bb, b)
    if transpose_b:
        b = bb.emit(rx.op.permute_dims(b, [*range(b.ty.ndim - 2), b.ty.ndim - 1,
                                             b.ty.ndim - 2]))
    y = bb.emit(rx.op.matmul(a, b))
    if bias is not None:
        y = bb.emit(rx.op.add(y, bias))
    return _activation(rx, bb, y, activation)


def _conv2d(rx, bb, x, w, bias=None, *, strides=(1, 1), padding=(0, 0, 0, 0), dilation=(1, 1), groups=1,
            activation=None):
    x, w = _int32(rx, bb, x), _int32(rx, bb, w)
    y = bb.emit(rx.op.nn.conv2d(x, w, strides=strides, padding=padding, dilation=dilation, groups=groups))
    if bias is not None:
        y = bb.emit(rx.op.add(y, rx.op.reshape(bias, [1, -1, 1, 1])))
    return _activation(rx, bb, y, activation)


def _pool(kind):
    def body(rx, bb, x, *, pool_size, strides=(1, 1), padding=(0, 0, 0, 0), dilation=(1, 1), ceil_mode=False,
             count_include_pad=False):
        kw = dict(pool_size=pool_size, strides=strides, padding=padding, dilation=dilation, ceil_mode=ceil_mode)
        if kind == "avg":
            kw["count_include_pad"] = count_include_pad
        return bb.emit(getattr(rx.op.nn, f"{kind}_pool2d")(x, **kw))
    return body


def _reduction(name):
    def body(rx, bb, x, *, axis=None, keepdims=False):
        return bb.emit(getattr(rx.op, name)(x, axis=list(axis) if isinstance(axis, tuple) else axis,
                                            keepdims=keepdims))
    return body


def _softmax(rx, bb, x, mask=None, *, scale=None):
    """Softmax over the last axis of [rows, n]; ``mask`` [m, n] is added to row r as mask[r % m]
    (the softmax kernel's rule), after ``x * scale``."""
    if scale is not None:
        x = bb.emit(rx.op.multiply(x, rx.const(np.float32(scale))))
    if mask is not None:
        rows, n = (int(d) for d in x.ty.shape)
        m = int(mask.ty.shape[0])
        x = bb.emit(rx.op.reshape(x, [rows // m, m, n]))
        x = bb.emit(rx.op.reshape(bb.emit(rx.op.add(x, mask)), [rows, n]))
    return bb.emit(rx.op.nn.softmax(x, axis=-1))


def _attention(rx, bb, q, k, v, mask=None, *, scale=1.0, v_scale=1.0, causal=False):
    """softmax(Q K^T * scale (+ mask) (+ causal -inf above the diagonal)) V, V * v_scale for
    integer V; integer Q K^T in int32 (astype operands, as the ONNX importer writes it)."""
    S, T = int(q.ty.shape[1]), int(k.ty.shape[1])
    int_qk = q.ty.dtype in INT_DTYPES
    kt = bb.emit(rx.op.permute_dims(_int32(rx, bb, k), [0, 2, 1]))
    s = bb.emit(rx.op.matmul(_int32(rx, bb, q), kt))
    if int_qk:
        s = bb.emit(rx.op.astype(s, "float32"))
    s = bb.emit(rx.op.multiply(s, rx.const(np.float32(scale))))
    if mask is not None:
        s = bb.emit(rx.op.add(s, mask))
    if causal:
        tri = np.where(np.triu(np.ones((S, T), bool), 1), -np.inf, 0.0).astype(np.float32)
        s = bb.emit(rx.op.add(s, rx.const(tri)))
    p = bb.emit(rx.op.nn.softmax(s, axis=-1))
    int_v = v.ty.dtype in INT_DTYPES
    out = bb.emit(rx.op.matmul(p, bb.emit(rx.op.astype(v, "float32")) if int_v else v))
    if int_v:
        out = bb.emit(rx.op.multiply(out, rx.const(np.float32(v_scale))))
    return out


def _add(rx, bb, a, b, *, activation=None):
    """a + b (b of a's shape or broadcast), then ReLU / clip, or a GELU ("gelu" / "gelu_tanh")."""
    y = bb.emit(rx.op.add(a, b))
    if activation in ("gelu", "gelu_tanh"):
        return _gelu(rx, bb, y, approximate="none" if activation == "gelu" else "tanh")
    return _activation(rx, bb, y, activation)


def _gelu(rx, bb, x, *, approximate="none"):
    return bb.emit(rx.op.nn.gelu(x) if approximate == "none" else rx.op.nn.gelu_tanh(x))


def _layer_norm(rx, bb, x, gamma, beta, *, epsilon=1e-5):
    return bb.emit(rx.op.nn.layer_norm(x, gamma, beta, axes=[-1], epsilon=epsilon))


BODIES = {
    "add": _add,
    "gelu": _gelu,
    "layer_norm": _layer_norm,
    "matmul": _matmul,
    "conv2d": _conv2d,
    "max_pool2d": _pool("max"),
    "avg_pool2d": _pool("avg"),
    "mean": _reduction("mean"),
    "sum": _reduction("sum"),
    "max": _reduction("max"),
    "min": _reduction("min"),
    "argmax": _reduction("argmax"),
    "argmin": _reduction("argmin"),
    "softmax": _softmax,
    "attention": _attention,
}


@functools.lru_cache(maxsize=None)
def _compiled(op: str, sig: tuple, attrs: tuple):
    """The llvm VM function of ``BODIES[op]`` over parameters of signature ``sig``."""
    import tvm
    from tvm import relax as rx
    bb = rx.BlockBuilder()
    params = [rx.Var(f"p{i}", rx.TensorType(list(shape), dtype)) for i, (shape, dtype) in enumerate(sig)]
    with bb.function("main", params):
        with bb.dataflow():
            out = BODIES[op](rx, bb, *params, **dict(attrs))
            gv = bb.emit_output(out)
        bb.emit_func_output(gv)
    ex = tvm.compile(bb.get(), target="llvm")
    return rx.VirtualMachine(ex, tvm.cpu())["main"]


def tvm_llvm(op: str, *arrays, **attrs) -> np.ndarray:
    """``op`` (a key of :data:`BODIES`) on ``arrays`` as TVM's llvm build computes it. ``None``
    arrays (an absent bias / mask) are dropped."""
    import tvm
    arrays = [np.ascontiguousarray(a) for a in arrays if a is not None]
    sig = tuple((tuple(int(d) for d in a.shape), str(a.dtype)) for a in arrays)
    fn = _compiled(op, sig, tuple(sorted(attrs.items())))
    return fn(*[tvm.runtime.tensor(a) for a in arrays]).numpy()


def narrow(ref: np.ndarray, dtype) -> np.ndarray:
    """TVM's int64 result of an integer average / mean, as ``dtype`` (the dtype Relax declares);
    a value that does not fit is an error, never silently wrapped."""
    dtype = np.dtype(dtype)
    if ref.dtype == dtype:
        return ref
    info = np.iinfo(dtype)
    if ref.size and (ref.min() < info.min or ref.max() > info.max):
        raise ValueError(f"TVM's result does not fit {dtype}: [{ref.min()}, {ref.max()}]")
    return ref.astype(dtype)


# ------------------------------------------------------------------------------------------------
# numpy written to the ONNX spec (integer kernels)

def spec_requant(acc, scale, zp, lo, hi, dtype):
    """QuantizeLinear(acc * scale) to the spec: float32 product, round half to even, + zero point,
    saturate to [lo, hi] (the dtype's range narrowed by a fused clamp)."""
    y = np.asarray(acc).astype(np.float32) * np.asarray(scale, np.float32)
    q = np.rint(y.astype(np.float64)) + zp
    return np.clip(q, lo, hi).astype(dtype)


def conv2d_int64(x, w, pad, bias=None):
    """int64 direct convolution (NCHW / OIHW, stride 1, ``pad`` on every side) plus an optional
    per-output-channel bias."""
    n, c, h, wd = x.shape
    oc, _, kh, kw = w.shape
    xp = np.pad(x.astype(np.int64), ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    oh, ow = h + 2 * pad - kh + 1, wd + 2 * pad - kw + 1
    out = np.zeros((n, oc, oh, ow), np.int64)
    for i in range(kh):
        for j in range(kw):
            out += np.einsum("nchw,oc->nohw", xp[:, :, i:i + oh, j:j + ow], w[:, :, i, j].astype(np.int64))
    return out + (0 if bias is None else bias.astype(np.int64).reshape(1, -1, 1, 1))
