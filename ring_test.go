package caddysse

import (
	"fmt"
	"math/rand/v2"
	"strings"
	"testing"
)

// ringEv is one event given to a ring in a test: its bytes and its id
// field, if it has one (WHATWG HTML: an event without `id:` leaves the
// client's last event ID as it was).
type ringEv struct {
	data  string
	id    string
	hasID bool
}

func withID(id string) ringEv {
	return ringEv{data: "id: " + id + "\ndata: x\n\n", id: id, hasID: true}
}
func noID() ringEv { return ringEv{data: "data: x\n\n"} }

// ringAdd appends ev as the hub does: an event without an id field leaves
// the last event ID as the ring has it.
func ringAdd(rg *ring, ev ringEv) {
	id := ev.id
	if !ev.hasID {
		id = rg.lastID
	}
	rg.add([]byte(ev.data), id, ev.hasID)
}

// checkRing checks what every ring must hold: its counters agree with its
// events, and no resume entry points before the oldest kept event (an entry
// goes with the event it points at).
func checkRing(t *testing.T, rg *ring) {
	t.Helper()
	if got := uint64(len(rg.events)); rg.next-rg.first != got {
		t.Fatalf("first %d, next %d, but %d events", rg.first, rg.next, got)
	}
	var kept int64
	for i, ev := range rg.events {
		kept += int64(len(ev.data))
		if i > 0 && ev.start != rg.events[i-1].start+int64(len(rg.events[i-1].data)) {
			t.Fatalf("event %d starts at %d, after an event ending at %d", rg.first+uint64(i), ev.start, rg.events[i-1].start+int64(len(rg.events[i-1].data)))
		}
	}
	if kept != rg.kept {
		t.Fatalf("kept %d bytes, events hold %d", rg.kept, kept)
	}
	if len(rg.events) > 0 {
		last := rg.events[len(rg.events)-1]
		if last.start+int64(len(last.data)) != rg.total || rg.newestStart() != last.start {
			t.Fatalf("total %d, newest starts at %d (newestStart %d) and is %d bytes", rg.total, last.start, rg.newestStart(), len(last.data))
		}
	} else if rg.newestStart() != rg.total {
		t.Fatalf("empty ring: newestStart %d, total %d", rg.newestStart(), rg.total)
	}
	if _, ok := rg.resume[""]; ok {
		t.Fatalf("a resume entry for the empty id: %v", rg.resume)
	}
	for id, seq := range rg.resume {
		if seq < rg.first {
			t.Fatalf("resume entry %q points at event %d, trimmed (first kept %d): entries must go with their events; resume %v", id, seq, rg.first, rg.resume)
		}
		if seq > rg.next {
			t.Fatalf("resume entry %q points at event %d, beyond the next (%d)", id, seq, rg.next)
		}
	}
}

func TestRingLastEventID(t *testing.T) {
	const miss = -1
	long := unknownID // an id too long to keep
	for _, tc := range []struct {
		name  string
		start string // startFrom, if set
		evs   []ringEv
		// lastIDs is each event's last event ID, as a client holds it.
		lastIDs []string
		// want is where a client with each Last-Event-ID resumes (miss:
		// not among the kept events).
		want map[string]int
	}{
		{
			name:    "an event without id keeps the previous; resume from the first that gave it",
			evs:     []ringEv{withID("1"), noID(), noID(), withID("2")},
			lastIDs: []string{"1", "1", "1", "2"},
			want:    map[string]int{"1": 1, "2": 4, "3": miss},
		},
		{
			name:    "an empty id resets: no resume entry for it",
			evs:     []ringEv{withID("1"), withID(""), noID(), withID("2")},
			lastIDs: []string{"1", "", "", "2"},
			want:    map[string]int{"1": 1, "": miss, "2": 4},
		},
		{
			name:    "the same id several times in a row: resume from the first of them, sending again rather than losing",
			evs:     []ringEv{withID("1"), withID("1"), withID("1"), withID("2")},
			lastIDs: []string{"1", "1", "1", "2"},
			want:    map[string]int{"1": 1, "2": 4},
		},
		{
			name:    "a later run of the same id wins",
			evs:     []ringEv{withID("1"), withID("2"), withID("1"), noID(), withID("3")},
			lastIDs: []string{"1", "2", "1", "1", "3"},
			want:    map[string]int{"1": 3, "2": 2, "3": 5},
		},
		{
			name:    "a later run after a reset wins",
			evs:     []ringEv{withID("1"), withID(""), withID("1")},
			lastIDs: []string{"1", "", "1"},
			want:    map[string]int{"1": 3, "": miss},
		},
		{
			name:    "an id the gateway did not keep is never a resume point",
			evs:     []ringEv{withID("1"), withID(long), noID(), withID("2")},
			lastIDs: []string{"1", long, long, "2"},
			want:    map[string]int{"1": 1, long: miss, "2": 4},
		},
		{
			name:    "startFrom: a client holding the id the upstream was asked from resumes from the first event",
			start:   "5",
			evs:     []ringEv{noID(), withID("6")},
			lastIDs: []string{"5", "6"},
			want:    map[string]int{"5": 0, "6": 2},
		},
		{
			name:    "startFrom: the upstream sending that id again is the same run",
			start:   "5",
			evs:     []ringEv{withID("5"), withID("6")},
			lastIDs: []string{"5", "6"},
			want:    map[string]int{"5": 0, "6": 2},
		},
		{
			name:  "nothing yet",
			start: "5",
			want:  map[string]int{"5": 0, "4": miss},
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			rg := newRing()
			if tc.start != "" {
				rg.startFrom(tc.start)
			}
			for _, ev := range tc.evs {
				ringAdd(rg, ev)
				checkRing(t, rg)
			}
			for i, want := range tc.lastIDs {
				if got := rg.at(uint64(i)).lastID; got != want {
					t.Errorf("event %d: last event ID %q, want %q", i, got, want)
				}
			}
			for id, want := range tc.want {
				seq, ok := rg.after(id)
				switch {
				case want == miss && ok:
					t.Errorf("Last-Event-ID %q resumes from %d, want a miss", id, seq)
				case want != miss && (!ok || seq != uint64(want)):
					t.Errorf("Last-Event-ID %q resumes from %d (found %v), want %d", id, seq, ok, want)
				}
				if ok && seq < rg.next && rg.startOf(seq) != rg.at(seq).start {
					t.Errorf("startOf(%d) %d, want %d", seq, rg.startOf(seq), rg.at(seq).start)
				}
			}
			if _, ok := rg.resume[""]; ok {
				t.Errorf("resume has an entry for the empty id: %v", rg.resume)
			}
		})
	}
}

func TestRingTrim(t *testing.T) {
	const n = 10
	size := func(i int) int { return 20 }
	for _, tc := range []struct {
		name      string
		keep      int
		maxEvents int
		maxBytes  int64
		needed    int             // the oldest event a client still needs; n: nobody
		size      func(i int) int // bytes of event i; 20 by default
		wantFirst uint64          // the oldest event kept
	}{
		{name: "keeps the last keep events", keep: 3, maxEvents: 100, maxBytes: 1 << 20, needed: n, wantFirst: 7},
		{name: "keep 0 and nobody needing it: even the newest goes", keep: 0, maxEvents: 100, maxBytes: 1 << 20, needed: n, wantFirst: 10},
		{name: "keep 0 but a client needs the newest", keep: 0, maxEvents: 100, maxBytes: 1 << 20, needed: 9, wantFirst: 9},
		{name: "keeps what a client needs beyond keep", keep: 2, maxEvents: 100, maxBytes: 1 << 20, needed: 4, wantFirst: 4},
		{name: "keep beyond what there is", keep: 50, maxEvents: 100, maxBytes: 1 << 20, needed: n, wantFirst: 0},
		{name: "maxEvents bounds keep", keep: 50, maxEvents: 4, maxBytes: 1 << 20, needed: n, wantFirst: 6},
		{name: "maxEvents bounds what a client needs", keep: 0, maxEvents: 5, maxBytes: 1 << 20, needed: 0, wantFirst: 5},
		{name: "maxBytes bounds keep, the newest aside", keep: 50, maxEvents: 100, maxBytes: 50, needed: n, wantFirst: 7},
		{name: "maxBytes bounds what a client needs", keep: 0, maxEvents: 100, maxBytes: 50, needed: 0, wantFirst: 7},
		{name: "maxBytes exactly", keep: 50, maxEvents: 100, maxBytes: 60, needed: n, wantFirst: 6},
		{
			name: "a newest event larger than maxBytes is kept, with the older ones within maxBytes",
			keep: 50, maxEvents: 100, maxBytes: 50, needed: n, wantFirst: 7,
			size: func(i int) int {
				if i == n-1 {
					return 200
				}
				return 20
			},
		},
		{
			name: "one event larger than maxBytes in the middle goes once it is not the newest",
			keep: 50, maxEvents: 100, maxBytes: 50, needed: n, wantFirst: 8,
			size: func(i int) int {
				if i == 7 {
					return 200
				}
				return 20
			},
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			sz := size
			if tc.size != nil {
				sz = tc.size
			}
			rg := newRing()
			for i := 0; i < n; i++ {
				data := fmt.Sprintf("id: %d\ndata: ", i)
				data += strings.Repeat("x", sz(i)-len(data)-2) + "\n\n"
				ringAdd(rg, ringEv{data: data, id: fmt.Sprint(i), hasID: true})
				rg.trim(tc.keep, tc.maxEvents, tc.maxBytes, min(uint64(tc.needed), rg.next))
				checkRing(t, rg)
				if len(rg.events) > max(tc.maxEvents, 1) {
					t.Fatalf("after event %d: %d events kept, over maxEvents %d", i, len(rg.events), tc.maxEvents)
				}
				if len(rg.events) > 1 && rg.kept-int64(len(rg.events[len(rg.events)-1].data)) > tc.maxBytes {
					t.Fatalf("after event %d: %d bytes kept besides the newest, over maxBytes %d", i, rg.kept-int64(len(rg.events[len(rg.events)-1].data)), tc.maxBytes)
				}
			}
			if rg.first != tc.wantFirst || rg.next != n {
				t.Fatalf("kept events %d to %d, want %d to %d", rg.first, rg.next, tc.wantFirst, n)
			}
			for seq := rg.first; seq < rg.next; seq++ {
				if got := rg.at(seq).lastID; got != fmt.Sprint(seq) {
					t.Errorf("event %d has last event ID %q", seq, got)
				}
			}
			// Resume points: the ids of kept events, and that of the
			// newest trimmed one (its client resumes from the oldest kept).
			for i := 0; i < n; i++ {
				seq, ok := rg.after(fmt.Sprint(i))
				if wantOK := uint64(i)+1 >= rg.first; ok != wantOK || ok && seq != uint64(i)+1 {
					t.Errorf("after(%d) = %d, %v; kept %d to %d", i, seq, ok, rg.first, rg.next)
				}
			}
		})
	}
}

// TestRingResumeEntriesGoWithTheirEvents checks that a resume entry is
// deleted once the event it points at is trimmed, whatever made it: an id
// of the upstream's, one repeated, one given by the request the upstream
// was first asked with (startFrom).
func TestRingResumeEntriesGoWithTheirEvents(t *testing.T) {
	for _, tc := range []struct {
		name  string
		start string
		evs   []ringEv
		keep  int
	}{
		{name: "distinct ids", evs: []ringEv{withID("1"), withID("2"), withID("3"), withID("4"), withID("5")}, keep: 2},
		{name: "runs without ids", evs: []ringEv{withID("1"), noID(), noID(), withID("2"), noID(), withID("3"), noID()}, keep: 2},
		{name: "a repeated id", evs: []ringEv{withID("1"), withID("2"), withID("1"), withID("3"), withID("1"), withID("4"), withID("5")}, keep: 1},
		{name: "resets", evs: []ringEv{withID("1"), withID(""), noID(), withID("1"), withID(""), withID("2"), noID()}, keep: 1},
		{name: "keep 0", evs: []ringEv{withID("1"), noID(), withID("2"), withID("3")}, keep: 0},
		{name: "startFrom", start: "0", evs: []ringEv{withID("1"), withID("2"), withID("3"), withID("4")}, keep: 1},
		{name: "startFrom, then events without ids", start: "0", evs: []ringEv{noID(), noID(), withID("1"), withID("2"), withID("3")}, keep: 1},
	} {
		t.Run(tc.name, func(t *testing.T) {
			rg := newRing()
			if tc.start != "" {
				rg.startFrom(tc.start)
			}
			for i, ev := range tc.evs {
				ringAdd(rg, ev)
				rg.trim(tc.keep, ringMaxEvents, 1<<20, rg.next)
				checkRing(t, rg)
				if t.Failed() {
					t.Fatalf("after event %d", i)
				}
			}
			// Every entry left is where a client holding that id resumes.
			for id := range rg.resume {
				if _, ok := rg.after(id); !ok {
					t.Errorf("resume entry %q is left but names no kept event: %v (kept %d to %d)", id, rg.resume, rg.first, rg.next)
				}
			}
		})
	}
}

// TestRingResumeDoesNotGrow appends a long stream with many distinct ids,
// keeping 10: the resume map must stay within the kept events, not grow
// with the stream.
func TestRingResumeDoesNotGrow(t *testing.T) {
	const keep, events = 10, 100_000
	for _, tc := range []struct {
		name string
		ev   func(i int, r *rand.Rand) ringEv
	}{
		{name: "distinct ids", ev: func(i int, _ *rand.Rand) ringEv { return withID(fmt.Sprint(i)) }},
		{name: "distinct ids, repeats, resets and events without ids", ev: func(i int, r *rand.Rand) ringEv {
			switch r.IntN(5) {
			case 0:
				return noID()
			case 1:
				return withID("")
			case 2:
				return withID(fmt.Sprint(r.IntN(20))) // an id seen before, maybe in a row
			}
			return withID(fmt.Sprint(i))
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := rand.New(rand.NewPCG(1, 2))
			rg := newRing()
			rg.startFrom("start")
			peak := 0
			for i := 0; i < events; i++ {
				ringAdd(rg, tc.ev(i, r))
				rg.trim(keep, max(keep, ringMaxEvents), 1<<20, rg.next)
				if len(rg.events) > keep {
					t.Fatalf("after event %d: %d events kept, want %d", i, len(rg.events), keep)
				}
				peak = max(peak, len(rg.resume))
				if len(rg.resume) > keep+2 {
					t.Fatalf("after event %d: %d resume entries for %d kept events: the map grows with the stream", i, len(rg.resume), len(rg.events))
				}
			}
			t.Logf("at most %d resume entries", peak)
		})
	}
}

func TestRingFindAndReplays(t *testing.T) {
	rg := newRing()
	own := "id: 1\ndata: one\n\n"
	gateway := "id: 3f9c0a12b4e1-1\ndata: two\n\n" // an id of the gateway's: not the upstream's
	none := "data: three\n\n"
	rg.add([]byte(own), "1", true)
	rg.add([]byte(gateway), "3f9c0a12b4e1-1", false)
	rg.add([]byte(none), "3f9c0a12b4e1-1", false)
	rg.add([]byte(own), "1", true) // the same bytes again, later
	rg.add([]byte("id: 2\ndata: four\n\n"), "2", true)

	for _, tc := range []struct {
		data    string
		wantSeq uint64
		wantOK  bool
	}{
		{own, 3, true}, // the newest of two
		{"id: 2\ndata: four\n\n", 4, true},
		{gateway, 0, false},                // no id of the upstream's
		{none, 0, false},                   // no id at all
		{"id: 1\ndata: One\n\n", 0, false}, // the bytes differ
		{"id: 1\ndata: one\n", 0, false},   // a prefix
		{"id: 1\r\ndata: one\r\n\r\n", 0, false},
		{"", 0, false},
	} {
		seq, ok := rg.find([]byte(tc.data))
		if ok != tc.wantOK || ok && seq != tc.wantSeq {
			t.Errorf("find(%q) = %d, %v; want %d, %v", tc.data, seq, ok, tc.wantSeq, tc.wantOK)
		}
	}
	for _, tc := range []struct {
		seq  uint64
		data string
		want bool
	}{
		{0, own, true},
		{3, own, true},
		{4, "id: 2\ndata: four\n\n", true},
		{0, "id: 1\ndata: uno\n\n", false},
		{1, gateway, false}, // byte for byte, but not the upstream's id
		{2, none, false},
		{4, own, false},
		{5, own, false}, // not appended yet
		{1000, own, false},
	} {
		if got := rg.replays(tc.seq, []byte(tc.data)); got != tc.want {
			t.Errorf("replays(%d, %q) = %v, want %v", tc.seq, tc.data, got, tc.want)
		}
	}
	// Trimmed events are neither found nor replayed.
	rg.trim(2, ringMaxEvents, 1<<20, rg.next)
	if seq, ok := rg.find([]byte(own)); !ok || seq != 3 {
		t.Errorf("after trim, find(own) = %d, %v; want 3, true", seq, ok)
	}
	rg.trim(1, ringMaxEvents, 1<<20, rg.next)
	if seq, ok := rg.find([]byte(own)); ok {
		t.Errorf("after trim, find(own) = %d, want none", seq)
	}
	if rg.replays(0, []byte(own)) || rg.replays(3, []byte(own)) {
		t.Error("a trimmed event is replayed")
	}
}
