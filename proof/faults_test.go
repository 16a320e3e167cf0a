package proof

import (
	"bytes"
	"compress/gzip"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/ssegateway/caddy-sse/internal/ssespec"
)

// faultHeartbeat is the heartbeat of the routes TestFaults uses: short, so
// that the heartbeat timer fires often while upstreams misbehave, and every
// heartbeat written at a wrong moment would show.
const faultHeartbeat = 50 * time.Millisecond

// TestFaults puts broken upstreams behind the gateway. For each, the client
// must get a correct, clean (or cleanly aborted) response, and a bystander
// stream through the same gateway must go on undisturbed.
func TestFaults(t *testing.T) {
	up := newUpstream(t)
	up.handle("reset", resetBehavior)
	up.handle("hang", func(w http.ResponseWriter, r *http.Request, req *upstreamRequest) { <-r.Context().Done() })
	up.handle("status", statusBehavior)
	up.handle("drip", dripBehavior)
	up.handle("big", bigEventBehavior)
	up.handle("gzip", gzipBehavior)
	up.handle("unterminated", unterminatedBehavior)
	g := startGateway(t, up, gatewayConfig{profiles: map[string]profile{
		"fault":      {sse: fmt.Sprintf("heartbeat %s\nwrite_timeout 2s", faultHeartbeat)},
		"hdrtimeout": {sse: fmt.Sprintf("heartbeat %s", faultHeartbeat), proxy: "transport http {\nresponse_header_timeout 1s\n}"},
	}})
	client := newHTTPClient(t, &http.Transport{})
	bystander := startBystander(t, up, client, g.httpURL+"/p/fault/ticker")

	// endsBefore counts the "stream ended" lines logged so far;
	// expectEndReason checks the next one's reason.
	endsBefore := func(t *testing.T) int { return len(g.streamEnds(t)) }
	expectEndReason := func(t *testing.T, before int, want string) {
		t.Helper()
		ends := g.waitStreamEnds(t, before+1, 2*time.Second)
		if got := ends[before].Reason; got != want {
			t.Errorf("the gateway logged the stream's end as %q, want %q", got, want)
		}
	}

	t.Run("reset mid-event", func(t *testing.T) {
		rec := report.start(t, "fault-reset")
		defer bystander.check(t)
		before := endsBefore(t)
		key := up.key("reset")
		s := openStream(t, client, g.httpURL+"/p/fault/reset?k="+key, nil)
		req := up.request(t, key, 1, 5*time.Second)
		// The cut event is forwarded as it comes, before the reset.
		s.waitContains(t, "data: half", 0, 2*time.Second)
		resetAt := time.Now()
		close(req.push) // the go-ahead to reset
		err, endedAt := s.waitEnd(t, 2*time.Second)
		body, _ := s.snapshot()
		if got, want := ssespec.Parse(body), ssespec.Parse([]byte(resetBody)); !reflect.DeepEqual(got, want) {
			t.Errorf("the client parsed %+v, want what the upstream's bytes give: %+v", got, want)
		}
		if !bytes.HasSuffix(body, []byte("data: half")) {
			t.Errorf("the body ends %q; the gateway must add nothing after the cut event", clip(body))
		}
		outcome := "clean end of body"
		if err != nil {
			outcome = "aborted (" + err.Error() + ")"
		}
		rec.figure("client's response ended %s after the reset: %s", ms(endedAt.Sub(resetAt)), outcome)
		expectEndReason(t, before, "upstream_error")
	})

	t.Run("hang before headers", func(t *testing.T) {
		rec := report.start(t, "fault-hang")
		defer bystander.check(t)

		// Without a header timeout the client eventually gives up; the
		// upstream must see its end at once.
		key := up.key("hang")
		ctx, cancel := context.WithCancel(context.Background())
		defer cancel()
		got := asyncGet(ctx, client, g.httpURL+"/p/fault/hang?k="+key)
		req := up.request(t, key, 1, 5*time.Second)
		select {
		case r := <-got:
			t.Fatalf("the client got a response (%v, %v) although the upstream sent no header", r.resp, r.err)
		case <-time.After(300 * time.Millisecond):
		}
		gaveUp := time.Now()
		cancel()
		d := req.waitEnded(t, teardownBound+slack).Sub(gaveUp)
		if d > teardownBound {
			t.Errorf("the upstream saw its end %s after the client gave up, want at most %s", d, teardownBound)
		}
		rec.teardown(d)
		if r := <-got; r.err == nil {
			r.resp.Body.Close()
			t.Errorf("the client got a response with status %d after giving up", r.resp.StatusCode)
		}

		// With reverse_proxy's response_header_timeout the client gets a
		// clean 504 and the upstream is released.
		key = up.key("hang")
		start := time.Now()
		r := <-asyncGet(context.Background(), client, g.httpURL+"/p/hdrtimeout/hang?k="+key)
		if r.err != nil {
			t.Fatalf("with response_header_timeout: %v", r.err)
		}
		body, err := io.ReadAll(r.resp.Body)
		r.resp.Body.Close()
		if r.resp.StatusCode != http.StatusGatewayTimeout || err != nil {
			t.Errorf("with response_header_timeout: status %d, body read error %v; want a clean 504", r.resp.StatusCode, err)
		}
		if r.resp.Header.Get("X-Accel-Buffering") != "" {
			t.Errorf("the 502 carries the stream header X-Accel-Buffering")
		}
		up.request(t, key, 1, time.Second).waitEnded(t, slack)
		rec.figure("504 after %s with response_header_timeout 1s (body %d bytes)", ms(time.Since(start)), len(body))
	})

	t.Run("error status json", func(t *testing.T) {
		report.start(t, "fault-status")
		defer bystander.check(t)
		for _, status := range []int{http.StatusNotFound, http.StatusInternalServerError} {
			url := fmt.Sprintf("%s/p/fault/status?k=%s&status=%d", g.httpURL, up.key("status"), status)
			r := <-asyncGet(context.Background(), client, url)
			if r.err != nil {
				t.Fatal(r.err)
			}
			body, err := io.ReadAll(r.resp.Body)
			r.resp.Body.Close()
			if err != nil {
				t.Fatal(err)
			}
			want := statusBody(status)
			if r.resp.StatusCode != status || string(body) != want {
				t.Errorf("got %d %q, want %d %q", r.resp.StatusCode, body, status, want)
			}
			if ct := r.resp.Header.Get("Content-Type"); ct != "application/json" {
				t.Errorf("%d: Content-Type %q, want application/json", status, ct)
			}
			if r.resp.ContentLength != int64(len(want)) {
				t.Errorf("%d: Content-Length %d, want %d", status, r.resp.ContentLength, len(want))
			}
			for _, h := range []string{"X-Accel-Buffering", "Cache-Control"} {
				if v := r.resp.Header.Get(h); v != "" {
					t.Errorf("%d: the gateway added %s: %s to a response that is no stream", status, h, v)
				}
			}
		}
	})

	t.Run("drip", func(t *testing.T) {
		rec := report.start(t, "fault-drip")
		defer bystander.check(t)
		before := endsBefore(t)
		key := up.key("drip")
		s := openStream(t, client, g.httpURL+"/p/fault/drip?k="+key, nil)
		req := up.request(t, key, 1, 5*time.Second)
		_, firstEventAt := s.waitContains(t, "data: first\r\n\r\n", 0, 2*time.Second)
		if err, _ := s.waitEnd(t, 5*time.Second); err != nil {
			t.Errorf("the body ended with %v, want a clean end", err)
		}
		req.waitDone(t, time.Second)
		finishedAt := time.Unix(0, req.lastWrite.Load())
		if !firstEventAt.Before(finishedAt.Add(-500 * time.Millisecond)) {
			t.Errorf("the first event reached the client at %s, not well before the upstream's last byte at %s",
				firstEventAt.Format("15:04:05.000"), finishedAt.Format("15:04:05.000"))
		}
		body, _ := s.snapshot()
		sent := []byte(strings.Join(dripScript, ""))
		if got, want := ssespec.Parse(body), ssespec.Parse(sent); !reflect.DeepEqual(got, want) {
			t.Errorf("the client parsed\n%+v\nthe upstream's bytes give\n%+v\nbody: %q", got, want, body)
		}
		// Heartbeats during the pauses between events, none during the
		// pause inside an event.
		heartbeats := bytes.Count(body, []byte("\n:\n\n"))
		if heartbeats < 2 {
			t.Errorf("%d heartbeats in %q; want some during the pauses between events", heartbeats, body)
		}
		if !bytes.Contains(body, []byte("data: line one\ndata: line two\n")) {
			t.Errorf("something was written inside the paused event: %q", body)
		}
		s.mu.Lock()
		reads := len(s.arrivals)
		s.mu.Unlock()
		rec.figure("%d bytes reached the client in %d reads, %d heartbeats at boundaries", len(body), reads, heartbeats)
		expectEndReason(t, before, "upstream_end")
	})

	t.Run("10MiB event", func(t *testing.T) {
		rec := report.start(t, "fault-big")
		defer bystander.check(t)
		before := endsBefore(t)
		baseline := liveHeap()
		key := up.key("big")
		ctx, cancel := context.WithCancel(context.Background())
		defer cancel()
		// Reads below are bounded by this, on top of their own deadlines.
		defer time.AfterFunc(30*time.Second, cancel).Stop()
		r := <-asyncGet(ctx, client, g.httpURL+"/p/fault/big?k="+key)
		if r.err != nil {
			t.Fatal(r.err)
		}
		defer r.resp.Body.Close()
		req := up.request(t, key, 1, 5*time.Second)
		m := &boundaryMatcher{want: bigEvent()}
		half := int64(len(bigEventHead)) + bigEventSize/2
		if err := m.readUntil(r.resp.Body, half, 10*time.Second); err != nil {
			t.Fatalf("the first half of the event: %v", err)
		}
		// The upstream pauses mid-event: the client already holds half of
		// it, so the gateway buffers nothing.
		mid := liveHeap()
		growth := int64(mid) - int64(baseline)
		if growth > 2<<20 {
			t.Errorf("the live heap grew by %d KiB while 5 MiB of the event passed; the gateway seems to buffer", growth>>10)
		}
		// Stay mid-event for four heartbeat periods: the heartbeat timer
		// fires and must not write inside the event.
		time.Sleep(4 * faultHeartbeat)
		start := time.Now()
		close(req.push) // the go-ahead for the second half
		if err := m.readUntil(r.resp.Body, m.want.size, 10*time.Second); err != nil {
			t.Fatalf("the second half of the event: %v", err)
		}
		if err := m.readToEnd(r.resp.Body, 5*time.Second); err != nil {
			t.Errorf("after the event: %v", err)
		}
		rec.figure("live heap %+d KiB with half of the event in flight (baseline %d MiB); second half (5 MiB) in %s; %d heartbeats, all at boundaries",
			growth>>10, baseline>>20, ms(time.Since(start)), m.heartbeats)
		expectEndReason(t, before, "upstream_end")
	})

	t.Run("gzip despite request", func(t *testing.T) {
		rec := report.start(t, "fault-gzip")
		defer bystander.check(t)
		// The client asks for gzip; the gateway must not pass that on, and
		// the upstream compresses anyway: the gateway decodes the stream
		// and manages it like any other, heartbeats between events
		// included, and sends it uncompressed (nothing in front of it
		// compresses here).
		before := endsBefore(t)
		key := up.key("gzip")
		s := openStream(t, client, g.httpURL+"/p/fault/gzip?k="+key, http.Header{"Accept-Encoding": {"gzip"}})
		req := up.request(t, key, 1, 5*time.Second)
		if ae := req.Header.Get("Accept-Encoding"); strings.Contains(ae, "gzip") {
			t.Errorf("the upstream received Accept-Encoding %q; the gateway must ask for an uncompressed answer", ae)
		}
		if ce := s.resp.Header.Get("Content-Encoding"); ce != "" {
			t.Errorf("Content-Encoding %q reached the client of a decoded stream", ce)
		}
		if err, _ := s.waitEnd(t, 5*time.Second); err != nil {
			t.Errorf("the body ended with %v, want a clean end", err)
		}
		req.waitDone(t, time.Second)
		body, _ := s.snapshot()
		plain, err := io.ReadAll(mustGzipReader(t, req.sent))
		if err != nil {
			t.Fatalf("decompressing what the upstream sent: %v", err)
		}
		stripped, heartbeats, ok := stripBoundaryHeartbeats(body, plain)
		if !ok || !bytes.Equal(stripped, plain) {
			t.Fatalf("the client got %q; want the upstream's decoded %q with heartbeats only between events", clip(body), clip(plain))
		}
		if heartbeats == 0 {
			t.Errorf("no heartbeat reached the client of a decoded stream")
		}
		expectEndReason(t, before, "upstream_end")
		rec.figure("upstream asked with Accept-Encoding %q; %d compressed bytes decoded to %d, forwarded with %d heartbeats between events",
			req.Header.Get("Accept-Encoding"), len(req.sent), len(plain), heartbeats)
	})

	t.Run("no final blank line", func(t *testing.T) {
		rec := report.start(t, "fault-unterminated")
		defer bystander.check(t)
		for _, ending := range []string{"lf", "cr", "crlf"} {
			before := endsBefore(t)
			key := up.key("unterminated")
			s := openStream(t, client, g.httpURL+"/p/fault/unterminated?k="+key+"&ending="+ending, nil)
			req := up.request(t, key, 1, 5*time.Second)
			err, _ := s.waitEnd(t, 5*time.Second)
			if err != nil {
				t.Errorf("%s: the body ended with %v, want a clean end", ending, err)
			}
			req.waitDone(t, time.Second)
			body, _ := s.snapshot()
			stripped, heartbeats, ok := stripBoundaryHeartbeats(body, req.sent)
			if !ok || !bytes.Equal(stripped, req.sent) {
				t.Errorf("%s: the client got %q, the upstream sent %q (heartbeats only at boundaries allowed)", ending, body, req.sent)
			}
			got := ssespec.Parse(body)
			want := ssespec.Result{Events: []ssespec.Event{{Type: "message", Data: "one", LastEventID: "1"}}, LastEventID: "1"}
			if !reflect.DeepEqual(got, want) {
				t.Errorf("%s: the client parsed %+v, want only the finished event: %+v", ending, got, want)
			}
			rec.figure("%s: %d heartbeats at boundaries", ending, heartbeats)
			expectEndReason(t, before, "upstream_end")
		}
	})

	bystander.finish(t)
	up.waitQuiet(t, 5*time.Second)
	_, total, _, idle := up.counts()
	t.Logf("%d upstream requests, %d idle keep-alive connections left in the gateway's pool", total, idle)
	waitNoModuleGoroutines(t, 5*time.Second)
}

// bystander is a stream that runs through the gateway during the faults
// and must not notice any of them.
type bystander struct {
	s      *clientStream
	req    *upstreamRequest
	events int
}

func startBystander(t *testing.T, up *upstream, client *http.Client, url string) *bystander {
	t.Helper()
	key := up.key("bystander")
	b := &bystander{s: openStream(t, client, url+"?every=20ms&k="+key, nil)}
	b.req = up.request(t, key, 1, 5*time.Second)
	return b
}

// check verifies that the bystander received every tick in order since
// the last check, and at least three new ones.
func (b *bystander) check(t *testing.T) {
	t.Helper()
	want := b.events + 3
	var events []ssespec.Event
	b.s.waitFor(t, "new ticks on the bystander stream", 5*time.Second, func(body []byte, done bool) bool {
		events = ssespec.Parse(body).Events
		return len(events) >= want
	})
	for i, e := range events {
		if e.Data != fmt.Sprintf("tick %d", i+1) || e.LastEventID != fmt.Sprint(i+1) {
			t.Fatalf("bystander event %d is %+v: the stream was disturbed", i+1, e)
		}
	}
	b.events = len(events)
}

// finish checks the bystander one last time and hangs it up.
func (b *bystander) finish(t *testing.T) {
	t.Helper()
	b.check(t)
	hungUp := b.s.hangUp()
	if d := b.req.waitEnded(t, teardownBound+slack).Sub(hungUp); d > teardownBound {
		t.Errorf("the bystander's upstream saw its end %s after the client hung up", d)
	}
	t.Logf("the bystander received %d ticks in order", b.events)
}

type getResult struct {
	resp *http.Response
	err  error
}

// asyncGet sends a GET and delivers the response header (or error) on the
// returned channel.
func asyncGet(ctx context.Context, client *http.Client, url string) <-chan getResult {
	got := make(chan getResult, 1)
	go func() {
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
		if err != nil {
			got <- getResult{nil, err}
			return
		}
		resp, err := client.Do(req)
		got <- getResult{resp, err}
	}()
	return got
}

// resetBody is what the "reset" upstream sends before it resets the
// connection: one whole event and the start of another.
const resetBody = "id: 1\ndata: whole\n\ndata: half"

// resetBehavior answers with an event stream, sends resetBody, and once
// the test closes push, resets the connection (RST, not FIN).
func resetBehavior(w http.ResponseWriter, r *http.Request, req *upstreamRequest) {
	conn, _, err := http.NewResponseController(w).Hijack()
	if err != nil {
		return
	}
	defer conn.Close()
	// Without a length or chunking the body runs until the connection ends.
	head := "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n"
	if _, err := io.WriteString(conn, head+resetBody); err != nil {
		return
	}
	<-req.push
	if tcp, ok := conn.(*net.TCPConn); ok {
		_ = tcp.SetLinger(0)
	}
}

func statusBody(status int) string {
	return fmt.Sprintf(`{"error":%q,"status":%d}`, http.StatusText(status), status)
}

// statusBehavior answers with the status in the query and a JSON body.
func statusBehavior(w http.ResponseWriter, r *http.Request, req *upstreamRequest) {
	var status int
	fmt.Sscan(req.Query["status"], &status)
	body := statusBody(status)
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Content-Length", fmt.Sprint(len(body)))
	w.WriteHeader(status)
	io.WriteString(w, body)
}

// dripScript is what the "drip" upstream sends, one byte every 2 ms; an
// empty piece is a pause of 200 ms (four heartbeat periods). It mixes line
// endings, pauses between events (heartbeats expected), a pause inside an
// event line (none allowed), a pause right after a lone CR whose LF then
// comes from the upstream (CRLF split across the pause), and a last event
// left unfinished.
var dripScript = []string{
	"id: 1\r\ndata: first\r\n\r\n",
	"",
	"event: multi\ndata: line one\ndata: li",
	"",
	"ne two\n\n: a comment\nid: 3\rdata: lone CR\r\r",
	"",
	"\ndata: after the split CRLF\n\n",
	"data: cut",
}

func dripBehavior(w http.ResponseWriter, r *http.Request, req *upstreamRequest) {
	if startEventStream(w, req) != nil {
		return
	}
	for _, piece := range dripScript {
		if piece == "" {
			select {
			case <-time.After(4 * faultHeartbeat):
			case <-r.Context().Done():
				return
			}
		}
		for i := range len(piece) {
			if req.writeFlush(w, []byte{piece[i]}) != nil {
				return
			}
			select {
			case <-time.After(2 * time.Millisecond):
			case <-r.Context().Done():
				return
			}
		}
	}
}

// The "big" upstream sends one event of bigEventSize bytes of data.
const (
	bigEventHead = "id: big\ndata: "
	bigEventTail = "\n\n"
	bigEventSize = 10 << 20
)

// bigEvent describes the big event's bytes without holding them.
func bigEvent() expectedStream {
	head, tail := int64(len(bigEventHead)), int64(len(bigEventTail))
	return expectedStream{
		size: head + bigEventSize + tail,
		at: func(i int64) byte {
			switch {
			case i < head:
				return bigEventHead[i]
			case i < head+bigEventSize:
				return 'a' + byte((i-head)%26)
			default:
				return bigEventTail[i-head-bigEventSize]
			}
		},
	}
}

// bigEventBehavior writes the big event in 32 KiB pieces from one reused
// buffer, pausing after half of its data until the test closes push.
func bigEventBehavior(w http.ResponseWriter, r *http.Request, req *upstreamRequest) {
	if startEventStream(w, req) != nil {
		return
	}
	ev := bigEvent()
	buf := make([]byte, 32<<10)
	half := int64(len(bigEventHead)) + bigEventSize/2
	for off := int64(0); off < ev.size; {
		end := min(off+int64(len(buf)), ev.size)
		if off < half && end > half {
			end = half
		}
		p := buf[:end-off]
		for i := range p {
			p[i] = ev.at(off + int64(i))
		}
		if req.writeFlush(w, p) != nil {
			return
		}
		off = end
		if off == half {
			select {
			case <-req.push:
			case <-r.Context().Done():
				return
			}
		}
	}
}

// expectedStream is a stream of bytes given by position.
type expectedStream struct {
	size int64
	at   func(int64) byte
}

// boundaryMatcher checks, as they are read, that a body is exactly the
// expected stream plus heartbeat comments (":\n\n") where the expected
// stream stands at an event boundary (its start and its end).
type boundaryMatcher struct {
	want       expectedStream
	pos        int64 // bytes of the expected stream matched
	hb         int   // bytes of the heartbeat being read
	heartbeats int
	buf        []byte
}

func (m *boundaryMatcher) feed(p []byte) error {
	const heartbeat = ":\n\n"
	for _, c := range p {
		switch {
		case m.hb > 0 || ((m.pos == 0 || m.pos == m.want.size) && c == ':'):
			if c != heartbeat[m.hb] {
				return fmt.Errorf("byte %q inside a heartbeat at stream offset %d", c, m.pos)
			}
			m.hb = (m.hb + 1) % len(heartbeat)
			if m.hb == 0 {
				m.heartbeats++
			}
		case m.pos >= m.want.size:
			return fmt.Errorf("byte %q after the end of the expected stream", c)
		case c != m.want.at(m.pos):
			return fmt.Errorf("byte %q at offset %d, want %q (a heartbeat inside the event?)", c, m.pos, m.want.at(m.pos))
		default:
			m.pos++
		}
	}
	return nil
}

// readUntil reads and checks the body until pos bytes of the expected
// stream were matched.
func (m *boundaryMatcher) readUntil(body io.Reader, pos int64, within time.Duration) error {
	if m.buf == nil {
		m.buf = make([]byte, 32<<10)
	}
	deadline := time.Now().Add(within)
	for m.pos < pos {
		if time.Now().After(deadline) {
			return fmt.Errorf("only %d of %d bytes within %s", m.pos, pos, within)
		}
		n, err := body.Read(m.buf)
		if ferr := m.feed(m.buf[:n]); ferr != nil {
			return ferr
		}
		if err != nil && m.pos < pos {
			return fmt.Errorf("after %d of %d bytes: %w", m.pos, pos, err)
		}
	}
	return nil
}

// readToEnd reads the rest of the body, which may hold only heartbeats,
// and requires a clean end.
func (m *boundaryMatcher) readToEnd(body io.Reader, within time.Duration) error {
	done := make(chan error, 1)
	go func() {
		for {
			n, err := body.Read(m.buf)
			if ferr := m.feed(m.buf[:n]); ferr != nil {
				done <- ferr
				return
			}
			if errors.Is(err, io.EOF) {
				done <- nil
				return
			}
			if err != nil {
				done <- err
				return
			}
		}
	}()
	select {
	case err := <-done:
		return err
	case <-time.After(within):
		return fmt.Errorf("the body did not end within %s", within)
	}
}

// gzipBehavior answers with a gzip-compressed event stream although the
// request did not ask for it, pausing between its two events for four
// heartbeat periods; it records the compressed bytes it wrote.
func gzipBehavior(w http.ResponseWriter, r *http.Request, req *upstreamRequest) {
	w.Header().Set("Content-Type", "text/event-stream")
	w.Header().Set("Content-Encoding", "gzip")
	w.WriteHeader(http.StatusOK)
	var sent bytes.Buffer
	gz := gzip.NewWriter(io.MultiWriter(w, &sent))
	defer func() { req.sent = sent.Bytes() }()
	for i, event := range []string{"id: 1\ndata: first\n\n", "id: 2\ndata: second\n\n"} {
		if i > 0 {
			select {
			case <-time.After(4 * faultHeartbeat):
			case <-r.Context().Done():
				return
			}
		}
		if _, err := io.WriteString(gz, event); err != nil || gz.Flush() != nil {
			return
		}
		if http.NewResponseController(w).Flush() != nil {
			return
		}
	}
	_ = gz.Close()
}

func mustGzipReader(t *testing.T, b []byte) io.Reader {
	t.Helper()
	zr, err := gzip.NewReader(bytes.NewReader(b))
	if err != nil {
		t.Fatalf("the body is not gzip: %v", err)
	}
	return zr
}

// unterminatedBehavior sends a finished event, then an unfinished one
// whose last line ends as the query's ending says (lf, cr or crlf), then
// waits four heartbeat periods inside it and ends the response. It records
// what it sent.
func unterminatedBehavior(w http.ResponseWriter, r *http.Request, req *upstreamRequest) {
	ending := map[string]string{"lf": "\n", "cr": "\r", "crlf": "\r\n"}[req.Query["ending"]]
	var sent []byte
	defer func() { req.sent = sent }()
	if startEventStream(w, req) != nil {
		return
	}
	for _, piece := range []string{"id: 1\ndata: one\n\n", "", "id: 2\ndata: two" + ending, ""} {
		if piece == "" {
			select {
			case <-time.After(4 * faultHeartbeat):
				continue
			case <-r.Context().Done():
				return
			}
		}
		if req.writeFlush(w, []byte(piece)) != nil {
			return
		}
		sent = append(sent, piece...)
	}
}

// stripBoundaryHeartbeats removes from got the heartbeats (":\n\n") that
// stand where sent, which ends its lines with LF, is at an event boundary:
// its start or right after a blank line. ok is false if a heartbeat stands
// anywhere else.
func stripBoundaryHeartbeats(got, sent []byte) (stripped []byte, heartbeats int, ok bool) {
	const heartbeat = ":\n\n"
	j := 0 // bytes of sent matched
	for i := 0; i < len(got); {
		atBoundary := j == 0 || bytes.HasSuffix(sent[:j], []byte("\n\n"))
		if atBoundary && bytes.HasPrefix(got[i:], []byte(heartbeat)) && (j >= len(sent) || sent[j] != ':') {
			i += len(heartbeat)
			heartbeats++
			continue
		}
		if j >= len(sent) || got[i] != sent[j] {
			return append(stripped, got[i:]...), heartbeats, false
		}
		stripped = append(stripped, got[i])
		i++
		j++
	}
	return stripped, heartbeats, true
}
