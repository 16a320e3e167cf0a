package caddysse

import (
	"reflect"
	"testing"

	"github.com/ssegateway/caddy-sse/internal/ssespec"
)

// FuzzEventState checks the event-boundary tracking against the independent
// ssespec parser: for any upstream bytes, cut into writes anywhere, and a
// heartbeat comment (or a close sequence) injected wherever the tracker says
// the stream is at a boundary, the client must read exactly the upstream's
// events, and the tracker must agree with the client on the event count and
// the last event id.
//
// cuts drives where writes end and where injections are tried: bit i of the
// byte cuts[i%len(cuts)] set means a write ends after byte i.
func FuzzEventState(f *testing.F) {
	for _, tc := range contractCases {
		f.Add([]byte(tc.body), []byte{0x55})
	}
	f.Add([]byte("\xEF\xBB\xBF\r\n:\rdata\r\r\n\nid: \x00\n\n"), []byte{0xff})
	f.Fuzz(func(t *testing.T, body, cuts []byte) {
		if len(cuts) == 0 {
			cuts = []byte{0}
		}
		var out []byte
		st := newEventState()
		inject := func() {
			if st.atBoundary() {
				out = append(out, ":hb\n\n"...)
				st.wroteAtBoundary()
			}
		}
		inject() // before the first byte: a BOM that follows must be dropped
		start := 0
		for i := range body {
			if cuts[i%len(cuts)]&(1<<(i%8)) == 0 && i != len(body)-1 {
				continue
			}
			prefix, rest := st.takeBOM(body[start:i+1], len(out) > 0)
			st.scan(rest, false)
			out = append(append(out, prefix...), rest...)
			start = i + 1
			inject()
		}
		// Bytes still held back as a possible BOM end the stream as data.
		if st.bomMatched > 0 && st.bomMatched < bomDone {
			out = append(out, utf8BOM[:st.bomMatched]...)
		}

		want, got := ssespec.Parse(body), ssespec.Parse(out)
		if !reflect.DeepEqual(got, want) {
			t.Fatalf("client reads %+v from %q, want %+v from upstream %q", got, out, want, body)
		}
		if int(st.events) != len(want.Events) {
			t.Fatalf("tracker counted %d events, client dispatched %d", st.events, len(want.Events))
		}
		// The tracker keeps the id's raw bytes; the client decodes them.
		tracked := ssespec.Parse(append(append([]byte("id: "), st.lastEventID...), "\n\n"...)).LastEventID
		if st.lastEventIDKnown && tracked != want.LastEventID {
			t.Fatalf("tracker's last event id %q, client's %q", st.lastEventID, want.LastEventID)
		}
	})
}
