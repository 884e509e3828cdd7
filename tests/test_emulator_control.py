"""Control flow and state of the emulator: flags (push / update / conditional execution),
branches (every condition, delay slots, link, register and absolute targets, uniform
redirects), thread switches and program end, the uniform and unifa streams."""
import numpy as np
import pytest

from tvm_qpu.codegen import asm as A
from tvm_qpu.codegen.asm import L, R, b, link, nop, thrsw, ldunif, ldunifrf, ldunifa, ldunifarf
from tvm_qpu.codegen.instr import RF
from tvm_qpu.codegen.kernels.calibration import end_program

from test_emulator_support import IN_REGS, OUT_REGS, assemble_fn, device, run_body

a_, b_ = IN_REGS[0], IN_REGS[1]
d_ = OUT_REGS[0]
ALL = np.arange(16)


# ---------------------------------------------------------------- flags
@pytest.mark.parametrize("push,cond,expected", [
    ("pushz", "ifa", ALL == 10), ("pushn", "ifna", ALL >= 10), ("pushc", "ifa", ALL < 10)])
@pytest.mark.parametrize("mul", [False, True])
def test_flag_push_and_condition(push, cond, expected, mul):
    """sub(eidx, 10) with a push, then a conditional move (py-videocore7 test_cond_push_a)."""
    def body():
        A.eidx(RF[10])
        A.sub(RF[10], RF[10], 10, cond=push)
        A.mov(d_, 0)
        if mul:
            nop().mov(d_, 1, cond=cond)
        else:
            A.mov(d_, 1, cond=cond)
    assert np.array_equal(run_body(body, [])[0], expected.astype(np.uint32))


def test_push_moves_a_into_b():
    """A push sets A and moves the old A into B (py-videocore7 test_cond_push_b)."""
    def body():
        A.eidx(RF[10])
        A.sub(A.null, RF[10], 10, cond="pushz")
        A.sub(A.null, RF[10], 5, cond="pushz")
        A.eidx(OUT_REGS[0])
        A.eidx(OUT_REGS[1])
        A.mov(OUT_REGS[0], 0, cond="ifa")
        A.mov(OUT_REGS[1], 0, cond="ifb")
        A.eidx(OUT_REGS[2])
        A.mov(OUT_REGS[2], 0, cond="ifnb")
    got = run_body(body, [], n_out=3)
    assert list(got[0]) == [i if i != 5 else 0 for i in range(16)]
    assert list(got[1]) == [i if i != 10 else 0 for i in range(16)]
    assert list(got[2]) == [10 if i == 10 else 0 for i in range(16)]


UPDATES = ["andz", "andnz", "nornz", "norz", "andn", "andnn", "nornn", "norn", "andc", "andnc",
           "nornc", "norc"]


def update_ref(flag, a, res, carry):
    v = {"z": res == 0, "n": res < 0, "c": carry}[flag[-1]]
    if flag[3:-1] == "n":
        v = ~v
    return (a & v) if flag.startswith("and") else ~(a | v)


@pytest.mark.parametrize("flag", UPDATES)
@pytest.mark.parametrize("mul", [False, True])
def test_flag_updates(flag, mul):
    """A = [1,0,1,0,...]; sub(eidx, 5) with an update; result = A (py-videocore7 test_cond_update)."""
    def body():
        A.eidx(RF[10])
        A.band(RF[10], RF[10], 1, cond="pushz")
        A.eidx(RF[10])
        if mul:
            A.add(RF[13], RF[10], RF[10]).sub(RF[10], RF[10], 5, cond=flag)
        else:
            A.sub(A.null, RF[10], 5, cond=flag)
        A.mov(d_, 0)
        A.mov(d_, 1, cond="ifa")
    a = (ALL % 2) == 0
    res = ALL - 5
    ref = update_ref(flag, a, res, ALL < 5)
    assert np.array_equal(run_body(body, [])[0], ref.astype(np.uint32))


def test_fcmp_flags():
    """fcmp: pushz a == b, pushn a < b, pushc a <= b (Mesa nir_to_vir ntq_emit_comparison:
    flt = fcmp pushn, fge = fcmp(b, a) pushc); NaN compares false."""
    x = np.array([1, 2, 3, np.nan, -0.0, 0.0, np.inf, -1] * 2, dtype=np.float32)
    y = np.array([2, 2, 1, 1, 0.0, -0.0, np.inf, np.nan] * 2, dtype=np.float32)
    def body():
        for j, push in enumerate(("pushz", "pushn", "pushc")):
            A.fcmp(A.null, a_, b_, cond=push)
            A.mov(OUT_REGS[j], 0)
            A.mov(OUT_REGS[j], 1, cond="ifa")
    got = run_body(body, [x, y], n_out=3)
    with np.errstate(invalid="ignore"):
        assert np.array_equal(got[0], (x == y).astype(np.uint32))
        assert np.array_equal(got[1], (x < y).astype(np.uint32))
        assert np.array_equal(got[2], (x <= y).astype(np.uint32))


def test_condition_and_push_in_one_instruction():
    """The condition reads the flags from before the instruction's own push."""
    def body():
        A.eidx(RF[10])
        A.sub(RF[10], RF[10], 10, cond="pushz")
        A.eidx(RF[10])
        A.mov(RF[15], 5)
        A.mov(d_, RF[15], cond="ifa").sub(RF[13], RF[10], RF[15], cond="pushn")
        A.eidx(OUT_REGS[1])
        A.mov(OUT_REGS[1], 0, cond="ifa")
    got = run_body(body, [], n_out=2)
    assert list(got[0]) == [5 if i == 10 else 0 for i in range(16)]
    assert list(got[1]) == [0 if i < 5 else i for i in range(16)]


def test_flag_values():
    def body():
        A.eidx(RF[10])
        A.sub(A.null, RF[10], 3, cond="pushz")
        A.sub(A.null, RF[10], 8, cond="pushn")
        A.vfla(OUT_REGS[0])
        A.vflna(OUT_REGS[1])
        A.vflb(OUT_REGS[2])
        A.vflnb(OUT_REGS[3])
        A.flafirst(OUT_REGS[4])
        A.flnafirst(OUT_REGS[5])
    got = run_body(body, [], n_out=6)
    fa = (ALL < 8).astype(np.uint32)
    fb = (ALL == 3).astype(np.uint32)
    # vfl*: the flag in each 16-bit half (py-videocore7 test_cond_vflx, run on a Pi 5, reads the
    # results as int16 pairs: flag.repeat(2)), i.e. 0x00010001, never 0x00000001
    half = lambda f: np.repeat(f.astype(np.uint16), 2).view(np.uint32)
    assert np.array_equal(got[0], half(fa)) and np.array_equal(got[1], half(1 - fa))
    assert np.array_equal(got[2], half(fb)) and np.array_equal(got[3], half(1 - fb))
    assert list(got[4]) == [1] + [0] * 15 and list(got[5]) == [0] * 8 + [1] + [0] * 7


# ---------------------------------------------------------------- branches
CONDS = {
    "always": lambda f: True, "a0": lambda f: f[0], "na0": lambda f: not f[0],
    "alla": lambda f: f.all(), "anyna": lambda f: not f.all(), "anya": lambda f: f.any(),
    "allna": lambda f: not f.any(),
}
PATTERNS = [np.ones(16, bool), np.zeros(16, bool), ALL == 0, ALL != 0, ALL == 7]


@pytest.mark.parametrize("cond", sorted(CONDS))
@pytest.mark.parametrize("pattern", range(len(PATTERNS)))
def test_branch_conditions(cond, pattern):
    flags = PATTERNS[pattern]
    inp = (~flags).astype(np.uint32)          # pushz on the input: A = (input == 0)
    def body():
        A.mov(A.null, a_, cond="pushz")
        b(R.taken, cond=cond)
        nop()
        nop()
        nop()
        A.mov(d_, 1)
        b(R.done, cond="always")
        nop()
        nop()
        nop()
        L.taken
        A.mov(d_, 2)
        L.done
    got = run_body(body, [inp])[0]
    assert np.all(got == (2 if CONDS[cond](flags) else 1))


def test_branch_delay_slots_execute():
    def body():
        A.mov(d_, 0)
        b(R.target, cond="always")
        A.add(d_, d_, 1)
        A.add(d_, d_, 1)
        A.add(d_, d_, 1)
        A.add(d_, d_, 15)           # skipped
        L.target
        A.add(d_, d_, 10)
    assert np.all(run_body(body, [])[0] == 13)


def test_backward_loop_counts():
    def body():
        A.mov(RF[10], 9)
        A.mov(d_, 0)
        L.loop
        A.sub(RF[10], RF[10], 1, cond="pushz")
        b(R.loop, cond="na0")
        A.add(d_, d_, 2)
        nop()
        nop()
    assert np.all(run_body(body, [])[0] == 18)


def _run_with_addr(make_body, uniforms_from_addr, n_out=1):
    """Assemble, load, then compute uniforms from the program address."""
    dev = device()
    def k():
        make_body()
        for j in range(n_out):
            A.mov(A.tmud, OUT_REGS[j])
            A.mov(A.tmua, RF[41]).add(RF[41], RF[41], RF[43])
        A.tmuwt()
        end_program()
    prog = dev.load_program(assemble_fn(k), "addr")
    out = dev.alloc(64 * n_out)
    try:
        dev.execute(prog, np.array(uniforms_from_addr(prog.addr, out.addr), np.uint32))
        return out.view(np.uint32).reshape(n_out, 16).copy(), prog.addr
    finally:
        dev.free(out)
        dev.free(prog.buffer)


def _prologue():
    nop(sig=ldunifrf(RF[41]))
    A.eidx(RF[42])
    A.shl(RF[42], RF[42], 2)
    A.add(RF[41], RF[41], RF[42])
    A.mov(RF[43], 1)
    A.shl(RF[43], RF[43], 6)


def test_link_and_lr():
    """set_link stores the address after the delay slots; b(link) returns there; lr reads it."""
    def body():
        _prologue()                       # 6 instructions: pc 0..5
        A.mov(d_, 0)                      # pc 6
        b(R.sub, cond="always", set_link=True)   # pc 7
        nop()
        nop()
        nop()
        A.add(d_, d_, 1)                  # pc 11: return point
        b(R.out, cond="always")
        nop()
        nop()
        nop()
        L.sub
        A.lr(OUT_REGS[1])
        A.add(d_, d_, 10)
        b(link, cond="always")
        nop()
        nop()
        nop()
        L.out
    got, addr = _run_with_addr(body, lambda pa, oa: [oa], n_out=2)
    assert np.all(got[0] == 11)
    assert np.all(got[1] == addr + 11 * 8)


def test_branch_to_register_and_absolute():
    def body():
        _prologue()                        # pc 0..5
        nop(sig=ldunifrf(RF[44]))          # pc 6: target address
        A.mov(d_, 0)                       # pc 7
        b(RF[44], cond="always")           # pc 8
        nop()
        nop()
        nop()
        A.add(d_, d_, 1)                   # pc 12 (skipped)
        A.add(d_, d_, 2)                   # pc 13 <- target
    got, addr = _run_with_addr(body, lambda pa, oa: [oa, pa + 13 * 8])
    assert np.all(got[0] == 2)


def test_absolute_branch():
    dev = device()
    def make(target):
        def k():
            _prologue()
            A.mov(d_, 0)
            b(target, cond="always", absolute=True)
            nop()
            nop()
            nop()
            A.add(d_, d_, 1)
            A.add(d_, d_, 2)               # pc 12 <- target
            A.mov(A.tmud, d_)
            A.mov(A.tmua, RF[41])
            A.tmuwt()
            end_program()
        return k
    probe = dev.load_program(assemble_fn(make(0)), "probe")
    addr = probe.addr
    dev.free(probe.buffer)
    prog = dev.load_program(assemble_fn(make(addr + 12 * 8)), "abs")
    assert prog.addr == addr
    out = dev.alloc(64)
    dev.execute(prog, np.array([out.addr], np.uint32))
    assert np.all(out.view(np.uint32) == 2)
    dev.free(out)
    dev.free(prog.buffer)


def test_branch_outside_program_faults():
    from tvm_qpu.runtime.emulator import EmulatorFault
    def body():
        b(+1000, cond="always")
        nop()
        nop()
        nop()
    with pytest.raises(EmulatorFault, match=r"QPU 0 thread 0 .*pc \d+ \[b\(\+1000.*left the program"):
        run_body(body, [])


# ---------------------------------------------------------------- uniforms
def _unif_program(body, uniforms_after, n_out=1, hazards=None):
    """Like run_body but with extra uniforms after the output address."""
    dev = device()
    def k():
        _prologue()
        body()
        for j in range(n_out):
            A.mov(A.tmud, OUT_REGS[j])
            A.mov(A.tmua, RF[41]).add(RF[41], RF[41], RF[43])
        A.tmuwt()
        end_program()
    prog = dev.load_program(assemble_fn(k), "unif", hazards=hazards)
    out = dev.alloc(64 * n_out)
    unif = dev.alloc(4 * 64)
    try:
        vals = uniforms_after(unif.addr, out.addr)
        unif.view(np.uint32)[: len(vals)] = vals
        dev.execute(prog, unif)
        return out.view(np.uint32).reshape(n_out, 16).copy()
    finally:
        for x in (out, unif, prog.buffer):
            dev.free(x)


def test_ldunif_and_ldunifrf():
    def body():
        nop(sig=ldunif)                     # rf0 <- 7
        A.mov(OUT_REGS[0], RF[0], sig=ldunifrf(OUT_REGS[1]))   # reads the old rf0 = 7
    got = _unif_program(body, lambda ua, oa: [oa, 7, 9], n_out=2)
    assert np.all(got[0] == 7) and np.all(got[1] == 9)


def test_ldunifrf_into_magic_register():
    def body():
        nop(sig=ldunifrf(A.tmud))
        A.mov(A.tmua, RF[41])
        A.tmuwt()
        A.mov(d_, 5)
    got = _unif_program(body, lambda ua, oa: [oa, 1234])
    assert np.all(got[0] == 5)


@pytest.mark.parametrize("kind", ["relative", "absolute"])
def test_uniform_branch_redirect(kind):
    """b().unif_addr(): consumes one uniform; relative = address after it + value, absolute =
    the value (py-videocore7 tests/test_branch.py test_uniform_branch_rel / _abs)."""
    def body():
        b(R.lbl, cond="always").unif_addr(absolute=(kind == "absolute"))
        nop()
        nop()
        nop()
        L.lbl
        nop(sig=ldunifrf(d_))
    def unifs(ua, oa):
        if kind == "relative":
            return [oa, 8, 5, 6, 7]            # 4 + 4 + 8 -> index 4
        return [oa, ua + 12, 5, 6, 7]          # absolute -> index 3
    got = _unif_program(body, unifs)
    assert np.all(got[0] == (7 if kind == "relative" else 6))


def test_uniform_branch_register_uses_element_1():
    """unif_addr(rN) takes element 1 of rN (py-videocore7 test_unifa case 3: 'Branch takes the
    second element as a new uniform address'; test_uniform_branch_reg, whose lane 0 is 0)."""
    def body():
        nop(sig=ldunifrf(RF[30]))          # all lanes: a bogus address
        A.eidx(RF[31])
        A.sub(A.null, RF[31], 1, cond="pushz")
        nop(sig=ldunifrf(RF[32]))          # the real target
        A.mov(RF[30], RF[32], cond="ifa")  # only lane 1 holds it
        b(R.lbl, cond="always").unif_addr(RF[30])
        nop()
        nop()
        nop()
        L.lbl
        nop(sig=ldunifrf(d_))
    got = _unif_program(body, lambda ua, oa: [oa, 0x10, ua + 24, 3, 4, 5, 66])
    assert np.all(got[0] == 66)


def _lane_address_redirect(**kw):
    """The register holds X + 4 * lane (X 8-byte aligned), as in py-videocore7 test_unifa case 2,
    where the stream then starts at X (lane 0's address), not at X + 4 (lane 1's)."""
    def body():
        nop(sig=ldunifrf(RF[30]))          # X
        A.eidx(RF[31])
        A.shl(RF[31], RF[31], 2)
        A.add(RF[30], RF[30], RF[31])
        b(R.lbl, cond="always").unif_addr(RF[30])
        nop()
        nop()
        nop()
        L.lbl
        nop(sig=ldunifrf(d_))
    return _unif_program(body, lambda ua, oa: [oa, ua + 16, 3, 4, 50, 51, 52], **kw)


def test_uniform_branch_register_rule_fits_every_hardware_case():
    """Element 1 with bits 2:0 cleared is the rule that fits all three published hardware cases
    (docs/emulator.md "Branches"): here element 1 = X + 4 -> X. Our own code (hazards="mesa")
    may not depend on the cleared bits: that faults."""
    import warnings
    from tvm_qpu.runtime.emulator import EmulatorFault
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = _lane_address_redirect(hazards="hardware")
    assert np.all(got[0] == 50)
    with pytest.raises(EmulatorFault, match="element 1 = 0x[0-9a-f]+ is not 8-byte aligned") as e:
        _lane_address_redirect()
    assert e.value.kind == "unif_redirect"


def test_unifa_stream():
    """unifa takes element 0 of the written value; ldunifa / ldunifarf read that stream while
    the ordinary stream continues independently."""
    def body():
        nop(sig=ldunifrf(RF[30]))           # address of the side stream
        A.mov(A.unifa, RF[30])
        nop()
        nop()
        nop()
        nop(sig=ldunifa)
        A.mov(OUT_REGS[0], RF[0], sig=ldunifarf(OUT_REGS[1]))
        nop(sig=ldunifrf(OUT_REGS[2]))
    got = _unif_program(body, lambda ua, oa: [oa, ua + 40, 77, 0, 0, 0, 0, 0, 0, 0, 100, 200], n_out=3)
    assert np.all(got[0] == 100) and np.all(got[1] == 200) and np.all(got[2] == 77)


def test_ldunifa_with_a_unifa_write_reads_the_old_stream():
    """An instruction with ldunifa and a unifa write reads the old stream, then the new address
    takes effect (py-videocore7 test_unifa case 3: ``mov(tmua, reg_dst, sig=ldunifa)
    .mov(unifa, reg_src0)``, run on a Pi 5). The emulator used to apply the write first."""
    def body():
        nop(sig=ldunifrf(RF[30]))           # stream 1: words 10, 11
        nop(sig=ldunifrf(RF[31]))           # stream 2: words 20, 21
        A.mov(A.unifa, RF[30])
        nop()
        nop()
        nop()
        nop(sig=ldunifarf(OUT_REGS[0]))      # 10
        nop(sig=ldunifarf(OUT_REGS[1])).mov(A.unifa, RF[31])   # 11 (old stream), then switch
        nop()
        nop()
        nop()
        nop(sig=ldunifarf(OUT_REGS[2]))      # 20
    got = _unif_program(body, lambda ua, oa: [oa, ua + 16, ua + 24, 0, 10, 11, 20, 21], n_out=3)
    assert np.all(got[0] == 10) and np.all(got[1] == 11) and np.all(got[2] == 20)


def _write_then_unifa(read_offset):
    """Store 9 to word 0 of a buffer through the TMU, then read word ``read_offset`` of the same
    buffer through the unifa stream, in one dispatch."""
    def body():
        nop(sig=ldunifrf(RF[30]))            # buffer address
        A.mov(RF[31], 9)
        A.mov(A.tmud, RF[31])
        A.mov(A.tmua, RF[30])                # every lane stores 9 to word 0
        A.tmuwt()
        nop(sig=ldunifrf(RF[32]))
        A.add(A.unifa, RF[30], RF[32])
        nop()
        nop()
        nop()
        nop(sig=ldunifarf(d_))
    # the buffer is words 18, 19 of the uniform buffer: 7, 8
    return _unif_program(body, lambda ua, oa: [oa, ua + 72, 4 * read_offset] + [0] * 15 + [7, 8])


def test_uniform_read_of_a_tmu_written_word_faults():
    """The Pi 5's uniform path is not coherent with TMU writes: a uniform-stream read of a word a
    TMU write changed earlier in the same dispatch returns the old value. The emulator never
    returns the new one: it faults, naming the address."""
    from tvm_qpu.runtime.emulator import EmulatorFault
    with pytest.raises(EmulatorFault, match="not coherent with TMU writes") as e:
        _write_then_unifa(0)
    assert e.value.kind == "stale_uniform"
    got = _write_then_unifa(1)             # a word next to it that no TMU write changed
    assert np.all(got[0] == 8)
    got = _write_then_unifa(1)             # the record is per dispatch: a new dispatch is clean
    assert np.all(got[0] == 8)


def test_uniform_read_outside_memory_faults():
    from tvm_qpu.runtime.emulator import EmulatorFault
    def body():
        nop(sig=ldunifrf(RF[30]))
        A.mov(A.unifa, RF[30])
        nop()
        nop()
        nop()
        nop(sig=ldunifa)
    with pytest.raises(EmulatorFault, match="uniform stream read at 0x00000010"):
        _unif_program(body, lambda ua, oa: [oa, 0x10])


# ---------------------------------------------------------------- thread switch / end
def test_program_end_stops_execution():
    """After the end sequence nothing more runs (the code after it would fault)."""
    def k():
        A.mov(RF[5], 1)
        end_program()
        nop(sig=ldunifrf(RF[6]))
        A.mov(A.tmua, RF[6])
    dev = device()
    prog = dev.load_program(assemble_fn(k), "end", check_hazards=False)
    st = dev.execute(prog, np.array([0], np.uint32))
    assert st.instructions == 1 + 7            # the last nop of the end sequence is padding
    dev.free(prog.buffer)


def test_thrsw_delay_slots_and_switch_counts():
    """With 2 threads on one QPU the two workgroups interleave at every thrsw; each thrsw takes
    effect after its two delay slots (the slots still belong to the switching thread)."""
    def k():
        nop(sig=ldunifrf(RF[40]))
        A.shl(RF[10], RF[3], 2)                # workgroup x * 4
        A.add(RF[40], RF[40], RF[10])
        A.mov(RF[11], 0)
        for _ in range(3):
            nop(sig=thrsw)
            A.add(RF[11], RF[11], 1)           # delay slot 1
            A.add(RF[11], RF[11], 1)           # delay slot 2
        A.mov(A.tmud, RF[11])
        A.mov(A.tmua, RF[40])
        A.tmuwt()
        end_program()
    dev = device()
    prog = dev.load_program(assemble_fn(k), "thr")
    out = dev.alloc(64)
    st = dev.execute(prog, np.array([out.addr], np.uint32), workgroups=(2, 1, 1), num_qpus=1, threads=2)
    assert list(out.view(np.uint32)[:2]) == [6, 6]
    assert st.thread_switches == 2 * (3 + 3)
    assert st.per_qpu_instructions[0] == st.instructions
    dev.free(out)
    dev.free(prog.buffer)


def serial_copy(rows):
    """py-videocore7's qpu_serial (tests/test_parallel.py, run on a Pi 5) in our DSL: copy
    ``rows`` rows of 16 words, one load / store pair per row, each with a thrsw; the store's
    thrsw is two instructions before the next row's load thrsw."""
    def k():
        nop(sig=ldunifrf(RF[2]))            # src
        nop(sig=ldunifrf(RF[3]))            # dst
        A.eidx(RF[10])
        A.shl(RF[10], RF[10], 2)
        A.add(RF[2], RF[2], RF[10])
        A.add(RF[3], RF[3], RF[10])
        A.mov(RF[13], 4)
        A.shl(RF[13], RF[13], 4)
        for _ in range(rows):
            A.mov(A.tmua, RF[2], sig=thrsw).add(RF[2], RF[2], RF[13])
            nop()
            nop()
            nop(sig=A.ldtmu(RF[10]))
            A.mov(A.tmud, RF[10])
            A.mov(A.tmua, RF[3], sig=thrsw).add(RF[3], RF[3], RF[13])
            A.tmuwt()
        end_program()
    return k


def test_thrsw_two_instructions_apart_is_an_ordinary_switch():
    """Only two thrsw in consecutive instructions mark the last switch (Mesa qpu_schedule.c
    emit_thrsw: "emitting two THRSWs in a row"). A thrsw two instructions after another is an
    ordinary switch: all 12 rows are copied (the emulator used to end the thread after 2). Mesa's
    scheduler never emits that spacing, so our checker refuses it unless hazards="hardware",
    which reports the relaxed rule."""
    from tvm_qpu.codegen.hazards import HazardError
    from tvm_qpu.runtime.emulator import RelaxedHazardWarning
    dev = device()
    words = assemble_fn(serial_copy(12))
    with pytest.raises(HazardError, match="thrsw_near_thrsw"):
        dev.load_program(words, "serial")
    with pytest.warns(RelaxedHazardWarning, match="thrsw_near_thrsw"):
        prog = dev.load_program(words, "serial", hazards="hardware")
    src = dev.upload(np.arange(12 * 16, dtype=np.uint32))
    dst = dev.alloc(12 * 64)
    try:
        for threads in (1, 4):
            dst.view(np.uint32)[:] = 0
            st = dev.execute(prog, np.array([src.addr, dst.addr], np.uint32), num_qpus=1,
                             threads=threads)
            assert np.array_equal(dst.view(np.uint32)[: 12 * 16], np.arange(12 * 16))
            assert st.relaxed_rules == ["thrsw_near_thrsw"]
            assert st.thread_switches == 2 * 12 + 3
    finally:
        for x in (src, dst, prog.buffer):
            dev.free(x)


def test_unifa_case_3_of_the_hardware_tests():
    """py-videocore7 tests/test_unifa.py case 3 (run on a Pi 5) in our DSL: two uniform streams
    interleaved, a register redirect (element 1, after quad_rotate(-1)) right after a unifa write,
    ldunifa together with a unifa write. Expected as the hardware test: per round k the ordinary
    stream gives src1[2k], src1[2k + 1] and the unifa stream src0[2k], src0[2k + 1]."""
    from tvm_qpu.runtime.emulator import RelaxedHazardWarning
    n = 8
    n_r, src0, src1, dst, inc, cnt = (RF[i] for i in (1, 2, 3, 4, 5, 10))

    def k():
        for r in (n_r, src0, src1, dst):
            nop(sig=ldunifrf(r))
        A.eidx(RF[11])
        A.shl(RF[11], RF[11], 2)
        A.add(src0, src0, RF[11])
        A.add(src1, src1, RF[11])
        A.add(dst, dst, RF[11])
        A.mov(inc, 4)
        A.shl(inc, inc, 4)
        A.quad_rotate(src1, src1, -1)           # element 1 = src1 + 0
        A.shr(cnt, n_r, 1)
        A.mov(A.unifa, src0).add(src0, src0, 4)
        L.l2
        b(R.l3, cond="always").unif_addr(src1)  # right after the unifa write (Mesa-only rule)
        A.add(src1, src1, 8)
        A.sub(cnt, cnt, 1, cond="pushz")
        nop()
        L.l3
        nop(sig=ldunif)
        A.mov(A.tmud, RF[0])
        A.mov(A.tmua, dst, sig=ldunifa).mov(A.unifa, src0)
        A.mov(A.tmud, RF[0])
        A.add(dst, dst, inc)
        A.add(src0, src0, 8)
        A.mov(A.tmua, dst, sig=ldunifa).add(dst, dst, inc)
        A.mov(A.tmud, RF[0], sig=ldunif)
        b(R.l2, cond="na0")
        A.mov(A.tmua, dst).add(dst, dst, inc)
        A.mov(A.tmud, RF[0])
        A.mov(A.tmua, dst).add(dst, dst, inc)
        A.tmuwt()
        end_program()

    dev = device()
    with pytest.warns(RelaxedHazardWarning, match="branch_after_unifa"):
        prog = dev.load_program(assemble_fn(k), "unifa3", hazards="hardware")
    rng = np.random.default_rng(7)
    a0 = dev.upload(rng.integers(1, 2 ** 32 - 1, n, dtype=np.uint32))
    a1 = dev.upload(rng.integers(1, 2 ** 32 - 1, n, dtype=np.uint32))
    out = dev.alloc(n * 2 * 64)
    try:
        st = dev.execute(prog, np.array([n, a0.addr, a1.addr, out.addr], np.uint32), num_qpus=1)
        got = out.view(np.uint32).reshape(n // 2, 4, 16)
        s0, s1 = a0.view(np.uint32)[:n], a1.view(np.uint32)[:n]
        assert np.array_equal(got[:, [1, 2]].reshape(n, 16), np.repeat(s0[:, None], 16, 1))
        assert np.array_equal(got[:, [0, 3]].reshape(n, 16), np.repeat(s1[:, None], 16, 1))
        assert st.relaxed_rules == ["branch_after_unifa"]
    finally:
        for x in (a0, a1, out, prog.buffer):
            dev.free(x)
