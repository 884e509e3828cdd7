"""Split work: one large conv / matmul computed by the QPU and the CPU at the same time.

A Relax rewrite that runs after canonicalisation and before partitioning (``tvm_qpu.build(...,
split=True)``; the whole-model planner in :mod:`tvm_qpu.coexec` decides *which* ops to split).
A matched conv / matmul with its epilogue (bias, ReLU / ReLU6 / Clip), ``y = epi(op(x, W))``,
becomes ::

    y_q = epi(op(x, W[..., :n_q]))     # first in program order: a QPU region (pinned to the QPU)
    y_c = epi(op(x, W[..., n_q:]))     # the CPU part (pinned to the CPU: never offloaded)
    y   = concat([y_q, y_c], axis)

so that with asynchronous QPU regions the QPU part is submitted first, the CPU part runs while
the QPU works, and the wait lands at the ``concat``. How each op is cut is one row of
:data:`SPLIT_RULES`: output channels of a conv (rows of the weight), output columns of a matmul
with a constant B (columns of B), or rows of a matmul whose B is a run-time operand (rows of A,
sliced by the host). Per-channel epilogue constants (the bias) are sliced with the weight; scalar
ones (clip bounds) are shared; integer paths (``astype(int8 -> int32)`` operands) re-emit the
cast per part, so each part is the same pattern the partitioner offloads, and a requantize after
the int32 accumulator stays after the ``concat`` (one requantize for both parts).

The QPU share ``n_q`` follows the predicted speeds (:func:`choose_split`): the point where the
estimates of the two parts balance (:func:`tvm_qpu.placement.qpu_seconds` of the QPU part, with
its fixed launch / copy cost, against :func:`tvm_qpu.placement.cpu_seconds` of the CPU part;
without fixed costs it is the QPU's speed share ``cpu / (cpu + qpu)``), rounded to the kernels'
alignment (:data:`SPLIT_RULES`: whole 16-lane column tiles / 16-row tiles, the GEMM substrate's
tile, ``codegen/kernels/gemm.py``). Shapes that cannot split are reported with the reason
(:attr:`Site.why_not`, :func:`choose_split`).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from . import patterns as P
from . import placement as PL


@dataclass(frozen=True)
class SplitRule:
    """How one op kind is cut: output axis, which operand of the anchor op is sliced (and along
    which axis), the alignment of the QPU part, and what the cut units are called."""
    out_axis: int
    operand: int
    operand_axis: int
    align: int
    unit: str
    source: str


#: anchor op (+ operand form) -> its rule. The alignment is the GEMM substrate's output tile
#: (codegen/kernels/gemm.py: lanes run along N, a tile is R <= 16 rows x 16 columns; conv2d is an
#: implicit GEMM with one A row per output channel, codegen/kernels/conv.py): a QPU part of whole
#: tiles wastes no lanes or rows.
SPLIT_RULES = {
    "matmul_columns": SplitRule(-1, 1, -1, 16, "output columns",
                                "gemm.py: 16 lanes along N per tile (B columns)"),
    "matmul_rows": SplitRule(-2, 0, -2, 16, "rows",
                             "gemm.py: R = min(16, M) rows per tile (A rows; B is a run-time operand)"),
    "conv": SplitRule(1, 1, 0, 16, "output channels",
                      "conv.py: implicit GEMM, one A row per output channel, R <= 16 rows per tile"),
}

#: only these kinds are ever split (attention and the rest are whole regions)
SPLIT_KINDS = ("matmul", "conv2d")
#: operand-form ops the patterns fold into the anchor (re-emitted per part, so no part leaks them)
OPERAND_FORMS = ("relax.astype", "relax.permute_dims")
#: the keys of a match's wildcard operands (where the covered bindings of a match stop)
LEAF_KEYS = ("a", "b", "x", "w", "q", "k", "v", "mask")
#: tags of the two parts (suffix of their variables' names; pins are keyed by the anchor's name)
QPU_TAG, CPU_TAG = "split_qpu", "split_cpu"


@dataclass
class Site:
    """One maximal match of main that the partitioner would offload as one region."""
    entry: object                    # patterns.PatternEntry
    root: object                     # relax.Var of the match's output
    core: object                     # relax.Var of the anchor op
    chain: list                      # epilogue vars after the core, in order (root last)
    covered: list                    # every var of the match (program order)
    match: object                    # patterns.Match (the chosen form)
    rule_name: str | None = None
    why_not: str = ""                # why it cannot split ("" if it can)

    @property
    def name(self) -> str:
        return self.root.name

    @property
    def spec(self):
        return self.match.spec

    @property
    def channels(self) -> int:
        r = SPLIT_RULES[self.rule_name]
        shape = P.shape_of(self.root)
        return int(shape[r.out_axis % len(shape)])


@dataclass
class SplitChoice:
    """A chosen cut of one site: the QPU takes ``n_q`` of ``n`` units."""
    site: str
    n_q: int
    n: int
    unit: str
    balance_fraction: float          # where the affine part estimates balance (choose_split)
    speed_share: float               # cpu / (cpu + qpu) of the whole op: the QPU's share of the speed
    qpu_part_s: float
    cpu_part_s: float
    concat_s: float
    unsplit_cpu_s: float
    unsplit_qpu_s: float | None
    qpu_part_host_s: float = 0.0     # the part of qpu_part_s on the VM thread (placement.host_seconds)

    @property
    def fraction(self) -> float:
        return self.n_q / self.n

    def as_dict(self) -> dict:
        d = dict(self.__dict__)
        d["fraction"] = self.fraction
        return d


# ---------------------------------------------------------------------------------------------
# finding the matches the partitioner would make

def _var_leaves(e, out):
    """Relax Vars an expression reads (through call args, tuples, tuple items)."""
    from tvm import relax
    if isinstance(e, relax.Var):
        out.append(e)
    elif isinstance(e, relax.Call):
        for a in e.args:
            _var_leaves(a, out)
    elif isinstance(e, relax.Tuple):
        for f in e.fields:
            _var_leaves(f, out)
    elif isinstance(e, relax.TupleGetItem):
        _var_leaves(e.tuple_value, out)
    return out


def bindings(func) -> list:
    """The VarBindings of ``func``'s body, in program order."""
    from tvm import relax
    out = []
    for block in func.body.blocks:
        for b in block.bindings:
            if isinstance(b, relax.VarBinding):
                out.append(b)
    return out


def users(func) -> dict:
    """var -> list of binding vars reading it (the function's output counts as user "<output>")."""
    u: dict = {}
    for b in bindings(func):
        for v in _var_leaves(b.value, []):
            u.setdefault(v, []).append(b.var)
    for v in _var_leaves(func.body.body, []):
        u.setdefault(v, []).append("<output>")
    return u


def _covered(root_var, m, ann, var2val) -> list:
    """Vars of a match: from its root through the args whose bound values the pattern matched
    (``m``: pattern -> expr), never into its wildcard operands (which the matcher may report as
    the operand's bound value rather than its var)."""
    from tvm import relax
    leaves = [ann[k] for k in LEAF_KEYS if k in ann]
    inner = [e for e in m.values() if isinstance(e, relax.Call) and not any(e.same_as(x) for x in leaves)]
    seen, todo = [], [root_var]
    while todo:
        v = todo.pop()
        if any(v.same_as(s) for s in seen) or v not in var2val:
            continue
        val = var2val[v]
        if not any(val.same_as(e) for e in inner):
            continue
        seen.append(v)
        todo.extend(_var_leaves(val, []))
    return seen


def find_sites(func, backend) -> tuple:
    """(sites, claimed): the matches of ``func`` the partitioner would make (table
    order, then program order, like ``FuseOpsByPattern``; a match claims its bindings when its
    pattern builds, a kernel supports it and no intermediate leaks), and every claimed var. Only
    kernel support is checked here, not placement: the planner decides where each site runs.
    Only conv / matmul sites (:data:`SPLIT_KINDS`) may split; the others have ``why_not`` set."""
    from tvm import relax
    var2val = relax.analysis.get_var2val(func)
    binds = bindings(func)
    order = {b.var: i for i, b in enumerate(binds)}
    use = users(func)
    claimed: set = set()
    sites = []
    for entry in P.PATTERN_TABLE:
        root_pat, ann_pats = entry.make()
        for b in binds:
            if b.var in claimed or not isinstance(b.value, relax.Call):
                continue
            m = root_pat.extract_matched_expr(b.value, var2val)
            if m is None:
                continue
            ann = {k: m[p] for k, p in ann_pats.items() if p in m}
            cov = _covered(b.var, m, ann, var2val)
            if any(v in claimed for v in cov):
                continue
            inside = set(cov)
            if any((not isinstance(v, relax.DataflowVar)) or any(u not in inside for u in use.get(v, []))
                   for v in cov if not v.same_as(b.var)):
                continue                               # an intermediate leaks: the partitioner refuses it
            try:
                match = entry.build(ann)
            except P.Refused:
                continue
            match, ok, _ = backend.choose_form(match)
            if not ok:
                continue
            claimed.update(cov)
            core_var = next((v for v in cov if var2val[v].same_as(ann["core"])), None)
            if core_var is None:
                continue
            cov.sort(key=lambda v: order[v])
            chain = [v for v in cov if order[v] > order[core_var]]
            site = Site(entry, b.var, core_var, chain, cov, match)
            site.rule_name, site.why_not = _rule(site, var2val)
            sites.append(site)
    sites.sort(key=lambda s: order[s.root])
    return sites, claimed


def _rule(site, var2val) -> tuple:
    """(rule name or None, reason it cannot split or "")."""
    if site.entry.kind not in SPLIT_KINDS:
        return None, f"{site.entry.kind} regions are not split"
    core = var2val[site.core]
    op = P.op_name(core)
    a = site.match.spec.attrs
    if op == "relax.matmul":
        shape_a = P.shape_of(core.args[0])
        if len(shape_a) < 2 or len(P.shape_of(core.args[1])) < 2:
            return None, "a 1-D matmul operand (a matrix-vector product) is not split"
        b = _inner(core.args[1], var2val)
        name = "matmul_columns" if P.is_constant(b) else "matmul_rows"
    elif op in ("relax.nn.conv2d", "relax.nn.conv1d"):
        if int(a.get("groups", 1)) != 1:
            return None, (f"grouped convolution (groups={a.get('groups')}): each output channel reads its own "
                          f"input channels; only groups=1 convolutions are split")
        name = "conv"
    else:
        return None, f"{op} is not split"
    rule = SPLIT_RULES[name]
    operand = core.args[rule.operand]
    inner = _inner(operand, var2val)
    if name != "matmul_rows" and not P.is_constant(inner):
        return name, "the weight is not a compile-time constant"
    out = P.shape_of(site.root)
    n = int(out[rule.out_axis % len(out)])
    if n <= rule.align:
        return name, (f"{n} {rule.unit}: a QPU part needs at least one whole tile of {rule.align} "
                      f"({rule.source}) and the CPU part at least one more")
    for v in site.chain:
        for c in var2val[v].args:
            if P.is_constant(c) and _const_slice_axis(P.const_value(c).shape, out, rule, n) == "bad":
                return name, f"epilogue constant of shape {list(P.const_value(c).shape)} is not per-{rule.unit[:-1]}"
    return name, ""


def _inner(e, var2val):
    """The operand under an operand form (astype / permute_dims), following bound vars."""
    from tvm import relax
    v = var2val.get(e, e) if isinstance(e, relax.Var) else e
    if P.op_name(v) in OPERAND_FORMS:
        return v.args[0]
    return e


def _const_slice_axis(cshape, out_shape, rule, n):
    """Axis of an epilogue constant to slice with the output (int), None (broadcast: shared), or
    "bad" (neither)."""
    r, rc = len(out_shape), len(cshape)
    axis = rule.out_axis % r - (r - rc)
    if rc == 0 or axis < 0 or cshape[axis] == 1:
        return None
    return axis if cshape[axis] == n else "bad"


# ---------------------------------------------------------------------------------------------
# emitting one part

def _slice_const(c, axis, lo, hi):
    import tvm
    from tvm import relax
    arr = P.const_value(c)
    idx = [slice(None)] * arr.ndim
    idx[axis] = slice(lo, hi)
    return relax.const(tvm.runtime.tensor(np.ascontiguousarray(arr[tuple(idx)])))


def _recall(val, args):
    from tvm import relax
    return relax.Call(val.op, args, val.attrs, val.ty_args)


def emit_part(bb, site, var2val, lo: int, hi: int, tag: str, remap):
    """Emit ``epi(op(x, W[lo:hi]))`` of ``site`` into ``bb`` (``remap``: original var -> expr in
    the new function). Returns the part's output var; its anchor var is named ``<core>_<tag>``."""
    from tvm import relax
    rule = SPLIT_RULES[site.rule_name]
    core = var2val[site.core]
    covered = set(site.covered)
    args = []
    for i, a in enumerate(core.args):
        form = var2val[a] if isinstance(a, relax.Var) and a in covered else None     # astype / permute
        inner = form.args[0] if form is not None else a
        if i == rule.operand:
            if P.is_constant(inner):
                inner = _slice_const(inner, rule.operand_axis % len(P.shape_of(inner)), lo, hi)
            else:
                ax = rule.operand_axis % len(P.shape_of(inner))
                inner = bb.emit(relax.op.strided_slice(remap(inner), [ax], [lo], [hi]),
                                name_hint=f"{site.core.name}_{tag}_rows")
        elif isinstance(inner, relax.Var):
            inner = remap(inner)
        if form is not None:
            inner = bb.emit(_recall(form, [inner] + list(form.args[1:])), name_hint=f"{a.name}_{tag}")
        args.append(inner)
    prev = bb.emit(_recall(core, args), name_hint=f"{site.core.name}_{tag}")
    before, out_shape, n = site.core, P.shape_of(site.root), site.channels
    for v in site.chain:
        val = var2val[v]
        new = []
        for c in val.args:
            if isinstance(c, relax.Var) and c.same_as(before):
                new.append(prev)
            elif P.is_constant(c):
                ax = _const_slice_axis(P.const_value(c).shape, out_shape, rule, n)
                new.append(c if ax is None else _slice_const(c, ax, lo, hi))
            else:
                new.append(c)
        prev = bb.emit(_recall(val, new), name_hint=f"{v.name}_{tag}")
        before = v
    return prev


def part_match(site, var2val, lo: int, hi: int, backend):
    """The Match (chosen form, as the partitioner will see it) of one part, built in a scratch
    function by the same emitter and pattern builder; raises P.Refused if no kernel takes it."""
    from tvm import relax
    bb = relax.BlockBuilder()
    leaves = []
    core = var2val[site.core]
    covered = set(site.covered)
    for a in core.args:
        inner = var2val[a].args[0] if isinstance(a, relax.Var) and a in covered else a
        if isinstance(inner, relax.Var) and not any(inner.same_as(x) for x in leaves):
            leaves.append(inner)
    params = [relax.Var(f"p{i}", v.ty) for i, v in enumerate(leaves)]

    def remap(v):
        for orig, p in zip(leaves, params):
            if orig.same_as(v):
                return p
        raise P.Refused(f"unexpected operand {v}")

    with bb.function("part", params):
        with bb.dataflow():
            out = emit_part(bb, site, var2val, lo, hi, "scratch", remap)
            gv = bb.emit_output(out)
        bb.emit_func_output(gv)
    func = bb.get()["part"]
    m = P.match_function(site.entry, func)
    m, ok, why = backend.choose_form(m)
    if not ok:
        raise P.Refused(why)
    return m


# ---------------------------------------------------------------------------------------------
# choosing the cut

def concat_seconds(site) -> float:
    """Modelled CPU time of the concat: one read and one write of the output, plus a VM op."""
    shape, dtype = P.shape_of(site.root), P.dtype_of(site.root)
    nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    bw = PL.CPU_MODEL["mem_bw"][0] * PL.CPU_MODEL["mem_efficiency"][0]
    return 2 * nbytes / bw + PL.CPU_MODEL["op_overhead"][0]


def _part_times(site, var2val, backend, nq: int):
    """(QPU seconds of the first ``nq`` units, CPU seconds of the rest, the QPU part's host
    seconds: the share of its QPU seconds spent on the VM thread); raises if no kernel takes the
    QPU part or it is over one GPU dispatch's budget."""
    from tvm_qpu.runtime.v3d import DISPATCH_BUDGET_SECONDS
    mq = part_match(site, var2val, 0, nq, backend)
    tq = PL.qpu_seconds(mq.spec, mq.constants, backend.registry)
    if PL.longest_dispatch_seconds(mq.spec, tq) > DISPATCH_BUDGET_SECONDS:
        raise ValueError("the QPU part is over one GPU dispatch's budget")
    mc = part_match(site, var2val, nq, site.channels, backend)
    return tq, PL.cpu_seconds(mc.spec), min(PL.host_seconds(mq.spec, mq.constants), tq)


def split_seconds(tq: float, tc: float, host: float) -> float:
    """Modelled time of a split op with asynchronous regions: the VM thread does the QPU part's
    host work (``host``, part of ``tq``), then the CPU part while the QPU runs the rest of ``tq``."""
    return host + max(tq - host, tc)


def choose_split(site, var2val, backend, cpu_s: float, qpu_s: float | None):
    """The cut of ``site`` balancing its parts, or a string saying why it cannot split.

    QPU time is not proportional to the channels (launch, copy and A-packing costs are fixed), so
    the QPU part's time is modelled as affine in its units ``n``: ``t_q(n) = a + b n`` through the
    estimates of one aligned tile (``n = align``) and of the whole op (``n = N``); the CPU part's
    as ``cpu_s (N - n) / N``. The QPU part's host work ``h`` (submit, wait, copies:
    :func:`tvm_qpu.placement.host_seconds`) runs on the CPU before the CPU part, so the op takes
    ``h + max(t_q - h, t_c)`` (:func:`split_seconds`) and the balance point is
    ``t_q(n) - h = t_c(n)`` (with no fixed cost it is the speed share ``N cpu / (cpu + qpu)``); it is
    rounded to the two aligned neighbours, both are estimated exactly (their own specs), and the
    better one is improved by steps of one tile while the op's time falls (a local optimum on the
    aligned grid under the parts' own estimates)."""
    if site.why_not:
        return site.why_not
    if qpu_s is None:
        return "no QPU estimate for the whole op"
    rule = SPLIT_RULES[site.rule_name]
    n, al = site.channels, rule.align
    try:
        tq1, _, h1 = _part_times(site, var2val, backend, al)
    except Exception as e:
        return f"a QPU part of one tile ({al} {rule.unit}) is not possible ({type(e).__name__}: {e})"
    slope = (qpu_s - tq1) / (n - al)
    fixed = tq1 - slope * al
    balance = (cpu_s - (fixed - h1)) / (slope + cpu_s / n) if slope + cpu_s / n > 0 else 0.0
    # at the balance point the op takes h + t_c(balance): it pays only if that is below cpu_s
    if balance < al / 2 or h1 + cpu_s * (n - min(balance, n)) / n >= cpu_s:
        return (f"the QPU's fixed cost {fixed * 1e6:.1f} us (launch, copies; {h1 * 1e6:.1f} us of it host "
                f"work on the CPU) is close to the whole op's CPU time {cpu_s * 1e6:.1f} us: no QPU part "
                f"of at least one tile ({al} {rule.unit}) pays")
    base = int(balance) // al * al
    cands = sorted({c for c in (base, base + al) if al <= c < n}) or [max(al, (n - 1) // al * al)]
    best, errors, seen = None, [], {}

    def cost(nq):
        if nq not in seen:
            try:
                tq, tc, h = _part_times(site, var2val, backend, nq)
                seen[nq] = (split_seconds(tq, tc, h), nq, tq, tc, h)
            except Exception as e:                   # a part no kernel takes: try another cut
                errors.append(f"{nq} {rule.unit}: {type(e).__name__}: {e}")
                seen[nq] = None
        return seen[nq]

    for nq in cands:
        c = cost(nq)
        if c is not None and (best is None or c[0] < best[0]):
            best = c
    while best is not None:          # hill-climb on the aligned grid: the affine fit is approximate
        better = [c for c in (cost(best[1] + d) for d in (-al, al) if al <= best[1] + d < n)
                  if c is not None and c[0] < best[0]]
        if not better:
            break
        best = min(better)
    if best is None:
        return "no aligned cut has a QPU part a kernel takes (" + "; ".join(errors[:2]) + ")"
    _, nq, tq, tc, h = best
    return SplitChoice(site.name, nq, n, rule.unit, balance / n, cpu_s / (cpu_s + qpu_s), tq, tc,
                       concat_seconds(site), cpu_s, qpu_s, h)


# ---------------------------------------------------------------------------------------------
# the rewrite

def apply_splits(func, sites: dict, choices: dict):
    """Rewrite ``func``: every site in ``choices`` ({root var name: SplitChoice}) becomes its QPU
    part, its CPU part and a concat. Returns (new function, pins): pins map the parts' anchor var
    names to "qpu" / "cpu" (the partitioner honours them: :class:`tvm_qpu.backend.QpuBackend`)."""
    from tvm import relax
    var2val = relax.analysis.get_var2val(func)
    by_root = {sites[k].root: (sites[k], c) for k, c in choices.items()}
    pins = {}

    @relax.expr_functor.mutator
    class _Split(relax.PyExprMutator):
        def visit_var_binding_(self, binding):
            hit = by_root.get(binding.var)
            if hit is None:
                return super().visit_var_binding_(binding)
            site, ch = hit
            bb = self.builder_
            q = emit_part(bb, site, var2val, 0, ch.n_q, QPU_TAG, self.visit_expr)
            c = emit_part(bb, site, var2val, ch.n_q, ch.n, CPU_TAG, self.visit_expr)
            pins[f"{site.core.name}_{QPU_TAG}"] = ("qpu", f"split: QPU part ({ch.n_q} of {ch.n} {ch.unit}) "
                                                               f"of {site.name}")
            pins[f"{site.core.name}_{CPU_TAG}"] = ("cpu", f"split: CPU part ({ch.n - ch.n_q} of {ch.n} {ch.unit}) "
                                                          f"of {site.name}: runs beside the QPU part once QPU "
                                                          f"regions are asynchronous")
            axis = SPLIT_RULES[site.rule_name].out_axis % len(P.shape_of(site.root))
            cat = relax.op.concat([q, c], axis=axis)
            bb.emit_normalized(relax.VarBinding(binding.var, bb.normalize(cat)))

    new = _Split().visit_expr(func)
    return new, pins
