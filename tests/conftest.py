"""Shared test configuration: the golden corpus, the --runslow option, the device fixture."""
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
#: the golden V3D 7.1 corpus (instruction words and rejected texts; provenance in its README.md)
GOLDEN = REPO / "tests" / "data" / "golden"


def pytest_configure(config):
    """Under pytest-xdist, warm numba's cache of the emulator core in the controller before the
    workers start: a cold cache costs about a minute of compilation, which every worker would
    otherwise pay at once (and race to write)."""
    if getattr(config.option, "numprocesses", None) and not hasattr(config, "workerinput"):
        warm_emulator()


def warm_emulator():
    """Run a tiny copy kernel on the emulator: compiles (or loads from numba's cache) its core."""
    from tvm_qpu.codegen.kernels import calibration
    from tvm_qpu.runtime.emulator import EmulatorDevice
    dev = EmulatorDevice(memory_size=1 << 20)
    try:
        ok, _, _ = calibration.run_copy(dev, 1 << 10, 1)
        assert ok, "the emulator's warm-up copy kernel gave a wrong result"
    finally:
        dev.close()


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="also run tests marked slow")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


def _v3d_present() -> bool:
    try:
        from tvm_qpu.runtime import v3d
        return v3d.find_render_node() is not None
    except Exception:
        return False


@pytest.fixture(scope="session", params=["emulator", pytest.param("v3d", marks=pytest.mark.pi5)])
def dev(request):
    """The device the kernel tests run on: the emulator always, and the real GPU (tests marked
    ``pi5``) when a Raspberry Pi 5's V3D render node is present (skipped elsewhere)."""
    from tvm_qpu.runtime.device import open_device
    if request.param == "v3d" and not _v3d_present():
        pytest.skip("pi5: no V3D render node on this machine (the kernel tests also run on a Pi 5's GPU)")
    d = open_device(request.param)
    yield d
    d.close()


@pytest.fixture
def sigint_default():
    """SIGINT raises KeyboardInterrupt during the test, as in an interactive Python, and a child
    process started meanwhile gets SIGINT's default action (exec resets a handled signal, not an
    ignored one). Needed by the Ctrl-C tests: a test run started with SIGINT ignored (a
    non-interactive shell's ``cmd &``, nohup-like CI launchers) would otherwise never see a
    Ctrl-C: Python installs no handler then, ``_thread.interrupt_main()`` does nothing and
    ``signal.raise_signal(SIGINT)`` is dropped (5 tests of test_async failed 8 of 8 runs so)."""
    import signal
    prev = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, prev)
