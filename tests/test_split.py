"""Split work and the whole-model plan with overlap (tvm_qpu.split, tvm_qpu.coexec).

References: TVM's llvm build of the unsplit module (frontend_util.llvm_run) and ONNX Runtime for
the CLI model; the schedule model against latencies worked out by hand."""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("tvm")

from frontend_util import const, graph, llvm_run, rand  # noqa: E402

import tvm_qpu  # noqa: E402
from tvm_qpu import coexec as CX  # noqa: E402
from tvm_qpu import placement as PL  # noqa: E402
from tvm_qpu import split as SP  # noqa: E402
from tvm_qpu.codegen.registry import OpSpec  # noqa: E402


#: The CPU rates this file's shapes were chosen for: ``placement.CPU_MODEL`` as calibrated before
#: issue 10's faster CPU schedules (A76-scaled, FLOP/s or op/s). The split planner's mechanism is
#: under test here, not the calibration: with today's rates these small convs / matmuls stay whole
#: on the CPU and nothing would be split.
SLOWER_CPU = {"fp32_gemm_1core": 8.7e9, "fp32_gemm_peak": 27.8e9, "int_gemm_rate": 7.0e9,
              "elementwise_rate": 1.36e9}


@pytest.fixture(autouse=True)
def _slower_cpu_model(monkeypatch):
    for k, v in SLOWER_CPU.items():
        monkeypatch.setitem(PL.CPU_MODEL, k, (v,) + tuple(PL.CPU_MODEL[k][1:]))


# ---------------------------------------------------------------------------------------------
# the schedule model on hand-made DAGs

def _dag():
    #   a (cpu 1) -> q (qpu 4) -> c (cpu 2)
    #             -> b (cpu 3) -/
    return [CX.Node("a", "cpu", 1.0), CX.Node("q", "qpu", 4.0, ("a",)), CX.Node("b", "cpu", 3.0, ("a",)),
            CX.Node("c", "cpu", 2.0, ("q", "b"))]


def test_schedule_sync_overlap_and_critical_path_by_hand():
    nodes = _dag()
    # sync: the VM blocks in q: a 0-1, q 1-5, b 5-8, c 8-10
    sync = CX.schedule(nodes, overlap=False)
    assert sync.latency == pytest.approx(10.0)
    assert (sync.start["b"], sync.end["c"]) == (pytest.approx(5.0), pytest.approx(10.0))
    # overlap: q submitted at 1 runs 1-5 beside b 1-4; c waits for q: 5-7
    ovl = CX.schedule(nodes, overlap=True)
    assert ovl.latency == pytest.approx(7.0)
    assert (ovl.start["b"], ovl.start["c"]) == (pytest.approx(1.0), pytest.approx(5.0))
    assert ovl.busy == {"cpu": pytest.approx(6.0), "qpu": pytest.approx(4.0)}
    # longest chain a -> q -> c = 1 + 4 + 2
    assert CX.critical_path(nodes) == pytest.approx(7.0)
    assert CX.cpu_only(nodes) == pytest.approx(10.0)        # q has no CPU estimate: counted as is


def test_schedule_puts_a_regions_host_work_on_the_cpu():
    # a (cpu 1) -> q (host 0.5 on the CPU, then 4 on the QPU) -> c (cpu 2); b (cpu 3) independent of q
    nodes = [CX.Node("a", "cpu", 1.0), CX.Node("q", "qpu", 4.0, ("a",), host=0.5),
             CX.Node("b", "cpu", 3.0, ("a",)), CX.Node("c", "cpu", 2.0, ("q", "b"))]
    ovl = CX.schedule(nodes, overlap=True)
    # the VM submits q at 1, works for it until 1.5 (q runs 1.5-5.5), b 1.5-4.5, c waits: 5.5-7.5
    assert (ovl.start["q"], ovl.start["b"], ovl.start["c"], ovl.latency) == (
        pytest.approx(1.5), pytest.approx(1.5), pytest.approx(5.5), pytest.approx(7.5))
    assert ovl.busy == {"cpu": pytest.approx(6.5), "qpu": pytest.approx(4.0)}
    # sync: a 0-1, host 1-1.5, q 1.5-5.5, b 5.5-8.5, c 8.5-10.5
    assert CX.schedule(nodes, overlap=False).latency == pytest.approx(10.5)
    assert CX.critical_path(nodes) == pytest.approx(7.5)
    with pytest.raises(ValueError, match="host"):
        CX.Node("x", "cpu", 1.0, host=0.5)


def test_a_region_whose_host_cost_exceeds_its_saving_stays_on_the_cpu(monkeypatch):
    """placement="cost" counts the region's host work: an op the QPU's kernel and launch would win
    is kept on the CPU once the host cost is more than the difference (and offloaded without it)."""
    spec = _mm_part_spec(64, 512, 256)
    consts = {"B": np.zeros((512, 256), "float32"), "bias": np.zeros(256, "float32")}
    cpu, qpu, host = PL.cpu_seconds(spec), PL.qpu_seconds(spec, consts), PL.host_seconds(spec, consts)
    device = qpu - host                             # kernel + launches
    fixed = PL.QPU_OVERHEAD["host"][0]
    # a host cost that leaves the QPU side just under / just over the CPU time
    for fixed_new, on_qpu in ((fixed - (qpu - cpu) - 1e-6, True), (fixed - (qpu - cpu) + 1e-6, False)):
        monkeypatch.setitem(PL.QPU_OVERHEAD, "host", (fixed_new,) + PL.QPU_OVERHEAD["host"][1:])
        assert PL.qpu_seconds(spec, consts) == pytest.approx(device + PL.host_seconds(spec, consts))
        assert PL.decide(spec, "cost", consts).on_qpu is on_qpu, (fixed_new, cpu, device)


def test_schedule_one_qpu_queue_and_in_order_vm():
    # two independent QPU regions queue on the one QPU; the CPU op after them is independent:
    # q1 0-2, q2 2-5 (queued), x 0-1 on the CPU; the output waits for q2: 5
    nodes = [CX.Node("q1", "qpu", 2.0), CX.Node("q2", "qpu", 3.0), CX.Node("x", "cpu", 1.0)]
    t = CX.schedule(nodes, overlap=True)
    assert (t.start["q2"], t.start["x"], t.latency) == (pytest.approx(2.0), pytest.approx(0.0), pytest.approx(5.0))
    assert CX.schedule(nodes, overlap=False).latency == pytest.approx(6.0)
    # a QPU region reading another's result is submitted when the VM has waited for it
    chain = [CX.Node("q1", "qpu", 2.0), CX.Node("y", "cpu", 1.0), CX.Node("q2", "qpu", 1.0, ("q1",)),
             CX.Node("z", "cpu", 4.0)]
    t = CX.schedule(chain, overlap=True)
    # y 0-1; q2's submission waits for q1 (2), runs 2-3; z starts after the wait: 2-6
    assert (t.start["q2"], t.start["z"], t.latency) == (pytest.approx(2.0), pytest.approx(2.0), pytest.approx(6.0))


def test_schedule_rejects_bad_nodes():
    with pytest.raises(ValueError, match="not an earlier node"):
        CX.schedule([CX.Node("a", "cpu", 1.0, ("b",)), CX.Node("b", "cpu", 1.0)])
    with pytest.raises(ValueError, match="resource"):
        CX.Node("a", "gpu", 1.0)
    with pytest.raises(ValueError, match="seconds"):
        CX.Node("a", "cpu", -1.0)


# ---------------------------------------------------------------------------------------------
# small graphs

def g_matmul(m=64, k=256, n=256, act="relu"):
    from tvm import relax
    w, b = rand((k, n), "float32", 1), rand((n,), "float32", 2)

    def body(bb, x):
        y = bb.emit(relax.op.matmul(x, const(w)))
        y = bb.emit(relax.op.add(y, const(b)))
        return bb.emit(relax.op.nn.relu(y)) if act == "relu" else y
    return graph({"x": ((m, k), "float32")}, body), [rand((m, k), "float32")]


def g_int_matmul(m=64, k=256, n=256):
    """MatMulInteger shape: astype(int8 -> int32), int32 weights holding int8 values, int32 bias."""
    from tvm import relax
    w, b = rand((k, n), "int8", 1).astype("int32"), rand((n,), "int32", 2)

    def body(bb, x):
        xa = bb.emit(relax.op.astype(x, "int32"))
        y = bb.emit(relax.op.matmul(xa, const(w), out_dtype="int32"))
        return bb.emit(relax.op.add(y, const(b)))
    return graph({"x": ((m, k), "int8")}, body), [rand((m, k), "int8")]


def g_int_matmul_requant(m=8, k=32, n=48):
    """Integer matmul + int32 bias, then a requantize to int8 (scale, round, clip, cast) on the CPU."""
    from tvm import relax
    w, b = rand((k, n), "int8", 1).astype("int32"), rand((n,), "int32", 2)
    scale = (np.abs(rand((n,), "float32", 6)) * 1e-3 + 1e-4).astype("float32")

    def body(bb, x):
        xa = bb.emit(relax.op.astype(x, "int32"))
        y = bb.emit(relax.op.add(bb.emit(relax.op.matmul(xa, const(w), out_dtype="int32")), const(b)))
        f = bb.emit(relax.op.multiply(bb.emit(relax.op.astype(y, "float32")), const(scale)))
        q = bb.emit(relax.op.clip(bb.emit(relax.op.round(f)), -128, 127))
        return bb.emit(relax.op.astype(q, "int8"))
    return graph({"x": ((m, k), "int8")}, body), [rand((m, k), "int8")]


def g_conv(c=32, h=16, oc=64, groups=1):
    """conv2d + per-channel bias + ReLU6 (clip)."""
    from tvm import relax
    w, b = rand((oc, c // groups, 3, 3), "float32", 1), rand((1, oc, 1, 1), "float32", 2)

    def body(bb, x):
        y = bb.emit(relax.op.nn.conv2d(x, const(w), padding=(1, 1), groups=groups))
        y = bb.emit(relax.op.add(y, const(b)))
        return bb.emit(relax.op.clip(y, 0.0, 6.0))
    return graph({"x": ((1, c, h, h), "float32")}, body), [rand((1, c, h, h), "float32")]


def g_batched_matmul(b=2, m=48, k=32, n=24):
    """A [b, m, k] x B [b, k, n], both run-time: split by rows of A."""
    from tvm import relax

    def body(bb, x, y):
        return bb.emit(relax.op.nn.relu(bb.emit(relax.op.matmul(x, y))))
    return graph({"x": ((b, m, k), "float32"), "y": ((b, k, n), "float32")}, body), \
        [rand((b, m, k), "float32", 3), rand((b, k, n), "float32", 4)]


def _sites(mod):
    from tvm_qpu.backend import QpuBackend, _narrow_bounded_int_operands, canonicalize
    cmod = canonicalize(mod)
    main = _narrow_bounded_int_operands(cmod["main"])
    sites, _ = SP.find_sites(main, QpuBackend("cost"))
    return cmod, main, sites


def _split_by_hand(mod, n_q):
    """The module with its one site split at n_q (no planner, no partitioning)."""
    from tvm import relax
    cmod, main, sites = _sites(mod)
    assert len(sites) == 1 and not sites[0].why_not, [s.why_not for s in sites]
    s = sites[0]
    ch = SP.SplitChoice(s.name, n_q, s.channels, "units", 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, None)
    new, pins = SP.apply_splits(main, {s.name: s}, {s.name: ch})
    cmod[cmod.get_global_var("main")] = new
    return relax.transform.DeadCodeElimination()(cmod), pins


@pytest.mark.parametrize("make, n_q", [
    (lambda: g_matmul(8, 32, 40), 16),                 # columns, bias + relu
    (lambda: g_matmul(8, 32, 40, act=None), 32),       # columns, bias only
    (lambda: g_int_matmul(8, 32, 48), 16),             # integer path: the cast is re-emitted per part
    (g_int_matmul_requant, 32),                        # requantize after the int32 accumulator: after the concat
    (lambda: g_conv(4, 6, 24), 16),                    # output channels, per-channel bias + ReLU6
    (g_batched_matmul, 32),                            # rows of A (B is a run-time operand)
])
def test_split_rewrite_computes_the_same_values(make, n_q):
    """The rewrite itself (both parts on llvm): the split module equals the unsplit one."""
    import tvm
    from tvm import relax
    mod, args = make()
    split, pins = _split_by_hand(mod, n_q)
    text = split["main"].script()
    assert "R.concat" in text and sorted(v for v, _ in pins.values()) == ["cpu", "qpu"]
    ex = tvm.compile(split, target="llvm")
    got = relax.VirtualMachine(ex, tvm.cpu())["main"](*[tvm.runtime.tensor(a) for a in args]).numpy()
    ref = llvm_run(mod, *args)
    if ref.dtype.kind == "i":
        np.testing.assert_array_equal(got, ref)
    else:
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# the planner, the partitioner and the emulator

def _report(mod, split=True):
    return tvm_qpu.partition_report(tvm_qpu.partition(mod, split=split))


def _plan_site(rep):
    (site,) = rep.schedule["plan"]["sites"]
    return site


# sizes where the plan splits: with the QPU part's host work (submit, wait, copies) on the CPU, a
# 64x256x256 fp32 matmul or a 32-channel 16x16 conv no longer pays (the planner keeps them whole)
@pytest.mark.parametrize("make, exact", [(lambda: g_matmul(64, 512, 256), False), (g_int_matmul, True),
                                         (lambda: g_conv(64, 16, 64), False)],
                         ids=["g_matmul", "g_int_matmul", "g_conv"])
def test_split_build_equals_unsplit_build_on_the_emulator(make, exact):
    mod, args = make()
    rep = _report(mod)
    site = _plan_site(rep)
    assert site["choice"] == "split", rep.text()
    # the report lists the split: the QPU part is a region, the CPU part stays on the CPU
    assert [r["reason"].split(":")[0] for r in rep.regions] == ["split"], rep.text()
    assert any("split: CPU part" in c["reason"] for c in rep.cpu_ops if c["op"] in ("relax.matmul", "relax.nn.conv2d"))
    lib = tvm_qpu.build(mod, split=True)
    assert len(lib.regions) == 1
    runner = lib.runner("emulator")
    try:
        got = next(iter(runner.run(**{"x": args[0]}).values()))
    finally:
        runner.close()
    ref = llvm_run(mod, *args)
    if exact:
        np.testing.assert_array_equal(got, ref)
    else:
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-3)


def _mm_part_spec(m, k, n):
    return OpSpec("matmul", [((m, k), "float32"), ((k, n), "float32"), ((n,), "float32")], ((m, n), "float32"),
                  {"transpose_b": False, "bias": True, "activation": "relu", "out_dtype": "float32",
                   "input_names": ["A", "B", "bias"]})


def test_split_fraction_follows_the_estimates():
    """The QPU share is a whole number of 16-column tiles where the parts' own estimates balance:
    no neighbouring cut (one tile more or less) has a smaller max(QPU part, CPU part)."""
    m, k, n = 64, 512, 256
    sp = _plan_site(_report(g_matmul(m, k, n)[0]))["split"]
    assert sp["n"] == n and sp["n_q"] % 16 == 0 and 16 <= sp["n_q"] < n

    def parts(nq):
        consts = {"B": np.zeros((k, nq), "float32"), "bias": np.zeros(nq, "float32")}
        q = PL.qpu_seconds(_mm_part_spec(m, k, nq), consts)
        return q, PL.cpu_seconds(_mm_part_spec(m, k, n - nq)), PL.host_seconds(_mm_part_spec(m, k, nq), consts)

    def op_time(tq, tc, host):          # host work first on the CPU, then the CPU part beside the QPU
        return host + max(tq - host, tc)
    tq, tc, host = parts(sp["n_q"])
    assert (sp["qpu_part_s"], sp["cpu_part_s"]) == (pytest.approx(tq, rel=1e-6), pytest.approx(tc, rel=1e-6))
    assert sp["qpu_part_host_s"] == pytest.approx(host, rel=1e-6)
    # the host part: the fixed per-region cost plus copying A in and the part's output out
    assert host == pytest.approx(PL.QPU_OVERHEAD["host"][0] + 4 * (m * k + m * sp["n_q"]) / PL.QPU_OVERHEAD["copy_bw"][0])
    for nb in (sp["n_q"] - 16, sp["n_q"] + 16):
        if 16 <= nb < n:
            assert op_time(tq, tc, host) <= op_time(*parts(nb)) + 1e-12, nb
    # the whole op's speed share: cpu / (cpu + qpu) of the unsplit estimates
    whole_cpu, whole_qpu = sp["unsplit_cpu_s"], sp["unsplit_qpu_s"]
    assert sp["speed_share"] == pytest.approx(whole_cpu / (whole_cpu + whole_qpu))
    assert whole_cpu == pytest.approx(PL.cpu_seconds(_mm_part_spec(m, k, n)))


def test_split_lowers_the_modelled_overlapped_latency_only():
    rep = _report(g_conv(64, 16, 64)[0])
    f = rep.schedule["plan"]["figures"]
    assert f["planned_overlap_s"] < f["per_op_overlap_s"]
    # synchronous regions: the two parts run one after the other (why split is off by default)
    assert f["planned_sync_s"] > f["planned_overlap_s"]
    model = rep.schedule["model"]
    assert model["overlap_s"] == pytest.approx(f["planned_overlap_s"], rel=0.05)
    assert "asynchronous (overlap)" in rep.text() and "split lv" in rep.text()


def g_two_branches(m=64, k=256, n=256):
    """x -> matmul + bias + relu (twice, independent weights) -> multiply: two branches that can
    overlap (joined by an op with no QPU kernel, so the matmuls are the only sites)."""
    from tvm import relax
    ws = [rand((k, n), "float32", i) for i in (1, 2)]
    bs = [rand((n,), "float32", i) for i in (3, 4)]

    def body(bb, x):
        outs = []
        for w, b in zip(ws, bs):
            y = bb.emit(relax.op.add(bb.emit(relax.op.matmul(x, const(w))), const(b)))
            outs.append(bb.emit(relax.op.nn.relu(y)))
        return bb.emit(relax.op.multiply(*outs))
    return graph({"x": ((m, k), "float32")}, body), [rand((m, k), "float32")]


def test_partitioner_honours_the_whole_model_plan():
    """Every site's planned choice is what the partitioner does (regions: the QPU sites and the QPU
    parts of splits, nothing else), and the partitioned module's modelled overlapped latency is
    the plan's (node names stay unique although the fused calls may share a var name)."""
    rep = _report(g_two_branches(64, 512, 256)[0])
    plan = rep.schedule["plan"]
    f = plan["figures"]
    assert f["planned_overlap_s"] < f["per_op_overlap_s"], rep.text()
    choices = [s["choice"] for s in plan["sites"]]
    assert len(choices) == 2 and set(choices) <= {"cpu", "qpu", "split"}
    assert len(rep.regions) == sum(c in ("qpu", "split") for c in choices), rep.text()
    assert rep.schedule["model"]["overlap_s"] == pytest.approx(f["planned_overlap_s"], rel=0.02)
    for s in plan["sites"]:
        if s["choice"] == "qpu" and s["per_op"] == "cpu":
            assert any(r["reason"].startswith("whole-model plan") for r in rep.regions)


@pytest.mark.parametrize("make, needle", [
    (lambda: g_matmul(8, 64, 12), "12 output columns"),                     # under one 16-lane tile
    (lambda: g_conv(16, 8, 16, groups=16), "grouped convolution"),          # depthwise
])
def test_shapes_that_cannot_split_stay_unsplit_with_the_reason(make, needle):
    mod, _ = make()
    _, _, sites = _sites(mod)
    assert len(sites) == 1 and needle in sites[0].why_not
    rep = _report(mod)
    site = _plan_site(rep)
    assert site["choice"] != "split" and needle in site["split_why"]
    assert needle in rep.text()
    assert all(not r["reason"].startswith("split") for r in rep.regions)


def test_split_needs_cost_placement():
    mod, _ = g_matmul(8, 32, 40)
    with pytest.raises(tvm_qpu.backend.QpuError, match="placement='cost'"):
        tvm_qpu.partition(mod, placement="all", split=True)


def test_default_build_does_not_split_but_reports_the_overlap():
    rep = _report(g_matmul()[0], split=False)
    assert "plan" not in rep.schedule
    m = rep.schedule["model"]
    assert m["overlap_s"] <= m["sync_s"] <= m["cpu_only_s"] + 1e-12
    assert "QPU regions synchronous" in rep.text()


# ---------------------------------------------------------------------------------------------
# tvmc

def _onnx_matmul(path, m=64, k=512, n=256):
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    w, b = rand((k, n), "float32", 1), rand((n,), "float32", 2)
    g = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"]), helper.make_node("Add", ["y", "b"], ["z"]),
         helper.make_node("Relu", ["z"], ["out"])], "mm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [m, k])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [m, n])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def test_tvmc_partition_and_compile_with_split(tmp_path, capsys):
    from tvm_qpu import cli
    model = _onnx_matmul(tmp_path / "mm.onnx")
    assert cli.main(["partition", str(model), "--qpu-split"]) == 0
    out = capsys.readouterr().out
    assert "asynchronous (overlap)" in out and "split " in out and "output columns" in out
    art = tmp_path / "mm.tar"
    assert cli.main(["compile", str(model), "-o", str(art), "--qpu-split"]) == 0
    x = rand((64, 512), "float32", 5)
    runner = tvm_qpu.load(art, device="emulator")
    try:
        got = runner.run(x=x)["out"]
    finally:
        runner.close()
    ort = pytest.importorskip("onnxruntime")
    ref = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-3)
    assert cli.main(["compile", str(model), "-o", str(art), "--qpu-split", "--qpu-placement", "all"]) == 1
    assert "placement='cost'" in capsys.readouterr().err


def test_a_failing_plan_falls_back_to_per_op_placement_with_a_warning(monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("no plan")
    monkeypatch.setattr(CX, "plan", boom)
    mod, _ = g_matmul(8, 32, 40)
    with pytest.warns(tvm_qpu.backend.QpuWarning, match="split planning failed"):
        rep = _report(mod)
    assert any("no plan" in w for w in rep.warnings)
    assert "plan" not in rep.schedule and "model" in rep.schedule
