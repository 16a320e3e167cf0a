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

// inject appends ev to name's log as a hostile or broken store (or any
// NATS user allowed to publish on the subject) would: no lease, no check.
func (s *fakeStore) inject(name string, ev LogEvent) {
	s.mu.Lock()
	defer s.mu.Unlock()
	d := s.logs[name]
	d.seq++
	ev.Seq = d.seq
	d.events = append(d.events, ev)
	s.wakeLocked()
}

// TestAttackFleetLogDataNotOneEvent: an event of the log is given to the
// clients as its Data says, whole or not: Data holding several events
// injects events behind the one the log numbers (with assign_ids, only the
// first gets the id), and Data without its blank line runs into the next
// event, which the client then reads as one. The hub must give its clients
// only whole single events.
func TestAttackFleetLogDataNotOneEvent(t *testing.T) {
	defer verifyNoNewGoroutines(t)()
	store := newFakeStore()
	gws := newFleet(t, store, 1, fleetConf)
	a := gws[0].client(t, "/x")
	hr := gws[0].up.next(t)
	hr.send(t, "data: one\n\n")
	a.waitBody(t, "one\n\n")
	name := onlyHub(t, gws[0].h).logName
	store.inject(name, LogEvent{Data: []byte("data: two\n\ndata: injected\n\n")})
	store.inject(name, LogEvent{Data: []byte("data: unterminated")})
	hr.send(t, "data: three\n\n")
	got := a.waitBody(t, "three\n\n")
	if strings.Contains(got, "injected") || strings.Contains(got, "unterminated") {
		t.Errorf("the client got what the log's Data held beyond one whole event: %q", got)
	}
	a.cancel()
	a.waitDone(t)
	hr.waitGone(t)
}

// TestAttackFleetLogHeaderPerUser: a follower takes the log's header as it
// is: a status that is not 200, a header marked as one user's (Set-Cookie)
// or a Content-Length would reach every client of the gateway. The leader
// never shares such a header, so one in the log is not the fleet's.
func TestAttackFleetLogHeaderPerUser(t *testing.T) {
	defer verifyNoNewGoroutines(t)()
	store := newFakeStore()
	gws := newFleet(t, store, 2, fleetConf)
	a := gws[0].client(t, "/h")
	hr := gws[0].up.next(t)
	hr.send(t, "data: one\n\n")
	a.waitBody(t, "one\n\n")
	name := onlyHub(t, gws[0].h).logName
	store.mu.Lock()
	store.logs[name].header = &LogHeader{Status: 200, Header: map[string][]string{
		"Content-Type": {"text/event-stream"},
		"Set-Cookie":   {"session=attacker; Path=/"},
	}}
	store.mu.Unlock()
	b := gws[1].client(t, "/h")
	waitSubscribers(t, gws[1].h, 1)
	deadline := time.Now().Add(time.Second)
	for time.Now().Before(deadline) && !hubLiveOf(gws[1].h) {
		gws[1].clock.Advance(100 * time.Millisecond)
		time.Sleep(2 * time.Millisecond)
	}
	if hubLiveOf(gws[1].h) {
		hr.send(t, "data: two\n\n")
		b.waitBody(t, "two\n\n")
		b.w.mu.Lock()
		cookie := b.w.header.Get("Set-Cookie")
		b.w.mu.Unlock()
		if cookie != "" {
			t.Errorf("a follower's client got the log header's Set-Cookie %q", cookie)
		}
	}
	for _, cl := range []*client{a, b} {
		cl.cancel()
		cl.waitDone(t)
	}
	hr.waitGone(t)
}

// TestAttackFleetRejoinBehindSkipsEvents: two gateways serve alone while
// the store is down; a gets further than b. The store is back and a
// rejoins first and leads: it appends what it got alone, for b. b then
// rejoins, reads those events while catching up, and (its log position
// being 0, as for a new hub) moves its clients past everything read,
// so that they never get the event they missed.
func TestAttackFleetRejoinBehindSkipsEvents(t *testing.T) {
	defer verifyNoNewGoroutines(t)()
	store := newFakeStore()
	gws := newFleet(t, store, 2, func() *ShareConfig { return &ShareConfig{} })
	store.setDown(true)
	a := gws[0].client(t, "/r")
	b := gws[1].client(t, "/r")
	hrA, hrB := gws[0].up.next(t), gws[1].up.next(t)
	hrA.send(t, "id: 1\ndata: one\n\nid: 2\ndata: two\n\n")
	hrB.send(t, "id: 1\ndata: one\n\n")
	a.waitBody(t, "two\n\n")
	b.waitBody(t, "one\n\n")
	store.setDown(false)
	hr, _ := advanceUntilAsked(t, gws[:1]) // a alone is back first, and leads
	hrA.waitGone(t)
	advanceUntilGone(t, gws[1], hrB) // then b
	hr.send(t, "id: 3\ndata: three\n\n")
	if got := b.waitBody(t, "three\n\n"); got != "id: 1\ndata: one\n\nid: 2\ndata: two\n\nid: 3\ndata: three\n\n" {
		t.Errorf("the gateway that rejoined behind gave its client %q", got)
	}
	for _, cl := range []*client{a, b} {
		cl.cancel()
		cl.waitDone(t)
	}
	hr.waitGone(t)
}

// advanceUntilGone moves g's clock on until its upstream request hr ends.
func advanceUntilGone(t *testing.T, g gateway, hr *hubReq) {
	t.Helper()
	deadline := time.After(testWait)
	for {
		select {
		case <-hr.gone:
			return
		case <-deadline:
			t.Fatal("the gateway's own upstream request did not end")
		case <-time.After(2 * time.Millisecond):
			g.clock.Advance(100 * time.Millisecond)
		}
	}
}
