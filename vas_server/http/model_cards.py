"""The model cards of GET /v1/models and /v1/models/{id}: vLLM's own, then one per preset (every
head is one), each with `parent` = the base, so that every listed id can be chosen as `model`."""

from __future__ import annotations

import json
import os

from vas_server.http.asgi import Receive, Scope, Send, capture, send_error, send_json, send_raw
from vas_server.params import VASRequest
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


def preset_card(name: str, preset: Preset, server: ServerView, parent: str | None, created: int) -> dict:
    """A preset's /v1/models card: a model whose parent is the base, with its settings (`vas_preset`,
    top_k as it will apply) and, for a head's own preset, the head's card (`vas_head`)."""
    from dataclasses import asdict

    request = VASRequest(dict(preset.weights), preset.top_k, preset.restrict_to_top_k)
    card = {
        "id": name, "object": "model", "created": created, "owned_by": "vas-server", "root": parent,
        "parent": parent, "max_model_len": None, "permission": [],
        "vas_preset": {**request.report(), "top_k": server.config.top_k_for(request, server.heads)},
    }
    if preset.head:
        head = server.heads[name]
        card["vas_head"] = {"value_model": head.value_model, "kind": head.spec.kind,
                            "description": head.spec.description, "trunk": asdict(head.trunk),
                            "runtime": head.runtime, "reward_mean": head.spec.reward_mean,
                            "reward_std": head.spec.reward_std,
                            "num_training_samples": head.spec.num_training_samples}
    return card
