#!/usr/bin/env python3
"""ONNX Runtime against our ``--target llvm`` build of one model, alternated run by run in one process.

On a shared machine wall times swing with the other jobs; this script runs ORT and each build of
ours in turn (A B A B ...) and reports, besides wall time, the calling thread's CPU time
(``time.thread_time``), which load inflates much less. Both run on the calling thread: ORT with
``intra_op_num_threads=1`` and TVM with ``TVM_NUM_THREADS=1`` (set here before TVM is imported), so
only ``--threads 1`` is offered.

Builds compared (``--ablate`` adds the second):

* ``ours``    ``tvm_qpu.build(target="llvm")`` as shipped;
* ``tuned``   (``--tuning-records JSON``) the same with ``tvmc tune --target llvm`` records;
* ``ablated`` the same with :data:`tvm_qpu.cpu_schedule.FAST_MATH` emptied (libm ``erf`` / ``exp`` / ...)
  and the rules named by ``--without`` removed (default: ``row-reduction``), i.e. the build before
  issue 10's changes.

``--per-call`` also prints each VM call's CPU time in the running model (the minimum over the
runs, summed per function). Usage::

    python scripts/bench_interleaved.py bert_layer [--repeat 30] [--ablate] [--per-call]
"""
from __future__ import annotations

import argparse
import collections
import os
import statistics
import sys
import time

os.environ["TVM_NUM_THREADS"] = "1"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _args(argv):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", help="a bench model (resnet18, mobilenetv2, bert_layer) or an .onnx path")
    ap.add_argument("--repeat", type=int, default=30)
    ap.add_argument("--cache", default=os.path.expanduser("~/.cache/tvm_qpu/bench"))
    ap.add_argument("--ablate", action="store_true", help="also time the build without fast math / --without rules")
    ap.add_argument("--without", action="append", help="rule name left out of the ablated build (repeatable)")
    ap.add_argument("--per-call", action="store_true", help="CPU time of each VM call in the running model")
    ap.add_argument("--tuning-records", metavar="JSON",
                    help="also time the build with these records (tvmc tune MODEL --target llvm -o JSON)")
    return ap.parse_args(argv)


def _model_path(a):
    if a.model.endswith(".onnx"):
        return a.model
    sys.path.insert(0, os.path.join(REPO, "models"))
    import make_bench_models as mb
    return mb.ensure(a.model, a.cache)


def _build(mod, params, fast_math: bool, without=()):
    """Our llvm build; ``fast_math=False`` / ``without`` ablate FAST_MATH and rules for this build only."""
    import tvm_qpu
    from tvm_qpu import cpu_schedule as cs
    saved_table, saved_rules = dict(cs.FAST_MATH), cs.default_rules
    try:
        if not fast_math:
            cs.FAST_MATH.clear()
        if without:
            cs.default_rules = lambda: [r for r in saved_rules() if r.name not in without]
        return tvm_qpu.build(mod, target="llvm", params=params)
    finally:
        cs.FAST_MATH.clear()
        cs.FAST_MATH.update(saved_table)
        cs.default_rules = saved_rules


def _per_call(vm, args, repeat):
    """{function: summed per-call minimum CPU seconds}, {function: calls per run}."""
    seq, start = [], {}

    def instrument(func, sym, before, ret, *a):
        if before:
            start[sym] = time.thread_time()
        else:
            seq.append((sym, time.thread_time() - start[sym]))
        return 0

    vm.set_instrument(instrument)
    runs = []
    for _ in range(repeat):
        seq.clear()
        vm["main"](*args)
        runs.append(list(seq))
    total, calls = collections.defaultdict(float), collections.Counter()
    for i, (name, _) in enumerate(runs[0]):
        total[name] += min(r[i][1] for r in runs)
        calls[name] += 1
    return total, calls


def main(argv=None):
    a = _args(argv)
    sys.path.insert(0, os.path.join(REPO, "scripts"))
    import numpy as np
    import tvm
    from tvm import relax
    import tvm_qpu
    from bench_models import _inputs, ort_session, vm_first_output
    path = _model_path(a)
    x = _inputs(path)
    sess = ort_session(path, 1)
    want = sess.run(None, x)[0]
    mod, params = tvm_qpu.from_onnx(path, {k: list(v.shape) for k, v in x.items()})
    builds = {"ours": _build(mod, params, True)}
    if a.tuning_records:
        from tvm_qpu import tune
        recs = tune.load_records(a.tuning_records, path, "llvm", input_shapes=None)
        builds["tuned"] = tvm_qpu.build(mod, target="llvm", params=params, tuning_records=recs)
        print(f"tuned: {builds['tuned'].meta['tuning_records']['applied']} function(s) from {a.tuning_records}")
    if a.ablate:
        builds["ablated"] = _build(mod, params, False, tuple(a.without or ["row-reduction"]))
    runs, vms = {"ort": lambda: sess.run(None, x)}, {}
    for name, lib in builds.items():
        vm = relax.VirtualMachine(lib.executable, tvm.cpu())
        args = [tvm.runtime.tensor(v) for v in x.values()]
        out = vm_first_output(vm, args)
        print(f"{name}: max abs error vs ORT {float(np.max(np.abs(out.astype(np.float64) - want))):.3g}")
        runs[name] = (lambda vm, args: lambda: vm["main"](*args))(vm, args)
        vms[name] = (vm, args)
    wall = {k: [] for k in runs}
    cpu = {k: [] for k in runs}
    for f in runs.values():
        f()
    for _ in range(a.repeat):
        for k, f in runs.items():
            c, t = time.thread_time(), time.perf_counter()
            f()
            wall[k].append(time.perf_counter() - t)
            cpu[k].append(time.thread_time() - c)
    print(f"# {os.path.basename(path)}, 1 thread, {a.repeat} alternated runs each; ms; ratio = time / ORT's")
    print(f"{'build':8s} {'cpu min':>8s} {'cpu med':>8s} {'wall min':>9s} {'wall med':>9s}  "
          f"{'ratio cpu min':>13s} {'cpu med':>7s} {'wall min':>8s}")
    for k in runs:
        c, w = cpu[k], wall[k]
        print(f"{k:8s} {min(c)*1e3:8.2f} {statistics.median(c)*1e3:8.2f} {min(w)*1e3:9.2f} "
              f"{statistics.median(w)*1e3:9.2f}  {min(c)/min(cpu['ort']):13.2f} "
              f"{statistics.median(c)/statistics.median(cpu['ort']):7.2f} {min(w)/min(wall['ort']):8.2f}")
    if a.per_call:
        for name, (vm, args) in vms.items():
            total, calls = _per_call(vm, args, a.repeat)
            print(f"# {name}: CPU time per VM call in the running model (min over {a.repeat} runs), "
                  f"sum {sum(total.values())*1e3:.2f} ms")
            for fn, s in sorted(total.items(), key=lambda kv: -kv[1]):
                print(f"{s*1e3:8.3f} ms x{calls[fn]} {fn}")


if __name__ == "__main__":
    main()
