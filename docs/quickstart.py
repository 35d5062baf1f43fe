import pilm
from pilm.potentials import Regex, Sentiment

model = pilm.load_model()                       # embedded SmolLM2-135M; or a transformers id / folder
target = pilm.Target(model, "The movie was", Sentiment("positive") ** 10, max_new_tokens=24)
res = pilm.smc(target, n_particles=32, resample="systematic", ess_threshold=0.5, seed=0)
for weight, text in res.top(3):
    print(f"{weight:.3f}", text)
print(res.log_z, res.ess, res.resampled_at)     # log Ẑ (Ẑ unbiased for Z), ESS per step
res.to_jsonl("results.jsonl")

# a hard constraint drawn, not only weighted: the masked proposal never breaks it
no_e = pilm.Target(model, "My favourite weather is", Regex(r"[^eE]*"), max_new_tokens=16)
res = pilm.smc(no_e, 32, proposal="masked", seed=0)

# many prompts are one batch: one forward per token for every particle of every target
targets = [pilm.Target(model, p, "regex:[^eE]*", max_new_tokens=12) for p in ("The sky", "Once upon a time")]
results = pilm.smc(targets, n_particles=16, seed=0)

tiny = pilm.models.TabularLM.random(4, seed=0, eos_id=3)   # an enumerable model: exact answers
print(pilm.exact.log_z(pilm.Target(tiny, "a", Regex("[ab]*"), max_new_tokens=4)))
