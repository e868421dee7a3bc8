"""Presets: named steering settings served as models, for clients that can choose a `model` but
cannot add a body field (chat UIs, LangChain, evaluation harnesses).

A preset is `vas_weights` (+ optionally `vas_top_k`, `vas_restrict_to_top_k`) under a name. It is
listed in GET /v1/models with `parent` = the base, and choosing it as `model` in chat,
completions or responses runs the base with those settings (vas_server.http.middleware). Every head
is also a preset under its own name, at DEFAULT_HEAD_WEIGHT, so every id /v1/models lists can be
chosen.

Written on the command line (or in a `--config` YAML file, as a list):

    --preset NAME=HEAD:WEIGHT[,HEAD:WEIGHT...][@K=TOPK][@restrict]
    --preset cheerful=positive:2
    --preset brief-and-plain=concise:3,simple:1@K=20

Request fields override a preset's, field by field (`override`): a request's `vas_weights`
replaces the preset's weights as a whole (it is not merged head by head), `vas_top_k` its top-K,
`vas_restrict_to_top_k` its restriction. `"vas_weights": {}` therefore runs the base unsteered.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Collection, Mapping

from vas_server.params import API_FIELDS, VASParamError, VASRequest

# The weight of the preset every head gets under its own name: two standard deviations of the
# head's reward. The demo heads steer well there (docs/QUALITY.md: positive peaks near 2.2 at K 256).
DEFAULT_HEAD_WEIGHT = 2.0
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class Preset(VASRequest):
    """A VASRequest under a name: the same contract (strict, validated on construction, no field
    beyond the model's), its weights the non-zero ones, plus whether it is a head's own preset."""

    head: bool = False  # the automatic preset of one head (its name is the head's)

    def to_json(self) -> dict[str, Any]:
        """The preset as VASConfig.presets holds it (in the engine's additional_config)."""
        return {**self.report(), "head": self.head}


def parse(text: str) -> tuple[str, Preset]:
    """`NAME=HEAD:W[,HEAD:W...][@K=N][@restrict]` -> (name, preset). Raises ValueError."""
    name, sep, spec = text.partition("=")
    name = name.strip()
    if not sep or not NAME.match(name) or not spec.strip():
        raise ValueError(f"--preset expects NAME=HEAD:WEIGHT[,HEAD:WEIGHT...][@K=N][@restrict], got {text!r}")
    weights_text, *options = spec.split("@")
    weights: dict[str, float] = {}
    for item in weights_text.split(","):
        head, colon, weight = item.strip().rpartition(":")
        try:
            weights[head.strip()] = float(weight)
        except ValueError:
            raise ValueError(f"preset {name!r}: {item.strip()!r} is not HEAD:WEIGHT") from None
        if not colon or not head.strip():
            raise ValueError(f"preset {name!r}: {item.strip()!r} is not HEAD:WEIGHT")
    top_k, restrict = None, False
    for option in options:
        option = option.strip()
        if option.lower().startswith("k="):
            try:
                top_k = int(option[2:])
            except ValueError:
                raise ValueError(f"preset {name!r}: {option!r} is not K=<integer>") from None
        elif option.lower() == "restrict":
            restrict = True
        else:
            raise ValueError(f"preset {name!r}: unknown option {option!r} (K=<integer> or restrict)")
    try:
        return name, Preset.parse({"weights": weights, "top_k": top_k, "restrict_to_top_k": restrict})
    except VASParamError as e:
        raise ValueError(f"preset {name!r}: {e.args[0]}") from None


@dataclass
class PresetTable:
    """Every preset the server offers, by id: the configured ones and one per head."""

    presets: dict[str, Preset] = field(default_factory=dict)

    @classmethod
    def build(cls, configured: Mapping[str, Mapping[str, Any]], head_names: Collection[str],
              reserved: Collection[str]) -> "PresetTable":
        """Check the configured presets (a name clashing with a head, with `reserved` ids such as
        the base's served names, or an unknown head or bad weight or top-K: ValueError naming the
        preset) and add one preset per head."""
        table: dict[str, Preset] = {}
        for name, raw in configured.items():
            if name in reserved:
                raise ValueError(f"preset {name!r} has the name of a served model; choose another name")
            if name in head_names:
                raise ValueError(f"preset {name!r} has the name of a head (every head is already a preset "
                                 f"at weight {DEFAULT_HEAD_WEIGHT:g}); choose another name")
            try:
                preset = Preset.parse(raw.to_json() if isinstance(raw, Preset) else raw, head_names)
            except VASParamError as e:
                raise ValueError(f"preset {name!r}: {e.args[0]}") from None
            if not preset.active:
                raise ValueError(f"preset {name!r}: no non-zero weight")
            table[name] = preset
        for head in head_names:
            if head in reserved:
                raise ValueError(f"head {head!r} has the name of a served model; a head is also a preset")
            table[head] = Preset({head: DEFAULT_HEAD_WEIGHT}, head=True)
        return cls(table)

    def get(self, model: Any) -> Preset | None:
        return self.presets.get(model) if isinstance(model, str) else None


def override(preset: Preset, body: Mapping[str, Any]) -> dict[str, Any]:
    """The request fields that apply when `body` chose `preset`: each `vas_*` field the body
    gives replaces the preset's, field by field."""
    settings = preset.report()
    for key, field_name in API_FIELDS.items():
        if field_name in body:
            settings[key] = body[field_name]
    return {API_FIELDS[key]: value for key, value in settings.items()}
