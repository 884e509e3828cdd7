"""ONNX importers for quantized operators TVM 0.27's ONNX frontend lacks (QOperator and
``quantize_dynamic`` models).

TVM 0.27's Relax ONNX frontend (``tvm.relax.frontend.onnx.onnx_frontend``) looks a node's converter
up by ``op_type`` in the table that the module-level function ``_get_convert_map()`` returns; it
calls that function afresh for every node and for its unsupported-op check. :func:`register`
replaces the module attribute with a wrapper returning TVM's table plus :data:`CONVERTERS`
(ours win on a name clash; TVM's own ``MatMulInteger``, ``DynamicQuantizeLinear``,
``QuantizeLinear`` and ``DequantizeLinear`` are kept). :func:`tvm_qpu.from_onnx` calls it, so does
anyone else who wants ``tvm.relax.frontend.onnx.from_onnx`` to read these ops; it is idempotent and
:func:`unregister` restores TVM's function.

Every QLinear* op is imported as its definition in the ONNX spec / ONNX Runtime contrib-op docs:
``QuantizeLinear(op(DequantizeLinear(x), DequantizeLinear(w), DequantizeLinear(bias)), y)``, the
Relax form of a QDQ model. :mod:`tvm_qpu.quant` then rewrites each ``DQ -> Conv / MatMul / Gemm
(+ bias) (-> Relu)`` chain into the exact int32 integer op (an int8 QPU region) and checks its
quantization parameters; what it refuses (zero / negative / NaN scales, per-axis scales on another
axis, an int32 accumulator that could overflow) stays in float on the CPU, with the reason in the
partition report. The integer bias of QLinearConv / QGemm has the scale ``x_scale * w_scale``
(``alpha * a_scale * b_scale`` for QGemm) and zero point 0 (ONNX spec of QLinearConv; ORT's QGemm
docs): its ``DequantizeLinear`` gets that product as a constant, computed here in float32 as the
quantizer writes it, when both scales are initializers, so the rewrite adds it to the int32
accumulator.

ConvInteger (``quantize_dynamic``'s conv) is integer already: ``conv(x - x_zero_point,
w - w_zero_point)`` in int32, exactly as the spec defines it (the padding is zero after the
subtraction, as ONNX Runtime pads with the zero point before it). ``x - x_zero_point`` of an 8-bit
input provably fits int16 and the weight is a constant, so the backend's operand narrowing offloads
it as an integer region like MatMulInteger's.

Ops (domain ``""`` unless noted): QLinearConv, QLinearMatMul, ConvInteger, and from
``com.microsoft`` QGemm, QLinearAdd, QLinearGlobalAveragePool, QLinearConcat. The frontend ignores
the domain (it keys on ``op_type``), as ONNX Runtime's names are unique.
"""
from __future__ import annotations

import numpy as np

#: rank of the weight scale / zero point that means "per output channel" (a 1-D vector)
PER_AXIS_RANK = 1
#: opset asked of TVM's float converters: picks their newest implementation (Conv v11, Gemm v13 in
#: TVM 0.27), which covers every opset the quantized ops occur with
NEWEST_OPSET = 1 << 20


class QuantImportError(ValueError):
    """A quantized node whose inputs break the operator's definition (raised at import)."""


# ---------------------------------------------------------------------------------------------
# helpers

def _known_value(expr, params):
    """The numpy value of a constant or an initializer (a parameter kept as a main input), else None."""
    from tvm import relax
    from .patterns import const_value, is_constant
    if is_constant(expr):
        return const_value(expr)
    if isinstance(expr, relax.Var) and params is not None:
        _, table = params
        hit = table.get(expr.name)
        if hit is not None and hit[0].same_as(expr):
            v = hit[1]
            return v.numpy() if hasattr(v, "numpy") else np.asarray(v)
    return None


def _dtype(expr) -> str:
    return str(expr.ty.dtype)


def _ndim(expr) -> int:
    return int(expr.ty.ndim)


def _scale_rank(scale, what, node) -> int:
    nd = _ndim(scale)
    if nd > PER_AXIS_RANK:
        raise QuantImportError(f"{node}: {what} must be a scalar or a 1-D per-axis vector, got rank {nd}")
    return nd


def _scalar_if_one(e, params):
    """A one-element 1-D scale / zero point as the scalar it means (per-tensor): a 0-d constant when
    its value is known at import (the QDQ rewrite needs constant quantization parameters), else a
    reshape."""
    from tvm import relax
    import tvm
    if _ndim(e) == 1 and int(e.ty.shape[0]) == 1:
        v = _known_value(e, params)
        if v is not None:
            return relax.const(tvm.runtime.tensor(np.ascontiguousarray(v.reshape(()))))
        return relax.op.reshape(e, ())
    return e


def _zero(dtype):
    from tvm import relax
    return relax.const(np.zeros((), dtype), dtype)


def _dequantize(bb, x, scale, zp, axis, node, what, params):
    """``DequantizeLinear(x, scale, zp)`` (zp None -> 0 of x's dtype) on ``axis`` when per-axis."""
    from tvm import relax
    if _dtype(x) not in ("int8", "uint8", "int32"):
        raise QuantImportError(f"{node}: {what} has dtype {_dtype(x)} (int8 / uint8 / int32 bias expected)")
    _scale_rank(scale, f"{what} scale", node)
    if zp is None:
        zp = _zero(_dtype(x))
    elif _dtype(zp) != _dtype(x):
        raise QuantImportError(f"{node}: {what} zero point is {_dtype(zp)}, the tensor {_dtype(x)}")
    scale, zp = _scalar_if_one(scale, params), _scalar_if_one(zp, params)
    return bb.normalize(relax.op.dequantize(x, scale, zp, axis=axis % max(_ndim(x), 1), out_dtype="float32"))


def _quantize(y, scale, zp, node, params):
    """``QuantizeLinear(y, scale, zp)``: per-tensor output (every QLinear op's y_scale is a scalar);
    no zero point means uint8 (ONNX spec)."""
    from tvm import relax
    if _ndim(scale) != 0 and not (_ndim(scale) == 1 and int(scale.ty.shape[0]) == 1):
        raise QuantImportError(f"{node}: the output scale must be a scalar")
    dt = "uint8" if zp is None else _dtype(zp)
    if dt not in ("int8", "uint8"):
        raise QuantImportError(f"{node}: output zero point dtype {dt} (int8 / uint8 expected)")
    if zp is None:
        zp = _zero(dt)
    scale, zp = _scalar_if_one(scale, params), _scalar_if_one(zp, params)
    return relax.op.quantize(y, scale, zp, axis=-1, out_dtype=dt)


def _bias_dequantize(bb, bias, scale_parts, axis, node, params):
    """``DequantizeLinear(bias, prod(scale_parts), 0)``: the product is a float32 constant when every
    factor is known at import (so :mod:`tvm_qpu.quant` can put the bias on the accumulator), else an
    expression (the bias then stays a float add)."""
    from tvm import relax
    import tvm
    if _dtype(bias) != "int32":
        raise QuantImportError(f"{node}: bias has dtype {_dtype(bias)} (int32 expected)")
    vals = [v if isinstance(v, (int, float)) else _known_value(v, params) for v in scale_parts]
    if all(v is not None for v in vals):
        prod = np.float32(1)
        for v in vals:
            prod = (prod * np.asarray(v, np.float32)).astype(np.float32)
        if prod.size == 1:
            prod = prod.reshape(())          # per-tensor (one-element vectors included)
        scale = relax.const(tvm.runtime.tensor(np.ascontiguousarray(prod)))
    else:
        scale = None
        for v in scale_parts:
            v = relax.const(np.float32(v)) if isinstance(v, (int, float)) else v
            scale = v if scale is None else relax.op.multiply(scale, v)
        scale = bb.normalize(scale)
    if _ndim(scale) > 1:
        raise QuantImportError(f"{node}: bias scale must be a scalar or a vector")
    return bb.normalize(relax.op.dequantize(bias, scale, _zero("int32"), axis=axis, out_dtype="float32"))


def _int32(zp, shape, params):
    """A zero point as int32 of ``shape``: a constant when its value is known at import (Relax's
    FoldConstant leaves casts of 0-d constants unfolded, which would keep ``w - zw`` from becoming a
    constant weight), else the cast expression."""
    from tvm import relax
    import tvm
    v = _known_value(zp, params)
    if v is not None:
        return relax.const(tvm.runtime.tensor(np.ascontiguousarray(v.astype(np.int32).reshape(shape))))
    e = relax.op.astype(zp, "int32")
    return relax.op.reshape(e, shape) if tuple(shape) != tuple(int(d) for d in zp.ty.shape.values) else e


def _node(attr, op):
    name = attr.get("tvm_custom", {}).get("name", "")
    return f"{op} {name!r}" if name else op


def _tvm_converter(name):
    """TVM's own converter of a float op (Conv, Gemm), newest implementation: the quantized ops
    delegate their float core to it so the Relax form equals a QDQ model's."""
    from tvm.relax.frontend.onnx import onnx_frontend as F
    return getattr(F, name).get_converter(NEWEST_OPSET)


def _conv_attrs(attr):
    """The Conv attributes of a QLinearConv / ConvInteger node (a copy: TVM's converter edits it)."""
    return {k: v for k, v in attr.items() if k in ("auto_pad", "dilations", "group", "kernel_shape", "pads",
                                                     "strides", "tvm_custom")}


def _check_inputs(inputs, lo, hi, node):
    n = len(inputs)
    if not lo <= n <= hi:
        raise QuantImportError(f"{node}: {n} inputs, expected {lo}{'' if lo == hi else f' to {hi}'}")
    return inputs


# ---------------------------------------------------------------------------------------------
# converters (each: TVM's OnnxOpConverter interface, ``_impl_v<since opset>``)

def _base():
    from tvm.relax.frontend.onnx.onnx_frontend import OnnxOpConverter
    return OnnxOpConverter


def _qlinear_conv(bb, inputs, attr, params):
    node = _node(attr, "QLinearConv")
    _check_inputs(inputs, 8, 9, node)
    x, sx, zx, w, sw, zw, sy, zy = inputs[:8]
    bias = inputs[8] if len(inputs) > 8 else None
    if _ndim(sx) == 1 and int(sx.ty.shape[0]) != 1:
        raise QuantImportError(f"{node}: x_scale must be a scalar (per-tensor)")
    xf = _dequantize(bb, x, sx, zx, 0, node, "x", params)
    wf = _dequantize(bb, w, sw, zw, 0, node, "w", params)            # per output channel: axis 0 of [M, C/g, kH, kW]
    ins = [xf, wf, None]
    if bias is not None:
        ins[2] = _bias_dequantize(bb, bias, [sx, sw], 0, node, params)
    y = _tvm_converter("Conv")(bb, ins, _conv_attrs(attr), params)
    return _quantize(y, sy, zy, node, params)


def _qlinear_matmul(bb, inputs, attr, params):
    node = _node(attr, "QLinearMatMul")
    _check_inputs(inputs, 8, 8, node)
    a, sa, za, b, sb, zb, sy, zy = inputs
    # per-row a scale (1-D, M rows of a 2-D a) / per-column b scale (1-D, N columns of a 2-D b)
    a_axis = 0 if _ndim(sa) == 1 and _ndim(a) == 2 else -1
    b_axis = 1 if _ndim(sb) == 1 and _ndim(b) == 2 else -1
    for s, t, what in ((sa, a, "a"), (sb, b, "b")):
        if _ndim(s) == 1 and int(s.ty.shape[0]) != 1 and _ndim(t) != 2:
            raise QuantImportError(f"{node}: a per-axis {what}_scale needs a 2-D {what}")
    af = _dequantize(bb, a, sa, za, a_axis, node, "a", params)
    bf = _dequantize(bb, b, sb, zb, b_axis, node, "b", params)
    from tvm import relax
    return _quantize(relax.op.matmul(af, bf), sy, zy, node, params)


def _qgemm(bb, inputs, attr, params):
    """com.microsoft QGemm: ``Y = alpha * A' B' + C`` with C int32 of scale ``alpha * a_scale * b_scale``;
    quantized output when y_scale is given, float otherwise."""
    node = _node(attr, "QGemm")
    _check_inputs(inputs, 6, 9, node)
    a, sa, za, b, sb, zb = inputs[:6]
    c = inputs[6] if len(inputs) > 6 else None
    sy = inputs[7] if len(inputs) > 7 else None
    zy = inputs[8] if len(inputs) > 8 else None
    alpha = float(attr.get("alpha", 1.0))
    trans_b = int(attr.get("transB", 0))
    if _ndim(a) != 2 or _ndim(b) != 2:
        raise QuantImportError(f"{node}: A and B must be 2-D")
    if _ndim(sa) == 1 and int(sa.ty.shape[0]) != 1:
        raise QuantImportError(f"{node}: a_scale must be a scalar (per-tensor)")
    af = _dequantize(bb, a, sa, za, -1, node, "A", params)
    bf = _dequantize(bb, b, sb, zb, 0 if trans_b else 1, node, "B", params)     # per output column N
    ins = [af, bf, None]
    if c is not None:
        ins[2] = _bias_dequantize(bb, c, [alpha, sa, sb], -1 if _ndim(c) != 1 else 0, node, params)
    gattr = {"alpha": alpha, "transA": int(attr.get("transA", 0)), "transB": trans_b}
    y = _tvm_converter("Gemm")(bb, ins, gattr, params)
    return y if sy is None else _quantize(y, sy, zy, node, params)


def _conv_integer(bb, inputs, attr, params):
    """ConvInteger: int32 ``conv(x - x_zero_point, w - w_zero_point)`` (w_zero_point per output channel
    when 1-D)."""
    from tvm import relax
    node = _node(attr, "ConvInteger")
    _check_inputs(inputs, 2, 4, node)
    x, w = inputs[0], inputs[1]
    zx = inputs[2] if len(inputs) > 2 else None
    zw = inputs[3] if len(inputs) > 3 else None
    for t, what in ((x, "x"), (w, "w")):
        if _dtype(t) not in ("int8", "uint8"):
            raise QuantImportError(f"{node}: {what} has dtype {_dtype(t)} (int8 / uint8 expected)")
    xi = relax.op.astype(x, "int32")
    if zx is not None:
        if _ndim(zx) > 1 or (_ndim(zx) == 1 and int(zx.ty.shape[0]) != 1):
            raise QuantImportError(f"{node}: x_zero_point must be a scalar")
        xi = relax.op.subtract(xi, _int32(zx, (), params))
    wi = relax.op.astype(w, "int32")
    if zw is not None:
        if _ndim(zw) > 1:
            raise QuantImportError(f"{node}: w_zero_point must be a scalar or a 1-D vector")
        shape = () if _ndim(zw) == 0 else [-1] + [1] * (_ndim(w) - 1)
        wi = relax.op.subtract(wi, _int32(zw, shape, params))
    xi, wi = bb.normalize(xi), bb.normalize(wi)
    attrs = _conv_attrs(attr)
    if "kernel_shape" not in attrs:
        attrs["kernel_shape"] = list(w.ty.shape.values[2:])
    return _tvm_converter("Conv")(bb, [xi, wi, None], attrs, params)


def _qlinear_add(bb, inputs, attr, params):
    from tvm import relax
    node = _node(attr, "QLinearAdd")
    _check_inputs(inputs, 7, 8, node)
    a, sa, za, b, sb, zb, sy = inputs[:7]
    zy = inputs[7] if len(inputs) > 7 else None
    for s, what in ((sa, "A"), (sb, "B")):
        if _ndim(s) == 1 and int(s.ty.shape[0]) != 1:
            raise QuantImportError(f"{node}: {what}_scale must be a scalar")
    y = relax.op.add(_dequantize(bb, a, sa, za, -1, node, "A", params),
                     _dequantize(bb, b, sb, zb, -1, node, "B", params))
    return _quantize(y, sy, zy, node, params)


def _qlinear_global_average_pool(bb, inputs, attr, params):
    from tvm import relax
    node = _node(attr, "QLinearGlobalAveragePool")
    _check_inputs(inputs, 4, 5, node)
    x, sx, zx, sy = inputs[:4]
    zy = inputs[4] if len(inputs) > 4 else None
    nd = _ndim(x)
    if nd < 3:
        raise QuantImportError(f"{node}: input must have a batch, a channel and spatial axes")
    if int(attr.get("channels_last", 0)):
        axes = list(range(1, nd - 1))
    else:
        axes = list(range(2, nd))
    y = relax.op.mean(_dequantize(bb, x, sx, zx, -1, node, "X", params), axis=axes, keepdims=True)
    return _quantize(y, sy, zy, node, params)


def _qlinear_concat(bb, inputs, attr, params):
    from tvm import relax
    node = _node(attr, "QLinearConcat")
    if len(inputs) < 5 or (len(inputs) - 2) % 3:
        raise QuantImportError(f"{node}: expected Y_scale, Y_zero_point and (tensor, scale, zero point) triples, "
                               f"got {len(inputs)} inputs")
    sy, zy = inputs[0], inputs[1]
    parts = [_dequantize(bb, inputs[i], inputs[i + 1], inputs[i + 2], -1, node, f"input {(i - 2) // 3}",
                         params)
             for i in range(2, len(inputs), 3)]
    y = relax.op.concat(parts, axis=int(attr["axis"]))
    return _quantize(y, sy, zy, node, params)


#: op_type -> (since opset of the default domain the converter is valid for, conversion function)
_TABLE = {
    "QLinearConv": (10, _qlinear_conv),
    "QLinearMatMul": (10, _qlinear_matmul),
    "ConvInteger": (10, _conv_integer),
    "QGemm": (1, _qgemm),
    "QLinearAdd": (1, _qlinear_add),
    "QLinearGlobalAveragePool": (1, _qlinear_global_average_pool),
    "QLinearConcat": (1, _qlinear_concat),
}


def _make_converter(op, since, fn):
    """A TVM ``OnnxOpConverter`` subclass named ``op`` whose one implementation calls ``fn``."""
    def impl(cls, bb, inputs, attr, params):
        return fn(bb, inputs, attr, params)
    return type(op, (_base(),), {f"_impl_v{since}": classmethod(impl), "__doc__": fn.__doc__,
                                 "__module__": __name__})


_CONVERTERS = None


def converters() -> dict:
    """{op_type: converter class} of this module."""
    global _CONVERTERS
    if _CONVERTERS is None:
        _CONVERTERS = {op: _make_converter(op, since, fn) for op, (since, fn) in _TABLE.items()}
    return dict(_CONVERTERS)


def register() -> None:
    """Make TVM's ONNX frontend use :func:`converters` (idempotent)."""
    from tvm.relax.frontend.onnx import onnx_frontend as F
    if getattr(F._get_convert_map, "_tvm_qpu", False):
        return
    original = F._get_convert_map
    ours = converters()

    def _get_convert_map():
        table = original()
        table.update(ours)
        return table

    _get_convert_map._tvm_qpu = True
    _get_convert_map._original = original
    F._get_convert_map = _get_convert_map


def unregister() -> None:
    """Restore TVM's own converter table."""
    from tvm.relax.frontend.onnx import onnx_frontend as F
    if getattr(F._get_convert_map, "_tvm_qpu", False):
        F._get_convert_map = F._get_convert_map._original
