"""Conformance checks for the protocols users implement (potentials, language models)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .models.base import LanguageModel
from .potentials.base import Potential, Sequences, evaluate


def check_potential(potential: Potential, model: LanguageModel, prompt: str | Sequence[int] = "", completions=None,
                    *, atol: float = 1e-4) -> None:
    """Raise ``AssertionError``/``PotentialError`` unless ``potential`` keeps the protocol:
    a ``Potential``, log phi of shape (n,) float32 with no NaN/+inf on ``completions``
    (default: a few short ones), a prefix score of the same form if it claims one, and the
    same answer for a sequence alone as inside a batch, within ``atol`` (a potential that runs
    a model in bfloat16 needs more: padded batches take other kernels, and a sum of a few
    bfloat16 log-probabilities of size ~20 moves by tenths of a nat)."""
    assert isinstance(potential, Potential), f"{potential!r} is not a pilm Potential"
    assert isinstance(potential.name, str) and potential.name, "a potential needs a non-empty name"
    prompt_ids = tuple(model.encode_prompt(prompt))
    if completions is None:
        completions = [(), *[(v,) for v in range(min(3, model.vocab_size))], tuple(range(min(4, model.vocab_size)))]
    seqs = Sequences(model, prompt_ids, [tuple(c) for c in completions])
    for final in (True, False) if potential.has_prefix else (True,):
        batch = evaluate(potential, seqs, final=final)
        assert batch.dtype == torch.float32
        alone = torch.cat([evaluate(potential, Sequences(model, prompt_ids, [s]), final=final) for s in seqs.tokens])
        same_zeros = torch.equal(torch.isneginf(batch), torch.isneginf(alone))
        finite = torch.isfinite(batch)
        assert same_zeros and torch.allclose(batch[finite], alone[finite], atol=atol), (
            f"{potential.name} gives different values for a sequence alone and inside a batch"
        )


def check_language_model(model: LanguageModel, prompt_ids: Sequence[int] = (0,), steps: int = 3) -> None:
    """Raise ``AssertionError`` unless ``model`` keeps the protocol: normalised float32
    next-token log-probs, ``advance`` agreeing with ``score``, ``reindex`` selecting rows,
    ``advance(hold=...)`` keeping held rows as they were."""
    state = model.start(prompt_ids, 2)
    assert state.logprobs.dtype == torch.float32 and state.logprobs.shape == (2, model.vocab_size)
    assert torch.allclose(state.logprobs.exp().sum(-1), torch.ones(2), atol=1e-3), "next-token probabilities must sum to 1"
    seq, total = list(prompt_ids), 0.0
    for step in range(steps):
        token, other = (step * 7 + 1) % model.vocab_size, (step * 5 + 2) % model.vocab_size
        total += float(state.logprobs[0, token])
        seq.append(token)
        state = model.advance(state, torch.tensor([token, other]))  # the two rows now differ
    scored = float(model.score([seq], [len(prompt_ids)])[0])
    assert abs(scored - total) < 1e-3 * max(1.0, abs(total)), f"score {scored} != stepped log-prob {total}"
    rows = state.logprobs.clone()
    assert not torch.allclose(rows[0], rows[1]), "rows fed different tokens must differ"
    swapped = model.reindex(state, torch.tensor([1, 0, 0]))
    assert swapped.n == 3, "reindex must return one row per index"
    for i, j in enumerate([1, 0, 0]):
        assert torch.allclose(swapped.logprobs[i], rows[j], atol=1e-5), f"reindexed row {i} is not row {j}"
    after = model.advance(swapped, torch.tensor([0, 0, 0]))
    assert torch.allclose(after.logprobs[1], after.logprobs[2], atol=1e-5), "copied rows must continue alike"
    assert not torch.allclose(after.logprobs[0], after.logprobs[1]), "reindex must move the cache with the rows"
    # holding (step-level samplers): a held row appends nothing and keeps its state
    held = model.advance(after, torch.tensor([1, 1, 1]), hold=torch.tensor([False, True, False]))
    assert torch.allclose(held.logprobs[1], after.logprobs[1], atol=1e-5), "a held row must keep its state"
    resumed = model.advance(held, torch.tensor([1, 1, 0]), hold=torch.tensor([True, False, True]))
    assert torch.allclose(resumed.logprobs[1], held.logprobs[2], atol=1e-4), (
        "a held row that resumes must continue as if it had never waited")


def check_allowed_next(potential: Potential, model: LanguageModel, prefixes: Sequence[Sequence[int]],
                       prompt: str | Sequence[int] = "", stop: int | None = None) -> None:
    """Raise ``AssertionError`` unless the potential's next-token mask is its own prefix score
    one step ahead: token v allowed after a prefix exactly where psi(prefix + v) > 0, and the
    stop token where phi(prefix) > 0 (a mask that forbids more biases a masked sampler; one that
    allows more wastes particles). O(V) prefix scores per prefix: for small vocabularies."""
    prompt_ids = tuple(model.encode_prompt(prompt))
    masks = potential.allowed_next(Sequences(model, prompt_ids, [tuple(p) for p in prefixes]), stop)
    assert masks is not None, f"{potential.name} gives no mask"
    for prefix, mask in zip(prefixes, masks):
        prefix = tuple(prefix)
        ahead = Sequences(model, prompt_ids, [prefix + (v,) for v in range(model.vocab_size)])
        want = torch.isfinite(evaluate(potential, ahead, final=False))
        if stop is not None:
            want[stop] = bool(torch.isfinite(evaluate(potential, Sequences(model, prompt_ids, [prefix]), final=True)))
        wrong = (mask != want).nonzero().flatten().tolist()
        assert not wrong, f"{potential.name}: after {prefix}, the mask is wrong at tokens {wrong[:10]}"


def token_bytes(tokenizer) -> list[bytes]:
    """Each token's bytes for a GPT-2-style byte-level BPE tokenizer (each character of a token
    stands for one byte: printable bytes for themselves, the others for chr(256 + k) in byte
    order); added tokens (e.g. "<|im_start|>") as their UTF-8 text."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    to_byte = {chr(b): b for b in printable} | {chr(256 + k): b for k, b in enumerate(others)}
    return [bytes(to_byte[c] for c in t) if all(c in to_byte for c in t) else t.encode()
            for t in tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))]


def byte_reference_mask(pattern: str, tokenizer, prefix: Sequence[int], stop: int) -> torch.Tensor:
    """The exact next-token mask of ``pattern`` after ``prefix`` on a byte-level tokenizer, for
    checking mask engines: v is allowed iff the bytes of prefix + v (an added token's bytes are
    its text) are a prefix of valid UTF-8 that ``pattern``, matched over bytes, can still
    full-match; ``stop`` iff the prefix's bytes are complete UTF-8 and full-match. Exact for
    patterns whose byte form
    means the same as the text form: literals (multi-byte ones too) and ASCII classes."""
    import codecs

    import regex

    rx, pieces = regex.compile(pattern.encode()), token_bytes(tokenizer)
    head = b"".join(pieces[t] for t in prefix)

    def utf8_prefix(data: bytes, final: bool) -> bool:
        try:
            codecs.getincrementaldecoder("utf-8")().decode(data, final=final)
            return True
        except UnicodeDecodeError:
            return False

    mask = torch.tensor([utf8_prefix(head + pieces[v], False)
                         and rx.fullmatch(head + pieces[v], partial=True) is not None for v in range(len(pieces))])
    mask[stop] = utf8_prefix(head, True) and rx.fullmatch(head) is not None
    return mask
