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


def _stderr_lines(p):
    return [l for l in p.stderr.splitlines() if l.strip() and "Warning" not in l]


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
    assert "mean inference time:" in p.stdout and "per inference (mean of 3)" in p.stdout and "over 3 runs" in p.stdout
    assert "measured on the x86_64 host that ran it" in p.stdout or "aarch64" in p.stdout                       # every figure says what it is
    assert _stderr_lines(p) == []                                # no status line when not a terminal


def test_partition_explains(tmp_path):
    p = tvmc("partition", MODELS / "transformer_layer.onnx", "--explain")
    assert p.returncode == 0, p.stderr
    assert "placement: cost" in p.stdout and "QPU regions:" in p.stdout
    assert "relax.nn.layer_norm" in p.stdout and "no QPU pattern" in p.stdout
    assert "fp32_gemm_peak" in p.stdout                                  # the cost table
    p = tvmc("partition", MODELS / "mlp.onnx", "--qpu-placement", "none")
    assert p.returncode == 0 and "placement=none" in p.stdout


def test_input_shapes_flag_and_print_top_per_batch_row(tmp_path):
    p = tvmc("compile", "--target", "llvm", MODELS / "digits_cnn_batch.onnx", "-o", tmp_path / "b.tar",
             "--input-shapes", "input:[5,1,8,8]")
    assert p.returncode == 0, p.stderr
    x = np.load(MODELS / "digits_test.npz")["x"][:5]
    np.savez(tmp_path / "in.npz", input=x)
    p = tvmc("run", tmp_path / "b.tar", "--inputs", tmp_path / "in.npz", "--outputs", tmp_path / "o.npz",
             "--print-top", "2")
    assert p.returncode == 0, p.stderr
    with np.load(tmp_path / "o.npz") as z:
        assert z["logits"].shape == (5, 10)
    assert not (tmp_path / "o.npz.npz").exists()
    want = _ort("digits_cnn_batch", x)
    lines = p.stdout.splitlines()
    for b in range(5):                                  # ranked within each batch row
        i = lines.index(f"logits[{b}]: top 2")
        order = np.argsort(-want[b], kind="stable")[:2]
        assert [l.split("]")[0].strip() for l in lines[i + 1: i + 3]] == [f"[{k}" for k in order]


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
    (["compile", "{mlp}", "--rpc-key", "pi"], "unrecognized arguments: --rpc-key"),
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


@pytest.mark.parametrize("args, needle", [
    (["compile", "{mlp}", "-o", "{mlp}"], "is the input model: refusing to overwrite it"),
    (["compile", "{mlp}", "-o", "{mlp_link}"], "is the input model: refusing to overwrite it"),
    (["compile", "{mlp}", "--sign-key", "{tmp}/missing.key"], "cannot read signing key"),
    (["run", "{llvm_art}", "--print-top", "-3"], "--print-top: must be at least 1, got -3"),
    (["run", "{llvm_art}", "--print-top", "0"], "--print-top: must be at least 1"),
    (["run", "{llvm_art}", "--print-time", "--repeat", "0"], "--repeat: must be at least 1, got 0"),
    (["run", "{llvm_art}", "--repeat", "2"], "--repeat applies to --print-time / --profile"),
    (["run", "{llvm_art}", "--outputs", "{tmp}/out.txt"], "must end in .npz"),
    (["run", "{llvm_art}", "--outputs", "{tmp}/nodir/o.npz"], "no such folder"),
    (["run", "{llvm_art}", "--outputs", "{llvm_art}"], "must end in .npz"),
    (["run", "{llvm_art}", "--inputs", "{good_npz}", "--outputs", "{good_npz}"], "is --inputs: refusing"),
    (["run", "{llvm_art}", "--trusted-key", "{tmp}/missing.pub"], "cannot read trusted key"),
    (["run", "{llvm_art}", "--hostname", "h", "--rpc-timeout", "0"], "--rpc-timeout: must be positive"),
])
def test_bad_arguments_are_refused_untouched(compiled, tmp_path, capsys, args, needle):
    """Refused arguments (in-process: cli.main is what the console script runs): one line, usage
    errors exit 2, others 1, and nothing is written or overwritten."""
    from tvm_qpu import cli
    d, arts = compiled
    shutil.copy(MODELS / "mlp.onnx", tmp_path / "mlp.onnx")
    (tmp_path / "link.onnx").symlink_to(tmp_path / "mlp.onnx")
    np.savez(tmp_path / "good.npz", input=np.zeros((1, 1, 8, 8), np.float32))
    subst = dict(tmp=tmp_path, mlp=tmp_path / "mlp.onnx", mlp_link=tmp_path / "link.onnx",
                 llvm_art=arts["llvm"], good_npz=tmp_path / "good.npz")
    watched = (tmp_path / "mlp.onnx", arts["llvm"], tmp_path / "good.npz")
    before = {f: f.read_bytes() for f in watched}
    code = cli.main([a.format(**subst) for a in args])
    err = [l for l in capsys.readouterr().err.splitlines() if l.strip()]
    assert len(err) == 1 and err[0].startswith("tvmc: error: ") and needle in err[0], err
    assert code == (cli.EXIT_USAGE if "must be at least" in needle or "must be positive" in needle
                    else cli.EXIT_ERROR)
    assert all(f.read_bytes() == b for f, b in before.items())         # refused means untouched
    assert not list(tmp_path.glob("*.npz.npz")) and not (tmp_path / "out.txt").exists()


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


def test_version_and_help_for_every_option():
    from importlib import metadata
    from tvm_qpu import __version__, cli
    p = tvmc("--version")
    assert p.returncode == 0
    assert f"tvm-qpu {__version__}" in p.stdout and f"apache-tvm {metadata.version('apache-tvm')}" in p.stdout
    ap = cli.build_parser()
    subs = next(a for a in ap._actions if a.dest == "cmd").choices
    assert set(subs) == {name for name, *_ in cli.SUBCOMMANDS}
    for name, sp in [("tvmc", ap), *subs.items()]:
        for a in sp._actions:
            if a.dest not in ("help", "cmd"):
                assert a.help and a.help.strip(), f"{name} {a.option_strings or a.dest} has no help"
    assert not any("rpc" in a.dest or a.dest in ("hostname", "port") for a in subs["compile"]._actions)


def test_emulated_profile_is_labelled_and_no_pi_hint_names_the_flag(tmp_path):
    import tvm_qpu
    mod, params = tvm_qpu.from_onnx(MODELS / "mlp.onnx")
    tvm_qpu.build(mod, placement="all", params=params).save(tmp_path / "m.tar")
    p = tvmc("run", tmp_path / "m.tar", "--device", "emulator", "--print-time", "--profile", "--repeat", "2")
    assert p.returncode == 0, p.stderr
    out = p.stdout
    assert "over 2 runs (wall time, measured on the" in out and "QPU regions emulated" in out
    assert "QPU time per inference (modelled):" in out and "QPU time, modelled" in out
    assert "QPU modelled" in out and "columns: QPU modelled = Pi 5 QPU time from the emulator's cycle model" in out
    assert _stderr_lines(p) == []
    from tvm_qpu.runtime import v3d
    if v3d.find_render_node() is not None:
        return
    p = tvmc("run", tmp_path / "m.tar", "--device", "v3d")
    _assert_one_line_error(p, "no V3D device found", "--device emulator")
    assert "open_device(" not in p.stderr and "RuntimeError" not in p.stderr


class _BlockingDevice(D.DoubleDevice):
    """A double whose first execute() blocks until interrupt() (like a long emulated region)."""
    kind = "blocking"

    def __init__(self):
        super().__init__()
        import threading
        self.started, self.stop, self.block = threading.Event(), threading.Event(), True

    def execute(self, *a, **k):
        if self.block:
            self.started.set()
            assert self.stop.wait(20), "never interrupted"
            self.block = False
            from tvm_qpu.runtime.device import DeviceError
            raise DeviceError("stopped")
        if self.stop.is_set():                                # like the emulator's stop flag
            from tvm_qpu.runtime.device import DeviceError
            raise DeviceError("still told to stop")
        return super().execute(*a, **k)

    def interrupt(self, stop=True):
        (self.stop.set if stop else self.stop.clear)()


@pytest.mark.usefixtures("sigint_default")
def test_interrupt_stops_the_region_and_the_runner_recovers(monkeypatch):
    """Ctrl-C (interrupt_main) while a region runs: the device is told to stop, Runner.run raises
    KeyboardInterrupt (not TVM's RuntimeError), and the next run works again."""
    import _thread
    import threading
    import tvm_qpu
    D.install(monkeypatch)
    mod, params = tvm_qpu.from_onnx(MODELS / "digits_cnn.onnx")
    lib = tvm_qpu.build(mod, placement="all", params=params)
    dev = _BlockingDevice()
    runner = lib.runner(device=dev)
    x = np.load(MODELS / "digits_test.npz")["x"][:1]
    t = threading.Thread(target=lambda: dev.started.wait(20) and _thread.interrupt_main())
    t.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            runner.run(input=x)
        t.join()
        got = runner.run(input=x)["logits"]                   # the stop flag is cleared for it
    finally:
        runner.close()
    np.testing.assert_allclose(got, _ort("digits_cnn", x), rtol=0, atol=1e-4)


def test_device_errors_in_regions_keep_their_type(monkeypatch):
    import tvm_qpu
    from tvm_qpu.runtime.device import DeviceError

    class Failing(D.DoubleDevice):
        def execute(self, *a, **k):
            raise DeviceError("the GPU is on fire")
    D.install(monkeypatch)
    mod, params = tvm_qpu.from_onnx(MODELS / "mlp.onnx")
    runner = tvm_qpu.build(mod, placement="all", params=params).runner(device=Failing())
    try:
        with pytest.raises(DeviceError, match="the GPU is on fire"):
            runner.run(input=np.zeros((1, 64), np.float32))
    finally:
        runner.close()


def test_status_line_only_on_a_terminal(monkeypatch):
    import io
    from tvm_qpu import progress

    class Tty(io.StringIO):
        def isatty(self):
            return True
    monkeypatch.delenv(progress.ENV, raising=False)
    pipe, tty = io.StringIO(), Tty()
    for stream in (pipe, tty):
        line = progress.StatusLine(stream)
        line.phase = "timed run 2/3"
        line.update("emulating 0 s", started=__import__("time").perf_counter())   # too early: nothing
        line.update("emulating 5 s", started=0.0)
        line.clear()
    assert pipe.getvalue() == ""
    assert tty.getvalue() == "\rtimed run 2/3: emulating 5 s\x1b[K\r\x1b[K"
    monkeypatch.setenv(progress.ENV, "0")
    assert not progress.StatusLine(Tty()).enabled
    monkeypatch.setenv(progress.ENV, "1")
    forced = io.StringIO()
    progress.StatusLine(forced).update("emulating 5 s", started=0.0)
    assert forced.getvalue() == "emulating 5 s\n"
    assert not progress.current().enabled                     # outside a status_line(): silent


def test_auto_repeat_fits_emulation():
    from tvm_qpu.api import AUTO_REPEAT, AUTO_REPEAT_SECONDS, auto_repeat
    assert auto_repeat(0.001) == AUTO_REPEAT
    assert auto_repeat(AUTO_REPEAT_SECONDS / 4) == 4
    assert auto_repeat(35.0) == 1


def test_signed_compile_and_trusted_run(tmp_path, capsys):
    """keygen -> compile --sign-key -> run --trusted-key (in-process cli.main)."""
    pytest.importorskip("cryptography")
    from tvm_qpu import cli

    def tvmc_in(*argv):
        code = cli.main([str(a) for a in argv])
        out, err = capsys.readouterr()
        return code, out, err

    for stem in ("me", "other"):
        code, out, err = tvmc_in("keygen", tmp_path / stem)
        assert code == 0 and "key id" in out, err
    assert (tmp_path / "me.key").stat().st_mode & 0o777 == 0o600
    code, _, err = tvmc_in("keygen", tmp_path / "me")
    assert code == 1 and "refusing to overwrite" in err
    code, out, err = tvmc_in("compile", "--target", "llvm", MODELS / "mlp.onnx", "-o", tmp_path / "s.tar",
                             "--sign-key", tmp_path / "me.key")
    assert code == 0 and ", signed" in out, err
    code, out, err = tvmc_in("run", tmp_path / "s.tar", "--trusted-key", tmp_path / "other.pub",
                             "--trusted-key", tmp_path / "me.pub")
    assert code == 0 and "float32" in out, err
    code, _, err = tvmc_in("run", tmp_path / "s.tar", "--trusted-key", tmp_path / "other.pub")
    assert code == 1 and "not a trusted key" in err and err.count("\n") == 1
    code, _, err = tvmc_in("compile", "--target", "llvm", MODELS / "mlp.onnx", "-o", tmp_path / "t.tar",
                           "--sign-key", tmp_path / "me.pub")
    assert code == 1 and "not an unencrypted PEM private key" in err
    assert not (tmp_path / "t.tar").exists()


def _big_matmul(path, n):
    """An ONNX MatMul [n, n] x constant [n, n]: one QPU region that emulates for seconds."""
    from onnx import TensorProto, helper, numpy_helper, save
    w = numpy_helper.from_array(np.random.default_rng(0).random((n, n), np.float32), "w")
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "big",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [n, n])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [n, n])], [w])
    save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(path))


@pytest.mark.usefixtures("sigint_default")
def test_ctrl_c_interrupts_emulation(tmp_path):
    """SIGINT while a QPU region is being emulated: exit 130 with 'interrupted', no traceback, promptly
    (the communicate() timeout bounds it; the emulator stops within one scheduling quantum)."""
    import os
    import signal
    import tvm_qpu
    _big_matmul(tmp_path / "big.onnx", 384)
    mod, params = tvm_qpu.from_onnx(tmp_path / "big.onnx")
    lib = tvm_qpu.build(mod, placement="all", params=params)
    assert [r.info.kind for r in lib.regions] == ["matmul"]
    lib.save(tmp_path / "big.tar")
    env = dict(os.environ, TVM_QPU_PROGRESS="1")          # status lines on a pipe: we wait for one
    proc = subprocess.Popen([TVMC, "run", str(tmp_path / "big.tar"), "--device", "emulator", "--print-time",
                             "--repeat", "100"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)
    try:
        seen = []
        for line in proc.stderr:                          # progress: "... qpu.matmul: emulating 1 s"
            seen.append(line)
            if "emulating" in line:
                break
        assert any("QPU region 1/1 qpu.matmul" in l for l in seen), seen
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err
    assert "tvmc: interrupted" in err and "Traceback" not in err and "RuntimeError" not in err
    assert "mean inference time" not in out


def test_demo_says_the_qpu_is_emulated_and_the_placement_forced(capsys):
    """python -m tvm_qpu demo: the QPU's figures are labelled modelled, the wall times measured here
    with the QPU emulated, and the forced --qpu-placement all is said."""
    from tvm_qpu import __main__ as demo
    assert demo.main(["demo", "--count", "2", "--device", "emulator"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("QPU: EMULATED.") and "MODELLED Pi 5 QPU times" in out and "MEASURED on this" in out
    assert "forced by this demo" in out and "--qpu-placement all" in out
    assert "QPU time per inference (modelled):" in out and "with the QPU regions emulated" in out
    assert "(QPU regions emulated)" in out and "qpu vs llvm: 2/2 same class" in out
