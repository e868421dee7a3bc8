"""The engine core of remote-base mode: AsyncLLM's engine, decoding every request against an upstream.

vLLM's `AsyncLLM` (tokenization, chat templates, detokenization, stop strings, `n`, streaming,
usage) runs here unchanged; only its engine core is replaced. `RemoteEngineCore` has the calls
AsyncLLM makes of one (`add_request_async`, `get_output_async`, `abort_requests_async`, ...) and
decodes each request with its own token loop. Per token:

  1. one upstream call (vas_server.remote.upstream): the base's draw at the request's temperature
     and its top-K raw log-probs, the VAS candidates C;
  2. the candidates' values from the local value runtime, batched with every other loop that is
     ready at the same moment (vas_server.remote.scoring); the value trunks took the context's
     last token while the upstream call ran;
  3. a token from VAS's distribution over C and the tail (vas_server.remote.sampling), which may
     take more upstream calls;
  4. the token, and its log-probs when asked, to AsyncLLM as an EngineCoreOutput.

With drafting (`draft_cap` > 1, at T = 0 and T = 1 only: vas_server.remote.draft says why) a
round replaces steps 1-4: one upstream call drafts n tokens with the top-K log-probs at each
position; the value runtime scores the n positions' candidates in one pass per value model (the
drafted tokens not committed); vas_server.remote.draft.verify accepts a prefix of the draft and
may add VAS's own token at the first rejection; the accepted drafted tokens become committed
in the value cache at the next advance (ValueRuntime.commit_draft), the rejected ones never do;
the emitted tokens go to AsyncLLM in one EngineCoreOutput, cut at eos, a stop token or
max_tokens. n adapts to the request's acceptance (draft.DraftLength).
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus
from types import SimpleNamespace

import numpy as np
import torch

from vllm.exceptions import GracefulHTTPError, VLLMValidationError
from vllm.logger import init_logger
from vllm.sampling_params import SamplingParams, SamplingType
from vllm.v1.engine import EngineCoreOutput, EngineCoreOutputs, EngineCoreRequest, FinishReason
from vllm.v1.outputs import LogprobsLists

from vas_server.config import VASConfig
from vas_server.core import rule
from vas_server.core.scorer import TokenLists, ValueRow
from vas_server.core.value_runtime import ValueRuntime
from vas_server.params import REMOTE_RECORD_KEY, VASRequest
from vas_server.remote.capabilities import clamp
from vas_server.remote.draft import DraftLength, drafts_at, verify
from vas_server.remote.sampling import Step, steered_step
from vas_server.remote.scoring import BatchedScorer
from vas_server.remote.upstream import Upstream, UpstreamError
from vas_server.remote.wire import Draw

logger = init_logger("vllm.plugins.vas.remote")  # vLLM's log format and level
MAX_RECORDS = 10_000


class RemoteEngineCore:
    """The engine core AsyncLLM talks to, decoding every request against `upstream`."""

    def __init__(self, upstream: Upstream, runtime: ValueRuntime, config: VASConfig, draft_cap: int = 1,
                 draft_adaptive: bool = True, logprob_cap: int | None = None):
        self.upstream = upstream
        # The upstream's top log-probs per position (vas_server.remote.capabilities); None: no cap.
        self.logprob_cap = logprob_cap
        self.clamped = 0  # requests whose VAS top-K was above the cap, served at the cap
        self.draft_cap = draft_cap
        self.draft_adaptive = draft_adaptive
        self.drafted = 0  # drafted tokens received, accepted, and wasted (drafted, never emitted)
        self.accepted = 0
        self.wasted = 0
        self.draft_rounds = 0
        self.runtime = runtime
        self.scorer = BatchedScorer(runtime)
        self.config = config
        self.head_infos = config.read_heads()
        self.outputs: asyncio.Queue[EngineCoreOutput] = asyncio.Queue()
        # fail(request_id, error): end one request with `error` as its answer (set by
        # vas_server.remote.serve once AsyncLLM exists: it reaches AsyncLLM's per-request queues).
        self.fail: Callable[[str, Exception], None] | None = None
        self.loops: dict[str, asyncio.Task] = {}
        self.tokens = 0  # tokens generated, and steps drawn from C past MAX_DRAWS (sampling.py)
        self.capped_steps = 0
        self.engine_ranks_managed = [0]
        # What the middleware adds to a finished request's `vas` field, by its key (REMOTE_RECORD_KEY):
        # read once, and at most MAX_RECORDS kept (a client that left never has its record read).
        self.records: OrderedDict[str, int] = OrderedDict()
        # What AsyncLLM reads of an engine core's state (`errored`: resources.engine_dead).
        self.resources = SimpleNamespace(engine_dead=False)

    async def get_supported_tasks_async(self) -> tuple[str, ...]:
        return ("generate",)

    async def add_request_async(self, request: EngineCoreRequest) -> None:
        steering = VASRequest.decode(request.sampling_params.extra_args) or VASRequest({})
        problem = unsupported(request.sampling_params)
        if problem:
            raise VLLMValidationError(f"remote-base mode: {problem}")
        if self.logprob_cap is not None and (request.sampling_params.logprobs or 0) > self.logprob_cap:
            raise VLLMValidationError(f"remote-base mode: logprobs {request.sampling_params.logprobs} is above the "
                                      f"upstream's cap of {self.logprob_cap} top log-probs", parameter="logprobs",
                                      value=request.sampling_params.logprobs)
        self.loops[request.request_id] = asyncio.get_running_loop().create_task(self._decode(request, steering))

    async def abort_requests_async(self, request_ids: list[str]) -> None:
        for request_id in request_ids:
            task = self.loops.pop(request_id, None)
            if task is not None:
                task.cancel()

    async def get_output_async(self) -> EngineCoreOutputs:
        outputs = [await self.outputs.get()]
        while not self.outputs.empty():
            outputs.append(self.outputs.get_nowait())
        return EngineCoreOutputs(outputs=outputs)

    def stats(self) -> dict[str, float]:
        """Remote mode's counters (GET /metrics, vas_server.http.metrics.WORKER_METRICS)."""
        return {"remote_tokens": self.tokens, "remote_upstream_calls": self.upstream.calls,
                "remote_calls_per_token": self.upstream.calls / self.tokens if self.tokens else 0.0,
                "remote_drafted_tokens": self.drafted, "remote_accepted_tokens": self.accepted,
                "remote_wasted_tokens": self.wasted,
                "remote_acceptance_rate": self.accepted / self.drafted if self.drafted else 0.0,
                "remote_clamped_requests": self.clamped, "remote_token_mismatches": self.upstream.mismatches,
                "cache_slots_used": self.runtime.cache_slots_in_use, "cache_slots_total": self.runtime.max_requests}

    async def collective_rpc_async(self, method: str, timeout=None, args=(), kwargs=None):
        """AsyncLLM.collective_rpc: the metrics' `vas_stats`, and the middleware's
        `vas_remote_record` (one finished request's text mismatches, read once)."""
        if method == "vas_stats":
            return [self.stats()]
        if method == REMOTE_RECORD_KEY:
            return [self.records.pop(args[0], None)]
        raise NotImplementedError(f"remote-base mode has no worker to run {method!r}")

    def shutdown(self, timeout: float | None = None) -> None:
        for task in self.loops.values():
            task.cancel()
        self.scorer.shutdown()
        logger.info("remote-base totals: %d tokens, %d upstream calls (%.3f per token), %d value batches of %d rows, "
                    "%d capped steps; %d drafts of %d tokens, %d accepted (%.1f%%), %d wasted",
                    self.tokens, self.upstream.calls, self.upstream.calls / max(1, self.tokens), self.scorer.batches,
                    self.scorer.rows, self.capped_steps, self.draft_rounds, self.drafted, self.accepted,
                    100 * self.accepted / max(1, self.drafted), self.wasted)

    async def _decode(self, request: EngineCoreRequest, steering: VASRequest) -> None:
        """The request's token loop: rounds until eos, a stop token or max_tokens, each round's
        tokens to AsyncLLM as one EngineCoreOutput; a failure ends the request with its status."""
        decoding = None
        try:
            decoding = self._decoding(request, steering)
            if decoding.head_ids and self.runtime.needs_cache_slot(decoding.head_ids):
                decoding.row.cache_slot = await self.scorer.allocate()  # waits while every value-cache slot is taken
            commit = None
            while decoding.generated < decoding.params.max_tokens:
                steps, positions, commit = await self._round(decoding, commit)
                if self._emit(decoding, steps, positions):
                    return
        except UpstreamError as e:
            # The client gets the upstream's failure as its status (502/503/504) and message.
            self.fail(request.request_id, GracefulHTTPError(str(e), HTTPStatus(e.status)))
        except Exception as e:  # a bug here must end the request with a message, not leave it hanging
            logger.exception("remote token loop of %s failed", request.request_id)
            self.fail(request.request_id, GracefulHTTPError(f"remote token loop failed: {e!r}",
                                                            HTTPStatus.INTERNAL_SERVER_ERROR))
        finally:
            self.loops.pop(request.request_id, None)
            if decoding is not None:
                self.scorer.release(decoding.row.cache_slot)
                if decoding.record_key is not None:  # n > 1: the choices share the key, and add up
                    self.records[decoding.record_key] = self.records.get(decoding.record_key, 0) + decoding.mismatches
                    while len(self.records) > MAX_RECORDS:
                        self.records.popitem(last=False)

    def _decoding(self, request: EngineCoreRequest, steering: VASRequest) -> "Decoding":
        """The request's loop state, before its first round (no value-cache slot yet)."""
        params = request.sampling_params
        top_k = self.config.top_k_for(steering, self.head_infos)  # unsteered too: the candidates of an exact draw
        asked = max(top_k, params.logprobs or 0)  # the candidates, and the top log-probs the client wants
        if self.logprob_cap is not None:
            if top_k > self.logprob_cap:
                self.clamped += 1
            top_k, asked = clamp(top_k, params.logprobs, self.logprob_cap)
        temperature = 0.0 if params.sampling_type == SamplingType.GREEDY else params.temperature
        drafting = self.draft_cap > 1 and drafts_at(temperature)
        head_ids = frozenset(self.runtime.head_index[name] for name in steering.weights)
        return Decoding(
            request_id=request.request_id, params=params, top_k=top_k,
            asked=asked,
            temperature=temperature, restrict=steering.restrict_to_top_k, head_ids=head_ids,
            weight_vector=rule.weight_vector(steering.weights, self.runtime.head_index)[None],
            stop_ids=set(params.stop_token_ids or ()),  # vLLM's check_stop: these, and eos unless ignore_eos
            generator=torch.Generator().manual_seed(params.seed if params.seed is not None
                                                    else torch.seed() % 2**31),
            row=ValueRow(None, head_ids, TokenLists(list(request.prompt_token_ids))),
            record_key=(params.extra_args or {}).get(REMOTE_RECORD_KEY),
            # Unsteered, VAS's distribution is the base's: every drafted token is accepted, so
            # every draft asks the cap (without waiting for the acceptance estimate to say so).
            length=DraftLength(self.draft_cap, self.draft_adaptive and bool(head_ids))
            if drafting else None)

    async def _round(self, d: "Decoding", commit: int | None) -> tuple[list[Step], list[Draw], int | None]:
        """One round: the tokens to emit, the positions they were drawn at, and how many drafted
        tokens the value trunks saw that the next round's advance commits (None: not a draft)."""
        context = d.row.tokens.prompt + d.row.tokens.outputs
        # The value trunks take the last tokens (the prompt, at first) while the upstream
        # computes, after keeping the accepted drafted tokens of the last round.
        advancing = self.scorer.advance(d.row, commit) if d.row.cache_slot is not None else None
        if d.length is None:
            first = d.counted(await self.upstream.draw(context, d.asked, temperature=d.temperature,
                                                       seed=_seed(d.generator)))
            return [await self._step(d, first, advancing, context)], [first], None
        n = min(d.length.next(), d.params.max_tokens - d.generated)
        positions = await self.upstream.draft(context, n, d.asked, temperature=d.temperature,
                                              seed=_seed(d.generator), ignore_eos=d.params.ignore_eos)
        for position in positions:
            d.counted(position)
        steps, accepted = await self._verify(d, positions, advancing, context)
        # The positions verified: the accepted ones and the one rejected, if any (not the dropped
        # rest, which says nothing about acceptance).
        d.length.observe(accepted + (accepted < len(positions)), accepted)
        self.draft_rounds += 1
        self.drafted += len(positions)
        self.accepted += accepted
        self.wasted += len(positions) - accepted
        return steps, positions, min(accepted, len(positions) - 1)  # the drafted tokens the trunks saw

    def _emit(self, d: "Decoding", steps: list[Step], positions: list[Draw]) -> bool:
        """Send the round's tokens, cut at eos, a stop token or max_tokens; whether that finished it."""
        params = d.params
        finished, stop_reason, emitted = None, None, []
        for chosen in steps:
            emitted.append(chosen)
            d.generated += 1
            if chosen.token == params.eos_token_id:
                finished = FinishReason.STOP
            elif chosen.token in d.stop_ids:
                finished, stop_reason = FinishReason.STOP, chosen.token
            elif d.generated == params.max_tokens:
                finished = FinishReason.LENGTH
            if finished is not None:
                break
        d.row.tokens.outputs.extend(chosen.token for chosen in emitted)
        self.tokens += len(emitted)
        self.capped_steps += sum(chosen.capped for chosen in emitted)
        self.outputs.put_nowait(EngineCoreOutput(
            d.request_id, [chosen.token for chosen in emitted], finish_reason=finished, stop_reason=stop_reason,
            new_logprobs=None if params.logprobs is None else _logprobs(emitted, positions, params.logprobs)))
        return finished is not None

    async def _step(self, d: "Decoding", first: Draw, advancing, context: list[int]) -> Step:
        """One token from one draw (no drafting): sampling.steered_step."""
        candidates = [t for t, _ in first.top[:d.top_k]]

        async def redraw(banned: bool) -> Draw:
            return d.counted(await self.upstream.draw(context, 1, temperature=d.temperature, seed=_seed(d.generator),
                                                      banned=candidates if banned else ()))

        bonus = None
        if d.head_ids:
            if advancing is not None:
                await advancing
            values = await self.scorer.values(d.row, candidates)
            bonus = rule.bonus(values[None], d.weight_vector)[0]
        return await steered_step(first, d.top_k, bonus, d.temperature, d.restrict, d.generator, redraw)

    async def _verify(self, d: "Decoding", positions: list[Draw], advancing,
                      context: list[int]) -> tuple[list[Step], int]:
        """The tokens of one drafted round: its positions scored in one pass, then draft.verify."""
        candidates = [[t for t, _ in at.top[:d.top_k]] for at in positions]
        bonuses = [None] * len(positions)
        if d.head_ids:
            if advancing is not None:
                await advancing
            values = await self.scorer.draft_values(d.row, [at.token for at in positions[:-1]], candidates)
            bonuses = [rule.bonus(values[i:i + 1, :, :len(c)], d.weight_vector)[0] for i, c in enumerate(candidates)]

        async def tail_draw(i: int) -> Draw:
            prefix = context + [at.token for at in positions[:i]]
            return d.counted(await self.upstream.draw(prefix, 1, temperature=d.temperature, seed=_seed(d.generator),
                                                      banned=candidates[i]))

        return await verify(positions, d.top_k, bonuses, d.temperature, d.restrict, d.generator, tail_draw)


@dataclass(eq=False)
class Decoding:
    """One request's token loop: its settings, fixed at the start, and its progress (`row`'s
    outputs, `generated`, the draft length's observations)."""

    request_id: str
    params: SamplingParams
    top_k: int  # the candidates C
    asked: int  # log-probs asked of the upstream per position: C, and the client's top log-probs
    temperature: float  # 0: greedy
    restrict: bool  # vas_restrict_to_top_k
    head_ids: frozenset[int]  # the steering heads (indices into the runtime's heads)
    weight_vector: torch.Tensor  # [1, n_heads]
    stop_ids: set[int]
    generator: torch.Generator  # every random choice of the loop, seeded by the request's seed
    row: ValueRow  # what the value runtime reads: its cache slot (None: no cached heads), its tokens
    length: DraftLength | None  # None: one token per call
    record_key: str | None = None  # the middleware's key for this request's record (REMOTE_RECORD_KEY)
    generated: int = 0
    mismatches: int = 0  # text mismatches of this request's upstream calls (Upstream.mismatches)

    def counted(self, draw: Draw) -> Draw:
        """`draw`, its call's text mismatches added to the request's."""
        self.mismatches += draw.mismatches
        return draw


def _logprobs(emitted: list[Step], positions: list[Draw], n: int) -> LogprobsLists:
    """vLLM's log-probs of the emitted positions: each chosen token's first, then the base's top n
    there (raw, as in-process VAS reports them: vLLM's default logprobs_mode)."""
    rows = list(zip(emitted, positions))
    # A position with fewer than n (an upstream answering by text listed two candidates with one
    # text once: wire.positions) repeats its last, which the answer's top_logprobs object lists once.
    tops = [(at.top[:n] + at.top[-1:] * (n - len(at.top[:n]))) if at.top else [] for _, at in rows]
    ids = np.array([[chosen.token] + [t for t, _ in top] for (chosen, _), top in zip(rows, tops)], dtype=np.int64)
    logprobs = np.array([[chosen.logprob] + [lp for _, lp in top] for (chosen, _), top in zip(rows, tops)],
                        dtype=np.float32)
    return LogprobsLists(ids, logprobs, np.array([chosen.rank for chosen, _ in rows], dtype=np.int64))


def unsupported(params) -> str | None:
    """Why the remote token loop cannot serve these sampling parameters exactly; None if it can."""
    if params.top_p < 1 or params.top_k not in (0, -1, None) or params.min_p > 0:
        return "top_p, top_k and min_p are not supported"
    if params.min_tokens:
        return "min_tokens is not supported (vLLM bans the stop tokens until then)"
    if (params.presence_penalty or params.frequency_penalty or params.repetition_penalty != 1
            or params.logit_bias or params.allowed_token_ids or params.bad_words):
        return "penalties, logit_bias, allowed_token_ids and bad_words are not supported"
    if params.logprobs is not None and params.logprobs < 0:
        return "logprobs -1 (the whole vocabulary) is not supported"
    if params.prompt_logprobs is not None:
        return "prompt_logprobs are not supported"
    return None


def _seed(generator: torch.Generator) -> int:
    return int(torch.randint(0, 2**31 - 1, (1,), generator=generator))
