"""Vision Mamba: with its backward branch silenced it is Mamba with the same weights; reversing the
tokens and swapping the two branches reverses the output."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import make_mixer, rel_err, with_form


def _copy(dst, src):
    for name in ("conv1d", "x_proj", "dt_proj"):
        getattr(dst, name).load_state_dict(getattr(src, name).state_dict())
    with torch.no_grad():
        dst.A_log.copy_(src.A_log)
        dst.D.copy_(src.D)


@pytest.mark.parametrize("form", ["reference", "chunked"])
def test_forward_branch_alone_is_mamba(form):
    vim = with_form(make_mixer("vim", False), form)
    mamba = with_form(make_mixer("mamba", True), form)
    mamba.in_proj.load_state_dict(vim.in_proj.state_dict())
    mamba.out_proj.load_state_dict(vim.out_proj.state_dict())
    _copy(mamba, vim.forward_scan)
    with torch.no_grad():  # B = C = 0 and D = 0: the backward branch adds nothing
        vim.backward_scan.x_proj.weight.zero_()
        vim.backward_scan.D.zero_()
    x = torch.randn(2, 11, vim.d_model)
    assert rel_err(mamba(x)[0], vim(x)[0]) < 1e-5


def test_reversing_tokens_and_swapping_branches_reverses_the_output():
    vim, swapped = make_mixer("vim", False), make_mixer("vim", False)
    swapped.load_state_dict(vim.state_dict())
    _copy(swapped.forward_scan, vim.backward_scan)
    _copy(swapped.backward_scan, vim.forward_scan)
    x = torch.randn(2, 9, vim.d_model)
    assert rel_err(vim(x)[0].flip(1), swapped(x.flip(1))[0]) < 1e-5
    assert rel_err(vim(x)[0].flip(1), vim(x.flip(1))[0]) > 1e-3  # the two directions differ
