//go:build unix

package proof

import "golang.org/x/sys/unix"

// setReceiveBuffer sets SO_RCVBUF on the socket fd, before it connects.
func setReceiveBuffer(fd uintptr, size int) error {
	return unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_RCVBUF, size)
}
