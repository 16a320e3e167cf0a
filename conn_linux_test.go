package caddysse

import (
	"context"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// sockUserTimeout reads TCP_USER_TIMEOUT of c, in milliseconds, or -1.
// Like setSockUserTimeout, it may be called from the server's goroutines.
func sockUserTimeout(t *testing.T, c *net.TCPConn) int {
	t.Helper()
	raw, err := c.SyscallConn()
	if err != nil {
		t.Error(err)
		return -1
	}
	var ms int
	var serr error
	if err := raw.Control(func(fd uintptr) {
		ms, serr = unix.GetsockoptInt(int(fd), unix.IPPROTO_TCP, unix.TCP_USER_TIMEOUT)
	}); err != nil || serr != nil {
		t.Errorf("getsockopt: %v %v", err, serr)
		return -1
	}
	return ms
}

func setSockUserTimeout(t *testing.T, c *net.TCPConn, ms int) {
	t.Helper()
	raw, err := c.SyscallConn()
	if err != nil {
		t.Error(err)
		return
	}
	var serr error
	if err := raw.Control(func(fd uintptr) {
		serr = unix.SetsockoptInt(int(fd), unix.IPPROTO_TCP, unix.TCP_USER_TIMEOUT, ms)
	}); err != nil || serr != nil {
		t.Errorf("setsockopt: %v %v", err, serr)
	}
}

// TestUserTimeoutRestoredOnKeepAlive checks that a stream's
// TCP_USER_TIMEOUT is the stream's alone: the client's socket has it while
// the stream lasts, and has its own value back once the stream ended, so
// the next request on the keep-alive connection does not inherit it.
func TestUserTimeoutRestoredOnKeepAlive(t *testing.T) {
	const own = 12345 // ms: the socket's value before any stream (the kernel's default is 0)
	h := &Handler{WriteTimeout: seconds(3)}
	provisionTest(t, h)
	conns := make(chan *net.TCPConn, 4)
	during := make(chan int, 4)
	srv := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		conn := r.Context().Value(connKey{}).(*clientConn).conn.(*net.TCPConn)
		next := handlerFunc(func(w http.ResponseWriter, r *http.Request) error {
			w.Header().Set("Content-Type", "text/event-stream")
			w.WriteHeader(http.StatusOK)
			during <- sockUserTimeout(t, conn)
			_, err := w.Write([]byte("data: a\n\n"))
			return err
		})
		if err := h.ServeHTTP(w, r, next); err != nil {
			t.Errorf("ServeHTTP: %v", err)
		}
	}))
	srv.Config.ConnContext = func(ctx context.Context, c net.Conn) context.Context {
		tcp := c.(*net.TCPConn)
		setSockUserTimeout(t, tcp, own)
		conns <- tcp
		return withConn(ctx, c)
	}
	srv.Start()
	defer srv.Close()
	client := &http.Client{Transport: &http.Transport{}, Timeout: testWait}
	defer client.CloseIdleConnections()

	var conn *net.TCPConn
	for i := range 2 {
		req, _ := http.NewRequest(http.MethodGet, srv.URL+"/events", nil)
		req.Header.Set("Accept", "text/event-stream")
		resp, err := client.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		body, err := io.ReadAll(resp.Body)
		resp.Body.Close()
		if err != nil || string(body) != "data: a\n\n" {
			t.Fatalf("stream %d: body %q, %v", i, body, err)
		}
		if i == 0 {
			conn = waitFor(t, conns, "the server's connection")
		}
		if got := waitFor(t, during, "the stream"); got != 3000 {
			t.Fatalf("stream %d: TCP_USER_TIMEOUT %d ms during the stream, want write_timeout's 3000", i, got)
		}
		// The stream ended before the client read the end of its body.
		if got := sockUserTimeout(t, conn); got != own {
			t.Fatalf("after stream %d the connection kept TCP_USER_TIMEOUT %d ms, want its own %d back", i, got, own)
		}
	}
	select {
	case <-conns:
		t.Fatal("the second stream came on a new connection: keep-alive not exercised")
	default:
	}
}

// TestUserTimeoutSharedConnection checks the HTTP/2 case, several streams
// on one connection: the socket's own value comes back only when the last
// of them ends.
func TestUserTimeoutSharedConnection(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	client, err := net.DialTimeout("tcp", ln.Addr().String(), testWait)
	if err != nil {
		t.Fatal(err)
	}
	defer client.Close()
	ln.(*net.TCPListener).SetDeadline(time.Now().Add(testWait))
	server, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	defer server.Close()
	tcp := server.(*net.TCPConn)
	setSockUserTimeout(t, tcp, 777)
	ctx := withConn(context.Background(), server)

	if !setClientTimeout(ctx, 2*time.Second) || !setClientTimeout(ctx, 5*time.Second) {
		t.Fatal("TCP_USER_TIMEOUT not set")
	}
	if got := sockUserTimeout(t, tcp); got != 5000 {
		t.Fatalf("two streams: %d ms, want the last one set, 5000", got)
	}
	restoreClientTimeout(ctx)
	if got := sockUserTimeout(t, tcp); got != 5000 {
		t.Fatalf("one stream left: %d ms, want 5000 still", got)
	}
	restoreClientTimeout(ctx)
	if got := sockUserTimeout(t, tcp); got != 777 {
		t.Fatalf("no stream left: %d ms, want the socket's own 777", got)
	}
	// A new stream reads the socket's value afresh.
	setSockUserTimeout(t, tcp, 888)
	setClientTimeout(ctx, time.Second)
	restoreClientTimeout(ctx)
	if got := sockUserTimeout(t, tcp); got != 888 {
		t.Fatalf("after a later stream: %d ms, want 888", got)
	}
}
