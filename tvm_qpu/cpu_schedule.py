"""Default (untuned) CPU schedules for the host code of every build.

TVM 0.27's default Relax pipeline for ``llvm`` legalizes each op into plain loop nests and stops:
no tiling, no vectorization, no threads. This module adds one pass between legalization/fusion and
the VM lowering (:func:`relax_pipeline`) that schedules every PrimFunc with the first rule of
:data:`RULES` that applies, in the style of ``tvm.s_tir.dlight``:

1. :class:`TiledReduction` -- conv2d (incl. depthwise / grouped), matmul / dense / batch matmul and
   pooling: one reduction block whose output has the function's output shape, plus injective
   prologue (padding) and epilogue (bias, residual add, activations) blocks. A register tile of
   ``rows x (2 x SIMD lanes)`` accumulators (cache-write to ``local``, unrolled and vectorized) sits
   under the reduction loops; the remaining spatial loops are fused into one ``parallel`` loop (TVM's
   thread pool, ``TVM_NUM_THREADS``); the epilogue is inlined into the tile's write-back. Rows are
   rectangles of the output's (h, w) loops, or any divisor of h x w after merging them into one
   block iter when that fills more accumulators (:func:`_flatten_rows`); a stride-1 conv's
   kernel-width taps run inside the input-channel loop so neighbouring rows share their
   broadcasts (:func:`_shared_tap_loop`).
2. ``dlight.cpu.Reduction`` -- TVM's own rule for softmax / layer norm / RMS norm (several blocks
   sharing leading spatial axes).
3. ``dlight.cpu.GEMV`` -- TVM's own rule for matrix-vector products.
4. :class:`Injective` -- elementwise / broadcast / layout blocks: inline what can be inlined, then
   per block a vectorized inner loop and a parallel outer loop.
5. :class:`ParallelOuter` -- anything else: its outermost spatial loops run in parallel.

A rule that raises (a primitive refused on an odd shape) or declines moves on to the next rule; if
none applies the function keeps TVM's default lowering. Nothing here changes what is computed, only
the loop order, so results stay those of the unscheduled build up to float summation order.

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


def _schedule_injective_block(sch, block, lanes: int):
    """Vectorize the innermost loop (a divisor of its extent), fuse the rest and run it in parallel."""
    loops = sch.get_loops(block)
    if not loops:
        return
    total = 1
    for l in loops:
        e = _extent(sch, l)
        total = None if (e is None or total is None) else total * e
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
        elif not outer:
            outer.append(inner)
    elif not outer:
        outer.append(inner)
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


class TiledReduction(_Rule):
    """One reduction block (conv / matmul / pool) + injective prologue and epilogue blocks."""
    name = "tiled-reduction"

    def apply(self, func, target):
        try:
            sch = self._apply(func, target, flatten=True)
            if sch is None or _lowers(sch.mod["main"]):
                return sch
        except Exception as e:  # flattening refused: the rectangular tiles still apply
            log.debug("cpu_schedule: flattened rows failed on %s: %s", _fname(func), e)
        return self._apply(func, target, flatten=False)

    def _apply(self, func, target, flatten: bool, flat_rows: bool = False):
        """``flatten``: the row loops may be merged into one block iter (:func:`_flatten_rows`) when
        that allows a larger register tile; ``flat_rows``: they already were (the accumulator cache
        then follows the block's iters, see below)."""
        from tvm import s_tir, tirx
        sch = s_tir.Schedule(func)
        root = sch.get_sblock("root") if _has_root(sch) else None
        if root is None:
            return None
        blocks = sch.get_child_blocks(root)
        red = [b for b in blocks if not _injective(sch, b)]
        if len(red) != 1:
            return None
        main = red[0]
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
        kinds = ["S" if iv.iter_type == tirx.IterVar.DataPar else "R" for iv in iters]
        ks = "".join(kinds)
        if ks.rstrip("R") != "S" * ks.count("S") or "R" not in ks:
            return None                                  # expects spatial loops, then reduction loops
        # each block iter must be bound to its own loop (legalized ops are)
        realize_vals = _iter_values(sch, main)
        loop_vars = [sch.get(l).loop_var for l in loops]
        if realize_vals is None or any(not v.same_as(lv) for v, lv in zip(realize_vals, loop_vars)):
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
        vt, rt = _tile_sizes(vec_ext, [ext[i] for i in rows], lanes, budget)
        if flatten and len(rows) > 1:
            flat = 1
            for i in rows:
                flat *= ext[i]
            if _tile_score(*_tile_sizes(vec_ext, [flat], lanes, budget), lanes) > _tile_score(vt, rt, lanes):
                _flatten_rows(sch, main, rows, ext)
                return self._apply(sch.mod["main"], target, flatten=False, flat_rows=True)
        if vt < 2:
            vec = None
        loops = list(loops)
        row_exts = [ext[i] for i in rows]
        row = None
        if rows and rt > 1:
            row = rows[0]
            if len(rows) > 1:
                loops[row] = sch.fuse(*[loops[i] for i in rows])
            s_idx = [i for i in s_idx if i not in rows[1:]]

        # K-blocking: when the vector operand's panel (reduction extent x vector tile) outgrows L1,
        # split the innermost reduction loop and iterate a chunk of row tiles per panel block
        r_outer, r_inner, row_mid = [loops[i] for i in r_idx], [], None
        red_elems = 1
        for i in r_idx:
            red_elems *= ext[i]
        kblock = vec is not None and row is not None and red_elems * vt * 4 > PANEL_BYTES
        # split: [outer spatial (parallel)] [reduction] [row tile (unroll)] [vector tile (vectorize)]
        outer, row_in, vec_in = [], None, None
        for i in s_idx:
            if i == vec:
                o, vec_in = sch.split(loops[i], factors=[None, vt])
                outer.insert(0, o)                       # vector-axis blocks outermost: panel reuse
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
            kb = _divisor_at_most(ext[last], max(PANEL_BYTES // (vt * 4 * ext[kw]), 1))
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
            kb = _divisor_at_most(ext[last], max(PANEL_BYTES // (vt * 4), 1))
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
        sch.reorder(*order)
        fused = sch.fuse(*outer) if len(outer) > 1 else outer[0]
        skip = set()
        if kblock and row_mid is not None and r_outer and len(vec_reads) == 1:
            # copy the panel block contiguous once per chunk: strided rows of a big weight matrix
            # would otherwise share L1 sets (a 2^n-ish stride) and miss on every row tile
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
        sch.reverse_compute_at(wb, fused, preserve_unit_loops=True)
        wl = sch.get_loops(wb)[1:]
        _tile_inner(sch, wl, vt if vec is not None else 1)
        if row_in is not None:
            sch.unroll(row_in)
        if vec_in is not None:
            sch.vectorize(vec_in)       # before decompose_reduction: it needs the complete block
        n_out = 1
        for i in s_idx:
            n_out *= ext[i]
        if n_out * red_elems >= MIN_PARALLEL_WORK:
            sch.parallel(fused)
        init = sch.decompose_reduction(main, sch.get_loops(main)[1])
        il = sch.get_loops(init)[1:]
        _tile_inner(sch, il, vt if vec is not None else 1)
        # epilogue blocks that could not be inlined, and the prologue (padding): own loops
        skip |= {sch.get(main).name_hint, sch.get(init).name_hint, sch.get(wb).name_hint}
        for b in _remaining(sch, root, skip):
            _schedule_injective_block(sch, b, lanes)
        return sch


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


def _tile_sizes(vec_ext: int, row_exts, lanes: int, budget: int):
    """(vector tile, row tile) filling as many of ``budget`` accumulator registers as possible.

    The vector tile is 2 or 1 SIMD vectors (a divisor of the vector axis; a short axis is taken
    whole), the row tile a :func:`_row_options` size with rows x vectors <= budget."""
    vts = [v for v in (2 * lanes, lanes) if vec_ext % v == 0] or \
        ([_divisor_at_most(vec_ext, 2 * lanes)] if vec_ext > 1 else [1])
    best = (0, 1, 1)
    for vt in vts:
        nvec = max(-(-vt // lanes), 1)
        cap = max(budget // nvec, 1)
        rt = max(d for d in _row_options(list(row_exts)) if d <= cap)
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
        if any(_linear_coef(d.min, ivars[kw]) == 1 and 1 <= (_linear_coef(d.min, row) or 0) < ext[kw]
               for d in r.region):
            return kw
    return None


def _linear_coef(expr, var):
    """``c`` if ``expr`` is ``c * var + (terms without var)`` with a constant ``c``, else None."""
    from tvm import tirx
    if expr.same_as(var):
        return 1
    if isinstance(expr, (tirx.Add, tirx.Sub)):
        a_has, b_has = var in _vars_of(expr.a), var in _vars_of(expr.b)
        if a_has and not b_has:
            return _linear_coef(expr.a, var)
        if b_has and not a_has and isinstance(expr, tirx.Add):
            return _linear_coef(expr.b, var)
        return None
    if isinstance(expr, tirx.Mul):
        for x, k in ((expr.a, expr.b), (expr.b, expr.a)):
            if isinstance(k, tirx.IntImm) and var not in _vars_of(k):
                c = _linear_coef(x, var)
                return None if c is None else c * int(k.value)
    return None


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

    def fmap(*v):
        fused = v[first]
        for i in rows[1:]:
            fused = fused * ext[i] + v[i]
        return [fused if j == first else x for j, x in enumerate(v) if j not in rest]

    sch.transform_block_layout(block, _index_map(fmap, len(sch.get(block).iter_vars),
                                                 sch.get(block).iter_vars[0].var.ty))


def _tile_inner(sch, loops, vt):
    """Unroll all but the last of a tile's loops; vectorize the last if it is the vector tile."""
    if not loops:
        return
    if vt > 1 and _extent(sch, loops[-1]) == vt:
        sch.vectorize(loops[-1])
        rest = loops[:-1]
    else:
        rest = loops
    for l in rest:
        e = _extent(sch, l)
        if e is not None and 1 < e <= 8:
            sch.unroll(l)


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


def _has_root(sch) -> bool:
    try:
        sch.get_sblock("root")
        return True
    except Exception:
        return False


def _remaining(sch, root, skip_names):
    return [b for b in sch.get_child_blocks(root) if sch.get(b).name_hint not in skip_names
            and _injective(sch, b)]


class Injective(_Rule):
    """Only spatial blocks: inline intermediates, then vectorize + parallelize each remaining block."""
    name = "injective"

    def apply(self, func, target):
        from tvm import s_tir
        sch = s_tir.Schedule(func)
        if not _has_root(sch):
            return None
        root = sch.get_sblock("root")
        blocks = sch.get_child_blocks(root)
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


def default_rules():
    """The rule list, first match wins (see the module docstring)."""
    from tvm.s_tir import dlight
    return [TiledReduction(), _Dlight(dlight.cpu.Reduction(), "dlight.cpu.Reduction"),
            _Dlight(dlight.cpu.GEMV(), "dlight.cpu.GEMV"), Injective(), ParallelOuter()]


def schedule_func(func, target, rules=None):
    """(scheduled PrimFunc or None, name of the rule used or None). A rule that raises is skipped."""
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
            return out.with_attr("tirx.is_scheduled", True), rule.name
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
    """Module pass: schedule every unscheduled PrimFunc; ``stats`` collects {func: rule name}."""
    import tvm
    from tvm import tirx

    @tvm.transform.module_pass(opt_level=0, name="TvmQpuCpuSchedule")
    def _pass(mod, _ctx):
        updates = {}
        for gv, func in mod.functions_items():
            if not isinstance(func, tirx.PrimFunc):
                continue
            if func.attrs is not None and "tirx.is_scheduled" in func.attrs and int(func.attrs["tirx.is_scheduled"]):
                continue
            new, rule = schedule_func(func, target, rules)
            if stats is not None:
                stats[gv.name_hint] = rule or "default"
            if new is not None:
                updates[gv] = new
        for gv, f in updates.items():
            mod[gv] = f
        return mod

    return _pass


def _calls_op(mod, op_names) -> bool:
    """Whether any Relax function of ``mod`` calls one of ``op_names``."""
    import tvm
    import tvm_ffi
    from tvm import relax
    found = []

    def visit(call):
        op = call.op
        if isinstance(op, tvm.ir.Op) and op.name in op_names:
            found.append(op.name)

    for _, f in mod.functions_items():
        if isinstance(f, relax.Function):
            tvm_ffi.structural_walk(f, (relax.Call, visit), order="pre")
    return bool(found)


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
        return seq(mod)


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
                list(pre_schedule) + [schedule_pass(target, rules, stats)]
                + cg.dataflow_lower_passes(target) + cg.finalize_passes(target))
            return seq(mod)

    return _pipeline
