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
    """10k float32 weights summed in float32 end below 1; a uniform above that end must
    still map to the last particle, not past it."""
    w = torch.softmax(torch.randn(10_000, generator=torch.Generator().manual_seed(3)), 0)
    end = float(torch.cumsum(w, 0)[-1])
    assert w.dtype == torch.float32 and end < 1.0  # the case under test really occurs
    u = torch.tensor([0.0, 0.5, end, (end + 1) / 2, 1.0 - 1e-9], dtype=torch.float32)
    idx = _invert_cdf(w, u)
    assert idx.min() >= 0 and idx.max() == 9_999 and (idx[2:] == 9_999).all()


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
