package natsstore

import (
	"context"
	"testing"
	"time"

	caddysse "github.com/ssegateway/caddy-sse"
)

// TestAttackReplayMismatchStarves: two gateways whose share options differ
// in replay (a rolling change of it, or a hub that outlived a reload that
// changed it) follow different subjects (one JetStream stream per replay
// limit) but ask for one lease key. The one that holds it appends to its
// subject; the other finds the lease taken, reads the holder's header and
// goes live, and its clients get nothing, for as long as the holder runs.
// A gateway whose log nobody appends to must be able to lead it.
func TestAttackReplayMismatchStarves(t *testing.T) {
	_, url := startServer(t)
	name := caddysse.LogName("k")
	a := openLog(t, gateway(t, url, 1, time.Second), name, 8)
	b := openLog(t, gateway(t, url, 2, time.Second), name, 16)
	la := lead(t, a)
	defer la.Release()
	appendEvent(t, la, "1")

	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	defer cancel()
	got := make(chan caddysse.LogEvent, 1)
	done := make(chan error, 1)
	go func() {
		done <- b.Follow(ctx, 0, func(ev caddysse.LogEvent) {
			select {
			case got <- ev:
			default:
			}
		}, func() {})
	}()
	defer func() { cancel(); <-done }()
	select {
	case <-got:
		return // b sees a's events: one log
	case <-time.After(500 * time.Millisecond):
	}
	lb, err := b.Lead(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if lb == nil {
		t.Fatal("b's log gets none of the holder's events, and b cannot lead it: its clients starve")
	}
	lb.Release()
}

// TestAttackLeaseBucketTTLShrunk: the lease bucket's TTL is the lease of
// whichever config opened a log last on the connection (a reload that
// shortens lease, or gateways with different leases). A lease taken under
// the old config is renewed every third of the old lease while its key now
// vanishes after the new one: it is lost, and its upstream request ended,
// over and over.
func TestAttackLeaseBucketTTLShrunk(t *testing.T) {
	_, url := startServer(t)
	old := openLog(t, gateway(t, url, 1, 3*time.Second), caddysse.LogName("k"), 8)
	la := lead(t, old)
	defer la.Release()
	// The reloaded config, on the same connection, with a shorter lease.
	_ = openLog(t, gateway(t, url, 1, 300*time.Millisecond), caddysse.LogName("other"), 8)
	select {
	case <-la.Lost():
		t.Fatal("a lease renewed as its config says was lost once another config shortened the bucket's TTL")
	case <-time.After(2500 * time.Millisecond):
	}
}
