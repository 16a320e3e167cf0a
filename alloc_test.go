package caddysse

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/binary"
	"fmt"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"go.uber.org/zap"
	"golang.org/x/net/http2"
)

// Forwarding an event and writing a heartbeat must cost the gateway no
// allocation. TestAllocsPerEventAndHeartbeat checks it where a user's
// streams run: over a real net/http server connection, HTTP/1.1 (cleartext
// and TLS) and HTTP/2 (served as Caddy serves it, by golang.org/x/net/http2
// over TLS), with Caddy's write deadline writer under the stream, put there
// by Caddy's server (write_idle_timeout is on by default) or by the stream
// itself when it is off.
//
// testing.AllocsPerRun counts every allocation in the process, so the
// client must allocate nothing while it reads: it reads the socket's raw
// bytes into one buffer and never parses or decrypts them. Go's HTTP/2
// client would allocate per frame it reads, so the HTTP/2 client writes
// its few frames by hand (preface, SETTINGS, WINDOW_UPDATE, one HEADERS)
// and opens the flow-control windows so wide that the server never waits
// for it.
//
// Each figure is measured twice on the same connection: through the stream
// writer, and through the writer right below it (Caddy's deadline writer:
// write the same bytes, flush). Through the stream it must be connAllocs'
// figure, which is 0 over HTTP/1.1 for events under 256 bytes and for
// heartbeats; the second measurement says whether a difference is the
// gateway's or the connection's.

// connAllocs is what net/http (and x/net/http2) and Caddy's deadline writer
// allocate per write-and-flush below the stream, by protocol. Events over
// HTTP/1.1 are chunked; a chunk of 256 bytes or more costs net/http one
// allocation (chunkWriter.Write formats its size with fmt.Fprintf, which
// boxes the length in an interface), so the figures are per chunk size.
var connAllocs = map[string]struct{ small, large float64 }{
	"HTTP/1.1":          {0, 1},
	"HTTP/1.1 over TLS": {0, 1},
	// Over HTTP/2 every flush costs 9 allocations, none of them the
	// gateway's:
	//   - 4: Caddy's deadline writer over HTTP/2 (ClearBetweenWrites) sets
	//     the write deadline before and clears it after both the write and
	//     the flush; each http2 responseWriter.SetWriteDeadline allocates
	//     the closure it sends to the connection's serve loop;
	//   - 4: every clear drops the stream's deadline timer, so each of the
	//     two resets creates a new one with time.AfterFunc (a timer and the
	//     method value st.onWriteTimeout);
	//   - 1: the serve loop flushes the connection's buffer in a goroutine
	//     of its own (go sc.writeFrameAsync) after each DATA frame.
	"HTTP/2": {9, 9},
}

// rawClient reads a response off its connection as raw bytes into one
// buffer, counting them: its reads allocate nothing.
type rawClient struct {
	conn     net.Conn
	received atomic.Int64
}

func (c *rawClient) read() {
	buf := make([]byte, 64<<10)
	for {
		n, err := c.conn.Read(buf)
		c.received.Add(int64(n))
		if err != nil {
			return
		}
	}
}

// waitReceived waits until the client has read at least n bytes.
func (c *rawClient) waitReceived(t *testing.T, n int64) {
	t.Helper()
	deadline := time.Now().Add(testWait)
	for c.received.Load() < n {
		if time.Now().After(deadline) {
			t.Fatalf("client read %d bytes, want at least %d", c.received.Load(), n)
		}
		time.Sleep(time.Millisecond)
	}
}

// h2Request is what an HTTP/2 client sends to open one stream request on
// a fresh connection, with the flow-control windows opened to the maximum.
func h2Request() []byte {
	const maxWindow = 1<<31 - 1
	frame := func(out []byte, typ, flags byte, stream uint32, payload []byte) []byte {
		out = append(out, byte(len(payload)>>16), byte(len(payload)>>8), byte(len(payload)), typ, flags)
		out = binary.BigEndian.AppendUint32(out, stream)
		return append(out, payload...)
	}
	out := []byte(http2.ClientPreface)
	// SETTINGS: SETTINGS_INITIAL_WINDOW_SIZE (4) = 2^31-1; then the ack of
	// the server's SETTINGS, which it sends before reading anything.
	out = frame(out, 0x4, 0, 0, []byte{0, 4, 0x7f, 0xff, 0xff, 0xff})
	out = frame(out, 0x4, 0x1, 0, nil)
	// WINDOW_UPDATE: the connection's window up to 2^31-1.
	out = frame(out, 0x8, 0, 0, binary.BigEndian.AppendUint32(nil, maxWindow-65535))
	// HEADERS (END_STREAM | END_HEADERS) in HPACK, from the static table:
	// :method GET, :scheme https, :path /, then :authority (1) and
	// accept (19) as literals with indexed names.
	block := []byte{0x82, 0x87, 0x84, 0x41, byte(len("localhost"))}
	block = append(block, "localhost"...)
	block = append(block, 0x40|19, byte(len("text/event-stream")))
	block = append(block, "text/event-stream"...)
	return frame(out, 0x1, 0x5, 1, block)
}

// allocStream serves one stream through the handler to a raw client over
// proto (a key of connAllocs), and returns the stream writer the upstream
// writes to, once its header is out, and the writer below it.
// serverWriter puts Caddy's deadline writer under the stream the way
// Caddy's server does; without it the stream puts its own in place.
func allocStream(t *testing.T, h *Handler, proto string, serverWriter bool) (*stream, *caddyhttp.IdleTimeoutWriter, *rawClient) {
	t.Helper()
	streams := make(chan *stream, 1)
	release := make(chan struct{})
	next := handlerFunc(func(w http.ResponseWriter, r *http.Request) error {
		w.Header().Set("Content-Type", "text/event-stream")
		w.WriteHeader(http.StatusOK)
		streams <- w.(*stream)
		<-release
		return nil
	})
	srv := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if serverWriter {
			// What caddyhttp.Server.ServeHTTP does with write_idle_timeout.
			iw := &caddyhttp.IdleTimeoutWriter{
				ResponseWriterWrapper: &caddyhttp.ResponseWriterWrapper{ResponseWriter: w},
				Ctrl:                  http.NewResponseController(w),
				Deadline:              caddyhttp.IdleDeadline{Start: time.Now(), Timeout: time.Minute},
				Logger:                zap.NewNop(),
				ClearBetweenWrites:    r.ProtoMajor == 2,
			}
			defer iw.HandlerDone()
			w = iw
			r = r.WithContext(caddyhttp.ContextWithIdleTimeouts(r.Context(), nil, iw))
		}
		if err := h.ServeHTTP(w, r, next); err != nil {
			t.Errorf("ServeHTTP: %v", err)
		}
	}))
	srv.Config.ConnContext = func(ctx context.Context, c net.Conn) context.Context { return withConn(ctx, c) }
	var client net.Conn
	var err error
	if proto == "HTTP/1.1" {
		srv.Start()
		client, err = net.DialTimeout("tcp", srv.Listener.Addr().String(), testWait)
	} else {
		// As Caddy serves HTTP/2 (caddyhttp.App.Start).
		if err := http2.ConfigureServer(srv.Config, new(http2.Server)); err != nil {
			t.Fatal(err)
		}
		srv.TLS = &tls.Config{NextProtos: []string{"h2", "http/1.1"}}
		srv.StartTLS()
		roots := x509.NewCertPool()
		roots.AddCert(srv.Certificate())
		alpn := "http/1.1"
		if proto == "HTTP/2" {
			alpn = "h2"
		}
		client, err = tls.DialWithDialer(&net.Dialer{Timeout: testWait}, "tcp", srv.Listener.Addr().String(),
			&tls.Config{RootCAs: roots, NextProtos: []string{alpn}})
	}
	if err != nil {
		t.Fatal(err)
	}
	// Cleanups run last first: the handler returns, then the client hangs
	// up, then the server closes.
	t.Cleanup(srv.Close)
	t.Cleanup(func() { client.Close() })
	t.Cleanup(func() { close(release) })
	client.SetDeadline(time.Now().Add(time.Minute))
	request := []byte("GET /events HTTP/1.1\r\nHost: localhost\r\nAccept: text/event-stream\r\n\r\n")
	if proto == "HTTP/2" {
		request = h2Request()
	}
	if _, err := client.Write(request); err != nil {
		t.Fatal(err)
	}
	// Over TLS, the client reads the encrypted bytes off the socket:
	// crypto/tls allocates now and then in a Read that has to wait for the
	// rest of a record. They are counted as they come, so the count is a
	// lower bound of what was sent, which is all the test needs.
	c := &rawClient{conn: client}
	if tc, ok := client.(*tls.Conn); ok {
		c.conn = tc.NetConn()
	}
	go c.read()

	select {
	case sw := <-streams:
		wantMajor := 1
		if proto == "HTTP/2" {
			wantMajor = 2
		}
		if sw.req.ProtoMajor != wantMajor || (sw.req.TLS != nil) != (proto != "HTTP/1.1") {
			t.Fatalf("stream served over %s (TLS: %v), want %s", sw.req.Proto, sw.req.TLS != nil, proto)
		}
		below := sw.ownDeadlineWriter
		if serverWriter {
			_, below = caddyhttp.IdleTimeoutsFromContext(sw.req.Context())
		}
		if below == nil {
			t.Fatal("no deadline writer under the stream")
		}
		return sw, below, c
	case <-time.After(testWait):
		t.Fatal("stream did not start")
	}
	return nil, nil, nil
}

func TestAllocsPerEventAndHeartbeat(t *testing.T) {
	if raceEnabled {
		// The race detector drops sync.Pool items at random, and net/http's
		// writers draw their buffers from pools.
		t.Skip("allocation counts are meaningless under the race detector")
	}
	const runs = 1000
	for _, proto := range []string{"HTTP/1.1", "HTTP/1.1 over TLS", "HTTP/2"} {
		for _, serverWriter := range []bool{true, false} {
			name := proto + ", the stream's own deadline writer"
			if serverWriter {
				name = proto + ", Caddy's server's deadline writer"
			}
			t.Run(name, func(t *testing.T) {
				h := &Handler{Heartbeat: seconds(1)}
				clock, _ := provisionTest(t, h)
				h.logger = zap.NewNop()
				sw, below, client := allocStream(t, h, proto, serverWriter)
				// measure counts the allocations per call of write through
				// the stream, and per write-and-flush of the same n bytes
				// through the writer below it, and checks that n*(runs+1)
				// bytes of each reached the client.
				measure := func(what string, n int, write func(), want float64) {
					t.Helper()
					received := client.received.Load()
					got := testing.AllocsPerRun(runs, write)
					client.waitReceived(t, received+int64(n*(runs+1)))

					bytes := make([]byte, n)
					received = client.received.Load()
					conn := testing.AllocsPerRun(runs, func() {
						if _, err := below.Write(bytes); err != nil {
							t.Fatal(err)
						}
						if err := below.FlushError(); err != nil {
							t.Fatal(err)
						}
					})
					client.waitReceived(t, received+int64(n*(runs+1)))
					t.Logf("%s: %v allocations through the stream, %v below it", what, got, conn)
					if got != want {
						t.Errorf("%s: %v allocations per call through the stream, want %v", what, got, want)
					}
					if got != conn {
						t.Errorf("%s: the stream writer adds %v allocations to the %v of the connection and the deadline writer", what, got-conn, conn)
					}
					if conn != want {
						t.Errorf("%s: the connection and the deadline writer allocate %v per write-and-flush, connAllocs says %v: find out why, then correct connAllocs and the README", what, conn, want)
					}
				}
				for _, size := range []int{100, 1 << 10} {
					event := []byte("id: 12345\nevent: tick\ndata: " + strings.Repeat("x", size-30) + "\n\n")
					want := connAllocs[proto].small
					if size >= 256 {
						want = connAllocs[proto].large
					}
					measure(fmt.Sprintf("%d B event", size), size, func() {
						if _, err := sw.Write(event); err != nil {
							t.Fatal(err)
						}
					}, want)
				}
				// A heartbeat: the stream's timer finds it quiet for a
				// heartbeat period, writes the comment and re-arms.
				beats := sw.heartbeats
				measure("heartbeat", len(h.heartbeatLine), func() { clock.Advance(time.Second) }, connAllocs[proto].small)
				if n := sw.heartbeats - beats; n != runs+1 {
					t.Errorf("%d heartbeats written in %d heartbeat periods", n, runs+1)
				}
			})
		}
	}
}
