//go:build linux

package proof

import (
	"context"
	"encoding/json"
	"net/http"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/chromedp/chromedp"

	"github.com/ssegateway/caddy-sse/internal/headless"
)

// The tests of this file check what the real legacy servers need from the
// handler beyond flushing and teardown: a HEAD that leaves no connection
// or worker stuck, a restart of the server that costs no browser its
// EventSource, a limit on the rate of new streams, and a warning for a
// server that buffers its events.

// TestLegacyHEAD sends a HEAD for the event stream through the gateway (a
// monitor, `curl -I`) and then a GET: the HEAD must get its answer, the
// server must not keep a handler or worker for it (or keep the gateway's
// pooled connection in the middle of a response that never ends), and the
// GET and the server's other route must still be served.
func TestLegacyHEAD(t *testing.T) {
	for _, kind := range []legacyKind{legacyExpress, legacyPHP, legacyFlask} {
		t.Run(string(kind), func(t *testing.T) {
			rec := legacyRecord(t, "legacy-"+string(kind))
			s := startLegacy(t, kind, legacyOptions{workers: 2})
			g := startLegacyGateway(t, s, legacyRoute{sse: legacyStreamSSE})
			client := newHTTPClient(t, nil)
			notice := noticeOnWrite(s.opts.interval)
			if kind == legacyExpress {
				notice.bound = teardownBound
			}

			key := legacyKey("head")
			head := legacyDo(client, http.MethodHead, g.url+s.eventsPath+"?k="+key, nil, 3*time.Second)
			if head.err != nil {
				t.Fatalf("HEAD %s through the gateway: %v", s.eventsPath, head.err)
			}
			if head.status >= 500 {
				t.Errorf("HEAD %s through the gateway answered %d", s.eventsPath, head.status)
			}
			// The server either never starts a stream for a HEAD or lets
			// go of it within its usual bound.
			freed := "never started a stream for it"
			if l, ok := s.waitLogOK(notice.bound+slack, legacyClosed(key)); ok {
				open, _ := s.findLog(legacyOpened(key))
				freed = "let go of it " + ms(l.at().Sub(open.at())) + " after it began"
			} else if _, ok := s.findLog(legacyOpened(key)); ok {
				t.Errorf("the %s server still holds the HEAD's handler %s after the HEAD was answered (no close line for it)",
					kind, notice.bound+slack)
				freed = "still held its handler"
			}

			get := legacyFirstEvent(client, g.url+s.eventsPath+"?k="+legacyKey("after-head"), 3*time.Second)
			if get.err != nil || get.status != http.StatusOK || !strings.Contains(get.body, "data: ") {
				t.Errorf("after the HEAD, a GET of the stream through the gateway got %d %q (%v) within 3s, want its first event",
					get.status, get.body, get.err)
			}
			hello := legacyDo(client, http.MethodGet, g.url+s.helloPath, nil, 3*time.Second)
			if hello.err != nil || hello.status != http.StatusOK {
				t.Errorf("after the HEAD, %s through the gateway answered %d, %v", s.helloPath, hello.status, hello.err)
			}
			next := "came after " + ms(get.took)
			if get.err != nil {
				next = "did not come within 3 s"
			}
			rec.figure("HEAD %s through the gateway: answered %d in %s, the server %s; the next GET's first event %s",
				s.eventsPath, head.status, ms(head.took), freed, next)
		})
	}
}

// legacyPage is the page of the restart test, served by the gateway
// itself: an EventSource on the URL in its es parameter, every open,
// error and message recorded in window.legacyLog.
const legacyPage = `<!doctype html>
<html><head><meta charset="utf-8"><title>legacy server restart</title></head>
<body><p>EventSource through a restart of the server</p>
<script>
const log = [];
window.legacyLog = log;
const source = new EventSource(new URLSearchParams(location.search).get("es"));
const record = (kind) => (e) => log.push({kind, data: e.data ?? "", ready: source.readyState, t: Date.now()});
source.addEventListener("open", record("open"));
source.addEventListener("error", record("error"));
source.addEventListener("message", record("event"));
</script></body></html>
`

// legacyPageEntry is one entry of the page's log.
type legacyPageEntry struct {
	Kind  string  `json:"kind"`
	Data  string  `json:"data"`
	Ready int     `json:"ready"` // the EventSource's readyState: 0 connecting, 1 open, 2 closed
	T     float64 `json:"t"`     // Date.now()
}

// sent is when the server wrote the entry's event (zero for no event).
func (e legacyPageEntry) sent() time.Time {
	var d struct {
		T float64 `json:"t"`
	}
	if e.Kind != "event" || json.Unmarshal([]byte(e.Data), &d) != nil {
		return time.Time{}
	}
	return legacyUnixMilli(d.T)
}

// TestLegacyRestart restarts each server under a subscribed Chromium tab.
// The browser notices the stream's end and reconnects; while the server is
// down the gateway must answer the reconnect with what keeps EventSource
// reconnecting (a 200 text/event-stream that carries retry: and ends:
// reverse_proxy's 502 fails the EventSource for good); once the server is
// back the page must be subscribed again and get its events.
func TestLegacyRestart(t *testing.T) {
	for _, kind := range []legacyKind{legacyExpress, legacyPHP, legacyFlask} {
		t.Run(string(kind), func(t *testing.T) {
			rec := legacyRecord(t, "legacy-"+string(kind))
			browser := headless.Chromium(t)
			s := startLegacy(t, kind, legacyOptions{workers: 2})
			g := startLegacyGateway(t, s, legacyRoute{sse: legacyStreamSSE + "\nretry 500ms", page: legacyPage})
			client := newHTTPClient(t, nil)

			allocCtx, cancelAlloc := headless.Allocator(browser, t.TempDir())
			defer cancelAlloc()
			// Bounds every browser step (see TestBrowserEventSource).
			defer time.AfterFunc(90*time.Second, cancelAlloc).Stop()
			tab, closeTab := chromedp.NewContext(allocCtx)
			defer closeTab()
			// The first action starts the browser, tied to tab's context,
			// not to a context with a deadline.
			if err := chromedp.Do(tab); err != nil {
				t.Fatalf("starting %s: %v", browser, err)
			}
			es := s.eventsPath + "?k=" + legacyKey("restart")
			navCtx, cancelNav := context.WithTimeout(tab, 30*time.Second)
			err := chromedp.Do(navCtx, chromedp.Navigate(g.url+"/legacy-page.html?es="+url.QueryEscape(es)))
			cancelNav()
			if err != nil {
				t.Fatalf("opening the page in %s: %v", browser, err)
			}
			// waitPage polls the page's log until cond holds.
			waitPage := func(what string, within time.Duration, cond func([]legacyPageEntry) bool) []legacyPageEntry {
				t.Helper()
				deadline := time.Now().Add(within)
				for {
					raw, err := chromedp.Run(tab, chromedp.Evaluate[string](`JSON.stringify(window.legacyLog || [])`))
					if err != nil {
						t.Fatalf("reading the page's log: %v", err)
					}
					var entries []legacyPageEntry
					if err := json.Unmarshal([]byte(raw), &entries); err != nil {
						t.Fatalf("the page's log %q: %v", raw, err)
					}
					if cond(entries) {
						return entries
					}
					if time.Now().After(deadline) {
						t.Fatalf("the page did not show %s within %s; its log: %+v", what, within, entries)
					}
					time.Sleep(50 * time.Millisecond)
				}
			}
			count := func(entries []legacyPageEntry, kind string, after time.Time) int {
				n := 0
				for _, e := range entries {
					if e.Kind == kind && !legacyUnixMilli(e.T).Before(after) {
						n++
					}
				}
				return n
			}
			closedForGood := func(entries []legacyPageEntry) bool {
				for _, e := range entries {
					if e.Ready == 2 {
						return true
					}
				}
				return false
			}

			waitPage("3 events", 10*time.Second, func(es []legacyPageEntry) bool { return count(es, "event", time.Time{}) >= 3 })
			stoppedAt := time.Now()
			s.stop(t)

			// What the gateway answers a stream request while the server
			// is down, as any client sees it.
			probe := legacyDo(client, http.MethodGet, g.url+s.eventsPath+"?k="+legacyKey("down"), legacyStreamHeader(), 3*time.Second)
			if probe.err != nil || probe.status != http.StatusOK || !strings.HasPrefix(probe.ctype, "text/event-stream") ||
				!strings.Contains(probe.body, "retry:") {
				t.Errorf("while the server is down the gateway answers a stream request with %d %q %q (%v); "+
					"EventSource fails for good on anything but a 200 text/event-stream, so it must be one that carries retry: and ends",
					probe.status, probe.ctype, probe.body, probe.err)
			}
			// The browser must have tried again while the server was down:
			// its first error is the stream's end, the next one a
			// reconnect that did not reach the server (or was the last).
			waitPage("a reconnect while the server is down", 15*time.Second, func(es []legacyPageEntry) bool {
				return count(es, "error", stoppedAt) >= 2 || closedForGood(es)
			})
			restartedAt := time.Now()
			s.start(t)
			entries := waitPage("an event written after the restart", 20*time.Second, func(es []legacyPageEntry) bool {
				if closedForGood(es) {
					return true
				}
				for _, e := range es {
					if e.sent().After(restartedAt) {
						return true
					}
				}
				return false
			})
			if closedForGood(entries) {
				t.Fatalf("the page's EventSource closed for good (readyState CLOSED) during the restart; its log: %+v", entries)
			}
			var lastBefore, firstAfter time.Time
			for _, e := range entries {
				if e.Kind != "event" {
					continue
				}
				arrived := legacyUnixMilli(e.T)
				if arrived.Before(stoppedAt) {
					lastBefore = arrived
				} else if firstAfter.IsZero() && e.sent().After(restartedAt) {
					firstAfter = arrived
				}
			}
			rec.figure("restart (server down %s): the page went %s without events and reconnected %d times (%d errors), never closed",
				ms(restartedAt.Sub(stoppedAt)), ms(firstAfter.Sub(lastBefore)),
				count(entries, "open", stoppedAt), count(entries, "error", stoppedAt))
		})
	}
}

// TestLegacyBufferingWarning streams from the PHP script that forgets
// ob_flush (its events wait in the 4 KiB output buffer) and expects the
// gateway to warn that the upstream buffers.
func TestLegacyBufferingWarning(t *testing.T) {
	t.Run("php", func(t *testing.T) {
		rec := legacyRecord(t, "legacy-php")
		s := startLegacy(t, legacyPHP, legacyOptions{pad: 500})
		g := startLegacyGateway(t, s, legacyRoute{sse: legacyStreamSSE})
		client := newHTTPClient(t, nil)
		start := time.Now()
		st := openStream(t, client, g.url+s.noObFlushPath+"?k="+legacyKey("warn"), legacyStreamHeader())
		waitEvents(t, st, 16, 20*time.Second)
		var warning map[string]any
		deadline := time.Now().Add(5 * time.Second)
		for warning == nil && time.Now().Before(deadline) {
			if w := g.bufferingWarnings(t); len(w) > 0 {
				warning = w[0]
			} else {
				time.Sleep(50 * time.Millisecond)
			}
		}
		if warning == nil {
			t.Fatalf("two 4 KiB bursts came through and the gateway logged no warning about a buffering upstream (level warn, message mentioning buffering)")
		}
		rec.figure("buffering warning logged %s after the stream began: %q", ms(time.Since(start)), warning["msg"])
	})
}

// legacyMaxStreamRate is the max_stream_rate option of
// TestLegacyMaxStreamRate: at most one new stream per second, which with
// an event every 500 ms is one per how long a sync worker may stay taken
// after its client left (two events).
const legacyMaxStreamRate = "max_stream_rate 1"

// TestLegacyMaxStreamRate repeats the churn of TestLegacyFlaskWorkers
// (clients that open a stream and drop it at its first event) with
// max_stream_rate on top of max_streams 1: gunicorn's other route must
// keep answering at once, because abandoned streams can no longer take
// both workers before they notice their client left.
func TestLegacyMaxStreamRate(t *testing.T) {
	t.Run("flask", func(t *testing.T) {
		rec := legacyRecord(t, "legacy-flask")
		s := startLegacy(t, legacyFlask, legacyOptions{workers: 2, interval: 500 * time.Millisecond})
		g := startLegacyGateway(t, s, legacyRoute{sse: legacyStreamSSE + "\nmax_streams 1\n" + legacyMaxStreamRate})
		client := newHTTPClient(t, nil)
		c := legacyChurn(t, client, g, s, 4*time.Second)
		if c.admitted < 2 {
			t.Errorf("only %d streams were admitted in 4 s with %s", c.admitted, legacyMaxStreamRate)
		}
		if c.helloTimeouts > 0 || c.helloMax > 250*time.Millisecond {
			t.Errorf("with %s, %s answered in up to %s (%d of %d probes got no answer within 2 s), want at most 250 ms",
				legacyMaxStreamRate, s.helloPath, c.helloMax, c.helloTimeouts, c.probes)
		}
		rec.figure("with max_streams 1 and %s, the same churn (4 s): %d admitted, %d refused; %s answered in up to %s",
			legacyMaxStreamRate, c.admitted, c.refused, s.helloPath, ms(c.helloMax))
	})
}
