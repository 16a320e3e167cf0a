#!/usr/bin/env bash
# The xcaddy-equivalent build: a throwaway main module that imports Caddy's
# standard modules and this module through a replace directive, exactly as
# `xcaddy build --with github.com/ssegateway/caddy-sse=<this checkout>` does.
# It proves the module builds as a plugin, registers, and adapts the example.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
caddy_version=$(cd "$repo" && go list -m -f '{{.Version}}' github.com/caddyserver/caddy/v2)

cd "$work"
cat > main.go <<'GO'
package main

import (
	caddycmd "github.com/caddyserver/caddy/v2/cmd"

	_ "github.com/caddyserver/caddy/v2/modules/standard"
	_ "github.com/ssegateway/caddy-sse"
)

func main() {
	caddycmd.Main()
}
GO
go mod init caddy >/dev/null 2>&1
go mod edit -require="github.com/caddyserver/caddy/v2@$caddy_version" \
	-require=github.com/ssegateway/caddy-sse@v0.0.0 \
	-replace="github.com/ssegateway/caddy-sse=$repo"
go mod tidy >/dev/null
go build -o caddy .
./caddy list-modules | grep -qx 'http.handlers.sse' || { echo "http.handlers.sse not registered"; exit 1; }
./caddy adapt --config "$repo/Caddyfile.example" >/dev/null
echo "plugin build: ok (caddy $caddy_version, http.handlers.sse listed, Caddyfile.example adapts)"
