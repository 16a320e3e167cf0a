package caddysse

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net/http"
	"os"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2/caddytest"
)

// reloadConfig fronts the upstream with an sse handler whose heartbeat text
// tells which config served a stream. It sets no grace_period: the default,
// which waits for streams forever, is what draining must cope with.
func reloadConfig(up *upstream, version string) string {
	return fmt.Sprintf(`{
	admin localhost:2999
	http_port 29080
	https_port 29443
	skip_install_trust
}
http://localhost:29080 {
	sse {
		heartbeat 500ms
		heartbeat_text %s
		drain_window 2s
		retry 1s
		close_event bye
	}
	reverse_proxy %s
}`, version, strings.TrimPrefix(up.srv.URL, "http://"))
}

// TestE2EReloadDrainsStreams reloads Caddy through the admin API with 500
// live streams and checks that each old stream ends cleanly with the retry
// hint at a moment spread over the drain window, that the reload finishes
// within the window, that new streams get the new config, and that the
// metrics endpoint tells the same story.
func TestE2EReloadDrainsStreams(t *testing.T) {
	const streams = 500
	const window = 2 * time.Second
	up := newUpstream(t)
	tester := caddytest.NewTester(t).WithDefaultOverrides(caddytest.Config{LoadRequestTimeout: 30 * time.Second})
	if os.Getenv("CI") == "true" {
		t.Cleanup(func() {
			if t.Skipped() {
				t.Error("caddytest could not start Caddy; in CI that is a failure")
			}
		})
	}
	tester.InitServer(reloadConfig(up, "v1"), "caddyfile")
	before := scrapeMetrics(t, "http://localhost:2999")

	transport := e2eTransport()
	transport.MaxIdleConnsPerHost = -1
	client := &http.Client{Transport: transport}
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel) // ends the body reads of streams a failure left open
	var open []*clientStream
	for range streams {
		req, _ := http.NewRequestWithContext(ctx, http.MethodGet, e2eHost+"/events", nil)
		req.Header.Set("Accept", "text/event-stream")
		resp, err := client.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		s := &clientStream{resp: resp, cancel: cancel, change: make(chan struct{}, 1)}
		go s.read(resp.Body)
		open = append(open, s)
		up.next(t).send(t, "data: hello\n\n")
	}
	for _, s := range open {
		s.waitFor(t, "data: hello\n\n")
	}

	reloadStart := time.Now()
	tester.InitServer(reloadConfig(up, "v2"), "caddyfile")
	reloadTook := time.Since(reloadStart)
	t.Logf("reload with %d live streams took %v (drain window %v)", streams, reloadTook, window)
	if reloadTook > window+time.Second {
		t.Errorf("reload took %v, want ≤ drain window + 1s", reloadTook)
	}

	var ends []time.Duration
	for i, s := range open {
		body, err := s.waitEnd(t)
		if err != io.EOF {
			t.Fatalf("stream %d ended with %v, want a clean end", i, err)
		}
		if !strings.HasSuffix(body, "retry: 1000\nevent: bye\ndata: drain\n\n") {
			t.Fatalf("stream %d did not get the close sequence: %q", i, body)
		}
		if strings.Contains(body, ":v2") {
			t.Fatalf("stream %d of the old config got the new config's heartbeat", i)
		}
		s.mu.Lock()
		ends = append(ends, s.endedAt.Sub(reloadStart))
		s.mu.Unlock()
	}
	slices.Sort(ends)
	t.Logf("stream ends after reload start: first %v, median %v, last %v", ends[0], ends[len(ends)/2], ends[len(ends)-1])
	if last := ends[len(ends)-1]; last > window+time.Second {
		t.Errorf("last stream ended %v after the reload began, want ≤ %v", last, window+time.Second)
	}
	// Spread: each quarter of the window holds about a quarter of the ends.
	// For 500 uniform ends a quarter holds 125 ± 10 (one standard deviation);
	// 80..170 is more than four deviations each way.
	var quarters [4]int
	for _, e := range ends {
		q := int(4 * e / window)
		quarters[min(max(q, 0), 3)]++
	}
	for q, n := range quarters {
		if n < 80 || n > 170 {
			t.Errorf("quarter %d of the drain window holds %d of %d ends (%v): not spread evenly", q, n, streams, quarters)
		}
	}

	// New streams are served by the new config.
	s := openStream(t, "/events")
	req := up.next(t)
	s.waitFor(t, ":v2\n\n")
	s.cancel()
	req.waitGone(t)

	after := scrapeMetrics(t, "http://localhost:2999")
	if d := after[`caddy_sse_streams_ended_total{reason="drain"}`] - before[`caddy_sse_streams_ended_total{reason="drain"}`]; d != streams {
		t.Errorf("metrics: %v streams ended by drain, want %d", d, streams)
	}
	if d := after["caddy_sse_events_total"] - before["caddy_sse_events_total"]; d < streams {
		t.Errorf("metrics: %v events forwarded, want at least %d", d, streams)
	}
	if d := after["caddy_sse_heartbeats_total"] - before["caddy_sse_heartbeats_total"]; d < 1 {
		t.Errorf("metrics: no heartbeats counted")
	}
	checkNoStreamGoroutines(t)
	if active := scrapeMetrics(t, "http://localhost:2999")["caddy_sse_streams_active"]; active != 0 {
		t.Errorf("metrics: %v streams active after all ended", active)
	}
}

// scrapeMetrics reads Caddy's metrics endpoint (the admin API's /metrics)
// into a map from series to value.
func scrapeMetrics(t *testing.T, admin string) map[string]float64 {
	t.Helper()
	resp, err := plainClient.Get(admin + "/metrics")
	if err != nil {
		t.Fatalf("scraping metrics: %v", err)
	}
	defer resp.Body.Close()
	series := map[string]float64{}
	lines := bufio.NewScanner(resp.Body)
	for lines.Scan() {
		line := lines.Text()
		if !strings.HasPrefix(line, "caddy_sse_") {
			continue
		}
		i := strings.LastIndexByte(line, ' ')
		v, err := strconv.ParseFloat(line[i+1:], 64)
		if err != nil {
			t.Fatalf("bad metrics line %q", line)
		}
		series[line[:i]] = v
	}
	if _, ok := series["caddy_sse_streams_active"]; !ok {
		t.Fatal("metrics endpoint has no caddy_sse_ series")
	}
	return series
}
