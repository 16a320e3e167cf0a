package caddysse

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"io"
	"math/rand/v2"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddytest"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"github.com/prometheus/client_golang/prometheus/testutil"
)

// Safety of shared streams, through the handler with the share harness
// (share_test.go) and, for what a user sees, through a real Caddy
// (caddytest, admin on localhost:2996, HTTP on 29380, apart from the other
// end-to-end tests' ports). Every wait is bounded; every loop by a count.

// safetyReq is a request for an event stream at path, with the header
// pairs given.
func safetyReq(path string, header ...string) *http.Request {
	req := httptest.NewRequest(http.MethodGet, path, nil)
	req.Header.Set("Accept", "text/event-stream")
	for i := 0; i+1 < len(header); i += 2 {
		req.Header.Set(header[i], header[i+1])
	}
	return req
}

// withReplacer gives req a replacer and vars of its own, as Caddy's server
// does for every request.
func withReplacer(req *http.Request) (*http.Request, *caddy.Replacer) {
	repl := caddy.NewReplacer()
	return caddyhttp.PrepareRequest(req, repl, nil, nil), repl
}

// serveReq runs req through h to next, writing to w (whose recording is
// mw), until the client goes away (cancel) or the handler returns.
func serveReq(t *testing.T, h *Handler, next caddyhttp.Handler, req *http.Request, w http.ResponseWriter, mw *memWriter) *client {
	ctx, cancel := context.WithCancel(req.Context())
	t.Cleanup(cancel)
	req = req.WithContext(ctx)
	c := &client{w: mw, cancel: cancel, done: make(chan struct{})}
	go func() {
		defer close(c.done)
		c.err = h.ServeHTTP(w, req, next)
	}()
	return c
}

func startReq(t *testing.T, h *Handler, next caddyhttp.Handler, req *http.Request) *client {
	w := newMemWriter()
	return serveReq(t, h, next, req, w, w)
}

// endedBody waits, without failing from another goroutine, for c's
// request to end, and returns everything it was written.
func endedBody(c *client) (string, bool) {
	select {
	case <-c.done:
	case <-time.After(testWait):
		return c.w.received(), false
	}
	c.w.mu.Lock()
	defer c.w.mu.Unlock()
	return c.w.body.String(), true
}

// numbered is the n-th event of the tests' upstreams.
func numbered(n int) string { return fmt.Sprintf("id: %d\ndata: e%d\n\n", n, n) }

// wholeEvents reads a client's body made of numbered events and heartbeat
// comments: the events' numbers, or what is wrong with it.
func wholeEvents(body string) ([]int, string) {
	if body == "" {
		return nil, ""
	}
	if !strings.HasSuffix(body, "\n\n") {
		return nil, fmt.Sprintf("the body ends inside an event: %q", body[max(0, len(body)-40):])
	}
	var ids []int
	for _, block := range strings.Split(strings.TrimSuffix(body, "\n\n"), "\n\n") {
		if block == ":" {
			continue // a heartbeat
		}
		var n int
		if _, err := fmt.Sscanf(block, "id: %d\n", &n); err != nil || block+"\n\n" != numbered(n) {
			return ids, fmt.Sprintf("not a whole event: %q", block)
		}
		ids = append(ids, n)
	}
	return ids, ""
}

// contiguous reports a gap or a repeat in ids, if any.
func contiguous(ids []int) string {
	for i := 1; i < len(ids); i++ {
		if ids[i] != ids[i-1]+1 {
			return fmt.Sprintf("event %d follows event %d", ids[i], ids[i-1])
		}
	}
	return ""
}

func hubCount(h *Handler) int {
	h.hubs.mu.Lock()
	defer h.hubs.mu.Unlock()
	return len(h.hubs.hubs)
}

// TestShareSafetyAssignIDsEmptyID checks that with assign_ids an event with
// an empty `id:` keeps it (it resets the client's last event ID), that a
// client resumes from a gateway id across it, and that gateway ids never go
// upstream: not when the hub asks again, not when a client that holds one
// starts a hub.
func TestShareSafetyAssignIDsEmptyID(t *testing.T) {
	defer verifyNoNewGoroutines(t)()
	h, clock := shareHandler(t, &ShareConfig{AssignIDs: true})
	up := newHubUpstream()
	a := startClient(t, h, up, "/empty")
	hr := up.next(t)
	hr.send(t, "data: a\n\n")
	hr.send(t, "id:\ndata: b\n\n")
	hr.send(t, "data: c\n\n")
	p := onlyHub(t, h).idPrefix
	if want, got := "id: "+p+"0\ndata: a\n\nid:\ndata: b\n\nid: "+p+"2\ndata: c\n\n", a.waitBody(t, "data: c\n\n"); got != want {
		t.Errorf("client got %q, want %q: b sent as is, a and c with gateway ids", got, want)
	}
	b := startClient(t, h, up, "/empty", "Last-Event-ID", p+"0")
	if want, got := "id:\ndata: b\n\nid: "+p+"2\ndata: c\n\n", b.waitBody(t, "data: c\n\n"); got != want {
		t.Errorf("client resuming from a's gateway id got %q, want %q", got, want)
	}
	if got := b.w.header.Get(replayHeader); got != "" {
		t.Errorf("%s: %q on a resume that hit", replayHeader, got)
	}

	// The upstream's own last id is the empty one: asked again, it gets no
	// Last-Event-ID, and certainly not c's gateway id.
	hr.end <- false
	hr = advanceUntilRequest(t, clock, up)
	if got, ok := hr.r.Header["Last-Event-Id"]; ok {
		t.Errorf("the hub asked again with Last-Event-ID %q, want none (the upstream's last id was empty; %q is the gateway's)", got, p+"2")
	}
	hr.send(t, "id: u7\ndata: d\n\n")
	hr.send(t, "data: e\n\n")
	if got := a.waitBody(t, "data: e\n\n"); !strings.HasSuffix(got, "id: u7\ndata: d\n\nid: "+p+"4\ndata: e\n\n") {
		t.Errorf("after the reconnect the client got %q", got)
	}
	hr.end <- true
	hr = advanceUntilRequest(t, clock, up)
	if got := hr.r.Header.Get("Last-Event-ID"); got != "u7" {
		t.Errorf("the hub asked again with Last-Event-ID %q, want the upstream's own u7 (not the gateway's %q)", got, p+"4")
	}
	for _, cl := range []*client{a, b} {
		cl.cancel()
		cl.waitDone(t)
	}
	hr.waitGone(t)

	// A client that holds a gateway id starts a new hub: the id is not the
	// upstream's, so it does not go upstream.
	c := startClient(t, h, up, "/empty", "Last-Event-ID", p+"4")
	hr = up.next(t)
	if got, ok := hr.r.Header["Last-Event-Id"]; ok {
		t.Errorf("a hub started by a client holding a gateway id asked the upstream with Last-Event-ID %q", got)
	}
	c.cancel()
	c.waitDone(t)
	hr.waitGone(t)
}

// TestShareSafetyStreamRateCountsUpstreamRequests checks that
// max_stream_rate counts upstream requests, not clients: 20 clients that
// join a live shared stream are all served, and a third key within the
// same second is refused.
func TestShareSafetyStreamRateCountsUpstreamRequests(t *testing.T) {
	defer verifyNoNewGoroutines(t)()
	h := &Handler{Heartbeat: seconds(15), Retry: seconds(3), CloseEvent: "bye", MaxStreamRate: 2, Share: &ShareConfig{Linger: -1}}
	provisionTest(t, h)
	up := newHubUpstream()
	first := startClient(t, h, up, "/live")
	hr := up.next(t)
	hr.send(t, "id: 1\ndata: one\n\n")
	first.waitBody(t, "data: one\n\n")

	clients := []*client{first}
	for i := 0; i < 20; i++ {
		clients = append(clients, startClient(t, h, up, "/live"))
	}
	leave := func() {
		for _, cl := range clients {
			cl.cancel()
			cl.waitDone(t)
		}
		hr.waitGone(t)
	}
	deadline := time.Now().Add(testWait)
	for joined, refused := 0, 0; joined < len(clients); {
		joined = 0
		h.hubs.mu.Lock()
		for _, hb := range h.hubs.hubs {
			hb.mu.Lock()
			joined += len(hb.subs)
			hb.mu.Unlock()
		}
		h.hubs.mu.Unlock()
		first := ""
		for _, cl := range clients {
			select {
			case <-cl.done:
				if refused++; refused == 1 {
					first = cl.waitDone(t)
				}
			default:
			}
		}
		if refused > 0 {
			t.Errorf("%d of %d clients joining a live shared stream were turned away, the first with %q", refused, len(clients), first)
			leave()
			return
		}
		if time.Now().After(deadline) {
			leave()
			t.Fatalf("%d of %d clients joined", joined, len(clients))
		}
		time.Sleep(time.Millisecond)
	}
	up.none(t)
	hr.send(t, "id: 2\ndata: two\n\n")
	for i, cl := range clients {
		if got := cl.waitBody(t, "data: two\n\n"); strings.Contains(got, "retry:") {
			t.Errorf("client %d got %q", i, got)
		}
	}
	if n := up.count.Load(); n != 1 {
		t.Errorf("%d upstream requests for one shared stream, want 1", n)
	}

	// A second key takes the second request of the second.
	second := startClient(t, h, up, "/second")
	hr2 := up.next(t)
	hr2.send(t, "data: second\n\n")
	second.waitBody(t, "data: second\n\n")
	// A third is over max_stream_rate.
	third := startClient(t, h, up, "/third")
	if got := third.waitDone(t); !strings.Contains(got, "retry: ") || !strings.Contains(got, "data: max_stream_rate\n\n") {
		t.Errorf("third key within the second got %q, want a refusal with max_stream_rate", got)
	}
	up.none(t)
	for _, cl := range append(clients, second) {
		cl.cancel()
		cl.waitDone(t)
	}
	hr.waitGone(t)
	hr2.waitGone(t)
}

// replUpstream writes to the replacer and the vars of every request it
// gets, as reverse_proxy and other handlers do, then serves it as
// hubUpstream.
type replUpstream struct {
	*hubUpstream
	mu    sync.Mutex
	repls []*caddy.Replacer
}

func (u *replUpstream) ServeHTTP(w http.ResponseWriter, r *http.Request) error {
	repl, _ := r.Context().Value(caddy.ReplacerCtxKey).(*caddy.Replacer)
	u.mu.Lock()
	u.repls = append(u.repls, repl)
	u.mu.Unlock()
	if repl != nil {
		repl.Set("upstream.secret", "s3cret")
	}
	caddyhttp.SetVar(r.Context(), "upstream_var", "leak")
	return u.hubUpstream.ServeHTTP(w, r)
}

func (u *replUpstream) seen() []*caddy.Replacer {
	u.mu.Lock()
	defer u.mu.Unlock()
	return append([]*caddy.Replacer(nil), u.repls...)
}

// replClient is a client with a replacer and vars of its own.
type replClient struct {
	*client
	name string
	repl *caddy.Replacer
	ctx  context.Context // its request's, with its vars
}

func startReplClient(t *testing.T, h *Handler, up caddyhttp.Handler, path, name string) *replClient {
	req, repl := withReplacer(safetyReq(path, "X-Client", name))
	repl.Set("test.client", name)
	caddyhttp.SetVar(req.Context(), "client_var", name)
	return &replClient{client: startReq(t, h, up, req), name: name, repl: repl, ctx: req.Context()}
}

// leaks reports what of the upstream's request reached the client's
// replacer or vars, or the client's own placeholders gone wrong.
func (c *replClient) leaks() string {
	if v, ok := c.repl.Get("upstream.secret"); ok {
		return fmt.Sprintf("client %s's replacer has the upstream's placeholder: %v", c.name, v)
	}
	if v := caddyhttp.GetVar(c.ctx, "upstream_var"); v != nil {
		return fmt.Sprintf("client %s's vars have the upstream's var: %v", c.name, v)
	}
	if v, _ := c.repl.Get("test.client"); v != c.name {
		return fmt.Sprintf("client %s's own placeholder is %v", c.name, v)
	}
	if v := caddyhttp.GetVar(c.ctx, "client_var"); v != c.name {
		return fmt.Sprintf("client %s's own var is %v", c.name, v)
	}
	return ""
}

// TestShareSafetyHubOwnsItsReplacer checks that what the upstream's
// handlers write to their request's replacer and vars stays with the hub:
// no client's replacer sees it, and the hub's replacer is no client's;
// then the same under concurrent joins and leaves while events flow and
// the upstream reconnects (run it with -race), every client getting whole
// events only.
func TestShareSafetyHubOwnsItsReplacer(t *testing.T) {
	defer verifyNoNewGoroutines(t)()
	h, clock := shareHandler(t, &ShareConfig{Key: "{http.request.uri.path}"})
	up := &replUpstream{hubUpstream: newHubUpstream()}
	alice := startReplClient(t, h, up, "/repl", "alice")
	hr := up.next(t)
	bob := startReplClient(t, h, up, "/repl", "bob")
	waitSubscribers(t, h, 2)
	up.none(t)
	hr.send(t, numbered(1))
	alice.waitBody(t, numbered(1))
	bob.waitBody(t, numbered(1))
	clients := []*replClient{alice, bob}
	hb := onlyHub(t, h)
	hubRepl, _ := hb.base.Context().Value(caddy.ReplacerCtxKey).(*caddy.Replacer)
	for _, c := range clients {
		if msg := c.leaks(); msg != "" {
			t.Error(msg)
		}
		if hubRepl == c.repl {
			t.Errorf("the hub's request has client %s's replacer", c.name)
		}
		for _, r := range up.seen() {
			if r == c.repl {
				t.Errorf("the upstream's request has client %s's replacer", c.name)
			}
		}
		if got := c.repl.ReplaceAll("{http.request.header.X-Client}", ""); got != c.name {
			t.Errorf("client %s's header placeholder is %q", c.name, got)
		}
	}
	bob.cancel()
	bob.waitDone(t)

	// Joins and leaves, with alice staying (so that the hub lives on),
	// while the upstream sends events split anywhere and breaks or ends
	// every 6 events.
	const joiners, rounds = 20, 4
	var mu sync.Mutex
	var all []*replClient
	var wg sync.WaitGroup
	for g := 0; g < joiners; g++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; i < rounds; i++ {
				c := startReplClient(t, h, up, "/repl", fmt.Sprintf("c%d-%d", g, i))
				mu.Lock()
				all = append(all, c)
				mu.Unlock()
				// Its own replacer is read while the upstream writes its own.
				deadline := time.Now().Add(testWait)
				for {
					if msg := c.leaks(); msg != "" {
						t.Error(msg)
						break
					}
					if ids, _ := wholeEvents(c.w.received()); len(ids) >= 2 {
						break
					}
					if time.Now().After(deadline) {
						t.Errorf("client %s got %q in %s", c.name, c.w.received(), testWait)
						break
					}
					select {
					case <-c.done:
						t.Errorf("client %s ended early: %q", c.name, c.w.received())
					case <-time.After(time.Millisecond):
						continue
					}
					break
				}
				c.cancel()
				body, ok := endedBody(c.client)
				if !ok {
					t.Errorf("client %s did not end", c.name)
					continue
				}
				ids, problem := wholeEvents(body)
				if problem == "" {
					problem = contiguous(ids)
				}
				if problem != "" {
					t.Errorf("client %s: %s; got %q", c.name, problem, body)
				}
				if msg := c.leaks(); msg != "" {
					t.Error(msg)
				}
			}
		}()
	}
	done := make(chan struct{})
	go func() {
		wg.Wait()
		close(done)
	}()
	r := rand.New(rand.NewPCG(3, 4))
	n, reconnects := 1, 0
	for finished := false; !finished; {
		for k := 0; k < 6; k++ {
			n++
			ev := numbered(n)
			cut := 1 + r.IntN(len(ev)-1)
			hr.send(t, ev[:cut])
			hr.send(t, ev[cut:])
		}
		select {
		case <-done:
			finished = true
		default:
		}
		if n > 20000 {
			t.Fatal("the joiners did not finish")
		}
		hr.end <- reconnects%2 == 0 // broken, or ended cleanly
		hr = advanceUntilRequest(t, clock, up.hubUpstream)
		reconnects++
		if got := hr.r.Header.Get("Last-Event-ID"); got != fmt.Sprint(n) {
			t.Errorf("reconnect %d: Last-Event-ID %q, want %d", reconnects, got, n)
		}
	}
	hr.send(t, numbered(n+1))
	got := alice.waitBody(t, numbered(n+1))
	ids, problem := wholeEvents(got)
	if problem == "" {
		problem = contiguous(ids)
	}
	if problem != "" || len(ids) != n+1 || ids[0] != 1 {
		t.Errorf("the client that stayed: %s; got %d events from %v", problem, len(ids), ids[:min(1, len(ids))])
	}
	alice.cancel()
	alice.waitDone(t)
	hr.waitGone(t)
	t.Logf("%d events, %d reconnects, %d joins", n+1, reconnects, len(all))
	hubRepl, _ = hb.base.Context().Value(caddy.ReplacerCtxKey).(*caddy.Replacer)
	seen := up.seen()
	for _, c := range append(all, alice, bob) {
		if msg := c.leaks(); msg != "" {
			t.Error(msg)
		}
		if hubRepl == c.repl {
			t.Errorf("the hub's request has client %s's replacer", c.name)
		}
		for _, r := range seen {
			if r == c.repl {
				t.Errorf("an upstream request has client %s's replacer", c.name)
			}
		}
	}
}

// TestShareSafetyEventSplitAfterItsIDLine sends events whose id line
// arrives in one write and the rest in the next: the event keeps its id
// for resuming clients, for the Last-Event-ID the hub asks again with, and
// for dropping what the upstream sends again after a reconnect.
func TestShareSafetyEventSplitAfterItsIDLine(t *testing.T) {
	defer verifyNoNewGoroutines(t)()
	h, clock := shareHandler(t, &ShareConfig{})
	up := newHubUpstream()
	a := startClient(t, h, up, "/split")
	hr := up.next(t)
	hr.send(t, numbered(1))
	hr.send(t, "id: 2\n")
	hr.send(t, "data: e2\n\n")
	a.waitBody(t, numbered(2))
	b := startClient(t, h, up, "/split", "Last-Event-ID", "2")
	c := startClient(t, h, up, "/split", "Last-Event-ID", "1")
	waitSubscribers(t, h, 3)
	hr.send(t, numbered(3))
	if got := b.waitBody(t, numbered(3)); got != numbered(3) || b.w.header.Get(replayHeader) != "" {
		t.Errorf("client resuming from 2 got %q, %s %q; want event 3 alone", got, replayHeader, b.w.header.Get(replayHeader))
	}
	if got := c.waitBody(t, numbered(3)); got != numbered(2)+numbered(3) {
		t.Errorf("client resuming from 1 got %q, want events 2 and 3", got)
	}
	hr.send(t, "id: 4\ndata: e")
	hr.send(t, "4\n\n")
	a.waitBody(t, numbered(4))
	hr.end <- true
	hr = advanceUntilRequest(t, clock, up)
	if got := hr.r.Header.Get("Last-Event-ID"); got != "4" {
		t.Errorf("the hub asked again with Last-Event-ID %q, want 4", got)
	}
	// The upstream sends its last event again: nobody gets it twice.
	hr.send(t, numbered(4)+numbered(5))
	want := numbered(1) + numbered(2) + numbered(3) + numbered(4) + numbered(5)
	if got := a.waitBody(t, numbered(5)); got != want {
		t.Errorf("client got %q, want %q", got, want)
	}
	for _, cl := range []*client{a, b, c} {
		cl.cancel()
		cl.waitDone(t)
	}
	hr.waitGone(t)
}

// joinWriter records, when its response header is written (which a client
// of a shared stream gets once it has joined), how many events the
// upstream may have completed by then.
type joinWriter struct {
	*memWriter
	completed *atomic.Int64
	upper     atomic.Int64 // -1 until the header is written
}

func (w *joinWriter) WriteHeader(status int) {
	w.upper.CompareAndSwap(-1, w.completed.Load())
	w.memWriter.WriteHeader(status)
}

// TestShareSafetyJoinDuringAppendSkipsNothing hammers a shared stream with
// joins while the upstream sends events cut at random points: each client
// gets a contiguous run of events that starts at or before the first event
// completed after it joined, and after every event completed before it
// came.
func TestShareSafetyJoinDuringAppendSkipsNothing(t *testing.T) {
	defer verifyNoNewGoroutines(t)()
	h, _ := shareHandler(t, &ShareConfig{})
	up := newHubUpstream()
	anchor := startClient(t, h, up, "/hammer")
	hr := up.next(t)
	waitSubscribers(t, h, 1)

	// possiblyDone counts the events the upstream may have completed: it
	// is raised before the chunk that completes them is sent. acked
	// counts those it surely completed: raised once the hub took it.
	var possiblyDone, acked atomic.Int64
	const goroutines, joins = 8, 25
	var failures atomic.Int64 // joiners that failed; the first few are reported
	var wg sync.WaitGroup
	for g := 0; g < goroutines; g++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; i < joins; i++ {
				before := acked.Load()
				w := &joinWriter{memWriter: newMemWriter(), completed: &possiblyDone}
				w.upper.Store(-1)
				c := serveReq(t, h, up, safetyReq("/hammer"), w, w.memWriter)
				deadline := time.Now().Add(testWait)
				for {
					if ids, _ := wholeEvents(c.w.received()); len(ids) >= 3 {
						break
					}
					if time.Now().After(deadline) {
						t.Errorf("joiner %d-%d got %q in %s", g, i, c.w.received(), testWait)
						break
					}
					time.Sleep(100 * time.Microsecond)
				}
				c.cancel()
				body, ok := endedBody(c)
				if !ok {
					t.Errorf("joiner %d-%d did not end", g, i)
					continue
				}
				ids, problem := wholeEvents(body)
				if problem == "" {
					problem = contiguous(ids)
				}
				upper := w.upper.Load()
				var msg string
				switch {
				case problem != "":
					msg = fmt.Sprintf("joiner %d-%d: %s; got %q", g, i, problem, body)
				case len(ids) == 0:
				case upper < 0:
					msg = fmt.Sprintf("joiner %d-%d got events without a header", g, i)
				case int64(ids[0]) > upper+1:
					msg = fmt.Sprintf("joiner %d-%d starts at event %d, but joined when at most %d events were complete: it skipped event %d", g, i, ids[0], upper, upper+1)
				case int64(ids[0]) <= before:
					msg = fmt.Sprintf("joiner %d-%d starts at event %d, completed before it came (%d were)", g, i, ids[0], before)
				}
				if msg != "" && failures.Add(1) <= 5 {
					t.Error(msg)
				}
			}
		}()
	}
	done := make(chan struct{})
	go func() {
		wg.Wait()
		close(done)
	}()
	r := rand.New(rand.NewPCG(5, 6))
	var pending string
	var ends []int // where each event generated ends, in the stream's bytes
	total, sent, next := 0, 0, 1
	for finished := false; !finished; {
		select {
		case <-done:
			finished = true
		default:
		}
		for len(pending) < 64 {
			ev := numbered(next)
			next++
			pending += ev
			total += len(ev)
			ends = append(ends, total)
		}
		cut := 1 + r.IntN(50)
		if finished {
			// The rest of the event in flight, so that the client that
			// stayed ends on a whole event.
			for _, end := range ends {
				if end > sent {
					cut = end - sent
					break
				}
			}
		}
		chunk := pending[:cut]
		pending = pending[cut:]
		sent += cut
		complete := 0
		for complete < len(ends) && ends[complete] <= sent {
			complete++
		}
		possiblyDone.Store(int64(complete))
		hr.send(t, chunk)
		acked.Store(int64(complete))
		if complete > 100000 {
			t.Fatal("the joiners did not finish")
		}
	}
	last := int(acked.Load())
	got := anchor.waitBody(t, numbered(last))
	ids, problem := wholeEvents(got)
	if problem == "" {
		problem = contiguous(ids)
	}
	if problem != "" || len(ids) != last {
		t.Errorf("the client that stayed: %s; got %d events, want %d", problem, len(ids), last)
	}
	if n := failures.Load(); n > 5 {
		t.Errorf("and %d more joiners failed", n-5)
	}
	t.Logf("%d events, %d joins", last, goroutines*joins)
	anchor.cancel()
	anchor.waitDone(t)
	hr.waitGone(t)
}

// TestShareSafetyJoinInsideAnEvent places joins at chosen points: a client
// that joins while an event is in flight gets that event, whole.
func TestShareSafetyJoinInsideAnEvent(t *testing.T) {
	defer verifyNoNewGoroutines(t)()
	h, _ := shareHandler(t, &ShareConfig{})
	up := newHubUpstream()
	anchor := startClient(t, h, up, "/inside")
	hr := up.next(t)
	waitSubscribers(t, h, 1)
	clients := []*client{anchor}
	for i, tc := range []struct {
		before, after string
		want          string // what the client that joined between gets
	}{
		{before: numbered(1) + "id: 2\ndata: e", after: "2\n\n", want: numbered(2)},
		{before: "id: 3\ndata: e3", after: "\n\n" + numbered(4), want: numbered(3) + numbered(4)},
		{before: "id: 5\ndata: e5\n", after: "\n", want: numbered(5)},
		{before: numbered(6) + "id: 7", after: "\ndata: e7\n\n", want: numbered(7)},
		{before: numbered(8), after: numbered(9), want: numbered(9)},
		{before: numbered(10) + "i", after: "d: 11\ndata: e11\n\n" + numbered(12), want: numbered(11) + numbered(12)},
	} {
		hr.send(t, tc.before)
		c := startClient(t, h, up, "/inside")
		clients = append(clients, c)
		waitSubscribers(t, h, len(clients))
		hr.send(t, tc.after)
		last := tc.want[strings.LastIndex(strings.TrimSuffix(tc.want, "\n\n"), "\n\n")+2:]
		if got := c.waitBody(t, last); got != tc.want {
			t.Errorf("case %d: a client that joined after %q got %q, want %q", i, tc.before, got, tc.want)
		}
	}
	for _, c := range clients {
		c.cancel()
		c.waitDone(t)
	}
	hr.waitGone(t)
}

// TestShareSafetyKeys checks the default key: headers that could name a
// user split clients, those browsers and proxies vary without naming
// anyone do not, nor does Last-Event-ID; a TLS client certificate splits.
// A configured key with a placeholder missing or empty shares nothing.
func TestShareSafetyKeys(t *testing.T) {
	defer verifyNoNewGoroutines(t)()
	h, _ := shareHandler(t, &ShareConfig{})
	up := newHubUpstream()
	cert := func(raw string) func(*http.Request) {
		return func(r *http.Request) {
			if raw != "" {
				r.TLS = &tls.ConnectionState{PeerCertificates: []*x509.Certificate{{Raw: []byte(raw)}}}
			}
		}
	}
	header := func(name, value string) func(*http.Request) {
		return func(r *http.Request) {
			if value != "\x00absent" {
				r.Header.Set(name, value)
			}
		}
	}
	for i, tc := range []struct {
		name  string
		a, b  func(*http.Request)
		split bool
	}{
		{"X-Api-Key", header("X-Api-Key", "k1"), header("X-Api-Key", "k2"), true},
		{"X-Api-Key present or not", header("X-Api-Key", "k1"), header("X-Api-Key", "\x00absent"), true},
		{"Proxy-Authorization", header("Proxy-Authorization", "Basic YTph"), header("Proxy-Authorization", "Basic Yjpi"), true},
		{"X-Forwarded-User", header("X-Forwarded-User", "alice"), header("X-Forwarded-User", "bob"), true},
		{"a custom header", header("X-Tenant-Token", "t1"), header("X-Tenant-Token", "t2"), true},
		{"Authorization", header("Authorization", "Bearer a"), header("Authorization", "Bearer b"), true},
		{"Cookie", header("Cookie", "s=a"), header("Cookie", "s=b"), true},
		{"a TLS client certificate", cert("alice"), cert("bob"), true},
		{"a TLS client certificate or none", cert("alice"), cert(""), true},
		{"the same TLS client certificate", cert("alice"), cert("alice"), false},
		{"Accept", header("Accept", "text/event-stream"), header("Accept", "text/event-stream, */*;q=0.1"), false},
		{"User-Agent", header("User-Agent", "Firefox/140"), header("User-Agent", "Chrome/140"), false},
		{"Sec-Fetch-Mode", header("Sec-Fetch-Mode", "cors"), header("Sec-Fetch-Mode", "navigate"), false},
		{"Referer", header("Referer", "https://a.example/"), header("Referer", "https://b.example/x"), false},
		{"X-Forwarded-For", header("X-Forwarded-For", "192.0.2.1"), header("X-Forwarded-For", "198.51.100.7"), false},
		{"Last-Event-ID", header("Last-Event-ID", "\x00absent"), header("Last-Event-ID", "7"), false},
		{"Last-Event-ID, two values", header("Last-Event-ID", "6"), header("Last-Event-ID", "7"), false},
	} {
		path := fmt.Sprintf("/key/%d", i)
		ra, rb := safetyReq(path), safetyReq(path)
		tc.a(ra)
		tc.b(rb)
		a := startReq(t, h, up, ra)
		hra := up.next(t)
		b := startReq(t, h, up, rb)
		waitSubscribers(t, h, 2)
		reqs := []*hubReq{hra}
		got := hubCount(h)
		if want := map[bool]int{false: 1, true: 2}[tc.split]; got != want {
			t.Errorf("%s: %d upstream requests for two clients, want %d", tc.name, got, want)
		}
		if got == 2 {
			reqs = append(reqs, up.next(t))
		}
		up.none(t)
		for _, c := range []*client{a, b} {
			c.cancel()
			c.waitDone(t)
		}
		for _, hr := range reqs {
			hr.waitGone(t)
		}
	}

	t.Run("configured key with a placeholder missing or empty", func(t *testing.T) {
		h, _ := shareHandler(t, &ShareConfig{Key: "{http.request.header.X-Tenant}"})
		up := newHubUpstream()
		unknown := sseMetrics.unshared.WithLabelValues(string(unsharedKeyUnknown))
		before := testutil.ToFloat64(unknown)
		for _, value := range []string{"\x00absent", ""} {
			var clients []*client
			for i := 0; i < 2; i++ {
				req, _ := withReplacer(safetyReq("/tenant"))
				header("X-Tenant", value)(req)
				clients = append(clients, startReq(t, h, up, req))
			}
			// Each gets an upstream request of its own, outside any hub.
			ra, rb := up.next(t), up.next(t)
			ra.send(t, "data: own\n\n")
			rb.send(t, "data: own\n\n")
			for _, c := range clients {
				c.waitBody(t, "data: own\n\n")
			}
			if n := hubCount(h); n != 0 {
				t.Errorf("X-Tenant %q: %d shared streams, want none", value, n)
			}
			for _, c := range clients {
				c.cancel()
				c.waitDone(t)
			}
			ra.waitGone(t)
			rb.waitGone(t)
		}
		if got := testutil.ToFloat64(unknown) - before; got != 4 {
			t.Errorf("caddy_sse_shared_unshared_total{reason=%q} rose by %v, want 4", unsharedKeyUnknown, got)
		}
		// With the header, one upstream request.
		var clients []*client
		for i := 0; i < 2; i++ {
			req, _ := withReplacer(safetyReq("/tenant", "X-Tenant", "acme"))
			clients = append(clients, startReq(t, h, up, req))
		}
		hr := up.next(t)
		waitSubscribers(t, h, 2)
		onlyHub(t, h)
		up.none(t)
		for _, c := range clients {
			c.cancel()
			c.waitDone(t)
		}
		hr.waitGone(t)
	})
}

// herdUpstream answers 503 to every request, the first held until gate is
// closed, or streams as hubUpstream once stream is set.
type herdUpstream struct {
	*hubUpstream
	gate   chan struct{}
	stream atomic.Bool
	count  atomic.Int64
}

func (u *herdUpstream) ServeHTTP(w http.ResponseWriter, r *http.Request) error {
	u.count.Add(1)
	select {
	case <-u.gate:
	case <-r.Context().Done():
		return r.Context().Err()
	}
	if u.stream.Load() {
		return u.hubUpstream.ServeHTTP(w, r)
	}
	w.Header().Set("Content-Type", "text/plain")
	w.WriteHeader(http.StatusServiceUnavailable)
	_, _ = io.WriteString(w, "overloaded")
	return nil
}

// TestShareSafetyHerdOnFailure checks that an upstream that fails a shared
// stream's first request is asked once for a herd of clients: each is
// refused, as is a client within the backoff, and after it the next client
// makes one new request.
func TestShareSafetyHerdOnFailure(t *testing.T) {
	defer verifyNoNewGoroutines(t)()
	h, clock := shareHandler(t, &ShareConfig{})
	up := &herdUpstream{hubUpstream: newHubUpstream(), gate: make(chan struct{})}
	const herd = 30
	var clients []*client
	for i := 0; i < herd; i++ {
		clients = append(clients, startReq(t, h, up, safetyReq("/herd")))
	}
	waitSubscribers(t, h, herd)
	close(up.gate)
	for i, c := range clients {
		if got := c.waitDone(t); !strings.Contains(got, "retry: ") || !strings.Contains(got, "data: upstream_status_503\n\n") {
			t.Errorf("client %d got %q, want a refusal with upstream_status_503", i, got)
		}
	}
	if n := up.count.Load(); n != 1 {
		t.Errorf("%d upstream requests for %d clients of one key, want 1", n, herd)
	}
	// Within the backoff: refused, and the upstream is not asked.
	late := startReq(t, h, up, safetyReq("/herd"))
	if got := late.waitDone(t); !strings.Contains(got, "retry: ") || !strings.Contains(got, "data: upstream_status_503\n\n") {
		t.Errorf("client within the backoff got %q, want a refusal", got)
	}
	if n := up.count.Load(); n != 1 {
		t.Errorf("%d upstream requests after a client within the backoff, want 1", n)
	}
	// After it (250 ms at most after a first failure), one new request
	// serves the next clients. The hub is gone once the failure is
	// recorded.
	deadline := time.Now().Add(testWait)
	for hubCount(h) != 0 {
		if time.Now().After(deadline) {
			t.Fatal("the failed shared stream was not released")
		}
		time.Sleep(time.Millisecond)
	}
	clock.Advance(reconnectBase + time.Millisecond)
	up.stream.Store(true)
	next := startReq(t, h, up, safetyReq("/herd"))
	hr := up.next(t)
	other := startReq(t, h, up, safetyReq("/herd"))
	waitSubscribers(t, h, 2)
	hr.send(t, "data: back\n\n")
	next.waitBody(t, "data: back\n\n")
	other.waitBody(t, "data: back\n\n")
	if n := up.count.Load(); n != 2 {
		t.Errorf("%d upstream requests in all, want 2", n)
	}
	up.none(t)
	for _, c := range []*client{next, other} {
		c.cancel()
		c.waitDone(t)
	}
	hr.waitGone(t)
}

// Through a real Caddy: what users see.

const (
	safetyHost  = "http://localhost:29380"
	safetyAdmin = "http://localhost:2996"
)

func safetyConfig(target, herdTarget string) string {
	return fmt.Sprintf(`{
	admin localhost:2996
	http_port 29380
	https_port 29743
	grace_period 1s
	skip_install_trust
}
http://localhost:29380 {
	handle /ids* {
		sse {
			share {
				assign_ids
				linger off
			}
		}
		reverse_proxy %[1]s
	}
	handle /herd* {
		sse {
			close_event bye
			share
		}
		reverse_proxy %[2]s
	}
}`, target, herdTarget)
}

func TestShareSafetyE2E(t *testing.T) {
	up := newShareUpstream(t)
	var herdCount atomic.Int64
	gate := make(chan struct{})
	herdSrv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		herdCount.Add(1)
		select {
		case <-gate:
		case <-r.Context().Done():
			return
		case <-time.After(e2eWait):
		}
		w.Header().Set("Content-Type", "text/plain")
		w.WriteHeader(http.StatusServiceUnavailable)
		io.WriteString(w, "overloaded")
	}))
	t.Cleanup(herdSrv.Close)
	tester := caddytest.NewTester(t).WithDefaultOverrides(caddytest.Config{AdminPort: 2996})
	tester.InitServer(safetyConfig(strings.TrimPrefix(up.srv.URL, "http://"), strings.TrimPrefix(herdSrv.URL, "http://")), "caddyfile")

	t.Run("assign_ids and an empty id", func(t *testing.T) {
		a := openStreamAt(t, safetyHost+"/ids/empty")
		req := up.next(t)
		req.send(t, "data: a\n\n")
		req.send(t, "id:\ndata: b\n\n")
		req.send(t, "data: c\n\n")
		body := a.waitFor(t, "data: c\n\n")
		idA, _, _ := strings.Cut(strings.TrimPrefix(body, "id: "), "\n")
		if !isGatewayID(idA) {
			t.Fatalf("a has no gateway id: %q", body)
		}
		prefix := idA[:strings.LastIndexByte(idA, '-')+1]
		if want := "id: " + prefix + "0\ndata: a\n\nid:\ndata: b\n\nid: " + prefix + "2\ndata: c\n\n"; body != want {
			t.Errorf("client got %q, want %q", body, want)
		}
		b := openStreamAt(t, safetyHost+"/ids/empty", "Last-Event-ID", idA)
		if got, want := b.waitFor(t, "data: c\n\n"), "id:\ndata: b\n\nid: "+prefix+"2\ndata: c\n\n"; got != want {
			t.Errorf("client resuming from %s got %q, want %q", idA, got, want)
		}
		// The upstream breaks: asked again without the gateway's id.
		req.send(t, abortCmd)
		req = up.next(t)
		if got, ok := req.r.Header["Last-Event-Id"]; ok {
			t.Errorf("the gateway asked the upstream again with Last-Event-ID %q", got)
		}
		req.send(t, "id: u7\ndata: d\n\n")
		req.send(t, "data: e\n\n")
		b.waitFor(t, "id: u7\ndata: d\n\nid: "+prefix+"4\ndata: e\n\n")
		req.send(t, abortCmd)
		req = up.next(t)
		if got := req.r.Header.Get("Last-Event-ID"); got != "u7" {
			t.Errorf("the gateway asked the upstream again with Last-Event-ID %q, want u7", got)
		}
		a.cancel()
		b.cancel()
		req.waitGone(t)
	})

	t.Run("a herd on a failing upstream: one request", func(t *testing.T) {
		const herd = 30
		base := scrapeMetrics(t, safetyAdmin)["caddy_sse_shared_subscribers"]
		type result struct {
			status int
			ct     string
			body   string
			err    error
		}
		results := make(chan result, herd)
		ctx, cancel := context.WithTimeout(context.Background(), 2*e2eWait)
		defer cancel()
		for i := 0; i < herd; i++ {
			go func() {
				req, _ := http.NewRequestWithContext(ctx, http.MethodGet, safetyHost+"/herd", nil)
				req.Header.Set("Accept", "text/event-stream")
				resp, err := streamClient.Do(req)
				if err != nil {
					results <- result{err: err}
					return
				}
				defer resp.Body.Close()
				body, err := io.ReadAll(resp.Body)
				results <- result{status: resp.StatusCode, ct: resp.Header.Get("Content-Type"), body: string(body), err: err}
			}()
		}
		deadline := time.Now().Add(e2eWait)
		for scrapeMetrics(t, safetyAdmin)["caddy_sse_shared_subscribers"]-base < herd {
			if time.Now().After(deadline) {
				close(gate)
				t.Fatalf("%v of %d clients joined", scrapeMetrics(t, safetyAdmin)["caddy_sse_shared_subscribers"]-base, herd)
			}
			time.Sleep(10 * time.Millisecond)
		}
		close(gate)
		for i := 0; i < herd; i++ {
			select {
			case r := <-results:
				if r.err != nil || r.status != http.StatusOK || r.ct != "text/event-stream" ||
					!strings.Contains(r.body, "retry: ") || !strings.HasSuffix(r.body, "data: upstream_status_503\n\n") {
					t.Errorf("client got %d %q %q (%v), want a refusal as a stream", r.status, r.ct, r.body, r.err)
				}
			case <-time.After(e2eWait):
				t.Fatalf("%d of %d clients got no answer", herd-i, herd)
			}
		}
		if n := herdCount.Load(); n != 1 {
			t.Errorf("the upstream got %d requests for %d clients, want 1", n, herd)
		}
	})
}
