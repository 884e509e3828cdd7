"""The emulator's timing model: every parameter, its value and where the value comes from.

The numbers here are *inputs* to the simulation in :mod:`emu_core`; the modelled time of a
dispatch comes out of simulating it (per-QPU clocks, per-thread TMU FIFOs, a per-QPU request
queue, a shared L2 and a shared DRAM channel), never from a formula over instruction counts.

Mechanisms (see ``docs/emulator.md`` for the full description):

* each QPU has its own clock; an instruction takes ``cycles_per_instruction`` cycles;
* a TMU lookup (load, store, atomic) is queued in the QPU's request queue
  (``request_queue_depth`` in flight; issuing into a full queue stalls the QPU), occupies the
  QPU's TMU for ``tmu_cycles_per_line`` per distinct cache line, then looks its lines up in the
  shared L2 (``l2_bytes``, ``l2_ways``, ``line_bytes``, LRU). Hits are ready after
  ``tmu_latency``; misses and all stores go through one DRAM channel shared by every QPU at
  ``dram_bytes_per_cycle`` and add ``dram_latency``;
* ``ldtmu`` stalls until its data is ready; ``tmuwt`` until the thread's writes are done;
* with 2 or 4 threads, a thread that switches out (thrsw) resumes when the loads it issued have
  returned, and the QPU runs another ready thread meanwhile (latency hiding);
* the QPUs are simulated in small time slices (``quantum`` instructions, always the QPU with
  the smallest clock next) so that shared-resource contention is seen in time order.

Calibration targets (tests/test_emulator_calibration.py keeps them within +-25%):

* py-videocore7 ``examples/scopy.py`` measured on a Pi 5, 24 Mi uint32 (README of
  Idein/py-videocore7): 1 QPU 1.69 GB/s, 12 QPUs 4.14 GB/s (bytes copied / time);
* a straightforward fp32 SGEMM 1024^3 on 12 QPUs: about 21 GFLOP/s (py-videocore7 README).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace

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
    #: TMU lookup latency on an L2 hit, cycles. Calibrated (1-QPU scopy, SGEMM); public
    #: GPU-cache latencies of this class are 50-150 cycles.
    tmu_latency: float = 80.0
    #: additional latency of an L2 miss served by DRAM, cycles. Calibrated on the 1-QPU copy
    #: (1.69 GB/s with the copy kernel of codegen/kernels/calibration.py).
    dram_latency: float = 180.0
    #: shared DRAM bandwidth in bytes per QPU cycle (loads that miss + all stores). Calibrated on
    #: the 12-QPU copy: 4.14 GB/s copied = 8.28 GB/s of traffic = 8.6 B/cycle at 960 MHz
    #: (LPDDR4X peak is 17 GB/s; a copy reaches about half of it).
    dram_bytes_per_cycle: float = 8.6
    #: per-QPU TMU occupancy per distinct 64-byte line of a lookup, cycles. Calibrated
    #: (SGEMM: A-column gathers touch 16 lines per lookup).
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
    #: shared L2 (texture/general-memory cache) size. Assumed 128 KiB: not published for
    #: V3D 7.1; with it the SGEMM calibration point holds (A-row blocks stay resident).
    l2_bytes: int = 128 * 1024
    #: L2 associativity (LRU). Assumed 8-way (not published).
    l2_ways: int = 8
    #: latency of a store's completion after its data left for DRAM, cycles (tmuwt waits for it).
    store_latency: float = 20.0
    #: uniform and unifa streams: each reads whole 64-byte lines through the shared L2 (same hit
    #: latency as a TMU lookup; misses use the shared DRAM channel) and keeps this many lines ahead
    #: in flight, like a sequential prefetcher. Not published for V3D 7.1: an assumption (a
    #: stream read once per instruction then waits only at the start and on DRAM misses).
    uniform_prefetch_lines: int = 2
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
        return p

    def peak_gflops(self, num_qpus: int | None = None) -> float:
        n = self.num_qpus if num_qpus is None else num_qpus
        return self.clock_hz * n * 16 * 2 / self.cycles_per_instruction / 1e9

    def describe(self) -> dict:
        return asdict(self)


DEFAULT = TimingModel()

#: published figures the model is calibrated against (value, unit, source)
CALIBRATION_POINTS = {
    "copy_1qpu_gbps": (1.69, "GB/s", "py-videocore7 README, examples/scopy.py, 24 Mi uint32, Pi 5"),
    "copy_12qpu_gbps": (4.14, "GB/s", "py-videocore7 README, examples/scopy.py, 24 Mi uint32, Pi 5"),
    "sgemm_12qpu_gflops": (21.0, "GFLOP/s", "py-videocore7 README, examples/sgemm.py 1024^3, Pi 5"),
}

PARAMETERS = tuple(f.name for f in fields(TimingModel))
