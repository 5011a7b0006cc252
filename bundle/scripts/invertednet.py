"""InvertedNet (Novikov et al., IEEE TMI 2018) for multi-class chest X-ray segmentation."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.networks.blocks import Convolution
from monai.networks.layers.factories import Conv, Pool

__all__ = ["InvertedNet"]


class DelayedSubsampling(nn.Module):
    """
    Max pooling with kernel 2 and **stride 1** that keeps the spatial size.

    This is the pooling half of InvertedNet's "delayed subsampling": the pooling layer itself does not
    reduce the resolution; the following 3x3 convolution with stride 2 does. The input is replicate-padded
    by one voxel at the end of every spatial dimension, which for a max pooling is the same as TensorFlow/Keras
    ``padding="same"`` (the padded values never exceed the real ones), so the output has the input's size.

    Args:
        spatial_dims: number of spatial dimensions (2 or 3).
    """

    def __init__(self, spatial_dims: int = 2) -> None:
        super().__init__()
        self.pad = [0, 1] * spatial_dims  # (before, after) per spatial dim: pad only "after"
        self.pool = Pool[Pool.MAX, spatial_dims](kernel_size=2, stride=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(F.pad(x, self.pad, mode="replicate"))


class InvertedNet(nn.Module):
    """
    InvertedNet: a U-Net-like fully convolutional network with *inverted* feature-map widths, from
    Novikov et al., "Fully Convolutional Architectures for Multiclass Segmentation in Chest Radiographs",
    IEEE TMI 37(8), 2018 (https://doi.org/10.1109/TMI.2018.2806086, arXiv:1701.08816).

    The network combines the three ideas of the paper:

    - **All-Dropout**: every convolution is followed by an ELU activation and then a dropout layer
      (the final 1x1 classifier convolution excepted).
    - **Delayed subsampling** (All-Convolutional idea): every downsampling step is a 2x2 max pooling with
      stride 1 (:class:`DelayedSubsampling`) followed by a 3x3 convolution with stride 2.
    - **Inverted widths**: many feature maps at full resolution (``base_channels``), *halved* at every level
      of the contracting path and *doubled* at every upsampling step of the expanding path (the inverse of
      U-Net). Skip connections concatenate encoder and decoder features, as in U-Net.

    Layout for the defaults (``base_channels=128, depth=3``); ``conv`` means 3x3 convolution + ELU + dropout::

        level 0 (H x W)     : conv(in -> 128), conv(128 -> 128) ............ skip0 (128)
        level 1 (H/2 x W/2) : pool(s=1), conv(128 -> 64, s=2), conv(64 -> 64) skip1 (64)
        level 2 (H/4 x W/4) : pool(s=1), conv(64 -> 32, s=2), conv(32 -> 32)  skip2 (32)
        level 3 (H/8 x W/8) : pool(s=1), conv(32 -> 16, s=2), conv(16 -> 16)  bottleneck (16)
        up to level 2       : upsample x2, conv(16 -> 32),  cat skip2 (64),  conv(64 -> 32),  conv(32 -> 32)
        up to level 1       : upsample x2, conv(32 -> 64),  cat skip1 (128), conv(128 -> 64), conv(64 -> 64)
        up to level 0       : upsample x2, conv(64 -> 128), cat skip0 (256), conv(256 -> 128), conv(128 -> 128)
        head                : 1x1 conv(128 -> out_channels), no activation

    which has 972,546 trainable parameters with ``out_channels=2`` (972,804 with ``out_channels=4``).

    **Output:** the network returns raw ``out_channels`` *logits* of shape ``(B, out_channels, *spatial)``.
    The paper applies a softmax in the network; here the activation belongs to the loss and the post-processing
    of the config, so do not add one: a softmax with train.yaml (``DiceCELoss(softmax=True)``, argmax), a
    sigmoid per channel with anatomy.yaml (Dice + binary cross-entropy, each channel thresholded at 0.5), as
    the shipped ``model_anatomy_invertednet.pt`` was trained.

    **Input size:** every spatial size must be divisible by ``2 ** depth`` (8 for the defaults), so that the
    upsampled decoder features align with the skip connections; ``forward`` raises a ``ValueError`` otherwise.

    Provenance of the defaults and design details:

    - From the paper (verified via its abstract and quoted text): ELU activations, dropout after every
      convolution after the activation, delayed subsampling (stride-1 pooling, stride-2 convolution),
      halving/doubling of the widths, U-Net-style concatenation skips, multi-class output.
    - From re-implementations (not verified against the paper's figures/tables):
      ``base_channels=128`` at 128x128 input and the 128 -> 64 -> 32 -> 16 widths, i.e. ``depth=3``
      (KTH DD2424 report by Aubret, Sharma and Cabrera Gil, 2019, and its Keras notebook);
      ``dropout=0.1`` (that notebook and the sonal-bansal/Various-forms-of-Unet PyTorch version, which instead
      starts at 256 feature maps with 4 downsamplings; both end at 16 bottleneck feature maps);
      two 3x3 convolutions per level; decoder up-step = nearest-neighbour x2 upsampling followed by a 3x3
      convolution that doubles the width before the concatenation (KTH notebook).
    - Our choices: no batch normalisation (the KTH notebook normalises the input and the last features with
      BatchNorm; the paper text we could check does not mention it; the bundle's transforms normalise the
      intensities); element-wise ``nn.Dropout``; the stride-1 pooling keeps the size (Keras ``"valid"`` in the
      KTH notebook loses one pixel before the strided convolution, which changes nothing but alignment);
      PyTorch's default weight initialisation; logits output.

    Args:
        spatial_dims: number of spatial dimensions, 2 (default; chest radiographs) or 3.
        in_channels: number of input channels. Defaults to 1 (grey-scale radiograph).
        out_channels: number of output channels (classes, background included). Defaults to 2.
        base_channels: number of feature maps at full resolution; the level-``i`` width is
            ``base_channels // 2**i``. Must be divisible by ``2 ** depth``. Defaults to 128.
        depth: number of downsampling steps (the network has ``depth + 1`` resolution levels). Must be >= 1.
            Defaults to 3.
        dropout: dropout probability applied after every convolution's activation. Defaults to 0.1.

    Raises:
        ValueError: at construction for an unsupported ``spatial_dims``, ``depth < 1``, a ``dropout`` outside
            ``[0, 1)`` or a ``base_channels`` not divisible by ``2 ** depth``; in ``forward`` for spatial sizes
            not divisible by ``2 ** depth`` (eager and TorchScript; the check is skipped while ``torch.jit.trace``
            records the graph, so a traced module does not check).

    Examples::

        # the defaults: the layout of a course project's Keras notebook (KTH DD2424, Aubret, Sharma and
        # Cabrera Gil 2019, Main_Code.ipynb), not one checked against the paper: 128 feature maps at full
        # resolution (the report's input is 128 x 128), halved at each of 3 stride-2 steps to 16, so 4
        # resolution levels (the report's text gives the 128 and the halving/doubling, not the depth)
        >>> net = InvertedNet(in_channels=1, out_channels=4)
        >>> net(torch.randn(2, 1, 128, 128)).shape
        torch.Size([2, 4, 128, 128])

        # a lighter variant
        >>> net = InvertedNet(out_channels=2, base_channels=32, depth=2, dropout=0.0)

    """

    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 1,
        out_channels: int = 2,
        base_channels: int = 128,
        depth: int = 3,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}.")
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}.")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}.")
        if base_channels < 2**depth or base_channels % 2**depth != 0:
            raise ValueError(
                f"base_channels ({base_channels}) must be a positive multiple of 2**depth ({2**depth}) "
                "so that the width can be halved at every level."
            )
        self.spatial_dims = spatial_dims
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.base_channels = base_channels
        self.depth = depth
        self.dropout = dropout
        # spatial sizes must be multiples of this (an int attribute, so TorchScript can use it in forward)
        self.size_divisor = 2**depth

        widths = [base_channels // 2**i for i in range(depth + 1)]  # e.g. [128, 64, 32, 16]
        self.widths = widths

        def conv(c_in: int, c_out: int, stride: int = 1) -> Convolution:
            # 3x3 convolution -> ELU -> dropout ("All-Dropout": dropout after the activation)
            return Convolution(
                spatial_dims,
                c_in,
                c_out,
                strides=stride,
                kernel_size=3,
                adn_ordering="AD",
                act="elu",
                norm=None,
                dropout=dropout,
            )

        # contracting path: level 0 at full resolution, then (stride-1 pool, stride-2 conv, conv) per level
        encoders = [nn.Sequential(conv(in_channels, widths[0]), conv(widths[0], widths[0]))]
        for i in range(1, depth + 1):
            encoders.append(
                nn.Sequential(
                    DelayedSubsampling(spatial_dims),  # 2x2 max pooling, stride 1: same size
                    conv(widths[i - 1], widths[i], stride=2),  # the subsampling, and the halving of the width
                    conv(widths[i], widths[i]),
                )
            )
        self.encoders = nn.ModuleList(encoders)

        # expanding path, from the bottleneck up: upsample + conv doubling the width, then concatenation with
        # the skip of the same width and two convs back to that width
        upsamples, decoders = [], []
        for i in range(depth, 0, -1):
            upsamples.append(nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), conv(widths[i], widths[i - 1])))
            decoders.append(nn.Sequential(conv(2 * widths[i - 1], widths[i - 1]), conv(widths[i - 1], widths[i - 1])))
        self.upsamples = nn.ModuleList(upsamples)
        self.decoders = nn.ModuleList(decoders)

        # classifier: 1x1 convolution to logits (softmax is left to the loss / post-processing)
        self.head = Conv[Conv.CONV, spatial_dims](widths[0], out_channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """
        Args:
            x: input of shape ``(B, in_channels, *spatial)``, every spatial size divisible by ``2 ** depth``.

        Returns:
            logits of shape ``(B, out_channels, *spatial)``.
        """
        # cheap shape check; skipped while tracing (shapes are then traced values and the check would be baked in)
        if not torch.jit.is_tracing():
            for size in x.shape[2:]:
                if size % self.size_divisor != 0:
                    raise ValueError(
                        f"InvertedNet: every spatial size of the input must be divisible by 2**depth = "
                        f"{self.size_divisor}, got spatial shape {list(x.shape[2:])}. Resize or pad the input "
                        f"(e.g. DivisiblePadd(k={self.size_divisor}) or a fixed spatial_size)."
                    )

        skips: list[torch.Tensor] = []
        for encoder in self.encoders:
            x = encoder(x)
            skips.append(x)
        x = skips.pop()  # bottleneck features, not a skip connection
        for upsample, decoder in zip(self.upsamples, self.decoders):
            x = upsample(x)
            x = decoder(torch.cat([skips.pop(), x], dim=1))
        return self.head(x)
