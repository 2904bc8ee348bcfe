"""The backbone computes the positional context once per forward and passes it to every layer."""

from __future__ import annotations

import pytest
import torch

import efformer
from efformer.nn.positional import Alibi, Rope


@pytest.mark.parametrize("positional,cls,method", [("rope", Rope, "rotation"), ("xpos", Rope, "rotation"),
                                                   ("alibi", Alibi, "forward")])
def test_positional_tables_are_computed_once_per_forward(positional, cls, method, monkeypatch):
    model = efformer.create_model("lm-tiny", n_layers=4, positional=positional).eval()
    scheme = type(model.backbone.pos)
    calls = []
    original = getattr(scheme, method)

    def counting(self, *args, **kw):
        calls.append(1)
        return original(self, *args, **kw)

    monkeypatch.setattr(scheme, method, counting)
    ids = torch.randint(0, 256, (2, 9))
    model(ids)
    assert len(calls) == 1  # not once per layer, not once for q and once for k


def test_rotation_tables_are_in_the_models_dtype():
    model = efformer.create_model("lm-tiny", positional="rope").double()
    positions = torch.arange(5)[None]
    rot = model.backbone.pos.rotation(positions, torch.float64)
    assert rot.q_cos.dtype == torch.float64
    ids = torch.randint(0, 256, (1, 5))
    assert model(ids).dtype == torch.float64


def test_an_empty_row_or_a_non_tensor_input_is_refused():
    model = efformer.create_model("lm-tiny")
    ids = torch.randint(0, 256, (2, 5))
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1] = False
    with pytest.raises(efformer.ShapeError, match="mask row 1 is all False"):
        model(ids, mask=mask)
    for call in (model, model.backbone.embed_tokens):  # one check, one wording, at every entry
        with pytest.raises(efformer.ShapeError, match="input_ids must be a torch.Tensor, got list"):
            call([[1, 2, 3]])
