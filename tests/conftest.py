import importlib.util
import math
import os
from collections import Counter

import pytest
import torch

if os.environ.get("PYTEST_XDIST_WORKER"):  # n workers share the cores: no thread oversubscription
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))))

import pilm
from pilm.potentials import FunctionPotential, Regex
from pilm.testing.fake_device import register

register()  # the device checks' fake GPU, known before any test's backward pass (see register)

# The serving engines' tests run where their engine is installed (make test-engines builds .venv-vllm);
# make test never imports one.
collect_ignore = [] if importlib.util.find_spec("vllm") else ["engines"]


def asymmetric_potential():
    """A potential with no symmetry a sign error could hide behind: a hard constraint
    (no letter 'c', prefix-aware, so particles die mid-way) times a soft score that favours
    'a' over 'b' and longer completions, with its own prefix score."""

    def soft(tokens):
        return 0.8 * tokens.count(0) - 0.5 * tokens.count(1) + 0.1 * len(tokens)

    return Regex("[abd]*") * FunctionPotential(soft, on="tokens", prefix_fn=lambda t: 0.5 * soft(t), name="soft")


@pytest.fixture
def tabular_target():
    model = pilm.models.TabularLM.random(4, seed=3, eos_id=3)
    return pilm.Target(model, prompt="a", potential=asymmetric_potential(), max_new_tokens=4)


def mean_and_se(values):
    x = torch.tensor(values, dtype=torch.float64)
    return float(x.mean()), float(x.std() / math.sqrt(len(x)))


def sigma_cells_chi2(target, runs) -> tuple[float, int]:
    """E[Z-hat · w_k 1{s_k = s}] = p0(s) phi(s) for every sequence s: each cell's mean over
    the independent ``runs`` against the enumerated value, summed as a chi-square from the
    runs' own standard errors over the cells above 1e-3 (those few runs saw pooled into one).
    Returns (chi2, cells). A sample outside sigma's support (not enumerated, or with p0 phi = 0)
    with weight > 0 fails at once: no cell would see it."""
    e = pilm.exact.enumerate_target(target)
    gamma = dict(zip(e.tokens, torch.exp(e.log_sigma_unnormalized).tolist(), strict=True))
    cells: dict = {s: [] for s in gamma}
    for res in runs:
        mass: Counter = Counter()
        for w, toks in zip(res.weights, res.tokens, strict=True):
            mass[tuple(toks)] += w
        leaked = {s: m for s, m in mass.items() if m > 0 and gamma.get(s, 0.0) == 0.0}
        assert not leaked, f"weight on sequences outside sigma's support: {list(leaked.items())[:3]}"
        for s in cells:
            cells[s].append(math.exp(res.log_z) * mass[s])
    # A cell that few runs saw has a heavy-tailed mean whose own SE is no guide (one hit makes
    # mean = SE, so z = 1 - gamma / mean, -8.6 on one seed set of test_smc_exact's target): cells
    # seen in fewer than 10 runs are pooled into one, so every sequence of sigma's support is
    # still tested (a sampler that never reaches a cell leaves the pool short).
    chi2, dof = 0.0, 0
    n_runs = len(next(iter(cells.values())))
    pooled, pooled_gamma = torch.zeros(n_runs, dtype=torch.float64), 0.0
    for s, values in cells.items():
        if gamma[s] <= 1e-3:
            continue
        if sum(v > 0 for v in values) < 10:
            pooled += torch.tensor(values, dtype=torch.float64)
            pooled_gamma += gamma[s]
            continue
        mean, se = mean_and_se(values)
        if se > 0:
            chi2 += ((mean - gamma[s]) / se) ** 2
            dof += 1
    if pooled_gamma > 0:
        mean, se = mean_and_se(pooled.tolist())
        assert se > 0, f"no run reached the cells of sigma's rarely seen mass {pooled_gamma:.4f} (of {n_runs} runs)"
        chi2 += ((mean - pooled_gamma) / se) ** 2
        dof += 1
    return chi2, dof


@pytest.fixture(scope="session")
def real_model():
    """The embedded SmolLM2-135M-Instruct (converted once into the user cache)."""
    return pilm.load_model()


@pytest.fixture
def fresh_tiny(tiny):
    """A tiny random Llama of its own, for tests that inject adapters (a fine-tuned policy is
    injected into the model it adapts, so the session's ``tiny`` must stay untouched)."""
    from transformers import LlamaForCausalLM

    from pilm.models import HFModel

    torch.manual_seed(0)
    return HFModel(LlamaForCausalLM(tiny.hf.config).float(), tiny.tokenizer, name="tiny-llama")


@pytest.fixture(scope="session")
def tiny():
    """A tiny random Llama with the embedded model's real tokenizer (fast engine tests)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from pilm.models import HFModel
    from pilm.models.registry import embedded_path

    tokenizer = AutoTokenizer.from_pretrained(embedded_path())
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return HFModel(LlamaForCausalLM(config).float(), tokenizer, name="tiny-llama")
