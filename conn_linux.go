package caddysse

import (
	"net"

	"golang.org/x/sys/unix"
)

// userTimeout reads TCP_USER_TIMEOUT of c, in milliseconds.
func userTimeout(c *net.TCPConn) (ms int, ok bool) {
	raw, err := c.SyscallConn()
	if err != nil {
		return 0, false
	}
	var serr error
	if err := raw.Control(func(fd uintptr) {
		ms, serr = unix.GetsockoptInt(int(fd), unix.IPPROTO_TCP, unix.TCP_USER_TIMEOUT)
	}); err != nil || serr != nil {
		return 0, false
	}
	return ms, true
}

// setUserTimeout sets TCP_USER_TIMEOUT on c, in milliseconds, and reports
// whether it did. It is best effort: a failure leaves the write deadline
// as the only bound, which still catches clients that stop reading.
func setUserTimeout(c *net.TCPConn, ms int) bool {
	raw, err := c.SyscallConn()
	if err != nil {
		return false
	}
	var serr error
	if err := raw.Control(func(fd uintptr) {
		serr = unix.SetsockoptInt(int(fd), unix.IPPROTO_TCP, unix.TCP_USER_TIMEOUT, ms)
	}); err != nil || serr != nil {
		return false
	}
	return true
}
