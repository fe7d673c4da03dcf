"""Compiled training steps of each flexsparse layer on the GPU, one subprocess per case (an
illegal memory access poisons the CUDA context), with ``CUDA_LAUNCH_BLOCKING=1`` so a failing
kernel is named in the traceback. Debugging aid for issue 7's compiled training runs.

    python benchmarks/probe_compile.py [--seqs 2048,16384] [--cases hash,drop,dash,topk]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

CHILD = r"""
import sys, torch, flexsparse
case, N, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
torch.manual_seed(0)
dim, heads, kv = 512, 8, 2
mk = dict(
    hash=lambda: flexsparse.HashSparseAttention(dim, heads, kv_heads=kv, n_buckets=16),
    drop=lambda: flexsparse.QKSparseAttention(dim, heads, kv_heads=kv, drop_rate=0.5),
    dash=lambda: flexsparse.DashAttention(dim, heads, kv_heads=kv, chunk_size=128, gamma=4.0),
    topk=lambda: flexsparse.DashAttention(dim, heads, kv_heads=kv, chunk_size=128, router="topk", top_k=16),
)[case]
layer = mk().cuda()
emb = torch.nn.Embedding(256, dim).cuda()
def step(tok):
    with torch.autocast("cuda", torch.bfloat16):
        y = layer(emb(tok))
    return y.float().square().mean()
f = step if mode == "eager" else torch.compile(step, fullgraph=True, dynamic=False)
for it in range(3):
    tok = torch.randint(0, 256, (2, N), device="cuda")
    tok[:, : N // 2] = 32  # half the tokens identical (byte text has long runs of spaces)
    loss = f(tok)
    loss.backward()
    torch.cuda.synchronize()
print("OK", case, N, mode, float(loss))
"""


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seqs", default="2048,16384")
    ap.add_argument("--cases", default="hash,drop,dash,topk")
    ap.add_argument("--modes", default="eager,compiled")
    ap.add_argument("--timeout", type=int, default=120)
    ap.add_argument("--dump", default=None, help="write each case's full stderr into this folder")
    args = ap.parse_args()
    env = dict(os.environ, CUDA_LAUNCH_BLOCKING="1")
    for case in args.cases.split(","):
        for N in args.seqs.split(","):
            for mode in args.modes.split(","):
                try:
                    p = subprocess.run([sys.executable, "-c", CHILD, case, N, mode], env=env,
                                       capture_output=True, text=True, timeout=args.timeout)
                    ok = p.returncode == 0
                    if args.dump:
                        os.makedirs(args.dump, exist_ok=True)
                        with open(os.path.join(args.dump, f"{case}_{N}_{mode}.log"), "w") as fh:
                            fh.write(p.stdout + "\n" + p.stderr)
                    print(f"== {case} N={N} {mode}: {'OK' if ok else 'FAILED rc=' + str(p.returncode)}", flush=True)
                    if not ok:
                        lines = [x for x in p.stderr.splitlines() if x.strip()]
                        print("\n".join(lines[-45:]), flush=True)
                except subprocess.TimeoutExpired:
                    print(f"== {case} N={N} {mode}: TIMEOUT", flush=True)


if __name__ == "__main__":
    main()
