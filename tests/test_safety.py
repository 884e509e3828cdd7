"""Out-of-range gather / scatter indices in model inputs: a clear error, never a crash.

TVM's Gather (``take`` in "fast" mode) and the element / N-d gathers and scatters do not check
their indices: an out-of-range index made ``tvmc run`` die with SIGSEGV (exit 139). The accepted
and refused index values are checked against ONNX Runtime (which validates every index), and the
end-to-end run happens in a subprocess, so a segfault fails the test instead of killing pytest.
"""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from tvm_qpu import safety  # noqa: E402

TABLE = np.arange(20, dtype=np.float32).reshape(5, 4)


def _model(path, nodes, inputs, outputs, inits=()):
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(n, t, s) for n, t, s in inputs],
                          [helper.make_tensor_value_info(n, t, s) for n, t, s in outputs], list(inits))
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


# op -> (nodes, model inputs (name, type, shape), outputs, fixed feeds besides the index input)
I64, F32 = TensorProto.INT64, TensorProto.FLOAT
CASES = {
    "Gather": ([helper.make_node("Gather", ["table", "idx"], ["y"], axis=0)],
               [("idx", I64, [3])], [("y", F32, [3, 4])], {}),
    "GatherElements": ([helper.make_node("GatherElements", ["x", "idx"], ["y"], axis=1)],
                       [("idx", I64, None), ("x", F32, [5, 4])], [("y", F32, [5, 3])], {"x": TABLE}),
    "GatherND": ([helper.make_node("GatherND", ["table", "idx"], ["y"])],
                 [("idx", I64, [3, 2])], [("y", F32, [3])], {}),
    "ScatterND": ([helper.make_node("ScatterND", ["x", "idx", "upd"], ["y"])],
                  [("idx", I64, [3, 1]), ("x", F32, [5, 4]), ("upd", F32, [3, 4])], [("y", F32, [5, 4])],
                  {"x": TABLE, "upd": np.ones((3, 4), np.float32)}),
}
# index shapes per op (GatherElements: indices [5, 3] over x [5, 4] along axis 1)
IDX_SHAPE = {"Gather": (3,), "GatherElements": (5, 3), "GatherND": (3, 2), "ScatterND": (3, 1)}


def build_case(tmp_path, op):
    nodes, inputs, outputs, feeds = CASES[op]
    inputs = [(n, t, list(IDX_SHAPE[op]) if n == "idx" else s) for n, t, s in inputs]
    path = _model(str(tmp_path / f"{op}.onnx"), nodes, inputs, outputs,
                  [numpy_helper.from_array(TABLE, "table")])
    return path, feeds


def candidates(op):
    """Index arrays with one edge value each: the valid extremes and the first invalid ones."""
    shape = IDX_SHAPE[op]
    sizes = {"Gather": [5], "GatherElements": [4], "GatherND": [5, 4], "ScatterND": [5]}[op]
    out = []
    for comp, n in enumerate(sizes):
        for v in (-n - 1, -n, -1, 0, n - 1, n, 10 ** 9, -10 ** 12):
            a = np.zeros(shape, np.int64)
            if op == "ScatterND":               # distinct rows (ScatterND needs unique indices)
                a[:, 0] = [2, 1, 3]
            if len(sizes) > 1:
                a[1, comp] = v
            else:
                a.reshape(-1)[1] = v
            out.append(a)
    return out


@pytest.mark.parametrize("op", sorted(CASES))
def test_checks_accept_exactly_what_onnxruntime_accepts(tmp_path, op):
    import tvm_qpu
    path, feeds = build_case(tmp_path, op)
    mod, _ = tvm_qpu.from_onnx(path)
    checks = safety.index_checks(mod)
    assert [c["input"] for c in checks] == ["idx"] and checks[0]["op"] == op
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    for idx in candidates(op):
        if op == "ScatterND" and len(set(idx[:, 0] % 5)) < 3:
            continue                            # duplicate rows: ORT's own rule, not a range question
        try:
            sess.run(None, {"idx": idx, **feeds})
            ort_ok = True
        except Exception:
            ort_ok = False
        try:
            safety.check_inputs(checks, {"idx": idx, **feeds})
            ours_ok = True
        except safety.IndexRangeError as e:
            ours_ok = False
            assert "'idx'" in str(e) and "outside the valid range" in str(e) and op in str(e)
        assert ours_ok == ort_ok, (op, idx.tolist())


def test_safe_take_modes_and_computed_indices_need_no_check():
    from tvm.script import ir as I
    from tvm.script import relax as R

    @I.ir_module
    class Mod:
        @R.function
        def main(x: R.Tensor((5, 4), "float32"), i: R.Tensor((3,), "int64")):
            R.func_attr({"num_input": 2})
            with R.dataflow():
                a = R.take(x, i, axis=0, mode="clip")              # bounded by its mode
                j = R.multiply(i, R.const(2, "int64"))
                b = R.take(x, j, axis=0)                           # computed index: not an input
                k = R.astype(i, "int32")
                c = R.take(x, k, axis=1)                           # the input, cast: checked
                out = (a, b, c)
                R.output(out)
            return out

    checks = safety.index_checks(Mod)
    assert checks == [{"input": "i", "op": "Gather", "sizes": [4], "negative_ok": False}]
    with pytest.raises(safety.IndexRangeError, match=r"holds index -1 at position \[2\].*valid range 0\.\.3"):
        safety.check_inputs(checks, {"i": np.array([0, 3, -1])})


def test_tvmc_run_out_of_range_index_is_a_clear_error(tmp_path):
    """End to end, in a subprocess: before, tvmc run died with SIGSEGV (exit 139)."""
    path, _ = build_case(tmp_path, "Gather")
    art = tmp_path / "g.tar"
    tvmc = [sys.executable, "-m", "tvm_qpu.cli"]
    p = subprocess.run([*tvmc, "compile", "--target", "llvm", path, "-o", art], capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr
    good, bad = tmp_path / "good.npz", tmp_path / "bad.npz"
    np.savez(good, idx=np.array([4, -5, 0], np.int64))
    np.savez(bad, idx=np.array([0, 10 ** 8, 1], np.int64))
    p = subprocess.run([*tvmc, "run", art, "--inputs", good, "--outputs", tmp_path / "out.npz"],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    with np.load(tmp_path / "out.npz") as z:
        np.testing.assert_array_equal(z["y"], TABLE[[4, -5, 0]])
    p = subprocess.run([*tvmc, "run", art, "--inputs", bad], capture_output=True, text=True, timeout=300)
    assert p.returncode == 1, (p.returncode, p.stderr[-2000:])          # 139 was the segfault
    err = [l for l in p.stderr.splitlines() if l.startswith("tvmc: error:")]
    assert len(err) == 1 and "input 'idx' holds index 100000000 at position [1]" in err[0], p.stderr
    assert "valid range -5..4 of the Gather" in err[0] and "Traceback" not in p.stderr
