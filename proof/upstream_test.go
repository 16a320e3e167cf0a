package proof

import (
	"context"
	"fmt"
	"net"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// upstream is a test SSE server on loopback standing for the legacy server
// behind the gateway. Each request names a behavior (the last segment of
// its path) and carries a key (query parameter k) by which the test finds
// it. The upstream records when each request's context ends: that is the
// moment the upstream observes its connection end, which the gateway must
// bring about as soon as the client is gone.
type upstream struct {
	addr string
	srv  *http.Server

	mu        sync.Mutex
	changed   chan struct{} // closed and replaced whenever something below changes
	behaviors map[string]behavior
	requests  []*upstreamRequest
	open      int                         // requests whose context has not ended
	conns     map[net.Conn]http.ConnState // connections not yet closed
	nextKey   int
	// forget keeps requests out of requests (they are only counted in
	// total), so that a long run does not grow the test's own heap.
	forget bool
	total  int
}

// behavior is what the upstream does for one request.
type behavior func(w http.ResponseWriter, r *http.Request, req *upstreamRequest)

// upstreamRequest is one request the upstream received.
type upstreamRequest struct {
	Key     string
	Header  http.Header
	Query   map[string]string
	Started time.Time

	// push feeds the "push" behavior: each slice is written and flushed as
	// it arrives; closing it ends the response.
	push chan []byte
	// pushed receives, for each slice of push, when its write completed.
	pushed chan time.Time
	// lastWrite is when the behavior last completed a write (Unix ns).
	lastWrite atomic.Int64
	// sent is what a behavior chose to record of what it wrote; read it
	// only after done is closed.
	sent []byte
	// done is closed when the behavior returned.
	done chan struct{}

	ended   chan struct{} // closed when the request's context ends
	endedAt time.Time     // set before ended is closed
}

// newUpstream starts an upstream with the built-in behaviors, stopped when
// the test ends.
func newUpstream(t *testing.T) *upstream {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	up := &upstream{
		addr:      l.Addr().String(),
		changed:   make(chan struct{}),
		behaviors: make(map[string]behavior),
		conns:     make(map[net.Conn]http.ConnState),
	}
	up.srv = &http.Server{
		Handler: http.HandlerFunc(up.serveHTTP),
		// Long enough not to close the gateway's pooled connections
		// itself: the tests must see the gateway do it.
		ReadHeaderTimeout: 5 * time.Minute,
		ConnState:         up.connState,
	}
	up.handle("push", pushBehavior)
	up.handle("ticker", tickerBehavior)
	done := make(chan struct{})
	go func() {
		defer close(done)
		_ = up.srv.Serve(l)
	}()
	t.Cleanup(func() {
		_ = up.srv.Close()
		<-done
	})
	return up
}

// handle sets the behavior for requests whose path ends in /name.
func (up *upstream) handle(name string, b behavior) {
	up.mu.Lock()
	defer up.mu.Unlock()
	up.behaviors[name] = b
}

// key returns a key no other request of this upstream has used.
func (up *upstream) key(prefix string) string {
	up.mu.Lock()
	defer up.mu.Unlock()
	up.nextKey++
	return prefix + strconv.Itoa(up.nextKey)
}

func (up *upstream) notifyLocked() {
	close(up.changed)
	up.changed = make(chan struct{})
}

func (up *upstream) connState(c net.Conn, state http.ConnState) {
	up.mu.Lock()
	defer up.mu.Unlock()
	if state == http.StateClosed || state == http.StateHijacked {
		delete(up.conns, c)
	} else {
		up.conns[c] = state
	}
	up.notifyLocked()
}

func (up *upstream) serveHTTP(w http.ResponseWriter, r *http.Request) {
	name := r.URL.Path[strings.LastIndexByte(r.URL.Path, '/')+1:]
	query := make(map[string]string)
	for k, v := range r.URL.Query() {
		query[k] = v[0]
	}
	req := &upstreamRequest{
		Key:     query["k"],
		Header:  r.Header.Clone(),
		Query:   query,
		Started: time.Now(),
		push:    make(chan []byte, 16),
		pushed:  make(chan time.Time, 16),
		ended:   make(chan struct{}),
		done:    make(chan struct{}),
	}
	defer close(req.done)
	up.mu.Lock()
	b := up.behaviors[name]
	if !up.forget {
		up.requests = append(up.requests, req)
	}
	up.total++
	up.open++
	up.notifyLocked()
	up.mu.Unlock()

	context.AfterFunc(r.Context(), func() {
		at := time.Now()
		up.mu.Lock()
		req.endedAt = at
		close(req.ended)
		up.open--
		up.notifyLocked()
		up.mu.Unlock()
	})
	if b == nil {
		http.Error(w, "no behavior "+name, http.StatusNotFound)
		return
	}
	b(w, r, req)
}

// waitFor waits until cond, evaluated under the upstream's lock, holds.
func (up *upstream) waitFor(t *testing.T, what string, within time.Duration, cond func() bool) {
	t.Helper()
	deadline := time.NewTimer(within)
	defer deadline.Stop()
	for {
		up.mu.Lock()
		ok := cond()
		changed := up.changed
		up.mu.Unlock()
		if ok {
			return
		}
		select {
		case <-changed:
		case <-deadline.C:
			t.Fatalf("upstream: no %s within %s", what, within)
		}
	}
}

// request waits for the n-th request (from 1) with key and returns it.
func (up *upstream) request(t *testing.T, key string, n int, within time.Duration) *upstreamRequest {
	t.Helper()
	var found *upstreamRequest
	up.waitFor(t, fmt.Sprintf("request #%d with key %q", n, key), within, func() bool {
		seen := 0
		for _, r := range up.requests {
			if r.Key == key {
				seen++
				if seen == n {
					found = r
					return true
				}
			}
		}
		return false
	})
	return found
}

// requestsWithKey returns how many requests with key arrived so far.
func (up *upstream) requestsWithKey(key string) int {
	up.mu.Lock()
	defer up.mu.Unlock()
	n := 0
	for _, r := range up.requests {
		if r.Key == key {
			n++
		}
	}
	return n
}

// counts returns the requests whose context has not ended, all requests
// so far, and the connections not yet closed: busy ones (serving a
// request) and pooled ones (idle between requests, or opened and not used
// yet: kept by the gateway's keep-alive pool).
func (up *upstream) counts() (open, total, busy, idle int) {
	up.mu.Lock()
	defer up.mu.Unlock()
	busy, idle = up.connCountsLocked()
	return up.open, up.total, busy, idle
}

func (up *upstream) connCountsLocked() (busy, pooled int) {
	for _, state := range up.conns {
		if state == http.StateActive {
			busy++
		} else {
			pooled++
		}
	}
	return busy, pooled
}

// waitQuiet waits until no request is open and no connection is busy;
// pooled connections are the gateway's keep-alive pool, ready for reuse.
func (up *upstream) waitQuiet(t *testing.T, within time.Duration) {
	t.Helper()
	up.waitFor(t, "quiet (0 open requests, 0 busy connections)", within, func() bool {
		busy, _ := up.connCountsLocked()
		return up.open == 0 && busy == 0
	})
}

// waitEnded waits until the request's context ended and returns when.
func (req *upstreamRequest) waitEnded(t *testing.T, within time.Duration) time.Time {
	t.Helper()
	select {
	case <-req.ended:
		return req.endedAt
	case <-time.After(within):
		t.Fatalf("upstream: request %q still open %s later", req.Key, within)
		return time.Time{}
	}
}

// waitDone waits until the request's behavior returned.
func (req *upstreamRequest) waitDone(t *testing.T, within time.Duration) {
	t.Helper()
	select {
	case <-req.done:
	case <-time.After(within):
		t.Fatalf("upstream: request %q still being served %s later", req.Key, within)
	}
}

// hasEnded reports whether the request's context ended.
func (req *upstreamRequest) hasEnded() bool {
	select {
	case <-req.ended:
		return true
	default:
		return false
	}
}

// send has the "push" behavior write p and returns when the write
// completed.
func (req *upstreamRequest) send(t *testing.T, p string) time.Time {
	t.Helper()
	select {
	case req.push <- []byte(p):
	case <-req.ended:
		t.Fatalf("upstream: request %q ended before %q could be sent", req.Key, p)
	}
	select {
	case at := <-req.pushed:
		return at
	case <-time.After(5 * time.Second):
		t.Fatalf("upstream: writing %q did not complete within 5s", p)
		return time.Time{}
	}
}

// writeFlush writes p and flushes it, recording when that completed.
func (req *upstreamRequest) writeFlush(w http.ResponseWriter, p []byte) error {
	if _, err := w.Write(p); err != nil {
		return err
	}
	if err := http.NewResponseController(w).Flush(); err != nil {
		return err
	}
	req.lastWrite.Store(time.Now().UnixNano())
	return nil
}

// startEventStream sends an event stream's header.
func startEventStream(w http.ResponseWriter, req *upstreamRequest) error {
	w.Header().Set("Content-Type", "text/event-stream")
	w.WriteHeader(http.StatusOK)
	return http.NewResponseController(w).Flush()
}

// pushBehavior starts an event stream and writes what the test pushes.
func pushBehavior(w http.ResponseWriter, r *http.Request, req *upstreamRequest) {
	if startEventStream(w, req) != nil {
		return
	}
	for {
		select {
		case p, ok := <-req.push:
			if !ok {
				return
			}
			if req.writeFlush(w, p) != nil {
				return
			}
			req.pushed <- time.Now()
		case <-r.Context().Done():
			return
		}
	}
}

// tickerBehavior sends "id: n / data: tick n" every `every` (a duration,
// default 20ms), from n=1, until the client is gone. With split=1 each
// event is written in two halves half a period apart, so that it is often
// cut mid-event; with pre=<duration> the header comes that late.
func tickerBehavior(w http.ResponseWriter, r *http.Request, req *upstreamRequest) {
	every := 20 * time.Millisecond
	if d, err := time.ParseDuration(req.Query["every"]); err == nil {
		every = d
	}
	split := req.Query["split"] == "1"
	if d, err := time.ParseDuration(req.Query["pre"]); err == nil {
		select {
		case <-time.After(d):
		case <-r.Context().Done():
			return
		}
	}
	if startEventStream(w, req) != nil {
		return
	}
	if split {
		every /= 2
	}
	ticker := time.NewTicker(every)
	defer ticker.Stop()
	wait := func() bool {
		select {
		case <-ticker.C:
			return true
		case <-r.Context().Done():
			return false
		}
	}
	for n := 1; ; n++ {
		event := fmt.Sprintf("id: %d\ndata: tick %d\n\n", n, n)
		if split {
			// The first half, then a period inside the event.
			half := len(event) / 2
			if req.writeFlush(w, []byte(event[:half])) != nil || !wait() {
				return
			}
			event = event[half:]
		}
		if req.writeFlush(w, []byte(event)) != nil || !wait() {
			return
		}
	}
}
