"""LTM and IA-RED²: keep-all is the unreduced model, the class token stays, eval follows the schedule,
the training forms match inference (LTM's straight-through merge, IA-RED²'s size-0 drop == pruning),
REINFORCE moves the policy the right way, the trainer trains them and resumes exactly, bad input is refused."""

from __future__ import annotations

import io

import pytest
import torch

from efformer.errors import CapabilityError, EfformerError
from efformer.models.factory import create_model
from efformer.nn.positional import PositionalContext
from efformer.reduce import IARED2, ReduceError, Tokens, apply, combine, remove, train_loss
from efformer.reduce.hook import TokenView
from efformer.reduce.methods import Method, prune

LEARNED = ["ltm", "ia_red2"]


def small_vit(depth=3, **kw):
    return create_model("vit-tiny", image_size=16, in_channels=1, stages=[dict(depth=depth, d_model=32, n_heads=2)],
                        **kw)


@pytest.mark.parametrize("method", LEARNED)
def test_keep_all_is_the_unreduced_model_and_eval_follows_the_schedule(method):
    torch.manual_seed(0)
    m = create_model("vit-tiny").eval()
    x = torch.rand(3, 3, 32, 32)
    y0 = m(x)
    apply(m, method, 0)
    assert torch.equal(m(x), y0)
    red = apply(m, method, 8)
    m(x)
    assert red.last.counts == [65, 57, 49, 41]
    red = apply(m, method, {"keep": 0.5})
    m(x)
    assert red.last.counts[-1] == round(0.5 * 65)
    remove(m)
    assert torch.equal(m(x), y0) and not hasattr(m, "reduce_learned")


@pytest.mark.parametrize("method", LEARNED)
def test_text_classifier_with_padding_keep_all_exact_and_padding_never_counts(method):
    torch.manual_seed(0)
    m = create_model("classifier-tiny", n_layers=3, mixer="softmax", pooling="cls").eval()
    ids = torch.randint(1, 256, (2, 23))
    mask = torch.ones(2, 23, dtype=torch.bool)
    mask[1, 15:] = False
    y0 = m(ids, mask=mask)
    apply(m, method, 0)
    assert torch.equal(m(ids, mask=mask), y0)
    red = apply(m, method, 4)
    y = m(ids, mask=mask)
    assert red.last.counts == [24, 20, 16] and torch.isfinite(y).all()
    assert float(red.last.size[1].sum()) == 16  # row 1's 15 real tokens + the class token: no padding mass


@pytest.mark.parametrize("method", LEARNED)
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_the_class_token_is_never_merged_or_dropped(method, mode):
    torch.manual_seed(1)
    m = create_model("vit-tiny", n_classes=4).eval()
    red = apply(m, method, 16)
    getattr(m, mode)()
    m(torch.rand(4, 3, 32, 32))
    assert (red.last.source[:, 0] == 0).all() and ((red.last.source == 0).sum(1) == 1).all()
    assert (red.last.size[:, 0] == 1).all()


def _view(x, blocks, j=0, protected=1):
    b, t = x.shape[:2]
    ar = torch.arange(t).expand(b, t)
    tok = Tokens(x, torch.ones(b, t), None, ar.clone(), ar.clone())
    return TokenView(tok, None, protected, False, blocks, j, PositionalContext(ar))


def test_ltm_straight_through_training_merge_is_size_weighted_merging_and_carries_gradients():
    torch.manual_seed(0)
    m = small_vit()
    red = apply(m, "ltm", 4)
    m.train()
    x = torch.randn(2, 17, 32, requires_grad=True)
    view = _view(x, list(m.stages[0]))
    a = red.method.assign(view, 4)
    assert a.matrix is not None and a.matrix.shape == (2, 13, 17)
    soft, _ = combine(view.tok, a)
    hard, _ = combine(view.tok, type(a)(a.dst))
    assert torch.allclose(soft.x, hard.x, atol=1e-6) and torch.allclose(soft.size, hard.size, atol=1e-6)
    soft.x.square().sum().backward()
    g = m.reduce_learned[0].embed.weight.grad
    assert g is not None and g.abs().sum() > 0
    kl = red.method.extra_loss(torch.zeros(2, 10), torch.zeros(2, dtype=torch.long))
    assert kl.shape == (2,) and (kl >= 0).all() and (kl > 0).any()


def test_ia_red2_training_drop_by_size_zero_equals_pruning_those_tokens():
    torch.manual_seed(2)
    m = small_vit(depth=2).eval()  # one reduction point
    red = apply(m, "ia_red2", 1, init_keep=0.6)
    m.reduce_learned.train()  # the policy samples; the backbone stays in eval
    img = torch.rand(1, 1, 16, 16)
    y_train = m(img)
    dropped = red.last.size[0] == 0
    assert dropped.sum() > 0 and not dropped[0]

    class Fixed(Method):
        name = "fixed"

        def assign(self, view, r):
            return prune(view.tok.x, dropped[None], view.protected)
    remove(m)
    apply(m, Fixed(), int(dropped.sum()), where="between")  # where IA-RED² drops
    assert torch.allclose(m(img), y_train, atol=1e-5)


def test_ia_red2_reinforce_learns_to_keep_the_token_that_decides_and_drop_the_rest():
    torch.manual_seed(0)
    m = small_vit(depth=2)
    red = apply(m, "ia_red2", 1, init_keep=0.5, penalty=1.0, freeze_backbone=True)
    meth: IARED2 = red.method
    pol = m.reduce_learned[0]
    opt = torch.optim.Adam(pol.parameters(), lr=0.05)
    x = torch.randn(1, 9, 32).expand(64, -1, -1).contiguous()  # the same tokens in every row
    for _ in range(40):
        meth.clear()
        view = _view(x, list(m.stages[0]))
        a = meth.assign(view, 1)
        kept = a.weight.bool()
        right = kept[:, 3]  # the prediction is right exactly when token 3 survives
        logits = torch.stack([right.float(), (~right).float()], 1)
        loss = meth.extra_loss(logits, torch.zeros(64, dtype=torch.long)).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        p = pol(x[:1])[0]
    assert p[3] > 0.9 and p[1:].sum() - p[3] < 0.5 * 7


def _trainer(model, tmp_path, steps, data, **train):
    from efformer.train.trainer import Trainer

    cfg = {"steps": steps, "batch_size": 32, "lr": 3e-3, "eval_every": 0, "log_every": 1, "checkpoint_every": 3,
           **train}
    return Trainer(model, cfg, data, out_dir=tmp_path, loss_fn=train_loss, progress_stream=io.StringIO())


def brightness(n: int = 256):
    """Images (1, 16, 16): level label / 4 plus noise; the label (4 classes) is the brightness level."""
    from efformer.data.images import ImageDataset

    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 4, (n,), generator=g)
    img = 0.25 * labels[:, None, None] + 0.2 * torch.rand(n, 16, 16, generator=g)
    return ImageDataset(img.numpy(), labels.numpy())


@pytest.fixture(scope="module")
def images():
    return brightness()


def _weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.slow
def test_ltm_trains_through_the_trainer_and_the_loss_falls(images, tmp_path):
    torch.manual_seed(0)
    m = small_vit(n_classes=4)
    apply(m, "ltm", 4)
    tr = _trainer(m, tmp_path / "a", 20, images)
    tr.fit()
    losses = [h["loss"] for h in tr.history]
    assert sum(losses[-5:]) < 0.7 * sum(losses[:5])


def test_ltm_with_a_frozen_backbone_trains_only_its_mask_modules(images, tmp_path):
    torch.manual_seed(0)
    m = small_vit(n_classes=4)
    apply(m, "ltm", 4, freeze_backbone=True)
    before = _weights(m)
    _trainer(m, tmp_path / "b", 4, images).fit()
    after = _weights(m)
    assert all(torch.equal(before[k], after[k]) for k in before if not k.startswith("reduce_learned"))
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("reduce_learned"))
    remove(m)
    assert all(p.requires_grad for p in m.parameters())


@pytest.mark.parametrize("method", LEARNED)
def test_training_resumes_bit_exactly_with_the_sampled_merges_and_drops(method, images, tmp_path):
    def build():
        torch.manual_seed(0)
        m = small_vit(n_classes=4)
        apply(m, method, 4)
        return m
    full = _trainer(build(), tmp_path, 6, images)
    full.fit()
    ref = _weights(full.raw)
    half = _trainer(build(), tmp_path / "half", 6, images)
    assert half.resume(full.ckpt_dir / "step_00000003")
    half.fit()
    got = _weights(half.raw)
    assert any(k.startswith("reduce_learned") for k in got)
    assert all(torch.equal(got[k], ref[k]) for k in ref)


def test_refusals_name_the_field():
    with pytest.raises(CapabilityError, match="causality"):
        apply(create_model("lm-tiny"), "ltm", 2)
    m = small_vit()
    with pytest.raises(ReduceError, match="ltm.temperature"):
        apply(m, "ltm", 2, temperature=0)
    with pytest.raises(ReduceError, match="ltm.bogus"):
        apply(m, "ltm", 2, bogus=1)
    with pytest.raises(ReduceError, match="ia_red2.heads"):
        apply(m, "ia_red2", 2, heads=3)
    with pytest.raises(ReduceError, match="ia_red2.init_keep"):
        apply(m, "ia_red2", 2, init_keep=1.0)
    with pytest.raises(ReduceError, match="prop_attn"):
        apply(m, "ia_red2", 2, prop_attn=False)
    with pytest.raises(ReduceError, match="schedule.r"):
        apply(m, "ltm", [40, 0])
        m(torch.rand(1, 1, 16, 16))
    with pytest.raises(EfformerError, match="loss_fn"):
        train_loss(m, {"input_ids": torch.ones(1, 4, dtype=torch.long), "mask": torch.ones(1, 4, dtype=torch.bool)})


@pytest.mark.parametrize("method", [*LEARNED, "clca"])
def test_applying_a_trained_instance_again_keeps_its_modules_and_a_new_one_starts_fresh(method):
    from efformer.reduce import get_method

    torch.manual_seed(0)
    m = small_vit(n_classes=4).eval()
    meth = get_method(method)
    apply(m, meth, 4)
    name = "reduce_cache" if method == "clca" else "reduce_learned"
    with torch.no_grad():
        for p in getattr(m, name).parameters():
            p.add_(0.5)
    trained = {k: v.clone() for k, v in getattr(m, name).state_dict().items()}
    remove(m)
    apply(m, meth, 4)
    assert all(torch.equal(v, trained[k]) for k, v in getattr(m, name).state_dict().items())
    apply(m, method, 4)
    assert not all(torch.equal(v, trained[k]) for k, v in getattr(m, name).state_dict().items())


@pytest.mark.parametrize("method,options", [("ltm", {}), ("ia_red2", {"heads": 2}), ("clca", {"base": "ltm"}),
                                            ("clca", {})])
def test_a_saved_model_loads_with_its_trained_reduction(method, options, tmp_path):
    import efformer

    torch.manual_seed(0)
    m = small_vit(n_classes=4)
    apply(m, method, {"r": 4, "inflect": -1}, **options)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.01 * torch.randn_like(p))
    m.eval()
    x = torch.rand(2, 1, 16, 16)
    y = m(x)
    efformer.save(m, tmp_path / "m")
    again = efformer.load(tmp_path / "m").eval()
    assert torch.equal(again(x), y) and again.reducer.last.counts == m.reducer.last.counts
    remove(again)
    efformer.save(again, tmp_path / "plain")
    assert "reduce" not in (tmp_path / "plain" / "config.json").read_text()
