"""V3D 7.1 (VideoCore VII, Raspberry Pi 5) QPU instruction set, described once as data.

Every fact about the encoding lives in the tables of this module; the encoder, the decoder,
the disassembler, the static checker and the emulator all read them, so none of them can drift.

Sources (facts only): Mesa ``src/broadcom/qpu/qpu_pack.c`` / ``qpu_instr.h`` (v71 tables),
``shared/docs/v3d71-isa.md`` and the golden corpus in ``shared/golden/``.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

# --------------------------------------------------------------------------------------------
# Word layouts: name -> (shift, width)
# --------------------------------------------------------------------------------------------
ALU_FIELDS = {
    "op_mul": (58, 6),
    "sig": (53, 5),
    "cond": (46, 7),
    "mm": (45, 1),
    "ma": (44, 1),
    "waddr_m": (38, 6),
    "waddr_a": (32, 6),
    "op_add": (24, 8),
    "raddr_c": (18, 6),
    "raddr_d": (12, 6),
    "raddr_a": (6, 6),
    "raddr_b": (0, 6),
}

BRANCH_FIELDS = {
    "op_mul": (58, 6),      # always 0
    "sig": (53, 5),         # 0b10xxx: bits 57-56 = 0b10 mark a branch
    "addr_low": (35, 21),   # byte address bits 23:3
    "cond": (32, 3),
    "addr_high": (24, 8),   # byte address bits 31:24
    "set_link": (23, 1),
    "msfign": (21, 2),
    "zero": (18, 3),
    "bdu": (15, 3),
    "ub": (14, 1),
    "bdi": (12, 2),
    "raddr_a": (6, 6),
    "zero_low": (0, 6),
}


def get_field(word: int, layout: dict, name: str) -> int:
    shift, width = layout[name]
    return (word >> shift) & ((1 << width) - 1)


def set_field(layout: dict, name: str, value: int) -> int:
    shift, width = layout[name]
    if not 0 <= value < (1 << width):
        raise ValueError(f"value {value} does not fit field {name} ({width} bits)")
    return value << shift


def is_branch_word(word: int) -> bool:
    return get_field(word, ALU_FIELDS, "op_mul") == 0 and (get_field(word, ALU_FIELDS, "sig") & 0b11000) == 0b10000


# --------------------------------------------------------------------------------------------
# Registers
# --------------------------------------------------------------------------------------------
NUM_RF = 64

#: magic write addresses (waddr with the ma/mm bit set)
MAGIC_WADDR = {
    "quad": 5, "null": 6, "tlb": 7, "tlbu": 8, "unifa": 9, "tmul": 10, "tmud": 11, "tmua": 12,
    "tmuau": 13, "vpm": 14, "vpmu": 15, "sync": 16, "syncu": 17, "syncb": 18,
    "tmuc": 32, "tmus": 33, "tmut": 34, "tmur": 35, "tmui": 36, "tmub": 37, "tmudref": 38,
    "tmuoff": 39, "tmuscm": 40, "tmusf": 41, "tmuslod": 42, "tmuhs": 43, "tmuhscm": 44,
    "tmuhsf": 45, "tmuhslod": 46, "rep": 55,
}
MAGIC_NAME = {v: k for k, v in MAGIC_WADDR.items()}

#: magic destinations that talk to the TMU (one TMU access per instruction)
TMU_MAGIC = frozenset(n for n in MAGIC_WADDR if n.startswith("tmu"))
#: magic destinations that consume a uniform when written
UNIFORM_CONSUMING_MAGIC = frozenset({"tmuau", "vpmu", "tlbu", "syncu"})
#: thread-synchronisation magic destinations
TSY_MAGIC = frozenset({"sync", "syncu", "syncb"})
VPM_MAGIC = frozenset({"vpm", "vpmu"})
TLB_MAGIC = frozenset({"tlb", "tlbu"})

# --------------------------------------------------------------------------------------------
# Small immediates (raddr code -> 32-bit pattern)
# --------------------------------------------------------------------------------------------


def _f32_bits(x: float) -> int:
    return struct.unpack("<I", struct.pack("<f", x))[0]


SMALL_IMM_VALUES: tuple = tuple(list(range(16)) + list(range(-16, 0)) + [2.0 ** e for e in range(-8, 8)])
SMALL_IMM_BITS: tuple = tuple(
    (v & 0xFFFFFFFF) if isinstance(v, int) else _f32_bits(v) for v in SMALL_IMM_VALUES)


def small_imm_code(value) -> int:
    """raddr code of a small-immediate literal (int -16..15 or float 2^-8..2^7), else ValueError."""
    if isinstance(value, bool):
        raise ValueError(f"small immediate not representable: {value!r}")
    if isinstance(value, int):
        if -16 <= value <= 15:
            return value if value >= 0 else 32 + value
    elif isinstance(value, float):
        for code in range(32, 48):
            if SMALL_IMM_VALUES[code] == value:
                return code
    raise ValueError(f"small immediate not representable: {value!r}")


# --------------------------------------------------------------------------------------------
# Signals
# --------------------------------------------------------------------------------------------
#: canonical order in which signals are written
SIGNAL_ORDER = ("thrsw", "ldunif", "ldunifa", "ldunifrf", "ldunifarf", "ldtmu", "ldvary",
                "ldtlb", "ldtlbu", "ucb", "wrtmuc")
#: signals that write the register named in the cond field
REG_WRITING_SIGNALS = frozenset({"ldunifrf", "ldunifarf", "ldtmu", "ldvary", "ldtlb", "ldtlbu"})
SMALL_IMM_SIGNALS = ("smimm_a", "smimm_b", "smimm_c", "smimm_d")

#: sig field code -> set of signals (V3D 7.1); codes not listed are reserved
SIG_TABLE = {
    0: frozenset(),
    1: frozenset({"thrsw"}),
    2: frozenset({"ldunif"}),
    3: frozenset({"thrsw", "ldunif"}),
    4: frozenset({"ldtmu"}),
    5: frozenset({"thrsw", "ldtmu"}),
    6: frozenset({"ldtmu", "ldunif"}),
    7: frozenset({"thrsw", "ldtmu", "ldunif"}),
    8: frozenset({"ldvary"}),
    9: frozenset({"thrsw", "ldvary"}),
    10: frozenset({"ldvary", "ldunif"}),
    11: frozenset({"thrsw", "ldvary", "ldunif"}),
    12: frozenset({"ldunifrf"}),
    13: frozenset({"thrsw", "ldunifrf"}),
    14: frozenset({"smimm_a"}),
    15: frozenset({"smimm_b"}),
    16: frozenset({"ldtlb"}),
    17: frozenset({"ldtlbu"}),
    18: frozenset({"wrtmuc"}),
    19: frozenset({"thrsw", "wrtmuc"}),
    20: frozenset({"ldvary", "wrtmuc"}),
    21: frozenset({"thrsw", "ldvary", "wrtmuc"}),
    22: frozenset({"ucb"}),
    24: frozenset({"ldunifa"}),
    25: frozenset({"ldunifarf"}),
    26: frozenset({"ldtmu", "wrtmuc"}),
    27: frozenset({"thrsw", "ldtmu", "wrtmuc"}),
    30: frozenset({"smimm_c"}),
    31: frozenset({"smimm_d"}),
}
SIG_CODE = {v: k for k, v in SIG_TABLE.items()}

# --------------------------------------------------------------------------------------------
# Conditions (flags): push / update / conditional execution, per ALU
# --------------------------------------------------------------------------------------------
PUSH_FLAGS = {"pushz": 1, "pushn": 2, "pushc": 3}
UPDATE_FLAGS = {"andz": 4, "andnz": 5, "nornz": 6, "norz": 7, "andn": 8, "andnn": 9,
                "nornn": 10, "norn": 11, "andc": 12, "andnc": 13, "nornc": 14, "norc": 15}
EXEC_CONDS = {"ifa": 0, "ifb": 1, "ifna": 2, "ifnb": 3}
COND_NAMES = {**{k: ("pf", v) for k, v in PUSH_FLAGS.items()},
              **{k: ("uf", v) for k, v in UPDATE_FLAGS.items()},
              **{k: ("cond", v) for k, v in EXEC_CONDS.items()}}
PF_NAME = {v: k for k, v in PUSH_FLAGS.items()}
UF_NAME = {v: k for k, v in UPDATE_FLAGS.items()}
EXEC_NAME = {v: k for k, v in EXEC_CONDS.items()}

# Which combinations of (add cond, mul cond, add push, mul push, add update, mul update) have a
# 7-bit cond encoding, and its fixed bits. Keys: frozenset of present parts.
# Values: (fixed bits, shift of the add exec cond, shift of the mul exec cond).
COND_LAYOUTS = {
    frozenset(): (0, None, None),
    frozenset({"apf"}): (0, None, None),
    frozenset({"auf"}): (0, None, None),
    frozenset({"mpf"}): (0x10, None, None),
    frozenset({"muf"}): (0x10, None, None),
    frozenset({"ac"}): (0x20, 2, None),
    frozenset({"ac", "mpf"}): (0x20, 2, None),
    frozenset({"mc"}): (0x30, None, 2),
    frozenset({"mc", "apf"}): (0x30, None, 2),
    frozenset({"mc", "ac"}): (0x40, 0, 4),
    frozenset({"mc", "auf"}): (0x40, None, 4),
}


def pack_cond(parts: dict) -> int:
    """parts: {'ac'|'mc'|'apf'|'mpf'|'auf'|'muf': value}. Returns the 7-bit cond field or KeyError."""
    fixed, ac_shift, mc_shift = COND_LAYOUTS[frozenset(parts)]
    bits = fixed
    for key in ("apf", "mpf", "auf", "muf"):
        bits |= parts.get(key, 0)
    if ac_shift is not None:
        bits |= parts["ac"] << ac_shift
    if mc_shift is not None:
        bits |= parts["mc"] << mc_shift
    return bits


def unpack_cond(bits: int) -> dict | None:
    """Inverse of pack_cond; None for the reserved code 0x10."""
    if bits == 0:
        return {}
    if bits >> 2 == 0:
        return {"apf": bits & 3}
    if bits >> 4 == 0:
        return {"auf": bits & 0xF}
    if bits == 0x10:
        return None
    if bits >> 2 == 0x4:
        return {"mpf": bits & 3}
    if bits >> 4 == 0x1:
        return {"muf": bits & 0xF}
    if bits >> 4 == 0x2:
        d = {"ac": (bits >> 2) & 3}
        if bits & 3:
            d["mpf"] = bits & 3
        return d
    if bits >> 4 == 0x3:
        d = {"mc": (bits >> 2) & 3}
        if bits & 3:
            d["apf"] = bits & 3
        return d
    d = {"mc": (bits >> 4) & 3}
    if (bits >> 2) & 3 == 0:
        d["ac"] = bits & 3
    else:
        d["auf"] = bits & 0xF
    return d


# --------------------------------------------------------------------------------------------
# Modifiers (pack / unpack)
# --------------------------------------------------------------------------------------------
F32_PACK = {"none": 0, "l": 1, "h": 2}
F32_UNPACK = {"abs": 0, "none": 1, "l": 2, "h": 3}                       # 2-bit fields
F32_UNPACK_WIDE = {**F32_UNPACK, "sat": 4, "nsat": 5, "max0": 6}          # add-side fmov (3 bits)
F32_UNPACK_MUL_FMOV = {**F32_UNPACK, "sat": 4, "nsat": 5}                 # mul-side fmov
F16_UNPACK = {"none": 0, "r32": 1, "rl2h": 2, "rh2l": 3, "swap": 4}
I32_UNPACK = {"none": 0, "ul": 1, "uh": 2, "il": 3, "ih": 4}
ALL_UNPACK_NAMES = frozenset(F32_UNPACK_WIDE) | frozenset(F16_UNPACK) | frozenset(I32_UNPACK)
ALL_PACK_NAMES = frozenset(F32_PACK)

# --------------------------------------------------------------------------------------------
# Operations
# --------------------------------------------------------------------------------------------
#: modifier schemes: how pack/unpack are carried for an op
#:   none      - no modifiers
#:   f32       - float op: op bits 5:4 output pack, 3:2 src1 unpack, 1:0 src2 unpack
#:   f32_nopack- as f32 without output pack (fcmp)
#:   vfpack    - f32 unpacks without abs, no pack
#:   f16       - f16 unpack of src1 added to the opcode (vfmin / vfmax / vfmul)
#:   sel_pack  - selector low bits 1:0 output pack, 3:2 src unpack (abs refused) (fround...)
#:   sel_unp   - selector bits 3:2 src unpack (abs refused), no pack (ftoin ...)
#:   fmov      - selector = pack | unpack << 2 (3-bit unpack)
#:   mov       - selector = 3 | int-unpack << 2


@dataclass(frozen=True)
class OpDesc:
    name: str
    alu: str            # "add" or "mul"
    opcode: int         # base op_add / op_mul
    nsrc: int           # number of sources (0, 1, 2)
    sel: int | None     # base selector written to raddr_b (add) / raddr_d (mul) when nsrc < 2
    mods: str = "none"
    imm_src: bool = True    # may a source be a small immediate?
    fixed_dst: bool = False  # 0-source op whose destination is optional

    @property
    def ncodes(self) -> int:
        """How many consecutive opcodes the op spans (modifiers folded into the opcode)."""
        return {"f32": 48, "f32_nopack": 16, "f16": 5}.get(self.mods, 1)


def _ops():
    a, m = "add", "mul"
    ops = [
        OpDesc("fadd", a, 0, 2, None, "f32"),
        OpDesc("faddnf", a, 0, 2, None, "f32"),
        OpDesc("vfpack", a, 48, 2, None, "vfpack"),
        OpDesc("add", a, 56, 2, None),
        OpDesc("sub", a, 60, 2, None),
        OpDesc("fsub", a, 64, 2, None, "f32"),
        OpDesc("imin", a, 120, 2, None),
        OpDesc("imax", a, 121, 2, None),
        OpDesc("umin", a, 122, 2, None),
        OpDesc("umax", a, 123, 2, None),
        OpDesc("shl", a, 124, 2, None),
        OpDesc("shr", a, 125, 2, None),
        OpDesc("asr", a, 126, 2, None),
        OpDesc("ror", a, 127, 2, None),
        OpDesc("fmin", a, 128, 2, None, "f32"),
        OpDesc("fmax", a, 128, 2, None, "f32"),
        OpDesc("vfmin", a, 176, 2, None, "f16"),
        OpDesc("band", a, 181, 2, None),
        OpDesc("bor", a, 182, 2, None),
        OpDesc("bxor", a, 183, 2, None),
        OpDesc("vadd", a, 184, 2, None),
        OpDesc("vsub", a, 185, 2, None),
        OpDesc("ldvpmg_in", a, 189, 2, None),
        OpDesc("fcmp", a, 192, 2, None, "f32_nopack"),
        OpDesc("vfmax", a, 240, 2, None, "f16"),
        OpDesc("vpack", a, 247, 2, None),
        OpDesc("v8pack", a, 248, 2, None),
        OpDesc("v10pack", a, 250, 2, None),
        OpDesc("v11fpack", a, 251, 2, None),
        OpDesc("quad_rotate", a, 252, 2, None),
        OpDesc("rotate", a, 253, 2, None),
        OpDesc("shuffle", a, 254, 2, None),
    ]
    for i, n in enumerate(("bnot", "neg", "flapush", "flbpush", "flpop", "clz", "setmsf", "setrevf")):
        ops.append(OpDesc(n, a, 186, 1, i))
    zero_src = ("nop", "tidx", "eidx", "lr", "vfla", "vflna", "vflb", "vflnb", "xcd", "ycd", "msf",
                "revf", "iid", "sampid", "barrierid", "tmuwt", "vpmwt", "flafirst", "flnafirst")
    for i, n in enumerate(zero_src):
        ops.append(OpDesc(n, a, 187, 0, i, fixed_dst=True))
    ops.append(OpDesc("fxcd", a, 187, 0, 32, fixed_dst=True))
    ops.append(OpDesc("fycd", a, 187, 0, 36, fixed_dst=True))
    for n, s in (("ldvpmv_in", 0), ("ldvpmd_in", 1), ("ldvpmp", 2), ("recip", 32), ("rsqrt", 33),
                 ("exp", 34), ("log", 35), ("sin", 36), ("rsqrt2", 37), ("ballot", 38),
                 ("bcastf", 39), ("alleq", 40), ("allfeq", 41)):
        ops.append(OpDesc(n, a, 188, 1, s))
    for n, s in (("fround", 0), ("ftrunc", 16), ("ffloor", 32), ("fceil", 48)):
        ops.append(OpDesc(n, a, 245, 1, s, "sel_pack", imm_src=False))
    for n, s in (("ftoin", 3), ("ftoiz", 19), ("ftouz", 35), ("ftoc", 51)):
        ops.append(OpDesc(n, a, 245, 1, s, "sel_unp", imm_src=False))
    for n, s in (("fdx", 0), ("fdy", 16)):
        ops.append(OpDesc(n, a, 246, 1, s, "sel_pack", imm_src=False))
    ops.append(OpDesc("itof", a, 246, 1, 32))
    ops.append(OpDesc("utof", a, 246, 1, 36))
    ops.append(OpDesc("fmov", a, 249, 1, 0, "fmov"))
    ops.append(OpDesc("mov", a, 249, 1, 3, "mov"))

    ops += [
        OpDesc("add", m, 1, 2, None),
        OpDesc("sub", m, 2, 2, None),
        OpDesc("umul24", m, 3, 2, None),
        OpDesc("vfmul", m, 4, 2, None, "f16"),
        OpDesc("smul24", m, 9, 2, None),
        OpDesc("multop", m, 10, 2, None),
        OpDesc("fmov", m, 14, 1, 0, "fmov"),
        OpDesc("mov", m, 14, 1, 3, "mov"),
        OpDesc("ftounorm16", m, 14, 1, 32),
        OpDesc("ftosnorm16", m, 14, 1, 33),
        OpDesc("vftounorm8", m, 14, 1, 34),
        OpDesc("vftosnorm8", m, 14, 1, 35),
        OpDesc("vftounorm10lo", m, 14, 1, 48),
        OpDesc("vftounorm10hi", m, 14, 1, 49),
        OpDesc("nop", m, 14, 0, 63, fixed_dst=True),
        OpDesc("fmul", m, 16, 2, None, "f32"),
    ]
    return ops


OPS = tuple(_ops())
ADD_OPS = {d.name: d for d in OPS if d.alu == "add"}
MUL_OPS = {d.name: d for d in OPS if d.alu == "mul"}
#: mul-ALU names that also name an add-ALU op (a lone call of these is the add op)
SHARED_NAMES = frozenset(ADD_OPS) & frozenset(MUL_OPS)

#: ops whose result goes through the SFU (special function unit)
SFU_OPS = frozenset({"recip", "rsqrt", "exp", "log", "sin", "rsqrt2"})
#: ops that rotate lanes, whose destination may not be rep / quad (or a TMU register)
LANE_MOVE_OPS = frozenset({"rotate", "quad_rotate", "shuffle"})
#: ops reading / writing the VPM
VPM_OPS = frozenset({"ldvpmv_in", "ldvpmd_in", "ldvpmp", "ldvpmg_in"})
#: ops whose destination selects a different op when magic (the _out variants)
NO_MAGIC_DST_OPS = VPM_OPS


def _decode_tables():
    """op code -> list of OpDesc that may sit there (resolved by selector / operand order)."""
    add = {}
    mul = {}
    for d in OPS:
        table = add if d.alu == "add" else mul
        if d.mods == "vfpack":
            codes = [48 + (ua << 2) + ub for ua in (1, 2, 3) for ub in (1, 2, 3)]
        elif d.mods == "f32" and d.alu == "mul":
            codes = range(16, 64)
        else:
            codes = range(d.opcode, d.opcode + d.ncodes)
        for c in codes:
            table.setdefault(c, []).append(d)
    return add, mul


ADD_BY_CODE, MUL_BY_CODE = _decode_tables()

# --------------------------------------------------------------------------------------------
# Branches
# --------------------------------------------------------------------------------------------
BRANCH_CONDS = {"always": 0, "a0": 2, "na0": 3, "alla": 4, "anyna": 5, "anya": 6, "allna": 7}
BRANCH_COND_NAME = {v: k for k, v in BRANCH_CONDS.items()}
BDI_ABSOLUTE, BDI_RELATIVE, BDI_LINK, BDI_REGISTER = 0, 1, 2, 3
BDU_ABSOLUTE, BDU_RELATIVE, BDU_REGISTER = 0, 1, 3
BRANCH_DELAY_SLOTS = 3
THRSW_DELAY_SLOTS = 2
UNIFA_LATENCY = 3        # instructions between writing unifa and ldunifa
