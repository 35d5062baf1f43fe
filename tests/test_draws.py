"""Tokens drawn by inversion (pilm.models.draws): the law, the edges, bad rows."""

import math

import pytest
import torch
from scipy import stats

from pilm.inference.particles import draw
from pilm.models.draws import categorical, uniforms


def test_the_frequencies_are_the_distributions_and_zero_mass_is_never_drawn():
    """An asymmetric distribution with zeros inside and at both ends, given unnormalised:
    200,000 draws, chi-square over the positive cells at the 0.1% level (a false alarm
    once in a thousand runs; a 2% error in any cell of mass >= 0.05 gives a statistic of
    about 40 on 4 degrees of freedom, p < 1e-7)."""
    p = torch.tensor([0.0, 0.05, 0.0, 0.5, 0.3, 0.0, 0.1, 0.05, 0.0])
    n = 200_000
    log_p = (p * 7.3).log().expand(n, -1)  # total 7.3: the draw normalises
    g = torch.Generator().manual_seed(0)
    v = categorical(log_p, uniforms([n], [g], log_p.device))
    counts = torch.bincount(v, minlength=len(p)).double()
    assert counts[p == 0].sum() == 0
    assert stats.chisquare(counts[p > 0], n * p[p > 0].double()).pvalue > 1e-3


def test_a_uniform_at_the_top_gives_the_last_token_of_positive_mass():
    log_p = torch.tensor([[0.2, 0.3, 0.5, 0.0]]).log()
    assert categorical(log_p, torch.tensor([1 - 2**-53], dtype=torch.float64)).tolist() == [2]
    assert categorical(log_p, torch.tensor([1.0], dtype=torch.float64)).tolist() == [2]  # even past U[0, 1)
    assert categorical(log_p, torch.tensor([0.0], dtype=torch.float64)).tolist() == [0]


@pytest.mark.parametrize("bad", [-math.inf, math.nan])
def test_a_row_without_positive_mass_is_a_clear_error_where_its_draw_is_read(bad):
    """Inversion draws such a row as some index in range (no device-side assertion, no host
    sync); the engine refuses the draw by its log q, naming the target and particle."""
    import pilm
    from pilm.proposals import Proposal, Proposed

    log_p = torch.log_softmax(torch.randn(3, 5), -1)
    log_p[1] = bad
    assert 0 <= int(categorical(log_p, torch.rand(3, dtype=torch.float64))[1]) < 5

    class Broken(Proposal):
        name = "broken"

        def propose(self, state, prefixes):
            log_q = state.logprobs.clone()
            log_q[3] = bad
            return Proposed(log_q, None)

    target = pilm.Target(pilm.models.TabularLM.random(5, seed=0, eos_id=4), [0], max_new_tokens=3)
    with pytest.raises(ValueError, match=r"no token of positive finite probability at \(target, particle\) \[\(1, 1\)\]"):
        pilm.smc([target, target], 2, proposal=Broken(), seed=0, progress=False)


def test_one_uniform_per_row():
    with pytest.raises(ValueError, match="one uniform per row"):
        categorical(torch.zeros(5, 3), torch.rand(1, dtype=torch.float64))
    assert uniforms([], [], torch.device("cpu")).shape == (0,)


def test_each_targets_rows_draw_with_its_own_generator_as_if_alone():
    log_p = torch.log_softmax(torch.randn(7, 11, generator=torch.Generator().manual_seed(1)), -1)
    groups = torch.tensor([0, 0, 0, 2, 2, 2, 2])
    gens = [torch.Generator().manual_seed(s) for s in (10, 11, 12)]
    together = draw(log_p, groups, gens)
    alone = torch.cat([draw(log_p[:3], groups[:3], [torch.Generator().manual_seed(10)]),
                       draw(log_p[3:], groups[3:], [torch.Generator().manual_seed(12)])])
    assert torch.equal(together, alone)


def test_rows_drawn_in_blocks_are_the_rows_drawn_at_once(monkeypatch):
    """Blocks bound the float64 sums in memory; they change no draw."""
    import pilm.models.draws as draws

    log_p = torch.log_softmax(torch.randn(10, 7, generator=torch.Generator().manual_seed(2)), -1)
    u = torch.rand(10, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    whole = categorical(log_p, u)
    monkeypatch.setattr(draws, "_block", lambda device: 21)  # 3 rows a block
    assert torch.equal(categorical(log_p, u), whole)
