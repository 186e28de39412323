"""Conversations to token ids with the model's own chat template, image placeholders expanded
to one position per image token."""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass

from ..api import InvalidInput, Turn


@dataclass
class ImageSpan:
    start: int  # position of the image's first token in the prompt
    length: int  # number of image tokens
    digest: str


@dataclass
class TokenizedPrompt:
    ids: list[int]  # image positions carry the image token id
    keys: list[Hashable]  # what the KV cache compares: ids, and (digest, i) for image tokens
    images: list[ImageSpan]


class ChatPrompter:
    """Renders a conversation with the model's own chat template (LLaVA's USER:/ASSISTANT:,
    SmolLM2's ChatML, ...) and tokenizes it.

    `template_owner` is the processor (LLaVA: content as a list of typed parts) or, with
    `image_token` given, the tokenizer of a plain chat LM (content as text, the image token
    written in front of the question's text)."""

    def __init__(self, template_owner, tokenizer, image_token_id: int, image_token: str | None = None):
        self._template_owner = template_owner
        self._tokenizer = tokenizer
        self.image_token_id = image_token_id
        self._image_token = image_token

    def _content(self, text: str, has_image: bool):
        if self._image_token is not None:
            return f"{self._image_token}\n{text}" if has_image else text
        parts = [{"type": "image"}] if has_image else []
        return parts + [{"type": "text", "text": text}]

    def render(self, system_prompt: str, turns: tuple[Turn, ...]) -> str:
        messages = []
        if system_prompt:
            messages.append({"role": "system", "content": self._content(system_prompt, False)})
        for turn in turns:
            messages.append({"role": turn.role, "content": self._content(turn.text, turn.image is not None)})
        return self._template_owner.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def tokenize(self, system_prompt: str, turns: tuple[Turn, ...], images: list[tuple[str, int]]) -> TokenizedPrompt:
        """`images`: (digest, token count) of each image, in conversation order."""
        text = self.render(system_prompt, turns)
        bos = self._tokenizer.bos_token
        add_special = not (bos and text.startswith(bos))
        raw_ids = self._tokenizer(text, add_special_tokens=add_special)["input_ids"]
        placeholders = raw_ids.count(self.image_token_id)
        if placeholders != len(images):
            raise InvalidInput(
                f"the prompt holds {placeholders} image placeholders for {len(images)} images; "
                "do not type the image token into the prompt"
            )
        ids: list[int] = []
        keys: list[Hashable] = []
        spans: list[ImageSpan] = []
        image_index = 0
        for token in raw_ids:
            if token != self.image_token_id:
                ids.append(token)
                keys.append(token)
                continue
            digest, length = images[image_index]
            image_index += 1
            spans.append(ImageSpan(len(ids), length, digest))
            ids.extend([token] * length)
            keys.extend((digest, i) for i in range(length))
        return TokenizedPrompt(ids, keys, spans)
