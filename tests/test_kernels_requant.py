"""The GEMM / conv requantize epilogue (gemm.Requant) on the emulator against numpy written to the spec.

The spec is ONNX QuantizeLinear applied to the int32 accumulator times the float32 multiplier, as
ONNX Runtime's QLinearConv / QLinearMatMul compute it: ``y = float32(acc) * float32(scale)``,
``q = saturate(round_half_even(y) + zero_point)``, then the fused ReLU6 / Clip narrowing ``[lo, hi]``.
The accumulators here come from numpy int64 products, the rounding from ``np.rint`` (half to even)
in float64 on the float32 product, the saturation from ``np.clip``: none of it is the kernel's code.
"""
import numpy as np
import pytest

from tvm_qpu.codegen.kernels.conv import ConvShape, plan_conv
from tvm_qpu.codegen.kernels.gemm import GemmShape, Requant, plan_gemm, supports
from tvm_qpu.codegen.plan import run_plan
from tvm_qpu.codegen.registry import OpSpec

from reference import conv2d_int64, spec_requant

QRANGE = {"int8": (-128, 127), "uint8": (0, 255)}




# (M, N, K, scale axis, out dtype, zero point, clamp, a_stream, bias, scale range)
GEMM_CASES = {
    "per_tensor_int8": (5, 20, 30, None, "int8", 3, None, "unifa", True, (5e-4, 2e-3)),
    "per_column_uint8": (17, 33, 40, "n", "uint8", 128, None, "unifa", True, (5e-4, 2e-3)),
    "per_column_int8_tmu_stream": (7, 33, 40, "n", "int8", -7, None, "tmu", True, (5e-4, 2e-3)),
    "per_tensor_uint8_tmu_stream": (9, 18, 20, None, "uint8", 17, None, "tmu", False, (5e-4, 2e-3)),
    "relu6_clamp_many_tiles": (40, 70, 200, "n", "int8", -20, (-20, 30), "unifa", False, (1e-4, 4e-4)),
    # |acc * scale| up to ~1e12: ftoin saturates, the clamp runs before the zero point add (no wrap)
    "saturating_scales": (6, 20, 40, "n", "uint8", 200, None, "unifa", True, (1e5, 1e6)),
    # scale 0.5: every odd accumulator is a .5 tie (round half to even decides)
    "ties": (8, 16, 3, None, "int8", 0, None, "unifa", False, (0.5, 0.5)),
    # per-row scales (a convolution's axis): 19 m-tiles, so workers move on to further m-tiles
    "per_row_many_m_tiles": (300, 5, 20, "m", "int8", 9, None, "unifa", False, (1e-3, 4e-3)),
}


@pytest.mark.parametrize("case", list(GEMM_CASES))
def test_gemm_requantize_epilogue_matches_the_spec(dev, case):
    M, N, K, axis, dt, zp, clamp, stream, bias, (s0, s1) = GEMM_CASES[case]
    rng = np.random.default_rng(len(case))
    lo, hi = clamp or QRANGE[dt]
    sc = rng.uniform(s0, s1, {"n": N, "m": M}.get(axis, 1)).astype(np.float32)
    rq = Requant(dt, axis, zp, lo, hi, None if axis else float(sc[0]))
    s = GemmShape(M, N, K, a_dtype="int8", b_dtype="int8", bias=bias, requant=rq, a_stream=stream)
    a = rng.integers(-128, 128, (M, K)).astype(np.int8)
    b = rng.integers(-128, 128, (K, N)).astype(np.int8)
    consts = {"B": b}
    acc = a.astype(np.int64) @ b.astype(np.int64)
    if bias:
        consts["bias"] = rng.integers(-3000, 3000, N).astype(np.int32)
        acc = acc + consts["bias"]
    if axis:
        consts["scale"] = sc
    plan = plan_gemm(s, consts)
    assert plan.buffer("C").dtype == dt
    out, _ = run_plan(plan, dev, A=a)
    want = spec_requant(acc, {"n": sc, "m": sc.reshape(-1, 1)}.get(axis, sc[0]), zp, lo, hi, dt)
    np.testing.assert_array_equal(np.asarray(out).reshape(M, N), want)
    if case == "saturating_scales":
        assert {lo, hi} <= set(np.unique(want))
    if case == "ties":
        assert np.any(acc % 2 == 1)


@pytest.mark.parametrize("held", [True, False], ids=["params_in_registers", "params_through_unifa"])
@pytest.mark.parametrize("axis,stream", [(None, "unifa"), ("n", "unifa"), (None, "tmu"), ("n", "tmu")])
def test_relu_before_requantize_and_both_parameter_paths(dev, monkeypatch, held, axis, stream):
    """ReLU on the accumulator, then the requantize (the kernel folds it into the clamp: lo = zp);
    the parameters held in registers (when they fit) or read per tile through the unifa stream."""
    import tvm_qpu.codegen.kernels.gemm as G
    if not held:
        monkeypatch.setattr(G, "_rq_regs_fit", lambda *a: False)
    M, N, K, zp = (21 if stream == "unifa" else 8), 37, 50, -7     # tmu: R = M = 8 leaves room to hold them
    rng = np.random.default_rng(5)
    sc = rng.uniform(3e-4, 1e-3, N if axis else 1).astype(np.float32)
    rq = Requant("int8", axis, zp, -128, 127, None if axis else float(sc[0]))
    s = GemmShape(M, N, K, a_dtype="int8", b_dtype="int8", bias=True, activation="relu", requant=rq, a_stream=stream)
    assert G.choose_tiling(s).rq_regs == held
    a = rng.integers(-128, 128, (M, K)).astype(np.int8)
    b = rng.integers(-128, 128, (K, N)).astype(np.int8)
    bias = rng.integers(-3000, 3000, N).astype(np.int32)
    consts = {"B": b, "bias": bias, **({"scale": sc} if axis else {})}
    out, _ = run_plan(plan_gemm(s, consts), dev, A=a)
    acc = np.maximum(a.astype(np.int64) @ b.astype(np.int64) + bias, 0)
    want = spec_requant(acc, sc if axis else sc[0], zp, -128, 127, "int8")
    assert np.any(want == zp) and np.any(want > zp)
    np.testing.assert_array_equal(np.asarray(out).reshape(M, N), want)


# (N, C, H, W, OC, scale axis, out dtype, zero point, clamp, padding, a_stream)
CONV_CASES = {
    "per_channel_int8": (1, 3, 8, 8, 20, "m", "int8", -5, None, 1, None),
    "per_tensor_uint8_batch": (2, 8, 6, 6, 6, None, "uint8", 100, None, 0, None),
    "per_channel_uint8_relu_clamp_tmu": (1, 4, 5, 7, 5, "m", "uint8", 100, (100, 255), 1, "tmu"),
    "per_channel_int8_unifa_three_images": (3, 2, 6, 6, 33, "m", "int8", 0, (0, 90), 1, "unifa"),
    "per_channel_200_channels_tmu": (1, 2, 4, 4, 200, "m", "int8", 3, None, 1, "tmu"),
}


@pytest.mark.parametrize("case", list(CONV_CASES))
def test_conv_requantize_epilogue_matches_the_spec(dev, case):
    N, C, H, W, OC, axis, dt, zp, clamp, pad, stream = CONV_CASES[case]
    rng = np.random.default_rng(len(case) + 1)
    lo, hi = clamp or QRANGE[dt]
    sc = rng.uniform(1e-3, 1e-2, OC if axis else 1).astype(np.float32)
    rq = Requant(dt, axis, zp, lo, hi, None if axis else float(sc[0]))
    s = ConvShape(N, C, H, W, OC, 3, 3, padding=(pad,) * 4, dtype="int8", w_dtype="int8", bias=True, requant=rq)
    x = rng.integers(-128, 128, (N, C, H, W)).astype(np.int8)
    w = rng.integers(-128, 128, (OC, C, 3, 3)).astype(np.int8)
    b = rng.integers(-5000, 5000, OC).astype(np.int32)
    plan = plan_conv(s, w, b, stream, sc if axis else None)
    if plan.attrs["a_stream"] == "tmu":         # int8 weights stay int8 (the TMU sign-extends them)
        assert plan.constants["weight_panel"].dtype == np.int8
    out, _ = run_plan(plan, dev, data=x)
    want = spec_requant(conv2d_int64(x, w, pad, b), sc.reshape(-1, 1, 1) if axis else sc[0], zp, lo, hi, dt)
    np.testing.assert_array_equal(np.asarray(out).reshape(want.shape), want)


def _spec(out_dt="int8", requant=None, a_dt="int8"):
    attrs = {"input_names": ["A", "B"], "transpose_b": False, "bias": False, "activation": None}
    if requant is not None:
        attrs["requant"] = requant
    return OpSpec("matmul", [((4, 8), a_dt), ((8, 5), a_dt)], ((4, 5), out_dt), attrs)


@pytest.mark.parametrize("requant,words", [
    (dict(scale=0.0, zero_point=0, lo=-128, hi=127), "finite and positive"),
    (dict(scale=float("nan"), zero_point=0, lo=-128, hi=127), "finite and positive"),
    (dict(scale=[0.1, 0.2], zero_point=0, lo=-128, hi=127), "2 values for 5"),
    (dict(scale=[0.1, 0.2, -0.1, 0.2, 0.2], zero_point=0, lo=-128, hi=127), "finite and positive"),
    (dict(scale=0.1, zero_point=0, lo=-129, hi=127), "outside int8"),
    (dict(scale=0.1, zero_point=0, lo=5, hi=4), "outside int8 or empty"),
])
def test_bad_requantize_parameters_are_refused_with_the_reason(requant, words):
    ok, reason = supports(_spec(requant=requant))
    assert not ok and words in reason, reason


def test_requantize_needs_an_integer_gemm_and_an_8_bit_output():
    ok, reason = supports(_spec(requant=dict(scale=0.1, zero_point=0, lo=-128, hi=127), a_dt="float32"))
    assert not ok and "float" in reason
    ok, reason = supports(_spec(out_dt="int16", requant=dict(scale=0.1, zero_point=0, lo=-128, hi=127)))
    assert not ok and "int8 or uint8" in reason
    assert supports(_spec(requant=dict(scale=0.1, zero_point=0, lo=-128, hi=127)))[0]


def _requantized(spec_consts, per_channel, out_dt="int8", lo=None):
    """An integer conv2d / matmul spec of tests/test_estimates.py with the requantize epilogue."""
    spec, consts = spec_consts
    ch = spec.output[0][1] if spec.kind == "conv2d" else spec.output[0][-1]
    qmin, qmax = QRANGE[out_dt]
    spec.attrs["requant"] = dict(scale=list(np.linspace(1e-3, 3e-3, ch)) if per_channel else 2e-3,
                                 zero_point=qmin + 5, lo=qmin if lo is None else lo, hi=qmax)
    spec.output = (spec.output[0], out_dt)
    return spec, consts


#: requantizing convs / GEMMs: their estimates stay within tests/test_estimates.py's tolerance of
#: the emulated time ("tmu": the int8 weight panel read with 8-bit TMU lookups)
def _estimate_cases():
    from test_estimates import conv2d, matmul, tmu_variant
    return [
        ("conv_per_channel", _requantized(conv2d(1, 8, 16, 16, 16, 3, 1, "int8"), True)),
        ("conv_per_tensor_uint8_tmu", _requantized(tmu_variant(conv2d(1, 8, 16, 16, 16, 3, 1, "int8")), False, "uint8")),
        ("conv_int8_panel_tmu", _requantized(tmu_variant(conv2d(1, 32, 18, 18, 32, 3, 0, "int8")), True)),
        ("digits_conv2_batch64", _requantized(conv2d(64, 8, 4, 4, 16, 3, 1, "int8"), False, lo=-123)),
        ("gemm_per_column", _requantized(matmul(128, 128, 128, "int8"), True)),
        ("gemm_per_tensor_tmu", _requantized(tmu_variant(matmul(33, 70, 45, "int8")), False)),
    ]


@pytest.mark.parametrize("case", [c for c, _ in _estimate_cases()])
def test_requantizing_kernel_estimates_follow_the_emulator(case):
    from test_estimates import TOLERANCE, emulated_seconds
    from tvm_qpu.codegen import registry
    from tvm_qpu.runtime.device import open_device
    spec, consts = dict(_estimate_cases())[case]
    assert registry.supports(spec)[0], registry.supports(spec)
    emu = open_device("emulator")
    try:
        got = emulated_seconds(emu, spec, consts)
    finally:
        emu.close()
    est = registry.estimate(spec)
    assert abs(est / got - 1) <= TOLERANCE, f"{spec.describe()}: estimate {est * 1e6:.1f} us vs emulated " \
                                            f"{got * 1e6:.1f} us (ratio {est / got:.2f})"


# ---- against TVM's llvm build of the same Relax (the CPU path the region replaces) -------------
LLVM_CASES = {
    # kind, out dtype, zero point, [lo, hi] (None: the dtype's range), per channel?, scale range
    "matmul_ties_per_tensor": ("matmul", "int8", 0, None, False, (0.5, 0.5)),
    "matmul_per_column_uint8_saturating": ("matmul", "uint8", 200, None, True, (1e4, 1e6)),
    "conv_per_channel_relu6_clamp": ("conv2d", "int8", -10, (-10, 60), True, (1e-3, 1e-2)),
    "conv_per_tensor_uint8": ("conv2d", "uint8", 77, None, False, (2e-3, 2e-3)),
}


def _requant_module(kind, out_dt, zp, clamp, per_channel, scales, rng):
    """main(x int8) = requantize(int32 matmul / conv2d of x and int8 weights + int32 bias), written
    as tvm_qpu.quant.requant_expr builds it (the Relax both builds compile)."""
    import tvm
    from tvm import relax
    from tvm_qpu.quant import _RequantPlan, requant_expr
    if kind == "matmul":
        xshape, w = (9, 24), rng.integers(-128, 128, (24, 20)).astype(np.int8)
        ch, mshape = 20, (20,)
    else:
        xshape, w = (2, 5, 6, 6), rng.integers(-128, 128, (12, 5, 3, 3)).astype(np.int8)
        ch, mshape = 12, (1, 12, 1, 1)
    bias = rng.integers(-4000, 4000, ch).astype(np.int32)
    m = rng.uniform(*scales, ch if per_channel else 1).astype(np.float32)
    lo, hi = clamp or QRANGE[out_dt]
    plan = _RequantPlan(None, m.reshape(mshape) if per_channel else m.reshape(()), zp, lo, hi, out_dt, "")
    x = relax.Var("x", relax.TensorType(xshape, "int8"))
    bb = relax.BlockBuilder()
    with bb.function("main", [x]):
        with bb.dataflow():
            xi = bb.emit(relax.op.astype(x, "int32"))
            wc = relax.const(tvm.runtime.tensor(w.astype(np.int32)))
            if kind == "matmul":
                acc = bb.emit(relax.op.matmul(xi, wc, out_dtype="int32"))
                acc = bb.emit(relax.op.add(acc, relax.const(tvm.runtime.tensor(bias))))
            else:
                acc = bb.emit(relax.op.nn.conv2d(xi, wc, padding=(1, 1, 1, 1), out_dtype="int32"))
                acc = bb.emit(relax.op.add(acc, relax.const(tvm.runtime.tensor(bias.reshape(1, -1, 1, 1)))))
            out = bb.emit_output(requant_expr(acc, plan))
        bb.emit_func_output(out)
    return tvm.IRModule({"main": bb.get()["main"]}), xshape


@pytest.mark.parametrize("case", list(LLVM_CASES))
def test_requantizing_region_equals_tvm_llvm_bit_for_bit(case):
    import tvm_qpu
    rng = np.random.default_rng(len(case) + 7)
    mod, xshape = _requant_module(*LLVM_CASES[case], rng)
    x = rng.integers(-128, 128, xshape).astype(np.int8)
    outs = {}
    for target, placement in (("qpu", "all"), ("llvm", "none")):
        lib = tvm_qpu.build(mod, target=target, placement=placement)
        if target == "qpu":
            assert len(lib.report.regions) == 1 and "_requant" in lib.report.regions[0]["name"], lib.report.text()
            assert f"-> {LLVM_CASES[case][1]}[" in lib.report.regions[0]["spec"], lib.report.text()
        r = lib.runner("emulator")
        try:
            outs[target] = next(iter(r.run(x=x).values()))
        finally:
            r.close()
    assert outs["qpu"].dtype == np.dtype(LLVM_CASES[case][1])
    np.testing.assert_array_equal(outs["qpu"], outs["llvm"])
