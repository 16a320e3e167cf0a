package proof

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"
)

// clientStream is a response body read by a test client as it arrives,
// with the time each piece came in.
type clientStream struct {
	resp   *http.Response
	cancel context.CancelFunc

	mu       sync.Mutex
	changed  chan struct{}
	body     []byte
	arrivals []arrival
	done     bool
	err      error // what ended the body: nil for a clean end
	endedAt  time.Time
}

type arrival struct {
	end int // offset in body just after this piece
	at  time.Time
}

// openStream sends a GET through client and starts reading the response
// body. The request is cancelled when the test ends.
func openStream(t *testing.T, client *http.Client, url string, header http.Header) *clientStream {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		t.Fatal(err)
	}
	for k, v := range header {
		req.Header[k] = v
	}
	headerCtx, headerCancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer headerCancel()
	type result struct {
		resp *http.Response
		err  error
	}
	got := make(chan result, 1)
	go func() {
		resp, err := client.Do(req)
		got <- result{resp, err}
	}()
	var r result
	select {
	case r = <-got:
	case <-headerCtx.Done():
		cancel()
		t.Fatalf("GET %s: no response header within 10s", url)
	}
	if r.err != nil {
		t.Fatalf("GET %s: %v", url, r.err)
	}
	s := &clientStream{resp: r.resp, cancel: cancel, changed: make(chan struct{})}
	go s.read()
	return s
}

func (s *clientStream) read() {
	defer s.resp.Body.Close()
	buf := make([]byte, 32<<10)
	for {
		n, err := s.resp.Body.Read(buf)
		now := time.Now()
		s.mu.Lock()
		if n > 0 {
			s.body = append(s.body, buf[:n]...)
			s.arrivals = append(s.arrivals, arrival{len(s.body), now})
		}
		if err != nil {
			s.done, s.endedAt = true, now
			if !errors.Is(err, io.EOF) {
				s.err = err
			}
		}
		close(s.changed)
		s.changed = make(chan struct{})
		s.mu.Unlock()
		if err != nil {
			return
		}
	}
}

// waitFor waits until cond holds for the body read so far.
func (s *clientStream) waitFor(t *testing.T, what string, within time.Duration, cond func(body []byte, done bool) bool) {
	t.Helper()
	deadline := time.NewTimer(within)
	defer deadline.Stop()
	for {
		s.mu.Lock()
		ok := cond(s.body, s.done)
		changed, body, done, err := s.changed, s.body, s.done, s.err
		s.mu.Unlock()
		if ok {
			return
		}
		if done {
			t.Fatalf("the stream ended (error: %v) before %s; body: %q", err, what, clip(body))
		}
		select {
		case <-changed:
		case <-deadline.C:
			t.Fatalf("no %s within %s; body so far: %q", what, within, clip(body))
		}
	}
}

// waitContains waits until the body contains sub after offset from and
// returns the offset just after it and when its last byte arrived.
func (s *clientStream) waitContains(t *testing.T, sub string, from int, within time.Duration) (int, time.Time) {
	t.Helper()
	end := -1
	s.waitFor(t, fmt.Sprintf("%q", sub), within, func(body []byte, _ bool) bool {
		if from > len(body) {
			return false
		}
		i := bytes.Index(body[from:], []byte(sub))
		if i < 0 {
			return false
		}
		end = from + i + len(sub)
		return true
	})
	return end, s.arrivedAt(end)
}

// arrivedAt returns when the byte just before offset end arrived.
func (s *clientStream) arrivedAt(end int) time.Time {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, a := range s.arrivals {
		if a.end >= end {
			return a.at
		}
	}
	return time.Time{}
}

// waitEnd waits for the body to end and returns what ended it (nil for a
// clean end) and when.
func (s *clientStream) waitEnd(t *testing.T, within time.Duration) (error, time.Time) {
	t.Helper()
	s.waitFor(t, "the end of the body", within, func(_ []byte, done bool) bool { return done })
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.err, s.endedAt
}

// snapshot returns the body read so far and whether it ended.
func (s *clientStream) snapshot() ([]byte, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return bytes.Clone(s.body), s.done
}

// hangUp cancels the request, as a client that goes away does, and
// returns when.
func (s *clientStream) hangUp() time.Time {
	at := time.Now()
	s.cancel()
	return at
}

// clip shortens a body for a failure message.
func clip(b []byte) []byte {
	if len(b) > 600 {
		return append(append(bytes.Clone(b[:300]), "…"...), b[len(b)-300:]...)
	}
	return b
}

// waitUntil polls cond every 10ms until it holds, for at most within. It
// is for conditions nothing notifies of (files, goroutines, descriptors).
func waitUntil(t *testing.T, what string, within time.Duration, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(within)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("no %s within %s", what, within)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// moduleGoroutines returns the stacks of the goroutines running code of
// the sse handler's package (not of this package).
func moduleGoroutines() []string {
	buf := make([]byte, 1<<20)
	for {
		n := runtime.Stack(buf, true)
		if n < len(buf) {
			buf = buf[:n]
			break
		}
		buf = make([]byte, 2*len(buf))
	}
	var found []string
	for _, g := range strings.Split(string(buf), "\n\n") {
		// Stack frames name the package by its import path.
		if strings.Contains(g, "github.com/ssegateway/caddy-sse.") {
			found = append(found, g)
		}
	}
	return found
}

// waitNoModuleGoroutines waits until no goroutine runs the handler's code.
func waitNoModuleGoroutines(t *testing.T, within time.Duration) {
	t.Helper()
	deadline := time.Now().Add(within)
	for {
		left := moduleGoroutines()
		if len(left) == 0 {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d goroutines of the sse handler still run %s later; first:\n%s", len(left), within, left[0])
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// openFDs counts this process's open file descriptors, from /proc/self/fd
// on Linux and /dev/fd on other Unix systems. On Windows, which has no such
// list, it returns -1 every time, so no check on the count can fail there.
func openFDs(t *testing.T) int {
	t.Helper()
	if runtime.GOOS == "windows" {
		return -1
	}
	dir := "/dev/fd"
	if runtime.GOOS == "linux" {
		dir = "/proc/self/fd"
	}
	entries, err := os.ReadDir(dir)
	if err != nil {
		t.Fatalf("counting file descriptors: %v", err)
	}
	return len(entries)
}

// liveHeap returns the bytes of heap still reachable, after collections:
// two, since sync.Pool keeps its contents through the first.
func liveHeap() uint64 {
	runtime.GC()
	runtime.GC()
	var m runtime.MemStats
	runtime.ReadMemStats(&m)
	return m.HeapAlloc
}
