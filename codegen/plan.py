"""Kernel plans: what a kernel generator hands to the runtime and to compiled artifacts.

A kernel generator is called at compile time with shapes, dtypes and layout and returns a
:class:`KernelPlan`: the machine code of one or more launches, the buffers they use, how each
launch's uniform stream is built, and how it is dispatched. Nothing here depends on a device:
:func:`run_plan` executes a plan on any :class:`tvm_qpu.runtime.device.Device`, and the persistent
executor (tvm_qpu) keeps weights and code resident across calls.

Uniform stream entries (``Launch.uniforms``) are tuples:

* ``("addr", buffer_name, byte_offset)`` - the GPU address of a buffer plus an offset;
* ``("u32", value)`` - a 32-bit constant (ints are taken modulo 2**32);
* ``("f32", value)`` - a float32 constant.
"""
from __future__ import annotations

import json
import struct
from dataclasses import asdict, dataclass, field

import numpy as np

ROLES = ("input", "output", "weight", "scratch")


@dataclass
class BufferSpec:
    name: str
    role: str                 # input | output | weight | scratch
    shape: tuple
    dtype: str                # numpy dtype name of the host-side array
    nbytes: int = 0           # device bytes (>= host bytes: kernels may need padding)

    def __post_init__(self):
        if self.role not in ROLES:
            raise ValueError(f"buffer {self.name}: role must be one of {ROLES}, got {self.role!r}")
        self.shape = tuple(int(s) for s in self.shape)
        host = int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize
        self.nbytes = max(int(self.nbytes), host, 4)


@dataclass
class Launch:
    words: np.ndarray                       # uint64 machine words
    uniforms: list                          # see module docstring
    workgroups: tuple = (1, 1, 1)
    wg_size: int = 16
    num_qpus: int | None = None
    threads: int = 1
    name: str = "kernel"


@dataclass
class KernelPlan:
    name: str
    buffers: list                           # list[BufferSpec]
    launches: list                          # list[Launch]
    constants: dict = field(default_factory=dict)   # weight buffer name -> np.ndarray (device layout)
    attrs: dict = field(default_factory=dict)       # generator arguments, for reports
    flops: int = 0                          # useful operations (2 per MAC), for GOP/s figures
    bytes_moved: int = 0                    # minimum bytes an ideal kernel would move

    def buffer(self, name: str) -> BufferSpec:
        for b in self.buffers:
            if b.name == name:
                return b
        raise KeyError(f"plan {self.name}: no buffer {name!r}")

    # -- serialisation (no pickle: JSON for the structure, raw arrays for the data) --------------
    def to_json(self) -> dict:
        return {
            "name": self.name,
            "buffers": [asdict(b) for b in self.buffers],
            "launches": [{"words": [f"{int(w):016x}" for w in L.words], "uniforms": [list(u) for u in L.uniforms],
                          "workgroups": list(L.workgroups), "wg_size": L.wg_size, "num_qpus": L.num_qpus,
                          "threads": L.threads, "name": L.name} for L in self.launches],
            "constants": sorted(self.constants),
            "attrs": _jsonable(self.attrs),
            "flops": self.flops,
            "bytes_moved": self.bytes_moved,
        }

    @staticmethod
    def from_json(d: dict, constants: dict | None = None) -> "KernelPlan":
        launches = [Launch(np.array([int(w, 16) for w in L["words"]], dtype=np.uint64),
                           [tuple(u) for u in L["uniforms"]], tuple(L["workgroups"]), L["wg_size"],
                           L["num_qpus"], L["threads"], L["name"]) for L in d["launches"]]
        buffers = [BufferSpec(b["name"], b["role"], tuple(b["shape"]), b["dtype"], b["nbytes"]) for b in d["buffers"]]
        consts = dict(constants or {})
        missing = [c for c in d.get("constants", []) if c not in consts]
        if missing:
            raise ValueError(f"plan {d['name']}: constant data missing for {missing}")
        return KernelPlan(d["name"], buffers, launches, consts, d.get("attrs", {}), d.get("flops", 0),
                          d.get("bytes_moved", 0))


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating,)):
        return float(x)
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    return str(x)


def bind_constants(plan: KernelPlan, constants: dict) -> KernelPlan:
    """Turn the plan's input buffers named in ``constants`` into weights holding that data (host
    layout), so a generator need not know which of its operands the model made constant."""
    for b in plan.buffers:
        if b.role == "input" and b.name in constants:
            a = np.ascontiguousarray(np.asarray(constants[b.name]))
            if tuple(a.shape) != b.shape:
                a = a.reshape(b.shape)
            b.role = "weight"
            plan.constants[b.name] = a.astype(b.dtype, copy=False)
    return plan


def uniform_words(entries, addresses: dict) -> np.ndarray:
    """Build a launch's uint32 uniform array, resolving buffer addresses."""
    out = np.empty(len(entries), dtype=np.uint32)
    for i, e in enumerate(entries):
        kind = e[0]
        if kind == "addr":
            out[i] = (addresses[e[1]] + int(e[2])) & 0xFFFFFFFF
        elif kind == "u32":
            out[i] = int(e[1]) & 0xFFFFFFFF
        elif kind == "f32":
            out[i] = struct.unpack("<I", struct.pack("<f", float(e[1])))[0]
        else:
            raise ValueError(f"unknown uniform entry {e!r}")
    return out


class ResidentPlan:
    """A plan whose code and weights live on a device; each call copies only inputs / outputs."""

    def __init__(self, plan: KernelPlan, device):
        self.plan, self.device = plan, device
        self.bufs = {b.name: device.alloc(b.nbytes) for b in plan.buffers}
        for name, data in plan.constants.items():
            self.bufs[name].write(np.ascontiguousarray(data))
        self.programs = [device.load_program(L.words, L.name) for L in plan.launches]
        addrs = {n: b.addr for n, b in self.bufs.items()}
        self.uniforms = [device.upload(uniform_words(L.uniforms, addrs)) for L in plan.launches]
        self.last_stats = []

    def __call__(self, *inputs, **named):
        self.write_inputs(*inputs, **named)
        self.launch()
        return self.read_outputs()

    def write_inputs(self, *inputs, **named):
        """Copy the inputs (positional in buffer order, or by name) into the device buffers."""
        ins = [b for b in self.plan.buffers if b.role == "input"]
        if len(inputs) > len(ins):
            raise ValueError(f"{self.plan.name}: {len(ins)} inputs expected, got {len(inputs)}")
        values = dict(zip([b.name for b in ins], inputs))
        values.update(named)
        for b in ins:
            if b.name not in values:
                raise ValueError(f"{self.plan.name}: input {b.name!r} missing")
            a = np.asarray(values[b.name])
            if tuple(a.shape) != b.shape or a.dtype != np.dtype(b.dtype):
                raise ValueError(f"{self.plan.name}: input {b.name} must be {b.dtype}{list(b.shape)}, "
                                 f"got {a.dtype}{list(a.shape)}")
            self.bufs[b.name].write(a)

    def launch(self):
        """Run the plan's launches on the inputs written last; their ExecStats go to last_stats."""
        self.last_stats = []
        for L, prog, uni in zip(self.plan.launches, self.programs, self.uniforms):
            self.last_stats.append(self.device.execute(prog, uni, workgroups=L.workgroups, wg_size=L.wg_size,
                                                       num_qpus=L.num_qpus, threads=L.threads))

    def read_outputs(self):
        """Copies of the output buffers (one array, or a tuple for several outputs)."""
        outs = []
        for b in self.plan.buffers:
            if b.role == "output":
                n = int(np.prod(b.shape, dtype=np.int64))
                outs.append(self.bufs[b.name].view(np.dtype(b.dtype))[:n].reshape(b.shape).copy())
        return outs[0] if len(outs) == 1 else tuple(outs)

    def close(self):
        for b in self.bufs.values():
            self.device.free(b)
        for u in self.uniforms:
            self.device.free(u)
        self.bufs, self.uniforms = {}, []


def run_plan(plan: KernelPlan, device, *inputs, **named):
    """One-shot execution of a plan (allocates, runs, frees). Returns (outputs, list of ExecStats)."""
    r = ResidentPlan(plan, device)
    try:
        out = r(*inputs, **named)
        return out, r.last_stats
    finally:
        r.close()


def plan_to_text(plan: KernelPlan) -> str:
    return json.dumps(plan.to_json(), indent=1)
