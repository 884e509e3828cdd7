#!/usr/bin/env python3
"""Measure the CPU rates placement.py prices CPU work with: the schedules the build really uses.

Each op kind placement distinguishes is compiled alone, the way ``tvm_qpu.build(target="llvm")``
compiles it (:func:`tvm_qpu.cpu_schedule.relax_pipeline`), at a shape typical of an offload
candidate, and timed on ONE thread (``TVM_NUM_THREADS=1``) through the Relax VM (median of
``--repeat``). The script prints the measured rate per kind on this machine and the rate it implies
for one Cortex-A76 core (:data:`A76_FACTOR`), in the form of ``placement.CPU_MODEL`` entries.

The A76 factor is a peak-throughput ratio, an assumption and not a measurement: an A76 core retires
2 x 128-bit FMA per cycle (16 fp32 FLOP/cycle) at 2.4 GHz = 38.4 GFLOP/s; an x86 core with AVX2
retires 2 x 256-bit FMA per cycle (32 FLOP/cycle) at its clock. The same schedule reaching the same
fraction of peak on both is assumed. On a Pi 5 itself run with ``--factor 1`` to measure directly.

Usage::

    TVM_NUM_THREADS=1 python scripts/calibrate_cpu.py [--repeat 20] [--factor F]
"""
from __future__ import annotations

import argparse
import os
import sys

from bench_models import median_time      # scripts/ is on sys.path when run as a script

A76_PEAK = 16 * 2.4e9            # FLOP/s per core: 2x128-bit FMA (4 lanes x 2 FLOP x 2 pipes) at 2.4 GHz


def host_peak() -> float:
    """fp32 FLOP/s per core of this machine: FMA width x 2 pipes x nominal clock (/proc/cpuinfo)."""
    import tvm_qpu.cpu_schedule as cs
    bits = cs.vector_bits(cs.host_target("llvm"))
    mhz = None
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("cpu mhz"):
                    mhz = float(line.split(":")[1])
                    break
    except OSError:
        pass
    return (bits // 32) * 2 * 2 * (mhz or 2400.0) * 1e6


def _cases():
    """(name, CPU_MODEL key, builder(bb, rng) -> (args), useful ops)."""
    from tvm import relax
    R = relax.op

    def mm(dtype, m, k, n):
        def f(bb, x, w):
            if dtype == "int8":
                return R.matmul(R.astype(x, "int32"), R.astype(w, "int32"))
            return R.matmul(x, w)
        return f, [((m, k), dtype), ((k, n), dtype)], 2 * m * k * n

    def conv(c, h, o):
        def f(bb, x, w):
            return R.nn.relu(R.nn.conv2d(x, w, padding=[1, 1, 1, 1]))
        return f, [((1, c, h, h), "float32"), ((o, c, 3, 3), "float32")], 2 * o * h * h * c * 9

    def pool(c, h):
        def f(bb, x):
            return R.nn.max_pool2d(x, [3, 3], [2, 2], padding=[1, 1, 1, 1])
        return f, [((1, c, h, h), "float32")], c * (h // 2) ** 2 * 9

    def softmax(b, n):
        def f(bb, x):
            return R.nn.softmax(x, axis=-1)
        return f, [((b, n, n), "float32")], b * n * n * 13      # placement's softmax op count (exp = 10)

    return [("matmul fp32 128x768x768", "fp32_gemm_1core", *mm("float32", 128, 768, 768)),
            ("conv2d fp32 64ch 56x56 3x3", "fp32_gemm_1core", *conv(64, 56, 64)),
            ("matmul int8->int32 128x768x768", "int_gemm_rate", *mm("int8", 128, 768, 768)),
            ("max_pool2d 64ch 112x112 3x3/2", "elementwise_rate", *pool(64, 112)),
            ("softmax 12x128x128", "elementwise_rate", *softmax(12, 128))]


def measure(repeat: int):
    import numpy as np
    import tvm
    from tvm import relax
    import tvm_qpu.cpu_schedule as cs
    tgt = cs.host_target("llvm")
    rng = np.random.default_rng(0)
    out = []
    for name, key, f, ins, ops in _cases():
        # the first input is the activation; the others (weights) are constants, as in a model
        # (the build packs constant weights at compile time: cpu_schedule._prepack)
        host = [(rng.standard_normal(s) * 4).astype(d) for s, d in ins]
        bb = relax.BlockBuilder()
        x = relax.Var("x", relax.TensorType(list(ins[0][0]), ins[0][1]))
        with bb.function("main", [x]):
            with bb.dataflow():
                y = bb.emit_output(f(bb, x, *[relax.const(h) for h in host[1:]]))
            bb.emit_func_output(y)
        with cs.lowering_context():
            ex = tvm.compile(bb.get(), target=tgt, relax_pipeline=cs.relax_pipeline(tgt))
        vm = relax.VirtualMachine(ex, tvm.cpu())
        arg = tvm.runtime.tensor(host[0])
        t = median_time(lambda: vm["main"](arg), repeat)
        out.append((name, key, ops / t, t))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--factor", type=float, default=None, help="A76 / this core throughput (default: peak ratio)")
    a = ap.parse_args(argv)
    if os.environ.get("TVM_NUM_THREADS") != "1":
        sys.exit("run with TVM_NUM_THREADS=1 (one core is calibrated; placement scales to 4 cores)")
    factor = a.factor if a.factor is not None else A76_PEAK / host_peak()
    print(f"# host peak {host_peak() / 1e9:.1f} GFLOP/s/core, A76 {A76_PEAK / 1e9:.1f}: factor {factor:.3f}")
    by_key = {}
    for name, key, rate, t in measure(a.repeat):
        print(f"{name:34s} {t * 1e3:8.3f} ms  {rate / 1e9:7.2f} G/s here  {rate * factor / 1e9:7.2f} G/s A76  -> {key}")
        by_key.setdefault(key, []).append(rate * factor)
    for key, rates in by_key.items():
        print(f"{key}: {min(rates):.3g}   (slowest case, A76-scaled)")


if __name__ == "__main__":
    main()
