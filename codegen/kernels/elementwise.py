"""Streaming elementwise kernels: the residual ``add`` (+ ReLU / clip) and GELU.

Kinds (registry):

* ``"add"``: ``y = act(a + b)`` for two run-time tensors of the **same shape** (no broadcasting:
  a broadcast bias add belongs to the matmul / conv epilogues), float32 or int32. ``act`` is
  ``attrs["activation"]``: None, ``"relu"`` or ``("clip", lo, hi)`` (ReLU6 = ``("clip", 0, 6)``).
  int32 adds wrap modulo 2**32 (numpy / TVM int32); int32 clip bounds must be integers.
  With ``attrs["bias"]`` b is a float32 vector [N] added along the last axis (N a multiple of
  64: the bias add of a matmul left on the CPU), and ``act`` may also be ``"gelu"`` /
  ``"gelu_tanh"``: the bias add + GELU of a transformer's feed-forward layer in one pass.
* ``"gelu"``: ``y = gelu(x)``, float32, ``attrs["approximate"]`` ``"none"`` (the erf form of
  ``R.nn.gelu``) or ``"tanh"`` (``R.nn.gelu_tanh``).

Formulas (the numpy :func:`reference` implements exactly these, in float64):

* erf form, ``gelu(x) = x/2 (1 + erf(x / sqrt 2))``: with ``z = |x| / sqrt 2`` and
  ``q = erfc(z)`` from Abramowitz & Stegun 7.1.26, ``q = t (a1 + t (a2 + t (a3 + t (a4 + t a5))))
  exp(-z^2)``, ``t = 1 / (1 + p z)`` (|erf error| <= 1.5e-7 for z >= 0; A&S p. 299), the output is
  ``x/2 * (2 - q)`` for x >= 0 and ``x/2 * q`` for x < 0 (``1 + erf(-z) = q``: no cancellation
  for negative x). ``exp`` is the SFU's exp2 of ``-z^2 log2 e``, ``1 / (1 + p z)`` the SFU's recip
  without a Newton step (the A&S error dominates its 2.5 ULP; a Newton step would turn t = 0 at
  x = +-inf into NaN).
* tanh form, ``x/2 (1 + tanh(u))``, ``u = sqrt(2/pi) (x + 0.044715 x^3)``, computed as the
  identical ``x / (1 + exp(-2u))`` (SFU exp2 and recip).

Special values: NaN gives NaN; gelu(+inf) = +inf; gelu(-inf) = NaN (``-inf * 0``, as numpy's
formula gives); large negative x gives -0.0 or a tiny negative number. ReLU / clip use the QPU's
fmin then fmax (IEEE minNum / maxNum ignore a NaN operand): ``relu(NaN) = 0`` and
``clip(NaN, lo, hi) = hi`` (``lo`` when there is no upper bound) -- the values TVM's llvm build
gives (measured; ``tests/test_kernels_elementwise.py`` checks them against TVM).

Layout: the tensor is flat; a *block* is 64 elements (16 lanes x a vec4 TMU lookup of 4
consecutive words, 256 contiguous bytes). ``W <= 12`` workers (one QPU each) take contiguous runs
of ``chunk`` blocks; buffers are padded to whole blocks (padding lanes compute garbage that is
never read back). Loads are vec4 lookups (4 FIFO words each, :data:`~.common.TMU_FIFO_WORDS` = 8
per thread): a unary kernel keeps the next block's lookup in flight while it computes (the input
is padded by one block for that over-issue); the binary add has both operands' lookups (8 words)
in flight. Stores are vec4 too.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .. import asm as A
from ..asm import add, b, bnot, eidx, mov, nop, shl, sub, thread_end, tmuwt, umul24
from ..instr import MAGIC, RF
from ..plan import BufferSpec, KernelPlan, Launch
from .reduce import Builder, f32_bits, _label
from .common import limits_verdict

S = A.SIGNALS
F = A.DSL
tmua, tmud, tmuc, null = (MAGIC[n] for n in ("tmua", "tmud", "tmuc", "null"))

NUM_QPUS = 12
BLOCK = 64                      # elements per block (16 lanes x vec4)
GELU_FORMS = ("none", "tanh")
ADD_DTYPES = ("float32", "int32")

# Abramowitz & Stegun 7.1.26 (|error| <= 1.5e-7)
AS_P = 0.3275911
AS_A = (0.254829592, -0.284496736, 1.421413741, -1.453152027, 1.061405429)
LOG2E = 1.4426950408889634
SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
TANH_C = 0.044715


@dataclass(frozen=True)
class EwShape:
    op: str                        # "add" | "gelu"
    n: int                         # elements
    dtype: str = "float32"
    activation: object = None      # add: None | "relu" | ("clip", lo, hi) | "gelu" | "gelu_tanh"
    approximate: str = "none"      # gelu: "none" | "tanh"
    bias_n: int = 0                # add: b is a [bias_n] vector along the last axis (0: b like a)
    num_qpus: int = NUM_QPUS

    @property
    def nin(self) -> int:
        return 2 if self.op == "add" else 1

    @property
    def nblocks(self) -> int:
        return -(-self.n // BLOCK)

    @property
    def pipelined(self) -> bool:
        """The next block's lookups are issued before the current block is computed (they fit
        the thread's FIFO share next to the current ones)."""
        return self.nin == 1


def layout(s: EwShape):
    """(workers, blocks per worker). With a bias vector every worker's run is a whole number of
    bias periods (``bias_n / 64`` blocks), so each starts at bias offset 0."""
    nb = s.nblocks
    chunk = -(-nb // min(s.num_qpus, nb))
    if s.bias_n:
        period = s.bias_n // BLOCK
        chunk = -(-chunk // period) * period
    return -(-nb // chunk), chunk


def check_limits(s: EwShape):
    if s.n < 1:
        raise ValueError("empty tensor")
    if (s.nblocks + 1) * BLOCK * 4 >= 1 << 24:
        raise ValueError("tensor exceeds the kernel's 24-bit address arithmetic (16 MiB)")
    if s.bias_n and (s.bias_n % BLOCK or s.n % s.bias_n):
        raise ValueError(f"bias length {s.bias_n} is not a multiple of {BLOCK} dividing the tensor "
                         f"(the kernel adds the bias in whole {BLOCK}-element blocks)")


# ------------------------------------------------------------------------------------------------
# per-block computations (4 registers = a lane's 4 words)
# ------------------------------------------------------------------------------------------------
def _act(kb: Builder, s: EwShape, x):
    act = s.activation
    if act is None:
        return
    is_f = s.dtype == "float32"
    if act == "relu":
        (F["fmax"] if is_f else F["imax"])(x, x, 0)
        return
    _, lo, hi = act
    # min first, then max: a NaN becomes hi, then stays (fmin / fmax ignore a NaN operand), as in
    # TVM's clip (max(min(x, hi), lo)); relu(NaN) = 0 likewise
    for bound, fop, iop in ((hi, "fmin", "imin"), (lo, "fmax", "imax")):
        if is_f:
            if not math.isinf(bound):
                F[fop](x, x, kb.u32(f32_bits(bound)))
        elif -2 ** 31 < bound < 2 ** 31 - 1:
            F[iop](x, x, kb.u32(int(bound)))


def _add_block(kb: Builder, s: EwShape, xs, ys, g=None):
    for x, y in zip(xs, ys):
        (F["fadd"] if s.dtype == "float32" else add)(x, x, y)
        if s.activation in GELU_WORDS:
            GELU_WORDS[s.activation](kb, g, x)
        else:
            _act(kb, s, x)


class _GeluRegs:
    def __init__(self, kb: Builder):
        self.h, self.z, self.t, self.p, self.e = kb.reg(5)


def _gelu_erf_word(kb: Builder, g: _GeluRegs, x):
    c = lambda v: kb.u32(f32_bits(v))                             # noqa: E731
    F["fmul"](g.z, x.unpack("abs"), c(1 / math.sqrt(2.0)))       # z = |x| / sqrt 2
    F["fmul"](g.t, g.z, c(AS_P))
    F["fadd"](g.t, g.t, 1.0)
    F["recip"](g.t, g.t)                                          # t = 1 / (1 + p z)
    F["fmul"](g.e, g.z, g.z)
    F["fmul"](g.e, g.e, c(-LOG2E))
    F["exp"](g.e, g.e)                                            # e = exp(-z^2)
    F["fmul"](g.p, g.t, c(AS_A[4]))
    for a in reversed(AS_A[:4]):
        F["fadd"](g.p, g.p, c(a))
        F["fmul"](g.p, g.p, g.t)
    F["fmul"](g.p, g.p, g.e)                                      # q = erfc(z)
    F["fmul"](g.h, x, 0.5)
    mov(null, x, cond="pushn")                                    # A = sign bit set (x < 0)
    F["fsub"](g.t, 2.0, g.p)
    mov(g.t, g.p, cond="ifa")
    F["fmul"](x, g.h, g.t)


def _gelu_tanh_word(kb: Builder, g: _GeluRegs, x):
    c = lambda v: kb.u32(f32_bits(v))                             # noqa: E731
    F["fmul"](g.z, x, x)
    F["fmul"](g.z, g.z, c(TANH_C))
    F["fadd"](g.z, g.z, 1.0)
    F["fmul"](g.z, g.z, x)                                        # x + c x^3
    F["fmul"](g.z, g.z, c(-2.0 * SQRT_2_OVER_PI * LOG2E))
    F["exp"](g.e, g.z)                                            # exp(-2u)
    F["fadd"](g.e, g.e, 1.0)
    F["recip"](g.e, g.e)
    F["fmul"](x, x, g.e)


#: add epilogues that are a GELU, and the word emitters
GELU_WORDS = {"gelu": _gelu_erf_word, "gelu_tanh": _gelu_tanh_word}


# ------------------------------------------------------------------------------------------------
# the kernel
# ------------------------------------------------------------------------------------------------
IN_NAMES = {"add": ("a", "b"), "gelu": ("x",)}
OUT_NAME = "y"


def ew_kernel(kb: Builder, s: EwShape):
    W, chunk = layout(s)
    names = IN_NAMES[s.op]
    lane, t, cnt, outp = kb.reg(4)
    ptrs = kb.reg(len(names))
    vals = [kb.reg(4) for _ in names]
    c256 = kb.u32(BLOCK * 4)
    one = kb.u32(1)
    g = _GeluRegs(kb) if s.op == "gelu" or s.activation in GELU_WORDS else None
    bend = kb.reg() if s.bias_n else None

    eidx(lane)
    shl(lane, lane, 4)                                            # 16 bytes per lane
    mov(t, RF[3].unpack("ul"))                                    # worker index
    umul24(t, t, kb.u32(chunk))                                   # first block
    sub(cnt, kb.u32(s.nblocks), t)
    F["imin"](cnt, cnt, kb.u32(chunk))
    shl(t, t, 8)                                                  # bytes (256 per block)
    add(t, t, lane)
    for p, nm in zip(ptrs, names):
        add(p, t, kb.addr(nm))
    add(outp, t, kb.addr(OUT_NAME))
    if s.bias_n:                          # b restarts every bias period (workers start at 0)
        add(ptrs[1], lane, kb.addr("b"))
        add(bend, ptrs[1], kb.u32(s.bias_n * 4))

    def issue_loads():
        for p in ptrs:
            bnot(tmuc, 3)                                         # 0xfffffffc: one vec4 lookup
            mov(tmua, p).add(p, p, c256)
        if s.bias_n:
            sub(null, ptrs[1], bend, cond="pushn")                # A = still inside the bias
            sub(ptrs[1], ptrs[1], kb.u32(s.bias_n * 4), cond="ifna")

    def pop_and_compute():
        for regs in vals:
            for r in regs:
                nop(sig=S["ldtmu"](r))
        if s.op == "add":
            _add_block(kb, s, vals[0], vals[1], g)
        else:
            word = _gelu_erf_word if s.approximate == "none" else _gelu_tanh_word
            for r in vals[0]:
                word(kb, g, r)

    def store():
        bnot(tmuc, 3)
        for r in vals[0]:
            mov(tmud, r)
        mov(tmua, outp).add(outp, outp, c256)

    if s.pipelined:
        issue_loads()
    # the loop counter's flag is pushed after the computation (GELU pushes its own flags) and
    # read by the branch, whose 3 delay slots take the end of the store
    prog = A.Program._stack[-1]
    lbl = _label("blk")
    prog.label(lbl)
    issue_loads()
    pop_and_compute()
    sub(cnt, cnt, one, cond="pushz")
    store()
    br = b(getattr(A.R, lbl), cond="anyna")
    prog.items.pop()
    prog.items.insert(len(prog.items) - 3, br)
    if s.pipelined:
        for regs in vals:                                         # drain the over-issued block
            for r in regs:
                nop(sig=S["ldtmu"](r))
    tmuwt()
    thread_end()


def _assemble(s: EwShape):
    kb = Builder(f"ew_{s.op}")
    return kb.build(ew_kernel, s)


def in_nbytes(s: EwShape) -> int:
    """Device bytes of an input: whole blocks, plus one block of over-issue when pipelined."""
    return (s.nblocks + (1 if s.pipelined else 0)) * BLOCK * 4


def stream_bytes(s: EwShape) -> int:
    """Bytes the kernel moves through the DRAM channel: inputs and output once (a bias vector
    once: it stays in the L2)."""
    blocks = s.nblocks * BLOCK * 4
    return blocks * (s.nin + 1) if not s.bias_n else 2 * blocks + s.bias_n * 4


def plan_elementwise(s: EwShape, shape=None) -> KernelPlan:
    check_limits(s)
    shape = tuple(shape or (s.n,))
    words, unif = _assemble(s)
    W, chunk = layout(s)
    bufs = [BufferSpec(nm, "input", shape, s.dtype, in_nbytes(s)) for nm in IN_NAMES[s.op]]
    if s.bias_n:
        bufs[1] = BufferSpec("b", "input", (s.bias_n,), s.dtype)
    bufs.append(BufferSpec(OUT_NAME, "output", shape, s.dtype, s.nblocks * BLOCK * 4))
    name = f"ew_{s.op}"
    gelu_flops = {"none": 24, "tanh": 10, "gelu": 24, "gelu_tanh": 10}
    flops = s.n * (1 + gelu_flops.get(s.activation, 0) if s.op == "add" else gelu_flops[s.approximate])
    return KernelPlan(name, bufs, [Launch(words, unif, (W, 1, 1), 16, s.num_qpus, 1, name)],
                      attrs={"op": s.op, "n": s.n, "dtype": s.dtype, "activation": s.activation,
                             "approximate": s.approximate, "bias_n": s.bias_n, "workers": W,
                             "blocks_per_worker": chunk},
                      flops=flops, bytes_moved=(2 if s.bias_n else s.nin + 1) * s.n * 4 + s.bias_n * 4)


# ------------------------------------------------------------------------------------------------
# references (numpy, written to the formulas above)
# ------------------------------------------------------------------------------------------------
def reference_add(a, b, activation=None) -> np.ndarray:
    """``act(a + b)`` (b of a's shape, or a vector along the last axis), the activation as in
    the module docstring; a GELU epilogue is :func:`reference_gelu` of the float32 sum."""
    a, b = np.asarray(a), np.asarray(b)
    with np.errstate(over="ignore", invalid="ignore"):
        y = a + b
    if activation is None:
        return y
    if activation in GELU_WORDS:
        return reference_gelu(y, "tanh" if activation == "gelu_tanh" else "none")
    if activation == "relu":
        lo, hi = 0, None
    else:
        _, lo, hi = activation
    if y.dtype.kind == "f":
        # minNum then maxNum: a NaN operand is ignored (the QPU's fmin / fmax; TVM's clip is
        # max(min(x, hi), lo) with the same NaN results: clip(NaN) = hi, relu(NaN) = 0)
        if hi is not None:
            y = np.where(np.isnan(y) | (y > hi), np.float32(hi), y)
        if lo is not None:
            y = np.where(np.isnan(y) | (y < lo), np.float32(lo), y)
        return y.astype(a.dtype)
    lo = -2 ** 31 if lo is None or lo < -2 ** 31 else int(lo)
    hi = 2 ** 31 - 1 if hi is None or hi > 2 ** 31 - 1 else int(hi)
    return np.clip(y, lo, hi).astype(a.dtype)


def reference_gelu(x, approximate="none") -> np.ndarray:
    """Exact GELU in float64 (``math.erf`` / ``np.tanh``), rounded to float32."""
    x64 = np.asarray(x, np.float64)
    with np.errstate(over="ignore", invalid="ignore"):
        if approximate == "tanh":
            y = 0.5 * x64 * (1 + np.tanh(SQRT_2_OVER_PI * (x64 + TANH_C * x64 ** 3)))
        else:
            erf = np.vectorize(math.erf, otypes=[np.float64])
            y = 0.5 * x64 * (1 + erf(x64 / math.sqrt(2.0)))
    return y.astype(np.float32)


# ------------------------------------------------------------------------------------------------
# registry: supports / generate / estimate
# ------------------------------------------------------------------------------------------------
def _clip_ok(act, dtype):
    if act is None or act == "relu":
        return True, ""
    if act in GELU_WORDS:
        return (True, "") if dtype == "float32" else (False, f"a GELU epilogue needs float32, got {dtype}")
    if not (isinstance(act, (tuple, list)) and len(act) == 3 and act[0] == "clip"):
        return False, f"unknown activation {act!r}"
    _, lo, hi = act
    if math.isnan(lo) or math.isnan(hi):
        return False, "clip bound is NaN"
    if dtype == "int32":
        for v in (lo, hi):
            if not math.isinf(v) and v != int(v):
                return False, f"int32 clip bound {v} is not an integer"
    return True, ""


def spec_shape(spec) -> EwShape:
    shape, dt = spec.inputs[0]
    n = int(np.prod(shape, dtype=np.int64)) if len(shape) else 1
    if spec.kind == "add":
        act = spec.attrs.get("activation")
        act = tuple(act) if isinstance(act, list) else act
        bias_n = int(spec.inputs[1][0][0]) if spec.attrs.get("bias") else 0
        return EwShape("add", n, dt, activation=act, bias_n=bias_n)
    return EwShape("gelu", n, dt, approximate=spec.attrs.get("approximate", "none"))


def supports(spec):
    want = 2 if spec.kind == "add" else 1
    if len(spec.inputs) != want:
        return False, f"{spec.kind} takes {want} input(s), got {len(spec.inputs)}"
    (shape, dt) = spec.inputs[0]
    if spec.kind == "add":
        (shape_b, dt_b) = spec.inputs[1]
        if spec.attrs.get("bias"):
            if len(shape) == 0 or tuple(shape_b) != (shape[-1],):
                return False, f"bias {list(shape_b)} is not a vector along the last axis of {list(shape)}"
        elif tuple(shape_b) != tuple(shape):
            return False, f"operand shapes {list(shape)} and {list(shape_b)} differ (no broadcasting)"
        if dt_b != dt or dt not in ADD_DTYPES:
            return False, f"add kernel takes two float32 or two int32 tensors, got {dt} and {dt_b}"
        ok, why = _clip_ok(spec.attrs.get("activation"), dt)
        if not ok:
            return False, why
    else:
        if dt != "float32":
            return False, f"gelu kernel is float32 only, got {dt}"
        if spec.attrs.get("approximate", "none") not in GELU_FORMS:
            return False, f"gelu approximation {spec.attrs.get('approximate')!r} (takes {GELU_FORMS})"
    if tuple(spec.output[0]) != tuple(shape) or spec.output[1] != dt:
        return False, "output shape / dtype differ from the input's"
    return limits_verdict(check_limits, spec_shape(spec))


def generate(spec, constants=None) -> KernelPlan:
    return plan_elementwise(spec_shape(spec), spec.inputs[0][0])


def estimate(spec, model=None) -> float:
    """Modelled seconds under ``model``: the first uniform line's round trip (the constant
    prologue), then the larger of the busiest worker's time and the shared units' (DRAM channel:
    inputs and output once; L2 port; slice TMUs), then the last store's latency. The busiest
    worker runs ``chunk`` loop iterations (the loop's instructions, from the generated program)
    each waiting one L2-miss round trip for its loads -- overlapped with the computation of the
    previous block when the kernel is pipelined (unary: only the first block's wait shows)."""
    from .common import (timing_model, loop_lengths, round_trip, dram_cycles, l2_port_cycles,
                         slice_tmu_cycles, seconds)
    m = timing_model(model)
    s = spec_shape(spec)
    W, chunk = layout(s)
    words, _ = _assemble(s)
    loop = loop_lengths(words)[0]
    pro = len(words) - loop
    cpi = m.cycles_per_instruction
    wait = round_trip(m, True)
    if s.pipelined:
        busiest = wait + chunk * max(loop * cpi, wait)
    else:
        busiest = chunk * (loop * cpi + wait)
    busiest += pro * cpi
    lookup_bytes = BLOCK * 4
    lookups = s.nblocks * (s.nin + 1)
    l2 = l2_port_cycles(m, lookups * lookup_bytes / m.line_bytes)
    tmu = slice_tmu_cycles(m, lookups, lookup_bytes / m.line_bytes, 64, W)
    dram = dram_cycles(m, stream_bytes(s))
    return seconds(m, round_trip(m, True) + max(busiest, dram, l2, tmu) + m.store_latency)


def bench_cases():
    from ..registry import OpSpec
    cases = []
    for n in (1 << 16, 1 << 20):
        shp = (n,)
        spec = OpSpec("add", [(shp, "float32"), (shp, "float32")], (shp, "float32"), {"activation": "relu"})
        cases.append((f"add_relu_{n}", spec, lambda rng, n=n: {
            "a": rng.standard_normal(n).astype(np.float32), "b": rng.standard_normal(n).astype(np.float32)}))
        for form in GELU_FORMS:
            spec = OpSpec("gelu", [(shp, "float32")], (shp, "float32"), {"approximate": form})
            cases.append((f"gelu_{form}_{n}", spec, lambda rng, n=n: {"x": rng.standard_normal(n).astype(np.float32)}))
    return cases


def _register():
    from ..registry import register
    register("add", supports, generate, estimate)
    register("gelu", supports, generate, estimate)


_register()
