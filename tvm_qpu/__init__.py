"""tvm-qpu: a TVM backend for the Raspberry Pi 5 VideoCore VII GPU (V3D 7.1 QPUs)."""
__version__ = "0.1.0"
