"""A broken install fails loudly (issue 13, items 8 and 9): no silent "no kernels", no skipped
hazard check, no numba cache in a folder someone else controls."""
import os
import sys

import pytest

from tvm_qpu.codegen.registry import OpSpec

SPEC = OpSpec("max_pool2d", [((1, 1, 4, 4), "float32")], ((1, 1, 2, 2), "float32"),
              {"pool_size": (2, 2), "strides": (2, 2), "padding": (0, 0, 0, 0), "layout": "NCHW"})


def _hide(monkeypatch, module: str):
    """Make ``import module`` fail as if the file were missing from the install."""
    import importlib
    parent, _, leaf = module.rpartition(".")
    monkeypatch.setitem(sys.modules, module, None)
    monkeypatch.delattr(importlib.import_module(parent), leaf, raising=False)


def test_missing_kernel_package_is_an_error(monkeypatch):
    from tvm_qpu.backend import QpuBackend
    from tvm_qpu.codegen import registry
    import frontend_util
    assert registry.supports(SPEC)[0]                      # installed: the kernel takes it
    _hide(monkeypatch, "tvm_qpu.codegen.kernels")
    with pytest.raises(ImportError, match="kernels"):
        registry.kinds()
    with pytest.raises(ImportError, match="kernels"):
        QpuBackend().registry.supports(SPEC)               # was: (False, "no QPU kernels are installed")
    with pytest.raises(ImportError, match="kernels"):
        frontend_util.real_kinds()                         # was: set() -> the real-kernel tests skipped


def test_missing_hazard_checker_is_an_error(monkeypatch):
    from tvm_qpu.codegen.asm import nop, thread_end
    from tvm_qpu.codegen import assemble
    from tvm_qpu.runtime.emulator import EmulatorDevice

    def k():
        nop()
        thread_end()
    words = assemble(k)
    dev = EmulatorDevice(memory_size=1 << 20)
    try:
        dev._check_hazards(words, "k")                     # installed: checked, no hazard
        _hide(monkeypatch, "tvm_qpu.codegen.hazards")
        with pytest.raises(ImportError, match="hazards"):
            dev.load_program(words, "k")                   # was: loaded without the check
    finally:
        dev.close()


# ------------------------------------------------------------------------------------------------
# numba cache folder (runtime/emu_core.ensure_numba_cache_dir)
# ------------------------------------------------------------------------------------------------
@pytest.fixture
def fallback(monkeypatch, tmp_path):
    """ensure_numba_cache_dir as for a read-only install: the package folder is not writable,
    NUMBA_CACHE_DIR unset, $XDG_CACHE_HOME under tmp_path. Returns (emu_core, the XDG folder)."""
    from tvm_qpu.runtime import emu_core
    here = os.path.dirname(emu_core.__file__)
    real = emu_core._dir_writable
    monkeypatch.setattr(emu_core._numba_config, "CACHE_DIR", "")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setattr(emu_core, "_dir_writable", lambda p: not p.startswith(here) and real(p))
    return emu_core, tmp_path / "xdg" / "tvm_qpu" / "numba"


def test_numba_cache_folder_is_created_private(fallback):
    emu_core, folder = fallback
    assert emu_core.ensure_numba_cache_dir() == str(folder)
    assert os.stat(folder).st_mode & 0o777 == 0o700


def test_numba_cache_folder_of_another_user_is_refused(fallback, monkeypatch):
    emu_core, folder = fallback
    folder.mkdir(parents=True, mode=0o700)
    owner = os.stat(folder).st_uid
    monkeypatch.setattr(os, "getuid", lambda: owner + 1)   # the folder now belongs to someone else
    with pytest.raises(PermissionError) as e:
        emu_core.ensure_numba_cache_dir()
    msg = str(e.value)
    assert str(folder) in msg and "NUMBA_CACHE_DIR" in msg and f"uid {owner}" in msg
    assert emu_core._numba_config.CACHE_DIR == ""


def test_numba_cache_folder_writable_by_others_or_a_link_is_refused(fallback, tmp_path):
    emu_core, folder = fallback
    folder.mkdir(parents=True)
    folder.chmod(0o777)
    with pytest.raises(PermissionError, match="others may write"):
        emu_core.ensure_numba_cache_dir()
    folder.rmdir()
    (tmp_path / "elsewhere").mkdir(mode=0o700)
    folder.symlink_to(tmp_path / "elsewhere")
    with pytest.raises(PermissionError, match="not a directory"):
        emu_core.ensure_numba_cache_dir()
