"""Instruction model and the bit-exact encoder / decoder for V3D 7.1 QPU words.

The model is what the assembler DSL builds, what the disassembler prints and what the emulator
pre-decodes. Encoding and decoding are both driven by the tables in :mod:`isa`.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from . import isa
from .isa import ALU_FIELDS as AF, BRANCH_FIELDS as BF


class AsmError(ValueError):
    """An instruction that cannot be assembled; the message names the instruction and the reason."""


class UndefinedEncoding(ValueError):
    """A 64-bit word that is not a defined (canonical) V3D 7.1 instruction."""


# --------------------------------------------------------------------------------------------
# Operands
# --------------------------------------------------------------------------------------------
class Register:
    """A register-file entry ``rfN`` or a magic write address, with optional pack / unpack."""

    __slots__ = ("name", "magic", "addr", "pack_mod", "unpack_mod")

    def __init__(self, name: str, magic: bool, addr: int, pack_mod: str = "none", unpack_mod: str = "none"):
        self.name, self.magic, self.addr = name, magic, addr
        self.pack_mod, self.unpack_mod = pack_mod, unpack_mod

    def pack(self, mode: str) -> "Register":
        if self.pack_mod != "none":
            raise AsmError("Conflict pack")
        if mode not in isa.ALL_PACK_NAMES:
            raise AsmError(f"unknown pack modifier {mode!r}")
        return Register(self.name, self.magic, self.addr, mode, self.unpack_mod)

    def unpack(self, mode: str) -> "Register":
        if self.unpack_mod != "none":
            raise AsmError("Conflict unpack")
        if mode not in isa.ALL_UNPACK_NAMES:
            raise AsmError(f"unknown unpack modifier {mode!r}")
        return Register(self.name, self.magic, self.addr, self.pack_mod, mode)

    def bare(self) -> "Register":
        return Register(self.name, self.magic, self.addr)

    def __eq__(self, other):
        return (isinstance(other, Register) and (self.name, self.pack_mod, self.unpack_mod)
                == (other.name, other.pack_mod, other.unpack_mod))

    def __hash__(self):
        return hash((self.name, self.pack_mod, self.unpack_mod))

    def __repr__(self):
        s = self.name
        if self.pack_mod != "none":
            s += f".pack({self.pack_mod!r})"
        if self.unpack_mod != "none":
            s += f".unpack({self.unpack_mod!r})"
        return s


RF = tuple(Register(f"rf{i}", False, i) for i in range(isa.NUM_RF))
MAGIC = {n: Register(n, True, a) for n, a in isa.MAGIC_WADDR.items()}
NULL = MAGIC["null"]


def is_imm(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


# --------------------------------------------------------------------------------------------
# Instructions
# --------------------------------------------------------------------------------------------
@dataclass
class AluOp:
    desc: isa.OpDesc
    dst: Register | None = None
    srcs: tuple = ()
    cond: str | None = None

    @property
    def name(self) -> str:
        return self.desc.name


NOP_ADD = isa.ADD_OPS["nop"]
NOP_MUL = isa.MUL_OPS["nop"]


@dataclass
class Instr:
    """One ALU instruction: an add-ALU op, a mul-ALU op, and signals."""
    add_op: AluOp = field(default_factory=lambda: AluOp(NOP_ADD))
    mul_op: AluOp = field(default_factory=lambda: AluOp(NOP_MUL))
    sigs: dict = field(default_factory=dict)     # signal name -> destination Register or None

    kind = "alu"


@dataclass
class Branch:
    """A branch. target: int instruction delta ('rel'), byte address ('abs'), Register ('reg'),
    'link', or a label name (str) resolved by the assembler."""
    target: object
    cond: str = "always"
    absolute: bool = False
    set_link: bool = False
    ub: bool = False
    unif: object = None            # None (relative), "absolute", or a Register

    kind = "branch"

    def unif_addr(self, reg=None, absolute: bool = False) -> "Branch":
        if reg is not None and absolute:
            raise AsmError("unif_addr takes a register or absolute=True, not both")
        if reg is not None:
            if not isinstance(reg, Register) or reg.magic or reg.pack_mod != "none" or reg.unpack_mod != "none":
                raise AsmError("Invalid src object")
        self.ub = True
        self.unif = reg if reg is not None else ("absolute" if absolute else None)
        return self


# --------------------------------------------------------------------------------------------
# Modifier schemes: (pack, unpack-of-src1, unpack-of-src2) <-> bits
# --------------------------------------------------------------------------------------------
def _unpack_table(desc: isa.OpDesc):
    if desc.mods == "fmov":
        return isa.F32_UNPACK_WIDE if desc.alu == "add" else isa.F32_UNPACK_MUL_FMOV
    if desc.mods == "mov":
        return isa.I32_UNPACK
    if desc.mods == "f16":
        return isa.F16_UNPACK
    return isa.F32_UNPACK


def _check_mods(op: AluOp, text: str):
    """Validate modifiers of op against its scheme; return (pack, ua, ub) codes."""
    d = op.desc
    dst = op.dst
    pack = dst.pack_mod if isinstance(dst, Register) else "none"
    unps = [s.unpack_mod if isinstance(s, Register) else "none" for s in op.srcs]
    while len(unps) < 2:
        unps.append("none")
    if isinstance(dst, Register) and dst.unpack_mod != "none":
        raise AsmError(f"not encodable: .unpack({dst.unpack_mod!r}) on dst of {d.name} has no encoding slot: {text}")
    for s in op.srcs:
        if isinstance(s, Register) and s.pack_mod != "none":
            raise AsmError(f"not encodable: .pack({s.pack_mod!r}) on a source of {d.name} has no encoding slot: {text}")
    m = d.mods
    if m == "none":
        if pack != "none":
            raise AsmError(f'"{d.name}" rejects dst with "{pack}" modifier: {text}')
        for i, u in enumerate(unps):
            if u != "none":
                raise AsmError(f'"{d.name}" rejects src{i + 1} with "{u}" modifier: {text}')
        return 0, 0, 0
    pack_ok = m in ("f32", "sel_pack", "fmov")
    if pack != "none" and not pack_ok:
        raise AsmError(f"not encodable: .pack({pack!r}) on dst of {d.name} has no encoding slot: {text}")
    pc = isa.F32_PACK[pack]
    table = _unpack_table(d)
    codes = []
    for i, u in enumerate(unps):
        slot = i < d.nsrc and (m not in ("f16",) or i == 0)
        if not slot:
            if u != "none":
                raise AsmError(f"not encodable: .unpack({u!r}) on src{i + 1} of {d.name} has no encoding slot: {text}")
            codes.append(0)
            continue
        if u not in table:
            if table is isa.F32_UNPACK and u in isa.F32_UNPACK_WIDE:
                raise AsmError(f"not encodable: unpack {u!r} on src{i + 1} has no slot in {d.name} "
                               f"(2-bit field: abs/none/l/h): {text}")
            if d.mods == "fmov" and u == "max0":
                raise AsmError(f"not encodable: unpack 'max0' has no slot in mul-side fmov: {text}")
            kind = {"mov": "i32", "f16": "f16"}.get(m, "f32")
            raise AsmError(f'"{d.name}" requires src{i + 1} as register with modifier to {kind}: {text}')
        if u == "abs" and m in ("vfpack", "sel_pack", "sel_unp"):
            raise AsmError(f'"{d.name}" rejects "abs" modifier: {text}')
        codes.append(table[u])
    return pc, codes[0], codes[1]


def _sel_bits(desc: isa.OpDesc, pc: int, ua: int) -> int:
    """Selector value (raddr_b / raddr_d) of a 0/1-source op with its modifiers."""
    m = desc.mods
    if m == "sel_pack":
        return desc.sel | (ua << 2) | pc
    if m == "sel_unp":
        return desc.sel | (ua << 2)
    if m == "fmov":
        return pc | (ua << 2)
    if m == "mov":
        return 3 | (ua << 2)
    return desc.sel


def _sel_match(desc: isa.OpDesc, sel: int):
    """Inverse of _sel_bits: (pack, unpack) if sel selects desc, else None."""
    m = desc.mods
    if m == "sel_pack":
        if sel & 0x30 == desc.sel and sel & 3 != 3 and (sel >> 2) & 3 != 0:
            return sel & 3, (sel >> 2) & 3
        return None
    if m == "sel_unp":
        if sel & 0x33 == desc.sel and (sel >> 2) & 3 != 0:
            return 0, (sel >> 2) & 3
        return None
    if m == "fmov":
        table = _unpack_table(desc)
        if sel & 3 != 3 and sel < 32 and (sel >> 2) in table.values():
            return sel & 3, sel >> 2
        return None
    if m == "mov":
        if sel & 3 == 3 and (sel >> 2) in isa.I32_UNPACK.values():
            return 0, sel >> 2
        return None
    return (0, 0) if sel == desc.sel else None


def _opcode_bits(desc: isa.OpDesc, pc: int, ua: int, ub: int) -> int:
    m = desc.mods
    if m == "f32":
        return desc.opcode + (pc << 4) + (ua << 2) + ub
    if m in ("f32_nopack", "vfpack"):
        return desc.opcode + (ua << 2) + ub
    if m == "f16":
        return desc.opcode + ua
    return desc.opcode


def _key(is_imm_flag: bool, unpack_code: int, raddr: int) -> int:
    return 256 * int(is_imm_flag) + 64 * unpack_code + raddr


ORDERED_PAIRS = {"fadd": ("fadd", False), "faddnf": ("fadd", True),
                 "fmin": ("fmin", False), "fmax": ("fmin", True)}


# --------------------------------------------------------------------------------------------
# Encoder
# --------------------------------------------------------------------------------------------
def _src_field(op: AluOp, i: int, text: str):
    """(raddr, is_imm) for source i of op."""
    s = op.srcs[i]
    if is_imm(s):
        if not op.desc.imm_src:
            raise AsmError(f'"{op.name}" requires raddr_a as register: {text}')
        try:
            return isa.small_imm_code(s), True
        except ValueError as e:
            raise AsmError(f"{e}: {text}") from None
    if isinstance(s, Register):
        if s.magic:
            raise AsmError(f"not encodable: src{i + 1} of {op.name} must be rf0..rf63 or a small immediate "
                           f"(got {s.name}): {text}")
        return s.addr, False
    raise AsmError(f"Invalid src object {s!r}: {text}")


def _dst_field(op: AluOp, text: str):
    d = op.dst
    if d is None:
        return isa.MAGIC_WADDR["null"], True
    if not isinstance(d, Register):
        raise AsmError(f"Invalid dst object {d!r}: {text}")
    if op.name in isa.LANE_MOVE_OPS and d.name in ("rep", "quad"):
        raise AsmError(f'"{op.name}" rejects "{d.name}" dst: {text}')
    if op.name == "rotate" and d.name in ("tmua", "tmud", "tmuc"):
        raise AsmError(f'"rotate({d.name}, ...)" is dangerous: {text}')
    if d.magic and op.name in isa.NO_MAGIC_DST_OPS:
        raise AsmError(f"not encodable: magic destination on {op.name} selects a different operation: {text}")
    return d.addr, d.magic


def encode_alu(ins: Instr, text: str = "") -> int:
    text = text or _fallback_text(ins)
    if ins.add_op.name == "rotate" and isinstance(ins.mul_op.dst, Register) \
            and ins.mul_op.dst.name in ("tmua", "tmud", "tmuc"):
        raise AsmError(f'"rotate(...).op({ins.mul_op.dst.name}, ...)" is dangerous: {text}')
    sigs = set(ins.sigs)
    word = 0
    cond_parts = {}
    raddr = {}
    imm_fields = []
    for alu, op in (("add", ins.add_op), ("mul", ins.mul_op)):
        d = op.desc
        if len(op.srcs) != d.nsrc:
            raise AsmError(f"not encodable: {d.name} takes {d.nsrc} source(s), got {len(op.srcs)}: {text}")
        if d.name == "nop" and op.dst is not None:
            raise AsmError(f"not encodable: nop takes no destination: {text}")
        pc, ua, ub = _check_mods(op, text)
        f_a, f_b = ("raddr_a", "raddr_b") if alu == "add" else ("raddr_c", "raddr_d")
        srcs = [_src_field(op, i, text) for i in range(d.nsrc)]
        if d.nsrc == 2:
            (ra, ia), (rb, ib) = srcs
            if d.name in ORDERED_PAIRS:
                base, want_greater = ORDERED_PAIRS[d.name]
                ka, kb = _key(ia, ua, ra), _key(ib, ub, rb)
                if ka == kb and want_greater:
                    raise AsmError(f"not encodable: {d.name} with identical operands is indistinguishable "
                                   f"from {base}: {text}")
                if (ka > kb) != want_greater:
                    (ra, ia, ua), (rb, ib, ub) = (rb, ib, ub), (ra, ia, ua)
            raddr[f_a], raddr[f_b] = ra, rb
            if ia:
                imm_fields.append(f_a)
            if ib:
                imm_fields.append(f_b)
        else:
            if d.nsrc == 1:
                ra, ia = srcs[0]
                raddr[f_a] = ra
                if ia:
                    imm_fields.append(f_a)
            else:
                raddr[f_a] = 0
            raddr[f_b] = _sel_bits(d, pc, ua)
        waddr, magic = _dst_field(op, text)
        word |= isa.set_field(AF, "op_add" if alu == "add" else "op_mul", _opcode_bits(d, pc, ua, ub))
        word |= isa.set_field(AF, "waddr_a" if alu == "add" else "waddr_m", waddr)
        word |= isa.set_field(AF, "ma" if alu == "add" else "mm", int(magic))
        if op.cond is not None:
            if op.cond not in isa.COND_NAMES:
                raise AsmError(f"not encodable: unknown condition {op.cond!r}: {text}")
            kind, value = isa.COND_NAMES[op.cond]
            key = ("a" if alu == "add" else "m") + {"pf": "pf", "uf": "uf", "cond": "c"}[kind]
            cond_parts[key] = value
    for f, v in raddr.items():
        word |= isa.set_field(AF, f, v)
    for f in imm_fields:
        sigs.add("smimm_" + f[-1])
    code = isa.SIG_CODE.get(frozenset(sigs))
    if code is None:
        raise AsmError(f"Invalid signal set: {{{', '.join(sorted(sigs))}}}: {text}")
    word |= isa.set_field(AF, "sig", code)
    writers = [s for s in ins.sigs if s in isa.REG_WRITING_SIGNALS]
    if len(writers) > 1:
        raise AsmError(f"Too many signals that require destination register: {text}")
    if writers:
        if cond_parts:
            raise AsmError(f"Conflict conditional flags and load signal {writers[0]}: {text}")
        dst = ins.sigs[writers[0]]
        if not isinstance(dst, Register):
            raise AsmError(f"not encodable: {writers[0]} requires a destination register: {text}")
        word |= isa.set_field(AF, "cond", (int(dst.magic) << 6) | dst.addr)
    else:
        try:
            word |= isa.set_field(AF, "cond", isa.pack_cond(cond_parts))
        except KeyError:
            raise AsmError(f"Conflict conditional flags {ins.add_op.cond!r} and {ins.mul_op.cond!r}: {text}") from None
    return word


def encode_branch(br: Branch, text: str = "") -> int:
    text = text or repr(br)
    if br.cond not in isa.BRANCH_CONDS:
        raise AsmError(f"not encodable: unknown branch condition {br.cond!r}: {text}")
    raddr_a = 0
    t = br.target
    if isinstance(t, Register):
        if t.magic:
            raise AsmError(f"not encodable: branch to magic register {t.name}: {text}")
        if t.pack_mod != "none" or t.unpack_mod != "none":
            raise AsmError(f"not encodable: modifier on branch register: {text}")
        bdi, addr, raddr_a = isa.BDI_REGISTER, 0, t.addr
    elif t == "link":
        bdi, addr = isa.BDI_LINK, 0
    elif isinstance(t, int) and not isinstance(t, bool):
        if br.absolute:
            if t % 8:
                raise AsmError(f"not encodable: absolute branch target must be a multiple of 8: {text}")
            if not 0 <= t < 1 << 32:
                raise AsmError(f"not encodable: absolute branch target must fit in 32 bits: {text}")
            bdi, addr = isa.BDI_ABSOLUTE, t
        else:
            off = (t - 4) * 8
            if not -(1 << 31) <= off < (1 << 31):
                raise AsmError(f"not encodable: relative branch out of range: {text}")
            bdi, addr = isa.BDI_RELATIVE, off & 0xFFFFFFFF
    else:
        raise AsmError(f"Invalid branch target {t!r}: {text}")
    if br.ub:
        if isinstance(br.unif, Register):
            if bdi == isa.BDI_REGISTER and raddr_a != br.unif.addr:
                raise AsmError(f"Conflict registers: {text}")
            bdu, raddr_a = isa.BDU_REGISTER, br.unif.addr
        else:
            bdu = isa.BDU_ABSOLUTE if br.unif == "absolute" else isa.BDU_RELATIVE
    else:
        bdu = isa.BDU_RELATIVE
    w = isa.set_field(BF, "sig", 0b10000)
    w |= isa.set_field(BF, "addr_low", (addr >> 3) & 0x1FFFFF)
    w |= isa.set_field(BF, "addr_high", addr >> 24)
    w |= isa.set_field(BF, "cond", isa.BRANCH_CONDS[br.cond])
    w |= isa.set_field(BF, "set_link", int(br.set_link))
    w |= isa.set_field(BF, "bdu", bdu)
    w |= isa.set_field(BF, "ub", int(br.ub))
    w |= isa.set_field(BF, "bdi", bdi)
    w |= isa.set_field(BF, "raddr_a", raddr_a)
    return w


def encode(ins, text: str = "") -> int:
    return encode_branch(ins, text) if ins.kind == "branch" else encode_alu(ins, text)


def _fallback_text(ins) -> str:
    try:
        from .disasm import format_instr
        return format_instr(ins)
    except Exception:  # pragma: no cover - formatting must never hide the real error
        return repr(ins)


# --------------------------------------------------------------------------------------------
# Decoder
# --------------------------------------------------------------------------------------------
def _imm_value(code: int):
    if code >= len(isa.SMALL_IMM_VALUES):
        raise UndefinedEncoding(f"small-immediate code {code} is reserved")
    return isa.SMALL_IMM_VALUES[code]


def _decode_op(alu: str, word: int, sigs: frozenset) -> AluOp:
    if alu == "add":
        code, by_code = isa.get_field(word, AF, "op_add"), isa.ADD_BY_CODE
        fa, fb, wf, mf = "raddr_a", "raddr_b", "waddr_a", "ma"
    else:
        code, by_code = isa.get_field(word, AF, "op_mul"), isa.MUL_BY_CODE
        fa, fb, wf, mf = "raddr_c", "raddr_d", "waddr_m", "mm"
    ra, rb = isa.get_field(word, AF, fa), isa.get_field(word, AF, fb)
    ia, ib = f"smimm_{fa[-1]}" in sigs, f"smimm_{fb[-1]}" in sigs
    cands = by_code.get(code, [])
    desc = pc = ua = ubc = None
    for d in cands:
        if d.nsrc == 2:
            rel = code - d.opcode
            if d.mods == "f32":
                pc, ua, ubc = rel >> 4, (rel >> 2) & 3, rel & 3
                if pc == 3:
                    continue
                if d.name in ORDERED_PAIRS:
                    greater = _key(ia, ua, ra) > _key(ib, ubc, rb)
                    if greater != ORDERED_PAIRS[d.name][1]:
                        continue
            elif d.mods in ("f32_nopack", "vfpack"):
                pc, ua, ubc = 0, (rel >> 2) & 3, rel & 3
            elif d.mods == "f16":
                pc, ua, ubc = 0, rel, 0
            else:
                pc, ua, ubc = 0, 0, 0
            desc = d
            break
        m = _sel_match(d, rb)
        if m is not None:
            desc, (pc, ua), ubc = d, m, 0
            break
    if desc is None:
        raise UndefinedEncoding(f"undefined {alu}-ALU opcode {code} (selector {rb})")

    def operand(raddr, imm, unpack_code):
        if imm:
            return _imm_value(raddr)
        r = RF[raddr]
        if desc.mods == "none" or unpack_code is None:
            return r
        table = {v: k for k, v in _unpack_table(desc).items()}
        name = table.get(unpack_code)
        if name is None:
            raise UndefinedEncoding(f"undefined unpack code {unpack_code} for {desc.name}")
        return r if name == "none" else r.unpack(name)

    if desc.nsrc == 2:
        if desc.mods == "f16":
            srcs = (operand(ra, ia, ua), operand(rb, ib, None))
        else:
            srcs = (operand(ra, ia, ua), operand(rb, ib, ubc))
    elif desc.nsrc == 1:
        srcs = (operand(ra, ia, ua if desc.mods != "none" else None),)
    else:
        srcs = ()
    waddr, magic = isa.get_field(word, AF, wf), isa.get_field(word, AF, mf)
    if magic:
        name = isa.MAGIC_NAME.get(waddr)
        if name is None:
            raise UndefinedEncoding(f"reserved magic write address {waddr}")
        dst = MAGIC[name]
    else:
        dst = RF[waddr]
    if desc.mods in ("f32", "sel_pack", "fmov") and pc:
        names = {v: k for k, v in isa.F32_PACK.items()}
        if pc not in names:
            raise UndefinedEncoding(f"undefined output pack {pc}")
        dst = dst.pack(names[pc])
    if desc.nsrc == 0 and desc.fixed_dst and dst is MAGIC["null"]:
        dst = None
    if desc.name == "nop":
        dst = None
    return AluOp(desc, dst, srcs)


def decode(word: int):
    """Decode one 64-bit word into an Instr or Branch; UndefinedEncoding if it is not defined."""
    word = int(word) & 0xFFFFFFFFFFFFFFFF
    prefix = f"0x{word:016x}"
    try:
        if isa.get_field(word, AF, "op_mul") == 0:
            if not isa.is_branch_word(word):
                raise UndefinedEncoding(f"{prefix}: op_mul 0 with a non-branch signal")
            ins = _decode_branch(word)
        else:
            ins = _decode_alu(word)
    except UndefinedEncoding as e:
        if str(e).startswith(prefix):
            raise
        raise UndefinedEncoding(f"{prefix}: {e}") from None
    try:
        again = encode(ins)
    except AsmError as e:
        raise UndefinedEncoding(f"0x{word:016x}: not a valid instruction ({e})") from None
    if again != word:
        raise UndefinedEncoding(f"0x{word:016x}: non-canonical encoding (unused or reserved bits set; "
                                f"nearest defined word 0x{again:016x})")
    return ins


def _decode_alu(word: int) -> Instr:
    sig_code = isa.get_field(word, AF, "sig")
    sigs = isa.SIG_TABLE.get(sig_code)
    if sigs is None:
        raise UndefinedEncoding(f"0x{word:016x}: reserved signal code {sig_code}")
    ins = Instr(add_op=_decode_op("add", word, sigs), mul_op=_decode_op("mul", word, sigs))
    cond = isa.get_field(word, AF, "cond")
    for s in sigs:
        if s.startswith("smimm"):
            continue
        if s in isa.REG_WRITING_SIGNALS:
            magic, addr = cond >> 6, cond & 63
            if magic:
                name = isa.MAGIC_NAME.get(addr)
                if name is None:
                    raise UndefinedEncoding(f"0x{word:016x}: reserved magic address {addr} for {s}")
                ins.sigs[s] = MAGIC[name]
            else:
                ins.sigs[s] = RF[addr]
        else:
            ins.sigs[s] = None
    if not any(s in isa.REG_WRITING_SIGNALS for s in sigs):
        parts = isa.unpack_cond(cond)
        if parts is None:
            raise UndefinedEncoding(f"0x{word:016x}: reserved condition code {cond:#x}")
        names = {"apf": isa.PF_NAME, "mpf": isa.PF_NAME, "auf": isa.UF_NAME, "muf": isa.UF_NAME,
                 "ac": isa.EXEC_NAME, "mc": isa.EXEC_NAME}
        for key, value in parts.items():
            op = ins.add_op if key[0] == "a" else ins.mul_op
            if op.cond is not None:
                raise UndefinedEncoding(f"0x{word:016x}: two conditions on one ALU")
            op.cond = names[key][value]
    return ins


def _decode_branch(word: int) -> Branch:
    g = lambda f: isa.get_field(word, BF, f)  # noqa: E731
    cond = isa.BRANCH_COND_NAME.get(g("cond"))
    if cond is None:
        raise UndefinedEncoding(f"0x{word:016x}: reserved branch condition {g('cond')}")
    addr = (g("addr_high") << 24) | (g("addr_low") << 3)
    bdi = g("bdi")
    if bdi == isa.BDI_RELATIVE:
        off = addr - (1 << 32) if addr >= 1 << 31 else addr
        br = Branch(off // 8 + 4, cond)
    elif bdi == isa.BDI_ABSOLUTE:
        br = Branch(addr, cond, absolute=True)
    elif bdi == isa.BDI_LINK:
        br = Branch("link", cond)
    else:
        br = Branch(RF[g("raddr_a")], cond)
    br.set_link = bool(g("set_link"))
    if g("ub"):
        bdu = g("bdu")
        if bdu == isa.BDU_REGISTER:
            br.unif_addr(RF[g("raddr_a")])
        elif bdu == isa.BDU_ABSOLUTE:
            br.unif_addr(absolute=True)
        elif bdu == isa.BDU_RELATIVE:
            br.unif_addr()
        else:
            raise UndefinedEncoding(f"0x{word:016x}: undefined uniform branch kind bdu={bdu}")
    return br
