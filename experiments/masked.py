"""Hard constraints in the proposal vs reweighting only, on the embedded model.

Two constraints: a lexical one (no letter "e" in 16 tokens after "My favorite weather is")
and a JSON schema (a compact {"city": string, "temp": integer} object as the whole reply
to a chat request). For each, SMC with N = 4, 16, 64 particles (ESS threshold 0.5) and
``--seeds`` seeds, two ways: reweighting only (the potential's prefix score kills a particle
once it strays) and masked (``MaskedProposal``: only tokens that keep the constraint
satisfiable are drawn, weight = the allowed mass). Both estimate the same Z (the
constraint's probability under the model), so the table compares the spread of log Z-hat
and the final ESS at equal N. Resumable: rows already in ``results.jsonl`` are skipped.
Writes results.jsonl and results.md (``table``) into --out. Rerun: make experiment-masked
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import pilm
from pilm.inference.result import read_jsonl
from pilm.learning.checkpoint import RESUME_ELSEWHERE, claim
from pilm.proposals import MaskedProposal

SCHEMA = {"type": "object", "required": ["city", "temp"],
          "properties": {"city": {"type": "string", "maxLength": 16}, "temp": {"type": "integer"}}}
JSON_PROMPT = ('Give the weather in one city as a JSON object with keys "city" (a string) and "temp" (an integer, '
               'in Celsius). Reply with the JSON only.')


def targets(model) -> dict[str, pilm.Target]:
    return {
        "no e (16 tokens)": pilm.Target(model, "My favorite weather is", pilm.potentials.Regex("[^eE]*"),
                                        max_new_tokens=16),
        "JSON schema (24 tokens)": pilm.Target(model, JSON_PROMPT, pilm.potentials.JsonSchema(SCHEMA, any_whitespace=False),
                                               chat=True, max_new_tokens=24),
    }


def table(rows: list[dict]) -> str:
    """results.md: per constraint, N and method, over the runs (seeds): how many went extinct, the
    mean and variance of log Z-hat over the others, log of the mean Z-hat over all (an extinct run
    is Z-hat = 0), the mean final ESS and seconds per run."""
    lines = ["| constraint | N | method | runs | extinct | mean log Ẑ | var log Ẑ | log mean Ẑ | mean final ESS | s / run |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    keys = sorted({(r["constraint"], r["n"], r["method"]) for r in rows}, key=lambda k: (k[0], k[1], k[2] != "reweighting"))
    for constraint, n, method in keys:
        cell = [r for r in rows if (r["constraint"], r["n"], r["method"]) == (constraint, n, method)]
        finite = [r["log_z"] for r in cell if math.isfinite(r["log_z"])]
        log_mean = (max(finite) + math.log(sum(math.exp(z - max(finite)) for z in finite) / len(cell))) if finite else -math.inf
        var = statistics.variance(finite) if len(finite) > 1 else math.nan
        lines.append(f"| {constraint} | {n} | {method} | {len(cell)} | {len(cell) - len(finite)} | "
                     f"{statistics.mean(finite) if finite else -math.inf:.2f} | {var:.3f} | {log_mean:.2f} | "
                     f"{statistics.mean(r['final_ess'] for r in cell):.1f} | "
                     f"{statistics.mean(r['seconds'] for r in cell):.1f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("docs/masked"))
    ap.add_argument("--n", default="4,16,64")
    ap.add_argument("--seeds", type=int, default=20)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    results = args.out / "results.jsonl"
    done = {(r["constraint"], r["method"], r["n"], r["seed"]) for r in read_jsonl(results, missing_ok=True)}
    model = pilm.load_model()
    claim(args.out, {**{k: v for k, v in vars(args).items() if k not in ("out", "n", "seeds")}, "model": model.name,
                 "dtype": model.dtype_name}, remedy=RESUME_ELSEWHERE)  # rows of other settings never mix
    for constraint, target in targets(model).items():
        for n in map(int, args.n.split(",")):
            for seed in range(args.seeds):
                for method in ("reweighting", "masked"):
                    if (constraint, method, n, seed) in done:
                        continue
                    proposal = MaskedProposal() if method == "masked" else None
                    t0 = time.perf_counter()
                    res = pilm.smc(target, n, proposal=proposal, ess_threshold=0.5, seed=seed, progress=False,
                                   on_extinction="return")
                    row = {"constraint": constraint, "method": method, "n": n, "seed": seed, "log_z": res.log_z,
                           "final_ess": res.ess[-1] if math.isfinite(res.log_z) else 0.0,
                           "seconds": round(time.perf_counter() - t0, 2),
                           "sample": res.top(1)[0][1] if math.isfinite(res.log_z) else ""}
                    with results.open("a") as f:
                        f.write(json.dumps(row) + "\n")
                    print(json.dumps(row), flush=True)
    from results import write  # experiments/results.py, next to this script

    print(write(args.out, "masked")["results.md"])


if __name__ == "__main__":
    main()
