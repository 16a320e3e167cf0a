package caddysse

import (
	"sync"

	"go.uber.org/zap"
)

// Legacy SSE servers have habits that break clients in ways nobody sees
// until production. The gateway absorbs those it can and reports each
// once per route (sse handler), as a warning that names the fix, with a
// metric counting every stream that shows it.

// quirk is one such habit.
type quirk string

const (
	// quirkContentTypeParams: "text/event-stream;charset=UTF-8" (Spring,
	// among others). Strict clients want the bare media type; the gateway
	// sends that.
	quirkContentTypeParams quirk = "content_type_params"
	// quirkContentLength: a length on an endless stream. The gateway
	// drops it.
	quirkContentLength quirk = "content_length"
	// quirkIDControlChars: an id with control characters. A browser keeps
	// it and sends it back as Last-Event-ID, which the server then refuses
	// with 400, failing the EventSource for good. The gateway cannot fix
	// the ids without breaking the upstream's own resume.
	quirkIDControlChars quirk = "id_control_chars"
	// quirkBuffered: events arrive in bursts of several kilobytes, the
	// mark of output buffering inside the upstream. The gateway cannot
	// unbuffer it.
	quirkBuffered quirk = "buffered"
	// quirkPerUserResponse: a shared stream's first response is marked as
	// one user's (Set-Cookie, Cache-Control: private, Vary on a header
	// the key leaves out). It is not shared: its starter gets it alone,
	// and every other client an upstream request of its own.
	quirkPerUserResponse quirk = "per_user_response"
)

var allQuirks = []quirk{quirkContentTypeParams, quirkContentLength, quirkIDControlChars, quirkBuffered, quirkPerUserResponse}

// quirkFixes is what each warning tells the operator.
var quirkFixes = map[quirk]string{
	quirkContentTypeParams: "upstream sends parameters in its event stream's Content-Type; the gateway sends text/event-stream alone, but strict clients talking to the upstream directly reject it: send the bare media type",
	quirkContentLength:     "upstream sends Content-Length on an event stream; the gateway drops it, but a length on an endless stream makes other proxies wait for a body that never completes: do not set one",
	quirkIDControlChars:    "upstream sends event ids with control characters; browsers send them back in Last-Event-ID, which servers refuse with 400, so the EventSource fails for good: keep ids to printable characters",
	quirkPerUserResponse:   "upstream marks a shared stream's response as one user's (Set-Cookie, Cache-Control: private, or Vary on a header the share key leaves out), so it is not shared: every client gets an upstream request of its own; share a per-user stream only with a key that names the user, or leave share off for it",
	quirkBuffered:          "upstream's events arrive in bursts of 4 KiB or more, as from output buffering inside the upstream (PHP output_buffering, a compression middleware, a framework that drops flushes); clients get them late: flush after every event (PHP: output_buffering = Off, or ob_flush() before flush())",
}

// quirkReports warns once per handler for each quirk.
type quirkReports struct {
	once map[quirk]*sync.Once
}

func newQuirkReports() *quirkReports {
	r := &quirkReports{once: make(map[quirk]*sync.Once, len(allQuirks))}
	for _, q := range allQuirks {
		r.once[q] = new(sync.Once)
	}
	return r
}

// report counts a stream that shows q and warns the first time.
func (h *Handler) reportQuirk(uri string, q quirk) {
	sseMetrics.quirks.WithLabelValues(string(q)).Inc()
	h.quirks.once[q].Do(func() {
		h.logger.Warn(quirkFixes[q], zap.String("quirk", string(q)), zap.String("uri", uri))
	})
}

// Buffering shows in the first writes that carry events: each carries
// several, and at least a buffer's worth of bytes.
const (
	burstBytes  = 4096
	burstEvents = 2
	burstWrites = 2 // consecutive burst writes, from the first, that make a report
)

// watchBurstsLocked looks at a write of n bytes that dispatched events, as
// long as the stream's first writes could still show buffering.
func (s *stream) watchBurstsLocked(n int, events int64) {
	if events == 0 {
		return
	}
	s.eventWrites++
	if n < burstBytes || events < burstEvents {
		s.eventWrites = burstWrites + 1 // not buffered: stop looking
		return
	}
	if s.eventWrites == burstWrites {
		s.h.reportQuirk(s.req.RequestURI, quirkBuffered)
	}
}
