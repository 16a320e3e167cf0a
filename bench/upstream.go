//go:build linux

package main

import (
	"context"
	"errors"
	"math/rand/v2"
	"net"
	"net/http"
	"strconv"
	"sync"
	"sync/atomic"
	"time"
)

// stampDigits is the width of the send time written into every stamped
// event: nanoseconds since the Unix epoch fit in 19 decimal digits until 2262.
const stampDigits = 19

// readyEvent is the first event of every stream. A client that has read it
// knows the whole path (client, gateway, upstream) is established.
const readyEvent = "data: ready\n\n"

// upstream is the legacy SSE server every target fronts. It stamps each event
// with the time it was handed to the kernel (in nanoseconds, in the data), and
// it records when it sees a stream's request end, which is how the teardown
// scenario learns that a gateway has closed the upstream connection.
type upstream struct {
	server   *http.Server
	listener net.Listener

	// active counts the streams whose handler is running, so a scenario can
	// wait until the previous one has fully drained before it starts.
	active atomic.Int64
	// sent counts the stamped events written, skipped those a paced stream
	// gave up because it fell more than maxLag behind its schedule.
	sent, skipped atomic.Int64

	// broadcasting counts the /broadcast requests being served: the
	// upstream connections a fan-out run costs.
	broadcasting atomic.Int64
	// broadcastMade counts the /broadcast requests received, ever: a
	// fan-out run's share of it is the upstream requests it made.
	broadcastMade atomic.Int64

	mu sync.Mutex
	// next is the broadcast event every /broadcast handler waits for.
	next *broadcastEvent
	// endedAt maps a teardown stream's id to the moment its request context
	// was done.
	endedAt map[int]time.Time
}

// startUpstream listens on an ephemeral loopback port and serves the streams.
func startUpstream() (*upstream, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	u := &upstream{listener: ln, endedAt: make(map[int]time.Time), next: &broadcastEvent{ready: make(chan struct{})}}
	mux := http.NewServeMux()
	mux.HandleFunc("/events", u.serveEvents)
	mux.HandleFunc("/idle", u.serveIdle)
	mux.HandleFunc("/broadcast", u.serveBroadcast)
	u.server = &http.Server{Handler: mux, ErrorLog: discardLogger()}
	go func() { _ = u.server.Serve(ln) }()
	return u, nil
}

// addr is the host:port the gateways proxy to.
func (u *upstream) addr() string { return u.listener.Addr().String() }

func (u *upstream) close() {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	_ = u.server.Shutdown(ctx)
	_ = u.server.Close()
}

// waitDrained waits, at most for limit, until no stream handler is running.
func (u *upstream) waitDrained(limit time.Duration) bool {
	deadline := time.Now().Add(limit)
	for time.Now().Before(deadline) {
		if u.active.Load() == 0 {
			return true
		}
		time.Sleep(10 * time.Millisecond)
	}
	return u.active.Load() == 0
}

// takeEnded returns and forgets the recorded end times of teardown streams.
func (u *upstream) takeEnded() map[int]time.Time {
	u.mu.Lock()
	defer u.mu.Unlock()
	ended := u.endedAt
	u.endedAt = make(map[int]time.Time)
	return ended
}

// startStream writes the headers of an event stream and the ready event, and
// flushes them so the client sees the stream open at once.
func startStream(w http.ResponseWriter) (*http.ResponseController, error) {
	h := w.Header()
	h.Set("Content-Type", "text/event-stream")
	h.Set("Cache-Control", "no-cache")
	w.WriteHeader(http.StatusOK)
	rc := http.NewResponseController(w)
	if _, err := w.Write([]byte(readyEvent)); err != nil {
		return nil, err
	}
	return rc, rc.Flush()
}

// queryDuration reads a duration query parameter, falling back to def.
func queryDuration(r *http.Request, name string, def time.Duration) time.Duration {
	if v, err := time.ParseDuration(r.URL.Query().Get(name)); err == nil {
		return v
	}
	return def
}

// queryInt reads an integer query parameter, falling back to def.
func queryInt(r *http.Request, name string, def int) int {
	if v, err := strconv.Atoi(r.URL.Query().Get(name)); err == nil {
		return v
	}
	return def
}

// maxLag is how far a paced stream may fall behind its schedule before it
// gives up the events it owes: past it, the schedule restarts from now and the
// events skipped are counted in upstream.skipped, so a run that could not be
// paced shows as one.
const maxLag = 100 * time.Millisecond

// serveEvents sends stamped events of `size` bytes every `interval` (as fast
// as the path accepts them when the interval is 0) for at most `dur`.
// The first event is delayed by a random fraction of the interval, so many
// streams do not tick in lockstep.
//
// Events are scheduled by absolute time: the k-th is due at start + k ×
// interval. A wake-up that comes late sends every event owed by then, one
// write and flush each, so the stream keeps its stated rate even when the
// timer cannot fire every interval (a ticker drops the ticks it could not
// deliver: at 500 µs on a busy machine, about half of them).
func (u *upstream) serveEvents(w http.ResponseWriter, r *http.Request) {
	u.active.Add(1)
	defer u.active.Add(-1)
	interval := queryDuration(r, "interval", 0)
	size := max(queryInt(r, "size", 0), len("data: \n\n")+stampDigits)
	lifetime := queryDuration(r, "dur", time.Minute)

	rc, err := startStream(w)
	if err != nil {
		return
	}
	ctx := r.Context()
	stop := time.NewTimer(lifetime)
	defer stop.Stop()

	event := make([]byte, size)
	copy(event, "data: ")
	for i := len("data: ") + stampDigits; i < size-2; i++ {
		event[i] = 'x'
	}
	event[len("data: ")+stampDigits] = ' '
	event[size-2], event[size-1] = '\n', '\n'
	stamp := event[len("data: ") : len("data: ")+stampDigits]
	send := func() bool {
		writeStamp(stamp, time.Now().UnixNano())
		if _, err := w.Write(event); err != nil {
			return false
		}
		if rc.Flush() != nil {
			return false
		}
		u.sent.Add(1)
		return true
	}

	if interval <= 0 {
		for {
			select {
			case <-ctx.Done():
				return
			case <-stop.C:
				return
			default:
			}
			if !send() {
				return
			}
		}
	}
	next := time.Now().Add(time.Duration(rand.Int64N(int64(interval))))
	wake := time.NewTimer(time.Until(next))
	defer wake.Stop()
	for {
		select {
		case <-wake.C:
		case <-ctx.Done():
			return
		case <-stop.C:
			return
		}
		now := time.Now()
		if lag := now.Sub(next); lag > maxLag {
			owed := int64(lag / interval)
			u.skipped.Add(owed)
			next = next.Add(time.Duration(owed) * interval)
		}
		for !next.After(now) {
			if !send() {
				return
			}
			next = next.Add(interval)
		}
		wake.Reset(time.Until(next))
	}
}

// serveIdle opens a stream, sends the ready event and then nothing, until the
// request ends or `dur` passes. For a stream with an `id`, it records the
// moment it saw the request end: that is the upstream noticing the teardown.
func (u *upstream) serveIdle(w http.ResponseWriter, r *http.Request) {
	u.active.Add(1)
	defer u.active.Add(-1)
	id := queryInt(r, "id", -1)
	lifetime := queryDuration(r, "dur", time.Minute)
	if _, err := startStream(w); err != nil {
		return
	}
	stop := time.NewTimer(lifetime)
	defer stop.Stop()
	select {
	case <-r.Context().Done():
		ended := time.Now()
		if id >= 0 {
			u.mu.Lock()
			u.endedAt[id] = ended
			u.mu.Unlock()
		}
	case <-stop.C:
	}
}

// writeStamp writes ns as exactly stampDigits decimal digits.
func writeStamp(dst []byte, ns int64) {
	for i := len(dst) - 1; i >= 0; i-- {
		dst[i] = byte('0' + ns%10)
		ns /= 10
	}
}

// parseStamp reads the send time from an event's data line, returning false
// when the data is not a stamp (the ready event, for one).
func parseStamp(data []byte) (int64, bool) {
	if len(data) < stampDigits {
		return 0, false
	}
	var ns int64
	for _, c := range data[:stampDigits] {
		if c < '0' || c > '9' {
			return 0, false
		}
		ns = ns*10 + int64(c-'0')
	}
	return ns, true
}

var errNotStream = errors.New("response is not an event stream")

// broadcastEvent is one event of /broadcast, written to every connection at
// once: each handler waits on ready, writes event, and moves on to next.
type broadcastEvent struct {
	ready chan struct{}
	event []byte
	next  *broadcastEvent
}

// broadcast sends one stamped event of size bytes to every /broadcast
// connection: it stamps it with now and wakes every handler, each of which
// writes and flushes it on its own goroutine.
func (u *upstream) broadcast(size int, now int64) {
	event := stampedEvent(size)
	writeStamp(event[len("data: "):len("data: ")+stampDigits], now)
	u.mu.Lock()
	e := u.next
	e.event = event
	e.next = &broadcastEvent{ready: make(chan struct{})}
	u.next = e.next
	u.mu.Unlock()
	close(e.ready)
}

// stampedEvent is a data event of size bytes with room for a stamp.
func stampedEvent(size int) []byte {
	size = max(size, len("data: \n\n")+stampDigits)
	event := make([]byte, size)
	copy(event, "data: ")
	for i := len("data: ") + stampDigits; i < size-2; i++ {
		event[i] = 'x'
	}
	event[len("data: ")+stampDigits] = ' '
	event[size-2], event[size-1] = '\n', '\n'
	return event
}

// serveBroadcast opens a stream, sends the ready event, then every event
// broadcast from then on, until the request ends or `dur` passes.
func (u *upstream) serveBroadcast(w http.ResponseWriter, r *http.Request) {
	u.active.Add(1)
	defer u.active.Add(-1)
	u.broadcastMade.Add(1)
	u.broadcasting.Add(1)
	defer u.broadcasting.Add(-1)
	lifetime := queryDuration(r, "dur", time.Minute)
	u.mu.Lock()
	e := u.next
	u.mu.Unlock()
	rc, err := startStream(w)
	if err != nil {
		return
	}
	stop := time.NewTimer(lifetime)
	defer stop.Stop()
	for {
		select {
		case <-e.ready:
		case <-r.Context().Done():
			return
		case <-stop.C:
			return
		}
		if _, err := w.Write(e.event); err != nil {
			return
		}
		if rc.Flush() != nil {
			return
		}
		e = e.next
	}
}
