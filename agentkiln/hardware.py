"""Which floating-point precision is fast on a device: the engine and the learner ask the same question.

bf16 halves memory and, on hardware with bf16 matrix units, doubles matmul speed; without them
it is emulated. Measured on an AVX2-only AMD EPYC (no AVX512-BF16, no AMX): a 1024x1024 bf16
matmul ran at 0.8 GFLOP/s against 110 GFLOP/s in fp32 on 2 threads, so a bf16 model there
trains and generates ~60x slower. "auto" therefore picks bf16 only where the hardware has it.
"""

from __future__ import annotations

import functools
import logging

import torch

log = logging.getLogger(__name__)


@functools.cache
def bf16_is_fast(device_type: str) -> bool:
    """True where bf16 matmuls run on native units: CUDA with bf16 support, CPUs with AVX512-BF16 or AMX."""
    if device_type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device_type == "cpu":
        cpu = torch.cpu
        fast = any(getattr(cpu, probe, lambda: False)() for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))
        if not fast:
            log.info("this CPU has no bf16 matrix units (AVX512-BF16/AMX): using fp32")
        return fast
    return False


def resolve_dtype(spec: str | torch.dtype, device_type: str) -> torch.dtype:
    """`spec` as a torch dtype; "auto" -> bfloat16 where `bf16_is_fast`, else float32."""
    if isinstance(spec, torch.dtype):
        return spec
    if spec == "auto":
        return torch.bfloat16 if bf16_is_fast(device_type) else torch.float32
    dtype = getattr(torch, spec, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {spec!r}: use auto, bfloat16, float16 or float32")
    return dtype
