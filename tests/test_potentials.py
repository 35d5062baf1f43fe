import math

import pytest
import torch

import pilm
from pilm.potentials import FunctionPotential, Regex, Sentiment, Sequences, Toxicity, parse_potential

from .conftest import asymmetric_potential


@pytest.fixture
def model():
    return pilm.models.TabularLM.random(4, seed=0, eos_id=3)


def seqs(model, *tokens):
    return Sequences(model, (0,), [tuple(t) for t in tokens])


@pytest.mark.parametrize(
    "potential",
    [Regex("[ab]*"), Sentiment("positive"), Sentiment("negative", prefix=False), asymmetric_potential(),
     Regex("a+") ** 0.5, FunctionPotential(len, on="tokens")],
    ids=str,
)
def test_builtins_keep_the_protocol(model, potential):
    pilm.testing.check_potential(potential, model, "a")


def test_regex_full_and_partial_match(model):
    s = seqs(model, (0, 1, 3), (0, 2), ())
    assert Regex("ab").log_phi(s).tolist() == [0.0, -math.inf, -math.inf]
    assert Regex("ab").log_prefix(seqs(model, (0,), (1,))).tolist() == [0.0, -math.inf]


def test_product_and_tempering(model):
    s = seqs(model, (0, 0), (1,))
    a = FunctionPotential(lambda t: -1.0 * len(t), on="tokens", name="a")
    b = FunctionPotential(lambda t: 0.5, on="tokens", name="b")
    assert torch.allclose((a * b).log_phi(s), torch.tensor([-1.5, -0.5]))
    assert torch.allclose((a ** 2).log_phi(s), torch.tensor([-4.0, -2.0]))
    assert (a * b * a).name == "a * b * a" and not (a * b).has_prefix
    # tempering keeps zeros at zero (0 * -inf is not NaN)
    assert ((Regex("b") ** 0.0).log_phi(s)).tolist() == [-math.inf, 0.0]


def test_sentiment_is_a_probability(model):
    pos, neg = Sentiment("positive"), Sentiment("negative")
    texts = ["I love this wonderful film", "terrible, awful, boring", ""]
    p, q = pos.probability(texts), neg.probability(texts)
    assert torch.allclose(p + q, torch.ones(3, dtype=torch.float64))
    assert p[0] > 0.9 and p[1] < 0.1 and p[2] == 0.5
    with pytest.raises(ValueError, match="positive"):
        Sentiment("happy")


def test_a_classifier_looks_ahead_with_a_power(model):
    seqs = Sequences(model, (0,), [(0, 1), (1,)])  # any texts: VADER scores them
    full, half = Sentiment("positive"), Sentiment("positive", prefix=0.5)
    assert torch.allclose(half.log_prefix(seqs), 0.5 * full.log_prefix(seqs))
    assert torch.equal(half.log_phi(seqs), full.log_phi(seqs))  # phi, hence sigma and Z, unchanged
    assert not Toxicity("toxic").has_prefix and Toxicity("toxic", prefix=True).prefix == 1.0
    for bad in (-1.0, math.inf, math.nan):
        with pytest.raises(ValueError, match="prefix must be"):
            Toxicity("toxic", prefix=bad)
    assert parse_potential("toxicity:toxic", model).has_prefix is False
    tempered = parse_potential("toxicity:toxic:2", model, lookahead=0.5)  # --lookahead on a classifier spec
    assert tempered.has_prefix and tempered.base.prefix == 0.5


def test_specs(model):
    assert isinstance(parse_potential("regex:[ab]*", model), Regex)
    assert parse_potential("sentiment:negative:3", model).name == "(sentiment(negative))**3"
    for bad in ["regex", "sentiment:", "bogus:1", "suffix:"]:
        with pytest.raises(ValueError, match="known: regex"):
            parse_potential(bad, model)


def test_json_and_grammar_specs_inline_or_from_a_file(model, tmp_path):
    schema = tmp_path / "s.json"
    schema.write_text('{"type": "boolean"}')
    assert parse_potential(f"json:{schema}", model).spec == '{"type": "boolean"}'
    assert isinstance(parse_potential('json:{"type": "integer"}', model), pilm.potentials.JsonSchema)
    assert isinstance(parse_potential('grammar:root ::= "a" | "b"', model), pilm.potentials.Grammar)
    for bad, message in [(f"json:{tmp_path / 'missing.json'}", "no file"), ("json:{oops", "invalid json"),
                         ("grammar:root ::=", "invalid grammar")]:
        with pytest.raises(ValueError, match=message):
            parse_potential(bad, model)


def test_a_product_skips_later_factors_where_phi_is_already_zero(tiny):
    """The costly factor sees only the sequences the constraint before it allows, and the
    product equals the sum of the factors' log phi (-inf where any is -inf)."""
    seen = []

    def costly(text):
        seen.append(text)
        return -0.5 * len(text)

    allowed = FunctionPotential(lambda text: 0.0 if "a" in text else -math.inf, name="has an a")
    product = allowed * FunctionPotential(costly, name="costly")
    seqs = pilm.Target(tiny, "Hi", max_new_tokens=3).sequences([tiny.encode(w) for w in ("cat", "dog", "bat")])
    out = product.log_phi(seqs)
    assert seen == ["cat", "bat"]
    assert out.tolist() == [-1.5, -math.inf, -1.5]


def test_a_target_takes_a_spec_string():
    model = pilm.models.TabularLM.random(3, seed=0, eos_id=2)
    target = pilm.Target(model, "a", "regex:[ab]*", max_new_tokens=2)
    assert isinstance(target.potential, Regex) and target.potential.pattern == "[ab]*"
    with pytest.raises(ValueError, match="unknown potential spec"):
        pilm.Target(model, "a", "telepathy:yes", max_new_tokens=2)


@pytest.mark.parametrize("value, kind", [(None, "NoneType"), (True, "bool"), ("0.5", "str"), ([0.0], "list")])
def test_a_function_potential_returning_a_non_float_names_itself(value, kind):
    model = pilm.models.TabularLM.random(3, seed=0, eos_id=2)
    target = pilm.Target(model, "a", FunctionPotential(lambda t: value, name="mine"), max_new_tokens=2)
    with pytest.raises(pilm.PotentialError, match=f"potential mine returned {kind} .* must return log phi as a float"):
        pilm.importance_sample(target, 2)


def test_factors_walk_products_and_tempering():
    a, b, c = Regex("a*"), Sentiment("positive"), FunctionPotential(lambda s: 0.0, name="c")
    assert [(f.name, e) for f, e in ((a * b ** 2.0) ** 0.5 * c).factors()] == [
        ("regex('a*')", 0.5), ("sentiment(positive)", 1.0), ("c", 1.0)]
