"""DashAttention on FlexAttention (issue 4) against dense causal attention, on the GPU.

Shape of the issue: B=1, Hq=32, Hkv=2, D=128, C=64, bf16, S in {8k, 16k, 32k}. For each length
the router's gamma is calibrated (bisection on the measured kept fraction, random inputs) to
keep about 10%, 25%, 40% and 60% of the causal chunks; then, end to end (summaries, router, mask
kernels, FlexAttention; gradients into q, k, v and w for fwd+bwd):

* ``flexsparse`` forward and forward+backward (``dash_attention(backend="flex")``);
* the same forward with the causal-only ``mask_mod`` (``exact_mask_mod=False``);
* the router alone (summaries + tau + pbar) and the mask build alone (states, lists, table);
* dense causal baselines in the same process: SDPA flash and cuDNN (K/V expanded to Hq heads
  outside the timed region) and FlexAttention's own dense causal kernel (GQA).

The kept fraction and the paper's sparsity are measured on the run's own inputs. Inputs: i.i.d.
normal (``--inputs random``: every row routes independently, the worst case for block masks) or,
by default, ``structured``: positions fall in segments of 512 tokens cycling over 16 topics and
q/k get their segment's topic direction added (a stand-in for documents or sections), so nearby
queries route alike as in trained models. Usage:
    python benchmarks/bench_dash.py --out DIR [--seqs 8192,16384,32768] [--no-bwd] [--inputs random]
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
from rich.table import Table
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.flex_attention import flex_attention

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))
import flexsparse  # noqa: E402
from common import causal_block_mask  # noqa: E402
from flexsparse import reference  # noqa: E402
from flexsparse.patterns.dash import dash_attention_flex, dash_block_mask  # noqa: E402

console = Console(width=170)
flex_c = torch.compile(flex_attention, dynamic=False)


def ms(fn):
    return triton.testing.do_bench(fn, warmup=50, rep=300, return_mode="median")


def calibrate(q, kbar, C, target, lo=0.01, hi=4000.0, steps=16):
    """gamma whose kept fraction is closest to ``target`` (kept falls as gamma grows)."""
    G = q.shape[1] // kbar.shape[1]
    best = None
    for _ in range(steps):
        g = math.sqrt(lo * hi)
        p = flexsparse.entmax_router(q, kbar, chunk_size=C, gamma=g)
        kept, _ = flexsparse.dash_sparsity(p, chunk_size=C)
        kept = float(kept)
        if best is None or abs(kept - target) < abs(best[1] - target):
            best = (g, kept)
        if kept > target:
            lo = g
        else:
            hi = g
    del G
    return best


def run(N, args, rows, meta):
    B, Hq, Hkv, D, C = 1, 32, 2, 128, 64
    G = Hq // Hkv
    torch.manual_seed(0)
    dt = torch.bfloat16
    q = torch.randn(B, Hq, N, D, device="cuda")
    k = torch.randn(B, Hkv, N, D, device="cuda")
    if args.inputs == "structured":
        topics = torch.randn(16, D, device="cuda")
        topics = 3.0 * topics / topics.norm(dim=-1, keepdim=True)
        t = topics[(torch.arange(N, device="cuda") // 512) % 16]  # [N, D]
        q, k = q + t, k + t
    q = q.to(dt).requires_grad_(True)
    k = k.to(dt).requires_grad_(True)
    v = torch.randn(B, Hkv, N, D, device="cuda", dtype=dt, requires_grad=True)
    w = (0.1 * torch.randn(Hkv, D, device="cuda", dtype=dt)).requires_grad_(True)
    do = torch.randn_like(q)
    shape = dict(B=B, Hq=Hq, Hkv=Hkv, D=D, C=C, N=N, inputs=args.inputs)

    # dense baselines
    ke, ve = (t.detach().repeat_interleave(G, 1).requires_grad_(True) for t in (k, v))
    dense = {}

    def sdpa(backend):
        def f():
            with sdpa_kernel(backend):
                return torch.nn.functional.scaled_dot_product_attention(q, ke, ve, is_causal=True)
        return f

    bm_dense = causal_block_mask(N)
    cases = {"sdpa_flash": sdpa(SDPBackend.FLASH_ATTENTION), "sdpa_cudnn": sdpa(SDPBackend.CUDNN_ATTENTION),
             "flex_dense": lambda: flex_c(q, k, v, block_mask=bm_dense, enable_gqa=True)}
    for name, f in cases.items():
        with torch.no_grad():
            dense[(name, "fwd")] = ms(f)
        if not args.no_bwd:
            dense[(name, "fwd+bwd")] = ms(lambda f=f: torch.autograd.grad(f(), (q,), do))
    for (name, mode), t in dense.items():
        rows.append(dict(**shape, method=name, mode=mode, ms=t))
        console.print(rows[-1])

    with torch.no_grad():
        kbar = reference.chunk_summaries(k, w, C)
    for target in args.targets:
        gamma, kept_cal = calibrate(q.detach(), kbar, C, target)
        kw = dict(chunk_size=C, gamma=gamma)
        with torch.no_grad():
            _, stats = flexsparse.dash_attention(q, k, v, w, backend="flex", return_stats=True, **kw)
        kept, sparsity = float(stats["kept_fraction"]), float(stats["sparsity"])
        row = dict(**shape, method="flexsparse", gamma=round(gamma, 4), kept_fraction=round(kept, 4),
                   sparsity=round(sparsity, 4))

        def router():
            kb = reference.chunk_summaries(k, w, C)
            return flexsparse.entmax_router(q, kb, chunk_size=C, gamma=gamma)

        with torch.no_grad():
            row["router_ms"] = ms(router)
            p = router()
            row["mask_ms"] = ms(lambda: dash_block_mask(p, N, chunk_size=C, groups=G))
            row["fwd_ms"] = ms(lambda: flexsparse.dash_attention(q, k, v, w, backend="flex", **kw))
            try:
                row["fwd_causal_mod_ms"] = ms(lambda: dash_attention_flex(q, k, v, w, exact_mask_mod=False, **kw))
            except Exception as e:  # noqa: BLE001 - report, keep going
                console.print(f"[yellow]causal-only mask_mod failed: {type(e).__name__}: {str(e)[:300]}[/]")
        if not args.no_bwd:
            def fb():
                o = dash_attention_flex(q, k, v, w, autotune=args.autotune, **kw)
                torch.autograd.grad(o, (q, k, v, w), do)
            try:
                row["fwd+bwd_ms"] = ms(fb)
            except Exception as e:  # noqa: BLE001
                console.print(f"[red]fwd+bwd failed: {type(e).__name__}: {str(e)[:400]}[/]")
        for (name, mode), t in dense.items():
            key = "fwd_ms" if mode == "fwd" else "fwd+bwd_ms"
            if key in row:
                row[f"x_vs_{name}_{mode}"] = round(t / row[key], 3)
        row["kept_calibration"] = round(kept_cal, 4)
        rows.append(row)
        console.print(row)
        save(args, rows, meta)


def save(args, rows, meta):
    os.makedirs(args.out, exist_ok=True)
    name = "dash_flex" + args.tag + "_" + meta["gpu"].replace(" ", "_") + ".json"
    with open(os.path.join(args.out, name), "w") as fh:
        json.dump({"meta": meta, "rows": rows}, fh, indent=1)


def table(rows, title):
    t = Table(title=title)
    for c in ("N", "gamma", "kept", "sparsity", "router ms", "mask ms", "fwd ms", "fwd causal-mod ms", "x cuDNN fwd",
              "fwd+bwd ms", "x cuDNN fwd+bwd", "x flash fwd+bwd"):
        t.add_column(c)
    for r in rows:
        if r["method"] != "flexsparse":
            continue

        def f(key, p=3):
            x = r.get(key)
            return "" if x is None else f"{x:.{p}f}"

        t.add_row(str(r["N"]), f("gamma", 2), f("kept_fraction"), f("sparsity"), f("router_ms"), f("mask_ms"), f("fwd_ms"),
                  f("fwd_causal_mod_ms"), f("x_vs_sdpa_cudnn_fwd", 2), f("fwd+bwd_ms"), f("x_vs_sdpa_cudnn_fwd+bwd", 2),
                  f("x_vs_sdpa_flash_fwd+bwd", 2))
    console.print(t)
    dense = Table(title="dense causal baselines (ms)")
    for c in ("N", "method", "mode", "ms"):
        dense.add_column(c)
    for r in rows:
        if r["method"] != "flexsparse":
            dense.add_row(str(r["N"]), r["method"], r["mode"], f"{r['ms']:.3f}")
    console.print(dense)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    ap.add_argument("--seqs", default="8192,16384,32768")
    ap.add_argument("--targets", default="0.1,0.25,0.4,0.6", help="kept fractions to calibrate gamma for")
    ap.add_argument("--no-bwd", action="store_true")
    ap.add_argument("--inputs", choices=("structured", "random"), default="structured")
    ap.add_argument("--autotune", type=lambda s: {"auto": None, "on": True, "off": False}[s], default=None,
                    help="max-autotune for the backward compile: auto | on | off")
    ap.add_argument("--tag", default="")
    args = ap.parse_args(argv)
    args.targets = [float(x) for x in args.targets.split(",")]
    assert torch.cuda.is_available(), "GPU benchmark"
    torch._dynamo.config.cache_size_limit = 256
    meta = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                python=platform.python_version(), cudnn=torch.backends.cudnn.version(), flexsparse=flexsparse.__version__,
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    console.print(meta)
    rows: list[dict] = []
    for N in (int(x) for x in args.seqs.split(",")):
        run(N, args, rows, meta)
    table(rows, f"DashAttention (flex path) on {meta['gpu']}, torch {meta['torch']}, triton {meta['triton']}, bf16, "
                "B=1 Hq=32 Hkv=2 D=128 C=64, medians")
    save(args, rows, meta)


if __name__ == "__main__":
    main()
