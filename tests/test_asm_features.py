"""Per-feature tests of the assembler DSL, text front end and disassembler."""
import numpy as np
import pytest

from tvm_qpu.codegen import AsmError, Program, assemble, assemble_text, decode, disassemble, disassemble_word, isa
from tvm_qpu.codegen.asm import *  # noqa: F401,F403  (the DSL namespace)
from tvm_qpu.codegen.instr import encode
from tvm_qpu.codegen.asm import SIGNALS


def word(ins):
    return encode(ins)


def field(w, name):
    return isa.get_field(w, isa.ALU_FIELDS, name)


# --- registers and small immediates ------------------------------------------------------------
@pytest.mark.parametrize("value,code", [(0, 0), (15, 15), (-16, 16), (-1, 31), (0.00390625, 32),
                                        (1.0, 40), (128.0, 47), (0.5, 39)])
def test_small_immediates_chosen_automatically(value, code):
    w = word(add(rf1, rf2, value))
    assert field(w, "raddr_b") == code
    assert isa.SIG_TABLE[field(w, "sig")] == {"smimm_b"}
    assert disassemble_word(w) == f"add(rf1, rf2, {value!r})"


@pytest.mark.parametrize("value", [16, -17, 3.0, -1.0, 256.0, 1e30, float("nan"), float("inf")])
def test_unrepresentable_immediate_is_refused(value):
    with pytest.raises(AsmError, match="small immediate not representable"):
        word(add(rf1, rf2, value))


def test_two_small_immediates_are_refused():
    with pytest.raises(AsmError, match="Invalid signal set"):
        word(add(rf1, rf2, 1).add(rf3, 2, rf4))


def test_immediate_position_selects_the_signal():
    for ins, sig in [(add(rf1, 3, rf2), "smimm_a"), (add(rf1, rf2, 3), "smimm_b"),
                     (nop().add(rf1, 3, rf2), "smimm_c"), (nop().add(rf1, rf2, 3), "smimm_d"),
                     (mov(rf1, 3), "smimm_a"), (nop().mov(rf1, 3), "smimm_c")]:
        assert isa.SIG_TABLE[field(word(ins), "sig")] == {sig}


def test_register_range():
    assert field(word(add(rf63, rf0, rf1)), "waddr_a") == 63
    with pytest.raises(AsmError, match="unknown name: rf64"):
        assemble_text("add(rf64, rf1, rf2)")


def test_magic_destinations_set_the_magic_bit():
    for name, addr in isa.MAGIC_WADDR.items():
        w = word(mov(globals()[name], rf1))
        assert field(w, "ma") == 1 and field(w, "waddr_a") == addr


def test_magic_register_as_source_is_not_encodable():
    with pytest.raises(AsmError, match="not encodable"):
        word(add(rf1, tmua, rf2))


# --- dual issue, modifiers ---------------------------------------------------------------------
def test_dual_issue_fills_both_alus():
    w = word(fadd(rf1, rf2, rf3).fmul(rf4, rf5, rf6))
    d = decode(w)
    assert (d.add_op.name, d.mul_op.name) == ("fadd", "fmul")
    assert (field(w, "raddr_c"), field(w, "raddr_d")) == (5, 6)


def test_second_mul_op_is_refused():
    with pytest.raises(AsmError, match="not available"):
        fmul(rf1, rf2, rf3).umul24(rf4, rf5, rf6)


def test_add_op_after_dot_is_refused():
    with pytest.raises(AsmError, match="not available"):
        nop().fadd(rf1, rf2, rf3)


def test_fadd_operand_order_is_canonicalised_and_faddnf_kept():
    assert word(fadd(rf1, rf3, rf2)) == word(fadd(rf1, rf2, rf3))
    assert decode(word(faddnf(rf1, rf2, rf3))).add_op.name == "faddnf"
    assert decode(word(fmax(rf1, rf2, rf3))).add_op.name == "fmax"
    with pytest.raises(AsmError, match="identical operands"):
        word(faddnf(rf5, rf5, rf5))


@pytest.mark.parametrize("text", [
    "fadd(rf1.pack('l'), rf2.unpack('abs'), rf3.unpack('h'))",
    "fmul(rf1.pack('h'), rf2.unpack('l'), rf3)",
    "fmov(rf1, rf2.unpack('max0'))",
    "nop().fmov(rf1.pack('l'), rf2.unpack('nsat'))",
    "mov(rf1, rf2.unpack('ih'))",
    "vfmul(rf1, rf2.unpack('swap'), rf3)",
    "fround(rf1.pack('h'), rf2.unpack('l'))",
    "ftoiz(rf1, rf2.unpack('h'))",
])
def test_pack_unpack_round_trip(text):
    assert disassemble_word(assemble_text(text)) == text


@pytest.mark.parametrize("text,reason", [
    ("add(rf1, rf2.unpack('abs'), rf3)", "rejects"),
    ("fcmp(rf1.pack('l'), rf2, rf3)", "not encodable"),
    ("vfmin(rf1, rf2, rf3.unpack('r32'))", "not encodable"),
    ("fadd(rf1, rf2.unpack('sat'), rf3)", "2-bit field"),
    ("fround(rf1, 1.0)", "register"),
    ("nop().fmov(rf1, rf2.unpack('max0'))", "max0"),
])
def test_modifier_errors(text, reason):
    with pytest.raises(AsmError, match=reason):
        assemble_text(text)


# --- signals and conditions --------------------------------------------------------------------
def test_signal_combinations_use_the_table():
    for code, names in isa.SIG_TABLE.items():
        if not names or any(n.startswith("smimm") for n in names):
            continue
        sigs = [SIGNALS[n](rf7) if n in isa.REG_WRITING_SIGNALS else SIGNALS[n] for n in names]
        assert field(word(nop(sig=sigs)), "sig") == code


def test_register_writing_signal_puts_its_destination_in_cond():
    w = word(nop(sig=ldtmu(rf11)))
    assert field(w, "cond") == 11
    w = word(nop(sig=ldunifrf(tmua)))
    assert field(w, "cond") == (1 << 6) | 12


def test_signal_with_condition_is_refused():
    with pytest.raises(AsmError, match="Conflict conditional flags"):
        word(add(rf1, rf2, rf3, cond="pushz", sig=ldtmu(rf4)))


def test_reserved_signal_combination_is_refused():
    with pytest.raises(AsmError, match="Invalid signal set"):
        word(nop(sig=[thrsw, ldunifa]))


def test_conditions_encode_per_alu():
    parts = isa.unpack_cond(field(word(fadd(rf1, rf2, rf3, cond="ifa").fmul(rf4, rf5, rf6, cond="pushn")), "cond"))
    assert parts == {"ac": 0, "mpf": 2}
    parts = isa.unpack_cond(field(word(add(rf1, rf2, rf3, cond="andnc").mov(rf4, rf5, cond="ifnb")), "cond"))
    assert parts == {"auf": 13, "mc": 3}
    with pytest.raises(AsmError, match="Conflict"):
        word(add(rf1, rf2, rf3, cond="pushz").fmul(rf4, rf5, rf6, cond="pushz"))


# --- branches, labels --------------------------------------------------------------------------
@pytest.mark.parametrize("cond", sorted(isa.BRANCH_CONDS))
def test_branch_conditions(cond):
    w = word(b(+8, cond=cond))
    assert isa.get_field(w, isa.BRANCH_FIELDS, "cond") == isa.BRANCH_CONDS[cond]
    assert disassemble_word(w) == f"b(+8, cond={cond!r})"


@pytest.mark.parametrize("text", [
    "b(-3, cond='always')", "b(0x1000, cond='a0', absolute=True)", "b(link, cond='anya')",
    "b(rf7, cond='always', set_link=True)", "b(+9, cond='always').unif_addr()",
    "b(+9, cond='always').unif_addr(absolute=True)", "b(rf3, cond='always').unif_addr(rf3)",
])
def test_branch_kinds_round_trip(text):
    assert disassemble_word(assemble_text(text)) == text


def test_relative_branch_offset_counts_from_after_the_delay_slots():
    assert isa.get_field(word(b(+4, cond="always")), isa.BRANCH_FIELDS, "addr_low") == 0
    assert word(b(+0, cond="always")) == 0x02ffffe0ff009000


def test_branch_errors():
    for text, reason in [("b(0x1004, cond='always', absolute=True)", "multiple of 8"),
                         ("b(rf1, cond='always').unif_addr(rf2)", "Conflict registers"),
                         ("b(tmua, cond='always')", "magic"), ("b(+4)", "cond")]:
        with pytest.raises(AsmError, match=reason):
            assemble_text(text)


def test_labels_resolve_forward_and_backward():
    def k():
        L.top
        nop()
        b(R.end, cond="always")
        nop(); nop(); nop()
        b(R.top, cond="anyna")
        nop(); nop(); nop()
        L.end
        nop()
    words = assemble(k)
    assert decode(words[1]).target == 9 - 1
    assert decode(words[5]).target == 0 - 5
    lines = disassemble(words, addresses=True)
    assert "-> 9" in lines[1] and "-> 0" in lines[5]


def test_label_errors_name_the_program():
    def k():
        b(R.nowhere, cond="always")
    with pytest.raises(AsmError, match="undefined label 'nowhere'"):
        assemble(k)

    def twice():
        L.x
        L.x
    with pytest.raises(AsmError, match="defined twice"):
        assemble(twice)


def test_program_errors_name_the_instruction_index():
    def k():
        nop()
        add(rf1, rf2, 1).add(rf3, 2, rf4)
    with pytest.raises(AsmError, match="instruction 1"):
        assemble(k)


def test_rotate_into_rep_is_refused():
    with pytest.raises(AsmError, match="rejects"):
        word(rotate(rep, rf1, rf2))
    with pytest.raises(AsmError, match="dangerous"):
        word(rotate(tmua, rf1, rf2))


def test_unknown_op_is_refused():
    with pytest.raises(AsmError, match="unknown name: fsqrt"):
        assemble_text("fsqrt(rf1, rf2)")


def test_assemble_returns_uint64_words():
    def k():
        nop()
        thread_end()
    w = assemble(k)
    assert w.dtype == np.uint64 and len(w) == 9


def test_context_manager_program():
    with Program("p") as p:
        eidx(rf1)
        thread_end()
    assert len(p.words()) == 9
