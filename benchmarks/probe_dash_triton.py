"""Where the time of DashAttention's Triton path goes (issue 5 tuning), on the GPU.

B=1, Hq=32, Hkv=2, D=128, C=64, bf16, structured inputs (``bench_dash_triton.inputs``), gamma
calibrated for ``--target`` kept. Prints and saves (JSON under ``--out``):

* the stages of one forward: chunk summaries, ``router_tau``, the attention kernel;
* the attention kernel at gamma -> 0 (every chunk) and gamma -> inf (diagonal only: routing cost);
* a sweep of the forward tiles (``BLOCK_R``, ``BLOCK_NC``, warps, stages) and, with
  ``--bwd``, of the backward tiles at ``--bwd-seq``;
* the kernels of one decode step (torch profiler) at ``--decode-ctx``.

    python benchmarks/probe_dash_triton.py --out DIR [--seq 32768] [--bwd]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys

import torch
import triton

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))
import flexsparse  # noqa: E402
from bench_dash_triton import C, D, HKV, HQ, calibrate, inputs, router_kept  # noqa: E402
from flexsparse import reference  # noqa: E402
from flexsparse.kernels import dash_attn as K  # noqa: E402
from flexsparse.kernels import router as RK  # noqa: E402
from flexsparse.patterns.router import router_tau  # noqa: E402

G = HQ // HKV


def ms(fn, rep=100):
    return triton.testing.do_bench(fn, warmup=10, rep=rep, return_mode="median")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--seq", type=int, default=32768)
    ap.add_argument("--target", type=float, default=0.25)
    ap.add_argument("--bwd", action="store_true")
    ap.add_argument("--bwd-seq", type=int, default=16384)
    ap.add_argument("--decode-ctx", type=int, default=131072)
    ap.add_argument("--sweep", default="R=4,8;NC=32;W=4,8;S=2,3")
    ap.add_argument("--no-decode", action="store_true")
    args = ap.parse_args()
    res = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__)
    N = args.seq
    q, k, v, w = inputs(1, N)
    gamma, kept = calibrate(router_kept(q, k, w), args.target)
    scale = D ** -0.5
    res.update(N=N, gamma=gamma, kept=kept)
    kbar = reference.chunk_summaries(k, w, C)
    tau = router_tau(q, kbar, chunk_size=C, gamma=gamma, scale=scale, impl="triton")
    st = {}
    st["summaries"] = ms(lambda: reference.chunk_summaries(k, w, C))
    st["router_tau"] = ms(lambda: router_tau(q, kbar, chunk_size=C, gamma=gamma, scale=scale, impl="triton"))

    def fwd(g=gamma, t=tau, blocks=None):
        return K.dash_attn_forward(q, k, v, kbar, t, C, g * scale, scale, blocks=blocks)
    st["attn_kernel"] = ms(fwd)
    tau0 = router_tau(q, kbar, chunk_size=C, gamma=1e-3, scale=scale, impl="triton")
    st["attn_kernel_all_kept"] = ms(lambda: fwd(1e-3, tau0))
    tau_inf = torch.full_like(tau, float("inf"))  # no past chunk selected: routing + diagonal only
    st["attn_kernel_diag_only"] = ms(lambda: fwd(gamma, tau_inf))
    st["total_triton"] = ms(lambda: flexsparse.dash_attention(q, k, v, w, chunk_size=C, gamma=gamma, backend="triton"))
    res["stages_ms"] = st
    print(json.dumps(res, indent=1), flush=True)

    # forward tile sweep
    spec = dict(x.split("=") for x in args.sweep.split(";"))
    sweep = []
    for R, NC, W, S in itertools.product(*(map(int, spec[key].split(",")) for key in ("R", "NC", "W", "S"))):
        blocks = dict(BLOCK_R=R, BLOCK_NC=NC, num_warps=W, num_stages=S)
        try:
            t = ms(lambda: fwd(blocks=blocks), rep=50)
        except Exception as e:  # noqa: BLE001
            t = f"{type(e).__name__}: {str(e)[:80]}"
        sweep.append(dict(blocks=blocks, ms=t))
        print(sweep[-1], flush=True)
    res["fwd_sweep"] = sweep
    with open(os.path.join(args.out, "probe_dash_triton.json"), "w") as fh:
        json.dump(res, fh, indent=1)

    # router tau tiles
    try:
        import inspect
        print("router_tau signature:", inspect.signature(RK.router_tau), flush=True)
    except Exception:  # noqa: BLE001
        pass

    if args.bwd:
        del q, k, v
        torch.cuda.empty_cache()
        Nb = args.bwd_seq
        q, k, v, w = inputs(1, Nb, grad=True)
        gb, _ = calibrate(router_kept(q.detach(), k.detach(), w.detach()), args.target)
        do = torch.randn_like(q)
        bw = {}
        o = flexsparse.dash_attention(q, k, v, w, chunk_size=C, gamma=gb, backend="triton")
        bw["fwd"] = ms(lambda: flexsparse.dash_attention(q, k, v, w, chunk_size=C, gamma=gb, backend="triton"))
        bw["bwd_only"] = ms(lambda: torch.autograd.grad(o, (q, k, v, w), do, retain_graph=True))
        with torch.no_grad():
            kb = reference.chunk_summaries(k, w, C)
            tb = router_tau(q, kb, chunk_size=C, gamma=gb, scale=scale, impl="triton")
            out, lse, mu, _ = K.dash_attn_forward(q, k, v, kb, tb, C, gb * scale, scale)
        # LIST_WALK: the dk/dv kernel's scratch-list walk (predicted ~10-15% off the dk/dv time, as
        # the forward's v2 walk gained 16%); the default (False) is the measured reduction walk
        for R, W, S, LW in itertools.product((4, 8), (4, 8), (1, 2), (False, True)):
            blocks = dict(BLOCK_R=R, num_warps=W, num_stages=S, LIST_WALK=LW)
            try:
                t = ms(lambda: K.dash_attn_backward(q, k, v, kb, tb, out, lse, mu, do, C, gb * scale, scale,
                                                    blocks=blocks), rep=50)
            except Exception as e:  # noqa: BLE001
                t = f"{type(e).__name__}: {str(e)[:80]}"
            bw[str(blocks)] = t
            print(blocks, t, flush=True)
        res["bwd"] = bw
        print(json.dumps(bw, indent=1), flush=True)
        with open(os.path.join(args.out, "probe_dash_triton.json"), "w") as fh:
            json.dump(res, fh, indent=1)
        del q, k, v, o
        torch.cuda.empty_cache()

    if args.no_decode:
        return
    # decode kernels
    L = args.decode_ctx
    q, k, v, w = inputs(1, L, seed=1)
    qd = q[:, :, -1:].contiguous()
    del q
    cache = flexsparse.DashKVCache(1, HKV, L, D, chunk_size=C, dtype=torch.bfloat16, device="cuda")
    cache.append(k, v, w)
    out = torch.empty_like(qd)
    for _ in range(3):
        flexsparse.dash_decode(qd, cache, w, gamma=1.25, out=out)
    torch.cuda.synchronize()
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(20):
            flexsparse.dash_decode(qd, cache, w, gamma=1.25, out=out)
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=12)
    print(table, flush=True)
    res["decode_profile"] = table
    for ns in (4, 8, 16, 32, 64, 128):
        res.setdefault("decode_splits", {})[ns] = ms(
            lambda: flexsparse.dash_decode(qd, cache, w, gamma=1.25, out=out, num_splits=ns))
    print(res["decode_splits"], flush=True)
    with open(os.path.join(args.out, "probe_dash_triton.json"), "w") as fh:
        json.dump(res, fh, indent=1)


if __name__ == "__main__":
    main()
