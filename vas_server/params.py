"""One request's steering settings, `VASRequest`: a strict pydantic model, validated once per
request path, then trusted.

The settings travel in `SamplingParams.extra_args["vas"]`, a JSON string (vLLM's `vllm_xargs`
carries only scalars and lists): `{"weights": {"positive": 2.0}, "top_k": 20,
"restrict_to_top_k": false}`. Two request paths reach the engine:

  * HTTP through vas-server's middleware (vas-server serve, or vllm serve --middleware): the
    body's `vas_*` fields (and a `vllm_xargs["vas"]` it may carry) become a VASRequest in
    `VASRequest.from_api`, the path's one validation, with the engine's heads; the middleware
    resolves the top-K (VASConfig.top_k_for) and writes `admitted(request)`: the serialised
    settings and a stamp. vLLM's `validate_params` (VASLogitsProcessor), which runs in the same
    process, sees the stamp and does not check them again.
  * Everything else (a direct `vllm.LLM` user, vllm serve without the middleware): vLLM's
    `validate_params` runs `VASRequest.from_extra_args`, the path's one validation. It has no
    engine configuration (vLLM calls it with the request alone), so head names are not checked
    there: the worker runs a request naming a head it does not serve unsteered, logged
    (docs/SERVER.md).

In the worker, `VASRequest.decode` reads the settings without validating them again
(`model_construct`).

The contract is the model: strict types (a string is not a number, a bool is not an integer, a
float is not a top-K), no field beyond the three, `null` meaning the default. Every validation
failure is a VASParamError naming the API field (`vas_weights`, ...), with this module's message
(`_param_error`), not pydantic's: the message and the field are what a client of the 400 sees.
The 400's `param` is the exact field, as a path in OpenAI's style (dots for object keys, as in
`messages[0].content`): `vas_weights.positive` for the weight of head `positive`, the same path
the body guard names (vas_server.http.request_guard) and the message starts with.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
from typing import Annotated, Any, Collection, Mapping, Self

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from vllm.exceptions import VLLMValidationError

from vas_server.core.format import TOP_K_RANGE, is_top_k

EXTRA_ARGS_KEY = "vas"
API_FIELDS = {"weights": "vas_weights", "top_k": "vas_top_k", "restrict_to_top_k": "vas_restrict_to_top_k"}
# The opt-in per-token explanation (`Explain`): an API field of its own, not a steering setting.
EXPLAIN_FIELD = "vas_explain"
# Over a remote base, a steered request's extra_args entry: the middleware's key under which the
# engine core keeps what the request's `vas` field adds (its upstream text mismatches).
REMOTE_RECORD_KEY = "vas_remote_record"
EXPLAIN_KEY = "vas_explain"  # its extra_args entry: {"id": <the middleware's key>, "top": n}
MAX_EXPLAIN_CANDIDATES = 10  # candidates per token an answer may ask for
MAX_EXPLAIN_TOKENS = 512  # tokens explained per request; later ones are not recorded
# |w| above this is refused. Weights are in standard deviations of a head's reward: the demo heads
# are evaluated up to 8, and 100 already makes the value bonus dominate any logit gap. A bound keeps
# every logit the processor writes finite (docs/VAS_RULE.md, "Numerical safety").
MAX_ABS_WEIGHT = 100.0

Weight = Annotated[float, Field(ge=-MAX_ABS_WEIGHT, le=MAX_ABS_WEIGHT, allow_inf_nan=False)]
TopK = Annotated[int, Field(ge=TOP_K_RANGE[0], le=TOP_K_RANGE[1])]


class VASParamError(VLLMValidationError, ValueError):
    """Invalid steering settings. `parameter` names the API field (`vas_top_k`), or the path of a
    value inside one (`vas_weights.positive`). A VLLMValidationError, so that vLLM answers 400
    naming it; a ValueError for callers that catch those."""

    def __init__(self, param: str, message: str):
        super().__init__(message, parameter=param)


class VASRequest(BaseModel):
    """The settings applied: only non-zero weights, each a finite number within MAX_ABS_WEIGHT;
    top_k None for the default (resolved by VASConfig.top_k_for). Constructing one validates it
    (a pydantic ValidationError); `parse` validates a wire object and raises VASParamError."""

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)

    # Each description is what the 400's message says the field must be (`_param_error`).
    weights: dict[str, Weight] = Field({}, description="an object mapping head names to numbers")
    top_k: TopK | None = Field(None, description=f"an integer in {TOP_K_RANGE[0]}..{TOP_K_RANGE[1]}")
    restrict_to_top_k: bool = Field(False, description="a boolean")

    def __init__(self, weights: Mapping[str, float] | None = None, top_k: int | None = None,
                 restrict_to_top_k: bool = False, **fields: Any):
        # Positional, as the dataclass it was: VASRequest({"positive": 2.0}, 20). pydantic calls
        # it from model_validate too, so it passes everything on: unknown fields are refused there.
        super().__init__(weights=weights, top_k=top_k, restrict_to_top_k=restrict_to_top_k, **fields)

    @model_validator(mode="before")
    @classmethod
    def _null_is_the_default(cls, raw: Any) -> Any:
        # JSON `null` (or Python None) for a setting means "not given", as for vLLM's own fields.
        return {k: v for k, v in raw.items() if v is not None} if isinstance(raw, dict) else raw

    @field_validator("weights")
    @classmethod
    def _non_zero(cls, weights: dict[str, float]) -> dict[str, float]:
        return {name: w for name, w in weights.items() if w != 0}

    @property
    def active(self) -> bool:
        """A request with no non-zero weight behaves exactly like plain vLLM."""
        return bool(self.weights)

    def to_extra_args(self) -> dict[str, str]:
        """The `extra_args` (or `vllm_xargs`) entry that carries these settings."""
        return {EXTRA_ARGS_KEY: json.dumps(self.report())}

    def report(self) -> dict[str, Any]:
        """What a response says was applied (the `vas` field): the settings alone, also for a
        subclass with fields of its own (presets.Preset)."""
        return {"weights": dict(self.weights), "top_k": self.top_k, "restrict_to_top_k": self.restrict_to_top_k}

    @classmethod
    def from_extra_args(cls, extra_args: Mapping[str, Any] | None) -> VASRequest | None:
        """Validate `extra_args["vas"]` (a JSON string, or the same object as a dict); None when
        the request does not ask for steering. Raises VASParamError (see `parse`)."""
        raw = (extra_args or {}).get(EXTRA_ARGS_KEY)
        return None if raw is None else cls.parse(_settings_object(raw))

    @classmethod
    def from_api(cls, body: Mapping[str, Any], known_heads: Collection[str]) -> VASRequest | None:
        """Validate an API body's steering: its top-level `vas_*` fields over the settings a
        `vllm_xargs["vas"]` in it may carry; None when it has neither. Raises VASParamError
        naming the field, also for a misspelt `vas_*` field."""
        # The body is vLLM's to validate, so this is not a pydantic model with extra="forbid":
        # only the `vas_` prefix is ours.
        known = (*API_FIELDS.values(), EXPLAIN_FIELD)
        unknown = sorted(k for k in body if k.startswith("vas_") and k not in known)
        if unknown:
            raise VASParamError(unknown[0], f"unknown field {unknown[0]!r}; the steering fields are "
                                            f"{', '.join(known)}")
        xargs = body.get("vllm_xargs")
        given = xargs.get(EXTRA_ARGS_KEY) if isinstance(xargs, Mapping) else None
        fields = {key: body[field] for key, field in API_FIELDS.items() if field in body}
        if given is None and not fields:
            return None
        raw = {**(_settings_object(given) if given is not None else {}), **fields}
        return cls.parse(raw, known_heads)

    @classmethod
    def parse(cls, raw: Mapping[str, Any], known_heads: Collection[str] | None = None) -> Self:
        """The validation of a settings object, the one both request paths run (and presets).
        Raises VASParamError naming the API field (the weight's path for a weight or an unknown
        head) for: an unknown key, weights that are not an object, an unknown head (when
        `known_heads` is given), a weight that is not a number (booleans and strings are not
        numbers) or whose magnitude exceeds MAX_ABS_WEIGHT, a top_k that is not an integer in
        1..256, a restrict_to_top_k that is not a boolean."""
        weights = raw.get("weights")
        if known_heads is not None and isinstance(weights, Mapping):
            # The server's heads are not the model's to know (the engine path has none), so they are
            # checked here, before any value: a weight of 0 for a head this server lacks is still a
            # mistake worth a 400.
            for name in weights:
                if name not in known_heads:
                    raise VASParamError(_weight_path(name), f"vas_weights: unknown head {name!r}; known heads: "
                                                           f"{', '.join(sorted(known_heads)) or '(none)'}")
        try:
            return cls.model_validate(raw)
        except ValidationError as e:
            raise _param_error(e) from None

    @classmethod
    def decode(cls, extra_args: Mapping[str, Any] | None) -> VASRequest | None:
        """The settings admission validated, read back in the worker; None when unsteered. Not a
        validation: it only refuses what the sampler could not take (ValueError for a top-K out
        of range, and what a malformed object raises: KeyError, TypeError, AttributeError), which
        only a request that bypassed vLLM's admission can carry; the worker then runs it
        unsteered."""
        raw = (extra_args or {}).get(EXTRA_ARGS_KEY)
        if raw is None:
            return None
        raw = json.loads(raw) if isinstance(raw, str) else raw
        weights = {str(name): float(w) for name, w in (raw.get("weights") or {}).items() if w != 0}
        top_k = raw.get("top_k")
        if top_k is not None and not is_top_k(top_k):
            raise ValueError(f"top_k {top_k!r} out of range")
        return cls.model_construct(weights=weights, top_k=top_k, restrict_to_top_k=raw.get("restrict_to_top_k") is True)


class Explain(BaseModel):
    """A request's opt-in per-token explanation (`vas_explain`): for each generated token (the
    first MAX_EXPLAIN_TOKENS), its `top` most probable steered candidates with their base and
    steered probabilities and each weighted head's centred contribution. Off (None) by default;
    the worker then does no work for it. `id` is the middleware's key for the worker's record,
    never the client's."""

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)

    top: int = Field(ge=1, le=MAX_EXPLAIN_CANDIDATES)
    id: str = ""

    @classmethod
    def from_api(cls, body: Mapping[str, Any]) -> "Explain | None":
        """The body's `vas_explain`: an integer 1..MAX_EXPLAIN_CANDIDATES (candidates per token),
        or null / absent for off. Raises VASParamError naming the field; also when it is asked
        with `n` > 1 (one record per request) or `best_of`."""
        raw = body.get(EXPLAIN_FIELD)
        if raw is None:
            return None
        if type(raw) is not int or not 1 <= raw <= MAX_EXPLAIN_CANDIDATES:
            raise VASParamError(EXPLAIN_FIELD, f"{EXPLAIN_FIELD} must be an integer in 1..{MAX_EXPLAIN_CANDIDATES} "
                                               f"(candidates per token) or null, got {_short(raw)}")
        if body.get("n") not in (None, 1) or body.get("best_of") not in (None, 1):
            raise VASParamError(EXPLAIN_FIELD, f"{EXPLAIN_FIELD} explains one answer: it needs n = 1")
        return cls(top=raw)

    def to_extra_args(self) -> dict[str, str]:
        return {EXPLAIN_KEY: json.dumps({"id": self.id, "top": self.top})}

    @classmethod
    def decode(cls, extra_args: Mapping[str, Any] | None) -> "Explain | None":
        """Read back in the worker; None when off or unreadable (only a request that bypassed the
        middleware can carry an unreadable one: it is then not explained)."""
        raw = (extra_args or {}).get(EXPLAIN_KEY)
        if not isinstance(raw, str):
            return None
        try:
            return cls.model_validate_json(raw)
        except ValidationError:
            return None


# Settings the middleware validated carry STAMP_KEY: an HMAC of their JSON under a key that only
# this process knows, so that validate_params (vLLM runs it in the same API-server process) can
# tell them from settings a client wrote into `vllm_xargs` itself, which it validates.
STAMP_KEY = "vas_admitted"
_STAMP_SECRET = secrets.token_bytes(32)


def _stamp(settings: str) -> str:
    return hmac.new(_STAMP_SECRET, settings.encode(), hashlib.sha256).hexdigest()


def admitted(request: VASRequest) -> dict[str, str]:
    """The `vllm_xargs` entries of settings the middleware validated: the settings and a stamp."""
    extra_args = request.to_extra_args()
    return {**extra_args, STAMP_KEY: _stamp(extra_args[EXTRA_ARGS_KEY])}


def is_admitted(extra_args: Mapping[str, Any] | None) -> bool:
    """Whether `extra_args` holds settings the middleware of this process validated."""
    settings, stamp = (extra_args or {}).get(EXTRA_ARGS_KEY), (extra_args or {}).get(STAMP_KEY)
    return isinstance(settings, str) and isinstance(stamp, str) and hmac.compare_digest(stamp, _stamp(settings))


def make_extra_args(weights: Mapping[str, float] | None = None, top_k: int | None = None,
                    restrict_to_top_k: bool = False) -> dict[str, str]:
    """`SamplingParams.extra_args` asking for VAS, for direct engine users (tests, benchmarks).
    Not validated here: vLLM's validate_params does that, as for any direct user."""
    return VASRequest.model_construct(weights=dict(weights or {}), top_k=top_k,
                                      restrict_to_top_k=restrict_to_top_k).to_extra_args()


def _settings_object(raw: Any) -> Mapping[str, Any]:
    """`extra_args["vas"]` as an object: a JSON string is decoded."""
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except ValueError:
            raise VASParamError("vllm_xargs", "vllm_xargs['vas'] must be a JSON object") from None
    if not isinstance(raw, Mapping):
        raise VASParamError("vllm_xargs", "vllm_xargs['vas'] must be a JSON object")
    return raw


def _param_error(error: ValidationError) -> VASParamError:
    """The VASParamError of a failed validation: unknown settings first (as a whole), then the
    first failed field, named by its API field."""
    errors = error.errors(include_url=False, include_context=False)
    extra = sorted(str(e["loc"][0]) for e in errors if e["type"] == "extra_forbidden")
    if extra:
        return VASParamError("vllm_xargs", f"unknown VAS setting(s) {extra}; known: {sorted(API_FIELDS)}")
    first = errors[0]
    loc, value = first["loc"], first["input"]
    if not loc:  # not an object at all (parse was given something other than a mapping)
        return VASParamError("vllm_xargs", "vllm_xargs['vas'] must be a JSON object")
    if loc[0] == "weights" and len(loc) == 2:  # one weight (for a key that is not a string: the object)
        param, kind = _weight_path(str(loc[1])), f"a number in -{MAX_ABS_WEIGHT:g}..{MAX_ABS_WEIGHT:g}"
    else:
        param, kind = API_FIELDS[loc[0]], VASRequest.model_fields[loc[0]].description
    return VASParamError(param, f"{param} must be {kind}, got {_short(value)}")


def _weight_path(head: str) -> str:
    """The 400's `param` for the weight of `head`: its path in the body, OpenAI's style."""
    return f"{API_FIELDS['weights']}.{head}"


def _short(value: Any) -> str:
    """A value for an error message, cut short (a 10**400 weight must not make a 400-digit message)."""
    try:
        text = repr(value)
    except ValueError:  # an integer past Python's digit limit for str()
        return "a number too large to print"
    return text if len(text) <= 40 else text[:37] + "..."
