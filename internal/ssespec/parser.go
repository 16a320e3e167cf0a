// Package ssespec interprets a complete text/event-stream body the way the
// WHATWG HTML Standard ("Server-sent events": "Parsing an event stream",
// "Interpreting an event stream" and the dispatch steps) tells a user agent
// to, and reports what an EventSource would have learned from it.
//
// It is a test oracle: the gateway's tests feed it the bytes the upstream
// wrote and the bytes the client received, and require both to yield the same
// Result. It is written from the specification alone, independently of the
// gateway's own stream code, so that a misreading of the format in one place
// is not silently repeated in the other.
//
// Two points the specification leaves to the implementation are settled
// here: an empty retry value and a retry value too large for an int64 are
// both ignored, since neither names a reconnection time a client could use.
package ssespec

import (
	"bytes"
	"strconv"
	"strings"
	"unicode/utf8"
)

// Event is one event as an EventSource would dispatch it to the page.
type Event struct {
	Type        string // "message" when no event field was given
	Data        string // data buffer with the final LF removed
	LastEventID string // the event's lastEventId
}

// Result is everything a client learns from one complete response body.
type Result struct {
	Events      []Event
	Retries     []int64 // every valid retry value set, in order (ms)
	LastEventID string  // the event source's last event ID string when the body ended (what it would send as Last-Event-ID)
}

// Parse interprets body as one whole event stream that then ended (an
// unterminated final event is discarded). Slices in the Result are nil when
// empty, so two Results compare equal with reflect.DeepEqual exactly when a
// client could not tell the two bodies apart.
func Parse(body []byte) Result {
	var p parser
	text := decodeUTF8(body)
	for {
		line, rest, terminated := cutLine(text)
		if !terminated {
			// "Once the end of the file is reached, any pending data must be
			// discarded": an unterminated last line is never processed.
			break
		}
		p.processLine(line)
		text = rest
	}
	// Whatever sits in the data and event type buffers now belongs to an
	// event that no blank line completed; it is never dispatched.
	return p.result
}

// parser holds the three buffers the specification associates with a stream,
// plus what has been reported to the page so far.
type parser struct {
	data              strings.Builder
	eventType         string
	lastEventIDBuffer string
	result            Result
}

// cutLine splits off the first line of s. A line ends with CRLF, with an LF,
// or with a CR not followed by LF; a CR that is the very last character
// therefore ends a line too, since nothing follows it. terminated is false
// when s holds no line terminator at all.
func cutLine(s string) (line, rest string, terminated bool) {
	end := strings.IndexAny(s, "\r\n")
	if end < 0 {
		return "", s, false
	}
	if s[end] == '\r' && end+1 < len(s) && s[end+1] == '\n' {
		return s[:end], s[end+2:], true
	}
	return s[:end], s[end+1:], true
}

// processLine applies the rules for a single line, in the specification's
// order: blank line, comment, field with a colon, field without one.
func (p *parser) processLine(line string) {
	switch {
	case line == "":
		p.dispatch()
	case line[0] == ':':
		// A comment.
	default:
		// Without a colon, the whole line is the field name and the value
		// is empty, which is exactly what strings.Cut reports.
		field, value, _ := strings.Cut(line, ":")
		p.processField(field, strings.TrimPrefix(value, " "))
	}
}

// processField acts on one field. Names are compared exactly (case matters);
// any other name is ignored.
func (p *parser) processField(field, value string) {
	switch field {
	case "event":
		p.eventType = value
	case "data":
		p.data.WriteString(value)
		p.data.WriteByte('\n')
	case "id":
		if !strings.ContainsRune(value, 0) {
			p.lastEventIDBuffer = value
		}
	case "retry":
		// The reconnection time changes as soon as the field is read, not
		// at dispatch, so a retry in an unfinished event still counts.
		if ms, ok := parseRetry(value); ok {
			p.result.Retries = append(p.result.Retries, ms)
		}
	}
}

// parseRetry accepts a value made only of ASCII digits, read in base ten.
// ParseInt alone would also take a sign; it rejects an empty value and one
// that overflows, both of which are then ignored.
func parseRetry(value string) (int64, bool) {
	for i := 0; i < len(value); i++ {
		if value[i] < '0' || value[i] > '9' {
			return 0, false
		}
	}
	ms, err := strconv.ParseInt(value, 10, 64)
	return ms, err == nil
}

// dispatch follows the specification's "dispatch the event" steps.
func (p *parser) dispatch() {
	// The last event ID string follows the buffer at every blank line, even
	// one that dispatches nothing; the buffer itself is kept.
	p.result.LastEventID = p.lastEventIDBuffer
	if p.data.Len() == 0 {
		p.eventType = ""
		return
	}
	event := Event{
		Type:        p.eventType,
		Data:        strings.TrimSuffix(p.data.String(), "\n"),
		LastEventID: p.result.LastEventID,
	}
	if event.Type == "" {
		event.Type = "message"
	}
	p.result.Events = append(p.result.Events, event)
	p.data.Reset()
	p.eventType = ""
}

// utf8BOM is the byte order mark that "UTF-8 decode" drops from the start of
// a byte stream.
const utf8BOM = "\xEF\xBB\xBF"

// decodeUTF8 is the Encoding Standard's "UTF-8 decode": one leading BOM is
// dropped, and each maximal invalid subpart becomes one U+FFFD. It is spelled
// out rather than left to package utf8, whose decoding yields one U+FFFD per
// byte of a truncated sequence (two for "\xE2\x82", where a browser shows
// one), so that event data here matches what a page would see.
func decodeUTF8(b []byte) string {
	b = bytes.TrimPrefix(b, []byte(utf8BOM))
	var out strings.Builder
	out.Grow(len(b))
	var codePoint rune
	needed, seen := 0, 0
	lower, upper := byte(0x80), byte(0xBF)
	for i := 0; i < len(b); i++ {
		c := b[i]
		if needed == 0 {
			switch {
			case c <= 0x7F:
				out.WriteByte(c)
			case c >= 0xC2 && c <= 0xDF:
				needed, codePoint = 1, rune(c&0x1F)
			case c >= 0xE0 && c <= 0xEF:
				if c == 0xE0 {
					lower = 0xA0 // Rules out overlong forms.
				}
				if c == 0xED {
					upper = 0x9F // Rules out surrogates.
				}
				needed, codePoint = 2, rune(c&0x0F)
			case c >= 0xF0 && c <= 0xF4:
				if c == 0xF0 {
					lower = 0x90 // Rules out overlong forms.
				}
				if c == 0xF4 {
					upper = 0x8F // Rules out code points above U+10FFFF.
				}
				needed, codePoint = 3, rune(c&0x07)
			default:
				out.WriteRune(utf8.RuneError)
			}
			continue
		}
		if c < lower || c > upper {
			// The sequence so far is one error, and this byte starts over.
			codePoint, needed, seen = 0, 0, 0
			lower, upper = 0x80, 0xBF
			out.WriteRune(utf8.RuneError)
			i--
			continue
		}
		lower, upper = 0x80, 0xBF
		codePoint = codePoint<<6 | rune(c&0x3F)
		seen++
		if seen == needed {
			out.WriteRune(codePoint)
			codePoint, needed, seen = 0, 0, 0
		}
	}
	if needed != 0 {
		out.WriteRune(utf8.RuneError) // A sequence cut off by the end.
	}
	return out.String()
}
