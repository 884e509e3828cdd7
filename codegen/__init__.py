"""QPU code generation: the V3D 7.1 ISA tables, assembler DSL, disassembler, static checker
and (in later modules) the kernel generators. Installed as ``tvm_qpu.codegen``."""
from .instr import AsmError, UndefinedEncoding, decode, encode  # noqa: F401
from .asm import Program, assemble, assemble_text, parse_text  # noqa: F401
from .disasm import disassemble, disassemble_word  # noqa: F401
