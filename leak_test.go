package caddysse

import (
	"runtime"
	"strings"
	"testing"
	"time"
)

// verifyNoNewGoroutines snapshots the goroutines running now; the function
// it returns fails t if any goroutine started since is still running after
// up to two seconds. Defer it, like goleak.VerifyNone with IgnoreCurrent,
// which it replaces so that this module requires nothing for its tests alone.
func verifyNoNewGoroutines(t *testing.T) func() {
	t.Helper()
	before := map[string]bool{}
	for id := range goroutineStacks() {
		before[id] = true
	}
	return func() {
		t.Helper()
		deadline := time.Now().Add(2 * time.Second)
		for {
			var left []string
			for id, stack := range goroutineStacks() {
				if !before[id] {
					left = append(left, stack)
				}
			}
			if len(left) == 0 {
				return
			}
			if time.Now().After(deadline) {
				t.Errorf("%d goroutines started by the test outlived it:\n\n%s", len(left), strings.Join(left, "\n\n"))
				return
			}
			time.Sleep(10 * time.Millisecond)
		}
	}
}

// goroutineStacks returns the stack of every user goroutine, by goroutine id.
func goroutineStacks() map[string]string {
	buf := make([]byte, 1<<16)
	for {
		n := runtime.Stack(buf, true)
		if n < len(buf) {
			buf = buf[:n]
			break
		}
		buf = make([]byte, 2*len(buf))
	}
	stacks := map[string]string{}
	for _, g := range strings.Split(string(buf), "\n\n") {
		// Each stack starts "goroutine <id> [<state>]:".
		if fields := strings.Fields(g); len(fields) > 1 && fields[0] == "goroutine" {
			stacks[fields[1]] = g
		}
	}
	return stacks
}
