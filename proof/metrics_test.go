//go:build linux

package proof

import (
	"bytes"
	"fmt"
	"net/http"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/ssegateway/caddy-sse/internal/ssespec"
)

// metricsProfiles is TestMetricsCountEveryEvent's configuration; a reload
// to another generation drains the streams of the one before.
func metricsProfiles(generation int) map[string]profile {
	gen := fmt.Sprintf("header_down X-Proof-Generation %d", generation)
	return map[string]profile{
		"plain": {sse: "heartbeat 100ms\nretry 1s\nclose_event bye\ndrain_window 1s", proxy: gen},
		"idle":  {sse: "heartbeat 100ms\nidle_timeout 500ms\nretry 1s\nclose_event bye", proxy: gen},
		"life":  {sse: "heartbeat 100ms\nmax_lifetime 1s\nlifetime_jitter 0\nretry 1s\nclose_event bye", proxy: gen},
		"stall": {sse: "heartbeat 100ms\nwrite_timeout 1s", proxy: gen},
	}
}

const metricsLifetime = time.Second

// TestMetricsCountEveryEvent runs streams through a Caddy process that end
// in every way a stream ends, one after another, and compares after each
// the change of caddy_sse_events_total (the admin API's /metrics) with the
// `events` of the stream's end line in the handler's log ("stream ended",
// or the warning "upstream broke the stream"), and that with the
// events the client parsed; at the end, the total change with the sum of
// the lines, and caddy_sse_streams_ended_total by reason with the lines'
// reasons.
func TestMetricsCountEveryEvent(t *testing.T) {
	rec := report.start(t, "metrics-events")
	up := newUpstream(t)
	up.handle("gzpush", gzipPushBehavior)
	up.handle("reset", resetBehavior)
	up.handle("flood", floodBehavior)
	p := startCaddyProcess(t, buildCaddy(t), up, metricsProfiles(1))
	client := newHTTPClient(t, &http.Transport{})
	accept := http.Header{"Accept": {"text/event-stream"}}

	const eventsMetric = "caddy_sse_events_total"
	start := p.metrics(t)
	before := start
	logged := 0
	var sumLogged int64
	var rows []string
	// step runs one way of ending: run opens the streams and ends them;
	// clientEvents (-1 where the client did not read) are the events each
	// client parsed, in the order of their log lines' URIs.
	step := func(name string, wantReason string, run func() map[string]int) {
		t.Helper()
		parsed := run()
		lines := p.waitLogged(t, streamEndMessages, logged+len(parsed), 5*time.Second)[logged:]
		logged += len(lines)
		var stepLogged int64
		for _, l := range lines {
			stepLogged += l.Events
			if l.Reason != wantReason {
				t.Errorf("%s: the stream %s ended with reason %q, want %q", name, l.URI, l.Reason, wantReason)
			}
			for key, n := range parsed {
				if strings.HasSuffix(l.URI, "?k="+key) && n >= 0 && int64(n) != l.Events {
					t.Errorf("%s: the log counts %d events for %s, its client parsed %d", name, l.Events, key, n)
				}
			}
		}
		sumLogged += stepLogged
		after := p.metrics(t)
		delta := after[eventsMetric] - before[eventsMetric]
		if delta != float64(stepLogged) {
			t.Errorf("%s: %s grew by %v, the \"stream ended\" lines count %d events", name, eventsMetric, delta, stepLogged)
		}
		rows = append(rows, fmt.Sprintf("%s: %v/%d", name, delta, stepLogged))
		before = after
	}
	// parse returns the events a client parsed, the gateway's close event
	// left out.
	parse := func(s *clientStream) int {
		body, _ := s.snapshot()
		n := 0
		for _, e := range ssespec.Parse(body).Events {
			if e.Type != "bye" {
				n++
			}
		}
		return n
	}
	openPush := func(route, behavior string) (string, *clientStream, *upstreamRequest) {
		t.Helper()
		key := up.key(route)
		s := openStream(t, client, p.httpURL+"/p/"+route+"/"+behavior+"?k="+key, accept)
		return key, s, up.request(t, key, 1, 5*time.Second)
	}
	events := func(from, n int) string {
		var b strings.Builder
		for i := from; i < from+n; i++ {
			fmt.Fprintf(&b, "id: %d\ndata: event %d\n\n", i, i)
		}
		return b.String()
	}

	step("upstream end", "upstream_end", func() map[string]int {
		key, s, req := openPush("plain", "push")
		req.send(t, events(1, 3))
		close(req.push)
		if err, _ := s.waitEnd(t, slack); err != nil {
			t.Errorf("upstream end: %v", err)
		}
		return map[string]int{key: parse(s)}
	})
	step("upstream end, gzip", "upstream_end", func() map[string]int {
		key, s, req := openPush("plain", "gzpush")
		req.send(t, events(1, 2))
		req.send(t, events(3, 2))
		close(req.push)
		if err, _ := s.waitEnd(t, slack); err != nil {
			t.Errorf("gzip upstream end: %v", err)
		}
		return map[string]int{key: parse(s)}
	})
	step("client gone", "client_gone", func() map[string]int {
		key, s, req := openPush("plain", "push")
		req.send(t, events(1, 2))
		s.waitContains(t, "data: event 2\n\n", 0, slack)
		s.hangUp()
		req.waitEnded(t, teardownBound+slack)
		return map[string]int{key: parse(s)}
	})
	step("upstream error mid-event", "upstream_error", func() map[string]int {
		key, s, req := openPush("plain", "reset")
		s.waitContains(t, "data: half", 0, slack)
		close(req.push)
		s.waitEnd(t, slack)
		return map[string]int{key: parse(s)}
	})
	step("idle close", "idle_timeout", func() map[string]int {
		key, s, req := openPush("idle", "push")
		req.send(t, events(1, 2))
		s.waitContains(t, "data: idle_timeout\n\n", 0, 500*time.Millisecond+slack)
		s.waitEnd(t, slack)
		return map[string]int{key: parse(s)}
	})
	step("lifetime close waiting for the event in flight", "max_lifetime", func() map[string]int {
		key, s, req := openPush("life", "push")
		req.send(t, events(1, 1)+"id: 2\ndata: in fli")
		s.waitContains(t, "data: in fli", 0, slack)
		// The lifetime runs from the gateway's arrival, before the
		// upstream's: past this moment, with room for the timer, the
		// close waits for the event in flight.
		<-time.After(time.Until(req.Started.Add(metricsLifetime + 300*time.Millisecond)))
		req.send(t, "ght\n\nid: 3\ndata: after the close\n\n")
		s.waitEnd(t, slack)
		body, _ := s.snapshot()
		if want := "data: in flight\n\nretry: 1000\nevent: bye\ndata: max_lifetime\n\n"; !bytes.HasSuffix(body, []byte(want)) {
			t.Errorf("the lifetime close gave the client %q, want the event in flight finished, then the close sequence", clip(body))
		}
		return map[string]int{key: parse(s)}
	})
	step("stalled client", "write_timeout", func() map[string]int {
		req := openStalledClient(t, up, p.httpPort, "/p/stall/flood")
		req.waitEnded(t, time.Second+5*time.Second)
		return map[string]int{req.Key: -1}
	})
	step("drain (reload)", "drain", func() map[string]int {
		parsed := map[string]int{}
		var streams []*clientStream
		for range 2 {
			key, s, req := openPush("plain", "push")
			req.send(t, events(1, 2))
			s.waitContains(t, "data: event 2\n\n", 0, slack)
			streams = append(streams, s)
			parsed[key] = -1
		}
		p.load(t, metricsProfiles(2))
		for i, s := range streams {
			s.waitContains(t, "data: drain\n\n", 0, time.Second+slack)
			s.waitEnd(t, slack)
			for key := range parsed {
				if strings.Contains(s.resp.Request.URL.RawQuery, "k="+key) {
					parsed[key] = parse(streams[i])
				}
			}
		}
		return parsed
	})

	end := p.metrics(t)
	total := end[eventsMetric] - start[eventsMetric]
	if total != float64(sumLogged) {
		t.Errorf("over the whole run %s grew by %v, the \"stream ended\" lines count %d events", eventsMetric, total, sumLogged)
	}
	byReason := map[string]int{}
	for _, l := range p.sseLog(t) {
		if l.Msg == msgStreamEnded || l.Msg == msgUpstreamBroke {
			byReason[l.Reason]++
		}
	}
	var reasons []string
	for reason, n := range byReason {
		sample := fmt.Sprintf(`caddy_sse_streams_ended_total{reason=%q}`, reason)
		if got := end[sample] - start[sample]; got != float64(n) {
			t.Errorf("%s grew by %v, the log has %d such ends", sample, got, n)
		}
		reasons = append(reasons, fmt.Sprintf("%s %d", reason, n))
	}
	sort.Strings(reasons)
	figure(t, rec, "%s grew by %v over %d streams, whose \"stream ended\" lines count %d events", eventsMetric, total, logged, sumLogged)
	figure(t, rec, "per way of ending, metric/log: %s", strings.Join(rows, "; "))
	figure(t, rec, "stream ends logged by reason: %s", strings.Join(reasons, ", "))
}
