"""flexsparse patterns as a Hugging Face transformers attention implementation.

A tiny randomly initialised Llama (hidden 64, 2 layers, 4 query heads, 2 KV heads, vocab 128,
odd length 37) runs with each registered pattern; a spy around the registered attention function
captures q/k/v per layer and the output the model used, which must equal the float64 reference
pattern on the same q/k/v. Also: the pattern changes the logits (vs dense SDPA), future tokens do
not change past logits, padding is honoured or refused as documented, and what the patterns
cannot do raises.
"""

import contextlib
import os
import subprocess
import sys
import uuid

import pytest
import torch

pytest.importorskip("transformers")

from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from flexsparse import reference  # noqa: E402
from flexsparse.integrations import transformers as fs_hf  # noqa: E402
from flexsparse.testing import assert_close_to_ref  # noqa: E402

N, B, VOCAB = 37, 2, 128
HQ, HKV, DH = 4, 2, 16

# small DashAttention chunks so that N = 37 spans several; 64-wide blocks keep the number of
# Triton programs (run by the interpreter on CPU) small
PATTERN_OPTIONS = {
    "hash": {"n_buckets": 4, "block_size": 64},
    "drop": {"drop_rate": 0.4, "seed": 3, "block_size": 64},
    "dash": {"chunk_size": 8, "gamma": 4.0, "q_block": 64},
    "dash_topk": {"chunk_size": 8, "top_k": 1, "q_block": 64},
}


@pytest.fixture
def register():
    """``register(pattern, **options)`` under a fresh name; unregistered after the test."""
    names = []

    def _register(pattern, **options):
        attn = fs_hf.register(pattern, name=f"fs_test_{pattern}_{uuid.uuid4().hex[:8]}", **options)
        names.append(attn.name)
        return attn

    yield _register
    for name in names:
        fs_hf.unregister(name)


def tiny_llama(attn_implementation, device="cpu", dtype=torch.float32, **overrides):
    cfg = dict(
        hidden_size=HQ * DH, intermediate_size=128, num_hidden_layers=2, num_attention_heads=HQ,
        num_key_value_heads=HKV, vocab_size=VOCAB, max_position_embeddings=128,
    )
    cfg.update(overrides)
    model = LlamaForCausalLM(LlamaConfig(attn_implementation=attn_implementation, **cfg))
    return model.to(device=device, dtype=dtype).eval()


def set_attn_implementation(model, name):
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(name)
    else:  # older transformers (4.53)
        model.config._attn_implementation = name


@contextlib.contextmanager
def spy(attn):
    """Wrap ``attn``'s registered attention function; yields the list of its calls."""
    calls = []

    def fn(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        out, weights = attn.attention(
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
        )
        calls.append({
            "module": module, "layer": module.layer_idx, "q": query.detach(), "k": key.detach(), "v": value.detach(),
            "mask": attention_mask, "scaling": scaling, "out": out.detach(),
        })
        return out, weights

    fs_hf.AttentionInterface.register(attn.name, fn)
    try:
        yield calls
    finally:
        fs_hf.AttentionInterface.register(attn.name, attn.attention)


def lsh(x, r, groups):
    proj = torch.einsum("bhnd,hdr->bhnr", x.float(), r.repeat_interleave(groups, 0))
    return torch.cat([proj, -proj], -1).argmax(-1)


def reference_out(attn, call, w=None, dtype=torch.float64):
    """The reference of ``attn``'s pattern on one captured call, computed in ``dtype`` (float64:
    the oracle; the call's own dtype: the plain-PyTorch baseline): ``[B, N, Hq, D]``."""
    q, k, v = (call[n].to(dtype) for n in "qkv")
    scale, o, dev = call["scaling"], attn.options, q.device
    if attn.pattern == "hash":
        r = attn.rotations(call["layer"], k.shape[1], k.shape[-1], device=dev)
        ref = reference.hash_sparse_attention(q, k, v, lsh(call["q"], r, HQ // HKV), lsh(call["k"], r, 1), scale=scale)
    elif attn.pattern == "drop":
        q_keep, k_keep = attn.keep_masks(call["layer"], call["q"], call["k"])
        ref = reference.qk_sparse_attention(q, k, v, q_keep, k_keep, scale=scale)
    else:
        w = torch.zeros(k.shape[1], k.shape[-1], dtype=dtype, device=dev) if w is None else w.to(dtype)
        if attn.pattern == "dash":
            ref = reference.dash_attention(q, k, v, w, chunk_size=o["chunk_size"], gamma=o["gamma"], scale=scale)
        else:
            ref = reference.dash_topk_attention(q, k, v, w, chunk_size=o["chunk_size"], top_k=o["top_k"], scale=scale)
    return ref.transpose(1, 2)


# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("pattern", list(PATTERN_OPTIONS))
def test_model_matches_reference_pattern(register, pattern):
    attn = register(pattern, **PATTERN_OPTIONS[pattern])  # backend "auto": on CPU without grad, flex
    model = tiny_llama(attn.name)
    # row 1 = row 0 with the tokens after position t changed: one forward checks causality too
    t = 20
    x = torch.randint(0, VOCAB, (N,))
    x2 = x.clone()
    x2[t + 1:] = (x[t + 1:] + torch.randint(1, VOCAB, (N - t - 1,))) % VOCAB
    ids = torch.stack([x, x2])
    with torch.no_grad(), spy(attn) as calls:
        logits = model(ids).logits
    assert [c["layer"] for c in calls] == [0, 1]
    for c in calls:
        assert c["q"].shape == (B, HQ, N, DH) and c["k"].shape == (B, HKV, N, DH)  # GQA: KV heads not repeated
        assert c["mask"] is None
        assert_close_to_ref(f"{pattern} layer {c['layer']}", c["out"], reference_out(attn, c))

    # causal: the changed future leaves the logits up to t unchanged
    torch.testing.assert_close(logits[1, : t + 1], logits[0, : t + 1], rtol=1e-5, atol=1e-5)
    assert (logits[1, t + 1:] - logits[0, t + 1:]).abs().max() > 1e-3

    # the pattern is applied: dense attention gives other logits
    set_attn_implementation(model, "sdpa")
    with torch.no_grad():
        dense = model(ids).logits
    assert (logits - dense).abs().max() > 1e-3


def test_pattern_inputs_are_deterministic(register):
    a, b = register("hash", n_buckets=6, seed=5), register("hash", n_buckets=6, seed=5)
    r0, r1 = a.rotations(0, HKV, DH), a.rotations(1, HKV, DH)
    assert r0.shape == (HKV, DH, 3) and r0.dtype == torch.float32
    torch.testing.assert_close(r0.norm(dim=1), torch.ones(HKV, 3))
    assert torch.equal(r0, b.rotations(0, HKV, DH)) and not torch.equal(r0, r1)
    assert not torch.equal(r0, register("hash", n_buckets=6, seed=6).rotations(0, HKV, DH))

    d = register("drop", drop_rate=0.5, seed=1)
    q, k = torch.randn(B, HQ, N, DH), torch.randn(B, HKV, N, DH)
    qk, kk = d.keep_masks(0, q, k)
    assert qk.shape == (B, HQ, N) and kk.shape == (B, HKV, N) and qk.dtype == torch.bool
    assert torch.equal(qk, d.keep_masks(0, q, k)[0]) and not torch.equal(qk, d.keep_masks(1, q, k)[0])
    assert torch.equal(qk[0], qk[1]) and torch.equal(kk[0], kk[1])  # seeded: one draw for the batch
    assert 0.3 < qk.float().mean() < 0.7
    fresh = register("drop", drop_rate=0.5)  # seed=None: a new draw for every sequence and call
    q1, _ = fresh.keep_masks(0, q, k)
    assert not torch.equal(q1, fresh.keep_masks(0, q, k)[0]) and not torch.equal(q1[0], q1[1])


@pytest.mark.parametrize("pattern", list(PATTERN_OPTIONS))
def test_attention_function_uses_the_model_scaling(register, pattern):
    """Called directly with a non-default ``scaling`` (Llama's equals 1/sqrt(D)): [B, N, Hq, D]."""
    attn = register(pattern, **PATTERN_OPTIONS[pattern], backend="reference")
    module = torch.nn.Module()
    module.layer_idx = 1
    q, k, v = torch.randn(1, HQ, N, DH), torch.randn(1, HKV, N, DH), torch.randn(1, HKV, N, DH)
    out, weights = attn.attention(module, q, k, v, None, scaling=0.7)
    assert weights is None and out.shape == (1, N, HQ, DH) and out.is_contiguous()
    call = {"layer": 1, "q": q, "k": k, "v": v, "scaling": 0.7}
    assert_close_to_ref(pattern, out, reference_out(attn, call))
    assert (out - reference_out(attn, dict(call, scaling=None)).float()).abs().max() > 1e-3


@pytest.mark.parametrize("pattern", ["hash", "drop"])
def test_padding_is_honoured(register, pattern):
    """Row 0 left-padded, row 1 right-padded, the same real tokens at the same positions."""
    # drop applies the padding to its keep masks before the op: the reference backend suffices
    attn = register(pattern, **PATTERN_OPTIONS[pattern], **({"backend": "reference"} if pattern == "drop" else {}))
    model = tiny_llama(attn.name)
    n_pad, n_real = 5, N - 5
    x = torch.randint(0, VOCAB, (n_real,))
    fill = torch.zeros(n_pad, dtype=torch.long)
    ids = torch.stack([torch.cat([fill, x]), torch.cat([x, fill])])
    mask = torch.ones(B, N, dtype=torch.long)
    mask[0, :n_pad] = 0
    mask[1, n_real:] = 0
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad(), spy(attn) as calls:
        logits = model(ids, attention_mask=mask, position_ids=position_ids).logits
    valid = mask.bool()
    for c in calls:
        assert c["mask"].dtype == torch.bool and torch.equal(c["mask"], valid)
        q, k, v = (c[n].double() for n in "qkv")
        if pattern == "hash":
            r = attn.rotations(c["layer"], HKV, DH)
            allowed = reference.hash_mask(lsh(c["q"], r, HQ // HKV), lsh(c["k"], r, 1))
        else:
            allowed = reference.drop_mask(*attn.keep_masks(c["layer"], c["q"], c["k"]))
        allowed = allowed & valid[:, None, None, :]  # padded keys are never attended
        ref = reference.attention(q, k, v, mask=allowed, scale=c["scaling"]).transpose(1, 2)
        assert_close_to_ref(f"layer {c['layer']}, real tokens", c["out"][valid], ref[valid])
        if pattern == "drop":  # padded queries output exactly 0
            assert (c["out"][~valid] == 0).all()
    if pattern == "hash":  # buckets do not depend on absolute positions: left = right padding
        torch.testing.assert_close(logits[0, n_pad:], logits[1, :n_real], rtol=1e-5, atol=1e-5)


def test_dash_right_padding_only(register):
    attn = register("dash", **PATTERN_OPTIONS["dash"], backend="reference")
    model = tiny_llama(attn.name)
    n_real = 30
    ids = torch.randint(0, VOCAB, (1, N)).repeat(B, 1)
    ids[0, n_real:] = 0
    mask = torch.ones(B, N, dtype=torch.long)
    mask[0, n_real:] = 0
    with torch.no_grad():
        logits = model(ids, attention_mask=mask).logits
    torch.testing.assert_close(logits[0, :n_real], logits[1, :n_real], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="right padding only"), torch.no_grad():
        model(ids, attention_mask=mask.flip(-1))


def test_mask_function_contract(register):
    from transformers.masking_utils import sliding_window_causal_mask_function

    attn = register("hash")
    kw = dict(batch_size=B, q_length=N, kv_length=N)
    assert attn.mask(**kw) is None
    assert attn.mask(**kw, attention_mask=torch.ones(B, N, dtype=torch.bool)) is None  # no padding: no mask
    pad = torch.ones(B, N, dtype=torch.bool)
    pad[1, :3] = False
    assert torch.equal(attn.mask(**kw, attention_mask=pad), pad)
    def bidirectional(batch_idx, head_idx, q_idx, kv_idx):
        return q_idx >= 0

    for fn in (sliding_window_causal_mask_function(4), bidirectional):
        with pytest.raises(ValueError, match="cannot apply the mask"):
            attn.mask(**kw, mask_function=fn)
    with pytest.raises(NotImplementedError, match="KV cache"):
        attn.mask(batch_size=B, q_length=1, kv_length=N, q_offset=N - 1)
    with pytest.raises(ValueError, match="2D padding mask"):
        attn.mask(**kw, attention_mask=torch.ones(B, 1, N, N, dtype=torch.bool))


def test_unsupported_uses_raise(register):
    attn = register("hash", **PATTERN_OPTIONS["hash"], backend="reference")
    model = tiny_llama(attn.name)
    ids = torch.randint(1, VOCAB, (1, 11))  # no pad token (0): generate would infer padding
    with torch.no_grad():
        out = model(ids, use_cache=True)
        with pytest.raises(NotImplementedError, match="use_cache=False"):  # one decoding step
            model(ids[:, -1:], past_key_values=out.past_key_values)
        with pytest.raises(ValueError, match="cannot apply"):  # a custom 4D mask
            model(ids, attention_mask=torch.zeros(1, 1, 11, 11))
        # generation recomputing the whole sequence works, and is greedy on the pattern's logits
        gen = model.generate(ids, max_new_tokens=2, do_sample=False, use_cache=False, pad_token_id=0)
        assert gen.shape == (1, 13) and torch.equal(gen[:, :11], ids)
        assert gen[0, 11] == out.logits[0, -1].argmax()

    q, k = torch.randn(1, HQ, 11, DH), torch.randn(1, HKV, 11, DH)
    layer = model.model.layers[0].self_attn
    with pytest.raises(NotImplementedError, match="dropout"):
        attn.attention(layer, q, k, k, None, scaling=0.25, dropout=0.1)
    with pytest.raises(NotImplementedError, match="sliding_window"):
        attn.attention(layer, q, k, k, None, scaling=0.25, sliding_window=4)

    from transformers import MistralConfig, MistralForCausalLM

    mistral = MistralForCausalLM(MistralConfig(
        hidden_size=HQ * DH, intermediate_size=128, num_hidden_layers=1, num_attention_heads=HQ,
        num_key_value_heads=HKV, vocab_size=VOCAB, sliding_window=4, attn_implementation=attn.name,
    )).eval()
    with pytest.raises(ValueError, match="sliding"), torch.no_grad():
        mistral(ids)


def test_register_validation(register):
    with pytest.raises(ValueError, match="pattern"):
        fs_hf.register("dense")
    with pytest.raises(ValueError, match="transformers' own"):
        fs_hf.register("hash", name="sdpa")
    with pytest.raises(ValueError, match="'/'"):
        fs_hf.register("hash", name="org/kernel")
    with pytest.raises(TypeError, match="unknown option"):
        fs_hf.register("hash", gamma=2.0)
    with pytest.raises(ValueError, match="top_k"):
        fs_hf.register("dash_topk")
    with pytest.raises(ValueError, match="n_buckets"):
        fs_hf.register("hash", n_buckets=3)
    with pytest.raises(ValueError, match="drop_rate"):
        fs_hf.register("drop", drop_rate=1.0)
    with pytest.raises(ValueError, match="backend"):
        fs_hf.register("hash", backend="triton")
    attn = register("dash")
    assert attn.name in fs_hf.AttentionInterface._global_mapping
    assert attn.name in fs_hf.AttentionMaskInterface._global_mapping  # masks are never skipped
    with pytest.raises(KeyError):
        fs_hf.unregister("not_registered")


def test_dash_summary_parameters(register):
    attn = register("dash", **PATTERN_OPTIONS["dash"])
    model = tiny_llama(attn.name)
    names = fs_hf.add_dash_summaries(model)
    assert names == ["model.layers.0.self_attn", "model.layers.1.self_attn"]
    with torch.no_grad():
        for m in model.modules():
            if hasattr(m, fs_hf.SUMMARY_ATTR):
                getattr(m, fs_hf.SUMMARY_ATTR).normal_(0, 3.0)
    ids = torch.randint(0, VOCAB, (1, N))
    with torch.no_grad(), spy(attn) as calls:
        model(ids)
    for c in calls:
        w = getattr(c["module"], fs_hf.SUMMARY_ATTR)
        assert w.shape == (HKV, DH)
        assert_close_to_ref(f"layer {c['layer']}", c["out"], reference_out(attn, c, w=w.detach()))
    # the summaries train with the model (CPU: the reference backend under autograd)
    model.train()
    model(ids, labels=ids).loss.backward()
    for m in model.modules():
        if hasattr(m, fs_hf.SUMMARY_ATTR):
            g = getattr(m, fs_hf.SUMMARY_ATTR).grad
            assert g is not None and torch.isfinite(g).all() and g.abs().max() > 0
    with pytest.raises(ValueError, match="no attention module"):
        fs_hf.add_dash_summaries(torch.nn.Linear(2, 2))


def test_flexsparse_imports_without_transformers():
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'transformers' or name.startswith('transformers.'):\n"
        "            raise ImportError('blocked')\n"
        "sys.meta_path.insert(0, Block())\n"
        "import flexsparse, flexsparse.integrations\n"
        "try:\n"
        "    import flexsparse.integrations.transformers\n"
        "except ImportError as e:\n"
        "    assert 'flexsparse[hf]' in str(e), e\n"
        "    print('ok')\n"
    )
    env = {**os.environ, "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET", "1")}
    res = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120, check=False
    )
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr


@pytest.mark.gpu
@pytest.mark.parametrize("pattern", ["hash", "drop", "dash"])
def test_model_matches_reference_pattern_gpu(register, pattern):
    """bf16 on CUDA (compiled FlexAttention): each layer within 2x SDPA-level error of float64."""
    opts = {"hash": {"n_buckets": 8}, "drop": {"drop_rate": 0.5, "seed": 0}, "dash": {"chunk_size": 64, "gamma": 4.0}}
    attn = register(pattern, **opts[pattern])
    model = tiny_llama(attn.name, device="cuda", dtype=torch.bfloat16)
    ids = torch.randint(0, VOCAB, (B, 301), device="cuda")
    with torch.no_grad(), spy(attn) as calls:
        model(ids)
    assert len(calls) == 2
    for c in calls:
        lowp = reference_out(attn, c, dtype=c["q"].dtype)
        assert_close_to_ref(f"{pattern} layer {c['layer']}", c["out"], reference_out(attn, c), lowp)
