package proof

import (
	"net/http"
	"strings"
	"testing"
	"time"
)

// TestQuietStreamOutlivesWriteTimeout keeps a stream quiet (no heartbeats,
// no events) for twice write_timeout on each protocol, then sends an event:
// the stream must still be open and deliver it. The gateway's write
// deadline stays armed between writes; over HTTP/2 a deadline that runs out
// resets the stream even while it is idle, so the gateway must clear it in
// time.
func TestQuietStreamOutlivesWriteTimeout(t *testing.T) {
	const writeTimeout = 500 * time.Millisecond
	up := newUpstream(t)
	g := startGateway(t, up, gatewayConfig{profiles: map[string]profile{
		"quiet": {sse: "heartbeat off\nwrite_timeout " + writeTimeout.String()},
	}})
	for _, tc := range []struct {
		name   string
		client func() *http.Client
		base   string
		proto  int
	}{
		{"HTTP1.1", func() *http.Client { return newHTTPClient(t, &http.Transport{}) }, g.httpURL, 1},
		{"HTTP2", func() *http.Client {
			return newHTTPClient(t, &http.Transport{TLSClientConfig: g.tlsConfig(), ForceAttemptHTTP2: true})
		}, g.httpsURL, 2},
		{"HTTP3", func() *http.Client { return newHTTP3Client(t, g, nil) }, g.httpsURL, 3},
	} {
		t.Run(tc.name, func(t *testing.T) {
			key := up.key("quiet")
			s := openStream(t, tc.client(), tc.base+"/p/quiet/push?k="+key, nil)
			if s.resp.ProtoMajor != tc.proto {
				t.Fatalf("the response came over %s, want HTTP/%d", s.resp.Proto, tc.proto)
			}
			req := up.request(t, key, 1, 5*time.Second)
			req.send(t, "data: before\n\n")
			s.waitContains(t, "data: before\n\n", 0, 5*time.Second)
			// The deadline armed by that write would run out during this.
			<-time.After(2 * writeTimeout)
			req.send(t, "data: after\n\n")
			s.waitContains(t, "data: after\n\n", 0, 5*time.Second)
			if body, ended := s.snapshot(); ended || strings.Count(string(body), "data:") != 2 {
				t.Fatalf("body %q (ended: %v), want both events on a stream still open", body, ended)
			}
			s.hangUp()
			req.waitEnded(t, 5*time.Second)
		})
	}
}
