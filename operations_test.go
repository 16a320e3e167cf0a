package caddysse

import (
	"context"
	"errors"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
)

// streamRequest is a stream request from client ip, as Caddy hands it over.
func streamRequest(ip string) *http.Request {
	r := httptest.NewRequest(http.MethodGet, "/events", nil)
	r.Header.Set("Accept", "text/event-stream")
	ctx := context.WithValue(r.Context(), caddyhttp.VarsCtxKey, map[string]any{caddyhttp.ClientIPVarKey: ip})
	return r.WithContext(ctx)
}

// heldStream is a stream held open by an upstream until release is closed.
func heldStream(t *testing.T, h *Handler, r *http.Request) (result chan error, release chan struct{}) {
	result, release = make(chan error, 1), make(chan struct{})
	started := make(chan struct{})
	next := handlerFunc(func(w http.ResponseWriter, r *http.Request) error {
		w.Header().Set("Content-Type", "text/event-stream")
		w.WriteHeader(http.StatusOK)
		close(started)
		<-release
		return nil
	})
	go func() { result <- h.ServeHTTP(newMemWriter(), r, next) }()
	select {
	case <-started:
	case err := <-result:
		t.Fatalf("stream refused: %v", err)
	case <-time.After(testWait):
		t.Fatal("stream did not start")
	}
	return result, release
}

func TestLastEventIDQuery(t *testing.T) {
	h := &Handler{LastEventIDQuery: "lastEventId"}
	provisionTest(t, h)
	for _, tc := range []struct {
		name, target, header string
		wantQuery, wantID    string
		wantStatus           int
	}{
		{"moved to header", "/events?a=1&lastEventId=42&b=2", "", "a=1&b=2", "42", 0},
		{"escaped", "/events?lastEventId=a%20b%2Fc", "", "", "a b/c", 0},
		{"header wins", "/events?lastEventId=42&x=y", "41", "x=y", "41", 0},
		{"absent", "/events?x=y", "", "x=y", "", 0},
		{"newline refused", "/events?lastEventId=a%0Ab", "", "", "", http.StatusBadRequest},
		{"nul refused", "/events?lastEventId=a%00b", "", "", "", http.StatusBadRequest},
		// Go's transport refuses these as a header value (reverse_proxy's
		// 502, a refusal the client retries with the same value for ever).
		{"control character refused", "/events?lastEventId=a%01b", "", "", "", http.StatusBadRequest},
		{"escape refused", "/events?lastEventId=%1B%5B31m", "", "", "", http.StatusBadRequest},
		{"del refused", "/events?lastEventId=a%7Fb", "", "", "", http.StatusBadRequest},
		{"control character refused with a header", "/events?lastEventId=a%01b", "41", "", "", http.StatusBadRequest},
		{"tab kept", "/events?lastEventId=a%09b", "", "", "a\tb", 0},
		{"utf-8 kept", "/events?lastEventId=%C3%A9t%C3%A9", "", "", "été", 0},
		{"too long refused", "/events?lastEventId=" + strings.Repeat("x", maxEventIDLen+1), "", "", "", http.StatusBadRequest},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := httptest.NewRequest(http.MethodGet, tc.target, nil)
			if tc.header != "" {
				r.Header.Set("Last-Event-ID", tc.header)
			}
			var seen *http.Request
			err := h.ServeHTTP(httptest.NewRecorder(), r, handlerFunc(func(w http.ResponseWriter, r *http.Request) error {
				seen = r
				return nil
			}))
			if tc.wantStatus != 0 {
				var he caddyhttp.HandlerError
				if !errors.As(err, &he) || he.StatusCode != tc.wantStatus || seen != nil {
					t.Fatalf("want %d before the upstream, got %v (upstream reached: %v)", tc.wantStatus, err, seen != nil)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if seen.URL.RawQuery != tc.wantQuery || seen.Header.Get("Last-Event-ID") != tc.wantID {
				t.Fatalf("upstream got query %q, Last-Event-ID %q; want %q, %q", seen.URL.RawQuery, seen.Header.Get("Last-Event-ID"), tc.wantQuery, tc.wantID)
			}
		})
	}
}

// TestDrainClosesEveryStreamWithinWindow checks what a reload or stop does
// to live streams: each closes through the close sequence at its own moment
// within the drain window, and a stream starting during the drain drains too.
func TestDrainClosesEveryStreamWithinWindow(t *testing.T) {
	h := &Handler{Heartbeat: -1, DrainWindow: seconds(10), Retry: seconds(1), CloseEvent: "close"}
	clock, _ := provisionTest(t, h)
	var runs []*streamRun
	for range 20 {
		runs = append(runs, startStream(t, h, clock, newScriptedUpstream()))
	}
	if clock.pending() != 0 {
		t.Fatalf("timers armed with nothing to time")
	}
	h.drain()
	late := startStream(t, h, clock, newScriptedUpstream())
	runs = append(runs, late)

	closedAt := map[int]time.Duration{}
	for step := 0; step <= 10 && len(closedAt) < len(runs); step++ {
		for i, run := range runs {
			if _, done := closedAt[i]; !done && run.w.received() != "" {
				closedAt[i] = time.Duration(step) * time.Second
			}
		}
		clock.Advance(time.Second)
	}
	moments := map[time.Duration]bool{}
	for i, run := range runs {
		if _, ok := closedAt[i]; !ok {
			t.Fatalf("stream %d still open after the drain window", i)
		}
		run.waitUpstreamGone()
		if err := run.wait(); err != nil || run.panicked != nil {
			t.Fatalf("stream %d: err %v, panic %v", i, err, run.panicked)
		}
		if got := run.w.received(); got != "retry: 1000\nevent: close\ndata: drain\n\n" {
			t.Fatalf("stream %d got %q", i, got)
		}
		moments[closedAt[i]] = true
	}
	if len(moments) < 3 {
		t.Fatalf("21 streams closed at only %d distinct moments: not spread", len(moments))
	}
}

// TestDrainWindowOff checks that drain_window off closes every stream at
// once when the server drains, through the close sequence.
func TestDrainWindowOff(t *testing.T) {
	h := &Handler{Heartbeat: durationOff, DrainWindow: durationOff, Retry: seconds(1), CloseEvent: "close"}
	clock, _ := provisionTest(t, h)
	var runs []*streamRun
	for range 5 {
		runs = append(runs, startStream(t, h, clock, newScriptedUpstream()))
	}
	h.drain()
	clock.Advance(0)
	for i, run := range runs {
		if got := run.w.received(); got != "retry: 1000\nevent: close\ndata: drain\n\n" {
			t.Fatalf("stream %d got %q at the drain, want the close sequence at once", i, got)
		}
		run.waitUpstreamGone()
		if err := run.wait(); err != nil || run.panicked != nil {
			t.Fatalf("stream %d: err %v, panic %v", i, err, run.panicked)
		}
	}
}
