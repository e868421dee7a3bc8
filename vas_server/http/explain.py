"""The answer's `vas_explain` (vas_server.params.Explain), API side: the worker's record of one
request, read once its answer is done (`collective_rpc("vas_explain")`, VASWorkerExtension) and
given token text with the server's tokenizer. Remote mode has no worker: there the field is a 400
at the request (steering_fields)."""

from __future__ import annotations

import asyncio
import logging
import secrets

logger = logging.getLogger(__name__)

RPC_TIMEOUT_S = 10.0


def new_key() -> str:
    """The id under which the worker keeps one request's record: unguessable, so that one client
    cannot read another's."""
    return secrets.token_hex(12)


async def fetch(server, key: str) -> dict | None:
    """The record of `key` with each token's text added, or None (logged) when the engine has none."""
    engine = server.state.engine_client
    try:
        results = await asyncio.wait_for(engine.collective_rpc("vas_explain", args=(key,)), RPC_TIMEOUT_S)
    except Exception as e:  # noqa: BLE001 - the answer itself is done; its explanation is extra
        logger.warning("could not read vas_explain from the engine: %r", e)
        return None
    record = next((r for r in results or () if r), None)
    if record is None:
        return None
    tokenizer = engine.renderer.tokenizer
    for token in record["tokens"]:
        for entry in [token, *token["candidates"]]:
            entry["token"] = None if entry["token_id"] is None else tokenizer.decode([entry["token_id"]])
    return record
