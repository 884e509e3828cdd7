"""Hypothesis sweeps: assemble(disassemble(w)) == w for valid instructions and for random words."""
from hypothesis import HealthCheck, assume, given, settings, strategies as st

from tvm_qpu.codegen import AsmError, UndefinedEncoding, assemble_text, decode, disassemble_word, isa
from tvm_qpu.codegen.instr import MAGIC, RF, AluOp, Branch, Instr, encode

# Example counts: every canonical word is checked exhaustively by test_golden.py (the corpus is in
# tests/data/); these sweeps add random spellings and random words beyond it.
SETTINGS = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])

regs = st.sampled_from(RF)
magic = st.sampled_from(sorted(MAGIC.values(), key=lambda r: r.addr))
imms = st.sampled_from(isa.SMALL_IMM_VALUES)
cond_names = st.sampled_from(sorted(isa.COND_NAMES))


def unpack_choices(desc):
    m = desc.mods
    if m in ("f32", "f32_nopack"):
        return list(isa.F32_UNPACK)
    if m in ("vfpack", "sel_pack", "sel_unp"):
        return ["none", "l", "h"]
    if m == "fmov":
        return list(isa.F32_UNPACK_WIDE if desc.alu == "add" else isa.F32_UNPACK_MUL_FMOV)
    if m == "mov":
        return list(isa.I32_UNPACK)
    if m == "f16":
        return list(isa.F16_UNPACK)
    return ["none"]


@st.composite
def alu_op(draw, table, allow_imm):
    desc = draw(st.sampled_from(sorted(table.values(), key=lambda d: (d.opcode, d.sel or 0, d.name))))
    if desc.name == "nop":
        return AluOp(desc, None, (), draw(st.none() | cond_names) if draw(st.booleans()) else None), False
    dst = draw(regs | magic)
    if dst.magic and (desc.name in isa.NO_MAGIC_DST_OPS or desc.name in isa.LANE_MOVE_OPS):
        dst = draw(regs)
    if desc.mods in ("f32", "sel_pack", "fmov") and draw(st.booleans()):
        dst = dst.pack(draw(st.sampled_from(["l", "h"])))
    srcs, used_imm = [], False
    for i in range(desc.nsrc):
        if allow_imm and not used_imm and desc.imm_src and draw(st.integers(0, 9)) == 0:
            srcs.append(draw(imms))
            used_imm = True
            continue
        r = draw(regs)
        if i == 0 or desc.mods in ("f32", "f32_nopack", "vfpack"):
            u = draw(st.sampled_from(unpack_choices(desc)))
            if u != "none":
                r = r.unpack(u)
        srcs.append(r)
    cond = draw(cond_names) if draw(st.integers(0, 3)) == 0 else None
    return AluOp(desc, dst, tuple(srcs), cond), used_imm


@st.composite
def alu_instr(draw):
    add_op, used = draw(alu_op(isa.ADD_OPS, True))
    mul_op, _ = draw(alu_op(isa.MUL_OPS, not used))
    sigs = {}
    if draw(st.integers(0, 2)) == 0:
        names = draw(st.sampled_from([v for v in isa.SIG_TABLE.values()
                                      if v and not any(n.startswith("smimm") for n in v)]))
        for n in names:
            sigs[n] = draw(regs | magic) if n in isa.REG_WRITING_SIGNALS else None
    return Instr(add_op, mul_op, sigs)


@st.composite
def branch(draw):
    kind = draw(st.sampled_from(["rel", "abs", "link", "reg"]))
    cond = draw(st.sampled_from(sorted(isa.BRANCH_CONDS)))
    if kind == "rel":
        br = Branch(draw(st.integers(-(1 << 27), 1 << 27)), cond)
    elif kind == "abs":
        br = Branch(draw(st.integers(0, (1 << 29) - 1)) * 8, cond, absolute=True)
    elif kind == "link":
        br = Branch("link", cond)
    else:
        br = Branch(draw(regs), cond)
    br.set_link = draw(st.booleans())
    u = draw(st.sampled_from(["none", "rel", "abs", "reg"]))
    if u == "rel":
        br.unif_addr()
    elif u == "abs":
        br.unif_addr(absolute=True)
    elif u == "reg":
        br.unif_addr(br.target if kind == "reg" else draw(regs))
    return br


def _check_round_trip(w):
    text = disassemble_word(w)
    assert assemble_text(text) == w, text
    assert encode(decode(w)) == w


@SETTINGS
@given(alu_instr())
def test_valid_alu_instructions_round_trip(ins):
    try:
        w = encode(ins)
    except AsmError:
        assume(False)
    _check_round_trip(w)


@SETTINGS
@given(branch())
def test_valid_branches_round_trip(br):
    _check_round_trip(encode(br))


@settings(max_examples=800, deadline=None)
@given(st.integers(0, (1 << 64) - 1))
def test_random_words_decode_or_are_reported_undefined(w):
    try:
        decode(w)
    except UndefinedEncoding as e:
        assert "0x" in str(e)
        return
    _check_round_trip(w)


@settings(max_examples=500, deadline=None)
@given(st.integers(0, (1 << 64) - 1), st.sampled_from([14, 15, 30, 31, 0, 1, 2, 4, 12]),
       st.integers(0, 127))
def test_random_alu_words_with_common_fields(w, sig, cond):
    # Random words are mostly undefined; force defined sig/cond/op_mul fields to reach deeper.
    w = (w & ~(0x1F << 53) & ~(0x7F << 46)) | (sig << 53) | (cond << 46)
    w |= 1 << 58      # non-zero op_mul: an ALU word
    try:
        decode(w)
    except UndefinedEncoding:
        return
    _check_round_trip(w)


def test_undefined_words_are_reported_not_guessed():
    for w in [0x0, 0x0200000000009000 | (3 << 21), 0x0200000000009000 | (1 << 32), 0x38003186bb03f000 | (23 << 53),
              0x38003186bb03f000 | (0x10 << 46), 0x38003186bb03f000 | 0x3F]:
        try:
            decode(w)
        except UndefinedEncoding:
            continue
        raise AssertionError(f"0x{w:016x} decoded but is undefined")
