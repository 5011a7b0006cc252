"""Inferers that MONAI does not provide."""

from __future__ import annotations

import logging
from typing import Any

import torch
from monai.inferers import SimpleInferer

logger = logging.getLogger(__name__)


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bfloat16 in hardware (AVX-512 BF16 or AMX), where autocast to it pays."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # torch.cpu's own probes (torch >= 2.3)
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in checks)


class AutocastInferer(SimpleInferer):
    """``SimpleInferer`` that runs the network under ``torch.autocast``; the output comes back as float32.

    MONAI's engines autocast on CUDA only (their ``amp`` flag). This brings bfloat16 to the CPU, where
    processors with AVX-512 BF16/AMX run the bundle's UNet about 2x faster (inference and training); the
    loss, metrics and post-processing still see float32. With ``enabled=False`` it is a plain ``SimpleInferer``.

    Args:
        device_type: ``"cpu"`` or ``"cuda"``, as for ``torch.autocast``.
        dtype: the autocast dtype (bfloat16 by default).
        enabled: ``True``/``False``, or ``"auto"``: on where the CPU computes bfloat16 natively
            (:func:`cpu_has_native_bf16`); without those instructions bfloat16 is emulated and no faster.
    """

    def __init__(self, device_type: str = "cpu", dtype: torch.dtype = torch.bfloat16, enabled: bool | str = True):
        super().__init__()
        if isinstance(enabled, str):
            if enabled.lower() != "auto":
                raise ValueError(f"enabled must be True, False or 'auto', got {enabled!r}")
            enabled = cpu_has_native_bf16()
            logger.info("cpu_bf16 auto: " + (
                "the network runs in bfloat16 autocast (this CPU has AVX-512 BF16 or AMX); --cpu_bf16 False for float32"
                if enabled else "float32 (this CPU has neither AVX-512 BF16 nor AMX)"))
        self.device_type, self.dtype, self.enabled = device_type, dtype, bool(enabled)

    def __call__(self, inputs: torch.Tensor, network: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        with torch.autocast(self.device_type, dtype=self.dtype, enabled=self.enabled):
            outputs = super().__call__(inputs, network, *args, **kwargs)
        return outputs.float() if self.enabled else outputs
