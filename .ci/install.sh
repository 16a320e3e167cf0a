#!/usr/bin/env bash
# Installs what the tests need on a fresh machine: Chromium for the browser
# tests, iproute2 for the network-namespace test, the legacy SSE servers the
# proof suite runs behind the gateway (PHP's built-in server, Flask on
# gunicorn, both from Debian; Express from npm), and the Node packages of the
# proof suite. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
need=()
command -v chromium >/dev/null || need+=(chromium)
command -v ip >/dev/null || need+=(iproute2)
command -v php >/dev/null || need+=(php-cli)
# Debian's Flask and gunicorn live with Debian's Python, whatever python3
# comes first in PATH.
/usr/bin/python3 -c 'import flask' 2>/dev/null || need+=(python3-flask)
/usr/bin/python3 -c 'import gunicorn' 2>/dev/null || need+=(gunicorn)
if [ ${#need[@]} -gt 0 ]; then
	if [ "$(id -u)" -ne 0 ]; then
		echo "missing ${need[*]} and not root: install them first" >&2
		exit 1
	fi
	apt-get update -qq
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
# eventsource@4 needs Node 20 or later (the machine image has it; Debian's
# own nodejs package is older).
node_major=$(node -p 'process.versions.node.split(".")[0]' 2>/dev/null || echo 0)
if [ "$node_major" -lt 20 ]; then
	echo "Node 20 or later is needed, found ${node_major}" >&2
	exit 1
fi
npm ci --prefix proof/js --no-audit --no-fund --loglevel=error
npm ci --prefix proof/legacy/express --no-audit --no-fund --loglevel=error
# The modules that the tests of every module in go.work build with.
go list -deps -test github.com/ssegateway/caddy-sse/... >/dev/null
