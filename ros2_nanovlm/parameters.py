"""The node's parameters: one table with defaults, descriptions, ranges and checks.

Ranges and read-only flags go into the ParameterDescriptor, so rclpy enforces them and
`ros2 param describe` shows them; the checks a descriptor cannot express (non-empty prompt, an
existing model directory, a known device) are in `check()`, used for the initial values and by
the node's on-set callback.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rcl_interfaces.msg import FloatingPointRange, IntegerRange, ParameterDescriptor

from .engine.api import InvalidInput
from .engine.config import DEVICES_HELP, DTYPES, is_valid_device
from .engine.structured import load_schema


@dataclass(frozen=True)
class Spec:
    name: str
    default: Any
    description: str
    read_only: bool = False
    low: float | None = None
    high: float | None = None

    def descriptor(self) -> ParameterDescriptor:
        descriptor = ParameterDescriptor(name=self.name, description=self.description, read_only=self.read_only)
        if self.low is not None and isinstance(self.default, float):
            descriptor.floating_point_range = [FloatingPointRange(from_value=self.low, to_value=self.high, step=0.0)]
        elif self.low is not None:
            descriptor.integer_range = [IntegerRange(from_value=int(self.low), to_value=int(self.high), step=0)]
        return descriptor


SPECS = (
    Spec(
        "model.path",
        "",
        "Local Hugging Face directory of a LLaVA-1.5/1.6 model; empty = the embedded default "
        "model. Setting it at run time loads the new model.",
    ),
    Spec("model.device", "auto", f"Where the model runs: {DEVICES_HELP}", read_only=True),
    Spec("model.dtype", "auto", f"Weights and activations: {', '.join(DTYPES)}", read_only=True),
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
    Spec("max_prompt_chars", 2000, "Longer prompts are refused with an error", read_only=True, low=1, high=100000),
    Spec("query_timeout", 60.0, "Seconds a query service call waits for its answer", low=0.1, high=3600.0),
)
BY_NAME = {spec.name: spec for spec in SPECS}


def check(name: str, value: Any, max_prompt_chars: int) -> str:
    """Why `value` is not acceptable for parameter `name`; "" when it is."""
    if name == "prompt":
        if not str(value).strip():
            return "prompt must not be empty"
        if len(value) > max_prompt_chars:
            return f"prompt is {len(value)} characters, over max_prompt_chars={max_prompt_chars}"
    elif name == "system_prompt" and len(value) > max_prompt_chars:
        return f"system_prompt is {len(value)} characters, over max_prompt_chars={max_prompt_chars}"
    elif name == "model.path" and value:
        path = Path(value).expanduser()
        if not path.is_dir():
            return f"model.path '{value}' is not an existing directory"
        if not ((path / "config.json").is_file() or (path / "nanovlm_vlm.json").is_file()):
            return f"model.path '{value}' has no config.json: not a Hugging Face model directory"
    elif name == "model.device" and not is_valid_device(value):
        return f"model.device '{value}' is not one of {DEVICES_HELP}"
    elif name == "model.dtype" and value not in DTYPES:
        return f"model.dtype '{value}' is not one of {', '.join(DTYPES)}"
    elif name == "json_schema":
        try:
            load_schema(value)
        except InvalidInput as error:
            return str(error)
    return ""
