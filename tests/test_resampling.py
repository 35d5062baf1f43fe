import math

import pytest
import torch

from pilm.inference.resampling import SCHEMES, _invert_cdf, ess, get_scheme


@pytest.mark.parametrize("name", SCHEMES)
def test_offspring_counts_have_mean_n_times_weight(name):
    scheme = SCHEMES[name]
    log_w = torch.tensor([0.0, -1.0, -math.inf, 2.0, -0.3, -5.0], dtype=torch.float32)
    wbar = torch.softmax(log_w.double(), 0)
    n, reps = 10, 4000
    g = torch.Generator().manual_seed(0)
    counts = torch.stack([torch.bincount(scheme(log_w, n, g), minlength=6) for _ in range(reps)]).double()
    assert (counts.sum(1) == n).all()
    assert counts[:, 2].sum() == 0, "a zero-weight particle was resampled"
    mean, se = counts.mean(0), counts.std(0) / math.sqrt(reps)
    # 4 SE per particle (6 particles): a false alarm on correct code has probability < 4e-4;
    # se=0 cells (deterministic counts) must match to float precision.
    assert (torch.abs(mean - n * wbar) <= 4 * se + 1e-9).all(), (mean, n * wbar)


@pytest.mark.parametrize("name", SCHEMES)
def test_all_weight_on_one_particle(name):
    log_w = torch.full((50,), -math.inf)
    log_w[17] = 0.0
    idx = SCHEMES[name](log_w, 50, torch.Generator().manual_seed(1))
    assert (idx == 17).all()


def test_a_cdf_whose_float32_sum_ends_below_one_keeps_indices_in_range():
    """Weights whose float32 total ends below 1, by construction on every machine: each is a
    multiple of 2^-24 and every partial sum is at most 1 - 2^-24, so every sum in any order is
    exact, and the CDF ends at 1 - 2^-24. A uniform above that end must still map to the last
    particle, not past it."""
    w = torch.tensor([0.25, 0.25, 0.25, 0.25 - 2**-24], dtype=torch.float32)
    end = 1 - 2**-24
    assert float(torch.cumsum(w, 0)[-1]) == end  # exact arithmetic: holds on every CPU
    for dtype in (torch.float32, torch.float64):
        u = torch.tensor([0.0, 0.5, end, 1 - 2**-26, 1 - 1e-9], dtype=dtype)
        assert _invert_cdf(w.clone(), u).tolist() == [0, 2, 3, 3, 3]


@pytest.mark.parametrize("name", SCHEMES)
def test_float32_log_weights_give_n_indices_in_range(name):
    log_w = torch.randn(10_000, generator=torch.Generator().manual_seed(2)).float()
    idx = SCHEMES[name](log_w, 10_000, torch.Generator().manual_seed(3))
    assert idx.min() >= 0 and idx.max() < 10_000 and len(idx) == 10_000


def test_ess_bounds_and_unknown_scheme():
    assert ess(torch.zeros(8)) == pytest.approx(8)
    assert ess(torch.tensor([0.0, -math.inf, -math.inf])) == pytest.approx(1)
    with pytest.raises(ValueError, match="known: multinomial"):
        get_scheme("bogus")
