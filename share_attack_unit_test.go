package caddysse

import (
	"context"
	"fmt"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"
)

// Adversarial tests of shared streams. Each one states what a user would
// notice; each fails against the code as it stands (see the report).

// atkClient is one request through the handler, with any next handler, a
// remote address of its choosing, a Caddy replacer (so that share keys with
// HTTP placeholders work), and a recovered panic.
type atkClient struct {
	*client
	panicked chan any // receives the panic the request raised, if any
}

func atkStart(t *testing.T, h *Handler, next caddyhttp.Handler, path, remote string, header ...string) *atkClient {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	c := &atkClient{client: &client{w: newMemWriter(), cancel: cancel, done: make(chan struct{})}, panicked: make(chan any, 1)}
	req := httptest.NewRequest(http.MethodGet, path, nil).WithContext(ctx)
	if remote != "" {
		req.RemoteAddr = remote
	}
	req.Header.Set("Accept", "text/event-stream")
	for i := 0; i+1 < len(header); i += 2 {
		req.Header.Set(header[i], header[i+1])
	}
	req = caddyhttp.PrepareRequest(req, caddy.NewReplacer(), c.w, nil)
	go func() {
		defer close(c.done)
		defer func() {
			if p := recover(); p != nil {
				c.panicked <- p
			}
		}()
		c.err = h.ServeHTTP(c.w, req, next)
	}()
	return c
}

// subscribers counts the clients of h's hubs.
func subscribers(h *Handler) int {
	n := 0
	h.hubs.mu.Lock()
	defer h.hubs.mu.Unlock()
	for _, hb := range h.hubs.hubs {
		hb.mu.RLock()
		n += len(hb.subs)
		hb.mu.RUnlock()
	}
	return n
}

// provisionOn provisions h as a handler of srv (as Caddy does, with the
// server in the context), on clock.
// expectOwnUpstream checks that b, a client of h on another route than a's
// shared stream (whose upstream request is other), asks its own upstream
// (own) rather than joining a's stream; if it joins, a marker sent on a's
// stream shows what crossed, and the test fails with what.
func expectOwnUpstream(t *testing.T, h *Handler, a, b *atkClient, own *hubUpstream, other *hubReq, what string) {
	t.Helper()
	deadline := time.Now().Add(testWait)
	for {
		select {
		case req := <-own.reqs:
			req.send(t, "data: own\n\n")
			b.waitBody(t, "data: own")
			b.cancel()
			b.waitDone(t)
			a.cancel()
			a.waitDone(t)
			return
		default:
		}
		if subscribers(h) == 2 {
			other.send(t, "data: crossed\n\n")
			t.Errorf("%s: got %q", what, b.waitBody(t, "crossed"))
			b.cancel()
			a.cancel()
			b.waitDone(t)
			a.waitDone(t)
			other.waitGone(t)
			return
		}
		if time.Now().After(deadline) {
			t.Fatal("the client neither asked its own upstream nor joined")
		}
		time.Sleep(time.Millisecond)
	}
}

func provisionOn(t *testing.T, h *Handler, srv *caddyhttp.Server, clock *fakeClock) {
	t.Helper()
	h.clock = clock
	ctx, cancel := caddy.NewContext(caddy.Context{Context: context.WithValue(context.Background(), caddyhttp.ServerCtxKey, srv)})
	t.Cleanup(cancel)
	if err := h.Provision(ctx); err != nil {
		t.Fatalf("Provision: %v", err)
	}
	if err := h.Validate(); err != nil {
		t.Fatalf("Validate: %v", err)
	}
	core, _ := observer.New(zapcore.DebugLevel)
	h.logger = zap.New(core)
}

// TestAttackDefaultKeyIgnoresClientAddress: the default key is "every
// request header but those that name nobody", yet it leaves out the
// client's address, which the handlers after sse (a remote_ip / client_ip
// matcher) or the upstream (X-Forwarded-For allow-lists) may authorize on.
// An outside client with the same headers as an inside one joins the inside
// one's stream, which without share answers it 403.
func TestAttackDefaultKeyIgnoresClientAddress(t *testing.T) {
	h, _ := shareHandler(t, &ShareConfig{})
	up := newHubUpstream()
	// What `@inside remote_ip 10.0.0.0/8` + `reverse_proxy @inside ...` +
	// `respond 403` after sse does.
	next := caddyhttp.HandlerFunc(func(w http.ResponseWriter, r *http.Request) error {
		if strings.HasPrefix(r.RemoteAddr, "10.") {
			return up.ServeHTTP(w, r)
		}
		w.WriteHeader(http.StatusForbidden)
		_, err := w.Write([]byte("forbidden\n"))
		return err
	})
	inside := atkStart(t, h, next, "/ops/feed", "10.1.2.3:5555")
	hr := up.next(t)
	hr.send(t, "data: inside only 1\n\n")
	inside.waitBody(t, "inside only 1")

	outside := atkStart(t, h, next, "/ops/feed", "203.0.113.9:4444")
	deadline := time.Now().Add(testWait)
	for {
		select {
		case <-outside.done:
			if outside.w.status != http.StatusForbidden {
				t.Errorf("outside client got status %d, want 403", outside.w.status)
			}
			inside.cancel()
			inside.waitDone(t)
			return
		default:
		}
		if subscribers(h) == 2 {
			hr.send(t, "data: inside only 2\n\n")
			got := outside.waitBody(t, "inside only 2")
			t.Errorf("a client from outside the allowed network joined the inside client's shared stream and got %q (status %d); without share it gets 403", got, outside.w.status)
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("outside client neither refused nor joined")
		}
		time.Sleep(time.Millisecond)
	}
	outside.cancel()
	inside.cancel()
	outside.waitDone(t)
	inside.waitDone(t)
	hr.waitGone(t)
}

// TestAttackReloadReorderCrossesRoutes: a hub registry is found again by
// (server name, the handler's place among the server's share handlers, key).
// A reload that reorders two routes with the same share key hands the
// registry of one route to the other: a client of /scores joins the shared
// stream of /prices and gets its events.
func TestAttackReloadReorderCrossesRoutes(t *testing.T) {
	clock := newFakeClock()
	newH := func() *Handler {
		return &Handler{Heartbeat: seconds(15), Retry: seconds(3), Share: &ShareConfig{
			Key: "atk-reorder:{http.request.header.X-Tenant}", Linger: -1}}
	}
	prices, scores := newHubUpstream(), newHubUpstream()

	// Config 1: route /prices, then route /scores.
	srv1 := new(caddyhttp.Server)
	pricesH1, scoresH1 := newH(), newH()
	provisionOn(t, pricesH1, srv1, clock)
	provisionOn(t, scoresH1, srv1, clock)
	a := atkStart(t, pricesH1, prices, "/prices", "", "X-Tenant", "acme")
	pr := prices.next(t)
	pr.send(t, "data: price 101\n\n")
	a.waitBody(t, "price 101")

	// Config 2: the same routes, /scores now first.
	srv2 := new(caddyhttp.Server)
	scoresH2, pricesH2 := newH(), newH()
	provisionOn(t, scoresH2, srv2, clock)
	provisionOn(t, pricesH2, srv2, clock)
	_ = pricesH1.Cleanup()
	_ = scoresH1.Cleanup()
	t.Cleanup(func() {
		_ = scoresH2.Cleanup()
		_ = pricesH2.Cleanup()
	})

	b := atkStart(t, scoresH2, scores, "/scores", "", "X-Tenant", "acme")
	expectOwnUpstream(t, scoresH2, a, b, scores, pr,
		"after a reload that reordered the routes, a client of /scores got /prices' shared stream")
}

// TestAttackLingerBypassesPerClientLimit: a lingering hub keeps an upstream
// request open after its only client left, and nothing counts it against
// the client that started it. One client holding at most one connection
// (max_streams_per_client 1) opens and closes streams of distinct keys (a
// query string it varies) and the gateway holds an upstream request open
// for each, linger long: the upstream's connections grow with the client's
// request rate, without bound unless max_streams is set.
func TestAttackLingerBypassesPerClientLimit(t *testing.T) {
	h := &Handler{Heartbeat: seconds(15), Retry: seconds(3), MaxStreamsPerClient: 1,
		Share: &ShareConfig{Linger: seconds(30)}}
	provisionTest(t, h)
	up := newHubUpstream()
	const n = 10
	var reqs []*hubReq
	for i := range n {
		c := startClient(t, h, up, fmt.Sprintf("/feed?cachebust=%d", i))
		hr := up.next(t)
		reqs = append(reqs, hr)
		hr.send(t, "data: x\n\n")
		c.waitBody(t, "data: x")
		c.cancel()
		c.waitDone(t)
	}
	open := 0
	for _, hr := range reqs {
		select {
		case <-hr.gone:
		default:
			open++
		}
	}
	h.hubs.mu.Lock()
	hubs := len(h.hubs.hubs)
	h.hubs.mu.Unlock()
	if open > h.MaxStreamsPerClient {
		t.Errorf("one client with max_streams_per_client %d, never more than one connection open, left %d upstream requests open (%d hubs)", h.MaxStreamsPerClient, open, hubs)
	}
	h.hubs.releaseAll()
	for _, hr := range reqs {
		hr.waitGone(t)
	}
}

// TestAttackJoinEndingHubPanics: between hub.end (or endFirst, or a first
// response relayed to its starter) setting the hub's state and the registry
// forgetting it, join finds the hub still registered, not released, neither
// starting nor live, and returns a nil hub with no refusal; serveShared
// then reads hb.ready from nil: the request panics (a 500 or a reset
// connection for the client). The test holds that window open by setting
// the state the way hub.end does before it calls reg.release.
func TestAttackJoinEndingHubPanics(t *testing.T) {
	h, _ := shareHandler(t, &ShareConfig{})
	up := newHubUpstream()
	a := startClient(t, h, up, "/end")
	hr := up.next(t)
	hr.send(t, "data: one\n\n")
	a.waitBody(t, "data: one")
	hb := onlyHub(t, h)
	hb.mu.Lock()
	hb.state = hubEnded // hub.end, before its reg.release
	hb.mu.Unlock()

	b := atkStart(t, h, up, "/end", "")
	var panicked any
	select {
	case panicked = <-b.panicked:
	case hr2 := <-up.reqs:
		// A new upstream request for the newcomer: what should happen.
		hr2.send(t, "data: fresh\n\n")
		b.waitBody(t, "fresh")
	case <-time.After(testWait):
		t.Fatalf("newcomer neither served nor failed; got %q", b.w.received())
	}
	if panicked != nil {
		t.Errorf("a client arriving while its key's hub ends panicked: %v", panicked)
	}
	hb.mu.Lock()
	hb.state = hubLive
	hb.mu.Unlock()
	b.cancel()
	b.waitDone(t)
	a.cancel()
	a.waitDone(t)
	hr.waitGone(t)
}

// TestAttackPerUserReconnectIsShared: a first response that sets a cookie
// is never shared, but the hub's later requests (after the upstream ended)
// are not checked: a reconnect response that sets a cookie, says
// Cache-Control: private or varies on User-Agent is fanned out to every
// client, and its Set-Cookie is dropped for all of them.
func TestAttackPerUserReconnectIsShared(t *testing.T) {
	h, clock := shareHandler(t, &ShareConfig{})
	up := newHubUpstream()
	next := caddyhttp.HandlerFunc(func(w http.ResponseWriter, r *http.Request) error {
		if up.count.Load() >= 1 { // the hub's second request on
			w.Header().Set("Set-Cookie", "session=for-the-starter; HttpOnly")
			w.Header().Set("Cache-Control", "private")
		}
		return up.ServeHTTP(w, r)
	})
	a := atkStart(t, h, next, "/rc", "", "User-Agent", "starter")
	hr := up.next(t)
	hr.send(t, "id: 1\ndata: public\n\n")
	a.waitBody(t, "public")
	b := atkStart(t, h, next, "/rc", "", "User-Agent", "other")
	waitSubscribers(t, h, 2)
	hr.end <- false
	hr2 := advanceUntilRequest(t, clock, up)
	if hr2.r.Header.Get("User-Agent") != "starter" {
		t.Fatalf("reconnect carries User-Agent %q", hr2.r.Header.Get("User-Agent"))
	}
	// Not shared: the gateway refuses the write (the hub ends), or a
	// marks its end; either way b must never get it.
	hr2.chunks <- []byte("id: 2\ndata: private to the session just set\n\nid: 3\ndata: marker\n\n")
	<-hr2.acks
	// b gets the marker too if the response is shared; if it is not, b
	// ends or keeps waiting: either way, wait for one of them.
	deadline := time.Now().Add(testWait)
	for !strings.Contains(b.w.received(), "marker") && time.Now().Before(deadline) {
		select {
		case <-b.done:
			deadline = time.Now()
		default:
			time.Sleep(time.Millisecond)
		}
	}
	if got := b.w.received(); strings.Contains(got, "private to the session") {
		t.Errorf("a reconnect response marked per user (Set-Cookie, Cache-Control: private) was shared with another client: %q", got)
	}
	a.cancel()
	b.cancel()
	a.waitDone(t)
	b.waitDone(t)
	hr2.waitGone(t)
}
