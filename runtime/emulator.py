"""The embedded QPU emulator: a :class:`~tvm_qpu.runtime.device.Device` that executes V3D 7.1
machine words instruction by instruction (16 lanes, 12 QPUs x up to 4 threads) and models
their timing.

* memory: one numpy arena standing for a 32-bit GPU address space; allocations are page
  granular and tracked in a page table so the core tells valid addresses from invalid ones;
* programs: checked with the static hazard checker and pre-decoded once at load time;
* execution: :func:`emu_core.run` (numba) runs the dispatch; faults come back as
  :class:`EmulatorFault` naming the QPU, thread, workgroup, pc and the instruction.

Dispatch: ``threads`` means what the same CSD cfg words mean on a Pi 5: the cfg5 threading bit
is set only for 4 threads; with it clear (``threads`` 1 or 2) every QPU runs 2 threads
(:data:`RESIDENT_THREADS`). A workgroup of ``wg_size`` lanes is ceil(wg_size / 16) batches, one
QPU thread each; batches are numbered workgroup by workgroup (x fastest, then y, then z). The
first ``num_qpus * resident`` go to QPU ``i % num_qpus``, thread ``i // num_qpus``; each later
one starts in the first thread slot that frees up (in modelled time), like the CSD dispatcher.
Kernels find their workgroup in the payload (rf3.ul = x, rf3.uh = y, rf2.ul = z, the local
invocation index in rf2's top bits) and their slot in ``tidx`` ((tidx >> 2) & 0xF = QPU,
tidx & 3 = thread slot t * 4 / resident threads).

Hazard modes (``load_program(..., hazards=...)`` or the device's ``hazards``): "mesa" (default,
for our own kernels) enforces every rule of :mod:`codegen.hazards`, including two that Mesa's
scheduler keeps but the hardware does not need, and faults where the published evidence does
not fix the hardware's behaviour; "hardware" (foreign code) relaxes those two rules, runs the
program with hardware semantics, warns (:class:`RelaxedHazardWarning`) and lists the relaxed
rules in ``EmulatorExecStats.relaxed_rules``.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np

from .device import Buffer, Device, DeviceError, ExecStats, ProgramHandle
from . import cycle_model
from .v3d import CSD_THREADS_BIT
from . import emu_core as C

PAGE = 1 << C.PAGE_SHIFT
#: GPU address of the arena's first byte (low addresses stay invalid so that null and small
#: integers used as pointers fault)
ARENA_BASE = 0x0100_0000
DEFAULT_MEMORY = 768 << 20
#: instruction budget per second of the ``timeout`` argument (the core does not see Python
#: signals, so ``timeout`` bounds the emulated work instead of wall time; see ``interrupt``)
INSTRUCTIONS_PER_TIMEOUT_SECOND = 50_000_000
#: the device API's ``threads`` -> the cfg5 threading bit -> threads resident per QPU. The bit is
#: set only for 4 threads (Mesa v3d/v3dv: ``threads == 4`` sets V3D_CSD_CFG5_THREADING); Mesa never
#: compiles for 1 thread on V3D 4.1+ (``min_threads = ver >= 41 ? 2 : 1``) and py-videocore7's
#: hardware tests keep 24 threads resident on 12 QPUs with the bit clear (tests/test_parallel.py:
#: ``max_thread_per_qpu = 4 if threading else 2``). So 1 and 2 both mean 2 resident threads.
RESIDENT_THREADS = {t: 4 if bit else 2 for t, bit in CSD_THREADS_BIT.items()}
#: the largest workgroup a CSD dispatch takes (cfg3 wg_size is 8 bits, 256 written as 0)
MAX_WG_SIZE = 256
HAZARD_MODES = ("mesa", "hardware")


class RelaxedHazardWarning(UserWarning):
    """A program loaded with hazards="hardware" breaks a Mesa-only scheduling rule."""


class EmulatorFault(DeviceError):
    """The emulated program did something the hardware would misbehave on."""

    def __init__(self, message: str, *, kind: str = "fault", qpu=None, thread=None, pc=None,
                 workgroup=None, instruction: str | None = None):
        super().__init__(message)
        self.kind, self.qpu, self.thread, self.pc = kind, qpu, thread, pc
        self.workgroup, self.instruction = workgroup, instruction


@dataclass
class EmulatorExecStats(ExecStats):
    """ExecStats plus what only the model knows."""
    l2_hits: int = 0
    l2_misses: int = 0
    dram_bytes: int = 0
    thread_switches: int = 0
    atomics: int = 0
    per_qpu_instructions: list = field(default_factory=list)
    per_qpu_stall_cycles: list = field(default_factory=list)
    clock_hz: float = 0.0
    #: threads resident per QPU (what the cfg words select: 2, or 4 with the threading bit)
    resident_threads: int = 0
    #: Mesa-only hazard rules the program breaks and that were relaxed (hazards="hardware")
    relaxed_rules: list = field(default_factory=list)


@dataclass
class _Program:
    table: np.ndarray
    words: np.ndarray
    hazards: str = "mesa"
    relaxed: list = field(default_factory=list)


_FAULT_TEXT = {
    C.FLT_BAD_ADDR: "TMU access to address {a:#010x} (lane {b}) outside any buffer",
    C.FLT_FIFO_EMPTY: "ldtmu with an empty TMU FIFO (no outstanding load)",
    C.FLT_FIFO_OVERFLOW: "TMU request would put {a} words in this thread's share of the QPU's output "
                         "FIFO (limit {b} words per thread: 16 / resident threads, Mesa "
                         "ntq_tmu_fifo_overflow); ldtmu results before issuing more",
    C.FLT_BUDGET: "instruction budget of {a} instructions exceeded (runaway loop?)",
    C.FLT_REG_SHARE: "uses rf{a}, beyond this thread's share of the register file "
                     "(rf0..rf{bm1} at this thread count)",
    C.FLT_PC_RANGE: "program counter left the program (target {a:#x})",
    C.FLT_UNSUPPORTED_OP: "operation not supported by the emulator",
    C.FLT_UNSUPPORTED_MAGIC: "write to magic register {magic} not supported by the emulator",
    C.FLT_UNSUPPORTED_SIG: "signal not supported by the emulator (ldvary/ldtlb/ldtlbu/ucb)",
    C.FLT_MISALIGNED: "misaligned TMU access at {a:#010x} (lane {b})",
    C.FLT_TMUD_OVERFLOW: "more than 4 TMU data words (tmud) before the address write",
    C.FLT_TMU_OP: "unsupported TMU config byte {a:#04x} for this access",
    C.FLT_UNIF_ADDR: "uniform stream read at {a:#010x} outside any buffer",
    C.FLT_DEADLOCK: "barrier deadlock: every live thread waits on a barrier",
    C.FLT_UNIF_STALE: "uniform-stream read at {a:#010x} of a word a TMU write changed earlier in "
                      "this dispatch: the Pi 5's uniform path is not coherent with TMU writes and "
                      "would return the old value (read it through the TMU, or write it in an "
                      "earlier dispatch)",
    C.FLT_UNIF_REDIRECT: "uniform redirect from a register: element 1 = {a:#010x} is not 8-byte "
                         "aligned; the hardware tests fix the rule (element 1, bits 2:0 cleared) "
                         "only where that does not matter; use an 8-byte aligned address (or "
                         "load with hazards='hardware' to apply the rule)",
    C.FLT_INTERRUPTED: "interrupted by the host (Ctrl-C)",
}
_FAULT_KIND = {
    C.FLT_BAD_ADDR: "bad_address", C.FLT_FIFO_EMPTY: "fifo_empty",
    C.FLT_FIFO_OVERFLOW: "fifo_overflow", C.FLT_BUDGET: "budget", C.FLT_REG_SHARE: "register_share",
    C.FLT_PC_RANGE: "pc_range", C.FLT_UNSUPPORTED_OP: "unsupported", C.FLT_UNSUPPORTED_MAGIC:
    "unsupported", C.FLT_UNSUPPORTED_SIG: "unsupported", C.FLT_MISALIGNED: "misaligned",
    C.FLT_TMUD_OVERFLOW: "tmud_overflow", C.FLT_TMU_OP: "tmu_op", C.FLT_UNIF_ADDR: "bad_address",
    C.FLT_DEADLOCK: "deadlock", C.FLT_UNIF_STALE: "stale_uniform",
    C.FLT_UNIF_REDIRECT: "unif_redirect", C.FLT_INTERRUPTED: "interrupted",
}


def _hazard_mode(mode: str) -> str:
    if mode not in HAZARD_MODES:
        raise DeviceError(f"hazards must be one of {', '.join(HAZARD_MODES)}, got {mode!r}")
    return mode


class EmulatorDevice(Device):
    """Instruction-level emulator of the Pi 5 GPU's QPUs (see module docstring)."""

    kind = "emulator"

    def __init__(self, memory_size: int = DEFAULT_MEMORY, num_qpus: int | None = None,
                 clock_hz: float | None = None, timing: cycle_model.TimingModel | None = None,
                 max_instructions: int | None = None, check_hazards: bool = True,
                 hazards: str = "mesa"):
        t = timing or cycle_model.DEFAULT
        if num_qpus is not None:
            t = t.with_(num_qpus=int(num_qpus))
        if clock_hz is not None:
            t = t.with_(clock_hz=float(clock_hz))
        if not 1 <= t.num_qpus <= 16:
            raise DeviceError(f"num_qpus must be 1..16, got {t.num_qpus}")
        self.timing = t
        self.num_qpus = t.num_qpus
        self.clock_hz = t.clock_hz
        self.max_instructions = max_instructions
        self.check_hazards = check_hazards
        self.hazards = _hazard_mode(hazards)
        size = (int(memory_size) + PAGE - 1) // PAGE * PAGE
        if ARENA_BASE + size > 1 << 32:
            raise DeviceError("memory_size does not fit the 32-bit GPU address space")
        self._mem = np.zeros(size, dtype=np.uint8)
        self._wdirty = np.zeros(size // 32, dtype=np.uint8)   # one bit per word: TMU-written
        self._mem32 = self._mem.view(np.uint32)
        self._page_ok = np.zeros(size // PAGE, dtype=np.uint8)
        self._free = [(0, size // PAGE)]         # (first page, page count), sorted
        self._buffers: dict[int, Buffer] = {}
        self._programs: dict[int, _Program] = {}
        self._next_handle = 1
        self._stop = np.zeros(1, dtype=np.int64)   # set by interrupt(); read by the core per quantum

    # ---------------------------------------------------------------- memory
    def alloc(self, nbytes: int, align: int = 4096) -> Buffer:
        nbytes = int(nbytes)
        if nbytes <= 0:
            raise DeviceError(f"cannot allocate {nbytes} bytes")
        align_pages = max(1, (int(align) + PAGE - 1) // PAGE)
        npages = (nbytes + PAGE - 1) // PAGE
        for i, (start, count) in enumerate(self._free):
            first = (start + align_pages - 1) // align_pages * align_pages
            if first + npages <= start + count:
                pieces = []
                if first > start:
                    pieces.append((start, first - start))
                if first + npages < start + count:
                    pieces.append((first + npages, start + count - first - npages))
                self._free[i:i + 1] = pieces
                off = first * PAGE
                self._mem[off: off + npages * PAGE] = 0
                self._page_ok[first: first + npages] = 1
                handle = self._next_handle
                self._next_handle += 1
                buf = Buffer(self, ARENA_BASE + off, nbytes, self._mem[off: off + nbytes], handle)
                self._buffers[handle] = buf
                return buf
        raise DeviceError(f"emulator out of memory allocating {nbytes} bytes "
                          f"(arena {self._mem.size >> 20} MiB; pass memory_size=...)")

    def free(self, buf: Buffer) -> None:
        if buf.device is not self or self._buffers.pop(buf.handle, None) is None:
            raise DeviceError("free of a buffer this device does not own (or freed twice)")
        first = (buf.addr - ARENA_BASE) // PAGE
        npages = (buf.size + PAGE - 1) // PAGE
        self._page_ok[first: first + npages] = 0
        self._programs.pop(buf.handle, None)
        self._free.append((first, npages))
        self._free.sort()
        merged = []
        for s, c in self._free:
            if merged and merged[-1][0] + merged[-1][1] == s:
                merged[-1] = (merged[-1][0], merged[-1][1] + c)
            else:
                merged.append((s, c))
        self._free = merged

    def is_valid_address(self, addr: int, size: int = 4) -> bool:
        off = int(addr) - ARENA_BASE
        if off < 0 or off + size > self._mem.size:
            return False
        return bool(self._page_ok[off // PAGE] and self._page_ok[(off + size - 1) // PAGE])

    # ---------------------------------------------------------------- programs
    def load_program(self, words, name: str = "kernel", *, check_hazards: bool | None = None,
                     hazards: str | None = None) -> ProgramHandle:
        """Check (static hazards), pre-decode and copy ``words`` to device memory.

        ``hazards``: "mesa" (our kernels: every rule) or "hardware" (foreign code: the Mesa-only
        rules are relaxed, with a :class:`RelaxedHazardWarning`); default: the device's mode."""
        from . import emu_decode
        from ..codegen.instr import UndefinedEncoding
        words = np.ascontiguousarray(np.asarray(words, dtype=np.uint64).reshape(-1))
        if words.size == 0:
            raise DeviceError(f"{name}: empty program")
        mode = self.hazards if hazards is None else _hazard_mode(hazards)
        relaxed = []
        if self.check_hazards if check_hazards is None else check_hazards:
            relaxed = self._check_hazards(words, name, mode)
        try:
            table = emu_decode.predecode(words)
        except UndefinedEncoding as e:
            raise EmulatorFault(f"{name}: cannot load: {e}", kind="undefined") from None
        buf = self.upload(words)
        self._programs[buf.handle] = _Program(table, words, mode, relaxed)
        return ProgramHandle(buf.addr, words, buf, name)

    def _check_hazards(self, words, name, mode="mesa"):
        """Raise EmulatorHazardFault on hazards; return the relaxed Mesa-only ones (hardware mode)."""
        from ..codegen import hazards
        found, relaxed = hazards.split_by_mode(hazards.check_program(words), mode)
        if found:
            from ..codegen.disasm import disassemble
            text = disassemble(words)
            lines = [f"{name}: static hazard check failed ({len(found)} hazard(s)); "
                     f"applies to every QPU and thread:"]
            for h in found[:20]:
                ins = text[h.pc] if 0 <= h.pc < len(text) else "?"
                lines.append(f"  pc {h.pc}: [{h.rule}] {h.message}  |  {ins}")
            if len(found) > 20:
                lines.append(f"  ... and {len(found) - 20} more")
            err = EmulatorHazardFault("\n".join(lines), kind="hazard",
                                      pc=found[0].pc, instruction=text[found[0].pc]
                                      if 0 <= found[0].pc < len(text) else None)
            err.hazards = found
            raise err
        if relaxed:
            rules = sorted({h.rule for h in relaxed})
            warnings.warn(f"{name}: hazards='hardware' relaxed Mesa-only rule(s) {', '.join(rules)} "
                          f"at pc {', '.join(str(h.pc) for h in relaxed[:10])}"
                          f"{' ...' if len(relaxed) > 10 else ''}", RelaxedHazardWarning, stacklevel=3)
        return relaxed

    # ---------------------------------------------------------------- execution
    def execute(self, program: ProgramHandle, uniforms, *, workgroups=(1, 1, 1), wg_size: int = 16,
                num_qpus: int | None = None, threads: int = 1, timeout: float = 10.0,
                max_instructions: int | None = None) -> EmulatorExecStats:
        """Run ``program`` (see Device.execute). Extra: ``max_instructions`` caps the emulated
        instructions (default: ``timeout`` x 50 M, or the device's ``max_instructions``)."""
        prog = self._programs.get(program.buffer.handle if program.buffer is not None else -1)
        if prog is None:
            raise DeviceError(f"program {program.name!r} is not loaded on this device")
        nq = self.num_qpus if num_qpus is None else int(num_qpus)
        if not 1 <= nq <= self.num_qpus:
            raise DeviceError(f"num_qpus must be 1..{self.num_qpus}, got {nq}")
        if threads not in RESIDENT_THREADS:
            raise DeviceError(f"threads must be 1, 2 or 4, got {threads}")
        if not 1 <= int(wg_size) <= MAX_WG_SIZE:
            raise DeviceError(f"wg_size must be 1..{MAX_WG_SIZE} lanes (16 lanes per QPU thread), "
                              f"got {wg_size}")
        wg = tuple(int(v) for v in workgroups) + (1,) * (3 - len(tuple(workgroups)))
        if any(v < 1 or v > 0xFFFF for v in wg):
            raise DeviceError(f"workgroup counts must be 1..65535, got {wg}")
        budget = max_instructions or self.max_instructions or int(timeout * INSTRUCTIONS_PER_TIMEOUT_SECOND)

        tmp_unif = None
        if isinstance(uniforms, Buffer):
            unif_addr = uniforms.addr
        else:
            u = np.ascontiguousarray(np.asarray(uniforms).astype(np.uint32, copy=False).reshape(-1))
            tmp_unif = self.upload(u if u.size else np.zeros(1, np.uint32))
            unif_addr = tmp_unif.addr
        try:
            return self._run(prog, program, unif_addr, wg, nq, RESIDENT_THREADS[threads], budget,
                             int(wg_size))
        finally:
            if tmp_unif is not None:
                self.free(tmp_unif)

    def _run(self, prog, program, unif_addr, wg, nq, threads, budget, wg_size=16):
        from .emu_core import run
        t = self.timing
        nctx = nq * 4
        prm = t.as_array(threads)
        regs = np.zeros((nctx, 64, 16), dtype=np.uint32)
        fla = np.zeros((nctx, 16), dtype=np.uint8)
        flb = np.zeros((nctx, 16), dtype=np.uint8)
        ist = np.zeros((nctx, C.NIST), dtype=np.int64)
        fst = np.zeros((nctx, C.NFST), dtype=np.float64)
        tmud = np.zeros((nctx, 4, 16), dtype=np.uint32)
        fifo = np.zeros((nctx, C.FIFO_CAP, 16), dtype=np.uint32)
        fifo_t = np.zeros((nctx, C.FIFO_CAP), dtype=np.float64)
        qclock = np.zeros(nq, dtype=np.float64)
        qcur = np.zeros(nq, dtype=np.int64)
        qtmu = np.zeros(nq, dtype=np.float64)
        qreq = np.zeros((nq, C.REQ_RING), dtype=np.float64)
        qreq_head = np.zeros(nq, dtype=np.int64)
        gst = np.zeros(C.NGST, dtype=np.float64)
        stats = np.zeros(C.NSTATS, dtype=np.int64)
        qstats = np.zeros((nq, 2), dtype=np.int64)
        fault = np.zeros(5, dtype=np.int64)
        nsets = int(prm[C.PR_L2_SETS])
        l2_tags = np.full((nsets, t.l2_ways), -1, dtype=np.int64)
        l2_lru = np.zeros((nsets, t.l2_ways), dtype=np.int64)
        wg_dims = np.zeros(C.NLA, dtype=np.int64)              # the launch vector
        wg_dims[:3] = wg
        wg_dims[C.LA_STRICT] = prog.hazards != "hardware"
        reg_share = 32 if threads == 4 else 64
        try:
            code = run(prog.table, self._mem, self._mem32, self._page_ok, ARENA_BASE, program.addr,
                   unif_addr, regs, regs.view(np.float32), fla, flb, ist, fst, tmud, fifo, fifo_t,
                   qclock, qcur, qtmu, qreq, qreq_head, gst, prm, stats, qstats, fault, l2_tags,
                   l2_lru, wg_dims, nq, threads, reg_share, int(budget),
                   np.zeros((nctx, 16), dtype=np.uint32), int(wg_size), self._wdirty, self._stop)
        finally:
            self._clear_tmu_written()
        if code != 0:
            raise self._fault(code, fault, ist, prog, program)
        cycles = int(np.ceil(qclock.max())) if nq else 0
        return EmulatorExecStats(
            instructions=int(stats[C.SX_INSTR]), cycles=cycles, seconds=cycles / t.clock_hz,
            tmu_loads=int(stats[C.SX_TMU_LOADS]), tmu_stores=int(stats[C.SX_TMU_STORES]),
            bytes_loaded=int(stats[C.SX_BYTES_LOADED]), bytes_stored=int(stats[C.SX_BYTES_STORED]),
            stall_cycles=int(stats[C.SX_STALL]), per_qpu_cycles=[int(np.ceil(c)) for c in qclock],
            modeled=True, l2_hits=int(stats[C.SX_L2_HITS]), l2_misses=int(stats[C.SX_L2_MISSES]),
            dram_bytes=int(stats[C.SX_DRAM_BYTES]), thread_switches=int(stats[C.SX_THRSW]),
            atomics=int(stats[C.SX_ATOMICS]),
            per_qpu_instructions=[int(v) for v in qstats[:, 0]],
            per_qpu_stall_cycles=[int(v) for v in qstats[:, 1]], clock_hz=t.clock_hz,
            resident_threads=threads, relaxed_rules=sorted({h.rule for h in prog.relaxed}))

    def _clear_tmu_written(self):
        """Forget which words TMU writes changed (the uniform-coherence check is per dispatch)."""
        pages = np.flatnonzero(self._page_ok & C.PAGE_TMU_WRITTEN)
        if pages.size:
            per_page = PAGE // 32                   # wdirty bytes per page
            for p in pages:
                self._wdirty[p * per_page:(p + 1) * per_page] = 0
            self._page_ok[pages] &= np.uint8(~C.PAGE_TMU_WRITTEN & 0xFF)

    def _fault(self, code, fault, ist, prog, program) -> EmulatorFault:
        from ..codegen.disasm import disassemble_word
        from ..codegen.isa import MAGIC_NAME
        ctx, pc, a, b = (int(v) for v in fault[1:5])
        qpu, thread = ctx >> 2, ctx & 3
        wg = int(ist[ctx, C.ST_WG])
        try:
            ins = disassemble_word(int(prog.words[pc])) if 0 <= pc < len(prog.words) else "<outside program>"
        except Exception:  # pragma: no cover - never hide the fault behind a formatting error
            ins = f"0x{int(prog.words[pc]):016x}"
        detail = _FAULT_TEXT.get(code, "fault {code}").format(
            a=a, b=b, bm1=b - 1, code=code, magic=MAGIC_NAME.get(a, a))
        if code == C.FLT_UNSUPPORTED_OP:
            detail = f"operation {C.OP_NAMES[a] if 0 <= a < len(C.OP_NAMES) else a!r} not supported by the emulator"
        msg = (f"{program.name}: QPU {qpu} thread {thread} (workgroup {wg}) pc {pc} "
               f"[{ins}]: {detail}")
        return EmulatorFault(msg, kind=_FAULT_KIND.get(code, "fault"), qpu=qpu, thread=thread,
                             pc=pc, workgroup=wg, instruction=ins)

    def interrupt(self, stop: bool = True) -> None:
        """From another thread: make a running execute() (and, while set, every later one) stop
        within one quantum with an EmulatorFault of kind "interrupted"; ``interrupt(False)`` clears it."""
        self._stop[0] = int(stop)

    def close(self) -> None:
        self._buffers.clear()
        self._programs.clear()


def _make_hazard_fault_class():
    try:
        from ..codegen.hazards import HazardError
    except ImportError:  # pragma: no cover - checker not present
        return type("EmulatorHazardFault", (EmulatorFault,), {})

    class EmulatorHazardFault(EmulatorFault, HazardError):
        """A static hazard found at load time (an EmulatorFault and a codegen HazardError)."""

        def __init__(self, message, **kw):
            EmulatorFault.__init__(self, message, **kw)
            self.hazards = []

    return EmulatorHazardFault


EmulatorHazardFault = _make_hazard_fault_class()
