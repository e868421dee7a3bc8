"""`fit`: TD(λ) value training (docs/VAS_RULE.md §2) of one value model -- one trunk, one or more heads.

Each head learns its own reward, standardised with the mean and std of its training rewards
(stored in the head's spec). Every optimisation step takes one batch of responses and makes
`passes_per_batch` passes over it; each pass computes the TD(λ) targets from the values of its own
forward pass (detached, so held fixed during the pass) and minimises 0.5 * mean (v - G)^2 (or, with
`soft_beta`, its soft form: td.value_loss), averaged over real states and summed over heads.

Resume: every `checkpoint_every` steps the value model (usable as is) and a training state
(heads, trainable trunk weights, optimiser, step, loss history) are written to the output
directory; a run started again with the same settings continues from there and ends with the
same weights as an uninterrupted run. The batch order is a function of (seed, epoch) only, so no
random-generator state needs saving. The training state is removed once training completes.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from vas_server.core.format import (
    HEAD_KINDS,
    HeadSpec,
    TokenizerIdentity,
    TokenizerMismatchError,
    ValueModelSpec,
)
from vas_server.core.heads import ValueHeads
from vas_server.core.model import save_value_model
from value_models.proxy import ProxySums
from value_models.records import Sample, vocab_hash_of
from value_models.states import gather_states, head_values, make_batch
from value_models.td import DEFAULT_GAMMA, DEFAULT_LAMBDA, td_lambda_returns, value_loss
from value_models.training_trunk import TrainingTrunk, TrunkPlan

TRAIN_STATE_DIR = "train_state"
TRAIN_STATE_FILE = "state.pt"
CURVE_FILE = "training_curve.json"
LR_DECAYS = ("constant", "linear")
MIN_VALIDATION = 8
RISE = 0.1  # a held-out error more than 10% above the previous epoch's is warned about


@dataclass
class HeadPlan:
    name: str
    kind: str  # "state" | "token"
    reward: str  # key of the sample's rewards this head learns
    description: str = ""

    def __post_init__(self):
        if self.kind not in HEAD_KINDS:
            raise ValueError(f"head {self.name!r}: kind must be one of {HEAD_KINDS}, got {self.kind!r}")


@dataclass
class FitConfig:
    heads: list[HeadPlan]
    trunk: TrunkPlan
    lam: float = DEFAULT_LAMBDA
    gamma: float = DEFAULT_GAMMA
    epochs: int = 1
    batch_size: int = 16
    lr: float = 1e-3  # heads
    # Token heads' [H, H] projection: None = lr. Its effect on a value is a sum over H x H
    # products of hidden-state and embedding entries, so one Adam step of size lr moves values
    # ~ lr * |h|_1 * |E[a]|_1 (about lr * 3e4 for SmolLM2's trunk): it needs a far smaller rate.
    # The default is the demo heads'. At lr (1e-3, the default before) a sparse reward's fit
    # diverged: held-out Monte-Carlo error 5.70 -> 9.38 -> 10.66 -> 15.36 over three epochs,
    # against 5.70 -> 5.55 -> 5.53 -> 5.53 at 2e-6 (docs/TRAINING.md, "Your own reward").
    token_proj_lr: float | None = 2e-6
    trunk_lr: float = 1e-4  # LoRA or fine-tuned trunk weights
    weight_decay: float = 0.0
    # "constant", or "linear": every rate falls linearly to 0 at the last step. The per-token biases
    # see a few noisy returns each; a decaying rate makes each one an average over all its
    # occurrences instead of a trace of its last few (Adam's steps do not shrink with the error).
    lr_decay: str = "constant"
    # 0: the spec's squared error, values of the base policy. β != 0: soft values (td.value_loss),
    # the KL-regularised optimum's values for steering at weight β; every head of the fit uses it.
    soft_beta: float = 0.0
    passes_per_batch: int = 2
    seed: int = 0
    checkpoint_every: int = 100  # steps; 0 = only at the end
    precompute_batch_size: int = 16
    extra: dict = field(default_factory=dict)  # recorded in vas.json, e.g. how the data was made
    # Recorded as vas.json's default_top_k: the top-K the model steers best with, chosen by
    # evaluation (docs/QUALITY.md); it does not change the training.
    default_top_k: int | None = None
    # Responses held out of training (a seeded choice) to report, before training and after each
    # epoch, an error that does not move with the model's own targets: the Monte-Carlo return
    # error, mean (v - G)^2 with G the standardised reward itself (λ = 1), and each token head's
    # steering proxy corr(S, r) (value_models/proxy.py) on the held-out base samples that carry
    # their top-K candidates. Fewer than MIN_VALIDATION held-out responses: none.
    validation_fraction: float = 0.05

    def __post_init__(self):
        if self.lr_decay not in LR_DECAYS:
            raise ValueError(f"lr_decay must be one of {LR_DECAYS}, got {self.lr_decay!r}")
        if not 0 <= self.validation_fraction < 1:
            raise ValueError("validation_fraction must be in [0, 1)")

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class FitResult:
    path: Path
    steps: int
    # per step: step, epoch, loss per head; per epoch: step, epoch, validation per head and, where
    # the held-out samples carry top-K candidates, proxy_corr per token head
    curve: list[dict]


def fit(samples: list[Sample], config: FitConfig, out_dir: Path | str, *, progress: bool = True,
        stop_after_steps: int | None = None, states_cache: Path | str | None = None) -> FitResult:
    """Train a value model on scored samples and save it (§3) to `out_dir`.

    The samples' token ids must come from the trunk's tokenizer (their vocab_hash is checked).
    `stop_after_steps` ends the run early, leaving a resumable training state (what an
    interruption leaves; used by the resume test). `states_cache`: a directory where a frozen
    trunk's hidden states are kept between runs on the same data (they do not depend on the heads
    or on any training setting), so refitting heads skips the trunk entirely.
    """
    run = _start(samples, config, Path(out_dir), progress, states_cache)
    base_lrs = [g["lr"] for g in run.optimizer.param_groups]  # read before a restored optimiser overwrites them
    step, curve = _resume_point(run)
    _validate(run, step, -1, curve)
    bar = tqdm(total=run.total_steps, initial=step, desc="fit", disable=not progress)
    while step < run.total_steps:
        if stop_after_steps is not None and step >= stop_after_steps:
            _save_run(run, step, curve, final=False)
            bar.close()
            return FitResult(run.out_dir, step, curve)
        curve.append(_train_step(run, step, base_lrs))
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{sum(curve[-1]['loss'].values()):.4f}", **_last_validation(curve))
        if step % run.batches_per_epoch == 0:
            _validate(run, step, curve[-1]["epoch"], curve)
        if _checkpoint_due(step, run.total_steps, config.checkpoint_every):
            _save_run(run, step, curve, final=False)
    bar.close()
    _save_run(run, step, curve, final=True)
    return FitResult(run.out_dir, step, curve)


@dataclass
class _Run:
    """One fit's fixed parts, which its steps, validations and checkpoints share."""
    config: FitConfig
    out_dir: Path
    spec: ValueModelSpec
    fingerprint: str  # what a resumed run must share with this one (_run_fingerprint)
    trunk: TrainingTrunk
    value_heads: ValueHeads
    optimizer: torch.optim.AdamW
    samples: list[Sample]  # the training responses
    held_out: list[Sample]
    rewards: torch.Tensor  # [n_heads, train + held out], standardised, in value_heads' (state-first) order
    cached_hidden: list[torch.Tensor] | None  # a frozen trunk's states of samples + held_out; None: trainable
    embed: torch.Tensor
    proxy_rows: list[int]  # the held-out samples the steering proxy scores (_proxy_rows)

    @property
    def batches_per_epoch(self) -> int:
        return math.ceil(len(self.samples) / self.config.batch_size)

    @property
    def total_steps(self) -> int:
        return self.batches_per_epoch * self.config.epochs


def _start(samples: list[Sample], config: FitConfig, out_dir: Path, progress: bool,
           states_cache: Path | str | None) -> _Run:
    """Everything a fit needs before its first step: the checked and split data, its standardised
    rewards, the seeded model and its optimiser, and a frozen trunk's states."""
    trunk_identity = _checked_tokenizer(samples, config)
    samples = [s for s in samples if s.response_token_ids]
    if not samples:
        raise ValueError("no samples with a non-empty response to train on")
    samples, held_out = _split(samples, config)
    rewards, reward_mean, reward_std = _standardised_rewards(samples, held_out, config.heads)
    specs = [HeadSpec(h.name, h.kind, h.description or h.reward, float(m), float(s), len(samples))
             for h, m, s in zip(config.heads, reward_mean, reward_std)]
    trunk, value_heads = _seeded_model(config, specs)
    spec = ValueModelSpec(trunk=trunk.spec(), heads=specs, tokenizer=trunk_identity,
                          extra={"training": config.to_json()}, default_top_k=config.default_top_k)
    cached_hidden = (None if config.trunk.trainable
                     else _trunk_states(trunk, samples + held_out, config, progress, states_cache))
    run = _Run(config, out_dir, spec, _run_fingerprint(config, samples), trunk, value_heads,
               _optimizer(value_heads, trunk, config), samples, held_out,
               rewards[_state_first(config.heads, value_heads)], cached_hidden, trunk.embedding(),
               _proxy_rows(held_out))
    if held_out:
        _explain_proxy_gaps(value_heads, held_out, run.proxy_rows)
    return run


def _standardised_rewards(samples: list[Sample], held_out: list[Sample],
                          head_plans: list[HeadPlan]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """([n_heads, train + held out] rewards standardised with the training samples' mean and std,
    that mean, that std), heads in `head_plans` order."""
    raw_rewards = _reward_matrix(samples + held_out, head_plans)
    reward_mean, reward_std = _training_stats(raw_rewards[:, :len(samples)], head_plans)
    return (raw_rewards - reward_mean[:, None]) / reward_std[:, None], reward_mean, reward_std


def _seeded_model(config: FitConfig, specs: list[HeadSpec]) -> tuple[TrainingTrunk, ValueHeads]:
    """The trunk and fresh heads; the seed fixes LoRA's and the heads' initialisation."""
    torch.manual_seed(config.seed)
    trunk = TrainingTrunk(config.trunk)
    return trunk, ValueHeads(specs, trunk.hidden_size, trunk.vocab_size)


def _state_first(head_plans: list[HeadPlan], value_heads: ValueHeads) -> list[int]:
    """Row order that puts per-plan rows (`head_plans` order) in ValueHeads' order, state heads first."""
    names = [h.name for h in head_plans]
    return [names.index(n) for n in value_heads.names]


def _resume_point(run: _Run) -> tuple[int, list[dict]]:
    """(step, curve) to continue from: an interrupted run's saved state (its weights and optimiser
    restored into `run`), else (0, [])."""
    state_path = run.out_dir / TRAIN_STATE_DIR / TRAIN_STATE_FILE
    if not state_path.is_file():
        return 0, []
    return _restore(state_path, run.fingerprint, run.value_heads, run.trunk, run.optimizer)


def _train_step(run: _Run, step: int, base_lrs: list[float]) -> dict:
    """Optimisation step `step` (counted from 0); returns its curve entry (step counted from 1)."""
    ids = _batch_ids(step, run.batches_per_epoch, len(run.samples), run.config)
    scale = _lr_scale(step, run.total_steps, run.config.lr_decay)
    for group, base_lr in zip(run.optimizer.param_groups, base_lrs):
        group["lr"] = base_lr * scale
    losses = _train_batch(run.trunk, run.value_heads, run.optimizer, run.embed, [run.samples[i] for i in ids],
                          run.rewards[:, ids], run.cached_hidden, ids, run.config)
    return {"step": step + 1, "epoch": step // run.batches_per_epoch, "loss": dict(zip(run.value_heads.names, losses))}


def _lr_scale(step: int, total_steps: int, lr_decay: str) -> float:
    """The factor on every base learning rate at `step`: 1, or falling linearly to 0 at the last
    step. A function of the step alone, so a resumed run follows the same schedule."""
    return 1.0 - step / total_steps if lr_decay == "linear" else 1.0


def _checkpoint_due(step: int, total_steps: int, every: int) -> bool:
    """Whether a resumable state is saved after `step` steps: every `every` (0: never), but not after
    the last step, whose save is the final one."""
    return bool(every) and step % every == 0 and step < total_steps


def _validate(run: _Run, step: int, epoch: int, curve: list[dict]) -> None:
    """Append the validation after `epoch` (-1: before training) to `curve`, unless there is no
    held-out set or a resumed curve already has it."""
    if run.held_out and not any("validation" in c and c["epoch"] == epoch for c in curve):
        held_ids = list(range(len(run.samples), len(run.samples) + len(run.held_out)))
        curve.append(_validation(run.trunk, run.value_heads, run.embed, run.held_out, run.rewards[:, held_ids],
                                 run.cached_hidden, held_ids, run.proxy_rows, run.config, step, epoch, curve))


def _save_run(run: _Run, step: int, curve: list[dict], *, final: bool) -> None:
    _save(run.out_dir, run.spec, run.value_heads, run.trunk, run.optimizer, run.fingerprint, step, curve, final=final)


def _checked_tokenizer(samples: list[Sample], config: FitConfig):
    """The trunk's tokenizer identity, which must be the one the samples were tokenized with."""
    trunk_identity = _trunk_tokenizer_identity(config.trunk.model_dir)
    data_hash = vocab_hash_of(samples)
    if trunk_identity.vocab_hash != data_hash:
        raise TokenizerMismatchError(
            f"the trunk {config.trunk.model_dir!r} uses a different tokenizer (vocab hash "
            f"{trunk_identity.vocab_hash[:12]}) than the one the training samples were tokenized with "
            f"({data_hash[:12]}). Value models must share the base's vocabulary.")
    return trunk_identity


def _optimizer(value_heads: ValueHeads, trunk: TrainingTrunk, config: FitConfig) -> torch.optim.AdamW:
    """AdamW with one learning rate for the heads, one for the token projection, one for LoRA."""
    proj_lr = config.lr if config.token_proj_lr is None else config.token_proj_lr
    groups = [{"params": [p for p in value_heads.parameters() if p is not value_heads.token.proj], "lr": config.lr},
              {"params": [value_heads.token.proj], "lr": proj_lr}]
    if config.trunk.trainable:
        groups.append({"params": list(trunk.trainable_parameters().values()), "lr": config.trunk_lr})
    return torch.optim.AdamW(groups, weight_decay=config.weight_decay)


def _batch_ids(step: int, batches_per_epoch: int, num_samples: int, config: FitConfig) -> list[int]:
    """The samples of training step `step`: a seeded permutation per epoch, so a run resumes exactly."""
    epoch, index_in_epoch = divmod(step, batches_per_epoch)
    permutation = torch.randperm(num_samples, generator=torch.Generator().manual_seed(config.seed * 100003 + epoch))
    return permutation[index_in_epoch * config.batch_size:(index_in_epoch + 1) * config.batch_size].tolist()


def _validation(trunk, value_heads, embed, held_out, held_rewards, cached_hidden, held_ids, proxy_rows,
                config: FitConfig, step: int, epoch: int, curve: list[dict]) -> dict:
    """The curve entry of a validation after `epoch` (-1: before training), reported on the
    console with a warning when a head's held-out error rose by more than RISE."""
    error_list, proxy = _held_out_metrics(trunk, value_heads, embed, held_out, held_rewards, cached_hidden,
                                          held_ids, proxy_rows, config)
    errors = dict(zip(value_heads.names, error_list))
    report = " ".join(f"{k} {v:.4f}" for k, v in errors.items())
    if proxy:
        report += (f"; steering proxy corr(S, r) on {len(proxy_rows)} of them: "
                   + " ".join(f"{k} {v:.3f}" for k, v in proxy.items()))
    tqdm.write(f"fit: held-out Monte-Carlo return error ({len(held_out)} responses) "
               f"{'before training' if epoch < 0 else f'after epoch {epoch + 1}'}: {report}")
    before = next((c["validation"] for c in reversed(curve) if "validation" in c), None)
    # Noise moves a small held-out set by a few percent: a rise of more than RISE counts.
    rose = [k for k in errors if before is not None and errors[k] > (1 + RISE) * before[k]]
    if rose and epoch >= 0:
        tqdm.write(f"fit: WARNING: the held-out error of {', '.join(rose)} rose by more than {RISE:.0%} over "
                   f"epoch {epoch + 1}: the "
                   "heads fit their training responses worse on others (over-fitting or divergence). "
                   "Fewer --epochs, a lower --lr / --token-proj-lr, --lr-decay linear or --lam 1 may help.")
    return {"step": step, "epoch": epoch, "validation": errors, **({"proxy_corr": proxy} if proxy else {})}


def _split(samples: list[Sample], config: FitConfig) -> tuple[list[Sample], list[Sample]]:
    """(training samples, held-out samples): a seeded choice of validation_fraction of them."""
    n = int(len(samples) * config.validation_fraction)
    if n < MIN_VALIDATION:
        return samples, []
    order = torch.randperm(len(samples), generator=torch.Generator().manual_seed(config.seed * 7919 + 1)).tolist()
    held = set(order[:n])
    return [s for i, s in enumerate(samples) if i not in held], [samples[i] for i in sorted(held)]


def _training_stats(raw_rewards: torch.Tensor, head_plans: list[HeadPlan]) -> tuple[torch.Tensor, torch.Tensor]:
    """Each head's reward mean and std over the training samples (the standardisation)."""
    reward_mean, reward_std = raw_rewards.mean(dim=1), raw_rewards.std(dim=1)
    for h, std in zip(head_plans, reward_std.tolist()):
        if not std > 0:
            raise ValueError(f"head {h.name!r}: every training reward is the same; there is nothing to learn")
    return reward_mean, reward_std


def _last_validation(curve: list[dict]) -> dict:
    last = next((c for c in reversed(curve) if "validation" in c), None)
    if last is None:
        return {}
    postfix = {"held_out": f"{sum(last['validation'].values()):.4f}"}
    if "proxy_corr" in last:
        postfix["proxy"] = " ".join(f"{k} {v:.3f}" for k, v in last["proxy_corr"].items())
    return postfix


def _proxy_rows(held_out: list[Sample]) -> list[int]:
    """The held-out samples the steering proxy scores: base samples (its expectations are under
    the base policy p0, and a steered sample is not drawn from it) that carry their top-K candidates."""
    rows = [i for i, s in enumerate(held_out) if s.topk is not None and not s.policy]
    uneven = sum(1 for i in rows if len(held_out[i].topk) != len(held_out[i].response_token_ids))
    if uneven:
        raise ValueError(f"{uneven} samples carry top-K candidates for a number of steps other than their "
                         "response's length")
    return rows


def _explain_proxy_gaps(value_heads: ValueHeads, held_out: list[Sample], proxy_rows: list[int]) -> None:
    """Say once which heads get no steering proxy, and why."""
    if value_heads.state.names:
        # A state head's candidate values V(s + a) need one trunk position per candidate; the
        # training states hold only the sampled token's.
        tqdm.write("fit: the steering proxy is reported for token heads only, not for "
                   f"{', '.join(value_heads.state.names)}")
    if value_heads.token.names and not proxy_rows:
        tqdm.write(f"fit: none of the {len(held_out)} held-out responses is a base sample with top-K candidates "
                   "(sampled before `vas-train sample` recorded them, with --record-top-k 0, or steered): "
                   "no steering proxy")


@torch.no_grad()
def _held_out_metrics(trunk: TrainingTrunk, value_heads: ValueHeads, embed, samples: list[Sample],
                      rewards: torch.Tensor, cached_hidden, ids: list[int], proxy_rows: list[int],
                      config: FitConfig) -> tuple[list[float], dict[str, float]]:
    """Per head: mean (v - G)^2 over the held-out responses' states, G their Monte-Carlo return
    (td_lambda_returns with λ = 1: the discounted standardised reward, whatever the values). Per
    token head: the steering proxy's corr(S, r) over the held-out samples `proxy_rows` ({} when
    there are none), from the same trunk states."""
    sums = torch.zeros(len(value_heads.names), dtype=torch.float64)
    count = 0
    proxy = ProxySums(len(proxy_rows), len(value_heads.token.names)) if proxy_rows and value_heads.token.names else None
    proxy_index = {row: n for n, row in enumerate(proxy_rows)}
    # Candidates per step: the fewest any scored step has (all steps of a sampling run have K).
    k = min((len(step_ids) for row in proxy_rows for step_ids, _ in samples[row].topk), default=0)
    for start in range(0, len(samples), config.batch_size):
        chunk, chunk_ids = samples[start:start + config.batch_size], ids[start:start + config.batch_size]
        batch = make_batch([s.prompt_token_ids for s in chunk], [s.response_token_ids for s in chunk])
        state_hidden = _states(trunk, batch, cached_hidden, chunk_ids)
        values = head_values(value_heads, state_hidden, embed, batch.next_tokens)
        for h in range(values.shape[0]):
            returns = td_lambda_returns(values[h], rewards[h, start:start + len(chunk)], batch.lengths, lam=1.0,
                                        gamma=config.gamma)
            sums[h] += ((values[h] - returns) ** 2)[batch.mask].double().sum()
        count += int(batch.mask.sum())
        if proxy is not None:
            _add_proxy_steps(proxy, value_heads, embed, state_hidden, batch.next_tokens, chunk,
                             [proxy_index.get(start + b) for b in range(len(chunk))], k)
    if proxy is None:
        return (sums / count).tolist(), {}
    token_rewards = rewards[len(value_heads.state.names):, proxy_rows]  # heads are ordered state-first
    proxy_corr = {name: proxy.corr(j, token_rewards[j]) for j, name in enumerate(value_heads.token.names)}
    return (sums / count).tolist(), proxy_corr


def _add_proxy_steps(proxy: ProxySums, value_heads: ValueHeads, embed, state_hidden: torch.Tensor,
                     next_tokens: torch.Tensor, chunk: list[Sample], proxy_ids: list[int | None], k: int) -> None:
    """Add to `proxy` every step of the chunk's samples that have a proxy index (proxy_ids[b]):
    the token heads' values at the step's first k top-K candidates, read at the step's trunk state
    as the server reads them."""
    where, candidates, logp0 = [], [], []
    for b, (sample, row) in enumerate(zip(chunk, proxy_ids)):
        if row is None:
            continue
        for t, (ids, lps) in enumerate(sample.topk):
            where.append((b, t, row))
            candidates.append(ids[:k])
            logp0.append(lps[:k])
    if not where:
        return
    b, t, rows = torch.tensor(where).T
    candidates = torch.tensor(candidates)
    values = value_heads.token(state_hidden[b, t], embed, candidates)  # [n_token, steps, k]
    proxy.add(rows, values.permute(1, 0, 2), candidates, torch.tensor(logp0, dtype=torch.float64), next_tokens[b, t])


def _train_batch(trunk: TrainingTrunk, value_heads: ValueHeads, optimizer, embed, batch_samples, batch_rewards,
                 cached_hidden, ids, config: FitConfig) -> list[float]:
    batch = make_batch([s.prompt_token_ids for s in batch_samples], [s.response_token_ids for s in batch_samples])
    if cached_hidden is not None:  # a frozen trunk: the same states in every pass
        state_hidden = _states(trunk, batch, cached_hidden, ids)
    for _ in range(config.passes_per_batch):
        if cached_hidden is None:
            state_hidden = _states(trunk, batch, None, ids)
        values = head_values(value_heads, state_hidden, embed, batch.next_tokens)  # [n_heads, B, T]
        per_head = []
        for h in range(values.shape[0]):
            targets = td_lambda_returns(values[h], batch_rewards[h], batch.lengths, lam=config.lam, gamma=config.gamma)
            per_head.append(value_loss(values[h], targets, config.soft_beta)[batch.mask].mean())
        loss = torch.stack(per_head).sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return [float(x.detach()) for x in per_head]  # of the last pass


def _trunk_states(trunk: TrainingTrunk, samples: list[Sample], config: FitConfig, progress: bool,
                  cache_dir: Path | str | None) -> list[torch.Tensor]:
    """The frozen trunk's states of every sample, from `cache_dir` when an earlier run on the same
    trunk and token ids left them there."""
    if cache_dir is None:
        return _precompute_states(trunk, samples, config, progress)
    path = states_cache_path(cache_dir, config.trunk, samples)
    if path.is_file():
        return torch.load(path, weights_only=True)
    states = _precompute_states(trunk, samples, config, progress)
    save_trunk_states(path, states)
    return states


def save_trunk_states(path: Path, states: list[torch.Tensor]) -> None:
    """Write cached trunk states to `path` (a states_cache_path) whole or not at all."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(states, path.with_suffix(".tmp"))
    os.replace(path.with_suffix(".tmp"), path)


def states_cache_path(cache_dir: Path | str, trunk: TrunkPlan, samples: list[Sample]) -> Path:
    """Where a frozen trunk's states of these samples (in this order) are cached: keyed by the
    trunk's directory and depth and every sample's token ids."""
    import hashlib

    key = hashlib.sha256(json.dumps({
        "trunk": [trunk.type, str(Path(trunk.model_dir).resolve()), trunk.num_layers],
        "samples": [[s.prompt_token_ids, s.response_token_ids] for s in samples]}).encode()).hexdigest()[:16]
    return Path(cache_dir) / f"trunk-states-{key}.pt"


@torch.no_grad()
def _precompute_states(trunk: TrainingTrunk, samples: list[Sample], config: FitConfig, progress: bool) -> list[torch.Tensor]:
    """A frozen trunk gives the same hidden states in every epoch: compute them once per sample
    ([T, H] at the states) and train only the heads afterwards."""
    out: list[torch.Tensor] = []
    step = config.precompute_batch_size
    for start in tqdm(range(0, len(samples), step), desc="trunk states", disable=not progress):
        chunk = samples[start:start + step]
        batch = make_batch([s.prompt_token_ids for s in chunk], [s.response_token_ids for s in chunk])
        state_hidden = gather_states(trunk.hidden_states(batch.tokens), batch.positions)
        out.extend(state_hidden[b, :int(batch.lengths[b])].clone() for b in range(len(chunk)))
    return out


def _states(trunk: TrainingTrunk, batch, cached_hidden, ids: list[int]) -> torch.Tensor:
    """The batch's trunk states [B, T, H]: the cached ones of samples `ids`, else a trunk pass."""
    if cached_hidden is not None:
        return _pad_cached([cached_hidden[i] for i in ids], batch.mask.shape[1])
    return gather_states(trunk.hidden_states(batch.tokens), batch.positions)


def _pad_cached(rows: list[torch.Tensor], length: int) -> torch.Tensor:
    out = rows[0].new_zeros(len(rows), length, rows[0].shape[-1])
    for b, r in enumerate(rows):
        out[b, :r.shape[0]] = r
    return out


def _reward_matrix(samples: list[Sample], head_plans: list[HeadPlan]) -> torch.Tensor:
    """[n_heads, N] raw rewards, in `head_plans` order."""
    rows = []
    for h in head_plans:
        missing = sum(1 for s in samples if h.reward not in s.rewards)
        if missing:
            raise ValueError(f"head {h.name!r}: {missing} samples have no reward {h.reward!r}; run `score` first")
        rows.append([float(s.rewards[h.reward]) for s in samples])
    return torch.tensor(rows, dtype=torch.float64).float()


def _trunk_tokenizer_identity(model_dir: str) -> TokenizerIdentity:
    from transformers import AutoTokenizer

    from vas_server.core.format import tokenizer_identity

    return tokenizer_identity(AutoTokenizer.from_pretrained(model_dir))


def _run_fingerprint(config: FitConfig, samples: list[Sample]) -> str:
    """What a resumed run must share with the interrupted one: settings and training data."""
    import hashlib

    data = hashlib.sha256()
    for s in samples:
        data.update(json.dumps([s.prompt_token_ids, s.response_token_ids, s.rewards], sort_keys=True).encode())
    return json.dumps({"config": config.to_json(), "data": data.hexdigest()}, sort_keys=True)


def _save(out_dir: Path, spec: ValueModelSpec, value_heads: ValueHeads, trunk: TrainingTrunk, optimizer,
          fingerprint: str, step: int, curve: list[dict], *, final: bool) -> None:
    lora_dir, standalone_dir = trunk.save(out_dir)
    save_value_model(out_dir, spec, value_heads, lora_dir=lora_dir, standalone_dir=standalone_dir)
    (out_dir / CURVE_FILE).write_text(json.dumps(curve) + "\n")
    state_dir = out_dir / TRAIN_STATE_DIR
    if final:
        shutil.rmtree(state_dir, ignore_errors=True)
        return
    state_dir.mkdir(parents=True, exist_ok=True)
    state = {
        "run": fingerprint,
        "step": step,
        "heads": value_heads.state_dict(),
        "trunk": {n: p.detach().clone() for n, p in trunk.trainable_parameters().items()},
        "optimizer": optimizer.state_dict(),
        "curve": json.dumps(curve),
    }
    tmp = state_dir / (TRAIN_STATE_FILE + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, state_dir / TRAIN_STATE_FILE)  # an interruption mid-write keeps the old state


def _restore(path: Path, fingerprint: str, value_heads: ValueHeads, trunk: TrainingTrunk,
             optimizer) -> tuple[int, list[dict]]:
    state = torch.load(path, weights_only=True)  # tensors and plain data only: no pickled code
    if state["run"] != fingerprint:
        raise ValueError(
            f"{path} holds the training state of a run with different settings; resume with the same "
            f"settings and data, or delete {path.parent} to start afresh")
    value_heads.load_state_dict(state["heads"])
    params = trunk.trainable_parameters()
    with torch.no_grad():
        for name, value in state["trunk"].items():
            params[name].copy_(value)
    optimizer.load_state_dict(state["optimizer"])
    return int(state["step"]), json.loads(state["curve"])
