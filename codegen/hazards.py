"""Static checker for V3D 7.1 instruction-sequence hazards.

Rules (from Mesa ``src/broadcom/compiler/qpu_schedule.c`` and ``shared/docs/v3d71-isa.md``), each
a named rule in :data:`RULES`:

* ``branch_in_delay_slot``  - a branch (or a thrsw) in the 3 delay slots of a branch, or a branch
  in the 2 delay slots of a thrsw;
* ``branch_after_unifa``    - a branch in the 3 instructions after a unifa write (Mesa only);
* ``thrsw_in_thrsw_slot``   - a thread-end thrsw in the delay slots of the last-switch pair;
* ``thrsw_near_thrsw``      - a thrsw two instructions after another (Mesa only: only the
  back-to-back pair that marks the last switch is allowed);
* ``sfu_in_thrsw_slot``     - an SFU op in the delay slots of a thrsw (its result would land in
  the other thread);
* ``thrend_writes_rf``      - the thread-end instruction writes the register file through an ALU;
* ``uniform_in_thrend_slot``- a uniform load in the delay slots of the thread end;
* ``resource_conflict``     - more than one of {TMU write, wrtmuc, TSY, TLB, SFU, VPM} in one
  instruction (wrtmuc together with a non-tmuc TMU write is allowed);
* ``unifa_thrsw``           - the unifa write and the 3 instructions after it overlap a thread
  switch (the switch happens after the thrsw's 2 delay slots);
* ``unifa_latency``         - ldunifa / ldunifarf fewer than 4 instructions after writing unifa;
* ``no_thread_end`` / ``thrend_truncated`` - the program never ends its thread, or ends it without
  room for the 2 delay slots;
* ``undefined``             - a word that is not a defined instruction.

Two rules (:data:`MESA_ONLY_RULES`) come from Mesa's scheduler (``emit_thrsw``: "No emitting a thrsw
while the previous thrsw hasn't happened yet"; ``emit_branch``: ``last_unifa_write_tick + 3 <
branch_tick``) and are stricter than the hardware: py-videocore7's tests, run on a Pi 5, put a
thrsw two instructions after another (tests/test_parallel.py ``qpu_serial``) and a branch right
after a unifa write (tests/test_unifa.py case 3). Our own kernels keep them (mode "mesa"); mode
"hardware" (:func:`split_by_mode`) relaxes them for foreign code.
"""
from __future__ import annotations

from dataclasses import dataclass

from . import isa
from .instr import Branch, Instr, Register, UndefinedEncoding, decode


class HazardError(ValueError):
    """Raised when a program has hazards; ``.hazards`` lists them."""

    def __init__(self, hazards, name: str = "program"):
        self.hazards = list(hazards)
        lines = [f"{name}: {len(self.hazards)} hazard(s)"] + [str(h) for h in self.hazards[:20]]
        if len(self.hazards) > 20:
            lines.append(f"... and {len(self.hazards) - 20} more")
        super().__init__("\n".join(lines))


@dataclass(frozen=True)
class Hazard:
    pc: int
    rule: str
    message: str
    text: str = ""

    def __str__(self):
        return f"pc {self.pc}: [{self.rule}] {self.message}" + (f"  ({self.text})" if self.text else "")


RULES = ("undefined", "branch_in_delay_slot", "branch_after_unifa", "thrsw_in_thrsw_slot",
         "thrsw_near_thrsw", "sfu_in_thrsw_slot", "thrend_writes_rf", "uniform_in_thrend_slot",
         "resource_conflict", "unifa_thrsw", "unifa_latency", "no_thread_end", "thrend_truncated")
#: rules of Mesa's scheduler that the hardware does not need (relaxed in mode "hardware")
MESA_ONLY_RULES = ("thrsw_near_thrsw", "branch_after_unifa")
MODES = ("mesa", "hardware")


def split_by_mode(hazards, mode: str = "mesa"):
    """Split the hazards of :func:`check_program` into (enforced, relaxed) for a mode: "mesa"
    enforces every rule; "hardware" relaxes :data:`MESA_ONLY_RULES`."""
    if mode not in MODES:
        raise ValueError(f"hazard mode must be one of {', '.join(MODES)}, got {mode!r}")
    if mode == "mesa":
        return list(hazards), []
    return ([h for h in hazards if h.rule not in MESA_ONLY_RULES],
            [h for h in hazards if h.rule in MESA_ONLY_RULES])


# --------------------------------------------------------------------------------------------
# Per-instruction facts
# --------------------------------------------------------------------------------------------
def _magic_dsts(ins: Instr):
    for op in (ins.add_op, ins.mul_op):
        if isinstance(op.dst, Register) and op.dst.magic:
            yield op.dst.name


def _writes(ins, names) -> bool:
    return isinstance(ins, Instr) and any(n in names for n in _magic_dsts(ins))


def has_thrsw(ins) -> bool:
    return isinstance(ins, Instr) and "thrsw" in ins.sigs


def is_sfu(ins) -> bool:
    return isinstance(ins, Instr) and ins.add_op.name in isa.SFU_OPS


def loads_uniform(ins) -> bool:
    """Reads the uniform stream: ldunif / ldunifrf or a write to a uniform-consuming magic reg."""
    return isinstance(ins, Instr) and (bool({"ldunif", "ldunifrf"} & set(ins.sigs))
                                       or _writes(ins, isa.UNIFORM_CONSUMING_MAGIC))


def resources(ins: Instr) -> list:
    """The exclusive per-instruction resources an instruction uses (with repeats)."""
    used = []
    for name in _magic_dsts(ins):
        if name in isa.TMU_MAGIC:
            used.append("tmuc" if name == "tmuc" else "tmu")
        elif name in isa.TSY_MAGIC:
            used.append("tsy")
        elif name in isa.TLB_MAGIC:
            used.append("tlb")
        elif name in isa.VPM_MAGIC:
            used.append("vpm")
    if "wrtmuc" in ins.sigs:
        used.append("wrtmuc")
    if {"ldtlb", "ldtlbu"} & set(ins.sigs):
        used.append("tlb")
    if ins.add_op.name in isa.SFU_OPS:
        used.append("sfu")
    if ins.add_op.name in isa.VPM_OPS:
        used.append("vpm")
    return used


def _resource_conflict(used: list) -> bool:
    if len(used) <= 1:
        return False
    if sorted(used) == ["tmu", "wrtmuc"]:
        return False
    return True


# --------------------------------------------------------------------------------------------
# The checker
# --------------------------------------------------------------------------------------------
def _decode_all(words):
    out = []
    for w in words:
        try:
            out.append(decode(int(w)))
        except UndefinedEncoding as e:
            out.append(e)
    return out


def check_program(words, require_thread_end: bool = True, mode: str = "mesa") -> list:
    """Return the list of :class:`Hazard` found in a program (empty when it is clean); in mode
    "hardware" without the relaxed :data:`MESA_ONLY_RULES`."""
    from .disasm import format_instr

    instrs = _decode_all(words)
    n = len(instrs)
    hazards = []

    def add(pc, rule, msg):
        ins = instrs[pc] if 0 <= pc < n else None
        text = format_instr(ins) if isinstance(ins, (Instr, Branch)) else ""
        hazards.append(Hazard(pc, rule, msg, text))

    last_branch = -10
    last_thrsw = -10
    pair_pending = False     # a back-to-back thrsw pair was seen: the next thrsw ends the thread
    pair_second = -10
    thread_ends = []
    unifa_writes = []
    for pc, ins in enumerate(instrs):
        if isinstance(ins, UndefinedEncoding):
            add(pc, "undefined", str(ins))
            continue
        is_branch = isinstance(ins, Branch)
        if is_branch:
            if pc - last_branch <= isa.BRANCH_DELAY_SLOTS:
                add(pc, "branch_in_delay_slot", f"branch in the delay slots of the branch at pc {last_branch}")
            if pc - last_thrsw <= isa.THRSW_DELAY_SLOTS:
                add(pc, "branch_in_delay_slot", f"branch in the delay slots of the thrsw at pc {last_thrsw}")
            last_branch = pc
            continue
        if has_thrsw(ins):
            if pc - last_branch <= isa.BRANCH_DELAY_SLOTS:
                add(pc, "branch_in_delay_slot", f"thrsw in the delay slots of the branch at pc {last_branch}")
            if pair_pending and pc > pair_second:
                if pc - pair_second <= isa.THRSW_DELAY_SLOTS:
                    add(pc, "thrsw_in_thrsw_slot", f"thread-end thrsw in the delay slots of pc {pair_second}")
                thread_ends.append(pc)
                pair_pending = False
                last_thrsw = pc
            elif pc - last_thrsw == 1:
                pair_pending, pair_second = True, pc       # the last-thrsw marker pair
                last_thrsw = pc
            else:
                if pc - last_thrsw <= isa.THRSW_DELAY_SLOTS:
                    # an ordinary switch on the hardware (only consecutive thrsws pair up)
                    add(pc, "thrsw_near_thrsw", f"thrsw {pc - last_thrsw} instructions after the "
                                                f"thrsw at pc {last_thrsw}, before it took effect")
                last_thrsw = pc
        elif is_sfu(ins) and 0 < pc - last_thrsw <= isa.THRSW_DELAY_SLOTS:
            add(pc, "sfu_in_thrsw_slot", f"SFU op {ins.add_op.name} in the delay slots of the thrsw at pc {last_thrsw}")
        if _resource_conflict(resources(ins)):
            add(pc, "resource_conflict", "more than one TMU/SFU/TSY/TLB/VPM access: " + ", ".join(resources(ins)))
        if _writes(ins, {"unifa"}):
            unifa_writes.append(pc)
        if {"ldunifa", "ldunifarf"} & set(ins.sigs):
            for u in unifa_writes:
                if 0 < pc - u <= isa.UNIFA_LATENCY:
                    add(pc, "unifa_latency", f"ldunifa {pc - u} instruction(s) after the unifa write at pc {u} "
                                             f"(needs {isa.UNIFA_LATENCY + 1})")

    # unifa window vs thread switches and branches
    switch_points = {pc + isa.THRSW_DELAY_SLOTS for pc, ins in enumerate(instrs) if has_thrsw(ins)}
    for u in unifa_writes:
        for s in range(u, u + isa.UNIFA_LATENCY):
            if s in switch_points:
                add(u, "unifa_thrsw", f"thread switch after pc {s} falls inside the unifa window of pc {u}")
        for p in range(u + 1, min(n, u + isa.UNIFA_LATENCY + 1)):
            if isinstance(instrs[p], Branch):
                add(p, "branch_after_unifa", f"branch within {isa.UNIFA_LATENCY} instructions of the unifa write at pc {u}")

    # thread end rules
    for end in thread_ends:
        ins = instrs[end]
        for op in (ins.add_op, ins.mul_op):
            if op.name != "nop" and isinstance(op.dst, Register) and not op.dst.magic:
                add(end, "thrend_writes_rf", f"thread-end instruction writes {op.dst.name} through the {op.desc.alu} ALU")
        if end + isa.THRSW_DELAY_SLOTS >= n:
            add(end, "thrend_truncated", "program ends inside the thread-end delay slots")
        for p in range(end + 1, min(n, end + isa.THRSW_DELAY_SLOTS + 1)):
            if isinstance(instrs[p], Instr) and loads_uniform(instrs[p]):
                add(p, "uniform_in_thrend_slot", f"uniform load in the delay slots of the thread end at pc {end}")
    if require_thread_end and n and not thread_ends:
        add(n - 1, "no_thread_end", "no thread end (thrsw; thrsw; ...; thrsw) in the program")
    return split_by_mode(sorted(hazards, key=lambda h: (h.pc, h.rule)), mode)[0]


def assert_no_hazards(words, name: str = "program", **kw):
    hz = check_program(words, **kw)
    if hz:
        raise HazardError(hz, name)
