"""Python API of the qpu target: from_onnx, partition, build, load.

::

    mod, params = tvm_qpu.from_onnx("models/digits_cnn.onnx")
    part = tvm_qpu.partition(mod, params)               # inspectable Relax module
    print(tvm_qpu.partition_report(part).text())        # what goes where, and why
    lib = tvm_qpu.build(mod, params=params)             # target="qpu", placement="cost"
    lib.save("digits.tar")
    runner = tvm_qpu.load("digits.tar")                 # device="auto" | "emulator" | "v3d"
    out = runner.run(input=x)                           # {output name: numpy array}
    print(runner.profile().text())

The built executable also runs in a plain ``relax.VirtualMachine`` in the process that built it
(or after ``tvm_qpu.load``): QPU regions are ``call_dps_packed("tvm_qpu.run_plan", ...)`` calls,
served by :mod:`tvm_qpu.executor`.
"""
from __future__ import annotations

import json
import os
import platform
import shutil
import tempfile
import time
from dataclasses import dataclass, field

import numpy as np

from . import __version__
from .artifact import ArtifactError, check_plan, npy_bytes, read_artifact, safe_extract, write_artifact
from .backend import PartitionReport, QpuBackend, QpuError
from .executor import PlanExecutor, RegionInfo, default_executor, ensure_registered

TARGETS = ("qpu", "llvm")
REPORT_ATTR = "tvm_qpu.report"
OUTPUTS_ATTR = "tvm_qpu.output_names"

# target_host name -> (TVM target, machine arch the library runs on, C compiler for export or None)
PI5_TARGET = {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a76"}
PI5_CC = "aarch64-linux-gnu-gcc"


def _native_arch() -> str:
    m = platform.machine().lower()
    return {"arm64": "aarch64", "amd64": "x86_64"}.get(m, m)


def resolve_target_host(target_host):
    """(tvm target spec, arch, cross compiler or None) for ``None | "llvm" | "native" | "pi5" | dict``."""
    if target_host in (None, "llvm", "native"):
        return "llvm", _native_arch(), None
    if target_host == "pi5":
        cc = None if _native_arch() == "aarch64" else PI5_CC
        return dict(PI5_TARGET), "aarch64", cc
    if isinstance(target_host, dict):
        triple = str(target_host.get("mtriple", ""))
        arch = triple.split("-")[0] if triple else _native_arch()
        cc = None if arch == _native_arch() else f"{triple}-gcc"
        return dict(target_host), arch, cc
    raise QpuError(f"unknown target host {target_host!r}: use llvm (this machine) or pi5")


# ---------------------------------------------------------------------------------------------
# import

def _drop_failed_import(exc: BaseException) -> None:
    """Free the half-built importer an exception of TVM's ONNX frontend keeps alive through its
    traceback. TVM's ``BlockBuilder`` leaves its blocks open when a ``with bb.function`` body
    raises, and its C++ destructor then logs "BlockBuilder destroyed with remaining blocks!" to
    stderr, whenever the traceback happens to be freed (after our error message; in pytest,
    outside the capture). Freed here, with that one known message kept off stderr."""
    import gc
    import sys
    import traceback
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 2)
            traceback.clear_frames(exc.__traceback__)
            gc.collect()
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def from_onnx(path, input_shapes: dict | None = None):
    """Import an ONNX file. Returns (Relax IRModule, params: {name: tvm Tensor}).

    ``input_shapes`` ({input name: shape}) overrides the model's (e.g. for a batch size). 4-bit and
    2-bit (ONNX INT4 / UINT4 / INT2 / UINT2) initializers are unpacked to int8 / uint8 and block-wise
    DequantizeLinear is converted (:func:`tvm_qpu.onnx_quant.lower_lowbit`)."""
    import onnx
    path = os.fspath(path)
    if not os.path.exists(path):
        raise QpuError(f"{path}: no such file")
    if not os.path.isfile(path):
        raise QpuError(f"{path}: not a regular file")
    try:
        model = onnx.load(path)
        onnx.checker.check_model(model)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise QpuError(f"{path}: not a valid ONNX model ({first})") from None
    inits = {t.name for t in model.graph.initializer}
    names = [i.name for i in model.graph.input if i.name not in inits]
    shape_dict = None
    if input_shapes:
        unknown = sorted(set(input_shapes) - set(names))
        if unknown:
            raise QpuError(f"{path}: unknown input name(s) {unknown}; the model's inputs are {names}")
        shape_dict = {}
        for i in model.graph.input:
            if i.name in input_shapes:
                shape_dict[i.name] = [int(d) for d in input_shapes[i.name]]
            elif i.name in names:
                dims = [d.dim_value if d.HasField("dim_value") else None for d in i.type.tensor_type.shape.dim]
                if None in dims:
                    raise QpuError(f"{path}: input {i.name} has a dynamic shape; give it with input_shapes")
                shape_dict[i.name] = dims
    from tvm.relax.frontend import detach_params
    from tvm.relax.frontend.onnx import from_onnx as _from_onnx
    from .onnx_quant import LOWBIT_ATTR, QuantImportError, lower_lowbit, register as _register_quant_ops
    _register_quant_ops()        # QLinearConv, QLinearMatMul, ConvInteger, QGemm, ... (tvm_qpu.onnx_quant)
    try:
        model, lowbit = lower_lowbit(model)      # 4 / 2-bit initializers -> int8 / uint8, block-wise DQ
    except QuantImportError as e:
        raise QpuError(f"{path}: {e}") from None
    try:
        mod = _from_onnx(model, shape_dict=shape_dict, keep_params_in_input=True)
    except Exception as e:
        msg = f"{path}: TVM's ONNX frontend cannot import it ({type(e).__name__}: {e})"
        _drop_failed_import(e)
        raise QpuError(msg) from None
    mod, params = detach_params(mod)
    main_params = params.get("main", [])
    num_input = len(mod["main"].params) - len(main_params)
    weight_names = [p.name for p in mod["main"].params[num_input:]]
    outs = [o.name for o in model.graph.output]
    mod = mod.with_attr(OUTPUTS_ATTR, json.dumps(outs))
    if lowbit:                   # which weights were 4 / 2-bit, for the QDQ rewrite (tvm_qpu.quant)
        mod["main"] = mod["main"].with_attr(LOWBIT_ATTR, lowbit.to_json())
    return mod, dict(zip(weight_names, main_params))


# ---------------------------------------------------------------------------------------------
# partition

def _check_params(mod, params):
    main = mod["main"]
    attrs = main.attrs
    num_input = int(attrs["num_input"]) if attrs is not None and "num_input" in attrs else len(main.params)
    extra = [p.name for p in main.params[num_input:]]
    missing = [n for n in extra if not params or n not in params]
    if missing:
        raise QpuError(f"main takes weight parameters {missing[:4]}{'...' if len(missing) > 4 else ''}: pass "
                       f"params= (from tvm_qpu.from_onnx)")
    if params:
        unknown = sorted(set(params) - set(extra))
        if unknown:
            raise QpuError(f"params {unknown[:4]} are not parameters of main")
    return {k: params[k] for k in extra} if params else None


def _partition(mod, params, placement, registry=None, split=False):
    params = _check_params(mod, params)
    backend = QpuBackend(placement, registry=registry, split=split)
    part, report = backend.partition(mod, params)
    return backend, part.with_attr(REPORT_ATTR, report.to_json()), report


def _num_input(mod):
    a = mod["main"].attrs
    return int(a["num_input"]) if a is not None and "num_input" in a else None


def partition(mod, params=None, placement: str = "cost", split: bool = False):
    """Partition ``mod`` for the QPU. Returns the Relax module (``Codegen="qpu"`` functions, each
    calling one ``Composite="qpu.<pattern>"``), with the report in its ``tvm_qpu.report`` attr
    (:func:`partition_report`). ``split``: see :func:`build`."""
    return _partition(mod, params, placement, split=split)[1]


def partition_report(mod) -> PartitionReport:
    s = mod.attrs[REPORT_ATTR] if mod.attrs is not None and REPORT_ATTR in mod.attrs else None
    if s is None:
        raise QpuError("module has no partition report (use tvm_qpu.partition)")
    return PartitionReport.from_json(str(s))


# ---------------------------------------------------------------------------------------------
# build

def _io_info(mod):
    main = mod["main"]
    n = _num_input(mod) or len(main.params)
    from .patterns import dtype_of
    inputs = [{"name": p.name, "shape": _dims(p.ty.shape), "dtype": dtype_of(p)} for p in main.params[:n]]
    names = None
    if mod.attrs is not None and OUTPUTS_ATTR in mod.attrs:
        names = json.loads(str(mod.attrs[OUTPUTS_ATTR]))
    ret = main.ret_ty
    fields = list(ret.fields) if hasattr(ret, "fields") else [ret]
    outputs = []
    for i, t in enumerate(fields):
        nm = names[i] if names and i < len(names) else f"output_{i}"
        outputs.append({"name": nm, "shape": _dims(t.shape), "dtype": str(t.dtype)})
    return inputs, outputs


def _dims(shape):
    """Static dims as ints, symbolic ones (dynamic batch) as None; None if the rank is unknown."""
    if shape is None or not hasattr(shape, "values"):
        return None
    out = []
    for v in shape.values:
        try:
            out.append(int(v))
        except TypeError:
            out.append(None)
    return out


@dataclass
class CompiledModule:
    """The result of :func:`build`: a Relax VM executable plus the QPU plans it calls."""
    executable: object
    regions: list
    report: PartitionReport
    meta: dict
    cross_cc: str | None = None
    relax_module: object = None

    def save(self, path, sign_key=None) -> str:
        """Export to one artifact file (see :mod:`tvm_qpu.artifact`). Returns the path.
        ``sign_key``: an Ed25519 private key (file, PEM bytes or key object) to sign it with."""
        files = {}
        with tempfile.TemporaryDirectory(prefix="tvm_qpu_export_") as tmp:
            lib = os.path.join(tmp, "lib.so")
            if self.cross_cc is not None:
                if shutil.which(self.cross_cc) is None:
                    raise QpuError(f"exporting for {self.meta['host_arch']} needs the cross compiler {self.cross_cc} "
                                   f"(Debian: apt-get install gcc-aarch64-linux-gnu)")
                import tvm
                self.executable.export_library(lib, fcompile=tvm.support.cc.cross_compiler(self.cross_cc))
            else:
                self.executable.export_library(lib)
            with open(lib, "rb") as f:
                files["lib.so"] = f.read()
        regions = []
        for r in self.regions:
            files[f"plans/{r.key}.json"] = json.dumps(r.plan.to_json()).encode()
            consts = {}
            for name, arr in r.plan.constants.items():
                member = f"plans/{r.key}/{name}.npy"
                arr = np.asarray(arr)
                files[member] = npy_bytes(arr)
                consts[name] = {"member": member, "shape": list(arr.shape), "dtype": str(arr.dtype)}
            regions.append({"info": r.info.as_dict(), "plan": f"plans/{r.key}.json", "constants": consts})
        meta = dict(self.meta, regions=regions, report=self.report.as_dict())
        files["model.json"] = json.dumps(meta, indent=1).encode()
        write_artifact(path, files, sign_key=sign_key)
        return os.fspath(path)

    def runner(self, device="auto") -> "Runner":
        """Run in this process (host code must be for this machine)."""
        if self.cross_cc is not None or self.meta["host_arch"] != _native_arch():
            raise QpuError(f"module was built for {self.meta['host_arch']}; save it and run it there")
        from tvm import relax
        import tvm
        ex = PlanExecutor(device)
        for r in self.regions:
            ex.add(r.plan, r.info)
        make_vm = lambda: relax.VirtualMachine(self.executable, tvm.cpu())     # noqa: E731
        return Runner(make_vm(), self.meta, ex, vm_factory=make_vm)


def build(mod, target: str = "qpu", target_host=None, placement: str = "cost", params=None,
          registry=None, cpu_schedule: bool = True, split: bool = False,
          async_regions: bool = True, tuning_records=None) -> CompiledModule:
    """Compile ``mod`` for the QPU (``target="qpu"``) or the CPU only (``target="llvm"``).

    ``async_regions`` (default): each QPU region is submitted and waited for at the first use of
    its result, so CPU ops that do not need it run meanwhile (:mod:`tvm_qpu.async_regions`);
    ``False`` keeps one blocking ``tvm_qpu.run_plan`` call per region (the synchronous path).

    The CPU part gets :mod:`tvm_qpu.cpu_schedule`'s default schedules (tiled, vectorized at the
    target's SIMD width, parallel on TVM's thread pool); ``cpu_schedule=False`` keeps TVM's plain
    default pipeline (naive loops), for comparison.

    ``split=True`` (with ``placement="cost"``) plans the whole model for the CPU and the QPU
    working at once (:mod:`tvm_qpu.coexec`): per conv / matmul CPU, QPU, or a split of its output
    channels / rows between both (:mod:`tvm_qpu.split`), minimising the modelled latency with
    asynchronous QPU regions (``async_regions``; with blocking regions the two parts of a split
    run one after the other). Off by default for compile time (a few extra kernel estimates per
    conv / matmul). Results equal the unsplit build's.

    ``tuning_records``: a :class:`tvm_qpu.tune.RecordSet` (``tvm_qpu.tune.load_records``, which
    checks it is for this model): its schedules replace the default ones where they apply, and
    placement prices the ops it measured by their measured time."""
    if target not in TARGETS:
        raise QpuError(f"unknown target {target!r}: choose one of {', '.join(TARGETS)}")
    host, arch, cc = resolve_target_host(target_host)
    if cc is not None and shutil.which(cc) is None:
        raise QpuError(f"target_host={target_host!r} needs the cross compiler {cc} to export "
                       f"(Debian: apt-get install gcc-aarch64-linux-gnu)")
    if tuning_records is not None:
        from . import tune as _tune
        if not cpu_schedule:
            raise QpuError("tuning_records need the scheduled pipeline (cpu_schedule=True)")
        from . import cpu_schedule as _cs
        _tune.check_matches(tuning_records, _tune.BuildIdentity(
            target, str(_cs.host_target(host)), arch, tuning_records.header["model_sha256"],
            tuning_records.header["input_shapes"]))
        with _tune.measured_cpu(tuning_records):
            return _build(mod, target, host, arch, cc, placement, params, registry, cpu_schedule, tuning_records,
                          split, async_regions)
    return _build(mod, target, host, arch, cc, placement, params, registry, cpu_schedule, None, split,
                  async_regions)


def _build(mod, target, host, arch, cc, placement, params, registry, cpu_schedule, records, split,
           async_regions):
    import tvm
    t0 = time.perf_counter()
    backend, part, report = _partition(mod, params, "none" if target == "llvm" else placement, registry,
                                       split=split and target != "llvm")
    t1 = time.perf_counter()
    lowered, regions = backend.codegen(part)
    if async_regions and regions:
        from .async_regions import make_async
        lowered = make_async(lowered)
    t2 = time.perf_counter()
    rules: dict = {}
    tuning_failures: list = []
    try:
        tgt = tvm.target.Target(host)
        if cpu_schedule:
            from . import cpu_schedule as cs
            tgt = cs.host_target(host)      # this machine: its own CPU name, so LLVM uses AVX2/NEON
            pre = ()
            if records is not None:
                from .tune import apply_pass
                pre = (apply_pass(records, tgt, rules, tuning_failures),)
            with cs.lowering_context():
                ex = tvm.compile(lowered, target=tgt, relax_pipeline=cs.relax_pipeline(tgt, stats=rules,
                                                                                         pre_schedule=pre))
        else:
            ex = tvm.compile(lowered, target=tgt)
    except Exception as e:
        raise QpuError(f"TVM could not compile the host code for {host}: {type(e).__name__}: {e}") from None
    t3 = time.perf_counter()
    ensure_registered()
    dflt = default_executor()
    for r in regions:
        dflt.add(r.plan, r.info)
    inputs, outputs = _io_info(part)
    meta = {"tvm_qpu_version": __version__, "tvm_version": tvm.__version__, "target": target,
            "target_host": host if isinstance(host, str) else json.dumps(host, sort_keys=True),
            "host_arch": arch, "placement": report.placement, "inputs": inputs, "outputs": outputs,
            "compile_seconds": {"partition": t1 - t0, "qpu_codegen": t2 - t1, "host_compile": t3 - t2},
            "cpu_target": str(tgt), "cpu_schedules": rules, "async_regions": bool(async_regions and regions)}
    if records is not None:
        meta["tuning_records"] = {"file": os.path.basename(records.path), "measured_on": records.measured_where(),
                                  "applied": sum(1 for r in rules.values() if r.startswith("tuned")),
                                  "fell_back": tuning_failures}
    from .safety import index_checks
    meta["index_checks"] = index_checks(mod)
    return CompiledModule(ex, regions, report, meta, cc, lowered)


# ---------------------------------------------------------------------------------------------
# load and run

#: how Profile labels the figures for each device kind: what the QPU time is, how it is obtained,
#: what the wall time includes, and what a region's host wall time waits for
QPU_TIME_LABELS = {
    "emulator": {"qpu": "modelled", "how": "Pi 5 QPU time from the emulator's cycle model",
                 "wall": "with the QPU regions emulated, so not a Pi 5 figure", "wait": "emulation"},
    "v3d": {"qpu": "measured", "how": "V3D job time measured on the Pi 5's GPU",
            "wall": "QPU regions on its GPU", "wait": "waiting for the GPU"},
    "": {"qpu": "modelled or measured", "how": "the device's reported time", "wall": "QPU device not reported",
         "wait": "the device"},
}
PROFILE_COLUMNS = (
    "columns: QPU {qpu} = {how}, per inference; host wall = wall time on the host inside the region "
    "(input/output copies, dispatch, {wait}); est. QPU / est. CPU = the placement cost model's "
    "compile-time predictions for the region on the Pi 5 QPU / Pi 5 CPU (tvmc partition --explain)")
#: Runner.profile(repeat=None) picks at most this many timed runs, fewer when one run is slow
AUTO_REPEAT, AUTO_REPEAT_SECONDS = 10, 10.0


@dataclass
class Profile:
    runs: int
    total_seconds: float                    # wall time per inference
    regions: list = field(default_factory=list)
    device: str = ""                        # the QPU device kind ("emulator", "v3d"; "" if unknown)
    host: str = ""                          # the machine the wall times were measured on (arch)
    overlap: dict | None = None             # CPU/QPU overlap of the timed runs (Runner.overlap)

    @property
    def qpu_seconds(self) -> float:
        """QPU time per inference: modelled on the emulator, measured on v3d."""
        return sum(r["qpu_seconds"] for r in self.regions)

    def _labels(self) -> dict:
        if self.device in QPU_TIME_LABELS:
            return QPU_TIME_LABELS[self.device]
        return dict(QPU_TIME_LABELS[""], wall=f"QPU regions on device {self.device}")

    def qpu_label(self) -> str:
        """"modelled" (emulator), "measured" (v3d) or "modelled or measured" (unknown device)."""
        return self._labels()["qpu"]

    def wall_label(self) -> str:
        host = f"the {self.host} host that ran it" if self.host else "the host that ran it"
        if not self.regions:
            return f"measured on {host}"
        return f"measured on {host}; {self._labels()['wall']}"

    @property
    def qpu_host_seconds(self) -> float:
        return sum(r["host_seconds"] for r in self.regions)

    @property
    def cpu_seconds(self) -> float:
        """Wall time per inference outside QPU regions (CPU ops + VM)."""
        return max(self.total_seconds - self.qpu_host_seconds, 0.0)

    def as_dict(self) -> dict:
        return {"runs": self.runs, "total_seconds": self.total_seconds, "cpu_seconds": self.cpu_seconds,
                "regions": self.regions, "device": self.device, "host": self.host, "overlap": self.overlap}

    def text(self) -> str:
        """The profile as a labelled table (which figures are measured, which modelled)."""
        lab = self._labels()
        qpu, how = lab["qpu"], lab["how"]
        lines = [f"per inference (mean of {self.runs}), {len(self.regions)} QPU region(s)"
                 + (f" on device {self.device}:" if self.device and self.regions else ":"),
                 f"  wall time        {self.total_seconds * 1e6:12.1f} us  {self.wall_label()}",
                 f"  CPU part         {self.cpu_seconds * 1e6:12.1f} us  measured: wall time outside the QPU "
                 f"regions (llvm ops + Relax VM)"]
        if self.regions:
            lines.append(f"  QPU time, {qpu:9s}{self.qpu_seconds * 1e6:9.1f} us  {how}")
            lines.append(f"  {'region':26s} {'kind':18s} {'QPU ' + qpu:>14s} {'host wall':>12s} "
                         f"{'est. QPU':>10s} {'est. CPU':>10s}")
        for r in self.regions:
            lines.append(f"  {r['name']:26s} {r['kind']:18s} {r['qpu_seconds'] * 1e6:12.1f}us "
                         f"{r['host_seconds'] * 1e6:10.1f}us {_fmt_us(r['qpu_estimate']):>10s} "
                         f"{_fmt_us(r['cpu_estimate']):>10s}")
        if self.regions:
            lines.append("  " + PROFILE_COLUMNS.format(qpu=qpu, how=how, wait=lab["wait"]))
        if self.regions and self.overlap:
            lines += overlap_lines(self.overlap)
        return "\n".join(lines)


def overlap_lines(o: dict) -> list:
    """Text lines for an overlap summary (:meth:`Runner.overlap`)."""
    us = lambda k: f"{o[k] * 1e6:.1f} us"        # noqa: E731
    return [f"  CPU/QPU overlap ({o['timeline']} timeline: {o['how']}):",
            f"    CPU busy {us('cpu_busy_seconds')}, QPU busy {us('qpu_busy_seconds')} per inference",
            f"    latency: sequential offload {us('sync_makespan_seconds')} -> asynchronous regions "
            f"{us('makespan_seconds')}",
            f"    QPU time hidden behind CPU work: {us('hidden_qpu_seconds')} "
            f"({100 * o['hidden_fraction']:.0f}% of the QPU busy time)"]


def auto_repeat(one_run_seconds: float) -> int:
    """Timed runs for Runner.profile(repeat=None), from the warm-up run's wall time."""
    if one_run_seconds <= 0:
        return AUTO_REPEAT
    return int(max(1, min(AUTO_REPEAT, AUTO_REPEAT_SECONDS // one_run_seconds)))


def _fmt_us(s):
    return "-" if s is None else f"{s * 1e6:.1f}us"


class Runner:
    """A loaded model: ``run(**inputs)`` -> {output name: numpy array}; ``profile()``."""

    def __init__(self, vm, meta: dict, executor: PlanExecutor, tmpdir=None, vm_factory=None):
        self.vm, self.meta, self.executor, self._tmpdir = vm, meta, executor, tmpdir
        self.inputs = meta["inputs"]
        self.outputs = meta["outputs"]
        self._vm_factory = vm_factory       # another VM on the same executable (threaded streams)
        self.last_traces: list = []         # timeline.Trace of the last run / stream, per inference
        self.last_depth = 1

    def _args(self, inputs: dict):
        import tvm
        names = [i["name"] for i in self.inputs]
        unknown = sorted(set(inputs) - set(names))
        if unknown:
            raise QpuError(f"unknown input(s) {unknown}; the model takes {names}")
        args = []
        for i in self.inputs:
            if i["name"] not in inputs:
                raise QpuError(f"input {i['name']!r} missing (expected {i['dtype']}{i['shape']})")
            a = np.asarray(inputs[i["name"]])
            want = i["shape"]
            if want is not None and (a.ndim != len(want) or any(w is not None and w != g for w, g in zip(want, a.shape))):
                raise QpuError(f"input {i['name']!r}: shape {list(a.shape)} given, {i['shape']} expected")
            if a.dtype != np.dtype(i["dtype"]):
                if np.can_cast(a.dtype, i["dtype"], casting="same_kind") and a.dtype.kind == np.dtype(i["dtype"]).kind:
                    a = a.astype(i["dtype"])
                else:
                    raise QpuError(f"input {i['name']!r}: dtype {a.dtype} given, {i['dtype']} expected")
            # np.ascontiguousarray would turn a 0-d input (a Gemm scalar bias) into shape (1,)
            args.append(tvm.runtime.tensor(a if a.flags.c_contiguous else np.array(a, order="C")))
        from .safety import check_inputs            # out-of-range gather indices would crash the VM
        check_inputs(self.meta.get("index_checks"), inputs)
        return args

    def _open_device(self):
        """Open the QPU device now (if the model has QPU regions), so that a missing device is
        reported as itself rather than from inside the VM."""
        if self.executor.plans:
            self.executor.device

    def run(self, **inputs) -> dict:
        self._open_device()
        out, trace = self._run_recorded(self.vm, self._args(inputs))
        self.last_traces, self.last_depth = [trace], 1
        return out

    def _run_recorded(self, vm, args):
        """One inference on ``vm``, with its timeline trace."""
        from . import timeline
        with self.executor.active(), timeline.recording() as rec:
            out = vm["main"](*args)
        outs = [out] if hasattr(out, "numpy") else list(out)
        return {o["name"]: t.numpy() for o, t in zip(self.outputs, outs)}, rec.trace

    # -- timelines, traces, streams ------------------------------------------------------------
    def timeline_kind(self) -> str:
        """"measured" when QPU regions ran on a real GPU beside the CPU (or there are none),
        "modelled" on the emulator (virtual clock, tvm_qpu.timeline)."""
        if not self.executor.plans:
            return "measured"
        return "measured" if self.executor.device_kind == "v3d" else "modelled"

    def timeline(self, sync: bool = False):
        """The :class:`tvm_qpu.timeline.Timeline` of the last run or stream; ``sync=True``: the
        same inferences replayed as sequential offload (each wait right after its submit)."""
        from . import timeline as T
        if not self.last_traces:
            raise QpuError("no run recorded yet: call run() or run_stream() first")
        traces = [T.as_sync(t) for t in self.last_traces] if sync else self.last_traces
        if self.timeline_kind() == "measured" and not sync:
            return T.measured(traces)
        return T.schedule(traces, 1 if sync else self.last_depth)

    def _timeline_how(self) -> str:
        host = self.meta.get("host_arch", "") or "this"
        cpu = f"CPU times measured on the {host} host (not a Pi 5 unless it is one)"
        if self.timeline_kind() == "measured":
            return f"{cpu}; QPU times measured on the device"
        return f"{cpu}; QPU times from the emulator's Pi 5 cycle model; virtual clock"

    def overlap(self) -> dict:
        """CPU/QPU overlap of the last run or stream: busy times, makespan asynchronous vs
        sequential offload, QPU time hidden behind CPU work (per inference for a single run)."""
        t = self.timeline()
        d = t.summary(self.timeline(sync=True))
        d["how"] = self._timeline_how()
        d["depth"] = self.last_depth
        return d

    def trace(self, path) -> str:
        """Write the last run's or stream's timeline as a Chrome / Perfetto trace (JSON)."""
        from . import timeline as T
        t = self.timeline()
        meta = {"how": self._timeline_how(), "qpu_device": self.executor.device_kind,
                "depth": self.last_depth, "async_regions": self.meta.get("async_regions", False),
                "sync_makespan_us": self.timeline(sync=True).makespan * 1e6,
                "makespan_us": t.makespan * 1e6}
        return T.write_chrome_trace(path, t, meta)

    def run_stream(self, inputs, depth: int = 2):
        """Run a stream of inferences (``inputs``: an iterable of {input name: array}); yields the
        outputs in order, with at most ``depth`` inferences in flight (bounded memory).

        On a real GPU (QPU worker thread) up to ``depth`` inferences run in threads, each on its
        own VM, so one inference's QPU regions overlap another's CPU ops (measured). On the
        emulator the inferences run one after another and the virtual timeline schedules them
        ``depth`` deep (modelled): see :meth:`overlap`, :meth:`timeline`, :meth:`trace`."""
        if not isinstance(depth, (int, np.integer)) or depth < 1:
            raise QpuError(f"depth must be a positive integer, got {depth!r}")
        self._open_device()
        traces = []
        self.last_traces, self.last_depth = traces, int(depth)
        if self.executor.plans and self.executor.use_worker() and depth > 1:
            yield from self._stream_threaded(inputs, int(depth), traces)
            return
        for x in inputs:
            out, trace = self._run_recorded(self.vm, self._args(self._stream_item(x)))
            traces.append(trace)
            yield out

    @staticmethod
    def _stream_item(x) -> dict:
        if not isinstance(x, dict):
            raise QpuError(f"run_stream: each item must be a dict of named inputs, got {type(x).__name__}")
        return x

    def _stream_threaded(self, inputs, depth, traces):
        import collections
        import threading
        from concurrent.futures import ThreadPoolExecutor
        if self._vm_factory is None:
            raise QpuError("this Runner cannot make more VMs for a threaded stream (no vm_factory)")
        local = threading.local()

        def one(args):
            vm = getattr(local, "vm", None)
            if vm is None:
                vm = local.vm = self._vm_factory()
            return self._run_recorded(vm, args)

        pending = collections.deque()
        with ThreadPoolExecutor(depth, thread_name_prefix="tvm_qpu stream") as pool:
            try:
                for x in inputs:
                    pending.append(pool.submit(one, self._args(self._stream_item(x))))
                    if len(pending) >= depth:
                        out, tr = pending.popleft().result()
                        traces.append(tr)
                        yield out
                while pending:
                    out, tr = pending.popleft().result()
                    traces.append(tr)
                    yield out
            except BaseException:
                for f in pending:
                    f.cancel()
                if self.executor.plans:
                    self.executor.device.interrupt()
                    self.executor.interrupted = True
                raise

    def fill_inputs(self, mode: str = "random", seed: int = 0) -> dict:
        rng = np.random.default_rng(seed)
        res = {}
        for i in self.inputs:
            shape, dt = [1 if d is None else d for d in (i["shape"] or [])], np.dtype(i["dtype"])
            if mode == "zeros":
                res[i["name"]] = np.zeros(shape, dt)
            elif mode == "ones":
                res[i["name"]] = np.ones(shape, dt)
            elif mode == "random":
                if dt.kind == "f":
                    res[i["name"]] = rng.random(shape).astype(dt)
                else:
                    info = np.iinfo(dt)
                    res[i["name"]] = rng.integers(max(info.min, -128), min(info.max, 127) + 1, shape).astype(dt)
            else:
                raise QpuError(f"unknown fill mode {mode!r}: use random, zeros or ones")
        return res

    def profile(self, inputs: dict | None = None, repeat: int | None = None) -> Profile:
        """Per-region QPU time (modelled on the emulator, measured on v3d) and host wall time,
        averaged over ``repeat`` runs after one warm-up run. ``repeat=None``: AUTO_REPEAT runs, or
        fewer so that they take about AUTO_REPEAT_SECONDS (at least one; emulated runs are slow)."""
        if repeat is not None and (not isinstance(repeat, (int, np.integer)) or repeat < 1):
            raise QpuError(f"repeat must be a positive integer, got {repeat!r}")
        from .progress import current
        status = current()
        args = self._args(inputs if inputs is not None else self.fill_inputs())
        from . import timeline
        f = self.vm["main"]
        self._open_device()
        traces = []
        with self.executor.active():
            status.phase = "warm-up run"
            t0 = time.perf_counter()
            f(*args)                                      # warm up: residency, caches
            if repeat is None:
                repeat = auto_repeat(time.perf_counter() - t0)
            self.executor.reset_stats()
            t0 = time.perf_counter()
            for i in range(repeat):
                status.phase = f"timed run {i + 1}/{repeat}"
                with timeline.recording() as rec:
                    f(*args)
                traces.append(rec.trace)
            total = (time.perf_counter() - t0) / repeat
            status.phase = ""
        regions = []
        for key, info in self.executor.info.items():
            st = self.executor.stats[key]
            n = max(st.calls, 1)
            regions.append({"key": key, "name": info.name, "kind": info.kind, "description": info.description,
                            "calls_per_run": st.calls / repeat, "qpu_seconds": st.qpu_seconds / repeat,
                            "host_seconds": st.host_seconds / repeat, "cycles_per_call": st.cycles / n,
                            "qpu_estimate": info.qpu_estimate, "cpu_estimate": info.cpu_estimate})
        overlap = None
        if regions:
            runs = []
            for tr in traces:
                self.last_traces, self.last_depth = [tr], 1
                runs.append(self.overlap())
            overlap = dict(runs[-1])
            for k, v in runs[-1].items():
                if isinstance(v, float):
                    overlap[k] = sum(r[k] for r in runs) / len(runs)    # mean over the timed runs
        return Profile(repeat, total, regions, device=self.executor.device_kind if regions else "",
                       host=str(self.meta.get("host_arch", "")), overlap=overlap)

    def close(self):
        self.executor.close()
        if self._tmpdir is not None:
            self._tmpdir.cleanup()
            self._tmpdir = None


def load(path, device="auto", trusted_keys=None) -> Runner:
    """Load an artifact written by ``CompiledModule.save`` (validated; see tvm_qpu.artifact).

    Loading runs the artifact's native host code (lib.so) in this process: load only artifacts you
    trust. ``trusted_keys`` (public key files, PEM bytes or Ed25519PublicKey objects): refuse the
    artifact unless one of them signed it (``CompiledModule.save(sign_key=...)``)."""
    art = read_artifact(path, trusted_keys=trusted_keys)
    meta = art.json("model.json")
    if "lib.so" not in art.files:
        raise ArtifactError(f"{path}: artifact has no lib.so")
    arch = meta.get("host_arch")
    if arch != _native_arch():
        raise QpuError(f"{path} was built for {arch} (target host {meta.get('target_host')}); this machine is "
                       f"{_native_arch()}: run it on a matching host (e.g. a Raspberry Pi 5 for pi5)")
    from tvm_qpu.codegen.plan import KernelPlan
    ensure_registered()
    ex = PlanExecutor(device)
    used = {"model.json", "lib.so"}
    try:
        for r in meta.get("regions", []):
            specs = r["constants"]
            consts = {name: art.array(c["member"]) for name, c in specs.items()}
            plan = KernelPlan.from_json(art.json(r["plan"]), consts)
            info = RegionInfo.from_dict(r["info"])
            check_plan(plan, specs, f"{path}: region {info.key} ({info.name})")
            used.update([r["plan"], *(c["member"] for c in specs.values())])
            ex.add(plan, info)
        unused = sorted(set(art.files) - used)
        if unused:
            raise ArtifactError(f"{path}: members {unused[:4]} belong to no region")
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        ex.close()
        raise ArtifactError(f"{path}: malformed region table ({type(e).__name__}: {e})") from None
    except BaseException:
        ex.close()
        raise
    tmp = tempfile.TemporaryDirectory(prefix="tvm_qpu_load_")
    lib = safe_extract(art, tmp.name, ["lib.so"])["lib.so"]
    import tvm
    from tvm import relax
    try:
        mod = tvm.runtime.load_module(lib)
        vm = relax.VirtualMachine(mod, tvm.cpu())
    except Exception as e:
        tmp.cleanup()
        raise ArtifactError(f"{path}: the TVM library does not load ({type(e).__name__}: {e})") from None
    return Runner(vm, meta, ex, tmp, vm_factory=lambda: relax.VirtualMachine(mod, tvm.cpu()))
