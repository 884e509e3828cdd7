"""tvm-qpu: a TVM backend for the Raspberry Pi 5 VideoCore VII GPU (V3D 7.1 QPUs).

``import tvm_qpu`` stays cheap (no TVM import): the API below is loaded on first use.

* ``tvm_qpu.from_onnx(path, input_shapes=None)`` -> (Relax module, params)
* ``tvm_qpu.partition(mod, params=None, placement="cost")`` -> partitioned Relax module
  (``tvm_qpu.partition_report(mod)`` says what goes where and why)
* ``tvm_qpu.build(mod, target="qpu", target_host=None, placement="cost", params=None)``
  -> CompiledModule (``.save(path)`` writes one artifact file)
* ``tvm_qpu.load(path, device="auto")`` -> Runner (``run(**inputs)``, ``profile()``,
  ``run_stream(inputs, depth=2)``, ``overlap()``, ``trace(path)``: docs/async.md)

If TVM is already imported, the ``tvm_qpu.run_plan`` / ``submit_plan`` / ``wait_plan`` packed
functions that compiled modules call are registered right away; otherwise by the first use of the API.
"""
import sys as _sys

__version__ = "0.1.0"

_API = ("from_onnx", "partition", "partition_report", "build", "load", "CompiledModule", "Runner", "Profile",
        "QpuError", "ArtifactError", "QpuBackend")


def __getattr__(name):
    if name in _API:
        from . import api
        if name == "ArtifactError":
            from .artifact import ArtifactError
            return ArtifactError
        if name == "QpuBackend":
            from .backend import QpuBackend
            return QpuBackend
        return getattr(api, name)
    raise AttributeError(f"module 'tvm_qpu' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_API))


if "tvm_ffi" in _sys.modules:  # TVM already loaded: make compiled modules runnable at once
    from . import executor as _executor  # noqa: F401  (registers tvm_qpu.run_plan)
