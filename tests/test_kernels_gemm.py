"""GEMM substrate on the emulator against numpy: shapes, dtypes, edges, fused epilogues, wraps."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from tvm_qpu.codegen.kernels.gemm import GemmShape, choose_tiling, plan_gemm, reference, supports
from tvm_qpu.codegen.plan import run_plan
from tvm_qpu.codegen.registry import OpSpec

FP32_RTOL = 2e-5        # fp32 accumulation in K order vs a float64 reference, relative to sum |a||b|


def _data(s: GemmShape, rng, lo=-100, hi=100):
    bshape = (s.N, s.K) if s.transpose_b else (s.K, s.N)
    if s.batch > 1:
        ashape, bshape = (s.batch, s.M, s.K), (s.batch,) + bshape
    else:
        ashape = (s.M, s.K)
    if s.is_int:
        a = rng.integers(lo, hi, ashape).astype(s.a_dtype)
        b = rng.integers(lo, hi, bshape).astype(s.b_dtype)
        bias = rng.integers(-1000, 1000, s.N).astype(np.int32) if s.bias else None
    else:
        a = rng.standard_normal(ashape).astype(np.float32)
        b = rng.standard_normal(bshape).astype(np.float32)
        bias = rng.standard_normal(s.N).astype(np.float32) if s.bias else None
    return a, b, bias


def _run(dev, s, a, b, bias=None, b_const=False):
    consts = {"bias": bias} if s.bias else {}
    if b_const:
        consts["B"] = b
    plan = plan_gemm(s, consts)
    inputs = {"A": a.reshape(plan.buffer("A").shape)}
    if not b_const:
        inputs["B"] = b.reshape(plan.buffer("B").shape)
    out, _ = run_plan(plan, dev, **inputs)
    return out.reshape((s.batch, s.M, s.N) if s.batch > 1 else (s.M, s.N))


def _assert_close(s, out, ref, a, b, bias_scale=None):
    """Integers exactly; fp32 within FP32_RTOL of the operands' magnitude (|a| @ |b| + 1, plus
    ``bias_scale`` when given)."""
    if s.is_int:
        np.testing.assert_array_equal(out, ref)
        return
    bb = np.swapaxes(b, -1, -2) if s.transpose_b else b
    scale = np.matmul(np.abs(a).astype(np.float64), np.abs(bb).astype(np.float64)) + 1.0
    if bias_scale is not None:
        scale += bias_scale
    assert np.all(np.abs(out.astype(np.float64) - ref) <= FP32_RTOL * scale), np.abs(out - ref).max()


def _check(s, out, a, b, bias):
    _assert_close(s, out, reference(s, a, b, bias), a, b)


EDGE_SHAPES = [(1, 1, 1), (1, 16, 16), (16, 1, 16), (16, 16, 1), (2, 3, 5), (7, 11, 13), (16, 16, 16),
               (17, 17, 17), (31, 33, 9), (64, 48, 40), (1, 100, 37), (97, 5, 3)]


@pytest.mark.parametrize("M,N,K", EDGE_SHAPES)
@pytest.mark.parametrize("dtype", ["float32", "int8", "int16", "int32"])
def test_edge_shapes(dev, M, N, K, dtype):
    s = GemmShape(M, N, K, a_dtype=dtype, b_dtype=dtype)
    a, b, bias = _data(s, np.random.default_rng(M * 131 + N * 7 + K))
    _check(s, _run(dev, s, a, b), a, b, bias)


@settings(max_examples=25, deadline=None)
@given(M=st.integers(1, 40), N=st.integers(1, 40), K=st.integers(1, 70), batch=st.integers(1, 3),
       dtype=st.sampled_from(["float32", "int8", "uint8", "int16", "int32"]), tb=st.booleans(),
       bias=st.booleans(), act=st.sampled_from([None, "relu", ("clip", -3, 5)]), seed=st.integers(0, 99))
def test_random_shapes(dev, M, N, K, batch, dtype, tb, bias, act, seed):
    s = GemmShape(M, N, K, batch, dtype, dtype, tb, bias, act)
    lo = 0 if dtype == "uint8" else -100
    a, b, bias_v = _data(s, np.random.default_rng(seed), lo=lo)
    _check(s, _run(dev, s, a, b, bias_v), a, b, bias_v)


def test_mixed_integer_operands(dev):
    s = GemmShape(19, 23, 29, a_dtype="uint8", b_dtype="int8", bias=True)
    rng = np.random.default_rng(1)
    a = rng.integers(0, 256, (19, 29)).astype(np.uint8)
    b = rng.integers(-128, 128, (29, 23)).astype(np.int8)
    bias = rng.integers(-5000, 5000, 23).astype(np.int32)
    _check(s, _run(dev, s, a, b, bias), a, b, bias)


def test_weights_as_constants(dev):
    s = GemmShape(5, 40, 33, bias=True, activation="relu")
    a, b, bias = _data(s, np.random.default_rng(2))
    _check(s, _run(dev, s, a, b, bias, b_const=True), a, b, bias)


def test_int32_accumulation_wraps_like_int32(dev):
    # products of 24-bit operands overflow int32 after a few terms: results wrap modulo 2**32
    s = GemmShape(16, 16, 64, a_dtype="int32", b_dtype="int32")
    rng = np.random.default_rng(3)
    a = rng.integers(-(1 << 23), 1 << 23, (16, 64)).astype(np.int32)
    b = rng.integers(-(1 << 23), 1 << 23, (64, 16)).astype(np.int32)
    out = _run(dev, s, a, b)
    wrapped = (a.astype(np.int64) @ b.astype(np.int64) + (1 << 31)) % (1 << 32) - (1 << 31)
    assert np.any(np.abs(a.astype(np.int64) @ b.astype(np.int64)) > (1 << 31))     # it did overflow
    np.testing.assert_array_equal(out, wrapped.astype(np.int32))


def test_int16_extremes(dev):
    s = GemmShape(8, 20, 40, a_dtype="int16", b_dtype="int16")
    a = np.full((8, 40), -32768, np.int16)
    b = np.full((40, 20), 32767, np.int16)
    b[::2] = -32768
    _check(s, _run(dev, s, a, b), a, b, None)


def test_nan_and_inf_propagate(dev):
    s = GemmShape(20, 20, 24)
    a, b, _ = _data(s, np.random.default_rng(4))
    a[3, 5] = np.nan
    a[7, 0] = np.inf
    b[2, 9] = -np.inf
    out = _run(dev, s, a, b)
    with np.errstate(invalid="ignore"):
        ref = (a.astype(np.float64) @ b.astype(np.float64)).astype(np.float32)
    np.testing.assert_array_equal(np.isnan(out), np.isnan(ref))
    np.testing.assert_array_equal(np.isposinf(out), np.isposinf(ref))
    np.testing.assert_array_equal(np.isneginf(out), np.isneginf(ref))
    fin = np.isfinite(ref)
    assert np.allclose(out[fin], ref[fin], rtol=1e-4, atol=1e-4)


def test_large_tiles_use_all_qpus(dev):
    if dev.kind != "emulator":
        pytest.skip("per-QPU cycles are an emulator statistic")
    s = GemmShape(96, 128, 32)
    t = choose_tiling(s)
    assert t.Wm * t.Wn == 12
    a, b, _ = _data(s, np.random.default_rng(5))
    plan = plan_gemm(s)
    out, stats = run_plan(plan, dev, A=a, B=b)
    _check(s, out.reshape(96, 128), a, b, None)
    busy = [c for c in stats[-1].per_qpu_cycles if c > 0]
    assert len(busy) == 12


@pytest.mark.parametrize("spec,reason", [
    (OpSpec("matmul", [((4, 8), "float32"), ((8, 3), "int8")], ((4, 3), "float32")), "mixed"),
    (OpSpec("matmul", [((4, 8), "float64"), ((8, 3), "float64")], ((4, 3), "float64")), "float64"),
    (OpSpec("matmul", [((4, 8), "int8"), ((8, 3), "int8")], ((4, 3), "int8")), "output dtype"),
    (OpSpec("matmul", [((2, 4, 8), "float32"), ((3, 8, 3), "float32")], ((2, 4, 3), "float32")), "broadcast"),
    (OpSpec("matmul", [((4, 8), "float32"), ((9, 3), "float32")], ((4, 3), "float32")), "inner"),
])
def test_supports_refuses_with_reason(spec, reason):
    ok, why = supports(spec)
    assert not ok and reason in why, why


@pytest.mark.parametrize("a_shape,b_shape", [((1, 2, 3, 4), (1, 2, 4, 3)),     # ONNX test_matmul_4d
                                             ((2, 3, 5, 4), (4, 6)),           # B shared, 2 batch dims
                                             ((1, 3, 4), (2, 4, 5))])          # A broadcast, leading 1
def test_registry_plan_takes_spec_shapes(dev, a_shape, b_shape):
    """Regression: the registry plan's A/B/C buffers had the batch flattened ([2, 3, 4] for a
    [1, 2, 3, 4] operand), so the executor refused the operands the frontend passes as specified."""
    from tvm_qpu.codegen import registry
    rng = np.random.default_rng(7)
    a = rng.standard_normal(a_shape).astype(np.float32)
    b = rng.standard_normal(b_shape).astype(np.float32)
    want = np.matmul(a.astype(np.float64), b.astype(np.float64))
    spec = OpSpec("matmul", [(a_shape, "float32"), (b_shape, "float32")], (want.shape, "float32"),
                  {"transpose_b": False, "bias": False, "activation": None})
    assert supports(spec) == (True, "ok")
    plan = registry.generate(spec, {})
    assert plan.buffer("A").shape == a_shape and plan.buffer("B").shape == b_shape
    out, _ = run_plan(plan, dev, A=a, B=b)
    assert out.shape == want.shape
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)


# ---- independent reference: TVM's llvm build of the same Relax matmul (tests/reference.py) ----
@pytest.mark.parametrize("s", [
    GemmShape(7, 11, 13, a_dtype="int8", b_dtype="int8", bias=True, activation="relu"),
    GemmShape(9, 6, 40, a_dtype="uint8", b_dtype="int8", bias=True),
    GemmShape(5, 7, 9, batch=2, a_dtype="int16", b_dtype="int16", transpose_b=True, activation=("clip", -3000, 5000)),
    GemmShape(17, 19, 23, batch=2, transpose_b=True, bias=True, activation=("clip", -1.0, 2.0)),
], ids=["int8_bias_relu", "uint8xint8_bias", "int16_batch_tb_clip", "fp32_batch_tb_bias_clip"])
def test_matches_tvm_llvm(dev, s):
    """The QPU GEMM equals TVM's llvm matmul (integer operands cast to int32, as imported from ONNX)."""
    from reference import tvm_llvm
    a, b, bias = _data(s, np.random.default_rng(41))          # uint8: [-100, 100) wrapped, 0..255
    out = _run(dev, s, a, b, bias)
    ref = tvm_llvm("matmul", a, b, bias, transpose_b=s.transpose_b, activation=s.activation)
    if s.is_int:
        np.testing.assert_array_equal(out, ref)
    else:
        np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


# ---- the "tmu" A-stream variant (A columns through the TMU, rows broadcast by shuffle) --------
def _numpy_matmul(s, a, b, bias):
    """numpy reference written to the spec: int64 products wrapped to int32, or float64 rounded
    to float32, then bias and activation."""
    bb = np.swapaxes(b, -1, -2) if s.transpose_b else b
    if s.is_int:
        c = np.matmul(a.astype(np.int64), bb.astype(np.int64))
        if bias is not None:
            c = c + bias.astype(np.int64)
        c = ((c + (1 << 31)) % (1 << 32) - (1 << 31)).astype(np.int32)
    else:
        c = np.matmul(a.astype(np.float64), bb.astype(np.float64))
        if bias is not None:
            c = c + bias.astype(np.float64)
    if s.activation == "relu":
        c = np.maximum(c, 0)
    elif isinstance(s.activation, tuple):
        c = np.clip(c, s.activation[1], s.activation[2])
    return c.astype(np.int32 if s.is_int else np.float32)


def _check_numpy(s, out, a, b, bias):
    _assert_close(s, out, _numpy_matmul(s, a, b, bias), a, b, None if bias is None else np.abs(bias))


@pytest.mark.parametrize("M,N,K", EDGE_SHAPES)
@pytest.mark.parametrize("dtype", ["float32", "int8", "int16"])
def test_tmu_variant_edge_shapes(dev, M, N, K, dtype):
    s = GemmShape(M, N, K, a_dtype=dtype, b_dtype=dtype, a_stream="tmu")
    a, b, bias = _data(s, np.random.default_rng(M * 131 + N * 7 + K + 1))
    _check_numpy(s, _run(dev, s, a, b), a, b, bias)


@settings(max_examples=15, deadline=None)
@given(M=st.integers(1, 40), N=st.integers(1, 40), K=st.integers(1, 70), batch=st.integers(1, 3),
       dtype=st.sampled_from(["float32", "int8", "uint8", "int16", "int32"]), tb=st.booleans(),
       bias=st.booleans(), act=st.sampled_from([None, "relu", ("clip", -3, 5)]), seed=st.integers(0, 99))
def test_tmu_variant_random_shapes(dev, M, N, K, batch, dtype, tb, bias, act, seed):
    s = GemmShape(M, N, K, batch, dtype, dtype, tb, bias, act, a_stream="tmu")
    try:
        choose_tiling(s)
    except ValueError as e:                 # unroll 1 (fp32 transposed / batched B, odd K)
        assert "unroll of at least 2" in str(e)
        return
    lo = 0 if dtype == "uint8" else -100
    a, b, bias_v = _data(s, np.random.default_rng(seed), lo=lo)
    _check_numpy(s, _run(dev, s, a, b, bias_v), a, b, bias_v)


def test_tmu_variant_int32_wraps(dev):
    s = GemmShape(16, 16, 64, a_dtype="int32", b_dtype="int32", a_stream="tmu")
    rng = np.random.default_rng(3)
    a = rng.integers(-(1 << 23), 1 << 23, (16, 64)).astype(np.int32)
    b = rng.integers(-(1 << 23), 1 << 23, (64, 16)).astype(np.int32)
    _check_numpy(s, _run(dev, s, a, b), a, b, None)


def test_tmu_variant_reads_no_uniform_stream_in_its_k_loop():
    """The variant's K loop has no unifa / uniform read: its speed cannot hinge on the stream."""
    from tvm_qpu.codegen.disasm import disassemble
    from tvm_qpu.codegen.kernels.common import build_program
    from tvm_qpu.codegen.kernels.gemm import gemm_kernel
    s = GemmShape(64, 64, 64, a_stream="tmu")
    prog = build_program(gemm_kernel, s, choose_tiling(s), name="gemm")
    k0 = next(v for k, v in prog.labels.items() if k[0] == "k" and k[1:].isdigit())
    text = disassemble(prog.words()[k0: prog.labels[next(k for k in prog.labels if k[0] == "p" and k[1:].isdigit())]])
    assert not any("ldunif" in line for line in text)
    assert sum("shuffle" in line for line in text) >= 64          # one broadcast per row and k-step


def test_variant_is_chosen_by_estimate_under_the_model(dev):
    """Under the default model the unifa variant has the lower estimate and is chosen; with a
    uniform stream that does not prefetch (the slow end of its range) the tmu variant is chosen,
    and the emulator under that model agrees that it is the faster one."""
    if dev.kind != "emulator":
        pytest.skip("compares modelled times")
    from tvm_qpu.codegen.kernels.gemm import shape_from_spec
    from tvm_qpu.runtime.cycle_model import DEFAULT
    from tvm_qpu.runtime.device import open_device
    spec = OpSpec("matmul", [((96, 64), "float32"), ((64, 96), "float32")], ((96, 96), "float32"), {})
    assert shape_from_spec(spec).a_stream == "unifa"
    slow_stream = DEFAULT.with_(uniform_prefetch_lines=0, uniform_cycles_per_line=16.0)
    assert shape_from_spec(spec, slow_stream).a_stream == "tmu"
    emu = open_device("emulator", timing=slow_stream)
    rng = np.random.default_rng(8)
    a = rng.standard_normal((96, 64)).astype(np.float32)
    b = rng.standard_normal((64, 96)).astype(np.float32)
    times = {}
    for v in ("unifa", "tmu"):
        s = GemmShape(96, 96, 64, a_stream=v)
        out, stats = run_plan(plan_gemm(s), emu, A=a, B=b)
        _check_numpy(s, out, a, b, None)
        times[v] = sum(x.seconds for x in stats)
    emu.close()
    assert times["tmu"] < times["unifa"], times


def test_registry_attr_forces_the_variant(dev):
    from tvm_qpu.codegen import registry
    spec = OpSpec("matmul", [((20, 30), "int8"), ((30, 24), "int8")], ((20, 24), "int32"), {"a_stream": "tmu"})
    plan = registry.generate(spec, {})
    assert plan.attrs["a_stream"] == "tmu"
    rng = np.random.default_rng(9)
    a = rng.integers(-128, 128, (20, 30)).astype(np.int8)
    b = rng.integers(-128, 128, (30, 24)).astype(np.int8)
    out, _ = run_plan(plan, dev, A=a, B=b)
    np.testing.assert_array_equal(out, a.astype(np.int64) @ b.astype(np.int64))
    bad = OpSpec("matmul", [((4, 8), "float32"), ((8, 3), "float32")], ((4, 3), "float32"), {"a_stream": "x"})
    ok, why = supports(bad)
    assert not ok and "a_stream" in why


@pytest.mark.parametrize("M,N,K,batch,tb", [(24, 1, 46, 2, False), (9, 20, 6, 3, True)])
def test_tmu_variant_short_unroll(dev, M, N, K, batch, tb):
    """Regression: batched / transposed fp32 B unrolls by a divisor of K (here 2); the prefetch
    depth must not exceed it."""
    s = GemmShape(M, N, K, batch, transpose_b=tb, a_stream="tmu")
    a, b, _ = _data(s, np.random.default_rng(11))
    _check_numpy(s, _run(dev, s, a, b), a, b, None)


@pytest.mark.parametrize("M,N,K,batch,dtype,bias,act", [(70, 40, 24, 2, "float32", True, "relu"),
                                                       (75, 100, 40, 1, "int8", False, None)])
def test_long_gemm_splits_into_launches_within_the_dispatch_budget(dev, M, N, K, batch, dtype, bias, act):
    """A GEMM modelled over the dispatch budget (the v3d hang check) becomes several launches
    over row blocks, each modelled within the budget, with the same result. The budget is
    forced small here (just above a launch of one row tile) so that a small GEMM must split."""
    from tvm_qpu.codegen.kernels.common import seconds, timing_model
    from tvm_qpu.codegen.kernels.gemm import gemm_launch_cycles, split_rows
    s = GemmShape(M, N, K, batch, dtype, dtype, bias=bias, activation=act)
    t = choose_tiling(s)
    m = timing_model(None)
    from tvm_qpu.codegen.kernels.gemm import _row_block
    budget = 1.01 * max(seconds(m, gemm_launch_cycles(*_row_block(s, t, mt, mt + 1), m)) for mt in range(t.MT))
    assert seconds(m, gemm_launch_cycles(s, t, m)) > 2 * budget              # the whole launch is over it
    a, b, bias_v = _data(s, np.random.default_rng(21))
    plan = plan_gemm(s, {"bias": bias_v} if bias else {}, budget_seconds=budget)
    gemm_launches = [L for L in plan.launches if L.name.startswith("gemm_rows")]
    blocks = split_rows(s, t, budget_seconds=budget)
    assert len(gemm_launches) == len(blocks) >= 3
    assert sum(bt.MT for _, _, bt in blocks) == t.MT
    for _, bs, bt in blocks:
        assert seconds(m, gemm_launch_cycles(bs, bt, m)) <= budget
    assert len(plan.attrs["launch_seconds"]) == len(plan.launches)       # what the v3d device checks
    assert max(plan.attrs["launch_seconds"][-len(blocks):]) <= budget
    out, stats = run_plan(plan, dev, A=a.reshape(plan.buffer("A").shape), B=b.reshape(plan.buffer("B").shape))
    _check_numpy(s, out.reshape(a.shape[:-1] + (N,)), a, b, bias_v)
    unsplit = plan_gemm(s, {"bias": bias_v} if bias else {})
    assert [L.name for L in unsplit.launches][-1] == "gemm"         # the default budget: one launch


@pytest.mark.parametrize("M,N,K,batch,dtype", [(70, 40, 96, 2, "float32"), (90, 24, 64, 1, "int8")])
def test_long_pack_splits_into_launches_within_the_dispatch_budget(dev, M, N, K, batch, dtype):
    """The A-panel pack launch modelled over the dispatch budget runs as several launches over
    row blocks of A (gemm.split_pack), each modelled within the budget and emulated within the
    estimate tolerance of it, and the GEMM reading the panel they wrote has numpy's result. The
    budget is forced small (just above the pack of one row tile, and of one GEMM row tile)."""
    from tvm_qpu.codegen.kernels.common import seconds, timing_model
    from tvm_qpu.codegen.kernels.gemm import (_row_block, gemm_launch_cycles, needs_pack, pack_launch_cycles,
                                              split_pack)
    s = GemmShape(M, N, K, batch, dtype, dtype)
    t = choose_tiling(s)
    assert needs_pack(s, t) and t.MT >= 3
    m = timing_model(None)
    one = [_row_block(s, t, mt, mt + 1) for mt in range(t.MT)]
    budget = 1.01 * max(max(seconds(m, pack_launch_cycles(bs, bt, m)) for bs, bt in one),
                        max(seconds(m, gemm_launch_cycles(bs, bt, m)) for bs, bt in one))
    assert seconds(m, pack_launch_cycles(s, t, m)) > budget                  # the whole pack is over it
    blocks = split_pack(s, t, budget_seconds=budget)
    assert len(blocks) >= 2 and sum(bt.MT for _, _, bt in blocks) == t.MT
    plan = plan_gemm(s, {}, budget_seconds=budget)
    packs = [i for i, L in enumerate(plan.launches) if L.name.startswith("gemm_pack_rows")]
    assert len(packs) == len(blocks)
    ls = plan.attrs["launch_seconds"]
    assert len(ls) == len(plan.launches) and max(ls) <= budget              # what the v3d device checks
    a, b, _ = _data(s, np.random.default_rng(4))
    out, stats = run_plan(plan, dev, A=a.reshape(plan.buffer("A").shape), B=b.reshape(plan.buffer("B").shape))
    assert max(stats[i].seconds for i in packs) <= 1.25 * budget
    _check_numpy(s, out.reshape(a.shape[:-1] + (N,)), a, b, None)
    assert [L.name for L in plan_gemm(s, {}).launches][0] == "gemm_pack"     # the default budget: one
