"""Why the reasoning methods scale as they do on arithmetic chains: how often the policy's
steps are right, how many problems have any fully right chain among N independent ones
(pass@N, the ceiling of best-of-N with an exact verifier), and how much of a particle
filter's final population is fully right.

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
        "greedy_right": sum(g.answer("vote") == p["answer"] for g, p in zip(pilm.greedy(targets), problems)) / len(problems),
    }
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
