//go:build linux

package proof

import (
	"bufio"
	"context"
	"fmt"
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

	"github.com/nats-io/nats-server/v2/server"
)

// A fleet of gateways sharing streams through NATS (share's `store nats`),
// as rows of the report: three Caddy processes built from
// ../natsstore/cmd/caddy-nats, each with its own admin API, HTTP port and data
// directory, one NATS server with JetStream in this process, one upstream
// in this process that numbers its events, and clients that reconnect the
// way EventSource does, with Last-Event-ID, to the gateway the test points
// them at (a load balancer's choice). Every client sends the same Host, as
// behind a load balancer, so that every gateway finds the same share key.
// Every wait is bounded by a deadline, every loop by a count.

// Options and bounds of the fleet cases.
const (
	fleetEvery    = 20 * time.Millisecond // the upstream's event cadence
	fleetLease    = time.Second           // store nats { lease }
	fleetRetry    = 200 * time.Millisecond
	fleetGateways = 3
	fleetHost     = "fleet.test"

	fleetWait   = 20 * time.Second // bounds the waits for what clients must see
	fleetSettle = 30 * time.Second // bounds the wait for one upstream request again
	fleetSteady = time.Second      // how long "one upstream request" must hold
	fleetStop   = 10 * time.Second // a graceful stop: drain_window 1 s and margin
	fleetReady  = 20 * time.Second // a gateway's start
	// fleetFailover bounds the time from the leader's SIGKILL to the
	// upstream's next request: "within about lease", with a lease's margin
	// for the store's expiry and a second for the new holder's request.
	fleetFailover = 2*fleetLease + time.Second
	// fleetOutage is how long NATS stays down at least: several leases.
	fleetOutage = 3 * fleetLease

	fleetIdle     = 5 * time.Second // a client gives up a response silent this long
	fleetMaxConns = 200             // connections a client opens at most
	fleetLife     = 5 * time.Minute // a client's whole life at most
)

// The two upstream variants: events without ids (the gateways assign
// theirs, assign_ids) and events with the upstream's own ids.
const (
	fleetAssign = "assign"
	fleetOwn    = "own"
)

var fleetVariants = []string{fleetAssign, fleetOwn}

// TestFleet is the fleet's cases: one upstream request per key, the same
// ids on every gateway, failover, a rolling restart, NATS restarted.
func TestFleet(t *testing.T) {
	bin := buildFleetCaddy(t)

	t.Run("one upstream request per key", func(t *testing.T) { fleetOneUpstream(t, bin) })
	t.Run("the same ids on every gateway", func(t *testing.T) { fleetSameIDs(t, bin) })
	t.Run("failover of the lease holder", func(t *testing.T) { fleetFailoverCase(t, bin) })
	t.Run("rolling restart", func(t *testing.T) { fleetRolling(t, bin) })
	t.Run("NATS restarted under load", func(t *testing.T) { fleetNATSRestart(t, bin) })
}

// buildFleetCaddy builds ../natsstore/cmd/caddy-nats (Caddy with the standard
// modules, the sse handler and the nats store) into the test's directory.
func buildFleetCaddy(t *testing.T) string {
	t.Helper()
	if _, err := os.Stat(filepath.Join("..", "natsstore", "cmd", "caddy-nats", "main.go")); err != nil {
		requireTool(t, "../natsstore/cmd/caddy-nats is missing (%v)", err)
	}
	bin := filepath.Join(t.TempDir(), "caddy-nats")
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	// natsstore is a module of its own; the workspace (go.work) builds it
	// against the repository's sse handler.
	build := exec.CommandContext(ctx, "go", "build", "-o", bin, "./natsstore/cmd/caddy-nats")
	build.Dir = ".."
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("building natsstore/cmd/caddy-nats: %v\n%s", err, out)
	}
	return bin
}

// --- NATS ---

// fleetNATS is a NATS server with JetStream in this process, which can be
// stopped and started again on the same port and store directory.
type fleetNATS struct {
	port int
	dir  string

	mu  sync.Mutex
	srv *server.Server
}

func startFleetNATS(t *testing.T) *fleetNATS {
	t.Helper()
	n := &fleetNATS{port: freePort(t, "127.0.0.1", false), dir: t.TempDir()}
	n.start(t)
	t.Cleanup(n.stop)
	return n
}

func (n *fleetNATS) url() string { return "nats://127.0.0.1:" + strconv.Itoa(n.port) }

// start starts the server and returns once it accepts connections; the
// port may take a moment to be free again after a stop.
func (n *fleetNATS) start(t *testing.T) {
	t.Helper()
	deadline := time.Now().Add(15 * time.Second)
	for attempt := 1; attempt <= 30; attempt++ {
		srv, err := server.NewServer(&server.Options{
			Host:      "127.0.0.1",
			Port:      n.port,
			JetStream: true,
			StoreDir:  n.dir,
			NoSigs:    true,
			NoLog:     true,
		})
		if err != nil {
			t.Fatalf("nats: %v", err)
		}
		srv.Start()
		if srv.ReadyForConnections(5 * time.Second) {
			n.mu.Lock()
			n.srv = srv
			n.mu.Unlock()
			return
		}
		srv.Shutdown()
		srv.WaitForShutdown()
		if time.Now().After(deadline) {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	t.Fatalf("nats did not start on port %d", n.port)
}

// stop shuts the server down and waits for it.
func (n *fleetNATS) stop() {
	n.mu.Lock()
	srv := n.srv
	n.srv = nil
	n.mu.Unlock()
	if srv != nil {
		srv.Shutdown()
		srv.WaitForShutdown()
	}
}

// --- the upstream ---

// fleetUpstream is the legacy SSE server behind the fleet: requests for
// /fleet/<case>/own get `id: <n>` and `data: own <n>`, continuing after
// their Last-Event-ID; requests for /fleet/<case>/assign get `data: assign
// <n>` without ids, from the path's newest n on. Every fleetEvery each
// request writes its next event. It counts, per path, the requests open
// and the requests in all, and names the gateway of each (the header
// X-Fleet-Gateway its reverse_proxy adds).
type fleetUpstream struct {
	addr string
	srv  *http.Server

	mu    sync.Mutex
	paths map[string]*fleetPath
}

type fleetPath struct {
	head    int // the newest n any request of the path wrote
	open    int
	maxOpen int
	reqs    []*fleetUpReq
}

// fleetUpReq is one request the upstream got; read it under the
// upstream's lock.
type fleetUpReq struct {
	gateway     string
	lastEventID string
	hasLEID     bool
	started     time.Time
	ended       time.Time // zero while open
	first, last int       // the n of the first and last event written; 0: none
}

func newFleetUpstream(t *testing.T) *fleetUpstream {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	up := &fleetUpstream{addr: l.Addr().String(), paths: make(map[string]*fleetPath)}
	up.srv = &http.Server{Handler: http.HandlerFunc(up.serve), ReadHeaderTimeout: time.Minute}
	done := make(chan struct{})
	go func() {
		defer close(done)
		_ = up.srv.Serve(l)
	}()
	t.Cleanup(func() {
		_ = up.srv.Close()
		<-done
	})
	return up
}

func (up *fleetUpstream) pathLocked(path string) *fleetPath {
	p := up.paths[path]
	if p == nil {
		p = new(fleetPath)
		up.paths[path] = p
	}
	return p
}

func (up *fleetUpstream) serve(w http.ResponseWriter, r *http.Request) {
	path := r.URL.Path
	own := strings.HasSuffix(path, "/"+fleetOwn)
	name := fleetAssign
	if own {
		name = fleetOwn
	}
	req := &fleetUpReq{gateway: r.Header.Get("X-Fleet-Gateway"), started: time.Now()}
	if v, ok := r.Header["Last-Event-Id"]; ok {
		req.lastEventID, req.hasLEID = v[0], true
	}
	up.mu.Lock()
	p := up.pathLocked(path)
	n := p.head // live from the newest event on
	if v, err := strconv.Atoi(req.lastEventID); err == nil && own && v >= 0 {
		n = v // honours Last-Event-ID
	}
	p.reqs = append(p.reqs, req)
	p.open++
	p.maxOpen = max(p.maxOpen, p.open)
	up.mu.Unlock()
	context.AfterFunc(r.Context(), func() {
		up.mu.Lock()
		defer up.mu.Unlock()
		req.ended = time.Now()
		p.open--
	})

	w.Header().Set("Content-Type", "text/event-stream")
	w.Header().Set("Cache-Control", "no-cache")
	w.WriteHeader(http.StatusOK)
	rc := http.NewResponseController(w)
	if rc.Flush() != nil {
		return
	}
	ticker := time.NewTicker(fleetEvery)
	defer ticker.Stop()
	for range 1_000_000 {
		select {
		case <-ticker.C:
		case <-r.Context().Done():
			return
		}
		n++
		ev := fmt.Sprintf("data: %s %d\n\n", name, n)
		if own {
			ev = fmt.Sprintf("id: %d\n", n) + ev
		}
		if _, err := w.Write([]byte(ev)); err != nil {
			return
		}
		if rc.Flush() != nil {
			return
		}
		up.mu.Lock()
		p.head = max(p.head, n)
		if req.first == 0 {
			req.first = n
		}
		req.last = n
		up.mu.Unlock()
	}
}

// counts is the path's requests open now, the most open at once, and the
// requests in all so far.
func (up *fleetUpstream) counts(path string) (open, maxOpen, total int) {
	up.mu.Lock()
	defer up.mu.Unlock()
	p := up.pathLocked(path)
	return p.open, p.maxOpen, len(p.reqs)
}

// requests is a copy of the path's requests so far.
func (up *fleetUpstream) requests(path string) []fleetUpReq {
	up.mu.Lock()
	defer up.mu.Unlock()
	var reqs []fleetUpReq
	for _, r := range up.pathLocked(path).reqs {
		reqs = append(reqs, *r)
	}
	return reqs
}

// openRequests is the path's requests open now.
func (up *fleetUpstream) openRequests(path string) []fleetUpReq {
	var open []fleetUpReq
	for _, r := range up.requests(path) {
		if r.ended.IsZero() {
			open = append(open, r)
		}
	}
	return open
}

// describe lists the path's requests, for failure messages.
func (up *fleetUpstream) describe(path string) string {
	var b strings.Builder
	for i, r := range up.requests(path) {
		end := "open"
		if !r.ended.IsZero() {
			end = "ended " + r.ended.Format("15:04:05.000")
		}
		fmt.Fprintf(&b, "\n  #%d from %s at %s, Last-Event-ID %q (present: %v), events %d–%d, %s",
			i+1, r.gateway, r.started.Format("15:04:05.000"), r.lastEventID, r.hasLEID, r.first, r.last, end)
	}
	return b.String()
}

// waitOne waits until the path has exactly one request open and has kept
// it, and no other, for fleetSteady (sampled every 10 ms), and returns
// when that began; it fails the test if that does not come within within.
func (up *fleetUpstream) waitOne(t *testing.T, path string, within time.Duration) time.Time {
	t.Helper()
	deadline := time.Now().Add(within)
	var since time.Time
	sinceTotal := -1
	for range 100_000 {
		open, _, total := up.counts(path)
		now := time.Now()
		switch {
		case open != 1:
			since, sinceTotal = time.Time{}, -1
		case since.IsZero() || total != sinceTotal:
			since, sinceTotal = now, total
		case now.Sub(since) >= fleetSteady:
			return since
		}
		if now.After(deadline) {
			t.Fatalf("%s: the upstream did not hold exactly one request for %s within %s (open now %d); requests:%s",
				path, fleetSteady, within, open, up.describe(path))
		}
		time.Sleep(10 * time.Millisecond)
	}
	t.Fatalf("%s: waitOne looped too long", path)
	return time.Time{}
}

// --- gateways ---

// fleetGateway is one Caddy process of the fleet. It keeps its ports and
// data directory across restarts.
type fleetGateway struct {
	name      string
	bin, dir  string
	adminAddr string
	httpPort  int
	url       string // the plain HTTP site, without a trailing slash
	natsURL   string
	upstream  string
	output    *syncBuffer // Caddy's own log (stderr, INFO), every run

	mu     sync.Mutex
	cmd    *exec.Cmd
	exited chan struct{}
	runs   int
}

func newFleetGateway(t *testing.T, bin, name, natsURL, upstream string) *fleetGateway {
	t.Helper()
	g := &fleetGateway{
		name:      name,
		bin:       bin,
		dir:       t.TempDir(),
		adminAddr: "127.0.0.1:" + strconv.Itoa(freePort(t, "127.0.0.1", false)),
		httpPort:  freePort(t, "127.0.0.1", false),
		natsURL:   natsURL,
		upstream:  upstream,
		output:    new(syncBuffer),
	}
	g.url = "http://127.0.0.1:" + strconv.Itoa(g.httpPort)
	t.Cleanup(func() {
		g.kill(t)
		// FLEET_KEEP_LOGS=<dir> keeps every gateway's logs, whole, for a
		// look after the run.
		if keep := os.Getenv("FLEET_KEEP_LOGS"); keep != "" {
			dst := filepath.Join(keep, strings.ReplaceAll(t.Name(), "/", "_")+"-"+g.name)
			_ = os.MkdirAll(dst, 0o755)
			_ = os.WriteFile(filepath.Join(dst, "caddy.log"), []byte(g.output.String()), 0o644)
			if b, err := os.ReadFile(filepath.Join(g.dir, "sse.log")); err == nil {
				_ = os.WriteFile(filepath.Join(dst, "sse.log"), b, 0o644)
			}
		}
		if t.Failed() {
			t.Logf("%s: caddy output (tail):\n%s", g.name, lastBytes(g.output.String(), 6000))
			t.Logf("%s: sse log (tail):\n%s", g.name, tail(filepath.Join(g.dir, "sse.log"), 8000))
		}
	})
	return g
}

// caddyfile is the gateway's whole configuration: the admin API on its own
// port, Caddy's log on stderr and the sse handler's at DEBUG in sse.log, a
// readiness route, and the shared route on /fleet/ in front of the
// upstream, every shared stream kept in NATS.
func (g *fleetGateway) caddyfile() string {
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

http://:%[4]d {
	bind 127.0.0.1
	handle /ready {
		respond "ready" 200
	}
	handle /fleet/* {
		sse {
			heartbeat 500ms
			retry %[5]s
			drain_window 1s
			close_event close
			share {
				assign_ids
				store nats {
					url %[6]s
					lease %[7]s
				}
			}
		}
		reverse_proxy %[8]s {
			header_up X-Fleet-Gateway %[9]s
		}
	}
}
`, g.adminAddr, filepath.Join(g.dir, "storage"), filepath.Join(g.dir, "sse.log"), g.httpPort,
		fleetRetry, g.natsURL, fleetLease, g.upstream, g.name)
}

// start runs the gateway and returns once its site answers.
func (g *fleetGateway) start(t *testing.T) {
	t.Helper()
	caddyfile := filepath.Join(g.dir, "Caddyfile")
	if err := os.WriteFile(caddyfile, []byte(g.caddyfile()), 0o600); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(g.bin, "run", "--config", caddyfile, "--adapter", "caddyfile")
	cmd.Env = append(os.Environ(), "HOME="+g.dir, "XDG_DATA_HOME="+g.dir, "XDG_CONFIG_HOME="+g.dir)
	// Caddy must not outlive this test, even if the test binary is killed.
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	cmd.Stdout, cmd.Stderr = g.output, g.output
	g.mu.Lock()
	g.runs++
	fmt.Fprintf(g.output, "--- %s: run %d, started %s\n", g.name, g.runs, time.Now().Format("15:04:05.000"))
	g.mu.Unlock()
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan struct{})
	go func() {
		_ = cmd.Wait()
		close(exited)
	}()
	g.mu.Lock()
	g.cmd, g.exited = cmd, exited
	g.mu.Unlock()
	client := &http.Client{Timeout: time.Second}
	waitUntil(t, g.name+" to serve", fleetReady, func() bool {
		select {
		case <-exited:
			t.Fatalf("%s exited at start:\n%s", g.name, lastBytes(g.output.String(), 6000))
		default:
		}
		resp, err := client.Get(g.url + "/ready")
		if err != nil {
			return false
		}
		resp.Body.Close()
		return resp.StatusCode == http.StatusOK
	})
}

func (g *fleetGateway) running() (*exec.Cmd, chan struct{}) {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.cmd, g.exited
}

// kill SIGKILLs the gateway, if it runs, and returns when it was sent.
func (g *fleetGateway) kill(t *testing.T) time.Time {
	t.Helper()
	cmd, exited := g.running()
	at := time.Now()
	if cmd == nil {
		return at
	}
	_ = cmd.Process.Signal(syscall.SIGKILL)
	select {
	case <-exited:
	case <-time.After(fleetStop):
		t.Errorf("%s did not exit within %s of SIGKILL", g.name, fleetStop)
	}
	fmt.Fprintf(g.output, "--- %s: killed %s\n", g.name, at.Format("15:04:05.000"))
	return at
}

// stop stops the gateway gracefully through the admin API's /stop and
// returns when the request was sent and when the process exited.
func (g *fleetGateway) stop(t *testing.T) (sent, exitedAt time.Time) {
	t.Helper()
	_, exited := g.running()
	client := &http.Client{Timeout: fleetStop}
	sent = time.Now()
	fmt.Fprintf(g.output, "--- %s: POST /stop %s\n", g.name, sent.Format("15:04:05.000"))
	resp, err := client.Post("http://"+g.adminAddr+"/stop", "", nil)
	if err != nil {
		t.Fatalf("%s: POST /stop: %v", g.name, err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("%s: POST /stop: status %d", g.name, resp.StatusCode)
	}
	select {
	case <-exited:
	case <-time.After(fleetStop):
		t.Fatalf("%s did not exit within %s of POST /stop", g.name, fleetStop)
	}
	return sent, time.Now()
}

// --- the fleet ---

type fleet struct {
	nats   *fleetNATS
	up     *fleetUpstream
	gws    []*fleetGateway
	client *http.Client
	prefix string // /fleet/<case>
}

// startFleet starts NATS, the upstream and three gateways.
func startFleet(t *testing.T, bin, name string) *fleet {
	t.Helper()
	f := &fleet{
		nats:   startFleetNATS(t),
		up:     newFleetUpstream(t),
		client: newESHTTPClient(t),
		prefix: "/fleet/" + name,
	}
	for i := range fleetGateways {
		g := newFleetGateway(t, bin, "g"+strconv.Itoa(i+1), f.nats.url(), f.up.addr)
		g.start(t)
		f.gws = append(f.gws, g)
	}
	return f
}

func (f *fleet) path(variant string) string { return f.prefix + "/" + variant }

// clients starts n clients of the variant's path on gateway g.
func (f *fleet) clients(t *testing.T, variant string, g *fleetGateway, n int) []*fleetClient {
	var cs []*fleetClient
	for i := range n {
		cs = append(cs, startFleetClient(t, f.client, fmt.Sprintf("%s/%s#%d", g.name, variant, i+1), f.path(variant), g, ""))
	}
	return cs
}

// waitLeader waits until the variant's path has an upstream request open
// and returns the gateway that made it.
func (f *fleet) waitLeader(t *testing.T, variant string) *fleetGateway {
	t.Helper()
	var name string
	waitUntil(t, f.path(variant)+" upstream request", fleetWait, func() bool {
		open := f.up.openRequests(f.path(variant))
		if len(open) > 0 {
			name = open[0].gateway
			return true
		}
		return false
	})
	for _, g := range f.gws {
		if g.name == name {
			return g
		}
	}
	t.Fatalf("%s: the upstream request names gateway %q, not one of the fleet's", f.path(variant), name)
	return nil
}

// --- clients ---

// fleetEvent is one event a client dispatched.
type fleetEvent struct {
	id    string // the client's last event id after it
	hasID bool   // the event had an id field of its own
	data  string
	gw    string // the gateway it came from
	at    time.Time
}

// fleetConn is one response a client got.
type fleetConn struct {
	gw          string
	status      int
	miss        bool // X-SSE-Replay: miss
	start, end  time.Time
	events      int
	closeReason string // the close event's data, when one came
	ended       string // why the response ended: eof, moved, idle, stopped, an error
	dialErr     string // the request got no response
}

// fleetClient is an EventSource on the fleet: it opens the stream on its
// target gateway, takes its events, and when the response ends comes back
// after the retry it was told (fleetRetry until told) with Last-Event-ID,
// to the gateway it is then pointed at. A response that is not 200
// text/event-stream fails it for good, as it does an EventSource.
type fleetClient struct {
	name, path string
	client     *http.Client
	cancel     context.CancelFunc
	done       chan struct{}

	mu        sync.Mutex
	target    *fleetGateway
	drop      context.CancelFunc // ends the current response
	moved     bool               // the current response was ended by moveTo
	lastID    string
	events    []fleetEvent
	conns     []*fleetConn
	connected bool
	failed    string // why the client gave up for good
}

func startFleetClient(t *testing.T, client *http.Client, name, path string, g *fleetGateway, lastID string) *fleetClient {
	ctx, cancel := context.WithTimeout(context.Background(), fleetLife)
	c := &fleetClient{name: name, path: path, client: client, cancel: cancel, done: make(chan struct{}), target: g, lastID: lastID}
	t.Cleanup(func() {
		cancel()
		<-c.done
	})
	go c.run(ctx)
	return c
}

func (c *fleetClient) run(ctx context.Context) {
	defer close(c.done)
	retry := fleetRetry
	for attempt := 0; attempt < fleetMaxConns && ctx.Err() == nil; attempt++ {
		if attempt > 0 {
			wait := time.NewTimer(retry)
			select {
			case <-wait.C:
			case <-ctx.Done():
				wait.Stop()
				return
			}
		}
		var again bool
		retry, again = c.connect(ctx, retry)
		if !again {
			return
		}
	}
}

// moveTo points the client at g; with now, it ends its current response,
// as a client would that its load balancer moved, and comes back to g
// after the retry with Last-Event-ID.
func (c *fleetClient) moveTo(g *fleetGateway, now bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.target = g
	if now && c.drop != nil {
		c.moved = true
		c.drop()
	}
}

// connect is one response: it returns the retry to wait before the next,
// and whether to come back at all.
func (c *fleetClient) connect(ctx context.Context, retry time.Duration) (time.Duration, bool) {
	cctx, cancel := context.WithCancel(ctx)
	defer cancel()
	c.mu.Lock()
	g, lastID := c.target, c.lastID
	c.drop, c.moved = cancel, false
	c.mu.Unlock()
	conn := &fleetConn{gw: g.name, start: time.Now()}
	c.mu.Lock()
	c.conns = append(c.conns, conn)
	c.mu.Unlock()
	ended := func(why string) {
		c.mu.Lock()
		defer c.mu.Unlock()
		conn.end = time.Now()
		switch {
		case ctx.Err() != nil:
			why = "stopped"
		case c.moved:
			why = "moved"
		}
		conn.ended = why
		c.connected = false
	}

	var idleMu sync.Mutex
	idle := false
	watchdog := time.AfterFunc(fleetIdle, func() {
		idleMu.Lock()
		idle = true
		idleMu.Unlock()
		cancel()
	})
	defer watchdog.Stop()
	req, err := http.NewRequestWithContext(cctx, http.MethodGet, g.url+c.path, nil)
	if err != nil {
		c.giveUp(conn, "request: "+err.Error())
		return retry, false
	}
	req.Host = fleetHost
	req.Header.Set("Accept", "text/event-stream")
	req.Header.Set("Cache-Control", "no-cache")
	if lastID != "" {
		req.Header.Set("Last-Event-ID", lastID)
	}
	resp, err := c.client.Do(req)
	if err != nil {
		// A network error: EventSource reestablishes the connection.
		c.mu.Lock()
		conn.dialErr = err.Error()
		c.mu.Unlock()
		ended("no response")
		return retry, true
	}
	defer resp.Body.Close()
	c.mu.Lock()
	conn.status = resp.StatusCode
	conn.miss = resp.Header.Get("X-SSE-Replay") == "miss"
	c.mu.Unlock()
	if resp.StatusCode != http.StatusOK || !strings.HasPrefix(resp.Header.Get("Content-Type"), "text/event-stream") {
		c.giveUp(conn, fmt.Sprintf("%s: response %d %q", g.name, resp.StatusCode, resp.Header.Get("Content-Type")))
		return retry, false
	}
	c.mu.Lock()
	c.connected = true
	c.mu.Unlock()
	br := bufio.NewReader(resp.Body)
	idBuf, sawID, typ := lastID, false, ""
	var data []string
	for range 10_000_000 {
		line, err := br.ReadString('\n')
		if err != nil {
			idleMu.Lock()
			wasIdle := idle
			idleMu.Unlock()
			why := "eof"
			switch {
			case wasIdle:
				why = fmt.Sprintf("idle: no byte for %s", fleetIdle)
			case err.Error() != "EOF":
				why = err.Error()
			}
			ended(why)
			return retry, true // an unfinished event is dropped, as EventSource does
		}
		watchdog.Reset(fleetIdle)
		line = strings.TrimSuffix(strings.TrimSuffix(line, "\n"), "\r")
		if line == "" {
			c.mu.Lock()
			c.lastID = idBuf
			switch {
			case typ == "close":
				conn.closeReason = strings.Join(data, "\n")
			case data != nil:
				c.events = append(c.events, fleetEvent{id: idBuf, hasID: sawID, data: strings.Join(data, "\n"), gw: g.name, at: time.Now()})
				conn.events++
			}
			c.mu.Unlock()
			data, sawID, typ = nil, false, ""
			continue
		}
		if strings.HasPrefix(line, ":") {
			continue
		}
		field, value, _ := strings.Cut(line, ":")
		value = strings.TrimPrefix(value, " ")
		switch field {
		case "id":
			if !strings.Contains(value, "\x00") {
				idBuf, sawID = value, true
			}
		case "event":
			typ = value
		case "data":
			data = append(data, value)
		case "retry":
			if v, err := strconv.ParseUint(value, 10, 32); err == nil {
				retry = time.Duration(v) * time.Millisecond
			}
		}
	}
	ended("too many lines")
	return retry, true
}

func (c *fleetClient) giveUp(conn *fleetConn, why string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	conn.end, conn.ended = time.Now(), why
	c.failed = why
}

// stop ends the client and waits for it.
func (c *fleetClient) stop(t *testing.T) {
	t.Helper()
	c.cancel()
	select {
	case <-c.done:
	case <-time.After(fleetWait):
		t.Errorf("client %s did not stop within %s", c.name, fleetWait)
	}
}

type fleetSnapshot struct {
	events    []fleetEvent
	conns     []fleetConn
	connected bool
	failed    string
}

func (c *fleetClient) snapshot() fleetSnapshot {
	c.mu.Lock()
	defer c.mu.Unlock()
	s := fleetSnapshot{events: slices.Clone(c.events), connected: c.connected, failed: c.failed}
	for _, conn := range c.conns {
		s.conns = append(s.conns, *conn)
	}
	return s
}

func (c *fleetClient) eventCount() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return len(c.events)
}

func stopFleetClients(t *testing.T, clients []*fleetClient) {
	t.Helper()
	for _, c := range clients {
		c.stop(t)
	}
}

// waitMore waits until every client has n events more than now and is
// connected.
func waitMore(t *testing.T, what string, clients []*fleetClient, n int) {
	t.Helper()
	base := make([]int, len(clients))
	for i, c := range clients {
		base[i] = c.eventCount()
	}
	waitUntil(t, fmt.Sprintf("%d events more at every client (%s)", n, what), fleetWait, func() bool {
		for i, c := range clients {
			s := c.snapshot()
			if s.failed != "" {
				t.Fatalf("client %s failed: %s", c.name, s.failed)
			}
			if !s.connected || len(s.events) < base[i]+n {
				return false
			}
		}
		return true
	})
}

// --- checks ---

// fleetSeq parses an event of the variant: the n of its data and the
// number its id counts with (the id itself for the upstream's ids, the
// part after the dash for the gateway's), with the gateway id's prefix.
func fleetSeq(ev fleetEvent, variant string) (dn int, prefix string, seq int, ok bool) {
	name, dn := dataN(ev.data)
	if name != variant || dn < 0 || !ev.hasID {
		return dn, "", -1, false
	}
	prefix, seq = idSeq(ev.id, variant == fleetAssign)
	if seq < 0 || (variant == fleetOwn && seq != dn) {
		return dn, prefix, seq, false
	}
	return dn, prefix, seq, true
}

// fleetBreaks is what is wrong in a client's events: their data must
// count up by one (dups: events whose n the client had got already, each
// counted; gaps: jumps past the newest n it had), their ids must be well
// formed and count up (idBack: an id that does not grow; prefixes: a
// change of the gateway ids' prefix; seqGaps: gateway ids that skip
// numbers, figures only).
type fleetBreaks struct {
	gaps, dups, late, malformed, idBack, prefixes, seqGaps int
	firstGap, firstDup, firstLate, firstID                 string
}

func checkFleetEvents(events []fleetEvent, variant string) fleetBreaks {
	var b fleetBreaks
	note := func(s *string, format string, args ...any) {
		if *s == "" {
			*s = fmt.Sprintf(format, args...)
		}
	}
	newest := -1 // the newest n the client had
	had := make(map[int]bool)
	for i, ev := range events {
		dn, prefix, seq, ok := fleetSeq(ev, variant)
		if dn >= 0 && newest >= 0 && dn <= newest {
			if had[dn] {
				b.dups++
				note(&b.firstDup, "event %d (id %q, %q from %s at %s) after (id %q, %q from %s at %s): a duplicate", i+1,
					ev.id, ev.data, ev.gw, ev.at.Format("15:04:05.000"), events[i-1].id, events[i-1].data, events[i-1].gw, events[i-1].at.Format("15:04:05.000"))
			} else {
				b.late++
				note(&b.firstLate, "event %d (id %q, %q from %s at %s) after (id %q, %q from %s at %s): out of order, after newer ones", i+1,
					ev.id, ev.data, ev.gw, ev.at.Format("15:04:05.000"), events[i-1].id, events[i-1].data, events[i-1].gw, events[i-1].at.Format("15:04:05.000"))
			}
		} else if dn >= 0 && newest >= 0 && dn != newest+1 {
			b.gaps++
			note(&b.firstGap, "event %d (id %q, %q from %s at %s) after (id %q, %q from %s at %s): a gap of %d", i+1,
				ev.id, ev.data, ev.gw, ev.at.Format("15:04:05.000"), events[i-1].id, events[i-1].data, events[i-1].gw, events[i-1].at.Format("15:04:05.000"), dn-newest-1)
		}
		newest = max(newest, dn)
		had[dn] = true
		if !ok {
			b.malformed++
			note(&b.firstID, "event %d from %s (id %q, own id: %v, data %q) is not of the expected form", i+1, ev.gw, ev.id, ev.hasID, ev.data)
			continue
		}
		if i == 0 {
			continue
		}
		prev := events[i-1]
		_, pprefix, pseq, pok := fleetSeq(prev, variant)
		if !pok {
			continue
		}
		desc := fmt.Sprintf("event %d (id %q, %q from %s at %s) after (id %q, %q from %s at %s)", i+1,
			ev.id, ev.data, ev.gw, ev.at.Format("15:04:05.000"), prev.id, prev.data, prev.gw, prev.at.Format("15:04:05.000"))
		switch {
		case prefix != pprefix:
			b.prefixes++
			note(&b.firstID, "%s: the ids' prefix changed", desc)
		case seq <= pseq:
			b.idBack++
			note(&b.firstID, "%s: the id does not grow", desc)
		case seq != pseq+1:
			b.seqGaps++
		}
	}
	return b
}

// idAgreement compares the ids that different clients got for the same
// data: it returns how many distinct data were seen by more than one
// gateway, and the disagreements.
func idAgreement(clients []*fleetClient) (shared int, conflicts []string) {
	type seen struct {
		id, gw, client string
	}
	byData := make(map[string][]seen)
	for _, c := range clients {
		for _, ev := range c.snapshot().events {
			byData[ev.data] = append(byData[ev.data], seen{ev.id, ev.gw, c.name})
		}
	}
	keys := slices.Sorted(func(yield func(string) bool) {
		for k := range byData {
			if !yield(k) {
				return
			}
		}
	})
	for _, data := range keys {
		ss := byData[data]
		gws := make(map[string]bool)
		for _, s := range ss {
			gws[s.gw] = true
			if s.id != ss[0].id {
				conflicts = append(conflicts, fmt.Sprintf("%q: id %q at %s (from %s), id %q at %s (from %s)",
					data, ss[0].id, ss[0].client, ss[0].gw, s.id, s.client, s.gw))
				break
			}
		}
		if len(gws) > 1 {
			shared++
		}
	}
	return shared, conflicts
}

// fleetRules says which breaks fail a case; what is not asserted is still
// reported.
type fleetRules struct {
	gaps       bool // no gap in the data
	ids        bool // well-formed ids that grow, one prefix
	agreement  bool // the same id for the same data on every gateway
	reconnects int  // most responses a client may have; 0: any
}

// fleetSummary checks the variant's clients and returns the figures.
func fleetSummary(t *testing.T, variant string, clients []*fleetClient, rules fleetRules) string {
	t.Helper()
	var gaps, dups, late, malformed, idBreaks, seqGaps, misses, refusals, closes int
	var conns, events []int
	for _, c := range clients {
		s := c.snapshot()
		conns = append(conns, len(s.conns))
		events = append(events, len(s.events))
		b := checkFleetEvents(s.events, variant)
		gaps += b.gaps
		dups += b.dups
		malformed += b.malformed
		idBreaks += b.idBack + b.prefixes
		seqGaps += b.seqGaps
		late += b.late
		if b.dups > 0 {
			t.Errorf("%s: %d duplicates, first: %s", c.name, b.dups, b.firstDup)
		}
		if b.late > 0 {
			t.Errorf("%s: %d events out of order, first: %s", c.name, b.late, b.firstLate)
		}
		if rules.gaps && b.gaps > 0 {
			t.Errorf("%s: %d gaps, first: %s", c.name, b.gaps, b.firstGap)
		}
		if rules.ids && (b.malformed > 0 || b.idBack > 0 || b.prefixes > 0) {
			t.Errorf("%s: ids: %d malformed, %d not growing, %d prefix changes; first: %s", c.name, b.malformed, b.idBack, b.prefixes, b.firstID)
		}
		if s.failed != "" {
			t.Errorf("%s failed for good: %s", c.name, s.failed)
		}
		if len(s.events) == 0 {
			t.Errorf("%s got no event", c.name)
		}
		for i, conn := range s.conns {
			if conn.miss {
				misses++
				t.Errorf("%s: response %d (%s, at %s) says X-SSE-Replay: miss", c.name, i+1, conn.gw, conn.start.Format("15:04:05.000"))
			}
			if conn.status != 0 && conn.status != http.StatusOK {
				refusals++
			} else if conn.closeReason != "" {
				closes++
				if conn.events == 0 && conn.closeReason != "drain" {
					refusals++
					t.Errorf("%s: response %d (%s, at %s) was a refusal: close event %q and no event", c.name, i+1, conn.gw, conn.start.Format("15:04:05.000"), conn.closeReason)
				}
			}
		}
		if rules.reconnects > 0 && len(s.conns) > rules.reconnects {
			var ends []string
			for _, conn := range s.conns {
				ends = append(ends, fmt.Sprintf("%s %s–%s %s (close %q, dial %q)", conn.gw, conn.start.Format("15:04:05.000"), conn.end.Format("15:04:05.000"), conn.ended, conn.closeReason, conn.dialErr))
			}
			t.Errorf("%s: %d responses, want at most %d: %s", c.name, len(s.conns), rules.reconnects, strings.Join(ends, "; "))
		}
	}
	shared, conflicts := idAgreement(clients)
	if rules.agreement && len(conflicts) > 0 {
		t.Errorf("%s: %d data got different ids on different gateways; first: %s", variant, len(conflicts), conflicts[0])
	}
	return fmt.Sprintf("%s: %d clients, %d gaps, %d duplicates, %d out of order, %d malformed ids, %d id breaks, %d `X-SSE-Replay: miss`, %d refusals, %d close sequences, %d id disagreements over %d events seen on several gateways, gateway-id steps >1: %d; responses per client %s; events per client %s",
		variant, len(clients), gaps, dups, late, malformed, idBreaks, misses, refusals, closes, len(conflicts), shared, seqGaps, intSpread(conns), intSpread(events))
}

// --- the cases ---

// fleetOneUpstream: 4 clients per gateway and variant, all at once: the
// upstream gets one request per key for the whole fleet.
func fleetOneUpstream(t *testing.T, bin string) {
	rec := report.start(t, "fleet-one-upstream")
	f := startFleet(t, bin, "one")
	byVariant := make(map[string][]*fleetClient)
	var all []*fleetClient
	for _, g := range f.gws {
		for _, v := range fleetVariants {
			cs := f.clients(t, v, g, 4)
			byVariant[v] = append(byVariant[v], cs...)
			all = append(all, cs...)
		}
	}
	defer stopFleetClients(t, all)
	waitMore(t, "first events", all, 10)
	var figures []string
	for _, v := range fleetVariants {
		steady := f.up.waitOne(t, f.path(v), fleetWait)
		_, maxOpen, total := f.up.counts(f.path(v))
		if total != 1 || maxOpen != 1 {
			t.Errorf("%s: the upstream got %d requests, at most %d at once, want 1:%s", v, total, maxOpen, f.up.describe(f.path(v)))
		}
		figures = append(figures, fmt.Sprintf("%s: %d upstream request(s), at most %d at once, one held from %s on", v, total, maxOpen, steady.Format("15:04:05.000")))
	}
	waitMore(t, "steady", all, 25)
	stopFleetClients(t, all)
	for _, v := range fleetVariants {
		if _, _, total := f.up.counts(f.path(v)); total != 1 {
			t.Errorf("%s: the upstream got %d requests by the end, want 1:%s", v, total, f.up.describe(f.path(v)))
		}
	}
	figure(t, rec, "3 gateways, 12 clients per variant; %s", strings.Join(figures, "; "))
	for _, v := range fleetVariants {
		figure(t, rec, "%s", fleetSummary(t, v, byVariant[v], fleetRules{gaps: true, ids: true, agreement: true, reconnects: 1}))
	}
}

// fleetSameIDs: clients move from gateway to gateway with Last-Event-ID,
// and to a gateway restarted meanwhile; a new client on the restarted
// gateway resumes from an id 50 events old.
func fleetSameIDs(t *testing.T, bin string) {
	rec := report.start(t, "fleet-same-ids")
	f := startFleet(t, bin, "ids")
	byVariant := make(map[string][]*fleetClient)
	var all []*fleetClient
	// g1's clients first, so that g1 holds both leases and the restart
	// of g2 below leaves the upstream requests alone.
	for _, g := range f.gws {
		for _, v := range fleetVariants {
			cs := f.clients(t, v, g, 2)
			byVariant[v] = append(byVariant[v], cs...)
			all = append(all, cs...)
			if g == f.gws[0] {
				if l := f.waitLeader(t, v); l != f.gws[0] {
					t.Fatalf("%s: the lease went to %s, not to g1 whose clients came first", v, l.name)
				}
			}
		}
	}
	defer stopFleetClients(t, all)
	waitMore(t, "first events", all, 10)

	// Every client moves to the next gateway.
	for _, c := range all {
		c.mu.Lock()
		g := c.target
		c.mu.Unlock()
		c.moveTo(f.gws[(slices.Index(f.gws, g)+1)%len(f.gws)], true)
	}
	waitMore(t, "after moving", all, 10)

	// g2 restarts gracefully; its clients come back to g3.
	g2 := f.gws[1]
	for _, c := range all {
		c.mu.Lock()
		on := c.target == g2
		c.mu.Unlock()
		if on {
			c.moveTo(f.gws[2], false)
		}
	}
	sent, exited := g2.stop(t)
	g2.start(t)
	restarted := time.Now()
	waitMore(t, "after g2's restart", all, 5)

	// Every other client moves to the restarted g2, the others stay where
	// they are (so that g2's live events are seen elsewhere too); and per
	// variant a client new to g2 resumes from an event 50 events back.
	for i, c := range all {
		if i%2 == 0 {
			c.moveTo(g2, true)
		}
	}
	var late []*fleetClient
	var lateFrom []int
	for _, v := range fleetVariants {
		var evs []fleetEvent
		waitUntil(t, byVariant[v][0].name+" with 60 events", fleetWait, func() bool {
			evs = byVariant[v][0].snapshot().events
			return len(evs) >= 60
		})
		from := evs[len(evs)-50]
		c := startFleetClient(t, f.client, "g2/"+v+"/late", f.path(v), g2, from.id)
		late = append(late, c)
		lateFrom = append(lateFrom, dataNumber(from.data))
		byVariant[v] = append(byVariant[v], c)
		all = append(all, c)
	}
	waitMore(t, "on the restarted g2", all, 10)
	stopFleetClients(t, all)

	var lateResumed []string
	for i, c := range late {
		evs := c.snapshot().events
		first := "none"
		if len(evs) > 0 {
			first = fmt.Sprintf("%q (id %q)", evs[0].data, evs[0].id)
		}
		lateResumed = append(lateResumed, fmt.Sprintf("after %d with %s", lateFrom[i], first))
		if len(evs) == 0 || dataNumber(evs[0].data) != lateFrom[i]+1 {
			t.Errorf("%s resumed after %d with %s, want %d", c.name, lateFrom[i], first, lateFrom[i]+1)
		}
	}
	for _, v := range fleetVariants {
		if _, _, total := f.up.counts(f.path(v)); total != 1 {
			t.Errorf("%s: the upstream got %d requests, want 1:%s", v, total, f.up.describe(f.path(v)))
		}
	}
	// The restarted g2 gave the same ids as the others before it: every
	// event a client got from g2 after the restart was seen with the same
	// id from another gateway (idAgreement), and the late clients' first
	// events were replayed by g2 from the store.
	afterRestart := 0
	for _, c := range all {
		for _, ev := range c.snapshot().events {
			if ev.gw == g2.name && ev.at.After(restarted) {
				afterRestart++
			}
		}
	}
	figure(t, rec, "3 gateways, 7 clients per variant: each moved to the next gateway, then g2 restarted (POST /stop to exit %s; ready again %s after the stop was sent) and every other client moved to it; %d events from g2 after its restart; new clients on g2 with a Last-Event-ID 50 events old resumed %s",
		ms(exited.Sub(sent)), ms(restarted.Sub(sent)), afterRestart, strings.Join(lateResumed, " and "))
	for _, v := range fleetVariants {
		figure(t, rec, "%s", fleetSummary(t, v, byVariant[v], fleetRules{gaps: true, ids: true, agreement: true}))
	}
}

// fleetFailoverCase: the lease holder is SIGKILLed; another gateway takes
// the lease and asks the upstream again with Last-Event-ID; the other
// gateways' clients keep their connection and miss nothing.
func fleetFailoverCase(t *testing.T, bin string) {
	rec := report.start(t, "fleet-failover")
	f := startFleet(t, bin, "failover")
	g1 := f.gws[0]
	byVariant := make(map[string][]*fleetClient)
	var all, onG1, followers []*fleetClient
	for _, v := range fleetVariants {
		cs := f.clients(t, v, g1, 3)
		byVariant[v] = append(byVariant[v], cs...)
		onG1 = append(onG1, cs...)
		if l := f.waitLeader(t, v); l != g1 {
			t.Fatalf("%s: the lease went to %s, not to g1 whose clients came first", v, l.name)
		}
	}
	for _, g := range f.gws[1:] {
		for _, v := range fleetVariants {
			cs := f.clients(t, v, g, 3)
			byVariant[v] = append(byVariant[v], cs...)
			followers = append(followers, cs...)
		}
	}
	all = append(slices.Clone(onG1), followers...)
	defer stopFleetClients(t, all)
	waitMore(t, "first events", all, 10)
	for _, v := range fleetVariants {
		f.up.waitOne(t, f.path(v), fleetWait)
	}

	// g1's clients will come back to g2, as a load balancer would send them.
	for _, c := range onG1 {
		c.moveTo(f.gws[1], false)
	}
	before := make(map[string]int)
	for _, v := range fleetVariants {
		before[v] = len(f.up.requests(f.path(v)))
	}
	lastSeen := make(map[string]int) // the newest n any follower had at the kill
	for _, c := range followers {
		for _, v := range fleetVariants {
			if evs := c.snapshot().events; len(evs) > 0 && strings.HasPrefix(evs[len(evs)-1].data, v+" ") {
				lastSeen[v] = max(lastSeen[v], dataNumber(evs[len(evs)-1].data))
			}
		}
	}
	killed := g1.kill(t)

	var figures []string
	for _, v := range fleetVariants {
		var next fleetUpReq
		waitUntil(t, v+": the upstream's next request", fleetFailover+fleetWait, func() bool {
			reqs := f.up.requests(f.path(v))
			if len(reqs) > before[v] {
				next = reqs[before[v]]
				return true
			}
			return false
		})
		delay := next.started.Sub(killed)
		if delay > fleetFailover {
			t.Errorf("%s: the upstream was asked again %s after the kill, want at most %s (lease %s)", v, ms(delay), fleetFailover, fleetLease)
		}
		if next.gateway == g1.name {
			t.Errorf("%s: the killed %s asked the upstream again", v, g1.name)
		}
		if v == fleetOwn {
			leid, err := strconv.Atoi(next.lastEventID)
			if !next.hasLEID || err != nil || leid < lastSeen[v]-1 {
				t.Errorf("%s: the new lease holder asked with Last-Event-ID %q (present: %v), want the log's last id (the followers had up to %d)",
					v, next.lastEventID, next.hasLEID, lastSeen[v])
			}
		}
		figures = append(figures, fmt.Sprintf("%s: %s took the lease and asked the upstream %s after the SIGKILL, with Last-Event-ID %q (followers had up to %d)",
			v, next.gateway, ms(delay), next.lastEventID, lastSeen[v]))
	}
	waitMore(t, "after the failover", all, 10)
	for _, v := range fleetVariants {
		f.up.waitOne(t, f.path(v), fleetSettle)
	}
	waitMore(t, "steady after the failover", all, 10)

	// Followers' longest silence around the kill.
	var silences []time.Duration
	for _, c := range followers {
		var longest time.Duration
		evs := c.snapshot().events
		for i := 1; i < len(evs); i++ {
			longest = max(longest, evs[i].at.Sub(evs[i-1].at))
		}
		silences = append(silences, longest)
	}
	stopFleetClients(t, all)
	for _, c := range followers {
		s := c.snapshot()
		if len(s.conns) != 1 {
			t.Errorf("follower %s had %d responses, want 1 (its connection must stay open)", c.name, len(s.conns))
		} else if s.conns[0].ended != "stopped" || s.conns[0].closeReason != "" {
			t.Errorf("follower %s: its response ended (%s, close %q) before the test stopped it", c.name, s.conns[0].ended, s.conns[0].closeReason)
		}
	}
	figure(t, rec, "3 gateways, 9 clients per variant, g1 holding both leases, SIGKILLed; %s; the followers' longest silence p50 %s, max %s",
		strings.Join(figures, "; "), ms(percentile(silences, 50)), ms(percentile(silences, 100)))
	// Clients of an upstream without ids can lose what it wrote to the
	// gateway killed: their gaps are figures, not failures.
	figure(t, rec, "%s", fleetSummary(t, fleetOwn, byVariant[fleetOwn], fleetRules{gaps: true, ids: true, agreement: true}))
	figure(t, rec, "%s", fleetSummary(t, fleetAssign, byVariant[fleetAssign], fleetRules{ids: true, agreement: true}))
}

// fleetRolling: every gateway is stopped gracefully and started again,
// one at a time; the clients of each follow the close sequence to the
// next gateway.
func fleetRolling(t *testing.T, bin string) {
	rec := report.start(t, "fleet-rolling")
	f := startFleet(t, bin, "rolling")
	byVariant := make(map[string][]*fleetClient)
	var all []*fleetClient
	for _, g := range f.gws {
		for _, v := range fleetVariants {
			cs := f.clients(t, v, g, 3)
			byVariant[v] = append(byVariant[v], cs...)
			all = append(all, cs...)
		}
	}
	defer stopFleetClients(t, all)
	waitMore(t, "first events", all, 10)
	for _, v := range fleetVariants {
		f.up.waitOne(t, f.path(v), fleetWait)
	}
	var restarts []string
	for i, g := range f.gws {
		next := f.gws[(i+1)%len(f.gws)]
		for _, c := range all {
			c.mu.Lock()
			on := c.target == g
			c.mu.Unlock()
			if on {
				c.moveTo(next, false)
			}
		}
		sent, exited := g.stop(t)
		g.start(t)
		ready := time.Now()
		restarts = append(restarts, fmt.Sprintf("%s exited %s after POST /stop, ready %s after", g.name, ms(exited.Sub(sent)), ms(ready.Sub(sent))))
		waitMore(t, "after "+g.name+"'s restart", all, 10)
	}
	var settled []string
	for _, v := range fleetVariants {
		since := f.up.waitOne(t, f.path(v), fleetSettle)
		_, _, total := f.up.counts(f.path(v))
		settled = append(settled, fmt.Sprintf("%s: %d upstream requests in all, one alone from %s", v, total, since.Format("15:04:05.000")))
	}
	waitMore(t, "after the rolling restart", all, 20)
	stopFleetClients(t, all)
	figure(t, rec, "3 gateways, 9 clients per variant; %s; %s", strings.Join(restarts, "; "), strings.Join(settled, "; "))
	figure(t, rec, "%s", fleetSummary(t, fleetOwn, byVariant[fleetOwn], fleetRules{gaps: true, ids: true, agreement: true}))
	// An upstream without ids cannot be resumed: what it wrote to the
	// gateway that let go of it as it stopped is lost; gaps are figures.
	figure(t, rec, "%s", fleetSummary(t, fleetAssign, byVariant[fleetAssign], fleetRules{ids: true, agreement: true}))
}

// fleetNATSRestart: NATS stops under load and starts again on the same
// port and store; no client is refused, clients keep getting events, and
// the fleet comes back to one upstream request per key.
func fleetNATSRestart(t *testing.T, bin string) {
	rec := report.start(t, "fleet-nats-restart")
	f := startFleet(t, bin, "nats")
	byVariant := make(map[string][]*fleetClient)
	var all []*fleetClient
	for _, g := range f.gws {
		for _, v := range fleetVariants {
			cs := f.clients(t, v, g, 3)
			byVariant[v] = append(byVariant[v], cs...)
			all = append(all, cs...)
		}
	}
	defer stopFleetClients(t, all)
	waitMore(t, "first events", all, 10)
	for _, v := range fleetVariants {
		f.up.waitOne(t, f.path(v), fleetWait)
	}

	stopped := time.Now()
	f.nats.stop()
	base := make([]int, len(all))
	for i, c := range all {
		base[i] = c.eventCount()
	}
	// New clients during the outage, one per gateway and variant at once,
	// and as many again once the lease has run out.
	maxOpen := make(map[string]int)
	sample := func() {
		for _, v := range fleetVariants {
			open, _, _ := f.up.counts(f.path(v))
			maxOpen[v] = max(maxOpen[v], open)
		}
	}
	var newcomers []*fleetClient
	for batch, at := range []time.Duration{0, fleetLease + fleetLease/2} {
		waitUntil(t, fmt.Sprintf("%s of outage", at), at+time.Second, func() bool {
			sample()
			return time.Since(stopped) >= at
		})
		for _, g := range f.gws {
			for _, v := range fleetVariants {
				c := startFleetClient(t, f.client, fmt.Sprintf("%s/%s/outage%d", g.name, v, batch+1), f.path(v), g, "")
				newcomers = append(newcomers, c)
				byVariant[v] = append(byVariant[v], c)
			}
		}
	}
	all = append(all, newcomers...)
	base = append(base, make([]int, len(newcomers))...)
	waitUntil(t, fmt.Sprintf("%s of outage, with 10 events at every client during it", fleetOutage), fleetOutage+fleetWait, func() bool {
		sample()
		if time.Since(stopped) < fleetOutage {
			return false
		}
		for i, c := range all {
			if c.eventCount() < base[i]+10 {
				return false
			}
		}
		return true
	})
	outageEvents := make([]int, len(all))
	for i, c := range all {
		outageEvents[i] = c.eventCount() - base[i]
	}
	f.nats.start(t)
	restarted := time.Now()
	var settled []string
	for _, v := range fleetVariants {
		since := f.up.waitOne(t, f.path(v), fleetSettle)
		_, _, total := f.up.counts(f.path(v))
		settled = append(settled, fmt.Sprintf("%s: up to %d upstream requests at once during the outage, one alone again %s after NATS was back (%d in all)",
			v, maxOpen[v], ms(since.Sub(restarted)), total))
	}
	waitMore(t, "after NATS is back", all, 20)
	stopFleetClients(t, all)

	// The longest silence of each client over the outage and the return:
	// clients keep getting events, within a failover's time.
	var silences []time.Duration
	for _, c := range all {
		var longest time.Duration
		var from, to fleetEvent
		evs := c.snapshot().events
		for i := 1; i < len(evs); i++ {
			if d := evs[i].at.Sub(evs[i-1].at); evs[i].at.After(stopped) && d > longest {
				longest, from, to = d, evs[i-1], evs[i]
			}
		}
		silences = append(silences, longest)
		if longest > fleetFailover {
			t.Errorf("%s got no event for %s (from %q at %s from %s to %q at %s from %s), want at most %s",
				c.name, ms(longest), from.data, from.at.Format("15:04:05.000"), from.gw, to.data, to.at.Format("15:04:05.000"), to.gw, fleetFailover)
		}
	}
	if t.Failed() {
		for _, v := range fleetVariants {
			t.Logf("%s: NATS stopped %s, started again %s; the upstream's requests:%s", v,
				stopped.Format("15:04:05.000"), restarted.Format("15:04:05.000"), f.up.describe(f.path(v)))
		}
	}
	figure(t, rec, "3 gateways, 9 clients per variant and 2 more per gateway and variant during the outage (at once and after 1.5 leases); NATS down %s; events per client during the outage %s; %s; the clients' longest silence from the stop on p50 %s, max %s",
		ms(restarted.Sub(stopped)), intSpread(outageEvents), strings.Join(settled, "; "), ms(percentile(silences, 50)), ms(percentile(silences, 100)))
	// While NATS is down each gateway assigns ids of its own: the ids'
	// agreement across gateways, and an id-less upstream's gaps, are
	// figures.
	figure(t, rec, "%s", fleetSummary(t, fleetOwn, byVariant[fleetOwn], fleetRules{gaps: true, ids: true}))
	figure(t, rec, "%s", fleetSummary(t, fleetAssign, byVariant[fleetAssign], fleetRules{}))
}
