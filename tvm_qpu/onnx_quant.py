"""ONNX importers for quantized operators TVM 0.27's ONNX frontend lacks (QOperator and
``quantize_dynamic`` models).

TVM 0.27's Relax ONNX frontend (``tvm.relax.frontend.onnx.onnx_frontend``) looks a node's converter
up by ``op_type`` in the table that the module-level function ``_get_convert_map()`` returns; it
calls that function afresh for every node and for its unsupported-op check. :func:`register`
replaces the module attribute with a wrapper returning TVM's table plus :data:`CONVERTERS`
(ours win on a name clash; TVM's own ``MatMulInteger``, ``DynamicQuantizeLinear`` and
``QuantizeLinear`` are kept, ``DequantizeLinear`` is TVM's plus block-wise quantization, see the
4-bit / 2-bit section below). :func:`tvm_qpu.from_onnx` calls it, so does
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
        _CONVERTERS["DequantizeLinear"] = _dequantize_linear_converter()    # + block-wise (opset 21)
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


# ---------------------------------------------------------------------------------------------
# 4-bit and 2-bit weights (ONNX INT4 / UINT4, opset 21; INT2 / UINT2, opset 25)
#
# TVM 0.27's ONNX frontend reads an initializer's bytes as one element per byte and fails on the
# packed sub-byte types ("TensorCopyFromBytes: size mismatch"). :func:`lower_lowbit` runs on the
# ONNX graph before TVM sees it: every INT4 / UINT4 / INT2 / UINT2 initializer (and Constant node
# value) becomes an int8 / uint8 tensor of the same name and the same integer values, so
# ``DequantizeLinear`` reads the values the ONNX spec defines. Packing (ONNX IR spec, "4-bit /
# 2-bit integer types"; onnx.numpy_helper's packers): element i of the flattened tensor is in byte
# i // (8 / bits), at bit offset bits * (i % (8 / bits)), low bits first ("low nibble first" for
# 4-bit); the last byte is zero-padded; signed types are two's complement in their bits. The bytes
# come from ``raw_data`` or, one packed byte per element, from ``int32_data`` (what
# ``onnx.helper.make_tensor`` writes). A byte count other than ceil(n * bits / 8) is refused with
# the tensor's name (a malformed model must not be read as other values).
#
# A ``QuantizeLinear`` to a 4 / 2-bit type (its zero point's type or ``output_dtype``) becomes the
# 8-bit quantize followed by a ``Clip`` to the 4 / 2-bit range (saturating to 8 bits, then to 4,
# is saturating to 4); a ``Cast`` to a 4 / 2-bit type is refused.
#
# Block-wise ``DequantizeLinear`` (opset 21 ``block_size``: scale [.., ceil(D / B), ..] along
# ``axis``) is not in TVM 0.27's converter. :func:`lower_lowbit` rewrites a block-wise dequantize
# whose scale and zero point are initializers into the per-axis (or per-tensor) form when that is
# exact (every block of a row has the same scale and zero point); the others are converted by
# :func:`_dequantize_blockwise` as ``float32(x - zp) * scale`` with the scale repeated over each
# block (ONNX's definition; ONNX Runtime computes the same product in float32), which keeps the
# consumer in float: a scale varying along the reduction axis cannot be factored out of an int32
# accumulation. :mod:`tvm_qpu.quant` reports that with the reason (the notes of :class:`LowBitInfo`).

#: ONNX TensorProto element type -> (type name, bits, signed): the packed sub-byte integer types
#: (values of onnx.TensorProto.UINT4 / INT4 / UINT2 / INT2 in onnx >= 1.20; a test checks them)
LOWBIT_TYPES = {21: ("uint4", 4, False), 22: ("int4", 4, True), 25: ("uint2", 2, False), 26: ("int2", 2, True)}
#: main-function attribute carrying :class:`LowBitInfo` (JSON) from the import to the QDQ rewrite
LOWBIT_ATTR = "tvm_qpu.lowbit"
#: ONNX element types of the unpacked tensors (INT8 = 3, UINT8 = 2)
_UNPACKED_TYPE = {True: 3, False: 2}


class LowBitImportError(QuantImportError):
    """A 4-bit / 2-bit tensor of the model cannot be read as the ONNX spec defines it."""


def lowbit_range(bits: int, signed: bool) -> tuple:
    """(min, max) of a ``bits``-bit integer."""
    return (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)


def lowbit_fingerprint(values) -> str:
    """A content key of an integer tensor (its flattened values and count, not its dtype or shape):
    how the QDQ rewrite recognizes a weight that came from a 4 / 2-bit initializer."""
    import hashlib
    v = np.ascontiguousarray(np.asarray(values).astype(np.int64).reshape(-1))
    return f"{v.size}:" + hashlib.sha1(v.tobytes()).hexdigest()[:20]


def unpack_lowbit(tensor) -> np.ndarray:
    """The values of an INT4 / UINT4 / INT2 / UINT2 ``onnx.TensorProto`` as an int8 / uint8 array of
    its shape (see the section comment for the packing). Raises :class:`LowBitImportError` naming
    the tensor when its data does not hold exactly its shape's elements."""
    if tensor.data_type not in LOWBIT_TYPES:
        raise LowBitImportError(f"tensor {tensor.name!r}: element type {tensor.data_type} is not a 4 / 2-bit integer")
    tname, bits, signed = LOWBIT_TYPES[tensor.data_type]
    dims = [int(d) for d in tensor.dims]
    if any(d < 0 for d in dims):
        raise LowBitImportError(f"{tname} tensor {tensor.name!r}: negative dimension in {dims}")
    n = int(np.prod(dims, dtype=np.int64))
    per = 8 // bits
    want = -(-n // per)
    if tensor.HasField("data_location") and tensor.data_location == 1:       # EXTERNAL, not loaded
        raise LowBitImportError(f"{tname} tensor {tensor.name!r}: external data was not loaded")
    if tensor.raw_data:
        packed = np.frombuffer(tensor.raw_data, np.uint8)
        where = "raw_data"
    else:
        ints = np.asarray(tensor.int32_data, np.int64)
        if ints.size and (ints.min() < 0 or ints.max() > 255):
            raise LowBitImportError(f"{tname} tensor {tensor.name!r}: int32_data holds values outside one "
                                    f"packed byte (0..255)")
        packed = ints.astype(np.uint8)
        where = "int32_data"
    if packed.size != want:
        raise LowBitImportError(f"{tname} tensor {tensor.name!r}: {where} has {packed.size} bytes; its shape "
                                f"{dims} ({n} elements, {per} per byte) needs {want}")
    shifts = (np.arange(per, dtype=np.uint8) * bits)
    fields = (packed[:, None] >> shifts[None, :]) & np.uint8((1 << bits) - 1)
    vals = fields.reshape(-1)[:n].astype(np.int16)          # the padding after the last element is ignored
    if signed:
        vals = np.where(vals >= (1 << (bits - 1)), vals - (1 << bits), vals)
    return vals.astype(np.int8 if signed else np.uint8).reshape(dims)


class LowBitInfo:
    """What :func:`lower_lowbit` did: ``weights`` {fingerprint of the unpacked values: type name}
    and ``notes`` [(node, reason)] (block-wise dequantizes kept in float)."""

    def __init__(self, weights=None, notes=None):
        self.weights = dict(weights or {})
        self.notes = [tuple(n) for n in (notes or [])]

    def to_json(self) -> str:
        import json
        return json.dumps({"weights": self.weights, "notes": [list(n) for n in self.notes]}, sort_keys=True)

    @classmethod
    def from_json(cls, text):
        import json
        d = json.loads(str(text))
        return cls(d.get("weights"), d.get("notes"))

    def __bool__(self):
        return bool(self.weights or self.notes)


def _unpacked_tensor(tensor):
    from onnx import numpy_helper
    arr = unpack_lowbit(tensor)
    out = numpy_helper.from_array(arr, tensor.name)
    out.doc_string = tensor.doc_string
    return arr, out


def _retype_value_infos(graph, names):
    """Give the graph's declared value types of ``names`` ({name: signed}) the unpacked type."""
    for vi in list(graph.input) + list(graph.output) + list(graph.value_info):
        if vi.name in names and vi.type.tensor_type.elem_type in LOWBIT_TYPES:
            vi.type.tensor_type.elem_type = _UNPACKED_TYPE[names[vi.name]]


def _reduce_blockwise(x_shape, axis, scale, zp):
    """The per-axis / per-tensor form of a block-wise (scale, zero point) when it is exact: every
    block along ``axis`` has the same value. Returns (scale, zp, new axis or None) or None."""
    def along(a):
        first = np.take(a, [0], axis=axis)
        return first if np.array_equal(np.broadcast_to(first, a.shape), a) else None
    s1 = along(scale)
    z1 = along(zp) if zp is not None else None
    if s1 is None or (zp is not None and z1 is None):
        return None
    varying = [d for d in range(scale.ndim)
               if d != axis and not np.array_equal(np.broadcast_to(np.take(s1, [0], axis=d), s1.shape), s1)]
    if zp is not None:
        varying += [d for d in range(zp.ndim) if d != axis and d not in varying and
                    not np.array_equal(np.broadcast_to(np.take(z1, [0], axis=d), z1.shape), z1)]
    if len(varying) > 1:
        return None
    if not varying:
        return s1.reshape(-1)[:1].reshape(()), (None if zp is None else z1.reshape(-1)[:1].reshape(())), None
    j = varying[0]
    if scale.shape[j] != x_shape[j]:
        return None
    idx = [0] * scale.ndim
    idx[j] = slice(None)
    s_vec = s1[tuple(idx)].reshape(-1)
    z_vec = None
    if zp is not None:
        z_vec = np.broadcast_to(z1, s1.shape)[tuple(idx)].reshape(-1)
    return s_vec, z_vec, j


def lower_lowbit(model):
    """A copy of ``model`` that TVM's frontend can import (see the section comment) and the
    :class:`LowBitInfo` of what changed; ``model`` itself when it has no 4 / 2-bit tensor and no
    block-wise dequantize. Raises :class:`LowBitImportError` naming the tensor for a malformed
    packed initializer or a 4 / 2-bit graph input (a run-time tensor has no numpy dtype to feed)."""
    import onnx
    from onnx import numpy_helper
    g = model.graph
    has_lowbit = any(t.data_type in LOWBIT_TYPES for t in g.initializer) or any(
        a.t.data_type in LOWBIT_TYPES for n in g.node if n.op_type == "Constant" for a in n.attribute if a.name == "value")
    blockwise = [n for n in g.node if n.op_type == "DequantizeLinear"
                 and any(a.name == "block_size" and a.i for a in n.attribute)]
    for n in g.node:             # ops that would compute a 4 / 2-bit tensor TVM cannot represent
        to = next((a.i for a in n.attribute if a.name == "to"), None)
        if n.op_type == "Cast" and to in LOWBIT_TYPES:
            raise LowBitImportError(f"Cast {n.name or n.output[0]!r} to {LOWBIT_TYPES[to][0]}: 4 / 2-bit tensors "
                                    f"computed at run time are not supported (only initializers)")
    packed = {t.name for t in g.initializer if t.data_type in LOWBIT_TYPES}
    for n in g.node:
        if n.op_type == "CastLike" and len(n.input) > 1 and n.input[1] in packed:
            raise LowBitImportError(f"CastLike {n.name or n.output[0]!r} to the type of {n.input[1]!r}: 4 / 2-bit "
                                    f"tensors computed at run time are not supported (only initializers)")
    lowbit_q = {i: k for i, n in enumerate(g.node) if n.op_type == "QuantizeLinear"
                for k in [_lowbit_quantize_type(n, g)] if k is not None}
    inits = {t.name for t in g.initializer}
    for vi in g.input:
        if vi.name not in inits and vi.type.tensor_type.elem_type in LOWBIT_TYPES:
            tname = LOWBIT_TYPES[vi.type.tensor_type.elem_type][0]
            raise LowBitImportError(f"graph input {vi.name!r} has type {tname}: only initializers may be 4 / 2-bit "
                                    f"(a run-time input has no numpy dtype to feed)")
    if not has_lowbit and not blockwise and not lowbit_q:
        return model, LowBitInfo()
    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    info = LowBitInfo()
    retyped = {}
    for i, t in enumerate(g.initializer):
        if t.data_type in LOWBIT_TYPES:
            tname, _, signed = LOWBIT_TYPES[t.data_type]
            arr, new = _unpacked_tensor(t)
            g.initializer[i].CopyFrom(new)
            info.weights[lowbit_fingerprint(arr)] = tname
            retyped[t.name] = signed
    for n in g.node:
        if n.op_type != "Constant":
            continue
        for a in n.attribute:
            if a.name == "value" and a.t.data_type in LOWBIT_TYPES:
                tname, _, signed = LOWBIT_TYPES[a.t.data_type]
                arr, new = _unpacked_tensor(a.t)
                a.t.CopyFrom(new)
                info.weights[lowbit_fingerprint(arr)] = tname
                retyped.update({o: signed for o in n.output})
    for i in sorted(lowbit_q, reverse=True):     # QuantizeLinear to 4 / 2 bits: saturate (Clip)
        _saturate_lowbit_quantize(g, i, lowbit_q[i], retyped)
    _retype_value_infos(g, retyped)
    values = {t.name: t for t in g.initializer}
    for n in g.node:
        if n.op_type != "DequantizeLinear" or not any(a.name == "block_size" and a.i for a in n.attribute):
            continue
        _lower_blockwise_node(g, n, values, info)
    return m, info


def _lowbit_quantize_type(n, g):
    """The LOWBIT_TYPES entry a QuantizeLinear node produces (its ``output_dtype`` or its packed
    zero point's type), else None."""
    od = next((a.i for a in n.attribute if a.name == "output_dtype"), 0)
    if od in LOWBIT_TYPES:
        return LOWBIT_TYPES[od]
    if len(n.input) > 2 and n.input[2]:
        z = n.input[2]
        for t in g.initializer:
            if t.name == z and t.data_type in LOWBIT_TYPES:
                return LOWBIT_TYPES[t.data_type]
        for c in g.node:
            if c.op_type == "Constant" and z in c.output:
                for a in c.attribute:
                    if a.name == "value" and a.t.data_type in LOWBIT_TYPES:
                        return LOWBIT_TYPES[a.t.data_type]
    return None


def _saturate_lowbit_quantize(g, i, kind, retyped):
    """A QuantizeLinear to int4 / uint4 / int2 / uint2 (``g.node[i]`` of LOWBIT_TYPES entry
    ``kind``, its zero point already unpacked to int8 / uint8) saturates to the 4 / 2-bit range: its
    8-bit result is followed by a Clip to that range (exact: ``clamp(clamp(v, -128, 127), -8, 7) ==
    clamp(v, -8, 7)``); an ``output_dtype`` of a 4 / 2-bit type becomes INT8 / UINT8."""
    from onnx import helper, numpy_helper
    n = g.node[i]
    tname, bits, signed = kind
    for a in n.attribute:
        if a.name == "output_dtype" and a.i in LOWBIT_TYPES:
            a.i = _UNPACKED_TYPE[signed]
    out = n.output[0]
    wide = f"{out}__8bit"
    n.output[0] = wide
    lo, hi = lowbit_range(bits, signed)
    dt = np.int8 if signed else np.uint8
    g.initializer.extend([numpy_helper.from_array(np.array(lo, dt), f"{out}__{tname}_min"),
                          numpy_helper.from_array(np.array(hi, dt), f"{out}__{tname}_max")])
    clip = helper.make_node("Clip", [wide, f"{out}__{tname}_min", f"{out}__{tname}_max"], [out],
                            name=f"{n.name or out}__saturate_{tname}")
    g.node.insert(i + 1, clip)
    retyped[out] = signed


def _lower_blockwise_node(g, n, values, info):
    """Rewrite one block-wise DequantizeLinear to its exact per-axis form (constant parameters whose
    blocks repeat one value per row), else record why it stays float."""
    from onnx import numpy_helper, helper
    attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
    axis, block = int(attrs.get("axis", 1)), int(attrs["block_size"])
    where = f"DequantizeLinear {n.name or n.output[0]!r}"
    x, s = n.input[0], n.input[1]
    z = n.input[2] if len(n.input) > 2 and n.input[2] else None
    if x in values and s in values and (z is None or z in values):
        xa = numpy_helper.to_array(values[x])
        sa = numpy_helper.to_array(values[s])
        za = numpy_helper.to_array(values[z]) if z else None
        ax = axis % max(xa.ndim, 1)
        red = _reduce_blockwise(xa.shape, ax, sa, za) if sa.ndim == xa.ndim else None
        if red is not None:
            s_new, z_new, j = red
            sname = f"{s}__{n.output[0]}__per_axis"
            g.initializer.append(numpy_helper.from_array(np.ascontiguousarray(s_new.astype(sa.dtype)), sname))
            n.input[1] = sname
            if z:
                zname = f"{z}__{n.output[0]}__per_axis"
                g.initializer.append(numpy_helper.from_array(np.ascontiguousarray(z_new.astype(za.dtype)), zname))
                n.input[2] = zname
            keep = [a for a in n.attribute if a.name not in ("axis", "block_size")]
            del n.attribute[:]
            n.attribute.extend(keep)
            if j is not None:
                n.attribute.append(helper.make_attribute("axis", int(j)))
            return
    info.notes.append((where, f"block-wise scales (block_size {block} along axis {axis} of {x!r}) vary along "
                              f"the reduction axis: an int32 accumulation cannot factor them out, so the "
                              f"consumer runs in float (the dequantize is exact, float32(x - zp) * scale)"))


def _dequantize_blockwise(bb, inputs, attr, params):
    """Block-wise ``DequantizeLinear`` (opset 21+): ``y = float32(x - zp[i // B]) * scale[i // B]``
    along ``axis`` (ONNX spec), the scale and zero point repeated ``B`` times and cut to the
    axis length."""
    from tvm import relax
    x, scale = inputs[0], inputs[1]
    zp = inputs[2] if len(inputs) > 2 and inputs[2] is not None else None
    node = _node(attr, "DequantizeLinear")
    block = int(attr["block_size"])
    nd = _ndim(x)
    axis = int(attr.get("axis", 1)) % max(nd, 1)
    if _ndim(scale) != nd:
        raise QuantImportError(f"{node}: block-wise scale must have the input's rank {nd}, got {_ndim(scale)}")
    if _dtype(scale) != "float32":
        raise QuantImportError(f"{node}: block-wise scale dtype {_dtype(scale)} (float32 expected)")
    length = int(x.ty.shape[axis])
    want = -(-length // block)
    if int(scale.ty.shape[axis]) != want:
        raise QuantImportError(f"{node}: block-wise scale has {int(scale.ty.shape[axis])} blocks along axis "
                               f"{axis}, ceil({length} / {block}) = {want} expected")

    def expand(t):
        r = relax.op.repeat(t, block, axis=axis)
        return relax.op.strided_slice(r, axes=[axis], begin=[0], end=[length])

    xi = relax.op.astype(x, "int32")
    if zp is not None:
        if _dtype(zp) != _dtype(x):
            raise QuantImportError(f"{node}: zero point is {_dtype(zp)}, the tensor {_dtype(x)}")
        xi = relax.op.subtract(xi, expand(relax.op.astype(zp, "int32")))
    return relax.op.multiply(relax.op.astype(xi, "float32"), expand(scale))


def _dequantize_linear_converter():
    """TVM's DequantizeLinear converter with block-wise quantization (``block_size`` != 0) added:
    each of TVM's ``_impl_v<N>`` is kept; from opset 21 a nonzero ``block_size`` goes to
    :func:`_dequantize_blockwise`."""
    from tvm.relax.frontend.onnx import onnx_frontend as F
    tvm_dq = F.DequantizeLinear
    methods = {}
    for name in dir(tvm_dq):
        if not name.startswith("_impl_v"):
            continue
        version = int(name[len("_impl_v"):])

        def impl(cls, bb, inputs, attr, params, _orig=getattr(tvm_dq, name), _v=version):
            if _v >= 21 and int(attr.get("block_size", 0) or 0) != 0:
                return _dequantize_blockwise(bb, inputs, attr, params)
            return _orig(bb, inputs, attr, params)
        methods[name] = classmethod(impl)
    methods["__doc__"] = _dequantize_linear_converter.__doc__
    methods["__module__"] = __name__
    return type("DequantizeLinear", (_base(),), methods)
