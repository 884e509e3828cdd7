"""The device API shared by the embedded emulator and the real v3d (DRM) driver.

Kernels, the executor and the CLI only talk to this interface, so they never know which device
runs them. A device owns:

* memory: buffers in a 32-bit GPU address space (like the V3D MMU); each :class:`Buffer` is a
  numpy view of its bytes plus its GPU address;
* programs: machine words loaded once (:meth:`Device.load_program` returns a handle);
* execution: :meth:`Device.execute` runs a program with a uniform stream, like a V3D compute
  dispatch (CSD), and returns :class:`ExecStats`.
"""
from __future__ import annotations

import os
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import numpy as np


class DeviceError(RuntimeError):
    """A device could not do what was asked (no device, wrong GPU, out of memory, hung job...)."""


@dataclass
class Buffer:
    """A block of GPU memory: ``array`` is a uint8 numpy view of its bytes, ``addr`` its GPU address."""
    device: "Device"
    addr: int
    size: int
    array: np.ndarray
    handle: int = 0

    def view(self, dtype=np.uint32, shape=None) -> np.ndarray:
        """The buffer's bytes as a typed array (shape defaults to 1-D over the whole buffer)."""
        a = self.array.view(dtype)
        return a if shape is None else a[: int(np.prod(shape))].reshape(shape)

    def write(self, data: np.ndarray, offset: int = 0):
        raw = np.ascontiguousarray(data).view(np.uint8).reshape(-1)
        if offset < 0 or offset + raw.size > self.size:
            raise DeviceError(f"write of {raw.size} bytes at offset {offset} outside buffer of {self.size} bytes")
        self.array[offset: offset + raw.size] = raw

    def addr_of(self, offset: int = 0) -> int:
        return self.addr + offset


@dataclass
class ProgramHandle:
    """Machine code resident on the device."""
    addr: int
    words: np.ndarray
    buffer: Buffer | None = None
    name: str = "kernel"


@dataclass
class ExecStats:
    """What one execute() did. Times are modelled on the emulator and measured on hardware."""
    instructions: int = 0           # 16-lane instructions executed, all QPUs and threads
    cycles: int = 0                 # QPU clock cycles from launch to the last thread's end
    seconds: float = 0.0            # cycles / clock (emulator) or wall time (v3d)
    tmu_loads: int = 0              # TMU load requests (per 16-lane request)
    tmu_stores: int = 0             # TMU store / atomic requests
    bytes_loaded: int = 0
    bytes_stored: int = 0
    stall_cycles: int = 0           # cycles QPUs spent waiting (TMU data, barriers)
    per_qpu_cycles: list = field(default_factory=list)
    modeled: bool = True            # True on the emulator, False on real hardware

    def as_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


class Device(ABC):
    """Abstract device. Subclasses: EmulatorDevice (runtime.emulator), V3DDevice (runtime.v3d)."""

    kind: str = "abstract"
    num_qpus: int = 12
    clock_hz: float = 960e6

    @abstractmethod
    def alloc(self, nbytes: int, align: int = 4096) -> Buffer:
        """Allocate zeroed GPU memory."""

    @abstractmethod
    def free(self, buf: Buffer) -> None:
        """Release a buffer; its address may be reused."""

    @abstractmethod
    def load_program(self, words, name: str = "kernel") -> ProgramHandle:
        """Copy machine words to the device once; returns a handle for execute()."""

    @abstractmethod
    def execute(self, program: ProgramHandle, uniforms, *, workgroups=(1, 1, 1), wg_size: int = 16,
                num_qpus: int | None = None, threads: int = 1, timeout: float = 10.0) -> ExecStats:
        """Run ``program`` as a compute dispatch.

        uniforms: a uint32 array (copied to device memory) or a Buffer already holding them; every
        dispatched QPU thread starts reading the same uniform stream.
        workgroups: (x, y, z) workgroup counts; each workgroup of ``wg_size`` (1..256) lanes runs
        as ceil(wg_size / 16) batches of 16 lanes, one QPU thread each; the payload registers
        carry its ids (rf3.ul = x, rf3.uh = y, rf2.ul = z) and each lane's local invocation
        index (rf2 >> (32 - bits), bits = log2(next_pow2(max(wg_size, 64))), Mesa's layout).
        num_qpus: how many QPUs may run workgroups (default: all).
        threads: the CSD threading mode, as the cfg words give it to the hardware: 4 sets the
        threading bit (4 threads per QPU, 32 registers each); 1 and 2 leave it clear, and a Pi 5
        then runs 2 threads per QPU (64 registers each; each thread may hold 8 of the QPU's 16
        TMU output FIFO words, 4 at 4 threads: docs/emulator.md "TMU"). Default 1.
        """

    def upload(self, data: np.ndarray, align: int = 4096) -> Buffer:
        """Allocate a buffer holding a copy of ``data``."""
        data = np.ascontiguousarray(data)
        buf = self.alloc(max(data.nbytes, 4), align)
        buf.write(data)
        return buf

    def close(self) -> None:
        """Release everything the device holds."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


DEVICE_KINDS = ("auto", "emulator", "v3d")


def open_device(kind: str | None = None, **options) -> Device:
    """Open a device: "emulator", "v3d", or "auto" (v3d when a V3D render node is present, else the
    emulator). ``TVM_QPU_DEVICE`` overrides "auto"."""
    kind = kind or "auto"
    if kind == "auto":
        kind = os.environ.get("TVM_QPU_DEVICE", "auto") or "auto"
    if kind not in DEVICE_KINDS:
        raise DeviceError(f"unknown device {kind!r}; choose one of {', '.join(DEVICE_KINDS)}")
    if kind == "auto":
        try:
            from . import v3d
            if v3d.find_render_node() is not None:
                kind = "v3d"
        except (ImportError, AttributeError, OSError):
            pass
        if kind == "auto":
            kind = "emulator"
    if kind == "v3d":
        from .v3d import V3DDevice
        return V3DDevice(**options)
    from .emulator import EmulatorDevice
    return EmulatorDevice(**options)
