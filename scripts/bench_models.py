#!/usr/bin/env python3
"""Benchmark every bundled model and three benchmark-sized ones against ONNX Runtime.

For each model (``models/*.onnx`` plus ResNet-18-, MobileNetV2- and BERT-layer-like graphs from
``models/make_bench_models.py``, random weights, written into a cache directory on first use):

* ``ort``        ONNX Runtime, CPUExecutionProvider, ``intra_op_num_threads = --threads``;
* ``llvm-tvm``   TVM 0.27's default pipeline, ``--target llvm`` as a new user gets it (before);
* ``llvm``       ``tvm_qpu.build(target="llvm")``: :mod:`tvm_qpu.cpu_schedule`'s schedules (after);
* ``llvm-tuned`` only with ``--tuning-records DIR``: ``tvm_qpu.build(target="llvm")`` with the records
  ``DIR/<model>.json`` written by ``tvmc tune <model> --target llvm -o DIR/<model>.json`` (models
  without a file there get "-");
* ``qpu``        ``tvm_qpu.build(target="qpu")``: the CPU part is MEASURED here (wall time minus
  the host time spent in QPU regions), the QPU part is MODELLED (the emulator's cycle model at the
  V3D clock); their sum is labelled ``qpu (cpu measured + qpu modelled)``. For the three big
  models only with ``--qpu-big`` (the emulator executes every offloaded instruction).

All runs use the same thread count: ``TVM_NUM_THREADS`` is set before TVM is imported and ORT
gets the same ``intra_op_num_threads``. Times are the median of ``--repeat`` runs after one warm-up;
compile times are wall time of the build. Every output is compared with ORT (max abs error).
The figures are whatever this machine gives: run it on a quiet machine.

Usage::

    python scripts/bench_models.py [--threads N] [--repeat R] [--only NAME] [--json] [--no-qpu]
                                   [--tuning-records DIR]
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIG = ("resnet18", "mobilenetv2", "bert_layer")


def _args(argv):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--repeat", type=int, default=10)
    ap.add_argument("--only", action="append", help="model name (file stem); repeatable")
    ap.add_argument("--cache", default=os.path.expanduser("~/.cache/tvm_qpu/bench"))
    ap.add_argument("--json", action="store_true", help="print one JSON document instead of the table")
    ap.add_argument("--no-qpu", action="store_true", help="skip the qpu build (emulator runs are slow)")
    ap.add_argument("--qpu-big", action="store_true",
                    help="also build/run the qpu target for the three big models (the emulator runs every "
                         "offloaded QPU instruction: this can take very long)")
    ap.add_argument("--no-baseline", action="store_true", help="skip TVM's default (naive) build")
    ap.add_argument("--tuning-records", metavar="DIR",
                    help="folder of tvmc tune records, DIR/<model>.json (--target llvm): adds the llvm-tuned column")
    return ap.parse_args(argv)


def median_time(fn, repeat):
    """Median wall time of ``repeat`` calls of ``fn`` after one warm-up call (also used by
    calibrate_cpu.py)."""
    fn()
    ts = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def _models(a):
    sys.path.insert(0, os.path.join(REPO, "models"))
    import make_bench_models as mb
    paths = {os.path.splitext(os.path.basename(p))[0]: p for p in sorted(glob.glob(os.path.join(REPO, "models", "*.onnx")))}
    for n in BIG:
        if not a.only or n in a.only:
            paths[n] = mb.ensure(n, a.cache)
    if a.only:
        unknown = sorted(set(a.only) - set(paths))
        if unknown:
            raise SystemExit(f"unknown model(s) {unknown}: choose from {sorted(paths)}")
        paths = {k: v for k, v in paths.items() if k in a.only}
    return paths


def _inputs(path):
    import numpy as np
    import onnx
    m = onnx.load(path, load_external_data=False)
    inits = {t.name for t in m.graph.initializer}
    rng = np.random.default_rng(0)
    out = {}
    for i in m.graph.input:
        if i.name in inits:
            continue
        tt = i.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") else 1 for d in tt.shape.dim]
        dt = onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type)
        if dt.kind == "f":
            out[i.name] = rng.random(shape).astype(dt)
        else:
            out[i.name] = rng.integers(-100, 100, shape).astype(dt)
    return out


def ort_session(path, threads: int):
    """An ONNX Runtime CPU session of ``path`` on ``threads`` intra-op threads (one inter-op)."""
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def vm_first_output(vm, args):
    """``vm["main"](*args)``'s (first) output as a numpy array."""
    out = vm["main"](*args)
    return (out if hasattr(out, "numpy") else out[0]).numpy()


def bench_one(name, path, a):
    import numpy as np
    import tvm
    from tvm import relax
    import tvm_qpu
    from tvm_qpu.api import _partition
    row = {"model": name}
    x = _inputs(path)
    sess = ort_session(path, a.threads)
    want = sess.run(None, x)[0]
    row["ort_s"] = median_time(lambda: sess.run(None, x), a.repeat)
    shapes = {k: list(v.shape) for k, v in x.items()}
    mod, params = tvm_qpu.from_onnx(path, shapes)

    def err(got):
        return float(np.max(np.abs(np.asarray(got, np.float64) - want))) if got.shape == want.shape else None

    if not a.no_baseline:          # TVM's own default pipeline on the same (unpartitioned) module
        t = time.perf_counter()
        backend, part, _ = _partition(mod, params, "none")
        lowered, _ = backend.codegen(part)
        ex = tvm.compile(lowered, target=tvm.target.Target("llvm"))
        row["llvm_tvm_compile_s"] = time.perf_counter() - t
        vm = relax.VirtualMachine(ex, tvm.cpu())
        args = [tvm.runtime.tensor(v) for v in x.values()]
        row["llvm_tvm_err"] = err(vm_first_output(vm, args))
        row["llvm_tvm_s"] = median_time(lambda: vm["main"](*args), max(1, min(a.repeat, 3)))
    t = time.perf_counter()
    lib = tvm_qpu.build(mod, target="llvm", params=params)
    row["llvm_compile_s"] = time.perf_counter() - t
    r = lib.runner()
    row["llvm_err"] = err(next(iter(r.run(**x).values())))
    row["llvm_s"] = r.profile(x, repeat=a.repeat).total_seconds
    r.close()
    row["llvm_tuned_s"] = None
    rec_path = os.path.join(a.tuning_records, f"{name}.json") if a.tuning_records else None
    if rec_path and os.path.exists(rec_path):
        from tvm_qpu.tune import load_records
        recs = load_records(rec_path, path, "llvm", input_shapes=None)
        t = time.perf_counter()
        tlib = tvm_qpu.build(mod, target="llvm", params=params, tuning_records=recs)
        row["llvm_tuned_compile_s"] = time.perf_counter() - t
        row["llvm_tuned_functions"] = tlib.meta["tuning_records"]["applied"]
        tr = tlib.runner()
        row["llvm_tuned_err"] = err(next(iter(tr.run(**x).values())))
        row["llvm_tuned_s"] = tr.profile(x, repeat=a.repeat).total_seconds
        tr.close()
    if not a.no_qpu and (name not in BIG or a.qpu_big):
        t = time.perf_counter()
        qlib = tvm_qpu.build(mod, target="qpu", params=params)
        row["qpu_compile_s"] = time.perf_counter() - t
        row["qpu_regions"] = len(qlib.regions)
        qr = qlib.runner("emulator")
        row["qpu_err"] = err(next(iter(qr.run(**x).values())))
        prof = qr.profile(x, repeat=max(1, min(a.repeat, 3)))
        row["qpu_cpu_measured_s"] = prof.cpu_seconds
        row["qpu_qpu_modelled_s"] = sum(rg["qpu_seconds"] for rg in prof.regions)
        row["qpu_total_s"] = row["qpu_cpu_measured_s"] + row["qpu_qpu_modelled_s"]
        qr.close()
    return row


def _fmt_ms(s):
    return "-" if s is None else f"{s * 1e3:9.3f}"


def _ratio(a, b):
    return "-" if a is None or b is None or b == 0 else f"{a / b:6.1f}x"


def table(rows, meta) -> str:
    lines = [f"# {meta['machine']}, {meta['threads']} thread(s) for ORT and TVM, median of {meta['repeat']} "
             f"(TVM default: of up to 3); times in ms; ratios are time / ORT time",
             f"{'model':18s} {'ORT':>9s} {'TVM dflt':>9s} {'ratio':>7s} {'llvm':>9s} {'ratio':>7s} "
             f"{'compile':>8s} {'qpu cpu(meas)+qpu(model)':>26s} {'ratio':>7s} {'max err':>9s}"]
    for r in rows:
        q = "-" if r.get("qpu_total_s") is None else \
            f"{r['qpu_cpu_measured_s'] * 1e3:.2f}+{r['qpu_qpu_modelled_s'] * 1e3:.2f}"
        lines.append(f"{r['model']:18s} {_fmt_ms(r['ort_s'])} {_fmt_ms(r.get('llvm_tvm_s'))} "
                     f"{_ratio(r.get('llvm_tvm_s'), r['ort_s']):>7s} {_fmt_ms(r['llvm_s'])} "
                     f"{_ratio(r['llvm_s'], r['ort_s']):>7s} {r['llvm_compile_s']:7.1f}s {q:>26s} "
                     f"{_ratio(r.get('qpu_total_s'), r['ort_s']):>7s} "
                     f"{(r['llvm_err'] if r['llvm_err'] is not None else float('nan')):9.2e}")
    tuned = [r for r in rows if r.get("llvm_tuned_s") is not None]
    if not tuned:
        lines.append("llvm tuned: - (no tuning records given: --tuning-records DIR, from tvmc tune --target llvm)")
    for r in tuned:
        lines.append(f"llvm tuned {r['model']:18s} {_fmt_ms(r['llvm_tuned_s'])} ms {_ratio(r['llvm_tuned_s'], r['ort_s'])} "
                     f"of ORT ({r['llvm_tuned_functions']} function(s) from records; max err "
                     f"{r['llvm_tuned_err'] if r['llvm_tuned_err'] is not None else float('nan'):.2e})")
    return "\n".join(lines)


def main(argv=None):
    a = _args(argv)
    os.environ["TVM_NUM_THREADS"] = str(a.threads)      # before TVM starts its thread pool
    paths = _models(a)
    rows = []
    for name, path in paths.items():
        try:
            rows.append(bench_one(name, path, a))
        except Exception as e:   # one failing model must not hide the others: report it
            rows.append({"model": name, "error": f"{type(e).__name__}: {e}", "ort_s": None, "llvm_s": None,
                         "llvm_compile_s": 0.0, "llvm_err": None})
        if not a.json:
            print(f"  done {name}", file=sys.stderr)
    meta = {"machine": f"{platform.machine()} {platform.processor() or ''} {os.cpu_count()} cpus".strip(),
            "threads": a.threads, "repeat": a.repeat, "command": " ".join(sys.argv)}
    if a.json:
        print(json.dumps({"meta": meta, "rows": rows}, indent=1))
    else:
        ok = [r for r in rows if "error" not in r]
        print(table(ok, meta))
        for r in rows:
            if "error" in r:
                print(f"{r['model']}: FAILED {r['error']}")


if __name__ == "__main__":
    main()
