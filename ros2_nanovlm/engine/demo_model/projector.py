"""Projector of the demo VLM: EfficientNet-Lite0 features -> SmolLM2 input embeddings.

    projector = load_projector(demo_model_dir)     # reads projector.json + projector.safetensors
    image_embeds = projector(features)             # (B,1280,7,7) -> (B, T, 576)

The T image tokens, in this order:
  * 1 global token + spatial_pool**2 grid tokens (2x2 by default): average-pooled features through
    a LLaVA-1.5 style Linear-GELU-Linear MLP, plus a learned position embedding per token.
  * name_slots "name" tokens: the encoder's own ImageNet head (a frozen copy of its classifier,
    applied to the globally pooled features) picks the top-1 class, and the slots hold the LM's
    word embeddings of that class name (" golden retriever"), padded with a learned vector, then
    a learned per-dimension gain and per-slot bias.
  * category_slots "category" tokens (2, or 0 in projectors trained before them): the everyday
    category (imagenet_categories.tsv) that the head's class probabilities add up to most, and
    its group ("animal" for a dog, "food" for fruit; a learned pad vector when it has none),
    as the LM's word embeddings of " dog" / " animal", with their own gain and per-slot bias.
    They carry what yes/no questions ("Is there an animal?") and the JSON category ask about.

Why the name tokens: the only training photos with a usable licence are a few dozen (see
SOURCES.md), far too few for an MLP alone to learn 1000 ImageNet concepts; it would memorise
the training photos. The name path is class-agnostic (the same gain/bias for every class), so
what it learns from ~hundreds of pseudo-labelled classes ("read these slots, answer with that
name") carries over to every class the head knows, including those never seen in training.
The category path is class-agnostic in the same way.

No ROS imports; depends only on torch and safetensors.
"""

from __future__ import annotations

import dataclasses
import json
import os

import torch
import torch.nn.functional as F
from torch import nn

CONFIG_FILE = "projector.json"
WEIGHTS_FILE = "projector.safetensors"


@dataclasses.dataclass
class ProjectorConfig:
    feature_dim: int = 1280  # EfficientNet-Lite0 forward_features channels
    lm_hidden: int = 576  # SmolLM2-135M hidden size
    mlp_hidden: int = 576  # hidden width of the Linear-GELU-Linear MLP
    spatial_pool: int = 2  # grid tokens: spatial_pool x spatial_pool
    num_classes: int = 1000  # ImageNet head
    name_slots: int = 8  # word-embedding slots for the top-1 class name
    name_vocab: int = 0  # rows of the stored name-token embedding table
    category_slots: int = 0  # 0 (no category tokens) or 2: category word, group word
    categories: list[str] = dataclasses.field(default_factory=list)  # the category words, in index order
    system_prompt: str = "You are a robot's camera assistant. Answer briefly."
    image_token: str = "<image>"
    max_new_tokens: int = 24

    @property
    def num_visual_tokens(self) -> int:
        return 1 + self.spatial_pool**2

    @property
    def num_image_tokens(self) -> int:
        """T: how many LM input positions the <image> token expands to."""
        return self.num_visual_tokens + self.name_slots + self.category_slots

    def save(self, path: str) -> None:
        data = dataclasses.asdict(self)
        data["num_image_tokens"] = self.num_image_tokens  # informative only, derived on load
        with open(path, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2)
            f.write("\n")

    @classmethod
    def load(cls, path: str) -> ProjectorConfig:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        known = {field.name for field in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


class Projector(nn.Module):
    def __init__(self, config: ProjectorConfig):
        super().__init__()
        c = config
        self.config = c
        # Visual tokens (trained).
        self.mlp = nn.Sequential(
            nn.Linear(c.feature_dim, c.mlp_hidden), nn.GELU(), nn.Linear(c.mlp_hidden, c.lm_hidden)
        )
        self.visual_position = nn.Parameter(torch.zeros(c.num_visual_tokens, c.lm_hidden))
        # Name tokens: trained parts, shared by all classes.
        self.name_gain = nn.Parameter(torch.ones(c.lm_hidden))
        self.name_slot_bias = nn.Parameter(torch.zeros(c.name_slots, c.lm_hidden))
        self.name_pad = nn.Parameter(torch.zeros(c.lm_hidden))
        # Frozen buffers, stored with the weights so the projector needs neither the encoder's
        # head nor the LM at run time: the ImageNet classifier, and per class the LM token
        # embeddings of its name (index -1 = padding slot).
        self.register_buffer("classifier_weight", torch.zeros(c.num_classes, c.feature_dim))
        self.register_buffer("classifier_bias", torch.zeros(c.num_classes))
        self.register_buffer("name_token_embeds", torch.zeros(c.name_vocab, c.lm_hidden))
        self.register_buffer("name_token_index", torch.full((c.num_classes, c.name_slots), -1))
        if c.category_slots:
            if c.category_slots != 2:
                raise ValueError(f"category_slots must be 0 or 2, got {c.category_slots}")
            k = len(c.categories)
            # Trained, shared by all categories.
            self.category_gain = nn.Parameter(torch.ones(c.lm_hidden))
            self.category_slot_bias = nn.Parameter(torch.zeros(c.category_slots, c.lm_hidden))
            self.category_pad = nn.Parameter(torch.zeros(c.lm_hidden))
            # Frozen: each class's category, each category's LM word embedding (" dog") and the
            # category index of its group word (-1 = none).
            self.register_buffer("class_category", torch.zeros(c.num_classes, dtype=torch.long))
            self.register_buffer("category_token_embeds", torch.zeros(k, c.lm_hidden))
            self.register_buffer("category_group", torch.full((k,), -1))

    def class_logits(self, features: torch.Tensor) -> torch.Tensor:
        """(B,1280,7,7) -> (B,1000): identical to the encoder's head (global mean + _fc)."""
        return F.linear(features.mean((2, 3)), self.classifier_weight, self.classifier_bias)

    def visual_tokens(self, features: torch.Tensor) -> torch.Tensor:
        """(B,1280,7,7) -> (B, 1 + g*g, lm_hidden): global + grid average pools through the MLP."""
        g = self.config.spatial_pool
        pooled = torch.cat(
            [
                features.mean((2, 3)).unsqueeze(1),  # (B,1,C)
                F.adaptive_avg_pool2d(features, g).flatten(2).transpose(1, 2),  # (B,g*g,C)
            ],
            dim=1,
        )
        return self.mlp(pooled) + self.visual_position

    def name_tokens(self, class_ids: torch.Tensor) -> torch.Tensor:
        """(B,) class indices -> (B, name_slots, lm_hidden)."""
        index = self.name_token_index[class_ids]  # (B,K), -1 = pad
        words = self.name_token_embeds[index.clamp(min=0)]  # (B,K,H)
        words = torch.where((index >= 0).unsqueeze(-1), words, self.name_pad)
        return words * self.name_gain + self.name_slot_bias

    def category_ids(self, class_logits: torch.Tensor) -> torch.Tensor:
        """(B,1000) head logits -> (B,) the category whose classes' probabilities sum highest."""
        probs = class_logits.softmax(-1)
        per_category = probs.new_zeros(probs.shape[0], len(self.config.categories))
        per_category.index_add_(1, self.class_category, probs)
        return per_category.argmax(-1)

    def category_tokens(self, category_ids: torch.Tensor) -> torch.Tensor:
        """(B,) category indices -> (B, 2, lm_hidden): the category word, then its group word."""
        group = self.category_group[category_ids]  # (B,), -1 = none
        words = self.category_token_embeds[torch.stack([category_ids, group.clamp(min=0)], dim=1)]
        present = torch.stack([torch.ones_like(group, dtype=torch.bool), group >= 0], dim=1)
        words = torch.where(present.unsqueeze(-1), words, self.category_pad)
        return words * self.category_gain + self.category_slot_bias

    def forward(
        self,
        features: torch.Tensor,
        class_ids: torch.Tensor | None = None,
        category_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(B,1280,7,7) float32 -> (B, T, lm_hidden) image-token embeddings.

        class_ids overrides the head's top-1 and category_ids the category (training shows the
        LM classes and categories the training photos never give; tests of the name path). With
        class_ids alone, the category is that class's own.
        """
        logits = self.class_logits(features)
        if class_ids is None:
            class_ids = logits.argmax(-1)
        elif category_ids is None and self.config.category_slots:
            category_ids = self.class_category[class_ids]
        tokens = [self.visual_tokens(features), self.name_tokens(class_ids)]
        if self.config.category_slots:
            if category_ids is None:
                category_ids = self.category_ids(logits)
            tokens.append(self.category_tokens(category_ids))
        return torch.cat(tokens, dim=1)


def load_projector(directory: str, device: str | torch.device = "cpu") -> Projector:
    """Projector from `directory`/projector.json + projector.safetensors, fp32, eval mode."""
    from safetensors.torch import load_file

    config = ProjectorConfig.load(os.path.join(directory, CONFIG_FILE))
    projector = Projector(config)
    state = load_file(os.path.join(directory, WEIGHTS_FILE), device=str(device))
    # Stored in fp16 to keep the file small; computed in fp32 (indices stay integers).
    state = {k: v.float() if v.is_floating_point() else v.long() for k, v in state.items()}
    projector.load_state_dict(state, strict=True)
    return projector.to(device).eval()


def save_projector(projector: Projector, directory: str) -> None:
    """Write projector.json + projector.safetensors (float tensors as fp16, indices as int16)."""
    from safetensors.torch import save_file

    os.makedirs(directory, exist_ok=True)
    projector.config.save(os.path.join(directory, CONFIG_FILE))
    state = {
        k: (v.detach().half() if v.is_floating_point() else v.detach().to(torch.int16)).contiguous()
        for k, v in projector.state_dict().items()
    }
    save_file(state, os.path.join(directory, WEIGHTS_FILE), metadata={"format": "pt"})
