"""TMU semantics of the emulator: every lookup type, strided and vector loads, stores of every
width, config via tmuc and tmuau (one config byte per lookup), per-lane and per-quad masking,
atomics and their return values, FIFO order and read-after-write coherence."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from hypothesis.extra import numpy as hnp

from tvm_qpu.codegen import asm as A
from tvm_qpu.codegen.asm import nop, ldtmu, ldunifrf, thrsw
from tvm_qpu.codegen.instr import RF
from tvm_qpu.codegen.kernels.calibration import end_program

from test_emulator_support import assemble_fn, device

BASE, OUT, ARG, CFG = RF[30], RF[31], RF[32], RF[33]
LANE4 = RF[34]


def cfg_byte(per, op, typ):
    return (per << 7) | (op << 3) | typ


def run(body, data: np.ndarray, out_words: int, args=(), **kw):
    """Uniforms: [data addr, out addr, *args]; the body sees BASE, OUT, ARG.., LANE4 = eidx*4."""
    dev = device()
    def k():
        nop(sig=ldunifrf(BASE))
        nop(sig=ldunifrf(OUT))
        for i in range(len(args)):
            nop(sig=ldunifrf(RF[32 + i]))
        A.eidx(LANE4)
        A.shl(LANE4, LANE4, 2)
        body()
        A.tmuwt()
        end_program()
    prog = dev.load_program(assemble_fn(k), "tmu")
    src = dev.upload(np.ascontiguousarray(data))
    out = dev.alloc(out_words * 4)
    try:
        st = dev.execute(prog, np.array([src.addr, out.addr, *args], dtype=np.uint32), **kw)
        return src.view(np.uint8).copy(), out.view(np.uint32).copy(), st
    finally:
        dev.free(src)
        dev.free(out)
        dev.free(prog.buffer)


def store_rows(regs):
    """Store each register as one 16-lane row of the output."""
    A.add(RF[35], OUT, LANE4)
    A.mov(RF[36], 1)
    A.shl(RF[36], RF[36], 6)
    for r in regs:
        A.mov(A.tmud, r)
        A.mov(A.tmua, RF[35]).add(RF[35], RF[35], RF[36])


LOAD_TYPES = {0: (1, np.int8), 1: (2, np.int16), 5: (1, np.uint8), 6: (2, np.uint16), 7: (4, np.uint32)}


@pytest.mark.parametrize("typ", sorted(LOAD_TYPES))
def test_scalar_load_types_gather(typ):
    """Per-lane addresses (a gather); int8/int16 sign-extend, uint8/uint16 zero-extend."""
    size, dt = LOAD_TYPES[typ]
    rng = np.random.default_rng(typ)
    data = rng.integers(0, 256, 4096, dtype=np.uint8)
    idx = rng.integers(0, 4096 // size, 16) * size
    def body():
        A.mov(A.tmuc, CFG)
        A.add(A.tmua, BASE, ARG)
        nop(sig=ldtmu(RF[10]))
        store_rows([RF[10]])
    # per-lane offsets come in through a table: load it first (32-bit), then use as ARG
    def body2():
        A.add(RF[12], ARG, LANE4)
        A.mov(A.tmua, RF[12])
        nop(sig=ldtmu(RF[13]))
        A.mov(A.tmuc, RF[33])
        A.add(A.tmua, BASE, RF[13])
        nop(sig=ldtmu(RF[10]))
        store_rows([RF[10]])
    dev = device()
    table = dev.upload(idx.astype(np.uint32))
    try:
        _, out, _ = run(body2, data, 16, args=(table.addr, cfg_byte(1, 15, typ) | 0xFFFFFF00))
    finally:
        dev.free(table)
    ref = np.array([data[i: i + size].view(dt)[0] for i in idx]).astype(np.int64).astype(np.uint32)
    assert np.array_equal(out, ref)


@pytest.mark.parametrize("vec", [2, 3, 4])
@pytest.mark.parametrize("stride", [16, 20, 64])
def test_vector_loads_strided(vec, stride):
    """vecN: each lane reads N consecutive words at its address; ldtmu pops them in order."""
    data = np.arange(4096, dtype=np.uint32)
    def body():
        A.eidx(RF[12])
        A.umul24(RF[12], RF[12], ARG)          # ARG = stride in words
        A.shl(RF[12], RF[12], 2)
        A.mov(A.tmuc, CFG)
        A.add(A.tmua, BASE, RF[12])
        for i in range(vec):
            nop(sig=ldtmu(RF[14 + i]))
        store_rows([RF[14 + i] for i in range(vec)])
    _, out, st = run(body, data, 16 * vec, args=(stride // 4, cfg_byte(1, 15, vec) | 0xFFFFFF00))
    lane0 = np.arange(16) * stride // 4
    ref = np.stack([data[lane0 + i] for i in range(vec)])
    assert np.array_equal(out.reshape(vec, 16), ref)
    assert st.tmu_loads == 1 and st.bytes_loaded == 16 * 4 * vec


@pytest.mark.parametrize("typ,size", [(5, 1), (6, 2), (7, 4), (0, 1), (1, 2)])
def test_narrow_stores_touch_only_their_bytes(typ, size):
    data = np.full(256, 0xAA, np.uint8)
    def body():
        A.mov(RF[11], size)
        A.eidx(RF[12])
        A.umul24(RF[12], RF[12], RF[11])
        A.add(RF[12], RF[12], BASE)
        A.mov(RF[13], 0)
        A.sub(RF[13], RF[13], 1)          # 0xFFFFFFFF
        A.eidx(RF[14])
        A.bxor(RF[13], RF[13], RF[14])
        A.mov(A.tmuc, CFG)
        A.mov(A.tmud, RF[13])
        A.mov(A.tmua, RF[12])
    mem, _, st = run(body, data, 16, args=(0, cfg_byte(1, 15, typ) | 0xFFFFFF00))
    vals = (0xFFFFFFFF ^ np.arange(16, dtype=np.uint32))
    ref = np.full(256, 0xAA, np.uint8)
    ref[: 16 * size] = np.ascontiguousarray(
        np.array([v.tobytes()[:size] for v in vals.view(np.uint32)])).view(np.uint8).reshape(-1)
    assert np.array_equal(mem, ref)
    assert st.tmu_stores == 1 and st.bytes_stored == 16 * size


@pytest.mark.parametrize("vec", [1, 2, 3, 4])
def test_vector_stores(vec):
    """A store writes as many words per lane as were written to tmud (type vecN / 32-bit)."""
    data = np.zeros(1024, np.uint32)
    def body():
        A.eidx(RF[12])
        A.umul24(RF[12], RF[12], ARG)          # ARG = 4 * vec
        A.add(RF[12], RF[12], BASE)
        A.mov(A.tmuc, CFG)
        for i in range(vec):
            A.eidx(RF[13])
            A.add(RF[13], RF[13], 15 - i)
            A.mov(A.tmud, RF[13])
        A.mov(A.tmua, RF[12])
    cfg = cfg_byte(1, 15, vec if vec > 1 else 7) | 0xFFFFFF00
    mem, _, _ = run(body, data, 16, args=(4 * vec, cfg))
    got = mem.view(np.uint32)[: 16 * vec].reshape(16, vec)
    ref = np.stack([np.arange(16) + 15 - i for i in range(vec)], axis=1)
    assert np.array_equal(got, ref)
    assert not mem.view(np.uint32)[16 * vec:].any()


def test_config_bytes_consumed_one_per_lookup_and_tmuau():
    """A config word applies its bytes to successive lookups (0xff = 32-bit default after), as
    py-videocore7's scopy uses them; tmuau takes the config word from the uniform stream."""
    data = np.arange(1024, dtype=np.uint32)
    def body():
        A.mov(A.tmuc, CFG)                 # lookups: vec2, then uint16, then default
        A.add(A.tmua, BASE, RF[20])
        A.add(A.tmua, BASE, RF[20])
        A.add(A.tmua, BASE, RF[20])
        for i in range(4):
            nop(sig=ldtmu(RF[14 + i]))
        A.add(A.tmuau, BASE, RF[20])       # config from the next uniform: vec3
        for i in range(3):
            nop(sig=ldtmu(RF[18 + i]))
        store_rows([RF[14 + i] for i in range(7)])
    def pre():
        A.shl(RF[20], LANE4, 2)            # lane * 16 bytes
        body()
    cfg = 0xFFFF0000 | (cfg_byte(1, 15, 6) << 8) | cfg_byte(1, 15, 2)
    dev = device()
    def k():
        nop(sig=ldunifrf(BASE))
        nop(sig=ldunifrf(OUT))
        nop(sig=ldunifrf(ARG))
        nop(sig=ldunifrf(CFG))
        A.eidx(LANE4)
        A.shl(LANE4, LANE4, 2)
        pre()
        A.tmuwt()
        end_program()
    prog = dev.load_program(assemble_fn(k), "cfg")
    src = dev.upload(data)
    out = dev.alloc(7 * 64)
    dev.execute(prog, np.array([src.addr, out.addr, 0, cfg, 0xFFFFFF00 | cfg_byte(1, 15, 3)], np.uint32))
    got = out.view(np.uint32).reshape(7, 16)
    lane = np.arange(16) * 4
    assert np.array_equal(got[0], data[lane]) and np.array_equal(got[1], data[lane + 1])
    assert np.array_equal(got[2], data.view(np.uint16)[lane * 2])
    assert np.array_equal(got[3], data[lane])
    for i in range(3):
        assert np.array_equal(got[4 + i], data[lane + i])
    for x in (src, out, prog.buffer):
        dev.free(x)


@pytest.mark.parametrize("per", [1, 0])
def test_conditional_store_masks_lanes(per):
    """A conditional tmua write only stores the lanes whose condition holds (per-lane mode); in
    per-quad mode a quad takes part when any of its lanes does."""
    data = np.zeros(16, np.uint32)
    def body():
        A.eidx(RF[11])
        A.sub(A.null, RF[11], 6, cond="pushz")   # only lane 6
        A.add(RF[12], BASE, LANE4)
        A.mov(A.tmuc, CFG)
        A.mov(A.tmud, 9)
        A.mov(A.tmua, RF[12], cond="ifa")
    mem, _, _ = run(body, data, 16, args=(0, cfg_byte(per, 15, 7) | 0xFFFFFF00))
    got = mem.view(np.uint32)
    ref = np.zeros(16, np.uint32)
    if per:
        ref[6] = 9
    else:
        ref[4:8] = 9
    assert np.array_equal(got, ref)


ATOMICS = {
    0: lambda m, d, e: m + d, 1: lambda m, d, e: m - d, 2: lambda m, d, e: d,
    3: lambda m, d, e: np.where(m == d, e, m),
    4: lambda m, d, e: np.minimum(m, d), 5: lambda m, d, e: np.maximum(m, d),
    6: lambda m, d, e: np.minimum(m.view(np.int32), d.view(np.int32)).view(np.uint32),
    7: lambda m, d, e: np.maximum(m.view(np.int32), d.view(np.int32)).view(np.uint32),
    8: lambda m, d, e: m & d, 9: lambda m, d, e: m | d, 10: lambda m, d, e: m ^ d,
}


@settings(max_examples=20, deadline=None)
@given(op=st.sampled_from(sorted(ATOMICS)),
       mem0=hnp.arrays(np.uint32, 16, elements=st.integers(0, 2 ** 32 - 1)),
       dat=hnp.arrays(np.uint32, 16, elements=st.integers(0, 2 ** 32 - 1)),
       same=hnp.arrays(np.bool_, 16))
def test_write_atomics_return_old_value(op, mem0, dat, same):
    """Atomics with data (tmud / tmudref; cmpxchg: compare then new value, via tmudref and
    tmuoff as in py-videocore7 tests/test_tmu.py) update memory and return the old value."""
    if op == 3:
        dat = np.where(same, mem0, dat).astype(np.uint32)
    new = (dat * np.uint32(3) + np.uint32(1)).astype(np.uint32)
    data = np.concatenate([mem0, dat, new]).astype(np.uint32)
    def body():
        A.mov(RF[36], 1)
        A.shl(RF[36], RF[36], 6)
        A.add(RF[12], BASE, LANE4)
        A.add(RF[13], RF[12], RF[36])
        A.mov(A.tmua, RF[13]).add(RF[13], RF[13], RF[36])
        A.mov(A.tmua, RF[13])
        nop(sig=ldtmu(RF[14]))
        nop(sig=ldtmu(RF[15]))
        A.mov(A.tmuc, CFG)
        A.mov(A.tmudref, RF[14])
        if op == 3:
            A.mov(A.tmuoff, RF[15])
        A.mov(A.tmua, RF[12])
        nop(sig=ldtmu(RF[16]))
        store_rows([RF[16]])
    mem, out, st = run(body, data, 16, args=(0, cfg_byte(1, op, 7) | 0xFFFFFF00))
    ref = np.asarray(ATOMICS[op](mem0.copy(), dat, new)).astype(np.uint64).astype(np.uint32)
    assert np.array_equal(mem.view(np.uint32)[:16], ref)
    assert np.array_equal(out, mem0)
    assert st.atomics == 1


@pytest.mark.parametrize("op,fn", [(8, lambda m: m + 1), (9, lambda m: m - 1), (10, lambda m: ~m)])
def test_read_atomics_inc_dec_not(op, fn):
    mem0 = np.array([0, 1, 0xFFFFFFFF, 7] * 4, np.uint32)
    def body():
        A.add(RF[12], BASE, LANE4)
        A.mov(A.tmuc, CFG)
        A.mov(A.tmua, RF[12])
        nop(sig=ldtmu(RF[16]))
        store_rows([RF[16]])
    mem, out, _ = run(body, mem0, 16, args=(0, cfg_byte(1, op, 7) | 0xFFFFFF00))
    assert np.array_equal(mem.view(np.uint32), fn(mem0.astype(np.uint64)).astype(np.uint32))
    assert np.array_equal(out, mem0)


def test_atomic_add_from_many_threads_is_exact():
    """12 QPUs x 2 threads each add 1 to every lane of one counter 3 times."""
    dev = device()
    def k():
        nop(sig=ldunifrf(BASE))
        nop(sig=ldunifrf(CFG))
        A.eidx(LANE4)
        A.shl(LANE4, LANE4, 2)
        A.add(RF[12], BASE, LANE4)
        for _ in range(3):
            A.mov(A.tmuc, CFG)
            A.mov(A.tmud, 1)
            A.mov(A.tmua, RF[12])
            nop(sig=ldtmu(RF[13]))
        A.tmuwt()
        end_program()
    prog = dev.load_program(assemble_fn(k), "atomic")
    buf = dev.alloc(64)
    dev.execute(prog, np.array([buf.addr, 0xFFFFFF00 | cfg_byte(1, 0, 7)], np.uint32),
                workgroups=(30, 1, 1), num_qpus=12, threads=2)
    assert np.all(buf.view(np.uint32) == 90)
    dev.free(buf)
    dev.free(prog.buffer)


def test_prefetch_returns_no_data():
    """A read with op 0 (prefetch) issues no FIFO entry: the next ldtmu gets the next load."""
    data = np.arange(64, dtype=np.uint32)
    def body():
        A.add(RF[12], BASE, LANE4)
        A.mov(A.tmuc, CFG)
        A.mov(A.tmua, RF[12])               # prefetch (0x80)
        A.add(RF[13], RF[12], 4)
        A.mov(A.tmua, RF[13])               # default 32-bit load
        nop(sig=ldtmu(RF[16]))
        store_rows([RF[16]])
    _, out, st = run(body, data, 16, args=(0, 0xFFFFFF00 | cfg_byte(1, 0, 0)))
    assert np.array_equal(out, data[1:17])


def test_fifo_order_and_coherence():
    """Loads return in issue order; a load after a store sees the stored value
    (py-videocore7 test_tmu_keeps_memory_consistency)."""
    data = np.arange(48, dtype=np.uint32)
    def body():
        A.mov(RF[36], 1)
        A.shl(RF[36], RF[36], 6)
        A.add(RF[12], BASE, LANE4)
        A.add(RF[13], RF[12], RF[36])
        A.mov(A.tmua, RF[13])
        A.mov(A.tmua, RF[12])
        nop(sig=ldtmu(RF[14]))               # row 1
        nop(sig=ldtmu(RF[15]))               # row 0
        A.add(A.tmud, RF[15], 1)
        A.mov(A.tmua, RF[12])
        A.tmuwt()
        A.mov(A.tmua, RF[12], sig=thrsw)
        nop()
        nop()
        nop(sig=ldtmu(RF[16]))
        store_rows([RF[14], RF[16]])
    mem, out, _ = run(body, data, 32)
    assert np.array_equal(out[:16], data[16:32])
    assert np.array_equal(out[16:], data[:16] + 1)
    assert np.array_equal(mem.view(np.uint32)[:16], data[:16] + 1)


@pytest.mark.parametrize("wg_size", [1, 5, 16])
def test_lanes_beyond_wg_size_do_not_access_memory(wg_size):
    data = np.zeros(16, np.uint32)
    def body():
        A.add(RF[12], BASE, LANE4)
        A.mov(A.tmud, 7)
        A.mov(A.tmua, RF[12])
    mem, _, st = run(body, data, 16, wg_size=wg_size)
    ref = np.where(np.arange(16) < wg_size, 7, 0)
    assert np.array_equal(mem.view(np.uint32), ref)
    assert st.bytes_stored == 4 * wg_size
