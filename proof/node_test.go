package proof

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"
)

// TestNodeEventSource runs the same session as the browser test with Node's
// eventsource package (proof/js), a second client implementation: events in
// order with type, data and lastEventId, nothing from heartbeats, the close
// event, a reconnect after the retry delay with Last-Event-ID at the
// upstream; and close() makes the upstream see its connection end within a
// second.
func TestNodeEventSource(t *testing.T) {
	rec := report.start(t, "node")
	node, err := exec.LookPath("node")
	if err != nil {
		requireTool(t, "no node in PATH (Debian: apt-get install -y nodejs)")
	}
	jsDir, err := filepath.Abs("js")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(jsDir, "node_modules", "eventsource", "package.json")); err != nil {
		requireTool(t, "the eventsource package is not installed (run: npm ci --prefix proof/js)")
	}

	up := newUpstream(t)
	up.handle("script", scriptBehavior)
	g := startGateway(t, up, gatewayConfig{profiles: map[string]profile{"node": clientProfile}})
	client := startNodeClient(t, node, jsDir)

	open := func(source, key string) {
		client.send(t, map[string]any{
			"cmd": "open", "id": source, "url": g.httpURL + "/p/node/script?k=" + key,
			"types": []string{"tick", clientCloseEvent}, "closeType": clientCloseEvent,
		})
	}
	closeSource := func(source string, req *upstreamRequest) {
		t.Helper()
		closedAt := time.Now()
		client.send(t, map[string]any{"cmd": "close", "id": source})
		d := req.waitEnded(t, teardownBound+slack).Sub(closedAt)
		if d > teardownBound {
			t.Errorf("the upstream saw its connection end %s after close(), want at most %s", d, teardownBound)
		}
		rec.teardown(d)
	}

	key := up.key("node")
	open("main", key)
	entries := client.waitFor(t, "main", "the close event, a reconnect and the resumed event",
		clientMaxLifetime+clientRetry+2*slack+5*time.Second, func(es []clientEntry) bool {
			opens := 0
			for _, e := range es {
				if e.Kind == "open" {
					opens++
				}
			}
			last := len(es) - 1
			return opens >= 2 && last >= 0 && es[last].Kind == "event" && strings.HasPrefix(es[last].Data, "resumed")
		})
	// The package reports lastEventId from an event's own id field only;
	// see scriptEvents.
	checkScriptedSession(t, rec, g, up, key, entries, true)
	rec.figure("eventsource@4.1.1 sets an event's lastEventId from its own id field only (the spec carries it over); its Last-Event-ID on reconnect is right")
	if last := entries[len(entries)-1]; last.Data != "resumed after 3" || last.ID != "4" {
		t.Errorf("after the reconnect the client got %+v, want the upstream's answer to Last-Event-ID 3", last)
	}
	closeSource("main", up.request(t, key, 2, time.Second))

	for i := range 4 {
		source, key := fmt.Sprintf("round%d", i), up.key("node")
		open(source, key)
		client.waitFor(t, source, "the script's events", 5*time.Second, func(es []clientEntry) bool {
			n := 0
			for _, e := range es {
				if e.Kind == "event" {
					n++
				}
			}
			return n >= 4
		})
		closeSource(source, up.request(t, key, 1, time.Second))
	}
	up.waitQuiet(t, 5*time.Second)
}

// nodeClient is proof/js/client.mjs running in a child process.
type nodeClient struct {
	stdin io.WriteCloser

	mu      sync.Mutex
	changed chan struct{}
	entries []clientEntry
	done    bool
	stderr  strings.Builder
}

func startNodeClient(t *testing.T, node, dir string) *nodeClient {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	cmd := exec.CommandContext(ctx, node, "client.mjs")
	cmd.Dir = dir
	c := &nodeClient{changed: make(chan struct{})}
	cmd.Stderr = &lockedWriter{mu: &c.mu, w: &c.stderr}
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatalf("starting node: %v", err)
	}
	c.stdin = stdin
	exited := make(chan struct{})
	go func() {
		defer close(exited)
		scanner := bufio.NewScanner(stdout)
		for scanner.Scan() {
			var e clientEntry
			err := json.Unmarshal(scanner.Bytes(), &e)
			c.mu.Lock()
			if err != nil {
				fmt.Fprintf(&c.stderr, "bad line %q: %v\n", scanner.Text(), err)
			} else {
				c.entries = append(c.entries, e)
			}
			close(c.changed)
			c.changed = make(chan struct{})
			c.mu.Unlock()
		}
		_ = cmd.Wait()
		c.mu.Lock()
		c.done = true
		close(c.changed)
		c.changed = make(chan struct{})
		c.mu.Unlock()
	}()
	t.Cleanup(func() {
		// Ending stdin ends the client; kill it if it does not go.
		stdin.Close()
		select {
		case <-exited:
		case <-time.After(5 * time.Second):
			cancel()
			<-exited
		}
		cancel()
		if t.Failed() {
			c.mu.Lock()
			t.Logf("node client stderr:\n%s", c.stderr.String())
			c.mu.Unlock()
		}
	})
	return c
}

func (c *nodeClient) send(t *testing.T, command map[string]any) {
	t.Helper()
	line, err := json.Marshal(command)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c.stdin.Write(append(line, '\n')); err != nil {
		t.Fatalf("sending %s to the node client: %v", line, err)
	}
}

// waitFor waits until cond holds for the entries of source.
func (c *nodeClient) waitFor(t *testing.T, source, what string, within time.Duration, cond func([]clientEntry) bool) []clientEntry {
	t.Helper()
	deadline := time.NewTimer(within)
	defer deadline.Stop()
	for {
		c.mu.Lock()
		var mine []clientEntry
		for _, e := range c.entries {
			if e.Source == source {
				mine = append(mine, e)
			}
		}
		changed, done, stderr := c.changed, c.done, c.stderr.String()
		c.mu.Unlock()
		if cond(mine) {
			return mine
		}
		if done {
			t.Fatalf("the node client exited before %s; its reports: %+v; stderr:\n%s", what, mine, stderr)
		}
		select {
		case <-changed:
		case <-deadline.C:
			t.Fatalf("the node client did not report %s within %s; its reports: %+v", what, within, mine)
		}
	}
}

// lockedWriter serializes writes to w under mu.
type lockedWriter struct {
	mu *sync.Mutex
	w  io.Writer
}

func (l *lockedWriter) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.w.Write(p)
}
