//go:build linux

package main

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
)

// Target names, in the order they appear in the report.
const (
	targetDirect = "direct"
	targetCaddy  = "caddy"
	targetSSE    = "caddy+sse"
	targetNginx  = "nginx"
	// The fan-out scenario's own targets (see fanout.go).
	targetShare = "caddy+sse+share"
	targetNchan = "nchan"
	targetFloor = "caddy+floor"
	// targetFleet is issue 18's fleet: fleetSize Caddy gateways whose share
	// keeps its events in one NATS JetStream store (fleet.go).
	targetFleet = "caddy+sse+share-fleet"
	// targetTrio is the fleet without its store: the same gateways, each
	// on its own (fleet.go).
	targetTrio = "caddy+sse+share-3"
	// fleetMember is one gateway of the fleet, and natsProcess the fleet's
	// NATS server: processes the launcher starts, not targets of their own.
	fleetMember = "fleet-gateway"
	natsProcess = "nats"
)

// targetDescriptions says in the report what each target is.
var targetDescriptions = map[string]string{
	targetDirect: "clients connect straight to the upstream (the floor)",
	targetCaddy:  "Caddy, bare `reverse_proxy` with `flush_interval -1`",
	targetSSE:    "Caddy, `sse` + the same `reverse_proxy`",
	targetNginx:  "nginx from Debian, `proxy_buffering off`, HTTP/1.1 to the upstream",
	targetShare:  "Caddy, `sse { share {path} }` (one stream per path for every client) + the same `reverse_proxy` (fan-out scenario only)",
	targetFloor:  "Caddy with a 40-line handler (`internal/caddyfloor`) that holds each subscriber's response open and writes each event POSTed to it, and nothing else: the least any Caddy handler holds per subscriber (fan-out scenario only)",
	targetFleet:  fmt.Sprintf("%d Caddy processes built from `natsstore/cmd/caddy-nats`, each with `sse { share {path} { store nats { url … lease %s } } }` + the same `reverse_proxy`, sharing one NATS server with JetStream (nats-server %s from its Go module, in a child process of the harness); subscribers spread evenly over the %d gateways, one upstream (fan-out scenario only)", fleetSize, fleetLease, natsVersion, fleetSize),
	targetTrio:   fmt.Sprintf("the %d gateways of caddy+sse+share-fleet, subscribers spread over them the same way, but each gateway with the memory store: %d upstream requests, no NATS; the fleet less its store, which tells the JetStream hop from running %d processes (fan-out scenario only, not run unless asked for)", fleetSize, fleetSize, fleetSize),
	targetNchan:  "nginx from Debian with Debian's Nchan module: subscribers on an `nchan_subscriber eventsource` location, each event published once by HTTP POST to an `nchan_publisher` location; no upstream (fan-out scenario only)",
}

// gateway is a running target: the address clients connect to and, for the
// proxies, the processes whose memory and CPU are measured.
type gateway struct {
	name  string
	addr  string
	admin string // Caddy's admin address (metrics, pprof); empty otherwise
	cmd   *exec.Cmd
	// children says whether the measured processes include the children of
	// cmd's process (nginx's workers).
	children bool
	exited   chan struct{}
	logPath  string
	// A fleet (targetFleet, targetTrio) has no process of its own: its members are its
	// gateways, whose processes are measured together, and nats is the
	// NATS server they share, measured apart. addrs are the members'
	// addresses, which clients take in turn (addrFor).
	// host, when set, is the Host header of every client's request
	// instead of the address it connects to.
	members []*gateway
	addrs   []string
	host    string
	nats    *gateway
}

// launcher starts targets; it knows the binaries and a scratch directory, and
// remembers everything it started so that it can stop it all on the way out.
type launcher struct {
	caddyBin  string
	floorBin  string // Caddy with the floor handler (internal/caddyfloor)
	nginxBin  string
	nchanMod  string // Debian's ngx_nchan_module.so
	fleetBin  string // Caddy with the sse module and natsstore (natsstore/cmd/caddy-nats)
	selfBin   string // this harness's binary, which runs the fleet's NATS server
	scratch   string
	heartbeat time.Duration
	upstream  string

	mu      sync.Mutex
	running map[*gateway]bool
	seq     int
}

// freePort asks the kernel for an unused loopback port.
func freePort() (int, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port, nil
}

// start launches the named target and waits until it accepts connections.
func (l *launcher) start(name string) (*gateway, error) {
	switch name {
	case targetDirect:
		return &gateway{name: name, addr: l.upstream}, nil
	case targetFleet, targetTrio:
		return l.startFleet(name)
	}
	return l.launch(name, "")
}

// launch starts one process: a target, a fleet's gateway (with natsURL, its
// NATS server) or a fleet's NATS server.
func (l *launcher) launch(name, natsURL string) (*gateway, error) {
	l.mu.Lock()
	l.seq++
	dir := filepath.Join(l.scratch, fmt.Sprintf("%02d-%s", l.seq, strings.ReplaceAll(name, "+", "-")))
	l.mu.Unlock()
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, err
	}
	port, err := freePort()
	if err != nil {
		return nil, err
	}
	g := &gateway{name: name, addr: fmt.Sprintf("127.0.0.1:%d", port), exited: make(chan struct{}), logPath: filepath.Join(dir, "log")}
	switch name {
	case targetCaddy, targetSSE, targetShare, targetFloor, fleetMember:
		adminPort, err := freePort()
		if err != nil {
			return nil, err
		}
		g.admin = fmt.Sprintf("127.0.0.1:%d", adminPort)
		conf := caddyfile(port, adminPort, l.upstream, name != targetCaddy, name == targetShare || name == fleetMember, natsURL, l.heartbeat)
		bin := l.caddyBin
		switch name {
		case targetFloor:
			conf, bin = floorCaddyfile(port, adminPort), l.floorBin
		case fleetMember:
			bin = l.fleetBin
		}
		if err := os.WriteFile(filepath.Join(dir, "Caddyfile"), []byte(conf), 0o644); err != nil {
			return nil, err
		}
		g.cmd = exec.Command(bin, "run", "--config", filepath.Join(dir, "Caddyfile"), "--adapter", "caddyfile")
		// Caddy keeps its data and autosaved config under HOME / XDG
		// directories; keep them in the scratch directory.
		g.cmd.Env = append(os.Environ(), "HOME="+dir, "XDG_DATA_HOME="+dir, "XDG_CONFIG_HOME="+dir)
		g.cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	case natsProcess:
		store := filepath.Join(dir, "jetstream")
		g.cmd = exec.Command(l.selfBin, natsServerCommand, "-port", strconv.Itoa(port), "-store", store)
		g.cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	case targetNginx, targetNchan:
		conf := nginxConf(port, l.upstream, dir)
		if name == targetNchan {
			conf = nchanConf(port, l.nchanMod, dir)
		}
		if err := os.WriteFile(filepath.Join(dir, "nginx.conf"), []byte(conf), 0o644); err != nil {
			return nil, err
		}
		g.cmd = exec.Command(l.nginxBin, "-p", dir, "-c", filepath.Join(dir, "nginx.conf"), "-e", filepath.Join(dir, "error.log"))
		g.children = true
		// SIGTERM, not SIGKILL: the master then takes its workers down too.
		g.cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGTERM}
	default:
		return nil, fmt.Errorf("unknown target %q", name)
	}
	logFile, err := os.Create(g.logPath)
	if err != nil {
		return nil, err
	}
	g.cmd.Stdout, g.cmd.Stderr = logFile, logFile
	if err := g.cmd.Start(); err != nil {
		logFile.Close()
		return nil, fmt.Errorf("start %s: %w", name, err)
	}
	go func() {
		_ = g.cmd.Wait()
		logFile.Close()
		close(g.exited)
	}()
	l.mu.Lock()
	l.running[g] = true
	l.mu.Unlock()
	if err := g.waitListening(15 * time.Second); err != nil {
		l.stop(g)
		return nil, fmt.Errorf("%s did not come up: %w; log:\n%s", name, err, tail(g.logPath, 20))
	}
	return g, nil
}

// waitListening polls the target's port until it accepts a connection.
func (g *gateway) waitListening(limit time.Duration) error {
	deadline := time.Now().Add(limit)
	for {
		select {
		case <-g.exited:
			return errors.New("process exited")
		default:
		}
		c, err := net.DialTimeout("tcp", g.addr, time.Second)
		if err == nil {
			c.Close()
			if !g.children || len(g.pids()) > 1 {
				return nil
			}
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("nothing listening on %s after %s", g.addr, limit)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// stop ends a target: SIGTERM first, SIGKILL (to the whole process group)
// when it has not exited within 5 seconds. A fleet's gateways stop together,
// then its NATS server.
func (l *launcher) stop(g *gateway) {
	if g == nil {
		return
	}
	if g.members != nil {
		var wg sync.WaitGroup
		for _, m := range g.members {
			wg.Go(func() { l.stop(m) })
		}
		wg.Wait()
		l.stop(g.nats)
		return
	}
	if g.cmd == nil {
		return
	}
	_ = g.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-g.exited:
	case <-time.After(5 * time.Second):
		_ = syscall.Kill(-g.cmd.Process.Pid, syscall.SIGKILL)
		<-g.exited
	}
	// nginx's workers leave with their master, but make sure.
	_ = syscall.Kill(-g.cmd.Process.Pid, syscall.SIGKILL)
	l.mu.Lock()
	delete(l.running, g)
	l.mu.Unlock()
}

// stopAll stops whatever is still running.
func (l *launcher) stopAll() {
	l.mu.Lock()
	var all []*gateway
	for g := range l.running {
		all = append(all, g)
	}
	l.mu.Unlock()
	for _, g := range all {
		l.stop(g)
	}
}

// caddyfile is the configuration of a Caddy target. The Caddy targets differ
// only by the sse directive and its share option.
//
// With natsURL, share keeps its events in the NATS server there (the
// natsstore module), as a fleet's gateways do.
func caddyfile(port, adminPort int, upstream string, withSSE, share bool, natsURL string, heartbeat time.Duration) string {
	var b strings.Builder
	fmt.Fprintf(&b, "{\n\tadmin 127.0.0.1:%d\n\tpersist_config off\n\tauto_https off\n\tgrace_period 1s\n}\n\n", adminPort)
	fmt.Fprintf(&b, "http://:%d {\n\tbind 127.0.0.1\n", port)
	if withSSE {
		fmt.Fprintf(&b, "\tsse {\n\t\theartbeat %s\n", heartbeat)
		if share {
			// A broadcast stream, shared by every client whatever its
			// address: the default key keeps clients of different
			// addresses apart, and the harness's come from 16.
			b.WriteString("\t\tshare {path}")
			if natsURL != "" {
				fmt.Fprintf(&b, " {\n\t\t\tstore nats {\n\t\t\t\turl %s\n\t\t\t\tlease %s\n\t\t\t}\n\t\t}", natsURL, fleetLease)
			}
			b.WriteString("\n")
		}
		b.WriteString("\t}\n")
	}
	fmt.Fprintf(&b, "\treverse_proxy %s {\n\t\tflush_interval -1\n\t}\n}\n", upstream)
	return b.String()
}

// floorCaddyfile is the configuration of the floor target: its handler
// holds GETs on every path and takes events POSTed to /pub, as Nchan does.
func floorCaddyfile(port, adminPort int) string {
	return fmt.Sprintf("{\n\tadmin 127.0.0.1:%d\n\tpersist_config off\n\tauto_https off\n\tgrace_period 1s\n}\n\n"+
		"http://:%d {\n\tbind 127.0.0.1\n\tbench_floor\n}\n", adminPort, port)
}

// nginxConf is the configuration of the nginx target: two workers (one per
// core, like Caddy's GOMAXPROCS), no buffering, HTTP/1.1 to the upstream.
func nginxConf(port int, upstream, dir string) string {
	return nginxMain("", dir, port, fmt.Sprintf(`        location / {
            proxy_pass http://%s;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_cache off;
            proxy_read_timeout 1h;
            proxy_send_timeout 1h;
        }
`, upstream))
}

// nchanConf is the configuration of the Nchan target: nginx as for the nginx
// target, with Debian's Nchan module loaded, subscribers on /broadcast (the
// path the fan-out clients ask for) and the publisher on /pub, one channel.
func nchanConf(port int, module, dir string) string {
	return nginxMain("load_module "+module+";\n", dir, port, `        location = /broadcast {
            nchan_subscriber eventsource;
            nchan_channel_id fanout;
            nchan_subscriber_timeout 0;
        }
        location = /pub {
            nchan_publisher http;
            nchan_channel_id fanout;
            nchan_message_buffer_length 10;
        }
`)
}

// nginxMain is what both nginx targets share: the process, its files under
// dir, and one server on 127.0.0.1:port whose locations are given.
func nginxMain(modules, dir string, port int, locations string) string {
	return fmt.Sprintf(`%[1]sdaemon off;
master_process on;
worker_processes 2;
worker_rlimit_nofile 20000;
pid %[2]s/nginx.pid;
error_log %[2]s/error.log warn;

events {
    worker_connections 20000;
    use epoll;
}

http {
    access_log off;
    client_body_temp_path %[2]s/client_body;
    proxy_temp_path %[2]s/proxy;
    fastcgi_temp_path %[2]s/fastcgi;
    uwsgi_temp_path %[2]s/uwsgi;
    scgi_temp_path %[2]s/scgi;

    server {
        listen 127.0.0.1:%[3]d backlog=4096;
%[4]s    }
}
`, modules, dir, port, locations)
}

// pids lists the processes that make up the target: the process started and,
// for nginx, its workers; for a fleet, its gateways (not its NATS server).
func (g *gateway) pids() []int {
	if g.members != nil {
		var pids []int
		for _, m := range g.members {
			pids = append(pids, m.pids()...)
		}
		return pids
	}
	if g.cmd == nil {
		return nil
	}
	root := g.cmd.Process.Pid
	pids := []int{root}
	if !g.children {
		return pids
	}
	entries, _ := os.ReadDir("/proc")
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		if st, err := readProcStat(pid); err == nil && st.ppid == root {
			pids = append(pids, pid)
		}
	}
	return pids
}

// procStat is what the benchmarks read from /proc/PID/stat.
type procStat struct {
	ppid     int
	cpuTicks int64 // utime + stime, in clock ticks
}

// clockTicks is USER_HZ, the unit of /proc/PID/stat's times; 100 on Linux.
const clockTicks = 100

func readProcStat(pid int) (procStat, error) {
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return procStat{}, err
	}
	// The command name (field 2) may hold spaces; the fields after it start
	// after the last ')'.
	i := bytes.LastIndexByte(data, ')')
	if i < 0 {
		return procStat{}, errors.New("malformed stat")
	}
	fields := strings.Fields(string(data[i+1:]))
	// fields[0] is field 3 (state): ppid is field 4, utime 14, stime 15.
	if len(fields) < 13 {
		return procStat{}, errors.New("short stat")
	}
	ppid, _ := strconv.Atoi(fields[1])
	utime, _ := strconv.ParseInt(fields[11], 10, 64)
	stime, _ := strconv.ParseInt(fields[12], 10, 64)
	return procStat{ppid: ppid, cpuTicks: utime + stime}, nil
}

// readRSS returns VmRSS of a process, in bytes.
func readRSS(pid int) (int64, error) {
	f, err := os.Open(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, err
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if rest, ok := strings.CutPrefix(sc.Text(), "VmRSS:"); ok {
			kb, err := strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(rest), " kB"), 10, 64)
			return kb << 10, err
		}
	}
	return 0, errors.New("no VmRSS")
}

// rss is the resident memory of all the target's processes, in bytes.
func (g *gateway) rss() int64 {
	var total int64
	for _, pid := range g.pids() {
		if n, err := readRSS(pid); err == nil {
			total += n
		}
	}
	return total
}

// cpuTicks is the CPU time used so far by all the target's processes.
func (g *gateway) cpuTicks() int64 {
	var total int64
	for _, pid := range g.pids() {
		if st, err := readProcStat(pid); err == nil {
			total += st.cpuTicks
		}
	}
	return total
}

// cpuMeter measures a target's CPU use over a span of wall time.
type cpuMeter struct {
	g     *gateway
	ticks int64
	at    time.Time
}

func startCPU(g *gateway) cpuMeter { return cpuMeter{g: g, ticks: g.cpuTicks(), at: time.Now()} }

// percent is the CPU used since start, in percent of one core.
func (m cpuMeter) percent() float64 {
	if m.g.cmd == nil && m.g.members == nil {
		return 0
	}
	wall := time.Since(m.at).Seconds()
	used := float64(m.g.cpuTicks()-m.ticks) / clockTicks
	return 100 * used / wall
}

// goMemory asks a Caddy target to collect garbage and reports the Go heap and
// goroutine stacks in use, and the number of goroutines. These are finer than
// RSS, which also holds memory the runtime has freed but not yet returned.
type goMemory struct {
	heapInuse, stackInuse, goroutines float64
}

func (g *gateway) goMemory() (goMemory, error) {
	if g.members != nil {
		var sum goMemory
		for _, m := range g.members {
			gm, err := m.goMemory()
			if err != nil {
				return goMemory{}, fmt.Errorf("%s: %w", m.addr, err)
			}
			sum.heapInuse += gm.heapInuse
			sum.stackInuse += gm.stackInuse
			sum.goroutines += gm.goroutines
		}
		return sum, nil
	}
	if g.admin == "" {
		return goMemory{}, errors.New("no admin endpoint")
	}
	client := &http.Client{Timeout: 10 * time.Second}
	// The heap profile endpoint runs a collection first when gc=1.
	resp, err := client.Get("http://" + g.admin + "/debug/pprof/heap?gc=1")
	if err != nil {
		return goMemory{}, err
	}
	_, _ = io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	resp, err = client.Get("http://" + g.admin + "/metrics")
	if err != nil {
		return goMemory{}, err
	}
	defer resp.Body.Close()
	var m goMemory
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		name, value, ok := strings.Cut(sc.Text(), " ")
		if !ok {
			continue
		}
		v, err := strconv.ParseFloat(value, 64)
		if err != nil {
			continue
		}
		switch name {
		case "go_memstats_heap_inuse_bytes":
			m.heapInuse = v
		case "go_memstats_stack_inuse_bytes":
			m.stackInuse = v
		case "go_goroutines":
			m.goroutines = v
		}
	}
	return m, sc.Err()
}

// cpuProfile saves a CPU profile of a Caddy target taken over seconds.
func (g *gateway) cpuProfile(ctx context.Context, seconds int, path string) error {
	return g.saveProfile(ctx, fmt.Sprintf("/debug/pprof/profile?seconds=%d", seconds), path)
}

// heapProfile saves a heap profile of a Caddy target, after a collection.
func (g *gateway) heapProfile(ctx context.Context, path string) error {
	return g.saveProfile(ctx, "/debug/pprof/heap?gc=1", path)
}

// saveProfile saves what the target's admin API answers at endpoint.
func (g *gateway) saveProfile(ctx context.Context, endpoint, path string) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+g.admin+endpoint, nil)
	if err != nil {
		return err
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	defer f.Close()
	_, err = io.Copy(f, resp.Body)
	return err
}

// tail returns the last n lines of a file, for error messages.
func tail(path string, n int) string {
	data, _ := os.ReadFile(path)
	lines := strings.Split(strings.TrimRight(string(data), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}
