"""tvmc tune (tvm_qpu.tune): MetaSchedule records for the CPU part of a build.

Fast tests use records files written for the real build identity of models/mlp.onnx (no tuning):
corrupt / foreign records are refused with the reason, placement prices the ops the records
measured by the measurement and says so. The ``slow`` tests share one tiny real tuning run
(--target llvm, a few trials per task; minutes on a busy 2-core box, most of it TVM's import of
its tensor intrinsics and MetaSchedule's worker processes): the tuned build equals ONNX Runtime, a
second run with the same -o resumes instead of starting over, a record that no longer applies
falls back to the default schedule, and the real records drive placement. No test checks a time.
"""
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import tvm_qpu
from tvm_qpu import tune as T

REPO = Path(__file__).resolve().parent.parent
MLP = REPO / "models" / "mlp.onnx"
TRIALS = 4


def _ffi_ok() -> bool:
    try:
        T.check_environment()
        return True
    except T.TuningError:
        return False


pytestmark = pytest.mark.skipif(not _ffi_ok(), reason="MetaSchedule cannot run in this environment "
                                                      "(see tvm_qpu.tune.check_environment)")


def _synthetic(path, target="llvm", seconds=1e-3, model=MLP):
    """A records file for ``model``'s real build identity whose every op workload 'measured'
    ``seconds`` (no tuning: for the refusal and placement plumbing)."""
    ident = T.build_identity(model, target)
    wl = T.collect_workloads(model, target)
    header = dict(ident.header(), model_file=Path(model).name, measured_on="a test (synthetic)")
    rec = T.RecordSet(str(path), header)
    rec.ops = wl.ops
    for h, t in wl.tasks.items():
        rec.workloads[h] = {"task": t.name, "trials": 1, "best": None, "seconds": seconds}
    rec.save()
    return path


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    return _synthetic(tmp_path_factory.mktemp("tune") / "synthetic.json")


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    """(records path, tuning log) of one tiny run over the whole mlp (--target llvm)."""
    out = tmp_path_factory.mktemp("tune") / "mlp_records.json"
    log = io.StringIO()
    T.tune(MLP, out, target="llvm", trials=TRIALS, out=log)
    return out, log.getvalue()


def _ort(x):
    ort = pytest.importorskip("onnxruntime")
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    s = ort.InferenceSession(str(MLP), so, providers=["CPUExecutionProvider"])
    return s.run(None, {s.get_inputs()[0].name: x})[0]


def _assert_equals_onnxruntime(lib, seed):
    """The built mlp's output on a random input equals ONNX Runtime's."""
    x = np.random.default_rng(seed).standard_normal((1, 64)).astype(np.float32)
    runner = lib.runner("emulator")
    try:
        got = next(iter(runner.run(input=x).values()))
    finally:
        runner.close()
    np.testing.assert_allclose(got, _ort(x), rtol=1e-4, atol=1e-4)


def _copy(src, dst, edit=None):
    """A copy of a records file, optionally edited through RecordSet (so its sha256 stays valid)."""
    rec = T.read_records(src)
    if edit is not None:
        edit(rec)
    rec.path = str(dst)
    rec.save()
    return dst


@pytest.mark.slow
def test_tuning_writes_measured_records(tuned):
    path, log = tuned
    rec = T.read_records(path)
    assert rec.header["target"] == "llvm" and rec.header["model_sha256"] == T.file_sha256(MLP)
    assert len(rec.workloads) == 3                       # mlp: three fused dense (+ relu) functions
    for w in rec.workloads.values():
        assert w["trials"] >= TRIALS
    measured = [w for w in rec.workloads.values() if w["seconds"] is not None]
    assert measured, f"no candidate was measured:\n{log}"
    assert all(w["seconds"] > 0 and w["best"] is not None for w in measured)
    assert all("default_seconds" in w for w in rec.workloads.values())   # the default schedule, timed too
    from tvm_qpu import cpu_schedule as cs
    for h, w in rec.workloads.items():      # a build uses whichever was measured fastest
        rule = min(w["default_seconds"], w.get("variant_seconds", w["default_seconds"]))
        if "variant" in w:                  # a rule variant is kept only where it beat the default
            assert set(w["variant"]) == set(cs.KNOBS) and w["variant_seconds"] < w["default_seconds"]
        if w["seconds"] is not None and w["default_seconds"] is not None:
            assert rec.use_record(h) == (w["seconds"] < rule)
            assert rec.best_seconds(h) == min(w["seconds"], rule)
            assert (rec.use_variant(h) is not None) == ("variant" in w and not rec.use_record(h))
    assert "task 1/3" in log and "trials" in log


@pytest.mark.slow
def test_tuned_build_equals_onnxruntime(tuned):
    path, _ = tuned
    rec = T.load_records(path, MLP, "llvm")
    mod, params = tvm_qpu.from_onnx(MLP)
    lib = tvm_qpu.build(mod, target="llvm", params=params, tuning_records=rec)
    info = lib.meta["tuning_records"]
    n_used = sum(rec.use_record(h) for h in rec.workloads)    # measured, and faster than the default
    assert info["applied"] == n_used and not info["fell_back"]
    assert sum(r.startswith("tuned") for r in lib.meta["cpu_schedules"].values()) == n_used
    _assert_equals_onnxruntime(lib, seed=0)


def test_rule_variants_differ_and_start_with_the_default():
    # a K-blocked matmul (768 x 16 floats outgrow the default panel): panel sizes and tile widths
    # schedule it differently (the MLP's small matmuls have one distinct schedule only)
    from tvm import te
    from tvm_qpu import cpu_schedule as cs
    a, b = te.placeholder((128, 768), name="a"), te.placeholder((768, 96), name="b")
    k = te.reduce_axis((0, 768), name="k")
    c = te.compute((128, 96), lambda i, j: te.sum(a[i, k] * b[k, j], axis=k), name="c")
    cands = T._rule_candidates(te.create_prim_func([a, b, c]), cs.host_target("llvm"))
    assert len(cands) > 1 and cands[0][0] == cs.KNOBS          # the default schedule is measured
    scripts = [f.script() for _, f in cands]
    assert len(set(scripts)) == len(scripts)                    # each variant schedules differently
    with pytest.raises(ValueError, match="unknown TiledReduction knob"):
        cs.TiledReduction({"panel_kb": 4})


@pytest.mark.parametrize("again, kept", [(0.8, True), (1.0, False), (0.99, False)])
def test_a_variant_is_kept_only_if_its_lead_holds_when_timed_again(monkeypatch, again, kept):
    # one timing each: the last variant reads 0.8 s against the default's 1.0 s; timed again beside
    # the default it reads `again`: kept only if still faster by VARIANT_MARGIN
    import types
    from tvm_qpu import cpu_schedule as cs
    wl = T.collect_workloads(MLP, "llvm")
    h, task = next(iter(wl.tasks.items()))
    variants = cs.knob_variants()[:3]        # the default and two others (one function serves)
    monkeypatch.setattr(T, "_rule_candidates", lambda func, target: [(k, task.func) for k in variants])
    n = len(variants)
    seen = []

    class Builder:
        def build(self, inputs):
            return [types.SimpleNamespace(error_msg=None, artifact_path=f"cand{i}") for i in range(len(inputs))]

    class Runner:
        def run(self, inputs):
            out = []
            for ri in inputs:
                first = ri.artifact_path not in seen
                seen.append(ri.artifact_path)
                t = 1.0 if ri.artifact_path == "cand0" else (0.8 if first else again) \
                    if ri.artifact_path == f"cand{n - 1}" else 2.0
                res = types.SimpleNamespace(run_secs=[t], error_msg=None)
                out.append(types.SimpleNamespace(result=lambda r=res: r))
            return out

    log = io.StringIO()
    found = T._measure_defaults(wl.tasks, [h], cs.host_target("llvm"), cs.host_target("llvm"), Builder(), Runner(), log)
    assert seen.count("cand0") == 1 + T.CONFIRM_ROUNDS and seen.count(f"cand{n - 1}") == 1 + T.CONFIRM_ROUNDS
    assert found[h]["default_seconds"] == 1.0
    assert ("variant" in found[h]) == kept
    if kept:
        assert found[h]["variant_seconds"] == again and found[h]["variant"] != cs.KNOBS
    else:
        assert "did not hold" in log.getvalue()


@pytest.mark.slow
def test_build_uses_a_faster_rule_variant(tuned, tmp_path):
    path, _ = tuned
    knobs = {"panel_bytes": 2048, "partial_tiles": 0, "max_vectors": 2}

    def edit(rec):        # one task: a variant measured faster than its default and its record
        h = sorted(rec.workloads)[0]
        w = rec.workloads[h]
        w.update(variant=knobs, variant_seconds=1e-9, default_seconds=1.0, seconds=1.0)
    dst = _copy(path, tmp_path / "variant.json", edit)
    rec = T.load_records(dst, MLP, "llvm")
    h = next(h for h, w in rec.workloads.items() if w.get("variant_seconds") == 1e-9)
    assert rec.use_variant(h) == knobs and not rec.use_record(h) and rec.best_seconds(h) == 1e-9
    mod, params = tvm_qpu.from_onnx(MLP)
    lib = tvm_qpu.build(mod, target="llvm", params=params, tuning_records=rec)
    used = [r for r in lib.meta["cpu_schedules"].values() if "partial_tiles=0" in r]
    assert len(used) == 1 and "panel_bytes=2048" in used[0], lib.meta["cpu_schedules"]
    _assert_equals_onnxruntime(lib, seed=3)


@pytest.mark.slow
def test_rerun_resumes_instead_of_starting_over(tuned, tmp_path):
    path, _ = tuned
    first = T.read_records(path)
    h_redo = sorted(first.workloads)[0]

    def interrupted(rec):          # what a run stopped during its first task leaves behind
        for w in rec.workloads.values():
            w.pop("searched_to", None)           # written only when the search ends normally
        rec.workloads[h_redo].update(trials=0, best=None, seconds=None, failed=0)

    out = _copy(path, tmp_path / "partial.json", interrupted)
    log = io.StringIO()
    again = T.tune(MLP, out, target="llvm", trials=TRIALS, out=log)
    text = log.getvalue()
    assert "resuming" in text and "2 task(s) done" in text
    for h, w in first.workloads.items():
        if h != h_redo:            # finished tasks are kept as they were, not tuned again
            assert again.workloads[h] == {k: v for k, v in w.items() if k != "searched_to"}
    assert again.workloads[h_redo]["trials"] >= TRIALS
    # a complete file: nothing left to do
    log = io.StringIO()
    T.tune(MLP, out, target="llvm", trials=TRIALS, out=log)
    assert "3 task(s) done" in log.getvalue() and "task 1/3" not in log.getvalue()


@pytest.mark.parametrize("damage, reason", [
    (lambda p: p.write_text(p.read_text()[:-40]), "not JSON"),
    (lambda p: p.write_text(p.read_text().replace('"trials": ', '"trials": 1', 1)), "sha256"),
    (lambda p: p.write_text(json.dumps({"format": "something else"})), "not a tvm-qpu tuning records file"),
    # records from before weights were packed at compile time name other functions
    (lambda p: p.write_text(json.dumps({**json.loads(p.read_text()), "version": 1})),
     r"version 1; this tvm-qpu reads 2 \(re-run tvmc tune\)"),
])
def test_corrupt_records_are_refused(synthetic, tmp_path, damage, reason):
    T.load_records(synthetic, MLP, "llvm")                  # the intact file is accepted
    bad = tmp_path / "bad.json"
    shutil.copy(synthetic, bad)
    damage(bad)
    with pytest.raises(T.TuningError, match=reason):
        T.load_records(bad, MLP, "llvm")


def test_records_of_another_model_or_target_are_refused(synthetic):
    path = synthetic
    with pytest.raises(T.TuningError, match="another model"):
        T.load_records(path, REPO / "models" / "lenet5.onnx", "llvm")
    with pytest.raises(T.TuningError, match="--target llvm, this build is --target qpu"):
        T.load_records(path, MLP, "qpu")
    with pytest.raises(T.TuningError, match="input shapes"):
        T.load_records(path, MLP, "llvm", input_shapes={"input": [2, 64]})
    with pytest.raises(T.TuningError, match="CPU target"):
        T.load_records(path, MLP, "llvm", target_host="pi5")
    with pytest.raises(T.TuningError, match="another model"):    # resuming into another model's file
        T.tune(REPO / "models" / "lenet5.onnx", path, target="llvm", trials=1, out=io.StringIO())


def test_cli_refuses_foreign_records(synthetic, tmp_path, capsys):
    from tvm_qpu.cli import main
    rc = main(["compile", str(REPO / "models" / "lenet5.onnx"), "--target", "llvm", "-o",
               str(tmp_path / "x.tar"), "--tuning-records", str(synthetic)])
    err = capsys.readouterr().err
    assert rc == 1 and "tuning records are for another model" in err and "Traceback" not in err


@pytest.mark.slow
def test_record_that_does_not_apply_falls_back(tuned, tmp_path):
    rec = T.read_records(tuned[0])
    with_best = [h for h, w in rec.workloads.items() if w["best"] is not None]
    if len(with_best) < 2:
        pytest.skip("needs two measured tasks")
    a, b = with_best[:2]

    def swap(r):                   # each task gets the other's schedule: traces on foreign blocks
        r.workloads[a]["best"], r.workloads[b]["best"] = r.workloads[b]["best"], r.workloads[a]["best"]

    out = _copy(tuned[0], tmp_path / "swapped.json", swap)
    recs = T.load_records(out, MLP, "llvm")
    mod, params = tvm_qpu.from_onnx(MLP)
    lib = tvm_qpu.build(mod, target="llvm", params=params, tuning_records=recs)
    fell = lib.meta["tuning_records"]["fell_back"]
    _assert_equals_onnxruntime(lib, seed=1)
    # a trace replayed on another function either fails (fallback, reported) or still computes it
    assert all(":" in f for f in fell)


def _check_placement_reads(rec):
    """Every candidate whose op the records measured is priced by the measurement (and says so),
    every other one by the model. Returns how many were measured."""
    from tvm_qpu import placement as PL
    measured = {k: rec.op_seconds(k) for k in rec.ops}
    measured = {k: v for k, v in measured.items() if v is not None}
    mod, params = tvm_qpu.from_onnx(MLP)
    with T.measured_cpu(rec):
        report = tvm_qpu.partition_report(tvm_qpu.partition(mod, params, placement="cost"))
    seen = 0
    for c in report.candidates:
        if not c.spec or c.cpu_s is None:
            continue
        # the report keeps the op's description; the records key adds its attributes (e.g. the
        # fused activation), so a description may match several keys
        hits = [v for k, v in measured.items() if k.startswith(c.spec + " ")]
        if T.SOURCE_MEASURED in c.reason:
            seen += 1
            want = [v / PL.CPU_MODEL["a76_factor"][0] + PL.CPU_MODEL["op_overhead"][0] for v in hits]
            assert any(c.cpu_s == pytest.approx(w, rel=1e-9) for w in want), (c.cpu_s, want)
        else:
            assert T.SOURCE_MODELLED in c.reason
    return seen, report


def test_placement_prices_measured_ops_from_records(synthetic):
    rec = T.read_records(synthetic)
    seen, _ = _check_placement_reads(rec)
    assert seen == 3                                   # the mlp's three dense layers
    mod, params = tvm_qpu.from_onnx(MLP)               # without records every figure is modelled
    plain = tvm_qpu.partition_report(tvm_qpu.partition(mod, params, placement="cost"))
    assert all(T.SOURCE_MEASURED not in c.reason for c in plain.candidates if c.spec)


def test_measured_cpu_time_changes_the_placement(tmp_path):
    # a CPU measured far slower than the model: the cost placement now offloads the dense layers
    slow_cpu = T.read_records(_synthetic(tmp_path / "slow.json", target="qpu", seconds=0.5))
    mod, params = tvm_qpu.from_onnx(MLP)
    plain = tvm_qpu.partition_report(tvm_qpu.partition(mod, params, placement="cost"))
    with T.measured_cpu(slow_cpu):
        measured = tvm_qpu.partition_report(tvm_qpu.partition(mod, params, placement="cost"))
    assert len(measured.regions) == 3 and len(plain.regions) < 3
    assert all(T.SOURCE_MEASURED in r["reason"] for r in measured.regions)


def test_cli_partition_explains_the_source(tmp_path, capsys):
    from tvm_qpu.cli import main
    recs = _synthetic(tmp_path / "qpu.json", target="qpu")
    rc = main(["partition", str(MLP), "--explain", "--tuning-records", str(recs)])
    out = capsys.readouterr().out
    assert rc == 0 and "[measured: tuning records" in out and "come from" in out


def test_cli_tune_usage_errors(tmp_path, capsys):
    from tvm_qpu.cli import main
    base = ["tune", str(MLP), "-o", str(tmp_path / "r.json")]
    for extra, msg in ((["--rpc-key", "pi5"], "go together"),
                       (["--rpc-tracker", "h:1", "--rpc-key", "k", "--hostname", "h"], "not both"),
                       (["--rpc-tracker", "nohost", "--rpc-key", "k"], "HOST:PORT"),
                       (["--target", "cuda"], "unknown target")):
        assert main(base + extra) == 1
        assert msg in capsys.readouterr().err
    assert not (tmp_path / "r.json").exists()


def test_broken_ffi_is_refused_before_it_crashes(monkeypatch):
    from importlib import metadata
    real = metadata.version
    monkeypatch.setattr(metadata, "version", lambda n: "0.1.15.post2" if n == "apache-tvm-ffi" else real(n))
    with pytest.raises(T.TuningError, match="apache-tvm-ffi 0.1.15.post2"):
        T.check_environment()


# ---------------------------------------------------------------------------------------------
# QPU measurements in the records (tvmc tune --target qpu)

@pytest.fixture(scope="module")
def qpu_records(tmp_path_factory):
    """Records of ``tvmc tune --target qpu --qpu-measure only`` of the mlp on this machine (the
    emulator: no V3D render node here), and the CLI's output."""
    import contextlib
    from tvm_qpu.cli import main
    path = tmp_path_factory.mktemp("tune") / "qpu.json"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = main(["tune", str(MLP), "--target", "qpu", "--qpu-measure", "only", "-o", str(path)])
    assert rc == 0, out.getvalue()
    return path, out.getvalue()


def _partition(rec=None, placement="cost"):
    """The mlp's partition report, priced with ``rec`` (or without records)."""
    mod, params = tvm_qpu.from_onnx(MLP)
    with T.measured_cpu(rec):
        return tvm_qpu.partition_report(tvm_qpu.partition(mod, params, placement=placement))


def _qpu_figures(report) -> dict:
    """{op description: (QPU seconds, reason)} of the report's priced candidates."""
    return {c.spec: (c.qpu_s, c.reason) for c in report.candidates if c.spec and c.qpu_s is not None}


def _with_qpu(src, dst, cpu_seconds=None, **fields):
    """A copy of the records whose every QPU entry has ``fields`` changed (e.g. a fake v3d run);
    with ``cpu_seconds``, also every CPU workload 'measured' that long (:func:`_synthetic`)."""
    qpu = T.read_records(src).qpu

    def edit(rec):
        rec.qpu = {k: dict(e, **fields) for k, e in qpu.items()}
    if cpu_seconds is not None:
        src = _synthetic(Path(f"{dst}.cpu.json"), target="qpu", seconds=cpu_seconds)
    return _copy(src, dst, edit)


def test_emulator_qpu_entries_are_labelled_modelled(qpu_records):
    path, log = qpu_records
    rec = T.read_records(path)
    ops = T.qpu_ops(MLP)
    # the mlp's three dense layers, in every form placement "all" (matmul + bias + ReLU) and "cost"
    # (matmul + bias, matmul) evaluate
    assert len(ops) >= 3 and sorted(rec.qpu) == sorted(op.key for op in ops)
    for op in ops:
        e = rec.qpu[op.key]
        assert e["device"] == "emulator" and e["plan"] == T.plan_identity(op.plan) and e["seconds"] > 0
    assert log.count("on emulator (modelled by the emulator's cycle model") == len(ops) and "measured;" not in log
    # placement keeps the cycle-model estimate (the same figures as without records), says it is
    # modelled, and names the emulator run it did not use
    for placement in ("cost", "all"):
        plain, priced = _qpu_figures(_partition(placement=placement)), _qpu_figures(_partition(rec, placement))
        assert plain.keys() == priced.keys() and len(priced) >= 3
        for spec, (qpu_s, reason) in priced.items():
            assert qpu_s == plain[spec][0]
            assert f"[{T.SOURCE_QPU_MODELLED}; the records' emulator run" in reason and "v3d" not in reason


def test_v3d_measurement_replaces_the_estimate(qpu_records, tmp_path, capsys):
    from tvm_qpu.cli import main
    path, _ = qpu_records
    # CPU 'measured' at 50 us per dense layer; the GPU at 0.1 us or 0.5 s
    fast = _with_qpu(path, tmp_path / "fast.json", 50e-6, device="v3d", host="pi5-test", seconds=1e-7)
    slow = _with_qpu(path, tmp_path / "slow.json", 50e-6, device="v3d", host="pi5-test", seconds=0.5)
    f_fast = _qpu_figures(_partition(T.read_records(fast)))
    f_slow = _qpu_figures(_partition(T.read_records(slow)))
    for spec, (qpu_s, reason) in f_fast.items():
        assert "[measured: v3d on pi5-test]" in reason
        # the measured launch time is used as it is: only it differs between the two files
        assert f_slow[spec][0] - qpu_s == pytest.approx(0.5 - 1e-7, rel=1e-9)
    # the measurement decides: a fast GPU takes every dense layer, a slow one none
    assert len(_partition(T.read_records(fast)).regions) == 3
    assert len(_partition(T.read_records(slow)).regions) == 0
    rc = main(["partition", str(MLP), "--explain", "--tuning-records", str(fast)])
    out = capsys.readouterr().out
    assert rc == 0 and out.count("[measured: v3d on pi5-test]") >= 3
    assert "QPU figures marked [measured: v3d on HOST]" in out and f"{len(T.read_records(fast).qpu)} QPU op(s), v3d" in out


def test_stale_qpu_measurement_is_ignored_with_the_reason(qpu_records, tmp_path):
    path, _ = qpu_records
    stale = _with_qpu(path, tmp_path / "stale.json", device="v3d", host="pi5-test", seconds=1e-7,
                      plan="0" * 64)       # measured on a kernel generator that made another plan
    plain, priced = _qpu_figures(_partition()), _qpu_figures(_partition(T.read_records(stale)))
    for spec, (qpu_s, reason) in priced.items():
        assert qpu_s == plain[spec][0]          # the estimate, not the stale measurement
        assert "v3d record ignored: the kernel plan changed since it was measured (plan 000000000000..." in reason
        assert "[measured: v3d" not in reason


@pytest.mark.parametrize("field, value, reason", [
    ("device", "gpu", "device 'gpu' is none of v3d, emulator"),
    ("seconds", -1.0, "not a positive number"),
    ("plan", "abc", "plan is not a sha256"),
])
def test_malformed_qpu_entry_is_refused(qpu_records, tmp_path, field, value, reason):
    bad = _with_qpu(qpu_records[0], tmp_path / "bad.json", **{field: value})
    with pytest.raises(T.TuningError, match="corrupt tuning records \\(QPU entry .*" + reason):
        T.read_records(bad)


def test_qpu_measure_needs_target_qpu(tmp_path):
    with pytest.raises(T.TuningError, match="--qpu-measure only needs --target qpu"):
        T.tune(MLP, tmp_path / "r.json", target="llvm", qpu_measure="only", out=io.StringIO())


def test_auto_skips_timing_on_the_local_emulator():
    out = io.StringIO()
    assert T._auto_local("emulator", out) == "no"
    assert "QPU kernels not timed: this machine's QPU device is the emulator" in out.getvalue()


def test_unknown_task_name_is_refused(tmp_path):
    with pytest.raises(T.TuningError, match="no task named nope; the tasks are: .*fused_matmul"):
        T.tune(MLP, tmp_path / "r.json", target="llvm", only_tasks=["nope"], out=io.StringIO())
    assert not (tmp_path / "r.json").exists()


@pytest.mark.usefixtures("sigint_default")
def test_ctrl_c_during_tuning_is_recognised():
    """MetaSchedule's native loop turns the KeyboardInterrupt of a Ctrl-C into a RuntimeError;
    tune() tells them apart by the SIGINT its handler saw (and the previous handler still runs)."""
    import os
    import signal
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        with T._sigint_seen() as seen:
            os.kill(os.getpid(), signal.SIGINT)
    assert seen == [signal.SIGINT] and signal.getsignal(signal.SIGINT) is before
    with T._sigint_seen() as seen:
        pass
    assert seen == []


def test_cost_model_choice():
    assert T.resolve_cost_model("random") == "random"
    with pytest.raises(T.TuningError, match="unknown cost model"):
        T.resolve_cost_model("mlp")
    try:
        import xgboost  # noqa: F401
        assert T.resolve_cost_model() == "xgb" == T.resolve_cost_model("xgb")
    except ImportError:
        assert T.resolve_cost_model() == "random"
        with pytest.raises(T.TuningError, match="pip install"):
            T.resolve_cost_model("xgb")


@pytest.mark.slow
def test_real_records_drive_placement(tuned):
    seen, _ = _check_placement_reads(T.read_records(tuned[0]))
    assert seen >= 1


@pytest.mark.slow
def test_tuning_measures_on_a_remote_rpc_server(tmp_path):
    """--hostname/--port: the candidates are built here and measured by a TVM RPC server (a stock
    ``tvm.exec.rpc_server`` on localhost, standing in for a Pi)."""
    pytest.importorskip("tornado", reason="TVM's RPC needs tornado")
    pytest.importorskip("cloudpickle", reason="tvm.rpc.Server needs cloudpickle")
    from test_rpc import LOOPBACK, Processes, free_port
    import socket
    import time
    procs = Processes(tmp_path)
    port = free_port()
    try:
        procs.start("server", ["-m", "tvm.exec.rpc_server", "--host", LOOPBACK, "--port", port,
                               "--port-end", port + 1])
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex((LOOPBACK, port)) == 0:
                    break
            time.sleep(0.5)
        out = tmp_path / "remote.json"
        log = io.StringIO()
        rec = T.tune(MLP, out, target="llvm", trials=2, out=log,
                     remote=T.RemoteSpec(host=LOOPBACK, port=port, timeout=120))
    finally:
        procs.kill_all()
    assert rec.header["measured_on"] == f"RPC server {LOOPBACK}:{port}"
    assert any(w["seconds"] is not None for w in rec.workloads.values()), log.getvalue() + procs.log("server")


@pytest.mark.slow
def test_tune_target_qpu_on_a_tvm_qpu_rpc_server(tmp_path):
    """--target qpu against one ``python -m tvm_qpu.rpc_server`` on localhost (emulator device):
    the QPU ops' kernels are timed there (emulator entries: modelled), then the CPU functions are
    tuned there; placement keeps the cycle model for the QPU side and says so."""
    pytest.importorskip("tornado", reason="TVM's RPC needs tornado")
    pytest.importorskip("cloudpickle", reason="tvm.rpc.Server needs cloudpickle")
    from test_rpc import LOOPBACK, Processes, free_port
    import time
    procs = Processes(tmp_path)
    port = free_port()
    try:
        procs.start("server", ["-m", "tvm_qpu.rpc_server", "--host", LOOPBACK, "--port", port,
                               "--port-end", port + 1], {"TVM_QPU_DEVICE": "emulator"})
        deadline = time.monotonic() + 180
        while "listening on" not in procs.log("server") and time.monotonic() < deadline:
            time.sleep(0.5)
        out = tmp_path / "remote_qpu.json"
        log = io.StringIO()
        rec = T.tune(MLP, out, target="qpu", trials=1, out=log,
                     remote=T.RemoteSpec(host=LOOPBACK, port=port, timeout=120))
    finally:
        procs.kill_all()
    text = log.getvalue()
    ops = T.qpu_ops(MLP)
    assert sorted(rec.qpu) == sorted(op.key for op in ops), text + procs.log("server")
    assert all(e["device"] == "emulator" and e["where"] == f"RPC server {LOOPBACK}:{port}" for e in rec.qpu.values())
    assert text.index("QPU op 1/") < text.index("tuning ")          # the QPU first, then the CPU tasks
    assert rec.workloads and any(w["seconds"] is not None for w in rec.workloads.values()), text
    report = _partition(T.read_records(out))
    assert all(T.SOURCE_QPU_MODELLED in reason for _, reason in _qpu_figures(report).values())
