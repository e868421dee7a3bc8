"""The model cards of GET /v1/models and /v1/models/{id}: vLLM's own, then one per preset (every
head is one), each with `parent` = the base, so that every listed id can be chosen as `model`.

A preset's card is a `PresetCard` (a head's own preset: a `HeadPresetCard`): OpenAI's model object
(`id`, `object`, `created`, `owned_by`), the fields vLLM's own cards add (`root`, `parent`,
`max_model_len`, `permission`: vLLM's ModelCard), and VAS's. vLLM's cards pass as vLLM wrote them,
but for `root`."""

from __future__ import annotations

import json
import os
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from vas_server.config import Runtime
from vas_server.core.format import TrunkSpec
from vas_server.http.asgi import Receive, Scope, Send, capture, send_error, send_json, send_raw
from vas_server.presets import Preset
from vas_server.http.server_view import ServerView

MODELS_PATH = "/v1/models"


async def list_models(app, server: ServerView, model_id: str | None, scope: Scope, receive: Receive,
                      send: Send) -> None:
    """GET /v1/models (model_id None) or /v1/models/{model_id}: vLLM's cards, then one per preset."""
    list_scope = dict(scope, path=MODELS_PATH, raw_path=MODELS_PATH.encode())
    status, headers, body = await capture(app, list_scope, receive)
    if status != 200:
        return await send_raw(send, status, headers, body)
    listing = json.loads(body)
    cards = listing["data"]
    for card in cards:
        if card.get("root") and os.path.isabs(card["root"]):
            card["root"] = card["id"]  # a model's name, never the serving machine's path
    if cards and server.upstream is not None:
        cards[0]["vas_upstream"] = server.upstream  # what the remote base accepts (remote mode)
    parent = cards[0]["id"] if cards else None
    created = cards[0]["created"] if cards else 0
    cards += [preset_card(name, preset, server, parent, created)
              for name, preset in sorted(server.presets.presets.items())]
    if model_id is None:
        return await send_json(send, 200, listing)
    card = next((c for c in cards if c["id"] == model_id), None)
    if card is None:
        return await send_error(send, 404, f"The model `{model_id}` does not exist.", "model",
                                 "NotFoundError")
    await send_json(send, 200, card)


class PresetCard(BaseModel):
    """A preset as a model whose parent (and root) is the base. `vas_preset` is the preset's
    settings as they apply (VASRequest.report, with top_k resolved by VASConfig.top_k_for)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "vas-server"
    root: str | None
    parent: str | None
    max_model_len: int | None = None
    permission: list[Any] = []
    vas_preset: dict[str, Any]


class HeadCard(BaseModel):
    """What a head's own preset card says of the head (`vas_head`): its value model and spec."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    value_model: str
    kind: str
    description: str
    trunk: TrunkSpec
    runtime: Runtime  # config.HeadInfo's
    reward_mean: float
    reward_std: float
    num_training_samples: int


class HeadPresetCard(PresetCard):
    vas_head: HeadCard


def preset_card(name: str, preset: Preset, server: ServerView, parent: str | None, created: int) -> dict:
    """A preset's /v1/models card (the JSON object): a PresetCard, or for a head's own preset a
    HeadPresetCard."""
    settings = server.applied({**preset.report(), "top_k": server.config.top_k_for(preset, server.head_infos)})
    card = dict(id=name, created=created, root=parent, parent=parent, vas_preset=settings)
    if not preset.head:
        return PresetCard(**card).model_dump()
    head = server.head_infos[name]
    vas_head = HeadCard(value_model=head.value_model, kind=head.spec.kind, description=head.spec.description,
                        trunk=head.trunk, runtime=head.runtime, reward_mean=head.spec.reward_mean,
                        reward_std=head.spec.reward_std, num_training_samples=head.spec.num_training_samples)
    return HeadPresetCard(**card, vas_head=vas_head).model_dump()
