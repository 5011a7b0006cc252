"""Tests for bundle/scripts/invertednet.py (InvertedNet, Novikov et al. 2018) and its config override."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

ROOT = Path(__file__).resolve().parents[1]
BUNDLE = ROOT / "bundle"
if str(BUNDLE) not in sys.path:
    sys.path.insert(0, str(BUNDLE))

from scripts.invertednet import InvertedNet  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """The test networks are tiny: one intra-op thread is faster, and immune to oversubscribed CPUs."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# a small configuration used by most tests (the default one is slow-ish on CPU)
SMALL = dict(in_channels=1, out_channels=3, base_channels=16, depth=3, dropout=0.1)


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def expected_params(in_channels: int, out_channels: int, base: int, depth: int, spatial_dims: int = 2) -> int:
    """Parameter count from the layer formula: a k^d conv from a to b channels has k^d*a*b weights + b biases."""

    def conv(a: int, b: int, k: int = 3) -> int:
        return k**spatial_dims * a * b + b

    w = [base >> i for i in range(depth + 1)]
    total = conv(in_channels, w[0]) + conv(w[0], w[0])  # full-resolution level
    for i in range(1, depth + 1):  # contracting path: stride-2 conv (the pooling has no weights), conv
        total += conv(w[i - 1], w[i]) + conv(w[i], w[i])
    for i in range(depth, 0, -1):  # expanding path: up-conv doubling the width, 2 convs after the concatenation
        total += conv(w[i], w[i - 1]) + conv(2 * w[i - 1], w[i - 1]) + conv(w[i - 1], w[i - 1])
    return total + conv(w[0], out_channels, k=1)  # 1x1 classifier


# --------------------------------------------------------------------------- shapes


@pytest.mark.parametrize(
    "kwargs, shape",
    [
        (dict(in_channels=1, out_channels=2, base_channels=16, depth=3), (2, 1, 64, 64)),
        (dict(in_channels=1, out_channels=4, base_channels=16, depth=3), (1, 1, 32, 48)),  # non-square
        (dict(in_channels=3, out_channels=5, base_channels=8, depth=2), (3, 3, 20, 12)),  # multiple of 4 only
        (dict(in_channels=2, out_channels=1, base_channels=32, depth=4), (1, 2, 16, 32)),
        (dict(in_channels=1, out_channels=2, base_channels=8, depth=1), (2, 1, 6, 10)),
        (dict(spatial_dims=3, in_channels=1, out_channels=3, base_channels=8, depth=2), (1, 1, 8, 12, 16)),
    ],
)
def test_output_shape(kwargs, shape):
    net = InvertedNet(**kwargs).eval()
    with torch.no_grad():
        out = net(torch.randn(*shape))
    assert out.shape == (shape[0], kwargs["out_channels"], *shape[2:])
    assert out.dtype == torch.float32


def test_returns_logits_not_probabilities():
    torch.manual_seed(0)
    net = InvertedNet(**SMALL).eval()
    assert isinstance(net.head, nn.Conv2d) and net.head.kernel_size == (1, 1)
    with torch.no_grad():
        out = net(torch.randn(2, 1, 32, 32) * 5)
    # a softmax output would be in [0, 1] and sum to 1 over the channels
    assert (out < 0).any()
    assert not torch.allclose(out.sum(dim=1), torch.ones_like(out[:, 0]), atol=1e-3)


# --------------------------------------------------------------------------- parameters


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(in_channels=1, out_channels=2, base_channels=16, depth=3),
        dict(in_channels=3, out_channels=5, base_channels=32, depth=2),
        dict(in_channels=1, out_channels=4, base_channels=64, depth=4),
        dict(in_channels=2, out_channels=2, base_channels=8, depth=1),
        dict(spatial_dims=3, in_channels=1, out_channels=3, base_channels=8, depth=2),
    ],
)
def test_parameter_count_matches_formula(kwargs):
    k = kwargs
    expected = expected_params(
        k["in_channels"], k["out_channels"], k["base_channels"], k["depth"], k.get("spatial_dims", 2)
    )
    assert n_params(InvertedNet(**kwargs)) == expected


def test_default_configuration_parameter_count():
    net = InvertedNet()
    assert (net.in_channels, net.out_channels, net.base_channels, net.depth, net.dropout) == (1, 2, 128, 3, 0.1)
    assert net.widths == [128, 64, 32, 16]
    assert n_params(net) == expected_params(1, 2, 128, 3) == 972_546
    # with 4 classes: 972,804 = the sum of the Conv2D parameters in the Keras summary of the KTH
    # re-implementation (Main_Code.ipynb: 972,288 in the 3x3 convs + 516 in the 1x1 softmax conv),
    # i.e. the same layers and widths, minus that notebook's two BatchNorm layers
    assert n_params(InvertedNet(out_channels=4)) == 972_804


# --------------------------------------------------------------------------- architecture


def _record_outputs(modules, x, net):
    shapes = []
    handles = [m.register_forward_hook(lambda _m, _i, out: shapes.append(tuple(out.shape))) for m in modules]
    try:
        with torch.no_grad():
            net(x)
    finally:
        for h in handles:
            h.remove()
    return shapes


def test_widths_halve_down_the_contracting_path():
    net = InvertedNet(in_channels=1, out_channels=2, base_channels=32, depth=3).eval()
    shapes = _record_outputs(list(net.encoders), torch.randn(1, 1, 64, 48), net)
    assert [s[1] for s in shapes] == [32, 16, 8, 4]
    assert [s[2:] for s in shapes] == [(64, 48), (32, 24), (16, 12), (8, 6)]
    for upper, lower in zip(shapes, shapes[1:]):
        assert lower[1] * 2 == upper[1]  # half the feature maps ...
        assert (lower[2] * 2, lower[3] * 2) == upper[2:]  # ... at half the resolution


def test_widths_double_up_the_expanding_path():
    net = InvertedNet(in_channels=1, out_channels=2, base_channels=32, depth=3).eval()
    x = torch.randn(1, 1, 64, 48)
    ups = _record_outputs(list(net.upsamples), x, net)
    decs = _record_outputs(list(net.decoders), x, net)
    assert [s[1] for s in ups] == [8, 16, 32]  # each upsampling step doubles the width ...
    assert [s[1] for s in decs] == [8, 16, 32]  # ... and the decoder level keeps it
    assert [s[2:] for s in decs] == [(16, 12), (32, 24), (64, 48)]
    # the skip concatenation: decoder input = skip (same width) + upsampled features
    first_convs = [d[0].conv for d in net.decoders]
    assert [(c.in_channels, c.out_channels) for c in first_convs] == [(16, 8), (32, 16), (64, 32)]
    # bottleneck -> first up-step doubles, from 4 to 8
    assert net.upsamples[0][1].conv.in_channels == 4


def test_skip_connections_concatenate_encoder_features():
    torch.manual_seed(0)
    net = InvertedNet(in_channels=1, out_channels=2, base_channels=32, depth=3).eval()
    enc_out, up_out, dec_in = [], [], []
    handles = [m.register_forward_hook(lambda _m, _i, o: enc_out.append(o)) for m in net.encoders]
    handles += [m.register_forward_hook(lambda _m, _i, o: up_out.append(o)) for m in net.upsamples]
    handles += [m.register_forward_pre_hook(lambda _m, i: dec_in.append(i[0])) for m in net.decoders]
    with torch.no_grad():
        net(torch.randn(1, 1, 32, 32))
    for h in handles:
        h.remove()
    # decoder j (from the bottleneck up) gets [encoder output of the same level, upsampled features]
    for j, x in enumerate(dec_in):
        skip = enc_out[net.depth - 1 - j]
        assert x.shape[1] == 2 * skip.shape[1]
        torch.testing.assert_close(x[:, : skip.shape[1]], skip, rtol=0, atol=0)
        torch.testing.assert_close(x[:, skip.shape[1] :], up_out[j], rtol=0, atol=0)


def test_every_convolution_is_followed_by_elu_then_dropout():
    net = InvertedNet(**SMALL)
    leaves = [m for m in net.modules() if len(list(m.children())) == 0]
    convs = [i for i, m in enumerate(leaves) if isinstance(m, nn.Conv2d)]
    assert len(convs) == 2 + 2 * 3 + 3 * 3 + 1  # full-res level, 3 down levels, 3 up levels, head
    for i in convs:
        if leaves[i] is net.head:
            continue
        assert isinstance(leaves[i + 1], nn.ELU), leaves[i + 1]
        assert isinstance(leaves[i + 2], nn.Dropout) and leaves[i + 2].p == pytest.approx(0.1)
    assert leaves[-1] is net.head  # nothing (no activation, no dropout) after the classifier
    assert not any(isinstance(m, (nn.BatchNorm2d, nn.ReLU, nn.PReLU)) for m in leaves)


def test_delayed_subsampling():
    net = InvertedNet(**SMALL)
    for level in net.encoders[1:]:
        pool = level[0]
        assert isinstance(pool.pool, nn.MaxPool2d) and pool.pool.stride in (1, (1, 1))
        x = torch.randn(1, 4, 10, 14)
        assert pool(x).shape == x.shape  # the pooling does not subsample ...
        conv = level[1].conv
        assert conv.stride == (2, 2) and conv.kernel_size == (3, 3)  # ... the strided 3x3 conv does
    assert not any(isinstance(m, nn.MaxPool2d) for m in net.encoders[0].modules())
    # stride-1 2x2 max pooling with "same" padding: out[i, j] = max of x[i:i+2, j:j+2], edges replicated
    x = torch.tensor([[[[1.0, 5.0, 2.0], [0.0, 3.0, 9.0]]]])
    assert net.encoders[1][0](x).tolist() == [[[[5.0, 9.0, 9.0], [3.0, 9.0, 9.0]]]]


# --------------------------------------------------------------------------- dropout / training


def test_dropout_active_in_train_mode_only():
    torch.manual_seed(0)
    net = InvertedNet(**SMALL)
    x = torch.randn(2, 1, 32, 32)
    net.train()
    with torch.no_grad():
        assert not torch.allclose(net(x), net(x))
    net.eval()
    with torch.no_grad():
        assert torch.equal(net(x), net(x))
    # without dropout there is no other source of randomness, even in train mode
    net0 = InvertedNet(**{**SMALL, "dropout": 0.0}).train()
    with torch.no_grad():
        assert torch.equal(net0(x), net0(x))


def test_a_few_steps_reduce_dice_ce_loss():
    from monai.losses import DiceCELoss

    torch.manual_seed(0)
    yy, xx = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    disc = (((yy - 16) ** 2 + (xx - 12) ** 2) < 64).float()
    label = disc[None, None].repeat(2, 1, 1, 1)
    label[1] = torch.flip(label[1], dims=[-1])
    image = label * 0.6 + 0.3 * torch.randn_like(label)

    net = InvertedNet(in_channels=1, out_channels=2, base_channels=16, depth=2, dropout=0.1)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)

    def eval_loss() -> float:
        net.eval()
        with torch.no_grad():
            return loss_fn(net(image), label).item()

    before = eval_loss()
    for _ in range(15):
        net.train()
        opt.zero_grad()
        loss = loss_fn(net(image), label)
        loss.backward()
        opt.step()
    after = eval_loss()
    assert after < 0.8 * before, (before, after)


# --------------------------------------------------------------------------- export


def test_torchscript_matches_eager():
    torch.manual_seed(0)
    net = InvertedNet(**SMALL).eval()
    scripted = torch.jit.script(net)
    for shape in [(2, 1, 32, 32), (1, 1, 16, 40)]:
        x = torch.randn(*shape)
        with torch.no_grad():
            torch.testing.assert_close(scripted(x), net(x))
    with pytest.raises(Exception, match="divisible by 2\\*\\*depth = 8"):
        scripted(torch.randn(1, 1, 30, 32))


def test_trace_matches_eager():
    torch.manual_seed(0)
    net = InvertedNet(**SMALL).eval()
    with torch.no_grad():
        traced = torch.jit.trace(net, torch.randn(1, 1, 32, 32))
        for shape in [(1, 1, 32, 32), (2, 1, 48, 24)]:  # the traced graph is not tied to the example size
            x = torch.randn(*shape)
            torch.testing.assert_close(traced(x), net(x))


# --------------------------------------------------------------------------- argument checks


@pytest.mark.parametrize("shape", [(1, 1, 30, 32), (1, 1, 32, 36), (1, 1, 7, 8)])
def test_non_divisible_input_raises(shape):
    net = InvertedNet(**SMALL)
    with pytest.raises(ValueError, match="divisible by 2\\*\\*depth = 8"):
        net(torch.randn(*shape))


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(base_channels=20, depth=3),  # 20 / 8 is not an integer width
        dict(base_channels=4, depth=3),  # bottleneck width would be 0
        dict(depth=0),
        dict(dropout=1.0),
        dict(dropout=-0.1),
        dict(spatial_dims=1),
    ],
)
def test_invalid_arguments_raise(kwargs):
    with pytest.raises(ValueError):
        InvertedNet(**kwargs)


# --------------------------------------------------------------------------- config override


def test_config_override_replaces_network_def(tmp_path):
    from monai.bundle import ConfigParser

    # a stand-in for train.yaml's network_def / num_classes, so the test does not depend on the rest of it
    base = tmp_path / "train.yaml"
    base.write_text(
        "num_classes: 4\n"
        "network_def:\n"
        "  _target_: UNet\n  spatial_dims: 2\n  in_channels: 1\n  out_channels: '@num_classes'\n"
        "  channels: [16, 32, 64, 128, 256]\n  strides: [2, 2, 2, 2]\n  num_res_units: 2\n"
    )
    parser = ConfigParser()
    parser.read_config([str(base), str(BUNDLE / "configs" / "invertednet.yaml")])
    assert "channels" not in parser["network_def"]  # the whole top-level key was replaced
    net = parser.get_parsed_content("network_def")
    assert isinstance(net, InvertedNet)
    assert (net.in_channels, net.out_channels, net.base_channels, net.depth, net.dropout) == (1, 4, 128, 3, 0.1)
