package natsstore

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	caddysse "github.com/ssegateway/caddy-sse"
)

func waitFor(t *testing.T, ch <-chan struct{}, within time.Duration, what string) {
	t.Helper()
	select {
	case <-ch:
		return
	default:
	}
	select {
	case <-ch:
	case <-time.After(within):
		t.Fatalf("%s: not within %v", what, within)
	}
}

// lead takes the log's lease, which must be free.
func lead(t *testing.T, l *natsLog) caddysse.Lease {
	t.Helper()
	ls, err := l.Lead(context.Background())
	if err != nil || ls == nil {
		t.Fatalf("Lead: %v, %v; want the lease", ls, err)
	}
	return ls
}

func event(id string) caddysse.LogEvent {
	return caddysse.LogEvent{Data: []byte("data: " + id + "\n\n"), HasID: true, ID: id}
}

func appendEvent(t *testing.T, ls caddysse.Lease, id string) {
	t.Helper()
	if _, err := ls.Append(context.Background(), event(id)); err != nil {
		t.Fatalf("Append %s: %v", id, err)
	}
}

// follow follows the log from after until it has n events, and checks that
// caughtUp came once, after the kept ones (all of them, when n is their
// number).
func follow(t *testing.T, l *natsLog, after uint64, n int) []caddysse.LogEvent {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	evs := make(chan caddysse.LogEvent, 1000)
	caught := make(chan int, 2)
	given := 0
	done := make(chan error, 1)
	go func() {
		done <- l.Follow(ctx, after, func(ev caddysse.LogEvent) { given++; evs <- ev }, func() { caught <- given })
	}()
	var got []caddysse.LogEvent
	timeout := time.After(5 * time.Second)
	for len(got) < n {
		select {
		case ev := <-evs:
			got = append(got, ev)
		case err := <-done:
			t.Fatalf("Follow returned %v after %d events", err, len(got))
		case <-timeout:
			t.Fatalf("Follow: %d events within 5s, want %d", len(got), n)
		}
	}
	select {
	case at := <-caught:
		if at != n {
			t.Fatalf("caughtUp after %d events, want %d", at, n)
		}
	case <-timeout:
		t.Fatal("no caughtUp within 5s")
	}
	cancel()
	select {
	case err := <-done:
		if !errors.Is(err, context.Canceled) {
			t.Fatalf("Follow returned %v, want context.Canceled", err)
		}
	case <-time.After(3 * time.Second):
		t.Fatal("Follow did not return within 3s of its context's end")
	}
	if len(caught) != 0 {
		t.Fatal("caughtUp called twice")
	}
	for i := 1; i < len(got); i++ {
		if got[i].Seq <= got[i-1].Seq {
			t.Fatalf("Seq not increasing: %d then %d", got[i-1].Seq, got[i].Seq)
		}
	}
	return got
}

func TestLead(t *testing.T) {
	_, url := startServer(t)
	const lease = 600 * time.Millisecond
	a := openLog(t, gateway(t, url, 1, lease), caddysse.LogName("k"), 8)
	b := openLog(t, gateway(t, url, 2, lease), caddysse.LogName("k"), 8)

	if a.LeaseTerm() != lease {
		t.Fatalf("LeaseTerm %v, want %v", a.LeaseTerm(), lease)
	}
	la := lead(t, a)
	if lb, err := b.Lead(context.Background()); lb != nil || err != nil {
		t.Fatalf("second Lead: %v, %v; want nil, nil", lb, err)
	}
	// Held past several leases: the renewals keep it.
	select {
	case <-la.Lost():
		t.Fatal("lease lost while renewed")
	case <-time.After(3 * lease):
	}
	if lb, err := b.Lead(context.Background()); lb != nil || err != nil {
		t.Fatalf("Lead while renewed: %v, %v; want nil, nil", lb, err)
	}

	la.Release()
	waitFor(t, la.Lost(), 0, "Lost after Release")
	lb := lead(t, b) // at once

	// The holder stops renewing: its connection goes.
	b.conn.nc.Close()
	waitFor(t, lb.Lost(), lease+500*time.Millisecond, "Lost without renewals")
	start := time.Now()
	for {
		la, err := a.Lead(context.Background())
		if err != nil {
			t.Fatal(err)
		}
		if la != nil {
			t.Logf("taken over %v after the holder's last renewal could have been", time.Since(start))
			la.Release()
			break
		}
		if time.Since(start) > lease+time.Second {
			t.Fatalf("lease not free within %v of its holder's end", time.Since(start))
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func TestAppendFollow(t *testing.T) {
	_, url := startServer(t)
	name := caddysse.LogName("k")
	a := openLog(t, gateway(t, url, 1, time.Second), name, 8)
	b := openLog(t, gateway(t, url, 2, time.Second), name, 8)
	// Another stream on the same JetStream stream: its events are not
	// this one's, though they share its sequence.
	other := openLog(t, gateway(t, url, 1, time.Second), caddysse.LogName("other"), 8)

	// Nothing kept: caughtUp at once.
	follow(t, b, 0, 0)

	la := lead(t, a)
	lo := lead(t, other)
	for i := range 5 {
		appendEvent(t, la, fmt.Sprint(i))
		appendEvent(t, lo, "other")
	}
	noID := caddysse.LogEvent{Data: []byte("data: no id\n\n"), ID: "4"}
	if _, err := la.Append(context.Background(), noID); err != nil {
		t.Fatal(err)
	}

	onA := follow(t, a, 0, 6)
	onB := follow(t, b, 0, 6)
	for i := range onA {
		if onA[i].Seq != onB[i].Seq || string(onA[i].Data) != string(onB[i].Data) {
			t.Fatalf("event %d: %d %q on a, %d %q on b", i, onA[i].Seq, onA[i].Data, onB[i].Seq, onB[i].Data)
		}
		want := event(fmt.Sprint(i))
		if i == 5 {
			want = noID
		}
		ev := onB[i]
		if string(ev.Data) != string(want.Data) || ev.HasID != want.HasID || ev.ID != want.ID {
			t.Fatalf("event %d: %+v, want %+v", i, ev, want)
		}
	}

	// From after: the later ones only, caught up after them.
	from := follow(t, b, onB[2].Seq, 3)
	if from[0].Seq != onB[3].Seq {
		t.Fatalf("Follow from %d starts at %d, want %d", onB[2].Seq, from[0].Seq, onB[3].Seq)
	}
	// From the last: nothing kept, then live events.
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	live := make(chan caddysse.LogEvent, 10)
	caught := make(chan struct{})
	done := make(chan error, 1)
	go func() {
		done <- b.Follow(ctx, onB[5].Seq, func(ev caddysse.LogEvent) { live <- ev }, func() { close(caught) })
	}()
	waitFor(t, caught, 3*time.Second, "caughtUp with nothing after")
	appendEvent(t, la, "live")
	select {
	case ev := <-live:
		if ev.ID != "live" || ev.Seq <= onB[5].Seq {
			t.Fatalf("live event %+v", ev)
		}
	case <-time.After(3 * time.Second):
		t.Fatal("live event not followed within 3s")
	}
	cancel()
	if err := <-done; !errors.Is(err, context.Canceled) {
		t.Fatalf("Follow returned %v", err)
	}
}

func TestLimitKeepsLatest(t *testing.T) {
	_, url := startServer(t)
	name := caddysse.LogName("k")
	s := gateway(t, url, 0, time.Second)
	l := openLog(t, s, name, 3)
	ls := lead(t, l)
	for i := range 5 {
		appendEvent(t, ls, fmt.Sprint(i))
	}
	evs := follow(t, l, 0, 3)
	if evs[0].ID != "2" || evs[2].ID != "4" {
		t.Fatalf("kept %q..%q, want 2..4", evs[0].ID, evs[2].ID)
	}
	// Another replay limit is another stream: the same key there starts
	// empty and keeps its own number.
	l5 := openLog(t, s, name, 5)
	if l5.streamName == l.streamName {
		t.Fatal("two replay limits share a stream")
	}
	follow(t, l5, 0, 0)
}

func TestStaleHolder(t *testing.T) {
	_, url := startServer(t)
	name := caddysse.LogName("k")
	a := openLog(t, gateway(t, url, 1, time.Second), name, 8)
	b := openLog(t, gateway(t, url, 2, time.Second), name, 8)

	la := lead(t, a)
	appendEvent(t, la, "1")
	// a's key vanishes as if it had not renewed it in time (a paused
	// process), and b takes the lease and appends.
	if err := a.kv.Purge(context.Background(), a.name); err != nil {
		t.Fatal(err)
	}
	lb := lead(t, b)
	if lb.ResumeID() != "1" {
		t.Fatalf("ResumeID %q, want 1", lb.ResumeID())
	}
	appendEvent(t, lb, "2")
	if _, err := la.Append(context.Background(), event("stale")); !errors.Is(err, caddysse.ErrLeaseLost) {
		t.Fatalf("stale Append: %v, want ErrLeaseLost", err)
	}
	waitFor(t, la.Lost(), 0, "Lost after a failed append")
	if _, err := la.Append(context.Background(), event("again")); !errors.Is(err, caddysse.ErrLeaseLost) {
		t.Fatalf("Append once lost: %v, want ErrLeaseLost", err)
	}
	evs := follow(t, b, 0, 2)
	if evs[0].ID != "1" || evs[1].ID != "2" {
		t.Fatalf("log holds %q, %q; want 1, 2", evs[0].ID, evs[1].ID)
	}
	// The stale holder's Release leaves b's key alone.
	la.Release()
	if lc, err := a.Lead(context.Background()); lc != nil || err != nil {
		t.Fatalf("Lead after a stale Release: %v, %v; want nil, nil", lc, err)
	}
	select {
	case <-lb.Lost():
		t.Fatal("b lost its lease")
	default:
	}
}

// TestExpectEmptySubject: the server takes an expected last sequence of 0
// as "the subject holds nothing", which a new holder's first append relies
// on.
func TestExpectEmptySubject(t *testing.T) {
	_, url := startServer(t)
	name := caddysse.LogName("k")
	a := openLog(t, gateway(t, url, 0, time.Second), name, 8)
	pub := func() error {
		msg := nats.NewMsg(a.subject)
		msg.Data = []byte("x")
		_, err := a.conn.js.PublishMsg(context.Background(), msg, jetstream.WithExpectLastSequencePerSubject(0))
		return err
	}
	if err := pub(); err != nil {
		t.Fatalf("first publish on an empty subject: %v", err)
	}
	if err := pub(); !isWrongLastSeq(err) {
		t.Fatalf("publish expecting an empty subject that is not: %v, want wrong last sequence", err)
	}
}

// TestRetriedAppendAddsOnce: an append published again with its message id
// (its ack was lost) is one event, and the holder goes on after it.
func TestRetriedAppendAddsOnce(t *testing.T) {
	_, url := startServer(t)
	a := openLog(t, gateway(t, url, 0, time.Second), caddysse.LogName("k"), 8)
	la := lead(t, a)
	ls := la.(*natsLease)
	appendEvent(t, la, "1")
	before := ls.lastSeq
	appendEvent(t, la, "2")
	// As if the ack of "2" had not come: the same message id, the same
	// guard.
	ls.msgs--
	ls.lastSeq = before
	appendEvent(t, la, "2")
	appendEvent(t, la, "3")
	evs := follow(t, a, 0, 3)
	for i, id := range []string{"1", "2", "3"} {
		if evs[i].ID != id {
			t.Fatalf("event %d is %q, want %q", i, evs[i].ID, id)
		}
	}
}

func TestHeader(t *testing.T) {
	_, url := startServer(t)
	name := caddysse.LogName("k")
	a := openLog(t, gateway(t, url, 1, time.Second), name, 8)
	b := openLog(t, gateway(t, url, 2, time.Second), name, 8)
	if h, err := b.Header(context.Background()); h != nil || err != nil {
		t.Fatalf("Header with no holder: %v, %v", h, err)
	}
	la := lead(t, a)
	if h, err := b.Header(context.Background()); h != nil || err != nil {
		t.Fatalf("Header before SetHeader: %v, %v", h, err)
	}
	want := caddysse.LogHeader{Status: 200, Header: http.Header{"Content-Type": {"text/event-stream"}}}
	if err := la.SetHeader(context.Background(), want); err != nil {
		t.Fatal(err)
	}
	h, err := b.Header(context.Background())
	if err != nil || h == nil || h.Status != 200 || h.Header.Get("Content-Type") != "text/event-stream" {
		t.Fatalf("Header: %+v, %v", h, err)
	}
	// Renewals keep the header, and SetHeader moved the revision they use.
	select {
	case <-la.Lost():
		t.Fatal("lease lost after SetHeader")
	case <-time.After(time.Second):
	}
	if h, _ := b.Header(context.Background()); h == nil || h.Status != 200 {
		t.Fatalf("Header after renewals: %+v", h)
	}
	la.Release()
	if h, err := b.Header(context.Background()); h != nil || err != nil {
		t.Fatalf("Header after Release: %v, %v", h, err)
	}
}

// TestCloseReleases: closing a log gives up its lease.
func TestCloseReleases(t *testing.T) {
	_, url := startServer(t)
	name := caddysse.LogName("k")
	s := gateway(t, url, 1, time.Second)
	a, err := s.OpenLog(context.Background(), name, caddysse.LogLimits{Events: 8})
	if err != nil {
		t.Fatal(err)
	}
	la := lead(t, a.(*natsLog))
	if err := a.Close(); err != nil {
		t.Fatal(err)
	}
	waitFor(t, la.Lost(), 0, "Lost after Close")
	b := openLog(t, gateway(t, url, 2, time.Second), name, 8)
	lead(t, b).Release()
}
