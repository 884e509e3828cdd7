"""QDQ rewrite: ``DequantizeLinear -> Conv / MatMul / Gemm (+ bias) (-> Relu)`` becomes an integer op.

TVM 0.27's ONNX importer keeps QDQ models' quantisation as ``relax.quantize`` / ``relax.dequantize``
calls around *float* operators: ``conv2d(dequantize(xq, sx, zx), dequantize(Wq, sw, zw))``, the bias
``add(., reshape(dequantize(Bq, sb, 0)))``, ``relu``, then ``quantize(., sy, zy)``. After the parameters
are bound the weight dequantizes are constant, and ``FoldConstant`` would turn them into float32
weights (the QPU then ran the model as a float model). :func:`rewrite_qdq` runs *before* folding and
rewrites each such chain into

    acc = conv2d(astype(xq, int32) [- zx], Wq - zw, out_dtype=int32) [+ Bq] [-> relu]   (exact, int32)
    y   = dequantize(acc, sx * sw, 0, axis=<output channel>)                              (float32)

so the integer part is the integer conv / matmul form the qpu patterns already offload (8-bit
activations and weights read by the TMU, ``smul24``, int32 accumulation, int32 bias, ReLU on the
int32 accumulator). Per-channel weight scales (on the output channel axis) become a per-channel
``dequantize``. ReLU moves before the dequantize because the scales are checked to be positive
(``relu(s * a) = s * relu(a)``). When the chain ends in ``quantize`` (the next layer's input),
:func:`rewrite_requant` (run after the importer's Clip / ReLU6 became Relax ops) replaces
``dequantize -> [ReLU / ReLU6 / Clip] -> quantize`` by one requantize of the accumulator, which the
qpu patterns fuse into the kernel (gemm.Requant: the region writes int8 / uint8); otherwise (a float
output, a float bias) the dequantize stays a CPU op after an int32 region.

Rounding (what can differ from ONNX Runtime, at most one quantisation step at a rounding tie):

* we, fused: ``q = clamp(round_half_even(float32(acc) * m) + zy, lo, hi)`` with the exact int32
  accumulator and ``m = float32(float32(sx * sw) / sy)``; the clamp is the output range narrowed by
  a ReLU6 / Clip (its float bounds quantized with ``sy``, ``zy``). Same on the QPU (itof, fmul,
  ftoin, clamp, add) and on the CPU (TVM's ``round`` lowers to LLVM ``nearbyint``: half to even);
* we, unfused (float output): ``y = float32(acc) * float32(sx * sw)``;
* ONNX Runtime (``ORT_ENABLE_ALL``) fuses ``DQ -> Conv -> Q`` into ``QLinearConv`` (and MatMul into
  ``QLinearMatMul``): int32 accumulation, then ``float32(acc) * (sx * sw / sy)`` rounded half to even
  (MLAS requantize), + zy, saturated: the formula we use. Unfused QDQ nodes compute the conv in
  float32 and quantize ``y / sy``; those products differ in the last float bit, so a value within
  one ulp of a .5 tie can round the other way (a difference of one step).

Between integer ops, ``quantize(op(dequantize(q, s, z)), s, z)`` with one positive scale and zero
point is ``op(q)`` exactly for a max pool or a reshape (:data:`INT_PASSTHROUGH`), so adjacent integer
regions pass the 8-bit tensor on (the digits QDQ model's pools run as int8 QPU pools) with no float
round trip. An activation zero point makes the operand ``x - zx``: the backend stores it in the
narrowest dtype holding its range (``uint8 - 128`` -> int8, ``int8 + 128`` -> uint8, otherwise int16).

A matmul of two *run-time* quantized operands (attention's Q K^T and P V: ``matmul(dequantize(a),
[permute_dims](dequantize(b)))``, no constant weight) becomes an integer matmul of ``a - za`` and
``b - zb`` as well (:func:`runtime_matmul`; per-tensor parameters), so its requantize fuses the same
way; ``permute_dims`` joins the pass-through ops, so the head split and the K transpose move int8.

A chain is left in float (on the CPU, or on the QPU as a float kernel) when the integer form would
not be exact; each decision, with its reason, is returned and ends up in the partition report:
scales that are not finite and positive, a per-axis scale on an axis other than the output channel,
a per-channel activation zero point, non-integer quantised dtypes, an int32 accumulator that could
overflow (``K * max|x - zx| * max|w - zw| + max|b|`` beyond int32). Nonzero weight zero points and
uint8 weights are handled exactly (``Wq - zw`` is computed at compile time and kept in the
smallest integer dtype that holds it: int8, uint8 or int16). A bias whose scale is not ``sx * sw``
(or whose zero point is not 0) is added in float after the integer op instead of on the accumulator.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import patterns as P

INT32_MAX = (1 << 31) - 1
#: relative tolerance for "bias scale == sx * sw" (the quantiser writes sb = sx * sw in float32)
BIAS_SCALE_RTOL = 1e-6
#: weight / activation dtypes the rewrite accepts (what DequantizeLinear takes, 8-bit and 16-bit)
QUANT_DTYPES = ("int8", "uint8", "int16", "uint16")
#: anchor op -> output-channel axis of the weight (as given to the op) and of the output
_CHANNEL_AXES = {"relax.nn.conv2d": (0, 1), "relax.matmul": (-1, -1)}


@dataclass
class QdqDecision:
    """One DQ -> op chain: rewritten to integer (accepted) or left in float (reason)."""
    var: str
    op: str
    accepted: bool
    reason: str

    def as_dict(self):
        return dict(self.__dict__)


class _Keep(Exception):
    """The chain stays in float (the message is the reason)."""


def _scalar(arr, what):
    if arr.size != 1:
        raise _Keep(f"{what} is not a scalar")
    return arr.reshape(())


def _check_scale(arr, what):
    if not np.all(np.isfinite(arr)) or np.any(arr <= 0):
        raise _Keep(f"{what} has zero, negative or non-finite values")


def _dq_parts(dq, what):
    """(q expr, scale array, zero-point array, axis) of a ``relax.dequantize`` with constant params."""
    q, s, z = dq.args
    if not (P.is_constant(s) and P.is_constant(z)):
        raise _Keep(f"{what}: scale / zero point are not constants")
    dt = P.dtype_of(q)
    if dt not in QUANT_DTYPES + ("int32",):
        raise _Keep(f"{what}: quantised dtype {dt}")
    scale = P.const_value(s).astype(np.float32)
    _check_scale(scale, f"{what} scale")
    return q, scale, P.const_value(z).astype(np.int64), int(P._attr(dq, "axis", -1))


def _same_scales(a, b) -> bool:
    """Scale vectors (or scalars, broadcast) equal to float32 precision."""
    a, b = np.asarray(a, np.float64).reshape(-1), np.asarray(b, np.float64).reshape(-1)
    if a.size != b.size and 1 not in (a.size, b.size):
        return False
    return bool(np.allclose(a, b, rtol=BIAS_SCALE_RTOL, atol=0))


def _weight(wdq, op, weight_rank, transposed):
    """(integer weight array (w - zw), per-output-channel scale vector or scalar)."""
    wq, sw, zw, axis = _dq_parts(wdq, "weight")
    if P.dtype_of(wq) not in QUANT_DTYPES:
        raise _Keep(f"weight dtype {P.dtype_of(wq)}")
    w = P.const_value(wq).astype(np.int64)
    if sw.size > 1 or zw.size > 1:
        ax = axis % weight_rank
        want = _CHANNEL_AXES[op][0] % weight_rank
        if transposed:                           # Gemm transB: W [N, K] permuted to [K, N]
            want = 0
        if ax != want:
            raise _Keep(f"per-axis weight scale on axis {axis} (only the output channel axis {want} is exact)")
        shape = [1] * weight_rank
        shape[ax] = -1
        zw_b = zw.reshape(shape) if zw.size > 1 else _scalar(zw, "weight zero point")
        w = w - zw_b
    else:
        w = w - int(_scalar(zw, "weight zero point"))
    return w, sw


def _activation_operand(xdq):
    xq, sx, zx, _ = _dq_parts(xdq, "activation")
    if P.dtype_of(xq) not in QUANT_DTYPES:
        raise _Keep(f"activation dtype {P.dtype_of(xq)}")
    sx = _scalar(sx, "activation scale")
    zx = int(_scalar(zx, "activation zero point"))
    info = np.iinfo(P.dtype_of(xq))
    return xq, float(sx), zx, max(abs(int(info.min) - zx), abs(int(info.max) - zx))


def _rewrite_one(m, names):
    """The integer replacement of one matched chain (raises _Keep)."""
    from tvm import relax
    import tvm
    core = m[names["core"]]
    op = P.op_name(core)
    xdq = m[names["xdq"]]
    xq, sx, zx, xmax = _activation_operand(xdq)
    wdq = m[names["wdq"]]
    transposed = names["wperm"] in m
    wrank = len(P.shape_of(wdq))
    w, sw = _weight(wdq, op, wrank, transposed)
    # the accumulator bound: K products of |x - zx| <= xmax and |w| <= wmax, plus the bias
    if op == "relax.nn.conv2d":
        k = int(np.prod(w.shape[1:]))
    else:
        k = int(w.shape[1] if transposed else w.shape[0])
    wmax = int(np.abs(w).max()) if w.size else 0
    bias_int = None
    bias_reason = ""
    if names["bdq"] in m:
        bq, sb, zb, _ = _dq_parts(m[names["bdq"]], "bias")
        acc_scale = np.float32(sx) * sw
        if P.dtype_of(bq) != "int32" or np.any(zb != 0):
            bias_reason = "bias is not int32 with zero point 0"
        elif not _same_scales(sb, acc_scale):
            bias_reason = "bias scale differs from activation scale x weight scale"
        else:
            bias_int = P.const_value(bq).astype(np.int64)
    bmax = int(np.abs(bias_int).max()) if bias_int is not None and bias_int.size else 0
    bound = k * xmax * wmax + bmax
    if bound > INT32_MAX:
        raise _Keep(f"int32 accumulator could overflow (K={k}: {k} x {xmax} x {wmax} + {bmax} > 2^31 - 1)")
    # integer operands: activation (minus its zero point, narrowed later by the backend), weight
    x_dtype = P.dtype_of(xq)
    if names["xreshape"] in m:                   # (Gemm's flatten) reshape the 8-bit tensor, then widen
        xq = relax.op.reshape(xq, m[names["xreshape"]].args[1])
    xi = relax.op.astype(xq, "int32")
    if zx:
        xi = relax.op.subtract(xi, relax.const(np.int32(zx)))
    wc = relax.const(tvm.runtime.tensor(w.astype(np.int32)))
    if transposed:
        wc = relax.op.permute_dims(wc, P._ints(P._attr(m[names["wperm"]], "axes")) or None)
    if op == "relax.nn.conv2d":
        a = core.attrs
        acc = relax.op.nn.conv2d(xi, wc, strides=a.strides, padding=a.padding, dilation=a.dilation,
                                 groups=a.groups, data_layout=a.data_layout, kernel_layout=a.kernel_layout,
                                 out_layout=a.out_layout, out_dtype="int32")
        out_axis = 1
    else:
        acc = relax.op.matmul(xi, wc, out_dtype="int32")
        out_axis = len(P.shape_of(core)) - 1
    float_bias = None
    if bias_int is not None:
        bshape = P.shape_of(m[names["bias_side"]])
        acc = relax.op.add(acc, relax.const(tvm.runtime.tensor(bias_int.astype(np.int32).reshape(bshape))))
    elif names["bdq"] in m:
        float_bias = m[names["bias_side"]]
    if names["relu"] in m and float_bias is None:
        acc = relax.op.nn.relu(acc)
    scale = (np.float32(sx) * sw).astype(np.float32)
    y = relax.op.dequantize(acc, relax.const(tvm.runtime.tensor(scale.reshape(-1) if scale.size > 1 else scale.reshape(()))),
                            relax.const(np.int32(0)), axis=out_axis, out_dtype="float32")
    if float_bias is not None:
        y = relax.op.add(y, float_bias)
        if names["relu"] in m:
            y = relax.op.nn.relu(y)
    why = (f"{x_dtype} activations{(f' - {zx}' if zx > 0 else f' + {-zx}') if zx else ''} x {P.dtype_of(wdq.args[0])} weights"
           f"{' - zero point' if np.any(P.const_value(wdq.args[2])) else ''} -> int32"
           f"{' + int32 bias' if bias_int is not None else ''}{' -> relu' if names['relu'] in m else ''}, "
           f"{'per-channel' if np.size(sw) > 1 else 'per-tensor'} requantize")
    why = note_weight_bits(m, names, w, transposed, why)       # 4 / 2-bit weights (see below)
    if bias_reason:
        why += f"; {bias_reason}: bias added in float"
    return y, why


def _make_patterns():
    """[(root pattern, names)] most-fused first: relu(add(core, bias)), add(core, bias), relu(core), core."""
    from tvm.relax import dpl

    def dq(q):
        return dpl.is_op("relax.dequantize")(q, dpl.is_const(), dpl.is_const())

    out = []
    for with_bias in (True, False):
        for with_relu in (True, False):
            xdq = dq(dpl.wildcard())
            xreshape = dpl.is_op("relax.reshape")(xdq, dpl.wildcard())
            wdq = dq(dpl.is_const())
            wperm = dpl.is_op("relax.permute_dims")(wdq)
            core = dpl.is_op("relax.nn.conv2d")(xdq, wdq) | dpl.is_op("relax.matmul")(xdq | xreshape, wdq | wperm)
            names = {"xdq": xdq, "xreshape": xreshape, "wdq": wdq, "wperm": wperm, "core": core}
            root = core
            bdq = dq(dpl.is_const())
            bias_side = bdq | dpl.is_op("relax.reshape")(bdq, dpl.wildcard())
            names["bdq"], names["bias_side"] = bdq, bias_side
            if with_bias:
                root = dpl.is_op("relax.add")(root, bias_side)
            relu = dpl.is_op("relax.nn.relu")(root)
            names["relu"] = relu
            if with_relu:
                root = relu
            out.append((root, names))
    return out


def _same_qparams(dq, q):
    """``quantize(., s, z)`` undoes ``dequantize(., s, z)``: equal scalar parameters, same dtype."""
    _, s1, z1 = dq.args
    _, s2, z2 = q.args
    a, b = P.const_value(s1), P.const_value(s2)
    if a.size != 1 or b.size != 1 or P.const_value(z1).size != 1 or P.const_value(z2).size != 1:
        raise _Keep("per-axis quantisation around the op")
    _check_scale(a, "scale")
    if float(a.reshape(())) != float(b.reshape(())) or int(P.const_value(z1).reshape(())) != \
            int(P.const_value(z2).reshape(())) or P.dtype_of(dq.args[0]) != P.dtype_of(q):
        raise _Keep("dequantize and quantize parameters around the op differ")


def _max_pool_on(p, q):
    from tvm import relax
    a = p.attrs
    return relax.op.nn.max_pool2d(q, pool_size=a.pool_size, strides=a.strides, padding=a.padding,
                                  dilation=a.dilation, ceil_mode=a.ceil_mode,
                                  count_include_pad=a.count_include_pad, layout=a.layout, out_layout=a.out_layout)


def _reshape_on(p, q):
    from tvm import relax
    return relax.op.reshape(q, p.args[1])


def _permute_on(p, q):
    from tvm import relax
    return relax.op.permute_dims(q, P._ints(P._attr(p, "axes")) or None)


#: ops that commute with dequantize / quantize of one (positive, per-tensor) scale and zero point:
#: ``quantize(op(dequantize(q, s, z)), s, z) == op(q)`` exactly. op name -> (extra pattern args,
#: rebuild(original call, integer input)). max_pool2d: dequantize is increasing (s > 0) so it commutes
#: with max, padding is -inf in both domains; reshape / flatten move values without changing them.
INT_PASSTHROUGH = {
    "relax.nn.max_pool2d": (0, _max_pool_on),
    "relax.reshape": (1, _reshape_on),
    "relax.permute_dims": (0, _permute_on),     # attention's head split / K transpose: moves values
}


def _rewrite_passthrough(func, decisions):
    """``quantize(op(dequantize(q, s, z)), s, z)`` -> ``op(q)`` for the ops of :data:`INT_PASSTHROUGH`:
    adjacent integer regions then pass 8-bit tensors through pools and flattens, with no float
    round trip on the CPU between them."""
    from tvm.relax import dpl
    for opname, (extra, rebuild) in INT_PASSTHROUGH.items():
        dq = dpl.is_op("relax.dequantize")(dpl.wildcard(), dpl.is_const(), dpl.is_const())
        mid = dpl.is_op(opname)(dq, *[dpl.wildcard() for _ in range(extra)])
        root = dpl.is_op("relax.quantize")(mid, dpl.is_const(), dpl.is_const())

        def rewrite(call, m, dq=dq, mid=mid, rebuild=rebuild):
            p = m[mid]
            try:
                _same_qparams(m[dq], call)
                new = rebuild(p, m[dq].args[0])
            except Exception as e:          # _Keep, or an unexpected form: stays float
                decisions.append(QdqDecision(_name(p), P.op_name(p), False, str(e)))
                return call
            decisions.append(QdqDecision(_name(p), P.op_name(p), True,
                                         f"{P.dtype_of(call)} {opname.split('.')[-1]} (no float round trip)"))
            return new

        func = dpl.rewrite_call(root, rewrite, func)
    return func


# ---------------------------------------------------------------------------------------------
# matmuls of two run-time quantized operands (attention's Q K^T and P V)

def _runtime_operand(dq, what):
    """(int8 / uint8 / int16 expr, scalar scale, scalar zero point, max |q - z|) of a
    ``dequantize`` of a run-time tensor with per-tensor parameters (raises _Keep)."""
    q, s, z, _ = _dq_parts(dq, what)
    if P.is_constant(q):
        raise _Keep(f"{what} is a constant (the weight rewrite handles it)")
    if P.dtype_of(q) not in QUANT_DTYPES:
        raise _Keep(f"{what} dtype {P.dtype_of(q)}")
    s = float(_scalar(s, f"{what} scale"))
    z = int(_scalar(z, f"{what} zero point"))
    info = np.iinfo(P.dtype_of(q))
    return q, s, z, max(abs(int(info.min) - z), abs(int(info.max) - z))


def _int_minus_zp(q, z):
    from tvm import relax
    x = relax.op.astype(q, "int32")
    return relax.op.subtract(x, relax.const(np.int32(z))) if z else x


def runtime_matmul(a_dq, b_dq, b_perm=None):
    """``matmul(dequantize(a, sa, za), [permute_dims](dequantize(b, sb, zb)))`` with both ``a`` and
    ``b`` computed at run time (attention's Q K^T and P V) as an integer matmul:

        acc = matmul(int32(a) - za, int32([permute_dims](b)) - zb, out_dtype=int32)      (exact)
        y   = dequantize(acc, float32(sa * sb), 0)

    ``float32(acc) * float32(sa * sb)`` equals the float matmul of the dequantized operands up to
    float rounding (the float sum rounds each product; the integer sum is exact). When a
    ``quantize`` follows, :func:`rewrite_requant` folds ``y`` into the kernel's requantize epilogue
    (``m = float32(sa * sb) / sy``, ORT's QLinearMatMul multiplier). The backend then stores each
    operand ``q - z`` in the narrowest dtype holding its range (int8 / uint8 / int16), read by the
    QPU's run-time B stream; a transposed B is transposed on the CPU as the 8-bit tensor (the
    qpu matmul pattern folds a transpose only of an operand without a cast). Per-tensor
    parameters only (per-axis activation scales: _Keep).
    Returns (expr, reason)."""
    import tvm
    from tvm import relax
    aq, sa, za, amax = _runtime_operand(a_dq, "A")
    bq, sb, zb, bmax = _runtime_operand(b_dq, "B")
    k = int(P.shape_of(a_dq)[-1])
    if k * amax * bmax > INT32_MAX:
        raise _Keep(f"int32 accumulator could overflow (K={k}: {k} x {amax} x {bmax} > 2^31 - 1)")
    a_dt, b_dt = P.dtype_of(aq), P.dtype_of(bq)
    if b_perm is not None:                       # transpose the 8-bit tensor (moves a quarter of the bytes)
        bq = relax.op.permute_dims(bq, P._ints(P._attr(b_perm, "axes")) or None)
    acc = relax.op.matmul(_int_minus_zp(aq, za), _int_minus_zp(bq, zb), out_dtype="int32")
    scale = np.float32(np.float32(sa) * np.float32(sb))
    y = relax.op.dequantize(acc, relax.const(tvm.runtime.tensor(np.asarray(scale, np.float32).reshape(()))),
                            relax.const(np.int32(0)), axis=-1, out_dtype="float32")

    def zp(z):
        return f" - {z}" if z > 0 else f" + {-z}" if z else ""

    why = (f"run-time {a_dt}{zp(za)} x run-time {b_dt}{zp(zb)}"
           f"{' (transposed)' if b_perm is not None else ''} -> int32, per-tensor requantize")
    return y, why


def _rewrite_runtime_matmuls(func, decisions):
    """Every float ``matmul`` of two dequantized run-time tensors becomes :func:`runtime_matmul`
    (decisions appended; an operand that is not such a dequantize leaves the matmul as it is)."""
    from tvm.relax import dpl

    def dq():
        return dpl.is_op("relax.dequantize")(dpl.wildcard(), dpl.is_const(), dpl.is_const())

    a_dq, b_dq = dq(), dq()
    b_perm = dpl.is_op("relax.permute_dims")(b_dq)
    root = dpl.is_op("relax.matmul")(a_dq, b_dq | b_perm)

    def rewrite(call, m):
        if P.dtype_of(call) != "float32" or P.is_constant(m[a_dq].args[0]) or P.is_constant(m[b_dq].args[0]):
            return call
        return _decided(decisions, call, call,
                        lambda: runtime_matmul(m[a_dq], m[b_dq], m[b_perm] if b_perm in m else None))

    return dpl.rewrite_call(root, rewrite, func)


def _decided(decisions, core, call, attempt):
    """Run one rewrite ``attempt() -> (new expression, why)`` for the op ``core`` and record the
    decision: the new expression, or ``call`` unchanged when the form stays float (a ``_Keep``
    with its reason, or any other failure as "check failed": the import never crashes)."""
    try:
        new, why = attempt()
    except _Keep as e:
        decisions.append(QdqDecision(_name(core), P.op_name(core), False, str(e)))
        return call
    except Exception as e:
        decisions.append(QdqDecision(_name(core), P.op_name(core), False,
                                     f"check failed ({type(e).__name__}: {e})"))
        return call
    decisions.append(QdqDecision(_name(core), P.op_name(core), True, why))
    return new


def rewrite_qdq(func):
    """Rewrite the QDQ chains of a Relax function (see module docstring).

    Returns (function, [QdqDecision])."""
    from tvm.relax import dpl
    decisions = lowbit_decisions(func)       # 4 / 2-bit weights of the import; block-wise notes
    func = _rewrite_passthrough(func, decisions)
    for root, names in _make_patterns():
        def rewrite(call, m, names=names):
            core = m[names["core"]]
            if P.dtype_of(core) != "float32":
                return call
            return _decided(decisions, core, call, lambda: _rewrite_one(m, names))
        func = dpl.rewrite_call(root, rewrite, func)
    func = _rewrite_runtime_matmuls(func, decisions)
    func = rewrite_blockwise_matmuls(func, decisions)    # block-wise weight scales along K
    if decisions:
        func = unique_names(func)
    return func, _dedupe(decisions)


#: 8-bit outputs the QPU kernels' requantize epilogue writes -> (qmin, qmax) (the patterns' table)
REQUANT_OUT = P.REQUANT_OUT
#: float ops between ``dequantize(acc)`` and ``quantize`` folded into the requantize clamp
#: (op name -> how it bounds the value: ("lo", arg) / ("hi", arg) / ("clip",) / ("relu",))
_CLAMP_OPS = {"relax.nn.relu": ("relu",), "relax.maximum": ("lo", 1), "relax.minimum": ("hi", 1),
              "relax.clip": ("clip",)}


@dataclass
class _RequantPlan:
    acc: object            # the int32 accumulator expression
    multiplier: np.ndarray  # float32, scalar or per channel (broadcast shape)
    zero_point: int
    lo: int
    hi: int
    out_dtype: str
    why: str


def _const_scalar(e, what):
    if not P.is_constant(e):
        raise _Keep(f"{what} is not a constant")
    v = P.const_value(e)
    if v.size != 1:
        raise _Keep(f"{what} is not a scalar")
    return v.reshape(())


def _requant_plan(q, var2val):
    """The requantize of ``quantize([clamps](dequantize(acc_int32, s, 0)), sy, zy)`` (see
    :func:`rewrite_requant`), None when ``q`` is not such a chain, _Keep with the reason when it is
    but cannot be fused exactly."""
    from tvm import relax

    def val(e):
        return var2val.get(e, e) if isinstance(e, relax.Var) else e

    x = val(q.args[0])
    lo_f, hi_f = -np.inf, np.inf
    clamps = []
    while P.op_name(x) in _CLAMP_OPS:
        kind = _CLAMP_OPS[P.op_name(x)]
        if kind[0] == "relu":
            lo_f = max(lo_f, 0.0)
        elif kind[0] == "clip":
            lo_f, hi_f = max(lo_f, float(x.args[1].value)), min(hi_f, float(x.args[2].value))
        else:
            b = float(_const_scalar(x.args[kind[1]], "clamp bound"))
            lo_f, hi_f = (max(lo_f, b), hi_f) if kind[0] == "lo" else (lo_f, min(hi_f, b))
        clamps.append(P.op_name(x).split(".")[-1])
        x = val(x.args[0])
    if P.op_name(x) != "relax.dequantize":
        return None
    acc, s_acc, z_acc = x.args
    if P.dtype_of(acc) != "int32":
        return None
    if np.isnan(lo_f) or np.isnan(hi_f) or lo_f > hi_f:
        raise _Keep("clamp between dequantize and quantize is empty or NaN")
    out = P.dtype_of(q)
    if out not in REQUANT_OUT:
        raise _Keep(f"quantize to {out} (the kernels write int8 / uint8)")
    if not (P.is_constant(s_acc) and P.is_constant(z_acc)) or np.any(P.const_value(z_acc)):
        raise _Keep("accumulator scale not constant or zero point not 0")
    sy = np.float32(_const_scalar(q.args[1], "output scale"))
    _check_scale(np.asarray(sy), "output scale")
    zy = int(_const_scalar(q.args[2], "output zero point"))
    sa = P.const_value(s_acc).astype(np.float32)
    _check_scale(sa, "accumulator scale")
    qmin, qmax = REQUANT_OUT[out]
    # ONNX Runtime's QLinearConv / QLinearMatMul multiplier: (sx * sw) / sy in float32
    m = (sa.reshape(-1) / sy).astype(np.float32)
    if not np.all(np.isfinite(m) & (m > 0)):
        raise _Keep("requantize multiplier is not finite and positive")
    rank = len(P.shape_of(acc))
    if m.size > 1:
        axis = int(P._attr(x, "axis", -1)) % rank
        if P.shape_of(acc)[axis] != m.size:
            raise _Keep("per-channel scale does not match the output channels")
        shape = [1] * rank
        shape[axis] = m.size
        m = m.reshape(shape)
    else:
        m = m.reshape(())

    def qbound(v, default):
        # rne(clip(y, a, b) / sy) = clip(rne(y / sy), rne(a / sy), rne(b / sy)): division by
        # sy > 0 and rounding are monotone
        if np.isinf(v):
            return default
        return int(np.clip(np.rint(np.float64(np.float32(v) / sy)) + zy, qmin, qmax))

    lo, hi = max(qmin, qbound(lo_f, qmin)), min(qmax, qbound(hi_f, qmax))
    if not qmin <= zy <= qmax:
        raise _Keep(f"output zero point {zy} outside {out}")
    why = (f"requantize to {out} fused into the integer op ({'per-channel' if m.size > 1 else 'per-tensor'} "
           f"multiplier s_acc / s_y, zero point {zy}{', clamp ' + '/'.join(clamps) if clamps else ''} "
           f"-> [{lo}, {hi}])")
    return _RequantPlan(acc, m, zy, lo, hi, out, why)


def requant_expr(acc, plan: _RequantPlan):
    """``astype(clip(round(astype(acc, float32) * m) + zp, lo, hi), out)``: the form the qpu
    patterns take as the kernels' requantize epilogue (gemm.Requant), which the CPU computes the
    same way (float32 multiply, round half to even, exact small-integer adds and clamps)."""
    import tvm
    from tvm import relax
    f = relax.op.astype(acc, "float32")
    f = relax.op.multiply(f, relax.const(tvm.runtime.tensor(plan.multiplier)))
    f = relax.op.add(relax.op.round(f), relax.const(np.float32(plan.zero_point)))
    f = relax.op.clip(f, float(plan.lo), float(plan.hi))
    return relax.op.astype(f, plan.out_dtype)


def rewrite_requant(func):
    """``quantize([relu | maximum | minimum | clip](dequantize(acc, s_acc, 0)), s_y, z_y)`` with an
    int32 ``acc`` (what :func:`rewrite_qdq` leaves after an integer conv / matmul) becomes one
    requantize on the accumulator (:func:`requant_expr`):

        q = clamp(round_half_even(float32(acc) * m) + z_y, lo, hi),   m = float32(s_acc / s_y)

    with ``[lo, hi]`` the output dtype's range narrowed by the float clamps (ReLU6 / Clip bounds
    quantized with the output parameters; ReLU gives ``lo = z_y``). ``m`` is ONNX Runtime's
    QLinearConv / QLinearMatMul multiplier ``(s_x s_w) / s_y``, so the result equals ORT's fused
    kernels; against unfused QDQ (``round(float32(acc * s_acc) / s_y)``) it can differ by one step
    where the two float32 roundings straddle a .5 tie. The integer op, its epilogue and this
    requantize then form one QPU region with 8-bit output, and the next integer op reads those
    bytes (no dequantize / quantize on the CPU between them). Runs after the importer's Clip /
    ReLU6 calls became Relax ops (tvm_qpu.backend.canonicalize). Returns (function, [QdqDecision])."""
    from tvm import relax
    var2val = relax.analysis.get_var2val(func)
    decisions = []

    @relax.expr_functor.mutator
    class _Requant(relax.PyExprMutator):
        def visit_var_binding_(self, binding):
            val = binding.value
            if isinstance(val, relax.Call) and P.op_name(val) == "relax.quantize":
                try:
                    plan = _requant_plan(val, var2val)
                except _Keep as e:
                    decisions.append(QdqDecision(_name(val), "relax.quantize", False,
                                                 f"requantize stays on the CPU: {e}"))
                    plan = None
                except Exception as e:           # an unexpected form: stays as it is
                    decisions.append(QdqDecision(_name(val), "relax.quantize", False,
                                                 f"requantize check failed ({type(e).__name__}: {e})"))
                    plan = None
                if plan is not None:
                    new = requant_expr(self.visit_expr(plan.acc), plan)
                    if isinstance(binding.var, relax.DataflowVar):
                        nv = self.builder_.emit(new, name_hint=binding.var.name)
                    else:
                        nv = self.builder_.emit_output(new, name_hint=binding.var.name)
                    self.set_var_remap(binding.var, nv)
                    decisions.append(QdqDecision(_name(val), "relax.quantize", True, plan.why))
                    return
            super().visit_var_binding_(binding)

    out = _Requant().visit_expr(func)
    if decisions:
        out = unique_names(out)
    return out, decisions


def unique_names(func):
    """Give every binding of ``func`` a distinct name (the rewrites emit new ``lv`` bindings; the
    partition report keys its rows by variable name): a repeated name gets a ``_<n>`` suffix."""
    from tvm import relax

    @relax.expr_functor.mutator
    class _Unique(relax.PyExprMutator):
        def __init__(self):
            super().__init__()
            self.seen = {p.name for p in func.params}

        def visit_var_binding_(self, binding):
            name = binding.var.name
            if name not in self.seen:
                self.seen.add(name)
                return super().visit_var_binding_(binding)
            i = 1
            while f"{name}_{i}" in self.seen:
                i += 1
            self.seen.add(f"{name}_{i}")
            val = self.visit_expr(binding.value)
            if isinstance(binding.var, relax.DataflowVar):
                nv = self.builder_.emit(val, name_hint=f"{name}_{i}")
            else:
                nv = self.builder_.emit_output(val, name_hint=f"{name}_{i}")
            self.set_var_remap(binding.var, nv)

    return _Unique().visit_expr(func)


def _name(e):
    """A readable name for an op before partitioning (its variable is not known to the rewrite)."""
    try:
        return f"{P.op_name(e).split('.')[-1]}{list(P.shape_of(e))}"
    except P.Refused:
        return P.op_name(e) or "?"


def _dedupe(decisions):
    """Refusals of a less-fused pattern repeat the same reason: keep one per op and reason."""
    seen, out = set(), []
    for d in decisions:
        k = (d.op, d.accepted, d.reason, d.var)
        if k not in seen:
            seen.add(k)
            out.append(d)
    return out


# ---------------------------------------------------------------------------------------------
# 4-bit and 2-bit weights
#
# :func:`tvm_qpu.onnx_quant.lower_lowbit` unpacks an ONNX INT4 / UINT4 / INT2 / UINT2 initializer
# to int8 / uint8 before TVM's frontend reads it and records the fingerprint of its values in the
# main function's ``tvm_qpu.lowbit`` attribute. :func:`rewrite_qdq` recognizes those weights
# (origin, not range: an 8-bit model whose weights happen to be small keeps 8-bit storage) and,
# when the rewritten integer weight ``w - zw`` still fits the bit width (signed, or unsigned with
# the uint8 storage dtype), asks the kernel whether it stores weights at that width
# (:func:`kernel_takes_weight_bits`). If it does, the weight's fingerprint is kept in
# :data:`_LOWBIT_WEIGHTS` and the pattern stage (:func:`lowbit_match`, called by the matmul and
# conv2d spec builders of :mod:`tvm_qpu.patterns`) puts ``weight_bits`` (4 or 2) into the region
# spec, with the 8-bit form as the fallback alternative; the spec is then described with the
# weight as ``int4`` / ``uint4`` / ``int2`` / ``uint2``. Otherwise the weight is stored in 8 bits
# and the decision says why (the result is the same: the values are the same integers).
#
# A kernel "stores weights at b bits" when it accepts the spec with ``weight_bits = b`` and refuses
# it with ``weight_bits = 3`` (:data:`PROBE_BITS`, a width no kernel packs): a kernel that accepts
# both does not read the attribute, and the region must not claim 4-bit storage it does not have.
# Block-wise scales (a scale varying along the reduction axis K) cannot be factored out of an int32
# accumulation: the import keeps those dequantizes in float and the notes become refusals here.

#: ONNX low-bit type name -> bits (unpacked by the import; 8-bit weights carry no attribute)
LOWBIT_BITS = {"int4": 4, "uint4": 4, "int2": 2, "uint2": 2}
#: a width no kernel stores; accepting it means the kernel ignores ``weight_bits``
PROBE_BITS = 3
#: at most this many weight fingerprints are remembered between the rewrite and the spec builders
_LOWBIT_KEEP = 4096
#: fingerprint of a rewritten weight (w - zw, either orientation of a 2-D weight) -> bits
_LOWBIT_WEIGHTS: dict = {}
_LOWBIT_CONTEXT = None           # the LowBitInfo of the function rewrite_qdq is working on


def lowbit_info(func):
    """The :class:`tvm_qpu.onnx_quant.LowBitInfo` an import attached to ``func`` (empty if none)."""
    from .onnx_quant import LOWBIT_ATTR, LowBitInfo
    attrs = getattr(func, "attrs", None)
    if attrs is None or LOWBIT_ATTR not in attrs:
        return LowBitInfo()
    return LowBitInfo.from_json(attrs[LOWBIT_ATTR])


def lowbit_decisions(func) -> list:
    """Start the rewrite of ``func``: remember its low-bit weights; returns the import's notes
    (block-wise dequantizes kept in float) as refusals."""
    global _LOWBIT_CONTEXT
    _LOWBIT_CONTEXT = lowbit_info(func)
    return [QdqDecision(node, "DequantizeLinear", False, reason) for node, reason in _LOWBIT_CONTEXT.notes]


def lowbit_storage(w: np.ndarray, bits: int):
    """(storage dtype, None) of an integer weight at ``bits``: "int8" when its values fit the signed
    range, "uint8" when they fit the unsigned one; else (None, reason)."""
    from .onnx_quant import lowbit_range
    lo, hi = (int(w.min()), int(w.max())) if w.size else (0, 0)
    for dt, signed in (("int8", True), ("uint8", False)):
        a, b = lowbit_range(bits, signed)
        if a <= lo and hi <= b:
            return dt, None
    (a, b), (c, d) = lowbit_range(bits, True), lowbit_range(bits, False)
    return None, f"w - zero point spans [{lo}, {hi}], beyond int{bits} [{a}, {b}] and uint{bits} [{c}, {d}]"


def lowbit_dtype_name(storage: str, bits: int) -> str:
    """'int4' / 'uint2' ...: how a weight stored as ``storage`` at ``bits`` runs on the QPU."""
    return f"{'u' if storage.startswith('u') else ''}int{bits}"


def _with_bits(spec, bits):
    from tvm_qpu.codegen.registry import OpSpec
    return OpSpec(spec.kind, list(spec.inputs), spec.output, dict(spec.attrs, weight_bits=int(bits)))


def kernel_takes_weight_bits(spec, bits) -> tuple:
    """(ok, reason): does the kernel of ``spec`` store its weight at ``bits`` (see the section
    comment: it must accept ``bits`` and refuse :data:`PROBE_BITS`)?"""
    from tvm_qpu.codegen import registry
    try:
        ok, why = registry.supports(_with_bits(spec, bits))
        if not ok:
            return False, f"the {spec.kind} kernel refuses weight_bits={bits}: {why}"
        if registry.supports(_with_bits(spec, PROBE_BITS))[0]:
            return False, f"the {spec.kind} kernel does not read weight_bits (it accepts weight_bits={PROBE_BITS})"
    except Exception as e:           # a kernel check that fails is a refusal, never a crash
        return False, f"the {spec.kind} kernel check failed ({type(e).__name__}: {e})"
    return True, "ok"


def _operand_dtype(dt: str, zp: int) -> str:
    """The dtype the backend gives ``x - zp`` of an 8-bit activation (tvm_qpu.backend narrowing)."""
    if zp == 0:
        return dt
    lo, hi = (int(v) - zp for v in (np.iinfo(dt).min, np.iinfo(dt).max))
    for cand in ("int8", "uint8", "int16"):
        if np.iinfo(cand).min <= lo and hi <= np.iinfo(cand).max:
            return cand
    return "int32"


def _probe_spec(m, names, w, storage, transposed):
    """The plain integer op (no bias, no epilogue) of a matched chain as a registry spec, to ask
    its kernel about ``weight_bits`` at rewrite time (the region's full spec is asked again by
    :func:`lowbit_match`)."""
    from tvm_qpu.codegen.registry import OpSpec
    core = m[names["core"]]
    xq, _, zx, _ = _activation_operand(m[names["xdq"]])
    x_dt = _operand_dtype(P.dtype_of(xq), zx)
    out = tuple(P.shape_of(core))
    if P.op_name(core) == "relax.nn.conv2d":
        a = core.attrs
        pad = P._ints(a.padding)
        pad = pad * 2 if len(pad) == 2 else pad
        attrs = {"strides": P._ints(a.strides), "padding": pad, "dilation": P._ints(a.dilation),
                 "groups": int(a.groups), "layout": "NCHW", "bias": False, "activation": None,
                 "out_dtype": "int32", "input_names": ["data", "weight"]}
        return OpSpec("conv2d", [(tuple(P.shape_of(m[names["xdq"]])), x_dt), (tuple(w.shape), storage)],
                      (out, "int32"), attrs)
    k = int(w.shape[1] if transposed else w.shape[0])
    rows = int(np.prod(out[:-1], dtype=np.int64)) if len(out) > 1 else 1
    attrs = {"transpose_b": bool(transposed), "bias": False, "activation": None, "out_dtype": "int32",
             "input_names": ["A", "B"]}
    return OpSpec("matmul", [((rows, k), x_dt), (tuple(w.shape), storage)], ((rows, out[-1]), "int32"), attrs)


def _remember_lowbit(w, bits):
    from .onnx_quant import lowbit_fingerprint
    if len(_LOWBIT_WEIGHTS) >= _LOWBIT_KEEP:
        _LOWBIT_WEIGHTS.clear()
    _LOWBIT_WEIGHTS[lowbit_fingerprint(w)] = int(bits)
    if w.ndim == 2:
        _LOWBIT_WEIGHTS[lowbit_fingerprint(w.T)] = int(bits)


def note_weight_bits(m, names, w, transposed, why: str) -> str:
    """The decision text of a rewritten chain whose weight came from a 4 / 2-bit initializer: its
    type, and the storage the QPU kernel takes (``weight_bits``) or why it is stored in 8 bits.
    Remembers the weight for :func:`lowbit_match` when the kernel takes the width."""
    from .onnx_quant import lowbit_fingerprint
    info = _LOWBIT_CONTEXT
    wq = m[names["wdq"]].args[0]
    if info is None or not info.weights or not P.is_constant(wq):
        return why
    tname = info.weights.get(lowbit_fingerprint(P.const_value(wq)))
    if tname is None:
        return why
    bits = LOWBIT_BITS[tname]
    why = why.replace(f" x {P.dtype_of(wq)} weights", f" x {tname} weights", 1)
    storage, reason = lowbit_storage(w, bits)
    if storage is not None:
        ok, reason = kernel_takes_weight_bits(_probe_spec(m, names, w, storage, transposed), bits)
        if ok:
            _remember_lowbit(w, bits)
            return why + f"; {lowbit_dtype_name(storage, bits)} weight storage on the QPU (weight_bits={bits})"
    return why + f"; weights stored in 8 bits on the QPU: {reason}"


def lowbit_match(match, weight_name: str):
    """A spec builder's :class:`tvm_qpu.patterns.Match` with ``weight_bits`` when its constant
    weight ``weight_name`` is a rewritten 4 / 2-bit weight (:func:`note_weight_bits`): the tagged
    forms first, then the given 8-bit forms as alternatives (the backend takes the first form a
    kernel supports). ``match`` unchanged otherwise."""
    import dataclasses
    from .onnx_quant import lowbit_fingerprint
    w = match.constants.get(weight_name)
    if w is None or not _LOWBIT_WEIGHTS or np.asarray(w).dtype.kind not in "iu":     # integer weights only
        return match
    bits = _LOWBIT_WEIGHTS.get(lowbit_fingerprint(w))
    if bits is None:
        return match
    forms = [match] + list(match.alternatives)
    tagged = []
    for f in forms:
        fw = f.constants.get(weight_name)
        names = list(f.spec.attrs.get("input_names", []))
        if fw is None or weight_name not in names or np.asarray(fw).dtype.kind not in "iu":
            continue
        storage, _ = lowbit_storage(fw, bits)
        if storage is None:
            continue
        i = names.index(weight_name)
        spec = _with_bits(f.spec, bits)
        spec.inputs[i] = (spec.inputs[i][0], storage)
        if not kernel_takes_weight_bits(spec, bits)[0]:
            continue
        tagged.append(dataclasses.replace(f, spec=spec, constants=dict(f.constants, **{weight_name: fw.astype(storage)}),
                                          alternatives=[]))
    if not tagged:
        return match
    head = tagged[0]
    head.alternatives = tagged[1:] + forms
    return head


# ---------------------------------------------------------------------------------------------
# Block-wise weight scales along K (the LLM "block-wise int4" MatMul)
#
# ``matmul(dequantize(xq, sx, 0), float32(Wq) * repeat(scale, B, axis=0))`` (the import's form of a
# block-wise DequantizeLinear along the weight's K axis, :func:`tvm_qpu.onnx_quant._dequantize_blockwise`)
# has a scale that varies along the reduction axis, so no int32 accumulation over all of K can
# take it. :func:`rewrite_blockwise_matmuls` rewrites it to an exact per-block form
#
#     acc = matmul(astype(permute_dims(reshape(xq, [rows, K / B, B]), [1, 0, 2]), int32),
#                  Wq as int32 [K / B, B, N], out_dtype=int32)          # one int32 sum per block
#     y   = sum(float32(acc) * float32(sx * scale)[K / B, 1, N], axis=0)   # [rows, N]
#
# which the CPU computes as written and the pattern row :data:`BLOCKWISE_PATTERN` offloads whole
# to the GEMM kernel's block-wise path (``k_block`` = B: per block, ``itof`` of the integer sums
# times the block's scale row, added to float accumulators; codegen.kernels.gemm). Left in float
# (with the reason): a nonzero weight zero point (each block would need x's per-block row sums), a K that is not a whole number of blocks, blocks along another axis. An activation
# zero point zx is exact as the constant -zx * sum_b sx s[b, n] * colsum_b(W)[n] added after the
# region (float64 at compile time, rounded to float32; a CPU add of N values).

#: composite name of the block-wise matmul pattern row (tried before the plain matmul rows)
BLOCKWISE_PATTERN = P.BLOCKWISE_PATTERN


def _blockwise_patterns():
    """(root, names) of the import's block-wise matmul, with and without a weight zero point."""
    from tvm.relax import dpl
    xdq = dpl.is_op("relax.dequantize")(dpl.wildcard(), dpl.is_const(), dpl.is_const())
    wq = dpl.is_const()
    wi = dpl.is_op("relax.astype")(wq)
    cut = lambda e: dpl.is_op("relax.strided_slice")(e, varg_default_wildcard=True)   # noqa: E731
    zc = dpl.is_const()
    zrep = cut(dpl.is_op("relax.repeat")(dpl.is_op("relax.astype")(zc) | zc))
    wz = dpl.is_op("relax.subtract")(wi, zrep)
    wf = dpl.is_op("relax.astype")(wi | wz)
    sc = dpl.is_const()
    rep = dpl.is_op("relax.repeat")(sc)
    srep = cut(rep)
    wdq = dpl.is_op("relax.multiply")(wf, srep)
    core = dpl.is_op("relax.matmul")(xdq, wdq)
    return core, {"xdq": xdq, "wq": wq, "wz": wz, "zc": zc, "rep": rep, "sc": sc, "core": core}


def _blockwise_one(m, names):
    """The per-block integer form of one matched block-wise matmul (raises _Keep)."""
    from tvm import relax
    import tvm
    core, rep = m[names["core"]], m[names["rep"]]
    if names["wz"] in m:
        zp = P.const_value(m[names["zc"]])
        if np.any(zp != 0):
            raise _Keep("block-wise weight zero points: each block would need x's per-block row sums")
    axis, block = int(P._attr(rep, "axis")), int(P._attr(rep, "repeats"))
    w = P.const_value(m[names["wq"]]).astype(np.int64)
    scale = P.const_value(m[names["sc"]]).astype(np.float32)
    if w.ndim != 2 or axis % 2 != 0:
        raise _Keep(f"block-wise scales along axis {axis} of a {w.ndim}-D weight (only K, axis 0 of [K, N], runs per block)")
    K, N = w.shape
    if K % block:
        raise _Keep(f"K={K} is not a whole number of {block}-blocks")
    _check_scale(scale, "block-wise weight scale")
    xq, sx, zx, _ = _activation_operand(m[names["xdq"]])
    info8 = np.iinfo(P.dtype_of(xq))
    xmax = max(abs(int(info8.min)), abs(int(info8.max)))          # the raw values: x - zx is folded below
    if block * xmax * int(np.abs(w).max() if w.size else 0) > INT32_MAX:
        raise _Keep(f"int32 block sum could overflow (block {block})")
    xs = tuple(P.shape_of(xq))
    rows = int(np.prod(xs[:-1], dtype=np.int64)) if len(xs) > 1 else 1
    nb = K // block
    # the 8-bit blocks [K / B, rows, B], widened last (the cast form the qpu patterns fold)
    x3 = relax.op.astype(relax.op.permute_dims(relax.op.reshape(xq, (rows, nb, block)), [1, 0, 2]), "int32")
    w3 = relax.const(tvm.runtime.tensor(w.astype(np.int32).reshape(nb, block, N)))
    acc = relax.op.matmul(x3, w3, out_dtype="int32")
    s3 = (np.float32(sx) * scale).astype(np.float32).reshape(nb, 1, N)
    y = relax.op.sum(relax.op.multiply(relax.op.astype(acc, "float32"), relax.const(tvm.runtime.tensor(s3))), axis=[0])
    if zx:    # sum_b s'[b] (x_b - zx) . w_b = sum_b s'[b] x_b . w_b - zx sum_b s'[b] colsum_b(w): a constant
        s64 = np.float64(np.float32(sx)) * scale.astype(np.float64)
        corr = -zx * np.einsum("bn,bn->n", s64, w.reshape(nb, block, N).sum(axis=1).astype(np.float64))
        y = relax.op.add(y, relax.const(tvm.runtime.tensor(corr.astype(np.float32))))
    out = tuple(P.shape_of(core))
    if out != (rows, N):
        y = relax.op.reshape(y, out)
    why = f"{P.dtype_of(xq)} activations{f' (zero point {zx}: a per-column float term)' if zx else ''} x {P.dtype_of(m[names['wq']])} weights, block-wise scales (block {block} along K)"
    info = _LOWBIT_CONTEXT
    tname = info.weights.get(lowbit_fingerprint_of(w)) if info is not None and info.weights else None
    if tname is not None:
        why = why.replace(f" x {P.dtype_of(m[names['wq']])} weights", f" x {tname} weights", 1)
        _remember_lowbit(w, LOWBIT_BITS[tname])
    return y, why + " -> float32 per-block sums"


def lowbit_fingerprint_of(w):
    from .onnx_quant import lowbit_fingerprint
    return lowbit_fingerprint(w)


def rewrite_blockwise_matmuls(func, decisions):
    """Rewrite the import's block-wise matmuls (see the section comment); appends a decision each."""
    from tvm.relax import dpl
    root, names = _blockwise_patterns()

    def rewrite(call, m):
        return _decided(decisions, m[names["core"]], call, lambda: _blockwise_one(m, names))
    before = len(decisions)
    func = dpl.rewrite_call(root, rewrite, func)
    if any(d.accepted for d in decisions[before:]):        # the import's notes predate this rewrite
        for d in decisions[:before]:
            if d.op == "DequantizeLinear" and "block-wise scales" in d.reason and BLOCKWISE_NOTE not in d.reason:
                d.reason += BLOCKWISE_NOTE
    return func


#: appended to the import's block-wise notes once a block-wise matmul was rewritten (the import
#: cannot tell which consumer is which)
BLOCKWISE_NOTE = ("; except where a matmul with 8-bit activations consumes it: that matmul runs per block "
                  "(see its relax.matmul decision)")


def _make_blockwise_pattern():
    from tvm.relax import dpl
    x = dpl.wildcard()
    x3 = dpl.is_op("relax.permute_dims")(dpl.is_op("relax.reshape")(x, dpl.wildcard()))
    w3 = dpl.is_const()
    mm = dpl.is_op("relax.matmul")(dpl.is_op("relax.astype")(x3), w3)
    s3 = dpl.is_const()
    root = dpl.is_op("relax.sum")(dpl.is_op("relax.multiply")(dpl.is_op("relax.astype")(mm), s3))
    return root, {"x": x, "x3": x3, "w3": w3, "s3": s3, "core": mm, "root": root}


def build_blockwise_matmul(ann):
    """The region spec of a rewritten block-wise matmul: ``matmul`` with ``k_block`` (and
    ``weight_bits`` for a 4 / 2-bit weight), the weight [K, N] and ``block_scale`` [K / B, N]."""
    from tvm_qpu.codegen.kernels.gemm import BLOCK_SCALE
    x, x3, root = ann["x"], ann["x3"], ann["root"]
    w3 = P.const_value(ann["w3"])
    s3 = P.const_value(ann["s3"])
    if w3.ndim != 3 or s3.shape != (w3.shape[0], 1, w3.shape[2]) or P._ints(P._attr(x3, "axes")) != (1, 0, 2):
        raise P.Refused("not the block-wise matmul form")
    nb, block, N = w3.shape
    K = nb * block
    x_dt = P.dtype_of(x)
    if x_dt not in ("int8", "uint8", "int16"):
        raise P.Refused(f"block-wise matmul activations {x_dt}")
    rows = int(np.prod(P.shape_of(x), dtype=np.int64)) // K
    w = w3.reshape(K, N)
    bits = _LOWBIT_WEIGHTS.get(lowbit_fingerprint_of(w))
    storage = "int8"
    attrs = {"k_block": int(block), "bias": False, "activation": None, "transpose_b": False}
    if bits is not None:
        storage, _ = lowbit_storage(w, bits)
        if storage is None:
            raise P.Refused("weights beyond their low-bit range")
        attrs["weight_bits"] = int(bits)
    else:
        w_ok = w.min() >= -128 and w.max() <= 127
        if not w_ok:
            raise P.Refused("block-wise weights beyond int8")
    spec = P._spec("matmul", ["A", "B"], [((rows, K), x_dt), ((K, N), storage)], ((rows, N), "float32"), attrs)
    consts = {"B": w.astype(storage), BLOCK_SCALE: s3.reshape(nb, N)}
    runtime = [P.RuntimeInput("A", x, (("reshape", (rows, K)),))]
    out = tuple(P.shape_of(root))
    return P.Match(spec, consts, runtime, out_reshape=out if out != (rows, N) else None, anchor=ann["core"])

