"""Placement by cost: a matched pattern goes to the QPU only where the QPU is predicted to win.

For one :class:`~tvm_qpu.codegen.registry.OpSpec` the model compares

* **CPU time** (:func:`cpu_seconds`): a roofline over the Pi 5's Cortex-A76 cluster,
  ``max(ops / rate, bytes / bandwidth) + per-op overhead``, with the rates in :data:`CPU_MODEL`:
  those of the code the build runs (:mod:`tvm_qpu.cpu_schedule`'s schedules, calibrated by
  ``scripts/calibrate_cpu.py`` and scaled to the A76), never of a library the build does not call;
* **QPU time** (:func:`qpu_seconds`): ``registry.estimate(spec)`` (the kernel's cycle model)
  plus the fixed costs of leaving the CPU, in :data:`QPU_OVERHEAD`: the VM -> Python call, the
  job submission per launch (counted in the generated KernelPlan: :func:`plan_launches`), and
  copying inputs / outputs through GPU-visible memory. With tuning records that hold a v3d
  measurement of the same kernel plan (``tvmc tune --target qpu`` on a Pi), the measured launch
  time replaces the estimate and the launch cost (:func:`qpu_estimate`).

``placement="cost"`` offloads when QPU time < CPU time; ``"all"`` offloads whatever a kernel
supports; ``"none"`` offloads nothing (the llvm baseline with the same partitioning code path).

All constants live in the two tables below, each with its source or the assumption behind it.
They are estimates, not measurements on this machine; ``tvmc partition`` prints the figures used
for every decision so a wrong constant is visible. Calibrate on a Pi 5 and edit the tables.
"""
from __future__ import annotations

import contextvars
from dataclasses import dataclass

import numpy as np

PLACEMENTS = ("all", "cost", "none")

# name: (value, unit, source / assumption)
CPU_MODEL = {
    "cores": (4, "cores", "Raspberry Pi 5 product brief: 4x Cortex-A76"),
    "clock_hz": (2.4e9, "Hz", "Raspberry Pi 5 product brief: 2.4 GHz"),
    # CPU rates: the code the build runs, i.e. tvm_qpu.cpu_schedule's default schedules (no BLAS is
    # called). Measured on one core of the dev box by scripts/calibrate_cpu.py (TVM_NUM_THREADS=1,
    # the slowest of its cases per kind) and scaled to one A76 core by "a76_factor".
    "a76_factor": (0.491, "",
                   "assumption: A76 core / dev-box core fp32 peak = 38.4 GFLOP/s (2x128-bit FMA at 2.4 GHz) / "
                   "78.3 GFLOP/s (AMD EPYC, AVX2 2x256-bit FMA at 2.445 GHz); the same schedule is assumed to "
                   "reach the same fraction of peak on both (scripts/calibrate_cpu.py)"),
    "fp32_gemm_1core": (31.2e9, "FLOP/s",
                        "tvm_qpu.cpu_schedule tiled-reduction fp32 matmul/conv2d (register tile, SIMD, K-blocking, "
                        "shared kernel-width taps) on one core: conv 64ch 56x56 3x3 63.7 GFLOP/s measured on the "
                        "dev box by scripts/calibrate_cpu.py (the slower case; matmul 128x768x768: 77.2), "
                        "x a76_factor"),
    "fp32_gemm_peak": (99.8e9, "FLOP/s",
                       "the same schedule on the Pi 5's 4 cores (outer loop parallel on TVM's thread pool): "
                       "4 x fp32_gemm_1core x 0.8 (assumption: parallel efficiency)"),
    "fp32_gemm_thread_cost": (5e-6, "s",
                              "assumption: waking TVM's thread pool (3 more workers) costs ~5 us; the CPU time is "
                              "the cheaper of one core and 4 cores + this cost"),
    "int_gemm_rate": (30.1e9, "op/s",
                      "tvm_qpu.cpu_schedule tiled-reduction int8 x int8 -> int32 matmul (widened to int32 "
                      "multiply-adds, no sdot) on one core: 61.4 GOP/s measured on the dev box by "
                      "scripts/calibrate_cpu.py (128x768x768), x a76_factor"),
    "elementwise_rate": (2.22e9, "elem-op/s",
                         "tvm_qpu.cpu_schedule (RowReduction softmax with the vectorized fast exp, tiled pooling) "
                         "on one core: max_pool2d 3x3/2 4.5 G elem-op/s measured on the dev box by "
                         "scripts/calibrate_cpu.py (the slower case; softmax 12x128x128: 14.0 with placement's "
                         "op count, exp = 10), x a76_factor"),
    "exp_cost": (10, "elem-ops",
                 "assumption: one exp() in a softmax costs ~10 element-ops (polynomial expansion)"),
    # elementwise op counts of the kinds below (assumptions, not calibrated: the count of
    # arithmetic operations of the TVM expression each op legalizes to, a transcendental at exp_cost)
    "gelu_ops": (14, "elem-ops", "assumption: erf / tanh at exp_cost (10) + 4 multiply / add per element"),
    "layer_norm_ops": (8, "elem-ops",
                       "assumption: mean (1 add), variance (subtract, square, add), output (subtract, "
                       "2 multiplies, add) per element"),
    "mem_bw": (17e9, "B/s", "LPDDR4X-4267, 32-bit bus: 4267e6 x 4 B = 17 GB/s theoretical"),
    "mem_efficiency": (0.5, "", "assumption: streaming kernels reach ~half the theoretical bandwidth"),
    "op_overhead": (2e-6, "s", "assumption: Relax VM dispatch of one compiled kernel on the A76 (~1-2 us; "
                                "the x86 dev box measured ~8 us for a 12-op model)"),
}

QPU_OVERHEAD = {
    # host cost of one region on the VM thread (CPU time, not QPU time: the overlap model puts it on
    # the CPU, tvm_qpu.coexec); the copies are the copy_bw term below
    "host": (47e-6, "s", "measured: CPU time per region in the recorded timeline of a build whose every op "
                         "is a QPU region (the VM's tvm_qpu.submit_plan + wait_plan calls through the TVM FFI, "
                         "DLPack views, plan lookup, bookkeeping): 22.9 us on the dev box "
                         "(scripts/bench_host_overhead.py, digits CNN, null device, smallest of 300), "
                         "/ a76_factor like the other CPU figures"),
    "launch": (50e-6, "s", "assumption: DRM_IOCTL_V3D_SUBMIT_CSD + wait on the job's BO + cache flush "
                           "per launch (Mesa v3d compute submissions are tens of microseconds)"),
    "copy_bw": (2e9, "B/s", "assumption: host <-> GPU buffer copies (write-combined CPU mapping) "
                            "~2 GB/s, below memcpy bandwidth"),
    "launches_per_region": (1, "", "default launch count of qpu_overhead_seconds() when no plan is given; "
                                   "placement itself counts the launches of the generated KernelPlan"),
}


def _v(table, key):
    return table[key][0]


def _nelem(shape) -> int:
    return int(np.prod(shape, dtype=np.int64)) if len(shape) else 1


def _nbytes(shape, dtype) -> int:
    return _nelem(shape) * np.dtype(dtype).itemsize


def _io_bytes(spec) -> int:
    return sum(_nbytes(s, d) for s, d in spec.inputs) + _nbytes(*spec.output)


def _runtime_io_bytes(spec, constants=()) -> int:
    """Bytes copied per call on the QPU path (constants are resident, not copied)."""
    names = spec.attrs.get("input_names", [])
    total = _nbytes(*spec.output)
    for i, (s, d) in enumerate(spec.inputs):
        if i < len(names) and names[i] in constants:
            continue
        total += _nbytes(s, d)
    return total


def spec_ops(spec) -> int:
    """Useful operations of an op instance (2 per multiply-accumulate; 1 per element otherwise)."""
    k, a = spec.kind, spec.attrs
    out_shape = spec.output[0]
    if k == "matmul":
        a_shape, b_shape = spec.inputs[0][0], spec.inputs[1][0]
        kdim = a_shape[-1]
        return 2 * _nelem(out_shape) * int(kdim)
    if k == "conv2d":
        w = spec.inputs[1][0]                       # OIHW
        return 2 * _nelem(out_shape) * int(np.prod(w[1:]))
    if k == "attention":
        q, kk, v = (spec.inputs[i][0] for i in range(3))     # [B, S, D], [B, T, D], [B, T, Dv]
        b, sq, d = _nelem(q[:-2]), q[-2], q[-1]
        sk, dv = kk[-2], v[-1]
        return 2 * b * sq * sk * d + 2 * b * sq * sk * dv + b * sq * sk * int(_v(CPU_MODEL, "exp_cost"))
    if k in ("max_pool2d", "avg_pool2d"):
        return _nelem(out_shape) * int(np.prod(a.get("pool_size", (1, 1))))
    if k == "softmax":
        return _nelem(out_shape) * (int(_v(CPU_MODEL, "exp_cost")) + 3)
    if k == "gelu":
        return _nelem(out_shape) * int(_v(CPU_MODEL, "gelu_ops"))
    if k == "layer_norm":
        return _nelem(out_shape) * int(_v(CPU_MODEL, "layer_norm_ops"))
    if k == "add":                                  # (+ ReLU / clip: 1, + GELU: gelu_ops)
        act = a.get("activation")
        extra = int(_v(CPU_MODEL, "gelu_ops")) if act in ("gelu", "gelu_tanh") else int(act is not None)
        return _nelem(out_shape) * (1 + extra)
    return _nelem(spec.inputs[0][0])                # global pool, reductions


def is_integer(spec) -> bool:
    return all(np.issubdtype(np.dtype(d), np.integer) for _, d in spec.inputs[:2])


#: tuning records (a tvm_qpu.tune.RecordSet) placement reads measured CPU times, and v3d-measured
#: QPU times (qpu_estimate), from; set by tvm_qpu.tune.measured_cpu (tvmc compile / partition
#: --tuning-records), None: modelled only
MEASURED_CPU = contextvars.ContextVar("tvm_qpu_measured_cpu", default=None)


def cpu_estimate(spec) -> tuple:
    """(seconds, source) of ``spec``'s Pi 5 CPU time: measured by the active tuning records
    (:data:`MEASURED_CPU`) where they timed this op, plus the VM's per-op dispatch, scaled by
    ``a76_factor`` when measured on another CPU; otherwise :func:`modelled_cpu_seconds`."""
    records = MEASURED_CPU.get()
    if records is not None:
        from .tune import SOURCE_MEASURED, spec_key
        measured = records.op_seconds(spec_key(spec))
        if measured is not None:
            where = records.header.get("host_arch")
            if where == "aarch64":
                return measured + _v(CPU_MODEL, "op_overhead"), f"{SOURCE_MEASURED} on {records.measured_where()}"
            return (measured / _v(CPU_MODEL, "a76_factor") + _v(CPU_MODEL, "op_overhead"),
                    f"{SOURCE_MEASURED} on {records.measured_where()}, / a76_factor")
    from .tune import SOURCE_MODELLED
    return modelled_cpu_seconds(spec), SOURCE_MODELLED


def cpu_seconds(spec) -> float:
    """Predicted Pi 5 CPU time of ``spec``: measured or modelled (:func:`cpu_estimate`)."""
    return cpu_estimate(spec)[0]


def modelled_cpu_seconds(spec) -> float:
    """Modelled Pi 5 CPU time of ``spec`` (see :data:`CPU_MODEL`)."""
    ops = spec_ops(spec)
    bw = _v(CPU_MODEL, "mem_bw") * _v(CPU_MODEL, "mem_efficiency")
    mem = _io_bytes(spec) / bw
    if spec.kind in ("matmul", "conv2d", "attention"):
        if is_integer(spec):
            compute = ops / _v(CPU_MODEL, "int_gemm_rate")
        else:
            compute = min(ops / _v(CPU_MODEL, "fp32_gemm_1core"),
                          ops / _v(CPU_MODEL, "fp32_gemm_peak") + _v(CPU_MODEL, "fp32_gemm_thread_cost"))
    else:
        compute = ops / _v(CPU_MODEL, "elementwise_rate")
    return max(compute, mem) + _v(CPU_MODEL, "op_overhead")


def host_seconds(spec, constants=()) -> float:
    """CPU time the VM thread spends on one QPU region of ``spec``: the per-region host cost
    (submit + wait) and the input / output copies (see :data:`QPU_OVERHEAD`). Part of
    :func:`qpu_overhead_seconds`; :mod:`tvm_qpu.coexec` schedules it on the CPU."""
    return _v(QPU_OVERHEAD, "host") + _runtime_io_bytes(spec, constants) / _v(QPU_OVERHEAD, "copy_bw")


def qpu_overhead_seconds(spec, constants=(), launches=None) -> float:
    """Fixed cost of running ``spec`` on the QPU beyond the kernel itself (see :data:`QPU_OVERHEAD`):
    :func:`host_seconds` plus the launches."""
    n = _v(QPU_OVERHEAD, "launches_per_region") if launches is None else launches
    return host_seconds(spec, constants) + n * _v(QPU_OVERHEAD, "launch")


def plan_launches(spec, constants=(), registry=None) -> int:
    """Launches of the KernelPlan the kernel generates for ``spec`` (e.g. a pack or padding-copy
    launch before the GEMM, the second pass of a reduction), read from the plan itself.
    ``constants`` maps constant operand names to arrays (the kernel may need them, e.g. conv
    weights); a plan that cannot be generated raises."""
    if registry is None:
        from tvm_qpu.codegen import registry
    consts = dict(constants) if isinstance(constants, dict) else {}
    return len(registry.generate(spec, consts).launches)


def qpu_estimate(spec, constants=(), registry=None) -> tuple:
    """(seconds, source, fixed costs) of ``spec``'s QPU time. Where the active tuning records
    (:data:`MEASURED_CPU`) hold a v3d measurement of the very kernel plan generated now (same
    ``tvm_qpu.tune.plan_identity``), that measured launch time plus the modelled call and copies
    (the measured launches include their submission); otherwise the registry's cycle-model
    estimate plus :func:`qpu_overhead_seconds` for the launches the plan really makes. ``source``
    says which, and why a record was not used (an emulator entry is modelled too; a stale plan)."""
    if registry is None:
        from tvm_qpu.codegen import registry
    from .tune import SOURCE_QPU_MEASURED, SOURCE_QPU_MODELLED, spec_key
    est = float(registry.estimate(spec))
    consts = dict(constants) if isinstance(constants, dict) else {}
    plan = registry.generate(spec, consts)
    records, note = MEASURED_CPU.get(), ""
    if records is not None:
        entry, note = records.qpu_measurement(spec_key(spec), plan)
        if entry is not None:
            fixed = qpu_overhead_seconds(spec, constants, launches=0)
            return entry["seconds"] + fixed, f"{SOURCE_QPU_MEASURED} {entry['host']}", fixed
    fixed = qpu_overhead_seconds(spec, constants, len(plan.launches))
    source = SOURCE_QPU_MODELLED + (f"; {note}" if note else "")
    return est + fixed, source, fixed


def qpu_seconds(spec, constants=(), registry=None) -> float:
    """Predicted QPU time: measured on v3d or modelled (:func:`qpu_estimate`)."""
    return qpu_estimate(spec, constants, registry)[0]


#: kinds whose plans split long work into launches each within the dispatch budget, and the
#: function that models their longest launch (seconds; spec -> float)
SPLIT_KINDS = {"matmul": "tvm_qpu.codegen.kernels.gemm:longest_dispatch_seconds",
               "conv2d": "tvm_qpu.codegen.kernels.conv:longest_dispatch_seconds",
               "max_pool2d": "tvm_qpu.codegen.kernels.pool:longest_dispatch_seconds",
               "avg_pool2d": "tvm_qpu.codegen.kernels.pool:longest_dispatch_seconds",
               "attention": "tvm_qpu.codegen.kernels.attention:longest_dispatch_seconds",
               "global_avg_pool2d": "tvm_qpu.codegen.kernels.pool:longest_dispatch_seconds",
               **{k: "tvm_qpu.codegen.kernels.reduce:longest_dispatch_seconds"
                  for k in ("reduce_max", "reduce_min", "argmax", "argmin")}}


def longest_dispatch_seconds(spec, qpu_total: float) -> float:
    """Modelled seconds of the longest single GPU dispatch ``spec``'s plan makes: from its kind's
    splitting plan (:data:`SPLIT_KINDS`), else the whole QPU time ``qpu_total`` (one dispatch)."""
    if spec.kind not in SPLIT_KINDS:
        return qpu_total
    import importlib
    mod, fn = SPLIT_KINDS[spec.kind].split(":")
    try:
        return float(getattr(importlib.import_module(mod), fn)(spec))
    except ValueError:              # no split plan for this shape: one dispatch, as if unsplit
        return qpu_total


@dataclass
class Decision:
    on_qpu: bool
    reason: str
    cpu_s: float | None = None
    qpu_s: float | None = None

    def as_dict(self) -> dict:
        return {"on_qpu": self.on_qpu, "reason": self.reason, "cpu_s": self.cpu_s, "qpu_s": self.qpu_s}


def _us(s):
    return f"{s * 1e6:.1f} us"


def decide(spec, placement: str = "cost", constants=(), registry=None) -> Decision:
    """Place one supported op instance. ``placement`` is "all", "cost" or "none"."""
    if placement not in PLACEMENTS:
        raise ValueError(f"placement must be one of {', '.join(PLACEMENTS)}, got {placement!r}")
    if placement == "none":
        return Decision(False, "placement=none keeps every op on the CPU")
    cpu, source = cpu_estimate(spec)
    cpu_txt = f"{_us(cpu)} [{source}]"
    try:
        qpu, qpu_source, overhead = qpu_estimate(spec, constants, registry)
    except Exception as e:  # an estimate that fails must not crash partitioning
        if placement == "all":
            return Decision(True, f"placement=all (no QPU estimate: {e})", cpu, None)
        return Decision(False, f"no QPU time estimate ({type(e).__name__}: {e})", cpu, None)
    from tvm_qpu.runtime.v3d import DISPATCH_BUDGET_SECONDS
    dispatch = longest_dispatch_seconds(spec, qpu)
    if dispatch > DISPATCH_BUDGET_SECONDS:     # also under placement=all: it would fail on a Pi 5
        what = "its longest launch" if spec.kind in SPLIT_KINDS else "its launches are not split:"
        return Decision(False, f"QPU {_us(qpu)} ({what} {_us(dispatch)}) exceeds the "
                               f"{DISPATCH_BUDGET_SECONDS * 1e3:.0f} ms one GPU dispatch may run (the v3d "
                               "driver's hang check resets longer jobs): stays on the CPU", cpu, qpu)
    qpu_txt = f"{_us(qpu)} [{qpu_source}]"
    if placement == "all":
        return Decision(True, f"placement=all (QPU {qpu_txt} vs CPU {cpu_txt})", cpu, qpu)
    if qpu < cpu:
        return Decision(True, f"cost: QPU {qpu_txt} < CPU {cpu_txt}", cpu, qpu)
    return Decision(False, f"cost: CPU {cpu_txt} <= QPU {qpu_txt} (incl. {_us(overhead)} "
                           f"launch/copy overhead)", cpu, qpu)


def model_table() -> str:
    """The constants, as text (``tvmc partition --explain``)."""
    lines = ["CPU model (Raspberry Pi 5, Cortex-A76; modelled: tvm_qpu.cpu_schedule's schedules, rates "
             "calibrated by scripts/calibrate_cpu.py):"]
    lines += [f"  {k:22s} {v[0]:<10g} {v[1]:10s} {v[2]}" for k, v in CPU_MODEL.items()]
    lines.append("QPU fixed costs (beyond registry.estimate):")
    lines += [f"  {k:22s} {v[0]:<10g} {v[1]:10s} {v[2]}" for k, v in QPU_OVERHEAD.items()]
    return "\n".join(lines)
