"""Frames to image embeddings in the LLM's input space (vision tower + projector)."""

from __future__ import annotations

import numpy as np
import torch


class LlavaImageEncoder:
    """LLaVA-1.5 (one 336 px crop) and LLaVA-1.6 (any-resolution tiles) through the model's own
    image processor and `get_image_features`, so the tokens match what transformers would do."""

    def __init__(self, model, image_processor, device: torch.device, dtype: torch.dtype):
        self._model = model
        self._image_processor = image_processor
        self._device = device
        self._dtype = dtype
        config = model.config
        self._feature_kwargs = dict(
            vision_feature_layer=config.vision_feature_layer,
            vision_feature_select_strategy=config.vision_feature_select_strategy,
        )
        self._uses_image_sizes = config.model_type == "llava_next"

    def __call__(self, frame: np.ndarray) -> torch.Tensor:
        """RGB uint8 (H, W, 3) -> (image tokens, LLM hidden size)."""
        pixel_values, kwargs = self._inputs(frame)
        return image_features(self._model, pixel_values, **kwargs)

    @torch.inference_mode()
    def encode_batch(self, frames: list[np.ndarray]) -> list[torch.Tensor]:
        """Several frames through one forward of the vision tower: per frame what __call__ gives.

        LLaVA-1.6 frames of different aspect ratios make different numbers of tiles (and tokens):
        the processor pads the tiles to (frames, most tiles, 3, H, W), get_image_features drops
        the padding tiles before the tower (by image_sizes) and returns the features per frame."""
        pixel_values, kwargs = self._inputs(frames)
        return image_features_per_image(self._model, pixel_values, len(frames), **kwargs)

    def _inputs(self, images) -> tuple[torch.Tensor, dict]:
        """Pixel values on the device and the get_image_features arguments, for one frame or a list."""
        inputs = self._image_processor(images=images, return_tensors="pt", input_data_format="channels_last")
        kwargs = dict(self._feature_kwargs)
        if self._uses_image_sizes:
            kwargs["image_sizes"] = inputs["image_sizes"].to(self._device)
        return inputs["pixel_values"].to(self._device, self._dtype), kwargs


def image_features(model, pixel_values: torch.Tensor, **kwargs) -> torch.Tensor:
    """(image tokens, LLM hidden size) from transformers' get_image_features, whatever form it
    returns them in (one tensor, or a list per image/tile)."""
    features = _pooled_features(model, pixel_values, kwargs)
    if isinstance(features, (list, tuple)):
        features = torch.cat(list(features), dim=0)
    return features.reshape(-1, features.shape[-1])


def image_features_per_image(model, pixel_values: torch.Tensor, count: int, **kwargs) -> list[torch.Tensor]:
    """[(image tokens, LLM hidden size)] for each of `count` images batched in `pixel_values`."""
    features = _pooled_features(model, pixel_values, kwargs)
    if isinstance(features, torch.Tensor):  # (images, tokens, hidden): one crop per image
        features = features.reshape(count, -1, features.shape[-1]).unbind(0)
    if len(features) != count:
        raise RuntimeError(f"get_image_features gave {len(features)} feature sets for {count} images")
    # A copy each (not views of one batch tensor): evicting one frame from the embedding cache
    # then frees its memory.
    return [each.reshape(-1, each.shape[-1]).clone() for each in features]


def _pooled_features(model, pixel_values: torch.Tensor, kwargs: dict):
    output = model.model.get_image_features(pixel_values=pixel_values, **kwargs)
    return output.pooler_output if hasattr(output, "pooler_output") else output
