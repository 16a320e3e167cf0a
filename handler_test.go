package caddysse

import (
	"context"
	"errors"
	"net/http"
	"net/http/httptest"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"
)

func seconds(n float64) caddy.Duration { return caddy.Duration(n * float64(time.Second)) }

func mustSend(t *testing.T, run *streamRun, s string) {
	t.Helper()
	if err := run.send([]byte(s)); err != nil {
		t.Fatalf("upstream write %q: %v", s, err)
	}
}

func wantReceived(t *testing.T, run *streamRun, want string) {
	t.Helper()
	if got := run.w.received(); got != want {
		t.Fatalf("client received\n  %q\nwant\n  %q", got, want)
	}
}

func wantReason(t *testing.T, logs *observer.ObservedLogs, want endReason) {
	t.Helper()
	if got := endField(t, logs, "reason"); got != string(want) {
		t.Fatalf("stream ended for %q, want %q", got, want)
	}
}

func TestEventStreamHeadersAndFlushing(t *testing.T) {
	h := &Handler{}
	clock, _ := provisionTest(t, h)
	up := newScriptedUpstream()
	up.header = http.Header{"Content-Length": {"1000"}}
	up.contentType = "text/event-stream; charset=utf-8"
	run := startStream(t, h, clock, up)

	// The header reaches the client before any event.
	run.w.mu.Lock()
	status, flushes := run.w.status, run.w.flushes
	run.w.mu.Unlock()
	if status != http.StatusOK || flushes == 0 {
		t.Fatalf("header not sent at once: status %d, flushes %d", status, flushes)
	}
	hdr := run.w.Header()
	if got := hdr.Get("X-Accel-Buffering"); got != "no" {
		t.Errorf("X-Accel-Buffering = %q, want no", got)
	}
	if got := hdr.Get("Cache-Control"); got != "no-cache" {
		t.Errorf("Cache-Control = %q, want no-cache", got)
	}
	if _, ok := hdr["Content-Length"]; ok {
		t.Errorf("Content-Length kept: %q", hdr.Get("Content-Length"))
	}
	if got := (<-up.request).Header.Get("Accept-Encoding"); got != "identity" {
		t.Errorf("upstream got Accept-Encoding %q; it must be asked for no compression", got)
	}

	// Every write reaches the client at once, even half an event.
	mustSend(t, run, "data: one\n\n")
	wantReceived(t, run, "data: one\n\n")
	mustSend(t, run, "data: tw")
	wantReceived(t, run, "data: one\n\ndata: tw")
	mustSend(t, run, "o\n\n")
	run.endUpstream()
	if err := run.wait(); err != nil {
		t.Fatal(err)
	}
	wantReceived(t, run, "data: one\n\ndata: two\n\n")
}

func TestUpstreamCacheControlKept(t *testing.T) {
	h := &Handler{}
	clock, _ := provisionTest(t, h)
	up := newScriptedUpstream()
	up.header = http.Header{"Cache-Control": {"private, no-store"}}
	run := startStream(t, h, clock, up)
	run.endUpstream()
	run.wait()
	if got := run.w.Header().Get("Cache-Control"); got != "private, no-store" {
		t.Fatalf("Cache-Control = %q, want the upstream's", got)
	}
}

// TestOtherResponsesPassThrough checks that responses that are not a 200
// event stream are left exactly as the upstream made them.
func TestOtherResponsesPassThrough(t *testing.T) {
	for _, tc := range []struct {
		name, contentType string
		status            int
		method            string
	}{
		{"json", "application/json", http.StatusOK, http.MethodGet},
		{"error event stream", "text/event-stream", http.StatusNotFound, http.MethodGet},
		{"no content type", "", http.StatusOK, http.MethodGet},
		{"bad media type", "text/event-stream; =", http.StatusOK, http.MethodGet},
		{"head", "text/event-stream", http.StatusOK, http.MethodHead},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h := &Handler{Heartbeat: seconds(1), IdleTimeout: seconds(2), MaxLifetime: seconds(3)}
			clock, logs := provisionTest(t, h)
			body := `{"error": "not found"}` + "\n\n"
			next := handlerFunc(func(w http.ResponseWriter, r *http.Request) error {
				if tc.contentType != "" {
					w.Header().Set("Content-Type", tc.contentType)
				}
				w.Header().Set("Content-Length", "24")
				w.WriteHeader(tc.status)
				if r.Method != http.MethodHead {
					w.Write([]byte(body))
				}
				clock.Advance(10 * time.Second) // no timer may act on it
				return nil
			})
			rec := httptest.NewRecorder()
			req := httptest.NewRequest(tc.method, "/", nil)
			if err := h.ServeHTTP(rec, req, next); err != nil {
				t.Fatal(err)
			}
			if rec.Code != tc.status {
				t.Errorf("status %d, want %d", rec.Code, tc.status)
			}
			if tc.method != http.MethodHead && rec.Body.String() != body {
				t.Errorf("body %q, want %q", rec.Body.String(), body)
			}
			for _, k := range []string{"X-Accel-Buffering", "Cache-Control"} {
				if v := rec.Header().Get(k); v != "" {
					t.Errorf("%s added: %q", k, v)
				}
			}
			if rec.Header().Get("Content-Length") != "24" {
				t.Errorf("Content-Length changed")
			}
			if clock.pending() != 0 {
				t.Errorf("%d timers armed for a response that is not a stream", clock.pending())
			}
			if n := logs.FilterMessage("stream ended").Len(); n != 0 {
				t.Errorf("logged %d stream ends for a non-stream", n)
			}
		})
	}
}

type handlerFunc func(http.ResponseWriter, *http.Request) error

func (f handlerFunc) ServeHTTP(w http.ResponseWriter, r *http.Request) error { return f(w, r) }

// TestHeartbeats checks when heartbeats come: exactly one heartbeat period
// after the client last received bytes, not a nanosecond earlier or later,
// and only between events.
func TestHeartbeats(t *testing.T) {
	const hb = 10 * time.Second
	h := &Handler{Heartbeat: caddy.Duration(hb), HeartbeatText: "ping"}
	clock, logs := provisionTest(t, h)
	run := startStream(t, h, clock, newScriptedUpstream())

	// The header went out as the stream started; then one heartbeat per
	// period of quiet.
	wantHeartbeatAfter(t, run, clock, hb)
	wantHeartbeatAfter(t, run, clock, hb)

	// Data resets the quiet period.
	clock.Advance(5 * time.Second)
	mustSend(t, run, "data: a\n\n")
	wantHeartbeatAfter(t, run, clock, hb)

	// Never inside an event: the heartbeat waits for the boundary, then
	// comes a period after the write that reached it.
	mustSend(t, run, "data: b\n")
	clock.Advance(25 * time.Second)
	wantReceived(t, run, ":ping\n\n:ping\n\ndata: a\n\n:ping\n\ndata: b\n")
	mustSend(t, run, "\n")
	wantHeartbeatAfter(t, run, clock, hb)
	wantReceived(t, run, ":ping\n\n:ping\n\ndata: a\n\n:ping\n\ndata: b\n\n:ping\n\n")

	run.endUpstream()
	run.wait()
	if got := endField(t, logs, "heartbeats"); got != "4" {
		t.Errorf("logged %s heartbeats, want 4", got)
	}
	if clock.pending() != 0 {
		t.Errorf("%d timers left after the stream ended", clock.pending())
	}
}

// wantHeartbeatAfter checks that the client, which just received bytes,
// receives nothing more for period minus a nanosecond, and then, at period,
// exactly the heartbeat.
func wantHeartbeatAfter(t *testing.T, run *streamRun, clock *fakeClock, period time.Duration) {
	t.Helper()
	before := run.w.received()
	clock.Advance(period - time.Nanosecond)
	if got := run.w.received(); got != before {
		t.Fatalf("after %v of quiet the client received %q: a heartbeat too early", period-time.Nanosecond, got[len(before):])
	}
	clock.Advance(time.Nanosecond)
	if got, want := run.w.received(), before+string(run.h.heartbeatLine); got != want {
		t.Fatalf("after %v of quiet the client received %q, want the heartbeat %q", period, got[len(before):], run.h.heartbeatLine)
	}
}

func TestHeartbeatOff(t *testing.T) {
	h := &Handler{Heartbeat: -1}
	clock, _ := provisionTest(t, h)
	run := startStream(t, h, clock, newScriptedUpstream())
	if clock.pending() != 0 {
		t.Fatalf("timer armed with nothing to time")
	}
	clock.Advance(time.Hour)
	wantReceived(t, run, "")
	run.endUpstream()
	run.wait()
}

func TestIdleTimeoutClosesWithRetryAndCloseEvent(t *testing.T) {
	h := &Handler{Heartbeat: seconds(10), IdleTimeout: seconds(25), Retry: seconds(2.5), CloseEvent: "bye"}
	clock, logs := provisionTest(t, h)
	up := newScriptedUpstream()
	run := startStream(t, h, clock, up)
	upstreamReq := waitFor(t, up.request, "the upstream's request")
	mustSend(t, run, "id: 1\ndata: a\n\n")
	// Heartbeats keep the client busy but are not upstream activity.
	clock.Advance(25*time.Second - time.Nanosecond)
	wantReceived(t, run, "id: 1\ndata: a\n\n:\n\n:\n\n")
	if err := upstreamReq.Context().Err(); err != nil {
		t.Fatalf("upstream cancelled (%v) before idle_timeout", err)
	}
	clock.Advance(time.Nanosecond)
	run.waitUpstreamGone()
	if err := run.wait(); err != nil || run.panicked != nil {
		t.Fatalf("a close by the gateway must end cleanly: err %v, panic %v", err, run.panicked)
	}
	wantReceived(t, run, "id: 1\ndata: a\n\n:\n\n:\n\nretry: 2500\nevent: bye\ndata: idle_timeout\n\n")
	wantReason(t, logs, reasonIdleTimeout)
	if got := endField(t, logs, "last_event_id"); got != "1" {
		t.Errorf("last_event_id %q, want 1", got)
	}
	if got := endField(t, logs, "events"); got != "1" {
		t.Errorf("events %s, want 1 (the close event is the gateway's)", got)
	}
}

func TestIdleTimeoutInsideEventAddsNothing(t *testing.T) {
	h := &Handler{Heartbeat: -1, IdleTimeout: seconds(5), Retry: seconds(1), CloseEvent: "bye"}
	clock, logs := provisionTest(t, h)
	up := newScriptedUpstream()
	run := startStream(t, h, clock, up)
	upstreamReq := waitFor(t, up.request, "the upstream's request")
	mustSend(t, run, "data: a\n\ndata: unfinished\n")
	clock.Advance(5*time.Second - time.Nanosecond)
	if err := upstreamReq.Context().Err(); err != nil {
		t.Fatalf("upstream cancelled (%v) before idle_timeout", err)
	}
	clock.Advance(time.Nanosecond)
	run.waitUpstreamGone()
	run.wait()
	// Anything added would complete the unfinished event; the client must
	// discard it instead.
	wantReceived(t, run, "data: a\n\ndata: unfinished\n")
	wantReason(t, logs, reasonIdleTimeout)
}

func TestMaxLifetimeWaitsForEventBoundary(t *testing.T) {
	zero := 0.0
	h := &Handler{Heartbeat: -1, MaxLifetime: seconds(60), LifetimeJitter: &zero, Retry: seconds(1)}
	clock, logs := provisionTest(t, h)
	run := startStream(t, h, clock, newScriptedUpstream())
	mustSend(t, run, "data: a\n\ndata: b")
	clock.Advance(60 * time.Second)
	wantReceived(t, run, "data: a\n\ndata: b")
	// The write that ends the event also starts the next one: the stream
	// closes right at the boundary and the rest is not forwarded.
	mustSend(t, run, "\n\ndata: c\n\n")
	run.waitUpstreamGone()
	if err := run.wait(); err != nil || run.panicked != nil {
		t.Fatalf("err %v, panic %v", err, run.panicked)
	}
	wantReceived(t, run, "data: a\n\ndata: b\n\nretry: 1000\n\n")
	wantReason(t, logs, reasonMaxLifetime)
}

func TestMaxLifetimeGivesUpOnEndlessEvent(t *testing.T) {
	zero := 0.0
	h := &Handler{Heartbeat: -1, MaxLifetime: seconds(60), LifetimeJitter: &zero, Retry: seconds(1), WriteTimeout: seconds(10)}
	clock, logs := provisionTest(t, h)
	up := newScriptedUpstream()
	run := startStream(t, h, clock, up)
	upstreamReq := waitFor(t, up.request, "the upstream's request")
	mustSend(t, run, "data: a\n\ndata: b")
	clock.Advance(65 * time.Second)
	mustSend(t, run, "bb")
	// The close waits write_timeout for the event's end, from max_lifetime.
	clock.Advance(5*time.Second - time.Nanosecond)
	if err := upstreamReq.Context().Err(); err != nil {
		t.Fatalf("upstream cancelled (%v) before max_lifetime + write_timeout", err)
	}
	clock.Advance(time.Nanosecond)
	run.waitUpstreamGone()
	run.wait()
	wantReceived(t, run, "data: a\n\ndata: bbb")
	wantReason(t, logs, reasonMaxLifetime)
}

func TestLifetimeJitterSpreadsCloses(t *testing.T) {
	jitter := 0.5
	ends := map[time.Duration]bool{}
	for range 12 {
		h := &Handler{Heartbeat: -1, MaxLifetime: seconds(100), LifetimeJitter: &jitter}
		clock, _ := provisionTest(t, h)
		run := startStream(t, h, clock, newScriptedUpstream())
		start := clock.Now()
		// The timer is armed until the stream closes; Advance runs it.
		clock.Advance(50*time.Second - time.Nanosecond)
		if clock.pending() == 0 {
			t.Fatalf("closed before (1 - jitter) × max_lifetime")
		}
		for i := 0; i < 51 && clock.pending() > 0; i++ {
			clock.Advance(time.Second)
		}
		run.waitUpstreamGone()
		ends[clock.Now().Sub(start)] = true
		run.wait()
	}
	if len(ends) < 3 {
		t.Fatalf("12 streams closed at only %d distinct moments: %v", len(ends), ends)
	}
}

func TestCloseGraceWaitsForClient(t *testing.T) {
	h := &Handler{Heartbeat: -1, IdleTimeout: seconds(5), CloseEvent: "close", CloseGrace: seconds(3)}
	clock, _ := provisionTest(t, h)

	// The client does not hang up: the response ends when the grace ends.
	run := startStream(t, h, clock, newScriptedUpstream())
	clock.Advance(5 * time.Second)
	run.waitUpstreamGone() // the upstream is released at once
	waitArmed(t, clock)
	clock.Advance(3*time.Second - time.Nanosecond)
	select {
	case <-run.done:
		t.Fatal("response ended before the grace period")
	default:
	}
	clock.Advance(time.Nanosecond)
	run.wait()
	wantReceived(t, run, "event: close\ndata: idle_timeout\n\n")

	// The client hangs up during the grace: the response ends at once.
	run = startStream(t, h, clock, newScriptedUpstream())
	clock.Advance(5 * time.Second)
	run.waitUpstreamGone()
	run.cancel()
	run.wait()
}

// waitArmed waits until the handler has armed a timer (the grace timer).
func waitArmed(t *testing.T, clock *fakeClock) {
	t.Helper()
	deadline := time.Now().Add(testWait)
	for clock.pending() == 0 {
		if time.Now().After(deadline) {
			t.Fatal("no timer armed")
		}
		time.Sleep(time.Millisecond)
	}
}

func TestClientGoneCancelsUpstream(t *testing.T) {
	h := &Handler{}
	clock, logs := provisionTest(t, h)
	run := startStream(t, h, clock, newScriptedUpstream())
	mustSend(t, run, "data: a\n\n")
	run.cancel()
	run.waitUpstreamGone()
	run.wait()
	wantReason(t, logs, reasonClientGone)
	if clock.pending() != 0 {
		t.Errorf("%d timers left", clock.pending())
	}
}

// TestWriteTimeoutOff checks that write_timeout off leaves Caddy's write
// deadline as the server has it, where write_timeout tightens it for the
// stream and puts it back after.
func TestWriteTimeoutOff(t *testing.T) {
	const server = time.Minute // the server's write_idle_timeout
	for _, tc := range []struct {
		name         string
		writeTimeout caddy.Duration
		during       time.Duration
	}{
		{"2s", seconds(2), 2 * time.Second},
		{"off", durationOff, server},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h := &Handler{WriteTimeout: tc.writeTimeout}
			provisionTest(t, h)
			mw := newMemWriter()
			// What caddyhttp.Server.ServeHTTP puts under every response.
			iw := &caddyhttp.IdleTimeoutWriter{
				ResponseWriterWrapper: &caddyhttp.ResponseWriterWrapper{ResponseWriter: mw},
				Ctrl:                  http.NewResponseController(mw),
				Deadline:              caddyhttp.IdleDeadline{Start: time.Now(), Timeout: server},
				Logger:                zap.NewNop(),
			}
			r := streamRequest("10.0.0.1")
			r = r.WithContext(caddyhttp.ContextWithIdleTimeouts(r.Context(), nil, iw))
			var during time.Duration
			next := handlerFunc(func(w http.ResponseWriter, r *http.Request) error {
				w.Header().Set("Content-Type", "text/event-stream")
				w.WriteHeader(http.StatusOK)
				during = iw.Deadline.Timeout
				_, err := w.Write([]byte("data: a\n\n"))
				return err
			})
			if err := h.ServeHTTP(iw, r, next); err != nil {
				t.Fatal(err)
			}
			if during != tc.during || iw.Deadline.Timeout != server {
				t.Fatalf("write deadline's timeout %v during the stream and %v after, want %v and %v",
					during, iw.Deadline.Timeout, tc.during, server)
			}
			if got := mw.received(); got != "data: a\n\n" {
				t.Fatalf("client received %q", got)
			}
		})
	}
}

func TestFailedWriteEndsStreamAndUpstream(t *testing.T) {
	for _, tc := range []struct {
		name   string
		err    error
		reason endReason
	}{
		{"broken", errTestBrokenPipe, reasonClientGone},
		{"deadline", os.ErrDeadlineExceeded, reasonWriteTimeout},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h := &Handler{}
			clock, logs := provisionTest(t, h)
			up := newScriptedUpstream()
			run := startStream(t, h, clock, up)
			run.w.mu.Lock()
			run.w.failErr = tc.err
			run.w.mu.Unlock()
			err := run.send([]byte("data: too long\n\n"))
			if err == nil {
				t.Fatal("upstream write succeeded into a dead client")
			}
			run.waitUpstreamGone()
			run.wait()
			// It returns rather than panicking, so what runs after it
			// (log_append) still sees the stream's placeholders; the
			// server drops a connection whose write failed by itself.
			if run.panicked != nil {
				t.Errorf("stream to a dead client panicked: %v", run.panicked)
			}
			wantReason(t, logs, tc.reason)
		})
	}
}

func TestUpstreamErrorEndsCleanly(t *testing.T) {
	h := &Handler{}
	clock, logs := provisionTest(t, h)
	next := handlerFunc(func(w http.ResponseWriter, r *http.Request) error {
		w.Header().Set("Content-Type", "text/event-stream")
		w.Write([]byte("data: a\n\ndata: cut"))
		panic(http.ErrAbortHandler) // what reverse_proxy does when the upstream breaks
	})
	w := newMemWriter()
	err := h.ServeHTTP(w, httptest.NewRequest("GET", "/", nil), next)
	if err != nil {
		t.Fatal(err)
	}
	if w.received() != "data: a\n\ndata: cut" {
		t.Fatalf("received %q", w.received())
	}
	wantReason(t, logs, reasonUpstreamError)
	if clock.pending() != 0 {
		t.Errorf("%d timers left", clock.pending())
	}
}

func TestOtherPanicsPropagate(t *testing.T) {
	h := &Handler{}
	clock, _ := provisionTest(t, h)
	boom := errors.New("boom")
	next := handlerFunc(func(w http.ResponseWriter, r *http.Request) error {
		w.Header().Set("Content-Type", "text/event-stream")
		w.WriteHeader(http.StatusOK)
		panic(boom)
	})
	defer func() {
		if r := recover(); r != boom {
			t.Fatalf("recovered %v, want the handler's own panic", r)
		}
		if clock.pending() != 0 {
			t.Errorf("%d timers left", clock.pending())
		}
	}()
	h.ServeHTTP(newMemWriter(), httptest.NewRequest("GET", "/", nil), next)
}

func TestUpstreamEndLogsTotals(t *testing.T) {
	h := &Handler{Heartbeat: seconds(1)}
	clock, logs := provisionTest(t, h)
	run := startStream(t, h, clock, newScriptedUpstream())
	mustSend(t, run, "id: x1\ndata: a\n\n")
	clock.Advance(time.Second)
	mustSend(t, run, "id: x2\ndata: b\n\n: comment\n\n")
	run.endUpstream()
	if err := run.wait(); err != nil {
		t.Fatal(err)
	}
	wantReason(t, logs, reasonUpstreamEnd)
	for key, want := range map[string]string{
		"events": "2", "heartbeats": "1", "last_event_id": "x2",
		"bytes": "46",
	} {
		if got := endField(t, logs, key); got != want {
			t.Errorf("%s = %s, want %s", key, got, want)
		}
	}
	if got := len(run.w.received()); got != 46 {
		t.Errorf("client got %d bytes", got)
	}
}

// TestRealTimersLeaveNothingBehind runs streams on the real clock, with
// every timer path taken (heartbeat, lifetime close, client gone), and
// checks that no goroutine or timer callback outlives them.
func TestRealTimersLeaveNothingBehind(t *testing.T) {
	defer verifyNoNewGoroutines(t)()
	zero := 0.0
	h := &Handler{Heartbeat: caddy.Duration(time.Millisecond), MaxLifetime: caddy.Duration(50 * time.Millisecond),
		LifetimeJitter: &zero, CloseEvent: "bye", CloseGrace: caddy.Duration(time.Minute)}
	ctx, cancel := caddy.NewContext(caddy.Context{Context: context.Background()})
	defer cancel()
	if err := h.Provision(ctx); err != nil {
		t.Fatal(err)
	}
	h.logger = zap.NewNop()

	// Ends by max_lifetime after heartbeats; the client hangs up during
	// the close grace.
	run := startStream(t, h, nil, newScriptedUpstream())
	run.waitUpstreamGone()
	run.cancel()
	run.wait()
	if !strings.HasPrefix(run.w.received(), ":\n\n") {
		t.Fatalf("no heartbeat on the real clock: %q", run.w.received())
	}

	// Ends by the client going away mid-stream.
	run = startStream(t, h, nil, newScriptedUpstream())
	mustSend(t, run, "data: a\n\n")
	run.cancel()
	run.waitUpstreamGone()
	run.wait()
}

// TestNextGetsItsContextInPlace checks the contract of the context the next
// handler runs under: it is the request's own (its values), ended by the
// gateway without ending the client's, carried by the same request rather
// than a copy, and the handlers before the gateway get the request back
// with the context it came with.
func TestNextGetsItsContextInPlace(t *testing.T) {
	type key struct{}
	h := &Handler{IdleTimeout: seconds(2)}
	clock, logs := provisionTest(t, h)
	req := httptest.NewRequest(http.MethodGet, "/", nil)
	req.Header.Set("Accept", "text/event-stream")
	clientCtx := context.WithValue(req.Context(), key{}, "value")
	req = req.WithContext(clientCtx)
	var nextReq *http.Request
	var nextCtx context.Context
	next := handlerFunc(func(w http.ResponseWriter, r *http.Request) error {
		nextReq, nextCtx = r, r.Context()
		w.Header().Set("Content-Type", "text/event-stream")
		w.WriteHeader(http.StatusOK)
		clock.Advance(2 * time.Second) // the gateway ends it: idle_timeout
		select {
		case <-r.Context().Done():
		case <-time.After(5 * time.Second):
			t.Error("the gateway's close did not end the next handler's context")
		}
		return nil
	})
	if err := h.ServeHTTP(httptest.NewRecorder(), req, next); err != nil {
		t.Fatal(err)
	}
	wantReason(t, logs, reasonIdleTimeout)
	if nextReq != req {
		t.Error("the next handler got a copy of the request")
	}
	if nextCtx == clientCtx || nextCtx.Value(key{}) != "value" {
		t.Error("the next handler's context is not one the gateway can end, or lost the request's values")
	}
	if req.Context() != clientCtx || clientCtx.Err() != nil {
		t.Error("the request did not get its own context back, untouched")
	}
}
