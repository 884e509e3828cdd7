#!/usr/bin/env python3
"""int8 against fp32, end to end: time (QPU modelled + CPU measured), weight bytes, digits accuracy.

Models (all from ``models/``; the quantized variants not bundled are made at run time, in a
temporary directory, by ONNX Runtime's quantizer calibrated on the digits *training* split, the
1347 images ``models/make_models.py`` trains on, so the test split stays unseen):

* ``digits_cnn`` (fp32), ``digits_cnn_qdq`` (bundled QDQ int8), ``digits_cnn_qop`` (quantize_static,
  QOperator: QLinearConv / QGemm, per-channel int8 weights, int8 activations) and ``digits_cnn_dyn``
  (quantize_dynamic: DynamicQuantizeLinear -> ConvInteger / MatMulInteger);
* ``mlp`` and ``lenet5`` (fp32) against their quantize_static QDQ int8 versions (``*_qdq``);
* ``digits_cnn_w8`` / ``_w4`` / ``_w2`` / ``_w842``: the weight-precision variants
  ``models/make_lowbit_models.py`` writes (per-channel INT8 / INT4 / INT2 weights, and conv1 /
  conv2 / fc at 8 / 4 / 2 bits; int8 activations; QDQ opset 21 / 25).

For each model, batch 1:

* ``onnx_weight_bytes``: the initializers stored in the ONNX file; ``qpu_weight_bytes``: the weight
  and bias buffers of the offloaded QPU regions in their device layout (``qpu_table_bytes``: the
  address tables they also read);
* ``cpu_s``: ``tvm_qpu.build(target="llvm")``, MEASURED wall time on this machine (median of
  ``--repeat``, ``Runner.profile``);
* ``qpu_cost`` / ``qpu_all``: the ``--target qpu`` build with ``placement="cost"`` (the cost model's
  choice) and ``"all"`` (every supported op on the QPU): ``total_s`` = ``cpu_s`` (its CPU part,
  MEASURED here) + ``qpu_s`` (its QPU regions, MODELLED by the emulator's Pi 5 cycle model), the
  regions by kind and operand dtypes, and the QPU regions' weight bytes.

Per weight precision (the ``digits_cnn_w*`` models): the weight bits, the weights' bytes in the
ONNX file (packed: 2 int4 / 4 int2 per byte) and on the QPU (the regions' weight buffers, device
layout; biases, requantize tables and address tables not counted), the dtypes the QPU regions run
(``int4`` / ``int2`` when the kernel stores the weights packed, ``weight_bits``; ``int8`` otherwise),
the QPU regions' MODELLED time and the accuracies.

Accuracy on the whole digits test split (``models/digits_test.npz``, 450 images, one at a time) for
the digits models: ORT, TVM llvm and TVM qpu (``placement="all"``, the QPU regions emulated); the
predictions that differ from ORT's on the same model / ORT's int8 from its fp32, the fraction of the
logits identical to ORT's and the largest difference.

``--big`` (instead of the above): ResNet-18 and MobileNetV2 (``models/make_bench_models.py``, 224x224,
random weights) against their ``quantize_static`` QDQ versions (per-channel int8 weights, int8
activations, calibrated on ``--big-calib`` random N(0, 1) inputs: the weights are random, so there
is no data set to calibrate on): per model and placement (``all``, ``cost``) the QPU regions, how
many are integer, the sum of their MODELLED QPU times (the placement estimates of the partition
report, as ``tvmc partition`` prints them; nothing is run) and the modelled whole-model latency
(CPU ops on the CPU cost model, QPU regions synchronous). See :func:`bench_big`.

Usage::

    python scripts/bench_quant.py [--repeat R] [--threads N] [--json] [--no-accuracy] [--models NAME ...]
    python scripts/bench_quant.py --big [--big-calib N] [--json]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELS = os.path.join(REPO, "models")
#: model name -> the fp32 model it is the int8 version of (None: itself fp32)
PAIRS = {"digits_cnn": None, "digits_cnn_qdq": "digits_cnn", "digits_cnn_qop": "digits_cnn",
         "digits_cnn_dyn": "digits_cnn", "mlp": None, "mlp_qdq": "mlp", "lenet5": None, "lenet5_qdq": "lenet5",
         "digits_cnn_w8": "digits_cnn", "digits_cnn_w4": "digits_cnn", "digits_cnn_w2": "digits_cnn",
         "digits_cnn_w842": "digits_cnn"}
#: the qpu builds timed: the cost model's choice, and every supported op on the QPU
PLACEMENTS = ("cost", "all")
DIGITS = ("digits_cnn", "digits_cnn_qdq", "digits_cnn_qop", "digits_cnn_dyn", "digits_cnn_w8", "digits_cnn_w4",
          "digits_cnn_w2", "digits_cnn_w842")
#: the mixed-precision digits models (models/make_lowbit_models.py) -> weight bits (conv1 / conv2 / fc)
PRECISIONS = {"digits_cnn_w8": "8", "digits_cnn_w4": "4", "digits_cnn_w2": "2", "digits_cnn_w842": "8/4/2"}
#: plan constants that are not weights (biases, requantize parameters; ``*_table`` are address tables)
NOT_WEIGHTS = ("bias", "requant")


def _args(argv):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", action="store_true", help="print one JSON document instead of the tables")
    ap.add_argument("--no-accuracy", action="store_true", help="skip the 450-image accuracy runs")
    ap.add_argument("--models", nargs="+", choices=sorted(PAIRS), help="only these models (default: all)")
    ap.add_argument("--big", action="store_true", help="ResNet-18 / MobileNetV2 fp32 vs int8: modelled QPU "
                    "figures from the partition report only (bench_big)")
    ap.add_argument("--big-calib", type=int, default=4, help="random calibration inputs of the --big models")
    return ap.parse_args(argv)


def _train_inputs(name, n=128):
    """Calibration inputs for ``name``'s fp32 model: the first ``n`` training-split images, shaped as
    the model takes them (make_models.py's split and scaling)."""
    sys.path.insert(0, MODELS)
    import make_models as mm
    import numpy as np
    xtr = mm.load_digits_split()[0]
    x = xtr[:n].astype(np.float32)
    if name == "lenet5":
        x = mm.upscale32(x)
    elif name == "mlp":
        x = x.reshape(len(x), -1)
    return x


def _quantize(name, out_dir):
    """Write the quantized models that are not bundled into ``out_dir``; returns {name: path}."""
    import onnxruntime.quantization as q
    paths = {}

    def static(src, dst, fmt, **kw):
        x = _train_inputs(src)
        inp = __import__("onnx").load(os.path.join(MODELS, f"{src}.onnx")).graph.input[0].name
        data = iter([{inp: x[i:i + 1]} for i in range(len(x))])

        class Reader(q.CalibrationDataReader):
            def get_next(self):
                return next(data, None)

        p = os.path.join(out_dir, f"{dst}.onnx")
        q.quantize_static(os.path.join(MODELS, f"{src}.onnx"), p, Reader(), quant_format=fmt, **kw)
        paths[dst] = p

    if name == "digits_cnn_qop":
        static("digits_cnn", name, q.QuantFormat.QOperator, per_channel=True,
               activation_type=q.QuantType.QInt8, weight_type=q.QuantType.QInt8)
    elif name == "digits_cnn_dyn":
        p = os.path.join(out_dir, f"{name}.onnx")
        q.quantize_dynamic(os.path.join(MODELS, "digits_cnn.onnx"), p, weight_type=q.QuantType.QInt8,
                           reduce_range=True)      # 7-bit weights: ORT's x86 u8s8 kernels saturate without it
        paths[name] = p
    elif name in ("mlp_qdq", "lenet5_qdq"):
        static(name[:-4], name, q.QuantFormat.QDQ, per_channel=True,
               activation_type=q.QuantType.QInt8, weight_type=q.QuantType.QInt8)
    return paths


def _model_paths(tmp, only=None):
    import logging
    logging.getLogger().setLevel(logging.ERROR)          # the quantizer's pre-processing advice
    paths = {}
    for name in only or PAIRS:
        if name in PRECISIONS and not os.path.exists(os.path.join(MODELS, f"{name}.onnx")):
            sys.path.insert(0, MODELS)
            import make_lowbit_models
            make_lowbit_models.make(tmp, [name])
            paths[name] = os.path.join(tmp, f"{name}.onnx")
            continue
        bundled = os.path.join(MODELS, f"{name}.onnx")
        paths.update({name: bundled} if os.path.exists(bundled) else _quantize(name, tmp))
    return paths


def _tensor_bytes(t):
    """Bytes an initializer's values take in the file: packed for the 4 / 2-bit types."""
    from onnx import numpy_helper
    from tvm_qpu.onnx_quant import LOWBIT_TYPES
    if t.data_type in LOWBIT_TYPES:
        n = 1
        for d in t.dims:
            n *= int(d)
        return -(-n * LOWBIT_TYPES[t.data_type][1] // 8)
    return numpy_helper.to_array(t).nbytes


def _weight_bytes(path, weights_only=False):
    """Bytes of the ONNX file's initializers; ``weights_only``: just the integer tensors a
    DequantizeLinear reads as its input 0 and that are not int32 (the quantized weights)."""
    import onnx
    from onnx import TensorProto
    g = onnx.load(path).graph
    if not weights_only:
        return int(sum(_tensor_bytes(t) for t in g.initializer))
    dq_in = {n.input[0] for n in g.node if n.op_type == "DequantizeLinear"}
    return int(sum(_tensor_bytes(t) for t in g.initializer if t.name in dq_in and t.data_type != TensorProto.INT32))


def _input(path, rng):
    import numpy as np
    import onnx
    i = onnx.load(path).graph.input[0]
    shape = [d.dim_value or 1 for d in i.type.tensor_type.shape.dim]
    return i.name, rng.random(shape).astype(np.float32)


def _regions(lib):
    """'kind(operand dtypes)' of each region, counted."""
    out = {}
    for r in lib.report.regions:
        spec = r["spec"]
        dts = [p.split("[")[0].strip() for p in spec.split("(", 1)[1].split(")")[0].split(", ") if "[" in p]
        key = f"{r['kind']}({','.join(dts)})"
        out[key] = out.get(key, 0) + 1
    return out


def _plan_weight_bytes(lib):
    """Bytes of the QPU regions' weight buffers (every constant but biases, requantize parameters
    and address tables), device layout."""
    return int(sum(c.nbytes for rg in lib.regions for k, c in rg.plan.constants.items()
                   if k not in NOT_WEIGHTS and not k.endswith("_table")))


def _plan_bytes(lib, tables):
    """Bytes of the QPU regions' constant buffers: the weights and biases (``tables=False``) or the
    index tables the kernels look addresses up in (``*_table``, ``tables=True``)."""
    return int(sum(c.nbytes for rg in lib.regions for k, c in rg.plan.constants.items()
                   if k.endswith("_table") == tables))


def bench_time(name, path, a):
    import numpy as np
    import tvm_qpu
    rng = np.random.default_rng(0)
    inp, x = _input(path, rng)
    mod, params = tvm_qpu.from_onnx(path)
    row = {"model": name, "fp32_of": PAIRS[name], "onnx_weight_bytes": _weight_bytes(path),
           "onnx_weights_only_bytes": _weight_bytes(path, weights_only=True)}
    lib = tvm_qpu.build(mod, target="llvm", params=params)
    r = lib.runner()
    row["cpu_s"] = r.profile({inp: x}, repeat=a.repeat).total_seconds
    r.close()
    for placement in PLACEMENTS:
        qlib = tvm_qpu.build(mod, target="qpu", params=params, placement=placement)
        p = {"regions": _regions(qlib),
             "qdq_chains": f"{sum(d['accepted'] for d in qlib.report.qdq)} of {len(qlib.report.qdq)} integer",
             "qpu_weight_bytes": _plan_bytes(qlib, tables=False), "qpu_table_bytes": _plan_bytes(qlib, tables=True),
             "qpu_weights_only_bytes": _plan_weight_bytes(qlib),
             "specs": [r["spec"] for r in qlib.report.regions if r["kind"] in ("conv2d", "matmul")]}
        qr = qlib.runner("emulator")
        prof = qr.profile({inp: x}, repeat=max(1, min(a.repeat, 3)))
        p["cpu_s"] = prof.cpu_seconds
        p["qpu_s"] = sum(rg["qpu_seconds"] for rg in prof.regions)
        p["total_s"] = p["cpu_s"] + p["qpu_s"]
        qr.close()
        row[f"qpu_{placement}"] = p
    return row


def _ort_session(path):
    """ONNX Runtime session and its optimization level: ORT_ENABLE_ALL, or ORT_ENABLE_BASIC when
    the full level cannot load the model (ORT 1.32 fuses a uint8-activation DQ -> Conv with 2-bit
    weights into QLinearConv, which takes none)."""
    import onnxruntime as ort
    err = None
    for level in (ort.GraphOptimizationLevel.ORT_ENABLE_ALL, ort.GraphOptimizationLevel.ORT_ENABLE_BASIC):
        so = ort.SessionOptions()
        so.log_severity_level = 4
        so.graph_optimization_level = level
        try:
            return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"]), level.name
        except Exception as e:           # noqa: BLE001 - the next level is tried, the last error raised
            err = e
    raise err


def accuracy(paths):
    """Whole-test-split runs of the digits models, one image at a time (batch 1, as the models are
    exported; a dynamically quantized model's activation scales depend on the batch): ORT, TVM llvm and
    TVM qpu with ``placement="all"`` (every supported op in an emulated QPU region)."""
    import numpy as np
    import tvm_qpu
    d = np.load(os.path.join(MODELS, "digits_test.npz"))
    x, y = d["x"].astype(np.float32), d["y"]
    logits = {}
    rows = []
    for name in DIGITS:
        if name not in paths:
            continue
        path = paths[name]
        s, level = _ort_session(path)
        inp = s.get_inputs()[0].name
        want = np.concatenate([s.run(None, {inp: x[i:i + 1]})[0] for i in range(len(x))])
        mod, params = tvm_qpu.from_onnx(path)
        got = {}
        for target, placement in (("llvm", "none"), ("qpu", "all")):
            lib = tvm_qpu.build(mod, target=target, params=params, placement=placement)
            r = lib.runner("emulator")
            got[target] = np.concatenate([next(iter(r.run(**{inp: x[i:i + 1]}).values())) for i in range(len(x))])
            r.close()
        logits[name] = want
        row = {"model": name, "images": int(len(x)), "ort_acc": float((want.argmax(1) == y).mean()),
               "ort_level": level}
        for t, g in got.items():
            row[f"tvm_{t}_acc"] = float((g.argmax(1) == y).mean())
            row[f"tvm_{t}_pred_differs_from_ort"] = int((g.argmax(1) != want.argmax(1)).sum())
            row[f"tvm_{t}_logits_identical_to_ort"] = float((g == want).mean())
            row[f"tvm_{t}_logits_max_abs_diff_from_ort"] = float(np.abs(g.astype(np.float64) - want).max())
        if PAIRS[name] in logits:
            row["ort_pred_differs_from_fp32"] = int((want.argmax(1) != logits[PAIRS[name]].argmax(1)).sum())
        rows.append(row)
    return rows


def _ms(s):
    return f"{s * 1e3:8.3f}"


def _run_dtypes(spec):
    """'conv2d int8 x int4' of a region spec 'conv2d(int8[..], int4[..], int32[..]) -> int8[..]'."""
    import re
    dts = re.findall(r"([a-z]+[0-9]+)\[", spec.split("->")[0])
    return f"{spec.split('(')[0]} {dts[0]} x {dts[1]}" if len(dts) >= 2 else spec


def tables(rows, acc, meta):
    out = [f"# {meta['machine']}; TVM and ORT with {meta['threads']} thread(s); batch 1, median of {meta['repeat']}",
           "# cpu = tvm_qpu llvm build, MEASURED here; qpu = the --target qpu build: its CPU part MEASURED here + "
           "its QPU regions MODELLED (Pi 5 cycle model)",
           f"{'model':16s} {'int8 of':11s} {'onnx w B':>9s} {'cpu ms':>8s} "
           f"{'qpu ms, placement=cost':>24s} {'qpu ms, placement=all':>24s} {'qpu w B':>8s}  regions (all)"]
    for r in rows:
        if "error" in r:
            out.append(f"{r['model']:16s} FAILED {r['error']}")
            continue
        qs = [f"{q['total_s'] * 1e3:.3f} ({q['cpu_s'] * 1e3:.3f}+{q['qpu_s'] * 1e3:.3f})"
              for q in (r["qpu_cost"], r["qpu_all"])]
        reg = ", ".join(f"{n}x {k}" for k, n in sorted(r["qpu_all"]["regions"].items()))
        out.append(f"{r['model']:16s} {r['fp32_of'] or '-':11s} {r['onnx_weight_bytes']:9d} {_ms(r['cpu_s'])} "
                   f"{qs[0]:>24s} {qs[1]:>24s} {r['qpu_all']['qpu_weight_bytes']:8d}  {reg}")
    out.append("# qpu ms = total (CPU part measured + QPU regions modelled); qpu w B = weight + bias bytes of "
               "the QPU regions under placement=all, device layout (address tables not counted)")
    if acc:
        out += ["", f"# digits test split ({acc[0]['images']} images): accuracy; predictions differing from ORT on the "
                "same model; fraction of logits identical to ORT's",
                f"{'model':16s} {'ORT':>6s} {'llvm':>6s} {'qpu all':>7s} {'qpu!=ORT':>9s} {'qpu logits==ORT':>16s} "
                f"{'max |qpu-ORT|':>14s} {'ORT quant!=fp32':>15s}"]
        for r in acc:
            out.append(f"{r['model']:16s} {r['ort_acc']:6.4f} {r['tvm_llvm_acc']:6.4f} {r['tvm_qpu_acc']:7.4f} "
                       f"{r['tvm_qpu_pred_differs_from_ort']:9d} {r['tvm_qpu_logits_identical_to_ort']:16.4f} "
                       f"{r['tvm_qpu_logits_max_abs_diff_from_ort']:14.3g} {r.get('ort_pred_differs_from_fp32', '-'):>15}")
    prec = [r for r in rows if r["model"] in PRECISIONS and "error" not in r]
    if prec:
        accs = {r["model"]: r for r in acc}
        out += ["", "# per weight precision (digits CNN variants): weight bytes in the ONNX file (packed) and on the QPU "
                "(weight buffers, device layout); QPU regions MODELLED (placement=all); accuracy on the test split",
                f"{'model':15s} {'bits':>5s} {'onnx w B':>8s} {'qpu w B':>8s} {'qpu ms (model)':>14s} {'ORT':>6s} "
                f"{'llvm':>6s} {'qpu all':>7s}  conv / matmul regions as they run"]
        for r in prec:
            q = r["qpu_all"]
            a = accs.get(r["model"], {})
            f = lambda k: f"{a[k]:6.4f}" if k in a else "     -"  # noqa: E731
            dts = [_run_dtypes(sp) for sp in q["specs"]]
            out.append(f"{r['model']:15s} {PRECISIONS[r['model']]:>5s} {r['onnx_weights_only_bytes']:8d} "
                       f"{q['qpu_weights_only_bytes']:8d} {q['qpu_s'] * 1e3:14.4f} {f('ort_acc')} {f('tvm_llvm_acc')} "
                       f"{f('tvm_qpu_acc'):>7s}  {'; '.join(dts)}")
    return "\n".join(out)


def main(argv=None):
    a = _args(argv)
    os.environ["TVM_NUM_THREADS"] = str(a.threads)      # before TVM starts its thread pool
    meta = {"machine": f"{platform.machine()} {os.cpu_count()} cpus", "threads": a.threads, "repeat": a.repeat,
            "command": " ".join(["python", "scripts/bench_quant.py"] + (argv if argv is not None else sys.argv[1:]))}
    if a.big:
        rows = bench_big(a)
        print(json.dumps({"meta": meta, "big": rows}, indent=1) if a.json else big_tables(rows, meta))
        return
    with tempfile.TemporaryDirectory(prefix="bench_quant_") as tmp:
        paths = _model_paths(tmp, a.models)
        rows = []
        for name, path in paths.items():
            try:
                rows.append(bench_time(name, path, a))
            except Exception as e:        # one failing model must not hide the others: report it
                rows.append({"model": name, "error": f"{type(e).__name__}: {e}"})
            if not a.json:
                print(f"  timed {name}", file=sys.stderr)
        acc = [] if a.no_accuracy else accuracy(paths)
    if a.json:
        print(json.dumps({"meta": meta, "rows": rows, "accuracy": acc}, indent=1))
    else:
        print(tables(rows, acc, meta))


# ---------------------------------------------------------------------------------------------
# --big: ResNet-18 and MobileNetV2, fp32 vs int8 QDQ, modelled figures of the partition report

BIG_MODELS = ("resnet18", "mobilenetv2")


def _quantize_big(src, dst, n_calib, seed=0):
    """ORT quantize_static: QDQ, per-channel int8 weights, int8 activations, calibrated (MinMax) on
    ``n_calib`` random N(0, 1) inputs of the model's input shape."""
    import numpy as np
    import onnx
    import onnxruntime.quantization as q
    i = onnx.load(src).graph.input[0]
    shape = [d.dim_value or 1 for d in i.type.tensor_type.shape.dim]
    rng = np.random.default_rng(seed)
    data = iter([{i.name: rng.standard_normal(shape).astype(np.float32)} for _ in range(n_calib)])

    class Reader(q.CalibrationDataReader):
        def get_next(self):
            return next(data, None)

    q.quantize_static(src, dst, Reader(), quant_format=q.QuantFormat.QDQ, per_channel=True,
                      activation_type=q.QuantType.QInt8, weight_type=q.QuantType.QInt8)


def _is_integer_region(r) -> bool:
    """An integer region: no float32 operand or output (8- / 16-bit in, int32 or requantized 8-bit out)."""
    return "float32" not in r["spec"]


def _region_signatures(regions) -> dict:
    """'op(operand dtypes) -> output dtype' of each region (shapes dropped), counted."""
    import re
    out = {}
    for r in regions:
        key = re.sub(r"\[[^\]]*\]", "", r["spec"])
        out[key] = out.get(key, 0) + 1
    return out


def _partition_figures(mod, params, placement):
    """Modelled figures of ``tvm_qpu.partition`` under ``placement`` (no build, nothing run)."""
    import tvm_qpu
    rep = tvm_qpu.partition_report(tvm_qpu.partition(mod, params, placement=placement))
    lat = rep.schedule.get("model", {})
    ints = [r for r in rep.regions if _is_integer_region(r)]
    return {"regions": len(rep.regions), "integer_regions": len(ints),
            "regions_by_kind": _region_signatures(rep.regions),
            "qpu_modelled_s": float(sum(r["qpu_s"] or 0.0 for r in rep.regions)),
            "integer_qpu_modelled_s": float(sum(r["qpu_s"] or 0.0 for r in ints)),
            "cpu_ops": len(rep.cpu_ops),
            "latency_sync_modelled_s": lat.get("sync_s"), "cpu_only_modelled_s": lat.get("cpu_only_s"),
            "qdq_chains": f"{sum(d['accepted'] for d in rep.qdq)} of {len(rep.qdq)} integer"}


def bench_big(a):
    """fp32 vs int8 (QDQ) ResNet-18 and MobileNetV2: the partition report's modelled figures per
    placement (:func:`_partition_figures`). Returns rows {model, variant, placement figures}."""
    sys.path.insert(0, MODELS)
    import logging
    import make_bench_models as mb
    import tvm_qpu
    logging.getLogger().setLevel(logging.ERROR)          # the quantizer's pre-processing advice
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_quant_big_") as tmp:
        for name in BIG_MODELS:
            fp32 = mb.ensure(name, tmp)
            int8 = os.path.join(tmp, f"{name}_qdq.onnx")
            _quantize_big(fp32, int8, a.big_calib)
            for variant, path in (("fp32", fp32), ("int8 QDQ", int8)):
                mod, params = tvm_qpu.from_onnx(path)
                row = {"model": name, "variant": variant, "onnx_weight_bytes": _weight_bytes(path)}
                for placement in PLACEMENTS:
                    row[placement] = _partition_figures(mod, params, placement)
                rows.append(row)
                print(f"  partitioned {name} {variant}", file=sys.stderr)
    return rows


def big_tables(rows, meta):
    out = [f"# {meta['command']}",
           "# QPU ms = sum of the QPU regions' MODELLED times (Pi 5 cycle model, partition report estimates); "
           "latency = MODELLED whole model (CPU ops on the CPU cost model, QPU regions synchronous)",
           f"{'model':12s} {'variant':9s} {'onnx w B':>10s} | {'placement=all: regions (int)':>28s} "
           f"{'QPU ms':>8s} {'latency':>8s} | {'placement=cost: regions (int)':>29s} {'QPU ms':>8s} {'latency':>8s}"]
    for r in rows:
        cells = []
        for p in PLACEMENTS[::-1]:                       # all, then cost
            f = r[p]
            cells.append(f"{f['regions']:>22d} ({f['integer_regions']:3d}) {f['qpu_modelled_s'] * 1e3:8.3f} "
                         f"{(f['latency_sync_modelled_s'] or 0) * 1e3:8.3f}")
        out.append(f"{r['model']:12s} {r['variant']:9s} {r['onnx_weight_bytes']:10d} | {cells[0]} | {cells[1]}")
    out.append("# regions under placement=all:")
    for r in rows:
        out.append(f"#   {r['model']} {r['variant']}: " + ", ".join(
            f"{n}x {k}" for k, n in sorted(r["all"]["regions_by_kind"].items())))
    return "\n".join(out)


if __name__ == "__main__":
    main()
