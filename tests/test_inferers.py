"""AutocastInferer: bfloat16 on the CPU, float32 out, a no-op when disabled, and "auto" following the CPU."""

import sys

import pytest
import torch
from monai.inferers import SimpleInferer
from monai.networks.nets import UNet

from scripts.inferers import AutocastInferer, cpu_has_native_bf16


def test_autocast_inferer_runs_bf16_and_returns_float32():
    torch.manual_seed(0)
    net = UNet(2, 1, 2, (8, 16, 32), (2, 2), num_res_units=1).eval()
    seen = []
    net.model[0].register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    x = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        reference = SimpleInferer()(x, net)
        out = AutocastInferer(enabled=True)(x, net)
        off = AutocastInferer(enabled=False)(x, net)
    assert seen == [torch.float32, torch.bfloat16, torch.float32]
    assert out.dtype == torch.float32
    assert torch.equal(off, reference)
    assert (out.argmax(1) == reference.argmax(1)).float().mean() > 0.95  # bf16 rounding only
    assert not torch.equal(out, reference)


def test_auto_follows_the_cpu_and_rejects_other_words(monkeypatch, caplog):
    """enabled="auto" (inference.yaml's default cpu_bf16) is on exactly where torch finds AVX-512 BF16 or AMX,
    and the log says which precision the run got."""
    for avx512_bf16, amx in ((False, False), (True, False), (False, True)):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda v=avx512_bf16: v)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda v=amx: v)
        assert cpu_has_native_bf16() is (avx512_bf16 or amx)
        caplog.clear()
        with caplog.at_level("INFO", logger="scripts.inferers"):
            assert AutocastInferer(enabled="auto").enabled is (avx512_bf16 or amx)
        assert ("bfloat16 autocast" if avx512_bf16 or amx else "float32 (this CPU") in caplog.text
        assert AutocastInferer(enabled="AUTO").enabled is (avx512_bf16 or amx)
    with pytest.raises(ValueError, match="'auto'"):
        AutocastInferer(enabled="yes")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/cpuinfo")
def test_native_bf16_probe_agrees_with_the_kernel():
    """torch's probe (private API) against the flags the Linux kernel lists for this CPU."""
    flags = set()
    for line in open("/proc/cpuinfo"):
        if line.startswith("flags"):
            flags |= set(line.split(":", 1)[1].split())
    assert cpu_has_native_bf16() is bool(flags & {"avx512_bf16", "amx_tile"})
