package caddysse

import (
	"golang.org/x/sys/unix"
	"net"
	"time"
)

// setUserTimeout sets TCP_USER_TIMEOUT on c. It is best effort: a failure
// leaves the write deadline as the only bound, which still catches clients
// that stop reading.
func setUserTimeout(c *net.TCPConn, d time.Duration) {
	raw, err := c.SyscallConn()
	if err != nil {
		return
	}
	_ = raw.Control(func(fd uintptr) {
		_ = unix.SetsockoptInt(int(fd), unix.IPPROTO_TCP, unix.TCP_USER_TIMEOUT, int(d.Milliseconds()))
	})
}
