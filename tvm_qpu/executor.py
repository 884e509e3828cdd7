"""The persistent plan executor behind the ``tvm_qpu.run_plan`` packed function.

Compiled modules call QPU regions as ``call_dps_packed("tvm_qpu.run_plan", [key, *inputs], out)``.
``key`` names a :class:`~tvm_qpu.codegen.plan.KernelPlan` registered in this process by
``tvm_qpu.build`` (in-process) or ``tvm_qpu.load`` (from an artifact). Each key belongs to one
:class:`PlanExecutor`, which opens its device on first use and keeps every plan resident
(:class:`~tvm_qpu.codegen.plan.ResidentPlan`: code and weights uploaded once; each call copies the
inputs in and the output out). Per-region statistics (calls, modelled QPU time, host time) feed
``Runner.profile()``.

This module needs only the TVM runtime (``tvm_ffi``) and numpy: no compiler, no Relax frontend.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import numpy as np

RUN_PLAN = "tvm_qpu.run_plan"


class PlanNotLoaded(RuntimeError):
    """A compiled module called a QPU region whose plan is not loaded in this process."""


@dataclass
class RegionStats:
    calls: int = 0
    qpu_seconds: float = 0.0        # sum of ExecStats.seconds (modelled on the emulator)
    host_seconds: float = 0.0       # wall time inside run_plan (copies + dispatch + device wait/emulation)
    cycles: int = 0

    def as_dict(self) -> dict:
        return dict(calls=self.calls, qpu_seconds=self.qpu_seconds, host_seconds=self.host_seconds,
                    cycles=self.cycles)


@dataclass
class RegionInfo:
    """What the executor knows about one region besides its plan."""
    key: str
    name: str = ""                  # composite pattern name
    kind: str = ""
    description: str = ""           # OpSpec.describe()
    input_names: list = field(default_factory=list)   # run-time kernel inputs, in call order
    cpu_estimate: float | None = None
    qpu_estimate: float | None = None

    def as_dict(self) -> dict:
        return dict(key=self.key, name=self.name, kind=self.kind, description=self.description,
                    input_names=list(self.input_names), cpu_estimate=self.cpu_estimate,
                    qpu_estimate=self.qpu_estimate)

    @staticmethod
    def from_dict(d: dict) -> "RegionInfo":
        return RegionInfo(d["key"], d.get("name", ""), d.get("kind", ""), d.get("description", ""),
                          list(d.get("input_names", [])), d.get("cpu_estimate"), d.get("qpu_estimate"))


def open_qpu_device(device):
    """A Device object from "auto" | "emulator" | "v3d" | a Device instance, with one clear error."""
    from tvm_qpu.runtime.device import Device, DeviceError, open_device
    if isinstance(device, Device):
        return device
    try:
        return open_device(device)
    except DeviceError:
        raise
    except ImportError as e:
        raise DeviceError(f"QPU device {device!r} is unavailable: {e}") from e
    except OSError as e:
        raise DeviceError(f"QPU device {device!r} could not be opened: {e}") from e


class PlanExecutor:
    """Runs registered plans on one device, keeping them resident."""

    def __init__(self, device="auto"):
        self._device_arg = device
        self._device = None
        self._owns_device = not hasattr(device, "execute")
        self.plans: dict = {}
        self.info: dict = {}
        self.resident: dict = {}
        self.stats: dict = {}
        self._lock = threading.Lock()

    @property
    def device(self):
        if self._device is None:
            self._device = open_qpu_device(self._device_arg)
        return self._device

    def add(self, plan, info: RegionInfo):
        self.plans[info.key] = plan
        self.info[info.key] = info
        self.stats[info.key] = RegionStats()
        owners = _OWNERS.setdefault(info.key, [])
        if self not in owners:
            owners.append(self)

    def active(self):
        """Context in which this executor serves the QPU regions it holds (a Runner's VM call):
        two loaded copies of one artifact share region keys but not devices."""
        return _Active(self)

    def _resident(self, key):
        r = self.resident.get(key)
        if r is None:
            from tvm_qpu.codegen.plan import ResidentPlan
            check = getattr(self.device, "check_plan", None)    # the real GPU's hang-check budget
            if check is not None:
                info = self.info[key]
                check(self.plans[key], info.qpu_estimate, what=f"QPU region {info.name or key}")
            r = self.resident[key] = ResidentPlan(self.plans[key], self.device)
        return r

    def run(self, key: str, inputs: list):
        """Run plan ``key`` on ``inputs`` (numpy arrays in RegionInfo.input_names order)."""
        t0 = time.perf_counter()
        with self._lock:
            r = self._resident(key)
            info = self.info[key]
            plan_inputs = [b.name for b in r.plan.buffers if b.role == "input"]
            if set(plan_inputs) <= set(info.input_names) and len(plan_inputs) == len(info.input_names):
                out = r(**dict(zip(info.input_names, inputs)))
            else:
                out = r(*inputs)
            st = self.stats[key]
            st.calls += 1
            for s in r.last_stats:
                st.qpu_seconds += float(getattr(s, "seconds", 0.0))
                st.cycles += int(getattr(s, "cycles", 0))
            st.host_seconds += time.perf_counter() - t0
        return out

    def reset_stats(self):
        for k in self.stats:
            self.stats[k] = RegionStats()

    def close(self):
        for r in self.resident.values():
            try:
                r.close()
            except Exception:
                pass
        self.resident = {}
        for k in list(_OWNERS):
            if self in _OWNERS[k]:
                _OWNERS[k].remove(self)
            if not _OWNERS[k]:
                del _OWNERS[k]
        if self._device is not None and self._owns_device:
            self._device.close()
        self._device = None


#: region key -> executors holding it, most recently loaded last (plain VM calls use the last one)
_OWNERS: dict = {}
_DEFAULT: PlanExecutor | None = None
_LOCAL = threading.local()


class _Active:
    def __init__(self, ex):
        self.ex = ex

    def __enter__(self):
        self.prev = getattr(_LOCAL, "executor", None)
        _LOCAL.executor = self.ex
        return self.ex

    def __exit__(self, *exc):
        _LOCAL.executor = self.prev


def _owner(key: str):
    active = getattr(_LOCAL, "executor", None)
    if active is not None and key in active.plans:
        return active
    owners = _OWNERS.get(key)
    return owners[-1] if owners else None


def default_executor() -> PlanExecutor:
    """The executor that ``tvm_qpu.build`` registers in-process plans with (device "auto")."""
    global _DEFAULT
    if _DEFAULT is None:
        _DEFAULT = PlanExecutor("auto")
    return _DEFAULT


def _run_plan_packed(key, *args):
    """Packed function body: args = (*inputs, out) as DLPack-capable tensors."""
    ex = _owner(str(key))
    if ex is None:
        raise PlanNotLoaded(f"QPU region {key} is not loaded in this process: load the artifact with "
                            f"tvm_qpu.load(path) (or build the model with tvm_qpu.build) before running it")
    inputs = [np.from_dlpack(a) for a in args[:-1]]
    out = np.from_dlpack(args[-1])
    result = ex.run(str(key), inputs)
    if isinstance(result, tuple):
        raise RuntimeError(f"QPU region {key}: plan has {len(result)} outputs, one expected")
    out[...] = np.asarray(result).reshape(out.shape)


_REGISTERED = False


def ensure_registered():
    """Register ``tvm_qpu.run_plan`` with the TVM FFI (idempotent)."""
    global _REGISTERED
    if not _REGISTERED:
        import tvm_ffi
        tvm_ffi.register_global_func(RUN_PLAN, _run_plan_packed, override=True)
        _REGISTERED = True


ensure_registered()
