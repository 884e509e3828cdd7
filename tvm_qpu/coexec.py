"""Whole-model latency with the CPU and the QPU working at once, and placement that minimises it.

The model (all figures *modelled*: CPU times from :func:`tvm_qpu.placement.cpu_seconds` /
:func:`op_cpu_seconds`, QPU times from :func:`tvm_qpu.placement.qpu_seconds`, the kernels' cycle
model plus launch and copy overhead):

* a model is a DAG of :class:`Node` s in program order, each on one resource, ``"cpu"`` (the Relax
  VM's thread: CPU ops run one after the other) or ``"qpu"`` (one GPU queue: regions run one after
  the other);
* :func:`schedule` is the list schedule the Relax VM produces, in program order: a CPU node starts
  when the CPU is free and its inputs are ready; a QPU node is *submitted* when the VM reaches it
  (inputs ready; the VM waits for a QPU input, the first use of that result) and starts when the
  QPU is free. ``overlap=False`` is today's synchronous launch (the VM blocks until the region
  ends); ``overlap=True`` is the asynchronous regions of issue 12 (submit at the call, wait at the
  first use). Latency = the end of the last node;
* :func:`critical_path` is the longest dependency chain (unlimited resources): a lower bound.

:func:`plan` chooses, for every site the partitioner could offload (:func:`tvm_qpu.split.find_sites`),
CPU or QPU, and for a conv / matmul also a split (:func:`tvm_qpu.split.choose_split`), to minimise the overlapped latency: start from the
per-op cost choice (QPU where it is predicted faster, like ``placement="cost"``), then greedy
steepest descent: evaluate every single change of one site's option by re-scheduling the whole
model, apply the best change while it lowers the latency (at most :data:`MAX_ROUNDS` rounds). This
is a local search, not an optimum: it can miss improvements that need two sites to change at once.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from . import patterns as P
from . import placement as PL
from .split import SPLIT_KINDS

RESOURCES = ("cpu", "qpu")
#: greedy rounds at most (each applies one change of one site)
MAX_ROUNDS = 64
#: a change must lower the modelled latency by more than this fraction to be kept
MIN_GAIN = 1e-6
#: ops that only relabel memory in the Relax VM (no data movement): dispatch cost only
VIEW_OPS = ("relax.reshape", "relax.expand_dims", "relax.squeeze", "relax.flatten")


@dataclass
class Node:
    name: str
    resource: str                    # "cpu" | "qpu"
    seconds: float                   # cpu: CPU time; qpu: the region's time on the QPU (kernel, launches)
    deps: tuple = ()                 # names of earlier nodes whose results it reads
    cpu_seconds: float | None = None  # the same work on the CPU (for the CPU-only figure)
    host: float = 0.0                # qpu: CPU time the VM thread spends on the region (submit + wait,
                                     # copies: placement.host_seconds), before the region starts

    def __post_init__(self):
        if self.resource not in RESOURCES:
            raise ValueError(f"node {self.name}: resource must be one of {RESOURCES}, got {self.resource!r}")
        if not self.seconds >= 0:
            raise ValueError(f"node {self.name}: seconds must be >= 0, got {self.seconds}")
        if not self.host >= 0 or (self.host and self.resource != "qpu"):
            raise ValueError(f"node {self.name}: host must be >= 0 and only on a qpu node, got {self.host}")


@dataclass
class Timeline:
    start: dict
    end: dict
    latency: float
    busy: dict                       # resource -> busy seconds

    def as_dict(self):
        return {"latency_s": self.latency, "busy_s": self.busy}


def schedule(nodes, overlap: bool = True) -> Timeline:
    """List schedule of ``nodes`` (program order) on one CPU stream and one QPU queue (module
    docstring). Deps must name earlier nodes."""
    start, end = {}, {}
    cpu_t = qpu_t = 0.0
    busy = {r: 0.0 for r in RESOURCES}
    for n in nodes:
        for d in n.deps:
            if d not in end:
                raise ValueError(f"node {n.name} depends on {d!r}, which is not an earlier node")
        ready = max((end[d] for d in n.deps), default=0.0)
        if n.resource == "cpu":
            s = max(cpu_t, ready)
            cpu_t = s + n.seconds
        else:
            submit = max(cpu_t, ready)             # the VM reaches the call with its inputs ready
            handed = submit + n.host               # the VM thread's host work for the region (CPU)
            s = max(handed, qpu_t)
            qpu_t = s + n.seconds
            cpu_t = qpu_t if not overlap else handed
            busy["cpu"] += n.host
        start[n.name], end[n.name] = s, s + n.seconds
        busy[n.resource] += n.seconds
    return Timeline(start, end, max(end.values(), default=0.0), busy)


def critical_path(nodes) -> float:
    """Longest dependency chain of ``nodes`` (seconds), with unlimited CPUs and QPUs."""
    fin = {}
    for n in nodes:
        fin[n.name] = max((fin[d] for d in n.deps), default=0.0) + n.host + n.seconds
    return max(fin.values(), default=0.0)


def cpu_only(nodes) -> float:
    """Latency with every node on the CPU (QPU nodes at their CPU estimate): the sum."""
    return sum(n.seconds if n.resource == "cpu" else (n.cpu_seconds if n.cpu_seconds is not None else n.seconds)
               for n in nodes)


# ---------------------------------------------------------------------------------------------
# CPU time of ops without a pattern

def op_cpu_seconds(val) -> float:
    """Modelled CPU time of an op no QPU pattern covers: a VM dispatch plus, unless it is a view
    (:data:`VIEW_OPS`), one element-op per output element or the bytes it moves, whichever is
    slower (the CPU model's elementwise rate and memory bandwidth). A crude model: these ops are
    small next to the convs / matmuls the placement is about."""
    overhead = PL.CPU_MODEL["op_overhead"][0]
    if P.op_name(val) in VIEW_OPS:
        return overhead
    try:
        shape, dtype = P.shape_of(val), P.dtype_of(val)
    except (P.Refused, AttributeError):
        return overhead
    elems = int(np.prod(shape, dtype=np.int64)) if shape else 1
    nbytes = 2 * elems * np.dtype(dtype).itemsize if dtype not in ("void", "") else 0
    bw = PL.CPU_MODEL["mem_bw"][0] * PL.CPU_MODEL["mem_efficiency"][0]
    return max(elems / PL.CPU_MODEL["elementwise_rate"][0], nbytes / bw) + overhead


class _Names:
    """Unique node names: a var's name, with ``#2``, ``#3``... when names repeat (Relax var names
    need not be unique: the fused calls of two regions may both be ``lv``)."""

    def __init__(self):
        self.used: dict = {}

    def __call__(self, base: str) -> str:
        k = self.used.get(base, 0) + 1
        self.used[base] = k
        return base if k == 1 else f"{base}#{k}"


def _producers(val, prod) -> tuple:
    """Nodes producing the vars ``val`` reads (``val``: an expression or a list of vars)."""
    from .split import _var_leaves
    out = []
    for v in (val if isinstance(val, list) else _var_leaves(val, [])):
        for p in prod.get(v, ()):
            if p not in out:
                out.append(p)
    return tuple(out)


# ---------------------------------------------------------------------------------------------
# the op-level model of a function before partitioning, and the planner

@dataclass
class SiteOptions:
    """The choices for one conv / matmul site and their modelled times."""
    site: object                     # split.Site
    cpu_s: float
    qpu_s: float | None              # None: no QPU option (unsupported / over the dispatch budget)
                                     # (incl. host_s: the per-op choice compares whole costs)
    qpu_why: str = ""
    split: object = None             # split.SplitChoice or None
    split_why: str = ""
    host_s: float = 0.0              # the part of qpu_s on the VM thread (placement.host_seconds)

    def options(self) -> list:
        out = ["cpu"]
        if self.qpu_s is not None:
            out.append("qpu")
        if self.split is not None:
            out.append("split")
        return out

    def per_op(self) -> str:
        """The per-op cost choice (placement="cost")."""
        return "qpu" if self.qpu_s is not None and self.qpu_s < self.cpu_s else "cpu"


def model_nodes(func, options: dict, choice: dict) -> list:
    """Nodes of ``func`` (program order) with each site (``options``: root name -> SiteOptions)
    placed as ``choice`` (root name -> "cpu" | "qpu" | "split")."""
    from tvm import relax
    from .split import bindings
    site_of = {}
    for o in options.values():
        for v in o.site.covered:
            site_of[v] = o
    prod: dict = {}
    nodes = []
    unique = _Names()
    for b in bindings(func):
        o = site_of.get(b.var)
        if o is not None:
            if not b.var.same_as(o.site.root):
                continue
            name = unique(o.site.name)
            inside = set(o.site.covered)
            from .split import _var_leaves
            reads = [v for c in o.site.covered for v in _var_leaves(func_val(func, c), []) if v not in inside]
            deps = _producers(reads, prod)
            how = choice[name]
            if how == "cpu":
                nodes.append(Node(name, "cpu", o.cpu_s, deps))
            elif how == "qpu":
                nodes.append(_qpu_node(name, o.qpu_s, o.host_s, deps, o.cpu_s))
            else:
                s = o.split
                nodes.append(_qpu_node(name + "/qpu", s.qpu_part_s, s.qpu_part_host_s, deps,
                                       o.cpu_s * s.n_q / s.n))
                nodes.append(Node(name + "/cpu", "cpu", s.cpu_part_s, deps))
                nodes.append(Node(name + "/concat", "cpu", s.concat_s, (name + "/qpu", name + "/cpu")))
                name = name + "/concat"
            prod[b.var] = (name,)
            continue
        val = b.value
        if isinstance(val, (relax.Var, relax.Tuple, relax.TupleGetItem)):
            prod[b.var] = _producers(val, prod)
        elif isinstance(val, relax.Call):
            name = unique(b.var.name)
            nodes.append(Node(name, "cpu", op_cpu_seconds(val), _producers(val, prod)))
            prod[b.var] = (name,)
    return nodes


def _qpu_node(name, qpu_s, host_s, deps, cpu_s) -> Node:
    """A QPU node from a whole QPU estimate ``qpu_s`` of which ``host_s`` is VM-thread time."""
    host = min(max(host_s, 0.0), qpu_s)
    return Node(name, "qpu", qpu_s - host, deps, cpu_s, host)


_V2V_CACHE: dict = {}


def func_val(func, var):
    """The value bound to ``var`` in ``func`` (cached var2val per function)."""
    from tvm import relax
    key = id(func)
    hit = _V2V_CACHE.get(key)
    if hit is None or hit[0] is not func:
        _V2V_CACHE.clear()
        hit = (func, relax.analysis.get_var2val(func))
        _V2V_CACHE[key] = hit
    return hit[1][var]


def site_options(func, backend, sites) -> dict:
    """root name -> SiteOptions, with the CPU / QPU estimates of each whole site and its best
    split (:func:`tvm_qpu.split.choose_split`)."""
    from tvm import relax
    from tvm_qpu.runtime.v3d import DISPATCH_BUDGET_SECONDS
    from .split import choose_split
    var2val = relax.analysis.get_var2val(func)
    out = {}
    for s in sites:
        cpu = PL.cpu_seconds(s.spec)
        qpu, why = None, ""
        host = PL.host_seconds(s.spec, s.match.constants)
        try:
            q = PL.qpu_seconds(s.spec, s.match.constants, backend.registry)
            if PL.longest_dispatch_seconds(s.spec, q) > DISPATCH_BUDGET_SECONDS:
                why = "over one GPU dispatch's budget"
            else:
                qpu = q
        except Exception as e:
            why = f"no QPU estimate ({type(e).__name__}: {e})"
        sp = choose_split(s, var2val, backend, cpu, qpu) if qpu is not None else (why or "no QPU option")
        o = SiteOptions(s, cpu, qpu, why, host_s=host)
        if isinstance(sp, str):
            o.split_why = sp
        else:
            o.split = sp
        out[s.name] = o
    return out


@dataclass
class Plan:
    """The planner's result: each site's choice and the modelled latencies (seconds)."""
    choice: dict                     # root name -> "cpu" | "qpu" | "split"
    options: dict                    # root name -> SiteOptions
    figures: dict = field(default_factory=dict)
    changes: list = field(default_factory=list)     # (site, from, to, latency after) of the greedy

    def splits(self) -> dict:
        return {k: self.options[k].split for k, c in self.choice.items() if c == "split"}

    def summary(self) -> dict:
        rows = []
        for k, o in self.options.items():
            rows.append({"site": k, "kind": o.site.entry.kind, "choice": self.choice[k],
                         "per_op": o.per_op(), "cpu_s": o.cpu_s, "qpu_s": o.qpu_s,
                         "split": o.split.as_dict() if o.split is not None else None,
                         "split_why": o.split_why})
        return {"figures": self.figures, "sites": rows,
                "changes": [{"site": s, "from": a, "to": b, "latency_s": t} for s, a, b, t in self.changes]}


def _latency(func, options, choice, overlap=True) -> float:
    return schedule(model_nodes(func, options, choice), overlap).latency


def plan(func, backend, sites=None) -> Plan:
    """Choose CPU / QPU / split per site of ``func`` to minimise the overlapped latency (module
    docstring: per-op start, greedy steepest descent)."""
    from .split import find_sites
    if sites is None:
        sites, _ = find_sites(func, backend)
    options = site_options(func, backend, sites)
    per_op = {k: o.per_op() for k, o in options.items()}
    choice = dict(per_op)
    best = _latency(func, options, choice)
    changes = []
    for _ in range(MAX_ROUNDS):
        cand = None
        for k, o in options.items():
            for alt in o.options():
                if alt == choice[k]:
                    continue
                t = _latency(func, options, dict(choice, **{k: alt}))
                if t < best * (1 - MIN_GAIN) and (cand is None or t < cand[0]):
                    cand = (t, k, alt)
        if cand is None:
            break
        t, k, alt = cand
        changes.append((k, choice[k], alt, t))
        choice[k] = alt
        best = t
    all_cpu = {k: "cpu" for k in options}
    nodes_cpu = model_nodes(func, options, all_cpu)
    nodes_op = model_nodes(func, options, per_op)
    nodes_plan = model_nodes(func, options, choice)
    figures = {"cpu_only_s": schedule(nodes_cpu).latency,
               "per_op_sync_s": schedule(nodes_op, False).latency,
               "per_op_overlap_s": schedule(nodes_op, True).latency,
               "planned_sync_s": schedule(nodes_plan, False).latency,
               "planned_overlap_s": schedule(nodes_plan, True).latency,
               "planned_critical_path_s": critical_path(nodes_plan)}
    return Plan(choice, options, figures, changes)


# ---------------------------------------------------------------------------------------------
# the model of a partitioned module (what tvmc partition prints)

def partitioned_nodes(mod, report) -> list:
    """Nodes of the partitioned ``mod``'s main: each QPU region (``Codegen="qpu"`` call) at its
    report estimate, each CPU op at its candidate's CPU estimate when a pattern matched it (its
    epilogue and operand-form ops then cost nothing: llvm fuses them into it), else
    :func:`op_cpu_seconds`."""
    from tvm import relax
    from .split import bindings
    main = mod["main"]
    regions: dict = {}                   # var name -> its regions in report order (names may repeat)
    for r in report.regions:
        regions.setdefault(r["var"], []).append(r)
    widest = {}                          # anchor -> the refused candidate covering most vars
    for c in report.candidates:
        if c.accepted or c.cpu_s is None:
            continue
        if c.anchor not in widest or len(c.vars) > len(widest[c.anchor].vars):
            widest[c.anchor] = c
    root_cost, fused = {}, set()
    for c in widest.values():
        root_cost[c.root] = c.cpu_s
        fused.update(v for v in c.vars if v != c.root)
    prod, nodes = {}, []
    unique = _Names()
    for b in bindings(main):
        val, var_name = b.value, b.var.name
        if isinstance(val, (relax.Var, relax.Tuple, relax.TupleGetItem)):
            prod[b.var] = _producers(val, prod)
            continue
        if not isinstance(val, relax.Call):
            continue
        deps = _producers(val, prod)
        name = unique(var_name)
        is_region = isinstance(val.op, relax.GlobalVar) and regions.get(var_name)
        if is_region:
            r = regions[var_name].pop(0)
            q = r.get("qpu_s")
            nodes.append(_qpu_node(name, q if q is not None else 0.0, region_host_seconds(val, b.var), deps,
                                   r.get("cpu_s")))
        elif var_name in root_cost:
            nodes.append(Node(name, "cpu", root_cost[var_name], deps))
        elif var_name in fused:
            nodes.append(Node(name, "cpu", 0.0, deps))
        else:
            nodes.append(Node(name, "cpu", op_cpu_seconds(val), deps))
        prod[b.var] = (name,)
    return nodes


def region_host_seconds(call, var) -> float:
    """:func:`tvm_qpu.placement.host_seconds` of a QPU region call of a partitioned module: the
    per-region host cost plus copying its run-time arguments (constants stay resident) and its
    result ``var`` at the copy bandwidth."""
    nbytes = 0
    for v in list(call.args) + [var]:
        if P.is_constant(v):
            continue
        try:
            shape, dtype = P.shape_of(v), P.dtype_of(v)
        except (P.Refused, AttributeError):
            continue
        nbytes += (int(np.prod(shape, dtype=np.int64)) if shape else 1) * np.dtype(dtype).itemsize
    return PL.QPU_OVERHEAD["host"][0] + nbytes / PL.QPU_OVERHEAD["copy_bw"][0]


def summarize(mod, report) -> dict:
    """Modelled whole-model latencies of a partitioned module: CPU only, QPU regions synchronous
    (today), QPU regions asynchronous (overlap), and the critical path."""
    nodes = partitioned_nodes(mod, report)
    sync, ovl = schedule(nodes, False), schedule(nodes, True)
    return {"cpu_only_s": cpu_only(nodes), "sync_s": sync.latency, "overlap_s": ovl.latency,
            "critical_path_s": critical_path(nodes), "qpu_busy_s": ovl.busy["qpu"],
            "cpu_busy_s": ovl.busy["cpu"], "nodes": len(nodes)}


def _ms(s):
    return "-" if s is None else f"{s * 1e3:.3f} ms"


def text(schedule_info: dict) -> list:
    """Report lines for a PartitionReport's ``schedule`` entry."""
    if not schedule_info:
        return []
    out = []
    if "error" in schedule_info:
        return [f"modelled latency: unavailable ({schedule_info['error']})"]
    s = schedule_info.get("model", {})
    if s:
        out.append("modelled whole-model latency (Pi 5 cost model; CPU ops in program order on one stream, "
                   "QPU regions on one queue):")
        out.append(f"  CPU only {_ms(s['cpu_only_s'])}; QPU regions synchronous {_ms(s['sync_s'])}; "
                   f"asynchronous (overlap) {_ms(s['overlap_s'])}; critical path {_ms(s['critical_path_s'])}")
    p = schedule_info.get("plan")
    if p:
        f = p["figures"]
        out.append("whole-model plan (greedy over CPU / QPU per region and splits of convs / matmuls, "
                   "minimising the overlapped latency):")
        out.append(f"  CPU only {_ms(f['cpu_only_s'])}; per-op choice: sync {_ms(f['per_op_sync_s'])}, overlap "
                   f"{_ms(f['per_op_overlap_s'])}; planned: sync {_ms(f['planned_sync_s'])}, overlap "
                   f"{_ms(f['planned_overlap_s'])} (critical path {_ms(f['planned_critical_path_s'])})")
        for r in p["sites"]:
            sp = r["split"]
            if r["choice"] == "split":
                out.append(f"  split {r['site']:16s} QPU {sp['n_q']} / CPU {sp['n'] - sp['n_q']} of {sp['n']} "
                           f"{sp['unit']} (QPU share {sp['fraction']:.2f}; balance point {sp['balance_fraction']:.2f}, "
                           f"speed share {sp['speed_share']:.2f}); parts QPU {_ms(sp['qpu_part_s'])} / CPU "
                           f"{_ms(sp['cpu_part_s'])}; unsplit CPU {_ms(r['cpu_s'])} / QPU {_ms(r['qpu_s'])}")
            elif r["choice"] != r["per_op"]:
                out.append(f"  {r['site']:22s} {r['choice']} (per-op choice {r['per_op']}): the overlap "
                           f"lowers the whole-model latency")
        unsplit = [r for r in p["sites"] if r["choice"] != "split" and r["split_why"] and r["kind"] in SPLIT_KINDS]
        for r in unsplit:
            out.append(f"  not split {r['site']:12s} {r['split_why']}")
    return out
