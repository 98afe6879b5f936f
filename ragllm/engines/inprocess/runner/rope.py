"""Rotary position embedding applied to query or key states (the half-split layout transformers'
Llama-family models use): what the runners' reference paths and document placement share."""

from __future__ import annotations

import torch


def apply_rope(states: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = states.shape[-1] // 2
    rotated = torch.cat((-states[..., half:], states[..., :half]), dim=-1)
    return states * cos + rotated * sin
