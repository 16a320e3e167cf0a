package proof

import (
	"fmt"
	"os"
	"os/exec"
	"runtime"
	"slices"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"
)

// proofCase is one row of docs/reliability.md.
type proofCase struct {
	id, test, title string
	// asserts says what the test checks, as a user would notice it.
	asserts string
	// teardown says what the teardown latency is measured from (always to
	// the moment the upstream observes its connection end).
	teardown string
}

// cases lists every case the suite proves, in the report's order.
var cases = []proofCase{
	{"browser", "TestBrowserEventSource/HTTP1.1", "Headless Chromium, EventSource, HTTP/1.1",
		"every request came over HTTP/1.1 (the page's nextHopProtocol and the gateway's request protocol); all events arrive in order with the right type, data and lastEventId; the gateway's heartbeats (counted in its log) produce no message event; after the max_lifetime close the close_event reaches a listener with its reason, the browser reconnects by itself after the retry delay (measured at the upstream) and its Last-Event-ID reaches the upstream; closing the page makes the upstream see its connection end within 1 s",
		"closing the tab"},
	{"browser-h2", "TestBrowserEventSource/HTTP2", "Headless Chromium, EventSource, HTTP/2 (TLS, Caddy's internal issuer)",
		"the same over HTTP/2 (`h2` in nextHopProtocol, HTTP/2.0 at the gateway), Chromium trusting the certificate from Caddy's local CA by a pin on its public key (`--ignore-certificate-errors-spki-list`)",
		"closing the tab"},
	{"browser-h3", "TestBrowserEventSource/HTTP3", "Headless Chromium, EventSource, HTTP/3 (forced QUIC)",
		"the same over HTTP/3 (`h3` in nextHopProtocol, HTTP/3.0 at the gateway), QUIC forced for the site's origin, so a fallback to TCP fails the test",
		"closing the tab"},
	{"browser-refused", "TestBrowserRefusedThenReconnects", "Headless Chromium refused by `max_streams 1`, then connected by itself",
		"with the only slot held by another client, the page's EventSource gets the default refusal (a 200 event stream with `retry` 0.5–1 s and the close event `max_streams`) again and again without reaching the upstream, stays CONNECTING and comes back within the hint (+ 300 ms) each time; once the other client leaves it connects by itself within the largest hint (+ 300 ms) and receives the upstream's events, in the same page load; with `refuse_with status` the EventSource ends CLOSED after one attempt and never comes back, even once the slot is free",
		""},
	{"node", "TestNodeEventSource", "Node `eventsource` package",
		"the same: events in order with type, data and lastEventId (as this package reports it: from the event's own id field only), heartbeats give no message event, close_event delivered, reconnect after the retry delay with Last-Event-ID at the upstream, `close()` ends the upstream connection within 1 s",
		"`EventSource.close()`"},
	{"http1", "TestProtocols/HTTP1.1", "HTTP/1.1 (plain)",
		"each event reaches the client within 300 ms of the upstream's write (latency below), a heartbeat comes after the heartbeat period of quiet, max_lifetime ends the body cleanly after `retry` and the close event, a client that hangs up makes the upstream see its end within 1 s",
		"the client cancelling its request"},
	{"http2", "TestProtocols/HTTP2", "HTTP/2 (TLS, Caddy's internal issuer)",
		"the same over HTTP/2 with the client trusting Caddy's local CA", "the client cancelling its request"},
	{"http3", "TestProtocols/HTTP3", "HTTP/3 (quic-go client)",
		"the same over HTTP/3", "the client cancelling its request"},
	{"fault-reset", "TestFaults/reset_mid-event", "Upstream resets mid-event",
		"the client reads what an EventSource reads from the upstream's bytes (the cut event is not dispatched, nothing is appended), the response ends within 2 s; other streams unaffected",
		""},
	{"fault-hang", "TestFaults/hang_before_headers", "Upstream hangs before headers",
		"with `response_header_timeout` (1 s) the client gets a clean 504 and the upstream its end; without it, a client that gives up makes the upstream see its end within 1 s; other streams unaffected",
		"the client giving up"},
	{"fault-status", "TestFaults/error_status_json", "Upstream answers 404 / 500 with JSON",
		"status, Content-Type, Content-Length and body pass through byte-identical, without the stream headers; other streams unaffected",
		""},
	{"fault-drip", "TestFaults/drip", "Upstream drips one byte every 2 ms",
		"every byte reaches the client as it is written (the first before the upstream is done), heartbeats come only at event boundaries (during pauses between events, none during a pause inside one, a CRLF split by a pause stays intact), and the client parses exactly the upstream's events; other streams unaffected",
		""},
	{"fault-big", "TestFaults/10MiB_event", "Upstream sends a 10 MiB event",
		"the event streams through byte-exact (heartbeats only at boundaries), the client holds half of it while the upstream pauses mid-event, and the gateway's live heap then stays under 2 MiB above its baseline (no buffering); other streams unaffected",
		""},
	{"fault-gzip", "TestFaults/gzip_despite_request", "Upstream sends gzip though not asked",
		"the client's Accept-Encoding: gzip does not reach the upstream (it is asked for an uncompressed answer); the gzip it sends anyway is decoded, and the client gets exactly the upstream's events with heartbeats only between them, uncompressed, and a clean end; other streams unaffected",
		""},
	{"fault-unterminated", "TestFaults/no_final_blank_line", "Upstream closes without a final blank line",
		"for endings LF, CR and CRLF the body ends cleanly, byte-identical to the upstream's apart from heartbeats at boundaries, and the unfinished last event is not dispatched; other streams unaffected",
		""},
	{"drain-stop", "TestStopDrainsEveryRequest", "`caddy stop` with every kind of request open (Caddy process, unlimited grace_period)",
		"with 3 live streams, one stopped mid-event, one gzip-compressed by its upstream, one in an encoding the gateway cannot read (br), header waits on a hung and a buffering upstream, and a stalled raw TCP client that never reads while its upstream floods: the process exits within drain_window (2 s) + 1 s; every upstream request ends within that bound; live and compressed streams get `retry` + the close event with reason `drain` and a clean end (the compressed one decoded, no Content-Encoding); the mid-event stream gets nothing after its unfinished event, the br stream exactly the upstream's bytes (ended by the drain); header-wait stream requests get 200 text/event-stream with `retry` (1–2× the option), the close event and Retry-After; the other header wait gets 503; the handler logs every end and refusal with reason `drain`",
		""},
	{"drain-reload", "TestReloadDrainsEveryRequest", "Reload (admin API `POST /load`) with every kind of request open (Caddy process, unlimited grace_period)",
		"the same mix: the reload completes, `caddy_sse_streams_ended_total` and `caddy_sse_streams_refused_total` grow by 7 and 3 with reason `drain`, every request of the old configuration ends within drain_window (2 s) + 1 s with the same outcomes (the old configuration's close event), a stream opened right after the reload is served by the new configuration and still receives events after the old one's drain and hard stop",
		""},
	{"header-wait", "TestHeaderWaitIdleTimeout", "Upstream never sends a header, `idle_timeout 500ms`",
		"5 rounds of: a stream request gets 200 text/event-stream with `retry` (1–2× the option), the close event with reason `upstream_timeout` and Retry-After; another request gets 504; a stream request with `refuse_with status` gets 504; each answered between 500 and 750 ms after it was sent, its upstream request ended in the same interval; every refusal logged as upstream_timeout; a header that comes at 300 ms starts a stream as usual",
		""},
	{"limit-acceptless", "TestLimitCountsAcceptlessStreams", "`max_streams 2`: streams not asked for as such count",
		"with two streams open, a request without Accept and one with `Accept: */*`, both answered with an event stream by the upstream, get 503 with Retry-After and no event stream, their upstream requests ended within 1 s; a stream request gets the browser-safe refusal (reason `max_streams`) without reaching the upstream; a JSON response still passes; once a slot frees, a stream without Accept takes it and counts (the next one is refused); with `max_streams_per_client 1` the same gets 429",
		"the client receiving the refusal"},
	{"metrics-events", "TestMetricsCountEveryEvent", "`caddy_sse_events_total` counts every event (Caddy process, admin API's /metrics)",
		"streams that end every way, one after another (upstream end, plain and gzip; client gone; upstream reset mid-event; idle close; max_lifetime close waiting for the event in flight; a stalled client's write_timeout; drain by a reload): after each, the metric grew by exactly the `events` of the stream's end line in the handler's log (`stream ended`, or the warning `upstream broke the stream`), which equals the events its client parsed; over the run the metric's growth equals the lines' sum, and `caddy_sse_streams_ended_total` grew by reason as the lines say",
		""},
	{"stalled", "TestStalledClient", "Clients stop reading (full window)",
		"3 raw TCP clients with a tiny receive window (HTTP/1.1) and 2 HTTP/2 and 2 HTTP/3 clients with 64 KiB windows never read while the upstream floods them; the upstream's writes block (backpressure reaches it), each upstream connection is closed within write_timeout (2 s) + 1 s of its last successful write, every end is logged as write_timeout, and the process's live heap stays within 4 MiB of its baseline while all are stalled",
		"the upstream's last successful write"},
	{"half-open", "TestHalfOpenClient", "Half-open clients (veth link down)",
		"clients in a network namespace of their own behind a veth pair (3 over HTTP/1.1, 2 over HTTP/2, 2 over HTTP/3) go silent mid-stream (their link is set down): each TCP stream's upstream connection is closed within heartbeat (500 ms) + write_timeout (1 s) + 1 s, thanks to TCP_USER_TIMEOUT; HTTP/3 streams end only with QUIC's 30 s idle timeout (a limitation, held to 30 s + heartbeat + 1 s)",
		"the clients' link going down (TCP streams)"},
	{"churn", "TestChurn", "Churn: 10,000 streams dropped at random moments",
		"10,000 streams (at most 200 at once) dropped at random moments (before headers, mid-event, between events); afterwards 0 goroutines of the handler, 0 extra file descriptors, 0 upstream requests or connections still open, the live heap back within 4 MiB of its baseline",
		"the client dropping its stream"},
	{"share-header", "TestShareAdversarial/custom_header", "`share`: two users who differ only by a custom header",
		"two clients on one URL with `X-Api-Key: alice` and `X-Api-Key: bob` (no Authorization, no Cookie), on a route with `share` and its default key, the upstream naming in every event the key it saw: it gets two requests, one per user, and each user only events naming their own key; a third client with alice's key shares alice's upstream request (still two in all)",
		""},
	{"share-per-user", "TestShareAdversarial/per-user_response", "`share`: the upstream sets a cookie (then `Cache-Control: private`)",
		"anonymous users A then B with identical request headers, the upstream giving each request a session of its own (`Set-Cookie: session=<random>`, then `Cache-Control: private`) named by its events: A gets its own cookie, B never gets A's Set-Cookie nor an event of A's session, each has an upstream request of its own, and `caddy_sse_upstream_quirks_total{quirk=\"per_user_response\"}` grows (admin API's /metrics)",
		""},
	{"share-missing-key", "TestShareAdversarial/missing_key_header", "`share {http.request.header.X-Tenant}` without the header",
		"two requests without X-Tenant and with different Authorization get an upstream request each and only their own events; two with the same X-Tenant share one upstream request",
		""},
	{"share-flood", "TestShareAdversarial/flood_of_keys", "`share`: a flood of distinct keys under `max_streams 5`, `linger 2s`",
		"20 clients one after another, each on its own query string, each reading one event then leaving: the upstream never holds more than 5 requests at once (counted at the upstream, lingering ones included), every client gets its stream or the browser-safe refusal (200 text/event-stream with `retry`), and once linger has passed the upstream holds none",
		""},
	{"share-renumber", "TestShareAdversarial/ids_restart", "`share`: an upstream that restarts its ids after a reconnect",
		"the upstream sends ids 1–3 and breaks the connection; asked again, it ignores Last-Event-ID and sends ids 1, 2, 3, … with new data: both clients of the shared stream get every new event, the first within 2 s of the reconnect, and each old event once",
		""},
	{"share-failing", "TestShareAdversarial/failing_upstream", "`share`: 50 clients of one key on an upstream answering 503",
		"50 EventSource-like clients (`Accept: text/event-stream`) at once on one shared key: each gets the browser-safe refusal (200 text/event-stream with `retry:`), the upstream gets at most 5 requests (the hub's attempts, not one per client), and the retry hints are not all equal",
		""},
	{"share-reload-kept", "TestShareReload/reloads_that_leave_a_shared_route_alone", "`share`: two reloads that leave the shared routes alone (Caddy process, admin API `POST /load`)",
		"two shared routes (`share { assign_ids }` on an upstream that sends no ids; `share` on one that sends its own and honours Last-Event-ID), `retry 200ms`, `drain_window 1s`, 25 EventSource-like clients each (they reconnect when the stream ends, after the retry, with Last-Event-ID); two reloads that change only `heartbeat` drain every client, and every client comes back: each upstream got exactly 1 request, every client's events count up by one in id and data (0 gaps, 0 duplicates), no response says `X-SSE-Replay: miss`, every client gets its upstream's last event, and `caddy_sse_shared_upstream_reconnects_total` does not grow",
		""},
	{"share-reload-move", "TestShareReload/a_reload_that_changes_the_upstream's_address", "`share`: a reload that changes the upstream's address (Caddy process, admin API `POST /load`)",
		"10 EventSource-like clients of a shared route with `max_lifetime 2s`, `lifetime_jitter 0`, on upstream A (an event every 45 ms, own ids); a reload points the route at upstream B, which counts on from the Last-Event-ID it gets: B's first request comes within max_lifetime + retry + 1 s of the reload, with Last-Event-ID the last id the clients got from A; A's request ends and A was asked once; every client's events count up by one across the move (0 gaps, 0 duplicates), no `X-SSE-Replay: miss`",
		""},
	{"fleet-one-upstream", "TestFleet/one_upstream_request_per_key", "Fleet: one upstream request per key for three gateways (`share { store nats }`, Caddy processes)",
		"three Caddy processes with `share { assign_ids store nats { lease 1s } }` on one NATS server with JetStream, 4 clients per gateway on each of two keys (an upstream without ids, one with its own that honours Last-Event-ID), all at once: the upstream gets exactly 1 request per key (sampled every 10 ms for 1 s, and counted in all), every client's events count up by one (0 gaps, 0 duplicates), every event has the same id on every gateway (`<12 hex>-<n>` for the gateway's), no client reconnects",
		""},
	{"fleet-same-ids", "TestFleet/the_same_ids_on_every_gateway", "Fleet: the same ids on every gateway, across gateways and a restart",
		"7 clients per key, each moved to another gateway with Last-Event-ID, then one gateway stopped (admin API `/stop`) and started again and every other client moved to it, and a new client on it resuming from an id 50 events old: 0 gaps, 0 duplicates, no `X-SSE-Replay: miss`, the same id for the same event on every gateway and after the restart, the new client's first event the one after its id, 1 upstream request per key",
		""},
	{"fleet-failover", "TestFleet/failover_of_the_lease_holder", "Fleet: the lease holder SIGKILLed",
		"the gateway holding both keys' leases (`lease 1s`) is SIGKILLed: another gateway asks the upstream again within 2 × lease + 1 s, with the log's last id as Last-Event-ID; the other gateways' clients keep their one connection open (no close, no reconnect) and get every event once and in order (0 gaps, 0 duplicates on the upstream that honours Last-Event-ID; 0 duplicates without ids, where what the killed gateway read is lost); the killed gateway's clients resume on another; the same ids everywhere; back to 1 upstream request per key",
		""},
	{"fleet-rolling", "TestFleet/rolling_restart", "Fleet: a rolling restart of every gateway",
		"each of the three gateways in turn stopped gracefully (admin API `/stop`, `drain_window 1s`) and started again, its clients following the close sequence to the next gateway with Last-Event-ID: 0 gaps and 0 duplicates with the upstream's ids, 0 duplicates without, no event out of order, no `X-SSE-Replay: miss`, no refusal, the same ids everywhere, and back to 1 upstream request per key",
		""},
	{"fleet-nats-restart", "TestFleet/NATS_restarted_under_load", "Fleet: NATS stopped and started again under load",
		"NATS (in the test process) stopped for at least 3 leases, then started again on the same port and JetStream store: no client is refused (no non-200, no refusal), clients connected before and new clients during the outage (at its start and 1.5 leases in) get at least 10 events during it and none waits more than 2 × lease + 1 s for an event (the gateways ask the upstream themselves), 0 duplicates, no event out of order, 0 gaps with the upstream's ids, and the fleet comes back to 1 upstream request per key",
		""},
	{"legacy-express", "TestLegacyExpress, TestLegacyHEAD/express, TestLegacyRestart/express",
		"Real server: Node + Express (`res.write` in a `setInterval`, 200 ms)",
		"events reach the client within 300 ms of the server's write; a client that hangs up makes the server's `req` emit `close` (interval cleared) within 1 s, without waiting for a write; after a HEAD through the gateway the server lets go of it and a GET still gets its events on the pooled connection; Chromium's EventSource stays subscribed through a restart of the server (while it is down the gateway answers with a 200 event stream that carries `retry:`)",
		"the client hanging up (to the server's own log line)"},
	{"legacy-php", "TestLegacyPHP, TestLegacyHEAD/php, TestLegacyRestart/php, TestLegacyBufferingWarning/php",
		"Real server: PHP built-in server (`php -S`), Debian's production php.ini",
		"the tutorial's `echo; ob_flush(); flush(); sleep` loop (200 ms): events within 300 ms, a client that hangs up ends the script (`connection_aborted()`) at a write, within two intervals + 500 ms; the one process serves nothing else while a stream is open; the loop that forgets `ob_flush` is shown to deliver late, in 4 KiB bursts (`output_buffering = 4096`), to notice a hang-up only at a full buffer, and the gateway warns about it; a HEAD leaves the server free; Chromium's EventSource stays subscribed through a restart",
		"the client hanging up (to the server's own log line)"},
	{"legacy-flask", "TestLegacyFlask, TestLegacyFlaskWorkers, TestLegacyHEAD/flask, TestLegacyRestart/flask, TestLegacyMaxStreamRate/flask",
		"Real server: Flask generator on gunicorn, 2 sync workers",
		"events (200 ms apart) within 300 ms; a client that hangs up frees its worker (GeneratorExit) at a write, within two intervals + 500 ms; two held streams starve the server's other route until a client leaves, `max_streams 1` refuses the second stream before the server and keeps the other route answering, `max_stream_rate` keeps it answering while clients come and go; a HEAD leaves no worker taken; Chromium's EventSource stays subscribed through a restart",
		"the client hanging up (to the server's own log line)"},
}

// proofReport collects the figures of a run. It is the suite's one
// package-level collector.
type proofReport struct {
	mu      sync.Mutex
	results map[string]*caseResult
	started time.Time
}

type caseResult struct {
	status    string
	teardowns []time.Duration
	figures   []string
}

var report = &proofReport{results: make(map[string]*caseResult), started: time.Now()}

// caseRecorder records the figures of one case.
type caseRecorder struct {
	r  *caseResult
	mu *sync.Mutex
}

// start begins recording case id for test t; its status is taken when the
// test ends.
func (p *proofReport) start(t *testing.T, id string) *caseRecorder {
	t.Helper()
	if !slices.ContainsFunc(cases, func(c proofCase) bool { return c.id == id }) {
		t.Fatalf("report: unknown case %q", id)
	}
	p.mu.Lock()
	r := &caseResult{status: "running"}
	p.results[id] = r
	p.mu.Unlock()
	t.Cleanup(func() {
		p.mu.Lock()
		defer p.mu.Unlock()
		switch {
		case t.Failed():
			r.status = "**FAILED**"
		case t.Skipped():
			r.status = "skipped"
		default:
			r.status = "passed"
		}
	})
	return &caseRecorder{r: r, mu: &p.mu}
}

// teardown records one teardown latency.
func (c *caseRecorder) teardown(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.r.teardowns = append(c.r.teardowns, d)
}

// figure records another measured figure.
func (c *caseRecorder) figure(format string, args ...any) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.r.figures = append(c.r.figures, fmt.Sprintf(format, args...))
}

// percentile returns the p-th percentile (nearest rank) of ds.
func percentile(ds []time.Duration, p float64) time.Duration {
	if len(ds) == 0 {
		return 0
	}
	s := slices.Clone(ds)
	sort.Slice(s, func(i, j int) bool { return s[i] < s[j] })
	rank := int(p/100*float64(len(s))+0.999999) - 1
	return s[min(max(rank, 0), len(s)-1)]
}

func ms(d time.Duration) string {
	return fmt.Sprintf("%.2f ms", float64(d)/float64(time.Millisecond))
}

// sourceCommit names the commit of the repository the run tested, and
// whether files other than the generated docs had uncommitted changes.
func sourceCommit() string {
	head, err := exec.Command("git", "rev-parse", "--short=12", "HEAD").Output()
	if err != nil {
		return "Source commit unknown (no git repository)."
	}
	commit := strings.TrimSpace(string(head))
	status, err := exec.Command("git", "status", "--porcelain", "--", "..", ":!../docs").Output()
	switch {
	case err != nil:
		return fmt.Sprintf("Tested commit `%s`; whether it had uncommitted changes is unknown.", commit)
	case len(strings.TrimSpace(string(status))) > 0:
		return fmt.Sprintf("Tested commit `%s` with uncommitted changes.", commit)
	}
	return fmt.Sprintf("Tested commit `%s`, with no uncommitted changes.", commit)
}

// render writes the report as Markdown.
func (p *proofReport) render(exitCode int) string {
	p.mu.Lock()
	defer p.mu.Unlock()
	var b strings.Builder
	b.WriteString("# Reliability report\n\n")
	b.WriteString("<!-- Generated by the proof suite (proof/report_test.go); do not edit by hand. -->\n")
	b.WriteString("<!-- Regenerate: SSE_RELIABILITY_REPORT=$PWD/docs/reliability.md go test -race -count=1 ./proof -->\n\n")
	b.WriteString("This file is written by the tests in [`proof/`](../proof) at the end of a run, from what that run measured. ")
	b.WriteString("Every case runs a real Caddy (in the test process, configured from a Caddyfile) with the `sse` handler in front of `reverse_proxy`, ")
	b.WriteString("and an upstream of its own on loopback that records the moment it observes each request's connection end. ")
	b.WriteString("A *teardown* is the time from the event named in the case to that moment. ")
	b.WriteString("The fuzz target for event-boundary tracking lives in the root package and is not part of this report.\n\n")
	fmt.Fprintf(&b, "Last run: %s UTC, %s, %s/%s, %d CPUs, race detector %s, `go test` exit code %d, %s. %s\n\n",
		p.started.UTC().Format("2006-01-02 15:04"), runtime.Version(), runtime.GOOS, runtime.GOARCH,
		runtime.NumCPU(), onOff(raceEnabled), exitCode, time.Since(p.started).Round(time.Second), sourceCommit())
	b.WriteString("| Case | What is asserted | Result | Teardown from | n | p50 | p99 | Other figures |\n")
	b.WriteString("| --- | --- | --- | --- | --- | --- | --- | --- |\n")
	for _, c := range cases {
		r := p.results[c.id]
		status, n, p50, p99, figures := "not run", "", "", "", ""
		if r != nil {
			status = r.status
			if len(r.teardowns) > 0 {
				n = fmt.Sprint(len(r.teardowns))
				p50 = ms(percentile(r.teardowns, 50))
				p99 = ms(percentile(r.teardowns, 99))
			}
			figures = strings.Join(r.figures, "; ")
		}
		from := c.teardown
		if from == "" {
			from = "–"
		}
		fmt.Fprintf(&b, "| %s (`%s`) | %s | %s | %s | %s | %s | %s | %s |\n",
			c.title, c.test, c.asserts, status, from, n, p50, p99, cell(figures))
	}
	return b.String()
}

func cell(s string) string {
	return strings.ReplaceAll(strings.ReplaceAll(s, "|", "\\|"), "\n", " ")
}

func onOff(b bool) string {
	if b {
		return "on"
	}
	return "off"
}

// TestMain runs the suite and, when SSE_RELIABILITY_REPORT names a file,
// writes the report there.
func TestMain(m *testing.M) {
	code := m.Run()
	if path := os.Getenv("SSE_RELIABILITY_REPORT"); path != "" {
		if err := os.WriteFile(path, []byte(report.render(code)), 0o644); err != nil {
			fmt.Fprintln(os.Stderr, "writing the reliability report:", err)
			if code == 0 {
				code = 1
			}
		} else {
			fmt.Fprintln(os.Stderr, "reliability report written to", path)
		}
	}
	os.Exit(code)
}

// requireTool stops a test that cannot run here: it fails in CI, where
// every tool must be installed, and skips on a developer machine.
func requireTool(t *testing.T, format string, args ...any) {
	t.Helper()
	msg := fmt.Sprintf(format, args...)
	if os.Getenv("CI") == "true" {
		t.Fatalf("CI=true and %s", msg)
	}
	t.Skipf("skipped: %s (CI would fail)", msg)
}
