"""launch/vlm.launch.py, checked without launch_ros (not installable from PyPI).

The launch file is imported against small recording stand-ins for launch, launch_ros and
ament_index_python; the tests check what it would start: the installed executable, the params
file the node tests use, launch arguments that map onto real node parameters, the remapping.
The node itself is exercised with the same params file in test_node.py.
"""

from __future__ import annotations

import importlib.util
import os
import re
import sys
import types
from pathlib import Path

import pytest
import yaml

from ros2_nanovlm.ros import parameters

REPO = Path(__file__).resolve().parent.parent


class Recorded:
    def __init__(self, *args, **kwargs):
        self.args, self.kwargs = args, kwargs


class DeclareLaunchArgument(Recorded):
    @property
    def name(self):
        return self.args[0]


class OpaqueFunction(Recorded):
    pass


class SetEnvironmentVariable(Recorded):
    pass


class Node(Recorded):
    pass


class LifecycleNode(Recorded):
    pass


class LaunchDescription(Recorded):
    @property
    def entities(self):
        return self.args[0]


@pytest.fixture
def launch_module(monkeypatch):
    fakes = {
        "launch": types.SimpleNamespace(LaunchDescription=LaunchDescription),
        "launch.actions": types.SimpleNamespace(
            DeclareLaunchArgument=DeclareLaunchArgument,
            OpaqueFunction=OpaqueFunction,
            SetEnvironmentVariable=SetEnvironmentVariable,
        ),
        "launch_ros": types.SimpleNamespace(),
        "launch_ros.actions": types.SimpleNamespace(Node=Node, LifecycleNode=LifecycleNode),
        # share/nanovlm of an install has the same layout as the source tree for these files.
        "ament_index_python.packages": types.SimpleNamespace(get_package_share_directory=lambda name: str(REPO)),
    }
    for name, module in fakes.items():
        monkeypatch.setitem(sys.modules, name, module)
    spec = importlib.util.spec_from_file_location("vlm_launch", REPO / "launch" / "vlm.launch.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def start(launch_module, **arguments):
    description = launch_module.generate_launch_description()
    declared = {e.name: e.kwargs["default_value"] for e in description.entities if isinstance(e, DeclareLaunchArgument)}
    context = types.SimpleNamespace(launch_configurations={**declared, **arguments})
    actions = []
    for entity in description.entities:
        if isinstance(entity, OpaqueFunction):
            actions += entity.kwargs["function"](context)
    return declared, actions


def test_declares_the_documented_arguments(launch_module):
    declared, _ = start(launch_module)
    assert set(declared) == {
        "model",
        "image_topic",
        "prompt",
        "rate",
        "cameras",
        "lifecycle",
        "namespace",
        "params_file",
        "fastdds_profile",
    }
    assert Path(declared["params_file"]) == REPO / "config" / "vlm.yaml"
    assert Path(declared["fastdds_profile"]).is_file()


def test_defaults_start_the_installed_node_with_the_params_file(launch_module):
    _, actions = start(launch_module)
    (node,) = [a for a in actions if isinstance(a, Node)]
    assert node.kwargs["package"] == "nanovlm"
    assert node.kwargs["executable"] == "vlm_node"
    installed = re.search(
        r"install\(PROGRAMS ([^)]*)DESTINATION lib/\$\{PROJECT_NAME\}", (REPO / "CMakeLists.txt").read_text()
    )
    assert "scripts/vlm_node" in installed.group(1).split()
    params_file, overrides = node.kwargs["parameters"]
    assert Path(params_file) == REPO / "config" / "vlm.yaml"
    assert overrides == {}  # empty arguments leave the params file's values alone
    assert ("image", "/camera/image_raw") in node.kwargs["remappings"]
    (env,) = [a for a in actions if isinstance(a, SetEnvironmentVariable)]
    jazzy_or_older = os.environ.get("ROS_DISTRO") in ("humble", "jazzy")  # Fast DDS 2 reads the old name
    assert env.args[0] == ("FASTRTPS_DEFAULT_PROFILES_FILE" if jazzy_or_older else "FASTDDS_DEFAULT_PROFILES_FILE")


def test_arguments_override_real_node_parameters(launch_module):
    _, actions = start(
        launch_module,
        model="/models/llava",
        prompt="Is the path clear?",
        rate="2.5",
        image_topic="/front/image_raw",
        namespace="robot1",
        fastdds_profile="",
    )
    (node,) = [a for a in actions if isinstance(a, Node)]
    overrides = node.kwargs["parameters"][1]
    assert overrides == {"model.path": "/models/llava", "prompt": "Is the path clear?", "rate": 2.5}
    assert set(overrides) <= set(parameters.BY_NAME)
    assert node.kwargs["namespace"] == "robot1"
    assert ("image", "/front/image_raw") in node.kwargs["remappings"]
    assert ("image/compressed", "/front/image_raw/compressed") in node.kwargs["remappings"]
    assert not [a for a in actions if isinstance(a, SetEnvironmentVariable)]


def test_cameras_and_lifecycle_arguments(launch_module):
    _, actions = start(launch_module, cameras="front, rear", lifecycle="true")
    (node,) = [a for a in actions if isinstance(a, LifecycleNode)]
    assert node.kwargs["executable"] == "vlm_lifecycle_node"
    installed = (REPO / "CMakeLists.txt").read_text()
    assert "scripts/vlm_lifecycle_node" in installed and (REPO / "scripts" / "vlm_lifecycle_node").is_file()
    overrides = node.kwargs["parameters"][1]
    assert overrides == {"cameras": ["front", "rear"]}
    assert parameters.check("cameras", overrides["cameras"], 100) == ""
    assert node.kwargs["remappings"] == []  # named cameras keep their own topics
    _, actions = start(launch_module, lifecycle="false")
    assert [a.kwargs["executable"] for a in actions if isinstance(a, Node)] == ["vlm_node"]


def test_params_file_sets_exactly_the_node_parameters_with_their_types():
    values = yaml.safe_load((REPO / "config" / "vlm.yaml").read_text())["/**"]["ros__parameters"]
    # A list with an empty default cannot be written in a params file (its type would be
    # unknown): such parameters are declared by type and documented there in a comment.
    optional = {spec.name for spec in parameters.SPECS if spec.string_array}
    assert set(values) == set(parameters.BY_NAME) - optional
    text = (REPO / "config" / "vlm.yaml").read_text()
    for name in optional:
        assert f"# {name}:" in text, f"{name} is not documented in vlm.yaml"
    for name, value in values.items():
        default = parameters.BY_NAME[name].default
        assert type(value) is type(default), f"{name}: {value!r} in vlm.yaml, default {default!r}"
