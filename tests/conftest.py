"""Shared test configuration: locating shared/ (golden data) and the --runslow option."""
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def shared_dir() -> Path | None:
    """The workplace's shared/ folder (beside the repo, or $TVM_QPU_SHARED)."""
    cands = [os.environ.get("TVM_QPU_SHARED"), REPO.parent / "shared", REPO / "shared"]
    for c in cands:
        if c and (Path(c) / "golden").is_dir():
            return Path(c)
    return None


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="also run tests marked slow")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def dev():
    """One emulator device shared by the kernel tests (test modules may still define their own)."""
    from tvm_qpu.runtime.device import open_device
    d = open_device("emulator")
    yield d
    d.close()
