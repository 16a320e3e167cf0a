//go:build !linux

package main

import (
	"fmt"
	"os"
)

// The harness reads every figure from /proc and manages its targets with
// Linux process attributes, so it runs on Linux only.
func main() {
	fmt.Fprintln(os.Stderr, "bench: the benchmark harness runs on Linux only")
	os.Exit(1)
}
