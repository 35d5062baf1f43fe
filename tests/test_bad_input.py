"""Bad input gets a clear error."""

import math

import pytest
import torch

import pilm
from pilm.potentials import FunctionPotential


@pytest.fixture
def model():
    return pilm.models.TabularLM.random(4, seed=0, eos_id=3)


def test_nan_potential_names_itself_and_counts_particles(model):
    def flaky(tokens):
        return math.nan if tokens[0] == 0 else 0.0

    target = pilm.Target(model, "a", FunctionPotential(flaky, on="tokens", name="flaky"), max_new_tokens=2)
    with pytest.raises(pilm.PotentialError, match=r"potential flaky returned NaN log phi for \d+ of \d+ particles"):
        pilm.smc(target, 64, seed=0, progress=False)


def test_every_particle_at_zero_weight_names_the_step(model):
    never = FunctionPotential(lambda t: -math.inf, on="tokens", prefix_fn=lambda t: -math.inf, name="never")
    target = pilm.Target(model, "a", never, max_new_tokens=3)  # no bound can tell before sampling
    with pytest.raises(pilm.ImpossibleTargetError, match="step 1: all 16 particles have zero weight"):
        pilm.smc(target, 16, seed=0, progress=False)
    res = pilm.smc(target, 16, seed=0, progress=False, on_extinction="return")
    assert res.log_z == -math.inf and res.info["extinct_at"] == 1


def test_potential_returning_plus_inf_or_wrong_shape(model):
    inf = FunctionPotential(lambda t: math.inf, name="explodes")
    with pytest.raises(pilm.PotentialError, match=r"explodes returned \+inf"):
        pilm.importance_sample(pilm.Target(model, "a", inf, max_new_tokens=2), 4)

    class Wrong(pilm.potentials.Potential):
        def log_phi(self, seqs):
            return torch.zeros(len(seqs) + 1)

    with pytest.raises(pilm.PotentialError, match="shape"):
        pilm.importance_sample(pilm.Target(model, "a", Wrong(), max_new_tokens=2), 4)


@pytest.mark.parametrize("bad", [0, -1, 2.5])
def test_max_new_tokens_must_be_positive(model, bad):
    with pytest.raises(ValueError, match="max_new_tokens"):
        pilm.Target(model, "a", max_new_tokens=bad)


def test_plain_function_is_not_a_potential(model):
    with pytest.raises(TypeError, match="FunctionPotential"):
        pilm.Target(model, "a", potential=lambda s: 0.0)


def test_prompt_ids_outside_vocabulary(model):
    with pytest.raises(ValueError, match="outside the vocabulary"):
        pilm.Target(model, [0, 99], max_new_tokens=2)


def test_bad_smc_arguments(model):
    target = pilm.Target(model, "a", max_new_tokens=2)
    with pytest.raises(ValueError, match="resampling scheme"):
        pilm.smc(target, 4, resample="magic", progress=False)
    with pytest.raises(ValueError, match="ess_threshold"):
        pilm.smc(target, 4, ess_threshold=2.0, progress=False)
    with pytest.raises(ValueError, match="at least one particle"):
        pilm.smc(target, 0, progress=False)


def test_rejection_needs_phi_at_most_one_and_reports_budget(model):
    big = FunctionPotential(lambda t: 1.0, name="big")
    with pytest.raises(pilm.PotentialError, match="phi <= 1"):
        pilm.rejection_sample(pilm.Target(model, "a", big, max_new_tokens=2), 2)
    never = FunctionPotential(lambda t: -math.inf, on="tokens", name="never")  # no bound sees it before drawing
    rare = pilm.Target(model, "a", never, max_new_tokens=2)
    with pytest.raises(pilm.RejectionBudgetError, match="accepted 0 of 3") as err:
        pilm.rejection_sample(rare, 3, max_draws=100)
    assert err.value.partial.n_draws == 100


def test_exact_refuses_past_its_size(model):
    target = pilm.Target(model, "a", max_new_tokens=6)
    with pytest.raises(pilm.TooLargeError, match="more than 100 sequences"):
        pilm.exact.log_z(target, max_sequences=100)


def test_tabular_text_outside_alphabet(model):
    with pytest.raises(ValueError, match="outside"):
        model.encode("xyz")


def test_backend_arguments_are_refused_before_anything_loads(monkeypatch, tmp_path, capsys):
    import sys

    from pilm.commands.cli import main
    from pilm.errors import BackendError, ModelLoadError

    with pytest.raises(ValueError, match="unknown backend 'tgi'; choose one of hf, vllm"):
        pilm.load_model(backend="tgi")
    with pytest.raises(TypeError, match="tensor_parallel_size: engine arguments are for backend='vllm'"):
        pilm.load_model(tensor_parallel_size=2)
    with pytest.raises(BackendError, match="adapter= and kv_cache= belong to backend='hf'"):
        pilm.load_model(backend="vllm", adapter="somewhere")
    monkeypatch.setitem(sys.modules, "vllm", None)  # as where it is not installed
    with pytest.raises(ModelLoadError, match=r"pip install vllm \(CUDA\).*make test-engines"):
        pilm.load_model(backend="vllm")
    assert main(["scale", "--backend", "vllm", "--out", str(tmp_path / "o")]) == 2
    assert "pilm: error: --backend 'vllm' needs vLLM in this environment: pip install vllm (CUDA)" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()  # nothing was made


def test_engine_arguments_of_pilm_scale_are_read_and_bad_ones_refused(capsys, tmp_path):
    from pilm.commands.cli import main
    from pilm.config import ScaleConfig
    from pilm.errors import ConfigError

    cfg = ScaleConfig(backend="vllm", engine=("tensor_parallel_size=2", "enforce_eager=false", "quantization=fp8",
                                              "max_model_len=4096"))
    assert cfg.engine_args == {"tensor_parallel_size": 2, "enforce_eager": False, "quantization": "fp8",
                               "max_model_len": 4096}
    for bad, said in ((("tensor_parallel_size",), "KEY=VALUE"), (("=2",), "KEY=VALUE"), (("dtype=float16",), "--dtype")):
        with pytest.raises(ConfigError, match=said):
            ScaleConfig(backend="vllm", engine=bad)
    with pytest.raises(ConfigError, match="add --backend vllm"):
        ScaleConfig(engine=("tensor_parallel_size=2",))
    assert main(["scale", "--engine", "tensor_parallel_size=2", "--engine", "enforce_eager=true", "--out",
                 str(tmp_path / "o")]) == 2
    assert "--engine gives vLLM engine arguments, but the backend is 'hf'" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()  # nothing was made


def test_each_launched_process_gives_its_engine_devices_of_its_own(monkeypatch):
    from pilm.errors import BackendError
    from pilm.models.vllm_backend import process_share

    for key in ("LOCAL_WORLD_SIZE", "LOCAL_RANK", "VLLM_CPU_OMP_THREADS_BIND"):
        monkeypatch.delenv(key, raising=False)
    assert process_share("cuda", {}) == {}  # outside a launcher
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {8, 9, 10, 11, 12, 13, 14, 15, 16})  # 9 cores
    assert process_share("cpu", {}) == {"VLLM_CPU_OMP_THREADS_BIND": "8,9,10,11,12,13,14,15,16"}  # alone: all
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3,4,5,6,7")
    assert process_share("cuda", {"tensor_parallel_size": 4}) == {"CUDA_VISIBLE_DEVICES": "4,5,6,7"}
    assert process_share("cuda", {"tensor_parallel_size": 2, "pipeline_parallel_size": 2}) == {
        "CUDA_VISIBLE_DEVICES": "4,5,6,7"}
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    assert process_share("cuda", {}) == {"CUDA_VISIBLE_DEVICES": "5"}
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert process_share("cuda", {}) == {"CUDA_VISIBLE_DEVICES": "3"}
    assert process_share("cuda", {"tensor_parallel_size": 2}) == {}  # a scheduler gave each process its own two
    with pytest.raises(BackendError, match="need 6 GPUs; it has 2: launch fewer processes"):
        process_share("cuda", {"tensor_parallel_size": 3})
    assert process_share("cpu", {}) == {"VLLM_CPU_OMP_THREADS_BIND": "8,9,10,11"}  # 4 of the 9 each
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert process_share("cpu", {}) == {"VLLM_CPU_OMP_THREADS_BIND": "12,13,14,15"}
    assert process_share("cpu", {"tensor_parallel_size": 2}) == {"VLLM_CPU_OMP_THREADS_BIND": "12,13|14,15"}
    for mine in ("0-3", "auto"):
        monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", mine)
        assert process_share("cpu", {}) == {}  # the user's own binding stands, vLLM's "auto" too
    with pytest.raises(BackendError, match="first argument, not an engine argument"):
        pilm.load_model(backend="vllm", model="elsewhere")


def test_a_scale_folder_keeps_the_engine_arguments_that_change_what_is_drawn():
    from pilm.commands.scaling import run_key
    from pilm.config import ScaleConfig

    class Engine:
        name, dtype_name = "m", "float32"

    placed = ScaleConfig(backend="vllm", engine=("tensor_parallel_size=2", "max_model_len=4096"))
    assert "engine" not in run_key(placed, Engine())  # where it runs: a folder may resume under another
    drawn = ScaleConfig(backend="vllm", engine=("quantization=fp8", "tensor_parallel_size=2"))
    assert run_key(drawn, Engine())["engine"] == {"quantization": "fp8"}


def test_a_twist_giving_nan_is_refused_and_one_ruling_a_row_out_falls_back_to_p0():
    """A row whose twisted logits are all -inf is proposed from p0 (its weight is 0 anyway); a
    NaN or +inf in log psi stays NaN in log q, so the engine's check refuses the draw."""
    from pilm.proposals import twisted_log_q

    log_p0 = torch.log_softmax(torch.tensor([[0.0, 1.0, 2.0]] * 3), -1)
    log_psi = torch.tensor([[-math.inf] * 3, [0.0, math.nan, 0.0], [0.0, math.inf, 0.0]])
    log_q = twisted_log_q(log_p0, log_psi)
    assert torch.equal(log_q[0], log_p0[0]) and torch.isnan(log_q[1:]).any(-1).all()
    with pytest.raises(ValueError, match="no token of positive finite probability"):
        pilm.inference.particles.check_drawn(torch.arange(3), log_q.gather(1, torch.tensor([[0], [0], [0]]))[:, 0])
