"""Where the time of one BlockMask build goes (GPU): per-kernel CUDA time from the profiler,
CPU time per call, and the cost of each host-side step. Usage: python benchmarks/profile_blockmask.py"""

import os
import sys
import time

import torch
import triton
from torch.nn.attention.flex_attention import BlockMask, noop_mask

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import flexsparse  # noqa: E402
from flexsparse.kernels import blockmask as K  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from bench_blockmask import lists_from_states, random_pattern  # noqa: E402


def cpu_per_call(fn, n=300):
    fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / n * 1e6


def main():
    B, H, N, bs = 2, 16, 16384, 128
    torch.manual_seed(0)
    states = random_pattern(B, H, N // bs, 0.25)
    kv = lists_from_states(states)
    ws = K.Workspace(B, H, N // bs, N // bs, states.device, with_states=True)
    K.compact_block_states(states, ws)
    lists = ws.lists
    steps = {
        "build_block_mask(lists)": lambda: flexsparse.build_block_mask(*kv, seq_lengths=(N, N), block_size=bs, validate=False),
        "block_mask_from_states": lambda: flexsparse.block_mask_from_states(states, seq_lengths=(N, N), block_size=bs, validate=False),
        "Workspace (allocation+views)": lambda: K.Workspace(B, H, N // bs, N // bs, states.device, with_states=True),
        "scatter kernel only": lambda: K.scatter_block_lists(*kv, ws.states, ws.scatter_flags),
        "compact kernel only": lambda: K.compact_block_states(states, ws),
        "torch.zeros(1)": lambda: torch.zeros(1, dtype=torch.int32, device="cuda"),
        "8 x torch.empty": lambda: [torch.empty(B, H, 128, 128, dtype=torch.int32, device="cuda") for _ in range(8)],
        "BlockMask ctor": lambda: BlockMask((N, N), *lists, (bs, bs), noop_mask),
        "from_kv_blocks": lambda: BlockMask.from_kv_blocks(*kv, BLOCK_SIZE=bs, seq_lengths=(N, N)),
    }
    for name, fn in steps.items():
        us = cpu_per_call(fn)
        ms = triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
        print(f"{name:28s} cpu+sync per call {us:8.1f} us   do_bench {ms * 1e3:8.1f} us")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA, torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(20):
            flexsparse.build_block_mask(*kv, seq_lengths=(N, N), block_size=bs, validate=False)
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12))
    # CUDA graph of the whole build: the GPU-only cost
    g = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        flexsparse.build_block_mask(*kv, seq_lengths=(N, N), block_size=bs, validate=False)
    torch.cuda.current_stream().wait_stream(s)
    with torch.cuda.graph(g):
        bm = flexsparse.build_block_mask(*kv, seq_lengths=(N, N), block_size=bs, validate=False)
    ms = triton.testing.do_bench(g.replay, warmup=25, rep=100, return_mode="median")
    print(f"CUDA-graph replay of build_block_mask: {ms * 1e3:.1f} us")
    ref = BlockMask.from_kv_blocks(*kv, BLOCK_SIZE=bs, seq_lengths=(N, N))
    g.replay()
    torch.cuda.synchronize()
    print("graph output equal to from_kv_blocks:", all(torch.equal(a, b) for a, b in zip(bm.as_tuple()[2:10], ref.as_tuple()[2:10])))


if __name__ == "__main__":
    main()
