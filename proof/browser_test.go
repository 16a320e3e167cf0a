package proof

import (
	"context"
	"crypto/sha256"
	"crypto/tls"
	"encoding/base64"
	"encoding/json"
	"net"
	"net/http"
	"net/url"
	"strconv"
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

// browserProtocol is one way the browser reaches the gateway.
type browserProtocol struct {
	name, caseID string
	// tls: the page is loaded from the gateway's TLS site, whose leaf
	// certificate the browser is told to trust; else from the plain site.
	tls bool
	// quic forces QUIC (HTTP/3) to the TLS site's origin.
	quic bool
	// nextHop is the page's nextHopProtocol (Resource Timing) for every
	// request; proto is the request's protocol as the gateway saw it.
	nextHop, proto string
}

var browserProtocols = []browserProtocol{
	{name: "HTTP1.1", caseID: "browser", nextHop: "http/1.1", proto: "HTTP/1.1"},
	{name: "HTTP2", caseID: "browser-h2", tls: true, nextHop: "h2", proto: "HTTP/2.0"},
	{name: "HTTP3", caseID: "browser-h3", tls: true, quic: true, nextHop: "h3", proto: "HTTP/3.0"},
}

// TestBrowserEventSource opens an EventSource through the gateway in
// headless Chromium over HTTP/1.1, HTTP/2 and HTTP/3, and checks on each,
// after making sure that protocol carried every request, what a page sees:
// every event in order with its type, data and lastEventId, nothing from
// heartbeats, the close event at max_lifetime, a reconnect by the browser
// itself after the retry delay with Last-Event-ID reaching the upstream; and
// that closing the page makes the upstream see its connection end within a
// second.
func TestBrowserEventSource(t *testing.T) {
	for _, p := range browserProtocols {
		t.Run(p.name, func(t *testing.T) { checkBrowser(t, p) })
	}
}

// protoHeader is the request header the gateway adds on its way to the
// upstream, naming the protocol the request came in with.
const protoHeader = "X-Proof-Proto"

// checkBrowser runs the browser session over one protocol, with a gateway,
// an upstream and a Chromium of its own: forcing QUIC is browser-wide.
func checkBrowser(t *testing.T, p browserProtocol) {
	rec := report.start(t, p.caseID)
	browser := headless.Chromium(t)
	up := newUpstream(t)
	up.handle("script", scriptBehavior)
	up.handle("page", func(w http.ResponseWriter, r *http.Request, req *upstreamRequest) {
		w.Header().Set("Content-Type", "text/html; charset=utf-8")
		_, _ = w.Write([]byte(browserPage))
	})
	prof := clientProfile
	prof.proxy = "header_up " + protoHeader + " {http.request.proto}"
	g := startGateway(t, up, gatewayConfig{profiles: map[string]profile{"browser": prof}})

	base := g.httpURL
	var flags []chromedp.ExecAllocatorOption
	if p.tls {
		base = g.httpsURL
		flags = append(flags,
			// Trust the one certificate the site serves, pinned by its
			// public key; Chromium honours the pin on TCP and QUIC alike.
			// Without it: ERR_CERT_AUTHORITY_INVALID, or over QUIC
			// ERR_QUIC_PROTOCOL_ERROR.
			chromedp.Flag("ignore-certificate-errors-spki-list", g.leafSPKIHash(t)),
			// The site is named localhost but listens on 127.0.0.1 only.
			// Chromium tries ::1 first; over TCP it then falls back, over
			// QUIC it fails (ERR_QUIC_HANDSHAKE_FAILED).
			chromedp.Flag("host-resolver-rules", "MAP localhost 127.0.0.1"),
		)
	}
	if p.quic {
		// The allocator disables QUIC, which keeps the other protocols
		// from drifting to HTTP/3; here it is on and forced for the
		// site's origin from the first request, with no TCP fallback.
		flags = append(flags,
			chromedp.Flag("disable-quic", false),
			chromedp.Flag("enable-quic", true),
			chromedp.Flag("origin-to-force-quic-on", "localhost:"+strconv.Itoa(g.httpsPort)),
		)
	}
	allocCtx, cancelAlloc := headless.Allocator(browser, t.TempDir(), flags...)
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
		// The page's own key keeps it apart from the EventSource's
		// requests, while its protocol can be checked too.
		pageURL := base + "/p/browser/page?k=" + pageKey(key) + "&es=" + url.QueryEscape(es)
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
		var entries []clientEntry
		pollPage(t, tab, "window.proofLog || []", &entries, what, within, func() bool { return cond(entries) })
		return entries
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
	// checkProtocol checks that every request with key reached the gateway
	// over the protocol under test, and that the page's Resource Timing
	// says so for the page and every other entry: a silent fallback fails
	// here. With stream, it waits for the EventSource's entry too, which
	// appears once the gateway has ended its first response.
	checkProtocol := func(tab context.Context, key string, stream bool) {
		t.Helper()
		for _, k := range []string{pageKey(key), key} {
			for i := 1; i <= up.requestsWithKey(k); i++ {
				if got := up.request(t, k, i, time.Second).Header.Get(protoHeader); got != p.proto {
					t.Errorf("request #%d with key %s reached the gateway over %q, want %q", i, k, got, p.proto)
				}
			}
		}
		var timings []resourceTiming
		pollPage(t, tab, resourceTimings, &timings, "the Resource Timing entries of the page and its EventSource", 5*time.Second,
			func() bool {
				var page, es bool
				for _, e := range timings {
					page = page || e.Type == "navigation"
					es = es || strings.HasSuffix(e.Name, "/p/browser/script?k="+key)
				}
				return page && (es || !stream)
			})
		for _, e := range timings {
			if e.Proto != p.nextHop {
				t.Errorf("the page loaded %s (%s) over %q, want %q", e.Name, e.Type, e.Proto, p.nextHop)
			}
		}
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
	// Every request so far came over the protocol under test: the page,
	// the EventSource's first response (which the gateway ended) and its
	// reconnect.
	checkProtocol(tab, key, true)
	rec.figure("every request over %s (page's nextHopProtocol) and %s at the gateway", p.nextHop, p.proto)

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
	for range 9 {
		key := up.key("browser")
		tab, closeTab := openPage(key)
		waitLog(tab, "the script's events", 5*time.Second, func(es []clientEntry) bool { return count(es, "event") >= 4 })
		checkProtocol(tab, key, false)
		closePage(closeTab, up.request(t, key, 1, time.Second))
	}
	up.waitQuiet(t, 5*time.Second)
}

func pageKey(key string) string { return key + "-page" }

// resourceTiming is what the test reads of a Resource Timing entry.
type resourceTiming struct {
	Name  string `json:"name"`
	Type  string `json:"type"`
	Proto string `json:"proto"`
}

// resourceTimings lists the page's navigation and resource entries; an
// entry appears once its response has ended.
const resourceTimings = `[...performance.getEntriesByType("navigation"), ...performance.getEntriesByType("resource")]
	.map((e) => ({name: e.name, type: e.initiatorType || e.entryType, proto: e.nextHopProtocol}))`

// pollPage evaluates expr in the page every 25ms, decoding its value into
// v, until done holds, for at most within.
func pollPage(t *testing.T, tab context.Context, expr string, v any, what string, within time.Duration, done func() bool) {
	t.Helper()
	deadline := time.Now().Add(within)
	for {
		raw, err := chromedp.Run(tab, chromedp.Evaluate[string]("JSON.stringify("+expr+")"))
		if err != nil {
			t.Fatalf("reading the page: %v", err)
		}
		if err := json.Unmarshal([]byte(raw), v); err != nil {
			t.Fatalf("the page's %q: %v", raw, err)
		}
		if done() {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("the page did not show %s within %s; it has: %+v", what, within, v)
		}
		time.Sleep(25 * time.Millisecond)
	}
}

// leafSPKIHash returns the base64 SHA-256 of the public key of the
// certificate the TLS site serves, as Chromium's
// --ignore-certificate-errors-spki-list takes it.
func (g *gateway) leafSPKIHash(t *testing.T) string {
	t.Helper()
	d := tls.Dialer{Config: g.tlsConfig(), NetDialer: &net.Dialer{Timeout: 5 * time.Second}}
	conn, err := d.Dial("tcp", net.JoinHostPort("127.0.0.1", strconv.Itoa(g.httpsPort)))
	if err != nil {
		t.Fatalf("fetching the TLS site's certificate: %v", err)
	}
	defer conn.Close()
	leaf := conn.(*tls.Conn).ConnectionState().PeerCertificates[0]
	sum := sha256.Sum256(leaf.RawSubjectPublicKeyInfo)
	return base64.StdEncoding.EncodeToString(sum[:])
}
