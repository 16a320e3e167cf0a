//go:build linux

package proof

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig"
	caddyfileformat "github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
)

// The real legacy servers of proof/legacy, each written the way its
// ecosystem's tutorials write SSE (no heartbeat, no Last-Event-ID, a
// response that never ends), run as child processes on a free loopback
// port behind a Caddy of the test's own. Each prints a line
// "SSELOG {json}" when a stream opens and when the server lets go of it,
// which is how a test tells that the server's handler or worker was freed.

// legacyKind names a server of proof/legacy.
type legacyKind string

const (
	legacyExpress legacyKind = "express" // Node + Express, res.write in a setInterval
	legacyPHP     legacyKind = "php"     // php -S with the production php.ini
	legacyFlask   legacyKind = "flask"   // Flask generator on gunicorn sync workers
)

// legacyOptions configure a server.
type legacyOptions struct {
	// interval is the time between two events of a stream.
	interval time.Duration
	// workers is gunicorn's number of sync workers (flask only).
	workers int
	// pad adds this many bytes to each event of the PHP script that
	// forgets ob_flush, so its 4 KiB output buffer fills in seconds.
	pad int
}

// legacyServer is one of the servers, restartable on the same port.
type legacyServer struct {
	kind legacyKind
	addr string // 127.0.0.1:port
	// eventsPath is the SSE endpoint, helloPath another route of the same
	// server (a page, an API call) that streams must not starve.
	eventsPath, helloPath string
	// noObFlushPath is the PHP script that forgets ob_flush.
	noObFlushPath string
	opts          legacyOptions

	argv    []string
	dir     string
	env     []string
	stopSig syscall.Signal

	mu      sync.Mutex
	changed chan struct{} // closed and replaced when logs change
	logs    []legacyLog
	output  []byte // the tail of everything the server printed
	proc    *legacyProc
}

// legacyProc is one run of a server.
type legacyProc struct {
	cmd    *exec.Cmd
	exited chan struct{}
	// readDone is closed when the output pipe reached EOF.
	readDone chan struct{}
}

// legacyLog is one SSELOG line.
type legacyLog struct {
	Server   string  `json:"server"`
	Ev       string  `json:"ev"` // listening, open, close
	K        string  `json:"k"`
	Method   string  `json:"method"`
	N        int     `json:"n"` // events written before the close
	T        float64 `json:"t"` // the server's clock, Unix ms
	PID      int     `json:"pid"`
	Instance string  `json:"instance"`
	Why      string  `json:"why"`     // flask: GeneratorExit when gunicorn closed the generator
	Aborted  int     `json:"aborted"` // php: connection_aborted()
	read     time.Time
}

// at is when the server wrote the line, by its clock (this machine's).
func (l legacyLog) at() time.Time { return legacyUnixMilli(l.T) }

func legacyUnixMilli(ms float64) time.Time { return time.UnixMicro(int64(ms * 1000)) }

// legacyDir is proof/legacy.
func legacyDir(t *testing.T) string {
	t.Helper()
	dir, err := filepath.Abs("legacy")
	if err != nil {
		t.Fatal(err)
	}
	return dir
}

// phpProductionINI returns the production php.ini Debian's php-common
// ships (/usr/lib/php/<version>/php.ini-production).
func phpProductionINI() (string, error) {
	matches, _ := filepath.Glob("/usr/lib/php/*/php.ini-production")
	if len(matches) == 0 {
		return "", errors.New("no /usr/lib/php/*/php.ini-production")
	}
	slices.Sort(matches)
	return matches[len(matches)-1], nil
}

// startLegacy starts a server of kind on a free loopback port and waits
// until it answers; it is stopped when the test ends. A tool that is
// missing skips the test, or fails it under CI=true.
func startLegacy(t *testing.T, kind legacyKind, opts legacyOptions) *legacyServer {
	t.Helper()
	if opts.interval == 0 {
		opts.interval = 200 * time.Millisecond
	}
	dir := legacyDir(t)
	s := &legacyServer{
		kind:    kind,
		opts:    opts,
		changed: make(chan struct{}),
		stopSig: syscall.SIGTERM,
	}
	port := freePort(t, "127.0.0.1", false)
	s.addr = "127.0.0.1:" + strconv.Itoa(port)
	s.env = []string{"SSE_INTERVAL_MS=" + strconv.FormatInt(opts.interval.Milliseconds(), 10)}
	switch kind {
	case legacyExpress:
		node, err := exec.LookPath("node")
		if err != nil {
			requireTool(t, "no node in PATH (Node 20 or later)")
		}
		s.dir = filepath.Join(dir, "express")
		if _, err := os.Stat(filepath.Join(s.dir, "node_modules", "express", "package.json")); err != nil {
			requireTool(t, "express is not installed (run: npm ci --prefix proof/legacy/express)")
		}
		s.argv = []string{node, "server.js"}
		s.env = append(s.env, "PORT="+strconv.Itoa(port))
		s.eventsPath, s.helloPath = "/events", "/hello"
	case legacyPHP:
		php, err := exec.LookPath("php")
		if err != nil {
			requireTool(t, "no php in PATH (Debian: apt-get install -y php-cli)")
		}
		ini, err := phpProductionINI()
		if err != nil {
			requireTool(t, "%v (Debian: apt-get install -y php-cli)", err)
		}
		s.dir = filepath.Join(dir, "php")
		// The built-in server, one process, as `php -S` runs it.
		s.argv = []string{php, "-c", ini, "-S", s.addr, "-t", s.dir}
		s.env = append(s.env, "SSE_PAD_BYTES="+strconv.Itoa(opts.pad))
		s.eventsPath, s.helloPath, s.noObFlushPath = "/events.php", "/hello.php", "/events-no-ob-flush.php"
	case legacyFlask:
		// Debian's gunicorn and python3-flask live with Debian's Python,
		// whatever python3 comes first in PATH.
		python := "/usr/bin/python3"
		if out, err := exec.Command(python, "-c", "import flask, gunicorn").CombinedOutput(); err != nil {
			requireTool(t, "%s cannot import flask and gunicorn (Debian: apt-get install -y python3-flask gunicorn): %v %s",
				python, err, strings.TrimSpace(string(out)))
		}
		s.dir = filepath.Join(dir, "flask")
		workers := max(opts.workers, 1)
		s.argv = []string{python, "-m", "gunicorn", "--worker-class", "sync", "--workers", strconv.Itoa(workers),
			"--bind", s.addr, "app:app"}
		s.env = append(s.env, "PYTHONUNBUFFERED=1")
		// INT is gunicorn's quick shutdown; TERM would wait up to 30 s
		// for the streams to end, which they never do.
		s.stopSig = syscall.SIGINT
		s.eventsPath, s.helloPath = "/events", "/hello"
	default:
		t.Fatalf("unknown legacy server %q", kind)
	}
	t.Cleanup(func() {
		s.stop(t)
		if t.Failed() {
			s.mu.Lock()
			t.Logf("%s server output (tail):\n%s", kind, s.output)
			s.mu.Unlock()
		}
	})
	s.start(t)
	return s
}

// start runs the server and waits until its other route answers.
func (s *legacyServer) start(t *testing.T) {
	t.Helper()
	cmd := exec.Command(s.argv[0], s.argv[1:]...)
	cmd.Dir = s.dir
	cmd.Env = append(os.Environ(), s.env...)
	// Its own process group, so that stopping it reaches its workers too;
	// and it dies with the test process.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stdout, cmd.Stderr = w, w
	if err := cmd.Start(); err != nil {
		r.Close()
		w.Close()
		t.Fatalf("starting the %s server: %v", s.kind, err)
	}
	w.Close()
	p := &legacyProc{cmd: cmd, exited: make(chan struct{}), readDone: make(chan struct{})}
	go func() {
		defer close(p.exited)
		_ = cmd.Wait()
	}()
	go s.readOutput(r, p.readDone)
	s.mu.Lock()
	s.proc = p
	s.mu.Unlock()

	client := &http.Client{Timeout: time.Second}
	deadline := time.Now().Add(30 * time.Second)
	for {
		resp, err := client.Get("http://" + s.addr + s.helloPath)
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return
			}
		}
		select {
		case <-p.exited:
			s.mu.Lock()
			out := string(s.output)
			s.mu.Unlock()
			t.Fatalf("the %s server exited while starting:\n%s", s.kind, out)
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("the %s server did not answer %s within 30s (last error: %v)", s.kind, s.helloPath, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func (s *legacyServer) readOutput(r io.ReadCloser, done chan<- struct{}) {
	defer close(done)
	defer r.Close()
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		now := time.Now()
		s.mu.Lock()
		s.output = append(s.output, line...)
		s.output = append(s.output, '\n')
		if len(s.output) > 16<<10 {
			s.output = s.output[len(s.output)-12<<10:]
		}
		if i := strings.Index(line, "SSELOG "); i >= 0 {
			var l legacyLog
			if err := json.Unmarshal([]byte(line[i+len("SSELOG "):]), &l); err == nil {
				l.read = now
				s.logs = append(s.logs, l)
				close(s.changed)
				s.changed = make(chan struct{})
			}
		}
		s.mu.Unlock()
	}
}

// stop ends the running server (its whole process group) and waits until
// its port is free again, so that it can be started again on it.
func (s *legacyServer) stop(t *testing.T) {
	t.Helper()
	s.mu.Lock()
	p := s.proc
	s.proc = nil
	s.mu.Unlock()
	if p == nil {
		return
	}
	pgid := p.cmd.Process.Pid
	_ = syscall.Kill(-pgid, s.stopSig)
	select {
	case <-p.exited:
	case <-time.After(5 * time.Second):
		t.Logf("the %s server did not stop within 5s of signal %v: killing it", s.kind, s.stopSig)
	}
	// Whatever is left of the group (workers of a server that went first).
	_ = syscall.Kill(-pgid, syscall.SIGKILL)
	<-p.exited
	select {
	case <-p.readDone:
	case <-time.After(5 * time.Second):
		t.Errorf("the %s server's output stayed open 5s after it was killed", s.kind)
	}
	deadline := time.Now().Add(5 * time.Second)
	for {
		c, err := net.DialTimeout("tcp", s.addr, time.Second)
		if err != nil {
			return
		}
		c.Close()
		if time.Now().After(deadline) {
			t.Errorf("%s still accepts connections 5s after the %s server was killed", s.addr, s.kind)
			return
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// restart stops the server and starts it again on the same port.
func (s *legacyServer) restart(t *testing.T) {
	t.Helper()
	s.stop(t)
	s.start(t)
}

// findLog returns the first log line that matches, if any.
func (s *legacyServer) findLog(match func(legacyLog) bool) (legacyLog, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, l := range s.logs {
		if match(l) {
			return l, true
		}
	}
	return legacyLog{}, false
}

// waitLog waits until a log line matches and returns it.
func (s *legacyServer) waitLog(t *testing.T, what string, within time.Duration, match func(legacyLog) bool) legacyLog {
	t.Helper()
	l, ok := s.waitLogOK(within, match)
	if !ok {
		s.mu.Lock()
		logs := slices.Clone(s.logs)
		s.mu.Unlock()
		t.Fatalf("the %s server did not log %s within %s; its log: %+v", s.kind, what, within, logs)
	}
	return l
}

// waitLogOK is waitLog that reports a timeout instead of failing.
func (s *legacyServer) waitLogOK(within time.Duration, match func(legacyLog) bool) (legacyLog, bool) {
	deadline := time.NewTimer(within)
	defer deadline.Stop()
	for {
		s.mu.Lock()
		changed := s.changed
		s.mu.Unlock()
		if l, ok := s.findLog(match); ok {
			return l, true
		}
		select {
		case <-changed:
		case <-deadline.C:
			return legacyLog{}, false
		}
	}
}

// closed matches the server's line saying it let go of the stream k.
func legacyClosed(k string) func(legacyLog) bool {
	return func(l legacyLog) bool { return l.Ev == "close" && l.K == k }
}

// opened matches the server's line saying the stream k began.
func legacyOpened(k string) func(legacyLog) bool {
	return func(l legacyLog) bool { return l.Ev == "open" && l.K == k }
}

// legacyGateway is a Caddy in this process in front of a legacy server:
// requests under /events go through the sse handler to reverse_proxy, the
// page /legacy-page.html is a file of the test's, everything else goes
// straight to reverse_proxy.
type legacyGateway struct {
	url string
	dir string
}

// legacyRoute is what a test puts in the gateway's blocks.
type legacyRoute struct {
	sse   string // the sse block's body, one option per line
	proxy string // reverse_proxy's block body
	page  string // the HTML of /legacy-page.html
}

// startLegacyGateway adapts a Caddyfile for route and loads it into this
// process's Caddy, stopped when the test ends. The admin endpoint is off
// and nothing is kept outside the test's directory.
func startLegacyGateway(t *testing.T, s *legacyServer, route legacyRoute) *legacyGateway {
	t.Helper()
	dir := t.TempDir()
	port := freePort(t, "127.0.0.1", false)
	g := &legacyGateway{url: "http://127.0.0.1:" + strconv.Itoa(port), dir: dir}
	if err := os.WriteFile(filepath.Join(dir, "legacy-page.html"), []byte(route.page), 0o644); err != nil {
		t.Fatal(err)
	}
	caddyfile := fmt.Sprintf(`{
	admin off
	persist_config off
	storage file_system %[1]s
	http_port %[2]d
	grace_period 1s
	auto_https off
	log default {
		output file %[3]s
		level INFO
		exclude http.handlers.sse
	}
	log sse {
		output file %[4]s
		format json
		level DEBUG
		include http.handlers.sse
	}
}

http://127.0.0.1:%[2]d {
	bind 127.0.0.1
	handle /legacy-page.html {
		root * %[5]s
		file_server
	}
	handle /events* {
		sse {
%[6]s
		}
		reverse_proxy %[7]s {
%[8]s
		}
	}
	handle {
		reverse_proxy %[7]s
	}
}
`, filepath.Join(dir, "storage"), port, filepath.Join(dir, "caddy.log"), filepath.Join(dir, "sse.log"),
		dir, indent(route.sse, "\t\t\t"), s.addr, indent(route.proxy, "\t\t\t"))
	caddyfile = string(caddyfileformat.Format([]byte(caddyfile)))
	adapter := caddyconfig.GetAdapter("caddyfile")
	cfgJSON, warnings, err := adapter.Adapt([]byte(caddyfile), map[string]any{"filename": "legacy.Caddyfile"})
	if err != nil {
		t.Fatalf("adapting the gateway's Caddyfile: %v\n%s", err, caddyfile)
	}
	for _, w := range warnings {
		t.Logf("Caddyfile warning: %s", w.String())
	}
	if err := caddy.Load(cfgJSON, true); err != nil {
		t.Fatalf("starting Caddy: %v\n%s", err, caddyfile)
	}
	t.Cleanup(func() {
		if err := caddy.Stop(); err != nil {
			t.Errorf("stopping Caddy: %v", err)
		}
		if t.Failed() {
			t.Logf("Caddyfile:\n%s\nCaddy log (tail):\n%s\nsse log (tail):\n%s", caddyfile,
				tail(filepath.Join(dir, "caddy.log"), 3000), tail(filepath.Join(dir, "sse.log"), 3000))
		}
	})
	return g
}

// sseLog returns the lines the sse handler logged so far.
func (g *legacyGateway) sseLog(t *testing.T) []map[string]any {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(g.dir, "sse.log"))
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		t.Fatal(err)
	}
	var lines []map[string]any
	for _, raw := range strings.Split(strings.TrimSpace(string(b)), "\n") {
		if raw == "" {
			continue
		}
		var m map[string]any
		if err := json.Unmarshal([]byte(raw), &m); err != nil {
			t.Fatalf("sse log line %q: %v", raw, err)
		}
		lines = append(lines, m)
	}
	return lines
}

// bufferingWarnings returns the sse handler's warnings about an upstream
// that buffers its events. The handler names the upstream's buffering in
// the warning's message; the check is loose on purpose (level warn, a
// message that mentions buffering) so that it does not pin the wording.
func (g *legacyGateway) bufferingWarnings(t *testing.T) []map[string]any {
	t.Helper()
	var found []map[string]any
	for _, l := range g.sseLog(t) {
		msg, _ := l["msg"].(string)
		if l["level"] == "warn" && strings.Contains(strings.ToLower(msg), "buffer") {
			found = append(found, l)
		}
	}
	return found
}

// legacyEvent is one event a client read from a legacy server, with the
// moment the server wrote it and the moment it arrived.
type legacyEvent struct {
	N       int     `json:"n"`
	T       float64 `json:"t"`
	K       string  `json:"k"`
	sent    time.Time
	arrived time.Time
}

// latency is how long the event took from the server's write to the
// client.
func (e legacyEvent) latency() time.Duration { return e.arrived.Sub(e.sent) }

// legacyEvents parses the data events a client read so far (comments,
// such as the gateway's heartbeats, are skipped).
func legacyEvents(t *testing.T, s *clientStream) []legacyEvent {
	t.Helper()
	body, _ := s.snapshot()
	var events []legacyEvent
	for _, b := range legacyBlocks(body) {
		var e legacyEvent
		if err := json.Unmarshal([]byte(b.data), &e); err != nil {
			t.Fatalf("event data %q: %v", b.data, err)
		}
		e.sent, e.arrived = legacyUnixMilli(e.T), s.arrivedAt(b.end)
		events = append(events, e)
	}
	return events
}

// legacyBlock is one complete event of a body: its data and the offset
// just after its blank line.
type legacyBlock struct {
	data string
	end  int
}

// legacyBlocks splits a body into its complete events that carry data
// (the servers write LF line ends and one data line per event).
func legacyBlocks(body []byte) []legacyBlock {
	var blocks []legacyBlock
	start := 0
	for {
		i := bytes.Index(body[start:], []byte("\n\n"))
		if i < 0 {
			return blocks
		}
		end := start + i + 2
		for _, line := range strings.Split(string(body[start:end]), "\n") {
			if data, ok := strings.CutPrefix(line, "data: "); ok {
				blocks = append(blocks, legacyBlock{data, end})
			}
		}
		start = end
	}
}

// waitEvents waits until the client has read n events and returns them.
func waitEvents(t *testing.T, s *clientStream, n int, within time.Duration) []legacyEvent {
	t.Helper()
	s.waitFor(t, fmt.Sprintf("%d events", n), within, func(body []byte, _ bool) bool {
		return len(legacyBlocks(body)) >= n
	})
	return legacyEvents(t, s)
}

// legacyStreamHeader is what a browser's EventSource sends.
func legacyStreamHeader() http.Header {
	return http.Header{"Accept": {"text/event-stream"}, "Cache-Control": {"no-cache"}}
}

// legacyAnswer is what a bounded request got.
type legacyAnswer struct {
	status int
	ctype  string
	body   string
	took   time.Duration
	err    error
}

// legacyDo sends one request with a deadline and reads its whole body;
// err says if the deadline came first.
func legacyDo(client *http.Client, method, url string, header http.Header, within time.Duration) legacyAnswer {
	ctx, cancel := context.WithTimeout(context.Background(), within)
	defer cancel()
	start := time.Now()
	req, err := http.NewRequestWithContext(ctx, method, url, nil)
	if err != nil {
		return legacyAnswer{err: err}
	}
	for k, v := range header {
		req.Header[k] = v
	}
	resp, err := client.Do(req)
	if err != nil {
		return legacyAnswer{err: err, took: time.Since(start)}
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	return legacyAnswer{status: resp.StatusCode, ctype: resp.Header.Get("Content-Type"), body: string(b),
		took: time.Since(start), err: err}
}

// legacyRows is the report rows of the legacy servers, each filled by
// several tests: the row's status is the worst of its parts'.
var legacyRows = struct {
	mu    sync.Mutex
	parts map[string]map[string]string // row id → test name → status
}{parts: make(map[string]map[string]string)}

// legacyRowParts lists, per row, the tests that fill it, as the report
// names them.
var legacyRowParts = map[string][]string{
	"legacy-express": {"TestLegacyExpress", "TestLegacyHEAD/express", "TestLegacyRestart/express"},
	"legacy-php": {"TestLegacyPHP", "TestLegacyHEAD/php", "TestLegacyRestart/php",
		"TestLegacyBufferingWarning/php"},
	"legacy-flask": {"TestLegacyFlask", "TestLegacyFlaskWorkers", "TestLegacyHEAD/flask",
		"TestLegacyRestart/flask", "TestLegacyMaxStreamRate/flask"},
}

// legacyRecord starts recording t as one part of the report row id. The
// row's status is FAILED if any part failed, passed if every part that
// ran passed, and names the parts that were skipped or not run.
func legacyRecord(t *testing.T, id string) *caseRecorder {
	t.Helper()
	if !slices.ContainsFunc(cases, func(c proofCase) bool { return c.id == id }) {
		t.Fatalf("report: unknown case %q", id)
	}
	if !slices.Contains(legacyRowParts[id], t.Name()) {
		t.Fatalf("report: %s is not listed as a part of %q", t.Name(), id)
	}
	report.mu.Lock()
	r := report.results[id]
	if r == nil {
		r = &caseResult{}
		report.results[id] = r
	}
	report.mu.Unlock()
	setPart := func(status string) {
		legacyRows.mu.Lock()
		defer legacyRows.mu.Unlock()
		if legacyRows.parts[id] == nil {
			legacyRows.parts[id] = make(map[string]string)
		}
		legacyRows.parts[id][t.Name()] = status
		summary := legacyRowStatus(legacyRowParts[id], legacyRows.parts[id])
		report.mu.Lock()
		r.status = summary
		report.mu.Unlock()
	}
	setPart("running")
	t.Cleanup(func() {
		switch {
		case t.Failed():
			setPart("failed")
		case t.Skipped():
			setPart("skipped")
		default:
			setPart("passed")
		}
	})
	return &caseRecorder{r: r, mu: &report.mu}
}

// legacyRowStatus sums up the parts of a row: FAILED naming the parts
// that failed, passed when every part passed, otherwise how many passed
// and which were skipped or not run.
func legacyRowStatus(names []string, parts map[string]string) string {
	var failed, skipped, notRun []string
	passed, running := 0, 0
	for _, name := range names {
		switch parts[name] {
		case "failed":
			failed = append(failed, name)
		case "skipped":
			skipped = append(skipped, name)
		case "running":
			running++
		case "passed":
			passed++
		default:
			notRun = append(notRun, name)
		}
	}
	var b strings.Builder
	switch {
	case len(failed) > 0:
		fmt.Fprintf(&b, "**FAILED**: %s", strings.Join(failed, ", "))
	case running > 0:
		b.WriteString("running")
	case passed == len(names):
		return "passed"
	case passed > 0:
		fmt.Fprintf(&b, "passed %d of %d parts", passed, len(names))
	case len(skipped) > 0:
		b.WriteString("skipped")
	default:
		b.WriteString("not run")
	}
	if len(skipped) > 0 {
		fmt.Fprintf(&b, "; skipped: %s", strings.Join(skipped, ", "))
	}
	if len(notRun) > 0 {
		fmt.Fprintf(&b, "; not run: %s", strings.Join(notRun, ", "))
	}
	return b.String()
}
