"""Recall and copying tasks that separate token mixers: MQAR, selective copying, induction heads, and a
noisy needle in a haystack. All are generated here, seeded, as fixed-length token sequences with
per-position targets.

- MQAR, multi-query associative recall, from "Zoology: Measuring and Improving Recall in Efficient
  Language Models" (Arora et al., 2023). Key-value pairs ``k1 v1 ... kD vD`` come first, then a query
  region in which each key appears once more (at a gap drawn from Zoology's power law, so that most
  queries come soon after the pairs) followed by its value; the target at a query key is its value.
- Selective copying, from "Mamba: Linear-Time Sequence Modeling with Selective State Spaces" (Gu & Dao,
  2023). Data tokens are scattered among blanks, then one marker per data token; the target at the
  i-th marker is the i-th data token.
- Induction heads, from "In-context Learning and Induction Heads" (Olsson et al., 2022) as set by
  "Hungry Hungry Hippos" (Fu et al., 2023). Random tokens, a trigger token followed by an answer token
  somewhere, and the trigger again at the end; the target there is the answer.
- Noisy needle in a haystack: one key-value needle at a random depth among noise tokens and
  distractor pairs with other keys, then a query marker and the needle's key; the target at the key is
  the needle's value. :func:`needle_by_length` makes it at growing lengths.

Every example is ``{"input_ids": (L,), "targets": (L,)}``: ``targets[t]`` is the token that the output
at position t must predict, or :data:`IGNORE` where nothing is asked. Token 0 is never used (it is the
models' pad id).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import pydantic
import torch
from torch import Tensor

from efformer.errors import ConfigError
from efformer.options import StrictModel, validate_options

IGNORE = -100  # the target of a position nothing is asked at (torch's cross-entropy ignore_index)


class RecallDataset(Sequence):
    """Fixed-length examples with per-position targets: items {"input_ids": (L,), "targets": (L,)}."""

    def __init__(self, inputs: Tensor, targets: Tensor, vocab_size: int, answers: int,
                 baseline: tuple[float, float] | None = None):
        if inputs.shape != targets.shape or inputs.dim() != 2:
            raise ValueError(f"inputs {tuple(inputs.shape)} and targets {tuple(targets.shape)} must be equal (n, L)")
        self.inputs, self.targets = inputs.long(), targets.long()
        self.vocab_size = vocab_size
        self.answers = answers  # how many distinct answers a target is drawn from (uniformly): chance = 1/answers
        # (all asked positions, each example's first) accuracy reachable without recall; None: 1/answers both
        self.baseline = baseline or (1 / answers, 1 / answers)

    def __len__(self) -> int:
        return self.inputs.shape[0]

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        return {"input_ids": self.inputs[i], "targets": self.targets[i]}

    @property
    def seq_len(self) -> int:
        """L, the length of every example."""
        return self.inputs.shape[1]


# ---- MQAR ----------------------------------------------------------------------------------------
class MQAROptions(StrictModel):
    """MQAR settings (Zoology's names where it has them)."""

    seq_len: int = pydantic.Field(64, ge=4, le=1 << 20, description="L: tokens per example")
    n_pairs: int = pydantic.Field(8, ge=1, description="D: key-value pairs, each queried once")
    n_keys: int = pydantic.Field(64, ge=1, description="distinct key tokens (D of them per example, no repeats)")
    n_values: int = pydantic.Field(64, ge=1, description="distinct value tokens (D of them per example, no repeats)")
    power_a: float = pydantic.Field(0.01, gt=0, le=1, description="query gaps g = 1.. have weight g^(a - 1)")
    n_examples: int = pydantic.Field(1000, ge=1)
    seed: int = pydantic.Field(0, ge=0)
    query_order: Literal["random", "weighted"] = pydantic.Field(
        "random", description="random: the D queries come in a random order of the pairs; weighted: the pair "
        "listed first takes the heaviest slot drawn (Zoology's draw), so queries tend to follow pair order and "
        "a guess of the first-listed unanswered value beats the no-recall baseline without any recall")


def mqar_vocab(o: MQAROptions) -> tuple[int, int, int]:
    """(first key token, first value token, vocab size): 0 pad, 1 filler, then keys, then values."""
    return 2, 2 + o.n_keys, 2 + o.n_keys + o.n_values


def first_asked(targets: Tensor) -> Tensor:
    """Bool (n, L): each example's first asked position (the one query a guess by elimination cannot help)."""
    asked = targets != IGNORE
    return asked & (asked.cumsum(1) == 1)


def mqar_no_recall_baseline(n_pairs: int) -> tuple[float, float]:
    """(all queries, first query) accuracy of guessing among the context's values not yet answered. Each
    query's value follows it in the input, so the j-th of D queries picks 1 of D - j + 1 without recalling
    anything: H_D / D on average, 1 / D on the first; a model must beat these, not 1 / n_values, to recall.
    Exact for ``query_order="random"``; with "weighted" the pair order leaks and both can be beaten."""
    return sum(1 / j for j in range(1, n_pairs + 1)) / n_pairs, 1 / n_pairs


def _distinct(rng: np.random.Generator, n: int, pool: int, k: int) -> np.ndarray:
    """(n, k) rows of k distinct integers from range(pool)."""
    return np.argsort(rng.random((n, pool)), axis=1)[:, :k]


def mqar(options: MQAROptions | dict | None = None) -> RecallDataset:
    """MQAR examples: D key-value pairs, then each key queried once in the rest of the sequence."""
    o = validate_options(MQAROptions, options, "mqar")
    d = o.n_pairs
    for field, have in (("n_keys", o.n_keys), ("n_values", o.n_values)):
        if have < d:
            raise ConfigError(f"mqar.{field}", have, f"must be >= n_pairs={d} (keys and values do not repeat)")
    space = (o.seq_len - 2 * d) // 2  # two-token query slots after the pairs
    if space < d:
        raise ConfigError("mqar.seq_len", o.seq_len, f"must be >= 4 * n_pairs = {4 * d} (pairs, then one query slot "
                                                     "per pair)")
    rng = np.random.default_rng(o.seed)
    k0, v0, vocab = mqar_vocab(o)
    keys = _distinct(rng, o.n_examples, o.n_keys, d) + k0
    values = _distinct(rng, o.n_examples, o.n_values, d) + v0
    weight = np.arange(1, space + 1, dtype=np.float64) ** (o.power_a - 1)  # Zoology's a g^(a-1), unnormalised
    inputs = np.ones((o.n_examples, o.seq_len), dtype=np.int64)  # the filler
    targets = np.full((o.n_examples, o.seq_len), IGNORE, dtype=np.int64)
    inputs[:, 0 : 2 * d : 2], inputs[:, 1 : 2 * d : 2] = keys, values
    # Gumbel top-k: the d largest of log w + Gumbel noise are a draw of d slots without replacement with
    # probabilities proportional to w (as numpy's choice(replace=False, p=w) draws them), for all rows at once.
    noisy = np.log(weight) - np.log(-np.log(rng.random((o.n_examples, space))))
    slots = 2 * d + 2 * np.argsort(-noisy, axis=1)[:, :d]
    if o.query_order == "random":  # the k-th heaviest slot goes to a random pair, not to pair k
        slots = np.take_along_axis(slots, np.argsort(rng.random((o.n_examples, d)), axis=1), axis=1)
    rows = np.arange(o.n_examples)[:, None]
    inputs[rows, slots], inputs[rows, slots + 1] = keys, values
    targets[rows, slots] = values
    return RecallDataset(torch.from_numpy(inputs), torch.from_numpy(targets), vocab, o.n_values,
                         baseline=mqar_no_recall_baseline(d))


# ---- selective copying ---------------------------------------------------------------------------
class SelectiveCopyOptions(StrictModel):
    """Selective-copying settings."""

    seq_len: int = pydantic.Field(64, ge=2, le=1 << 20, description="the region the data tokens are scattered in")
    n_tokens: int = pydantic.Field(8, ge=1, description="data tokens to copy (the example has seq_len + n_tokens)")
    n_symbols: int = pydantic.Field(16, ge=2, description="distinct data tokens")
    n_examples: int = pydantic.Field(1000, ge=1)
    seed: int = pydantic.Field(0, ge=0)


def selective_copy(options: SelectiveCopyOptions | dict | None = None) -> RecallDataset:
    """Data tokens at random places among blanks (1), then markers (2); the i-th marker's target is the
    i-th data token (tokens 3 ..)."""
    o = validate_options(SelectiveCopyOptions, options, "selective_copy")
    if o.n_tokens > o.seq_len:
        raise ConfigError("selective_copy.n_tokens", o.n_tokens, f"must be <= seq_len={o.seq_len}")
    rng = np.random.default_rng(o.seed)
    n, k = o.n_examples, o.n_tokens
    data = rng.integers(0, o.n_symbols, size=(n, k)) + 3
    places = np.sort(_distinct(rng, n, o.seq_len, k), axis=1)
    inputs = np.ones((n, o.seq_len + k), dtype=np.int64)
    np.put_along_axis(inputs, places, data, axis=1)
    inputs[:, o.seq_len :] = 2
    targets = np.full_like(inputs, IGNORE)
    targets[:, o.seq_len :] = data
    return RecallDataset(torch.from_numpy(inputs), torch.from_numpy(targets), 3 + o.n_symbols, o.n_symbols)


# ---- induction heads -----------------------------------------------------------------------------
class InductionOptions(StrictModel):
    """Induction-head settings."""

    seq_len: int = pydantic.Field(64, ge=4, le=1 << 20, description="tokens per example, the final trigger included")
    n_symbols: int = pydantic.Field(16, ge=2, description="distinct ordinary tokens")
    n_examples: int = pydantic.Field(1000, ge=1)
    seed: int = pydantic.Field(0, ge=0)


def induction_heads(options: InductionOptions | dict | None = None) -> RecallDataset:
    """Random tokens (2 ..) with one trigger (1) followed by the answer, and the trigger again at the end,
    whose target is the answer."""
    o = validate_options(InductionOptions, options, "induction")
    rng = np.random.default_rng(o.seed)
    n, length = o.n_examples, o.seq_len
    inputs = rng.integers(0, o.n_symbols, size=(n, length)) + 2
    at = rng.integers(0, length - 2, size=n)  # the trigger; its answer at at + 1 <= L - 2
    rows = np.arange(n)
    inputs[rows, at], inputs[:, -1] = 1, 1
    targets = np.full_like(inputs, IGNORE)
    targets[:, -1] = inputs[rows, at + 1]
    return RecallDataset(torch.from_numpy(inputs), torch.from_numpy(targets), 2 + o.n_symbols, o.n_symbols)


# ---- noisy needle in a haystack ------------------------------------------------------------------
class NeedleOptions(StrictModel):
    """Noisy needle-in-a-haystack settings."""

    seq_len: int = pydantic.Field(128, ge=6, le=1 << 20, description="tokens per example, the query included")
    n_keys: int = pydantic.Field(16, ge=1, description="distinct key tokens (the needle's and the distractors')")
    n_values: int = pydantic.Field(16, ge=1, description="distinct value tokens")
    n_distractors: int = pydantic.Field(3, ge=0, description="other key-value pairs in the haystack (other keys)")
    n_noise: int = pydantic.Field(32, ge=1, description="distinct noise tokens filling the haystack")
    n_examples: int = pydantic.Field(1000, ge=1)
    seed: int = pydantic.Field(0, ge=0)


def needle_vocab(o: NeedleOptions) -> tuple[int, int, int, int]:
    """(first key, first value, first noise token, vocab size): 0 pad, 1 query marker, keys, values, noise."""
    return 2, 2 + o.n_keys, 2 + o.n_keys + o.n_values, 2 + o.n_keys + o.n_values + o.n_noise


def needle(options: NeedleOptions | dict | None = None) -> RecallDataset:
    """Noise with the needle pair and distractor pairs at random distinct places, then ``query key``; the
    target at that final key is the needle's value."""
    o = validate_options(NeedleOptions, options, "needle")
    pairs = 1 + o.n_distractors
    if o.n_keys < pairs:
        raise ConfigError("needle.n_keys", o.n_keys, f"must be >= 1 + n_distractors = {pairs} (keys are distinct)")
    slots = (o.seq_len - 2) // 2  # two-token slots in the haystack before "query key"
    if slots < pairs:
        raise ConfigError("needle.seq_len", o.seq_len, f"must be >= {2 * pairs + 2} for {pairs} pairs and the query")
    rng = np.random.default_rng(o.seed)
    k0, v0, z0, vocab = needle_vocab(o)
    n = o.n_examples
    inputs = rng.integers(0, o.n_noise, size=(n, o.seq_len)) + z0
    keys = _distinct(rng, n, o.n_keys, pairs) + k0  # column 0 is the needle
    values = rng.integers(0, o.n_values, size=(n, pairs)) + v0
    at = 2 * _distinct(rng, n, slots, pairs)  # even offsets, so pairs never overlap
    rows = np.arange(n)[:, None]
    inputs[rows, at], inputs[rows, at + 1] = keys, values
    inputs[:, -2], inputs[:, -1] = 1, keys[:, 0]
    targets = np.full_like(inputs, IGNORE)
    targets[:, -1] = values[:, 0]
    return RecallDataset(torch.from_numpy(inputs), torch.from_numpy(targets), vocab, o.n_values)


def needle_by_length(lengths: Sequence[int], options: NeedleOptions | dict | None = None) -> dict[int, RecallDataset]:
    """The needle task at each of ``lengths`` (same vocabulary; seed offset by the length, so sets differ)."""
    o = validate_options(NeedleOptions, options, "needle")
    if not lengths:
        raise ConfigError("needle.lengths", lengths, "at least one length")
    return {L: needle(o.model_copy(update={"seq_len": L, "seed": o.seed + L})) for L in lengths}


GENERATORS = {"mqar": (MQAROptions, mqar), "selective_copy": (SelectiveCopyOptions, selective_copy),
              "induction": (InductionOptions, induction_heads), "needle": (NeedleOptions, needle)}

__all__ = ["GENERATORS", "IGNORE", "InductionOptions", "MQAROptions", "NeedleOptions", "RecallDataset",
           "SelectiveCopyOptions", "first_asked", "induction_heads", "mqar", "mqar_no_recall_baseline", "needle",
           "needle_by_length", "selective_copy"]
