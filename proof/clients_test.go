package proof

import (
	"fmt"
	"net/http"
	"reflect"
	"testing"
	"time"

	"github.com/ssegateway/caddy-sse/internal/ssespec"
)

// This file holds what the real-client tests (Chromium and Node's
// eventsource) share: the route, the upstream's script, and the events a
// client must see.

// Options of the real clients' route; the waits derive from them.
const (
	clientHeartbeat   = 100 * time.Millisecond
	clientMaxLifetime = 2 * time.Second
	clientRetry       = 700 * time.Millisecond
	clientCloseEvent  = "bye"
)

var clientProfile = profile{sse: fmt.Sprintf(
	"heartbeat %s\nmax_lifetime %s\nlifetime_jitter 0\nretry %s\nclose_event %s\nwrite_timeout 2s",
	clientHeartbeat, clientMaxLifetime, clientRetry, clientCloseEvent)}

// scriptFirst is what the upstream sends to a client that connects without
// Last-Event-ID: an upstream comment, four events with types, ids carried
// over, multi-line data and CRLF line endings; then it stays quiet (the
// gateway sends heartbeats) until the gateway closes the stream at
// max_lifetime.
const scriptFirst = ": upstream comment\n" +
	"id: 1\ndata: first\n\n" +
	"event: tick\nid: 2\ndata: second\n\n" +
	"data: line1\ndata: line2\n\n" +
	"id: 3\r\ndata: crlf\r\n\r\n"

// scriptEvents are the events scriptFirst gives, as the specification reads
// them, and the close event the gateway adds.
//
// With ownIDOnly, each event's LastEventID is instead the id field of its
// own block, or empty: Node's eventsource package reports lastEventId that
// way (`lastEventId: event.id || ""`), where the specification carries the
// last id over to events without one. The package still keeps the right
// id for Last-Event-ID, which the session checks at the upstream.
func scriptEvents(ownIDOnly bool) (events []ssespec.Event, closeEvent ssespec.Event) {
	events = ssespec.Parse([]byte(scriptFirst)).Events
	closeEvent = ssespec.Event{Type: clientCloseEvent, Data: "max_lifetime", LastEventID: "3"}
	if ownIDOnly {
		for i, id := range []string{"1", "2", "", "3"} {
			events[i].LastEventID = id
		}
		closeEvent.LastEventID = ""
	}
	return events, closeEvent
}

// scriptBehavior sends scriptFirst, or, to a client that sends
// Last-Event-ID, one event saying so, then stays open until the client or
// the gateway ends the stream.
func scriptBehavior(w http.ResponseWriter, r *http.Request, req *upstreamRequest) {
	if startEventStream(w, req) != nil {
		return
	}
	body := scriptFirst
	if last := r.Header.Get("Last-Event-ID"); last != "" {
		body = "id: 4\ndata: resumed after " + last + "\n\n"
	}
	if req.writeFlush(w, []byte(body)) != nil {
		return
	}
	<-r.Context().Done()
}

// clientEntry is one thing a real client reported: an open, an error, an
// event (message or tick), or the close event.
type clientEntry struct {
	// Source names the EventSource, where a client has several.
	Source string  `json:"source"`
	Kind   string  `json:"kind"` // open, error, event, close, closed
	Type   string  `json:"type"`
	Data   string  `json:"data"`
	ID     string  `json:"id"`
	Ready  int     `json:"ready"`
	T      float64 `json:"t"` // ms on the client's clock
}

// checkScriptedSession checks what a real client reported over a session:
// the script's events in order, nothing from heartbeats, the close event,
// an error (the end of the stream), a second open, the resumed event. It
// also checks what the upstream saw: the reconnect after the retry delay,
// with Last-Event-ID, and records the measured delays.
func checkScriptedSession(t *testing.T, rec *caseRecorder, g *gateway, up *upstream, key string, entries []clientEntry, ownIDOnly bool) {
	t.Helper()
	wantEvents, wantClose := scriptEvents(ownIDOnly)
	var events []ssespec.Event
	var closeEvent *ssespec.Event
	var errorAt, reopenAt float64
	opens := 0
	for _, e := range entries {
		switch e.Kind {
		case "open":
			opens++
			if opens == 2 {
				reopenAt = e.T
			}
		case "event":
			if opens == 1 {
				events = append(events, ssespec.Event{Type: e.Type, Data: e.Data, LastEventID: e.ID})
			}
		case "close":
			if closeEvent != nil {
				t.Errorf("a second close event: %+v", e)
			}
			closeEvent = &ssespec.Event{Type: e.Type, Data: e.Data, LastEventID: e.ID}
		case "error":
			if errorAt == 0 {
				errorAt = e.T
			}
		}
	}
	if !reflect.DeepEqual(events, wantEvents) {
		t.Errorf("the client got the events\n%+v\nwant exactly\n%+v", events, wantEvents)
	}
	if closeEvent == nil || *closeEvent != wantClose {
		t.Errorf("the close event listener got %+v, want %+v", closeEvent, wantClose)
	}

	first := up.request(t, key, 1, time.Second)
	second := up.request(t, key, 2, time.Second)
	if got := second.Header.Get("Last-Event-ID"); got != "3" {
		t.Errorf("the reconnect reached the upstream with Last-Event-ID %q, want 3", got)
	}
	if got := first.Header.Get("Last-Event-ID"); got != "" {
		t.Errorf("the first request carried Last-Event-ID %q", got)
	}
	gap := second.Started.Sub(first.endedAt)
	if gap < clientRetry-50*time.Millisecond || gap > clientRetry+slack {
		t.Errorf("the client reconnected %s after the gateway closed, want the retry delay %s", gap, clientRetry)
	}
	lived := first.endedAt.Sub(first.Started)

	// The gateway's log: the first stream ended at max_lifetime after
	// heartbeats, none of which became an event above.
	var heartbeats int64 = -1
	for _, e := range g.waitStreamEnds(t, 1, 2*time.Second) {
		if e.Reason == "max_lifetime" {
			heartbeats = e.Heartbeats
			if e.Events != int64(len(wantEvents)) {
				t.Errorf("the gateway logged %d events for the first stream, want %d", e.Events, len(wantEvents))
			}
		}
	}
	if heartbeats < 5 {
		t.Errorf("the gateway logged %d heartbeats on the first stream, want several (heartbeat %s over %s)", heartbeats, clientHeartbeat, clientMaxLifetime)
	}
	rec.figure("first stream closed at max_lifetime after %s with %d heartbeats, none seen as an event", ms(lived), heartbeats)
	rec.figure("reconnect %s after the close at the upstream (retry %s); client-side error→open %.0f ms", ms(gap), clientRetry, reopenAt-errorAt)
}
