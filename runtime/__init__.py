"""tvm-qpu runtime: device API, QPU emulator, v3d driver and executor. Installed as ``tvm_qpu.runtime``."""
