//go:build linux

package main

import (
	"fmt"
	"math"
	"os/exec"
	"regexp"
	"slices"
	"strconv"
	"strings"
)

// analysis writes what this run's figures say: every figure in it is
// computed here from the results, so the section cannot go stale the way a
// hand-written one did. Interpretation that needs profiles or reading the
// code stays in bench/analysis.md (see notesSection).
func analysis(res *results, m machine) string {
	var b strings.Builder
	w := func(format string, args ...any) { fmt.Fprintf(&b, format, args...) }
	cfg := res.cfg
	has := func(t string) bool { return slicesContains(cfg.targets, t) }

	// Latency.
	if has(targetSSE) && has(targetCaddy) && has(targetDirect) && len(res.latency) > 0 {
		var parts []string
		met, n := 0, 0
		for _, c := range cfg.latencyCounts {
			s, ok1 := res.added(targetSSE, c, 0.99)
			k, ok2 := res.added(targetCaddy, c, 0.99)
			if !ok1 || !ok2 {
				continue
			}
			n++
			if float64(s) <= 1.10*float64(max(k, 0)) {
				met++
			}
			parts = append(parts, fmt.Sprintf("%s at %s", ratio(float64(s), float64(k)), streams(c)))
		}
		if n > 0 {
			w("**Latency.** The sse target's added p99 ÷ bare `reverse_proxy`'s: %s; ≤ 1.10× at %d of %d stream counts.\n",
				strings.Join(parts, ", "), met, n)
			if spread, median, ok := latencySpread(res); ok {
				w("Between the %d rounds, one target's p99 at one stream count moved by up to %.0f %% (median %.0f %%) from\n", cfg.rounds, spread, median)
				w("its lowest round, so a ratio of added latencies nearer 1.00× than that is not a difference this run can tell.\n")
			} else {
				w("With one round, this run cannot say how far its p99s move from round to round.\n")
			}
		}
		if has(targetNginx) {
			above, caddyToo, counted := 0, 0, 0
			for _, c := range cfg.latencyCounts {
				s, ok1 := res.added(targetSSE, c, 0.99)
				k, ok2 := res.added(targetCaddy, c, 0.99)
				g, ok3 := res.added(targetNginx, c, 0.99)
				if !ok1 || !ok2 || !ok3 {
					continue
				}
				counted++
				if s > g {
					above++
					if k > g {
						caddyToo++
					}
				}
			}
			if counted > 0 {
				w("The sse target's added p99 is above nginx's at %d of %d stream counts", above, counted)
				if above > 0 {
					w("; bare `reverse_proxy`'s is above nginx's at %d of those %d, so there the gap to nginx is\n", caddyToo, above)
					w("(at least in part) Caddy's own proxy path, which the module sits on")
				}
				w(".\n")
			}
		}
		if lowest, what, ok := lowestRate(res); ok {
			w("The lowest event rate any latency run received was %.1f %% of the stated one (%s)", 100*lowest, what)
			if lowest < minRateShare {
				w(": below %.0f %%, see the problems below", 100*minRateShare)
			}
			w(".\n")
		}
		w("\n")
	}

	// Throughput.
	if has(targetSSE) && has(targetCaddy) && len(res.throughput) > 0 {
		var parts []string
		met, n := 0, 0
		for _, size := range cfg.throughputSizes {
			s, c := res.throughputFor(targetSSE, size), res.throughputFor(targetCaddy, size)
			if s == nil || c == nil || c.events == 0 || s.seconds == 0 {
				continue
			}
			rs, rc := float64(s.events)/s.seconds, float64(c.events)/c.seconds
			n++
			if rs >= 0.95*rc {
				met++
			}
			parts = append(parts, fmt.Sprintf("%s with %s events (CPU %.0f %% vs %.0f %% of a core)", ratio(rs, rc), sizeName(size), s.cpu, c.cpu))
		}
		if n > 0 {
			w("**Throughput.** The sse target's events/s ÷ bare `reverse_proxy`'s on one stream: %s; ≥ 0.95× at %d of %d sizes.\n",
				strings.Join(parts, ", "), met, n)
			if spread, ok := throughputSpread(res); ok {
				w("Between the %d rounds, one target's events/s at one size moved by up to %.0f %% from its lowest round.\n", cfg.rounds, spread)
			}
			w("\n")
		}
	}

	// Memory.
	var counts []int
	for _, s := range res.scale {
		if !slices.Contains(counts, s.opened) && s.opened > 0 {
			counts = append(counts, s.opened)
		}
	}
	slices.Sort(counts)
	if len(counts) > 0 {
		w("**Memory.** ")
		var slopes []string
		for _, t := range cfg.targets {
			if rf, _, ok := res.scaleFit(t); ok {
				slopes = append(slopes, fmt.Sprintf("%s %.1f KiB", t, kib(rf.slope)))
			}
		}
		how := "slope of a linear fit over"
		if len(counts) == 1 {
			how = "a single count,"
		}
		w("RSS per proxied stream (%s %s): %s.\n", how, countList(counts), strings.Join(slopes, ", "))
		var grs []string
		for _, t := range []string{targetCaddy, targetSSE} {
			if s := res.scaleFor(t, cfg.scaleCounts[len(cfg.scaleCounts)-1]); s != nil && s.goOK && s.opened > 0 {
				grs = append(grs, fmt.Sprintf("%s %.2f", t, (s.goLoad.goroutines-s.goBase.goroutines)/float64(s.opened)))
			}
		}
		if len(grs) > 0 {
			w("Goroutines per stream at %s: %s.\n", streams(cfg.scaleCounts[len(cfg.scaleCounts)-1]), strings.Join(grs, ", "))
		}
		if has(targetSSE) && has(targetCaddy) {
			var rssParts, goParts []string
			for _, c := range cfg.scaleCounts {
				s, k := res.scaleFor(targetSSE, c), res.scaleFor(targetCaddy, c)
				if s == nil || k == nil {
					continue
				}
				rssParts = append(rssParts, fmt.Sprintf("%+.2f KiB at %s", kib(s.perStreamRSS()-k.perStreamRSS()), streams(c)))
				if s.goOK && k.goOK {
					goParts = append(goParts, fmt.Sprintf("%+.2f KiB at %s", kib(s.perStreamGo()-k.perStreamGo()), streams(c)))
				}
			}
			if len(rssParts) > 0 {
				w("The module's extra per stream over bare `reverse_proxy`, by RSS: %s", strings.Join(rssParts, ", "))
				sr, _, ok1 := res.scaleFit(targetSSE)
				cr, _, ok2 := res.scaleFit(targetCaddy)
				if ok1 && ok2 && len(counts) > 1 {
					w("; %+.2f KiB by the slopes", kib(sr.slope-cr.slope))
				}
				w(".\n")
			}
			if len(goParts) > 0 {
				w("By Go heap+stack after a forced collection, which leaves out memory the runtime holds but has freed: %s",
					strings.Join(goParts, ", "))
				sg, ok1 := res.scaleGoFit(targetSSE)
				cg, ok2 := res.scaleGoFit(targetCaddy)
				if ok1 && ok2 && len(counts) > 1 {
					extra := sg.slope - cg.slope
					w("; %+.2f KiB by the slopes, which %s the 1 KiB target", kib(extra), map[bool]string{true: "meets", false: "misses"}[extra <= 1024])
				}
				w(".\n")
			}
		}
		if len(counts) > 1 {
			var flat []string
			for _, t := range cfg.targets {
				lo, hi := res.scaleFor(t, cfg.scaleCounts[0]), res.scaleFor(t, cfg.scaleCounts[len(cfg.scaleCounts)-1])
				if lo == nil || hi == nil || lo.perStreamRSS() <= 0 {
					continue
				}
				flat = append(flat, fmt.Sprintf("%s %+.0f %%", t, 100*(hi.perStreamRSS()/lo.perStreamRSS()-1)))
			}
			if len(flat) > 0 {
				w("RSS per stream from %s to %s changed by: %s.\n", streams(cfg.scaleCounts[0]), streams(cfg.scaleCounts[len(cfg.scaleCounts)-1]), strings.Join(flat, ", "))
			}
		}
		w("\n")
	}

	// Heartbeats.
	if has(targetSSE) && has(targetCaddy) && len(res.scale) > 0 {
		_, sc, ok1 := res.scaleFit(targetSSE)
		_, cc, ok2 := res.scaleFit(targetCaddy)
		if ok1 && ok2 {
			per1000 := (sc.slope - cc.slope) * 1000
			projected := (sc.slope - cc.slope) * projectedStreams
			w("**Heartbeats.** With a heartbeat every %s, the sse target's CPU above bare `reverse_proxy`'s grows by %.3f %% of\n", cfg.heartbeat, per1000)
			w("one core per 1,000 idle streams (slope of the fit); projected to %d streams, %.2f %%, which %s the < 10 %% target.\n",
				projectedStreams, projected, map[bool]string{true: "meets", false: "misses"}[projected < 10])
			var hb []string
			for _, c := range cfg.scaleCounts {
				if s := res.scaleFor(targetSSE, c); s != nil {
					hb = append(hb, fmt.Sprintf("%d over %s at %s", s.heartbeats, s.window, streams(s.opened)))
				}
			}
			w("Heartbeats the clients received in the measured windows: %s.\n\n", strings.Join(hb, ", "))
		}
	}

	// Teardown.
	teardownLine := func(label string, of func(string) *teardownResult) {
		s := of(targetSSE)
		if s == nil || len(s.samples) == 0 {
			return
		}
		inside := func(ns int64) string {
			if ns <= teardownGoal.Nanoseconds() {
				return "inside"
			}
			return "**outside**"
		}
		p99 := quantile(s.samples, 0.99)
		w("%s: the sse target's close p99 is %s (max %s), %s the %s target", label, us(p99), us(quantile(s.samples, 1)), inside(p99), teardownGoal)
		if s.missing > 0 {
			w(", and the upstream never saw %d of its closes end", s.missing)
		}
		if c := of(targetCaddy); c != nil && len(c.samples) > 0 {
			cp := quantile(c.samples, 0.99)
			w("; bare `reverse_proxy`'s is %s (%+.2f ms from it), %s", us(cp), float64(p99-cp)/1e6, inside(cp))
		}
		w(".\n")
	}
	if len(res.teardown) > 0 || len(res.churn) > 0 {
		w("**Teardown.** ")
		teardownLine(fmt.Sprintf("One close at a time (%s apart)", cfg.teardownSpacing), res.teardownFor)
		teardownLine(fmt.Sprintf("Under churn (%d streams held, %.0f closes and opens a second)", cfg.churnStreams, cfg.churnRate), res.churnFor)
		w("\n")
	}

	fanoutAnalysis(w, res)
	fleetAnalysis(w, res)

	// Scale.
	if len(counts) > 0 {
		w("**Scale.** The most streams measured in one process was %d. With the open-files limit of %d here and two\n", counts[len(counts)-1], m.openFiles)
		w("descriptors per proxied stream, one gateway process can hold about %d; the %d-stream figures are projections\n", m.maxStreams, projectedStreams)
		w("from the fits, not measurements.\n\n")
	}
	return b.String()
}

// streams says "1 stream", "100 streams".
func streams(n int) string { return fmt.Sprintf("%d stream%s", n, plural(n)) }

// countList says "1000, 5000 and 8000 streams".
func countList(counts []int) string {
	s := make([]string, len(counts))
	for i, c := range counts {
		s[i] = strconv.Itoa(c)
	}
	if len(s) == 1 {
		return streams(counts[0])
	}
	return strings.Join(s[:len(s)-1], ", ") + " and " + s[len(s)-1] + " streams"
}

// latencySpread is how far, in percent of its lowest round, one target's p99
// at one stream count moved between rounds: the largest and the median over
// all targets and counts.
func latencySpread(res *results) (worst, median float64, ok bool) {
	var spreads []float64
	for _, l := range res.latency {
		if len(l.roundP99) < 2 {
			continue
		}
		lo, hi := slices.Min(l.roundP99), slices.Max(l.roundP99)
		if lo > 0 {
			spreads = append(spreads, 100*float64(hi-lo)/float64(lo))
		}
	}
	if len(spreads) == 0 {
		return 0, 0, false
	}
	slices.Sort(spreads)
	return spreads[len(spreads)-1], spreads[len(spreads)/2], true
}

// throughputSpread is the largest move, in percent of its lowest round, of
// one target's events/s at one size between rounds.
func throughputSpread(res *results) (float64, bool) {
	worst, ok := 0.0, false
	for _, t := range res.throughput {
		if len(t.roundRates) < 2 {
			continue
		}
		lo, hi := slices.Min(t.roundRates), slices.Max(t.roundRates)
		if lo > 0 {
			worst, ok = math.Max(worst, 100*(hi-lo)/lo), true
		}
	}
	return worst, ok
}

// lowestRate is the smallest share of the stated event rate any latency run
// received, and which run that was.
func lowestRate(res *results) (float64, string, bool) {
	lowest, what, ok := math.Inf(1), "", false
	for _, l := range res.latency {
		if l.seconds == 0 {
			continue
		}
		if share := l.receivedRate() / res.cfg.eventRate; share < lowest {
			lowest, what, ok = share, fmt.Sprintf("%s, %s", l.target, streams(l.streams)), true
		}
	}
	return lowest, what, ok
}

// profiledCommit is the marker in bench/analysis.md naming the commit whose
// profiles and code its notes describe.
var profiledCommit = regexp.MustCompile(`<!--\s*profiled:\s*([0-9a-f]{7,40})\s*-->`)

// htmlComment matches the comments in bench/analysis.md, which are notes to
// its editors and are left out of the report.
var htmlComment = regexp.MustCompile(`(?s)<!--.*?-->`)

// notesSection wraps the hand-written notes of bench/analysis.md: a heading,
// then what they were written from and how far the measured code has moved
// since, then the notes without their comments.
func notesSection(notes, root string, src source) string {
	notes = strings.TrimSpace(notes)
	if notes == "" {
		return ""
	}
	var b strings.Builder
	b.WriteString("## Notes from profiles (hand-written)\n\n")
	match := profiledCommit.FindStringSubmatch(notes)
	notes = strings.TrimSpace(htmlComment.ReplaceAllString(notes, ""))
	b.WriteString("Written by hand in `bench/analysis.md`, from CPU and heap profiles, micro-benchmarks and the code ")
	if match == nil {
		b.WriteString("of an earlier, unnamed commit. **Not measured by this run**, and how far that code is from the code\n")
		b.WriteString("measured here is unknown; the figures above are this run's.\n\n")
		b.WriteString(notes + "\n")
		return b.String()
	}
	profiled := match[1]
	fmt.Fprintf(&b, "of commit `%s`. **Not measured by this run**; the figures above are this run's.", short(profiled))
	if src.commit != "" {
		out, err := exec.Command("git", "-C", root, "rev-list", "--count", profiled+".."+src.commit, "--", ".", ":(exclude)bench", ":(exclude)docs").Output()
		n, convErr := strconv.Atoi(strings.TrimSpace(string(out)))
		switch {
		case err != nil || convErr != nil:
			fmt.Fprintf(&b, " Whether the module's code changed since could not be read from git.")
		case n == 0 && len(src.module) == 0:
			fmt.Fprintf(&b, " The module's files are the same in the commit measured here.")
		default:
			fmt.Fprintf(&b, " Since then %d commit%s changed the module's files", n, plural(n))
			if len(src.module) > 0 {
				fmt.Fprintf(&b, ", and the tree measured had uncommitted changes")
			}
			fmt.Fprintf(&b, ", so a profile's figures may no longer hold.")
		}
	}
	b.WriteString("\n\n" + notes + "\n")
	return b.String()
}
