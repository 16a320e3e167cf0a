package caddysse

import (
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/ssegateway/caddy-sse/internal/ssespec"
)

// TestRetryClamp checks retry_bounds' rewriting of retry lines, for every
// way the upstream's bytes may be split into writes.
func TestRetryClamp(t *testing.T) {
	for _, tc := range []struct{ in, want string }{
		{"retry: 0\n", "retry: 1000\n"},
		{"retry:5\n\n", "retry: 1000\n\n"},
		{"retry: 5000\ndata: a\n\n", "retry: 5000\ndata: a\n\n"},
		{"retry: 86400000\n", "retry: 60000\n"},
		{"retry: 99999999999999999999999\n", "retry: 60000\n"},
		{"retry: 0\r\ndata: x\r\n\r\n", "retry: 1000\r\ndata: x\r\n\r\n"},
		{"retry: 0\rdata: x\r\r", "retry: 1000\rdata: x\r\r"},
		// Not a valid retry field: the client ignores it, and so does the
		// gateway.
		{"retry: 12a\n", "retry: 12a\n"},
		{"retry:  5\n", "retry:  5\n"},
		{"retry\n", "retry\n"},
		{"retry:\n", "retry:\n"},
		{"retryx: 0\n", "retryx: 0\n"},
		{"data: retry: 0\n", "data: retry: 0\n"},
		{":retry: 0\n", ":retry: 0\n"},
		{"id: 1\nretry: 0\ndata: b\n\n", "id: 1\nretry: 1000\ndata: b\n\n"},
		// Unterminated: given back as it came when the stream ends.
		{"retry: 0", "retry: 0"},
	} {
		for split := 0; split <= len(tc.in); split++ {
			c := newRetryClamp(time.Second, time.Minute)
			out := c.rewriteTo(nil, []byte(tc.in[:split]))
			out = c.rewriteTo(out, []byte(tc.in[split:]))
			out = append(out, c.flush()...)
			if string(out) != tc.want {
				t.Fatalf("%q split at %d: got %q, want %q", tc.in, split, out, tc.want)
			}
		}
	}
}

// TestRetryBoundsThroughTheHandler checks what a client reads: the clamped
// reconnection time, the events untouched, and heartbeats still only
// between events, while a retry line is held back.
func TestRetryBoundsThroughTheHandler(t *testing.T) {
	h := &Handler{Heartbeat: seconds(1), RetryBounds: []caddy.Duration{seconds(2), seconds(30)}}
	clock, _ := provisionTest(t, h)
	run := startStream(t, h, clock, newScriptedUpstream())
	mustSend(t, run, "retry: 1")
	clock.Advance(time.Second) // a heartbeat: nothing of the held line was sent
	mustSend(t, run, "0\ndata: a\n\n")
	mustSend(t, run, "retry: 3600000\n\n")
	run.endUpstream()
	run.wait()
	got := run.w.received()
	if want := ":\n\nretry: 2000\ndata: a\n\nretry: 30000\n\n"; got != want {
		t.Fatalf("client received %q, want %q", got, want)
	}
	if parsed := ssespec.Parse([]byte(got)); len(parsed.Retries) != 2 || parsed.Retries[0] != 2000 || parsed.Retries[1] != 30000 || len(parsed.Events) != 1 {
		t.Fatalf("client reads %+v", parsed)
	}
}
