"""Kernel estimates against the emulator.

Every kernel kind's ``estimate(spec, model)`` (what placement uses) must stay within +-25% of the
time the emulator models for the plan the kernel generates (the sum of its launches' modelled
seconds), over a sweep of shapes: a few small ones per kind here, a bigger sweep marked slow.
Both sides use the same TimingModel (runtime/cycle_model.py DEFAULT); the estimate is a formula
over the generated program's instruction counts and the model's parameters, the emulated time
comes from simulating every instruction, so the comparison can fail.

The other tests check that estimates read the model they are given (clock, DRAM bandwidth,
uniform-stream prefetch) instead of private constants.
"""
from __future__ import annotations

import inspect

import numpy as np
import pytest

from tvm_qpu.codegen import registry
from tvm_qpu.codegen.plan import run_plan
from tvm_qpu.codegen.registry import OpSpec
from tvm_qpu.runtime.cycle_model import DEFAULT

TOLERANCE = 0.25


# ---- spec builders ---------------------------------------------------------------------------
def matmul(M, N, K, dt="float32", batch=None, transpose_b=False):
    out = "float32" if dt == "float32" else "int32"
    pre = (batch,) if batch else ()
    b = pre + ((N, K) if transpose_b else (K, N))
    return OpSpec("matmul", [(pre + (M, K), dt), (b, dt)], (pre + (M, N), out),
                  {"transpose_b": transpose_b}), {}


def lowbit_matmul(M, N, K, bits, batch=None):
    """An int8-activation matmul with constant ``bits``-bit packed weights (gemm ``weight_bits``)."""
    spec, _ = matmul(M, N, K, "int8", batch)
    spec.attrs["weight_bits"] = bits
    return spec, {"B": spec.inputs[1][0]}


def packed_int8_matmul(M, N, K, batch=None, bdt="int8"):
    """An int8-activation matmul with a constant int8 / uint8 B packed four k-steps per word
    (gemm ``weight_packed``; ``b_constant``: the estimate's choice sees a constant B)."""
    spec, _ = matmul(M, N, K, "int8", batch)
    spec.inputs[1] = (spec.inputs[1][0], bdt)
    spec.attrs.update(weight_packed=True, b_constant=True)
    return spec, {"B": spec.inputs[1][0]}


def conv2d(N, C, H, W, OC, k, pad, dt="float32", groups=1, stride=1):
    out = "float32" if dt == "float32" else "int32"
    oh, ow = (H + 2 * pad - k) // stride + 1, (W + 2 * pad - k) // stride + 1
    w = (OC, C // groups, k, k)
    return OpSpec("conv2d", [((N, C, H, W), dt), (w, dt)], ((N, OC, oh, ow), out),
                  {"padding": (pad,) * 4, "strides": (stride, stride), "groups": groups}), {"weight": w}


def lowbit_conv2d(N, C, H, W, OC, k, pad, bits):
    """An int8 conv2d with ``bits``-bit weights (``weight_bits``: packed panel where it pays)."""
    spec, consts = conv2d(N, C, H, W, OC, k, pad, "int8")
    spec.attrs["weight_bits"] = bits
    return spec, consts


def depthwise(N, C, H, W, kh, kw, pad, stride=1, bias=False, activation=None):
    """A float32 depthwise conv2d (groups == C == OC: the depthwise kernel); ``pad`` is one value
    or (rows, columns)."""
    ph, pw = pad if isinstance(pad, tuple) else (pad, pad)
    oh, ow = (H + 2 * ph - kh) // stride + 1, (W + 2 * pw - kw) // stride + 1
    w = (C, 1, kh, kw)
    attrs = {"padding": (ph, pw, ph, pw), "strides": (stride, stride), "groups": C}
    consts = {"weight": w}
    if bias:
        attrs["bias"], consts["bias"] = True, (C,)
    if activation is not None:
        attrs["activation"] = activation
    return OpSpec("conv2d", [((N, C, H, W), "float32"), (w, "float32")], ((N, C, oh, ow), "float32"), attrs), consts


def pool(kind, shape, k, s, pad, dt="float32"):
    oh, ow = (shape[2] + 2 * pad - k) // s + 1, (shape[3] + 2 * pad - k) // s + 1
    attrs = {"pool_size": (k, k), "strides": (s, s), "padding": (pad,) * 4, "dilation": (1, 1),
             "ceil_mode": False, "count_include_pad": False, "layout": "NCHW"}
    return OpSpec(kind, [(shape, dt)], ((shape[0], shape[1], oh, ow), dt), attrs), {}


def global_avg(shape, dt="float32"):
    return OpSpec("global_avg_pool2d", [(shape, dt)], ((shape[0], shape[1], 1, 1), dt), {"layout": "NCHW"}), {}


def reduction(kind, shape, axis, dt="float32"):
    axes = tuple(range(len(shape))) if axis is None else tuple(a % len(shape) for a in axis)
    out = tuple(d for i, d in enumerate(shape) if i not in axes)
    return OpSpec(kind, [(shape, dt)], (out, "int64" if kind.startswith("arg") else dt),
                  {"axis": axis, "keepdims": False}), {}


def softmax(rows, n):
    return OpSpec("softmax", [((rows, n), "float32")], ((rows, n), "float32"), {"axis": -1}), {}


def attention(B, S, T, D, dt="float32", causal=False):
    return OpSpec("attention", [((B, S, D), dt), ((B, T, D), dt), ((B, T, D), dt)], ((B, S, D), "float32"),
                  {"scale": 0.1 if dt == "float32" else 1e-3, "causal": causal, "mask": False}), {}


def add(n, dt="float32", activation=None):
    shp = (n,)
    return OpSpec("add", [(shp, dt), (shp, dt)], (shp, dt), {"activation": activation}), {}


def bias_gelu(rows, n, activation="gelu"):
    """The add kernel with a bias vector [n] along the last axis and a GELU epilogue."""
    return OpSpec("add", [((rows, n), "float32"), ((n,), "float32")], ((rows, n), "float32"),
                  {"activation": activation, "bias": True}), {"b": (n,)}


def gelu(n, approximate="none"):
    return OpSpec("gelu", [((n,), "float32")], ((n,), "float32"), {"approximate": approximate}), {}


def layer_norm(rows, n):
    return OpSpec("layer_norm", [((rows, n), "float32"), ((n,), "float32"), ((n,), "float32")],
                  ((rows, n), "float32"), {"axes": (-1,), "epsilon": 1e-5}), {}


def tmu_variant(spec_consts):
    """The same op with the GEMM's A operand forced through the TMU (gemm.A_STREAMS "tmu")."""
    spec, consts = spec_consts
    spec.attrs["a_stream"] = "tmu"
    return spec, consts


#: (kind, spec, constant shapes): a few small shapes per kernel kind (fast)
SWEEP = [
    ("gemm", *matmul(64, 64, 64)), ("gemm", *matmul(33, 70, 45)), ("gemm", *matmul(1, 256, 256)),
    ("gemm", *matmul(128, 128, 128, "int8")), ("gemm", *matmul(16, 32, 64, batch=8)),
    ("conv", *conv2d(1, 8, 16, 16, 16, 3, 1)), ("conv", *conv2d(1, 32, 18, 18, 32, 3, 0, "int8")),
    ("conv", *conv2d(1, 16, 14, 14, 16, 3, 1, groups=16)),
    ("conv", *depthwise(1, 32, 28, 28, 3, 3, 1, stride=2)),
    ("conv", *depthwise(1, 8, 9, 13, 3, 3, 1, bias=True, activation=("clip", 0.0, 6.0))),
    ("conv", *depthwise(2, 4, 10, 10, 1, 3, (0, 1))),
    ("pool", *pool("max_pool2d", (1, 16, 32, 32), 2, 2, 0)), ("pool", *global_avg((1, 32, 16, 16))),
    ("reduce", *reduction("reduce_max", (65536,), None)), ("reduce", *reduction("reduce_max", (32, 17, 40), (0,))),
    ("reduce", *reduction("argmax", (100, 300), (1,))),
    ("softmax", *softmax(64, 128)), ("softmax", *softmax(512, 64)),
    ("attention", *attention(2, 32, 128, 32)),
    ("gemm", *tmu_variant(matmul(64, 64, 64))), ("conv", *tmu_variant(conv2d(1, 8, 16, 16, 16, 3, 1))),
    ("elementwise", *add(5000, activation="relu")), ("elementwise", *gelu(777)),
    ("elementwise", *bias_gelu(16, 128)),
    ("layer_norm", *layer_norm(16, 32)), ("layer_norm", *layer_norm(13, 200)),
    ("gemm", *lowbit_matmul(1, 1024, 1024, 4)), ("gemm", *lowbit_matmul(33, 70, 45, 4)),
    ("gemm", *lowbit_matmul(64, 64, 64, 2)), ("gemm", *lowbit_matmul(16, 32, 64, 2, batch=8)),
    ("conv", *lowbit_conv2d(1, 64, 16, 16, 8, 3, 1, 2)),
    ("conv", *tmu_variant(lowbit_conv2d(1, 32, 18, 18, 32, 3, 0, 4))),
    ("gemm", *packed_int8_matmul(1, 1024, 1024)), ("gemm", *packed_int8_matmul(33, 70, 45, bdt="uint8")),
    ("gemm", *packed_int8_matmul(16, 32, 64, batch=8)),
]

#: a bigger sweep (slow: run with --runslow)
SWEEP_SLOW = [
    ("gemm", *matmul(128, 128, 128)), ("gemm", *matmul(256, 256, 256)), ("gemm", *matmul(96, 64, 200, "int16")),
    ("gemm", *matmul(100, 130, 64, transpose_b=True)),
    ("conv", *conv2d(1, 3, 32, 32, 16, 5, 2, stride=2)), ("conv", *conv2d(1, 16, 12, 12, 32, 1, 0)),
    ("conv", *conv2d(1, 32, 34, 34, 64, 3, 1)),
    ("conv", *depthwise(1, 64, 56, 56, 3, 3, 1)), ("conv", *depthwise(1, 3, 5, 5, 3, 3, 0)),
    ("pool", *pool("avg_pool2d", (1, 8, 33, 33), 3, 2, 1)), ("pool", *pool("max_pool2d", (1, 32, 64, 64), 3, 2, 1, "int32")),
    ("pool", *global_avg((2, 64, 7, 7))),
    ("reduce", *reduction("reduce_min", (64, 1000), (1,), "int32")), ("reduce", *reduction("argmin", (256, 64), (0,), "int32")),
    ("softmax", *softmax(16, 1000)),
    ("attention", *attention(1, 64, 64, 64)), ("attention", *attention(1, 128, 128, 64, "int8")),
    ("attention", *attention(4, 16, 16, 16, causal=True)),          # pack launches dominate
    ("softmax", *softmax(3, 4000)),
    ("gemm", *tmu_variant(matmul(256, 256, 256))), ("gemm", *tmu_variant(matmul(33, 70, 45, "int8"))),
    ("gemm", *tmu_variant(matmul(16, 32, 64, batch=8))),
    ("conv", *tmu_variant(conv2d(1, 32, 18, 18, 32, 3, 0, "int8"))),
    ("elementwise", *add(1)), ("elementwise", *add(200_000, "int32")), ("elementwise", *gelu(65536, "tanh")),
    ("elementwise", *gelu(100_000)), ("layer_norm", *layer_norm(1, 1)), ("layer_norm", *layer_norm(128, 768)),
    ("layer_norm", *layer_norm(2, 1000)), ("elementwise", *bias_gelu(128, 3072)),
    ("elementwise", *bias_gelu(3, 640, "gelu_tanh")),
    ("gemm", *lowbit_matmul(1, 4096, 4096, 4)), ("gemm", *lowbit_matmul(1, 4096, 4096, 2)),
    ("gemm", *lowbit_matmul(128, 128, 128, 2)),
    ("gemm", *packed_int8_matmul(1, 4096, 4096)), ("gemm", *packed_int8_matmul(128, 128, 128)),
    # the A panel (256 KB) exceeds the L2, but each worker's row tile stays there across its
    # column tiles (gemm.a_tile_reused)
    ("gemm", *matmul(256, 256, 256, "int8")), ("gemm", *lowbit_matmul(256, 256, 256, 4)),
    ("gemm", *lowbit_matmul(256, 256, 256, 2)), ("gemm", *packed_int8_matmul(256, 256, 256)),
]


def _random(shape, dtype, rng):
    if np.dtype(dtype).kind in "iu":
        return rng.integers(-50, 50, shape).astype(dtype)
    return rng.standard_normal(shape).astype(dtype)


def _random_const(shape, spec, rng):
    """A constant of ``spec``: its weights' dtype, within the packed range for packed weights."""
    bits = spec.attrs.get("weight_bits")
    if bits:
        return rng.integers(-(1 << (bits - 1)), 1 << (bits - 1), shape).astype(spec.inputs[1][1])
    return _random(shape, spec.inputs[1][1], rng)


def emulated_seconds(dev, spec, const_shapes, seed=0) -> float:
    """Modelled seconds of the plan ``registry.generate`` makes for ``spec``, run on ``dev``."""
    rng = np.random.default_rng(seed)
    consts = {k: _random_const(v, spec, rng) for k, v in const_shapes.items()}
    plan = registry.generate(spec, consts)
    inputs = {b.name: _random(b.shape, b.dtype, rng) for b in plan.buffers if b.role == "input"}
    _, stats = run_plan(plan, dev, **inputs)
    return sum(s.seconds for s in stats)


@pytest.fixture(scope="module")
def emu():
    from tvm_qpu.runtime.device import open_device
    d = open_device("emulator")
    yield d
    d.close()


def _check(emu, spec, const_shapes):
    got = emulated_seconds(emu, spec, const_shapes)
    est = registry.estimate(spec)
    assert abs(est / got - 1) <= TOLERANCE, \
        f"{spec.describe()}: estimate {est * 1e6:.1f} us vs emulated {got * 1e6:.1f} us (ratio {est / got:.2f})"


@pytest.mark.parametrize("kind,spec,consts", SWEEP, ids=lambda x: x.describe() if isinstance(x, OpSpec) else None)
def test_estimate_within_tolerance(emu, kind, spec, consts):
    _check(emu, spec, consts)


@pytest.mark.slow
@pytest.mark.parametrize("kind,spec,consts", SWEEP_SLOW, ids=lambda x: x.describe() if isinstance(x, OpSpec) else None)
def test_estimate_within_tolerance_big_sweep(emu, kind, spec, consts):
    _check(emu, spec, consts)


# ---- the same under the model's corners and its structural alternative ------------------------
#: (kind, spec, constant shapes): small shapes per kind (slow: about a minute), each checked under
#: the fast and slow corners (every unpinned parameter at one end of its range, cycle_model.RANGES) and the
#: structural alternative (cycle_model.ALTERNATIVES): estimate and emulator both under that model
CORNER_SWEEP = [
    ("gemm", *matmul(33, 70, 45)), ("conv", *conv2d(1, 8, 16, 16, 16, 3, 1)),
    ("pool", *pool("max_pool2d", (1, 16, 32, 32), 2, 2, 0)),
    ("pool", *pool("max_pool2d", (1, 32, 64, 64), 3, 2, 1, "int32")), ("pool", *global_avg((1, 32, 16, 16))),
    ("reduce", *reduction("reduce_max", (65536,), None)), ("reduce", *reduction("argmax", (100, 300), (1,))),
    ("reduce", *reduction("reduce_min", (64, 1000), (1,), "int32")),
    ("softmax", *softmax(3, 4000)), ("attention", *attention(2, 32, 128, 32)),
    # resident rows in step on a saturated slice TMU (alternative) / alone (512 x 64); streamed rows
    ("softmax", *softmax(64, 128)), ("softmax", *softmax(512, 64)), ("softmax", *softmax(16, 1000)),
    # lanes stages: adjacent outputs (the busiest worker's chain, over-issued lookups, L2 reuse)
    ("reduce", *reduction("reduce_max", (32, 17, 40), (0,))), ("reduce", *reduction("reduce_min", (400, 1200), (0,), "int16")),
    # the rest of the fast SWEEP that holds under all three (its gaps: CORNER_GAP_CASES)
    ("gemm", *matmul(64, 64, 64)), ("gemm", *matmul(128, 128, 128, "int8")),
    ("conv", *depthwise(1, 32, 28, 28, 3, 3, 1, stride=2)), ("conv", *conv2d(1, 16, 14, 14, 16, 3, 1, groups=16)),
    ("conv", *depthwise(1, 8, 9, 13, 3, 3, 1, bias=True, activation=("clip", 0.0, 6.0))),
    ("conv", *depthwise(2, 4, 10, 10, 1, 3, (0, 1))), ("gemm", *tmu_variant(matmul(64, 64, 64))),
    ("elementwise", *gelu(777)), ("elementwise", *bias_gelu(16, 128)),
    ("layer_norm", *layer_norm(16, 32)), ("layer_norm", *layer_norm(13, 200)),
]

#: known gaps: (sweep entry, model) -> the measured estimate / emulated ratio and the mechanism
#: the estimate lacks (strict xfail: a fix makes the test fail until the entry is removed)
CORNER_GAP_CASES = [
    (("attention", *attention(4, 16, 16, 16, causal=True)), "alternative",
     "0.64 (fast 0.91, slow 0.84): per launch (cycles) Q pack 3702 emulated / 2924 modelled, "
     "K pack (gemm.pack_launch_cycles) 4655 / 2172, attention 6226 / 4220: all three under"),
    # found by running the whole fast SWEEP under both corners and the alternative (issue 9
    # audit); not analysed yet: the ratio estimate / emulated and the corner
    (("gemm", *matmul(1, 256, 256)), "slow", "1.34 (fast 1.13, alternative 1.00)"),
    (("gemm", *matmul(16, 32, 64, batch=8)), "alternative", "0.57 (fast 0.95, slow 1.03)"),
    (("conv", *conv2d(1, 32, 18, 18, 32, 3, 0, "int8")), "slow", "0.57 (fast 1.10, alternative 0.97)"),
    (("conv", *tmu_variant(conv2d(1, 8, 16, 16, 16, 3, 1))), "alternative", "0.58 (fast 1.02, slow 1.28)"),
    (("conv", *tmu_variant(conv2d(1, 8, 16, 16, 16, 3, 1))), "slow", "1.28 (fast 1.02, alternative 0.58)"),
    (("elementwise", *add(5000, activation="relu")), "alternative", "1.27 (fast 0.98, slow 1.00)"),
    # (LayerNorm 16 x 32 and 13 x 200 were 0.75 / 0.38 here: closed by modelling each window's
    # slice-TMU queue; bigger LayerNorms keep a smaller gap, from SWEEP_SLOW:)
    (("layer_norm", *layer_norm(128, 768)), "alternative", "0.67 (fast 0.98, slow 0.78; 0.23 before the queue)"),
    (("layer_norm", *layer_norm(2, 1000)), "alternative", "0.74 (fast 0.79, slow 1.07; 0.39 before the queue)"),
]


def _corner_models():
    fast, slow = DEFAULT.corners()
    return {"fast": fast, "slow": slow, "alternative": DEFAULT.alternatives()[0]}


@pytest.fixture(scope="module")
def corner_devs():
    from tvm_qpu.runtime.device import open_device
    devs = {k: open_device("emulator", timing=m) for k, m in _corner_models().items()}
    yield devs
    for d in devs.values():
        d.close()


def _check_under(devs, name, spec, consts):
    m = _corner_models()[name]
    got = emulated_seconds(devs[name], spec, consts)
    est = registry.entry(spec.kind).estimate(spec, m)
    assert abs(est / got - 1) <= TOLERANCE, \
        f"{spec.describe()} under {name}: estimate {est * 1e6:.1f} us vs emulated {got * 1e6:.1f} us (ratio {est / got:.2f})"


@pytest.mark.slow
@pytest.mark.parametrize("model", ["fast", "slow", "alternative"])
@pytest.mark.parametrize("kind,spec,consts", CORNER_SWEEP, ids=lambda x: x.describe() if isinstance(x, OpSpec) else None)
def test_estimate_within_tolerance_under_corners(corner_devs, model, kind, spec, consts):
    _check_under(corner_devs, model, spec, consts)


@pytest.mark.slow
@pytest.mark.parametrize("case,model,why", CORNER_GAP_CASES, ids=lambda x: x[1].describe() if isinstance(x, tuple) else None)
def test_estimate_corner_gaps(corner_devs, case, model, why):
    """Documented gaps under a corner (strict xfail: the test fails once the estimate holds)."""
    _, spec, consts = case
    try:
        _check_under(corner_devs, model, spec, consts)
    except AssertionError:
        pytest.xfail(why)
    pytest.fail(f"{spec.describe()} under {model} now holds: remove it from CORNER_GAP_CASES")


def test_every_kernel_kind_is_swept():
    assert {k for k, _, _ in SWEEP} == {"gemm", "conv", "pool", "reduce", "softmax", "attention", "elementwise",
                                        "layer_norm"}


# ---- estimates read the model they are given --------------------------------------------------
# (SWEEP[7]: conv2d's depthwise kernel, a separate estimate)
ONE_PER_KIND = [SWEEP[0], SWEEP[5], SWEEP[7], SWEEP[11], SWEEP[13], SWEEP[16], SWEEP[18]] + \
    [next(c for c in SWEEP if c[1].kind == k) for k in ("add", "gelu", "layer_norm")]


@pytest.mark.parametrize("kind,spec,consts", ONE_PER_KIND, ids=lambda x: x.describe() if isinstance(x, OpSpec) else None)
def test_estimate_follows_clock(kind, spec, consts):
    e = registry.entry(spec.kind).estimate
    assert e(spec, DEFAULT.with_(clock_hz=2 * DEFAULT.clock_hz)) == pytest.approx(e(spec, DEFAULT) / 2, rel=1e-9)
    assert registry.estimate(spec) == pytest.approx(e(spec, DEFAULT), rel=1e-12)


@pytest.mark.parametrize("kind,spec,consts", ONE_PER_KIND, ids=lambda x: x.describe() if isinstance(x, OpSpec) else None)
def test_estimate_follows_memory_model(kind, spec, consts):
    """Slower DRAM and longer latencies never make a kernel faster, and make every kind slower."""
    e = registry.entry(spec.kind).estimate
    slow = DEFAULT.with_(dram_bytes_per_cycle=DEFAULT.dram_bytes_per_cycle / 4,
                         dram_latency=4 * DEFAULT.dram_latency, tmu_latency=4 * DEFAULT.tmu_latency)
    assert e(spec, slow) > e(spec, DEFAULT)


def test_gemm_estimate_reads_the_uniform_stream_prefetch():
    spec, _ = matmul(256, 256, 256)
    e = registry.entry("matmul").estimate
    assert e(spec, DEFAULT.with_(uniform_prefetch_lines=0)) > e(spec, DEFAULT.with_(uniform_prefetch_lines=2))


def test_no_private_timing_constants_in_kernels():
    """The kernel modules hold no copy of the clock or the DRAM bandwidth."""
    from tvm_qpu.codegen.kernels import attention as a, conv, depthwise as d, gemm, pool, reduce as r, softmax as s
    for mod in (a, conv, d, gemm, pool, r, s):
        src = inspect.getsource(mod)
        for literal in ("960e6", "8.6", "4.0e9", "ESTIMATE_LAUNCH", "EST_"):
            assert literal not in src, f"{mod.__name__} keeps a private timing constant {literal!r}"


# ---- placement counts the launches a plan really makes ---------------------------------------
@pytest.mark.parametrize("spec,consts,launches", [
    (*matmul(1, 64, 64), 1),                               # M = 1 fp32: A is its own panel
    (*matmul(32, 64, 64), 2),                              # pack launch + GEMM
    (*conv2d(1, 4, 8, 8, 8, 3, 1), 2),                     # padding copy + GEMM
    (*conv2d(1, 4, 8, 8, 8, 3, 0), 1),                     # no padding: GEMM only
    (*reduction("reduce_max", (65536,), None), 2),         # segment pass + combine pass
], ids=lambda x: x.describe() if isinstance(x, OpSpec) else None)
def test_placement_counts_plan_launches(spec, consts, launches):
    from tvm_qpu import placement as PL
    rng = np.random.default_rng(0)
    arrays = {k: _random(v, spec.inputs[1][1], rng) for k, v in consts.items()}
    assert PL.plan_launches(spec, arrays) == launches
    per_launch = PL._v(PL.QPU_OVERHEAD, "launch")
    want = registry.estimate(spec) + PL.qpu_overhead_seconds(spec, arrays, 1) + (launches - 1) * per_launch
    assert PL.qpu_seconds(spec, arrays) == pytest.approx(want, rel=1e-12)


# ---- kinds whose launches are not split: they cannot reach the dispatch budget -----------------
#: how far below the dispatch budget an unsplit launch must be modelled at the largest size its
#: kernel accepts: the +-25% estimate tolerance, and the documented corner gaps (estimate /
#: emulated down to 0.56 under the structural alternative, CORNER_GAP_CASES: 1 / 0.56 = 1.79)
UNSPLIT_MARGIN = 2.0
#: the largest float32 elements softmax, layer_norm and the elementwise kernels take: their
#: 24-bit address arithmetic refuses tensors of 16 MiB or more (check_limits of each)
_LIMIT = (1 << 24) // 4 - 4096


def _at_limit():
    """Shapes at the 16 MiB limit over the row lengths that change each kernel's structure
    (a worker per row of 16 .. one row of 4 Mi elements: one worker streams it all)."""
    out = []
    for n in (16, 1000, 4096, 65536, 1 << 20, _LIMIT):
        rows = max(1, min(0xFFFF, _LIMIT // n))
        out += [softmax(rows, n), layer_norm(rows, n)]
    out += [add(_LIMIT, activation="relu"), add(_LIMIT, "int32"), gelu(_LIMIT), gelu(_LIMIT, "tanh"),
            bias_gelu(_LIMIT // 4096, 4096), bias_gelu(_LIMIT // 4096, 4096, "gelu_tanh")]
    return out


def test_unsplit_kinds_cannot_reach_the_dispatch_budget():
    """softmax, layer_norm and the elementwise kernels run as one launch: proved safe instead of
    split. Their kernels refuse tensors of 16 MiB or more (a tensor twice the size is refused
    here too), and at the limit, over the row lengths that change their structure, every one
    is modelled at most budget / UNSPLIT_MARGIN under the default model, both corners and the
    structural alternative (the largest is one 4 Mi-element row on one worker, ~45 ms)."""
    from tvm_qpu import placement as PL
    from tvm_qpu.codegen.kernels.common import dispatch_budget_seconds
    budget = dispatch_budget_seconds()
    models = [DEFAULT] + DEFAULT.band_models()
    for spec, _ in _at_limit():
        assert spec.kind not in PL.SPLIT_KINDS
        assert registry.supports(spec)[0], spec.describe()
        e = registry.entry(spec.kind).estimate
        worst = max(e(spec, m) for m in models)
        assert worst * UNSPLIT_MARGIN <= budget, f"{spec.describe()}: {worst * 1e3:.1f} ms"
    for spec, _ in (softmax(2, _LIMIT), layer_norm(2, _LIMIT), add(2 * _LIMIT), gelu(2 * _LIMIT)):
        ok = registry.supports(spec)[0]
        if ok:
            with pytest.raises(ValueError, match="24-bit"):
                registry.generate(spec, {})


@pytest.mark.slow
def test_attention_launches_besides_its_gemms_cannot_reach_the_dispatch_budget():
    """The attention plans' launches other than their GEMMs (split by gemm.split_rows / split_pack,
    the fused kernel by batch entries) are packs, a transpose and a softmax of tensors under
    16 MiB (the scores B x S x T through softmax's limit, K / V B x T x D through the panels'
    24-bit spans): at shapes at those limits each is modelled at most budget / UNSPLIT_MARGIN
    (the largest, the pack of a 16 MiB scores matrix, ~20 ms)."""
    from tvm_qpu.codegen.kernels.common import dispatch_budget_seconds
    budget = dispatch_budget_seconds()
    for B, S, T, D in ((1, 2047, 2048, 256), (1, 255, 16384, 128), (1, 16383, 256, 128), (1, 4, 65535, 8)):
        spec, _ = attention(B, S, T, D)
        plan = registry.generate(spec, {})
        ls = plan.attrs["launch_seconds"]
        assert len(ls) == len(plan.launches)
        others = [x for L, x in zip(plan.launches, ls) if L.name not in ("gemm", "attention")
                  and not L.name.startswith("gemm_rows")]
        assert others and max(others) * UNSPLIT_MARGIN <= budget, spec.describe()


def test_reduction_segment_pass_cannot_reach_the_dispatch_budget():
    """The segment pass of a reduction (rows of at least SEG_MIN_LEN elements, fewer than
    SEG_MAX_ROWS rows) is one launch, not split: reductions refuse tensors of 1 GiB or more, and
    at that limit the pass is modelled at most ~161 ms under the default model, both corners
    and the structural alternative: within the budget even were it the estimate tolerance
    slower (estimate / emulated >= 1 - TOLERANCE; the corner gaps of CORNER_GAP_CASES are
    lanes stages, not this pass)."""
    from tvm_qpu.codegen.kernels import reduce as RD
    from tvm_qpu.codegen.kernels.common import dispatch_budget_seconds
    budget = dispatch_budget_seconds()
    models = [DEFAULT] + DEFAULT.band_models()
    for dtype in ("float32", "int16", "int8"):
        n = ((1 << 30) - 64) // RD.ITEMSIZE[dtype]
        for K in (1, 12, 100, RD.SEG_MAX_ROWS - 1):
            R = n // K
            spec, _ = reduction("reduce_max", (K, R), (1,), dtype)
            assert registry.supports(spec)[0]
            S = RD.choose_segments(K, R, dtype)
            assert S
            worst = max(RD.stage_cycles(m, K * S, R // S, 1, dtype, True) / m.clock_hz for m in models)
            assert worst <= (1 - TOLERANCE) * budget, f"{spec.describe()}: {worst * 1e3:.0f} ms"
        assert not registry.supports(reduction("reduce_max", (2, n), (1,), dtype)[0])[0]
