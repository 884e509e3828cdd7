"""The emulator as a Device: memory arena and page tracking, program loading (static hazard
check, pre-decode), dispatch mapping of workgroups to QPUs / threads, barriers, statistics, and
every fault raising a clear EmulatorFault that names QPU, thread, pc and instruction."""
import numpy as np
import pytest

from tvm_qpu.codegen import asm as A
from tvm_qpu.codegen.asm import L, R, b, nop, ldtmu, ldunifrf, thrsw
from tvm_qpu.codegen.instr import RF
from tvm_qpu.codegen.kernels.calibration import end_program
from tvm_qpu.runtime.device import DeviceError, open_device
from tvm_qpu.runtime.emulator import ARENA_BASE, EmulatorDevice, EmulatorFault

from test_emulator_support import assemble_fn, device


# ---------------------------------------------------------------- memory
def test_alloc_free_and_page_tracking():
    dev = EmulatorDevice(memory_size=1 << 20)
    a = dev.alloc(100)
    b_ = dev.alloc(5000, align=8192)
    assert a.addr >= ARENA_BASE and a.addr % 4096 == 0 and b_.addr % 8192 == 0
    assert dev.is_valid_address(a.addr) and dev.is_valid_address(b_.addr + 4999, 1)
    assert not dev.is_valid_address(0) and not dev.is_valid_address(a.addr - 4)
    a.view(np.uint8)[:] = 7
    addr = a.addr
    dev.free(a)
    assert not dev.is_valid_address(addr)
    with pytest.raises(DeviceError):
        dev.free(a)
    c = dev.alloc(100)
    assert c.addr == addr and not c.view(np.uint8).any()      # reused and zeroed
    with pytest.raises(DeviceError, match="out of memory"):
        dev.alloc(2 << 20)


def test_open_device_emulator():
    dev = open_device("emulator", memory_size=1 << 20)
    assert isinstance(dev, EmulatorDevice) and dev.kind == "emulator" and dev.num_qpus == 12


def test_execute_argument_checks():
    dev = device()
    prog = dev.load_program(assemble_fn(end_program), "end")
    for kw in (dict(threads=3), dict(num_qpus=13), dict(wg_size=257), dict(wg_size=0),
               dict(workgroups=(0, 1, 1))):
        with pytest.raises(DeviceError):
            dev.execute(prog, [], **kw)
    dev.free(prog.buffer)


# ---------------------------------------------------------------- dispatch
def ids_kernel():
    """out[wg] = (tidx, rf3, rf2) for wg = x + X * (y + Y * z) with X, Y from uniforms."""
    nop(sig=ldunifrf(RF[20]))         # out
    nop(sig=ldunifrf(RF[21]))         # X
    nop(sig=ldunifrf(RF[22]))         # X * Y
    A.shl(RF[10], RF[3], -16)
    A.shr(RF[10], RF[10], -16)        # x
    A.shr(RF[11], RF[3], -16)         # y
    A.umul24(RF[11], RF[11], RF[21])
    A.umul24(RF[12], RF[2], RF[22])
    A.add(RF[10], RF[10], RF[11])
    A.add(RF[10], RF[10], RF[12])     # linear workgroup id
    A.mov(RF[13], 12)
    A.umul24(RF[10], RF[10], RF[13])  # 12 bytes per record
    A.add(RF[20], RF[20], RF[10])
    A.tidx(RF[14])
    A.eidx(RF[15])
    A.sub(A.null, RF[15], 0, cond="pushz")     # only lane 0 stores
    A.mov(A.tmud, RF[14])
    A.mov(A.tmud, RF[3])
    A.mov(A.tmud, RF[2])
    A.mov(A.tmuc, -5)                          # 0xFFFFFFFB: per-lane vec3 store
    A.mov(A.tmua, RF[20], cond="ifa")
    A.tmuwt()
    end_program()


@pytest.mark.parametrize("wg,nq,threads", [((24, 1, 1), 12, 2), ((5, 3, 2), 4, 1), ((40, 1, 1), 12, 1),
                                           ((7, 1, 1), 2, 4)])
def test_workgroup_mapping_and_payload(wg, nq, threads):
    dev = device()
    prog = dev.load_program(assemble_fn(ids_kernel), "ids")
    n = wg[0] * wg[1] * wg[2]
    out = dev.alloc(16 * n)
    st = dev.execute(prog, [out.addr, wg[0], wg[0] * wg[1]], workgroups=wg, num_qpus=nq, threads=threads)
    rec = out.view(np.uint32)[: 3 * n].reshape(n, 3)
    dev.free(out)
    dev.free(prog.buffer)
    lin = np.arange(n)
    x, y, z = lin % wg[0], (lin // wg[0]) % wg[1], lin // (wg[0] * wg[1])
    assert np.array_equal(rec[:, 1], x | (y << 16)) and np.array_equal(rec[:, 2], z)
    tid = rec[:, 0]
    resident = 4 if threads == 4 else 2          # the cfg threading bit is clear for 1 and 2
    assert st.resident_threads == resident
    first = min(n, nq * resident)
    slots = {t * 4 // resident for t in range(resident)}                # 2 threads: 0 and 2
    assert np.array_equal(tid[:first] >> 2, lin[:first] % nq)           # QPU i % n
    assert np.array_equal(tid[:first] & 3, (lin[:first] // nq) * 4 // resident)   # slot of i // n
    assert set((tid >> 2).tolist()) <= set(range(nq)) and set((tid & 3).tolist()) <= slots
    assert len(st.per_qpu_cycles) == nq and st.cycles == max(st.per_qpu_cycles)


def test_threading_bit_clear_keeps_two_threads_per_qpu():
    """threads=1 and threads=2 write the same cfg words (threading bit clear), and with the bit
    clear a Pi 5 keeps 2 threads per QPU resident (py-videocore7 tests/test_parallel.py: 24
    threads on 12 QPUs, thread id (tidx & 0b111110) >> 1). 24 workgroups on 12 QPUs all start at
    once, the second one of each QPU in tidx slot 2."""
    dev = device()
    prog = dev.load_program(assemble_fn(ids_kernel), "ids")
    out = dev.alloc(16 * 24)
    for threads in (1, 2):
        st = dev.execute(prog, [out.addr, 24, 24], workgroups=(24, 1, 1), threads=threads)
        tid = out.view(np.uint32)[: 3 * 24].reshape(24, 3)[:, 0]
        assert st.resident_threads == 2
        assert list(tid) == [q << 2 for q in range(12)] + [q << 2 | 2 for q in range(12)]
    dev.free(out)
    dev.free(prog.buffer)


def local_index_kernel():
    """Each lane stores its rf2 to out[4 * (256 * x + rf2 >> (32 - bits))] (bits from uniforms)."""
    nop(sig=ldunifrf(RF[20]))         # out
    nop(sig=ldunifrf(RF[21]))         # 32 - bits
    A.shr(RF[10], RF[2], RF[21])      # local invocation index
    A.shl(RF[11], RF[3], -16)
    A.shr(RF[11], RF[11], -16)        # workgroup x
    A.shl(RF[11], RF[11], 8)
    A.add(RF[10], RF[10], RF[11])
    A.shl(RF[10], RF[10], 2)
    A.add(RF[20], RF[20], RF[10])
    A.mov(A.tmud, RF[2])
    A.mov(A.tmua, RF[20])
    A.tmuwt()
    end_program()


@pytest.mark.parametrize("wg_size,bits", [(16, 6), (5, 6), (100, 7), (256, 8)])
def test_payload_local_invocation_index_and_large_workgroups(wg_size, bits):
    """rf2 carries the lane's local invocation index in its top bits: index << (32 - bits),
    bits = log2(next_pow2(max(wg_size, 64))) (Mesa nir_to_vir.c local_invocation_index_bits; py-
    videocore7's test_parallel_with_workgroup reads it so on a Pi 5), so a 16-lane workgroup has
    lane << 26. A workgroup of more than 16 lanes runs as ceil(wg_size / 16) batches whose lanes
    continue the index; lanes past wg_size take no part."""
    dev = device()
    prog = dev.load_program(assemble_fn(local_index_kernel), "lidx")
    out = dev.alloc(4 * 256 * 3)
    dev.execute(prog, [out.addr, 32 - bits], workgroups=(3, 1, 1), wg_size=wg_size)
    got = out.view(np.uint32).reshape(3, 256).copy()
    dev.free(out)
    dev.free(prog.buffer)
    want = np.zeros((3, 256), np.uint32)
    want[:, :wg_size] = np.arange(wg_size, dtype=np.uint32) << np.uint32(32 - bits)
    assert np.array_equal(got, want)


def barrier_kernel(use_barrier):
    def k():
        nop(sig=ldunifrf(RF[20]))      # counter
        nop(sig=ldunifrf(RF[21]))      # out
        nop(sig=ldunifrf(RF[22]))      # atomic-add config
        A.eidx(RF[10])
        A.shl(RF[10], RF[10], 2)
        A.add(RF[11], RF[20], RF[10])
        # slow down higher workgroups so that without a barrier they would be late
        A.shl(RF[12], RF[3], -16)
        A.shr(RF[12], RF[12], -16)
        A.shl(RF[13], RF[12], 3)
        A.add(RF[13], RF[13], 1)
        L.spin
        A.sub(RF[13], RF[13], 1, cond="pushz")
        b(R.spin, cond="na0")
        nop()
        nop()
        nop()
        A.mov(A.tmuc, RF[22])
        A.mov(A.tmud, 1)
        A.mov(A.tmua, RF[11])
        nop(sig=ldtmu(RF[14]))
        A.tmuwt()
        if use_barrier:
            A.barrierid(A.syncb, sig=thrsw)
            nop()
            nop()
        A.mov(A.tmua, RF[11])
        nop(sig=ldtmu(RF[15]))
        A.shl(RF[16], RF[12], 6)
        A.add(RF[16], RF[16], RF[21])
        A.add(RF[16], RF[16], RF[10])
        A.mov(A.tmud, RF[15])
        A.mov(A.tmua, RF[16])
        A.tmuwt()
        end_program()
    return k


@pytest.mark.parametrize("nq,threads", [(12, 1), (3, 4), (1, 2)])
def test_barrier_orders_all_resident_threads(nq, threads):
    dev = device()
    n = nq * threads
    seen = {}
    for use in (True, False):
        prog = dev.load_program(assemble_fn(barrier_kernel(use)), "barrier")
        counter = dev.alloc(64)
        out = dev.alloc(64 * n)
        dev.execute(prog, [counter.addr, out.addr, 0xFFFFFF00 | (1 << 7) | 7], workgroups=(n, 1, 1),
                    num_qpus=nq, threads=threads)
        seen[use] = out.view(np.uint32).reshape(n, 16).copy()
        for x in (counter, out, prog.buffer):
            dev.free(x)
    assert np.all(seen[True] == n)                 # everybody incremented before anybody read
    assert seen[False].min() < n                   # without the barrier early readers see less


def test_exec_stats_and_clock():
    dev = EmulatorDevice(memory_size=16 << 20, clock_hz=500e6)
    prog = dev.load_program(assemble_fn(end_program), "end")
    st = dev.execute(prog, [], workgroups=(3, 1, 1))
    assert st.instructions == 3 * 7 and st.modeled
    assert st.cycles == 7 * 4 and st.seconds == pytest.approx(st.cycles / 500e6)
    assert st.per_qpu_cycles[:3] == [28, 28, 28] and st.per_qpu_cycles[3:] == [0] * 9
    d = st.as_dict()
    assert d["instructions"] == 21 and "l2_hits" in d


# ---------------------------------------------------------------- faults
def run_fault(k, uniforms=(), check_hazards=True, **kw):
    dev = device()
    prog = dev.load_program(assemble_fn(k, "faulty"), "faulty", check_hazards=check_hazards)
    try:
        with pytest.raises(EmulatorFault) as ei:
            dev.execute(prog, np.asarray(uniforms, np.uint32), **kw)
    finally:
        dev.free(prog.buffer)
    return ei.value


def test_fault_address_outside_any_buffer():
    def k():
        nop(sig=ldunifrf(RF[5]))
        A.eidx(RF[6])
        A.shl(RF[6], RF[6], 2)
        A.add(RF[5], RF[5], RF[6])
        A.mov(A.tmua, RF[5])
        nop(sig=ldtmu(RF[7]))
        end_program()
    dev = device()
    prog = dev.load_program(assemble_fn(k, "faulty"), "faulty")
    buf = dev.alloc(64)
    unif = dev.alloc(64)
    addr = buf.addr
    unif.view(np.uint32)[0] = addr
    dev.free(buf)                                   # a freed buffer is no longer valid
    try:
        with pytest.raises(EmulatorFault) as ei:
            dev.execute(prog, unif)
    finally:
        dev.free(prog.buffer)
        dev.free(unif)
    e = ei.value
    assert e.kind == "bad_address" and e.qpu == 0 and e.thread == 0 and e.pc == 4
    assert f"{addr:#010x}" in str(e) and "mov(tmua, rf5)" in str(e) and "QPU 0 thread 0" in str(e)


def test_fault_huge_address_cannot_touch_host_memory():
    def k():
        A.mov(RF[5], -16)                           # 0xFFFFFFF0
        A.mov(A.tmud, RF[5])
        A.mov(A.tmua, RF[5])
        end_program()
    e = run_fault(k)
    assert "0xfffffff0" in str(e) and "pc 2" in str(e)


def test_fault_ldtmu_with_empty_fifo():
    def k():
        A.mov(RF[1], 1)
        nop(sig=ldtmu(RF[7]))
        end_program()
    e = run_fault(k)
    assert e.kind == "fifo_empty" and e.pc == 1 and "ldtmu(rf7)" in e.instruction


@pytest.mark.parametrize("threads,wgs,loads,thread,k", [(1, 1, 3, 0, 2), (2, 2, 3, 0, 2),
                                                        (4, 4, 2, 0, 1)])
def test_fault_tmu_fifo_overflow(threads, wgs, loads, thread, k):
    """vec4 loads put 4 words each in the thread's share of the QPU's 16-word output FIFO:
    16 / resident threads words (Mesa ntq_tmu_fifo_overflow). With the threading bit clear
    (threads 1 or 2) a QPU has 2 slots of 8 words, so even a lone thread's third lookup (12
    words) overflows; at 4 threads (4 words each) the second one does."""
    def k_():
        nop(sig=ldunifrf(RF[5]))
        for i in range(loads):
            A.mov(A.tmuc, -4)
            A.mov(A.tmua, RF[5])
        end_program()
    dev = device()
    buf = dev.alloc(4096)
    try:
        e = run_fault(k_, [buf.addr], workgroups=(wgs, 1, 1), num_qpus=1, threads=threads)
    finally:
        dev.free(buf)
    limit = 16 // (4 if threads == 4 else 2)
    assert e.kind == "fifo_overflow" and f"limit {limit} words per thread" in str(e)
    assert f"put {4 * (k + 1)} words" in str(e)
    assert e.thread == thread and e.pc == 2 + 2 * k


def test_tmu_fifo_share_per_thread_holds_8_words_each():
    """Two resident threads may each hold their full 8-word share at once (16 words in the QPU's
    FIFO): thread 0 switches out holding 8 words while thread 1 fills its own 8."""
    def k_():
        nop(sig=ldunifrf(RF[5]))
        for i in range(2):
            A.mov(A.tmuc, -4)
            A.mov(A.tmua, RF[5])
        nop(sig=thrsw)
        nop()
        nop()
        for i in range(8):
            nop(sig=ldtmu(RF[10 + i]))
        end_program()
    dev = device()
    buf = dev.alloc(4096)
    prog = dev.load_program(assemble_fn(k_, "share"), "share")
    try:
        st = dev.execute(prog, [buf.addr], workgroups=(2, 1, 1), num_qpus=1, threads=1)
    finally:
        dev.free(buf)
        dev.free(prog.buffer)
    assert st.resident_threads == 2


def test_fault_instruction_budget():
    def k():
        L.top
        b(R.top, cond="always")
        nop()
        nop()
        nop()
        end_program()
    e = run_fault(k, max_instructions=10_000)
    assert e.kind == "budget" and "10000" in str(e) and "runaway" in str(e)


def test_fault_register_beyond_thread_share():
    """4 threads get rf0..rf31 each (Mesa vir_register_allocate.c: 64 regs at 1 and 2
    threads, 32 at 4 threads on V3D 4.x+)."""
    def k():
        A.mov(RF[5], 1)
        A.mov(RF[40], 1)
        end_program()
    e = run_fault(k, workgroups=(4, 1, 1), num_qpus=1, threads=4)
    assert e.kind == "register_share" and e.pc == 1 and "rf40" in str(e) and "rf0..rf31" in str(e)
    dev = device()
    prog = dev.load_program(assemble_fn(k), "ok")
    dev.execute(prog, [], workgroups=(2, 1, 1), num_qpus=1, threads=2)     # fine at 2 threads
    dev.free(prog.buffer)


def test_fault_static_hazard_at_load():
    def k():
        b(R.x, cond="always")
        b(R.x, cond="always")
        nop()
        nop()
        L.x
        nop()
        end_program()
    dev = device()
    with pytest.raises(EmulatorFault) as ei:
        dev.load_program(assemble_fn(k), "hazardous")
    e = ei.value
    from tvm_qpu.codegen.hazards import HazardError
    assert isinstance(e, HazardError) and e.kind == "hazard"
    assert "branch_in_delay_slot" in str(e) and "pc 1" in str(e) and "b(+" in str(e)


def test_fault_misaligned_access():
    def k():
        nop(sig=ldunifrf(RF[5]))
        A.add(RF[5], RF[5], 2)
        A.mov(A.tmua, RF[5])
        end_program()
    dev = device()
    buf = dev.alloc(64)
    try:
        e = run_fault(k, [buf.addr])
    finally:
        dev.free(buf)
    assert e.kind == "misaligned" and e.pc == 2


def test_fault_too_many_tmud_writes():
    def k():
        for _ in range(5):
            A.mov(A.tmud, 1)
        end_program()
    e = run_fault(k)
    assert e.kind == "tmud_overflow" and e.pc == 4


@pytest.mark.parametrize("make,what", [
    (lambda: A.mov(A.tlb, 1), "tlb"),
    (lambda: A.xcd(RF[1]), "xcd"),
    (lambda: A.ftoc(RF[1], RF[2]), "ftoc"),
])
def test_fault_unsupported_features_are_loud(make, what):
    def k():
        make()
        end_program()
    e = run_fault(k, check_hazards=False)
    assert e.kind == "unsupported" and what in str(e) and e.pc == 0


def test_undefined_word_rejected_at_load():
    dev = device()
    with pytest.raises(EmulatorFault, match="cannot load"):
        dev.load_program(np.array([0xFFFFFFFFFFFFFFFF], np.uint64), "junk", check_hazards=False)


def test_threads_mean_what_the_cfg_words_mean():
    """The emulator's resident threads come from the cfg threading bit that v3d.csd_cfg writes
    for the same ``threads``; a Pi 5 runs 4 threads per QPU with the bit set and 2 with it clear
    (py-videocore7 tests/test_parallel.py: ``max_thread_per_qpu = 4 if threading else 2``)."""
    from tvm_qpu.runtime import v3d
    from tvm_qpu.runtime.emulator import RESIDENT_THREADS
    assert RESIDENT_THREADS == {1: 2, 2: 2, 4: 4}
    bits = {t: v3d.csd_cfg(1, 16, 0x1000, 0x2000, ver=71, rev=6, threads=t)[5] & 1 for t in (1, 2, 4)}
    assert bits == {1: 0, 2: 0, 4: 1}


def test_hazard_mode_option():
    """hazards="hardware" as a device option applies to every program loaded; unknown modes are
    refused; a clean program relaxes nothing."""
    import warnings
    from tvm_qpu.codegen.hazards import HazardError

    def near():                                  # thrsw two after another: Mesa-only rule
        nop(sig=thrsw)
        nop()
        nop(sig=thrsw)
        nop()
        nop()
        end_program()
    with pytest.raises(DeviceError, match="hazards must be one of"):
        EmulatorDevice(memory_size=1 << 20, hazards="lenient")
    dev = EmulatorDevice(memory_size=1 << 20, hazards="hardware")
    with pytest.raises(DeviceError, match="hazards must be one of"):
        dev.load_program(assemble_fn(near), "near", hazards="strict")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prog = dev.load_program(assemble_fn(near), "near")
    assert dev.execute(prog, []).relaxed_rules == ["thrsw_near_thrsw"]
    with pytest.raises(HazardError, match="thrsw_near_thrsw"):
        dev.load_program(assemble_fn(near), "near", hazards="mesa")
    clean = dev.load_program(assemble_fn(end_program), "end")
    assert dev.execute(clean, []).relaxed_rules == []
