"""Small example kernels written with the assembler DSL (used by the README's first command)."""
from __future__ import annotations

from .asm import (L, R, add, b, eidx, fadd, mov, nop, shl, sub, thread_end, tmua, tmud,
                  tmuwt, ldtmu, ldunifrf, rf1, rf2, rf10, rf11, rf12, rf13, rf14, rf15)


def vector_add():
    """c[i] = a[i] + b[i] (fp32) for n chunks of 16 lanes, on one QPU thread.

    Uniforms: address of a, address of b, address of c, n (number of 16-element chunks, >= 1).
    """
    eidx(rf10)                               # rf10 = lane index 0..15
    shl(rf10, rf10, 2)                       # byte offset of this lane
    nop(sig=ldunifrf(rf11))                  # a
    nop(sig=ldunifrf(rf12))                  # b
    nop(sig=ldunifrf(rf13))                  # c
    nop(sig=ldunifrf(rf14))                  # n
    add(rf11, rf11, rf10)
    add(rf12, rf12, rf10)
    add(rf13, rf13, rf10)
    mov(rf15, 1)
    shl(rf15, rf15, 6)                       # 64 bytes = one 16-lane chunk
    L.loop
    mov(tmua, rf11)                          # load a chunk
    mov(tmua, rf12)                          # load b chunk
    sub(rf14, rf14, 1, cond="pushz")         # A = (n == 0)
    nop(sig=ldtmu(rf1))
    nop(sig=ldtmu(rf2))
    fadd(tmud, rf1, rf2)
    mov(tmua, rf13)                          # store c chunk
    b(R.loop, cond="anyna")                  # loop while n != 0
    add(rf11, rf11, rf15)                    # three delay slots: advance the pointers
    add(rf12, rf12, rf15)
    add(rf13, rf13, rf15)
    tmuwt()
    thread_end()


EXAMPLES = {"vector_add": vector_add}
