"""``tvmc tune``: MetaSchedule over the CPU part of a build; records for ``tvmc compile`` and placement.

::

    tvmc tune model.onnx --target qpu -o records.json --trials 64      # this machine
    tvmc tune model.onnx --target-host pi5 --rpc-tracker HOST:9190 --rpc-key pi5 -o pi5.json
    tvmc compile model.onnx --tuning-records records.json -o model.tar

**What is tuned.** The functions the build compiles for the CPU, exactly as
:func:`tvm_qpu.cpu_schedule.legalized` hands them to the default schedules: for ``--target llvm``
the whole model, for ``--target qpu`` what stays on the CPU after partitioning (QPU regions are
not TIR). Each QPU-capable op (a pattern the partitioner matches) is also tuned alone, as a
small module of its own, so that placement can price it by measurement (:func:`RecordSet.op_seconds`).
Tasks are TVM MetaSchedule tasks (``tvm.s_tir.meta_schedule``: evolutionary search; XGBoost cost
model when ``xgboost`` is installed, else random: ``--cost-model``), measured by its local runner,
or by its RPC runner on a remote machine (``--rpc-tracker`` / ``--hostname``).

**QPU kernels** (``--target qpu``, :func:`measure_qpu`): before the CPU tasks, every QPU-capable
op's kernel plan is timed on the QPU device of the machine that measures (a ``tvm_qpu.rpc_server``
over RPC, ``tvm_qpu.rpc.measure_plan``, or this one): per op the seconds, the device kind (``v3d``
measured; ``emulator`` modelled by the cycle model), the QPU count and the plan's identity
(:func:`plan_identity`). Placement uses a v3d time only for the same plan
(:meth:`RecordSet.qpu_measurement`, ``tvm_qpu.placement.qpu_estimate``).

**Records.** One JSON file (:data:`FORMAT`): a header (target, CPU target string, host arch,
model sha256 and input shapes, where it was measured), then per workload its structural hash, the
best MetaSchedule record (``TuningRecord.as_json``: trace, run times) and every trial's time
count, then per op the workloads it is made of. A ``sha256`` over the content guards against
corruption. It is rewritten (atomically) after every measured batch, so an interrupted run keeps
what it measured and ``tvmc tune`` with the same ``-o`` continues from it: tasks with enough trials
are skipped, the others get the missing trials and start their search from the best so far.

**Use.** :func:`load_records` checks the header against the build (same target, CPU target and
model, else :class:`TuningError` with the reason); :func:`apply_pass` replays each record's
trace on the function with the same structural hash, marks it scheduled, and leaves every other
function (and any record whose trace no longer applies or lowers) to the default schedules;
:func:`measured_cpu` makes placement read op times from the records.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass, field

from .backend import QpuError

FORMAT = "tvm-qpu-tuning-records"
#: 2: the workloads carry ``layout_free_buffers`` (constant weights packed at compile time,
#: cpu_schedule._prepack), so version-1 records name functions no build makes any more
VERSION = 2
#: measured CPU time of an op in placement: the record's measured time (tune.run_seconds) plus the Relax VM's dispatch
#: (placement.CPU_MODEL["op_overhead"]), scaled to the Pi 5 when measured elsewhere (a76_factor)
SOURCE_MEASURED = "measured: tuning records"
SOURCE_MODELLED = "modelled: default-schedule rate"
#: QPU time of an op in placement: a v3d measurement from the records (kernel launches, measured
#: on the GPU), else the kernel's cycle model (registry.estimate); both plus the modelled fixed costs
SOURCE_QPU_MEASURED = "measured: v3d on"
SOURCE_QPU_MODELLED = "modelled: cycle model"
#: device kinds a QPU entry of the records may name: "v3d" (the real GPU: measured wall time of
#: the launches) and "emulator" (the instruction-level emulator: its cycle model, i.e. modelled)
QPU_DEVICES = ("v3d", "emulator")
#: ``tvmc tune --qpu-measure``: time the QPU ops' kernels first (yes), only them (only), not (no), or
#: (auto, the default of --target qpu) as yes unless they would run on this machine's emulator,
#: whose times are the cycle model placement uses anyway (and emulating big kernels takes long)
QPU_MEASURE = ("auto", "yes", "no", "only")
#: timed runs per QPU op on v3d (after one warm-up run); the emulator is deterministic: one run
QPU_REPEAT = 5
#: apache-tvm-ffi releases whose ToJSONGraph segfaults under apache-tvm 0.27 (MetaSchedule's
#: TuneContext and Workload serialise through it): 0.1.15.post2 crashes on save_json(IntImm(1)),
#: 0.1.14.post1 works (checked on this repository's dev box)
FFI_BROKEN_FROM = (0, 1, 15)
DEFAULT_TRIALS = 64
BUILD_TIMEOUT = 120.0       # seconds per candidate build / run: the default 30 s fails on a busy host
RUN_TIMEOUT = 60.0
#: timed repeats per candidate (each the mean of ``number`` = 3 runs of at least 20 ms); a record's
#: time is their minimum (:func:`run_seconds`)
RUN_REPEAT = 3
#: a rule variant that beat the default is timed again beside it this many times, alternated, and
#: kept only if still faster by VARIANT_MARGIN (:func:`_confirm`): on the BERT layer, variants
#: picked on one timing each made the tuned build 1.04x of ORT where the default build was 0.91x
CONFIRM_ROUNDS = 2
VARIANT_MARGIN = 0.02


def run_seconds(secs) -> float:
    """The time a records entry keeps of a candidate's (or default schedule's) repeats: their
    minimum. Other processes only ever add time, and on a shared host they add a lot: on the busy
    2-core dev box one repeat of the BERT layer's FFN matmuls read 62 ms for a default schedule and
    45 ms for a candidate that a quieter median-of-5 timing put at 33 ms and 91 ms (docs/tuning.md)."""
    return min(float(s) for s in secs)


class TuningError(QpuError):
    """Tuning refused or failed, with the reason."""


# ---------------------------------------------------------------------------------------------
# environment

def _version_tuple(v: str) -> tuple:
    out = []
    for part in v.split(".")[:3]:
        digits = "".join(ch for ch in part if ch.isdigit())
        out.append(int(digits) if digits else 0)
    return tuple(out)


def check_environment():
    """Raise :class:`TuningError` if MetaSchedule cannot run here (before it segfaults)."""
    try:
        from importlib import metadata
        ffi = metadata.version("apache-tvm-ffi")
    except Exception:
        ffi = None
    if ffi is not None and _version_tuple(ffi) >= FFI_BROKEN_FROM:
        raise TuningError(f"apache-tvm-ffi {ffi} crashes MetaSchedule under apache-tvm 0.27 (segfault in "
                          f"ToJSONGraph); install a working one: pip install 'apache-tvm-ffi<0.1.15'")
    try:
        import psutil  # noqa: F401  (MetaSchedule counts the cores with it)
    except ImportError:
        raise TuningError("tvmc tune needs psutil (MetaSchedule counts cores with it): "
                          "pip install 'tvm-qpu[tune]'") from None


def _cheap_stack(context=1):
    """``inspect.stack()`` without its per-frame module search: TVMScript's ``@T.prim_func`` calls
    ``inspect.stack()``, whose ``getmodule`` scans all of ``sys.modules`` for every frame of code
    built from an AST; importing ``tvm.s_tir.tensor_intrin`` (hundreds of prim_funcs, which every
    MetaSchedule TuneContext and worker process does) then took 347 s on the busy 2-core dev box,
    39 s with this (measured once each, same load). The frames, file names, line numbers and source
    lines are the same; only the module lookup of files that do not exist is skipped."""
    import inspect
    import linecache
    frame = sys._getframe(1)
    out = []
    while frame is not None:
        code = frame.f_code
        line = linecache.getline(code.co_filename, frame.f_lineno, frame.f_globals)
        out.append(inspect.FrameInfo(frame, code.co_filename, frame.f_lineno, code.co_name,
                                     [line] if line else None, 0 if line else None))
        frame = frame.f_back
    return out


def import_tensor_intrin():
    """Import ``tvm.s_tir.tensor_intrin`` with :func:`_cheap_stack` (see there); also the
    initializer of MetaSchedule's builder and runner worker processes."""
    if "tvm.s_tir.tensor_intrin" in sys.modules:
        return
    import inspect
    saved = inspect.stack
    inspect.stack = _cheap_stack
    try:
        import tvm.s_tir.tensor_intrin  # noqa: F401
    finally:
        inspect.stack = saved


#: MetaSchedule cost models ``tvmc tune --cost-model`` offers: "xgb" (its XGBModel: gradient-boosted
#: trees over the candidates' features, trained on every measured batch; needs ``xgboost``, checked
#: with xgboost 3.2.0 and apache-tvm 0.27) and "random" (no model: the search is close to a random
#: sampling of the design space)
COST_MODELS = ("xgb", "random")


def _xgboost_version() -> str | None:
    try:
        import xgboost
        return str(getattr(xgboost, "__version__", "?"))
    except ImportError:
        return None


def resolve_cost_model(name: str | None = None) -> str:
    """The cost model a tuning run uses: ``name``, or by default "xgb" when ``xgboost`` is
    importable, else "random". Asking for "xgb" without xgboost is a :class:`TuningError`."""
    if name is None:
        return "xgb" if _xgboost_version() is not None else "random"
    if name not in COST_MODELS:
        raise TuningError(f"unknown cost model {name!r}: choose one of {', '.join(COST_MODELS)}")
    if name == "xgb" and _xgboost_version() is None:
        raise TuningError("--cost-model xgb needs xgboost: pip install 'tvm-qpu[tune]' (or use --cost-model random)")
    return name


def file_sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _content_sha(doc: dict) -> str:
    body = {k: v for k, v in doc.items() if k != "sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def workload_hash(func) -> str:
    """Structural hash of a PrimFunc as a tuning workload (the module MetaSchedule extracts)."""
    import tvm
    import tvm_ffi
    f = func.with_attr("global_symbol", "main")
    return f"{tvm_ffi.structural_hash(tvm.IRModule({'main': f})) & 0xFFFFFFFFFFFFFFFF:016x}"


def spec_key(spec) -> str:
    """The key of an op instance in the records: kind, operand shapes and dtypes, and its
    attributes (without per-instance names)."""
    attrs = {k: v for k, v in sorted(spec.attrs.items()) if "name" not in k}
    return spec.describe() + " " + json.dumps(attrs, sort_keys=True, default=str)


# ---------------------------------------------------------------------------------------------
# what a build compiles for the CPU

@dataclass
class BuildIdentity:
    """What records must match to be used by a build."""
    target: str                    # "qpu" | "llvm"
    cpu_target: str                # str(tvm Target) of the host code (without num-cores)
    host_arch: str
    model_sha256: str
    input_shapes: dict | None

    def header(self) -> dict:
        return {"target": self.target, "cpu_target": self.cpu_target, "host_arch": self.host_arch,
                "model_sha256": self.model_sha256, "input_shapes": self.input_shapes}


def build_identity(model_path, target: str, target_host=None, input_shapes=None) -> BuildIdentity:
    from . import api
    from . import cpu_schedule as cs
    if target not in api.TARGETS:
        raise TuningError(f"unknown target {target!r}: choose one of {', '.join(api.TARGETS)}")
    host, arch, _ = api.resolve_target_host(target_host)
    return BuildIdentity(target, str(cs.host_target(host)), arch, file_sha256(model_path),
                         {k: list(v) for k, v in input_shapes.items()} if input_shapes else None)


@dataclass
class Task:
    name: str
    func: object                   # PrimFunc
    hash: str
    weight: int = 1


def _tasks_of(mod, tgt) -> list:
    """{hash: Task} of the PrimFuncs of a legalized module (weight: calls of each)."""
    import collections
    from tvm import tirx
    from . import cpu_schedule as cs
    calls = collections.Counter(c.args[0].name_hint for c in cs.relax_calls(mod, "relax.call_tir"))
    out = {}
    for gv, f in mod.functions_items():
        if isinstance(f, tirx.PrimFunc) and gv.name_hint in calls:
            h = workload_hash(f)
            if h in out:
                out[h].weight += calls[gv.name_hint]
            else:
                out[h] = Task(gv.name_hint, f, h, calls[gv.name_hint])
    return out


def _op_modules(mod, params, registry=None) -> list:
    """(spec key, Relax module of that op alone) for every QPU-capable op of the model: the
    composite functions of an all-offloading partition, as stand-alone functions."""
    import tvm
    from tvm import relax
    from . import api
    from . import patterns as P
    from .backend import CODEGEN, _composite_of
    backend, part, _ = api._partition(mod, params, "all", registry)
    out = []
    for _, f in part.functions_items():
        if not (isinstance(f, relax.Function) and f.attrs is not None and f.attrs.get("Codegen") == CODEGEN):
            continue
        try:
            comp, _ = _composite_of(f)
            m, _, _ = backend.choose_form(P.match_function(P.entry(str(comp.attrs["Composite"])), comp))
            body = relax.Function(comp.params, comp.body, comp.ret_ty, comp.is_pure)
            out.append((spec_key(m.spec), tvm.IRModule({"main": body.with_attr("global_symbol", "main")})))
        except Exception:   # an op we cannot isolate is priced by the model, as without records
            continue
    return out


@dataclass
class Workloads:
    """The tasks of one build: those of the model's CPU part, and per op its tasks."""
    tasks: dict                    # hash -> Task (model CPU part and ops, deduplicated)
    model: list                    # hashes of the model's CPU part
    ops: dict                      # spec key -> [hash, ...] (with repetition)


def collect_workloads(model_path, target: str, target_host=None, input_shapes=None, placement="cost",
                      ops: bool = True) -> Workloads:
    """The MetaSchedule tasks of what ``tvmc compile`` (same arguments) compiles for the CPU."""
    from . import api
    from . import cpu_schedule as cs
    host, _, _ = api.resolve_target_host(target_host)
    tgt = cs.host_target(host)
    mod, params = api.from_onnx(model_path, input_shapes)
    backend, part, _ = api._partition(mod, params, "none" if target == "llvm" else placement)
    lowered, _ = backend.codegen(part)
    model_tasks = _tasks_of(cs.legalized(lowered, tgt), tgt)
    tasks = dict(model_tasks)
    op_tasks = {}
    if ops:
        for key, omod in _op_modules(mod, params):
            try:
                ts = _tasks_of(cs.legalized(omod, tgt), tgt)
            except Exception:
                continue
            hashes = []
            for h, t in ts.items():
                hashes += [h] * t.weight
                if h not in tasks:
                    tasks[h] = Task(t.name, t.func, h, 0)
            op_tasks.setdefault(key, hashes)
    return Workloads(tasks, list(model_tasks), op_tasks)


# ---------------------------------------------------------------------------------------------
# the records file

@dataclass
class RecordSet:
    """A validated records file (see the module docstring)."""
    path: str
    header: dict
    workloads: dict = field(default_factory=dict)   # hash -> {"task", "trials", "best", "seconds"}
    ops: dict = field(default_factory=dict)          # spec key -> [hash, ...]
    qpu: dict = field(default_factory=dict)          # spec key -> QPU measurement (measure_qpu)

    def _rule_seconds(self, w: dict) -> float | None:
        """The faster of the default schedule and the best rule variant (:meth:`use_variant`)."""
        got = [w.get(k) for k in ("default_seconds", "variant_seconds") if w.get(k) is not None]
        return min(got) if got else None

    def best_seconds(self, h: str) -> float | None:
        """Measured seconds of the code a build with these records runs for workload ``h``: the
        MetaSchedule record's, the default schedule's or the best rule variant's, whichever was
        measured fastest (:meth:`use_record`, :meth:`use_variant`)."""
        w = self.workloads.get(h)
        if w is None or (w.get("seconds") is None and w.get("variant_seconds") is None):
            return None
        return min(x for x in (w.get("seconds"), self._rule_seconds(w)) if x is not None)

    def use_record(self, h: str) -> bool:
        """Whether a build replays the MetaSchedule record of ``h``: it has one, and it was
        measured faster than the default schedule and the rule variants (or they could not be
        measured)."""
        w = self.workloads.get(h)
        if w is None or w.get("best") is None or w.get("seconds") is None:
            return False
        d = self._rule_seconds(w)
        return d is None or w["seconds"] < d

    def use_variant(self, h: str) -> dict | None:
        """The TiledReduction knobs (:data:`tvm_qpu.cpu_schedule.KNOBS`) a build schedules ``h``
        with: a variant measured faster than the default schedule, unless the record is used."""
        w = self.workloads.get(h)
        if w is None or w.get("variant") is None or w.get("variant_seconds") is None or self.use_record(h):
            return None
        d = w.get("default_seconds")
        return dict(w["variant"]) if d is None or w["variant_seconds"] < d else None

    def op_seconds(self, key: str) -> float | None:
        """Measured seconds of the op with ``spec_key`` ``key`` (sum over its functions), or None
        if any of them has no successful measurement."""
        hashes = self.ops.get(key)
        if not hashes:
            return None
        total = 0.0
        for h in hashes:
            s = self.best_seconds(h)
            if s is None:
                return None
            total += s
        return total

    def measured_where(self) -> str:
        return self.header.get("measured_on", "?")

    def qpu_measurement(self, key: str, plan) -> tuple:
        """(entry, note) for the QPU op with ``spec_key`` ``key`` whose kernel plan is now ``plan``:
        ``entry`` is the record's v3d measurement if there is one for this very plan (same
        :func:`plan_identity`), else None; ``note`` says why not (no entry, an emulator entry,
        which is modelled, or a plan that changed since it was measured), "" when used."""
        e = self.qpu.get(key)
        if e is None:
            return None, ""
        now = plan_identity(plan)
        if e["plan"] != now:
            return None, (f"{e['device']} record ignored: the kernel plan changed since it was measured "
                          f"(plan {e['plan'][:12]}..., now {now[:12]}...)")
        if e["device"] != "v3d":
            return None, f"the records' emulator run: {e['seconds'] * 1e6:.1f} us, also modelled"
        return e, ""

    def to_doc(self) -> dict:
        doc = {"format": FORMAT, "version": VERSION, **self.header,
               "workloads": self.workloads, "ops": self.ops, "qpu": self.qpu}
        doc["sha256"] = _content_sha(doc)
        return doc

    def save(self, path=None):
        path = path or self.path
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(self.to_doc(), f, indent=1, sort_keys=True)
        os.replace(tmp, path)


HEADER_KEYS = ("target", "cpu_target", "host_arch", "model_sha256", "input_shapes")


def read_records(path) -> RecordSet:
    """Parse and integrity-check a records file (no matching against a build)."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise TuningError(f"{path}: no such tuning records file")
    try:
        with open(path) as f:
            doc = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TuningError(f"{path}: corrupt tuning records (not JSON: {e})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise TuningError(f"{path}: not a tvm-qpu tuning records file (format {doc.get('format') if isinstance(doc, dict) else None!r})")
    if doc.get("version") != VERSION:
        raise TuningError(f"{path}: tuning records version {doc.get('version')!r}; this tvm-qpu reads {VERSION} "
                          f"(re-run tvmc tune)")
    if doc.get("sha256") != _content_sha(doc):
        raise TuningError(f"{path}: corrupt tuning records (content does not match its sha256; edited or truncated)")
    missing = [k for k in HEADER_KEYS + ("workloads", "ops") if k not in doc]
    if missing:
        raise TuningError(f"{path}: corrupt tuning records (missing {', '.join(missing)})")
    header = {k: v for k, v in doc.items() if k not in ("format", "version", "sha256", "workloads", "ops", "qpu")}
    qpu = doc.get("qpu", {})                # files written before QPU measurements have none
    if not isinstance(qpu, dict):
        raise TuningError(f"{path}: corrupt tuning records (qpu is not a mapping)")
    for key, e in qpu.items():
        why = _bad_qpu_entry(e)
        if why:
            raise TuningError(f"{path}: corrupt tuning records (QPU entry {key!r}: {why})")
    return RecordSet(path, header, dict(doc["workloads"]), dict(doc["ops"]), dict(qpu))


def _bad_qpu_entry(e) -> str:
    """Why a QPU entry of a records file is malformed, or ""."""
    if not isinstance(e, dict):
        return "not a mapping"
    missing = [k for k in ("seconds", "device", "plan", "qpus", "host") if k not in e]
    if missing:
        return f"missing {', '.join(missing)}"
    if e["device"] not in QPU_DEVICES:
        return f"device {e['device']!r} is none of {', '.join(QPU_DEVICES)}"
    if not isinstance(e["seconds"], (int, float)) or not e["seconds"] > 0:
        return f"seconds {e['seconds']!r} is not a positive number"
    if not isinstance(e["plan"], str) or len(e["plan"]) != 64:
        return "plan is not a sha256"
    return ""


def check_matches(records: RecordSet, ident: BuildIdentity, what: str = "this build"):
    """Refuse records made for another target, CPU or model, with the reason."""
    h, p = records.header, records.path
    if h["model_sha256"] != ident.model_sha256:
        raise TuningError(f"{p}: tuning records are for another model (sha256 {h['model_sha256'][:12]}..., "
                          f"{what} {ident.model_sha256[:12]}...; model file {h.get('model_file', '?')})")
    if (h["input_shapes"] or None) != (ident.input_shapes or None):
        raise TuningError(f"{p}: tuning records are for input shapes {h['input_shapes']}, {what} uses "
                          f"{ident.input_shapes}")
    if h["target"] != ident.target:
        raise TuningError(f"{p}: tuning records are for --target {h['target']}, {what} is --target {ident.target}")
    if h["cpu_target"] != ident.cpu_target or h["host_arch"] != ident.host_arch:
        raise TuningError(f"{p}: tuning records are for the CPU target {h['cpu_target']} ({h['host_arch']}), "
                          f"{what} compiles for {ident.cpu_target} ({ident.host_arch})")


def load_records(path, model_path, target: str, target_host=None, input_shapes=None) -> RecordSet:
    """Records for a build of ``model_path`` (:func:`read_records` + :func:`check_matches`)."""
    rec = read_records(path)
    check_matches(rec, build_identity(model_path, target, target_host, input_shapes))
    return rec


# ---------------------------------------------------------------------------------------------
# using records

def _record_of(entry: dict, func, target):
    """The MetaSchedule TuningRecord of a records entry, bound to ``func``'s workload."""
    import tvm
    from tvm.s_tir import meta_schedule as ms
    wl = ms.database.Workload(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}))
    return ms.database.TuningRecord.from_json(entry["best"], wl)


def apply_to(func, entry: dict, target):
    """``func`` scheduled by the record's trace, or raise if it does not apply."""
    import tvm
    from tvm import s_tir
    rec = _record_of(entry, func, target)
    sch = s_tir.Schedule(rec.workload.mod)
    rec.trace.apply_to_schedule(sch, remove_postproc=False)
    return sch.mod["main"]


def apply_pass(records: RecordSet, target, stats: dict | None = None, failures: list | None = None):
    """Module pass: every PrimFunc with a record gets the record's schedule; failures (a trace that
    no longer applies, or TIR that does not lower) fall back to the default schedules."""
    import tvm
    from tvm import tirx
    from . import cpu_schedule as cs

    @tvm.transform.module_pass(opt_level=0, name="TvmQpuApplyTuningRecords")
    def _pass(mod, _ctx):
        updates = {}
        for gv, func in mod.functions_items():
            if not isinstance(func, tirx.PrimFunc):
                continue
            h = workload_hash(func)
            knobs = records.use_variant(h)
            if not records.use_record(h) and knobs is None:   # none, or slower than the default
                continue
            entry = records.workloads[h]
            try:
                if knobs is not None:
                    new, rule = cs.schedule_func(func, target, cs.default_rules(knobs))
                    if new is None:
                        raise ValueError(f"no rule schedules it with the knobs {knobs}")
                    how = f"tuned ({rule}, {_knobs_text(knobs)})"
                else:
                    new, how = apply_to(func, entry, target), "tuned (MetaSchedule record)"
                if not cs._lowers(new):
                    raise ValueError("the scheduled function does not lower")
            except Exception as e:   # fall back to the default schedules, and say so
                if failures is not None:
                    failures.append(f"{gv.name_hint}: {type(e).__name__}: {e}")
                continue
            attrs = func.attrs
            new = new.with_attr("global_symbol", attrs["global_symbol"]) if attrs is not None and \
                "global_symbol" in attrs else new.without_attr("global_symbol")
            updates[gv] = new.with_attr("tirx.is_scheduled", True)
            if stats is not None:
                stats[gv.name_hint] = how
        for gv, f in updates.items():
            mod[gv] = f
        return mod

    return _pass


@contextlib.contextmanager
def measured_cpu(records: RecordSet | None):
    """Within the block placement's CPU time of an op comes from ``records`` where they measured
    it (:func:`tvm_qpu.placement.cpu_estimate`)."""
    from . import placement as PL
    if records is None:
        yield
        return
    token = PL.MEASURED_CPU.set(records)
    try:
        yield
    finally:
        PL.MEASURED_CPU.reset(token)


# ---------------------------------------------------------------------------------------------
# QPU measurements

def plan_identity(plan) -> str:
    """sha256 of what a kernel plan runs: every launch's code words, uniform layout, workgroups and
    QPU count, and the buffers' names, roles, shapes and dtypes (``KernelPlan.to_json``; not the
    weights' values, which do not change the time). A changed kernel generator changes it, so a
    QPU measurement of an older kernel is not used for a newer one."""
    return hashlib.sha256(json.dumps(plan.to_json(), sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _plan_inputs(plan) -> dict:
    """Inputs for a timing run: standard-normal floats, zero integers (a valid index for any
    gather-like operand, so no out-of-range access reaches the device)."""
    import numpy as np
    rng = np.random.default_rng(0)
    out = {}
    for b in plan.buffers:
        if b.role != "input":
            continue
        if np.issubdtype(np.dtype(b.dtype), np.floating):
            out[b.name] = rng.standard_normal(b.shape).astype(b.dtype)
        else:
            out[b.name] = np.zeros(b.shape, dtype=b.dtype)
    return out


def measure_plan(plan, device="auto", repeat: int = QPU_REPEAT, modelled_seconds: float | None = None) -> dict:
    """Time ``plan``'s launches on ``device`` ("auto": the real GPU where there is one, else the
    emulator; or an open Device) on the machine this runs on. Returns the record entry: seconds
    (mean over ``repeat`` runs after a warm-up on v3d; one run on the emulator, whose cycle model is
    deterministic), device kind, QPU count, launches, runs, host name, plan identity.
    ``modelled_seconds`` (the kernel estimate) lets the real GPU refuse a plan that would outlast
    its hang check before it runs."""
    import platform
    from .executor import open_qpu_device
    from .codegen.plan import ResidentPlan
    dev = open_qpu_device(device)
    owned = dev is not device
    try:
        kind = str(getattr(dev, "kind", type(dev).__name__))
        if kind not in QPU_DEVICES:
            raise TuningError(f"cannot record QPU times measured on a {kind!r} device (only {', '.join(QPU_DEVICES)})")
        check = getattr(dev, "check_plan", None)
        if check is not None:
            check(plan, modelled_seconds, what=f"QPU kernel {plan.name}")
        runs = 1 if kind == "emulator" else max(1, int(repeat))
        r = ResidentPlan(plan, dev)
        try:
            r.write_inputs(**_plan_inputs(plan))
            if kind != "emulator":
                r.launch()                          # warm-up: caches, first-use page faults
            times, modelled = [], False
            for _ in range(runs):
                r.launch()
                times.append(sum(float(st.seconds) for st in r.last_stats))
                modelled = modelled or any(getattr(st, "modeled", True) for st in r.last_stats)
        finally:
            r.close()
        if modelled != (kind == "emulator"):
            raise TuningError(f"the {kind} device reported {'modelled' if modelled else 'measured'} times")
        qpus = max(int(L.num_qpus or dev.num_qpus) for L in plan.launches)
        return {"seconds": sum(times) / len(times), "device": kind, "qpus": qpus, "launches": len(plan.launches),
                "runs": runs, "host": platform.node(), "plan": plan_identity(plan)}
    finally:
        if owned:
            dev.close()


def _auto_local(device, out) -> str:
    """``--qpu-measure auto`` without RPC: "yes" if this machine's QPU device is a real GPU, else
    "no", saying so."""
    from .executor import open_qpu_device
    dev = open_qpu_device(device)
    kind = str(getattr(dev, "kind", ""))
    if dev is not device:
        dev.close()
    if kind == "emulator":
        print("QPU kernels not timed: this machine's QPU device is the emulator, whose times are the cycle "
              "model placement uses anyway (--qpu-measure yes times them, labelled modelled)", file=out, flush=True)
        return "no"
    return "yes"


@dataclass
class QpuOp:
    """One QPU-capable op of a model: its records key, description, plan and modelled seconds."""
    key: str
    description: str
    plan: object
    modelled: float | None


def qpu_ops(model_path, input_shapes=None, registry=None) -> list:
    """The QPU-capable op instances of the model, one per spec key, each with the kernel plan
    placement generates for it (the plan whose identity a record must match): every form the
    partitioner evaluates under placement "all" and "cost" (they differ: e.g. the mlp's
    matmul + bias + ReLU is one candidate under "all", matmul + bias under "cost")."""
    from . import api
    from .backend import QpuBackend
    found: dict = {}
    for placement in ("all", "cost"):
        mod, params = api.from_onnx(model_path, input_shapes)
        backend = QpuBackend(placement, registry=registry)
        evaluate = backend.evaluate

        def capture(entry, annotated, pin=None, _evaluate=evaluate):
            r = _evaluate(entry, annotated, pin)
            m = r[0]
            if m is not None and backend.registry.supports(m.spec)[0]:
                found.setdefault(spec_key(m.spec), m)
            return r

        backend.evaluate = capture
        backend.partition(mod, api._check_params(mod, params))
    out = []
    for key, m in found.items():
        try:
            plan = backend.registry.generate(m.spec, dict(m.constants))
        except Exception:          # no plan for it: placement cannot offload it either
            continue
        try:
            est = float(backend.registry.estimate(m.spec))
        except Exception:
            est = None
        out.append(QpuOp(key, m.spec.describe(), plan, est))
    return out


def _rpc_spec(remote: RemoteSpec):
    from . import rpc
    if remote.tracker is not None:
        return rpc.make_spec(key=remote.key, tracker=f"{remote.tracker[0]}:{remote.tracker[1]}",
                             timeout=remote.timeout)
    return rpc.make_spec(host=remote.host, port=remote.port, timeout=remote.timeout)


class _RemoteQpu:
    """QPU measurements on a remote ``tvm_qpu.rpc_server`` (its ``tvm_qpu.rpc.measure_plan``)."""

    def __init__(self, remote: RemoteSpec):
        from . import rpc
        self.session, self.where = rpc.open_session(_rpc_spec(remote))
        try:
            self.f = self.session.get_function("tvm_qpu.rpc.measure_plan")
        except Exception:
            raise TuningError(f"the RPC server at {self.where} cannot measure QPU kernels (no "
                              f"tvm_qpu.rpc.measure_plan): start it with 'python -m tvm_qpu.rpc_server ...' "
                              f"of this tvm-qpu (docs/rpc.md), or tune with --qpu-measure no") from None

    def __call__(self, op: QpuOp, repeat: int) -> dict:
        from . import rpc
        consts = rpc.arrays_to_npz(op.plan.constants)
        try:
            text = self.f(json.dumps(op.plan.to_json()), bytearray(consts), int(repeat),
                          -1.0 if op.modelled is None else float(op.modelled))
        except Exception as e:          # this op failed there (e.g. over the GPU's dispatch budget)
            raise RuntimeError(f"remote {self.where}: {rpc.remote_message(e)}") from None
        return json.loads(str(text))

    def close(self):
        self.session = None


def measure_qpu(model_path, records: RecordSet, input_shapes=None, remote: RemoteSpec | None = None,
                device="auto", out=None, repeat: int = QPU_REPEAT) -> RecordSet:
    """Time every QPU-capable op's kernel plan (:func:`qpu_ops`) on the QPU device of the machine
    that measures (``remote``'s server over RPC, else this one) and store it in ``records.qpu``
    (saved after each op). An entry already there for the same plan is kept (a resumed run); an
    op whose measurement fails is named, not recorded (placement then models it)."""
    out = out or sys.stdout
    ops = qpu_ops(model_path, input_shapes)
    where = remote.describe() if remote is not None else "this machine"
    todo = [op for op in ops if records.qpu.get(op.key, {}).get("plan") != plan_identity(op.plan)
            or records.qpu[op.key].get("where") != where]
    print(f"measuring {len(todo)} of {len(ops)} QPU op kernel(s) on {where}"
          + (f" ({len(ops) - len(todo)} already in {records.path})" if len(todo) < len(ops) else ""),
          file=out, flush=True)
    if not todo:
        return records
    measure = _RemoteQpu(remote) if remote is not None else \
        (lambda op, n: measure_plan(op.plan, device, n, op.modelled))
    try:
        for i, op in enumerate(todo, 1):
            try:
                e = measure(op, repeat)
            except TuningError:
                raise
            except Exception as ex:      # e.g. a kernel over the GPU's dispatch budget
                print(f"QPU op {i}/{len(todo)} {op.description}: not measured ({type(ex).__name__}: "
                      f"{' '.join(str(ex).split())[:200]})", file=out, flush=True)
                continue
            why = _bad_qpu_entry(e)
            if why or e["plan"] != plan_identity(op.plan):
                raise TuningError(f"QPU measurement of {op.description} on {where} is malformed "
                                  f"({why or 'plan identity differs from the plan sent'})")
            e["where"] = where
            records.qpu[op.key] = e
            records.save()
            label = "measured" if e["device"] == "v3d" else "modelled by the emulator's cycle model"
            print(f"QPU op {i}/{len(todo)} {op.description}: {e['seconds'] * 1e6:.1f} us on {e['device']} "
                  f"({label}; {e['qpus']} QPUs, host {e['host']})", file=out, flush=True)
    finally:
        if remote is not None:
            measure.close()
    return records


# ---------------------------------------------------------------------------------------------
# tuning

@dataclass
class RemoteSpec:
    """Where MetaSchedule measures: None (here) or a tracker (host, port, key) or one server."""
    tracker: tuple | None = None     # (host, port)
    key: str | None = None
    host: str | None = None
    port: int = 9090
    timeout: float = 60.0

    def describe(self) -> str:
        if self.tracker:
            return f"RPC tracker {self.tracker[0]}:{self.tracker[1]} key {self.key}"
        return f"RPC server {self.host}:{self.port}"


def _direct_session(host, port, timeout, _rpc_config):
    from tvm import rpc
    return rpc.connect(host, int(port), session_timeout=timeout)


def _runner(remote: RemoteSpec | None):
    from tvm.s_tir import meta_schedule as ms
    evaluator = ms.runner.EvaluatorConfig(number=3, repeat=RUN_REPEAT, min_repeat_ms=20, enable_cpu_cache_flush=False)
    if remote is None:
        return ms.runner.LocalRunner(timeout_sec=RUN_TIMEOUT, evaluator_config=evaluator,
                                     initializer=import_tensor_intrin)
    if remote.tracker is not None:
        cfg = ms.runner.RPCConfig(tracker_host=remote.tracker[0], tracker_port=int(remote.tracker[1]),
                                  tracker_key=remote.key, session_timeout_sec=int(remote.timeout))
        return ms.runner.RPCRunner(cfg, evaluator, max_workers=1, initializer=import_tensor_intrin)
    import functools
    # no tracker: f_create_session connects to the one server; the tracker fields only pass the
    # config's sanity check
    cfg = ms.runner.RPCConfig(tracker_host=remote.host, tracker_port=int(remote.port), tracker_key="direct",
                              session_timeout_sec=int(remote.timeout))
    return ms.runner.RPCRunner(cfg, evaluator, max_workers=1, initializer=import_tensor_intrin,
                               f_create_session=functools.partial(_direct_session, remote.host, remote.port,
                                                                  remote.timeout))


def _builder(cross_cc):
    from tvm.s_tir import meta_schedule as ms
    if cross_cc is None:
        return ms.builder.LocalBuilder(max_workers=1, timeout_sec=BUILD_TIMEOUT, initializer=import_tensor_intrin,
                                       f_build=_build_lowered)
    import functools
    return ms.builder.LocalBuilder(max_workers=1, timeout_sec=BUILD_TIMEOUT, initializer=import_tensor_intrin,
                                   f_build=_build_lowered, f_export=functools.partial(_export_cross, cross_cc))


def _build_lowered(mod, target, params):
    """MetaSchedule's default build of a candidate, lowered as the model build lowers it
    (:func:`tvm_qpu.cpu_schedule.lowering_context`), so measured and shipped code are the same."""
    from tvm.s_tir.meta_schedule.builder.local_builder import default_build
    from . import cpu_schedule as cs
    with cs.lowering_context():
        return default_build(mod, target, params)


def _export_cross(cc, mod):
    import tempfile
    from tvm.support import cc as _cc
    path = os.path.join(tempfile.mkdtemp(prefix="tvm_qpu_tune_"), "tmp_func.so")
    mod.export_library(path, fcompile=_cc.cross_compiler(cc))
    return path


def _tuning_target(cpu_target_spec, arch: str, remote):
    """The CPU target with MetaSchedule's ``num-cores`` (of the machine that runs the code)."""
    import tvm
    from . import cpu_schedule as cs
    base = dict(cs.host_target(cpu_target_spec).export())
    if remote is None:
        import psutil
        cores = psutil.cpu_count(logical=False) or os.cpu_count() or 1
    else:
        cores = 4 if arch == "aarch64" else (os.cpu_count() or 1)   # the Pi 5: 4x Cortex-A76
    base["num-cores"] = int(cores)
    return tvm.target.Target(base)


class _Progress:
    """Lines on stdout: task i/n, its trials, its best time."""

    def __init__(self, out, names: list, want: int, records: RecordSet):
        self.out, self.names, self.want = out, names, want
        self.records, self.t0 = records, time.perf_counter()

    def say(self, text):
        print(text, file=self.out, flush=True)


def _make_callback(progress: _Progress, hashes: list, entries: dict, target):
    from tvm.ir.utils import derived_object
    from tvm.s_tir import meta_schedule as ms

    @derived_object
    class _Record(ms.measure_callback.PyMeasureCallback):
        def apply(self, task_scheduler, task_id, measure_candidates, builder_results, runner_results):
            if len(measure_candidates) == 0:       # a finished task polled again: nothing new
                return
            h = hashes[task_id]
            entry = entries[h]
            errors = []
            for cand, br, rr in zip(measure_candidates, builder_results, runner_results):
                entry["trials"] = entry.get("trials", 0) + 1
                err = br.error_msg or rr.error_msg
                secs = [float(s) for s in (rr.run_secs or [])] if err is None else []
                if err is not None or not secs:
                    entry["failed"] = entry.get("failed", 0) + 1
                    errors.append((err or "no time").strip().splitlines()[-1][:160])
                    continue
                mean = run_seconds(secs)
                if entry.get("seconds") is None or mean < entry["seconds"]:
                    wl = ms.database.Workload(cand.sch.mod)
                    rec = ms.database.TuningRecord(cand.sch.trace, wl, [float(s) for s in secs], target,
                                                   cand.args_info)
                    entry["best"], entry["seconds"] = rec.as_json(), mean
            progress.records.save()
            i = progress.names.index(h) + 1
            best = "no valid measurement yet" if entry.get("seconds") is None else \
                f"best {entry['seconds'] * 1e6:.1f} us"
            fail = f", {entry.get('failed', 0)} failed" if entry.get("failed") else ""
            progress.say(f"task {i}/{len(progress.names)} {entry['task']}: {entry['trials']}/{progress.want} "
                         f"trials{fail}, {best} ({time.perf_counter() - progress.t0:.0f} s)")
            if errors and entry.get("seconds") is None:
                progress.say(f"  last failure: {errors[-1]}")

    return _Record()


def tune(model_path, output, target: str = "qpu", trials: int = DEFAULT_TRIALS, target_host=None,
         input_shapes=None, placement: str = "cost", remote: RemoteSpec | None = None, out=None,
         seed: int = 0, cost_model: str | None = None, only_tasks=None, qpu_measure: str | None = None,
         qpu_device="auto") -> RecordSet:
    """Tune the CPU part of ``model_path``'s build; write/continue the records file ``output``.

    ``cost_model``: "xgb" | "random" | None (xgb when xgboost is installed: :func:`resolve_cost_model`).
    ``only_tasks``: task names (as the progress lines print them) to tune; the others are left
    out of the records (their functions keep the default schedules).
    ``qpu_measure`` (``--target qpu`` only): "yes" first times every QPU-capable op's kernel on
    the measuring machine's QPU device (:func:`measure_qpu`; ``qpu_device`` when local), "only"
    does just that, "no" skips it, "auto" (the default) is "yes" over RPC or on a machine with a
    real GPU and "no" when it would be this machine's emulator (said on ``out``)."""
    out = out or sys.stdout
    from . import api
    if qpu_measure is None:
        qpu_measure = "auto" if target == "qpu" else "no"
    if qpu_measure not in QPU_MEASURE:
        raise TuningError(f"unknown --qpu-measure {qpu_measure!r}: choose one of {', '.join(QPU_MEASURE)}")
    if qpu_measure != "no" and target != "qpu":
        raise TuningError(f"--qpu-measure {qpu_measure} needs --target qpu (--target {target} has no QPU regions)")
    if qpu_measure == "auto":
        qpu_measure = "yes" if remote is not None else _auto_local(qpu_device, out)
    if qpu_measure != "only":
        check_environment()
    if trials < 1:
        raise TuningError(f"--trials must be at least 1, got {trials}")
    cost_model = resolve_cost_model(cost_model) if qpu_measure != "only" else None
    ident = build_identity(model_path, target, target_host, input_shapes)
    host, arch, cc = api.resolve_target_host(target_host)
    if arch != api._native_arch() and remote is None and qpu_measure != "only":
        raise TuningError(f"host code for {arch} cannot be measured on this {api._native_arch()} machine: "
                          "give the remote one (--rpc-tracker HOST:PORT --rpc-key KEY, or --hostname H --port P)")
    if os.path.exists(output):                      # resume: the same build only
        records = read_records(output)
        check_matches(records, ident, "this tuning run")
        records.path = os.fspath(output)
        resumed = True
    else:
        folder = os.path.dirname(os.path.abspath(output))
        if not os.path.isdir(folder):
            raise TuningError(f"-o {output}: no such folder {folder}")
        header = ident.header()
        header.update(model_file=os.path.basename(os.fspath(model_path)),
                      measured_on=remote.describe() if remote else f"this machine ({arch})",
                      placement=placement, tvm_qpu_tune=FORMAT)
        records = RecordSet(os.fspath(output), header)
        resumed = False
    if qpu_measure != "no":
        measure_qpu(model_path, records, input_shapes, remote, qpu_device, out)
        if qpu_measure == "only":
            records.save()
            return records
    wl = collect_workloads(model_path, target, target_host, input_shapes, placement)
    records.ops = {k: v for k, v in wl.ops.items()}
    hashes = sorted(wl.tasks, key=lambda h: (h not in wl.model, wl.tasks[h].name))
    if only_tasks:
        hashes = _select_tasks(wl.tasks, hashes, only_tasks)
    for h in hashes:
        records.workloads.setdefault(h, {"task": wl.tasks[h].name, "trials": 0, "best": None, "seconds": None})
    records.save()
    todo = [h for h in hashes if records.workloads[h]["trials"] < trials
            and records.workloads[h].get("searched_to", 0) < trials]
    no_default = [h for h in hashes if "default_seconds" not in records.workloads[h]]
    print(f"tuning {len(hashes)} CPU task(s) of {model_path} (--target {target}, {ident.cpu_target}, "
          f"{trials} trials each, measured on {records.measured_where()}, cost model {cost_model})"
          + (f"; resuming {output}: {len(hashes) - len(todo)} task(s) done" if resumed else ""),
          file=out, flush=True)
    if not todo and not no_default:
        return records
    import_tensor_intrin()
    from tvm.s_tir import meta_schedule as ms
    from . import cpu_schedule as cs
    tgt = _tuning_target(host, arch, remote)
    builder, runner = _builder(cc), _runner(remote)
    if no_default:
        def keep(h, got):                   # the others are tried again by the next run
            records.workloads[h].update(got)
            records.save()
        _measure_defaults(wl.tasks, no_default, cs.host_target(host), tgt, builder, runner, out, keep)
    if not todo:
        return records
    work_dir = f"{os.fspath(output)}.work"
    os.makedirs(work_dir, exist_ok=True)
    database = ms.database.MemoryDatabase()
    contexts, weights = [], []
    import logging
    # MetaSchedule's console handler takes the level its logger has now: warnings only on the
    # terminal (our progress lines say the rest); its full INFO logs go to {work_dir}/logs
    logging.getLogger("tvm.s_tir.meta_schedule").setLevel(logging.WARNING)
    loggers = ms.logging.get_loggers_from_work_dir(work_dir, [wl.tasks[h].name for h in todo])
    for h, logger in zip(todo, loggers):
        task = wl.tasks[h]
        # MetaSchedule's RewriteLayout would repack the constant weights of LAYOUT_FREE buffers
        # too, but TVM 0.27 cannot write such a record as JSON (TuningRecord.as_json: "Not supported
        # type: IndexMap"): its candidates keep the weights' layout (the default schedule packs them)
        mod = _task_module(task.func.without_attr(cs.LAYOUT_FREE))
        entry = records.workloads[h]
        if entry.get("best") is not None:          # resume: seed the search with the best so far
            try:
                wl_ = database.commit_workload(mod)
                database.commit_tuning_record(ms.database.TuningRecord.from_json(entry["best"], wl_))
            except Exception:
                pass
        contexts.append(ms.TuneContext(mod=mod, target=tgt, space_generator="post-order-apply",
                                       search_strategy=_strategy(trials), task_name=task.name,
                                       logger=logger, rand_state=seed, num_threads=1).clone())
        weights.append(float(max(task.weight, 1)))
    left = sum(trials - records.workloads[h]["trials"] for h in todo)
    progress = _Progress(out, hashes, trials, records)
    callbacks = ms.measure_callback.MeasureCallback.create("default") + [_make_callback(progress, todo, records.workloads, tgt)]
    with _sigint_seen() as seen:
        try:
            ms.tune_tasks(tasks=contexts, task_weights=weights, work_dir=work_dir, max_trials_global=left,
                          max_trials_per_task=max(trials - min(records.workloads[h]["trials"] for h in todo), 1),
                          num_trials_per_iter=min(trials, 16), builder=builder, runner=runner, database=database,
                          cost_model=_make_cost_model(cost_model, left), measure_callbacks=callbacks)
        except Exception as e:
            if seen:        # Ctrl-C inside MetaSchedule's native loop arrives as a bare RuntimeError
                raise KeyboardInterrupt(f"tuning interrupted; {output} keeps every measured batch") from e
            raise
    for h in todo:        # the search ended normally: a task short of trials has no new candidates
        records.workloads[h]["searched_to"] = trials
    records.save()
    bad = [records.workloads[h]["task"] for h in hashes if records.workloads[h].get("seconds") is None]
    print(f"wrote {output}: {len(hashes) - len(bad)}/{len(hashes)} task(s) with a measured schedule"
          + (f"; none measured for {', '.join(bad)} (the default schedules serve them)" if bad else ""),
          file=out, flush=True)
    return records


#: XGBModel predicts at random until it has this many measured samples (MetaSchedule's default 100);
#: scaled down to the run's budget (a quarter of its trials, at least this floor), so that a small
#: run leaves the warm-up at all
XGB_WARMUP = (100, 16)


def _make_cost_model(name: str, total_trials: int):
    """MetaSchedule's cost model ``name`` for a run measuring ``total_trials`` candidates: "xgb" is
    its XGBModel (MetaSchedule's defaults: per-store features, adaptive training) with the warm-up
    of :data:`XGB_WARMUP`."""
    if name != "xgb":
        return name
    from tvm.s_tir import meta_schedule as ms
    most, least = XGB_WARMUP
    return ms.cost_model.XGBModel(num_warmup_samples=min(most, max(least, total_trials // 4)))


@contextlib.contextmanager
def _sigint_seen():
    """A list that gets an entry when SIGINT arrives within the block (the previous handler still
    runs): the FFI turns the KeyboardInterrupt raised inside MetaSchedule's callbacks into a plain
    ``RuntimeError``, so :func:`tune` needs to know it was an interrupt."""
    import signal
    import threading
    seen: list = []
    if threading.current_thread() is not threading.main_thread():
        yield seen
        return
    previous = signal.getsignal(signal.SIGINT)

    def handler(signum, frame):
        seen.append(signum)
        if callable(previous):
            previous(signum, frame)
        elif previous != signal.SIG_IGN:
            raise KeyboardInterrupt

    signal.signal(signal.SIGINT, handler)
    try:
        yield seen
    finally:
        signal.signal(signal.SIGINT, previous)


def _select_tasks(tasks: dict, hashes: list, names) -> list:
    """The hashes of the tasks named in ``names`` (in ``hashes`` order); an unknown name is a
    :class:`TuningError` listing the task names."""
    names = [n for n in names if n]
    known = {tasks[h].name for h in hashes}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise TuningError(f"no task named {', '.join(unknown)}; the tasks are: {', '.join(sorted(known))}")
    return [h for h in hashes if tasks[h].name in names]


def _knobs_text(knobs: dict) -> str:
    """``k=v, ...`` of a TiledReduction knobs dict, sorted (progress lines, ``meta["cpu_schedules"]``)."""
    return ", ".join(f"{k}={v}" for k, v in sorted(knobs.items()))


def _rule_candidates(func, cpu_target) -> list:
    """[(knobs, scheduled function)] of ``func`` under :mod:`tvm_qpu.cpu_schedule`'s rules: the
    default knobs first (or ``func`` itself when no rule applies), then each variant of
    :func:`~tvm_qpu.cpu_schedule.knob_variants` that schedules it differently."""
    from . import cpu_schedule as cs
    out, seen = [], set()
    for knobs in cs.knob_variants():
        f, _ = cs.schedule_func(func, cpu_target, cs.default_rules(knobs))
        if f is None:
            if not out:
                out.append((knobs, func))
            continue
        key = f.script()
        if key not in seen:
            seen.add(key)
            out.append((knobs, f))
    return out


def _measure_defaults(tasks: dict, hashes: list, cpu_target, tgt, builder, runner, out, on_task=None) -> dict:
    """{hash: {"default_seconds": s[, "variant": knobs, "variant_seconds": s]}}: each task under
    :mod:`tvm_qpu.cpu_schedule`'s default schedule (what the build uses without a record) and under
    the rule's other knob settings (:func:`_rule_candidates`), built and measured like the
    candidates, one task at a time (a line each; ``on_task(hash, found)`` after each, so that an
    interrupted run keeps them); the fastest variant is kept where it still beats the default when
    both are timed again (:func:`_confirm`). A task
    whose default build or run fails is left out (its record, if any, is then used unconditionally)."""
    from tvm.s_tir import meta_schedule as ms
    from . import cpu_schedule as cs
    device = "cpu" if tgt.kind.name == "llvm" else tgt.kind.name
    found, errors = {}, []
    for n, h in enumerate(hashes, 1):
        cands = _rule_candidates(tasks[h].func, cpu_target)
        built = builder.build([ms.builder.BuilderInput(_task_module(f), tgt) for _, f in cands])
        errors += [b.error_msg for b in built if b.error_msg is not None]
        ok = [(c, b) for c, b in zip(cands, built) if b.error_msg is None]
        # the arguments of the function as built: without its weight-prepacking block (the build
        # runs that at compile time), a prepacked weight is an input in the packed layout
        runs = [(c[0], ms.runner.RunnerInput(b.artifact_path, device, ms.arg_info.ArgInfo.from_entry_func(
            _task_module(c[1]), remove_preproc=True))) for c, b in ok]
        got = _timed(runner, runs, errors)
        default = next((t for k, t in got if k == cs.KNOBS), None)
        if default is None:
            print(f"  default schedule {n}/{len(hashes)} {tasks[h].name}: not measured", file=out, flush=True)
            continue
        found[h] = {"default_seconds": default}
        knobs, best = min(got, key=lambda kt: kt[1])
        line = f"{default * 1e3:.4f} ms"
        if best < default:
            d2, v2 = _confirm(runner, [r for r in runs if r[0] in (cs.KNOBS, knobs)], knobs, errors)
            if d2 is not None:
                found[h]["default_seconds"] = d2
            line = f"{found[h]['default_seconds'] * 1e3:.4f} ms"
            if d2 is not None and v2 is not None and v2 < d2 * (1 - VARIANT_MARGIN):
                found[h].update(variant=knobs, variant_seconds=v2)
                line += f", rule variant {v2 * 1e3:.4f} ms ({_knobs_text(knobs)})"
            else:
                line += " (a variant's lead did not hold when timed again)"
        print(f"  default schedule {n}/{len(hashes)} {tasks[h].name}: {line} ({len(cands)} variant(s))",
              file=out, flush=True)
        if on_task is not None:
            on_task(h, found[h])
    last = f" (e.g. {errors[0].strip().splitlines()[-1][:200]})" if errors and len(found) < len(hashes) else ""
    better = sum("variant" in v for v in found.values())
    print(f"default schedules measured for {len(found)}/{len(hashes)} task(s); a rule variant beat the "
          f"default on {better}{last}", file=out, flush=True)
    return found


def _timed(runner, runs, errors) -> list:
    """[(knobs, seconds)] of ``runs`` ([(knobs, RunnerInput)]) timed by ``runner`` in order;
    failures go to ``errors``."""
    futures = runner.run([r for _, r in runs])
    got = []
    for (knobs, _), fut in zip(runs, futures):
        r = fut.result()
        secs = [float(x) for x in (r.run_secs or [])]
        if r.error_msg is None and secs:
            got.append((knobs, run_seconds(secs)))
        elif r.error_msg is not None:
            errors.append(r.error_msg)
    return got


def _confirm(runner, pair, knobs, errors) -> tuple:
    """(default seconds, variant seconds) timed again, alternated :data:`CONFIRM_ROUNDS` times:
    the fastest of up to 16 variants' timings is biased low (and the host drifts between them), so
    a variant's lead is judged on fresh timings of it beside the default only. None where either
    failed."""
    from . import cpu_schedule as cs
    again = _timed(runner, list(pair) * CONFIRM_ROUNDS, errors)
    d = [t for k, t in again if k == cs.KNOBS]
    v = [t for k, t in again if k == knobs]
    return (min(d) if d else None), (min(v) if v else None)


def _strategy(trials: int):
    """MetaSchedule's evolutionary search, its population scaled to the trial budget: the default
    (512 candidates, 4 generations per batch) costs minutes of search per task on a small host even
    for a handful of trials."""
    from tvm.s_tir import meta_schedule as ms
    population = min(max(4 * trials, 16), 512)
    return ms.search_strategy.EvolutionarySearch(
        population_size=population, init_min_unmeasured=min(50, max(population // 4, 4)),
        genetic_num_iters=4 if trials >= 64 else 1)


def _task_module(func):
    import tvm
    return tvm.IRModule({"main": func.with_attr("global_symbol", "main")})
