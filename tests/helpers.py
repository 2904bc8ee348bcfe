"""Small helpers for tests: relative RMS error and mixer construction."""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode

import efformer
from efformer.nn.aux import collect_aux_losses
from efformer.nn.positional import PositionalContext, Rope
from efformer.registry import MIXERS


def rel_err(ref: Tensor, got: Tensor) -> float:
    """Relative RMS error ||ref - got|| / ||ref|| (the metric fla uses for kernel parity)."""
    ref, got = ref.double(), got.double()
    return ((ref - got).square().mean().sqrt() / (ref.square().mean().sqrt() + 1e-12)).item()


def make_mixer(name: str, causal: bool, d_model: int = 32, n_heads: int = 4, max_len: int | None = None, **options):
    """A mixer with its class's small test options (plus ``options``), in float32, eval mode."""
    cls = MIXERS.get(name)
    opts = {**cls.test_options, **options}
    torch.manual_seed(0)
    max_len = cls.test_max_len if max_len is None else max_len
    m = cls(d_model, n_heads, causal=causal, options=opts, max_len=max_len).eval()
    return WithPositional(m, SquarishGrid()) if cls.capabilities.grid else m


def softmax_twin_of(m, extra: set[str] = frozenset()):
    """A SoftmaxAttention with the weights (q/kv/out) and direction of softmax-layout mixer ``m``; its state
    dict may hold only ``extra`` beyond softmax's."""
    sm = MIXERS.get("softmax")(m.d_model, m.n_heads, causal=m.causal, options={"n_kv_heads": m.n_kv_heads})
    missing, unexpected = sm.load_state_dict(m.state_dict(), strict=False)
    assert not missing and set(unexpected) == set(extra), (missing, unexpected)
    return sm.eval()


def with_form(mixer, form: str):
    """The same mixer (same weights) forced to run ``form``."""
    inner = mixer.mixer if isinstance(mixer, WithPositional) else mixer
    inner.opts = inner.opts.model_copy(update={"form": form})
    return mixer


class WithPositional(torch.nn.Module):
    """A mixer called with a positional scheme's context, as a model's backbone calls it."""

    def __init__(self, mixer, scheme):
        super().__init__()
        self.mixer, self.scheme = mixer, scheme

    def forward(self, x, *, mask=None, state=None, positions=None):
        """As the mixer's forward, with ``positions`` (default ``state.seen + arange``) turned into a context."""
        if positions is None:
            offset = state.seen if state is not None else 0
            positions = torch.arange(offset, offset + x.shape[1], device=x.device).expand(x.shape[0], -1)
        return self.mixer(x, mask=mask, state=state, positions=self.scheme.context(positions, x.dtype))

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("mixer"), name)


class SquarishGrid:
    """Stands in for an image model's positions: n tokens as the most nearly square h x w grid (h <= w)."""

    def context(self, positions, dtype):
        """A context holding ``positions`` (or the one given) and the grid of its length."""
        if isinstance(positions, PositionalContext):
            return dataclasses.replace(positions, grid=squarish(positions.positions.shape[1]))
        return PositionalContext(positions, grid=squarish(positions.shape[1]))


def grid_context(h: int, w: int, b: int = 2) -> PositionalContext:
    """Positions of b sequences of h*w tokens on an h x w grid, as an image model passes them."""
    return PositionalContext(torch.arange(h * w).expand(b, -1), grid=(h, w))


def squarish(n: int) -> tuple[int, int]:
    """The factor pair (h, w) of n with h <= w closest to square (1 x n for a prime)."""
    h = max((f for f in range(1, int(n**0.5) + 1) if n % f == 0), default=1)
    return h, max(n // h, 1)


def mixer_cases() -> list[tuple[str, bool]]:
    """(name, causal) for every registered mixer and every direction it supports."""
    cases = []
    for name in MIXERS.names():
        caps = MIXERS.get(name).capabilities
        if caps.causal:
            cases.append((name, True))
        if caps.bidirectional:
            cases.append((name, False))
    return cases


def case_id(case) -> str:
    return f"{case[0]}-{'causal' if case[1] else 'bidir'}"


class LargestTensor(TorchFunctionMode):
    """Context manager recording the largest tensor any torch function or tensor method returns."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, tuple | list) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def run_form_with_state(m, form: str, x: Tensor, mask: Tensor | None = None, init: dict[str, Tensor] | None = None):
    """Run ``m`` in ``form`` from a decode state whose fields are ``init`` (None: no state); returns the
    outputs ([y] or [y, *final state fields]) and the gradients of a fixed random loss w.r.t. x, the
    initial state fields and every parameter."""
    with_form(m, form)
    x = x.clone().requires_grad_(True)
    state, leaves = None, {}
    if init is not None:
        leaves = {k: v.clone().requires_grad_(True) for k, v in init.items()}
        state = m.init_state(x.shape[0], "cpu", x.dtype)
        for k, v in leaves.items():
            setattr(state, k, v)
    y, state = m(x, mask=mask, state=state)
    outs = [y] if state is None else [y, *(getattr(state, k) for k in leaves)]
    gen = torch.Generator().manual_seed(5)
    loss = sum((o * torch.randn(o.shape, generator=gen)).sum() for o in outs)
    grads = torch.autograd.grad(loss, [x, *leaves.values(), *m.parameters()])
    return [o.detach() for o in outs], grads


def assert_forms_agree(m, forms, x, mask=None, init=None, tol: float = 1e-5, grad_tol: float = 1e-4) -> None:
    """Every form in ``forms[1:]`` matches ``forms[0]`` on outputs, final states and gradients."""
    ref_out, ref_grad = run_form_with_state(m, forms[0], x, mask, init)
    for form in forms[1:]:
        out, grad = run_form_with_state(m, form, x, mask, init)
        for i, (a, b) in enumerate(zip(ref_out, out, strict=True)):
            assert rel_err(a, b) <= tol, f"{form} output/state #{i} differs at n={x.shape[1]}"
        for i, (a, b) in enumerate(zip(ref_grad, grad, strict=True)):
            if a.abs().max() > 0:
                assert rel_err(a, b) <= grad_tol, f"{form} gradient #{i} differs at n={x.shape[1]}"


def assert_equals_softmax_under_rope(m, n: int, extra: set[str] = frozenset(), seed: int = 3) -> None:
    """Every form of softmax-layout mixer ``m`` == softmax with the same weights, under RoPE, with and
    without left padding (for mixers whose exact limit is softmax)."""
    rope = Rope(m.d_model, m.n_heads, 64, m.causal)
    sm, mr = WithPositional(softmax_twin_of(m, extra), rope), WithPositional(m, rope)
    x = torch.randn(2, n, m.d_model, generator=torch.Generator().manual_seed(seed))
    keep = torch.ones(2, n, dtype=torch.bool)
    keep[1, :4] = False
    for mask in (None, keep):
        want, _ = sm(x, mask=mask)
        for form in ("reference", "fast"):
            got, _ = with_form(mr, form)(x, mask=mask)
            assert rel_err(want, got) < 1e-5, (form, mask is not None)


def aux_loss_under_router_sgd(module, x: Tensor, key: str, steps: int, lr: float = 1.0) -> tuple[float, float]:
    """Aux loss ``key`` of a routed FFN on x (b, n, d) before and after ``steps`` SGD steps on its router alone."""
    opt = torch.optim.SGD(module.router.parameters(), lr=lr)
    module(x)
    before = module.aux_losses[key].item()
    for _ in range(steps):
        module(x)
        opt.zero_grad()
        collect_aux_losses(module)[key].backward()
        opt.step()
    module(x)
    return before, module.aux_losses[key].item()


def assert_decode_and_save_round_trip(model, ids: Tensor, tmp_path, prefix: int = 4) -> None:
    """An eval LM on ids (b, n): cached decode (prefix, then one token at a time) == the full forward,
    cached generate == uncached, and save -> load gives identical logits."""
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache(ids.shape[0])
        steps = [model(ids[:, :prefix], cache=cache)]
        steps += [model(ids[:, t : t + 1], cache=cache) for t in range(prefix, ids.shape[1])]
        torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)
    assert torch.equal(model.generate(ids[:, :3], max_new_tokens=5),
                       model.generate(ids[:, :3], max_new_tokens=5, use_cache=False))
    efformer.save(model, tmp_path / "m")
    assert torch.equal(efformer.load(tmp_path / "m").eval()(ids), model(ids))


def outputs_and_grads(fn, x: Tensor, params) -> tuple[Tensor, list[Tensor]]:
    """fn(x) and the gradients of a fixed random loss of it w.r.t. x and each of ``params``."""
    x = x.clone().requires_grad_(True)
    y = fn(x)
    loss = (y * torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=y.dtype)).sum()
    return y.detach(), list(torch.autograd.grad(loss, [x, *params]))


def assert_outputs_and_grads_close(got, ref, tol: float = 1e-5) -> None:
    """Two :func:`outputs_and_grads` results agree on the output and on every gradient."""
    torch.testing.assert_close(got[0], ref[0], atol=tol, rtol=tol)
    for a, b in zip(got[1], ref[1], strict=True):
        torch.testing.assert_close(a, b, atol=tol, rtol=tol)
