"""Any transformers causal LM behind the pilm model protocol; its decode cache is in ``models.kv_cache``."""

from __future__ import annotations

import copy
import inspect
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import Tensor

from .base import LanguageModel, ModelState, Tokens, encode_with_tokenizer, single_id
from .device import free_memory
from .kv_cache import CASCADE, RowCache, check_kv_cache, decode_rows, reserved, share_prefixes
from .prompt_cache import Hit, PromptCache, Run, gather

if TYPE_CHECKING:
    from .adapter import AdapterSwitch

# Largest logits block ``score`` materialises at once (bytes of float32): bounds the memory
# of scoring many long sequences with a 50k vocabulary to a few hundred MB.
_SCORE_LOGITS_BYTES = 2**28


class HFModel(LanguageModel):
    """A transformers ``AutoModelForCausalLM`` and its tokenizer.

    Log-probabilities are float32 whatever dtype the matmuls run in.

    ``kv_cache`` is how the rows of a decode hold their prompt: "shared" stores each prompt's
    keys and values once for all its particles (``models.kv_cache.SharedPrefix``), "per-row"
    gives every row its own copy (a transformers ``DynamicCache``); both compute the same.
    "auto" (the default) shares on the CPU, where it is smaller and no slower (the bench's
    long-prompt leg: 64 particles after 512 tokens decode in 0.30x the per-row time), and
    keeps a copy per row on accelerators, where decoding is bound by kernel launches and the
    cascade's extra kernels made it 0.97-2.0x the per-row time on an H200 (docs/guide/gpu.md)
    for 0.6-0.9x the memory: choose "shared" there when memory binds (long prompts, many
    particles).
    """

    def __init__(self, hf_model, tokenizer, name: str = "hf-model"):
        self.hf = hf_model.eval()
        self.tokenizer = tokenizer
        self.name = name
        self.kv_cache = "auto"
        self.vocab_size = int(hf_model.config.vocab_size)
        self.context_length = getattr(hf_model.config, "max_position_embeddings", None)
        self.eos_token_id = single_id(tokenizer.eos_token_id, hf_model.generation_config.eos_token_id)
        self.bos_token_id = single_id(tokenizer.bos_token_id, hf_model.config.bos_token_id)
        # LoRA adapters injected into ``hf`` (see ``models.adapter``): None, or the switch that
        # selects ``self.adapter`` (None = all off, i.e. the base model) before each forward.
        self.adapters: AdapterSwitch | None = None
        self.adapter: str | None = None
        inner = hf_model.get_base_model() if hasattr(hf_model, "get_base_model") else hf_model  # under peft
        self._takes_cache = "cache" in inspect.signature(inner.forward).parameters
        cfg = hf_model.config
        self._windowed = (getattr(cfg, "sliding_window", None) is not None
                          and getattr(cfg, "use_sliding_window", True) is not False)
        self._identity = object()  # what a PromptCache keys this model's runs by
        share_prefixes(inner)

    @property
    def device(self) -> torch.device:
        return self.hf.device

    @property
    def kv_cache(self) -> str:
        return self._kv_cache

    @kv_cache.setter
    def kv_cache(self, value: str) -> None:
        self._kv_cache = check_kv_cache(value)

    @property
    def shares_prefixes(self) -> bool:
        """Whether particles share their prompt's KV cache (``kv_cache``, where the attention
        allows and as long as nobody switched the model to another implementation)."""
        wanted = self.kv_cache == "shared" or (self.kv_cache == "auto" and self.device.type == "cpu")
        return wanted and self.hf.config._attn_implementation == CASCADE

    @property
    def dtype(self) -> torch.dtype:
        return self.hf.dtype

    @property
    def dtype_name(self) -> str:
        return str(self.hf.dtype).removeprefix("torch.")

    # -- text <-> tokens ---------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False).input_ids)

    def decode(self, ids: Tokens) -> str:
        return self.tokenizer.decode(list(ids))

    def encode_prompt(self, prompt: str | Tokens, *, chat: bool = False) -> list[int]:
        """Raw text as the start of a document, or (``chat=True``) one user turn of the chat
        template, or a conversation (``pilm.models.base.encode_with_tokenizer``)."""
        return encode_with_tokenizer(self.tokenizer, self.name, prompt, chat)

    # -- batched decoding --------------------------------------------------------------
    def _forward(self, ids: Tensor, cache, **extra) -> tuple[Tensor, Tensor]:
        """One forward of ``ids`` (rows, L) on ``cache`` (updated in place); ``extra``: the
        attention mask and position ids. Returns the last position's log-probs and hidden state."""
        # The last hidden state is what the output layer reads: taken there, so the forward keeps
        # no per-layer states (output_hidden_states would hold every layer's, prompt-long at prefill).
        taken: list[Tensor] = []
        hook = self.hf.get_output_embeddings().register_forward_pre_hook(lambda _, args: taken.append(args[0]))
        try:
            with torch.no_grad():
                out = self._call(input_ids=ids.to(self.device), cache=cache, use_cache=True, logits_to_keep=1, **extra)
        finally:
            hook.remove()
        return torch.log_softmax(out.logits[:, -1], dim=-1, dtype=torch.float32), taken[-1][:, -1].float()

    def _prefill(self, ctxs: list[list[int]], group: Tensor) -> ModelState:
        """The prompts' one forward (left-padded to one width, with an attention mask and
        per-row positions, when their lengths differ) and the rows' cache: row i continues
        prompt ``group[i]``."""
        from transformers import DynamicCache

        ids, real = self._left_padded(ctxs)
        mask = real if len(set(map(len, ctxs))) > 1 else None
        extra = {} if mask is None else {"attention_mask": mask.long(), "position_ids": (mask.cumsum(-1) - 1).clamp(min=0)}
        cache = DynamicCache()
        logprobs, hidden = self._forward(ids, cache, **extra)
        rows = group.to(self.device)
        state = decode_rows(cache, mask, group, real.sum(-1)[rows], shared=self.shares_prefixes)
        return ModelState(logprobs[rows], hidden[rows], state, ids.shape[1])

    def _left_padded(self, rows: list[list[int]]) -> tuple[Tensor, Tensor]:
        """``rows`` left-padded to one width (host ids) and where each row's own ids are (on the
        device)."""
        width = max(map(len, rows))
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else (self.eos_token_id or 0)
        lengths = torch.tensor([len(r) for r in rows], device=self.device)
        return (torch.tensor([[pad] * (width - len(r)) + r for r in rows]),
                torch.arange(width, device=self.device) >= (width - lengths)[:, None])

    def start(self, prompt_ids: Tokens, n: int) -> ModelState:
        return self._prefill([self.context(prompt_ids)], torch.zeros(n, dtype=torch.long))

    def start_many(self, prompts: Sequence[Tokens], n: int) -> ModelState:
        """Prompts of different lengths are left-padded into one forward, with an attention
        mask and per-row positions that the later steps extend, so every row computes what
        its own prompt alone would (up to float rounding)."""
        ctxs = [self.context(p) for p in prompts]
        if len({tuple(c) for c in ctxs}) == 1:
            return self.start(ctxs[0], n * len(ctxs))
        return self._prefill(ctxs, torch.arange(len(ctxs)).repeat_interleave(n))

    def advance(self, state: ModelState, tokens: Tensor, hold: Tensor | None = None) -> ModelState:
        """Held rows get a masked-out position (a hole their attention and positions skip)
        and keep their previous next-token state; a cache that can (``SharedPrefix``) leaves
        them out of the forward."""
        rows: RowCache = state.cache
        if hold is not None and not bool(hold.any()):
            hold = None
        if hold is not None:
            hold = hold.to(self.device)
            tokens = torch.where(hold.to(tokens.device), 0, tokens)
        extra = rows.step(hold)
        ran = extra.pop("rows", None)  # the rows the forward runs (None: every row)
        if ran is not None:
            tokens = tokens.to(ran.device)[ran]
        if hold is None:
            state.release()  # before the forward, which makes the next ones
        elif not len(tokens):  # every row waits
            return ModelState(state.logprobs, state.hidden, rows, state.length + 1)
        with rows.attending():
            logprobs, hidden = self._forward(tokens.view(-1, 1), **extra)
        if hold is not None:
            if ran is None:
                keep = hold.view(-1, 1)
                logprobs = torch.where(keep, state.logprobs, logprobs)
                hidden = torch.where(keep, state.hidden, hidden)
            else:
                logprobs = state.logprobs.index_copy(0, ran, logprobs)
                hidden = state.hidden.index_copy(0, ran, hidden)
            state.release()
        return ModelState(logprobs, hidden, rows, state.length + 1)

    def reindex(self, state: ModelState, idx: Tensor) -> ModelState:
        if idx.device.type == "cpu" and len(idx) == state.n and torch.equal(idx, torch.arange(state.n)):
            return state  # (a row map already on the device is not synced back to test it)
        idx = idx.to(self.device)
        state.cache.reorder(idx)
        out = ModelState(state.logprobs[idx], state.hidden[idx], state.cache, state.length)
        state.release()
        return out

    shares_choice_prefix = True

    def choice_logprobs(self, prompts: Sequence[Tokens], choices: Sequence[int],
                        cache: PromptCache | None = None) -> Tensor:
        """Each prompt runs from the longest prefix already run: by an earlier call that kept
        its forward in ``cache`` (``models.prompt_cache``), or the prefix every prompt shares
        (a judge's instructions and question, say), run once here for all of them. The rest of
        each prompt is left-padded into one forward after its prefix's keys and values, with a
        mask and per-row positions; with a ``cache`` that forward is kept for later calls. A
        model with a sliding window runs whole prompts (padding between a prefix and its rest
        would move the window, which counts cache slots, not positions)."""
        if self._windowed:
            return super().choice_logprobs(prompts, choices, cache)
        store = PromptCache(max_bytes=0) if cache is None else cache
        ctxs = [self.context(p) for p in prompts]
        owner = (self._identity, self.adapter)
        hits = [store.longest(owner, c, len(c) - 1) for c in ctxs]
        shared = _shared_prompt(ctxs)
        if sum(h.length < shared for h in hits) > 1:
            prefix = ctxs[0][:shared]
            _, run = self._run_after([prefix], [store.longest(owner, prefix, shared - 1)], store, owner)
            hits = [h if h.length >= shared else Hit(run, 0, shared) for h in hits]
        logprobs, run = self._run_after(ctxs, hits, store, owner)
        store.add(run)  # it holds the shared prefix too, in every row
        return torch.stack([logprobs[:, v] for v in choices], 1)

    def _run_after(self, ctxs: list[list[int]], hits: list[Hit], store: PromptCache, owner) -> tuple[Tensor, Run]:
        """One forward of each context after its ``hits`` prefix (the positions run counted in
        ``store``): the last position's log-probs and the run."""
        from transformers import DynamicCache

        past: Any = DynamicCache()
        width = max(h.length for h in hits)
        lengths = torch.tensor([h.length for h in hits], device=self.device)
        rests = [c[h.length:] for c, h in zip(ctxs, hits, strict=True)]
        ids, real = self._left_padded(rests)
        mask = real
        if width:
            layers, held = gather(hits, width)
            for i, (k, v) in enumerate(layers):
                past.update(k, v, i)
            mask = torch.cat([held, real], 1)
        logprobs, _ = self._forward(ids, past, attention_mask=mask.long(),
                                    position_ids=lengths[:, None] + (real.cumsum(-1) - 1).clamp(min=0))
        store.positions += sum(map(len, rests))
        total = mask.shape[1]
        run = Run(owner, [(layer.keys, layer.values) for layer in past.layers], ctxs, cached=[h.length for h in hits],
                  cached_at=[width - h.length for h in hits], rest_at=[total - len(r) for r in rests])
        return logprobs, run

    def max_rows(self, length: int, *, prompt: int = 0, per_prompt: int = 1) -> int:
        """Rows whose KV cache (``length`` positions, the first ``prompt`` of them the prompt's)
        and next-token tensors (a few copies of the V log-probabilities) fit in half the device's
        free memory. Rows that share their prompt's cache (``shares_prefixes``) hold it once per
        ``per_prompt`` rows, and their own positions in buffers that double (``reserved``)."""
        cfg = self.hf.config
        heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        positions: float = length
        if self.shares_prefixes and 0 < prompt <= length:
            positions = prompt / max(per_prompt, 1) + reserved(length - prompt)
        kv = 2 * cfg.num_hidden_layers * heads * head_dim * self.hf.dtype.itemsize * positions
        per_row = kv + 8 * self.vocab_size * 4 + 16 * cfg.hidden_size * 4
        return max(1, int(0.5 * free_memory(self.device) // per_row))

    def prefix_logprobs(self, prompt_ids: Tokens, tokens: Tensor) -> Tensor:
        """Teacher-forced: the context runs once (one row) and its KV cache is expanded to the
        B rows (differentiably, so a trained adapter gets the prompt's gradient too), then one
        forward of the tokens. Right padding needs no mask: causal attention never looks at
        later positions."""
        ctx = torch.tensor([self.context(prompt_ids)], device=self.device)
        b, steps = tokens.shape
        from transformers import DynamicCache

        cache = DynamicCache()
        head = self._call(input_ids=ctx, cache=cache, use_cache=True, logits_to_keep=1)
        first = head.logits[:, -1:].float().expand(b, -1, -1)
        if steps == 0:
            return torch.log_softmax(first, -1)
        rest = self._call(input_ids=tokens.clamp(min=0).to(self.device), cache=self._expand(cache, b), use_cache=True,
                          logits_to_keep=steps).logits.float()
        return torch.log_softmax(torch.cat([first, rest], 1), -1)

    def _call(self, **kwargs):
        """The transformers forward, with this model's adapter (or none) selected first.
        The KV cache goes in as ``cache`` (transformers >= 5.24) or ``past_key_values``
        (earlier), whichever this model's forward takes."""
        if "cache" in kwargs and not self._takes_cache:
            kwargs["past_key_values"] = kwargs.pop("cache")
        if kwargs.get("cache", kwargs.get("past_key_values", 0)) is None:
            kwargs.pop("cache", None)
            kwargs.pop("past_key_values", None)
        if self.adapters is not None:
            self.adapters.use(self.adapter)
        return self.hf(**kwargs)

    def _prefix(self, ids: list[int]):
        """The KV cache of ``ids``, run once as one row (no gradient)."""
        from transformers import DynamicCache

        cache = DynamicCache()
        self._forward(torch.tensor([ids]), cache)
        return cache

    def _expand(self, cache, rows: int):
        """``cache`` of one row copied, in place, to ``rows`` rows (differentiably)."""
        cache.reorder_cache(cast(torch.LongTensor, torch.zeros(rows, dtype=torch.long, device=self.device)))
        return cache

    # -- scoring -------------------------------------------------------------------------
    def score(self, sequences: Sequence[Tokens], starts: Sequence[int]) -> Tensor:
        """Sum of log p(seq[t] | seq[:t]) over t >= start, in blocks of rows. The longest
        prefix all rows share before their first scored token (e.g. a prompt) is run once
        and its KV cache copied to every row, so it is not recomputed per sequence."""
        seqs, firsts = [], []
        for seq, s in zip(sequences, starts, strict=True):
            ctx = self.context(list(seq[:s]))
            seqs.append(ctx + [int(t) for t in seq[s:]])
            firsts.append(len(ctx))
        out = torch.zeros(len(seqs))
        if not seqs:
            return out
        shared = _common_prefix_length(seqs, min(firsts) - 1)
        prefix_cache = self._prefix(seqs[0][:shared]) if shared else None
        rows_per_block = max(1, _SCORE_LOGITS_BYTES // (4 * self.vocab_size * max(map(len, seqs))))
        for lo in range(0, len(seqs), rows_per_block):
            block = range(lo, min(lo + rows_per_block, len(seqs)))
            out[lo : block.stop] = self._score_block([seqs[i] for i in block], [firsts[i] for i in block],
                                                     shared, prefix_cache)
        return out

    def _score_block(self, seqs: list[list[int]], firsts: list[int], shared: int, prefix_cache) -> Tensor:
        # Right padding needs no attention mask: causal attention never looks at later pads.
        length = max(map(len, seqs))
        first = min(firsts)
        if first >= length:  # nothing to score
            return torch.zeros(len(seqs))
        ids = torch.tensor([s + [0] * (length - len(s)) for s in seqs])
        cache = None if prefix_cache is None else self._expand(copy.deepcopy(prefix_cache), len(seqs))
        keep = length - first + 1  # logits at positions first-1 .. length-1
        with torch.no_grad():
            logits = self._call(input_ids=ids[:, shared:].to(self.device), cache=cache,
                             use_cache=cache is not None, logits_to_keep=keep).logits[:, :-1].float()
        targets = ids[:, first:].to(logits.device)
        lp = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)
        pos = torch.arange(first, length)
        mask = (pos[None, :] >= torch.tensor(firsts)[:, None]) & (pos[None, :] < torch.tensor([len(s) for s in seqs])[:, None])
        return torch.where(mask, lp.cpu(), 0.0).sum(-1)


def _shared_prompt(ctxs: list[list[int]]) -> int:
    """The prefix all of several prompts share, each keeping at least one position of its own
    (0 for one prompt: nothing to share)."""
    return _common_prefix_length(ctxs, min(map(len, ctxs)) - 1) if len(ctxs) > 1 else 0


def _common_prefix_length(seqs: list[list[int]], cap: int) -> int:
    """Length of the longest prefix shared by all ``seqs``, at most ``cap``."""
    n = 0
    while n < cap and all(len(s) > n and s[n] == seqs[0][n] for s in seqs):
        n += 1
    return n
