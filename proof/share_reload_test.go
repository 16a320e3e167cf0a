//go:build linux

package proof

import (
	"bufio"
	"context"
	"encoding/hex"
	"fmt"
	"net"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
)

// Shared streams across config reloads, as rows of the report: a Caddy
// process (reloads go through its admin API's /load, as a deployment's
// would) in front of upstreams on loopback that number their events, and
// clients that reconnect the way EventSource does, with Last-Event-ID.
// Every wait is bounded by a deadline, every loop by a count.

// Options and bounds of the reload cases.
const (
	// reloadEvery is the first case's upstreams' event cadence.
	reloadEvery = 50 * time.Millisecond
	// moveEvery is the second case's: not a divisor of its max_lifetime,
	// so that the hub's check (every max_lifetime from the request's
	// start) does not fall, every time, on the instant the upstream writes.
	moveEvery    = 45 * time.Millisecond
	reloadRetry  = 200 * time.Millisecond
	moveLifetime = 2 * time.Second
	// moveBound is how soon after the reload the new upstream must be
	// asked: max_lifetime + retry + 1 s.
	moveBound = moveLifetime + reloadRetry + time.Second

	reloadPerRoute = 25 // clients per route in the first case
	moveClients    = 10 // clients in the second case

	esIdle     = 5 * time.Second  // a client gives up a response silent this long
	esHeader   = 10 * time.Second // ... or one whose header does not come
	esLife     = 3 * time.Minute  // a client's whole life at most
	esMaxConns = 200              // connections a client opens at most
	// reloadWait bounds the waits for what the clients must see.
	reloadWait = 15 * time.Second
)

// keptProfiles is the first case's configuration: two shared routes, one
// whose upstream sends no ids (the gateway assigns them), one whose
// upstream sends its own. Its reloads change only the heartbeat.
func keptProfiles(heartbeat string) map[string]profile {
	common := fmt.Sprintf("heartbeat %s\nretry %s\ndrain_window 1s", heartbeat, reloadRetry)
	return map[string]profile{
		"assign": {sse: common + "\nshare {\nassign_ids\n}"},
		"own":    {sse: common + "\nshare"},
	}
}

// moveProfiles is the second case's configuration; its reload changes
// only the upstream's address (the process's upstream).
func moveProfiles() map[string]profile {
	return map[string]profile{"move": {sse: fmt.Sprintf(
		"heartbeat 500ms\nretry %s\ndrain_window 1s\nmax_lifetime %s\nlifetime_jitter 0\nshare", reloadRetry, moveLifetime)}}
}

// TestShareReload is the case of shared streams across config reloads.
func TestShareReload(t *testing.T) {
	bin := buildCaddy(t)

	t.Run("reloads that leave a shared route alone", func(t *testing.T) {
		rec := report.start(t, "share-reload-kept")
		up := newUpstream(t)
		type route struct {
			name    string
			path    string
			src     *shareSource
			gateway bool // the gateway assigns the ids
			clients []*esClient
		}
		routes := []*route{
			{name: "assign_ids", path: "/p/assign/assign?k=kept", src: newShareSource("S", reloadEvery, false), gateway: true},
			{name: "upstream ids", path: "/p/own/own?k=kept", src: newShareSource("O", reloadEvery, true)},
		}
		up.handle("assign", routes[0].src.behave)
		up.handle("own", routes[1].src.behave)
		p := startCaddyProcess(t, bin, up, keptProfiles("300ms"))
		client := newESHTTPClient(t)

		var all []*esClient
		for _, rt := range routes {
			for range reloadPerRoute {
				c := startESClient(t, client, p.httpURL+rt.path)
				rt.clients = append(rt.clients, c)
				all = append(all, c)
			}
		}
		defer stopESClients(t, all)
		waitUntil(t, "every client with a stream and an event", reloadWait, func() bool {
			for _, c := range all {
				if s := c.snapshot(); !s.connected || len(s.events) == 0 {
					return false
				}
			}
			return true
		})
		before := p.metrics(t)

		var loads []string
		for i, hb := range []string{"400ms", "500ms"} {
			conns := esConnCounts(all)
			sent, answered := p.load(t, keptProfiles(hb))
			loads = append(loads, ms(answered.Sub(sent)))
			waitUntil(t, fmt.Sprintf("every client back after reload %d", i+1), reloadWait, func() bool {
				for i, c := range all {
					if s := c.snapshot(); s.conns <= conns[i] || !s.connected {
						return false
					}
				}
				return true
			})
		}

		// About a second more: 20 events more for every client.
		counts := make([]int, len(all))
		for i, c := range all {
			counts[i] = len(c.snapshot().events)
		}
		waitUntil(t, "20 events more for every client after the reloads", reloadWait, func() bool {
			for i, c := range all {
				if len(c.snapshot().events) < counts[i]+20 {
					return false
				}
			}
			return true
		})
		// The upstreams stop; every client gets the last event its
		// upstream sent.
		for _, rt := range routes {
			rt.src.stop()
		}
		for _, rt := range routes {
			reqs := rt.src.requests()
			if len(reqs) == 0 {
				t.Fatalf("%s: the upstream was never asked", rt.name)
			}
			last := reqs[len(reqs)-1].sent()
			waitUntil(t, fmt.Sprintf("%s: %s %d at every client", rt.name, rt.src.name, last), reloadWait, func() bool {
				for _, c := range rt.clients {
					evs := c.snapshot().events
					if len(evs) == 0 || dataNumber(evs[len(evs)-1].data) < last {
						return false
					}
				}
				return true
			})
		}
		stopESClients(t, all)
		after := p.metrics(t)

		var figures []string
		for _, rt := range routes {
			reqs := rt.src.requests()
			if len(reqs) != 1 {
				var leids []string
				for _, r := range reqs {
					leids = append(leids, fmt.Sprintf("%q at %s", r.lastEventID, r.req.Started.Format("15:04:05.000")))
				}
				t.Errorf("%s: the upstream was asked %d times, want 1 (Last-Event-IDs: %v)", rt.name, len(reqs), leids)
			}
			var reconnects, events []int
			gaps, dups, misses := 0, 0, 0
			for i, c := range rt.clients {
				s := c.snapshot()
				reconnects = append(reconnects, s.conns-1)
				events = append(events, len(s.events))
				b := countBreaks(s.events, rt.gateway)
				gaps += b.gaps
				dups += b.dups
				misses += s.misses
				if b.first != "" {
					t.Errorf("%s: client %d: %s (%d gaps, %d duplicates, %d malformed)", rt.name, i+1, b.first, b.gaps, b.dups, b.malformed)
				}
				if s.misses > 0 {
					t.Errorf("%s: client %d: %d responses with X-SSE-Replay: miss", rt.name, i+1, s.misses)
				}
				if len(s.failures) > 0 {
					t.Errorf("%s: client %d: %d failed connections, first: %s", rt.name, i+1, len(s.failures), s.failures[0])
				}
				if s.conns-1 < 2 {
					t.Errorf("%s: client %d reconnected %d times over two reloads, want at least 2", rt.name, i+1, s.conns-1)
				}
			}
			figures = append(figures, fmt.Sprintf("%s: %d upstream request(s), %d gaps, %d duplicates, %d `X-SSE-Replay: miss` over %d clients; reconnects per client %s; events per client %s",
				rt.name, len(reqs), gaps, dups, misses, len(rt.clients), intSpread(reconnects), intSpread(events)))
		}
		grew := func(m string) float64 { return after[m] - before[m] }
		if d := grew("caddy_sse_shared_upstream_reconnects_total"); d != 0 {
			t.Errorf("caddy_sse_shared_upstream_reconnects_total grew by %v over the reloads, want 0", d)
		}
		if d := grew("caddy_sse_shared_replay_misses_total"); d != 0 {
			t.Errorf("caddy_sse_shared_replay_misses_total grew by %v over the reloads, want 0", d)
		}
		figure(t, rec, "%s", strings.Join(figures, "; "))
		figure(t, rec, "POST /load answered in %s; over the reloads caddy_sse_shared_upstream_reconnects_total +%v, caddy_sse_shared_replay_misses_total +%v, caddy_sse_shared_replayed_events_total +%v",
			strings.Join(loads, " and "), grew("caddy_sse_shared_upstream_reconnects_total"),
			grew("caddy_sse_shared_replay_misses_total"), grew("caddy_sse_shared_replayed_events_total"))
	})

	t.Run("a reload that changes the upstream's address", func(t *testing.T) {
		rec := report.start(t, "share-reload-move")
		upA, upB := newUpstream(t), newUpstream(t)
		srcA, srcB := newShareSource("A", moveEvery, true), newShareSource("B", moveEvery, true)
		upA.handle("own", srcA.behave)
		upB.handle("own", srcB.behave)
		p := startCaddyProcess(t, bin, upA, moveProfiles())
		client := newESHTTPClient(t)

		var clients []*esClient
		for range moveClients {
			clients = append(clients, startESClient(t, client, p.httpURL+"/p/move/own?k=move"))
		}
		defer stopESClients(t, clients)
		aReq := srcA.next(t, reloadWait)
		waitUntil(t, "every client with a stream and 5 events", reloadWait, func() bool {
			for _, c := range clients {
				if s := c.snapshot(); !s.connected || len(s.events) < 5 {
					return false
				}
			}
			return true
		})

		// The process's upstream is now B: the reloaded configuration
		// differs from the running one by that address alone.
		p.up = upB
		sent, answered := p.load(t, moveProfiles())
		bReq := srcB.next(t, moveBound+reloadWait)
		delay := bReq.req.Started.Sub(sent)
		if delay > moveBound {
			t.Errorf("upstream B was asked %s after the reload was sent, want at most %s (max_lifetime + retry + 1 s)", ms(delay), moveBound)
		}
		aEnded := aReq.req.waitEnded(t, reloadWait)
		lastA := aReq.sent()

		// Five events of B's at every client; then B stops, and every
		// client gets B's last.
		waitUntil(t, "5 events of B's at every client", reloadWait, func() bool {
			for _, c := range clients {
				got := 0
				for _, ev := range c.snapshot().events {
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
		waitUntil(t, fmt.Sprintf("B %d at every client", lastB), reloadWait, func() bool {
			for _, c := range clients {
				evs := c.snapshot().events
				if len(evs) == 0 || dataNumber(evs[len(evs)-1].data) < lastB {
					return false
				}
			}
			return true
		})
		stopESClients(t, clients)

		// The last of A's events the clients got: the newest any has.
		seenA := 0
		gaps, dups := 0, 0
		var reconnects []int
		for i, c := range clients {
			s := c.snapshot()
			reconnects = append(reconnects, s.conns-1)
			for _, ev := range s.events {
				if name, n := dataN(ev.data); name == "A" && n > seenA {
					seenA = n
				}
			}
			b := countBreaks(s.events, false)
			gaps += b.gaps
			dups += b.dups
			if b.first != "" {
				t.Errorf("client %d: %s (%d gaps, %d duplicates, %d malformed)", i+1, b.first, b.gaps, b.dups, b.malformed)
			}
			if s.misses > 0 {
				t.Errorf("client %d: %d responses with X-SSE-Replay: miss", i+1, s.misses)
			}
			if len(s.failures) > 0 {
				t.Errorf("client %d: %d failed connections, first: %s", i+1, len(s.failures), s.failures[0])
			}
		}
		if !bReq.hasLEID || bReq.lastEventID != strconv.Itoa(seenA) {
			t.Errorf("B's request has Last-Event-ID %q (present: %v), want %q: the last id the clients got from A",
				bReq.lastEventID, bReq.hasLEID, strconv.Itoa(seenA))
		}
		inFlight := ""
		switch {
		case lastA == seenA:
		case lastA == seenA+1:
			// A wrote its last event as its request was being ended: the
			// gateway never got it, and rightly asked B from the one before.
			inFlight = fmt.Sprintf(" (A's %d was in flight as its request ended; B sent it again)", lastA)
		default:
			t.Errorf("A sent up to %d, yet the clients got A's events up to %d only", lastA, seenA)
		}
		if n := len(srcA.requests()); n != 1 {
			t.Errorf("upstream A was asked %d times, want 1", n)
		}
		figure(t, rec, "B first asked %s after the reload was sent (bound %s; POST /load answered in %s), with Last-Event-ID %q, the last id the clients got from A%s; A's request ended %s after the reload was sent",
			ms(delay), moveBound, ms(answered.Sub(sent)), bReq.lastEventID, inFlight, ms(aEnded.Sub(sent)))
		figure(t, rec, "%d clients: %d gaps, %d duplicates, events of A up to %d, then of B %d–%d; reconnects per client %s; upstream requests: A %d, B %d",
			len(clients), gaps, dups, seenA, seenA+1, lastB, intSpread(reconnects), len(srcA.requests()), len(srcB.requests()))
	})
}

// shareSource is a legacy SSE server's stream: every `every` it writes
// `data: <name> <n>` to every request, n counting from 1, or, when it
// sends ids of its own, `id: <n>` too, with n counting on from the
// request's Last-Event-ID.
type shareSource struct {
	name    string
	every   time.Duration
	ownIDs  bool
	arrived chan *sourceRequest

	// mu is held while an event is written, so that once stop returns
	// nothing more is sent.
	mu       sync.Mutex
	emitting bool
	reqs     []*sourceRequest
}

// sourceRequest is one request a shareSource got.
type sourceRequest struct {
	req         *upstreamRequest
	lastEventID string
	hasLEID     bool

	mu       sync.Mutex
	lastSent int // the n of the last event written and flushed
}

func newShareSource(name string, every time.Duration, ownIDs bool) *shareSource {
	return &shareSource{name: name, every: every, ownIDs: ownIDs, arrived: make(chan *sourceRequest, 100), emitting: true}
}

func (src *shareSource) behave(w http.ResponseWriter, r *http.Request, req *upstreamRequest) {
	sr := &sourceRequest{req: req}
	if v, ok := r.Header["Last-Event-Id"]; ok {
		sr.lastEventID, sr.hasLEID = v[0], true
	}
	n := 0
	if v, err := strconv.Atoi(sr.lastEventID); err == nil && src.ownIDs {
		n = v
	}
	sr.lastSent = n
	src.mu.Lock()
	src.reqs = append(src.reqs, sr)
	src.mu.Unlock()
	select {
	case src.arrived <- sr:
	default:
	}
	if startEventStream(w, req) != nil {
		return
	}
	ticker := time.NewTicker(src.every)
	defer ticker.Stop()
	for range 100_000 {
		select {
		case <-ticker.C:
		case <-r.Context().Done():
			return
		}
		var err error
		src.mu.Lock()
		if src.emitting && r.Context().Err() == nil {
			ev := fmt.Sprintf("data: %s %d\n\n", src.name, n+1)
			if src.ownIDs {
				ev = fmt.Sprintf("id: %d\n", n+1) + ev
			}
			if err = req.writeFlush(w, []byte(ev)); err == nil {
				n++
				sr.mu.Lock()
				sr.lastSent = n
				sr.mu.Unlock()
			}
		}
		src.mu.Unlock()
		if err != nil {
			return
		}
	}
}

// stop ends the emitting: once it returns, no request writes again.
func (src *shareSource) stop() {
	src.mu.Lock()
	defer src.mu.Unlock()
	src.emitting = false
}

func (src *shareSource) requests() []*sourceRequest {
	src.mu.Lock()
	defer src.mu.Unlock()
	return slices.Clone(src.reqs)
}

// next waits for the source's next request.
func (src *shareSource) next(t *testing.T, within time.Duration) *sourceRequest {
	t.Helper()
	select {
	case sr := <-src.arrived:
		return sr
	case <-time.After(within):
		t.Fatalf("upstream %s got no request within %s", src.name, within)
		return nil
	}
}

func (sr *sourceRequest) sent() int {
	sr.mu.Lock()
	defer sr.mu.Unlock()
	return sr.lastSent
}

// esEvent is one event a client dispatched.
type esEvent struct {
	id    string // the client's last event id after it
	hasID bool   // the event had an id field of its own
	data  string
}

// esClient is an EventSource: it opens the stream, takes its events, and
// when the response ends comes back after the retry it was told (200 ms
// until told) with Last-Event-ID, until stopped, at most esMaxConns times
// and for esLife at most.
type esClient struct {
	url    string
	client *http.Client
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

// newESHTTPClient opens a connection per request, so that a client never
// reuses one that a server being replaced is closing, and bounds the dial
// and the wait for the header.
func newESHTTPClient(t *testing.T) *http.Client {
	return newHTTPClient(t, &http.Transport{
		DisableKeepAlives:     true,
		DialContext:           (&net.Dialer{Timeout: 5 * time.Second}).DialContext,
		ResponseHeaderTimeout: esHeader,
	})
}

func startESClient(t *testing.T, client *http.Client, url string) *esClient {
	ctx, cancel := context.WithTimeout(context.Background(), esLife)
	t.Cleanup(cancel)
	c := &esClient{url: url, client: client, cancel: cancel, done: make(chan struct{})}
	go c.run(ctx)
	return c
}

func (c *esClient) run(ctx context.Context) {
	defer close(c.done)
	retry := reloadRetry
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
	var idleMu sync.Mutex
	idle := false
	watchdog := time.AfterFunc(esIdle, func() {
		idleMu.Lock()
		idle = true
		idleMu.Unlock()
		cancel()
	})
	defer watchdog.Stop()
	req, err := http.NewRequestWithContext(cctx, http.MethodGet, c.url, nil)
	if err != nil {
		c.fail(ctx, "request: %v", err)
		return retry
	}
	req.Header.Set("Accept", "text/event-stream")
	c.mu.Lock()
	lastID := c.lastID
	c.mu.Unlock()
	if lastID != "" {
		req.Header.Set("Last-Event-ID", lastID)
	}
	resp, err := c.client.Do(req)
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
	if resp.Header.Get("X-SSE-Replay") == "miss" {
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
	for range 1_000_000 {
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
			if v, err := strconv.ParseUint(value, 10, 32); err == nil {
				retry = time.Duration(v) * time.Millisecond
			}
		}
	}
	c.fail(ctx, "more than a million lines in one response")
	return retry
}

// stop ends the client and waits for it.
func (c *esClient) stop(t *testing.T) {
	t.Helper()
	c.cancel()
	select {
	case <-c.done:
	case <-time.After(reloadWait):
		t.Errorf("the client of %s did not stop within %s", c.url, reloadWait)
	}
}

func stopESClients(t *testing.T, clients []*esClient) {
	t.Helper()
	for _, c := range clients {
		c.stop(t)
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

func esConnCounts(clients []*esClient) []int {
	var n []int
	for _, c := range clients {
		n = append(n, c.snapshot().conns)
	}
	return n
}

// dataN is the name and the n of an event's data `<name> <n>`; n is -1
// when the data is not of that form.
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

// isGatewayID reports whether id is of the form of the gateway's ids
// (assign_ids): 12 hex digits, a dash, a sequence number.
func isGatewayID(id string) bool {
	prefix, n, ok := strings.Cut(id, "-")
	if !ok || len(prefix) != 12 || n == "" {
		return false
	}
	_, err := hex.DecodeString(prefix)
	_, nerr := strconv.ParseUint(n, 10, 64)
	return err == nil && nerr == nil
}

// idSeq is the number an id counts with: the whole id for an upstream's
// own ids, the part after the dash for the gateway's; and the gateway
// id's prefix. n is -1 for an id of neither form.
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

// breaks counts what is wrong in a client's events, which must count up
// by exactly one, in their ids and in their data's numbers, from the
// first to the last.
type breaks struct {
	gaps, dups, malformed int
	first                 string // the first break, described; empty if none
}

func countBreaks(events []esEvent, gateway bool) breaks {
	var b breaks
	note := func(format string, args ...any) {
		if b.first == "" {
			b.first = fmt.Sprintf(format, args...)
		}
	}
	for i, ev := range events {
		prefix, n := idSeq(ev.id, gateway)
		dn := dataNumber(ev.data)
		if !ev.hasID || n < 0 || dn < 0 {
			b.malformed++
			note("event %d (id %q, own id: %v, data %q) is not of the expected form", i+1, ev.id, ev.hasID, ev.data)
			continue
		}
		if i == 0 {
			continue
		}
		prev := events[i-1]
		pprefix, pn := idSeq(prev.id, gateway)
		pdn := dataNumber(prev.data)
		if pn < 0 || pdn < 0 {
			continue // counted as malformed already
		}
		switch {
		case prefix != pprefix:
			b.malformed++
			note("event %d has the id %q after %q: another stream's ids", i+1, ev.id, prev.id)
		case n <= pn || dn <= pdn:
			b.dups++
			note("event %d (id %q, %q) after (id %q, %q): a duplicate", i+1, ev.id, ev.data, prev.id, prev.data)
		case n != pn+1 || dn != pdn+1:
			b.gaps++
			note("event %d (id %q, %q) after (id %q, %q): a gap", i+1, ev.id, ev.data, prev.id, prev.data)
		}
	}
	return b
}

// intSpread is the minimum, median and maximum of xs.
func intSpread(xs []int) string {
	if len(xs) == 0 {
		return "none"
	}
	s := slices.Sorted(slices.Values(xs))
	return fmt.Sprintf("min %d, median %d, max %d", s[0], s[len(s)/2], s[len(s)-1])
}
