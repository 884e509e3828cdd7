"""tvm_qpu.cpu_schedule: every scheduled op computes what numpy / onnxruntime compute, the tile
choices keep tiles rectangular, and a rule that fails falls back to the next one (no timing here)."""
import re

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import tvm_qpu
from tvm_qpu import cpu_schedule as cs


def _target(spec="llvm"):
    return cs.host_target(spec)


def _run_te(func, arrays, lowering=True):
    import contextlib
    import tvm
    with cs.lowering_context() if lowering else contextlib.nullcontext():
        lib = tvm.tirx.build(func.with_attr("global_symbol", "main"), target=_target())
    args = [tvm.runtime.tensor(a) for a in arrays]
    lib["main"](*args)
    return args[-1].numpy()


def _matmul_func(m, k, n):
    from tvm import te
    a = te.placeholder((m, k), name="A")
    b = te.placeholder((k, n), name="B")
    r = te.reduce_axis((0, k), name="k")
    c = te.compute((m, n), lambda i, j: te.sum(a[i, r] * b[r, j], axis=r), name="C")
    return te.create_prim_func([a, b, c])


# (49, 4608, 64): partial last row tile (49 = 8 x 6 + 1) with K-blocking; (50, 64, 128) without;
# (13, 300, 32): 2 column blocks are too few tasks for a serial row loop: dividing tiles
# (128, 768, 96) / (50, 768, 48): long reductions, 3-vector tiles where 24 columns divide them
@pytest.mark.parametrize("m,k,n", [(128, 768, 256), (7, 13, 5), (1, 512, 1000), (49, 4608, 24),
                                   (49, 4608, 64), (50, 64, 128), (13, 300, 32), (128, 768, 96),
                                   (50, 768, 48)])
def test_matmul_rule_matches_numpy(m, k, n):
    f = _matmul_func(m, k, n)
    new, rule = cs.schedule_func(f, _target())
    assert rule == "tiled-reduction" and new is not None
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((m, k), np.float32), rng.standard_normal((k, n), np.float32)
    got = _run_te(new, [a, b, np.zeros((m, n), np.float32)])
    np.testing.assert_allclose(got, a.astype(np.float64) @ b, rtol=1e-4, atol=1e-3)


def test_tile_sizes_with_a_partial_tile():
    # AVX2 (8 lanes, 12 accumulators): 49 rows divide only as 7 x 1 vector; a partial tile allows 6 x 2
    assert cs._tile_sizes(512, [49], 8, 12) == (8, 7)
    assert cs._tile_sizes(512, [49], 8, 12, remainder=True) == (16, 6)
    assert cs._tile_sizes(512, [48], 8, 12, remainder=True) == (16, 6)      # divides: no partial tile
    assert cs._tile_sizes(512, [3], 8, 12, remainder=True) == (16, 3)       # fewer rows than the cap
    assert cs._tile_sizes(512, [7, 7], 8, 12, remainder=True) == (8, 7)     # rectangles: never partial
    # 3 vectors (BERT's 128 tokens x 768 / 3072 features): 4 x 3 accumulators where 2 give 4 x 2
    assert cs._tile_sizes(768, [128], 8, 12, max_vectors=3) == (24, 4)
    assert cs._tile_sizes(512, [128], 8, 12, max_vectors=3) == (16, 4)      # 24 does not divide 512
    # the rule: 3 vectors only for a K-blocked reduction (768 x 16 floats outgrow the panel)
    for k, wide in ((768, True), (96, False)):
        new, _ = cs.schedule_func(_matmul_func(128, k, 96), _target())
        assert ("T.unroll(3)" in new.script()) == wide, k


def _lowered_loops(func, lowering):
    """[(extent, kind, has an if inside)] of every loop of ``func`` lowered through LoopPartition."""
    import contextlib
    import tvm
    from tvm import s_tir, tirx
    S, T = s_tir.transform, tirx.transform
    passes = [S.LowerInitBlock(), S.PlanAndUpdateBufferAllocationLocation(), S.ConvertBlocksToOpaque(),
              S.CompactBufferAllocation(), S.LowerMatchBuffer(), S.LowerOpaqueBlock(), T.FlattenBuffer(),
              S.LoopPartition(), T.StmtSimplify()]
    mod = tvm.IRModule({"main": func.with_attr("global_symbol", "main").with_attr("target", _target())})
    with cs.lowering_context() if lowering else contextlib.nullcontext():
        body = tvm.transform.Sequential(passes)(mod)["main"].body
    return [(int(f.extent) if isinstance(f.extent, tirx.IntImm) else None, int(f.kind),
             bool(_nodes(f.body, tirx.IfThenElse))) for f in _nodes(body, tirx.For)]


def _nodes(tree, kind):
    import tvm_ffi
    found = []
    tvm_ffi.structural_map(tree, (kind, lambda n: found.append(n) or n))
    return found


@pytest.mark.parametrize("m,k,n", [(49, 4608, 64), (50, 64, 128)])
def test_partial_tile_is_peeled_off_the_full_ones(m, k, n):
    new, _ = cs.schedule_func(_matmul_func(m, k, n), _target())
    from tvm import tirx
    assert "T.likely" in new.script()               # the partial tile's rows are bounds-checked
    # the row tile's loops (6 rows, unrolled: init, FMAs, write-back) and whether they check bounds
    tile_loops = lambda lowering: [has_if for ext, kind, has_if in _lowered_loops(new, lowering)  # noqa: E731
                                   if ext == 6 and kind == int(tirx.ForKind.UNROLLED)]
    assert tile_loops(True) and not all(tile_loops(True))    # full tiles peeled off: no check there
    assert tile_loops(False) and all(tile_loops(False))      # not partitioned: every tile checks rows
    rng = np.random.default_rng(7)                  # and the unpartitioned code is correct too
    a, b = rng.standard_normal((m, k), np.float32), rng.standard_normal((k, n), np.float32)
    got = _run_te(new, [a, b, np.zeros((m, n), np.float32)], lowering=False)
    np.testing.assert_allclose(got, a.astype(np.float64) @ b, rtol=1e-4, atol=1e-3)


def test_row_tiles_stay_rectangular():
    # fused (n, h, w) = (450, 4, 4): 12 rows would straddle images (the bug this rule prevents)
    opts = cs._row_options([450, 4, 4])
    assert 12 not in opts and {1, 2, 4, 8, 16, 32, 48} <= set(opts)
    assert cs._row_options([7, 7]) == [1, 7, 49]


def test_vector_width_from_target():
    from tvm_qpu.api import PI5_TARGET
    pi5 = _target(dict(PI5_TARGET))
    assert cs.vector_bits(pi5) == 128 and cs.vector_lanes(pi5) == 4
    assert cs.accumulator_budget(pi5) == 28                      # 32 NEON registers
    new, rule = cs.schedule_func(_matmul_func(64, 64, 64), pi5)   # the pi5 build gets the same rules
    assert rule == "tiled-reduction" and "T.vectorized(8)" in new.script()   # 2 x 4 fp32 lanes
    import tvm
    assert cs.vector_bits(tvm.target.Target({"kind": "llvm"})) == 128   # generic x86-64: SSE2


class _Boom(cs._Rule):
    name = "boom"

    def apply(self, func, target):
        raise RuntimeError("refused on this shape")


def test_failing_rule_falls_back_to_the_next():
    f = _matmul_func(5, 7, 3)                                    # odd shape
    new, rule = cs.schedule_func(f, _target(), rules=[_Boom(), cs.ParallelOuter()])
    assert rule == "parallel-outer"
    new2, rule2 = cs.schedule_func(f, _target(), rules=[_Boom()])
    assert (new2, rule2) == (None, None)                         # nothing applies: TVM's default
    rng = np.random.default_rng(1)
    a, b = rng.standard_normal((5, 7), np.float32), rng.standard_normal((7, 3), np.float32)
    np.testing.assert_allclose(_run_te(new, [a, b, np.zeros((5, 3), np.float32)]), a @ b, rtol=1e-5, atol=1e-5)


def _onnx_model(tmp_path, nodes, inits, x_shape, y_shape, name):
    g = helper.make_graph(nodes, name, [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, y_shape)],
                          initializer=[numpy_helper.from_array(v, k) for k, v in inits.items()])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    p = tmp_path / f"{name}.onnx"
    onnx.save(m, p)
    return p


def _ort(path, x):
    import onnxruntime as ort
    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return s.run(None, {"x": x})[0]


def _check(path, x, atol=1e-4):
    mod, params = tvm_qpu.from_onnx(path)
    lib = tvm_qpu.build(mod, target="llvm", params=params)
    r = lib.runner()
    got = next(iter(r.run(x=x).values()))
    r.close()
    want = _ort(path, x)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=atol)
    return lib.meta["cpu_schedules"]


def test_conv_depthwise_pool_ops_match_onnxruntime(tmp_path):
    rng = np.random.default_rng(2)
    w = rng.standard_normal((16, 8, 3, 3)).astype(np.float32) * 0.2
    dw = rng.standard_normal((16, 1, 3, 3)).astype(np.float32) * 0.3
    b = rng.standard_normal(16).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("Conv", ["r", "dw"], ["d"], kernel_shape=[3, 3], pads=[1, 1, 1, 1], group=16),
             helper.make_node("Add", ["d", "r"], ["s"]),
             helper.make_node("MaxPool", ["s"], ["p"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]),
             helper.make_node("AveragePool", ["p"], ["y"], kernel_shape=[2, 2], strides=[1, 1])]
    p = _onnx_model(tmp_path, nodes, {"w": w, "dw": dw, "b": b}, [1, 8, 15, 13], [1, 16, 3, 3], "convs")
    rules = _check(p, rng.standard_normal((1, 8, 15, 13)).astype(np.float32))
    assert "tiled-reduction" in rules.values()


def test_softmax_layernorm_gelu_match_onnxruntime(tmp_path):
    rng = np.random.default_rng(3)
    d = 24
    w = rng.standard_normal((d, d)).astype(np.float32) * 0.2
    nodes = [helper.make_node("MatMul", ["x", "w"], ["m"]),
             helper.make_node("Softmax", ["m"], ["s"], axis=-1),
             helper.make_node("Erf", ["s"], ["e"]),
             helper.make_node("Mul", ["e", "m"], ["g"]),
             helper.make_node("LayerNormalization", ["g", "gamma", "beta"], ["y"], axis=-1)]
    inits = {"w": w, "gamma": np.ones(d, np.float32), "beta": np.zeros(d, np.float32)}
    p = _onnx_model(tmp_path, nodes, inits, [3, 17, d], [3, 17, d], "tail")
    _check(p, rng.standard_normal((3, 17, d)).astype(np.float32))


def _unary_func(fn, n):
    from tvm import te
    x = te.placeholder((n,), name="x")
    y = te.compute((n,), lambda i: fn(x[i]), name="y")
    return te.create_prim_func([x, y])


def _sigmoid(v):
    import math
    return 1.0 / (1.0 + math.exp(-v)) if v > -700 else 0.0


# (intrinsic, Python reference, inputs with a finite reference result, max abs error, max rel error)
_FAST_MATH_CASES = [
    ("erf", __import__("math").erf, (-10.0, 10.0), 5e-7, None),
    ("exp", __import__("math").exp, (-87.0, 88.3), None, 1e-6),
    ("tanh", __import__("math").tanh, (-20.0, 20.0), None, 1e-6),
    ("sigmoid", _sigmoid, (-80.0, 80.0), None, 1e-6),
]
# at +-inf: the limits
_FAST_MATH_INF = {"erf": (1.0, -1.0), "exp": (np.inf, 0.0), "tanh": (1.0, -1.0), "sigmoid": (1.0, 0.0)}


@pytest.mark.parametrize("name,ref,span,atol,rtol", _FAST_MATH_CASES, ids=[c[0] for c in _FAST_MATH_CASES])
def test_fast_math_matches_python_math(name, ref, span, atol, rtol):
    import math
    from tvm import tirx
    n = 1 << 16
    f = cs.fast_math(_unary_func(getattr(tirx, name), n))
    assert f"T.{name}(" not in f.script()                      # replaced by the approximation
    sch, _ = cs.schedule_func(_unary_func(getattr(tirx, name), n), _target())
    assert f"T.{name}(" not in sch.script() and "T.vectorized" in sch.script()
    rng = np.random.default_rng(4)
    special = np.array([np.nan, np.inf, -np.inf, 0.0, -0.0, 1e-30, -1e-30], np.float32)
    x = np.concatenate([np.linspace(*span, n // 4), rng.standard_normal(n // 4) * 3,
                        rng.standard_normal(n - n // 2 - special.size) * 0.1, special]).astype(np.float32)
    got = _run_te(sch, [x, np.zeros(n, np.float32)]).astype(np.float64)
    want = np.array([ref(float(v)) if math.isfinite(v) else math.nan for v in x])
    fin = np.isfinite(x)
    err = np.abs(got[fin] - want[fin])
    if atol is not None:
        assert err.max() <= atol
    if rtol is not None:
        nz = want[fin] != 0
        assert (err[nz] / np.abs(want[fin][nz])).max() <= rtol and np.all(err[~nz] == 0)
    s = got[-special.size:]
    assert np.isnan(s[0])                                       # NaN stays NaN
    assert (s[1], s[2]) == _FAST_MATH_INF[name]
    assert s[3] == ref(0.0) and s[4] == ref(-0.0)
    assert np.signbit(s[4]) == np.signbit(ref(-0.0))


def test_gelu_epilogue_is_inlined_and_matches_onnxruntime(tmp_path):
    # BERT's FFN up-projection: MatMul + bias + exact GELU, x * 0.5 * (1 + erf(x / sqrt 2))
    rng = np.random.default_rng(5)
    k, n = 64, 96
    w = rng.standard_normal((k, n)).astype(np.float32) * 0.5
    b = rng.standard_normal(n).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["m"]), helper.make_node("Add", ["m", "b"], ["h"]),
             helper.make_node("Div", ["h", "sqrt2"], ["d"]), helper.make_node("Erf", ["d"], ["e"]),
             helper.make_node("Add", ["e", "one"], ["e1"]), helper.make_node("Mul", ["h", "e1"], ["g"]),
             helper.make_node("Mul", ["g", "half"], ["y"])]
    inits = {"w": w, "b": b, "sqrt2": np.array(np.sqrt(2.0), np.float32), "one": np.array(1.0, np.float32),
             "half": np.array(0.5, np.float32)}
    p = _onnx_model(tmp_path, nodes, inits, [1, 32, k], [1, 32, n], "gelu")
    rules = _check(p, rng.standard_normal((1, 32, k)).astype(np.float32))
    fused = [f for f, r in rules.items() if "erf" in f]
    assert fused and all(rules[f] == "tiled-reduction" for f in fused)   # erf fused into the matmul
    mod, params = tvm_qpu.from_onnx(p)
    from tvm import relax
    mod = cs.legalized(relax.transform.BindParams("main", params)(mod), _target())
    f = next(fn for gv, fn in mod.functions_items() if gv.name_hint == fused[0])
    sch, _ = cs.schedule_func(f, _target())
    text = sch.script()
    assert "T.erf(" not in text
    blocks = re.findall(r'^\s+with T\.sblock\("(\w+)"\)', text, re.M)
    # the constant weights' packing (run at compile time), init, update, write-back with the GELU
    assert len(blocks) == 4 and text.count(cs.PREPACK) == 1, blocks


@pytest.mark.parametrize("op,attrs,shape,rule", [
    ("Softmax", {"axis": -1}, [2, 3, 40, 128], "row-reduction"),    # rows of 128: vector partials
    ("Softmax", {"axis": 1}, [2, 5, 6, 16], "dlight.cpu.Reduction"),  # not over the innermost axis
    ("LayerNormalization", {"axis": -1}, [4, 33, 200], "row-reduction"),  # 200 = 25 x 8 lanes
    ("ReduceMean", {"axes": [-1], "keepdims": 1}, [3, 7, 96], "row-reduction"),  # keepdims unit axis
])
def test_row_reductions_match_onnxruntime(tmp_path, op, attrs, shape, rule):
    rng = np.random.default_rng(6)
    d = shape[-1]
    inits, ins = {}, ["x"]
    if op == "LayerNormalization":
        inits = {"g": rng.standard_normal(d).astype(np.float32), "b": rng.standard_normal(d).astype(np.float32)}
        ins = ["x", "g", "b"]
    if op == "ReduceMean":      # x - mean(x): a reduction, a broadcast of its keepdims result
        nodes = [helper.make_node("ReduceMean", ["x"], ["m"], **attrs), helper.make_node("Sub", ["x", "m"], ["y"])]
    else:
        nodes = [helper.make_node(op, ins, ["y"], **attrs)]
    p = _onnx_model(tmp_path, nodes, inits, shape, shape, op.lower())
    x = (rng.standard_normal(shape) * 4 + 1).astype(np.float32)
    rules = _check(p, x, atol=2e-4)
    assert list(rules.values()) == [rule], rules


def test_reduction_lanes_balance_vector_and_scalar_steps():
    assert cs._reduction_lanes(128, 8) == 16         # 8 vector steps + 16 partials
    assert cs._reduction_lanes(768, 8) == 32
    assert cs._reduction_lanes(24, 8) == 8
    assert cs._reduction_lanes(8, 8) is None and cs._reduction_lanes(100, 8) is None

def _depthwise_model(tmp_path, c, hw, stride, dilation, mult=1, residual=False, name="dw"):
    """Depthwise 3x3 conv (+ bias, ReLU6 as Clip, optional residual add) as ONNX."""
    rng = np.random.default_rng(4)
    w = (rng.standard_normal((c * mult, 1, 3, 3)) * 0.4).astype(np.float32)
    b = rng.standard_normal(c * mult).astype(np.float32)
    pad = dilation
    out_hw = (hw + 2 * pad - 2 * dilation - 1) // stride + 1
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["d"], kernel_shape=[3, 3], strides=[stride, stride],
                              pads=[pad] * 4, dilations=[dilation, dilation], group=c),
             helper.make_node("Clip", ["d", "lo", "hi"], ["y" if not residual else "r"])]
    if residual:
        nodes.append(helper.make_node("Add", ["r", "x"], ["y"]))
    inits = {"w": w, "b": b, "lo": np.array(0, np.float32), "hi": np.array(6, np.float32)}
    p = _onnx_model(tmp_path, nodes, inits, [1, c, hw, hw], [1, c * mult, out_hw, out_hw], name)
    return p, rng.standard_normal((1, c, hw, hw)).astype(np.float32) * 3


@pytest.mark.parametrize("c,hw,stride,dilation,residual", [
    (32, 15, 1, 1, True),      # odd size: pixel tile 5 / 3, residual add in the epilogue
    (48, 14, 2, 1, False),     # stride 2 (MobileNetV2's down-sampling blocks)
    (16, 9, 1, 2, False),      # dilation 2
    (64, 7, 1, 1, False),      # 7x7 maps, many channels (MobileNetV2's last blocks)
    (64, 28, 1, 1, True),      # enough work for the parallel row loop (MIN_PARALLEL_WORK)
])
def test_depthwise_rule_matches_onnxruntime(tmp_path, c, hw, stride, dilation, residual):
    p, x = _depthwise_model(tmp_path, c, hw, stride, dilation, residual=residual)
    rules = _check(p, x)
    assert "depthwise-conv" in rules.values()
    # ReLU6 (ONNX Clip, imported as TIR max / min and turned into Relax ops by backend.canonicalize)
    # runs channels-last in the conv's epilogue: no NCHW clip between transposes
    assert all("conv2d" in f for f in rules if "maximum" in f or "minimum" in f)
    assert sum("transpose" in f for f in rules) == 2        # NCHW <-> NHWC at the graph's input / output only


def test_depthwise_rule_declines_what_it_does_not_tile(tmp_path):
    # 12 channels (not a multiple of the 4 / 8 SIMD lanes) and a channel multiplier of 2 (each input
    # channel read by two outputs): the tiled-reduction rule takes them, results unchanged
    for c, mult in ((12, 1), (8, 2)):
        p, x = _depthwise_model(tmp_path, c, 10, 1, 1, mult=mult, name=f"dw{c}x{mult}")
        rules = _check(p, x)
        assert "depthwise-conv" not in rules.values() and "tiled-reduction" in rules.values()


@pytest.mark.parametrize("batch,k,stride,dilation,pad", [(1, 3, (2, 2), 2, 2), (2, 5, (1, 2), 1, (2, 1, 2, 3))])
def test_depthwise_geometry_and_schedule_match_numpy(batch, k, stride, dilation, pad):
    # TE's own NHWC depthwise conv (padding block, strides, dilation, batch > 1, 5x5 window,
    # asymmetric padding) vs a numpy loop over the window
    from tvm import s_tir, te, topi
    c, h = 16, 17
    x = te.placeholder((batch, h, h, c), name="x")
    w = te.placeholder((k, k, 1, c), name="w")
    y = topi.nn.group_conv2d_nhwc(x, w, stride=stride, padding=pad, dilation=dilation, groups=c)
    f = te.create_prim_func([x, w, y])
    sch = s_tir.Schedule(f)
    main = [b for b in sch.get_child_blocks(sch.get_sblock("root")) if not cs._injective(sch, b)][0]
    geo = cs._depthwise_geometry(sch, main)
    assert geo is not None and (geo["stride"], geo["dilation"]) == (stride[0], dilation)
    new, rule = cs.schedule_func(f, _target())
    assert rule == "depthwise-conv"
    rng = np.random.default_rng(5)
    a, kw = rng.standard_normal((batch, h, h, c), np.float32), rng.standard_normal((k, k, 1, c), np.float32)
    oh, ow = (int(v) for v in y.shape[1:3])
    got = _run_te(new, [a, kw, np.zeros((batch, oh, ow, c), np.float32)])
    top, left, bottom, right = (pad, pad, pad, pad) if isinstance(pad, int) else pad
    ap = np.pad(a.astype(np.float64), ((0, 0), (top, bottom), (left, right), (0, 0)))
    want = np.zeros(got.shape)
    for i in range(k):
        for j in range(k):
            r0, c0 = i * dilation, j * dilation
            want += ap[:, r0:r0 + stride[0] * (oh - 1) + 1:stride[0], c0:c0 + stride[1] * (ow - 1) + 1:stride[1], :] * kw[i, j, 0]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_depthwise_rule_int8_accumulates_exactly():
    # int8 x int8 -> int32 (a quantized model's CPU leftover): exact, vs an int64 numpy reference
    from tvm import te, topi
    x = te.placeholder((1, 12, 12, 32), name="x", dtype="int8")
    w = te.placeholder((3, 3, 1, 32), name="w", dtype="int8")
    y = topi.nn.group_conv2d_nhwc(x, w, stride=1, padding=1, dilation=1, groups=32, out_dtype="int32")
    new, rule = cs.schedule_func(te.create_prim_func([x, w, y]), _target())
    assert rule == "depthwise-conv"
    rng = np.random.default_rng(6)
    a = rng.integers(-128, 128, (1, 12, 12, 32)).astype(np.int8)
    k = rng.integers(-128, 128, (3, 3, 1, 32)).astype(np.int8)
    got = _run_te(new, [a, k, np.zeros((1, 12, 12, 32), np.int32)])
    ap = np.pad(a.astype(np.int64), ((0, 0), (1, 1), (1, 1), (0, 0)))
    want = sum(ap[:, i:i + 12, j:j + 12, :] * k[i, j, 0].astype(np.int64) for i in range(3) for j in range(3))
    np.testing.assert_array_equal(got, want)

def _conv_residual_model(tmp_path, c, hw, oc, stride, name):
    """conv3x3 (+bias) + residual add + relu, the shape of a ResNet basic block's second half."""
    rng = np.random.default_rng(4)
    oh = (hw + 2 - 3) // stride + 1
    inits = {"w": rng.standard_normal((oc, c, 3, 3)).astype(np.float32) * 0.1,
             "b": rng.standard_normal(oc).astype(np.float32),
             "res": rng.standard_normal((1, oc, oh, oh)).astype(np.float32)}
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], kernel_shape=[3, 3], strides=[stride, stride],
                              pads=[1, 1, 1, 1]),
             helper.make_node("Add", ["c", "res"], ["s"]),
             helper.make_node("Relu", ["s"], ["y"])]
    return _onnx_model(tmp_path, nodes, inits, [1, c, hw, hw], [1, oc, oh, oh], name)


def _scheduled_conv(path):
    from tvm import relax, tirx
    mod, params = tvm_qpu.from_onnx(path)
    mod = relax.transform.BindParams("main", params)(mod)
    target = _target()
    mod = cs.legalized(mod, target)
    convs = [f for gv, f in mod.functions_items() if isinstance(f, tirx.PrimFunc) and "conv2d" in gv.name_hint]
    assert len(convs) == 1
    new, rule = cs.schedule_func(convs[0], target)
    assert rule == "tiled-reduction"
    return new.script()


@pytest.mark.parametrize("c,hw,oc,stride,flat,taps", [
    (32, 14, 16, 1, True, False),   # 196 pixels: 4 rows x 2 vectors only over the flattened (h, w)
    (16, 28, 16, 2, True, False),   # stride 2 down to 14 x 14, K-blocking (3 x 3 x 16 x 16 floats > panel)
    (32, 8, 16, 1, False, True),    # 8 x 8 rectangles, K-blocking: the 3 taps of a row share inputs
    (32, 16, 16, 2, False, True),   # stride 2 to 8 x 8: a row's first tap is its neighbour's last
    (8, 13, 16, 1, False, False),   # 13 x 13: no divisor of 169 beats the rectangles, 1-row tiles
    (8, 7, 24, 1, False, True),     # 7 x 7, 24 output channels (3 blocks of 8), no K-blocking
    (32, 9, 64, 1, True, False),    # 81 pixels, 4 channel blocks: 6 x 2 tiles, the last one partial
    (64, 14, 64, 2, True, False),   # 49 pixels, K-blocked: 6 x 2 tiles in a chunk of 9, one partial
])
def test_conv_row_tiles_match_onnxruntime(tmp_path, c, hw, oc, stride, flat, taps):
    p = _conv_residual_model(tmp_path, c, hw, oc, stride, f"conv{c}_{hw}_{oc}_{stride}")
    script = _scheduled_conv(p)
    # flattened rows: the accumulator cache is indexed by pixel number, not (h, w)
    oh = (hw + 2 - 3) // stride + 1
    assert (f"T.int64({oh * oh}), T.int64({oc})), scope=\"local\"" in script) == flat
    # shared taps: the kernel-width loop unrolled inside the input-channel loop
    assert ("rx in T.unroll(T.int64(3))" in script) == taps
    rng = np.random.default_rng(5)
    _check(p, rng.standard_normal((1, c, hw, hw)).astype(np.float32))


def _prepacked_module(path, bind=True):
    """The model's legalized module after the schedule pass and the prepacking passes, as the
    build's pipeline runs them; ``bind=False`` keeps the weights as inputs of ``main``."""
    import tvm
    from tvm import relax
    mod, params = tvm_qpu.from_onnx(path)
    if bind:
        mod = relax.transform.BindParams("main", params)(mod)
    target = _target()
    mod = cs.legalized(mod, target)
    with target:
        return mod, tvm.transform.Sequential([cs.schedule_pass(target)] + cs.prepack_passes())(mod)


def _call_args(mod, suffix):
    """[(callee name, args)] of main's call_tir calls whose callee ends with ``suffix``."""
    import tvm
    from tvm import relax
    call_tir, out = tvm.ir.Op.get("relax.call_tir"), []

    def visit(e):
        if isinstance(e, relax.Call) and e.op.same_as(call_tir) and e.args[0].name_hint.endswith(suffix):
            out.append((e.args[0].name_hint, list(e.args[1].fields)))
    relax.analysis.post_order_visit(mod["main"], visit)
    return out


def test_constant_weights_are_packed_per_output_block_at_compile_time(tmp_path):
    # a conv's constant weights are read from a copy packed per output-channel block of the
    # register tile, (O // vt, kh, kw, I, vt): the packing is split into a function of its own and
    # folded at compile time, so main calls the conv on the packed constant and nothing packs at run time
    import tvm
    p = _conv_residual_model(tmp_path, 64, 14, 64, 1, "prepack")
    w = numpy_helper.to_array(next(t for t in onnx.load(p).graph.initializer if t.name == "w"))  # (O, I, kh, kw)
    legal, mod = _prepacked_module(p)
    conv = next(gv.name_hint for gv in legal.get_global_vars() if "conv2d" in gv.name_hint)
    assert sorted(int(i) for i in legal[conv].attrs[cs.LAYOUT_FREE]) == [1, 2, 3]   # weights, bias, residual
    assert not _call_args(mod, "_weight_prepack")     # folded: no packing at run time,
    assert not [gv for gv in mod.get_global_vars() if gv.name_hint.endswith("_weight_prepack")]  # nor its code
    (name, args), = _call_args(mod, "_prepacked")
    assert name == conv + "_prepacked"
    packed = [a.value.numpy() for a in args if isinstance(a, tvm.ir.expr.Constant) and a.value.numpy().ndim == 5]
    assert len(packed) == 1
    vt = packed[0].shape[-1]
    assert packed[0].shape == (64 // vt, 3, 3, 64, vt) and 64 % vt == 0 and vt < 64
    want = w.reshape(64 // vt, vt, 64, 3, 3).transpose(0, 3, 4, 2, 1)   # [o // vt, kh, kw, i, o % vt]
    np.testing.assert_array_equal(packed[0], want)
    rng = np.random.default_rng(9)
    _check(p, rng.standard_normal((1, 64, 14, 14)).astype(np.float32))


def test_weights_given_at_run_time_are_not_packed(tmp_path):
    # weights that are inputs of main (not constants) keep their layout: packing them would cost a
    # copy on every call
    p = _conv_residual_model(tmp_path, 64, 14, 64, 1, "unbound")
    legal, mod = _prepacked_module(p, bind=False)
    conv = next(gv.name_hint for gv in legal.get_global_vars() if "conv2d" in gv.name_hint)
    attrs = legal[conv].attrs
    assert attrs is None or cs.LAYOUT_FREE not in attrs
    assert not _call_args(mod, "_prepacked") and not _call_args(mod, "_weight_prepack")
    assert cs.PREPACK not in mod[conv].script()


def test_constant_params_need_a_constant_at_every_call():
    # a function called with a constant weight at one site and a variable at another keeps it unpacked
    import tvm
    from tvm import relax, te
    a, b = te.placeholder((4, 8), name="a"), te.placeholder((8, 16), name="b")
    k = te.reduce_axis((0, 8), name="k")
    c = te.compute((4, 16), lambda i, j: te.sum(a[i, k] * b[k, j], axis=k), name="c")
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((4, 8), "float32"))
    wv = relax.Var("w", relax.TensorType((8, 16), "float32"))
    wc = relax.const(np.ones((8, 16), np.float32))
    with bb.function("main", [x, wv]):
        gv = bb.add_func(te.create_prim_func([a, b, c]), "mm")
        with bb.dataflow():
            y1 = bb.emit(relax.call_tir(gv, relax.Tuple([x, wc]), relax.TensorType((4, 16), "float32")))
            y2 = bb.emit(relax.call_tir(gv, relax.Tuple([x, wv]), relax.TensorType((4, 16), "float32")))
            y = bb.emit_output(relax.Tuple([y1, y2]))
        bb.emit_func_output(y)
    assert cs.constant_params(bb.get()) == {"mm": set()}
    with bb.function("one", [x]):
        with bb.dataflow():
            y = bb.emit_output(relax.call_tir(gv, relax.Tuple([x, wc]), relax.TensorType((4, 16), "float32")))
        bb.emit_func_output(y)
    mod = bb.get()
    del mod["main"]
    assert cs.constant_params(mod) == {"mm": {1}}


def test_pointwise_conv_rows_flatten_past_its_unit_window(tmp_path):
    # a 1x1 conv (MobileNetV2's 14 x 14 x 96 -> 576): the kernel window's extent-1 iters are dropped
    # when the pixels merge, else the accumulator cache's reindex refused them and 7 x 1 rectangles
    # served; now 196 pixels take 6 x 2 tiles with a partial last one
    rng = np.random.default_rng(8)
    inits = {"w": rng.standard_normal((64, 24, 1, 1)).astype(np.float32) * 0.2,
             "b": rng.standard_normal(64).astype(np.float32)}
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], kernel_shape=[1, 1]),
             helper.make_node("Clip", ["c", "lo", "hi"], ["y"])]
    inits.update(lo=np.array(0, np.float32), hi=np.array(6, np.float32))
    p = _onnx_model(tmp_path, nodes, inits, [1, 24, 14, 14], [1, 64, 14, 14], "pointwise")
    script = _scheduled_conv(p)
    assert 'T.int64(196), T.int64(64)), scope="local"' in script and "T.likely" in script
    _check(p, rng.standard_normal((1, 24, 14, 14)).astype(np.float32) * 3)


def test_flattened_rows_rebuild_the_output_indices():
    # a 2 x 3 x 4 output as 6 pixels x 4 channels: each pixel's (h, w) comes back from its number
    from tvm import s_tir, te, tirx
    a = te.placeholder((2, 3, 5), name="A")
    wt = te.placeholder((5, 4), name="W")
    r = te.reduce_axis((0, 5), name="k")
    c = te.compute((2, 3, 4), lambda h, w, f: te.sum(a[h, w, r] * wt[r, f], axis=r), name="C")
    sch = s_tir.Schedule(te.create_prim_func([a, wt, c]))
    blk = sch.get_sblock("C")
    cs._flatten_rows(sch, blk, [0, 1], [2, 3, 4, 5])
    ivs = sch.get(blk).iter_vars
    assert [int(iv.dom.extent) for iv in ivs] == [6, 4, 5]
    rng = np.random.default_rng(6)
    x, y = rng.standard_normal((2, 3, 5), np.float32), rng.standard_normal((5, 4), np.float32)
    got = _run_te(sch.mod["main"], [x, y, np.zeros((2, 3, 4), np.float32)])
    np.testing.assert_allclose(got, np.einsum("hwk,kf->hwf", x, y), rtol=1e-5, atol=1e-5)


def test_linear_coefficient_of_an_index():
    from tvm import tirx
    x, r, y = (tirx.Var(n, "int64") for n in "xry")
    two = tirx.IntImm("int64", 2)
    assert cs._linear_coeff(x * two + r, x) == 2 and cs._linear_coeff(x * two + r, r) == 1
    assert cs._linear_coeff(y + r - x, y) == 1
    assert cs._linear_coeff(tirx.FloorMod(x, two) + r, x) is None     # flattened rows: not linear
    assert cs._linear_coeff(x * r, x) is None                          # no constant coefficient
    assert cs._linear_coeff(y + r, x) == 0                             # x absent: coefficient 0
