"""Does ``torch.compile`` pay for pilm's decode step on this CPU? (issue 29: measure it, keep it optional.)

One process, the embedded model, SMC of 64 particles x 32 tokens (a prefix-scored regex,
resampling every step: the bench's main leg), alternating eager and compiled rounds under the same
threads; time per drawn token, the fastest of each kept. Two ways to compile, each measured
against eager in its own process (dynamo's caches would otherwise mix them):

* ``blocks``: each decoder layer's MLP and RMSNorms (``torch.compile(..., dynamic=True)``), the
  elementwise work around the matmuls that inductor can fuse; attention stays pilm's cascade;
* ``decoder``: the whole decoder forward (``model.hf.model``), graph breaks where dynamo cannot
  follow (the cascade's context variable, transformers' cache objects).

Writes ``compile.json`` (every round, the compile seconds, the machine) under ``--out``.
Usage: ``make bench-compile`` (``.venv/bin/python experiments/compile_decode.py --out docs/bench``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

WAYS = ("blocks", "decoder")


def measure(way: str, rounds: int, n: int, tokens: int) -> dict:
    from pilm import load_model, smc
    from pilm.potentials import Regex
    from pilm.target import Target

    model = load_model()
    target = Target(model, "The movie was", Regex(r"[^0-9]*"), max_new_tokens=tokens)
    if way == "blocks":
        modules = [m for layer in model.hf.model.layers
                   for m in (layer.mlp, layer.input_layernorm, layer.post_attention_layernorm)]
    else:
        modules = [model.hf.model]
    eager = [m.forward for m in modules]
    compiled = [torch.compile(f, dynamic=True) for f in eager]

    def use(forwards) -> None:
        for m, f in zip(modules, forwards, strict=True):
            m.forward = f

    def per_token(seed: int) -> float:
        t0 = time.perf_counter()
        res = smc(target, n, ess_threshold=1.0, seed=seed, progress=False, on_extinction="return")
        return (time.perf_counter() - t0) / sum(len(t) for t in res.tokens)

    use(compiled)
    t0 = time.perf_counter()
    per_token(0)  # compiles
    compile_seconds = time.perf_counter() - t0
    use(eager)
    per_token(0)
    times: dict[str, list[float]] = {"eager": [], "compiled": []}
    for r in range(rounds):
        for name, forwards in (("eager", eager), ("compiled", compiled)):
            use(forwards)
            times[name].append(per_token(r + 1))
    return {"way": way, "compile_and_first_run_seconds": compile_seconds, "seconds_per_token": times,
            "compiled_over_eager": min(times["compiled"]) / min(times["eager"]), "dtype": model.dtype_name}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--way", choices=WAYS, help=argparse.SUPPRESS)  # one way, in a process of its own
    args = parser.parse_args()
    if args.way:
        print(json.dumps(measure(args.way, args.rounds, args.n, args.tokens)))
        return
    legs = []
    for way in WAYS:
        done = subprocess.run([sys.executable, __file__, "--out", str(args.out), "--rounds", str(args.rounds),
                               "--n", str(args.n), "--tokens", str(args.tokens), "--way", way],
                              capture_output=True, text=True, check=True)
        legs.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(f"{way}: compiled / eager = {legs[-1]['compiled_over_eager']:.3f}", flush=True)
    report = {"legs": legs, "shape": f"{args.n} particles x {args.tokens} tokens", "torch": torch.__version__,
              "machine": platform.machine(), "processor": platform.processor(), "threads": torch.get_num_threads(),
              "load_average_1min": os.getloadavg()[0]}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "compile.json").write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
