package proof

import (
	"context"
	"crypto/tls"
	"fmt"
	"net"
	"net/http"
	"reflect"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/quic-go/quic-go"
	"github.com/quic-go/quic-go/http3"

	"github.com/ssegateway/caddy-sse/internal/ssespec"
)

// Options of the routes TestProtocols uses; the waits derive from them.
const (
	protoHeartbeat   = time.Second
	protoMaxLifetime = time.Second
	protoRetry       = 500 * time.Millisecond
	// flushBound is how late an event may reach the client after the
	// upstream wrote it. It is far below the heartbeat period, so a gateway
	// that held bytes back until its next heartbeat would fail.
	flushBound = 300 * time.Millisecond
	// teardownBound is how soon the upstream must see its connection end
	// after the client hung up.
	teardownBound = time.Second
	// slack absorbs scheduling delays on a busy machine.
	slack = time.Second
)

// TestProtocols streams over HTTP/1.1, HTTP/2 and HTTP/3 and checks on each
// that events are flushed at once, heartbeats come while the stream is
// quiet, max_lifetime ends the stream with its close sequence, and a client
// that hangs up makes the upstream see its connection end.
func TestProtocols(t *testing.T) {
	up := newUpstream(t)
	g := startGateway(t, up, gatewayConfig{profiles: map[string]profile{
		"plain": {sse: fmt.Sprintf("heartbeat %s\nwrite_timeout 2s", protoHeartbeat)},
		"life": {sse: fmt.Sprintf("heartbeat %s\nmax_lifetime %s\nlifetime_jitter 0\nretry %s\nclose_event bye",
			protoHeartbeat, protoMaxLifetime, protoRetry)},
	}})

	t.Run("HTTP1.1", func(t *testing.T) {
		rec := report.start(t, "http1")
		client := newHTTPClient(t, &http.Transport{})
		checkProtocol(t, rec, up, client, g.httpURL, 1)
	})
	t.Run("HTTP2", func(t *testing.T) {
		rec := report.start(t, "http2")
		client := newHTTPClient(t, &http.Transport{TLSClientConfig: g.tlsConfig(), ForceAttemptHTTP2: true})
		checkProtocol(t, rec, up, client, g.httpsURL, 2)
	})
	t.Run("HTTP3", func(t *testing.T) {
		rec := report.start(t, "http3")
		checkProtocol(t, rec, up, newHTTP3Client(t, g, nil), g.httpsURL, 3)
	})
	waitNoModuleGoroutines(t, 5*time.Second)
}

// newHTTP3Client returns an HTTP/3 client for the gateway's TLS site,
// closed when the test ends. quicConfig may be nil.
func newHTTP3Client(t *testing.T, g *gateway, quicConfig *quic.Config) *http.Client {
	h3 := &http3.Transport{
		TLSClientConfig:    g.tlsConfig(),
		QUICConfig:         quicConfig,
		DisableCompression: true,
		// The site is named localhost but Caddy listens on 127.0.0.1
		// only; localhost may resolve to ::1 first.
		Dial: func(ctx context.Context, _ string, tlsCfg *tls.Config, cfg *quic.Config) (*quic.Conn, error) {
			return quic.DialAddrEarly(ctx, net.JoinHostPort("127.0.0.1", strconv.Itoa(g.httpsPort)), tlsCfg, cfg)
		},
	}
	t.Cleanup(func() { h3.Close() })
	return &http.Client{Transport: h3}
}

func checkProtocol(t *testing.T, rec *caseRecorder, up *upstream, client *http.Client, base string, protoMajor int) {
	// Events are flushed at once, then a heartbeat comes after a heartbeat
	// period of quiet.
	key := up.key("flush")
	s := openStream(t, client, base+"/p/plain/push?k="+key, nil)
	if s.resp.ProtoMajor != protoMajor {
		t.Fatalf("the response came over %s, want HTTP/%d", s.resp.Proto, protoMajor)
	}
	if s.resp.StatusCode != http.StatusOK {
		t.Fatalf("status %d", s.resp.StatusCode)
	}
	for header, want := range map[string]string{
		"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no",
	} {
		if got := s.resp.Header.Get(header); got != want {
			t.Errorf("header %s = %q, want %q", header, got, want)
		}
	}
	req := up.request(t, key, 1, 5*time.Second)
	var latencies []time.Duration
	offset := 0
	var lastArrival time.Time
	for i := 1; i <= 5; i++ {
		sentAt := req.send(t, fmt.Sprintf("id: %d\ndata: event %d\n\n", i, i))
		offset, lastArrival = s.waitContains(t, fmt.Sprintf("data: event %d\n\n", i), offset, flushBound+slack)
		latency := lastArrival.Sub(sentAt)
		latencies = append(latencies, latency)
		if latency > flushBound {
			t.Errorf("event %d reached the client %s after the upstream wrote it, want at most %s", i, latency, flushBound)
		}
	}
	rec.figure("event delivery p50 %s, max %s (n=%d)", ms(percentile(latencies, 50)), ms(percentile(latencies, 100)), len(latencies))

	_, heartbeatAt := s.waitContains(t, "\n\n:\n\n", offset-2, protoHeartbeat+slack)
	quiet := heartbeatAt.Sub(lastArrival)
	if quiet < protoHeartbeat-50*time.Millisecond {
		t.Errorf("a heartbeat came %s after the last event, before the heartbeat period %s", quiet, protoHeartbeat)
	}
	rec.figure("first heartbeat after %s of quiet (heartbeat %s)", ms(quiet), protoHeartbeat)
	body, _ := s.snapshot()
	if got := ssespec.Parse(body).Events; len(got) != 5 || got[4].Data != "event 5" || got[4].LastEventID != "5" {
		t.Errorf("the client parsed %+v, want events 1 to 5", got)
	}

	// The client hangs up: the upstream must see its connection end. The
	// first stream, then more streams for the figures.
	measureHangUp := func(s *clientStream, req *upstreamRequest) {
		t.Helper()
		hungUp := s.hangUp()
		ended := req.waitEnded(t, teardownBound+slack)
		d := ended.Sub(hungUp)
		if d > teardownBound {
			t.Errorf("the upstream saw its connection end %s after the client hung up, want at most %s", d, teardownBound)
		}
		rec.teardown(d)
	}
	measureHangUp(s, req)
	for range 9 {
		key := up.key("hangup")
		s := openStream(t, client, base+"/p/plain/push?k="+key, nil)
		req := up.request(t, key, 1, 5*time.Second)
		req.send(t, "data: hello\n\n")
		s.waitContains(t, "data: hello\n\n", 0, flushBound+slack)
		measureHangUp(s, req)
	}

	// max_lifetime: the close sequence, then a clean end of the body, and
	// the upstream released.
	key = up.key("life")
	s = openStream(t, client, base+"/p/life/push?k="+key, nil)
	opened := time.Now()
	req = up.request(t, key, 1, 5*time.Second)
	req.send(t, "id: 7\ndata: before the close\n\n")
	err, endedAt := s.waitEnd(t, protoMaxLifetime+slack)
	if err != nil {
		t.Errorf("the body ended with %v at max_lifetime, want a clean end", err)
	}
	lived := endedAt.Sub(opened)
	if lived < protoMaxLifetime-100*time.Millisecond || lived > protoMaxLifetime+slack {
		t.Errorf("the stream lived %s, want about max_lifetime %s", lived, protoMaxLifetime)
	}
	body, _ = s.snapshot()
	wantTail := fmt.Sprintf("retry: %d\nevent: bye\ndata: max_lifetime\n\n", protoRetry.Milliseconds())
	if !strings.HasSuffix(string(body), wantTail) {
		t.Errorf("the body ends %q, want the close sequence %q", clip(body), wantTail)
	}
	got := ssespec.Parse(body)
	want := ssespec.Result{
		Events: []ssespec.Event{
			{Type: "message", Data: "before the close", LastEventID: "7"},
			{Type: "bye", Data: "max_lifetime", LastEventID: "7"},
		},
		Retries:     []int64{protoRetry.Milliseconds()},
		LastEventID: "7",
	}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("the client parsed %+v, want %+v", got, want)
	}
	upstreamEnd := req.waitEnded(t, slack).Sub(endedAt)
	rec.figure("max_lifetime close after %s; upstream end %s after the client's end of body", ms(lived), ms(upstreamEnd))
}
