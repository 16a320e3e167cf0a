package caddysse

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2/caddytest"
)

// Shared streams across config reloads, through a real Caddy (caddytest,
// admin on localhost:2997, HTTP on 29280, apart from the other end-to-end
// tests' ports), with the real reverse_proxy in front of real upstreams on
// loopback that emit an event every 50 ms, and clients that reconnect the
// way EventSource does. Every wait is bounded by a deadline, every loop by a
// count.

const (
	reloadShareHost  = "http://localhost:29280"
	reloadShareAdmin = "http://localhost:2997"

	sourceEvery = 50 * time.Millisecond // an upstream's event cadence
	// moveEvery is the cadence of the second subtest's upstreams: not a
	// divisor of its max_lifetime, so that the hub's move (a check every
	// max_lifetime from the request's start) does not fall, every time, on
	// the instant the upstream writes.
	moveEvery     = 45 * time.Millisecond
	esIdle        = 5 * time.Second // a client gives up a response silent this long
	esMaxConns    = 200             // connections a client opens at most
	esDefaultWait = 200 * time.Millisecond
)

// shareReloadTargets are the upstreams of shareReloadConfig's routes, and
// the heartbeat of the first subtest's routes.
type shareReloadTargets struct {
	heartbeat       string
	t1assign, t1own string
	t2move          string
	t3own, t3assign string
}

// shareReloadConfig is every subtest's routes: a reload changes only what
// a subtest changes (the heartbeat of /t1, the upstream of /t2), so that
// the routes keep their places, and with them their hubs.
func shareReloadConfig(c shareReloadTargets) string {
	return fmt.Sprintf(`{
	admin localhost:2997
	http_port 29280
	https_port 29643
	grace_period 5s
	skip_install_trust
}
http://localhost:29280 {
	handle /t1/assign* {
		sse {
			heartbeat %[1]s
			retry 200ms
			drain_window 1s
			share {
				assign_ids
			}
		}
		reverse_proxy %[2]s
	}
	handle /t1/own* {
		sse {
			heartbeat %[1]s
			retry 200ms
			drain_window 1s
			share
		}
		reverse_proxy %[3]s
	}
	handle /t2/* {
		sse {
			heartbeat 500ms
			retry 200ms
			drain_window 1s
			max_lifetime 2s
			lifetime_jitter 0
			share
		}
		reverse_proxy %[4]s
	}
	handle /t3/own* {
		sse {
			heartbeat 500ms
			share
		}
		reverse_proxy %[5]s
	}
	handle /t3/assign* {
		sse {
			heartbeat 500ms
			share {
				assign_ids
			}
		}
		reverse_proxy %[6]s
	}
}`, c.heartbeat, c.t1assign, c.t1own, c.t2move, c.t3own, c.t3assign)
}

// reloadSource is a legacy SSE server that emits an event every `every` on
// every request while emitting is on: `data: <name> <n>`, n counting from 1,
// or, when it sends ids of its own (every path but /…/assign…), `id: <n>`
// too, with n counting on from the request's Last-Event-ID.
type reloadSource struct {
	name    string
	every   time.Duration
	srv     *httptest.Server
	arrived chan *sourceReq
	quit    chan struct{}

	// mu is held while an event is written, so that once stop returns
	// nothing more is sent.
	mu       sync.Mutex
	emitting bool
	reqs     []*sourceReq
}

// sourceReq is one request a reloadSource got.
type sourceReq struct {
	path        string
	lastEventID string
	hasLEID     bool
	at          time.Time
	gone        chan struct{}

	mu       sync.Mutex
	goneAt   time.Time
	lastSent int // the n of the last event written and flushed
}

func newReloadSource(t *testing.T, name string, every time.Duration) *reloadSource {
	src := &reloadSource{name: name, every: every, arrived: make(chan *sourceReq, 100), quit: make(chan struct{}), emitting: true}
	src.srv = httptest.NewServer(http.HandlerFunc(src.serve))
	t.Cleanup(src.srv.Close)
	t.Cleanup(func() {
		close(src.quit) // before Close, which waits for the handlers
		src.srv.CloseClientConnections()
	})
	return src
}

func (src *reloadSource) target() string { return strings.TrimPrefix(src.srv.URL, "http://") }

func (src *reloadSource) serve(w http.ResponseWriter, r *http.Request) {
	leid, hasLEID := r.Header["Last-Event-Id"]
	req := &sourceReq{path: r.URL.Path, hasLEID: hasLEID, at: time.Now(), gone: make(chan struct{})}
	if hasLEID {
		req.lastEventID = leid[0]
	}
	ownIDs := !strings.Contains(r.URL.Path, "/assign")
	n := 0
	if v, err := strconv.Atoi(req.lastEventID); err == nil && ownIDs {
		n = v
	}
	req.lastSent = n
	defer func() {
		req.mu.Lock()
		req.goneAt = time.Now()
		req.mu.Unlock()
		close(req.gone)
	}()
	src.mu.Lock()
	src.reqs = append(src.reqs, req)
	src.mu.Unlock()
	select {
	case src.arrived <- req:
	default:
	}
	w.Header().Set("Content-Type", "text/event-stream")
	w.WriteHeader(http.StatusOK)
	rc := http.NewResponseController(w)
	if rc.Flush() != nil {
		return
	}
	tick := time.NewTicker(src.every)
	defer tick.Stop()
	for i := 0; i < 100_000; i++ {
		select {
		case <-tick.C:
		case <-r.Context().Done():
			return
		case <-src.quit:
			return
		}
		var err error
		src.mu.Lock()
		if src.emitting && r.Context().Err() == nil {
			ev := fmt.Sprintf("data: %s %d\n\n", src.name, n+1)
			if ownIDs {
				ev = fmt.Sprintf("id: %d\n", n+1) + ev
			}
			if _, err = io.WriteString(w, ev); err == nil {
				err = rc.Flush()
			}
			if err == nil {
				n++
				req.mu.Lock()
				req.lastSent = n
				req.mu.Unlock()
			}
		}
		src.mu.Unlock()
		if err != nil {
			return
		}
	}
}

// stop ends the emitting: once it returns, no request writes again.
func (src *reloadSource) stop() {
	src.mu.Lock()
	defer src.mu.Unlock()
	src.emitting = false
}

func (src *reloadSource) requests() []*sourceReq {
	src.mu.Lock()
	defer src.mu.Unlock()
	return slices.Clone(src.reqs)
}

func (src *reloadSource) next(t *testing.T) *sourceReq {
	t.Helper()
	select {
	case req := <-src.arrived:
		return req
	case <-time.After(e2eWait):
		t.Fatalf("upstream %s got no request within %s", src.name, e2eWait)
	}
	return nil
}

func (req *sourceReq) sent() int {
	req.mu.Lock()
	defer req.mu.Unlock()
	return req.lastSent
}

func (req *sourceReq) ended() bool {
	select {
	case <-req.gone:
		return true
	default:
		return false
	}
}

// esEvent is one event a client got.
type esEvent struct {
	id    string
	hasID bool // the event had an id field of its own
	data  string
}

// esClient is an EventSource: it opens the stream, takes its events, and
// when the response ends comes back after the retry it was told (200ms
// until told) with Last-Event-ID, until stopped.
type esClient struct {
	url    string
	cancel context.CancelFunc
	done   chan struct{}

	mu        sync.Mutex
	lastID    string
	events    []esEvent
	conns     int // responses with a stream
	connected bool
	misses    int // responses with X-SSE-Replay: miss
	failures  []string
}

// esHTTP opens a connection per request: a client never reuses one that
// a server being replaced is closing.
var esHTTP = &http.Client{Transport: &http.Transport{
	DisableCompression:    true,
	DisableKeepAlives:     true,
	DialContext:           (&net.Dialer{Timeout: e2eWait}).DialContext,
	ResponseHeaderTimeout: e2eWait,
}}

func startESClient(t *testing.T, url string) *esClient {
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	t.Cleanup(cancel)
	c := &esClient{url: url, cancel: cancel, done: make(chan struct{})}
	go c.run(ctx)
	return c
}

func (c *esClient) run(ctx context.Context) {
	defer close(c.done)
	retry := esDefaultWait
	for attempt := 0; attempt < esMaxConns && ctx.Err() == nil; attempt++ {
		if attempt > 0 {
			wait := time.NewTimer(retry)
			select {
			case <-wait.C:
			case <-ctx.Done():
				wait.Stop()
				return
			}
		}
		retry = c.connect(ctx, retry)
	}
}

func (c *esClient) fail(ctx context.Context, format string, args ...any) {
	if ctx.Err() != nil {
		return // stopped: not a failure
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	c.failures = append(c.failures, fmt.Sprintf(format, args...))
}

// connect is one response: it returns the retry to wait before the next.
func (c *esClient) connect(ctx context.Context, retry time.Duration) time.Duration {
	cctx, cancel := context.WithCancel(ctx)
	defer cancel()
	idle := false
	var idleMu sync.Mutex
	watchdog := time.AfterFunc(esIdle, func() {
		idleMu.Lock()
		idle = true
		idleMu.Unlock()
		cancel()
	})
	defer watchdog.Stop()
	req, _ := http.NewRequestWithContext(cctx, http.MethodGet, c.url, nil)
	req.Header.Set("Accept", "text/event-stream")
	c.mu.Lock()
	lastID := c.lastID
	c.mu.Unlock()
	if lastID != "" {
		req.Header.Set("Last-Event-ID", lastID)
	}
	resp, err := esHTTP.Do(req)
	if err != nil {
		c.fail(ctx, "GET: %v", err)
		return retry
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK || !strings.HasPrefix(resp.Header.Get("Content-Type"), "text/event-stream") {
		c.fail(ctx, "response %d %q", resp.StatusCode, resp.Header.Get("Content-Type"))
		return retry
	}
	c.mu.Lock()
	c.conns++
	c.connected = true
	if resp.Header.Get(replayHeader) == "miss" {
		c.misses++
	}
	c.mu.Unlock()
	defer func() {
		c.mu.Lock()
		c.connected = false
		c.mu.Unlock()
	}()
	br := bufio.NewReader(resp.Body)
	idBuf, sawID := lastID, false
	var data []string
	for lines := 0; lines < 1_000_000; lines++ {
		line, err := br.ReadString('\n')
		if err != nil {
			idleMu.Lock()
			wasIdle := idle
			idleMu.Unlock()
			if wasIdle {
				c.fail(ctx, "no byte for %s", esIdle)
			}
			return retry // an unfinished event is dropped, as EventSource does
		}
		watchdog.Reset(esIdle)
		line = strings.TrimSuffix(strings.TrimSuffix(line, "\n"), "\r")
		if line == "" {
			c.mu.Lock()
			c.lastID = idBuf
			if data != nil {
				c.events = append(c.events, esEvent{id: idBuf, hasID: sawID, data: strings.Join(data, "\n")})
			}
			c.mu.Unlock()
			data, sawID = nil, false
			continue
		}
		if strings.HasPrefix(line, ":") {
			continue
		}
		field, value, _ := strings.Cut(line, ":")
		value = strings.TrimPrefix(value, " ")
		switch field {
		case "id":
			if !strings.Contains(value, "\x00") {
				idBuf, sawID = value, true
			}
		case "data":
			data = append(data, value)
		case "retry":
			if ms, err := strconv.ParseUint(value, 10, 32); err == nil {
				retry = time.Duration(ms) * time.Millisecond
			}
		}
	}
	return retry
}

// stop ends the client and waits for it.
func (c *esClient) stop(t *testing.T) {
	t.Helper()
	c.cancel()
	select {
	case <-c.done:
	case <-time.After(e2eWait):
		t.Errorf("client of %s did not stop", c.url)
	}
}

type esSnapshot struct {
	events    []esEvent
	conns     int
	connected bool
	misses    int
	failures  []string
}

func (c *esClient) snapshot() esSnapshot {
	c.mu.Lock()
	defer c.mu.Unlock()
	return esSnapshot{slices.Clone(c.events), c.conns, c.connected, c.misses, slices.Clone(c.failures)}
}

// dataN is the n of an event's data `<name> <n>`, and the name.
func dataN(data string) (string, int) {
	name, num, _ := strings.Cut(data, " ")
	n, err := strconv.Atoi(num)
	if err != nil {
		return name, -1
	}
	return name, n
}

func dataNumber(data string) int {
	_, n := dataN(data)
	return n
}

// idSeq is the number an id counts with: the whole id for an upstream's own
// ids, the part after the dash for the gateway's; and the gateway id's prefix.
func idSeq(id string, gateway bool) (prefix string, n int) {
	if gateway {
		if !isGatewayID(id) {
			return "", -1
		}
		prefix, id, _ = strings.Cut(id, "-")
	}
	n, err := strconv.Atoi(id)
	if err != nil {
		return prefix, -1
	}
	return prefix, n
}

// checkConsecutive reports the first break in a client's events: every
// event must have an id, and the ids (and the data's numbers) count up by
// exactly one from the first event to the last.
func checkConsecutive(events []esEvent, gateway bool) error {
	for i, ev := range events {
		if !ev.hasID {
			return fmt.Errorf("event %d (%q) has no id", i, ev.data)
		}
		prefix, n := idSeq(ev.id, gateway)
		if n < 0 {
			return fmt.Errorf("event %d has the id %q, not of the expected form", i, ev.id)
		}
		if i == 0 {
			continue
		}
		prev := events[i-1]
		pprefix, pn := idSeq(prev.id, gateway)
		if prefix != pprefix || n != pn+1 {
			return fmt.Errorf("event %d has the id %q after %q: a gap or a duplicate", i, ev.id, prev.id)
		}
		if _, dn := dataN(ev.data); dn != dataNumber(prev.data)+1 {
			return fmt.Errorf("event %d is %q after %q: a gap or a duplicate", i, ev.data, prev.data)
		}
	}
	return nil
}

// waitUntil polls cond until it holds, or fails the test at the deadline.
func waitUntil(t *testing.T, within time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(within)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("not within %s: %s", within, what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// reloadShare posts cfg to the admin API and returns when it was sent.
func reloadShare(t *testing.T, tester *caddytest.Tester, cfg string) time.Time {
	t.Helper()
	start := time.Now()
	tester.InitServer(cfg, "caddyfile")
	if t.Failed() {
		t.FailNow()
	}
	t.Logf("reload took %s", time.Since(start).Round(time.Millisecond))
	return start
}

// reconnectedAll waits until every client's response that was open when
// the reload began has ended and the client has a stream again.
func reconnectedAll(t *testing.T, clients []*esClient, before []int, what string) {
	t.Helper()
	waitUntil(t, 3*e2eWait, what, func() bool {
		for i, c := range clients {
			s := c.snapshot()
			if s.conns <= before[i] || !s.connected {
				return false
			}
		}
		return true
	})
}

func connCounts(clients []*esClient) []int {
	var n []int
	for _, c := range clients {
		n = append(n, c.snapshot().conns)
	}
	return n
}

// spread is the minimum, median and maximum of xs.
func spread(xs []int) string {
	if len(xs) == 0 {
		return "none"
	}
	s := slices.Clone(xs)
	slices.Sort(s)
	return fmt.Sprintf("min %d, median %d, max %d", s[0], s[len(s)/2], s[len(s)-1])
}

func TestShareE2EReload(t *testing.T) {
	t1assign := newReloadSource(t, "S", sourceEvery)
	t1own := newReloadSource(t, "O", sourceEvery)
	srcA := newReloadSource(t, "A", moveEvery)
	srcB := newReloadSource(t, "B", moveEvery)
	t3own := newReloadSource(t, "C", sourceEvery)
	t3assign := newReloadSource(t, "D", sourceEvery)
	targets := shareReloadTargets{
		heartbeat: "300ms",
		t1assign:  t1assign.target(), t1own: t1own.target(),
		t2move: srcA.target(),
		t3own:  t3own.target(), t3assign: t3assign.target(),
	}
	tester := caddytest.NewTester(t).WithDefaultOverrides(caddytest.Config{AdminPort: 2997, LoadRequestTimeout: 30 * time.Second})
	tester.InitServer(shareReloadConfig(targets), "caddyfile")
	if t.Failed() {
		t.FailNow()
	}
	t.Cleanup(func() {
		// A config without the routes: their hubs are released, so that
		// nothing of this test outlives it.
		tester.InitServer("{\n\tadmin localhost:2997\n}\n", "caddyfile")
		deadline := time.After(e2eWait)
		for _, src := range []*reloadSource{t1assign, t1own, srcA, srcB, t3own, t3assign} {
			for _, req := range src.requests() {
				select {
				case <-req.gone:
				case <-deadline:
					t.Errorf("upstream %s's request for %s still open after the routes were unloaded", src.name, req.path)
					return
				}
			}
		}
	})

	t.Run("reloads that leave the route alone cost nothing", func(t *testing.T) {
		const perRoute = 25
		type route struct {
			name    string
			path    string
			src     *reloadSource
			gateway bool // the gateway assigns the ids
			clients []*esClient
		}
		routes := []*route{
			{name: "assign_ids", path: "/t1/assign", src: t1assign, gateway: true},
			{name: "upstream ids", path: "/t1/own", src: t1own},
		}
		var all []*esClient
		for _, rt := range routes {
			for range perRoute {
				c := startESClient(t, reloadShareHost+rt.path)
				rt.clients = append(rt.clients, c)
				all = append(all, c)
			}
		}
		defer func() {
			for _, c := range all {
				c.stop(t)
			}
		}()
		waitUntil(t, 3*e2eWait, "every client has a stream and an event", func() bool {
			for _, c := range all {
				if s := c.snapshot(); !s.connected || len(s.events) == 0 {
					return false
				}
			}
			return true
		})
		before := scrapeMetrics(t, reloadShareAdmin)

		for i, hb := range []string{"400ms", "500ms"} {
			conns := connCounts(all)
			targets.heartbeat = hb
			reloadShare(t, tester, shareReloadConfig(targets))
			reconnectedAll(t, all, conns, fmt.Sprintf("every client back after reload %d", i+1))
		}

		// About a second more: 20 events more for every client.
		counts := make([]int, len(all))
		for i, c := range all {
			counts[i] = len(c.snapshot().events)
		}
		waitUntil(t, 3*e2eWait, "20 events more for every client", func() bool {
			for i, c := range all {
				if len(c.snapshot().events) < counts[i]+20 {
					return false
				}
			}
			return true
		})

		for _, rt := range routes {
			rt.src.stop()
		}
		// Every client gets the last event its upstream sent.
		for _, rt := range routes {
			reqs := rt.src.requests()
			if len(reqs) == 0 {
				t.Fatalf("%s: upstream never asked", rt.name)
			}
			last := reqs[len(reqs)-1].sent()
			waitUntil(t, 2*e2eWait, fmt.Sprintf("%s: every client has %s %d", rt.name, rt.src.name, last), func() bool {
				for _, c := range rt.clients {
					evs := c.snapshot().events
					if len(evs) == 0 {
						return false
					}
					if _, n := dataN(evs[len(evs)-1].data); n < last {
						return false
					}
				}
				return true
			})
		}
		for _, c := range all {
			c.stop(t)
		}
		after := scrapeMetrics(t, reloadShareAdmin)

		for _, rt := range routes {
			reqs := rt.src.requests()
			if len(reqs) != 1 {
				var leids []string
				for _, r := range reqs {
					leids = append(leids, fmt.Sprintf("%q@%s", r.lastEventID, r.at.Format("15:04:05.000")))
				}
				t.Errorf("%s: upstream asked %d times, want 1 (Last-Event-IDs: %v)", rt.name, len(reqs), leids)
			}
			var reconnects, events []int
			for i, c := range rt.clients {
				s := c.snapshot()
				reconnects = append(reconnects, s.conns-1)
				events = append(events, len(s.events))
				if err := checkConsecutive(s.events, rt.gateway); err != nil {
					t.Errorf("%s: client %d: %v", rt.name, i, err)
				}
				if s.misses > 0 {
					t.Errorf("%s: client %d: %d responses with %s: miss", rt.name, i, s.misses, replayHeader)
				}
				if len(s.failures) > 0 {
					t.Errorf("%s: client %d: %d failed connections, first: %s", rt.name, i, len(s.failures), s.failures[0])
				}
			}
			t.Logf("%s: %d upstream request(s); %d clients; reconnects per client: %s; events per client: %s",
				rt.name, len(reqs), len(rt.clients), spread(reconnects), spread(events))
		}
		for _, m := range []string{"caddy_sse_shared_upstream_reconnects_total", "caddy_sse_shared_replay_misses_total", "caddy_sse_shared_replayed_events_total"} {
			t.Logf("metrics: %s +%v", m, after[m]-before[m])
		}
		if d := after["caddy_sse_shared_upstream_reconnects_total"] - before["caddy_sse_shared_upstream_reconnects_total"]; d != 0 {
			t.Errorf("metrics: %v shared upstream reconnects during the reloads, want 0", d)
		}
	})

	t.Run("a reload that changes the upstream's address moves the hub within max_lifetime", func(t *testing.T) {
		const n = 10
		const bound = 2*time.Second + 200*time.Millisecond + time.Second // max_lifetime + retry + 1s
		var clients []*esClient
		for range n {
			clients = append(clients, startESClient(t, reloadShareHost+"/t2/move"))
		}
		defer func() {
			for _, c := range clients {
				c.stop(t)
			}
		}()
		aReq := srcA.next(t)
		waitUntil(t, 3*e2eWait, "every client has a stream and 5 events", func() bool {
			for _, c := range clients {
				if s := c.snapshot(); !s.connected || len(s.events) < 5 {
					return false
				}
			}
			return true
		})

		targets.t2move = srcB.target()
		reloadStart := reloadShare(t, tester, shareReloadConfig(targets))
		bReq := srcB.next(t)
		delay := bReq.at.Sub(reloadStart)
		t.Logf("upstream B asked %s after the reload began (bound %s), with Last-Event-ID %q", delay.Round(time.Millisecond), bound, bReq.lastEventID)
		if delay > bound {
			t.Errorf("upstream B asked %s after the reload began, want ≤ %s", delay.Round(time.Millisecond), bound)
		}
		select {
		case <-aReq.gone:
		case <-time.After(e2eWait):
			t.Fatalf("upstream A's request still open %s after B's began", e2eWait)
		}
		aReq.mu.Lock()
		aGone := aReq.goneAt
		aReq.mu.Unlock()
		t.Logf("upstream A's request ended %s after the reload began", aGone.Sub(reloadStart).Round(time.Millisecond))
		lastA := aReq.sent()

		// Five events of B's to every client, then the end of the
		// emitting, and every client has B's last.
		waitUntil(t, 3*e2eWait, "every client has 5 events of B's", func() bool {
			for _, c := range clients {
				s := c.snapshot()
				got := 0
				for _, ev := range s.events {
					if name, _ := dataN(ev.data); name == "B" {
						got++
					}
				}
				if got < 5 {
					return false
				}
			}
			return true
		})
		srcB.stop()
		lastB := bReq.sent()
		waitUntil(t, 2*e2eWait, fmt.Sprintf("every client has B %d", lastB), func() bool {
			for _, c := range clients {
				evs := c.snapshot().events
				if len(evs) == 0 {
					return false
				}
				if _, m := dataN(evs[len(evs)-1].data); m < lastB {
					return false
				}
			}
			return true
		})
		for _, c := range clients {
			c.stop(t)
		}

		// The last of A's events the gateway got: the newest any client has.
		seenA := 0
		var reconnects, events []int
		for i, c := range clients {
			s := c.snapshot()
			reconnects = append(reconnects, s.conns-1)
			events = append(events, len(s.events))
			for _, ev := range s.events {
				if name, m := dataN(ev.data); name == "A" && m > seenA {
					seenA = m
				}
			}
			if err := checkConsecutive(s.events, false); err != nil {
				t.Errorf("client %d: %v", i, err)
			}
			if s.misses > 0 {
				t.Errorf("client %d: %d responses with %s: miss", i, s.misses, replayHeader)
			}
			if len(s.failures) > 0 {
				t.Errorf("client %d: %d failed connections, first: %s", i, len(s.failures), s.failures[0])
			}
		}
		switch leid := bReq.lastEventID; {
		case leid == strconv.Itoa(lastA):
		case leid == strconv.Itoa(seenA) && lastA == seenA+1:
			// A wrote its last event as its request was being ended: the
			// gateway never got it, and rightly asks B from the one before.
			t.Logf("A's last event (%d) was in flight when its request ended; B asked from %d", lastA, seenA)
		default:
			t.Errorf("B's request has Last-Event-ID %q (present %v), want %q: the last id A sent (the clients got A's up to %d)",
				leid, bReq.hasLEID, strconv.Itoa(lastA), seenA)
		}
		t.Logf("A sent up to %d, B from %q to %d; %d clients; reconnects per client: %s; events per client: %s",
			lastA, bReq.lastEventID, lastB, n, spread(reconnects), spread(events))
		t.Logf("upstream requests: A %d, B %d", len(srcA.requests()), len(srcB.requests()))
		if len(srcA.requests()) != 1 {
			t.Errorf("upstream A asked %d times, want 1", len(srcA.requests()))
		}
	})

	t.Run("the first request of a hub carries its client's Last-Event-ID", func(t *testing.T) {
		c := openStreamAt(t, reloadShareHost+"/t3/own", "Last-Event-ID", "41")
		req := t3own.next(t)
		if !req.hasLEID || req.lastEventID != "41" {
			t.Errorf("upstream's first request has Last-Event-ID %q (present %v), want \"41\"", req.lastEventID, req.hasLEID)
		}
		body := c.waitFor(t, "data: C 42\n\n")
		if first := strings.Index(body, "data: "); !strings.Contains(body, "id: 42\ndata: C 42\n\n") || first != strings.Index(body, "data: C 42\n") {
			t.Errorf("the client's first event is not 42: %q", body)
		}
		if got := c.resp.Header.Get(replayHeader); got != "" {
			t.Errorf("%s: %q, want none", replayHeader, got)
		}
		c.cancel()

		gwID := "0123456789ab-7"
		if !isGatewayID(gwID) {
			t.Fatalf("%q is not of the gateway's form", gwID)
		}
		c = openStreamAt(t, reloadShareHost+"/t3/assign", "Last-Event-ID", gwID)
		req = t3assign.next(t)
		if req.hasLEID {
			t.Errorf("with assign_ids, a gateway id started a hub whose upstream request has Last-Event-ID %q, want none", req.lastEventID)
		}
		body = c.waitFor(t, "data: D 1\n\n")
		if line, _, _ := strings.Cut(body, "\n"); !strings.HasPrefix(line, "id: ") || !isGatewayID(strings.TrimPrefix(line, "id: ")) {
			t.Errorf("the first event has no gateway id: %q", body)
		}
		c.cancel()
	})
}
