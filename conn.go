package caddysse

import (
	"context"
	"net"
	"time"
)

// A client that vanished without closing (powered off, network cut, NAT
// mapping dropped) sends nothing back, not even a reset. Writes to it still
// succeed into the socket's send buffer, for about 15 minutes on Linux
// before the kernel gives up. Bounding how long sent data may stay
// unacknowledged (TCP_USER_TIMEOUT) turns such a client into a write error
// within about one heartbeat plus the write timeout. To reach the socket, the
// handler asks the server to place each connection in its requests' context.

// connKey is the context key under which the client's connection is stored.
type connKey struct{}

// withConn stores the connection in the context of its requests. The
// handler registers it with its server (RegisterConnContext).
func withConn(ctx context.Context, c net.Conn) context.Context {
	if ctx.Value(connKey{}) != nil {
		return ctx // another sse handler of this server got there first
	}
	return context.WithValue(ctx, connKey{}, c)
}

// setClientTimeout bounds how long data sent on the request's connection
// may stay unacknowledged, where the platform allows it. An HTTP/2
// connection carries other streams too; the bound is right for them as well,
// since it only fires when the peer has stopped acknowledging anything.
func setClientTimeout(ctx context.Context, d time.Duration) {
	c, _ := ctx.Value(connKey{}).(net.Conn)
	// Unwrap TLS and listener wrappers down to the socket.
	for range 4 {
		inner, ok := c.(interface{ NetConn() net.Conn })
		if !ok {
			break
		}
		c = inner.NetConn()
	}
	if tcp, ok := c.(*net.TCPConn); ok {
		setUserTimeout(tcp, d)
	}
}
