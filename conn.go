package caddysse

import (
	"context"
	"net"
	"sync"
	"time"
)

// A client that vanished without closing (powered off, network cut, NAT
// mapping dropped) sends nothing back, not even a reset. Writes to it still
// succeed into the socket's send buffer, for about 15 minutes on Linux
// before the kernel gives up. Bounding how long sent data may stay
// unacknowledged (TCP_USER_TIMEOUT) turns such a client into a write error
// within about one heartbeat plus the write timeout. To reach the socket, the
// handler asks the server to place each connection in its requests' context.
//
// The bound is the stream's, not the connection's: a keep-alive connection
// goes on to other requests, and an HTTP/2 connection carries other
// requests at the same time. So the socket's own value is read when the
// first stream on the connection sets it, and put back when the last one
// ends.

// connKey is the context key under which the client's connection is stored.
type connKey struct{}

// clientConn is a client's connection as its requests' context holds it,
// with what the streams on it did to its TCP_USER_TIMEOUT.
type clientConn struct {
	conn net.Conn

	mu sync.Mutex
	// streams counts the streams that set TCP_USER_TIMEOUT on the
	// connection and have not ended.
	streams int
	// saved is the socket's TCP_USER_TIMEOUT before the first of them, in
	// milliseconds.
	saved int
}

// withConn stores the connection in the context of its requests. The
// handler registers it with its server (RegisterConnContext).
func withConn(ctx context.Context, c net.Conn) context.Context {
	if ctx.Value(connKey{}) != nil {
		return ctx // another sse handler of this server got there first
	}
	return context.WithValue(ctx, connKey{}, &clientConn{conn: c})
}

// socket is the TCP connection under the TLS and listener wrappers, if
// there is one.
func (cc *clientConn) socket() *net.TCPConn {
	c := cc.conn
	for range 4 {
		inner, ok := c.(interface{ NetConn() net.Conn })
		if !ok {
			break
		}
		c = inner.NetConn()
	}
	tcp, _ := c.(*net.TCPConn)
	return tcp
}

// setClientTimeout bounds how long data sent on the request's connection
// may stay unacknowledged, where the platform allows it, and reports
// whether it did: if so, restoreClientTimeout must follow when the stream
// ends. An HTTP/2 connection carries other streams too; the bound is right
// for them as well, since it only fires when the peer has stopped
// acknowledging anything. While several streams hold it (of sse handlers
// with different write timeouts), the last value set applies.
func setClientTimeout(ctx context.Context, d time.Duration) bool {
	cc, _ := ctx.Value(connKey{}).(*clientConn)
	if cc == nil {
		return false
	}
	tcp := cc.socket()
	if tcp == nil {
		return false
	}
	cc.mu.Lock()
	defer cc.mu.Unlock()
	if cc.streams == 0 {
		saved, ok := userTimeout(tcp)
		if !ok {
			return false
		}
		cc.saved = saved
	}
	if !setUserTimeout(tcp, int(d.Milliseconds())) {
		return false
	}
	cc.streams++
	return true
}

// restoreClientTimeout undoes a setClientTimeout that reported true: the
// last stream on the connection to end puts the socket's own value back.
// It is best effort, like setting it: a connection already closed has
// nothing to put back.
func restoreClientTimeout(ctx context.Context) {
	cc, _ := ctx.Value(connKey{}).(*clientConn)
	if cc == nil {
		return
	}
	cc.mu.Lock()
	defer cc.mu.Unlock()
	if cc.streams--; cc.streams == 0 {
		setUserTimeout(cc.socket(), cc.saved)
	}
}
