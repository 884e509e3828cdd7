"""Default (untuned) CPU schedules for the host code of every build.

TVM 0.27's default Relax pipeline for ``llvm`` legalizes each op into plain loop nests and stops:
no tiling, no vectorization, no threads. This module adds one pass between legalization/fusion and
the VM lowering (:func:`relax_pipeline`) that schedules every PrimFunc with the first rule of
:data:`RULES` that applies, in the style of ``tvm.s_tir.dlight``:

0. :class:`DepthwiseConv` -- channels-last depthwise conv2d (one input channel per group): the
   channel axis is the vector axis, a row of output pixels the register tile, the kernel window
   unrolled, the zero padding read in place (no padded copy of the input).
1. :class:`TiledReduction` -- conv2d (incl. depthwise / grouped), matmul / dense / batch matmul and
   pooling: one reduction block whose output has the function's output shape, plus injective
   prologue (padding) and epilogue (bias, residual add, activations) blocks. A register tile of
   ``rows x (2 x SIMD lanes)`` accumulators (3 vectors for a K-blocked reduction whose vector axis
   they divide; cache-write to ``local``, unrolled and vectorized) sits
   under the reduction loops; the remaining spatial loops are fused into one ``parallel`` loop (TVM's
   thread pool, ``TVM_NUM_THREADS``); the epilogue is inlined into the tile's write-back. Rows are
   rectangles of the output's (h, w) loops, or any divisor of h x w after merging them into one
   block iter when that fills more accumulators (:func:`_flatten_rows`, which also drops a 1x1
   conv's unit window iters); a conv's kernel-width
   taps run inside the input-channel loop so neighbouring rows share their broadcasts
   (:func:`_shared_tap_loop`). Over one (merged) row axis the row tile need not divide it: the
   last tile is then partial (ResNet-18 layer 4: 49 pixels as 8 tiles of 6 x 2 vectors and one
   of 1 x 2, instead of 7 x 1 vector: 7 accumulators cannot hide the FMA latency). The row loop
   then stays serial inside the parallel one (used only where the other loops give
   :data:`PARTIAL_MIN_TASKS` tasks), its bounds checks are marked ``likely`` and TVM's
   LoopPartition pass, on under :func:`lowering_context` (the build lowers inside it), peels the
   partial tile off so the full ones run without a check (:func:`_likely_predicates`). Where the
   vector operand is a constant (weights: :func:`mark_layout_free`), it is read from a copy packed
   per vector tile, ``(N // vt, ..., vt)``, which the build makes at compile time
   (:func:`_prepack`, :func:`prepack_passes`): each tile's weight panel is one contiguous stream
   instead of ``vt`` floats out of every 2 KiB row (ResNet-18 layer 4's weights: 9.4 MiB a conv).
2. :class:`RowReduction` -- softmax / layer norm / RMS norm (reductions over the rows' innermost
   axis, several blocks sharing the leading row axes): one parallel row loop, the reductions split
   into vector partial results (``rfactor``); ``dlight.cpu.Reduction`` (TVM's own rule, scalar
   reductions) for what it declines.
3. ``dlight.cpu.GEMV`` -- TVM's own rule for matrix-vector products.
4. :class:`Injective` -- elementwise / broadcast / layout blocks: inline what can be inlined, then
   per block a vectorized inner loop and a parallel outer loop.
5. :class:`ParallelOuter` -- anything else: its outermost spatial loops run in parallel.

A rule that raises (a primitive refused on an odd shape) or declines moves on to the next rule; if
none applies the function keeps TVM's default lowering. The rules change only the loop order, so
results stay those of the unscheduled build up to float summation order.

One thing does change what is computed: :func:`fast_math` replaces the float32 transcendentals of
:data:`FAST_MATH` (``erf`` of GELU, ``exp`` of softmax, ``tanh`` of tanh-GELU, ``sigmoid``) in
every PrimFunc by vectorizable approximations: TVM's own ``tvm.topi.fast_erf`` / ``fast_exp``, and
tanh / sigmoid written over ``fast_exp``. TVM's llvm codegen calls libm for them (tanh and sigmoid
through ``exp``), one scalar call per SIMD lane, which made BERT's GELU epilogue cost as much as a
third of its matmul. Measured here (x86 AVX2, 1 M elements, thread CPU time): erf 11.3 -> 0.6 ns an
element, exp 4.3 -> 0.7, tanh 9.3 -> 1.1, sigmoid 4.5 -> 1.0. Accuracy against Python's ``math``
(tests/test_cpu_schedule.py): erf within 4e-7 absolute, exp / tanh / sigmoid within 4e-7 relative
(TVM's own tanh: 1.6e-2 relative near 0); NaN stays NaN, +-inf give the limits; exp overflows to inf
from x > 88.37 (libm: 88.72) and flushes results below about 1.2e-38 (x < -87.3) to zero instead of
returning subnormals (so does sigmoid, for x < -87.3).

The SIMD width comes from the target (:func:`vector_lanes`): 128-bit NEON for ``pi5``
(aarch64, Cortex-A76), AVX2 (256-bit) on an x86 host whose LLVM CPU supports it, 128 bit otherwise.
"""
from __future__ import annotations

import logging

log = logging.getLogger(__name__)

# conv2d runs channels-last: the output channel is the contiguous (vector) axis of output and
# weights for any stride, and output pixels form the register tile's rows. Weights are constants, so
# their transpose is folded at compile time; ConvertLayout moves activations once at region edges.
CONV_LAYOUT = {"relax.nn.conv2d": ["NHWC", "HWIO"]}
PANEL_BYTES = 16 * 1024   # a reduction block of the vector operand kept in L1 (32-64 KiB on A76 / x86)
CHUNK_ROWS = 64           # output rows sharing one panel block when K-blocking
# A row tile that does not divide the rows (its last tile partial) keeps the row loop serial inside
# the parallel one; it is used only where the other loops still give this many tasks (Pi 5 cores).
PARTIAL_MIN_TASKS = 4
# Below these sizes one core finishes in well under ~50 us and waking TVM's thread pool costs more
# than it saves (and much more when the cores are shared): such loops stay serial.
MIN_PARALLEL_ELEMS = 1 << 16   # elements of an injective block
MIN_PARALLEL_WORK = 1 << 18    # multiply-adds (output elements x reduction extent) of a reduction
MAX_UNROLL_VEC = 64       # elements of an injective inner loop vectorized at once (a multiple of the lanes)


# ---------------------------------------------------------------------------------------------
# target facts

def host_target(spec):
    """The TVM target for a ``resolve_target_host`` spec. ``"llvm"`` (this machine) gets the host's
    own CPU name (``llvm_get_system_cpu``) so LLVM may use its SIMD extensions (AVX2/FMA on x86)."""
    import tvm
    from tvm.target import codegen
    if isinstance(spec, str) and spec == "llvm":
        cpu = codegen.llvm_get_system_cpu()
        if cpu and cpu != "generic" and codegen.llvm_is_valid_cpu(cpu, codegen.llvm_get_system_triple()):
            return tvm.target.Target({"kind": "llvm", "mcpu": cpu})
    return tvm.target.Target(spec)


def vector_bits(target) -> int:
    """SIMD register width of ``target`` in bits (128 NEON/SSE, 256 AVX2, 512 AVX-512)."""
    from tvm.target import codegen
    attrs = target.attrs
    triple = str(attrs.get("mtriple", "") or "")
    if triple.startswith(("aarch64", "arm")) or "arm_cpu" in list(target.keys):
        return 128                                   # NEON (no SVE on the A76)
    mcpu = str(attrs.get("mcpu", "") or "")
    if not mcpu:
        return 128                                   # -mcpu=generic x86-64: SSE2 only
    try:
        if codegen.llvm_cpu_has_features("avx512f", target):
            return 512
        if codegen.llvm_cpu_has_features("avx2", target):
            return 256
    except Exception:   # older LLVM without the query: trust TVM's own answer, capped
        return min(int(codegen.llvm_get_vector_width(target)) or 128, 256)
    return 128


def vector_lanes(target, dtype_bits: int = 32) -> int:
    return max(vector_bits(target) // max(dtype_bits, 8), 1)


FAST_MATH_DTYPE = "float32"     # the dtype fast_math rewrites (table FAST_MATH: with its builders)


# ---------------------------------------------------------------------------------------------
# helpers

def _extent(sch, loop):
    from tvm import tirx
    e = sch.get(loop).extent
    return int(e.value) if isinstance(e, tirx.IntImm) else None


def _divisor_at_most(n: int, cap: int, prefer_multiple_of: int = 1) -> int:
    """Largest divisor of ``n`` that is <= cap, preferring multiples of ``prefer_multiple_of``."""
    cands = [d for d in range(1, min(n, cap) + 1) if n % d == 0]
    good = [d for d in cands if d % prefer_multiple_of == 0]
    return max(good or cands)


def _vars_of(expr) -> set:
    import tvm_ffi
    from tvm import tirx
    out = set()
    tvm_ffi.structural_walk(expr, (tirx.Var, out.add), order="post")
    return out


def _region_vars(region) -> set:
    vs = set()
    for r in region:
        vs |= _vars_of(r.min)
        vs |= _vars_of(r.extent)
    return vs


def _unit_stride(region, var) -> bool:
    """Whether ``var`` indexes ``region`` contiguously: absent (a broadcast), or only in the last
    dimension as ``var + (terms without var)``."""
    dims = [i for i, r in enumerate(region) if var in _vars_of(r.min)]
    if not dims:
        return True
    return dims == [len(region) - 1] and _is_unit_term(region[-1].min, var)


def _is_unit_term(expr, var) -> bool:
    from tvm import tirx
    if expr.same_as(var):
        return True
    if isinstance(expr, tirx.Add):
        return (_is_unit_term(expr.a, var) and var not in _vars_of(expr.b)) or \
            (_is_unit_term(expr.b, var) and var not in _vars_of(expr.a))
    if isinstance(expr, tirx.Sub):
        return _is_unit_term(expr.a, var) and var not in _vars_of(expr.b)
    return False


def _dtype_bits(block_stmt) -> int:
    w = block_stmt.writes
    return int(w[0].source.dtype.bits) if w else 32


def _injective(sch, block) -> bool:
    from tvm import tirx
    return all(iv.iter_type == tirx.IterVar.DataPar for iv in sch.get(block).iter_vars)


def _vectorize_inner(sch, block, lanes: int):
    """Vectorize the innermost loop of ``block`` (a divisor of its extent, at most
    :data:`MAX_UNROLL_VEC`, a multiple of ``lanes`` or the whole loop). Returns the loops outside
    the vectorized one, or None if nothing was vectorized."""
    loops = sch.get_loops(block)
    if not loops:
        return None
    inner = loops[-1]
    e = _extent(sch, inner)
    outer = list(loops[:-1])
    if e is not None and e >= 2:
        v = _divisor_at_most(e, MAX_UNROLL_VEC, lanes)
        if v >= 2 and (v % lanes == 0 or v == e):
            if v < e:
                o, inner = sch.split(inner, factors=[None, v])
                outer.append(o)
            sch.vectorize(inner)
            return outer
    return None


def _schedule_injective_block(sch, block, lanes: int):
    """Vectorize the innermost loop (a divisor of its extent), fuse the rest and run it in parallel."""
    loops = sch.get_loops(block)
    if not loops:
        return
    total = _loops_extent(sch, loops)
    outer = _vectorize_inner(sch, block, lanes)
    if outer is None:
        outer = list(loops[:-1]) or [loops[-1]]
    # a scalar innermost loop stays a plain loop: fused into the parallel loop it would pay the
    # fused index's div/mod on every element
    if outer and (total is None or total >= MIN_PARALLEL_ELEMS):
        fused = sch.fuse(*outer) if len(outer) > 1 else outer[0]
        sch.parallel(fused)


# ---------------------------------------------------------------------------------------------
# rules

class _Rule:
    """A dlight-style rule: ``apply(func, target) -> Schedule | None`` (None: does not apply)."""
    name = "rule"

    def apply(self, func, target):  # pragma: no cover - interface
        raise NotImplementedError


#: TiledReduction's tunable choices, with their defaults (``tvmc tune`` measures the variants of
#: :data:`KNOB_VARIANTS` per task and keeps the fastest: :mod:`tvm_qpu.tune`):
#: ``panel_bytes`` -- the reduction block of the vector operand kept in L1 (K-blocking above it);
#: ``partial_tiles`` -- 1: row tiles need not divide the rows (a partial last tile), 0: they must;
#: ``max_vectors`` -- SIMD vectors a tile may span (3 only for K-blocked reductions, see _apply).
KNOBS = {"panel_bytes": PANEL_BYTES, "partial_tiles": 1, "max_vectors": 3}
#: the values tried per knob (the product, less variants that schedule a task identically)
KNOB_VARIANTS = {"panel_bytes": (2048, 8192, PANEL_BYTES, 65536), "partial_tiles": (1, 0), "max_vectors": (3, 2)}


def knob_variants() -> list:
    """Every combination of :data:`KNOB_VARIANTS` as a knobs dict, the defaults first."""
    import itertools
    names = list(KNOB_VARIANTS)
    combos = [dict(zip(names, v)) for v in itertools.product(*(KNOB_VARIANTS[n] for n in names))]
    return sorted(combos, key=lambda k: k != KNOBS)


class TiledReduction(_Rule):
    """One reduction block (conv / matmul / pool) + injective prologue and epilogue blocks.
    ``knobs``: overrides of :data:`KNOBS`."""
    name = "tiled-reduction"

    def __init__(self, knobs: dict | None = None):
        unknown = set(knobs or {}) - set(KNOBS)
        if unknown:
            raise ValueError(f"unknown TiledReduction knob(s) {sorted(unknown)}: known {sorted(KNOBS)}")
        self.knobs = {**KNOBS, **(knobs or {})}

    def apply(self, func, target):
        try:
            sch = self._apply(func, target, flatten=True)
            if sch is not None and _lowers(sch.mod["main"]):
                return sch
        except Exception as e:  # flattening refused: the rectangular tiles still apply
            log.debug("cpu_schedule: flattened rows failed on %s: %s", _fname(func), e)
        return self._apply(func, target, flatten=False)

    def _apply(self, func, target, flatten: bool, flat_rows: bool = False):
        """``flatten``: the row loops may be merged into one block iter (:func:`_flatten_rows`) when
        that allows a larger register tile; ``flat_rows``: they already were (the accumulator cache
        then follows the block's iters, see below)."""
        from tvm import tirx
        got = _root_blocks(func)
        main = got and _single_reduction(got[0], got[2])
        if main is None:
            return None
        sch, root, blocks = got
        idx = [sch.get(b).name_hint for b in blocks].index(sch.get(main).name_hint)
        prologue, epilogue = blocks[:idx], blocks[idx + 1:]
        mstmt = sch.get(main)
        if len(mstmt.writes) != 1:
            return None
        out_buf = mstmt.writes[0].source
        final = sch.get(blocks[-1]).writes[0].source
        if [int(x) if isinstance(x, tirx.IntImm) else x for x in out_buf.shape] != \
                [int(x) if isinstance(x, tirx.IntImm) else x for x in final.shape]:
            return None                                  # softmax / norm shapes: another rule's job
        if any(not isinstance(x, tirx.IntImm) for x in out_buf.shape):
            return None                                  # dynamic shapes: keep it simple
        lanes = vector_lanes(target, _dtype_bits(mstmt))

        loops = sch.get_loops(main)
        iters = mstmt.iter_vars
        if len(loops) != len(iters):
            return None
        kinds = _iter_kinds(mstmt)
        if kinds.rstrip("R") != "S" * kinds.count("S") or "R" not in kinds:
            return None                                  # expects spatial loops, then reduction loops
        if not _bound_to_own_loops(sch, main, loops):
            return None
        ivars = [iv.var for iv in iters]
        s_idx = [i for i, k in enumerate(kinds) if k == "S"]
        r_idx = [i for i, k in enumerate(kinds) if k == "R"]
        ext = [_extent(sch, l) for l in loops]

        # vector axis: the spatial iter indexing the output's last dimension (contiguous)
        w_last = _vars_of(mstmt.writes[0].region[-1].min)
        vec = next((i for i in reversed(s_idx) if ivars[i] in w_last and ext[i] > 1), None)
        if vec is not None and not all(_unit_stride(r.region, ivars[vec]) for r in mstmt.reads):
            vec = None          # a strided operand (stride-2 pooling in NCHW) would need gathers
        # row axes: spatial iters the vector-loaded operand does not depend on (matmul rows, conv
        # output pixels in NHWC): each vector load then feeds one FMA per row of the tile
        vec_reads = [r for r in mstmt.reads if vec is not None and ivars[vec] in _region_vars(r.region)]
        cands = [i for i in s_idx if i != vec and ext[i] > 1]
        reuse = [i for i in cands if all(ivars[i] not in _region_vars(r.region) for r in vec_reads)]
        rows = _last_run(reuse or cands[-1:])
        vec_ext, budget = ext[vec] if vec is not None else 1, accumulator_budget(target)
        others = 1                      # parallel tasks besides the vector blocks
        for i in s_idx:
            if i not in rows and i != vec:
                others *= ext[i]

        red_elems = 1
        for i in r_idx:
            red_elems *= ext[i]
        # a long reduction (its 2-vector panel outgrows L1: K-blocked) may take 3-vector tiles
        # (4 x 3 accumulators where 2 vectors divide the rows only as 4 x 2: BERT's matmuls);
        # short ones keep 2 (their tiles' init and write-back weigh more than the FMAs)
        panel_bytes = self.knobs["panel_bytes"]
        wide = min(3, self.knobs["max_vectors"]) if red_elems * 2 * lanes * 4 > panel_bytes else 2

        def tiles(row_exts, remainder):
            """:func:`_tile_sizes`; a partial last tile only when the loops besides the rows
            (which then stay serial) still give every core a task"""
            vt_, rt_ = _tile_sizes(vec_ext, row_exts, lanes, budget, remainder, wide)
            if remainder and row_exts[0] % rt_ and (not self.knobs["partial_tiles"] or
                                                    others * (vec_ext // vt_) < PARTIAL_MIN_TASKS):
                vt_, rt_ = _tile_sizes(vec_ext, row_exts, lanes, budget, max_vectors=wide)
            return vt_, rt_

        vt, rt = tiles([ext[i] for i in rows], len(rows) == 1)
        if flatten and len(rows) > 1:
            flat = 1
            for i in rows:
                flat *= ext[i]
            if _tile_score(*tiles([flat], True), lanes) > _tile_score(vt, rt, lanes):
                _flatten_rows(sch, main, rows, ext)
                return self._apply(sch.mod["main"], target, flatten=False, flat_rows=True)
        if vt < 2:
            vec = None
        packed = None
        if vec is not None and len(vec_reads) == 1:     # constant weights: packed at compile time
            packed = _prepack(sch, main, func, vec_reads[0].source, vt)
            mstmt = sch.get(main)
            vec_reads = [r for r in mstmt.reads if ivars[vec] in _region_vars(r.region)]
        loops = list(loops)
        row_exts = [ext[i] for i in rows]
        partial = len(rows) == 1 and rt > 1 and row_exts[0] % rt != 0
        row = None
        if rows and rt > 1:
            row = rows[0]
            if len(rows) > 1:
                loops[row] = sch.fuse(*[loops[i] for i in rows])
            s_idx = [i for i in s_idx if i not in rows[1:]]

        # K-blocking: when the vector operand's panel (reduction extent x vector tile) outgrows L1,
        # split the innermost reduction loop and iterate a chunk of row tiles per panel block
        r_outer, r_inner, row_mid = [loops[i] for i in r_idx], [], None
        kblock = vec is not None and row is not None and red_elems * vt * 4 > panel_bytes
        # split: [outer spatial (parallel)] [reduction] [row tile (unroll)] [vector tile (vectorize)]
        outer, row_in, vec_in = [], None, None
        for i in s_idx:
            if i == vec:
                o, vec_in = sch.split(loops[i], factors=[None, vt])
                outer.insert(0, o)                       # vector-axis blocks outermost: panel reuse
            elif i == row and partial:
                # the last tile is partial: its rows are predicated (_likely_predicates)
                m = min(-(-row_exts[0] // rt), max(CHUNK_ROWS // rt, 1)) if kblock else 1
                if m > 1:
                    row_o, row_mid, row_in = sch.split(loops[i], factors=[None, m, rt])
                else:
                    row_o, row_in = sch.split(loops[i], factors=[None, rt])
            elif i == row:
                # a chunk must stay rectangular over the fused row loops (see _row_options)
                chunks = [d for d in _row_options(row_exts) if d % rt == 0 and d <= max(CHUNK_ROWS, rt)]
                m = max(chunks) // rt if kblock and chunks else 1
                if m > 1:
                    o, row_mid, row_in = sch.split(loops[i], factors=[None, m, rt])
                else:
                    o, row_in = sch.split(loops[i], factors=[None, rt])
                outer.append(o)
            else:
                outer.append(loops[i])
        # a kernel-width loop whose taps the row tile's neighbours share (stride-1 conv: row xx at
        # tap rx reads input column xx + rx) goes inside the input-channel loop, unrolled: one
        # broadcast input element then feeds up to kw FMAs (7 rows x 3 taps: 9 loads, not 21)
        kw = None
        if row_in is not None and vec_in is not None:
            kw = _shared_tap_loop(mstmt, ivars, ext, r_idx, rows, vec_reads)
        if kw is not None and kblock and row_mid is not None:
            last = r_idx[-1]
            kb = _divisor_at_most(ext[last], max(panel_bytes // (vt * 4 * ext[kw]), 1))
            r_outer = [loops[i] for i in r_idx if i not in (kw, last)]
            if kb < ext[last]:
                ko, ki = sch.split(loops[last], factors=[None, kb])
                r_outer, r_inner = r_outer + [ko], [ki, loops[kw]]
            else:
                r_inner = [loops[last], loops[kw]]
            sch.unroll(loops[kw])
            order = outer + r_outer + [row_mid] + r_inner + [row_in, vec_in]
        elif kblock and row_mid is not None:
            last = r_idx[-1]
            kb = _divisor_at_most(ext[last], max(panel_bytes // (vt * 4), 1))
            if kb < ext[last]:
                ko, ki = sch.split(loops[last], factors=[None, kb])
                r_outer = [loops[i] for i in r_idx[:-1]] + [ko]
                r_inner = [ki]
            else:       # the innermost reduction loop (conv: input channels) fits the panel:
                # the others (conv: kh, kw) go outside the chunk, each a panel block of its own
                r_outer, r_inner = [loops[i] for i in r_idx[:-1]], [loops[last]]
            order = outer + r_outer + [row_mid] + r_inner + [row_in, vec_in]
        else:
            if row_mid is not None:
                outer.append(row_mid)
            if kw is not None:      # the taps innermost of the reduction (a small one, e.g. the stem)
                r_outer = [l for l in r_outer if not sch.get(l).same_as(sch.get(loops[kw]))] + [loops[kw]]
                sch.unroll(loops[kw])
            order = outer + r_outer + [x for x in (row_in, vec_in) if x is not None]
        if partial:     # the row chunks stay a serial loop of their own: LoopPartition needs one
            order = outer + [row_o] + order[len(outer):]
        sch.reorder(*order)
        fused = sch.fuse(*outer) if len(outer) > 1 else outer[0]
        tile_at = row_o if partial else fused     # where a tile's (or chunk's) accumulators live
        skip = set()
        if kblock and row_mid is not None and r_outer and len(vec_reads) == 1 and packed is None:
            # copy the panel block contiguous once per chunk: strided rows of a big weight matrix
            # would otherwise share L1 sets (a 2^n-ish stride) and miss on every row tile (weights
            # prepacked at compile time are contiguous already: the copy measured 1.0-1.13x slower)
            ridx = [j for j, r in enumerate(mstmt.reads) if r.source.same_as(vec_reads[0].source)]
            if ridx:
                pk = sch.cache_read(main, ridx[0], "local")
                skip.add(sch.get(pk).name_hint)
                sch.compute_at(pk, r_outer[-1], preserve_unit_loops=True)
                pl = sch.get_loops(pk)
                anchor = sch.get(r_outer[-1])
                at = next(j for j, l in enumerate(pl) if sch.get(l).same_as(anchor))
                inner_pl = pl[at + 1:]
                if inner_pl and _extent(sch, inner_pl[-1]) == vt:
                    sch.vectorize(inner_pl[-1])

        # accumulate the tile in registers; write back with the epilogue inlined
        if flat_rows:   # the cache in the block's (flattened) iters: a tile is a range of it,
            # where the output's own (h, w) indices would make its write-back a bounding box
            n_it = len(iters)
            wb = sch.reindex_cache_write(main, 0, "local", _index_map(
                lambda *v: [v[i] for i in range(n_it) if kinds[i] == "S"], n_it, iters[0].var.ty))
        else:
            wb = sch.cache_write(main, 0, "local")
        for e in epilogue[:-1]:              # intermediates into their consumers (diamonds too)
            try:
                sch.compute_inline(e)
            except Exception:
                pass
        for e in epilogue:                   # then the rest into the tile's write-back
            try:
                sch.reverse_compute_inline(e)
            except Exception:
                pass
        sch.reverse_compute_at(wb, tile_at, preserve_unit_loops=True)
        below = 2 if partial else 1     # the tile's own loops start below fused (and row_o)
        wl = sch.get_loops(wb)[below:]
        _tile_inner(sch, wl, vt if vec is not None else 1, lanes)
        if row_in is not None:
            sch.unroll(row_in)
        if vec_in is not None:          # before decompose_reduction: it needs the complete block
            _tile_inner(sch, [vec_in], vt, lanes)
        n_out = 1
        for i in s_idx:
            n_out *= ext[i]
        if n_out * red_elems >= MIN_PARALLEL_WORK:
            sch.parallel(fused)
        init = sch.decompose_reduction(main, sch.get_loops(main)[below])
        il = sch.get_loops(init)[below:]
        _tile_inner(sch, il, vt if vec is not None else 1, lanes)
        # epilogue blocks that could not be inlined, and the prologue (padding): own loops
        skip |= {sch.get(main).name_hint, sch.get(init).name_hint, sch.get(wb).name_hint, packed}
        for b in _remaining(sch, root, skip):
            _schedule_injective_block(sch, b, lanes)
        if partial:
            return _likely_predicates(sch)
        return sch


class DepthwiseConv(_Rule):
    """Depthwise conv2d in NHWC / HWIO (``groups == channels``, one input channel per group) plus
    injective prologue (padding) and epilogue blocks.

    :class:`TiledReduction` treats it as a conv whose reduction is only the kernel window, with the
    vector-axis blocks outermost (a whole-image sweep per block of channels) and the whole padded
    input written before the first output. Here (after the usual depthwise CPU kernels): loops
    ``[n, row] (parallel) / pixel tile / channel vector / kh, kw (unrolled) / pixel (unrolled) /
    channel lane (vectorized)``; every input vector load feeds one FMA and every weight vector load
    one FMA per pixel of the tile. The padding block is inlined: its bounds test depends on the
    pixel and the window position only, not on the channel lanes, so it is one scalar test per
    vector load, and the input is read once instead of copied (with stride 2 the copy cost more
    than the multiply-adds: measured here, 1 thread, MobileNetV2's 112x112x96 -> 56x56x96 layer
    2.2-2.4x faster inlined than with a padded copy made per chunk of rows)."""
    name = "depthwise-conv"

    def apply(self, func, target):
        got = _root_blocks(func)
        main = got and _single_reduction(got[0], got[2])
        if main is None:
            return None
        sch, root, blocks = got
        names = [sch.get(b).name_hint for b in blocks]
        idx = names.index(sch.get(main).name_hint)
        prologue, epilogue = blocks[:idx], blocks[idx + 1:]
        geo = _depthwise_geometry(sch, main)
        if geo is None:
            return None
        out_buf = sch.get(main).writes[0].source
        if _static_shape(out_buf.shape) != _static_shape(sch.get(blocks[-1]).writes[0].source.shape):
            return None
        n, y, x, c, ry, rx, rc = sch.get_loops(main)
        _, _, X, C = geo["ext"][:4]
        lanes = vector_lanes(target, _dtype_bits(sch.get(main)))
        vt, xt = _tile_sizes(C, [X], lanes, accumulator_budget(target))
        if vt % lanes:
            return None                       # channels not a multiple of the SIMD width
        x0, x1 = sch.split(x, factors=[None, xt])
        c0, c1 = sch.split(c, factors=[None, vt])
        sch.reorder(n, y, x0, c0, ry, rx, rc, x1, c1)
        outer = sch.fuse(n, y)
        wb = sch.cache_write(main, 0, "local")
        for e in epilogue[:-1]:               # bias / activation / residual: into the write-back
            sch.compute_inline(e)
        if epilogue:
            sch.reverse_compute_inline(epilogue[-1])
        sch.reverse_compute_at(wb, c0, preserve_unit_loops=True)
        _tile_inner(sch, sch.get_loops(wb)[-4:], vt)
        for loop in (ry, rx, rc, x1):
            sch.unroll(loop)
        sch.vectorize(c1)
        if geo["work"] >= MIN_PARALLEL_WORK:
            sch.parallel(outer)
        init = sch.decompose_reduction(main, ry)
        _tile_inner(sch, sch.get_loops(init)[-2:], vt)
        for p in reversed(prologue):          # padding: read in place
            sch.compute_inline(p)
        return sch


def _static_shape(shape):
    from tvm import tirx
    return [int(v) if isinstance(v, tirx.IntImm) else None for v in shape]


def _depthwise_geometry(sch, main):
    """Facts of a channels-last depthwise conv block, or None when ``main`` is not one: iterators
    ``(n, y, x, c | kh, kw, ic)`` each bound to its own loop, ``ic`` of extent 1, output written at
    ``[n, y, x, c]``, an input read at ``[n, y*s + kh*d, x*s' + kw*d', c]`` and a weight read that
    does not depend on ``y`` / ``x``; ``c`` contiguous in every operand.
    Returns {ext, stride, dilation, work (multiply-adds)}."""
    mstmt = sch.get(main)
    loops = sch.get_loops(main)
    iters = mstmt.iter_vars
    if len(loops) != 7 or len(iters) != 7 or len(mstmt.writes) != 1 or len(mstmt.reads) != 2:
        return None
    if _iter_kinds(mstmt) != "SSSSRRR" or not _bound_to_own_loops(sch, main, loops):
        return None
    ext = [_extent(sch, l) for l in loops]
    if None in ext or ext[6] != 1:
        return None
    n, y, x, c, ry, rx, rc = [iv.var for iv in iters]
    w = mstmt.writes[0].region
    if len(w) != 4 or not all(r.min.same_as(v) for r, v in zip(w, (n, y, x, c))):
        return None
    if not all(_unit_stride(r.region, c) for r in mstmt.reads):
        return None
    data = [r for r in mstmt.reads if len(r.region) == 4 and y in _vars_of(r.region[1].min)]
    weight = [r for r in mstmt.reads if not ({y, x} & _region_vars(r.region))]
    if len(data) != 1 or len(weight) != 1:
        return None
    rows, cols = data[0].region[1].min, data[0].region[2].min
    sy, dy = _linear_coeff(rows, y), _linear_coeff(rows, ry)
    sx, dx = _linear_coeff(cols, x), _linear_coeff(cols, rx)
    if not all(isinstance(v, int) and v >= 1 for v in (sy, dy, sx, dx)) or rx in _vars_of(rows) or \
            ry in _vars_of(cols):
        return None
    work = ext[0] * ext[1] * ext[2] * ext[3] * ext[4] * ext[5]
    return {"ext": ext, "stride": sy, "dilation": dy, "work": work}


def _linear_coeff(expr, var):
    """The integer ``a`` of ``expr == a * var + (terms without var)`` for sums / differences /
    products by constants; None when ``expr`` is not of that form in ``var``."""
    from tvm import tirx
    if var not in _vars_of(expr):
        return 0
    if expr.same_as(var):
        return 1
    if isinstance(expr, (tirx.Add, tirx.Sub)):
        a, b = _linear_coeff(expr.a, var), _linear_coeff(expr.b, var)
        if a is None or b is None:
            return None
        return a + b if isinstance(expr, tirx.Add) else a - b
    if isinstance(expr, tirx.Mul):
        for k, e in ((expr.a, expr.b), (expr.b, expr.a)):
            if isinstance(k, tirx.IntImm):
                inner = _linear_coeff(e, var)
                return None if inner is None else int(k.value) * inner
    return None


def accumulator_budget(target) -> int:
    """SIMD registers the register tile may hold as accumulators: 32 architectural vector registers
    on AArch64 (NEON) and AVX-512, 16 on AVX2/SSE; 4 are left for operands."""
    bits = vector_bits(target)
    return (32 if bits == 512 or bits == 128 and _is_arm(target) else 16) - 4


def _is_arm(target) -> bool:
    return str(target.attrs.get("mtriple", "") or "").startswith(("aarch64", "arm")) or "arm_cpu" in list(target.keys)


def _last_run(idx):
    """The last run of consecutive loop indices in ``idx`` (adjacent loops can be fused)."""
    if not idx:
        return []
    run = [idx[-1]]
    for i in reversed(idx[:-1]):
        if i != run[0] - 1:
            break
        run.insert(0, i)
    return run


def _row_options(exts) -> list:
    """Row-tile sizes over the fused row loops ``exts`` (outer to inner) that keep every tile a
    rectangle in the original loops: ``c x prod(exts[k+1:])`` with ``c`` a divisor of ``exts[k]``.
    (Any other size makes a tile straddle rows, and the write-back would cover a bounding box.)"""
    opts, suffix = {1}, 1
    for e in reversed(list(exts)):
        opts |= {c * suffix for c in range(1, e + 1) if e % c == 0}
        suffix *= e
    return sorted(opts)


def _tile_sizes(vec_ext: int, row_exts, lanes: int, budget: int, remainder: bool = False,
                max_vectors: int = 2):
    """(vector tile, row tile) filling as many of ``budget`` accumulator registers as possible.

    The vector tile is ``max_vectors`` down to 1 SIMD vectors (a divisor of the vector axis; a
    short axis is taken whole), the row tile a :func:`_row_options` size with rows x vectors <=
    budget; with ``remainder`` (one row axis) any size up to the extent, the last tile then partial."""
    vts = [v * lanes for v in range(max_vectors, 0, -1) if vec_ext % (v * lanes) == 0] or \
        ([_divisor_at_most(vec_ext, 2 * lanes)] if vec_ext > 1 else [1])
    best = (0, 1, 1)
    for vt in vts:
        nvec = max(-(-vt // lanes), 1)
        cap = max(budget // nvec, 1)
        rt = max(d for d in _row_options(list(row_exts)) if d <= cap)
        if remainder and len(row_exts) == 1:
            rt = max(rt, min(cap, row_exts[0]))
        score = rt * nvec
        if score > best[0]:
            best = (score, vt, rt)
    return best[1], best[2]


MAX_SHARED_TAPS = 7    # kernel widths unrolled inside the input-channel loop (_shared_tap_loop)


def _shared_tap_loop(block, ivars, ext, r_idx, rows, vec_reads):
    """The reduction iter ``kw`` (the one outside the innermost) that a read of the row operand
    indexes as ``s * row + kw`` in one dimension, with ``row`` the innermost row iter and
    1 <= s < extent of kw <= MAX_SHARED_TAPS (a conv's input column ``s * xx + rx``: stride 1 shares
    all but one tap with the neighbouring row, stride 2 of 3 taps one); None if there is none.
    Rows flattened over (h, w) do not qualify: their neighbours' taps need not coincide."""
    if len(r_idx) < 2 or not rows:
        return None
    kw, row = r_idx[-2], ivars[rows[-1]]
    if not 1 < ext[kw] <= MAX_SHARED_TAPS:
        return None
    vec_src = {r.source.name for r in vec_reads}
    w_src = block.writes[0].source.name
    for r in block.reads:
        if r.source.name in vec_src or r.source.name == w_src:
            continue
        if any(_linear_coeff(d.min, ivars[kw]) == 1 and 1 <= (_linear_coeff(d.min, row) or 0) < ext[kw]
               for d in r.region):
            return kw
    return None


def _likely_predicates(sch):
    """A schedule of ``sch``'s function with every block predicate marked ``likely``. The
    predicates are the partial row tile's bounds (``row < extent``): TVM's LoopPartition pass
    (on under :func:`lowering_context`) then peels the partial tile off the loop around it, so
    the full tiles run without a bounds check and keep their accumulators in registers."""
    import tvm_ffi
    from tvm import s_tir, tirx

    def mark(realize):
        if isinstance(realize.predicate, tirx.IntImm):
            return realize
        return s_tir.SBlockRealize(realize.iter_values, tirx.likely(realize.predicate), realize.block)

    return s_tir.Schedule(tvm_ffi.structural_map(sch.mod["main"], (s_tir.SBlockRealize, mark)))


#: TIR lowering options the scheduled code is built with (:func:`lowering_context`): LoopPartition
#: splits constant-extent loops at their ``likely`` conditions (:func:`_likely_predicates`)
LOWERING_CONFIG = {"s_tir.LoopPartition": {"partition_const_loop": True}}


def lowering_context():
    """The current PassContext plus :data:`LOWERING_CONFIG`: build scheduled host code inside it
    (``tvm.compile``). Without it the code is the same but a partial row tile's bounds check stays
    inside the reduction loop (correct, slower)."""
    import tvm
    cur = tvm.transform.PassContext.current()
    config = dict(cur.config.items()) if cur.config is not None else {}
    config.update(LOWERING_CONFIG)
    return tvm.transform.PassContext(opt_level=cur.opt_level, required_pass=list(cur.required_pass),
                                     disabled_pass=list(cur.disabled_pass), config=config,
                                     instruments=list(cur.instruments))


LAYOUT_FREE = "layout_free_buffers"   # PrimFunc attr: params bound to constants (TVM's name)
PREPACK = "meta_schedule.layout_rewrite_preproc"   # block annotation SplitLayoutRewritePreproc splits off


def _prepack(sch, main, func, buf, vt: int):
    """Read the vector operand ``buf`` (a conv's HWIO weights, a matmul's (K, N) matrix) from a copy
    packed as ``(N // vt, ..., vt)`` (one contiguous panel per vector tile of the output) when it is a
    parameter the caller binds to a constant (:data:`LAYOUT_FREE`): the copy is a block of its own
    annotated :data:`PREPACK`, which ``relax.transform.SplitLayoutRewritePreproc`` moves into a
    function of its own and ``FoldConstant`` evaluates at compile time (:func:`relax_pipeline`).
    Returns the packing block's name, or None where ``buf`` keeps its layout."""
    a = func.attrs
    if a is None or LAYOUT_FREE not in a:
        return None
    free = {int(i) for i in a[LAYOUT_FREE]}
    if not any(i in free and p.same_as(buf) for i, p in enumerate(func.params)):
        return None
    shape = [int(x) for x in buf.shape]
    if shape[-1] % vt or shape[-1] == vt:
        return None
    ridx = next(j for j, r in enumerate(sch.get(main).reads) if r.source.same_as(buf))
    blk = sch.cache_read(main, ridx, "global")
    sch.annotate(blk, PREPACK, 1)
    sch.transform_layout(main, ("read", ridx), _index_map(
        lambda *v: [v[-1] // vt, *v[:-1], v[-1] % vt], len(shape), buf.shape[-1].ty))
    return sch.get(blk).name_hint


def _tile_score(vt: int, rt: int, lanes: int) -> int:
    """Accumulator registers a (vector tile, row tile) pair keeps busy."""
    return rt * max(-(-vt // lanes), 1)


def _index_map(fn, ndim: int, dtype):
    from tvm.tirx import IndexMap
    return IndexMap.from_func(fn, ndim=ndim, index_dtype=str(dtype))


def _flatten_rows(sch, block, rows, ext):
    """Merge the block iters ``rows`` (consecutive, outer to inner, extents ``ext[i]``) into one
    iter. Row tiles may then be any divisor of the product (ResNet-18 layer3, 14 x 14 = 196 output
    pixels: 4 rows x 2 vectors instead of the 7 x 1 that rectangles in (h, w) allow)."""
    first, rest = rows[0], set(rows[1:])
    # iters of extent 1 (a 1x1 conv's kernel window) are dropped too: the accumulator cache's
    # reindex (TiledReduction, flat rows) refuses a block iter that indexes nothing
    rest |= {j for j, e in enumerate(ext) if e == 1 and j != first}

    def fmap(*v):
        fused = v[first]
        for i in rows[1:]:
            fused = fused * ext[i] + v[i]
        return [fused if j == first else x for j, x in enumerate(v) if j not in rest]

    sch.transform_block_layout(block, _index_map(fmap, len(sch.get(block).iter_vars),
                                                 sch.get(block).iter_vars[0].var.ty))


def _tile_inner(sch, loops, vt, lanes: int | None = None):
    """Unroll all but the last of a tile's loops; vectorize the last if it is the vector tile
    (a tile of more than 2 vectors of ``lanes``: split, one vector at a time)."""
    if not loops:
        return
    if lanes and vt > 2 * lanes and vt % lanes == 0 and _extent(sch, loops[-1]) == vt:
        vo, vi = sch.split(loops[-1], factors=[None, lanes])
        sch.vectorize(vi)
        rest = loops[:-1] + [vo]
    elif vt > 1 and _extent(sch, loops[-1]) == vt:
        sch.vectorize(loops[-1])
        rest = loops[:-1]
    else:
        rest = loops
    for l in rest:
        e = _extent(sch, l)
        if e is not None and 1 < e <= 8:
            sch.unroll(l)


def _iter_kinds(block_stmt) -> str:
    """One letter per block iter: "S" data-parallel, "R" anything else (a conv: "SSSSRRR")."""
    from tvm import tirx
    return "".join("S" if iv.iter_type == tirx.IterVar.DataPar else "R" for iv in block_stmt.iter_vars)


def _bound_to_own_loops(sch, block, loops) -> bool:
    """Whether each iter of ``block`` is bound to its own loop of ``loops``, in order (legalized
    ops are)."""
    vals = _iter_values(sch, block)
    return vals is not None and all(v.same_as(sch.get(l).loop_var) for v, l in zip(vals, loops))


def _loops_extent(sch, loops):
    """The product of the extents of ``loops``, None if one is not a constant."""
    total = 1
    for l in loops:
        e = _extent(sch, l)
        total = None if (e is None or total is None) else total * e
    return total


def _iter_values(sch, block):
    """The bindings (SBlockRealize.iter_values) of ``block`` if it sits directly in its innermost loop."""
    from tvm import s_tir
    loops = sch.get_loops(block)
    if not loops:
        return None
    body = sch.get(loops[-1]).body
    if not isinstance(body, s_tir.SBlockRealize) or body.block.name_hint != sch.get(block).name_hint:
        return None
    return list(body.iter_values)


def _root_blocks(func):
    """(a schedule of ``func``, its root block, the root's child blocks), or None when ``func`` has
    no root block (every rule starts here)."""
    from tvm import s_tir
    sch = s_tir.Schedule(func)
    if not _has_root(sch):
        return None
    root = sch.get_sblock("root")
    return sch, root, sch.get_child_blocks(root)


def _single_reduction(sch, blocks):
    """The one non-injective block of ``blocks`` (a conv / matmul / pool), None if not exactly one."""
    red = [b for b in blocks if not _injective(sch, b)]
    return red[0] if len(red) == 1 else None


def _has_root(sch) -> bool:
    try:
        sch.get_sblock("root")
        return True
    except Exception:
        return False


def _remaining(sch, root, skip_names):
    return [b for b in sch.get_child_blocks(root) if sch.get(b).name_hint not in skip_names
            and _injective(sch, b)]


class RowReduction(_Rule):
    """Softmax / layer norm / RMS norm: reductions over the innermost axis of rows that every block
    shares (``S..SR`` reduction blocks, ``S..S`` injective ones, the last one injective).

    Like ``dlight.cpu.Reduction`` the row loops are fused into one (parallel) loop and every block is
    computed at it, but each reduction is split into :func:`_reduction_lanes` partial results
    (``rfactor``) accumulated as vectors and summed at the end of the row. A float reduction kept in
    one scalar is a chain of dependent adds LLVM may not reorder (dlight's unrolled scalar loop:
    about 4 cycles an element here). Only the summation order changes."""
    name = "row-reduction"

    def apply(self, func, target):
        got = _root_blocks(func)
        if got is None:
            return None
        sch, root, blocks = got
        if len(blocks) < 2 or not _injective(sch, blocks[-1]) or all(_injective(sch, b) for b in blocks):
            return None
        # row axes: the leading spatial axes all blocks share, never the last block's innermost one
        # (a keepdims reduction has a unit axis there)
        n_rows = min([_leading_spatial(sch.get(b)) for b in blocks] + [len(sch.get_loops(blocks[-1])) - 1])
        row_exts = [_extent(sch, l) for l in sch.get_loops(blocks[-1])[:n_rows]]
        if n_rows < 1 or any([_extent(sch, l) for l in sch.get_loops(b)[:n_rows]] != row_exts for b in blocks):
            return None
        lanes = vector_lanes(target, _dtype_bits(sch.get(blocks[-1])))
        rfactored = set()
        for b in blocks:
            if _injective(sch, b):
                continue
            stmt = sch.get(b)
            kinds = _iter_kinds(stmt)
            loops = sch.get_loops(b)
            if kinds.rstrip("R") != kinds[:-1] or len(loops) != len(kinds) or \
                    not _bound_to_own_loops(sch, b, loops):
                return None                    # one trailing reduction axis, loops bound 1:1
            v = _reduction_lanes(_extent(sch, loops[-1]), lanes)
            if v is None or not all(_unit_stride(r.region, stmt.iter_vars[-1].var) for r in stmt.reads):
                continue                       # short, odd or strided row: stays a scalar loop
            _, lane = sch.split(loops[-1], factors=[None, v])
            rfactored.add(sch.get(sch.rfactor(lane, factor_axis=len(kinds) - 1)).name_hint)
        if not rfactored:
            return None                        # nothing to vectorize: dlight's rule does the rest
        blocks = sch.get_child_blocks(root)
        loops = sch.get_loops(blocks[-1])
        total = _loops_extent(sch, loops)
        rows = sch.fuse(*loops[:n_rows]) if n_rows > 1 else loops[0]
        if total is None or total >= MIN_PARALLEL_ELEMS:
            sch.parallel(rows)                 # before decompose_reduction: it needs complete blocks
        for b in reversed(blocks[:-1]):
            sch.compute_at(b, rows, preserve_unit_loops=True)
        for b in sch.get_child_blocks(rows):
            if sch.get(b).name_hint in rfactored:
                _vectorize_partials(sch, b)
            elif _injective(sch, b):
                _vectorize_inner(sch, b, lanes)
        return sch


def _leading_spatial(block_stmt) -> int:
    """How many data-parallel iters lead the block's iters."""
    kinds = _iter_kinds(block_stmt)
    return len(kinds) - len(kinds.lstrip("S"))


def _reduction_lanes(extent, lanes: int):
    """Partial results for a row reduction of ``extent``: a multiple of ``lanes`` dividing it that
    minimizes ``extent / v + v`` (the vector loop's chain of dependent steps plus the scalar sum of
    the ``v`` partials at the end); None if no multiple of ``lanes`` below ``extent`` divides it."""
    if extent is None:
        return None
    cands = [lanes << j for j in range(8) if (lanes << j) < extent and extent % (lanes << j) == 0]
    if not cands:
        return None
    return min(cands, key=lambda v: (extent // v + v, -v))


def _vectorize_partials(sch, rf_block):
    """An rfactor block computed at the row loop: its partial-result axis becomes the innermost,
    vectorized loop under the remaining reduction loop; its init gets its own vectorized loop."""
    from tvm import tirx
    stmt = sch.get(rf_block)
    vals = _iter_values(sch, rf_block)
    lane_var = stmt.writes[0].region[-1].min          # the partial-result index of the rf buffer
    ivs = list(stmt.iter_vars)
    lane_bind = next(vals[j] for j, iv in enumerate(ivs) if iv.var.same_as(lane_var))
    red_bind = next(vals[j] for j, iv in enumerate(ivs) if iv.iter_type != tirx.IterVar.DataPar)
    under = sch.get_loops(rf_block)[1:]
    lane = next(l for l in under if sch.get(l).loop_var.same_as(lane_bind))
    red = next(l for l in under if sch.get(l).loop_var.same_as(red_bind))
    sch.reorder(*([l for l in under if not sch.get(l).same_as(sch.get(lane)) and
                   not sch.get(l).same_as(sch.get(red))] + [red, lane]))
    sch.vectorize(lane)
    init = sch.decompose_reduction(rf_block, red)
    sch.vectorize(sch.get_loops(init)[-1])


class Injective(_Rule):
    """Only spatial blocks: inline intermediates, then vectorize + parallelize each remaining block."""
    name = "injective"

    def apply(self, func, target):
        got = _root_blocks(func)
        if got is None:
            return None
        sch, root, blocks = got
        if not blocks or not all(_injective(sch, b) for b in blocks):
            return None
        for b in blocks[:-1]:
            try:
                sch.compute_inline(b)
            except Exception:
                pass
        for b in sch.get_child_blocks(root):
            lanes = vector_lanes(target, _dtype_bits(sch.get(b)))
            _schedule_injective_block(sch, b, lanes)
        return sch


class ParallelOuter(_Rule):
    """Last resort: the leading spatial loops of each root block run in parallel."""
    name = "parallel-outer"

    def apply(self, func, target):
        from tvm import s_tir, tirx
        sch = s_tir.Schedule(func)
        if not _has_root(sch):
            return None
        done = False
        for b in sch.get_child_blocks(sch.get_sblock("root")):
            loops = sch.get_loops(b)
            iters = sch.get(b).iter_vars
            if not loops or len(loops) != len(iters) or iters[0].iter_type != tirx.IterVar.DataPar:
                continue
            e = _extent(sch, loops[0])
            if e is not None and e > 1:
                sch.parallel(loops[0])
                done = True
        return sch if done else None


class _Dlight(_Rule):
    """Adapter for a ``tvm.s_tir.dlight`` rule (its ``apply(func, target, tunable)``)."""

    def __init__(self, rule, name):
        self.rule, self.name = rule, name

    def apply(self, func, target):
        sch = self.rule.apply(func, target, False)
        if isinstance(sch, list):
            sch = sch[0] if sch else None
        return sch


def default_rules(knobs: dict | None = None):
    """The rule list, first match wins (see the module docstring); ``knobs``: TiledReduction's
    (:data:`KNOBS`)."""
    from tvm.s_tir import dlight
    return [DepthwiseConv(), TiledReduction(knobs), RowReduction(), _Dlight(dlight.cpu.Reduction(), "dlight.cpu.Reduction"),
            _Dlight(dlight.cpu.GEMV(), "dlight.cpu.GEMV"), Injective(), ParallelOuter()]


_TOPI_TEMPLATES: dict = {}


def _topi_unary(name, arg):
    """``tvm.topi.<name>`` (an elementwise float32 function) of the TIR expression ``arg``: TVM's own
    implementation, taken from the TE compute it builds, with ``arg`` bound once by a ``Let``."""
    import tvm
    import tvm_ffi
    from tvm import te, tirx, topi
    got = _TOPI_TEMPLATES.get(name)
    if got is None:
        ph = te.placeholder((1,), FAST_MATH_DTYPE, name="x")
        prim = te.create_prim_func([ph, getattr(topi, name)(ph)])
        stores = []
        tvm_ffi.structural_walk(prim.body, (tirx.BufferStore, stores.append), order="post")
        if len(stores) != 1:
            raise RuntimeError(f"topi.{name}: expected one elementwise store, got {len(stores)}")
        x = tirx.Var("x", FAST_MATH_DTYPE)
        got = _TOPI_TEMPLATES[name] = (x, tvm_ffi.structural_map(stores[0].value, (tvm.ir.TensorLoad, lambda _l: x)))
    x, body = got
    fresh = tirx.Var(name + "_x", FAST_MATH_DTYPE)
    return tirx.Let(fresh, arg, tvm_ffi.structural_map(body, (tvm.ir.Var, lambda v: fresh if v.same_as(x) else v)))


def _fast_erf(x):
    return _topi_unary("fast_erf", x)


def _fast_exp(x):
    return _topi_unary("fast_exp", x)


def _fast_sigmoid(x):
    """1 / (1 + e^-x): 0 and 1 at the ends, as libm's."""
    from tvm import tirx
    one = tirx.const(1.0, FAST_MATH_DTYPE)
    return one / (one + _fast_exp(-x))


TANH_SERIES_BELOW = 0.0625   # |x| where tanh's odd series x - x^3/3 + 2x^5/15 is within 3e-9 relative


def _fast_tanh(x):
    """sign(x) (1 - e^-2|x|) / (1 + e^-2|x|); below :data:`TANH_SERIES_BELOW` its series instead
    (the quotient's 1 - e^-2|x| loses the relative precision of a small tanh)."""
    from tvm import tirx
    c = lambda v: tirx.const(v, FAST_MATH_DTYPE)    # noqa: E731
    t = _fast_exp(c(-2.0) * tirx.abs(x))
    quotient = tirx.copysign((c(1.0) - t) / (c(1.0) + t), x)
    x2 = x * x
    series = x * (c(1.0) + x2 * (c(-1.0 / 3.0) + x2 * c(2.0 / 15.0)))   # keeps the sign of -0
    return tirx.Select(tirx.abs(x) < c(TANH_SERIES_BELOW), series, quotient)


# float32 intrinsics whose libm call LLVM leaves scalar, one call per SIMD lane (TVM lowers tanh and
# sigmoid through exp) -> the builder of the vectorizable approximation replacing them (measured
# accuracy: the module docstring)
FAST_MATH = {"tirx.erf": _fast_erf, "tirx.exp": _fast_exp, "tirx.sigmoid": _fast_sigmoid,
             "tirx.tanh": _fast_tanh}


def fast_math(func):
    """``func`` with every float32 call of a :data:`FAST_MATH` intrinsic replaced by its vectorizable
    approximation, of the argument bound once by a ``Let``, NaN passed through; ``func`` itself if
    it has none."""
    import tvm
    import tvm_ffi
    from tvm import tirx
    ops = {n: tvm.ir.Op.get(n) for n in FAST_MATH}
    changed = []

    def rewrite(call):
        name = next((n for n, op in ops.items() if call.op.same_as(op)), None)
        if name is None or str(call.ty) != FAST_MATH_DTYPE or len(call.args) != 1:
            return call
        x = tirx.Var(name.split(".")[-1] + "_arg", FAST_MATH_DTYPE)
        changed.append(name)
        return tirx.Let(x, call.args[0], tirx.Select(tirx.isnan(x), x, FAST_MATH[name](x)))

    out = tvm_ffi.structural_map(func, (tvm.ir.Call, rewrite))
    return out if changed else func


def schedule_func(func, target, rules=None):
    """(scheduled PrimFunc or None, name of the rule used or None). A rule that raises is skipped.
    The scheduled function has :func:`fast_math` applied."""
    for rule in rules if rules is not None else default_rules():
        try:
            sch = rule.apply(func, target)
        except Exception as e:  # a primitive refused this shape: try the next rule
            log.debug("cpu_schedule: rule %s failed on %s: %s", rule.name, _fname(func), e)
            continue
        if sch is not None:
            out = sch.mod["main"]
            if not _lowers(out):
                log.debug("cpu_schedule: rule %s made ill-formed TIR for %s", rule.name, _fname(func))
                continue
            return fast_math(out.with_attr("tirx.is_scheduled", True)), rule.name
    return None, None


_LOWERING_CHECK = ("s_tir.transform.LowerInitBlock", "s_tir.transform.PlanAndUpdateBufferAllocationLocation",
                   "s_tir.transform.ConvertBlocksToOpaque", "s_tir.transform.CompactBufferAllocation",
                   "s_tir.transform.LowerOpaqueBlock", "tirx.transform.FlattenBuffer",
                   "tirx.transform.VectorizeLoop")


def _lowers(func) -> bool:
    """Whether ``func`` survives the front of TVM's TIR lowering (``default_s_tir_pipeline`` up to
    vectorization; no code generation): a schedule primitive can accept a transformation that a
    later pass rejects, and then the next rule must be used."""
    import tvm
    from tvm import s_tir, tirx
    mods = {"s_tir": s_tir, "tirx": tirx}
    try:
        passes = []
        for path in _LOWERING_CHECK:
            head, _, rest = path.partition(".")
            obj = mods[head]
            for part in rest.split("."):
                obj = getattr(obj, part)
            passes.append(obj())
        tvm.transform.Sequential(passes)(tvm.IRModule({"main": func}))
        return True
    except Exception as e:
        log.debug("cpu_schedule: lowering failed: %s", e)
        return False


def _fname(func):
    a = func.attrs
    return str(a["global_symbol"]) if a is not None and "global_symbol" in a else "<prim_func>"


def schedule_pass(target, rules=None, stats: dict | None = None):
    """Module pass: schedule every unscheduled PrimFunc; ``stats`` collects {func: rule name}. Every
    PrimFunc (scheduled here, by a tuning record, or left unscheduled) gets :func:`fast_math`."""
    import tvm
    from tvm import tirx

    @tvm.transform.module_pass(opt_level=0, name="TvmQpuCpuSchedule")
    def _pass(mod, _ctx):
        updates = {}
        for gv, func in mod.functions_items():
            if not isinstance(func, tirx.PrimFunc):
                continue
            if func.attrs is not None and "tirx.is_scheduled" in func.attrs and int(func.attrs["tirx.is_scheduled"]):
                new = fast_math(func)
            else:
                new, rule = schedule_func(func, target, rules)    # fast_math applied there
                if stats is not None:
                    stats[gv.name_hint] = rule or "default"
                if new is None:
                    new = fast_math(func)
            if not new.same_as(func):
                updates[gv] = new
        for gv, f in updates.items():
            mod[gv] = f
        return mod

    return _pass


def relax_calls(mod, op_name: str | None = None) -> list:
    """Every call in the Relax functions of ``mod`` (of the operator ``op_name`` only, if given)."""
    import tvm
    import tvm_ffi
    from tvm import relax
    found = []
    for _, f in mod.functions_items():
        if isinstance(f, relax.Function):
            tvm_ffi.structural_walk(f, (relax.Call, found.append), order="pre")
    if op_name is None:
        return found
    return [c for c in found if isinstance(c.op, tvm.ir.Op) and c.op.name == op_name]


def constant_params(mod) -> dict:
    """{PrimFunc name: indices of its parameters that every ``call_tir`` of it binds to a Relax
    constant (weights)}: the buffers a schedule may repack at compile time (:func:`_prepack`)."""
    import tvm
    from tvm import relax
    found = {}
    for call in relax_calls(mod, "relax.call_tir"):
        args = call.args[1].fields if isinstance(call.args[1], relax.Tuple) else []
        idx = {i for i, a in enumerate(args) if isinstance(a, tvm.ir.expr.Constant)}
        name = call.args[0].name_hint
        found[name] = found[name] & idx if name in found else idx
    return found


def _calls_op(mod, op_names) -> bool:
    """Whether any Relax function of ``mod`` calls one of ``op_names``."""
    import tvm
    return any(isinstance(c.op, tvm.ir.Op) and c.op.name in op_names for c in relax_calls(mod))


def legalized(mod, target):
    """``mod`` as the scheduling pass sees it: channels-last conv2d (where there is one), TVM's
    library dispatch, legalization and fusion. Tuning (:mod:`tvm_qpu.tune`) extracts its tasks
    from this very module, so its records match the functions the build schedules."""
    import tvm
    from tvm import relax
    from tvm.relax.backend.cpu_generic import pipeline as cg
    with target:
        if _calls_op(mod, CONV_LAYOUT):
            # only where there is a conv2d: TVM 0.27's ConvertLayout dies with SIGFPE on some
            # graphs without one (e.g. ONNX DynamicQuantizeLinear, expanded)
            mod = relax.transform.ConvertLayout(dict(CONV_LAYOUT))(mod)
        seq = tvm.transform.Sequential(cg.library_dispatch_passes(target) + cg.legalize_passes(target))
        return mark_layout_free(seq(mod))


def mark_layout_free(mod):
    """``mod`` with each PrimFunc's constant parameters (:func:`constant_params`) named in its
    :data:`LAYOUT_FREE` attribute, TVM's convention for buffers a schedule may repack
    (:func:`_prepack`; ``tvmc tune`` hides it from MetaSchedule's candidates: :mod:`tvm_qpu.tune`)."""
    from tvm import tirx
    constant = constant_params(mod)
    for gv, func in list(mod.functions_items()):
        if isinstance(func, tirx.PrimFunc) and constant.get(gv.name_hint):
            mod[gv] = func.with_attr(LAYOUT_FREE, sorted(constant[gv.name_hint]))
    return mod


def prepack_passes() -> list:
    """Relax passes after scheduling: each weight-packing block (:func:`_prepack`) moves into a
    function of its own called on the constant, which
    FoldConstant then runs at compile time: the build ships the packed weights (and not the packing
    functions: dead code once folded)."""
    from tvm import relax
    return [relax.transform.SplitLayoutRewritePreproc(), relax.transform.FoldConstant(),
            relax.transform.DeadCodeElimination()]


def relax_pipeline(target, rules=None, stats: dict | None = None, pre_schedule=()):
    """TVM's CPU pipeline (``relax.backend.cpu_generic``) with :func:`schedule_pass` after fusion.
    ``pre_schedule``: module passes run before it (tuning records: :mod:`tvm_qpu.tune`); the
    functions they mark ``tirx.is_scheduled`` keep their schedule."""
    import tvm
    from tvm.relax.backend.cpu_generic import pipeline as cg

    @tvm.transform.module_pass(opt_level=0, name="TvmQpuCpuPipeline")
    def _pipeline(mod, _ctx):
        mod = legalized(mod, target)
        with target:
            seq = tvm.transform.Sequential(
                list(pre_schedule) + [schedule_pass(target, rules, stats)] + prepack_passes()
                + cg.dataflow_lower_passes(target) + cg.finalize_passes(target))
            return seq(mod)

    return _pipeline
