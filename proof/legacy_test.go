//go:build linux

package proof

import (
	"context"
	"errors"
	"fmt"
	"io"
	"maps"
	"math"
	"net/http"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"
)

// The tests of this file hold with the handler as it is: each real legacy
// server behind Caddy + sse flushes its events through at once (or, for
// the PHP script that forgets ob_flush, is shown to buffer), and the
// client leaving frees the server's handler or worker within what the
// server allows. legacy_features_test.go has the ones that wait for
// handler features.

// legacyStreamSSE is the sse block of the stream tests: a heartbeat well
// above the servers' event interval, so that none comes between events.
const legacyStreamSSE = "heartbeat 2s\nwrite_timeout 2s"

var legacyKeys atomic.Int64

// legacyKey returns a stream key no other request of the run uses.
func legacyKey(prefix string) string {
	return fmt.Sprintf("%s%d", prefix, legacyKeys.Add(1))
}

// legacyNotice says how a server learns that its client is gone, which
// bounds how long its handler or worker stays taken after the gateway
// closed the upstream connection.
type legacyNotice struct {
	// bound is the longest the test accepts from the client's hang-up to
	// the server's own "close" line.
	bound time.Duration
	// how is the sentence for the report.
	how string
}

// noticeOnWrite is the bound of a server that only finds out when it
// writes: the first write after the gateway closed the connection may
// still succeed (the peer's reset comes back after it), so it is the
// first or the second write after the hang-up that fails.
func noticeOnWrite(interval time.Duration) legacyNotice {
	return legacyNotice{bound: 2*interval + 500*time.Millisecond,
		how: "notices only when it writes: the first write after the hang-up can still succeed, the reset it draws fails the next"}
}

// checkLegacyStreams opens a stream through the gateway and measures how
// fast its events come through, then hangs up five streams and measures
// how soon the server lets go of each. It returns the teardowns.
func checkLegacyStreams(t *testing.T, rec *caseRecorder, s *legacyServer, g *legacyGateway, path string, notice legacyNotice) {
	t.Helper()
	const events = 10
	interval := s.opts.interval
	client := newHTTPClient(t, nil)

	key := legacyKey(string(s.kind))
	start := time.Now()
	st := openStream(t, client, g.url+path+"?k="+key, legacyStreamHeader())
	if ct := st.resp.Header.Get("Content-Type"); st.resp.StatusCode != http.StatusOK || !strings.HasPrefix(ct, "text/event-stream") {
		t.Fatalf("the stream answered %d %q, want 200 text/event-stream", st.resp.StatusCode, ct)
	}
	got := waitEvents(t, st, events, events*interval+5*time.Second)
	open := s.waitLog(t, "the stream's open line", 2*time.Second, legacyOpened(key))
	var lat []time.Duration
	var skew time.Duration
	for i, e := range got {
		if e.N != i+1 || e.K != key {
			t.Fatalf("event %d is %+v, want n=%d k=%s", i, e, i+1, key)
		}
		lat = append(lat, e.latency())
		if e.latency() > flushBound {
			t.Errorf("event %d reached the client %s after the server wrote it, want at most %s", e.N, e.latency(), flushBound)
		}
		if i > 0 {
			d := e.arrived.Sub(got[i-1].arrived) - e.sent.Sub(got[i-1].sent)
			skew = max(skew, d.Abs())
		}
	}
	rec.figure("%s: first event %s after the request (the server wrote it %s after its handler began); "+
		"latency from the server's write to the client p50 %s, max %s over %d events (interval %s); "+
		"gaps between events differ from the server's by at most %s",
		path, ms(got[0].arrived.Sub(start)), ms(got[0].sent.Sub(open.at())),
		ms(percentile(lat, 50)), ms(percentile(lat, 100)), len(got), interval, ms(skew))

	// Hang-ups: the server must let go of each stream within its bound.
	var teardowns []time.Duration
	writesAfter := map[int]int{}
	for round := range 5 {
		if round > 0 {
			key = legacyKey(string(s.kind))
			st = openStream(t, client, g.url+path+"?k="+key, legacyStreamHeader())
			got = waitEvents(t, st, 2, 2*interval+5*time.Second)
		} else {
			got = legacyEvents(t, st)
		}
		hungUp := st.hangUp()
		l := s.waitLog(t, "the end of a stream whose client hung up", notice.bound+slack, legacyClosed(key))
		d := l.at().Sub(hungUp)
		if d > notice.bound {
			t.Errorf("the %s server let go of stream %s %s after the client hung up, want at most %s (%s)",
				s.kind, key, d, notice.bound, notice.how)
		}
		checkLegacyClose(t, s, l)
		rec.teardown(d)
		teardowns = append(teardowns, d)
		// Events the server wrote after the last one the client read,
		// the one that failed included (express counts none: it stops
		// before writing).
		writesAfter[l.N-got[len(got)-1].N]++
	}
	var counts []string
	for _, n := range slices.Sorted(maps.Keys(writesAfter)) {
		counts = append(counts, fmt.Sprintf("%d after %d of %d hang-ups", n, writesAfter[n], len(teardowns)))
	}
	rec.figure("%s lets go of %s %s after the client hung up (max over %d; %s); events it wrote after the client's last: %s",
		s.kind, legacyHeld[s.kind], ms(percentile(teardowns, 100)), len(teardowns), notice.how, strings.Join(counts, ", "))

	a := legacyDo(client, http.MethodGet, g.url+s.helloPath, nil, 2*time.Second)
	if a.err != nil || a.status != http.StatusOK {
		t.Errorf("after the streams ended, %s answered %d, %v; want 200", s.helloPath, a.status, a.err)
	}
	if w := g.bufferingWarnings(t); len(w) > 0 {
		t.Errorf("the gateway warned about buffering for a server that flushes every event: %v", w)
	}
}

// legacyHeld names what a stream holds on each server.
var legacyHeld = map[legacyKind]string{
	legacyExpress: "a stream's handler (its interval)",
	legacyPHP:     "a stream's script",
	legacyFlask:   "a stream's sync worker",
}

// checkLegacyClose checks what the server said about why it stopped.
func checkLegacyClose(t *testing.T, s *legacyServer, l legacyLog) {
	t.Helper()
	switch s.kind {
	case legacyPHP:
		if l.Aborted != 1 {
			t.Errorf("the PHP script ended without connection_aborted() set: %+v", l)
		}
	case legacyFlask:
		if l.Why != "GeneratorExit" {
			t.Errorf("the Flask generator ended otherwise than by gunicorn closing it: %+v", l)
		}
	}
}

// TestLegacyExpress: Express's naive SSE route behind the gateway.
func TestLegacyExpress(t *testing.T) {
	rec := legacyRecord(t, "legacy-express")
	s := startLegacy(t, legacyExpress, legacyOptions{})
	g := startLegacyGateway(t, s, legacyRoute{sse: legacyStreamSSE})
	checkLegacyStreams(t, rec, s, g, s.eventsPath, legacyNotice{bound: teardownBound,
		how: "notices at once: Node emits req 'close' when the gateway closes the connection, without waiting for a write"})
}

// TestLegacyPHP: the PHP tutorial's script on php -S with the production
// php.ini behind the gateway, and the same script without ob_flush.
func TestLegacyPHP(t *testing.T) {
	rec := legacyRecord(t, "legacy-php")
	const pad = 500
	s := startLegacy(t, legacyPHP, legacyOptions{pad: pad})
	g := startLegacyGateway(t, s, legacyRoute{sse: legacyStreamSSE})
	client := newHTTPClient(t, nil)

	t.Run("ob_flush", func(t *testing.T) {
		checkLegacyStreams(t, rec, s, g, s.eventsPath, noticeOnWrite(s.opts.interval))

		// php -S serves one request at a time: a stream holds the
		// whole server.
		key := legacyKey("php")
		st := openStream(t, client, g.url+s.eventsPath+"?k="+key, legacyStreamHeader())
		waitEvents(t, st, 1, 5*time.Second)
		const wait = time.Second
		a := legacyDo(client, http.MethodGet, g.url+s.helloPath, nil, wait)
		if a.err == nil {
			t.Errorf("with a stream open, %s answered %d after %s; php -S was expected to hold it", s.helloPath, a.status, a.took)
		}
		hungUp := st.hangUp()
		s.waitLog(t, "the end of the stream", noticeOnWrite(s.opts.interval).bound+slack, legacyClosed(key))
		a = legacyDo(client, http.MethodGet, g.url+s.helloPath, nil, 2*time.Second)
		if a.err != nil || a.status != http.StatusOK {
			t.Errorf("after the stream ended, %s answered %d, %v", s.helloPath, a.status, a.err)
		}
		rec.figure("php -S (one process) with one stream open: %s got no answer within %s; it answered %s after the stream's client hung up",
			s.helloPath, wait, ms(time.Since(hungUp)))
	})

	t.Run("no_ob_flush", func(t *testing.T) {
		// output_buffering = 4096 keeps the events in PHP's buffer:
		// they come through the gateway late, in bursts of about 4 KiB.
		interval := s.opts.interval
		key := legacyKey("php-noflush")
		start := time.Now()
		st := openStream(t, client, g.url+s.noObFlushPath+"?k="+key, legacyStreamHeader())
		headers := time.Since(start)
		const events = 16
		got := waitEvents(t, st, events, 20*time.Second)
		body, _ := st.snapshot()
		eventBytes := legacyBlocks(body)[0].end
		perBurst := int(math.Ceil(4096 / float64(eventBytes)))
		var lat []time.Duration
		bursts := 1
		for i, e := range got {
			lat = append(lat, e.latency())
			if i > 0 && e.arrived.Sub(got[i-1].arrived) > interval/2 {
				bursts++
			}
		}
		maxLat := percentile(lat, 100)
		if maxLat < 3*interval {
			t.Errorf("the longest an event waited was %s; with output_buffering = 4096 and %d-byte events it should wait about %d intervals (%s)",
				maxLat, eventBytes, perBurst, time.Duration(perBurst)*interval)
		}
		if bursts > len(got)/2 {
			t.Errorf("%d events came in %d arrivals; with output_buffering they should come in bursts", len(got), bursts)
		}
		heartbeats := strings.Count(string(body), ":\n\n")
		rec.figure("without ob_flush (output_buffering = 4096, %d-byte events every %s): headers after %s, "+
			"%d events in %d bursts (about %d per 4 KiB), latency p50 %s, max %s; %d gateway heartbeats filled the gaps",
			eventBytes, interval, ms(headers), len(got), bursts, perBurst, ms(percentile(lat, 50)), ms(maxLat), heartbeats)

		// The server writes to the socket only when its buffer is full, so
		// it learns that the client left only at such a write.
		bound := 2*time.Duration(perBurst)*interval + time.Second
		hungUp := st.hangUp()
		l := s.waitLog(t, "the end of the stream", bound+slack, legacyClosed(key))
		d := l.at().Sub(hungUp)
		if d > bound {
			t.Errorf("the script ended %s after the client hung up, want at most %s (two buffer flushes)", d, bound)
		}
		checkLegacyClose(t, s, l)
		rec.figure("without ob_flush the script ends %s after the client hung up (it notices only when a full buffer is written)", ms(d))
	})
}

// TestLegacyFlask: the Flask generator on gunicorn's sync workers behind
// the gateway.
func TestLegacyFlask(t *testing.T) {
	rec := legacyRecord(t, "legacy-flask")
	s := startLegacy(t, legacyFlask, legacyOptions{workers: 2})
	g := startLegacyGateway(t, s, legacyRoute{sse: legacyStreamSSE})
	checkLegacyStreams(t, rec, s, g, s.eventsPath, noticeOnWrite(s.opts.interval))
}

// TestLegacyFlaskWorkers shows what streams do to gunicorn's two sync
// workers: two held streams take both, and the server's other route waits
// until a stream's client leaves and its worker notices; with
// max_streams 1 the gateway refuses the second stream before it reaches
// the server, and the other route keeps answering.
func TestLegacyFlaskWorkers(t *testing.T) {
	rec := legacyRecord(t, "legacy-flask")
	s := startLegacy(t, legacyFlask, legacyOptions{workers: 2})
	interval := s.opts.interval
	notice := noticeOnWrite(interval)

	t.Run("no_limit", func(t *testing.T) {
		g := startLegacyGateway(t, s, legacyRoute{sse: legacyStreamSSE})
		client := newHTTPClient(t, nil)
		var streams []*clientStream
		var keys []string
		for range 2 {
			key := legacyKey("flask-held")
			st := openStream(t, client, g.url+s.eventsPath+"?k="+key, legacyStreamHeader())
			waitEvents(t, st, 1, 5*time.Second)
			streams, keys = append(streams, st), append(keys, key)
		}
		const wait = 2 * time.Second
		a := legacyDo(client, http.MethodGet, g.url+s.helloPath, nil, wait)
		if a.err == nil {
			t.Fatalf("with both workers streaming, %s answered %d after %s; it was expected to wait for a worker", s.helloPath, a.status, a.took)
		}
		// A request that waits while a stream's client leaves gets the
		// worker once it notices.
		answered := make(chan legacyAnswer, 1)
		go func() { answered <- legacyDo(client, http.MethodGet, g.url+s.helloPath, nil, 10*time.Second) }()
		select {
		case a := <-answered:
			t.Fatalf("%s answered (%d, %v) while both workers were still streaming", s.helloPath, a.status, a.err)
		case <-time.After(interval):
		}
		hungUp := streams[0].hangUp()
		a = <-answered
		if a.err != nil || a.status != http.StatusOK {
			t.Fatalf("%s answered %d, %v after a stream's client left", s.helloPath, a.status, a.err)
		}
		d := time.Since(hungUp)
		if d > notice.bound+500*time.Millisecond {
			t.Errorf("%s answered %s after a stream's client left, want at most %s", s.helloPath, d, notice.bound+500*time.Millisecond)
		}
		l := s.waitLog(t, "the end of the first stream", slack, legacyClosed(keys[0]))
		rec.figure("gunicorn, 2 sync workers, 2 streams held through the gateway without limit: %s got no answer within %s; "+
			"a waiting request got its answer %s after a stream's client left (its worker noticed after %s)",
			s.helloPath, wait, ms(d), ms(l.at().Sub(hungUp)))
		streams[1].hangUp()
		s.waitLog(t, "the end of the second stream", notice.bound+slack, legacyClosed(keys[1]))
	})

	t.Run("max_streams_1", func(t *testing.T) {
		g := startLegacyGateway(t, s, legacyRoute{sse: legacyStreamSSE + "\nmax_streams 1"})
		client := newHTTPClient(t, nil)
		key := legacyKey("flask-one")
		st := openStream(t, client, g.url+s.eventsPath+"?k="+key, legacyStreamHeader())
		waitEvents(t, st, 1, 5*time.Second)

		refusedKey := legacyKey("flask-refused")
		a := legacyDo(client, http.MethodGet, g.url+s.eventsPath+"?k="+refusedKey, legacyStreamHeader(), 2*time.Second)
		if a.err != nil {
			t.Fatalf("the second stream got no complete answer: %v", a.err)
		}
		if a.status == http.StatusOK && !strings.Contains(a.body, "retry:") {
			t.Errorf("the second stream was answered %d %q %q, want a refusal", a.status, a.ctype, a.body)
		}
		if _, ok := s.findLog(legacyOpened(refusedKey)); ok {
			t.Errorf("the refused stream reached the server")
		}
		var took []time.Duration
		for range 5 {
			a := legacyDo(client, http.MethodGet, g.url+s.helloPath, nil, 2*time.Second)
			if a.err != nil || a.status != http.StatusOK {
				t.Fatalf("with max_streams 1 and one stream held, %s answered %d, %v", s.helloPath, a.status, a.err)
			}
			took = append(took, a.took)
		}
		if m := percentile(took, 100); m > time.Second {
			t.Errorf("%s took up to %s with one worker free", s.helloPath, m)
		}
		rec.figure("with max_streams 1: the second stream was refused by the gateway (%d %q) without reaching the server; %s answered in at most %s (5 requests) with one stream held",
			a.status, a.ctype, s.helloPath, ms(percentile(took, 100)))
		st.hangUp()
		s.waitLog(t, "the end of the stream", notice.bound+slack, legacyClosed(key))

		// Churn: max_streams counts the gateway's streams, but a sync
		// worker stays taken after its client left until its next write.
		// Clients that come and go faster than that take both workers.
		c := legacyChurn(t, client, g, s, 3*time.Second)
		rec.figure("with max_streams 1 only, clients that open a stream and drop it at its first event, one every 50 ms for 3 s: %d admitted, %d refused; %s answered in up to %s (%d of %d probes got no answer within 2 s)",
			c.admitted, c.refused, s.helloPath, ms(c.helloMax), c.helloTimeouts, c.probes)
		// Every stream that reached a worker is let go of in the end.
		for _, key := range c.keys {
			if _, ok := s.findLog(legacyOpened(key)); ok {
				s.waitLog(t, "the end of a dropped stream", 2*notice.bound+slack, legacyClosed(key))
			}
		}
	})
}

// legacyChurnResult is what legacyChurn saw.
type legacyChurnResult struct {
	admitted, refused, probes, helloTimeouts int
	helloMax                                 time.Duration
	keys                                     []string // of every stream tried
}

// legacyChurn opens streams one after the other for dur, each dropped as
// soon as its first event came, while another client asks the server's
// other route every 100 ms. Every request is bounded.
func legacyChurn(t *testing.T, client *http.Client, g *legacyGateway, s *legacyServer, dur time.Duration) legacyChurnResult {
	t.Helper()
	var r legacyChurnResult
	stop := make(chan struct{})
	probed := make(chan legacyChurnResult, 1)
	go func() {
		var p legacyChurnResult
		defer func() { probed <- p }()
		tick := time.NewTicker(100 * time.Millisecond)
		defer tick.Stop()
		for {
			select {
			case <-stop:
				return
			case <-tick.C:
			}
			a := legacyDo(client, http.MethodGet, g.url+s.helloPath, nil, 2*time.Second)
			p.probes++
			if a.err != nil {
				p.helloTimeouts++
			}
			p.helloMax = max(p.helloMax, a.took)
		}
	}()
	// A client arrives every 50 ms, or as soon as the one before it is
	// done, whichever is later.
	pace := time.NewTicker(50 * time.Millisecond)
	defer pace.Stop()
	deadline := time.Now().Add(dur)
	for ; time.Now().Before(deadline); <-pace.C {
		key := legacyKey("churn")
		r.keys = append(r.keys, key)
		a := legacyFirstEvent(client, g.url+s.eventsPath+"?k="+key, 2*time.Second)
		if a.err == nil && a.status == http.StatusOK && strings.Contains(a.body, "data: ") {
			r.admitted++
		} else {
			r.refused++
		}
	}
	close(stop)
	p := <-probed
	r.probes, r.helloTimeouts, r.helloMax = p.probes, p.helloTimeouts, p.helloMax
	return r
}

// legacyFirstEvent opens a stream, reads up to its first event (or its
// end) and drops it: a client that comes and goes.
func legacyFirstEvent(client *http.Client, url string, within time.Duration) legacyAnswer {
	a := legacyAnswer{}
	start := time.Now()
	req, err := http.NewRequest(http.MethodGet, url, nil)
	if err != nil {
		return legacyAnswer{err: err}
	}
	req.Header = legacyStreamHeader()
	ctx, cancel := context.WithTimeout(context.Background(), within)
	defer cancel()
	resp, err := client.Do(req.WithContext(ctx))
	if err != nil {
		return legacyAnswer{err: err, took: time.Since(start)}
	}
	defer resp.Body.Close()
	a.status, a.ctype = resp.StatusCode, resp.Header.Get("Content-Type")
	buf := make([]byte, 4096)
	var body []byte
	for !strings.Contains(string(body), "\n\n") {
		n, err := resp.Body.Read(buf)
		body = append(body, buf[:n]...)
		if err != nil {
			if !errors.Is(err, io.EOF) {
				a.err = err
			}
			break
		}
	}
	a.body, a.took = string(body), time.Since(start)
	return a
}
