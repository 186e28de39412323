"""Shared fixtures. Every test run gets its own ROS domain, kept on this machine, and its own
NANOVLM_HOME, so parallel runs and other ROS systems on the host cannot interfere."""

from __future__ import annotations

import os
import sys
from importlib import metadata
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

# Set before anything initialises rclpy, in this process and (inherited) in the node processes.
os.environ["ROS_DOMAIN_ID"] = str(100 + os.getpid() % 100)
os.environ["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"
os.environ["FASTDDS_DEFAULT_PROFILES_FILE"] = str(REPO / "config" / "fastdds_large_images.xml")
os.environ["PYTHONUNBUFFERED"] = "1"


def _fast_dds_2() -> bool:
    """Humble's and Jazzy's Fast DDS 2 reads its profile from FASTRTPS_DEFAULT_PROFILES_FILE only
    (Kilted's Fast DDS 3 reads FASTDDS_DEFAULT_PROFILES_FILE and warns about the old name)."""
    try:
        return int(metadata.version("ros-rclpy").split(".")[0]) < 8  # the PyPI wheels: Jazzy is rclpy 7
    except metadata.PackageNotFoundError:
        return os.environ.get("ROS_DISTRO") in ("humble", "jazzy")  # a system install


if _fast_dds_2():
    os.environ["FASTRTPS_DEFAULT_PROFILES_FILE"] = os.environ["FASTDDS_DEFAULT_PROFILES_FILE"]


@pytest.fixture(scope="session", autouse=True)
def nanovlm_home(tmp_path_factory):
    home = tmp_path_factory.mktemp("nanovlm_home")
    os.environ["NANOVLM_HOME"] = str(home)
    return home


@pytest.fixture(scope="session")
def tiny_llava(tmp_path_factory) -> Path:
    from ros2_nanovlm.engine.tiny import build_tiny_llava

    return build_tiny_llava(tmp_path_factory.mktemp("models") / "tiny-llava")


@pytest.fixture(scope="session")
def tiny_llava_next(tmp_path_factory) -> Path:
    from ros2_nanovlm.engine.tiny import build_tiny_llava

    return build_tiny_llava(tmp_path_factory.mktemp("models") / "tiny-llava-next", llava_next=True)


@pytest.fixture(scope="session")
def tiny_llava_stablelm(tmp_path_factory) -> Path:
    """LLaVA with a StableLM language model (the Obsidian-3B layout)."""
    from ros2_nanovlm.engine.tiny import build_tiny_llava

    return build_tiny_llava(tmp_path_factory.mktemp("models") / "tiny-llava-stablelm", text_model="stablelm")


@pytest.fixture(scope="session")
def photos():
    """Real photographs as RGB uint8 frames, 320 px wide (name -> frame)."""
    from ros2_nanovlm.camera_player import load_photo

    directory = REPO / "data" / "images"
    return {path.stem: load_photo(path, 320) for path in sorted(directory.glob("*.jpg"))}


@pytest.fixture(scope="session")
def demo_model(tmp_path_factory) -> Path:
    """The embedded demo VLM, assembled from the installed weight packages (about 20 s)."""
    from ros2_nanovlm.engine.demo_model.build import build_demo_model

    return build_demo_model(tmp_path_factory.mktemp("models") / "nanovlm-demo")
