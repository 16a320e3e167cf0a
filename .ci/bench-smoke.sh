#!/usr/bin/env bash
# The benchmark harness's smoke run (see bench/smoke.sh): every target and scenario with tiny counts,
# the fleet of three gateways on NATS JetStream (issue 18) included.
set -euo pipefail
exec bash "$(dirname "$0")/../bench/smoke.sh"
