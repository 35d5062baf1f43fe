"""Which engine computes pilm's token masks: llguidance, outlines-core or xgrammar, measured.

On the embedded tokenizer (SmolLM2, 49,152 byte-level BPE tokens), for three constraints —
a lexical regex (no "e"), a JSON schema, and a pattern of multi-byte words — and each engine:

- ``compile_s``: building the automaton for the tokenizer (once per constraint);
- ``mask_ms_per_step``: one SMC step's work for N = 64 rows — advance each row's automaton by
  the token it drew and write its allowed-next mask into an (N, V) bool tensor — averaged over
  32 steps along 64 token paths that are the same for every engine (a seeded walk drawing
  uniformly among the tokens every engine allows, so it exercises multi-byte splits far
  more than a language model would); the engine's own cache where it has one (outlines-core's
  states are integers: one mask per state);
- ``false_forbid`` / ``false_allow`` / ``wrong_stop`` (the two regexes): mask entries that
  differ from a byte-level reference (token v is allowed iff the bytes of prefix + v are a
  prefix of valid UTF-8 the pattern, matched over bytes, can still full-match), summed over
  the visited prefixes (``reference_errors``).

Needs ``pip install outlines-core xgrammar apache-tvm-ffi`` besides pilm (``make experiment-mask-engines``).
Writes ``OUT/engines.json`` (one line per engine and constraint, printed as it comes) and
``OUT/results.md`` (``table``).
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer

from pilm.models.registry import embedded_path
from pilm.testing import byte_reference_mask, token_bytes

N, STEPS = 64, 32
WORDS = ["café", "naïve", "日本語", "Ελλάδα", "über"]
CONSTRAINTS = {
    "no-e regex": ("regex", r"[^eE]*"),
    "json schema": ("json", {"type": "object", "additionalProperties": False, "required": ["city", "temp"],
                             "properties": {"city": {"type": "string", "maxLength": 24},
                                            "temp": {"type": "integer", "minimum": -50, "maximum": 60}}}),
    "multi-byte words": ("regex", "(" + "|".join(WORDS) + ")( (" + "|".join(WORDS) + "))*"),
}


class Llguidance:
    name = "llguidance"

    def __init__(self, tokenizer, kind, spec):
        import llguidance
        import llguidance.hf
        import llguidance.torch as lt

        self.lt, self.tok = lt, llguidance.hf.from_tokenizer(tokenizer)
        grammar = (llguidance.LLMatcher.grammar_from_regex(spec) if kind == "regex"
                   else llguidance.LLMatcher.grammar_from_json_schema(json.dumps(spec)))
        self.root = llguidance.LLMatcher(self.tok, grammar)
        assert not self.root.get_error(), self.root.get_error()
        self.bits = lt.allocate_token_bitmask(N, self.tok.vocab_size)

    def start(self, n):
        self.rows = [self.root.deep_copy() for _ in range(n)]

    def advance(self, tokens):
        for m, t in zip(self.rows, tokens):
            if t is not None:
                m.consume_token(t)

    def masks(self):
        for i, m in enumerate(self.rows):
            self.lt.fill_next_token_bitmask(m, self.bits, i)
        return self.bits

    def accepting(self, i):
        return self.rows[i].is_accepting()


class Xgrammar:
    name = "xgrammar"

    def __init__(self, tokenizer, kind, spec):
        import xgrammar as xgr

        self.xgr = xgr
        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=len(tokenizer))
        compiler = xgr.GrammarCompiler(info, max_threads=1)
        self.compiled = compiler.compile_regex(spec) if kind == "regex" else compiler.compile_json_schema(spec)
        self.bits = xgr.allocate_token_bitmask(N, info.vocab_size)

    def start(self, n):
        self.rows = [self.xgr.GrammarMatcher(self.compiled, terminate_without_stop_token=True) for _ in range(n)]

    def advance(self, tokens):
        for m, t in zip(self.rows, tokens):
            if t is not None:
                assert m.accept_token(t)

    def masks(self):
        for i, m in enumerate(self.rows):
            m.fill_next_token_bitmask(self.bits, i)
        return self.bits

    def accepting(self, i):
        return self.rows[i].is_completed()


class OutlinesCore:
    name = "outlines-core"

    def __init__(self, tokenizer, kind, spec):
        import outlines_core as oc

        pattern = spec if kind == "regex" else oc.json_schema.build_regex_from_schema(json.dumps(spec))
        vocab = {}
        special = set(tokenizer.all_special_ids)
        for v, b in enumerate(token_bytes(tokenizer)):
            if v not in special:
                vocab.setdefault(b, []).append(v)
        self.index = oc.Index(pattern, oc.Vocabulary(tokenizer.eos_token_id, vocab))
        self.words = (len(tokenizer) + 31) // 32
        self.cache: dict[int, torch.Tensor] = {}

    def start(self, n):
        self.rows = [self.index.get_initial_state()] * n

    def advance(self, tokens):
        self.rows = [s if t is None else self.index.get_next_state(s, t) for s, t in zip(self.rows, tokens)]

    def _row(self, state):
        row = self.cache.get(state)
        if row is None:
            allowed = torch.zeros(self.words * 32, dtype=torch.bool)
            allowed[self.index.get_allowed_tokens(state)] = True
            row = self.cache[state] = pack(allowed)
        return row

    def masks(self):
        return torch.stack([self._row(s) for s in self.rows])

    def accepting(self, i):
        return self.index.is_final_state(self.rows[i])


ENGINES = [Llguidance, OutlinesCore, Xgrammar]


def pack(allowed: torch.Tensor) -> torch.Tensor:
    """A bool row as 32-bit words, bit j of word w = token 32 w + j (the layout all three use)."""
    weights = (1 << torch.arange(32, dtype=torch.int64))
    return (allowed.view(-1, 32).long() * weights).sum(1).to(torch.int64).to(torch.int32)


_SHIFTS = torch.arange(32, dtype=torch.int32)


def unpack(bits: torch.Tensor, vocab: int) -> torch.Tensor:
    return ((bits[..., None] >> _SHIFTS) & 1).bool().flatten(-2)[..., :vocab]


def walks(engines, vocab: int, eos: int, seed: int = 0) -> list[list[int]]:
    """N token paths of up to STEPS tokens, each token drawn uniformly among those every engine
    allows (EOS excluded) — the same paths for every engine; a path stops where only EOS is left."""
    rng = random.Random(seed)
    for e in engines:
        e.start(N)
    paths: list[list[int]] = [[] for _ in range(N)]
    done = [False] * N
    for _ in range(STEPS):
        common = torch.stack([unpack(e.masks(), vocab) for e in engines]).all(0)
        common[:, eos] = False
        tokens = []
        for i in range(N):
            choices = [] if done[i] else common[i].nonzero().flatten().tolist()
            done[i] = not choices
            tokens.append(rng.choice(choices) if choices else None)
        if all(done):
            break
        for e in engines:
            e.advance(tokens)
        for p, t in zip(paths, tokens):
            if t is not None:
                p.append(t)
    return paths


def timed_masks(engine, paths: list[list[int]]) -> float:
    """Milliseconds per step of advancing N rows and filling their (N, V) bool masks."""
    length = min(map(len, paths))
    engine.start(N)
    t0 = time.perf_counter()
    for t in range(length):
        engine.advance([p[t] for p in paths])
        unpack(engine.masks(), engine_vocab)
    return 1e3 * (time.perf_counter() - t0) / max(length, 1)


def reference_errors(engine, paths, tokenizer, pattern: str, eos: int) -> dict:
    """Mask entries that differ from the byte-level reference (``pilm.testing.byte_reference_mask``)
    over the first 8 steps of the first 8 paths: tokens forbidden that lead to a match
    (``false_forbid``: a masked sampler loses them) and tokens allowed that cannot
    (``false_allow``); added tokens (e.g. "<|im_start|>") are left out, as the engines disagree
    on whether they are text, and the stop column is compared with the full match apart."""
    added = sorted(tokenizer.get_added_vocab().values())
    forbid = allow = stop = 0
    for p in paths[:8]:
        engine.start(1)
        for t in range(min(8, len(p))):
            got = unpack(engine.masks()[:1], engine_vocab)[0]
            want = byte_reference_mask(pattern, tokenizer, p[:t], eos)
            stop += engine.accepting(0) != bool(want[eos])
            got[added], want[added] = False, False
            forbid += int((want & ~got).sum())
            allow += int((got & ~want).sum())
            engine.advance([p[t]])
    return {"false_forbid": forbid, "false_allow": allow, "wrong_stop": stop}


engine_vocab = 0


def main() -> None:
    global engine_vocab
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("docs/masks"))
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    tokenizer = AutoTokenizer.from_pretrained(embedded_path())
    engine_vocab, eos = len(tokenizer), tokenizer.eos_token_id
    rows = []
    for cname, (kind, spec) in CONSTRAINTS.items():
        engines, compile_s = [], {}
        for cls in ENGINES:
            t0 = time.perf_counter()
            engines.append(cls(tokenizer, kind, spec))
            compile_s[cls.name] = time.perf_counter() - t0
        paths = walks(engines, engine_vocab, eos)
        for e in engines:
            row = {"constraint": cname, "engine": e.name, "compile_s": round(compile_s[e.name], 3),
                   "mask_ms_per_step": round(min(timed_masks(e, paths) for _ in range(3)), 2), "n": N,
                   "steps": min(map(len, paths))}
            if kind == "regex":
                row.update(reference_errors(e, paths, tokenizer, spec, eos))
            print(json.dumps(row), flush=True)
            rows.append(row)
    (args.out / "engines.json").write_text(json.dumps(rows, indent=1) + "\n")
    from results import write  # experiments/results.py, next to this script

    print(write(args.out, "masks")["results.md"])


def table(rows: list[dict]) -> str:
    """results.md: per constraint and engine, the compile seconds, the mask milliseconds per SMC
    step for ``n`` rows over ``steps`` steps, and (regexes only: – otherwise) the mask entries
    that differ from the byte-level reference."""
    lines = ["| constraint | engine | compile s | mask ms / step | rows | steps | tokens wrongly forbidden | "
             "wrongly allowed | wrong stop |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        errors = " | ".join(f"{r[k]:,}" if k in r else "–" for k in ("false_forbid", "false_allow", "wrong_stop"))
        lines.append(f"| {r['constraint']} | {r['engine']} | {r['compile_s']} | {r['mask_ms_per_step']} | {r['n']} | "
                     f"{r['steps']} | {errors} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
