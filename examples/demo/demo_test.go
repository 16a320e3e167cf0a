package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"image/png"
	"io"
	"net/http"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/chromedp/chromedp"

	"github.com/ssegateway/caddy-sse/internal/headless"
)

var screenshotPath = flag.String("screenshot", "", "also write the browser test's screenshot of the demo page to this `file` (docs/demo.png is made with -screenshot=../../docs/demo.png)")

// The demo's Caddyfile decides these; the waits below are derived from them.
const (
	heartbeatInterval = 2 * time.Second
	idleTimeout       = 6 * time.Second
	retryMillis       = "1000"
	closeEventType    = "gateway-close"
	// sharedLinger is how long the shared route keeps its upstream
	// connection after the last client left.
	sharedLinger = 2 * time.Second
	// slack absorbs scheduling delays on a busy machine; every wait is
	// still bounded.
	slack = 3 * time.Second
)

// TestDemoPageAndStream starts the demo on free ports and checks, with a
// plain HTTP client going through the gateway, that the page is served and
// that the legacy stream comes out well-behaved: proper headers, events as
// they are sent, a heartbeat once the upstream goes quiet, then the idle
// close sequence, and the upstream connection gone right after.
func TestDemoPageAndStream(t *testing.T) {
	demo := startDemo(t)

	resp, body := get(t, demo.pageURL)
	if resp.StatusCode != http.StatusOK || !strings.HasPrefix(resp.Header.Get("Content-Type"), "text/html") {
		t.Fatalf("page: status %d, Content-Type %q", resp.StatusCode, resp.Header.Get("Content-Type"))
	}
	for _, want := range []string{"new EventSource(", `addEventListener("` + closeEventType + `"`, "/demo/stats"} {
		if !strings.Contains(body, want) {
			t.Errorf("page does not contain %q", want)
		}
	}
	if open := demo.upstreamOpen(t); open != 0 {
		t.Fatalf("upstream has %d open connections before any stream", open)
	}

	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, demo.pageURL+"events?client=test", nil)
	if err != nil {
		t.Fatal(err)
	}
	// A client that reconnects after event 41. The legacy upstream must
	// receive the header through the gateway, and ignores it.
	req.Header.Set("Last-Event-ID", "41")
	streamResp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatalf("opening the stream: %v", err)
	}
	defer streamResp.Body.Close()
	if streamResp.StatusCode != http.StatusOK {
		t.Fatalf("stream status %d", streamResp.StatusCode)
	}
	for header, want := range map[string]string{
		"Content-Type":      "text/event-stream",
		"Cache-Control":     "no-cache",
		"X-Accel-Buffering": "no",
	} {
		if got := streamResp.Header.Get(header); got != want {
			t.Errorf("stream header %s = %q, want %q", header, got, want)
		}
	}
	if streamResp.ContentLength != -1 {
		t.Errorf("stream has Content-Length %d", streamResp.ContentLength)
	}
	lines := readLines(streamResp.Body)

	// Events arrive as the upstream sends them, one per second.
	first := lines.waitFor(t, "the first event's data", 1*time.Second+slack, func(l string) bool { return strings.HasPrefix(l, "data: ") })
	var tick tickEvent
	if err := json.Unmarshal([]byte(strings.TrimPrefix(first, "data: ")), &tick); err != nil {
		t.Fatalf("first event data %q: %v", first, err)
	}
	if tick.N != 1 || tick.LastEventID != "41" || tick.Honoured {
		t.Errorf("first event %+v: want n=1 from a legacy upstream that received Last-Event-ID 41 and ignored it", tick)
	}
	lines.waitFor(t, "the second event's id", 1*time.Second+slack, func(l string) bool { return l == "id: 2" })
	if open := demo.upstreamOpen(t); open != 1 {
		t.Errorf("upstream reports %d open connections during one stream, want 1", open)
	}

	// A quiet upstream: the gateway keeps the connection alive with
	// comments, then ends the stream after idle_timeout with its close
	// sequence: retry hint, close event with the reason, end of body.
	postQuiet(t, demo.pageURL, "10s")
	lines.waitFor(t, "a heartbeat comment", heartbeatInterval+slack, func(l string) bool { return strings.HasPrefix(l, ":") })
	lines.waitFor(t, "the retry hint", idleTimeout+slack, func(l string) bool { return l == "retry: "+retryMillis })
	lines.expectNext(t, "event: "+closeEventType, slack)
	lines.expectNext(t, "data: idle_timeout", slack)
	lines.expectNext(t, "", slack)
	lines.expectEnd(t, slack)

	// The gateway tore the upstream connection down with the stream.
	demo.waitUpstreamOpen(t, 0, 2*time.Second)
	if log := demo.out.String(); !strings.Contains(log, "noticed it is gone") {
		t.Errorf("the upstream did not log noticing the closed connection:\n%s", log)
	}
}

// TestDemoSharedStream checks the shared route over plain HTTP: two
// subscribers share one upstream connection; an upstream restart reaches
// neither (both keep their responses and get every event once, in order);
// a subscriber that comes back with Last-Event-ID gets what it missed.
func TestDemoSharedStream(t *testing.T) {
	demo := startDemo(t)

	a := demo.subscribe(t, "", "")
	a.next(t, 1*time.Second+slack)
	b := demo.subscribe(t, "", "")
	a.next(t, 1*time.Second+slack)
	b.next(t, 1*time.Second+slack)
	if stats := demo.stats(t); stats.OpenShared != 1 || stats.TotalOpenedShared != 1 {
		t.Fatalf("with two subscribers the upstream has %d shared connections open, %d opened in all; want 1 and 1", stats.OpenShared, stats.TotalOpenedShared)
	}

	// The restart drops the upstream connection and refuses for 2s; the
	// gateway asks again until it is back. Both subscribers wait for three
	// events from the new upstream connection.
	post(t, demo.pageURL+"demo/restart?for=2s")
	firstConn := a.events[0].tick.Conn
	for _, sub := range []*sharedSubscriber{a, b} {
		for fresh := 0; fresh < 3; {
			if sub.next(t, 2*time.Second+4*time.Second+slack).tick.Conn != firstConn {
				fresh++
			}
		}
	}
	if stats := demo.stats(t); stats.OpenShared != 1 || stats.TotalOpenedShared != 2 {
		t.Errorf("after the restart the upstream has %d shared connections open, %d opened in all; want 1 and 2", stats.OpenShared, stats.TotalOpenedShared)
	}
	for _, sub := range []*sharedSubscriber{a, b} {
		checkConsecutive(t, sub.name, sub.events)
	}
	// b joined later; from its first event on, both got the same events.
	checkSame(t, "b", b.events, a.events)

	// b leaves; a gets three more events; b comes back with the id of its
	// last event and gets the three it missed, then goes on live.
	b.close()
	missedFrom := len(a.events)
	for range 3 {
		a.next(t, 1*time.Second+slack)
	}
	missed := a.events[missedFrom:]
	c := demo.subscribe(t, "c", b.events[len(b.events)-1].id)
	if got := c.resp.Header.Get("X-SSE-Replay"); got == "miss" {
		t.Fatalf("the reconnect's Last-Event-ID was not among the kept events (X-SSE-Replay: %s)", got)
	}
	for range len(missed) + 1 {
		c.next(t, 1*time.Second+slack)
	}
	checkSame(t, "c", c.events[:len(missed)], missed)
	checkConsecutive(t, "b then c", append(b.events, c.events...))
	if stats := demo.stats(t); stats.TotalOpenedShared != 2 {
		t.Errorf("the upstream opened %d shared connections in all, want 2", stats.TotalOpenedShared)
	}
}

// sharedEvent is one event of the shared route: the gateway's id and the
// upstream's data.
type sharedEvent struct {
	id   string
	tick tickEvent
}

// sharedSubscriber is a client of /shared/events.
type sharedSubscriber struct {
	name   string
	resp   *http.Response
	lines  *lineReader
	events []sharedEvent
	close  context.CancelFunc
}

// subscribe opens /shared/events, with Last-Event-ID if lastEventID is set.
func (d *runningDemo) subscribe(t *testing.T, name, lastEventID string) *sharedSubscriber {
	t.Helper()
	if name == "" {
		name = string(rune('a' + d.subscribers))
	}
	d.subscribers++
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	t.Cleanup(cancel)
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, d.pageURL+"shared/events", nil)
	if err != nil {
		t.Fatal(err)
	}
	// A shared stream is for requests that ask for one, as EventSource does.
	req.Header.Set("Accept", "text/event-stream")
	if lastEventID != "" {
		req.Header.Set("Last-Event-ID", lastEventID)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatalf("%s: opening the shared stream: %v", name, err)
	}
	if resp.StatusCode != http.StatusOK || resp.Header.Get("Content-Type") != "text/event-stream" {
		t.Fatalf("%s: shared stream: status %d, Content-Type %q", name, resp.StatusCode, resp.Header.Get("Content-Type"))
	}
	return &sharedSubscriber{name: name, resp: resp, lines: readLines(resp.Body), close: cancel}
}

// next reads the subscriber's next event (heartbeats are skipped); the
// stream must not end.
func (s *sharedSubscriber) next(t *testing.T, within time.Duration) sharedEvent {
	t.Helper()
	var ev sharedEvent
	s.lines.waitFor(t, s.name+"'s next event", within, func(l string) bool {
		switch {
		case strings.HasPrefix(l, "id: "):
			ev.id = strings.TrimPrefix(l, "id: ")
		case strings.HasPrefix(l, "data: "):
			if err := json.Unmarshal([]byte(strings.TrimPrefix(l, "data: ")), &ev.tick); err != nil {
				t.Fatalf("%s: event data %q: %v", s.name, l, err)
			}
		case strings.HasPrefix(l, "event: "), strings.HasPrefix(l, "retry: "):
			t.Fatalf("%s: got %q: the gateway is closing the shared stream", s.name, l)
		}
		return l == "" && ev.id != ""
	})
	s.events = append(s.events, ev)
	return ev
}

// checkConsecutive checks that events are the gateway's ids in sequence,
// without gap or repeat, and that each upstream connection's events are
// there from the first one the subscriber saw, without gap or repeat.
func checkConsecutive(t *testing.T, name string, events []sharedEvent) {
	t.Helper()
	ids := make([]string, len(events))
	for i, ev := range events {
		ids[i] = ev.id
	}
	checkIDsConsecutive(t, name, ids)
	for i := 1; i < len(events); i++ {
		prev, cur := events[i-1], events[i]
		if cur.tick.Conn == prev.tick.Conn && cur.tick.N != prev.tick.N+1 {
			t.Errorf("%s: upstream connection #%d's event %d follows its event %d", name, cur.tick.Conn, cur.tick.N, prev.tick.N)
		}
		if cur.tick.Conn != prev.tick.Conn && cur.tick.N != 1 {
			t.Errorf("%s: the first event of upstream connection #%d is its number %d, want 1", name, cur.tick.Conn, cur.tick.N)
		}
	}
}

// checkSame checks that got are the events of want from got's first event
// on.
func checkSame(t *testing.T, name string, got, want []sharedEvent) {
	t.Helper()
	for i, ev := range want {
		if ev.id == got[0].id {
			want = want[i:]
			break
		}
	}
	for i := range min(len(got), len(want)) {
		if got[i] != want[i] {
			t.Fatalf("%s's event %d is %+v, want %+v", name, i, got[i], want[i])
		}
	}
}

// splitID splits a gateway-assigned id, prefix-number.
func splitID(t *testing.T, id string) (string, int) {
	t.Helper()
	i := strings.LastIndexByte(id, '-')
	n, ok := atoi(id[i+1:])
	if i < 0 || !ok {
		t.Fatalf("event id %q is not one the gateway assigned", id)
	}
	return id[:i], n
}

// TestDemoPageInHeadlessChromium drives the page in headless Chromium: events
// render, the raw tap counts heartbeats, the gateway's idle close shows with
// its reason, the browser reconnects and the upstream receives its
// Last-Event-ID; a screenshot is taken, and closing the tab brings the
// upstream's open connections back to 0.
func TestDemoPageInHeadlessChromium(t *testing.T) {
	browser := headless.Chromium(t)
	demo := startDemo(t)

	allocCtx, cancelAlloc := headless.Allocator(browser, t.TempDir(), chromedp.WindowSize(1200, 720))
	defer cancelAlloc()
	browserCtx, cancelBrowser := chromedp.NewContext(allocCtx)
	defer cancelBrowser()
	// Start the browser with its first tab, then open the page in a tab of
	// its own, so that closing it later leaves the browser running.
	if err := chromedp.Do(browserCtx); err != nil {
		t.Fatalf("starting %s: %v", browser, err)
	}
	tabCtx, closeTab := chromedp.NewContext(browserCtx)
	defer closeTab()
	if err := chromedp.Do(tabCtx); err != nil {
		t.Fatalf("opening a tab: %v", err)
	}
	// Every step below is bounded by this deadline on top of its own.
	tabCtx, cancelTimeout := context.WithTimeout(tabCtx, 90*time.Second)
	defer cancelTimeout()

	if err := chromedp.Do(tabCtx, chromedp.Navigate(demo.pageURL)); err != nil {
		t.Fatalf("opening %s: %v", demo.pageURL, err)
	}
	// The EventSource and the raw tap each hold one upstream connection.
	waitForPage(t, tabCtx, "two events and two upstream connections", 2*time.Second+slack, func(s pageState) bool {
		return s.Events >= 2 && s.UpstreamOpen != nil && *s.UpstreamOpen == 2
	})

	if err := chromedp.Do(tabCtx, chromedp.Click(chromedp.ID("silence"))); err != nil {
		t.Fatal(err)
	}
	closed := waitForPage(t, tabCtx, "a heartbeat and an idle_timeout close", idleTimeout+slack, func(s pageState) bool {
		return s.Heartbeats >= 1 && len(s.Closes) >= 1
	})
	if closed.Closes[0].Reason != "idle_timeout" {
		t.Errorf("the page shows a close with reason %q, want idle_timeout", closed.Closes[0].Reason)
	}
	// After the retry hint the browser reconnects with Last-Event-ID; the
	// upstream reports what it received once it sends again (10s of
	// silence in all).
	reconnected := waitForPage(t, tabCtx, "a reconnect the upstream has seen", 10*time.Second+slack, func(s pageState) bool {
		return len(s.Reconnects) >= 1
	})
	r := reconnected.Reconnects[0]
	if r.SentLastEventID == "" || r.UpstreamReceived != r.SentLastEventID || r.Honoured {
		t.Errorf("reconnect %+v: want the browser's Last-Event-ID to reach the upstream, which ignores it", r)
	}

	text, err := chromedp.Run(tabCtx, chromedp.Text(chromedp.CSS("body")))
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{
		"gateway closed the stream: idle_timeout",
		"the browser sent Last-Event-ID: " + r.SentLastEventID,
		"received Last-Event-ID: " + r.SentLastEventID + " and ignored it",
	} {
		if !strings.Contains(text, want) {
			t.Errorf("the page does not show %q", want)
		}
	}

	shot, err := chromedp.Run(tabCtx, chromedp.CaptureScreenshot())
	if err != nil {
		t.Fatalf("screenshot: %v", err)
	}
	if _, err := png.Decode(bytes.NewReader(shot)); err != nil {
		t.Fatalf("the screenshot is not a PNG: %v", err)
	}
	if *screenshotPath != "" {
		if err := os.WriteFile(*screenshotPath, shot, 0o644); err != nil {
			t.Fatal(err)
		}
		t.Logf("screenshot written to %s (%d bytes)", *screenshotPath, len(shot))
	}

	// Closing the tab closes all of its streams; the gateway must tear
	// the two of /events down at once, and the shared one after its linger.
	closeTab()
	closedAt := time.Now()
	demo.waitStats(t, "no connection on /events", 2*time.Second, func(s upstreamStats) bool { return s.Open-s.OpenShared == 0 })
	t.Logf("the upstream's open connections on /events were back to 0 %s after the tab closed", time.Since(closedAt).Round(time.Millisecond))
	demo.waitUpstreamOpen(t, 0, sharedLinger+slack)
	t.Logf("and the shared one was gone %s after the tab closed (linger %s)", time.Since(closedAt).Round(time.Millisecond), sharedLinger)
}

// TestDemoSharedSectionInHeadlessChromium drives the page's shared section:
// its two EventSources make one upstream connection; "Restart upstream"
// reaches neither (no error event, no reconnect, ids in sequence); "Close
// tab B for 5 s" brings B back with ?lastEventId= and B gets the events it
// missed.
func TestDemoSharedSectionInHeadlessChromium(t *testing.T) {
	browser := headless.Chromium(t)
	demo := startDemo(t)

	allocCtx, cancelAlloc := headless.Allocator(browser, t.TempDir(), chromedp.WindowSize(1200, 720))
	defer cancelAlloc()
	tabCtx, cancelTab := chromedp.NewContext(allocCtx)
	defer cancelTab()
	tabCtx, cancelTimeout := context.WithTimeout(tabCtx, 90*time.Second)
	defer cancelTimeout()
	if err := chromedp.Do(tabCtx, chromedp.Navigate(demo.pageURL)); err != nil {
		t.Fatalf("opening %s with %s: %v", demo.pageURL, browser, err)
	}

	before := waitForPage(t, tabCtx, "two events in both tabs, one shared upstream connection", 2*time.Second+slack, func(s pageState) bool {
		a, b := s.Shared.Tabs["A"], s.Shared.Tabs["B"]
		return len(a.IDs) >= 2 && len(b.IDs) >= 2 && s.Shared.UpstreamOpen != nil && *s.Shared.UpstreamOpen == 1
	})
	firstConn := before.Shared.Tabs["A"].Conn

	if err := chromedp.Do(tabCtx, chromedp.Click(chromedp.ID("restart"))); err != nil {
		t.Fatal(err)
	}
	// 3s of 503 and the gateway's backoff, then events from the new
	// upstream connection.
	after := waitForPage(t, tabCtx, "both tabs on the new upstream connection", 3*time.Second+4*time.Second+slack, func(s pageState) bool {
		a, b := s.Shared.Tabs["A"], s.Shared.Tabs["B"]
		return a.Conn != firstConn && b.Conn != firstConn && len(a.IDs) >= len(before.Shared.Tabs["A"].IDs)+2
	})
	if after.Shared.UpstreamOpened == nil || *after.Shared.UpstreamOpened != 2 || *after.Shared.UpstreamOpen != 1 {
		t.Errorf("after the restart the page shows %v shared upstream connections open, %v opened in all; want 1 and 2", after.Shared.UpstreamOpen, after.Shared.UpstreamOpened)
	}
	for name, tab := range after.Shared.Tabs {
		if tab.Errors != 0 || tab.Opens != 1 || tab.State != "open" {
			t.Errorf("tab %s noticed the restart: %+v", name, tab)
		}
		checkIDsConsecutive(t, "tab "+name, tab.IDs)
	}

	if err := chromedp.Do(tabCtx, chromedp.Click(chromedp.ID("reopen-b"))); err != nil {
		t.Fatal(err)
	}
	replayed := waitForPage(t, tabCtx, "tab B back with the events it missed", 5*time.Second+slack, func(s pageState) bool {
		return len(s.Shared.Replays) == 1 && s.Shared.Replays[0].Done
	})
	r := replayed.Shared.Replays[0]
	if !r.OK || len(r.Missed) < 3 {
		t.Errorf("tab B came back after %s and got %q; it missed %q (want at least 3)", r.LastEventID, r.Got, r.Missed)
	}
	checkIDsConsecutive(t, "tab B", replayed.Shared.Tabs["B"].IDs)
	text, err := chromedp.Run(tabCtx, chromedp.Text(chromedp.ID("shared")))
	if err != nil {
		t.Fatal(err)
	}
	if want := "events it missed"; !strings.Contains(text, want) {
		t.Errorf("the shared section does not show %q", want)
	}
}

// checkIDsConsecutive checks that ids are the gateway's, in sequence,
// without gap or repeat.
func checkIDsConsecutive(t *testing.T, name string, ids []string) {
	t.Helper()
	for i := 1; i < len(ids); i++ {
		prefix, prevSeq := splitID(t, ids[i-1])
		curPrefix, curSeq := splitID(t, ids[i])
		if curPrefix != prefix || curSeq != prevSeq+1 {
			t.Errorf("%s: event id %s follows %s, want the next number", name, ids[i], ids[i-1])
		}
	}
}

// runningDemo is a demo started by startDemo.
type runningDemo struct {
	pageURL     string
	out         *syncBuffer
	subscribers int
}

// startDemo runs the demo on free loopback ports until the test ends.
func startDemo(t *testing.T) *runningDemo {
	t.Helper()
	out := &syncBuffer{}
	ctx, cancel := context.WithCancel(context.Background())
	ready := make(chan string, 1)
	done := make(chan error, 1)
	cfg := config{
		Listen:        "127.0.0.1:0",
		EventInterval: time.Second,
		Out:           out,
		Ready:         func(pageURL string) { ready <- pageURL },
	}
	go func() { done <- run(ctx, cfg) }()

	t.Cleanup(func() {
		cancel()
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("run: %v", err)
			}
		case <-time.After(10 * time.Second):
			t.Errorf("run did not return within 10s of its context ending")
		}
		if t.Failed() {
			t.Logf("demo output:\n%s", out.String())
		}
	})

	select {
	case pageURL := <-ready:
		return &runningDemo{pageURL: pageURL, out: out}
	case err := <-done:
		t.Fatalf("run ended before the demo was ready: %v", err)
	case <-time.After(30 * time.Second):
		t.Fatalf("the demo was not ready within 30s")
	}
	return nil
}

func (d *runningDemo) upstreamOpen(t *testing.T) int {
	t.Helper()
	return d.stats(t).Open
}

func (d *runningDemo) stats(t *testing.T) upstreamStats {
	t.Helper()
	resp, body := get(t, d.pageURL+"demo/stats")
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("/demo/stats: status %d", resp.StatusCode)
	}
	var stats upstreamStats
	if err := json.Unmarshal([]byte(body), &stats); err != nil {
		t.Fatalf("/demo/stats: %v in %q", err, body)
	}
	return stats
}

// waitUpstreamOpen waits until the upstream reports want open connections.
func (d *runningDemo) waitUpstreamOpen(t *testing.T, want int, within time.Duration) {
	t.Helper()
	d.waitStats(t, fmt.Sprintf("%d open connections", want), within, func(s upstreamStats) bool { return s.Open == want })
}

// waitStats waits until the upstream's stats satisfy cond.
func (d *runningDemo) waitStats(t *testing.T, what string, within time.Duration, cond func(upstreamStats) bool) {
	t.Helper()
	deadline := time.Now().Add(within)
	for {
		stats := d.stats(t)
		if cond(stats) {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("the upstream does not report %s %s later: %+v", what, within, stats)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func get(t *testing.T, url string) (*http.Response, string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		t.Fatal(err)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatalf("GET %s: %v", url, err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatalf("GET %s: %v", url, err)
	}
	return resp, string(body)
}

func postQuiet(t *testing.T, pageURL, quietFor string) {
	t.Helper()
	post(t, pageURL+"demo/quiet?for="+quietFor)
}

func post(t *testing.T, url string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, url, nil)
	if err != nil {
		t.Fatal(err)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("POST %s: status %d", url, resp.StatusCode)
	}
}

// lineReader delivers a stream's lines as they arrive.
type lineReader struct {
	lines chan string
	// err is the read error that ended the stream (nil for a clean end);
	// it is set before lines is closed.
	err error
}

func readLines(body io.Reader) *lineReader {
	lr := &lineReader{lines: make(chan string, 1024)}
	go func() {
		defer close(lr.lines)
		scanner := bufio.NewScanner(body)
		for scanner.Scan() {
			lr.lines <- scanner.Text()
		}
		lr.err = scanner.Err()
	}()
	return lr
}

// waitFor reads lines until one matches, for at most within.
func (lr *lineReader) waitFor(t *testing.T, what string, within time.Duration, match func(string) bool) string {
	t.Helper()
	timeout := time.NewTimer(within)
	defer timeout.Stop()
	var seen []string
	for {
		select {
		case line, ok := <-lr.lines:
			if !ok {
				t.Fatalf("the stream ended (error %v) while waiting for %s; lines read: %q", lr.err, what, seen)
			}
			if match(line) {
				return line
			}
			seen = append(seen, line)
		case <-timeout.C:
			t.Fatalf("did not get %s within %s; lines read: %q", what, within, seen)
		}
	}
}

// expectNext checks that the very next line is want.
func (lr *lineReader) expectNext(t *testing.T, want string, within time.Duration) {
	t.Helper()
	select {
	case line, ok := <-lr.lines:
		if !ok {
			t.Fatalf("the stream ended (error %v) before the line %q", lr.err, want)
		}
		if line != want {
			t.Fatalf("got line %q, want %q", line, want)
		}
	case <-time.After(within):
		t.Fatalf("no line %q within %s", want, within)
	}
}

// expectEnd checks that the stream ends cleanly with no further line.
func (lr *lineReader) expectEnd(t *testing.T, within time.Duration) {
	t.Helper()
	select {
	case line, ok := <-lr.lines:
		if ok {
			t.Fatalf("got line %q after the close sequence, want the end of the stream", line)
		}
		if lr.err != nil {
			t.Fatalf("the stream ended with an error, want a clean end: %v", lr.err)
		}
	case <-time.After(within):
		t.Fatalf("the stream did not end within %s of the close sequence", within)
	}
}

// pageState mirrors window.demoState on the demo page.
type pageState struct {
	Events     int `json:"events"`
	Heartbeats int `json:"heartbeats"`
	Closes     []struct {
		Reason string `json:"reason"`
	} `json:"closes"`
	Reconnects []struct {
		SentLastEventID  string `json:"sentLastEventId"`
		UpstreamReceived string `json:"upstreamReceived"`
		Honoured         bool   `json:"honoured"`
	} `json:"reconnects"`
	LastEventID  string `json:"lastEventId"`
	UpstreamOpen *int   `json:"upstreamOpen"`
	ESState      string `json:"esState"`
	Shared       struct {
		UpstreamOpen   *int `json:"upstreamOpen"`
		UpstreamOpened *int `json:"upstreamOpened"`
		Tabs           map[string]struct {
			State  string   `json:"state"`
			Opens  int      `json:"opens"`
			Errors int      `json:"errors"`
			IDs    []string `json:"ids"`
			Conn   int      `json:"conn"`
		} `json:"tabs"`
		Replays []struct {
			LastEventID string   `json:"lastEventId"`
			Missed      []string `json:"missed"`
			Got         []string `json:"got"`
			Done        bool     `json:"done"`
			OK          bool     `json:"ok"`
		} `json:"replays"`
	} `json:"shared"`
}

// String shows the state as the page's JSON, for failure messages.
func (s pageState) String() string {
	b, _ := json.Marshal(s)
	return string(b)
}

// waitForPage polls the page's state until cond holds, for at most within.
func waitForPage(t *testing.T, ctx context.Context, what string, within time.Duration, cond func(pageState) bool) pageState {
	t.Helper()
	deadline := time.Now().Add(within)
	for {
		state, err := chromedp.Run(ctx, chromedp.Evaluate[pageState](`window.demoState`))
		if err != nil {
			t.Fatalf("reading the page state while waiting for %s: %v", what, err)
		}
		if cond(state) {
			return state
		}
		if time.Now().After(deadline) {
			t.Fatalf("the page did not show %s within %s; its state: %v", what, within, state)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// syncBuffer collects the demo's output from several goroutines.
type syncBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}
