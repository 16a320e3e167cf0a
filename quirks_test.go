package caddysse

import (
	"net/http"
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus/testutil"
	"go.uber.org/zap"
)

func quirkCount(q quirk) float64 {
	return testutil.ToFloat64(sseMetrics.quirks.WithLabelValues(string(q)))
}

// TestQuirksAbsorbedAndReportedOncePerRoute runs two streams with each
// quirk through one handler: each is handled where it can be, counted per
// stream, and warned about once.
func TestQuirksAbsorbedAndReportedOncePerRoute(t *testing.T) {
	h := &Handler{Heartbeat: -1}
	clock, logs := provisionTest(t, h)
	before := map[quirk]float64{}
	for _, q := range allQuirks {
		before[q] = quirkCount(q)
	}
	event := "data: " + strings.Repeat("x", 600) + "\n\n"
	burst := strings.Repeat(event, 7) // 4312 bytes, 7 events: a flushed 4 KiB buffer
	for range 2 {
		up := newScriptedUpstream()
		up.contentType = "text/event-stream;charset=UTF-8"
		up.header = http.Header{"Content-Length": {"100000"}}
		run := startStream(t, h, clock, up)
		if ct, cl := run.w.Header().Get("Content-Type"), run.w.Header().Get("Content-Length"); ct != "text/event-stream" || cl != "" {
			t.Fatalf("client got Content-Type %q, Content-Length %q", ct, cl)
		}
		mustSend(t, run, burst)
		mustSend(t, run, burst)
		mustSend(t, run, "id: a\x01b\ndata: ctl\n\n")
		run.endUpstream()
		run.wait()
	}
	for _, q := range allQuirks {
		if q == quirkPerUserResponse {
			continue // a shared stream's (TestShareAdversarial, proof suite)
		}
		if got := quirkCount(q) - before[q]; got != 2 {
			t.Errorf("%s counted %v times, want 2 (once per stream)", q, got)
		}
		if n := logs.FilterField(zapQuirk(q)).Len(); n != 1 {
			t.Errorf("%s warned %d times, want once", q, n)
		}
	}
	if n := logs.FilterMessageSnippet("output_buffering").Len(); n != 1 {
		t.Errorf("the buffering warning does not name PHP's output_buffering")
	}
}

// TestNoBufferingReportForALiveStream checks the buffering report's other
// side: a stream that sends each event as it happens, and later a backlog
// in one write, is not reported.
func TestNoBufferingReportForALiveStream(t *testing.T) {
	h := &Handler{Heartbeat: -1}
	clock, _ := provisionTest(t, h)
	before := quirkCount(quirkBuffered)
	run := startStream(t, h, clock, newScriptedUpstream())
	event := "data: " + strings.Repeat("x", 600) + "\n\n"
	mustSend(t, run, event)
	mustSend(t, run, strings.Repeat(event, 10))
	mustSend(t, run, strings.Repeat(event, 10))
	run.endUpstream()
	run.wait()
	if got := quirkCount(quirkBuffered) - before; got != 0 {
		t.Fatalf("a live stream was reported as buffered")
	}
}

func zapQuirk(q quirk) zap.Field { return zap.String("quirk", string(q)) }
