"""Continuous batching: requests join and leave one running decode batch between steps.

From "Orca: A Distributed Serving System for Transformer-Based Generative Models" (Yu et al.,
2022; iteration-level scheduling) with the chunked prefill of "SARATHI: Efficient LLM Inference by
Piggybacking Decodes with Chunked Prefills" (Agrawal et al., 2023). Each :meth:`Engine.step` runs
at most one prefill chunk (of the request being admitted, into its own one-row cache) and one
decode step of the running batch; a request whose prompt is done joins the batch (its cache rows
are merged in, see :mod:`efformer.serve.cache`), and a finished one leaves it and frees its blocks.
Any model whose layers are softmax, sliding-window or fixed-state (recurrent, SSM) mixers is served
by the same loop, hybrids included.
"""

from __future__ import annotations

import itertools
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import pydantic
import torch
from torch import Tensor

from efformer.errors import ConfigError, EfformerError
from efformer.models.cache import Cache
from efformer.models.kv_policy import layer_policies, policy_state
from efformer.models.lm import CausalLM, sample_next
from efformer.options import StrictModel
from efformer.serve.cache import BlockPool, CacheFullError, LayerPages, PagedKVState, merge_states, state_kind


class QueueFullError(EfformerError):
    """The engine's waiting queue is full (back-pressure): retry later."""


class RequestError(EfformerError):
    """A request that can never run (prompt or max_tokens too large for the model or the cache)."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


class SamplingParams(StrictModel):
    """Per-request generation settings."""

    max_tokens: int = pydantic.Field(16, ge=1, description="new tokens at most")
    temperature: float = pydantic.Field(0.0, ge=0, description="0 = greedy")
    top_k: int | None = pydantic.Field(None, ge=1, description="sample among the k most likely tokens")
    top_p: float | None = pydantic.Field(None, gt=0, le=1, description="nucleus sampling mass")
    stop: list[list[int]] = pydantic.Field([], description="token sequences that end generation (not returned)")
    seed: int | None = pydantic.Field(None, description="seed of this request's sampler")

    @pydantic.field_validator("stop")
    @classmethod
    def _nonempty(cls, v: list[list[int]]) -> list[list[int]]:
        if any(len(s) == 0 for s in v):
            raise ValueError("stop sequences must be non-empty token lists")
        return v


@dataclass(eq=False)
class Request:
    """One generation request and its progress; ``on_event(request, new_tokens, finished)`` is called
    from the engine's thread whenever tokens become final (stop-sequence prefixes are held back)."""

    id: str
    prompt: list[int]
    params: SamplingParams
    on_event: Callable[[Request, list[int], bool], None] | None = None
    output: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "length", "stop" or "cancelled"
    emitted: int = 0  # output tokens already given to on_event
    prefilled: int = 0  # prompt tokens already in the cache
    cancelled: bool = False
    cache: Cache | None = None
    blocks: list[int] = field(default_factory=list)
    generator: torch.Generator | None = None

    @property
    def finished(self) -> bool:
        """Whether the request is done (its tokens are final)."""
        return self.finish_reason is not None


class Engine:
    """Iteration-level scheduler over one :class:`CausalLM` (see the module docstring).

    Args:
        max_batch: rows of the running decode batch.
        max_queue: waiting requests beyond which :meth:`submit` refuses (QueueFullError).
        block_size, num_blocks: the paged KV pool (default: room for max_batch full-length sequences).
        prefill_chunk: prompt tokens per step (over one or more requests), so a long prompt does not
            stall the running batch.
        kv_policy: a KVPolicy (or dict, or one per layer; see :mod:`efformer.models.kv_policy`) for the
            softmax layers: ``window`` (+ ``sinks``) keeps a bounded sinks + window cache per row instead of
            pages (then a request may run past max_len when no layer needs absolute positions), ``int8``
            stores the pages as int8 codes with per-token scales.
    """

    def __init__(self, model: CausalLM, *, max_batch: int = 8, max_queue: int = 64, block_size: int = 16,
                 num_blocks: int | None = None, prefill_chunk: int = 128, kv_policy=None):
        for name, value in (("max_batch", max_batch), ("max_queue", max_queue), ("block_size", block_size),
                            ("prefill_chunk", prefill_chunk)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(name, value, "a positive integer")
        if not isinstance(model, CausalLM):
            raise ConfigError("model", type(model).__name__, "a CausalLM (decoder language model)")
        self.model = model.eval()
        self.max_len = model.cfg.max_len
        self.max_batch, self.max_queue, self.prefill_chunk = max_batch, max_queue, prefill_chunk
        mixers = [b.mixer for b in model.backbone.blocks]
        self.policies = layer_policies(mixers, kv_policy) if kv_policy is not None else [None] * len(mixers)
        self.kinds = ["streaming" if p is not None and p.window is not None else state_kind(m)
                      for m, p in zip(mixers, self.policies, strict=True)]
        # bounded states everywhere and no position table: a request may generate past max_len
        self.unbounded = "paged" not in self.kinds and model.backbone.pos.kind != "embedding"
        if num_blocks is None:
            num_blocks = max_batch * -(-self.max_len // block_size)
        self.pool = BlockPool(num_blocks, block_size)
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.pages = [LayerPages.empty(self.pool, m.n_kv_heads, m.head_dim, p.device, p.dtype,
                                       int8=pol is not None and pol.int8)
                      if kind == "paged" else None
                      for m, kind, pol in zip(mixers, self.kinds, self.policies, strict=True)]
        self.waiting: deque[Request] = deque()
        self.prefilling: Request | None = None
        self.running: list[Request] = []
        self.batch: Cache | None = None
        self.lock = threading.Lock()  # submit/cancel may come from other threads than step()
        self.stats = {"steps": 0, "decode_rows": 0, "prefill_tokens": 0, "generated": 0, "finished": 0}
        self._ids = itertools.count()

    # ---- the public surface ---------------------------------------------------------------------
    def submit(self, prompt: list[int], params: SamplingParams | dict | None = None, *,
               on_event: Callable | None = None, request_id: str | None = None) -> Request:
        """Queue a request; RequestError if it can never run, QueueFullError when the queue is full."""
        params = params if isinstance(params, SamplingParams) else SamplingParams(**(params or {}))
        if not prompt or not all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            raise RequestError("prompt", "a non-empty list of integer token ids")
        vocab = self.model.cfg.vocab_size
        if min(prompt) < 0 or max(prompt) >= vocab:
            raise RequestError("prompt", f"token ids must lie in [0, {vocab})")
        if len(prompt) >= self.max_len:
            raise RequestError("prompt", f"{len(prompt)} tokens leave no room for a new one within the model's "
                               f"max_len={self.max_len}")
        if len(prompt) + params.max_tokens > self.max_len and not self.unbounded:
            raise RequestError("max_tokens", f"prompt ({len(prompt)} tokens) + max_tokens ({params.max_tokens}) "
                               f"exceeds the model's max_len={self.max_len}")
        if self._blocks_needed(len(prompt), params) > self.pool.num_blocks:
            raise RequestError("max_tokens", f"prompt + max_tokens needs more KV blocks than the pool has "
                               f"({self.pool.num_blocks})")
        req = Request(request_id or f"req-{next(self._ids)}", list(prompt), params, on_event)
        if params.temperature > 0:
            req.generator = torch.Generator(device=self.device)
            req.generator.manual_seed(params.seed if params.seed is not None else torch.seed())
        with self.lock:
            if len(self.waiting) >= self.max_queue:
                raise QueueFullError(f"the engine queue holds {self.max_queue} waiting requests; retry later")
            self.waiting.append(req)
        return req

    def cancel(self, req: Request) -> None:
        """Stop ``req`` at the next step (its slot and blocks are freed then)."""
        req.cancelled = True

    @property
    def has_work(self) -> bool:
        """Whether any request is waiting, prefilling or running."""
        return bool(self.waiting or self.prefilling or self.running)

    def generate(self, prompts: list[list[int]], params: SamplingParams | dict | None = None) -> list[list[int]]:
        """Run ``prompts`` to completion through the engine; their new tokens, in order."""
        reqs = [self.submit(p, params) for p in prompts]
        while self.has_work:
            self.step()
        return [r.output for r in reqs]

    @torch.no_grad()
    def step(self) -> None:
        """One iteration: up to ``prefill_chunk`` prompt tokens (continuing or admitting requests), then
        one decode step of the running batch."""
        self.stats["steps"] += 1
        self._drop_cancelled()
        budget = self.prefill_chunk
        while budget > 0:
            if self.prefilling is None:
                self._admit()
            if self.prefilling is None:
                break
            budget -= self._prefill_chunk(self.prefilling, budget)
        if self.running:
            self._decode()

    # ---- scheduling -----------------------------------------------------------------------------
    def _blocks_needed(self, prompt_len: int, params: SamplingParams) -> int:
        if "paged" not in self.kinds:
            return 0
        return self.pool.blocks_for(prompt_len + params.max_tokens)

    def _admit(self) -> None:
        with self.lock:
            if not self.waiting or len(self.running) >= self.max_batch:
                return
            req = self.waiting[0]
            try:  # every block the request can need, reserved up front: a running row never runs out
                blocks = self.pool.allocate(self.pool.block_size * self._blocks_needed(len(req.prompt), req.params))
            except CacheFullError:
                return  # back-pressure: wait for running requests to free blocks
            self.waiting.popleft()
        req.blocks = blocks
        req.cache = self._new_cache(req)
        self.prefilling = req

    def _new_cache(self, req: Request) -> Cache:
        states = []
        for blk, kind, pages, pol in zip(self.model.backbone.blocks, self.kinds, self.pages, self.policies,
                                         strict=True):
            if kind == "paged":
                states.append(PagedKVState.for_tables(pages, [req.blocks], self.pool.block_size))
            else:
                states.append(policy_state(blk.mixer, pol, 1, self.device, self.dtype))
        return Cache(states=states, next_position=torch.zeros(1, dtype=torch.long, device=self.device))

    def _prefill_chunk(self, req: Request, budget: int) -> int:
        """Feed up to ``budget`` more prompt tokens of ``req``; the tokens used."""
        start = req.prefilled
        chunk = req.prompt[start : start + budget]
        ids = torch.tensor([chunk], dtype=torch.long, device=self.device)
        logits = self.model(ids, cache=req.cache, logits_to_keep=1)[:, -1]
        req.prefilled += len(chunk)
        self.stats["prefill_tokens"] += len(chunk)
        if req.prefilled < len(req.prompt):
            return len(chunk)
        self.prefilling = None
        self._accept(req, self._sample(req, logits))
        if req.finished:
            self._release(req)
            return len(chunk)
        self.running.append(req)
        if self.batch is None:
            self.batch = req.cache
        else:
            self.batch = Cache(
                states=[merge_states(k, [a, b]) for k, a, b in
                        zip(self.kinds, self.batch.states, req.cache.states, strict=True)],
                next_position=torch.cat([self.batch.next_position, req.cache.next_position]),
            )
        req.cache = None  # its rows now live in the batch
        return len(chunk)

    def _decode(self) -> None:
        last = torch.tensor([[r.output[-1]] for r in self.running], dtype=torch.long, device=self.device)
        logits = self.model(last, cache=self.batch)[:, -1]
        self.stats["decode_rows"] += len(self.running)
        for i, req in enumerate(self.running):
            self._accept(req, self._sample(req, logits[i : i + 1]))
        self._leave([r for r in self.running if r.finished])

    def _sample(self, req: Request, logits: Tensor) -> int:
        p = req.params
        return int(sample_next(logits, p.temperature, p.top_k, p.top_p, req.generator)[0])

    def _accept(self, req: Request, token: int) -> None:
        """Append ``token``; finish on a stop sequence (dropped from the output) or max_tokens; emit what is final."""
        req.output.append(token)
        self.stats["generated"] += 1
        for stop in req.params.stop:
            if req.output[-len(stop):] == stop:
                del req.output[-len(stop):]
                req.finish_reason = "stop"
                break
        else:
            if len(req.output) >= req.params.max_tokens:
                req.finish_reason = "length"
        self._emit(req)

    def _emit(self, req: Request) -> None:
        final = len(req.output) if req.finished else len(req.output) - _held_back(req.output, req.params.stop)
        if final > req.emitted or req.finished:
            new = req.output[req.emitted : max(final, req.emitted)]
            req.emitted = max(final, req.emitted)
            if req.finished:
                self.stats["finished"] += 1
            if req.on_event is not None:
                req.on_event(req, new, req.finished)

    def abort_all(self) -> None:
        """Finish every request (reason "error") and free its blocks: after a failed step."""
        with self.lock:
            waiting, self.waiting = list(self.waiting), deque()
        for req in [*waiting, *([self.prefilling] if self.prefilling else []), *self.running]:
            self._release(req)
            if not req.finished:
                req.finish_reason = "error"
                self._emit(req)
        self.prefilling, self.running, self.batch = None, [], None

    def _drop_cancelled(self) -> None:
        with self.lock:
            for req in [r for r in self.waiting if r.cancelled]:
                self.waiting.remove(req)
                self._finish_cancelled(req)
        if self.prefilling is not None and self.prefilling.cancelled:
            req, self.prefilling = self.prefilling, None
            self._release(req)
            self._finish_cancelled(req)
        gone = [r for r in self.running if r.cancelled and not r.finished]
        for req in gone:
            self._finish_cancelled(req)
        self._leave([r for r in self.running if r.finished])

    def _finish_cancelled(self, req: Request) -> None:
        req.finish_reason = "cancelled"
        self._emit(req)

    def _leave(self, done: list[Request]) -> None:
        if not done:
            return
        keep = [i for i, r in enumerate(self.running) if not r.finished]
        for req in done:
            self._release(req)
        self.running = [self.running[i] for i in keep]
        self.batch = self.batch.select(torch.tensor(keep, dtype=torch.long, device=self.device)) if keep else None

    def _release(self, req: Request) -> None:
        req.cache = None
        self.pool.release(req.blocks)


def _held_back(output: list[int], stops: list[list[int]]) -> int:
    """Length of the longest suffix of ``output`` that a stop sequence could still complete."""
    best = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(output)), best, -1):
            if output[-n:] == stop[:n]:
                best = n
                break
    return best
