package proof

import "syscall"

// setReceiveBuffer sets SO_RCVBUF on the socket fd, before it connects.
func setReceiveBuffer(fd uintptr, size int) error {
	return syscall.SetsockoptInt(syscall.Handle(fd), syscall.SOL_SOCKET, syscall.SO_RCVBUF, size)
}
