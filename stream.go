package caddysse

import (
	"context"
	"errors"
	"io"
	"mime"
	"net/http"
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
)

// This file is one request's life through the gateway, top to bottom:
//
//  1. Arrival (serve): the request is registered with the handler's open
//     requests and its clock starts, so the wait for the upstream's header
//     counts against idle_timeout and draining reaches it.
//  2. The header (WriteHeader): an event stream is taken over (decoded
//     first if the upstream compressed it, or kept opaque if it cannot be);
//     any other response steps aside and passes through untouched; a stream
//     over the limits is refused.
//  3. The body (Write, forward): events pass through as they come, each
//     write flushed at once, while the stream's timer (idle.go) adds
//     heartbeats between events.
//  4. The end (end): every way a stream can end has one endReason; the
//     gateway's own closes go through stopLocked, which waits for an event
//     boundary and sends the close sequence there.

// mode is where a request stands.
type mode uint8

const (
	// waiting: the next handler has not written the response header yet.
	waiting mode = iota
	// refused: the gateway answers the request itself (see refuse.go)
	// and drops whatever the next handler writes.
	refused
	// passThrough: the response is not an event stream; the gateway is out
	// of its way.
	passThrough
	// events: an event stream the gateway manages.
	events
	// opaque: an event stream in an encoding the gateway cannot read. No
	// boundary can be found, so nothing is added to it and a close ends it
	// at any byte; it is still counted, drained and time-limited.
	opaque
	// headOnly: the answer to a HEAD, whose upstream GET was cut after its
	// header (see Handler.ServeHTTP).
	headOnly
)

// endReason says why a request ended without a stream, or how its stream
// ended. It is logged, counted, sent as the close event's data and set as
// the {http.sse.close_reason} placeholder.
type endReason string

const (
	// The stream ended on its own.
	reasonClientGone    endReason = "client_gone"
	reasonUpstreamEnd   endReason = "upstream_end"
	reasonUpstreamError endReason = "upstream_error"
	reasonWriteTimeout  endReason = "write_timeout"
	// reasonSlowClient: a client of a shared stream fell more than
	// max_backlog behind (share.go).
	reasonSlowClient endReason = "slow_client"
	// The gateway closed it.
	reasonIdleTimeout endReason = "idle_timeout"
	reasonMaxLifetime endReason = "max_lifetime"
	reasonDrain       endReason = "drain"
	// The gateway refused it (refuse.go); drain refuses too.
	reasonUpstreamTimeout     endReason = "upstream_timeout"
	reasonMaxStreams          endReason = "max_streams"
	reasonMaxStreamsPerClient endReason = "max_streams_per_client"
	reasonMaxStreamRate       endReason = "max_stream_rate"
	// reasonUpstreamStatus is followed by the status, as in
	// upstream_status_502 (see RetryStatuses).
	reasonUpstreamStatus endReason = "upstream_status"
)

// streamEndReasons are the reasons a stream that reached the client ends
// with; refusalReasons those a request is turned away with.
var (
	streamEndReasons = []endReason{reasonClientGone, reasonUpstreamEnd, reasonUpstreamError,
		reasonWriteTimeout, reasonSlowClient, reasonIdleTimeout, reasonMaxLifetime, reasonDrain}
	refusalReasons = []endReason{reasonMaxStreams, reasonMaxStreamsPerClient, reasonMaxStreamRate,
		reasonUpstreamTimeout, reasonUpstreamStatus, reasonDrain}
)

var (
	// errStreamClosed is returned to the next handler's writes once the
	// stream is over.
	errStreamClosed = errors.New("sse: stream closed")
	// errGatewayClosed is the cause given to the upstream request's context
	// when the gateway ends a request itself.
	errGatewayClosed = errors.New("sse: stream closed by the gateway")
	// errClientGone is the cause given when the client is gone.
	errClientGone = errors.New("sse: client gone")
)

// stream is one request through the handler, and the response writer
// handed to the next handler. Everything that writes to the client holds
// mu, so heartbeats and upstream data never interleave within a write.
type stream struct {
	*caddyhttp.ResponseWriterWrapper
	h   *Handler
	req *http.Request // as received; its context ends when the client is gone
	// base is the server's own writer, below every wrapper: cut sets a
	// write deadline on it from any goroutine.
	base           http.ResponseWriter
	cancelUpstream context.CancelCauseFunc

	// Set once, as the request arrives.
	askedForStream bool // its Accept names text/event-stream
	head           bool // a HEAD, sent upstream as GET
	// shared is set when the stream is a client of a shared stream, whose
	// upstream's failures the hub reports once (share.go).
	shared bool

	// Guarded by the handler's streamSet.
	holdsSlot bool

	// Set by the next handler's goroutine; mode only under mu, since the
	// timer may refuse a request still waiting.
	wroteHeader bool
	decoder     *decoder // set when the stream is decoded
	rc          *http.ResponseController
	// restoreWriteTimeout puts back the settings of Caddy's write deadline
	// writer, which the stream tightened to write_timeout.
	restoreWriteTimeout func()
	// ownDeadlineWriter is Caddy's write deadline writer put in place by the
	// stream when the server runs without one.
	ownDeadlineWriter *caddyhttp.IdleTimeoutWriter
	// retries clamps the upstream's retry lines when retry_bounds is set.
	retries *retryClamp

	mu     sync.Mutex
	mode   mode
	closed bool // nothing more may be written to the client
	// closeSent is true once the close sequence reached the client.
	closeSent bool
	// userTimeout is true while the stream holds the TCP_USER_TIMEOUT it
	// set on the client's connection (conn.go).
	userTimeout bool
	reason      endReason // why it ended, once known
	state       eventState
	times       streamTimes
	duration    time.Duration // how long it lasted, once it has ended
	bytesOut    int64
	// heartbeats counts the heartbeats written.
	heartbeats int64
	// eventWrites counts the first writes that carried events, while they
	// may still show the upstream's buffering (quirks.go).
	eventWrites int32
	ctlIDs      int32 // ids with control characters seen when last reported

	// cutting is set when the drain's hard stop cuts the stream; cutSlow,
	// set first, when it is a shared stream's slow client instead.
	cutting atomic.Bool
	cutSlow atomic.Bool
	// clientGoneAt is when the client was found gone (Unix ns), so the
	// teardown that follows can be timed.
	clientGoneAt atomic.Int64

	// Guarded by the handler's streamSet.
	drainTimer timer
}

func newStream(h *Handler, w http.ResponseWriter, r *http.Request) *stream {
	s := &stream{
		ResponseWriterWrapper: &caddyhttp.ResponseWriterWrapper{ResponseWriter: w},
		h:                     h,
		req:                   r,
		base:                  w,
		askedForStream:        wantsStream(r),
		head:                  r.Method == http.MethodHead,
		state:                 newEventState(),
	}
	for {
		u, ok := s.base.(interface{ Unwrap() http.ResponseWriter })
		if !ok {
			break
		}
		s.base = u.Unwrap()
	}
	return s
}

// serve passes the request on to next and ends it.
func (s *stream) serve(next caddyhttp.Handler) error {
	// The gateway must read the upstream's events to find their boundaries,
	// so the upstream is asked not to compress; `encode` can still
	// compress toward the client. Removing the header would not do: Go's
	// transport then asks for gzip on its own. (Overwriting the value the
	// client sent, as browsers do, allocates nothing.) An upstream that
	// compresses anyway is decoded (decode.go).
	if ae := s.req.Header["Accept-Encoding"]; len(ae) > 0 {
		ae[0] = "identity"
		s.req.Header["Accept-Encoding"] = ae[:1]
	} else {
		s.req.Header.Set("Accept-Encoding", "identity")
	}
	// The next handler gets a context the gateway can end. The client's
	// leaving ends it too, through one callback that also times it.
	clientCtx := s.req.Context()
	ctx, cancel := context.WithCancelCause(context.WithoutCancel(clientCtx))
	defer cancel(nil)
	s.arrive(cancel)
	defer context.AfterFunc(clientCtx, s.clientGone)()

	// The context goes into the request in place, as Caddy's own
	// NewTestReplacer does: r.WithContext's copy of the request would be a
	// quarter of the memory the gateway adds to a stream. The handlers
	// before this one get the request back as it came once next returns.
	setContext(s.req, ctx)
	err, panicked := callNext(next, s, s.req)
	// The decoder's goroutine is done with the request before it is
	// rewritten.
	s.stopDecoding()
	setContext(s.req, clientCtx)

	switch s.settle() {
	case waiting:
		if panicked != nil {
			panic(panicked)
		}
		// The next handler failed before any header: reverse_proxy's 502
		// while the upstream restarts, say.
		if status := errorStatus(err); err != nil && s.askedForStream && s.h.retryStatus(status) {
			return s.h.refuse(s.ResponseWriter, s.req, upstreamStatus(status))
		}
		return err
	case passThrough:
		if panicked != nil {
			panic(panicked)
		}
		return err
	case headOnly:
		if panicked != nil && panicked != http.ErrAbortHandler {
			panic(panicked)
		}
		return nil
	case refused:
		if panicked != nil && panicked != http.ErrAbortHandler {
			panic(panicked)
		}
		return s.h.refuse(s.ResponseWriter, s.req, s.reason)
	}
	return s.end(err, panicked)
}

// arrive starts the request's clock and registers it with the handler's
// open requests; cancel ends the upstream request.
func (s *stream) arrive(cancel context.CancelCauseFunc) {
	s.cancelUpstream = cancel
	s.mu.Lock()
	s.startClockLocked()
	s.mu.Unlock()
	s.h.streams.add(s)
}

// callNext calls next and recovers a panic it raises: a stream's next
// handler, or a shared stream's upstream request (hub.go). reverse_proxy
// panics with http.ErrAbortHandler when a stream breaks after the header was
// sent: the upstream failed, the client went away, or the gateway itself
// cancelled the upstream to close the stream.
func callNext(next caddyhttp.Handler, w http.ResponseWriter, r *http.Request) (err error, panicked any) {
	defer func() { panicked = recover() }()
	return next.ServeHTTP(w, r), nil
}

// setContext gives r the context ctx without a copy of r on the heap. Not
// inlined, so that the copy on the stack is gone before next runs.
//
//go:noinline
func setContext(r *http.Request, ctx context.Context) {
	*r = *r.WithContext(ctx)
}

// settle stops what the stream was waiting for once the next handler has
// returned, and says where the request ended up. A request that never got
// a header, or is not a stream, leaves the handler's open requests here.
func (s *stream) settle() mode {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.mode == waiting || s.mode == refused {
		s.closed = true
		s.stopClockLocked()
		s.h.streams.remove(s)
	}
	return s.mode
}

// clientGone releases the upstream when the client has gone away.
func (s *stream) clientGone() {
	s.markClientGone()
	s.cancelUpstream(errClientGone)
}

// markClientGone records when the client was found gone, for the teardown
// latency.
func (s *stream) markClientGone() {
	s.clientGoneAt.CompareAndSwap(0, time.Now().UnixNano())
}

// WriteHeader decides what the response is: an event stream to take over,
// one to refuse, or anything else to pass through.
func (s *stream) WriteHeader(status int) {
	if s.wroteHeader {
		if s.mode == passThrough {
			s.ResponseWriter.WriteHeader(status)
		}
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.mode == refused {
		return // the gateway answers this request itself (see serve)
	}
	if status >= 100 && status <= 199 {
		s.ResponseWriter.WriteHeader(status)
		return
	}
	s.wroteHeader = true
	if s.head {
		if status == http.StatusOK && isEventStream(s.Header()) {
			if reason := s.h.streams.acquire(s, !s.askedForStream); reason != "" {
				// The GET is a stream that did not ask to be one, over the
				// limits: refused like one.
				dropEntityHeaders(s.Header())
				s.refuseLocked(reason)
				return
			}
		}
		// Answer the HEAD with the GET's header, and cut the GET.
		s.stepAsideLocked(headOnly)
		s.endLocked(reasonUpstreamEnd, errGatewayClosed)
		s.ResponseWriter.WriteHeader(status)
		return
	}
	if s.askedForStream && s.h.retryStatus(status) {
		dropEntityHeaders(s.Header())
		s.refuseLocked(upstreamStatus(status))
		return
	}
	if status != http.StatusOK || !isEventStream(s.Header()) {
		s.stepAsideLocked(passThrough)
		s.ResponseWriter.WriteHeader(status)
		return
	}
	if reason := s.h.streams.acquire(s, !s.askedForStream); reason != "" {
		// A stream that did not ask to be one, over the limits.
		dropEntityHeaders(s.Header())
		s.refuseLocked(reason)
		return
	}
	s.engageLocked(status)
}

// stepAsideLocked leaves the response to the next handler, or to the
// HEAD's answer: no timer, and out of the handler's open requests.
func (s *stream) stepAsideLocked(m mode) {
	s.mode = m
	s.stopClockLocked()
	s.h.streams.remove(s)
}

// dropEntityHeaders removes the headers that describe the upstream's body
// from a response the gateway answers itself.
func dropEntityHeaders(header http.Header) {
	header.Del("Content-Type")
	header.Del("Content-Encoding")
	header.Del("Content-Length")
}

// upstreamStatus is the reason of a refusal in place of the upstream's
// status.
func upstreamStatus(status int) endReason {
	return reasonUpstreamStatus + "_" + endReason(strconv.Itoa(status))
}

// errorStatus is the status Caddy answers an error from a handler with.
func errorStatus(err error) int {
	var he caddyhttp.HandlerError
	if errors.As(err, &he) && he.StatusCode != 0 {
		return he.StatusCode
	}
	return http.StatusInternalServerError
}

// isEventStream reports whether the response's Content-Type is
// text/event-stream, the same test reverse_proxy uses to flush at once;
// the usual value, without parameters, skips the map that
// mime.ParseMediaType allocates.
func isEventStream(header http.Header) bool {
	contentType := header.Get("Content-Type")
	if !strings.Contains(contentType, ";") {
		return strings.EqualFold(strings.TrimSpace(contentType), "text/event-stream")
	}
	mediaType, _, err := mime.ParseMediaType(contentType)
	return err == nil && mediaType == "text/event-stream"
}

// refuseLocked turns a request away: the upstream is released and the
// gateway answers after the next handler has returned.
func (s *stream) refuseLocked(reason endReason) {
	s.mode = refused
	s.endLocked(reason, errGatewayClosed)
}

// engageLocked takes over an event-stream response: it sets the headers
// that keep intermediaries from buffering, bounds every write to the client
// by write_timeout, sends the header at once and starts the stream's time.
func (s *stream) engageLocked(status int) {
	header := s.Header()
	s.mode = events
	if b := s.h.RetryBounds; len(b) == 2 {
		s.retries = newRetryClamp(time.Duration(b[0]), time.Duration(b[1]))
	}
	if encoding := header.Get("Content-Encoding"); encoding != "" && !strings.EqualFold(encoding, "identity") {
		// The upstream compressed it despite Accept-Encoding: identity.
		if s.decoder = startDecoder(s, encoding); s.decoder != nil {
			header.Del("Content-Encoding")
		} else {
			s.mode = opaque
			s.h.warnOpaque.Do(func() {
				s.h.logger.Warn("upstream sent an event stream in an encoding the gateway cannot read; it gets no heartbeats and closes cut it at any byte",
					zap.String("content_encoding", encoding))
			})
		}
	}
	if contentType := header.Get("Content-Type"); contentType != "text/event-stream" {
		header.Set("Content-Type", "text/event-stream")
		s.h.reportQuirk(s.req.RequestURI, quirkContentTypeParams)
	}
	if header.Get("Content-Length") != "" {
		header.Del("Content-Length")
		s.h.reportQuirk(s.req.RequestURI, quirkContentLength)
	}
	header.Set("X-Accel-Buffering", "no")
	if header.Get("Cache-Control") == "" {
		header.Set("Cache-Control", "no-cache")
	}
	if s.h.WriteTimeout > 0 {
		// write_timeout off leaves the write deadline as the server has it.
		s.boundWritesLocked()
		s.userTimeout = setClientTimeout(s.req.Context(), time.Duration(s.h.WriteTimeout))
	}
	s.rc = http.NewResponseController(s.ResponseWriter)
	sseMetrics.active.Inc()
	s.h.streams.engage(s)

	s.ResponseWriter.WriteHeader(status)
	if !s.writeLocked(nil, nil) {
		return
	}
	now := s.sinceStart()
	s.times.lastUpstream = now
	s.armLocked(now)
}

// boundWritesLocked bounds every write to the client by write_timeout,
// through the write deadline writer Caddy's server puts under every
// response (its write_idle_timeout): it resets the deadline before each
// write and flush, and clears it between writes over HTTP/2, where an
// expired deadline would reset an idle stream (caddyserver/caddy#8118).
// A server whose write_idle_timeout is off has none, so the stream puts
// one of Caddy's in place itself.
func (s *stream) boundWritesLocked() {
	timeout := time.Duration(s.h.WriteTimeout)
	if _, writer := caddyhttp.IdleTimeoutsFromContext(s.req.Context()); writer != nil {
		s.restoreWriteTimeout = writer.Override(timeout, 0, 0)
		return
	}
	w := s.ResponseWriter
	s.ownDeadlineWriter = &caddyhttp.IdleTimeoutWriter{
		ResponseWriterWrapper: &caddyhttp.ResponseWriterWrapper{ResponseWriter: w},
		Ctrl:                  http.NewResponseController(w),
		Deadline:              caddyhttp.IdleDeadline{Start: time.Now(), Timeout: timeout},
		Logger:                s.h.logger,
		ClearBetweenWrites:    s.req.ProtoMajor == 2,
	}
	s.ResponseWriter = s.ownDeadlineWriter
}

// Write forwards upstream bytes to the client at once. It returns an error
// once the stream is over, which makes the next handler stop.
func (s *stream) Write(p []byte) (int, error) {
	if !s.wroteHeader {
		s.WriteHeader(http.StatusOK)
	}
	switch {
	case s.mode == passThrough:
		return s.ResponseWriter.Write(p)
	case s.mode == headOnly:
		return 0, errStreamClosed
	case s.decoder != nil:
		return s.decoder.Write(p)
	}
	if err := s.forward(p); err != nil {
		return 0, err
	}
	return len(p), nil
}

// forward writes the upstream's (decoded) bytes to the client, keeping
// track of where the client's parser stands.
func (s *stream) forward(p []byte) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return errStreamClosed
	}
	if s.mode == opaque {
		if !s.writeLocked(nil, p) {
			return errClientGone
		}
		s.upstreamActiveLocked()
		return nil
	}
	prefix, rest := s.state.takeBOM(p, s.bytesOut > 0)
	if s.retries != nil {
		rest = s.retries.rewrite(rest)
	}
	dispatched := s.state.events
	closing := s.times.closing != ""
	if closing {
		// A close waits for the event in flight to end: forward up to the
		// boundary, close there and drop the rest.
		rest = rest[:s.state.scan(rest, true)]
	} else {
		s.state.scan(rest, false)
	}
	if !s.writeLocked(prefix, rest) {
		// Events the client did not get are not counted, here or in the
		// stream's log line.
		s.state.events = dispatched
		return errClientGone
	}
	s.upstreamActiveLocked()
	if n := s.state.events - dispatched; n > 0 {
		sseMetrics.events.Add(float64(n))
		if s.eventWrites < burstWrites {
			s.watchBurstsLocked(len(rest), n)
		}
		if s.state.ctlIDs > 0 && s.ctlIDs == 0 {
			s.h.reportQuirk(s.req.RequestURI, quirkIDControlChars)
			s.ctlIDs = 1
		}
	}
	if closing && s.state.atBoundary() {
		s.closeLocked(s.times.closing)
	}
	return nil
}

// ReadFrom sends an event stream through Write, so that nothing bypasses the
// gateway; other responses keep the underlying writer's fast path.
func (s *stream) ReadFrom(r io.Reader) (int64, error) {
	if !s.wroteHeader {
		s.WriteHeader(http.StatusOK)
	}
	if s.mode == passThrough {
		return s.ResponseWriterWrapper.ReadFrom(r)
	}
	return io.Copy(struct{ io.Writer }{s}, r)
}

// FlushError flushes a response the gateway does not manage. An event
// stream needs no flushing from outside: each write is flushed as it is made.
func (s *stream) FlushError() error {
	if s.mode != passThrough {
		return nil
	}
	//nolint:bodyclose
	return http.NewResponseController(s.ResponseWriter).Flush()
}

// writeLocked writes a then b to the client and flushes them. It reports
// whether that worked; if not, the stream is over and the upstream is
// cancelled.
func (s *stream) writeLocked(a, b []byte) bool {
	if s.cutting.Load() {
		s.failLocked(errCut)
		return false
	}
	var err error
	written := 0
	for _, p := range [2][]byte{a, b} {
		if len(p) > 0 && err == nil {
			var n int
			n, err = s.ResponseWriter.Write(p)
			written += n
		}
	}
	if written > 0 {
		s.bytesOut += int64(written)
		sseMetrics.bytes.Add(float64(written))
	}
	if err == nil {
		err = s.rc.Flush()
	}
	if err != nil {
		s.failLocked(err)
		return false
	}
	s.clientActiveLocked(s.h.clock.Now())
	return true
}

// failLocked ends the stream after a failed write to the client.
func (s *stream) failLocked(err error) {
	s.markClientGone()
	reason := reasonClientGone
	switch {
	case s.cutting.Load():
		reason = reasonDrain
		if s.cutSlow.Load() {
			reason = reasonSlowClient
		}
	case errors.Is(err, os.ErrDeadlineExceeded):
		reason = reasonWriteTimeout
	}
	s.endLocked(reason, errClientGone)
}

// stopLocked is how the gateway ends a request for reason, wherever it
// stands: one still waiting for its header is refused; a stream between
// events gets the close sequence now; inside an event, the close waits
// for the event's end (up to write_timeout, see idle.go).
func (s *stream) stopLocked(reason endReason, now time.Duration) {
	switch {
	case s.mode == waiting:
		s.refuseLocked(reason)
	case s.mode == opaque:
		s.endLocked(reason, errGatewayClosed)
	case s.state.atBoundary():
		s.closeLocked(reason)
	case reason == reasonIdleTimeout:
		// A silent upstream will not finish its event: end without adding
		// anything, so the client discards the unfinished event.
		s.endLocked(reason, errGatewayClosed)
	default:
		s.times.closing, s.times.closingSince = reason, now
	}
}

// closeLocked ends the stream at an event boundary with the close sequence:
// the retry hint and the close event, as configured.
func (s *stream) closeLocked(reason endReason) {
	retry := time.Duration(s.h.Retry)
	if reason == reasonUpstreamError && retry > 0 {
		// Only a shared stream whose upstream gave up closes its clients
		// for this, all at once: they must not all come back together.
		retry = s.h.jitteredRetry()
	}
	if seq := closeSequence(retry, s.h.CloseEvent, reason); len(seq) > 0 {
		if !s.writeLocked(nil, seq) {
			return
		}
		s.state.wroteAtBoundary()
		s.closeSent = true
	}
	s.endLocked(reason, errGatewayClosed)
}

// closeSequence is what the gateway sends at an event boundary before it
// ends a response: `retry:` when retry is set, the close event when
// closeEvent is, and the blank line that dispatches them.
func closeSequence(retry time.Duration, closeEvent string, reason endReason) []byte {
	var seq []byte
	if retry > 0 {
		seq = append(seq, "retry: "...)
		seq = strconv.AppendInt(seq, retry.Milliseconds(), 10)
		seq = append(seq, '\n')
	}
	if closeEvent != "" {
		seq = append(seq, "event: "+closeEvent+"\ndata: "+string(reason)+"\n"...)
	}
	if len(seq) > 0 {
		seq = append(seq, '\n')
	}
	return seq
}

// endLocked marks the request over for reason and releases the upstream.
func (s *stream) endLocked(reason endReason, cause error) {
	if s.closed {
		return
	}
	s.closed = true
	s.reason = reason
	s.cancelUpstream(cause)
}

// errCut is the error of a write the drain's hard stop refused.
var errCut = errors.New("sse: stream cut at the end of the drain window")

// cut ends the request at once, from any goroutine, even while a write to
// a client that stopped reading holds the stream: the upstream is released
// and the server's own writer gets a write deadline in the past, which
// fails the write in flight. reason is reasonDrain for the drain's hard
// stop (what is still open after the drain window), or reasonSlowClient for
// a shared stream's client that fell too far behind.
func (s *stream) cut(reason endReason) {
	if reason == reasonSlowClient {
		s.cutSlow.Store(true)
	}
	s.cutting.Store(true)
	s.cancelUpstream(errGatewayClosed)
	if d, ok := s.base.(interface{ SetWriteDeadline(time.Time) error }); ok {
		_ = d.SetWriteDeadline(time.Unix(1, 0))
	}
}

// end finishes a stream once the next handler has returned: after it, no
// write reaches the client and no timer of the stream is left.
func (s *stream) end(err error, panicked any) error {
	reason := s.finish(panicked != nil)
	if panicked != nil && panicked != http.ErrAbortHandler {
		panic(panicked)
	}
	// A drain does not wait for the client: the server is going away.
	if s.closeSent && s.h.CloseGrace > 0 && reason != reasonDrain {
		s.awaitClientClose(time.Duration(s.h.CloseGrace))
	}
	s.report(reason, err)
	// A stream whose client could not be written to returns too, rather
	// than panicking with http.ErrAbortHandler: its placeholders must reach
	// log_append, which runs after this handler returns. The server drops
	// the connection by itself, since the failed write marked it broken.
	return nil
}

// finish settles the stream's reason and releases everything it holds.
func (s *stream) finish(upstreamFailed bool) endReason {
	s.mu.Lock()
	if !s.closed {
		switch {
		case s.cutting.Load():
			// The drain's hard stop cancelled the upstream.
			s.reason = reasonDrain
			if s.cutSlow.Load() {
				s.reason = reasonSlowClient
			}
		case s.req.Context().Err() != nil:
			s.reason = reasonClientGone
		case upstreamFailed || s.decoder != nil && s.decoder.err != nil:
			s.reason = reasonUpstreamError
		default:
			s.reason = reasonUpstreamEnd
			// Bytes held back as a possible BOM, or a possible retry line,
			// were data after all.
			if s.state.bomMatched > 0 && s.state.bomMatched < bomDone {
				s.writeLocked(nil, utf8BOM[:s.state.bomMatched])
			}
			if s.retries != nil {
				if held := s.retries.flush(); len(held) > 0 {
					s.writeLocked(nil, held)
				}
			}
		}
		s.closed = true
	}
	s.stopClockLocked()
	if s.restoreWriteTimeout != nil {
		s.restoreWriteTimeout()
	}
	if s.ownDeadlineWriter != nil {
		s.ownDeadlineWriter.HandlerDone()
	}
	if s.userTimeout {
		// A keep-alive or HTTP/2 connection goes on without the stream's.
		restoreClientTimeout(s.req.Context())
		s.userTimeout = false
	}
	s.mu.Unlock()
	s.times.callbacks.Wait()
	s.h.streams.remove(s)

	sseMetrics.active.Dec()
	sseMetrics.ended.WithLabelValues(string(s.reason)).Inc()
	s.h.streams.countEnded(s.reason)
	sseMetrics.duration.Observe(s.age().Seconds())
	if gone := s.clientGoneAt.Load(); gone != 0 {
		sseMetrics.teardown.Observe(time.Since(time.Unix(0, gone)).Seconds())
	}
	return s.reason
}

// The placeholders a stream answers on the request's replacer once it has
// ended, for access logs (log_append) and anything else that runs after it.
const placeholderPrefix = "http.sse."

// placeholder answers {http.sse.*}. It is evaluated only when something
// asks, so a stream whose account nobody logs costs nothing for it.
func (s *stream) placeholder(key string) (any, bool) {
	name, ok := strings.CutPrefix(key, placeholderPrefix)
	if !ok {
		return nil, false
	}
	switch name {
	case "close_reason":
		return string(s.reason), true
	case "events":
		return s.state.events, true
	case "bytes":
		return s.bytesOut, true
	case "heartbeats":
		return s.heartbeats, true
	case "duration":
		return s.duration, true
	case "last_event_id":
		if id, known := s.state.lastID(); known {
			return string(id), true
		}
	}
	return nil, false
}

// report leaves the stream's account behind: the placeholders, and one
// debug line, or a warning when the upstream broke the stream.
//
// reverse_proxy warns "aborting with incomplete response" for every stream
// that does not end by its upstream's clean end, the gateway's own closes
// and clients that left included; its API has no quiet way to end a
// stream. Operators who drop that warning (README, "Running in
// production") still see the upstream failures here, the one case that
// needs their attention.
func (s *stream) report(reason endReason, err error) {
	s.duration = s.age()
	repl, _ := s.req.Context().Value(caddy.ReplacerCtxKey).(*caddy.Replacer)
	if repl != nil {
		repl.Map(s.placeholder)
	}
	level, msg := zapcore.DebugLevel, "stream ended"
	if reason == reasonUpstreamError && !s.shared { // a shared stream's hub warns once for all its clients
		level, msg = zapcore.WarnLevel, "upstream broke the stream"
	}
	c := s.h.logger.Check(level, msg)
	if c == nil {
		return
	}
	fields := []zap.Field{
		zap.String("uri", s.req.RequestURI),
		zap.String("client_ip", clientIP(s.req)),
		zap.String("reason", string(reason)),
		zap.Duration("duration", s.duration),
		zap.Int64("events", s.state.events),
		zap.Int64("bytes", s.bytesOut),
		zap.Int64("heartbeats", s.heartbeats),
	}
	if id, known := s.state.lastID(); known {
		fields = append(fields, zap.ByteString("last_event_id", id))
	}
	if err != nil {
		fields = append(fields, zap.Error(err))
	}
	if s.decoder != nil && s.decoder.err != nil {
		fields = append(fields, zap.NamedError("decoding", s.decoder.err))
	}
	if reason == reasonUpstreamError && repl != nil {
		if upstream, ok := repl.GetString("http.reverse_proxy.upstream.hostport"); ok {
			fields = append(fields, zap.String("upstream", upstream))
		}
	}
	c.Write(fields...)
}

// Interface guards
var (
	_ http.ResponseWriter = (*stream)(nil)
	_ io.ReaderFrom       = (*stream)(nil)
)
