"""Conformance checks for the protocols users implement: potentials, language models,
proposals, twists, process rewards and selection rules. Each raises ``AssertionError`` naming
the broken promise."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ..models.base import LanguageModel
from ..potentials.base import Potential, Sequences, evaluate
from ..target import Target


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
    ``advance(hold=...)`` keeping held rows as they were. Check a model computing in float32:
    a resumed row runs in a batch of another shape than the row it must equal (a backend may
    leave held rows out of the forward), and 16-bit kernels round by batch shape (SmolLM2 in
    bfloat16: a total variation of 0.056 between a 1-row and a 2-row step, 4e-7 in float32)."""
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
    # holding (step-level samplers): a held row appends nothing and keeps its state (a state
    # that advance consumed may be released, so what is compared later is copied first)
    before_hold = after.logprobs.clone()
    held = model.advance(after, torch.tensor([1, 1, 1]), hold=torch.tensor([False, True, False]))
    assert torch.allclose(held.logprobs[1], before_hold[1], atol=1e-5), "a held row must keep its state"
    held_rows = held.logprobs.clone()
    resumed = model.advance(held, torch.tensor([1, 1, 0]), hold=torch.tensor([True, False, True]))
    assert torch.allclose(resumed.logprobs[1], held_rows[2], atol=1e-4), (
        "a held row that resumes must continue as if it had never waited")


def check_proposal(proposal, target: Target, n: int = 2, steps: int = 3) -> None:
    """Raise ``AssertionError`` unless ``proposal`` (a ``pilm.proposals.Proposal``) keeps the
    protocol on ``target``: log q of shape (rows, V), no NaN, normalised (each row sums to 1);
    log psi, if given, of the same shape with no NaN or +inf; ``reindex`` moving its rows with
    the model's, and ``advance(hold=...)`` leaving a held row as it was (in lock-step with the
    model, as the engine steps it)."""
    model = target.model
    proposal.begin([target], n)
    state = model.start(target.prompt_ids, n)
    prefixes: list[tuple[int, ...]] = [()] * n
    for _ in range(min(steps, target.max_new_tokens - 2)):  # room for the hold step, before the horizon
        tokens = _next(_proposed(proposal, state, prefixes), target)
        proposal.advance(tokens.to(model.device))
        state = model.advance(state, tokens.to(model.device))
        prefixes = [p + (int(t),) for p, t in zip(prefixes, tokens.tolist(), strict=True)]
    before = _proposed(proposal, state, prefixes)
    idx = torch.tensor([1 % n, 0, 0])
    proposal.reindex(idx.to(model.device))
    state = model.reindex(state, idx.to(model.device))
    prefixes = [prefixes[i] for i in idx.tolist()]
    after = _proposed(proposal, state, prefixes)
    for k, j in enumerate(idx.tolist()):
        assert torch.allclose(after[k], before[j], atol=1e-5), f"after reindex, row {k} must propose as row {j} did"
    tokens, hold = _next(after, target), torch.tensor([False, True, False])
    proposal.advance(tokens.to(model.device), hold.to(model.device))
    state = model.advance(state, tokens.to(model.device), hold=hold.to(model.device))
    prefixes = [p if h else p + (int(t),) for p, t, h in zip(prefixes, tokens.tolist(), hold.tolist(), strict=True)]
    held = _proposed(proposal, state, prefixes)
    assert torch.allclose(held[1], after[1], atol=1e-5), "a held row must keep its proposal"


def _next(log_q: torch.Tensor, target: Target) -> torch.Tensor:
    """Each row's likeliest token under q that does not end the completion."""
    if target.stop_token_id is not None:
        log_q = log_q.clone()
        log_q[:, target.stop_token_id] = -math.inf
    return log_q.argmax(1)


def _proposed(proposal, state, prefixes) -> torch.Tensor:
    out = proposal.propose(state, prefixes if proposal.needs_prefixes else None)
    log_q = out.log_q.float().cpu()
    assert log_q.shape == state.logprobs.shape, f"log q has shape {tuple(log_q.shape)}, not {tuple(state.logprobs.shape)}"
    assert not torch.isnan(log_q).any(), "log q has NaN"
    assert torch.allclose(log_q.exp().sum(-1), torch.ones(len(log_q)), atol=1e-3), "q must sum to 1 in every row"
    if out.log_psi is not None:
        assert out.log_psi.shape == log_q.shape, "log psi must have log q's shape"
        assert not (torch.isnan(out.log_psi) | torch.isposinf(out.log_psi)).any(), "log psi has NaN or +inf"
    return log_q


def check_twist(twist, target: Target, n: int = 2, steps: int = 3) -> None:
    """Raise ``AssertionError`` unless ``twist`` (a ``pilm.twists.TwistFunction``) keeps the
    protocol: log psi of every next token, (rows, V), no NaN or +inf, each row the same alone
    as in a batch, and, stepped as the twist-induced proposal, ``check_proposal``."""
    from ..proposals import TwistProposal

    model = target.model
    state = model.start(target.prompt_ids, n)
    condition = twist.condition_for(target)
    condition = None if condition is None else condition.expand(n, -1)
    if twist.stateful:
        twist.begin([target], n)
    prefixes = [()] * n if twist.needs_prefixes else None
    with torch.no_grad():
        batch = twist.log_psi(prefixes, state.hidden, condition).float().cpu()
        alone = twist.log_psi(prefixes[:1] if prefixes else None, state.hidden[:1],
                              None if condition is None else condition[:1]).float().cpu() if not twist.stateful else batch[:1]
    assert batch.shape == (n, model.vocab_size), f"log psi has shape {tuple(batch.shape)}, not {(n, model.vocab_size)}"
    assert not (torch.isnan(batch) | torch.isposinf(batch)).any(), "log psi has NaN or +inf"
    rounding = torch.finfo(getattr(model, "dtype", torch.float32)).eps * float(batch[0].abs().max())  # bf16: 2^-8
    assert torch.allclose(alone[0], batch[0], atol=1e-4 + 4 * rounding), "a row's log psi must not depend on the other rows"
    check_proposal(TwistProposal(twist), target, n, steps)


def check_prm(prm, target: Target, chains: Sequence[Sequence[int]]) -> None:
    """Raise ``AssertionError`` unless ``prm`` (a ``pilm.prm.ProcessReward``) scores the
    ``chains`` (token ids of completions, cut into steps by the target's ``Steps``) with one
    probability each, in [0, 1], no NaN, each row the same alone as in the batch."""
    from ..prm import StepBatch
    from ..steps import Steps

    model, cut = target.model, target.steps or Steps()
    rows = [list(c) for c in chains]
    hidden = last = None
    if prm.reads_hidden:  # the state each chain's last token was drawn from
        states = [_state_before_last(model, target.prompt_ids, c) for c in rows]
        hidden = torch.cat([s.hidden for s in states]).float()
        last = torch.tensor([c[-1] for c in rows])

    def batch(ix):
        return StepBatch(questions=[target.question] * len(ix), prompts=[tuple(target.prompt_ids)] * len(ix),
                         steps=[_steps(model, cut, rows[i]) for i in ix], tokens=[tuple(rows[i]) for i in ix],
                         hidden=None if hidden is None else hidden[ix], last=None if last is None else last[ix])

    prm.begin()
    scores = torch.as_tensor(prm.score(batch(list(range(len(rows)))))).double().reshape(-1)
    assert scores.shape == (len(rows),), f"{len(scores)} scores for {len(rows)} rows"
    assert not torch.isnan(scores).any() and bool(((scores >= 0) & (scores <= 1)).all()), "scores must be in [0, 1]"
    for i in range(len(rows)):
        prm.begin()  # alone: nothing the batch's call left (a judge's prompt cache) is reused
        one = float(torch.as_tensor(prm.score(batch([i]))).double().reshape(-1)[0])
        assert abs(one - float(scores[i])) < 1e-4, f"row {i} scores {one} alone and {float(scores[i])} in the batch"


def _state_before_last(model, prompt_ids, tokens):
    state = model.start(prompt_ids, 1)
    for t in tokens[:-1]:
        state = model.advance(state, torch.tensor([t], device=model.device))
    return state


def _steps(model, cut, tokens) -> list[str]:
    steps, text, ids = [], "", []
    for t in tokens:
        ids.append(t)
        text += model.decode([t])
        if cut.ends(text, t):
            steps.append(model.decode(ids))
            text, ids = "", []
    return steps + ([model.decode(ids)] if ids else [])


def check_rule(rule, n: int = 8, seed: int = 0) -> None:
    """Raise ``AssertionError`` unless ``rule`` (a ``pilm.inference.rules.Rule``) keeps the
    protocol on random views of ``n`` rows: a ``Decision`` with (n,) weights, log psi and
    alive; parents, if any, (n,) indices of the rows, never one at weight 0 under importance
    weights; the same decision from the same generator seed; and under a reference
    (conditional SMC) row 0 its own parent."""
    from ..inference.rules import View
    from ..models.device import seeded_generator

    g = seeded_generator(seed, "cpu")  # the views are CPU tensors
    for reference in (False, True):
        scores = torch.rand(n, generator=g, dtype=torch.float64) * 0.9 + 0.05
        log_w = torch.randn(n, generator=g, dtype=torch.float64)
        log_w[-1] = -torch.inf  # a dead row
        tokens = torch.randint(0, 5, (n, 3), generator=g)
        args = (log_w, scores.log() - 0.1, scores.log(), scores, torch.ones(n, dtype=torch.bool),
                torch.zeros(n, dtype=torch.bool), torch.ones(n, dtype=torch.bool), True, reference)
        a = rule.decide(View(*args, seeded_generator(seed, "cpu"), tokens, torch.full((n,), 3)))
        b = rule.decide(View(*args, seeded_generator(seed, "cpu"), tokens, torch.full((n,), 3)))
        for name in ("log_w", "log_psi", "alive"):
            assert getattr(a, name).shape == (n,), f"Decision.{name} must have one entry per row"
        assert a.alive.dtype == torch.bool, "Decision.alive must be a bool tensor"
        assert not torch.isnan(a.log_w).any() and not math.isnan(a.log_z), "a decision has NaN weights or log Z"
        assert (a.parents is None) == (b.parents is None) and (a.parents is None or torch.equal(a.parents, b.parents)), \
            "the same generator seed must give the same decision"
        if a.parents is not None:
            assert a.parents.shape == (n,) and a.parents.dtype == torch.long, "parents must be (n,) long"
            assert bool(((a.parents >= 0) & (a.parents < n)).all()), "parents must index the rows"
            if rule.importance:  # carried importance weights: a row at weight 0 is gone
                assert not (a.parents == n - 1).any(), "a row at weight 0 cannot be a parent"
            if reference and rule.weighs:
                assert int(a.parents[0]) == 0, "under a reference, row 0 must keep itself"


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
