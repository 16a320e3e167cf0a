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

// browserPage is the page the browser opens, served by the upstream
// through the gateway (it passes through untouched, being no stream). It
// opens an EventSource on the URL in its es parameter and records every
// open, error, message, tick and close event in window.proofLog.
const browserPage = `<!doctype html>
<html><head><meta charset="utf-8"><title>caddy-sse proof</title></head>
<body><p>EventSource proof page</p>
<script>
const log = [];
window.proofLog = log;
const source = new EventSource(new URLSearchParams(location.search).get("es"));
const record = (kind) => (e) => log.push({
  kind, type: e.type, data: e.data ?? "", id: e.lastEventId ?? "", ready: source.readyState, t: performance.now(),
});
source.addEventListener("open", record("open"));
source.addEventListener("error", record("error"));
source.addEventListener("message", record("event"));
source.addEventListener("tick", record("event"));
source.addEventListener("` + clientCloseEvent + `", record("close"));
</script></body></html>
`

// TestBrowserEventSource opens an EventSource through the gateway in
// headless Chromium and checks what a page sees: every event in order with
// its type, data and lastEventId, nothing from heartbeats, the close event
// at max_lifetime, a reconnect by the browser itself after the retry delay
// with Last-Event-ID reaching the upstream; and that closing the page makes
// the upstream see its connection end within a second.
func TestBrowserEventSource(t *testing.T) {
	rec := report.start(t, "browser")
	browser := headless.Chromium(t)

	up := newUpstream(t)
	up.handle("script", scriptBehavior)
	up.handle("page", func(w http.ResponseWriter, r *http.Request, req *upstreamRequest) {
		w.Header().Set("Content-Type", "text/html; charset=utf-8")
		_, _ = w.Write([]byte(browserPage))
	})
	g := startGateway(t, up, gatewayConfig{profiles: map[string]profile{"browser": clientProfile}})

	allocCtx, cancelAlloc := headless.Allocator(browser, t.TempDir())
	defer cancelAlloc()
	// Every browser step is bounded by this on top of its own deadline. It
	// cannot be a deadline of the contexts below: chromedp ties a browser
	// and a tab to the context of their first action and closes them
	// when it ends.
	defer time.AfterFunc(90*time.Second, cancelAlloc).Stop()
	browserCtx, cancelBrowser := chromedp.NewContext(allocCtx)
	defer cancelBrowser()
	// The first context starts the browser with its first tab; pages then
	// get tabs of their own, which can be closed with the browser running.
	if err := chromedp.Do(browserCtx); err != nil {
		t.Fatalf("starting %s: %v", browser, err)
	}

	// openPage opens the proof page in a new tab with an EventSource on key.
	openPage := func(key string) (tab context.Context, closeTab context.CancelFunc) {
		t.Helper()
		tab, closeTab = chromedp.NewContext(browserCtx)
		if err := chromedp.Do(tab); err != nil {
			closeTab()
			t.Fatalf("opening a tab: %v", err)
		}
		es := "/p/browser/script?k=" + key
		pageURL := g.httpURL + "/p/browser/page?es=" + url.QueryEscape(es)
		navCtx, cancel := context.WithTimeout(tab, 30*time.Second)
		defer cancel()
		if err := chromedp.Do(navCtx, chromedp.Navigate(pageURL)); err != nil {
			closeTab()
			t.Fatalf("opening %s: %v", pageURL, err)
		}
		return tab, closeTab
	}
	// waitLog polls the page's log until cond holds.
	waitLog := func(tab context.Context, what string, within time.Duration, cond func([]clientEntry) bool) []clientEntry {
		t.Helper()
		deadline := time.Now().Add(within)
		for {
			raw, err := chromedp.Run(tab, chromedp.Evaluate[string](`JSON.stringify(window.proofLog || [])`))
			if err != nil {
				t.Fatalf("reading the page's log: %v", err)
			}
			var entries []clientEntry
			if err := json.Unmarshal([]byte(raw), &entries); err != nil {
				t.Fatalf("the page's log %q: %v", raw, err)
			}
			if cond(entries) {
				return entries
			}
			if time.Now().After(deadline) {
				t.Fatalf("the page did not show %s within %s; its log: %+v", what, within, entries)
			}
			time.Sleep(25 * time.Millisecond)
		}
	}
	count := func(entries []clientEntry, kind string) int {
		n := 0
		for _, e := range entries {
			if e.Kind == kind {
				n++
			}
		}
		return n
	}

	key := up.key("browser")
	tab, closeTab := openPage(key)
	defer closeTab()
	waitLog(tab, "the script's events", 5*time.Second, func(es []clientEntry) bool { return count(es, "event") >= 4 })
	entries := waitLog(tab, "the close event, a reconnect and the resumed event", clientMaxLifetime+clientRetry+2*slack,
		func(es []clientEntry) bool {
			last := len(es) - 1
			return count(es, "open") >= 2 && last >= 0 && es[last].Kind == "event" && strings.HasPrefix(es[last].Data, "resumed")
		})
	checkScriptedSession(t, rec, g, up, key, entries, false)
	if last := entries[len(entries)-1]; last.Data != "resumed after 3" || last.ID != "4" {
		t.Errorf("after the reconnect the page got %+v, want the upstream's answer to Last-Event-ID 3", last)
	}

	// Closing the page: the upstream must see its connection end.
	closePage := func(closeTab context.CancelFunc, req *upstreamRequest) {
		t.Helper()
		closedAt := time.Now()
		closeTab()
		d := req.waitEnded(t, teardownBound+slack).Sub(closedAt)
		if d > teardownBound {
			t.Errorf("the upstream saw its connection end %s after the page was closed, want at most %s", d, teardownBound)
		}
		rec.teardown(d)
	}
	closePage(closeTab, up.request(t, key, 2, time.Second))
	for range 4 {
		key := up.key("browser")
		tab, closeTab := openPage(key)
		waitLog(tab, "the script's events", 5*time.Second, func(es []clientEntry) bool { return count(es, "event") >= 4 })
		closePage(closeTab, up.request(t, key, 1, time.Second))
	}
	up.waitQuiet(t, 5*time.Second)
}
