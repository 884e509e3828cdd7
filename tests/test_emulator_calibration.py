"""The timing model: published Pi 5 calibration points (+-20%, on kernels with the published
algorithms) and properties showing that time comes out of the simulation (latency hiding by
threads, shared L2 port / DRAM / slice TMU / uniform cache, clock scaling).

Unmarked checks use small sizes that exercise the same steady state as the published runs:
the copy of 192 Ki words runs the same loop as the 24 Mi-word copy (per-iteration time is set
by the DRAM latency on 1 QPU and by the shared L2 port on 12 QPUs, independent of length);
the 256^3 SGEMM runs the same per-tile loop (L2-port bound) as 1024^3, with 11 waves of 24
threads instead of 171. The full-size runs are marked slow."""
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from tvm_qpu.codegen import asm as A
from tvm_qpu.codegen.asm import L, R, b, nop, ldtmu, ldunifrf, thrsw
from tvm_qpu.codegen.instr import RF
from tvm_qpu.codegen.kernels import calibration as K
from tvm_qpu.runtime import cycle_model
from tvm_qpu.runtime.emulator import EmulatorDevice

from test_emulator_support import assemble_fn

TOL = 0.20
COPY_1, COPY_12 = cycle_model.CALIBRATION_POINTS["copy_1qpu_gbps"][0], cycle_model.CALIBRATION_POINTS["copy_12qpu_gbps"][0]
SGEMM_12 = cycle_model.CALIBRATION_POINTS["sgemm_12qpu_gflops"][0]
SMALL_COPY = 3 << 16                 # 192 Ki words


@pytest.fixture(scope="module")
def dev():
    return EmulatorDevice(memory_size=512 << 20)


def within(x, ref):
    return abs(x - ref) <= TOL * ref


@pytest.mark.parametrize("nq,ref", [(1, COPY_1), (12, COPY_12)])
def test_copy_bandwidth_small(dev, nq, ref):
    ok, st, gbps = K.run_copy(dev, SMALL_COPY, nq)
    assert ok
    assert within(gbps, ref), f"{gbps:.2f} GB/s vs {ref} on {nq} QPU(s)"
    # scopy's stride is set for 8 threads on 12 QPUs: 12 threads x 1/8 of the array each
    moved = SMALL_COPY * 4 if nq == 1 else 12 * (SMALL_COPY * 4 // 8)
    assert st.bytes_loaded == st.bytes_stored == moved


@pytest.mark.slow
@pytest.mark.parametrize("nq,ref", [(1, COPY_1), (12, COPY_12)])
def test_copy_bandwidth_24mi(nq, ref):
    dev = EmulatorDevice(memory_size=640 << 20)
    ok, st, gbps = K.run_copy(dev, 24 << 20, nq)
    assert ok and within(gbps, ref), f"{gbps:.2f} GB/s vs {ref}"


def test_sgemm_tile_256(dev):
    err, st, gflops = K.run_sgemm_tile(dev, 256, 256, 256)
    assert err < 1e-3
    assert within(gflops, SGEMM_12), f"{gflops:.1f} GFLOP/s vs {SGEMM_12}"
    assert gflops < cycle_model.DEFAULT.peak_gflops()


@pytest.mark.slow
def test_sgemm_tile_1024():
    dev = EmulatorDevice(memory_size=256 << 20)
    err, st, gflops = K.run_sgemm_tile(dev, 1024, 1024, 1024)
    assert err < 1e-2
    assert within(gflops, SGEMM_12), f"{gflops:.1f} GFLOP/s vs {SGEMM_12}"


def test_sgemm_tile_correct_on_small_shapes(dev):
    for (m, n, k, nq) in ((16, 16, 4, 1), (48, 32, 20, 5)):
        err, st, _ = K.run_sgemm_tile(dev, m, n, k, num_qpus=nq)
        assert err < 1e-4, (m, n, k)


def test_sgemm_correct_on_odd_shapes(dev):
    err, st, _ = K.run_sgemm(dev, 48, 32, 37, num_qpus=5, threads=2)
    assert err < 1e-3


# ---------------------------------------------------------------- model properties
def alu_loop(n):
    def k():
        A.mov(RF[5], n)
        L.top
        A.sub(RF[5], RF[5], 1, cond="pushz")
        b(R.top, cond="na0")
        A.fadd(RF[6], RF[6], RF[6]).fmul(RF[7], RF[7], RF[7])
        nop()
        nop()
        K.end_program()
    return k


def test_alu_only_code_runs_at_four_cycles_per_instruction(dev):
    prog = dev.load_program(assemble_fn(alu_loop(15)), "alu")
    st = dev.execute(prog, [], workgroups=(12, 1, 1))
    per_thread = st.instructions // 12
    assert st.cycles == 4 * per_thread and st.stall_cycles == 0
    dev.free(prog.buffer)


def latency_kernel(rounds):
    """Each round: one dependent load (thrsw while it is in flight), then a little ALU work."""
    def k():
        nop(sig=ldunifrf(RF[10]))
        A.eidx(RF[11])
        A.shl(RF[11], RF[11], 2)
        A.add(RF[10], RF[10], RF[11])
        A.mov(RF[12], rounds)
        L.top
        A.mov(A.tmua, RF[10], sig=thrsw)
        nop()
        nop()
        nop(sig=ldtmu(RF[13]))
        for _ in range(6):
            A.add(RF[14], RF[14], RF[13])
        A.sub(RF[12], RF[12], 1, cond="pushz")
        b(R.top, cond="na0")
        nop()
        nop()
        nop()
        K.end_program()
    return k


def test_threads_hide_tmu_latency(dev):
    """Same total work (8 workgroups on one QPU): 2 and 4 threads overlap one thread's load
    latency with another's instructions, so the modelled time drops below 8 workgroups run one
    at a time. (threads=1 writes the same cfg words as 2: the Pi 5 keeps 2 threads resident.)"""
    prog = dev.load_program(assemble_fn(latency_kernel(10)), "lat")
    buf = dev.alloc(64)
    cyc, instrs = {}, set()
    for t in (1, 2, 4):
        st = dev.execute(prog, [buf.addr], workgroups=(8, 1, 1), num_qpus=1, threads=t)
        cyc[t] = st.cycles
        instrs.add(st.instructions)
    one = dev.execute(prog, [buf.addr], workgroups=(1, 1, 1), num_qpus=1, threads=2)
    assert len(instrs) == 1 and one.instructions * 8 in instrs     # same work
    assert cyc[1] == cyc[2]
    assert cyc[2] < 0.75 * 8 * one.cycles and cyc[4] < cyc[2]
    dev.free(buf)
    dev.free(prog.buffer)


def test_copy_on_12_qpus_is_bound_by_the_shared_l2_port_and_dram():
    """The 12-QPU copy is limited by shared resources, not by the QPUs: a wider L2 port speeds
    it up, a narrower DRAM channel slows it down; 12 QPUs are far from 12x one QPU."""
    def copy12(**kw):
        d = EmulatorDevice(memory_size=64 << 20, timing=cycle_model.DEFAULT.with_(**kw))
        ok, st, g = K.run_copy(d, SMALL_COPY // 4, 12)
        assert ok
        return g
    base = EmulatorDevice(memory_size=64 << 20)
    _, _, g1 = K.run_copy(base, SMALL_COPY // 4, 1)
    g12 = copy12()
    assert g12 < 4 * g1
    assert copy12(l2_cycles_per_line=2.0, dram_bytes_per_cycle=17.8) > 1.25 * g12
    assert copy12(dram_bytes_per_cycle=5.0) < 0.75 * g12


def _gather_kernel(rounds):
    """Each round: 4 lookups whose 16 lanes touch 16 different lines, then their 4 results."""
    def k():
        nop(sig=ldunifrf(RF[10]))
        A.eidx(RF[11])
        A.shl(RF[11], RF[11], 6)
        A.add(RF[10], RF[10], RF[11])
        A.mov(RF[12], rounds)
        L.top
        for _ in range(4):
            A.mov(A.tmua, RF[10])
        for _ in range(4):
            nop(sig=ldtmu(RF[13]))
        A.sub(RF[12], RF[12], 1, cond="pushz")
        b(R.top, cond="na0")
        nop()
        nop()
        nop()
        K.end_program()
    return k


def test_tmu_is_shared_by_the_qpus_of_a_slice():
    """Four QPUs gathering (16 lines per lookup) with a slow TMU: one TMU per slice makes them
    take about 4x as long as one TMU per QPU."""
    cyc = {}
    for qps in (1, 4):
        m = cycle_model.DEFAULT.with_(qpus_per_slice=qps, tmu_cycles_per_line=8.0,
                                      l2_cycles_per_line=0.0)
        d = EmulatorDevice(memory_size=16 << 20, timing=m)
        buf = d.alloc(1024)
        prog = d.load_program(assemble_fn(_gather_kernel(15)), "gather")
        cyc[qps] = d.execute(prog, [buf.addr], workgroups=(4, 1, 1), num_qpus=4).cycles
    assert 3.0 * cyc[1] < cyc[4] < 4.5 * cyc[1]


def test_l2_port_is_shared_by_all_slices():
    """Twelve QPUs (three slices) gathering: the L2 port serves one line per
    l2_cycles_per_line for all of them, so doubling it nearly doubles the time."""
    cyc = {}
    for cpl in (4.0, 8.0):
        d = EmulatorDevice(memory_size=16 << 20,
                           timing=cycle_model.DEFAULT.with_(l2_cycles_per_line=cpl))
        buf = d.alloc(1024)
        prog = d.load_program(assemble_fn(_gather_kernel(15)), "gather")
        cyc[cpl] = d.execute(prog, [buf.addr], workgroups=(12, 1, 1)).cycles
    assert cyc[8.0] > 1.7 * cyc[4.0]


def _uniform_reader(n):
    def k():
        for _ in range(n):
            nop(sig=ldunifrf(RF[5]))
        K.end_program()
    return k


def test_uniform_cache_fills_are_shared_by_a_slice():
    """Each thread reads 128 uniforms (8 lines); with a slow fill port, four QPUs of one slice
    wait for each other's fills, four QPUs of four slices do not."""
    cyc = {}
    for qps in (1, 4):
        m = cycle_model.DEFAULT.with_(qpus_per_slice=qps, uniform_cycles_per_line=64.0)
        d = EmulatorDevice(memory_size=16 << 20, timing=m)
        prog = d.load_program(assemble_fn(_uniform_reader(128)), "unif")
        cyc[qps] = d.execute(prog, np.arange(128, dtype=np.uint32), workgroups=(4, 1, 1),
                             num_qpus=4).cycles
    assert cyc[4] > 2.0 * cyc[1]


def test_prefetch_op_fills_the_l2(dev):
    """A TMU prefetch (op 0 without data, scopy's 0x80 config byte) returns nothing but
    brings its lines into the L2: a later load of them hits."""
    def k(prefetch):
        def kern():
            nop(sig=ldunifrf(RF[10]))
            A.eidx(RF[11])
            A.shl(RF[11], RF[11], 2)
            A.add(RF[10], RF[10], RF[11])
            if prefetch:
                A.mov(RF[12], -1)
                A.shl(RF[12], RF[12], 7)        # config 0xFFFFFF80: per-lane prefetch first
                A.mov(A.tmuc, RF[12])
                A.mov(A.tmua, RF[10])
            for _ in range(100):
                nop()
            A.mov(A.tmua, RF[10])
            nop(sig=ldtmu(RF[13]))
            K.end_program()
        return kern
    buf = dev.alloc(4096)
    st = {}
    for pf in (False, True):
        prog = dev.load_program(assemble_fn(k(pf)), "pf")
        st[pf] = dev.execute(prog, [buf.addr], num_qpus=1)
        dev.free(prog.buffer)
    dev.free(buf)
    assert st[True].tmu_loads == st[False].tmu_loads == 1
    assert st[True].l2_hits == st[False].l2_hits + 1
    assert st[True].cycles < st[False].cycles


def test_clock_and_qpu_count_are_parameters():
    a = EmulatorDevice(memory_size=16 << 20)
    b_ = EmulatorDevice(memory_size=16 << 20, clock_hz=800e6, num_qpus=16)
    assert b_.num_qpus == 16 and len(b_.execute(b_.load_program(assemble_fn(alu_loop(3))), []).per_qpu_cycles) == 16
    pa = a.load_program(assemble_fn(alu_loop(3)))
    pb = b_.load_program(assemble_fn(alu_loop(3)))
    sa, sb = a.execute(pa, []), b_.execute(pb, [])
    assert sa.cycles == sb.cycles and sb.seconds == pytest.approx(sa.seconds * 960 / 800)
    assert cycle_model.DEFAULT.peak_gflops() == pytest.approx(92.16)


def test_every_parameter_is_documented():
    import inspect
    src = inspect.getsource(cycle_model.TimingModel)
    lines = src.splitlines()
    for name in cycle_model.PARAMETERS:
        i = next(k for k, ln in enumerate(lines) if ln.startswith(f"    {name}:"))
        assert lines[i - 1].strip().startswith("#:"), f"{name} has no documented source"
        j = i
        while lines[j - 1].strip().startswith("#:"):
            j -= 1
        comment = " ".join(lines[j:i])
        if name in cycle_model.RANGES:           # an unpinned value points at its range
            assert "RANGES" in comment, f"{name}: say that its value is a RANGES assumption"


# ---------------------------------------------------------------- numba cache
def test_numba_cache_is_used_across_processes():
    """A second process loads the compiled core from the on-disk cache (no recompilation)."""
    code = textwrap.dedent("""
        import numpy as np
        from tvm_qpu.runtime.emulator import EmulatorDevice
        from tvm_qpu.runtime import emu_core
        from tvm_qpu.codegen.kernels.calibration import copy_words
        dev = EmulatorDevice(memory_size=8 << 20)
        from tvm_qpu.codegen.kernels import calibration as K
        ok, st, g = K.run_copy(dev, 3 << 10, 1)
        assert ok
        print(sum(emu_core.run.stats.cache_hits.values()), sum(emu_core.run.stats.cache_misses.values()))
    """)
    out = None
    for _ in range(2):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stderr
    hits, misses = (int(v) for v in out.stdout.split())
    assert hits >= 1 and misses == 0


def test_numba_cache_dir_fallback_logic(monkeypatch, tmp_path):
    """When the package directory is not writable and NUMBA_CACHE_DIR is unset, the cache goes
    to $XDG_CACHE_HOME/tvm_qpu/numba, else to a per-user temp directory."""
    from tvm_qpu.runtime import emu_core
    here = os.path.dirname(emu_core.__file__)
    monkeypatch.setattr(emu_core._numba_config, "CACHE_DIR", "")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    real = emu_core._dir_writable
    monkeypatch.setattr(emu_core, "_dir_writable", lambda p: not p.startswith(here) and real(p))
    assert emu_core.ensure_numba_cache_dir() == str(tmp_path / "xdg" / "tvm_qpu" / "numba")
    assert emu_core._numba_config.CACHE_DIR == str(tmp_path / "xdg" / "tvm_qpu" / "numba")
    monkeypatch.setattr(emu_core._numba_config, "CACHE_DIR", "")
    monkeypatch.setattr(emu_core, "_dir_writable", lambda p: "tvm_qpu-numba-" in p and real(p))
    assert "tvm_qpu-numba-" in emu_core.ensure_numba_cache_dir()
    monkeypatch.setattr(emu_core._numba_config, "CACHE_DIR", "/some/where")
    assert emu_core.ensure_numba_cache_dir() == "/some/where"        # the user's choice wins


@pytest.mark.slow
@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root ignores read-only permissions")
def test_numba_cache_for_read_only_install(tmp_path):
    """Installed read-only: the cache falls back to $XDG_CACHE_HOME/tvm_qpu/numba."""
    import shutil
    import tvm_qpu.codegen
    import tvm_qpu.runtime
    pkg = tmp_path / "site" / "tvm_qpu"
    shutil.copytree(os.path.dirname(tvm_qpu.__file__), pkg, ignore=shutil.ignore_patterns("__pycache__"))
    for sub, mod in (("codegen", tvm_qpu.codegen), ("runtime", tvm_qpu.runtime)):
        shutil.copytree(os.path.dirname(mod.__file__), pkg / sub, dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns("__pycache__"))
    for root, dirs, files in os.walk(tmp_path / "site"):
        for f in files:
            os.chmod(os.path.join(root, f), 0o444)
        os.chmod(root, 0o555)
    cache = tmp_path / "cache"
    env = dict(os.environ, PYTHONPATH=str(tmp_path / "site"), XDG_CACHE_HOME=str(cache))
    env.pop("NUMBA_CACHE_DIR", None)
    code = ("from tvm_qpu.runtime import emu_core; from tvm_qpu.runtime.emulator import EmulatorDevice;"
            "from tvm_qpu.codegen.kernels import calibration as K;"
            "d = EmulatorDevice(memory_size=8 << 20); ok, st, g = K.run_copy(d, 3 << 10, 1); assert ok;"
            "print(emu_core.NUMBA_CACHE_DIR, sum(emu_core.run.stats.cache_hits.values()))")
    try:
        outs = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                               cwd=tmp_path, timeout=900) for _ in range(2)]
    finally:
        for root, dirs, files in os.walk(tmp_path / "site"):
            os.chmod(root, 0o755)
    for o in outs:
        assert o.returncode == 0, o.stderr
    where, hits = outs[1].stdout.split()
    assert where == str(cache / "tvm_qpu" / "numba") and int(hits) >= 1


def _loads_then_work(n_loads, n_work):
    def k():
        nop(sig=ldunifrf(RF[10]))
        A.eidx(RF[11])
        A.shl(RF[11], RF[11], 2)
        A.add(RF[10], RF[10], RF[11])
        for _ in range(n_loads):
            A.mov(A.tmua, RF[10])
        for _ in range(n_work):
            A.add(RF[12], RF[12], 1)
        for _ in range(n_loads):
            nop(sig=ldtmu(RF[13]))
        K.end_program()
    return k


def test_ldtmu_stalls_until_data_and_work_overlaps_latency(dev):
    buf = dev.alloc(64)
    res = {}
    for loads, work in ((1, 0), (1, 10), (1, 60), (0, 60)):
        prog = dev.load_program(assemble_fn(_loads_then_work(loads, work)), "ldtmu")
        st = dev.execute(prog, [buf.addr], num_qpus=1)
        res[loads, work] = st
        dev.free(prog.buffer)
    lat = cycle_model.DEFAULT.tmu_latency
    # the uniform stream's first line costs the same with or without the TMU load
    unif = res[0, 60].stall_cycles
    assert unif >= lat
    assert res[1, 0].stall_cycles >= unif + lat - 8
    assert res[1, 10].stall_cycles == res[1, 0].stall_cycles - 40     # 10 instructions hid 40 cycles
    assert res[1, 60].stall_cycles == unif                          # the load's latency fully hidden
    assert abs(res[1, 60].cycles - (4 * res[1, 60].instructions + unif)) <= 1   # cycles round up
    dev.free(buf)


def _loads_switch_pops(n_loads):
    """n loads, a thread switch (the other thread issues its n), then the n pops."""
    def k():
        nop(sig=ldunifrf(RF[10]))
        A.eidx(RF[11])
        A.shl(RF[11], RF[11], 2)
        A.add(RF[10], RF[10], RF[11])
        for _ in range(n_loads):
            A.mov(A.tmua, RF[10])
        nop(sig=thrsw)
        nop()
        nop()
        for _ in range(n_loads):
            nop(sig=ldtmu(RF[13]))
        K.end_program()
    return k


def test_request_queue_depth_stalls_issue(dev):
    """The QPU's 9th lookup in flight waits for the first to complete (queue depth 8, per QPU).
    Two threads issue n loads each (a thread may hold only 8 FIFO words): at n = 5 the second
    thread's 4th load is the 9th."""
    deep = EmulatorDevice(memory_size=1 << 20,
                          timing=cycle_model.DEFAULT.with_(request_queue_depth=64))
    extra = {}                                   # cycles the 5th load per thread adds
    for d in (dev, deep):
        buf = d.alloc(64)
        t = {}
        for n in (4, 5):
            prog = d.load_program(assemble_fn(_loads_switch_pops(n)), "queue")
            t[n] = d.execute(prog, [buf.addr], workgroups=(2, 1, 1), num_qpus=1).cycles
            d.free(prog.buffer)
        d.free(buf)
        extra[d is deep] = t[5] - t[4]
    # with depth 8 issuing the 9th lookup stalled; with a deep queue it did not
    assert extra[False] - extra[True] > cycle_model.DEFAULT.tmu_latency / 4, extra


# ---------------------------------------------------------------- uncertainty bands
def test_every_parameter_is_pinned_or_has_a_range():
    names = set(cycle_model.PARAMETERS)
    assert set(cycle_model.RANGES) | set(cycle_model.PINNED) == names
    assert not set(cycle_model.RANGES) & set(cycle_model.PINNED)
    for n, r in cycle_model.RANGES.items():
        assert r.low < r.high and r.why, n
        assert r.low <= getattr(cycle_model.DEFAULT, n) <= r.high, n


def test_corners_and_band_bracket_the_model(dev):
    fast, slow = cycle_model.DEFAULT.corners()
    for n, r in cycle_model.RANGES.items():
        assert {getattr(fast, n), getattr(slow, n)} == {r.low, r.high}
    for n in cycle_model.PINNED:
        assert getattr(fast, n) == getattr(slow, n) == getattr(cycle_model.DEFAULT, n)

    def copy_seconds(model):
        d = EmulatorDevice(memory_size=16 << 20, timing=model)
        ok, st, _ = K.run_copy(d, 3 << 12, 12)
        assert ok
        return st.seconds

    band = cycle_model.DEFAULT.band(copy_seconds)
    assert band.low <= band.value <= band.high and band.low < band.high
    assert str(band).count("[") == 1


@pytest.mark.parametrize("name", sorted(cycle_model.ALTERNATIVES))
def test_each_structural_alternative_reproduces_the_calibration_points(name):
    """An alternative mechanism only widens the bands if it explains the published
    measurements as well (+-20%, small sizes of the same steady state)."""
    m = cycle_model.DEFAULT.with_(**cycle_model.ALTERNATIVES[name].params)
    d = EmulatorDevice(memory_size=512 << 20, timing=m)
    for nq, ref in ((1, COPY_1), (12, COPY_12)):
        ok, st, gbps = K.run_copy(d, SMALL_COPY, nq)
        assert ok and within(gbps, ref), f"{name}: copy {gbps:.2f} GB/s vs {ref} on {nq} QPU(s)"
    err, st, gflops = K.run_sgemm_tile(d, 256, 256, 256)
    assert err < 1e-3 and within(gflops, SGEMM_12), f"{name}: {gflops:.1f} GFLOP/s vs {SGEMM_12}"
    assert m in cycle_model.DEFAULT.band_models()
