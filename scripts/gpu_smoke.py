"""Smoke test of pilm on a GPU: a tiny random Llama built from a config (nothing downloaded).

    python scripts/gpu_smoke.py            # on cuda (the default)
    python scripts/gpu_smoke.py --device cpu

Checks, on the device: padded cached decoding equals each sequence's own full forward;
SMC and twisted SMC over two prompts in one batch give finite log Z-hat; one twist
training step (CTL) and one SubTB fine-tuning step run and change their weights; a
step-level particle filter (both weight rules) with a learned PRM on the device. Prints one
line per check and exits 1 on the first failure. Not part of ``make test``.
"""

from __future__ import annotations

import argparse
import math
import sys

import torch


def tiny_model(device: str):
    """A 2-layer Llama with a 64-word tokenizer made in memory."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from pilm.models import HFModel

    words = ["<s>", "</s>", "<pad>"] + [f"w{i}" for i in range(61)]
    raw = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<pad>"))
    raw.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(words), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, bos_token_id=0, eos_token_id=1, pad_token_id=2)
    return HFModel(LlamaForCausalLM(config).to(device).eval(), tokenizer, name=f"tiny-llama@{device}")


def check(name: str, ok: bool, detail: str = "") -> None:
    print(f"{'ok  ' if ok else 'FAIL'} {name}{': ' + detail if detail else ''}")
    if not ok:
        sys.exit(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    device = parser.parse_args().device
    if device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("no CUDA device here: run with --device cpu, or on a machine with a GPU")
    import pilm
    from pilm.models import decode_step
    from pilm.potentials import FunctionPotential

    model = tiny_model(device)
    prompts = [model.encode_prompt("w3 w4"), model.encode_prompt("w5 w6 w7 w8 w9")]
    state = model.start_many(prompts, 2)
    seqs = [list(p) for p in prompts for _ in range(2)]
    worst = 0.0
    for _ in range(3):
        for row, seq in enumerate(seqs):
            with torch.no_grad():
                full = torch.log_softmax(model.hf(input_ids=torch.tensor([seq], device=device)).logits[0, -1].float(), -1)
            worst = max(worst, float((state.logprobs[row] - full).abs().max()))
        parents, tokens = torch.tensor([1, 0, 3, 3]), torch.tensor([5, 6, 7, 8])
        seqs = [seqs[p] + [int(v)] for p, v in zip(parents.tolist(), tokens.tolist())]
        state = decode_step(model, state, parents, tokens)
    check("padded cached decoding equals the full forward", worst < 1e-3, f"max |diff| {worst:.2e}")

    soft = FunctionPotential(lambda t: -0.3 * t.count("w7"), name="fewer w7", prefix_fn=lambda t: -0.1 * t.count("w7"))
    targets = [pilm.Target(model, p, soft, max_new_tokens=6) for p in ("w3 w4", "w5 w6 w7 w8 w9")]
    results = pilm.smc(targets, 8, seed=0, progress=False)
    check("SMC over two prompts in one batch", all(math.isfinite(r.log_z) for r in results),
          ", ".join(f"log Z-hat {r.log_z:.3f}" for r in results))
    twist = pilm.train_twist(targets, "ctl", steps=2, batch_size=8, seed=0, progress=False)
    check("one CTL twist-training step", math.isfinite(twist.history[-1]["loss"]), f"loss {twist.history[-1]['loss']:.4g}")
    twisted = pilm.smc(targets, 8, twist=twist, seed=0, progress=False)
    check("twisted SMC", all(math.isfinite(r.log_z) for r in twisted), ", ".join(f"{r.log_z:.3f}" for r in twisted))
    policy = pilm.finetune(targets[0], "subtb", steps=1, batch_size=4, lora_rank=4, seed=0, progress=False)
    check("one SubTB fine-tuning step", math.isfinite(policy.history[-1]["loss"]),
          f"loss {policy.history[-1]['loss']:.4g}")
    from pilm.twists import Twist

    torch.manual_seed(0)
    head = Twist.for_model(model, kind="mlp", layers=2, output="log_sigmoid").to(device)
    cut = pilm.Steps(delimiter=model.encode("w10")[0], max_steps=3, max_step_tokens=3)
    chains = [pilm.Target(model, p, max_new_tokens=9, steps=cut) for p in ("w3 w4", "w5 w6 w7 w8 w9")]
    for weights in ("paper", "twisted"):
        res = pilm.particle_filter(chains, head, 8, weights=weights, seed=0)
        check(f"step-level particle filter ({weights}) with a learned PRM", all(math.isfinite(r.log_z) for r in res),
              ", ".join(f"log Z-hat {r.log_z:.3f}" for r in res) + f", held rows {res[0].info['held_rows']:.1f}")
    print(f"all checks passed on {device}")


if __name__ == "__main__":
    main()
