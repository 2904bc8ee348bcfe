"""The built-in demo: train a tiny causal LM on bundled text for a short run, then generate."""

from __future__ import annotations

import time
from importlib import resources

import torch
from tqdm import tqdm

from efformer.models import create_model


def bundled_text() -> bytes:
    """The small English corpus shipped with the package (bytes)."""
    return resources.files("efformer.assets").joinpath("tiny_corpus.txt").read_bytes()


def run_lm_demo(mixer: str = "softmax", steps: int = 300, seq_len: int = 64, batch: int = 16, seed: int = 0) -> dict:
    """Train a byte-level LM on the bundled text; returns first/last loss and a sample."""
    torch.manual_seed(seed)
    data = torch.tensor(list(bundled_text()), dtype=torch.long)
    model = create_model("lm-tiny", mixer=mixer, max_len=seq_len * 2)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    losses, t0 = [], time.perf_counter()
    bar = tqdm(range(steps), desc=f"demo lm ({mixer})", mininterval=1.0)
    for _ in bar:
        idx = torch.randint(0, len(data) - seq_len - 1, (batch,))
        seq = torch.stack([data[i : i + seq_len + 1] for i in idx])
        logits = model(seq[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), seq[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.3f}")
    prompt = list(b"The long range arena ")
    out = model.generate([prompt], max_new_tokens=80, temperature=0.0)[0]
    return {
        "first_loss": losses[0],
        "last_loss": sum(losses[-20:]) / 20,
        "seconds": time.perf_counter() - t0,
        "sample": bytes(out).decode("utf-8", errors="replace"),
    }
