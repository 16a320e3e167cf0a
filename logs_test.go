package caddysse

import (
	"bufio"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2/caddytest"
)

// TestE2EOperatorLogs checks what an operator sees in Caddy's logs, through
// a real Caddy:
//   - the access log carries the stream's account through log_append and
//     the {http.sse.*} placeholders, for a stream the gateway closed and one
//     whose client left;
//   - reverse_proxy warns "aborting with incomplete response" for both (its
//     API has no way to end a stream that it does not warn about), and the
//     logging configuration the README gives drops those warnings while an
//     upstream that breaks mid-stream is still reported, by sse.
func TestE2EOperatorLogs(t *testing.T) {
	dir := t.TempDir()
	upstream := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/event-stream")
		w.Write([]byte("id: 7\ndata: seven\n\n"))
		http.NewResponseController(w).Flush()
		if r.URL.Path == "/reset" {
			// The upstream dies mid-stream.
			conn, _, err := http.NewResponseController(w).Hijack()
			if err == nil {
				conn.(*net.TCPConn).SetLinger(0)
				conn.Close()
			}
			return
		}
		<-r.Context().Done()
	}))
	t.Cleanup(upstream.Close)
	if os.Getenv("CI") != "" {
		t.Cleanup(func() {
			if t.Skipped() {
				t.Error("caddytest could not start Caddy; in CI that is a failure")
			}
		})
	}
	file := func(name string) string { return filepath.Join(dir, name) }
	tester := caddytest.NewTester(t)
	tester.InitServer(fmt.Sprintf(`{
	admin localhost:2999
	http_port 29080
	https_port 29443
	grace_period 1s
	skip_install_trust
	# The README's logging configuration: reverse_proxy's own log at ERROR
	# only, everything else as before.
	log default {
		output file %[1]s
		format json
		exclude http.handlers.reverse_proxy
	}
	log proxy_errors {
		output file %[2]s
		format json
		include http.handlers.reverse_proxy
		level ERROR
	}
	# What an operator sees without it.
	log proxy_warnings {
		output file %[3]s
		format json
		include http.handlers.reverse_proxy
		level WARN
	}
}
http://localhost:29080 {
	log {
		output file %[4]s
		format json
	}
	log_append sse_close_reason {http.sse.close_reason}
	log_append sse_events {http.sse.events}
	log_append sse_bytes {http.sse.bytes}
	log_append sse_heartbeats {http.sse.heartbeats}
	log_append sse_last_event_id {http.sse.last_event_id}
	log_append sse_duration {http.sse.duration}
	sse {
		heartbeat 100ms
		idle_timeout 350ms
	}
	reverse_proxy %[5]s
}`, file("caddy.log"), file("proxy_errors.log"), file("proxy_warnings.log"), file("access.log"),
		strings.TrimPrefix(upstream.URL, "http://")), "caddyfile")

	// Closed by the gateway: idle after one event and three heartbeats.
	idle := openStream(t, "/idle")
	if body, _ := idle.waitEnd(t); !strings.HasPrefix(body, "id: 7\ndata: seven\n\n:\n\n:\n\n:\n\n") {
		t.Fatalf("idle stream got %q", body)
	}
	// The client leaves.
	gone := openStream(t, "/gone")
	gone.waitFor(t, "data: seven\n\n")
	gone.cancel()
	// The upstream breaks.
	reset := openStream(t, "/reset")
	reset.waitEnd(t)

	access := readLogUntil(t, file("access.log"), 3)
	for uri, want := range map[string]string{"/idle": "idle_timeout", "/gone": "client_gone", "/reset": "upstream_error"} {
		entry := access[uri]
		if entry == nil {
			t.Fatalf("no access log entry for %s", uri)
		}
		if entry["sse_close_reason"] != want || entry["sse_events"] != 1.0 || entry["sse_last_event_id"] != "7" {
			t.Errorf("%s: access log has close_reason %v, events %v, last_event_id %v; want %s, 1, 7",
				uri, entry["sse_close_reason"], entry["sse_events"], entry["sse_last_event_id"], want)
		}
		if b, _ := entry["sse_bytes"].(float64); b < float64(len("id: 7\ndata: seven\n\n")) {
			t.Errorf("%s: sse_bytes %v", uri, entry["sse_bytes"])
		}
		if _, ok := entry["sse_duration"]; !ok {
			t.Errorf("%s: no sse_duration", uri)
		}
	}
	if hb, _ := access["/idle"]["sse_heartbeats"].(float64); hb < 3 {
		t.Errorf("/idle: sse_heartbeats %v, want at least 3", access["/idle"]["sse_heartbeats"])
	}

	warnings := readLogUntil(t, file("proxy_warnings.log"), 3)
	for _, uri := range []string{"/idle", "/gone"} {
		if w := warnings[uri]; w == nil || w["msg"] != "aborting with incomplete response" {
			t.Errorf("%s: reverse_proxy's warning is not what the README says: %v", uri, w)
		}
	}
	if w := warnings["/reset"]; w == nil || !strings.Contains(fmt.Sprint(w["error"]), "reset") {
		t.Errorf("/reset: reverse_proxy's warning %v", w)
	}
	// With the README's configuration, the default log has no warning for
	// the gateway's close or the client that left, and the broken upstream
	// is reported by sse, naming the upstream.
	var brokenUpstream []map[string]any
	for _, line := range readLines(t, file("caddy.log")) {
		if strings.Contains(line, "incomplete response") {
			t.Errorf("the default log still has reverse_proxy's warning: %s", line)
		}
		var entry map[string]any
		if json.Unmarshal([]byte(line), &entry) == nil && entry["level"] == "warn" && entry["logger"] != "http" && entry["logger"] != "http.auto_https" {
			brokenUpstream = append(brokenUpstream, entry)
		}
	}
	if len(brokenUpstream) != 1 || brokenUpstream[0]["logger"] != "http.handlers.sse" ||
		brokenUpstream[0]["uri"] != "/reset" || brokenUpstream[0]["upstream"] != strings.TrimPrefix(upstream.URL, "http://") {
		t.Errorf("want one warning, from sse, about /reset and its upstream; got %v", brokenUpstream)
	}
	if lines := readLines(t, file("proxy_errors.log")); len(lines) != 0 {
		t.Errorf("reverse_proxy logged errors: %v", lines)
	}
}

// readLogUntil reads a JSON log until it has entries for n request URIs,
// and returns the last entry for each.
func readLogUntil(t *testing.T, path string, n int) map[string]map[string]any {
	t.Helper()
	deadline := time.Now().Add(e2eWait)
	for {
		byURI := map[string]map[string]any{}
		for _, line := range readLines(t, path) {
			var entry map[string]any
			if json.Unmarshal([]byte(line), &entry) != nil {
				continue
			}
			uri, _ := entry["uri"].(string)
			if req, ok := entry["request"].(map[string]any); ok {
				uri, _ = req["uri"].(string)
			}
			if uri != "" {
				byURI[uri] = entry
			}
		}
		if len(byURI) >= n || time.Now().After(deadline) {
			return byURI
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func readLines(t *testing.T, path string) []string {
	f, err := os.Open(path)
	if err != nil {
		return nil
	}
	defer f.Close()
	var lines []string
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		lines = append(lines, sc.Text())
	}
	return lines
}
