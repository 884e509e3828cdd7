"""4-bit and 2-bit packed weights in the integer GEMM (and conv) kernels, on the emulator.

The spec: weights are integers in the packed range (int4 [-8, 7], uint4 [0, 15], int2 [-2, 1],
uint2 [0, 3]) handed to the plan as int8 / uint8 arrays; activations are int8 / uint8 / int16;
``C = A @ B`` in exact integers (int64 here, wrapped to int32 like the 8-bit kernels), + bias,
ReLU, or the requantize epilogue (QuantizeLinear of ``float32(acc) * float32(scale)``: round half to
even, + zero point, saturate). Every expected value below is numpy on the unpacked values, written
from that spec; nothing reuses the kernel's packing or reference code. Out-of-range weights must be
refused (never truncated).
"""
import numpy as np
import pytest

from tvm_qpu.codegen import registry
from tvm_qpu.codegen.kernels import gemm as G
from tvm_qpu.codegen.plan import run_plan
from tvm_qpu.codegen.registry import OpSpec

from reference import conv2d_int64, spec_requant

#: (weight dtype as the QPU runs it) -> (container dtype, bits, lo, hi): the spec's ranges
LOWBIT = {"int4": ("int8", 4, -8, 7), "uint4": ("uint8", 4, 0, 15),
          "int2": ("int8", 2, -2, 1), "uint2": ("uint8", 2, 0, 3)}


def _wrap32(x):
    return ((np.asarray(x, np.int64) + (1 << 31)) % (1 << 32) - (1 << 31)).astype(np.int32)


def _matmul_spec(M, N, K, wdt, a_dt="int8", batch=None, b_batched=False, transpose_b=False,
                 bias=False, activation=None, requant=None, out_dt="int32", via_dtype=False):
    """A matmul OpSpec with packed weights: ``weight_bits`` on an int8 / uint8 B (the default),
    or (``via_dtype``) the packed dtype name itself as B's dtype."""
    cdt, bits, _, _ = LOWBIT[wdt]
    pre = (batch,) if batch else ()
    bshape = (pre if b_batched else ()) + ((N, K) if transpose_b else (K, N))
    attrs = {"transpose_b": transpose_b, "bias": bias, "activation": activation}
    if not via_dtype:
        attrs["weight_bits"] = bits
    if requant is not None:
        attrs["requant"] = requant
    return OpSpec("matmul", [(pre + (M, K), a_dt), (bshape, wdt if via_dtype else cdt)], (pre + (M, N), out_dt), attrs)


def _run_spec(dev, spec, a, consts):
    ok, why = registry.supports(spec)
    assert ok, why
    plan = registry.generate(spec, consts)
    out, _ = run_plan(plan, dev, A=a)
    return np.asarray(out).reshape(spec.output[0]), plan


def _weights(rng, wdt, shape):
    cdt, _, lo, hi = LOWBIT[wdt]
    w = rng.integers(lo, hi + 1, shape).astype(cdt)
    w.reshape(-1)[:2] = (lo, hi)                             # both ends of the range occur
    return w


# (M, N, K): odd K (not a multiple of 8 or 16), N not a multiple of 16, one row (GEMV), > 16 rows
SHAPES = [(1, 50, 131), (3, 20, 37), (17, 33, 70)]


@pytest.mark.parametrize("wdt", list(LOWBIT))
@pytest.mark.parametrize("M,N,K", SHAPES)
def test_packed_weights_match_numpy(dev, wdt, M, N, K):
    rng = np.random.default_rng(M * 1000 + N + K)
    a_dt = "uint8" if wdt == "int2" else "int8"               # both activation signs
    a = rng.integers(0 if a_dt == "uint8" else -128, 128 if a_dt == "int8" else 256, (M, K)).astype(a_dt)
    b = _weights(rng, wdt, (K, N))
    out, plan = _run_spec(dev, _matmul_spec(M, N, K, wdt, a_dt), a, {"B": b})
    np.testing.assert_array_equal(out, _wrap32(a.astype(np.int64) @ b.astype(np.int64)))
    bits = LOWBIT[wdt][1]
    assert plan.attrs["weight_dtype"] == wdt
    # the weight buffer holds the packed words: K * N * bits / 8 bytes and padding (K to whole
    # blocks, N to 16 lanes, the prefetch rows), not K * N bytes
    t = plan.attrs["tiling"]
    words = (t["Kpad"] * bits // 32 + t["PF"]) * t["NT"] * 16 + 16
    assert plan.buffer("B").dtype == "uint32" and plan.buffer("B").nbytes == 4 * words


def test_bias_relu_int16_activations_and_the_dtype_name_path(dev):
    """Bias + ReLU on int16 activations, B declared as ``int4`` itself (no weight_bits attr)."""
    M, N, K = 6, 19, 45
    rng = np.random.default_rng(7)
    a = rng.integers(-3000, 3000, (M, K)).astype(np.int16)
    b = _weights(rng, "int4", (K, N))
    bias = rng.integers(-20000, 20000, N).astype(np.int32)
    spec = _matmul_spec(M, N, K, "int4", "int16", bias=True, activation="relu", via_dtype=True)
    out, _ = _run_spec(dev, spec, a, {"B": b, "bias": bias})
    np.testing.assert_array_equal(out, np.maximum(a.astype(np.int64) @ b.astype(np.int64) + bias, 0))


@pytest.mark.parametrize("wdt,axis", [("int4", "n"), ("uint2", None)])
def test_requantize_epilogue(dev, wdt, axis):
    M, N, K = 9, 21, 77
    rng = np.random.default_rng(11)
    a = rng.integers(-128, 128, (M, K)).astype(np.int8)
    b = _weights(rng, wdt, (K, N))
    bias = rng.integers(-500, 500, N).astype(np.int32)
    sc = rng.uniform(2e-3, 6e-3, N if axis else 1).astype(np.float32)
    rq = dict(scale=[float(v) for v in sc] if axis else float(sc[0]), zero_point=-5, lo=-128, hi=127)
    spec = _matmul_spec(M, N, K, wdt, bias=True, requant=rq, out_dt="int8")
    out, _ = _run_spec(dev, spec, a, {"B": b, "bias": bias})
    acc = a.astype(np.int64) @ b.astype(np.int64) + bias
    np.testing.assert_array_equal(out, spec_requant(acc, sc if axis else sc[0], -5, -128, 127, "int8"))


@pytest.mark.parametrize("b_batched,transpose_b", [(False, False), (True, True)])
def test_batch(dev, b_batched, transpose_b):
    """A batch of activations against one weight matrix (a dense layer over [batch, M, K]), and
    one (transposed) weight matrix per batch entry."""
    Z, M, N, K = 3, 5, 18, 39
    rng = np.random.default_rng(13)
    a = rng.integers(-128, 128, (Z, M, K)).astype(np.int8)
    b = _weights(rng, "int2", ((Z,) if b_batched else ()) + ((N, K) if transpose_b else (K, N)))
    spec = _matmul_spec(M, N, K, "int2", batch=Z, b_batched=b_batched, transpose_b=transpose_b)
    out, _ = _run_spec(dev, spec, a, {"B": b})
    bb = np.swapaxes(b, -1, -2) if transpose_b else b
    np.testing.assert_array_equal(out, np.matmul(a.astype(np.int64), bb.astype(np.int64)))


@pytest.mark.parametrize("wdt,bad", [("int4", 8), ("int4", -9), ("uint4", 16), ("uint4", -1),
                                     ("int2", 2), ("int2", -3), ("uint2", 4)])
def test_out_of_range_weights_are_refused(wdt, bad):
    M, N, K = 2, 16, 40
    b = np.zeros((K, N), np.int16)
    b[7, 3] = bad
    spec = _matmul_spec(M, N, K, wdt)
    with pytest.raises(ValueError, match="outside the"):
        registry.generate(spec, {"B": b})


@pytest.mark.parametrize("attrs,dtypes,words", [
    ({"weight_bits": 3}, ("int8", "int8"), "4 or 2 bits"),
    ({"weight_bits": 4}, ("float32", "int8"), "integer activations"),
    ({"weight_bits": 4}, ("int8", "int16"), "int8 / uint8"),
    ({"weight_bits": 2}, ("int8", "int4"), "contradicts"),
    ({"weight_bits": 4, "weight_signed": False}, ("int8", "int8"), "contradicts"),
    ({"weight_bits": 4, "a_stream": "tmu"}, ("int8", "int8"), "unifa"),
])
def test_unsupported_packed_specs_are_refused_with_the_reason(attrs, dtypes, words):
    spec = OpSpec("matmul", [((4, 40), dtypes[0]), ((40, 16), dtypes[1])], ((4, 16), "int32"), attrs)
    ok, why = registry.supports(spec)
    assert not ok and words in why, why


def test_packed_weights_must_be_constant():
    spec = _matmul_spec(4, 16, 40, "int4")
    with pytest.raises(ValueError, match="constant"):
        registry.generate(spec, {})


def test_packing_layout_is_the_documented_one():
    """docs/kernels.md: word (q, n) holds k = q G .. q G + G - 1 of column n, k = q G in the top
    bits, two's complement fields; k past K and n past N are zero."""
    w = np.array([1, -1, 2, -2, 3, -3, 4, -8, 7], np.int8).reshape(9, 1)
    p = G.pack_weights(w, 4, True, 2, 16)
    assert p.shape == (2, 16) and p.dtype == np.uint32
    assert p[0, 0] == 0x1F2E3D48 and p[1, 0] == 0x70000000 and not p[:, 1:].any()
    u = G.pack_weights(np.array([[3], [0], [1], [2]], np.uint8), 2, False, 1, 16)
    assert u[0, 0] == 0b11_00_01_10 << 24


# ---- convolution: the weights are the implicit GEMM's A panel ----------------------------------


def _conv_spec(x_shape, w_shape, pad, wdt, x_dt="int8", bias=False, activation=None, requant=None,
               out_dt="int32", a_stream=None):
    cdt, bits, _, _ = LOWBIT[wdt]
    n, _, h, wd = x_shape
    oc, _, kh, kw = w_shape
    attrs = {"padding": (pad,) * 4, "bias": bias, "activation": activation, "weight_bits": bits}
    if requant is not None:
        attrs["requant"] = requant
    if a_stream is not None:
        attrs["a_stream"] = a_stream
    return OpSpec("conv2d", [(x_shape, x_dt), (w_shape, cdt)],
                  ((n, oc, h + 2 * pad - kh + 1, wd + 2 * pad - kw + 1), out_dt), attrs)


# (x shape, w shape, pad, weight dtype, data dtype): 3x3 blocks of 9 k-steps (int4: 2 words per
# block row, the second holding one value), 1x1 blocks of 4 channels, 2 images, > 16 channels
CONV_CASES = [((1, 5, 9, 7), (20, 5, 3, 3), 1, "int4", "int8"), ((2, 6, 6, 5), (7, 6, 1, 1), 0, "uint4", "uint8"),
              ((1, 3, 8, 10), (9, 3, 3, 3), 0, "int2", "int16"), ((1, 4, 7, 7), (6, 4, 3, 3), 1, "uint2", "int8")]


@pytest.mark.parametrize("xs,ws,pad,wdt,xdt", CONV_CASES)
def test_conv_packed_panel_matches_numpy(dev, xs, ws, pad, wdt, xdt):
    from tvm_qpu.codegen.kernels.conv import plan_conv, shape_from_spec
    rng = np.random.default_rng(sum(xs) + sum(ws))
    info = np.iinfo(xdt)
    x = rng.integers(max(info.min, -300), min(info.max, 300) + 1, xs).astype(xdt)
    w = _weights(rng, wdt, ws)
    bias = rng.integers(-2000, 2000, ws[0]).astype(np.int32)
    spec = _conv_spec(xs, ws, pad, wdt, xdt, bias=True, activation="relu")
    assert registry.supports(spec)[0]
    plan = plan_conv(shape_from_spec(spec), w, bias, "tmu", packed=True)     # forced: the packed panel
    assert plan.attrs["weight_packed"] and plan.attrs["weight_dtype"] == wdt
    out, _ = run_plan(plan, dev, data=x)
    np.testing.assert_array_equal(out, np.maximum(conv2d_int64(x, w, pad) + bias.reshape(1, -1, 1, 1), 0))


def test_conv_packed_panel_requantize_per_channel(dev):
    from tvm_qpu.codegen.kernels.conv import plan_conv, shape_from_spec
    xs, ws = (1, 8, 8, 8), (18, 8, 3, 3)
    rng = np.random.default_rng(3)
    x = rng.integers(-128, 128, xs).astype(np.int8)
    w = _weights(rng, "int4", ws)
    sc = rng.uniform(1e-3, 4e-3, ws[0]).astype(np.float32)
    rq = dict(scale=[float(v) for v in sc], zero_point=4, lo=-128, hi=127)
    spec = _conv_spec(xs, ws, 1, "int4", requant=rq, out_dt="int8")
    plan = plan_conv(shape_from_spec(spec), w, None, "tmu", scale=sc, packed=True)
    out, _ = run_plan(plan, dev, data=x)
    want = spec_requant(conv2d_int64(x, w, 1), sc.reshape(1, -1, 1, 1), 4, -128, 127, "int8")
    np.testing.assert_array_equal(out, want)


@pytest.mark.parametrize("packed", [None, True, False])
def test_conv_through_the_registry(dev, packed):
    """Low-bit conv weights run whichever panel the estimate picks (packed or not), or the one
    ``attrs["weight_packed"]`` forces: the same result."""
    xs, ws = (1, 16, 10, 10), (8, 16, 3, 3)
    rng = np.random.default_rng(4)
    x = rng.integers(-128, 128, xs).astype(np.int8)
    w = _weights(rng, "int2", ws)
    spec = _conv_spec(xs, ws, 1, "int2")
    if packed is not None:
        spec.attrs["weight_packed"] = packed
    plan = registry.generate(spec, {"weight": w})
    assert packed is None or plan.attrs["weight_packed"] == packed
    out, _ = run_plan(plan, dev, data=x)
    np.testing.assert_array_equal(out, conv2d_int64(x, w, 1))


@pytest.mark.parametrize("packed", [True, False])
def test_conv_out_of_range_weights_are_refused(packed):
    from tvm_qpu.codegen.kernels.conv import plan_conv, shape_from_spec
    w = np.zeros((8, 4, 3, 3), np.int8)
    w[5, 1, 2, 0] = 8
    spec = _conv_spec((1, 4, 6, 6), w.shape, 0, "int4")
    with pytest.raises(ValueError, match="outside the int4 range"):
        plan_conv(shape_from_spec(spec), w, None, "tmu", packed=packed)


def test_conv_packed_weights_refusals():
    ok, why = registry.supports(OpSpec("conv2d", [((1, 4, 6, 6), "int8"), ((4, 1, 3, 3), "int8")], ((1, 4, 4, 4), "int32"),
                                       {"groups": 4, "weight_bits": 4}))
    assert not ok and "depthwise" in why
    ok, why = registry.supports(OpSpec("conv2d", [((1, 4, 6, 6), "float32"), ((4, 4, 3, 3), "int8")], ((1, 4, 4, 4), "float32"),
                                       {"weight_bits": 4}))
    assert not ok and "integer data" in why


@pytest.mark.parametrize("bits", [4, 2])
def test_packed_programs_pass_the_static_hazard_checker(bits):
    """The packed K loops (GEMM B words, conv panel words) obey the ISA's static rules (the
    emulator alone would not notice e.g. a signal beside a small immediate)."""
    from tvm_qpu.codegen.hazards import check_program
    from tvm_qpu.codegen.kernels.conv import ConvShape, plan_conv
    plans = [G.plan_gemm(G.GemmShape(M, 33, 70, a_dtype="int8", b_dtype="int8", b_bits=bits, bias=True,
                                     activation="relu"), {"B": np.zeros((70, 33), np.int8),
                                                          "bias": np.zeros(33, np.int32)}) for M in (1, 5, 17)]
    plans += [plan_conv(ConvShape(1, 5, 9, 7, oc, 3, 3, padding=(1,) * 4, dtype="int8", w_dtype="uint8",
                                  w_bits=bits), np.zeros((oc, 5, 3, 3), np.uint8), None, "tmu", packed=True)
              for oc in (6, 20)]
    for plan in plans:
        for launch in plan.launches:
            assert check_program(launch.words) == [], (plan.kind, launch.name)


# ---- 8-bit weights packed four k-steps per word (int8 / uint8 B, ``b_bits`` 8) ------------------
def _int8_spec(M, N, K, bdt, a_dt="int8", batch=None, b_batched=False, transpose_b=False, bias=False,
               requant=None, out_dt="int32", packed=True):
    """A matmul OpSpec with an int8 / uint8 constant B; ``packed`` -> ``attrs["weight_packed"]``
    (True forces the packed words, False forbids them, None: the estimate chooses)."""
    pre = (batch,) if batch else ()
    bshape = (pre if b_batched else ()) + ((N, K) if transpose_b else (K, N))
    attrs = {"transpose_b": transpose_b, "bias": bias}
    if packed is not None:
        attrs["weight_packed"] = packed
    if requant is not None:
        attrs["requant"] = requant
    return OpSpec("matmul", [(pre + (M, K), a_dt), (bshape, bdt)], (pre + (M, N), out_dt), attrs)


def _int8_weights(rng, bdt, shape):
    info = np.iinfo(bdt)
    w = rng.integers(info.min, info.max + 1, shape).astype(bdt)
    w.reshape(-1)[:2] = (info.min, info.max)                 # both ends of the range occur
    return w


# GEMV, odd K (not a multiple of 4 or 16), N % 16 != 0, > 16 rows; both weight signs, int16 A
INT8_CASES = [(1, 50, 131, "int8", "int8"), (1, 37, 7, "uint8", "int8"), (3, 20, 37, "uint8", "uint8"),
              (17, 33, 70, "int8", "int16")]


@pytest.mark.parametrize("M,N,K,bdt,a_dt", INT8_CASES)
def test_packed_int8_weights_match_numpy(dev, M, N, K, bdt, a_dt):
    rng = np.random.default_rng(M * 1000 + N + K)
    info = np.iinfo(a_dt)
    a = rng.integers(max(info.min, -3000), min(info.max, 3000) + 1, (M, K)).astype(a_dt)
    b = _int8_weights(rng, bdt, (K, N))
    out, plan = _run_spec(dev, _int8_spec(M, N, K, bdt, a_dt), a, {"B": b})
    np.testing.assert_array_equal(out, _wrap32(a.astype(np.int64) @ b.astype(np.int64)))
    assert plan.attrs["b_bits"] == 8 and plan.attrs["weight_dtype"] == bdt
    t = plan.attrs["tiling"]                                 # four k-steps per uint32 word
    assert plan.buffer("B").dtype == "uint32"
    assert plan.buffer("B").nbytes == 4 * ((t["Kpad"] // 4 + t["PF"]) * t["NT"] * 16 + 16)


@pytest.mark.parametrize("axis", ["n", None])
def test_packed_int8_requantize(dev, axis):
    M, N, K = 9, 21, 77
    rng = np.random.default_rng(17)
    a = rng.integers(-128, 128, (M, K)).astype(np.int8)
    b = _int8_weights(rng, "int8", (K, N))
    bias = rng.integers(-5000, 5000, N).astype(np.int32)
    sc = rng.uniform(2e-5, 6e-5, N if axis else 1).astype(np.float32)
    rq = dict(scale=[float(v) for v in sc] if axis else float(sc[0]), zero_point=3, lo=-128, hi=127)
    spec = _int8_spec(M, N, K, "int8", bias=True, requant=rq, out_dt="int8")
    out, plan = _run_spec(dev, spec, a, {"B": b, "bias": bias})
    assert plan.attrs["b_bits"] == 8
    acc = a.astype(np.int64) @ b.astype(np.int64) + bias
    np.testing.assert_array_equal(out, spec_requant(acc, sc if axis else sc[0], 3, -128, 127, "int8"))


@pytest.mark.parametrize("b_batched,transpose_b", [(False, False), (True, True)])
def test_packed_int8_batch(dev, b_batched, transpose_b):
    Z, M, N, K = 3, 5, 18, 39
    rng = np.random.default_rng(19)
    a = rng.integers(-128, 128, (Z, M, K)).astype(np.int8)
    b = _int8_weights(rng, "uint8", ((Z,) if b_batched else ()) + ((N, K) if transpose_b else (K, N)))
    spec = _int8_spec(M, N, K, "uint8", batch=Z, b_batched=b_batched, transpose_b=transpose_b)
    out, plan = _run_spec(dev, spec, a, {"B": b})
    assert plan.attrs["b_bits"] == 8
    bb = np.swapaxes(b, -1, -2) if transpose_b else b
    np.testing.assert_array_equal(out, np.matmul(a.astype(np.int64), bb.astype(np.int64)))


def test_int8_packing_is_chosen_by_estimate_for_a_constant_b(dev):
    """Unforced, a constant int8 B of a GEMV is packed (the estimate: lookups, not instructions,
    bound the unpacked k-step), a B given at run time never is, and ``weight_packed=False``
    forbids it; the results are the same."""
    M, N, K = 1, 40, 300
    rng = np.random.default_rng(23)
    a = rng.integers(-128, 128, (M, K)).astype(np.int8)
    b = _int8_weights(rng, "int8", (K, N))
    want = a.astype(np.int64) @ b.astype(np.int64)
    s = G.GemmShape(M, N, K, a_dtype="int8", b_dtype="int8")
    assert G.plan_cycles(G.packed_int8_candidate(s)) < G.plan_cycles(s)
    for packed, bits in ((None, 8), (False, None)):
        out, plan = _run_spec(dev, _int8_spec(M, N, K, "int8", packed=packed), a, {"B": b})
        assert plan.attrs["b_bits"] == bits
        np.testing.assert_array_equal(out, want)
    plan = registry.generate(_int8_spec(M, N, K, "int8", packed=None), {})   # B at run time
    assert plan.attrs["b_bits"] is None
    out, _ = run_plan(plan, dev, A=a, B=b)
    np.testing.assert_array_equal(np.asarray(out).reshape(M, N), want)


def test_packed_int8_refusals():
    spec = _int8_spec(4, 16, 40, "int8")
    with pytest.raises(ValueError, match="constant"):            # forced packing of a run-time B
        registry.generate(spec, {})
    ok, why = registry.supports(_int8_spec(4, 16, 40, "int32"))
    assert not ok and "int8 / uint8" in why
    spec = _int8_spec(4, 16, 40, "int8")
    spec.attrs["a_stream"] = "tmu"
    ok, why = registry.supports(spec)
    assert not ok and "unifa" in why


def test_packed_int8_layout():
    """Four k-steps per word, k = 4q in the top byte, two's complement bytes, zeros past K."""
    w = np.array([1, -1, 127, -128, 5], np.int8).reshape(5, 1)
    p = G.pack_weights(w, 8, True, 2, 16)
    assert p[0, 0] == 0x01FF7F80 and p[1, 0] == 0x05000000 and not p[:, 1:].any()


def test_packed_int8_programs_pass_the_static_hazard_checker():
    from tvm_qpu.codegen.hazards import check_program
    for M in (1, 5, 17):
        plan = G.plan_gemm(G.GemmShape(M, 33, 70, a_dtype="int8", b_dtype="uint8", b_bits=8, bias=True,
                                       activation="relu"), {"B": np.zeros((70, 33), np.uint8),
                                                            "bias": np.zeros(33, np.int32)})
        for launch in plan.launches:
            assert check_program(launch.words) == [], launch.name


# ------------------------------------------------------------------------------------------------
# Block-wise scales along K (ONNX block-wise DequantizeLinear of the weights, block_size along K)
# ------------------------------------------------------------------------------------------------
def _blockwise_spec_reference(x, w, scale, block, x_scale):
    """ONNX, in float64: DequantizeLinear(x) = (x - 0) * x_scale; block-wise DequantizeLinear(w)
    = (w - 0) * scale[k // block, n]; then MatMul."""
    xd = x.astype(np.float64) * float(x_scale)
    wd = w.astype(np.float64) * np.repeat(scale.astype(np.float64), block, axis=0)
    return xd @ wd


@pytest.mark.parametrize("wdt,M,N,K,block", [("int4", 1, 37, 128, 32), ("uint4", 3, 19, 64, 16),
                                             ("int2", 5, 40, 96, 32), ("int4", 2, 17, 256, 64)])
def test_blockwise_scales_match_numpy(dev, wdt, M, N, K, block):
    cdt, bits, lo, hi = LOWBIT[wdt]
    rng = np.random.default_rng(K + N + block)
    x = rng.integers(-128, 128, (M, K)).astype(np.int8)
    w = _weights(rng, wdt, (K, N))
    scale = rng.uniform(0.001, 0.05, (K // block, N)).astype(np.float32)
    scale[0, 0] *= -1                                         # the spec allows any finite scale
    x_scale = np.float32(0.02)
    s = G.GemmShape(M, N, K, a_dtype="int8", b_dtype=cdt, b_bits=bits, k_block=block)
    # the kernel gets the activation scale folded into the block scales (float32 product)
    plan = G.plan_gemm(s, {"B": w, G.BLOCK_SCALE: scale * x_scale})
    out, _ = run_plan(plan, dev, A=x)
    out = np.asarray(out).reshape(M, N)
    assert out.dtype == np.float32
    ref = _blockwise_spec_reference(x, w, scale, block, x_scale)
    # tolerance from float32 rounding: each block's integer sum is exact (|sum| < 2**24), then
    # one rounding of the folded scale (x_scale * scale), one of the product and one per block
    # addition: <= (nblocks + 3) * 2**-24 relative to the sum of the blocks' magnitudes
    mags = np.abs(x.astype(np.float64) * float(x_scale)) @ np.abs(
        w.astype(np.float64) * np.repeat(scale.astype(np.float64), block, axis=0))
    nb = K // block
    np.testing.assert_array_less(np.abs(out - ref), (nb + 3) * 2.0 ** -24 * mags + 1e-30)
    # the weight buffer holds packed words + one scale row per block, not K x N bytes
    t = plan.attrs["tiling"]
    G_ = 32 // bits
    assert plan.constants["B"].size == (K // G_ + nb + t["PF"]) * t["NT"] * 16 + 16


@pytest.mark.parametrize("kw,why", [
    (dict(k_block=12), "multiple of the 8 k-steps"),           # int4: 8 values per word
    (dict(k_block=32, K=80), "not a multiple of the scale block"),
    (dict(k_block=32, bias=True), "plain float32-output GEMM"),
    (dict(k_block=32, b_bits=None, b_dtype="int8"), "need packed constant B"),
])
def test_blockwise_refusals(kw, why):
    base = dict(M=1, N=16, K=64, a_dtype="int8", b_dtype="int8", b_bits=4)
    base.update(kw)
    with pytest.raises(ValueError, match=why):
        G.choose_tiling(G.GemmShape(**base))


@pytest.mark.parametrize("wdt,bits", [("int4", 4), ("int8", 8)])
def test_blockwise_spec_through_registry(dev, wdt, bits):
    """A matmul OpSpec with ``k_block`` (and ``weight_bits`` 4, or plain int8 weights packed four
    per word): named with its block, generated with the ``block_scale`` constant, equal to the
    float64 ONNX-spec reference within float32 rounding; its estimate counts the per-block fold."""
    M, N, K, block = 2, 21, 64, 32
    rng = np.random.default_rng(bits)
    cdt = "int8"
    lo, hi = (-8, 7) if bits == 4 else (-128, 127)
    x = rng.integers(-128, 128, (M, K)).astype(np.int8)
    w = rng.integers(lo, hi + 1, (K, N)).astype(cdt)
    scale = rng.uniform(0.001, 0.05, (K // block, N)).astype(np.float32)
    attrs = {"k_block": block, "input_names": ["A", "B"]}
    if bits == 4:
        attrs["weight_bits"] = 4
    spec = OpSpec("matmul", [((M, K), "int8"), ((K, N), cdt)], ((M, N), "float32"), attrs)
    assert f"{wdt}[{K}, {N}]) (block {block}) -> float32" in spec.describe()
    out, plan = _run_spec(dev, spec, x, {"B": w, G.BLOCK_SCALE: scale})
    ref = _blockwise_spec_reference(x, w, scale, block, 1.0)
    mags = np.abs(x.astype(np.float64)) @ np.abs(w * np.repeat(scale.astype(np.float64), block, axis=0))
    np.testing.assert_array_less(np.abs(out - ref), (K // block + 3) * 2.0 ** -24 * mags + 1e-30)
    # the estimate of the block-wise plan exceeds the plain packed integer GEMM's (its fold and
    # scale rows are modelled), and int32 out is refused for it (the output is float32)
    plain = OpSpec("matmul", spec.inputs, ((M, N), "int32"),
                   {k: v for k, v in attrs.items() if k != "k_block"} | ({} if bits == 4 else {"weight_packed": True}))
    assert registry.estimate(spec) > registry.estimate(plain)
    ok, why = registry.supports(OpSpec("matmul", spec.inputs, ((M, N), "int32"), attrs))
    assert not ok and "float32" in why
