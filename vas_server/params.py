"""One request's steering settings, `VASRequest`, and the one place they are parsed.

The path from HTTP to logits (docs/VAS_RULE.md has the rule itself):
  1. The client sends `vas_weights`, `vas_top_k`, `vas_restrict_to_top_k` at the top level of a
     chat or completions body. The middleware (vas_server.middleware) moves them, with
     `api_extra_args`, into the body's `vllm_xargs` (a misspelt `vas_*` field is an error); vLLM
     copies `vllm_xargs` into `SamplingParams.extra_args`.
  2. vLLM calls the processor's `validate_params` at admission, in the API process: it runs
     `from_extra_args`, whose `VASParamError` is a `VLLMValidationError`, so vLLM answers 400
     naming the field.
  3. In the worker the processor reads the same `from_extra_args` again (it is the engine's only
     way to see a request's settings) and builds its row from the result.

`extra_args["vas"]` holds a JSON string, because vLLM's `vllm_xargs` carries only scalars and
lists: `{"weights": {"positive": 2.0}, "top_k": 20, "restrict_to_top_k": false}`. A direct engine
user may put the same object there as a dict.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Collection, Mapping

from vllm.exceptions import VLLMValidationError

from vas_server.core.format import TOP_K_RANGE, is_top_k

EXTRA_ARGS_KEY = "vas"
API_FIELDS = {"weights": "vas_weights", "top_k": "vas_top_k", "restrict_to_top_k": "vas_restrict_to_top_k"}
# |w| above this is refused. Weights are in standard deviations of a head's reward: the demo heads
# are evaluated up to 8, and 100 already makes the value bonus dominate any logit gap. A bound keeps
# every logit the processor writes finite (docs/VAS_RULE.md, "Numerical safety").
MAX_ABS_WEIGHT = 100.0


class VASParamError(VLLMValidationError, ValueError):
    """Invalid steering settings. `parameter` names the API field (`vas_weights`, ...). A
    VLLMValidationError, so that vLLM answers 400 naming the field; a ValueError for callers that
    catch those."""

    def __init__(self, param: str, message: str):
        super().__init__(message, parameter=param)


@dataclass(frozen=True)
class VASRequest:
    weights: dict[str, float]  # head name -> weight; only non-zero weights
    top_k: int | None = None  # None: the default, resolved by VASConfig.top_k_for
    restrict_to_top_k: bool = False

    @property
    def active(self) -> bool:
        """A request with no non-zero weight behaves exactly like plain vLLM."""
        return bool(self.weights)

    def to_extra_args(self) -> dict[str, str]:
        """The `extra_args` (or `vllm_xargs`) entry that carries these settings."""
        settings = {"weights": self.weights, "top_k": self.top_k, "restrict_to_top_k": self.restrict_to_top_k}
        return {EXTRA_ARGS_KEY: json.dumps(settings)}

    def report(self) -> dict[str, Any]:
        """What a response says was applied (the `vas` field)."""
        return {"weights": dict(self.weights), "top_k": self.top_k, "restrict_to_top_k": self.restrict_to_top_k}

    @classmethod
    def from_extra_args(cls, extra_args: Mapping[str, Any] | None,
                        known_heads: Collection[str] | None = None) -> VASRequest | None:
        """Validate `extra_args["vas"]`; None when the request does not ask for steering.

        Raises VASParamError naming the API field for: settings that are not a JSON object, an
        unknown key, weights that are not an object, an unknown head (when `known_heads` is
        given), a weight that is not a number (booleans and strings are not numbers) or whose
        magnitude exceeds MAX_ABS_WEIGHT, a top_k that is not an integer in 1..256, a
        restrict_to_top_k that is not a boolean.
        """
        raw = (extra_args or {}).get(EXTRA_ARGS_KEY)
        if raw is None:
            return None
        if isinstance(raw, str):
            try:
                raw = json.loads(raw)
            except ValueError:
                raise VASParamError("vllm_xargs", "vllm_xargs['vas'] must be a JSON object") from None
        if not isinstance(raw, Mapping):
            raise VASParamError("vllm_xargs", "vllm_xargs['vas'] must be a JSON object")
        extra = sorted(set(raw) - set(API_FIELDS))
        if extra:
            raise VASParamError("vllm_xargs", f"unknown VAS setting(s) {extra}; known: {sorted(API_FIELDS)}")
        return cls(weights=_weights(raw.get("weights"), known_heads), top_k=_top_k(raw.get("top_k")),
                   restrict_to_top_k=_restrict(raw.get("restrict_to_top_k")))


def api_extra_args(body: Mapping[str, Any]) -> dict[str, str] | None:
    """The `vllm_xargs` entry for an API body's top-level `vas_*` fields; None when the body has
    none. The values are only moved here; `VASRequest.from_extra_args` checks them (in the
    middleware, so that a streaming request is refused before its stream starts, and again at
    vLLM's admission, which also covers requests that bypass the middleware)."""
    unknown = sorted(k for k in body if k.startswith("vas_") and k not in API_FIELDS.values())
    if unknown:
        raise VASParamError(unknown[0], f"unknown field {unknown[0]!r}; the steering fields are "
                                        f"{', '.join(API_FIELDS.values())}")
    if not any(field in body for field in API_FIELDS.values()):
        return None
    raw = {key: body[field] for key, field in API_FIELDS.items() if field in body}
    return {EXTRA_ARGS_KEY: json.dumps(raw)}


def make_extra_args(weights: Mapping[str, float] | None = None, top_k: int | None = None,
                    restrict_to_top_k: bool = False) -> dict[str, str]:
    """`SamplingParams.extra_args` asking for VAS, for direct engine users (tests, benchmarks)."""
    return VASRequest(dict(weights or {}), top_k, restrict_to_top_k).to_extra_args()


def _weights(weights: Any, known_heads: Collection[str] | None) -> dict[str, float]:
    if weights is None:
        return {}
    if not isinstance(weights, Mapping):
        raise VASParamError("vas_weights", "vas_weights must be an object mapping head names to numbers")
    clean: dict[str, float] = {}
    for name, w in weights.items():
        if known_heads is not None and name not in known_heads:
            raise VASParamError("vas_weights", f"vas_weights: unknown head {name!r}; known heads: "
                                               f"{', '.join(sorted(known_heads)) or '(none)'}")
        # Integers are compared before any float conversion: 10**400 must not overflow.
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not abs(w) <= MAX_ABS_WEIGHT:
            raise VASParamError("vas_weights", f"vas_weights[{name!r}] must be a number in "
                                               f"-{MAX_ABS_WEIGHT:g}..{MAX_ABS_WEIGHT:g}, got {_short(w)}")
        if w != 0:
            clean[str(name)] = float(w)
    return clean


def _top_k(top_k: Any) -> int | None:
    if top_k is not None and not is_top_k(top_k):
        raise VASParamError("vas_top_k", f"vas_top_k must be an integer in {TOP_K_RANGE[0]}..{TOP_K_RANGE[1]}, "
                                         f"got {_short(top_k)}")
    return top_k


def _restrict(restrict: Any) -> bool:
    if restrict is None:
        return False
    if not isinstance(restrict, bool):
        raise VASParamError("vas_restrict_to_top_k", f"vas_restrict_to_top_k must be a boolean, got {_short(restrict)}")
    return restrict


def _short(value: Any) -> str:
    """A value for an error message, cut short (a 10**400 weight must not make a 400-digit message)."""
    try:
        text = repr(value)
    except ValueError:  # an integer past Python's digit limit for str()
        return "a number too large to print"
    return text if len(text) <= 40 else text[:37] + "..."

