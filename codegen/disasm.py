"""Disassembler: instruction model / 64-bit words -> text in the assembler's own dialect.

The text is the canonical spelling used by ``shared/golden/`` (a Python expression that
:func:`asm.assemble_text` turns back into the same word).
"""
from __future__ import annotations

from . import isa
from .instr import AluOp, Branch, Instr, Register, UndefinedEncoding, decode, is_imm


def _fmt_operand(x) -> str:
    if isinstance(x, Register):
        return repr(x)
    if isinstance(x, float):
        return repr(x)
    if is_imm(x):
        return str(int(x))
    raise TypeError(f"cannot format operand {x!r}")


def _fmt_sigs(sigs: dict) -> str | None:
    names = [s for s in isa.SIGNAL_ORDER if s in sigs]
    if not names:
        return None
    parts = [f"{s}({sigs[s]!r})" if sigs[s] is not None else s for s in names]
    return parts[0] if len(parts) == 1 else "[" + ", ".join(parts) + "]"


def _fmt_call(op: AluOp, sig: str | None = None) -> str:
    args = []
    if op.dst is not None:
        args.append(_fmt_operand(op.dst))
    args += [_fmt_operand(s) for s in op.srcs]
    if op.cond is not None:
        args.append(f"cond={op.cond!r}")
    if sig is not None:
        args.append(f"sig={sig}")
    return f"{op.name}({', '.join(args)})"


def _is_plain_nop(op: AluOp) -> bool:
    return op.name == "nop" and op.cond is None


def format_alu(ins: Instr) -> str:
    sig = _fmt_sigs(ins.sigs)
    if _is_plain_nop(ins.mul_op):
        return _fmt_call(ins.add_op, sig)
    if _is_plain_nop(ins.add_op) and ins.mul_op.name not in isa.SHARED_NAMES:
        return _fmt_call(ins.mul_op, sig)
    return _fmt_call(ins.add_op, sig) + "." + _fmt_call(ins.mul_op)


def format_branch(br: Branch) -> str:
    t = br.target
    if isinstance(t, Register):
        tgt = t.name
    elif t == "link":
        tgt = "link"
    elif br.absolute:
        tgt = hex(t)
    elif isinstance(t, int):
        tgt = f"{t:+d}"
    else:
        tgt = str(t)
    args = [tgt, f"cond={br.cond!r}"]
    if br.absolute:
        args.append("absolute=True")
    if br.set_link:
        args.append("set_link=True")
    s = f"b({', '.join(args)})"
    if br.ub:
        if isinstance(br.unif, Register):
            s += f".unif_addr({br.unif.name})"
        elif br.unif == "absolute":
            s += ".unif_addr(absolute=True)"
        else:
            s += ".unif_addr()"
    return s


def format_instr(ins) -> str:
    return format_branch(ins) if ins.kind == "branch" else format_alu(ins)


def disassemble_word(word: int) -> str:
    """Canonical text of one word; raises UndefinedEncoding for words that are not instructions."""
    return format_instr(decode(word))


def disassemble(words, addresses: bool = False) -> list[str]:
    """Text of a program, one line per word. Undefined words are shown as such, never guessed."""
    lines = []
    for i, w in enumerate(words):
        w = int(w)
        try:
            text = disassemble_word(w)
        except UndefinedEncoding as e:
            text = f"undefined(0x{w:016x})  # {e}"
        if addresses:
            ins_note = ""
            if text.startswith("b(") and "absolute" not in text.split(")")[0]:
                try:
                    br = decode(w)
                    if isinstance(br.target, int):
                        ins_note = f"  # -> {i + br.target}"
                except UndefinedEncoding:
                    pass
            text = f"{i:5d}  0x{w:016x}  {text}{ins_note}"
        lines.append(text)
    return lines
