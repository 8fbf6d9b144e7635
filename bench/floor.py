"""The gRPC floor: what one call costs a Python gRPC server that does no work at all.

``python -m bench.floor --port 0`` serves ``classifier.v1.ImageClassifier/Classify`` the
way our server's process does (grpc.aio on uvloop, one process), but every call gets the
same five predictions at once: no decode, no batching, no model, no logging, no metrics.
The report loads it with the same client and payload as ours, so its CPU per call is the
part of our server's CPU per image that no change inside our handlers can remove; the
in-process limit plus this floor is the best a grpcio server could do on the machine.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
from typing import Any

import grpc

from bench.processes import ROOT
from service.proto_gen.classifier.v1 import classifier_pb2 as pb
from service.proto_gen.classifier.v1 import classifier_pb2_grpc as pb_grpc
from service.server import eventloop
from service.server.config_loading import load_settings
from service.server.main import server_options
from service.server.workers import tie_to_parent

ANSWER = pb.ClassifyResponse(
    model="demo",
    version="1",
    results=[
        pb.Classification(
            predictions=[pb.Prediction(index=i, label=str(i), score=0.2) for i in range(5)]
        )
    ],
)


class FixedAnswer(pb_grpc.ImageClassifierServicer):
    async def Classify(self, request: pb.ClassifyRequest, context: Any) -> pb.ClassifyResponse:
        return ANSWER


async def serve(port: int) -> None:
    # Our server's channel options (message sizes, keepalive, connection age).
    server = grpc.aio.server(options=server_options(load_settings()))
    pb_grpc.add_ImageClassifierServicer_to_server(FixedAnswer(), server)
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print(f"listening {bound}", flush=True)
    await server.wait_for_termination()


class FloorProcess:
    """The floor server in a subprocess on a free port."""

    def __init__(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "bench.floor", "--port", "0", "--parent", str(os.getpid())],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.process.stdout is not None
        line = self.process.stdout.readline().split()
        if len(line) != 2 or line[0] != "listening":
            self.stop()
            raise RuntimeError(f"the gRPC floor server did not start: {line}")
        self.target = f"127.0.0.1:{line[1]}"

    @property
    def pid(self) -> int:
        return self.process.pid

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.floor", description=__doc__)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--parent", type=int, help="end when this process (our parent) ends")
    args = parser.parse_args()
    # A bench that is killed, even by SIGKILL, must not leave this server holding a port.
    if args.parent is not None and not tie_to_parent(args.parent):
        return
    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C ends it quietly
        eventloop.run(serve(args.port))


if __name__ == "__main__":
    main()
