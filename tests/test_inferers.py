"""AutocastInferer: bfloat16 on the CPU, float32 out, and a no-op when disabled."""

import torch
from monai.inferers import SimpleInferer
from monai.networks.nets import UNet

from scripts.inferers import AutocastInferer


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
