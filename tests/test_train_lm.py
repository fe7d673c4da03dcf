"""Smoke tests of ``benchmarks/train_lm.py`` (the training study) on tiny configurations.

CPU: eager, float32; the flexsparse layers train through their ``auto`` backend, which on CPU with
gradients is the dense reference (CPU FlexAttention is inference-only). The GPU test runs the
compiled model in bf16 with every variant on a short context.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os

import pytest
import torch

_PATH = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "train_lm.py")
_spec = importlib.util.spec_from_file_location("train_lm", _PATH)
train_lm = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(train_lm)

TINY = ["--layers", "2", "--dim", "64", "--heads", "4", "--kv-heads", "2", "--seq", "128", "--no-progress",
        "--chunk-size", "16", "--q-block", "16", "--block-size", "16", "--n-buckets", "4", "--eval-batches", "1"]


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: these tiny models run several times faster than with threads that
    compete for the (shared) cores."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def small_text(tmp_path_factory):
    """A 200 KB text file (this repository's Python sources, repeated) for the runs that do not
    test the default corpus."""
    root = os.path.join(os.path.dirname(__file__), "..", "flexsparse")
    text = b""
    for f in sorted(os.listdir(root)):
        if f.endswith(".py"):
            with open(os.path.join(root, f), "rb") as fh:
                text += fh.read()
    path = tmp_path_factory.mktemp("data") / "small.txt"
    path.write_bytes((text * (1 + 200_000 // max(1, len(text))))[:200_000])
    return str(path)


def _run(tmp_path, *args):
    res = train_lm.main(TINY + ["--out", str(tmp_path), "--no-compile", "--device", "cpu", *args])
    name = f"{res['task']}_{res['attn']}_{res['seq']}.json"
    with open(tmp_path / name) as fh:
        saved = json.load(fh)
    assert saved["status"] == "done" and saved["final"]["val_loss"] == res["final"]["val_loss"]
    return saved


def test_dense_loss_decreases_and_json(tmp_path):
    """Dense, 20 steps of 2 x 128 bytes of the standard library, fixed seed: the validation loss
    falls well below its initial value (ln 256 = 5.55), every number is finite, the JSON holds
    config, environment, corpus and curves."""
    r = _run(tmp_path, "--attn", "dense", "--tokens", str(20 * 256), "--batch-tokens", "256", "--lr", "3e-3",
             "--evals", "2", "--log-every", "5")
    curve = r["curve"]
    assert [p["step"] for p in curve] == [0, 10, 20]
    assert all(math.isfinite(p["val_loss"]) for p in curve)
    assert abs(curve[0]["val_loss"] - math.log(256)) < 0.1  # small init: uniform predictions
    assert curve[-1]["val_loss"] < curve[0]["val_loss"] - 1.0, curve
    assert r["final"]["val_bpb"] == pytest.approx(curve[-1]["val_loss"] / math.log(2))
    assert [p["step"] for p in r["train_curve"]] == [5, 10, 15, 20]
    assert r["data"]["kind"] == "python-stdlib" and r["data"]["files_val"] > 0 and r["data"]["bytes_train"] > 10**6
    assert r["model"]["steps"] == 20 and r["model"]["batch"] == 2
    assert r["final"]["tokens"] == 20 * 256 and r["final"]["tokens_per_s"] > 0
    assert r["config"]["attn"] == "dense" and "torch" in r["env"]


@pytest.mark.parametrize("attn", ["hash", "drop"])
def test_scfa_variants_train(tmp_path, attn, small_text):
    """Hash-sparse and query/key-drop models: a few steps, finite losses that went down."""
    r = _run(tmp_path, "--data", small_text, "--attn", attn, "--tokens", str(6 * 256), "--batch-tokens", "256", "--lr", "3e-3",
             "--evals", "1")
    losses = [p["val_loss"] for p in r["curve"]]
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]
    assert "sparsity" not in r["final"]


def test_dash_calibrates_recalibrates_and_topk_matches(tmp_path, small_text):
    """DashAttention: gamma is calibrated at init for the target sparsity (bisection; the measured
    sparsity lands near the target) and again at 50% of training; the sparsity is measured at
    every evaluation. Top-k reads the dash JSON and picks the top_k whose sparsity matches."""
    common = ["--tokens", str(6 * 256), "--batch-tokens", "256", "--evals", "2", "--attn-backend", "reference",
              "--target-sparsity", "0.5", "--calib-iters", "12", "--data", small_text]
    r = _run(tmp_path, "--attn", "dash", "--recalibrate-at", "0.5", *common)
    cal = r["calibration"]
    assert abs(cal["sparsity_at_init"] - 0.5) < 0.1, cal
    assert len(cal["trace"]) == 12 and len(cal["history"]) == 1 and cal["history"][0]["step"] == 3
    assert cal["sparsity_at_init_compiled"] == pytest.approx(cal["sparsity_at_init"], abs=1e-6)  # eager here
    assert abs(cal["history"][0]["sparsity"] - 0.5) < 0.1, cal
    assert all("sparsity" in p and 0.0 < p["kept_fraction"] <= 1.0 for p in r["curve"])
    assert 0.0 < r["final"]["sparsity_mean"] < 1.0
    # top-k at the dash run's measured sparsity: sparsity = 1 - (k + 1) * C / N
    t = _run(tmp_path, "--attn", "topk", "--match-sparsity", str(tmp_path / "lm_dash_128.json"), *common)
    k = t["calibration"]["top_k"]
    assert k == train_lm.topk_for_sparsity(r["final"]["sparsity_mean"], 128, 16)
    assert t["calibration"]["matched_sparsity"] == r["final"]["sparsity_mean"]
    assert all(math.isfinite(p["val_loss"]) for p in t["curve"])
    assert abs(t["final"]["sparsity"] - r["final"]["sparsity_mean"]) < 0.15, (t["final"], r["final"])


def test_topk_for_sparsity():
    assert train_lm.topk_for_sparsity(0.75, 8192, 64) == 31  # 2048 tokens: 32 chunks, the own one included
    assert train_lm.topk_for_sparsity(0.75, 16384, 64) == 63
    assert train_lm.topk_for_sparsity(0.0, 1024, 64) == 15
    assert train_lm.topk_for_sparsity(0.999, 1024, 64) == 0


def test_mqar_batches_and_training(tmp_path):
    """MQAR windows: each pair is written ``repeats`` times in the context, every key is queried
    once at the end with its own value; the mask is 2 on exactly the query keys and 1 on the later
    context occurrences of each key. A short dense run reports an answer accuracy."""
    P, R = 8, 3
    gen = train_lm.MQAR(seq=200, batch=3, pairs=P, device="cpu", seed=1, repeats=R)
    x, y, mask = gen.sample()
    assert x.shape == y.shape == mask.shape == (3, 200) and mask.dtype == torch.int8
    assert torch.equal(x[:, 1:], y[:, :-1])
    for b in range(3):
        ctx = torch.cat([x[b], y[b, -1:]])[: gen.start].tolist()
        keys_at = [i for i, t in enumerate(ctx) if 64 <= t < 192]
        assert len(keys_at) == P * R
        pairs = {}
        for i in keys_at:
            assert 192 <= ctx[i + 1] < 256 and pairs.setdefault(ctx[i], ctx[i + 1]) == ctx[i + 1]
        assert len(pairs) == P
        seen = set()
        for i in range(200):  # 1 exactly on the repeated occurrences of a key in the context
            want = 2 if i >= gen.start and (i - gen.start) % 2 == 0 else 0
            if i < gen.start and i in keys_at:
                want = 1 if ctx[i] in seen else 0
                seen.add(ctx[i])
            assert int(mask[b, i]) == want, (b, i)
        qs = (mask[b] == 2).nonzero().flatten().tolist()
        assert {int(x[b, i]): int(y[b, i]) for i in qs} == pairs
    with pytest.raises(ValueError, match="too short"):
        train_lm.MQAR(seq=40, batch=1, pairs=8, device="cpu", seed=0, repeats=3)
    r = _run(tmp_path, "--task", "mqar", "--mqar-pairs", "8", "--attn", "dense", "--tokens", str(4 * 256),
             "--batch-tokens", "256", "--evals", "1")
    assert 0.0 <= r["final"]["val_acc"] <= 1.0 and math.isfinite(r["final"]["val_loss"])
    assert r["final"]["val_bpb"] is None and r["data"]["repeats"] == 3


def test_data_folder_and_file(tmp_path):
    """``--data``: a folder is split by file (text files only), a file by bytes."""
    d = tmp_path / "corpus"
    d.mkdir()
    for i in range(100):
        (d / f"f{i}.txt").write_text(f"file {i} " * 50)
    (d / "blob.bin").write_bytes(b"\0\1\2" * 100)
    c = train_lm.load_corpus(str(d))
    m = c["meta"]
    assert m["files_train"] + m["files_val"] == 100 and 1 <= m["files_val"] <= 15, m  # the binary file is left out
    assert m["bytes_train"] + m["bytes_val"] == sum((d / f"f{i}.txt").stat().st_size for i in range(100)) + 3 * 98
    f = d / "f0.txt"
    c = train_lm.load_corpus(str(f))
    assert c["meta"]["bytes_train"] + c["meta"]["bytes_val"] == f.stat().st_size
    with pytest.raises(ValueError, match="neither a file nor a folder"):
        train_lm.load_corpus(str(tmp_path / "missing"))


def test_checkpoint_round_trip_and_suite_warm_start(tmp_path, small_text):
    """``--save-checkpoint`` then ``--init-from``: the second run's step-0 evaluation (same
    validation windows) equals the first run's final one. The suite with ``--mqar-init lm`` hands
    each lm model to the mqar run of the same variant and length, and top-k follows dash."""
    ckpt = tmp_path / "ck" / "m.pt"
    a = _run(tmp_path / "a", "--data", small_text, "--attn", "hash", "--tokens", str(3 * 256), "--batch-tokens",
             "256", "--evals", "1", "--save-checkpoint", str(ckpt))
    b = _run(tmp_path / "b", "--data", small_text, "--attn", "hash", "--tokens", str(1 * 256), "--batch-tokens",
             "256", "--evals", "1", "--init-from", str(ckpt))
    assert b["curve"][0]["val_loss"] == pytest.approx(a["final"]["val_loss"], rel=1e-5)
    assert b["curve"][0]["val_loss"] < a["curve"][0]["val_loss"] - 0.1
    out = tmp_path / "suite"
    results = train_lm.main(TINY + [
        "--out", str(out), "--no-compile", "--device", "cpu", "--data", small_text, "--suite", "--tasks", "lm,mqar",
        "--seqs", "128", "--mqar-seqs", "128", "--variants", "dense,dash,topk", "--mqar-init", "lm", "--mqar-pairs",
        "8", "--ckpt-dir", str(tmp_path / "ckpts"), "--tokens", str(2 * 256), "--batch-tokens", "256", "--evals", "1",
        "--attn-backend", "reference", "--target-sparsity", "0.5", "--calib-iters", "8", "--recalibrate-at", "",
    ])
    assert [(r["task"], r["attn"]) for r in results] == [
        ("lm", "dense"), ("lm", "dash"), ("lm", "topk"), ("mqar", "dense"), ("mqar", "dash"), ("mqar", "topk")]
    for r in results[3:]:
        assert r["config"]["init_from"] == str(tmp_path / "ckpts" / f"lm_{r['attn']}_128.pt"), r["config"]
    for task in ("lm", "mqar"):
        dash, topk = (next(r for r in results if (r["task"], r["attn"]) == (task, v)) for v in ("dash", "topk"))
        assert topk["calibration"]["matched_sparsity"] == dash["final"]["sparsity_mean"]
    assert (out / "summary.md").exists()


def test_summary_markdown(tmp_path, small_text):
    """The summary lists every run with its ratio to the dense run of the same length."""
    _run(tmp_path, "--data", small_text, "--attn", "dense", "--tokens", str(3 * 256), "--batch-tokens", "256", "--evals", "1",
         "--timing-warmup", "0")
    _run(tmp_path, "--data", small_text, "--attn", "drop", "--tokens", str(3 * 256), "--batch-tokens", "256", "--evals", "1",
         "--timing-warmup", "0")
    md = train_lm.summarize(str(tmp_path), plots=False)
    assert "| lm | 128 | dense |" in md and "| lm | 128 | drop |" in md
    rows = train_lm.summary_rows(train_lm._load_results(str(tmp_path)))
    drop = next(r for r in rows if r["attn"] == "drop")
    assert drop["speedup"] is not None and drop["d_loss"] is not None
    assert (tmp_path / "summary.md").exists()


@pytest.mark.gpu
def test_gpu_compiled_variants_train(tmp_path):
    """On the GPU: every variant, compiled with fullgraph=True, bf16 autocast, a short context with
    64-token chunks (the DashAttention backward then needs autotuned FlexAttention templates);
    finite falling losses, measured sparsity for dash and top-k (the compiled model agrees with the
    eager calibration: train_one raises otherwise), peak memory and tokens/s. One layer to keep the
    five compilations short (a few minutes in all)."""
    args = ["--layers", "1", "--dim", "256", "--heads", "4", "--kv-heads", "2", "--seq", "2048",
            "--batch-tokens", "8192", "--tokens", str(12 * 8192), "--evals", "2", "--eval-batches", "1",
            "--no-progress", "--out", str(tmp_path), "--suite", "--tasks", "lm", "--seqs", "2048",
            "--target-sparsity", "0.6"]
    results = train_lm.main(args)
    assert [r["attn"] for r in results] == list(train_lm.VARIANTS)
    for r in results:
        assert r["status"] == "done", r.get("error")
        losses = [p["val_loss"] for p in r["curve"]]
        assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0], (r["attn"], losses)
        assert r["final"]["tokens_per_s"] > 0 and r["final"]["peak_mem_gib"] > 0
    by = {r["attn"]: r for r in results}
    assert 0.0 < by["dash"]["final"]["sparsity"] < 1.0 and by["topk"]["calibration"]["matched_sparsity"] is not None
    assert (tmp_path / "summary.md").exists()
