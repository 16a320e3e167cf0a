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
)

// discardWriter is a client that takes everything at once, with the
// flushing and deadline methods a real connection's writer has, so the
// benchmarks measure the gateway's own work per write.
type discardWriter struct{ header http.Header }

func (d *discardWriter) Header() http.Header              { return d.header }
func (d *discardWriter) WriteHeader(int)                  {}
func (d *discardWriter) Write(p []byte) (int, error)      { return len(p), nil }
func (d *discardWriter) FlushError() error                { return nil }
func (d *discardWriter) SetWriteDeadline(time.Time) error { return nil }

// engagedStream returns a stream writer that has taken over an event stream.
func engagedStream(b *testing.B, h *Handler) *stream {
	b.Helper()
	if h.clock == nil {
		h.clock = realClock{}
	}
	ctx, cancel := caddy.NewContext(caddy.Context{Context: context.Background()})
	b.Cleanup(cancel)
	if err := h.Provision(ctx); err != nil {
		b.Fatal(err)
	}
	sw := newStream(h, &discardWriter{header: http.Header{}}, httptest.NewRequest(http.MethodGet, "/", nil))
	sw.arrive(func(error) {})
	sw.Header().Set("Content-Type", "text/event-stream")
	sw.WriteHeader(http.StatusOK)
	if sw.mode != events {
		b.Fatal("stream not engaged")
	}
	b.Cleanup(func() { sw.finish(false) })
	return sw
}

// BenchmarkWriteEvent measures forwarding one upstream event through the
// writer: boundary tracking, deadline, write and flush. Steady state must
// not allocate.
func BenchmarkWriteEvent(b *testing.B) {
	for _, size := range []int{100, 1 << 10, 64 << 10} {
		b.Run(fmt.Sprintf("%dB", size), func(b *testing.B) {
			sw := engagedStream(b, &Handler{IdleTimeout: caddy.Duration(time.Hour)})
			event := []byte("id: 12345\nevent: tick\ndata: " + strings.Repeat("x", size-30) + "\n\n")
			b.SetBytes(int64(len(event)))
			b.ReportAllocs()
			for b.Loop() {
				if _, err := sw.Write(event); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

// BenchmarkHeartbeat measures one heartbeat: the timer callback finding the
// stream quiet, writing the comment and re-arming.
func BenchmarkHeartbeat(b *testing.B) {
	clock := newFakeClock()
	sw := engagedStream(b, &Handler{Heartbeat: caddy.Duration(time.Second), clock: clock})
	b.ReportAllocs()
	for b.Loop() {
		clock.Advance(time.Second)
	}
	if sw.heartbeats == 0 {
		b.Fatal("no heartbeat written")
	}
}

// BenchmarkStreamSetup measures what a stream costs the gateway beyond the
// proxy: its writer, parser state and timer, from header to end. Its B/op is
// the gateway's memory per stream.
func BenchmarkStreamSetup(b *testing.B) {
	h := &Handler{Heartbeat: caddy.Duration(15 * time.Second), IdleTimeout: caddy.Duration(time.Minute)}
	ctx, cancel := caddy.NewContext(caddy.Context{Context: context.Background()})
	defer cancel()
	h.clock = realClock{}
	if err := h.Provision(ctx); err != nil {
		b.Fatal(err)
	}
	req := httptest.NewRequest(http.MethodGet, "/", nil)
	dw := &discardWriter{header: http.Header{}}
	b.ReportAllocs()
	for b.Loop() {
		sw := newStream(h, dw, req)
		sw.arrive(func(error) {})
		dw.header.Set("Content-Type", "text/event-stream")
		sw.WriteHeader(http.StatusOK)
		sw.finish(false)
	}
}
