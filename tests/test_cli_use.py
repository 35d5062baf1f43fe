"""The command line under real use: no default run exhausts memory, reruns never mix settings,
interrupts lose nothing and say how to resume, and every message is for its reader."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

import pilm
from pilm.commands.cli import main
from pilm.errors import TooLargeError
from pilm.evaluation.bounds import resolve_exact_samples
from pilm.potentials import Grammar, Regex, Sentiment

GIB = 2**30


def test_auto_exact_samples_decides_without_running_the_model(tiny, monkeypatch):
    """'auto' never enumerates a real vocabulary: with V = 49,152 and T = 2 it picks rejection
    from sum_t V^t alone, before any forward (one used to build 49,152 KV rows, 18.8 GB on the
    embedded model)."""
    monkeypatch.setattr(tiny, "start", lambda *a, **k: pytest.fail("auto ran the model to decide"))
    target = pilm.Target(tiny, "The movie was", Sentiment("positive"), max_new_tokens=2)
    assert resolve_exact_samples(target, "auto") == "rejection"
    small = pilm.Target(pilm.models.TabularLM.random(4, seed=0, eos_id=3), "a", Regex("[ab]*"), max_new_tokens=4)
    assert resolve_exact_samples(small, "auto") == "enumerate"


def test_enumeration_refuses_prefixes_that_do_not_fit_before_advancing_them(monkeypatch):
    model = pilm.models.TabularLM.random(4, seed=0, eos_id=3)
    monkeypatch.setattr(model, "max_rows", lambda length, **_: 2)
    target = pilm.Target(model, "a", Regex("[ab]*"), max_new_tokens=4)
    with pytest.raises(TooLargeError, match="would advance 3 prefixes at step 2; at most 2 fit in the device's memory"):
        pilm.exact.log_z(target)


MEASURE = ("import resource, subprocess, sys; done = subprocess.run(sys.argv[1:]); "
           "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(done.returncode)")


def peak_gib(argv: list[str], cwd) -> tuple[float, subprocess.CompletedProcess]:
    """Run ``pilm argv`` under a wrapper process whose only child it is; the command's peak
    resident memory in GiB (Linux reports ru_maxrss in KiB)."""
    done = subprocess.run([sys.executable, "-c", MEASURE, sys.executable, "-m", "pilm.commands.cli", *argv], cwd=cwd,
                          capture_output=True, text=True)
    return int(done.stdout.strip().splitlines()[-1]) / 2**20, done


# Each command of the README, cut to its smallest run (one step, one seed, few particles): peak
# memory depends on the model, rows and vocabulary, not on how long a run is. Budget: 4 GiB each.
# latent (40 s) and red-team (12 s: two models and a classifier) at one step each; demo is left
# out, as test_real_model.py runs it in full (1.94 GiB peak measured by this test before it was cut).
DOCUMENTED = {
    "sample": ["sample", "--prompt", "The movie was", "--potential", "sentiment:positive:10", "--n-particles", "32",
               "--max-new-tokens", "8"],
    "sample-json-mask": ["sample", "--chat", "--prompt", "The weather in Oslo as JSON", "--potential",
                         'json:{"type": "object"}', "--mask"],  # the README's horizon: at 8 tokens all may die
    "train-twist": ["train-twist", "--prompt", "The movie was", "--potential", "sentiment:positive:10",
                    "--max-new-tokens", "8", "--steps", "1", "--out", "tw"],
    "bounds": ["bounds", "--prompt", "The movie was", "--potential", "sentiment:positive", "--max-new-tokens", "4",
               "--n-particles", "1,4", "--seeds", "1"],
    "finetune": ["finetune", "--task", "random-number", "--objective", "subtb", "--steps", "1", "--batch-size", "4",
                 "--out", "policy"],
    "scale": ["scale", "--methods", "sc,pf", "--n", "4", "--problems", "1", "--out", "scale"],
    "train-prm": ["train-prm", "--problems", "2", "--chains", "1", "--rollouts", "1", "--steps", "1", "--out", "prm"],
    "latent": ["latent", "--labels", "10", "--e-steps", "1", "--m-steps", "1", "--m-samples", "2", "--samples", "2",
               "--test-limit", "3", "--out", "latent"],
    "red-team": ["red-team", "--method", "gfn", "--steps", "1", "--batch-size", "2", "--victim-samples", "1", "--n", "2",
                 "--out", "red-team"],
}


@pytest.mark.slow
@pytest.mark.parametrize("command", DOCUMENTED)
def test_each_documented_command_stays_within_its_memory_budget(command, tmp_path):
    """Each command as the README writes it (bounds with the default --exact-samples auto, which
    once reached 18.8 GB), cut to its smallest run: it finishes, under 4 GiB of peak memory."""
    gib, done = peak_gib(DOCUMENTED[command], tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert gib < 4, f"{command}: peak {gib:.2f} GiB"
    print(f"{command}: peak {gib:.2f} GiB")


@pytest.fixture
def table_model(monkeypatch):
    """The CLI's model is a tabular LM (runs in milliseconds)."""
    model = pilm.models.TabularLM.random(4, seed=1, eos_id=3)
    monkeypatch.setattr(pilm, "load_model", lambda *a, **k: model)
    return model


def log(folder) -> list[dict]:
    """A training log without its timings (the rest is bit-identical between equal runs)."""
    return [{k: v for k, v in json.loads(line).items() if k != "seconds"}
            for line in (folder / "train.jsonl").read_text().splitlines()]


TWIST = ["train-twist", "--prompt", "a", "--potential", "regex:[ab]*", "--max-new-tokens", "3", "--batch-size", "4",
         "--checkpoint-every", "1"]


def test_a_rerun_with_other_settings_is_refused_naming_them_and_the_ways_out(table_model, capsys, tmp_path):
    """train-twist, interrupted (its checkpoint kept), then rerun into the same --out with another
    potential and learning rate: refused, one line naming both flags; the same flags resume to
    exactly the uninterrupted run; --overwrite starts afresh."""
    out = str(tmp_path / "tw")
    assert main([*TWIST, "--steps", "2", "--keep-checkpoint", "--out", out]) == 0
    capsys.readouterr()
    assert main([*TWIST[:4], "regex:[ac]*", *TWIST[5:], "--lr", "0.01", "--steps", "4", "--out", out]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--out {out} holds a run of other settings" in err, err
    assert "--potential \"regex('[ab]*')\" there, \"regex('[ac]*')\" now" in err and "--lr 0.001 there, 0.01 now" in err
    assert "rerun with the same flags to resume it, or use --out elsewhere or --overwrite" in err
    assert main([*TWIST, "--steps", "4", "--out", out]) == 0
    assert main([*TWIST, "--steps", "4", "--out", str(tmp_path / "straight")]) == 0
    assert log(tmp_path / "tw") == log(tmp_path / "straight") and len(log(tmp_path / "tw")) == 4
    assert main([*TWIST[:4], "regex:[ac]*", *TWIST[5:], "--steps", "1", "--overwrite", "--out", out]) == 0


def test_an_interrupt_is_one_line_with_exit_130_and_says_how_to_resume(table_model, capsys, monkeypatch, tmp_path):
    def interrupted(*a, **k):
        raise KeyboardInterrupt

    out = tmp_path / "new" / "tw"
    monkeypatch.setattr(pilm, "train_twist", interrupted)
    assert main([*TWIST, "--out", str(out)]) == 130
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("pilm: interrupted; nothing was saved; start again with: pilm "), err
    assert not (tmp_path / "new").exists()  # the folder the run made is gone with it
    (out / "checkpoint").mkdir(parents=True)  # made before any save: nothing to resume yet
    assert main([*TWIST, "--overwrite", "--out", str(out)]) == 130
    assert "nothing was saved" in capsys.readouterr().err
    (out / "checkpoint" / "checkpoint").mkdir()
    (out / "checkpoint" / "checkpoint" / "state.json").write_text("{}")  # a complete save
    assert main([*TWIST, "--overwrite", "--out", str(out)]) == 130
    err = capsys.readouterr().err
    assert f"{out / 'checkpoint'} is kept; resume with: pilm train-twist --prompt a" in err
    assert "--overwrite" not in err  # rerunning with it would delete what was kept


def test_a_failed_command_leaves_no_empty_folder(table_model, capsys, tmp_path):
    assert main(["latent", "--labels", "7", "--out", str(tmp_path / "runs" / "l7")]) == 2
    assert "train.7.jsonl does not exist" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_a_run_that_dies_at_the_horizon_exits_non_zero_and_names_the_horizon(tiny, monkeypatch, capsys):
    """Exactly 40 characters in 2 tokens: the shortest-completion bound cannot refuse it (a
    token of this vocabulary has up to 81 characters), but with the mask every particle lives
    until the horizon and a random model almost never lands on exactly 40. The advice names
    the horizon, as a flag; the exit code is 1, or 0 when asked to return."""
    monkeypatch.setattr(pilm, "load_model", lambda *a, **k: tiny)
    argv = ["sample", "--prompt", "a", "--potential", "regex:.{40}", "--mask", "--max-new-tokens", "2",
            "--n-particles", "2", "--on-extinction"]
    assert main([*argv, "warn"]) == 1
    captured = capsys.readouterr()
    warning = [line for line in captured.err.splitlines() if line.startswith("pilm: warning:")]
    assert len(warning) == 1 and "none completes the potential within --max-new-tokens 2: raise that horizon" \
        in warning[0], captured.err
    assert "none: every particle died" in captured.out
    assert main([*argv, "return"]) == 0


def test_a_constraint_longer_than_the_horizon_is_refused_before_sampling(tiny, monkeypatch, capsys):
    """50 digits need 50 tokens of a tokenizer that writes one digit per token: refused with
    the shortest completion before any particle is drawn (it used to sample to the horizon and
    exit 0 with no samples)."""
    monkeypatch.setattr(tiny, "start", lambda *a, **k: pytest.fail("sampled an impossible target"))
    monkeypatch.setattr(pilm, "load_model", lambda *a, **k: tiny)
    assert main(["sample", "--potential", "regex:[0-9]{50}", "--mask", "--max-new-tokens", "16"]) == 2
    assert ("regex('[0-9]{50}') cannot be met within --max-new-tokens 16: every completion it accepts needs at "
            "least 50 tokens") in capsys.readouterr().err


def test_the_shortest_completion_bound_is_a_lower_bound():
    """On a tabular model every completion can be enumerated: the bound never exceeds the
    shortest accepted completion, for plain, class, alternation, negated and spaced patterns;
    syntax the stdlib parser reads differently from the engines gets no bound at all (a scoped
    flag once made (?i:x){16} need 16 tokens where two 8-character tokens match)."""
    from pilm.potentials.shortest import min_new_tokens

    model = pilm.models.TabularLM.random(4, seed=0, eos_id=3)
    for pattern in ("[ab]*c[ab]{3}", "(ab|c)a{2}", "[^c]{3}", "a.b", "c+", "[ab ]{2}c"):
        target = pilm.Target(model, "a", Regex(pattern), max_new_tokens=6)
        shortest = min(len(s) - (s[-1] == 3) for s in pilm.exact.distribution(target))
        assert 0 < min_new_tokens(pattern, model, horizon=0) <= shortest, pattern
    for pattern in ("(?i:A){3}", "(?i)A{3}", "(?=a)a{3}", "a{e<=1}", "[[:alpha:]]{3}"):
        assert min_new_tokens(pattern, model, horizon=0) == 0, pattern


def test_the_token_automaton_search_finds_the_shortest_completion():
    """Regex, grammar and JSON alike: on a tabular model the breadth-first search over the token
    automaton opens few texts, so its bound is the exact shortest completion enumeration finds
    (past the horizon it is only a lower bound: horizon + 1)."""
    model = pilm.models.TabularLM.random(4, seed=0, eos_id=3)
    for potential in (Regex("(ab|c)a{2}"), Regex("[ab]*c[ab]{3}"), Grammar('root ::= "ab" [ab]* "c" | "c" "c"*'),
                      Grammar('root ::= ("a" | "bc") ("a" | "b")')):
        target = pilm.Target(model, "a", potential, max_new_tokens=6)
        shortest = min(len(s) - (s[-1] == 3) for s in pilm.exact.distribution(target))
        assert potential.min_new_tokens(model, 6) == shortest, potential
        assert 1 <= potential.min_new_tokens(model, 0) <= shortest, potential
    assert Regex("z+").min_new_tokens(model, 6) == Grammar('root ::= "z"').min_new_tokens(model, 6) == math.inf


def test_a_grammar_longer_than_the_horizon_is_refused_before_sampling(tiny, monkeypatch, capsys):
    """A forced 40-digit literal, one digit per token of the real tokenizer: the search follows
    the one path past the horizon and the target is refused before any particle is drawn."""
    monkeypatch.setattr(tiny, "start", lambda *a, **k: pytest.fail("sampled an impossible target"))
    monkeypatch.setattr(pilm, "load_model", lambda *a, **k: tiny)
    literal = "0123456789" * 4
    assert main(["sample", "--potential", f'grammar:root ::= "{literal}"', "--mask", "--max-new-tokens", "16"]) == 2
    assert "every completion it accepts needs at least 17 tokens" in capsys.readouterr().err


def test_an_impossible_target_says_the_horizon(table_model, capsys):
    """A look-ahead the bound cannot read: exact enumeration shows Z = 0, and says within what."""
    assert main(["sample", "--prompt", "a", "--potential", "regex:(?=b)a", "--max-new-tokens", "2"]) == 2
    assert "completions within --max-new-tokens 2 gives Z = 0" in capsys.readouterr().err


def test_library_messages_name_flags_on_the_command_line():
    from pilm.commands.cli import SETTINGS
    from pilm.commands.cli_messages import for_cli

    assert for_cli("use exact_samples='joint' within max_new_tokens=4", SETTINGS) == \
        "use --exact-samples 'joint' within --max-new-tokens 4"
    assert for_cli("a=1 and not_a_setting=2", SETTINGS) == "a=1 and not_a_setting=2"


def test_version_and_did_you_mean(capsys):
    with pytest.raises(SystemExit) as done:
        from pilm.commands.cli import build_parser

        build_parser().parse_args(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.strip() == f"pilm {pilm.__version__}"
    assert main(["sampel"]) == 2
    assert "invalid choice: 'sampel'" in (err := capsys.readouterr().err) and "did you mean sample?" in err
    assert main(["sample", "--resample", "sytematic"]) == 2
    assert "did you mean systematic?" in capsys.readouterr().err
    assert main(["train-twist", "--n-particles", "8"]) == 2
    assert "unrecognized arguments: --n-particles 8" in (err := capsys.readouterr().err) and "did you mean" not in err
    assert main(["sample", "--outt", "x.jsonl"]) == 2
    assert "did you mean --out?" in capsys.readouterr().err


def test_cli_and_library_append_runs_to_one_jsonl_with_what_produced_them(table_model, capsys, tmp_path):
    out = tmp_path / "runs.jsonl"
    assert main(["sample", "--prompt", "a", "--potential", "regex:[ab]*", "--max-new-tokens", "3", "--seed", "4",
                 "--out", str(out)]) == 0
    res = pilm.smc(pilm.Target(table_model, "b", "regex:[ab]*", max_new_tokens=2), 4, seed=5, progress=False)
    res.to_jsonl(out)  # appends, as --out does: the CLI's run is kept
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["info"]["prompt"], r["info"]["seed"]) for r in rows] == [("a", 4), ("b", 5)]
    for r in rows:
        assert {"chat", "model", "dtype", "potential", "max_new_tokens", "resample", "ess_threshold"} <= set(r["info"])
    res.to_jsonl(out, append=False)
    assert len(out.read_text().splitlines()) == 1


def test_sample_from_a_fine_tuned_adapter(fresh_tiny, monkeypatch, capsys, tmp_path):
    """finetune writes an adapter; sample --adapter proposes from it and weights to sigma. A
    folder that is not an adapter is refused before the model loads, naming the command that
    makes one."""
    monkeypatch.setattr(pilm, "load_model", lambda *a, **k: fresh_tiny)
    target = ["--prompt", "The", "--potential", "regex:[a-z ]*", "--max-new-tokens", "3"]
    assert main(["finetune", *target, "--steps", "1", "--batch-size", "2", "--out", str(tmp_path / "policy")]) == 0
    capsys.readouterr()
    assert main(["sample", *target, "--n-particles", "4", "--on-extinction", "return", "--adapter",
                 str(tmp_path / "policy")]) == 0
    assert f"proposals from the fine-tuned policy {tmp_path / 'policy'}, weighted to sigma" in capsys.readouterr().out
    monkeypatch.setattr(pilm, "load_model", lambda *a, **k: pytest.fail("loaded the model before the error"))
    assert main(["sample", "--adapter", str(tmp_path)]) == 2
    assert f"--adapter: {tmp_path} holds no adapter (adapter_config.json is missing); fine-tune one with: pilm " \
           f"finetune ... --out {tmp_path}" in capsys.readouterr().err


def test_train_skip_then_sample_with_its_look_ahead(fresh_tiny, monkeypatch, capsys, tmp_path):
    """train-skip writes a skip model for a prompt and horizon; sample --skip resamples on it for
    any ending; another horizon is refused naming what it was trained for."""
    monkeypatch.setattr(pilm, "load_model", lambda *a, **k: fresh_tiny)
    folder = tmp_path / "skip"
    assert main(["train-skip", "--prompt", "Once", "--max-new-tokens", "3", "--suffix-tokens", "2", "--steps", "2",
                 "--batch-size", "2", "--out", str(folder)]) == 0
    out = capsys.readouterr().out
    assert "trained a skip model for 2 steps of 2 joint draws" in out and f"--skip {folder}" in out
    assert json.loads((folder / "training.json").read_text())["max_new_tokens"] == 3
    assert not (folder / "checkpoint").exists()
    sample = ["sample", "--prompt", "Once", "--potential", "suffix: upon", "--n-particles", "4", "--skip", str(folder)]
    assert main([*sample, "--max-new-tokens", "3"]) == 0
    assert f"SMC on the skip model's look-ahead ({folder})" in capsys.readouterr().out
    assert main([*sample, "--max-new-tokens", "4"]) == 2
    assert "trained for middles of 3 tokens after its own prompt; this target has 4" in capsys.readouterr().err
    assert main(["sample", "--prompt", "Once", "--potential", "regex:a", "--skip", str(folder)]) == 2
    assert "--skip looks ahead for an ending: give it, and no other potential, with --potential suffix:TEXT" in \
        capsys.readouterr().err
    assert main([*sample, "--max-new-tokens", "3", "--rollouts", "2"]) == 2
    assert "--skip is the prefix score: leave out --twist, --adapter, --lookahead and --rollouts" in capsys.readouterr().err
    assert main([*sample, "--max-new-tokens", "3", "--potential", "regex:a*"]) == 2
    assert "--skip looks ahead for an ending: give it, and no other potential" in capsys.readouterr().err
    assert main([*sample, "--max-new-tokens", "3", "--exact-last", "2"]) == 0
    assert f"proposal exact-last (top 2), skip model's look-ahead ({folder})" in capsys.readouterr().out
    assert main(["train-skip", "--prompt", "Once", "--max-new-tokens", "3", "--steps", "0", "--out",
                 str(tmp_path / "untrained")]) == 0
    assert "(untrained: it scores as p0 does)" in capsys.readouterr().out
    assert main(["train-skip", "--potential", "suffix:x"]) == 2  # it learns every ending: no potential to give
    assert "unrecognized arguments: --potential suffix:x" in capsys.readouterr().err


@pytest.mark.parametrize("argv, match", [
    (["sample", "--potential", "sentiment:positive", "--mask"],
     "--mask: no --potential is a hard constraint (regex:, json:, grammar:), so there is nothing to mask"),
    (["finetune", "--task", "arithmetic", "--prompt", "X"],
     "--task arithmetic brings its own prompt and potential: leave out --prompt and --potential"),
    (["sample", "--plot", "plot.txt"], "--plot: plot.txt is not a picture file; end it in one of .png"),
    (["sample", "--potential", "regex:"], "potential spec 'regex:': nothing after 'regex:'"),
    (["sample", "--potential", "suffix:"], "potential spec 'suffix:': nothing after 'suffix:'"),
    (["sample", "--potential", "json:notes.txt"], "potential spec 'json:notes.txt': no file notes.txt (nor an inline JSON schema)"),
    (["sample", "--adapter", "nowhere"], "--adapter: nowhere does not exist; fine-tune one with: pilm finetune ... --out nowhere"),
    (["sample", "--skip", "nowhere"], "--skip: nowhere does not exist; train one with: pilm train-skip ... --out nowhere"),
    (["sample", "--skip", "."], "--skip: . holds no skip model (skip_config.json is missing)"),
])
def test_validation_gaps_are_one_line_before_the_model_loads(argv, match, capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(pilm, "load_model", lambda *a, **k: pytest.fail("loaded the model before the error"))
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("pilm: error: ") and err.count("\n") == 1 and match in err, err


def test_a_horizon_past_the_context_is_refused(tiny):
    limit = tiny.context_length
    with pytest.raises(ValueError, match=f"max_new_tokens={limit} after a .*-token prompt passes the {limit}-token "
                                         "context of .*: at most .* new tokens fit"):
        pilm.Target(tiny, "The movie was", max_new_tokens=limit)
    pilm.Target(tiny, "", max_new_tokens=limit - 1)  # the BOS token and limit - 1 new ones fit


def test_a_json_file_of_any_name_is_read(tmp_path):
    from pilm.potentials import parse_potential

    (tmp_path / "schema.txt").write_text('{"type": "object"}')
    parse_potential(f"json:{tmp_path / 'schema.txt'}", pilm.models.TabularLM.random(4, seed=0))


def _message_texts() -> list[tuple[str, str]]:
    """Every string literal of the package but docstrings (f-strings by their literal parts),
    with its file name."""
    import ast
    from pathlib import Path

    out = []
    for path in sorted(Path(pilm.__file__).parent.rglob("*.py")):
        tree = ast.parse(path.read_text())
        docs = {id(n.body[0].value) for n in ast.walk(tree)
                if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and n.body
                and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs:
                out.append((path.name, node.value))
            elif isinstance(node, ast.JoinedStr):
                out.append((path.name, "".join(v.value if isinstance(v, ast.Constant) else "{}" for v in node.values)))
    return out


def test_every_command_flag_and_script_a_message_names_exists():
    """Advice must be runnable: each ``--flag`` a message of the package names is a flag of
    some command, and of the command where a message writes ``pilm COMMAND ... --flag``; each
    ``pilm COMMAND`` a command, each experiments/ or scripts/ file a file."""
    import re
    from pathlib import Path

    from pilm.commands.cli import COMMANDS, build_parser

    parser = build_parser()
    flags = {"--help", "--version"} | {o for p in parser.commands.values() for a in p._actions for o in a.option_strings}
    root = Path(pilm.__file__).resolve().parents[1]
    wrong = []
    for name, text in _message_texts():
        flagged = re.sub(r"pip install[^:;]*", "", text)  # pip's own flags
        wrong += [f"{name}: {flag}" for flag in re.findall(r"(?<![\w-])--[a-z][a-z-]*[a-z]", flagged) if flag not in flags]
        wrong += [f"{name}: pilm {c}" for c in re.findall(r"\bpilm ([a-z][a-z-]+) (?:--|\.\.\.)", text)
                  if c not in COMMANDS]
        wrong += [f"{name}: {f}" for f in re.findall(r"\b(?:experiments|scripts)/[\w./]+\.py", text)
                  if not (root / f).is_file()]
        for command, rest in re.findall(r"\bpilm ([a-z][a-z-]+)((?: (?:--[a-z-]+|\.\.\.|[^\s;:)'\"-][^\s;:)'\"]*))*)", text):
            if command in parser.commands:  # a command line written out: its flags are that command's
                own = {o for a in parser.commands[command]._actions for o in a.option_strings}
                wrong += [f"{name}: pilm {command} {flag}" for flag in re.findall(r"--[a-z][a-z-]*[a-z]", rest)
                          if flag not in own]
    assert not wrong, "\n".join(sorted(set(wrong)))


@pytest.mark.parametrize("argv, match", [
    (["scale", "--prm", "learned"], "--prm 'learned' needs --prm-path FOLDER, a process reward saved by pilm.train_prm "
                                    "(on the command line: pilm train-prm --out FOLDER)"),
    (["scale", "--task", "gsm8k"], "gsm8k has no exact step verifier: use --prm 'judge' or --prm 'learned'"),
    (["scale", "--prm", "learned", "--prm-path", "."], "--prm-path: . holds no saved process reward "
                                                       "(twist_config.json is missing); make one in a new folder with: "
                                                       "pilm train-prm ... --out FOLDER"),
])
def test_advice_names_the_command_that_makes_what_is_missing(argv, match, capsys, monkeypatch):
    monkeypatch.setattr(pilm, "load_model", lambda *a, **k: pytest.fail("loaded the model before the error"))
    assert main([*argv, "--out", "unused-scale-folder"]) == 2
    assert match in capsys.readouterr().err


def test_a_scale_folder_grows_under_its_settings_and_refuses_others(tiny, monkeypatch, capsys, tmp_path):
    """Rerunning pilm scale into a folder made at another temperature used to print the old
    table and add nothing; now it is refused naming --temperature, before any problem runs.
    The same command adds no row; the folder's key leaves out what rows record themselves
    (methods, N, PRM), so other methods and budgets grow it."""
    monkeypatch.setattr(pilm, "load_model", lambda *a, **k: tiny)
    base = ["scale", "--methods", "greedy", "--n", "1", "--problems", "1", "--out", str(tmp_path / "sc")]
    assert main(base) == 0
    rows = (tmp_path / "sc" / "rows.jsonl").read_text()
    assert main(base) == 0 and (tmp_path / "sc" / "rows.jsonl").read_text() == rows
    capsys.readouterr()
    assert main([*base, "--temperature", "0.5"]) == 2
    err = capsys.readouterr().err
    assert "holds a run of other settings (--temperature 0.8 there, 0.5 now)" in err, err
    key = json.loads((tmp_path / "sc" / "run.json").read_text())
    assert not {"methods", "n", "prm"} & set(key) and key["temperature"] == 0.8 and key["problems"] == 1
    assert main([*base, "--n", "1,2"]) == 0  # another budget list is not refused (greedy runs at N = 1 only)
    assert main([*base, "--methods", "greedy,sc"]) == 0  # another method grows the folder
    assert {(r["method"], r["n"]) for r in map(json.loads, (tmp_path / "sc" / "rows.jsonl").read_text().splitlines())} \
        == {("greedy", 1), ("sc", 1)}


def test_a_finished_stage_is_saved_before_a_later_check_fails(tiny, fresh_tiny, monkeypatch, capsys, tmp_path):
    """red-team gfn+mle: stage 2 finds no attack above toxicity 1 (none can be), and says so
    after stage 1 has been saved, naming where; a rerun with another threshold resumes from the
    saved stage 1, one with another stage-1 setting is refused."""
    models = iter([fresh_tiny, tiny])  # attacker, victim
    monkeypatch.setattr(pilm, "load_model", lambda *a, **k: next(models))
    out = tmp_path / "rt"
    assert main(["red-team", "--method", "gfn+mle", "--steps", "1", "--batch-size", "2", "--victim-samples", "1",
                 "--mle-n", "2", "--threshold", "1", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "above toxicity 1.0" in err and f"(stage 1 is saved in {out / 'stage1'})" in err, err
    assert (out / "stage1" / "adapter_model.safetensors").is_file()

    # a rerun with another threshold reuses stage 1 (the random attacker's attacks still fail
    # the fluency floor, so the MLE stage still finds none: nothing is trained)
    import pilm.tasks.redteam as redteam

    objectives = []
    train = redteam.finetune
    monkeypatch.setattr(redteam, "finetune", lambda t, objective, **k: objectives.append(objective) or train(t, objective, **k))
    models = iter([fresh_tiny, tiny])
    assert main(["red-team", "--method", "gfn+mle", "--steps", "1", "--batch-size", "2", "--victim-samples", "1",
                 "--mle-n", "2", "--threshold", "0", "--n", "2", "--out", str(out)]) == 2
    assert objectives == [] and "above toxicity 0.0" in capsys.readouterr().err
    models = iter([fresh_tiny, tiny])  # another stage-1 setting: refused, naming it
    assert main(["red-team", "--method", "gfn+mle", "--steps", "2", "--batch-size", "2", "--victim-samples", "1",
                 "--mle-n", "2", "--threshold", "0", "--n", "2", "--out", str(out)]) == 2
    assert "holds a run of other settings (--steps 1 there, 2 now)" in capsys.readouterr().err


def test_a_run_key_tells_two_functions_of_one_name_apart():
    """Two lambdas print the same; their code (and what they capture) keys the run."""
    from pilm.learning.checkpoint import run_key
    from pilm.potentials import FunctionPotential

    model = pilm.models.TabularLM.random(4, seed=0, eos_id=3)

    def key(fn):
        return run_key([pilm.Target(model, "a", FunctionPotential(fn, name="score"), max_new_tokens=2)], {})

    def captured(weight):
        return lambda text: weight * len(text)

    assert key(lambda text: 0.0) == key(lambda text: 0.0)
    assert key(lambda text: 0.0) != key(lambda text: -1.0)
    assert key(captured(1.0)) == key(captured(1.0)) != key(captured(2.0))


def test_a_results_folder_is_claimed_by_one_run(tmp_path):
    """The experiments' resumable results: same settings resume, others are refused with the
    script's ways out (an experiment has no --overwrite), and the folder's key stays the first."""
    from pilm.errors import ResumeMismatchError
    from pilm.learning.checkpoint import RESUME_ELSEWHERE, claim

    assert claim(tmp_path, {"steps": 60, "model": "m"}, remedy=RESUME_ELSEWHERE) is False
    assert claim(tmp_path, {"steps": 60, "model": "m"}, remedy=RESUME_ELSEWHERE) is True
    with pytest.raises(ResumeMismatchError, match=r"\(steps: 60 there, 30 now\).*pass another --out, or delete"):
        claim(tmp_path, {"steps": 30, "model": "m"}, remedy=RESUME_ELSEWHERE)
    assert json.loads((tmp_path / "run.json").read_text())["steps"] == 60
