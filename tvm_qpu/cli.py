"""``tvmc``: compile, run and partition models for the qpu target (old tvmc flag names).

::

    tvmc compile --target qpu model.onnx -o model.tar [--input-shapes "x:[1,3,32,32]"]
                 [--target-host pi5] [--qpu-placement all|cost|none] [--qpu-split] [--sign-key me.key]
    tvmc compile --target llvm model.onnx -o model_cpu.tar          # CPU-only baseline
    tvmc run model.tar [--inputs in.npz] [--outputs out.npz] [--fill-mode random|zeros|ones]
             [--print-time] [--print-top N] [--profile] [--repeat N] [--device auto|emulator|v3d]
             [--trace trace.json] [--stream N [--depth D]] [--trusted-key me.pub ...]
    tvmc partition model.onnx [--qpu-placement ...] [--qpu-split] [--explain] [--tuning-records records.json]
    tvmc tune model.onnx [--target qpu|llvm] -o records.json [--trials N] [--target-host pi5]
             [--rpc-tracker HOST:PORT --rpc-key KEY | --hostname H --port P]
             [--cost-model xgb|random] [--tasks NAME,...] [--qpu-measure auto|yes|no|only]
    tvmc compile ... --tuning-records records.json       # tuned schedules + measured placement
    tvmc keygen me                       # me.key (private, for --sign-key) + me.pub (--trusted-key)
    tvmc --version

Errors are one line on stderr (``tvmc: error: ...``) and exit status 1 (2 for bad usage); Ctrl-C
prints ``tvmc: interrupted`` and exits 130. On a terminal, long runs show a status line on stderr
(see :mod:`tvm_qpu.progress`). ``tvmc run`` runs remotely over TVM RPC with ``--rpc-key K
--rpc-tracker HOST:PORT`` (a tracker) or ``--hostname H [--port P]`` (one server); ``--device`` is
then the remote's device. ``--rpc-timeout S`` bounds finding a server (default 60 s). See
docs/rpc.md and :mod:`tvm_qpu.rpc`.

Subcommands are rows of :data:`SUBCOMMANDS` (name, help, function adding its arguments, function
running it): a new one is one more row.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import time

EXIT_ERROR, EXIT_USAGE, EXIT_INTERRUPTED = 1, 2, 130

#: library messages written for Python callers -> what a CLI user types instead
CLI_HINTS = {"open_device('emulator')": "--device emulator"}


class CliError(Exception):
    """An error reported as one line."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise CliError(f"{self.prog}: {message}")


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {v}")
    return v


def positive_float(text: str) -> float:
    """argparse type: a number > 0."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not v > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return v


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


def _same_file(a, b) -> bool:
    """Whether paths ``a`` and ``b`` name the same file (``b`` need not exist)."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)


# ---------------------------------------------------------------------------------------------
# arguments of each subcommand

def _args_compile(c):
    c.add_argument("model", help="ONNX model file")
    c.add_argument("--target", default="qpu", help="qpu (QPU + CPU, default) or llvm (CPU only)")
    c.add_argument("-o", "--output", default="module.tar",
                   help="artifact file to write (default module.tar; never the model itself)")
    c.add_argument("--input-shapes", metavar="SHAPES",
                   help='override input shapes, e.g. "input:[1,1,8,8]" (needed for dynamic dims)')
    c.add_argument("--target-host", default=None, metavar="HOST",
                   help="llvm (this machine, default) or pi5 (cross-compiles; needs gcc-aarch64-linux-gnu)")
    c.add_argument("--qpu-placement", default="cost", choices=("all", "cost", "none"),
                   help="offload every supported op (all), only where the cost model predicts a win "
                        "(cost, default), or nothing (none)")
    c.add_argument("--qpu-split", action="store_true",
                   help="plan the whole model for CPU and QPU at once: split large convs / matmuls between "
                        "them and choose CPU / QPU per op by the modelled overlapped latency (needs "
                        "--qpu-placement cost; pays once QPU regions run asynchronously)")
    c.add_argument("--model-format", default="onnx", choices=("onnx",), help="input format (onnx only)")
    c.add_argument("--sign-key", metavar="KEY",
                   help="sign the artifact with this Ed25519 private key (from tvmc keygen; "
                        "needs the cryptography package)")
    c.add_argument("--tuning-records", metavar="JSON",
                   help="records from tvmc tune for this model and target: their schedules replace the "
                        "default ones, and placement prices the ops they measured by the measurement")


def _args_run(r):
    r.add_argument("artifact", help="artifact file written by tvmc compile")
    r.add_argument("--inputs", metavar="NPZ", help=".npz file of named inputs")
    r.add_argument("--outputs", metavar="NPZ", help="write the outputs to this .npz file (name must end in .npz)")
    r.add_argument("--fill-mode", default="random", choices=("random", "zeros", "ones"),
                   help="inputs to use when --inputs is not given (default random, seed 0)")
    r.add_argument("--print-time", action="store_true",
                   help="print the mean wall time per inference on this host (and the QPU time: "
                        "modelled on the emulator, measured on a Pi 5)")
    r.add_argument("--print-top", type=positive_int, metavar="N",
                   help="print the N largest entries of each output (per batch row for batched outputs)")
    r.add_argument("--profile", action="store_true",
                   help="per-region QPU time (modelled on the emulator) and host wall time, explained")
    r.add_argument("--repeat", type=positive_int, default=None, metavar="N",
                   help="timed runs for --print-time / --profile (default: up to 10, fewer when one run "
                        "takes over a second, e.g. emulated)")
    r.add_argument("--device", default="auto", choices=("auto", "emulator", "v3d"),
                   help="QPU device: v3d (a Pi 5's GPU), emulator, or auto (v3d if present; on the "
                        "remote machine for remote runs)")
    r.add_argument("--trace", metavar="JSON",
                   help="write the CPU/QPU timeline of the run (or of --stream) as a Chrome / Perfetto "
                        "trace (measured on a Pi 5; on the emulator modelled: CPU measured, QPU cycle model)")
    r.add_argument("--stream", type=positive_int, metavar="N",
                   help="also run N inferences as a pipelined stream and print its throughput "
                        "(modelled on the emulator, measured on a Pi 5)")
    r.add_argument("--depth", type=positive_int, default=None, metavar="D",
                   help="inferences in flight for --stream (default 2)")
    r.add_argument("--trusted-key", action="append", metavar="PUB", default=None,
                   help="refuse the artifact unless signed by this Ed25519 public key (repeatable; "
                        "from tvmc keygen)")
    _args_rpc(r, "remote execution over TVM RPC (docs/rpc.md)",
              "give up finding a (free) remote server after this long (default 60)")


def _args_partition(p):
    p.add_argument("model", help="ONNX model file")
    p.add_argument("--input-shapes", metavar="SHAPES", help='override input shapes, e.g. "input:[1,1,8,8]"')
    p.add_argument("--qpu-placement", default="cost", choices=("all", "cost", "none"),
                   help="placement rule to explain (default cost)")
    p.add_argument("--qpu-split", action="store_true",
                   help="show the whole-model plan with split convs / matmuls (as tvmc compile --qpu-split)")
    p.add_argument("--explain", action="store_true", help="also print the cost model's constants")
    p.add_argument("--tuning-records", metavar="JSON",
                   help="price CPU work by these tvmc tune records where they measured it")
    p.add_argument("--target-host", default=None, metavar="HOST",
                   help="the CPU the records were tuned for: llvm (this machine, default) or pi5")


def _args_tune(t):
    t.add_argument("model", help="ONNX model file")
    t.add_argument("--target", default="qpu", help="qpu (tune what stays on the CPU, default) or llvm (all)")
    t.add_argument("-o", "--output", required=True, metavar="JSON",
                   help="records file to write; if it exists (an interrupted run), tuning continues from it")
    t.add_argument("--trials", type=positive_int, default=None, metavar="N",
                   help="measured schedule candidates per task (default 64)")
    t.add_argument("--input-shapes", metavar="SHAPES", help='override input shapes, e.g. "input:[1,1,8,8]"')
    t.add_argument("--target-host", default=None, metavar="HOST",
                   help="llvm (this machine, default) or pi5 (aarch64; measured on a remote Pi)")
    t.add_argument("--qpu-placement", default="cost", choices=("all", "cost", "none"),
                   help="placement of the --target qpu build to tune the CPU part of (default cost)")
    t.add_argument("--cost-model", choices=("xgb", "random"), default=None,
                   help="MetaSchedule cost model: xgb (XGBoost, the default when xgboost is installed) or "
                        "random (the default without it)")
    t.add_argument("--qpu-measure", choices=("auto", "yes", "no", "only"), default=None,
                   help="--target qpu: time every QPU-capable op's kernel on the measuring machine's QPU "
                        "device first (yes; v3d on a Pi = measured, the emulator = modelled), only that "
                        "(only), or not (no); auto (default): yes over RPC or with a real GPU, no on this "
                        "machine's emulator")
    t.add_argument("--tasks", metavar="NAME[,NAME...]", default=None,
                   help="tune only these tasks (names as the progress lines print them); the others keep "
                        "the default schedules")
    _args_rpc(t, "measure on a remote machine over TVM RPC (docs/rpc.md)",
              "session timeout of a remote measurement (default 60)")


def _args_rpc(p, title, timeout_help):
    """The remote-machine options shared by ``run`` and ``tune`` (a tracker and key, or one server)."""
    g = p.add_argument_group(title)
    g.add_argument("--rpc-key", help="key of the remote servers in the tracker, e.g. pi5")
    g.add_argument("--rpc-tracker", metavar="HOST:PORT", help="RPC tracker address, e.g. 192.168.1.10:9190")
    g.add_argument("--hostname", help="one RPC server's host (no tracker)")
    g.add_argument("--port", type=int, help="that server's port (default 9090)")
    g.add_argument("--rpc-timeout", type=positive_float, default=None, metavar="SECONDS", help=timeout_help)


def _args_keygen(k):
    k.add_argument("stem", help="writes STEM.key (private, mode 0600: for --sign-key) and STEM.pub "
                                "(public: for --trusted-key / tvm_qpu.load(trusted_keys=...))")


def _version() -> str:
    from importlib import metadata
    from tvm_qpu import __version__
    try:
        tvm = metadata.version("apache-tvm")
    except metadata.PackageNotFoundError:
        tvm = "not installed"
    return f"tvmc (tvm-qpu {__version__}, apache-tvm {tvm})"


# ---------------------------------------------------------------------------------------------
# commands

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


def _cmd_compile(args):
    import tvm_qpu
    if args.target not in ("qpu", "llvm"):
        raise CliError(f"unknown target {args.target!r}: choose qpu or llvm")
    if _same_file(args.output, args.model):
        raise CliError(f"-o {args.output} is the input model: refusing to overwrite it")
    shapes = parse_input_shapes(args.input_shapes)
    sign_key = None
    if args.sign_key is not None:                 # a bad key fails now, not after compiling
        from tvm_qpu.artifact import load_private_key
        sign_key = load_private_key(args.sign_key)
    t0 = time.perf_counter()
    records = _records(args, shapes)
    mod, params = tvm_qpu.from_onnx(args.model, shapes)
    lib = tvm_qpu.build(mod, target=args.target, target_host=args.target_host, placement=args.qpu_placement,
                        params=params, split=args.qpu_split, tuning_records=records)
    lib.save(args.output, sign_key=sign_key)
    dt = time.perf_counter() - t0
    n = len(lib.regions)
    signed = ", signed" if sign_key is not None else ""
    print(f"compiled {args.model} -> {args.output} (target {args.target}, host {lib.meta['host_arch']}, "
          f"{n} QPU region(s), placement {lib.report.placement}{signed}, {dt:.2f} s)")
    if records is not None:
        t = lib.meta["tuning_records"]
        print(f"tuning records {args.tuning_records}: {t['applied']} CPU function(s) tuned, the others default "
              f"schedules" + (f"; {len(t['fell_back'])} record(s) did not apply and fell back: "
                              + "; ".join(t["fell_back"][:3]) if t["fell_back"] else ""))
    return 0


def _records(args, shapes, any_target=False):
    """The --tuning-records of a compile / partition, checked against the model and target (for
    partition, which only prices ops, records of either target serve)."""
    if getattr(args, "tuning_records", None) is None:
        return None
    from tvm_qpu.tune import build_identity, check_matches, read_records
    rec = read_records(args.tuning_records)
    target = rec.header.get("target") if any_target else args.target
    check_matches(rec, build_identity(args.model, target, args.target_host, shapes))
    return rec


def _load_inputs(path):
    import numpy as np
    if not os.path.exists(path):
        raise CliError(f"{path}: no such file")
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except Exception as e:
        raise CliError(f"{path}: not a readable .npz of arrays ({type(e).__name__}: {e})") from None


def _check_run_args(args):
    if args.repeat is not None and not (args.print_time or args.profile):
        raise CliError("--repeat applies to --print-time / --profile")
    if args.depth is not None and args.stream is None:
        raise CliError("--depth applies to --stream")
    if args.trace is not None:
        _check_output_file("--trace", args.trace, args)
    if args.outputs is None:
        return
    if not args.outputs.endswith(".npz"):
        raise CliError(f"--outputs {args.outputs}: the file name must end in .npz (outputs are written as .npz)")
    _check_output_file("--outputs", args.outputs, args)


def _check_output_file(flag: str, path: str, args):
    """A file ``tvmc run`` writes (``flag``): its folder exists, and it is neither the artifact nor
    the inputs file."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise CliError(f"{flag} {path}: no such folder {folder}")
    for what, other in (("the artifact", args.artifact), ("--inputs", args.inputs)):
        if other is not None and _same_file(path, other):
            raise CliError(f"{flag} {path} is {what}: refusing to overwrite it")


def top_rows(name: str, a, n: int) -> list:
    """Lines for --print-top: the ``n`` largest entries of ``a``, ranked per batch row when ``a``
    has a batch dimension (ndim >= 2), else over the whole array; indices within the row."""
    import numpy as np
    a = np.asarray(a)
    rows = a.reshape(a.shape[0], -1) if a.ndim >= 2 else a.reshape(1, -1)
    lines = []
    for b, flat in enumerate(rows):
        top = np.argsort(-flat, kind="stable")[:n]
        label = f"{name}[{b}]" if len(rows) > 1 else name
        lines.append(f"{label}: top {len(top)}")
        lines.extend(f"  [{i}] {flat[i]:.6g}" for i in top)
    return lines


def time_lines(prof) -> list:
    """--print-time: the wall time, and what it measures, plus the QPU time and its kind."""
    lines = [f"mean inference time: {prof.total_seconds * 1e3:.4f} ms over {prof.runs} "
             f"run{'s' if prof.runs != 1 else ''} "
             f"(wall time, {prof.wall_label()})"]
    if prof.regions:
        lines.append(f"QPU time per inference ({prof.qpu_label()}): {prof.qpu_seconds * 1e3:.4f} ms"
                     + (" (Pi 5 QPU time from the emulator's cycle model)" if prof.device == "emulator" else ""))
    return lines


def stream_lines(ov: dict, n: int, wall_seconds: float, host: str) -> list:
    """--stream: throughput of the pipelined stream (modelled or measured, labelled)."""
    thr = ov["throughput_per_second"] or 0.0
    seq = n / ov["sync_makespan_seconds"] if ov["sync_makespan_seconds"] > 0 else 0.0
    return [f"stream: {n} inferences, {ov['depth']} in flight",
            f"  throughput ({ov['timeline']}): {thr:.2f} inferences/s; sequential offload {seq:.2f} "
            f"inferences/s ({ov['how']})",
            f"  mean latency per inference ({ov['timeline']}): {ov['latency_seconds'] * 1e3:.4f} ms",
            f"  host wall time: {n / wall_seconds:.2f} inferences/s (measured on the {host} host"
            + (", QPU regions emulated: not a Pi 5 figure)" if ov["timeline"] == "modelled" else ")")]


def _cmd_run(args):
    import time
    import numpy as np
    import tvm_qpu
    from tvm_qpu.progress import status_line
    _check_run_args(args)
    spec = _remote_spec(args)
    if spec is not None and (args.trace or args.stream):
        raise CliError("--trace / --stream run locally only (not over RPC)")
    trusted = args.trusted_key
    if spec is None:
        runner = tvm_qpu.load(args.artifact, device=args.device, trusted_keys=trusted)
    else:
        from tvm_qpu.rpc import load_remote
        if trusted is not None:                   # check here, before anything leaves this machine
            from tvm_qpu.artifact import read_artifact
            read_artifact(args.artifact, trusted_keys=trusted)
        runner = load_remote(args.artifact, spec, device=args.device)
    try:
        with status_line() as status:
            def say(lines):
                status.clear()
                for line in lines:
                    print(line, flush=True)

            inputs = _load_inputs(args.inputs) if args.inputs else runner.fill_inputs(args.fill_mode)
            status.phase = "run"
            outs = runner.run(**inputs)
            if args.outputs:
                with open(args.outputs, "wb") as f:      # exactly this name (np.savez adds .npz to names)
                    np.savez(f, **outs)
            if args.print_top:
                for name, a in outs.items():
                    say(top_rows(name, a, args.print_top))
            if args.stream:
                status.phase = f"stream of {args.stream}"
                t0 = time.perf_counter()
                for _ in runner.run_stream((inputs for _ in range(args.stream)), depth=args.depth or 2):
                    pass
                wall = time.perf_counter() - t0
                say(stream_lines(runner.overlap(), args.stream, wall, runner.meta.get("host_arch", "this")))
            if args.trace:
                runner.trace(args.trace)
                say([f"trace written to {args.trace} ({runner.timeline_kind()} timeline)"])
            if args.print_time or args.profile:
                repeat = args.repeat if spec is None or args.repeat is not None else 10
                prof = runner.profile(inputs, repeat=repeat)
                if args.print_time:
                    say(time_lines(prof))
                if args.profile:
                    say([prof.text()])
            if not (args.outputs or args.print_top or args.print_time or args.profile or args.stream
                    or args.trace):
                say(f"{name}: {a.dtype}{list(a.shape)}" for name, a in outs.items())
    finally:
        runner.close()
    return 0


def _cmd_partition(args):
    import tvm_qpu
    shapes = parse_input_shapes(args.input_shapes)
    records = _records(args, shapes, any_target=True)
    mod, params = tvm_qpu.from_onnx(args.model, shapes)
    from tvm_qpu.tune import measured_cpu
    with measured_cpu(records):
        part = tvm_qpu.partition(mod, params, placement=args.qpu_placement, split=args.qpu_split)
    print(tvm_qpu.partition_report(part).text())
    if args.explain:
        from tvm_qpu.placement import model_table
        print(model_table())
        if records is not None:
            print(f"CPU figures marked [measured: tuning records] come from {args.tuning_records} (measured on "
                  f"{records.measured_where()}); the others [modelled: default-schedule rate] from the CPU model")
            kinds = sorted({e["device"] for e in records.qpu.values()})
            print(f"QPU figures marked [measured: v3d on HOST] are kernel launches timed on that Pi's GPU by "
                  f"tvmc tune (in {args.tuning_records}: {len(records.qpu)} QPU op(s), "
                  f"{', '.join(kinds) if kinds else 'none'}) plus the modelled call and copies; the others "
                  "[modelled: cycle model] are the kernel's cycle-model estimate (emulator entries are modelled "
                  "too, so they never replace it)")
    return 0


def _cmd_tune(args):
    from tvm_qpu.tune import DEFAULT_TRIALS, RemoteSpec, tune
    if args.target not in ("qpu", "llvm"):
        raise CliError(f"unknown target {args.target!r}: choose qpu or llvm")
    if _same_file(args.output, args.model):
        raise CliError(f"-o {args.output} is the input model: refusing to overwrite it")
    remote = None
    if args.rpc_tracker is not None or args.rpc_key is not None:
        if args.hostname is not None or args.port is not None:
            raise CliError("give either --rpc-tracker/--rpc-key or --hostname/--port, not both")
        if args.rpc_tracker is None or args.rpc_key is None:
            raise CliError("--rpc-tracker HOST:PORT and --rpc-key KEY go together")
        host, _, port = args.rpc_tracker.rpartition(":")
        if not host or not port.isdigit():
            raise CliError(f"bad --rpc-tracker {args.rpc_tracker!r}: expected HOST:PORT")
        remote = RemoteSpec(tracker=(host, int(port)), key=args.rpc_key)
    elif args.hostname is not None or args.port is not None:
        if args.hostname is None:
            raise CliError("--port needs --hostname")
        remote = RemoteSpec(host=args.hostname, port=args.port or 9090)
    if remote is not None and args.rpc_timeout is not None:
        remote.timeout = args.rpc_timeout
    elif args.rpc_timeout is not None:
        raise CliError("--rpc-timeout applies to remote tuning only (--rpc-tracker or --hostname)")
    shapes = parse_input_shapes(args.input_shapes)
    tune(args.model, args.output, target=args.target, trials=args.trials or DEFAULT_TRIALS,
         target_host=args.target_host, input_shapes=shapes, placement=args.qpu_placement, remote=remote,
         cost_model=args.cost_model, only_tasks=args.tasks.split(",") if args.tasks else None,
         qpu_measure=args.qpu_measure)
    print(f"use it: tvmc compile {args.model} --target {args.target}"
          + (f" --target-host {args.target_host}" if args.target_host else "")
          + f" --tuning-records {args.output}")
    return 0


def _cmd_keygen(args):
    from tvm_qpu.artifact import generate_key
    priv, pub, kid = generate_key(args.stem)
    print(f"wrote {priv} (private: keep it secret; tvmc compile --sign-key {priv}) and {pub} "
          f"(public: tvmc run --trusted-key {pub}); key id {kid}")
    return 0


#: name, help, add_arguments(parser), run(args) -> exit status
SUBCOMMANDS = [
    ("compile", "compile a model into one artifact file", _args_compile, _cmd_compile),
    ("run", "run a compiled artifact", _args_run, _cmd_run),
    ("partition", "show which ops go to the QPU, and why the others stay", _args_partition, _cmd_partition),
    ("keygen", "make an Ed25519 key pair for signing artifacts", _args_keygen, _cmd_keygen),
    ("tune", "tune the CPU part of a build with MetaSchedule and time its QPU kernels; writes records for "
             "compile --tuning-records",
     _args_tune, _cmd_tune),
]


def build_parser():
    ap = _Parser(prog="tvmc", description="TVM driver for the qpu target (Raspberry Pi 5 VideoCore VII)")
    ap.add_argument("--version", action="version", version=_version(), help="print the versions and exit")
    sub = ap.add_subparsers(dest="cmd", parser_class=_Parser, metavar="COMMAND")
    for name, text, add_args, run in SUBCOMMANDS:
        p = sub.add_parser(name, help=text, description=text)
        add_args(p)
        p.set_defaults(_run=run)
    return ap


def _one_line(e) -> str:
    msg = " ".join(str(e).split())
    for lib, cli in CLI_HINTS.items():
        msg = msg.replace(lib, cli)
    return msg or type(e).__name__


def _known_errors() -> tuple:
    """Exception types whose message is enough (no type name in front)."""
    from importlib import import_module
    known = (CliError,)
    for mod, name in (("tvm_qpu.backend", "QpuError"), ("tvm_qpu.tune", "TuningError"), ("tvm_qpu.artifact", "ArtifactError"),
                      ("tvm_qpu.runtime.device", "DeviceError"), ("tvm_qpu.rpc", "RemoteError")):
        try:
            known += (getattr(import_module(mod), name),)
        except (ImportError, AttributeError):
            pass
    return known


def _exit_now(code: int):
    """Leave at once: skip the interpreter's teardown (TVM, numba: over a second), so that Ctrl-C
    ends the process promptly. Everything we own was closed on the way out already."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


def main(argv=None) -> int:
    """Run tvmc with ``argv`` (default: the command line). Returns the exit status; as the
    console script (``argv`` None) an interrupted run exits the process at once."""
    try:
        ap = build_parser()
        try:
            args = ap.parse_args(argv)
        except CliError as e:
            print(f"tvmc: error: {_one_line(e).removeprefix('tvmc: ')}", file=sys.stderr)
            return EXIT_USAGE
        if args.cmd is None:
            ap.print_help(sys.stderr)
            return EXIT_USAGE
        return args._run(args)
    except KeyboardInterrupt:
        print("tvmc: interrupted", file=sys.stderr)
        if argv is None:
            _exit_now(EXIT_INTERRUPTED)
        return EXIT_INTERRUPTED
    except Exception as e:  # every failure is one clear line, never a traceback
        prefix = "" if isinstance(e, _known_errors()) else f"{type(e).__name__}: "
        print(f"tvmc: error: {prefix}{_one_line(e)}", file=sys.stderr)
        if os.environ.get("TVMC_TRACEBACK"):
            import traceback
            traceback.print_exc()
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
