//go:build !linux

package caddysse

import (
	"net"
	"time"
)

// setUserTimeout does nothing where TCP_USER_TIMEOUT is not available; the
// write deadline still catches clients that stop reading.
func setUserTimeout(*net.TCPConn, time.Duration) {}
