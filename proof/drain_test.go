//go:build linux

package proof

import (
	"bytes"
	"compress/gzip"
	"fmt"
	"io"
	"net"
	"net/http"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/ssegateway/caddy-sse/internal/ssespec"
)

// Options of the drain tests' route; the bounds derive from them.
const (
	mixDrainWindow = 2 * time.Second
	mixRetry       = time.Second
	// mixBound is how soon after `caddy stop` or a reload every request
	// of the old configuration must have ended, and a stop finished:
	// the drain window, the hard stop half a second after it, and half a
	// second for the rest.
	mixBound = mixDrainWindow + time.Second
)

// mixProfiles is the drain tests' configuration, generation 1 before a
// reload and 2 after: the close event's type and a response header say
// which configuration served a request.
func mixProfiles(generation int) map[string]profile {
	return map[string]profile{"mix": {
		sse:   fmt.Sprintf("drain_window %s\nretry %s\nclose_event %s", mixDrainWindow, mixRetry, mixCloseEvent(generation)),
		proxy: fmt.Sprintf("header_down X-Proof-Generation %d", generation),
	}}
}

func mixCloseEvent(generation int) string { return "bye" + strconv.Itoa(generation) }

// TestStopDrainsEveryRequest runs Caddy as its own process with Caddy's
// default grace period, which waits for requests forever, and stops it
// with `caddy stop` while it carries every kind of request the drain must
// reach (see drainMix). The process must exit within the drain window + 1 s,
// every upstream request must have been ended by the gateway, and each
// client must have received what the drain promises.
func TestStopDrainsEveryRequest(t *testing.T) {
	rec := report.start(t, "drain-stop")
	up := newUpstream(t)
	p := startCaddyProcess(t, buildCaddy(t), up, mixProfiles(1))
	mix := startDrainMix(t, up, p)

	trigger := p.stop(t)
	exited := p.waitExit(t, mixBound+10*time.Second)
	took := exited.Sub(trigger)
	if took > mixBound {
		t.Errorf("caddy stop: the process exited %s after the stop, want at most drain_window %s + 1s", took, mixDrainWindow)
	}
	figure(t, rec, "process exited %s after `caddy stop` (drain_window %s, grace_period unlimited)", ms(took), mixDrainWindow)
	mix.check(t, rec, trigger, 1)
}

// TestReloadDrainsEveryRequest loads a changed configuration through the
// admin API's /load into a Caddy process that carries every kind of
// request the drain must reach (see drainMix), with the default unlimited
// grace period. The reload must complete, every request of the old
// configuration must end within the drain window + 1 s with what the drain
// promises, and new requests must be served by the new configuration and
// live on after the old one's drain.
func TestReloadDrainsEveryRequest(t *testing.T) {
	rec := report.start(t, "drain-reload")
	up := newUpstream(t)
	p := startCaddyProcess(t, buildCaddy(t), up, mixProfiles(1))
	mix := startDrainMix(t, up, p)

	before := p.metrics(t)
	trigger, answered := p.load(t, mixProfiles(2))
	if d := answered.Sub(trigger); d > mixBound {
		t.Errorf("POST /load took %s, want at most drain_window %s + 1s", d, mixDrainWindow)
	}
	// A request right after the reload: the new configuration serves it.
	key := up.key("new")
	fresh := openStream(t, mix.client, p.httpURL+"/p/mix/push?k="+key, http.Header{"Accept": {"text/event-stream"}})
	if got := fresh.resp.Header.Get("X-Proof-Generation"); got != "2" {
		t.Errorf("a stream opened after the reload came from configuration %q, want 2", got)
	}
	freshReq := up.request(t, key, 1, 5*time.Second)
	freshReq.send(t, "id: 1\ndata: new config\n\n")
	fresh.waitContains(t, "data: new config\n\n", 0, slack)

	mix.check(t, rec, trigger, 1)
	figure(t, rec, "POST /load answered in %s", ms(answered.Sub(trigger)))
	// The metrics agree: 7 streams ended and 3 header waits refused, by
	// the drain.
	after := p.metrics(t)
	for sample, want := range map[string]float64{
		`caddy_sse_streams_ended_total{reason="drain"}`:   7,
		`caddy_sse_streams_refused_total{reason="drain"}`: float64(len(mix.waits)),
	} {
		if got := after[sample] - before[sample]; got != want {
			t.Errorf("%s grew by %v over the reload, want %v", sample, got, want)
		}
	}

	// The new stream lives on past the old configuration's drain window
	// and hard stop.
	if wait := time.Until(trigger.Add(mixBound)); wait > 0 {
		<-time.After(wait)
	}
	freshReq.send(t, "id: 2\ndata: still here\n\n")
	fresh.waitContains(t, "data: still here\n\n", 0, slack)
	if body, ended := fresh.snapshot(); ended || bytes.Contains(body, []byte("retry:")) {
		t.Errorf("the new configuration's stream was touched by the old one's drain: %q (ended: %v)", body, ended)
	}
	figure(t, rec, "a stream opened after the reload is served by the new configuration and still receives events after the old one's drain")
	hungUp := fresh.hangUp()
	if d := freshReq.waitEnded(t, teardownBound+slack).Sub(hungUp); d > teardownBound {
		t.Errorf("the new stream's upstream saw its end %s after the client hung up", d)
	}
}

// drainMix is every kind of request a drain must reach, each with its own
// upstream:
//   - live streams, at an event boundary: they must get the close sequence
//     with reason drain and a clean end;
//   - a live stream whose upstream stopped mid-event: the close waits for
//     the event's end, which never comes, so the hard stop ends it,
//     adding nothing;
//   - a live stream the upstream compresses with gzip: decoded, it gets
//     the close sequence like the others;
//   - a live stream in an encoding the gateway cannot read (br): passed
//     through opaque, it must still be ended by the drain, at any byte and
//     with nothing added;
//   - header waits on an upstream that never answers (one request asking
//     for a stream, one not) and on one that buffers its answer (its
//     header would come only when 2 KiB of events fill its buffer, some
//     11 s later): the stream requests get the refusal a browser survives,
//     with reason drain; the other gets 503;
//   - a stalled client: a raw TCP client that sent its request and never
//     reads while the upstream floods it, so the gateway's write blocks;
//     write_timeout (10 s, the default) is far beyond the window, so only
//     the hard stop can end it.
type drainMix struct {
	p      *caddyProcess
	client *http.Client
	live   []mixStream
	mid    mixStream
	gz     mixStream
	br     mixStream
	waits  []*headerWait
	flood  *upstreamRequest
}

type mixStream struct {
	key string
	s   *clientStream
	req *upstreamRequest
}

// headerWait is a request the upstream has not answered when the drain
// begins.
type headerWait struct {
	name     string
	behavior string
	key      string
	stream   bool // asked for a stream (Accept: text/event-stream)
	req      *upstreamRequest
	resp     *fullResponse
}

func startDrainMix(t *testing.T, up *upstream, p *caddyProcess) *drainMix {
	t.Helper()
	up.handle("flood", floodBehavior)
	up.handle("gzpush", gzipPushBehavior)
	up.handle("brpush", opaquePushBehavior)
	up.handle("hang", hangBehavior)
	up.handle("buffer", bufferingBehavior)
	m := &drainMix{p: p, client: newHTTPClient(t, &http.Transport{})}
	accept := http.Header{"Accept": {"text/event-stream"}}

	// The stalled client first: its upstream's writes take a moment to block.
	m.flood = openStalledClient(t, up, p.httpPort, "/p/mix/flood")

	for i := range 3 {
		key := up.key("live")
		s := openStream(t, m.client, p.httpURL+"/p/mix/push?k="+key, accept)
		req := up.request(t, key, 1, 5*time.Second)
		req.send(t, fmt.Sprintf("id: %d\ndata: hello\n\n", i+1))
		s.waitContains(t, "data: hello\n\n", 0, slack)
		m.live = append(m.live, mixStream{key, s, req})
	}

	key := up.key("mid")
	m.mid = mixStream{key: key, s: openStream(t, m.client, p.httpURL+"/p/mix/push?k="+key, accept)}
	m.mid.req = up.request(t, key, 1, 5*time.Second)
	m.mid.req.send(t, "id: 1\ndata: whole\n\nid: 2\ndata: half")
	m.mid.s.waitContains(t, "data: half", 0, slack)

	key = up.key("gz")
	m.gz = mixStream{key: key, s: openStream(t, m.client, p.httpURL+"/p/mix/gzpush?k="+key, accept)}
	m.gz.req = up.request(t, key, 1, 5*time.Second)
	m.gz.req.send(t, "id: 1\ndata: zipped\n\n")
	m.gz.s.waitContains(t, "data: zipped\n\n", 0, slack)

	key = up.key("br")
	m.br = mixStream{key: key, s: openStream(t, m.client, p.httpURL+"/p/mix/brpush?k="+key, accept)}
	m.br.req = up.request(t, key, 1, 5*time.Second)
	m.br.req.send(t, opaqueBytes)
	m.br.s.waitContains(t, opaqueBytes, 0, slack)

	for _, w := range []*headerWait{
		{name: "hung upstream, stream request", behavior: "hang", stream: true},
		{name: "hung upstream, other request", behavior: "hang"},
		{name: "buffering upstream, stream request", behavior: "buffer", stream: true},
	} {
		w.key = up.key(w.behavior)
		var header http.Header
		if w.stream {
			header = accept
		}
		w.resp = fetchAll(m.client, p.httpURL+"/p/mix/"+w.behavior+"?k="+w.key, header, 30*time.Second)
		w.req = up.request(t, w.key, 1, 5*time.Second)
		m.waits = append(m.waits, w)
	}
	// The buffering upstream is producing, yet no header reached the gateway.
	buffering := m.waits[2].req
	waitUntil(t, "the buffering upstream to write its first events", 5*time.Second, func() bool { return buffering.lastWrite.Load() != 0 })
	waitUntil(t, "the flooding upstream's writes to block", 10*time.Second, func() bool {
		last := m.flood.lastWrite.Load()
		return last != 0 && time.Since(time.Unix(0, last)) > 300*time.Millisecond
	})
	for _, w := range m.waits {
		select {
		case <-w.resp.done:
			t.Fatalf("%s: answered before the drain: %d %q (%v)", w.name, w.resp.status, w.resp.body, w.resp.err)
		default:
		}
	}
	return m
}

// check verifies, after the drain began at trigger, that every upstream
// request ended within mixBound, what each client received, and the
// handler's account of each request (reason drain).
func (m *drainMix) check(t *testing.T, rec *caseRecorder, trigger time.Time, generation int) {
	t.Helper()
	closeSeq := fmt.Sprintf("retry: %d\nevent: %s\ndata: drain\n\n", mixRetry.Milliseconds(), mixCloseEvent(generation))
	var worst time.Duration
	upstreamEnded := func(what string, req *upstreamRequest) {
		t.Helper()
		d := req.waitEnded(t, mixBound+5*time.Second).Sub(trigger)
		if d > mixBound {
			t.Errorf("%s: the upstream saw its request end %s after the drain began, want at most %s", what, d, mixBound)
		}
		worst = max(worst, d)
	}

	var closedAt []time.Duration
	for _, l := range append(append([]mixStream(nil), m.live...), m.gz) {
		upstreamEnded("live stream "+l.key, l.req)
		err, endedAt := l.s.waitEnd(t, slack)
		body, _ := l.s.snapshot()
		if err != nil || !bytes.HasSuffix(body, []byte(closeSeq)) {
			t.Errorf("live stream %s ended (error %v) with %q, want the close sequence %q and a clean end", l.key, err, clip(body), closeSeq)
		}
		closedAt = append(closedAt, endedAt.Sub(trigger))
	}
	if ce := m.gz.s.resp.Header.Get("Content-Encoding"); ce != "" {
		t.Errorf("the compressed stream reached the client with Content-Encoding %q, want it decoded", ce)
	}
	if body, _ := m.gz.s.snapshot(); !bytes.HasPrefix(body, []byte("id: 1\ndata: zipped\n\n")) {
		t.Errorf("the compressed stream reached the client as %q, want its events decoded", clip(body))
	}

	// Mid-event: the hard stop ends it; the client must not be handed a
	// close sequence or anything else after the unfinished event.
	upstreamEnded("mid-event stream", m.mid.req)
	m.mid.s.waitEnd(t, slack)
	body, _ := m.mid.s.snapshot()
	if !bytes.HasSuffix(body, []byte("data: half")) {
		t.Errorf("the stream stopped mid-event ended with %q: the gateway added something after the unfinished event", clip(body))
	}
	if got := ssespec.Parse(body).Events; len(got) != 1 || got[0].Data != "whole" {
		t.Errorf("the stream stopped mid-event gave the client the events %+v, want only the whole one", got)
	}

	// Opaque: passed through as it came, ended with nothing added.
	upstreamEnded("opaque (br) stream", m.br.req)
	m.br.s.waitEnd(t, slack)
	if ce := m.br.s.resp.Header.Get("Content-Encoding"); ce != "br" {
		t.Errorf("the br stream reached the client with Content-Encoding %q, want br passed through", ce)
	}
	if body, _ := m.br.s.snapshot(); string(body) != opaqueBytes {
		t.Errorf("the br stream gave the client %q, want exactly the upstream's bytes %q", body, opaqueBytes)
	}

	refusal := regexp.MustCompile(fmt.Sprintf(`^retry: (\d+)\nevent: %s\ndata: drain\n\n$`, mixCloseEvent(generation)))
	var refusedAt []time.Duration
	for _, w := range m.waits {
		upstreamEnded(w.name, w.req)
		r := w.resp.wait(t, mixBound+slack)
		refusedAt = append(refusedAt, r.at.Sub(trigger))
		if r.err != nil {
			t.Errorf("%s: %v", w.name, r.err)
			continue
		}
		if !w.stream {
			if r.status != http.StatusServiceUnavailable || r.header.Get("Retry-After") == "" {
				t.Errorf("%s: %d (Retry-After %q), want 503 with Retry-After", w.name, r.status, r.header.Get("Retry-After"))
			}
			continue
		}
		checkStreamRefusal(t, w.name, r, refusal, mixRetry)
	}

	upstreamEnded("stalled client", m.flood)

	// The handler's own account: every stream ended by the drain, every
	// header wait refused by it.
	ended := map[string]string{}
	for _, l := range m.p.waitLogged(t, streamEndMessages, 7, slack) {
		ended[l.URI] = l.Reason
	}
	refused := map[string]string{}
	for _, l := range m.p.waitLogged(t, msgStreamRefused, len(m.waits), slack) {
		refused[l.URI] = l.Reason
	}
	for _, l := range append(append([]mixStream(nil), m.live...), m.gz, m.br, m.mid, mixStream{key: m.flood.Key}) {
		if got := reasonFor(ended, l.key); got != "drain" {
			t.Errorf("the handler logged the end of %s as %q, want drain", l.key, got)
		}
	}
	for _, w := range m.waits {
		if got := reasonFor(refused, w.key); got != "drain" {
			t.Errorf("the handler logged the refusal of %s (%s) as %q, want drain", w.key, w.name, got)
		}
	}
	figure(t, rec, "every upstream request ended by %s after the drain began (3 live, 1 mid-event, 1 gzip, 1 br, 3 header waits, 1 stalled client)", ms(worst))
	figure(t, rec, "close sequences reached the live streams %s–%s after it; refusals %s–%s",
		ms(slicesMin(closedAt)), ms(slicesMax(closedAt)), ms(slicesMin(refusedAt)), ms(slicesMax(refusedAt)))
}

func reasonFor(byURI map[string]string, key string) string {
	for uri, reason := range byURI {
		if strings.HasSuffix(uri, "?k="+key) {
			return reason
		}
	}
	return "(nothing logged)"
}

// openStalledClient sends a stream request for path from a raw TCP
// connection with a tiny receive window that never reads, and returns the
// upstream's request once it arrived. The connection closes when the test
// ends.
func openStalledClient(t *testing.T, up *upstream, port int, path string) *upstreamRequest {
	t.Helper()
	dialer := net.Dialer{Timeout: 5 * time.Second, Control: func(_, _ string, c syscall.RawConn) error {
		var err error
		if cerr := c.Control(func(fd uintptr) { err = setReceiveBuffer(fd, 4096) }); cerr != nil {
			return cerr
		}
		return err
	}}
	conn, err := dialer.Dial("tcp", net.JoinHostPort("127.0.0.1", strconv.Itoa(port)))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	key := up.key("stalled")
	if _, err := fmt.Fprintf(conn, "GET %s?k=%s HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: text/event-stream\r\n\r\n", path, key); err != nil {
		t.Fatal(err)
	}
	return up.request(t, key, 1, 5*time.Second)
}

// bufferingBehavior is an upstream that writes an event every 50 ms but
// never flushes: its server holds the header until 2 KiB of body fill its
// buffer, some 11 s after the request.
func bufferingBehavior(w http.ResponseWriter, r *http.Request, req *upstreamRequest) {
	w.Header().Set("Content-Type", "text/event-stream")
	ticker := time.NewTicker(50 * time.Millisecond)
	defer ticker.Stop()
	for {
		if _, err := io.WriteString(w, "data: b\n\n"); err != nil {
			return
		}
		req.lastWrite.Store(time.Now().UnixNano())
		select {
		case <-ticker.C:
		case <-r.Context().Done():
			return
		}
	}
}

// gzipPushBehavior answers with a gzip-compressed event stream, although
// the request did not ask for one, and compresses and flushes what the
// test pushes.
func gzipPushBehavior(w http.ResponseWriter, r *http.Request, req *upstreamRequest) {
	w.Header().Set("Content-Type", "text/event-stream")
	w.Header().Set("Content-Encoding", "gzip")
	w.WriteHeader(http.StatusOK)
	if http.NewResponseController(w).Flush() != nil {
		return
	}
	gz := gzip.NewWriter(w)
	for {
		select {
		case p, ok := <-req.push:
			if !ok {
				_ = gz.Close()
				return
			}
			if _, err := gz.Write(p); err != nil || gz.Flush() != nil || http.NewResponseController(w).Flush() != nil {
				return
			}
			req.pushed <- time.Now()
		case <-r.Context().Done():
			return
		}
	}
}

// opaqueBytes stand for a body in an encoding the gateway cannot read; it
// never looks inside.
const opaqueBytes = "\x8b\x07\x80opaque"

// opaquePushBehavior answers with an event stream labelled
// Content-Encoding: br and writes what the test pushes as it is.
func opaquePushBehavior(w http.ResponseWriter, r *http.Request, req *upstreamRequest) {
	w.Header().Set("Content-Encoding", "br")
	pushBehavior(w, r, req)
}
