"""Index-range checks for model inputs that feed gather / scatter indices.

TVM compiles ONNX ``Gather`` to ``relax.take(..., mode="fast")``, which reads memory at whatever
index it is given (TOPI warns: "Fast mode segfaults when there are out-of-bounds indices"); the
element and N-d gathers and scatters do not check their indices either. An out-of-range index
in a model input therefore crashes the process (SIGSEGV, ``tvmc run`` exits 139) or silently reads
other memory, where ONNX Runtime reports an error.

tvm-qpu checks such inputs before the VM runs:

* at build time, :func:`index_checks` walks the host function ``main`` and, for every index
  operand of an op in :data:`INDEX_OPS` that comes from a model input (directly, or through
  casts/reshapes and the ONNX importer's negative-index normalisation ``where(i < 0, i + n, i)``),
  records the input, the op and the valid range; the list goes into the artifact's
  ``model.json`` as ``index_checks``;
* at run time, :func:`check_inputs` (called by ``Runner`` on every run) refuses an input with an
  index outside its range with :class:`IndexRangeError` naming the input, position, value and
  range.

Valid ranges follow the ONNX operators: ``-n .. n-1`` where the IR normalises negative indices
(the importer's ``where``), else ``0 .. n-1``. Indices computed inside the model (not taken from
an input) are not covered.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from .backend import QpuError


class IndexRangeError(QpuError):
    """A model input holds a gather/scatter index outside the indexed dimension."""


#: Relax op -> (ONNX-like name, position of the data operand, position of the indices operand,
#: attribute holding the axis or None, whether the last index dimension addresses several data
#: dimensions (N-d ops))
INDEX_OPS = {
    "relax.take": ("Gather", 0, 1, "axis", False),
    "relax.gather_elements": ("GatherElements", 0, 1, "axis", False),
    "relax.scatter_elements": ("ScatterElements", 0, 1, "axis", False),
    "relax.gather_nd": ("GatherND", 0, 1, "batch_dims", True),
    "relax.scatter_nd": ("ScatterND", 0, 1, None, True),
}
#: ops an index may pass through unchanged in value (only casts for N-d ops: their last axis matters)
VALUE_PRESERVING = ("relax.astype", "relax.reshape", "relax.expand_dims", "relax.squeeze",
                    "relax.flatten", "relax.permute_dims")
ND_PRESERVING = ("relax.astype",)
#: take modes that bound the index themselves (no check needed)
SAFE_TAKE_MODES = ("clip", "wrap")


@dataclass
class IndexCheck:
    input: str              # model input name
    op: str                 # ONNX-like op name
    sizes: list             # sizes of the indexed data dimensions (one, or one per last-axis entry)
    negative_ok: bool       # indices -n..-1 are valid (the IR normalises them)

    def describe(self) -> str:
        return f"{self.op} on {'dims' if len(self.sizes) > 1 else 'a dim'} of size {self.sizes}"


def _static_shape(expr):
    sinfo = getattr(expr, "struct_info", None) or getattr(expr, "ty", None)
    shape = getattr(sinfo, "shape", None)
    if shape is None or not hasattr(shape, "values"):
        data = getattr(expr, "data", None)             # a constant without struct info
        return [int(d) for d in data.shape] if hasattr(data, "shape") else None
    try:
        return [int(v) for v in shape.values]
    except TypeError:
        return None


def _op_name(call) -> str | None:
    op = getattr(call, "op", None)
    return str(op.name) if op is not None and hasattr(op, "name") else None


def _source_input(expr, bindings: dict, inputs: set, nd: bool):
    """(input name, negative_ok) if ``expr`` is a model input passed through value-preserving
    ops, else None."""
    from tvm import relax
    negative_ok = False
    passing = ND_PRESERVING if nd else VALUE_PRESERVING
    for _ in range(64):                         # bounded walk through the binding chain
        if isinstance(expr, relax.Var):
            if expr.name in inputs and expr not in bindings:
                return expr.name, negative_ok
            expr = bindings.get(expr)
            if expr is None:
                return None
            continue
        if not isinstance(expr, relax.Call):
            return None
        name = _op_name(expr)
        if name in passing:
            expr = expr.args[0]
        elif name == "relax.where" and _is_negative_normalisation(expr, bindings):
            negative_ok = True
            expr = expr.args[2]
        else:
            return None
    return None


def _is_negative_normalisation(call, bindings: dict) -> bool:
    """``where(less(i, 0), add(i, n), i)``: the ONNX importer's handling of negative indices."""
    from tvm import relax

    def value(e):
        return bindings.get(e, e) if isinstance(e, relax.Var) else e

    cond, then, other = (value(a) for a in call.args)
    return (isinstance(cond, relax.Call) and _op_name(cond) == "relax.less" and cond.args[0].same_as(call.args[2])
            and isinstance(then, relax.Call) and _op_name(then) == "relax.add"
            and then.args[0].same_as(call.args[2]))


def _sizes(call, data_shape, spec) -> list | None:
    name, _, idx_pos, axis_attr, nd = spec
    if not nd:
        axis = getattr(call.attrs, axis_attr, None) if axis_attr else None
        if axis is None:                         # take without an axis indexes the flattened data
            return [int(np.prod(data_shape))]
        axis = int(axis)
        return [data_shape[axis if axis >= 0 else axis + len(data_shape)]]
    idx_shape = _static_shape(call.args[idx_pos])
    if idx_shape is None or not idx_shape:
        return None
    batch = int(getattr(call.attrs, axis_attr, 0) or 0) if axis_attr else 0
    k = idx_shape[-1]
    if batch + k > len(data_shape):
        return None
    return data_shape[batch: batch + k]


def index_checks(mod) -> list:
    """The index checks for the model inputs of ``mod["main"]`` (a list of JSON-able dicts)."""
    from tvm import relax
    main = mod["main"]
    attrs = main.attrs
    n_in = int(attrs["num_input"]) if attrs is not None and "num_input" in attrs else len(main.params)
    inputs = {p.name for p in main.params[:n_in]}
    bindings, calls = {}, []
    body = main.body
    for block in getattr(body, "blocks", []):
        for b in block.bindings:
            if isinstance(b, relax.VarBinding):
                bindings[b.var] = b.value
                if isinstance(b.value, relax.Call) and _op_name(b.value) in INDEX_OPS:
                    calls.append(b.value)
    checks = []
    for call in calls:
        spec = INDEX_OPS[_op_name(call)]
        op, data_pos, idx_pos, _, nd = spec
        if op == "Gather" and str(getattr(call.attrs, "mode", "fast")) in SAFE_TAKE_MODES:
            continue
        source = _source_input(call.args[idx_pos], bindings, inputs, nd)
        data_shape = _static_shape(call.args[data_pos])
        if source is None or data_shape is None:
            continue
        sizes = _sizes(call, data_shape, spec)
        if sizes is None:
            continue
        check = asdict(IndexCheck(source[0], op, [int(s) for s in sizes], source[1]))
        if check not in checks:
            checks.append(check)
    return checks


def check_inputs(checks, inputs: dict) -> None:
    """Raise IndexRangeError if an input named by ``checks`` holds an out-of-range index."""
    for c in checks or ():
        a = inputs.get(c["input"])
        if a is None:
            continue
        a = np.asarray(a)
        if a.dtype.kind not in "iu" or a.size == 0:
            continue
        sizes = np.asarray(c["sizes"], dtype=np.int64)
        if len(sizes) > 1 and a.shape[-1:] != (len(sizes),):
            continue                             # the input's shape check reports this
        # N-d ops: entry k of the last axis indexes data dimension k; else one size for all
        hi = np.broadcast_to(sizes if len(sizes) > 1 else sizes[:1], a.shape)
        lo = -hi if c["negative_ok"] else np.zeros_like(hi)
        values = a.astype(np.int64)
        bad = (values < lo) | (values >= hi)
        if bad.any():
            pos = tuple(int(i) for i in np.argwhere(bad)[0])
            size = int(hi[pos])
            low = -size if c["negative_ok"] else 0
            raise IndexRangeError(
                f"input {c['input']!r} holds index {int(a[pos])} at position {list(pos)}, outside the "
                f"valid range {low}..{size - 1} of the {c['op']} it feeds (dimension of size {size}); "
                f"{int(bad.sum())} index value(s) are out of range. TVM's {c['op']} does not check its "
                "indices, so the model is not run.")
