"""The node's parameters: one table with defaults, descriptions, ranges and checks.

Ranges and read-only flags go into the ParameterDescriptor, so rclpy enforces them and
`ros2 param describe` shows them; the checks a descriptor cannot express (non-empty prompt, an
existing model directory, a known device) are in `check()`, used for the initial values and by
the node's on-set callback.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

from rcl_interfaces.msg import FloatingPointRange, IntegerRange, ParameterDescriptor

from ..engine.api import InvalidInput
from ..engine.config import DEVICES_HELP, DTYPES, MAX_CHARS_PER_TOKEN, QUANTIZATIONS, is_valid_device
from ..engine.structured import load_schema
from .image_conversion import shown  # user text in an error: cut and escaped


@dataclass(frozen=True)
class Spec:
    name: str
    default: Any
    description: str
    read_only: bool = False
    low: float | None = None
    high: float | None = None
    # A list parameter with an empty default is declared by type (rclpy cannot infer the type of
    # []), so a params file may leave it out.
    string_array: bool = False

    def descriptor(self) -> ParameterDescriptor:
        descriptor = ParameterDescriptor(name=self.name, description=self.description, read_only=self.read_only)
        if self.low is not None and isinstance(self.default, float):
            descriptor.floating_point_range = [FloatingPointRange(from_value=self.low, to_value=self.high, step=0.0)]
        elif self.low is not None:
            descriptor.integer_range = [IntegerRange(from_value=int(self.low), to_value=int(self.high), step=0)]
        return descriptor


SPECS = (
    Spec(
        "cameras",
        [],
        "Camera names; each subscribes <name>/image and publishes <name>/answer, <name>/result, "
        "<name>/result_json, <name>/annotated_image. Empty = one camera on image, answer, ...",
        read_only=True,
        string_array=True,
    ),
    Spec(
        "model.path",
        "",
        "Local model directory (LLaVA-1.5/1.6, VILA, Obsidian, Qwen2.5-VL, Qwen3-VL, SmolVLM2, Gemma 3, "
        "PaliGemma 2, InternVL); empty = the embedded default model. Setting it at run time loads the new model.",
    ),
    Spec("model.device", "auto", f"Where the model runs: {DEVICES_HELP}", read_only=True),
    Spec("model.dtype", "auto", f"Weights and activations: {', '.join(DTYPES)}", read_only=True),
    Spec(
        "model.quantization",
        "auto",
        "LLM weights: auto (4-bit where the GPU fast path runs the model), none, int4",
        read_only=True,
    ),
    Spec(
        "model.cpu_threads",
        0,
        "PyTorch threads on the CPU; 0 = half the cores (the executor, DDS and camera drivers need "
        "the rest: all cores oversubscribe the machine and slow every answer several times)",
        read_only=True,
        low=0,
        high=1024,
    ),
    Spec(
        "model.max_context_tokens",
        2048,
        "KV cache size in tokens: image tokens + prompt + answer",
        read_only=True,
        low=64,
        high=131072,
    ),
    Spec("prompt", "Describe the image in one sentence.", "The question asked about each camera frame"),
    Spec("system_prompt", "", "System prompt for every question (stream and query service)"),
    Spec("rate", 1.0, "Most camera frames answered per second; 0 = as fast as the model goes", low=0.0, high=1000.0),
    Spec("max_new_tokens", 32, "Longest answer in tokens", low=1, high=4096),
    Spec(
        "json_output",
        False,
        "Answer with one JSON object (any), guaranteed by constrained decoding; json_schema, when set, wins",
    ),
    Spec(
        "json_schema",
        "",
        "Answer with JSON valid for this JSON Schema (inline JSON text, or a path to a .json file), "
        "guaranteed by constrained decoding; empty = none",
    ),
    Spec(
        "subscribe_compressed",
        False,
        "Also subscribe image/compressed (sensor_msgs/CompressedImage, jpeg or png)",
        read_only=True,
    ),
    Spec(
        "max_image_pixels",
        16 * 1024 * 1024,
        "Images with more pixels are refused with an error",
        read_only=True,
        low=1,
        high=1 << 30,
    ),
    Spec(
        "max_prompt_tokens",
        512,
        "Longest prompt or system prompt, in the model's tokens (a parameter, a query or a goal); "
        "longer ones are refused with an error",
        read_only=True,
        low=1,
        high=32768,
    ),
    Spec(
        "query_timeout",
        60.0,
        "Seconds a query or an Ask goal may take, queue included; past it the answer is stopped "
        "and the caller gets a timeout error",
        low=0.1,
        high=3600.0,
    ),
    Spec(
        "max_pending_requests",
        8,
        "Queries and Ask goals that may wait for the model; more are refused as busy",
        read_only=True,
        low=1,
        high=256,
    ),
    Spec(
        "feedback_period",
        0.1,
        "Seconds between Ask action feedback messages while an answer streams; 0 = one per token",
        low=0.0,
        high=10.0,
    ),
    Spec(
        "diagnostics.stale_after",
        5.0,
        "Seconds without a camera frame before /diagnostics reports WARN",
        low=0.1,
        high=3600.0,
    ),
)
BY_NAME = {spec.name: spec for spec in SPECS}


CAMERA_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]*(/[A-Za-z][A-Za-z0-9_]*)*$")


def check(name: str, value: Any, max_prompt_tokens: int, count_tokens: Callable[[str], int] | None = None) -> str:
    """Why `value` is not acceptable for parameter `name`; "" when it is. Prompts are measured
    with `count_tokens` (the loaded model's tokenizer); without a model, only a text too long
    for any tokenizer is refused here, and the node checks again once a model is loaded."""
    if name == "prompt" and not str(value).strip():
        return "prompt must not be empty"
    if name in ("prompt", "system_prompt"):
        return _prompt_too_long(name, value, max_prompt_tokens, count_tokens)
    if name == "model.path" and value:
        return _model_path_problem(value)
    elif name == "model.device" and not is_valid_device(value):
        return f"model.device '{shown(value)}' is not one of {DEVICES_HELP}"
    elif name == "model.dtype" and value not in DTYPES:
        return f"model.dtype '{shown(value)}' is not one of {', '.join(DTYPES)}"
    elif name == "model.quantization" and value not in QUANTIZATIONS:
        return f"model.quantization '{shown(value)}' is not one of {', '.join(QUANTIZATIONS)}"
    elif name == "cameras":
        for camera in value:
            if not CAMERA_NAME.match(camera):
                return f"cameras: '{shown(camera)}' is not a valid topic name part (letters, digits, _, /)"
        if len(set(value)) != len(value):
            return f"cameras: names repeat in {shown(str(list(value)))}"
    elif name == "json_schema":
        try:
            load_schema(value)
        except InvalidInput as error:
            return str(error)
    return ""


def _model_path_problem(value: str) -> str:
    try:
        path = Path(value).expanduser()
        if not path.is_dir():
            return f"model.path '{shown(value)}' is not an existing directory"
        if not ((path / "config.json").is_file() or (path / "nanovlm_vlm.json").is_file()):
            return f"model.path '{shown(value)}' has no config.json: not a Hugging Face model directory"
    except (OSError, ValueError, RuntimeError) as error:  # a NUL byte, a name too long, no home dir
        why = getattr(error, "strerror", None) or type(error).__name__  # str(error) repeats the path
        return f"model.path '{shown(value)}' is not a usable path: {why}"
    return ""


def _prompt_too_long(name: str, text: str, limit: int, count_tokens: Callable[[str], int] | None) -> str:
    if len(text) > limit * MAX_CHARS_PER_TOKEN:
        return f"{name} is {len(text)} characters, far over max_prompt_tokens={limit}"
    if count_tokens is not None and (tokens := count_tokens(text)) > limit:
        return f"{name} is {tokens} tokens, over max_prompt_tokens={limit}"
    return ""


@dataclass(frozen=True)
class Settings:
    """One consistent snapshot of the parameter values, replaced whole on every change: the
    worker reads `node.settings` once per answer, so no frame is answered with half-old,
    half-new settings. `json_schema` is the parsed schema (None when the parameter is empty)."""

    values: Mapping[str, Any]
    json_schema: dict | None

    @classmethod
    def from_values(cls, values: Mapping[str, Any]) -> Settings:
        return cls(MappingProxyType(dict(values)), load_schema(values.get("json_schema", "")))

    def updated(self, changes: Mapping[str, Any]) -> Settings:
        return Settings.from_values({**self.values, **changes})

    def __getitem__(self, name: str) -> Any:
        return self.values[name]
