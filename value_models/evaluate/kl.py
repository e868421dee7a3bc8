"""KL from the base, KL(p_vas || p0), of sampled VAS responses (docs/VAS_RULE.md §1).

vLLM reports the raw base log-probs (before logits processors) of the top-K tokens at each step,
which are exactly the VAS candidates C. Re-running the value model over the sampled tokens
(the server's value runtime, vas_server.core.value_runtime, in the engine's dtype) gives each candidate's bonus
b(a) = sum_h w_h (q_h(a) - mean_C q_h). VAS samples from p(a) = p0(a) exp(b(a) - Z) with
Z = log(1 + sum_C p0(a) (exp(b(a)) - 1)) (b = 0 outside C), so per step the KL is exact:
    KL_t = sum_C p0 e^(b-Z) (b - Z) - (1 - sum_C p0) e^(-Z) Z,
and the sum over the steps of a sampled response is an unbiased estimate of the sequence-level
KL. The plain Monte-Carlo estimate sum_t log p/p0 (y_t) = sum_t (b(y_t) - Z_t) comes with it as
a check.
"""

from __future__ import annotations

import torch

from value_models.evaluate.generation import Generation


def replay_steps(runtime, prompt_ids: list[list[int]], token_ids: list[list[int]],
                 topk: list[list[tuple[list[int], list[float]]]], head_ids: frozenset[int], batch_size: int):
    """Replay sampled responses through the serving value runtime, one decoding step at a time, as
    the engine scored them. Response i follows prompt_ids[i]; topk[i][t] holds step t's candidates
    and their raw base log-probs. Per step of each batch of `batch_size` responses, yields
    (live [B] response indices, candidates [B, k], base log-probs [B, k] float64,
    values of every runtime head [B, n_heads, k] float64 -- only those of `head_ids` are computed --,
    the sampled tokens [B])."""
    from vas_server.core.scorer import TokenLists, ValueRow

    for start in range(0, len(prompt_ids), batch_size):
        idx = list(range(start, min(start + batch_size, len(prompt_ids))))
        rows = [ValueRow(runtime.allocate(), head_ids, TokenLists(list(prompt_ids[i]))) for i in idx]
        try:
            for t in range(max(len(token_ids[i]) for i in idx)):
                live = [b for b, i in enumerate(idx) if t < len(token_ids[i])]
                steps = [topk[idx[b]][t] for b in live]
                k = min(len(ids) for ids, _ in steps)
                candidates = torch.tensor([ids[:k] for ids, _ in steps], dtype=torch.long)
                logp0 = torch.tensor([lps[:k] for _, lps in steps], dtype=torch.float64)
                values = runtime.score([rows[b] for b in live], candidates).double()
                chosen = torch.tensor([token_ids[idx[b]][t] for b in live])
                yield torch.tensor([idx[b] for b in live]), candidates, logp0, values, chosen
                for b in live:
                    rows[b].tokens.outputs.append(token_ids[idx[b]][t])
        finally:
            for row in rows:
                runtime.release(row.cache_slot)


@torch.no_grad()
def vas_kl(value_model, prompt_ids: list[list[int]], gen: Generation, weights: dict[str, float], *, top_k: int,
           max_len: int, batch_size: int = 32) -> tuple[list[float], list[float]]:
    """Per response: (exact-per-step KL summed over the steps, Monte-Carlo sum_t log p/p0 (y_t)).
    `value_model` is a loaded ValueModel; the runtime is the one the server steers with."""
    from vas_server.core import rule
    from vas_server.core.value_runtime import ValueRuntime

    runtime = ValueRuntime([value_model], batch_size, max_len, "cpu", next(value_model.trunk.parameters()).dtype)
    w = rule.weight_vector(weights, runtime.head_index, dtype=torch.float64)
    used = frozenset(runtime.head_index[n] for n, v in weights.items() if v != 0)
    exact = torch.zeros(len(prompt_ids), dtype=torch.float64)
    mc = torch.zeros(len(prompt_ids), dtype=torch.float64)
    for live, candidates, lp0, values, chosen in replay_steps(runtime, prompt_ids, gen.token_ids, gen.topk, used,
                                                              batch_size):
        bonus = rule.bonus(values, w)  # [B, k]: the processor's own rule
        p0 = lp0.exp()
        z = torch.log1p((p0 * torch.expm1(bonus)).sum(-1))  # [B]
        rest = (1 - p0.sum(-1)).clamp(min=0)
        kl_t = (p0 * torch.exp(bonus - z[:, None]) * (bonus - z[:, None])).sum(-1) - rest * torch.exp(-z) * z
        b_y = (bonus * (candidates == chosen[:, None])).sum(-1)
        exact[live] += kl_t
        mc[live] += b_y - z
    return exact.tolist(), mc.tolist()
