"""``tvmc``: compile, run and partition models for the qpu target (old tvmc flag names).

::

    tvmc compile --target qpu model.onnx -o model.tar [--input-shapes "x:[1,3,32,32]"]
                 [--target-host pi5] [--qpu-placement all|cost|none]
    tvmc compile --target llvm model.onnx -o model_cpu.tar          # CPU-only baseline
    tvmc run model.tar [--inputs in.npz] [--outputs out.npz] [--fill-mode random|zeros|ones]
             [--print-time] [--print-top N] [--profile] [--device auto|emulator|v3d]
    tvmc partition model.onnx [--qpu-placement ...] [--explain]

Errors are one line on stderr (``tvmc: error: ...``) and exit status 1 (2 for bad usage).
``tvmc run`` runs remotely over TVM RPC with ``--rpc-key K --rpc-tracker HOST:PORT`` (a tracker) or
``--hostname H [--port P]`` (one server); ``--device`` is then the remote's device. ``--rpc-timeout S``
bounds finding a server (default 60 s). See docs/rpc.md and :mod:`tvm_qpu.rpc`.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import time

EXIT_ERROR, EXIT_USAGE = 1, 2


class CliError(Exception):
    """An error reported as one line."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise CliError(f"{self.prog}: {message}")


_SHAPE_ITEM = re.compile(r"^([^:\s\[\]]+):\[\s*(\d+(?:\s*,\s*\d+)*)?\s*\]$")


def parse_input_shapes(text: str | None) -> dict | None:
    """``"x:[1,3,32,32] y:[1,10]"`` (space- or comma-separated items) -> {"x": [1,3,32,32], ...}."""
    if text is None:
        return None
    items = re.findall(r"[^\s,\[\]]+:\[[^\]]*\]|\S+", text.replace("],", "] "))
    if not items:
        raise CliError(f"bad --input-shapes {text!r}: expected name:[d1,d2,...]")
    shapes = {}
    for it in items:
        m = _SHAPE_ITEM.match(it.strip().rstrip(","))
        if not m:
            raise CliError(f"bad --input-shapes item {it!r}: expected name:[d1,d2,...] with non-negative integers")
        dims = [int(d) for d in m.group(2).split(",")] if m.group(2) else []
        shapes[m.group(1)] = dims
    return shapes


def _add_rpc(p, remote_run=False):
    if not remote_run:
        g = p.add_argument_group("remote (reserved, not implemented for this command)")
        g.add_argument("--rpc-key")
        g.add_argument("--rpc-tracker")
        g.add_argument("--hostname")
        g.add_argument("--port", type=int)
        return
    g = p.add_argument_group("remote execution over TVM RPC (docs/rpc.md)")
    g.add_argument("--rpc-key", help="key of the remote servers in the tracker, e.g. pi5")
    g.add_argument("--rpc-tracker", metavar="HOST:PORT", help="RPC tracker address, e.g. 192.168.1.10:9190")
    g.add_argument("--hostname", help="one RPC server's host (no tracker)")
    g.add_argument("--port", type=int, help="that server's port (default 9090)")
    g.add_argument("--rpc-timeout", type=float, default=None, metavar="SECONDS",
                   help="give up finding a (free) remote server after this long (default 60)")


def _remote_spec(args):
    """A tvm_qpu.rpc.RemoteSpec if any remote flag is given, else None (run locally)."""
    flags = (args.rpc_key, args.rpc_tracker, args.hostname, args.port)
    if all(v is None for v in flags):
        if args.rpc_timeout is not None:
            raise CliError("--rpc-timeout applies to remote runs only (--rpc-tracker or --hostname)")
        return None
    from tvm_qpu.rpc import DEFAULT_TIMEOUT, make_spec
    timeout = DEFAULT_TIMEOUT if args.rpc_timeout is None else args.rpc_timeout
    return make_spec(args.rpc_key, args.rpc_tracker, args.hostname, args.port, timeout)


def _reject_rpc(args):
    for flag in ("rpc_key", "rpc_tracker", "hostname", "port"):
        if getattr(args, flag, None) is not None:
            raise CliError(f"--{flag.replace('_', '-')}: remote execution is not implemented yet")


def build_parser():
    ap = _Parser(prog="tvmc", description="TVM driver for the qpu target (Raspberry Pi 5 VideoCore VII)")
    sub = ap.add_subparsers(dest="cmd", parser_class=_Parser)

    c = sub.add_parser("compile", help="compile a model into one artifact file")
    c.add_argument("model", help="ONNX model file")
    c.add_argument("--target", default="qpu", help="qpu (QPU + CPU) or llvm (CPU only)")
    c.add_argument("-o", "--output", default="module.tar", help="artifact path (default module.tar)")
    c.add_argument("--input-shapes", help='input shapes, e.g. "input:[1,1,8,8]"')
    c.add_argument("--target-host", default=None, help="llvm (this machine, default) or pi5 (aarch64 host code for a Raspberry Pi 5; "
                                                          "needs the cross compiler aarch64-linux-gnu-gcc, Debian: gcc-aarch64-linux-gnu)")
    c.add_argument("--qpu-placement", default="cost", choices=("all", "cost", "none"),
                   help="offload every supported op, only where the cost model predicts a win, or none")
    c.add_argument("--model-format", default="onnx", choices=("onnx",))
    _add_rpc(c)

    r = sub.add_parser("run", help="run a compiled artifact")
    r.add_argument("artifact")
    r.add_argument("--inputs", help=".npz file of named inputs")
    r.add_argument("--outputs", help="write outputs to this .npz")
    r.add_argument("--fill-mode", default="random", choices=("random", "zeros", "ones"),
                   help="inputs to use when --inputs is not given")
    r.add_argument("--print-time", action="store_true", help="print mean wall time per inference")
    r.add_argument("--print-top", type=int, metavar="N", help="print the top N entries of each output")
    r.add_argument("--profile", action="store_true", help="per-region modelled QPU time and host time")
    r.add_argument("--repeat", type=int, default=10, help="runs for --print-time / --profile")
    r.add_argument("--device", default="auto", choices=("auto", "emulator", "v3d"),
                   help="QPU device (on the remote machine for remote runs)")
    _add_rpc(r, remote_run=True)

    p = sub.add_parser("partition", help="show which ops go to the QPU, and why the others stay")
    p.add_argument("model")
    p.add_argument("--input-shapes")
    p.add_argument("--qpu-placement", default="cost", choices=("all", "cost", "none"))
    p.add_argument("--explain", action="store_true", help="also print the cost model's constants")
    return ap


def _cmd_compile(args):
    import tvm_qpu
    _reject_rpc(args)
    if args.target not in ("qpu", "llvm"):
        raise CliError(f"unknown target {args.target!r}: choose qpu or llvm")
    shapes = parse_input_shapes(args.input_shapes)
    t0 = time.perf_counter()
    mod, params = tvm_qpu.from_onnx(args.model, shapes)
    lib = tvm_qpu.build(mod, target=args.target, target_host=args.target_host, placement=args.qpu_placement,
                        params=params)
    lib.save(args.output)
    dt = time.perf_counter() - t0
    n = len(lib.regions)
    print(f"compiled {args.model} -> {args.output} (target {args.target}, host {lib.meta['host_arch']}, "
          f"{n} QPU region(s), placement {lib.report.placement}, {dt:.2f} s)")
    return 0


def _load_inputs(path):
    import numpy as np
    if not os.path.exists(path):
        raise CliError(f"{path}: no such file")
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except Exception as e:
        raise CliError(f"{path}: not a readable .npz of arrays ({type(e).__name__}: {e})") from None


def _cmd_run(args):
    import numpy as np
    import tvm_qpu
    spec = _remote_spec(args)
    if spec is None:
        runner = tvm_qpu.load(args.artifact, device=args.device)
    else:
        from tvm_qpu.rpc import load_remote
        runner = load_remote(args.artifact, spec, device=args.device)
    try:
        inputs = _load_inputs(args.inputs) if args.inputs else runner.fill_inputs(args.fill_mode)
        outs = runner.run(**inputs)
        if args.outputs:
            np.savez(args.outputs, **outs)
        if args.print_top:
            for name, a in outs.items():
                flat = a.reshape(-1)
                top = np.argsort(-flat, kind="stable")[: args.print_top]
                print(f"{name}: top {len(top)}")
                for i in top:
                    print(f"  [{i}] {flat[i]:.6g}")
        if args.print_time or args.profile:
            prof = runner.profile(inputs, repeat=max(1, args.repeat))
            if args.print_time:
                print(f"mean inference time: {prof.total_seconds * 1e3:.4f} ms over {prof.runs} runs")
            if args.profile:
                print(prof.text())
        if not (args.outputs or args.print_top or args.print_time or args.profile):
            for name, a in outs.items():
                print(f"{name}: {a.dtype}{list(a.shape)}")
    finally:
        runner.close()
    return 0


def _cmd_partition(args):
    import tvm_qpu
    shapes = parse_input_shapes(args.input_shapes)
    mod, params = tvm_qpu.from_onnx(args.model, shapes)
    part = tvm_qpu.partition(mod, params, placement=args.qpu_placement)
    print(tvm_qpu.partition_report(part).text())
    if args.explain:
        from tvm_qpu.placement import model_table
        print(model_table())
    return 0


COMMANDS = {"compile": _cmd_compile, "run": _cmd_run, "partition": _cmd_partition}


def _one_line(e) -> str:
    msg = " ".join(str(e).split())
    return msg or type(e).__name__


def main(argv=None) -> int:
    ap = build_parser()
    try:
        args = ap.parse_args(argv)
    except CliError as e:
        print(f"tvmc: error: {_one_line(e).removeprefix('tvmc: ')}", file=sys.stderr)
        return EXIT_USAGE
    if args.cmd is None:
        ap.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        return COMMANDS[args.cmd](args)
    except KeyboardInterrupt:
        print("tvmc: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # every failure is one clear line, never a traceback
        from importlib import import_module
        known = (CliError,)
        for mod, name in (("tvm_qpu.backend", "QpuError"), ("tvm_qpu.artifact", "ArtifactError"),
                          ("tvm_qpu.runtime.device", "DeviceError"),
                          ("tvm_qpu.rpc", "RemoteError")):
            try:
                known += (getattr(import_module(mod), name),)
            except Exception:
                pass
        prefix = "" if isinstance(e, known) else f"{type(e).__name__}: "
        print(f"tvmc: error: {prefix}{_one_line(e)}", file=sys.stderr)
        if os.environ.get("TVMC_TRACEBACK"):
            import traceback
            traceback.print_exc()
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
