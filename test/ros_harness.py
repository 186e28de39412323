"""Process-level test harness: the node runs in its own process, started as the launch file
starts it (same params file); the test talks to it over real ROS 2 from a private rclpy context."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import time
from pathlib import Path

import rclpy
from diagnostic_msgs.msg import DiagnosticArray
from rclpy.action import ActionClient
from rclpy.executors import SingleThreadedExecutor
from rclpy.parameter import Parameter, parameter_value_to_python
from rclpy.parameter_client import AsyncParameterClient
from rclpy.qos import qos_profile_sensor_data
from sensor_msgs.msg import CompressedImage, Image
from std_msgs.msg import String

from nanovlm.action import Ask
from nanovlm.msg import VLMResult
from nanovlm.srv import Query

REPO = Path(__file__).resolve().parent.parent
PARAMS_FILE = REPO / "config" / "vlm.yaml"
TIMEOUT = 60.0  # bound on every wait; a healthy run never reaches it


class NodeProcess:
    def __init__(self, namespace: str, log_path: Path, *overrides: str, command: list[str] | None = None):
        self.namespace = namespace
        self.log_path = log_path
        command = (command or [sys.executable, "-m", "ros2_nanovlm.ros.node"]) + [
            "--ros-args",
            "--params-file", str(PARAMS_FILE),
            "-r", f"__ns:={namespace}",
        ]  # fmt: skip
        for override in overrides:
            command += ["-p", override]
        self._log = open(log_path, "w")  # noqa: SIM115 - open for the process's life, closed in stop()
        self.process = subprocess.Popen(command, stdout=self._log, stderr=subprocess.STDOUT)

    def log(self) -> str:
        return self.log_path.read_text()

    def stop(self) -> int:
        """SIGINT, as Ctrl-C or `ros2 launch` does; returns the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
        return self.process.returncode


class Client:
    """The test's side: publishers, subscriptions, service and parameter clients of one node."""

    def __init__(self, namespace: str):
        self.namespace = namespace
        self.context = rclpy.Context()
        rclpy.init(context=self.context)
        self.node = rclpy.create_node("test_client", namespace=namespace, context=self.context)
        self.executor = SingleThreadedExecutor(context=self.context)
        self.executor.add_node(self.node)
        self.images = self.node.create_publisher(Image, "image", qos_profile_sensor_data)
        self.compressed = self.node.create_publisher(CompressedImage, "image/compressed", qos_profile_sensor_data)
        self.results: list[VLMResult] = []
        self.answers: list[str] = []
        self.result_json: list[str] = []
        self.node.create_subscription(VLMResult, "result", self.results.append, 100)
        self.node.create_subscription(String, "answer", lambda m: self.answers.append(m.data), 100)
        self.node.create_subscription(String, "result_json", lambda m: self.result_json.append(m.data), 100)
        self.query_client = self.node.create_client(Query, "query")
        self.ask_client = ActionClient(self.node, Ask, "ask")
        self.parameters = AsyncParameterClient(self.node, f"{namespace}/nanovlm")
        self.diagnostics: list[DiagnosticArray] = []
        self.node.create_subscription(DiagnosticArray, "/diagnostics", self.diagnostics.append, 100)

    def node_status(self, name: str = "nanovlm: vlm"):
        """The node's newest DiagnosticStatus called `name`, with its values as a dict; None
        before the first."""
        for array in reversed(self.diagnostics):
            for status in array.status:
                if status.name == name:
                    return status, {kv.key: kv.value for kv in status.values}
        return None

    def wait_for_status(self, predicate, name: str = "nanovlm: vlm"):
        """Spin until a /diagnostics status `name` satisfies predicate(status, values)."""
        found = []

        def check():
            latest = self.node_status(name)
            if latest is not None and predicate(*latest):
                found[:] = [latest]
                return True
            return False

        assert self.spin_until(check), f"no diagnostics matched; last: {self.node_status(name)}"
        return found[0]

    def spin_until(self, condition, timeout: float = TIMEOUT) -> bool:
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                return False
            self.executor.spin_once(timeout_sec=0.05)
        return True

    def wait_ready(self, camera_topic: str | None = "image") -> None:
        """Wait for the node's service, parameters, its name in the graph and (unless None: a
        lifecycle node before activation) its camera subscription."""
        assert self.query_client.wait_for_service(timeout_sec=TIMEOUT), "query service never appeared"
        assert self.parameters.wait_for_services(timeout_sec=TIMEOUT)
        # A service is ready as soon as its endpoints are discovered; the node's name reaches the
        # graph later (ros_discovery_info), and until then the *_by_node graph queries raise
        # NodeNameNonExistentError (seen on Jazzy under load).
        node = ("nanovlm", self.namespace)
        assert self.spin_until(lambda: node in self.node.get_node_names_and_namespaces()), "node not in the graph"
        if camera_topic is not None:
            assert self.spin_until(lambda: self.node.count_subscribers(camera_topic) > 0)

    def _await(self, future, timeout: float = TIMEOUT):
        self.executor.spin_until_future_complete(future, timeout_sec=timeout)
        assert future.done(), "no reply in time"
        return future.result()

    def query(
        self, prompt: str, image: Image | None = None, max_new_tokens: int = 0, json_schema: str = ""
    ) -> Query.Response:
        request = Query.Request(prompt=prompt, max_new_tokens=max_new_tokens, json_schema=json_schema)
        if image is not None:
            request.image = image
        return self._await(self.query_client.call_async(request))

    def ask(self, goal: Ask.Goal, on_feedback=None, cancel_when=None):
        """Send an Ask goal; returns (final status, result). `cancel_when(feedbacks)` is checked
        after each feedback: True cancels the goal."""
        feedbacks = []
        goal_handle_future = None

        def feedback(message):
            feedbacks.append(message.feedback)
            if on_feedback:
                on_feedback(message.feedback)
            if cancel_when is not None and cancel_when(feedbacks) and not cancelled:
                cancelled.append(goal_handle_future.result().cancel_goal_async())

        cancelled = []
        assert self.ask_client.wait_for_server(timeout_sec=TIMEOUT)
        goal_handle_future = self.ask_client.send_goal_async(goal, feedback_callback=feedback)
        goal_handle = self._await(goal_handle_future)
        assert goal_handle.accepted
        response = self._await(goal_handle.get_result_async())
        return response.status, response.result, feedbacks

    def set_parameter(self, name: str, value):
        """Returns rcl_interfaces/SetParametersResult."""
        response = self._await(self.parameters.set_parameters([Parameter(name, value=value)]))
        return response.results[0]

    def get_parameter(self, name: str):
        response = self._await(self.parameters.get_parameters([name]))
        return parameter_value_to_python(response.values[0])

    def publish(self, msg) -> None:
        (self.compressed if isinstance(msg, CompressedImage) else self.images).publish(msg)

    def wait_for_result(self, predicate, timeout: float = TIMEOUT) -> VLMResult:
        found = []

        def check():
            found[:] = [r for r in self.results if predicate(r)]
            return bool(found)

        assert self.spin_until(check, timeout), "no matching result arrived"
        return found[0]

    def close(self) -> None:
        self.executor.shutdown()
        self.node.destroy_node()
        rclpy.try_shutdown(context=self.context)


@contextlib.contextmanager
def connected_client(process: NodeProcess, camera_topic: str | None = "image"):
    """A Client of the node in `process`, ready to talk; on leaving, the node must stop
    cleanly on SIGINT (exit code 0), whatever the test did."""
    client = Client(process.namespace)
    try:
        client.wait_ready(camera_topic)
        yield client
    finally:
        client.close()
        exit_code = process.stop()
        assert exit_code == 0, f"node exited with {exit_code}:\n{process.log()[-3000:]}"
