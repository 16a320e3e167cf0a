//go:build linux

package proof

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// caddyProcess is Caddy built from ./cmd/caddy and run as a process of its
// own, for what only a whole process shows: `caddy stop`, a reload through
// the admin API, the admin API's /metrics. Its grace period is Caddy's
// default, which waits for requests forever. The sse handler logs at DEBUG,
// as JSON, into a file of its own.
type caddyProcess struct {
	bin, dir  string
	adminAddr string
	// httpURL is the plain HTTP site, without a trailing slash.
	httpURL  string
	httpPort int
	up       *upstream

	cmd    *exec.Cmd
	output *syncBuffer // Caddy's own log (stderr, INFO)
	exited chan struct{}
	// exitedAt is when Wait returned; read it after exited is closed.
	exitedAt time.Time
}

// syncBuffer is a bytes.Buffer safe for the process's two output pipes.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// buildCaddy builds the repository's cmd/caddy into the test's directory.
func buildCaddy(t *testing.T) string {
	t.Helper()
	bin := filepath.Join(t.TempDir(), "caddy")
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	// cmd/caddy belongs to the module in the parent directory, not to this one.
	build := exec.CommandContext(ctx, "go", "build", "-o", bin, "./cmd/caddy")
	build.Dir = ".."
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("building caddy: %v\n%s", err, out)
	}
	return bin
}

// startCaddyProcess runs Caddy with a Caddyfile whose routes are profiles,
// as startGateway's are: requests under /p/<name>/ go through an sse
// handler with the profile's options to reverse_proxy to up. It returns
// once the admin API answers. The process is killed when the test ends,
// and with the test process.
func startCaddyProcess(t *testing.T, bin string, up *upstream, profiles map[string]profile) *caddyProcess {
	t.Helper()
	dir := t.TempDir()
	p := &caddyProcess{
		bin:       bin,
		dir:       dir,
		adminAddr: "127.0.0.1:" + strconv.Itoa(freePort(t, "127.0.0.1", false)),
		httpPort:  freePort(t, "127.0.0.1", false),
		up:        up,
		output:    new(syncBuffer),
		exited:    make(chan struct{}),
	}
	p.httpURL = "http://127.0.0.1:" + strconv.Itoa(p.httpPort)
	caddyfile := filepath.Join(dir, "Caddyfile")
	if err := os.WriteFile(caddyfile, []byte(p.caddyfile(profiles)), 0o600); err != nil {
		t.Fatal(err)
	}
	p.cmd = exec.Command(bin, "run", "--config", caddyfile, "--adapter", "caddyfile")
	p.cmd.Env = append(os.Environ(), "HOME="+dir, "XDG_DATA_HOME="+dir, "XDG_CONFIG_HOME="+dir)
	// Caddy must not outlive this test, even if the test binary is killed.
	p.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	p.cmd.Stdout, p.cmd.Stderr = p.output, p.output
	if err := p.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() {
		_ = p.cmd.Wait()
		p.exitedAt = time.Now()
		close(p.exited)
	}()
	t.Cleanup(func() {
		_ = p.cmd.Process.Kill()
		<-p.exited
		if t.Failed() {
			t.Logf("caddy output (tail):\n%s", lastBytes(p.output.String(), 6000))
			t.Logf("sse log (tail):\n%s", tail(filepath.Join(dir, "sse.log"), 6000))
		}
	})
	waitUntil(t, "caddy to load its config", 15*time.Second, func() bool {
		select {
		case <-p.exited:
			t.Fatalf("caddy exited at start:\n%s", p.output.String())
		default:
		}
		resp, err := (&http.Client{Timeout: time.Second}).Get("http://" + p.adminAddr + "/config/")
		if err != nil {
			return false
		}
		resp.Body.Close()
		return resp.StatusCode == http.StatusOK
	})
	return p
}

// caddyfile is the process's whole configuration: the admin API on its own
// port, no grace_period (unlimited), Caddy's log on stderr and the sse
// handler's at DEBUG in sse.log, and one route per profile.
func (p *caddyProcess) caddyfile(profiles map[string]profile) string {
	var routes strings.Builder
	names := make([]string, 0, len(profiles))
	for name := range profiles {
		names = append(names, name)
	}
	sort.Strings(names)
	for _, name := range names {
		pr := profiles[name]
		fmt.Fprintf(&routes, "\thandle /p/%s/* {\n\t\tsse {\n%s\n\t\t}\n", name, indent(pr.sse, "\t\t\t"))
		fmt.Fprintf(&routes, "\t\treverse_proxy %s {\n%s\n\t\t}\n\t}\n", p.up.addr, indent(pr.proxy, "\t\t\t"))
	}
	return fmt.Sprintf(`{
	admin %[1]s
	persist_config off
	storage file_system %[2]s
	log default {
		output stderr
		level INFO
		exclude http.handlers.sse
	}
	log sse {
		output file %[3]s
		format json
		level DEBUG
		include http.handlers.sse
	}
}

http://127.0.0.1:%[4]d {
	bind 127.0.0.1
%[5]s}
`, p.adminAddr, filepath.Join(p.dir, "storage"), filepath.Join(p.dir, "sse.log"), p.httpPort, routes.String())
}

// stop runs `caddy stop` against the process's admin API and returns when
// the command was started.
func (p *caddyProcess) stop(t *testing.T) time.Time {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	at := time.Now()
	out, err := exec.CommandContext(ctx, p.bin, "stop", "--address", p.adminAddr).CombinedOutput()
	if err != nil {
		t.Fatalf("caddy stop: %v\n%s", err, out)
	}
	return at
}

// waitExit waits for the process to exit and returns when it did.
func (p *caddyProcess) waitExit(t *testing.T, within time.Duration) time.Time {
	t.Helper()
	select {
	case <-p.exited:
		return p.exitedAt
	case <-time.After(within):
		t.Fatalf("caddy did not exit within %s", within)
		return time.Time{}
	}
}

// load posts a new configuration, built from profiles, to the admin API's
// /load, and returns when the request was sent and when it was answered.
func (p *caddyProcess) load(t *testing.T, profiles map[string]profile) (sent, answered time.Time) {
	t.Helper()
	body := p.caddyfile(profiles)
	req, err := http.NewRequest(http.MethodPost, "http://"+p.adminAddr+"/load", strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Content-Type", "text/caddyfile")
	client := &http.Client{Timeout: 30 * time.Second}
	sent = time.Now()
	resp, err := client.Do(req)
	if err != nil {
		t.Fatalf("POST /load: %v", err)
	}
	answered = time.Now()
	msg, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("POST /load: %d %s", resp.StatusCode, msg)
	}
	return sent, answered
}

// sseLine is one line of the sse handler's log.
type sseLine struct {
	Msg    string  `json:"msg"`
	TS     float64 `json:"ts"`
	URI    string  `json:"uri"`
	Reason string  `json:"reason"`
	Events int64   `json:"events"`
}

// sseLog returns what the sse handler logged so far.
func (p *caddyProcess) sseLog(t *testing.T) []sseLine {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(p.dir, "sse.log"))
	if os.IsNotExist(err) {
		return nil
	}
	if err != nil {
		t.Fatal(err)
	}
	var lines []sseLine
	scanner := bufio.NewScanner(bytes.NewReader(b))
	scanner.Buffer(make([]byte, 64<<10), 1<<20)
	for scanner.Scan() {
		var l sseLine
		if err := json.Unmarshal(scanner.Bytes(), &l); err != nil {
			t.Fatalf("sse log line %q: %v", scanner.Bytes(), err)
		}
		lines = append(lines, l)
	}
	return lines
}

// Messages of the handler's log lines: a stream's end (a warning when the
// upstream broke it), and a refusal.
const (
	msgStreamEnded    = "stream ended"
	msgUpstreamBroke  = "upstream broke the stream"
	msgStreamRefused  = "stream refused"
	streamEndMessages = msgStreamEnded + "|" + msgUpstreamBroke
)

// waitLogged waits until the handler has logged at least n lines with one
// of the messages in msgs (separated by |) and returns those lines.
func (p *caddyProcess) waitLogged(t *testing.T, msgs string, n int, within time.Duration) []sseLine {
	t.Helper()
	var found []sseLine
	waitUntil(t, fmt.Sprintf("%d %q lines in the sse log", n, msgs), within, func() bool {
		found = found[:0]
		for _, l := range p.sseLog(t) {
			if slices.Contains(strings.Split(msgs, "|"), l.Msg) {
				found = append(found, l)
			}
		}
		return len(found) >= n
	})
	return found
}

// metrics scrapes the admin API's /metrics and returns every sample of
// the sse handler's metrics, by name with labels as exposed
// (`caddy_sse_streams_ended_total{reason="drain"}`).
func (p *caddyProcess) metrics(t *testing.T) map[string]float64 {
	t.Helper()
	client := &http.Client{Timeout: 10 * time.Second}
	resp, err := client.Get("http://" + p.adminAddr + "/metrics")
	if err != nil {
		t.Fatalf("scraping /metrics: %v", err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("scraping /metrics: status %d", resp.StatusCode)
	}
	samples := make(map[string]float64)
	scanner := bufio.NewScanner(resp.Body)
	scanner.Buffer(make([]byte, 64<<10), 1<<20)
	for scanner.Scan() {
		line := scanner.Text()
		if !strings.HasPrefix(line, "caddy_sse_") {
			continue
		}
		i := strings.LastIndexByte(line, ' ')
		v, err := strconv.ParseFloat(line[i+1:], 64)
		if err != nil {
			t.Fatalf("metrics line %q: %v", line, err)
		}
		samples[line[:i]] = v
	}
	if err := scanner.Err(); err != nil {
		t.Fatal(err)
	}
	if len(samples) == 0 {
		t.Fatal("/metrics has no caddy_sse_ samples")
	}
	return samples
}

func lastBytes(s string, n int) string {
	if len(s) > n {
		return s[len(s)-n:]
	}
	return s
}
