//go:build !linux

package caddysse

import "net"

// userTimeout reads nothing where TCP_USER_TIMEOUT is not available; the
// write deadline still catches clients that stop reading.
func userTimeout(*net.TCPConn) (int, bool) { return 0, false }

// setUserTimeout does nothing where TCP_USER_TIMEOUT is not available.
func setUserTimeout(*net.TCPConn, int) bool { return false }
