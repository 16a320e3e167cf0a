package caddysse

import (
	"context"
	"net/http"
	"net/http/httptest"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"
)

// testWait bounds every wait on an event in the unit tests. Nothing waits
// this long unless the code under test is broken.
const testWait = 5 * time.Second

// provisionTest provisions h with a fake clock and a log observer.
func provisionTest(t testing.TB, h *Handler) (*fakeClock, *observer.ObservedLogs) {
	t.Helper()
	clock := newFakeClock()
	h.clock = clock
	provision(t, h)
	core, logs := observer.New(zapcore.DebugLevel)
	h.logger = zap.New(core)
	return clock, logs
}

// provision provisions and validates h, with its clock (the real one if
// none is set).
func provision(t testing.TB, h *Handler) {
	t.Helper()
	ctx, cancel := caddy.NewContext(caddy.Context{Context: context.Background()})
	t.Cleanup(cancel)
	if err := h.Provision(ctx); err != nil {
		t.Fatalf("Provision: %v", err)
	}
	if err := h.Validate(); err != nil {
		t.Fatalf("Validate: %v", err)
	}
}

// scriptedUpstream stands in for reverse_proxy: it answers with the given
// header, then writes each chunk the test sends, and reacts to a cancelled
// request context the way reverse_proxy does, by panicking with
// http.ErrAbortHandler.
type scriptedUpstream struct {
	contentType string
	status      int
	header      http.Header // extra response headers

	chunks  chan []byte
	acks    chan error
	started chan struct{}
	gone    chan struct{} // closed when the upstream saw its request context end
	request chan *http.Request
}

func newScriptedUpstream() *scriptedUpstream {
	return &scriptedUpstream{
		contentType: "text/event-stream",
		status:      http.StatusOK,
		chunks:      make(chan []byte),
		acks:        make(chan error),
		started:     make(chan struct{}),
		gone:        make(chan struct{}),
		request:     make(chan *http.Request, 1),
	}
}

func (u *scriptedUpstream) ServeHTTP(w http.ResponseWriter, r *http.Request) error {
	u.request <- r
	for k, v := range u.header {
		w.Header()[k] = v
	}
	if u.contentType != "" {
		w.Header().Set("Content-Type", u.contentType)
	}
	w.WriteHeader(u.status)
	close(u.started)
	for {
		select {
		case chunk, ok := <-u.chunks:
			if !ok {
				return nil
			}
			_, err := w.Write(chunk)
			u.acks <- err
			if err != nil {
				close(u.gone)
				panic(http.ErrAbortHandler)
			}
		case <-r.Context().Done():
			close(u.gone)
			panic(http.ErrAbortHandler)
		}
	}
}

// streamRun is one request through the handler to a scripted upstream.
type streamRun struct {
	t        testing.TB
	h        *Handler
	clock    *fakeClock
	w        *memWriter
	upstream *scriptedUpstream
	cancel   context.CancelFunc // the client going away
	done     chan struct{}      // closed when ServeHTTP has returned or panicked
	err      error
	panicked any
}

func startStream(t testing.TB, h *Handler, clock *fakeClock, upstream *scriptedUpstream) *streamRun {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	run := &streamRun{t: t, h: h, clock: clock, w: newMemWriter(), upstream: upstream, cancel: cancel, done: make(chan struct{})}
	req := httptest.NewRequest(http.MethodGet, "/events", nil).WithContext(ctx)
	req.Header.Set("Accept", "text/event-stream")
	req.Header.Set("Accept-Encoding", "gzip, br")
	go func() {
		defer close(run.done)
		defer func() { run.panicked = recover() }()
		run.err = h.ServeHTTP(run.w, req, upstream)
	}()
	select {
	case <-upstream.started:
	case <-run.done:
	case <-time.After(testWait):
		t.Fatal("upstream never started")
	}
	return run
}

// send has the upstream write p and returns the error its write got. It
// returns errStreamClosed without writing if the stream already ended.
func (r *streamRun) send(p []byte) error {
	r.t.Helper()
	select {
	case r.upstream.chunks <- p:
	case <-r.upstream.gone:
		return errStreamClosed
	case <-r.done:
		return errStreamClosed
	case <-time.After(testWait):
		r.t.Fatal("upstream write was not taken")
	}
	select {
	case err := <-r.upstream.acks:
		return err
	case <-time.After(testWait):
		r.t.Fatal("upstream write did not return")
	}
	return nil
}

// endUpstream ends the upstream's response normally.
func (r *streamRun) endUpstream() {
	select {
	case <-r.upstream.gone:
	default:
		close(r.upstream.chunks)
	}
}

// wait waits for ServeHTTP to return and gives its result.
func (r *streamRun) wait() error {
	r.t.Helper()
	select {
	case <-r.done:
		return r.err
	case <-time.After(testWait):
		r.t.Fatal("ServeHTTP did not return")
	}
	return nil
}

// waitUpstreamGone waits until the upstream has seen its request end.
func (r *streamRun) waitUpstreamGone() {
	r.t.Helper()
	select {
	case <-r.upstream.gone:
	case <-time.After(testWait):
		r.t.Fatal("upstream request was not cancelled")
	}
}
