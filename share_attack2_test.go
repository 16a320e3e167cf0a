package caddysse

import (
	"context"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
)

// Second round of adversarial tests of shared streams. Each test states
// what a user or an operator would notice, and fails against the code as
// it stands (see the report on branch attack2).

// a2Start is one request through h to next, prepared as Caddy's server
// prepares it (replacer, vars, the original request), then with strip cut
// from the front of its path, as `handle_path <strip>/*` (or `uri
// strip_prefix`) does before sse runs.
func a2Start(t *testing.T, h *Handler, next caddyhttp.Handler, path, strip string, header ...string) *atkClient {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	c := &atkClient{client: &client{w: newMemWriter(), cancel: cancel, done: make(chan struct{})}, panicked: make(chan any, 1)}
	req := httptest.NewRequest(http.MethodGet, path, nil).WithContext(ctx)
	req.Header.Set("Accept", "text/event-stream")
	for i := 0; i+1 < len(header); i += 2 {
		req.Header.Set(header[i], header[i+1])
	}
	req = caddyhttp.PrepareRequest(req, caddy.NewReplacer(), c.w, nil)
	if strip != "" {
		req.URL.Path = strings.TrimPrefix(req.URL.Path, strip)
		req.URL.RawPath = ""
	}
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

// a2Header is the response header the client was sent, once its feed wrote
// it (or nil if it never did within testWait).
func a2Header(c *atkClient) http.Header {
	deadline := time.Now().Add(testWait)
	for time.Now().Before(deadline) {
		c.w.mu.Lock()
		status := c.w.status
		var hdr http.Header
		if status != 0 {
			hdr = c.w.header.Clone()
		}
		c.w.mu.Unlock()
		if status != 0 {
			return hdr
		}
		select {
		case <-c.done:
			return nil
		case <-time.After(time.Millisecond):
		}
	}
	return nil
}

// TestAttack2HandlePathReloadCrossesRoutes: the first attack's fix put the
// request path in the key so that a reload reordering routes cannot hand one
// route's registry to another. But the path sse sees is the path after
// handle_path / uri strip_prefix / rewrite: /prices/feed and /news/feed
// both reach sse as /feed. A routine reload that adds a shared route
// (/news/*) in front shifts every registry index by one and gives the new
// /news route the registry of the old /prices route: a /news client (same
// user, same headers: the default key) joins the running /prices stream
// and is sent prices, not news (and /prices, /scores likewise shift). With a broadcast key ({path}) the same crossing hands
// one route's stream (say an admin-only one behind basic_auth) to every
// user of the other route.
func TestAttack2HandlePathReloadCrossesRoutes(t *testing.T) {
	clock := newFakeClock()
	newH := func() *Handler {
		return &Handler{Heartbeat: seconds(15), Retry: seconds(3), Share: &ShareConfig{Linger: -1}}
	}
	prices, news := newHubUpstream(), newHubUpstream()

	// Config 1: handle_path /prices/* { sse { share } ... }, then
	// handle_path /scores/* { sse { share } ... }.
	srv1 := new(caddyhttp.Server)
	pricesH1, scoresH1 := newH(), newH()
	provisionOn(t, pricesH1, srv1, clock)
	provisionOn(t, scoresH1, srv1, clock)
	a := a2Start(t, pricesH1, prices, "/prices/feed", "/prices")
	pr := prices.next(t)
	pr.send(t, "data: price 101\n\n")
	a.waitBody(t, "price 101")

	// Config 2: a new shared route /news/* added in front; the others
	// unchanged.
	srv2 := new(caddyhttp.Server)
	newsH2, pricesH2, scoresH2 := newH(), newH(), newH()
	provisionOn(t, newsH2, srv2, clock)
	provisionOn(t, pricesH2, srv2, clock)
	provisionOn(t, scoresH2, srv2, clock)
	_ = pricesH1.Cleanup()
	_ = scoresH1.Cleanup()
	t.Cleanup(func() {
		_ = newsH2.Cleanup()
		_ = pricesH2.Cleanup()
		_ = scoresH2.Cleanup()
	})
	// The same user opens the news feed; newsH2 holds the registry of the
	// old /prices route (the first shared route of the server).
	b := a2Start(t, newsH2, news, "/news/feed", "/news")
	expectOwnUpstream(t, newsH2, a, b, news, pr,
		"after a reload that added a route in front, a client of handle_path /news/* joined the /prices/* route's shared stream (both reach sse as /feed)")
}

// TestAttack2PerUserHeadersReachJoiners: under a key that shares among
// users (the documented `share {path}:{http.request.header.X-Tenant}`),
// the first response's header is handed to every joiner as is. Only
// Set-Cookie, Cache-Control: private and Vary make a response "one
// user's"; headers that are just as much one user's reach everyone:
// Clear-Site-Data (every joiner's browser wipes its cookies: all users of
// the tenant are logged out), Authentication-Info and WWW-Authenticate on
// a 200 (the starter's Digest nextnonce / rspauth, its Negotiate
// mutual-auth token), Set-Cookie2.
func TestAttack2PerUserHeadersReachJoiners(t *testing.T) {
	perUser := map[string]string{
		"Clear-Site-Data":     `"cookies", "storage"`,
		"Authentication-Info": `nextnonce="alice-7f3a", rspauth="d1e2"`,
		"Www-Authenticate":    `Negotiate oYG2MIGzoAMKAQChCwYJKoZIgvcSAQIC`,
		"Set-Cookie2":         `session=alice; Version=1`,
	}
	for name, value := range perUser {
		t.Run(name, func(t *testing.T) {
			h, _ := shareHandler(t, &ShareConfig{Key: "atk2-hdr:{http.request.header.X-Tenant}"})
			up := newHubUpstream()
			next := caddyhttp.HandlerFunc(func(w http.ResponseWriter, r *http.Request) error {
				if r.Header.Get("X-User") == "alice" {
					w.Header().Set(name, value)
				}
				return up.ServeHTTP(w, r)
			})
			a := a2Start(t, h, next, "/t/feed", "", "X-Tenant", "acme", "X-User", "alice")
			hr := up.next(t)
			hr.send(t, "id: 1\ndata: tick\n\n")
			a.waitBody(t, "tick")

			b := a2Start(t, h, next, "/t/feed", "", "X-Tenant", "acme", "X-User", "bob")
			hdr := a2Header(b)
			if hdr == nil {
				t.Fatal("bob got no response header")
			}
			if got := hdr.Get(name); got != "" {
				t.Errorf("bob was handed alice's %s: %q", name, got)
			}
			b.cancel()
			a.cancel()
			b.waitDone(t)
			a.waitDone(t)
			select {
			case hr2 := <-up.reqs: // bob's own request, if not shared
				hr2.waitGone(t)
			default:
			}
			hr.waitGone(t)
		})
	}
}

// TestAttack2ReplayHeaderOfTheHubsRequest: the header the upstream answered
// the hub's first request with goes to every client, including what it
// says about that request's Last-Event-ID. Behind another gateway (an edge
// caddy-sse with share in front of a regional one, or Mercure, which names
// where it resumed in a Last-Event-ID response header), the starter's
// unknown Last-Event-ID makes the upstream answer `X-SSE-Replay: miss`, and
// every client that joins is told it missed events: a client whose
// Last-Event-ID was found and replayed, and one that sent none.
func TestAttack2ReplayHeaderOfTheHubsRequest(t *testing.T) {
	h, _ := shareHandler(t, &ShareConfig{})
	up := newHubUpstream()
	next := caddyhttp.HandlerFunc(func(w http.ResponseWriter, r *http.Request) error {
		if r.Header.Get("Last-Event-ID") == "gone-long-ago" {
			w.Header().Set(replayHeader, "miss")
			w.Header().Set("Last-Event-ID", "41")
		}
		return up.ServeHTTP(w, r)
	})
	a := a2Start(t, h, next, "/r/feed", "", "Last-Event-ID", "gone-long-ago")
	hr := up.next(t)
	hr.send(t, "id: 42\ndata: a\n\nid: 43\ndata: b\n\n")
	a.waitBody(t, "data: b")

	// b had event 42: it resumes at 43, nothing missed.
	b := a2Start(t, h, next, "/r/feed", "", "Last-Event-ID", "42")
	if got := b.waitBody(t, "data: b"); strings.Contains(got, "data: a") {
		t.Fatalf("b was replayed from the wrong event: %q", got)
	}
	// c sent no Last-Event-ID: nothing to miss.
	c := a2Start(t, h, next, "/r/feed", "")
	waitSubscribers(t, h, 3)
	for name, cl := range map[string]*atkClient{"resumed client (Last-Event-ID 42, replayed)": b, "new client (no Last-Event-ID)": c} {
		hdr := a2Header(cl)
		if hdr == nil {
			t.Fatalf("%s got no header", name)
		}
		if got := hdr.Get(replayHeader); got != "" {
			t.Errorf("%s was told %s: %q (the upstream's answer to the starter's Last-Event-ID)", name, replayHeader, got)
		}
		if got := hdr.Get("Last-Event-ID"); got != "" {
			t.Errorf("%s was told Last-Event-ID: %q (where the starter's request resumed)", name, got)
		}
	}
	for _, cl := range []*atkClient{a, b, c} {
		cl.cancel()
		cl.waitDone(t)
	}
	hr.waitGone(t)
}
