"""Generate the pictures of the documentation site (matplotlib, CPU, a few seconds).

    python docs/figures.py            # writes docs/images/*.png

Every picture is computed from flexsparse itself (the pattern builders and the float64 reference
router) or from the recorded benchmark results in ``benchmarks/results/*.json``; nothing is drawn
by hand. Inputs are seeded, so the pictures only change when the code or the results do. The PNGs
are committed, so building the site does not need matplotlib.

Pictures:

* ``concepts_blocks.png``: one small pattern, element by element, with its block states.
* ``pattern_hash.png``, ``pattern_drop.png``: the mask in original positions and the BlockMask in
  sorted (hash) or compacted (drop) coordinates, which is what FlexAttention walks.
* ``pattern_dash_entmax.png``, ``pattern_dash_topk.png``: DashAttention's selection (entmax
  router with its prior, hard top-k) on structured synthetic inputs, and its block states.
* ``dash_sparsity_vs_gamma.png``: kept fraction and paper sparsity against the router's gamma,
  from :func:`flexsparse.reference.dash_router` on structured and on random inputs.
* ``bench_scfa_speedup.png``: measured speedups over cuDNN (H100) from ``benchmarks/results``.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

# The pictures use the pure-PyTorch paths of the builders (no Triton interpreter needed).
os.environ.pop("TRITON_INTERPRET", None)

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from matplotlib.colors import ListedColormap  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402
from matplotlib.ticker import FuncFormatter  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import flexsparse  # noqa: E402
from flexsparse import reference  # noqa: E402

OUT = ROOT / "docs" / "images"
RESULTS = ROOT / "benchmarks" / "results"

# block-state colours: EMPTY, PARTIAL, FULL
STATE_COLORS = ["#f4f4f4", "#f5a742", "#3b6fb6"]
STATE_CMAP = ListedColormap(STATE_COLORS)
STATE_LEGEND = [
    Patch(facecolor=STATE_COLORS[0], edgecolor="#999999", label="EMPTY (skipped)"),
    Patch(facecolor=STATE_COLORS[1], label="PARTIAL (mask_mod decides)"),
    Patch(facecolor=STATE_COLORS[2], label="FULL (no mask_mod)"),
]
MASK_CMAP = ListedColormap(["#f4f4f4", "#222222"])
DPI = 110


def _save(fig, name: str) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / name
    fig.savefig(path, dpi=DPI, bbox_inches="tight", metadata={"Software": None})
    plt.close(fig)
    print(f"wrote {path.relative_to(ROOT)}")


def _show_states(ax, states2d: torch.Tensor, title: str, block: tuple[int, int] | None = None) -> None:
    ax.imshow(states2d.numpy(), cmap=STATE_CMAP, vmin=0, vmax=2, interpolation="nearest")
    ax.set_title(title, fontsize=10)
    nq, nk = states2d.shape
    ax.set_xticks([x - 0.5 for x in range(nk + 1)], minor=True)
    ax.set_yticks([y - 0.5 for y in range(nq + 1)], minor=True)
    ax.grid(which="minor", color="white", linewidth=0.6)
    ax.tick_params(which="both", length=0)
    ax.set_xticks([])
    ax.set_yticks([])
    if block is not None:
        ax.set_xlabel(f"key block ({block[1]} slots each)", fontsize=9)
        ax.set_ylabel(f"query block ({block[0]} slots each)", fontsize=9)


def _show_mask(ax, mask2d: torch.Tensor, title: str, block: int | None = None) -> None:
    ax.imshow(mask2d.numpy().astype(float), cmap=MASK_CMAP, vmin=0, vmax=1, interpolation="nearest")
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("key position", fontsize=9)
    ax.set_ylabel("query position", fontsize=9)
    if block is not None:
        n = mask2d.shape[0]
        for x in range(block, n, block):
            ax.axhline(x - 0.5, color="#5aa0e0", linewidth=0.4)
            ax.axvline(x - 0.5, color="#5aa0e0", linewidth=0.4)


# ----------------------------------------------------------------------------------------------
# concepts


def fig_concepts() -> None:
    """The 30-second example of the home page: causal diagonal blocks plus one full block."""
    N, bs = 64, 16
    n = N // bs
    states = torch.zeros(1, 1, n, n, dtype=torch.int8)
    states[..., torch.arange(n), torch.arange(n)] = flexsparse.PARTIAL
    states[..., 2, 0] = flexsparse.FULL
    states[..., 3, 1] = flexsparse.FULL
    mod = flexsparse.states_mask_mod(states, bs, element_mod=lambda b, h, q, kv: q >= kv)
    i = torch.arange(N)
    mask = mod(0, 0, i[:, None], i[None, :])
    fig, axes = plt.subplots(1, 2, figsize=(8.4, 4.0))
    _show_mask(axes[0], mask, "element mask: what may attend (black)", block=bs)
    _show_states(axes[1], states[0, 0], "block states: what the kernel visits", block=(bs, bs))
    fig.legend(handles=STATE_LEGEND, loc="lower center", ncol=3, fontsize=9, frameon=False, bbox_to_anchor=(0.5, -0.06))
    _save(fig, "concepts_blocks.png")


# ----------------------------------------------------------------------------------------------
# SCFA patterns


def fig_hash() -> None:
    g = torch.Generator().manual_seed(1)
    N, bs, nb = 512, 32, 4
    qb = torch.randint(0, nb, (1, 1, N), generator=g)
    kb = torch.randint(0, nb, (1, 1, N), generator=g)
    pm = flexsparse.hash_block_mask(qb, kb, n_buckets=nb, block_size=bs, impl="torch")
    mask = reference.hash_mask(qb, kb)[0, 0]
    kept = _causal_kept(pm.states[0, 0], pm.length, bs)
    fig, axes = plt.subplots(1, 2, figsize=(9.6, 4.6))
    _show_mask(axes[0], mask, f"original positions: same bucket and causal\n({nb} random buckets, N = {N})")
    _show_states(
        axes[1], pm.states[0, 0],
        f"BlockMask, sorted by bucket (L = {pm.length} slots)\n{kept}", block=(bs, bs),
    )
    fig.legend(handles=STATE_LEGEND, loc="lower center", ncol=3, fontsize=9, frameon=False, bbox_to_anchor=(0.5, -0.05))
    _save(fig, "pattern_hash.png")


def fig_drop() -> None:
    g = torch.Generator().manual_seed(2)
    N, bs, rate = 512, 32, 0.5
    q_keep = torch.rand(1, 1, N, generator=g) >= rate
    k_keep = torch.rand(1, 1, N, generator=g) >= rate
    pm = flexsparse.drop_block_mask(q_keep, k_keep, block_size=bs, impl="torch")
    mask = reference.drop_mask(q_keep, k_keep)[0, 0]
    kept = _causal_kept(pm.states[0, 0], N, bs)
    fig, axes = plt.subplots(1, 2, figsize=(9.6, 4.6))
    _show_mask(axes[0], mask, f"original positions: both kept and causal\n(drop rate {rate}, N = {N})")
    _show_states(
        axes[1], pm.states[0, 0],
        f"BlockMask, kept tokens compacted (L = {pm.length} slots)\n{kept}", block=(bs, bs),
    )
    fig.legend(handles=STATE_LEGEND, loc="lower center", ncol=3, fontsize=9, frameon=False, bbox_to_anchor=(0.5, -0.05))
    _save(fig, "pattern_drop.png")


def _causal_kept(states2d: torch.Tensor, N: int, bs: int) -> str:
    """``"x% of the N x N causal blocks visited"``: visited blocks over the causal blocks of the
    original (unsorted) problem."""
    n = math.ceil(N / bs)
    causal = n * (n + 1) / 2
    visited = int((states2d != flexsparse.EMPTY).sum())
    return f"{visited} blocks visited = {visited / causal:.0%} of the dense causal {int(causal)}"


# ----------------------------------------------------------------------------------------------
# DashAttention


def structured_qkv(B: int, Hq: int, Hkv: int, N: int, D: int, C: int, *, n_topics: int = 8, strength: float = 1.0,
                   seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Synthetic inputs with a routing structure: every chunk of keys is about one of
    ``n_topics`` random unit directions (plus noise), and every query looks for the topic of its
    own chunk, so a good router attends to the earlier chunks of the same topic."""
    g = torch.Generator().manual_seed(seed)
    topics = torch.randn(n_topics, D, generator=g)
    topics = topics / topics.norm(dim=-1, keepdim=True) * strength * math.sqrt(D) ** 0.5
    n_chunks = -(-N // C)
    chunk_topic = torch.randint(0, n_topics, (B, n_chunks), generator=g)
    tok_topic = chunk_topic.repeat_interleave(C, dim=1)[:, :N]  # [B, N]
    base = topics[tok_topic]  # [B, N, D]
    k = base[:, None] + torch.randn(B, Hkv, N, D, generator=g)
    q = base[:, None] + torch.randn(B, Hq, N, D, generator=g)
    v = torch.randn(B, Hkv, N, D, generator=g)
    return q, k, v


def _dash_element_view(log_prior: torch.Tensor, N: int, C: int) -> torch.Tensor:
    """``[N, N]`` prior weight ``pi`` of every (query, key) pair (NaN where not attended)."""
    tok = torch.arange(N) // C
    lp = log_prior.index_select(-1, tok)  # [N, N]
    causal = torch.arange(N)[:, None] >= torch.arange(N)[None, :]
    return torch.where(causal & (lp > float("-inf")), lp.exp(), float("nan"))


def fig_dash() -> None:
    B, H, N, D, C, qblk = 1, 1, 1024, 64, 32, 32
    gamma, top_k = 16.0, 4
    q, k, v = structured_qkv(B, H, H, N, D, C, seed=3)
    w = torch.zeros(H, D)
    # entmax
    pbar = reference.dash_router(q.double(), k.double(), w.double(), chunk_size=C, gamma=gamma)
    lp = reference.dash_log_prior(pbar, N, chunk_size=C)
    dm = flexsparse.dash_block_mask(pbar.float(), N, chunk_size=C, groups=1, q_block=qblk, impl="torch")
    kept, sp = dm.sparsity()
    prior = _dash_element_view(lp[0, 0], N, C)
    fig, axes = plt.subplots(1, 2, figsize=(9.6, 4.6))
    cmap = plt.get_cmap("viridis").copy()
    cmap.set_bad("#f4f4f4")
    im = axes[0].imshow(prior.numpy(), cmap=cmap, vmin=0, vmax=1, interpolation="nearest")
    axes[0].set_title(f"entmax router, gamma = {gamma}: prior weight\n"
                      "(diagonal chunk 1, selected chunks p-bar, grey = skipped)", fontsize=10)
    axes[0].set_xlabel("key position", fontsize=9)
    axes[0].set_ylabel("query position", fontsize=9)
    fig.colorbar(im, ax=axes[0], fraction=0.046, pad=0.02)
    _show_states(axes[1], dm.states[0, 0],
                 f"BlockMask ({qblk}-row query blocks x one {C}-token chunk)\n"
                 f"kept fraction {float(kept):.0%}, paper sparsity {float(sp):.0%}", block=(qblk, C))
    fig.legend(handles=STATE_LEGEND, loc="lower center", ncol=3, fontsize=9, frameon=False, bbox_to_anchor=(0.5, -0.05))
    _save(fig, "pattern_dash_entmax.png")

    # top-k on the same inputs
    kbar = reference.chunk_summaries(k, w, C)
    sel = flexsparse.topk_selection(q, kbar, chunk_size=C, top_k=top_k)
    dm = flexsparse.dash_block_mask(sel, N, chunk_size=C, groups=1, q_block=qblk, with_prior=False, impl="torch")
    kept, sp = dm.sparsity()
    i = torch.arange(N)
    mask = dm.mask_mod(0, 0, i[:, None], i[None, :])
    fig, axes = plt.subplots(1, 2, figsize=(9.6, 4.6))
    _show_mask(axes[0], mask, f"top-k router, k = {top_k}: attended pairs\n(k best earlier chunks + the diagonal chunk)")
    _show_states(axes[1], dm.states[0, 0],
                 f"BlockMask ({qblk}-row query blocks x one {C}-token chunk)\n"
                 f"kept fraction {float(kept):.0%}, paper sparsity {float(sp):.0%}", block=(qblk, C))
    fig.legend(handles=STATE_LEGEND, loc="lower center", ncol=3, fontsize=9, frameon=False, bbox_to_anchor=(0.5, -0.05))
    _save(fig, "pattern_dash_topk.png")


def sparsity_curve(q: torch.Tensor, k: torch.Tensor, C: int, gammas) -> tuple[list[float], list[float]]:
    """Kept fraction and paper sparsity of the reference router's selection for each gamma."""
    N, D = q.shape[2], q.shape[3]
    w = torch.zeros(k.shape[1], D, dtype=q.dtype)
    kept, sp = [], []
    for g in gammas:
        pbar = reference.dash_router(q, k, w, chunk_size=C, gamma=float(g))
        lp = reference.dash_log_prior(pbar, N, chunk_size=C)
        a, b = reference.dash_selection_stats(lp, C, N)
        kept.append(float(a))
        sp.append(float(b))
    return kept, sp


def fig_sparsity_vs_gamma() -> None:
    B, Hq, Hkv, N, D, C = 1, 4, 2, 8192, 64, 64
    gammas = [0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128]
    qs, ks, _ = structured_qkv(B, Hq, Hkv, N, D, C, seed=5)
    g = torch.Generator().manual_seed(6)
    qr, kr = torch.randn(B, Hq, N, D, generator=g), torch.randn(B, Hkv, N, D, generator=g)
    curves = {
        "structured inputs (8 topics)": sparsity_curve(qs, ks, C, gammas),
        "random Gaussian inputs": sparsity_curve(qr, kr, C, gammas),
    }
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.9))
    for (label, (kept, sp)), style in zip(curves.items(), ("o-", "s--")):
        axes[0].plot(gammas, kept, style, label=label)
        axes[1].plot(gammas, sp, style, label=label)
    axes[0].set_ylabel("kept fraction (speed)")
    axes[1].set_ylabel("paper sparsity (rows past 4096)")
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xticks([0.25, 1, 4, 16, 64], ["0.25", "1", "4", "16", "64"])
        ax.set_xlabel("gamma")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    axes[0].set_title(f"share of causal chunks attended\nN = {N}, C = {C}, Hq = {Hq}, Hkv = {Hkv}, D = {D}", fontsize=10)
    axes[1].set_title("1 - attended tokens / N", fontsize=10)
    axes[1].legend(fontsize=9, loc="lower right")
    _save(fig, "dash_sparsity_vs_gamma.png")


# ----------------------------------------------------------------------------------------------
# benchmarks


def _load(name: str) -> dict:
    with open(RESULTS / name) as f:
        return json.load(f)


def _speedups(rows: list[dict], mode: str = "fwd+bwd") -> dict[tuple[str, object], list[tuple[int, float]]]:
    out: dict = {}
    for r in rows:
        if r.get("method") != "flexsparse" or r.get("mode") != mode or r.get("x_vs_sdpa_cudnn") is None:
            continue
        out.setdefault((r["pattern"], r["param"]), []).append((r["N"], r["x_vs_sdpa_cudnn"]))
    return {key: sorted(v) for key, v in out.items()}


def fig_bench() -> None:
    panels = [
        ("B=4, H=48, D=64", ["scfa_full_B4H48D64_4k8k_NVIDIA_H100_80GB_HBM3.json",
                             "scfa_full_B4H48D64_16k32k_NVIDIA_H100_80GB_HBM3.json"]),
        ("B=1, H=16, D=128", ["scfa_full_B1H16D128_NVIDIA_H100_80GB_HBM3.json",
                              "scfa_128k_v2_NVIDIA_H100_80GB_HBM3.json"]),
    ]
    fig, axes = plt.subplots(1, 2, figsize=(10.5, 4.2), sharey=True)
    meta = None
    for ax, (title, files) in zip(axes, panels):
        rows = []
        for f in files:
            d = _load(f)
            meta = meta or d["meta"]
            rows += d["rows"]
        for (pattern, param), pts in sorted(_speedups(rows).items(), key=lambda kv: (kv[0][0], kv[0][1])):
            xs, ys = zip(*pts)
            label = f"hash, {param} buckets" if pattern == "hash" else f"drop rate {param}"
            ax.plot(xs, ys, "o-" if pattern == "hash" else "s--", label=label, markersize=4)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log", base=2)
        ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:g}x"))
        ax.set_xlabel("sequence length")
        ax.set_title(f"{title}, bf16, forward + backward", fontsize=10)
        ax.grid(alpha=0.3, which="both")
        xt = sorted({p[0] for pts in _speedups(rows).values() for p in pts})
        ax.set_xticks(xt, [f"{x // 1024}k" for x in xt])
    axes[0].set_ylabel("speedup over cuDNN dense causal")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", ncol=4, fontsize=9, frameon=False, bbox_to_anchor=(0.5, -0.01))
    fig.suptitle(f"{meta['gpu']}, torch {meta['torch']}, triton {meta['triton']} "
                 "(end to end: layout, mask build, FlexAttention, gathers)", fontsize=10)
    _save(fig, "bench_scfa_speedup.png")


FIGURES = {
    "concepts": fig_concepts,
    "hash": fig_hash,
    "drop": fig_drop,
    "dash": fig_dash,
    "gamma": fig_sparsity_vs_gamma,
    "bench": fig_bench,
}


def main(argv: list[str]) -> None:
    names = argv or list(FIGURES)
    for name in names:
        if name not in FIGURES:
            raise SystemExit(f"unknown figure {name!r}; choose from {sorted(FIGURES)}")
        torch.manual_seed(0)
        FIGURES[name]()


if __name__ == "__main__":
    main(sys.argv[1:])
