"""Container HEALTHCHECK: exit 0 only when the local gRPC health service reports SERVING.

Used by `docker run` / compose (Kubernetes ignores HEALTHCHECK and uses the native gRPC probes in
deploy/k8s). It asks the standard grpc.health.v1 service for the overall status (service "") on
127.0.0.1, on CNNSERVE_GRPC_PORT (default 8500), or on the port given as the first argument for the
`cnnserve worker` tier. Standard library + grpcio-health-checking only, so it works in any image
stage that has the venv.
"""

from __future__ import annotations

import os
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def check(port: int, *, service: str = "", timeout_s: float = 4.0) -> bool:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        try:
            response = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout_s
            )
        except grpc.RpcError as exc:
            print(f"health check failed: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return False
    if response.status != health_pb2.HealthCheckResponse.SERVING:
        print(
            f"health: {health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)}", file=sys.stderr
        )
        return False
    return True


def main(argv: list[str]) -> int:
    port = int(argv[1]) if len(argv) > 1 else int(os.environ.get("CNNSERVE_GRPC_PORT", "8500"))
    return 0 if check(port) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
