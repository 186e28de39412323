"""The README's reference tables against the code: the parameters against their specs, and the
topics, services, actions and diagnostics keys against what a running node (its own process,
real ROS 2) actually offers. A parameter, topic or service changed without the README fails here."""

from __future__ import annotations

import json

import pytest
from rclpy.action import get_action_server_names_and_types_by_node
from ros_harness import REPO, NodeProcess, connected_client

from ros2_nanovlm.ros import parameters

NAMESPACE = "/readme"


def reference_table(marker: str) -> list[list[str]]:
    """Rows (cells, backticks removed) of the table after `<!-- reference: marker -->`."""
    text = (REPO / "README.md").read_text()
    start = text.index(f"<!-- reference: {marker} -->")
    rows = []
    for line in text[start:].splitlines()[1:]:
        if not line.startswith("|"):
            if rows:
                break
            continue
        cells = [cell.strip().strip("`") for cell in line.strip("|").split("|")]
        if set(cells[0]) <= {"-"}:
            continue
        rows.append(cells)
    return rows[1:]  # without the heading row


def readme_default(value) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return json.dumps(value)
    if value == "":
        return '""'
    return str(value)


def test_parameter_table_matches_the_specs():
    rows = {row[0]: row for row in reference_table("parameters")}
    assert list(rows) == [spec.name for spec in parameters.SPECS]
    for spec in parameters.SPECS:
        _, default, run_time, meaning = rows[spec.name]
        assert default == readme_default(spec.default), spec.name
        assert (run_time == "read-only") == spec.read_only, spec.name
        assert meaning


@pytest.fixture(scope="module")
def node(tmp_path_factory, tiny_llava):
    log = tmp_path_factory.mktemp("logs") / "node.log"
    process = NodeProcess(NAMESPACE, log, f"model.path:={tiny_llava}", "subscribe_compressed:=true")
    with connected_client(process) as client:
        yield client


def absolute(name: str) -> str:
    return name if name.startswith("/") else f"{NAMESPACE}/{name}"


def test_topic_table_matches_the_running_node(node):
    client = node
    documented = {"in": set(), "out": set()}
    for name, message_type, direction, _ in reference_table("topics"):
        documented[direction].add((absolute(name), message_type))

    def offered():
        def ours(entries):
            return {
                (name, types[0])
                for name, types in entries
                if "/_action/" not in name and name not in ("/rosout", "/parameter_events")
            }

        graph = client.node
        return {
            "in": ours(graph.get_subscriber_names_and_types_by_node("nanovlm", NAMESPACE)),
            "out": ours(graph.get_publisher_names_and_types_by_node("nanovlm", NAMESPACE)),
        }

    # The graph fills in as discovery runs: wait until it stops differing, then compare.
    client.spin_until(lambda: offered() == documented)
    assert offered() == documented


def test_service_and_action_table_matches_the_running_node(node):
    client = node
    rows = reference_table("services and actions")
    documented_services = {(absolute(name), kind) for name, kind, _ in rows if "/srv/" in kind}
    documented_actions = {(absolute(name), kind) for name, kind, _ in rows if "/action/" in kind}

    def services():
        entries = client.node.get_service_names_and_types_by_node("nanovlm", NAMESPACE)
        # not the services every node has under its own name (parameters, type descriptions)
        # nor the action's own services
        return {(n, t[0]) for n, t in entries if "/_action/" not in n and not n.startswith(f"{NAMESPACE}/nanovlm/")}

    def actions():
        entries = get_action_server_names_and_types_by_node(client.node, "nanovlm", NAMESPACE)
        return {(n, t[0]) for n, t in entries}

    client.spin_until(lambda: services() == documented_services and actions() == documented_actions)
    assert services() == documented_services
    assert actions() == documented_actions


def test_diagnostics_table_matches_the_published_keys(node):
    client = node
    documented = [row[0] for row in reference_table("diagnostics")]
    _, values = client.wait_for_status(lambda status, values: True)
    cuda_only = {"GPU memory (MB)"}
    assert set(values) == set(documented) - cuda_only  # this node runs on the CPU
