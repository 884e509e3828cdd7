"""``python -m tvm_qpu`` / ``tvm-qpu``: the project's main job.

``demo`` (default): compile the bundled digits CNN (models/digits_cnn.onnx) with the qpu target
and with the llvm target, run both on a few test digits (the QPU regions on the embedded emulator,
or on a Pi 5's GPU with ``--device v3d``), and print the placement, the outputs beside each other,
the accuracy on the bundled test split and the QPU time. It forces ``--qpu-placement all`` (every
op a QPU kernel supports goes to the QPU, to show the QPU at work) unless ``--placement`` says
otherwise. On the emulator every QPU time is *modelled* (the emulator's cycle model of a Pi 5) and
every wall time is *measured* on this host, emulation included: the two are not comparable.
``asm``: assemble a bundled example kernel, check it for hazards and print its disassembly.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

REPO_MODELS = Path(__file__).resolve().parent.parent / "models"


def _asm_demo(args) -> int:
    from tvm_qpu.codegen import assemble, disassemble
    from tvm_qpu.codegen.examples import EXAMPLES
    from tvm_qpu.codegen.hazards import check_program

    kernel = EXAMPLES[args.kernel]
    words = assemble(kernel)
    print(f"# {args.kernel}: {len(words)} instructions ({len(words) * 8} bytes)")
    print(f"# {kernel.__doc__.strip().splitlines()[0]}")
    for line in disassemble(words, addresses=True):
        print(line)
    hazards = check_program(words)
    print(f"# static hazard check: {'clean' if not hazards else f'{len(hazards)} hazard(s)'}")
    for h in hazards:
        print(f"#   {h}")
    return 1 if hazards else 0


def _tvmc(*argv) -> int:
    """Run a tvmc command in this process (what the installed ``tvmc`` script runs)."""
    from tvm_qpu.cli import main as tvmc_main
    print(f"\n$ tvmc {' '.join(argv)}")
    return tvmc_main(list(argv))


def _device_kind(device: str) -> str:
    """What ``--device auto`` resolves to here, without opening anything."""
    if device != "auto":
        return device
    env = os.environ.get("TVM_QPU_DEVICE", "auto") or "auto"
    if env != "auto":
        return env
    from tvm_qpu.runtime import v3d
    return "v3d" if v3d.find_render_node() is not None else "emulator"


#: what the demo says about its figures, per device kind
FIGURES_NOTE = {
    "emulator": ("QPU: EMULATED. No Raspberry Pi 5 GPU here: the QPU regions run on tvm-qpu's instruction-"
                 "level emulator.\n  Outputs are real. 'QPU time' figures are MODELLED Pi 5 QPU times (the "
                 "emulator's cycle model).\n  Wall times are MEASURED on this {arch} host and include the "
                 "emulation: they say nothing\n  about Pi 5 speed, and an emulated QPU build is of course far "
                 "slower than the llvm build here."),
    "v3d": ("QPU: the Raspberry Pi 5's GPU (V3D). QPU times and wall times are MEASURED on this machine."),
}


def _model_demo(args) -> int:
    import numpy as np

    import tvm_qpu

    model = Path(args.model)
    if not model.is_file():
        print(f"tvm-qpu demo: model not found: {model} (run from a clone of the repository, or pass --model)",
              file=sys.stderr)
        return 2
    test = model.parent / "digits_test.npz"
    data = np.load(test) if test.is_file() else None
    x = data["x"][: args.count] if data is not None else \
        np.random.default_rng(0).random((args.count, 1, 8, 8), np.float32)

    import platform
    kind = _device_kind(args.device)
    print(FIGURES_NOTE.get(kind, f"QPU device: {kind}").format(arch=platform.machine()))
    print(f"Placement: --qpu-placement {args.placement}" + (
        " (forced by this demo: every op a QPU kernel supports goes to the QPU, to show it at work;\n"
        "  tvmc's default, cost, offloads only where the cost model predicts the QPU wins)"
        if args.placement == "all" else ""))
    with tempfile.TemporaryDirectory() as d:
        qpu_tar, cpu_tar = os.path.join(d, "digits_qpu.tar"), os.path.join(d, "digits_llvm.tar")
        in_npz = os.path.join(d, "in.npz")
        out_q, out_c = os.path.join(d, "out_qpu.npz"), os.path.join(d, "out_llvm.npz")
        steps = [("partition", str(model), "--qpu-placement", args.placement),
                 ("compile", "--target", "qpu", str(model), "-o", qpu_tar, "--qpu-placement", args.placement),
                 ("compile", "--target", "llvm", str(model), "-o", cpu_tar)]
        for argv in steps:
            if _tvmc(*argv) != 0:
                return 1
        qpu = tvm_qpu.load(qpu_tar, device=args.device)
        cpu = tvm_qpu.load(cpu_tar, device=args.device)
        name = qpu.inputs[0]["name"]
        np.savez(in_npz, **{name: x[:1].astype(np.float32)})
        for tar, out in ((qpu_tar, out_q), (cpu_tar, out_c)):
            if _tvmc("run", tar, "--inputs", in_npz, "--outputs", out, "--device", args.device,
                     "--print-top", "3", "--print-time", "--profile", "--repeat", "3") != 0:
                return 1

        where = {"emulator": "emulated", "v3d": "on the Pi 5's GPU"}.get(kind, f"on device {kind}")
        print(f"\nall {len(x)} test digits through both builds (QPU regions {where}):")
        print(f"{'digit':>5} {'label':>5} {'qpu top-1':>9} {'llvm top-1':>10} {'max |qpu - llvm|':>17}")
        worst, agree, correct = 0.0, 0, 0
        for i in range(len(x)):
            xi = x[i: i + 1].astype(np.float32)
            oq = np.asarray(next(iter(qpu.run(**{name: xi}).values())))
            oc = np.asarray(next(iter(cpu.run(**{name: xi}).values())))
            diff = float(np.abs(oq - oc).max())
            worst = max(worst, diff)
            agree += int(oq.argmax() == oc.argmax())
            label = int(data["y"][i]) if data is not None else -1
            correct += int(oq.argmax() == label)
            print(f"{i:>5} {label:>5} {int(oq.argmax()):>9} {int(oc.argmax()):>10} {diff:>17.2e}")
        print(f"\nqpu vs llvm: {agree}/{len(x)} same class, max abs difference {worst:.2e}")
        if data is not None:
            print(f"qpu build accuracy on these {len(x)} test digits: {correct}/{len(x)}")
        if kind == "emulator":
            print("(timings above: 'QPU time' is modelled for a Pi 5; 'wall time' is measured here, with the "
                  "QPU emulated)")
        qpu.close()
        cpu.close()
    return 0 if worst < 1e-3 and agree == len(x) else 1


def main(argv=None) -> int:
    from tvm_qpu.cli import positive_int
    from tvm_qpu.codegen.examples import EXAMPLES

    ap = argparse.ArgumentParser(prog="tvm-qpu", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd")
    d = sub.add_parser("demo", help="compile the digits CNN for qpu and llvm, run and compare")
    d.add_argument("--model", default=str(REPO_MODELS / "digits_cnn.onnx"), help="ONNX model to run")
    d.add_argument("--device", default="auto", choices=("auto", "emulator", "v3d"),
                   help="QPU device: v3d (a Pi 5's GPU), emulator, or auto (v3d if present)")
    d.add_argument("--placement", default="all", choices=("all", "cost", "none"),
                   help="all: offload every supported op (shows the QPU at work); cost: only where faster")
    d.add_argument("--count", type=positive_int, default=16, help="test digits to run")
    a = sub.add_parser("asm", help="assemble and disassemble a bundled example kernel")
    a.add_argument("--kernel", choices=sorted(EXAMPLES), default="vector_add", help="example kernel to show")
    args = ap.parse_args(argv)
    if args.cmd is None:
        args = ap.parse_args(["demo"])
    if args.cmd == "asm":
        return _asm_demo(args)
    return _model_demo(args)


if __name__ == "__main__":
    sys.exit(main())
