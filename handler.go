// Package caddysse is a Caddy HTTP handler that makes legacy Server-Sent
// Events producers behave: it forwards every event at once, keeps quiet
// streams alive with heartbeat comments, ends idle and over-aged streams
// cleanly with a reconnect hint, and tears the upstream down as soon as the
// client is gone.
package caddysse

import (
	"context"
	"errors"
	"fmt"
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

func init() {
	caddy.RegisterModule(Handler{})
}

// Handler sits in front of a handler that produces Server-Sent Events,
// normally `reverse_proxy` to a legacy SSE server, and makes the stream
// well-behaved: no buffering, heartbeat comments while the stream is quiet
// (only between events), an idle limit and a maximum lifetime that end the
// stream at an event boundary with a reconnect hint, and the upstream request
// cancelled as soon as the client is gone or stops reading.
//
// Only a 200 response whose Content-Type is `text/event-stream` is treated as
// a stream; any other response passes through untouched.
type Handler struct {
	// Heartbeat is how long the client may receive nothing before the
	// gateway writes a comment line (and a blank line) to keep the
	// connection and every proxy and load balancer on its path from timing
	// out. Heartbeats are only written between events. Default: 15s. A
	// negative value disables heartbeats.
	Heartbeat caddy.Duration `json:"heartbeat,omitempty"`

	// HeartbeatText is written after the colon of each heartbeat comment.
	// It may not contain CR or LF. Default: empty, so a heartbeat is ":\n\n".
	HeartbeatText string `json:"heartbeat_text,omitempty"`

	// IdleTimeout ends a stream whose upstream has sent nothing for this
	// long. Heartbeats do not count as upstream activity. Default: 0, which
	// disables the idle limit.
	IdleTimeout caddy.Duration `json:"idle_timeout,omitempty"`

	// MaxLifetime ends a stream after at most this long, so that clients
	// reconnect (with Last-Event-ID) and long-lived streams do not pin old
	// configurations, upstreams or connections. Each stream's lifetime is
	// drawn at random from [(1 - LifetimeJitter) × MaxLifetime, MaxLifetime].
	// Default: 0, which disables the limit.
	MaxLifetime caddy.Duration `json:"max_lifetime,omitempty"`

	// LifetimeJitter is the fraction of MaxLifetime by which a stream's
	// lifetime may be shortened at random, so that reconnects do not arrive
	// all at once. Between 0 and 1. Default: 0.1.
	LifetimeJitter *float64 `json:"lifetime_jitter,omitempty"`

	// Retry, when set, is sent as the event stream's `retry` field (in
	// milliseconds) before the gateway closes a stream itself, telling the
	// client how long to wait before reconnecting. Default: 0, which sends
	// no retry field.
	Retry caddy.Duration `json:"retry,omitempty"`

	// CloseEvent, when set, is the type of an event sent before the gateway
	// closes a stream itself; its data is the reason (idle_timeout or
	// max_lifetime). Clients can listen for it to close instead of
	// reconnecting. It may not contain CR or LF. Default: empty, which sends
	// no close event.
	CloseEvent string `json:"close_event,omitempty"`

	// CloseGrace is how long, after the close sequence, the gateway waits
	// for the client to hang up on its own before it ends the response.
	// The upstream is released at once either way. Default: 0, which ends
	// the response right after the close sequence.
	CloseGrace caddy.Duration `json:"close_grace,omitempty"`

	// WriteTimeout bounds every write to the client. A client that does not
	// take the bytes in time (it stopped reading, or vanished) ends the
	// stream and its upstream. On Linux it also bounds how long written data
	// may stay unacknowledged by the client (TCP_USER_TIMEOUT), which is how
	// a client that vanished without closing is noticed. Default: 10s.
	WriteTimeout caddy.Duration `json:"write_timeout,omitempty"`

	// DrainWindow spreads the end of live streams when the server they
	// belong to shuts down (a config reload or Caddy stopping) or the
	// handler is unloaded: each stream closes through the close sequence at
	// a random moment within this window, so clients reconnect to the new
	// config gradually instead of all at once, and the reload or stop can
	// finish even with an unlimited grace period. Default: 10s.
	DrainWindow caddy.Duration `json:"drain_window,omitempty"`

	// MaxStreams caps the streams this handler serves at once, to protect
	// an upstream that holds a thread per stream. A request that asks for
	// an event stream (its Accept header includes text/event-stream) beyond
	// the cap is refused with 503 before the upstream is contacted. Default:
	// 0, no limit.
	MaxStreams int `json:"max_streams,omitempty"`

	// MaxStreamsPerClient caps the streams one client IP (as Caddy
	// determines it, honouring trusted_proxies) may have open through this
	// handler. Beyond it, stream requests are refused with 429. Default: 0,
	// no limit.
	MaxStreamsPerClient int `json:"max_streams_per_client,omitempty"`

	// LastEventIDQuery names a query parameter that carries the last event
	// ID for clients that cannot send the Last-Event-ID header (polyfills,
	// or a new EventSource object resuming a stream). The parameter is
	// removed from the request, and its value becomes the Last-Event-ID
	// header unless the request has one. A value over 1 KiB or with CR, LF
	// or NUL is refused with 400. Default: empty, disabled.
	LastEventIDQuery string `json:"last_event_id_query,omitempty"`

	heartbeatLine []byte // ":" + HeartbeatText + "\n\n"
	jitter        float64
	streams       *streamSet
	clock         clock
	logger        *zap.Logger
	warnEncoded   *sync.Once // logs the compressed-upstream warning once
}

// Defaults of the options that have one.
const (
	defaultHeartbeat      = 15 * time.Second
	defaultWriteTimeout   = 10 * time.Second
	defaultLifetimeJitter = 0.1
	defaultDrainWindow    = 10 * time.Second
	// defaultRetryAfter is the Retry-After of a refused stream when no
	// retry hint is configured.
	defaultRetryAfter = 10 * time.Second
)

// CaddyModule returns the Caddy module information.
func (Handler) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "http.handlers.sse",
		New: func() caddy.Module { return new(Handler) },
	}
}

// Provision sets up the handler.
func (h *Handler) Provision(ctx caddy.Context) error {
	h.logger = ctx.Logger()
	if h.Heartbeat == 0 {
		h.Heartbeat = caddy.Duration(defaultHeartbeat)
	}
	if h.WriteTimeout == 0 {
		h.WriteTimeout = caddy.Duration(defaultWriteTimeout)
	}
	if h.DrainWindow == 0 {
		h.DrainWindow = caddy.Duration(defaultDrainWindow)
	}
	h.jitter = defaultLifetimeJitter
	if h.LifetimeJitter != nil {
		h.jitter = *h.LifetimeJitter
	}
	h.heartbeatLine = []byte(":" + h.HeartbeatText + "\n\n")
	h.warnEncoded = new(sync.Once)
	if h.clock == nil {
		h.clock = realClock{}
	}
	h.streams = newStreamSet()
	if srv, ok := ctx.Value(caddyhttp.ServerCtxKey).(*caddyhttp.Server); ok {
		srv.RegisterConnContext(withConn)
		srv.RegisterOnShutdown(h.drain)
	}
	return initMetrics(ctx.GetMetricsRegistry())
}

// Validate ensures the handler's configuration is valid.
func (h *Handler) Validate() error {
	for _, d := range []struct {
		name  string
		value caddy.Duration
	}{
		{"idle_timeout", h.IdleTimeout},
		{"max_lifetime", h.MaxLifetime},
		{"retry", h.Retry},
		{"close_grace", h.CloseGrace},
		{"write_timeout", h.WriteTimeout},
		{"drain_window", h.DrainWindow},
	} {
		if d.value < 0 {
			return fmt.Errorf("%s: must not be negative, got %s", d.name, time.Duration(d.value))
		}
	}
	if j := h.LifetimeJitter; j != nil && !(*j >= 0 && *j <= 1) {
		return fmt.Errorf("lifetime_jitter: must be between 0 and 1, got %v", *j)
	}
	if h.MaxStreams < 0 {
		return fmt.Errorf("max_streams: must not be negative, got %d", h.MaxStreams)
	}
	if h.MaxStreamsPerClient < 0 {
		return fmt.Errorf("max_streams_per_client: must not be negative, got %d", h.MaxStreamsPerClient)
	}
	if strings.ContainsAny(h.HeartbeatText, "\r\n") {
		return fmt.Errorf("heartbeat_text: must not contain CR or LF")
	}
	if strings.ContainsAny(h.CloseEvent, "\r\n") {
		return fmt.Errorf("close_event: must not contain CR or LF")
	}
	return nil
}

// Cleanup drains the streams still open when the handler is unloaded.
func (h *Handler) Cleanup() error {
	h.drain()
	return nil
}

// drain closes every live stream within the drain window.
func (h *Handler) drain() {
	if h.streams != nil {
		h.streams.drain(time.Duration(h.DrainWindow))
	}
}

// ServeHTTP passes the request on to next, with a writer that takes over the
// response if it turns out to be an event stream.
func (h *Handler) ServeHTTP(w http.ResponseWriter, r *http.Request, next caddyhttp.Handler) error {
	if h.LastEventIDQuery != "" {
		if err := h.lastEventIDFromQuery(r); err != nil {
			return err
		}
	}
	if wantsStream(r) && (h.MaxStreams > 0 || h.MaxStreamsPerClient > 0) {
		client := clientIP(r)
		if limit := h.streams.acquire(client, h.MaxStreams, h.MaxStreamsPerClient); limit != "" {
			return h.refuse(w, limit, client)
		}
		defer h.streams.release(client)
	}
	// The gateway must read the upstream's events to find their boundaries,
	// so the upstream has to answer uncompressed; `encode` can still
	// compress toward the client. Removing the header would not do: Go's
	// transport then asks for gzip on its own. (Overwriting the value the
	// client sent, as browsers do, allocates nothing.)
	if ae := r.Header["Accept-Encoding"]; len(ae) > 0 {
		ae[0] = "identity"
		r.Header["Accept-Encoding"] = ae[:1]
	} else {
		r.Header.Set("Accept-Encoding", "identity")
	}

	// The next handler gets a context the gateway can end. The client's
	// leaving ends it too, through one callback that also times it: one
	// registration on the request's context instead of two.
	ctx, cancel := context.WithCancelCause(context.WithoutCancel(r.Context()))
	defer cancel(nil)
	sw := &streamWriter{
		ResponseWriterWrapper: &caddyhttp.ResponseWriterWrapper{ResponseWriter: w},
		h:                     h,
		req:                   r,
		cancelUpstream:        cancel,
	}
	defer context.AfterFunc(r.Context(), sw.clientGone)()
	return sw.serve(next, r.WithContext(ctx))
}

// endReason says why a stream ended. It is logged and sent as the data of
// the close event.
type endReason string

const (
	reasonClientGone    endReason = "client_gone"
	reasonUpstreamEnd   endReason = "upstream_end"
	reasonUpstreamError endReason = "upstream_error"
	reasonIdleTimeout   endReason = "idle_timeout"
	reasonMaxLifetime   endReason = "max_lifetime"
	reasonWriteTimeout  endReason = "write_timeout"
	reasonDrain         endReason = "drain"
)

var allReasons = []endReason{reasonClientGone, reasonUpstreamEnd, reasonUpstreamError,
	reasonIdleTimeout, reasonMaxLifetime, reasonWriteTimeout, reasonDrain}

var (
	// errStreamClosed is returned to the next handler's writes once the
	// stream is over.
	errStreamClosed = errors.New("sse: stream closed")
	// errGatewayClosed is the cause given to the upstream request's context
	// when the gateway ends a stream itself.
	errGatewayClosed = errors.New("sse: stream closed by the gateway")
	// errClientGone is the cause given when a write to the client failed.
	errClientGone = errors.New("sse: client gone")
)

// streamWriter is the response writer handed to the next handler. Until the
// response's header is written it only watches; for an event stream it then
// forwards every write at once under a write deadline, tracks the client's
// parser state, and adds heartbeats and the close sequence at event
// boundaries. Everything that writes to the client holds mu, so heartbeats
// and upstream data never interleave within a write.
type streamWriter struct {
	*caddyhttp.ResponseWriterWrapper
	h              *Handler
	req            *http.Request // as received; its context ends when the client is gone
	cancelUpstream context.CancelCauseFunc
	rc             *http.ResponseController

	wroteHeader bool
	engaged     bool // the response is an event stream the gateway manages

	mu     sync.Mutex
	state  eventState
	closed bool      // nothing more may be written to the client
	reason endReason // why the stream ended, once known
	// closeSent is true once the close sequence reached the client.
	closeSent bool
	// writeFailed is true when the client could not be written to.
	writeFailed bool
	noDeadline  bool // the underlying writer cannot take write deadlines
	// deadline is the write deadline armed on the connection, if any (see
	// armWriteDeadline); clearIdleDeadline is true over HTTP/2, where the
	// timer must clear it before an idle stream would be reset.
	deadline          time.Time
	clearIdleDeadline bool

	times streamTimes

	bytesOut   int64
	heartbeats int64

	// clientGoneAt is when the client was found gone (Unix ns), so the
	// teardown that follows can be timed.
	clientGoneAt atomic.Int64
}

// serve runs the next handler and ends the stream it produced, if any.
func (sw *streamWriter) serve(next caddyhttp.Handler, r *http.Request) error {
	err, aborted := sw.runNext(next, r)
	if !sw.engaged {
		if aborted != nil {
			panic(aborted)
		}
		return err
	}
	// reverse_proxy panics with http.ErrAbortHandler when the stream breaks
	// after the header was sent: the upstream failed, the client went away,
	// or the gateway itself cancelled the upstream to close the stream.
	// Those are all ends this handler accounts for; anything else is a bug
	// elsewhere and propagates after the stream is cleaned up.
	failed := aborted != nil
	reason := sw.finish(failed)
	if aborted != nil && aborted != http.ErrAbortHandler {
		panic(aborted)
	}
	if sw.closeSent && sw.h.CloseGrace > 0 {
		sw.awaitClientClose(time.Duration(sw.h.CloseGrace))
	}
	sw.logEnd(reason, err)
	if sw.writeFailed {
		// The client cannot be written to: do not try to finish the
		// response, drop the connection.
		panic(http.ErrAbortHandler)
	}
	return nil
}

// runNext calls next and recovers a panic it raises.
func (sw *streamWriter) runNext(next caddyhttp.Handler, r *http.Request) (err error, aborted any) {
	defer func() { aborted = recover() }()
	return next.ServeHTTP(sw, r), nil
}

// WriteHeader decides whether the response is an event stream and, if so,
// prepares it for streaming and sends the header at once.
func (sw *streamWriter) WriteHeader(status int) {
	if sw.wroteHeader || (status >= 100 && status <= 199) {
		sw.ResponseWriter.WriteHeader(status)
		return
	}
	sw.wroteHeader = true
	if status == http.StatusOK && sw.req.Method != http.MethodHead && isEventStream(sw.Header()) {
		if enc := sw.Header().Get("Content-Encoding"); enc != "" && !strings.EqualFold(enc, "identity") {
			sw.h.warnEncoded.Do(func() {
				sw.h.logger.Warn("upstream compressed an event stream; passing it through without heartbeats or closes",
					zap.String("content_encoding", enc))
			})
		} else {
			sw.engage(status)
			return
		}
	}
	sw.ResponseWriter.WriteHeader(status)
}

// isEventStream reports whether the response's Content-Type is
// text/event-stream, the same test reverse_proxy uses to flush at once.
func isEventStream(header http.Header) bool {
	mediaType, _, err := mime.ParseMediaType(header.Get("Content-Type"))
	return err == nil && mediaType == "text/event-stream"
}

// engage takes over an event-stream response: it sets the headers that keep
// intermediaries from buffering, sends the header at once and starts the
// stream's clock.
func (sw *streamWriter) engage(status int) {
	header := sw.Header()
	header.Set("X-Accel-Buffering", "no")
	if header.Get("Cache-Control") == "" {
		header.Set("Cache-Control", "no-cache")
	}
	header.Del("Content-Length")
	sw.engaged = true
	sw.rc = http.NewResponseController(sw.ResponseWriter)
	sw.clearIdleDeadline = sw.req.ProtoMajor == 2
	sw.state = newEventState()
	setClientTimeout(sw.req.Context(), time.Duration(sw.h.WriteTimeout))

	sw.mu.Lock()
	sw.ResponseWriter.WriteHeader(status)
	started := sw.writeLocked(nil, nil)
	if started {
		sw.startClockLocked()
	}
	sw.mu.Unlock()
	sseMetrics.active.Inc()
	if started && sw.h.streams.add(sw) {
		sw.drainWithin(time.Duration(sw.h.DrainWindow))
	}
}

// clientGone releases the upstream when the client has gone away.
func (sw *streamWriter) clientGone() {
	sw.markClientGone()
	sw.cancelUpstream(errClientGone)
}

// markClientGone records when the client was found gone, for the teardown
// latency.
func (sw *streamWriter) markClientGone() {
	sw.clientGoneAt.CompareAndSwap(0, time.Now().UnixNano())
}

// Write forwards upstream bytes to the client at once. It returns an error
// once the stream is over, which makes the next handler stop.
func (sw *streamWriter) Write(p []byte) (int, error) {
	if !sw.wroteHeader {
		sw.WriteHeader(http.StatusOK)
	}
	if !sw.engaged {
		return sw.ResponseWriter.Write(p)
	}
	sw.mu.Lock()
	defer sw.mu.Unlock()
	if sw.closed {
		return 0, errStreamClosed
	}
	prefix, rest := sw.state.takeBOM(p, sw.bytesOut > 0)
	if sw.times.closing != "" {
		// A close is waiting for the event in flight to end: forward up to
		// the boundary, close there and drop the rest.
		rest = rest[:sw.state.scan(rest, true)]
		if !sw.writeLocked(prefix, rest) {
			return 0, errClientGone
		}
		sw.upstreamActiveLocked()
		if sw.state.atBoundary() {
			sw.closeLocked(sw.times.closing)
		}
		return len(p), nil
	}
	events := sw.state.events
	sw.state.scan(rest, false)
	if !sw.writeLocked(prefix, rest) {
		return 0, errClientGone
	}
	sw.upstreamActiveLocked()
	if n := sw.state.events - events; n > 0 {
		sseMetrics.events.Add(float64(n))
	}
	return len(p), nil
}

// ReadFrom sends an event stream through Write, so that nothing bypasses the
// gateway; other responses keep the underlying writer's fast path.
func (sw *streamWriter) ReadFrom(r io.Reader) (int64, error) {
	if !sw.wroteHeader {
		sw.WriteHeader(http.StatusOK)
	}
	if !sw.engaged {
		return sw.ResponseWriterWrapper.ReadFrom(r)
	}
	return io.Copy(struct{ io.Writer }{sw}, r)
}

// FlushError flushes a response the gateway does not manage. An event
// stream needs no flushing from outside: each write is flushed as it is made.
func (sw *streamWriter) FlushError() error {
	if sw.engaged {
		return nil
	}
	//nolint:bodyclose
	return http.NewResponseController(sw.ResponseWriter).Flush()
}

// writeLocked writes a then b to the client and flushes them, all under
// the write deadline. It reports whether that worked; if not, the stream is
// over and the upstream is cancelled.
func (sw *streamWriter) writeLocked(a, b []byte) bool {
	now := sw.h.clock.Now()
	sw.armWriteDeadline(now)
	var err error
	written := 0
	for _, p := range [2][]byte{a, b} {
		if len(p) > 0 && err == nil {
			var n int
			n, err = sw.ResponseWriter.Write(p)
			written += n
		}
	}
	if written > 0 {
		sw.bytesOut += int64(written)
		sseMetrics.bytes.Add(float64(written))
	}
	if err == nil {
		err = sw.rc.Flush()
	}
	if err != nil {
		sw.failLocked(err)
		return false
	}
	sw.clientActiveLocked(now)
	return true
}

// failLocked ends the stream after a failed write to the client.
func (sw *streamWriter) failLocked(err error) {
	sw.writeFailed = true
	sw.markClientGone()
	reason := reasonClientGone
	if errors.Is(err, os.ErrDeadlineExceeded) {
		reason = reasonWriteTimeout
	}
	sw.endLocked(reason, errClientGone)
}

// closeLocked ends the stream at an event boundary with the close sequence:
// the retry hint and the close event, as configured.
func (sw *streamWriter) closeLocked(reason endReason) {
	var seq []byte
	if sw.h.Retry > 0 {
		seq = append(seq, "retry: "...)
		seq = strconv.AppendInt(seq, time.Duration(sw.h.Retry).Milliseconds(), 10)
		seq = append(seq, '\n')
	}
	if sw.h.CloseEvent != "" {
		seq = append(seq, "event: "+sw.h.CloseEvent+"\ndata: "+string(reason)+"\n"...)
	}
	if len(seq) > 0 {
		seq = append(seq, '\n')
		if !sw.writeLocked(nil, seq) {
			return
		}
		sw.state.wroteAtBoundary()
		sw.closeSent = true
	}
	sw.endLocked(reason, errGatewayClosed)
}

// endLocked marks the stream over for reason and releases the upstream.
func (sw *streamWriter) endLocked(reason endReason, cause error) {
	if sw.closed {
		return
	}
	sw.closed = true
	sw.reason = reason
	sw.cancelUpstream(cause)
}

// finish ends the stream once the next handler has returned: after it, no
// write reaches the client and no timer of the stream is left.
func (sw *streamWriter) finish(upstreamFailed bool) endReason {
	sw.mu.Lock()
	if !sw.closed {
		switch {
		case sw.req.Context().Err() != nil:
			sw.reason = reasonClientGone
		case upstreamFailed:
			sw.reason = reasonUpstreamError
		default:
			sw.reason = reasonUpstreamEnd
			// Bytes held back as a possible BOM were data after all.
			if sw.state.bomMatched > 0 && sw.state.bomMatched < bomDone {
				sw.writeLocked(nil, utf8BOM[:sw.state.bomMatched])
			}
		}
		sw.closed = true
	}
	if !sw.writeFailed && !sw.deadline.IsZero() {
		// The connection may carry more requests: leave it no deadline.
		sw.setWriteDeadline(time.Time{})
	}
	sw.stopClockLocked()
	sw.mu.Unlock()
	sw.times.callbacks.Wait()
	sw.h.streams.remove(sw)

	sseMetrics.active.Dec()
	sseMetrics.ended.WithLabelValues(string(sw.reason)).Inc()
	sseMetrics.duration.Observe(sw.age().Seconds())
	if gone := sw.clientGoneAt.Load(); gone != 0 {
		sseMetrics.teardown.Observe(time.Since(time.Unix(0, gone)).Seconds())
	}
	return sw.reason
}

// logEnd writes the one debug line a stream leaves behind.
func (sw *streamWriter) logEnd(reason endReason, err error) {
	c := sw.h.logger.Check(zapcore.DebugLevel, "stream ended")
	if c == nil {
		return
	}
	fields := []zap.Field{
		zap.String("uri", sw.req.RequestURI),
		zap.String("client_ip", clientIP(sw.req)),
		zap.String("reason", string(reason)),
		zap.Duration("duration", sw.age()),
		zap.Int64("events", sw.state.events),
		zap.Int64("bytes", sw.bytesOut),
		zap.Int64("heartbeats", sw.heartbeats),
	}
	if id, known := sw.state.lastID(); known {
		fields = append(fields, zap.ByteString("last_event_id", id))
	}
	if err != nil {
		fields = append(fields, zap.Error(err))
	}
	c.Write(fields...)
}

// Interface guards
var (
	_ caddy.Provisioner           = (*Handler)(nil)
	_ caddy.Validator             = (*Handler)(nil)
	_ caddy.CleanerUpper          = (*Handler)(nil)
	_ caddyhttp.MiddlewareHandler = (*Handler)(nil)
	_ http.ResponseWriter         = (*streamWriter)(nil)
	_ io.ReaderFrom               = (*streamWriter)(nil)
)
