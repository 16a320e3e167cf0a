package caddysse

import (
	"fmt"
	"strings"
	"testing"

	"github.com/caddyserver/caddy/v2/caddytest"
)

// The first request of a shared stream's hub, through a real Caddy
// (caddytest, admin on localhost:2997, HTTP on 29280, apart from the other
// end-to-end tests' ports). Shared streams across reloads are the proof
// suite's TestShareReload.
func TestShareE2EFirstRequestCarriesLastEventID(t *testing.T) {
	up := newShareUpstream(t)
	tester := caddytest.NewTester(t).WithDefaultOverrides(caddytest.Config{AdminPort: 2997})
	tester.InitServer(fmt.Sprintf(`{
	admin localhost:2997
	http_port 29280
	https_port 29643
	grace_period 1s
	skip_install_trust
}
http://localhost:29280 {
	handle /assign* {
		sse {
			share {
				assign_ids
				linger 1m
			}
		}
		reverse_proxy %[1]s
	}
	handle {
		sse {
			share {
				linger 1m
			}
		}
		reverse_proxy %[1]s
	}
}`, strings.TrimPrefix(up.srv.URL, "http://")), "caddyfile")
	if t.Failed() {
		t.FailNow()
	}
	var reqs []*shareUpReq
	t.Cleanup(func() {
		// A config without the routes releases their hubs, lingering
		// ones too, so that nothing of this test outlives it.
		tester.InitServer("{\n\tadmin localhost:2997\n}\n", "caddyfile")
		for _, req := range reqs {
			req.waitGone(t)
		}
	})

	// Upstream ids: the hub asks from the client's id, and the client's
	// first event is the one after it, not a replay.
	c := openStreamAt(t, "http://localhost:29280/own", "Last-Event-ID", "41")
	req := up.next(t)
	reqs = append(reqs, req)
	if got, ok := req.r.Header["Last-Event-Id"]; !ok || got[0] != "41" {
		t.Errorf("the hub's first upstream request has Last-Event-ID %q, want \"41\"", got)
	}
	req.send(t, "id: 42\ndata: 42\n\n")
	if body := c.waitFor(t, "data: 42\n\n"); !strings.Contains(body, "id: 42\ndata: 42\n\n") || eventData(body)[0] != "42" {
		t.Errorf("the client's first event is not 42: %q", body)
	}
	if got := c.resp.Header.Get(replayHeader); got != "" {
		t.Errorf("%s: %q, want none", replayHeader, got)
	}
	c.cancel()

	// assign_ids: a gateway id means nothing upstream; the hub asks
	// without one, and its events get the gateway's ids.
	const gwID = "0123456789ab-7"
	if !isGatewayID(gwID) {
		t.Fatalf("%q is not of the gateway's form", gwID)
	}
	c = openStreamAt(t, "http://localhost:29280/assign", "Last-Event-ID", gwID)
	req = up.next(t)
	reqs = append(reqs, req)
	if got, ok := req.r.Header["Last-Event-Id"]; ok {
		t.Errorf("with assign_ids, a gateway id started a hub whose upstream request has Last-Event-ID %q, want none", got)
	}
	req.send(t, "data: 1\n\n")
	body := c.waitFor(t, "data: 1\n\n")
	if line, _, _ := strings.Cut(body, "\n"); !strings.HasPrefix(line, "id: ") || !isGatewayID(strings.TrimPrefix(line, "id: ")) {
		t.Errorf("the first event has no gateway id: %q", body)
	}
	c.cancel()
}
