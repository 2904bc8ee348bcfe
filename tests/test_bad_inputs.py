"""Every bad input is answered clearly: an EfformerError (or, on the command line, exit code 2 and one
paragraph on stderr) that names the field or file and the offending value or the fix. No traceback from
deep inside torch/numpy/json/os, no silent acceptance, and nothing left on disk by a failed command.

The corpus is a set of tables, one per surface. A case is an id, a callable that must fail, the
EfformerError subclass it must raise, and words the message must contain (all of them, any case).
"""

from __future__ import annotations

import functools
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

import efformer
from efformer.cli import main
from efformer.data import listops, loaders, pathfinder
from efformer.data.png import SIGNATURE, decode_png, encode_png, read_png
from efformer.errors import (
    CapabilityError,
    ConfigError,
    DataError,
    EfformerError,
    ShapeError,
    UnknownNameError,
)
from efformer.models import build_config, create_model
from efformer.registry import MIXERS
from efformer.results import ResultsStore

SRC = Path(__file__).resolve().parents[1] / "src"


def _expect(fn, exc: type[EfformerError], must: tuple[str, ...]) -> None:
    with pytest.raises(EfformerError) as info:
        fn()
    assert isinstance(info.value, exc), f"{type(info.value).__name__} raised, {exc.__name__} expected: {info.value}"
    msg = str(info.value).lower()
    missing = [w for w in must if w.lower() not in msg]
    assert not missing, f"message {str(info.value)!r} lacks {missing}"


def _ids(cases) -> list[str]:
    return [c[0] for c in cases]


# ---- shared models (built once; small) ---------------------------------------------------------
@functools.cache
def lm():
    torch.manual_seed(0)
    return create_model("lm-tiny", d_model=32, n_layers=1, n_heads=2, max_len=64).eval()


@functools.cache
def clf():
    torch.manual_seed(0)
    return create_model("classifier-tiny", d_model=32, n_layers=1, n_heads=2, max_len=64).eval()


@functools.cache
def dual():
    torch.manual_seed(0)
    return create_model("dual-tiny", d_model=32, n_layers=1, n_heads=2, max_len=64).eval()


def ids(*shape, dtype=torch.long, value=1):
    return torch.full(shape, value, dtype=dtype)


def keep(*shape, value=True):
    return torch.full(shape, value, dtype=torch.bool)


# ---- create_model / build_config -------------------------------------------------------------
CONFIG_CASES = [
    ("config-not-a-dict", lambda: build_config([1, 2]), ConfigError, ("config", "list")),
    ("bool-as-int", lambda: build_config({"n_layers": True}), ConfigError, ("n_layers", "true")),
    ("flat-options-with-mixer-list", lambda: build_config({"mixer": ["softmax", "sliding_window"],
                                                           "mixer_options": {"window": 3}}), ConfigError,
     ("mixer_options", "window", "list of dicts")),
    ("options-list-wrong-length", lambda: build_config({"mixer": ["softmax", "softmax"],
                                                        "mixer_options": [{}]}), ConfigError,
     ("mixer_options", "1 entries")),
    ("form-not-declared", lambda: build_config({"mixer_options": {"form": "chunked"}}), ConfigError,
     ("mixer_options[softmax].form", "chunked")),
    ("bias-on-kernel-mixer", lambda: build_config({"mixer": "performer", "positional": "alibi"}), CapabilityError,
     ("performer", "attention bias")),
    ("create-int", lambda: create_model(123), ConfigError, ("preset_or_config", "123", "preset")),
    ("create-list", lambda: create_model([1, 2]), ConfigError, ("preset_or_config", "[1, 2]")),
    ("create-none", lambda: create_model(None), ConfigError, ("preset_or_config", "none")),
    ("create-tensor", lambda: create_model(torch.zeros(2)), ConfigError, ("preset_or_config",)),
    ("create-unknown-preset", lambda: create_model("lm-huge"), UnknownNameError, ("lm-huge", "lm-tiny")),
    ("unknown-key", lambda: create_model("lm-tiny", foo=1), ConfigError, ("foo", "unknown key")),
    ("typo-key", lambda: build_config({"d_modle": 64}), ConfigError, ("d_modle", "allowed")),
    ("d-model-str", lambda: build_config({"d_model": "big"}), ConfigError, ("d_model", "big")),
    ("d-model-zero", lambda: build_config({"d_model": 0}), ConfigError, ("d_model", "0", "greater than 0")),
    ("d-model-float", lambda: build_config({"d_model": 64.5}), ConfigError, ("d_model", "64.5")),
    ("n-heads-zero", lambda: build_config({"n_heads": 0}), ConfigError, ("n_heads", "0")),
    ("n-heads-not-dividing", lambda: build_config({"d_model": 64, "n_heads": 3}), ConfigError,
     ("n_heads=3", "d_model=64")),
    ("n-layers-negative", lambda: build_config({"n_layers": -1}), ConfigError, ("n_layers", "-1")),
    ("vocab-zero", lambda: build_config({"vocab_size": 0}), ConfigError, ("vocab_size", "0")),
    ("max-len-zero", lambda: build_config({"max_len": 0}), ConfigError, ("max_len", "0")),
    ("pad-id-too-big", lambda: build_config({"vocab_size": 10, "pad_id": 10}), ConfigError,
     ("pad_id=10", "vocab_size=10")),
    ("pad-id-negative", lambda: build_config({"pad_id": -1}), ConfigError, ("pad_id", "-1")),
    ("dropout-one", lambda: build_config({"dropout": 1.0}), ConfigError, ("dropout", "1.0")),
    ("attn-dropout-negative", lambda: build_config({"attn_dropout": -0.1}), ConfigError, ("attn_dropout", "-0.1")),
    ("ffn-mult-negative", lambda: build_config({"ffn_mult": -2}), ConfigError, ("ffn_mult", "-2")),
    ("n-classes-one", lambda: build_config({"task": "classifier", "n_classes": 1}), ConfigError, ("n_classes", "1")),
    ("task-unknown", lambda: build_config({"task": "translate"}), ConfigError, ("task", "translate")),
    ("pooling-unknown", lambda: build_config({"pooling": "max"}), ConfigError, ("pooling", "max")),
    ("placement-unknown", lambda: build_config({"norm_placement": "middle"}), ConfigError,
     ("norm_placement", "middle")),
    ("dual-features-unknown", lambda: build_config({"dual_features": "cat"}), ConfigError, ("dual_features", "cat")),
    ("tie-embeddings-str", lambda: build_config({"tie_embeddings": "maybe"}), ConfigError,
     ("tie_embeddings", "maybe")),
    ("mixer-unknown", lambda: build_config({"mixer": "sofmax"}), UnknownNameError, ("sofmax", "softmax")),
    ("mixer-int", lambda: build_config({"mixer": 5}), ConfigError, ("mixer", "5")),
    ("mixer-list-length", lambda: build_config({"mixer": ["softmax"], "n_layers": 2}), ConfigError,
     ("mixer", "n_layers=2")),
    ("mixer-list-unknown", lambda: build_config({"mixer": ["softmax", "nope"]}), UnknownNameError, ("nope",)),
    ("positional-unknown", lambda: build_config({"positional": "ropez"}), UnknownNameError, ("ropez", "rope")),
    ("norm-unknown", lambda: build_config({"norm": "batchnorm"}), UnknownNameError, ("batchnorm", "layernorm")),
    ("ffn-unknown", lambda: build_config({"ffn": "swish"}), UnknownNameError, ("swish", "swiglu")),
    ("mixer-option-unknown", lambda: build_config({"mixer_options": {"heads_kv": 2}}), ConfigError,
     ("heads_kv", "allowed")),
    ("mixer-options-list", lambda: build_config({"mixer_options": [1]}), ConfigError, ("mixer_options", "[1]")),
    ("mixer-option-type", lambda: build_config({"mixer_options": {"qk_norm": "yes please"}}), ConfigError,
     ("qk_norm", "yes please")),
    ("mixer-option-form", lambda: create_model("lm-tiny", mixer_options={"form": "turbo"}), ConfigError,
     ("form", "turbo", "reference")),
    ("mixer-option-form-config", lambda: build_config({"mixer_options": {"form": "turbo"}}), ConfigError,
     ("form", "turbo", "reference")),
    ("hybrid-options-not-dict", lambda: build_config({"mixer": ["softmax", "linear"], "positional": "none",
                                                      "mixer_options": {"softmax": 3}}), ConfigError,
     ("mixer_options", "softmax", "3")),
    ("n-kv-heads-zero", lambda: create_model("lm-tiny", mixer_options={"n_kv_heads": 0}), ConfigError,
     ("n_kv_heads", "0")),
    ("n-kv-heads-not-dividing", lambda: create_model("lm-tiny", mixer_options={"n_kv_heads": 3}), ConfigError,
     ("n_kv_heads", "3")),
    ("n-kv-heads-not-dividing-config", lambda: build_config({"mixer_options": {"n_kv_heads": 3}}), ConfigError,
     ("n_kv_heads", "3")),
    ("positional-option-unknown", lambda: build_config({"positional_options": {"bogus": 1}}), ConfigError,
     ("bogus", "positional")),
    ("bidirectional-only-in-lm", lambda: build_config({"mixer": "linformer"}), CapabilityError,
     ("linformer", "causal")),
    ("causal-only-in-classifier", lambda: build_config({"task": "classifier", "mixer": "mamba",
                                                        "positional": "none"}), CapabilityError,
     ("mamba", "encoder_causal")),
    ("bias-positional-without-scores", lambda: build_config({"mixer": "linear", "positional": "alibi"}),
     CapabilityError, ("alibi", "linear")),
    ("rotary-without-support", lambda: build_config({"mixer": "linear", "positional": "rope"}), CapabilityError,
     ("rope", "linear")),
]


@pytest.mark.parametrize(("case", "fn", "exc", "must"), CONFIG_CASES, ids=_ids(CONFIG_CASES))
def test_config(case, fn, exc, must):
    _expect(fn, exc, must)


# ---- model forward -----------------------------------------------------------------------------
FORWARD_CASES = [
    ("lm-list", lambda: lm()([[1, 2, 3]]), ShapeError, ("input_ids", "list", "torch.tensor")),
    ("lm-tuple", lambda: lm()((1, 2, 3)), ShapeError, ("input_ids", "tuple")),
    ("lm-numpy", lambda: lm()(np.ones((1, 3), np.int64)), ShapeError, ("input_ids", "ndarray")),
    ("lm-none", lambda: lm()(None), ShapeError, ("input_ids", "nonetype")),
    ("lm-float-ids", lambda: lm()(ids(1, 3, dtype=torch.float32)), ShapeError, ("input ids", "float32")),
    ("lm-1d", lambda: lm()(ids(3)), ShapeError, ("input ids", "(3,)")),
    ("lm-3d", lambda: lm()(ids(1, 3, 2)), ShapeError, ("input ids", "(1, 3, 2)")),
    ("lm-oov", lambda: lm()(ids(1, 3, value=999)), ShapeError, ("999", "vocab")),
    ("lm-negative-id", lambda: lm()(ids(1, 3, value=-1)), ShapeError, ("-1", "vocab")),
    ("lm-empty", lambda: lm()(ids(1, 0)), ShapeError, ("seq", "at least one token")),
    ("lm-mask-shape", lambda: lm()(ids(1, 3), mask=keep(1, 4)), ShapeError, ("mask", "(1, 4)")),
    ("lm-mask-float", lambda: lm()(ids(1, 3), mask=torch.ones(1, 3)), ShapeError, ("mask", "float32")),
    ("lm-mask-list", lambda: lm()(ids(1, 3), mask=[[True] * 3]), ShapeError, ("mask", "list")),
    ("lm-mask-all-false", lambda: lm()(ids(1, 3), mask=keep(1, 3, value=False)), ShapeError, ("mask", "all false")),
    ("lm-mask-one-row-empty", lambda: lm()(ids(2, 3), mask=torch.tensor([[True] * 3, [False] * 3])), ShapeError,
     ("mask row 1", "all false")),
    ("lm-positions-list", lambda: lm()(ids(1, 3), positions=[0, 1, 2]), ShapeError, ("positions", "list")),
    ("lm-positions-shape", lambda: lm()(ids(1, 3), positions=torch.arange(5)[None]), ShapeError,
     ("positions", "(1, 5)", "(1, 3)")),
    ("lm-positions-float", lambda: lm()(ids(1, 3), positions=torch.zeros(1, 3)), ShapeError,
     ("positions", "float32")),
    ("lm-positions-negative", lambda: lm()(ids(1, 3), positions=torch.tensor([[-1, 0, 1]])), ShapeError,
     ("positions", "-1")),
    ("lm-cache-batch", lambda: lm()(ids(2, 3), cache=lm().new_cache(1)), ShapeError,
     ("cache", "1 rows", "batch 2", "new_cache(2)")),
    ("lm-cache-dict", lambda: lm()(ids(1, 3), cache={}), ShapeError, ("cache", "dict", "new_cache")),
    ("lm-new-cache-zero", lambda: lm().new_cache(0), ConfigError, ("batch", "0", ">= 1")),
    ("lm-new-cache-str", lambda: lm().new_cache("2"), ConfigError, ("batch", "'2'")),
    ("clf-list", lambda: clf()([[1, 2]]), ShapeError, ("input_ids", "list")),
    ("clf-float-ids", lambda: clf()(ids(1, 3, dtype=torch.float64)), ShapeError, ("input ids", "float64")),
    ("clf-oov", lambda: clf()(ids(1, 3, value=256)), ShapeError, ("256", "vocab")),
    ("clf-mask-all-false", lambda: clf()(ids(1, 3), mask=keep(1, 3, value=False)), ShapeError,
     ("mask", "all false")),
    ("clf-mask-list", lambda: clf()(ids(1, 3), mask=[[1, 1, 1]]), ShapeError, ("mask", "list")),
    ("dual-batch-mismatch", lambda: dual()(ids(1, 3), ids(2, 3)), ShapeError, ("ids1", "ids2", "batch 1", "2")),
    ("dual-list", lambda: dual()([[1]], ids(1, 3)), ShapeError, ("ids1", "list")),
    ("dual-second-list", lambda: dual()(ids(1, 3), [[1]]), ShapeError, ("ids2", "list")),
    ("dual-oov", lambda: dual()(ids(1, 3), ids(1, 3, value=300)), ShapeError, ("300", "vocab")),
]


@pytest.mark.parametrize(("case", "fn", "exc", "must"), FORWARD_CASES, ids=_ids(FORWARD_CASES))
def test_forward(case, fn, exc, must):
    _expect(fn, exc, must)


# ---- generate ----------------------------------------------------------------------------------
def gen(prompt=None, **kw):
    return lm().generate([[1, 2]] if prompt is None else prompt, **{"max_new_tokens": 2, **kw})


GENERATE_CASES = [
    ("max-new-float", lambda: gen(max_new_tokens=2.5), ConfigError, ("max_new_tokens", "2.5", "integer")),
    ("max-new-str", lambda: gen(max_new_tokens="3"), ConfigError, ("max_new_tokens", "'3'")),
    ("max-new-negative", lambda: gen(max_new_tokens=-1), ConfigError, ("max_new_tokens", "-1", ">= 0")),
    ("max-new-none", lambda: gen(max_new_tokens=None), ConfigError, ("max_new_tokens", "none")),
    ("temperature-negative", lambda: gen(temperature=-0.5), ConfigError, ("temperature", "-0.5", "greedy")),
    ("temperature-str", lambda: gen(temperature="hot"), ConfigError, ("temperature", "hot")),
    ("temperature-nan", lambda: gen(temperature=float("nan")), ConfigError, ("temperature", "nan")),
    ("temperature-inf", lambda: gen(temperature=float("inf")), ConfigError, ("temperature", "inf")),
    ("top-p-zero", lambda: gen(temperature=1.0, top_p=0.0), ConfigError, ("top_p", "0.0", "(0, 1]")),
    ("top-p-big", lambda: gen(temperature=1.0, top_p=1.5), ConfigError, ("top_p", "1.5")),
    ("top-p-str", lambda: gen(temperature=1.0, top_p="half"), ConfigError, ("top_p", "half")),
    ("top-k-zero", lambda: gen(temperature=1.0, top_k=0), ConfigError, ("top_k", "0", "positive")),
    ("top-k-float", lambda: gen(temperature=1.0, top_k=2.5), ConfigError, ("top_k", "2.5")),
    ("stop-tokens-str", lambda: gen(stop_tokens="ab"), ConfigError, ("stop_tokens", "ab")),
    ("stop-tokens-float", lambda: gen(stop_tokens=[1.5]), ConfigError, ("stop_tokens", "1.5")),
    ("stop-tokens-int", lambda: gen(stop_tokens=3), ConfigError, ("stop_tokens", "3")),
    ("generator-int", lambda: gen(generator=5), ConfigError, ("generator", "5")),
    ("prompt-flat-list", lambda: gen([1, 2]), ShapeError, ("prompt_ids", "[[1, 2, 3]]")),
    ("prompt-empty-list", lambda: gen([]), ShapeError, ("prompt_ids", "non-empty")),
    ("prompt-empty-row", lambda: gen([[1], []]), ShapeError, ("prompt_ids", "non-empty")),
    ("prompt-str-token", lambda: gen([["a"]]), ShapeError, ("prompt_ids[0]", "'a'", "integers")),
    ("prompt-float-token", lambda: gen([[1, 2.5]]), ShapeError, ("prompt_ids[0]", "2.5")),
    ("prompt-str", lambda: gen("hello"), ShapeError, ("prompt_ids", "str")),
    ("prompt-float-tensor", lambda: gen(torch.ones(1, 2)), ShapeError, ("prompt_ids", "float32")),
    ("prompt-1d-tensor", lambda: gen(torch.ones(2, dtype=torch.long)), ShapeError, ("prompt_ids", "(2,)")),
    ("prompt-oov", lambda: gen([[1, 999]]), ShapeError, ("999", "vocab")),
    ("classifier-generate", lambda: clf().generate([[1, 2]]), CapabilityError, ("sequenceclassifier", "task='lm'")),
    ("dual-generate", lambda: dual().generate([[1, 2]], 3), CapabilityError, ("dualencoderclassifier", "task='lm'")),
]


@pytest.mark.parametrize(("case", "fn", "exc", "must"), GENERATE_CASES, ids=_ids(GENERATE_CASES))
def test_generate(case, fn, exc, must):
    _expect(fn, exc, must)


# ---- mixers built directly ---------------------------------------------------------------------
def mixer(name="softmax", *args, **kw):
    cls = MIXERS.get(name)
    kw.setdefault("causal", not cls.capabilities.bidirectional)
    return cls(*(args or (32, 4)), **kw)


def x(*shape, dtype=torch.float32):
    return torch.zeros(*(shape or (1, 8, 32)), dtype=dtype)


MIXER_CASES = [
    ("d-model-str", lambda: mixer("softmax", "32", 4), ConfigError, ("d_model", "'32'")),
    ("d-model-float", lambda: mixer("softmax", 32.0, 4), ConfigError, ("d_model", "32.0")),
    ("n-heads-zero", lambda: mixer("softmax", 32, 0), ConfigError, ("n_heads", "0")),
    ("n-heads-not-dividing", lambda: mixer("performer", 32, 3), ConfigError, ("n_heads=3", "d_model=32")),
    ("options-str", lambda: mixer(options="fast"), ConfigError, ("options", "fast", "dict")),
    ("option-unknown", lambda: mixer(options={"foo": 1}), ConfigError, ("foo", "allowed")),
    ("form-unknown", lambda: mixer(options={"form": "turbo"}), ConfigError, ("form", "turbo", "reference")),
    ("n-kv-heads-zero", lambda: mixer(options={"n_kv_heads": 0}), ConfigError, ("n_kv_heads", "0")),
    ("dropout-above-one", lambda: mixer(dropout=2.0), ConfigError, ("dropout", "2.0")),
    ("dropout-negative", lambda: mixer(dropout=-0.1), ConfigError, ("dropout", "-0.1")),
    ("causal-bidirectional-only", lambda: mixer("linformer", causal=True), CapabilityError,
     ("linformer", "causal")),
    ("bidirectional-causal-only", lambda: mixer("mamba", causal=False), CapabilityError, ("mamba", "causal only")),
    ("window-zero", lambda: mixer("sliding_window", options={"window": 0}), ConfigError, ("window", "0")),
    ("reformer-odd-buckets", lambda: mixer("reformer", options={"n_buckets": 3}), ConfigError,
     ("n_buckets", "3", "even")),
    ("synthesizer-factor", lambda: mixer("synthesizer_dense", options={"factorized": 7}), ConfigError,
     ("factorized", "7", "divide")),
    ("x-2d", lambda: mixer()(x(8, 32)), ShapeError, ("x", "(8, 32)")),
    ("x-wrong-width", lambda: mixer()(x(1, 8, 16)), ShapeError, ("x", "(1, 8, 16)", "32")),
    ("x-list", lambda: mixer()([[0.0] * 32]), ShapeError, ("x", "list")),
    ("x-integer-dtype", lambda: mixer()(x(1, 8, 32, dtype=torch.long)), ShapeError, ("x", "int64")),
    ("mask-wrong-shape", lambda: mixer()(x(), mask=keep(1, 9)), ShapeError, ("mask", "(1, 9)")),
    ("mask-all-false", lambda: mixer()(x(), mask=keep(1, 8, value=False)), ShapeError, ("mask", "false")),
    ("linformer-too-long", lambda: mixer("linformer", max_len=16)(x(1, 32, 32)), ShapeError,
     ("32", "max_len=16")),
    ("causal-not-bool", lambda: mixer(causal="yes"), ConfigError, ("causal", "yes")),
    ("max-len-float", lambda: mixer(max_len=3.5), ConfigError, ("max_len", "3.5")),
    ("positions-float", lambda: mixer()(x(), positions=torch.zeros(1, 8)), ShapeError, ("positions", "float32")),
    ("state-not-a-state", lambda: mixer(causal=True)(x(), state="abc"), ShapeError, ("state", "str")),
    ("state-of-another-mixer", lambda: mixer(causal=True)(x(), state=mixer("linear", causal=True).init_state(
        1, "cpu", torch.float32)), ShapeError, ("state", "KVState", "KernelState")),
    ("state-other-batch", lambda: mixer(causal=True)(x(2, 8, 32), state=mixer(causal=True).init_state(
        1, "cpu", torch.float32)), ShapeError, ("state", "1 rows", "batch 2")),
    ("state-on-no-decode-mixer", lambda: mixer("linformer")(x(), state=mixer(causal=True).init_state(
        1, "cpu", torch.float32)), CapabilityError, ("linformer", "no decode state")),
    ("form-forced-triton-on-cpu", lambda: mixer("gla", options={"form": "triton"})(x()), CapabilityError,
     ("triton", "cuda")),
    ("rotary-context-on-kernel-mixer", lambda: mixer("linear")(x(), positions=efformer.nn.positional.build_positional(
        "rope", 32, 4, 64, False).context(torch.arange(8)[None], torch.float32)), CapabilityError,
     ("linear", "rotary")),
]


@pytest.mark.parametrize(("case", "fn", "exc", "must"), MIXER_CASES, ids=_ids(MIXER_CASES))
def test_mixer(case, fn, exc, must):
    _expect(fn, exc, must)


# ---- data generators ---------------------------------------------------------------------------
LO = listops.ListOpsConfig(min_len=5, max_len=40, max_depth=3, n_train=4, n_val=1, n_test=1)


def lo_cfg(**kw):
    return listops.ListOpsConfig(**{**LO.__dict__, **kw})


GENERATOR_CASES = [
    ("listops-max-args-one", lambda: lo_cfg(max_args=1).check(), ConfigError, ("max_args", "1", "2 arguments")),
    ("listops-depth-zero", lambda: lo_cfg(max_depth=0).check(), ConfigError, ("max_depth", "0")),
    ("listops-op-prob-zero", lambda: lo_cfg(op_prob=0.0).check(), ConfigError, ("op_prob", "0.0")),
    ("listops-op-prob-str", lambda: lo_cfg(op_prob="often").check(), ConfigError, ("op_prob", "often")),
    ("listops-n-train-zero", lambda: lo_cfg(n_train=0).check(), ConfigError, ("n_train", "0")),
    ("listops-n-val-negative", lambda: lo_cfg(n_val=-1).check(), ConfigError, ("-1", ">= 0")),
    ("listops-n-train-str", lambda: lo_cfg(n_train="10").check(), ConfigError, ("n_train", "'10'", "integer")),
    ("listops-bounds-crossed", lambda: lo_cfg(min_len=50, max_len=40).check(), ConfigError,
     ("min_len", "(50, 40)")),
    ("listops-too-shallow", lambda: lo_cfg(min_len=500, max_len=2000).check(), ConfigError,
     ("min_len", "max_depth")),
    ("listops-huge-depth-bounds", lambda: lo_cfg(max_depth=10**9, min_len=30, max_len=31).check(), ConfigError,
     ("min_len", "max_len")),
    ("listops-seed-negative", lambda: listops.generate(LO, seed=-1), ConfigError, ("seed", "-1")),
    ("listops-unreachable-n", lambda: listops.generate(lo_cfg(min_len=2, max_len=5, max_depth=2, max_args=2,
                                                             n_train=10_000)), ConfigError, ("n", "unique")),
    ("pathfinder-resolution", lambda: pathfinder.params_for(48), ConfigError, ("resolution", "48", "32")),
    ("pathfinder-resolution-str", lambda: pathfinder.params_for("32"), ConfigError, ("resolution", "'32'")),
    ("pathfinder-difficulty", lambda: pathfinder.params_for(32, "extreme"), ConfigError,
     ("difficulty", "extreme", "hard")),
]


@pytest.mark.parametrize(("case", "fn", "exc", "must"), GENERATOR_CASES, ids=_ids(GENERATOR_CASES))
def test_generator(case, fn, exc, must):
    _expect(fn, exc, must)


def _pf(tmp, **kw):
    return pathfinder.generate_files(tmp / "pf", **{"n": 2, **kw})


GENERATOR_FILE_CASES = [  # each also checks that nothing was written
    ("pathfinder-n-zero", lambda t: _pf(t, n=0), ConfigError, ("n", "0", ">= 1")),
    ("pathfinder-batch-zero", lambda t: _pf(t, batch_size=0), ConfigError, ("batch_size", "0")),
    ("pathfinder-seed-negative", lambda t: _pf(t, seed=-3), ConfigError, ("seed", "-3")),
    ("pathfinder-n-float", lambda t: _pf(t, n=2.5), ConfigError, ("n", "2.5", "integer")),
    ("pathfinder-bad-resolution", lambda t: _pf(t, resolution=100), ConfigError, ("resolution", "100")),
    ("pathfinder-out-is-file", lambda t: pathfinder.generate_files(_file(t / "f"), n=1), ConfigError,
     ("out", "is a file")),
    ("listops-out-is-file", lambda t: listops.generate_files(_file(t / "f"), LO), ConfigError, ("out", "is a file")),
    ("listops-files-bad-config", lambda t: listops.generate_files(t / "lo", lo_cfg(max_args=0)), ConfigError,
     ("max_args", "0")),
]


def _file(path: Path, data: bytes = b"x") -> Path:
    path.write_bytes(data)
    return path


@pytest.mark.parametrize(("case", "fn", "exc", "must"), GENERATOR_FILE_CASES, ids=_ids(GENERATOR_FILE_CASES))
def test_generator_writes_nothing(case, fn, exc, must, tmp_path):
    before = _tree(tmp_path)
    _expect(lambda: fn(tmp_path), exc, must)
    assert _tree(tmp_path) == before | {p for p in _tree(tmp_path) if p == "f"}


# ---- data files --------------------------------------------------------------------------------
HEADER = "Source\tTarget\n"
GOOD_ROW = "( ( [MAX 2 ) 9 ) ]\t9\n"


def _png_chunks(*chunks: tuple[bytes, bytes]) -> bytes:
    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    return SIGNATURE + b"".join(chunk(k, b) for k, b in chunks)


def _ihdr(w=2, h=2, depth=8, color=0, interlace=0) -> tuple[bytes, bytes]:
    return b"IHDR", struct.pack(">IIBBBBB", w, h, depth, color, 0, 0, interlace)


GOOD_PNG = encode_png(np.arange(16, dtype=np.uint8).reshape(4, 4))


def listops_file(tmp: Path, text: str | bytes, **kw):
    p = tmp / "basic_train.tsv"
    p.write_bytes(text.encode() if isinstance(text, str) else text)
    return loaders.read_listops_tsv(p, **kw)


def png_file(tmp: Path, data: bytes):
    return read_png(_file(tmp / "img.png", data))


def pathfinder_dir(tmp: Path, lines: list[str] | None, images: dict[str, bytes] | None = None) -> Path:
    root = tmp / "curv_baseline"
    if lines is not None:
        (root / "metadata").mkdir(parents=True)
        (root / "metadata" / "0.npy").write_text("".join(line + "\n" for line in lines))
    (root / "imgs" / "0").mkdir(parents=True, exist_ok=True)
    for name, data in (images or {}).items():
        (root / "imgs" / "0" / name).write_bytes(data)
    return root


def meta(name: str, label: int | str = 1) -> str:
    return f"imgs/0 {name} 0 {label} 1.8 14 5 5 2 1 1"


def read_pf(tmp, lines, images=None):
    return loaders.read_pathfinder(pathfinder_dir(tmp, lines, images))


CIFAR_RECORD = loaders.CIFAR_RECORD


def cifar_file(tmp: Path, data: bytes):
    return loaders.read_cifar10_bin(_file(tmp / "data_batch_1.bin", data))


def imdb_dir(tmp: Path, files: dict[str, bytes]) -> Path:
    for rel, data in files.items():
        p = tmp / "aclImdb" / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    return tmp / "aclImdb"


def aan_file(tmp: Path, text: bytes, **kw):
    return loaders.read_aan_tsv(_file(tmp / "new_aan_pairs.train.tsv", text), **kw)


DATA_CASES = [
    # ListOps TSV
    ("listops-binary", lambda t: listops_file(t, HEADER.encode() + b"\x89PNG\xff\xfe\x00\x01\t3\n"), DataError,
     ("basic_train.tsv:2", "utf-8", "0x89")),
    ("listops-binary-header", lambda t: listops_file(t, b"\xff\xd8\xff\xe0binary\n"), DataError,
     ("basic_train.tsv:1", "utf-8")),
    ("listops-empty", lambda t: listops_file(t, ""), DataError, ("basic_train.tsv", "empty")),
    ("listops-header-only", lambda t: listops_file(t, HEADER), DataError, ("basic_train.tsv", "no examples")),
    ("listops-wrong-header", lambda t: listops_file(t, "input\tlabel\n" + GOOD_ROW), DataError,
     ("basic_train.tsv:1", "source\\ttarget", "input")),
    ("listops-label-ten", lambda t: listops_file(t, HEADER + "( [MAX 2 ) ]\t10\n"), DataError,
     ("basic_train.tsv:2", "label 0-9", "10")),
    ("listops-label-word", lambda t: listops_file(t, HEADER + "( [MAX 2 ) ]\tnine\n"), DataError,
     ("basic_train.tsv:2", "nine")),
    ("listops-label-superscript", lambda t: listops_file(t, HEADER + "( [MAX 2 ) ]\t\u00b2\n"), DataError,
     ("basic_train.tsv:2", "label 0-9")),
    ("listops-one-column", lambda t: listops_file(t, HEADER + GOOD_ROW + "( [MAX 2 ) ]\n"), DataError,
     ("basic_train.tsv:3", "<expression>")),
    ("listops-three-columns", lambda t: listops_file(t, HEADER + "a\t1\t2\n"), DataError,
     ("basic_train.tsv:2", "a\\t1\\t2")),
    ("listops-empty-expression", lambda t: listops_file(t, HEADER + "( )\t3\n"), DataError,
     ("basic_train.tsv:2", "empty expression")),
    ("listops-max-len-zero", lambda t: listops_file(t, HEADER + GOOD_ROW, max_len=0), ConfigError,
     ("max_len", "0", ">= 1")),
    ("listops-missing", lambda t: loaders.read_listops_tsv(t / "nope.tsv"), DataError, ("nope.tsv", "not found")),
    ("listops-directory", lambda t: loaders.read_listops_tsv(t), DataError, ("folder, not a file",)),
    # PNG
    ("png-5-byte-header", lambda t: png_file(t, SIGNATURE[:5]), DataError, ("img.png", "not a png")),
    ("png-5-byte-ihdr", lambda t: png_file(t, _png_chunks((b"IHDR", b"\0\0\0\4\0"))), DataError,
     ("img.png", "ihdr", "5 bytes")),
    ("png-signature-only", lambda t: png_file(t, SIGNATURE), DataError, ("img.png", "ihdr")),
    ("png-cut-in-chunk-header", lambda t: png_file(t, GOOD_PNG[:36]), DataError, ("img.png", "truncated")),
    ("png-cut-in-chunk-body", lambda t: png_file(t, GOOD_PNG[:-20]), DataError, ("img.png", "truncated")),
    ("png-crc", lambda t: png_file(t, GOOD_PNG[:40] + bytes([GOOD_PNG[40] ^ 0xFF]) + GOOD_PNG[41:]), DataError,
     ("img.png", "crc")),
    ("png-zero-width", lambda t: png_file(t, _png_chunks(_ihdr(w=0), (b"IDAT", zlib.compress(b"\0\0")),
                                                         (b"IEND", b""))), DataError, ("img.png", "0x2")),
    ("png-rgb", lambda t: png_file(t, _png_chunks(_ihdr(color=2), (b"IDAT", zlib.compress(b"\0" * 14)),
                                                  (b"IEND", b""))), DataError, ("img.png", "colour type 2")),
    ("png-16-bit", lambda t: png_file(t, _png_chunks(_ihdr(depth=16), (b"IDAT", zlib.compress(b"\0" * 10)),
                                                     (b"IEND", b""))), DataError, ("img.png", "bit depth 16")),
    ("png-bad-filter", lambda t: png_file(t, _png_chunks(_ihdr(2, 1), (b"IDAT", zlib.compress(b"\x07ab")),
                                                         (b"IEND", b""))), DataError, ("img.png", "filter type 7")),
    ("png-bad-zlib", lambda t: png_file(t, _png_chunks(_ihdr(), (b"IDAT", b"garbage"), (b"IEND", b""))),
     DataError, ("img.png", "corrupt")),
    ("png-size-mismatch", lambda t: png_file(t, _png_chunks(_ihdr(9, 9), (b"IDAT", zlib.compress(b"\0\0\0")),
                                                            (b"IEND", b""))), DataError, ("img.png", "9x9")),
    ("png-jpeg-bytes", lambda t: png_file(t, b"\xff\xd8\xff\xe0" + b"\0" * 40), DataError, ("img.png", "not a png")),
    ("png-str-input", lambda t: decode_png("not bytes", "x.png"), DataError, ("x.png", "str")),
    ("png-missing", lambda t: read_png(t / "none.png"), DataError, ("none.png", "cannot read")),
    ("png-directory", lambda t: read_png(t), DataError, ("cannot read",)),
    # Pathfinder folders
    ("pathfinder-no-metadata", lambda t: read_pf(t, None), DataError, ("metadata", "not found")),
    ("pathfinder-metadata-file", lambda t: (pathfinder_dir(t, None), _file(t / "curv_baseline" / "metadata"),
                                            loaders.read_pathfinder(t / "curv_baseline")), DataError,
     ("metadata", "is a file")),
    ("pathfinder-empty-metadata-folder", lambda t: ((t / "curv_baseline" / "metadata").mkdir(parents=True),
                                                    loaders.read_pathfinder(t / "curv_baseline")), DataError,
     ("metadata", "no metadata")),
    ("pathfinder-short-line", lambda t: read_pf(t, ["imgs/0 sample_0.png 0"]), DataError,
     ("0.npy:1", "label 0/1", "imgs/0 sample_0.png 0")),
    ("pathfinder-label-two", lambda t: read_pf(t, [meta("a.png", 2)], {"a.png": GOOD_PNG}), DataError,
     ("0.npy:1", "label 0/1")),
    ("pathfinder-image-missing", lambda t: read_pf(t, [meta("gone.png")]), DataError, ("0.npy:1", "gone.png")),
    ("pathfinder-image-garbage", lambda t: read_pf(t, [meta("a.png")], {"a.png": b"hello"}), DataError,
     ("a.png", "0.npy:1", "not a png")),
    ("pathfinder-image-truncated", lambda t: read_pf(t, [meta("a.png")], {"a.png": GOOD_PNG[:30]}), DataError,
     ("a.png", "truncated")),
    ("pathfinder-size-mismatch", lambda t: read_pf(t, [meta("a.png"), meta("b.png")],
                                                   {"a.png": GOOD_PNG, "b.png": encode_png(np.zeros((2, 2),
                                                                                                   np.uint8))}),
     DataError, ("b.png", "0.npy:2", "differs")),
    ("pathfinder-only-empty-images", lambda t: read_pf(t, [meta("a.png")], {"a.png": b""}), DataError,
     ("no readable images",)),
    # CIFAR-10 binary
    ("cifar-empty", lambda t: cifar_file(t, b""), DataError, ("data_batch_1.bin", "3073")),
    ("cifar-truncated", lambda t: cifar_file(t, b"\0" * (CIFAR_RECORD + 10)), DataError,
     ("data_batch_1.bin", "record 2", "truncated")),
    ("cifar-label", lambda t: cifar_file(t, bytes([12]) + b"\0" * (CIFAR_RECORD - 1)), DataError,
     ("data_batch_1.bin", "record 1", "label 12")),
    ("cifar-missing-batch", lambda t: loaders.read_cifar10(t), DataError, ("data_batch_1.bin", "not found")),
    ("cifar-directory", lambda t: loaders.read_cifar10_bin(t), DataError, ("folder, not a file",)),
    # IMDb
    ("imdb-no-files", lambda t: loaders.read_imdb(t, "train"), DataError, ("no imdb files", "aclimdb")),
    ("imdb-split", lambda t: loaders.read_imdb(t, "val"), ConfigError, ("split", "val", "train")),
    ("imdb-no-reviews", lambda t: loaders.read_imdb(imdb_dir(t, {"train/pos/1.txt": b"good",
                                                                  "train/neg/README": b"x"}), "train"), DataError,
     ("neg", "no *.txt")),
    ("imdb-missing-neg", lambda t: loaders.read_imdb(imdb_dir(t, {"train/pos/1.txt": b"good"}), "train"),
     DataError, ("neg", "not found")),
    ("imdb-empty-review", lambda t: loaders.read_imdb(imdb_dir(t, {"train/pos/1.txt": b"good",
                                                                    "train/neg/2.txt": b"  \n"}), "train"),
     DataError, ("2.txt", "empty review")),
    ("imdb-max-len", lambda t: loaders.read_imdb(t, "train", max_len=-5), ConfigError, ("max_len", "-5")),
    # AAN
    ("aan-four-fields", lambda t: aan_file(t, b"1\ta\tb\ttext\n"), DataError,
     ("new_aan_pairs.train.tsv:1", "5 tab-separated", "got 4")),
    ("aan-label-word", lambda t: aan_file(t, b"yes\ta\tb\tx\ty\n"), DataError, (".tsv:1", "0 or 1", "yes")),
    ("aan-label-two", lambda t: aan_file(t, b"1.0\ta\tb\tx\ty\n2\ta\tb\tx\ty\n"), DataError,
     (".tsv:2", "0 or 1", "2")),
    ("aan-empty", lambda t: aan_file(t, b"\n\n"), DataError, (".tsv", "no rows")),
    ("aan-missing", lambda t: loaders.read_aan_tsv(t / "x.tsv"), DataError, ("x.tsv", "not found")),
    ("aan-max-len", lambda t: aan_file(t, b"1\ta\tb\tx\ty\n", max_len=0), ConfigError, ("max_len", "0")),
    ("listops-path-none", lambda t: loaders.read_listops_tsv(None), ConfigError, ("path", "none")),
    ("pathfinder-root-int", lambda t: loaders.read_pathfinder(3), ConfigError, ("root", "3")),
    ("cifar-dir-none", lambda t: loaders.read_cifar10(None), ConfigError, ("data_dir", "none")),
    ("listops-tokenize-int", lambda t: loaders.listops_tokenize(5), ConfigError, ("source", "5")),
    ("token-dataset-lengths", lambda t: loaders.TokenDataset([np.zeros(2, np.int16)], [0, 1]), DataError,
     ("1 sequences", "2 labels")),
]


@pytest.mark.parametrize(("case", "fn", "exc", "must"), DATA_CASES, ids=_ids(DATA_CASES))
def test_data_file(case, fn, exc, must, tmp_path):
    _expect(lambda: fn(tmp_path), exc, must)


# ---- the command line, in-process ----------------------------------------------------------------
def _tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Saved model folders (outside the working directory of each case)."""
    root = tmp_path_factory.mktemp("saved")
    efformer.save(lm(), root / "lm")
    efformer.save(clf(), root / "clf")
    bad = root / "bad-json"
    efformer.save(lm(), bad)
    (bad / "config.json").write_text("{not json")
    no_w = root / "no-weights"
    efformer.save(lm(), no_w)
    (no_w / "model.safetensors").unlink()
    trunc = root / "truncated"
    efformer.save(lm(), trunc)
    (trunc / "model.safetensors").write_bytes((trunc / "model.safetensors").read_bytes()[:100])
    store = root / "results.db"
    s = ResultsStore(store)
    s.start_run("alpha", "train", {"x": 1})
    s.finish_run("alpha")
    return root


def w(path: str, text: str | bytes):
    """A setup step: write a file into the working directory and give back its name."""
    def make(cwd: Path) -> str:
        p = cwd / path
        p.write_bytes(text.encode() if isinstance(text, str) else text)
        return path
    return make


# (id, argv with {saved} for the saved folders and callables for files made first, words in the message)
CLI_CASES = [
    # argparse's own usage errors
    ("no-command", [], ("required",)),
    ("unknown-command", ["frobnicate"], ("frobnicate", "invalid choice")),
    ("list-unknown-flag", ["list", "--nope"], ("--nope",)),
    ("describe-no-name", ["describe"], ("name",)),
    ("describe-unknown", ["describe", "sofmax"], ("sofmax", "did you mean 'softmax'")),
    # generate
    ("generate-missing-dir", ["generate", "nosuch"], ("nosuch", "efformer.save")),
    ("generate-classifier-dir", ["generate", "{saved}/clf"], ("clf", "classifier", "task='lm'")),
    ("generate-max-new-negative", ["generate", "{saved}/lm", "--max-new-tokens", "-1"], ("--max-new-tokens", "-1")),
    ("generate-max-new-float", ["generate", "{saved}/lm", "--max-new-tokens", "2.5"], ("--max-new-tokens", "2.5")),
    ("generate-top-p", ["generate", "{saved}/lm", "--top-p", "2", "--temperature", "1"], ("top_p", "2.0")),
    ("generate-top-k", ["generate", "{saved}/lm", "--top-k", "0", "--temperature", "1"], ("top_k", "0")),
    ("generate-temperature", ["generate", "{saved}/lm", "--temperature", "-1"], ("temperature", "-1.0")),
    ("generate-empty-prompt", ["generate", "{saved}/lm", "--prompt", ""], ("--prompt", "''", "at least one")),
    ("generate-bad-json", ["generate", "{saved}/bad-json"], ("config.json", "json")),
    ("generate-no-weights", ["generate", "{saved}/no-weights"], ("model.safetensors", "missing")),
    ("generate-truncated-weights", ["generate", "{saved}/truncated"], ("model.safetensors", "truncated")),
    # train: config files and --set
    ("train-missing-config", ["train", "nosuch.yaml"], ("config", "nosuch.yaml", "not found")),
    ("train-bad-yaml", ["train", w("run.yaml", "model: [unclosed\n")], ("run.yaml", "yaml", "line")),
    ("train-yaml-list", ["train", w("run.yaml", "- a\n- b\n")], ("run.yaml", "mapping", "list")),
    ("train-bad-json", ["train", w("run.json", "{\"model\": }")], ("run.json", "json", "line 1")),
    ("train-binary-config", ["train", w("run.yaml", b"\xff\xfe\x00garbage")], ("run.yaml",)),
    ("train-unknown-section", ["train", w("run.yaml", "modle: {}\n")], ("modle", "unknown key", "model")),
    ("train-unknown-train-key", ["train", w("run.yaml", "train: {stpes: 3}\n")], ("train.stpes", "allowed")),
    ("train-set-unknown-key", ["train", "--set", "foo=1"], ("foo", "unknown key")),
    ("train-set-no-equals", ["train", "--set", "train.steps"], ("--set", "key.path=value")),
    ("train-set-empty-key", ["train", "--set", "=5"], ("--set", "empty part")),
    ("train-set-steps-negative", ["train", "--set", "train.steps=-1"], ("train.steps", "-1", "greater than 0")),
    ("train-set-lr-word", ["train", "--set", "train.lr=fast"], ("train.lr", "fast")),
    ("train-set-betas-scalar", ["train", "--set", "train.betas=5"], ("train.betas", "5", "tuple")),
    ("train-set-into-value", ["train", "--set", "train.steps.x=1"], ("train.steps", "x")),
    ("train-set-section-scalar", ["train", "--set", "model=5"], ("model", "5", "dictionary")),
    ("train-set-mixer", ["train", "--set", "model.mixer=sofmax"], ("model.mixer", "sofmax", "softmax")),
    ("train-set-preset", ["train", "--set", "model.preset=huge"], ("model.preset", "huge", "lm-tiny")),
    ("train-set-d-model", ["train", "--set", "model.d_model=63"], ("d_model", "63")),
    ("train-set-model-key", ["train", "--set", "model.layers=3"], ("model.layers", "unknown key")),
    ("train-set-data-name", ["train", "--set", "data.name=imagenet"], ("data.name", "imagenet", "text")),
    ("train-set-data-option", ["train", "--set", "data.options.seqlen=5"], ("data.options.seqlen", "allowed")),
    ("train-set-data-path", ["train", "--set", "data.options.path=nosuch.txt"], ("data.options.path", "nosuch.txt")),
    ("train-set-device", ["train", "--set", "train.device=gpu", "--set", "train.steps=1"],
     ("train.device", "gpu", "cpu")),
    ("train-set-warmup", ["train", "--set", "train.warmup_steps=50", "--set", "train.steps=10"],
     ("warmup_steps", "50", "steps=10")),
    ("train-set-schedule", ["train", "--set", "train.schedule=exp"], ("train.schedule", "exp", "cosine")),
    ("train-batch-too-big", ["train", "--set", "train.batch_size=100000", "--set", "train.steps=1"],
     ("train.batch_size", "100000")),
    ("train-seq-len-too-long", ["train", "--set", "data.options.seq_len=100000", "--set", "train.steps=1"],
     ("seq_len", "100000")),
    ("train-kv-heads-zero", ["train", "--set", "model.mixer_options.n_kv_heads=0", "--set", "train.steps=1"],
     ("n_kv_heads", "0")),
    ("train-resume-missing", ["train", "--resume", "nosuch", "--set", "train.steps=1"], ("nosuch", "checkpoint")),
    ("train-out-is-file", ["train", "--out", w("taken", "x"), "--set", "train.steps=1"], ("out_dir", "taken")),
    ("train-results-is-folder", ["train", "--results", ".", "--set", "train.steps=1"], ("results", "folder")),
    # eval, runs, report
    ("eval-missing", ["eval", "nosuch"], ("nosuch", "checkpoint")),
    ("eval-model-without-config", ["eval", "{saved}/lm"], ("data", "--config")),
    ("runs-no-store", ["runs", "list"], ("--results", "runs/results.db", "no results file")),
    ("runs-bad-action", ["runs", "delete"], ("delete", "invalid choice")),
    ("runs-show-no-id", ["runs", "show", "--results", "{saved}/results.db"], ("runs show", "exactly one")),
    ("runs-show-unknown", ["runs", "show", "gamma", "--results", "{saved}/results.db"], ("gamma",)),
    ("runs-compare-one", ["runs", "compare", "alpha", "--results", "{saved}/results.db"], ("two or more",)),
    ("runs-store-not-db", ["runs", "list", "--results", w("junk.db", "not a database" * 100)],
     ("junk.db", "not a usable results database")),
    ("report-no-store", ["report"], ("--results", "no results file")),
    ("report-unknown-run", ["report", "--runs", "gamma", "--results", "{saved}/results.db"], ("gamma",)),
    ("report-out-is-file", ["report", "--out", w("rep", "x"), "--results", "{saved}/results.db"],
     ("--out", "rep", "is a file")),
    # data
    ("data-no-subcommand", ["data"], ("data_command",)),
    ("listops-n-zero", ["data", "listops", "--out", "o", "--n", "0"], ("--n", "0", ">= 1")),
    ("listops-n-negative", ["data", "listops", "--out", "o", "--n", "-3"], ("--n", "-3")),
    ("listops-n-eval-zero", ["data", "listops", "--out", "o", "--n", "10", "--n-eval", "0"], ("--n-eval", "0")),
    ("listops-workers-zero", ["data", "listops", "--out", "o", "--n", "10", "--workers", "0"], ("--workers", "0")),
    ("listops-depth-zero", ["data", "listops", "--out", "o", "--depth", "0"], ("--depth", "0")),
    ("listops-max-args-one", ["data", "listops", "--out", "o", "--max-args", "1"], ("max_args", "1")),
    ("listops-bounds", ["data", "listops", "--out", "o", "--min-len", "100", "--max-len", "50"],
     ("min_len", "(100, 50)")),
    ("listops-seed-negative", ["data", "listops", "--out", "o", "--seed", "-1"], ("--seed", "-1")),
    ("listops-n-word", ["data", "listops", "--out", "o", "--n", "many"], ("--n", "many")),
    ("listops-no-out", ["data", "listops"], ("--out",)),
    ("listops-out-is-file", ["data", "listops", "--out", w("o", "x"), "--n", "10"], ("--out", "is a file")),
    ("pathfinder-n-zero", ["data", "pathfinder", "--out", "o", "--n", "0"], ("--n", "0")),
    ("pathfinder-batch-zero", ["data", "pathfinder", "--out", "o", "--batch-size", "0"], ("--batch-size", "0")),
    ("pathfinder-workers-negative", ["data", "pathfinder", "--out", "o", "--workers", "-1"], ("--workers", "-1")),
    ("pathfinder-seed-negative", ["data", "pathfinder", "--out", "o", "--seed", "-2"], ("--seed", "-2")),
    ("pathfinder-resolution", ["data", "pathfinder", "--out", "o", "--resolution", "48"], ("--resolution", "48")),
    ("pathfinder-difficulty", ["data", "pathfinder", "--out", "o", "--difficulty", "extreme"],
     ("--difficulty", "extreme")),
    ("pathfinder-out-is-file", ["data", "pathfinder", "--out", w("o", "x"), "--n", "1"], ("--out", "is a file")),
    # arena
    ("arena-steps-negative", ["arena", "--steps", "-5", "--mixers", "softmax", "--tasks", "listops"],
     ("--steps", "-5", ">= 1")),
    ("arena-steps-zero", ["arena", "--steps", "0"], ("--steps", "0")),
    ("arena-unknown-mixer", ["arena", "--mixers", "sofmax"], ("sofmax", "softmax")),
    ("arena-unknown-task", ["arena", "--tasks", "listopz"], ("listopz", "listops")),
    ("arena-seed-negative", ["arena", "--seeds", "-1"], ("--seeds", "-1")),
    ("arena-preset", ["arena", "--preset", "huge"], ("--preset", "huge")),
    ("arena-leaderboard-no-store", ["arena", "--leaderboard-only"], ("--store", "no results file")),
    ("arena-data-dir-file", ["arena", "--data-dir", w("lra", "x")], ("--data-dir", "lra", "is a file")),
    ("arena-store-not-db", ["arena", "--leaderboard-only", "--store", w("r.db", "garbage" * 300)],
     ("r.db", "not a usable results database")),
    ("arena-out-is-file", ["arena", "--out", w("board", "x")], ("--out", "board", "is a file")),
    # bench
    ("bench-device-gpu", ["bench", "--device", "gpu"], ("--device", "gpu", "cuda")),
    ("bench-device-cuda", ["bench", "--device", "cuda"], ("--device", "cuda", "--device cpu")),
    ("bench-device-index", ["bench", "--device", "cuda:x"], ("--device", "cuda:x")),
    ("bench-device-mps", ["bench", "--device", "mps"], ("--device", "mps")),
    ("bench-repeat-zero", ["bench", "--repeat", "0"], ("--repeat", "0", ">= 1")),
    ("bench-repeat-word", ["bench", "--repeat", "x"], ("--repeat", "'x'")),
    ("bench-length-negative", ["bench", "--lengths", "-5"], ("--lengths", "-5")),
    ("bench-length-zero", ["bench", "--lengths", "256", "0"], ("--lengths", "0")),
    ("bench-batch-zero", ["bench", "--batch", "0"], ("--batch", "0")),
    ("bench-d-model-zero", ["bench", "--d-model", "0"], ("--d-model", "0")),
    ("bench-heads-zero", ["bench", "--heads", "0"], ("--heads", "0")),
    ("bench-heads-not-dividing", ["bench", "--heads", "3"], ("--heads", "3", "--d-model=256")),
    ("bench-timeout-zero", ["bench", "--timeout", "0"], ("--timeout", "0")),
    ("bench-mem-cap-negative", ["bench", "--mem-cap-gb", "-1"], ("--mem-cap-gb", "-1")),
    ("bench-unknown-mixer", ["bench", "--mixers", "sofmax"], ("sofmax", "softmax")),
    ("bench-mode", ["bench", "--modes", "train"], ("--modes", "train")),
    ("bench-dtype", ["bench", "--dtype", "int8"], ("--dtype", "int8")),
    ("bench-report-only-no-store", ["bench", "--report-only"], ("--store", "no results file")),
    ("bench-store-folder", ["bench", "--report-only", "--store", "."], ("--store", "no results file")),
    ("bench-report-is-file", ["bench", "--report", w("rep", "x")], ("--report", "rep", "is a file")),
    # advise
    ("advise-memory-dot", ["advise", "--seq-len", "100", "--memory", ".GB"], ("--memory", ".gb", "8gb")),
    ("advise-memory-word", ["advise", "--seq-len", "100", "--memory", "lots"], ("--memory", "lots")),
    ("advise-memory-dots", ["advise", "--seq-len", "100", "--memory", "1.2.3GB"], ("--memory", "1.2.3gb")),
    ("advise-memory-zero", ["advise", "--seq-len", "100", "--memory", "0GB"], ("--memory", "0gb", "above zero")),
    ("advise-memory-negative", ["advise", "--seq-len", "100", "--memory=-1GB"], ("--memory", "-1gb")),
    ("advise-seq-len-negative", ["advise", "--seq-len", "-100"], ("--seq-len", "-100", ">= 1")),
    ("advise-seq-len-zero", ["advise", "--seq-len", "0"], ("--seq-len", "0")),
    ("advise-seq-len-word", ["advise", "--seq-len", "long"], ("--seq-len", "long")),
    ("advise-no-seq-len", ["advise"], ("--seq-len",)),
    ("advise-no-store", ["advise", "--seq-len", "100"], ("--store", "efformer bench")),
]


@pytest.mark.parametrize(("case", "argv", "must"), CLI_CASES, ids=_ids(CLI_CASES))
def test_cli(case, argv, must, tmp_path, monkeypatch, capsys, saved):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("EFFORMER_RESULTS", raising=False)
    argv = [a(tmp_path) if callable(a) else a.replace("{saved}", str(saved)) for a in argv]
    before = _tree(tmp_path)
    code = main(argv)
    out, err = capsys.readouterr()
    assert code == 2, f"exit code {code}; stdout {out[-300:]!r} stderr {err[-300:]!r}"
    assert "Traceback" not in err and "Traceback" not in out
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "error:" in lines[0], f"not one paragraph: {err!r}"
    missing = [m for m in must if m.lower() not in err.lower()]
    assert not missing, f"stderr {err!r} lacks {missing}"
    assert _tree(tmp_path) == before, f"left behind: {sorted(_tree(tmp_path) - before)}"


def test_unexpected_exception_is_one_paragraph_and_debug_shows_traceback(monkeypatch, capsys):
    import efformer.cli as cli

    def boom(args):
        raise RuntimeError("deep\ninside")

    monkeypatch.setattr(cli, "_cmd_list", boom)
    assert main(["list"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1 and "--debug" in err
    with pytest.raises(RuntimeError):
        main(["--debug", "list"])


def test_multiline_error_is_folded_into_one_paragraph(monkeypatch, capsys):
    import efformer.cli as cli

    def bad(args):
        raise DataError("first line\n\n  second line")

    monkeypatch.setattr(cli, "_cmd_list", bad)
    assert main(["list"]) == 2
    assert capsys.readouterr().err == "efformer: error: first line second line\n"


def test_broken_pipe_in_process_is_quiet(monkeypatch, capsys):
    import efformer.cli as cli

    def write(args):
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(cli, "_cmd_list", write)
    assert main(["list"]) == 141
    assert capsys.readouterr().err == ""


# ---- a few real processes: exit code, stderr and the interpreter's own last words ----------------
def _run(args: list[str], cwd: Path, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    env.pop("EFFORMER_RESULTS", None)
    return subprocess.run([sys.executable, "-m", "efformer.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=120, **kw)


def test_subprocess_exit_2_one_paragraph(tmp_path):
    r = _run(["bench", "--device", "gpu"], tmp_path)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert r.stderr.startswith("efformer: error: --device='gpu'") and r.stdout == "" and _tree(tmp_path) == set()


def test_subprocess_debug_shows_traceback(tmp_path):
    r = _run(["--debug", "describe", "sofmax"], tmp_path)
    assert r.returncode == 2 and "Traceback" in r.stderr and r.stderr.rstrip().endswith(
        "known: " + ", ".join(MIXERS.names()) + ")")


def test_subprocess_broken_pipe_is_quiet(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    p = subprocess.Popen([sys.executable, "-m", "efformer.cli", "list"], cwd=tmp_path, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    p.stdout.close()  # the reader is gone before the writer writes, like `efformer list | head -0`
    err = p.stderr.read().decode()
    p.wait(timeout=120)
    assert p.returncode in (0, 141) and err == "", err
