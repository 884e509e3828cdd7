#!/usr/bin/env python3
"""Benchmark the QPU kernel library on the emulator's Pi 5 model, each figure with its band.

Every figure is *modelled* (the emulator's cycle model, runtime/cycle_model.py), not measured on a
Pi. Parameters that no published measurement pins have a plausible range
(``cycle_model.RANGES``); each case is emulated under the default model, under the model's two
corners (every ranged parameter at its fast / slow end) and under each structural alternative
(``cycle_model.ALTERNATIVES``), and printed as ``value [low, high]`` over all of them:
modelled time, GOP/s (2 ops per multiply-add) or GiB/s for memory-bound kernels, % of the QPU
peak, and the kernel's own estimate (what placement uses) beside the emulated time. GEMM / conv
rows say which A-operand variant the estimate chose ("unifa" stream or "tmu"); the plan is the
one chosen under the default model, run under every model (so the band shows what a wrong guess
about the unpinned parameters costs), and the forced-variant rows show the alternative.

No column compares with published figures of *other* kernels (a different algorithm says
nothing about ours); the same-algorithm calibration table is in docs/emulator.md.

    python scripts/bench_kernels.py              # full table (1024^3 GEMMs: several minutes x 4 models)
    python scripts/bench_kernels.py --quick      # smaller sizes only
    python scripts/bench_kernels.py --no-band    # default model only (a third of the time)
    python scripts/bench_kernels.py --json       # JSON lines, with "band" entries [low, high]
    python scripts/bench_kernels.py --lowbit     # only int8 vs int4 vs int2 weights (GEMV, GEMM, conv)
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
from tvm_qpu.runtime import cycle_model
from tvm_qpu.runtime.cycle_model import DEFAULT as MODEL
from tvm_qpu.runtime.device import open_device

PEAK = MODEL.peak_gflops()
GIB = float(1 << 30)


def band_models(model=MODEL, band: bool = True) -> list:
    """The TimingModels a figure is evaluated under: the model itself first, then (``band``) the
    models ``TimingModel.band_models()`` names: its fast and slow corners over the unpinned
    parameters' ranges (cycle_model.RANGES) and each structural alternative that reproduces the
    same calibration points (cycle_model.ALTERNATIVES)."""
    if not band:
        return [model]
    return [model, *model.band_models()]


def _rand(shape, dtype, rng):
    if np.dtype(dtype).kind in "iu":
        info = np.iinfo(dtype)
        lo, hi = max(info.min, -100), min(info.max, 100)
        return rng.integers(lo, hi, shape).astype(dtype)
    return rng.standard_normal(shape).astype(dtype)


def gemm_case(n, dtype, a_stream=None):
    """A square GEMM; ``a_stream`` forces a variant (default: chosen by estimate)."""
    out = "int32" if dtype != "float32" else "float32"
    spec = OpSpec("matmul", [((n, n), dtype), ((n, n), dtype)], ((n, n), out),
                  {} if a_stream is None else {"a_stream": a_stream})
    return (f"gemm", f"{n}x{n}x{n}" + ("" if a_stream is None else f" ({a_stream} forced)"), dtype, spec,
            lambda rng: ({"A": _rand((n, n), dtype, rng), "B": _rand((n, n), dtype, rng)}, {}))


def conv_case(n, c, h, w, oc, k, pad, dtype):
    out = "int32" if dtype != "float32" else "float32"
    oh, ow = h + 2 * pad - k + 1, w + 2 * pad - k + 1
    spec = OpSpec("conv2d", [((n, c, h, w), dtype), ((oc, c, k, k), dtype)], ((n, oc, oh, ow), out),
                  {"padding": (pad, pad, pad, pad)})
    return ("conv2d", f"{n}x{c}x{h}x{w}->{oc} {k}x{k} pad{pad}", dtype, spec,
            lambda rng: ({"data": _rand((n, c, h, w), dtype, rng)}, {"weight": _rand((oc, c, k, k), dtype, rng)}))


#: packed weight widths of the low-bit rows -> value range (8: plain int8 weights)
WEIGHT_RANGES = {8: (-128, 127), 4: (-8, 7), 2: (-2, 1)}


def lowbit_gemm_case(M, N, K, bits, packed=None):
    """int8 activations @ constant weights of ``bits`` bits (gemm ``weight_bits``; 8: int8 B,
    a constant (``b_constant``): packed four k-steps per word where the estimate says it pays,
    ``packed`` False / True forbids / forces that)."""
    attrs = {"b_constant": True} if bits == 8 else {"weight_bits": bits}
    if packed is not None:
        attrs["weight_packed"] = packed
    spec = OpSpec("matmul", [((M, K), "int8"), ((K, N), "int8")], ((M, N), "int32"), attrs)
    lo, hi = WEIGHT_RANGES[bits]
    tag = "" if packed is None else f" ({'packed' if packed else 'unpacked'} forced)"
    return ("gemm", f"{M}x{N}x{K} w{bits}{tag}", "int8", spec,
            lambda rng: ({"A": _rand((M, K), "int8", rng)},
                         {"B": rng.integers(lo, hi + 1, (K, N)).astype(np.int8)}))


def lowbit_conv_case(n, c, h, w, oc, k, pad, bits, a_stream=None):
    """An int8 conv with ``bits``-bit weights (packed panel where the estimate says it pays);
    ``a_stream`` forces the GEMM A stream ("tmu": the packed panel's stream)."""
    spec = conv_case(n, c, h, w, oc, k, pad, "int8")[3]
    if bits != 8:
        spec.attrs["weight_bits"] = bits
    if a_stream:
        spec.attrs["a_stream"] = a_stream
        if bits != 8:
            spec.attrs["weight_packed"] = True               # the packed panel, not the int8 one
    lo, hi = WEIGHT_RANGES[bits]
    tag = f" ({a_stream} forced)" if a_stream else ""
    return ("conv2d", f"{n}x{c}x{h}x{w}->{oc} {k}x{k} pad{pad} w{bits}{tag}", "int8", spec,
            lambda rng: ({"data": _rand((n, c, h, w), "int8", rng)},
                         {"weight": rng.integers(lo, hi + 1, (oc, c, k, k)).astype(np.int8)}))


def lowbit_cases():
    """int8 vs int4 vs int2 weights: GEMV 1x4096x4096, GEMM 256^3, a 3x3 conv (64 and 8 output
    channels)."""
    rows = []
    for make, shape in ((lowbit_gemm_case, (1, 4096, 4096)), (lowbit_gemm_case, (256, 256, 256)),
                        (lowbit_conv_case, (1, 32, 34, 34, 64, 3, 1)), (lowbit_conv_case, (1, 64, 16, 16, 8, 3, 1))):
        rows += [make(*shape, bits) for bits in (8, 4, 2)]
    # the int8 B unpacked (under the default model the estimate packs both)
    rows += [lowbit_gemm_case(*shape, 8, False) for shape in ((1, 4096, 4096), (256, 256, 256))]
    rows += [lowbit_conv_case(1, 32, 34, 34, 64, 3, 1, bits, "tmu") for bits in (8, 4, 2)]
    return rows


def weight_bytes(plan) -> int:
    """Device bytes of the plan's constant weights (B of a matmul, the conv's weight panel)."""
    return sum(b.nbytes for b in plan.buffers if b.role == "weight" and b.name in ("B", "weight_panel"))


def module_cases():
    """(kernel, shape text, dtype, spec, inputs(rng) -> (inputs, constants)) of the other kernels."""
    import importlib
    rows = []
    for mod in ("pool", "reduce", "softmax", "attention", "elementwise", "layernorm"):
        try:
            m = importlib.import_module(f"tvm_qpu.codegen.kernels.{mod}")
        except ImportError:
            continue
        for name, spec, gen in getattr(m, "bench_cases", lambda: [])():
            dt = str(spec.inputs[0][1])
            rows.append((spec.kind, name, dt, spec, (lambda g: lambda rng: (g(rng), {}))(gen)))
    return rows


FIGURES = ("modeled_seconds", "gops", "percent_of_peak", "gib_per_s", "estimate_seconds")


def figures(plan, stats, spec, model) -> dict:
    """The figures of one emulated run under ``model``."""
    sec = sum(s.seconds for s in stats)
    gops = plan.flops / sec / 1e9 if plan.flops else 0.0
    return {"modeled_seconds": sec, "gops": gops,
            "percent_of_peak": 100 * gops / model.peak_gflops() if plan.flops else 0.0,
            "gib_per_s": plan.bytes_moved / sec / GIB if plan.bytes_moved else 0.0,
            "estimate_seconds": float(registry.estimate(spec, model))}


def run_case(devs, case, rng):
    """Run one case on every device of ``devs`` (one per model of :func:`band_models`): the
    figures of the first model, and each figure's [low, high] over all of them."""
    kernel, shape, dtype, spec, gen = case
    inputs, consts = gen(rng)
    plan = registry.generate(spec, consts)
    per_model, wall, instr = [], 0.0, 0
    for dev in devs:
        t0 = time.time()
        _, stats = run_plan(plan, dev, **inputs)
        wall += time.time() - t0
        instr = sum(s.instructions for s in stats)
        per_model.append(figures(plan, stats, spec, dev.timing))
    packed = plan.attrs.get("weight_packed") or plan.attrs.get("b_bits") is not None
    row = {"kernel": kernel, "shape": shape, "dtype": dtype, "variant": plan.attrs.get("a_stream", "-"),
           "weight_bytes": weight_bytes(plan), "weights_packed": bool(packed),
           **per_model[0], "instructions": instr,
           "launches": len(plan.launches), "emulation_wall_seconds": wall,
           "band": {k: [min(f[k] for f in per_model), max(f[k] for f in per_model)] for k in FIGURES}}
    return row


def bandwidth_bound_gib(model=MODEL) -> float:
    """The model's memory-bandwidth bound: DRAM bytes per cycle x clock (all kernels' minimum
    traffic must cross it once)."""
    return model.dram_bytes_per_cycle * model.clock_hz / GIB


def _b(r, key, scale=1.0, fmt="7.1f"):
    lo, hi = r["band"][key]
    return f"{r[key] * scale:{fmt}} [{lo * scale:{fmt.lstrip('0123456789')}}, {hi * scale:{fmt.lstrip('0123456789')}}]"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", action="store_true", help="print JSON lines instead of the table")
    ap.add_argument("--quick", action="store_true", help="small sizes only (no 1024^3)")
    ap.add_argument("--no-band", action="store_true", help="default model only (no corners)")
    ap.add_argument("--lowbit", action="store_true", help="only the int8 / int4 / int2 weight rows")
    args = ap.parse_args(argv)
    n = 256 if args.quick else 1024
    cases = [gemm_case(n, "float32"), gemm_case(n, "int32"), gemm_case(n, "int16"), gemm_case(n, "int8"),
             gemm_case(n, "float32", "unifa"), gemm_case(n, "float32", "tmu"), gemm_case(n, "int8", "tmu"),
             gemm_case(128, "float32"), gemm_case(128, "int32"),
             conv_case(1, 32, 34, 34, 64, 3, 1, "float32"), conv_case(1, 32, 34, 34, 64, 3, 1, "int32"),
             conv_case(1, 32, 34, 34, 64, 3, 1, "int8")]
    # the GEMM a 1x32x34x34 -> 64 conv maps to: M = 64, N = 34 * 34, K = 32 * 9
    conv_equiv = OpSpec("matmul", [((64, 288), "int32"), ((288, 1156), "int32")], ((64, 1156), "int32"), {})
    cases.append(("gemm", "64x1156x288 (conv equivalent)", "int32", conv_equiv,
                  lambda rng: ({"A": _rand((64, 288), "int32", rng), "B": _rand((288, 1156), "int32", rng)}, {})))
    cases += module_cases()
    cases += lowbit_cases()
    if args.lowbit:
        cases = lowbit_cases()
    models = band_models(MODEL, not args.no_band)
    devs = [open_device("emulator", timing=m) for m in models]
    rng = np.random.default_rng(0)
    rows = []
    if args.json:
        print(json.dumps({"models": [m.describe() for m in models],
                          "ranges": {k: [r.low, r.high] for k, r in cycle_model.RANGES.items()},
                          "alternatives": list(getattr(cycle_model, "ALTERNATIVES", {}))}), flush=True)
    for case in cases:
        try:
            rows.append(run_case(devs, case, rng))
        except Exception as e:                               # report and go on: one bad case
            rows.append({"kernel": case[0], "shape": case[1], "dtype": case[2], "error": str(e).splitlines()[0]})
        if args.json:
            print(json.dumps(rows[-1]), flush=True)
    if args.json:
        return 0
    print(f"modelled Pi 5 (emulator cycle model, not measured): {MODEL.clock_hz / 1e6:.0f} MHz, "
          f"{MODEL.num_qpus} QPUs, peak {PEAK:.1f} GOP/s, DRAM bound {bandwidth_bound_gib():.2f} GiB/s")
    if len(models) > 1:
        print("each figure: default model [low, high] over the unpinned parameters' ranges ("
              + ", ".join(f"{k} {r.low:g}..{r.high:g}" for k, r in cycle_model.RANGES.items())
              + ") and the structural alternatives (" + ", ".join(getattr(cycle_model, "ALTERNATIVES", {})) + ")")
    hdr = (f"{'kernel':<12} {'shape':<34} {'dtype':<8} {'A via':<6} {'modelled ms':>26} {'GOP/s':>22} "
           f"{'%peak':>18} {'GiB/s':>22} {'estimate ms':>10}")
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        if "error" in r:
            print(f"{r['kernel']:<12} {r['shape']:<34} {r['dtype']:<8} ERROR {r['error']}")
            continue
        print(f"{r['kernel']:<12} {r['shape']:<34} {r['dtype']:<8} {r['variant']:<6} {_b(r, 'modeled_seconds', 1e3, '8.3f'):>26} "
              f"{_b(r, 'gops'):>22} {_b(r, 'percent_of_peak', 1, '5.0f'):>18} {_b(r, 'gib_per_s', 1, '6.2f'):>22} "
              f"{r['estimate_seconds'] * 1e3:10.3f}")
    low = [r for r in rows if " w" in r.get("shape", "") and "error" not in r]
    if low:
        print()
        print("low-bit weights (int8 activations; w8 = int8 weights, w4 / w2 = 4 / 2-bit packed where the "
              "plan packs them): modelled time [band], weight bytes on the device")
        for r in low:
            print(f"  {r['kernel']:<8} {r['shape']:<34} {r['variant']:<6} packed={str(r['weights_packed']):<5} "
                  f"{_b(r, 'modeled_seconds', 1e3, '8.3f'):>28} ms  weights {r['weight_bytes']:>9} B  "
                  f"estimate {r['estimate_seconds'] * 1e3:8.3f} ms")
    print()
    print("targets (default model; the band's low end in brackets):")
    by = {(r["kernel"], r["shape"], r["dtype"]): r for r in rows if "error" not in r}

    def get(k, sh, dt):
        return by.get((k, sh, dt))

    def verdict(v, lo, target):
        if v < target:
            return "NOT met"
        return "met" if lo >= target else "met (not over the whole band)"

    big = f"{n}x{n}x{n}"
    for dt, target in (("float32", 40), ("int32", 50), ("int16", 50)):
        r = get("gemm", big, dt)
        if r:
            v, lo = r["percent_of_peak"], r["band"]["percent_of_peak"][0]
            print(f"  GEMM {big} {dt}: {v:.0f}% [{lo:.0f}%] of peak (target >= {target}%): {verdict(v, lo, target)}")
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
            ratio = r["gib_per_s"] / bandwidth_bound_gib()
            lo = r["band"]["gib_per_s"][0] / bandwidth_bound_gib()
            print(f"  {r['kernel']} {r['shape']} {r['dtype']}: {r['gib_per_s']:.2f} GiB/s = {ratio:.0%} [{lo:.0%}] of the "
                  f"bandwidth bound (target >= 80%): {verdict(ratio, lo, 0.8)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
