"""Asynchronous QPU regions, the CPU/QPU timeline, Chrome traces and pipelined streams.

The model (built here with onnx.helper) has one QPU region (a MatMul, placement "all", the real
GEMM kernel on the emulator) beside CPU ops that do not need its result (Sin, Floor), joined by an
Add: the submit must come before the CPU ops and the wait after them. References: ONNX Runtime,
the synchronous build (``async_regions=False``), and hand-computed schedules for the scheduler.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("tvm")
onnx = pytest.importorskip("onnx")

import tvm_qpu  # noqa: E402
from tvm_qpu import timeline as T  # noqa: E402


def _model(path, n=32):
    from onnx import TensorProto, helper
    w = (np.random.default_rng(1).standard_normal((n, n)) / n).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["a"]),
             helper.make_node("Sin", ["x"], ["s"]),
             helper.make_node("Floor", ["s"], ["f"]),
             helper.make_node("Mul", ["a", "f"], ["y"])]   # Mul: no QPU kernel, stays on the CPU
    g = helper.make_graph(nodes, "async_tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, n])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, n])],
                          [helper.make_tensor("w", TensorProto.FLOAT, [n, n], w.ravel())])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(m, path)
    return path


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    path = _model(tmp_path_factory.mktemp("async") / "tiny.onnx")
    mod, params = tvm_qpu.from_onnx(path)
    libs = {a: tvm_qpu.build(mod, placement="all", params=params, async_regions=a) for a in (True, False)}
    assert [r.info.kind for r in libs[True].regions] == ["matmul"]
    return path, libs


def _inputs(i, n=32):
    return {"x": (np.random.default_rng(100 + i).standard_normal((1, n)) * 3).astype(np.float32)}


def _ort(path, x):
    ort = pytest.importorskip("onnxruntime")
    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return s.run(None, x)[0]


def test_ir_waits_at_first_use_after_independent_cpu_ops(built):
    _, libs = built
    lines = [ln.strip() for ln in libs[True].relax_module.script().splitlines()]
    where = lambda pred: [i for i, ln in enumerate(lines) if pred(ln)]     # noqa: E731
    submit = where(lambda ln: "tvm_qpu.submit_plan" in ln)
    wait = where(lambda ln: "tvm_qpu.wait_plan" in ln)
    sin = where(lambda ln: "R.sin(" in ln or "sin" in ln and "call_tir" in ln)
    mul = where(lambda ln: "R.multiply(" in ln or "multiply" in ln and "call_tir" in ln)
    assert len(submit) == 1 and len(wait) == 1 and sin and mul
    assert not any("tvm_qpu.run_plan" in ln for ln in lines)
    assert submit[0] < sin[0] < wait[0] < mul[0]
    sync = libs[False].relax_module.script()
    assert "tvm_qpu.run_plan" in sync and "submit_plan" not in sync


def test_async_equals_sync_and_onnxruntime(built):
    path, libs = built
    runners = {a: lib.runner("emulator") for a, lib in libs.items()}
    try:
        for i in range(2):
            x = _inputs(i)
            got = {a: r.run(**x)["y"] for a, r in runners.items()}
            np.testing.assert_array_equal(got[True], got[False])
            np.testing.assert_allclose(got[True], _ort(path, x), rtol=1e-5, atol=1e-5)
    finally:
        for r in runners.values():
            r.close()


@pytest.mark.parametrize("threaded", [False, True])
def test_region_error_surfaces_at_its_wait_with_its_name(built, threaded):
    from tvm_qpu.runtime.device import DeviceError
    from tvm_qpu.runtime.emulator import EmulatorDevice

    class Failing(EmulatorDevice):
        def execute(self, *a, **k):
            raise DeviceError("the QPU is on fire")

    _, libs = built
    r = libs[True].runner(Failing())
    r.executor.threaded = threaded          # True: raised in the QPU worker thread, seen at the wait
    try:
        with pytest.raises(DeviceError, match=r"QPU region qpu\.matmul.*the QPU is on fire"):
            r.run(**_inputs(0))
        assert not r.executor._jobs         # nothing left in flight
    finally:
        r.close()


def test_scheduler_matches_hand_computed_timelines():
    E = T.Event
    one = T.Trace([E("cpu", 1.0), E("submit", 3.0, job=1, region="q"), E("cpu", 2.0), E("wait", job=1),
                   E("cpu", 1.0)])
    t = T.schedule([one])
    # cpu [0,1]; qpu [1,4]; cpu [1,3]; wait until 4; cpu [4,5]
    assert [(s.track, s.start, s.end) for s in t.spans] == [("cpu", 0, 1), ("qpu", 1, 4), ("cpu", 1, 3),
                                                            ("cpu", 4, 5)]
    assert t.makespan == 5.0
    assert T.schedule([T.as_sync(one)]).makespan == 7.0
    # two inferences, two in flight: the second's CPU work runs while the first waits
    two = T.schedule([one, one], depth=2)
    # inf0 cpu[0,1] q[1,4] cpu[1,3]; inf1 cpu[3,4] q[4,7]; inf0 cpu[4,5]; inf1 cpu[5,7] wait->7 cpu[7,8]
    assert two.makespan == 8.0
    assert T.schedule([one, one], depth=1).makespan == 10.0
    qpu = sorted((s.start, s.end) for s in two.spans if s.track == "qpu")
    assert qpu == [(1, 4), (4, 7)]
    # CPU segments twice as long (another CPU), QPU unchanged: cpu [0,2]; qpu [2,5]; cpu [2,6];
    # no wait (the region ended at 5); cpu [6,8]
    slow = T.scale_cpu(one, 2.0)
    assert T.schedule([slow]).makespan == 8.0 and slow.qpu_seconds() == one.qpu_seconds() == 3.0
    with pytest.raises(ValueError, match="factor"):
        T.scale_cpu(one, 0.0)


def _check_trace(path, regions):
    d = json.loads(open(path).read())
    xs = [e for e in d["traceEvents"] if e["ph"] == "X"]
    qpu = [e for e in xs if e["cat"] == "qpu"]
    cpu = [e for e in xs if e["cat"] == "cpu"]
    assert qpu and cpu and len(qpu) == regions
    assert {e["tid"] for e in qpu}.isdisjoint({e["tid"] for e in cpu})
    assert all(e["dur"] >= 0 and {"pid", "tid", "ts", "name"} <= set(e) for e in xs)
    spans = sorted((e["ts"], e["ts"] + e["dur"]) for e in qpu)
    assert all(a[1] <= b[0] + 1e-6 for a, b in zip(spans, spans[1:])), "QPU spans overlap"
    assert d["metadata"]["timeline"] == "modelled" and "cycle model" in d["metadata"]["how"]
    assert d["metadata"]["makespan_us"] <= d["metadata"]["sync_makespan_us"] + 1e-6
    return d


def test_trace_and_overlap_of_one_run(built, tmp_path):
    _, libs = built
    r = libs[True].runner("emulator")
    try:
        r.run(**_inputs(0))
        _check_trace(r.trace(tmp_path / "t.json"), 1)
        tr = r.last_traces[0]
        kinds = [e.kind for e in tr.events if e.kind != "cpu"]
        assert kinds == ["submit", "wait"]
        t = r.timeline()
        sub = next(e for e in tr.events if e.kind == "submit")
        cpu_before = sum(e.seconds for e in tr.events[:tr.events.index(sub)] if e.kind == "cpu")
        q = [s for s in t.spans if s.track == "qpu"][0]
        assert q.start == pytest.approx(cpu_before) and q.seconds == pytest.approx(sub.seconds)
        assert sub.seconds > 0                      # the cycle model's time for the GEMM
        ov = r.overlap()
        assert ov["sync_makespan_seconds"] == pytest.approx(ov["cpu_busy_seconds"] + ov["qpu_busy_seconds"])
        assert 0 <= ov["hidden_qpu_seconds"] <= ov["qpu_busy_seconds"] + 1e-12
        prof = r.profile(_inputs(0), repeat=1)
        assert prof.overlap is not None and "QPU time hidden behind CPU work" in prof.text()
    finally:
        r.close()


@pytest.mark.parametrize("threaded", [False, True])
def test_run_stream_outputs_in_order_and_bounded(built, tmp_path, threaded):
    _, libs = built
    r = libs[True].runner("emulator")
    r.executor.threaded = threaded          # True: the real-GPU path (QPU worker thread, VM threads)
    try:
        want = [r.run(**_inputs(i))["y"] for i in range(4)]
        pulled = []

        def items():
            for i in range(4):
                pulled.append(i)
                yield _inputs(i)

        stream = r.run_stream(items(), depth=2)
        first = next(stream)
        assert len(pulled) <= 2                 # at most depth inferences in flight
        got = [first["y"]] + [o["y"] for o in stream]
        assert len(got) == 4
        for g, w in zip(got, want):
            np.testing.assert_array_equal(g, w)
        assert len(r.last_traces) == 4 and r.last_depth == 2
        if not threaded:
            _check_trace(r.trace(tmp_path / "s.json"), 4)
            ov = r.overlap()
            assert ov["inferences"] == 4 and ov["throughput_per_second"] > 0
            assert ov["makespan_seconds"] <= ov["sync_makespan_seconds"] + 1e-12
    finally:
        r.close()


def test_run_stream_rejects_bad_items_and_depth(built):
    _, libs = built
    r = libs[True].runner("emulator")
    try:
        with pytest.raises(tvm_qpu.QpuError, match="depth"):
            next(r.run_stream([_inputs(0)], depth=0))
        with pytest.raises(tvm_qpu.QpuError, match="dict of named inputs"):
            next(r.run_stream([np.zeros((1, 32), np.float32)]))
    finally:
        r.close()


def test_tvmc_run_trace_and_stream(built, tmp_path, capsys):
    from tvm_qpu import cli
    _, libs = built
    art = libs[True].save(tmp_path / "m.tar")
    rc = cli.main(["run", art, "--device", "emulator", "--stream", "3", "--trace", str(tmp_path / "t.json"),
                   "--profile", "--repeat", "1"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "stream: 3 inferences, 2 in flight" in out and "throughput (modelled)" in out
    assert "QPU time hidden behind CPU work" in out
    _check_trace(tmp_path / "t.json", 3)
    assert cli.main(["run", art, "--depth", "2"]) != 0


@pytest.mark.parametrize("threaded", [False, True])
@pytest.mark.usefixtures("sigint_default")
def test_ctrl_c_while_a_region_runs_then_the_runner_recovers(built, threaded):
    """interrupt_main while the region runs (emulated at its submit, or in the QPU worker thread
    while the VM waits): KeyboardInterrupt, the device told to stop, and the next run is right."""
    import _thread
    import threading
    from tvm_qpu.runtime.device import DeviceError
    from tvm_qpu.runtime.emulator import EmulatorDevice

    class Blocking(EmulatorDevice):
        def __init__(self):
            super().__init__()
            self.started, self.stopped, self.block = threading.Event(), threading.Event(), True

        def execute(self, *a, **k):
            if self.block:
                self.block = False
                self.started.set()
                assert self.stopped.wait(20), "never interrupted"
                raise DeviceError("stopped")
            if self.stopped.is_set():
                raise DeviceError("still told to stop")
            return super().execute(*a, **k)

        def interrupt(self, stop=True):
            (self.stopped.set if stop else self.stopped.clear)()
            super().interrupt(stop)

    path, libs = built
    dev = Blocking()
    r = libs[True].runner(dev)
    r.executor.threaded = threaded
    x = _inputs(0)
    t = threading.Thread(target=lambda: dev.started.wait(20) and _thread.interrupt_main())
    t.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            r.run(**x)
        t.join()
        assert dev.stopped.is_set() and not r.executor._jobs
        got = r.run(**x)["y"]
    finally:
        r.close()
    np.testing.assert_allclose(got, _ort(path, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("where", ["submit returns", "wait returns", "worker thread"])
@pytest.mark.usefixtures("sigint_default")
def test_ctrl_c_at_any_point_of_a_vm_call_is_a_keyboard_interrupt(built, where):
    """SIGINT at awkward moments of a run: raised in the main thread just as the region's submit
    or wait returns into TVM's FFI, or sent from the QPU worker thread at random moments. Always a
    KeyboardInterrupt out of Runner.run (never the FFI's empty RuntimeError), the QPU told to stop,
    and the next run is right. Before SIGINT was deferred (executor._deferred_sigint) the first two
    cases always failed, and the test above about half the time (a KeyboardInterrupt raised inside
    the FFI's conversion of submit_plan's return value)."""
    import _thread
    import random
    import signal
    import time
    from tvm_qpu.runtime.emulator import EmulatorDevice

    class Signalling(EmulatorDevice):
        delay = None
        stops = 0

        def execute(self, *a, **k):
            if self.delay is not None:
                d, self.delay = self.delay, None
                time.sleep(d)
                _thread.interrupt_main()
            return super().execute(*a, **k)

        def interrupt(self, stop=True):
            self.stops += bool(stop)
            super().interrupt(stop)

    path, libs = built
    dev = Signalling()
    r = libs[True].runner(dev)
    ex = r.executor
    ex.threaded = True
    armed = [False]

    def signalling(method):
        def call(*a, **k):
            out = method(*a, **k)
            if armed[0]:
                armed[0] = False
                signal.raise_signal(signal.SIGINT)
            return out
        return call

    if where == "submit returns":
        ex.submit = signalling(ex.submit)
    elif where == "wait returns":
        ex.wait = signalling(ex.wait)
    x = _inputs(3)
    rnd = random.Random(7)
    try:
        for i in range(6 if where == "worker thread" else 2):
            armed[0] = where != "worker thread"
            if where == "worker thread":
                dev.delay = rnd.choice([0.0, 0.0005, 0.002, 0.01])
            stops = dev.stops
            with pytest.raises(KeyboardInterrupt):
                r.run(**x)
            assert dev.stops > stops
            got = r.run(**x)["y"]
            np.testing.assert_allclose(got, _ort(path, x), rtol=1e-5, atol=1e-5)
    finally:
        r.close()


def test_region_call_state_checks_inputs_and_writes_the_destination(built):
    """The per-region state prepared at load (executor.RegionSlot): a wrong input shape or dtype is
    a ValueError naming the input; the output goes into the caller's destination; a region
    submitted twice before its wait keeps the first result (each equals x @ w in numpy)."""
    path, libs = built
    w = onnx.numpy_helper.to_array(onnx.load(str(path)).graph.initializer[0])
    r = libs[True].runner("emulator")
    try:
        ex = r.executor
        (key,) = list(ex.info)
        x0, x1 = (_inputs(i)["x"] for i in (0, 1))
        with pytest.raises(ValueError, match=r"input .* must be float32\[1, 32\]"):
            ex.submit(key, [x0[:, :16]])
        with pytest.raises(ValueError, match="must be float32"):
            ex.submit(key, [x0.astype(np.float64)])
        with pytest.raises(ValueError, match="1 inputs expected, got 2"):
            ex.submit(key, [x0, x0])
        t0 = ex.submit(key, [x0])
        t1 = ex.submit(key, [x1])                   # the first result moves to the host
        out = np.full((1, 32), np.nan, np.float32)
        assert ex.wait(t1, out) is out
        np.testing.assert_allclose(out, x1 @ w, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(ex.wait(t0), x0 @ w, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(ex.run(key, [x0]), x0 @ w, rtol=1e-5, atol=1e-5)
    finally:
        r.close()


EXIT_WHILE_RUNNING = r"""
import atexit, sys, threading, time
runs, errors, threads = {}, {}, []

def report():       # registered before tvm_qpu's exit hook, so it runs after it (atexit is LIFO)
    for t in threads:
        t.join(10)
    print("ended", sorted(errors.items()), [t.name for t in threads if t.is_alive()], flush=True)

atexit.register(report)
import numpy as np
import tvm_qpu

mod, params = tvm_qpu.from_onnx(sys.argv[1])
lib = tvm_qpu.build(mod, placement="all", params=params)
x = np.ones((1, 32), np.float32)

def loop(name, threaded):
    r = lib.runner("emulator")
    r.executor.threaded = threaded      # False: emulated in this thread; True: in the QPU worker thread
    try:
        while True:
            r.run(x=x)
            runs[name] = runs.get(name, 0) + 1
    except BaseException as e:
        errors[name] = type(e).__name__

for name, threaded in (("inline", False), ("worker", True)):
    threads.append(threading.Thread(target=loop, args=(name, threaded), name=name, daemon=True))
    threads[-1].start()
deadline = time.monotonic() + 120
while min(runs.get("inline", 0), runs.get("worker", 0)) < 3 and time.monotonic() < deadline:
    time.sleep(0.01)
print("leaving after runs", sorted(runs), flush=True)
"""


def test_exit_while_regions_run_in_daemon_threads(tmp_path):
    """The interpreter exits while two daemon threads run the model in a loop (one emulating its
    regions itself, one waiting for the QPU worker thread). Before executor._at_exit, a thread that
    needed the GIL during finalization was ended by pthread_exit inside TVM's C++ frames: the process
    aborted ("FATAL: exception not rethrown", exit 134) in 3 of 3 runs. Now the exit hook stops the
    regions and waits for the threads to leave their runs: exit 0, and both runs end with
    InterpreterExiting (before the interpreter finalizes: the script's own exit hook sees it)."""
    import subprocess
    import sys
    path = _model(tmp_path / "tiny.onnx")
    p = subprocess.run([sys.executable, "-c", EXIT_WHILE_RUNNING, str(path)], capture_output=True, text=True,
                       timeout=300)
    assert "leaving after runs ['inline', 'worker']" in p.stdout, p.stdout + p.stderr[-3000:]
    assert p.returncode == 0, p.stderr[-3000:]
    for bad in ("FATAL", "terminate called", "Aborted", "corrupted", "Segmentation", "Fatal Python error"):
        assert bad not in p.stderr, p.stderr[-3000:]
    assert "ended [('inline', 'InterpreterExiting'), ('worker', 'InterpreterExiting')] []" in p.stdout, \
        p.stdout + p.stderr[-3000:]
