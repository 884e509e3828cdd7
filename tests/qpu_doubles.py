"""TEST DOUBLES for the frontend tests (never used outside tests/).

Real QPU kernels land in ``codegen/kernels/`` over time. To test the frontend plumbing now, this
module provides:

* :func:`double_entries`: registry entries (``supports`` / ``generate`` / ``estimate``) for every
  kind the pattern table offloads. ``generate`` returns a genuine :class:`KernelPlan` whose one
  launch is a real, trivially small QPU program (``nop; thread_end``) and whose first uniform is
  an id into :data:`DOUBLE_OPS`; the following uniforms are the GPU addresses of its buffers.
* :class:`DoubleDevice`: a fake :class:`~tvm_qpu.runtime.device.Device` with host-memory buffers
  that, when it executes a double's program, reads the operands from the buffer addresses in the
  uniform stream and computes the op with numpy (:func:`reference`), writing the output buffer.
* ``estimate`` is a documented toy QPU model (DOUBLE_QPU_RATES): fp32 GEMM slower than the CPU's
  BLAS, integer GEMM faster than the CPU's llvm integer path, so the placement rule has something
  to decide. It is not the real cycle model.

``install(monkeypatch)`` swaps the registry table for the doubles (and restores it after the test).
"""
from __future__ import annotations

import itertools

import numpy as np

from tvm_qpu.codegen import plan as plan_mod
from tvm_qpu.runtime.device import Buffer, Device, ExecStats, ProgramHandle

KINDS = ("matmul", "conv2d", "max_pool2d", "avg_pool2d", "global_avg_pool2d", "reduce_max", "reduce_min",
         "softmax", "attention")

# toy QPU throughput of the doubles (op/s): NOT the real cycle model
DOUBLE_QPU_RATES = {"fp32_gemm": 20e9, "int_gemm": 60e9, "elementwise": 5e9}
DOUBLE_CLOCK = 960e6

DOUBLE_OPS: dict = {}
_ids = itertools.count(1)


def _trivial_program():
    from tvm_qpu.codegen.asm import nop, thread_end
    from tvm_qpu.codegen import assemble

    def k():
        nop()
        thread_end()
    return assemble(k)


# ---------------------------------------------------------------------------------------------
# numpy semantics of each kind (the double "kernels")

def _act(y, act):
    if act == "relu":
        return np.maximum(y, 0)
    if isinstance(act, (list, tuple)) and act and act[0] == "clip":
        return np.clip(y, act[1], act[2])
    return y


def _acc(dtype):
    return np.int64 if np.issubdtype(np.dtype(dtype), np.integer) else np.float64


def _conv2d(x, w, strides, pad, dil, groups):
    n, c, h, wd = x.shape
    co, cig, kh, kw = w.shape
    x = np.pad(x, ((0, 0), (0, 0), (pad[0], pad[2]), (pad[1], pad[3])))
    ho = (x.shape[2] - dil[0] * (kh - 1) - 1) // strides[0] + 1
    wo = (x.shape[3] - dil[1] * (kw - 1) - 1) // strides[1] + 1
    out = np.zeros((n, co, ho, wo), x.dtype)
    cpg = co // groups
    for g in range(groups):
        xs = x[:, g * cig:(g + 1) * cig]
        for i in range(kh):
            for j in range(kw):
                patch = xs[:, :, i * dil[0]: i * dil[0] + strides[0] * (ho - 1) + 1: strides[0],
                           j * dil[1]: j * dil[1] + strides[1] * (wo - 1) + 1: strides[1]]
                out[:, g * cpg:(g + 1) * cpg] += np.einsum("nchw,oc->nohw", patch, w[g * cpg:(g + 1) * cpg, :, i, j])
    return out


def _pool(x, a, kind):
    ph, pw = a["pool_size"]
    sh, sw = a["strides"]
    pad = a["padding"]
    fill = -np.inf if kind == "max" else 0.0
    xp = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (pad[0], pad[2]), (pad[1], pad[3])), constant_values=fill)
    ones = np.pad(np.ones(x.shape[2:]), ((pad[0], pad[2]), (pad[1], pad[3])))
    ho = (xp.shape[2] - ph) // sh + 1
    wo = (xp.shape[3] - pw) // sw + 1
    out = np.empty(x.shape[:2] + (ho, wo))
    for i in range(ho):
        for j in range(wo):
            win = xp[:, :, i * sh:i * sh + ph, j * sw:j * sw + pw]
            if kind == "max":
                out[:, :, i, j] = win.max(axis=(2, 3))
            else:
                cnt = ph * pw if a.get("count_include_pad") else ones[i * sh:i * sh + ph, j * sw:j * sw + pw].sum()
                out[:, :, i, j] = win.sum(axis=(2, 3)) / cnt
    return out


def reference(spec, vals: dict):
    """numpy result of ``spec`` on named inputs ``vals`` (the doubles' semantics)."""
    k, a = spec.kind, spec.attrs
    out_shape, out_dt = spec.output
    if k == "matmul":
        A, B = vals["A"].astype(_acc(spec.inputs[0][1])), vals["B"].astype(_acc(spec.inputs[1][1]))
        if a.get("transpose_b"):
            B = np.swapaxes(B, -1, -2)
        y = np.matmul(A, B)
        if a.get("bias"):
            y = y + vals["bias"]
        y = _act(y, a.get("activation"))
    elif k == "conv2d":
        x, w = vals["data"].astype(_acc(spec.inputs[0][1])), vals["weight"].astype(_acc(spec.inputs[1][1]))
        y = _conv2d(x, w, a["strides"], a["padding"], a["dilation"], a["groups"])
        if a.get("bias"):
            y = y + vals["bias"].reshape(1, -1, 1, 1)
        y = _act(y, a.get("activation"))
    elif k in ("max_pool2d", "avg_pool2d"):
        y = _pool(vals["data"], a, k[:3])
    elif k == "global_avg_pool2d":
        y = vals["data"].astype(np.float64).mean(axis=(2, 3), keepdims=True)
    elif k in ("reduce_max", "reduce_min"):
        f = np.max if k == "reduce_max" else np.min
        y = f(vals["data"], axis=None if a["axis"] is None else tuple(a["axis"]), keepdims=a["keepdims"])
    elif k == "softmax":
        x = vals["data"].astype(np.float64)
        e = np.exp(x - x.max(-1, keepdims=True))
        y = e / e.sum(-1, keepdims=True)
    elif k == "attention":
        q, kk, v = (vals[n].astype(np.float64) for n in ("q", "k", "v"))
        s = q @ np.swapaxes(kk, -1, -2) * a["scale"]
        if a.get("mask"):
            s = s + vals["mask"]
        e = np.exp(s - s.max(-1, keepdims=True))
        y = (e / e.sum(-1, keepdims=True)) @ v
    else:
        raise KeyError(k)
    return np.asarray(y).astype(out_dt).reshape(out_shape)


# ---------------------------------------------------------------------------------------------
# registry entries

def _supports(spec):
    a = spec.attrs
    if spec.kind in ("matmul", "conv2d"):
        dts = {d for _, d in spec.inputs[:2]}
        if dts <= {"float32"} or dts <= {"int8", "int16"}:
            return True, "ok"
        return False, f"double takes float32 or int8/int16 operands, got {sorted(dts)}"
    if spec.kind == "softmax" and a.get("axis") != -1:
        return False, "last axis only"
    if spec.kind in ("avg_pool2d", "global_avg_pool2d", "softmax", "attention") and spec.inputs[0][1] != "float32":
        return False, f"double {spec.kind} takes float32 only"
    return True, "ok"


def _estimate(spec):
    from tvm_qpu.placement import is_integer, spec_ops
    ops = spec_ops(spec)
    if spec.kind in ("matmul", "conv2d", "attention"):
        rate = DOUBLE_QPU_RATES["int_gemm" if is_integer(spec) else "fp32_gemm"]
    else:
        rate = DOUBLE_QPU_RATES["elementwise"]
    return ops / rate + 2e-6


def _generate(spec, constants):
    names = spec.attrs["input_names"]
    bufs = []
    for n, (shape, dt) in zip(names, spec.inputs):
        role = "weight" if n in constants else "input"
        bufs.append(plan_mod.BufferSpec(n, role, shape, dt))
    bufs.append(plan_mod.BufferSpec("out", "output", spec.output[0], spec.output[1]))
    op_id = next(_ids)
    DOUBLE_OPS[op_id] = spec
    uniforms = [("u32", op_id)] + [("addr", b.name, 0) for b in bufs]
    launch = plan_mod.Launch(_trivial_program(), uniforms, name=f"double:{spec.kind}")
    consts = {n: np.ascontiguousarray(np.asarray(c).astype(dict(zip(names, [d for _, d in spec.inputs]))[n]))
              for n, c in constants.items()}
    from tvm_qpu.placement import spec_ops
    return plan_mod.KernelPlan(f"double_{spec.kind}", bufs, [launch], consts,
                               attrs={"double": True, "op_id": op_id, "kind": spec.kind},
                               flops=int(spec_ops(spec)))


def double_entries() -> dict:
    from tvm_qpu.codegen.registry import KernelEntry
    return {k: KernelEntry(k, _supports, _generate, _estimate) for k in KINDS}


def install(monkeypatch, kinds=KINDS):
    """Make the registry hold exactly the doubles for ``kinds`` for the duration of a test."""
    from tvm_qpu.codegen import registry
    # import the real kernel package first: imported for the first time while the doubles are in
    # place, it would register the real kernels into the doubles' table (and never into the real one)
    registry._load_kernels()
    entries = {k: v for k, v in double_entries().items() if k in kinds}
    monkeypatch.setattr(registry, "_REGISTRY", entries)
    monkeypatch.setattr(registry, "_load_kernels", lambda: None)
    return entries


# ---------------------------------------------------------------------------------------------
# the fake device

class DoubleDevice(Device):
    """Host-memory device that computes the doubles' plans with numpy (TEST DOUBLE)."""

    kind = "double"

    def __init__(self):
        self.buffers = {}
        self._next = 0x1000_0000
        self.executions = 0

    def alloc(self, nbytes, align=4096):
        addr = self._next
        self._next += (int(nbytes) + align - 1) // align * align + align
        b = Buffer(self, addr, int(nbytes), np.zeros(int(nbytes), np.uint8))
        self.buffers[addr] = b
        return b

    def free(self, buf):
        self.buffers.pop(buf.addr, None)

    def load_program(self, words, name="kernel"):
        return ProgramHandle(0, np.asarray(words, np.uint64), None, name)

    def execute(self, program, uniforms, *, workgroups=(1, 1, 1), wg_size=16, num_qpus=None, threads=1,
                timeout=10.0):
        if not program.name.startswith("double:"):
            raise RuntimeError(f"DoubleDevice runs only test-double programs, got {program.name}")
        u = uniforms.view(np.uint32) if isinstance(uniforms, Buffer) else np.asarray(uniforms, np.uint32)
        spec = DOUBLE_OPS[int(u[0])]
        names = list(spec.attrs["input_names"])
        vals = {}
        for i, (n, (shape, dt)) in enumerate(zip(names, spec.inputs)):
            b = self.buffers[int(u[1 + i])]
            vals[n] = b.view(np.dtype(dt))[: int(np.prod(shape))].reshape(shape)
        out = self.buffers[int(u[1 + len(names)])]
        y = reference(spec, vals)
        out.write(np.ascontiguousarray(y))
        self.executions += 1
        secs = _estimate(spec)
        return ExecStats(instructions=2, cycles=int(secs * DOUBLE_CLOCK), seconds=secs)
