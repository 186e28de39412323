"""Read an original (non-transformers) checkpoint directory: its config.json and its weights,
in whichever of the published layouts it comes (one file or shards with an index; safetensors
or pickled `pytorch_model*.bin`), with errors that name the missing file."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import torch

from ..api import ModelLoadError

# Looked for in this order: an index names its shards; a single file holds everything.
WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def read_config(directory: str | Path) -> dict | None:
    """config.json of `directory` as a dict, or None when there is none or it does not parse
    (recognisers call this: a directory they cannot read is simply not theirs)."""
    try:
        config = json.loads((Path(directory).expanduser() / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return config if isinstance(config, dict) else None


def weight_files(directory: str | Path) -> list[Path]:
    """The weight files of `directory`, or ModelLoadError naming what was looked for."""
    directory = Path(directory).expanduser()
    for index_name in WEIGHT_INDEXES:
        index = directory / index_name
        if not index.is_file():
            continue
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise ModelLoadError(f"cannot read the weight index '{index}': {error}") from error
        files = [directory / name for name in dict.fromkeys(weight_map.values())]
        missing = [path.name for path in files if not path.is_file()]
        if missing:
            raise ModelLoadError(f"'{directory}': the shards {', '.join(missing)} named by {index_name} are missing")
        return files
    for name in WEIGHT_FILES:
        if (directory / name).is_file():
            return [directory / name]
    raise ModelLoadError(f"'{directory}' has no weights: none of {', '.join(WEIGHT_INDEXES + WEIGHT_FILES)}")


def load_weights(directory: str | Path, keep=lambda name: True) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint in `directory` whose name `keep` accepts, on the CPU."""
    return read_tensors(weight_files(directory), keep)


def read_tensors(files: Iterable[Path], keep=lambda name: True) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for path in files:
        tensors.update(_read_file(path, keep))
    return tensors


def _read_file(path: Path, keep) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    try:
        if path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt", device="cpu") as handle:
                return {name: handle.get_tensor(name) for name in handle.keys() if keep(name)}  # noqa: SIM118 (not a dict)
        # weights_only: a pickled checkpoint runs no code; mmap: shards are not copied twice.
        state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
        return {name: tensor for name, tensor in state.items() if keep(name)}
    except (OSError, RuntimeError, ValueError) as error:
        raise ModelLoadError(f"cannot read the weights in '{path}': {error}") from error
