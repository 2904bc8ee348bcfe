"""Distillation: the closed-form KL gradient equals autograd's; distilling an exact (identity) conversion
changes nothing; a few steps to a linear-time mixer lower the held-out KL; only the converted mixers
train by default; resume repeats the uninterrupted run; bad input is refused before anything is written."""

from __future__ import annotations

import io
import json

import pytest
import torch
import torch.nn.functional as F

import efformer
from efformer.cli import main
from efformer.errors import CapabilityError, ConfigError, DataError, UnknownNameError
from efformer.interop import convert
from efformer.interop.distill import DistillLoss, SoftKL, distill, soft_kl_reference, text_examples
from efformer.interop.text import ByteTokenizer, train_bpe
from tests.interop.test_text import CORPUS

QUIET = {"progress_stream": io.StringIO()}
FAST = {"eval_batches": 2}  # the trainer's evaluations and the held-out figures: 16 windows


@pytest.fixture
def teacher():
    torch.manual_seed(0)
    return efformer.create_model("lm-tiny", d_model=32, n_layers=2, n_heads=2, max_len=64)


@pytest.fixture
def text(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text(CORPUS.read_text() * 4)  # ~8 KB: 200+ windows of 32 bytes
    return path


@pytest.mark.parametrize("t", [1.0, 2.5])
def test_closed_form_gradient_is_autograds(t):
    g = torch.Generator().manual_seed(1)
    s = torch.randn(3, 5, 11, dtype=torch.float64, generator=g, requires_grad=True)
    log_p = F.log_softmax(torch.randn(3, 5, 11, dtype=torch.float64, generator=g), -1)
    w = torch.randn(3, 5, dtype=torch.float64, generator=g)
    fast, ref = SoftKL.apply(s, log_p, t), soft_kl_reference(s, log_p, t)
    torch.testing.assert_close(fast, ref, rtol=1e-12, atol=1e-12)
    (g_fast,), (g_ref,) = torch.autograd.grad((fast * w).sum(), s), torch.autograd.grad((ref * w).sum(), s)
    torch.testing.assert_close(g_fast, g_ref, rtol=1e-10, atol=1e-12)
    assert (fast >= 0).all()
    # equal distributions: the closed form is exactly zero (autograd's leaves a rounding residue)
    same = (log_p * t).float().requires_grad_()
    (g0,) = torch.autograd.grad(SoftKL.apply(same, F.log_softmax(same.detach() / t, -1), t).sum(), same)
    assert torch.count_nonzero(g0) == 0


def test_identity_conversion_keeps_kl_zero_and_weights(teacher, text, tmp_path):
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    out = distill(teacher, [text], "softmax", steps=4, out_dir=tmp_path / "run", seq_len=32, train_all=True,
                  hidden_weight=1.0, train={"lr": 1e-2, **FAST}, **QUIET)
    assert out.metrics["kl_before"] == 0.0 and out.metrics["kl_after"] == 0.0
    for k, v in out.student.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert out.metrics["student_ppl"] == out.metrics["teacher_ppl"]
    saved = efformer.load(tmp_path / "run" / "model")
    ids = torch.randint(0, 256, (2, 20))
    assert torch.equal(saved(ids), teacher(ids))


def test_a_few_steps_lower_the_heldout_kl_and_train_only_the_converted_mixers(teacher, text, tmp_path):
    out = distill(teacher, [text], "simple_gla", steps=15, out_dir=tmp_path / "run", seq_len=32,
                  train={"lr": 5e-3, **FAST}, **QUIET)
    torch.manual_seed(0)  # train.seed: distill initialises the new mixers from it
    fresh, _ = convert(teacher, "simple_gla")  # the same conversion, untrained
    assert out.conversion.layers == [0, 1]
    assert out.metrics["kl_after"] < 0.75 * out.metrics["kl_before"], out.metrics
    moved = [k for k, v in out.student.state_dict().items() if not torch.equal(v, fresh.state_dict()[k])]
    assert moved and all(".mixer." in k for k in moved)  # embeddings, norms, FFNs untouched
    assert any(k.endswith("q_proj.weight") for k in moved)  # carried projections are trained too


def test_chosen_layers_and_train_all(teacher, text, tmp_path):
    out = distill(teacher, [text], "simple_gla", steps=2, out_dir=tmp_path / "run", seq_len=32, layers=[1],
                  train_all=True, train={"lr": 1e-2, **FAST}, **QUIET)
    assert out.conversion.layers == [1] and out.student.cfg.layer_mixers()[0][0] == "softmax"
    changed = [k for k, v in out.student.state_dict().items() if ".mixer." not in k
               and not torch.equal(v, teacher.state_dict()[k])]
    assert changed  # train_all: parameters outside the mixers move too


def test_hidden_term_adds_the_mixer_output_mse(teacher):
    student, _ = convert(teacher, "simple_gla", [0])
    ids = torch.randint(0, 256, (2, 12))
    batch = {"input_ids": ids, "mask": torch.ones_like(ids, dtype=torch.bool)}
    kl, n, _ = DistillLoss(teacher, [0])(student, batch)
    both, n2, _ = DistillLoss(teacher, [0], hidden_weight=2.0)(student, batch)
    # the MSE by hand: the two mixers' outputs on their own inputs at layer 0 (the embeddings, normed)
    outs = {}
    for who, m in (("t", teacher), ("s", student)):
        m.backbone.blocks[0].mixer.register_forward_hook(lambda mod, a, o, who=who: outs.__setitem__(who, o[0]))
        m(ids)
    mse = (outs["s"] - outs["t"]).pow(2).mean(-1)[:, :-1].sum()
    assert n == n2 == 2 * 11
    torch.testing.assert_close(both - kl, 2.0 * mse, rtol=1e-5, atol=1e-6)


def test_resume_repeats_the_uninterrupted_run(teacher, text, tmp_path):
    kw = {"seq_len": 16, "layers": [1], "train": {"lr": 3e-3, "schedule": "constant", "eval_batches": 1}, **QUIET}
    whole = distill(teacher, [text], "retnet", steps=2, out_dir=tmp_path / "a", **kw).student
    distill(teacher, [text], "retnet", steps=1, out_dir=tmp_path / "b", **kw)
    resumed = distill(teacher, [text], "retnet", steps=2, out_dir=tmp_path / "b", resume=True, **kw).student
    for k, v in whole.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[k], v, rtol=0, atol=0)


@pytest.mark.parametrize("kwargs, error", [
    ({"mixer": "no_such_mixer"}, UnknownNameError),
    ({"mixer": "gated_deltanet"}, CapabilityError),  # takes no rotary positions; the teacher uses rope
    ({"layers": [5]}, ConfigError),
    ({"temperature": 0.0}, ConfigError),
    ({"seq_len": 10**6}, DataError),
    ({"texts": ["missing.txt"]}, DataError),
    ({"texts": []}, ConfigError),
    ({"steps": 0}, ConfigError),
    ({"options": {"no_such_option": 1}}, ConfigError),
])
def test_bad_input_is_refused_before_writing(teacher, text, tmp_path, kwargs, error):
    kw = {"mixer": "simple_gla", "texts": [text], "steps": 2, "seq_len": 32, **kwargs}
    with pytest.raises(error):
        distill(teacher, kw.pop("texts"), kw.pop("mixer"), out_dir=tmp_path / "run", **kw, **QUIET)
    assert not (tmp_path / "run").exists()


def test_a_classifier_is_not_a_teacher(text, tmp_path):
    model = efformer.create_model("classifier-tiny")
    with pytest.raises(ConfigError, match="causal LM"):
        distill(model, [text], "simple_gla", steps=1, out_dir=tmp_path / "run", **QUIET)
    assert not (tmp_path / "run").exists()


def test_existing_run_needs_resume_and_a_file_is_not_a_folder(teacher, text, tmp_path):
    distill(teacher, [text], "simple_gla", steps=1, out_dir=tmp_path / "run", seq_len=32, train=FAST, **QUIET)
    with pytest.raises(ConfigError, match="--resume"):
        distill(teacher, [text], "simple_gla", steps=1, out_dir=tmp_path / "run", seq_len=32, **QUIET)
    (tmp_path / "f").write_text("x")
    with pytest.raises(ConfigError, match="is a file"):
        distill(teacher, [text], "simple_gla", steps=1, out_dir=tmp_path / "f", seq_len=32, **QUIET)


def test_text_examples_split_head_and_tail(text):
    train, held = text_examples([text], ByteTokenizer(), 256, 32, 32, 0.1)
    data = text.read_bytes()
    assert train[0]["input_ids"].tolist() == list(data[:32])
    assert held[0]["input_ids"].tolist() == list(data[int(len(data) * 0.9):][:32])


def test_cli_distills_a_folder_with_its_tokenizer(teacher, text, tmp_path, capsys):
    train_bpe([CORPUS], 300, tmp_path / "tok")
    torch.manual_seed(0)
    model = efformer.create_model("lm-tiny", d_model=32, n_layers=2, n_heads=2, max_len=64, vocab_size=300)
    efformer.save(model, tmp_path / "teacher", extra={"tokenizer.json": (tmp_path / "tok/tokenizer.json").read_bytes()})
    code = main(["distill", str(tmp_path / "teacher"), "--mixer", "retnet", "--text", str(text), "--steps", "2",
                 "--seq-len", "16", "--layers", "1", "--out", str(tmp_path / "run")])
    assert code == 0
    printed = capsys.readouterr().out
    report = json.loads(printed[printed.index('{\n  "model"'):])
    assert report["layers"] == [1] and report["kl_after"] >= 0
    student = efformer.load(tmp_path / "run" / "model")
    assert student.cfg.layer_mixers()[1][0] == "retnet"
    assert (tmp_path / "run/model/tokenizer.json").read_bytes() == (tmp_path / "tok/tokenizer.json").read_bytes()


@pytest.mark.parametrize("args", [
    ["--mixer", "no_such_mixer"],
    ["--mixer", "retnet", "--layers", "x"],
    ["--mixer", "retnet", "--option", "a.b=1"],
    ["--mixer", "retnet", "--temperature", "-1"],
])
def test_cli_bad_arguments_exit_2_and_write_nothing(teacher, text, tmp_path, args, capsys):
    efformer.save(teacher, tmp_path / "teacher")
    code = main(["distill", str(tmp_path / "teacher"), "--text", str(text), "--steps", "2", "--out",
                 str(tmp_path / "run"), *args])
    assert code == 2 and "efformer: error" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
