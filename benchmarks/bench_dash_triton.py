"""DashAttention's own Triton kernels (issue 5) against dense causal attention, on the GPU.

Shape of the issue: B=1, Hq=32, Hkv=2, D=128, C=64, bf16. Structured inputs (as in
``bench_dash.py``: segments of 512 tokens cycling over 16 topic directions added to q and k, so
nearby queries route alike). For every length gamma is calibrated (bisection on the router's
measured kept fraction) to keep ``--target`` (default 25%) of the causal chunks; then:

* ``prefill``: forward (no grad) of ``dash_attention(backend="triton")`` at every ``--seqs``
  length, against SDPA flash, SDPA cuDNN (K/V expanded to Hq heads outside the timed region)
  and FlexAttention's dense causal kernel (GQA) in the same process;
* ``train``: forward + backward (gradients into q, k, v, w) at ``--train-seqs``;
* ``dense``: gamma -> 0 (every chunk kept) against FlexAttention dense, fwd and fwd+bwd;
* ``decode``: one new token (``q_len = 1``) over a ``--decode-ctx`` cache at batch 1 and 8,
  ``dash_decode`` (CUDA-graph replay and eager) against dense decode (SDPA with ``enable_gqa``
  and FlexAttention, both on exactly the cached tokens), gamma calibrated on the decode rows.

The kept fraction and the paper's sparsity come from the kernel's own per-row counts. Usage:
    python benchmarks/bench_dash_triton.py --out DIR [--parts prefill,train,dense,decode]
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import sys

import torch
import triton
from rich.console import Console
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.flex_attention import flex_attention

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))
import flexsparse  # noqa: E402
from common import causal_block_mask, graph_time  # noqa: E402
from flexsparse import reference  # noqa: E402

console = Console(width=170)
flex_c = torch.compile(flex_attention, dynamic=False)
B0, HQ, HKV, D, C = 1, 32, 2, 128, 64
G = HQ // HKV


def ms(fn, rep=200):
    return triton.testing.do_bench(fn, warmup=25, rep=rep, return_mode="median")


def inputs(B, N, seed=0, grad=False):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(B, HQ, N, D, device="cuda", generator=g)
    k = torch.randn(B, HKV, N, D, device="cuda", generator=g)
    topics = torch.randn(16, D, device="cuda", generator=g)
    topics = 3.0 * topics / topics.norm(dim=-1, keepdim=True)
    t = topics[(torch.arange(N, device="cuda") // 512) % 16]
    q, k = (q + t).bfloat16(), (k + t).bfloat16()
    v = torch.randn(B, HKV, N, D, device="cuda", generator=g).bfloat16()
    w = (0.1 * torch.randn(HKV, D, device="cuda", generator=g)).bfloat16()
    if grad:
        q, k, v, w = (x.requires_grad_(True) for x in (q, k, v, w))
    return q, k, v, w


def calibrate(kept_of, target, lo=0.01, hi=4000.0, steps=14):
    """gamma whose kept fraction (``kept_of(gamma)``, falling in gamma) is closest to ``target``."""
    best = None
    for _ in range(steps):
        g = math.sqrt(lo * hi)
        kept = kept_of(g)
        if best is None or abs(kept - target) < abs(best[1] - target):
            best = (g, kept)
        lo, hi = (g, hi) if kept > target else (lo, g)
    return best


def router_kept(q, k, w):
    with torch.no_grad():
        kbar = reference.chunk_summaries(k, w, C)

    def f(g):
        with torch.no_grad():
            p = flexsparse.entmax_router(q, kbar, chunk_size=C, gamma=g)
            return float(flexsparse.dash_sparsity(p, chunk_size=C)[0])
    return f


def dense_cases(q, k, v, N):
    ke, ve = (t.detach().repeat_interleave(G, 1).requires_grad_(t.requires_grad) for t in (k, v))

    def sdpa(backend):
        def f():
            with sdpa_kernel(backend):
                return torch.nn.functional.scaled_dot_product_attention(q, ke, ve, is_causal=True)
        return f

    bm = causal_block_mask(N)
    return {"sdpa_flash": sdpa(SDPBackend.FLASH_ATTENTION), "sdpa_cudnn": sdpa(SDPBackend.CUDNN_ATTENTION),
            "flex_dense": lambda: flex_c(q, k, v, block_mask=bm, enable_gqa=True)}


def tri(q, k, v, w, gamma, **kw):
    return flexsparse.dash_attention(q, k, v, w, chunk_size=C, gamma=gamma, backend="triton", **kw)


def part_prefill(args, rows, meta, train=False):
    seqs = args.train_seqs if train else args.seqs
    mode = "fwd+bwd" if train else "fwd"
    for N in seqs:
        q, k, v, w = inputs(B0, N, grad=train)
        do = torch.randn_like(q)
        gamma, kept_router = calibrate(router_kept(q.detach(), k.detach(), w.detach()), args.target)
        console.print(f"N={N}: gamma {gamma:.4g} keeps {kept_router:.3f} (router)")
        with torch.no_grad():
            _, st = tri(q, k, v, w, gamma, return_stats=True)
        row = dict(part="train" if train else "prefill", mode=mode, N=N, B=B0, Hq=HQ, Hkv=HKV, D=D, C=C,
                   gamma=round(gamma, 4), kept_fraction=round(float(st["kept_fraction"]), 4),
                   sparsity=round(float(st["sparsity"]), 4), kept_router=round(kept_router, 4))

        def timed(f):
            if train:
                return ms(lambda: torch.autograd.grad(f(), (q, k, v, w) if f is ours else (q,), do))
            with torch.no_grad():
                return ms(f)

        def ours():
            return tri(q, k, v, w, gamma)
        row["flexsparse_ms"] = timed(ours)
        for name, f in dense_cases(q, k, v, N).items():
            try:
                row[f"{name}_ms"] = timed(f)
                row[f"x_vs_{name}"] = round(row[f"{name}_ms"] / row["flexsparse_ms"], 3)
            except Exception as e:  # noqa: BLE001 - report and go on
                console.print(f"[yellow]{name} at {N} failed: {type(e).__name__}: {str(e)[:200]}[/]")
        rows.append(row)
        console.print(row)
        save(args, rows, meta)
        del q, k, v, w, do
        torch.cuda.empty_cache()


def part_dense(args, rows, meta):
    for N in args.dense_seqs:
        q, k, v, w = inputs(B0, N, grad=True)
        do = torch.randn_like(q)
        gamma = 1e-3
        with torch.no_grad():
            _, st = tri(q, k, v, w, gamma, return_stats=True)
        bm = causal_block_mask(N)
        row = dict(part="dense", N=N, gamma=gamma, kept_fraction=round(float(st["kept_fraction"]), 4))
        with torch.no_grad():
            row["fwd_flexsparse_ms"] = ms(lambda: tri(q, k, v, w, gamma))
            row["fwd_flex_dense_ms"] = ms(lambda: flex_c(q, k, v, block_mask=bm, enable_gqa=True))
        row["fwdbwd_flexsparse_ms"] = ms(lambda: torch.autograd.grad(tri(q, k, v, w, gamma), (q, k, v, w), do))
        row["fwdbwd_flex_dense_ms"] = ms(
            lambda: torch.autograd.grad(flex_c(q, k, v, block_mask=bm, enable_gqa=True), (q, k, v), do))
        row["fwd_ratio_vs_flex"] = round(row["fwd_flexsparse_ms"] / row["fwd_flex_dense_ms"], 3)
        row["fwdbwd_ratio_vs_flex"] = round(row["fwdbwd_flexsparse_ms"] / row["fwdbwd_flex_dense_ms"], 3)
        rows.append(row)
        console.print(row)
        save(args, rows, meta)


def part_decode(args, rows, meta):
    L = args.decode_ctx
    for B in args.decode_batch:
        q_all, k, v, w = inputs(B, L, seed=1)
        q = q_all[:, :, -1:].contiguous()
        del q_all
        cache = flexsparse.DashKVCache(B, HKV, L, D, chunk_size=C, dtype=torch.bfloat16, device="cuda")
        cache.append(k, v, w)

        def kept_of(g):
            _, aux = flexsparse.dash_decode(q, cache, w, gamma=g, return_aux=True)
            return float(aux["count"].float().mean()) / (L // C)
        gamma, kept = calibrate(kept_of, args.target)
        row = dict(part="decode", B=B, ctx=L, gamma=round(gamma, 4), kept_fraction=round(kept, 4))
        out = torch.empty_like(q)

        def ours():
            flexsparse.dash_decode(q, cache, w, gamma=gamma, out=out)
        row["flexsparse_eager_ms"] = ms(ours)
        row["flexsparse_graph_ms"] = graph_time(ours, ms)
        kk, vv = k.contiguous(), v.contiguous()

        def sdpa():
            return torch.nn.functional.scaled_dot_product_attention(q, kk, vv, enable_gqa=True)

        def flexd():
            return flex_c(q, kk, vv, enable_gqa=True)
        with torch.no_grad():
            for name, f in (("sdpa_gqa", sdpa), ("flex_decode", flexd)):
                try:
                    row[f"{name}_ms"] = ms(f)
                    row[f"{name}_graph_ms"] = graph_time(f, ms)
                except Exception as e:  # noqa: BLE001
                    console.print(f"[yellow]{name} failed: {type(e).__name__}: {str(e)[:200]}[/]")
            try:  # K/V expanded to Hq heads (memory-bound: reads G times the bytes) for reference
                ke, ve = (t.repeat_interleave(G, 1) for t in (kk, vv))
                row["sdpa_expanded_ms"] = ms(lambda: torch.nn.functional.scaled_dot_product_attention(q, ke, ve))
                del ke, ve
            except Exception as e:  # noqa: BLE001
                console.print(f"[yellow]sdpa expanded failed: {type(e).__name__}: {str(e)[:200]}[/]")
        dense = [row[x] for x in row if x.endswith("_ms") and not x.startswith("flexsparse") and row[x]]
        best = min(dense) if dense else None
        mine = row["flexsparse_graph_ms"] or row["flexsparse_eager_ms"]
        row["x_vs_best_dense"] = round(best / mine, 3) if best else None
        rows.append(row)
        console.print(row)
        save(args, rows, meta)
        del cache, k, v
        torch.cuda.empty_cache()


def save(args, rows, meta):
    os.makedirs(args.out, exist_ok=True)
    name = "dash_triton" + args.tag + "_" + meta["gpu"].replace(" ", "_") + ".json"
    with open(os.path.join(args.out, name), "w") as fh:
        json.dump({"meta": meta, "rows": rows}, fh, indent=1)


def ints(s):
    return [int(x) for x in s.split(",") if x]


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    ap.add_argument("--parts", default="prefill,train,dense,decode")
    ap.add_argument("--seqs", type=ints, default=ints("8192,16384,32768,65536,131072"))
    ap.add_argument("--train-seqs", type=ints, default=ints("16384"))
    ap.add_argument("--dense-seqs", type=ints, default=ints("16384"))
    ap.add_argument("--decode-ctx", type=int, default=131072)
    ap.add_argument("--decode-batch", type=ints, default=ints("1,8"))
    ap.add_argument("--target", type=float, default=0.25)
    ap.add_argument("--tag", default="")
    args = ap.parse_args(argv)
    meta = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                python=platform.python_version(), date=datetime.datetime.now().isoformat(timespec="seconds"),
                cudnn=torch.backends.cudnn.version(), target=args.target)
    rows: list = []
    run = {"prefill": lambda: part_prefill(args, rows, meta), "train": lambda: part_prefill(args, rows, meta, train=True),
           "dense": lambda: part_dense(args, rows, meta), "decode": lambda: part_decode(args, rows, meta)}
    for part in args.parts.split(","):  # in the order given
        console.print(f"[bold]== {part}[/]")
        run[part]()


if __name__ == "__main__":
    main()
