#!/usr/bin/env bash
# The proof suite (proof/): installs what its real clients and its network
# namespace test need, then runs it under the race detector and writes
# docs/reliability.md from the run's figures.
#
#   bash .ci/proof.sh            install, run, write the report
#   bash .ci/proof.sh install    install only (then `go test -race ./...`
#                                runs the suite; export SSE_RELIABILITY_REPORT
#                                to have it write the report)
#
# With CI=true (the default here) a missing tool fails the suite's tests
# instead of skipping them. The half-open test needs root (it creates a
# network namespace and a veth pair, removed when it ends).
set -euo pipefail
cd "$(dirname "$0")/.."
export CI="${CI:-true}"

need=()
command -v chromium >/dev/null || need+=(chromium)
command -v ip >/dev/null || need+=(iproute2)
if [ ${#need[@]} -gt 0 ]; then
	if [ "$(id -u)" -ne 0 ]; then
		echo "proof: missing ${need[*]} and not root: install them first" >&2
		exit 1
	fi
	apt-get update -qq
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
# eventsource@4 needs Node 20 or later (the machine image has it; Debian's
# own nodejs package is older).
node_major=$(node -p 'process.versions.node.split(".")[0]' 2>/dev/null || echo 0)
if [ "$node_major" -lt 20 ]; then
	echo "proof: Node 20 or later is needed, found ${node_major}" >&2
	exit 1
fi
npm ci --prefix proof/js --no-audit --no-fund --loglevel=error

if [ "${1:-}" = install ]; then
	exit 0
fi
SSE_RELIABILITY_REPORT="$PWD/docs/reliability.md" go test -race -count=1 ./proof
