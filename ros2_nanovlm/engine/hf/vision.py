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
        inputs = self._image_processor(images=frame, return_tensors="pt", input_data_format="channels_last")
        kwargs = dict(self._feature_kwargs)
        if self._uses_image_sizes:
            kwargs["image_sizes"] = inputs["image_sizes"].to(self._device)
        return image_features(self._model, inputs["pixel_values"].to(self._device, self._dtype), **kwargs)


def image_features(model, pixel_values: torch.Tensor, **kwargs) -> torch.Tensor:
    """(image tokens, LLM hidden size) from transformers' get_image_features, whatever form it
    returns them in (one tensor, or a list per image/tile)."""
    output = model.model.get_image_features(pixel_values=pixel_values, **kwargs)
    features = output.pooler_output if hasattr(output, "pooler_output") else output
    if isinstance(features, (list, tuple)):
        features = torch.cat(list(features), dim=0)
    return features.reshape(-1, features.shape[-1])
