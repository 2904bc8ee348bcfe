"""Per-layer KV-cache policies for decoding: attention sinks + window eviction, or an int8 cache.

The storage itself is in :mod:`efformer.mixers.kv_policies` (StreamingLLM-style sinks and window,
positions assigned within the cache; per-token int8 codes with fp32 scales). This module turns a
:class:`KVPolicy` (one for every softmax layer, or one per layer) into the decode states of a cache,
used by ``CausalLM.new_cache(batch, kv_policy=...)``, ``generate(..., kv_policy=...)`` and the serve
engine.
"""

from __future__ import annotations

import pydantic
import torch

from efformer.errors import CapabilityError, ConfigError
from efformer.mixers.base import Mixer, MixerState
from efformer.mixers.kv_policies import Int8KVState, StreamingKVState
from efformer.mixers.softmax import KVState, SoftmaxAttention
from efformer.options import StrictModel, validate_options


class KVPolicy(StrictModel):
    """How a softmax layer stores its KV cache."""

    window: int | None = pydantic.Field(
        None, ge=1, description="streaming: keep the last `window` tokens (plus the sinks); None = keep every token")
    sinks: int = pydantic.Field(4, ge=0, description="streaming: the first tokens that are never evicted")
    int8: bool = pydantic.Field(False, description="store keys and values as int8 with per-token fp32 scales")

    @pydantic.model_validator(mode="after")
    def _one_kind(self) -> KVPolicy:
        if self.int8 and self.window is not None:
            raise ValueError("int8 and a streaming window are not combined; pick one")
        return self


def takes_policy(mixer: Mixer) -> bool:
    """Whether ``mixer`` is a causal softmax layer with a plain KV cache whose attention a policy can change."""
    cls = type(mixer)
    return (isinstance(mixer, SoftmaxAttention) and mixer.causal
            and type(mixer.init_state(1, "cpu", torch.float32)) is KVState
            and all(getattr(cls, f) is getattr(SoftmaxAttention, f)
                    for f in ("_project", "forward_fast", "forward_reference")))


def layer_policies(mixers: list[Mixer], policy) -> list[KVPolicy | None]:
    """One policy (or None) per layer: a single policy applies to every layer that takes one; a list
    gives each layer its own (None = the layer's usual state)."""
    if isinstance(policy, list | tuple):
        if len(policy) != len(mixers):
            raise ConfigError("kv_policy", f"a list of {len(policy)}", f"one entry per layer ({len(mixers)})")
        out = [None if p is None else validate_options(KVPolicy, p, f"kv_policy[{i}]") for i, p in enumerate(policy)]
        for i, (p, m) in enumerate(zip(out, mixers, strict=True)):
            if p is not None and not takes_policy(m):
                raise CapabilityError(f"kv_policy[{i}]: layer {i} ({m.name!r}) is not a causal softmax layer with a "
                                      "plain KV cache, so no KV policy applies; give None for it")
        return out
    p = validate_options(KVPolicy, policy, "kv_policy")
    out = [p if takes_policy(m) else None for m in mixers]
    if not any(out):
        raise CapabilityError("kv_policy: no layer is a causal softmax layer with a plain KV cache, so no KV "
                              "policy applies; the model's states are bounded or fixed already")
    return out


def policy_state(mixer: Mixer, policy: KVPolicy | None, batch: int, device, dtype) -> MixerState:
    """The decode state of one layer under ``policy`` (the mixer's own when None)."""
    if policy is None:
        return mixer.init_state(batch, device, dtype)
    if policy.int8:
        return Int8KVState.empty(batch, mixer.n_kv_heads, mixer.head_dim, device, dtype)
    if policy.window is not None:
        return StreamingKVState.empty(batch, mixer.n_kv_heads, mixer.head_dim, device, dtype,
                                      sinks=policy.sinks, window=policy.window)
    return mixer.init_state(batch, device, dtype)
