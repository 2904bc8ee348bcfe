"""LoRA adapters: identity at init, merge == unmerged, unmerge restores, trainer trains adapters only, adapters
saved and loaded alone, and peft's LoRA as the oracle (plain linears and an imported HF model)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import efformer
from efformer.compress import (
    add_lora,
    load_adapters,
    lora_state_dict,
    merge_lora,
    remove_lora,
    save_adapters,
    unmerge_lora,
)
from efformer.compress.lora import LoRALinear, lora_modules
from efformer.errors import EfformerError
from efformer.train.trainer import Trainer


def tiny():
    torch.manual_seed(0)
    return efformer.create_model("lm-tiny", d_model=64, n_layers=2, ffn_mult=3.0)


def ids(n=2, seq=12, seed=1):
    return torch.randint(0, 256, (n, seq), generator=torch.Generator().manual_seed(seed))


def randomize(model, scale=0.05):
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.normal_(0, scale)


def test_new_adapters_change_nothing_and_freeze_the_base():
    model = tiny()
    x = ids()
    ref = model(x)
    add_lora(model, 4, ["q_proj", "down"], alpha=8)
    assert len(lora_modules(model)) == 4  # two blocks x two targets
    torch.testing.assert_close(model(x), ref, rtol=0, atol=0)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(("lora_A", "lora_B")) for n in trainable)


def test_merged_equals_unmerged_and_unmerge_restores_the_weights():
    model = add_lora(tiny(), 4)  # default targets: every linear but the head
    randomize(model)
    base = {n: m.base.weight.clone() for n, m in lora_modules(model).items()}
    x = ids()
    unmerged = model(x)
    merge_lora(model)
    torch.testing.assert_close(model(x), unmerged, atol=1e-5, rtol=1e-5)
    assert any(not torch.equal(m.base.weight, base[n]) for n, m in lora_modules(model).items())
    unmerge_lora(model)
    for n, m in lora_modules(model).items():
        torch.testing.assert_close(m.base.weight, base[n], atol=1e-7, rtol=0)
    torch.testing.assert_close(model(x), unmerged, atol=1e-6, rtol=1e-6)
    merge_lora(merge_lora(model))  # merging twice merges once
    torch.testing.assert_close(model(x), unmerged, atol=1e-5, rtol=1e-5)


def test_trainer_trains_only_the_adapters(tmp_path):
    model = add_lora(tiny(), 2, ["q_proj", "out_proj"])
    frozen = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    adapters = {n: p.clone() for n, p in model.named_parameters() if p.requires_grad}
    data = [{"input_ids": row} for row in ids(8, 16)]
    trainer = Trainer(model, {"steps": 3, "batch_size": 4, "lr": 1e-2, "eval_every": 0, "checkpoint_every": 0,
                              "device": "cpu", "log_every": 1}, data, out_dir=tmp_path / "run")
    in_optimizer = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert in_optimizer == {id(p) for p in model.parameters() if p.requires_grad}
    for _ in range(3):
        trainer.train_step()
    now = dict(model.named_parameters())
    assert all(torch.equal(now[n], p) for n, p in frozen.items())  # the base did not move, bit for bit
    assert all(not torch.equal(now[n], p) for n, p in adapters.items() if n.endswith("lora_B"))


def test_adapters_save_alone_and_load_into_a_fresh_model(tmp_path):
    model = add_lora(tiny(), 3, ["kv_proj", "gate_up"], alpha=6)
    randomize(model)
    x = ids()
    out = model(x)
    path = save_adapters(model, tmp_path / "adapters.safetensors")
    from safetensors.torch import load_file
    assert set(load_file(path)) == set(lora_state_dict(model))  # nothing of the base model
    fresh = load_adapters(tiny(), path)
    torch.testing.assert_close(fresh(x), out)
    again = add_lora(tiny(), 3, ["kv_proj", "gate_up"], alpha=6)  # or into adapters already added
    torch.testing.assert_close(load_adapters(again, path)(x), out)
    with pytest.raises(EfformerError, match="does not fit"):
        load_adapters(add_lora(tiny(), 2, ["kv_proj", "gate_up"], alpha=6), path)


def test_remove_lora_gives_a_plain_model_that_saves_and_loads(tmp_path):
    model = add_lora(tiny(), 4)
    randomize(model)
    x = ids()
    out = model(x)
    remove_lora(model)
    assert not lora_modules(model) and all(p.requires_grad for p in model.parameters())
    efformer.save(model, tmp_path / "m")
    torch.testing.assert_close(efformer.load(tmp_path / "m")(x), out, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kw,message", [
    (dict(rank=0), "rank"),
    (dict(rank=65), "min"),
    (dict(rank=2, targets=["nope"]), "selects no nn.Linear"),
    (dict(rank=2, targets=["ffn"]), "not an nn.Linear"),
    (dict(rank=2, targets="q_proj"), "a list of module names"),
    (dict(rank=2, alpha=-1.0), "alpha"),
])
def test_bad_input_is_refused_and_the_model_is_untouched(kw, message):
    model = tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(EfformerError, match=message):
        add_lora(model, **kw)
    assert not lora_modules(model) and all(p.requires_grad for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_second_add_and_saving_merged_adapters_are_refused(tmp_path):
    model = add_lora(tiny(), 2, ["q_proj"])
    with pytest.raises(EfformerError, match="already has LoRA"):
        add_lora(model, 2, ["down"])
    merge_lora(model)
    with pytest.raises(EfformerError, match="merged"):
        save_adapters(model, tmp_path / "a.safetensors")
    assert not (tmp_path / "a.safetensors").exists()


# ---- the peer oracle: peft's LoRA with the same adapter weights -------------------------------------
def _copy_into_peft(peft_model, ours: dict[str, LoRALinear], name_map) -> None:
    mods = dict(peft_model.named_modules())
    with torch.no_grad():
        for name, m in ours.items():
            target = mods[name_map(name)]
            target.lora_A["default"].weight.copy_(m.lora_A)
            target.lora_B["default"].weight.copy_(m.lora_B)


def test_peft_lora_on_plain_linears_gives_the_same_outputs():
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(11, 7), nn.GELU(), nn.Linear(7, 5))
    theirs = peft.inject_adapter_in_model(peft.LoraConfig(r=3, lora_alpha=5, target_modules=["0", "2"],
                                                          lora_dropout=0.0), copy.deepcopy(net))
    ours = add_lora(net, 3, ["0", "2"], alpha=5)
    randomize(ours, 0.3)
    _copy_into_peft(theirs, lora_modules(ours), lambda n: n)
    x = torch.randn(4, 11)
    torch.testing.assert_close(ours(x), theirs(x))


def test_peft_lora_on_an_imported_hf_model_gives_the_same_outputs(tmp_path):
    peft = pytest.importorskip("peft")
    hm = pytest.importorskip("tests.interop.hf_models")
    hf = hm.llama()
    model = efformer.interop.from_hf(hm.save(hf, tmp_path / "hf"))
    theirs = peft.get_peft_model(hf, peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                     target_modules=["q_proj", "o_proj", "down_proj"]))
    ours = add_lora(model, 4, ["q_proj", "out_proj", "down"], alpha=8)
    randomize(ours, 0.2)
    hf_name = {"mixer.q_proj": "self_attn.q_proj", "mixer.out_proj": "self_attn.o_proj", "ffn.down": "mlp.down_proj"}

    def name_map(n):  # backbone.blocks.{i}.{part} -> base_model.model.model.layers.{i}.{hf part}
        _, _, i, *rest = n.split(".")
        return f"base_model.model.model.layers.{i}.{hf_name['.'.join(rest)]}"

    _copy_into_peft(theirs, lora_modules(ours), name_map)
    x = torch.randint(1, hm.VOCAB, (2, 9))
    torch.testing.assert_close(ours(x), theirs(x).logits, atol=1e-5, rtol=1e-4)
    merge_lora(ours)
    theirs.merge_adapter()
    torch.testing.assert_close(ours(x), theirs(x).logits, atol=1e-5, rtol=1e-4)
