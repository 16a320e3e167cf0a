package proof

import (
	"context"
	"fmt"
	"net/http"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/chromedp/chromedp"

	"github.com/ssegateway/caddy-sse/internal/headless"
)

// refusalRetry is the retry option of the browser refusal test's routes:
// a refusal's hint is drawn between it and twice it.
const refusalRetry = 500 * time.Millisecond

// TestBrowserRefusedThenReconnects opens an EventSource in headless
// Chromium on a route whose only stream slot (max_streams 1) another client
// holds. With the default refusal (200 text/event-stream carrying `retry:`
// and the close event, then the end), the page's EventSource must stay
// CONNECTING, come back by itself every 0.5–1 s, and, once the other
// client leaves, connect and receive the upstream's events, without the
// page being reloaded. With `refuse_with status` (503) the same EventSource
// must fail for good (CLOSED) and never come back, even once the slot is
// free: the reason the browser-safe refusal is the default.
func TestBrowserRefusedThenReconnects(t *testing.T) {
	rec := report.start(t, "browser-refused")
	browser := headless.Chromium(t)
	up := newUpstream(t)
	up.handle("script", scriptBehavior)
	up.handle("page", func(w http.ResponseWriter, r *http.Request, req *upstreamRequest) {
		w.Header().Set("Content-Type", "text/html; charset=utf-8")
		_, _ = w.Write([]byte(browserPage))
	})
	opts := fmt.Sprintf("max_streams 1\nretry %s\nclose_event %s", refusalRetry, clientCloseEvent)
	g := startGateway(t, up, gatewayConfig{profiles: map[string]profile{
		"refuse":       {sse: opts},
		"refusestatus": {sse: opts + "\nrefuse_with status"},
	}})
	client := newHTTPClient(t, &http.Transport{})

	allocCtx, cancelAlloc := headless.Allocator(browser, t.TempDir())
	defer cancelAlloc()
	// Every browser step is bounded by this on top of its own deadline.
	defer time.AfterFunc(90*time.Second, cancelAlloc).Stop()
	browserCtx, cancelBrowser := chromedp.NewContext(allocCtx)
	defer cancelBrowser()
	if err := chromedp.Do(browserCtx); err != nil {
		t.Fatalf("starting %s: %v", browser, err)
	}
	// openPage opens the proof page (outside the sse routes) in a new tab,
	// with an EventSource on the route's script.
	openPage := func(t *testing.T, route, key string) (tab context.Context, closeTab context.CancelFunc) {
		t.Helper()
		tab, closeTab = chromedp.NewContext(browserCtx)
		t.Cleanup(closeTab)
		// The tab belongs to the context of its first action: this one,
		// not the navigation's deadline below.
		if err := chromedp.Do(tab); err != nil {
			t.Fatalf("opening a tab: %v", err)
		}
		es := "/p/" + route + "/script?k=" + key
		pageURL := g.httpURL + "/page?k=" + pageKey(key) + "&es=" + url.QueryEscape(es)
		navCtx, cancel := context.WithTimeout(tab, 30*time.Second)
		defer cancel()
		if err := chromedp.Do(navCtx, chromedp.Navigate(pageURL)); err != nil {
			t.Fatalf("opening %s: %v", pageURL, err)
		}
		return tab, closeTab
	}
	waitLog := func(tab context.Context, what string, within time.Duration, cond func([]clientEntry) bool) []clientEntry {
		t.Helper()
		var entries []clientEntry
		pollPage(t, tab, "window.proofLog || []", &entries, what, within, func() bool { return cond(entries) })
		return entries
	}
	kinds := func(entries []clientEntry, kind string) []clientEntry {
		var found []clientEntry
		for _, e := range entries {
			if e.Kind == kind {
				found = append(found, e)
			}
		}
		return found
	}
	hold := func(route string) (*clientStream, *upstreamRequest) {
		t.Helper()
		key := up.key("holder")
		s := openStream(t, client, g.httpURL+"/p/"+route+"/push?k="+key, http.Header{"Accept": {"text/event-stream"}})
		req := up.request(t, key, 1, 5*time.Second)
		req.send(t, "data: held\n\n")
		s.waitContains(t, "data: held\n\n", 0, slack)
		return s, req
	}
	refusalsLogged := func(key string) int {
		n := 0
		for _, line := range g.sseLog(t) {
			l := string(line)
			if strings.Contains(l, `"stream refused"`) && strings.Contains(l, "k="+key+`"`) {
				n++
			}
		}
		return n
	}

	t.Run("stream refusal", func(t *testing.T) {
		holder, holderReq := hold("refuse")
		key := up.key("refused")
		tab, closeTab := openPage(t, "refuse", key)
		// Refused three times: each refusal is a stream that opens, carries
		// the close event with the reason, and ends; the EventSource stays
		// CONNECTING and comes back after the hint.
		entries := waitLog(tab, "three refusals", 3*(2*refusalRetry)+slack, func(es []clientEntry) bool {
			return len(kinds(es, "error")) >= 3
		})
		errs := kinds(entries, "error")
		for _, e := range errs {
			if e.Ready != 0 {
				t.Errorf("after a refusal the EventSource's readyState was %d, want 0 (CONNECTING)", e.Ready)
			}
		}
		for _, e := range kinds(entries, "close") {
			if e.Data != "max_streams" {
				t.Errorf("the refusal's close event carried %q, want max_streams", e.Data)
			}
		}
		if n := len(kinds(entries, "close")); n < 2 {
			t.Errorf("the page's close-event listener saw %d refusals, want each refusal's reason", n)
		}
		var gaps []time.Duration
		for i := 1; i < len(errs); i++ {
			gap := time.Duration((errs[i].T - errs[i-1].T) * float64(time.Millisecond))
			gaps = append(gaps, gap)
			if gap < refusalRetry || gap > 2*refusalRetry+300*time.Millisecond {
				t.Errorf("the EventSource came back %s after a refusal, want between %s and %s (the hint) + 300ms", gap, refusalRetry, 2*refusalRetry)
			}
		}
		if n := up.requestsWithKey(key); n != 0 {
			t.Errorf("%d refused requests reached the upstream", n)
		}

		// The slot frees: the EventSource connects by itself.
		freedAt := holder.hangUp()
		holderReq.waitEnded(t, teardownBound+slack)
		req := up.request(t, key, 1, 2*refusalRetry+slack)
		reconnect := req.Started.Sub(freedAt)
		if reconnect > 2*refusalRetry+300*time.Millisecond {
			t.Errorf("the EventSource reached the upstream %s after the slot was freed, want at most the largest hint %s + 300ms", reconnect, 2*refusalRetry)
		}
		entries = waitLog(tab, "the upstream's events", 5*time.Second, func(es []clientEntry) bool {
			evs := kinds(es, "event")
			return len(evs) >= 4
		})
		if first := kinds(entries, "event")[0]; first.Data != "first" || first.ID != "1" {
			t.Errorf("the first event the page got is %+v, want the upstream's first", first)
		}
		// Same document all along: one navigation, and the log kept from
		// the refusals to the events.
		navigations, err := chromedp.Run(tab, chromedp.Evaluate[int](`performance.getEntriesByType("navigation").length`))
		if err != nil {
			t.Fatal(err)
		}
		if navigations != 1 {
			t.Errorf("the page was loaded %d times, want once", navigations)
		}
		refused := refusalsLogged(key)
		if refused < len(errs) {
			t.Errorf("the gateway logged %d refusals, the page saw %d", refused, len(errs))
		}
		// Closing the page releases the upstream.
		closedAt := time.Now()
		closeTab()
		if d := req.waitEnded(t, teardownBound+slack).Sub(closedAt); d > teardownBound {
			t.Errorf("the upstream saw its request end %s after the page was closed, want at most %s", d, teardownBound)
		}
		figure(t, rec, "refused %d times (retry %s): the EventSource stayed CONNECTING and came back %s–%s after each refusal; connected by itself %s after the slot was freed, and got the upstream's events, in the same page load",
			refused, refusalRetry, ms(slicesMin(gaps)), ms(slicesMax(gaps)), ms(reconnect))
	})

	t.Run("refuse_with status", func(t *testing.T) {
		holder, holderReq := hold("refusestatus")
		key := up.key("failed")
		tab, _ := openPage(t, "refusestatus", key)
		entries := waitLog(tab, "the EventSource to fail", 5*time.Second, func(es []clientEntry) bool {
			return len(kinds(es, "error")) >= 1
		})
		if e := kinds(entries, "error")[0]; e.Ready != 2 {
			t.Errorf("after a 503 the EventSource's readyState was %d, want 2 (CLOSED)", e.Ready)
		}
		holder.hangUp()
		holderReq.waitEnded(t, teardownBound+slack)
		// A failed EventSource never comes back. Chromium's own
		// reconnection time is 3 s: watch longer than that.
		watch := 4 * time.Second
		<-time.After(watch)
		ready, err := chromedp.Run(tab, chromedp.Evaluate[int](`source.readyState`))
		if err != nil {
			t.Fatal(err)
		}
		entries = waitLog(tab, "the log", time.Second, func([]clientEntry) bool { return true })
		if ready != 2 || len(kinds(entries, "open")) != 0 || len(kinds(entries, "error")) != 1 {
			t.Errorf("with refuse_with status: readyState %d, %d opens, %d errors; want CLOSED after one error, never opened", ready, len(kinds(entries, "open")), len(kinds(entries, "error")))
		}
		if n := refusalsLogged(key); n != 1 {
			t.Errorf("the gateway saw %d requests of the failed EventSource, want 1", n)
		}
		if n := up.requestsWithKey(key); n != 0 {
			t.Errorf("the failed EventSource reached the upstream %d times", n)
		}
		figure(t, rec, "with `refuse_with status` (503) the EventSource ended CLOSED after one attempt and made no other in the %s after the slot was freed", watch)
	})
	up.waitQuiet(t, 5*time.Second)
}
