"""Helpers shared by the emulator tests (no tests here): a device, a harness that loads
16-lane inputs into registers, runs a body written with the DSL and stores registers back,
and numpy references for the QPU's float conventions (denormals flushed)."""
from __future__ import annotations

import numpy as np

from tvm_qpu.codegen.asm import (Program, add, eidx, ldtmu, ldunifrf, mov, nop, shl, tmua, tmud,
                                 tmuwt)
from tvm_qpu.codegen.instr import RF
from tvm_qpu.codegen.kernels.calibration import end_program
from tvm_qpu.runtime.emulator import EmulatorDevice

IN_REGS = [RF[11 + i] for i in range(4)]      # inputs land here
OUT_REGS = [RF[20 + i] for i in range(8)]     # outputs are stored from here

_DEVICE = None


def device() -> EmulatorDevice:
    global _DEVICE
    if _DEVICE is None:
        _DEVICE = EmulatorDevice(memory_size=256 << 20)
    return _DEVICE


def assemble_fn(fn, name="test"):
    p = Program(name)
    with p:
        fn()
    return p.words()


def harness(body, n_in: int, n_out: int):
    """Program: load n_in 16-lane words into rf11.., run body(), store rf20.. (n_out)."""
    def k():
        nop(sig=ldunifrf(RF[40]))
        nop(sig=ldunifrf(RF[41]))
        eidx(RF[42])
        shl(RF[42], RF[42], 2)
        add(RF[40], RF[40], RF[42])
        add(RF[41], RF[41], RF[42])
        mov(RF[43], 1)
        shl(RF[43], RF[43], 6)
        for _ in range(n_in):
            mov(tmua, RF[40]).add(RF[40], RF[40], RF[43])
        for i in range(n_in):
            nop(sig=ldtmu(IN_REGS[i]))
        body()
        for j in range(n_out):
            mov(tmud, OUT_REGS[j])
            mov(tmua, RF[41]).add(RF[41], RF[41], RF[43])
        tmuwt()
        end_program()
    return k


def run_body(body, inputs, n_out=1, dev=None, **kw):
    """Run ``body`` on 16-lane inputs (arrays of 16 x 32-bit); returns a list of uint32[16]."""
    dev = dev or device()
    ins = [np.ascontiguousarray(np.asarray(x).reshape(16)).view(np.uint32) for x in inputs]
    words = assemble_fn(harness(body, len(ins), n_out))
    prog = dev.load_program(words, "harness")
    src = dev.upload(np.concatenate(ins) if ins else np.zeros(16, np.uint32))
    dst = dev.alloc(64 * n_out)
    try:
        dev.execute(prog, np.array([src.addr, dst.addr], np.uint32), **kw)
        out = dst.view(np.uint32).reshape(n_out, 16).copy()
    finally:
        dev.free(src)
        dev.free(dst)
        dev.free(prog.buffer)
    return list(out)


def run_program(fn, uniforms, dev=None, name="test", **kw):
    dev = dev or device()
    prog = dev.load_program(assemble_fn(fn, name), name)
    try:
        return dev.execute(prog, np.asarray(uniforms, dtype=np.uint32), **kw)
    finally:
        dev.free(prog.buffer)


# ---------------------------------------------------------------- float references
def ftz(x):
    """Flush float32 denormals to signed zero (numpy float32 array in, same out)."""
    x = np.asarray(x, dtype=np.float32)
    u = x.view(np.uint32)
    den = (u & 0x7F800000) == 0
    return np.where(den, (u & 0x80000000), u).astype(np.uint32).view(np.float32)


def f32(bits):
    return np.asarray(bits, dtype=np.uint32).view(np.float32)


def bits(x):
    return np.asarray(x, dtype=np.float32).view(np.uint32)


def same_float(got_bits, ref) -> bool:
    """Bit-exact equality, except that any NaN matches any NaN."""
    g = f32(got_bits)
    r = np.asarray(ref, dtype=np.float32)
    both_nan = np.isnan(g) & np.isnan(r)
    return bool(np.all(both_nan | (g.view(np.uint32) == r.view(np.uint32))))


def f16_bits(x):
    """float32 -> float16 bits, round to nearest even, float16 denormals flushed to zero."""
    with np.errstate(over="ignore", invalid="ignore"):
        h = np.asarray(x, dtype=np.float32).astype(np.float16).view(np.uint16).astype(np.uint32)
    den = ((h & 0x7C00) == 0)
    return np.where(den, h & 0x8000, h).astype(np.uint32)


def f16_to_f32(h):
    h = np.asarray(h, dtype=np.uint32) & 0xFFFF
    den = (h & 0x7C00) == 0
    h = np.where(den, h & 0x8000, h).astype(np.uint16)
    return h.view(np.float16).astype(np.float32)


EDGE_F32 = np.array([0.0, -0.0, 1.0, -1.5, np.inf, -np.inf, np.nan, 1e-40, -1e-40, 3.4e38,
                     -3.4e38, 1.17549435e-38, 2.5, -7.75, 0.5, 1e-30], dtype=np.float32)
EDGE_U32 = np.array([0, 1, 2, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, 0xFFFFFFFE, 0x12345678,
                     0x00FFFFFF, 0x01000000, 0x8000, 0xFFFF, 0x10000, 31, 32, 0xDEADBEEF],
                    dtype=np.uint32)
