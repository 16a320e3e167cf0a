package caddysse

import (
	"strings"
	"testing"
)

func feed(s *eventState, chunks ...string) {
	for _, c := range chunks {
		_, rest := s.takeBOM([]byte(c), true)
		s.scan(rest, false)
	}
}

func TestEventStateBoundaries(t *testing.T) {
	for _, tc := range []struct {
		stream   string
		boundary bool
	}{
		{"", true},
		{"data: a", false},
		{"data: a\n", false},
		{"data: a\n\n", true},
		{"data: a\r", false},
		{"data: a\r\r", true},
		{"data: a\r\n\r", true}, // an LF may still follow: it would be an empty line at a boundary
		{": comment\n", true},
		{": comment", false},
		{"retry: 10\n", false}, // a field line makes an event pending, even without data
		{"retry: 10\n\n", true},
	} {
		s := newEventState()
		feed(&s, tc.stream)
		if got := s.atBoundary(); got != tc.boundary {
			t.Errorf("after %q: atBoundary() = %v, want %v", tc.stream, got, tc.boundary)
		}
	}
}

func TestEventStateScanStopsAtBoundary(t *testing.T) {
	s := newEventState()
	feed(&s, "data: a")
	p := []byte("\n\ndata: b\n\n")
	if n := s.scan(p, true); n != 2 || !s.atBoundary() {
		t.Fatalf("scan stopped after %d bytes (boundary %v), want 2 and at a boundary", n, s.atBoundary())
	}
}

func TestEventStateLastID(t *testing.T) {
	s := newEventState()
	feed(&s, "id: 1\ndata: a\n\n", "id: 2\ndata: b\n")
	if id, known := s.lastID(); string(id) != "1" || !known {
		t.Fatalf("last id %q (%v) before the second event is dispatched, want 1", id, known)
	}
	feed(&s, "\n")
	if id, _ := s.lastID(); string(id) != "2" {
		t.Fatalf("last id %q, want 2", id)
	}
	// An id too long to keep makes the last id unknown, until a short one.
	feed(&s, "id: "+strings.Repeat("x", maxEventIDLen+1)+"\ndata: c\n\n")
	if _, known := s.lastID(); known {
		t.Fatal("an over-long id is reported as known")
	}
	feed(&s, "id:3\n\n")
	if id, known := s.lastID(); string(id) != "3" || !known {
		t.Fatalf("last id %q (%v), want 3", id, known)
	}
	// An id with NUL is ignored; an empty id resets it.
	feed(&s, "id: 4\x00\ndata: d\n\n")
	if id, _ := s.lastID(); string(id) != "3" {
		t.Fatalf("an id with NUL replaced the last id: %q", id)
	}
	feed(&s, "id\n\n")
	if id, known := s.lastID(); len(id) != 0 || !known {
		t.Fatalf("an empty id left %q", id)
	}
	if s.events != 4 {
		t.Fatalf("counted %d events, want 4", s.events)
	}
}

func TestEventStateBOM(t *testing.T) {
	bom := "\xEF\xBB\xBF"
	for _, tc := range []struct {
		name          string
		chunks        []string
		clientStarted bool
		want          string
	}{
		{"passes through at the very start", []string{bom + "data: a\n\n"}, false, bom + "data: a\n\n"},
		{"split, passes through", []string{"\xEF", "\xBB", "\xBFdata: a\n\n"}, false, bom + "data: a\n\n"},
		{"dropped after gateway bytes", []string{bom + "data: a\n\n"}, true, "data: a\n\n"},
		{"split, dropped after gateway bytes", []string{"\xEF\xBB", "\xBFdata: a\n\n"}, true, "data: a\n\n"},
		{"held bytes that were no BOM", []string{"\xEF\xBB", "Xdata: a\n\n"}, true, "\xEF\xBBXdata: a\n\n"},
		{"only at the start", []string{"data: a\n\n" + bom}, false, "data: a\n\n" + bom},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := newEventState()
			var out strings.Builder
			for _, c := range tc.chunks {
				prefix, rest := s.takeBOM([]byte(c), tc.clientStarted)
				s.scan(rest, false)
				out.Write(prefix)
				out.Write(rest)
			}
			if out.String() != tc.want {
				t.Fatalf("forwarded %q, want %q", out.String(), tc.want)
			}
		})
	}
}
