import math
import os

import pytest
import torch

if os.environ.get("PYTEST_XDIST_WORKER"):  # n workers share the cores: no thread oversubscription
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))))

import pilm
from pilm.potentials import FunctionPotential, Regex
from pilm.testing.fake_device import register

register()  # the device checks' fake GPU, known before any test's backward pass (see register)


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


@pytest.fixture(scope="session")
def real_model():
    """The embedded SmolLM2-135M-Instruct (converted once into the user cache)."""
    return pilm.load_model()


@pytest.fixture
def fresh_tiny(tiny):
    """A tiny random Llama of its own, for tests that inject adapters (a fine-tuned policy is
    injected into the model it adapts, so the session's ``tiny`` must stay untouched)."""
    from pilm.models import HFModel
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    return HFModel(LlamaForCausalLM(tiny.hf.config).float(), tiny.tokenizer, name="tiny-llama")


@pytest.fixture(scope="session")
def tiny():
    """A tiny random Llama with the embedded model's real tokenizer (fast engine tests)."""
    from pilm.models import HFModel
    from pilm.models.registry import embedded_path
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(embedded_path())
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return HFModel(LlamaForCausalLM(config).float(), tokenizer, name="tiny-llama")
