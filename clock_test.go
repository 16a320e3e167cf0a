package caddysse

import (
	"bytes"
	"net/http"
	"slices"
	"sync"
	"time"
)

// fakeClock is a clock whose time moves only when a test advances it.
// Timer callbacks run synchronously inside Advance, in the order they are
// due, so a test sees their effects as soon as Advance returns.
type fakeClock struct {
	mu     sync.Mutex
	now    time.Time
	timers []*fakeTimer
}

type fakeTimer struct {
	clock  *fakeClock
	at     time.Time
	f      func()
	active bool
}

func newFakeClock() *fakeClock {
	return &fakeClock{now: time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)}
}

func (c *fakeClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.now
}

func (c *fakeClock) AfterFunc(d time.Duration, f func()) timer {
	c.mu.Lock()
	defer c.mu.Unlock()
	t := &fakeTimer{clock: c, at: c.now.Add(d), f: f, active: true}
	c.timers = append(c.timers, t)
	return t
}

func (t *fakeTimer) Reset(d time.Duration) bool {
	t.clock.mu.Lock()
	defer t.clock.mu.Unlock()
	wasActive := t.active
	t.at, t.active = t.clock.now.Add(d), true
	return wasActive
}

func (t *fakeTimer) Stop() bool {
	t.clock.mu.Lock()
	defer t.clock.mu.Unlock()
	wasActive := t.active
	t.active = false
	return wasActive
}

// Advance moves time forward by d, firing every timer that falls due on the
// way, each at its own moment.
func (c *fakeClock) Advance(d time.Duration) {
	c.mu.Lock()
	end := c.now.Add(d)
	c.mu.Unlock()
	for {
		c.mu.Lock()
		slices.SortFunc(c.timers, func(a, b *fakeTimer) int { return a.at.Compare(b.at) })
		var due *fakeTimer
		for _, t := range c.timers {
			if t.active && !t.at.After(end) {
				due = t
				break
			}
		}
		if due == nil {
			c.now = end
			c.mu.Unlock()
			return
		}
		c.now = due.at
		due.active = false
		c.mu.Unlock()
		due.f()
	}
}

// pending reports how many timers are armed.
func (c *fakeClock) pending() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	n := 0
	for _, t := range c.timers {
		if t.active {
			n++
		}
	}
	return n
}

// memWriter is an http.ResponseWriter that records what a client would
// receive. It is safe for concurrent use.
type memWriter struct {
	mu      sync.Mutex
	header  http.Header
	status  int
	body    bytes.Buffer
	flushed int // bytes of body the client has received (flushed)
	flushes int
	failErr error // when set, every write fails with it
}

func newMemWriter() *memWriter { return &memWriter{header: make(http.Header)} }

func (m *memWriter) Header() http.Header { return m.header }

func (m *memWriter) WriteHeader(status int) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.status == 0 {
		m.status = status
	}
}

func (m *memWriter) Write(p []byte) (int, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.status == 0 {
		m.status = http.StatusOK
	}
	if m.failErr != nil {
		return 0, m.failErr
	}
	return m.body.Write(p)
}

func (m *memWriter) Flush() {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.flushed = m.body.Len()
	m.flushes++
}

// received returns what the client has received so far: the flushed body.
func (m *memWriter) received() string {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.body.String()[:m.flushed]
}

type testError string

func (e testError) Error() string { return string(e) }

const errTestBrokenPipe = testError("broken pipe")
