"""The command line as a new user meets it: one-line errors before any model loads, one
parser per command with the library's defaults, runs that say what they did."""

import inspect
import json

import pytest

import pilm
from pilm.commands.cli import COMMANDS, build_parser, main
from pilm.commands.cli_args import configs


@pytest.fixture
def no_model(monkeypatch):
    """Any model load fails the test: errors must come before it."""
    def refuse(*a, **k):
        raise AssertionError("the model was loaded before the error was found")

    monkeypatch.setattr(pilm, "load_model", refuse)


@pytest.fixture
def table_model(monkeypatch):
    """The CLI's model is a tabular LM (runs in milliseconds)."""
    model = pilm.models.TabularLM.random(4, seed=1, eos_id=3)
    monkeypatch.setattr(pilm, "load_model", lambda *a, **k: model)
    return model


def one_line_error(capsys, argv, match):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("pilm: error: ") and err.count("\n") == 1, err
    assert match in err, err
    return err


@pytest.mark.parametrize("argv, match", [
    (["sample", "--potential", "regex:(unclosed"], "invalid regular expression: missing )"),
    (["sample", "--potential", "sentiment:positive:abc"], "BETA must be a number >= 0, got 'abc'"),
    (["sample", "--potential", "sentiment:happy"], "sentiment label must be 'positive' or 'negative', got 'happy'"),
    (["sample", "--potential", "toxicity:rude"], "toxicity:rude"),
    (["sample", "--potential", "telepathy:yes"], "unknown potential spec 'telepathy:yes'"),
    (["sample", "--twist", "no/such/twist"], "--twist: no/such/twist does not exist; make it with: pilm train-twist"),
    (["sample", "--n-particles", "0"], "--n-particles must be >= 1, got 0"),
    (["sample", "--n-particles", "-3"], "--n-particles must be >= 1, got -3"),
    (["sample", "--max-new-tokens", "0"], "--max-new-tokens must be >= 1, got 0"),
    (["sample", "--ess-threshold", "1.5"], "--ess-threshold must be in [0, 1], got 1.5"),
    (["sample", "--top", "0"], "--top must be >= 1, got 0"),
    (["train-twist", "--steps", "0"], "--steps must be >= 1, got 0"),
    (["train-twist", "--lr", "0"], "--lr must be > 0, got 0"),
    (["finetune", "--lora-dropout", "2"], "--lora-dropout must be in [0, 1], got 2"),
    (["bounds", "--n-particles", "1", "0"], "--n-particles must be >= 1, got 0"),
    (["bounds", "--n-particles", "1,x"], "argument --n-particles: invalid int value: 'x'"),
    (["bounds", "--methods", "sis,bogus"], "argument --methods: invalid choice: 'bogus'"),
    (["finetune", "--explore", "0.5,0.5"], "--explore takes 3 values, got 2"),
    (["bounds", "--sampler", "nonsense"], "--sampler takes NAME=TWIST_DIR"),
    (["bounds", "--sampler", "ctl=no/such/twist"], "--sampler: no/such/twist does not exist"),
    (["sample", "--out", "/proc/pilm/results.jsonl"], "--out: cannot write /proc/pilm/results.jsonl"),
    (["sample", "--n-particles", "many"], "argument --n-particles: invalid int value: 'many'"),
    (["sample", "--resample", "magic"], "argument --resample: invalid choice: 'magic'"),
    (["latent", "--data", "no/such/folder"], "no/such/folder does not exist: give a folder with train.jsonl"),
    (["latent", "--labels", "7"], "train.7.jsonl does not exist"),
    (["latent", "--run", "no/such/run"], "--run: no/such/run holds no saved latent run"),
    (["latent", "--e-lr", "0"], "--e-lr must be > 0, got 0"),
    (["red-team", "--method", "ppo"], "argument --method: invalid choice: 'ppo'"),
    (["red-team", "--beta", "0"], "--beta must be > 0, got 0"),
    (["red-team", "--threshold", "2"], "--threshold must be in [0, 1], got 2"),
    (["sample", "--lookahead", "0.5"], "--lookahead scores a suffix:, sentiment: or toxicity: potential ahead"),
    (["train-twist", "--potential", "toxicity:toxic", "--lookahead", "1"], "or that a residual twist learns on"),
    (["train-twist", "--pool", "64", "--objective", "sixo"], "--pool gives ctl its positives; --objective sixo"),
    (["train-twist", "--residual", "-1"], "--residual must be >= 0, got -1"),
    (["train-twist", "--negatives", "smc"], "--negatives smc contrasts SMC populations with samples of sigma"),
    (["sample", "--potential", "suffix:x", "--lookahead", "-1"], "--lookahead must be >= 0, got -1"),
    (["sample", "--exact-last", "-2"], "--exact-last must be >= 0, got -2"),
    (["sample", "--rollouts", "4"], "--rollouts estimates E[phi | prefix]: give a --potential"),
    (["sample", "--potential", "suffix:x", "--rollouts", "4", "--lookahead", "1"], "--rollouts and --lookahead are"),
    (["sample", "--rollouts", "-1"], "--rollouts must be >= 0, got -1"),
    (["train-skip", "--steps", "-1"], "--steps must be >= 0, got -1"),
])
def test_every_mistake_is_one_line_exit_2_before_the_model_loads(capsys, no_model, argv, match):
    one_line_error(capsys, argv, match)


def test_an_output_path_that_is_a_folder(capsys, no_model, tmp_path):
    one_line_error(capsys, ["sample", "--out", str(tmp_path)], "is a folder; give a file")


def test_a_folder_that_holds_no_twist(capsys, no_model, tmp_path):
    one_line_error(capsys, ["sample", "--twist", str(tmp_path)], "holds no saved twist (twist_config.json is missing)")


def test_unknown_model_is_one_line(capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    one_line_error(capsys, ["sample", "--model", "no-such-org/no-such-model", "--potential", "regex:a"],
                   "could not load model 'no-such-org/no-such-model'")


@pytest.mark.parametrize("flag", ["--n-particles", "--resample", "--top", "--twist", "--plot"])
def test_train_twist_has_only_its_own_flags(capsys, flag):
    assert main(["train-twist", flag, "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("pilm: error: unrecognized arguments") and err.count("\n") == 1


def test_unknown_command_is_one_line(capsys):
    assert main(["teleport"]) == 2 and capsys.readouterr().err.count("\n") == 1


@pytest.mark.parametrize("command", ["sample", "train-twist", "train-skip", "finetune", "bounds", "bench"])
def test_help_shows_defaults(capsys, command):
    assert main([command, "--help"]) == 0
    out = capsys.readouterr().out
    assert "(default: " in out and "--seed" in out or command == "bench"
    if command not in ("bench", "train-skip"):
        assert "Potential specs: regex:PATTERN" in out and "--prompt" in out


LIBRARY = {"sample": pilm.smc, "train-twist": pilm.train_twist, "train-skip": pilm.train_skip_model,
           "finetune": pilm.finetune, "bounds": pilm.bounds,
           "train-prm": pilm.train_prm, "latent": pilm.latent.LatentReasoner.em,
           "red-team": pilm.tasks.red_teaming.train_attacker}


@pytest.mark.parametrize("command", list(LIBRARY))
def test_every_cli_default_is_the_librarys(command):
    args = build_parser().parse_args([command])
    made = configs(args, COMMANDS[command][2])
    library = inspect.signature(LIBRARY[command]).parameters
    target = inspect.signature(pilm.Target).parameters
    checked = 0
    for config in made:
        for name, value in vars(config).items():
            where = library if name in library else target if name in target else None
            if where is None or where[name].default is inspect.Parameter.empty:
                continue
            default = where[name].default
            assert default == value or (default is None and value == ()), (command, name, default, value)
            checked += 1
    assert checked >= 4


def test_list_flags_take_spaces_or_commas():
    parse = build_parser().parse_args
    bounds = configs(parse(["bounds", "--n-particles", "1,4", "16", "--methods", "sis"]), COMMANDS["bounds"][2])[1]
    assert bounds.n_particles == (1, 4, 16) and bounds.methods == ("sis",)
    ft = configs(parse(["finetune", "--reward-temperature", "1.1,0.5", "--explore", "0.25", "0.5", "0.25"]),
                 COMMANDS["finetune"][2])[1]
    assert ft.reward_temperature == (1.1, 0.5) and ft.explore == (0.25, 0.5, 0.25)
    sample = configs(parse(["sample", "--potential", "regex:[^,]*", "--potential", "sentiment:positive"]),
                     COMMANDS["sample"][2])[0]
    assert sample.potential == ("regex:[^,]*", "sentiment:positive")  # a spec keeps its commas


def test_a_run_says_what_it_did(capsys, table_model):
    assert main(["sample", "--n-particles", "4", "--max-new-tokens", "3"]) == 0
    out, err = capsys.readouterr()
    assert "pilm: note: no --prompt" in err and "pilm: note: no --potential: phi = 1" in err
    assert main(["sample", "--n-particles", "4", "--max-new-tokens", "3", "--mask"]) == 0
    assert "--mask without a --potential" in capsys.readouterr().err
    assert "plain sampling" in out
    assert main(["sample", "--prompt", "a", "--potential", "suffix:ab", "--n-particles", "4", "--max-new-tokens", "2"]) == 0
    out = capsys.readouterr().out
    assert "no prefix score: importance weights until the last token" in out
    assert "[the infilled middle]" in out and "ab'" in out.split("top samples")[1].splitlines()[1]
    assert main(["sample", "--prompt", "a", "--potential", "regex:[ab]*c", "--mask", "--n-particles", "4",
                 "--max-new-tokens", "3"]) == 0
    out = capsys.readouterr().out
    assert "masked proposal" in out
    assert all(line.rstrip("'").endswith("c") for line in out.split("top samples")[1].splitlines()[1:3])
    assert main(["sample", "--prompt", "a", "--potential", "suffix:ab", "--lookahead", "0.5", "--exact-last", "3",
                 "--n-particles", "4", "--max-new-tokens", "2"]) == 0
    out = capsys.readouterr().out
    assert "suffix('ab')^lookahead 0.5" in out and "proposal exact-last (top 3)" in out
    assert main(["sample", "--prompt", "a", "--potential", "suffix:ab", "--rollouts", "3", "--n-particles", "4",
                 "--max-new-tokens", "2"]) == 0
    assert "suffix('ab') with a 3-rollout look-ahead" in capsys.readouterr().out


def test_train_twist_writes_a_small_twist_that_knows_its_target(capsys, table_model, tmp_path):
    out = tmp_path / "tw"
    args = ["--prompt", "a", "--potential", "regex:[ab]*", "--max-new-tokens", "3"]
    assert main(["train-twist", *args, "--steps", "2", "--batch-size", "4", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert not (out / "checkpoint").exists() and " MB: twist, train.jsonl" in printed
    saved = json.loads((out / "twist_config.json").read_text())["trained_for"]
    assert saved == {"prompt": "a", "potential": "regex('[ab]*')", "max_new_tokens": 3}
    assert main(["sample", "--prompt", "b", "--potential", "regex:[ab]*", "--max-new-tokens", "3",
                 "--n-particles", "4", "--twist", str(out)]) == 0
    assert "pilm: warning: this twist was trained for prompt 'a'" in capsys.readouterr().err


def test_train_twist_learns_a_residual_on_a_replay_pool_that_sample_reads(capsys, table_model, tmp_path):
    out = tmp_path / "residual"
    args = ["--prompt", "a", "--potential", "regex:[ab]*", "--max-new-tokens", "3"]  # a regex has a prefix score
    assert main(["train-twist", *args, "--residual", "0.5", "--pool", "300", "--init", "base", "--steps", "2",
                 "--batch-size", "4", "--out", str(out)]) == 0
    assert "trained a residual mlp twist on the look-ahead" in capsys.readouterr().out
    assert json.loads((out / "residual_config.json").read_text()) == {"powers": 0.5, "propose": "head"}
    assert main(["sample", *args, "--n-particles", "4", "--twist", str(out)]) == 0
    assert "pilm: warning" not in capsys.readouterr().err  # trained for this very target


def test_bounds_on_sampled_endings_say_so(capsys, table_model):
    assert main(["bounds", "--prompt", "a", "--potential", "suffix:ab", "--max-new-tokens", "2", "--n-particles",
                 "1", "2", "--seeds", "2", "--methods", "sis"]) == 0
    assert "bounds on E_c[log Z(c)] over endings c sampled from the model" in capsys.readouterr().out


def test_an_interrupted_train_prm_resumes_its_collection(capsys, monkeypatch, fresh_tiny, tmp_path):
    """Stopped in its rollouts, train-prm keeps the chains and labels so far and says how to
    resume; a rerun, even with other head settings and --overwrite, draws only the rest and
    removes them once the head is saved."""
    from pilm.learning import prm_trainer

    monkeypatch.setattr(pilm, "load_model", lambda *a, **k: fresh_tiny)
    real, calls = prm_trainer.sample_chains, []

    def interrupted(*a, **k):
        calls.append(a[2] is None)  # a rollout batch runs without a PRM
        if calls == [False, True]:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(prm_trainer, "sample_chains", interrupted)
    out = tmp_path / "prm"
    argv = ["train-prm", "--problems", "2", "--rollouts", "1", "--steps", "1", "--out", str(out)]
    assert main(argv) == 130
    assert f"{out / 'collection.safetensors'} is kept; resume with: pilm train-prm" in capsys.readouterr().err
    assert (out / "collection.safetensors").exists()
    assert main([*argv, "--steps", "2"]) == 2  # the head's settings are the run's too
    assert main([*argv, "--steps", "2", "--overwrite"]) == 0  # but the collection does not depend on them: kept
    assert calls[2:] == [True] * (len(calls) - 2) and len(calls) > 2  # no chain batch again
    assert not (out / "collection.safetensors").exists() and (out / "twist.safetensors").exists()


def test_train_prm_refuses_a_folder_of_other_settings(capsys, monkeypatch, fresh_tiny, tmp_path):
    monkeypatch.setattr(pilm, "load_model", lambda *a, **k: fresh_tiny)
    argv = ["train-prm", "--problems", "2", "--rollouts", "1", "--steps", "1", "--out", str(tmp_path / "prm")]
    assert main(argv) == 0
    assert json.loads((tmp_path / "prm" / "run.json").read_text())["rollouts"] == 1
    assert main([*argv, "--rollouts", "2"]) == 2
    assert "holds a run of other settings (--rollouts 1 there, 2 now)" in capsys.readouterr().err
    assert main([*argv, "--rollouts", "2", "--overwrite"]) == 0
    from pilm.tasks import arithmetic_chain

    trained = json.loads((tmp_path / "prm" / "training.json").read_text())
    assert (trained["chat"], trained["operands"], len(trained["questions"])) == (False, [3, 5], 2)
    assert main([*argv, "--problem-seed", "0", "--out", str(tmp_path / "seed0")]) == 0  # scale's own seed
    held_out = {p["question"] for p in arithmetic_chain.problems(1000, (3, 5), seed=0)}
    assert not held_out & set(json.loads((tmp_path / "seed0" / "training.json").read_text())["questions"])
    assert main([*argv, "--operands", "2,2", "--out", str(tmp_path / "few")]) == 0  # 197 problems in all
    capsys.readouterr()
    assert main([*argv, "--rollouts", "2", "--chat"]) == 2  # the prompts are the run's settings
    assert "(--chat False there, True now)" in capsys.readouterr().err
    assert main([*argv, "--chat", "--operands", "6,7", "--out", str(tmp_path / "chat")]) == 0
    trained = json.loads((tmp_path / "chat" / "training.json").read_text())
    assert trained["chat"] is True and trained["operands"] == [6, 7]
    assert all(5 <= q.count(" ") // 2 <= 6 for q in trained["questions"])  # 6 or 7 operands: 5 or 6 operators


def test_latent_trains_saves_and_scores_a_saved_run_on_any_file(capsys, monkeypatch, fresh_tiny, tmp_path):
    """pilm latent on a tiny random Llama with the real tokenizer: one EM round, the run saved
    in peft format, then --run ... --test FILE scores sentences it never saw."""
    monkeypatch.setattr(pilm, "load_model", lambda *a, **k: fresh_tiny)
    run = tmp_path / "run"
    assert main(["latent", "--labels", "10", "--e-steps", "1", "--m-steps", "1",
                 "--m-samples", "2", "--samples", "2", "--test-limit", "3", "--out", str(run)]) == 0
    out = capsys.readouterr().out
    assert "round 1 E-step: ELBO" in out and "round 1 M-step" in out and "on 3 items" in out
    for name in ("latent.json", "history.jsonl", "em.png", "predictions.jsonl", "posterior/adapter_model.safetensors",
                 "likelihood/adapter_config.json", "run.json"):
        assert (run / name).exists(), name
    assert main(["latent", "--labels", "10", "--e-steps", "1", "--m-steps", "1", "--m-samples", "2", "--samples", "2",
                 "--test-limit", "3", "--e-lr", "0.001", "--out", str(run)]) == 2  # refused before training
    assert "holds a run of other settings (--e-lr 0.0005 there, 0.001 now); rerun with the same flags, or" \
        in capsys.readouterr().err
    other = tmp_path / "mine.jsonl"
    other.write_text('{"text": "a dull , lifeless film .", "label_text": "subjective"}\n'
                     '{"text": "she moves to paris .", "label": 0}\n')
    assert main(["latent", "--run", str(run), "--test", str(other), "--samples", "2", "--out", str(tmp_path / "eval")]) == 0
    assert "on 2 items" in capsys.readouterr().out
    rows = [json.loads(line) for line in (tmp_path / "eval" / "predictions.jsonl").read_text().splitlines()]
    assert [r["label_text"] for r in rows] == ["subjective", "objective"]
    assert all(r["predicted"] in ("objective", "subjective") for r in rows)


def test_red_team_trains_an_attacker_and_reports_it(capsys, monkeypatch, tmp_path):
    """pilm red-team on tiny random Llamas with the real tokenizer (attacker and victim
    separate objects): a report, every attack with its toxicity, and the adapter."""
    from transformers import LlamaForCausalLM

    from pilm.models import HFModel

    made = []

    def tiny_model(*a, **k):
        import torch

        from pilm.models.registry import embedded_path
        from transformers import AutoTokenizer, LlamaConfig

        tok = AutoTokenizer.from_pretrained(embedded_path())
        torch.manual_seed(len(made))
        cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, bos_token_id=tok.bos_token_id,
                          eos_token_id=tok.eos_token_id)
        made.append(HFModel(LlamaForCausalLM(cfg).float(), tok, name=f"tiny{len(made)}"))
        return made[-1]

    monkeypatch.setattr(pilm, "load_model", tiny_model)
    out = tmp_path / "rt"
    assert main(["red-team", "--method", "gfn", "--steps", "1", "--batch-size", "2", "--victim-samples", "1",
                 "--n", "4", "--out", str(out)]) == 0
    assert "gfn: toxicity rate" in capsys.readouterr().out and len(made) == 2
    report = json.loads((out / "report.json").read_text())
    assert report["n"] == 4 and 0 <= report["diversity"] <= 1
    rows = [json.loads(line) for line in (out / "attacks.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and all(0 <= r["toxicity"] <= 1 for r in rows)
    assert (out / "adapter_model.safetensors").exists()
