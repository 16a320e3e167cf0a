package caddysse

import (
	"context"
	"errors"
	"strings"
	"sync"
	"testing"
	"time"
)

// fakeStore is a store with a log, in memory, shared by the handlers of a
// test that stand for a fleet's gateways: one log per name, one lease per
// name, and a switch that makes it unreachable.
type fakeStore struct {
	mu     sync.Mutex
	logs   map[string]*fakeLogData
	down   bool
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

// expire ends name's lease as if its holder had died: another gateway may
// take it, and the old holder's appends fail.
func (s *fakeStore) expire(name string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if l := s.logs[name].holder; l != nil {
		s.logs[name].holder = nil
		close(l.lost)
	}
}

type fakeLog struct {
	store *fakeStore
	data  *fakeLogData
	limit int
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
	if l.data.holder != nil {
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

func (f *fakeLease) Append(_ context.Context, ev LogEvent) error {
	s := f.log.store
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.down {
		return errFakeDown
	}
	d := f.log.data
	if d.holder != f {
		return ErrLeaseLost
	}
	d.seq++
	ev.Seq = d.seq
	d.events = append(d.events, ev)
	if len(d.events) > f.log.limit {
		d.events = d.events[1:]
	}
	s.wakeLocked()
	return nil
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

// ask advances every gateway's clock a lease term, so that their hubs ask
// for the lease and the header.
func askAll(gws []gateway) {
	for _, g := range gws {
		g.clock.Advance(time.Second)
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
	askAll(gws[1:]) // b's hub finds the header of a's upstream
	hr.send(t, "data: two\n\nid: own\ndata: three\n\n")
	prefix := LogName(onlyHub(t, gws[0].h).key)[:12] + "-"
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
	askAll(gws[1:])
	hr.send(t, "id: 1\ndata: one\n\n")
	b.waitBody(t, "one\n\n")
	// The leader is gone (its lease expired): b's gateway takes over and
	// asks from the last id; the upstream sends 1 again, then 2.
	store.expire(LogName(onlyHub(t, gws[1].h).key))
	askAll(gws[1:])
	hr2 := gws[1].up.next(t)
	if got := hr2.r.Header.Get("Last-Event-ID"); got != "1" {
		t.Errorf("new leader asked with Last-Event-ID %q, want 1", got)
	}
	hr2.send(t, "id: 1\ndata: one\n\nid: 2\ndata: two\n\n")
	if got := b.waitBody(t, "two\n\n"); got != "id: 1\ndata: one\n\nid: 2\ndata: two\n\n" {
		t.Errorf("b got %q", got)
	}
	// The old leader's upstream request ends at its next event.
	hr.chunks <- []byte("id: x\ndata: late\n\n")
	<-hr.acks
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
	// No client is refused: each gateway asks on its own.
	hrA, hrB := gws[0].up.next(t), gws[1].up.next(t)
	hrA.send(t, "id: 1\ndata: one\n\n")
	hrB.send(t, "id: 1\ndata: one\n\n")
	a.waitBody(t, "one\n\n")
	b.waitBody(t, "one\n\n")
	// Back: both rejoin, one of them leads, asking from the last id.
	store.setDown(false)
	for _, g := range gws {
		g.clock.Advance(storeProbeEvery)
	}
	hrA.waitGone(t)
	hrB.waitGone(t)
	askAll(gws)
	var hr *hubReq
	select {
	case hr = <-gws[0].up.reqs:
	case hr = <-gws[1].up.reqs:
	case <-time.After(testWait):
		t.Fatal("no gateway leads after the store came back")
	}
	if got := hr.r.Header.Get("Last-Event-ID"); got != "1" {
		t.Errorf("the leader asked with Last-Event-ID %q, want 1", got)
	}
	hr.send(t, "id: 1\ndata: one\n\nid: 2\ndata: two\n\n")
	for _, cl := range []*client{a, b} {
		if got := cl.waitBody(t, "two\n\n"); got != "id: 1\ndata: one\n\nid: 2\ndata: two\n\n" {
			t.Errorf("client got %q", got)
		}
	}
	askAll(gws)
	gws[0].up.none(t)
	gws[1].up.none(t)
	for _, cl := range []*client{a, b} {
		cl.cancel()
		cl.waitDone(t)
	}
	hr.waitGone(t)
}
