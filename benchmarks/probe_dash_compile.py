"""Where does compiled DashAttention (flex path) differ from eager on the GPU? Each stage —
router, mask tables, FlexAttention forward, forward+backward, the module — is compiled alone
(Inductor, and AOTAutograd without Inductor) and compared with eager on the same inputs.
Debugging aid for issue 4 (a compiled DashAttention model gave a NaN loss on the H100).

    python benchmarks/probe_dash_compile.py [--n 1100] [--gamma 64]
"""

from __future__ import annotations

import argparse
import traceback

import torch

import flexsparse
from flexsparse import reference
from flexsparse.patterns.dash import dash_attention_flex, dash_block_mask
from flexsparse.patterns.router import entmax_router


def _cmp(name, got, want):
    got = got if isinstance(got, (tuple, list)) else (got,)
    want = want if isinstance(want, (tuple, list)) else (want,)
    parts = []
    for i, (g, w) in enumerate(zip(got, want)):
        if g is None or w is None:
            parts.append(f"[{i}] {'None' if g is None else 'set'} vs {'None' if w is None else 'set'}")
            continue
        g, w = g.float(), w.float()
        nan_g, nan_w = int(torch.isnan(g).sum()), int(torch.isnan(w).sum())
        fin = torch.isfinite(g) & torch.isfinite(w)
        err = float((g[fin] - w[fin]).norm() / w[fin].norm().clamp_min(1e-12)) if fin.any() else float("nan")
        parts.append(f"[{i}] nan {nan_g}/{nan_w} rel {err:.2e}")
    print(f"{name:34s} " + "  ".join(parts), flush=True)


def _stage(name, fn, args, backends=("inductor", "aot_eager")):
    want = fn(*args)
    for be in backends:
        torch._dynamo.reset()
        try:
            got = torch.compile(fn, backend=be, fullgraph=True)(*args)
            _cmp(f"{name} [{be}]", got, want)
        except Exception:  # noqa: BLE001 (report and go on to the next stage)
            print(f"{name} [{be}] FAILED\n{traceback.format_exc(limit=3)}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1100)
    ap.add_argument("--gamma", type=float, default=64.0)
    ap.add_argument("--chunk", type=int, default=128)
    ap.add_argument("--isolate", action="store_true", help="only the FlexAttention-call variants")
    ap.add_argument("--out", default=None, help="write Inductor's code of the variants here")
    a = ap.parse_args()
    if a.isolate:
        isolate(a.out)
        return
    torch.manual_seed(0)
    dev, dt = "cuda", torch.bfloat16
    B, Hq, Hkv, N, D, C = 2, 4, 2, a.n, 64, a.chunk
    q = torch.randn(B, Hq, N, D, device=dev, dtype=dt)
    k = torch.randn(B, Hkv, N, D, device=dev, dtype=dt)
    v = torch.randn(B, Hkv, N, D, device=dev, dtype=dt)
    w = torch.randn(Hkv, D, device=dev, dtype=dt)
    kbar = reference.chunk_summaries(k, w, C)
    g = a.gamma

    _stage("router", lambda q, kb: entmax_router(q, kb, chunk_size=C, gamma=g), (q, kbar))
    pbar = entmax_router(q, kbar, chunk_size=C, gamma=g)

    def mask(p):
        dm = dash_block_mask(p, N, chunk_size=C, groups=Hq // Hkv, q_block=128, with_counts=True)
        return dm.table, dm.states, dm.counts, dm.block_mask.kv_num_blocks, dm.block_mask.kv_indices

    _stage("mask tables", mask, (pbar,))

    def fwd(q, k, v, w):
        return dash_attention_flex(q, k, v, w, chunk_size=C, gamma=g, q_block=128)

    with torch.no_grad():
        _stage("flex forward (no grad)", fwd, (q, k, v, w))

    # grads are taken outside the compiled region (compile of autograd.grad is a graph break)
    def loss_fn(q, k, v, w):
        return dash_attention_flex(q, k, v, w, chunk_size=C, gamma=g, q_block=128)

    ins = [t.detach().requires_grad_() for t in (q, k, v, w)]
    o_e = loss_fn(*ins)
    gr_e = torch.autograd.grad(o_e.float().square().sum(), ins)
    for be in ("inductor", "aot_eager"):
        torch._dynamo.reset()
        try:
            o_c = torch.compile(loss_fn, backend=be, fullgraph=True)(*ins)
            _cmp(f"flex fwd (grad mode) [{be}]", o_c, o_e)
            gr_c = torch.autograd.grad(o_c.float().square().sum(), ins)
            _cmp(f"flex bwd dq dk dv dw [{be}]", gr_c, gr_e)
        except Exception:  # noqa: BLE001 (report and go on to the next stage)
            print(f"flex fwd+bwd [{be}] FAILED\n{traceback.format_exc(limit=3)}", flush=True)

    # the prior without the router: a fixed pbar through the table into FlexAttention
    def prior_only(q, k, v, p):
        dm = dash_block_mask(p, N, chunk_size=C, groups=Hq // Hkv, q_block=128)
        return torch.nn.attention.flex_attention.flex_attention(
            q, k, v, score_mod=dm.score_mod, block_mask=dm.block_mask, enable_gqa=True
        )

    p_in = pbar.detach().float().requires_grad_()
    qi, ki, vi = (t.detach().requires_grad_() for t in (q, k, v))
    for be in ("inductor", "aot_eager"):
        torch._dynamo.reset()
        try:
            o_c = torch.compile(prior_only, backend=be, fullgraph=True)(qi, ki, vi, p_in)
            o_ref = torch.compile(prior_only, backend="eager", fullgraph=True)(qi, ki, vi, p_in) if be == "inductor" else None
            if o_ref is not None:
                _cmp("prior-only flex [inductor vs eager-backend]", o_c, o_ref)
            print(f"prior-only flex [{be}] nan {int(torch.isnan(o_c.float()).sum())}", flush=True)
            gr = torch.autograd.grad(o_c.float().square().sum(), (qi, ki, vi, p_in))
            print(f"prior-only grads [{be}] nan " + " ".join(str(int(torch.isnan(x.float()).sum())) for x in gr), flush=True)
        except Exception:  # noqa: BLE001 (report and go on to the next stage)
            print(f"prior-only [{be}] FAILED\n{traceback.format_exc(limit=3)}", flush=True)

    for router in ("entmax", "topk"):
        torch.manual_seed(1)
        layer = flexsparse.DashAttention(256, 4, kv_heads=2, chunk_size=C, q_block=128, gamma=g, router=router,
                                         top_k=2 if router == "topk" else None).cuda().to(dt)
        with torch.no_grad():
            layer.summary.normal_()
        x = torch.randn(B, N, 256, device=dev, dtype=dt)
        y_e = layer(x)
        ge = torch.autograd.grad(y_e.float().square().mean(), list(layer.parameters()), allow_unused=True)
        for be in ("inductor", "aot_eager"):
            torch._dynamo.reset()
            try:
                y_c = torch.compile(layer, backend=be, fullgraph=True)(x)
                _cmp(f"module {router} fwd [{be}]", y_c, y_e)
                gc = torch.autograd.grad(y_c.float().square().mean(), list(layer.parameters()), allow_unused=True)
                _cmp(f"module {router} grads [{be}]", gc, ge)
            except Exception:  # noqa: BLE001 (report and go on to the next stage)
                print(f"module {router} [{be}] FAILED\n{traceback.format_exc(limit=3)}", flush=True)


def isolate(out_dir: str | None) -> None:
    """Variants of one compiled FlexAttention call with the DashAttention mask/prior, to find the
    piece Inductor gets wrong: mask impl (triton op / torch), tables made inside or outside the
    graph, mask_mod reading the table or only causal, score_mod on or off."""
    from torch._inductor.utils import run_and_get_code
    from torch.nn.attention.flex_attention import flex_attention

    torch.manual_seed(0)
    B, Hq, Hkv, N, D, C = 2, 4, 2, 1100, 64, 128
    q, k, v = (torch.randn(B, h, N, D, device="cuda", dtype=torch.bfloat16) for h in (Hq, Hkv, Hkv))
    w = torch.randn(Hkv, D, device="cuda", dtype=torch.bfloat16)
    pbar = entmax_router(q, reference.chunk_summaries(k, w, C), chunk_size=C, gamma=16.0).float()

    def make(impl, with_prior=True, exact=True):
        def f(q, k, v, p):
            dm = dash_block_mask(p, N, chunk_size=C, groups=Hq // Hkv, q_block=128, impl=impl,
                                 with_prior=with_prior, exact_mask_mod=exact)
            return flex_attention(q, k, v, score_mod=dm.score_mod, block_mask=dm.block_mask, enable_gqa=True)
        return f

    cases = {
        "triton": make("triton"),
        "torch": make("torch"),
        "triton, causal mask_mod": make("triton", exact=False),
        "triton, no prior": make("triton", with_prior=False),
        "torch, no prior": make("torch", with_prior=False),
    }
    dm_out = dash_block_mask(pbar, N, chunk_size=C, groups=Hq // Hkv, q_block=128)

    def outside(q, k, v, p):
        return flex_attention(q, k, v, score_mod=dm_out.score_mod, block_mask=dm_out.block_mask, enable_gqa=True)

    cases["tables made outside"] = outside
    for name, f in cases.items():
        torch._dynamo.reset()
        try:
            want = torch.compile(f, backend="aot_eager", fullgraph=True)(q, k, v, pbar)
            got, codes = run_and_get_code(torch.compile(f, fullgraph=True), q, k, v, pbar)
            _cmp(f"isolate: {name}", got, want)
            if out_dir:
                with open(f"{out_dir}/code_{name.replace(' ', '_').replace(',', '')}.py", "w") as fh:
                    fh.write("\n\n# ----\n".join(codes))
        except Exception:  # noqa: BLE001 (report and go on to the next stage)
            print(f"isolate: {name} FAILED\n{traceback.format_exc(limit=3)}", flush=True)


if __name__ == "__main__":
    main()
