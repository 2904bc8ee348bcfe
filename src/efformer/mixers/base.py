"""The token-mixer contract: ``y, state = mixer(x, mask=..., state=..., positions=...)``.

Every mechanism subclasses :class:`Mixer`, declares :class:`Capabilities` as data, validates its
own options with a pydantic ``Options`` model, and implements one ``forward_<form>`` method per
form it has (``reference`` always; ``fast``, ``chunked``, ``recurrent``, ``triton`` where they
exist). Tests force each form and compare it with ``reference``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import pydantic
import torch
from torch import Tensor, nn

from efformer.errors import CapabilityError, ConfigError, ShapeError
from efformer.kernels import TRITON_MAX_DIM, triton_runs
from efformer.nn.positional import PositionalContext
from efformer.options import validate_options

FORMS = ("reference", "fast", "chunked", "recurrent", "triton")
# "auto" picks the first form in this order that can run here (see form_why_not).
_AUTO_ORDER = ("triton", "fast", "chunked", "recurrent", "reference")


@dataclass(frozen=True)
class Capabilities:
    """What a mixer can do, declared as data and checked by the model builder."""

    family: str  # e.g. "softmax", "local", "low-rank", "kernel", "hashing", "recurrent", "ssm"
    paper: str  # title of the paper that defines the mechanism
    causal: bool  # can run as a causal (autoregressive) mixer
    bidirectional: bool  # can run as a bidirectional (encoder) mixer
    padding_mask: bool  # honours a boolean keep-mask (batch, seq)
    decode: bool  # has a decode state (KV cache, window, running sums, SSM state)
    exact: bool  # computes exact softmax attention (else an approximation or another operator)
    time: str  # time complexity, e.g. "O(N^2 d)"
    memory: str  # memory complexity of the fast form, e.g. "O(N d)"
    forms: tuple[str, ...] = ("reference",)
    attention_bias: bool = False  # accepts an additive score bias (ALiBi, T5, FIRE)
    rotary: bool = False  # accepts a rotary transform of q and k (RoPE, xPos)
    dtypes: tuple[str, ...] = ("float32", "float64", "bfloat16", "float16")
    packing: bool = False  # honours packed rows (positions.segments): no mixing across segment boundaries
    grid: bool = False  # mixes a 2-D grid of patches: needs positions.grid, so only image models can use it

    def why_not(
        self,
        name: str,
        *,
        causal: bool | None = None,
        mask: bool = False,
        decode: bool = False,
        positional: str = "none",
        dtype: torch.dtype | str | None = None,
        form: str | None = None,
        device: torch.device | str | None = None,
        grid: bool | None = None,
    ) -> list[str]:
        """Every reason mixer ``name`` cannot serve this request (empty when it can); one wording for all callers.

        ``positional`` is the kind of positional scheme ("none", "embedding", "rotary", "bias");
        ``grid=False``: the caller has only a 1-D sequence (a text model), no 2-D grid of patches.
        """
        reasons = []
        if grid is False and self.grid:
            reasons.append(f"mixer {name!r} mixes a 2-D grid of image patches, so a 1-D (text) model cannot use "
                           "it; build an image model (e.g. create_model('vit-tiny', mixer=...)) or pick a 1-D mixer")
        if causal is True and not self.causal:
            reasons.append(f"mixer {name!r} is bidirectional only, so it cannot run causally (a causal LM, "
                           "a causal encoder or decoding); pick a causal mixer or a bidirectional task")
        if causal is False and not self.bidirectional:
            reasons.append(f"mixer {name!r} is causal only, so it cannot run bidirectionally; set "
                           "causal=True (for classifiers: encoder_causal=True) or pick a bidirectional mixer")
        if mask and not self.padding_mask:
            reasons.append(f"mixer {name!r} does not honour a padding mask; give unpadded batches")
        if decode and not self.decode:
            reasons.append(f"mixer {name!r} has no decode state, so it cannot decode token by token; "
                           "recompute the full sequence or pick a mixer with decode=True")
        if positional == "bias" and not self.attention_bias:
            reasons.append(f"mixer {name!r} never forms the score matrix, so it cannot take an additive "
                           "attention bias (alibi, t5, fire); use rope, an embedding scheme (sinusoidal, "
                           "learned) or none")
        if positional == "rotary" and not self.rotary:
            reasons.append(f"mixer {name!r} has no q.k product to rotate, so it cannot take a rotary scheme "
                           "(rope, xpos); use an embedding scheme (sinusoidal, learned) or none")
        if dtype is not None:
            dt = str(dtype).removeprefix("torch.")
            if dt not in self.dtypes:
                reasons.append(f"mixer {name!r} does not run in {dt}; use one of {', '.join(self.dtypes)}")
        if form is not None:
            reasons.extend(form_why_not(name, self, form, device))
        return reasons

    def as_dict(self) -> dict[str, Any]:
        """The capabilities as a JSON-ready dict."""
        d = dataclasses.asdict(self)
        d["forms"], d["dtypes"] = list(self.forms), list(self.dtypes)
        return d


def causal_recurrent(*, paper: str, time: str, memory: str, forms: tuple[str, ...], family: str = "recurrent",
                     **more: Any) -> Capabilities:
    """Capabilities of a causal recurrence (linear-recurrent, state-space, RNN-style attention): causal
    only, honours a padding mask, decodes with a state, and is not exact softmax attention."""
    return Capabilities(family=family, paper=paper, causal=True, bidirectional=False, padding_mask=True,
                        decode=True, exact=False, time=time, memory=memory, forms=forms, **more)


def form_why_not(name: str, caps: Capabilities, form: str, device: torch.device | str | None = None) -> list[str]:
    """Why ``form`` cannot run for mixer ``name`` on ``device`` (None: any device): the one place that decides."""
    if form == "auto":
        return []
    if form not in caps.forms:
        return [f"mixer {name!r} has no form {form!r}; use 'auto' or one of {', '.join(map(repr, caps.forms))}"]
    if form == "triton" and device is not None and not triton_runs(device):
        return [f"mixer {name!r}: the triton form needs the triton package and a CUDA device (or "
                f"TRITON_INTERPRET=1), not {torch.device(device).type}; use form='auto'"]
    return []


class MixerOptions(pydantic.BaseModel):
    """Options every mixer accepts; subclasses add their own fields (unknown keys are refused)."""

    model_config = pydantic.ConfigDict(extra="forbid", frozen=True)
    form: str = pydantic.Field("auto", description="which implementation to run: \"auto\" or one of capabilities.forms")


class MixerState:
    """Base of per-layer decode states: dataclasses of tensors whose dim 0 is the batch.

    ``seen`` counts the tokens consumed so far (the default position offset).
    """

    seen: int = 0

    def batch_size(self) -> int | None:
        """Rows the state holds (dim 0 of its first tensor), or None if it holds no tensor."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Tensor):
                return value.shape[0]
        return None

    def select(self, index: Tensor) -> MixerState:
        """The state of the batch rows in ``index`` (drops finished rows in batched generation)."""
        new = dataclasses.replace(
            self, **{f.name: _select(getattr(self, f.name), index) for f in dataclasses.fields(self)}
        )
        new.seen = self.seen
        return new


def _select(value: Any, index: Tensor) -> Any:
    if isinstance(value, Tensor):
        return value.index_select(0, index.to(value.device))
    if isinstance(value, list | tuple):
        return type(value)(_select(v, index) for v in value)
    return value


class Mixer(nn.Module):
    """Base class of token mixers: (batch, seq, d_model) -> (batch, seq, d_model), plus a decode state.

    Args:
        d_model: model width.
        n_heads: number of heads (must divide ``d_model``).
        causal: run as an autoregressive mixer (position i sees only positions <= i).
        options: the mixer's own options (a dict or its ``Options`` model).
        dropout: attention-probability dropout where the mechanism has probabilities.
        max_len: the longest sequence (and largest position + 1) the mixer must handle; mixers that
            size tables by it (Linformer's E/F, cosFormer's M, Sinkhorn's sorter, Synthesizers) use it.

    Positional schemes are not owned by mixers: the model passes a :class:`PositionalContext`
    (positions plus precomputed rotary tables or a score-bias scheme) as ``positions`` on every call.
    """

    name: ClassVar[str] = "?"
    capabilities: ClassVar[Capabilities]
    Options: ClassVar[type[MixerOptions]] = MixerOptions
    # Small options the contract tests use so that odd lengths hit block/chunk/window edges.
    test_options: ClassVar[dict[str, Any]] = {}
    test_max_len: ClassVar[int] = 128
    # On CPU, "auto" runs the reference form for sequences of at most this many tokens (cached ones
    # included), where it was measured faster than the fast form's gather/scan overhead; 0 = never.
    reference_below: ClassVar[int] = 0
    # Set by efformer.reduce on mixers that form q and k (softmax): keep the last forward's
    # (q (b, h, n, d), k (b, kv, n, d)) in ``last_qk``, its token-similarity metric and attention map.
    record_qk: bool = False
    # True where the ``head_dim`` option is the attention head width (softmax): then n_heads need not divide
    # d_model. Other mixers' head_dim options mean something else (H3's state size per head).
    head_dim_from_options: ClassVar[bool] = False

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        *,
        causal: bool = False,
        options: dict[str, Any] | MixerOptions | None = None,
        dropout: float = 0.0,
        max_len: int = 2048,
    ):
        super().__init__()
        caps = self.capabilities
        for field_name, value in (("d_model", d_model), ("n_heads", n_heads), ("max_len", max_len)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(field_name, value, "a positive integer")
        if not isinstance(causal, bool):
            raise ConfigError("causal", causal, "True or False")
        if isinstance(dropout, bool) or not isinstance(dropout, int | float) or not 0 <= dropout < 1:
            raise ConfigError("dropout", dropout, "a probability in [0, 1)")
        self.opts = validate_options(self.Options, options, self.name)
        # a head width set by the options (attention after head pruning) needs no even split of d_model
        if d_model % n_heads and not (self.head_dim_from_options and getattr(self.opts, "head_dim", None)):
            raise ConfigError("n_heads", n_heads, f"must be positive and divide d_model={d_model}")
        if self.opts.form != "auto" and self.opts.form not in caps.forms:
            raise ConfigError(f"{self.name}.form", self.opts.form, form_why_not(self.name, caps, self.opts.form)[0])
        reasons = caps.why_not(self.name, causal=causal)
        if reasons:
            raise CapabilityError("; ".join(reasons))
        self.d_model, self.n_heads, self.head_dim = d_model, n_heads, d_model // n_heads
        self.causal, self.dropout, self.max_len = causal, dropout, max_len

    # ---- the call -------------------------------------------------------------------------
    def forward(
        self,
        x: Tensor,
        *,
        mask: Tensor | None = None,
        state: MixerState | None = None,
        positions: Tensor | PositionalContext | None = None,
    ) -> tuple[Tensor, MixerState | None]:
        """Mix tokens of ``x`` (batch, seq, d_model); returns ``(y, state)`` (state None unless given).

        ``mask`` is a boolean keep-mask (batch, seq); outputs at dropped positions are zero.
        ``state`` is the decode state from :meth:`init_state` or the previous call.
        ``positions``: absolute positions (batch, seq), or the model's :class:`PositionalContext`;
        default ``state.seen + arange(seq)`` with no positional scheme.
        """
        b, n = self._check_inputs(x, mask, state, positions)
        if not isinstance(positions, PositionalContext):
            if positions is None:
                offset = state.seen if state is not None else 0
                positions = torch.arange(offset, offset + n, device=x.device).expand(b, n)
            positions = PositionalContext(positions)
        elif positions.kind != "none":
            reasons = self.capabilities.why_not(self.name, positional=positions.kind)
            if reasons:
                raise CapabilityError(reasons[0])
        if isinstance(positions, PositionalContext) and positions.segments is not None:
            self._check_segments(positions.segments, b, n, state)
        form = self.resolve_form(x, state)
        y, state = getattr(self, f"forward_{form}")(x, mask=mask, state=state, pos=positions)
        if state is not None:
            state.seen += n
        if mask is not None:
            y = y * mask[..., None].to(y.dtype)
        return y, state

    def form_why_not(self, form: str, device: torch.device | str) -> list[str]:
        """Why ``form`` cannot run here (the capability rule plus this layer's kernel limits)."""
        reasons = form_why_not(self.name, self.capabilities, form, device)
        if form == "triton" and not reasons and max(self.kernel_dims()) > TRITON_MAX_DIM:
            reasons.append(f"mixer {self.name!r}: the triton kernel holds head dims <= {TRITON_MAX_DIM}, this "
                           f"layer has {max(self.kernel_dims())}; use form='auto' or 'chunked'")
        return reasons

    def kernel_dims(self) -> tuple[int, ...]:
        """Per-head dims a fused kernel must hold (key and value dims; the head dim by default)."""
        return (self.head_dim,)

    def resolve_form(self, x: Tensor, state: MixerState | None) -> str:
        """The form to run: the configured one (refused with the reason if it cannot run here), or for
        "auto" the first of triton, fast, chunked, recurrent, reference that can."""
        if self.opts.form != "auto":
            reasons = self.form_why_not(self.opts.form, x.device)
            if reasons:
                raise CapabilityError(reasons[0])
            return self.opts.form
        forms = self.capabilities.forms
        if state is not None and "recurrent" in forms and x.shape[1] == 1:
            return "recurrent"
        total = x.shape[1] + (state.seen if state is not None else 0)
        if not x.is_cuda and total <= self.reference_below:
            return "reference"
        for f in _AUTO_ORDER:
            if f in forms and not self.form_why_not(f, x.device):
                return f
        return "reference"

    def init_roles(self) -> dict[str, list[Tensor]]:
        """Weights by initialisation role: "value" (value projections, or the value rows of a fused
        one) and "output" (the output projection); DeepNorm scales exactly these. Every mixer declares it."""
        raise NotImplementedError(f"mixer {self.name!r} must declare init_roles()")

    def init_state(self, batch: int, device: torch.device | str, dtype: torch.dtype) -> MixerState:
        """An empty decode state for ``batch`` sequences (mixers with ``capabilities.decode``)."""
        raise CapabilityError(self.capabilities.why_not(self.name, decode=True)[0])

    def forward_reference(self, x, *, mask, state, pos):  # pragma: no cover - abstract
        """The plain, obviously-correct definition (may be quadratic or sequential)."""
        raise NotImplementedError

    # ---- helpers shared by mechanisms -----------------------------------------------------
    def _check_inputs(self, x, mask, state, positions) -> tuple[int, int]:
        if not isinstance(x, Tensor) or x.dim() != 3 or x.shape[-1] != self.d_model:
            got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ShapeError(f"{self.name}: x must be (batch, seq, {self.d_model}), got {got}")
        if not x.is_floating_point():
            raise ShapeError(f"{self.name}: x must be a floating-point tensor, got {x.dtype}; embed token ids first")
        b, n = x.shape[:2]
        if n == 0:
            raise ShapeError(f"{self.name}: x has an empty sequence (seq=0); pass at least one token")
        if mask is not None:
            if mask.dtype != torch.bool or tuple(mask.shape) != (b, n):
                raise ShapeError(
                    f"{self.name}: mask must be a bool keep-mask of shape ({b}, {n}), "
                    f"got {mask.dtype} {tuple(mask.shape)}"
                )
            if not self.capabilities.padding_mask:
                raise CapabilityError(self.capabilities.why_not(self.name, mask=True)[0])
            # A model checked this once for all layers (it passes a context); a direct call is checked here.
            # (A decode step may be all padding.)
            if state is None and not isinstance(positions, PositionalContext) and not bool(mask.any(1).all()):
                raise ShapeError(f"{self.name}: mask keeps no token in some batch row (all False); every row "
                                 "needs at least one real token")
        pos = positions.positions if isinstance(positions, PositionalContext) else positions
        if pos is not None and (not isinstance(pos, Tensor) or tuple(pos.shape) != (b, n)
                                or pos.is_floating_point() or pos.dtype == torch.bool):
            got = f"{pos.dtype} {tuple(pos.shape)}" if isinstance(pos, Tensor) else type(pos).__name__
            raise ShapeError(f"{self.name}: positions must be a ({b}, {n}) integer tensor, got {got}")
        if state is not None:
            self._check_state(state, b)
        return b, n

    def _check_segments(self, segments: Tensor, b: int, n: int, state: MixerState | None) -> None:
        if not self.capabilities.packing:
            raise CapabilityError(f"mixer {self.name!r} cannot run packed rows (capabilities.packing is False); "
                                  "pad the sequences into separate rows instead")
        if state is not None:
            raise CapabilityError(f"{self.name}: packed rows (segments) run without a decode state; prefill "
                                  "each sequence into its own cache row")
        if (not isinstance(segments, Tensor) or tuple(segments.shape) != (b, n) or segments.is_floating_point()
                or segments.dtype == torch.bool):
            got = f"{segments.dtype} {tuple(segments.shape)}" if isinstance(segments, Tensor) else type(segments)
            raise ShapeError(f"{self.name}: segments must be a ({b}, {n}) integer tensor, got {got}")

    def _check_state(self, state: MixerState, b: int) -> None:
        if not self.capabilities.decode:
            raise CapabilityError(self.capabilities.why_not(self.name, decode=True)[0])
        if "_state_type" not in self.__dict__:  # what init_state makes, found once per layer
            self._state_type = type(self.init_state(1, "cpu", torch.float32))
        # A storage variant (the server's paged KV cache) stands in for the state type it re-implements.
        if (getattr(type(state), "stands_in_for", None) or type(state)) is not self._state_type:
            raise ShapeError(f"{self.name}: state must be the {self._state_type.__name__} from this mixer's "
                             f"init_state(), got {type(state).__name__}")
        rows = state.batch_size()
        if rows is not None and rows != b:
            raise ShapeError(f"{self.name}: the state holds {rows} rows but x has batch {b}; "
                             "use state.select(rows) or a new init_state(batch)")

    def split_heads(self, t: Tensor, heads: int | None = None) -> Tensor:
        """(batch, seq, heads*dim) -> (batch, heads, seq, dim)."""
        # the same view as einops' rearrange, without its per-call pattern parsing (decode runs this per layer)
        return t.unflatten(2, (heads or self.n_heads, -1)).transpose(1, 2)

    @staticmethod
    def merge_heads(t: Tensor) -> Tensor:
        """(batch, heads, seq, dim) -> (batch, seq, heads*dim)."""
        return t.transpose(1, 2).flatten(2)


# Log-decay that resets a recurrent state at a packed segment's first token: e^-30 ~ 1e-13 of the
# carried state survives (below fp32 resolution), while chunk-local cumulative log-gates stay within
# ~2e-6 of their exact values (a far more negative constant would swamp them in fp32).
RESET_LOG_DECAY = -30.0


def segment_starts(segments: Tensor) -> Tensor:
    """Bool (b, n): True where a packed row's segment id (b, n) changes (and at position 0)."""
    start = torch.ones_like(segments, dtype=torch.bool)
    start[:, 1:] = segments[:, 1:] != segments[:, :-1]
    return start


def causal_keep(n_q: int, n_k: int, device: torch.device | str | None = None) -> Tensor:
    """Bool (n_q, n_k): query i (the last n_q of n_k positions) may see key j iff j <= i + n_k - n_q."""
    i = torch.arange(n_q, device=device)[:, None] + (n_k - n_q)
    return torch.arange(n_k, device=device)[None, :] <= i


def bare_linear(module: nn.Module | None) -> bool:
    """True for a plain bias-free ``nn.Linear``: the only projection a recomputing (lean) form may re-run
    from its weight alone; one that compression swapped for a quantized or LoRA-wrapped module must be called."""
    return type(module) is nn.Linear and module.bias is None


def seq_rows(t: Tensor | None, a: int, b: int) -> Tensor | None:
    """Rows a:b of the sequence axis (dim 1) of t (batch, seq, ...), or None for None."""
    return t[:, a:b] if t is not None else None


def pad_to_multiple(x: Tensor, multiple: int, dim: int = 1, value: float = 0.0) -> tuple[Tensor, int]:
    """Right-pad ``x`` along ``dim`` to a multiple of ``multiple``; returns (padded, pad_amount)."""
    n = x.shape[dim]
    pad = (-n) % multiple
    if pad == 0:
        return x, 0
    shape = list(x.shape)
    shape[dim] = pad
    return torch.cat([x, x.new_full(shape, value)], dim=dim), pad


