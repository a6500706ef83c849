#!/usr/bin/env python3
"""A Python gRPC app (grpcio) calling the echo service, to prove the sidecar works for an app
written with another gRPC stack than the Rust one it is tested with.

Generates the stubs from proto/echo.proto at run time with grpc_tools.protoc, runs unary,
server-streaming, client-streaming and bidi calls with ASCII and binary metadata, checks every
reply and a failing call with a non-ASCII message, prints a summary, and exits non-zero on any
mismatch.

    pip install grpcio grpcio-tools
    python3 integration/python/echo_client.py --target 127.0.0.1:7001
"""

import argparse
import importlib
import os
import sys
import tempfile

try:
    import grpc
    from grpc_tools import protoc
except ImportError as error:  # the Rust test turns this into its failure message
    print(f"missing Python module ({error}): run `pip install grpcio grpcio-tools`", file=sys.stderr)
    sys.exit(3)

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_PROTO = os.path.normpath(os.path.join(HERE, "..", "..", "proto", "echo.proto"))
TIMEOUT = 30.0
MAX_MESSAGE = 64 * 1024 * 1024


def pattern(size):
    """The echo server's reply bytes for reply_size: byte i is i % 251."""
    return bytes(i % 251 for i in range(size))


def load_stubs(proto_path, out_dir):
    include = os.path.dirname(proto_path)
    status = protoc.main(
        [
            "grpc_tools.protoc",
            f"-I{include}",
            f"--python_out={out_dir}",
            f"--grpc_python_out={out_dir}",
            proto_path,
        ]
    )
    if status != 0:
        raise RuntimeError(f"grpc_tools.protoc failed with status {status} for {proto_path}")
    sys.path.insert(0, out_dir)
    return importlib.import_module("echo_pb2"), importlib.import_module("echo_pb2_grpc")


class Checks:
    def __init__(self):
        self.passed = []
        self.failed = []
        self.calls = 0

    def check(self, name, condition, detail=""):
        (self.passed if condition else self.failed).append(name if condition else f"{name}: {detail}")

    def run(self, name, function):
        try:
            function()
        except Exception as error:  # a crash in one call shape must not hide the others
            self.failed.append(f"{name}: {type(error).__name__}: {error}")


def metadata_dict(pairs):
    result = {}
    for key, value in pairs or ():
        result.setdefault(key, []).append(value)
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", required=True, help="host:port of the client sidecar")
    parser.add_argument("--proto", default=DEFAULT_PROTO, help="path to echo.proto")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as out_dir:
        pb, pb_grpc = load_stubs(args.proto, out_dir)
        channel = grpc.insecure_channel(
            args.target,
            options=[
                ("grpc.max_send_message_length", MAX_MESSAGE),
                ("grpc.max_receive_message_length", MAX_MESSAGE),
            ],
        )
        grpc.channel_ready_future(channel).result(timeout=TIMEOUT)
        stub = pb_grpc.EchoStub(channel)
        checks = Checks()
        binary = bytes([0, 255, 10, 13, 58, 128])
        metadata = [("x-echo-lang", "python"), ("x-echo-blob-bin", binary)]

        def unary():
            payload = bytes(range(256)) * 4
            checks.calls += 1
            reply, call = stub.Unary.with_call(
                pb.EchoRequest(payload=payload), metadata=metadata, timeout=TIMEOUT
            )
            checks.check("unary payload", reply.payload == payload, f"{len(reply.payload)} bytes back")
            headers = metadata_dict(call.initial_metadata())
            trailers = metadata_dict(call.trailing_metadata())
            for place, found in (("headers", headers), ("trailers", trailers)):
                checks.check(f"unary ascii metadata in {place}", found.get("x-echo-lang") == ["python"], found)
                checks.check(f"unary binary metadata in {place}", found.get("x-echo-blob-bin") == [binary], found)
            big = pattern(1024 * 1024)
            checks.calls += 1
            reply = stub.Unary(pb.EchoRequest(reply_size=len(big)), timeout=TIMEOUT)
            checks.check("unary 1 MiB reply", reply.payload == big, f"{len(reply.payload)} bytes")

        def server_stream():
            checks.calls += 1
            call = stub.ServerStream(
                pb.EchoRequest(reply_size=1000, reply_count=500), metadata=metadata, timeout=TIMEOUT
            )
            replies = list(call)
            checks.check("server stream count", len(replies) == 500, len(replies))
            checks.check(
                "server stream order", [r.sequence for r in replies] == list(range(500)), "out of order"
            )
            checks.check(
                "server stream payloads", all(r.payload == pattern(1000) for r in replies), "payload differs"
            )
            trailers = metadata_dict(call.trailing_metadata())
            checks.check("server stream trailers", trailers.get("x-echo-blob-bin") == [binary], trailers)

        def client_stream():
            payloads = [bytes([i % 256]) * (i * 13 % 300) for i in range(300)]
            checks.calls += 1
            reply = stub.ClientStream(
                (pb.EchoRequest(payload=p) for p in payloads), metadata=metadata, timeout=TIMEOUT
            )
            checks.check("client stream count", reply.sequence == 300, reply.sequence)
            checks.check("client stream payload", reply.payload == b"".join(payloads), "concatenation differs")

        def bidi():
            payloads = [i.to_bytes(4, "big") * (1 + i % 50) for i in range(1000)]
            checks.calls += 1
            replies = list(
                stub.Bidi((pb.EchoRequest(payload=p) for p in payloads), metadata=metadata, timeout=TIMEOUT)
            )
            checks.check("bidi count", len(replies) == 1000, len(replies))
            checks.check("bidi payloads", [r.payload for r in replies] == payloads, "payload differs")
            checks.check(
                "bidi order", [r.sequence for r in replies] == list(range(len(replies))), "out of order"
            )

        def failing_status():
            message = "échec — 失敗 ✓"
            for trailers_only in (True, False):
                checks.calls += 1
                try:
                    stub.Unary(
                        pb.EchoRequest(
                            status_code=grpc.StatusCode.PERMISSION_DENIED.value[0],
                            status_message=message,
                            trailers_only=trailers_only,
                        ),
                        timeout=TIMEOUT,
                    )
                    checks.check(f"status (trailers-only {trailers_only})", False, "the call succeeded")
                except grpc.RpcError as error:
                    checks.check(
                        f"status code (trailers-only {trailers_only})",
                        error.code() == grpc.StatusCode.PERMISSION_DENIED,
                        error.code(),
                    )
                    checks.check(
                        f"status message (trailers-only {trailers_only})",
                        error.details() == message,
                        repr(error.details()),
                    )

        checks.run("unary", unary)
        checks.run("server stream", server_stream)
        checks.run("client stream", client_stream)
        checks.run("bidi", bidi)
        checks.run("status", failing_status)
        channel.close()

    print(
        f"grpcio {grpc.__version__} via {args.target}: {checks.calls} calls, "
        f"{len(checks.passed)} checks passed, {len(checks.failed)} failed"
    )
    for failure in checks.failed:
        print(f"FAILED {failure}")
    return 1 if checks.failed or not checks.passed else 0


if __name__ == "__main__":
    sys.exit(main())
