"""The nanovlm engine: a vision-language model behind a small API, with no ROS imports.

from ros2_nanovlm.engine import EngineConfig, VLMEngine
engine = VLMEngine.load(EngineConfig(model_path="/path/to/llava"))
print(engine.ask("What is in the image?", rgb_frame).text)
"""

from .api import (
    Answer,
    Backend,
    EngineError,
    GenerationRequest,
    InvalidInput,
    ModelLoadError,
    OutOfMemory,
    Timings,
    Turn,
)
from .config import EngineConfig
from .engine import ChatSession, VLMEngine

__all__ = [
    "Answer",
    "Backend",
    "ChatSession",
    "EngineConfig",
    "EngineError",
    "GenerationRequest",
    "InvalidInput",
    "ModelLoadError",
    "OutOfMemory",
    "Timings",
    "Turn",
    "VLMEngine",
]
