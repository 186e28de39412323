"""nanovlm-ask: one question to the running node's `query` service, from a shell.

    nanovlm-ask "is the door open?"                           the latest camera frame
    nanovlm-ask "is the door open?" --yes-no && open_door     exit 0 = yes, 1 = no, 2 = unclear/error
    nanovlm-ask "what is on the table?" --image table.jpg --node /robot/nanovlm
    nanovlm-ask "read the sign" --json-schema sign.json --json --timeout 10

Made for scripts (a behavior tree's condition written in shell, a test rig): the answer alone on
stdout, every failure on stderr with its reason, and an exit code to branch on. Exit codes:
0 answered (with --yes-no: yes), 1 no (--yes-no only), 2 anything else: bad arguments, an
unreadable image or schema file, no service within --timeout, no answer within --timeout, the
node's error, an unclear yes/no answer, Ctrl-C. A script can therefore treat every status but 0
and 1 as "could not find out", never as an answer.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

EXIT_YES = 0  # also plain success
EXIT_NO = 1
EXIT_ERROR = 2  # argparse's own status for bad arguments, so every failure reads the same

PROG = "nanovlm-ask"
DEFAULT_SERVICE = "query"  # relative: resolves in this tool's namespace (/ unless --ros-args -r __ns:=...)
DEFAULT_TIMEOUT_S = 60.0  # the node's query_timeout default: a query may wait behind a model load
QUERY_SERVICE_TYPE = "nanovlm/srv/Query"

# --yes-no asks for JSON valid for this schema instead of parsing free text. The node's
# constrained decoding (README "JSON that always parses") lets the model write nothing but
# {"answer":"yes"} or {"answer":"no"}: no "Yes, the door is open." to parse, no "Probably.", no
# rambling that runs out of tokens. So the exit code comes from a JSON field, never from
# guessing at prose, and an answer that is not one of the two can only mean a fault (exit 2).
YES_NO_SCHEMA = {
    "type": "object",
    "properties": {"answer": {"type": "string", "enum": ["yes", "no"]}},
    "required": ["answer"],
    "additionalProperties": False,
}
# The node's budget guard forces the shortest way to close the JSON once the tokens left minus
# those still needed fall to its margin (12, engine/structured.py); the choice between "yes" and
# "no" would then be the guard's, not the model's. {"answer":"yes"} takes 5-8 tokens on
# Llama-family and SmolLM2 tokenizers and 16 on a byte-level one, so 64 leaves the model free;
# below 32 the guard could decide, so such a budget is refused.
YES_NO_MAX_NEW_TOKENS = 64
YES_NO_MIN_NEW_TOKENS = 32
ANY_JSON_OBJECT = {"type": "object"}  # --json without a schema


class AskError(Exception):
    """Why there is no answer; printed on stderr as it is, for the operator."""


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Ask the nanovlm node one question about the latest camera frame or an image file.",
        epilog="Exit status: 0 answered (--yes-no: yes), 1 no (--yes-no), 2 error or unclear answer. "
        "ROS arguments go after --ros-args (e.g. --ros-args -r __ns:=/robot).",
    )
    parser.add_argument("prompt", help="the question")
    parser.add_argument("--image", type=Path, metavar="FILE", help="ask about this image file instead of the camera")
    parser.add_argument("--camera", default="", help="which of the node's cameras (default: its first)")
    parser.add_argument(
        "--yes-no",
        action="store_true",
        help="answer yes or no (schema-constrained JSON); exit 0 for yes, 1 for no, 2 unclear or error",
    )
    parser.add_argument(
        "--json-schema",
        metavar="FILE_OR_JSON",
        help="answer with JSON valid for this JSON Schema: inline JSON text, or a file on this machine",
    )
    parser.add_argument(
        "--json", action="store_true", help="print the compact JSON answer (any JSON object if no schema)"
    )
    parser.add_argument(
        "--timeout",
        type=positive_float,
        default=DEFAULT_TIMEOUT_S,
        metavar="S",
        help=f"seconds for the whole call: finding the service and the answer (default {DEFAULT_TIMEOUT_S:g})",
    )
    where = parser.add_mutually_exclusive_group()
    where.add_argument(
        "--node", metavar="/NS/NAME", help="the node's full name, e.g. /robot/nanovlm (uses /robot/query)"
    )
    where.add_argument("--service", metavar="NAME", help=f"the query service's name (default: {DEFAULT_SERVICE})")
    parser.add_argument(
        "--max-new-tokens",
        type=positive_int,
        metavar="N",
        help=f"longest answer in tokens (default: the node's; {YES_NO_MAX_NEW_TOKENS} with --yes-no)",
    )
    args = parser.parse_args(argv)
    if args.yes_no and args.json_schema is not None:
        parser.error("--yes-no brings its own JSON schema; give --yes-no or --json-schema, not both")
    if args.yes_no and args.max_new_tokens is not None and args.max_new_tokens < YES_NO_MIN_NEW_TOKENS:
        parser.error(
            f"--max-new-tokens {args.max_new_tokens} is too small for --yes-no: below {YES_NO_MIN_NEW_TOKENS} "
            "the node's token budget guard, not the model, could pick the answer"
        )
    if args.node is not None and not node_namespace(args.node):
        parser.error(f"--node '{args.node}' is not a node name such as /robot/nanovlm")
    return args


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0 or value == float("inf"):  # `not >` also refuses nan
        raise argparse.ArgumentTypeError(f"must be a number of seconds above 0, got {text}")
    return value


def node_namespace(node: str) -> str:
    """The namespace of a node's full name ('/robot/nanovlm' -> '/robot'), '' when not a name.
    The node serves `query` relative to its namespace, not under its name (~/query), so the
    service of /robot/nanovlm is /robot/query."""
    name = node.strip().rstrip("/")
    if not name:
        return ""
    namespace, _, base = name.rpartition("/")
    if not base:
        return ""
    return "/" + namespace.strip("/") if namespace.strip("/") else "/"


def service_name(args: argparse.Namespace) -> str:
    if args.node is not None:
        return node_namespace(args.node).rstrip("/") + "/query"
    return args.service or DEFAULT_SERVICE


def schema_text(args: argparse.Namespace) -> str:
    """The request's json_schema: compact inline JSON, or '' for the node's own setting.

    A file is read here and sent inline, although the service also takes a path: the service
    reads a path on the node's machine, and the file a user names on this command line is on
    this one (they differ when the node runs on the robot)."""
    if args.yes_no:
        return json.dumps(YES_NO_SCHEMA, separators=(",", ":"))
    if args.json_schema is None:
        return json.dumps(ANY_JSON_OBJECT) if args.json else ""
    text = args.json_schema.strip()
    source = "--json-schema"
    if not text.startswith("{"):
        path = Path(text).expanduser()
        source = f"--json-schema file '{path}'"
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
            raise AskError(f"cannot read {source}: {reason}") from None
    try:
        schema = json.loads(text)
    except json.JSONDecodeError as error:
        raise AskError(f"{source} is not valid JSON: {error.msg} at line {error.lineno} column {error.colno}") from None
    # Whether the node can enforce it is the node's to say: its error comes back as the reply.
    return json.dumps(schema, separators=(",", ":"), ensure_ascii=False)


def build_request(args: argparse.Namespace):
    """The Query request; reads the image file first, so a bad file fails before any ROS."""
    from nanovlm.srv import Query

    request = Query.Request(prompt=args.prompt, camera=args.camera, json_schema=schema_text(args))
    if args.max_new_tokens is not None:
        request.max_new_tokens = args.max_new_tokens
    elif args.yes_no:
        request.max_new_tokens = YES_NO_MAX_NEW_TOKENS
    if args.image is not None:
        from ..ros.image_conversion import rgb_to_image_msg
        from .image_file import ImageError, read_image

        try:
            frame = read_image(args.image.expanduser())
        except ImageError as error:
            raise AskError(f"--image: {error}") from None
        request.image = rgb_to_image_msg(frame, "rgb8")
        request.image.header.frame_id = args.image.name
    return request


def call_service(request, service: str, timeout: float, ros_argv: list[str]):
    """The node's reply to `request`, or AskError. `timeout` bounds the whole call: discovery,
    the request and the answer. A private context, shut down on every path, so nothing is left
    behind when main() is called in a process that uses ROS itself."""
    import rclpy
    from rclpy.exceptions import InvalidServiceNameException
    from rclpy.executors import SingleThreadedExecutor

    from nanovlm.srv import Query

    deadline = time.monotonic() + timeout
    context = rclpy.Context()
    # A private context gets no rclpy signal handlers (Humble and later): Ctrl-C stays a
    # KeyboardInterrupt, which main() turns into exit 2.
    rclpy.init(args=ros_argv, context=context)
    node = executor = None
    try:
        # pid in the name: two scripts asking at once must not show up as one node twice.
        node = rclpy.create_node(
            f"nanovlm_ask_{os.getpid()}", context=context, enable_rosout=False, start_parameter_services=False
        )
        executor = SingleThreadedExecutor(context=context)
        executor.add_node(node)
        try:
            client = node.create_client(Query, service)
        except InvalidServiceNameException as error:
            raise AskError(str(error)) from None
        # wait_for_service polls the ROS graph (rclpy has no event for a server appearing).
        if not client.wait_for_service(timeout_sec=max(0.0, deadline - time.monotonic())):
            name = node.resolve_service_name(service)
            raise AskError(f"service '{name}' not available within {timeout:g} s{other_services(node)}")
        future = client.call_async(request)
        left = deadline - time.monotonic()
        if left > 0:
            executor.spin_until_future_complete(future, timeout_sec=left)
        if not future.done():
            client.remove_pending_request(future)
            raise AskError(f"no answer within {timeout:g} s")
        if future.exception() is not None:
            raise AskError(f"the call failed: {future.exception()!r}")
        return future.result()
    finally:
        if executor is not None:
            executor.shutdown()
        if node is not None:
            node.destroy_node()
        rclpy.try_shutdown(context=context)


def other_services(node) -> str:
    """A hint for the 'not available' message: the Query services that are there. Asked node by
    node, because the graph's plain service list also names services that only have clients
    (this tool's own client among them)."""
    found = set()
    for node_name, namespace in node.get_node_names_and_namespaces():
        try:
            services = node.get_service_names_and_types_by_node(node_name, namespace)
        except RuntimeError:  # NodeNameNonExistentError (an RCLError): the node left meanwhile
            continue
        found.update(name for name, types in services if QUERY_SERVICE_TYPE in types)
    found = sorted(found)
    if not found:
        return " (no nanovlm query service is visible in this ROS domain; is the node running?)"
    return f" (nanovlm query services seen: {', '.join(found)}; use --service or --node)"


def yes_no_status(response) -> tuple[int, str]:
    """Exit status and the word printed for a --yes-no reply. The schema allows only yes or no;
    anything else (a node that ignored the schema) is unclear, never a guess."""
    try:
        answer = json.loads(response.json).get("answer")
    except (json.JSONDecodeError, AttributeError):
        answer = None
    if answer == "yes":
        return EXIT_YES, answer
    if answer == "no":
        return EXIT_NO, answer
    raise AskError(f"unclear answer (neither yes nor no): {response.json or response.answer!r}")


def report(args: argparse.Namespace, response) -> int:
    """Print the reply's answer and return the exit status."""
    if not response.success:
        raise AskError(f"the node answered with an error: {response.error or '(no reason given)'}")
    if args.yes_no:
        status, word = yes_no_status(response)
        print(response.json if args.json else word, flush=True)
        return status
    if args.json:
        if not response.json:
            raise AskError(f"the node sent no JSON (answer: {response.answer!r})")
        print(response.json, flush=True)
    else:
        print(response.answer, flush=True)
    return EXIT_YES


def main(argv: list[str] | None = None) -> int:
    from rclpy.utilities import remove_ros_args

    argv = sys.argv[1:] if argv is None else list(argv)
    # argparse must not see the ROS arguments; rclpy.init gets them all (remaps, __ns).
    try:
        own_argv = remove_ros_args(argv)
    except RuntimeError as error:  # RCLInvalidROSArgsError: rcl's message names the argument
        print(f"{PROG}: bad ROS arguments: {error}", file=sys.stderr)
        return EXIT_ERROR
    try:
        args = parse_args(own_argv)
    except SystemExit as exit_:  # --help (0) or bad arguments (2): main() returns, never exits
        return exit_.code if isinstance(exit_.code, int) else EXIT_ERROR
    if hasattr(sys.stdout, "reconfigure"):
        # A model's text may hold characters the terminal's encoding lacks: replace, never crash.
        sys.stdout.reconfigure(errors="replace")
    try:
        request = build_request(args)
        response = call_service(request, service_name(args), args.timeout, [PROG, *argv])
        return report(args, response)
    except AskError as error:
        print(f"{PROG}: {error}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
