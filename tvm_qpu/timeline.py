"""CPU/QPU timelines: what ran where and when, and how much QPU time the CPU work hid.

Every inference is recorded as a :class:`Trace`: the sequence of events the Relax VM produced,

* ``cpu(seconds)``: CPU work between two QPU events (Relax VM, llvm ops, input/output copies),
  measured as wall time on the host, minus any time the VM thread spent emulating a region or
  blocked on the QPU;
* ``submit(job, region, qpu_seconds)``: a QPU region handed to the QPU (its duration is
  ``ExecStats.seconds``: modelled by the cycle model on the emulator, measured on v3d);
* ``wait(job)``: the first use of that region's result.

Each event also carries its wall-clock time (and each region its measured start and end), so a
trace can be shown as it happened (``measured``: on a Pi 5, where the QPU really runs beside the
CPU) or replayed by :func:`schedule` on a *virtual clock* (``modelled``: on the emulator, where
emulating a region takes seconds of host time and the QPU's duration comes from the cycle model):

* one CPU (the VM thread with its thread pool) runs the CPU segments, one at a time;
* one QPU runs regions one at a time in submission order: a region starts at
  max(its submit time, the end of the previous region) and lasts its modelled duration;
* a wait moves the waiting inference's clock to the region's end;
* with ``depth`` inferences in flight (:meth:`Runner.run_stream`), the CPU works for the oldest
  inference that is not waiting, so one inference's QPU regions overlap another's CPU ops.

The same replay with every wait moved right after its submit (:func:`as_sync`) is the sequential
offload of the same run: the difference is the QPU time hidden behind CPU work.

:func:`chrome_trace` writes a Chrome / Perfetto trace (``ph: "X"`` events; CPU and QPU on
separate tracks; QPU events in category ``qpu``), with metadata saying measured or modelled.
"""
from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field, replace


@dataclass
class Event:
    kind: str                       # "cpu" | "submit" | "wait"
    seconds: float = 0.0            # cpu: CPU time; submit: the region's QPU time
    job: int = -1                   # submit / wait: the job (ticket) id
    region: str = ""                # submit: the region's name
    wall: float = 0.0               # perf_counter at the event (cpu: at its end)
    qpu_start: float | None = None  # submit: measured wall start / end of the region (if known)
    qpu_end: float | None = None


@dataclass
class Trace:
    """The events of one inference, in VM order."""
    events: list = field(default_factory=list)
    start: float = 0.0              # perf_counter when recording began

    def cpu_seconds(self) -> float:
        return sum(e.seconds for e in self.events if e.kind == "cpu")

    def qpu_seconds(self) -> float:
        return sum(e.seconds for e in self.events if e.kind == "submit")


class Recorder:
    """Builds a :class:`Trace` while the VM runs: call :meth:`event` at each QPU event and
    :meth:`resume` after time that is not CPU work (emulating, blocked on the QPU)."""

    def __init__(self):
        self.trace = Trace(start=time.perf_counter())
        self._last = self.trace.start

    def _cpu(self, now):
        if now > self._last:
            self.trace.events.append(Event("cpu", now - self._last, wall=now))
        self._last = now

    def event(self, kind: str, **kw) -> Event:
        now = time.perf_counter()
        self._cpu(now)
        ev = Event(kind, wall=now, **kw)
        self.trace.events.append(ev)
        return ev

    def resume(self):
        """The VM thread is back to CPU work: the time since the last event was not CPU time."""
        self._last = time.perf_counter()

    def finish(self) -> Trace:
        self._cpu(time.perf_counter())
        return self.trace


_LOCAL = threading.local()


def current() -> Recorder | None:
    """The recorder of this thread's running inference, if one is being recorded."""
    return getattr(_LOCAL, "recorder", None)


class recording:
    """``with recording() as rec: vm(...)``; then ``rec.trace``. One per inference and thread."""

    def __enter__(self) -> Recorder:
        self.prev = current()
        self.rec = _LOCAL.recorder = Recorder()
        return self.rec

    def __exit__(self, *exc):
        self.rec.finish()
        _LOCAL.recorder = self.prev
        return False


# ---------------------------------------------------------------------------------------------
# the scheduler (virtual clock)

@dataclass
class Span:
    track: str                      # "cpu" | "qpu"
    name: str
    start: float
    end: float
    inference: int = 0

    @property
    def seconds(self) -> float:
        return self.end - self.start


@dataclass
class Timeline:
    spans: list
    kind: str                       # "modelled" | "measured"
    inferences: int = 1
    latencies: list = field(default_factory=list)   # per inference: finish - start

    @property
    def makespan(self) -> float:
        return max((s.end for s in self.spans), default=0.0) - min((s.start for s in self.spans), default=0.0)

    def busy(self, track: str) -> float:
        return sum(s.seconds for s in self.spans if s.track == track)

    def summary(self, sync: "Timeline | None" = None) -> dict:
        """Busy times, latency / makespan, throughput; with ``sync`` (the sequential replay of the
        same traces) also the QPU time hidden behind CPU work."""
        d = {"timeline": self.kind, "inferences": self.inferences, "cpu_busy_seconds": self.busy("cpu"),
             "qpu_busy_seconds": self.busy("qpu"), "makespan_seconds": self.makespan,
             "latency_seconds": (sum(self.latencies) / len(self.latencies)) if self.latencies else self.makespan,
             "throughput_per_second": self.inferences / self.makespan if self.makespan > 0 else None}
        if sync is not None:
            d["sync_makespan_seconds"] = sync.makespan
            d["hidden_qpu_seconds"] = max(sync.makespan - self.makespan, 0.0)
            q = d["qpu_busy_seconds"]
            d["hidden_fraction"] = d["hidden_qpu_seconds"] / q if q > 0 else 0.0
        return d


def as_sync(trace: Trace) -> Trace:
    """The same trace with each wait right after its submit: the sequential (blocking) offload."""
    out = []
    for e in trace.events:
        if e.kind == "wait":
            continue
        out.append(e)
        if e.kind == "submit":
            out.append(Event("wait", job=e.job, wall=e.wall))
    return Trace(out, trace.start)


def scale_cpu(trace: Trace, factor: float) -> Trace:
    """The same trace with every CPU segment ``factor`` times as long (e.g. x86-measured CPU time
    carried over to another CPU by a throughput ratio); QPU times unchanged."""
    if not factor > 0:
        raise ValueError(f"CPU scale factor must be > 0, got {factor}")
    return Trace([replace(e, seconds=e.seconds * factor) if e.kind == "cpu" else e for e in trace.events],
                 trace.start)


def schedule(traces: list, depth: int = 1) -> Timeline:
    """Replay ``traces`` (one per inference, in order) on the virtual clock (module docstring),
    at most ``depth`` inferences in flight. Returns the modelled :class:`Timeline`."""
    if depth < 1:
        raise ValueError(f"depth must be >= 1, got {depth}")
    n = len(traces)
    pos = [0] * n
    ready = [None] * n              # when inference i may run its next event (None: not admitted)
    begin = [0.0] * n
    finish = [None] * n
    qend: dict = {}                 # (inference, job) -> region end
    cpu_free = qpu_free = 0.0
    spans = []
    active = list(range(min(depth, n)))  # admitted and not finished: at most depth inferences
    for i in active:
        ready[i] = 0.0
    while active:
        best = None
        for i in active:
            evs = traces[i].events
            if pos[i] >= len(evs):
                at, what = ready[i], "end"
            else:
                e = evs[pos[i]]
                what = e.kind
                if what == "cpu":
                    at = max(ready[i], cpu_free)
                elif what == "wait":
                    at = max(ready[i], qend.get((i, e.job), ready[i]))
                else:
                    at = ready[i]
            if best is None or at < best[0] - 1e-15:
                best = (at, i, what)
        at, i, what = best
        if what == "end":
            finish[i] = at
            active.remove(i)
            nxt = i + depth
            if nxt < n:
                ready[nxt] = begin[nxt] = at
                active.append(nxt)
            continue
        e = traces[i].events[pos[i]]
        pos[i] += 1
        if what == "cpu":
            spans.append(Span("cpu", "cpu ops", at, at + e.seconds, i))
            cpu_free = ready[i] = at + e.seconds
        elif what == "submit":
            start = max(at, qpu_free)
            qpu_free = qend[(i, e.job)] = start + e.seconds
            spans.append(Span("qpu", e.region or "qpu region", start, qpu_free, i))
            ready[i] = at
        else:
            ready[i] = at
    return Timeline(spans, "modelled", n, [f - b for f, b in zip(finish, begin) if f is not None])


def measured(traces: list) -> Timeline:
    """The traces as they happened on the wall clock (the device really ran beside the CPU)."""
    spans = []
    t0 = min((t.start for t in traces), default=0.0)
    lat = []
    for i, t in enumerate(traces):
        last = t.start
        for e in t.events:
            if e.kind == "cpu":
                spans.append(Span("cpu", "cpu ops", e.wall - e.seconds - t0, e.wall - t0, i))
            elif e.kind == "submit" and e.qpu_start is not None and e.qpu_end is not None:
                spans.append(Span("qpu", e.region or "qpu region", e.qpu_start - t0, e.qpu_end - t0, i))
            last = max(last, e.wall)
        lat.append(last - t.start)
    return Timeline(spans, "measured", len(traces), lat)


# ---------------------------------------------------------------------------------------------
# Chrome / Perfetto trace

PID = 1
TRACKS = {"cpu": (1, "CPU (Relax VM + llvm ops)"), "qpu": (2, "QPU (V3D regions)")}


def chrome_trace(timeline: Timeline, meta: dict | None = None) -> dict:
    """The timeline as a Chrome trace-event JSON object (load it in ui.perfetto.dev or
    chrome://tracing): ``ph: "X"`` complete events in microseconds, CPU and QPU on separate
    threads of one process, QPU events in category ``qpu``."""
    ev = [{"ph": "M", "pid": PID, "name": "process_name", "args": {"name": "tvm-qpu"}}]
    for track, (tid, name) in TRACKS.items():
        ev.append({"ph": "M", "pid": PID, "tid": tid, "name": "thread_name", "args": {"name": name}})
    for s in timeline.spans:
        tid = TRACKS[s.track][0]
        ev.append({"ph": "X", "pid": PID, "tid": tid, "cat": s.track, "name": s.name,
                   "ts": s.start * 1e6, "dur": s.seconds * 1e6, "args": {"inference": s.inference}})
    info = {"timeline": timeline.kind, "inferences": timeline.inferences}
    info.update(meta or {})
    return {"traceEvents": ev, "displayTimeUnit": "ms", "metadata": info}


def write_chrome_trace(path, timeline: Timeline, meta: dict | None = None) -> str:
    with open(path, "w") as f:
        json.dump(chrome_trace(timeline, meta), f)
    return str(path)
