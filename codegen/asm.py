"""The QPU assembler DSL (py-videocore7 mnemonics) and the text front end.

Writing kernels::

    from tvm_qpu.codegen.asm import *

    def kernel():
        eidx(rf1, sig=ldunif)            # rf0 <- uniform, rf1 <- 0..15
        shl(rf1, rf1, 2)
        add(rf2, rf0, rf1)
        L.loop
        ...
        b(R.loop, cond="anyna")
        nop(); nop(); nop()

    words = assemble(kernel)             # numpy uint64 array

A call whose name is an add-ALU op fills the add ALU; ``.mulop(...)`` chained on it fills the mul
ALU of the same instruction (``fadd(...).fmul(...)``); a lone mul-only op (``fmul``, ``smul24``...)
uses the mul ALU with the add ALU idle. ``nop().mov(...)`` spells the mul-side ``mov``.
"""
from __future__ import annotations

import ast

import numpy as np

from . import isa
from .instr import (MAGIC, NOP_MUL, RF, AluOp, AsmError, Branch, Instr, Register, encode,
                    is_imm)

# --------------------------------------------------------------------------------------------
# Signals
# --------------------------------------------------------------------------------------------


class Signal:
    __slots__ = ("name", "dst")

    def __init__(self, name: str, dst: Register | None = None):
        self.name, self.dst = name, dst

    def __call__(self, dst) -> "Signal":
        if self.name not in isa.REG_WRITING_SIGNALS:
            raise AsmError("this signal takes no destination register")
        if not isinstance(dst, Register) or dst.pack_mod != "none" or dst.unpack_mod != "none":
            raise AsmError(f"{self.name} destination must be a register, got {dst!r}")
        return Signal(self.name, dst)

    def __repr__(self):
        return f"{self.name}({self.dst!r})" if self.dst is not None else self.name


SIGNALS = {n: Signal(n) for n in isa.SIGNAL_ORDER}


def _sig_dict(sig) -> dict:
    if sig is None:
        return {}
    items = sig if isinstance(sig, (list, tuple)) else [sig]
    out = {}
    for s in items:
        if not isinstance(s, Signal):
            raise AsmError(f"not a signal: {s!r}")
        if s.name in out:
            raise AsmError(f'Signal "{s.name}" is duplicated')
        if s.name in isa.REG_WRITING_SIGNALS and s.dst is None:
            raise AsmError(f'not encodable: {s.name} requires a destination register, e.g. "{s.name}(rf0)"')
        out[s.name] = s.dst
    return out


# --------------------------------------------------------------------------------------------
# Programs and labels
# --------------------------------------------------------------------------------------------
class LabelRef:
    __slots__ = ("name",)

    def __init__(self, name: str):
        self.name = name

    def __repr__(self):
        return f"R.{self.name}"


class Program:
    """A sequence of instructions with labels; use as a context manager to collect DSL calls."""

    _stack: list = []

    def __init__(self, name: str = "kernel"):
        self.name = name
        self.items: list = []
        self.labels: dict = {}

    def __enter__(self):
        Program._stack.append(self)
        return self

    def __exit__(self, *exc):
        Program._stack.pop()

    def label(self, name: str):
        if name in self.labels:
            raise AsmError(f"label {name!r} defined twice in {self.name}")
        self.labels[name] = len(self.items)

    def emit(self, ins):
        self.items.append(ins)
        return ins

    def __len__(self):
        return len(self.items)

    def words(self) -> np.ndarray:
        out = np.empty(len(self.items), dtype=np.uint64)
        for i, ins in enumerate(self.items):
            if ins.kind == "branch" and isinstance(ins.target, LabelRef):
                name = ins.target.name
                if name not in self.labels:
                    raise AsmError(f"{self.name}: undefined label {name!r} (instruction {i})")
                ins = Branch(self.labels[name] - i, ins.cond, False, ins.set_link, ins.ub, ins.unif)
            try:
                out[i] = encode(ins)
            except AsmError as e:
                raise AsmError(f"{self.name}: instruction {i}: {e}") from None
        return out


def _current():
    return Program._stack[-1] if Program._stack else None


def _emit(ins):
    p = _current()
    if p is not None:
        p.emit(ins)
    return ins


class _LabelDef:
    def __getattr__(self, name):
        p = _current()
        if p is None:
            raise AsmError("labels need an active Program")
        p.label(name)
        return name


class _LabelUse:
    def __getattr__(self, name):
        return LabelRef(name)


L = _LabelDef()
R = _LabelUse()


def assemble(kernel, *args, name: str | None = None, **kwargs) -> np.ndarray:
    """Run a kernel-building function (or take a Program) and return its 64-bit words.
    ``name`` names the program in errors (default: the function's name)."""
    if isinstance(kernel, Program):
        return kernel.words()
    prog = Program(name or getattr(kernel, "__name__", "kernel"))
    with prog:
        kernel(*args, **kwargs)
    return prog.words()


# --------------------------------------------------------------------------------------------
# Op builders
# --------------------------------------------------------------------------------------------
_OPERAND_WORDS = {0: "no source", 1: "one source", 2: "two sources"}


def _check_operand(x, what: str, opname: str):
    if isinstance(x, Register) or is_imm(x):
        return x
    raise AsmError(f"{opname}: invalid {what} {x!r}")


def build_op(desc: isa.OpDesc, args: tuple, cond) -> AluOp:
    n = desc.nsrc
    if desc.name == "nop":
        if args:
            raise AsmError("not encodable: nop takes no destination")
        return AluOp(desc, None, (), cond)
    if len(args) > n + 1:
        raise AsmError(f"not encodable: {desc.name} takes {_OPERAND_WORDS[n]}, got {len(args) - 1}")
    if len(args) < n + (0 if desc.fixed_dst else 1):
        raise AsmError(f"{desc.name} needs a destination and {_OPERAND_WORDS[n]}")
    dst = args[0] if args else None
    if dst is not None and not isinstance(dst, Register):
        raise AsmError(f"{desc.name}: destination must be a register, got {dst!r}")
    if dst is not None and dst.name == "null" and desc.fixed_dst and dst.pack_mod == "none":
        dst = None
    srcs = tuple(_check_operand(a, f"src{i + 1}", desc.name) for i, a in enumerate(args[1:]))
    return AluOp(desc, dst, srcs, cond)


def _make_alu_fn(name: str):
    desc = isa.ADD_OPS.get(name) or isa.MUL_OPS[name]

    def fn(*args, cond=None, sig=None):
        op = build_op(desc, args, cond)
        if desc.alu == "add":
            ins = Instr(add_op=op, sigs=_sig_dict(sig))
        else:
            ins = Instr(mul_op=op, sigs=_sig_dict(sig))
            ins._mul_set = True
        return _emit(ins)

    fn.__name__ = name
    fn.__doc__ = f"{desc.alu}-ALU op {name} (opcode {desc.opcode}, {desc.nsrc} source(s))"
    return fn


def _chain(self: Instr, name: str):
    desc = isa.MUL_OPS.get(name)
    if desc is None:
        if name in isa.ADD_OPS:
            raise AsmError(f"operation not available here: {name}")
        raise AttributeError(name)

    def fn(*args, cond=None, sig=None):
        if getattr(self, "_mul_set", False) or self.mul_op.desc is not NOP_MUL:
            raise AsmError(f"operation not available here: {name}")
        self.mul_op = build_op(desc, args, cond)
        self._mul_set = True
        for k, v in _sig_dict(sig).items():
            if k in self.sigs:
                raise AsmError(f'Signal "{k}" is duplicated')
            self.sigs[k] = v
        return self

    return fn


def _instr_getattr(self, name):
    if name.startswith("_"):
        raise AttributeError(name)
    return _chain(self, name)


Instr.__getattr__ = _instr_getattr


class _Link:
    def __repr__(self):
        return "link"


link = _Link()


def b(target, cond: str, absolute: bool = False, set_link: bool = False) -> Branch:
    """Branch (3 delay slots). target: R.label, +/-N instructions, byte address with
    absolute=True, a register rfN, or ``link``. cond is required ('always', 'a0', 'na0',
    'alla', 'anyna', 'anya', 'allna')."""
    if target is link:
        target = "link"
    elif isinstance(target, Register):
        if target.magic:
            raise AsmError(f"not encodable: branch to magic register {target.name}")
    elif isinstance(target, LabelRef):
        if absolute:
            raise AsmError("a label target is relative; drop absolute=True")
    elif not (isinstance(target, int) and not isinstance(target, bool)):
        raise AsmError(f"invalid branch target {target!r}")
    return _emit(Branch(target, cond, absolute, set_link))


def thread_end():
    """Emit the program-end sequence: two back-to-back thrsw mark the last switch, the next thrsw
    ends the thread; its two delay slots still execute."""
    f_nop = DSL["nop"]
    f_nop(sig=SIGNALS["thrsw"])
    f_nop(sig=SIGNALS["thrsw"])
    f_nop()
    f_nop()
    f_nop(sig=SIGNALS["thrsw"])
    f_nop()
    f_nop()
    f_nop()


# Export every op, register and signal as a module attribute (the DSL namespace).
DSL = {}
for _name in sorted(set(isa.ADD_OPS) | set(isa.MUL_OPS)):
    DSL[_name] = _make_alu_fn(_name)
for _r in RF:
    DSL[_r.name] = _r
DSL.update(MAGIC)
DSL.update(SIGNALS)
DSL.update({"b": b, "link": link, "L": L, "R": R, "thread_end": thread_end})
globals().update(DSL)

__all__ = sorted(DSL) + ["assemble", "assemble_text", "Program", "AsmError"]


# --------------------------------------------------------------------------------------------
# Text front end: one instruction in the golden dialect -> word
# --------------------------------------------------------------------------------------------
_TEXT_NAMES = {**DSL, "float": float}
_ALLOWED_METHODS = {"pack", "unpack", "unif_addr"} | set(isa.MUL_OPS) | set(isa.ADD_OPS)


def _eval(node, text: str):
    if isinstance(node, ast.Expression):
        return _eval(node.body, text)
    if isinstance(node, ast.Constant):
        if isinstance(node.value, (int, float, str, bool)):
            return node.value
        raise AsmError(f"unsupported literal {node.value!r}")
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        v = _eval(node.operand, text)
        if not is_imm(v):
            raise AsmError(f"sign applied to a non-number in {text!r}")
        return -v if isinstance(node.op, ast.USub) else v
    if isinstance(node, ast.Name):
        if node.id not in _TEXT_NAMES:
            raise AsmError(f"unknown name: {node.id}")
        return _TEXT_NAMES[node.id]
    if isinstance(node, ast.List):
        return [_eval(e, text) for e in node.elts]
    if isinstance(node, ast.Attribute):
        if node.attr not in _ALLOWED_METHODS:
            raise AsmError(f"unknown name: {node.attr}")
        obj = _eval(node.value, text)
        try:
            return getattr(obj, node.attr)
        except AttributeError:
            raise AsmError(f"{node.attr} is not available on {obj!r}") from None
    if isinstance(node, ast.Call):
        fn = _eval(node.func, text)
        if not callable(fn):
            raise AsmError(f"{ast.unparse(node.func)} is not callable")
        args = [_eval(a, text) for a in node.args]
        kwargs = {k.arg: _eval(k.value, text) for k in node.keywords}
        try:
            return fn(*args, **kwargs)
        except TypeError as e:
            raise AsmError(f"bad arguments: {e}") from None
    raise AsmError(f"unsupported syntax {type(node).__name__}")


def parse_text(text: str):
    """Parse one instruction of the text dialect into an Instr / Branch (not yet encoded)."""
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except SyntaxError as e:
        raise AsmError(f"syntax error in {text!r}: {e.msg}") from None
    saved, Program._stack = Program._stack, []
    try:
        ins = _eval(tree, text)
    except AsmError as e:
        raise AsmError(f"{e} (in {text!r})") from None
    except (ValueError, TypeError) as e:
        raise AsmError(f"{e} (in {text!r})") from None
    finally:
        Program._stack = saved
    if isinstance(ins, Signal):
        raise AsmError(f"a signal alone is not an instruction: {text!r}")
    if not isinstance(ins, (Instr, Branch)):
        raise AsmError(f"not an instruction: {text!r}")
    return ins


def assemble_text(text: str) -> int:
    """Assemble one instruction written in the text dialect to its 64-bit word."""
    ins = parse_text(text)
    return encode(ins, text)


def assemble_lines(lines) -> np.ndarray:
    """Assemble several text instructions (blank lines and # comments skipped)."""
    out = []
    for ln in lines:
        s = ln.split("#", 1)[0].strip()
        if s:
            out.append(assemble_text(s))
    return np.array(out, dtype=np.uint64)
