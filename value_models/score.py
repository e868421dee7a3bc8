"""`score`: one reward per reward spec per sample, stored in `Sample.rewards[spec]`."""

from __future__ import annotations

from value_models.records import Sample
from value_models.rewards import load_reward


def score(samples: list[Sample], reward_specs: list[str]) -> dict[str, str]:
    """Add the rewards to the samples in place; returns {spec: description}."""
    descriptions = {}
    for spec in reward_specs:
        reward = load_reward(spec)
        values = reward.score([s.prompt for s in samples], [s.response for s in samples])
        for s, v in zip(samples, values, strict=True):
            s.rewards[spec] = v
        descriptions[spec] = reward.description
    return descriptions
