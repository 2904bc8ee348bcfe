"""Causal language model with cached generation (greedy, temperature, top-k, top-p, stop tokens)."""

from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from efformer.errors import ConfigError, ShapeError
from efformer.models.backbone import Backbone, check_tensor
from efformer.models.cache import Cache
from efformer.models.config import ModelConfig
from efformer.models.kv_policy import layer_policies, policy_state


class CausalLM(nn.Module):
    """Decoder-only LM: token ids (b, n) -> next-token logits (b, n, vocab)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.backbone = Backbone(cfg)
        if not cfg.tie_embeddings:
            self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)

    def forward(
        self, input_ids: Tensor, *, mask: Tensor | None = None, cache: Cache | None = None,
        positions: Tensor | None = None, logits_to_keep: int | None = None, segments: Tensor | None = None,
    ) -> Tensor:
        """Logits (b, n, vocab), or of the last ``logits_to_keep`` positions only (b, k, vocab); with
        ``cache`` the tokens extend the cached context (updated in place); ``segments`` (b, n) packs
        several sequences per row (see :meth:`Backbone.forward`)."""
        if logits_to_keep is not None and (not _is_int(logits_to_keep) or logits_to_keep < 1):
            raise ConfigError("logits_to_keep", logits_to_keep, "a positive integer (the last k positions), or None")
        check_tensor("input_ids", input_ids)
        if input_ids.dim() == 2:
            _check_cache(cache, tuple(input_ids.shape))
        h = self.backbone(self.backbone.embed_tokens(input_ids), mask=mask, positions=positions, cache=cache,
                          segments=segments)
        if logits_to_keep is not None and logits_to_keep < h.shape[1]:
            h = h[:, -logits_to_keep:]  # the vocab projection dominates a long prefill; skip unused rows
        return self._logits(h)

    def _logits(self, h: Tensor) -> Tensor:
        """Logits (..., vocab) of final hidden states h (..., d) through the tied embedding or ``lm_head``."""
        tied = self.cfg.tie_embeddings
        head = self.backbone.embed if tied else self.lm_head
        plain = tied or (type(head) is nn.Linear and not head._forward_hooks and not head._forward_pre_hooks)
        if h.dim() == 2 and plain:
            # rows (b, d) of a decode step: weight (vocab, d) @ h^T (d, b) runs about 1.8x faster on MKL than
            # h @ weight^T at b = 8 (vocab 32000); each logit is the same dot product, up to fp32 rounding.
            # A wrapped (quantized, LoRA) or hooked head keeps its own call.
            return (head.weight @ h.t()).t()
        return h @ head.weight.t() if tied else self.lm_head(h)

    def _step_logits(self, tok: Tensor, cache: Cache) -> Tensor:
        """Logits (b, vocab) after one new token per row (b,), extending ``cache``: the decode step.

        The ids skip :meth:`Backbone.embed_tokens`' range check (two reductions and a device sync per
        step): they were sampled over the logits' own width, which :meth:`generate` checked once."""
        return self._logits(self.backbone(self.backbone.embed(tok[:, None]), cache=cache)[:, 0])

    def new_cache(self, batch: int, *, kv_policy=None) -> Cache:
        """An empty decode cache for ``batch`` rows; ``kv_policy`` (a KVPolicy or dict, or one per layer)
        stores softmax layers' KV as sinks + window or int8 (see :mod:`efformer.models.kv_policy`)."""
        if not _is_int(batch) or batch < 1:
            raise ConfigError("batch", batch, "an integer >= 1 (rows of the decode cache)")
        cache = self.backbone.new_cache(batch)
        if kv_policy is not None:
            p = self.backbone.embed.weight
            mixers = [b.mixer for b in self.backbone.blocks]
            cache.states = [policy_state(m, pol, batch, p.device, p.dtype)
                            for m, pol in zip(mixers, layer_policies(mixers, kv_policy), strict=True)]
        return cache

    @torch.no_grad()
    def generate(
        self,
        prompt_ids: Tensor | list[list[int]],
        max_new_tokens: int = 32,
        *,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        stop_tokens: tuple[int, ...] | list[int] = (),
        use_cache: bool = True,
        generator: torch.Generator | None = None,
        kv_policy=None,
    ) -> Tensor | list[list[int]]:
        """Prompt + up to ``max_new_tokens`` new tokens per row.

        ``prompt_ids`` is a LongTensor (b, n) or a list of token lists of different lengths (then a
        list comes back, each row cut after its first stop token). ``temperature=0`` is greedy.
        ``kv_policy``: see :meth:`new_cache` (e.g. ``{"sinks": 4, "window": 508}`` for bounded memory).
        """
        if not _is_int(max_new_tokens) or max_new_tokens < 0:
            raise ConfigError("max_new_tokens", max_new_tokens, "an integer >= 0")
        if not _is_real(temperature) or not 0 <= temperature < math.inf:
            raise ConfigError("temperature", temperature, "a number >= 0 (0 means greedy)")
        if top_p is not None and (not _is_real(top_p) or not 0 < top_p <= 1):
            raise ConfigError("top_p", top_p, "a number in (0, 1], or None for no nucleus filtering")
        if top_k is not None and (not _is_int(top_k) or top_k <= 0):
            raise ConfigError("top_k", top_k, "a positive integer, or None for no top-k filtering")
        if isinstance(stop_tokens, str | bytes) or not all(_is_int(t) for t in _iterable(stop_tokens)):
            raise ConfigError("stop_tokens", stop_tokens, "a tuple or list of integer token ids, e.g. (0,)")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise ConfigError("generator", generator, "a torch.Generator or None")
        as_list = isinstance(prompt_ids, list)
        ids, mask = _left_pad(prompt_ids, self.cfg.pad_id, self.backbone.embed.weight.device)
        b = ids.shape[0]
        stops = torch.tensor(list(stop_tokens), dtype=torch.long, device=ids.device)
        new = torch.full((b, max_new_tokens), -1, dtype=torch.long, device=ids.device)
        active = torch.arange(b, device=ids.device)  # original row index of each live row
        was_training = self.training
        self.eval()
        use_cache = use_cache and self.backbone.can_decode
        if kv_policy is not None and not use_cache:
            raise ConfigError("kv_policy", kv_policy, "None when decoding without a cache (use_cache=False)")
        cache = self.new_cache(b, kv_policy=kv_policy) if use_cache else None
        seq, seq_mask = ids, mask  # the full context, used when recomputing without a cache
        logits = self(ids, mask=None if bool(mask.all()) else mask, cache=cache, logits_to_keep=1)[:, -1]
        # sampled ids index the logits, so they lie in the vocabulary when the logits are no wider
        step_ok = cache is not None and logits.shape[-1] <= self.cfg.vocab_size
        all_rows = True  # no row has finished: ``new[:, t]`` is a plain copy, not an index_put
        for t in range(max_new_tokens):
            tok = sample_next(logits, temperature, top_k, top_p, generator)
            if all_rows:
                new[:, t] = tok
            else:
                new[active, t] = tok
            if t == max_new_tokens - 1:
                break
            if stops.numel():  # without stop tokens no row finishes early: no test, no device sync
                done = torch.isin(tok, stops)
                if bool(done.all()):
                    break
                if bool(done.any()):  # drop finished rows from the batch
                    keep = (~done).nonzero().squeeze(1)
                    all_rows = False
                    active, tok = active[keep], tok[keep]
                    seq, seq_mask = seq[keep], seq_mask[keep]
                    cache = cache.select(keep) if cache is not None else None
            if step_ok:
                logits = self._step_logits(tok, cache)
            elif cache is not None:
                logits = self(tok[:, None], cache=cache)[:, -1]  # one position: all logits are needed
            else:
                seq = torch.cat([seq, tok[:, None]], dim=1)
                seq_mask = torch.cat([seq_mask, torch.ones_like(tok[:, None], dtype=torch.bool)], dim=1)
                logits = self(seq, mask=None if bool(seq_mask.all()) else seq_mask, logits_to_keep=1)[:, -1]
        self.train(was_training)
        if as_list:
            return [list(p) + _cut(new[i].tolist(), stop_tokens) for i, p in enumerate(prompt_ids)]
        filled = torch.where(new < 0, torch.full_like(new, self.cfg.pad_id), new)
        return torch.cat([ids, filled], dim=1)


def sample_next(
    logits: Tensor, temperature: float, top_k: int | None, top_p: float | None, generator=None
) -> Tensor:
    """Next token (b,) from logits (b, vocab): argmax at temperature 0, else filtered sampling."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= top_p  # keep the smallest prefix reaching top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return torch.multinomial(F.softmax(logits, -1), 1, generator=generator).squeeze(1)


def _is_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _is_real(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and not math.isnan(x)


def _iterable(x) -> list:
    try:
        return list(x)
    except TypeError:
        return [None]  # not iterable: fails the integer check


def _check_cache(cache: Cache | None, shape: tuple[int, int]) -> None:
    if cache is not None:
        if not isinstance(cache, Cache):
            raise ShapeError(f"cache must be a Cache from model.new_cache(batch), got {type(cache).__name__}")
        if cache.batch_size != shape[0]:
            raise ShapeError(f"cache holds {cache.batch_size} rows but input_ids has batch {shape[0]}; "
                             f"make it with model.new_cache({shape[0]})")


def _left_pad(prompts: Tensor | list[list[int]], pad_id: int, device) -> tuple[Tensor, Tensor]:
    if isinstance(prompts, Tensor):
        if prompts.dim() != 2 or prompts.shape[1] == 0 or prompts.dtype not in (torch.int32, torch.int64):
            raise ShapeError(f"prompt_ids must be an integer tensor (batch, seq>0), got {prompts.dtype} "
                             f"{tuple(prompts.shape)}")
        return prompts.to(device), torch.ones_like(prompts, dtype=torch.bool, device=device)
    if not isinstance(prompts, list) or not all(isinstance(p, list | tuple) for p in prompts):
        raise ShapeError(f"prompt_ids must be a LongTensor (batch, seq) or a list of token-id lists such as "
                         f"[[1, 2, 3]], got {type(prompts).__name__} {str(prompts)[:40]}")
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ShapeError("prompt_ids must be a non-empty list of non-empty token lists")
    for i, p in enumerate(prompts):
        bad = next((t for t in p if not _is_int(t)), None)
        if bad is not None:
            raise ShapeError(f"prompt_ids[{i}] holds {bad!r}; token ids must be integers")
    n = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), n), pad_id, dtype=torch.long)
    mask = torch.zeros(len(prompts), n, dtype=torch.bool)
    for i, p in enumerate(prompts):
        ids[i, n - len(p) :] = torch.tensor(p, dtype=torch.long)
        mask[i, n - len(p) :] = True
    return ids.to(device), mask.to(device)


def _cut(tokens: list[int], stops) -> list[int]:
    out = []
    for t in tokens:
        if t < 0:
            break
        out.append(t)
        if t in stops:
            break
    return out
