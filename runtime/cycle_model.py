"""The emulator's timing model: every parameter, its value and where the value comes from.

The numbers here are *inputs* to the simulation in :mod:`emu_core`; the modelled time of a
dispatch comes out of simulating it (per-QPU clocks, per-thread TMU FIFOs, a per-QPU request
queue, a shared L2 and a shared DRAM channel), never from a formula over instruction counts.

Mechanisms (see ``docs/emulator.md`` for the full description):

* each QPU has its own clock; an instruction takes ``cycles_per_instruction`` cycles;
* a TMU lookup (load, store, atomic, prefetch) is queued in the QPU's request queue
  (``request_queue_depth`` in flight; issuing into a full queue stalls the QPU), occupies its
  *slice's* TMU (one per ``qpus_per_slice`` QPUs) for ``tmu_cycles_per_line`` per distinct
  cache line, then each line passes the *shared L2's port* (one line per
  ``l2_cycles_per_line`` for all slices together) and is looked up in the L2 (``l2_bytes``,
  ``l2_ways``, ``line_bytes``, LRU). Hits are ready after ``tmu_latency``; load misses and all
  stores (written through) go over one DRAM channel shared by every QPU at
  ``dram_bytes_per_cycle``, a miss is ready ``dram_latency`` after its transfer;
* the uniform and unifa streams read 64-byte lines through their slice's uniform cache (one
  line fill per ``uniform_cycles_per_line``, shared by the slice's QPUs) and the shared L2,
  keeping ``uniform_prefetch_lines`` lines ahead;
* ``ldtmu`` stalls until its data is ready; ``tmuwt`` until the thread's writes are done;
* with 2 or 4 threads, a thread that switches out (thrsw) resumes when the loads it issued have
  returned, and the QPU runs another ready thread meanwhile (latency hiding);
* the QPUs are simulated in small time slices (``quantum`` instructions, always the QPU with
  the smallest clock next) so that shared-resource contention is seen in time order.

Uncertainty: parameters that no published Pi 5 measurement pins have a plausible range in
:data:`RANGES` (name -> ``ParamRange(low, high, higher_is_faster, why)``); :data:`PINNED` says
which measurement or fact fixes each of the others. Report a modelled figure with its band::

    from tvm_qpu.runtime.cycle_model import DEFAULT
    fast, slow = DEFAULT.corners()              # every ranged parameter at its fast / slow end
    b = DEFAULT.band(lambda m: my_estimate(spec, m))     # Band(value, low, high)
    print(b.fmt(".4f"))                         # "0.0521 [0.0480, 0.0610]"

``fn`` receives a :class:`TimingModel`; for an emulated figure build the device with it
(``EmulatorDevice(timing=m)``). Estimates should take the model as a parameter (default
``DEFAULT``) and read clock, bandwidths and latencies from it.

Calibration (tests/test_emulator_calibration.py keeps each within +-20%; docs/emulator.md
"Calibration" has the table): kernels of codegen/kernels/calibration.py with the *algorithm* of
each published Pi 5 measurement (py-videocore7 README: ``examples/scopy.py`` 24 Mi uint32 on 1
and 12 QPUs, ``examples/sgemm.py`` 1024^3 on 12 QPUs), run on the emulator:

* 1-QPU copy (latency-bound, a load pair in flight) pins ``dram_latency``;
* 12-QPU SGEMM (20 lines per 135 instructions per QPU) and 12-QPU copy (1.5x the array's
  bytes, plus prefetches) are both bound by the shared L2 port: together they pin
  ``l2_cycles_per_line`` (4, a 128-bit port: the copy within 1%, the SGEMM 11% fast in time;
  4.5 would give 0.88 / 0.92 of the published rates at the small test sizes);
* the copy's true DRAM traffic (unique reads + all writes = 2.5x the array bytes in 24.3 ms =
  10.4 GB/s = 10.8 B/cycle) is a *lower bound* on ``dram_bytes_per_cycle``, LPDDR4X-4267 x32
  peak (17.1 GB/s = 17.8 B/cycle) the upper bound.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Callable, NamedTuple

import numpy as np

from . import emu_core as C


@dataclass(frozen=True)
class TimingModel:
    #: QPU clock. Raspberry Pi documentation: VideoCore VII at 960 MHz on the Pi 5 (800 MHz at
    #: launch firmware). Only converts cycles to seconds.
    clock_hz: float = 960e6
    #: QPUs on the chip: 12 (3 slices x 4), per official docs and py-videocore7's tests.
    num_qpus: int = 12
    #: one 16-lane instruction per 4 clocks on 4 physical lanes (shared/docs/v3d71-isa.md,
    #: "Machine"): peak = 12 x 16 x 2 / 4 flops per cycle.
    cycles_per_instruction: float = 4.0
    #: TMU lookup latency on an L2 hit, cycles (issue to data ready). Not isolated by any
    #: published measurement (the calibration kernels hide it or miss the L2); public GPU
    #: L2-hit latencies of this class are 50-150 cycles: RANGES.
    tmu_latency: float = 80.0
    #: latency of an L2 miss after its line crossed the DRAM channel, cycles. Pinned by the
    #: 1-QPU copy (1.69 GB/s measured; its loop waits on one DRAM miss per iteration): 210
    #: cycles = 220 ns at 960 MHz, a typical LPDDR4X round trip.
    dram_latency: float = 210.0
    #: shared DRAM bandwidth in bytes per QPU cycle (load misses + all stores). The 12-QPU copy
    #: moves its unique reads + all writes (2.5x the array bytes, the kernel's stride is set for
    #: 8 QPUs) in 24.3 ms: 10.4 GB/s = 10.8 B/cycle, a lower bound; LPDDR4X-4267 on a 32-bit bus
    #: peaks at 17.1 GB/s = 17.8 B/cycle. 12.5 (12 GB/s, 70% of peak, typical for a mixed
    #: read/write stream) is the value; RANGES spans the bounds. The calibration kernels are
    #: bound by the L2 port, not by this.
    dram_bytes_per_cycle: float = 12.5
    #: TMU occupancy per distinct 64-byte line of a lookup, cycles, on the slice's TMU (shared
    #: by its QPUs). Not pinned (no calibration kernel is TMU-bound at 1..4): RANGES.
    tmu_cycles_per_line: float = 2.0
    #: in-flight TMU requests per QPU before issue stalls: 8 ("the eight-depth TMU read request
    #: queue", comment in py-videocore7 examples/scopy.py).
    request_queue_depth: int = 8
    #: TMU output FIFO, words per lane per QPU: 16; each resident thread may hold 16 / threads
    #: of them (Mesa src/broadcom/compiler/nir_to_vir.c, ntq_tmu_fifo_overflow: 16 / c->threads).
    #: Exceeding a thread's share faults (the hardware cannot stall on it).
    fifo_words: int = 16
    #: cache line size, bytes (V3D L2T line; Mesa/kernel use 64-byte alignment for TMU data).
    line_bytes: int = 64
    #: shared L2 (texture/general-memory cache) size. Not published for V3D 7.1: 128 KiB
    #: assumed, RANGES.
    l2_bytes: int = 128 * 1024
    #: L2 associativity (LRU). Not published: 8-way assumed, RANGES.
    l2_ways: int = 8
    #: latency of a store's completion after its data left for DRAM, cycles (tmuwt waits for
    #: it). Not published: RANGES.
    store_latency: float = 20.0
    #: uniform and unifa streams: each reads whole 64-byte lines through the shared L2 (same hit
    #: latency as a TMU lookup; misses use the shared DRAM channel) and keeps this many lines ahead
    #: in flight, like a sequential prefetcher. Not published for V3D 7.1: 1 (the middle of
    #: RANGES' 0..2; with 2 a stream read once per instruction waits only at its start and on
    #: DRAM misses, with 0 every new line costs an L2 round trip).
    uniform_prefetch_lines: int = 1
    #: QPUs sharing one TMU and one uniform cache: a slice (3 slices x 4 QPUs on the Pi 5,
    #: py-videocore7 README; the V3D TMU and the uniform cache are per-slice units: Broadcom
    #: VideoCore IV reference guide section 1 "slice" with its shared TMUs and uniforms cache, and
    #: the Linux v3d driver's per-slice cache control V3D_SLCACTL for TMU data / uniform caches).
    qpus_per_slice: int = 4
    #: cycles the shared L2 is busy per 64-byte line it serves (TMU loads, stores and prefetches
    #: of every slice, uniform-cache fills): one port for all slices. 4 = 16 bytes per cycle,
    #: a 128-bit data path (15.4 GB/s at 960 MHz). Pinned by two measurements that both hit it:
    #: the 12-QPU SGEMM of py-videocore7's structure (240 line lookups per 1100-cycle
    #: iteration: 8.2 cycles per instruction) and the 12-QPU copy (reads, prefetches and writes
    #: of 1.5x the array bytes in 24.3 ms); see docs/emulator.md, Calibration.
    l2_cycles_per_line: float = 4.0
    #: cycles a slice's uniform cache is busy filling one line for the uniform / unifa streams of
    #: its QPUs (its refill port, shared by the slice's QPUs). Not published: 4 (a fill at the
    #: L2's 16 B/cycle) assumed, RANGES up to a 32-bit fill path.
    uniform_cycles_per_line: float = 4.0
    #: cycles the slice's TMU is busy per 32-bit word it returns to a QPU (loads, atomics): the
    #: alternative explanation of the calibration points (ALTERNATIVES); 0 in the nominal model.
    tmu_cycles_per_word: float = 0.0
    #: simulation time slice in instructions (accuracy of cross-QPU contention ordering).
    quantum: int = 16

    def with_(self, **kw) -> "TimingModel":
        return replace(self, **kw)

    def as_array(self, threads: int) -> np.ndarray:
        """The parameter vector emu_core.run reads (indices PR_*)."""
        p = np.zeros(C.NPRM, dtype=np.float64)
        p[C.PR_CPI] = self.cycles_per_instruction
        p[C.PR_TMU_LAT] = self.tmu_latency
        p[C.PR_DRAM_LAT] = self.dram_latency
        p[C.PR_MEM_BPC] = self.dram_bytes_per_cycle
        p[C.PR_TMU_CPL] = self.tmu_cycles_per_line
        p[C.PR_REQ_DEPTH] = min(self.request_queue_depth, C.REQ_RING)
        p[C.PR_FIFO_WORDS] = min(self.fifo_words // threads, C.FIFO_CAP)
        p[C.PR_LINE] = self.line_bytes
        p[C.PR_THREADS] = threads
        p[C.PR_QUANTUM] = self.quantum
        p[C.PR_L2_SETS] = max(1, self.l2_bytes // (self.line_bytes * self.l2_ways))
        p[C.PR_L2_WAYS] = self.l2_ways
        p[C.PR_STORE_LAT] = self.store_latency
        p[C.PR_UNIF_PF] = self.uniform_prefetch_lines
        p[C.PR_L2_CPL] = self.l2_cycles_per_line
        p[C.PR_QPS] = max(1, self.qpus_per_slice)
        p[C.PR_UNIF_CPL] = self.uniform_cycles_per_line
        p[C.PR_TMU_CPW] = self.tmu_cycles_per_word
        return p

    def peak_gflops(self, num_qpus: int | None = None) -> float:
        n = self.num_qpus if num_qpus is None else num_qpus
        return self.clock_hz * n * 16 * 2 / self.cycles_per_instruction / 1e9

    def describe(self) -> dict:
        return asdict(self)

    # ---- uncertainty: parameters no published measurement pins --------------------------
    def corners(self) -> tuple["TimingModel", "TimingModel"]:
        """``(fast, slow)``: this model with every parameter of :data:`RANGES` set to the end of
        its plausible range that makes kernels faster (resp. slower). Pinned parameters (those
        a published measurement fixes, see :data:`PINNED`) keep their value."""
        fast = {n: (r.high if r.higher_is_faster else r.low) for n, r in RANGES.items()}
        slow = {n: (r.low if r.higher_is_faster else r.high) for n, r in RANGES.items()}
        return self.with_(**fast), self.with_(**slow)

    def alternatives(self) -> list["TimingModel"]:
        """This model under each structural alternative of :data:`ALTERNATIVES` (another
        mechanism that reproduces the same calibration points)."""
        return [self.with_(**alt.params) for alt in ALTERNATIVES.values()]

    def band_models(self, alternatives: bool = True) -> list["TimingModel"]:
        """The models :meth:`band` evaluates besides this one: its two corners, then (with
        ``alternatives``) each structural alternative."""
        return list(self.corners()) + (self.alternatives() if alternatives else [])

    def band(self, fn: Callable[["TimingModel"], float], alternatives: bool = True) -> "Band":
        """Evaluate ``fn(model)`` (a modelled time, or any figure derived from one, e.g. an
        ``estimate()`` or an emulator run with ``EmulatorDevice(timing=model)``) on this model,
        on its two :meth:`corners` and (``alternatives=True``) on each structural alternative;
        returns ``Band(value, low, high)`` where ``value`` is this model's figure and ``low`` /
        ``high`` the smallest / largest of all (so a figure that falls with time, like GFLOP/s,
        is also bracketed correctly)."""
        value = float(fn(self))
        ends = [float(fn(m)) for m in self.band_models(alternatives)]
        return Band(value, min([value] + ends), max([value] + ends))


class ParamRange(NamedTuple):
    """The plausible range of a parameter no measurement pins."""
    low: float
    high: float
    #: True if a larger value makes kernels faster (a bandwidth, a depth, a capacity)
    higher_is_faster: bool
    why: str


class Alternative(NamedTuple):
    """Another mechanism that explains the calibration points as well as the nominal one."""
    params: dict
    why: str


class Band(NamedTuple):
    """A modelled figure with its low / high ends over :data:`RANGES`."""
    value: float
    low: float
    high: float

    def fmt(self, spec: str = ".3g") -> str:
        """``'value [low, high]'`` with ``spec`` formatting, e.g. ``'0.0521 [0.0480, 0.0610]'``."""
        return f"{self.value:{spec}} [{self.low:{spec}}, {self.high:{spec}}]"

    def __str__(self) -> str:
        return self.fmt()


DEFAULT = TimingModel()

#: published figures the model is calibrated against (value, unit, source)
CALIBRATION_POINTS = {
    "copy_1qpu_gbps": (1.69, "GB/s", "py-videocore7 README, examples/scopy.py, 24 Mi uint32, 1 QPU, Pi 5"),
    "copy_12qpu_gbps": (4.14, "GB/s", "py-videocore7 README, examples/scopy.py, 24 Mi uint32, 12 QPUs, Pi 5"),
    "sgemm_12qpu_gflops": (21.38, "GFLOP/s", "py-videocore7 README, examples/sgemm.py 1024^3, "
                           "12 QPUs, 0.1006 s, Pi 5"),
}

PARAMETERS = tuple(f.name for f in fields(TimingModel))

#: Parameters that no published Pi 5 measurement pins: name -> ParamRange(low, high,
#: higher_is_faster, why). ``TimingModel.corners()`` / ``band()`` use it; benchmarks print each
#: modelled figure with the band it spans over these ranges.
RANGES: dict[str, ParamRange] = {
    "tmu_latency": ParamRange(
        50.0, 150.0, False,
        "L2-hit round trip: no published measurement isolates it (GPU L2 hits of this class "
        "take 50-150 cycles)"),
    "dram_bytes_per_cycle": ParamRange(
        10.8, 17.8, True,
        "lower bound: the 12-QPU copy's true DRAM traffic (10.4 GB/s); upper: LPDDR4X-4267 x32 "
        "peak (17.1 GB/s)"),
    "tmu_cycles_per_line": ParamRange(
        1.0, 4.0, False,
        "slice TMU occupancy per distinct line: 1 = a line per cycle, 4 = a 16-byte port; no "
        "calibration kernel is TMU-bound in this range"),
    "l2_bytes": ParamRange(
        64 * 1024, 256 * 1024, True, "V3D 7.1 L2T size is not published"),
    "l2_ways": ParamRange(4, 16, True, "L2T associativity is not published"),
    "store_latency": ParamRange(
        10.0, 80.0, False, "store completion after the data left; only tmuwt waits for it"),
    "uniform_prefetch_lines": ParamRange(
        0, 2, True,
        "whether the uniform cache prefetches sequential lines is not published; 0 = every new "
        "line of a stream costs a full L2 round trip"),
    "uniform_cycles_per_line": ParamRange(
        4.0, 16.0, False,
        "uniform-cache line fill (not published): 4 = the L2's 16 B/cycle, 16 = a 32-bit path"),
}

#: Structural alternatives: the three published measurements are reproduced (+-20%) as well by
#: a per-slice TMU that returns data slowly as by a narrow shared L2 port; they differ for
#: gathers (many lines per lookup, few bytes per line: the L2 port charges each line) and for
#: runs on fewer slices. Nothing published separates them, so bands span both.
ALTERNATIVES: dict[str, Alternative] = {
    "slice_tmu_return_bound": Alternative(
        {"l2_cycles_per_line": 1.0, "tmu_cycles_per_word": 1.6, "dram_latency": 120.0},
        "each slice's TMU returns one 32-bit word per 1.6 cycles (2.4 B/cycle per slice) and the "
        "L2 port is wide (64 B/cycle): copy 1 QPU 1.01, copy 12 QPUs 0.86, SGEMM 256^3 1.04 of "
        "the published figures (dram_latency re-pinned on the 1-QPU copy)"),
}

#: Which published measurement pins each remaining parameter (docs/emulator.md, Calibration).
PINNED: dict[str, str] = {
    "clock_hz": "Raspberry Pi documentation (v3d_freq 960 MHz); converts cycles to seconds only",
    "num_qpus": "3 slices x 4 QPUs (py-videocore7 README)",
    "cycles_per_instruction": "4 cycles per 16-lane instruction on 4 physical lanes (ISA)",
    "qpus_per_slice": "4 QPUs per slice share the TMU and uniform cache (py-videocore7 README, "
                      "VideoCore IV architecture guide)",
    "dram_latency": "1-QPU copy (py-videocore7 scopy, 1.69 GB/s)",
    "l2_cycles_per_line": "12-QPU SGEMM (py-videocore7 sgemm, 0.1006 s) and 12-QPU copy "
                          "(scopy, 4.14 GB/s), both L2-port bound",
    "request_queue_depth": "8 (py-videocore7 scopy comment)",
    "fifo_words": "16 / threads (Mesa ntq_tmu_fifo_overflow)",
    "line_bytes": "64 (V3D L2T line)",
    "quantum": "simulation accuracy only",
    "tmu_cycles_per_word": "0 in the nominal model; the alternative explanation (ALTERNATIVES) "
                           "sets it with l2_cycles_per_line and dram_latency",
}
