"""Placement by cost: a small fp32 GEMM stays on the CPU's llvm code, integer GEMM goes to the QPU;
``all`` and ``none`` override. Runs with the test-double estimates now and with the real cycle
model once a matmul kernel is registered."""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("tvm")

import qpu_doubles as D  # noqa: E402
from frontend_util import g_int_matmul, g_matmul_bias_relu, real_kinds  # noqa: E402

import tvm_qpu  # noqa: E402
from tvm_qpu import placement as PL  # noqa: E402
from tvm_qpu.codegen.registry import OpSpec  # noqa: E402

BIG = dict(m=256, k=256, n=256)


@pytest.fixture
def doubles(monkeypatch):
    return D.install(monkeypatch)


def _regions(mod, placement):
    rep = tvm_qpu.partition_report(tvm_qpu.partition(mod, placement=placement))
    return rep, [r["kind"] for r in rep.regions]


def _mm_spec(dtype, m, k, n, acc=None):
    return OpSpec("matmul", [((m, k), dtype), ((k, n), dtype)], ((m, n), acc or dtype),
                  {"transpose_b": False, "bias": False, "activation": None, "out_dtype": acc or dtype,
                   "input_names": ["A", "B"]})


def test_cost_keeps_fp32_gemm_on_cpu_and_sends_int_gemm_to_qpu(doubles):
    # a GEMM this size stays on the CPU's vectorized llvm code: the QPU's launch + copies cost more
    rep, kinds = _regions(g_matmul_bias_relu("float32", m=64, k=64, n=64)[0], "cost")
    assert kinds == [], rep.text()
    reason = [c["reason"] for c in rep.cpu_ops if c["op"] == "relax.matmul"][0]
    assert "cost: CPU" in reason
    rep, kinds = _regions(g_int_matmul(**BIG)[0], "cost")
    assert kinds == ["matmul"], rep.text()
    assert rep.regions[0]["qpu_s"] < rep.regions[0]["cpu_s"]
    assert rep.regions[0]["reason"].startswith("cost: QPU")


def test_all_and_none_override_cost(doubles):
    fp32 = g_matmul_bias_relu("float32", **BIG)[0]
    assert _regions(fp32, "all")[1] == ["matmul"]
    rep, kinds = _regions(g_int_matmul(**BIG)[0], "none")
    assert kinds == [] and all("placement=none" in c["reason"] for c in rep.cpu_ops)


def test_small_integer_gemm_stays_on_cpu_because_of_launch_overhead(doubles):
    rep, kinds = _regions(g_int_matmul(m=4, k=16, n=8)[0], "cost")
    assert kinds == []
    c = [c for c in rep.candidates if c.pattern == "qpu.matmul_bias"][0]
    assert c.qpu_s > PL.qpu_overhead_seconds(_mm_spec("int8", 4, 16, 8, "int32")) * 0.99 > c.cpu_s


def test_integer_crossover_is_monotone(doubles):
    """Growing M, the int8 GEMM decision flips from CPU to QPU once and stays there."""
    from tvm_qpu.codegen import registry
    decisions = [PL.decide(_mm_spec("int8", m, 128, 128, "int32"), "cost", registry=registry).on_qpu
                 for m in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)]
    assert decisions[0] is False and decisions[-1] is True
    first = decisions.index(True)
    assert all(decisions[first:])


def test_cpu_model_is_the_schedules_rates():
    f = PL.cpu_seconds(_mm_spec("float32", 512, 512, 512))
    i = PL.cpu_seconds(_mm_spec("int8", 512, 512, 512, "int32"))
    flops = 2 * 512 ** 3
    # 4 cores of tvm_qpu.cpu_schedule's fp32 code (+ thread start); int8 widened to int32 on one core
    assert f == pytest.approx(flops / PL.CPU_MODEL["fp32_gemm_peak"][0] + 5e-6 + 2e-6, rel=1e-6)
    assert i == pytest.approx(flops / PL.CPU_MODEL["int_gemm_rate"][0] + 2e-6, rel=1e-6)
    assert f < i                                                 # fp32 SIMD beats widened int8


def test_failing_estimate_keeps_op_on_cpu_with_reason():
    class Broken:
        @staticmethod
        def estimate(spec):
            raise RuntimeError("cycle model unavailable")
    d = PL.decide(_mm_spec("int8", 64, 64, 64, "int32"), "cost", registry=Broken)
    assert not d.on_qpu and "cycle model unavailable" in d.reason


def test_constants_are_documented_in_one_table():
    for table in (PL.CPU_MODEL, PL.QPU_OVERHEAD):
        for name, (value, unit, source) in table.items():
            assert isinstance(value, (int, float)) and value > 0, name
            assert len(source) > 20, f"{name}: source/assumption missing"
    text = PL.model_table()
    assert all(k in text for k in list(PL.CPU_MODEL) + list(PL.QPU_OVERHEAD))


def test_real_cycle_model_rule():
    assert "matmul" in real_kinds()
    from tvm_qpu.codegen import registry
    fp32 = _mm_spec("float32", 32, 32, 32)
    # int8 512^3: big enough for the QPU's smul24 GEMM to beat the CPU model's one-core int8 rate
    # (256^3 no longer did once the CPU schedules were calibrated at their issue-10 speed)
    int8 = _mm_spec("int8", 512, 512, 512, "int32")
    ok_f, why_f = registry.supports(fp32)
    ok_i, why_i = registry.supports(int8)
    if ok_f:   # a small fp32 GEMM: the launch and copies cost more than the CPU's vectorized loop
        assert not PL.decide(fp32, "cost", registry=registry).on_qpu, "small fp32 GEMM should stay on the CPU"
    assert ok_i, why_i
    d = PL.decide(int8, "cost", registry=registry)
    assert d.on_qpu, d.reason


@pytest.mark.parametrize("placement", ["all", "cost"])
def test_ops_longer_than_one_gpu_dispatch_stay_on_the_cpu(placement):
    """A region of a kind whose launches are not split, modelled beyond the v3d driver's dispatch
    budget (half its 500 ms hang check), would be reset on a Pi 5: placement keeps it on the CPU,
    even under placement=all, and says why; a small one of the same kind is still offloaded
    under placement=all."""
    from tvm_qpu.codegen import registry
    from tvm_qpu.runtime.v3d import DISPATCH_BUDGET_SECONDS
    # a depthwise convolution (its own kernel, one launch over every image and channel)
    big = OpSpec("conv2d", [((4, 64, 512, 512), "float32"), ((64, 1, 3, 3), "float32")],
                 ((4, 64, 512, 512), "float32"), {"padding": (1,) * 4, "strides": (1, 1), "groups": 64})
    assert registry.supports(big)[0]
    assert registry.estimate(big) > DISPATCH_BUDGET_SECONDS     # 64 Mi outputs x 9 taps, modelled ~0.3 s
    assert PL.longest_dispatch_seconds(big, registry.estimate(big)) > DISPATCH_BUDGET_SECONDS
    d = PL.decide(big, placement, {"weight": np.zeros((64, 1, 3, 3), np.float32)}, registry=registry)
    assert not d.on_qpu and "hang check" in d.reason, d.reason
    small = OpSpec("conv2d", [((1, 8, 8, 8), "float32"), ((8, 8, 3, 3), "float32")],
                   ((1, 8, 8, 8), "float32"), {"padding": (1,) * 4, "strides": (1, 1), "groups": 1})
    d = PL.decide(small, "all", {"weight": np.zeros((8, 8, 3, 3), np.float32)}, registry=registry)
    assert d.on_qpu and "hang check" not in d.reason, d.reason


def test_a_long_matmul_splits_and_is_offloaded():
    """A matmul modelled far beyond one dispatch's budget splits into launches each within it
    (gemm.split_rows), so placement=all offloads it again."""
    from tvm_qpu.codegen import registry
    from tvm_qpu.runtime.v3d import DISPATCH_BUDGET_SECONDS
    big = _mm_spec("int8", 4096, 4096, 4096, "int32")
    assert registry.estimate(big) > DISPATCH_BUDGET_SECONDS     # ~1.4e11 ops at < 100 GOP/s
    assert PL.longest_dispatch_seconds(big, registry.estimate(big)) <= DISPATCH_BUDGET_SECONDS
    plan = registry.generate(big, {})
    assert sum(L.name.startswith("gemm_rows") for L in plan.launches) >= 2
    d = PL.decide(big, "all", registry=registry)
    assert d.on_qpu, d.reason


def test_a_long_conv_splits_and_is_offloaded():
    """A convolution modelled beyond one dispatch's budget splits into GEMM launches over image
    groups / output-channel blocks (conv.split_launches), each within it, so placement=all
    offloads it."""
    from tvm_qpu.codegen import registry
    from tvm_qpu.runtime.v3d import DISPATCH_BUDGET_SECONDS
    big = OpSpec("conv2d", [((1, 256, 128, 128), "float32"), ((256, 256, 3, 3), "float32")],
                 ((1, 256, 128, 128), "float32"), {"padding": (1,) * 4, "strides": (1, 1), "groups": 1})
    assert "conv2d" in PL.SPLIT_KINDS and registry.supports(big)[0]
    est = registry.estimate(big)                                # ~1.9e10 ops, modelled ~0.47 s
    assert PL.longest_dispatch_seconds(big, est) <= DISPATCH_BUDGET_SECONDS < est
    w = {"weight": np.zeros((256, 256, 3, 3), np.float32)}
    plan = registry.generate(big, w)
    assert sum(L.name.startswith("conv_part") for L in plan.launches) >= 2
    assert max(plan.attrs["launch_seconds"]) <= DISPATCH_BUDGET_SECONDS
    assert PL.decide(big, "all", w, registry=registry).on_qpu


def test_a_long_pooling_splits_and_is_offloaded():
    """A window pooling modelled beyond one dispatch's budget splits into launches over runs of
    output vectors (pool.split_launches), each within it, so placement=all offloads it."""
    from tvm_qpu.codegen import registry
    from tvm_qpu.runtime.v3d import DISPATCH_BUDGET_SECONDS
    shape = (1, 64, 1024, 1024)                            # 256 MiB of float32, 3x3 stride 1: ~0.29 s
    big = OpSpec("max_pool2d", [(shape, "float32")], (shape, "float32"),
                 {"pool_size": (3, 3), "strides": (1, 1), "padding": (1, 1, 1, 1), "dilation": (1, 1),
                  "ceil_mode": False, "count_include_pad": False, "layout": "NCHW"})
    assert "max_pool2d" in PL.SPLIT_KINDS
    est = registry.estimate(big)
    assert est > DISPATCH_BUDGET_SECONDS
    assert registry.supports(big)[0]
    assert PL.longest_dispatch_seconds(big, est) <= DISPATCH_BUDGET_SECONDS < est
    assert len(registry.generate(big, {}).launches) >= 2
    assert PL.decide(big, "all", registry=registry).on_qpu


def test_a_long_reduction_splits_and_is_offloaded():
    """Global average pooling and argmax modelled beyond one dispatch's budget split their lanes
    stage into launches over runs of output vectors (reduce.split_lanes), each within it, so
    placement=all offloads them."""
    from tvm_qpu.codegen import registry
    from tvm_qpu.runtime.v3d import DISPATCH_BUDGET_SECONDS
    gap = OpSpec("global_avg_pool2d", [((1, 2048, 224, 224), "float32")], ((1, 2048, 1, 1), "float32"),
                 {"layout": "NCHW"})                          # 392 MiB, 2048 planes: modelled ~0.43 s
    arg = OpSpec("argmax", [((65536, 4000), "float32")], ((65536,), "int64"), {"axis": 1, "keepdims": False})
    for big in (gap, arg):
        assert big.kind in PL.SPLIT_KINDS and registry.supports(big)[0]
        est = registry.estimate(big)
        assert PL.longest_dispatch_seconds(big, est) <= DISPATCH_BUDGET_SECONDS < est
        plan = registry.generate(big, {})
        assert len(plan.launches) >= 2 and max(plan.attrs["launch_seconds"]) <= DISPATCH_BUDGET_SECONDS
        assert PL.decide(big, "all", registry=registry).on_qpu
