//go:build linux

package main

import (
	"fmt"
	"math"
	"path/filepath"

	"gonum.org/v1/plot"
	"gonum.org/v1/plot/plotter"
	"gonum.org/v1/plot/plotutil"
	"gonum.org/v1/plot/vg"
)

// targetStyle gives every target the same colour and marker in every plot.
func targetStyle(targets []string, name string) int {
	for i, t := range []string{targetDirect, targetCaddy, targetSSE, targetNginx, targetShare, targetNchan, targetFloor, targetFleet, targetTrio} {
		if t == name {
			return i
		}
	}
	return len(targets)
}

// writePlots draws the latency CDFs, memory per stream and CPU against
// streams as PNGs next to the report.
func writePlots(res *results, dir string) error {
	for _, n := range res.cfg.latencyCounts {
		if err := latencyPlot(res, n, filepath.Join(dir, fmt.Sprintf("bench-latency-%d.png", n))); err != nil {
			return err
		}
	}
	for _, n := range res.cfg.fanoutCounts {
		if len(res.fanout) == 0 {
			break
		}
		if err := fanoutPlot(res, n, filepath.Join(dir, fmt.Sprintf("bench-fanout-%d.png", n))); err != nil {
			return err
		}
	}
	if err := memoryPlot(res, filepath.Join(dir, "bench-memory.png")); err != nil {
		return err
	}
	return cpuPlot(res, filepath.Join(dir, "bench-cpu.png"))
}

// cdfPoints samples the distribution at quantiles spaced ever closer towards
// the tail, so p99 and p99.9 are visible without plotting every sample.
func cdfPoints(sorted []int64) plotter.XYs {
	var pts plotter.XYs
	for q := 0.0; q < 0.9; q += 0.01 {
		pts = append(pts, plotter.XY{X: micros(quantile(sorted, q)), Y: q})
	}
	for q := 0.9; q < 0.999; q += 0.001 {
		pts = append(pts, plotter.XY{X: micros(quantile(sorted, q)), Y: q})
	}
	for q := 0.999; q <= 1; q += 0.0001 {
		pts = append(pts, plotter.XY{X: micros(quantile(sorted, q)), Y: q})
	}
	pts = append(pts, plotter.XY{X: micros(sorted[len(sorted)-1]), Y: 1})
	for i := range pts {
		// The log axis needs positive values.
		pts[i].X = math.Max(pts[i].X, 1)
	}
	return pts
}

func latencyPlot(res *results, n int, path string) error {
	title := fmt.Sprintf("Event latency, %d stream%s (%.0f events/s in total)", n, plural(n), res.cfg.eventRate)
	return cdfPlot(res, title, "latency (µs, log scale)", "fraction of events", res.cfg.targets, func(t string) []int64 {
		if l := res.latencyFor(t, n); l != nil {
			return l.samples
		}
		return nil
	}, path)
}

// cdfPlot draws one CDF line per target, of the sorted samples (ns) that
// samplesFor gives, on a log axis.
func cdfPlot(res *results, title, xLabel, yLabel string, targets []string, samplesFor func(target string) []int64, path string) error {
	p := plot.New()
	p.Title.Text = title
	p.X.Label.Text = xLabel
	p.Y.Label.Text = yLabel
	p.X.Scale = plot.LogScale{}
	p.X.Tick.Marker = plot.LogTicks{Prec: -1}
	p.Y.Min, p.Y.Max = 0, 1
	p.Legend.Left = true
	p.Legend.Top = true
	p.Add(plotter.NewGrid())
	for _, t := range targets {
		samples := samplesFor(t)
		if len(samples) == 0 {
			continue
		}
		line, err := plotter.NewLine(cdfPoints(samples))
		if err != nil {
			return err
		}
		i := targetStyle(res.cfg.targets, t)
		line.Color = plotutil.Color(i)
		line.Width = vg.Points(1.5)
		line.Dashes = plotutil.Dashes(i)
		p.Add(line)
		p.Legend.Add(t, line)
	}
	return p.Save(18*vg.Centimeter, 11*vg.Centimeter, path)
}

func memoryPlot(res *results, path string) error {
	p := plot.New()
	p.Title.Text = "Resident memory per idle stream (gateway process)"
	p.X.Label.Text = "streams held"
	p.Y.Label.Text = "RSS per stream (KiB)"
	p.Y.Min = 0
	p.Legend.Top = true
	p.Add(plotter.NewGrid())
	highest := 1.0
	for _, t := range res.cfg.targets {
		var pts plotter.XYs
		for _, s := range res.scale {
			if s.target == t && s.opened > 0 {
				pts = append(pts, plotter.XY{X: float64(s.opened), Y: kib(s.perStreamRSS())})
				highest = math.Max(highest, kib(s.perStreamRSS()))
			}
		}
		if len(pts) == 0 {
			continue
		}
		if err := addLinePoints(p, res, t, t, pts, false); err != nil {
			return err
		}
	}
	// Room above the lines for the legend.
	p.Y.Max = highest * 1.4
	return p.Save(18*vg.Centimeter, 11*vg.Centimeter, path)
}

func cpuPlot(res *results, path string) error {
	p := plot.New()
	p.Title.Text = fmt.Sprintf("Gateway CPU with idle streams (%s heartbeats on caddy+sse)", res.cfg.heartbeat)
	p.X.Label.Text = "streams held (dashed: projected from a linear fit)"
	p.Y.Label.Text = "CPU (% of one core)"
	p.Y.Min = 0
	p.Legend.Top = true
	p.Legend.Left = true
	p.Add(plotter.NewGrid())
	for _, t := range res.cfg.targets {
		var pts plotter.XYs
		for _, s := range res.scale {
			if s.target == t && s.opened > 0 {
				pts = append(pts, plotter.XY{X: float64(s.opened), Y: s.cpu})
			}
		}
		if len(pts) == 0 {
			continue
		}
		if err := addLinePoints(p, res, t, t+" (measured)", pts, false); err != nil {
			return err
		}
		_, cf, _ := res.scaleFit(t)
		last := pts[len(pts)-1]
		proj := plotter.XYs{last, {X: projectedStreams, Y: math.Max(cf.at(projectedStreams), 0)}}
		if err := addLinePoints(p, res, t, t+" (projected)", proj, true); err != nil {
			return err
		}
	}
	// An all-idle plot would otherwise have no height.
	p.Y.Max = math.Max(p.Y.Max, 1)
	return p.Save(18*vg.Centimeter, 11*vg.Centimeter, path)
}

// addLinePoints adds one target's series in its colour; dashed for
// projections.
func addLinePoints(p *plot.Plot, res *results, target, label string, pts plotter.XYs, dashed bool) error {
	line, points, err := plotter.NewLinePoints(pts)
	if err != nil {
		return err
	}
	i := targetStyle(res.cfg.targets, target)
	line.Color = plotutil.Color(i)
	line.Width = vg.Points(1.5)
	points.Color = plotutil.Color(i)
	points.Shape = plotutil.Shape(i)
	if dashed {
		line.Dashes = []vg.Length{vg.Points(5), vg.Points(4)}
		p.Add(line)
		p.Legend.Add(label, line)
		return nil
	}
	p.Add(line, points)
	p.Legend.Add(label, line, points)
	return nil
}
