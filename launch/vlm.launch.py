"""Start the nanovlm node.

    ros2 launch nanovlm vlm.launch.py image_topic:=/camera/image_raw \
        model:=/models/llava-1.5-7b-hf prompt:="Is the path clear?" rate:=2.0
    ros2 launch nanovlm vlm.launch.py cameras:=front,rear     # front/image, rear/image, ...
    ros2 launch nanovlm vlm.launch.py lifecycle:=true         # a managed node, unconfigured

Launch arguments left empty keep the value from params_file (config/vlm.yaml by default).
"""

import os

from ament_index_python.packages import get_package_share_directory
from launch.actions import DeclareLaunchArgument, OpaqueFunction, SetEnvironmentVariable
from launch_ros.actions import LifecycleNode, Node

from launch import LaunchDescription

SHARE = get_package_share_directory("nanovlm")

# launch argument -> node parameter it overrides when not empty
OVERRIDES = {
    "model": "model.path",
    "prompt": "prompt",
    "rate": "rate",
}


def node_with_overrides(context):
    config = context.launch_configurations
    overrides = {}
    for argument, parameter in OVERRIDES.items():
        value = config[argument]
        if value:
            overrides[parameter] = float(value) if parameter == "rate" else value
    cameras = [name.strip() for name in config["cameras"].split(",") if name.strip()]
    if cameras:
        overrides["cameras"] = cameras
    # image_topic names the one unnamed camera's topic; named cameras use <namespace>/<name>/image.
    remappings = (
        []
        if cameras
        else [("image", config["image_topic"]), ("image/compressed", config["image_topic"] + "/compressed")]
    )
    managed = config["lifecycle"].lower() in ("true", "1", "yes")
    # A managed node starts unconfigured: `ros2 lifecycle set <node> configure`, then `activate`
    # (or a lifecycle manager such as nav2's) brings it up.
    node_type = LifecycleNode if managed else Node
    return [
        node_type(
            package="nanovlm",
            executable="vlm_lifecycle_node" if managed else "vlm_node",
            name="nanovlm",
            namespace=config["namespace"],
            output="screen",
            parameters=[config["params_file"], overrides],
            remappings=remappings,
        )
    ]


def generate_launch_description():
    return LaunchDescription(
        [
            DeclareLaunchArgument(
                "model", default_value="", description="LLaVA model directory; empty = params_file's"
            ),
            DeclareLaunchArgument(
                "image_topic", default_value="/camera/image_raw", description="Camera topic (sensor_msgs/Image)"
            ),
            DeclareLaunchArgument(
                "prompt", default_value="", description="Question asked about each frame; empty = params_file's"
            ),
            DeclareLaunchArgument(
                "rate", default_value="", description="Frames answered per second at most; empty = params_file's"
            ),
            DeclareLaunchArgument(
                "cameras",
                default_value="",
                description="Camera names, comma-separated (front,rear): topics <name>/image, <name>/answer, ...; "
                "empty = params_file's (one unnamed camera on image_topic)",
            ),
            DeclareLaunchArgument(
                "lifecycle",
                default_value="false",
                description="true = a managed (lifecycle) node: configure loads the model, activate serves",
            ),
            DeclareLaunchArgument("namespace", default_value="", description="Namespace of the node"),
            DeclareLaunchArgument(
                "params_file",
                default_value=os.path.join(SHARE, "config", "vlm.yaml"),
                description="Node parameters (YAML)",
            ),
            DeclareLaunchArgument(
                "fastdds_profile",
                default_value=os.path.join(SHARE, "config", "fastdds_large_images.xml"),
                description="Fast DDS profile with buffers for full-size frames; empty = Fast DDS defaults",
            ),
            OpaqueFunction(function=set_fastdds_profile),
            OpaqueFunction(function=node_with_overrides),
        ]
    )


def set_fastdds_profile(context):
    profile = context.launch_configurations["fastdds_profile"]
    # Humble's and Jazzy's Fast DDS 2 reads only the old name; Kilted's Fast DDS 3 warns about it.
    old_name = os.environ.get("ROS_DISTRO") in ("humble", "jazzy")
    variable = "FASTRTPS_DEFAULT_PROFILES_FILE" if old_name else "FASTDDS_DEFAULT_PROFILES_FILE"
    return [SetEnvironmentVariable(variable, profile)] if profile else []
