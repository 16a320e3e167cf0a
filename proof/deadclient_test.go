package proof

import (
	"context"
	"fmt"
	"net"
	"net/http"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/quic-go/quic-go"
)

// floodBehavior sends 16 KiB events as fast as the connection takes them,
// until it is closed.
func floodBehavior(w http.ResponseWriter, r *http.Request, req *upstreamRequest) {
	if startEventStream(w, req) != nil {
		return
	}
	event := []byte("data: " + strings.Repeat("x", 16<<10) + "\n\n")
	for req.writeFlush(w, event) == nil {
	}
}

// TestStalledClient has clients that never read while the upstream floods
// them: raw TCP clients with a tiny receive window over HTTP/1.1, and
// HTTP/2 and HTTP/3 clients that leave the body unread until flow control
// stops the gateway. The gateway's writes block, and the write deadline
// must tear each stream and its upstream down, without the gateway holding
// the unsent data.
func TestStalledClient(t *testing.T) {
	const writeTimeout = 2 * time.Second
	rec := report.start(t, "stalled")
	up := newUpstream(t)
	up.handle("flood", floodBehavior)
	g := startGateway(t, up, gatewayConfig{profiles: map[string]profile{
		"stall": {sse: fmt.Sprintf("heartbeat 200ms\nwrite_timeout %s", writeTimeout)},
	}})
	baseline := liveHeap()

	type stalled struct {
		proto string
		req   *upstreamRequest
	}
	var clients []stalled

	// HTTP/1.1: raw TCP clients with a tiny receive window.
	dialer := net.Dialer{Timeout: 5 * time.Second, Control: func(_, _ string, c syscall.RawConn) error {
		var err error
		cerr := c.Control(func(fd uintptr) { err = setReceiveBuffer(fd, 4096) })
		if cerr != nil {
			return cerr
		}
		return err
	}}
	for range 3 {
		conn, err := dialer.Dial("tcp", net.JoinHostPort("127.0.0.1", strconv.Itoa(g.httpPort)))
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		key := up.key("stall")
		fmt.Fprintf(conn, "GET /p/stall/flood?k=%s HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: text/event-stream\r\n\r\n", key)
		clients = append(clients, stalled{"HTTP/1.1", up.request(t, key, 1, 5*time.Second)})
	}
	// HTTP/2 and HTTP/3: the response header is read, the body never. The
	// clients' receive windows are kept small, so that the unread data
	// they hold in this process does not hide the gateway's memory.
	const window = 64 << 10
	for proto, client := range map[string]*http.Client{
		"HTTP/2": newHTTPClient(t, &http.Transport{
			TLSClientConfig:   g.tlsConfig(),
			ForceAttemptHTTP2: true,
			HTTP2:             &http.HTTP2Config{MaxReceiveBufferPerStream: window, MaxReceiveBufferPerConnection: 4 * window},
		}),
		"HTTP/3": newHTTP3Client(t, g, &quic.Config{
			InitialStreamReceiveWindow: window, MaxStreamReceiveWindow: window,
			InitialConnectionReceiveWindow: 4 * window, MaxConnectionReceiveWindow: 4 * window,
		}),
	} {
		for range 2 {
			key := up.key("stall")
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			r := <-asyncGet(ctx, client, g.httpsURL+"/p/stall/flood?k="+key)
			if r.err != nil {
				t.Fatalf("%s: %v", proto, r.err)
			}
			if want := proto[len("HTTP/"):]; strconv.Itoa(r.resp.ProtoMajor) != want {
				t.Fatalf("the response came over %s, want %s", r.resp.Proto, proto)
			}
			defer r.resp.Body.Close()
			clients = append(clients, stalled{proto, up.request(t, key, 1, 5*time.Second)})
		}
	}

	// The flood fills every buffer and window on the way within
	// milliseconds; then the upstreams' writes block: backpressure reaches
	// them, nothing on the way buffers without bound. Measure the heap
	// while all are stalled: it is the whole process's (gateway, upstream
	// and the HTTP/2 and HTTP/3 clients' connections), hence 4 MiB.
	allStalled := func() bool {
		for _, c := range clients {
			last := c.req.lastWrite.Load()
			if !c.req.hasEnded() && (last == 0 || time.Since(time.Unix(0, last)) < 300*time.Millisecond) {
				return false
			}
		}
		return true
	}
	waitUntil(t, "the upstreams' writes to block", 10*time.Second, allStalled)
	if !clients[0].req.hasEnded() {
		growth := int64(liveHeap()) - int64(baseline)
		if growth > 4<<20 {
			t.Errorf("the live heap grew by %d KiB while %d clients were stalled; the gateway seems to buffer", growth>>10, len(clients))
		}
		rec.figure("live heap %+d KiB while %d clients were stalled", growth>>10, len(clients))
	}

	worst := map[string]time.Duration{}
	for _, c := range clients {
		endedAt := c.req.waitEnded(t, writeTimeout+5*time.Second)
		d := endedAt.Sub(time.Unix(0, c.req.lastWrite.Load()))
		if d > writeTimeout+slack {
			t.Errorf("%s: an upstream's connection ended %s after its last successful write, want at most write_timeout %s + %s", c.proto, d, writeTimeout, slack)
		}
		worst[c.proto] = max(worst[c.proto], d)
		rec.teardown(d)
	}
	ends := g.waitStreamEnds(t, len(clients), 2*time.Second)
	for _, e := range ends {
		if e.Reason != "write_timeout" {
			t.Errorf("the gateway logged an end as %q, want write_timeout", e.Reason)
		}
	}
	rec.figure("write_timeout %s; all %d ends logged as write_timeout; worst teardown HTTP/1.1 %s, HTTP/2 %s, HTTP/3 %s",
		writeTimeout, len(ends), ms(worst["HTTP/1.1"]), ms(worst["HTTP/2"]), ms(worst["HTTP/3"]))
	up.waitQuiet(t, 5*time.Second)
	waitNoModuleGoroutines(t, 5*time.Second)
}
