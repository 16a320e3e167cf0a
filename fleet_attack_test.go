package caddysse

import (
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
)

// fleetRoute is one sse handler with share and a store, provisioned on srv
// as Caddy would (its place among srv's share handlers names its registry).
func fleetRoute(t *testing.T, srv *caddyhttp.Server, clock *fakeClock, store Store, key string) *Handler {
	t.Helper()
	h := &Handler{Heartbeat: seconds(15), Retry: seconds(3), CloseEvent: "bye",
		Share: &ShareConfig{Key: key, Linger: -1, store: store}}
	provisionOn(t, h, srv, clock)
	return h
}

// TestAttackFleetTwoRoutesOneLog: two routes of one server on the same
// host and path, told apart by a matcher (staff by remote_ip, say, and
// everyone else), each with `share news` and its own upstream. Without a
// store they never share: each has its own registry (hubs.go). Through a
// store, the log is named by the host, path and key alone, so the public
// route's hub follows the staff route's log and its clients get the staff
// upstream's events.
func TestAttackFleetTwoRoutesOneLog(t *testing.T) {
	defer verifyNoNewGoroutines(t)()
	store := newFakeStore()
	srv := new(caddyhttp.Server)
	clock := newFakeClock()
	staff := fleetRoute(t, srv, clock, store, "news")
	public := fleetRoute(t, srv, clock, store, "news")
	upStaff, upPublic := newHubUpstream(), newHubUpstream()

	s := startClient(t, staff, upStaff, "/events")
	hr := upStaff.next(t)
	hr.send(t, "data: staff only 1\n\n")
	s.waitBody(t, "staff only 1")

	p := startClient(t, public, upPublic, "/events")
	deadline := time.Now().Add(testWait)
	var own *hubReq
	for own == nil {
		select {
		case own = <-upPublic.reqs:
			continue
		default:
		}
		if hubLiveOf(public) {
			break // live without an upstream request of its own: the staff route's
		}
		if time.Now().After(deadline) {
			t.Fatal("the public client neither asked its own upstream nor got a header")
		}
		clock.Advance(100 * time.Millisecond)
		time.Sleep(2 * time.Millisecond)
	}
	if own == nil {
		hr.send(t, "data: staff only 2\n\n")
		// Give the event the time to reach the public client, if it does.
		deadline := time.Now().Add(time.Second)
		for time.Now().Before(deadline) && !strings.Contains(p.w.received(), "staff only 2") {
			time.Sleep(time.Millisecond)
		}
		if got := p.w.received(); strings.Contains(got, "staff only") {
			t.Errorf("a client of the public route got the staff route's events: %q", got)
		} else {
			t.Errorf("the public client has a header but no upstream request of its route")
		}
	} else {
		own.send(t, "data: public 1\n\n")
		p.waitBody(t, "public 1")
		if got := s.w.received(); strings.Contains(got, "public 1") {
			t.Errorf("the staff client got the public route's events: %q", got)
		}
	}
	for _, cl := range []*client{s, p} {
		cl.cancel()
		cl.waitDone(t)
	}
	hr.waitGone(t)
	if own != nil {
		own.waitGone(t)
	}
}

// hubLiveOf reports whether h has a hub that is a live shared stream.
func hubLiveOf(h *Handler) bool {
	h.hubs.mu.Lock()
	defer h.hubs.mu.Unlock()
	for _, hb := range h.hubs.hubs {
		hb.mu.RLock()
		live := hb.state == hubLive
		hb.mu.RUnlock()
		if live {
			return true
		}
	}
	return false
}
