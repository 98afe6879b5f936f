"""Chosen tokens from the device to the host, without waiting for work queued after them."""

from __future__ import annotations

import torch


class TokenReadback:
    """Copies chosen tokens to the host without waiting for work queued after them (on CUDA: into
    pinned memory, then an event), so the next step can be launched before the copy is awaited."""

    def __init__(self, size: int, cuda: bool) -> None:
        self._cuda = cuda
        if cuda:
            self._host = torch.empty(size, dtype=torch.long, pin_memory=True)
            self._event = torch.cuda.Event()
        self._tokens: torch.Tensor | None = None
        self._count = 0

    def start(self, tokens: torch.Tensor) -> TokenReadback:
        self._count = len(tokens)
        if self._cuda:
            self._host[: self._count].copy_(tokens, non_blocking=True)
            self._event.record()
        else:
            self._tokens = tokens
        return self

    def finish(self) -> list[int]:
        if self._cuda:
            self._event.synchronize()
            return self._host[: self._count].tolist()
        return self._tokens.tolist()
