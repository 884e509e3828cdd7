"""The kernel registry: the one table through which the TVM frontend reaches the kernel generators.

Each operator kind the QPU can run registers three functions:

* ``supports(spec) -> (bool, reason)``: can a kernel take this exact shape / dtype / layout?
  (the frontend's pattern check functions call it; the reason is printed by ``tvmc partition``);
* ``generate(spec, constants) -> KernelPlan``: machine code + launch plan, called at compile time;
* ``estimate(spec, model=None) -> seconds``: modelled Pi 5 QPU time of the generated plan under a
  ``runtime.cycle_model.TimingModel`` (default: the emulator's DEFAULT), used for placement; it
  reads clock, bandwidths and latencies from the model (kernels/common.py helpers).

An :class:`OpSpec` describes one operator instance: ``inputs`` are (shape, dtype) of the runtime
tensors in order; constant operands (weights, bias) are passed to ``generate`` in ``constants``
under the names below and also listed in ``inputs``. Kinds, inputs and attrs:

=====================  ========================================================================
kind                   inputs / attrs
=====================  ========================================================================
matmul                 inputs A [.., M, K], B [.., K, N] (or [.., N, K] with transpose_b), and
                       optional bias [N]; constants names "A", "B", "bias".
                       attrs: transpose_b, bias (bool), activation (None | "relu" |
                       ("clip", lo, hi)); output dtype int32 for integer inputs
conv2d                 inputs data [N, C, H, W], weight [OC, C/groups, KH, KW], optional bias [OC];
                       constants "weight", "bias". attrs: strides (sh, sw), padding (t, l, b, r),
                       dilation (dh, dw), groups, layout "NCHW", bias (bool), activation
max_pool2d/avg_pool2d  input [N, C, H, W]. attrs: pool_size (kh, kw), strides, padding (t, l, b, r),
                       dilation, ceil_mode, count_include_pad (avg), layout "NCHW"
global_avg_pool2d      input [N, C, H, W] -> [N, C, 1, 1]. attrs: layout "NCHW"
reduce_max/reduce_min  input of any rank. attrs: axis (tuple of ints or None = all), keepdims
argmax/argmin          as reduce_*, one axis, int64 (or int32) output
softmax                input of any rank. attrs: axis (-1 only)
attention              inputs q [B, S, D], k [B, T, D], v [B, T, Dv], optional mask [S, T] (added to
                       the scores) with B = batch x heads. attrs: scale (float), causal (bool),
                       mask (bool). Output [B, S, Dv]
add                    inputs a, b of the same shape (float32 or int32; no broadcasting), or
                       with attrs bias=True b a float32 vector [N] along a's last axis (N a
                       multiple of 64; constant "b"). attrs: activation (None | "relu" |
                       ("clip", lo, hi) | "gelu" | "gelu_tanh" (float32))
gelu                   input x (float32). attrs: approximate ("none": erf form | "tanh")
layer_norm             inputs data [.., N], gamma [N], beta [N] (float32; constants "gamma",
                       "beta"). attrs: axes ((-1,) only), epsilon
=====================  ========================================================================
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field


@dataclass
class OpSpec:
    kind: str
    inputs: list                  # list of (shape tuple, dtype str)
    output: tuple                 # (shape tuple, dtype str)
    attrs: dict = field(default_factory=dict)

    def describe(self) -> str:
        ins = ", ".join(f"{dt}{list(s)}" for s, dt in self._run_inputs())
        blk = f" (block {int(self.attrs['k_block'])})" if self.attrs.get("k_block") else ""   # block-wise scales
        return f"{self.kind}({ins}){blk} -> {self.output[1]}{list(self.output[0])}"

    #: input names of the weight that ``attrs["weight_bits"]`` (4 or 2) stores packed
    WEIGHT_INPUTS = ("B", "weight")

    def _run_inputs(self) -> list:
        """``inputs`` with the dtypes as they run on the QPU: a weight stored at ``weight_bits``
        (int8 / uint8 values in range, packed by the kernel) is named int4 / uint4 / int2 / uint2."""
        bits = self.attrs.get("weight_bits")
        if not bits or int(bits) == 8:
            return list(self.inputs)
        names = list(self.attrs.get("input_names", []))
        out = list(self.inputs)
        for i, name in enumerate(names[:len(out)]):
            if name in self.WEIGHT_INPUTS and out[i][1] in ("int8", "uint8"):
                out[i] = (out[i][0], f"{'u' if out[i][1] == 'uint8' else ''}int{int(bits)}")
        return out


@dataclass
class KernelEntry:
    kind: str
    supports: object
    generate: object
    estimate: object


_REGISTRY: dict = {}


def register(kind: str, supports, generate, estimate) -> None:
    _REGISTRY[kind] = KernelEntry(kind, supports, generate, estimate)


def _load_kernels():
    # Importing the kernel package registers every generator; a missing or broken package is an
    # error (a broken install must fail loudly, not look like "no kernels").
    importlib.import_module(__package__ + ".kernels")


def kinds() -> list:
    _load_kernels()
    return sorted(_REGISTRY)


def entry(kind: str) -> KernelEntry | None:
    _load_kernels()
    return _REGISTRY.get(kind)


def supports(spec: OpSpec) -> tuple:
    e = entry(spec.kind)
    if e is None:
        return False, f"no QPU kernel for {spec.kind}"
    return e.supports(spec)


def generate(spec: OpSpec, constants: dict | None = None):
    e = entry(spec.kind)
    if e is None:
        raise KeyError(f"no QPU kernel for {spec.kind}")
    ok, why = e.supports(spec)
    if not ok:
        raise ValueError(f"QPU kernel cannot take {spec.describe()}: {why}")
    constants = dict(constants or {})
    from .plan import bind_constants
    return bind_constants(e.generate(spec, constants), constants)


def estimate(spec: OpSpec, model=None) -> float:
    """Modelled seconds of the kernel's plan for ``spec`` under ``model`` (a
    runtime.cycle_model.TimingModel; default: the emulator's DEFAULT)."""
    e = entry(spec.kind)
    if e is None:
        raise KeyError(f"no QPU kernel for {spec.kind}")
    return e.estimate(spec) if model is None else e.estimate(spec, model)
