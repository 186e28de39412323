"""LLaVA-1.5 image preprocessing on the GPU: the uint8 frame goes to the device once, and
resize, centre crop and normalisation run there (what CLIPImageProcessor does on the CPU)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..hf.vision import image_features, image_features_per_image


class GpuLlavaImageEncoder:
    def __init__(self, model, image_processor, device: torch.device, dtype: torch.dtype):
        self._model = model
        self._device = device
        self._dtype = dtype
        size, crop = image_processor.size, getattr(image_processor, "crop_size", None)
        # No centre crop (SigLIP, VILA's image_aspect_ratio "resize"): the frame is squashed to
        # size's height x width.
        self._squash = crop is None or not getattr(image_processor, "do_center_crop", True)
        if self._squash:
            crop = size
        self._shortest_edge = _field(size, "shortest_edge") or min(_field(size, "height"), _field(size, "width"))
        self._crop = (_field(crop, "height"), _field(crop, "width"))
        scale = float(getattr(image_processor, "rescale_factor", 1 / 255))
        mean = torch.tensor(image_processor.image_mean, device=device).view(1, 3, 1, 1)
        std = torch.tensor(image_processor.image_std, device=device).view(1, 3, 1, 1)
        # (x * scale - mean) / std as one multiply-add
        self._multiplier = scale / std
        self._offset = -mean / std
        # LLaVA's image_aspect_ratio "pad" (expand2square; LlavaImageProcessor's do_pad): the
        # frame goes on a square of the mean colour before the resize.
        pad = getattr(image_processor, "do_pad", False)
        self._pad_colour = (mean * 255).floor().view(1, 3, 1, 1) if pad else None
        config = model.config
        self._feature_kwargs = dict(
            vision_feature_layer=config.vision_feature_layer,
            vision_feature_select_strategy=config.vision_feature_select_strategy,
        )

    def preprocess(self, frame: np.ndarray) -> torch.Tensor:
        pixels = torch.from_numpy(frame).to(self._device, non_blocking=True)
        pixels = pixels.permute(2, 0, 1)[None].float()  # (1, 3, H, W)
        height, width = pixels.shape[-2:]
        if self._pad_colour is not None and height != width:
            side = max(height, width)
            square = self._pad_colour.expand(1, 3, side, side).clone()
            top, left = (side - height) // 2, (side - width) // 2
            square[..., top : top + height, left : left + width] = pixels
            pixels, height, width = square, side, side
        if self._squash:
            pixels = F.interpolate(pixels, size=self._crop, mode="bicubic", antialias=True, align_corners=False)
            return (pixels.clamp(0, 255) * self._multiplier + self._offset).to(self._dtype)
        # as transformers: the short side becomes shortest_edge, the long side is truncated
        edge = self._shortest_edge
        resized = (edge, int(edge * width / height)) if height <= width else (int(edge * height / width), edge)
        pixels = F.interpolate(pixels, size=resized, mode="bicubic", antialias=True, align_corners=False)
        top = (resized[0] - self._crop[0]) // 2
        left = (resized[1] - self._crop[1]) // 2
        pixels = pixels[..., top : top + self._crop[0], left : left + self._crop[1]]
        return (pixels.clamp(0, 255) * self._multiplier + self._offset).to(self._dtype)

    def _encode(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return image_features(self._model, pixel_values, **self._feature_kwargs)

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture the encoder (fixed 336 px input) as a CUDA graph: a few hundred small kernels
        become one launch."""
        self._pixels = torch.zeros(1, 3, *self._crop, dtype=self._dtype, device=self._device)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._encode(self._pixels)
        torch.cuda.current_stream().wait_stream(stream)
        self._graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self._graph):
            self._features = self._encode(self._pixels)

    @torch.inference_mode()
    def __call__(self, frame: np.ndarray) -> torch.Tensor:
        pixels = self.preprocess(frame)
        if getattr(self, "_graph", None) is None:
            return self._encode(pixels)
        self._pixels.copy_(pixels)
        self._graph.replay()
        return self._features.clone()  # the graph overwrites its output on the next frame

    @torch.inference_mode()
    def encode_batch(self, frames: list[np.ndarray]) -> list[torch.Tensor]:
        """Several frames through one forward of the encoder: per frame what __call__ gives.

        One frame replays the batch-1 graph. A batch runs uncaptured: the graph saves launch
        overhead, which a batch already shares among its frames, and a graph per batch size
        would keep its own activation memory for every camera count that ever occurs."""
        if len(frames) == 1:
            return [self(frames[0])]
        pixels = torch.cat([self.preprocess(frame) for frame in frames])  # (frames, 3, crop)
        return image_features_per_image(self._model, pixels, len(frames), **self._feature_kwargs)


def _field(size, name: str):
    """A field of an image processor's size (a dict, or transformers' SizeDict)."""
    return size.get(name) if isinstance(size, dict) else getattr(size, name, None)
