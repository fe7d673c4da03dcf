"""flexsparse patterns as a Hugging Face ``transformers`` attention implementation.

:func:`register` puts one flexsparse pattern under one name in **both** of transformers'
registries: ``AttentionInterface`` (the attention function every modern model calls through
``config._attn_implementation``) and ``AttentionMaskInterface`` (the function that builds the
mask handed to it). Registering the mask function under the same name matters: a name known only
to ``AttentionInterface`` makes transformers skip mask creation and pass ``attention_mask=None``,
which would drop padding silently. Here the mask function checks what the model asked for and
raises on anything the pattern cannot honour.

Contract of the registered attention function (the eager one's): ``query [B, Hq, N, D]``,
``key, value [B, Hkv, N, D]`` (GQA: ``Hq % Hkv == 0``; transformers passes the KV heads
un-repeated), ``scaling`` the logit scale; it returns ``(out [B, N, Hq, D], None)``.

Supported (checked on every call, with a clear error otherwise):

* causal self-attention over the whole sequence: ``q_length == kv_length`` and no cached past.
  Incremental decoding with a KV cache raises ``NotImplementedError``; ``use_cache=False`` works
  (``model.generate(..., use_cache=False)`` recomputes the sequence at each step).
* padding given as the usual 2D ``attention_mask``: honoured exactly by ``"hash"`` and
  ``"drop"`` (padded keys are never attended), right padding only for ``"dash"`` and
  ``"dash_topk"`` (their chunks are aligned to absolute positions; left padding raises).
* not supported (raises): custom 4D masks, sliding-window / chunked / bidirectional / packed
  sequence masks, attention dropout, logit soft-capping and attention sinks.

Needs ``transformers>=`` :data:`MIN_TRANSFORMERS` (install with ``pip install "flexsparse[hf]"``).
"""

from __future__ import annotations

import re

import torch
from torch import Tensor, nn

from flexsparse.functional import dash_attention, hash_sparse_attention, qk_sparse_attention
from flexsparse.patterns.drop import capacity_for_rate

__all__ = [
    "MIN_TRANSFORMERS",
    "PATTERNS",
    "SUMMARY_ATTR",
    "FlexsparseAttention",
    "add_dash_summaries",
    "register",
    "unregister",
]

#: The oldest transformers release this integration supports (``AttentionInterface`` and
#: ``AttentionMaskInterface`` both present, masks built with ``q_length``/``q_offset``).
MIN_TRANSFORMERS = "4.53.0"

#: Name of the optional per-layer DashAttention summary parameter ``[Hkv, D]`` on an attention
#: module (see :func:`add_dash_summaries`).
SUMMARY_ATTR = "flexsparse_summary"


def _version_tuple(v: str) -> tuple[int, ...]:
    parts = []
    for p in v.split(".")[:3]:
        m = re.match(r"\d+", p)
        parts.append(int(m.group()) if m else 0)
    return tuple(parts + [0] * (3 - len(parts)))


def _import_transformers():
    hint = f'flexsparse.integrations.transformers needs transformers>={MIN_TRANSFORMERS} (pip install "flexsparse[hf]")'
    try:
        import transformers
    except ImportError as e:
        raise ImportError(f"{hint}; transformers is not installed") from e
    if _version_tuple(transformers.__version__) < _version_tuple(MIN_TRANSFORMERS):
        raise ImportError(f"{hint}; found transformers {transformers.__version__}")
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, causal_mask_function
    except ImportError as e:
        found = f"found transformers {transformers.__version__} without AttentionMaskInterface"
        raise ImportError(f"{hint}; {found}") from e
    return AttentionInterface, AttentionMaskInterface, causal_mask_function


AttentionInterface, AttentionMaskInterface, _causal_mask_function = _import_transformers()

# names transformers defines itself: never overwritten
_RESERVED = frozenset(AttentionInterface._global_mapping) | frozenset(AttentionMaskInterface._global_mapping)
_RESERVED |= {"eager"}

_COMMON = {"backend": "auto", "kernel_options": None}
#: The patterns and their options with defaults.
PATTERNS: dict[str, dict] = {
    "hash": {"n_buckets": 16, "seed": 0, "block_size": 128, **_COMMON},
    "drop": {"drop_rate": 0.5, "seed": None, "block_size": 128, **_COMMON},
    "dash": {"chunk_size": 64, "gamma": 1.0, "estimate_diagonal": False, "sigma": 1.0, "q_block": 128, **_COMMON},
    "dash_topk": {"chunk_size": 64, "top_k": None, "q_block": 128, **_COMMON},
}
_BACKENDS = {"hash": ("auto", "flex", "reference"), "drop": ("auto", "flex", "reference"),
             "dash": ("auto", "flex", "triton", "reference"), "dash_topk": ("auto", "flex", "reference")}
_UNSUPPORTED_KWARGS = ("sliding_window", "softcap", "s_aux", "sinks", "cu_seq_lens_q", "cu_seq_lens_k")
_REGISTERED: dict[str, FlexsparseAttention] = {}


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check_options(pattern: str, opts: dict) -> None:
    if opts["backend"] not in _BACKENDS[pattern]:
        raise ValueError(
            f"backend for pattern {pattern!r} must be one of {_BACKENDS[pattern]}, got {opts['backend']!r}"
        )
    if pattern == "hash":
        nb = opts["n_buckets"]
        if not _is_int(nb) or nb < 2 or nb % 2:
            raise ValueError(f"n_buckets must be an even integer >= 2, got {nb!r}")
        if not _is_int(opts["seed"]):
            raise ValueError(f"seed must be an integer for pattern 'hash' (the LSH rotations), got {opts['seed']!r}")
    elif pattern == "drop":
        rate = opts["drop_rate"]
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0.0 <= rate < 1.0:
            raise ValueError(f"drop_rate must be a number in [0, 1), got {rate!r}")
        if opts["seed"] is not None and not _is_int(opts["seed"]):
            raise ValueError(f"seed must be None or an integer, got {opts['seed']!r}")
    else:
        C = opts["chunk_size"]
        if not _is_int(C) or C < 1:
            raise ValueError(f"chunk_size must be an integer >= 1, got {C!r}")
        if pattern == "dash_topk" and (not _is_int(opts["top_k"]) or opts["top_k"] < 0):
            raise ValueError(f"pattern 'dash_topk' needs top_k, an integer >= 0, got {opts['top_k']!r}")


def _layer_idx(module) -> int:
    idx = getattr(module, "layer_idx", None)
    return idx if _is_int(idx) else 0


def _lsh(x: Tensor, r: Tensor, groups: int) -> Tensor:
    """int32 ``[B, H, N]`` angular-LSH buckets ``argmax([xR, -xR])`` of ``x [B, H, N, D]`` with
    ``r [H // groups, D, nb/2]`` (head h uses ``r[h // groups]``)."""
    if groups > 1:
        r = r.repeat_interleave(groups, 0)
    proj = torch.einsum("bhnd,hdr->bhnr", x.detach().float(), r)
    return torch.cat([proj, -proj], -1).argmax(-1).to(torch.int32)


def _mix(seed: int, layer: int) -> int:
    """A generator seed from (seed, layer index), distinct per layer."""
    return (seed * 1_000_003 + layer) % (2**63)


class FlexsparseAttention:
    """One flexsparse pattern registered with transformers under :attr:`name`.

    Made by :func:`register`; pass ``attn_implementation=obj.name`` to a model (or
    ``model.set_attn_implementation(obj.name)``). :meth:`attention` and :meth:`mask` are the two
    registered functions; :meth:`buckets`, :meth:`keep_masks` and :meth:`summary` return the
    pattern inputs a call uses (for inspection and tests).

    Attributes:
        name: the registered ``attn_implementation`` name.
        pattern: ``"hash"``, ``"drop"``, ``"dash"`` or ``"dash_topk"``.
        options: the pattern options with defaults filled in (see :func:`register`).
    """

    def __init__(self, name: str, pattern: str, options: dict):
        self.name, self.pattern, self.options = name, pattern, dict(options)
        self._rotations: dict[tuple, Tensor] = {}

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options.items())
        return f"FlexsparseAttention(name={self.name!r}, pattern={self.pattern!r}, {opts})"

    # ------------------------------------------------------------------------------------------
    # pattern inputs

    def rotations(self, layer_idx: int, kv_heads: int, head_dim: int, device=None) -> Tensor:
        """The LSH rotations of one layer (``"hash"``): float32 ``[kv_heads, head_dim, n_buckets/2]``
        of unit columns, drawn on the CPU from a generator seeded by ``(seed, layer_idx)``, so
        they are the same in every process and for every call; query head h uses those of its
        KV head ``h // G``."""
        nb = self.options["n_buckets"]
        key = (layer_idx, kv_heads, head_dim, str(torch.device(device) if device is not None else "cpu"))
        r = self._rotations.get(key)
        if r is None:
            g = torch.Generator().manual_seed(_mix(self.options["seed"], layer_idx))
            r = torch.randn(kv_heads, head_dim, nb // 2, generator=g)
            r = (r / r.norm(dim=1, keepdim=True)).to(key[3])
            self._rotations[key] = r
        return r

    def buckets(self, layer_idx: int, query: Tensor, key: Tensor) -> tuple[Tensor, Tensor]:
        """LSH buckets (``"hash"``): int32 ``q_buckets [B, Hq, N]`` and ``k_buckets [B, Hkv, N]``
        in ``[0, n_buckets)`` of ``query [B, Hq, N, D]`` and ``key [B, Hkv, N, D]``."""
        Hq, Hkv, D = query.shape[1], key.shape[1], key.shape[-1]
        r = self.rotations(layer_idx, Hkv, D, device=query.device)
        return _lsh(query, r, Hq // Hkv), _lsh(key, r, 1)

    def keep_masks(self, layer_idx: int, query: Tensor, key: Tensor) -> tuple[Tensor, Tensor]:
        """Keep masks (``"drop"``): bool ``q_keep [B, Hq, N]`` and ``k_keep [B, Hkv, N]``, each
        entry kept with probability ``1 - drop_rate``. With ``seed=None`` drawn independently per
        sequence from torch's global generator (fresh masks every call, like dropout); with an
        integer seed drawn from a generator seeded by ``(seed, layer_idx)``, one draw shared by
        all the sequences of the batch (the same masks for every call of one length)."""
        B, Hq, N = query.shape[:3]
        Hkv, dev = key.shape[1], query.device
        seed, rate = self.options["seed"], self.options["drop_rate"]
        if seed is None:
            return torch.rand(B, Hq, N, device=dev) >= rate, torch.rand(B, Hkv, N, device=dev) >= rate
        g = torch.Generator(device=dev)
        g.manual_seed(_mix(seed, layer_idx))
        q_keep = torch.rand(1, Hq, N, generator=g, device=dev) >= rate
        k_keep = torch.rand(1, Hkv, N, generator=g, device=dev) >= rate
        return q_keep.repeat(B, 1, 1), k_keep.repeat(B, 1, 1)

    def summary(self, module: nn.Module, key: Tensor) -> Tensor:
        """The DashAttention summary vectors ``w [Hkv, D]`` (``"dash"``, ``"dash_topk"``) in
        ``key.dtype``: the module's ``flexsparse_summary`` parameter when it has one (see
        :func:`add_dash_summaries`), else zeros (chunk summaries = mean of the chunk's keys)."""
        Hkv, D = key.shape[1], key.shape[-1]
        w = getattr(module, SUMMARY_ATTR, None)
        if w is None:
            return key.new_zeros(Hkv, D)
        if tuple(w.shape) != (Hkv, D):
            raise ValueError(
                f"{type(module).__name__}.{SUMMARY_ATTR} must have shape [kv_heads, head_dim] = [{Hkv}, {D}], "
                f"got {list(w.shape)}"
            )
        return w.to(key.dtype)

    # ------------------------------------------------------------------------------------------
    # the two registered functions

    def mask(
        self,
        batch_size: int,
        q_length: int | None = None,
        kv_length: int | None = None,
        q_offset=0,
        kv_offset=0,
        mask_function=None,
        attention_mask: Tensor | None = None,
        **kwargs,
    ) -> Tensor | None:
        """The ``AttentionMaskInterface`` function: ``None`` (plain causal, no padding) or the
        bool padding mask ``[batch, kv_length]`` (True = real token) for :meth:`attention`.

        Raises ``ValueError`` when the model asks for anything but the plain causal mask
        (sliding window, chunked, bidirectional, packed sequences, custom overlays) and
        ``NotImplementedError`` for a query that does not cover the whole sequence (decoding
        with a KV cache)."""
        if mask_function is not None and mask_function is not _causal_mask_function:
            what = getattr(mask_function, "__name__", type(mask_function).__name__)
            raise ValueError(
                f"attention implementation {self.name!r} (flexsparse {self.pattern!r}) is causal by construction and "
                f"cannot apply the mask the model asked for ({what}): sliding-window, chunked, bidirectional, "
                "packed-sequence and custom mask overlays are not supported"
            )
        cache_position = kwargs.get("cache_position")
        if q_length is None and cache_position is not None:  # older transformers pass cache positions
            q_length = cache_position.shape[0]
            q_offset = cache_position[0] if q_length else 0
        _check_full_sequence(self.name, q_length, kv_length, q_offset, kv_offset)
        if attention_mask is None:
            return None
        if not isinstance(attention_mask, Tensor) or attention_mask.ndim != 2 or attention_mask.shape[-1] != kv_length:
            raise ValueError(
                f"attention implementation {self.name!r}: expected a 2D padding mask [batch, {kv_length}], got "
                f"{_describe(attention_mask)}"
            )
        pad = attention_mask.to(torch.bool)
        if torch.compiler.is_compiling():  # no host synchronisation while tracing
            return pad
        return None if bool(pad.all()) else pad

    def attention(
        self,
        module: nn.Module,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attention_mask: Tensor | None,
        scaling: float | None = None,
        dropout: float = 0.0,
        **kwargs,
    ) -> tuple[Tensor, None]:
        """The ``AttentionInterface`` function.

        Args:
            module: the calling attention module (its ``layer_idx`` picks the hash rotations and
                drop seeds; its ``flexsparse_summary``, if any, is DashAttention's ``w``).
            query: ``[B, Hq, N, D]``; key, value: ``[B, Hkv, N, D]`` (``Hq % Hkv == 0``).
            attention_mask: ``None`` or a bool/integer padding mask ``[B, N]`` (from :meth:`mask`).
            scaling: logit scale (default ``1 / sqrt(D)``). dropout: must be 0.

        Returns:
            ``(out [B, N, Hq, D], None)``: the pattern's causal attention, no weights.
        """
        if dropout:
            raise NotImplementedError(
                f"attention implementation {self.name!r}: attention dropout is not supported (got dropout={dropout}); "
                "set config.attention_dropout = 0"
            )
        if getattr(module, "is_causal", True) is False or kwargs.get("is_causal", True) is False:
            raise ValueError(
                f"attention implementation {self.name!r} is causal self-attention only; "
                f"{type(module).__name__} is not causal (bidirectional or cross-attention)"
            )
        for kw in _UNSUPPORTED_KWARGS:
            if kwargs.get(kw) is not None:
                raise NotImplementedError(f"attention implementation {self.name!r} does not support {kw}")
        if query.ndim != 4 or key.ndim != 4 or value.shape != key.shape:
            raise ValueError(
                f"expected query [B, Hq, N, D] and key, value [B, Hkv, N, D], got {_describe(query)}, "
                f"{_describe(key)}, {_describe(value)}"
            )
        _check_full_sequence(self.name, query.shape[2], key.shape[2], 0, 0)
        pad = self._padding(attention_mask, query)
        out = self._run(module, query, key, value, pad, scaling)
        return out.transpose(1, 2).contiguous(), None

    # ------------------------------------------------------------------------------------------

    def _padding(self, attention_mask, query: Tensor) -> Tensor | None:
        if attention_mask is None:
            return None
        B, N = query.shape[0], query.shape[2]
        if (
            not isinstance(attention_mask, Tensor)
            or attention_mask.ndim != 2
            or tuple(attention_mask.shape) != (B, N)
            or attention_mask.dtype.is_floating_point
        ):
            raise ValueError(
                f"attention implementation {self.name!r} got an attention mask it cannot apply: "
                f"{_describe(attention_mask)}. flexsparse patterns are causal by construction and honour only a "
                f"bool 2D padding mask [batch, seq] = [{B}, {N}] (what its mask function, registered under the same "
                "name, builds); a custom 4D mask, a BlockMask, or a mask built outside AttentionMaskInterface cannot "
                "be combined with the pattern"
            )
        return attention_mask.to(device=query.device, dtype=torch.bool)

    def _run(self, module, query: Tensor, key: Tensor, value: Tensor, pad: Tensor | None, scaling) -> Tensor:
        o, layer = self.options, _layer_idx(module)
        if self.pattern == "hash":
            qb, kb = self.buckets(layer, query, key)
            nb = o["n_buckets"]
            if pad is not None:  # padded tokens go to an extra bucket of their own
                qb = torch.where(pad[:, None, :], qb, nb)
                kb = torch.where(pad[:, None, :], kb, nb)
                nb += 1
            return hash_sparse_attention(
                query, key, value, qb, kb, scale=scaling, backend=o["backend"], n_buckets=nb, validate=False,
                block_size=o["block_size"], kernel_options=o["kernel_options"],
            )
        if self.pattern == "drop":
            qk, kk = self.keep_masks(layer, query, key)
            if pad is not None:  # padded queries output 0, padded keys are never attended
                qk, kk = qk & pad[:, None, :], kk & pad[:, None, :]
            cap = capacity_for_rate(query.shape[2], o["drop_rate"], o["block_size"])
            return qk_sparse_attention(
                query, key, value, qk, kk, scale=scaling, backend=o["backend"], block_size=o["block_size"],
                capacity=cap, validate=False, kernel_options=o["kernel_options"],
            )
        if pad is not None:
            self._require_right_padding(pad)
        w = self.summary(module, key)
        extra = {"router": "topk", "top_k": o["top_k"]} if self.pattern == "dash_topk" else {
            "gamma": o["gamma"], "estimate_diagonal": o["estimate_diagonal"], "sigma": o["sigma"]}
        return dash_attention(
            query, key, value, w, chunk_size=o["chunk_size"], scale=scaling, backend=o["backend"], q_block=o["q_block"],
            kernel_options=o["kernel_options"], **extra,
        )

    def _require_right_padding(self, pad: Tensor) -> None:
        N = pad.shape[-1]
        right = torch.arange(N, device=pad.device) < pad.sum(-1, keepdim=True)
        if not torch.equal(pad, right):
            raise ValueError(
                f"attention implementation {self.name!r} (flexsparse {self.pattern!r}) supports right padding only: "
                "DashAttention's chunks are aligned to absolute positions, so left padding (or holes) would change "
                "the chunks of real tokens; pad on the right (tokenizer.padding_side = 'right')"
            )


def _describe(t) -> str:
    if isinstance(t, Tensor):
        return f"{type(t).__name__} of shape {list(t.shape)} and dtype {t.dtype}"
    shape = getattr(t, "shape", None)
    return f"{type(t).__name__}" + (f" of shape {list(shape)}" if shape is not None else "")


def _check_full_sequence(name: str, q_length, kv_length, q_offset, kv_offset) -> None:
    if q_length is None or kv_length is None:
        return
    if int(q_length) != int(kv_length) or int(q_offset) != 0 or int(kv_offset) != 0:
        raise NotImplementedError(
            f"attention implementation {name!r} computes a whole causal sequence at once (query length == key length, "
            f"no cached past); got q_length={int(q_length)}, kv_length={int(kv_length)}, q_offset={int(q_offset)}, "
            f"kv_offset={int(kv_offset)}. Incremental decoding with a KV cache is not implemented in the transformers "
            "integration: call the model with use_cache=False (model.generate(..., use_cache=False) recomputes the "
            "sequence at each step), or decode DashAttention with flexsparse.DashAttention and DashKVCache"
        )


def register(pattern: str, name: str | None = None, **options) -> FlexsparseAttention:
    """Register a flexsparse pattern as a transformers attention implementation.

    The attention function and the mask function go under the same ``name`` in
    ``AttentionInterface`` and ``AttentionMaskInterface`` (registering again replaces both).

    Args:
        pattern: ``"hash"`` (SCFA hash-sparse), ``"drop"`` (SCFA query/key drop), ``"dash"``
            (DashAttention, entmax router) or ``"dash_topk"`` (DashAttention summaries with a
            top-k router).
        name: the ``attn_implementation`` name, default ``"flexsparse_<pattern>"``; must not be
            one of transformers' own names or contain ``/`` or ``|``.
        **options: per pattern (defaults in :data:`PATTERNS`):

            * all: ``backend`` (``"auto"``, ``"flex"``, ``"reference"``; ``"triton"`` for
              ``"dash"``), ``kernel_options`` (FlexAttention kernel options).
            * ``"hash"``: ``n_buckets`` (even, default 16), ``seed`` (int, default 0: the LSH
              rotations of layer ``l`` are drawn from ``(seed, l)``), ``block_size`` (128).
            * ``"drop"``: ``drop_rate`` (in [0, 1), default 0.5), ``seed`` (None: fresh masks
              for every sequence and call from torch's generator; an int: fixed masks per layer
              and length, the same for every sequence of a batch), ``block_size`` (128).
            * ``"dash"``: ``chunk_size`` (64), ``gamma`` (1.0), ``estimate_diagonal`` (False),
              ``sigma`` (1.0), ``q_block`` (128).
            * ``"dash_topk"``: ``chunk_size`` (64), ``top_k`` (required), ``q_block`` (128).

    Returns:
        the :class:`FlexsparseAttention` (its ``name`` is what the model needs).
    """
    if pattern not in PATTERNS:
        raise ValueError(f"pattern must be one of {tuple(PATTERNS)}, got {pattern!r}")
    name = f"flexsparse_{pattern}" if name is None else name
    if not isinstance(name, str) or not name or "/" in name or "|" in name:
        raise ValueError(f"name must be a non-empty string without '/' or '|', got {name!r}")
    if name in _RESERVED:
        raise ValueError(f"name {name!r} is one of transformers' own attention implementations; pick another")
    unknown = sorted(set(options) - set(PATTERNS[pattern]))
    if unknown:
        raise TypeError(f"unknown option(s) {unknown} for pattern {pattern!r}; options: {sorted(PATTERNS[pattern])}")
    opts = {**PATTERNS[pattern], **options}
    _check_options(pattern, opts)
    attn = FlexsparseAttention(name, pattern, opts)
    AttentionMaskInterface.register(name, attn.mask)
    AttentionInterface.register(name, attn.attention)
    _REGISTERED[name] = attn
    return attn


def unregister(name: str) -> None:
    """Remove a name registered by :func:`register` from both transformers registries."""
    if name not in _REGISTERED:
        raise KeyError(f"{name!r} was not registered by flexsparse")
    AttentionInterface._global_mapping.pop(name, None)
    AttentionMaskInterface._global_mapping.pop(name, None)
    del _REGISTERED[name]


def add_dash_summaries(model: nn.Module) -> list[str]:
    """Give every attention module of ``model`` a learnable DashAttention summary vector.

    An attention module is one with an ``nn.Linear`` ``k_proj`` and an integer ``head_dim``
    (Llama, Mistral, Qwen and most decoder-only models). Each gets the parameter
    ``flexsparse_summary`` ``[kv_heads, head_dim]`` (zeros, i.e. mean pooling, on ``k_proj``'s
    device and dtype), which the ``"dash"`` patterns then use as ``w`` and train with the model.
    Modules that already have one keep it. Saved checkpoints then hold these parameters.

    Returns:
        the qualified names of the modules that have the parameter. Raises ``ValueError`` when
        no attention module is found.
    """
    names = []
    for mod_name, m in model.named_modules():
        k_proj, D = getattr(m, "k_proj", None), getattr(m, "head_dim", None)
        if not (isinstance(k_proj, nn.Linear) and _is_int(D) and D > 0 and k_proj.out_features % D == 0):
            continue
        if getattr(m, SUMMARY_ATTR, None) is None:
            w = torch.zeros(k_proj.out_features // D, D, device=k_proj.weight.device, dtype=k_proj.weight.dtype)
            m.register_parameter(SUMMARY_ATTR, nn.Parameter(w))
        names.append(mod_name)
    if not names:
        raise ValueError(
            f"no attention module (with an nn.Linear k_proj and an integer head_dim) in {type(model).__name__}"
        )
    return names
