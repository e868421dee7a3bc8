"""`eval`: how well a value model steers the base, against Best-of-N from the same base.

On held-out prompts (the chitchat `heldout` split by default), with one vLLM engine that serves
the value model:
  * base: `max(bon)` (64) responses per prompt sampled from the plain base at temperature 1, seed
    `seed + i * 1000 + j` for sample j of prompt i (as `sample` does);
  * VAS: one response per prompt for every weight setting -- each head alone at `weights`, and a
    3x3 grid of two heads' weights -- at temperature 1 with the seed of base sample 0 (common
    random numbers: weight 0 *is* base sample 0, since a request with no weight is plain vLLM);
  * Best-of-N (N in `bon`): per prompt, the best of the first N base samples by the head's reward.
Every response is scored with every head's reward (the reward spec each head was trained on).

KL from the base, KL(p_vas || p0), per response: the exact per-step KL summed along the sampled
response, with its Monte-Carlo check (kl.py). Best-of-N uses the usual analytic value
log N - (N - 1) / N.

Cost: generated tokens and wall time of each VAS run (one response per prompt) against those of
Best-of-N (N responses per prompt; wall time of the base run pro-rated by tokens).

Outputs in `out_dir`: eval.json (everything), eval.md (tables and checks of the quality bar) and
PNG plots reward_vs_weight.png, reward_vs_kl.png, grid.png.

Modules: config (EvalConfig, the key of each weight setting), generation (runs and their cache),
kl (the KL of VAS runs), report (statistics, quality bar, eval.json / eval.md), plots, and
driver (`evaluate`, which runs them in order).

vLLM starts worker processes: scripts that call `evaluate` need an `if __name__ == "__main__":` guard.
"""

from value_models.evaluate.config import DEFAULT_BON, DEFAULT_GRID_WEIGHTS, DEFAULT_WEIGHTS, EvalConfig
from value_models.evaluate.driver import evaluate, head_rewards
from value_models.evaluate.generation import Generation, GenerationCache, generate
from value_models.evaluate.kl import replay_steps, vas_kl
from value_models.evaluate.plots import plot
from value_models.evaluate.report import markdown, quality_checks, write_report
from value_models.sample import max_logprobs_for

__all__ = ["DEFAULT_BON", "DEFAULT_GRID_WEIGHTS", "DEFAULT_WEIGHTS", "EvalConfig", "Generation", "GenerationCache",
           "evaluate", "generate", "head_rewards", "markdown", "max_logprobs_for", "plot", "quality_checks",
           "replay_steps", "vas_kl", "write_report"]
