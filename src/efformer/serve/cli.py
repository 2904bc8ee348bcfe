"""``efformer serve MODEL_DIR --port P``: the OpenAI-compatible server over a saved language model."""

from __future__ import annotations

from pathlib import Path

from efformer.errors import CapabilityError, ConfigError
from efformer.models import CausalLM, load
from efformer.models.kv_policy import KVPolicy
from efformer.options import validate_options
from efformer.serve.engine import Engine

try:  # fastapi and uvicorn come with the serve extra; the rest of the command line works without them
    import uvicorn

    from efformer.serve.server import build_app
except ImportError:  # pragma: no cover - exercised only without the extra
    uvicorn = build_app = None


def register(sub) -> None:
    """Add the ``serve`` subcommand."""
    s = sub.add_parser("serve", help="serve a saved LM over an OpenAI-compatible HTTP API (/v1/completions)")
    s.add_argument("model", help="folder written by efformer.save(model, DIR)")
    s.add_argument("--host", default="127.0.0.1", help="interface to listen on (default: local only)")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--name", default=None, help="model id in /v1/models (default: the folder name)")
    s.add_argument("--max-batch", type=int, default=8, help="rows of the running decode batch")
    s.add_argument("--max-queue", type=int, default=64, help="waiting requests before 503 (back-pressure)")
    s.add_argument("--block-size", type=int, default=16, help="tokens per paged KV block")
    s.add_argument("--num-blocks", type=int, default=None, help="KV blocks in the pool (default: max-batch full rows)")
    s.add_argument("--prefill-chunk", type=int, default=128, help="prompt tokens per engine step")
    s.add_argument("--kv-window", type=int, default=None,
                   help="streaming KV: softmax layers keep only the last N tokens plus --kv-sinks (bounded memory)")
    s.add_argument("--kv-sinks", type=int, default=4,
                   help="streaming KV: first tokens never evicted (with --kv-window)")
    s.add_argument("--kv-int8", action="store_true", help="store softmax layers' KV pages as int8 (per-token scales)")
    s.add_argument("--drain", type=float, default=10.0, help="seconds in-flight requests may finish on shutdown")
    s.set_defaults(fn=_cmd_serve)


def _cmd_serve(args) -> int:
    if not 0 <= args.port <= 65535:
        raise ConfigError("--port", args.port, "a TCP port in 0..65535")
    if args.drain < 0:
        raise ConfigError("--drain", args.drain, "seconds >= 0")
    if not Path(args.model).is_dir():
        raise ConfigError("model", args.model, "a folder written by efformer.save(model, DIR)")
    if build_app is None:
        raise ConfigError("serve", "fastapi/uvicorn missing", "install the serve extra: pip install 'efformer[serve]'")
    policy = None
    if args.kv_window is not None or args.kv_int8:
        policy = validate_options(KVPolicy, {"window": args.kv_window, "sinks": args.kv_sinks, "int8": args.kv_int8},
                                  "--kv")
    model = load(args.model)
    if not isinstance(model, CausalLM):
        raise CapabilityError(f"{args.model} holds a {model.cfg.task!r} model; only a language model can be served")
    engine = Engine(model, max_batch=args.max_batch, max_queue=args.max_queue, block_size=args.block_size,
                    num_blocks=args.num_blocks, prefill_chunk=args.prefill_chunk, kv_policy=policy)
    app = build_app(engine, args.name or Path(args.model).resolve().name, drain_s=args.drain)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info", timeout_graceful_shutdown=int(args.drain) + 5)
    return 0
