"""Serving: a continuous-batching engine over any mixer's decode state, a paged KV cache,
speculative decoding, and an OpenAI-compatible HTTP server (``efformer serve``)."""

from efformer.serve.engine import Engine, QueueFullError, Request, RequestError, SamplingParams

__all__ = ["Engine", "QueueFullError", "Request", "RequestError", "SamplingParams"]
