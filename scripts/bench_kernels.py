#!/usr/bin/env python3
"""Benchmark the QPU kernel library on the emulator's calibrated Pi 5 model (960 MHz, 12 QPUs).

Prints, per kernel and size: modeled time, GOP/s (2 ops per multiply-add) or GiB/s for memory-bound
kernels, % of the QPU peak (92.2 GOP/s), and beside them the published Pi 5 figures of the closest
public QPU kernels and of the Pi 5 CPU (columns marked "published"). Then the targets of the
kernel issue, each with the ratio measured in this run.

    python scripts/bench_kernels.py              # full table (1024^3 GEMMs: a few minutes)
    python scripts/bench_kernels.py --quick      # smaller sizes only
    python scripts/bench_kernels.py --json       # JSON lines: kernel, shape, dtype, modeled_seconds, gops, ...

All figures are modeled by the emulator's cycle model (runtime/cycle_model.py), not measured on a Pi.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np

from tvm_qpu.codegen import registry
from tvm_qpu.codegen.plan import run_plan
from tvm_qpu.codegen.registry import OpSpec
from tvm_qpu.runtime.cycle_model import DEFAULT as MODEL
from tvm_qpu.runtime.device import open_device

PEAK = MODEL.peak_gflops()
GIB = float(1 << 30)

#: published Pi 5 figures (kernel, dtype) -> text; sources: py-videocore7 / Idein benchmarks and
#: the issue text (QPU kernels), NumPy on the Pi 5 CPU for SGEMM.
PUBLISHED = {
    ("gemm", "int32"): "10.7-20.5 GOP/s (QPU int32 GEMM 1024^3)",
    ("gemm", "int16"): "21.7 GOP/s (QPU packed int16 GEMM 1024^3)",
    ("gemm", "float32"): "21.4-22.7 GFLOP/s (QPU SGEMM); CPU NumPy 55 GFLOP/s",
    ("conv2d", "int32"): "18.6 GOP/s (QPU conv 1x32x34x34->64 3x3)",
    ("conv2d", "float32"): "-",
    ("attention", "int32"): "14.4 GOP/s (QPU attention 128x128 int32)",
    ("avg_pool2d", "int32"): "2.62 GiB/s (QPU 2x2 avg pool 1x32x144x144)",
    ("reduce_max", "int32"): "6.5 GiB/s (QPU min/max 4 Mi int32)",
    ("reduce_min", "int32"): "6.5 GiB/s (QPU min/max 4 Mi int32)",
}


def _rand(shape, dtype, rng):
    if np.dtype(dtype).kind in "iu":
        info = np.iinfo(dtype)
        lo, hi = max(info.min, -100), min(info.max, 100)
        return rng.integers(lo, hi, shape).astype(dtype)
    return rng.standard_normal(shape).astype(dtype)


def gemm_case(n, dtype):
    out = "int32" if dtype != "float32" else "float32"
    spec = OpSpec("matmul", [((n, n), dtype), ((n, n), dtype)], ((n, n), out), {})
    return (f"gemm", f"{n}x{n}x{n}", dtype, spec,
            lambda rng: ({"A": _rand((n, n), dtype, rng), "B": _rand((n, n), dtype, rng)}, {}))


def conv_case(n, c, h, w, oc, k, pad, dtype):
    out = "int32" if dtype != "float32" else "float32"
    oh, ow = h + 2 * pad - k + 1, w + 2 * pad - k + 1
    spec = OpSpec("conv2d", [((n, c, h, w), dtype), ((oc, c, k, k), dtype)], ((n, oc, oh, ow), out),
                  {"padding": (pad, pad, pad, pad)})
    return ("conv2d", f"{n}x{c}x{h}x{w}->{oc} {k}x{k} pad{pad}", dtype, spec,
            lambda rng: ({"data": _rand((n, c, h, w), dtype, rng)}, {"weight": _rand((oc, c, k, k), dtype, rng)}))


def module_cases():
    """(kernel, shape text, dtype, spec, inputs(rng) -> (inputs, constants)) of the other kernels."""
    import importlib
    rows = []
    for mod in ("pool", "reduce", "softmax", "attention"):
        try:
            m = importlib.import_module(f"tvm_qpu.codegen.kernels.{mod}")
        except ImportError:
            continue
        for name, spec, gen in getattr(m, "bench_cases", lambda: [])():
            dt = str(spec.inputs[0][1])
            rows.append((spec.kind, name, dt, spec, (lambda g: lambda rng: (g(rng), {}))(gen)))
    return rows


def run_case(dev, case, rng):
    kernel, shape, dtype, spec, gen = case
    inputs, consts = gen(rng)
    plan = registry.generate(spec, consts)
    t0 = time.time()
    _, stats = run_plan(plan, dev, **inputs)
    wall = time.time() - t0
    sec = sum(s.seconds for s in stats)
    row = {"kernel": kernel, "shape": shape, "dtype": dtype, "modeled_seconds": sec,
           "gops": plan.flops / sec / 1e9 if plan.flops else 0.0,
           "percent_of_peak": 100 * plan.flops / sec / 1e9 / PEAK if plan.flops else 0.0,
           "gib_per_s": plan.bytes_moved / sec / GIB if plan.bytes_moved else 0.0,
           "instructions": sum(s.instructions for s in stats), "emulation_wall_seconds": wall,
           "published": PUBLISHED.get((kernel, "int32" if dtype in ("int8", "int32") and (kernel, "int32") in PUBLISHED
                                       and (kernel, dtype) not in PUBLISHED else dtype), "-")}
    return row


def bandwidth_bound_gib(row) -> float:
    """The model's memory-bandwidth bound: DRAM bytes per cycle x clock (all kernels' minimum
    traffic must cross it once)."""
    return MODEL.dram_bytes_per_cycle * MODEL.clock_hz / GIB


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", action="store_true", help="print JSON lines instead of the table")
    ap.add_argument("--quick", action="store_true", help="small sizes only (no 1024^3)")
    args = ap.parse_args(argv)
    n = 256 if args.quick else 1024
    cases = [gemm_case(n, "float32"), gemm_case(n, "int32"), gemm_case(n, "int16"), gemm_case(n, "int8"),
             gemm_case(128, "float32"), gemm_case(128, "int32"),
             conv_case(1, 32, 34, 34, 64, 3, 1, "float32"), conv_case(1, 32, 34, 34, 64, 3, 1, "int32"),
             conv_case(1, 32, 34, 34, 64, 3, 1, "int8")]
    # the GEMM a 1x32x34x34 -> 64 conv maps to: M = 64, N = 34 * 34, K = 32 * 9
    conv_equiv = OpSpec("matmul", [((64, 288), "int32"), ((288, 1156), "int32")], ((64, 1156), "int32"), {})
    cases.append(("gemm", "64x1156x288 (conv equivalent)", "int32", conv_equiv,
                  lambda rng: ({"A": _rand((64, 288), "int32", rng), "B": _rand((288, 1156), "int32", rng)}, {})))
    cases += module_cases()
    dev = open_device("emulator")
    rng = np.random.default_rng(0)
    rows = []
    for case in cases:
        try:
            rows.append(run_case(dev, case, rng))
        except Exception as e:                               # report and go on: one bad case
            rows.append({"kernel": case[0], "shape": case[1], "dtype": case[2], "error": str(e).splitlines()[0]})
        if args.json:
            print(json.dumps(rows[-1]), flush=True)
    if args.json:
        return 0
    print(f"modeled Pi 5: {MODEL.clock_hz / 1e6:.0f} MHz, {MODEL.num_qpus} QPUs, peak {PEAK:.1f} GOP/s, "
          f"DRAM bound {bandwidth_bound_gib(None):.2f} GiB/s")
    hdr = f"{'kernel':<12} {'shape':<34} {'dtype':<8} {'modeled':>10} {'GOP/s':>7} {'%peak':>6} {'GiB/s':>7}  published (Pi 5)"
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        if "error" in r:
            print(f"{r['kernel']:<12} {r['shape']:<34} {r['dtype']:<8} ERROR {r['error']}")
            continue
        print(f"{r['kernel']:<12} {r['shape']:<34} {r['dtype']:<8} {r['modeled_seconds'] * 1e3:8.3f}ms "
              f"{r['gops']:7.1f} {r['percent_of_peak']:5.0f}% {r['gib_per_s']:7.2f}  {r['published']}")
    print()
    print("targets (ratios measured in this run):")
    by = {(r["kernel"], r["shape"], r["dtype"]): r for r in rows if "error" not in r}

    def get(k, sh, dt):
        return by.get((k, sh, dt))

    big = f"{n}x{n}x{n}"
    for dt, target in (("float32", 40), ("int32", 50), ("int16", 50)):
        r = get("gemm", big, dt)
        if r:
            ok = r["percent_of_peak"] >= target
            print(f"  GEMM {big} {dt}: {r['percent_of_peak']:.0f}% of peak (target >= {target}%): {'met' if ok else 'NOT met'}")
    for dt in ("int32", "float32"):
        c = get("conv2d", "1x32x34x34->64 3x3 pad1", dt)
        g = get("gemm", "64x1156x288 (conv equivalent)", "int32")
        if c and g:
            ratio = c["gops"] / g["gops"]
            print(f"  conv {dt} vs GEMM of the same size: {ratio:.0%} (target >= 70%): {'met' if ratio >= 0.7 else 'NOT met'}")
    for r in rows:
        if r.get("kernel") == "attention" and "error" not in r:
            g = get("gemm", "128x128x128", "float32" if r["dtype"] == "float32" else "int32")
            if g:
                ratio = r["gops"] / g["gops"]
                print(f"  attention {r['shape']} {r['dtype']} vs GEMM 128^3: {ratio:.0%} (target >= 70%): "
                      f"{'met' if ratio >= 0.7 else 'NOT met'}")
        if r.get("kernel") in ("avg_pool2d", "max_pool2d", "reduce_max", "reduce_min", "global_avg_pool2d") and "error" not in r:
            ratio = r["gib_per_s"] / bandwidth_bound_gib(r)
            print(f"  {r['kernel']} {r['shape']} {r['dtype']}: {r['gib_per_s']:.2f} GiB/s = {ratio:.0%} of the "
                  f"bandwidth bound (target >= 80%): {'met' if ratio >= 0.8 else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
