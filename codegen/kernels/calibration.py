"""Kernels the emulator's timing model is calibrated and benchmarked on.

Each calibration kernel has the *algorithm* of a kernel whose time was measured on a Pi 5, so
the modelled time can be compared with the measurement (docs/emulator.md, "Calibration"). They
are written here in our DSL from the published structure (facts read from py-videocore7's
``examples/scopy.py`` and ``examples/sgemm.py``), not copied.

* :func:`copy_kernel` - scopy's structure: per loop iteration two 256-byte vec4 loads (16 lanes
  x 16 bytes), a prefetch of the next source chunk (TMU op 0 without data), then the two
  chunks stored with vec4 stores; the TMU config word comes from the uniform stream, which a
  relative ``unif_addr`` branch rewinds every iteration. Like scopy, thread ``s`` starts at
  chunk ``s`` and strides by a power-of-two number of chunks (1 on 1 QPU, 8 on 12 QPUs:
  scopy's ``num_qpus_shift = 3``), so on 12 QPUs four threads repeat the work of four others
  and the kernel moves 1.5x the array's bytes (reads and writes), as the published run did.
* :func:`sgemm_tile_kernel` - examples/sgemm.py's structure: one 16 x 16 tile of C per thread
  (4096 threads for 1024^3, tile = (workgroup / tiles_n, workgroup % tiles_n)); per loop
  iteration four k steps: one vec4 TMU gather of A (lane l: 4 consecutive k of row l, 16
  distinct lines) and one vec4 load of B (lane l: row k + l / 4, columns 4 (l % 4) .. + 3, 4
  lines), issued at the top of the iteration for the *next* one (a thread switch on the second
  issue); 64 multiply-adds, each two instructions: ``rotate`` a B register by one lane while
  ``rep`` broadcasts its lane 0, then ``fadd`` of the previous product + ``fmul`` of the next;
  the next iteration's eight ``ldtmu`` ride on the last multiply-adds. C = alpha AB + beta C
  with vec4 loads and stores of C at the end. Launched, like the published run, as 2 threads
  per QPU.
* :func:`sgemm_kernel` - a straightforward fp32 SGEMM (one 16 x 16 tile per thread, one A
  column gather and one B row load per k, broadcast by ``shuffle``, no prefetch). It has no
  published counterpart; the emulator speed benchmark uses it.

Each comes with a host-side helper that allocates buffers on a device, runs the kernel and
returns the results and the modelled figures.
"""
from __future__ import annotations

import numpy as np

from ..asm import (R, L, assemble, add, b, band, barrierid, bnot, eidx, fadd, fmul, ldtmu,
                   ldunifrf, mov, nop, rep, rotate, shl, shr, shuffle, sub, syncb, thrsw, tmua,
                   tmuau, tmuc, tmud, tmuwt, umul24)
from ..instr import RF

#: TMU config byte: per-lane (1 << 7), regular op (15 << 3), vec4 (4) -> 0xFC; four lookups' worth
VEC4_CONFIG_WORD = 0xFCFCFCFC
#: the copy loop's config word, one byte per lookup in issue order: vec4 load, vec4 load,
#: prefetch (per-lane, op 0, no data: 0x80), vec4 store (scopy's 0xFC80FCFC)
COPY_CONFIG_WORD = 0xFC80FCFC
#: config of the second store of an iteration, written to tmuc (all bytes vec4 from byte 0)
VEC4_TMUC = 0xFFFFFFFC
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
# copy (structure of py-videocore7 examples/scopy.py)
# --------------------------------------------------------------------------------------------
def copy_kernel():
    """Uniforms: [iterations, src, dst, stride bytes, COPY_CONFIG_WORD, rewind (-8)].

    Thread s (workgroup x id s) copies chunks s, s + S, s + 2S, ... (S = stride / 256; 256
    bytes each, lane l moves bytes 16 l .. 16 l + 15 of a chunk), two per iteration."""
    rn, rsrc, rdst, rstride = RF[20], RF[21], RF[22], RF[23]
    t0, t1, rd = RF[10], RF[11], RF[12]
    nop(sig=ldunifrf(rn))
    nop(sig=ldunifrf(rsrc))
    nop(sig=ldunifrf(rdst))
    nop(sig=ldunifrf(rstride))
    # offset = wg_x * 256 + eidx * 16
    shl(t1, RF[3], -16)                  # shifts use b % 32: -16 = 16
    shr(t1, t1, -16)                     # rf3.ul: workgroup x id
    shl(t1, t1, 8)
    eidx(t0)
    shl(t0, t0, 4)
    add(t0, t0, t1)
    add(rsrc, rsrc, t0)
    add(rdst, rdst, t0)
    # scopy: one thread switch before the loop
    nop(sig=thrsw)
    nop()
    nop()
    L.loop
    mov(tmuau, rsrc).add(rsrc, rsrc, rstride)       # config word from the uniform stream
    mov(tmua, rsrc).add(rsrc, rsrc, rstride)
    mov(tmua, rsrc)                                  # prefetch of the next chunk
    nop(sig=ldtmu(rd))
    mov(tmud, rd, sig=ldtmu(rd))
    mov(tmud, rd, sig=ldtmu(rd))
    mov(tmud, rd, sig=ldtmu(rd))
    mov(tmud, rd)
    mov(tmua, rdst).add(rdst, rdst, rstride)
    bnot(tmuc, 3)                                    # 0xFFFFFFFC: vec4 store
    nop(sig=ldtmu(rd))
    mov(tmud, rd, sig=ldtmu(rd))
    mov(tmud, rd, sig=ldtmu(rd))
    sub(rn, rn, 1, cond="pushz")
    b(R.loop, cond="na0").unif_addr()               # rewind the stream to the config word
    mov(tmud, rd, sig=ldtmu(rd))
    mov(tmud, rd)
    mov(tmua, rdst).add(rdst, rdst, rstride)
    barrierid(syncb, sig=thrsw)
    nop()
    nop()
    end_program()


def copy_words() -> np.ndarray:
    return assemble(copy_kernel, name="copy")


def copy_stride_slots(n_threads: int) -> int:
    """scopy's stride in chunks: the largest power of two <= the thread count (8 for 12)."""
    if n_threads < 1:
        raise ValueError(f"copy needs at least one thread, got {n_threads}")
    return 1 << (n_threads.bit_length() - 1)


def copy_uniforms(n_words: int, src_addr: int, dst_addr: int, n_threads: int) -> np.ndarray:
    slots = copy_stride_slots(n_threads)
    step = COPY_STEP_BYTES * slots
    nbytes = n_words * 4
    if nbytes % step or nbytes // step < 1:
        raise ValueError(f"copy of {n_words} words needs a multiple of {step // 4} words "
                         f"for {n_threads} threads")
    return np.array([nbytes // step, src_addr, dst_addr, COPY_CHUNK_BYTES * slots,
                     COPY_CONFIG_WORD, (-8) & 0xFFFFFFFF], dtype=np.uint32)


def copy_traffic_bytes(n_words: int, n_threads: int) -> int:
    """Bytes the copy really reads (= writes): every thread moves n_words * 4 / slots."""
    return n_threads * (n_words * 4 // copy_stride_slots(n_threads))


def run_copy(device, n_words: int, num_qpus: int, threads: int = 1, *, program=None, seed: int = 0):
    """Copy ``n_words`` uint32 on ``num_qpus`` QPUs x ``threads``; returns (ok, stats, GB/s)
    with GB/s = array bytes / modelled time, as scopy reports it (the kernel moves
    :func:`copy_traffic_bytes`, more when the thread count is not a power of two)."""
    nthreads = num_qpus * threads
    slots = copy_stride_slots(nthreads)
    # threads beyond the stride run past the array end (scopy's data area has the same slack),
    # and the last prefetch looks one chunk ahead
    pad = COPY_CHUNK_BYTES * (nthreads - slots + 2)
    src = device.alloc(n_words * 4 + pad)
    dst = device.alloc(n_words * 4 + pad)
    try:
        x = src.view(np.uint32)[:n_words]
        x[:] = np.random.default_rng(seed).integers(0, 1 << 32, n_words, dtype=np.uint32)
        prog = program or device.load_program(copy_words(), "copy")
        unif = copy_uniforms(n_words, src.addr, dst.addr, nthreads)
        stats = device.execute(prog, unif, workgroups=(nthreads, 1, 1), num_qpus=num_qpus,
                               threads=threads, timeout=600)
        ok = bool(np.array_equal(dst.view(np.uint32)[:n_words], x))
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


# --------------------------------------------------------------------------------------------
# SGEMM with the structure of py-videocore7 examples/sgemm.py
# --------------------------------------------------------------------------------------------
SGEMM_TILE_UNIFORMS = ("A", "B", "C", "iterations (K / 4)", "A row stride", "B row stride",
                       "C row stride", "alpha (fp32 bits)", "beta (fp32 bits)")


def sgemm_tile_kernel():
    """C = alpha A @ B + beta C (row-major fp32), one 16 x 16 tile of C per thread, workgroup
    (x = tile column j, y = tile row i). Uniforms: :data:`SGEMM_TILE_UNIFORMS`.

    Lane l owns row 16 i + l of the tile; ``acc[n]`` is column 16 j + n. Per iteration (k, k+1,
    k+2, k+3): ``ra[w]`` = A[row, k + w] (one vec4 gather), ``rb[w]`` lane l = B[k + l / 4,
    16 j + 4 (l % 4) + w] (one vec4 load). Column n = 4 c + w takes B[k + g, 16 j + n] from
    ``rb[w]``, lane 4 g + c: each use rotates ``rb[w]`` by one lane, so the uses of ``rb[w]``
    walk its lanes 0, 1, 2, ... in order; the B loads and A loads of the next iteration are
    issued at the top, A and B past the end of the matrices are read by the last iteration
    (the host pads them, as the published kernel relies on adjacent memory)."""
    ra_ptr, rb_ptr, rc_ptr, rn = RF[12], RF[14], RF[15], RF[11]
    ra_stride, rb_step, rc_stride = RF[32], RF[13], RF[33]
    ralpha, rbeta, t0, t1 = RF[34], RF[35], RF[36], RF[37]
    ra = [RF[3], RF[4], RF[5], RF[6]]
    rb = [RF[7], RF[8], RF[9], RF[10]]
    ra3_next = RF[2]
    prod = RF[1]
    acc = [RF[16 + i] for i in range(16)]
    nop(sig=ldunifrf(ra_ptr))
    nop(sig=ldunifrf(rb_ptr))
    nop(sig=ldunifrf(rc_ptr))
    nop(sig=ldunifrf(rn))
    nop(sig=ldunifrf(ra_stride))
    nop(sig=ldunifrf(rb_step))
    nop(sig=ldunifrf(rc_stride))
    nop(sig=ldunifrf(ralpha))
    nop(sig=ldunifrf(rbeta))
    # rows: 16 i + eidx ; A pointer = A + row * a_stride ; C pointer = C + row * c_stride + 64 j
    shr(t0, RF[3], -16)                      # y = tile row i (shift amounts are taken mod 32)
    shl(t0, t0, 4)
    eidx(t1)
    add(t0, t0, t1)                          # row
    umul24(t1, t0, ra_stride)
    add(ra_ptr, ra_ptr, t1)
    umul24(t1, t0, rc_stride)
    add(rc_ptr, rc_ptr, t1)
    shl(t0, RF[3], -16)
    shr(t0, t0, -16)                         # x = tile column j
    shl(t0, t0, 6)                           # 64 j bytes
    add(rc_ptr, rc_ptr, t0)
    add(rb_ptr, rb_ptr, t0)
    # B lane offset: (eidx / 4) * b_stride + 16 (eidx % 4)
    eidx(t1)
    shr(t0, t1, 2)
    umul24(t0, t0, rb_step)
    band(t1, t1, 3)
    shl(t1, t1, 4)
    add(t0, t0, t1)
    add(rb_ptr, rb_ptr, t0)
    shl(rb_step, rb_step, 2)                 # 4 rows of B per iteration
    # the first iteration's operands
    bnot(tmuc, 3)
    mov(tmua, ra_ptr)
    bnot(tmuc, 3)
    mov(tmua, rb_ptr, sig=thrsw).add(rb_ptr, rb_ptr, rb_step)
    sub(ra_ptr, ra_ptr, -16)
    for i in range(16):
        mov(acc[i], 0)
    for w in range(4):
        nop(sig=ldtmu(ra[w]))
    for w in range(4):
        nop(sig=ldtmu(rb[w]))

    # ---- the k loop: 4 k steps, 64 multiply-adds of two instructions each ----
    # multiply-add m (0..63): column n = m % 16 from rb[n % 4], k step g = m // 16 (ra[g]).
    # Instruction pair m: (rotate rb + rep broadcast), (fadd acc[m-1] += prod, fmul prod = bcast x ra)
    # the eight ldtmu of the next iteration ride on the last pairs' second instructions.
    loads = [ra[0], ra[1], ra[2], ra3_next, rb[0], rb[1], rb[2], rb[3]]
    L.kloop
    bnot(tmuc, 3)
    mov(tmua, ra_ptr)
    bnot(tmuc, 3)
    mov(tmua, rb_ptr, sig=thrsw).add(rb_ptr, rb_ptr, rb_step)
    sub(ra_ptr, ra_ptr, -16)
    for m in range(64):
        if m == 63:
            b(R.kloop, cond="anyna")         # delay slots: pair 63 and the last fadd
        src = rb[m % 4]
        rotate(src, src, 1).mov(rep, src)
        g = m // 16
        ld = m - 57                          # ldtmu on pairs 57..63 and the last fadd
        if m == 0:
            sub(rn, rn, 1, cond="pushz").fmul(prod, RF[0], ra[g])
        elif ld >= 0:
            fadd(acc[(m - 1) % 16], acc[(m - 1) % 16], prod,
                 sig=ldtmu(loads[ld])).fmul(prod, RF[0], ra[g])
        else:
            fadd(acc[(m - 1) % 16], acc[(m - 1) % 16], prod).fmul(prod, RF[0], ra[g])
    fadd(acc[15], acc[15], prod, sig=ldtmu(loads[7])).mov(ra[3], ra3_next)

    # ---- C = alpha acc + beta C, four vec4 columns at a time ----
    for q in range(4):
        bnot(tmuc, 3)
        mov(tmua, rc_ptr, sig=thrsw)
        for w in range(4):
            fmul(acc[4 * q + w], acc[4 * q + w], ralpha)
        bnot(tmuc, 3)
        for w in range(4):
            nop(sig=ldtmu(t0))
            fmul(t1, t0, rbeta)
            fadd(tmud, acc[4 * q + w], t1)
        mov(tmua, rc_ptr).sub(rc_ptr, rc_ptr, -16)
    tmuwt()
    end_program()


def sgemm_tile_words() -> np.ndarray:
    return assemble(sgemm_tile_kernel, name="sgemm_tile")


def run_sgemm_tile(device, m: int, n: int, k: int, num_qpus: int | None = None, threads: int = 2,
                   *, program=None, seed: int = 0):
    """Run :func:`sgemm_tile_kernel` on random A, B, C, alpha, beta (as examples/sgemm.py does);
    returns (max abs error vs numpy in float64, stats, GFLOP/s counted as the published run:
    (2 m n k + 3 m n) / time)."""
    if m % 16 or n % 16 or k % 4 or k < 4:
        raise ValueError(f"the tile SGEMM needs M, N multiples of 16 and K a multiple of 4, got "
                         f"{m}x{n}x{k}")
    rng = np.random.default_rng(seed)
    alpha, beta = np.float32(rng.standard_normal()), np.float32(rng.standard_normal())
    a = rng.standard_normal((m, k), dtype=np.float32)
    bm = rng.standard_normal((k, n), dtype=np.float32)
    c0 = rng.standard_normal((m, n), dtype=np.float32)
    # the last iteration loads (and discards) 4 words past each A row and 4 rows past B
    ba = device.upload(np.concatenate([a.ravel(), np.zeros(4, np.float32)]))
    bb = device.upload(np.concatenate([bm.ravel(), np.zeros(4 * n, np.float32)]))
    bc = device.upload(c0)
    try:
        prog = program or device.load_program(sgemm_tile_words(), "sgemm_tile")
        unif = np.array([ba.addr, bb.addr, bc.addr, k // 4, k * 4, n * 4, n * 4,
                         int(alpha.view(np.uint32)), int(beta.view(np.uint32))], dtype=np.uint32)
        stats = device.execute(prog, unif, workgroups=(n // 16, m // 16, 1), num_qpus=num_qpus,
                               threads=threads, timeout=3600)
        c = bc.view(np.float32, (m, n)).copy()
        ref = (float(alpha) * (a.astype(np.float64) @ bm.astype(np.float64))
               + float(beta) * c0.astype(np.float64))
        err = float(np.max(np.abs(c - ref)))
        return err, stats, (2.0 * m * n * k + 3.0 * m * n) / stats.seconds / 1e9
    finally:
        device.free(ba)
        device.free(bb)
        device.free(bc)
