"""The qpu pattern table: which Relax subgraphs may become one QPU kernel, and what they mean.

Each :class:`PatternEntry` row pairs a Relax DPL pattern (``tvm.relax.dpl``) with a *spec builder*
that turns a match into a :class:`Match`: the registry :class:`~tvm_qpu.codegen.registry.OpSpec`
(kind, input shapes / dtypes, attrs), the compile-time constants (weights, biases, masks) and the
run-time inputs (Relax expressions, each with an optional layout transform the host applies before
the kernel sees it). The same builder runs twice: in the check function while partitioning (on the
main function) and again while lowering (on the composite function), so what was checked is exactly
what is generated.

Rows are tried in order and earlier rows win (``FuseOpsByPattern`` semantics), so fused forms
(matmul + bias + ReLU) come before their parts (matmul + bias, matmul). Operand forms that only
change dtype (``astype(int8 -> int32)`` before an integer matmul / conv2d, the MatMulInteger and
QDQ import shape) or layout (``permute_dims`` of a Gemm ``transB``) are ``|`` alternatives inside a
row, so one row covers float and integer kernels; the OpSpec then carries the narrow dtype.

Conventions the kernels can rely on (``OpSpec.attrs["input_names"]`` names ``OpSpec.inputs``;
``constants`` passed to ``registry.generate`` are keyed by these names):

=================  ===============================  =============================================
kind               inputs                            notes
=================  ===============================  =============================================
matmul             A [.., M, K], B [.., K, N]        B is [N, K] when ``transpose_b``; bias [N]
                   (+ bias)
conv2d             data NCHW, weight OIHW (+ bias)   bias [C_out]; conv1d rows reshape NCW / OIW
                                                     to height 1
max/avg_pool2d     data NCHW
global_avg_pool2d  data NCHW                         output [N, C, 1, 1]; a float32 mean over
                                                     trailing axes reshapes to [1, rows, 1, cols]
reduce_max/min     data
softmax            data                              axis is always -1 (normalised)
attention          q [B, S, D], k [B, T, D],         B = batch x heads (the host reshapes); k is
                   v [B, T, Dv] (+ mask [S, T])      *not* transposed (the host permutes it)
add                a, b (same shape)                 residual add; ReLU / clip epilogue
gelu               data                              R.nn.gelu / gelu_tanh / the exporters' erf chain
layer_norm         data, gamma [N], beta [N]         last axis only
=================  ===============================  =============================================
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

INT_NARROW = ("int8", "int16", "uint8")       # dtypes the QPU integer path multiplies (smul24)
INT_ACC = ("int32",)                           # accumulator dtypes
# The QPU integer multiply (smul24) uses the low 24 bits of each operand: int32 operands must lie in
# this range. A constant is checked; a run-time int32 operand is refused (the backend narrows the
# ones with a provable bound, e.g. MatMulInteger's ``x - zero_point``, to an int8/int16 cast).
SMUL24_RANGE = (-(1 << 23), (1 << 23) - 1)


class Refused(Exception):
    """A pattern matched but its operands cannot be offloaded (the message is the reason)."""


@dataclass
class RuntimeInput:
    """A kernel input supplied at run time: a Relax expression plus the host-side transform.

    ``transform`` is a tuple of steps ``("permute", axes)`` / ``("reshape", shape)`` applied in
    order; the backend emits them as Relax ops (run by the CPU) in front of the QPU call."""
    name: str
    expr: object
    transform: tuple = ()


@dataclass
class Match:
    """What a pattern row means for one matched subgraph."""
    spec: object                                   # registry.OpSpec
    constants: dict = field(default_factory=dict)  # input name -> np.ndarray
    runtime: list = field(default_factory=list)    # [RuntimeInput], in the kernel's input order
    out_reshape: tuple | None = None               # reshape the kernel output back to this shape
    out_transform: tuple = ()                      # then these steps (as RuntimeInput.transform)
    anchor: object = None                          # the main op of the match (for reports)
    #: equivalent forms to use, in order, when no kernel takes this one (the backend picks the
    #: first the registry supports, both while partitioning and while lowering)
    alternatives: list = field(default_factory=list)


@dataclass(frozen=True)
class PatternEntry:
    name: str                                      # composite name "qpu.<...>"
    kind: str                                      # registry kind
    make: Callable                                 # () -> (root pattern, {annotation name: pattern})
    build: Callable                                # (annotated dict) -> Match (raises Refused)
    doc: str = ""


# ---------------------------------------------------------------------------------------------
# small helpers over Relax expressions

def _dpl():
    from tvm.relax import dpl
    return dpl


def shape_of(e) -> tuple:
    ty = e.ty
    shape = getattr(ty, "shape", None)
    if shape is None or not hasattr(shape, "values"):
        raise Refused("tensor shape is unknown")
    try:
        return tuple(int(v) for v in shape.values)
    except TypeError:
        raise Refused(f"dynamic shape {shape} (QPU kernels are generated for static shapes)") from None


def dtype_of(e) -> str:
    return str(e.ty.dtype)


def is_constant(e) -> bool:
    import tvm
    return isinstance(e, tvm.ir.GenericConst)


def const_value(e) -> np.ndarray:
    return e.value.numpy()


def op_name(e) -> str | None:
    op = getattr(e, "op", None)
    return getattr(op, "name", None)


def _attr(call, name, default=None):
    v = getattr(call.attrs, name, default) if call.attrs is not None else default
    return v


def _ints(v) -> tuple:
    return tuple(int(x) for x in v) if v is not None else ()


def _out_dtype(call) -> str:
    od = _attr(call, "out_dtype")
    s = str(od) if od is not None else ""
    return s if s and s not in ("None", "void") else dtype_of(call)


def _spec(kind, names, inputs, output, attrs):
    from tvm_qpu.codegen.registry import OpSpec
    attrs = dict(attrs)
    attrs["input_names"] = list(names)
    return OpSpec(kind, [(tuple(s), str(d)) for s, d in inputs], (tuple(output[0]), str(output[1])), attrs)


# ---------------------------------------------------------------------------------------------
# operand forms: plain, astype (integer widening), permute_dims (Gemm transB)

def _operand(dpl, allow_transpose=False):
    """(outer pattern, inner wildcard): ``astype(x) | [permute_dims(x) |] x``."""
    x = dpl.wildcard()
    alts = dpl.is_op("relax.astype")(x)
    if allow_transpose:
        alts = alts | dpl.is_op("relax.permute_dims")(x)
    return alts | x, x


#: dtypes an int32 constant operand is narrowed to, narrowest first (the kernel reads each with the
#: TMU's sign- / zero-extending load, so an 8-bit weight moves a quarter of the int32 bytes)
CONST_NARROW = ("int8", "uint8", "int16")


def _narrow_const(arr: np.ndarray) -> np.ndarray:
    """An int32 constant operand of an integer op is stored in the narrowest dtype of
    :data:`CONST_NARROW` holding all its values (independent of the other operand's dtype: int8
    weights stay int8 next to int16 activations); otherwise Refused."""
    lo, hi = (int(arr.min()), int(arr.max())) if arr.size else (0, 0)
    for dt in CONST_NARROW:
        info = np.iinfo(dt)
        if info.min <= lo and hi <= info.max:
            return arr.astype(dt)
    raise Refused(f"int32 constant has values [{lo}, {hi}] beyond {CONST_NARROW[-1]}")


def _resolve_operand(outer, inner, what: str):
    """Classify a matched operand: returns (expr, form) with form 'cast', 'permute' or 'plain'."""
    if outer.same_as(inner):
        return inner, "plain"
    name = op_name(outer)
    if name == "relax.astype":
        src, dst = dtype_of(inner), dtype_of(outer)
        if src not in INT_NARROW or dst not in INT_ACC:
            raise Refused(f"{what}: cast {src} -> {dst} is not an integer widening the QPU can fold")
        return inner, "cast"
    if name == "relax.permute_dims":
        return inner, "permute"
    raise Refused(f"{what}: unexpected operand form {name}")


def _operand_value(expr, form, what, narrow_to=None):
    """(shape, dtype, const array or None) of an operand after folding casts."""
    shape = shape_of(expr)
    dt = dtype_of(expr)
    if is_constant(expr):
        arr = const_value(expr)
        if narrow_to and dt in INT_ACC and form == "plain":
            arr = _narrow_const(arr)
            dt = str(arr.dtype)
        _check_smul24(dt, arr, what)
        return shape, dt, arr
    _check_smul24(dt, None, what)
    return shape, dt, None


def _check_smul24(dt: str, arr, what: str):
    """Refuse int32 operands the QPU's 24-bit integer multiply would silently get wrong."""
    if dt not in INT_ACC:
        return
    lo, hi = SMUL24_RANGE
    if arr is None:
        raise Refused(f"{what}: int32 run-time operand without a known 24-bit bound (the QPU multiplies "
                      f"the low 24 bits)")
    if arr.size and (arr.min() < lo or arr.max() > hi):
        raise Refused(f"{what}: int32 constant with values beyond 24 bits (the QPU multiplies the low 24 bits)")


# ---------------------------------------------------------------------------------------------
# epilogues: bias add and activations

EPILOGUES = {
    # name: (bias?, activation)
    "bias_relu": (True, "relu"),
    "bias_clip": (True, "clip"),
    "bias_clip_min": (True, "clip_min"),
    "bias_clip_max": (True, "clip_max"),
    "bias": (True, None),
    "relu": (False, "relu"),
    "clip": (False, "clip"),
    "clip_min": (False, "clip_min"),
    "clip_max": (False, "clip_max"),
    "": (False, None),
}

# Activation forms (the kernel epilogue takes None, "relu" or ("clip", lo, hi)):
#   clip      relax.clip(x, lo, hi) | minimum(maximum(x, lo), hi)   (ONNX Clip / ReLU6 after
#             backend.canonicalize turned the importer's TIR max/min calls into these Relax ops)
#   clip_min  maximum(x, lo)       (Clip with only ``min``)  -> ("clip", lo, +inf)
#   clip_max  minimum(x, hi)       (Clip with only ``max``)  -> ("clip", -inf, hi)


def _with_epilogue(dpl, core, epi, ann):
    bias, act = EPILOGUES[epi]
    root = core
    if bias:
        b = dpl.is_const()
        root = dpl.is_op("relax.add")(root, b)
        ann["bias"] = b
        ann["bias_add"] = root
    if act == "relu":
        root = dpl.is_op("relax.nn.relu")(root)
    elif act == "clip":
        lo, hi = dpl.is_const(), dpl.is_const()
        mm = dpl.is_op("relax.minimum")(dpl.is_op("relax.maximum")(root, lo), hi)
        cl = dpl.is_op("relax.clip")(root, dpl.wildcard(), dpl.wildcard())
        root = cl | mm
        ann["clip_lo"], ann["clip_hi"] = lo, hi
    elif act == "clip_min":
        lo = dpl.is_const()
        root = dpl.is_op("relax.maximum")(root, lo)
        ann["clip_lo"] = lo
    elif act == "clip_max":
        hi = dpl.is_const()
        root = dpl.is_op("relax.minimum")(root, hi)
        ann["clip_hi"] = hi
    ann["root"] = root
    return root, ann


# The requantize epilogue (what tvm_qpu.quant.rewrite_requant emits after an int32 matmul / conv2d
# and its int32 epilogue): ``astype(clip(round(astype(acc, float32) * m) + zp, lo, hi), int8 | uint8)``
# with m a positive float32 constant (scalar or per output channel), zp an integer, and lo <= hi
# integers inside the 8-bit range. The kernel computes it exactly (itof, fmul, ftoin, clamp, + zp).
REQUANT_OUT = {"int8": (-128, 127), "uint8": (0, 255)}     # = codegen.kernels.gemm.REQUANT_DTYPES


def _with_requant(dpl, root, ann):
    """Append the requantize chain to ``root``; ann gets "rq_*" entries and "rq_root"."""
    f = dpl.is_op("relax.astype")(root)
    m = dpl.is_const()
    mul = dpl.is_op("relax.multiply")(f, m)
    zp = dpl.is_const()
    shifted = dpl.is_op("relax.add")(dpl.is_op("relax.round")(mul), zp)
    cl = dpl.is_op("relax.clip")(shifted, dpl.wildcard(), dpl.wildcard())
    q = dpl.is_op("relax.astype")(cl)
    ann.update({"rq_float": f, "rq_scale": m, "rq_zp": zp, "rq_clip": cl, "rq_root": q})
    return q, ann


def _integral(v: float, what: str) -> int:
    if not np.isfinite(v) or v != np.floor(v):
        raise Refused(f"requantize {what} {v} is not an integer")
    return int(v)


def _requant_attrs(ann, channels: int, channel_axis_from_end: int):
    """attrs["requant"] of a matched requantize chain (None without one); Refused when the chain
    is not exactly the kernel's formula."""
    if "rq_root" not in ann:
        return None
    q, f, cl = ann["rq_root"], ann["rq_float"], ann["rq_clip"]
    out = dtype_of(q)
    if out not in REQUANT_OUT:
        raise Refused(f"requantize to {out} (int8 / uint8 outputs)")
    if dtype_of(f) != "float32" or dtype_of(ann["root"]) != "int32":
        raise Refused("requantize of a non-int32 accumulator")
    m = const_value(ann["rq_scale"])
    if m.dtype != np.float32 or not np.all(np.isfinite(m) & (m > 0)):
        raise Refused("requantize multiplier is not float32, finite and positive")
    if m.size != 1:
        shp = m.shape
        nontrivial = [i for i, d in enumerate(shp) if d != 1]
        if m.size != channels or len(nontrivial) != 1 or len(shp) - nontrivial[0] != channel_axis_from_end:
            raise Refused(f"requantize multiplier of shape {list(shp)} is not per output channel")
    zpv = const_value(ann["rq_zp"])
    if zpv.size != 1:
        raise Refused("requantize zero point is not a scalar")
    zp = _integral(float(zpv.reshape(())), "zero point")
    lo, hi = (_integral(float(a.value), "clip bound") for a in cl.args[1:3])
    qmin, qmax = REQUANT_OUT[out]
    if not (qmin <= lo <= hi <= qmax) or not (qmin <= zp <= qmax):
        raise Refused(f"requantize clamp [{lo}, {hi}] / zero point {zp} outside {out}")
    scale = tuple(float(v) for v in m.reshape(-1))
    return {"scale": scale, "zero_point": zp, "lo": lo, "hi": hi}


def _scalar_bound(e) -> float:
    if not is_constant(e) or const_value(e).size != 1:
        raise Refused("clip bounds must be scalar constants")
    v = float(const_value(e).reshape(()))
    if np.isnan(v):
        raise Refused("clip bound is NaN")
    return v


def _activation(ann) -> object:
    root = ann["root"]
    name = op_name(root)
    if name == "relax.nn.relu":
        return "relu"
    if name == "relax.clip":
        lo, hi = (float(a.value) for a in root.args[1:3])
        return ("clip", lo, hi)
    if name in ("relax.minimum", "relax.maximum"):
        dt = np.dtype(dtype_of(root))
        lo, hi = (float(np.iinfo(dt).min), float(np.iinfo(dt).max)) if dt.kind in "iu" else (-np.inf, np.inf)
        if "clip_lo" in ann:
            lo = _scalar_bound(ann["clip_lo"])
        if "clip_hi" in ann:
            hi = _scalar_bound(ann["clip_hi"])
        return ("clip", lo, hi)
    return None


def _bias_vector(ann, channels: int, channel_axis_from_end: int, acc_dtype: str):
    """A bias constant broadcast along one channel axis, flattened to [channels]."""
    b = ann.get("bias")
    if b is None:
        return None
    arr = const_value(b)
    if str(arr.dtype) != acc_dtype:
        raise Refused(f"bias dtype {arr.dtype} differs from accumulator dtype {acc_dtype}")
    if arr.size == 1:
        return np.full(channels, arr.reshape(()), dtype=arr.dtype)
    shp = arr.shape
    nontrivial = [i for i, s in enumerate(shp) if s != 1]
    if arr.size != channels or len(nontrivial) != 1 or (len(shp) - nontrivial[0]) != channel_axis_from_end:
        raise Refused(f"bias of shape {list(shp)} is not per-channel")
    return arr.reshape(channels)


# ---------------------------------------------------------------------------------------------
# matmul

def _make_matmul(epi, requant=False):
    def make():
        dpl = _dpl()
        a_out, a = _operand(dpl)
        b_out, b = _operand(dpl, allow_transpose=True)
        mm = dpl.is_op("relax.matmul")(a_out, b_out)
        ann = {"a": a, "a_outer": a_out, "b": b, "b_outer": b_out, "core": mm}
        root, ann = _with_epilogue(dpl, mm, epi, ann)
        return _with_requant(dpl, root, ann) if requant else (root, ann)
    return make


def build_matmul(ann) -> Match:
    mm = ann["core"]
    out_shape, acc = shape_of(mm), _out_dtype(mm)
    a, fa = _resolve_operand(ann["a_outer"], ann["a"], "A")
    b, fb = _resolve_operand(ann["b_outer"], ann["b"], "B")
    transpose_b = False
    if fb == "permute":
        axes = _ints(_attr(ann["b_outer"], "axes"))
        nd = len(shape_of(b))
        if nd < 2 or axes != tuple(range(nd - 2)) + (nd - 1, nd - 2):
            raise Refused(f"B permutation {list(axes)} is not a transpose of the last two axes")
        transpose_b = True
    narrow = dtype_of(a) if fa == "cast" else None
    a_shape, a_dt, a_const = _operand_value(a, fa, "A")
    b_shape, b_dt, b_const = _operand_value(b, fb, "B", narrow_to=narrow)
    if a_const is not None:
        raise Refused("A is a constant (nothing to compute at run time)")
    if len(a_shape) < 1 or len(b_shape) < 1:
        raise Refused("matmul operands must have rank >= 1")
    # 1-D operands (numpy / ONNX MatMul): A [K] is the row [1, K], B [K] the column [K, 1]; the
    # kernel computes the 2-D product and the host drops the inserted axis again.
    a_steps, b_steps, kernel_out = (), (), out_shape
    if len(a_shape) == 1 or len(b_shape) == 1:
        if ann.get("bias") is not None:
            raise Refused("bias with a 1-D matmul operand")
        if len(a_shape) == 1:
            a_shape = (1, a_shape[0])
            a_steps = (("reshape", a_shape),)
        if len(b_shape) == 1:
            b_shape = (b_shape[0], 1)
            b_steps = (("reshape", b_shape),)
            if b_const is not None:
                b_const = b_const.reshape(b_shape)
        try:
            batch = np.broadcast_shapes(a_shape[:-2], b_shape[:-2])
        except ValueError:
            raise Refused(f"batch dimensions of {list(a_shape)} and {list(b_shape)} do not broadcast") from None
        kernel_out = tuple(batch) + (a_shape[-2], b_shape[-1])
    # A [.., M, K] against a B without batch dims (a weight W [K, N]): one [prod(..) * M, K] x W GEMM
    # instead of prod(..) small ones (a sequence-first [S, 1, D] x W would be S matrix-vector
    # products); the host reshapes A (free: row-major) and the output back.
    if b_const is not None and len(b_shape) > 2 and len(a_shape) >= len(b_shape) and set(b_shape[:-2]) == {1}:
        b_shape = tuple(b_shape[-2:])             # a constant [1, .., K, N]: the same weight W
        b_const = b_const.reshape(b_shape)
    if len(a_shape) > 2 and len(b_shape) == 2:
        rows = int(np.prod(a_shape[:-1], dtype=np.int64))
        a_steps = a_steps + (("reshape", (rows, a_shape[-1])),)
        a_shape = (rows, a_shape[-1])
        kernel_out = (rows, b_shape[-2] if transpose_b else b_shape[-1])
    n = out_shape[-1] if out_shape else 1
    bias = _bias_vector(ann, n, 1, acc)
    inputs = [(a_shape, a_dt), (b_shape, b_dt)]
    names = ["A", "B"]
    consts = {}
    runtime = [RuntimeInput("A", a, a_steps)]
    if b_const is not None:
        consts["B"] = b_const
    else:
        runtime.append(RuntimeInput("B", b, b_steps))
    if bias is not None:
        inputs.append(((n,), str(bias.dtype)))
        names.append("bias")
        consts["bias"] = bias
    root = ann["root"]
    attrs = {"transpose_b": transpose_b, "bias": bias is not None, "activation": _activation(ann),
             "out_dtype": acc,
             # the estimate prices a constant 8-bit B packed four k-steps per word when that wins
             "b_constant": b_const is not None}
    rq = _requant_attrs(ann, n, 1)
    if rq is not None:
        attrs["requant"] = rq
    root_shape = shape_of(root)
    spec = _spec("matmul", names, inputs, (kernel_out, dtype_of(ann.get("rq_root", root))), attrs)
    m = Match(spec, consts, runtime, out_reshape=root_shape if kernel_out != root_shape else None, anchor=mm)
    from .quant import lowbit_match
    return lowbit_match(m, "B")          # 4 / 2-bit weights of a QDQ import (weight_bits)


# ---------------------------------------------------------------------------------------------
# conv2d

def _make_conv(epi, op="relax.nn.conv2d", requant=False):
    def make():
        dpl = _dpl()
        x_out, x = _operand(dpl)
        w_out, w = _operand(dpl)
        conv = dpl.is_op(op)(x_out, w_out)
        ann = {"x": x, "x_outer": x_out, "w": w, "w_outer": w_out, "core": conv}
        root, ann = _with_epilogue(dpl, conv, epi, ann)
        return _with_requant(dpl, root, ann) if requant else (root, ann)
    return make


def _make_conv2d(epi, requant=False):
    return _make_conv(epi, "relax.nn.conv2d", requant)


def _make_conv1d(epi, requant=False):
    return _make_conv(epi, "relax.nn.conv1d", requant)


# per convolution rank: (data layout, kernel layout, bias channel axis counted from the end)
_CONV_LAYOUTS = {2: ("NCHW", "OIHW", 3), 1: ("NCW", "OIW", 2)}


def _build_conv(ann, rank: int) -> Match:
    """conv2d, or conv1d as a conv2d of height 1 (data [N, C, L] -> [N, C, 1, L] by a host reshape,
    weight [O, I, K] -> [O, I, 1, K] at compile time, output reshaped back)."""
    conv = ann["core"]
    want_d, want_k, bias_axis = _CONV_LAYOUTS[rank]
    layout = str(_attr(conv, "data_layout"))
    klayout = str(_attr(conv, "kernel_layout"))
    olayout = str(_attr(conv, "out_layout"))
    if layout != want_d or klayout != want_k or olayout not in (want_d, ""):
        raise Refused(f"layout {layout}/{klayout}/{olayout} (QPU kernels take {want_d}/{want_k})")
    x, fx = _resolve_operand(ann["x_outer"], ann["x"], "data")
    w, fw = _resolve_operand(ann["w_outer"], ann["w"], "weight")
    narrow = dtype_of(x) if fx == "cast" else None
    x_shape, x_dt, x_const = _operand_value(x, fx, "data")
    w_shape, w_dt, w_const = _operand_value(w, fw, "weight", narrow_to=narrow)
    if x_const is not None:
        raise Refused("data is a constant")
    if w_const is None:
        raise Refused("weight is not a compile-time constant")
    out_shape, acc = shape_of(conv), _out_dtype(conv)
    pad, strides, dil = _ints(_attr(conv, "padding")), _ints(_attr(conv, "strides")), _ints(_attr(conv, "dilation"))
    x_steps = ()
    if rank == 1:
        pad = (0, pad[0], 0, pad[-1])
        strides, dil = (1,) + strides, (1,) + dil
        x_shape = (x_shape[0], x_shape[1], 1, x_shape[2])
        x_steps = (("reshape", x_shape),)
        w_shape = (w_shape[0], w_shape[1], 1, w_shape[2])
        w_const = w_const.reshape(w_shape)
        kernel_out = (out_shape[0], out_shape[1], 1, out_shape[2])
    else:
        if len(pad) == 2:
            pad = (pad[0], pad[1], pad[0], pad[1])
        kernel_out = out_shape
    bias = _bias_vector(ann, out_shape[1], bias_axis, acc)
    inputs, names, consts = [(x_shape, x_dt), (w_shape, w_dt)], ["data", "weight"], {"weight": w_const}
    if bias is not None:
        inputs.append(((out_shape[1],), str(bias.dtype)))
        names.append("bias")
        consts["bias"] = bias
    root = ann["root"]
    attrs = {"strides": strides, "padding": pad, "dilation": dil,
             "groups": int(_attr(conv, "groups")), "layout": "NCHW", "bias": bias is not None,
             "activation": _activation(ann), "out_dtype": acc}
    rq = _requant_attrs(ann, out_shape[1], bias_axis)
    if rq is not None:
        attrs["requant"] = rq
    root_shape = shape_of(root)
    spec = _spec("conv2d", names, inputs, (kernel_out, dtype_of(ann.get("rq_root", root))), attrs)
    m = Match(spec, consts, [RuntimeInput("data", x, x_steps)],
              out_reshape=root_shape if kernel_out != root_shape else None, anchor=conv)
    s2d = _space_to_depth_form(m, x) if rank == 2 else None
    if s2d is not None:
        m.alternatives.append(s2d)
    from .quant import lowbit_match
    return lowbit_match(m, "weight")     # 4 / 2-bit weights of a QDQ import (weight_bits)


def _space_to_depth_form(m: Match, x):
    """A strided conv2d as a stride-1 conv2d over the space-to-depth of its input, or None.

    With strides (sh, sw), ``y[oh] = sum_i w[i] x[sh*oh - pt + i]``; shifting the kernel by
    ``e = -pt mod sh`` zero taps makes the offset a multiple of sh, and tap ``i = sh*a + p`` reads
    ``S_p[oh - P + a]`` of the space-to-depth ``S`` (channel ``c*sh*sw + p*sw + q``), so the
    convolution becomes ``ceil((KH + e) / sh)`` taps per axis over ``C*sh*sw`` channels, stride 1,
    top padding ``P = (pt + e) / sh``. A large strided kernel (a 7x7 stride-2 stem: 49 taps per
    channel, too many for the conv kernel's registers) becomes 4x4 taps over 4C channels. The host
    rearranges the input (reshape, permute, reshape); the weights are repacked at compile time.
    Needs dilation 1, groups 1, H and W multiples of the strides and non-negative new paddings."""
    spec = m.spec
    a = spec.attrs
    (N, C, H, W), x_dt = spec.inputs[0]
    w = m.constants["weight"]
    O, _, KH, KW = w.shape
    sh, sw = a["strides"]
    pt, pl, pb, pr = a["padding"]
    OH, OW = spec.output[0][2:]
    if (sh, sw) == (1, 1) or tuple(a["dilation"]) != (1, 1) or a["groups"] != 1 or H % sh or W % sw:
        return None
    eh, ew = (-pt) % sh, (-pl) % sw
    kah, kaw = -(-(KH + eh) // sh), -(-(KW + ew) // sw)
    Hs, Ws = H // sh, W // sw
    top, left = (pt + eh) // sh, (pl + ew) // sw
    bottom, right = OH + kah - 1 - Hs - top, OW + kaw - 1 - Ws - left
    if min(bottom, right) < 0:
        return None
    wp = np.zeros((O, C, kah * sh, kaw * sw), w.dtype)
    wp[:, :, eh:eh + KH, ew:ew + KW] = w
    w2 = np.ascontiguousarray(wp.reshape(O, C, kah, sh, kaw, sw).transpose(0, 1, 3, 5, 2, 4)
                              .reshape(O, C * sh * sw, kah, kaw))
    xs = (N, C * sh * sw, Hs, Ws)
    steps = (("reshape", (N, C, Hs, sh, Ws, sw)), ("permute", (0, 1, 3, 5, 2, 4)), ("reshape", xs))
    inputs = [(xs, x_dt), (w2.shape, spec.inputs[1][1])] + list(spec.inputs[2:])
    attrs = {k: v for k, v in a.items() if k != "input_names"}
    attrs.update(strides=(1, 1), padding=(top, left, bottom, right))
    spec2 = _spec("conv2d", a["input_names"], inputs, spec.output, attrs)
    return Match(spec2, dict(m.constants, weight=w2), [RuntimeInput("data", x, steps)],
                 out_reshape=m.out_reshape, anchor=m.anchor)


def build_conv2d(ann) -> Match:
    return _build_conv(ann, 2)


def build_conv1d(ann) -> Match:
    return _build_conv(ann, 1)


# ---------------------------------------------------------------------------------------------
# pooling, reductions, softmax

def _make_unary(op):
    def make():
        dpl = _dpl()
        x = dpl.wildcard()
        root = dpl.is_op(op)(x)
        return root, {"x": x, "root": root, "core": root}
    return make


def _unary_match(kind, ann, attrs):
    x, root = ann["x"], ann["root"]
    if is_constant(x):
        raise Refused("input is a constant")
    spec = _spec(kind, ["data"], [(shape_of(x), dtype_of(x))], (shape_of(root), dtype_of(root)), attrs)
    return Match(spec, {}, [RuntimeInput("data", x)], anchor=root)


def _build_pool(kind):
    def build(ann):
        p = ann["root"]
        layout = str(_attr(p, "layout"))
        if layout != "NCHW" or str(_attr(p, "out_layout")) not in ("NCHW", ""):
            raise Refused(f"layout {layout} (QPU pooling takes NCHW)")
        pad = _ints(_attr(p, "padding"))
        if len(pad) == 2:
            pad = (pad[0], pad[1], pad[0], pad[1])
        attrs = {"pool_size": _ints(_attr(p, "pool_size")), "strides": _ints(_attr(p, "strides")), "padding": pad,
                 "dilation": _ints(_attr(p, "dilation")), "ceil_mode": bool(_attr(p, "ceil_mode")),
                 "count_include_pad": bool(_attr(p, "count_include_pad", False)), "layout": "NCHW"}
        return _unary_match(kind, ann, attrs)
    return build


def build_global_avg_pool(ann) -> Match:
    p = ann["root"]
    nd = len(shape_of(ann["x"]))
    if op_name(p) == "relax.mean":
        axes = tuple(sorted(int(a) % nd for a in _ints(_attr(p, "axis"))))
        if nd == 4 and axes == (2, 3) and bool(_attr(p, "keepdims")):
            return _unary_match("global_avg_pool2d", ann, {"layout": "NCHW"})
        return _mean_trailing_axes(ann, axes)
    if str(_attr(p, "layout")) != "NCHW" or tuple(shape_of(p)[2:]) != (1, 1):    # adaptive_avg_pool2d
        raise Refused("adaptive average pool is not global (output 1x1, NCHW)")
    return _unary_match("global_avg_pool2d", ann, {"layout": "NCHW"})


def _mean_trailing_axes(ann, axes) -> Match:
    """A float32 mean over the trailing axes of any tensor (1-D global average of [N, C, L],
    ReduceMean over the last axis, ...) is the global average pool of [1, rows, 1, cols]: the host
    reshapes (row-major, free) and reshapes the [1, rows, 1, 1] result to the mean's shape."""
    x, root = ann["x"], ann["root"]
    shape = shape_of(x)
    nd = len(shape)
    if not axes or axes != tuple(range(nd - len(axes), nd)):
        raise Refused(f"mean over axes {list(axes)} is not over the trailing axes")
    if dtype_of(x) != "float32" or dtype_of(root) != "float32":
        raise Refused(f"mean over trailing axes of {dtype_of(x)} (float32 only; integer means round differently)")
    if is_constant(x):
        raise Refused("input is a constant")
    rows = int(np.prod(shape[:nd - len(axes)], dtype=np.int64))
    cols = int(np.prod(shape[nd - len(axes):], dtype=np.int64))
    kin, kout = (1, rows, 1, cols), (1, rows, 1, 1)
    spec = _spec("global_avg_pool2d", ["data"], [(kin, "float32")], (kout, "float32"), {"layout": "NCHW"})
    return Match(spec, {}, [RuntimeInput("data", x, (("reshape", kin),))], out_reshape=shape_of(root), anchor=root)


def _make_global_avg_pool():
    dpl = _dpl()
    x = dpl.wildcard()
    root = dpl.is_op("relax.mean")(x) | dpl.is_op("relax.nn.adaptive_avg_pool2d")(x)
    return root, {"x": x, "root": root, "core": root}


def _build_reduce(kind):
    def build(ann):
        r = ann["root"]
        nd = len(shape_of(ann["x"]))
        axis = _attr(r, "axis")
        axis = None if axis is None else tuple(sorted(int(a) % nd for a in axis))
        return _unary_match(kind, ann, {"axis": axis, "keepdims": bool(_attr(r, "keepdims"))})
    return build


def build_softmax(ann) -> Match:
    """The QPU softmax normalises along the last axis; another axis is moved last by a host-side
    permute_dims in front of the kernel and moved back after it."""
    r, x = ann["root"], ann["x"]
    shape = shape_of(x)
    nd = len(shape)
    axis = int(_attr(r, "axis")) % max(nd, 1)
    if nd == 0 or axis == nd - 1:
        return _unary_match("softmax", ann, {"axis": -1})
    if is_constant(x):
        raise Refused("input is a constant")
    perm = tuple(i for i in range(nd) if i != axis) + (axis,)
    inverse = tuple(int(i) for i in np.argsort(perm))
    moved = tuple(shape[i] for i in perm)
    spec = _spec("softmax", ["data"], [(moved, dtype_of(x))], (moved, dtype_of(r)), {"axis": -1})
    return Match(spec, {}, [RuntimeInput("data", x, (("permute", perm),))],
                 out_transform=(("permute", inverse),), anchor=r)


# ---------------------------------------------------------------------------------------------
# attention: matmul(Q, permute_dims(K)) * scale (+ mask) -> softmax -> matmul(., V)

# scale_op of the rows where q and k are each scaled before the matmul (PyTorch's exporter of
# scaled_dot_product_attention multiplies both by sqrt(scale)): K transposed then scaled, or K
# scaled then transposed.
PRESCALED_KT, PRESCALED_K = "prescaled_kt", "prescaled_k"


def _make_attention(masked: bool, scale_op: str):
    """``scale_op`` "relax.multiply" / "relax.divide": ``matmul(Q, K^T) * s`` (or ``/ s``);
    PRESCALED_KT: ``matmul(Q * s1, K^T * s2)``; PRESCALED_K: ``matmul(Q * s1, (K * s2)^T)``; the
    softmax scale is then s1 * s2."""
    def make():
        dpl = _dpl()
        q, k, v = dpl.wildcard(), dpl.wildcard(), dpl.wildcard()
        ann = {"q": q, "k": k, "v": v}
        if scale_op in (PRESCALED_KT, PRESCALED_K):
            qs, ks = dpl.is_const(), dpl.is_const()
            if scale_op == PRESCALED_KT:
                kt = dpl.is_op("relax.permute_dims")(k)
                k_side = dpl.is_op("relax.multiply")(kt, ks)
            else:
                kt = dpl.is_op("relax.permute_dims")(dpl.is_op("relax.multiply")(k, ks))
                k_side = kt
            s = dpl.is_op("relax.matmul")(dpl.is_op("relax.multiply")(q, qs), k_side)
            ann.update({"kt": kt, "q_scale": qs, "k_scale": ks})
        else:
            scale = dpl.is_const()
            kt = dpl.is_op("relax.permute_dims")(k)
            s = dpl.is_op(scale_op)(dpl.is_op("relax.matmul")(q, kt), scale)
            ann.update({"kt": kt, "scale": scale})
        ann["scores"] = s
        if masked:
            mask = dpl.wildcard()
            s = dpl.is_op("relax.add")(s, mask)
            ann["mask"] = mask
        p = dpl.is_op("relax.nn.softmax")(s)
        root = dpl.is_op("relax.matmul")(p, v)
        ann.update({"softmax": p, "root": root, "core": root})
        return root, ann
    return make


def _attention_scale(ann) -> float:
    """The softmax scale of a matched attention: the post-matmul constant, or s1 * s2."""
    if "q_scale" in ann:
        vals = [const_value(ann[n]) for n in ("q_scale", "k_scale")]
        if any(v.size != 1 for v in vals):
            raise Refused("attention q / k scales are not scalars")
        return float(vals[0].reshape(())) * float(vals[1].reshape(()))
    sc = const_value(ann["scale"])
    if sc.size != 1:
        raise Refused("attention scale is not a scalar")
    scale = float(sc.reshape(()))
    if op_name(ann["scores"]) == "relax.divide":
        if scale == 0:
            raise Refused("attention scale divides by zero")
        scale = 1.0 / scale
    return scale


def _to4d(shape):
    if len(shape) > 4 or len(shape) < 2:
        raise Refused(f"attention operand of rank {len(shape)} (2..4 supported)")
    return (1,) * (4 - len(shape)) + tuple(shape)


def build_attention(ann) -> Match:
    q, k, v, kt, root = ann["q"], ann["k"], ann["v"], ann["kt"], ann["root"]
    qs, ks, vs, kts = shape_of(q), shape_of(k), shape_of(v), shape_of(kt)
    nd = len(kts)
    axes = _ints(_attr(kt, "axes")) or tuple(reversed(range(nd)))
    k_axes = axes[:-2] + (axes[-1], axes[-2])                # permutation giving K as [.., Sk, D]
    k_canon = tuple(ks[i] for i in k_axes)
    if len(qs) != nd or len(vs) != nd:
        raise Refused("Q, K and V ranks differ")
    sm_axis = int(_attr(ann["softmax"], "axis"))
    if sm_axis % nd != nd - 1:
        raise Refused("softmax is not over the key axis")
    scale = _attention_scale(ann)
    dts = {dtype_of(q), dtype_of(k), dtype_of(v)}
    if len(dts) != 1:
        raise Refused(f"mixed attention dtypes {sorted(dts)}")
    dt = dts.pop()
    q4, k4, v4 = _to4d(qs), _to4d(k_canon), _to4d(vs)
    q3, k3, v3 = (_fold_heads(t) for t in (q4, k4, v4))       # registry convention: [batch x heads, S, D]
    k_steps = (("permute", k_axes),) if k_axes != tuple(range(nd)) else ()
    runtime = [RuntimeInput("q", q, (("reshape", q3),) if q3 != qs else ()),
               RuntimeInput("k", k, k_steps + ((("reshape", k3),) if k3 != k_canon else ())),
               RuntimeInput("v", v, (("reshape", v3),) if v3 != vs else ())]
    names, inputs, consts = ["q", "k", "v"], [(q3, dt), (k3, dt), (v3, dt)], {}
    mask = ann.get("mask")
    if mask is not None:
        ms = shape_of(mask)
        st = (q3[1], k3[1])
        if len(ms) < 2 or tuple(ms[-2:]) != st or any(d != 1 for d in ms[:-2]):
            raise Refused(f"mask of shape {list(ms)} is not one [S, T] = {list(st)} mask shared by batch and heads")
        names.append("mask")
        inputs.append((st, dtype_of(mask)))
        if is_constant(mask):
            consts["mask"] = const_value(mask).reshape(st)
        else:
            runtime.append(RuntimeInput("mask", mask, (("reshape", st),) if tuple(ms) != st else ()))
    out = shape_of(root)
    out3 = _fold_heads(_to4d(out))
    attrs = {"scale": scale, "mask": mask is not None, "causal": False, "num_heads": q4[1]}
    spec = _spec("attention", names, inputs, (out3, dtype_of(root)), attrs)
    return Match(spec, consts, runtime, out_reshape=out if out3 != out else None, anchor=root)


def _fold_heads(s4):
    return (s4[0] * s4[1], s4[2], s4[3])


# ---------------------------------------------------------------------------------------------
# elementwise: residual add (+ ReLU / clip), GELU (op and erf-chain forms), layer norm

def _make_residual_add(epi):
    """``add(a, b)`` of two run-time tensors (+ an activation epilogue of :data:`EPILOGUES`
    without bias)."""
    def make():
        dpl = _dpl()
        a, b = dpl.wildcard(), dpl.wildcard()
        core = dpl.is_op("relax.add")(a, b)
        return _with_epilogue(dpl, core, epi, {"a": a, "b": b, "core": core})
    return make


def build_residual_add(ann) -> Match:
    a, b, root = ann["a"], ann["b"], ann["root"]
    if is_constant(a) or is_constant(b):
        raise Refused("an operand is a constant (a bias add belongs to the matmul / conv epilogue)")
    sa, sb = shape_of(a), shape_of(b)
    if sa != sb:
        raise Refused(f"operand shapes {list(sa)} and {list(sb)} differ (the add kernel does not broadcast)")
    if dtype_of(a) != dtype_of(b):
        raise Refused(f"operand dtypes {dtype_of(a)} and {dtype_of(b)} differ")
    spec = _spec("add", ["a", "b"], [(sa, dtype_of(a)), (sb, dtype_of(b))], (shape_of(root), dtype_of(root)),
                 {"activation": _activation(ann)})
    return Match(spec, {}, [RuntimeInput("a", a), RuntimeInput("b", b)], anchor=ann["core"])


def _build_gelu(approximate):
    def build(ann):
        return _unary_match("gelu", ann, {"approximate": approximate})
    return build


def _bias_add(dpl, bias: bool, ann: dict, key: str):
    """A wildcard, or (``bias``) ``add(y, constant)`` with y and the constant annotated."""
    if not bias:
        return dpl.wildcard()
    y, c = dpl.wildcard(), dpl.is_const()
    if key == "x":
        ann["y"], ann["bias"] = y, c
    return dpl.is_op("relax.add")(y, c)


def _make_gelu_erf_chain(bias: bool = False):
    """The exporters' erf GELU: ``x * (erf(x / s) + 1) * 0.5`` (PyTorch < opset 20, this repo's
    transformer model) or ``x * 0.5 * (1 + erf(x / s))`` (the HuggingFace form), with ``x / s``
    also written ``x * (1 / s)``; s = sqrt 2. ``bias``: x is ``add(y, bias constant)``."""
    return lambda: _gelu_erf_chain(bias)


def _gelu_erf_chain(bias):
    dpl = _dpl()
    extra = {}
    x, x2 = _bias_add(dpl, bias, extra, "x"), _bias_add(dpl, bias, extra, "x2")
    s, one, half = dpl.is_const(), dpl.is_const(), dpl.is_const()
    scaled = dpl.is_op("relax.divide")(x2, s) | dpl.is_op("relax.multiply")(x2, s)
    erf = dpl.is_op("relax.erf")(scaled)
    onep = dpl.is_op("relax.add")(erf, one) | dpl.is_op("relax.add")(one, erf)
    mul = dpl.is_op("relax.multiply")
    root = mul(mul(x, onep), half) | mul(mul(x, half), onep)
    return root, {"x": x, "x2": x2, "scale": s, "one": one, "half": half, "scaled": scaled, "root": root,
                  "core": root, **extra}


def _const_is(e, value: float, what: str):
    v = const_value(e)
    if v.size != 1 or not np.isclose(float(v.reshape(())), value, rtol=1e-6, atol=0):
        raise Refused(f"GELU chain: {what} is {v.reshape(-1)[:4].tolist()}, not {value:g}")


def build_gelu_erf_chain(ann) -> Match:
    x, root = ann["x"], ann["root"]
    if not x.same_as(ann["x2"]):
        raise Refused("GELU chain: erf is not taken of the multiplied tensor")
    if op_name(ann["scaled"]) == "relax.divide":
        _const_is(ann["scale"], float(np.float32(np.sqrt(2.0))), "the divisor of x")
    else:
        _const_is(ann["scale"], float(np.float32(1 / np.sqrt(2.0))), "the factor of x")
    _const_is(ann["one"], 1.0, "the added constant")
    _const_is(ann["half"], 0.5, "the factor")
    if dtype_of(x) != "float32" or shape_of(root) != shape_of(x):
        raise Refused(f"GELU chain on {dtype_of(x)}{list(shape_of(x))} (float32, elementwise only)")
    if "bias" in ann:
        return _bias_gelu_match(ann, "gelu")
    return _unary_match("gelu", ann, {"approximate": "none"})


def _make_bias_gelu(op):
    """``gelu(add(y, bias constant))``: the feed-forward bias add + GELU (``op``
    relax.nn.gelu / relax.nn.gelu_tanh) as one pass of the add kernel."""
    def make():
        dpl = _dpl()
        y, c = dpl.wildcard(), dpl.is_const()
        x = dpl.is_op("relax.add")(y, c)
        root = dpl.is_op(op)(x)
        return root, {"y": y, "bias": c, "x": x, "root": root, "core": root}
    return make


def _build_bias_gelu(activation):
    return lambda ann: _bias_gelu_match(ann, activation)


def _bias_gelu_match(ann, activation) -> Match:
    y, root = ann["y"], ann["root"]
    if is_constant(y):
        raise Refused("input is a constant")
    shape, dt = shape_of(y), dtype_of(y)
    if dt != "float32" or shape_of(root) != shape or not shape:
        raise Refused(f"bias + GELU on {dt}{list(shape)} (float32, the bias along the last axis)")
    n = shape[-1]
    arr = const_value(ann["bias"])
    if arr.size != n or any(d != 1 for d in arr.shape[:-1]) or str(arr.dtype) != "float32":
        raise Refused(f"bias {arr.dtype}{list(arr.shape)} is not a float32 vector along the last axis [{n}]")
    spec = _spec("add", ["a", "b"], [(shape, dt), ((n,), "float32")], (shape, dt),
                 {"activation": activation, "bias": True})
    return Match(spec, {"b": arr.reshape(n)}, [RuntimeInput("a", y)], anchor=root)


def _make_layer_norm():
    dpl = _dpl()
    x, g, b = dpl.wildcard(), dpl.wildcard(), dpl.wildcard()
    root = dpl.is_op("relax.nn.layer_norm")(x, g, b)
    return root, {"x": x, "gamma": g, "beta": b, "root": root, "core": root}


def build_layer_norm(ann) -> Match:
    """``R.nn.layer_norm`` over the last axis; gamma / beta constants or run-time [N] tensors
    (``scale=False`` / ``center=False`` become ones / zeros constants)."""
    x, root = ann["x"], ann["root"]
    if is_constant(x):
        raise Refused("input is a constant")
    shape = shape_of(x)
    nd = len(shape)
    axes = tuple(int(a) % max(nd, 1) for a in _ints(_attr(root, "axes")))
    if nd == 0 or axes != (nd - 1,):
        raise Refused(f"layer_norm over axes {list(axes)} (the QPU kernel normalises the last axis only)")
    n = shape[-1]
    names, inputs, consts, runtime = ["data"], [(shape, dtype_of(x))], {}, [RuntimeInput("data", x)]
    for nm, flag, fill in (("gamma", "scale", 1.0), ("beta", "center", 0.0)):
        e = ann[nm]
        if not bool(_attr(root, flag, True)):
            arr = np.full(n, fill, np.float32)
        elif is_constant(e):
            arr = const_value(e)
            if arr.size != n:
                raise Refused(f"{nm} of shape {list(arr.shape)} is not [{n}]")
            arr = arr.reshape(n)
        else:
            if shape_of(e) != (n,):
                raise Refused(f"{nm} of shape {list(shape_of(e))} is not [{n}]")
            runtime.append(RuntimeInput(nm, e))
            names.append(nm)
            inputs.append(((n,), dtype_of(e)))
            continue
        names.append(nm)
        inputs.append(((n,), str(arr.dtype)))
        consts[nm] = arr
    attrs = {"axes": (-1,), "epsilon": float(_attr(root, "epsilon"))}
    spec = _spec("layer_norm", names, inputs, (shape_of(root), dtype_of(root)), attrs)
    return Match(spec, consts, runtime, anchor=root)


def _make_layer_norm_chain():
    """The exporters' decomposed layer norm (ONNX before LayerNormalization, opset < 17)::

        d = x - mean(x, -1);  y = d / sqrt(mean(d ** 2, -1) + eps) * gamma + beta

    (gamma and beta constants, either operand order of the multiply and the add)."""
    dpl = _dpl()
    x, x2 = dpl.wildcard(), dpl.wildcard()
    mu = dpl.is_op("relax.mean")(x2)
    d = dpl.is_op("relax.subtract")(x, mu)
    two, eps, g, b = dpl.is_const(), dpl.is_const(), dpl.is_const(), dpl.is_const()
    sq = dpl.is_op("relax.power")(d, two) | dpl.is_op("relax.multiply")(d, d)
    var = dpl.is_op("relax.mean")(sq)
    std = dpl.is_op("relax.sqrt")(dpl.is_op("relax.add")(var, eps))
    norm = dpl.is_op("relax.divide")(d, std)
    scaled = dpl.is_op("relax.multiply")(norm, g) | dpl.is_op("relax.multiply")(g, norm)
    root = dpl.is_op("relax.add")(scaled, b) | dpl.is_op("relax.add")(b, scaled)
    return root, {"x": x, "x2": x2, "mu": mu, "sq": sq, "two": two, "var": var, "eps": eps, "gamma": g,
                  "beta": b, "root": root, "core": root}


def build_layer_norm_chain(ann) -> Match:
    x, root = ann["x"], ann["root"]
    if not x.same_as(ann["x2"]):
        raise Refused("layer norm chain: the mean is not of the normalised tensor")
    shape = shape_of(x)
    nd = len(shape)
    for nm in ("mu", "var"):
        m = ann[nm]
        axes = tuple(int(a) % max(nd, 1) for a in _ints(_attr(m, "axis")))
        if nd == 0 or axes != (nd - 1,) or not bool(_attr(m, "keepdims")):
            raise Refused(f"layer norm chain: a mean over axes {list(axes)} (the last axis, keepdims, only)")
    if op_name(ann["sq"]) == "relax.power":
        _const_is(ann["two"], 2.0, "the exponent")
    eps = const_value(ann["eps"])
    if eps.size != 1 or not float(eps.reshape(())) > 0:
        raise Refused("layer norm chain: epsilon is not one positive constant")
    n = shape[-1]
    consts = {}
    for nm in ("gamma", "beta"):
        arr = const_value(ann[nm])
        if arr.size == 1:
            arr = np.full(n, arr.reshape(()), arr.dtype)
        if arr.size != n or any(d != 1 for d in arr.shape[:-1]):
            raise Refused(f"layer norm chain: {nm} of shape {list(arr.shape)} is not per-element of the last axis")
        consts[nm] = arr.reshape(n)
    if shape_of(root) != shape or dtype_of(root) != dtype_of(x):
        raise Refused("layer norm chain: output shape / dtype differ from the input's")
    spec = _spec("layer_norm", ["data", "gamma", "beta"],
                 [(shape, dtype_of(x)), ((n,), str(consts["gamma"].dtype)), ((n,), str(consts["beta"].dtype))],
                 (shape, dtype_of(root)), {"axes": (-1,), "epsilon": float(eps.reshape(()))})
    return Match(spec, consts, [RuntimeInput("data", x)], anchor=root)


# ---------------------------------------------------------------------------------------------
# the table (order = priority)

#: block-wise weight scales along K (their pattern and builder live in tvm_qpu.quant)
BLOCKWISE_PATTERN = "qpu.matmul_blockwise"


def _blockwise_row() -> PatternEntry:
    """The block-wise matmul row (before the plain matmul rows). tvm_qpu.quant imports this
    module, so its pattern and builder are looked up there when the row is used, not when the
    table is built: either module can be imported first."""
    def make():
        from .quant import _make_blockwise_pattern
        return _make_blockwise_pattern()

    def build(ann):
        from .quant import build_blockwise_matmul
        return build_blockwise_matmul(ann)
    return PatternEntry(BLOCKWISE_PATTERN, "matmul", make, build,
                        "sum(float32(matmul(per-block x, W blocks)) * block scales): block-wise weight scales")


def _table() -> list:
    rows = [_blockwise_row()]
    suffix = {"relax.multiply": "", "relax.divide": "_div", PRESCALED_KT: "_prescaled", PRESCALED_K: "_prescaled_k"}
    for masked in (True, False):
        for sop in suffix:
            nm = "attention" + ("_mask" if masked else "") + suffix[sop]
            core = "matmul(Q * s1, K^T * s2)" if sop in (PRESCALED_KT, PRESCALED_K) else "matmul(Q, K^T) * scale"
            rows.append(PatternEntry(f"qpu.{nm}", "attention", _make_attention(masked, sop), build_attention,
                                     f"{core} (+ mask) -> softmax -> matmul(., V)"))
    for base, kind, make, build in (("matmul", "matmul", _make_matmul, build_matmul),
                                    ("conv2d", "conv2d", _make_conv2d, build_conv2d),
                                    ("conv1d", "conv2d", _make_conv1d, build_conv1d)):
        for requant in (True, False):             # the 8-bit requantized forms first (more fused)
            for epi in EPILOGUES:
                nm = base + ("_" + epi if epi else "") + ("_requant" if requant else "")
                doc = f"{base} with epilogue {epi or 'none'}" + (", requantized to 8 bits" if requant else "")
                rows.append(PatternEntry(f"qpu.{nm}", kind, make(epi, requant), build, doc))
    rows += [
        # before the pooling rows: its means over the last axis would become global average pools
        PatternEntry("qpu.layer_norm_chain", "layer_norm", _make_layer_norm_chain, build_layer_norm_chain,
                     "(x - mean) / sqrt(mean((x - mean)^2) + eps) * gamma + beta"),
        PatternEntry("qpu.max_pool2d", "max_pool2d", _make_unary("relax.nn.max_pool2d"), _build_pool("max_pool2d")),
        PatternEntry("qpu.avg_pool2d", "avg_pool2d", _make_unary("relax.nn.avg_pool2d"), _build_pool("avg_pool2d")),
        PatternEntry("qpu.global_avg_pool2d", "global_avg_pool2d", _make_global_avg_pool, build_global_avg_pool),
        PatternEntry("qpu.reduce_max", "reduce_max", _make_unary("relax.max"), _build_reduce("reduce_max")),
        PatternEntry("qpu.reduce_min", "reduce_min", _make_unary("relax.min"), _build_reduce("reduce_min")),
        PatternEntry("qpu.softmax", "softmax", _make_unary("relax.nn.softmax"), build_softmax),
        PatternEntry("qpu.layer_norm", "layer_norm", _make_layer_norm, build_layer_norm,
                     "layer_norm over the last axis"),
        # a bias add + GELU first (when no matmul row took the bias add), then GELU alone
        PatternEntry("qpu.bias_gelu", "add", _make_bias_gelu("relax.nn.gelu"), _build_bias_gelu("gelu")),
        PatternEntry("qpu.bias_gelu_tanh", "add", _make_bias_gelu("relax.nn.gelu_tanh"), _build_bias_gelu("gelu_tanh")),
        PatternEntry("qpu.bias_gelu_erf_chain", "add", _make_gelu_erf_chain(True), build_gelu_erf_chain,
                     "the erf GELU chain of add(y, bias)"),
        PatternEntry("qpu.gelu", "gelu", _make_unary("relax.nn.gelu"), _build_gelu("none")),
        PatternEntry("qpu.gelu_tanh", "gelu", _make_unary("relax.nn.gelu_tanh"), _build_gelu("tanh")),
        PatternEntry("qpu.gelu_erf_chain", "gelu", _make_gelu_erf_chain(), build_gelu_erf_chain,
                     "x * (erf(x / sqrt 2) + 1) * 0.5 and its reorderings"),
    ]
    # residual add (two run-time tensors) last: the bias adds of matmul / conv and the attention
    # mask add are claimed by the rows above
    for epi in ("relu", "clip", "clip_min", "clip_max", ""):
        nm = "add" + ("_" + epi if epi else "")
        rows.append(PatternEntry(f"qpu.{nm}", "add", _make_residual_add(epi), build_residual_add,
                                 f"add of two same-shape run-time tensors with epilogue {epi or 'none'}"))
    return rows


PATTERN_TABLE: list = _table()
BY_NAME: dict = {e.name: e for e in PATTERN_TABLE}


def entry(name: str) -> PatternEntry:
    return BY_NAME[name]


def match_function(entry_: PatternEntry, func):
    """Re-run ``entry_``'s pattern on a composite function's body; returns its Match."""
    from tvm import relax
    root, ann = entry_.make()
    var2val = relax.analysis.get_var2val(func)
    body = func.body
    out = body.body if hasattr(body, "body") else body
    expr = var2val.get(out, out)
    m = root.extract_matched_expr(expr, var2val)
    if m is None:
        raise Refused(f"{entry_.name}: composite body no longer matches its pattern")
    annotated = {k: m[p] for k, p in ann.items() if p in m}
    return entry_.build(annotated)
