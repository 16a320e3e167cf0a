package caddysse

import (
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2/caddytest"
)

// Shared streams through a real Caddy (caddytest, admin on localhost:2998,
// HTTP on 29180, apart from the other end-to-end tests' ports) with the
// real reverse_proxy in front of a real upstream on loopback. Every wait is
// bounded by e2eWait; every loop by a count.

const (
	shareHost  = "http://localhost:29180"
	shareAdmin = "http://localhost:2998"
)

// shareUpstream is a legacy SSE server driven by the test: each request is
// handed over, and the test writes to it or kills its connection.
type shareUpstream struct {
	srv      *httptest.Server
	requests chan *shareUpReq
	count    atomic.Int64
}

type shareUpReq struct {
	r    *http.Request
	cmds chan string
	gone chan struct{}
}

// abortCmd makes the upstream drop the connection where it stands.
const abortCmd = "\x00abort"

func newShareUpstream(t *testing.T) *shareUpstream {
	u := &shareUpstream{requests: make(chan *shareUpReq, 100)}
	u.srv = httptest.NewServer(http.HandlerFunc(u.serve))
	t.Cleanup(u.srv.Close)
	return u
}

func (u *shareUpstream) serve(w http.ResponseWriter, r *http.Request) {
	u.count.Add(1)
	if r.URL.Query().Get("kind") == "json" {
		w.Header().Set("Content-Type", "application/json")
		io.WriteString(w, `{"ok": true}`)
		return
	}
	w.Header().Set("Content-Type", "text/event-stream")
	w.WriteHeader(http.StatusOK)
	http.NewResponseController(w).Flush()
	req := &shareUpReq{r: r, cmds: make(chan string), gone: make(chan struct{})}
	defer close(req.gone)
	u.requests <- req
	for {
		select {
		case cmd := <-req.cmds:
			if cmd == abortCmd {
				panic(http.ErrAbortHandler) // the connection is closed, nothing more is sent
			}
			if _, err := io.WriteString(w, cmd); err != nil {
				return
			}
			http.NewResponseController(w).Flush()
		case <-r.Context().Done():
			return
		}
	}
}

func (u *shareUpstream) next(t *testing.T) *shareUpReq {
	t.Helper()
	select {
	case req := <-u.requests:
		return req
	case <-time.After(e2eWait):
		t.Fatal("upstream got no request")
	}
	return nil
}

func (u *shareUpstream) none(t *testing.T) {
	t.Helper()
	select {
	case req := <-u.requests:
		t.Fatalf("upstream got an unexpected request for %s", req.r.URL)
	default:
	}
}

func (req *shareUpReq) send(t *testing.T, s string) {
	t.Helper()
	select {
	case req.cmds <- s:
	case <-req.gone:
		t.Fatalf("upstream request already ended; could not send %q", s)
	case <-time.After(e2eWait):
		t.Fatal("upstream did not take the write")
	}
}

func (req *shareUpReq) waitGone(t *testing.T) time.Time {
	t.Helper()
	select {
	case <-req.gone:
		return time.Now()
	case <-time.After(e2eWait):
		t.Fatal("upstream request was not released")
	}
	return time.Time{}
}

func shareConfig(target string, drainVersion string) string {
	return fmt.Sprintf(`{
	admin localhost:2998
	http_port 29180
	https_port 29543
	grace_period 1s
	skip_install_trust
}
http://localhost:29180 {
	handle /linger* {
		sse {
			heartbeat 100ms
			share {
				linger 500ms
			}
		}
		reverse_proxy %[1]s
	}
	handle /slow* {
		sse {
			write_timeout 10s
			share {
				max_backlog 256KiB
				linger off
			}
		}
		reverse_proxy %[1]s
	}
	handle /ids* {
		sse {
			share {
				assign_ids
				linger off
			}
		}
		reverse_proxy %[1]s
	}
	handle {
		sse {
			heartbeat 100ms
			retry 1s
			close_event bye
			drain_window 300ms
			share {
				linger off
			}
		}
		header X-Config %[2]s
		reverse_proxy %[1]s
	}
}`, target, drainVersion)
}

func startShareCaddy(t *testing.T, up *shareUpstream) *caddytest.Tester {
	t.Helper()
	tester := caddytest.NewTester(t).WithDefaultOverrides(caddytest.Config{AdminPort: 2998})
	tester.InitServer(shareConfig(strings.TrimPrefix(up.srv.URL, "http://"), "v1"), "caddyfile")
	return tester
}

func openShared(t *testing.T, path string, header ...string) *clientStream {
	t.Helper()
	return openStreamAt(t, shareHost+path, header...)
}

// events returns the data of every event in body, in order.
func eventData(body string) []string {
	var data []string
	for _, line := range strings.Split(body, "\n") {
		if v, ok := strings.CutPrefix(line, "data: "); ok {
			data = append(data, v)
		}
	}
	return data
}

func TestShareE2E(t *testing.T) {
	up := newShareUpstream(t)
	tester := startShareCaddy(t, up)

	t.Run("many clients, one upstream request", func(t *testing.T) {
		const n = 8
		first := openShared(t, "/news")
		req := up.next(t)
		req.send(t, "id: 1\ndata: hello\n\n")
		first.waitFor(t, "data: hello\n\n")
		clients := []*clientStream{first}
		for i := 1; i < n; i++ {
			clients = append(clients, openShared(t, "/news"))
		}
		// Each has its header, so each has joined: the next events reach all.
		for i := 2; i <= 4; i++ {
			req.send(t, fmt.Sprintf("id: %d\ndata: e%d\n\n", i, i))
		}
		for _, c := range clients {
			c.waitFor(t, "data: e4\n\n")
			if c.resp.StatusCode != http.StatusOK || c.resp.Header.Get("Content-Type") != "text/event-stream" {
				t.Errorf("response %d %q", c.resp.StatusCode, c.resp.Header.Get("Content-Type"))
			}
		}
		up.none(t)
		for _, c := range clients {
			c.cancel()
		}
		req.waitGone(t)
	})

	t.Run("different users never share", func(t *testing.T) {
		alice := openShared(t, "/me", "Authorization", "Bearer alice")
		ra := up.next(t)
		bob := openShared(t, "/me", "Authorization", "Bearer bob")
		rb := up.next(t)
		if ra.r.Header.Get("Authorization") != "Bearer alice" || rb.r.Header.Get("Authorization") != "Bearer bob" {
			t.Fatalf("upstream requests have Authorization %q and %q", ra.r.Header.Get("Authorization"), rb.r.Header.Get("Authorization"))
		}
		ra.send(t, "data: alice-1\n\n")
		rb.send(t, "data: bob-1\n\n")
		ra.send(t, "data: alice-2\n\n")
		a := alice.waitFor(t, "alice-2")
		b := bob.waitFor(t, "bob-1")
		if strings.Contains(a, "bob") || strings.Contains(b, "alice") {
			t.Errorf("events crossed users: alice got %q, bob got %q", a, b)
		}
		alice.cancel()
		bob.cancel()
		ra.waitGone(t)
		rb.waitGone(t)
	})

	t.Run("upstream killed three times, clients see every event once", func(t *testing.T) {
		a := openShared(t, "/kill")
		b := openShared(t, "/kill")
		req := up.next(t)
		var want []string
		seq := 0
		event := func() string {
			seq++
			want = append(want, fmt.Sprintf("e%d", seq))
			return fmt.Sprintf("id: %d\ndata: e%d\n\n", seq, seq)
		}
		req.send(t, event())
		a.waitFor(t, "data: e1\n\n")
		b.waitFor(t, "data: e1\n\n")
		for kill := 1; kill <= 3; kill++ {
			req.send(t, event())
			if kill%2 == 0 {
				// Killed inside an event: its first half never reaches anyone.
				req.send(t, fmt.Sprintf("id: %d\ndata: e%d", seq+1, seq+1))
			}
			req.send(t, abortCmd)
			req = up.next(t)
			if got, wantID := req.r.Header.Get("Last-Event-ID"), strconv.Itoa(seq); got != wantID {
				t.Errorf("reconnect %d: Last-Event-ID %q, want %q", kill, got, wantID)
			}
			// The upstream resends the last event it had: dropped as a duplicate.
			req.send(t, fmt.Sprintf("id: %d\ndata: e%d\n\n", seq, seq))
			req.send(t, event())
		}
		last := fmt.Sprintf("data: e%d\n\n", seq)
		for _, c := range []*clientStream{a, b} {
			body := c.waitFor(t, last)
			if got := eventData(body); strings.Join(got, ",") != strings.Join(want, ",") {
				t.Errorf("client got %v, want %v", got, want)
			}
			if _, err := c.snapshot(); err != nil {
				t.Errorf("client's response ended: %v", err)
			}
		}
		// After the close of the last client, a later one can replay.
		a.cancel()
		c := openShared(t, "/kill", "Last-Event-ID", "3")
		body := c.waitFor(t, last)
		if got, wantData := strings.Join(eventData(body), ","), strings.Join(want[3:], ","); got != wantData {
			t.Errorf("replay from 3 got %v, want %v", got, wantData)
		}
		b.cancel()
		c.cancel()
		req.waitGone(t)
		if m := scrapeMetrics(t, shareAdmin); m["caddy_sse_shared_upstream_reconnects_total"] < 3 || m["caddy_sse_shared_replayed_events_total"] < 1 {
			t.Errorf("metrics %v", m)
		}
	})

	t.Run("not a stream: passed through, not shared", func(t *testing.T) {
		for i := 0; i < 2; i++ {
			n := up.count.Load()
			c := openShared(t, "/api?kind=json")
			body, err := c.waitEnd(t)
			if err != io.EOF || body != `{"ok": true}` || c.resp.Header.Get("Content-Type") != "application/json" {
				t.Errorf("got %q, %v, %q", body, err, c.resp.Header.Get("Content-Type"))
			}
			if up.count.Load() != n+1 {
				t.Errorf("request %d: %d upstream requests, want 1", i, up.count.Load()-n)
			}
		}
	})

	t.Run("replay miss", func(t *testing.T) {
		a := openShared(t, "/miss")
		req := up.next(t)
		req.send(t, "id: 1\ndata: one\n\n")
		a.waitFor(t, "one")
		b := openShared(t, "/miss", "Last-Event-ID", "unknown")
		if got := b.resp.Header.Get(replayHeader); got != "miss" {
			t.Errorf("%s: %q, want miss", replayHeader, got)
		}
		req.send(t, "id: 2\ndata: two\n\n")
		if got := b.waitFor(t, "id: 2\ndata: two\n\n"); strings.Contains(got, "one") {
			t.Errorf("miss got %q", got)
		}
		a.cancel()
		b.cancel()
		req.waitGone(t)
	})

	t.Run("assign_ids resume", func(t *testing.T) {
		a := openShared(t, "/ids")
		req := up.next(t)
		req.send(t, "data: one\n\n")
		req.send(t, "data: two\n\n")
		body := a.waitFor(t, "data: two\n\n")
		line, _, _ := strings.Cut(body, "\n")
		id, ok := strings.CutPrefix(line, "id: ")
		if !ok {
			t.Fatalf("no id assigned: %q", body)
		}
		b := openShared(t, "/ids", "Last-Event-ID", id)
		got := b.waitFor(t, "data: two\n\n")
		if strings.Contains(got, "one") || !strings.HasPrefix(got, "id: ") {
			t.Errorf("resume from %q got %q", id, got)
		}
		a.cancel()
		b.cancel()
		req.waitGone(t)
	})

	t.Run("a client that stops reading is dropped, the others go on", func(t *testing.T) {
		fast := openShared(t, "/slow")
		req := up.next(t)
		// The slow client asks and never reads.
		conn, err := net.DialTimeout("tcp", "localhost:29180", e2eWait)
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		fmt.Fprintf(conn, "GET /slow HTTP/1.1\r\nHost: localhost:29180\r\nAccept: text/event-stream\r\n\r\n")
		deadline := time.Now().Add(e2eWait)
		for scrapeMetrics(t, shareAdmin)["caddy_sse_shared_subscribers"] < 2 {
			if time.Now().After(deadline) {
				t.Fatal("slow client never joined")
			}
			time.Sleep(10 * time.Millisecond)
		}
		const endedSlow = `caddy_sse_streams_ended_total{reason="slow_client"}`
		m0 := scrapeMetrics(t, shareAdmin)
		before := m0["caddy_sse_shared_slow_drops_total"]
		chunk := strings.Repeat("x", 16<<10)
		dropped := false
		batches := 0
		// Batches of 256 KiB, each taken by the fast client before the next:
		// the slow client's socket buffers fill, then it falls behind.
		for batch := 1; batch <= 400 && !dropped; batch++ {
			batches = batch
			for i := 0; i < 16; i++ {
				req.send(t, fmt.Sprintf("data: %d-%d %s\n\n", batch, i, chunk))
			}
			fast.waitFor(t, fmt.Sprintf("data: %d-15 ", batch))
			dropped = scrapeMetrics(t, shareAdmin)["caddy_sse_shared_slow_drops_total"] > before
		}
		if !dropped {
			t.Fatal("slow client was not dropped")
		}
		t.Logf("slow client dropped after %d MiB", batches/4)
		// The drop shows as the stream's end, once its handler has returned.
		deadline = time.Now().Add(e2eWait)
		for scrapeMetrics(t, shareAdmin)[endedSlow] <= m0[endedSlow] {
			if time.Now().After(deadline) {
				t.Fatal("no stream ended with reason slow_client")
			}
			time.Sleep(10 * time.Millisecond)
		}
		req.send(t, "data: after\n\n")
		fast.waitFor(t, "data: after\n\n")
		if _, err := fast.snapshot(); err != nil {
			t.Errorf("fast client's response ended: %v", err)
		}
		fast.cancel()
		req.waitGone(t)
	})

	t.Run("the last client leaving releases the upstream after linger", func(t *testing.T) {
		a := openShared(t, "/linger")
		req := up.next(t)
		req.send(t, "id: 1\ndata: one\n\n")
		a.waitFor(t, "one")
		a.cancel()
		// Back within linger: the same upstream request.
		b := openShared(t, "/linger", "Last-Event-ID", "1")
		req.send(t, "id: 2\ndata: two\n\n")
		b.waitFor(t, "two")
		up.none(t)
		left := time.Now()
		b.cancel()
		gone := req.waitGone(t)
		t.Logf("upstream released %s after the last client left (linger 500ms)", gone.Sub(left).Round(time.Millisecond))
		if d := gone.Sub(left); d < 400*time.Millisecond {
			t.Errorf("upstream released %s after the last client left, want about 500ms", d)
		}
	})

	t.Run("drain ends shared streams and their upstreams", func(t *testing.T) {
		var clients []*clientStream
		var reqs []*shareUpReq
		for _, path := range []string{"/drain-a", "/drain-b"} {
			for i := 0; i < 3; i++ {
				clients = append(clients, openShared(t, path))
			}
			req := up.next(t)
			req.send(t, "data: before\n\n")
			reqs = append(reqs, req)
		}
		for _, c := range clients {
			c.waitFor(t, "before")
		}
		tester.InitServer(shareConfig(strings.TrimPrefix(up.srv.URL, "http://"), "v2"), "caddyfile")
		for _, c := range clients {
			body, err := c.waitEnd(t)
			if err != io.EOF || !strings.HasSuffix(body, "data: drain\n\n") {
				t.Errorf("client ended with %v, %q", err, body)
			}
		}
		for _, req := range reqs {
			req.waitGone(t)
		}
		checkNoStreamGoroutines(t)
		if m := scrapeMetrics(t, shareAdmin); m["caddy_sse_shared_upstreams_open"] != 0 || m["caddy_sse_shared_subscribers"] != 0 {
			t.Errorf("after drain: %v upstreams, %v subscribers", m["caddy_sse_shared_upstreams_open"], m["caddy_sse_shared_subscribers"])
		}
	})

	if os.Getenv("SHARE_E2E_COUNT") != "" {
		t.Logf("upstream requests: %d", up.count.Load())
	}
}
