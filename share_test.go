package caddysse

import (
	"context"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"os"
	"runtime"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/caddyserver/caddy/v2/caddytest"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"
)

// hubUpstream stands in for reverse_proxy in front of a legacy server, for
// shared streams: each request it gets is handed to the test, which writes
// to it, ends it or breaks it.
type hubUpstream struct {
	status      int
	contentType string
	body        string // for a response that is not a stream
	reqs        chan *hubReq
	hold        chan struct{} // when set, each request waits for it before its header
	count       atomic.Int64
}

type hubReq struct {
	r      *http.Request
	chunks chan []byte
	acks   chan error
	end    chan bool // true: break (abort), false: clean end
	gone   chan struct{}
}

func newHubUpstream() *hubUpstream {
	return &hubUpstream{status: http.StatusOK, contentType: "text/event-stream", reqs: make(chan *hubReq, 32)}
}

func (u *hubUpstream) ServeHTTP(w http.ResponseWriter, r *http.Request) error {
	u.count.Add(1)
	if u.hold != nil {
		select {
		case <-u.hold:
		case <-r.Context().Done():
			return r.Context().Err()
		}
	}
	hr := &hubReq{r: r, chunks: make(chan []byte), acks: make(chan error), end: make(chan bool, 1), gone: make(chan struct{})}
	defer close(hr.gone)
	w.Header().Set("Content-Type", u.contentType)
	w.WriteHeader(u.status)
	u.reqs <- hr
	if u.body != "" {
		_, err := w.Write([]byte(u.body))
		return err
	}
	for {
		select {
		case p := <-hr.chunks:
			_, err := w.Write(p)
			if err == nil {
				err = http.NewResponseController(w).Flush()
			}
			hr.acks <- err
			if err != nil {
				panic(http.ErrAbortHandler)
			}
		case abort := <-hr.end:
			if abort {
				panic(http.ErrAbortHandler)
			}
			return nil
		case <-r.Context().Done():
			panic(http.ErrAbortHandler)
		}
	}
}

// next waits for the upstream's next request.
func (u *hubUpstream) next(t *testing.T) *hubReq {
	t.Helper()
	select {
	case hr := <-u.reqs:
		return hr
	case <-time.After(testWait):
		t.Fatal("upstream got no request")
	}
	return nil
}

// none checks that the upstream got no further request.
func (u *hubUpstream) none(t *testing.T) {
	t.Helper()
	select {
	case hr := <-u.reqs:
		t.Fatalf("upstream got an unexpected request %s", hr.r.URL)
	default:
	}
}

func (hr *hubReq) send(t *testing.T, s string) {
	t.Helper()
	select {
	case hr.chunks <- []byte(s):
	case <-time.After(testWait):
		t.Fatal("upstream write not taken")
	}
	select {
	case err := <-hr.acks:
		if err != nil {
			t.Fatalf("upstream write: %v", err)
		}
	case <-time.After(testWait):
		t.Fatal("upstream write did not return")
	}
}

func (hr *hubReq) waitGone(t *testing.T) {
	t.Helper()
	select {
	case <-hr.gone:
	case <-time.After(testWait):
		t.Fatal("upstream request was not released")
	}
}

// client is one request through the handler.
type client struct {
	w      *memWriter
	cancel context.CancelFunc
	done   chan struct{}
	err    error
}

func startClient(t *testing.T, h *Handler, next *hubUpstream, path string, header ...string) *client {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	c := &client{w: newMemWriter(), cancel: cancel, done: make(chan struct{})}
	req := httptest.NewRequest(http.MethodGet, path, nil).WithContext(ctx)
	req.Header.Set("Accept", "text/event-stream")
	for i := 0; i+1 < len(header); i += 2 {
		req.Header.Set(header[i], header[i+1])
	}
	go func() {
		defer close(c.done)
		c.err = h.ServeHTTP(c.w, req, next)
	}()
	return c
}

// waitBody waits until the client has received want (a substring).
func (c *client) waitBody(t *testing.T, want string) string {
	t.Helper()
	deadline := time.Now().Add(testWait)
	for {
		got := c.w.received()
		if strings.Contains(got, want) {
			return got
		}
		if time.Now().After(deadline) {
			t.Fatalf("client did not receive %q; got %q", want, got)
		}
		time.Sleep(time.Millisecond)
	}
}

// waitDone waits for the request to end and returns the whole body,
// flushed or not.
func (c *client) waitDone(t *testing.T) string {
	t.Helper()
	select {
	case <-c.done:
	case <-time.After(testWait):
		t.Fatalf("request did not end; got %q", c.w.received())
	}
	c.w.mu.Lock()
	defer c.w.mu.Unlock()
	return c.w.body.String()
}

// waitSubscribers waits until the handler's hubs have n clients in all.
func waitSubscribers(t *testing.T, h *Handler, n int) {
	t.Helper()
	deadline := time.Now().Add(testWait)
	for {
		got := 0
		h.hubs.mu.Lock()
		for _, hb := range h.hubs.hubs {
			hb.mu.Lock()
			got += len(hb.subs)
			hb.mu.Unlock()
		}
		h.hubs.mu.Unlock()
		if got == n {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d subscribers, want %d", got, n)
		}
		time.Sleep(time.Millisecond)
	}
}

// onlyHub is the handler's one hub.
func onlyHub(t *testing.T, h *Handler) *hub {
	t.Helper()
	h.hubs.mu.Lock()
	defer h.hubs.mu.Unlock()
	if len(h.hubs.hubs) != 1 {
		t.Fatalf("%d hubs, want 1", len(h.hubs.hubs))
	}
	for _, hb := range h.hubs.hubs {
		return hb
	}
	return nil
}

func shareHandler(t *testing.T, conf *ShareConfig) (*Handler, *fakeClock) {
	t.Helper()
	h, clock, _ := shareHandlerLogs(t, conf)
	return h, clock
}

func shareHandlerLogs(t *testing.T, conf *ShareConfig) (*Handler, *fakeClock, *observer.ObservedLogs) {
	t.Helper()
	if conf.Linger == 0 {
		conf.Linger = -1 // most tests want the upstream released with the last client
	}
	h := &Handler{Heartbeat: seconds(15), Retry: seconds(3), CloseEvent: "bye", Share: conf}
	clock, logs := provisionTest(t, h)
	return h, clock, logs
}

func TestShareOneUpstreamWholeEvents(t *testing.T) {
	defer verifyNoNewGoroutines(t)()
	h, _ := shareHandler(t, &ShareConfig{})
	up := newHubUpstream()
	a := startClient(t, h, up, "/feed?x=1")
	hr := up.next(t)
	hr.send(t, "id: 1\ndata: one\n\n")
	a.waitBody(t, "data: one\n\n")

	b := startClient(t, h, up, "/feed?x=1")
	waitSubscribers(t, h, 2)
	// c joins while an event is in flight: it gets that event, whole.
	hr.send(t, "id: 2\ndata: tw")
	c := startClient(t, h, up, "/feed?x=1")
	waitSubscribers(t, h, 3)
	hr.send(t, "o\n\nid: 3\ndata: three\n\n")
	for _, cl := range []*client{a, b} {
		cl.waitBody(t, "data: three\n\n")
	}
	c.waitBody(t, "data: three\n\n")
	if got := a.w.received(); got != "id: 1\ndata: one\n\nid: 2\ndata: two\n\nid: 3\ndata: three\n\n" {
		t.Errorf("first client got %q", got)
	}
	if got := b.w.received(); got != "id: 2\ndata: two\n\nid: 3\ndata: three\n\n" {
		t.Errorf("second client got %q", got)
	}
	if got := c.w.received(); got != "id: 2\ndata: two\n\nid: 3\ndata: three\n\n" {
		t.Errorf("client joining inside an event got %q", got)
	}
	if ct := c.w.header.Get("Content-Type"); ct != "text/event-stream" {
		t.Errorf("Content-Type %q", ct)
	}
	up.none(t)
	// Another path is another stream.
	d := startClient(t, h, up, "/feed?x=2")
	up.next(t).send(t, "data: other\n\n")
	d.waitBody(t, "data: other\n\n")
	for _, cl := range []*client{a, b, c, d} {
		cl.cancel()
		cl.waitDone(t)
	}
	hr.waitGone(t)
}

func TestShareKeysNeverMixUsers(t *testing.T) {
	defer verifyNoNewGoroutines(t)()
	h, _ := shareHandler(t, &ShareConfig{})
	up := newHubUpstream()
	alice := startClient(t, h, up, "/me", "Authorization", "Bearer alice")
	ra := up.next(t)
	bob := startClient(t, h, up, "/me", "Authorization", "Bearer bob")
	rb := up.next(t)
	cookie := startClient(t, h, up, "/me", "Cookie", "session=carol")
	rc := up.next(t)
	// The same user, resuming, shares alice's stream: Last-Event-ID is not
	// part of the key.
	alice2 := startClient(t, h, up, "/me", "Authorization", "Bearer alice", "Last-Event-ID", "nope")
	waitSubscribers(t, h, 4)
	up.none(t)
	if got := ra.r.Header.Get("Authorization"); got != "Bearer alice" {
		t.Errorf("alice's upstream request has Authorization %q", got)
	}
	ra.send(t, "data: for alice\n\n")
	rb.send(t, "data: for bob\n\n")
	rc.send(t, "data: for carol\n\n")
	alice.waitBody(t, "for alice")
	alice2.waitBody(t, "for alice")
	bob.waitBody(t, "for bob")
	cookie.waitBody(t, "for carol")
	for _, cl := range []*client{alice, alice2, bob, cookie} {
		cl.cancel()
		body := cl.waitDone(t)
		if strings.Count(body, "data: ") != 1 {
			t.Errorf("a client got another user's events: %q", body)
		}
	}
}

func TestShareReplay(t *testing.T) {
	defer verifyNoNewGoroutines(t)()
	replay := 2
	h, _ := shareHandler(t, &ShareConfig{Replay: &replay})
	up := newHubUpstream()
	a := startClient(t, h, up, "/r")
	hr := up.next(t)
	for _, id := range []string{"1", "2", "3", "4"} {
		hr.send(t, "id: "+id+"\ndata: e"+id+"\n\n")
	}
	a.waitBody(t, "data: e4")

	// 3 is among the last two events: 4 is replayed, then live.
	b := startClient(t, h, up, "/r", "Last-Event-ID", "3")
	waitSubscribers(t, h, 2)
	b.waitBody(t, "data: e4\n\n")
	hr.send(t, "id: 5\ndata: e5\n\n")
	b.waitBody(t, "data: e5\n\n")
	if got := b.w.received(); got != "id: 4\ndata: e4\n\nid: 5\ndata: e5\n\n" {
		t.Errorf("replay got %q", got)
	}
	if got := b.w.header.Get(replayHeader); got != "" {
		t.Errorf("%s: %q on a hit", replayHeader, got)
	}
	// 2 is no longer kept: live from now on, and said so.
	c := startClient(t, h, up, "/r", "Last-Event-ID", "2")
	waitSubscribers(t, h, 3)
	hr.send(t, "id: 6\ndata: e6\n\n")
	if got := c.waitBody(t, "e6"); got != "id: 6\ndata: e6\n\n" {
		t.Errorf("miss got %q", got)
	}
	if got := c.w.header.Get(replayHeader); got != "miss" {
		t.Errorf("%s: %q, want miss", replayHeader, got)
	}
	for _, cl := range []*client{a, b, c} {
		cl.cancel()
		cl.waitDone(t)
	}
}

// advanceUntilRequest moves the fake clock until the upstream gets a
// request (the hub's backoff runs on the clock).
func advanceUntilRequest(t *testing.T, clock *fakeClock, up *hubUpstream) *hubReq {
	t.Helper()
	deadline := time.After(testWait)
	for {
		select {
		case hr := <-up.reqs:
			return hr
		case <-deadline:
			t.Fatal("hub did not ask the upstream again")
		case <-time.After(2 * time.Millisecond):
			clock.Advance(100 * time.Millisecond)
		}
	}
}

// TestShareEventOverMaxBacklogIsNotHeld checks that the hub does not hold
// an event in flight without bound: past max_backlog the upstream attempt
// ends, nobody gets the cut event, and the hub asks again.
func TestShareEventOverMaxBacklogIsNotHeld(t *testing.T) {
	defer verifyNoNewGoroutines(t)()
	h, clock := shareHandler(t, &ShareConfig{MaxBacklog: 64})
	up := newHubUpstream()
	a := startClient(t, h, up, "/big")
	hr := up.next(t)
	waitSubscribers(t, h, 1)
	hr.send(t, "id: 1\ndata: one\n\n")
	hr.send(t, "id: 2\ndata: "+strings.Repeat("x", 40))
	select {
	case hr.chunks <- []byte(strings.Repeat("x", 40)):
	case <-time.After(testWait):
		t.Fatal("upstream write not taken")
	}
	if err := <-hr.acks; err == nil {
		t.Fatal("the hub took an event in flight larger than max_backlog")
	}
	hr = advanceUntilRequest(t, clock, up)
	if got := hr.r.Header.Get("Last-Event-ID"); got != "1" {
		t.Errorf("reconnect Last-Event-ID %q, want 1", got)
	}
	hr.send(t, "id: 3\ndata: three\n\n")
	a.waitBody(t, "id: 1\ndata: one\n\nid: 3\ndata: three\n\n")
	a.cancel()
	a.waitDone(t)
	hr.waitGone(t)
}

func TestShareReconnectsWithoutGapOrDuplicate(t *testing.T) {
	defer verifyNoNewGoroutines(t)()
	h, clock := shareHandler(t, &ShareConfig{})
	up := newHubUpstream()
	a := startClient(t, h, up, "/s")
	b := startClient(t, h, up, "/s")
	hr := up.next(t)
	waitSubscribers(t, h, 2)
	hr.send(t, "id: 1\ndata: one\n\n")
	// Broken inside an event: the half event never reaches anyone.
	hr.send(t, "id: 2\ndata: half")
	hr.end <- true
	hr = advanceUntilRequest(t, clock, up)
	if got := hr.r.Header.Get("Last-Event-ID"); got != "1" {
		t.Errorf("reconnect Last-Event-ID %q, want 1", got)
	}
	// The upstream resends what it had after... and before: 1 is dropped.
	hr.send(t, "id: 1\ndata: one\n\nid: 2\ndata: two\n\n")
	// A clean end between events is asked again too.
	hr.end <- false
	hr = advanceUntilRequest(t, clock, up)
	if got := hr.r.Header.Get("Last-Event-ID"); got != "2" {
		t.Errorf("reconnect Last-Event-ID %q, want 2", got)
	}
	hr.send(t, "id: 3\ndata: three\n\n")
	want := "id: 1\ndata: one\n\nid: 2\ndata: two\n\nid: 3\ndata: three\n\n"
	for _, cl := range []*client{a, b} {
		if got := cl.waitBody(t, "three\n\n"); got != want {
			t.Errorf("client got %q, want %q", got, want)
		}
		cl.cancel()
		cl.waitDone(t)
	}
}

func TestShareUpstreamGivesUp(t *testing.T) {
	defer verifyNoNewGoroutines(t)()
	h, clock, logs := shareHandlerLogs(t, &ShareConfig{})
	up := newHubUpstream()
	a := startClient(t, h, up, "/g")
	b := startClient(t, h, up, "/g")
	hr := up.next(t)
	waitSubscribers(t, h, 2)
	hr.send(t, "data: x\n\n")
	a.waitBody(t, "data: x\n\n")
	for i := 0; i <= reconnectTries; i++ {
		hr.end <- true
		if i < reconnectTries {
			hr = advanceUntilRequest(t, clock, up)
		}
	}
	// The clients of a hub that gives up are closed all at once, so
	// their retry is drawn between 1x and 2x the option.
	got := a.waitDone(t)
	retry, _, _ := strings.Cut(strings.TrimPrefix(got[strings.LastIndex(got, "retry: "):], "retry: "), "\n")
	if ms, err := strconv.Atoi(retry); err != nil || ms < 3000 || ms > 6000 ||
		!strings.HasSuffix(got, "\nevent: bye\ndata: upstream_error\n\n") {
		t.Errorf("client got %q, want the close sequence with upstream_error and a retry within [3000, 6000]", got)
	}
	b.waitDone(t)
	// One warning for the shared stream, none per client.
	if n := logs.FilterLevelExact(zapcore.WarnLevel).Len(); n != 1 {
		t.Errorf("%d warnings, want 1 for the shared stream: %v", n, logs.FilterLevelExact(zapcore.WarnLevel).All())
	}
}

func TestShareAssignIDs(t *testing.T) {
	defer verifyNoNewGoroutines(t)()
	h, _ := shareHandler(t, &ShareConfig{AssignIDs: true})
	up := newHubUpstream()
	a := startClient(t, h, up, "/ids")
	hr := up.next(t)
	hr.send(t, "data: one\n\nid: own\ndata: two\n\ndata: three\n\n")
	got := a.waitBody(t, "three\n\n")
	p := onlyHub(t, h).idPrefix
	if want := "id: " + p + "0\ndata: one\n\nid: own\ndata: two\n\nid: " + p + "2\ndata: three\n\n"; got != want {
		t.Fatalf("got %q, want %q", got, want)
	}
	// Resume from a gateway id.
	b := startClient(t, h, up, "/ids", "Last-Event-ID", p+"0")
	if got := b.waitBody(t, "three\n\n"); got != "id: own\ndata: two\n\nid: "+p+"2\ndata: three\n\n" {
		t.Errorf("resume got %q", got)
	}
	for _, cl := range []*client{a, b} {
		cl.cancel()
		cl.waitDone(t)
	}
}

func TestShareNotAStreamPassesThrough(t *testing.T) {
	defer verifyNoNewGoroutines(t)()
	h, _ := shareHandler(t, &ShareConfig{})
	up := newHubUpstream()
	up.contentType, up.body = "application/json", `{"ok":true}`
	a := startClient(t, h, up, "/j")
	up.next(t)
	if got := a.waitDone(t); got != `{"ok":true}` {
		t.Errorf("got %q", got)
	}
	if ct := a.w.header.Get("Content-Type"); ct != "application/json" {
		t.Errorf("Content-Type %q", ct)
	}
	// The next request tries afresh.
	up.contentType, up.body = "text/event-stream", ""
	b := startClient(t, h, up, "/j")
	up.next(t).send(t, "data: now\n\n")
	b.waitBody(t, "data: now\n\n")
	b.cancel()
	b.waitDone(t)

	// A status in retry_statuses is refused as a stream, as without share.
	up.status = http.StatusBadGateway
	c := startClient(t, h, up, "/j")
	up.next(t)
	if got := c.waitDone(t); !strings.Contains(got, "data: upstream_status_502") {
		t.Errorf("got %q", got)
	}
}

func TestShareLingerThenRelease(t *testing.T) {
	defer verifyNoNewGoroutines(t)()
	h, clock := shareHandler(t, &ShareConfig{Linger: seconds(5)})
	up := newHubUpstream()
	a := startClient(t, h, up, "/l")
	hr := up.next(t)
	hr.send(t, "id: 1\ndata: one\n\n")
	a.waitBody(t, "one")
	a.cancel()
	a.waitDone(t)
	clock.Advance(4 * time.Second)
	// Back within linger: the same upstream.
	b := startClient(t, h, up, "/l", "Last-Event-ID", "1")
	waitSubscribers(t, h, 1)
	hr.send(t, "id: 2\ndata: two\n\n")
	b.waitBody(t, "two")
	up.none(t)
	b.cancel()
	b.waitDone(t)
	clock.Advance(4 * time.Second)
	select {
	case <-hr.gone:
		t.Fatal("upstream released before linger")
	default:
	}
	clock.Advance(2 * time.Second)
	hr.waitGone(t)
}

func TestShareDrainEndsEverything(t *testing.T) {
	defer verifyNoNewGoroutines(t)()
	h, clock := shareHandler(t, &ShareConfig{Linger: seconds(60)})
	up := newHubUpstream()
	a := startClient(t, h, up, "/d")
	b := startClient(t, h, up, "/d")
	hr := up.next(t)
	waitSubscribers(t, h, 2)
	hr.send(t, "data: x\n\n")
	a.waitBody(t, "data: x")
	b.waitBody(t, "data: x")
	// Unloaded with no configuration after it: the clients drain, and the
	// hub goes with them.
	if err := h.Cleanup(); err != nil {
		t.Fatal(err)
	}
	clock.Advance(time.Duration(h.DrainWindow) + time.Second)
	for _, cl := range []*client{a, b} {
		if got := cl.waitDone(t); !strings.HasSuffix(got, "data: drain\n\n") {
			t.Errorf("got %q", got)
		}
	}
	hr.waitGone(t)
}

func TestShareCaddyfile(t *testing.T) {
	for _, tc := range []struct {
		in, err string
		check   func(*ShareConfig) bool
	}{
		{in: "sse {\n share\n}", check: func(c *ShareConfig) bool { return c.Key == "" && c.Replay == nil }},
		{in: "sse {\n share {path} {\n replay 0\n linger 2s\n assign_ids\n max_backlog 64KiB\n }\n}", check: func(c *ShareConfig) bool {
			return c.Key == "{path}" && *c.Replay == 0 && c.Linger == seconds(2) && c.AssignIDs && c.MaxBacklog == 64<<10
		}},
		{in: "sse {\n share {\n replay -1\n }\n}", err: "replay"},
		{in: "sse {\n share {\n max_backlog lots\n }\n}", err: "max_backlog"},
		{in: "sse {\n share {\n linger soon\n }\n}", err: "linger"},
		{in: "sse {\n share {\n bogus 1\n }\n}", err: "unrecognized share option"},
		{in: "sse {\n share a b\n}", err: "wrong argument count"},
	} {
		h := new(Handler)
		err := h.UnmarshalCaddyfile(caddyfile.NewTestDispenser(tc.in))
		if tc.err != "" {
			if err == nil || !strings.Contains(err.Error(), tc.err) || !strings.Contains(err.Error(), "Testfile:") {
				t.Errorf("%q: error %v, want one naming %q and the line", tc.in, err, tc.err)
			}
			continue
		}
		if err != nil || h.Share == nil || !tc.check(h.Share) {
			t.Errorf("%q: %v, %+v", tc.in, err, h.Share)
		}
	}
}

// stallWriter is a client that stops reading once it has n bytes: its
// writes block until the write deadline is set in the past, as a real
// connection's do.
type stallWriter struct {
	*memWriter
	n        int
	deadline chan struct{}
	blocked  chan struct{}
}

func (w *stallWriter) Write(p []byte) (int, error) {
	w.mu.Lock()
	full := w.body.Len() >= w.n
	w.mu.Unlock()
	if full {
		select {
		case w.blocked <- struct{}{}:
		default:
		}
		select {
		case <-w.deadline:
			return 0, os.ErrDeadlineExceeded
		case <-time.After(testWait):
			return 0, errTestBrokenPipe
		}
	}
	return w.memWriter.Write(p)
}

func (w *stallWriter) SetWriteDeadline(d time.Time) error {
	if d.IsZero() || d.After(time.Now()) {
		return nil
	}
	select {
	case <-w.deadline:
	default:
		close(w.deadline)
	}
	return nil
}

func TestShareSlowClientDropped(t *testing.T) {
	defer verifyNoNewGoroutines(t)()
	h, _, logs := shareHandlerLogs(t, &ShareConfig{MaxBacklog: 100})
	up := newHubUpstream()
	fast := startClient(t, h, up, "/slow")
	hr := up.next(t)

	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	slow := &stallWriter{memWriter: newMemWriter(), n: 0, deadline: make(chan struct{}), blocked: make(chan struct{}, 1)}
	req := httptest.NewRequest(http.MethodGet, "/slow", nil).WithContext(ctx)
	req.Header.Set("Accept", "text/event-stream")
	slowDone := make(chan struct{})
	go func() {
		defer close(slowDone)
		h.ServeHTTP(slow, req, up)
	}()
	waitSubscribers(t, h, 2)
	event := "data: " + strings.Repeat("x", 50) + "\n\n"
	hr.send(t, event)
	select {
	case <-slow.blocked:
	case <-time.After(testWait):
		t.Fatal("slow client's write did not block")
	}
	// The others go on; past max_backlog the slow one is cut. (The fast
	// one takes each event before the next, or with so small a backlog it
	// would be dropped too.)
	fast.waitBody(t, event)
	for i := 2; i <= 5; i++ {
		hr.send(t, event)
		fast.waitBody(t, strings.Repeat(event, i))
	}
	select {
	case <-slowDone:
	case <-time.After(testWait):
		t.Fatal("slow client was not dropped")
	}
	fast.waitBody(t, strings.Repeat(event, 5))
	waitSubscribers(t, h, 1)
	wantReason(t, logs, reasonSlowClient)
	hr.send(t, "data: still\n\n")
	fast.waitBody(t, "data: still\n\n")
	fast.cancel()
	fast.waitDone(t)
}

func TestShareJSONDefaultsAndChecks(t *testing.T) {
	var h Handler
	if err := json.Unmarshal([]byte(`{"share": {}}`), &h); err != nil {
		t.Fatal(err)
	}
	provisionTest(t, &h)
	if *h.Share.Replay != defaultReplay || h.Share.MaxBacklog != defaultMaxBacklog || h.hubs == nil {
		t.Errorf("defaults: %+v", h.Share)
	}
	for _, in := range []string{
		`{"share": {"replay": -1}}`,
		`{"share": {"max_backlog": -5}}`,
	} {
		var h Handler
		if err := json.Unmarshal([]byte(in), &h); err != nil {
			t.Fatal(err)
		}
		if err := h.Validate(); err == nil || !strings.Contains(err.Error(), "share:") {
			t.Errorf("%s: Validate gave %v", in, err)
		}
	}
}

func TestShareHeartbeatsWhileUpstreamAway(t *testing.T) {
	defer verifyNoNewGoroutines(t)()
	h, clock := shareHandler(t, &ShareConfig{})
	up := newHubUpstream()
	a := startClient(t, h, up, "/away")
	hr := up.next(t)
	hr.send(t, "data: x\n\n")
	a.waitBody(t, "data: x\n\n")
	// The upstream is down: reverse_proxy would answer 502 on each try.
	up.status, up.contentType, up.body = http.StatusBadGateway, "text/plain", "bad gateway"
	hr.end <- true
	tries := 0
	for i := 0; i < 100 && !strings.Contains(a.w.received(), "data: upstream_error"); i++ {
		select {
		case <-up.reqs:
			tries++
		case <-time.After(2 * time.Millisecond):
		}
		if i == 50 && !strings.Contains(a.w.received(), "data: x\n\n:\n\n") {
			t.Errorf("no heartbeat while the upstream was away: %q", a.w.received())
		}
		clock.Advance(500 * time.Millisecond)
	}
	got := a.waitDone(t)
	if !strings.HasSuffix(got, "event: bye\ndata: upstream_error\n\n") || !strings.Contains(got, ":\n\n") {
		t.Errorf("got %q", got)
	}
	tries += len(up.reqs) // requests made but not yet taken by the loop
	if tries != reconnectTries {
		t.Errorf("%d tries, want %d", tries, reconnectTries)
	}
}

func TestShareCaddyfileAdapts(t *testing.T) {
	caddytest.AssertAdapt(t, `:8080 {
	sse {
		share {path} {
			replay 10
			assign_ids
		}
	}
}
`, "caddyfile", `{
	"apps": {
		"http": {
			"servers": {
				"srv0": {
					"listen": [
						":8080"
					],
					"routes": [
						{
							"handle": [
								{
									"handler": "sse",
									"share": {
										"assign_ids": true,
										"key": "{http.request.uri.path}",
										"replay": 10
									}
								}
							]
						}
					]
				}
			}
		}
	}
}`)
}

// countWriter is a client that takes everything and counts the bytes.
type countWriter struct {
	header http.Header
	n      atomic.Int64
}

func (w *countWriter) Header() http.Header { return w.header }
func (w *countWriter) WriteHeader(int)     {}
func (w *countWriter) Flush()              {}
func (w *countWriter) Write(p []byte) (int, error) {
	w.n.Add(int64(len(p)))
	return len(p), nil
}

// TestShareFanOutAllocatesNothingPerClient sends the same events to 1 and
// to 21 clients: the allocations per event must not grow with the clients.
func TestShareFanOutAllocatesNothingPerClient(t *testing.T) {
	const events = 200
	event := "id: 1\ndata: " + strings.Repeat("x", 100) + "\n\n"
	mallocs := func(clients int) float64 {
		h, _ := shareHandler(t, &ShareConfig{})
		up := newHubUpstream()
		var writers []*countWriter
		var cancels []context.CancelFunc
		var dones []chan struct{}
		for i := 0; i < clients; i++ {
			w := &countWriter{header: make(http.Header)}
			ctx, cancel := context.WithCancel(context.Background())
			req := httptest.NewRequest(http.MethodGet, "/fan", nil).WithContext(ctx)
			req.Header.Set("Accept", "text/event-stream")
			done := make(chan struct{})
			go func() {
				defer close(done)
				h.ServeHTTP(w, req, up)
			}()
			writers, cancels, dones = append(writers, w), append(cancels, cancel), append(dones, done)
		}
		hr := up.next(t)
		waitSubscribers(t, h, clients)
		hr.send(t, event) // warm up
		waitCount := func(want int64) {
			deadline := time.Now().Add(testWait)
			for _, w := range writers {
				for w.n.Load() < want {
					if time.Now().After(deadline) {
						t.Fatalf("a client has %d bytes, want %d", w.n.Load(), want)
					}
					runtime.Gosched()
				}
			}
		}
		waitCount(int64(len(event)))
		var before, after runtime.MemStats
		runtime.ReadMemStats(&before)
		for i := 0; i < events; i++ {
			hr.send(t, event)
		}
		waitCount(int64(len(event) * (events + 1)))
		runtime.ReadMemStats(&after)
		for i := range cancels {
			cancels[i]()
			<-dones[i]
		}
		hr.waitGone(t)
		return float64(after.Mallocs-before.Mallocs) / events
	}
	one, many := mallocs(1), mallocs(21)
	t.Logf("allocations per event: %.1f with 1 client, %.1f with 21", one, many)
	if perClient := (many - one) / 20; perClient > 0.5 {
		t.Errorf("%.2f allocations per event per extra client, want none", perClient)
	}
}

func TestShareReplayIsBoundedByMaxBacklog(t *testing.T) {
	defer verifyNoNewGoroutines(t)()
	// Each event is 16 bytes: max_backlog 32 keeps two besides the newest,
	// whatever replay says.
	h, _ := shareHandler(t, &ShareConfig{MaxBacklog: 32})
	up := newHubUpstream()
	a := startClient(t, h, up, "/rb")
	hr := up.next(t)
	for _, id := range []string{"1", "2", "3", "4", "5"} {
		hr.send(t, "id: "+id+"\ndata: e"+id+"\n\n")
		a.waitBody(t, "data: e"+id+"\n\n")
	}
	if kept := len(onlyHub(t, h).ring.events); kept != 3 {
		t.Errorf("the hub keeps %d events, want 3", kept)
	}
	// Within the bound: everything after its id.
	b := startClient(t, h, up, "/rb", "Last-Event-ID", "2")
	// Beyond it (e2 is gone): live from now on, and told so.
	c := startClient(t, h, up, "/rb", "Last-Event-ID", "1")
	waitSubscribers(t, h, 3)
	hr.send(t, "id: 6\ndata: e6\n\n")
	if got := b.waitBody(t, "data: e6\n\n"); got != "id: 3\ndata: e3\n\nid: 4\ndata: e4\n\nid: 5\ndata: e5\n\nid: 6\ndata: e6\n\n" {
		t.Errorf("resumed within max_backlog: got %q", got)
	}
	if got := c.waitBody(t, "data: e6\n\n"); got != "id: 6\ndata: e6\n\n" || c.w.header.Get(replayHeader) != "miss" {
		t.Errorf("resumed beyond max_backlog: got %q, %s %q", got, replayHeader, c.w.header.Get(replayHeader))
	}
	c.cancel()
	c.waitDone(t)
	for _, cl := range []*client{a, b} {
		cl.cancel()
		cl.waitDone(t)
	}
}

func TestShareLimitsCountEachClientAndTheUpstream(t *testing.T) {
	defer verifyNoNewGoroutines(t)()
	// Two clients and the upstream request they share.
	h := &Handler{MaxStreams: 3, Share: &ShareConfig{Linger: -1}}
	provisionTest(t, h)
	up := newHubUpstream()
	a := startClient(t, h, up, "/lim")
	hr := up.next(t)
	b := startClient(t, h, up, "/lim")
	waitSubscribers(t, h, 2)
	c := startClient(t, h, up, "/lim")
	if got := c.waitDone(t); !strings.Contains(got, "retry: ") {
		t.Errorf("third client got %q, want a refusal", got)
	}
	hr.send(t, "data: x\n\n")
	a.waitBody(t, "data: x")
	b.waitBody(t, "data: x")
	for _, cl := range []*client{a, b} {
		cl.cancel()
		cl.waitDone(t)
	}
}

func TestShareResumeWhileAnEventIsInFlight(t *testing.T) {
	defer verifyNoNewGoroutines(t)()
	h, _ := shareHandler(t, &ShareConfig{})
	up := newHubUpstream()
	a := startClient(t, h, up, "/f")
	hr := up.next(t)
	hr.send(t, "id: 1\ndata: one\n\n")
	hr.send(t, "id: 2\ndata: t")
	// It has seen 1: the event in flight is the next it needs.
	b := startClient(t, h, up, "/f", "Last-Event-ID", "1")
	// It has seen nothing: it starts with the event in flight, whole.
	c := startClient(t, h, up, "/f")
	waitSubscribers(t, h, 3)
	hr.send(t, "wo\n\nid: 3\ndata: three\n\n")
	if got := b.waitBody(t, "three\n\n"); got != "id: 2\ndata: two\n\nid: 3\ndata: three\n\n" {
		t.Errorf("resumed client got %q", got)
	}
	if got := c.waitBody(t, "three\n\n"); got != "id: 2\ndata: two\n\nid: 3\ndata: three\n\n" {
		t.Errorf("new client got %q", got)
	}
	a.waitBody(t, "three\n\n")
	for _, cl := range []*client{a, b, c} {
		cl.cancel()
		cl.waitDone(t)
	}
}

func TestShareWaitersOfWhatIsNotAStreamAskOnTheirOwn(t *testing.T) {
	defer verifyNoNewGoroutines(t)()
	h, _ := shareHandler(t, &ShareConfig{})
	up := newHubUpstream()
	up.contentType, up.body = "application/json", `{"ok":true}`
	up.hold = make(chan struct{})
	a := startClient(t, h, up, "/w")
	b := startClient(t, h, up, "/w")
	waitSubscribers(t, h, 2)
	close(up.hold)
	for _, cl := range []*client{a, b} {
		if got := cl.waitDone(t); got != `{"ok":true}` {
			t.Errorf("got %q", got)
		}
	}
	if n := up.count.Load(); n != 2 {
		t.Errorf("%d upstream requests, want 2: the starter's and the waiter's own", n)
	}

	// No header at all: reverse_proxy's error while the upstream is down.
	down := handlerFunc(func(w http.ResponseWriter, r *http.Request) error {
		return caddyhttp.Error(http.StatusBadGateway, errTestBrokenPipe)
	})
	c := newMemWriter()
	req := httptest.NewRequest(http.MethodGet, "/w", nil)
	req.Header.Set("Accept", "text/event-stream")
	if err := h.ServeHTTP(c, req, down); err != nil {
		t.Fatalf("ServeHTTP: %v", err)
	}
	if got := c.body.String(); !strings.Contains(got, "data: upstream_status_502") {
		t.Errorf("got %q, want a refusal", got)
	}
}

func TestShareClientsLeavingBeforeTheHeaderAreNoFailure(t *testing.T) {
	defer verifyNoNewGoroutines(t)()
	h, _ := shareHandler(t, &ShareConfig{})
	up := newHubUpstream()
	up.hold = make(chan struct{})
	a := startClient(t, h, up, "/early")
	waitSubscribers(t, h, 1)
	a.cancel()
	a.waitDone(t)
	// The upstream request was released, not failed: the next client asks
	// again at once instead of being refused for a backoff.
	close(up.hold)
	b := startClient(t, h, up, "/early")
	up.next(t).send(t, "data: hello\n\n")
	if got := b.waitBody(t, "data: hello\n\n"); strings.Contains(got, "retry:") {
		t.Errorf("got %q, want the stream", got)
	}
	b.cancel()
	b.waitDone(t)
}
