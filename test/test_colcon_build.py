"""The package builds with colcon as in a ROS 2 workspace, and the installed node runs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from ros_harness import NodeProcess, connected_client

REPO = Path(__file__).resolve().parent.parent
PYTHON = f"python{sys.version_info.major}.{sys.version_info.minor}"


@pytest.fixture(scope="module")
def colcon_install(tmp_path_factory):
    workspace = tmp_path_factory.mktemp("ws")
    env = dict(os.environ)
    env.setdefault("AMENT_PREFIX_PATH", sys.prefix)  # the ROS wheels install a prefix in the venv
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "colcon",
            "build",
            "--base-paths",
            str(REPO),
            "--build-base",
            str(workspace / "build"),
            "--install-base",
            str(workspace / "install"),
            "--cmake-args",
            "-DBUILD_TESTING=OFF",
        ],
        cwd=workspace,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return workspace / "install" / "nanovlm"


def test_colcon_installs_interfaces_node_launch_and_config(colcon_install):
    site = colcon_install / "lib" / PYTHON / "site-packages"
    for relative in [
        "lib/nanovlm/vlm_node",
        "lib/nanovlm/vlm_lifecycle_node",
        "lib/nanovlm/camera_player",
        "share/nanovlm/launch/vlm.launch.py",
        "share/nanovlm/config/vlm.yaml",
        "share/nanovlm/config/fastdds_large_images.xml",
        "share/nanovlm/data/images/dogs.jpg",
        "share/nanovlm/msg/VLMResult.msg",
        "share/nanovlm/srv/Query.srv",
        "share/nanovlm/action/Ask.action",
        "share/ament_index/resource_index/packages/nanovlm",
    ]:
        assert (colcon_install / relative).exists(), relative
    assert (site / "nanovlm" / "msg" / "_vlm_result.py").is_file()
    assert (site / "nanovlm" / "action" / "_ask.py").is_file()
    assert (site / "ros2_nanovlm" / "ros" / "node.py").is_file()
    assert os.access(colcon_install / "lib" / "nanovlm" / "vlm_node", os.X_OK)


def test_installed_node_answers_a_query(colcon_install, tiny_llava, tmp_path, photos, monkeypatch):
    """`ros2 run nanovlm vlm_node` as it runs from the install space (what launch_ros starts)."""
    site = colcon_install / "lib" / PYTHON / "site-packages"
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv(
        "LD_LIBRARY_PATH", os.pathsep.join([str(colcon_install / "lib"), os.environ.get("LD_LIBRARY_PATH", "")])
    )
    monkeypatch.setenv("AMENT_PREFIX_PATH", os.pathsep.join([str(colcon_install), sys.prefix]))
    executable = [sys.executable, str(colcon_install / "lib" / "nanovlm" / "vlm_node")]
    process = NodeProcess("/installed", tmp_path / "node.log", f"model.path:={tiny_llava}", command=executable)
    with connected_client(process) as client:
        from ros2_nanovlm.ros.image_conversion import rgb_to_image_msg

        response = client.query("What is in the image?", rgb_to_image_msg(photos["dogs"]))
        assert response.success, response.error
    assert str(site / "ros2_nanovlm") in process.log()  # the installed copy ran, not the checkout
