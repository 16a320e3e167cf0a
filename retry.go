package caddysse

import (
	"bytes"
	"strconv"
	"time"
)

// retryClamp rewrites the `retry:` lines of an upstream's event stream so
// that the reconnection time they set stays within bounds (retry_bounds):
// `retry: 0` on a stream that ends after every event makes a reconnect
// storm, and a huge value parks clients for days. Everything else passes
// through untouched.
//
// A line is held back only while it may be a retry line, from its first
// byte to its end (at most a few dozen bytes), and then written clamped,
// or as it was if it is not a valid retry field: the client reads a retry
// field only when its value is all ASCII digits, so nothing else changes.
type retryClamp struct {
	min, max int64 // milliseconds

	lineStart bool   // the next byte starts a line
	held      []byte // the bytes of a line that may be a retry line
	lastCR    bool   // the last byte was CR: an LF that follows ends the same line
	out       []byte // what rewrite returns, reused
}

// maxHeldRetryLine bounds what a retry line may hold back: "retry: " and
// 32 digits, well beyond any int64 (which is clamped to max). A longer
// value passes through as it is.
const maxHeldRetryLine = len("retry: ") + 32

func newRetryClamp(min, max time.Duration) *retryClamp {
	return &retryClamp{min: min.Milliseconds(), max: max.Milliseconds(), lineStart: true, held: make([]byte, 0, maxHeldRetryLine)}
}

// rewrite returns what the client gets for p, valid until the next call.
func (c *retryClamp) rewrite(p []byte) []byte {
	c.out = c.rewriteTo(c.out[:0], p)
	return c.out
}

// rewriteTo appends to dst what the client gets for p.
func (c *retryClamp) rewriteTo(dst, p []byte) []byte {
	for len(p) > 0 {
		if len(c.held) == 0 && !c.lineStart {
			// Inside a line that is not a retry line: copy up to its end.
			end := indexLineEnd(p)
			dst = append(dst, p[:end]...)
			p = p[end:]
			if len(p) > 0 {
				c.endByte(p[0])
				dst = append(dst, p[0])
				p = p[1:]
			}
			continue
		}
		b := p[0]
		if b == '\n' && c.lastCR {
			// The LF of a CRLF: nothing held, the line already ended.
			c.lastCR = false
			dst = append(dst, b)
			p = p[1:]
			continue
		}
		c.lastCR = false
		if b == '\r' || b == '\n' {
			dst = c.release(dst)
			c.endByte(b)
			dst = append(dst, b)
			p = p[1:]
			continue
		}
		c.lineStart = false
		c.held = append(c.held, b)
		p = p[1:]
		if !c.mayBeRetry() {
			// Not a retry line after all: out it goes, as it came.
			dst = append(dst, c.held...)
			c.held = c.held[:0]
		}
	}
	return dst
}

// endByte records a line terminator.
func (c *retryClamp) endByte(b byte) {
	c.lineStart = true
	c.lastCR = b == '\r'
}

// mayBeRetry reports whether the held bytes can still become a valid retry
// line: "retry:", an optional space, and digits.
func (c *retryClamp) mayBeRetry() bool {
	h := c.held
	const name = "retry:"
	if len(h) <= len(name) {
		return bytes.HasPrefix([]byte(name), h)
	}
	if !bytes.HasPrefix(h, []byte(name)) || len(h) > maxHeldRetryLine {
		return false
	}
	v := h[len(name):]
	if v[0] == ' ' {
		v = v[1:]
	}
	for _, d := range v {
		if d < '0' || d > '9' {
			return false
		}
	}
	return true
}

// release writes the held line, which just ended, clamped if it is a
// retry field with a value.
func (c *retryClamp) release(dst []byte) []byte {
	h := c.held
	c.held = c.held[:0]
	v, ok := bytes.CutPrefix(h, []byte("retry:"))
	if ok && len(v) > 0 && v[0] == ' ' {
		v = v[1:]
	}
	if !ok || len(v) == 0 {
		return append(dst, h...) // not a retry field, or one the client ignores
	}
	ms, err := strconv.ParseInt(string(v), 10, 64)
	if err != nil || ms > c.max {
		ms = c.max // digits beyond int64 are a huge value too
	}
	ms = max(ms, c.min)
	dst = append(dst, "retry: "...)
	return strconv.AppendInt(dst, ms, 10)
}

// flush gives back what is held when the upstream's response ends: a line
// that never ended, which the client discards anyway.
func (c *retryClamp) flush() []byte {
	held := c.held
	c.held = nil
	return held
}
