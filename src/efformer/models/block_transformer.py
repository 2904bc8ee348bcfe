"""Block Transformer: global block-level attention below, local token decoding above.

From "Block Transformer: Global-to-Local Language Modeling for Fast Inference" (Ho et al., 2024).
Tokens are grouped into blocks of ``block_len`` (L). An embedder turns each block's L token
embeddings into one block embedding (concatenation, then a linear map L d -> d; the paper's lookup
embedder concatenates d/L-wide embeddings, here the table is shared with the token decoder, hence the
map). The *block decoder* (lower layers; any efformer mixer) runs causally over the block
sequence [BOS, E_0, E_1, ...], so its output at index i, the context embedding of block i, has seen
blocks 0..i-1 only. The *token decoder* (upper layers) runs independently per block on the local
sequence [prefix(ctx_i), x_{iL}, ..., x_{iL+L-2}] (one prefix vector, a linear map of the context
embedding; the paper also tries several) and predicts x_{iL}, ..., x_{iL+L-1}; it never
attends beyond its block, so its KV cache stays at most L entries, and the block decoder runs once
per L generated tokens: that is where the decode speed comes from.

With ``block_len=1`` every block is one token: the block decoder is a causal LM over
W_e e(x) shifted right behind a learned BOS vector, and the token decoder sees a single position, so
it is a position-wise map (attention over one key returns that key's value); with no token layers
it is exactly ``head(W_p g(BOS, W_e e(x_0), ..., W_e e(x_t)))``, g the block decoder with its final
norm: with W_e = W_p = I and BOS a token's embedding, a plain CausalLM run on [BOS, x] (tested).
Logits follow :class:`CausalLM`: position t predicts token t + 1.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from efformer.errors import ConfigError, ShapeError
from efformer.models.backbone import Backbone
from efformer.models.config import ModelConfig, build_config
from efformer.models.lm import sample_next


class BlockTransformerLM(nn.Module):
    """Block Transformer LM over ``cfg`` (``cfg.block_len`` tokens per block): its first ``cfg.n_layers -
    cfg.block_token_layers`` layers are the block decoder, the rest the token decoder; ids (b, n) -> logits
    (b, n, vocab). ``create_model(..., block_len=L)`` builds one; ``save``/``load`` keep it."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.block_len is None:
            raise ConfigError("block_len", None, "tokens per block, an integer >= 1 (the config of a plain LM "
                              "builds a CausalLM)")
        block_len, token_layers = cfg.block_len, cfg.block_token_layers
        self.cfg, self.block_len, self.token_layers = cfg, block_len, token_layers
        split = cfg.n_layers - token_layers
        self.blocks = Backbone(_layers(cfg, 0, split, cfg.max_len // block_len + 1))
        self.blocks.embed = None  # the block decoder is fed block embeddings, never token ids
        # the token decoder owns the token table (also the tied output head); no layers: its final norm only
        self.tokens = Backbone(_layers(cfg, split, cfg.n_layers, block_len)) if token_layers else None
        if not token_layers:  # else the token table is self.tokens.embed, registered once (see ``embed``)
            self.own_embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
            nn.init.normal_(self.own_embed.weight, std=0.02)
        d = cfg.d_model
        self.bos = nn.Parameter(torch.randn(d) * 0.02)  # block-decoder input before block 0
        self.embedder = nn.Linear(block_len * d, d)  # L token embeddings -> one block embedding
        self.prefix = nn.Linear(d, d)  # context embedding -> the token decoder's first input

    @property
    def embed(self) -> nn.Embedding:
        """The token table (vocab, d): the token decoder's, or the model's own without token layers."""
        return self.tokens.embed if self.tokens is not None else self.own_embed

    # ---- parts shared by the full forward and decoding ------------------------------------------
    def _block_embeddings(self, ids: Tensor) -> Tensor:
        """Complete blocks of ids (b, k L) -> block embeddings (b, k, d)."""
        b = ids.shape[0]
        return self.embedder(self.embed(ids).reshape(b, -1, self.block_len * self.cfg.d_model))

    def _local(self, h: Tensor, cache=None) -> Tensor:
        """The token decoder over local sequences h (rows, m, d) -> final hidden states (rows, m, d); with no
        token layers the identity (the block decoder's final norm came before the prefix map)."""
        return self.tokens(h, cache=cache) if self.tokens is not None else h

    def _head(self, h: Tensor) -> Tensor:
        return h @ self.embed.weight.t()

    def _check_ids(self, ids: Tensor) -> None:
        if not isinstance(ids, Tensor) or ids.dim() != 2 or ids.dtype not in (torch.int32, torch.int64) \
                or ids.shape[1] == 0:
            got = f"{ids.dtype} {tuple(ids.shape)}" if isinstance(ids, Tensor) else type(ids).__name__
            raise ShapeError(f"input_ids must be an integer tensor (batch, seq>0), got {got}")
        if int(ids.min()) < 0 or int(ids.max()) >= self.cfg.vocab_size:
            raise ShapeError(f"token ids must lie in [0, {self.cfg.vocab_size})")
        if ids.shape[1] > self.cfg.max_len:
            raise ShapeError(f"{ids.shape[1]} tokens exceed max_len={self.cfg.max_len}")

    def forward(self, input_ids: Tensor) -> Tensor:
        """Next-token logits (b, n, vocab): position t predicts token t + 1 (causal)."""
        self._check_ids(input_ids)
        b, n = input_ids.shape
        L, d = self.block_len, self.cfg.d_model
        k = n // L  # complete blocks: their embeddings feed the block decoder
        nb = k + 1  # blocks whose tokens are predicted: positions 1..n fall in blocks 0..k
        inp = torch.cat([self.bos.expand(b, 1, d), self._block_embeddings(input_ids[:, : k * L])], 1)
        ctx = self.blocks(inp)  # (b, nb, d): ctx_i has seen blocks < i
        e = self.embed(input_ids)
        e = torch.cat([e, e.new_zeros(b, nb * L - n, d)], 1).view(b, nb, L, d)  # zeros only after real tokens
        local = torch.cat([self.prefix(ctx)[:, :, None], e[:, :, : L - 1]], 2)  # (b, nb, L, d)
        h = self._local(local.flatten(0, 1)).view(b, nb * L, d)
        return self._head(h[:, 1 : n + 1])  # local index j of block i predicts token iL + j

    # ---- decoding ----------------------------------------------------------------------------------
    @torch.no_grad()
    def decode_logits(self, input_ids: Tensor, prompt_len: int) -> Tensor:
        """Prefill ``prompt_len`` tokens, then feed the rest one at a time through the decode path:
        the logits (b, n - prompt_len + 1, vocab) of every step (== forward's from position prompt_len - 1)."""
        self._check_ids(input_ids)
        if isinstance(prompt_len, bool) or not isinstance(prompt_len, int) or not 1 <= prompt_len <= input_ids.shape[1]:
            raise ConfigError("prompt_len", prompt_len, f"an integer in [1, {input_ids.shape[1]}]")
        state, logits = self._prefill(input_ids[:, :prompt_len])
        out = [logits]
        for t in range(prompt_len, input_ids.shape[1]):
            out.append(self._step(state, input_ids[:, t]))
        return torch.stack(out, 1)

    @torch.no_grad()
    def generate(self, prompt_ids: Tensor, max_new_tokens: int = 32, *, temperature: float = 0.0,
                 top_k: int | None = None, top_p: float | None = None,
                 generator: torch.Generator | None = None) -> Tensor:
        """Prompt (b, n) + ``max_new_tokens`` sampled tokens (b, n + max_new_tokens); temperature 0 is greedy."""
        self._check_ids(prompt_ids)
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ConfigError("max_new_tokens", max_new_tokens, "an integer >= 0")
        if prompt_ids.shape[1] + max_new_tokens > self.cfg.max_len:
            raise ConfigError("max_new_tokens", max_new_tokens, f"at most max_len - prompt = "
                              f"{self.cfg.max_len - prompt_ids.shape[1]}")
        was_training = self.training
        self.eval()
        state, logits = self._prefill(prompt_ids)
        new = []
        for t in range(max_new_tokens):
            tok = sample_next(logits, temperature, top_k, top_p, generator)
            new.append(tok)
            if t < max_new_tokens - 1:
                logits = self._step(state, tok)
        self.train(was_training)
        return torch.cat([prompt_ids, torch.stack(new, 1)], 1) if new else prompt_ids

    def _prefill(self, ids: Tensor) -> tuple[dict, Tensor]:
        """Caches after the prompt ids (b, n) and the logits (b, vocab) predicting token n."""
        b, n = ids.shape
        k = n // self.block_len
        state = {"blocks": self.blocks.new_cache(b), "pending": [ids[:, j] for j in range(k * self.block_len, n)]}
        inp = torch.cat([self.bos.expand(b, 1, -1), self._block_embeddings(ids[:, : k * self.block_len])], 1)
        ctx = self.blocks(inp, cache=state["blocks"])[:, -1:]
        return state, self._start_block(state, ctx, ids[:, k * self.block_len :])

    def _start_block(self, state: dict, ctx: Tensor, ids: Tensor) -> Tensor:
        """A fresh token-decoder cache for a block with context ctx (b, 1, d) and its first ids (b, r)."""
        state["tokens"] = self.tokens.new_cache(ctx.shape[0]) if self.tokens is not None else None
        h = torch.cat([self.prefix(ctx), self.embed(ids)], 1)
        if self.tokens is None:  # no token layers: position-wise, only the last input matters
            h = h[:, -1:]
        return self._head(self._local(h, state["tokens"])[:, -1])

    def _step(self, state: dict, tok: Tensor) -> Tensor:
        """Feed token ids (b,) at the next position; logits (b, vocab) for the one after."""
        state["pending"].append(tok)
        if len(state["pending"]) == self.block_len:  # block complete: one block-decoder step, then a new block
            block = torch.stack(state["pending"], 1)
            state["pending"] = []
            ctx = self.blocks(self._block_embeddings(block), cache=state["blocks"])
            return self._start_block(state, ctx, block[:, :0])
        h = self.embed(tok)[:, None]
        return self._head(self._local(h, state["tokens"])[:, -1])


def _layers(cfg: ModelConfig, lo: int, hi: int, max_len: int) -> ModelConfig:
    """The config of layers lo..hi-1 of ``cfg`` as a stack of its own, with ``max_len`` positions."""
    data = cfg.model_dump()
    data.update(n_layers=hi - lo, max_len=max_len, block_len=None)  # each stack is a plain backbone
    if isinstance(cfg.mixer, list):
        data["mixer"] = cfg.mixer[lo:hi]
        if isinstance(cfg.mixer_options, list):
            data["mixer_options"] = cfg.mixer_options[lo:hi]
    return build_config(data)
