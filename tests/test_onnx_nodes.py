"""The ONNX backend node tests shipped with the onnx package, through the qpu target.

Every node test case whose graph holds Conv, MaxPool, AveragePool, Gemm, MatMul, MatMulInteger,
ReduceMax, ReduceMin or Softmax (the single-op cases, and the function-body ``*_expanded`` cases of
other ops built from them: Softmax, LogSoftmax, DynamicQuantizeLinear, Attention, ...) is imported
with ``tvm_qpu.from_onnx``, built for ``target="qpu"`` with ``placement="all"`` (every pattern a real
kernel supports is offloaded), run on the embedded emulator, and compared with the case's expected
outputs. Each op of interest must run on the QPU unless ``expected_cpu`` says why not (and the
partition report gives that reason), so the suite cannot pass with everything on the CPU.

Variants (the test id says which):

* ``<case>``: the model as shipped;
* ``<case>[frozen]`` (Conv, Gemm, MatMulInteger): the weight / bias / zero-point graph inputs become
  initializers, as in an exported model. The QPU conv kernel packs its weights at compile time and
  the bias epilogue needs a constant, so only this form exercises them; the as-shipped form runs
  conv on the CPU.

Where TVM's ONNX importer needs a constant (ReduceMax/Min ``axes`` given as a graph input), the
axes input is turned into an initializer holding the case's value ("Only constant axes currently
supported"). Cases that cannot pass for reasons outside the QPU backend are ``xfail(strict=True)``
with the reason (``XFAIL``, ``XFAIL_IMPORT`` below).

Tolerance: integer outputs exactly; float outputs with the case's rtol/atol (1e-3 / 1e-7 for all
of these). The QPU's fp32 results (accumulation order, SFU exp2 / reciprocal + Newton step) are
within ~3e-7 relative of the expected data here; the pooling data were rounded to 4 decimals.

Runtime: about 150 cases; the cases of each XFAIL_IMPORT family are sampled (XFAIL_IMPORT_SAMPLE).
"""
from __future__ import annotations

import functools
from collections import Counter, defaultdict

import numpy as np
import pytest

pytest.importorskip("tvm")
onnx = pytest.importorskip("onnx")

import tvm_qpu  # noqa: E402

OPS = ("Conv", "MaxPool", "AveragePool", "Gemm", "MatMul", "MatMulInteger", "ReduceMax", "ReduceMin", "Softmax")
# op type -> registry kinds that count as "this op ran on the QPU"
KINDS = {"Conv": {"conv2d"}, "MaxPool": {"max_pool2d"}, "AveragePool": {"avg_pool2d"}, "Gemm": {"matmul"},
         "MatMul": {"matmul"}, "MatMulInteger": {"matmul"}, "ReduceMax": {"reduce_max"},
         "ReduceMin": {"reduce_min"}, "Softmax": {"softmax"}}
FREEZE_OPS = ("Conv", "Gemm", "MatMulInteger")   # ops whose [frozen] variant is also run

# Cases where an op of interest stays on the CPU: case name (or "name[variant]") -> text the partition
# report gives as the reason. Every other case must offload each of its ops of interest.
CPU_ONLY = {
    # the pool kernel unrolls one window: at most 16 taps
    "test_averagepool_2d_precomputed_pads": "25 taps per window",
    "test_averagepool_2d_precomputed_pads_count_include_pad": "25 taps per window",
    "test_averagepool_2d_strides": "25 taps per window",
    "test_maxpool_2d_precomputed_pads": "25 taps per window",
    "test_maxpool_2d_strides": "25 taps per window",
    "test_maxpool_2d_uint8": "dtype uint8 not supported",
    # GEMM kernel limit: batch dims [3, 1] x [1, 2] (only equal, or one side 1 as a whole)
    "test_matmul_bcast": "do not broadcast simply",
}
POOL_OPS = ("MaxPool", "AveragePool")


def expected_cpu(case, variant: str, op: str) -> str | None:
    """Why ``op`` of this case is expected on the CPU (a substring of the report's reason), or None."""
    key = f"{case.name}[{variant}]" if variant else case.name
    if key in CPU_ONLY:
        return CPU_ONLY[key]
    if op in POOL_OPS and len(case.data_sets[0][0][0].shape) != 4:
        return "no QPU pattern for this op"            # 1-D / 3-D pooling: the QPU pools 2-D NCHW only
    if op == "Conv" and variant != "frozen":
        return "weight is not a compile-time constant"  # the conv kernel packs constant weights
    return None


# case name -> reason (strict xfail: the case must fail, for this reason)
_BOOL = "TVM cannot reduce bool tensors (InternalError: Cannot decide {} for bool)"
_EMPTY = ("empty-set reduction: TVM's importer makes the 0-length axis symbolic and its CPU reduction "
          "returns 0, not the identity {}")
XFAIL = {
    "test_maxpool_with_argmax_2d_precomputed_pads": "TVM's ONNX importer does not support MaxPool's Indices output",
    "test_maxpool_with_argmax_2d_precomputed_strides":
        "TVM's ONNX importer does not support MaxPool's Indices output",
    "test_reduce_max_bool_inputs": _BOOL.format("min_value"),
    "test_reduce_min_bool_inputs": _BOOL.format("max_value"),
    "test_reduce_max_empty_set": _EMPTY.format("-inf"),
    "test_reduce_min_empty_set": _EMPTY.format("+inf"),
    "test_reduce_max_empty_set_bool": _BOOL.format("min_value"),
}


# Expanded function bodies TVM's ONNX importer cannot import (case-name prefix -> reason); each
# such case must fail with tvm_qpu.QpuError ("TVM's ONNX frontend cannot import it").
XFAIL_IMPORT = {
    "test_attention_": "TVM's ONNX importer: Shape-derived (ShapeExpr) inputs to Concat/Expand/Reshape "
                       "are not handled",
    "test_flexattention_": "TVM's ONNX importer: Shape-derived (ShapeExpr) inputs are not handled",
    "test_causal_conv_with_state_": "TVM's ONNX importer: Shape-derived (ShapeExpr) inputs are not handled",
    "test_affine_grid_": "TVM's ONNX importer: Constant with a value_* attribute other than a tensor "
                         "('no value in Constant')",
}


def _xfail_marks(name: str) -> list:
    if name in XFAIL:
        return [pytest.mark.xfail(strict=True, reason=XFAIL[name])]
    for prefix, why in XFAIL_IMPORT.items():
        if name.startswith(prefix):
            return [pytest.mark.xfail(strict=True, raises=tvm_qpu.QpuError, reason=why)]
    return []


@functools.lru_cache(maxsize=1)
def _cases() -> dict:
    import warnings
    from onnx.backend.test.loader import load_node_model_tests
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        allc = load_node_model_tests()
    out = {}
    for c in allc:
        ops = {n.op_type for n in c.model.graph.node}
        if not ops & set(OPS):
            continue
        out[c.name] = c
    return out


#: cases run per XFAIL_IMPORT prefix: the importer fails all of them the same way (121 cases, about
#: a fifth of this file's time); the first few in name order keep the strict xfail that says when
#: a TVM upgrade imports them
XFAIL_IMPORT_SAMPLE = 2


def _params() -> list:
    ps = []
    seen = Counter()
    for name, c in sorted(_cases().items()):
        ops = {n.op_type for n in c.model.graph.node}
        prefix = next((p for p in XFAIL_IMPORT if name.startswith(p)), None)
        importable = prefix is None
        if prefix is not None:
            seen[prefix] += 1
            if seen[prefix] > XFAIL_IMPORT_SAMPLE:
                continue
        variants = [""] + (["frozen"] if ops & set(FREEZE_OPS) and importable else [])
        for v in variants:
            ps.append(pytest.param(name, v, id=f"{name}[{v}]" if v else name, marks=_xfail_marks(name)))
    return ps


def _to_initializer(model, name: str, value: np.ndarray):
    g = model.graph
    keep = [i for i in g.input if i.name != name]
    del g.input[:]
    g.input.extend(keep)
    g.initializer.append(onnx.numpy_helper.from_array(np.asarray(value), name))


def prepare(case, variant: str):
    """(ModelProto, {run-time input name: array}, [expected outputs]) for one case and variant."""
    model = onnx.ModelProto()
    model.CopyFrom(case.model)
    inputs, outputs = case.data_sets[0]
    names = [i.name for i in model.graph.input]
    values = dict(zip(names, inputs))
    frozen = set()
    for node in model.graph.node:
        if node.op_type in ("ReduceMax", "ReduceMin") and len(node.input) > 1 and node.input[1] in values:
            frozen.add(node.input[1])                       # axes: TVM's importer needs a constant
        if variant == "frozen" and node.op_type in FREEZE_OPS:
            frozen.update(n for n in node.input[1:] if n in values)
    for n in frozen:
        _to_initializer(model, n, values[n])
    feed = {n: v for n, v in values.items() if n not in frozen}
    return model, feed, list(outputs)


def run_case(case, variant: str, tmp_path):
    """Build for qpu (placement="all"), save the artifact, load it on the emulator and run it.
    Returns (outputs, lib)."""
    model, feed, _ = prepare(case, variant)
    path = tmp_path / "model.onnx"
    onnx.save(model, str(path))
    mod, params = tvm_qpu.from_onnx(path)
    lib = tvm_qpu.build(mod, target="qpu", placement="all", params=params)
    runner = tvm_qpu.load(lib.save(tmp_path / "model.tar"), device="emulator")
    try:
        got = runner.run(**feed)
    finally:
        runner.close()
    return got, lib


# op type -> (cases run, cases with that op offloaded); filled by the tests, checked at the end
_OFFLOADED: dict = defaultdict(Counter)


@pytest.mark.parametrize("name,variant", _params())
def test_node(name, variant, tmp_path):
    case = _cases()[name]
    _, _, want = prepare(case, variant)
    got, lib = run_case(case, variant, tmp_path)
    kinds = {r.info.kind for r in lib.regions}
    outs = [o.name for o in case.model.graph.output]
    assert list(got) == outs
    for o, w in zip(outs, want):
        g = got[o]
        assert g.shape == w.shape, f"{o}: shape {g.shape} != {w.shape}\n{lib.report.text()}"
        assert g.dtype == w.dtype, f"{o}: dtype {g.dtype} != {w.dtype}"
        if w.dtype.kind in "iub":
            np.testing.assert_array_equal(g, w, err_msg=f"{o}\n{lib.report.text()}")
        else:
            np.testing.assert_allclose(g, w, rtol=case.rtol, atol=case.atol, err_msg=f"{o}\n{lib.report.text()}")
    for op in {n.op_type for n in case.model.graph.node} & set(OPS):
        on_qpu = bool(kinds & KINDS[op])
        _OFFLOADED[op]["cases"] += 1
        _OFFLOADED[op]["qpu"] += on_qpu
        why = expected_cpu(case, variant, op)
        if why is None:
            assert on_qpu, f"{op} was not offloaded\n{lib.report.text()}"
        else:
            assert not on_qpu, f"{op} is now offloaded: update CPU_ONLY\n{lib.report.text()}"
            reasons = " | ".join(c["reason"] for c in lib.report.cpu_ops)
            assert why in reasons, f"{op} stays on the CPU for another reason than {why!r}: {reasons}"


def test_int32_matmul_beyond_24_bits_stays_exact(tmp_path):
    """Regression: an int32 x int32 MatMul (run-time operands) was offloaded, and the QPU's integer
    multiply (smul24: the low 24 bits of each operand) silently gave wrong products. Such operands
    now stay on the CPU; MatMulInteger's ``x - zero_point`` (provably 9-bit) is still offloaded, as
    int16 (test_matmulinteger above)."""
    from onnx import TensorProto, helper
    g = helper.make_graph([helper.make_node("MatMul", ["a", "b"], ["c"])], "int32_matmul",
                          [helper.make_tensor_value_info("a", TensorProto.INT32, [4, 8]),
                           helper.make_tensor_value_info("b", TensorProto.INT32, [8, 5])],
                          [helper.make_tensor_value_info("c", TensorProto.INT32, [4, 5])])
    path = tmp_path / "m.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)]), str(path))
    mod, params = tvm_qpu.from_onnx(path)
    lib = tvm_qpu.build(mod, target="qpu", placement="all", params=params)
    assert not lib.regions, lib.report.text()
    assert "24-bit bound" in lib.report.cpu_ops[0]["reason"], lib.report.text()
    rng = np.random.default_rng(0)
    a = rng.integers(-2**30, 2**30, (4, 8)).astype(np.int32)
    b = rng.integers(-3, 4, (8, 5)).astype(np.int32)
    runner = lib.runner("emulator")
    try:
        got = runner.run(a=a, b=b)["c"]
    finally:
        runner.close()
    want = ((a.astype(np.int64) @ b.astype(np.int64) + 2**31) % 2**32 - 2**31).astype(np.int32)
    np.testing.assert_array_equal(got, want)


def test_every_op_is_offloaded_somewhere():
    """Runs after the parametrized cases (file order): each op type ran on the QPU at least once."""
    ran = [op for op in OPS if _OFFLOADED[op]["cases"]]
    if not ran:
        pytest.skip("no node case ran (selected alone)")
    missing = [op for op in ran if _OFFLOADED[op]["qpu"] == 0]
    assert not missing, f"never offloaded: {missing}; counts {dict(_OFFLOADED)}"
