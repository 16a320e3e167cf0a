//go:build linux

package main

import (
	"bufio"
	"fmt"
	"os"
	"os/exec"
	"runtime"
	"strconv"
	"strings"
	"time"
)

// machine describes where and when the figures were measured.
type machine struct {
	date         time.Time
	cpuModel     string
	cpus         int
	memTotal     string
	kernel       string
	goVersion    string
	caddyVersion string
	nginxVersion string
	loadBefore   string
	loadAfter    string
	duration     time.Duration
	note         string
	source       source
	// openFiles is the open-files limit every target ran with, maxStreams
	// the most proxied streams one process can hold under it.
	openFiles  uint64
	maxStreams int
}

func describeMachine(l *launcher) machine {
	m := machine{date: time.Now().UTC(), goVersion: runtime.Version(), loadBefore: loadAverage()}
	if f, err := os.Open("/proc/cpuinfo"); err == nil {
		sc := bufio.NewScanner(f)
		for sc.Scan() {
			key, value, ok := strings.Cut(sc.Text(), ":")
			if !ok {
				continue
			}
			switch strings.TrimSpace(key) {
			case "processor":
				m.cpus++
			case "model name":
				m.cpuModel = strings.TrimSpace(value)
			}
		}
		f.Close()
	}
	if f, err := os.Open("/proc/meminfo"); err == nil {
		sc := bufio.NewScanner(f)
		for sc.Scan() {
			if rest, ok := strings.CutPrefix(sc.Text(), "MemTotal:"); ok {
				kb, _ := strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(rest), " kB"), 10, 64)
				m.memTotal = fmt.Sprintf("%.0f GiB", float64(kb)/(1<<20))
				break
			}
		}
		f.Close()
	}
	if data, err := os.ReadFile("/proc/sys/kernel/osrelease"); err == nil {
		m.kernel = strings.TrimSpace(string(data))
	}
	if l.caddyBin != "" {
		if outp, err := exec.Command(l.caddyBin, "version").Output(); err == nil {
			m.caddyVersion = strings.Fields(string(outp) + " ?")[0]
		}
	}
	if l.nginxBin != "" {
		if outp, err := exec.Command(l.nginxBin, "-v").CombinedOutput(); err == nil {
			m.nginxVersion = strings.TrimPrefix(strings.TrimSpace(string(outp)), "nginx version: nginx/")
		}
	}
	return m
}

// loadAverage is the 1, 5 and 15 minute load average.
func loadAverage() string {
	data, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return "?"
	}
	f := strings.Fields(string(data))
	if len(f) < 3 {
		return "?"
	}
	return strings.Join(f[:3], " ")
}
