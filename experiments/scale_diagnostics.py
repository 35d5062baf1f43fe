"""Why the reasoning methods scale as they do on arithmetic chains: how often the policy's
steps are right, how many problems have any fully right chain among N independent ones
(pass@N, the ceiling of best-of-N with an exact verifier), how often step t is right
given a right prefix (at least 20 such prefixes), how much of a particle filter's final
population is fully right, and how well the learned PRM ranks right prefixes above wrong
ones (AUC against the exact verifier on the same chains, at steps 1 and 2 and at the end).

    python experiments/scale_diagnostics.py --out docs/scale/diagnostics.json --problems 32 --n 16
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pilm
from pilm.config import ScaleConfig
from pilm.tasks import arithmetic_chain as task


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="docs/scale/diagnostics.json")
    parser.add_argument("--problems", type=int, default=32)
    parser.add_argument("--n", type=int, default=16)
    parser.add_argument("--prm-path", default="docs/scale/learned_prm", help="the learned PRM to rate (if present)")
    args = parser.parse_args()
    model = pilm.load_model()
    problems = task.problems(args.problems, ScaleConfig.operands, seed=ScaleConfig.seed)
    targets = [task.target(model, p["question"]) for p in problems]
    verifier = task.step_verifier()
    temperature = ScaleConfig.temperature
    free = pilm.best_of_n(targets, verifier, args.n, temperature=temperature, seed=0)
    pf = pilm.particle_filter(targets, verifier, args.n, weights="paper", temperature=temperature, seed=0)

    def right(r, k):
        return r.scores[k][-1] == 1.0 and r.answers[k] is not None

    n = args.n
    report = {
        "problems": len(problems), "n": n, "temperature": temperature,
        "first_step_right": sum(r.scores[k][0] == 1.0 for r in free for k in range(n)) / (n * len(free)),
        "chain_right": sum(right(r, k) for r in free for k in range(n)) / (n * len(free)),
        "pass_at_n": sum(any(right(r, k) for k in range(n)) for r in free) / len(free),
        "pf_final_particles_right": sum(right(r, k) for r in pf for k in range(n)) / (n * len(pf)),
        "pf_problems_with_a_right_particle": sum(any(right(r, k) for k in range(n)) for r in pf) / len(pf),
        "step_right_given_a_right_prefix": _conditional(free, n),
        "greedy_right": sum(g.answer("vote") == p["answer"] for g, p in zip(pilm.greedy(targets), problems)) / len(problems),
    }
    if Path(args.prm_path, "twist_config.json").exists():
        from pilm.twists import Twist

        learned = pilm.best_of_n(targets, Twist.from_pretrained(args.prm_path, model), args.n, temperature=temperature,
                                 seed=0)  # the same chains as ``free``: the PRM does not change what is drawn
        assert [r.tokens for r in learned] == [r.tokens for r in free]
        for t in (0, 1):
            pairs = [(lr.scores[k][t], vr.scores[k][t] == 1.0) for lr, vr in zip(learned, free) for k in range(n)
                     if len(vr.scores[k]) > t]
            report[f"learned_prm_auc_step{t + 1}"] = _auc(pairs)
        report["learned_prm_auc_chain"] = _auc([(lr.scores[k][-1], right(vr, k)) for lr, vr in zip(learned, free)
                                                for k in range(n)])
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report, indent=1))


def _auc(pairs: list[tuple[float, bool]]) -> float | None:
    """P(score of a right item > score of a wrong one), ties counting half (None without both)."""
    pos = [s for s, y in pairs if y]
    neg = [s for s, y in pairs if not y]
    if not pos or not neg:
        return None
    return sum((p > q) + 0.5 * (p == q) for p in pos for q in neg) / (len(pos) * len(neg))


def _conditional(results, n: int) -> list[float]:
    """P(step t right | steps 1..t-1 right) for t = 1, 2, ... over the independent chains."""
    out, t = [], 0
    while True:
        before = [(r, k) for r in results for k in range(n) if len(r.scores[k]) > t
                  and all(s == 1.0 for s in r.scores[k][:t])]
        if len(before) < 20:
            return out
        out.append(sum(r.scores[k][t] == 1.0 for r, k in before) / len(before))
        t += 1


if __name__ == "__main__":
    main()
