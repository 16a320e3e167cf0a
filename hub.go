package caddysse

import (
	"context"
	crand "crypto/rand"
	"encoding/hex"
	"errors"
	"math/rand/v2"
	"net/http"
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

// A hub is one shared stream: one upstream request at a time for every
// client with the same key. The first client's request starts it; the hub
// then asks the upstream on its own request (its own context and replacer,
// nothing of any client's), through the next handler of the newest
// configuration a client came through, cuts the response into whole events
// (eventState finds the boundaries and ids) and keeps them in a ring. Each
// client reads the ring at its own pace (share.go, feed).
//
// A response that must not be shared (not an event stream, or one marked
// per user) goes to the request that started the hub alone, through a
// relay. An upstream that ends or breaks is asked again, with the last id
// it sent, after a backoff, while the clients stay.

// hubState is where a hub stands.
type hubState uint8

const (
	hubStarting hubState = iota // waiting for the first response's header
	hubLive                     // an event stream, shared
	hubAlone                    // not to be shared: it goes to the starter alone (relay)
	hubFailed                   // the first attempt failed with a status clients are refused for
	hubEnded                    // over; its clients close once they have its events
)

// A hub whose upstream ended or broke asks again after a backoff that
// starts at reconnectBase and doubles up to reconnectMax, drawn at random
// between half and all of it. After reconnectTries attempts in a row that
// bring no event, its clients are closed (upstream_error). A key whose
// first request failed is refused for the same backoff.
const (
	reconnectBase  = 250 * time.Millisecond
	reconnectMax   = 5 * time.Second
	reconnectTries = 8
)

// backoff is the wait after the n-th failure in a row (n ≥ 1).
func backoff(n int) time.Duration {
	b := min(reconnectBase<<min(n-1, 16), reconnectMax)
	return b/2 + rand.N(b/2+1)
}

var (
	// errHubGone is the cause given to the upstream request of a hub that
	// was released.
	errHubGone = errors.New("sse: shared stream released")
	// errHubMove ends an upstream request that still runs through a
	// replaced configuration, so that the next one goes through the new one.
	errHubMove = errors.New("sse: shared stream moves to the new configuration")
	// errEventTooLarge ends an upstream attempt whose event in flight grew
	// past max_backlog: no client could be sent it without falling that
	// far behind. The hub asks again, as for any broken upstream.
	errEventTooLarge = errors.New("sse: a shared stream's event is larger than max_backlog")
)

// hub is one key's shared upstream.
type hub struct {
	reg      *hubRegistry
	key      string
	ctx      context.Context // the hub's own: no client's values or cancellation
	cancel   context.CancelCauseFunc
	base     *http.Request // the upstream request, on ctx
	idPrefix string        // of the gateway's ids (assign_ids)
	// fleetPrefix is that of the gateway ids of events from a store's
	// log: a digest of the key, the same on every gateway (fleet.go).
	fleetPrefix string
	logName     string        // the store's name of its log (hubRegistry.logName)
	ready       chan struct{} // closed once the first header is in, or the first attempt ended without one
	decided     atomic.Bool   // ready is closed
	finished    chan struct{} // closed when run returns: no upstream request is left
	clientIP    string        // the starter's, whose max_streams_per_client bounds the hub's linger

	// Set before ready is closed, read after.
	refusal  endReason     // hubFailed: what waiting clients are refused with
	relay    chan []byte   // hubAlone: the response's bytes for the starter; nil asks for a flush
	relayAck chan error    // the starter's answer to each
	done     chan struct{} // closed when a first attempt that brought no shared stream is over
	runErr   error
	panicked any

	// slots is the stream set whose max_streams this hub's upstream
	// request counts against: its newest configuration's. Guarded by the
	// registry's lock.
	slots *streamSet

	// Lock order: see hubRegistry.mu.
	mu          sync.RWMutex
	state       hubState
	status      int
	header      http.Header
	subs        map[*subscriber]struct{}
	ring        *ring
	notify      chan struct{} // closed and replaced at every new event and at the end
	endReason   endReason
	upstreamID  string            // the last event ID as the upstream's own ids leave it, sent when asking again
	next        caddyhttp.Handler // the newest configuration's next handler a client came with
	nextOwner   *Handler
	lingerTimer timer
	lingerGen   uint64 // tells a stale linger timer from the current one
	released    bool
	admin       hubAdmin // the upstream as the admin API sees and steers it (admin.go)
	// In a fleet (fleet.go): the last event of the log in the ring, whether
	// this gateway runs the upstream, and whether it rejoined the fleet
	// after serving alone.
	logSeq     uint64
	leading    bool
	rejoined   bool
	catchingUp bool // following the log, not yet at its end
	// unlogged is what the upstream gave this gateway while it served
	// alone, for the log if it leads when it rejoins; ownFrom and ownTo
	// are the log's numbers of those it appended, already in the ring.
	unlogged       []LogEvent
	ownFrom, ownTo uint64
}

// newHub makes the hub for key, started by the request r. The hub's request
// is a copy of r on a context of the hub's own, with a replacer of its own:
// what the upstream's handlers write to them (placeholders, log fields,
// vars) stays with the hub, and no client's leaving cancels it. The vars of
// r are copied, as they stood. The upstream is asked from r's
// Last-Event-ID, unless it is one of the gateway's.
func (reg *hubRegistry) newHub(key string, h *Handler, r *http.Request, next caddyhttp.Handler) *hub {
	ctx, cancel := context.WithCancelCause(context.Background())
	base := r.Clone(ctx)
	base.Header.Del("Last-Event-ID")
	srv, _ := r.Context().Value(caddyhttp.ServerCtxKey).(*caddyhttp.Server)
	base = caddyhttp.PrepareRequest(base, caddy.NewReplacer(), nil, srv)
	if vars, ok := r.Context().Value(caddyhttp.VarsCtxKey).(map[string]any); ok {
		for k, v := range vars {
			caddyhttp.SetVar(base.Context(), k, v)
		}
	}
	var prefix [6]byte
	_, _ = crand.Read(prefix[:])
	hb := &hub{
		reg: reg, key: key, ctx: base.Context(), cancel: cancel, base: base,
		idPrefix: hex.EncodeToString(prefix[:]) + "-",
		ready:    make(chan struct{}),
		finished: make(chan struct{}),
		clientIP: clientIP(r),
		relay:    make(chan []byte),
		relayAck: make(chan error),
		done:     make(chan struct{}),
		subs:     make(map[*subscriber]struct{}),
		ring:     newRing(),
		notify:   make(chan struct{}),
		next:     next, nextOwner: h,
	}
	if h.Share.store != nil {
		hb.logName = reg.logName(key)
		hb.fleetPrefix = hb.logName[:12] + "-"
	}
	if id := r.Header.Get("Last-Event-ID"); id != "" && !(h.Share.AssignIDs && isGatewayID(id)) {
		hb.upstreamID = id
		if h.Share.store == nil {
			hb.ring.startFrom(id) // a fleet's ring starts with the log's events
		}
	}
	sseMetrics.hubs.Inc()
	return hb
}

// isGatewayID reports whether id has the form of the gateway's ids: 12 hex
// digits, a dash and a number.
func isGatewayID(id string) bool {
	prefix, n, ok := strings.Cut(id, "-")
	if !ok || len(prefix) != 12 || n == "" {
		return false
	}
	_, err := hex.DecodeString(prefix)
	_, nerr := strconv.ParseUint(n, 10, 64)
	return err == nil && nerr == nil
}

// handler is the newest configuration's handler: its options apply.
func (hb *hub) handler() *Handler { return hb.reg.handler() }

// run is the hub of the memory store: its upstream requests until it ends.
func (hb *hub) run() {
	defer close(hb.finished)
	defer sseMetrics.hubs.Dec()
	hb.upstream(nil, nil)
}

// upstream runs the hub's upstream requests: the first one, and those that
// ask again after it ended or broke. It returns true when the hub has
// ended. In a fleet (fleet.go) it runs while this gateway holds lease,
// appending the events to the store's log, and returns false, the hub
// going on, once the lease is lost, the log fails (its error), or stop is
// closed.
func (hb *hub) upstream(lease Lease, stop <-chan struct{}) (ended bool, storeErr error) {
	failures := 0
	for attempt := 0; ; attempt++ {
		ctx, cancel := context.WithCancelCause(hb.ctx)
		hb.mu.Lock()
		next, owner := hb.next, hb.nextOwner
		req := hb.request(ctx)
		hb.startAttemptLocked(cancel, owner, attempt)
		hb.mu.Unlock()
		first := !hb.decided.Load()
		hw := &hubWriter{hub: hb, ctx: ctx, header: make(http.Header), first: first, state: newEventState(), dedup: !first, lease: lease}
		stopMove := hb.moveWhenReplaced(owner, cancel)
		stopLeave := stopOn(ctx, cancel, lease, stop, &hw.relaying)
		err, panicked := callNext(next, hw, req)
		stopLeave()
		stopMove()
		cancel(nil)
		renew := hb.attemptEnded() // asked through the admin API
		if hw.first && hw.mode != hwLive {
			hb.endFirst(hw, err, panicked)
			return true, nil
		}
		if hb.ctx.Err() != nil {
			hb.end(reasonDrain)
			return true, nil
		}
		if hw.perUser {
			hb.end(reasonUpstreamEnd)
			return true, nil
		}
		if hw.appendErr != nil && !errors.Is(hw.appendErr, ErrLeaseLost) {
			return false, hw.appendErr
		}
		if cause := context.Cause(ctx); hw.appendErr != nil || errors.Is(cause, ErrLeaseLost) || errors.Is(cause, errFleetMove) {
			return false, nil // the fleet's to settle
		}
		if renew || errors.Is(context.Cause(ctx), errHubMove) {
			failures = 0
			sseMetrics.reconnects.Inc()
			continue // at once, through the newest configuration
		}
		if hw.events > 0 {
			failures = 0
		}
		if failures++; failures > reconnectTries {
			hb.handler().logger.Warn("shared stream's upstream failed every retry; its clients are closed",
				zap.String("uri", hb.base.RequestURI), zap.Int("tries", reconnectTries), zap.Error(err))
			hb.reg.recordFailure(hb.key, reasonUpstreamError)
			hb.end(reasonUpstreamError)
			return true, nil
		}
		wait := backoff(failures)
		sseMetrics.reconnects.Inc()
		if c := hb.handler().logger.Check(zapcore.DebugLevel, "shared stream's upstream ended; asking again"); c != nil {
			fields := []zap.Field{zap.String("uri", hb.base.RequestURI), zap.Int("try", failures),
				zap.Duration("backoff", wait), zap.String("last_event_id", hb.lastUpstreamID())}
			if err != nil {
				fields = append(fields, zap.Error(err))
			}
			if panicked != nil && panicked != http.ErrAbortHandler {
				fields = append(fields, zap.Any("panic", panicked))
			}
			c.Write(fields...)
		}
		var lost <-chan struct{}
		if lease != nil {
			lost = lease.Lost()
		}
		wake := make(chan struct{})
		t := hb.handler().clock.AfterFunc(wait, func() { close(wake) })
		select {
		case <-wake:
		case <-hb.retrying(wait, failures):
			t.Stop()
		case <-lost:
			t.Stop()
			return false, nil
		case <-stop:
			t.Stop()
			return false, nil
		case <-hb.ctx.Done():
			t.Stop()
			hb.end(reasonDrain)
			return true, nil
		}
	}
}

// stopOn ends an attempt, with cancel, once lease is lost or stop is
// closed (either may be nil); not while the attempt relays a response to
// its starter alone, which is no longer the fleet's.
func stopOn(ctx context.Context, cancel context.CancelCauseFunc, lease Lease, stop <-chan struct{}, relaying *atomic.Bool) func() {
	if lease == nil && stop == nil {
		return func() {}
	}
	var lost <-chan struct{}
	if lease != nil {
		lost = lease.Lost()
	}
	done := make(chan struct{})
	go func() {
		select {
		case <-lost:
			if !relaying.Load() {
				cancel(ErrLeaseLost)
			}
		case <-stop:
			cancel(errFleetMove)
		case <-ctx.Done():
		case <-done:
		}
	}()
	return func() { close(done) }
}

// moveWhenReplaced ends the upstream request that runs through owner's next
// handler once a newer configuration has served a client of the hub, at the
// latest max_lifetime after that (checked every max_lifetime), so that a
// reload that changed the upstream reaches a shared stream within a bound.
// Without max_lifetime, the hub moves at its upstream's next end.
func (hb *hub) moveWhenReplaced(owner *Handler, cancel context.CancelCauseFunc) (stop func()) {
	every := time.Duration(owner.MaxLifetime)
	if every <= 0 {
		return func() {}
	}
	var mu sync.Mutex
	var t timer
	stopped := false
	var check func()
	check = func() {
		hb.mu.RLock()
		moved := hb.nextOwner != owner
		hb.mu.RUnlock()
		if moved {
			cancel(errHubMove)
			return
		}
		mu.Lock()
		defer mu.Unlock()
		if !stopped {
			t = owner.clock.AfterFunc(every, check)
		}
	}
	mu.Lock()
	t = owner.clock.AfterFunc(every, check)
	mu.Unlock()
	return func() {
		mu.Lock()
		defer mu.Unlock()
		stopped = true
		t.Stop()
	}
}

func (hb *hub) lastUpstreamID() string {
	hb.mu.RLock()
	defer hb.mu.RUnlock()
	return hb.upstreamID
}

// request is the hub's request to the upstream, on ctx: with the last event
// ID the upstream's own ids left (never one of the gateway's), if any.
func (hb *hub) request(ctx context.Context) *http.Request {
	req := hb.base.Clone(ctx)
	req.Body, req.ContentLength = http.NoBody, 0
	if id := hb.upstreamID; id != "" && id != unknownID {
		req.Header.Set("Last-Event-ID", id)
	}
	return req
}

// endFirst settles a first attempt that brought no shared stream.
func (hb *hub) endFirst(hw *hubWriter, err error, panicked any) {
	hb.runErr, hb.panicked = err, panicked
	h := hb.handler()
	hb.mu.Lock()
	if hb.state == hubStarting {
		// No header at all: reverse_proxy's 502 while the upstream is
		// down, say. Clients are refused, as a stream of their own would
		// be, if its status is one to retry; not when the hub was released
		// (its clients all left before the header).
		if status := errorStatus(err); err != nil && panicked == nil && hb.ctx.Err() == nil && h.retryStatus(status) {
			hb.state, hb.refusal = hubFailed, upstreamStatus(status)
		} else {
			hb.state = hubEnded
		}
	}
	state, refusal := hb.state, hb.refusal
	hb.mu.Unlock()
	if state == hubFailed {
		hb.reg.recordFailure(hb.key, refusal)
	}
	hb.reg.release(hb)
	hw.decide()
	close(hb.done)
}

// end ends the hub: its clients get the events they have not had, then the
// close sequence with reason.
func (hb *hub) end(reason endReason) {
	hb.mu.Lock()
	hb.state = hubEnded
	hb.endReason = reason
	close(hb.notify)
	hb.notify = make(chan struct{})
	hb.mu.Unlock()
	hb.reg.release(hb)
}

// hubWriter is the response writer the hub gives the next handler.
type hubWriter struct {
	hub         *hub
	ctx         context.Context // the attempt's
	header      http.Header
	first       bool
	wroteHeader bool
	decided     bool
	mode        hwMode
	state       eventState
	pending     []byte
	endedCR     bool // the last chunk ended with CR: a leading LF is its CRLF's
	events      int
	perUser     bool  // a reconnect's response is marked as one user's
	lease       Lease // a fleet's: the events go to the store's log (fleet.go)
	appendErr   error // the log's, which ended the attempt
	relaying    atomic.Bool
	eventIDs    uint32 // the state's id fields when the event being read began
	// After a reconnect, events the upstream sends again exactly as the hub
	// has them are dropped: dedup until the first that is not, expect the
	// one the upstream should send next if it replays (0: not found yet).
	dedup  bool
	expect uint64
}

type hwMode uint8

const (
	hwWaiting hwMode = iota
	hwLive
	hwRelay
	hwDiscard
)

func (hw *hubWriter) Header() http.Header { return hw.header }

// WriteHeader decides what the attempt is: a shared stream, a response for
// the starter alone, or one that fails.
func (hw *hubWriter) WriteHeader(status int) {
	if hw.wroteHeader || status >= 100 && status <= 199 {
		return
	}
	hw.wroteHeader = true
	enc := hw.header.Get("Content-Encoding")
	stream := status == http.StatusOK && isEventStream(hw.header) && (enc == "" || strings.EqualFold(enc, "identity"))
	hb := hw.hub
	h := hb.handler()
	switch {
	case !hw.first:
		hw.mode = hwDiscard
		if stream && perUser(hw.header, h.Share.Key == "") {
			// Now marked as one user's: not shared, and the clients go
			// back to asking on their own (hub.run ends the hub).
			hw.perUser = true
			h.reportQuirk(hb.base.RequestURI, quirkPerUserResponse)
		} else if stream {
			hw.mode = hwLive
			hb.connected()
			hb.mu.RLock()
			status, header := hb.status, hb.header
			hb.mu.RUnlock()
			hw.shareHeader(status, header)
		}
		return
	case stream && !perUser(hw.header, h.Share.Key == ""):
		hw.mode = hwLive
		// What the upstream said of the first request alone (its replay of
		// that client's Last-Event-ID, its date) is not every client's.
		header := hw.header.Clone()
		for _, name := range startersOwnHeaders {
			header.Del(name)
		}
		hb.mu.Lock()
		hb.state, hb.status, hb.header = hubLive, status, header
		hb.connectedLocked()
		hb.mu.Unlock()
		hb.reg.clearFailure(hb.key)
		hw.shareHeader(status, header)
	case h.retryStatus(status):
		hw.mode = hwDiscard
		hb.mu.Lock()
		hb.state, hb.refusal = hubFailed, upstreamStatus(status)
		hb.mu.Unlock()
	default:
		reason := unsharedNotAStream
		if stream {
			reason = unsharedPerUser
			h.reportQuirk(hb.base.RequestURI, quirkPerUserResponse)
		}
		sseMetrics.unshared.WithLabelValues(string(reason)).Inc()
		hw.mode = hwRelay
		hb.mu.Lock()
		hb.state, hb.status, hb.header = hubAlone, status, hw.header.Clone()
		hb.mu.Unlock()
		if hw.lease != nil {
			// Not the fleet's: another gateway's request for the key
			// tries afresh.
			hw.relaying.Store(true)
			hw.lease.Release()
		}
		// The next request for the key tries afresh, and the starter's
		// own stream slot counts it from now on.
		hb.reg.forget(hb)
	}
	hw.decide()
}

// shareHeader gives a fleet's other gateways the header their clients are
// sent (fleet.go). A store that fails here fails at the first event too.
func (hw *hubWriter) shareHeader(status int, header http.Header) {
	if hw.lease != nil {
		_ = hw.lease.SetHeader(hw.ctx, LogHeader{Status: status, Header: header})
	}
}

// startersOwnHeaders are what the first response said of its own request
// alone: not sent to the clients that join.
var startersOwnHeaders = []string{"Content-Length", "Date", replayHeader, "Last-Event-ID"}

// perUser reports whether a response is marked as one user's: it sets or
// clears what the browser keeps for the user, answers its credentials
// (perUserHeaders), is private to one cache, or varies on anything (`*`) or, under
// the default key, on a request header the key leaves out (but
// Accept-Encoding, which the gateway sets itself). Such a response is not
// shared.
func perUser(header http.Header, defaultKey bool) bool {
	for _, name := range perUserHeaders {
		if len(header.Values(name)) > 0 {
			return true
		}
	}
	for _, v := range header.Values("Cache-Control") {
		for _, d := range strings.Split(v, ",") {
			if name, _, _ := strings.Cut(strings.TrimSpace(d), "="); strings.EqualFold(name, "private") {
				return true
			}
		}
	}
	for _, v := range header.Values("Vary") {
		for _, name := range strings.Split(v, ",") {
			name = http.CanonicalHeaderKey(strings.TrimSpace(name))
			if name == "*" || defaultKey && name != "Accept-Encoding" && keyIgnores(name) {
				return true // varies on a header the key does not tell apart
			}
		}
	}
	return false
}

// perUserHeaders mark a response as one user's: they set or clear what the
// browser keeps for the user, or answer the user's credentials.
var perUserHeaders = []string{"Set-Cookie", "Set-Cookie2", "Clear-Site-Data",
	"Authentication-Info", "Proxy-Authentication-Info", "WWW-Authenticate", "Proxy-Authenticate"}

// decide tells the waiting clients that the first header is in.
func (hw *hubWriter) decide() {
	if !hw.decided && hw.first {
		hw.decided = true
		hw.hub.markReady()
	}
}

// markReady tells the waiting clients that the hub's state is settled. It
// is called by the hub's own goroutine alone.
func (hb *hub) markReady() {
	if !hb.decided.Swap(true) {
		close(hb.ready)
	}
}

func (hw *hubWriter) Write(p []byte) (int, error) {
	if !hw.wroteHeader {
		hw.WriteHeader(http.StatusOK)
	}
	hb := hw.hub
	switch hw.mode {
	case hwRelay:
		select {
		case hb.relay <- p:
			if err := <-hb.relayAck; err != nil {
				return 0, err
			}
			return len(p), nil
		case <-hw.ctx.Done():
			return 0, context.Cause(hw.ctx)
		}
	case hwLive:
		if hw.ctx.Err() != nil {
			return 0, context.Cause(hw.ctx)
		}
		if err := hw.split(p); err != nil {
			return 0, err
		}
		return len(p), nil
	}
	return 0, errStreamClosed
}

// Flush passes a flush on to the starter of a relayed response.
func (hw *hubWriter) Flush() {
	if hw.mode == hwRelay {
		select {
		case hw.hub.relay <- nil:
			<-hw.hub.relayAck
		case <-hw.ctx.Done():
		}
	}
}

// split cuts the upstream's bytes into whole events. Comments and blank
// lines between events are not kept: every client gets heartbeats of its
// own.
func (hw *hubWriter) split(p []byte) error {
	_, rest := hw.state.takeBOM(p, true)
	maxEvent := hw.hub.handler().Share.MaxBacklog
	for len(rest) > 0 {
		ended := hw.state.ended
		n := hw.state.scan(rest, true)
		if !hw.state.atBoundary() {
			if int64(len(hw.pending)+n) > maxEvent {
				hw.pending = nil
				return errEventTooLarge
			}
			hw.pending = append(hw.pending, rest[:n]...)
			rest = rest[n:]
			continue
		}
		chunk := rest[:n]
		if len(hw.pending) > 0 {
			chunk = append(hw.pending, chunk...)
			hw.pending = nil
		}
		rest = rest[n:]
		if hw.endedCR && len(chunk) > 0 && chunk[0] == '\n' {
			chunk = chunk[1:]
		}
		if len(chunk) == 0 {
			continue
		}
		hw.endedCR = chunk[len(chunk)-1] == '\r'
		if hw.state.ended != ended {
			// The event's id line may have come in an earlier write.
			hasID := hw.state.idFields != hw.eventIDs
			hw.eventIDs = hw.state.idFields
			if err := hw.event(chunk, hasID); err != nil {
				return err
			}
		}
	}
	return nil
}

// event takes one whole event; hasID tells whether it had an id field of
// its own (possibly empty), now in the state's last event ID. In a fleet,
// the event goes to the store's log, and comes back to the ring from
// there, as it does on every gateway (fleet.go).
func (hw *hubWriter) event(chunk []byte, hasID bool) error {
	hb := hw.hub
	hb.mu.Lock()
	id := hb.upstreamID
	if last, known := hw.state.lastID(); known {
		id = string(last)
	} else if id == "" {
		id = unknownID
	}
	if hw.dedup {
		if hw.replayed(chunk, hasID && id != "") {
			hb.mu.Unlock()
			return nil
		}
		hw.dedup = false
	}
	hw.events++
	if hw.lease == nil {
		if hasID {
			hb.upstreamID = id
		}
		data := append([]byte(nil), chunk...)
		if hb.fleetPrefix != "" && hasID && id != "" {
			// Only events the other gateways can tell they have.
			hb.keepUnloggedLocked(LogEvent{Data: data, HasID: hasID, ID: id})
		}
		hb.appendLocked(data, hasID, id)
		hb.mu.Unlock()
		return nil
	}
	hb.mu.Unlock()
	ev := LogEvent{Data: append([]byte(nil), chunk...), HasID: hasID, ID: id}
	if _, err := hw.lease.Append(hw.ctx, ev); err != nil {
		// Not asked from: the event may not be in the log, and it is in
		// no ring.
		hw.appendErr = err
		return err
	}
	sseMetrics.storePublished.Inc()
	if hasID {
		hb.mu.Lock()
		hb.upstreamID = id
		hb.mu.Unlock()
	}
	return nil
}

// replayed reports whether the event is one the upstream sends again
// exactly as the hub has it, in the order the hub has them, after a
// reconnect: only then is it dropped as already seen. Anything else
// flows, and ends the check.
func (hw *hubWriter) replayed(chunk []byte, withID bool) bool {
	rg := hw.hub.ring
	if !withID {
		return false
	}
	if hw.expect == 0 {
		seq, ok := rg.find(chunk)
		if !ok {
			return false
		}
		hw.expect = seq + 1
	} else if rg.replays(hw.expect, chunk) {
		hw.expect++
	} else {
		return false
	}
	if hw.expect >= rg.next {
		hw.dedup = false // the upstream is where the hub is: what follows is new
	}
	return true
}

// appendLocked adds a whole event of the upstream's to the ring. hasID
// tells whether the upstream gave it an id; without one, the client's last
// event ID stays as it was, or becomes one of the gateway's with
// assign_ids.
func (hb *hub) appendLocked(data []byte, hasID bool, id string) {
	switch {
	case hasID:
	case hb.handler().Share.AssignIDs:
		data, id = hb.withID(hb.idPrefix, data, hb.ring.next)
	default:
		id = hb.ring.lastID
	}
	hb.addEventLocked(data, id, hasID)
}

// withID gives an event without an id of its own the gateway's id prefix
// and number n: an `id:` line at its start.
func (hb *hub) withID(prefix string, data []byte, n uint64) ([]byte, string) {
	id := prefix + strconv.FormatUint(n, 10)
	return append([]byte("id: "+id+"\n"), data...), id
}

// addEventLocked adds an event, as clients are sent it, with the last
// event ID a client holds once it has it, trims the ring and wakes the
// clients.
func (hb *hub) addEventLocked(data []byte, id string, upstreamID bool) {
	conf := hb.handler().Share
	rg := hb.ring
	rg.add(data, id, upstreamID)
	// One pass over the clients: the oldest event one still needs, and a
	// client stuck in a write too far behind is cut (the others notice
	// their backlog themselves).
	needed := rg.next
	newest := rg.newestStart()
	for sub := range hb.subs {
		behind := newest-sub.posStart > conf.MaxBacklog
		if behind && sub.writing.Load() && !sub.dropped.Swap(true) {
			sub.s.cut(reasonSlowClient)
		}
		if !behind && sub.pos < needed {
			needed = sub.pos
		}
	}
	replay := *conf.Replay
	rg.trim(replay, max(replay, ringMaxEvents), conf.MaxBacklog, needed)
	close(hb.notify)
	hb.notify = make(chan struct{})
}

// ringMaxEvents bounds the events a hub keeps for its clients beyond
// replay: a client further behind is closed as slow_client.
const ringMaxEvents = 4096

// relayTo gives the starter the response that is not to be shared, as the
// next handler wrote it.
func (hb *hub) relayTo(w http.ResponseWriter, r *http.Request) error {
	if hb.header != nil {
		for k, v := range hb.header {
			w.Header()[k] = v
		}
		w.WriteHeader(hb.status)
	}
	for {
		select {
		case p := <-hb.relay:
			var err error
			if p == nil {
				err = http.NewResponseController(w).Flush()
			} else {
				_, err = w.Write(p)
			}
			hb.relayAck <- err
		case <-hb.done:
			if hb.panicked != nil {
				panic(hb.panicked)
			}
			return hb.runErr
		case <-r.Context().Done():
			hb.cancel(errClientGone)
			<-hb.done
			if hb.panicked != nil && hb.panicked != http.ErrAbortHandler {
				panic(hb.panicked)
			}
			return nil
		}
	}
}

// subscriber is one client of a hub.
type subscriber struct {
	s *stream
	// pos and posStart are guarded by hub.mu; the client's own feeder
	// writes them under its read lock, since it alone does.
	pos      uint64 // next event to send
	posStart int64  // where it starts in the byte stream
	writing  atomic.Bool
	dropped  atomic.Bool
}
