#!/usr/bin/env python3
"""Compile time and per-inference host overhead of the qpu target against the llvm-only build.

For one model (default: the bundled digits CNN), in one run:

* compile time of ``tvm_qpu.build`` for target ``qpu`` (placement all / cost) and ``llvm``;
* per-inference wall time of the llvm-only build;
* per-inference wall time of the qpu build on a *null device* that accepts every launch and does
  no work: this is the host overhead of the QPU path (Python dispatch, DLPack, input/output
  copies, uniform handling) without emulation time; on a Pi 5 the GPU's own time adds to it.

    python scripts/bench_host_overhead.py [--model models/digits_cnn.onnx] [--repeat 2000] [--json]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import tvm_qpu
from tvm_qpu.runtime.device import Buffer, Device, ExecStats, ProgramHandle

MODELS = Path(__file__).resolve().parent.parent / "models"


class NullDevice(Device):
    """A device that keeps buffers in host memory and completes every launch instantly."""

    kind = "null"

    def __init__(self):
        self._next = 0x1000_0000

    def alloc(self, nbytes: int, align: int = 4096) -> Buffer:
        addr = self._next
        self._next += -(-max(nbytes, 4) // align) * align
        return Buffer(self, addr, nbytes, np.zeros(max(nbytes, 4), np.uint8))

    def free(self, buf: Buffer) -> None:
        pass

    def load_program(self, words, name: str = "kernel") -> ProgramHandle:
        return ProgramHandle(self.alloc(len(words) * 8).addr, np.asarray(words, np.uint64), None, name)

    def execute(self, program, uniforms, **kw) -> ExecStats:
        return ExecStats(modeled=False)


def per_inference(runner, inputs: dict, repeat: int) -> float:
    runner.run(**inputs)                                   # warm up (residency, first calls)
    t0 = time.perf_counter()
    for _ in range(repeat):
        runner.run(**inputs)
    return (time.perf_counter() - t0) / repeat


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(MODELS / "digits_cnn.onnx"))
    ap.add_argument("--repeat", type=int, default=2000)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

    mod, params = tvm_qpu.from_onnx(args.model)
    res = {"model": args.model}
    libs = {}
    for label, target, placement in (("llvm", "llvm", "none"), ("qpu_all", "qpu", "all"), ("qpu_cost", "qpu", "cost")):
        t0 = time.perf_counter()
        libs[label] = tvm_qpu.build(mod, target=target, params=params, placement=placement)
        res[f"compile_seconds_{label}"] = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as d:
        runners = {}
        for label, lib in libs.items():
            path = os.path.join(d, f"{label}.tar")
            lib.save(path)
            runners[label] = tvm_qpu.load(path, device=NullDevice())
        name = runners["llvm"].inputs[0]["name"]
        x = {name: np.random.default_rng(0).random(runners["llvm"].inputs[0]["shape"]).astype(np.float32)}
        for label, r in runners.items():
            res[f"per_inference_seconds_{label}"] = per_inference(r, x, args.repeat)
            res[f"qpu_regions_{label}"] = len(r.executor.info)
        for r in runners.values():
            r.close()
    for label in ("qpu_all", "qpu_cost"):
        extra = res[f"per_inference_seconds_{label}"] - res["per_inference_seconds_llvm"]
        res[f"host_overhead_seconds_{label}"] = extra
        n = res[f"qpu_regions_{label}"]
        res[f"host_overhead_per_region_seconds_{label}"] = extra / n if n else 0.0
    if args.json:
        print(json.dumps(res))
        return 0
    print(f"model: {args.model} (repeat {args.repeat}, QPU launches on a null device: no emulation time)")
    for label in ("llvm", "qpu_all", "qpu_cost"):
        line = (f"  {label:<9} compile {res[f'compile_seconds_{label}']:.3f} s   per inference "
                f"{res[f'per_inference_seconds_{label}'] * 1e6:8.1f} us   QPU regions {res[f'qpu_regions_{label}']}")
        if label != "llvm":
            line += (f"   host overhead vs llvm {res[f'host_overhead_seconds_{label}'] * 1e6:+.1f} us"
                     + (f" ({res[f'host_overhead_per_region_seconds_{label}'] * 1e6:.1f} us per region)"
                        if res[f'qpu_regions_{label}'] else ""))
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
