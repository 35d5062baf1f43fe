"""The one-command device check: every verb of pilm on a GPU, with random-initialised Llamas
built from a config (nothing downloaded).

    python scripts/gpu_smoke.py                      # cuda, float32 and bfloat16, then timings
    python scripts/gpu_smoke.py --device fakegpu --dtypes float32     # what make test runs, no GPU needed

``fakegpu`` is ``pilm.testing.fake_device``: a device that computes on the CPU and fails on any
tensor or generator left on the CPU, so the script's checks run on this machine too.

Per dtype: padded cached decoding equals each row's own full forward; SMC over two prompts,
the same for the same seed and chunked or not; masked SMC (a regex); twisted SMC with MLP,
tied and conditional heads; a step of every twist objective and of a LoRA-body twist; a step
of every fine-tuning objective, then SMC with the fine-tuned policy as proposal; a PRM
training step, particle filters (both weightings), particle Gibbs with ancestor sampling;
rejection and bounds; a latent E and M step; a red-teaming step; the CLI (``pilm sample
--device``). Then a two-process fine-tuning run (two GPUs needed, else said and skipped) and a
timing and memory table: tokens/s of ``generate`` against SMC and the particle filter on a
1.5B-shaped random model (SMC with a per-row KV cache, the default on a GPU), and SMC with the
particles sharing the prompt's KV cache, for 64-token prompts and a 512-token one. Prints one
line per check; exits 1 if any failed.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import re
import subprocess
import sys
import tempfile
import time
import traceback
from functools import partial
from pathlib import Path

import torch

RESULTS: list[tuple[str, bool, str]] = []


def tiny_model(device: str, dtype: torch.dtype = torch.float32, *, words: int = 64, hidden: int = 64, layers: int = 2,
               heads: int = 4):
    """A random Llama with a ``words``-word tokenizer (w0 w1 ...) made in memory."""
    from tokenizers import pre_tokenizers

    return _random_llama(["<s>", "</s>", "<pad>"] + [f"w{i}" for i in range(words - 3)], pre_tokenizers.WhitespaceSplit(),
                         None, device, dtype, hidden, layers, heads, f"random-llama-{hidden}x{layers}@{device}")


def char_model(device: str, dtype: torch.dtype):
    """A random Llama whose tokens are single characters (their concatenation is the text)."""
    from tokenizers import Regex, decoders, pre_tokenizers

    return _random_llama(["<s>", "</s>", "<pad>", *"abcdefghijklmnopqrstuvwxyz0123456789 .,"],
                         pre_tokenizers.Split(Regex("."), "isolated"), decoders.Fuse(), device, dtype, 64, 2, 4,
                         f"random-char-llama@{device}")


def _random_llama(vocab: list[str], pre_tokenizer, decoder, device: str, dtype: torch.dtype, hidden: int, layers: int,
                  heads: int, name: str):
    """A Llama of random weights (seed 0) over a word-level tokenizer of ``vocab`` (<s>, </s>, <pad> first)."""
    from tokenizers import Tokenizer, models
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from pilm.models import HFModel

    raw = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<pad>"))
    raw.pre_tokenizer = pre_tokenizer
    if decoder is not None:
        raw.decoder = decoder
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=hidden, intermediate_size=2 * hidden if hidden < 512 else
                         int(hidden * 5.8), num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=max(1, heads // 2), bos_token_id=0, eos_token_id=1, pad_token_id=2)
    with torch.device(device):
        hf = LlamaForCausalLM(config).to(dtype).eval()
    return HFModel(hf, tokenizer, name=name)


def check(name: str, fn) -> None:
    """Run one check: ``fn`` returns a detail string, or raises (a failure, with its last frames)."""
    try:
        detail = fn() or ""
        ok = True
    except Exception as err:  # a smoke test reports every failure and goes on
        frames = traceback.extract_tb(err.__traceback__)[-3:]
        where = " <- ".join(f"{Path(f.filename).name}:{f.lineno}" for f in reversed(frames))
        detail, ok = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''} [{where}]", False
    RESULTS.append((name, ok, detail))
    print(f"{'ok  ' if ok else 'FAIL'} {name}{': ' + detail if detail else ''}", flush=True)


def finite(results) -> str:
    values = [r.log_z for r in (results if isinstance(results, list) else [results])]
    assert all(math.isfinite(v) for v in values), f"log Z-hat {values}"
    return "log Z-hat " + ", ".join(f"{v:.3f}" for v in values)


def verbs(device: str, dtype: torch.dtype) -> None:
    import pilm
    from pilm.learning.objectives import FINETUNE_OBJECTIVES, OBJECTIVES
    from pilm.models import decode_step
    from pilm.potentials import FunctionPotential, Regex, SuffixLikelihood

    tag = str(dtype).removeprefix("torch.")
    model = tiny_model(device, dtype)
    prompts = ("w3 w4", "w5 w6 w7 w8 w9")
    soft = FunctionPotential(lambda t: -0.3 * t.count("w7"), name="fewer w7", prefix_fn=lambda t: -0.1 * t.count("w7"))
    bounded = FunctionPotential(lambda t: -0.1 * t.count("w7"), name="fewer w7 (phi <= 1)")
    targets = [pilm.Target(model, p, soft, max_new_tokens=6) for p in prompts]

    def padded_decoding():
        ids = [model.encode_prompt(p) for p in prompts]
        state, seqs, worst = model.start_many(ids, 2), [list(p) for p in ids for _ in range(2)], 0.0
        for _ in range(3):
            for row, seq in enumerate(seqs):
                with torch.no_grad():
                    full = model.hf(input_ids=torch.tensor([seq], device=device)).logits[0, -1].float()
                worst = max(worst, float((state.logprobs[row] - torch.log_softmax(full, -1)).abs().max()))
            parents, tokens = torch.tensor([1, 0, 3, 3]), torch.tensor([5, 6, 7, 8])
            seqs = [seqs[p] + [int(v)] for p, v in zip(parents.tolist(), tokens.tolist(), strict=True)]
            state = decode_step(model, state, parents, tokens)
        tolerance = 1e-3 if dtype == torch.float32 else 0.15  # bfloat16 kernels differ with padding and shape
        assert worst < tolerance, f"max |diff| {worst:.2e} >= {tolerance}"
        return f"max |log p diff| {worst:.2e}"

    def shared_prompt_cache():
        ids = [model.encode_prompt(p) for p in prompts]

        def run():
            state, out = model.start_many(ids, 3), []
            for step in range(4):
                parents = torch.tensor([5, 0, 3, 3, 1, 2]) if step % 2 else torch.arange(6)
                hold = torch.tensor([False, step == 1, False, False, step == 2, False], device=device)
                state = model.advance(model.reindex(state, parents), torch.tensor([5, 6, 7, 8, 9, 10]) + step, hold)
                out.append(state.logprobs)
            return torch.stack(out)

        with kv_cache(model, "shared"):
            assert model.shares_prefixes, "the tiny Llama should share its prompts' KV cache"
            shared = run()
        with kv_cache(model, "per-row"):
            rows = run()
        worst = float((shared - rows).abs().max())
        tolerance = 1e-4 if dtype == torch.float32 else 2e-2  # bfloat16 (3.8e-3 measured on an H200)
        assert worst < tolerance, f"max |diff| {worst:.2e} >= {tolerance}"
        return f"resampling across prompts and holds, max |log p diff| vs a per-row cache {worst:.2e}"

    def smc_same_and_chunked():
        a = pilm.smc(targets, 8, seed=0, progress=False)
        b = pilm.smc(targets, 8, seed=0, progress=False)
        c = pilm.smc(targets, 8, seed=0, progress=False, max_rows=8)  # one target per chunk
        assert [r.tokens for r in a] == [r.tokens for r in b], "the same seed drew other tokens"
        same = [r.tokens for r in a] == [r.tokens for r in c]
        gap = max(abs(x.log_z - y.log_z) for x, y in zip(a, c, strict=True))
        assert same or dtype != torch.float32, "chunking changed the float32 draws"
        return finite(a) + f"; chunked: {'same tokens' if same else 'other tokens'}, |log Z diff| {gap:.1e}"

    def masked():
        chars = char_model(device, dtype)  # token masks need tokens that spell the text
        fmt = [pilm.Target(chars, p, Regex(r"[0-9]+\."), max_new_tokens=16) for p in ("a b", "c d e")]
        res = pilm.smc(fmt, 8, proposal="masked", seed=0, progress=False)
        bad = [s for r in res for s in r.samples if not re.fullmatch(r"[0-9]*\.?", s)]
        assert not bad, f"outside the format: {bad}"
        return finite(res)

    def twisted(kind: str):
        def run():
            twist = pilm.Twist.for_model(model, kind=kind, layers=2)
            return finite(pilm.smc(targets, 8, twist=twist, seed=0, progress=False))
        return run

    def conditional():
        ending = [pilm.Target(model, p, SuffixLikelihood(model, "w9 w8"), max_new_tokens=4) for p in prompts]
        twist = pilm.train_twist(ending, "ctl", steps=1, batch_size=4, conditional=True, seed=0, progress=False).model
        return finite(pilm.smc(ending, 8, twist=twist, seed=0, progress=False))

    def judge():
        from pilm.prm import LMJudge

        res = pilm.particle_filter(chains, LMJudge(model, "{question} w11 {steps} w12", yes=" w13", no=" w14"), 4,
                                   weights="twisted", seed=0)
        return finite(res)

    def train_twist(objective: str, body: str = "frozen"):
        def run():
            trained = pilm.train_twist(targets, objective, steps=1, batch_size=4, seed=0, progress=False, body=body)
            assert math.isfinite(trained.history[-1]["loss"])
            return f"loss {trained.history[-1]['loss']:.4g}; " + finite(pilm.smc(targets, 4, twist=trained.model, seed=0,
                                                                                  progress=False))
        return run

    def finetune(objective: str):
        def run():
            data = {"data": [model.encode("w10 w11")]} if objective == "sft" else {}
            trained = pilm.finetune(targets[0], objective, steps=1, batch_size=2, lora_rank=2, seed=0, progress=False,
                                    **data)
            assert math.isfinite(trained.history[-1]["loss"])
            return f"loss {trained.history[-1]['loss']:.4g}; as proposal " + finite(
                pilm.smc(targets, 4, proposal=trained.model, seed=0, progress=False))
        return run

    cut = pilm.Steps(delimiter=model.encode("w10")[0], max_steps=3, max_step_tokens=3)
    chains = [pilm.Target(model, p, soft, max_new_tokens=9, steps=cut) for p in prompts]
    learned: dict = {}

    def prm_and_filters():
        learned["prm"] = prm = pilm.train_prm(chains, rollouts=1, chains=2, steps=1, batch_size=2, seed=0,
                                              progress=False).model
        out = []
        for weights in ("paper", "twisted"):
            out.append(f"{weights} " + finite(pilm.particle_filter(chains, prm, 8, weights=weights, seed=0)))
        return "; ".join(out)

    def gibbs():
        res = pilm.particle_gibbs(chains[0], learned["prm"], 4, iterations=2, ancestor_sampling=True,
                                  weights="twisted", ess_threshold=1.0, seed=0)  # resampling at every boundary
        return f"{len(res.samples)} chains"

    def rejection_and_bounds():
        target = pilm.Target(model, "w3 w4", bounded, max_new_tokens=3)
        accepted = pilm.rejection_sample(target, 2, seed=0)
        report = pilm.bounds(target, n_particles=[4], seeds=2, exact_samples="rejection", progress=False)
        row = report.rows[0]
        return f"{len(accepted.samples)} accepted; bounds [{row['lower']:.3f}, {row['upper']:.3f}]"

    def latent():
        from pilm.latent import Example, LatentReasoner

        reasoner = LatentReasoner(model, template="{x} w20{z} w21{y}", labels=[" w30", " w31"], rationale_tokens=(1, 2))
        train = [Example("w3 w4", " w30"), Example("w5 w6", " w31")]
        q = reasoner.e_step(train, steps=1, batch_size=2, lora_rank=2, progress=False).model
        lik = reasoner.m_step(train, q, steps=1, samples=1, batch_size=2, lora_rank=2, progress=False).model
        return f"prediction {reasoner.predict(['w7 w8'], q, likelihood=lik, samples=2).labels}"

    def red_team():
        from pilm.tasks.attack_reward import Victim
        from pilm.tasks.redteam import red_teaming

        rt = red_teaming(model, Victim(tiny_model(device, dtype), max_tokens=3, template="{system} {attack}"),
                         classifier=lambda x, y: torch.full((len(y),), 0.9, dtype=torch.float64),
                         victim_samples=1, max_tokens=3, min_tokens=1, prompt="w3", stop="w9")
        trained = pilm.finetune(rt.target, "tb", steps=1, batch_size=2, lora_rank=2, progress=False)
        tuned = rt.safety_tune(tiny_model(device, dtype), ["w3 w4", "w5"], steps=1, batch_size=2)
        return f"loss {trained.history[-1]['loss']:.4g}; safety-tuned victim on {tuned.model.device}"

    def beams():
        from pilm.inference.search import beam_search

        found = beam_search(model, model.encode_prompt("w3 w4"), beams=4, max_new_tokens=4, groups=2, diversity=0.5)
        return f"{len(found)} beams, best log p0 {found[0].log_p:.3f}"

    def cli():
        from pilm.commands.cli import main

        with tempfile.TemporaryDirectory() as tmp:
            fresh = tiny_model("cpu", dtype)  # fine-tuning injected adapters into ``model``; --device moves it
            fresh.hf.save_pretrained(tmp)
            fresh.tokenizer.save_pretrained(tmp)
            code = main(["sample", "--model", tmp, "--device", device, "--dtype", tag, "--prompt", "w3 w4",
                         "--max-new-tokens", "3", "--n-particles", "4", "--out", f"{tmp}/s.jsonl"])
            assert code == 0, f"exit {code}"
            return Path(f"{tmp}/s.jsonl").read_text().split('"device": ')[1].split(",")[0]

    check(f"[{tag}] padded cached decoding = each row's full forward", padded_decoding)
    check(f"[{tag}] particles share the prompt's KV cache = a per-row cache", shared_prompt_cache)
    check(f"[{tag}] SMC over two prompts: same seed, same draws; chunked", smc_same_and_chunked)
    check(f"[{tag}] masked SMC (regex)", masked)
    for kind in ("mlp", "tied"):
        check(f"[{tag}] twisted SMC, {kind} head", twisted(kind))
    for objective in OBJECTIVES:
        check(f"[{tag}] train-twist {objective} step, then twisted SMC", train_twist(objective))
    check(f"[{tag}] train-twist ctl with a LoRA body", train_twist("ctl", "lora"))
    for objective in FINETUNE_OBJECTIVES:
        check(f"[{tag}] finetune {objective} step, then SMC with the policy", finetune(objective))
    check(f"[{tag}] conditional twist (infilling ending) trained one step, twisted SMC", conditional)
    check(f"[{tag}] train-prm step, particle filters", prm_and_filters)
    check(f"[{tag}] particle filter with the model as its own judge (LMJudge)", judge)
    check(f"[{tag}] particle Gibbs with ancestor sampling", gibbs)
    check(f"[{tag}] rejection and bounds", rejection_and_bounds)
    check(f"[{tag}] latent E and M step", latent)
    check(f"[{tag}] red-team step and the victim's safety tuning", red_team)
    check(f"[{tag}] diverse beam search", beams)
    check(f"[{tag}] pilm sample --device {device} --dtype {tag}", cli)


TWO = """
import sys, torch, pilm
sys.path.insert(0, "scripts")
from gpu_smoke import tiny_model
from pilm.potentials import FunctionPotential
model = tiny_model(str(pilm.models.resolve_device()))
target = pilm.Target(model, "w3 w4", FunctionPotential(lambda s: -0.1 * s.count("w7"), name="p"), max_new_tokens=4)
trained = pilm.finetune(target, "subtb", steps=2, batch_size=2, lora_rank=2, progress=False,
                       checkpoint_dir=sys.argv[1], checkpoint_every=1)
print("rank", pilm.models.resolve_device(), "loss", trained.history[-1]["loss"])
"""


def two_processes() -> None:
    """``accelerate launch`` of a two-step fine-tuning on two GPUs (each rank on its own)."""
    if torch.cuda.device_count() < 2:
        print("skip two processes: one GPU here (NCCL needs a device per process)")
        return

    def run():
        with tempfile.TemporaryDirectory() as tmp:
            Path(f"{tmp}/two.py").write_text(TWO)
            out = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2",
                                  f"{tmp}/two.py", f"{tmp}/ckpt"], capture_output=True, text=True, timeout=300)
            assert out.returncode == 0, out.stderr[-2000:]
            return " | ".join(line for line in out.stdout.splitlines() if line.startswith("rank"))
    check("two processes (accelerate launch, finetune with checkpoints)", run)


def timing(device: str) -> None:
    """tokens/s of transformers generate, SMC and the particle filter, and peak memory, on a
    random model shaped like a 1.5B one (28 layers, hidden 1536, vocab 151,936) in bfloat16."""
    import pilm
    from pilm.potentials import FunctionPotential

    model = tiny_model(device, torch.bfloat16, words=151936, hidden=1536, layers=28, heads=12)
    def sevens(tokens) -> float:  # a cheap token-level potential, so the table times the engine, not a classifier
        return -0.05 * sum(1 for v in tokens if v % 7 == 0)

    soft = FunctionPotential(sevens, on="tokens", name="fewer multiples of 7", prefix_fn=sevens)
    cut = pilm.Steps(delimiter=model.encode("w10")[0], max_steps=64, max_step_tokens=16)
    print(f"timing on {model.name} ({sum(p.numel() for p in model.hf.parameters()) / 1e9:.2f}B parameters, bfloat16)")
    print(f"{'particles':>9} {'prompt':>6} {'generate tok/s':>15} {'smc tok/s':>10} {'pf tok/s':>9} "
          f"{'smc/gen':>8} {'pf/gen':>7} {'shared/smc':>10} {'GiB gen':>8} {'GiB smc':>8} {'GiB pf':>7} {'GiB shared':>10}")
    horizon = 64
    for n, length in ((64, 64), (256, 64), (1024, 64), (64, 512)):
        text = " ".join(f"w{3 + i % 60}" for i in range(length))
        ids = torch.tensor([model.encode_prompt(text)], device=device)
        target = pilm.Target(model, text, soft, max_new_tokens=horizon)
        chain = pilm.Target(model, text, soft, max_new_tokens=horizon, steps=cut)
        smc = partial(pilm.smc, target, n, seed=0, progress=False)

        def shared(smc=smc):
            with kv_cache(model, "shared"):
                smc()

        legs = {
            "gen": partial(model.hf.generate, ids.expand(n, -1), do_sample=True, max_new_tokens=horizon,
                           min_new_tokens=horizon, pad_token_id=2),
            "smc": smc,
            "pf": partial(pilm.particle_filter, chain, None, n, weights="twisted", seed=0),
            "shared": shared,
        }
        for leg in legs.values():
            leg()  # warm-up at this shape
        (gen, gen_mem), (t_smc, smc_mem), (pf, pf_mem), (t_shared, shared_mem) = (_timed(leg) for leg in legs.values())
        tokens = n * horizon
        print(f"{n:>9} {ids.shape[1]:>6} {tokens / gen:>15.0f} {tokens / t_smc:>10.0f} {tokens / pf:>9.0f} "
              f"{t_smc / gen:>8.2f} {pf / gen:>7.2f} {t_shared / t_smc:>10.2f} {gen_mem:>8.2f} {smc_mem:>8.2f} {pf_mem:>7.2f} "
              f"{shared_mem:>10.2f}", flush=True)


@contextlib.contextmanager
def kv_cache(model, how: str):
    """The model decoding with ``how`` ("shared": the prompt's KV once for all particles;
    "per-row": a copy per particle, the default on accelerators)."""
    before, model.kv_cache = model.kv_cache, how
    try:
        yield
    finally:
        model.kv_cache = before


def _timed(fn) -> tuple[float, float]:
    """Seconds and peak device memory (GiB) of one call."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t0, torch.cuda.max_memory_allocated() / 2**30


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--no-timing", action="store_true", help="skip the timing table and the two-process run")
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("no CUDA device here: run with --device cpu, or on a machine with a GPU")
    if args.device.startswith("cuda"):
        print(f"{torch.cuda.get_device_name(args.device)}, torch {torch.__version__}")
    with contextlib.ExitStack() as stack:
        if args.device.startswith("fakegpu"):
            from pilm.testing.fake_device import fake_accelerator

            stack.enter_context(fake_accelerator())
        for dtype in args.dtypes:
            verbs(args.device, getattr(torch, dtype))
    if not args.no_timing and args.device.startswith("cuda"):
        two_processes()
        check("timing table", lambda: timing(args.device))
    failed = [name for name, ok, _ in RESULTS if not ok]
    print(f"{len(RESULTS) - len(failed)} of {len(RESULTS)} checks passed on {args.device}"
          + (f"; failed: {', '.join(failed)}" if failed else ""))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
