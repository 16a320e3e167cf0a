#!/usr/bin/env bash
# CI's smoke run of the benchmark harness: every target (direct, Caddy bare
# reverse_proxy, Caddy with sse, nginx; for fan-out also Caddy with sse share,
# the floor handler, nginx with Nchan, and the fleet: three Caddy gateways
# built from natsstore/cmd/caddy-nats sharing one NATS JetStream server, with 1 and
# 20 subscribers and five events) through every scenario with tiny counts,
# about 40 seconds plus building the Caddy binaries. It proves the harness and the targets
# work and fails on any stream that does not open, end or deliver as expected;
# it measures nothing worth reading and writes no report.
set -euo pipefail
cd "$(dirname "$0")"
go run . -smoke
