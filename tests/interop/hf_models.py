"""Tiny random Hugging Face models (the oracles of the interop tests), saved with ``save_pretrained``."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

VOCAB = 61  # prime, so no shape coincides with another by accident
_DEC = dict(hidden_size=32, intermediate_size=56, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=VOCAB, bos_token_id=None, eos_token_id=None, pad_token_id=0)
_ENC = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=40, vocab_size=VOCAB,
            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def _noisy(model):
    """Biases and norm weights are zeros/ones at init; randomise every tensor so each mapping is exercised."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.1 + (1.0 if p.dim() == 1 and bool((p == 1).all()) else 0.0))
    return model.eval()


def llama(**kw):
    """A LlamaForCausalLM (kw: config overrides, e.g. rope_parameters)."""
    torch.manual_seed(0)
    return _noisy(transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**_DEC, **kw})))


def mistral(**kw):
    """A MistralForCausalLM with a short sliding window."""
    torch.manual_seed(0)
    return _noisy(transformers.MistralForCausalLM(transformers.MistralConfig(**{**_DEC, "sliding_window": 5, **kw})))


def qwen2(**kw):
    """A Qwen2ForCausalLM (q/k/v biases)."""
    torch.manual_seed(0)
    return _noisy(transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**{**_DEC, **kw})))


def mixtral(**kw):
    """A MixtralForCausalLM: 4 experts, top-2, each expert 24 wide (kw: e.g. num_local_experts, sliding_window)."""
    torch.manual_seed(0)
    cfg = {**_DEC, "intermediate_size": 24, "num_local_experts": 4, "num_experts_per_tok": 2, **kw}
    return _noisy(transformers.MixtralForCausalLM(transformers.MixtralConfig(**cfg)))


def gpt2(**kw):
    """A GPT2LMHeadModel."""
    torch.manual_seed(0)
    cfg = dict(n_embd=32, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=64, bos_token_id=None, eos_token_id=None,
               pad_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return _noisy(transformers.GPT2LMHeadModel(transformers.GPT2Config(**{**cfg, **kw})))


def bert(head: str = "mlm", **kw):
    """A BertForMaskedLM (head 'mlm') or BertForSequenceClassification ('cls', 3 labels)."""
    torch.manual_seed(0)
    cls = transformers.BertForMaskedLM if head == "mlm" else transformers.BertForSequenceClassification
    return _noisy(cls(transformers.BertConfig(**{**_ENC, "num_labels": 3, **kw})))


def roberta(head: str = "mlm", **kw):
    """A RobertaForMaskedLM or RobertaForSequenceClassification (positions offset by padding_idx + 1)."""
    torch.manual_seed(0)
    cls = transformers.RobertaForMaskedLM if head == "mlm" else transformers.RobertaForSequenceClassification
    cfg = {**_ENC, "num_labels": 3, "pad_token_id": 1, "max_position_embeddings": 40, **kw}
    return _noisy(cls(transformers.RobertaConfig(**cfg)))


def save(model, folder, **kw):
    """``model.save_pretrained(folder)`` (kw: e.g. max_shard_size), returning the folder."""
    model.save_pretrained(folder, **kw)
    return folder
