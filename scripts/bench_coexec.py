#!/usr/bin/env python3
"""CPU and QPU at once: latency and throughput of CPU-only, sequential offload, asynchronous
regions and pipelined streams, for a ResNet-style CNN, MobileNetV2 and a transformer layer.

Usage::

    python scripts/bench_coexec.py [--json] [--models resnet18,mobilenetv2,bert_layer]
                                   [--size 32] [--stream 4] [--depth 2] [--placement all|cost]
                                   [--repeat 5] [--no-split] [--cpu here|pi5]

Where the figures come from (printed with them):

* **CPU-only**: the model built for ``llvm`` (tvm_qpu's CPU schedules), CPU time per inference
  *measured on this machine* the same way as the offloaded runs' CPU segments (the recorded
  timeline: the VM call), median of ``--repeat`` runs (an x86 box unless you run it on a Pi 5).
  ``--cpu pi5`` runs the CPU work on one thread (``TVM_NUM_THREADS=1``) and multiplies every CPU
  time (CPU-only and the CPU segments of the offloaded runs, host overhead included) by this
  core's fp32 peak / one A76 core's (``scripts/calibrate_cpu.py``, the same per-core assumption
  the placement's CPU model makes): the CPU side of one A76 core (the Pi 5 has four), labelled.
* **predicted vs replayed**: the async speed-up over CPU-only the partition report's Pi 5 cost
  model predicts for each build (:func:`tvm_qpu.coexec.summarize`: 4 A76 cores, the cycle model,
  the per-region host cost ``placement.QPU_OVERHEAD["host"]``) next to the one replayed here.
* **sequential offload / async / stream**: the model built for ``qpu``, run on the emulator; each
  inference is recorded (:mod:`tvm_qpu.timeline`): CPU segments *measured* on this machine, QPU
  regions *modelled* by the emulator's Pi 5 cycle model, and replayed on the virtual clock:
  sequential offload = every wait right after its submit; async = waits at first use; stream =
  ``--depth`` inferences in flight. All three come from the same recorded runs.
* **split** (CPU and QPU sharing layers): the model built with ``placement="cost", split=True``
  (:mod:`tvm_qpu.coexec` plans CPU / QPU / split per conv and matmul for the overlapped latency),
  recorded and replayed the same way: its async latency and its stream throughput.
  ``--no-split`` skips it (planning costs a few extra kernel estimates per conv / matmul).

The models come from ``models/make_bench_models.py`` at a small input size by default (``--size``,
default 32x32 for the CNNs; a 32-token, 128-wide transformer layer) so that the emulated runs take
minutes, not hours; ``--models resnet18 --size 224 --stream 2`` runs the CNN at its real size
(emulating one 224x224 ResNet-18 inference takes about 30 s: use few inferences). Mixing x86 CPU times with Pi 5 QPU times says how much overlap the program
structure allows, not what a Pi 5 achieves: on a Pi the CPU side is several times slower.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "models"))

#: model name -> (builder kwargs, input shape for a given --size)
MODELS = {
    "resnet18": (lambda b: b.resnet18(), lambda s: [1, 3, s, s]),
    "mobilenetv2": (lambda b: b.mobilenetv2(), lambda s: [1, 3, s, s]),
    "bert_layer": (lambda b: b.bert_layer(seq=32, hidden=128, heads=2, ffn=512), lambda s: [1, 32, 128]),
}


def split_available() -> bool:
    """Whether this install has the CPU/QPU split work (:mod:`tvm_qpu.split`)."""
    return importlib.util.find_spec("tvm_qpu.split") is not None


def cpu_only(mod, params, inputs, repeat):
    """CPU time per inference of the llvm build, measured the way the offloaded runs' CPU segments
    are (the recorded timeline's CPU time: the VM call, :mod:`tvm_qpu.timeline`), the median of
    ``repeat`` runs (robust to other load on a shared machine)."""
    import tvm_qpu
    r = tvm_qpu.build(mod, target="llvm", params=params).runner()
    try:
        r.run(**inputs)
        times = []
        for _ in range(repeat):
            r.run(**inputs)
            times.append(r.last_traces[0].cpu_seconds())
        return float(np.median(times))
    finally:
        r.close()


def offloaded(mod, params, inputs, placement, n, depth, split=False, cpu_scale=1.0):
    """Recorded traces of ``n`` inferences of the qpu build, replayed three ways."""
    import tvm_qpu
    from tvm_qpu import timeline as T
    lib = tvm_qpu.build(mod, params=params, placement=placement, split=split)
    r = lib.runner("emulator")
    try:
        r.run(**inputs)                                       # warm-up: residency, numba, caches
        for _ in r.run_stream((inputs for _ in range(n)), depth=depth):
            pass
        traces = [T.scale_cpu(t, cpu_scale) for t in r.last_traces]
    finally:
        r.close()
    seq = [T.schedule([T.as_sync(t)]).makespan for t in traces]
    asy = [T.schedule([t]).makespan for t in traces]
    stream = T.schedule(traces, depth)
    model = (lib.report.schedule or {}).get("model") or {}
    return {"regions": len(lib.regions), "qpu_seconds": float(np.mean([t.qpu_seconds() for t in traces])),
            "predicted": {k: model.get(k) for k in ("cpu_only_s", "sync_s", "overlap_s")},
            "cpu_seconds": float(np.mean([t.cpu_seconds() for t in traces])),
            "sequential_latency": float(np.mean(seq)), "async_latency": float(np.mean(asy)),
            "stream_throughput": n / stream.makespan, "stream_latency": float(np.mean(stream.latencies))}


def bench(name, size, placement, n, depth, repeat, tmp, split=True, cpu_scale=1.0):
    import onnx
    import make_bench_models as B
    import tvm_qpu
    build, shape = MODELS[name]
    path = os.path.join(tmp, f"{name}.onnx")
    onnx.save(build(B), path)
    shp = shape(size)
    mod, params = tvm_qpu.from_onnx(path, input_shapes={"input": shp})
    x = {"input": np.random.default_rng(0).standard_normal(shp).astype(np.float32)}
    t0 = time.perf_counter()
    cpu = cpu_only(mod, params, x, repeat) * cpu_scale
    off = offloaded(mod, params, x, placement, n, depth, cpu_scale=cpu_scale)
    row = {"model": name, "input": shp, "placement": placement, "cpu_only_latency": cpu,
           "cpu_only_throughput": 1 / cpu, **off,
           "sequential_throughput": 1 / off["sequential_latency"], "async_throughput": 1 / off["async_latency"],
           "bench_seconds": None}
    keys = ["sequential", "async", "stream"]
    if split and split_available():
        sp = offloaded(mod, params, x, "cost", n, depth, split=True, cpu_scale=cpu_scale)
        row.update(split_regions=sp["regions"], split_async_latency=sp["async_latency"],
                   split_sequential_latency=sp["sequential_latency"], split_cpu_seconds=sp["cpu_seconds"],
                   split_qpu_seconds=sp["qpu_seconds"], split_predicted=sp["predicted"],
                   split_throughput=1 / sp["async_latency"], split_stream_throughput=sp["stream_throughput"])
        keys += ["split", "split_stream"]
    for k in keys:
        row[f"{k}_vs_cpu_only"] = row[f"{k}_throughput"] / row["cpu_only_throughput"]
    row["predicted_vs_replayed"] = [dict(zip(("build", "predicted_speedup", "replayed_speedup",
                                                "predicted_cpu_only_s", "predicted_async_s"), p))
                                     for p in predicted_vs_replayed(row)]
    row["bench_seconds"] = time.perf_counter() - t0
    return row


def predicted_vs_replayed(row: dict) -> list:
    """(build, predicted speed-up, replayed speed-up) of the asynchronous latency over CPU-only:
    predicted = the partition report's Pi 5 cost model (tvm_qpu.coexec.summarize: CPU-only and
    overlapped latency of the partitioned module), replayed = this run (CPU-only measured, the
    async latency replayed from the recorded traces). Speed-ups, not latencies, are compared: the
    two sides price the CPU differently (the model's 4-core A76 rates vs this box's measured times)."""
    out = []
    for build, pred, asy in (("offload", row.get("predicted"), row.get("async_latency")),
                             ("split", row.get("split_predicted"), row.get("split_async_latency"))):
        if not pred or asy is None or not pred.get("overlap_s") or not pred.get("cpu_only_s"):
            continue
        out.append((build, pred["cpu_only_s"] / pred["overlap_s"], row["cpu_only_latency"] / asy,
                    pred["cpu_only_s"], pred["overlap_s"]))
    return out


LABEL = ("CPU times measured on this {arch} machine (not a Pi 5); QPU times modelled (emulator cycle "
         "model, Pi 5 V3D 7.1); sequential/async/stream replayed on one virtual clock from the same runs")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print one JSON document instead of a table")
    ap.add_argument("--models", default=",".join(MODELS), help="comma-separated: " + ", ".join(MODELS))
    ap.add_argument("--size", type=int, default=32, help="CNN input height = width (default 32)")
    ap.add_argument("--placement", default="all", choices=("all", "cost"), help="qpu placement (default all)")
    ap.add_argument("--stream", type=int, default=4, help="inferences in the stream (default 4)")
    ap.add_argument("--depth", type=int, default=2, help="inferences in flight (default 2)")
    ap.add_argument("--repeat", type=int, default=5, help="timed CPU-only runs (default 5)")
    ap.add_argument("--no-split", action="store_true", help="skip the split build (placement cost + split)")
    ap.add_argument("--cpu", choices=("here", "pi5"), default="here",
                    help="CPU times as measured here (default), or carried to one Pi 5 A76 core by the "
                         "peak-throughput ratio of scripts/calibrate_cpu.py (an assumption, labelled)")
    a = ap.parse_args(argv)
    names = [m for m in a.models.split(",") if m]
    bad = [m for m in names if m not in MODELS]
    if bad:
        ap.error(f"unknown model(s) {bad}: choose from {', '.join(MODELS)}")
    import platform
    cpu_scale = 1.0
    if a.cpu == "pi5":
        # the factor is a per-core ratio: the CPU work must run on one core here too (set before TVM
        # starts its thread pool); the result then stands for one A76 core, not the Pi's four
        threads = os.environ.setdefault("TVM_NUM_THREADS", "1")
        if threads != "1":
            ap.error(f"--cpu pi5 scales one core's times: run with TVM_NUM_THREADS=1 (got {threads})")
        from calibrate_cpu import A76_PEAK, host_peak     # scripts/ is on sys.path when run as a script
        cpu_scale = host_peak() / A76_PEAK
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_coexec_") as tmp:
        for m in names:
            rows.append(bench(m, a.size, a.placement, a.stream, a.depth, a.repeat, tmp, split=not a.no_split,
                              cpu_scale=cpu_scale))
            if not a.json:
                print(f"[{m} done in {rows[-1]['bench_seconds']:.0f} s]", file=sys.stderr, flush=True)
    label = LABEL.format(arch=platform.machine())
    if a.cpu == "pi5":
        label += (
            f"; CPU work on one thread (TVM_NUM_THREADS=1), its times then scaled x{cpu_scale:.2f} to one "
            f"Cortex-A76 core by the fp32 peak ratio (scripts/calibrate_cpu.py: an assumption, not a Pi "
            f"measurement; the Pi 5 has four such cores)")
    if a.json:
        print(json.dumps({"how": label, "depth": a.depth, "stream": a.stream, "rows": rows}, indent=1))
        return 0
    print(label)
    print(f"{'model':12s} {'input':16s} {'regions':>7s} {'CPU-only':>10s} {'seq.offl.':>10s} {'async':>10s} "
          f"{'stream':>10s}   throughput vs CPU-only: seq / async / stream   split")
    for r in rows:
        print(f"{r['model']:12s} {str(r['input']):16s} {r['regions']:7d} "
              f"{r['cpu_only_latency'] * 1e3:8.3f}ms {r['sequential_latency'] * 1e3:8.3f}ms "
              f"{r['async_latency'] * 1e3:8.3f}ms {1e3 / r['stream_throughput']:8.3f}ms   "
              f"{r['sequential_vs_cpu_only']:.2f}x / {r['async_vs_cpu_only']:.2f}x / {r['stream_vs_cpu_only']:.2f}x"
              + (f"   async {r['split_async_latency'] * 1e3:.3f}ms {r['split_vs_cpu_only']:.2f}x, stream "
                 f"{r['split_stream_vs_cpu_only']:.2f}x ({r['split_regions']} regions)" if "split_regions" in r else "   -"))
    parts = lambda k: ", ".join(f"{r['model']} {r[k] * 1e3:.3f}ms" for r in rows)     # noqa: E731
    print(f"(latency per inference; the stream column is 1 / throughput with {a.depth} in flight; "
          f"CPU part of the offloaded runs: {parts('cpu_seconds')}; QPU part: {parts('qpu_seconds')})")
    for r in rows:
        if "split_regions" in r:
            print(f"{r['model']} split build: CPU part {r['split_cpu_seconds'] * 1e3:.3f}ms, QPU part "
                  f"{r['split_qpu_seconds'] * 1e3:.3f}ms, sequential {r['split_sequential_latency'] * 1e3:.3f}ms")
        for p in r["predicted_vs_replayed"]:
            print(f"{r['model']} {p['build']:7s} async speed-up over CPU-only: predicted {p['predicted_speedup']:.2f}x "
                  f"(Pi 5 cost model: CPU-only {p['predicted_cpu_only_s'] * 1e3:.3f}ms, async "
                  f"{p['predicted_async_s'] * 1e3:.3f}ms), replayed {p['replayed_speedup']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
