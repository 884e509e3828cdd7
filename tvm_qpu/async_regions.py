"""Asynchronous QPU regions: split each ``run_plan`` call into a submit and a wait at first use.

After :meth:`tvm_qpu.backend.QpuBackend.codegen` every QPU region is one binding

    y = call_dps_packed("tvm_qpu.run_plan", [key, *inputs], out_ty)

which blocks the Relax VM until the QPU is done. :func:`make_async` rewrites it into

    t = call_dps_packed("tvm_qpu.submit_plan", [key, *inputs], R.Tensor((1,), "int64"))
    ...  CPU ops that do not need y
    y = call_dps_packed("tvm_qpu.wait_plan", [key, t], out_ty)

* the submit copies the inputs into the region's device buffers before it returns, so the memory
  planner may reuse the input tensors at once; its only output is a one-element ticket;
* the wait writes the region's output into its own destination tensor, which the memory planner
  allocates at the wait (the output lives on the device in between): no buffer is shared between
  the submit and the wait, so Relax's storage reuse cannot clobber a result in flight;
* within a dataflow block the bindings are re-ordered by a list scheduler: submits (and the CPU
  ops that feed a submit) as early as their inputs allow, waits as late as possible, i.e. only when
  nothing else is ready, which puts each wait right before the first use of its result (or at the
  end of the block when the result leaves it). Bindings outside dataflow blocks keep their order
  (they may be impure); their waits go right before the first use.

The executor side (:meth:`tvm_qpu.executor.PlanExecutor.submit` / ``wait``) runs the region in a
QPU worker thread on a real GPU, or emulates it at the submit on the emulator, where the timeline
(:mod:`tvm_qpu.timeline`) models the overlap.
"""
from __future__ import annotations

from .executor import RUN_PLAN, SUBMIT_PLAN, WAIT_PLAN


def _extern_call(value, symbol: str) -> bool:
    """``value`` is ``call_dps_packed(ExternFunc(symbol), ...)``."""
    from tvm import relax
    return (isinstance(value, relax.Call) and getattr(value.op, "name", "") == "relax.call_dps_packed"
            and isinstance(value.args[0], relax.ExternFunc) and str(value.args[0].global_symbol) == symbol)


def is_run_plan(value) -> bool:
    return _extern_call(value, RUN_PLAN)


def is_submit(value) -> bool:
    return _extern_call(value, SUBMIT_PLAN)


def is_wait(value) -> bool:
    return _extern_call(value, WAIT_PLAN)


def _split(binding, dataflow: bool, bb):
    """(submit binding, wait binding) for a run_plan binding."""
    from tvm import relax
    call = binding.value
    args = list(call.args[1].fields)
    key = args[0]
    ticket_ty = relax.TensorType([1], "int64")
    submit = bb.normalize(relax.call_dps_packed(SUBMIT_PLAN, args, out_ty=ticket_ty))
    var_cls = relax.DataflowVar if dataflow else relax.Var
    ticket = var_cls(f"{binding.var.name}_ticket", ticket_ty)
    wait = bb.normalize(relax.call_dps_packed(WAIT_PLAN, [key, ticket], out_ty=call.ty_args[0]))
    return relax.VarBinding(ticket, submit), relax.VarBinding(binding.var, wait)


def _uses(binding) -> set:
    from tvm import relax
    return set(relax.analysis.free_vars(binding.value))


def _schedule(bindings: list) -> list:
    """List-schedule one dataflow block's bindings (module docstring). Keeps data dependencies;
    ties keep the original order."""
    n = len(bindings)
    defined = {b.var: i for i, b in enumerate(bindings)}
    deps = [{defined[v] for v in _uses(b) if v in defined and defined[v] != i} for i, b in enumerate(bindings)]
    submit = [is_submit(b.value) for b in bindings]
    wait = [is_wait(b.value) for b in bindings]
    feeds = [False] * n                  # a (transitive) input of some submit
    for i in reversed(range(n)):
        if submit[i] or feeds[i]:
            for d in deps[i]:
                feeds[d] = True
    users = [[] for _ in range(n)]
    for i, ds in enumerate(deps):
        for d in ds:
            users[d].append(i)
    left = [len(ds) for ds in deps]
    ready = sorted(i for i in range(n) if not left[i])
    order = []
    while ready:
        pick = min(ready, key=lambda i: (0 if submit[i] else 1 if feeds[i] and not wait[i]
                                         else 2 if not wait[i] else 3, i))
        ready.remove(pick)
        order.append(pick)
        for u in users[pick]:
            left[u] -= 1
            if not left[u]:
                ready.append(u)
        ready.sort()
    return [bindings[i] for i in order]


def _in_order(bindings: list, waits: dict) -> list:
    """Non-dataflow block: each wait right before the first binding that uses its var."""
    out, pending = [], dict(waits)      # var -> wait binding
    for b in bindings:
        for v in list(pending):
            if v in _uses(b):
                out.append(pending.pop(v))
        out.append(b)
    return out + list(pending.values())


def make_async(mod):
    """Rewrite every ``run_plan`` binding of ``mod``'s Relax functions into submit + wait
    (module docstring). Returns the new module; one without QPU regions comes back unchanged."""
    import tvm
    from tvm import relax
    bb = relax.BlockBuilder()
    changed = False
    funcs = {}
    for gv, func in mod.functions.items():
        if not isinstance(func, relax.Function) or not isinstance(func.body, relax.SeqExpr):
            funcs[gv] = func
            continue
        blocks = []
        for block in func.body.blocks:
            dataflow = isinstance(block, relax.DataflowBlock)
            new, waits = [], {}
            for b in block.bindings:
                if isinstance(b, relax.VarBinding) and is_run_plan(b.value):
                    s, w = _split(b, dataflow, bb)
                    new += [s, w] if dataflow else [s]
                    if not dataflow:
                        waits[w.var] = w
                    changed = True
                else:
                    new.append(b)
            if dataflow:
                blocks.append(relax.DataflowBlock(_schedule(new)))
            else:
                blocks.append(relax.BindingBlock(_in_order(new, waits)))
        body = relax.SeqExpr(blocks, func.body.body)
        funcs[gv] = relax.Function(func.params, body, func.ret_ty, func.is_pure, func.attrs)
    if not changed:
        return mod
    out = tvm.IRModule(funcs, attrs=mod.attrs)
    return relax.transform.Normalize()(out)
