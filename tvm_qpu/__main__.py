"""``python -m tvm_qpu`` / ``tvm-qpu``: the project's main job.

``demo``: assemble a bundled example kernel, check it for hazards and print its disassembly.
"""
from __future__ import annotations

import argparse
import sys


def _demo(args) -> int:
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


def main(argv=None) -> int:
    from tvm_qpu.codegen.examples import EXAMPLES

    ap = argparse.ArgumentParser(prog="tvm-qpu", description=__doc__)
    sub = ap.add_subparsers(dest="cmd")
    d = sub.add_parser("demo", help="assemble and disassemble a bundled example kernel")
    d.add_argument("--kernel", choices=sorted(EXAMPLES), default="vector_add")
    args = ap.parse_args(argv)
    if args.cmd in (None, "demo"):
        if args.cmd is None:
            args = ap.parse_args(["demo"])
        return _demo(args)
    ap.print_help()
    return 2


if __name__ == "__main__":
    sys.exit(main())
