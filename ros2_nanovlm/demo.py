"""The first-run demo: photographs played as a camera stream into the nanovlm node, answers
printed as they arrive.

It starts the node in its own process, as `ros2 launch nanovlm vlm.launch.py` would (same params
file), plays the bundled photographs on its `image` topic and listens to `result`.

    nanovlm-demo [--frames 9] [--model DIR] [--prompt "..."] [--encoding bgr8]
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from importlib import metadata

import rclpy
from rclpy.executors import SingleThreadedExecutor
from rclpy.node import Node

from .default_model import DEFAULT_MODEL_DESCRIPTION, ensure_default_model
from .resources import bundled_photos_dir, default_params_file, list_photos, package_file

NAMESPACE = "/nanovlm_demo"


def parse_args(argv):
    parser = argparse.ArgumentParser(description="Camera frames in, answers out.")
    parser.add_argument("--model", default="", help="LLaVA directory (default: the embedded model)")
    parser.add_argument("--photos", default=str(bundled_photos_dir()), help="photo directory")
    parser.add_argument("--frames", type=int, default=9, help="answers to wait for (default 9)")
    parser.add_argument("--camera-rate", type=float, default=2.0, help="frames per second sent")
    parser.add_argument("--rate", type=float, default=0.0, help="node rate limit (0 = none)")
    parser.add_argument("--prompt", default="What is in the image?")
    parser.add_argument("--encoding", default="rgb8", help="rgb8, bgr8, rgba8, bgra8 or mono8")
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--timeout", type=float, default=300.0, help="give up after this many s")
    return parser.parse_args(argv)


def start_node(args, model_path: str) -> subprocess.Popen:
    command = [
        sys.executable, "-m", "ros2_nanovlm.ros.node",
        "--ros-args",
        "--params-file", str(default_params_file()),
        "-r", f"__ns:={NAMESPACE}",
        "-p", f"model.path:={model_path}",
        "-p", f"rate:={args.rate}",
        "-p", f"prompt:={args.prompt}",
        "-p", f"max_new_tokens:={args.max_new_tokens}",
    ]  # fmt: skip
    return subprocess.Popen(command)


def _fast_dds_2() -> bool:
    try:
        return int(metadata.version("ros-rclpy").split(".")[0]) < 8  # the PyPI wheels: Jazzy is rclpy 7
    except metadata.PackageNotFoundError:
        return os.environ.get("ROS_DISTRO") in ("humble", "jazzy")  # a system install


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
    # Full-size frames need larger DDS buffers than Fast DDS's defaults (see the profile's comment).
    os.environ.setdefault("FASTDDS_DEFAULT_PROFILES_FILE", str(package_file("config", "fastdds_large_images.xml")))
    if _fast_dds_2():  # Humble and Jazzy: Fast DDS 2 reads only the old name (Kilted's warns about it)
        os.environ.setdefault("FASTRTPS_DEFAULT_PROFILES_FILE", os.environ["FASTDDS_DEFAULT_PROFILES_FILE"])
    model_path = args.model
    if not model_path:
        print(f"Building/loading the embedded default model: {DEFAULT_MODEL_DESCRIPTION}.", flush=True)
        model_path = str(ensure_default_model())
        print(
            "NOTE: it is tiny (two CPU-sized networks from PyPI packages joined by a projector): it "
            "names what is in a photo and little else.\n"
            "      Pass --model /path/to/llava-1.5-7b-hf for a general-purpose VLM.",
            flush=True,
        )
    node_process = start_node(args, model_path)
    rclpy.init()
    from nanovlm.msg import VLMResult  # after init: the ROS libraries are in place
    from nanovlm.srv import Query

    from .camera_player import CameraPlayer, load_photo
    from .ros.image_conversion import rgb_to_image_msg

    executor = SingleThreadedExecutor()
    listener = Node("demo_listener", namespace=NAMESPACE)
    executor.add_node(listener)

    # A query waits behind the model load on the node's worker: its answer says the node is ready,
    # so the camera starts then and no photo is dropped while the model loads.
    query = listener.create_client(Query, "query")
    request = Query.Request(prompt=args.prompt)
    photos = list_photos(args.photos)
    request.image = rgb_to_image_msg(load_photo(photos[0], 640))
    if not query.wait_for_service(timeout_sec=60.0):
        print("the node's query service did not appear", file=sys.stderr)
        node_process.send_signal(signal.SIGINT)
        return 1
    future = query.call_async(request)
    executor.spin_until_future_complete(future, timeout_sec=args.timeout)
    reply = future.result()
    if reply is None or not reply.success:
        print(f"query failed: {reply.error if reply else 'no reply'}", file=sys.stderr)
        node_process.send_signal(signal.SIGINT)
        return 1
    print(f"[query service] {photos[0].name:<12} -> {reply.answer!r}", flush=True)

    camera = CameraPlayer(
        namespace=NAMESPACE,
        parameter_overrides=[
            rclpy.parameter.Parameter("photos", value=args.photos),
            rclpy.parameter.Parameter("rate", value=args.camera_rate),
            rclpy.parameter.Parameter("encoding", value=args.encoding),
        ],
    )
    results: list = []

    def on_result(msg) -> None:
        results.append(msg)
        photo = camera.sent_stamps.get((msg.header.stamp.sec, msg.header.stamp.nanosec), "?")
        print(
            f"[{len(results)}/{args.frames}] {photo:<12} -> {msg.answer!r}\n"
            f"      vision {msg.vision_ms:.1f} ms, prefill {msg.prefill_ms:.1f} ms "
            f"({msg.prompt_tokens - msg.reused_tokens} of {msg.prompt_tokens} tokens), "
            f"decode {msg.decode_ms:.1f} ms ({msg.generated_tokens} tokens), "
            f"total {msg.total_ms:.1f} ms; frames dropped so far: {msg.frames_dropped}",
            flush=True,
        )

    listener.create_subscription(VLMResult, "result", on_result, 10)
    executor.add_node(camera)
    deadline = time.monotonic() + args.timeout
    status = 0
    try:
        while len(results) < args.frames:
            if node_process.poll() is not None:
                print(f"the node exited with code {node_process.returncode}", file=sys.stderr)
                return 1
            if time.monotonic() > deadline:
                print(f"only {len(results)} answers within {args.timeout} s", file=sys.stderr)
                status = 1
                break
            executor.spin_once(timeout_sec=0.1)
    except KeyboardInterrupt:
        pass
    finally:
        node_process.send_signal(signal.SIGINT)
        try:
            node_process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            node_process.kill()
        executor.shutdown()
        camera.destroy_node()
        listener.destroy_node()
        rclpy.try_shutdown()
    if results:
        mean_total = sum(r.total_ms for r in results) / len(results)
        print(
            f"{len(results)} answers from '{results[-1].model}'; {camera.sent} frames sent, "
            f"{results[-1].frames_dropped} dropped by the node; mean answer time {mean_total:.1f} ms"
        )
    return status


if __name__ == "__main__":
    sys.exit(main())
