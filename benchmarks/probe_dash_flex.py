"""Which FlexAttention kernel options compile and run fastest for the DashAttention flex path
(64-wide KV blocks, D=128, GQA 16, score_mod prior), forward and forward+backward; checks the
backward against the float64 reference on a small shape first. GPU only.
    python benchmarks/probe_dash_flex.py [--N 8192]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import triton

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import flexsparse  # noqa: E402
from flexsparse import reference  # noqa: E402
from flexsparse.patterns.dash import dash_attention_flex  # noqa: E402
from flexsparse.testing import assert_close_to_ref  # noqa: E402

FWD = {
    "m64n64s2w4": {"fwd_BLOCK_M": 64, "fwd_BLOCK_N": 64, "fwd_num_stages": 2, "fwd_num_warps": 4},
    "m128n64s2w4": {"fwd_BLOCK_M": 128, "fwd_BLOCK_N": 64, "fwd_num_stages": 2, "fwd_num_warps": 4},
    "m128n32s2w4": {"fwd_BLOCK_M": 128, "fwd_BLOCK_N": 32, "fwd_num_stages": 2, "fwd_num_warps": 4},
    "m128n64s3w4": {"fwd_BLOCK_M": 128, "fwd_BLOCK_N": 64, "fwd_num_stages": 3, "fwd_num_warps": 4},
    "m128n64s2w8": {"fwd_BLOCK_M": 128, "fwd_BLOCK_N": 64, "fwd_num_stages": 2, "fwd_num_warps": 8},
    "m64n64s3w4": {"fwd_BLOCK_M": 64, "fwd_BLOCK_N": 64, "fwd_num_stages": 3, "fwd_num_warps": 4},
}
BWD = {
    "m64n64s2w4": {"bwd_BLOCK_M1": 64, "bwd_BLOCK_N1": 64, "bwd_BLOCK_M2": 64, "bwd_BLOCK_N2": 64,
                   "bwd_num_stages": 2, "bwd_num_warps": 4},
    "m32n64s2w4": {"bwd_BLOCK_M1": 32, "bwd_BLOCK_N1": 64, "bwd_BLOCK_M2": 64, "bwd_BLOCK_N2": 32,
                   "bwd_num_stages": 2, "bwd_num_warps": 4},
}


def ms(fn):
    return triton.testing.do_bench(fn, warmup=30, rep=200, return_mode="median")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--N", type=int, default=8192)
    ap.add_argument("--gamma", type=float, default=30.0)
    ap.add_argument("--out", default=".")
    args = ap.parse_args()
    res = []
    # correctness of fwd+bwd on a small shape (bf16 vs float64, plain bf16 reference as baseline)
    torch.manual_seed(0)
    B, Hq, Hkv, N, D, C = 1, 8, 2, 1000, 128, 64
    q, k, v = (torch.randn(B, h, N, D, device="cuda") for h in (Hq, Hkv, Hkv))
    w = 0.3 * torch.randn(Hkv, D, device="cuda")
    do = torch.randn(B, Hq, N, D, device="cuda")

    def grads(fn, dt):
        ins = [t.to(dt).requires_grad_(True) for t in (q, k, v, w)]
        o = fn(*ins)
        return [o] + list(torch.autograd.grad(o, ins, do.to(dt)))

    ref64 = grads(lambda *a: reference.dash_attention(*a, chunk_size=C, gamma=3.0), torch.float64)
    low = grads(lambda *a: reference.dash_attention(*a, chunk_size=C, gamma=3.0), torch.bfloat16)
    for name, opts in BWD.items():
        opts = {**FWD["m64n64s2w4"], **opts}
        try:
            got = grads(lambda *a: dash_attention_flex(*a, chunk_size=C, gamma=3.0, autotune=False, kernel_options=opts),
                        torch.bfloat16)
            for label, g, r, lo in zip(("o", "dq", "dk", "dv", "dw"), got, ref64, low):
                assert_close_to_ref(label, g, r, lo, factor=3.0)
            res.append({"check": "bwd", "options": name, "ok": True})
        except Exception as e:  # noqa: BLE001
            res.append({"check": "bwd", "options": name, "ok": False, "error": f"{type(e).__name__}: {str(e)[:300]}"})
        print(res[-1], flush=True)
    # speed at the shape
    B, Hq, Hkv, N, D, C = 1, 32, 2, args.N, 128, 64
    q, k, v = (torch.randn(B, h, N, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for h in (Hq, Hkv, Hkv))
    w = (0.1 * torch.randn(Hkv, D, device="cuda", dtype=torch.bfloat16)).requires_grad_(True)
    do = torch.randn_like(q)
    with torch.no_grad():
        kbar = reference.chunk_summaries(k, w, C)
        kept = float(flexsparse.dash_sparsity(flexsparse.entmax_router(q, kbar, chunk_size=C, gamma=args.gamma),
                                              chunk_size=C)[0])
    for name, opts in FWD.items():
        row = {"N": N, "gamma": args.gamma, "kept": kept, "fwd_options": name}
        for exact in (True, False):
            try:
                with torch.no_grad():
                    row[f"fwd_ms_exact{int(exact)}"] = ms(lambda: dash_attention_flex(
                        q, k, v, w, chunk_size=C, gamma=args.gamma, kernel_options=opts, exact_mask_mod=exact))
            except Exception as e:  # noqa: BLE001
                row[f"fwd_err_exact{int(exact)}"] = f"{type(e).__name__}: {str(e)[:200]}"
        res.append(row)
        print(row, flush=True)
    for name, opts in BWD.items():
        opts = {**FWD["m64n64s2w4"], **opts}
        row = {"N": N, "gamma": args.gamma, "kept": kept, "bwd_options": name}
        try:
            row["fwd+bwd_ms"] = ms(lambda: torch.autograd.grad(dash_attention_flex(
                q, k, v, w, chunk_size=C, gamma=args.gamma, kernel_options=opts, autotune=False), (q, k, v, w), do))
        except Exception as e:  # noqa: BLE001
            row["err"] = f"{type(e).__name__}: {str(e)[:200]}"
        res.append(row)
        print(row, flush=True)
    with open(os.path.join(args.out, "probe_dash_flex.json"), "w") as fh:
        json.dump({"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": res}, fh, indent=1)


if __name__ == "__main__":
    main()
