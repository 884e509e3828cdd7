"""Pre-decode QPU words into the emulator's numeric instruction table.

Each word is decoded once with the assembler's own decoder (:func:`tvm_qpu.codegen.instr.decode`,
driven by the tables of :mod:`tvm_qpu.codegen.isa`), then flattened into one int64 row of the
layout documented in :mod:`emu_core`. There is no second decoder: every fact about the encoding
comes from ``codegen``.
"""
from __future__ import annotations

import numpy as np

from ..codegen import isa
from ..codegen.instr import Branch, Register, decode
from . import emu_core as C

#: unpack modifier name -> normalised code (see emu_core.U_*)
UNPACK_CODE = {
    "none": C.U_NONE, "abs": C.U_ABS, "l": C.U_L, "h": C.U_H, "sat": C.U_SAT, "nsat": C.U_NSAT,
    "max0": C.U_MAX0, "r32": C.U_R32, "rl2h": C.U_RL2H, "rh2l": C.U_RH2L, "swap": C.U_SWAP,
    "ul": C.U_UL, "uh": C.U_UH, "il": C.U_IL, "ih": C.U_IH,
}
PACK_CODE = {"none": C.P_NONE, "l": C.P_L, "h": C.P_H}
SIGNAL_BITS = {
    "thrsw": C.S_THRSW, "ldunif": C.S_LDUNIF, "ldunifa": C.S_LDUNIFA, "ldunifrf": C.S_LDUNIFRF,
    "ldunifarf": C.S_LDUNIFARF, "ldtmu": C.S_LDTMU, "wrtmuc": C.S_WRTMUC,
    "ldvary": C.S_UNSUPPORTED, "ldtlb": C.S_UNSUPPORTED, "ldtlbu": C.S_UNSUPPORTED,
    "ucb": C.S_UNSUPPORTED,
}
#: the core hard-codes these magic addresses; they must agree with the ISA tables
_CORE_MAGIC = {"quad": C.W_QUAD, "null": C.W_NULL, "unifa": C.W_UNIFA, "tmud": C.W_TMUD,
               "tmua": C.W_TMUA, "tmuau": C.W_TMUAU, "syncb": C.W_SYNCB, "tmuc": C.W_TMUC,
               "tmudref": C.W_TMUDREF, "tmuoff": C.W_TMUOFF, "rep": C.W_REP}
for _n, _w in _CORE_MAGIC.items():
    assert isa.MAGIC_WADDR[_n] == _w, f"emu_core magic address of {_n} disagrees with isa.py"


def _reg_code(r: Register | None) -> int:
    if r is None:
        return -1
    if r.magic:
        return -1 if r.addr == isa.MAGIC_WADDR["null"] else C.MAGIC_BASE + r.addr
    return r.addr


def _src_code(s) -> int:
    if isinstance(s, Register):
        return s.addr
    bits = isa.SMALL_IMM_BITS[isa.small_imm_code(s)]
    return C.IMM_FLAG | bits


def _alu_fields(row: np.ndarray, base: int, op) -> int:
    """Fill one ALU's columns; returns the highest rf index it touches."""
    row[base + C.OP] = C.OP_ID[op.desc.name]
    row[base + C.DST] = _reg_code(op.dst)
    row[base + C.PACK] = PACK_CODE[op.dst.pack_mod] if isinstance(op.dst, Register) else 0
    srcs = list(op.srcs) + [None] * (2 - len(op.srcs))
    maxreg = 0
    for k, s in enumerate(srcs):
        if s is None:
            row[base + C.SA + k] = -1
            row[base + (C.UA if k == 0 else C.UB)] = 0
            continue
        row[base + C.SA + k] = _src_code(s)
        unp = s.unpack_mod if isinstance(s, Register) else "none"
        row[base + (C.UA if k == 0 else C.UB)] = UNPACK_CODE[unp]
        if isinstance(s, Register):
            maxreg = max(maxreg, s.addr)
    if isinstance(op.dst, Register) and not op.dst.magic:
        maxreg = max(maxreg, op.dst.addr)
    row[base + C.COND] = -1
    row[base + C.PF] = 0
    row[base + C.UF] = 0
    if op.cond is not None:
        kind, value = isa.COND_NAMES[op.cond]
        if kind == "cond":
            row[base + C.COND] = value
        elif kind == "pf":
            row[base + C.PF] = value
        else:
            row[base + C.UF] = value
    return maxreg


def predecode_word(word: int) -> np.ndarray:
    """One 64-bit word -> one row of the instruction table (UndefinedEncoding if undefined)."""
    ins = decode(int(word))
    row = np.zeros(C.NF, dtype=np.int64)
    if isinstance(ins, Branch):
        row[C.F_KIND] = 1
        row[C.B_COND] = isa.BRANCH_CONDS[ins.cond]
        t = ins.target
        maxreg = 0
        if isinstance(t, Register):
            row[C.B_BDI] = isa.BDI_REGISTER
            row[C.B_RADDR] = t.addr
            maxreg = t.addr
        elif t == "link":
            row[C.B_BDI] = isa.BDI_LINK
        elif ins.absolute:
            row[C.B_BDI] = isa.BDI_ABSOLUTE
            row[C.B_ADDR] = t
        else:
            row[C.B_BDI] = isa.BDI_RELATIVE
            row[C.B_ADDR] = (t - isa.BRANCH_DELAY_SLOTS - 1) * 8
        row[C.B_LINK] = int(ins.set_link)
        row[C.B_UB] = int(ins.ub)
        if ins.ub:
            if isinstance(ins.unif, Register):
                row[C.B_BDU] = isa.BDU_REGISTER
                row[C.B_RADDR] = ins.unif.addr
                maxreg = max(maxreg, ins.unif.addr)
            elif ins.unif == "absolute":
                row[C.B_BDU] = isa.BDU_ABSOLUTE
            else:
                row[C.B_BDU] = isa.BDU_RELATIVE
        row[C.F_MAXREG] = maxreg
        return row
    maxreg = max(_alu_fields(row, C.ADD_BASE, ins.add_op), _alu_fields(row, C.MUL_BASE, ins.mul_op))
    sig = 0
    row[C.F_SIGDST] = -1
    for name, dst in ins.sigs.items():
        sig |= SIGNAL_BITS[name]
        if dst is not None:
            row[C.F_SIGDST] = C.MAGIC_BASE + dst.addr if dst.magic else dst.addr
            if not dst.magic:
                maxreg = max(maxreg, dst.addr)
    row[C.F_SIG] = sig
    row[C.F_MAXREG] = maxreg
    return row


def predecode(words) -> np.ndarray:
    """A program's words -> its (n, NF) int64 instruction table."""
    words = np.asarray(words, dtype=np.uint64).reshape(-1)
    table = np.zeros((len(words), C.NF), dtype=np.int64)
    for i, w in enumerate(words):
        table[i] = predecode_word(int(w))
    return table
