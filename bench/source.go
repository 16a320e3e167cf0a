//go:build linux

package main

import (
	"debug/buildinfo"
	"fmt"
	"os/exec"
	"strings"
)

// source says what code a run measured: the commit of the repository Caddy
// was built from, and which of its files differed from that commit.
type source struct {
	commit string // full hash of HEAD; empty when git could not tell
	err    string // why commit is empty
	// module lists the uncommitted changes (modified, added, deleted or
	// untracked files) in the files the Caddy build compiles from: the whole
	// repository except bench/ (the harness, its own module) and docs/ (what
	// the harness writes). harness lists those under bench/.
	module, harness []string

	// binary is set when Caddy was not built by this run but given with
	// -caddy; its own build info then says what it was built from.
	binary         string
	binRevision    string
	binModified    bool
	binRevisionErr string
}

// describeSource reads the commit and the uncommitted changes of the
// repository at root and, when caddyBin was given rather than built, the VCS
// stamp Go's build left in that binary.
func describeSource(root, givenBin string) source {
	var s source
	git := func(args ...string) (string, error) {
		out, err := exec.Command("git", append([]string{"-C", root}, args...)...).Output()
		if ee, ok := err.(*exec.ExitError); ok {
			return "", fmt.Errorf("git %s: %v: %s", args[0], err, strings.TrimSpace(string(ee.Stderr)))
		}
		return string(out), err
	}
	if out, err := git("rev-parse", "HEAD"); err != nil {
		s.err = err.Error()
	} else {
		s.commit = strings.TrimSpace(out)
	}
	prefix := ""
	if out, err := git("rev-parse", "--show-prefix"); err == nil {
		prefix = strings.TrimSpace(out)
	}
	if out, err := git("status", "--porcelain=v1", "--untracked-files=all", "--", "."); err != nil {
		if s.err == "" {
			s.err = err.Error()
		}
	} else {
		for _, line := range strings.Split(out, "\n") {
			if len(line) < 4 {
				continue
			}
			path := line[3:]
			if _, to, ok := strings.Cut(path, " -> "); ok {
				path = to
			}
			path = strings.TrimPrefix(strings.Trim(path, `"`), prefix)
			switch {
			case strings.HasPrefix(path, "docs/"):
			case strings.HasPrefix(path, "bench/"):
				s.harness = append(s.harness, path)
			default:
				s.module = append(s.module, path)
			}
		}
	}
	if givenBin != "" {
		s.binary = givenBin
		info, err := buildinfo.ReadFile(givenBin)
		if err != nil {
			s.binRevisionErr = err.Error()
			return s
		}
		for _, kv := range info.Settings {
			switch kv.Key {
			case "vcs.revision":
				s.binRevision = kv.Value
			case "vcs.modified":
				s.binModified = kv.Value == "true"
			}
		}
	}
	return s
}

// changes describes a list of uncommitted changes for the report.
func changes(paths []string) string {
	if len(paths) == 0 {
		return "no uncommitted changes"
	}
	const shown = 8
	quoted := make([]string, 0, shown)
	for i, p := range paths {
		if i == shown {
			break
		}
		quoted = append(quoted, "`"+p+"`")
	}
	s := fmt.Sprintf("+ uncommitted changes to %d file%s: %s", len(paths), plural(len(paths)), strings.Join(quoted, ", "))
	if len(paths) > shown {
		s += fmt.Sprintf(" and %d more", len(paths)-shown)
	}
	return s
}

// short is a commit hash cut to 12 characters.
func short(commit string) string {
	if len(commit) > 12 {
		return commit[:12]
	}
	return commit
}

// describe is the report's sentence on what code was measured.
func (s source) describe() string {
	var b strings.Builder
	switch {
	case s.binary != "" && s.binRevision != "":
		state := "from a clean tree"
		if s.binModified {
			state = "+ uncommitted changes (which, its build info does not say)"
		}
		fmt.Fprintf(&b, "Caddy was the binary given with `-caddy`, built (by its own build info) from commit `%s` %s.", short(s.binRevision), state)
	case s.binary != "":
		fmt.Fprintf(&b, "Caddy was the binary given with `-caddy`, whose build info names no commit; the code it was built from is unknown.")
	case s.commit != "":
		fmt.Fprintf(&b, "Caddy was built from commit `%s` of this repository, %s in the module's files.", short(s.commit), changes(s.module))
	default:
		fmt.Fprintf(&b, "Caddy was built from a tree whose commit could not be read (%s).", s.err)
	}
	if s.commit != "" {
		fmt.Fprintf(&b, " The harness (`bench/`) was at commit `%s`, %s.", short(s.commit), changes(s.harness))
	}
	return b.String()
}
