"""BlockMask construction: flexsparse's Triton builder vs BlockMask.from_kv_blocks vs
torch.compile(create_block_mask) on an equivalent mask_mod; FlexAttention fwd+bwd through the
built mask vs dense SDPA for scale.

GPU only. Usage: python benchmarks/bench_blockmask.py [--out DIR] [--quick]
Writes ``blockmask_<gpu>.json`` to --out (default benchmarks/results) and prints a rich table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys

import torch
import triton
from rich.console import Console
from rich.table import Table
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import flexsparse  # noqa: E402
import common  # noqa: E402
from flexsparse import EMPTY, FULL, PARTIAL  # noqa: E402

console = Console(width=140)


def bench(fn, warmup=25, rep=100, repeats=3):
    """Median over ``repeats`` do_bench medians. The builder is host-bound at 16k, and one
    do_bench on these machines varied 5x between runs (0.048 vs 0.258 ms), so repeat."""
    times = sorted(triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median") for _ in range(repeats))
    return times[len(times) // 2]


def graph_time(fn):
    """Median GPU time of ``fn`` replayed from a CUDA graph, or None if it cannot be captured."""
    return common.graph_time(fn, bench)


def random_pattern(B, H, nQ, density, device="cuda"):
    """Causal random block pattern with ``density`` of ALL blocks kept: diagonal partial
    (causal), kept earlier blocks 80% full / 20% partial."""
    nc = nQ * (nQ + 1) / 2
    p_keep = min(1.0, max(0.0, (density * nQ * nQ - nQ) / max(nc - nQ, 1)))
    kept = torch.rand(B, H, nQ, nQ, device=device) < p_keep
    part = torch.rand(B, H, nQ, nQ, device=device) < 0.2
    states = torch.where(kept, torch.where(part, PARTIAL, FULL), EMPTY).to(torch.int8)
    tril = torch.ones(nQ, nQ, dtype=torch.bool, device=device).tril(-1)
    states = torch.where(tril, states, torch.zeros_like(states))
    states[..., torch.arange(nQ), torch.arange(nQ)] = PARTIAL
    return states


def lists_from_states(states):
    out = []
    for v in (PARTIAL, FULL):
        sel = (states == v).int()
        out += [sel.sum(-1).int().contiguous(), torch.argsort(sel, dim=-1, descending=True, stable=True).int().contiguous()]
    return out


def element(b, h, q, k):
    """Element mask inside partial blocks: causal and a scatter, so every partial block is
    genuinely partial (create_block_mask then classifies exactly like the state map)."""
    return (q >= k) & ((q + k) % 3 != 0)


def same_lists(a: BlockMask, b: BlockMask) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.as_tuple()[2:10], b.as_tuple()[2:10]))


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    assert torch.cuda.is_available(), "GPU benchmark"
    torch._dynamo.config.cache_size_limit = 64
    dev = torch.cuda.get_device_name()
    meta = {
        "gpu": dev,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "flexsparse": flexsparse.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    console.print(meta)
    rows = []

    # ---- headline: B=2, H=16, 16k, 25% density, block 128 (plus block 64) -------------------
    B, H, N, density = 2, 16, 16384, 0.25
    for bs in (128, 64):
        torch.manual_seed(0)
        nQ = N // bs
        states = random_pattern(B, H, nQ, density)
        kv = lists_from_states(states)
        mm = flexsparse.states_mask_mod(states, bs, element)
        ours = flexsparse.build_block_mask(*kv, seq_lengths=(N, N), block_size=bs, mask_mod=mm)
        ref = BlockMask.from_kv_blocks(*kv, BLOCK_SIZE=bs, mask_mod=mm, seq_lengths=(N, N))
        ok_ref = same_lists(ours, ref)
        cbm = torch.compile(create_block_mask)
        cb = cbm(mm, B, H, N, N, device="cuda", BLOCK_SIZE=bs)
        ok_cbm = same_lists(ours, cb)
        kept = (states != EMPTY).float().mean().item()
        t_ours = bench(lambda: flexsparse.build_block_mask(*kv, seq_lengths=(N, N), block_size=bs, mask_mod=mm, validate=False))
        t_ours_v = bench(lambda: flexsparse.build_block_mask(*kv, seq_lengths=(N, N), block_size=bs, mask_mod=mm))
        t_states = bench(lambda: flexsparse.block_mask_from_states(states, seq_lengths=(N, N), block_size=bs, mask_mod=mm, validate=False))
        t_ref = bench(lambda: BlockMask.from_kv_blocks(*kv, BLOCK_SIZE=bs, mask_mod=mm, seq_lengths=(N, N)), warmup=5, rep=50)
        t_cbm = bench(lambda: cbm(mm, B, H, N, N, device="cuda", BLOCK_SIZE=bs), warmup=5, rep=50)
        g_ours = graph_time(lambda: flexsparse.build_block_mask(*kv, seq_lengths=(N, N), block_size=bs, mask_mod=mm, validate=False))
        g_ref = graph_time(lambda: BlockMask.from_kv_blocks(*kv, BLOCK_SIZE=bs, mask_mod=mm, seq_lengths=(N, N)))
        row = dict(
            case=f"build B={B} H={H} N={N} block={bs}",
            ours_cuda_graph_ms=g_ours,
            from_kv_blocks_cuda_graph_ms=g_ref,
            block=bs,
            density=round(kept, 4),
            ours_ms=t_ours,
            ours_validated_ms=t_ours_v,
            ours_from_states_ms=t_states,
            from_kv_blocks_ms=t_ref,
            compiled_create_block_mask_ms=t_cbm,
            speedup_vs_from_kv_blocks=t_ref / t_ours,
            speedup_vs_compiled_create_block_mask=t_cbm / t_ours,
            equal_to_from_kv_blocks=ok_ref,
            equal_to_create_block_mask=ok_cbm,
        )
        rows.append(row)
        console.print(row)

    # ---- flex fwd+bwd through the built mask vs dense SDPA (context for mask-build share) --
    B, H, N, D = 2, 16, 16384, 64
    bs = 128
    torch.manual_seed(1)
    states = random_pattern(B, H, N // bs, 0.25)
    mm = flexsparse.states_mask_mod(states, bs, lambda b, h, q, k: q >= k)
    bm = flexsparse.block_mask_from_states(states, seq_lengths=(N, N), block_size=bs, mask_mod=mm)
    q, k, v = (torch.randn(B, H, N, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    do = torch.randn_like(q)
    flex = torch.compile(flex_attention, dynamic=False)

    def flex_fb():
        o = flex(q, k, v, block_mask=bm)
        o.backward(do)

    def sdpa_fb(backend):
        def f():
            with sdpa_kernel(backend):
                o = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
            o.backward(do)

        return f

    t_flex = bench(flex_fb, rep=200)
    t_fa2 = bench(sdpa_fb(SDPBackend.FLASH_ATTENTION), rep=200)
    try:
        t_cudnn = bench(sdpa_fb(SDPBackend.CUDNN_ATTENTION), rep=200)
    except Exception as e:  # noqa: BLE001 - report, don't die
        console.print(f"cuDNN unavailable: {e}")
        t_cudnn = float("nan")
    t_build = bench(lambda: flexsparse.block_mask_from_states(states, seq_lengths=(N, N), block_size=bs, mask_mod=mm, validate=False))
    row = dict(
        case=f"attention fwd+bwd B={B} H={H} N={N} D={D} block={bs} bf16",
        density=round((states != EMPTY).float().mean().item(), 4),
        flex_fwd_bwd_ms=t_flex,
        sdpa_flash_causal_fwd_bwd_ms=t_fa2,
        sdpa_cudnn_causal_fwd_bwd_ms=t_cudnn,
        build_ms=t_build,
        build_share_of_flex=t_build / t_flex,
    )
    rows.append(row)
    console.print(row)

    # ---- scaling of the builder alone --------------------------------------------------------
    for N in ([32768, 65536, 131072] if not args.quick else [32768]):
        B, H, bs = 2, 16, 128
        torch.manual_seed(2)
        states = random_pattern(B, H, N // bs, 0.25)
        kv = lists_from_states(states)
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        t = bench(lambda: flexsparse.build_block_mask(*kv, seq_lengths=(N, N), block_size=bs, validate=False), warmup=5, rep=50)
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
        rows.append(dict(case=f"build B={B} H={H} N={N} block={bs}", ours_ms=t, extra_peak_MiB=peak))
        console.print(rows[-1])
        del kv, states

    table = Table(title=f"BlockMask construction on {dev} (torch {torch.__version__}, triton {triton.__version__})")
    for col in ("case", "ours ms", "from_kv_blocks ms", "compiled create_block_mask ms", "x from_kv", "x create", "equal"):
        table.add_column(col)
    for r in rows:
        if "from_kv_blocks_ms" in r:
            table.add_row(
                r["case"], f"{r['ours_ms']:.3f}", f"{r['from_kv_blocks_ms']:.3f}", f"{r['compiled_create_block_mask_ms']:.3f}",
                f"{r['speedup_vs_from_kv_blocks']:.0f}x", f"{r['speedup_vs_compiled_create_block_mask']:.0f}x",
                str(r["equal_to_from_kv_blocks"] and r["equal_to_create_block_mask"]),
            )
        elif "ours_ms" in r:
            table.add_row(r["case"], f"{r['ours_ms']:.3f}", "", "", "", "", "")
    console.print(table)
    os.makedirs(args.out, exist_ok=True)
    name = "blockmask_" + dev.replace(" ", "_").replace("/", "_") + ".json"
    with open(os.path.join(args.out, name), "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
