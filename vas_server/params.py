"""Per-request VAS settings and their validation.

A request asks for steering through `SamplingParams.extra_args["vas"]`:
    {"id": "<unique key>", "weights": {"positive": 2.0}, "top_k": 20, "restrict_to_top_k": false}
`id` is our own request key: vLLM's logits-processor rows carry no request id, and a preempted
request is removed and re-added, so the processor keys its per-request state by this value.
The HTTP API exposes the same settings as `vas_weights`, `vas_top_k`, `vas_restrict_to_top_k`;
error messages use those names so an API user can tell which field was wrong.
"""

from __future__ import annotations

import math
import uuid
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

EXTRA_ARGS_KEY = "vas"
TOP_K_RANGE = (1, 256)
DEFAULT_TOP_K = 20


class VASParamError(ValueError):
    """Invalid VAS request settings. `param` names the offending API field."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class VASRequest:
    key: str
    weights: dict[str, float]  # only non-zero weights
    top_k: int | None  # None: the server's default
    restrict_to_top_k: bool

    @property
    def active(self) -> bool:
        """A request with no non-zero weight behaves exactly like plain vLLM."""
        return bool(self.weights)


def make_extra_args(weights: Mapping[str, float] | None = None, top_k: int | None = None,
                    restrict_to_top_k: bool = False, key: str | None = None) -> dict[str, Any]:
    """The `extra_args` of a SamplingParams that asks for VAS."""
    return {EXTRA_ARGS_KEY: {"id": key or uuid.uuid4().hex, "weights": dict(weights or {}),
                             "top_k": top_k, "restrict_to_top_k": restrict_to_top_k}}


def parse_request(extra_args: Mapping[str, Any] | None, known_heads: Iterable[str] | None = None) -> VASRequest | None:
    """Validate and normalise `extra_args["vas"]`; None if the request does not use VAS.

    Raises VASParamError naming the field for: a non-object weights field, an unknown head
    (listing the known ones, when `known_heads` is given), a weight that is not a finite
    number, a top_k outside 1..256, a non-boolean restrict_to_top_k.
    """
    raw = (extra_args or {}).get(EXTRA_ARGS_KEY)
    if raw is None:
        return None
    if not isinstance(raw, Mapping):
        raise VASParamError("vas", "VAS settings must be an object")
    weights = raw.get("weights") or {}
    if not isinstance(weights, Mapping):
        raise VASParamError("vas_weights", "vas_weights must be an object mapping head names to numbers")
    known = sorted(known_heads) if known_heads is not None else None
    clean: dict[str, float] = {}
    for name, w in weights.items():
        if known is not None and name not in known:
            raise VASParamError(
                "vas_weights", f"vas_weights: unknown head {name!r}; known heads: {', '.join(known) or '(none)'}")
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w):
            raise VASParamError("vas_weights", f"vas_weights[{name!r}] must be a finite number, got {w!r}")
        if w != 0:
            clean[str(name)] = float(w)
    top_k = raw.get("top_k")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int)
                              or not TOP_K_RANGE[0] <= top_k <= TOP_K_RANGE[1]):
        raise VASParamError("vas_top_k", f"vas_top_k must be an integer in {TOP_K_RANGE[0]}..{TOP_K_RANGE[1]}, got {top_k!r}")
    restrict = raw.get("restrict_to_top_k", False)
    if restrict is None:
        restrict = False
    if not isinstance(restrict, bool):
        raise VASParamError("vas_restrict_to_top_k", f"vas_restrict_to_top_k must be a boolean, got {restrict!r}")
    key = raw.get("id") or uuid.uuid4().hex
    return VASRequest(key=str(key), weights=clean, top_k=top_k, restrict_to_top_k=restrict)
