#!/usr/bin/env bash
# Installs what the tests need on a fresh machine: Chromium for the browser
# tests, iproute2 for the network-namespace test, and the Node packages of the
# proof suite. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
need=()
command -v chromium >/dev/null || need+=(chromium)
command -v ip >/dev/null || need+=(iproute2)
if [ ${#need[@]} -gt 0 ]; then
	if [ "$(id -u)" -ne 0 ]; then
		echo "missing ${need[*]} and not root: install them first" >&2
		exit 1
	fi
	apt-get update -qq
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
if [ -f proof/js/package.json ]; then
	(cd proof/js && npm ci --no-audit --no-fund --loglevel=error)
fi
go mod download
