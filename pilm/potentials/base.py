"""The potential protocol: log phi of completed sequences, optionally a prefix score.

A potential sees a batch of completions of one prompt (``Sequences``) and returns
log phi(s) >= -inf for each, float32. It may also score incomplete prefixes: that score
log psi_t(s_{1:t}) is an *intermediate* potential. SMC then targets
pi_t ∝ p0(s_{1:t}) psi_t(s_{1:t}) at step t, which changes where resampling puts
particles but not the final target sigma ∝ p0 phi nor the unbiasedness of Z-hat, provided
psi_t(s_{1:t}) = 0 only when phi = 0 for every completion of s_{1:t}.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property

import torch
from torch import Tensor

from ..errors import PotentialError
from ..models.base import LanguageModel


@dataclass(frozen=True)
class Sequences:
    """Completions (or prefixes) of one prompt: token ids, and texts decoded on demand.

    A completion that ended at EOS keeps the EOS id in ``tokens``; its text does not.
    """

    model: LanguageModel
    prompt: tuple[int, ...]
    tokens: list[tuple[int, ...]]

    def __len__(self) -> int:
        return len(self.tokens)

    @cached_property
    def texts(self) -> list[str]:
        eos = self.model.eos_token_id
        return [self.model.decode(t[:-1] if t and t[-1] == eos else t) for t in self.tokens]

    @cached_property
    def prompt_text(self) -> str:
        return self.model.decode(self.prompt)

    def subset(self, rows: list[int]) -> Sequences:
        return Sequences(self.model, self.prompt, [self.tokens[i] for i in rows])


class Potential(ABC):
    """phi >= 0 over completions, in log space. Subclasses implement ``log_phi``; prefix-aware
    ones also set ``has_prefix = True`` and implement ``log_prefix``.

    ``a * b`` is the product potential (log phi_a + log phi_b); ``a ** beta`` tempers it.
    """

    has_prefix: bool = False
    costly_prefix: bool = False  # its prefix score runs a model: no check scores every token of the vocabulary with it

    @property
    def name(self) -> str:
        return type(self).__name__.lower()

    @abstractmethod
    def log_phi(self, seqs: Sequences) -> Tensor:
        """log phi(s) of each completed sequence, shape (n,), float32, -inf allowed."""

    def log_prefix(self, seqs: Sequences) -> Tensor:
        """log psi(s_{1:t}) of each incomplete prefix (only called when ``has_prefix``)."""
        raise NotImplementedError(f"{self.name} has no prefix score")

    def __call__(self, seqs: Sequences) -> Tensor:
        return self.log_phi(seqs)

    def allowed_next(self, seqs: Sequences, stop: int | None = None) -> Tensor | None:
        """Token masks for the masked proposal: (n, V) bool on the model's device, True where appending token v to
        prefix i keeps phi > 0 possible for some completion, and True at ``stop`` only where
        prefix i itself has phi > 0. ``None``: this potential constrains no token (the
        default). A mask may allow more than it must (then the weights correct it), never
        less."""
        return None

    def min_new_tokens(self, model, horizon: int) -> float:
        """A lower bound on the new tokens of ``model`` any completion with phi > 0 needs, as far
        as it matters for ``horizon`` (0: no bound known, the default). A target whose bound
        passes its horizon is impossible, and is refused before anything is sampled."""
        return 0

    def factors(self) -> Iterator[tuple[Potential, float]]:
        """The leaves of this potential as (factor, exponent) pairs: phi = prod_i phi_i^e_i,
        through products and tempering. The one walk over a potential's tree that code
        looking for a kind of factor (a suffix likelihood, the model's own likelihood) uses."""
        yield self, 1.0

    def __mul__(self, other: Potential) -> Potential:
        if not isinstance(other, Potential):
            return NotImplemented
        return Product(self, other)

    def __pow__(self, beta: float) -> Potential:
        return Tempered(self, float(beta))

    def __repr__(self) -> str:
        return self.name


class Product(Potential):
    """phi(s) = prod_i phi_i(s); the prefix score multiplies those parts that have one.

    Parts are evaluated in order, each only on the sequences the earlier ones left with
    phi > 0: put cheap constraints before costly scorers (a language model, a classifier)."""

    parts: tuple[Potential, ...]

    def __init__(self, *parts: Potential):
        flat: list[Potential] = []
        for p in parts:
            flat.extend(p.parts if isinstance(p, Product) else [p])
        self.parts = tuple(flat)
        self.has_prefix = any(p.has_prefix for p in self.parts)
        self.costly_prefix = any(p.costly_prefix for p in self.parts)

    @property
    def name(self) -> str:
        return " * ".join(p.name for p in self.parts)

    def factors(self) -> Iterator[tuple[Potential, float]]:
        for p in self.parts:
            yield from p.factors()

    def log_phi(self, seqs: Sequences) -> Tensor:
        return self._sum(seqs, list(self.parts), final=True)

    def allowed_next(self, seqs: Sequences, stop: int | None = None) -> Tensor | None:
        masks = [m for m in (p.allowed_next(seqs, stop) for p in self.parts) if m is not None]
        return None if not masks else torch.stack(masks).all(0)

    def log_prefix(self, seqs: Sequences) -> Tensor:
        return self._sum(seqs, [p for p in self.parts if p.has_prefix], final=False)

    @staticmethod
    def _sum(seqs: Sequences, parts: list[Potential], *, final: bool) -> Tensor:
        out = torch.zeros(len(seqs))
        alive = list(range(len(seqs)))
        for p in parts:
            if not alive:
                break
            sub = seqs if len(alive) == len(seqs) else seqs.subset(alive)
            out[alive] += evaluate(p, sub, final=final)
            alive = [i for i in alive if out[i] > -torch.inf]
        return out


class Tempered(Potential):
    """phi(s)^beta (and psi^beta on prefixes). beta = 0 gives phi = 1 only where phi > 0."""

    def __init__(self, base: Potential, beta: float):
        if not beta >= 0:
            raise ValueError(f"tempering exponent must be >= 0, got {beta}")
        self.base, self.beta = base, beta
        self.has_prefix, self.costly_prefix = base.has_prefix, base.costly_prefix

    @property
    def name(self) -> str:
        return f"({self.base.name})**{self.beta:g}"

    def _temper(self, log_values: Tensor) -> Tensor:
        # 0 * -inf must stay -inf (support is kept), not become NaN.
        return torch.where(torch.isneginf(log_values), log_values, self.beta * log_values)

    def factors(self) -> Iterator[tuple[Potential, float]]:
        for f, e in self.base.factors():
            yield f, e * self.beta

    def log_phi(self, seqs: Sequences) -> Tensor:
        return self._temper(evaluate(self.base, seqs, final=True))

    def allowed_next(self, seqs: Sequences, stop: int | None = None) -> Tensor | None:
        return self.base.allowed_next(seqs, stop)  # tempering keeps the support

    def log_prefix(self, seqs: Sequences) -> Tensor:
        return self._temper(evaluate(self.base, seqs, final=False))


def evaluate(potential: Potential, seqs: Sequences, *, final: bool) -> Tensor:
    """``potential.log_phi`` (or ``log_prefix``) checked against the protocol.

    Raises a ``PotentialError`` naming the potential and how many sequences broke it.
    """
    fn = potential.log_phi if final else potential.log_prefix
    out = torch.as_tensor(fn(seqs)).to(torch.float32)
    what = "log phi" if final else "prefix score"
    if out.shape != (len(seqs),):
        raise PotentialError(
            f"potential {potential.name} returned {what} of shape {tuple(out.shape)} for {len(seqs)} sequences; "
            f"expected ({len(seqs)},)"
        )
    bad = torch.isnan(out) | torch.isposinf(out)
    if bad.any():
        k = int(bad.sum())
        i = int(bad.nonzero()[0])
        kind = "NaN" if torch.isnan(out[i]) else "+inf"
        raise PotentialError(
            f"potential {potential.name} returned {kind} {what} for {k} of {len(seqs)} particles "
            f"(e.g. {seqs.texts[i]!r}): return a finite log phi, or -inf where phi = 0"
        )
    return out
