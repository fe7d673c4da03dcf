"""torch.compile: registered Triton ops (fake impls, both registration paths) and whole models of
flexsparse layers under ``torch.compile(fullgraph=True)``.

CPU (Triton interpreter): the ops are opaque ``custom_op``s; tiny transformers compile without
graph breaks and match eager (SCFA layers; DashAttention entmax and top-k layers: one compiled
signature each, ~50-100 s here); the Triton router and mask-table kernels trace with their
autograd under AOTAutograd. The ``triton_op`` path (CUDA builds) is traced on the CPU in a
subprocess without the interpreter: every op must decompose into Triton kernel calls. GPU: the
same models in bf16 train 4 steps compiled, one frame compile for all steps, losses and
gradients as eager.
"""

import os
import subprocess
import sys

import pytest
import torch
import torch._dynamo.testing

from flexsparse import ops
from flexsparse.testing import assert_close_to_ref

from models import TinyTransformer, dash_layer, lm_loss, random_attn_inputs, tiny_model

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")

SKIP_COMPILE = os.environ.get("FLEXSPARSE_SKIP_COMPILE") == "1"


def _bijection(B, H, M, L, device):
    """``(idx [B,H,L], back [B,H,M])``: slots 0..L-5 read distinct rows, 4 slots read none (M)."""
    perm = torch.stack([torch.randperm(M, device=device) for _ in range(B * H)]).view(B, H, M)
    idx = perm[..., :L].clone()
    idx[..., -4:] = M
    back = torch.full((B, H, M), L, device=device)
    back.scatter_(-1, idx[..., :-4], torch.arange(L - 4, device=device).expand(B, H, L - 4).contiguous())
    return idx.int(), back.int()


def _op_samples(device):
    """One or more argument tuples per registered op (shapes off powers of two; B*H a multiple of
    4 for compact_block_states, whose rounding padding is never written)."""
    keys = torch.randint(-1, 3, (6, 37), dtype=torch.int32, device=device)
    pos = torch.randint(-1, 50, (2, 4, 37), dtype=torch.int32, device=device)
    bkt = torch.randint(0, 3, (2, 4, 37), dtype=torch.int32, device=device)
    q_stats = ops.block_stats(pos, bkt, 8, True)
    k_stats = ops.block_stats(pos[:, :2], bkt[:, :2], 16)
    num = torch.randint(0, 4, (2, 2, 5), dtype=torch.int32, device=device)
    idx = torch.randint(0, 3, (2, 2, 5, 4), dtype=torch.int32, device=device)
    states = torch.randint(0, 3, (2, 2, 5, 3), dtype=torch.int8, device=device)
    x = torch.randn(2, 3, 21, 8, device=device, requires_grad=True)
    g_idx, g_back = _bijection(2, 3, 21, 17, device)
    return {
        "sorted_layout": [(keys, 3, 48, 8, -1, True), (keys, 1, 30, 0, 37, False)],
        "block_stats": [(pos, bkt, 8, True), (pos, None, 16, False)],
        "sorted_block_states": [(q_stats, k_stats, 2)],
        "scatter_block_lists": [(num, idx, num, idx, 3), (num, idx, None, None, 3)],
        "compact_block_states": [(states,)],
        "split_block_lists": [(torch.ops.flexsparse.compact_block_states(states), 2, 2, 5, 3)],
        "gather_rows": [(x, g_idx, g_back)],
        **_dash_samples(device),
    }


def _dash_samples(device):
    """Arguments of the DashAttention ops: odd lengths, a trailing partial chunk, GQA."""
    B, Hq, Hkv, N, D, C = 2, 4, 2, 37, 16, 8
    q = torch.randn(B, Hq, N, D, device=device)
    kbar = torch.randn(B, Hkv, N // C, D, device=device)
    zs = 0.4
    tau = ops.router_tau(q, kbar, C, zs)
    pbar = ops.router_pbar(q, kbar, tau, C, zs)
    dpbar = torch.randn_like(pbar)
    sel = (torch.rand_like(pbar) < 0.5).float()
    mask = lambda p, cnt, tab, est, sigma: (p, C, 16, 2, cnt, tab, est, sigma, -1.0e30, 1.0e25)  # noqa: E731
    # the fused attention kernels (stage 2): both prior modes
    k, v = torch.randn(B, Hkv, N, D, device=device), torch.randn(B, Hkv, N, D, device=device)
    attn_fwd = [(q, k, v, kbar, tau, C, zs, 0.25, est, sigma) for est, sigma in ((False, 1.0), (True, 0.7))]
    attn_bwd = []
    for args in attn_fwd:
        out, lse, mu, _ = ops.dash_attn_forward(*args[:8], estimate_diagonal=args[8], sigma=args[9])
        attn_bwd.append((*args[:5], out, lse, mu, torch.randn_like(out), *args[5:]))
    return {
        "router_tau": [(q, kbar, C, zs, 40), (q.half(), kbar.half(), C, zs, 3)],
        "router_pbar": [(q, kbar, tau, C, zs)],
        "router_backward": [(q, kbar, tau, dpbar, C, zs), (q, kbar, tau, dpbar, C, zs, True)],
        "dash_attn_forward": attn_fwd,
        "dash_attn_backward": attn_bwd,
        "dash_mask_tables": [
            mask(pbar, True, True, False, 1.0),
            mask(pbar, False, True, True, 0.5),
            mask(sel, True, False, False, 1.0),
            mask(sel, False, False, False, 1.0),
        ],
    }


@pytest.mark.parametrize(
    "name",
    [
        "sorted_layout",
        "block_stats",
        "sorted_block_states",
        "scatter_block_lists",
        "compact_block_states",
        "split_block_lists",
        "gather_rows",
        "router_tau",
        "router_pbar",
        "router_backward",
        "dash_mask_tables",
        "dash_attn_forward",
        "dash_attn_backward",
    ],
)
def test_opcheck(name, device):
    """Schema, fake impl (exact shapes/dtypes/strides), autograd registration and AOT dispatch
    (gradients too for gather_rows) of every registered op."""
    op = getattr(torch.ops.flexsparse, name).default
    samples = _op_samples(device)
    for args in samples[name]:
        torch.library.opcheck(op, args)


def test_registration_path_and_op_outputs(device):
    """CPU suite: opaque custom ops; CUDA without the interpreter: triton_op. The ops return what
    the launchers return (an empty bucket without ``with_bucket``; the compaction buffer carved
    by ``ops._workspace_layout`` gives the Workspace's views)."""
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    assert ops.OPAQUE == interpret
    from flexsparse.kernels.blockmask import Workspace, compact_block_states
    from flexsparse.kernels.layout import sorted_layout

    keys = torch.randint(-1, 4, (3, 45), dtype=torch.int32, device=device)
    got = torch.ops.flexsparse.sorted_layout(keys, 4, 50, 0, 45, False)
    want = sorted_layout(keys, 4, 50, invalid_pos=45, with_bucket=False)
    assert want[3] is None and got[3].shape == (3, 0)
    for g, w in zip(got[:3] + got[4:], want[:3] + want[4:]):
        assert torch.equal(g, w)
    for shape in [(1, 1, 1, 1), (2, 3, 5, 7), (1, 2, 9, 4)]:
        states = torch.randint(0, 3, shape, dtype=torch.int8, device=device)
        states[0, 0, 0, 0] = 5  # an invalid state: flagged
        base = torch.ops.flexsparse.compact_block_states(states)
        views, flag_view, total = ops._workspace_layout(*shape)
        assert base.shape == (total,)
        ws = Workspace(*shape, states.device, with_states=False)
        compact_block_states(states, ws)
        for (shp, stride, off), w in zip(views + [flag_view], list(ws.lists) + [ws.compact_flags]):
            assert (shp, stride, off) == (tuple(w.shape), w.stride(), w.storage_offset())
            assert torch.equal(base.as_strided(shp, stride, off), w)
        assert ws.compact_flags[0] == 1
        split = torch.ops.flexsparse.split_block_lists(base, *shape)
        for t, w in zip(split, ws.lists):
            assert t.is_contiguous() and torch.equal(t, w)


def test_wrappers_use_the_ops_under_any_tracer(device):
    """Outside tracing the wrappers launch the kernels directly (host time); under a tracer that
    is not Dynamo (make_fx with fake tensors here, as AOTAutograd and export use) they must go
    through the registered ops, never hand fake tensors to a launcher."""
    from torch.fx.experimental.proxy_tensor import make_fx

    keys = torch.randint(-1, 3, (4, 37), dtype=torch.int32, device=device)
    x = torch.randn(2, 3, 21, 8, device=device)
    idx, back = _bijection(2, 3, 21, 17, device)

    def f(keys, x, idx, back):
        src, dst, pos, bkt, flags = ops.sorted_layout(keys, 3, 40)
        stats = ops.block_stats(pos.view(2, 2, 40), bkt.view(2, 2, 40), 8)
        lists, _ = ops.compact_block_states(ops.sorted_block_states(stats, stats, 1))
        return src, lists[1], ops.gather_rows(x, idx, back)

    gm = make_fx(f, tracing_mode="fake")(keys, x, idx, back)
    for name in ("sorted_layout", "block_stats", "sorted_block_states", "compact_block_states", "gather_rows"):
        assert f"flexsparse.{name}" in gm.code, name
    got, want = gm(keys, x, idx, back), f(keys, x, idx, back)
    for g, w in zip(got, want):
        assert torch.equal(g, w)


def test_dash_ops_match_launchers_and_trace(device):
    """The DashAttention ops return what the launchers return (bitwise), with ``[0]``-shaped
    tensors for the mask outputs that were not asked for; the wrappers launch directly in eager
    mode, go through the ops under a tracer (make_fx with fake tensors) and map the empty
    outputs back to None."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from flexsparse.kernels import router as K
    from flexsparse.kernels.dash_mask import dash_mask_tables

    B, Hq, Hkv, N, D, C = 1, 4, 2, 45, 16, 8
    q = torch.randn(B, Hq, N, D, device=device)
    kbar = torch.randn(B, Hkv, N // C, D, device=device)
    tau = torch.ops.flexsparse.router_tau(q, kbar, C, 0.5, 40)
    assert torch.equal(tau, K.router_tau(q, kbar, C, 0.5))
    pbar = torch.ops.flexsparse.router_pbar(q, kbar, tau, C, 0.5)
    assert torch.equal(pbar, K.router_pbar(q, kbar, tau, C, 0.5))
    assert (pbar == 0).any() and (pbar > 0).any()
    dpbar = torch.randn_like(pbar)
    got = torch.ops.flexsparse.router_backward(q, kbar, tau, dpbar, C, 0.5)
    for g, w in zip(got, K.router_backward(q, kbar, tau, dpbar, C, 0.5)):
        assert torch.equal(g, w)
    for counts, table in [(False, False), (True, False), (False, True), (True, True)]:
        got = torch.ops.flexsparse.dash_mask_tables(pbar, C, 16, 2, counts, table, False, 1.0, -1.0e30, 1.0e25)
        want = dash_mask_tables(pbar, chunk_size=C, q_block=16, groups=2, with_counts=counts, with_table=table)
        for g, w in zip(got, want):
            assert g.shape == (0,) if w is None else torch.equal(g, w)

    def f(q, kbar):
        tau = ops.router_tau(q, kbar, C, 0.5)
        pbar = ops.router_pbar(q, kbar, tau, C, 0.5)
        dq, dkbar, _ = ops.router_backward(q, kbar, tau, pbar, C, 0.5)
        states, counts, table = ops.dash_mask_tables(pbar, chunk_size=C, q_block=16, groups=2)
        return dq, dkbar, states, counts, table

    gm = make_fx(f, tracing_mode="fake")(q, kbar)
    for name in ("router_tau", "router_pbar", "router_backward", "dash_mask_tables"):
        assert f"flexsparse.{name}" in gm.code, name
    got, want = gm(q, kbar), f(q, kbar)
    assert got[3] is None and want[3] is None
    for g, w in zip(got[:3] + got[4:], want[:3] + want[4:]):
        assert torch.equal(g, w)


# ---------------------------------------------------------------------------------------------
# the CUDA registration path, traced on the CPU


_TRACE_SCRIPT = r"""
import re
import torch
import triton
from triton.backends.compiler import GPUTarget
from torch._functorch.aot_autograd import aot_function
from torch._functorch.partitioners import default_partition
from flexsparse import ops
from flexsparse.kernels.layout import _count_kernel
from flexsparse.patterns.router import _TritonRouter


class _Sm90:
    # No GPU here: a target for Triton's TTIR, so that the kernels' mutation analysis runs as on
    # the H100 (without it every kernel argument counts as written)
    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)


triton.runtime.driver.set_active(_Sm90())

assert not ops.OPAQUE
assert _count_kernel in torch._library.triton.get_triton_kernels_for_op("flexsparse::sorted_layout")
graphs = {}

def partition(gm, inputs, **kw):  # training: the joint forward + backward graph
    graphs["joint"] = gm
    return default_partition(gm, inputs, **kw)

def fail(gm, inputs):
    graphs.setdefault("fw", gm)
    def run(*a):
        raise RuntimeError("traced only")
    return run

def trace(f, *args):
    # AOTAutograd decomposes each triton_op into its kernel launches (nothing runs: no GPU here)
    graphs.clear()
    try:
        aot_function(f, fw_compiler=fail, bw_compiler=fail, partition_fn=partition)(*args)
    except RuntimeError as e:
        assert "traced only" in str(e), e
    return graphs.get("joint", graphs["fw"]).code

keys = torch.randint(-1, 3, (4, 37), dtype=torch.int32)
pos = torch.randint(-1, 50, (2, 4, 37), dtype=torch.int32)
states = torch.randint(0, 3, (2, 2, 5, 3), dtype=torch.int8)
num = torch.randint(0, 4, (2, 2, 5), dtype=torch.int32)
idx = torch.randint(0, 3, (2, 2, 5, 4), dtype=torch.int32)
x = torch.randn(2, 3, 10, 4, requires_grad=True)
perm = torch.stack([torch.randperm(10) for _ in range(6)]).view(2, 3, 10)
back = torch.empty_like(perm).scatter_(-1, perm, torch.arange(10).expand(2, 3, 10).contiguous())

codes = {
    "layout": trace(lambda k: ops.sorted_layout(k, 3, 45, align=8)[:3], keys),
    "layout_nb": trace(lambda k: ops.sorted_layout(k, 1, 37, with_bucket=False)[:3], keys),
    "stats": trace(lambda p: ops.sorted_block_states(ops.block_stats(p, p, 8, True), ops.block_stats(p, None, 16), 2), pos),
    "lists": trace(lambda n, i: ops.compact_block_states(ops.scatter_block_lists(n, i, n, i, 3)[0])[0], num, idx),
    "compact": trace(lambda s: ops.compact_block_states(s)[0], states),
    "gather": trace(lambda x, i, b: ops.gather_rows(x, i, b).square(), x, perm, back),  # forward and backward
}
# DashAttention: router forward (tau, pbar) and backward (dq, dkbar in 2 row splits, then a sum);
# mask tables
q = torch.randn(1, 2, 300, 16, requires_grad=True)
kbar = torch.randn(1, 1, 9, 16, requires_grad=True)
p = torch.rand(2, 2, 37, 4)
codes["router"] = trace(lambda q, kb: _TritonRouter.apply(q, kb, 32, 0.3)[0].square(), q, kbar)
assert "'rows_per_split': 160" in codes["router"] and "aten.sum.dim_IntList" in codes["router"], codes["router"]
codes["dash_mask"] = trace(lambda p: ops.dash_mask_tables(p, chunk_size=8, q_block=16, groups=2)[::2], p)
codes["dash_mask_all"] = trace(
    lambda p: ops.dash_mask_tables(p, chunk_size=8, q_block=16, groups=2, with_counts=True, estimate_diagonal=True), p
)
# fused DashAttention (estimate_diagonal): forward, dq and dk/dv kernels, then the router's backward
from flexsparse.patterns.dash_triton import _DashTritonFn
qa = torch.randn(1, 4, 45, 16, requires_grad=True)
ka, va = torch.randn(1, 2, 45, 16, requires_grad=True), torch.randn(1, 2, 45, 16, requires_grad=True)
kba = torch.randn(1, 2, 5, 16, requires_grad=True)
codes["dash_attn"] = trace(
    lambda q, k, v, kb, t: _DashTritonFn.apply(q, k, v, kb, t, 8, 0.5, 0.25, True, 0.8, None)[0].square(),
    qa, ka, va, kba, torch.randn(1, 4, 45),
)
need = {"layout": 2, "layout_nb": 2, "stats": 2, "lists": 2, "gather": 2, "router": 4, "dash_attn": 5}
# the mask-table op is opaque on CUDA too (see flexsparse.ops): called as it is, not decomposed
for name in ("dash_mask", "dash_mask_all"):
    code = codes.pop(name)
    assert "flexsparse.dash_mask_tables" in code and "triton_kernel_wrapper" not in code, (name, code)
for name, code in codes.items():
    assert "flexsparse" not in code, (name, code)
    n = code.count("triton_kernel_wrapper_functional(")
    print(name, n)
    assert n >= need.get(name, 1), (name, code)
# the router's inputs are read only (the backward writes dq, r and dkbar, nothing saved)
written = set(", ".join(re.findall(r"tensors_to_clone = \[([^\]]*)\]", codes["router"])).split(", "))
assert written == {"'tau_ptr'", "'out_ptr'", "'r_ptr'", "'dq_ptr'", "'ws_ptr'"}, written
# the fused kernels write their outputs and scratch only. kb_ptr in the forward's list is the
# analysis being conservative: a store address (the compacted chunk slot) depends on the result of
# a call (_route_tile) that took kb_ptr, so the kernel counts as writing it; the kernel only reads
# kbar, and Inductor's clone of it costs one copy of the small [B, Hkv, N // C, D] summaries
clones = [set(c.split(", ")) for c in re.findall(r"tensors_to_clone = \[([^\]]*)\]", codes["dash_attn"])]
want = [{"kb_ptr", "o_ptr", "lse_ptr", "mu_ptr", "cnt_ptr", "ids_ptr", "lpt_ptr"},
        {"dq_ptr", "delta_ptr", "dpbar_ptr", "flag_ptr"}, {"dk_ptr", "dv_ptr"}, {"r_ptr", "dq_ptr"}, {"ws_ptr"}]
assert clones == [{f"'{n}'" for n in w} for w in want], clones
print("OK")
"""


def test_triton_op_path_decomposes_into_kernels():
    """Without the interpreter the ops are triton_ops: AOTAutograd (what Inductor compiles) sees
    the Triton kernel launches of every op, forward and the backwards of the gather, the
    DashAttention router and the fused DashAttention kernels, and no opaque op call (except the
    mask-table op, opaque on purpose); the kernels' mutation analysis (run against an sm_90
    target) marks only their outputs and scratch as written (one documented conservative extra);
    the AOTAutograd cache knows the kernels of each op."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    res = subprocess.run(
        [sys.executable, "-c", _TRACE_SCRIPT], env=env, cwd=root, capture_output=True, text=True, timeout=300
    )
    assert res.returncode == 0 and res.stdout.strip().endswith("OK"), res.stdout + res.stderr[-6000:]


# ---------------------------------------------------------------------------------------------
# whole models


@pytest.fixture
def fresh_dynamo():
    """Forget earlier compiles: after compiling a model at another length, Dynamo would mark the
    length dynamic (automatic dynamic shapes); these tests are about static shapes."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _shape(device):
    """``(B, N, block_size, dim)``: CPU FlexAttention takes any block size and head dim; the GPU
    kernels want 128-blocks (default kernel options) and head dims of at least 16."""
    return (2, 70, 16, 32) if device == "cpu" else (2, 300, 128, 128)


@pytest.mark.skipif(SKIP_COMPILE, reason="compile disabled")
def test_compiled_model_forward_matches_eager(device, fresh_dynamo):
    """Embedding + [hash (LSH buckets drawn inside, counting-sort op), query/key drop (keep masks
    given)] + head, compiled with fullgraph=True: equal to eager under no_grad, for two different
    inputs with a single frame compile."""
    B, N, bs, dim = _shape(device)
    model = tiny_model(["hash", "qk"], dim=dim, block_size=bs).to(device).eval()
    counter = torch._dynamo.testing.CompileCounterWithBackend("inductor")
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    for _ in range(2):
        tokens = torch.randint(0, 61, (B, N), device=device)
        inputs = random_attn_inputs(model, B, N, device)
        inputs[0] = {}  # the hash layer draws its own LSH buckets
        with torch.no_grad():
            want = model(tokens, inputs)
            got = compiled(tokens, inputs)
        assert got.shape == (B, N, 61)
        assert_close_to_ref("logits", got, want, floor=1e-4 if device == "cpu" else 1e-3)
        assert counter.frame_count == 1


def test_every_layer_mode_traces_without_graph_breaks(device, fresh_dynamo):
    """Dynamo alone (eager backend: cheap, no Inductor): hash layers with LSH and with given
    buckets (sort path), drop layers drawing their keep masks inside (capacity from the rate,
    device-side check) and with given masks, all in one graph; same output as eager, RNG included."""
    _, _, bs, dim = _shape(device)
    B, N = (1, 45) if device == "cpu" else (1, 300)
    model = tiny_model(["hash", "qk", "hash", "qk"], dim=dim, block_size=bs).to(device).eval()
    counter = torch._dynamo.testing.CompileCounter()
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    tokens = torch.randint(0, 61, (B, N), device=device)
    inputs = random_attn_inputs(model, B, N, device)
    inputs[0], inputs[1] = {}, {}  # LSH buckets, random keep masks drawn inside
    seed = int(torch.randint(0, 2**31, ()))
    with torch.no_grad():
        torch.manual_seed(seed)
        want = model(tokens, inputs)
        torch.manual_seed(seed)
        got = compiled(tokens, inputs)
    assert counter.frame_count == 1
    assert_close_to_ref("logits", got, want, floor=1e-5 if device == "cpu" else 1e-3)


def _dash_stats(model):
    return [{k: v.clone() for k, v in b.attn.last_stats.items()} for b in model.blocks]


@pytest.mark.skipif(SKIP_COMPILE, reason="compile disabled")
def test_compiled_dash_model_forward_matches_eager(device, fresh_dynamo):
    """Embedding + [DashAttention (entmax router), DashAttention (top-1 router)] + head, compiled
    with fullgraph=True (one Inductor compile, ~100 s here): equal to eager under no_grad for two
    inputs, the layers' sparsity statistics (a module attribute set in forward, from the mask
    kernel's row counts) too; the selections really drop chunks."""
    B, N, bs, dim = _shape(device)
    model = tiny_model(["dash", "dash_topk"], dim=dim, block_size=bs).to(device).eval()
    counter = torch._dynamo.testing.CompileCounterWithBackend("inductor")
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    for _ in range(2):
        tokens = torch.randint(0, 61, (B, N), device=device)
        with torch.no_grad():
            want = model(tokens)
            want_stats = _dash_stats(model)
            got = compiled(tokens)
            got_stats = _dash_stats(model)
        assert got.shape == (B, N, 61)
        assert_close_to_ref("logits", got, want, floor=1e-4 if device == "cpu" else 1e-3)
        assert counter.frame_count == 1
        for g, w in zip(got_stats, want_stats):
            for name in ("kept_fraction", "sparsity"):
                torch.testing.assert_close(g[name], w[name], rtol=1e-5, atol=1e-6)
            assert w["kept_fraction"] < 0.99, w  # not a dense mask


def test_dash_model_new_length_compiles_once_more(device, fresh_dynamo):
    """A second sequence length recompiles the dash model once with a symbolic length (automatic
    dynamic shapes: the ops' fakes and the layer's checks take symbolic sizes), a third one
    reuses that graph; AOTAutograd with eager kernels (no Inductor), outputs equal to eager.
    (``dynamic=True``, which also makes the layer's float and int attributes symbolic, is not
    supported by the flexsparse layers.)"""
    _, _, bs, dim = _shape(device)
    model = tiny_model(["dash"], dim=dim, block_size=bs).to(device).eval()
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    lengths = (37, 50, 67) if device == "cpu" else (300, 700, 1001)
    for i, N in enumerate(lengths):
        tokens = torch.randint(0, 61, (1, N), device=device)
        with torch.no_grad():
            want = model(tokens)
            got = compiled(tokens)
        assert counter.frame_count == min(i + 1, 2), (N, counter.frame_count)
        assert_close_to_ref("logits", got, want, floor=1e-5 if device == "cpu" else 1e-3)


class _GraphRecorder:
    """A Dynamo backend: counts frames, keeps each Dynamo graph's code, runs AOTAutograd
    (functionalisation, fake tensors, the joint forward-backward graph) with eager kernels."""

    def __init__(self):
        self.frame_count, self.codes = 0, []

    def __call__(self, gm, inputs):
        from torch._dynamo.backends.debugging import aot_eager

        self.frame_count += 1
        self.codes.append(gm.print_readable(print_output=False))
        return aot_eager(gm, inputs)


@pytest.mark.triton
def test_dash_router_and_mask_compile_with_autograd(device, fresh_dynamo):
    """The Triton router (autograd.Function over the router ops) and the fused mask tables
    (autograd.Function over the mask op) under torch.compile(fullgraph=True) with AOTAutograd:
    one graph calling the registered ops; outputs, BlockMask lists and the gradients of q and
    kbar through pbar and the prior table equal eager."""
    from flexsparse.patterns.dash import dash_block_mask
    from flexsparse.patterns.router import entmax_router

    B, Hq, Hkv, N, D, C, qb = 1, 4, 2, 77, 16, 8, 16
    q = torch.randn(B, Hq, N, D, device=device, requires_grad=True)
    kbar = torch.randn(B, Hkv, N // C, D, device=device, requires_grad=True)
    w_p = torch.randn(B, Hkv, N, N // C, device=device)
    w_t = torch.randn(B, Hkv, -(-N // C), N, device=device)

    def f(q, kbar):
        pbar = entmax_router(q, kbar, chunk_size=C, gamma=3.0, impl="triton")
        dm = dash_block_mask(pbar, N, chunk_size=C, groups=Hq // Hkv, q_block=qb, with_counts=True, impl="triton")
        loss = (pbar * w_p).sum() + (dm.table.clamp(min=-30.0) * w_t).sum()
        bm = dm.block_mask
        return loss, dm.states, dm.counts, bm.kv_num_blocks, bm.kv_indices, bm.full_q_indices

    rec = _GraphRecorder()
    got = torch.compile(f, backend=rec, fullgraph=True)(q, kbar)
    got_grads = torch.autograd.grad(got[0], (q, kbar))
    want = f(q, kbar)
    want_grads = torch.autograd.grad(want[0], (q, kbar))
    assert rec.frame_count == 1
    code = "\n".join(rec.codes)
    for name in ("router_tau", "router_pbar", "router_backward", "dash_mask_tables"):
        assert f"flexsparse.{name}" in code, name
    past = torch.arange(N, device=device) // C  # past chunks of each row
    assert (want[2] < past).any() and (want[2] > 1).any()  # the router drops chunks, keeps several
    for g, w in zip(got + got_grads, want + want_grads):
        assert torch.equal(g, w)


def test_dash_attn_ops_match_launchers_and_trace(device):
    """The fused DashAttention ops return what the launchers return (bitwise), both prior modes;
    the wrappers go through the ops under a tracer (make_fx with fake tensors), the router
    backward with a float32 ``dq`` too; the launchers' tile overrides are refused while tracing."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from flexsparse.kernels import dash_attn as K

    B, Hq, Hkv, N, D, C = 1, 4, 2, 45, 16, 8
    q = torch.randn(B, Hq, N, D, device=device)
    k, v = torch.randn(B, Hkv, N, D, device=device), torch.randn(B, Hkv, N, D, device=device)
    kbar = torch.randn(B, Hkv, N // C, D, device=device)
    tau = ops.router_tau(q, kbar, C, 0.5)
    dout = torch.randn_like(q)
    for est, sigma in ((False, 1.0), (True, 0.6)):
        got = torch.ops.flexsparse.dash_attn_forward(q, k, v, kbar, tau, C, 0.5, 0.25, est, sigma)
        want = K.dash_attn_forward(q, k, v, kbar, tau, C, 0.5, 0.25, estimate_diagonal=est, sigma=sigma)
        for g, w in zip(got, want):
            assert g.shape == w.shape and g.dtype == w.dtype and torch.equal(g, w)
        got = torch.ops.flexsparse.dash_attn_backward(q, k, v, kbar, tau, *want[:3], dout, C, 0.5, 0.25, est, sigma)
        want = K.dash_attn_backward(q, k, v, kbar, tau, *want[:3], dout, C, 0.5, 0.25, estimate_diagonal=est,
                                    sigma=sigma)
        for g, w in zip(got, want):
            assert g.dtype == w.dtype and torch.equal(g, w)

    def f(q, k, v, kbar, tau, dout):
        kw = dict(estimate_diagonal=True, sigma=0.6)
        out, lse, mu, counts = ops.dash_attn_forward(q, k, v, kbar, tau, C, 0.5, 0.25, **kw)
        dq, dk, dv, dpbar = ops.dash_attn_backward(q, k, v, kbar, tau, out, lse, mu, dout, C, 0.5, 0.25, **kw)
        dq_r, dkbar, _ = ops.router_backward(q.half(), kbar.half(), tau, dpbar, C, 0.5, dq_float32=True)
        return out, counts, dq, dk, dv, dpbar, dq_r, dkbar

    args = (q, k, v, kbar, tau, dout)
    gm = make_fx(f, tracing_mode="fake")(*args)
    for name in ("dash_attn_forward", "dash_attn_backward", "router_backward"):
        assert f"flexsparse.{name}" in gm.code, name
    got, want = gm(*args), f(*args)
    assert want[6].dtype == torch.float32  # dq_float32 with a half q
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and torch.equal(g, w)
    with pytest.raises(ValueError, match="eager mode only"):
        make_fx(lambda *a: ops.dash_attn_forward(*a, C, 0.5, 0.25, blocks={"BLOCK_N": 16}), tracing_mode="fake")(
            q, k, v, kbar, tau
        )


class _AOTRecorder:
    """A Dynamo backend: counts frames and runs AOTAutograd with eager kernels, keeping the code of
    its forward and backward graphs."""

    def __init__(self):
        self.frame_count, self.fw, self.bw = 0, [], []

    def __call__(self, gm, inputs):
        from functorch.compile import make_boxed_func
        from torch._dynamo.backends.common import aot_autograd

        def keep(codes):
            def compiler(g, _):
                codes.append(g.code)
                return make_boxed_func(g.forward)

            return compiler

        self.frame_count += 1
        return aot_autograd(fw_compiler=keep(self.fw), bw_compiler=keep(self.bw))(gm, inputs)


@pytest.mark.triton
@pytest.mark.parametrize("estimate_diagonal", [False, True])
def test_dash_triton_compiles_with_autograd(estimate_diagonal, device, fresh_dynamo):
    """dash_attention(backend="triton") under torch.compile(fullgraph=True) with AOTAutograd (eager
    kernels): one frame; the forward graph calls the router and fused attention ops, the backward
    graph the attention and router backward ops; output, kept fraction and the gradients of q, k,
    v and w equal eager (odd length, a partial last chunk, GQA)."""
    from flexsparse.functional import dash_attention

    B, Hq, Hkv, N, D, C = 1, 4, 2, 45, 16, 8
    q = torch.randn(B, Hq, N, D, device=device, requires_grad=True)
    k = torch.randn(B, Hkv, N, D, device=device, requires_grad=True)
    v = torch.randn(B, Hkv, N, D, device=device, requires_grad=True)
    w = (0.5 * torch.randn(Hkv, D, device=device)).requires_grad_()
    do = torch.randn(B, Hq, N, D, device=device)

    def f(q, k, v, w):
        # gamma 8: kept fraction <= 0.92 over 300 seeds (gamma 3 reached 0.994 on some seeds)
        out, stats = dash_attention(q, k, v, w, chunk_size=C, gamma=8.0, estimate_diagonal=estimate_diagonal,
                                    sigma=0.8, backend="triton", return_stats=True)
        return out, stats["kept_fraction"]

    rec = _AOTRecorder()
    got = torch.compile(f, backend=rec, fullgraph=True)(q, k, v, w)
    got_grads = torch.autograd.grad((got[0] * do).sum(), (q, k, v, w))
    want = f(q, k, v, w)
    want_grads = torch.autograd.grad((want[0] * do).sum(), (q, k, v, w))
    assert rec.frame_count == 1 and len(rec.fw) == 1 and len(rec.bw) == 1
    for name in ("router_tau", "dash_attn_forward"):
        assert f"flexsparse.{name}" in rec.fw[0], name
    for name in ("dash_attn_backward", "router_backward"):
        assert f"flexsparse.{name}" in rec.bw[0], name
    assert float(want[1]) < 0.99  # the router drops chunks
    for name, g, w_ in zip(("out", "kept", "dq", "dk", "dv", "dw"), got + got_grads, want + want_grads):
        assert torch.equal(g, w_), name
    assert want_grads[3].abs().sum() > 0  # the summary vector gets a gradient through the router


# ---------------------------------------------------------------------------------------------
# GPU: training a compiled model


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12))


def _apply(opt, params, grads) -> None:
    """One optimizer step with the given (compiled) gradients."""
    for p, g in zip(params, grads):
        p.grad = g
    opt.step()
    opt.zero_grad(set_to_none=True)


def _assert_sparse_stats_match(step, stats_c, stats_e) -> None:
    """Compiled and eager DashAttention layers kept the same fraction of chunks, a sparse one."""
    for sc, se in zip(stats_c, stats_e):
        assert abs(float(sc["kept_fraction"]) - float(se["kept_fraction"])) < 1e-2, (step, sc, se)
        assert float(se["kept_fraction"]) < 0.95, se  # a sparse selection, not a dense mask


@pytest.mark.gpu
def test_gpu_compiled_model_trains_like_eager(fresh_dynamo):
    """bf16 model (hash with given buckets, query/key drop with given keep masks), 4 training steps
    on fresh random inputs: one frame compile in all, and each step's loss and every parameter
    gradient equal to eager within bf16 tolerance."""
    B, N, bs, _ = _shape("cuda")
    model = tiny_model(["hash", "qk"], dim=256, heads=4, kv_heads=2, block_size=bs).cuda().bfloat16()
    counter = torch._dynamo.testing.CompileCounterWithBackend("inductor")
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.1)
    for step in range(4):
        tokens = torch.randint(0, 61, (B, N), device="cuda")
        inputs = random_attn_inputs(model, B, N, "cuda")
        loss_e = lm_loss(model(tokens, inputs), tokens)
        grads_e = torch.autograd.grad(loss_e, params)
        loss_c = lm_loss(compiled(tokens, inputs), tokens)
        grads_c = torch.autograd.grad(loss_c, params)
        assert counter.frame_count == 1, f"recompiled at step {step}"
        assert torch.isfinite(loss_c)
        assert abs(float(loss_c) - float(loss_e)) <= 1e-2 * abs(float(loss_e)), (step, float(loss_c), float(loss_e))
        for (name, _), gc, ge in zip(model.named_parameters(), grads_c, grads_e):
            assert torch.isfinite(gc).all(), name
            assert _rel_err(gc, ge) < 3e-2, (step, name, _rel_err(gc, ge))
        _apply(opt, params, grads_c)


@pytest.mark.gpu
def test_gpu_compiled_dash_model_trains_like_eager(fresh_dynamo):
    """bf16 model with DashAttention entmax layers on both CUDA backends (``auto`` = the fused
    Triton kernels, and FlexAttention) and a top-2 layer (FlexAttention), 4 training steps on
    fresh tokens under torch.compile(model, fullgraph=True): one frame compile in all; each step's
    loss, every parameter gradient (the entmax layers' summary vectors through the router and
    prior included) and the sparsity statistics equal to eager within bf16 tolerance.

    Chunks and query blocks of 128 keep FlexAttention on its default kernels: training with
    64-wide KV blocks needs max-autotune for the backward on torch 2.11, i.e. compiling the model
    with ``mode="max-autotune-no-cudagraphs"`` (eager dash_attention does that by itself)."""
    B, N, dim = 2, 1100, 256  # 8 full chunks and a partial one
    attns = [
        dash_layer(dim, 4, 2, chunk_size=128, q_block=128),
        dash_layer(dim, 4, 2, chunk_size=128, q_block=128, router="topk", top_k=2),
        dash_layer(dim, 4, 2, chunk_size=128, q_block=128, backend="flex"),
    ]
    model = TinyTransformer(61, dim, attns).cuda().bfloat16()
    counter = torch._dynamo.testing.CompileCounterWithBackend("inductor")
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    names, params = zip(*model.named_parameters())
    opt = torch.optim.SGD(params, lr=0.02)
    for step in range(4):
        tokens = torch.randint(0, 61, (B, N), device="cuda")
        loss_e = lm_loss(model(tokens), tokens)
        grads_e = torch.autograd.grad(loss_e, params, allow_unused=True)
        stats_e = _dash_stats(model)
        loss_c = lm_loss(compiled(tokens), tokens)
        grads_c = torch.autograd.grad(loss_c, params, allow_unused=True)
        stats_c = _dash_stats(model)
        assert counter.frame_count == 1, f"recompiled at step {step}"
        assert torch.isfinite(loss_c)
        assert abs(float(loss_c) - float(loss_e)) <= 1e-2 * abs(float(loss_e)), (step, float(loss_c), float(loss_e))
        for name, gc, ge in zip(names, grads_c, grads_e):
            if name == "blocks.1.attn.summary":  # the top-k router is not differentiable
                assert gc is None and ge is None, name
                continue
            assert gc is not None and torch.isfinite(gc).all(), name
            assert _rel_err(gc, ge) < 5e-2, (step, name, _rel_err(gc, ge))
        for entmax in ("blocks.0.attn.summary", "blocks.2.attn.summary"):
            assert grads_c[names.index(entmax)].abs().sum() > 0, entmax
        _assert_sparse_stats_match(step, stats_c, stats_e)
        _apply(opt, params, grads_c)


@pytest.mark.gpu
def test_gpu_compiled_dash_mask_inlines_triton_kernels(fresh_dynamo):
    """On CUDA the router ops are triton_ops: Inductor's code for a compiled router + mask build
    holds the router and compaction kernels themselves and calls the (opaque) mask-table op; the
    mask equals eager, the router probabilities and the prior table to float32 rounding."""
    from torch._inductor.utils import run_and_get_code

    from flexsparse.patterns.dash import dash_block_mask
    from flexsparse.patterns.router import entmax_router

    assert not ops.OPAQUE
    B, Hq, Hkv, N, D, C = 1, 4, 2, 1000, 64, 64
    q = torch.randn(B, Hq, N, D, device="cuda", dtype=torch.bfloat16)
    kbar = torch.randn(B, Hkv, N // C, D, device="cuda", dtype=torch.bfloat16)
    sel = (torch.rand(B, Hkv, N, N // C, device="cuda") < 0.4) * torch.rand(B, Hkv, N, N // C, device="cuda")

    def build(q, kbar, sel):
        # the router from (q, kbar); the mask from a given selection (Inductor compiles the user
        # kernels itself: floating-point results may differ in the last bits, which could flip
        # an entry of a selection computed in the graph)
        pbar = entmax_router(q, kbar, chunk_size=C, gamma=2.0)
        dm = dash_block_mask(sel, N, chunk_size=C, groups=Hq // Hkv, q_block=128, with_counts=True)
        return pbar, dm.table, dm.states, dm.counts, dm.block_mask.kv_indices, dm.block_mask.full_q_num_blocks

    out, codes = run_and_get_code(torch.compile(build, fullgraph=True), q, kbar, sel)
    want = build(q, kbar, sel)
    torch.testing.assert_close(out[0], want[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out[1], want[1], rtol=1e-6, atol=1e-6)
    for g, w in zip(out[2:], want[2:]):
        assert torch.equal(g, w)
    code = "\n".join(codes)
    # the mask-table op stays opaque on purpose (see flexsparse.ops): its outputs are captured
    # buffers of the FlexAttention mods, which Inductor mishandled when the op was traced
    assert "torch.ops.flexsparse.dash_mask_tables" in code
    assert "_dash_mask_kernel" not in code
    assert code.count("torch.ops.flexsparse") == code.count("torch.ops.flexsparse.dash_mask_tables")
    for kernel in ("_tau_kernel", "_pbar_kernel", "_compact_kernel"):
        assert kernel in code, kernel


@pytest.mark.gpu
@pytest.mark.parametrize("router,stats", [("entmax", False), ("entmax", True), ("topk", False)])
def test_gpu_compiled_dash_attention_matches_eager(router, stats, fresh_dynamo):
    """The whole flex path (summaries, router, mask tables, FlexAttention with the prior) compiled
    with Inductor equals eager. Without stats the mask kernel has unused pointers: they were once
    aliased to the states output, which came back unwritten (NaN outputs, wrong top-k masks)."""
    from flexsparse.patterns.dash import dash_attention_flex

    B, Hq, Hkv, N, D, C = 2, 4, 2, 1100, 64, 128
    q = torch.randn(B, Hq, N, D, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(B, Hkv, N, D, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(B, Hkv, N, D, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(Hkv, D, device="cuda", dtype=torch.bfloat16)
    kw = dict(chunk_size=C, q_block=128, router=router, return_stats=stats)
    kw.update(top_k=2) if router == "topk" else kw.update(gamma=16.0)

    def f(q, k, v, w):
        return dash_attention_flex(q, k, v, w, **kw)

    with torch.no_grad():
        want = f(q, k, v, w)
        got = torch.compile(f, fullgraph=True)(q, k, v, w)
    if stats:
        (got, got_stats), (want, want_stats) = got, want
        # same selection; the mean over rows may differ in the last bits (Inductor's reduction order)
        torch.testing.assert_close(got_stats["kept_fraction"], want_stats["kept_fraction"], rtol=1e-6, atol=0)
        assert float(want_stats["kept_fraction"]) < 0.95
    assert torch.isfinite(got).all()
    assert _rel_err(got, want) < 1e-2, _rel_err(got, want)


@pytest.mark.gpu
def test_gpu_compiled_model_draws_inside(fresh_dynamo):
    """bf16 model whose layers draw their own inputs inside the compiled graph (LSH buckets with
    the counting-sort op and aligned buckets, random keep masks with a capacity from the rate):
    4 training steps, one frame compile, finite losses and gradients that reach every parameter."""
    B, N, bs = 2, 2100, 128  # long enough for bucket alignment (n_buckets * 127 <= N / 4)
    model = tiny_model(["hash", "qk"], dim=256, heads=4, kv_heads=2, block_size=bs).cuda().bfloat16()
    counter = torch._dynamo.testing.CompileCounterWithBackend("inductor")
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(4):
        tokens = torch.randint(0, 61, (B, N), device="cuda")
        loss = lm_loss(compiled(tokens), tokens)
        loss.backward()
        assert counter.frame_count == 1, f"recompiled at step {step}"
        assert torch.isfinite(loss)
        for name, p in model.named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
        opt.step()
        opt.zero_grad(set_to_none=True)


@pytest.mark.gpu
def test_gpu_compiled_pattern_inlines_triton_kernels(fresh_dynamo):
    """On CUDA the ops are triton_ops: Inductor's code for a compiled mask build holds the Triton
    kernels themselves, not calls back into the flexsparse ops."""
    from torch._inductor.utils import run_and_get_code

    from flexsparse import drop_block_mask, hash_block_mask

    assert not ops.OPAQUE
    qb = torch.randint(0, 4, (1, 4, 500), device="cuda")
    kb = torch.randint(0, 4, (1, 2, 500), device="cuda")
    keep = torch.rand(1, 4, 500, device="cuda") < 0.5

    x = torch.randn(1, 4, 500, 64, device="cuda")

    def build(qb, kb, keep, x):
        h = hash_block_mask(qb, kb, n_buckets=4, block_size=128)
        d = drop_block_mask(keep, keep[:, :2], block_size=128, capacity=300)
        return h.block_mask.kv_indices, d.block_mask.q_indices, h.permute_q(x)

    out, codes = run_and_get_code(torch.compile(build, fullgraph=True), qb, kb, keep, x)
    want = build(qb, kb, keep, x)
    for g, w in zip(out, want):
        assert torch.equal(g, w)
    code = "\n".join(codes)
    assert "torch.ops.flexsparse" not in code
    for kernel in ("_block_stats_kernel", "_sorted_states_kernel", "_compact_kernel", "_gather_rows_kernel"):
        assert kernel in code, kernel


@pytest.mark.gpu
def test_gpu_compiled_dash_triton_model_trains_like_eager(fresh_dynamo):
    """bf16 model with two DashAttention(backend="triton") layers (GQA, both prior modes, a partial
    last chunk), 3 training steps under torch.compile(model, fullgraph=True) with Inductor: one
    frame compile in all; Inductor's code (forward and backward) holds the fused attention and
    router kernels, not calls of the flexsparse ops; each step's loss, every parameter gradient
    (the summary vectors through the router included) and the kept fractions equal to eager
    within bf16 tolerance."""
    from torch._inductor.utils import run_and_get_code

    from flexsparse import DashAttention

    assert not ops.OPAQUE
    B, N, dim = 2, 1100, 256  # chunks of 64: 17 full and a partial one

    def layer(**kw):
        attn = DashAttention(dim, 4, kv_heads=2, chunk_size=64, gamma=64.0, backend="triton", track_sparsity=True,
                             **kw)
        with torch.no_grad():
            attn.summary.normal_()  # a random summary vector: the router drops chunks at init
        return attn

    model = TinyTransformer(61, dim, [layer(), layer(estimate_diagonal=True, sigma=0.8)]).cuda().bfloat16()
    counter = torch._dynamo.testing.CompileCounterWithBackend("inductor")
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    names, params = zip(*model.named_parameters())
    opt = torch.optim.SGD(params, lr=0.02)

    def compiled_step(tokens):
        loss = lm_loss(compiled(tokens), tokens)
        return loss, torch.autograd.grad(loss, params)

    for step in range(3):
        tokens = torch.randint(0, 61, (B, N), device="cuda")
        loss_e = lm_loss(model(tokens), tokens)
        grads_e = torch.autograd.grad(loss_e, params)
        stats_e = _dash_stats(model)
        if step == 0:
            (loss_c, grads_c), codes = run_and_get_code(compiled_step, tokens)
            code = "\n".join(codes)
            assert "torch.ops.flexsparse" not in code
            for kernel in ("_tau_kernel", "_fwd_kernel", "_bwd_dq_kernel", "_bwd_dkdv_kernel", "_dq_kernel",
                           "_dkbar_kernel"):
                assert kernel in code, kernel
        else:
            loss_c, grads_c = compiled_step(tokens)
        stats_c = _dash_stats(model)
        assert counter.frame_count == 1, f"recompiled at step {step}"
        assert torch.isfinite(loss_c)
        assert abs(float(loss_c) - float(loss_e)) <= 1e-2 * abs(float(loss_e)), (step, float(loss_c), float(loss_e))
        for name, gc, ge in zip(names, grads_c, grads_e):
            assert torch.isfinite(gc).all(), name
            assert _rel_err(gc, ge) < 5e-2, (step, name, _rel_err(gc, ge))
        for i in range(2):
            assert grads_c[names.index(f"blocks.{i}.attn.summary")].abs().sum() > 0
        _assert_sparse_stats_match(step, stats_c, stats_e)
        _apply(opt, params, grads_c)
