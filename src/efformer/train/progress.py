"""Training progress: a live tqdm bar (step, loss, lr, tokens/s, ETA) on a terminal, plain log lines
otherwise (CI logs, pipes), and nothing on ranks other than 0."""

from __future__ import annotations

import sys
import time
from typing import TextIO

from tqdm import tqdm


def _eta(seconds: float) -> str:
    s = int(max(seconds, 0))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


class Progress:
    """Reports step, loss, lr, tokens/s and ETA; ``tty=None`` decides by ``stream.isatty()``."""

    def __init__(self, total: int, start: int = 0, *, enabled: bool = True, log_every: int = 10,
                 stream: TextIO | None = None, tty: bool | None = None):
        self.total, self.start, self.step = total, start, start
        self.enabled, self.log_every = enabled, log_every
        self.stream = stream or sys.stdout
        self.tty = self.stream.isatty() if tty is None else tty
        self.t0 = time.perf_counter()
        self.tokens = 0
        self.bar = None
        if enabled and self.tty:
            self.bar = tqdm(total=total, initial=start, file=self.stream, dynamic_ncols=True, desc="train")

    def tokens_per_s(self) -> float:
        """Tokens per second since this progress object started."""
        return self.tokens / max(time.perf_counter() - self.t0, 1e-9)

    def update(self, step: int, loss: float, lr: float, tokens: int) -> None:
        """Record that optimizer step ``step`` (1-based count of steps done) finished."""
        self.tokens += tokens
        done, self.step = step - self.step, step
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(done)
            self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{self.tokens_per_s():.0f}", refresh=False)
        elif step % self.log_every == 0 or step == self.total:
            elapsed = time.perf_counter() - self.t0
            eta = elapsed / max(step - self.start, 1) * (self.total - step)
            print(f"step {step}/{self.total} loss {loss:.4f} lr {lr:.3e} tok/s {self.tokens_per_s():.0f} "
                  f"eta {_eta(eta)}", file=self.stream, flush=True)

    def write(self, message: str) -> None:
        """A message line that does not break the bar."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(message, file=self.stream)
        else:
            print(message, file=self.stream, flush=True)

    def close(self) -> None:
        """Finish the bar."""
        if self.bar is not None:
            self.bar.close()
