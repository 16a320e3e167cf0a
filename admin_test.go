package caddysse

import (
	"context"
	"encoding/json"
	"errors"
	"net/http"
	"net/http/httptest"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
)

// Unit tests of the admin API (admin.go): its JSON, and its numbers against
// requests driven through handlers provisioned as Caddy does, on a fake
// clock. The end-to-end tests are in admin_e2e_test.go.

// adminDo serves one admin API request as Caddy's admin endpoint does: the
// module's routes on a ServeMux, an APIError answered with its status.
func adminDo(t *testing.T, method, path string) *httptest.ResponseRecorder {
	t.Helper()
	mux := http.NewServeMux()
	for _, route := range (adminAPI{}).Routes() {
		handler := route.Handler
		mux.HandleFunc(route.Pattern, func(w http.ResponseWriter, r *http.Request) {
			if err := handler.ServeHTTP(w, r); err != nil {
				var apiErr caddy.APIError
				if !errors.As(err, &apiErr) {
					t.Errorf("%s %s: error %v is not an APIError", method, path, err)
					apiErr.HTTPStatus = http.StatusInternalServerError
				}
				w.WriteHeader(apiErr.HTTPStatus)
			}
		})
	}
	w := httptest.NewRecorder()
	mux.ServeHTTP(w, httptest.NewRequest(method, path, nil))
	return w
}

// adminGet decodes a GET of the admin API into v, and returns the body.
func adminGet(t *testing.T, path string, v any) string {
	t.Helper()
	w := adminDo(t, http.MethodGet, path)
	if w.Code != http.StatusOK || w.Header().Get("Content-Type") != "application/json" {
		t.Fatalf("GET %s: %d %q %s", path, w.Code, w.Header().Get("Content-Type"), w.Body)
	}
	if err := json.Unmarshal(w.Body.Bytes(), v); err != nil {
		t.Fatalf("GET %s: %v in %s", path, err, w.Body)
	}
	return w.Body.String()
}

// keysOf returns the keys of a JSON object, sorted.
func keysOf(t *testing.T, v any) []string {
	t.Helper()
	m, ok := v.(map[string]any)
	if !ok {
		t.Fatalf("%v is not a JSON object", v)
	}
	var keys []string
	for k := range m {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	return keys
}

func wantKeys(t *testing.T, what string, v any, want ...string) {
	t.Helper()
	slices.Sort(want)
	if got := keysOf(t, v); !slices.Equal(got, want) {
		t.Errorf("%s has keys %v, want %v", what, got, want)
	}
}

func reasonNames(reasons []endReason) []string {
	var names []string
	for _, r := range reasons {
		names = append(names, string(r))
	}
	return names
}

// handlerOf finds h in GET /sse/streams.
func handlerOf(t *testing.T, h *Handler) (handlerStatus, map[string]any) {
	t.Helper()
	var list []handlerStatus
	body := adminGet(t, "/sse/streams", &list)
	var raw []any
	_ = json.Unmarshal([]byte(body), &raw)
	found := -1
	for i, st := range list {
		if st.handlerID == h.admin.id {
			if found >= 0 {
				t.Fatalf("handler %+v listed twice: %s", h.admin.id, body)
			}
			found = i
		}
	}
	if found < 0 {
		t.Fatalf("handler %+v not listed: %s", h.admin.id, body)
	}
	return list[found], raw[found].(map[string]any)
}

// waitHandler polls GET /sse/streams until ok holds for h.
func waitHandler(t *testing.T, h *Handler, what string, ok func(handlerStatus) bool) handlerStatus {
	t.Helper()
	deadline := time.Now().Add(testWait)
	for {
		st, _ := handlerOf(t, h)
		if ok(st) {
			return st
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: never; last %+v", what, st)
		}
		time.Sleep(time.Millisecond)
	}
}

// request is one request through a handler, served in the background.
type request struct {
	w      *memWriter
	cancel func()
	done   chan struct{}
}

func serveBackground(t *testing.T, h *Handler, next caddyhttp.Handler, path string) *request {
	t.Helper()
	req := httptest.NewRequest(http.MethodGet, path, nil)
	req.Header.Set("Accept", "text/event-stream")
	ctx, cancel := context.WithCancel(req.Context())
	t.Cleanup(cancel)
	rq := &request{w: newMemWriter(), cancel: cancel, done: make(chan struct{})}
	go func() {
		defer close(rq.done)
		defer func() { _ = recover() }()
		_ = h.ServeHTTP(rq.w, req.WithContext(ctx), next)
	}()
	return rq
}

func (rq *request) wait(t *testing.T) string {
	t.Helper()
	select {
	case <-rq.done:
	case <-time.After(testWait):
		t.Fatal("request did not end")
	}
	rq.w.mu.Lock()
	defer rq.w.mu.Unlock()
	return rq.w.body.String()
}

func TestAdminStreams(t *testing.T) {
	clock := newFakeClock()
	srv := new(caddyhttp.Server)
	h := &Handler{HeartbeatText: "admin-streams", MaxStreams: 3, Retry: seconds(1)}
	provisionOn(t, h, srv, clock)
	other := &Handler{HeartbeatText: "admin-streams-other", Share: &ShareConfig{Linger: -1}}
	provisionOn(t, other, srv, clock)
	t.Cleanup(func() {
		_ = h.Cleanup()
		_ = other.Cleanup()
	})
	if h.admin.id.Index != 1 || other.admin.id.Index != 2 || len(h.admin.id.Config) != 12 || h.admin.id.Config == other.admin.id.Config {
		t.Fatalf("identities %+v and %+v: want indexes 1 and 2 and two 12-digit config digests", h.admin.id, other.admin.id)
	}

	// The shape, before anything happened: every known reason, at 0.
	st, raw := handlerOf(t, h)
	wantKeys(t, "a handler", raw, "server", "index", "config", "loaded", "draining", "shared", "max_streams", "streams", "ended", "refused")
	wantKeys(t, "streams", raw["streams"], "open", "waiting", "draining")
	wantKeys(t, "ended", raw["ended"], reasonNames(streamEndReasons)...)
	wantKeys(t, "refused", raw["refused"], reasonNames(refusalReasons)...)
	if st.Streams != (streamCounts{}) || st.Draining || st.Shared || st.MaxStreams != 3 || !st.Loaded.Equal(clock.Now()) {
		t.Errorf("fresh handler: %+v", st)
	}
	if o, _ := handlerOf(t, other); !o.Shared {
		t.Errorf("the handler with share is not shown shared: %+v", o)
	}

	// Two streams, one request waiting for its header, and one refused
	// over max_streams (3: the waiting request holds a slot).
	upA, upB := newScriptedUpstream(), newScriptedUpstream()
	a := startStream(t, h, clock, upA)
	b := startStream(t, h, clock, upB)
	hold := handlerFunc(func(w http.ResponseWriter, r *http.Request) error {
		<-r.Context().Done()
		return r.Context().Err()
	})
	waiting := serveBackground(t, h, hold, "/events")
	waitHandler(t, h, "two open, one waiting", func(st handlerStatus) bool {
		return st.Streams == streamCounts{Open: 2, Waiting: 1}
	})
	if got := serveBackground(t, h, hold, "/events").wait(t); !strings.Contains(got, "retry: ") {
		t.Errorf("the request over max_streams got %q, want a refusal", got)
	}
	b.cancel()
	b.wait()
	st = waitHandler(t, h, "one open, one waiting, one ended, one refused", func(st handlerStatus) bool {
		return st.Streams == streamCounts{Open: 1, Waiting: 1} && st.Ended["client_gone"] == 1
	})
	if st.Refused["max_streams"] != 1 || sum(st.Refused) != 1 || sum(st.Ended) != 1 {
		t.Errorf("counts: ended %v, refused %v; want client_gone 1 and max_streams 1 alone", st.Ended, st.Refused)
	}

	// A drain reaches both; they end within the window.
	h.drain()
	st, _ = handlerOf(t, h)
	if !st.Draining || st.Streams != (streamCounts{Open: 1, Waiting: 1, Draining: 2}) {
		t.Errorf("draining: %+v", st)
	}
	clock.Advance(11 * time.Second)
	a.wait()
	waiting.wait(t)
	st = waitHandler(t, h, "drained", func(st handlerStatus) bool { return st.Streams == streamCounts{} })
	if st.Ended["drain"] != 1 || st.Refused["drain"] != 1 || sum(st.Ended) != 2 || sum(st.Refused) != 2 {
		t.Errorf("after the drain: ended %v, refused %v; want one more each, reason drain", st.Ended, st.Refused)
	}
	if o, _ := handlerOf(t, other); o.Draining || sum(o.Ended)+sum(o.Refused) != 0 {
		t.Errorf("the other handler counted this one's requests: %+v", o)
	}

	// Unloaded, it is gone from the list, and its place with it.
	_ = other.Cleanup()
	var list []handlerStatus
	adminGet(t, "/sse/streams", &list)
	for _, st := range list {
		if st.handlerID == other.admin.id {
			t.Errorf("an unloaded handler is still listed: %+v", st)
		}
	}
	if _, ok := hubPool.References(sseHandlersOf{srv}); !ok {
		t.Error("the server's count of handlers went with one of two handlers")
	}
	_ = h.Cleanup()
	if _, ok := hubPool.References(sseHandlersOf{srv}); ok {
		t.Error("the server's count of handlers outlived its handlers")
	}
	if _, ok := hubPool.References(adminKey{h}); ok {
		t.Error("an unloaded handler is still in hubPool")
	}
}

func sum(counts map[string]uint64) uint64 {
	var n uint64
	for _, c := range counts {
		n += c
	}
	return n
}

// hubsOfHandler finds h's hubs in GET /sse/hubs, with their raw JSON.
func hubsOfHandler(t *testing.T, h *Handler) ([]hubStatus, []map[string]any, string) {
	t.Helper()
	var list []hubStatus
	body := adminGet(t, "/sse/hubs", &list)
	var raw []map[string]any
	_ = json.Unmarshal([]byte(body), &raw)
	var mine []hubStatus
	var mineRaw []map[string]any
	for i, st := range list {
		if st.Handler == h.admin.id {
			mine = append(mine, st)
			mineRaw = append(mineRaw, raw[i])
		}
	}
	return mine, mineRaw, body
}

// waitHub polls GET /sse/hubs until h has one hub for which ok holds.
func waitHub(t *testing.T, h *Handler, what string, ok func(hubStatus) bool) hubStatus {
	t.Helper()
	deadline := time.Now().Add(testWait)
	for {
		hubs, _, body := hubsOfHandler(t, h)
		for _, st := range hubs {
			if ok(st) {
				return st
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: never; got %s", what, body)
		}
		time.Sleep(time.Millisecond)
	}
}

func TestAdminHubs(t *testing.T) {
	clock := newFakeClock()
	srv := new(caddyhttp.Server)
	h := &Handler{HeartbeatText: "admin-hubs", Retry: seconds(1), Share: &ShareConfig{Linger: -1}}
	provisionOn(t, h, srv, clock)
	t.Cleanup(func() { _ = h.Cleanup() })
	secrets := []string{"secret-token", "sess=s3cr3t", "/feed", "room=r-4242"}
	var bodies []string

	up := newHubUpstream()
	a := startClient(t, h, up, "/feed?room=r-4242", "Authorization", "Bearer secret-token", "Cookie", "sess=s3cr3t")
	hr := up.next(t)
	b := startClient(t, h, up, "/feed?room=r-4242", "Authorization", "Bearer secret-token", "Cookie", "sess=s3cr3t")
	waitSubscribers(t, h, 2)
	hr.send(t, "id: 7\ndata: seven\n\n")
	a.waitBody(t, "seven")
	b.waitBody(t, "seven")

	hubs, raw, body := hubsOfHandler(t, h)
	bodies = append(bodies, body)
	if len(hubs) != 1 {
		t.Fatalf("%d hubs of the handler, want 1: %s", len(hubs), body)
	}
	wantKeys(t, "a hub", raw[0], "hub", "handler", "state", "clients", "upstream", "kept")
	wantKeys(t, "a hub's handler", raw[0]["handler"], "server", "index", "config")
	wantKeys(t, "a connected upstream", raw[0]["upstream"], "state", "via", "connected_since", "reconnects", "last_event_id")
	wantKeys(t, "kept", raw[0]["kept"], "events", "bytes")
	st := hubs[0]
	if !isHubDigest(st.Hub) || st.State != "live" || st.Clients != 2 || st.Upstream.State != "connected" ||
		st.Upstream.ConnectedSince == nil || !st.Upstream.ConnectedSince.Equal(clock.Now()) || st.Upstream.Reconnects != 0 ||
		st.Upstream.LastEventID == nil || *st.Upstream.LastEventID != "7" || st.Upstream.Via != h.admin.id ||
		st.Kept != (keptStatus{Events: 1, Bytes: int64(len("id: 7\ndata: seven\n\n"))}) {
		t.Errorf("hub: %s", body)
	}
	digest := st.Hub

	// Wrong methods and unknown hubs.
	for _, c := range []struct {
		method, path string
		status       int
		allow        string
	}{
		{http.MethodGet, "/sse/hubs/" + digest + "/reconnect", http.StatusMethodNotAllowed, "POST"},
		{http.MethodPost, "/sse/hubs", http.StatusMethodNotAllowed, "GET"},
		{http.MethodDelete, "/sse/streams", http.StatusMethodNotAllowed, "GET"},
		{http.MethodPost, "/sse/hubs/0123456789abcdef/reconnect", http.StatusNotFound, ""},
		{http.MethodPost, "/sse/hubs/" + digest, http.StatusNotFound, ""},
		{http.MethodPost, "/sse/hubs/" + digest + "/forget", http.StatusNotFound, ""},
		{http.MethodPost, "/sse/hubs/" + strings.ToUpper(digest) + "/reconnect", http.StatusNotFound, ""},
	} {
		w := adminDo(t, c.method, c.path)
		if w.Code != c.status || w.Header().Get("Allow") != c.allow {
			t.Errorf("%s %s: %d, Allow %q; want %d, Allow %q", c.method, c.path, w.Code, w.Header().Get("Allow"), c.status, c.allow)
		}
	}
	up.none(t)

	// Reconnect: the upstream request ends and exactly one new one asks
	// from the last id; the clients stay, and miss nothing, twice nothing.
	w := adminDo(t, http.MethodPost, "/sse/hubs/"+digest+"/reconnect")
	bodies = append(bodies, w.Body.String())
	if w.Code != http.StatusAccepted || !strings.Contains(w.Body.String(), digest) {
		t.Fatalf("reconnect: %d %s", w.Code, w.Body)
	}
	hr.waitGone(t)
	hr = up.next(t)
	if got := hr.r.Header.Get("Last-Event-ID"); got != "7" {
		t.Errorf("the reconnect asked with Last-Event-ID %q, want 7", got)
	}
	hr.send(t, "id: 7\ndata: seven\n\nid: 8\ndata: eight\n\n")
	for _, c := range []*client{a, b} {
		if got := c.waitBody(t, "eight\n\n"); got != "id: 7\ndata: seven\n\nid: 8\ndata: eight\n\n" {
			t.Errorf("a client got %q across the reconnect", got)
		}
	}
	up.none(t)
	st = waitHub(t, h, "connected again", func(st hubStatus) bool { return st.Upstream.State == "connected" })
	if st.Hub != digest || st.Upstream.Reconnects != 1 || *st.Upstream.LastEventID != "8" || st.Clients != 2 || st.Kept.Events != 2 {
		t.Errorf("after the reconnect: %+v", st)
	}

	// Broken: the hub waits its backoff, on the fake clock, which stands
	// still; a reconnect ends the wait at once.
	hr.end <- true
	hr.waitGone(t)
	st = waitHub(t, h, "retrying", func(st hubStatus) bool { return st.Upstream.State == "retrying" })
	_, raw, body = hubsOfHandler(t, h)
	bodies = append(bodies, body)
	wantKeys(t, "a retrying upstream", raw[0]["upstream"], "state", "via", "connected_since", "reconnects", "last_event_id", "failures", "backoff_ms", "retry_at")
	if st.Upstream.Failures != 1 || st.Upstream.BackoffMS < 125 || st.Upstream.BackoffMS > 250 || st.Upstream.ConnectedSince != nil ||
		st.Upstream.RetryAt == nil || st.Upstream.RetryAt.Sub(clock.Now()).Milliseconds() != st.Upstream.BackoffMS {
		t.Errorf("retrying: %s", body)
	}
	if w := adminDo(t, http.MethodPost, "/sse/hubs/"+digest+"/reconnect"); w.Code != http.StatusAccepted {
		t.Fatalf("reconnect while retrying: %d %s", w.Code, w.Body)
	}
	hr = up.next(t) // the clock did not move
	if got := hr.r.Header.Get("Last-Event-ID"); got != "8" {
		t.Errorf("the reconnect asked with Last-Event-ID %q, want 8", got)
	}
	hr.send(t, "id: 9\ndata: nine\n\n")
	a.waitBody(t, "nine")
	if st = waitHub(t, h, "connected", func(st hubStatus) bool { return st.Upstream.State == "connected" }); st.Upstream.Reconnects != 2 {
		t.Errorf("reconnects %d, want 2", st.Upstream.Reconnects)
	}

	// A hub still waiting for its first header has nothing to renew.
	held := newHubUpstream()
	held.hold = make(chan struct{})
	c := startClient(t, h, held, "/held")
	st = waitHub(t, h, "starting", func(st hubStatus) bool { return st.State == "starting" })
	if st.Upstream.State != "connecting" || st.Clients != 1 || st.Upstream.LastEventID != nil {
		t.Errorf("starting hub: %+v", st)
	}
	if w := adminDo(t, http.MethodPost, "/sse/hubs/"+st.Hub+"/reconnect"); w.Code != http.StatusConflict {
		t.Errorf("reconnect of a starting hub: %d, want 409", w.Code)
	}
	close(held.hold)
	hc := held.next(t)
	c.cancel()
	c.waitDone(t)
	hc.waitGone(t)

	for _, body := range bodies {
		for _, secret := range secrets {
			if strings.Contains(body, secret) {
				t.Errorf("an admin response has %q: %s", secret, body)
			}
		}
	}
	a.cancel()
	b.cancel()
	a.waitDone(t)
	b.waitDone(t)
	hr.waitGone(t)
	if hubs, _, body := hubsOfHandler(t, h); len(hubs) != 0 {
		t.Errorf("hubs left after their clients: %s", body)
	}
}

// TestAdminHubDigest: a hub's name is the same for the same key in a
// registry, differs between keys and registries, and is 16 hex digits.
func TestAdminHubDigest(t *testing.T) {
	reg, other := newHubRegistry(), newHubRegistry()
	reg.mu.Lock()
	d1, d2, d3 := reg.hubDigestLocked("k"), reg.hubDigestLocked("k"), reg.hubDigestLocked("k2")
	reg.mu.Unlock()
	other.mu.Lock()
	d4 := other.hubDigestLocked("k")
	other.mu.Unlock()
	if d1 != d2 || d1 == d3 || d1 == d4 || !isHubDigest(d1) || !isHubDigest(d4) {
		t.Errorf("digests %q %q %q %q", d1, d2, d3, d4)
	}
}
