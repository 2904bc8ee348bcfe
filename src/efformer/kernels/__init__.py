"""Triton kernels, each with a pure-torch fallback; tested on CPU with TRITON_INTERPRET=1."""

from efformer.kernels.chunk_gla import (
    TRITON_MAX_DIM,
    chunk_gla,
    chunk_gla_torch,
    gla_parallel,
    gla_recurrent,
    triton_runs,
)

__all__ = ["TRITON_MAX_DIM", "chunk_gla", "chunk_gla_torch", "gla_parallel", "gla_recurrent", "triton_runs"]
