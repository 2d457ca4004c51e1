"""Where the learner runs and which mixed precision that device gets.

Why a module: the learner, the sliced head and the tree layouts all need the same answer, and
a hard-coded "cpu" anywhere silently keeps a GPU idle (autocast on the wrong device type is a
no-op, not an error).
"""

from __future__ import annotations

import contextlib

import torch


def resolve_device(spec: str | torch.device = "auto") -> torch.device:
    """ "auto" -> cuda when available, else cpu; anything else as torch.device understands it."""
    if isinstance(spec, torch.device):
        return spec
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(spec)


def amp_dtype(device: torch.device) -> torch.dtype:
    """The reduced precision autocast uses on `device`: bf16 (CPU, Ampere and later), else fp16."""
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16


def autocast(device: torch.device, enabled: bool = True) -> contextlib.AbstractContextManager:
    """Mixed-precision region on `device` (enabled=False: a region where autocast is off)."""
    return torch.autocast(device_type=device.type, dtype=amp_dtype(device), enabled=enabled)
