package caddysse

import (
	"errors"
	"net/http"
	"net/http/httptest"
	"regexp"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"github.com/prometheus/client_golang/prometheus/testutil"
)

// refusalBody matches the browser-safe refusal: a retry hint, the close
// event with the reason, and the blank line that dispatches them.
var refusalBody = regexp.MustCompile(`^retry: (\d+)\nevent: close\ndata: ([a-z_0-9]+)\n\n$`)

// wantRefusalStream checks a browser-safe refusal and returns its retry
// hint.
func wantRefusalStream(t *testing.T, w *httptest.ResponseRecorder, err error, reason endReason) time.Duration {
	t.Helper()
	if err != nil {
		t.Fatalf("refusal returned %v, want a stream", err)
	}
	if w.Code != http.StatusOK || w.Header().Get("Content-Type") != "text/event-stream" {
		t.Fatalf("refusal answered %d %q, want 200 text/event-stream", w.Code, w.Header().Get("Content-Type"))
	}
	m := refusalBody.FindStringSubmatch(w.Body.String())
	if m == nil || m[2] != string(reason) {
		t.Fatalf("refusal body %q, want retry and close event %q", w.Body.String(), reason)
	}
	ms, _ := strconv.Atoi(m[1])
	retry := time.Duration(ms) * time.Millisecond
	if got, want := w.Header().Get("Retry-After"), strconv.Itoa(int((retry+time.Second-1)/time.Second)); got != want {
		t.Fatalf("Retry-After %q with retry %v, want %q", got, retry, want)
	}
	return retry
}

func wantStatus(t *testing.T, err error, status int) {
	t.Helper()
	var he caddyhttp.HandlerError
	if !errors.As(err, &he) || he.StatusCode != status {
		t.Fatalf("got %v, want a %d handler error", err, status)
	}
}

// notContacted is an upstream that must not be reached.
func notContacted(t *testing.T) handlerFunc {
	return func(http.ResponseWriter, *http.Request) error {
		t.Error("a refused request reached the upstream")
		return nil
	}
}

func TestLimitsRefuseStreamsBrowserSafe(t *testing.T) {
	h := &Handler{MaxStreams: 3, MaxStreamsPerClient: 2, Retry: seconds(2.5), CloseEvent: "close"}
	provisionTest(t, h)
	before := testutil.ToFloat64(sseMetrics.refused.WithLabelValues(string(reasonMaxStreamsPerClient)))

	var releases []chan struct{}
	hold := func(ip string) {
		_, rel := heldStream(t, h, streamRequest(ip))
		releases = append(releases, rel)
	}
	defer func() {
		for _, rel := range releases {
			close(rel)
		}
	}()
	hold("10.0.0.1")
	hold("10.0.0.1")
	// Refusals are spread between 1× and 2× retry.
	seen := map[time.Duration]bool{}
	for range 20 {
		w := httptest.NewRecorder()
		retry := wantRefusalStream(t, w, h.ServeHTTP(w, streamRequest("10.0.0.1"), notContacted(t)), reasonMaxStreamsPerClient)
		if retry < 2500*time.Millisecond || retry > 5000*time.Millisecond {
			t.Fatalf("retry hint %v outside [2.5s, 5s]", retry)
		}
		seen[retry] = true
	}
	if len(seen) < 10 {
		t.Fatalf("20 refusals drew only %d distinct retry hints: not jittered", len(seen))
	}
	hold("10.0.0.2")
	w := httptest.NewRecorder()
	wantRefusalStream(t, w, h.ServeHTTP(w, streamRequest("10.0.0.3"), notContacted(t)), reasonMaxStreams)

	if got := testutil.ToFloat64(sseMetrics.refused.WithLabelValues(string(reasonMaxStreamsPerClient))) - before; got != 20 {
		t.Errorf("per-client refusals counted %v, want 20", got)
	}
}

func TestLimitsRefuseWithStatus(t *testing.T) {
	h := &Handler{MaxStreams: 2, MaxStreamsPerClient: 1, RefuseWith: refuseWithStatus}
	provisionTest(t, h)
	_, rel1 := heldStream(t, h, streamRequest("10.0.0.1"))
	defer close(rel1)
	w := httptest.NewRecorder()
	wantStatus(t, h.ServeHTTP(w, streamRequest("10.0.0.1"), notContacted(t)), http.StatusTooManyRequests)
	if ra, _ := strconv.Atoi(w.Header().Get("Retry-After")); ra < 10 || ra > 20 {
		t.Fatalf("Retry-After %q, want 10 to 20 (retry is off)", w.Header().Get("Retry-After"))
	}
	_, rel2 := heldStream(t, h, streamRequest("10.0.0.2"))
	defer close(rel2)
	wantStatus(t, h.ServeHTTP(httptest.NewRecorder(), streamRequest("10.0.0.3"), notContacted(t)), http.StatusServiceUnavailable)
}

// TestLimitsCountStreamsThatDidNotAsk checks that a stream counts whatever
// the request's Accept said: one that turns out to be a stream over the
// limit is refused at its header and its upstream released.
func TestLimitsCountStreamsThatDidNotAsk(t *testing.T) {
	h := &Handler{MaxStreams: 1}
	provisionTest(t, h)
	plain := func(accept string) *http.Request {
		r := streamRequest("10.0.0.1")
		r.Header.Del("Accept")
		if accept != "" {
			r.Header.Set("Accept", accept)
		}
		return r
	}
	// Held without asking: it counts.
	_, release := heldStream(t, h, plain(""))
	defer close(release)
	w := httptest.NewRecorder()
	wantRefusalStream(t, w, func() error {
		h.CloseEvent = "close"
		defer func() { h.CloseEvent = "" }()
		return h.ServeHTTP(w, streamRequest("10.0.0.2"), notContacted(t))
	}(), reasonMaxStreams)

	for _, accept := range []string{"", "*/*"} {
		released := make(chan struct{})
		next := handlerFunc(func(w http.ResponseWriter, r *http.Request) error {
			w.Header().Set("Content-Type", "text/event-stream")
			w.WriteHeader(http.StatusOK)
			_, err := w.Write([]byte("data: must not reach the client\n\n"))
			if err == nil {
				t.Error("a stream over the limit took the upstream's bytes")
			}
			select {
			case <-r.Context().Done():
				close(released)
			case <-time.After(testWait):
				t.Error("upstream of a refused stream not released")
			}
			return nil
		})
		w := httptest.NewRecorder()
		wantStatus(t, h.ServeHTTP(w, plain(accept), next), http.StatusServiceUnavailable)
		waitFor(t, released, "the refused stream's upstream to be released")
		if w.Body.Len() != 0 || w.Header().Get("Content-Type") != "" {
			t.Fatalf("Accept %q: the refused stream leaked %q, Content-Type %q", accept, w.Body.String(), w.Header().Get("Content-Type"))
		}
	}
}

// hangingUpstream never sends a header; when its request is cancelled it
// does what reverse_proxy does: write 499 and return.
func hangingUpstream(cancelled chan<- struct{}) handlerFunc {
	return func(w http.ResponseWriter, r *http.Request) error {
		<-r.Context().Done()
		close(cancelled)
		w.WriteHeader(499)
		return nil
	}
}

// waitingRun starts a request whose upstream hangs before its header.
func waitingRun(t *testing.T, h *Handler, r *http.Request) (result chan error, w *httptest.ResponseRecorder, cancelled chan struct{}) {
	result, cancelled = make(chan error, 1), make(chan struct{})
	w = httptest.NewRecorder()
	go func() { result <- h.ServeHTTP(w, r, hangingUpstream(cancelled)) }()
	return result, w, cancelled
}

// eventually waits, up to testWait, for cond to hold.
func eventually(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(testWait)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(time.Millisecond)
	}
}

func waitFor[T any](t *testing.T, c <-chan T, what string) T {
	t.Helper()
	select {
	case v := <-c:
		return v
	case <-time.After(testWait):
		t.Fatalf("timed out waiting for %s", what)
	}
	var zero T
	return zero
}

func TestHeaderWaitCountsAgainstIdleTimeout(t *testing.T) {
	h := &Handler{IdleTimeout: seconds(5), Retry: seconds(1), CloseEvent: "close"}
	clock, _ := provisionTest(t, h)

	stream, streamW, streamCancelled := waitingRun(t, h, streamRequest("10.0.0.1"))
	plainReq := httptest.NewRequest(http.MethodGet, "/data", nil)
	plain, _, plainCancelled := waitingRun(t, h, plainReq)
	eventually(t, "both requests' header timers armed", func() bool { return clock.pending() == 2 })
	clock.Advance(4999 * time.Millisecond)
	select {
	case <-streamCancelled:
		t.Fatal("upstream cancelled before idle_timeout")
	default:
	}
	clock.Advance(time.Millisecond)
	waitFor(t, streamCancelled, "the stream's upstream to be cancelled")
	waitFor(t, plainCancelled, "the plain request's upstream to be cancelled")
	retry := wantRefusalStream(t, streamW, waitFor(t, stream, "the stream request to end"), reasonUpstreamTimeout)
	if retry < time.Second || retry > 2*time.Second {
		t.Fatalf("retry %v outside [1s, 2s]", retry)
	}
	wantStatus(t, waitFor(t, plain, "the plain request to end"), http.StatusGatewayTimeout)
}

func TestDrainRefusesHeaderWaits(t *testing.T) {
	h := &Handler{DrainWindow: seconds(4), CloseEvent: "close"}
	clock, _ := provisionTest(t, h)
	stream, streamW, cancelled := waitingRun(t, h, streamRequest("10.0.0.1"))
	eventually(t, "the request registered", func() bool {
		h.streams.mu.Lock()
		defer h.streams.mu.Unlock()
		return len(h.streams.open) == 1
	})
	h.drain()
	clock.Advance(4 * time.Second)
	waitFor(t, cancelled, "the upstream to be cancelled by the drain")
	wantRefusalStream(t, streamW, waitFor(t, stream, "the request to end"), reasonDrain)
}

// stallingWriter is a client that stopped reading: a write blocks until the
// server's write deadline passes, as a real connection's does.
type stallingWriter struct {
	header   http.Header
	mu       sync.Mutex
	deadline chan struct{} // closed when a deadline in the past is set
	once     sync.Once
	blocked  chan struct{} // closed once a write is blocked
	bOnce    sync.Once
}

func (s *stallingWriter) Header() http.Header { return s.header }
func (s *stallingWriter) WriteHeader(int)     {}
func (s *stallingWriter) FlushError() error   { return nil }
func (s *stallingWriter) Write(p []byte) (int, error) {
	if len(p) < 100 {
		return len(p), nil // small writes fit in the socket's buffer
	}
	s.bOnce.Do(func() { close(s.blocked) })
	<-s.deadline
	return 0, errCut
}
func (s *stallingWriter) SetWriteDeadline(t time.Time) error {
	if !t.IsZero() && t.Before(time.Now()) {
		s.once.Do(func() { close(s.deadline) })
	}
	return nil
}

// TestDrainCutsStalledClients checks the drain's hard stop: a stream whose
// write to a client that stopped reading is stuck is cut shortly after the
// window, so a reload or stop is not held up by write_timeout.
func TestDrainCutsStalledClients(t *testing.T) {
	// Real time: the stuck write holds the stream, and the drain's callback
	// waits for it in its own goroutine, as it does in production.
	const window = 200 * time.Millisecond
	h := &Handler{DrainWindow: caddy.Duration(window), WriteTimeout: seconds(3600), Heartbeat: -1, clock: realClock{}}
	provision(t, h)
	client := &stallingWriter{header: http.Header{}, deadline: make(chan struct{}), blocked: make(chan struct{})}
	up := newScriptedUpstream()
	done := make(chan any, 1)
	go func() {
		defer func() { done <- recover() }()
		h.ServeHTTP(client, streamRequest("10.0.0.1"), up)
	}()
	waitFor(t, up.started, "the stream to start")
	go func() {
		up.chunks <- make([]byte, 4096)
		<-up.acks
	}()
	waitFor(t, client.blocked, "the write to block")
	start := time.Now()
	h.drain()
	if p := waitFor(t, done, "the stream to be cut"); p != nil {
		t.Fatalf("a cut stream panicked: %v", p)
	}
	// Cut at the hard stop, not before (the drain itself cannot reach a
	// stream whose write is stuck) and not much after.
	if took := time.Since(start); took < window+cutAfter || took > window+cutAfter+300*time.Millisecond {
		t.Fatalf("cut %v after the drain began, want %v to %v", took, window+cutAfter, window+cutAfter+300*time.Millisecond)
	}
}

// answering is an upstream that answers status, with a body.
func answering(status int, contentType string, released chan<- struct{}) handlerFunc {
	return func(w http.ResponseWriter, r *http.Request) error {
		w.Header().Set("Content-Type", contentType)
		w.WriteHeader(status)
		if _, err := w.Write([]byte("<html>upstream error page</html>")); err != nil {
			// The gateway cut it: wait to be released, as reverse_proxy's
			// read of the upstream does.
			select {
			case <-r.Context().Done():
				close(released)
			case <-time.After(testWait):
			}
		}
		return nil
	}
}

// TestUpstreamErrorsBecomeRetries checks that an upstream's (or the
// proxy's) error status does not make an EventSource fail for good: a
// request that asked for a stream gets the browser-safe refusal instead,
// with the status in its reason, unless the status is one that must pass.
func TestUpstreamErrorsBecomeRetries(t *testing.T) {
	h := &Handler{CloseEvent: "close"}
	provisionTest(t, h)
	for _, status := range []int{502, 503, 500, 429} {
		released := make(chan struct{})
		w := httptest.NewRecorder()
		err := h.ServeHTTP(w, streamRequest("10.0.0.1"), answering(status, "text/html", released))
		wantRefusalStream(t, w, err, upstreamStatus(status))
		waitFor(t, released, "the upstream of a refused answer to be released")
	}
	// reverse_proxy's own 502, before any header: the upstream is down.
	w := httptest.NewRecorder()
	down := handlerFunc(func(http.ResponseWriter, *http.Request) error {
		return caddyhttp.Error(http.StatusBadGateway, errors.New("dial tcp: connection refused"))
	})
	wantRefusalStream(t, w, h.ServeHTTP(w, streamRequest("10.0.0.1"), down), upstreamStatus(http.StatusBadGateway))

	// 204 tells an EventSource to stop; 404 is the page's own business;
	// and a request that did not ask for a stream gets the status as is.
	for _, tc := range []struct {
		status int
		req    *http.Request
	}{
		{http.StatusNoContent, streamRequest("10.0.0.1")},
		{http.StatusNotFound, streamRequest("10.0.0.1")},
		{http.StatusBadGateway, httptest.NewRequest(http.MethodGet, "/events", nil)},
	} {
		w := httptest.NewRecorder()
		if err := h.ServeHTTP(w, tc.req, answering(tc.status, "text/html", make(chan struct{}))); err != nil || w.Code != tc.status {
			t.Fatalf("%d passed through as %d, %v", tc.status, w.Code, err)
		}
	}
	if err := h.ServeHTTP(httptest.NewRecorder(), httptest.NewRequest(http.MethodGet, "/events", nil), down); errorStatus(err) != http.StatusBadGateway {
		t.Fatalf("proxy error for a plain request: %v", err)
	}

	// retry_statuses off keeps the old behaviour.
	off := &Handler{RetryStatuses: []string{"off"}}
	provisionTest(t, off)
	w = httptest.NewRecorder()
	if err := off.ServeHTTP(w, streamRequest("10.0.0.1"), answering(503, "text/html", make(chan struct{}))); err != nil || w.Code != 503 {
		t.Fatalf("retry_statuses off: %d, %v", w.Code, err)
	}
}

// TestHeadReleasesTheUpstream checks that a HEAD never leaves an upstream
// response running: it goes upstream as GET, whose response is cut after
// its header, and the client gets that header.
func TestHeadReleasesTheUpstream(t *testing.T) {
	h := &Handler{}
	provisionTest(t, h)
	released := make(chan struct{})
	next := handlerFunc(func(w http.ResponseWriter, r *http.Request) error {
		if r.Method != http.MethodGet {
			t.Errorf("upstream got %s, want GET", r.Method)
		}
		w.Header().Set("Content-Type", "text/event-stream")
		w.Header().Set("X-Legacy", "yes")
		w.WriteHeader(http.StatusOK)
		if _, err := w.Write([]byte("data: one\n\n")); err == nil {
			t.Error("the upstream's body of a HEAD was taken")
		}
		select {
		case <-r.Context().Done():
			close(released)
		case <-time.After(testWait):
		}
		return nil
	})
	w := httptest.NewRecorder()
	r := streamRequest("10.0.0.1")
	r.Method = http.MethodHead
	if err := h.ServeHTTP(w, r, next); err != nil {
		t.Fatal(err)
	}
	waitFor(t, released, "the upstream GET to be cut")
	if w.Code != http.StatusOK || w.Header().Get("X-Legacy") != "yes" || w.Body.Len() != 0 {
		t.Fatalf("HEAD answered %d %v %q", w.Code, w.Header(), w.Body.String())
	}
}

// TestHeadCountsAgainstLimits checks that a HEAD counts like the GET it
// becomes: one that asks for a stream is refused over the limit before the
// upstream is contacted, and holds a slot while it lasts; one whose GET
// turns out to be a stream is refused at its header.
func TestHeadCountsAgainstLimits(t *testing.T) {
	h := &Handler{MaxStreams: 1, CloseEvent: "close"}
	provisionTest(t, h)
	head := func(ip string, asks bool) *http.Request {
		r := streamRequest(ip)
		r.Method = http.MethodHead
		if !asks {
			r.Header.Del("Accept")
		}
		return r
	}
	result, release := heldStream(t, h, streamRequest("10.0.0.1"))

	w := httptest.NewRecorder()
	wantRefusalStream(t, w, h.ServeHTTP(w, head("10.0.0.2", true), notContacted(t)), reasonMaxStreams)

	released := make(chan struct{})
	w = httptest.NewRecorder()
	wantStatus(t, h.ServeHTTP(w, head("10.0.0.2", false), answering(http.StatusOK, "text/event-stream", released)),
		http.StatusServiceUnavailable)
	waitFor(t, released, "the refused HEAD's upstream GET to be released")

	close(release)
	waitFor(t, result, "the held stream to end")

	// Under the limit, a HEAD that asks for a stream holds the slot until
	// it is answered.
	started, answer := make(chan struct{}), make(chan struct{})
	next := handlerFunc(func(w http.ResponseWriter, r *http.Request) error {
		close(started)
		select {
		case <-answer:
		case <-time.After(testWait):
			t.Error("the test never let the HEAD's upstream answer")
		}
		w.Header().Set("Content-Type", "text/event-stream")
		w.WriteHeader(http.StatusOK)
		return nil
	})
	done := make(chan error, 1)
	hw := httptest.NewRecorder()
	go func() { done <- h.ServeHTTP(hw, head("10.0.0.3", true), next) }()
	waitFor(t, started, "the HEAD's upstream GET")
	w = httptest.NewRecorder()
	wantRefusalStream(t, w, h.ServeHTTP(w, streamRequest("10.0.0.4"), notContacted(t)), reasonMaxStreams)
	close(answer)
	if err := waitFor(t, done, "the HEAD's answer"); err != nil || hw.Code != http.StatusOK {
		t.Fatalf("HEAD under the limit: %d, %v", hw.Code, err)
	}
	// Answered, it gave the slot back.
	result, release = heldStream(t, h, streamRequest("10.0.0.4"))
	close(release)
	waitFor(t, result, "the last stream to end")
}

func TestMaxStreamRate(t *testing.T) {
	h := &Handler{MaxStreamRate: 2, CloseEvent: "close"}
	clock, _ := provisionTest(t, h)
	var releases []chan struct{}
	defer func() {
		for _, rel := range releases {
			close(rel)
		}
	}()
	admit := func() {
		_, rel := heldStream(t, h, streamRequest("10.0.0.1"))
		releases = append(releases, rel)
	}
	admit()
	admit()
	w := httptest.NewRecorder()
	wantRefusalStream(t, w, h.ServeHTTP(w, streamRequest("10.0.0.1"), notContacted(t)), reasonMaxStreamRate)
	clock.Advance(500 * time.Millisecond)
	admit()
	w = httptest.NewRecorder()
	wantRefusalStream(t, w, h.ServeHTTP(w, streamRequest("10.0.0.1"), notContacted(t)), reasonMaxStreamRate)
}
