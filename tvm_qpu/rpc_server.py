"""``python -m tvm_qpu.rpc_server``: TVM's RPC server, serving tvm_qpu's remote functions.

Same flags as ``python -m tvm.exec.rpc_server`` (``--host --port --port-end --tracker --key
--custom-addr --load-library --silent --no-fork``)::

    python -m tvm_qpu.rpc_server --tracker 192.168.1.10:9190 --key pi5    # register with a tracker
    python -m tvm_qpu.rpc_server --host 0.0.0.0 --port 9090               # standalone

The stock server cannot import a Python package (``--load-library`` only dlopens shared libraries),
so this wrapper passes :func:`tvm_qpu.rpc.server_init` as ``tvm.rpc.Server``'s
``server_init_callback``: the server's worker process imports tvm_qpu (registering the
``tvm_qpu.rpc.*`` and ``tvm_qpu.run_plan`` global functions) before it listens, and each session,
a fork of that worker, inherits them. The same callback installs
:func:`tvm_qpu.rpc.install_session_guard`: a session that crashes (e.g. a segfault in native
code) gets its client a "remote session crashed" error and the server keeps serving; if the
worker's listen loop ever dies, the worker exits and so does this process (status 1), so
systemd's ``Restart=`` brings the server back instead of it sitting there not serving.

SIGTERM / SIGINT stop the worker too. Security: an RPC server runs whatever its clients upload;
expose it only on a trusted network (docs/rpc.md).
"""
from __future__ import annotations

import argparse
import os
import logging
import signal
import sys


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m tvm_qpu.rpc_server",
                                 description="TVM RPC server with tvm_qpu's remote functions (docs/rpc.md)")
    ap.add_argument("--host", default="0.0.0.0", help="address to listen on (default 0.0.0.0)")
    ap.add_argument("--port", type=int, default=9090, help="first port to try (default 9090)")
    ap.add_argument("--port-end", type=int, default=None, help="end of the port search range (default port+100)")
    ap.add_argument("--tracker", help="register with the RPC tracker at host:port")
    ap.add_argument("--key", default="", help="the key to register under (needed with --tracker), e.g. pi5")
    ap.add_argument("--custom-addr", help="address to report to the tracker (default: as the tracker sees us)")
    ap.add_argument("--load-library", help="extra shared libraries to load (colon-separated)")
    ap.add_argument("--silent", action="store_true", help="log errors only")
    ap.add_argument("--trusted-key", action="append", default=[], metavar="PUB",
                    help="load only artifacts signed by this Ed25519 public key (tvmc keygen's .pub; "
                         "repeatable); without it every upload is run")
    ap.add_argument("--no-fork", dest="fork", action="store_false", help="spawn sessions instead of forking")
    return ap


def _tracker_addr(text):
    from .rpc import parse_address
    return parse_address(text, "tracker")


def _stop(server) -> None:
    """Stop TVM's server worker (its listener thread would outlive us otherwise)."""
    proc = getattr(getattr(server, "proc", None), "_proc", None)
    try:
        server.terminate()                      # needs psutil for the recursive kill
    except ImportError:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(timeout=5)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    tracker = None
    if args.tracker:
        if not args.key:
            print("tvm_qpu.rpc_server: error: --tracker needs --key", file=sys.stderr)
            return 2
        try:
            tracker = _tracker_addr(args.tracker)
        except Exception as e:
            print(f"tvm_qpu.rpc_server: error: {e}", file=sys.stderr)
            return 2
    if args.trusted_key:
        from .artifact import load_public_keys
        from .rpc import TRUSTED_KEYS_ENV
        try:                                     # a bad key file fails now, not at the first upload
            load_public_keys(args.trusted_key)
        except Exception as e:
            print(f"tvm_qpu.rpc_server: error: {e}", file=sys.stderr)
            return 2
        os.environ[TRUSTED_KEYS_ENV] = os.pathsep.join(os.path.abspath(k) for k in args.trusted_key)
    logging.basicConfig(level=logging.ERROR if args.silent else logging.INFO)
    from tvm import rpc
    from .rpc import server_init
    server = rpc.Server(args.host, args.port, args.port_end or args.port + 100, key=args.key,
                        tracker_addr=tracker, load_library=args.load_library, custom_addr=args.custom_addr,
                        silent=args.silent, no_fork=not args.fork, server_init_callback=server_init)

    def _on_signal(signum, _frame):
        _stop(server)
        sys.exit(128 + signum)

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    where = f"registered with tracker {args.tracker} as {args.key!r}" if tracker else "standalone"
    print(f"tvm_qpu RPC server listening on {args.host}:{server.port} ({where})", flush=True)
    server.proc.join()
    proc = getattr(server.proc, "_proc", None)
    code = proc.returncode if proc is not None else None
    print(f"tvm_qpu RPC server: the worker process ended ({code}); exiting so a supervisor restarts "
          "the server", file=sys.stderr, flush=True)
    return 1


if __name__ == "__main__":
    sys.exit(main())
