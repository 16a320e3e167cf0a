//go:build linux

package main

import (
	"context"
	"fmt"
	"log"
	"math/rand/v2"
	"slices"
	"sync"
	"time"
)

// config is what a run measures and for how long.
type config struct {
	smoke     bool
	targets   []string
	scenarios map[string]bool
	rounds    int

	latencyCounts []int
	eventRate     float64 // events per second over all streams of a latency run
	eventSize     int     // bytes per latency event
	warmup        time.Duration
	measure       time.Duration

	throughputSizes   []int
	throughputMeasure time.Duration

	scaleCounts []int
	scaleSettle time.Duration
	scaleWindow time.Duration
	heartbeat   time.Duration

	teardownStreams int
	teardownSpacing time.Duration

	// The churn scenario holds churnStreams idle streams and, for
	// churnMeasure, closes one and opens another churnRate times a second.
	churnStreams int
	churnRate    float64
	churnMeasure time.Duration

	// The fan-out scenario subscribes fanoutCounts clients to one path of
	// each of fanoutTargets and sends one event to all of them every
	// fanoutInterval; it keeps the events sent in fanoutMeasure after
	// fanoutWarmup, and waits fanoutDeliver for the last to arrive.
	fanoutTargets  []string
	fanoutCounts   []int
	fanoutInterval time.Duration
	fanoutWarmup   time.Duration
	fanoutMeasure  time.Duration
	fanoutDeliver  time.Duration
	// fanoutCapped says a count was lowered to fit the open-files limit.
	fanoutCapped bool

	dialParallel int
}

func fullConfig() config {
	return config{
		rounds:            2,
		latencyCounts:     []int{1, 100, 1000},
		eventRate:         2000,
		eventSize:         128,
		warmup:            time.Second,
		measure:           4 * time.Second,
		throughputSizes:   []int{1 << 10, 64 << 10},
		throughputMeasure: 3 * time.Second,
		scaleCounts:       []int{1000, 5000, 8000},
		scaleSettle:       3 * time.Second,
		scaleWindow:       15 * time.Second,
		heartbeat:         15 * time.Second,
		teardownStreams:   250,
		teardownSpacing:   4 * time.Millisecond,
		churnStreams:      300,
		churnRate:         200,
		churnMeasure:      5 * time.Second,
		fanoutCounts:      []int{1, 1000, fanoutGoalSubscribers},
		fanoutInterval:    200 * time.Millisecond,
		fanoutWarmup:      time.Second,
		fanoutMeasure:     4 * time.Second,
		fanoutDeliver:     2 * time.Second,
		dialParallel:      128,
	}
}

// smokeConfig finishes in seconds: it proves every target and scenario works
// end to end, not how fast. Its heartbeat is short so that the scale
// scenario sees the sse target's heartbeats arrive.
func smokeConfig() config {
	return config{
		smoke:             true,
		rounds:            1,
		latencyCounts:     []int{1, 10},
		eventRate:         400,
		eventSize:         128,
		warmup:            100 * time.Millisecond,
		measure:           300 * time.Millisecond,
		throughputSizes:   []int{1 << 10, 64 << 10},
		throughputMeasure: 300 * time.Millisecond,
		scaleCounts:       []int{50},
		scaleSettle:       200 * time.Millisecond,
		scaleWindow:       time.Second,
		heartbeat:         250 * time.Millisecond,
		teardownStreams:   20,
		teardownSpacing:   2 * time.Millisecond,
		churnStreams:      20,
		churnRate:         50,
		churnMeasure:      400 * time.Millisecond,
		fanoutCounts:      []int{1, 20},
		fanoutInterval:    100 * time.Millisecond,
		fanoutWarmup:      200 * time.Millisecond,
		fanoutMeasure:     500 * time.Millisecond,
		fanoutDeliver:     300 * time.Millisecond,
		dialParallel:      32,
	}
}

type latencyResult struct {
	target  string
	streams int
	samples []int64 // ns, sorted
	opened  int
	failed  int
	early   int // streams that ended before the run did
	cpu     float64
	// seconds is the length of the measurement windows, summed over rounds;
	// len(samples) / seconds is the rate the clients received.
	seconds float64
	// sent is how many events the upstream wrote in sentSeconds (the same
	// windows, as the harness's clock saw them), skipped how many it gave up.
	sent        int64
	sentSeconds float64
	skipped     int64
	// roundP99 is each round's own p99, to show how far rounds disagree.
	roundP99 []int64
}

// receivedRate is the events per second the clients received in the windows.
func (l *latencyResult) receivedRate() float64 {
	if l.seconds == 0 {
		return 0
	}
	return float64(len(l.samples)) / l.seconds
}

// sentRate is the events per second the upstream wrote in the windows.
func (l *latencyResult) sentRate() float64 {
	if l.sentSeconds == 0 {
		return 0
	}
	return float64(l.sent) / l.sentSeconds
}

type throughputResult struct {
	target  string
	size    int
	events  int64
	bytes   int64
	seconds float64
	cpu     float64
	failed  int
	early   int
	// roundRates is each round's events per second.
	roundRates []float64
}

type scaleResult struct {
	target           string
	streams          int
	opened           int
	failed           int
	early            int
	rssBase, rssLoad int64
	goBase, goLoad   goMemory
	goOK             bool
	cpu              float64
	window           time.Duration
	heartbeats       int64
}

type teardownResult struct {
	target  string
	samples []int64 // ns, sorted
	missing int
	failed  int
	// For churn: closes made and the seconds they took, so the achieved
	// rate can be set against the stated one.
	closes  int
	seconds float64
}

// closeRate is the closes per second a churn run achieved.
func (t *teardownResult) closeRate() float64 {
	if t.seconds == 0 {
		return 0
	}
	return float64(t.closes) / t.seconds
}

// results is everything a run measured.
type results struct {
	cfg        config
	latency    []*latencyResult
	throughput []*throughputResult
	scale      []*scaleResult
	teardown   []*teardownResult
	churn      []*teardownResult
	fanout     []*fanoutResult
	problems   []string
}

func (r *results) problem(format string, args ...any) {
	msg := fmt.Sprintf(format, args...)
	log.Print("PROBLEM: ", msg)
	r.problems = append(r.problems, msg)
}

// bench ties together the upstream, the clients and the targets.
type bench struct {
	cfg        config
	up         *upstream
	dialers    *dialers
	launcher   *launcher
	res        *results
	teardownID int
}

// rotated returns the targets starting at the round's offset, so every
// target in turn runs first and each sees the machine in every state.
func rotated(targets []string, round int) []string {
	k := round % len(targets)
	return append(slices.Clone(targets[k:]), targets[:k]...)
}

// runShared runs latency, throughput, teardown and churn against one
// long-lived process per target, alternating targets inside every step.
func (b *bench) runShared(ctx context.Context) error {
	gateways := map[string]*gateway{}
	defer func() {
		for _, g := range gateways {
			b.launcher.stop(g)
		}
	}()
	for _, name := range b.cfg.targets {
		g, err := b.launcher.start(name)
		if err != nil {
			return err
		}
		gateways[name] = g
	}
	latency := map[string]*latencyResult{}
	throughput := map[string]*throughputResult{}
	teardown := map[string]*teardownResult{}
	churn := map[string]*teardownResult{}
	for round := range b.cfg.rounds {
		order := rotated(b.cfg.targets, round)
		for _, n := range b.cfg.latencyCounts {
			for _, name := range order {
				if ctx.Err() != nil {
					return ctx.Err()
				}
				key := fmt.Sprintf("%s/%d", name, n)
				r := b.runLatency(ctx, gateways[name], n)
				if prev := latency[key]; prev != nil {
					prev.samples = append(prev.samples, r.samples...)
					prev.opened += r.opened
					prev.failed += r.failed
					prev.early += r.early
					prev.cpu = (prev.cpu + r.cpu) / 2
					prev.seconds += r.seconds
					prev.sent += r.sent
					prev.sentSeconds += r.sentSeconds
					prev.skipped += r.skipped
					prev.roundP99 = append(prev.roundP99, r.roundP99...)
				} else {
					latency[key] = r
					b.res.latency = append(b.res.latency, r)
				}
			}
		}
		for _, size := range b.cfg.throughputSizes {
			for _, name := range order {
				if ctx.Err() != nil {
					return ctx.Err()
				}
				key := fmt.Sprintf("%s/%d", name, size)
				r := b.runThroughput(ctx, gateways[name], size)
				if prev := throughput[key]; prev != nil {
					prev.events += r.events
					prev.bytes += r.bytes
					prev.seconds += r.seconds
					prev.cpu = (prev.cpu + r.cpu) / 2
					prev.failed += r.failed
					prev.early += r.early
					prev.roundRates = append(prev.roundRates, r.roundRates...)
				} else {
					throughput[key] = r
					b.res.throughput = append(b.res.throughput, r)
				}
			}
		}
		for _, name := range order {
			if !b.cfg.scenarios["teardown"] {
				break
			}
			if ctx.Err() != nil {
				return ctx.Err()
			}
			r := b.runTeardown(ctx, gateways[name])
			if prev := teardown[name]; prev != nil {
				prev.samples = append(prev.samples, r.samples...)
				prev.missing += r.missing
				prev.failed += r.failed
			} else {
				teardown[name] = r
				b.res.teardown = append(b.res.teardown, r)
			}
		}
		for _, name := range order {
			if !b.cfg.scenarios["churn"] {
				break
			}
			if ctx.Err() != nil {
				return ctx.Err()
			}
			r := b.runChurn(ctx, gateways[name])
			if prev := churn[name]; prev != nil {
				prev.samples = append(prev.samples, r.samples...)
				prev.missing += r.missing
				prev.failed += r.failed
				prev.closes += r.closes
				prev.seconds += r.seconds
			} else {
				churn[name] = r
				b.res.churn = append(b.res.churn, r)
			}
		}
	}
	for _, r := range b.res.latency {
		slices.Sort(r.samples)
	}
	for _, r := range b.res.teardown {
		slices.Sort(r.samples)
	}
	for _, r := range b.res.churn {
		slices.Sort(r.samples)
	}
	return nil
}

// drain waits for the upstream to see every stream of the last run end.
func (b *bench) drain(what string) {
	if !b.up.waitDrained(10 * time.Second) {
		b.res.problem("%s: %d upstream streams still open 10s after the clients left", what, b.up.active.Load())
	}
}

// runLatency holds n streams that together receive cfg.eventRate stamped
// events per second, and keeps the latency of every event received inside
// the measurement window.
func (b *bench) runLatency(ctx context.Context, g *gateway, n int) *latencyResult {
	interval := time.Duration(float64(n) / b.cfg.eventRate * float64(time.Second))
	lifetime := b.cfg.warmup + b.cfg.measure + time.Minute
	path := fmt.Sprintf("/events?interval=%s&size=%d&dur=%s", interval, b.cfg.eventSize, lifetime)
	window := newSampleWindow()
	set := openStreams(ctx, b.dialers, g.addr, n, b.cfg.dialParallel, func(int) string { return path }, window)
	start, end := window.set(b.cfg.warmup, b.cfg.measure)
	time.Sleep(time.Until(start))
	sent0, skipped0, t0 := b.up.sent.Load(), b.up.skipped.Load(), time.Now()
	cpu := startCPU(g)
	time.Sleep(time.Until(end))
	sent1, skipped1, t1 := b.up.sent.Load(), b.up.skipped.Load(), time.Now()
	r := &latencyResult{target: g.name, streams: n, opened: len(set.streams), failed: set.failed, cpu: cpu.percent(),
		seconds: b.cfg.measure.Seconds(), sent: sent1 - sent0, sentSeconds: t1.Sub(t0).Seconds(), skipped: skipped1 - skipped0}
	// A little past the window's end, so events sent inside it have arrived.
	time.Sleep(50 * time.Millisecond)
	r.early = set.endedEarly()
	set.closeAll()
	for _, s := range set.streams {
		r.samples = append(r.samples, s.samples...)
	}
	b.drain("latency " + g.name)
	what := fmt.Sprintf("latency %s %d streams", g.name, n)
	b.checkSet(what, set, r.early)
	if len(r.samples) == 0 {
		b.res.problem("%s: no event received in the window", what)
	}
	b.checkRate(what, r)
	sorted := slices.Clone(r.samples)
	slices.Sort(sorted)
	r.roundP99 = []int64{quantile(sorted, 0.99)}
	log.Printf("%-34s events %6d (%6.0f/s sent, %6.0f/s received)  p50 %7.1fµs  p99 %7.1fµs  p99.9 %7.1fµs  cpu %5.1f%%", what, len(sorted),
		r.sentRate(), r.receivedRate(), micros(quantile(sorted, 0.5)), micros(quantile(sorted, 0.99)), micros(quantile(sorted, 0.999)), r.cpu)
	return r
}

// runThroughput has the upstream send events of size bytes to one stream as
// fast as the path takes them, and counts what arrives.
func (b *bench) runThroughput(ctx context.Context, g *gateway, size int) *throughputResult {
	warmup := b.cfg.warmup / 2
	lifetime := warmup + b.cfg.throughputMeasure + time.Minute
	path := fmt.Sprintf("/events?interval=0&size=%d&dur=%s", size, lifetime)
	set := openStreams(ctx, b.dialers, g.addr, 1, 1, func(int) string { return path }, nil)
	r := &throughputResult{target: g.name, size: size, failed: set.failed}
	what := fmt.Sprintf("throughput %s %dB", g.name, size)
	if len(set.streams) == 0 {
		b.res.problem("%s: stream did not open: %v", what, set.lastErr)
		return r
	}
	time.Sleep(warmup)
	e0, b0, _ := set.totals()
	cpu := startCPU(g)
	t0 := time.Now()
	time.Sleep(b.cfg.throughputMeasure)
	e1, b1, _ := set.totals()
	r.seconds = time.Since(t0).Seconds()
	r.cpu = cpu.percent()
	r.events, r.bytes = e1-e0, b1-b0
	r.roundRates = []float64{float64(r.events) / r.seconds}
	r.early = set.endedEarly()
	set.closeAll()
	b.drain(what)
	b.checkSet(what, set, r.early)
	if r.events == 0 {
		b.res.problem("%s: no event received", what)
	}
	log.Printf("%-34s %9.0f events/s  %8.1f MB/s  cpu %5.1f%%", what, float64(r.events)/r.seconds, float64(r.bytes)/r.seconds/1e6, r.cpu)
	return r
}

// runTeardown opens idle streams, then closes them one by one and measures,
// for each, how long until the upstream's handler sees its request end.
func (b *bench) runTeardown(ctx context.Context, g *gateway) *teardownResult {
	n := b.cfg.teardownStreams
	base := b.teardownID
	b.teardownID += n
	lifetime := time.Duration(n)*b.cfg.teardownSpacing + time.Minute
	set := openStreams(ctx, b.dialers, g.addr, n, b.cfg.dialParallel, func(i int) string {
		return fmt.Sprintf("/idle?id=%d&dur=%s", base+i, lifetime)
	}, nil)
	r := &teardownResult{target: g.name, failed: set.failed}
	what := "teardown " + g.name
	b.up.takeEnded()
	time.Sleep(100 * time.Millisecond)
	for _, s := range set.streams {
		s.close()
		time.Sleep(b.cfg.teardownSpacing)
	}
	// Each upstream handler records its end as it sees it; give the last
	// ones a bounded time to arrive.
	b.drain(what)
	ended := b.up.takeEnded()
	for _, s := range set.streams {
		at, ok := ended[base+s.id]
		if !ok {
			r.missing++
			continue
		}
		r.samples = append(r.samples, at.Sub(s.closedAt).Nanoseconds())
	}
	if set.failed > 0 {
		b.res.problem("%s: %d of %d streams failed to open: %v", what, set.failed, n, set.lastErr)
	}
	if r.missing > 0 {
		b.res.problem("%s: upstream never saw %d of %d streams end", what, r.missing, len(set.streams))
	}
	sorted := slices.Clone(r.samples)
	slices.Sort(sorted)
	log.Printf("%-34s closes %5d  p50 %7.1fµs  p99 %7.1fµs  max %7.1fµs", what, len(sorted),
		micros(quantile(sorted, 0.5)), micros(quantile(sorted, 0.99)), micros(quantile(sorted, 1)))
	return r
}

// runChurn holds cfg.churnStreams idle streams and, for cfg.churnMeasure,
// closes a random one and opens a new one cfg.churnRate times a second. For
// every close it measures, as runTeardown does, how long until the upstream's
// handler sees its request end, here while streams keep opening and closing
// around it. Closes are scheduled by absolute time, so a late wake-up makes
// the closes it owes at once instead of lowering the rate; opens run on
// their own goroutines and do not hold the schedule up.
func (b *bench) runChurn(ctx context.Context, g *gateway) *teardownResult {
	n := b.cfg.churnStreams
	what := "churn " + g.name
	lifetime := b.cfg.churnMeasure + time.Minute
	pathFor := func(id int) string { return fmt.Sprintf("/idle?id=%d&dur=%s", id, lifetime) }
	base := b.teardownID
	b.teardownID += n
	set := openStreams(ctx, b.dialers, g.addr, n, b.cfg.dialParallel, func(i int) string { return pathFor(base + i) }, nil)
	r := &teardownResult{target: g.name, failed: set.failed}
	type churned struct {
		s  *stream
		id int
	}
	var (
		mu      sync.Mutex
		alive   []churned
		lastErr = set.lastErr
		opens   sync.WaitGroup
		closed  []churned
		early   int
	)
	for _, s := range set.streams {
		alive = append(alive, churned{s, base + s.id})
	}
	b.up.takeEnded()
	time.Sleep(100 * time.Millisecond)

	interval := time.Duration(float64(time.Second) / b.cfg.churnRate)
	total := int(b.cfg.churnRate * b.cfg.churnMeasure.Seconds())
	sem := make(chan struct{}, b.cfg.dialParallel)
	start := time.Now()
	for k := range total {
		if ctx.Err() != nil {
			break
		}
		time.Sleep(time.Until(start.Add(time.Duration(k) * interval)))
		mu.Lock()
		if len(alive) == 0 {
			mu.Unlock()
			continue
		}
		i := rand.IntN(len(alive))
		c := alive[i]
		alive[i] = alive[len(alive)-1]
		alive = alive[:len(alive)-1]
		mu.Unlock()
		select {
		case <-c.s.done:
			// The gateway ended it first: its upstream end says nothing
			// about a client's close.
			early++
			c.s.close()
		default:
			c.s.close()
			closed = append(closed, c)
		}
		id := b.teardownID
		b.teardownID++
		opens.Add(1)
		go func() {
			defer opens.Done()
			sem <- struct{}{}
			defer func() { <-sem }()
			s, err := openStream(ctx, b.dialers, g.addr, pathFor(id), 15*time.Second)
			mu.Lock()
			defer mu.Unlock()
			if err != nil {
				r.failed++
				lastErr = err
				return
			}
			go s.read()
			alive = append(alive, churned{s, id})
		}()
	}
	// The last close is due one interval before the window ends; a schedule
	// that ran late stretches the window and lowers the rate.
	r.seconds = max(time.Since(start), b.cfg.churnMeasure).Seconds()
	r.closes = len(closed)
	opens.Wait()
	rest := &streamSet{}
	for _, c := range alive {
		rest.streams = append(rest.streams, c.s)
	}
	early += rest.endedEarly()
	rest.closeAll()
	b.drain(what)
	ended := b.up.takeEnded()
	for _, c := range closed {
		at, ok := ended[c.id]
		if !ok {
			r.missing++
			continue
		}
		r.samples = append(r.samples, at.Sub(c.s.closedAt).Nanoseconds())
	}
	if r.failed > 0 {
		b.res.problem("%s: %d streams failed to open: %v", what, r.failed, lastErr)
	}
	if early > 0 {
		b.res.problem("%s: %d streams ended before the run did", what, early)
	}
	if r.missing > 0 {
		b.res.problem("%s: upstream never saw %d of %d closed streams end", what, r.missing, len(closed))
	}
	if rate := r.closeRate(); rate < minRateShare*b.cfg.churnRate {
		b.res.problem("%s: closed %.0f streams/s, below %.0f %% of the stated %.0f/s", what, rate, 100*minRateShare, b.cfg.churnRate)
	}
	sorted := slices.Clone(r.samples)
	slices.Sort(sorted)
	log.Printf("%-34s closes %5d (%5.0f/s, %d alive)  p50 %7.1fµs  p99 %7.1fµs  max %7.1fµs", what, len(sorted), r.closeRate(), n,
		micros(quantile(sorted, 0.5)), micros(quantile(sorted, 0.99)), micros(quantile(sorted, 1)))
	return r
}

// runScale starts a fresh process per target and stream count, holds that
// many idle streams, and measures the process's memory and CPU.
func (b *bench) runScale(ctx context.Context) error {
	if !b.cfg.scenarios["scale"] {
		return nil
	}
	for _, n := range b.cfg.scaleCounts {
		for _, name := range b.cfg.targets {
			if name == targetDirect {
				continue
			}
			if ctx.Err() != nil {
				return ctx.Err()
			}
			r, err := b.runScaleOnce(ctx, name, n)
			if err != nil {
				return err
			}
			b.res.scale = append(b.res.scale, r)
		}
	}
	return nil
}

func (b *bench) runScaleOnce(ctx context.Context, name string, n int) (*scaleResult, error) {
	g, err := b.launcher.start(name)
	if err != nil {
		return nil, err
	}
	defer b.launcher.stop(g)
	what := fmt.Sprintf("scale %s %d streams", name, n)
	r := &scaleResult{target: name, streams: n, window: b.cfg.scaleWindow}
	time.Sleep(300 * time.Millisecond)
	if g.admin != "" {
		r.goBase, err = g.goMemory()
		r.goOK = err == nil
	}
	r.rssBase = g.rss()
	lifetime := b.cfg.scaleSettle + b.cfg.scaleWindow + 2*time.Minute
	set := openStreams(ctx, b.dialers, g.addr, n, b.cfg.dialParallel, func(int) string {
		return fmt.Sprintf("/idle?dur=%s", lifetime)
	}, nil)
	r.opened, r.failed = len(set.streams), set.failed
	time.Sleep(b.cfg.scaleSettle)
	if g.admin != "" {
		var err error
		r.goLoad, err = g.goMemory()
		r.goOK = r.goOK && err == nil
		if err != nil {
			b.res.problem("%s: Go memory from the admin API: %v", what, err)
		}
	}
	_, _, hb0 := set.totals()
	cpu := startCPU(g)
	time.Sleep(b.cfg.scaleWindow)
	r.cpu = cpu.percent()
	_, _, hb1 := set.totals()
	r.heartbeats = hb1 - hb0
	r.rssLoad = g.rss()
	r.early = set.endedEarly()
	set.closeAll()
	b.launcher.stop(g)
	b.drain(what)
	b.checkSet(what, set, r.early)
	switch {
	case name == targetSSE && b.cfg.heartbeat < b.cfg.scaleWindow && r.heartbeats == 0:
		b.res.problem("%s: no heartbeat arrived in a %s window with %s heartbeats", what, b.cfg.scaleWindow, b.cfg.heartbeat)
	case name != targetSSE && r.heartbeats != 0:
		b.res.problem("%s: %d comments arrived, but only the sse target sends heartbeats", what, r.heartbeats)
	}
	goCell := ""
	if r.goOK {
		goCell = fmt.Sprintf("  Go heap+stack %.2f KiB/stream (stack %.2f)", kib(r.perStreamGo()),
			kib((r.goLoad.stackInuse-r.goBase.stackInuse)/float64(r.opened)))
	}
	log.Printf("%-34s rss %6.1f→%6.1f MiB  %6.2f KiB/stream%s  cpu %5.2f%%  heartbeats %d", what,
		mib(r.rssBase), mib(r.rssLoad), kib(r.perStreamRSS()), goCell, r.cpu, r.heartbeats)
	return r, nil
}

// perStreamRSS is the resident memory the streams added, per stream.
func (r *scaleResult) perStreamRSS() float64 {
	if r.opened == 0 {
		return 0
	}
	return float64(r.rssLoad-r.rssBase) / float64(r.opened)
}

// perStreamGo is the Go heap and stacks the streams added, per stream.
func (r *scaleResult) perStreamGo() float64 {
	if r.opened == 0 || !r.goOK {
		return 0
	}
	return (r.goLoad.heapInuse + r.goLoad.stackInuse - r.goBase.heapInuse - r.goBase.stackInuse) / float64(r.opened)
}

// minRateShare is the share of its stated rate a paced run must achieve;
// below it the run is reported as a problem, since its figures describe a
// lighter load than the report states.
const minRateShare = 0.95

// checkRate reports a latency run whose upstream sent, or whose clients
// received, fewer events than the stated rate, or whose upstream gave events
// up.
func (b *bench) checkRate(what string, r *latencyResult) {
	floor := minRateShare * b.cfg.eventRate
	if r.sentRate() < floor {
		b.res.problem("%s: the upstream sent %.0f events/s, below %.0f %% of the stated %.0f/s", what, r.sentRate(), 100*minRateShare, b.cfg.eventRate)
	}
	if r.receivedRate() < floor {
		b.res.problem("%s: the clients received %.0f events/s, below %.0f %% of the stated %.0f/s", what, r.receivedRate(), 100*minRateShare, b.cfg.eventRate)
	}
	if r.skipped > 0 {
		b.res.problem("%s: the upstream fell more than %s behind and skipped %d events", what, maxLag, r.skipped)
	}
}

// checkSet reports streams that failed to open or ended on their own.
func (b *bench) checkSet(what string, set *streamSet, early int) {
	if set.failed > 0 {
		b.res.problem("%s: %d streams failed to open: %v", what, set.failed, set.lastErr)
	}
	if early > 0 {
		b.res.problem("%s: %d streams ended before the run did", what, early)
	}
}

// quantile returns the q-quantile of sorted samples (nearest rank).
func quantile(sorted []int64, q float64) int64 {
	if len(sorted) == 0 {
		return 0
	}
	i := int(q*float64(len(sorted))+0.999999) - 1
	return sorted[min(max(i, 0), len(sorted)-1)]
}

func micros(ns int64) float64 { return float64(ns) / 1e3 }
func mib(b int64) float64     { return float64(b) / (1 << 20) }
func kib(b float64) float64   { return b / 1024 }
