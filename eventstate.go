package caddysse

import "bytes"

// eventState follows, byte by byte, where the client's event-stream parser
// stands after everything the gateway has forwarded: at an event boundary,
// inside a line, or between the lines of an unfinished event. It is the one
// place that knows the stream's shape; it also keeps the last event ID the
// client has seen dispatched, which is what the client will send back as
// Last-Event-ID when it reconnects.
//
// It never buffers events: its memory is a few flags plus the id field being
// read, which is capped at maxEventIDLen.
//
// The rules are WHATWG HTML's "Interpreting an event stream": lines end with
// CRLF, LF or a lone CR; a blank line dispatches; one leading BOM is dropped
// at the very start of the stream.
type eventState struct {
	// lineStarted is true while a line is being read (some byte of it seen,
	// no terminator yet).
	lineStarted bool
	// lastCR is true when the last byte was a CR: an LF that follows belongs
	// to the same line terminator.
	lastCR bool
	// inEvent is true when a field line has been read since the last blank
	// line, so a blank line written now would dispatch or reset an event.
	inEvent bool
	// inValue is true once the current line's colon has been seen.
	inValue bool
	// skipSpace is true right after the colon: one leading space of the value
	// is not part of it.
	skipSpace bool
	// comment is true while the current line is a comment.
	comment bool
	// name holds the first bytes of the current line's field name; nameLen
	// counts them up to one more, so a longer name never matches a known one.
	name    [4]byte
	nameLen uint8
	// field is the current line's field, once its colon (or end) is read.
	field fieldKind
	// hasData is true when the event being read has a data field, so its
	// blank line will dispatch it.
	hasData bool

	// idLine collects the value of the id line being read; idNUL and
	// idTooLong record that it must be ignored or cannot be kept.
	idLine    []byte
	idNUL     bool
	idTooLong bool
	idCtl     bool // the id line has a control character (see ctlIDs)
	// idBuffer is the parser's last-event-ID buffer: the last id field read.
	idBuffer []byte
	// lastEventID is the event source's last event ID: idBuffer as of the
	// last blank line. lastEventIDKnown is false when an id was too long to
	// keep.
	lastEventID      []byte
	idBufferKnown    bool
	lastEventIDKnown bool

	// bomMatched counts the bytes of a leading UTF-8 BOM read so far at the
	// start of the upstream's body; bomDone once the start is behind.
	bomMatched uint8

	// events counts dispatched events (blank lines after a data field);
	// ended counts the blank lines that ended an event, data or not; and
	// idFields the id fields taken (shared streams split the upstream's
	// events with them, share.go).
	events   int64
	ended    uint32 // compared, never summed: wraps harmlessly
	idFields uint32
	// ctlIDs counts ids with control characters other than NUL: the client
	// keeps them and sends them back in Last-Event-ID, a header that
	// servers refuse with such bytes.
	ctlIDs int64
}

type fieldKind uint8

const (
	fieldOther fieldKind = iota
	fieldData
	fieldID
)

// maxEventIDLen caps the id value kept for Last-Event-ID. Browsers send it
// back in a request header; a longer one is almost certainly not an id.
const maxEventIDLen = 1024

const bomDone = 3

var utf8BOM = [3]byte{0xEF, 0xBB, 0xBF}

func newEventState() eventState {
	return eventState{idBufferKnown: true, lastEventIDKnown: true}
}

// atBoundary reports whether the client's parser has nothing pending, so a
// comment and a blank line can be written without touching any event.
//
// That holds right after a CR too. If the upstream meant an LF to follow as
// the second half of a CRLF, the client now reads that LF as a blank line
// after the gateway's own lines, and a blank line at a boundary dispatches
// nothing.
func (s *eventState) atBoundary() bool {
	return !s.lineStarted && !s.inEvent
}

// lastID returns the last event ID the client has seen dispatched, which it
// will send back as Last-Event-ID, and whether the gateway knows it (an id
// longer than maxEventIDLen is not kept).
func (s *eventState) lastID() (id []byte, known bool) {
	return s.lastEventID, s.lastEventIDKnown
}

// wroteAtBoundary records that the gateway wrote its own complete lines
// (ending in LF) at a boundary, so an LF the upstream sends next is a blank
// line of its own, as the client reads it.
func (s *eventState) wroteAtBoundary() { s.lastCR = false }

// takeBOM handles the upstream's leading byte-order mark, which a client
// drops only at the very first byte of the stream. It consumes the BOM bytes
// at the start of p and returns what must be written before the rest of p:
// the whole BOM when it completes while the client has received nothing yet
// (clientStarted false), so it passes through as it came; the held-back
// bytes when they turn out not to be a BOM; or nothing. A BOM that completes
// after the gateway has written its own bytes is dropped, since the client
// would read it as part of the first field name. Until the upstream's first
// bytes prove to be a BOM or not they are held back (two bytes at most).
func (s *eventState) takeBOM(p []byte, clientStarted bool) (prefix, rest []byte) {
	for len(p) > 0 && s.bomMatched < bomDone {
		if p[0] != utf8BOM[s.bomMatched] {
			prefix = utf8BOM[:s.bomMatched]
			s.bomMatched = bomDone
			s.scan(prefix, false)
			return prefix, p
		}
		s.bomMatched++
		p = p[1:]
		if s.bomMatched == bomDone && !clientStarted {
			return utf8BOM[:], p
		}
	}
	return nil, p
}

// scan advances the state over p, bytes the client is about to receive from
// the upstream. It stops early, right after the first byte that brings the
// parser to an event boundary, when stopAtBoundary is set, and returns how
// many bytes of p it consumed.
func (s *eventState) scan(p []byte, stopAtBoundary bool) int {
	for i := 0; i < len(p); {
		c := p[i]
		if c == '\n' || c == '\r' {
			wasCR := s.lastCR
			s.lastCR = c == '\r'
			i++
			if c == '\n' && wasCR {
				continue // second half of a CRLF
			}
			s.endLine()
			if stopAtBoundary && !s.inEvent {
				return i
			}
			continue
		}
		s.lastCR = false
		if s.inValue || s.comment {
			// Skip the rest of the line at once: values are not inspected,
			// except an id's, which is kept.
			end := i + indexLineEnd(p[i:])
			if s.field == fieldID && !s.comment {
				s.appendID(p[i:end])
			}
			s.skipSpace = false
			i = end
			continue
		}
		// The field name, or the first byte of the line.
		if !s.lineStarted {
			s.lineStarted = true
			if c == ':' {
				s.comment = true
				i++
				continue
			}
		}
		if c == ':' {
			s.field = s.fieldName()
			s.inValue = true
			s.skipSpace = true
			if s.field == fieldID {
				s.idLine = s.idLine[:0]
				s.idNUL, s.idTooLong, s.idCtl = false, false, false
			}
			i++
			continue
		}
		if int(s.nameLen) < len(s.name) {
			s.name[s.nameLen] = c
		}
		if int(s.nameLen) <= len(s.name) {
			s.nameLen++
		}
		i++
	}
	return len(p)
}

// appendID adds part of an id line's value, without its leading space.
func (s *eventState) appendID(v []byte) {
	if s.skipSpace && len(v) > 0 && v[0] == ' ' {
		v = v[1:]
	}
	for _, c := range v {
		switch {
		case c == 0:
			s.idNUL = true
		case c < ' ' && c != '\t' || c == 0x7f:
			s.idCtl = true
		}
	}
	if len(s.idLine)+len(v) > maxEventIDLen {
		s.idTooLong = true
		return
	}
	s.idLine = append(s.idLine, v...)
}

// endLine applies a line terminator.
func (s *eventState) endLine() {
	defer s.resetLine()
	if !s.lineStarted {
		// A blank line: dispatch (the event source's last event ID is set
		// even when there is no data).
		if s.inEvent {
			if s.hasData {
				s.events++
			}
			s.ended++
			s.lastEventID = append(s.lastEventID[:0], s.idBuffer...)
			s.lastEventIDKnown = s.idBufferKnown
		}
		s.inEvent, s.hasData = false, false
		return
	}
	if s.comment {
		return
	}
	s.inEvent = true
	field := s.field
	if !s.inValue {
		// A line without a colon is a field with an empty value.
		field = s.fieldName()
		if field == fieldID {
			s.idLine = s.idLine[:0]
			s.idNUL, s.idTooLong, s.idCtl = false, false, false
		}
	}
	switch field {
	case fieldData:
		s.hasData = true
	case fieldID:
		if !s.idNUL {
			s.idFields++
			s.idBuffer, s.idLine = s.idLine, s.idBuffer[:0]
			s.idBufferKnown = !s.idTooLong
			if s.idCtl {
				s.ctlIDs++
			}
		}
	}
}

func (s *eventState) resetLine() {
	s.lineStarted, s.inValue, s.skipSpace, s.comment = false, false, false, false
	s.nameLen = 0
	s.field = fieldOther
}

func (s *eventState) fieldName() fieldKind {
	switch {
	case s.nameLen == 2 && s.name[0] == 'i' && s.name[1] == 'd':
		return fieldID
	case s.nameLen == 4 && string(s.name[:]) == "data":
		return fieldData
	}
	return fieldOther
}

// indexLineEnd returns the index of the first CR or LF in p, or len(p).
func indexLineEnd(p []byte) int {
	end := bytes.IndexByte(p, '\n')
	if end < 0 {
		end = len(p)
	}
	if cr := bytes.IndexByte(p[:end], '\r'); cr >= 0 {
		return cr
	}
	return end
}
