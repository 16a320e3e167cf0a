//go:build linux

package main

import (
	"bufio"
	"bytes"
	"cmp"
	"context"
	"fmt"
	"io"
	"log"
	"math"
	"mime"
	"net"
	"net/http"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

// sourceAddrs is how many loopback source addresses (127.0.0.2 and up) the
// clients spread over. Each source address has its own ephemeral port range,
// so tens of thousands of streams never run out of ports.
const sourceAddrs = 16

// ipBindAddressNoPort is Linux's IP_BIND_ADDRESS_NO_PORT socket option (not in
// package syscall). With it, binding a source address defers the choice of a
// port to connect, which may then share a port across different destinations
// and reuse ports in TIME_WAIT on loopback.
const ipBindAddressNoPort = 0x18

// dialers holds one dialer per loopback source address.
type dialers struct {
	list []*net.Dialer
	next atomic.Uint64
}

func newDialers() *dialers {
	d := &dialers{}
	for i := range sourceAddrs {
		ip := net.IPv4(127, 0, 0, byte(2+i))
		d.list = append(d.list, &net.Dialer{
			LocalAddr: &net.TCPAddr{IP: ip},
			Timeout:   5 * time.Second,
			Control: func(_, _ string, c syscall.RawConn) error {
				var serr error
				err := c.Control(func(fd uintptr) {
					serr = syscall.SetsockoptInt(int(fd), syscall.IPPROTO_IP, ipBindAddressNoPort, 1)
				})
				if err != nil {
					return err
				}
				return serr
			},
		})
	}
	return d
}

// dial connects from the next source address in turn.
func (d *dialers) dial(ctx context.Context, addr string) (net.Conn, error) {
	dialer := d.list[d.next.Add(1)%uint64(len(d.list))]
	return dialer.DialContext(ctx, "tcp", addr)
}

// stampedConn remembers when its last read returned data. Every layer above it
// (HTTP response parsing, chunked decoding, event parsing) runs on the same
// goroutine, so an event parsed now arrived no later than lastRead.
type stampedConn struct {
	net.Conn
	lastRead int64
}

func (c *stampedConn) Read(p []byte) (int, error) {
	n, err := c.Conn.Read(p)
	if n > 0 {
		c.lastRead = time.Now().UnixNano()
	}
	return n, err
}

// streamStats is what a stream's reader reports while it runs; the counters
// are read by the scenario from another goroutine.
type streamStats struct {
	events     atomic.Int64 // stamped events
	bytes      atomic.Int64 // bytes of stamped events, field names and blank line included
	heartbeats atomic.Int64 // comment lines (the gateway's heartbeats)
}

// stream is one open SSE response read by its own goroutine.
type stream struct {
	conn  *stampedConn
	lines *bufio.Reader
	stats streamStats

	// id is the stream's index in the group it was opened with.
	id int
	// When window is set, the reader appends each stamped event's latency
	// (receive time minus send time, in ns) to samples if the event arrived
	// inside the window.
	window  *sampleWindow
	samples []int64

	closedAt time.Time
	done     chan struct{}
	err      error
}

// openStream sends GET path to addr from the next source address and reads up
// to and including the ready event, at most for limit.
func openStream(ctx context.Context, d *dialers, addr, path string, limit time.Duration) (*stream, error) {
	return openStreamReady(ctx, d, addr, path, limit, true)
}

// openStreamReady is openStream; when ready is false it returns once the
// response headers say the stream is open, without waiting for the ready
// event (a client joining a shared stream, or an Nchan channel, gets none).
func openStreamReady(ctx context.Context, d *dialers, addr, path string, limit time.Duration, ready bool) (*stream, error) {
	return openStreamHost(ctx, d, addr, addr, path, limit, ready)
}

// openStreamHost is openStreamReady with host in the request's Host header.
func openStreamHost(ctx context.Context, d *dialers, addr, host, path string, limit time.Duration, ready bool) (*stream, error) {
	ctx, cancel := context.WithTimeout(ctx, limit)
	defer cancel()
	raw, err := d.dial(ctx, addr)
	if err != nil {
		return nil, err
	}
	conn := &stampedConn{Conn: raw}
	deadline, _ := ctx.Deadline()
	_ = conn.SetDeadline(deadline)
	req := fmt.Sprintf("GET %s HTTP/1.1\r\nHost: %s\r\nAccept: text/event-stream\r\nCache-Control: no-cache\r\n\r\n", path, host)
	if _, err := io.WriteString(conn, req); err != nil {
		conn.Close()
		return nil, err
	}
	resp, err := http.ReadResponse(bufio.NewReaderSize(conn, 64<<10), nil)
	if err != nil {
		conn.Close()
		return nil, err
	}
	mediaType, _, _ := mime.ParseMediaType(resp.Header.Get("Content-Type"))
	if resp.StatusCode != http.StatusOK || mediaType != "text/event-stream" {
		conn.Close()
		return nil, fmt.Errorf("%w: %s %q", errNotStream, resp.Status, resp.Header.Get("Content-Type"))
	}
	s := &stream{conn: conn, lines: bufio.NewReaderSize(resp.Body, 256<<10), done: make(chan struct{})}
	if !ready {
		_ = conn.SetDeadline(time.Time{})
		return s, nil
	}
	line, err := s.lines.ReadSlice('\n')
	if err != nil || string(line) != "data: ready\n" {
		conn.Close()
		return nil, fmt.Errorf("first line %q: %v", line, err)
	}
	if blank, err := s.lines.ReadSlice('\n'); err != nil || len(blank) != 1 {
		conn.Close()
		return nil, fmt.Errorf("ready event not terminated: %q %v", blank, err)
	}
	_ = conn.SetDeadline(time.Time{})
	return s, nil
}

// read parses the stream until it ends or is closed. Only the shapes the
// upstream and the gateways produce need to be understood: LF line endings,
// one data line per event, comment lines.
func (s *stream) read() {
	defer close(s.done)
	for {
		line, err := s.lines.ReadSlice('\n')
		if err != nil {
			s.err = err
			return
		}
		switch {
		case bytes.HasPrefix(line, []byte("data: ")):
			data := line[len("data: "):]
			sent, ok := parseStamp(data)
			if !ok {
				continue
			}
			s.stats.events.Add(1)
			s.stats.bytes.Add(int64(len(line) + 1))
			if s.window != nil {
				received := s.conn.lastRead
				at := received
				if s.window.bySend {
					at = sent
				}
				if at >= s.window.start.Load() && at < s.window.end.Load() {
					s.samples = append(s.samples, received-sent)
				}
			}
		case len(line) > 0 && line[0] == ':':
			s.stats.heartbeats.Add(1)
		}
	}
}

// close hangs up on the gateway and waits for the reader to stop.
func (s *stream) close() {
	s.closedAt = time.Now()
	_ = s.conn.Close()
	<-s.done
}

// sampleWindow is the span of receive times (Unix ns) in which latencies are
// kept. It is shared by all streams of a run and set once they are all open.
// With bySend, an event is kept when it was sent (by its stamp) inside the
// window, so every event of the window counts whatever its delay.
type sampleWindow struct {
	start, end atomic.Int64
	bySend     bool
}

func newSampleWindow() *sampleWindow {
	w := &sampleWindow{}
	w.start.Store(math.MaxInt64)
	w.end.Store(math.MaxInt64)
	return w
}

// set opens the window after warmup for measure, from now.
func (w *sampleWindow) set(warmup, measure time.Duration) (start, end time.Time) {
	start = time.Now().Add(warmup)
	end = start.Add(measure)
	w.end.Store(end.UnixNano())
	w.start.Store(start.UnixNano())
	return start, end
}

// streamSet is a group of streams opened together against one target.
type streamSet struct {
	streams []*stream
	failed  int
	lastErr error
}

// openStreams opens n streams, at most `parallel` being set up at once, with
// pathFor(i) as the request path of the i-th, and starts their readers with
// the given sampling window (nil for none).
func openStreams(ctx context.Context, d *dialers, addr string, n, parallel int, pathFor func(int) string, window *sampleWindow) *streamSet {
	return openStreamsReady(ctx, d, addr, n, parallel, pathFor, window, true)
}

// openStreamsReady is openStreams; ready says whether each stream waits for
// the upstream's ready event (see openStreamReady).
func openStreamsReady(ctx context.Context, d *dialers, addr string, n, parallel int, pathFor func(int) string, window *sampleWindow, ready bool) *streamSet {
	return openStreamsAt(ctx, d, func(int) string { return addr }, "", n, parallel, pathFor, window, ready)
}

// openStreamsAt is openStreamsReady with addrFor(i) as the address of the
// i-th stream (a fleet's gateways in turn) and, unless it is empty, host as
// every stream's Host header instead of its address.
func openStreamsAt(ctx context.Context, d *dialers, addrFor func(int) string, host string, n, parallel int, pathFor func(int) string, window *sampleWindow, ready bool) *streamSet {
	set := &streamSet{streams: make([]*stream, n)}
	var mu sync.Mutex
	sem := make(chan struct{}, parallel)
	var wg sync.WaitGroup
	for i := range n {
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			var s *stream
			var err error
			// A refused connection under a burst of connects is retried a
			// couple of times; anything else is reported.
			for attempt := 0; attempt < 3; attempt++ {
				addr := addrFor(i)
				s, err = openStreamHost(ctx, d, addr, cmp.Or(host, addr), pathFor(i), 15*time.Second, ready)
				if err == nil || ctx.Err() != nil {
					break
				}
				time.Sleep(50 * time.Millisecond)
			}
			if err != nil {
				mu.Lock()
				set.failed++
				set.lastErr = err
				mu.Unlock()
				return
			}
			s.id, s.window = i, window
			set.streams[i] = s
			go s.read()
		}()
	}
	wg.Wait()
	kept := set.streams[:0]
	for _, s := range set.streams {
		if s != nil {
			kept = append(kept, s)
		}
	}
	set.streams = kept
	return set
}

// closeAll hangs up on every stream, `parallel` at a time.
func (set *streamSet) closeAll() {
	var wg sync.WaitGroup
	sem := make(chan struct{}, 64)
	for _, s := range set.streams {
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			s.close()
		}()
	}
	wg.Wait()
}

// totals adds up the counters of all streams.
func (set *streamSet) totals() (events, bytes, heartbeats int64) {
	for _, s := range set.streams {
		events += s.stats.events.Load()
		bytes += s.stats.bytes.Load()
		heartbeats += s.stats.heartbeats.Load()
	}
	return
}

// endedEarly counts streams whose reader stopped before they were closed.
func (set *streamSet) endedEarly() int {
	n := 0
	for _, s := range set.streams {
		select {
		case <-s.done:
			n++
		default:
		}
	}
	return n
}

func discardLogger() *log.Logger { return log.New(io.Discard, "", 0) }
