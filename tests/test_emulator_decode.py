"""The emulator's pre-decoder: it uses the assembler's decoder and ISA tables (no second
decoder), covers every operation, and accepts every golden instruction word."""
import json

import numpy as np
import pytest

from tvm_qpu.codegen import isa
from tvm_qpu.codegen.asm import assemble_text
from tvm_qpu.runtime import emu_core as C
from tvm_qpu.runtime import emu_decode

from conftest import GOLDEN


def test_every_isa_op_has_an_emulator_id():
    names = {d.name for d in isa.OPS}
    assert names <= set(C.OP_ID), names - set(C.OP_ID)
    assert len(C.OP_NAMES) == len(set(C.OP_NAMES))


def test_supported_and_unsupported_ops_are_partitioned():
    supported = set(C.OP_NAMES[: C.OP_FIRST_UNSUPPORTED])
    assert {"fadd", "fmul", "rotate", "recip", "ftoin", "vfmul", "multop"} <= supported
    assert {"ldvpmv_in", "xcd", "ftoc"}.isdisjoint(supported)


def test_row_of_a_modified_float_op():
    row = emu_decode.predecode_word(assemble_text("fadd(rf1.pack('l'), rf2.unpack('abs'), rf3.unpack('h'), cond='pushn')"))
    a = C.ADD_BASE
    assert row[C.F_KIND] == 0 and row[a + C.OP] == C.OP_ID["fadd"]
    assert row[a + C.DST] == 1 and row[a + C.PACK] == C.P_L
    assert row[a + C.UA] == C.U_ABS and row[a + C.UB] == C.U_H
    assert row[a + C.SA] == 2 and row[a + C.SB] == 3 and row[a + C.PF] == 2 and row[a + C.COND] == -1
    assert row[C.MUL_BASE + C.OP] == C.OP_ID["nop"] and row[C.F_MAXREG] == 3


def test_row_of_signals_immediates_and_magic():
    row = emu_decode.predecode_word(assemble_text("add(tmua, rf40, -3)"))
    a = C.ADD_BASE
    assert row[C.F_SIG] == 0 and row[a + C.DST] == C.MAGIC_BASE + isa.MAGIC_WADDR["tmua"]
    assert row[a + C.SB] == C.IMM_FLAG | 0xFFFFFFFD and row[C.F_MAXREG] == 40
    row = emu_decode.predecode_word(assemble_text("nop(sig=ldunifrf(rf9))"))
    assert row[C.F_SIG] == C.S_LDUNIFRF and row[C.F_SIGDST] == 9
    row = emu_decode.predecode_word(assemble_text("nop().fmul(rf4, rf5, 0.5, cond='ifnb')"))
    m = C.MUL_BASE
    assert row[m + C.COND] == 3 and row[m + C.SB] == C.IMM_FLAG | 0x3F000000


@pytest.mark.parametrize("text,bdi,addr,bdu", [
    ("b(+16, cond='anyna')", isa.BDI_RELATIVE, 12 * 8, None),
    ("b(0x1000, cond='always', absolute=True)", isa.BDI_ABSOLUTE, 0x1000, None),
    ("b(+4, cond='always').unif_addr(rf5)", isa.BDI_RELATIVE, 0, isa.BDU_REGISTER),
    ("b(rf7, cond='a0', set_link=True).unif_addr(absolute=True)", isa.BDI_REGISTER, 0, isa.BDU_ABSOLUTE),
])
def test_branch_rows(text, bdi, addr, bdu):
    row = emu_decode.predecode_word(assemble_text(text))
    assert row[C.F_KIND] == 1 and row[C.B_BDI] == bdi and row[C.B_ADDR] == addr
    assert row[C.B_UB] == (bdu is not None)
    if bdu is not None:
        assert row[C.B_BDU] == bdu


def test_predecodes_every_golden_word():
    words = []
    with open(GOLDEN / "v3d71_encodings.jsonl") as f:
        for line in f:
            words.append(int(json.loads(line)["word"], 16))
    table = emu_decode.predecode(np.array(words, dtype=np.uint64))
    assert table.shape == (len(words), C.NF)
    alu = table[:, C.F_KIND] == 0
    assert (table[alu, C.ADD_BASE + C.OP] >= 0).all() and (table[alu, C.MUL_BASE + C.OP] >= 0).all()
    assert (table[:, C.F_MAXREG] < 64).all()
