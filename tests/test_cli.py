"""The installed ``tvmc`` console script (subprocess): compile / run / partition and every error
path (one line on stderr, non-zero exit, no traceback). One in-process test drives the QPU path
with the test doubles."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tvm")

import qpu_doubles as D  # noqa: E402

MODELS = Path(__file__).resolve().parent.parent / "models"
TVMC = shutil.which("tvmc")
pytestmark = pytest.mark.skipif(TVMC is None, reason="tvmc console script not installed (pip install -e .)")


def tvmc(*args, cwd=None):
    return subprocess.run([TVMC, *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=300)


def _ort(name, x):
    ort = pytest.importorskip("onnxruntime")
    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(str(MODELS / f"{name}.onnx"), so,
                                providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]


def _assert_one_line_error(p, *needles):
    assert p.returncode != 0, p.stdout
    err = [l for l in p.stderr.splitlines() if l.strip() and "Warning" not in l]
    assert len(err) == 1, p.stderr
    assert err[0].startswith("tvmc: error: ") and "Traceback" not in p.stderr
    for n in needles:
        assert n in err[0], err[0]


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    out = {}
    for target in ("qpu", "llvm"):
        p = tvmc("compile", "--target", target, MODELS / "digits_cnn.onnx", "-o", d / f"{target}.tar")
        assert p.returncode == 0, p.stderr
        assert f"target {target}" in p.stdout
        out[target] = d / f"{target}.tar"
    return d, out


@pytest.mark.parametrize("target", ["qpu", "llvm"])
def test_compile_and_run_with_inputs(compiled, target):
    d, arts = compiled
    x = np.load(MODELS / "digits_test.npz")["x"][3:4]
    np.savez(d / "in.npz", input=x)
    p = tvmc("run", arts[target], "--inputs", d / "in.npz", "--outputs", d / f"out_{target}.npz", "--print-top", "3")
    assert p.returncode == 0, p.stderr
    with np.load(d / f"out_{target}.npz") as z:
        got = z["logits"]
    want = _ort("digits_cnn", x)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)
    top = int(np.argmax(want))
    assert f"[{top}]" in p.stdout.splitlines()[1]


def test_run_print_time_profile_fill_mode(compiled):
    _, arts = compiled
    p = tvmc("run", arts["qpu"], "--fill-mode", "zeros", "--print-time", "--profile", "--repeat", "3",
             "--device", "emulator")
    assert p.returncode == 0, p.stderr
    assert "mean inference time:" in p.stdout and "per inference (mean of 3)" in p.stdout


def test_partition_explains(tmp_path):
    p = tvmc("partition", MODELS / "transformer_layer.onnx", "--explain")
    assert p.returncode == 0, p.stderr
    assert "placement: cost" in p.stdout and "QPU regions:" in p.stdout
    assert "relax.nn.layer_norm" in p.stdout and "no QPU pattern" in p.stdout
    assert "fp32_gemm_peak" in p.stdout                                  # the cost table
    p = tvmc("partition", MODELS / "mlp.onnx", "--qpu-placement", "none")
    assert p.returncode == 0 and "placement=none" in p.stdout


def test_input_shapes_flag(tmp_path):
    p = tvmc("compile", "--target", "llvm", MODELS / "digits_cnn_batch.onnx", "-o", tmp_path / "b.tar",
             "--input-shapes", "input:[5,1,8,8]")
    assert p.returncode == 0, p.stderr
    p = tvmc("run", tmp_path / "b.tar", "--outputs", tmp_path / "o.npz")
    assert p.returncode == 0, p.stderr
    with np.load(tmp_path / "o.npz") as z:
        assert z["logits"].shape == (5, 10)


@pytest.mark.skipif(shutil.which("aarch64-linux-gnu-gcc") is None, reason="gcc-aarch64-linux-gnu not installed")
def test_cross_compile_pi5(tmp_path):
    p = tvmc("compile", "--target", "qpu", "--target-host", "pi5", MODELS / "mlp.onnx", "-o", tmp_path / "pi.tar")
    assert p.returncode == 0, p.stderr
    from tvm_qpu.artifact import read_artifact
    lib = read_artifact(tmp_path / "pi.tar").files["lib.so"]
    assert lib[:4] == b"\x7fELF" and int.from_bytes(lib[18:20], "little") == 183     # EM_AARCH64
    if not sys.platform.startswith("linux") or __import__("platform").machine() == "aarch64":
        return
    _assert_one_line_error(tvmc("run", tmp_path / "pi.tar"), "built for aarch64")


def test_missing_cross_compiler_is_a_clear_error(monkeypatch):
    import tvm_qpu
    from tvm_qpu import api
    monkeypatch.setattr(api.shutil, "which", lambda name: None)
    mod, params = tvm_qpu.from_onnx(MODELS / "mlp.onnx")
    with pytest.raises(tvm_qpu.QpuError, match="apt-get install gcc-aarch64-linux-gnu"):
        tvm_qpu.build(mod, target_host="pi5", params=params)


@pytest.mark.parametrize("args, needle", [
    (["compile", "{tmp}/missing.onnx"], "no such file"),
    (["compile", "{bad_onnx}"], "not a valid ONNX model"),
    (["compile", "--target", "cuda", "{mlp}"], "unknown target 'cuda'"),
    (["compile", "{mlp}", "--input-shapes", "input:[1,x]"], "bad --input-shapes"),
    (["compile", "{mlp}", "--input-shapes", "input1,64"], "bad --input-shapes"),
    (["compile", "{mlp}", "--input-shapes", "other:[1,64]"], "unknown input"),
    (["compile", "{mlp}", "--target-host", "sparc"], "unknown target host"),
    (["compile", "{mlp}", "--qpu-placement", "some"], "invalid choice"),
    (["compile", "{mlp}", "--rpc-key", "pi"], "not implemented"),
    (["partition", "{tmp}/missing.onnx"], "no such file"),
    (["run", "{tmp}/missing.tar"], "no such file"),
    (["run", "{bad_onnx}"], "not a readable tvm-qpu artifact"),
    (["run", "{llvm_art}", "--inputs", "{tmp}/missing.npz"], "no such file"),
    (["run", "{llvm_art}", "--inputs", "{bad_npz}"], "not a readable .npz"),
    (["run", "{llvm_art}", "--inputs", "{wrong_name_npz}"], "unknown input"),
    (["run", "{llvm_art}", "--inputs", "{wrong_shape_npz}"], "shape [1, 64] given"),
    (["run", "{llvm_art}", "--inputs", "{wrong_dtype_npz}"], "dtype int32 given"),
    (["run", "{corrupt_art}"], "checksum mismatch"),
    (["run", "{llvm_art}", "--port", "9090"], "--port needs --hostname"),
])
def test_error_paths(compiled, tmp_path, args, needle):
    d, arts = compiled
    bad_onnx = tmp_path / "bad.onnx"
    bad_onnx.write_bytes(b"not an onnx model at all")
    bad_npz = tmp_path / "bad.npz"
    bad_npz.write_bytes(b"PK nonsense")
    x = np.zeros((1, 1, 8, 8), np.float32)
    np.savez(tmp_path / "wn.npz", data=x)
    np.savez(tmp_path / "ws.npz", input=np.zeros((1, 64), np.float32))
    np.savez(tmp_path / "wd.npz", input=x.astype(np.int32))
    raw = bytearray(arts["llvm"].read_bytes())
    with __import__("tarfile").open(arts["llvm"]) as t:
        m = t.getmember("lib.so")
    raw[m.offset_data + m.size // 2] ^= 0x55
    (tmp_path / "corrupt.tar").write_bytes(bytes(raw))
    subst = dict(tmp=tmp_path, bad_onnx=bad_onnx, mlp=MODELS / "mlp.onnx", llvm_art=arts["llvm"], bad_npz=bad_npz,
                 wrong_name_npz=tmp_path / "wn.npz", wrong_shape_npz=tmp_path / "ws.npz",
                 wrong_dtype_npz=tmp_path / "wd.npz", corrupt_art=tmp_path / "corrupt.tar")
    p = tvmc(*[a.format(**subst) for a in args], cwd=tmp_path)
    _assert_one_line_error(p, needle)


def test_qpu_path_in_process_with_doubles(tmp_path, monkeypatch, capsys):
    """tvmc compile --qpu-placement all + tvmc run --profile, QPU regions served by the doubles."""
    from tvm_qpu import cli, executor
    D.install(monkeypatch)
    dev = D.DoubleDevice()
    monkeypatch.setattr(executor, "open_qpu_device", lambda device: dev)
    art = tmp_path / "q.tar"
    assert cli.main(["compile", "--target", "qpu", "--qpu-placement", "all", str(MODELS / "digits_cnn.onnx"),
                     "-o", str(art)]) == 0
    assert "5 QPU region(s)" in capsys.readouterr().out
    x = np.load(MODELS / "digits_test.npz")["x"][:1]
    np.savez(tmp_path / "in.npz", input=x)
    assert cli.main(["run", str(art), "--inputs", str(tmp_path / "in.npz"), "--outputs", str(tmp_path / "o.npz"),
                     "--profile", "--repeat", "2"]) == 0
    out = capsys.readouterr().out
    assert "qpu.conv2d_bias_relu" in out and "5 QPU region(s)" in out
    with np.load(tmp_path / "o.npz") as z:
        np.testing.assert_allclose(z["logits"], _ort("digits_cnn", x), rtol=0, atol=1e-4)
    assert dev.executions >= 5
