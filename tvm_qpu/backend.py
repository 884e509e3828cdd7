"""The ``qpu`` target: one backend object owning patterns, checks, lowering and codegen.

This is UMA's shape rebuilt on Relax (TVM 0.27 has no UMA):

1. **canonicalise** (:func:`canonicalize`): bind parameters, fold constants and drop zero
   zero-point subtractions (``x - 0`` from MatMulInteger / QDQ imports), so integer matmuls expose
   ``astype(int8 -> int32)`` operands the patterns can fold;
2. **partition** (:meth:`QpuBackend.partition`): ``FuseOpsByPattern`` over the pattern table
   (:mod:`tvm_qpu.patterns`); each row's check function builds the :class:`OpSpec`, asks
   ``registry.supports`` and then :func:`tvm_qpu.placement.decide`; every decision is recorded in a
   :class:`PartitionReport`;
3. **lower** (:meth:`QpuBackend.lower`): composite function -> the same spec builder ->
   ``registry.generate`` -> :class:`KernelPlan`;
4. **codegen** (:meth:`QpuBackend.codegen`): each ``Codegen="qpu"`` call in ``main`` becomes
   ``call_dps_packed("tvm_qpu.run_plan", [key, *inputs], out_ty)`` (plus host-side layout ops the
   spec asks for), and the plans are returned keyed by a content hash for the artifact.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

import numpy as np

from . import patterns as P
from . import placement as PL
from .executor import RUN_PLAN, RegionInfo

CODEGEN = "qpu"


class QpuError(Exception):
    """A user-facing error of the qpu backend (bad input, unusable model, missing tool)."""


class QpuWarning(UserWarning):
    """A user-facing warning of the qpu backend (e.g. ``placement="all"`` offloaded nothing)."""


# ---------------------------------------------------------------------------------------------
# registry access

class _Registry:
    """Thin wrapper over tvm_qpu.codegen.registry (or a test's stand-in module). Errors pass
    through: a broken or missing kernel package fails loudly instead of meaning "no kernels"."""

    def __init__(self, module=None):
        if module is None:
            from tvm_qpu.codegen import registry as module
        self.m = module

    def supports(self, spec):
        return self.m.supports(spec)

    def generate(self, spec, constants):
        return self.m.generate(spec, constants)

    def estimate(self, spec):
        return self.m.estimate(spec)


# ---------------------------------------------------------------------------------------------
# reports

@dataclass
class Candidate:
    """One check-function call: a pattern row matched at an anchor op, and what was decided."""
    pattern: str
    kind: str
    anchor: str                      # bound variable of the anchor op in main (e.g. "lv16")
    anchor_op: str
    root: str                        # bound variable of the match's output
    vars: list                       # variables the match covers
    spec: str = ""
    accepted: bool = False
    reason: str = ""
    cpu_s: float | None = None
    qpu_s: float | None = None

    def as_dict(self):
        return dict(self.__dict__)


@dataclass
class PartitionReport:
    placement: str
    candidates: list = field(default_factory=list)
    regions: list = field(default_factory=list)      # dicts: name, kind, spec, anchor, reason, cpu_s, qpu_s
    cpu_ops: list = field(default_factory=list)      # dicts: var, op, reason
    warnings: list = field(default_factory=list)     # messages for the user (also issued as QpuWarning)
    qdq: list = field(default_factory=list)          # dicts: var, op, accepted, reason (tvm_qpu.quant)
    #: modelled whole-model latency sync vs overlap, and the split plan (tvm_qpu.coexec)
    schedule: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"placement": self.placement, "regions": self.regions, "cpu_ops": self.cpu_ops,
                "candidates": [c.as_dict() for c in self.candidates], "warnings": self.warnings,
                "qdq": self.qdq, "schedule": self.schedule}

    def to_json(self) -> str:
        return json.dumps(self.as_dict())

    @staticmethod
    def from_json(s: str) -> "PartitionReport":
        d = json.loads(s)
        r = PartitionReport(d["placement"], [Candidate(**c) for c in d.get("candidates", [])],
                            d.get("regions", []), d.get("cpu_ops", []), d.get("warnings", []), d.get("qdq", []),
                            d.get("schedule", {}))
        return r

    def text(self) -> str:
        out = [f"WARNING: {w}" for w in self.warnings]
        out += [f"placement: {self.placement}",
                f"QPU regions: {len(self.regions)}"]
        for i, r in enumerate(self.regions):
            out.append(f"  [{i}] {r['name']:26s} {r['spec']}")
            out.append(f"       why: {r['reason']}")
        if self.qdq:
            out.append(f"QDQ chains: {sum(q['accepted'] for q in self.qdq)} of {len(self.qdq)} integer")
            for q in self.qdq:
                out.append(f"  {q['var']:24s} {'integer' if q['accepted'] else 'float  '} {q['reason']}")
        out.append(f"CPU ops: {len(self.cpu_ops)}")
        for c in self.cpu_ops:
            out.append(f"  {c['var']:8s} {c['op']:24s} {c['reason']}")
        from .coexec import text as schedule_text
        out += schedule_text(self.schedule)
        return "\n".join(out)


def _us(s):
    return "-" if s is None else f"{s * 1e6:.1f}us"


# ---------------------------------------------------------------------------------------------
# canonicalisation

def _zero_const(e) -> bool:
    """e is a constant (or astype of a constant) whose values are all zero."""
    if P.op_name(e) == "relax.astype":
        e = e.args[0]
    return P.is_constant(e) and not np.any(P.const_value(e))


def _drop_zero_subtract(func):
    from tvm.relax import dpl
    x, zp = dpl.wildcard(), dpl.wildcard()
    pat = dpl.is_op("relax.subtract")(x, zp)

    def rewrite(call, m):
        xe, ze = m[x], m[zp]
        try:
            same = P.shape_of(xe) == P.shape_of(call) and P.dtype_of(xe) == P.dtype_of(call)
        except P.Refused:
            return call
        return xe if same and _zero_const(ze) else call

    return dpl.rewrite_call(pat, rewrite, func)


_SAME_VALUES = ("relax.expand_dims", "relax.reshape", "relax.permute_dims", "relax.squeeze",
                "relax.broadcast_to", "relax.flatten")


def _int_range(e, var2val, depth=0):
    """(lo, hi) bounds of an integer expression's values from how main computes it, or None."""
    from tvm import relax
    if depth > 32:
        return None
    if isinstance(e, relax.Var):
        v = var2val.get(e)
        return None if v is None else _int_range(v, var2val, depth + 1)
    if P.is_constant(e):
        a = P.const_value(e)
        return (int(a.min()), int(a.max())) if a.dtype.kind in "iu" and a.size else None
    name = P.op_name(e)
    if name == "relax.astype":
        src, dst = P.dtype_of(e.args[0]), P.dtype_of(e)
        if not (src.startswith(("int", "uint")) and dst.startswith(("int", "uint"))):
            return None
        r = _int_range(e.args[0], var2val, depth + 1)
        if r is None:
            info = np.iinfo(src)
            r = (int(info.min), int(info.max))
        info = np.iinfo(dst)
        return r if info.min <= r[0] and r[1] <= info.max else None   # a wrapping cast: unknown
    if name in _SAME_VALUES:
        return _int_range(e.args[0], var2val, depth + 1)
    if name in ("relax.add", "relax.subtract"):
        a, b = (_int_range(x, var2val, depth + 1) for x in e.args[:2])
        if a is None or b is None:
            return None
        lo, hi = (a[0] + b[0], a[1] + b[1]) if name == "relax.add" else (a[0] - b[1], a[1] - b[0])
        info = np.iinfo(P.dtype_of(e))
        return (lo, hi) if info.min <= lo and hi <= info.max else None      # may wrap: unknown
    return None


def _narrow_bounded_int_operands(func):
    """int32 matmul / conv2d operands whose values provably fit int8 / uint8 / int16 (MatMulInteger's
    ``astype(x) - astype(zero_point)``) become ``astype(astype(v, int16), int32)``: the cast form the
    qpu patterns fold, so the QPU multiplies them exactly (its integer multiply takes 24 bits; a
    plain int32 operand is refused). The CPU computes ``v`` as before and casts it losslessly. The
    new bindings are named ``<op var>_<a|b>_<dtype>`` (report rows are keyed by variable name)."""
    from tvm import relax
    var2val = relax.analysis.get_var2val(func)

    def narrow_dtype(e):
        try:
            if P.dtype_of(e) != "int32" or P.is_constant(e):
                return None
        except AttributeError:
            return None
        v = var2val.get(e) if isinstance(e, relax.Var) else e
        if v is not None and P.op_name(v) == "relax.astype" and P.dtype_of(v.args[0]) in P.INT_NARROW:
            return None                                  # already the cast form
        r = _int_range(e, var2val)
        for dt in P.CONST_NARROW:                        # int8, uint8 (int8 + 128), int16
            info = np.iinfo(dt)
            if r is not None and info.min <= r[0] and r[1] <= info.max:
                return dt
        return None

    @relax.expr_functor.mutator
    class _Narrow(relax.PyExprMutator):
        def visit_var_binding_(self, binding):
            val = binding.value
            if not (isinstance(val, relax.Call) and P.op_name(val) in ("relax.matmul", "relax.nn.conv2d")):
                return super().visit_var_binding_(binding)
            dts = [narrow_dtype(a) for a in val.args[:2]]
            if not any(dts):
                return super().visit_var_binding_(binding)
            args = [self.visit_expr(a) for a in val.args]
            for i, dt in enumerate(dts):
                if dt:
                    nm = f"{binding.var.name}_{'ab'[i]}_{dt}"
                    n = self.builder_.emit(relax.op.astype(args[i], dt), name_hint=nm)
                    args[i] = self.builder_.emit(relax.op.astype(n, "int32"), name_hint=nm + "_i32")
            new = relax.Call(val.op, args, val.attrs, val.ty_args)
            self.builder_.emit_normalized(relax.VarBinding(binding.var, self.builder_.normalize(new)))

    return _Narrow().visit_expr(func)


# TIR max/min node -> the Relax op with the same meaning (elementwise, both operands' NaN rules
# alike: TIR ``Max``/``Min`` and Relax ``maximum``/``minimum`` legalise to the same TOPI ops).
_TIR_BOUND_OPS = {"Max": "maximum", "Min": "minimum"}


def _single_store(stmt, depth=0):
    """The one BufferStore of a TE-generated elementwise PrimFunc body (block realize / block /
    loop nest around a single store), or None for any other structure."""
    import tvm
    if depth > 64:
        return None
    if isinstance(stmt, tvm.tirx.BufferStore):
        return stmt
    name = type(stmt).__name__
    if name == "SBlockRealize":
        return _single_store(stmt.block, depth + 1)
    if name == "SBlock":
        if getattr(stmt, "init", None) is not None or list(getattr(stmt, "alloc_buffers", [])):
            return None
        return _single_store(stmt.body, depth + 1)
    if name == "For":
        return _single_store(stmt.body, depth + 1)
    return None


def _tir_bound_call(call, mod):
    """``(relax op name, x, bound)`` when ``call`` is ``call_tir`` of an elementwise ``max(x, c)`` /
    ``min(x, c)`` PrimFunc with a scalar constant bound ``c`` (baked into the PrimFunc or passed as
    a 0-d constant), else None. TVM 0.27's ONNX importer emits ReLU6 / Clip this way (``emit_te``
    of ``topi.maximum`` then ``topi.minimum``, both opset-6 attributes and opset >= 11 inputs)."""
    import tvm
    from tvm import relax
    if P.op_name(call) != "relax.call_tir" or len(call.args) < 2 or not isinstance(call.args[0], relax.GlobalVar):
        return None
    func = mod.functions.get(call.args[0]) if call.args[0] in mod.functions else None
    if not isinstance(func, tvm.tirx.PrimFunc) or not isinstance(call.args[1], relax.Tuple):
        return None
    args = list(call.args[1].fields)
    if not args or len(args) + 1 != len(func.params) or len(args) > 2:
        return None
    bufs = list(func.params)                 # TVM 0.27 (tirx): a PrimFunc parameter is its buffer
    store = _single_store(func.body)
    if store is None or not store.buffer.same_as(bufs[-1]):
        return None
    value = store.value
    op = _TIR_BOUND_OPS.get(type(value).__name__)
    if op is None:
        return None
    load, bound = value.a, value.b
    if not isinstance(load, tvm.ir.TensorLoad):
        load, bound = bound, load
    if not (isinstance(load, tvm.ir.TensorLoad) and load.source.same_as(bufs[0])
            and len(load.indices) == len(store.indices)
            and all(a.same_as(b) for a, b in zip(load.indices, store.indices))):
        return None
    x = args[0]
    try:
        if P.shape_of(x) != P.shape_of(call) or P.dtype_of(x) != P.dtype_of(call):
            return None
    except (P.Refused, AttributeError):
        return None
    dtype = P.dtype_of(x)
    if isinstance(bound, (tvm.tirx.FloatImm, tvm.tirx.IntImm)) and len(args) == 1:
        c = np.array(bound.value, dtype=dtype)
    elif (isinstance(bound, tvm.ir.TensorLoad) and len(args) == 2 and bound.source.same_as(bufs[1])
          and len(bound.indices) == 0 and P.is_constant(args[1]) and P.const_value(args[1]).size == 1):
        c = P.const_value(args[1]).reshape(()).astype(dtype)
    else:
        return None
    return op, x, c


def _tir_bounds_to_relax(func, mod):
    """Rewrite the importer's ``call_tir(maximum/minimum, x, c)`` into ``relax.maximum(x, c)`` /
    ``relax.minimum(x, c)`` so the conv / matmul epilogue patterns see (and fuse) ReLU6 / Clip."""
    from tvm import relax

    @relax.expr_functor.mutator
    class _Bounds(relax.PyExprMutator):
        def visit_call_(self, call):
            call = self.visit_expr_post_order(call)
            hit = _tir_bound_call(call, mod)
            if hit is None:
                return call
            op, x, c = hit
            import tvm
            return getattr(relax.op, op)(x, relax.const(tvm.runtime.tensor(c)))

    return _Bounds(mod).visit_expr(func)


def canonicalize(mod, params=None, qdq_decisions=None):
    """Bind ``params`` (name -> array) into main, rewrite QDQ chains to integer ops
    (:func:`tvm_qpu.quant.rewrite_qdq`, before folding turns their weights into float; its
    decisions are appended to ``qdq_decisions``), fold constants, drop ``x - 0``, turn the
    importer's TIR max/min calls with constant bounds (Clip / ReLU6) into Relax ops."""
    import tvm
    from tvm import relax
    from .quant import rewrite_qdq, rewrite_requant
    if params:
        mod = relax.transform.BindParams("main", {k: (v if hasattr(v, "numpy") else tvm.runtime.tensor(np.asarray(v)))
                                                  for k, v in params.items()})(mod)
    gv = mod.get_global_var("main")
    main, decisions = rewrite_qdq(mod["main"])
    mod[gv] = main
    if qdq_decisions is not None:
        qdq_decisions.extend(decisions)
    mod = relax.transform.FoldConstant()(mod)
    for gv, f in list(mod.functions.items()):
        if isinstance(f, relax.Function):
            f = _tir_bounds_to_relax(f, mod)
            mod[gv] = _drop_zero_subtract(f)
    gv = mod.get_global_var("main")
    main, decisions = rewrite_requant(mod["main"])        # needs the Clip / ReLU6 bounds as Relax ops
    mod[gv] = main
    if qdq_decisions is not None:
        qdq_decisions.extend(decisions)
    mod = relax.transform.FoldConstant()(mod)
    mod = relax.transform.DeadCodeElimination()(mod) if hasattr(relax.transform, "DeadCodeElimination") else mod
    return mod


# ---------------------------------------------------------------------------------------------
# the backend

def _leaks(ctx) -> str | None:
    """Name of an intermediate variable of the match used outside it, if any."""
    from tvm import relax
    root_var = ctx.value_to_bound_var.get(ctx.matched_expr)
    inside = set(v.name for v in ctx.matched_bindings.keys())
    for v in ctx.matched_bindings.keys():
        if root_var is not None and v.same_as(root_var):
            continue
        if not isinstance(v, relax.DataflowVar):
            return v.name
        for u in ctx.var_usages.get(v, []):
            if u.name not in inside:
                return v.name
    return None


@dataclass
class Region:
    """One offloaded region after lowering."""
    key: str
    name: str
    match: object                    # patterns.Match
    plan: object                     # KernelPlan
    info: RegionInfo


class QpuBackend:
    """The ``qpu`` target (see module docstring)."""

    target = "qpu"

    def __init__(self, placement: str = "cost", table=None, registry=None, split: bool = False):
        if placement not in PL.PLACEMENTS:
            raise QpuError(f"placement must be one of {', '.join(PL.PLACEMENTS)}, got {placement!r}")
        if split and placement != "cost":
            raise QpuError(f"split=True plans CPU / QPU / split per op by cost: it needs placement='cost', "
                           f"got {placement!r}")
        self.placement = placement
        self.split = bool(split)
        #: anchor var name -> ("qpu" | "cpu", reason): choices of the whole-model plan (tvm_qpu.coexec)
        #: that override the per-op cost decision
        self.pins: dict = {}
        self.table = list(P.PATTERN_TABLE if table is None else table)
        self.registry = _Registry(registry)

    # -- patterns and checks ---------------------------------------------------------------------
    def fusion_patterns(self, report: PartitionReport) -> list:
        from tvm.relax.transform import FusionPattern
        pats = []
        for e in self.table:
            root, ann = e.make()
            pats.append(FusionPattern(e.name, root, ann, self._checker(e, report)))
        return pats

    def evaluate(self, entry, annotated, pin=None) -> tuple:
        """(Match or None, accepted, reason, Decision or None) for one match. ``pin``: a
        ("qpu" | "cpu", reason) choice of the whole-model plan for its anchor (``self.pins``)."""
        try:
            m = entry.build(annotated)
        except P.Refused as e:
            return None, False, f"refused by pattern check: {e}", None
        m, ok, why = self.choose_form(m)
        if not ok:
            return m, False, f"no kernel takes it: {why}", None
        if pin is not None:
            return (m,) + _pinned(pin, m, self.registry)
        d = PL.decide(m.spec, self.placement, m.constants, self.registry)
        return m, d.on_qpu, d.reason, d

    def choose_form(self, m) -> tuple:
        """(Match, supported, reason): ``m`` if a kernel takes it, else its first supported
        alternative form (e.g. a strided conv as a conv over the space-to-depth of its input);
        the reason is the first form's. Partitioning and lowering both choose through here."""
        ok, why = self.registry.supports(m.spec)
        if ok:
            return m, True, why
        for alt in m.alternatives:
            if self.registry.supports(alt.spec)[0]:
                return alt, True, "ok"
        return m, False, why

    def _checker(self, entry, report):
        def check(ctx) -> bool:
            ann = dict(ctx.annotated_expr)
            anchor = ann.get("core", ctx.matched_expr)
            v = ctx.value_to_bound_var.get(anchor)
            rv = ctx.value_to_bound_var.get(ctx.matched_expr)
            cand = Candidate(entry.name, entry.kind, v.name if v is not None else "?", P.op_name(anchor) or "?",
                             rv.name if rv is not None else "?", sorted(x.name for x in ctx.matched_bindings.keys()))
            report.candidates.append(cand)
            leak = _leaks(ctx)
            if leak is not None:
                cand.reason = f"intermediate {leak} is used outside the pattern"
                return False
            try:
                m, ok, reason, d = self.evaluate(entry, ann, self.pins.get(cand.anchor))
            except Exception as e:  # never crash partitioning: keep the op on the CPU
                cand.reason = f"check failed ({type(e).__name__}: {e})"
                return False
            if m is not None:
                cand.spec = m.spec.describe()
            cand.accepted, cand.reason = ok, reason
            if d is not None:
                cand.cpu_s, cand.qpu_s = d.cpu_s, d.qpu_s
            return ok
        return check

    # -- partition -------------------------------------------------------------------------------
    def partition(self, mod, params=None):
        """Canonicalise and partition ``mod``. Returns (module, PartitionReport)."""
        from tvm import relax
        decisions = []
        mod = canonicalize(mod, params, decisions)
        report = PartitionReport(self.placement, qdq=[d.as_dict() for d in decisions])
        if self.placement != "none":
            gv = mod.get_global_var("main")
            mod[gv] = _narrow_bounded_int_operands(mod["main"])
            if self.split:
                try:
                    mod = self._plan_and_split(mod, report)
                except Exception as e:  # the plan is an optimisation: say so and place per op
                    self.pins.clear()
                    msg = (f"whole-model split planning failed ({type(e).__name__}: {e}); placed per op "
                           f"(placement=cost) instead")
                    report.warnings.append(msg)
                    import warnings
                    warnings.warn(msg, QpuWarning, stacklevel=3)
            mod = relax.transform.FuseOpsByPattern(self.fusion_patterns(report), bind_constants=True,
                                                   annotate_codegen=True)(mod)
        self._summarise(mod, report)
        _model_latency(mod, report)
        _warn_if_nothing_offloaded(report)
        return mod, report

    def _plan_and_split(self, mod, report):
        """The whole-model plan (:func:`tvm_qpu.coexec.plan`): split the sites it splits
        (:func:`tvm_qpu.split.apply_splits`) and pin every site's choice for the partitioner."""
        from tvm import relax
        from . import coexec, split as SP
        gv = mod.get_global_var("main")
        sites, _ = SP.find_sites(mod["main"], self)
        p = coexec.plan(mod["main"], self, sites)
        report.schedule["plan"] = p.summary()
        by_name = {s.name: s for s in sites}
        for name, how in p.choice.items():
            if how not in ("split", p.options[name].per_op()):        # the plan overrides the per-op choice
                why = (f"whole-model plan: {how} (per-op choice {p.options[name].per_op()})")
                self.pins[by_name[name].core.name] = (how, why)
        splits = p.splits()
        if splits:
            new, pins = SP.apply_splits(mod["main"], by_name, splits)
            self.pins.update(pins)
            mod[gv] = new
            mod = relax.transform.DeadCodeElimination()(mod)
        return mod

    def _summarise(self, mod, report):
        from tvm import relax
        main = mod["main"]
        v2v = relax.analysis.get_var2val(main)
        by_var, used = {}, set()
        for c in report.candidates:
            for v in c.vars:
                by_var.setdefault(v, []).append(c)
        for var, val in v2v.items():
            if not isinstance(val, relax.Call):
                continue
            op = val.op
            if isinstance(op, relax.GlobalVar):
                f = mod[op]
                if f.attrs is not None and f.attrs.get("Codegen") == CODEGEN:
                    comp, _ = _composite_of(f)
                    name = str(comp.attrs["Composite"])
                    try:
                        m, _, _ = self.choose_form(P.match_function(P.entry(name), comp))
                        spec = m.spec.describe()
                    except Exception as e:  # pragma: no cover - reported, not fatal
                        spec = f"(spec unavailable: {e})"
                    cand = _accepted_candidate(report, name, spec, used)
                    report.regions.append(dict(var=var.name, name=name, kind=P.entry(name).kind, spec=spec,
                                               reason=cand.reason if cand else "", cpu_s=cand.cpu_s if cand else None,
                                               qpu_s=cand.qpu_s if cand else None))
                continue
            opname = getattr(op, "name", str(op))
            tried = by_var.get(var.name, [])
            if self.placement == "none":
                reason = "placement=none keeps every op on the CPU"
            elif tried:
                groups = {}                       # reason -> patterns that gave it
                for c in tried:
                    groups.setdefault(c.reason, [])
                    if c.pattern not in groups[c.reason]:
                        groups[c.reason].append(c.pattern)
                reason = "; ".join(f"{', '.join(ps)}: {r}" for r, ps in groups.items())
            else:
                reason = "no QPU pattern for this op"
            report.cpu_ops.append(dict(var=var.name, op=opname, reason=reason))

    # -- lowering and codegen ----------------------------------------------------------------------
    def lower(self, composite):
        """Composite function -> (Match, KernelPlan)."""
        name = str(composite.attrs["Composite"])
        m, _, _ = self.choose_form(P.match_function(P.entry(name), composite))
        plan = self.registry.generate(m.spec, dict(m.constants))
        return m, plan

    def codegen(self, mod):
        """Rewrite every qpu region of ``mod`` into a ``tvm_qpu.run_plan`` call.

        Returns (module without Codegen functions, [Region])."""
        from tvm import relax
        regions = []
        backend = self

        def lower_call(bb, outer, args):
            comp, arg_map = _composite_of(outer)
            m, plan = backend.lower(comp)
            key = plan_key(plan)
            params = list(comp.params)
            cpu = PL.cpu_seconds(m.spec)
            try:
                qpu = float(backend.registry.estimate(m.spec)) + PL.qpu_overhead_seconds(
                    m.spec, m.constants, len(plan.launches))
            except Exception:
                qpu = None
            info = RegionInfo(key, str(comp.attrs["Composite"]), m.spec.kind, m.spec.describe(),
                              [ri.name for ri in m.runtime], cpu, qpu)
            regions.append(Region(key, info.name, m, plan, info))
            call_args = [_string_imm(key)]
            for ri in m.runtime:
                idx = _param_index(params, ri.expr)
                x = args[arg_map[idx]]
                for step in ri.transform:
                    x = bb.emit(_transform_step(x, step))
                call_args.append(x)
            shape, dtype = m.spec.output
            out = relax.call_dps_packed(RUN_PLAN, call_args, out_ty=relax.TensorType(list(shape), dtype))
            steps = ((("reshape", m.out_reshape),) if m.out_reshape is not None else ()) + tuple(m.out_transform)
            for step in steps:
                out = _transform_step(bb.emit(out), step)
            return out

        rewriter = _make_rewriter(mod, lower_call)
        gv = mod.get_global_var("main")
        new_main = rewriter.visit_expr(mod["main"])
        import tvm
        funcs = {g: f for g, f in mod.functions.items()
                 if not (f.attrs is not None and f.attrs.get("Codegen") == CODEGEN)}
        funcs[gv] = new_main
        return tvm.IRModule(funcs, attrs=mod.attrs), regions


def _pinned(pin, m, registry) -> tuple:
    """(accepted, reason, Decision) of a match whose anchor the whole-model plan pinned: "cpu"
    refuses it (with its CPU estimate for the report); "qpu" offloads it unless it cannot run on
    the QPU at all (as under placement="all": no estimate, or over one dispatch's budget)."""
    how, why = pin
    if how == "cpu":
        return False, why, PL.Decision(False, why, PL.cpu_seconds(m.spec), None)
    d = PL.decide(m.spec, "all", m.constants, registry)
    return d.on_qpu, (why if d.on_qpu else d.reason), d


def _model_latency(mod, report: PartitionReport):
    """Record the modelled whole-model latency sync vs overlap in the report (never fails
    partitioning: an error is recorded instead)."""
    from . import coexec
    try:
        report.schedule["model"] = coexec.summarize(mod, report)
    except Exception as e:  # pragma: no cover - reported, not fatal
        report.schedule["error"] = f"{type(e).__name__}: {e}"


def _warn_if_nothing_offloaded(report: PartitionReport, max_reasons: int = 3):
    """``placement="all"`` asks for every supported op on the QPU: if none is, say why (in the
    report and as a :class:`QpuWarning`, which tvmc prints), instead of silently building a
    CPU-only module."""
    if report.placement != "all" or report.regions:
        return
    reasons = []
    for c in report.candidates:
        if not c.accepted and c.reason and c.reason not in reasons:
            reasons.append(c.reason)
    if not report.candidates:
        why = "no op matched a QPU pattern"
    else:
        why = (f"{len(report.candidates)} candidate(s) were refused: " + "; ".join(reasons[:max_reasons])
               + (f"; ... ({len(reasons) - max_reasons} more reasons)" if len(reasons) > max_reasons else ""))
    msg = f"placement=all offloaded nothing to the QPU ({why}); the model runs on the CPU only"
    report.warnings.append(msg)
    import warnings
    warnings.warn(msg, QpuWarning, stacklevel=3)


def _transform_step(x, step):
    """One host-side layout step (``("permute", axes)`` / ``("reshape", shape)``) as a Relax op."""
    from tvm import relax
    if step[0] == "permute":
        return relax.op.permute_dims(x, list(step[1]))
    if step[0] == "reshape":
        return relax.op.reshape(x, list(step[1]))
    raise QpuError(f"unknown layout transform {step!r}")


def _string_imm(s):
    import tvm
    return tvm.ir.StringImm(s)


def _param_index(params, expr) -> int:
    for i, p in enumerate(params):
        if p.same_as(expr):
            return i
    raise QpuError(f"run-time input {expr} is not a parameter of its composite function")


def _composite_of(outer):
    """The composite function inside a Codegen function, and {composite param index: outer arg index}."""
    from tvm import relax
    comp, call = None, None
    locals_ = {}
    for block in outer.body.blocks:
        for b in block.bindings:
            if isinstance(b.value, relax.Function) and b.value.attrs is not None and "Composite" in b.value.attrs:
                comp = b.value
                locals_[b.var.name] = b.value
            elif isinstance(b.value, relax.Call):
                call = b.value
    if comp is None:
        body = outer.body.body
        raise QpuError(f"codegen function without a composite: {body}")
    outer_params = list(outer.params)
    arg_map = {}
    if call is not None and len(call.args) == len(comp.params):
        for i, a in enumerate(call.args):
            arg_map[i] = _param_index(outer_params, a)
    else:
        arg_map = {i: i for i in range(len(comp.params))}
    return comp, arg_map


def _accepted_candidate(report, name, spec, used):
    """The accepted check record of a region (same pattern and spec, first not yet claimed)."""
    for i, c in enumerate(report.candidates):
        if i not in used and c.pattern == name and c.accepted and c.spec == spec:
            used.add(i)
            return c
    return None


def _make_rewriter(mod, lower_call):
    from tvm import relax

    @relax.expr_functor.mutator
    class _QpuCallRewriter(relax.PyExprMutator):
        def __init__(self, mod_):
            super().__init__(mod_)
            self.mod_ = mod_

        def visit_call_(self, call):
            call = self.visit_expr_post_order(call)
            if isinstance(call.op, relax.GlobalVar):
                f = self.mod_[call.op]
                if f.attrs is not None and f.attrs.get("Codegen") == CODEGEN:
                    return lower_call(self.builder_, f, list(call.args))
            return call

    return _QpuCallRewriter(mod)


def plan_key(plan) -> str:
    """Content hash of a plan (structure + constants): identical plans share one key."""
    h = hashlib.sha256(json.dumps(plan.to_json(), sort_keys=True).encode())
    for name in sorted(plan.constants):
        a = np.ascontiguousarray(plan.constants[name])
        h.update(name.encode())
        h.update(str(a.dtype).encode() + str(a.shape).encode())
        h.update(a.tobytes())
    return h.hexdigest()[:20]
