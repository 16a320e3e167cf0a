//go:build linux

// Command bench measures the sse module side by side with Caddy's bare
// reverse_proxy and nginx, on loopback, and writes docs/benchmarks.md with
// its plots.
//
// Run from this directory:
//
//	go run . -out ../docs        # full run, about 13 minutes
//	go run . -smoke              # about 30 seconds, for CI; writes nothing unless -out is given
//
// It builds Caddy from ../cmd/caddy (or uses -caddy), and for the fleet
// target Caddy with the NATS store from ../natsstore/cmd/caddy-nats (or uses
// -fleet-caddy), installs nginx from Debian when it is missing, starts every
// target itself on 127.0.0.1 (the fleet's NATS server too: nats-server's own
// code, linked into this binary) and stops them all before it exits.
//
// The fan-out scenario through the fleet alone, beside one gateway and the
// fleet's gateways without their store (the control, caddy+sse+share-3,
// which only runs when named), about 1.5 minutes:
//
//	go run . -scenarios fanout -fanout-targets caddy+sse+share,caddy+sse+share-3,caddy+sse+share-fleet -fanout 1,1000
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"
)

func main() {
	log.SetFlags(log.Ltime | log.Lmicroseconds)
	if len(os.Args) > 1 && os.Args[1] == natsServerCommand {
		// The fleet target's NATS server, started by the harness (nats.go).
		if err := runNATSServer(os.Args[2:]); err != nil {
			log.Print("bench nats-server: ", err)
			os.Exit(1)
		}
		return
	}
	if err := run(); err != nil {
		log.Print("bench: ", err)
		os.Exit(1)
	}
}

func run() error {
	var (
		smoke    = flag.Bool("smoke", false, "tiny counts and short windows (about 30 s): proves every target and scenario work, not how fast")
		out      = flag.String("out", "", "directory for benchmarks.md and the plots (none written when empty)")
		root     = flag.String("root", "..", "the caddy-sse repository, whose ./cmd/caddy is built")
		caddyBin = flag.String("caddy", "", "use this Caddy binary (with the sse module) instead of building one")
		fleetBin = flag.String("fleet-caddy", "", "use this Caddy binary (with the sse module and natsstore) for the fleet's gateways instead of building ../natsstore/cmd/caddy-nats")
		targets  = flag.String("targets", strings.Join([]string{targetDirect, targetCaddy, targetSSE, targetNginx}, ","), "targets to measure, comma-separated")
		scale    = flag.String("scale", "", "stream counts for the scale scenario, comma-separated (default 1000,5000,8000; smoke 50)")
		note     = flag.String("note", "", "a sentence about the machine's state during the run, for the report (for example that it was shared)")
		profile  = flag.String("profile", "", "save CPU and heap profiles of the sse target (idle streams at the largest scale count, one fast stream of 64 KiB events) into this directory")
		rounds   = flag.Int("rounds", 0, "rounds of the latency, throughput, teardown and churn scenarios (default 2; smoke 1)")
		only     = flag.String("scenarios", "latency,throughput,teardown,churn,scale,fanout", "scenarios to run, comma-separated (the report leaves out the others)")
		fanT     = flag.String("fanout-targets", strings.Join(defaultFanoutTargets, ","), "targets of the fan-out scenario, comma-separated")
		fanIv    = flag.Duration("fanout-interval", 0, "time between two events of the fan-out scenario (default 200ms; smoke 100ms)")
		fanN     = flag.String("fanout", "", "subscriber counts for the fan-out scenario, comma-separated (default 1,1000,9000; smoke 1,20)")
	)
	flag.Parse()

	cfg := fullConfig()
	if *smoke {
		cfg = smokeConfig()
	}
	if *rounds > 0 {
		cfg.rounds = *rounds
	}
	cfg.targets = strings.Split(*targets, ",")
	cfg.scenarios = map[string]bool{}
	for _, s := range strings.Split(*only, ",") {
		switch s {
		case "latency", "throughput", "teardown", "churn", "scale", "fanout":
			cfg.scenarios[s] = true
		case "":
		default:
			return fmt.Errorf("unknown scenario %q", s)
		}
	}
	if !cfg.scenarios["latency"] {
		cfg.latencyCounts = nil
	}
	if !cfg.scenarios["throughput"] {
		cfg.throughputSizes = nil
	}
	if !cfg.scenarios["scale"] {
		cfg.scaleCounts = nil
	}
	for _, t := range cfg.targets {
		if targetDescriptions[t] == "" || t == targetShare || t == targetNchan || t == targetFleet || t == targetTrio {
			return fmt.Errorf("unknown target %q (%s, %s, %s and %s are for -fanout-targets)", t, targetShare, targetFleet, targetTrio, targetNchan)
		}
	}
	if *fanN != "" {
		cfg.fanoutCounts = nil
		for _, f := range strings.Split(*fanN, ",") {
			n, err := strconv.Atoi(f)
			if err != nil || n <= 0 {
				return fmt.Errorf("bad -fanout count %q", f)
			}
			cfg.fanoutCounts = append(cfg.fanoutCounts, n)
		}
	}
	if *fanIv > 0 {
		cfg.fanoutInterval = *fanIv
	}
	if cfg.scenarios["fanout"] {
		for _, t := range strings.Split(*fanT, ",") {
			if t == targetDirect || targetDescriptions[t] == "" {
				return fmt.Errorf("unknown fan-out target %q", t)
			}
			cfg.fanoutTargets = append(cfg.fanoutTargets, t)
		}
	} else {
		cfg.fanoutCounts = nil
	}
	if *scale != "" {
		cfg.scaleCounts = nil
		for _, f := range strings.Split(*scale, ",") {
			n, err := strconv.Atoi(f)
			if err != nil || n <= 0 {
				return fmt.Errorf("bad -scale count %q", f)
			}
			cfg.scaleCounts = append(cfg.scaleCounts, n)
		}
	}

	limit, err := raiseOpenFiles()
	if err != nil {
		return err
	}
	// Every proxied stream costs the harness two descriptors (client and
	// upstream side) and the gateway two (its client and upstream side).
	maxStreams := int(limit-256) / 2
	for i, n := range cfg.scaleCounts {
		if n > maxStreams {
			log.Printf("scale: %d streams do not fit the open-files limit of %d; measuring %d", n, limit, maxStreams)
			cfg.scaleCounts[i] = maxStreams
		}
	}
	// The fan-out counts are every fan-out target's, so the tightest bound
	// applies: a proxy's (two descriptors per subscriber in the harness)
	// when one is measured, else one per subscriber (share, the fleet,
	// the floor, Nchan).
	maxFanout := fleetCap(limit)
	if slicesContains(cfg.fanoutTargets, targetCaddy) || slicesContains(cfg.fanoutTargets, targetNginx) {
		maxFanout = maxStreams
	}
	for i, n := range cfg.fanoutCounts {
		if n > maxFanout {
			log.Printf("fanout: %d subscribers do not fit the open-files limit of %d; measuring %d", n, limit, maxFanout)
			cfg.fanoutCounts[i] = maxFanout
			cfg.fanoutCapped = true
		}
	}

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()

	scratch, err := os.MkdirTemp("", "caddy-sse-bench-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(scratch)

	l := &launcher{scratch: scratch, heartbeat: cfg.heartbeat, running: map[*gateway]bool{}}
	defer l.stopAll()
	all := append(slices.Clone(cfg.targets), cfg.fanoutTargets...)
	if needsCaddy(all) {
		l.caddyBin = *caddyBin
		if l.caddyBin == "" {
			l.caddyBin = filepath.Join(scratch, "caddy")
			if err := goBuild(ctx, *root, "./cmd/caddy", l.caddyBin); err != nil {
				return err
			}
		}
	}
	if slicesContains(all, targetFleet) {
		l.fleetBin = *fleetBin
		if l.fleetBin == "" {
			l.fleetBin = filepath.Join(scratch, "caddy-natsstore")
			if err := goBuild(ctx, *root, "./natsstore/cmd/caddy-nats", l.fleetBin); err != nil {
				return err
			}
		}
		if l.selfBin, err = os.Executable(); err != nil {
			return err
		}
	}
	if slicesContains(all, targetFloor) {
		l.floorBin = filepath.Join(scratch, "caddyfloor")
		if err := goBuild(ctx, *root, "./internal/caddyfloor", l.floorBin); err != nil {
			return err
		}
	}
	if slicesContains(all, targetNginx) || slicesContains(all, targetNchan) {
		if l.nginxBin, err = findOrInstallNginx(); err != nil {
			return err
		}
	}
	if slicesContains(all, targetNchan) {
		if l.nchanMod, err = findNchanModule(); err != nil {
			return err
		}
	}

	up, err := startUpstream()
	if err != nil {
		return err
	}
	defer up.close()
	l.upstream = up.addr()

	machine := describeMachine(l)
	machine.note = *note
	// Read before anything is measured, so the report names the code that
	// was built, not a tree edited during the run.
	machine.source = describeSource(*root, *caddyBin)
	machine.openFiles, machine.maxStreams = limit, maxStreams
	log.Print(strings.ReplaceAll(machine.source.describe(), "`", ""))
	started := time.Now()
	res := &results{cfg: cfg}
	b := &bench{cfg: cfg, up: up, dialers: newDialers(), launcher: l, res: res}
	log.Printf("targets %s; upstream on %s; open files %d", strings.Join(cfg.targets, ", "), up.addr(), limit)

	if cfg.scenarios["latency"] || cfg.scenarios["throughput"] || cfg.scenarios["teardown"] || cfg.scenarios["churn"] {
		if err := b.runShared(ctx); err != nil {
			return err
		}
	}
	if err := b.runScale(ctx); err != nil {
		return err
	}
	if err := b.runFanout(ctx); err != nil {
		return err
	}
	if *profile != "" && slicesContains(cfg.targets, targetSSE) {
		if err := b.profileSSE(ctx, *profile); err != nil {
			log.Printf("profile: %v", err)
		}
	}
	machine.duration = time.Since(started)
	machine.loadAfter = loadAverage()
	log.Printf("measured in %s", machine.duration.Round(time.Second))
	// The verdicts against the targets, in the log as in the report,
	// so a missed target shows in every run, the smoke run included.
	for _, row := range targetRows(res) {
		word := "met   "
		if !row.met {
			word = "MISSED"
		}
		log.Printf("target %s %s: %s", word, strings.ReplaceAll(row.goal, "**", ""), row.measured)
	}

	if *out != "" {
		if err := os.MkdirAll(*out, 0o755); err != nil {
			return err
		}
		if err := writePlots(res, *out); err != nil {
			return fmt.Errorf("plots: %w", err)
		}
		// The notes are written by hand from profiles; a smoke run's report,
		// which measures nothing, leaves them out.
		var notes string
		if !cfg.smoke {
			data, err := os.ReadFile(filepath.Join(*root, "bench", "analysis.md"))
			if err != nil && !errors.Is(err, os.ErrNotExist) {
				return err
			}
			notes = notesSection(string(data), *root, machine.source)
		}
		if err := writeReport(res, machine, notes, filepath.Join(*out, "benchmarks.md")); err != nil {
			return fmt.Errorf("report: %w", err)
		}
		log.Printf("wrote %s", filepath.Join(*out, "benchmarks.md"))
	}
	if len(res.problems) > 0 {
		return fmt.Errorf("%d problems:\n  %s", len(res.problems), strings.Join(res.problems, "\n  "))
	}
	return nil
}

// raiseOpenFiles lifts the soft open-files limit to the hard one; the targets
// started later inherit it.
func raiseOpenFiles() (uint64, error) {
	var lim syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
		return 0, err
	}
	lim.Cur = lim.Max
	if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
		return 0, err
	}
	return lim.Cur, nil
}

// goBuild builds the command pkg of the repository at root into out.
func goBuild(ctx context.Context, root, pkg, out string) error {
	log.Printf("building %s/%s", root, strings.TrimPrefix(pkg, "./"))
	build := exec.CommandContext(ctx, "go", "build", "-o", out, pkg)
	build.Dir = root
	build.Stdout, build.Stderr = os.Stderr, os.Stderr
	if err := build.Run(); err != nil {
		return fmt.Errorf("build %s: %w", pkg, err)
	}
	return nil
}

func needsCaddy(targets []string) bool {
	return slicesContains(targets, targetCaddy) || slicesContains(targets, targetSSE) || slicesContains(targets, targetShare) || slicesContains(targets, targetTrio)
}

func slicesContains(list []string, s string) bool {
	for _, v := range list {
		if v == s {
			return true
		}
	}
	return false
}

// findOrInstallNginx returns nginx's path, installing Debian's package first
// when it is not there.
func findOrInstallNginx() (string, error) {
	find := func() (string, error) {
		if p, err := exec.LookPath("nginx"); err == nil {
			return p, nil
		}
		if _, err := os.Stat("/usr/sbin/nginx"); err == nil {
			return "/usr/sbin/nginx", nil
		}
		return "", errors.New("nginx not found")
	}
	if p, err := find(); err == nil {
		return p, nil
	}
	if os.Geteuid() != 0 {
		return "", errors.New("nginx is not installed and installing it needs root: apt-get install -y nginx")
	}
	log.Print("installing nginx from Debian")
	if err := aptInstall("nginx"); err != nil {
		return "", fmt.Errorf("install nginx: %w", err)
	}
	// Debian's package may start its own service on port 80; this run uses
	// its own instance and leaves that one alone.
	return find()
}

// aptInstall installs a Debian package.
func aptInstall(pkg string) error {
	install := exec.Command("sh", "-c", "apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "+pkg)
	install.Stdout, install.Stderr = os.Stderr, os.Stderr
	return install.Run()
}

// profileSSE takes CPU profiles of the sse target under the two loads where
// its own work shows: many idle streams with heartbeats, and one fast stream.
func (b *bench) profileSSE(ctx context.Context, dir string) error {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	g, err := b.launcher.start(targetSSE)
	if err != nil {
		return err
	}
	defer b.launcher.stop(g)
	n := fullConfig().scaleCounts[0]
	if len(b.cfg.scaleCounts) > 0 {
		n = b.cfg.scaleCounts[len(b.cfg.scaleCounts)-1]
	}
	set := openStreams(ctx, b.dialers, g.addr, n, b.cfg.dialParallel, func(int) string { return "/idle?dur=5m" }, nil)
	seconds := max(int(b.cfg.scaleWindow/time.Second), 1)
	log.Printf("profiling %s with %d idle streams for %ds", g.name, len(set.streams), seconds)
	err = g.cpuProfile(ctx, seconds, filepath.Join(dir, "sse-idle.pprof"))
	if err == nil {
		err = g.heapProfile(ctx, filepath.Join(dir, "sse-idle-heap.pprof"))
	}
	set.closeAll()
	b.drain("profile idle")
	if err != nil {
		return err
	}
	set = openStreams(ctx, b.dialers, g.addr, 1, 1, func(int) string { return "/events?interval=0&size=65536&dur=5m" }, nil)
	log.Printf("profiling %s with one fast stream of 64 KiB events for 5s", g.name)
	err = g.cpuProfile(ctx, 5, filepath.Join(dir, "sse-throughput.pprof"))
	set.closeAll()
	b.drain("profile throughput")
	return err
}
