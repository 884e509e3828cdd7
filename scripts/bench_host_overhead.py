#!/usr/bin/env python3
"""Compile time and per-inference host overhead of the qpu target against the llvm-only build.

For one model (default: the bundled digits CNN), in one run:

* compile time of ``tvm_qpu.build`` for target ``qpu`` (placement all / cost) and ``llvm``;
* per-inference wall time of the llvm-only build;
* per-inference wall time of the qpu build on a *null device* that accepts every launch and does
  no work: this is the host overhead of the QPU path (Python dispatch, DLPack, input/output
  copies, uniform handling) without emulation time; on a Pi 5 the GPU's own time adds to it.

    python scripts/bench_host_overhead.py [--model models/digits_cnn.onnx] [--repeat 2000]
                                          [--batches 5] [--json]

Per-inference times are the fastest of ``--batches`` batches of ``--repeat`` runs (each runner's
batches are interleaved with the others', so a burst of load elsewhere hits all of them alike).
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


def per_inference(runner, inputs: dict, repeat: int, batches: int = 1) -> float:
    """Wall time per inference: the fastest of ``batches`` batches of ``repeat`` runs (the minimum
    is the figure least disturbed by other processes on a shared machine)."""
    runner.run(**inputs)                                   # warm up (residency, first calls)
    best = float("inf")
    for _ in range(batches):
        t0 = time.perf_counter()
        for _ in range(repeat):
            runner.run(**inputs)
        best = min(best, (time.perf_counter() - t0) / repeat)
    return best


def per_region(runner, repeat: int, batches: int) -> dict:
    """Host time of one QPU region's call path, per region of ``runner`` (a qpu build on the null
    device): ``tvm_qpu.submit_plan`` then ``tvm_qpu.wait_plan`` called through the TVM FFI the
    way the Relax VM calls them (DLPack tensors in, the ticket and the destination tensor out),
    inside a timeline recording as in ``Runner.run``. Fastest of ``batches`` batches; seconds.
    Returns {"submit": [...], "wait": [...], "total": [...]} per region, in region order."""
    import tvm
    import tvm_ffi
    from tvm_qpu import timeline
    from tvm_qpu.executor import SUBMIT_PLAN, WAIT_PLAN
    submit, wait = tvm_ffi.get_global_func(SUBMIT_PLAN), tvm_ffi.get_global_func(WAIT_PLAN)
    ex = runner.executor
    rng = np.random.default_rng(0)
    res = {"submit": [], "wait": [], "total": []}
    for key, info in ex.info.items():
        plan = ex.plans[key]
        by_name = {b.name: b for b in plan.buffers if b.role == "input"}
        specs = [by_name[n] for n in info.input_names] if set(by_name) == set(info.input_names) \
            else [b for b in plan.buffers if b.role == "input"]
        ins = [tvm.runtime.tensor(rng.random(b.shape).astype(b.dtype)) for b in specs]
        outb = [b for b in plan.buffers if b.role == "output"][0]
        out = tvm.runtime.tensor(np.zeros(outb.shape, outb.dtype))
        ticket = tvm.runtime.tensor(np.zeros(1, np.int64))
        best_s = best_w = float("inf")
        with ex.active(), timeline.recording():
            submit(key, *ins, ticket)
            wait(key, ticket, out)                          # warm up (residency)
            for _ in range(batches):
                ts = tw = 0.0
                for _ in range(repeat):
                    t0 = time.perf_counter()
                    submit(key, *ins, ticket)
                    t1 = time.perf_counter()
                    wait(key, ticket, out)
                    tw += time.perf_counter() - t1
                    ts += t1 - t0
                best_s, best_w = min(best_s, ts / repeat), min(best_w, tw / repeat)
        res["submit"].append(best_s)
        res["wait"].append(best_w)
        res["total"].append(best_s + best_w)
    return res


def trace_cpu_per_region(runner, inputs: dict, repeat: int) -> float:
    """CPU time per QPU region as the timeline records it (:mod:`tvm_qpu.timeline`: the VM
    thread's wall time outside emulation / blocking), for a build whose every op is a QPU region
    (on the null device): the smallest recorded CPU time of ``repeat`` inferences / regions. An
    upper bound of the host cost per region (it also holds the VM's entry and exit and any view
    op between regions): the figure :data:`tvm_qpu.placement.QPU_OVERHEAD` ``host`` is set from."""
    n = len(runner.executor.info)
    best = float("inf")
    for _ in range(repeat):
        runner.run(**inputs)
        best = min(best, runner.last_traces[0].cpu_seconds())
    return best / n if n else 0.0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(MODELS / "digits_cnn.onnx"))
    ap.add_argument("--repeat", type=int, default=2000)
    ap.add_argument("--device", choices=("null", "emulator"), default="null",
                    help="null (default): launches do nothing, the host path alone; emulator: the regions "
                         "are emulated (the timeline still leaves emulation time out of CPU time)")
    ap.add_argument("--batches", type=int, default=5, help="batches per runner; the fastest counts")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

    mod, params = tvm_qpu.from_onnx(args.model)
    res = {"model": args.model, "device": args.device}
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
            runners[label] = tvm_qpu.load(path, device=NullDevice() if args.device == "null" else "emulator")
        name = runners["llvm"].inputs[0]["name"]
        x = {name: np.random.default_rng(0).random(runners["llvm"].inputs[0]["shape"]).astype(np.float32)}
        best = {label: float("inf") for label in runners}
        for _ in range(args.batches):                      # interleaved: runner after runner
            for label, r in runners.items():
                best[label] = min(best[label], per_inference(r, x, args.repeat))
        for label, r in runners.items():
            res[f"per_inference_seconds_{label}"] = best[label]
            res[f"qpu_regions_{label}"] = len(r.executor.info)
        regions = per_region(runners["qpu_all"], max(args.repeat // 2, 1), args.batches)
        res["per_region_seconds"] = regions
        res["trace_cpu_per_region_seconds"] = trace_cpu_per_region(runners["qpu_all"], x, args.repeat)
        tot = sorted(regions["total"])
        res["per_region_median_seconds"] = tot[len(tot) // 2] if tot else None
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
    print(f"model: {args.model} (best of {args.batches} x {args.repeat} runs, QPU launches "
          + ("on a null device: no emulation time)" if args.device == "null" else "emulated)"))
    for label in ("llvm", "qpu_all", "qpu_cost"):
        line = (f"  {label:<9} compile {res[f'compile_seconds_{label}']:.3f} s   per inference "
                f"{res[f'per_inference_seconds_{label}'] * 1e6:8.1f} us   QPU regions {res[f'qpu_regions_{label}']}")
        if label != "llvm":
            line += (f"   host overhead vs llvm {res[f'host_overhead_seconds_{label}'] * 1e6:+.1f} us"
                     + (f" ({res[f'host_overhead_per_region_seconds_{label}'] * 1e6:.1f} us per region)"
                        if res[f'qpu_regions_{label}'] else ""))
        print(line)
    reg = res["per_region_seconds"]
    if reg["total"]:
        print(f"  per region (qpu_all, submit + wait through the TVM FFI, null device): "
              + ", ".join(f"{s * 1e6:.1f}+{w * 1e6:.1f}" for s, w in zip(reg["submit"], reg["wait"]))
              + f" us; median {res['per_region_median_seconds'] * 1e6:.1f} us")
    t = res["trace_cpu_per_region_seconds"]
    from tvm_qpu.placement import CPU_MODEL
    f = CPU_MODEL["a76_factor"][0]
    print(f"  CPU time per region in the recorded timeline (qpu_all, smallest of {args.repeat}): "
          f"{t * 1e6:.1f} us here; / a76_factor {f} = {t / f * 1e6:.1f} us on one A76 core "
          f"(placement.QPU_OVERHEAD['host'])")
    return 0


if __name__ == "__main__":
    sys.exit(main())
