"""Remote execution over TVM RPC: run an artifact on a Raspberry Pi 5 (or any machine) from one host.

Two halves live here:

* **server functions**, registered as TVM global functions when this module is imported
  (:func:`register_server_functions`). A stock ``python -m tvm.exec.rpc_server`` cannot import
  Python packages (its ``--load-library`` only ``dlopen``\\ s shared libraries), so the server is
  started with ``python -m tvm_qpu.rpc_server`` (same flags), which hands :func:`server_init` to
  ``tvm.rpc.Server(server_init_callback=...)``: the RPC worker process imports tvm_qpu before it
  serves, and every session (a fork of that worker) inherits the functions.

  ============================  ===============================================================
  ``tvm_qpu.rpc.hello()``        JSON: protocol, versions, machine arch of the server
  ``tvm_qpu.rpc.load(f, dev)``   load the uploaded artifact ``f`` (a plain file name in the
                                 session's work folder) on device ``dev``; JSON: inputs, outputs, device
  ``tvm_qpu.rpc.run(npz, fill)`` run once; inputs and outputs are bytes of ``.npz`` files
                                 (``allow_pickle=False`` both ways); empty inputs -> ``fill`` mode
  ``tvm_qpu.rpc.profile(npz, n)``  JSON of :meth:`tvm_qpu.api.Profile.as_dict` over ``n`` runs
  ``tvm_qpu.rpc.close()``        release the runner and the device
  ``tvm_qpu.rpc.measure_plan``   ``(plan_json, constants_npz, repeat, modelled_s)``: time one
                                 kernel plan on this machine's QPU device
                                 (:func:`tvm_qpu.tune.measure_plan`; ``tvmc tune --target qpu``);
                                 JSON of the record entry (device kind, seconds, QPUs, host)
  ============================  ===============================================================

  Failures are raised with :data:`ERROR_MARK` in front of one line, so the client can show the
  server's message without TVM's RPC wrapping.

  A session that *crashes* (native code killed by a signal, e.g. a segfault in a TVM kernel) must
  not take the server with it: :func:`install_session_guard` (called by :func:`server_init`)
  replaces the session handler of TVM's server loop by :func:`serve_session`, which sends the
  client "remote session crashed" and goes back to listening (and re-registering with the
  tracker), and makes the server process exit if its listen loop ever dies, so a supervisor
  (systemd ``Restart=``) restarts it instead of it running without serving.

* **the client**: :func:`load_remote` (used by ``tvmc run --rpc-key K --rpc-tracker H:P`` and
  ``tvmc run --hostname H --port P``) validates the artifact locally, finds a server (bounded by
  ``timeout``), uploads the artifact and returns a :class:`RemoteRunner` with the local
  :class:`tvm_qpu.api.Runner` interface (``run``, ``fill_inputs``, ``profile``, ``close``).

No user data is pickled: arrays travel as ``.npz`` bytes, everything else as JSON text.
RPC servers execute whatever a client uploads: run them on trusted networks only (docs/rpc.md).
"""
from __future__ import annotations

import io
import json
import os
import platform
import socket
import struct
import time
from dataclasses import dataclass

import numpy as np

PROTOCOL = 1
ERROR_MARK = "tvm_qpu-remote-error: "
UPLOAD_NAME = "artifact.tar"
DEFAULT_TIMEOUT = 60.0           # seconds to reach a tracker/server and to get a free server
FUNCS = ("hello", "load", "run", "profile", "close", "measure_plan")
#: set to 1 in a server's environment to register the test-only ``tvm_qpu.rpc.test_crash``
TEST_HOOKS_ENV = "TVM_QPU_RPC_TEST_HOOKS"
CRASHED = "remote session crashed"


class RemoteError(Exception):
    """Remote execution failed (no tracker, no server, no free server in time, or the server said no)."""


# ---------------------------------------------------------------------------------------------
# server side

_SESSION: dict = {}          # per RPC session process: "runner" -> tvm_qpu.api.Runner


def _one_line(e) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def _describe(e: BaseException) -> str:
    """One line for an exception; the type is kept unless it is one of tvm_qpu's own errors."""
    own = type(e).__name__ in ("QpuError", "ArtifactError", "DeviceError", "RemoteError")
    return _one_line(e) if own else f"{type(e).__name__}: {_one_line(e)}"


def _server_errors(fn):
    """Wrap a server function so any failure reaches the client as ERROR_MARK + one line."""
    def wrapped(*args):
        try:
            return fn(*args)
        except Exception as e:
            raise RuntimeError(ERROR_MARK + _describe(e)) from None
    wrapped.__name__ = fn.__name__
    wrapped.__doc__ = fn.__doc__
    return wrapped


def _native_arch() -> str:
    m = platform.machine().lower()
    return {"arm64": "aarch64", "amd64": "x86_64"}.get(m, m)


def _workpath(name: str) -> str:
    """The session folder's path for an uploaded plain file name (no folders, no '..')."""
    name = str(name)
    if not name or "/" in name or "\\" in name or name in (".", "..") or "\x00" in name:
        raise RemoteError(f"bad upload name {name!r}: a plain file name is expected")
    import tvm_ffi
    f = tvm_ffi.get_global_func("tvm.rpc.server.workpath", allow_missing=True)
    if f is None:
        raise RemoteError("not inside a TVM RPC server session (tvm.rpc.server.workpath is missing)")
    return str(f(name))


def arrays_to_npz(arrays: dict) -> bytes:
    """{name: array} -> bytes of an uncompressed .npz (no object arrays)."""
    buf = io.BytesIO()
    np.savez(buf, **{k: np.asarray(v) for k, v in arrays.items()})
    return buf.getvalue()


def npz_to_arrays(data) -> dict:
    """Bytes of a .npz -> {name: array}; refuses pickled (object) arrays."""
    data = bytes(data)
    if not data:
        return {}
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except Exception as e:
        raise RemoteError(f"not a readable .npz of arrays ({type(e).__name__}: {e})") from None


def _runner():
    r = _SESSION.get("runner")
    if r is None:
        raise RemoteError("no model loaded in this session (call tvm_qpu.rpc.load first)")
    return r


def _inputs(runner, npz, fill_mode: str) -> dict:
    given = npz_to_arrays(npz)
    return given if given else runner.fill_inputs(str(fill_mode) or "random")


def _srv_hello() -> str:
    """Who is serving: protocol version, package versions and machine arch."""
    import tvm
    from . import __version__
    return json.dumps({"protocol": PROTOCOL, "tvm_qpu_version": __version__, "tvm_version": tvm.__version__,
                       "arch": _native_arch(), "hostname": platform.node()})


#: environment variable through which ``python -m tvm_qpu.rpc_server --trusted-key`` hands its
#: public key files to the session processes (os.pathsep-separated); set: unsigned artifacts and
#: artifacts signed by any other key are refused on the server itself
TRUSTED_KEYS_ENV = "TVM_QPU_TRUSTED_KEYS"


def server_trusted_keys() -> list | None:
    """The public key files this server trusts (``TRUSTED_KEYS_ENV``), or None: trust every upload."""
    text = os.environ.get(TRUSTED_KEYS_ENV, "")
    keys = [k for k in text.split(os.pathsep) if k]
    return keys or None


def _srv_load(file_name: str, device: str) -> str:
    """Load an uploaded artifact on ``device`` (closing any previous one), checking its signature
    when the server was started with trusted keys. JSON: io and device."""
    from .api import load
    _srv_close()
    runner = load(_workpath(file_name), device=str(device) or "auto", trusted_keys=server_trusted_keys())
    _SESSION["runner"] = runner
    dev = "none (no QPU regions)"
    if runner.executor.info:
        dev = type(runner.executor.device).__name__
    return json.dumps({"inputs": runner.inputs, "outputs": runner.outputs, "device": dev})


def _srv_run(npz, fill_mode: str) -> bytearray:
    """One inference; inputs and outputs as .npz bytes."""
    runner = _runner()
    return bytearray(arrays_to_npz(runner.run(**_inputs(runner, npz, fill_mode))))


def _srv_profile(npz, repeat: int) -> str:
    """Profile.as_dict() as JSON, over ``repeat`` runs on the given (or filled) inputs."""
    runner = _runner()
    return json.dumps(runner.profile(_inputs(runner, npz, "random"), repeat=max(1, int(repeat))).as_dict())


def _srv_close() -> None:
    runner = _SESSION.pop("runner", None)
    if runner is not None:
        runner.close()


def _srv_measure_plan(plan_json: str, constants_npz, repeat: int, modelled_seconds: float) -> str:
    """Time one kernel plan (KernelPlan.to_json text + its constants as .npz bytes) on this
    machine's QPU device ("auto": v3d on a Pi 5, else the emulator; ``TVM_QPU_DEVICE`` overrides);
    ``modelled_seconds`` < 0: no estimate. JSON of :func:`tvm_qpu.tune.measure_plan`'s entry."""
    from .codegen.plan import KernelPlan
    from .tune import measure_plan
    try:
        d = json.loads(str(plan_json))
        plan = KernelPlan.from_json(d, npz_to_arrays(constants_npz))
    except (ValueError, KeyError, TypeError) as e:
        raise RemoteError(f"not a kernel plan ({type(e).__name__}: {_one_line(e)})") from None
    modelled = float(modelled_seconds)
    return json.dumps(measure_plan(plan, "auto", int(repeat), modelled if modelled >= 0 else None))


def _srv_test_crash() -> None:
    """Test only (registered when $TVM_QPU_RPC_TEST_HOOKS=1): kill this session process with
    SIGSEGV, as a segfault in native code would."""
    import signal
    os.kill(os.getpid(), signal.SIGSEGV)


def register_server_functions() -> None:
    """Register ``tvm_qpu.rpc.<name>`` for every server function (idempotent)."""
    import tvm_ffi
    for name in FUNCS:
        tvm_ffi.register_global_func(f"tvm_qpu.rpc.{name}", _server_errors(globals()[f"_srv_{name}"]),
                                     override=True)
    if os.environ.get(TEST_HOOKS_ENV) == "1":
        tvm_ffi.register_global_func("tvm_qpu.rpc.test_crash", _srv_test_crash, override=True)


def _exit_description(code: int) -> str:
    import signal
    if code < 0:
        try:
            return f"killed by signal {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit status {code}"


def _kill_tree(pid: int) -> None:
    try:
        import psutil
        for child in psutil.Process(pid).children(recursive=True):
            child.kill()
    except Exception:        # psutil missing, or the process is already gone
        pass


def serve_session(sock, addr, opts, load_library) -> None:
    """Serve one RPC session in a child process (the replacement for TVM's
    ``tvm.rpc.server._serving``). Unlike TVM's, a child that dies (crash, abort, non-zero exit)
    gets the client an error naming it (``remote session crashed ...``) and the server goes
    back to listening; a session past its ``-timeout`` is killed as in TVM. Never raises for a
    session's fate, so the listen loop keeps serving."""
    import logging
    import multiprocessing
    from tvm.rpc import _ffi_api
    from tvm.rpc import server as tvm_server
    from tvm.support import utils
    log = logging.getLogger("RPCServer")
    log.info("connected from %s", addr)
    work = utils.tempdir()
    old_cwd = os.getcwd()
    os.chdir(work.path)          # sessions write uploads relative to their own folder
    try:
        proc = multiprocessing.Process(target=tvm_server._serve_loop, args=(sock, load_library, work))
        proc.start()
        proc.join(opts.get("timeout"))
        message = None
        if proc.is_alive():
            message = (f"RPCSessionTimeoutError: Your {opts['timeout']}s session has expired, "
                       'try to increase the "session_timeout" value.')
            _kill_tree(proc.pid)
            proc.kill()
            proc.join(5)
        elif proc.exitcode != 0:
            message = (f"{ERROR_MARK}{CRASHED} ({_exit_description(proc.exitcode)}) while serving the "
                       "call; the server is still running. A native crash in the session (e.g. an "
                       "out-of-range gather index) is the usual cause; see the server's log.")
            log.error("session from %s ended: %s", addr, _exit_description(proc.exitcode))
        if message is not None:
            try:
                _ffi_api.ReturnException(sock.fileno(), message)
            except Exception as e:       # the client may be gone already
                log.warning("could not tell %s about its session: %s", addr, e)
        log.info("finish serving %s", addr)
    finally:
        os.chdir(old_cwd)
        work.remove()
        sock.close()


def _guarded_listen_loop(loop):
    """Wrap TVM's listen loop: if it ever ends (an exception escaped), end the whole server
    process with status 1, so whoever supervises it restarts it (a server that is up but not
    listening is the one outcome a supervisor cannot see)."""
    def run(*args):
        import logging
        try:
            loop(*args)
            logging.getLogger("RPCServer").error("RPC listen loop ended; exiting")
        except BaseException as e:        # noqa: BLE001  (anything: the process must not linger)
            logging.getLogger("RPCServer").error("RPC listen loop died (%s: %s); exiting",
                                                 type(e).__name__, e)
        finally:
            os._exit(1)
    run.guarded = True
    return run


def install_session_guard() -> None:
    """Make TVM's RPC server (in this process) survive crashing sessions: use
    :func:`serve_session` for each session and :func:`_guarded_listen_loop` around the listen
    loop. Both are module attributes of ``tvm.rpc.server`` looked up when used (TVM 0.27)."""
    from tvm.rpc import server as tvm_server
    for attr in ("_serving", "_listen_loop", "_serve_loop"):
        if not callable(getattr(tvm_server, attr, None)):
            raise RuntimeError(f"tvm.rpc.server.{attr} is missing: this TVM's RPC server is not the "
                               "one tvm_qpu.rpc_server was written for (TVM 0.27)")
    tvm_server._serving = serve_session
    if not getattr(tvm_server._listen_loop, "guarded", False):
        tvm_server._listen_loop = _guarded_listen_loop(tvm_server._listen_loop)


def server_init() -> None:
    """``server_init_callback`` for ``tvm.rpc.Server``: register the functions, make the server
    survive crashing sessions, and import the API up front, so each session (a fork of the RPC
    worker) starts with everything loaded."""
    register_server_functions()
    install_session_guard()
    from . import api  # noqa: F401  (TVM, the executor and tvm_qpu.run_plan)


# ---------------------------------------------------------------------------------------------
# client side

@dataclass
class RemoteSpec:
    """Where to run: a tracker and a key, or one server's host and port."""
    key: str | None = None
    tracker: tuple | None = None          # (host, port)
    host: str | None = None
    port: int | None = None
    timeout: float = DEFAULT_TIMEOUT
    session_timeout: float = 0            # > 0: the server ends sessions that last longer

    def describe(self) -> str:
        if self.tracker:
            return f"key {self.key!r} via tracker {self.tracker[0]}:{self.tracker[1]}"
        return f"RPC server {self.host}:{self.port}"


def parse_address(text: str, what: str) -> tuple:
    """``"host:port"`` -> (host, port), or RemoteError."""
    host, sep, port = str(text).rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise RemoteError(f"bad {what} address {text!r}: expected host:port")
    return host.strip("[]"), int(port)


def make_spec(key=None, tracker=None, host=None, port=None, timeout=DEFAULT_TIMEOUT) -> RemoteSpec:
    """Check a flag combination (--rpc-key/--rpc-tracker or --hostname/--port) and build a RemoteSpec."""
    if timeout is None or not timeout > 0:
        raise RemoteError(f"bad timeout {timeout!r}: a positive number of seconds is expected")
    if tracker is not None or key is not None:
        if host is not None or port is not None:
            raise RemoteError("give either --rpc-tracker/--rpc-key or --hostname/--port, not both")
        if tracker is None:
            raise RemoteError("--rpc-key needs --rpc-tracker host:port")
        if not key:
            raise RemoteError("--rpc-tracker needs --rpc-key (the key the servers registered with)")
        return RemoteSpec(key=key, tracker=parse_address(tracker, "tracker"), timeout=float(timeout))
    if host is None:
        raise RemoteError("--port needs --hostname")
    if port is None:
        port = 9090
    if not 0 < int(port) < 65536:
        raise RemoteError(f"bad --port {port}")
    return RemoteSpec(host=host, port=int(port), timeout=float(timeout))


def _connect_tcp(addr: tuple, timeout: float, what: str) -> socket.socket:
    try:
        return socket.create_connection(addr, timeout=timeout)
    except socket.gaierror as e:
        raise RemoteError(f"cannot resolve the {what} host {addr[0]!r} ({e.strerror or e})") from None
    except TimeoutError:
        raise RemoteError(f"cannot reach the {what} at {addr[0]}:{addr[1]} (no answer in {timeout:g} s)") from None
    except OSError as e:
        raise RemoteError(f"cannot reach the {what} at {addr[0]}:{addr[1]} ({e.strerror or e}); "
                          f"is it running?") from None


def _tracker_call(sock, message):
    from tvm.rpc import base
    base.sendjson(sock, message)
    return base.recvjson(sock)


def _tracker_keys(summary) -> list:
    return sorted({str(s.get("key", "")).split(":", 1)[-1] for s in summary.get("server_info", [])})


def request_from_tracker(spec: RemoteSpec) -> tuple:
    """Ask the tracker for a free server with ``spec.key``; returns (host, port, matchkey).

    Every step is bounded by ``spec.timeout``; a key no server offers in time is a RemoteError
    naming the keys the tracker knows."""
    from tvm.rpc import base
    addr = spec.tracker
    where = f"RPC tracker at {addr[0]}:{addr[1]}"
    sock = _connect_tcp(addr, spec.timeout, "RPC tracker")
    try:
        sock.settimeout(spec.timeout)
        try:
            sock.sendall(struct.pack("<i", base.RPC_TRACKER_MAGIC))
            magic = struct.unpack("<i", base.recvall(sock, 4))[0]
        except (OSError, AssertionError, struct.error) as e:
            raise RemoteError(f"{addr[0]}:{addr[1]} is not a TVM RPC tracker ({_one_line(e)})") from None
        if magic != base.RPC_TRACKER_MAGIC:
            raise RemoteError(f"{addr[0]}:{addr[1]} is not a TVM RPC tracker")
        try:
            value = _tracker_call(sock, [base.TrackerCode.SUMMARY])
            keys = _tracker_keys(value[1]) if value and value[0] == base.TrackerCode.SUCCESS else []
        except (OSError, ValueError, IndexError, TypeError, AttributeError):
            keys = []
        t0 = time.monotonic()
        try:
            value = _tracker_call(sock, [base.TrackerCode.REQUEST, spec.key, "", 1])
        except TimeoutError:
            known = ", ".join(keys) if keys else "none"
            raise RemoteError(f"timed out after {time.monotonic() - t0:.0f} s waiting for a free RPC server with "
                              f"key {spec.key!r} from the {where} (keys registered there: {known})") from None
        except OSError as e:
            raise RemoteError(f"the {where} dropped the request ({_one_line(e)})") from None
        if not value or value[0] != base.TrackerCode.SUCCESS:
            raise RemoteError(f"the {where} refused the request for key {spec.key!r}: {value!r}")
        host, port, matchkey = value[1]
        return str(host), int(port), str(matchkey)
    finally:
        sock.close()


def open_session(spec: RemoteSpec):
    """A connected ``tvm.rpc.RPCSession`` (bounded by spec.timeout), or RemoteError."""
    from tvm import rpc
    if spec.tracker:
        host, port, matchkey = request_from_tracker(spec)
    else:
        host, port, matchkey = spec.host, spec.port, ""
        _connect_tcp((host, port), spec.timeout, "RPC server").close()   # fail fast, and clearly
    try:
        return rpc.connect(host, port, matchkey, session_timeout=spec.session_timeout), f"{host}:{port}"
    except Exception as e:
        raise RemoteError(f"cannot open an RPC session with {host}:{port} ({_describe(e)})") from None


def remote_message(e: BaseException) -> str:
    """The server's one line from an RPC error (text after ERROR_MARK), else the error in one line."""
    text = str(e)
    i = text.find(ERROR_MARK)
    if i >= 0:
        return text[i + len(ERROR_MARK):].splitlines()[0].strip()
    lines = [l.strip() for l in text.splitlines() if l.strip() and "Error caught from RPC call" not in l]
    return " ".join(lines[-1:]) or type(e).__name__


class RemoteRunner:
    """A model loaded on a remote server; the :class:`tvm_qpu.api.Runner` interface."""

    def __init__(self, session, where: str, meta: dict, info: dict):
        self.session, self.where, self.meta = session, where, meta
        self.inputs, self.outputs = info["inputs"], info["outputs"]
        self.device = info.get("device")
        self._funcs = {}

    def _call(self, name, *args):
        f = self._funcs.get(name)
        if f is None:
            f = self._funcs[name] = _remote_function(self.session, self.where, name)
        try:
            return f(*args)
        except RemoteError:
            raise
        except Exception as e:
            raise RemoteError(f"remote {self.where}: {remote_message(e)}") from None

    def fill_inputs(self, mode: str = "random", seed: int = 0) -> dict:
        """The same inputs a local Runner would make (same seed)."""
        from .api import Runner
        return Runner.fill_inputs(self, mode, seed)

    def run(self, **inputs) -> dict:
        return npz_to_arrays(self._call("run", arrays_to_npz(inputs), "random"))

    def profile(self, inputs: dict | None = None, repeat: int = 10):
        from .api import Profile
        data = json.loads(str(self._call("profile", arrays_to_npz(inputs or {}), int(repeat))))
        return Profile(int(data["runs"]), float(data["total_seconds"]), list(data["regions"]),
                       device=str(data.get("device", "")), host=str(data.get("host", "")))

    def close(self):
        if self.session is not None:
            try:
                self._call("close")
            except RemoteError:
                pass
            self.session = None
            self._funcs = {}


def _remote_function(session, where, name):
    try:
        return session.get_function(f"tvm_qpu.rpc.{name}")
    except Exception:
        raise RemoteError(f"the RPC server at {where} does not serve tvm_qpu (function tvm_qpu.rpc.{name} is "
                          f"missing): start it with 'python -m tvm_qpu.rpc_server ...' on a machine with "
                          f"tvm-qpu installed (docs/rpc.md)") from None


def load_remote(path, spec: RemoteSpec, device: str = "auto") -> RemoteRunner:
    """Validate ``path`` locally, get a server per ``spec``, upload and load the artifact there."""
    from .artifact import ArtifactError, read_artifact
    art = read_artifact(path)                       # checksums etc.: fail here, not remotely
    meta = art.json("model.json")
    if "lib.so" not in art.files:
        raise ArtifactError(f"{path}: artifact has no lib.so")
    session, where = open_session(spec)
    probe = RemoteRunner(session, where, meta, {"inputs": meta.get("inputs", []),
                                                 "outputs": meta.get("outputs", [])})
    hello = json.loads(str(probe._call("hello")))
    if hello.get("protocol") != PROTOCOL:
        raise RemoteError(f"the RPC server at {where} speaks tvm_qpu remote protocol {hello.get('protocol')!r}, "
                          f"this client {PROTOCOL}: install the same tvm-qpu version on both")
    if meta.get("host_arch") and hello.get("arch") and meta["host_arch"] != hello["arch"]:
        raise RemoteError(f"{path} was built for {meta['host_arch']} (target host {meta.get('target_host')}) but the "
                          f"RPC server at {where} is {hello['arch']}: compile with a matching --target-host "
                          f"(pi5 for a Raspberry Pi 5)")
    try:
        session.upload(os.fspath(path), target=UPLOAD_NAME)
    except Exception as e:
        raise RemoteError(f"uploading {path} to {where} failed ({remote_message(e)})") from None
    info = json.loads(str(probe._call("load", UPLOAD_NAME, device)))
    runner = RemoteRunner(session, where, meta, info)
    runner._funcs = probe._funcs
    runner.hello = hello
    return runner


register_server_functions()
