"""Kernels the emulator's timing model is calibrated and benchmarked on.

* :func:`copy_kernel` - a uint32 copy with 256-byte (16 lanes x vec4) TMU loads and stores,
  one load pair always in flight (the structure of py-videocore7's ``scopy`` example, the
  source of the published copy figures), each workgroup one QPU thread;
* :func:`sgemm_kernel` - a straightforward fp32 SGEMM: each workgroup (one QPU thread) computes
  a 16 x 16 tile of C; per k it loads one row segment of B (lane = column) and one column
  segment of A (lane = row), broadcasts each A element with ``shuffle`` and accumulates with
  ``fmul`` + ``fadd``. No prefetch, no blocking in registers beyond the tile.

Both come with a host-side helper that allocates buffers on a device, runs the kernel and
returns the results and the modelled figures.
"""
from __future__ import annotations

import numpy as np

from ..asm import (R, L, assemble, add, b, eidx, fadd, fmul, ldtmu, ldunifrf, mov, nop, shl, shr,
                   shuffle, sub, thrsw, tmua, tmuc, tmud, tmuwt, umul24)
from ..instr import RF

#: TMU config byte: per-lane (1 << 7), regular op (15 << 3), vec4 (4) -> 0xFC; four lookups' worth
VEC4_CONFIG_WORD = 0xFCFCFCFC
COPY_CHUNK_BYTES = 256          # one lookup: 16 lanes x 16 bytes
COPY_STEP_BYTES = 2 * COPY_CHUNK_BYTES


def end_program():
    """The program end: two thrsw mark the last switch, the next thrsw ends the thread."""
    nop(sig=thrsw)
    nop(sig=thrsw)
    nop()
    nop()
    nop(sig=thrsw)
    nop()
    nop()
    nop()


# --------------------------------------------------------------------------------------------
# copy
# --------------------------------------------------------------------------------------------
def copy_kernel():
    """Uniforms: [iterations - 1, src, dst, stride bytes (= 256 x threads total), config word].

    Thread t (workgroup x id t) copies chunks t, t + T, t + 2T, ... (256 bytes each; lane l
    moves bytes 16 l .. 16 l + 15 of a chunk). Each iteration stores two chunks and issues the
    loads of the next two, so a load pair is always in flight."""
    rn, rsrc, rdst, rstride, rcfg = RF[20], RF[21], RF[22], RF[23], RF[24]
    t0, t1, rd = RF[10], RF[11], RF[12]
    nop(sig=ldunifrf(rn))
    nop(sig=ldunifrf(rsrc))
    nop(sig=ldunifrf(rdst))
    nop(sig=ldunifrf(rstride))
    nop(sig=ldunifrf(rcfg))
    # offset = wg_x * 256 + eidx * 16
    shl(t1, RF[3], -16)          # shifts use b % 32: -16 = 16
    shr(t1, t1, -16)                     # rf3.ul: workgroup x id
    shl(t1, t1, 8)
    eidx(t0)
    shl(t0, t0, 4)
    add(t0, t0, t1)
    add(rsrc, rsrc, t0)
    add(rdst, rdst, t0)
    # prologue: loads of the first two chunks
    mov(tmuc, rcfg)
    mov(tmua, rsrc).add(rsrc, rsrc, rstride)
    mov(tmua, rsrc).add(rsrc, rsrc, rstride)
    # loop body: store the two chunks in flight, then (in the branch delay slots) load the next
    L.loop
    mov(tmuc, rcfg)
    for _ in range(2):
        nop(sig=ldtmu(rd))
        mov(tmud, rd, sig=ldtmu(rd))
        mov(tmud, rd, sig=ldtmu(rd))
        mov(tmud, rd, sig=ldtmu(rd))
        mov(tmud, rd)
        mov(tmua, rdst).add(rdst, rdst, rstride)
    sub(rn, rn, 1, cond="pushz")
    b(R.loop, cond="na0")
    mov(tmua, rsrc).add(rsrc, rsrc, rstride)
    mov(tmua, rsrc).add(rsrc, rsrc, rstride)
    nop()
    # epilogue: the last two chunks
    mov(tmuc, rcfg)
    for _ in range(2):
        nop(sig=ldtmu(rd))
        mov(tmud, rd, sig=ldtmu(rd))
        mov(tmud, rd, sig=ldtmu(rd))
        mov(tmud, rd, sig=ldtmu(rd))
        mov(tmud, rd)
        mov(tmua, rdst).add(rdst, rdst, rstride)
    tmuwt()
    end_program()


def copy_words() -> np.ndarray:
    return assemble(copy_kernel, name="copy")


def copy_uniforms(n_words: int, src_addr: int, dst_addr: int, n_threads: int) -> np.ndarray:
    step = COPY_STEP_BYTES * n_threads
    nbytes = n_words * 4
    if nbytes % step or nbytes // step < 2:
        raise ValueError(f"copy of {n_words} words needs a multiple of {step // 4} words "
                         f"(at least two iterations) for {n_threads} threads")
    return np.array([nbytes // step - 1, src_addr, dst_addr, COPY_CHUNK_BYTES * n_threads,
                     VEC4_CONFIG_WORD], dtype=np.uint32)


def run_copy(device, n_words: int, num_qpus: int, threads: int = 1, *, program=None, seed: int = 0):
    """Copy ``n_words`` uint32 on ``num_qpus`` QPUs x ``threads``; returns (ok, stats, GB/s)."""
    nthreads = num_qpus * threads
    src = device.alloc(n_words * 4)
    dst = device.alloc(n_words * 4)
    try:
        x = src.view(np.uint32)
        x[:] = np.random.default_rng(seed).integers(0, 1 << 32, n_words, dtype=np.uint32)
        prog = program or device.load_program(copy_words(), "copy")
        unif = copy_uniforms(n_words, src.addr, dst.addr, nthreads)
        stats = device.execute(prog, unif, workgroups=(nthreads, 1, 1), num_qpus=num_qpus,
                               threads=threads, timeout=600)
        ok = bool(np.array_equal(dst.view(np.uint32), x))
        return ok, stats, n_words * 4 / stats.seconds / 1e9
    finally:
        device.free(src)
        device.free(dst)


# --------------------------------------------------------------------------------------------
# naive SGEMM
# --------------------------------------------------------------------------------------------
def sgemm_kernel():
    """C[M, N] = A[M, K] @ B[K, N] (row-major fp32), one 16 x 16 tile of C per workgroup
    (x = tile column, y = tile row). Uniforms: [A, B, C, K, K * 4, N * 4]."""
    ra_ptr, rb_ptr, rc_ptr, rk, rka, rnb = (RF[i] for i in range(40, 46))
    va, vb = RF[46], RF[47]
    tt = (RF[48], RF[49])
    pp = (RF[50], RF[51])
    t0, t1 = RF[52], RF[53]
    acc = [RF[16 + i] for i in range(16)]
    nop(sig=ldunifrf(ra_ptr))
    nop(sig=ldunifrf(rb_ptr))
    nop(sig=ldunifrf(rc_ptr))
    nop(sig=ldunifrf(rk))
    nop(sig=ldunifrf(rka))
    nop(sig=ldunifrf(rnb))
    # column = x * 16 + eidx ; row0 = y * 16
    shl(t0, RF[3], -16)             # shifts use b % 32: -16 = 16
    shr(t0, t0, -16)                 # x
    shl(t0, t0, 4)
    eidx(t1)
    add(t0, t0, t1)                 # column
    shl(t0, t0, 2)
    add(rb_ptr, rb_ptr, t0)         # &B[0, col]
    add(rc_ptr, rc_ptr, t0)         # &C[0, col]
    shr(t0, RF[3], -16)              # y
    shl(t0, t0, 4)                  # row0
    umul24(t1, t0, rnb)
    add(rc_ptr, rc_ptr, t1)         # &C[row0, col]
    eidx(t1)
    add(t0, t0, t1)                 # row0 + lane
    umul24(t0, t0, rka)
    add(ra_ptr, ra_ptr, t0)         # &A[row0 + lane, 0]
    for a in acc:
        mov(a, 0)
    L.kloop
    mov(tmua, rb_ptr).add(rb_ptr, rb_ptr, rnb)
    mov(tmua, ra_ptr).add(ra_ptr, ra_ptr, 4)
    nop(sig=ldtmu(vb))
    nop(sig=ldtmu(va))
    # rank-1 update: acc[r] += A[row0 + r, k] * B[k, col]
    shuffle(tt[0], va, 0)
    for r in range(1, 16):
        shuffle(tt[r % 2], va, r).fmul(pp[(r - 1) % 2], tt[(r - 1) % 2], vb)
        fadd(acc[r - 1], acc[r - 1], pp[(r - 1) % 2])
    nop().fmul(pp[1], tt[1], vb)
    sub(rk, rk, 1, cond="pushz")
    b(R.kloop, cond="na0")
    fadd(acc[15], acc[15], pp[1])
    nop()
    nop()
    for r in range(16):
        mov(tmud, acc[r])
        mov(tmua, rc_ptr).add(rc_ptr, rc_ptr, rnb)
    tmuwt()
    end_program()


def sgemm_words() -> np.ndarray:
    return assemble(sgemm_kernel, name="sgemm_naive")


def run_sgemm(device, m: int, n: int, k: int, num_qpus: int | None = None, threads: int = 1, *,
              program=None, seed: int = 0):
    """Run the naive SGEMM on random inputs; returns (max abs error vs numpy, stats, GFLOP/s)."""
    if m % 16 or n % 16 or k < 1:
        raise ValueError("the naive SGEMM needs M and N multiples of 16")
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((m, k), dtype=np.float32)
    bm = rng.standard_normal((k, n), dtype=np.float32)
    ba, bb, bc = device.upload(a), device.upload(bm), device.alloc(m * n * 4)
    try:
        prog = program or device.load_program(sgemm_words(), "sgemm_naive")
        unif = np.array([ba.addr, bb.addr, bc.addr, k, k * 4, n * 4], dtype=np.uint32)
        stats = device.execute(prog, unif, workgroups=(n // 16, m // 16, 1), num_qpus=num_qpus,
                               threads=threads, timeout=3600)
        c = bc.view(np.float32, (m, n)).copy()
        err = float(np.max(np.abs(c - a.astype(np.float64) @ bm.astype(np.float64))))
        return err, stats, 2.0 * m * n * k / stats.seconds / 1e9
    finally:
        device.free(ba)
        device.free(bb)
        device.free(bc)
