#!/usr/bin/env python3
"""End-to-end check of tvm-qpu on a Raspberry Pi 5 GPU; prints a plain-text report for an issue.

    python scripts/pi5_selftest.py            # the real GPU (V3D 7.1 through /dev/dri/renderD*)
    python scripts/pi5_selftest.py --device emulator   # the same checks on the embedded emulator

Steps: identify the GPU (and its QPU count: slices x QPUs per slice from CORE0_IDENT1, since
sources disagree on 12 or 16), measure copy bandwidth (and check the copy), run a small fp32 GEMM, check
it against numpy and report its GFLOP/s measured on the device next to the emulator's modelled
figure for the same kernel. Exit status: 0 all checks passed, 1 a check failed, 2 no V3D device,
3 permission denied, 4 unsupported GPU.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import numpy as np

try:
    from tvm_qpu.codegen.asm import (L, R, add, assemble, b, eidx, fadd, fmul, ldtmu, ldunifrf, mov,
                                     nop, rf1, rf2, rf3, rf4, rf10, rf11, rf12, rf13, rf14, rf15,
                                     rf16, rf17, rf18, rf19, rf20, rf21, rf22, rf23, rf24, rf25, shl,
                                     shr, sub, thread_end, tmua, tmud, tmuwt, umul24)
    from tvm_qpu.runtime.device import DeviceError, open_device
except ImportError as _e:          # run from a checkout without `pip install -e .`
    print(f"tvm-qpu is not installed ({_e}); run `pip install -e .` in the repository first.")
    sys.exit(1)

EXIT_OK, EXIT_FAIL, EXIT_NO_DEVICE, EXIT_PERMISSION, EXIT_UNSUPPORTED = 0, 1, 2, 3, 4

# --------------------------------------------------------------------------------------------
# Kernels (assembler DSL). Each workgroup is one QPU thread of 16 lanes; the dispatch payload
# holds the workgroup ids: rf3 = y << 16 | x.
# --------------------------------------------------------------------------------------------
COPY_UNROLL = 4                         # 16-word chunks in flight per loop iteration
COPY_BLOCK = COPY_UNROLL * 16 * 4       # bytes one iteration copies (256)
COPY_REGS = (rf20, rf21, rf22, rf23)


def copy_kernel():
    """dst[i] = src[i] (32-bit words). Workgroup x copies blocks [x*n, (x+1)*n) of 256 bytes.

    Uniforms: src address, dst address, n (blocks per workgroup, >= 1).
    """
    eidx(rf10)
    shl(rf10, rf10, 2)                  # rf10 = lane * 4: this lane's byte offset in a chunk
    shl(rf16, rf3, -16)                 # shift counts are mod 32: -16 shifts by 16
    shr(rf16, rf16, -16)                # rf16 = x (low half of the payload)
    nop(sig=ldunifrf(rf11))             # rf11 = src
    nop(sig=ldunifrf(rf12))             # rf12 = dst
    nop(sig=ldunifrf(rf14))             # rf14 = n (loop counter)
    umul24(rf17, rf16, rf14)            # x * n
    shl(rf17, rf17, 8)                  # * 256 bytes per block
    add(rf11, rf11, rf17)
    add(rf12, rf12, rf17)
    add(rf11, rf11, rf10)               # per-lane source / destination pointers
    add(rf12, rf12, rf10)
    mov(rf15, 1)
    shl(rf15, rf15, 6)                  # rf15 = 64 bytes = one 16-lane chunk
    L.loop
    for _ in range(COPY_UNROLL):        # issue COPY_UNROLL loads (within the TMU queue depth)
        mov(tmua, rf11)
        add(rf11, rf11, rf15)
    sub(rf14, rf14, 1, cond="pushz")    # A = (blocks left == 0)
    for reg in COPY_REGS:               # collect the loaded words in order
        nop(sig=ldtmu(reg))
    for reg in COPY_REGS:               # store them: data to tmud, then the address to tmua
        mov(tmud, reg)
        mov(tmua, rf12)
        add(rf12, rf12, rf15)
    b(R.loop, cond="anyna")             # loop while blocks are left
    nop()
    nop()
    nop()
    tmuwt()                             # wait for the last stores
    thread_end()


def gemm_kernel():
    """C = A @ B (fp32, row-major; A is M x K, B is K x N, C is M x N, N a multiple of 16).

    Workgroup (x, y) computes C[y, 16x : 16x + 16], one output column per lane, with a plain
    K-step loop: load A[y, k] (the same address in every lane) and B[k, col], multiply, add.
    Uniforms: A, B, C addresses, K, N.
    """
    eidx(rf10)
    shl(rf10, rf10, 2)                  # lane byte offset
    shr(rf21, rf3, -16)                 # rf21 = y (row of C)
    shl(rf20, rf3, -16)
    shr(rf20, rf20, -16)                # rf20 = x (16-column block of C)
    nop(sig=ldunifrf(rf11))             # rf11 = A
    nop(sig=ldunifrf(rf12))             # rf12 = B
    nop(sig=ldunifrf(rf13))             # rf13 = C
    nop(sig=ldunifrf(rf14))             # rf14 = K (loop counter)
    nop(sig=ldunifrf(rf15))             # rf15 = N
    shl(rf16, rf15, 2)                  # rf16 = N * 4: row stride of B and C in bytes
    umul24(rf17, rf21, rf14)            # y * K
    shl(rf17, rf17, 2)
    add(rf11, rf11, rf17)               # rf11 = &A[y, 0]
    shl(rf18, rf20, 6)                  # x * 64
    add(rf18, rf18, rf10)               # byte offset of this lane's column
    add(rf12, rf12, rf18)               # rf12 = &B[0, col]
    umul24(rf19, rf21, rf16)            # y * N * 4
    add(rf13, rf13, rf19)
    add(rf13, rf13, rf18)               # rf13 = &C[y, col]
    mov(rf24, 0)                        # accumulator (integer 0 is +0.0f)
    mov(rf25, 1)
    shl(rf25, rf25, 2)                  # rf25 = 4 bytes: next element of A's row
    L.kloop
    mov(tmua, rf11)                     # A[y, k]
    mov(tmua, rf12)                     # B[k, col]
    sub(rf14, rf14, 1, cond="pushz")    # A flag = (k steps left == 0)
    nop(sig=ldtmu(rf1))
    nop(sig=ldtmu(rf2))
    fmul(rf4, rf1, rf2)
    fadd(rf24, rf24, rf4)               # acc += A[y, k] * B[k, col]
    b(R.kloop, cond="anyna")
    add(rf11, rf11, rf25)               # delay slots: advance along A's row and down B's column
    add(rf12, rf12, rf16)
    nop()
    mov(tmud, rf24)                     # store C[y, col]
    mov(tmua, rf13)
    tmuwt()
    thread_end()


# --------------------------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------------------------
def run_copy(dev, nbytes: int, reps: int = 3, timeout: float = 30.0) -> dict:
    """Copy ``nbytes`` (rounded to whole blocks per workgroup) with one workgroup per QPU thread;
    returns correctness and the best time. Bandwidth counts bytes read + bytes written."""
    groups = max(1, int(getattr(dev, "num_qpus", 12)))
    blocks = max(1, nbytes // (COPY_BLOCK * groups))
    nbytes = blocks * COPY_BLOCK * groups
    rng = np.random.default_rng(1)
    src_data = rng.integers(0, 2**32, size=nbytes // 4, dtype=np.uint32)
    prog = dev.load_program(assemble(copy_kernel), name="copy")
    src = dev.upload(src_data)
    dst = dev.alloc(nbytes)
    try:
        times = []
        for _ in range(reps):
            dst.view(np.uint32)[:] = 0
            t0 = time.perf_counter()
            stats = dev.execute(prog, np.array([src.addr, dst.addr, blocks], dtype=np.uint32),
                                workgroups=(groups, 1, 1), wg_size=16, timeout=timeout)
            wall = time.perf_counter() - t0
            times.append(stats.seconds if stats.seconds > 0 else wall)
        ok = bool(np.array_equal(dst.view(np.uint32, (nbytes // 4,)), src_data))
        best = min(times)
        return {"ok": ok, "bytes": nbytes, "workgroups": groups, "seconds": best,
                "gbps": 2 * nbytes / best / 1e9, "modeled": bool(getattr(stats, "modeled", False))}
    finally:
        dev.free(src)
        dev.free(dst)
        if prog.buffer is not None:
            dev.free(prog.buffer)


def cpu_copy_gbps(nbytes: int) -> float:
    a = np.ones(nbytes // 4, dtype=np.uint32)
    c = np.empty_like(a)
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        np.copyto(c, a)
        best = min(best, time.perf_counter() - t0)
    return 2 * nbytes / best / 1e9


def run_gemm(dev, m: int, n: int, k: int, timeout: float = 30.0) -> dict:
    """C = A @ B on the device; returns correctness, max error and GFLOP/s (measured or modelled
    as the device reports)."""
    if n % 16:
        raise ValueError("N must be a multiple of 16")
    rng = np.random.default_rng(2)
    a = rng.standard_normal((m, k)).astype(np.float32)
    bm = rng.standard_normal((k, n)).astype(np.float32)
    ref = a.astype(np.float64) @ bm.astype(np.float64)
    prog = dev.load_program(assemble(gemm_kernel), name="gemm")
    bufs = [dev.upload(a), dev.upload(bm), dev.alloc(m * n * 4)]
    try:
        stats = dev.execute(prog, np.array([bufs[0].addr, bufs[1].addr, bufs[2].addr, k, n], np.uint32),
                            workgroups=(n // 16, m, 1), wg_size=16, timeout=timeout)
        c = bufs[2].view(np.float32, (m, n)).copy()
        err = float(np.max(np.abs(c - ref))) if c.size else 0.0
        ok = bool(np.allclose(c, ref, rtol=1e-4, atol=1e-4 * max(1, k)))
        flops = 2.0 * m * n * k
        return {"ok": ok, "max_abs_err": err, "seconds": stats.seconds,
                "gflops": flops / stats.seconds / 1e9 if stats.seconds > 0 else float("nan"),
                "modeled": bool(stats.modeled), "shape": (m, n, k)}
    finally:
        for buf in bufs:
            dev.free(buf)
        if prog.buffer is not None:
            dev.free(prog.buffer)


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------
def _read(path: str) -> str:
    try:
        with open(path, "rb") as f:
            return f.read().replace(b"\0", b"").decode("utf-8", "replace").strip()
    except OSError:
        return "unknown"


def environment_lines() -> list:
    try:
        from importlib.metadata import version
        tq = version("tvm-qpu")
    except Exception:
        tq = "unknown"
    return [f"machine:  {_read('/proc/device-tree/model')} ({platform.machine()})",
            f"kernel:   {platform.release()}",
            f"python:   {platform.python_version()}, numpy {np.__version__}, tvm-qpu {tq}"]


def open_target(kind: str, node: str | None, timeout: float):
    """Open the device under test; returns (device, None) or (None, (exit code, message))."""
    if kind == "emulator":
        try:
            return open_device("emulator"), None
        except Exception as e:                                   # emulator not available
            return None, (EXIT_FAIL, f"the emulator is not available: {e}")
    try:
        from tvm_qpu.runtime import v3d
    except ImportError as e:
        return None, (EXIT_FAIL, f"the v3d driver module cannot be imported: {e}")
    errors = ((v3d.V3DNotFoundError, EXIT_NO_DEVICE), (v3d.DevicePermissionError, EXIT_PERMISSION),
              (v3d.UnsupportedGpuError, EXIT_UNSUPPORTED), (DeviceError, EXIT_FAIL))
    try:
        return v3d.V3DDevice(node, timeout=timeout), None
    except DeviceError as e:
        code = next(c for cls, c in errors if isinstance(e, cls))
        return None, (code, str(e))


def emulator_gemm(m, n, k) -> tuple:
    """The emulator's result for the same GEMM kernel, or (None, reason)."""
    try:
        emu = open_device("emulator")
    except Exception as e:
        return None, f"emulator unavailable ({type(e).__name__}: {e})"
    try:
        return run_gemm(emu, m, n, k), ""
    except Exception as e:
        return None, f"emulator run failed ({type(e).__name__}: {e})"
    finally:
        try:
            emu.close()
        except Exception:
            pass


PLANNED_QPUS = 12      # the QPU count kernel plans and the cycle model assume unless told otherwise


def qpu_lines(dev) -> list:
    """The QPU count (and where it comes from), the kernel's reset reporting, and a note when the
    count differs from what plans are compiled for."""
    info = getattr(dev, "info", None)
    if info is not None:
        lines = [f"qpus:     {dev.num_qpus} ({info.slices} slices x {info.qpus_per_slice} QPUs per slice, "
                 "from GET_PARAM CORE0_IDENT1)"]
        counter = getattr(dev, "reset_counter", None)
        lines.append(f"resets:   {'detected with GET_PARAM ' + counter if counter else 'no reset counter in this kernel: jobs running 0.5 s or more are refused'}")
    else:
        lines = [f"qpus:     {dev.num_qpus} ({dev.kind} parameter)"]
    if dev.num_qpus != PLANNED_QPUS:
        lines.append(f"note:     kernel plans are sized for {PLANNED_QPUS} QPUs by default; they run on "
                     f"{dev.num_qpus}, but launch sizes and modelled times assume {PLANNED_QPUS}")
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=("v3d", "emulator"), default="v3d")
    ap.add_argument("--node", help="render node to use (default: the one driven by v3d)")
    ap.add_argument("--copy-mib", type=float, default=16.0, help="copy size in MiB (default 16)")
    ap.add_argument("--gemm", type=int, nargs=3, default=(64, 64, 64), metavar=("M", "N", "K"))
    ap.add_argument("--timeout", type=float, default=30.0, help="seconds per GPU job")
    args = ap.parse_args(argv)

    out = ["tvm-qpu self-test", "=" * 17] + environment_lines()
    dev, failure = open_target(args.device, args.node, args.timeout)
    if failure:
        code, msg = failure
        print("\n".join(out + [f"device:   {msg}"]))
        return code
    results = []
    try:
        desc = dev.info.describe() if hasattr(dev, "info") else f"{dev.kind}, {dev.num_qpus} QPUs"
        out.append(f"device:   {getattr(dev, 'path', dev.kind)}: {desc}")
        out.extend(qpu_lines(dev))
        if hasattr(dev, "info"):
            out.append("params:   " + ", ".join(f"{k}={v:#x}" for k, v in dev.info.params.items()))

        nbytes = int(args.copy_mib * 2**20)
        try:
            cp = run_copy(dev, nbytes, timeout=args.timeout)
            results.append(cp["ok"])
            out.append(f"copy:     {'PASS' if cp['ok'] else 'FAIL'} {cp['bytes'] / 2**20:.1f} MiB, "
                       f"{cp['workgroups']} workgroups: {cp['gbps']:.2f} GB/s (read + write, "
                       f"{'modelled' if cp['modeled'] else 'measured'}); "
                       f"CPU numpy copy {cpu_copy_gbps(cp['bytes']):.2f} GB/s")
        except DeviceError as e:
            results.append(False)
            out.append(f"copy:     FAIL {e}")

        m, n, k = args.gemm
        try:
            g = run_gemm(dev, m, n, k, timeout=args.timeout)
            results.append(g["ok"])
            out.append(f"gemm:     {'PASS' if g['ok'] else 'FAIL'} {m}x{n}x{k} fp32, max |err| "
                       f"{g['max_abs_err']:.2e}: {g['gflops']:.3f} GFLOP/s "
                       f"{'modelled' if g['modeled'] else 'measured'} ({g['seconds'] * 1e3:.3f} ms)")
        except (DeviceError, ValueError) as e:
            results.append(False)
            out.append(f"gemm:     FAIL {e}")
        if args.device != "emulator":
            emu, why = emulator_gemm(m, n, k)
            if emu is None:
                out.append(f"emulator: {why}")
            else:
                out.append(f"emulator: same gemm {'PASS' if emu['ok'] else 'FAIL'}: "
                           f"{emu['gflops']:.3f} GFLOP/s modelled ({emu['seconds'] * 1e3:.3f} ms)")
    finally:
        dev.close()
    passed = sum(results)
    out.append(f"result:   {passed} passed, {len(results) - passed} failed")
    print("\n".join(out))
    return EXIT_OK if results and all(results) else EXIT_FAIL


if __name__ == "__main__":
    sys.exit(main())
