"""pilm on a vLLM engine (``make test-engines``, in .venv-vllm; ``make test`` never imports vLLM):
the same numbers as the transformers backend where both are exact, the step-level samplers on
the engine's own generation, the same results for the same seeds, and no process left behind.

One engine serves the module (starting one takes a minute or two on a CPU). It runs in float32,
like the HF model it is compared with, so that the two backends' log-probs differ only by their
kernels."""

import json
import math
import os
import re
from pathlib import Path

import psutil
import pytest
import torch

import pilm
from pilm.commands.scaling import run_scale
from pilm.config import ScaleConfig
from pilm.errors import BackendError
from pilm.potentials import FunctionPotential
from pilm.prm import FunctionPRM
from pilm.steps import Steps

def record(**values) -> None:
    """Add measured values to the JSON file $PILM_ENGINE_REPORT names (make bench-engines sets it:
    docs/engines/agreement.json), so that the docs quote what the checks measured."""
    path = os.environ.get("PILM_ENGINE_REPORT")
    if path:
        report = json.loads(Path(path).read_text()) if Path(path).exists() else {}
        Path(path).write_text(json.dumps({**report, **values}, indent=1) + "\n")


PROMPT = ("Numbers come in many kinds: whole numbers, fractions, primes and squares. Lists of them are "
          "used for counting, for sorting and for games. Below, write a short list of numbers that you like, "
          "one per line, and nothing else:\n")  # over 32 tokens: whole blocks of the engine's prefix cache
ONE = re.compile("1")  # in about a third of the chains


def engine_processes(before: set[int]) -> list[psutil.Process]:
    """Processes started since ``before`` that are still running, other than Python's
    resource tracker (which lives as long as the interpreter that started it)."""
    out = []
    for p in psutil.Process().children(recursive=True):
        try:
            if p.pid not in before and p.status() != psutil.STATUS_ZOMBIE and "resource_tracker" not in " ".join(
                    p.cmdline()):
                out.append(p)
        except psutil.NoSuchProcess:
            pass
    return out


@pytest.fixture(scope="module")
def engine():
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    model = pilm.load_model(backend="vllm", dtype="float32", max_model_len=512)
    assert engine_processes(before)  # the engine runs in processes of its own
    yield model
    model.close()
    _, alive = psutil.wait_procs(engine_processes(before), timeout=30)
    assert not alive, f"the engine left processes behind: {[p.name() for p in alive]}"


@pytest.fixture(scope="module")
def hf():
    return pilm.load_model(dtype="float32")


def test_both_backends_give_the_same_log_probs(engine, hf):
    """Teacher-forced log p0 of the same completions, float32: per token within 1e-3 nats (the
    kernels differ only in rounding; measured 1.3e-5 on a 2-core CPU, docs/engines/agreement.json)."""
    prompt = hf.encode_prompt(PROMPT)
    completions = [hf.encode(t) for t in ("1\n2\n3\n", "7\n14\n21\n28\n", "The list: seven, eight.")]
    seqs = [prompt + c for c in completions]
    a, b = hf.score(seqs, [len(prompt)] * 3), engine.score(seqs, [len(prompt)] * 3)
    per_token = (a - b).abs() / torch.tensor([len(c) for c in completions])
    record(logprob_gap_per_token_max=float(per_token.max()), logprob_gap_per_token_mean=float(per_token.mean()))
    assert per_token.max() < 1e-3, per_token
    choices = engine.choice_logprobs([prompt], [hf.encode("1")[0], hf.encode("7")[0]])
    assert torch.allclose(choices, hf.choice_logprobs([prompt], [hf.encode("1")[0], hf.encode("7")[0]]), atol=1e-3)


def target(model):
    """Z = E_p[phi], phi = 0.1 + 0.8 * 1["1" in the text], over at most 3 lines of 4 tokens."""
    phi = FunctionPotential(lambda s: math.log(0.1 + 0.8 * bool(ONE.search(s))), name="has 1")
    return pilm.Target(model, PROMPT, phi, max_new_tokens=12, steps=Steps(delimiter="\n", max_steps=3,
                                                                             max_step_tokens=4))


# About E[phi | the steps so far]: 0.9 once a "1" is there, else 0.1 + 0.8 P(one comes) ~ 0.25. The closer psi is
# to that, the smaller Z-hat's variance (with it exact, every run would return Z).
PRM = FunctionPRM(lambda question, steps: 0.9 if ONE.search("".join(steps)) else 0.25, name="1 so far")


def z_hat(model, seeds: int) -> torch.Tensor:
    runs = pilm.particle_filter([target(model)] * seeds, PRM, 8, weights="twisted", seed=0)
    return torch.tensor([math.exp(r.log_z) for r in runs], dtype=torch.float64)


def test_the_particle_filter_estimates_the_same_z_on_both_backends_and_by_plain_monte_carlo(engine, hf):
    """Twisted weights: Z-hat is unbiased for Z = E_p[phi] on each backend. The two means over
    64 runs of 8 particles, and plain Monte Carlo (mean phi over 512 chains the engine drew),
    agree within 4 standard errors of their difference; that SE is asserted below 7.5% of Z,
    so a 30% bias would show. (Exactness to 10% is tested on enumerable models by make test,
    tests/test_native.py; what this checks is the plumbing to a real engine, at a CPU's cost.)"""
    on_engine, on_hf = z_hat(engine, 64), z_hat(hf, 64)
    chains = pilm.self_consistency(target(engine), 512, seed=1)
    phi = torch.tensor([0.1 + 0.8 * bool(ONE.search(s)) for s in chains.samples], dtype=torch.float64)
    se = lambda x: float(x.std()) / math.sqrt(len(x))  # noqa: E731
    record(z_hat={name: {"mean": float(x.mean()), "se": se(x), "runs": len(x)}
                  for name, x in (("vllm_pf", on_engine), ("hf_pf", on_hf), ("vllm_monte_carlo", phi))})
    for other in (on_hf, phi):
        gap_se = math.hypot(se(on_engine), se(other))
        assert gap_se < 0.075 * float(phi.mean()), (gap_se, float(phi.mean()))
        assert abs(on_engine.mean() - other.mean()) < 4 * gap_se, (float(on_engine.mean()), float(other.mean()))
    assert 0.15 < float(phi.mean()) < 0.85  # phi separates chains: the comparison has teeth


def test_the_same_seed_gives_the_same_run(engine):
    a = pilm.particle_filter(target(engine), PRM, 8, weights="paper", seed=3)
    b = pilm.particle_filter(target(engine), PRM, 8, weights="paper", seed=3)
    assert a.tokens == b.tokens and a.log_z == b.log_z
    assert a.info["cached_tokens"] > 0  # survivors' prefixes came from the engine's cache


def test_what_the_engine_cannot_run_exactly_is_refused(engine):
    from pilm.twists.exact import ExactTwist

    with pytest.raises(BackendError, match="backend='hf'"):
        pilm.smc(target(engine), 4, twist=ExactTwist({}, engine.vocab_size), progress=False)


def test_pilm_scale_runs_its_grid_on_the_engine(engine, tmp_path):
    methods = ("greedy", "sc", "bon", "wbon", "beam", "dvts", "pf", "pf-twisted", "pg")
    cfg = ScaleConfig(backend="vllm", methods=methods, n=(2,), problems=1)
    rows = [json.loads(line) for line in run_scale(cfg, tmp_path, model=engine, progress=False).read_text().splitlines()]
    assert {r["method"] for r in rows} == set(methods) and len(rows) == len(methods)
    assert all(r["backend"] == "vllm" and r["tokens"] > 0 for r in rows)
    assert json.loads((tmp_path / "run.json").read_text())["backend"] == "vllm"
    judged = ScaleConfig(backend="vllm", prm="judge", methods=("bon",), n=(2,), problems=1)
    rows = run_scale(judged, tmp_path / "judge", model=engine, progress=False).read_text().splitlines()
    assert json.loads(rows[0])["prm_tokens"] > 0


def test_a_learned_prm_on_the_engine_reads_hidden_states_with_a_transformers_copy(engine, hf, tmp_path):
    """pilm scale --prm learned on the engine: the value head scores each step off the hidden
    state a transformers copy of the policy computes teacher-forced (its tokens are the PRM's
    compute), and the scores are the head's on that copy."""
    from pilm.prm import TwistPRM
    from pilm.twists import Twist

    torch.manual_seed(0)
    head = Twist.for_model(hf, output="log_sigmoid", kind="mlp")
    for p in head.parameters():
        p.data.normal_(0, 0.05)
    head.save_pretrained(tmp_path / "prm")
    cfg = ScaleConfig(backend="vllm", prm="learned", methods=("bon", "pf"), n=(2,), problems=2)
    rows = [json.loads(line) for line in run_scale(cfg, tmp_path / "run", prm_path=str(tmp_path / "prm"), model=engine,
                                                   progress=False).read_text().splitlines()]
    assert {r["method"] for r in rows} == {"bon", "pf"} and all(r["prm_tokens"] > 0 for r in rows)
    from pilm.testing import _state_before_last

    res = pilm.particle_filter(target(engine), TwistPRM(head, reader=hf), 4, seed=0)
    last = [s[-1] for s in res.scores]
    for tokens, got in zip(res.tokens, last, strict=True):  # the head on the token-by-token forward's state
        with torch.no_grad():
            state = _state_before_last(hf, target(hf).prompt_ids, tokens)
            assert abs(got - float(head.log_psi(None, state.hidden.float()).exp()[0, tokens[-1]])) < 1e-5
    assert max(last) - min(last) > 1e-4  # the chains' scores differ: the comparison has teeth


SCALE = """
import sys

from pilm.commands.scaling import run_scale
from pilm.config import ScaleConfig

if __name__ == "__main__":  # vLLM starts its engine processes from here
    cfg = ScaleConfig(backend="vllm", methods=("sc", "pf"), n=(2,), problems=4, max_rows=4, temperature=1.0,
                      engine=("max_model_len=512", "kv_cache_memory_bytes=268435456"))  # blocks of 2 problems
    run_scale(cfg, sys.argv[1], progress=False)
"""


def test_scale_sharded_over_two_processes_each_with_its_engine_draws_what_one_process_does(tmp_path):
    """torchrun starts two processes, pinned to two cores; each starts an engine on a core of
    its own (process_share: the engines' own logs name the cores) and runs alternate blocks of
    problems. One process, its engine on one core too (so the kernels run the same threads),
    runs every block: each block is the same batch under the same seed, so every row's answer,
    tokens and log Z are the same. float32, like the rest of this module."""
    import subprocess
    import sys

    from tests.test_distributed import free_port

    cores = sorted(os.sched_getaffinity(0))[:2]
    if len(cores) < 2:
        pytest.skip("two processes on cores of their own need two cores")
    (tmp_path / "run.py").write_text(SCALE)
    env = {**os.environ, "PILM_DTYPE": "float32", "OMP_NUM_THREADS": "1", "VLLM_LOGGING_LEVEL": "INFO"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           str(tmp_path / "run.py"), str(tmp_path / "sharded")]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900,
                          preexec_fn=lambda: os.sched_setaffinity(0, cores))
    assert done.returncode == 0, done.stderr[-8000:]
    assert all(f"core ids=[{c}]" in done.stdout + done.stderr for c in cores)  # an engine on each core
    alone = subprocess.run([sys.executable, str(tmp_path / "run.py"), str(tmp_path / "alone")],
                           env={**env, "VLLM_CPU_OMP_THREADS_BIND": str(cores[0])}, capture_output=True, text=True,
                           timeout=900)
    assert alone.returncode == 0, alone.stderr[-8000:]
    runs = [{(r["method"], r["problem"]): r for r in map(json.loads, (tmp_path / d / "rows.jsonl").read_text().splitlines())}
            for d in ("sharded", "alone")]
    assert sorted(runs[0]) == sorted((m, i) for m in ("sc", "pf") for i in range(4)) == sorted(runs[1])
    same = ("predicted", "tokens", "log_z")
    assert all({k: runs[0][c][k] for k in same} == {k: runs[1][c][k] for k in same} for c in runs[0])
    assert len({runs[1][("pf", i)]["log_z"] for i in range(4)}) > 1  # the runs differ between problems
    assert all(r["backend"] == "vllm" for r in runs[0].values())
