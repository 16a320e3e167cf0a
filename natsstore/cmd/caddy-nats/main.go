// Command caddy is Caddy with the sse handler and its NATS store: the
// binary the proof suite runs a fleet of gateways with.
package main

import (
	caddycmd "github.com/caddyserver/caddy/v2/cmd"

	// plug in Caddy modules here
	_ "github.com/caddyserver/caddy/v2/modules/standard"
	_ "github.com/ssegateway/caddy-sse"
	_ "github.com/ssegateway/caddy-sse/natsstore"
)

func main() {
	caddycmd.Main()
}
