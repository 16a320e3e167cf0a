package caddysse

import (
	"context"
	"errors"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
)

// fakeStore is a store with a log, in memory, shared by the handlers of a
// test that stand for a fleet's gateways: one log per name, one lease per
// name, and a switch that makes it unreachable.
type fakeStore struct {
	mu     sync.Mutex
	logs   map[string]*fakeLogData
	down   bool
	slow   bool          // appends time out, the rest works
	wake   chan struct{} // closed and replaced at every append and outage
	leases int           // taken, in all
}

type fakeLogData struct {
	events []LogEvent
	seq    uint64
	holder *fakeLease
	header *LogHeader
}

func newFakeStore() *fakeStore {
	return &fakeStore{logs: make(map[string]*fakeLogData), wake: make(chan struct{})}
}

var errFakeDown = errors.New("fake store unreachable")

func (s *fakeStore) setDown(down bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.down = down
	s.wakeLocked()
}

func (s *fakeStore) wakeLocked() {
	close(s.wake)
	s.wake = make(chan struct{})
}

func (s *fakeStore) OpenLog(_ context.Context, name string, limits LogLimits) (Log, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.down {
		return nil, errFakeDown
	}
	if s.logs[name] == nil {
		s.logs[name] = &fakeLogData{}
	}
	return &fakeLog{store: s, data: s.logs[name], limit: limits.Events}, nil
}

// expire ends name's lease as if its holder had died: another gateway
// takes it, the old holder's appends fail, and it never leads again.
func (s *fakeStore) expire(name string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if l := s.logs[name].holder; l != nil {
		s.logs[name].holder = nil
		l.log.dead = true
		close(l.lost)
	}
}

type fakeLog struct {
	store *fakeStore
	data  *fakeLogData
	limit int
	dead  bool // its gateway is gone: it leads no more (expire)
}

func (l *fakeLog) Follow(ctx context.Context, after uint64, add func(LogEvent), caughtUp func()) error {
	s := l.store
	first := true
	for {
		s.mu.Lock()
		if s.down {
			s.mu.Unlock()
			return errFakeDown
		}
		var todo []LogEvent
		for _, ev := range l.data.events {
			if ev.Seq > after {
				todo = append(todo, ev)
			}
		}
		wake := s.wake
		s.mu.Unlock()
		for _, ev := range todo {
			add(ev)
			after = ev.Seq
		}
		if first {
			first = false
			caughtUp()
		}
		select {
		case <-wake:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

func (l *fakeLog) Lead(context.Context) (Lease, error) {
	s := l.store
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.down {
		return nil, errFakeDown
	}
	if l.data.holder != nil || l.dead {
		return nil, nil
	}
	lease := &fakeLease{log: l, lost: make(chan struct{})}
	if n := len(l.data.events); n > 0 {
		lease.resume = l.data.events[n-1].ID
	}
	l.data.holder = lease
	s.leases++
	return lease, nil
}

func (l *fakeLog) LeaseTerm() time.Duration { return time.Second }

func (l *fakeLog) Header(context.Context) (*LogHeader, error) {
	s := l.store
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.down {
		return nil, errFakeDown
	}
	return l.data.header, nil
}

func (l *fakeLog) Close() error { return nil }

type fakeLease struct {
	log    *fakeLog
	resume string
	lost   chan struct{}
}

func (f *fakeLease) Append(_ context.Context, ev LogEvent) (uint64, error) {
	s := f.log.store
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.down || s.slow {
		return 0, errFakeDown
	}
	d := f.log.data
	if d.holder != f {
		return 0, ErrLeaseLost
	}
	d.seq++
	ev.Seq = d.seq
	d.events = append(d.events, ev)
	if len(d.events) > f.log.limit {
		d.events = d.events[1:]
	}
	s.wakeLocked()
	return d.seq, nil
}

func (f *fakeLease) SetHeader(_ context.Context, h LogHeader) error {
	s := f.log.store
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.down {
		return errFakeDown
	}
	if f.log.data.holder == f {
		f.log.data.header = &h
	}
	return nil
}

func (f *fakeLease) ResumeID() string      { return f.resume }
func (f *fakeLease) Lost() <-chan struct{} { return f.lost }

func (f *fakeLease) Release() {
	s := f.log.store
	s.mu.Lock()
	defer s.mu.Unlock()
	if f.log.data.holder == f {
		f.log.data.holder = nil
		close(f.lost)
	}
}

// gateway is one handler of a test fleet, with its own upstream.
type gateway struct {
	h     *Handler
	clock *fakeClock
	up    *hubUpstream
}

func newFleet(t *testing.T, store *fakeStore, n int, conf func() *ShareConfig) []gateway {
	t.Helper()
	var gws []gateway
	for range n {
		c := conf()
		c.store = store
		h, clock := shareHandler(t, c)
		gws = append(gws, gateway{h: h, clock: clock, up: newHubUpstream()})
	}
	return gws
}

func (g gateway) client(t *testing.T, path string, header ...string) *client {
	t.Helper()
	return startClient(t, g.h, g.up, path, header...)
}

// advanceUntilAsked moves every gateway's clock on, a little at a time
// (their hubs ask the store for the lease on timers), until one of their
// upstreams gets a request.
func advanceUntilAsked(t *testing.T, gws []gateway) (*hubReq, int) {
	t.Helper()
	deadline := time.After(testWait)
	for {
		for i, g := range gws {
			select {
			case hr := <-g.up.reqs:
				return hr, i
			default:
			}
		}
		select {
		case <-deadline:
			t.Fatal("no gateway asked its upstream")
		case <-time.After(2 * time.Millisecond):
			for _, g := range gws {
				g.clock.Advance(100 * time.Millisecond)
			}
		}
	}
}

// waitLive waits until the gateway's one hub is a live shared stream.
func waitLive(t *testing.T, g gateway) {
	t.Helper()
	deadline := time.Now().Add(testWait)
	for {
		hb := onlyHub(t, g.h)
		hb.mu.RLock()
		live := hb.state == hubLive
		hb.mu.RUnlock()
		if live {
			return
		}
		if time.Now().After(deadline) {
			t.Fatal("the hub did not go live")
		}
		g.clock.Advance(100 * time.Millisecond)
		time.Sleep(2 * time.Millisecond)
	}
}

func fleetConf() *ShareConfig { return &ShareConfig{AssignIDs: true} }

func TestFleetOneUpstreamTheSameIDsEverywhere(t *testing.T) {
	defer verifyNoNewGoroutines(t)()
	store := newFakeStore()
	gws := newFleet(t, store, 2, fleetConf)
	a := gws[0].client(t, "/news")
	hr := gws[0].up.next(t)
	hr.send(t, "data: one\n\n")
	a.waitBody(t, "one\n\n")
	b := gws[1].client(t, "/news")
	waitSubscribers(t, gws[1].h, 1)
	waitLive(t, gws[1]) // b's hub found the header of a's upstream
	hr.send(t, "data: two\n\nid: own\ndata: three\n\n")
	prefix := onlyHub(t, gws[0].h).logName[:12] + "-"
	want := "id: " + prefix + "2\ndata: two\n\nid: own\ndata: three\n\n"
	if got := a.waitBody(t, "three\n\n"); got != "id: "+prefix+"1\ndata: one\n\n"+want {
		t.Errorf("a got %q", got)
	}
	if got := b.waitBody(t, "three\n\n"); got != want {
		t.Errorf("b got %q, want %q", got, want)
	}
	if n := gws[1].up.count.Load(); n != 0 {
		t.Errorf("the second gateway asked the upstream %d times, want 0", n)
	}
	// A client of a, back on b, resumes exactly.
	c := gws[1].client(t, "/news", "Last-Event-ID", prefix+"1")
	if got := c.waitBody(t, "three\n\n"); got != want {
		t.Errorf("resumed on the other gateway, got %q, want %q", got, want)
	}
	if c.w.Header().Get(replayHeader) != "" {
		t.Errorf("resumed with %s: %q", replayHeader, c.w.Header().Get(replayHeader))
	}
	for _, cl := range []*client{a, b, c} {
		cl.cancel()
		cl.waitDone(t)
	}
	hr.waitGone(t)
}

func TestFleetFailoverAsksFromTheLastID(t *testing.T) {
	defer verifyNoNewGoroutines(t)()
	store := newFakeStore()
	gws := newFleet(t, store, 2, func() *ShareConfig { return &ShareConfig{} })
	a := gws[0].client(t, "/f")
	hr := gws[0].up.next(t)
	b := gws[1].client(t, "/f")
	waitSubscribers(t, gws[1].h, 1)
	waitLive(t, gws[1])
	hr.send(t, "id: 1\ndata: one\n\n")
	b.waitBody(t, "one\n\n")
	// The leader is gone (its lease expired): b's gateway takes over and
	// asks from the last id; the upstream sends 1 again, then 2.
	store.expire(onlyHub(t, gws[1].h).logName)
	hr2, _ := advanceUntilAsked(t, gws[1:])
	if got := hr2.r.Header.Get("Last-Event-ID"); got != "1" {
		t.Errorf("new leader asked with Last-Event-ID %q, want 1", got)
	}
	hr2.send(t, "id: 1\ndata: one\n\nid: 2\ndata: two\n\n")
	if got := b.waitBody(t, "two\n\n"); got != "id: 1\ndata: one\n\nid: 2\ndata: two\n\n" {
		t.Errorf("b got %q", got)
	}
	// The old leader's upstream request ends: at once, its lease lost, or
	// at its next event, which the log refuses.
	select {
	case hr.chunks <- []byte("id: x\ndata: late\n\n"):
		<-hr.acks
	case <-hr.gone:
	case <-time.After(testWait):
		t.Fatal("the old leader's upstream request goes on")
	}
	hr.waitGone(t)
	if got := a.waitBody(t, "two\n\n"); strings.Contains(got, "late") {
		t.Errorf("a got the old leader's late event: %q", got)
	}
	for _, cl := range []*client{a, b} {
		cl.cancel()
		cl.waitDone(t)
	}
	hr2.waitGone(t)
}

func TestFleetStoreDownServesAloneThenRejoins(t *testing.T) {
	defer verifyNoNewGoroutines(t)()
	store := newFakeStore()
	gws := newFleet(t, store, 2, func() *ShareConfig { return &ShareConfig{} })
	store.setDown(true)
	a := gws[0].client(t, "/d")
	b := gws[1].client(t, "/d")
	// No client is refused: each gateway asks on its own; a's upstream
	// request gets further than b's.
	hrA, hrB := gws[0].up.next(t), gws[1].up.next(t)
	hrA.send(t, "id: 1\ndata: one\n\nid: 2\ndata: two\n\n")
	hrB.send(t, "id: 1\ndata: one\n\n")
	a.waitBody(t, "two\n\n")
	b.waitBody(t, "one\n\n")
	// Back: both rejoin and one of them leads. It appends what it got
	// alone to the log, for the other, and asks from its own last id.
	store.setDown(false)
	hr, leader := advanceUntilAsked(t, gws)
	hrA.waitGone(t)
	hrB.waitGone(t)
	want := map[int]string{0: "2", 1: "1"}[leader]
	if got := hr.r.Header.Get("Last-Event-ID"); got != want {
		t.Errorf("gateway %d leads, asking with Last-Event-ID %q, want %q", leader, got, want)
	}
	if leader == 1 {
		hr.send(t, "id: 2\ndata: two\n\n")
	}
	hr.send(t, "id: 3\ndata: three\n\n")
	for i, cl := range []*client{a, b} {
		if got := cl.waitBody(t, "three\n\n"); got != "id: 1\ndata: one\n\nid: 2\ndata: two\n\nid: 3\ndata: three\n\n" {
			t.Errorf("gateway %d leads; the client of gateway %d got %q", leader, i, got)
		}
	}
	for _, g := range gws {
		g.clock.Advance(time.Second)
	}
	gws[0].up.none(t)
	gws[1].up.none(t)
	for _, cl := range []*client{a, b} {
		cl.cancel()
		cl.waitDone(t)
	}
	hr.waitGone(t)
}

func TestFleetLingeringGatewayStartsNoUpstream(t *testing.T) {
	defer verifyNoNewGoroutines(t)()
	store := newFakeStore()
	gws := newFleet(t, store, 2, func() *ShareConfig { return &ShareConfig{Linger: caddy.Duration(10 * time.Second)} })
	a := gws[0].client(t, "/l")
	hr := gws[0].up.next(t)
	b := gws[1].client(t, "/l")
	waitSubscribers(t, gws[1].h, 1)
	waitLive(t, gws[1])
	hr.send(t, "id: 1\ndata: one\n\n")
	b.waitBody(t, "one\n\n")
	// Both clients leave; b's gateway lingers, a's releases its upstream
	// (and the lease) first.
	b.cancel()
	b.waitDone(t)
	a.cancel()
	a.waitDone(t)
	gws[0].clock.Advance(10 * time.Second)
	hr.waitGone(t)
	// Nobody has clients: b's lingering hub must not take the lease.
	for range 20 {
		gws[1].clock.Advance(100 * time.Millisecond)
		time.Sleep(time.Millisecond)
	}
	gws[1].up.none(t)
	gws[1].clock.Advance(10 * time.Second)
	deadline := time.Now().Add(testWait)
	for {
		gws[1].h.hubs.mu.Lock()
		n := len(gws[1].h.hubs.hubs)
		gws[1].h.hubs.mu.Unlock()
		if n == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the lingering hub was not released")
		}
		time.Sleep(time.Millisecond)
	}
	if store.leases != 1 {
		t.Errorf("%d leases taken, want 1", store.leases)
	}
}

func TestFleetEventTheStoreFailedIsAskedForAgain(t *testing.T) {
	defer verifyNoNewGoroutines(t)()
	store := newFakeStore()
	gws := newFleet(t, store, 1, func() *ShareConfig { return &ShareConfig{} })
	a := gws[0].client(t, "/x")
	hr := gws[0].up.next(t)
	hr.send(t, "id: 1\ndata: one\n\n")
	a.waitBody(t, "one\n\n")
	// The store fails the leader's append of 2: 2 is in no ring, so the
	// gateway, now alone, asks the upstream from 1, not 2.
	store.mu.Lock()
	store.slow = true
	store.mu.Unlock()
	hr.chunks <- []byte("id: 2\ndata: two\n\n")
	<-hr.acks
	hr.waitGone(t)
	hr = advanceUntilRequest(t, gws[0].clock, gws[0].up)
	if got := hr.r.Header.Get("Last-Event-ID"); got != "1" {
		t.Errorf("alone, the gateway asked with Last-Event-ID %q, want 1", got)
	}
	hr.send(t, "id: 2\ndata: two\n\n")
	if got := a.waitBody(t, "two\n\n"); got != "id: 1\ndata: one\n\nid: 2\ndata: two\n\n" {
		t.Errorf("client got %q", got)
	}
	a.cancel()
	a.waitDone(t)
	hr.waitGone(t)
}
