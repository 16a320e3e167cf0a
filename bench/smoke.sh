#!/usr/bin/env bash
# CI's smoke run of the benchmark harness: every target (direct, Caddy bare
# reverse_proxy, Caddy with sse, nginx; for fan-out also Caddy with sse share and
# nginx with Nchan) through every scenario with tiny counts, about 30 seconds
# plus building Caddy. It proves the harness and the targets
# work and fails on any stream that does not open, end or deliver as expected;
# it measures nothing worth reading and writes no report.
set -euo pipefail
cd "$(dirname "$0")"
go run . -smoke
