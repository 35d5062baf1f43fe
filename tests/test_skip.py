"""The skip-model twist for infilling: its prefix score keeps Z-hat exact-unbiased, and its
maximum-likelihood trainer fits what it scores.

Exact part: a random 5-token table (EOS = 4), prompt "a", middles of 3 tokens, the ending "ba"
(phi = p0("ba" | x, s)), and as the skip model *another* random table: any q is a valid twist, so
Z-hat must stay unbiased and the samples must follow sigma whatever q says (asymmetric: the
skip model's scores have nothing to do with phi).
"""

import math

import pytest
import torch
from scipy import stats

import pilm
from pilm.models import TabularLM
from pilm.potentials import SkipLookahead, SuffixLikelihood

from .conftest import mean_and_se, sigma_cells_chi2

FILLER = 3


@pytest.fixture
def tables():
    # concentration 5: the skip model's scores vary less than a Dirichlet(1) table's, so Z-hat's
    # spread stays testable (with Dirichlet(1), 2,400 runs of 16 particles left se = 0.033)
    return TabularLM.random(5, seed=11, eos_id=4), TabularLM.random(5, seed=5, eos_id=4, concentration=5.0)


def test_its_prefix_score_is_the_skip_models_likelihood_of_the_ending_after_fillers(tables):
    model, skip = tables
    ahead = SkipLookahead(SuffixLikelihood(model, "ba"), skip, horizon=3, filler=FILLER)
    target = pilm.Target(model, "a", ahead, max_new_tokens=3)
    seqs = target.sequences([(0,), (2, 1)])
    ending = model.encode("ba")
    ctx = model.context(target.prompt_ids)
    want = [float(skip.score([ctx + list(s) + [FILLER] * (3 - len(s)) + ending], [len(ctx) + 3])[0])
            for s in seqs.tokens]
    assert ahead.log_prefix(seqs).tolist() == pytest.approx(want, abs=1e-6)
    assert torch.equal(ahead.log_phi(seqs), SuffixLikelihood(model, "ba").log_phi(seqs))
    assert [f.suffix for f, _ in ahead.factors()] == ["ba"] and "skip-model look-ahead" in ahead.name


def test_z_hat_is_unbiased_and_samples_follow_sigma_under_an_unrelated_skip_model(tables):
    """1,200 runs of 16 particles resampling every step: 4 SE (a false alarm 6e-5), with se < 0.025
    so a 10% bias lies beyond it; then the cells' chi-square."""
    model, skip = tables
    plain = pilm.Target(model, "a", SuffixLikelihood(model, "ba"), max_new_tokens=3)
    target = pilm.Target(model, "a", SkipLookahead(SuffixLikelihood(model, "ba"), skip, 3, FILLER), max_new_tokens=3)
    z = math.exp(pilm.exact.log_z(plain))
    runs = pilm.smc([target] * 1200, 16, seed=0, ess_threshold=1.0, progress=False, on_extinction="return")
    mean, se = mean_and_se([math.exp(r.log_z) / z for r in runs])
    assert se < 0.025 and abs(mean - 1) < 4 * se, f"mean Zhat/Z = {mean:.4f} ± {se:.4f}"
    chi2, dof = sigma_cells_chi2(target, runs)
    assert dof >= 5 and stats.chi2.sf(chi2, dof) > 1e-3, f"chi2={chi2:.1f} on {dof} cells"  # cells of p0 phi > 1e-3


def test_bad_skip_lookaheads_are_refused(tables):
    model, skip = tables
    with pytest.raises(TypeError, match="looks ahead for a SuffixLikelihood"):
        SkipLookahead(pilm.potentials.Regex("a*"), skip, 3, FILLER)
    with pytest.raises(ValueError, match="horizon must be a positive integer"):
        SkipLookahead(SuffixLikelihood(model, "ba"), skip, 0, FILLER)
    with pytest.raises(ValueError, match="must share its tokenizer"):
        SkipLookahead(SuffixLikelihood(model, "ba"), TabularLM.random(6, seed=1, eos_id=5), 3, FILLER)


def test_the_trainer_scores_what_the_lookahead_scores_and_its_gradient_fits_the_adapter(fresh_tiny):
    """The teacher-forced log q the loss uses equals the skip model's own scoring of the same rows
    (fillers placed alike; a short ending padded), and its gradient reaches the adapter: 30 Adam
    steps at lr 1e-2 on those rows raise their log q by more than 0.5 nats (measured: about 1;
    the tiny random model's joint itself is near uniform, so fresh draws would teach nothing)."""
    trained = pilm.train_skip_model(fresh_tiny, "Once upon", max_new_tokens=4, suffix_tokens=2, steps=2,
                                    batch_size=8, progress=False)
    skip, history = trained.model, trained.history
    assert len(history) == 2 and all(h["examples"] <= 8 * 4 and h["loss"] > 0 for h in history)
    prompt = fresh_tiny.encode_prompt("Once upon")
    prefixes, endings = [[5], [7, 9, 11], []], [[20, 21], [22, 23], [24]]
    with torch.no_grad():
        before = skip.log_likelihood(prompt, prefixes, endings)
    ctx = fresh_tiny.context(prompt)
    rows = [ctx + p + [skip.filler] * (4 - len(p)) + e for p, e in zip(prefixes, endings)]
    assert before.tolist() == pytest.approx(skip.lm.score(rows, [len(ctx) + 4] * 3).tolist(), abs=1e-4)
    optimizer = torch.optim.AdamW(list(skip.lm.trainable.values()), lr=1e-2)
    for _ in range(30):
        loss = -skip.log_likelihood(prompt, prefixes, endings).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        after = skip.log_likelihood(prompt, prefixes, endings)
    assert float(after.mean() - before.mean()) > 0.5, (before, after)


def test_a_resumed_training_run_continues_where_it_stopped(fresh_tiny, tmp_path):
    kw = dict(max_new_tokens=3, suffix_tokens=2, batch_size=4, lr=1e-2, progress=False)
    whole = pilm.train_skip_model(fresh_tiny, "Once", steps=4, checkpoint_dir=str(tmp_path / "a"), **kw).history
    pilm.train_skip_model(fresh_tiny, "Once", steps=2, checkpoint_dir=str(tmp_path / "b"), **kw)
    resumed = pilm.train_skip_model(fresh_tiny, "Once", steps=4, checkpoint_dir=str(tmp_path / "b"), **kw).history
    assert [h["loss"] for h in resumed] == pytest.approx([h["loss"] for h in whole], abs=1e-5)


@pytest.mark.parametrize("kwargs, error, message", [
    ({"steps": -1}, ValueError, "steps must be an integer >= 0"),
    ({"batch_size": 0}, ValueError, "batch_size must be an integer >= 1"),
    ({"max_new_tokens": 1}, ValueError, "max_new_tokens must be an integer >= 2"),
    ({"filler": ""}, ValueError, "filler '' encodes to no token"),
])
def test_bad_training_arguments_are_refused(tiny, kwargs, error, message):
    args = {"max_new_tokens": 3, "suffix_tokens": 2, "steps": 1, **kwargs}
    with pytest.raises(error, match=message):
        pilm.train_skip_model(tiny, "Once", progress=False, **args)


def test_only_a_transformers_model_is_adapted(tables):
    with pytest.raises(TypeError, match="adapts a transformers model"):
        pilm.train_skip_model(tables[0], "a", max_new_tokens=3, suffix_tokens=2, steps=1)


def test_the_trainer_pairs_each_prefix_with_its_own_ending_and_leaves_out_the_eos(fresh_tiny, monkeypatch):
    """Given joint draws, one step scores the prefixes of 1 .. |m| - 1 tokens of each middle (not
    the empty one, not one holding its EOS), each with its own ending."""
    from pilm.learning import skip_trainer

    eos = fresh_tiny.eos_token_id
    draws = [([5, 6, 7], [30, 31]), ([8, eos], [32, 33])]  # a whole middle of 3; one that ended at its 2nd token
    monkeypatch.setattr(skip_trainer, "joint_samples", lambda *a, **k: draws)
    seen = []
    real = skip_trainer.SkipModel.log_likelihood

    def spy(self, prompt, prefixes, endings):
        seen.append((list(map(list, prefixes)), list(map(list, endings))))
        return real(self, prompt, prefixes, endings)

    monkeypatch.setattr(skip_trainer.SkipModel, "log_likelihood", spy)
    history = pilm.train_skip_model(fresh_tiny, "Once", max_new_tokens=3, suffix_tokens=2, steps=1, progress=False).history
    assert seen == [([[5], [5, 6], [8]], [[30, 31], [30, 31], [32, 33]])]
    assert history[0]["examples"] == 3 and history[0]["lm_tokens"] == 3 + 2 + 2 + 2


def test_training_leaves_the_base_model_as_it_was(fresh_tiny):
    """The adapter shares the model's weights: p0's scores after training equal those before."""
    rows, starts = [fresh_tiny.encode("Once upon a time"), fresh_tiny.encode("The dog")], [1, 1]
    before = fresh_tiny.score(rows, starts)
    pilm.train_skip_model(fresh_tiny, "Once", max_new_tokens=3, suffix_tokens=2, steps=3, lr=1e-2, progress=False)
    assert torch.equal(fresh_tiny.score(rows, starts), before)


def test_the_skip_model_looks_ahead_only_for_the_target_it_was_trained_for(fresh_tiny):
    from pilm.tasks.infilling import infilling

    skip = pilm.train_skip_model(fresh_tiny, "Once", max_new_tokens=3, suffix_tokens=2, steps=0, progress=False).model
    target = infilling(fresh_tiny, prompt="Once", suffix=" upon", max_new_tokens=3)
    twisted = skip.lookahead(target)
    assert isinstance(twisted.potential, SkipLookahead) and twisted.potential.suffix is target.potential
    with pytest.raises(ValueError, match="trained for middles of 3 tokens after its own prompt; this target has 4"):
        skip.lookahead(infilling(fresh_tiny, prompt="Once", suffix=" upon", max_new_tokens=4))
    with pytest.raises(ValueError, match="trained for middles of 3 tokens"):
        skip.lookahead(infilling(fresh_tiny, prompt="Twice", suffix=" upon", max_new_tokens=3))
    with pytest.raises(ValueError, match="looks ahead for an infilling target"):
        skip.lookahead(pilm.Target(fresh_tiny, "Once", pilm.potentials.Regex("a*"), max_new_tokens=3))


def test_a_saved_skip_model_loads_and_scores_as_it_did(fresh_tiny, tmp_path):
    from pilm.learning import SkipModel
    from pilm.tasks.infilling import infilling

    skip = pilm.train_skip_model(fresh_tiny, "Once", max_new_tokens=3, suffix_tokens=2, steps=2, lr=1e-2,
                                 progress=False).model
    skip.save_pretrained(tmp_path / "skip")
    again = SkipModel.from_pretrained(tmp_path / "skip", fresh_tiny)
    target = infilling(fresh_tiny, prompt="Once", suffix=" upon", max_new_tokens=3)
    seqs = target.sequences([[5], [6, 7]])
    assert torch.equal(again.lookahead(target).potential.log_prefix(seqs), skip.lookahead(target).potential.log_prefix(seqs))
    assert (again.horizon, again.filler, again.prompt_ids) == (skip.horizon, skip.filler, skip.prompt_ids)
    with pytest.raises(FileNotFoundError, match="holds no skip model"):
        SkipModel.from_pretrained(tmp_path, fresh_tiny)
