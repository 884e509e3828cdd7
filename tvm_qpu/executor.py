"""The persistent plan executor behind the ``tvm_qpu.run_plan`` / ``submit_plan`` / ``wait_plan``
packed functions.

Compiled modules call QPU regions as ``call_dps_packed("tvm_qpu.run_plan", [key, *inputs], out)``
(blocking), or, by default, as an asynchronous pair (:mod:`tvm_qpu.async_regions`):
``submit_plan(key, *inputs) -> ticket`` then ``wait_plan(key, ticket) -> out`` at the first use of
the result (:meth:`PlanExecutor.submit` / :meth:`PlanExecutor.wait`; ``run`` is a submit followed
at once by its wait). On v3d a submitted region runs in the QPU worker thread; on the emulator it is
emulated at its submit and :mod:`tvm_qpu.timeline` models the overlap.
``key`` names a :class:`~tvm_qpu.codegen.plan.KernelPlan` registered in this process by
``tvm_qpu.build`` (in-process) or ``tvm_qpu.load`` (from an artifact). Each key belongs to one
:class:`PlanExecutor`, which opens its device on first use and keeps every plan resident
(:class:`~tvm_qpu.codegen.plan.ResidentPlan`: code and weights uploaded once; each call copies the
inputs in and the output out). Per-region statistics (calls, modelled QPU time, host time) feed
``Runner.profile()``.

Ctrl-C: the emulator's core runs without the GIL, so on the main thread a region runs in a worker
thread while the main thread waits, shows progress (:mod:`tvm_qpu.progress`) and takes SIGINT;
it then stops the emulator (``EmulatorDevice.interrupt``, within one scheduling quantum) and
re-raises KeyboardInterrupt. The TVM packed-function boundary turns any exception into a
RuntimeError; :class:`PlanExecutor.active` re-raises the original (KeyboardInterrupt, DeviceError,
EmulatorFault...) in its place. During an active VM call on the main thread SIGINT is *deferred*
(:func:`_deferred_sigint`): the handler only records it and stops the QPU work; the
KeyboardInterrupt is raised at the next region boundary (a submit, a wait, the poll loop) or when
the VM call returns. Python's default handler would raise it at whatever bytecode runs next,
which can be inside TVM's FFI conversion of a packed call's return value: there it becomes an
empty RuntimeError that nothing can tell from a failure, and it can leave the FFI's objects
half-made (a heap corruption at exit was seen).

Interpreter exit: the QPU worker thread and a region's worker thread are daemon threads, and so
may be a program's own thread in the middle of a VM call. Left running when Python finalizes, they
break: a thread that needs the GIL back is ended with ``pthread_exit``, whose forced unwinding
through TVM's C++ frames aborts the process ("FATAL: exception not rethrown"); numba's runtime,
shut down by an atexit hook, assumes no other thread still runs its code. :func:`_at_exit` (an
atexit hook, registered when the first VM call or thread starts, so that it runs before numba's
own: atexit is last in, first out) stops every region (as a Ctrl-C would), refuses new VM calls and
region submits (:class:`InterpreterExiting`), and waits up to :data:`EXIT_WAIT_SECONDS` for those
threads to leave. A region that cannot be stopped (the emulator's first-use compile, a real GPU
job) is waited for no longer than that.

This module needs only the TVM runtime (``tvm_ffi``) and numpy: no compiler, no Relax frontend.
"""
from __future__ import annotations

import atexit
import itertools
import signal
import threading
import time
import weakref
from dataclasses import dataclass, field

import numpy as np

from . import timeline as _tl

RUN_PLAN = "tvm_qpu.run_plan"
SUBMIT_PLAN = "tvm_qpu.submit_plan"     # asynchronous regions (tvm_qpu.async_regions): submit ...
WAIT_PLAN = "tvm_qpu.wait_plan"         # ... and wait at the first use of the result
POLL_SECONDS = 0.1          # how often the waiting main thread takes signals and updates progress
STOP_GRACE_SECONDS = 0.5    # how long to wait for an interrupted region to stop (the emulator: one quantum)
CLOSE_WAIT_SECONDS = 10.0   # close(): how long to wait for the QPU worker's running job before leaving
                            # the device and buffers to it (never freed under a running job)
EXIT_WAIT_SECONDS = 2.0     # at interpreter exit: how long to wait for stopped regions and VM calls
                            # to end (the emulator stops within a quantum; see _at_exit)


class PlanNotLoaded(RuntimeError):
    """A compiled module called a QPU region whose plan is not loaded in this process."""


class InterpreterExiting(RuntimeError):
    """A VM call or a QPU region started (or was stopped) while the interpreter exits."""


@dataclass
class RegionStats:
    calls: int = 0
    qpu_seconds: float = 0.0        # sum of ExecStats.seconds (modelled on the emulator)
    host_seconds: float = 0.0       # VM-thread wall time in run_plan / submit + wait (copies, dispatch,
                                    # emulation or blocking on the device)
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


class _Done:
    """A job's one-shot "finished" flag with ``threading.Event``'s interface, on the executor's
    shared condition (an Event per job costs a Condition and a lock per region call)."""
    __slots__ = ("_cond", "_set")

    def __init__(self, cond: threading.Condition):
        self._cond, self._set = cond, False

    def is_set(self) -> bool:
        return self._set

    def set(self):
        with self._cond:
            self._set = True
            self._cond.notify_all()

    def wait(self, timeout=None) -> bool:
        if self._set:
            return True
        with self._cond:
            return self._cond.wait_for(self.is_set, timeout)


class Job:
    """One submitted region: its device buffers hold its inputs, then (once ``done``) its output,
    until a later submit of the same plan moves that output into ``result``. A plain slotted class
    (not a dataclass): one is made per region call."""
    __slots__ = ("ticket", "key", "resident", "slot", "thread", "done", "stats", "error", "result",
                 "cancelled", "event", "host_seconds")

    def __init__(self, ticket: int, key: str, resident, thread: int, slot, done: _Done):
        self.ticket, self.key, self.resident, self.slot, self.thread = ticket, key, resident, slot, thread
        self.done = done
        self.stats = ()
        self.error = None               # BaseException | None
        self.result = None
        self.cancelled = False
        self.event = None               # the timeline's submit Event, if recording
        self.host_seconds = 0.0         # VM-thread time in the submit and the wait


class RegionSlot:
    """Per-region call state prepared once, when the plan becomes resident: typed views of the
    device input buffers in the compiled call's argument order (with the shape and dtype each must
    have) and of the single output buffer, so a call does no name matching, dict building or
    shape arithmetic: a submit is one checked ``np.copyto`` per input into device memory, a wait
    one ``np.copyto`` from device memory into the VM's output tensor.

    The inputs are still *copied* into the device buffers at the submit (the QPU reads device
    memory, and Relax's static memory planner may reuse an input tensor as soon as the submit
    returns); the output goes straight from the device buffer into the destination tensor (one
    copy, not a host copy and then a second one)."""
    __slots__ = ("inputs", "output", "output_shape", "name")

    def __init__(self, resident, info: "RegionInfo"):
        plan = resident.plan
        ins = [b for b in plan.buffers if b.role == "input"]
        names = [b.name for b in ins]
        if set(names) <= set(info.input_names) and len(names) == len(info.input_names):
            by_name = {b.name: b for b in ins}
            ins = [by_name[n] for n in info.input_names]      # the call passes them in this order
        self.name = plan.name
        self.inputs = tuple((resident.bufs[b.name].view(np.dtype(b.dtype), tuple(b.shape)), tuple(b.shape),
                             np.dtype(b.dtype), b.name) for b in ins)
        outs = [b for b in plan.buffers if b.role == "output"]
        if len(outs) == 1:
            b = outs[0]
            self.output = resident.bufs[b.name].view(np.dtype(b.dtype), tuple(b.shape))
            self.output_shape = tuple(b.shape)
        else:                           # several outputs: read_outputs (a packed call refuses them)
            self.output = self.output_shape = None

    def write_inputs(self, inputs):
        """Copy ``inputs`` (arrays in call order) into the device buffers; a wrong count, shape or
        dtype is a ValueError naming the input."""
        if len(inputs) != len(self.inputs):
            raise ValueError(f"{self.name}: {len(self.inputs)} inputs expected, got {len(inputs)}")
        for a, (dst, shape, dtype, name) in zip(inputs, self.inputs):
            if type(a) is not np.ndarray:
                a = np.asarray(a)
            if a.shape != shape or a.dtype != dtype:
                raise ValueError(f"{self.name}: input {name} must be {dtype}{list(shape)}, "
                                 f"got {a.dtype}{list(a.shape)}")
            np.copyto(dst, a)

    def read_output(self, resident, out=None):
        """The region's output: copied into ``out`` (any array of as many elements) when given,
        else a host copy (a tuple for a plan with several outputs)."""
        if self.output is None:
            outs = resident.read_outputs()
            if out is not None:
                raise RuntimeError(f"{self.name}: plan has {len(outs)} outputs, one expected")
            return outs
        if out is None:
            return self.output.copy()
        _copy_into(out, self.output)
        return out


def _copy_into(out, src):
    """``out[...] = src`` reshaped to ``out``'s shape (the Relax output may be a reshaped view)."""
    src = np.asarray(src)
    if src.shape != out.shape:
        src = src.reshape(out.shape)
    np.copyto(out, src, casting="unsafe")       # as ``out[...] = src``


class RegionError(RuntimeError):
    """A QPU region failed (raised at its wait) and its exception type cannot carry the name."""


def region_error(err: BaseException, info: RegionInfo) -> BaseException:
    """``err`` (a region's failure) with the region's name in its message, same type if possible;
    KeyboardInterrupt stays as it is."""
    if isinstance(err, KeyboardInterrupt):
        return err
    name = f"QPU region {info.name or info.key} ({info.key})" if info.name else f"QPU region {info.key}"
    msg = f"{name}: {err}"
    try:
        new = type(err)(msg)
        new.__dict__.update({k: v for k, v in err.__dict__.items() if k not in new.__dict__})
    except Exception:
        new = RegionError(f"{msg} ({type(err).__name__})")
    new.__cause__ = err
    new.region = info.name or info.key
    return new


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
        self.slots: dict = {}               # key -> RegionSlot (built with the resident plan)
        self.stats: dict = {}
        self._lock = threading.Lock()
        self._done_cond = threading.Condition(threading.Lock())   # every job's _Done flag
        self.interrupted = False            # the last region was interrupted (Ctrl-C)
        self.sigint = False                 # a deferred SIGINT not yet raised (see _deferred_sigint)
        self._failures = threading.local()  # per calling thread: see ``failure``
        self._worker = None                 # the last region's worker thread (may outlive a Ctrl-C)
        self.threaded = None                # None: QPU worker thread on v3d only (see use_worker)
        self._queue = None                  # the QPU worker thread's job queue
        self._qthread = None                # the QPU worker thread (see close)
        self._jobs: dict = {}               # ticket -> Job submitted and not yet waited for
        self._latest: dict = {}             # key -> the last Job whose output is in its buffers
        self._tickets = itertools.count(1)
        _LIVE.add(self)

    @property
    def failure(self):
        """The exception that last left a packed call (run_plan / submit / wait) in *this* thread,
        for :class:`_Active` to re-raise in place of TVM's RuntimeError; per thread, so the
        inferences of a threaded stream cannot take each other's errors."""
        return getattr(self._failures, "value", None)

    @failure.setter
    def failure(self, err):
        self._failures.value = err

    @property
    def device(self):
        if self._device is None:
            self._device = open_qpu_device(self._device_arg)
        return self._device

    @property
    def device_kind(self) -> str:
        """The open device's kind ("emulator", "v3d", ...), "" before the device is opened."""
        return str(getattr(self._device, "kind", "")) if self._device is not None else ""

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
            self.slots[key] = RegionSlot(r, self.info[key])
        return r

    def run(self, key: str, inputs: list, out=None):
        """Run plan ``key`` on ``inputs`` (numpy arrays in RegionInfo.input_names order) and
        return its output (written into ``out`` if given): a submit followed at once by its wait
        (the synchronous path)."""
        return self.wait(self.submit(key, inputs), out)

    # -- asynchronous regions: submit now, wait at the first use of the result -----------------
    def use_worker(self) -> bool:
        """Whether submitted regions run in the QPU worker thread (real overlap with the CPU):
        ``self.threaded`` if set, else only on a real GPU (v3d). On the emulator a region is
        emulated at its submit (its host time is not CPU time: the timeline models it), so the
        CPU work measured beside it is not slowed by the emulation."""
        if self.threaded is not None:
            return bool(self.threaded)
        return getattr(self.device, "kind", "") == "v3d"

    def submit(self, key: str, inputs: list) -> int:
        """Copy ``inputs`` into the region's device buffers (so the caller may reuse them at once)
        and start the region. Returns a ticket for :meth:`wait`. Errors of the region itself
        surface at the wait; a missing device or a Ctrl-C surface here."""
        self.raise_deferred_sigint()
        if _EXITING:
            raise InterpreterExiting(f"QPU region {key} not started: the interpreter is exiting")
        rec = _tl.current()
        t0 = time.perf_counter()
        with self._lock:
            if self.interrupted or self._worker is not None:
                self._finish_interrupted()
            r = self.resident.get(key)
            if r is None:
                r = self._resident(key)
            slot = self.slots[key]
            prev = self._latest.pop(key, None)
            if prev is not None:                # the buffers hold a result nobody has read yet
                self._settle(prev, slot)
            slot.write_inputs(inputs)
            ticket = next(self._tickets)
            job = Job(ticket, key, r, threading.get_ident(), slot, _Done(self._done_cond))
            self._jobs[ticket] = self._latest[key] = job
            if rec is not None:
                info = self.info[key]
                job.event = rec.event("submit", job=ticket, region=info.name or key)
            if self.use_worker():
                self._ensure_worker().put(job)
                job.host_seconds = time.perf_counter() - t0
                return ticket
        try:
            self._interruptible(lambda: self._execute(job), self.info[key])
        finally:
            if rec is not None:
                rec.resume()                    # emulating is not CPU time
            job.host_seconds = time.perf_counter() - t0
        return ticket

    def wait(self, ticket: int, out=None):
        """Wait for the region of ``ticket``; returns its output (raises its error, named),
        written into ``out`` (an array of the output's size) when given."""
        rec = _tl.current()
        t0 = time.perf_counter()
        if self.sigint and ticket in self._jobs:
            self.raise_deferred_sigint()        # the job stays for drain() to let it end
        job = self._jobs.pop(ticket, None)
        if job is None:
            raise RuntimeError(f"QPU wait for an unknown ticket {ticket} (already waited for, or "
                               f"submitted by another executor)")
        if rec is not None:
            rec.event("wait", job=ticket)
        if not job.done.is_set():
            try:
                self._interruptible(lambda: self._block(job), self.info[job.key], worker=False)
            finally:
                if rec is not None:
                    rec.resume()                # blocked on the QPU: not CPU time
        elif rec is not None:
            rec.resume()
        with self._lock:
            if job.error is None:
                if self._latest.get(job.key) is job:      # the output is still in the device buffers
                    del self._latest[job.key]
                    result = job.slot.read_output(job.resident, out)
                elif out is not None:                    # settled: a later submit kept it on the host
                    _copy_into(out, job.result)
                    result = out
                else:
                    result = job.result
            elif self._latest.get(job.key) is job:
                del self._latest[job.key]
            st = self.stats[job.key]
            st.calls += 1
            for s in job.stats:
                st.qpu_seconds += float(getattr(s, "seconds", 0.0))
                st.cycles += int(getattr(s, "cycles", 0))
            st.host_seconds += job.host_seconds + time.perf_counter() - t0
        if job.error is not None:
            if _EXITING:
                raise region_error(InterpreterExiting(f"stopped ({job.error}): the interpreter is exiting"),
                                   self.info[job.key])
            raise region_error(job.error, self.info[job.key])
        return result

    def _execute(self, job):
        """Run a submitted job's launches (in the worker thread or at the submit)."""
        ev = job.event
        if ev is not None:
            ev.qpu_start = time.perf_counter()
        try:
            if job.cancelled:
                raise KeyboardInterrupt("interrupted")
            job.resident.launch()
            job.stats = job.resident.last_stats      # launch() makes a new list each time
        except BaseException as e:
            job.error = e
            if not self.use_worker() and isinstance(e, KeyboardInterrupt):
                raise
        finally:
            if ev is not None:
                ev.qpu_end = time.perf_counter()
                ev.seconds = sum(float(getattr(s, "seconds", 0.0)) for s in job.stats)
            job.done.set()

    def _settle(self, job, slot):
        """A job whose buffers are about to be reused: wait for it, keep its output on the host."""
        job.done.wait()
        if job.error is None:
            job.result = slot.read_output(job.resident)

    def _block(self, job):
        job.done.wait()

    def _ensure_worker(self):
        if self._queue is None:
            import queue
            self._queue = queue.Queue()
            q = self._queue

            def loop():
                while True:
                    job = q.get()
                    if job is None:
                        return
                    self._execute(job)

            t = threading.Thread(target=loop, name="tvm_qpu QPU worker", daemon=True)
            _arm_exit_hook()
            t.start()
            self._qthread = t
        return self._queue

    def drain(self, thread=None):
        """Forget the jobs submitted by ``thread`` (default: this one) that were never waited for
        (a VM call that raised between a submit and its wait): let them finish first."""
        tid = threading.get_ident() if thread is None else thread
        for t, job in list(self._jobs.items()):
            if job.thread == tid:
                job.done.wait(None if not self.interrupted else STOP_GRACE_SECONDS)
                self._jobs.pop(t, None)
                if self._latest.get(job.key) is job:
                    del self._latest[job.key]

    def _interruptible(self, fn, info: RegionInfo, worker: bool = True):
        """``fn()``; on the main thread with an interruptible device, in a worker thread while this
        thread shows progress and takes Ctrl-C (see the module docstring). ``worker=False``: ``fn``
        only waits for the QPU worker thread (a wait), which Ctrl-C also stops."""
        dev = self.device
        if not hasattr(dev, "interrupt") or threading.current_thread() is not threading.main_thread():
            return fn()
        status = _progress().current()
        box = {}
        done = threading.Event()

        def work():
            try:
                box["out"] = fn()
            except BaseException as e:      # handed to the waiting thread
                box["err"] = e
            finally:
                done.set()

        worker_flag = worker
        keys = list(self.info)
        where = f"QPU region {keys.index(info.key) + 1}/{len(keys)} {info.name or info.key}"
        worker = threading.Thread(target=work, name=f"tvm_qpu {info.key}", daemon=True)
        if worker_flag:
            self._worker = worker
        _arm_exit_hook()
        t0 = time.perf_counter()
        try:
            worker.start()                  # inside the try: start() itself waits, so Ctrl-C can land there
            while not done.wait(POLL_SECONDS):
                status.update(f"{where}: {_activity(dev)} {time.perf_counter() - t0:.0f} s", t0)
                if self.sigint:             # a deferred Ctrl-C (the device is already told to stop)
                    self.raise_deferred_sigint()
        except BaseException:               # KeyboardInterrupt (or a signal handler's exception)
            self.stop_regions()
            done.wait(STOP_GRACE_SECONDS)   # the emulator stops within a quantum; its first-use
            raise                           # compile cannot be stopped: _finish_interrupted waits
        if worker_flag:
            self._worker = None
        if "err" in box:
            raise box["err"]
        return box["out"]

    def stop_regions(self):
        """Ctrl-C: tell the device to stop the running region (if it can) and cancel the queued
        ones; the next submit waits for them to end and clears the device's stop flag."""
        dev = self._device
        if dev is not None and hasattr(dev, "interrupt"):
            dev.interrupt()
        for job in list(self._jobs.values()):
            job.cancelled = True            # queued regions of the QPU worker do not start
        self.interrupted = True

    def _stop_for_exit(self) -> list:
        """Interpreter exit (:func:`_at_exit`): stop the running and queued regions, tell the
        QPU worker thread to end; returns the threads of ours to wait for."""
        threads = [t for t in (self._qthread, self._worker) if t is not None and t.is_alive()]
        if threads or self._jobs:
            self.stop_regions()
        if self._queue is not None:             # the worker ends after the (cancelled) queued jobs
            self._queue.put(None)
            self._queue = self._qthread = None
        return threads

    def raise_deferred_sigint(self):
        """Raise the KeyboardInterrupt of a SIGINT that :func:`_deferred_sigint` recorded."""
        if self.sigint:
            self.sigint = False
            raise KeyboardInterrupt("interrupted")

    def _finish_interrupted(self):
        """Before a new region: let an interrupted one end, then clear the device's stop flag."""
        worker, self._worker = self._worker, None
        if worker is not None:
            worker.join()
        if self.interrupted:
            for job in list(self._jobs.values()):   # the QPU worker's interrupted / cancelled jobs
                job.done.wait()
        if (self.interrupted or worker is not None) and self._device is not None:
            self._device.interrupt(False)
        self.interrupted = False

    def reset_stats(self):
        for k in self.stats:
            self.stats[k] = RegionStats()

    def close(self):
        busy = False
        if self._queue is not None:
            # let the QPU worker thread finish its job before the buffers and the device go: the
            # emulator's core reads and writes device memory without the GIL
            self._queue.put(None)
            self._queue = None
            qthread, self._qthread = self._qthread, None
            if qthread is not None and qthread is not threading.current_thread():
                qthread.join(CLOSE_WAIT_SECONDS)
                busy = qthread.is_alive()
        if busy or (self._worker is not None and self._worker.is_alive()):
            # an interrupted region still runs (the emulator's first-use compile cannot be
            # stopped): leave device and buffers to it; they go when the process does
            self._worker = None
            self.resident, self.slots = {}, {}
            self._device = None
        for r in self.resident.values():
            try:
                r.close()
            except Exception:
                pass
        self.resident, self.slots = {}, {}
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

#: every executor not yet garbage-collected: the exit hook stops their regions and threads
_LIVE: "weakref.WeakSet[PlanExecutor]" = weakref.WeakSet()
#: thread ident -> how many VM calls (:class:`_Active`) that thread is inside; each thread writes
#: only its own entry (under the GIL), the exit hook reads them
_IN_CALLS: dict = {}
_EXITING = False                    # set by _at_exit: no new VM call or region from now on
_EXIT_HOOK_ARMED = False


def _arm_exit_hook():
    """Register :func:`_at_exit` with atexit before a thread of ours starts or the first VM call;
    (re-)registering moves it to the end of atexit's list, so it runs before the hooks of the
    libraries imported since (numba's runtime shuts down in one) - atexit is last in, first out."""
    global _EXIT_HOOK_ARMED
    atexit.unregister(_at_exit)
    atexit.register(_at_exit)
    _EXIT_HOOK_ARMED = True


def _at_exit():
    """Interpreter exit (module docstring): stop every running or queued region, end the QPU
    worker threads, refuse new VM calls, and wait (at most EXIT_WAIT_SECONDS) until no thread of
    ours runs and no other thread is inside a VM call. Returns the names of what was still running
    at the deadline (nothing, normally)."""
    global _EXITING
    _EXITING = True
    me = threading.current_thread()
    threads = []
    for ex in list(_LIVE):
        try:
            threads += ex._stop_for_exit()
        except Exception:               # one executor's device must not keep the others running
            pass
    deadline = time.monotonic() + EXIT_WAIT_SECONDS
    for t in threads:
        if t is not me:
            t.join(max(0.0, deadline - time.monotonic()))
    while _callers(me.ident) and time.monotonic() < deadline:
        time.sleep(0.01)
    return [t.name for t in threads if t is not me and t.is_alive()] + \
        [f"VM call in thread {tid}" for tid in _callers(me.ident)]


def _callers(me: int) -> list:
    """Idents of the threads (other than ``me``) inside a VM call."""
    return [tid for tid, n in list(_IN_CALLS.items()) if n and tid != me]


def _deferred_sigint(signum, frame):
    """SIGINT handler while an executor serves a VM call on the main thread: record the Ctrl-C
    and stop the QPU work now; raise nothing here (see the module docstring). The executor raises
    KeyboardInterrupt at its next region boundary, :class:`_Active` at the latest when the VM call
    ends."""
    ex = getattr(_LOCAL, "executor", None)
    if ex is None:                          # not inside a VM call after all: behave as default
        raise KeyboardInterrupt
    ex.sigint = True
    ex.stop_regions()


class _Active:
    """The context of :meth:`PlanExecutor.active`: the executor serving this thread's VM call;
    on the main thread it defers SIGINT (:func:`_deferred_sigint`) unless the program installed a
    SIGINT handler of its own."""

    def __init__(self, ex):
        self.ex = ex

    def __enter__(self):
        if not _EXIT_HOOK_ARMED:
            _arm_exit_hook()
        tid = threading.get_ident()
        _IN_CALLS[tid] = _IN_CALLS.get(tid, 0) + 1     # counted in before _EXITING is read: _at_exit
        if _EXITING:                                    # sets it before it reads the counts, so it
            self._count_out()                           # either waits for this call or we stop here
            raise InterpreterExiting("no new QPU model run: the interpreter is exiting")
        self.prev = getattr(_LOCAL, "executor", None)
        self.prev_handler = None
        if (self.prev is None and threading.current_thread() is threading.main_thread()
                and signal.getsignal(signal.SIGINT) is signal.default_int_handler):
            self.prev_handler = signal.signal(signal.SIGINT, _deferred_sigint)
        _LOCAL.executor = self.ex
        return self.ex

    def __exit__(self, exc_type, exc, tb):
        try:
            return self._leave(exc_type, exc)
        finally:                            # counted out last: _at_exit waits for drain() too
            self._count_out()

    @staticmethod
    def _count_out():
        tid = threading.get_ident()
        _IN_CALLS[tid] -= 1
        if not _IN_CALLS[tid]:
            del _IN_CALLS[tid]

    def _leave(self, exc_type, exc):
        _LOCAL.executor = self.prev
        if self.prev_handler is not None:
            signal.signal(signal.SIGINT, self.prev_handler)
        if exc_type is not None:
            self.ex.drain()                 # regions submitted and never waited for
        failure, self.ex.failure = self.ex.failure, None
        if self.ex.sigint:                  # a Ctrl-C not raised yet: raise it now, in place of
            self.ex.sigint = False          # whatever the FFI made of it
            if exc_type is None or not issubclass(exc_type, KeyboardInterrupt):
                raise KeyboardInterrupt("interrupted") from None
        if exc_type is None or failure is None or exc is failure:
            return False
        # the packed-function boundary turned ``failure`` into a RuntimeError: raise the original
        if isinstance(failure, KeyboardInterrupt):
            raise KeyboardInterrupt("interrupted") from None
        raise failure from None


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


def _owner_or_raise(key: str):
    ex = _owner(key)
    if ex is None:
        raise PlanNotLoaded(f"QPU region {key} is not loaded in this process: load the artifact with "
                            f"tvm_qpu.load(path) (or build the model with tvm_qpu.build) before running it")
    return ex


def _run_plan_packed(key, *args):
    """Packed function body: args = (*inputs, out) as DLPack-capable tensors."""
    key = str(key)
    ex = _owner_or_raise(key)
    try:
        ex.run(key, [np.from_dlpack(a) for a in args[:-1]], np.from_dlpack(args[-1]))
    except BaseException as e:
        ex.failure = e                      # TVM re-raises it as a RuntimeError; see _Active
        raise


def _submit_plan_packed(key, *args):
    """Packed function body of ``tvm_qpu.submit_plan``: args = (*inputs, ticket) where ticket is
    an int64[1] tensor receiving the job's ticket for ``tvm_qpu.wait_plan``."""
    key = str(key)
    ex = _owner_or_raise(key)
    try:
        ticket = ex.submit(key, [np.from_dlpack(a) for a in args[:-1]])
    except BaseException as e:
        ex.failure = e
        raise
    np.from_dlpack(args[-1])[0] = ticket


def _wait_plan_packed(key, ticket, out):
    """Packed function body of ``tvm_qpu.wait_plan``: wait for the job of ``ticket`` (int64[1])
    and write its output straight into ``out``."""
    key = str(key)
    ex = _owner_or_raise(key)
    t = int(np.from_dlpack(ticket)[0])
    try:
        ex.wait(t, np.from_dlpack(out))
    except BaseException as e:
        ex.failure = e
        raise


def _progress():
    from . import progress
    return progress


def _activity(dev) -> str:
    """What a waiting region is doing, for the status line."""
    if getattr(dev, "kind", "") != "emulator":
        return f"running on {getattr(dev, 'kind', 'the device')}"
    from tvm_qpu.runtime import emu_core
    if not emu_core.run.signatures:
        return ("preparing the emulator core (numba: a minute or more the first time, seconds once "
                "cached)")
    return "emulating"


_REGISTERED = False


def ensure_registered():
    """Register ``tvm_qpu.run_plan`` with the TVM FFI (idempotent)."""
    global _REGISTERED
    if not _REGISTERED:
        import tvm_ffi
        tvm_ffi.register_global_func(RUN_PLAN, _run_plan_packed, override=True)
        tvm_ffi.register_global_func(SUBMIT_PLAN, _submit_plan_packed, override=True)
        tvm_ffi.register_global_func(WAIT_PLAN, _wait_plan_packed, override=True)
        _REGISTERED = True


ensure_registered()
