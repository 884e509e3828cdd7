"""Remote execution over TVM RPC, on loopback only (127.0.0.1).

The module starts, from the test itself, a TVM RPC tracker, a ``python -m tvm_qpu.rpc_server``
registered with it, a standalone ``tvm_qpu.rpc_server`` and a stock ``tvm.exec.rpc_server`` (no
tvm_qpu functions); servers use the emulator (``TVM_QPU_DEVICE=emulator``). Every wait has a
deadline and every process (its whole process group) is killed in teardown, even on failure.
``tvmc run`` is driven through subprocess, and remote outputs must equal a local run bit for bit.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tvm")
pytest.importorskip("tornado", reason="the TVM RPC tracker needs tornado")
pytest.importorskip("cloudpickle", reason="tvm.rpc.Server needs cloudpickle")

from tvm_qpu import rpc as R  # noqa: E402

MODELS = Path(__file__).resolve().parent.parent / "models"
TVMC = shutil.which("tvmc")
LOOPBACK = "127.0.0.1"
KEY = "pi5-test"
START_TIMEOUT = 30.0            # seconds for a tracker / server to come up
RUN_TIMEOUT = 120               # seconds for one tvmc subprocess
pytestmark = pytest.mark.skipif(TVMC is None, reason="tvmc console script not installed (pip install -e .)")


def free_port() -> int:
    """A port nothing listens on right now (bind to port 0 and let the kernel choose)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def tvmc(*args, cwd=None):
    return subprocess.run([TVMC, *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=RUN_TIMEOUT)


def assert_one_line_error(p, *needles):
    assert p.returncode not in (0, None), p.stdout
    err = [l for l in p.stderr.splitlines() if l.strip() and "Warning" not in l]
    assert len(err) == 1, p.stderr
    assert err[0].startswith("tvmc: error: ") and "Traceback" not in p.stderr, p.stderr
    for n in needles:
        assert n in err[0], err[0]


class Processes:
    """Background processes, each in its own process group, all killed by :meth:`kill_all`."""

    def __init__(self, folder: Path):
        self.folder, self.procs = folder, []

    def start(self, name: str, args: list, env_extra: dict | None = None) -> subprocess.Popen:
        log = open(self.folder / f"{name}.log", "wb")
        env = dict(os.environ, PYTHONUNBUFFERED="1", **(env_extra or {}))
        p = subprocess.Popen([sys.executable, *map(str, args)], stdout=log, stderr=subprocess.STDOUT,
                             env=env, start_new_session=True)
        log.close()
        self.procs.append((name, p))
        return p

    def log(self, name: str) -> str:
        path = self.folder / f"{name}.log"
        return path.read_text(errors="replace")[-2000:] if path.exists() else ""

    def wait_until(self, name: str, ready, what: str):
        """Poll ``ready()`` until true; fail (with the process's log) at START_TIMEOUT or if it died."""
        proc = dict(self.procs)[name]
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"{name} exited ({proc.returncode}) before {what}:\n{self.log(name)}")
            if ready():
                return
            time.sleep(0.2)
        pytest.fail(f"{name}: no {what} within {START_TIMEOUT} s:\n{self.log(name)}")

    def kill_all(self):
        for _, p in reversed(self.procs):
            try:
                os.killpg(p.pid, signal.SIGKILL)       # the group we created: server, its worker, sessions
            except ProcessLookupError:
                pass
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass


def tracker_keys(port: int) -> list:
    """Keys of the servers registered with the tracker on ``port`` ([] if it does not answer yet)."""
    from tvm.rpc import base
    try:
        with socket.create_connection((LOOPBACK, port), timeout=2) as s:
            s.settimeout(2)
            s.sendall(struct.pack("<i", base.RPC_TRACKER_MAGIC))
            if struct.unpack("<i", base.recvall(s, 4))[0] != base.RPC_TRACKER_MAGIC:
                return []
            base.sendjson(s, [base.TrackerCode.SUMMARY])
            return R._tracker_keys(base.recvjson(s)[1])
    except OSError:
        return []


def listening(port: int) -> bool:
    try:
        socket.create_connection((LOOPBACK, port), timeout=1).close()
        return True
    except OSError:
        return False


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A tracker with one tvm_qpu server under KEY, a standalone tvm_qpu server, a stock TVM server."""
    folder = tmp_path_factory.mktemp("rpc")
    procs = Processes(folder)
    ports = {n: free_port() for n in ("tracker", "tracked", "standalone", "stock")}
    emu = {"TVM_QPU_DEVICE": "emulator", R.TEST_HOOKS_ENV: "1"}      # test hooks: tvm_qpu.rpc.test_crash
    try:
        t = ports["tracker"]
        procs.start("tracker", ["-m", "tvm.exec.rpc_tracker", "--host", LOOPBACK, "--port", t, "--port-end", t + 1])
        procs.wait_until("tracker", lambda: listening(t) and tracker_keys(t) == [], "tracker answering")
        p = ports["tracked"]
        procs.start("tracked", ["-m", "tvm_qpu.rpc_server", "--host", LOOPBACK, "--port", p, "--port-end", p + 1,
                                "--tracker", f"{LOOPBACK}:{t}", "--key", KEY], emu)
        p = ports["standalone"]
        procs.start("standalone", ["-m", "tvm_qpu.rpc_server", "--host", LOOPBACK, "--port", p, "--port-end", p + 1],
                    emu)
        p = ports["stock"]
        procs.start("stock", ["-m", "tvm.exec.rpc_server", "--host", LOOPBACK, "--port", p, "--port-end", p + 1])
        procs.wait_until("tracked", lambda: KEY in tracker_keys(t), f"registration of key {KEY!r}")
        procs.wait_until("standalone", lambda: "listening on" in procs.log("standalone"), "listening line")
        procs.wait_until("stock", lambda: "bind to" in procs.log("stock"), "bind line")
        yield ports, procs
    finally:
        procs.kill_all()


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """The mlp compiled with every matmul on the QPU, fixed inputs, and the local emulator's outputs."""
    d = tmp_path_factory.mktemp("rpc_model")
    art = d / "mlp.tar"
    p = tvmc("compile", "--target", "qpu", "--qpu-placement", "all", MODELS / "mlp.onnx", "-o", art)
    assert p.returncode == 0, p.stderr
    assert "0 QPU region(s)" not in p.stdout, p.stdout
    x = np.random.default_rng(7).standard_normal((1, 64)).astype(np.float32)
    np.savez(d / "in.npz", input=x)
    p = tvmc("run", art, "--inputs", d / "in.npz", "--outputs", d / "local.npz", "--device", "emulator")
    assert p.returncode == 0, p.stderr
    p = tvmc("run", art, "--outputs", d / "local_filled.npz", "--device", "emulator")    # --fill-mode random
    assert p.returncode == 0, p.stderr
    return d, art


def assert_same_outputs(got_path, want_path):
    with np.load(got_path) as g, np.load(want_path) as w:
        assert sorted(g.files) == sorted(w.files) and g.files
        for k in w.files:
            assert g[k].dtype == w[k].dtype and g[k].shape == w[k].shape
            np.testing.assert_array_equal(g[k], w[k])


# ---------------------------------------------------------------------------------------------
# remote runs

def test_run_via_tracker_matches_local(cluster, model):
    ports, _ = cluster
    d, art = model
    p = tvmc("run", art, "--rpc-key", KEY, "--rpc-tracker", f"{LOOPBACK}:{ports['tracker']}", "--inputs", d / "in.npz",
             "--outputs", d / "remote.npz", "--print-time", "--profile", "--repeat", "2", "--rpc-timeout", "20")
    assert p.returncode == 0, p.stderr
    assert_same_outputs(d / "remote.npz", d / "local.npz")
    assert "mean inference time:" in p.stdout and "over 2 runs" in p.stdout
    assert "per inference (mean of 2)" in p.stdout and "3 QPU region(s)" in p.stdout
    assert "qpu.matmul_bias_relu" in p.stdout


def test_run_on_one_server_matches_local(cluster, model):
    """--hostname/--port, no --inputs: the remote fills the same random inputs as a local run."""
    ports, _ = cluster
    d, art = model
    p = tvmc("run", art, "--hostname", LOOPBACK, "--port", ports["standalone"], "--outputs", d / "remote_filled.npz",
             "--device", "emulator", "--print-top", "2")
    assert p.returncode == 0, p.stderr
    assert_same_outputs(d / "remote_filled.npz", d / "local_filled.npz")
    assert p.stdout.splitlines()[0] == "logits: top 2"


def test_remote_failure_is_the_servers_one_line(cluster, model, tmp_path):
    ports, _ = cluster
    _, art = model
    np.savez(tmp_path / "wrong.npz", data=np.zeros((1, 64), np.float32))
    p = tvmc("run", art, "--hostname", LOOPBACK, "--port", ports["standalone"], "--inputs", tmp_path / "wrong.npz")
    assert_one_line_error(p, f"remote {LOOPBACK}:{ports['standalone']}", "unknown input(s) ['data']")


# ---------------------------------------------------------------------------------------------
# a session that crashes

CRASH_CLIENT = """
import json, sys
from tvm_qpu import rpc as R
spec = R.make_spec(**json.loads(sys.argv[1]), timeout=20)
session, where = R.open_session(spec)
runner = R.RemoteRunner(session, where, {}, {"inputs": [], "outputs": []})
try:
    runner._call("test_crash")
except R.RemoteError as e:
    print("ERROR", e)
else:
    print("NO ERROR")
"""


def crash_a_session(**where):
    """Call the test-only tvm_qpu.rpc.test_crash (SIGSEGV in the session process) from a client
    subprocess; a client that hangs fails the test at the subprocess timeout instead of hanging it."""
    p = subprocess.run([sys.executable, "-c", CRASH_CLIENT, json.dumps(where)], capture_output=True, text=True,
                       timeout=RUN_TIMEOUT)
    assert p.returncode == 0, p.stderr
    return p.stdout.strip()


def test_crashed_session_is_reported_and_the_server_keeps_serving(cluster, model):
    ports, procs = cluster
    d, art = model
    out = crash_a_session(host=LOOPBACK, port=ports["standalone"])
    assert out.startswith("ERROR remote") and "remote session crashed (killed by signal SIGSEGV)" in out, out
    assert dict(procs.procs)["standalone"].poll() is None
    p = tvmc("run", art, "--hostname", LOOPBACK, "--port", ports["standalone"], "--outputs", d / "after_crash.npz",
             "--device", "emulator")
    assert p.returncode == 0, p.stderr
    assert_same_outputs(d / "after_crash.npz", d / "local_filled.npz")


def test_crashed_session_via_tracker_keeps_the_key(cluster, model):
    ports, procs = cluster
    d, art = model
    tracker = f"{LOOPBACK}:{ports['tracker']}"
    out = crash_a_session(key=KEY, tracker=tracker)
    assert "remote session crashed" in out, out
    procs.wait_until("tracked", lambda: KEY in tracker_keys(ports["tracker"]), f"re-registration of {KEY!r}")
    p = tvmc("run", art, "--rpc-key", KEY, "--rpc-tracker", tracker, "--inputs", d / "in.npz",
             "--outputs", d / "after_crash_tracked.npz", "--rpc-timeout", "20")
    assert p.returncode == 0, p.stderr
    assert_same_outputs(d / "after_crash_tracked.npz", d / "local.npz")


def test_a_dead_listen_loop_ends_the_process():
    """If TVM's listen loop ever dies, the guard ends the server process (status 1) so a
    supervisor restarts it, instead of a process that is up but not serving."""
    code = ("from tvm_qpu import rpc as R\n"
            "def loop(*a):\n    raise RuntimeError('boom')\n"
            "R._guarded_listen_loop(loop)()\n"
            "print('still here')\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=RUN_TIMEOUT)
    assert p.returncode == 1 and "still here" not in p.stdout, (p.stdout, p.stderr)
    assert "listen loop died (RuntimeError: boom)" in p.stderr


# ---------------------------------------------------------------------------------------------
# error paths

def test_no_tracker_listening(model):
    _, art = model
    port = free_port()
    p = tvmc("run", art, "--rpc-key", KEY, "--rpc-tracker", f"{LOOPBACK}:{port}")
    # refused at once, not the default timeout's "no answer in 60 s" (the message says which; a
    # wall-clock bound here failed only when the machine was busy)
    assert_one_line_error(p, f"cannot reach the RPC tracker at {LOOPBACK}:{port}", "is it running?")


def test_no_server_listening(model):
    _, art = model
    port = free_port()
    p = tvmc("run", art, "--hostname", LOOPBACK, "--port", port)
    assert_one_line_error(p, f"cannot reach the RPC server at {LOOPBACK}:{port}")


def test_unknown_key_times_out_clearly(cluster, model):
    ports, _ = cluster
    _, art = model
    t0 = time.monotonic()
    p = tvmc("run", art, "--rpc-key", "no-such-key", "--rpc-tracker", f"{LOOPBACK}:{ports['tracker']}",
             "--rpc-timeout", "2")
    elapsed = time.monotonic() - t0
    assert_one_line_error(p, "timed out after 2 s", "key 'no-such-key'", f"keys registered there: {KEY}")
    assert elapsed >= 2                 # it did wait; no upper bound: tvmc's start-up alone takes
                                        # 10 s and more on a busy 2-core machine


def test_stock_server_without_tvm_qpu_is_explained(cluster, model):
    ports, _ = cluster
    _, art = model
    p = tvmc("run", art, "--hostname", LOOPBACK, "--port", ports["stock"])
    assert_one_line_error(p, "does not serve tvm_qpu", "python -m tvm_qpu.rpc_server")


@pytest.mark.parametrize("flags, needle", [
    (["--rpc-key", KEY], "--rpc-key needs --rpc-tracker"),
    (["--hostname", LOOPBACK, "--rpc-tracker", f"{LOOPBACK}:1", "--rpc-key", KEY], "not both"),
    (["--rpc-tracker", "nohostport", "--rpc-key", KEY], "bad tracker address"),
])
def test_bad_flag_combinations(model, flags, needle):
    _, art = model
    assert_one_line_error(tvmc("run", art, *flags), needle)


# ---------------------------------------------------------------------------------------------
# in-process units (no network)

def test_npz_transport_refuses_pickles():
    buf = __import__("io").BytesIO()
    np.savez(buf, a=np.array([{"x": 1}], dtype=object))
    with pytest.raises(R.RemoteError, match="not a readable .npz"):
        R.npz_to_arrays(buf.getvalue())
    a = {"y": np.arange(6, dtype=np.int8).reshape(2, 3)}
    back = R.npz_to_arrays(R.arrays_to_npz(a))
    np.testing.assert_array_equal(back["y"], a["y"])
    assert back["y"].dtype == np.int8 and R.npz_to_arrays(b"") == {}


def test_remote_message_strips_rpc_wrapping():
    e = RuntimeError("RPCError: Error caught from RPC call:\n" + R.ERROR_MARK + "input 'x' missing\nmore")
    assert R.remote_message(e) == "input 'x' missing"
    assert R.remote_message(RuntimeError("RPCError: Error caught from RPC call:\nboom")) == "boom"


@pytest.mark.parametrize("text, ok", [("10.0.0.2:9190", ("10.0.0.2", 9190)), ("[::1]:9190", ("::1", 9190)),
                                      ("host", None), ("host:0", None), ("host:x", None), (":9190", None)])
def test_parse_address(text, ok):
    if ok:
        assert R.parse_address(text, "tracker") == ok
    else:
        with pytest.raises(R.RemoteError, match="expected host:port"):
            R.parse_address(text, "tracker")


def test_server_functions_are_registered_on_import():
    import tvm_ffi
    for name in R.FUNCS:
        assert tvm_ffi.get_global_func(f"tvm_qpu.rpc.{name}", allow_missing=True) is not None
    if os.environ.get(R.TEST_HOOKS_ENV) != "1":             # the crash hook exists only when asked for
        assert tvm_ffi.get_global_func("tvm_qpu.rpc.test_crash", allow_missing=True) is None
    with pytest.raises(Exception, match=R.ERROR_MARK + "not inside a TVM RPC server session|no model loaded"):
        tvm_ffi.get_global_func("tvm_qpu.rpc.run")(b"", "random")


# ---------------------------------------------------------------------------------------------
# tvmc tune --target qpu: the QPU kernels are timed on the server's device

def _measure_remotely(out, **where):
    """``tvm_qpu.tune.tune(--qpu-measure only)`` of the mlp against a remote server; its log."""
    import io
    from tvm_qpu import tune as T
    log = io.StringIO()
    T.tune(MODELS / "mlp.onnx", out, target="qpu", qpu_measure="only", out=log,
           remote=T.RemoteSpec(timeout=60, **where))
    return T.read_records(out), log.getvalue()


def _check_emulator_entries(rec, where):
    """Every QPU op of the mlp has an entry made by the server's emulator (its cycle model, so the
    device is 'emulator', never v3d) for the very plan this machine generates, with the time the
    same plan takes on this machine's emulator (the cycle model is deterministic)."""
    from tvm_qpu import tune as T
    ops = T.qpu_ops(MODELS / "mlp.onnx")
    assert len(ops) >= 3 and sorted(rec.qpu) == sorted(op.key for op in ops)
    for op in ops:
        e = rec.qpu[op.key]
        assert e["device"] == "emulator" and e["where"] == where and e["qpus"] == 12
        assert e["plan"] == T.plan_identity(op.plan)
        local = T.measure_plan(op.plan, "emulator")
        assert e["seconds"] == local["seconds"] and e["launches"] == len(op.plan.launches)
    return len(ops)


def test_tune_times_qpu_kernels_on_a_server(cluster, tmp_path):
    ports, _ = cluster
    rec, log = _measure_remotely(tmp_path / "q.json", host=LOOPBACK, port=ports["standalone"])
    n = _check_emulator_entries(rec, f"RPC server {LOOPBACK}:{ports['standalone']}")
    assert f"measuring {n} of {n} QPU op kernel(s)" in log and "modelled by the emulator's cycle model" in log
    assert not rec.workloads                       # --qpu-measure only: no CPU tuning
    # the same -o again: every op is already measured there, nothing is sent
    _, log = _measure_remotely(tmp_path / "q.json", host=LOOPBACK, port=ports["standalone"])
    assert f"measuring 0 of {n}" in log


def test_tune_times_qpu_kernels_via_the_tracker(cluster, tmp_path):
    ports, _ = cluster
    rec, _ = _measure_remotely(tmp_path / "q.json", tracker=(LOOPBACK, ports["tracker"]), key=KEY)
    _check_emulator_entries(rec, f"RPC tracker {LOOPBACK}:{ports['tracker']} key {KEY}")


def test_tune_qpu_on_a_stock_server_is_explained(cluster, tmp_path):
    from tvm_qpu import tune as T
    ports, _ = cluster
    with pytest.raises(T.TuningError, match="cannot measure QPU kernels.*python -m tvm_qpu.rpc_server"):
        _measure_remotely(tmp_path / "q.json", host=LOOPBACK, port=ports["stock"])


# ---------------------------------------------------------------------------------------------
# a fleet server that runs only signed artifacts

def test_server_with_trusted_key_runs_only_signed_artifacts(model, tmp_path):
    """``rpc_server --trusted-key`` checks the signature on the server itself: an unsigned upload
    (or one signed by another key) is refused there, one signed by the trusted key runs and equals
    the local run."""
    d, art = model
    for stem in ("fleet", "other"):
        p = tvmc("keygen", tmp_path / stem)
        assert p.returncode == 0, p.stderr
    signed = tmp_path / "signed.tar"
    p = tvmc("compile", "--target", "qpu", "--qpu-placement", "all", MODELS / "mlp.onnx", "-o", signed,
             "--sign-key", tmp_path / "fleet.key")
    assert p.returncode == 0, p.stderr
    foreign = tmp_path / "foreign.tar"
    p = tvmc("compile", "--target", "qpu", "--qpu-placement", "all", MODELS / "mlp.onnx", "-o", foreign,
             "--sign-key", tmp_path / "other.key")
    assert p.returncode == 0, p.stderr
    procs = Processes(tmp_path)
    port = free_port()
    try:
        procs.start("trusting", ["-m", "tvm_qpu.rpc_server", "--host", LOOPBACK, "--port", port,
                                 "--port-end", port + 1, "--trusted-key", tmp_path / "fleet.pub"],
                    {"TVM_QPU_DEVICE": "emulator"})
        procs.wait_until("trusting", lambda: "listening on" in procs.log("trusting"), "listening line")
        where = ("--hostname", LOOPBACK, "--port", port, "--device", "emulator")
        for bad in (art, foreign):
            p = tvmc("run", bad, *where, "--inputs", d / "in.npz")
            assert p.returncode != 0 and "sign" in p.stderr.lower(), (p.stdout, p.stderr)
        p = tvmc("run", signed, *where, "--inputs", d / "in.npz", "--outputs", tmp_path / "out.npz")
        assert p.returncode == 0, p.stderr
        assert_same_outputs(tmp_path / "out.npz", d / "local.npz")
    finally:
        procs.kill_all()


def test_server_refuses_a_bad_trusted_key_file(tmp_path):
    bad = tmp_path / "bad.pub"
    bad.write_text("not a key")
    p = subprocess.run([sys.executable, "-m", "tvm_qpu.rpc_server", "--port", str(free_port()),
                        "--trusted-key", str(bad)], capture_output=True, text=True, timeout=RUN_TIMEOUT)
    assert p.returncode == 2 and "bad.pub" in p.stderr, p.stderr
