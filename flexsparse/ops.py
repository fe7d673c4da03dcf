"""``torch.library`` registration of flexsparse's Triton kernels (namespace ``flexsparse``).

Each kernel launcher of :mod:`flexsparse.kernels` is registered once, as an operator with an
exact fake (meta) implementation, so ``torch.compile(fullgraph=True)`` traces calls to it
without a graph break:

* CUDA builds: ``torch.library.triton_op``. Inductor decomposes the op into its Triton kernel
  launches (the launcher runs with every Triton kernel of its module wrapped by
  ``torch.library.wrap_triton``) and schedules them like its own kernels.
* ``TRITON_INTERPRET=1`` (CPU CI) or no Triton: an opaque ``torch.library.custom_op``. Tracing a
  ``triton_op`` would reach the interpreted kernel with fake tensors; the opaque op only runs its
  fake implementation while tracing and the interpreted kernels when the compiled code runs.

The choice is made once, when this module is imported (set ``TRITON_INTERPRET`` before). The
patterns import this module lazily, so ``import flexsparse`` imports neither Triton nor Inductor.

Operators (all outputs freshly allocated, int32 unless said; no input is mutated):

* ``sorted_layout(keys [R,N], nb, L, align, invalid_pos, with_bucket)`` -> ``src [R,L]``,
  ``dst [R,N]``, ``pos [R,L]``, ``bkt [R,L]`` (``[R,0]`` without ``with_bucket``), ``flags [R]``.
* ``block_stats(pos [B,H,N], bucket [B,H,N]?, block_size, skip_negative)`` -> int64
  ``[B,H,nBlocks,4]``.
* ``sorted_block_states(q_stats [B,Hq,nQ,4], k_stats [B,Hkv,nKV,4], groups)`` -> int8
  ``[B,Hq,nQ,nKV]``.
* ``scatter_block_lists(num [B,H,nQ], idx [B,H,nQ,W], full_num?, full_idx?, n_kv)`` -> int8
  ``states [B,H,nQ,n_kv]``, ``flags [B*H*nQ]``.
* ``compact_block_states(states [B,H,nQ,nKV] int8)`` -> one int32 workspace holding the eight
  BlockMask lists and the flags (:func:`compact_block_states` returns them as views).
* ``gather_rows(x [B,H,M,D], idx [B,H,L], back [B,H,M])`` -> ``[B,H,L,D]`` in ``x.dtype``, with
  a registered autograd formula (the gradient is the gather by ``back``).
* ``split_block_lists(workspace, B, H, nQ, nKV)`` (always opaque, no Triton): the eight lists as
  separate tensors; used only while compiling with opaque ops (see below).
* ``router_tau(q [B,Hq,N,D], kbar [B,Hkv,nF,D], chunk_size, zscale, max_iter)`` -> float32
  ``tau [B,Hq,N]`` (DashAttention router threshold).
* ``router_pbar(q, kbar, tau, chunk_size, zscale)`` -> float32 ``pbar [B,Hkv,N,nF]``.
* ``router_backward(q, kbar, tau, dpbar [B,Hkv,N,nF], chunk_size, zscale, dq_float32=False)`` ->
  ``dq`` (like ``q``, contiguous; float32 with ``dq_float32``), float32 ``dkbar [B,Hkv,nF,D]``,
  float32 ``r [B,Hq,N]``. The router's autograd lives in :mod:`flexsparse.patterns.router` (an
  ``autograd.Function`` over these ops).
* ``dash_mask_tables(p [B,Hkv,N,nF], chunk_size, q_block, groups, with_counts, with_table,
  estimate_diagonal, sigma, filler, limit)`` -> int8 ``states [B,Hkv*groups,nQ,nC]``, int32
  ``counts [B,Hkv,N]``, float32 ``table [B,Hkv,nC,N]``; an output that was not asked for is an
  empty ``[0]`` tensor (:func:`dash_mask_tables` maps it back to None).
* ``dash_attn_forward(q [B,Hq,N,D], k, v [B,Hkv,N,D], kbar [B,Hkv,nF,D], tau [B,Hq,N],
  chunk_size, zscale, scale, estimate_diagonal, sigma)`` -> ``out [B,Hq,N,D]`` (``q.dtype``),
  float32 ``lse [B,Hq,N]``, float32 ``mu [B,Hkv,N]`` (``[B,Hkv,0]`` without
  ``estimate_diagonal``), int32 ``counts [B,Hkv,N]`` (fused DashAttention stage 2).
* ``dash_attn_backward(q, k, v, kbar, tau, out, lse, mu, dout, chunk_size, zscale, scale,
  estimate_diagonal, sigma)`` -> float32 ``dq [B,Hq,N,D]``, ``dk``, ``dv [B,Hkv,N,D]`` (``k.dtype``),
  float32 ``dpbar [B,Hkv,N,nF]``. The autograd of both lives in
  :mod:`flexsparse.patterns.dash_triton`. The launchers' tile overrides (``blocks``) are not op
  arguments: the wrappers take them in eager mode only (direct launches).

The Python functions below have the launchers' signatures and are what the patterns call.
Outside ``torch.compile`` they call the launchers directly: going through the dispatcher costs
tens of microseconds of host time per call, and the eager mask build is bound by host time
(measured on the H100: drop-80% fwd+bwd at 16k went from 4.8 to 6.1 ms through the ops). To
register another launcher: write a fake with exact output shapes/dtypes, an op body that calls
``_launcher(module.launcher)(...)`` with annotated arguments, and decorate it with
``@_register(name, kernel_module, fake)``; outputs must be fresh tensors, not views of inputs.
"""

import os
import types
from collections.abc import Callable
from typing import Optional

import torch
from torch import Tensor

__all__ = [
    "OPAQUE",
    "sorted_layout",
    "block_stats",
    "sorted_block_states",
    "scatter_block_lists",
    "compact_block_states",
    "gather_rows",
    "router_tau",
    "router_pbar",
    "router_backward",
    "dash_mask_tables",
    "dash_attn_forward",
    "dash_attn_backward",
]


def _has_triton() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


#: True when the ops are opaque ``custom_op``s (``TRITON_INTERPRET=1`` or no Triton), False when
#: they are ``triton_op``s that Inductor traces into.
OPAQUE = os.environ.get("TRITON_INTERPRET", "0") == "1" or not _has_triton()


# ----------------------------------------------------------------------------------------------
# registration machinery


def _rebind(fn: types.FunctionType, globs: dict) -> types.FunctionType:
    new = types.FunctionType(fn.__code__, globs, fn.__name__, fn.__defaults__, fn.__closure__)
    new.__kwdefaults__ = fn.__kwdefaults__
    return new


def _traceable(launcher: types.FunctionType) -> types.FunctionType:
    """A copy of ``launcher`` whose module globals show every Triton kernel wrapped by
    ``wrap_triton`` (so the launches become traceable higher-order ops); plain functions of the
    same module are rebound alike, so helpers that launch kernels are covered too. The module
    itself is left untouched."""
    from torch.library import wrap_triton
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

    src = launcher.__globals__
    globs = dict(src)
    for name, value in src.items():
        if isinstance(value, (JITFunction, Autotuner)):
            globs[name] = wrap_triton(value)
        elif isinstance(value, types.FunctionType) and value.__globals__ is src:
            globs[name] = _rebind(value, globs)
    return _rebind(launcher, globs)


def _launcher(launcher: types.FunctionType) -> Callable:
    """The launcher to run inside an op body: as is when executing (``triton_op`` turns
    ``wrap_triton`` off for real tensors; opaque ops always execute), traceable while Inductor
    decomposes a ``triton_op``."""
    if OPAQUE:
        return launcher
    from torch._library.triton import is_wrap_triton_enabled

    return _traceable(launcher) if is_wrap_triton_enabled() else launcher


def _register(name: str, kernel_module: str, fake: Callable, *, opaque: bool = False) -> Callable:
    """Register ``fn`` as ``flexsparse::name`` (``triton_op`` or opaque ``custom_op``) with the
    explicit fake implementation ``fake``. ``opaque=True`` keeps the op opaque on CUDA too:
    Inductor then calls it as an external kernel instead of tracing its launches."""

    def deco(fn: Callable):
        qualname = f"flexsparse::{name}"
        if OPAQUE or opaque:
            op = torch.library.custom_op(qualname, fn, mutates_args=())
        else:
            op = torch.library.triton_op(qualname, fn, mutates_args=())
            _record_kernels(qualname, kernel_module)
        op.register_fake(fake)
        return op

    return deco


def _record_kernels(qualname: str, kernel_module: str) -> None:
    """Tell AOTAutograd's cache which Triton kernels a ``triton_op`` runs (it cannot find them
    through the launcher), so editing a kernel invalidates cached compiled graphs."""
    import importlib

    from triton.runtime.jit import JITFunction

    mod = importlib.import_module(f"flexsparse.kernels.{kernel_module}")
    kernels = [v for v in vars(mod).values() if isinstance(v, JITFunction)]
    try:
        from torch._library import triton as lib_triton

        lib_triton.triton_ops_to_kernels[qualname] = kernels
    except (ImportError, AttributeError):  # private table: a cache-key detail only
        pass


def _kernels(module: str):
    import importlib

    return importlib.import_module(f"flexsparse.kernels.{module}")


def _eager(*tensors: Tensor | None) -> bool:
    """Call the launcher directly: not tracing, on plain tensors. The registered op only matters
    to tracers: Dynamo, and also make_fx / AOTAutograd / non-strict export, fake-tensor shape
    propagation and functorch transforms, which do not set ``is_compiling`` but run inside a
    dispatch mode or an interpreter, or pass tensor subclasses (fake, functional)."""
    if torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack():
        return False
    if torch._C._functorch.peek_interpreter_stack() is not None:
        return False
    return all(t is None or type(t) is Tensor or type(t) is torch.nn.Parameter for t in tensors)


# ----------------------------------------------------------------------------------------------
# sorted layout (counting sort)


def _sorted_layout_fake(keys, nb, L, align, invalid_pos, with_bucket):
    R, N = keys.shape
    new = lambda *s: keys.new_empty(s, dtype=torch.int32)  # noqa: E731
    return new(R, L), new(R, N), new(R, L), new(R, L if with_bucket else 0), new(R)


@_register("sorted_layout", "layout", _sorted_layout_fake)
def _sorted_layout_op(
    keys: Tensor, nb: int, L: int, align: int, invalid_pos: int, with_bucket: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    fn = _launcher(_kernels("layout").sorted_layout)
    src, dst, pos, bkt, flags = fn(keys, nb, L, align=align, invalid_pos=invalid_pos, with_bucket=with_bucket)
    if bkt is None:
        bkt = keys.new_empty((keys.shape[0], 0), dtype=torch.int32)
    return src, dst, pos, bkt, flags


def sorted_layout(
    keys: Tensor, nb: int, L: int, *, align: int = 0, invalid_pos: int = -1, with_bucket: bool = True
) -> tuple[Tensor, Tensor, Tensor, Tensor | None, Tensor]:
    """Registered :func:`flexsparse.kernels.layout.sorted_layout`: ``(src [R, L], dst [R, N],
    pos [R, L], bkt [R, L] | None, flags [R])``, all int32, for integer ``keys [R, N]``."""
    if _eager(keys):
        return _kernels("layout").sorted_layout(keys, nb, L, align=align, invalid_pos=invalid_pos, with_bucket=with_bucket)
    src, dst, pos, bkt, flags = torch.ops.flexsparse.sorted_layout(keys, nb, L, align, invalid_pos, with_bucket)
    return src, dst, pos, (bkt if with_bucket else None), flags


# ----------------------------------------------------------------------------------------------
# block statistics and states of sorted layouts


def _block_stats_fake(pos, bucket, block_size, skip_negative):
    B, H, N = pos.shape
    return pos.new_empty((B, H, -(-N // block_size), 4), dtype=torch.int64)


@_register("block_stats", "hash", _block_stats_fake)
def _block_stats_op(pos: Tensor, bucket: Optional[Tensor], block_size: int, skip_negative: bool) -> Tensor:
    return _launcher(_kernels("hash").block_stats)(pos, bucket, block_size, skip_negative)


def block_stats(pos: Tensor, bucket: Tensor | None, block_size: int, skip_negative: bool = False) -> Tensor:
    """Registered :func:`flexsparse.kernels.hash.block_stats`: int64 ``[B, H, nBlocks, 4]`` =
    (pos_min, pos_max, bucket_min, bucket_max) per block of ``pos [B, H, N]`` (and ``bucket``)."""
    if _eager(pos, bucket):
        return _kernels("hash").block_stats(pos, bucket, block_size, skip_negative)
    return torch.ops.flexsparse.block_stats(pos, bucket, block_size, skip_negative)


def _sorted_block_states_fake(q_stats, k_stats, groups):
    B, Hq, nQ, _ = q_stats.shape
    return q_stats.new_empty((B, Hq, nQ, k_stats.shape[2]), dtype=torch.int8)


@_register("sorted_block_states", "hash", _sorted_block_states_fake)
def _sorted_block_states_op(q_stats: Tensor, k_stats: Tensor, groups: int) -> Tensor:
    return _launcher(_kernels("hash").sorted_block_states)(q_stats, k_stats, groups)


def sorted_block_states(q_stats: Tensor, k_stats: Tensor, groups: int) -> Tensor:
    """Registered :func:`flexsparse.kernels.hash.sorted_block_states`: int8 ``[B, Hq, nQ, nKV]``
    block states from int64 ``q_stats [B, Hq, nQ, 4]`` and ``k_stats [B, Hkv, nKV, 4]``."""
    if _eager(q_stats, k_stats):
        return _kernels("hash").sorted_block_states(q_stats, k_stats, groups)
    return torch.ops.flexsparse.sorted_block_states(q_stats, k_stats, groups)


# ----------------------------------------------------------------------------------------------
# block lists <-> block states


def _scatter_fake(num, idx, full_num, full_idx, n_kv):
    B, H, nQ, _ = idx.shape
    return idx.new_empty((B, H, nQ, n_kv), dtype=torch.int8), idx.new_empty((B * H * nQ,), dtype=torch.int32)


@_register("scatter_block_lists", "blockmask", _scatter_fake)
def _scatter_op(
    num: Tensor, idx: Tensor, full_num: Optional[Tensor], full_idx: Optional[Tensor], n_kv: int
) -> tuple[Tensor, Tensor]:
    states, flags = _scatter_fake(num, idx, full_num, full_idx, n_kv)
    _launcher(_kernels("blockmask").scatter_block_lists)(num, idx, full_num, full_idx, states, flags)
    return states, flags


def scatter_block_lists(
    num: Tensor, idx: Tensor, full_num: Tensor | None, full_idx: Tensor | None, n_kv: int
) -> tuple[Tensor, Tensor]:
    """Registered :func:`flexsparse.kernels.blockmask.scatter_block_lists`: ``(states, flags)``,
    the int8 state map ``[B, H, nQ, n_kv]`` of int32 contiguous lists ``num [B, H, nQ]``,
    ``idx [B, H, nQ, W]`` (and the optional full lists), and int32 ``flags [B*H*nQ]`` (1 where a
    row held an invalid index or count)."""
    if _eager(num, idx, full_num, full_idx):
        return _scatter_eager(num, idx, full_num, full_idx, n_kv)
    return torch.ops.flexsparse.scatter_block_lists(num, idx, full_num, full_idx, n_kv)


def _scatter_eager(num, idx, full_num, full_idx, n_kv):
    states, flags = _scatter_fake(num, idx, full_num, full_idx, n_kv)
    _kernels("blockmask").scatter_block_lists(num, idx, full_num, full_idx, states, flags)
    return states, flags


def _round4(n):
    return -(-n // 4) * 4


def _workspace_layout(B, H, nQ, nKV):
    """``(views, flags_view, total)``: the int32 layout of
    :class:`flexsparse.kernels.blockmask.Workspace` (the compaction kernel computes the same
    offsets) up to its compaction flags, as ``(shape, stride, offset)`` triples (eight lists,
    then the flags) and the length in elements. Regions are rounded up to 4 elements; the
    rounding padding is never written."""
    BH = B * H
    n_q, n_kv, n_map = _round4(BH * nQ), _round4(BH * nKV), _round4(BH * nQ * nKV)
    num_kv = ((B, H, nQ), (H * nQ, nQ, 1), n_q)
    idx_kv = ((B, H, nQ, nKV), (H * nQ * nKV, nQ * nKV, nKV, 1), n_map)
    num_q = ((B, H, nKV), (H * nKV, nKV, 1), n_kv)
    idx_q = ((B, H, nKV, nQ), (H * nKV * nQ, nKV * nQ, nQ, 1), n_map)
    off, views = 0, []
    for shape, stride, size in (num_kv, idx_kv, num_kv, idx_kv, num_q, idx_q, num_q, idx_q):
        views.append((shape, stride, off))
        off += size
    flags = ((BH * (nQ + nKV),), (1,), off)
    return views, flags, off + _round4(BH * (nQ + nKV))


def _compact_fake(states):
    return states.new_empty((_workspace_layout(*states.shape)[2],), dtype=torch.int32)


@_register("compact_block_states", "blockmask", _compact_fake)
def _compact_op(states: Tensor) -> Tensor:
    # one plain int32 buffer written by the kernel (no dtype view or slices of a bigger
    # allocation inside the op: Inductor replayed such views wrongly on the H100, which gave
    # wrong backward lists and gradients in compiled training); carved into views outside
    base = torch.empty(_workspace_layout(*states.shape)[2], dtype=torch.int32, device=states.device)
    _launcher(_kernels("blockmask").compact_block_states)(states, base)
    return base


def compact_block_states(states: Tensor) -> tuple[tuple[Tensor, ...], Tensor]:
    """Registered :func:`flexsparse.kernels.blockmask.compact_block_states`: ``(lists, flags)``
    for a contiguous int8 state map ``[B, H, nQ, nKV]``.

    ``lists`` are the eight int32 contiguous BlockMask tensors ``kv_num [B,H,nQ]``,
    ``kv_idx [B,H,nQ,nKV]``, ``full_kv_*`` alike, ``q_num [B,H,nKV]``, ``q_idx [B,H,nKV,nQ]``,
    ``full_q_*`` alike; ``flags`` int32 ``[B*H*(nQ+nKV)]`` is 1 for each output row that met a
    state outside {0, 1, 2}. All are views of the op's one output buffer."""
    if _eager(states):
        km = _kernels("blockmask")
        ws = km.Workspace(*states.shape, states.device, with_states=False)
        km.compact_block_states(states, ws)
        return ws.lists, ws.compact_flags
    base = torch.ops.flexsparse.compact_block_states(states)
    views, (fshape, fstride, foff), _ = _workspace_layout(*states.shape)
    if OPAQUE and torch.compiler.is_compiling():
        lists = torch.ops.flexsparse.split_block_lists(base, *states.shape)
    else:
        lists = tuple(base.as_strided(shape, stride, off) for shape, stride, off in views)
    return lists, base.as_strided(fshape, fstride, foff)


# Inductor's CPU FlexAttention template (torch 2.13) names its pointer arguments by storage
# buffer, so BlockMask lists that are views of one buffer collide there (C++ compile error); the
# Triton template handles such views. Under compile with opaque ops (the CPU interpreter path),
# the lists are therefore copied into separate buffers by an opaque op (Inductor removes plain
# clones).


def _split_fake(base, B, H, nQ, nKV):
    return tuple(base.new_empty(shape) for shape, _, _ in _workspace_layout(B, H, nQ, nKV)[0])


@torch.library.custom_op("flexsparse::split_block_lists", mutates_args=())
def _split_op(base: Tensor, B: int, H: int, nQ: int, nKV: int) -> tuple[
    Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor
]:
    views = _workspace_layout(B, H, nQ, nKV)[0]
    return tuple(base.as_strided(shape, stride, off).clone() for shape, stride, off in views)


_split_op.register_fake(_split_fake)


# ----------------------------------------------------------------------------------------------
# row gather with inverse-gather backward


def _gather_fake(x, idx, back):
    B, H, _, D = x.shape
    return x.new_empty((B, H, idx.shape[-1], D))


@_register("gather_rows", "permute", _gather_fake)
def _gather_op(x: Tensor, idx: Tensor, back: Tensor) -> Tensor:
    return _launcher(_kernels("permute").gather_rows)(x, idx)


def _gather_setup(ctx, inputs, output):
    _, idx, back = inputs
    ctx.save_for_backward(idx, back)


def _gather_backward(ctx, grad):
    idx, back = ctx.saved_tensors
    return torch.ops.flexsparse.gather_rows(grad, back, idx), None, None


_gather_op.register_autograd(_gather_backward, setup_context=_gather_setup)


def gather_rows(x: Tensor, idx: Tensor, back: Tensor) -> Tensor:
    """Registered, differentiable :func:`flexsparse.kernels.permute.gather_rows`.

    ``out[b,h,i] = x[b,h,idx[b,h,i]]`` (zero rows where ``idx`` is outside ``[0, M)``):
    contiguous ``[B, H, L, D]`` from ``x [B, H, M, D]`` and int ``idx [B, H, L]``. ``idx`` must be
    injective on its in-range entries and ``back [B, H, M]`` its inverse (``back[b,h,j]`` = the
    row of ``out`` that row ``j`` of ``x`` went to, out of range where none): the gradient of
    ``x`` is then the gather of the output gradient by ``back``."""
    if _eager(x, idx, back):
        return _EagerGather.apply(x, idx, back)
    return torch.ops.flexsparse.gather_rows(x, idx, back)


class _EagerGather(torch.autograd.Function):
    """The registered gather's autograd formula, launching the kernel directly (eager mode)."""

    @staticmethod
    def forward(ctx, x, idx, back):
        ctx.save_for_backward(idx, back)
        return _kernels("permute").gather_rows(x, idx)

    @staticmethod
    def backward(ctx, grad):
        idx, back = ctx.saved_tensors
        return gather_rows(grad, back, idx), None, None


# ----------------------------------------------------------------------------------------------
# DashAttention router (1.5-entmax over past chunks)


def _router_tau_fake(q, kbar, chunk_size, zscale, max_iter):
    B, Hq, N, _ = q.shape
    return q.new_empty((B, Hq, N), dtype=torch.float32)


@_register("router_tau", "router", _router_tau_fake)
def _router_tau_op(q: Tensor, kbar: Tensor, chunk_size: int, zscale: float, max_iter: int) -> Tensor:
    return _launcher(_kernels("router").router_tau)(q, kbar, chunk_size, zscale, max_iter=max_iter)


def router_tau(q: Tensor, kbar: Tensor, chunk_size: int, zscale: float, *, max_iter: int = 40) -> Tensor:
    """Registered :func:`flexsparse.kernels.router.router_tau`: float32 ``tau [B, Hq, N]`` for
    ``q [B, Hq, N, D]`` and chunk summaries ``kbar [B, Hkv, N // C, D]`` (one dtype), ``zscale =
    gamma * scale``; ``+inf`` on rows without a past chunk; ``max_iter`` solver passes at most
    (40 = ``kernels.router.MAX_ITER``). No gradient."""
    if _eager(q, kbar):
        return _kernels("router").router_tau(q, kbar, chunk_size, zscale, max_iter=max_iter)
    return torch.ops.flexsparse.router_tau(q.detach(), kbar.detach(), chunk_size, zscale, max_iter)


def _router_pbar_fake(q, kbar, tau, chunk_size, zscale):
    B, N = q.shape[0], q.shape[2]
    Hkv, nF = kbar.shape[1], kbar.shape[2]
    return q.new_empty((B, Hkv, N, nF), dtype=torch.float32)


@_register("router_pbar", "router", _router_pbar_fake)
def _router_pbar_op(q: Tensor, kbar: Tensor, tau: Tensor, chunk_size: int, zscale: float) -> Tensor:
    return _launcher(_kernels("router").router_pbar)(q, kbar, tau, chunk_size, zscale)


def router_pbar(q: Tensor, kbar: Tensor, tau: Tensor, chunk_size: int, zscale: float) -> Tensor:
    """Registered :func:`flexsparse.kernels.router.router_pbar`: the GQA-mean entmax
    probabilities, float32 contiguous ``[B, Hkv, N, N // C]`` (0 where ``c >= i // C``), from
    ``tau`` (float32 ``[B, Hq, N]``). Not differentiable by itself (see
    :mod:`flexsparse.patterns.router`)."""
    if _eager(q, kbar, tau):
        return _kernels("router").router_pbar(q, kbar, tau, chunk_size, zscale)
    return torch.ops.flexsparse.router_pbar(q.detach(), kbar.detach(), tau.detach(), chunk_size, zscale)


def _router_backward_allocs(q, kbar, dq_float32):
    B, Hq, N, D = q.shape
    Hkv, nF = kbar.shape[1], kbar.shape[2]
    f32 = torch.float32
    dq = q.new_empty((B, Hq, N, D), dtype=f32 if dq_float32 else q.dtype)
    return dq, q.new_empty((B, Hkv, nF, D), dtype=f32), q.new_empty((B, Hq, N), dtype=f32)


def _router_backward_fake(q, kbar, tau, dpbar, chunk_size, zscale, dq_float32=False):
    return _router_backward_allocs(q, kbar, dq_float32)


@_register("router_backward", "router", _router_backward_fake)
def _router_backward_op(
    q: Tensor, kbar: Tensor, tau: Tensor, dpbar: Tensor, chunk_size: int, zscale: float, dq_float32: bool = False
) -> tuple[Tensor, Tensor, Tensor]:
    fn = _launcher(_kernels("router").router_backward)
    return fn(q, kbar, tau, dpbar, chunk_size, zscale, outs=_router_backward_allocs(q, kbar, dq_float32))


def router_backward(
    q: Tensor, kbar: Tensor, tau: Tensor, dpbar: Tensor, chunk_size: int, zscale: float, *, dq_float32: bool = False
) -> tuple[Tensor, Tensor, Tensor]:
    """Registered :func:`flexsparse.kernels.router.router_backward`: ``(dq, dkbar, r)`` =
    ``dq [B, Hq, N, D]`` contiguous in ``q.dtype`` (float32 with ``dq_float32``: to be summed
    with another float32 gradient before one rounding), float32 ``dkbar [B, Hkv, N // C, D]`` and
    float32 ``r [B, Hq, N]``, for the gradient ``dpbar [B, Hkv, N, N // C]`` of ``router_pbar``."""
    if _eager(q, kbar, tau, dpbar):
        outs = _router_backward_allocs(q, kbar, dq_float32) if dq_float32 else None
        return _kernels("router").router_backward(q, kbar, tau, dpbar, chunk_size, zscale, outs=outs)
    return torch.ops.flexsparse.router_backward(
        q.detach(), kbar.detach(), tau.detach(), dpbar.detach(), chunk_size, zscale, dq_float32
    )


# ----------------------------------------------------------------------------------------------
# DashAttention block states, row counts and prior table


def _dash_mask_fake(p, chunk_size, q_block, groups, with_counts, with_table, estimate_diagonal, sigma, filler, limit):
    B, Hkv, N, _ = p.shape
    nC, nQ = -(-N // chunk_size), -(-N // q_block)
    states = p.new_empty((B, Hkv * groups, nQ, nC), dtype=torch.int8)
    counts = p.new_empty((B, Hkv, N) if with_counts else (0,), dtype=torch.int32)
    table = p.new_empty((B, Hkv, nC, N) if with_table else (0,), dtype=torch.float32)
    return states, counts, table


# Opaque on CUDA too. The prior table is read by the FlexAttention score_mod/mask_mod as a
# captured buffer; when it came out of a triton_op, Inductor (torch 2.11) inlined the buffer's
# allocation (`empty`, i.e. NaN) into the attention template instead of reading what the kernel
# wrote: NaN outputs and wrong masks in compiled DashAttention on the H100, while eager and
# AOTAutograd without Inductor were right. As an external kernel its outputs are plain buffers.
@_register("dash_mask_tables", "dash_mask", _dash_mask_fake, opaque=True)
def _dash_mask_op(
    p: Tensor,
    chunk_size: int,
    q_block: int,
    groups: int,
    with_counts: bool,
    with_table: bool,
    estimate_diagonal: bool,
    sigma: float,
    filler: float,
    limit: float,
) -> tuple[Tensor, Tensor, Tensor]:
    fn = _launcher(_kernels("dash_mask").dash_mask_tables)
    states, counts, table = fn(
        p, chunk_size=chunk_size, q_block=q_block, groups=groups, with_counts=with_counts, with_table=with_table,
        estimate_diagonal=estimate_diagonal, sigma=sigma, filler=filler, limit=limit,
    )
    if counts is None:
        counts = p.new_empty((0,), dtype=torch.int32)
    if table is None:
        table = p.new_empty((0,), dtype=torch.float32)
    return states, counts, table


def dash_mask_tables(
    p: Tensor,
    *,
    chunk_size: int,
    q_block: int,
    groups: int,
    with_counts: bool = False,
    with_table: bool = True,
    estimate_diagonal: bool = False,
    sigma: float = 1.0,
    filler: float = -1.0e30,
    limit: float = 1.0e25,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Registered :func:`flexsparse.kernels.dash_mask.dash_mask_tables`: ``(states, counts,
    table)`` = int8 ``[B, Hkv * groups, ceil(N / q_block), ceil(N / C)]``, int32 ``[B, Hkv, N]``
    (None without ``with_counts``) and the float32 chunk-major prior table ``[B, Hkv, ceil(N / C),
    N]`` (None without ``with_table``) of a selection ``p [B, Hkv, N, N // C]``. Not
    differentiable (see ``flexsparse.patterns.dash``)."""
    if _eager(p):
        return _kernels("dash_mask").dash_mask_tables(
            p, chunk_size=chunk_size, q_block=q_block, groups=groups, with_counts=with_counts, with_table=with_table,
            estimate_diagonal=estimate_diagonal, sigma=sigma, filler=filler, limit=limit,
        )
    states, counts, table = torch.ops.flexsparse.dash_mask_tables(
        p.detach(), chunk_size, q_block, groups, with_counts, with_table, estimate_diagonal, sigma, filler, limit
    )
    return states, (counts if with_counts else None), (table if with_table else None)


# ----------------------------------------------------------------------------------------------
# DashAttention stage 2 (fused router + attention kernels)


def _dash_attn_forward_fake(q, k, v, kbar, tau, chunk_size, zscale, scale, estimate_diagonal, sigma):
    B, Hq, N, D = q.shape
    Hkv = k.shape[1]
    f32 = torch.float32
    return (
        q.new_empty((B, Hq, N, D)),
        q.new_empty((B, Hq, N), dtype=f32),
        q.new_empty((B, Hkv, N if estimate_diagonal else 0), dtype=f32),
        q.new_empty((B, Hkv, N), dtype=torch.int32),
    )


@_register("dash_attn_forward", "dash_attn", _dash_attn_forward_fake)
def _dash_attn_forward_op(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    kbar: Tensor,
    tau: Tensor,
    chunk_size: int,
    zscale: float,
    scale: float,
    estimate_diagonal: bool,
    sigma: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    fn = _launcher(_kernels("dash_attn").dash_attn_forward)
    return fn(q, k, v, kbar, tau, chunk_size, zscale, scale, estimate_diagonal=estimate_diagonal, sigma=sigma)


def _eager_only_blocks(blocks, *tensors: Tensor | None) -> bool:
    """True when ``blocks`` (tile overrides) is given: they are launcher arguments, not op
    arguments, so they run eager only."""
    if blocks is None:
        return False
    if not _eager(*tensors):
        raise ValueError(
            "tile overrides (blocks) of the DashAttention kernels work in eager mode only (they are not "
            "arguments of the registered ops): drop them under torch.compile and other tracers"
        )
    return True


def dash_attn_forward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    kbar: Tensor,
    tau: Tensor,
    chunk_size: int,
    zscale: float,
    scale: float,
    *,
    estimate_diagonal: bool = False,
    sigma: float = 1.0,
    blocks: dict | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Registered :func:`flexsparse.kernels.dash_attn.dash_attn_forward`: ``(out, lse, mu,
    counts)`` = ``out [B, Hq, N, D]`` in ``q.dtype``, float32 base-2 ``lse [B, Hq, N]``, float32
    ``mu [B, Hkv, N]`` (``[B, Hkv, 0]`` without ``estimate_diagonal``) and int32 ``counts [B, Hkv,
    N]``, for ``q [B, Hq, N, D]``, ``k, v [B, Hkv, N, D]``, ``kbar [B, Hkv, N // C, D]`` (one dtype)
    and float32 ``tau [B, Hq, N]``. Not differentiable by itself (see
    :mod:`flexsparse.patterns.dash_triton`). ``blocks`` (tile overrides, see
    :func:`flexsparse.kernels.dash_attn.attn_config`): eager only (raises ``ValueError`` while
    tracing)."""
    if _eager_only_blocks(blocks, q, k, v, kbar, tau) or _eager(q, k, v, kbar, tau):
        return _kernels("dash_attn").dash_attn_forward(
            q, k, v, kbar, tau, chunk_size, zscale, scale, estimate_diagonal=estimate_diagonal, sigma=sigma,
            blocks=blocks,
        )
    return torch.ops.flexsparse.dash_attn_forward(
        q.detach(), k.detach(), v.detach(), kbar.detach(), tau.detach(), chunk_size, float(zscale), float(scale),
        bool(estimate_diagonal), float(sigma),
    )


def _dash_attn_backward_fake(q, k, v, kbar, tau, out, lse, mu, dout, chunk_size, zscale, scale, estimate_diagonal,
                             sigma):
    B, Hq, N, D = q.shape
    Hkv, nF = k.shape[1], kbar.shape[2]
    f32 = torch.float32
    return (
        q.new_empty((B, Hq, N, D), dtype=f32),
        q.new_empty((B, Hkv, N, D), dtype=k.dtype),
        q.new_empty((B, Hkv, N, D), dtype=v.dtype),
        q.new_empty((B, Hkv, N, nF), dtype=f32),
    )


@_register("dash_attn_backward", "dash_attn", _dash_attn_backward_fake)
def _dash_attn_backward_op(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    kbar: Tensor,
    tau: Tensor,
    out: Tensor,
    lse: Tensor,
    mu: Tensor,
    dout: Tensor,
    chunk_size: int,
    zscale: float,
    scale: float,
    estimate_diagonal: bool,
    sigma: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    fn = _launcher(_kernels("dash_attn").dash_attn_backward)
    return fn(q, k, v, kbar, tau, out, lse, mu, dout, chunk_size, zscale, scale, estimate_diagonal=estimate_diagonal,
              sigma=sigma)


def dash_attn_backward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    kbar: Tensor,
    tau: Tensor,
    out: Tensor,
    lse: Tensor,
    mu: Tensor,
    dout: Tensor,
    chunk_size: int,
    zscale: float,
    scale: float,
    *,
    estimate_diagonal: bool = False,
    sigma: float = 1.0,
    blocks: dict | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Registered :func:`flexsparse.kernels.dash_attn.dash_attn_backward`: ``(dq, dk, dv,
    dpbar)`` = float32 ``dq [B, Hq, N, D]`` (attention part), ``dk, dv [B, Hkv, N, D]`` in
    ``k.dtype`` and float32 ``dpbar [B, Hkv, N, N // C]`` (the router's input gradient, for
    :func:`router_backward`), from the forward's inputs, its ``out, lse, mu`` and ``dout [B, Hq,
    N, D]``. ``blocks``: eager only, as in :func:`dash_attn_forward`."""
    tensors = (q, k, v, kbar, tau, out, lse, mu, dout)
    if _eager_only_blocks(blocks, *tensors) or _eager(*tensors):
        return _kernels("dash_attn").dash_attn_backward(
            *tensors, chunk_size, zscale, scale, estimate_diagonal=estimate_diagonal, sigma=sigma, blocks=blocks,
        )
    return torch.ops.flexsparse.dash_attn_backward(
        *(t.detach() for t in tensors), chunk_size, float(zscale), float(scale), bool(estimate_diagonal), float(sigma),
    )
