//go:build linux

package proof

import (
	"bufio"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// TestStopWithUnlimitedGracePeriod runs Caddy as its own process, with live
// streams and Caddy's default grace period, which waits for requests
// forever, and stops it with `caddy stop`. The sse handler drains its
// streams when the server shuts down, so the process must exit within the
// drain window (plus a second), and every stream must have ended cleanly
// with the close sequence.
func TestStopWithUnlimitedGracePeriod(t *testing.T) {
	const streams = 20
	const drainWindow = 2 * time.Second
	dir := t.TempDir()
	bin := filepath.Join(dir, "caddy")
	// cmd/caddy belongs to the module in the parent directory, not to this one.
	build := exec.Command("go", "build", "-o", bin, "./cmd/caddy")
	build.Dir = ".."
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("building caddy: %v\n%s", err, out)
	}

	legacy := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/event-stream")
		io.WriteString(w, "data: hello\n\n")
		http.NewResponseController(w).Flush()
		<-r.Context().Done() // never ends by itself
	}))
	defer legacy.Close()

	port := freePort(t, "127.0.0.1", false)
	adminPort := freePort(t, "127.0.0.1", false)
	caddyfile := filepath.Join(dir, "Caddyfile")
	os.WriteFile(caddyfile, []byte(fmt.Sprintf(`{
	admin 127.0.0.1:%d
	persist_config off
	storage file_system %s
}
http://127.0.0.1:%d {
	sse {
		drain_window %s
		retry 1s
		close_event bye
	}
	reverse_proxy %s
}
`, adminPort, filepath.Join(dir, "storage"), port, drainWindow, strings.TrimPrefix(legacy.URL, "http://"))), 0o600)
	run := exec.Command(bin, "run", "--config", caddyfile, "--adapter", "caddyfile")
	run.Env = append(os.Environ(), "HOME="+dir, "XDG_DATA_HOME="+dir, "XDG_CONFIG_HOME="+dir)
	// Caddy must not outlive this test, even if the test binary is killed.
	run.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	var logs strings.Builder
	run.Stdout, run.Stderr = &logs, &logs
	if err := run.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan error, 1)
	go func() { exited <- run.Wait() }()
	defer func() {
		run.Process.Kill()
		if t.Failed() {
			t.Logf("caddy output:\n%s", logs.String())
		}
	}()
	url := "http://127.0.0.1:" + strconv.Itoa(port) + "/events"
	waitUntil(t, "caddy to load its config", 15*time.Second, func() bool {
		resp, err := http.Get("http://127.0.0.1:" + strconv.Itoa(adminPort) + "/config/")
		if err == nil {
			resp.Body.Close()
		}
		return err == nil && resp.StatusCode == http.StatusOK
	})

	bodies := make([]chan string, streams)
	for i := range bodies {
		req, _ := http.NewRequest(http.MethodGet, url, nil)
		req.Header.Set("Accept", "text/event-stream")
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		first, err := bufio.NewReader(resp.Body).ReadString('\n')
		if err != nil || first != "data: hello\n" {
			t.Fatalf("stream %d: %q, %v", i, first, err)
		}
		bodies[i] = make(chan string, 1)
		go func(body io.ReadCloser, out chan<- string) {
			defer body.Close()
			rest, err := io.ReadAll(body)
			if err != nil {
				out <- "error: " + err.Error()
				return
			}
			out <- string(rest)
		}(resp.Body, bodies[i])
	}

	start := time.Now()
	stop := exec.Command(bin, "stop", "--address", "127.0.0.1:"+strconv.Itoa(adminPort))
	if out, err := stop.CombinedOutput(); err != nil {
		t.Fatalf("caddy stop: %v\n%s", err, out)
	}
	select {
	case <-exited:
	case <-time.After(drainWindow + 15*time.Second):
		t.Fatal("Caddy did not exit: live streams held the unlimited grace period")
	}
	took := time.Since(start)
	t.Logf("caddy stop with %d live streams: process exited after %v (drain window %v)", streams, took, drainWindow)
	if took > drainWindow+time.Second {
		t.Errorf("stop took %v, want ≤ drain window + 1s", took)
	}
	for i, body := range bodies {
		select {
		case rest := <-body:
			if !strings.HasSuffix(rest, "retry: 1000\nevent: bye\ndata: drain\n\n") {
				t.Errorf("stream %d ended with %q, want the close sequence and a clean end", i, rest)
			}
		case <-time.After(10 * time.Second):
			t.Fatalf("stream %d still open after the stop", i)
		}
	}
}
