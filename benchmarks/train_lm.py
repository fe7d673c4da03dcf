"""Quality and speed of the flexsparse attention layers inside a trained model (issue 7).

A byte-level GPT-style causal LM (pre-norm blocks, rotary attention, GELU MLP) whose attention
layer is chosen by ``--attn``:

* ``dense``: the same projections as the flexsparse layers, ``F.scaled_dot_product_attention``
  (causal; ``--sdpa-backend auto`` lets SDPA choose, or force ``cudnn`` / ``flash`` / ...);
* ``hash``: :class:`flexsparse.HashSparseAttention` (``--n-buckets``, 16 by default);
* ``drop``: :class:`flexsparse.QKSparseAttention` (``--drop-rate``, 0.5 by default);
* ``dash``: :class:`flexsparse.DashAttention` (entmax router); ``--gamma`` or, by default, gamma
  calibrated on a batch at initialisation for ``--target-sparsity`` (0.75, the paper's sparsity:
  ``1 - attended tokens / N`` over the queries past position 4096), measured again at every
  evaluation;
* ``topk``: :class:`flexsparse.DashAttention` with the hard top-k router at the DashAttention run's
  *measured* sparsity (``--top-k``, ``--match-sparsity DASH.json``, or in ``--suite`` mode the dash
  run of the same task and length).

Training: AdamW, linear warm-up and cosine decay, bf16 autocast on CUDA (float32 on CPU),
``torch.compile`` of the whole model (``fullgraph=True``; ``--compile blocks`` compiles each block,
``--compile none`` runs eagerly), fixed seeds, one token budget ``--tokens`` for every variant
(``steps = tokens / batch_tokens``; ``--batch-tokens`` is split into ``batch_tokens // seq``
windows), evaluation every ``--eval-every`` steps on a fixed set of validation windows.
Evaluation calls the compiled training graph (grad mode on, no backward) so that it never
compiles a second graph. Reported: tokens/s (training steps only, after ``--timing-warmup`` steps,
evaluations excluded), validation loss and bits per byte (``loss / ln 2``), the measured sparsity
and kept fraction of the DashAttention layers, peak memory, start-up (compile) time.

Tasks (``--task``):

* ``lm``: next-byte prediction. Data: ``--data PATH`` (a text file, split 95/5 by bytes, or a
  folder, every text file, split by a hash of the relative path), by default the Python standard
  library's own ``*.py`` files of the running interpreter (``sysconfig``'s ``stdlib`` path,
  without site-packages or test directories unless ``--stdlib-tests``).
* ``mqar``: multi-query associative recall at long context: ``--mqar-pairs`` key-value pairs
  (distinct key bytes, random value bytes) at random places in random filler bytes, then every
  key queried once, in random order, at the end of the window. Loss and accuracy on the answers
  only (chance = 1 / 64).

Modes:
    python benchmarks/train_lm.py --attn dash --seq 8192 [--tokens 8e6] [--out DIR]   # one run
    python benchmarks/train_lm.py --suite [--tasks lm,mqar] [--seqs 8192,16384] ...     # the study
    python benchmarks/train_lm.py --summarize DIR                                       # table + plots
    python benchmarks/train_lm.py --suite --dry-run                                      # plan + time estimate

Each run writes ``<task>_<attn>_<seq><tag>.json`` (config, environment, corpus, per-evaluation
curve, training-loss curve, final metrics) under ``--out`` (default
``benchmarks/results/train_lm``), rewritten after every evaluation so a killed run keeps its curve.
The suite writes ``summary.md`` and loss-curve PNGs there (matplotlib is optional).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import gc
import hashlib
import importlib
import json
import math
import os
import platform
import subprocess
import sys
import sysconfig
import tempfile
import time

import torch
from torch import Tensor, nn
from torch.nn import functional as F

if not torch.cuda.is_available():  # Triton kernels run under the interpreter on CPU (as in tests/);
    os.environ.setdefault("TRITON_INTERPRET", "1")  # set before anything imports triton

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import flexsparse
from flexsparse.nn import _SparseSelfAttention

VARIANTS = ("dense", "hash", "drop", "dash", "topk")
TASKS = ("lm", "mqar")
DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "train_lm")

# MQAR vocabulary (inside the 256 byte values): filler, keys, values
MQAR_FILLER = (0, 64)
MQAR_KEYS = (64, 192)
MQAR_VALUES = (192, 256)


# ----------------------------------------------------------------------------------------------
# data


def _is_text(path: str) -> bool:
    try:
        with open(path, "rb") as fh:
            head = fh.read(8192)
    except OSError:
        return False
    if b"\0" in head:
        return False
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as e:  # a multi-byte character cut at the 8 KiB boundary is fine
        return e.start >= len(head) - 3
    return True


def stdlib_files(include_tests: bool = False) -> tuple[str, list[str]]:
    """``(root, sorted relative paths)`` of the ``*.py`` files of this interpreter's standard
    library (no site-packages / dist-packages; no test directories unless ``include_tests``)."""
    root = sysconfig.get_paths()["stdlib"]
    skip = {"site-packages", "dist-packages", "__pycache__"}
    if not include_tests:
        skip |= {"test", "tests", "idle_test"}
    out = []
    for d, dirs, files in os.walk(root):
        dirs[:] = sorted(x for x in dirs if x not in skip)
        out += [os.path.relpath(os.path.join(d, f), root) for f in files if f.endswith(".py")]
    return root, sorted(out)


def _is_val(rel: str, val_percent: float) -> bool:
    h = int.from_bytes(hashlib.sha1(rel.encode()).digest()[:4], "little")
    return (h % 10000) < val_percent * 100


def load_corpus(path: str | None, *, include_tests: bool = False, val_percent: float = 5.0,
                separator: bytes = b"\n\0\n") -> dict:
    """Bytes for training and validation: ``{"train": uint8 [n], "val": uint8 [m], "meta": {...}}``.

    A folder (or the default, the standard library) is split by file (a hash of the relative path
    puts ``val_percent`` % of the files into validation); files are joined with ``separator``.
    A single file is split by bytes: the last ``val_percent`` % is validation."""
    if path is not None and os.path.isfile(path):
        with open(path, "rb") as fh:
            raw = fh.read()
        cut = int(len(raw) * (1 - val_percent / 100))
        train, val = raw[:cut], raw[cut:]
        meta = {"source": os.path.abspath(path), "kind": "file", "files_train": 1, "files_val": 1}
    else:
        if path is None:
            root, rels = stdlib_files(include_tests)
            kind = "python-stdlib" + ("+tests" if include_tests else "")
        else:
            if not os.path.isdir(path):
                raise ValueError(f"--data {path!r} is neither a file nor a folder")
            root, rels = path, []
            for d, dirs, files in os.walk(path):
                dirs[:] = sorted(x for x in dirs if not x.startswith("."))
                rels += [os.path.relpath(os.path.join(d, f), root) for f in files if _is_text(os.path.join(d, f))]
            rels.sort()
            kind = "folder"
        parts: dict[bool, list[bytes]] = {False: [], True: []}
        for rel in rels:
            with open(os.path.join(root, rel), "rb") as fh:
                parts[_is_val(rel, val_percent)].append(fh.read())
        train, val = separator.join(parts[False]), separator.join(parts[True])
        meta = {"source": os.path.abspath(root), "kind": kind, "files_train": len(parts[False]),
                "files_val": len(parts[True])}
    if not train or not val:
        raise ValueError(f"corpus {meta['source']!r}: empty training or validation split")
    meta.update(bytes_train=len(train), bytes_val=len(val),
                sha1=hashlib.sha1(train + b"|" + val).hexdigest()[:16], python=platform.python_version())
    as_t = lambda b: torch.frombuffer(bytearray(b), dtype=torch.uint8)
    return {"train": as_t(train), "val": as_t(val), "meta": meta}


class ByteWindows:
    """Random windows of ``seq + 1`` bytes of ``data`` (on ``device``): ``sample() -> (x, y, None)``
    with ``x, y`` int64 ``[batch, seq]`` (``y`` = ``x`` shifted by one)."""

    def __init__(self, data: Tensor, seq: int, batch: int, device, seed: int):
        if data.numel() < seq + 2:
            raise ValueError(f"the data split has {data.numel()} bytes, fewer than a window of seq + 1 = {seq + 1}")
        self.data, self.seq, self.batch = data.to(device), seq, batch
        self.gen = torch.Generator(device=device).manual_seed(seed)
        self.offs = torch.arange(seq + 1, device=device)

    def sample(self):
        start = torch.randint(0, self.data.numel() - self.seq - 1, (self.batch, 1), generator=self.gen,
                              device=self.data.device)
        w = self.data[start + self.offs].long()
        return w[:, :-1], w[:, 1:], None


class MQAR:
    """Multi-query associative recall windows: ``sample() -> (x, y, mask)``.

    A window of ``seq + 1`` tokens: filler bytes in ``[0, 64)``; ``pairs`` key-value pairs
    (distinct keys in ``[64, 192)``, values in ``[192, 256)``), each written ``repeats`` times at
    random non-overlapping places of the context ``[0, seq + 1 - 2 * pairs)``; then the query
    region: every key once, in random order, followed by its value.

    ``mask [batch, seq]`` int8 over the inputs: 2 on the query keys of the final region (trained
    and scored: the accuracy of the task), 1 on the later occurrences of a key in the context
    (trained only: they make the recall circuit learnable in a short budget), 0 elsewhere. The
    target of a masked input is its value."""

    def __init__(self, seq: int, batch: int, pairs: int, device, seed: int, repeats: int = 1):
        n_keys = MQAR_KEYS[1] - MQAR_KEYS[0]
        if not 1 <= pairs <= n_keys:
            raise ValueError(f"--mqar-pairs must be in [1, {n_keys}], got {pairs}")
        if repeats < 1:
            raise ValueError(f"--mqar-repeats must be >= 1, got {repeats}")
        self.start = seq + 1 - 2 * pairs  # first token of the query region
        if self.start // 2 < pairs * repeats:
            raise ValueError(f"seq = {seq} is too short for {pairs} pairs x {repeats} repeats plus their queries")
        self.seq, self.batch, self.pairs, self.repeats, self.device = seq, batch, pairs, repeats, device
        self.gen = torch.Generator(device=device).manual_seed(seed)
        self.qpos = self.start + 2 * torch.arange(pairs, device=device)

    def _perm(self, n: int, k: int) -> Tensor:
        """``[batch, k]`` distinct values of ``range(n)``, random per row."""
        return torch.rand(self.batch, n, generator=self.gen, device=self.device).argsort(-1)[:, :k]

    def sample(self):
        B, P, R, L, dev = self.batch, self.pairs, self.repeats, self.seq + 1, self.device
        seq = torch.randint(*MQAR_FILLER, (B, L), generator=self.gen, device=dev)
        keys = MQAR_KEYS[0] + self._perm(MQAR_KEYS[1] - MQAR_KEYS[0], P)
        vals = torch.randint(*MQAR_VALUES, (B, P), generator=self.gen, device=dev)
        pos = 2 * self._perm(self.start // 2, P * R)  # [B, R * P]: occurrence r of pair j at column r * P + j
        seq.scatter_(1, pos, keys.repeat(1, R))
        seq.scatter_(1, pos + 1, vals.repeat(1, R))
        order = self._perm(P, P)
        seq[:, self.qpos] = keys.gather(1, order)
        seq[:, self.qpos + 1] = vals.gather(1, order)
        mask = torch.zeros(B, self.seq, dtype=torch.int8, device=dev)
        if R > 1:  # every occurrence but the first of each key
            first = pos.view(B, R, P).amin(dim=1, keepdim=True)
            later = pos.view(B, R, P) != first
            mask.scatter_(1, pos, later.view(B, R * P).to(torch.int8))
        mask[:, self.qpos] = 2
        return seq[:, :-1], seq[:, 1:], mask


# ----------------------------------------------------------------------------------------------
# model


class SDPAttention(_SparseSelfAttention):
    """Dense causal self-attention with the projections (and rotary embedding) of the flexsparse
    layers: ``F.scaled_dot_product_attention(is_causal=True)``. GQA: K and V are expanded to the
    query heads first, so that every SDPA backend (cuDNN included) can run."""

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = self._project(x)
        G = self.heads // self.kv_heads
        if G > 1:
            k, v = k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)
        return self._finish(F.scaled_dot_product_attention(q, k, v, is_causal=True))


def make_attention(cfg: argparse.Namespace) -> nn.Module:
    common = {"kv_heads": cfg.kv_heads, "rotary": not cfg.no_rotary}
    if cfg.attn == "dense":
        return SDPAttention(cfg.dim, cfg.heads, **common)
    common["backend"] = cfg.attn_backend
    if cfg.attn == "hash":
        return flexsparse.HashSparseAttention(cfg.dim, cfg.heads, n_buckets=cfg.n_buckets, block_size=cfg.block_size,
                                              **common)
    if cfg.attn == "drop":
        return flexsparse.QKSparseAttention(cfg.dim, cfg.heads, drop_rate=cfg.drop_rate, block_size=cfg.block_size,
                                            **common)
    dash = {"chunk_size": cfg.chunk_size, "q_block": cfg.q_block, "track_sparsity": True, **common}
    if cfg.attn == "dash":
        return flexsparse.DashAttention(cfg.dim, cfg.heads, gamma=cfg.gamma or 1.0, **dash)
    if cfg.attn == "topk":
        return flexsparse.DashAttention(cfg.dim, cfg.heads, router="topk", top_k=cfg.top_k, **dash)
    raise ValueError(f"--attn must be one of {VARIANTS}, got {cfg.attn!r}")


class Block(nn.Module):
    """Pre-norm block: ``x + attn(norm(x))``, then ``x + mlp(norm(x))`` (GELU, 4x wide)."""

    def __init__(self, cfg: argparse.Namespace):
        super().__init__()
        d = cfg.dim
        self.norm1, self.attn = nn.LayerNorm(d), make_attention(cfg)
        self.norm2 = nn.LayerNorm(d)
        self.fc, self.proj = nn.Linear(d, 4 * d, bias=False), nn.Linear(4 * d, d, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.proj(F.gelu(self.fc(self.norm2(x)), approximate="tanh"))


class ByteGPT(nn.Module):
    """``forward(x [B, N] int64, y [B, N] int64, mask=None) -> (loss, correct)``.

    ``loss``: mean next-token cross-entropy in float32, over every position, or over the positions
    where ``mask [B, N]`` (int) is non-zero; ``correct``: None, or the number of positions with
    ``mask == 2`` whose argmax is ``y``."""

    def __init__(self, cfg: argparse.Namespace, vocab: int = 256):
        super().__init__()
        self.vocab = vocab
        self.embed = nn.Embedding(vocab, cfg.dim)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
        self.norm = nn.LayerNorm(cfg.dim)
        self.head = nn.Linear(cfg.dim, vocab, bias=False)

    def init_weights(self, seed: int) -> None:
        """GPT-2 style: N(0, 0.02) for embeddings and linear weights, output projections scaled by
        ``1 / sqrt(2 * layers)``, from one seeded generator in a fixed order so that every
        attention variant starts from the same weights (DashAttention's summary vectors keep
        their zero initialisation, hash rotations their own draw)."""
        g = torch.Generator().manual_seed(seed)
        std_out = 0.02 / math.sqrt(2 * len(self.blocks))
        for name, mod in self.named_modules():
            if isinstance(mod, (nn.Linear, nn.Embedding)):
                std = std_out if name.endswith(("attn.out", ".proj")) else 0.02
                with torch.no_grad():
                    mod.weight.copy_(torch.randn(mod.weight.shape, generator=g) * std)
                    if getattr(mod, "bias", None) is not None:
                        mod.bias.zero_()

    def forward(self, x: Tensor, y: Tensor, mask: Tensor | None = None):
        h = self.embed(x)
        for block in self.blocks:
            h = block(h)
        logits = self.head(self.norm(h)).float()
        ce = F.cross_entropy(logits.view(-1, self.vocab), y.reshape(-1), reduction="none").view(y.shape)
        if mask is None:
            return ce.mean(), None
        m = (mask > 0).to(ce.dtype)
        loss = (ce * m).sum() / m.sum().clamp_min(1.0)
        correct = ((logits.argmax(-1) == y) & (mask == 2)).sum()
        return loss, correct


def dash_layers(model: nn.Module) -> list:
    return [m for m in model.modules() if isinstance(m, flexsparse.DashAttention)]


def read_stats(model: nn.Module) -> dict[str, float] | None:
    """Mean ``{"sparsity", "kept_fraction"}`` over the DashAttention layers' ``last_stats``."""
    layers = [m for m in dash_layers(model) if m.last_stats is not None]
    if not layers:
        return None
    return {k: sum(float(m.last_stats[k]) for m in layers) / len(layers) for k in ("sparsity", "kept_fraction")}


def topk_for_sparsity(sparsity: float, seq: int, chunk: int) -> int:
    """Past chunks per query whose paper-style sparsity is ``sparsity`` at length ``seq``: a
    query attends ``(top_k + 1) * chunk`` tokens (its own chunk included), so
    ``sparsity = 1 - (top_k + 1) * chunk / seq`` for the queries past position 4096."""
    return max(0, min(seq // chunk, round((1.0 - sparsity) * seq / chunk) - 1))


def calibrate_gamma(model: ByteGPT, batch, target: float, *, iters: int, autocast, lo: float = 1e-2,
                    hi: float = 1e6) -> tuple[float, float, list]:
    """The router gamma (one for every DashAttention layer) whose mean measured sparsity on
    ``batch`` is closest to ``target``: bisection in log-space (sparsity grows with gamma), eager
    forward passes without gradients at the current weights. Returns ``(gamma, sparsity, trace)``."""
    layers = dash_layers(model)
    x, y, mask = batch

    def measure(g: float) -> float:
        for m in layers:
            m.gamma = float(g)
        with torch.no_grad(), autocast():
            model(x, y, mask)
        return read_stats(model)["sparsity"]

    trace = []
    best = None
    for _ in range(iters):
        g = math.sqrt(lo * hi)
        s = measure(g)
        trace.append((g, s))
        if best is None or abs(s - target) < abs(best[1] - target):
            best = (g, s)
        if s < target:
            lo = g
        else:
            hi = g
    for m in layers:
        m.gamma = float(best[0])
    return best[0], best[1], trace


# ----------------------------------------------------------------------------------------------
# environment and estimates


def environment() -> dict:
    env = {"torch": torch.__version__, "python": platform.python_version(), "flexsparse": flexsparse.__version__,
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "device": "cuda" if torch.cuda.is_available() else "cpu"}
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        pass
    if torch.cuda.is_available():
        env.update(gpu=torch.cuda.get_device_name(), cuda=torch.version.cuda,
                   cudnn=torch.backends.cudnn.version())
    try:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env["git"] = subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"], capture_output=True,
                                    text=True, timeout=5, check=False).stdout.strip() or None
    except Exception:  # noqa: BLE001 - no git on the machine
        env["git"] = None
    return env


def flops_per_token(cfg: argparse.Namespace, seq: int) -> float:
    """Training FLOPs per token of the *dense* model (forward + backward = 3x forward): ``6 P`` for
    the matmul weights plus ``6 L (Hq D) N`` for causal attention (QK^T and PV, half the square)."""
    D = cfg.dim // cfg.heads
    per_layer = cfg.dim * (cfg.heads + 2 * cfg.kv_heads) * D + cfg.heads * D * cfg.dim + 8 * cfg.dim * cfg.dim
    params = cfg.layers * per_layer + 256 * cfg.dim
    return 6.0 * params + 6.0 * cfg.layers * cfg.heads * D * seq


# ----------------------------------------------------------------------------------------------
# one run


def run_name(cfg: argparse.Namespace) -> str:
    return f"{cfg.task}_{cfg.attn}_{cfg.seq}{cfg.tag}"


def _lr(step: int, steps: int, cfg) -> float:
    warm = max(1, int(cfg.warmup * steps))
    if step < warm:
        return cfg.lr * (step + 1) / warm
    t = (step - warm) / max(1, steps - warm)
    return cfg.lr * (cfg.min_lr + (1 - cfg.min_lr) * 0.5 * (1 + math.cos(math.pi * t)))


def _json_safe(d: dict) -> dict:
    return {k: v for k, v in d.items() if isinstance(v, (str, int, float, bool, type(None), list))}


def _progress(disable: bool):
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TimeRemainingColumn(), TextColumn("{task.fields[info]}"), disable=disable)


def _resolve_top_k(cfg) -> None:
    if cfg.attn != "topk" or cfg.top_k is not None:
        return
    if cfg.match_sparsity:
        with open(cfg.match_sparsity) as fh:
            ref = json.load(fh)
        s = ref["final"].get("sparsity_mean")
        if s is None:
            raise ValueError(f"{cfg.match_sparsity}: no measured sparsity (not a dash run?)")
        if ref["config"]["seq"] != cfg.seq:
            raise ValueError(f"{cfg.match_sparsity} is a run at seq {ref['config']['seq']}, this one is at {cfg.seq}")
        cfg.matched_sparsity = s
    else:
        s = cfg.target_sparsity
    cfg.top_k = topk_for_sparsity(s, cfg.seq, cfg.chunk_size)


def train_one(cfg: argparse.Namespace, corpus: dict | None = None, console=None) -> dict:
    """Train one model (``cfg.task``, ``cfg.attn``, ``cfg.seq``); write and return its result."""
    from rich.console import Console

    console = console or Console(width=180)
    t_start = time.perf_counter()
    dev = torch.device(cfg.device)
    cuda = dev.type == "cuda"
    if cfg.batch_tokens % cfg.seq:
        raise ValueError(f"--batch-tokens {cfg.batch_tokens} must be a multiple of --seq {cfg.seq}")
    batch = cfg.batch_tokens // cfg.seq
    steps = max(1, int(cfg.tokens) // cfg.batch_tokens)
    eval_every = cfg.eval_every or max(1, steps // cfg.evals)
    _resolve_top_k(cfg)

    torch.manual_seed(cfg.seed)
    if cuda:
        torch.cuda.manual_seed_all(cfg.seed)
    if cfg.task == "lm":
        if corpus is None:
            corpus = load_corpus(cfg.data, include_tests=cfg.stdlib_tests)
        train_data = ByteWindows(corpus["train"], cfg.seq, batch, dev, cfg.seed)
        val_data = ByteWindows(corpus["val"], cfg.seq, batch, dev, cfg.seed + 1)
        calib_data = ByteWindows(corpus["train"], cfg.seq, batch, dev, cfg.seed + 2)
        data_meta = corpus["meta"]
    else:
        train_data = MQAR(cfg.seq, batch, cfg.mqar_pairs, dev, cfg.seed, cfg.mqar_repeats)
        val_data = MQAR(cfg.seq, batch, cfg.mqar_pairs, dev, cfg.seed + 1, cfg.mqar_repeats)
        calib_data = MQAR(cfg.seq, batch, cfg.mqar_pairs, dev, cfg.seed + 2, cfg.mqar_repeats)
        data_meta = {"kind": "mqar", "pairs": cfg.mqar_pairs, "repeats": cfg.mqar_repeats, "chance": 1.0 / (MQAR_VALUES[1] - MQAR_VALUES[0])}
    val_batches = [val_data.sample() for _ in range(cfg.eval_batches)]

    model = ByteGPT(cfg)
    model.init_weights(cfg.seed)
    if cfg.init_from:  # e.g. the language model of the same variant, for the retrieval task
        model.load_state_dict(torch.load(cfg.init_from, map_location="cpu", weights_only=True))
    model.to(dev)
    n_params = sum(p.numel() for p in model.parameters())

    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if cuda else contextlib.nullcontext
    result = {
        "task": cfg.task, "attn": cfg.attn, "seq": cfg.seq, "name": run_name(cfg),
        "config": _json_safe(vars(cfg)), "env": environment(), "data": data_meta,
        "model": {"params": n_params, "batch": batch, "steps": steps, "eval_every": eval_every,
                  "flops_per_token_dense": flops_per_token(cfg, cfg.seq)},
        "calibration": None, "curve": [], "train_curve": [], "final": {}, "status": "running",
    }
    path = os.path.join(cfg.out, run_name(cfg) + ".json")
    os.makedirs(cfg.out, exist_ok=True)

    def save():
        with open(path, "w") as fh:
            json.dump(result, fh, indent=1)

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    sdpa_ctx = contextlib.nullcontext()
    if cfg.attn == "dense" and cfg.sdpa_backend != "auto":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        names = {"cudnn": "CUDNN_ATTENTION", "flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION",
                 "math": "MATH"}
        sdpa_ctx = sdpa_kernel(getattr(SDPBackend, names[cfg.sdpa_backend]))
    autotune = cfg.autotune == "on" or (
        cfg.autotune == "auto" and cuda and cfg.compile != "none" and cfg.attn in ("dash", "topk")
        and (cfg.chunk_size % 128 or cfg.q_block % 128)
    )
    # FlexAttention's backward with 64-wide KV blocks has no default kernel config on torch 2.11
    # (NoValidChoicesError): autotune its templates, GEMMs stay on cuBLAS
    inductor_ctx = (importlib.import_module("torch._inductor.config").patch(max_autotune=True, max_autotune_gemm_backends="ATEN")
                    if autotune else contextlib.nullcontext())
    result["model"]["autotune"] = bool(autotune)

    # DashAttention: gamma for the target sparsity, on one training-like batch, eager
    if cfg.attn == "dash":
        if cfg.gamma:
            result["calibration"] = {"gamma": cfg.gamma, "given": True}
        else:
            t0 = time.perf_counter()
            init_batch = calib_data.sample()
            g, s, trace = calibrate_gamma(model, init_batch, cfg.target_sparsity, iters=cfg.calib_iters,
                                          autocast=autocast)
            result["calibration"] = {"gamma": g, "sparsity_at_init": s, "target": cfg.target_sparsity,
                                     "trace": trace, "seconds": time.perf_counter() - t0, "history": []}
            console.print(f"[cyan]{run_name(cfg)}: gamma {g:.4g} -> sparsity {s:.3f} at init "
                          f"(target {cfg.target_sparsity}, {time.perf_counter() - t0:.1f} s)[/]")
    if cfg.attn == "topk":
        result["calibration"] = {"top_k": cfg.top_k, "matched_sparsity": getattr(cfg, "matched_sparsity", None),
                                 "target_sparsity": cfg.target_sparsity}
        console.print(f"[cyan]{run_name(cfg)}: top_k = {cfg.top_k} past chunks of {cfg.chunk_size}[/]")

    with sdpa_ctx, inductor_ctx:
        if cfg.compile == "model":
            fwd = torch.compile(model, fullgraph=not cfg.no_fullgraph, dynamic=False)
        elif cfg.compile == "blocks":
            for b in model.blocks:
                b.compile(fullgraph=not cfg.no_fullgraph, dynamic=False)
            fwd = model
        else:
            fwd = model

        decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed" not in n and "summary" not in n]
        no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embed" not in n and "summary" not in n)]
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                 {"params": no_decay, "weight_decay": 0.0}],
                                lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8, **({"fused": True} if cuda else {}))

        def sync():
            if cuda:
                torch.cuda.synchronize()

        def evaluate(step: int, tokens: int) -> dict:
            t0 = time.perf_counter()
            losses, correct, count, stats = [], 0, 0, []
            with torch.random.fork_rng(devices=[dev] if cuda else []):
                torch.manual_seed(cfg.seed + 12345)  # the same drop masks at every evaluation
                for x, y, mask in val_batches:
                    with torch.enable_grad(), autocast():  # the training graph, no second compile
                        loss, corr = fwd(x, y, mask)
                    losses.append(float(loss.detach()))
                    if corr is not None:
                        correct += int(corr)
                        count += int((mask == 2).sum())
                    s = read_stats(model)
                    if s is not None:
                        stats.append(s)
            row = {"step": step, "tokens": tokens, "val_loss": sum(losses) / len(losses)}
            row["val_bpb"] = row["val_loss"] / math.log(2) if cfg.task == "lm" else None
            if count:
                row["val_acc"] = correct / count
            if stats:
                row.update({k: sum(s[k] for s in stats) / len(stats) for k in ("sparsity", "kept_fraction")})
            row["seconds"] = time.perf_counter() - t0
            return row

        def compiled_sparsity(batch, eager: float) -> float:
            """The sparsity the compiled model measures on the calibration batch: it must agree with
            the eager calibration, or the compiled graph did not pick up the new gamma."""
            with torch.enable_grad(), autocast():
                fwd(*batch)
            got = read_stats(model)["sparsity"]
            if abs(got - eager) > 0.03:
                raise RuntimeError(f"the compiled model measures sparsity {got:.4f} where the eager calibration "
                                   f"measured {eager:.4f}: gamma did not reach the compiled graph")
            return got

        if result["calibration"] and "sparsity_at_init" in result["calibration"]:
            result["calibration"]["sparsity_at_init_compiled"] = compiled_sparsity(
                init_batch, result["calibration"]["sparsity_at_init"])

        tokens = 0
        train_s, timed_tokens = 0.0, 0
        seg_start = None
        loss_acc, loss_n = torch.zeros((), device=dev), 0
        truncated = False
        recal_steps = ({max(1, int(f * steps)) for f in cfg.recalibrate_at if 0 < f < 1}
                       if cfg.attn == "dash" and not cfg.gamma else set())
        startup_s, time_from = None, cfg.timing_warmup
        with _progress(cfg.no_progress) as prog:
            task = prog.add_task(run_name(cfg), total=steps, info="")
            result["curve"].append(evaluate(0, 0))
            save()
            for step in range(steps):
                if step in recal_steps:
                    sync()
                    if seg_start is not None:
                        train_s += time.perf_counter() - seg_start
                    seg_start, time_from = None, step + cfg.timing_warmup  # the recompile is not timed
                    t0 = time.perf_counter()
                    cb = calib_data.sample()
                    g, s, trace = calibrate_gamma(model, cb, cfg.target_sparsity, iters=cfg.calib_iters,
                                                  autocast=autocast)
                    s_c = compiled_sparsity(cb, s)
                    result["calibration"]["history"].append({"step": step, "gamma": g, "sparsity": s,
                                                             "sparsity_compiled": s_c,
                                                             "seconds": time.perf_counter() - t0})
                    console.print(f"[cyan]step {step}: recalibrated gamma {g:.4g} -> sparsity {s:.3f} "
                                  f"(compiled model: {s_c:.3f}, after one recompile)[/]")
                if seg_start is None and step == time_from:
                    sync()
                    seg_start = time.perf_counter()
                    if startup_s is None:
                        startup_s = seg_start - t_start
                for group in opt.param_groups:
                    group["lr"] = _lr(step, steps, cfg)
                x, y, mask = train_data.sample()
                with autocast():
                    loss, _ = fwd(x, y, mask)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                opt.step()
                opt.zero_grad(set_to_none=True)
                tokens += cfg.batch_tokens
                if seg_start is not None:
                    timed_tokens += cfg.batch_tokens
                loss_acc += loss.detach()
                loss_n += 1
                last = step == steps - 1
                over = cfg.max_run_seconds and time.perf_counter() - t_start > cfg.max_run_seconds
                if (step + 1) % cfg.log_every == 0 or last or over:
                    tl = float(loss_acc) / loss_n
                    if not math.isfinite(tl):
                        result["status"] = "diverged"
                    result["train_curve"].append({"step": step + 1, "tokens": tokens, "loss": tl,
                                                  "lr": opt.param_groups[0]["lr"]})
                    loss_acc.zero_()
                    loss_n = 0
                    rate = timed_tokens / (train_s + time.perf_counter() - seg_start) if seg_start and timed_tokens else 0
                    prog.update(task, info=f"loss {tl:.3f}  {rate / 1e3:.0f}k tok/s")
                prog.update(task, advance=1)
                if (step + 1) % eval_every == 0 or last or over or result["status"] == "diverged":
                    sync()
                    if seg_start is not None:
                        train_s += time.perf_counter() - seg_start
                    row = evaluate(step + 1, tokens)
                    row["elapsed"] = time.perf_counter() - t_start
                    result["curve"].append(row)
                    result["final"] = _final(result, tokens, timed_tokens, train_s, startup_s, cfg, cuda)
                    save()
                    msg = f"step {step + 1}: val loss {row['val_loss']:.4f}"
                    if "val_acc" in row:
                        msg += f" acc {row['val_acc']:.3f}"
                    if "sparsity" in row:
                        msg += f" sparsity {row['sparsity']:.3f} kept {row['kept_fraction']:.3f}"
                    prog.console.print(msg)
                    seg_start = time.perf_counter() if seg_start is not None else None
                if over:
                    truncated = True
                    console.print(f"[yellow]{run_name(cfg)}: stopped after {step + 1} of {steps} steps "
                                  f"(--max-run-seconds {cfg.max_run_seconds})[/]")
                    break
                if result["status"] == "diverged":
                    console.print(f"[red]{run_name(cfg)}: non-finite training loss at step {step + 1}[/]")
                    break
    if result["status"] == "running":
        result["status"] = "truncated" if truncated else "done"
    result["final"] = _final(result, tokens, timed_tokens, train_s, startup_s, cfg, cuda)
    result["final"]["wall_s"] = time.perf_counter() - t_start
    if cfg.save_checkpoint:
        os.makedirs(os.path.dirname(os.path.abspath(cfg.save_checkpoint)), exist_ok=True)
        torch.save(model.state_dict(), cfg.save_checkpoint)
        result["checkpoint"] = cfg.save_checkpoint
    save()
    console.print(f"[green]{run_name(cfg)}[/]: {_fmt_final(result)}  -> {path}")
    return result


def _final(result, tokens, timed_tokens, train_s, startup_s, cfg, cuda) -> dict:
    last = result["curve"][-1]
    fin = {"steps": result["train_curve"][-1]["step"] if result["train_curve"] else 0, "tokens": tokens,
           "val_loss": last["val_loss"], "val_bpb": last.get("val_bpb"), "val_acc": last.get("val_acc"),
           "tokens_per_s": timed_tokens / train_s if train_s > 0 else None, "timed_tokens": timed_tokens,
           "train_s": train_s, "startup_s": startup_s,
           "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None}
    fin["tflops_dense_equiv"] = (fin["tokens_per_s"] * result["model"]["flops_per_token_dense"] / 1e12
                                 if fin["tokens_per_s"] else None)
    # the mean over the evaluations after the last (re)calibration: the regime top-k is matched to
    hist = (result.get("calibration") or {}).get("history") or []
    after = max([h["step"] for h in hist], default=0)
    rows = [r for r in result["curve"] if r["step"] > after and "sparsity" in r]
    sp, kf = [r["sparsity"] for r in rows], [r["kept_fraction"] for r in rows]
    if sp:
        fin.update(sparsity=sp[-1], kept_fraction=kf[-1], sparsity_mean=sum(sp) / len(sp),
                   kept_fraction_mean=sum(kf) / len(kf))
    return fin


def _fmt_final(r: dict) -> str:
    f = r["final"]
    out = f"val loss {f['val_loss']:.4f}"
    if f.get("val_bpb") is not None:
        out += f" ({f['val_bpb']:.3f} bpb)"
    if f.get("val_acc") is not None:
        out += f" acc {f['val_acc']:.3f}"
    if f.get("tokens_per_s"):
        out += f", {f['tokens_per_s'] / 1e3:.1f}k tok/s"
    if f.get("sparsity") is not None:
        out += f", sparsity {f['sparsity']:.3f} (mean {f['sparsity_mean']:.3f})"
    if f.get("peak_mem_gib") is not None:
        out += f", peak {f['peak_mem_gib']:.1f} GiB"
    return out


# ----------------------------------------------------------------------------------------------
# suite and summary


def suite_plan(cfg) -> list[tuple[str, int, str]]:
    variants = [v for v in VARIANTS if v in cfg.variants]  # dash before topk (top-k matches it)
    plan = []
    for task in cfg.tasks:
        for seq in (cfg.seqs if task == "lm" else cfg.mqar_seqs):
            plan += [(task, seq, v) for v in variants]
    return plan


def run_suite(cfg) -> list[dict]:
    from rich.console import Console

    console = Console(width=180)
    plan = suite_plan(cfg)
    t0 = time.perf_counter()
    corpus = load_corpus(cfg.data, include_tests=cfg.stdlib_tests) if "lm" in cfg.tasks else None
    if corpus is not None:
        m = corpus["meta"]
        console.print(f"corpus {m['kind']} {m['source']}: {m['files_train']} + {m['files_val']} files, "
                      f"{m['bytes_train'] / 1e6:.1f} + {m['bytes_val'] / 1e6:.2f} MB")
    results, done = [], {}
    for i, (task, seq, attn) in enumerate(plan):
        rc = copy.copy(cfg)
        rc.task, rc.seq, rc.attn = task, seq, attn
        rc.tokens = cfg.mqar_tokens if task == "mqar" and cfg.mqar_tokens else cfg.tokens
        if cfg.mqar_init == "lm" and "mqar" in cfg.tasks:  # the lm runs hand their weights to mqar
            ckpt = os.path.join(cfg.ckpt_dir, f"lm_{attn}_{seq}{cfg.tag}.pt")
            if task == "lm" and seq in cfg.mqar_seqs:
                rc.save_checkpoint = ckpt
            elif task == "mqar":
                if not os.path.exists(ckpt):
                    raise FileNotFoundError(f"--mqar-init lm: no language model {ckpt} (run --tasks lm,mqar with "
                                            f"{seq} in --seqs, or the same --ckpt-dir)")
                rc.init_from = ckpt
        path = os.path.join(cfg.out, run_name(rc) + ".json")
        if cfg.skip_existing and os.path.exists(path):
            with open(path) as fh:
                r = json.load(fh)
            if r.get("status") in ("done", "truncated"):
                console.print(f"[dim]{run_name(rc)}: kept the existing result[/]")
                results.append(r)
                done[(task, seq, attn)] = r
                continue
        if cfg.deadline_minutes and time.perf_counter() - t0 > 60 * cfg.deadline_minutes:
            console.print(f"[yellow]deadline of {cfg.deadline_minutes} min reached: skipping {run_name(rc)} "
                          f"and the {len(plan) - i - 1} runs after it[/]")
            break
        if attn == "topk" and cfg.top_k is None and not cfg.match_sparsity and (task, seq, "dash") in done:
            s = done[(task, seq, "dash")]["final"].get("sparsity_mean")
            if s is not None:
                rc.matched_sparsity = s
                rc.top_k = topk_for_sparsity(s, seq, cfg.chunk_size)
        console.rule(f"[{i + 1}/{len(plan)}] {run_name(rc)}  ({time.perf_counter() - t0:.0f} s into the suite)")
        torch._dynamo.reset()
        try:
            r = train_one(rc, corpus if task == "lm" else None, console)
        except Exception as e:
            if not cfg.keep_going:
                raise
            console.print(f"[red]{run_name(rc)} failed: {type(e).__name__}: {e}[/]")
            r = {"task": task, "attn": attn, "seq": seq, "name": run_name(rc), "status": "failed",
                 "error": f"{type(e).__name__}: {str(e)[:2000]}", "config": _json_safe(vars(rc)), "final": {}}
            os.makedirs(cfg.out, exist_ok=True)
            with open(path, "w") as fh:
                json.dump(r, fh, indent=1)
        results.append(r)
        done[(task, seq, attn)] = r
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        summarize(cfg.out, console=console, plots=False)  # a partial summary survives a kill
    summarize(cfg.out, console=console)
    console.print(f"suite: {time.perf_counter() - t0:.0f} s")
    return results


def _load_results(directory: str) -> list[dict]:
    out = []
    for name in sorted(os.listdir(directory)):
        if not name.endswith(".json"):
            continue
        try:
            with open(os.path.join(directory, name)) as fh:
                r = json.load(fh)
        except (OSError, json.JSONDecodeError):
            continue
        if isinstance(r, dict) and r.get("task") in TASKS and "attn" in r:
            out.append(r)
    order = {v: i for i, v in enumerate(VARIANTS)}
    return sorted(out, key=lambda r: (TASKS.index(r["task"]), r["seq"], order.get(r["attn"], 99), r.get("name", "")))


def _f(x, fmt: str) -> str:
    return "—" if x is None else format(x, fmt)


def summary_rows(results: list[dict]) -> list[dict]:
    """One row per run with the ratios to the dense run of the same task, length and tag."""
    dense = {(r["task"], r["seq"], r.get("config", {}).get("tag", "")): r for r in results if r["attn"] == "dense"}
    rows = []
    for r in results:
        f, cal = r.get("final", {}), r.get("calibration") or {}
        d = dense.get((r["task"], r["seq"], r.get("config", {}).get("tag", "")), {}).get("final", {})
        speed = f.get("tokens_per_s") / d["tokens_per_s"] if f.get("tokens_per_s") and d.get("tokens_per_s") else None
        knob = None
        if r["attn"] == "dash":
            g = (cal.get("history") or [cal])[-1].get("gamma")
            knob = f"γ={g:.3g}" if g else None
        elif r["attn"] == "topk":
            knob = f"k={cal.get('top_k')}"
        elif r["attn"] == "hash":
            knob = f"{r['config'].get('n_buckets')} buckets"
        elif r["attn"] == "drop":
            knob = f"drop {r['config'].get('drop_rate')}"
        rows.append({
            "task": r["task"], "seq": r["seq"], "attn": r["attn"], "knob": knob,
            "status": (r.get("status") or "?") + (" (tokens ≠ dense)" if d.get("tokens") and f.get("tokens")
                                                   and d["tokens"] != f["tokens"] else ""),
            "tokens": f.get("tokens"), "tok_s": f.get("tokens_per_s"), "speedup": speed,
            "val_loss": f.get("val_loss"), "bpb": f.get("val_bpb"), "acc": f.get("val_acc"),
            "d_loss": f["val_loss"] - d["val_loss"] if f.get("val_loss") is not None and d.get("val_loss") is not None
            and r["attn"] != "dense" else None,
            "sparsity": f.get("sparsity"), "kept": f.get("kept_fraction"), "peak": f.get("peak_mem_gib"),
            "startup": f.get("startup_s"), "gpu": r.get("env", {}).get("gpu"),
        })
    return rows


_COLUMNS = [  # (header, key, format)
    ("task", "task", "s"), ("seq", "seq", "d"), ("attention", "attn", "s"), ("setting", "knob", "s"),
    ("tokens", "tokens", ".3g"), ("tokens/s", "tok_s", ",.0f"), ("× dense", "speedup", ".2f"),
    ("val loss", "val_loss", ".4f"), ("Δ vs dense", "d_loss", "+.4f"), ("bits/byte", "bpb", ".3f"),
    ("accuracy", "acc", ".3f"), ("sparsity", "sparsity", ".3f"), ("kept", "kept", ".3f"),
    ("peak GiB", "peak", ".1f"), ("start-up s", "startup", ".0f"), ("status", "status", "s"),
]


def summarize(directory: str, *, console=None, plots: bool = True) -> str:
    """Rich table, ``summary.md`` and (matplotlib permitting) curve plots of the runs in ``directory``."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console(width=180)
    results = _load_results(directory)
    if not results:
        console.print(f"[yellow]no results under {directory}[/]")
        return ""
    rows = summary_rows(results)
    table = Table(title=f"train_lm: {directory}")
    for h, _, _ in _COLUMNS:
        table.add_column(h, justify="left" if h in ("task", "attention", "setting", "status") else "right")
    lines = ["| " + " | ".join(h for h, _, _ in _COLUMNS) + " |", "|" + "---|" * len(_COLUMNS)]
    for row in rows:
        cells = [_f(row[k], fmt) for _, k, fmt in _COLUMNS]
        table.add_row(*cells)
        lines.append("| " + " | ".join(cells) + " |")
    console.print(table)
    gpus = sorted({r["gpu"] for r in rows if r.get("gpu")})
    env = results[0].get("env", {})
    head = [
        "# train_lm results", "",
        (f"GPU: {', '.join(gpus) or 'none (CPU)'}; torch {env.get('torch')}, triton {env.get('triton')}, "
         f"flexsparse {env.get('flexsparse')} (git {env.get('git')}), {env.get('date')}."), "",
        ("tokens/s: training steps after the warm-up (compile) steps, evaluations excluded. Val loss in nats per "
         "byte (lm) or per trained answer (mqar); bits/byte = loss / ln 2; accuracy over the final queries. "
         "Sparsity: the paper's measure (1 − attended tokens / N over queries past position 4096), mean over "
         "DashAttention layers at the last evaluation. Start-up: from the start of the run to the first timed "
         "step (data, calibration, compile)."), "",
    ]
    md = "\n".join(head + lines) + "\n"
    if plots:
        pngs = plot_curves(results, directory, console)
        if pngs:
            md += "\n" + "\n".join(f"![{os.path.splitext(p)[0]}]({p})" for p in pngs) + "\n"
    with open(os.path.join(directory, "summary.md"), "w") as fh:
        fh.write(md)
    return md


def plot_curves(results: list[dict], directory: str, console) -> list[str]:
    """One PNG per (task, seq): validation loss (and accuracy for mqar) and training loss against
    tokens, one line per attention variant. Returns the file names (none without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        console.print("[yellow]matplotlib is not installed: no plots (run --summarize on a machine with it)[/]")
        return []
    names = []
    for task, seq in sorted({(r["task"], r["seq"]) for r in results}, key=lambda t: (TASKS.index(t[0]), t[1])):
        runs = [r for r in results if (r["task"], r["seq"]) == (task, seq) and r.get("curve")]
        if not runs:
            continue
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
        for r in runs:
            label = r["attn"] + (f" ({r['final']['sparsity']:.2f} sparse)" if r["final"].get("sparsity") is not None else "")
            c = r["curve"]
            key = "val_acc" if task == "mqar" else "val_loss"
            axes[0].plot([p["tokens"] / 1e6 for p in c if key in p], [p[key] for p in c if key in p], marker="o",
                         ms=3, label=label)
            tc = r.get("train_curve", [])
            axes[1].plot([p["tokens"] / 1e6 for p in tc], [p["loss"] for p in tc], label=label, lw=1,
                         marker="." if len(tc) < 30 else None)
        axes[0].set_ylabel("validation accuracy (answers)" if task == "mqar" else "validation loss (nats/byte)")
        axes[1].set_ylabel("training loss")
        for ax in axes:
            ax.set_xlabel("training tokens (M)")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        if task == "lm":
            lo = min(p["val_loss"] for r in runs for p in r["curve"][1:] or r["curve"])
            axes[0].set_ylim(lo - 0.05, min(max(p["val_loss"] for r in runs for p in r["curve"]), lo + 2.0))
        fig.suptitle(f"{task}, context {seq}")
        fig.tight_layout()
        name = f"curves_{task}_{seq}.png"
        fig.savefig(os.path.join(directory, name), dpi=110)
        plt.close(fig)
        names.append(name)
    return names


def dry_run(cfg) -> None:
    """Print the suite's runs with their steps and a training-time estimate from the dense FLOPs."""
    from rich.console import Console
    from rich.table import Table

    console = Console(width=180)
    table = Table(title=f"plan (dense-equivalent throughput {cfg.assume_tflops} TFLOP/s, "
                        f"start-up {cfg.assume_startup_s} s per run)")
    for h in ("run", "batch x seq", "steps", "tokens", "GFLOP/token", "train s (est.)"):
        table.add_column(h)
    total = 0.0
    for task, seq, attn in (suite_plan(cfg) if cfg.suite else [(cfg.task, cfg.seq, cfg.attn)]):
        tokens = cfg.mqar_tokens if task == "mqar" and cfg.mqar_tokens else cfg.tokens
        rc = copy.copy(cfg)
        rc.seq = seq
        fpt = flops_per_token(rc, seq)
        secs = tokens * fpt / (cfg.assume_tflops * 1e12) * (1 + cfg.evals * cfg.eval_batches / max(1, tokens // cfg.batch_tokens) / 3)
        total += secs + cfg.assume_startup_s
        table.add_row(f"{task}_{attn}_{seq}", f"{cfg.batch_tokens // seq} x {seq}", str(int(tokens) // cfg.batch_tokens),
                      f"{tokens:.3g}", f"{fpt / 1e9:.3f}", f"{secs:.0f}")
    console.print(table)
    console.print(f"estimated total: {total / 60:.1f} min (training at the assumed rate + start-up per run)")


# ----------------------------------------------------------------------------------------------
# command line


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    a = ap.add_argument_group("run")
    a.add_argument("--task", choices=TASKS, default="lm")
    a.add_argument("--attn", choices=VARIANTS, default="dense")
    a.add_argument("--seq", type=int, default=8192, help="context length (tokens = bytes)")
    a.add_argument("--tokens", type=float, default=8e6, help="training tokens per run (equal for every variant)")
    a.add_argument("--batch-tokens", type=int, default=32768, help="tokens per step (batch = batch_tokens // seq)")
    a.add_argument("--out", default=DEFAULT_OUT)
    a.add_argument("--tag", default="", help="suffix of the result file names")
    a.add_argument("--seed", type=int, default=0)
    a.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a.add_argument("--no-progress", action="store_true")
    m = ap.add_argument_group("model")
    m.add_argument("--layers", type=int, default=6)
    m.add_argument("--dim", type=int, default=512)
    m.add_argument("--heads", type=int, default=8)
    m.add_argument("--kv-heads", type=int, default=2)
    m.add_argument("--no-rotary", action="store_true")
    m.add_argument("--attn-backend", default="auto", choices=("auto", "flex", "reference", "triton"),
                   help="backend of the flexsparse layers ('triton': DashAttention's fused kernels, entmax only)")
    m.add_argument("--sdpa-backend", default="auto", choices=("auto", "cudnn", "flash", "efficient", "math"),
                   help="dense baseline: SDPA's own choice or a forced backend")
    m.add_argument("--block-size", type=int, default=128, help="hash/drop FlexAttention block")
    m.add_argument("--n-buckets", type=int, default=16)
    m.add_argument("--drop-rate", type=float, default=0.5)
    m.add_argument("--chunk-size", type=int, default=64, help="DashAttention / top-k chunk C")
    m.add_argument("--q-block", type=int, default=128)
    m.add_argument("--gamma", type=float, default=None, help="DashAttention router gamma (default: calibrated)")
    m.add_argument("--target-sparsity", type=float, default=0.75)
    m.add_argument("--calib-iters", type=int, default=14, help="bisection steps of the gamma calibration")
    m.add_argument("--recalibrate-at", default="0.2",
                   help="fractions of training at which gamma is calibrated again for the target sparsity at the "
                        "trained weights (comma-separated; each costs one recompile; '' = never)")
    m.add_argument("--top-k", type=int, default=None, help="top-k router: past chunks per query")
    m.add_argument("--match-sparsity", default=None, help="dash result JSON whose mean measured sparsity top-k matches")
    m.add_argument("--mqar-pairs", type=int, default=64)
    m.add_argument("--mqar-repeats", type=int, default=3, help="occurrences of each pair in the context")
    m.add_argument("--init-from", default=None, help="state_dict to start from (same model configuration)")
    m.add_argument("--save-checkpoint", default=None, help="write the final state_dict here")
    t = ap.add_argument_group("training")
    t.add_argument("--lr", type=float, default=2e-3)
    t.add_argument("--min-lr", type=float, default=0.1, help="final learning rate as a fraction of --lr")
    t.add_argument("--warmup", type=float, default=0.1, help="warm-up fraction of the steps")
    t.add_argument("--weight-decay", type=float, default=0.1)
    t.add_argument("--grad-clip", type=float, default=1.0)
    t.add_argument("--compile", choices=("model", "blocks", "none"), default="model")
    t.add_argument("--no-compile", dest="compile", action="store_const", const="none")
    t.add_argument("--no-fullgraph", action="store_true")
    t.add_argument("--autotune", choices=("auto", "on", "off"), default="auto",
                   help="Inductor max-autotune for FlexAttention templates (auto: dash/top-k with 64-wide chunks)")
    t.add_argument("--evals", type=int, default=8, help="evaluations per run (when --eval-every is 0)")
    t.add_argument("--eval-every", type=int, default=0)
    t.add_argument("--eval-batches", type=int, default=4, help="fixed validation batches of the training shape")
    t.add_argument("--log-every", type=int, default=10)
    t.add_argument("--timing-warmup", type=int, default=3, help="steps not timed (compile, autotune)")
    t.add_argument("--max-run-seconds", type=float, default=0, help="stop a run after this wall time (0 = never)")
    d = ap.add_argument_group("data")
    d.add_argument("--data", default=None, help="text file or folder (default: the Python standard library)")
    d.add_argument("--stdlib-tests", action="store_true", help="include the standard library's test folders")
    s = ap.add_argument_group("suite")
    s.add_argument("--suite", action="store_true", help="every task x length x variant in this process")
    s.add_argument("--tasks", default="lm,mqar")
    s.add_argument("--seqs", default="8192,16384", help="lm context lengths")
    s.add_argument("--mqar-seqs", default="8192")
    s.add_argument("--variants", default=",".join(VARIANTS))
    s.add_argument("--mqar-tokens", type=float, default=None, help="tokens per mqar run (default --tokens)")
    s.add_argument("--mqar-init", choices=("scratch", "lm"), default="scratch",
                   help="mqar runs start from random weights or from the lm run of the same variant and length")
    s.add_argument("--ckpt-dir", default=os.path.join(tempfile.gettempdir(), "train_lm_ckpt"),
                   help="where --mqar-init lm keeps the language models")
    s.add_argument("--skip-existing", action="store_true", help="keep finished results found under --out")
    s.add_argument("--keep-going", action="store_true", help="record a failed run and continue")
    s.add_argument("--deadline-minutes", type=float, default=0, help="start no run after this many minutes")
    s.add_argument("--summarize", metavar="DIR", default=None, help="only write the table and plots of DIR")
    s.add_argument("--dry-run", action="store_true", help="print the plan and a time estimate")
    s.add_argument("--assume-tflops", type=float, default=160.0, help="dry run: dense-equivalent TFLOP/s")
    s.add_argument("--assume-startup-s", type=float, default=40.0, help="dry run: start-up (compile) s per run")
    return ap


def parse_args(argv=None) -> argparse.Namespace:
    cfg = build_parser().parse_args(argv)
    split = lambda s, f: [f(x) for x in str(s).split(",") if x]
    cfg.tasks = split(cfg.tasks, str)
    cfg.seqs, cfg.mqar_seqs = split(cfg.seqs, int), split(cfg.mqar_seqs, int)
    cfg.variants = split(cfg.variants, str)
    cfg.recalibrate_at = split(cfg.recalibrate_at, float)
    for name, vals, allowed in (("--tasks", cfg.tasks, TASKS), ("--variants", cfg.variants, VARIANTS)):
        bad = [v for v in vals if v not in allowed]
        if bad:
            raise SystemExit(f"{name}: unknown {bad}; choose from {allowed}")
    if cfg.dim % cfg.heads or cfg.heads % cfg.kv_heads:
        raise SystemExit(f"--dim {cfg.dim} must be divisible by --heads {cfg.heads}, and --heads by --kv-heads {cfg.kv_heads}")
    if not 0.0 < cfg.target_sparsity < 1.0:
        raise SystemExit(f"--target-sparsity must be in (0, 1), got {cfg.target_sparsity}")
    return cfg


def main(argv=None):
    cfg = parse_args(argv)
    if cfg.summarize:
        summarize(cfg.summarize)
        return None
    if cfg.dry_run:
        dry_run(cfg)
        return None
    if cfg.suite:
        return run_suite(cfg)
    return train_one(cfg)


if __name__ == "__main__":
    main()
