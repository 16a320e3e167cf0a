#!/usr/bin/env bash
# The proof suite (proof/): installs what its real clients and its network
# namespace test need, then runs it under the race detector and writes
# docs/reliability.md from the run's figures.
#
#   bash .ci/proof.sh            install, run, write the report
#   bash .ci/proof.sh install    install only (then `go test -race ./proof`
#                                runs the suite; export SSE_RELIABILITY_REPORT
#                                to have it write the report)
#
# With CI=true (the default here) a missing tool fails the suite's tests
# instead of skipping them. The half-open test needs root (it creates a
# network namespace and a veth pair, removed when it ends).
set -euo pipefail
cd "$(dirname "$0")/.."
export CI="${CI:-true}"

bash .ci/install.sh

if [ "${1:-}" = install ]; then
	exit 0
fi
SSE_RELIABILITY_REPORT="$PWD/docs/reliability.md" go test -race -count=1 ./proof
