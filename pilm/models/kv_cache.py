"""The KV cache of a batched decode: each prompt's keys and values stored once and shared by
every row that continues it, and each row's own positions in buffers written in place.

n rows (particles) continuing one prompt of P positions hold P + n·S positions after S
steps, not n·(P + S). Attention for a decoded token splits over the two parts (cascade
attention, as in Hydragen, Juravsky et al. 2024): with a query q_i of row i,

    a_i = softmax([q_i·K_prefix(i)ᵀ, q_i·K_iᵀ]·scale) · [V_prefix(i); V_i],

where the prefix scores of all rows of one prompt are one matrix product (the prefix is read
once per step, not once per row) and the rows' own scores a batched product; one softmax over
both keeps it exact. A step writes its new keys and values into the next free column (the
buffers double when full), so nothing is copied per step, where a ``DynamicCache`` concatenates
the whole cache; resampling gathers the rows' own buffers, never the prompt.

``SharedPrefix`` is used for the ``ARCHITECTURES`` with sdpa attention (their default) and no
sliding window: ``share_prefixes`` registers the "pilm_cascade" implementation, which is sdpa
itself for every forward outside a decode step (prefill, scoring, training). Other models
decode through ``DynamicRows``, a ``DynamicCache`` with per-row padding masks.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar
from typing import Any, Protocol

import torch
from torch import Tensor

CASCADE = "pilm_cascade"
CHUNK = 16  # a row's first buffer holds this many positions; a full one doubles (exact at powers of two,
# half empty at worst, each position copied once on average)


def reserved(positions: int) -> int:
    """The positions a row's own buffers reserve to hold ``positions``: ``CHUNK``, doubled
    until they fit."""
    size = CHUNK
    while size < positions:
        size *= 2
    return size


_ACTIVE: ContextVar[SharedPrefix | None] = ContextVar("pilm_shared_prefix", default=None)


class RowCache(Protocol):
    """What ``HFModel`` needs of a decode cache."""

    def step(self, hold: Tensor | None) -> dict[str, Any]:
        """Reserve the next position of every row (``hold``: rows that append nothing) and
        return the forward's keyword arguments (cache, position ids, attention mask), and
        ``rows``: the rows the forward runs, where a cache leaves the held ones out (the
        forward's inputs and outputs are then those rows' alone)."""

    def reorder(self, idx: Tensor) -> None:
        """Keep rows ``idx`` (duplicates allowed, fewer allowed), in place."""

    def attending(self) -> contextlib.AbstractContextManager[None]:
        """The context the forward of a step runs in."""

    def nbytes(self) -> int:
        """Bytes of keys and values held."""


KV_CACHES = ("auto", "shared", "per-row")  # HFModel.kv_cache


def check_kv_cache(value: str) -> str:
    if value not in KV_CACHES:
        raise ValueError(f"kv_cache={value!r}: use one of {', '.join(KV_CACHES)}")
    return value


def decode_rows(prefill: Any, prompt_mask: Tensor | None, group: Tensor, positions: Tensor, *,
                shared: bool) -> RowCache:
    """The cache of rows that continue the prompts of ``prefill`` (their forward's
    ``DynamicCache``; ``prompt_mask`` (prompts, P): False at left padding, or None): row i
    continues prompt ``group[i]`` at position ``positions[i]``."""
    if shared:
        return SharedPrefix([(layer.keys, layer.values) for layer in prefill.layers], prompt_mask, group, positions)
    rows = DynamicRows(prefill, None if prompt_mask is None else prompt_mask.long(), prefill.get_seq_length())
    rows.reorder(group.to(positions.device))
    return rows


# Architectures whose decoder reads nothing from the cache but ``update`` and takes explicit
# position ids and a 4-D mask (each is decoded against its full forward in tests/test_kv_cache.py).
ARCHITECTURES = ("llama", "qwen2", "qwen3", "mistral")


def share_prefixes(hf) -> bool:
    """Switch ``hf`` (a transformers model, unwrapped from peft) to the cascade attention when
    it can take it: one of ``ARCHITECTURES``, sdpa attention, no sliding window or
    soft-capping. Returns whether it did. The switch is the model's own (its config's
    attention implementation), but outside a decode step the cascade is sdpa itself, so every
    other forward of the model, inside pilm or not, is unchanged."""
    cfg = hf.config
    plain = not any(getattr(cfg, a, None) for a in ("sliding_window", "attn_logit_softcapping", "use_sliding_window"))
    if cfg.model_type not in ARCHITECTURES or cfg._attn_implementation not in ("sdpa", CASCADE) or not plain:
        return False
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(CASCADE, _cascade_attention)
    AttentionMaskInterface.register(CASCADE, sdpa_mask)
    hf.set_attn_implementation(CASCADE)
    return True


class DynamicRows:
    """A ``DynamicCache`` and, where rows differ in length or wait, a (rows, positions) mask
    with 0 at left padding and holes; positions count each row's real tokens."""

    def __init__(self, cache, mask: Tensor | None, length: int):
        self.cache, self.mask, self.length = cache, mask, length

    def step(self, hold: Tensor | None) -> dict[str, Any]:
        if hold is not None and self.mask is None:
            self.mask = torch.ones(len(hold), self.length, dtype=torch.long, device=hold.device)
        if self.mask is not None:
            new = self.mask.new_ones(len(self.mask), 1) if hold is None else (~hold).long().view(-1, 1)
            self.mask = torch.cat([self.mask, new.to(self.mask.device)], 1)
        self.length += 1
        if self.mask is None:
            return {"cache": self.cache}
        positions = (self.mask.cumsum(-1) - 1).clamp(min=0)[:, -1:]
        return {"cache": self.cache, "attention_mask": self.mask, "position_ids": positions}

    def reorder(self, idx: Tensor) -> None:
        self.cache.reorder_cache(idx)
        if self.mask is not None:
            self.mask = self.mask[idx]

    def attending(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for layer in self.cache.layers for t in (layer.keys, layer.values))


class SharedPrefix:
    """Prompts' keys and values once (``prefix``: per layer (prompts, kv heads, P, head dim),
    ``prefix_mask`` (prompts, P) with False at left padding, or None) and each row's own
    positions; row i continues prompt ``group[i]`` (kept on the host: it sizes the layout).

    A step with held rows runs only the others through the model (``step`` returns them as
    ``rows``): a held row's column stays zeros, masked out, and its attention is not asked
    for, so the forward's cost follows the rows that append (in a step-level filter, rows
    wait at their boundary for a large share of the steps)."""

    def __init__(self, prefix: list[tuple[Tensor, Tensor]], prefix_mask: Tensor | None, group: Tensor,
                 positions: Tensor):
        self.prefix = prefix
        k0 = prefix[0][0]
        self.prefix_bias = None if prefix_mask is None else torch.zeros(
            prefix_mask.shape, dtype=k0.dtype, device=k0.device).masked_fill(~prefix_mask, float("-inf"))[:, None, None]
        self.group = group.cpu()
        self.positions = positions  # (rows,) on the device: each row's next position id
        n = len(group)
        self.keys = [k.new_empty(n, k.shape[1], 0, k.shape[3]) for k, _ in prefix]
        self.values = [v.new_empty(n, v.shape[1], 0, v.shape[3]) for _, v in prefix]
        self.valid = torch.zeros(n, 0, dtype=torch.bool, device=k0.device)  # False at a held row's hole
        self.used = 0
        self.active: Tensor | None = None  # this step's appending rows, when some wait
        self.holes = False  # whether any row ever waited (else every own position counts)
        self._layout: tuple[Tensor, int] | None = None
        self._calls = [0, 0]  # a step's cache writes and cascade attentions: equal, or the prompt was skipped

    @property
    def n(self) -> int:
        return len(self.group)

    def step(self, hold: Tensor | None) -> dict[str, Any]:
        if self.used == self.valid.shape[1]:
            self._grow()
        self.holes |= hold is not None
        live = torch.ones_like(self.positions, dtype=torch.bool) if hold is None else ~hold.to(self.valid.device)
        self.valid[:, self.used] = live
        positions, self.positions = self.positions, self.positions + live
        self.used += 1
        self.active = None if hold is None else live.nonzero().squeeze(1)
        if self.active is not None:
            positions = positions[self.active]
        # A 4-D mask is passed to attention as it is (transformers builds none); it covers every row.
        return {"cache": self, "position_ids": positions.view(-1, 1), "rows": self.active,
                "attention_mask": self.valid[:, None, None, : self.used]}

    def _grow(self) -> None:
        size = reserved(self.used + 1)
        for buffers in (self.keys, self.values):
            for i, old in enumerate(buffers):
                new = old.new_zeros(old.shape[0], old.shape[1], size, old.shape[3])  # a hole stays 0, not NaN
                new[:, :, : self.used] = old[:, :, : self.used]
                buffers[i] = new
        valid = self.valid.new_zeros(self.n, size)
        valid[:, : self.used] = self.valid[:, : self.used]
        self.valid = valid

    def update(self, key: Tensor, value: Tensor, layer_idx: int, *args, **kwargs) -> tuple[Tensor, Tensor]:
        """transformers' cache call: store the step's keys and values in the reserved column
        and return the row's own positions so far (the prefix is the attention's to add)."""
        self._calls[0] += 1
        col = self.used - 1
        if self.active is None:
            self.keys[layer_idx][:, :, col : col + 1] = key
            self.values[layer_idx][:, :, col : col + 1] = value
        else:
            self.keys[layer_idx][:, :, col].index_copy_(0, self.active, key[:, :, 0])
            self.values[layer_idx][:, :, col].index_copy_(0, self.active, value[:, :, 0])
        return self.keys[layer_idx][:, :, : self.used], self.values[layer_idx][:, :, : self.used]

    def reorder(self, idx: Tensor) -> None:
        for buffers in (self.keys, self.values):
            for i, old in enumerate(buffers):
                buffers[i] = old.index_select(0, idx)
        self.valid, self.positions = self.valid[idx], self.positions[idx]
        # One prompt needs no host copy of the row map (no sync); several size the layout by it.
        self.group = self.group.new_zeros(len(idx)) if len(self.prefix[0][0]) == 1 else self.group[idx.cpu()]
        self._layout = None

    @contextlib.contextmanager
    def attending(self) -> Iterator[None]:
        """The step's forward; a layer that stored its keys but did not attend through the
        cascade (the model was switched to another attention after the prompt) is an error,
        whether its own attention then failed (held rows leave it fewer queries than keys) or
        returned a number without the prompt."""
        token, self._calls = _ACTIVE.set(self), [0, 0]
        try:
            yield
        except Exception as err:
            if self._calls[0] != self._calls[1]:
                raise self._switched() from err
            raise
        finally:
            _ACTIVE.reset(token)
        if self._calls[0] != self._calls[1]:
            raise self._switched()

    def _switched(self) -> RuntimeError:
        writes, attended = self._calls
        return RuntimeError(f"{writes} layers stored this step's keys but {attended} attended through the shared "
                            "prompt cache: the model's attention implementation changed after the prompt was "
                            f"encoded (it must stay {CASCADE!r}); start the decode again")

    def nbytes(self) -> int:
        """Bytes of the positions in use (the buffers reserve up to as many again)."""
        own = [t[:, :, : self.used] for t in (*self.keys, *self.values)]
        return sum(t.numel() * t.element_size() for t in (*own, *(x for kv in self.prefix for x in kv)))

    def layout(self) -> tuple[Tensor | None, int]:
        """Where each row's query sits when the rows of each prompt are laid out in a block of
        ``m`` slots: (slot of row i, m), or (None, n) for one prompt (the rows in order)."""
        if len(self.prefix[0][0]) == 1:
            return None, self.n
        if self._layout is None:
            counts = torch.bincount(self.group, minlength=len(self.prefix[0][0]))
            m = int(counts.max()) if self.n else 1
            order = torch.argsort(self.group, stable=True)
            first = torch.cumsum(counts, 0) - counts
            rank = torch.empty_like(order)
            rank[order] = torch.arange(self.n) - first[self.group[order]]
            self._layout = ((self.group * m + rank).to(self.positions.device), m)
        return self._layout

    def attend(self, layer: int, query: Tensor, key: Tensor, value: Tensor, mask: Tensor,
               scaling: float) -> Tensor:
        """Attention of one new token per row over its prompt and its own positions (the
        module docstring's a_i), in the layout transformers expects: (rows, 1, heads, dim).
        When rows wait, ``query`` holds the appending rows' alone: the held rows' slots get
        zeros, and only the appending rows' outputs are returned."""
        self._calls[1] += 1
        _, heads, q_len, dim = query.shape
        if q_len != 1:
            raise ValueError(f"the shared-prefix cache decodes one token per row per step, not {q_len}")
        n = self.n
        if self.active is not None:
            query = query.new_zeros(n, heads, 1, dim).index_copy_(0, self.active, query)
        pk, pv = self.prefix[layer]
        prompts, kv_heads, p_len, _ = pk.shape
        g = heads // kv_heads
        q = query.reshape(n, kv_heads, g, dim) * scaling
        slots, m = self.layout()
        scores_p = torch.matmul(_blocks(q, slots, prompts, m), pk.transpose(-1, -2))
        if self.prefix_bias is not None:
            scores_p = scores_p + self.prefix_bias
        scores_s = torch.matmul(q, key.transpose(-1, -2))  # (n, kv heads, g, S)
        if self.holes:
            scores_s = scores_s.masked_fill(~mask, float("-inf"))
        scores = torch.cat([_rows(scores_p, slots, n, g), scores_s], -1)
        weights = torch.softmax(scores, -1, dtype=torch.float32).to(query.dtype)
        w_p, w_s = weights.split([p_len, weights.shape[-1] - p_len], -1)
        out = torch.matmul(w_s, value) + _rows(torch.matmul(_blocks(w_p, slots, prompts, m), pv), slots, n, g)
        out = out.reshape(n, 1, heads, value.shape[-1])
        return out if self.active is None else out[self.active]


def _blocks(x: Tensor, slots: Tensor | None, prompts: int, m: int) -> Tensor:
    """Rows (n, kv heads, g, k) to prompt blocks (prompts, kv heads, m·g, k), zeros in empty slots."""
    n, kv_heads, g, k = x.shape
    if slots is not None:
        x = x.new_zeros(prompts * m, kv_heads, g, k).index_copy_(0, slots, x)
    return x.reshape(prompts, m, kv_heads, g, k).transpose(1, 2).reshape(prompts, kv_heads, m * g, k)


def _rows(x: Tensor, slots: Tensor | None, n: int, g: int) -> Tensor:
    """The inverse of ``_blocks``: (prompts, kv heads, m·g, k) to (n, kv heads, g, k), a view
    for one prompt."""
    prompts, kv_heads, mg, k = x.shape
    x = x.view(prompts, kv_heads, mg // g, g, k).transpose(1, 2)
    return x[0] if slots is None else x.reshape(-1, kv_heads, g, k)[slots]


def _cascade_attention(module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
                       scaling: float | None = None, **kwargs) -> tuple[Tensor, None]:
    """The "pilm_cascade" attention implementation: ``SharedPrefix.attend`` inside a decode
    step, sdpa everywhere else."""
    cache = _ACTIVE.get()
    if cache is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
    assert attention_mask is not None  # the step's 4-D mask
    extra = [k for k in ("s_aux", "sinks", "softcap", "sliding_window") if kwargs.get(k) is not None]
    if extra:
        raise NotImplementedError(f"the shared-prompt cache does not implement attention with {', '.join(extra)}")
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    return cache.attend(module.layer_idx, query, key, value, attention_mask, scale), None


