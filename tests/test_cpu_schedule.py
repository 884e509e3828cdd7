"""tvm_qpu.cpu_schedule: every scheduled op computes what numpy / onnxruntime compute, the tile
choices keep tiles rectangular, and a rule that fails falls back to the next one (no timing here)."""
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import tvm_qpu
from tvm_qpu import cpu_schedule as cs


def _target(spec="llvm"):
    return cs.host_target(spec)


def _run_te(func, arrays):
    import tvm
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


@pytest.mark.parametrize("m,k,n", [(128, 768, 256), (7, 13, 5), (1, 512, 1000), (49, 4608, 24)])
def test_matmul_rule_matches_numpy(m, k, n):
    f = _matmul_func(m, k, n)
    new, rule = cs.schedule_func(f, _target())
    assert rule == "tiled-reduction" and new is not None
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((m, k), np.float32), rng.standard_normal((k, n), np.float32)
    got = _run_te(new, [a, b, np.zeros((m, n), np.float32)])
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
    assert cs._linear_coef(x * two + r, x) == 2 and cs._linear_coef(x * two + r, r) == 1
    assert cs._linear_coef(y + r - x, y) == 1
    assert cs._linear_coef(tirx.FloorMod(x, two) + r, x) is None     # flattened rows: not linear
    assert cs._linear_coef(x * r, x) is None                          # no constant coefficient
    assert cs._linear_coef(y + r, x) is None
