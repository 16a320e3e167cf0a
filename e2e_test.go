package caddysse

import (
	"bufio"
	"bytes"
	"compress/gzip"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"regexp"
	"runtime"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2/caddytest"

	"github.com/ssegateway/caddy-sse/internal/ssespec"
)

// These tests run a real Caddy in-process (caddytest, admin on
// localhost:2999) with the real reverse_proxy in front of a real upstream
// on loopback. Every wait is bounded by e2eWait.

const (
	e2eWait = 10 * time.Second
	e2eHost = "http://localhost:29080"
)

// upstream is a legacy SSE server: it streams what the test tells it to and
// never ends a response by itself. It records every request it gets and the
// moment it sees each one end.
type upstream struct {
	srv      *httptest.Server
	requests chan *upstreamRequest
}

type upstreamRequest struct {
	r      *http.Request
	writes chan string
	gone   chan struct{} // closed when the request's context ended
	goneAt time.Time
}

func newUpstream(t *testing.T) *upstream {
	u := &upstream{requests: make(chan *upstreamRequest, 100)}
	u.srv = httptest.NewServer(http.HandlerFunc(u.serve))
	t.Cleanup(u.srv.Close)
	return u
}

func (u *upstream) serve(w http.ResponseWriter, r *http.Request) {
	switch r.URL.Query().Get("kind") {
	case "json":
		w.Header().Set("Content-Type", "application/json")
		w.Write([]byte(`{"ok": true}` + "\n"))
		return
	case "quiet-end":
		// A stream that sends one event, stays quiet for 700ms, and ends.
		w.Header().Set("Content-Type", "text/event-stream")
		w.Write([]byte("data: only\n\n"))
		http.NewResponseController(w).Flush()
		<-time.After(700 * time.Millisecond)
		return
	case "flood":
		w.Header().Set("Content-Type", "text/event-stream")
		chunk := []byte("data: " + strings.Repeat("x", 64<<10) + "\n\n")
		req := u.track(r)
		defer u.markGone(req)
		for i := 0; i < 10_000 && r.Context().Err() == nil; i++ {
			if _, err := w.Write(chunk); err != nil {
				return
			}
			http.NewResponseController(w).Flush()
		}
		<-r.Context().Done()
		return
	}
	w.Header().Set("Content-Type", "text/event-stream")
	var out io.Writer = w
	var gz *gzip.Writer
	if r.URL.Query().Get("kind") == "gzip" {
		// A legacy server that compresses whatever the request says.
		w.Header().Set("Content-Encoding", "gzip")
		gz = gzip.NewWriter(w)
		out = gz
	}
	w.WriteHeader(http.StatusOK)
	http.NewResponseController(w).Flush()
	req := u.track(r)
	defer u.markGone(req)
	for {
		select {
		case s := <-req.writes:
			io.WriteString(out, s)
			if gz != nil {
				gz.Flush()
			}
			http.NewResponseController(w).Flush()
		case <-r.Context().Done():
			return
		}
	}
}

func (u *upstream) track(r *http.Request) *upstreamRequest {
	req := &upstreamRequest{r: r, writes: make(chan string), gone: make(chan struct{})}
	u.requests <- req
	return req
}

func (u *upstream) markGone(req *upstreamRequest) {
	req.goneAt = time.Now()
	close(req.gone)
}

// next returns the next request the upstream received.
func (u *upstream) next(t *testing.T) *upstreamRequest {
	t.Helper()
	select {
	case req := <-u.requests:
		return req
	case <-time.After(e2eWait):
		t.Fatal("upstream got no request")
	}
	return nil
}

func (req *upstreamRequest) send(t *testing.T, s string) {
	t.Helper()
	select {
	case req.writes <- s:
	case <-req.gone:
		t.Fatalf("upstream request already ended; could not send %q", s)
	case <-time.After(e2eWait):
		t.Fatal("upstream did not take the write")
	}
}

func (req *upstreamRequest) waitGone(t *testing.T) time.Time {
	t.Helper()
	select {
	case <-req.gone:
		return req.goneAt
	case <-time.After(e2eWait):
		t.Fatal("upstream request was not cancelled")
	}
	return time.Time{}
}

// startCaddy loads a config whose site on e2eHost fronts the upstream with
// the sse handlers below.
func startCaddy(t *testing.T, up *upstream) {
	t.Helper()
	if os.Getenv("CI") == "true" {
		t.Cleanup(func() {
			if t.Skipped() {
				t.Error("caddytest could not start Caddy; in CI that is a failure")
			}
		})
	}
	tester := caddytest.NewTester(t)
	target := strings.TrimPrefix(up.srv.URL, "http://")
	tester.InitServer(fmt.Sprintf(`{
	admin localhost:2999
	http_port 29080
	https_port 29443
	grace_period 1s
	skip_install_trust
	servers {
		trusted_proxies static 127.0.0.1/8
	}
}
http://localhost:29080 {
	handle /limited* {
		sse {
			max_streams_per_client 1
			last_event_id_query lastEventId
		}
		reverse_proxy %[1]s
	}
	handle /heartbeat* {
		sse {
			heartbeat 100ms
		}
		reverse_proxy %[1]s
	}
	handle /idle* {
		sse {
			heartbeat 100ms
			idle_timeout 400ms
			retry 1s
			close_event bye
		}
		reverse_proxy %[1]s
	}
	handle /lifetime* {
		sse {
			max_lifetime 500ms
			lifetime_jitter 0
			retry 2s
			close_event bye
		}
		reverse_proxy %[1]s
	}
	handle /stall* {
		sse {
			write_timeout 500ms
		}
		reverse_proxy %[1]s
	}
	handle /encoded* {
		encode gzip
		sse {
			heartbeat 100ms
		}
		reverse_proxy %[1]s
	}
	handle {
		sse
		reverse_proxy %[1]s
	}
}`, target), "caddyfile")
}

// clientStream reads a response body in the background so that tests can
// wait for what arrives, with deadlines.
type clientStream struct {
	resp   *http.Response
	cancel context.CancelFunc

	mu      sync.Mutex
	body    bytes.Buffer
	reads   []bodyRead // one per read that returned bytes
	err     error      // the read error that ended the body; io.EOF for a clean end
	endedAt time.Time  // when the body ended
	change  chan struct{}
}

// bodyRead is when a read of the body returned, and the body's length
// after it.
type bodyRead struct {
	at  time.Time
	end int
}

// e2eTransport bounds what a client waits for before a response's body:
// the connection and the response header. Stream bodies are read in the
// background, and every wait on them is bounded by e2eWait.
func e2eTransport() *http.Transport {
	return &http.Transport{
		DisableCompression:    true,
		DialContext:           (&net.Dialer{Timeout: e2eWait}).DialContext,
		TLSHandshakeTimeout:   e2eWait,
		ResponseHeaderTimeout: e2eWait,
	}
}

var (
	// streamClient opens streams: their bodies do not end by themselves.
	streamClient = &http.Client{Transport: e2eTransport()}
	// plainClient is for exchanges that end: each is bounded as a whole.
	plainClient = &http.Client{Transport: e2eTransport(), Timeout: e2eWait}
)

func openStream(t *testing.T, path string, header ...string) *clientStream {
	t.Helper()
	return openStreamAt(t, e2eHost+path, header...)
}

// openStreamAt opens an event stream at url, with the header pairs given.
func openStreamAt(t *testing.T, url string, header ...string) *clientStream {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	req.Header.Set("Accept", "text/event-stream")
	for i := 0; i+1 < len(header); i += 2 {
		req.Header.Set(header[i], header[i+1])
	}
	resp, err := streamClient.Do(req)
	if err != nil {
		t.Fatalf("GET %s: %v", url, err)
	}
	s := &clientStream{resp: resp, cancel: cancel, change: make(chan struct{}, 1)}
	go s.read(resp.Body)
	return s
}

func (s *clientStream) read(body io.ReadCloser) {
	defer body.Close()
	buf := make([]byte, 32<<10)
	for {
		n, err := body.Read(buf)
		at := time.Now()
		s.mu.Lock()
		s.body.Write(buf[:n])
		if n > 0 {
			s.reads = append(s.reads, bodyRead{at: at, end: s.body.Len()})
		}
		if err != nil {
			s.err, s.endedAt = err, time.Now()
		}
		s.mu.Unlock()
		select {
		case s.change <- struct{}{}:
		default:
		}
		if err != nil {
			return
		}
	}
}

func (s *clientStream) snapshot() (string, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.body.String(), s.err
}

// arrivals returns when each occurrence of sub that starts at or after
// offset from in the body arrived: the moment of the read that completed it.
func (s *clientStream) arrivals(sub string, from int) []time.Time {
	s.mu.Lock()
	defer s.mu.Unlock()
	body := s.body.String()
	var times []time.Time
	for i := from; ; {
		j := strings.Index(body[i:], sub)
		if j < 0 {
			return times
		}
		end := i + j + len(sub)
		for _, r := range s.reads {
			if r.end >= end {
				times = append(times, r.at)
				break
			}
		}
		i = end
	}
}

// waitFor waits until the body contains want.
func (s *clientStream) waitFor(t *testing.T, want string) string {
	t.Helper()
	deadline := time.After(e2eWait)
	for {
		body, err := s.snapshot()
		if strings.Contains(body, want) {
			return body
		}
		if err != nil {
			t.Fatalf("body ended (%v) without %q; got %q", err, want, body)
		}
		select {
		case <-s.change:
		case <-deadline:
			t.Fatalf("no %q within %s; got %q", want, e2eWait, body)
		}
	}
}

// waitEnd waits for the body to end and returns it with the read error.
func (s *clientStream) waitEnd(t *testing.T) (string, error) {
	t.Helper()
	deadline := time.After(e2eWait)
	for {
		body, err := s.snapshot()
		if err != nil {
			return body, err
		}
		select {
		case <-s.change:
		case <-deadline:
			t.Fatalf("body did not end within %s; got %q", e2eWait, body)
		}
	}
}

// checkNoStreamGoroutines fails if any goroutine of this module is left,
// such as a timer callback of a stream that ended, or a shared stream's.
func checkNoStreamGoroutines(t *testing.T) {
	t.Helper()
	deadline := time.Now().Add(e2eWait)
	for {
		buf := make([]byte, 1<<20)
		stacks := string(buf[:runtime.Stack(buf, true)])
		var left []string
		for _, g := range strings.Split(stacks, "\n\n") {
			if strings.Contains(g, "caddy-sse.(*stream)") || strings.Contains(g, "caddy-sse.(*Handler)") ||
				strings.Contains(g, "caddy-sse.(*hub") {
				left = append(left, g)
			}
		}
		if len(left) == 0 {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d goroutines of the module outlived their streams:\n%s", len(left), strings.Join(left, "\n\n"))
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func TestE2E(t *testing.T) {
	up := newUpstream(t)
	startCaddy(t, up)

	t.Run("headers and events flushed at once", func(t *testing.T) {
		s := openStream(t, "/events", "Accept-Encoding", "gzip")
		// The client has the response header before any event was sent.
		req := up.next(t)
		if got := req.r.Header.Get("Accept-Encoding"); got != "identity" {
			t.Errorf("upstream got Accept-Encoding %q, want identity", got)
		}
		for k, want := range map[string]string{"Content-Type": "text/event-stream", "X-Accel-Buffering": "no", "Cache-Control": "no-cache"} {
			if got := s.resp.Header.Get(k); got != want {
				t.Errorf("%s = %q, want %q", k, got, want)
			}
		}
		var latencies []time.Duration
		for i := range 20 {
			event := fmt.Sprintf("id: %d\ndata: event %d\n\n", i, i)
			sent := time.Now()
			req.send(t, event)
			s.waitFor(t, event)
			latencies = append(latencies, time.Since(sent))
		}
		slices.Sort(latencies)
		p50 := latencies[len(latencies)/2]
		t.Logf("upstream write to client read: p50 %v, max %v", p50, latencies[len(latencies)-1])
		// On loopback an event takes well under a millisecond; a flush
		// that waits (for a timer, a heartbeat, more bytes) shows in the
		// median, where one slow delivery on a busy machine does not.
		// docs/benchmarks.md has the latency distribution.
		if p50 > 10*time.Millisecond {
			t.Errorf("events reached the client %v after the upstream's write (median), want ≤ 10ms", p50)
		}
		s.cancel()
		req.waitGone(t)
	})

	t.Run("heartbeats while quiet, one period apart", func(t *testing.T) {
		const period = 100 * time.Millisecond // the /heartbeat route's heartbeat
		const beats = 6
		s := openStream(t, "/heartbeat")
		req := up.next(t)
		s.waitFor(t, ":\n\n")
		req.send(t, "data: a\n")
		// The gateway forwards the event's end after this moment, so its
		// first heartbeat cannot reach the client before sent + period.
		sent := time.Now()
		req.send(t, "data: b\n\n")
		body := s.waitFor(t, "data: b\n\n"+strings.Repeat(":\n\n", beats))
		parsed := ssespec.Parse([]byte(body))
		if len(parsed.Events) != 1 || parsed.Events[0].Data != "a\nb" {
			t.Fatalf("events %+v from %q", parsed.Events, body)
		}
		arrived := s.arrivals(":\n\n", strings.Index(body, "data: b\n\n"))
		if len(arrived) < beats {
			t.Fatalf("%d heartbeats found after the event in %q, want %d", len(arrived), body, beats)
		}
		intervals := []time.Duration{arrived[0].Sub(sent)}
		for i := 1; i < beats; i++ {
			intervals = append(intervals, arrived[i].Sub(arrived[i-1]))
		}
		t.Logf("heartbeat %v: the first %v after the event, then %v", period, intervals[0], intervals[1:])
		// From both sides: not before a period of quiet, and not a period
		// late (a doubled period fails), with the rest of the period as
		// room for scheduling on a busy machine.
		if first := intervals[0]; first < period || first >= 2*period {
			t.Errorf("first heartbeat %v after the event, want [%v, %v)", first, period, 2*period)
		}
		// Between heartbeats the client's own delays come in on both
		// sides, so the median interval is held to the period.
		between := slices.Clone(intervals[1:])
		slices.Sort(between)
		if median := between[len(between)/2]; median < period*9/10 || median > period*3/2 {
			t.Errorf("heartbeats %v apart (median), want %v (%v to %v)", median, period, period*9/10, period*3/2)
		}
		s.cancel()
		req.waitGone(t)
	})

	t.Run("idle timeout closes cleanly", func(t *testing.T) {
		s := openStream(t, "/idle")
		req := up.next(t)
		req.send(t, "id: 7\ndata: hello\n\n")
		body, err := s.waitEnd(t)
		if err != io.EOF {
			t.Fatalf("body ended with %v, want a clean end", err)
		}
		req.waitGone(t)
		if !strings.HasPrefix(body, "id: 7\ndata: hello\n\n") || !strings.HasSuffix(body, "retry: 1000\nevent: bye\ndata: idle_timeout\n\n") {
			t.Fatalf("body %q", body)
		}
	})

	t.Run("max lifetime closes at a boundary", func(t *testing.T) {
		s := openStream(t, "/lifetime")
		req := up.next(t)
		sent := 0
		for ; sent < 200; sent++ {
			select {
			case req.writes <- fmt.Sprintf("id: %d\ndata: part one\n", sent):
			case <-req.gone:
			}
			select {
			case req.writes <- "data: part two\n\n":
				continue
			case <-req.gone:
			}
			break
		}
		body, err := s.waitEnd(t)
		if err != io.EOF {
			t.Fatalf("body ended with %v, want a clean end", err)
		}
		parsed := ssespec.Parse([]byte(body))
		if n := len(parsed.Events); n < 2 || parsed.Events[n-1].Type != "bye" || parsed.Events[n-1].Data != "max_lifetime" {
			t.Fatalf("last event is not the close event: %+v", parsed.Events)
		}
		for i, e := range parsed.Events[:len(parsed.Events)-1] {
			if e.Data != "part one\npart two" || e.LastEventID != fmt.Sprint(i) {
				t.Fatalf("event %d damaged: %+v", i, e)
			}
		}
		if !slices.Equal(parsed.Retries, []int64{2000}) {
			t.Fatalf("retries %v", parsed.Retries)
		}
	})

	t.Run("client close tears down the upstream", func(t *testing.T) {
		var teardown []time.Duration
		for range 100 {
			s := openStream(t, "/events")
			req := up.next(t)
			req.send(t, "data: x\n\n")
			s.waitFor(t, "data: x\n\n")
			closed := time.Now()
			s.cancel()
			teardown = append(teardown, req.waitGone(t).Sub(closed))
		}
		slices.Sort(teardown)
		// Nearest-rank percentiles: of 100 closes, p99 is the 99th fastest.
		p50, p99 := teardown[len(teardown)/2-1], teardown[len(teardown)*99/100-1]
		t.Logf("client close to upstream close: p50 %v, p99 %v", p50, p99)
		// The goal is p99 ≤ 5ms, which the benchmark harness measures on
		// a quiet machine (docs/benchmarks.md). Here, under the race
		// detector on a shared machine, the median is held to it, and
		// the tail to 100ms.
		if p50 > 5*time.Millisecond {
			t.Errorf("upstream saw the client leave after %v at p50, want ≤ 5ms", p50)
		}
		if p99 > 100*time.Millisecond {
			t.Errorf("upstream saw the client leave after %v at p99, want ≤ 100ms", p99)
		}
	})

	t.Run("stalled client torn down", func(t *testing.T) {
		const writeTimeout = 500 * time.Millisecond // the /stall route's
		conn, err := net.DialTimeout("tcp", strings.TrimPrefix(e2eHost, "http://"), e2eWait)
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		conn.(*net.TCPConn).SetReadBuffer(4096)
		// Every write to the client starts after the request, so the one
		// that blocks cannot time out before start + write_timeout.
		start := time.Now()
		fmt.Fprintf(conn, "GET /stall?kind=flood HTTP/1.1\r\nHost: localhost\r\nAccept: text/event-stream\r\n\r\n")
		req := up.next(t)
		// The client reads nothing: Caddy's writes fill the socket, miss the
		// write deadline, and the upstream must be cancelled.
		took := req.waitGone(t).Sub(start)
		t.Logf("stalled client: upstream cancelled %v after the request (write_timeout %v)", took, writeTimeout)
		// Filling the socket buffers on loopback takes milliseconds; a
		// write timeout applied twice, or pushed back while the write is
		// blocked, takes at least twice as long.
		if took < writeTimeout || took >= 2*writeTimeout {
			t.Fatalf("stalled client held its upstream for %v, want [%v, %v)", took, writeTimeout, 2*writeTimeout)
		}
	})

	t.Run("clean end after a quiet spell longer than write_timeout", func(t *testing.T) {
		// Over HTTP/1.1 the write deadline stays armed between writes. When
		// the stream has been quiet past it and the upstream then ends, the
		// response's last chunk must still go out: a clean end, not a cut.
		resp, err := plainClient.Get(e2eHost + "/stall?kind=quiet-end") // write_timeout 500ms
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		body, err := io.ReadAll(resp.Body)
		if err != nil || string(body) != "data: only\n\n" {
			t.Fatalf("body %q, err %v; want the event and a clean end", body, err)
		}
	})

	t.Run("non-stream responses pass through", func(t *testing.T) {
		resp, err := plainClient.Get(e2eHost + "/events?kind=json")
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if string(body) != `{"ok": true}`+"\n" || resp.Header.Get("X-Accel-Buffering") != "" || resp.Header.Get("Content-Type") != "application/json" {
			t.Fatalf("changed: %q %v", body, resp.Header)
		}
	})

	t.Run("compressed upstream is decoded and managed", func(t *testing.T) {
		s := openStream(t, "/heartbeat?kind=gzip")
		req := up.next(t)
		if got := s.resp.Header.Get("Content-Encoding"); got != "" {
			t.Fatalf("Content-Encoding %q reached the client", got)
		}
		req.send(t, "data: one\n\n")
		// Heartbeats go in between the decoded events, as on any stream.
		s.waitFor(t, "data: one\n\n:\n\n:\n\n")
		req.send(t, "data: two\n\n")
		s.waitFor(t, "data: two\n\n")
		got, _ := s.snapshot()
		if events := ssespec.Parse([]byte(got)).Events; len(events) != 2 || events[0].Data != "one" || events[1].Data != "two" {
			t.Fatalf("client read %+v from %q", events, got)
		}
		s.cancel()
		req.waitGone(t)
	})

	// encode in front compresses toward the client, whether the upstream
	// sent plain text or gzip the gateway decoded.
	for _, path := range []string{"/encoded", "/encoded?kind=gzip"} {
		t.Run("under encode "+path, func(t *testing.T) {
			s := openStream(t, path, "Accept-Encoding", "gzip")
			req := up.next(t)
			if s.resp.Header.Get("Content-Encoding") != "gzip" {
				t.Fatalf("encode did not compress: %v", s.resp.Header)
			}
			zr, err := gzip.NewReader(&lockedReader{s: s})
			if err != nil {
				t.Fatal(err)
			}
			lines := bufio.NewReader(zr)
			// Heartbeats and events reach the client through the compressor at once.
			readLine := func() string {
				line, err := lines.ReadString('\n')
				if err != nil {
					t.Fatalf("reading decompressed stream: %v", err)
				}
				return line
			}
			if got := readLine() + readLine(); got != ":\n\n" {
				t.Fatalf("first lines %q, want a heartbeat", got)
			}
			req.send(t, "data: compressed\n\n")
			for {
				if line := readLine(); line == "data: compressed\n" {
					break
				}
			}
			s.cancel()
			req.waitGone(t)
		})
	}

	t.Run("per-client limit by the client IP Caddy trusts", func(t *testing.T) {
		first := openStream(t, "/limited?lastEventId=41", "X-Forwarded-For", "192.0.2.1")
		req := up.next(t)
		if got, q := req.r.Header.Get("Last-Event-ID"), req.r.URL.RawQuery; got != "41" || q != "" {
			t.Errorf("upstream got Last-Event-ID %q and query %q; want 41 and none", got, q)
		}
		// Refused with an answer an EventSource survives: a stream that
		// says when to come back, and ends.
		second := openStream(t, "/limited", "X-Forwarded-For", "192.0.2.1")
		if second.resp.StatusCode != http.StatusOK || second.resp.Header.Get("Content-Type") != "text/event-stream" ||
			second.resp.Header.Get("Retry-After") == "" {
			t.Fatalf("second stream of one client: %s %q, Retry-After %q", second.resp.Status,
				second.resp.Header.Get("Content-Type"), second.resp.Header.Get("Retry-After"))
		}
		if body, err := second.waitEnd(t); err != io.EOF || !regexp.MustCompile(`^retry: (1[0-9]{4}|20000)\n\n$`).MatchString(body) {
			t.Fatalf("refusal body %q ended by %v, want a retry between 10 and 20 s and a clean end", body, err)
		}
		// Without Accept, the stream still counts, and is refused at its
		// header with a status (it did not ask for an event stream).
		resp, err := plainClient.Do(func() *http.Request {
			r, _ := http.NewRequest(http.MethodGet, e2eHost+"/limited", nil)
			r.Header.Set("X-Forwarded-For", "192.0.2.1")
			return r
		}())
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		bypass := up.next(t)
		bypass.waitGone(t)
		if resp.StatusCode != http.StatusTooManyRequests {
			t.Fatalf("Accept-less stream over the limit: %s, want 429", resp.Status)
		}
		other := openStream(t, "/limited", "X-Forwarded-For", "192.0.2.2")
		otherReq := up.next(t)
		if other.resp.StatusCode != http.StatusOK {
			t.Fatalf("another client refused: %s", other.resp.Status)
		}
		first.cancel()
		req.waitGone(t)
		other.cancel()
		otherReq.waitGone(t)
	})

	t.Run("a last event id no header can carry gets 400", func(t *testing.T) {
		// Go's transport would refuse it as Last-Event-ID: reverse_proxy's
		// 502 became a refusal that the client retried with the same id.
		r, _ := http.NewRequest(http.MethodGet, e2eHost+"/limited?lastEventId=a%01b", nil)
		r.Header.Set("Accept", "text/event-stream")
		r.Header.Set("X-Forwarded-For", "192.0.2.3")
		resp, err := plainClient.Do(r)
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != http.StatusBadRequest {
			t.Fatalf("answered %s %q, want 400", resp.Status, body)
		}
		// The next request the upstream gets is the next valid one.
		s := openStream(t, "/limited?lastEventId=ok", "X-Forwarded-For", "192.0.2.3")
		req := up.next(t)
		if got := req.r.Header.Get("Last-Event-ID"); got != "ok" {
			t.Fatalf("upstream got a request with Last-Event-ID %q, want only the valid one (ok)", got)
		}
		s.cancel()
		req.waitGone(t)
	})

	checkNoStreamGoroutines(t)
}

// lockedReader reads a clientStream's body as it arrives, waiting (bounded)
// for more.
type lockedReader struct {
	s   *clientStream
	off int
}

func (r *lockedReader) Read(p []byte) (int, error) {
	deadline := time.After(e2eWait)
	for {
		body, err := r.s.snapshot()
		if r.off < len(body) {
			n := copy(p, body[r.off:])
			r.off += n
			return n, nil
		}
		if err != nil {
			return 0, err
		}
		select {
		case <-r.s.change:
		case <-deadline:
			return 0, fmt.Errorf("no data within %s", e2eWait)
		}
	}
}
