//go:build linux

package main

import (
	"fmt"
	"runtime"
	"slices"
	"strings"
	"sync"
	"time"
)

// The fleet target (issue 18): fleetSize Caddy gateways, each its own
// process of the binary built from natsstore/cmd/caddy-nats, whose share keeps its
// events in one NATS server with JetStream. The gateway that holds a key's
// lease runs the one upstream request and appends each event to JetStream;
// every gateway with subscribers on the key reads the events and writes them
// to its own. The fan-out scenario runs it beside caddy+sse+share (one
// gateway, the memory store) with the same subscribers, spread evenly over
// the gateways (subscriber i on gateway i mod fleetSize), and the same
// upstream.

const (
	// fleetSize is the number of gateways in the fleet.
	fleetSize = 3
	// fleetLease is the natsstore lease of a key's upstream request.
	fleetLease = 3 * time.Second
	// fleetHost is the Host header of every request to the fleet, as a
	// load balancer in front of it passes on the one public name: share's
	// key includes the request's host, so clients that named each gateway
	// by its own address would be on three keys, not one.
	fleetHost = "sse-fleet.test"
)

// startFleet starts a fleet's NATS server, then its gateways, all fresh;
// for targetTrio, the same gateways with the memory store and no NATS.
func (l *launcher) startFleet(name string) (*gateway, error) {
	f := &gateway{name: name, members: make([]*gateway, fleetSize)}
	launch := func() (*gateway, error) { return l.launch(targetShare, "") }
	if name == targetFleet {
		nats, err := l.launch(natsProcess, "")
		if err != nil {
			return nil, err
		}
		f.nats = nats
		launch = func() (*gateway, error) { return l.launch(fleetMember, "nats://"+nats.addr) }
	}
	errs := make([]error, fleetSize)
	var wg sync.WaitGroup
	for i := range fleetSize {
		wg.Go(func() { f.members[i], errs[i] = launch() })
	}
	wg.Wait()
	for i, err := range errs {
		if err != nil {
			for _, m := range f.members {
				l.stop(m)
			}
			l.stop(f.nats)
			return nil, fmt.Errorf("%s: gateway %d of %d: %w", name, i+1, fleetSize, err)
		}
	}
	for _, m := range f.members {
		f.addrs = append(f.addrs, m.addr)
	}
	f.addr, f.host = f.addrs[0], fleetHost
	return f, nil
}

// addrFor returns the address the i-th client connects to: a fleet's
// gateways in turn, any other target's one address.
func (g *gateway) addrFor() func(int) string {
	if len(g.addrs) == 0 {
		return func(int) string { return g.addr }
	}
	return func(i int) string { return g.addrs[i%len(g.addrs)] }
}

// hasAdmin says whether the target's Go memory can be read (goMemory).
func (g *gateway) hasAdmin() bool { return g.admin != "" || g.members != nil }

// fleetCap is the most subscribers the fleet can hold under the open-files
// limit, which every process has of its own: each gateway holds one
// descriptor per subscriber of its share (a third), so the bound is the
// harness, which holds one per subscriber (its client side).
func fleetCap(limit uint64) int { return int(limit) - 256 }

// perGateway says how the fleet's subscribers were spread: "334+333+333".
func perGateway(opened []int) string {
	s := make([]string, len(opened))
	for i, n := range opened {
		s[i] = fmt.Sprint(n)
	}
	return strings.Join(s, "+")
}

// fleetRows are issue 18's claims against this run: one upstream request per
// key, for one gateway and for the fleet alike.
func fleetRows(res *results, add func(bool, string, string)) {
	cfg := res.cfg
	if len(res.fanout) == 0 || !slicesContains(cfg.fanoutTargets, targetFleet) {
		return
	}
	var parts []string
	met, counted := true, false
	for _, n := range cfg.fanoutCounts {
		f := res.fanoutFor(targetFleet, n)
		if f == nil || f.opened == 0 {
			continue
		}
		counted = true
		met = met && f.made == 1 && f.upstream == 1
		cell := fmt.Sprintf("%s: fleet %d", subscribers(f.opened), f.made)
		if s := res.fanoutFor(targetShare, n); s != nil && s.opened > 0 {
			met = met && s.made == 1 && s.upstream == 1
			cell += fmt.Sprintf(", share %d", s.made)
		}
		parts = append(parts, cell)
	}
	if counted {
		add(met, fmt.Sprintf("fan-out through a fleet of %d gateways sharing a NATS JetStream store: exactly 1 upstream request per key for the whole fleet, as for one gateway with the memory store (requests the upstream received while the subscribers were connected)", fleetSize),
			strings.Join(parts, "; "))
	}
}

// fleetSection writes the report's fleet subsection, after the fan-out table.
func fleetSection(w func(string, ...any), res *results) {
	cfg := res.cfg
	if len(res.fanout) == 0 || !slicesContains(cfg.fanoutTargets, targetFleet) {
		return
	}
	w("### Through a fleet of %d gateways (issue 18)\n\n", fleetSize)
	w("The same scenario, with **%s** (one gateway, share's memory store) beside **%s**: %d Caddy\n", targetShare, targetFleet, fleetSize)
	w("processes built from `natsstore/cmd/caddy-nats`, each with `share {path} { store nats { url … lease %s } }`, and\n", fleetLease)
	w("one NATS server with JetStream (nats-server %s, linked into the harness from its Go module and run in a\n", natsVersion)
	w("child process of it, started fresh with an empty store for each count and round). Subscriber *i* connects to\n")
	w("gateway *i* mod %d, so they are spread evenly, all with the same `Host` header (`%s`), as behind a load\n", fleetSize, fleetHost)
	w("balancer: share's key includes the host. The upstream is the same one. One gateway holds the key's lease\n")
	w("and runs the upstream request, appending each event to JetStream; every gateway with subscribers reads the\n")
	w("events back and writes them to its own, so the fleet's latency includes the JetStream hop. Latency is, as\n")
	w("above, the upstream's send stamp to the client's receipt. *Added by the JetStream hop* is the fleet's\n")
	w("quantile minus the memory store's at the same count; the two are separate processes and runs, so the\n")
	w("difference carries their round-to-round spread too. With one subscriber the hop is all that differs. With\n")
	w("many, the fleet is also %d processes instead of one: each writes the event to a third of the subscribers, in\n", fleetSize)
	w("parallel with the others, which can make it faster, while they contend for the machine's %d cores with each\n", runtime.NumCPU())
	w("other and with the clients, which can make it slower; either can outweigh the hop. The control target\n")
	w("%s, run when `-fanout-targets` names it, separates the two. *Upstream requests* is\n", targetTrio)
	w("how many `/broadcast` requests the upstream received from the target from the first subscriber's connect\n")
	w("until, after the window and the wait for its last deliveries, the subscribers leave (it must be 1 for both:\n")
	w("one per key for the whole fleet). The fleet's *RSS* is the sum of its %d gateways' (VmRSS, as for\n", fleetSize)
	w("every target), and *RSS/subscriber* is that sum's growth ÷ subscribers; the NATS server's memory is **not** in\n")
	w("it and is given apart (its RSS when idle and at the window's end), as is its CPU during the window.\n\n")
	trio := slicesContains(cfg.fanoutTargets, targetTrio)
	if trio {
		w("**%s** is the control: the same %d gateways with the subscribers spread the same way, but each with\n", targetTrio, fleetSize)
		w("the memory store, so each makes its own upstream request and nothing crosses NATS. The fleet minus it is\n")
		w("the JetStream hop alone, without the effect of running %d processes on the machine's cores.\n\n", fleetSize)
	}
	w("| subscribers | target | per gateway | upstream requests | deliveries | p50 | p99 | added by the JetStream hop: fleet minus one gateway (p50 / p99) |")
	if trio {
		w(" fleet minus %s (p50 / p99) |", targetTrio)
	}
	w(" RSS idle | RSS with subscribers | RSS/subscriber | Go heap+stack/subscriber | CPU %% | NATS server RSS | NATS server CPU %% |\n")
	w("|---:|---|---|---:|---:|---:|---:|---:|")
	if trio {
		w("---:|")
	}
	w("---:|---:|---:|---:|---:|---:|---:|\n")
	minus := func(f, o *fanoutResult) string {
		if f == nil || o == nil || len(f.samples) == 0 || len(o.samples) == 0 {
			return "—"
		}
		return signedLat(quantile(f.samples, 0.5)-quantile(o.samples, 0.5)) + " / " + signedLat(quantile(f.samples, 0.99)-quantile(o.samples, 0.99))
	}
	for _, n := range cfg.fanoutCounts {
		mem, alone := res.fanoutFor(targetShare, n), res.fanoutFor(targetTrio, n)
		for _, t := range []string{targetShare, targetTrio, targetFleet} {
			f := res.fanoutFor(t, n)
			if f == nil || !slicesContains(cfg.fanoutTargets, t) {
				continue
			}
			spread, hopMem, hopAlone, nats, natsCPU := "—", "—", "—", "—", "—"
			if f.perGateway != nil {
				spread = perGateway(f.perGateway)
			}
			if t == targetFleet {
				hopMem, hopAlone = minus(f, mem), minus(f, alone)
				nats = fmt.Sprintf("%.1f → %.1f MiB", mib(f.natsBase), mib(f.natsLoad))
				natsCPU = fmt.Sprintf("%.1f", f.natsCPU)
			}
			goCell := "—"
			if f.goRounds > 0 {
				goCell = fmt.Sprintf("%.2f KiB", kib(f.goPerSub/float64(f.goRounds)))
			}
			w("| %d | %s | %s | %d | %d of %d | %s | %s | %s |", f.opened, t, spread, f.made, len(f.samples), f.expected,
				lat(quantile(f.samples, 0.5)), lat(quantile(f.samples, 0.99)), hopMem)
			if trio {
				w(" %s |", hopAlone)
			}
			w(" %.1f MiB | %.1f MiB | %.2f KiB | %s | %.1f | %s | %s |\n",
				mib(f.rssBase), mib(f.rssLoad), kib(f.perSubscriberRSS()), goCell, f.cpu, nats, natsCPU)
		}
	}
	w("\n")
}

// fleetAnalysis is the fleet's paragraph of the computed analysis.
func fleetAnalysis(w func(string, ...any), res *results) {
	largest := res.fanoutLargest()
	f := res.fanoutFor(targetFleet, largest)
	if f == nil || len(f.samples) == 0 {
		return
	}
	w("**Fleet.** With %s spread over %d gateways (%s) sharing one NATS JetStream store, the upstream received %d request%s",
		subscribers(f.opened), fleetSize, perGateway(f.perGateway), f.made, plural(int(f.made)))
	s := res.fanoutFor(targetShare, largest)
	if s != nil {
		w(" (one gateway with the memory store: %d)", s.made)
	}
	w(". Send to receipt through the fleet: p50 %s, p99 %s", lat(quantile(f.samples, 0.5)), lat(quantile(f.samples, 0.99)))
	if s != nil && len(s.samples) > 0 {
		w(", against %s and %s with the memory store (fleet minus memory: %s at p50, %s at p99",
			lat(quantile(s.samples, 0.5)), lat(quantile(s.samples, 0.99)),
			signedLat(quantile(f.samples, 0.5)-quantile(s.samples, 0.5)), signedLat(quantile(f.samples, 0.99)-quantile(s.samples, 0.99)))
		if largest > 1 {
			w("; this also holds running %d processes instead of one", fleetSize)
		}
		w(")")
	}
	// With one subscriber, the hop is all that differs.
	smallest := slices.Min(res.cfg.fanoutCounts)
	f1, s1 := res.fanoutFor(targetFleet, smallest), res.fanoutFor(targetShare, smallest)
	if smallest < largest && f1 != nil && s1 != nil && len(f1.samples) > 0 && len(s1.samples) > 0 {
		w(". With %s, where the JetStream hop is what differs, the fleet's p50 was %s (memory store %s: %s), its p99 %s (%s: %s)",
			subscribers(smallest), lat(quantile(f1.samples, 0.5)), lat(quantile(s1.samples, 0.5)), signedLat(quantile(f1.samples, 0.5)-quantile(s1.samples, 0.5)),
			lat(quantile(f1.samples, 0.99)), lat(quantile(s1.samples, 0.99)), signedLat(quantile(f1.samples, 0.99)-quantile(s1.samples, 0.99)))
	}
	if a := res.fanoutFor(targetTrio, largest); a != nil && len(a.samples) > 0 {
		w(". The same %d gateways without the store (%s, %d upstream requests): p50 %s, p99 %s, so the JetStream hop itself added %s at p50 and %s at p99",
			fleetSize, targetTrio, a.made, lat(quantile(a.samples, 0.5)), lat(quantile(a.samples, 0.99)),
			signedLat(quantile(f.samples, 0.5)-quantile(a.samples, 0.5)), signedLat(quantile(f.samples, 0.99)-quantile(a.samples, 0.99)))
	}
	w(". RSS per subscriber, summed over the gateways: %.2f KiB", kib(f.perSubscriberRSS()))
	if s != nil && s.opened > 0 {
		w(" (memory store, one gateway: %.2f KiB)", kib(s.perSubscriberRSS()))
	}
	w("; the NATS server, counted apart, went from %.1f MiB idle to %.1f MiB.\n\n", mib(f.natsBase), mib(f.natsLoad))
}

// signedLat is a latency difference, with its sign.
func signedLat(ns int64) string {
	if ns < 0 {
		return "−" + lat(-ns)
	}
	return "+" + lat(ns)
}
