// Package caddysse is a Caddy HTTP handler that makes legacy Server-Sent
// Events producers behave: it forwards every event at once, keeps quiet
// streams alive with heartbeat comments, ends idle and over-aged streams
// cleanly with a reconnect hint, and tears the upstream down as soon as the
// client is gone. Requests it refuses get an answer a browser's EventSource
// survives.
package caddysse

import (
	"encoding/json"
	"fmt"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"go.uber.org/zap"
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
// Every request it passes on is accounted for from the moment it arrives:
// the wait for the upstream's header counts against the idle limit and is
// reached by draining. A 200 response whose Content-Type is
// `text/event-stream` is a stream (decoded first if the upstream compressed
// it); any other response passes through untouched.
type Handler struct {
	// Heartbeat is how long the client may receive nothing before the
	// gateway writes a comment line (and a blank line) to keep the
	// connection and every proxy and load balancer on its path from timing
	// out. Heartbeats are only written between events. Default: 15s, when
	// the field is left out (0 in Go). "off" (in JSON also any negative
	// duration) disables heartbeats. An explicit 0 is refused as ambiguous.
	Heartbeat caddy.Duration `json:"heartbeat,omitempty"`

	// HeartbeatText is written after the colon of each heartbeat comment.
	// It may not contain CR or LF. Default: empty, so a heartbeat is ":\n\n".
	HeartbeatText string `json:"heartbeat_text,omitempty"`

	// IdleTimeout ends a stream whose upstream has sent nothing for this
	// long. Heartbeats do not count as upstream activity. It also bounds the
	// wait for the upstream's response header: past it the upstream request
	// is cancelled, and the client gets a refusal (reason upstream_timeout)
	// if it asked for a stream, 504 otherwise. Default: 0, which disables
	// the idle limit.
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
	// closes or refuses a stream itself; its data is the reason (for
	// example idle_timeout, max_lifetime or max_streams). Clients can listen for it to close instead of
	// reconnecting. It may not contain CR or LF. Default: empty, which sends
	// no close event.
	CloseEvent string `json:"close_event,omitempty"`

	// CloseGrace is how long, after the close sequence, the gateway waits
	// for the client to hang up on its own before it ends the response.
	// The upstream is released at once either way. Default: 0, which ends
	// the response right after the close sequence.
	CloseGrace caddy.Duration `json:"close_grace,omitempty"`

	// WriteTimeout bounds every write to the client, through the write
	// deadline Caddy's server already keeps per write (its
	// write_idle_timeout, which this tightens for the stream). A client that
	// does not take the bytes in time (it stopped reading, or vanished) ends
	// the stream and its upstream. On Linux it also bounds how long written data
	// may stay unacknowledged by the client (TCP_USER_TIMEOUT), which is how
	// a client that vanished without closing is noticed; the socket gets
	// its own value back when the last stream on the connection ends. It
	// is also how long a close waits for the event in flight to end.
	// Default: 10s, when the field is left out (0 in Go). "off" (in JSON
	// also any negative duration) leaves writes to Caddy's own write
	// deadline, as the server has it (write_idle_timeout), and sets no
	// TCP_USER_TIMEOUT: a client that vanished is then noticed only when
	// the kernel gives up on it, about 15 minutes on Linux, and with the
	// server's write_idle_timeout off too, a client that stopped reading
	// holds its stream until a drain cuts it. A close still waits at most
	// 10s for the event in flight. An explicit 0 is refused as ambiguous.
	WriteTimeout caddy.Duration `json:"write_timeout,omitempty"`

	// DrainWindow spreads the end of live streams when the server they
	// belong to shuts down (a config reload or Caddy stopping) or the
	// handler is unloaded: each stream closes through the close sequence at
	// a random moment within this window, and each request still waiting
	// for its upstream's header is cancelled and refused (reason drain), so
	// clients reconnect to the new config gradually instead of all at once,
	// and the reload or stop can finish even with an unlimited grace
	// period. Whatever is still open half a second after the window (a
	// client that stopped reading) is cut. Default: 10s, when the field is
	// left out (0 in Go). "off" (in JSON also any negative duration)
	// closes every stream at once when the server drains, with no
	// spreading; what is still open half a second later is cut. An
	// explicit 0 is refused as ambiguous.
	DrainWindow caddy.Duration `json:"drain_window,omitempty"`

	// MaxStreams caps the streams this handler serves at once, to protect
	// an upstream that holds a thread per stream. Every response that turns
	// out to be an event stream counts. A request that asks for one (its
	// Accept header includes text/event-stream) beyond the cap is refused
	// before the upstream is contacted; any other request whose response
	// turns out to be a stream beyond the cap is refused at its header, and
	// its upstream released. See RefuseWith for how. Default: 0, no limit.
	MaxStreams int `json:"max_streams,omitempty"`

	// MaxStreamsPerClient caps the streams one client IP (as Caddy
	// determines it, honouring trusted_proxies) may have open through this
	// handler, counted and refused like MaxStreams. Default: 0, no limit.
	MaxStreamsPerClient int `json:"max_streams_per_client,omitempty"`

	// LastEventIDQuery names a query parameter that carries the last event
	// ID for clients that cannot send the Last-Event-ID header (polyfills,
	// or a new EventSource object resuming a stream). The parameter is
	// removed from the request, and its value becomes the Last-Event-ID
	// header unless the request has one. A value over 1 KiB, or one that
	// Go's transport would refuse as a header value (a control character
	// other than tab), is refused with 400. Default: empty, disabled.
	LastEventIDQuery string `json:"last_event_id_query,omitempty"`

	// RefuseWith is how a request that asked for a stream is turned away
	// (by a limit, a header wait past idle_timeout, or draining). "stream"
	// answers 200 text/event-stream with a `retry:` hint drawn between 1×
	// and 2× Retry (10s when Retry is off), the close event if CloseEvent
	// is set, and the end of the response: an EventSource reconnects by
	// itself later, whereas any other status makes it fail for good
	// (WHATWG HTML, server-sent events). "status" answers with a status
	// code instead, for API clients and monitoring: 503 for max_streams
	// and drain, 429 for max_streams_per_client, 504 for upstream_timeout.
	// Both carry Retry-After. Requests that did not ask for a stream always
	// get the status code. Default: "stream".
	RefuseWith string `json:"refuse_with,omitempty"`

	// RetryStatuses are the upstream statuses that a request which asked
	// for a stream gets a refusal for (see RefuseWith), with reason
	// upstream_status_<code>, instead of the status itself: a 502 from
	// reverse_proxy while the upstream restarts, or a 503 from an
	// overloaded one, would otherwise make every EventSource fail for
	// good. Each entry is a status code from 400 to 599, or a class, "4xx"
	// or "5xx". 204 always passes through: it tells an EventSource to
	// stop. Default: ["5xx", "429"]. ["off"] passes every status through.
	RetryStatuses []string `json:"retry_statuses,omitempty"`

	// MaxStreamRate caps how many new streams per second the handler lets
	// through to the upstream, so a legacy server is not flooded when every
	// tab comes back at once after a restart. Requests beyond it are
	// refused like those over MaxStreams, with reason max_stream_rate. A
	// burst of up to one second's worth is let through at once. Default:
	// 0, no cap.
	MaxStreamRate int `json:"max_stream_rate,omitempty"`

	// RetryBounds, when set, clamps every `retry:` value the upstream sends
	// to [min, max]: `retry: 0` on a stream that ends after each event
	// makes a reconnect storm, and a huge value parks clients for days.
	// Only valid retry lines are rewritten, at their end; the stream is
	// otherwise untouched. Two durations, min then max. Default: none,
	// since most servers send no retry and the upstream's value is its
	// own business until it misbehaves; `retry_bounds 1s 1m` suits most
	// legacy servers.
	RetryBounds []caddy.Duration `json:"retry_bounds,omitempty"`

	// Share, when set, shares one upstream request among all the clients
	// that ask for the same stream (see ShareConfig and share.go).
	// Default: unset, every client gets its own upstream request.
	Share *ShareConfig `json:"share,omitempty"`

	heartbeatLine []byte // ":" + HeartbeatText + "\n\n"
	retryStatus   func(status int) bool
	jitter        float64
	streams       *streamSet
	clock         clock
	logger        *zap.Logger
	warnOpaque    *sync.Once // logs the undecodable-upstream warning once
	quirks        *quirkReports
	hubs          *hubRegistry // shared streams, when Share is set
	hubsPoolKey   string       // the registry's key in hubPool, once taken
	hubsCountKey  any          // the key of the server's count of share handlers in hubPool, once taken
	admin         *adminEntry  // the handler in the admin API (admin.go), when it has a server
}

// Defaults of the options that have one.
const (
	defaultHeartbeat      = 15 * time.Second
	defaultWriteTimeout   = 10 * time.Second
	defaultLifetimeJitter = 0.1
	defaultDrainWindow    = 10 * time.Second
	// defaultRetry is the base of a refusal's retry hint when no retry is
	// configured.
	defaultRetry = 10 * time.Second
)

// durationOff is how Heartbeat, WriteTimeout and DrainWindow hold "off":
// any negative duration means off, and this is the one the Caddyfile sets.
const durationOff = caddy.Duration(-1)

// The values of RefuseWith.
const (
	refuseWithStream = "stream"
	refuseWithStatus = "status"
)

// CaddyModule returns the Caddy module information.
func (Handler) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "http.handlers.sse",
		New: func() caddy.Module { return new(Handler) },
	}
}

// Provision sets up the handler.
func (h *Handler) Provision(ctx caddy.Context) (err error) {
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
	if h.RefuseWith == "" {
		h.RefuseWith = refuseWithStream
	}
	h.jitter = defaultLifetimeJitter
	if h.LifetimeJitter != nil {
		h.jitter = *h.LifetimeJitter
	}
	h.heartbeatLine = []byte(":" + h.HeartbeatText + "\n\n")
	if h.retryStatus, err = parseRetryStatuses(h.RetryStatuses); err != nil {
		return err
	}
	h.warnOpaque = new(sync.Once)
	h.quirks = newQuirkReports()
	if h.clock == nil {
		h.clock = realClock{}
	}
	h.streams = newStreamSet(h.clock, h.MaxStreamRate)
	if err := initMetrics(ctx.GetMetricsRegistry()); err != nil {
		return err
	}
	srv, _ := ctx.Value(caddyhttp.ServerCtxKey).(*caddyhttp.Server)
	if srv != nil {
		srv.RegisterConnContext(withConn)
		srv.RegisterOnShutdown(h.drain)
		if err := h.registerAdmin(srv); err != nil {
			return err
		}
	}
	if h.Share != nil {
		if err := h.Share.provision(ctx, time.Duration(h.Retry)); err != nil {
			return err
		}
		h.hubs = newHubRegistry()
		if srv != nil {
			// Kept across reloads: see hubs.go.
			key, countKey := hubPoolKey(srv, h.Share.Key)
			h.hubsCountKey = countKey
			h.hubs.scope = key
			reg, _, _ := hubPool.LoadOrNew(key, func() (caddy.Destructor, error) { return h.hubs, nil })
			h.hubs, h.hubsPoolKey = reg.(*hubRegistry), key
		}
		h.hubs.adopt(h)
	}
	return nil
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
	if h.MaxStreamRate < 0 {
		return fmt.Errorf("max_stream_rate: must not be negative, got %d", h.MaxStreamRate)
	}
	if _, err := parseRetryStatuses(h.RetryStatuses); err != nil {
		return err
	}
	if h.MaxStreamsPerClient < 0 {
		return fmt.Errorf("max_streams_per_client: must not be negative, got %d", h.MaxStreamsPerClient)
	}
	if b := h.RetryBounds; b != nil && (len(b) != 2 || b[0] < 0 || b[1] < b[0]) {
		return fmt.Errorf("retry_bounds: want a minimum and a maximum duration, the minimum not above the maximum, got %v", b)
	}
	if h.Share != nil {
		if err := h.Share.validate(); err != nil {
			return err
		}
	}
	if strings.ContainsAny(h.HeartbeatText, "\r\n") {
		return fmt.Errorf("heartbeat_text: must not contain CR or LF")
	}
	if strings.ContainsAny(h.CloseEvent, "\r\n") {
		return fmt.Errorf("close_event: must not contain CR or LF")
	}
	if h.RefuseWith != "" && h.RefuseWith != refuseWithStream && h.RefuseWith != refuseWithStatus {
		return fmt.Errorf("refuse_with: must be %q or %q, got %q", refuseWithStream, refuseWithStatus, h.RefuseWith)
	}
	return nil
}

// zeroIsAmbiguous is the error for an explicit 0 given to heartbeat,
// write_timeout or drain_window, in JSON and in the Caddyfile alike: to
// some it reads as "none", to others as "the default".
const zeroIsAmbiguous = `%s: 0 is ambiguous; write "off" to disable it or a positive duration`

// handlerFields is Handler without its methods, for its JSON.
type handlerFields Handler

// handlerJSON is Handler's JSON config: the options that take "off" are
// read and written as raw values here, every other one as Handler's field.
type handlerJSON struct {
	*handlerFields
	Heartbeat    json.RawMessage `json:"heartbeat,omitempty"`
	WriteTimeout json.RawMessage `json:"write_timeout,omitempty"`
	DrainWindow  json.RawMessage `json:"drain_window,omitempty"`
}

// offDurations pairs the options that take "off" in j with h's fields.
func offDurations(h *Handler, j *handlerJSON) []offDuration {
	return []offDuration{
		{"heartbeat", &j.Heartbeat, &h.Heartbeat},
		{"write_timeout", &j.WriteTimeout, &h.WriteTimeout},
		{"drain_window", &j.DrainWindow, &h.DrainWindow},
	}
}

type offDuration struct {
	name  string
	raw   *json.RawMessage
	value *caddy.Duration
}

// UnmarshalJSON reads the handler's JSON config strictly, as Caddy reads
// a module's (an unknown field is an error). heartbeat, write_timeout and
// drain_window take "off" or a negative duration for off, and a positive
// duration; left out, they get their defaults; an explicit 0 is refused.
func (h *Handler) UnmarshalJSON(b []byte) error {
	j := handlerJSON{handlerFields: (*handlerFields)(h)}
	if err := caddy.StrictUnmarshalJSON(b, &j); err != nil {
		return err
	}
	for _, o := range offDurations(h, &j) {
		switch raw := string(*o.raw); raw {
		case "", "null":
			continue
		case `"off"`:
			*o.value = durationOff
			continue
		}
		var d caddy.Duration
		if err := json.Unmarshal(*o.raw, &d); err != nil {
			return fmt.Errorf("%s: want a duration or \"off\", got %s: %v", o.name, *o.raw, err)
		}
		if d == 0 {
			return fmt.Errorf(zeroIsAmbiguous, o.name)
		}
		*o.value = d
	}
	return nil
}

// MarshalJSON writes the handler's JSON config, with "off" for the options
// that are off, so that an adapted Caddyfile says what it said.
func (h Handler) MarshalJSON() ([]byte, error) {
	j := handlerJSON{handlerFields: (*handlerFields)(&h)}
	for _, o := range offDurations(&h, &j) {
		switch d := *o.value; {
		case d < 0:
			*o.raw = json.RawMessage(`"off"`)
		case d > 0:
			*o.raw = strconv.AppendInt(nil, int64(d), 10)
		}
	}
	return json.Marshal(j)
}

// Cleanup drains the requests still open when the handler is unloaded, and
// gives back the shared streams' registry, which drains too once no loaded
// configuration uses it.
func (h *Handler) Cleanup() error {
	h.unregisterAdmin()
	h.drain()
	if h.hubs == nil {
		return nil
	}
	h.hubs.leave(h)
	if h.hubsPoolKey == "" {
		return h.hubs.Destruct()
	}
	_, _ = hubPool.Delete(h.hubsCountKey)
	_, err := hubPool.Delete(h.hubsPoolKey)
	return err
}

// drain ends every open request within the drain window (at once when
// drain_window is off). Shared streams' hubs stay for the next
// configuration (hubs.go).
func (h *Handler) drain() {
	window := max(time.Duration(h.DrainWindow), 0)
	if h.streams != nil {
		h.streams.drain(window)
	}
}

// eventWait is how long a close waits for the event in flight to end:
// write_timeout, or its default when write_timeout is off.
func (h *Handler) eventWait() time.Duration {
	if h.WriteTimeout > 0 {
		return time.Duration(h.WriteTimeout)
	}
	return defaultWriteTimeout
}

// ServeHTTP passes the request on to next and follows it to its end: see
// stream.go for a request's life.
func (h *Handler) ServeHTTP(w http.ResponseWriter, r *http.Request, next caddyhttp.Handler) error {
	if h.LastEventIDQuery != "" {
		if err := h.lastEventIDFromQuery(r); err != nil {
			return err
		}
	}
	s := newStream(h, w, r)
	if s.head {
		// Go's transport reuses an upstream connection as soon as a HEAD
		// response's header is in, but a legacy server that routes HEAD to
		// its stream handler never ends that response: the next request on
		// the connection, anyone's, hangs behind it. So HEAD goes upstream
		// as GET, whose response the gateway cuts after its header: the
		// connection is closed and the upstream handler notices. That GET
		// counts against the limits, as any: it is refused here if it asks
		// for a stream, at its header if it turns out to be one.
		r.Method = http.MethodGet
	}
	shared := h.hubs != nil && s.askedForStream && !s.head && r.Method == http.MethodGet
	if s.askedForStream {
		// Refused before anything reaches the upstream. A shared stream's
		// client counts against max_stream_rate only if it starts an
		// upstream request (share.go).
		if reason := h.streams.acquire(s, !shared); reason != "" {
			return h.refuse(w, r, reason)
		}
	}
	defer h.streams.release(s)
	if shared {
		sharedNext := next
		next = caddyhttp.HandlerFunc(func(w http.ResponseWriter, r *http.Request) error {
			return h.serveShared(s, w, r, sharedNext)
		})
	}
	return s.serve(next)
}

// parseRetryStatuses turns RetryStatuses into a test of a status code.
func parseRetryStatuses(list []string) (func(int) bool, error) {
	if list == nil {
		list = []string{"5xx", "429"}
	}
	if len(list) == 1 && list[0] == "off" {
		return func(int) bool { return false }, nil
	}
	var classes [6]bool
	codes := make(map[int]bool)
	for _, s := range list {
		switch {
		case len(s) == 3 && (s[0] == '4' || s[0] == '5') && strings.EqualFold(s[1:], "xx"):
			classes[s[0]-'0'] = true
		default:
			code, err := strconv.Atoi(s)
			if err != nil || code < 400 || code > 599 {
				return nil, fmt.Errorf("retry_statuses: want status codes from 400 to 599, 4xx, 5xx or off, got %q", s)
			}
			codes[code] = true
		}
	}
	return func(status int) bool {
		return status >= 400 && status <= 599 && (classes[status/100] || codes[status])
	}, nil
}

// Interface guards
var (
	_ caddy.Provisioner           = (*Handler)(nil)
	_ caddy.Validator             = (*Handler)(nil)
	_ caddy.CleanerUpper          = (*Handler)(nil)
	_ json.Unmarshaler            = (*Handler)(nil)
	_ json.Marshaler              = Handler{}
	_ caddyhttp.MiddlewareHandler = (*Handler)(nil)
)
