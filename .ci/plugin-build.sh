#!/usr/bin/env bash
# The xcaddy-equivalent build: a throwaway main module that imports Caddy's
# standard modules and this module through a replace directive, exactly as
# `xcaddy build --with github.com/ssegateway/caddy-sse=<this checkout>` does.
# It proves the module builds as a plugin, registers, and adapts the example;
# that it asks for no newer Go than Caddy does; and that it brings nothing
# into a user's build but itself: the build's module graph is that of
# Caddy's standard build alone, plus this module.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# A user's build knows nothing of this checkout's go.work.
export GOWORK=off
caddy_version=$(cd "$repo" && go list -m -f '{{.Version}}' github.com/caddyserver/caddy/v2)

go_ours=$(cd "$repo" && go list -m -f '{{.GoVersion}}')
go_caddy=$(cd "$repo" && go list -m -f '{{.GoVersion}}' github.com/caddyserver/caddy/v2)
if [ "$(printf '%s\n%s\n' "$go_ours" "$go_caddy" | sort -V | tail -n1)" != "$go_caddy" ]; then
	echo "go.mod says go $go_ours, newer than Caddy $caddy_version's go $go_caddy: users would need a newer toolchain"
	exit 1
fi

# main_module DIR IMPORT...: a main module in DIR whose main.go runs Caddy's
# command with Caddy's standard modules and the given imports.
main_module() {
	local dir=$1
	shift
	mkdir -p "$dir"
	{
		printf 'package main\n\nimport (\n\tcaddycmd "github.com/caddyserver/caddy/v2/cmd"\n\n'
		printf '\t_ "github.com/caddyserver/caddy/v2/modules/standard"\n'
		for imp in "$@"; do printf '\t_ "%s"\n' "$imp"; done
		printf ')\n\nfunc main() {\n\tcaddycmd.Main()\n}\n'
	} >"$dir/main.go"
	(cd "$dir" && go mod init caddy >/dev/null 2>&1 &&
		go mod edit -require="github.com/caddyserver/caddy/v2@$caddy_version")
}

main_module "$work/standard"
main_module "$work/plugin" github.com/ssegateway/caddy-sse
cd "$work/plugin"
go mod edit -require=github.com/ssegateway/caddy-sse@v0.0.0 \
	-replace="github.com/ssegateway/caddy-sse=$repo"
go mod tidy >/dev/null
go build -o caddy .
./caddy list-modules | grep -qx 'http.handlers.sse' || { echo "http.handlers.sse not registered"; exit 1; }
./caddy adapt --config "$repo/Caddyfile.example" >/dev/null

(cd "$work/standard" && go mod tidy >/dev/null && go list -m -f '{{.Path}} {{.Version}}' all | sort) >"$work/standard.txt"
go list -m -f '{{.Path}} {{.Version}}' all | sort >"$work/plugin.txt"
added=$(comm -13 "$work/standard.txt" "$work/plugin.txt" | grep -v '^github.com/ssegateway/caddy-sse v0.0.0$' || true)
if [ -n "$added" ]; then
	echo "the plugin adds to a user's build, beyond Caddy $caddy_version's standard modules and itself:"
	echo "$added"
	exit 1
fi

# The same for the NATS store, a module of its own: built with the core
# module, it brings in NATS's client and server libraries and what they
# need, and nothing else.
main_module "$work/store" github.com/ssegateway/caddy-sse github.com/ssegateway/caddy-sse/natsstore
main_module "$work/nats" github.com/nats-io/nats-server/v2/server github.com/nats-io/nats.go/jetstream
nats_server=$(cd "$repo/natsstore" && go list -m -f '{{.Version}}' github.com/nats-io/nats-server/v2)
nats_client=$(cd "$repo/natsstore" && go list -m -f '{{.Version}}' github.com/nats-io/nats.go)
(cd "$work/nats" && go mod edit -require="github.com/nats-io/nats-server/v2@$nats_server" \
	-require="github.com/nats-io/nats.go@$nats_client" && go mod tidy >/dev/null &&
	go list -m -f '{{.Path}}' all | sort -u) >"$work/nats.txt"
cd "$work/store"
go mod edit -require=github.com/ssegateway/caddy-sse@v0.0.0 -replace="github.com/ssegateway/caddy-sse=$repo" \
	-require=github.com/ssegateway/caddy-sse/natsstore@v0.0.0 -replace="github.com/ssegateway/caddy-sse/natsstore=$repo/natsstore"
go mod tidy >/dev/null
go build -o caddy .
./caddy list-modules | grep -qx 'http.handlers.sse.stores.nats' || { echo "http.handlers.sse.stores.nats not registered"; exit 1; }
./caddy adapt --config "$repo/natsstore/Caddyfile.example" | grep -q '"backend":"nats"' ||
	{ echo "natsstore/Caddyfile.example does not adapt to a nats store"; exit 1; }
go list -m -f '{{.Path}} {{.Version}}' all | sort >"$work/store.txt"
store_added=$(comm -13 "$work/plugin.txt" "$work/store.txt" | grep -v '^github.com/ssegateway/caddy-sse/natsstore v0.0.0$' |
	while read -r path version; do grep -qxF "$path" "$work/nats.txt" || echo "$path $version"; done)
if [ -n "$store_added" ]; then
	echo "the NATS store adds to a user's build, beyond the plugin and NATS's own modules:"
	echo "$store_added"
	exit 1
fi
echo "store plugin build: ok (http.handlers.sse.stores.nats listed, natsstore/Caddyfile.example adapts, adds only NATS's modules)"

echo "plugin build: ok (caddy $caddy_version, go $go_ours <= $go_caddy, http.handlers.sse listed, Caddyfile.example adapts, adds only itself to the module graph)"
