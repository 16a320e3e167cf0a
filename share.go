package caddysse

import (
	"context"
	crand "crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"math/rand/v2"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
)

// Shared streams (the share option): one upstream request per key, its
// events fanned out to every client that asks for the same stream.
//
// A hub holds one key's upstream. The first request for a key starts it:
// the hub calls the next handler (reverse_proxy, so its load balancing and
// retries apply) with a writer of its own and a context no client owns. The
// hub cuts the upstream's bytes into whole events (eventState finds the
// boundaries) and appends each, as the upstream sent it, to a ring. Every
// client is an ordinary stream (stream.go) whose "next handler" is the
// hub's feeder: the feeder writes the response header the hub got, then
// each event from the ring through the stream's own Write, so heartbeats,
// the close sequence, write timeouts, idle_timeout, max_lifetime, drain,
// limits, metrics and the debug line all work per client. All clients
// write the same event bytes; nothing is copied per client.
//
// A hub's upstream that ends or breaks is asked again with Last-Event-ID,
// with backoff, while the clients stay (see hub.run). A response that is
// not an event stream goes to the request that started the hub, as if
// nothing were shared (relay), and the next request tries afresh.

// ShareConfig makes the handler share one upstream stream among all the
// clients that ask for the same one (see README, "Shared streams").
type ShareConfig struct {
	// Key names the shared stream; requests with the same key share one
	// upstream request. It takes placeholders, replaced per request, and is
	// used exactly as given (plus the host), so a key that leaves out who
	// the user is shares one user's stream with everyone: use it only for
	// broadcast streams. Default: empty, which keys by host, path and query
	// plus a digest of the Authorization and Cookie headers, so requests
	// of different users never share. Last-Event-ID (and the
	// last_event_id_query parameter) is never part of the key.
	Key string `json:"key,omitempty"`

	// Replay is how many of the latest events are kept so that a client
	// that comes back with Last-Event-ID gets the events it missed before
	// going live. A client whose id is not among them goes live at once
	// and gets the response header `X-SSE-Replay: miss`. Default: 256.
	// 0 disables replay.
	Replay *int `json:"replay,omitempty"`

	// Linger is how long the upstream request is kept after the last client
	// left, so that a client that reconnects at once finds it running.
	// Default: 0, which releases the upstream as soon as the last client
	// leaves.
	Linger caddy.Duration `json:"linger,omitempty"`

	// AssignIDs gives each event that has no id of the upstream's an id of
	// the gateway's (a random prefix per shared stream and a sequence
	// number), inserted as an `id:` line at the start of the event, so
	// clients of an upstream without ids can resume too. Events with the
	// upstream's own ids keep them. Default: false.
	AssignIDs bool `json:"assign_ids,omitempty"`

	// MaxBacklog is how many bytes of events (not counting the newest) a
	// client may be behind the upstream before it is closed with reason
	// slow_client; it can come back and replay what it missed. A slow
	// client never slows the others or the upstream. It also bounds one
	// event: an event in flight that grows past it ends the upstream
	// request, which is asked again. In bytes. Default: 1 MiB.
	MaxBacklog int64 `json:"max_backlog,omitempty"`
}

const (
	defaultReplay     = 256
	defaultMaxBacklog = 1 << 20

	// A hub whose upstream ended or broke asks again after a backoff that
	// starts at reconnectBase and doubles up to reconnectMax, drawn at
	// random between half and all of it. After reconnectTries attempts in
	// a row that bring no event, its clients are closed (upstream_error).
	reconnectBase  = 250 * time.Millisecond
	reconnectMax   = 5 * time.Second
	reconnectTries = 8

	// replayHeader says that a client's Last-Event-ID was not among the
	// kept events: it went live from now on.
	replayHeader = "X-SSE-Replay"
)

// provisionShare sets the share defaults.
func (c *ShareConfig) provision() {
	if c.Replay == nil {
		n := defaultReplay
		c.Replay = &n
	}
	if c.MaxBacklog == 0 {
		c.MaxBacklog = defaultMaxBacklog
	}
}

// validate checks the share options.
func (c *ShareConfig) validate() error {
	if c.Replay != nil && *c.Replay < 0 {
		return fmt.Errorf("share: replay must not be negative, got %d", *c.Replay)
	}
	if c.Linger < 0 {
		return fmt.Errorf("share: linger must not be negative, got %s", time.Duration(c.Linger))
	}
	if c.MaxBacklog < 0 {
		return fmt.Errorf("share: max_backlog must not be negative, got %d", c.MaxBacklog)
	}
	return nil
}

// unmarshalShare reads `share [<key>] { ... }`.
func (h *Handler) unmarshalShare(d *caddyfile.Dispenser) error {
	c := new(ShareConfig)
	if d.NextArg() {
		c.Key = d.Val()
		if d.NextArg() {
			return d.ArgErr()
		}
	}
	seen := make(map[string]bool)
	for nesting := d.Nesting(); d.NextBlock(nesting); {
		option := d.Val()
		if seen[option] {
			return d.Errf("share: %s: option given more than once", option)
		}
		seen[option] = true
		if option == "assign_ids" {
			if d.NextArg() {
				return d.ArgErr()
			}
			c.AssignIDs = true
			continue
		}
		if !d.NextArg() {
			return d.ArgErr()
		}
		value := d.Val()
		if d.NextArg() {
			return d.ArgErr()
		}
		switch option {
		case "replay":
			n, err := strconv.Atoi(value)
			if err != nil || n < 0 {
				return d.Errf("share: replay: want a whole number of events, 0 or more, got %q", value)
			}
			c.Replay = &n
		case "linger":
			dur, err := parseDuration(d, "share: linger", value)
			if err != nil {
				return err
			}
			c.Linger = dur
		case "max_backlog":
			n, err := parseSize(value)
			if err != nil || n < 1 {
				return d.Errf("share: max_backlog: want a size such as 512KiB or 1MiB, got %q", value)
			}
			c.MaxBacklog = n
		default:
			return d.Errf("unrecognized share option %q", option)
		}
	}
	h.Share = c
	return nil
}

// parseSize parses a byte size: a whole number with an optional unit, B,
// KB, KiB, MB, MiB, GB or GiB.
func parseSize(s string) (int64, error) {
	i := 0
	for i < len(s) && s[i] >= '0' && s[i] <= '9' {
		i++
	}
	n, err := strconv.ParseInt(s[:i], 10, 64)
	if err != nil {
		return 0, err
	}
	units := map[string]int64{"": 1, "b": 1, "kb": 1000, "kib": 1 << 10, "mb": 1000 * 1000,
		"mib": 1 << 20, "gb": 1000 * 1000 * 1000, "gib": 1 << 30}
	unit, ok := units[strings.ToLower(strings.TrimSpace(s[i:]))]
	if !ok || n > (1<<62)/unit {
		return 0, fmt.Errorf("invalid size %q", s)
	}
	return n * unit, nil
}

// hubSet is a handler's hubs, by key.
type hubSet struct {
	h    *Handler
	conf *ShareConfig

	mu       sync.Mutex
	hubs     map[string]*hub
	draining bool
}

func newHubSet(h *Handler) *hubSet {
	return &hubSet{h: h, conf: h.Share, hubs: make(map[string]*hub)}
}

// key is the request's shared-stream key.
func (set *hubSet) key(r *http.Request) string {
	if set.conf.Key != "" {
		repl, _ := r.Context().Value(caddy.ReplacerCtxKey).(*caddy.Replacer)
		key := set.conf.Key
		if repl != nil {
			key = repl.ReplaceAll(key, "")
		}
		return r.Host + "\x00" + key
	}
	digest := sha256.New()
	for _, name := range []string{"Authorization", "Cookie"} {
		for _, v := range r.Header.Values(name) {
			digest.Write([]byte(v))
			digest.Write([]byte{0})
		}
		digest.Write([]byte{1})
	}
	return r.Host + "\x00" + r.URL.Path + "\x00" + r.URL.RawQuery + "\x00" + string(digest.Sum(nil))
}

// hubState is where a hub stands.
type hubState uint8

const (
	hubStarting hubState = iota // waiting for the first response's header
	hubLive                     // an event stream, shared
	hubRelay                    // not an event stream: it goes to the starter alone
	hubEnded                    // over; its clients close once they have its events
)

// hub is one key's shared upstream.
type hub struct {
	set      *hubSet
	key      string
	ctx      context.Context
	cancel   context.CancelCauseFunc
	base     *http.Request // the first client's request, on ctx
	idPrefix string
	ready    chan struct{} // closed once the first response's header is in, or the first attempt ended without one
	done     chan struct{} // closed when a relay (or a first attempt without header) is over

	// The relay to the starter, when the response is not an event stream.
	relay    chan []byte // nil asks for a flush
	relayAck chan error
	runErr   error
	panicked any

	mu             sync.RWMutex
	state          hubState
	status         int
	header         http.Header
	subs           map[*subscriber]struct{}
	events         []hubEvent // kept events, oldest first
	firstSeq       uint64     // sequence number of events[0]
	nextSeq        uint64     // sequence number the next event gets
	bytesTotal     int64      // bytes of all events appended so far
	lastStart      int64      // where the newest event starts, in bytesTotal
	ids            map[string]uint64
	inFlight       bool          // the upstream is inside an event: a new client starts after it
	notify         chan struct{} // closed and replaced at every new event and at the end
	endReason      endReason
	upstreamLastID string // the last id the upstream sent, for reconnects
	lingerTimer    timer
	lingerGen      uint64 // tells a stale linger timer from the current one
	released       bool
}

// hubEvent is one whole event as the upstream sent it.
type hubEvent struct {
	data  []byte
	id    string
	start int64 // in bytesTotal
}

// subscriber is one client of a hub.
type subscriber struct {
	s *stream
	// pos and posStart are guarded by hub.mu; the client's own feeder
	// writes them under its read lock, since it alone does.
	pos      uint64 // next event to send
	posStart int64  // where it starts in bytesTotal
	// allow is how far behind it may fall: max_backlog, or what it had
	// to catch up on when it came back to replay, if that is more.
	allow   int64 // guarded by hub.mu
	writing atomic.Bool
	dropped atomic.Bool
}

var errHubGone = errors.New("sse: shared stream released")

// feeder is the next handler of a stream that shares its upstream.
func (set *hubSet) feeder(s *stream, next caddyhttp.Handler) caddyhttp.Handler {
	return caddyhttp.HandlerFunc(func(w http.ResponseWriter, r *http.Request) error {
		return set.serve(s, w, r, next)
	})
}

// join adds sub to the key's hub, starting one if there is none.
func (set *hubSet) join(key string, sub *subscriber, r *http.Request, next caddyhttp.Handler) (hb *hub, starter bool) {
	set.mu.Lock()
	defer set.mu.Unlock()
	if hb = set.hubs[key]; hb != nil {
		hb.mu.Lock()
		if !hb.released && hb.state != hubEnded && hb.state != hubRelay {
			hb.addLocked(sub, r)
			hb.mu.Unlock()
			return hb, false
		}
		hb.mu.Unlock()
	}
	hb = set.newHub(key, r)
	hb.addLocked(sub, r)
	set.hubs[key] = hb
	go hb.run(next)
	return hb, true
}

func (set *hubSet) newHub(key string, r *http.Request) *hub {
	// The hub's context is the first request's, without its cancellation:
	// the hub ends it. Its vars are a copy, since the upstream's handlers
	// write to them while the first request goes on.
	ctx := context.WithoutCancel(r.Context())
	if vars, ok := ctx.Value(caddyhttp.VarsCtxKey).(map[string]any); ok {
		copied := make(map[string]any, len(vars))
		for k, v := range vars {
			copied[k] = v
		}
		ctx = context.WithValue(ctx, caddyhttp.VarsCtxKey, copied)
	}
	ctx, cancel := context.WithCancelCause(ctx)
	base := r.Clone(ctx)
	var prefix [6]byte
	_, _ = crand.Read(prefix[:])
	sseMetrics.hubs.Inc()
	return &hub{
		set: set, key: key, ctx: ctx, cancel: cancel, base: base,
		idPrefix: hex.EncodeToString(prefix[:]) + "-",
		ready:    make(chan struct{}),
		done:     make(chan struct{}),
		relay:    make(chan []byte),
		relayAck: make(chan error),
		subs:     make(map[*subscriber]struct{}),
		ids:      make(map[string]uint64),
		notify:   make(chan struct{}),
	}
}

// addLocked adds a client: from the next event on, or after the event its
// Last-Event-ID names if that is kept.
func (hb *hub) addLocked(sub *subscriber, r *http.Request) {
	if hb.lingerTimer != nil {
		hb.lingerTimer.Stop()
		hb.lingerTimer = nil
		hb.lingerGen++
	}
	hb.subs[sub] = struct{}{}
	sseMetrics.subscribers.Inc()
	sub.pos, sub.posStart = hb.nextSeq, hb.bytesTotal
	sub.allow = hb.set.conf.MaxBacklog
	if hb.inFlight {
		sub.pos++
	}
}

// position places a client that has Last-Event-ID, once the hub is live,
// and tells whether its id was found.
func (hb *hub) positionLocked(sub *subscriber, lastID string) bool {
	seq, ok := hb.ids[lastID]
	replay := uint64(*hb.set.conf.Replay)
	if !ok || seq < hb.firstSeq || hb.nextSeq-seq > replay {
		return false
	}
	if seq+1 < sub.pos {
		// Those that came after it, the one in flight included.
		sub.pos = seq + 1
		if sub.pos < hb.nextSeq {
			sub.posStart = hb.events[sub.pos-hb.firstSeq].start
			sub.allow = max(sub.allow, hb.lastStart-sub.posStart)
			sseMetrics.replayed.Add(float64(hb.nextSeq - sub.pos))
		} else {
			sub.posStart = hb.bytesTotal
		}
	}
	return true
}

// leave removes a client; the last one releases the upstream, after linger.
func (hb *hub) leave(sub *subscriber) {
	hb.mu.Lock()
	if _, ok := hb.subs[sub]; !ok {
		hb.mu.Unlock()
		return
	}
	delete(hb.subs, sub)
	sseMetrics.subscribers.Dec()
	empty := len(hb.subs) == 0
	hb.mu.Unlock()
	if empty {
		hb.set.idle(hb, 0)
	}
}

// idle releases a hub that has no clients left, after linger unless the
// handler drains. gen is 0 from a client leaving, or the linger timer's
// generation when it fires.
func (set *hubSet) idle(hb *hub, gen uint64) {
	set.mu.Lock()
	defer set.mu.Unlock()
	hb.mu.Lock()
	defer hb.mu.Unlock()
	if len(hb.subs) > 0 || hb.released {
		return
	}
	linger := time.Duration(set.conf.Linger)
	if gen == 0 && linger > 0 && !set.draining && hb.state == hubLive {
		if hb.lingerTimer == nil {
			hb.lingerGen++
			g := hb.lingerGen
			hb.lingerTimer = set.h.clock.AfterFunc(linger, func() { set.idle(hb, g) })
		}
		return
	}
	if gen != 0 && gen != hb.lingerGen {
		return // a linger that a client's return cancelled
	}
	hb.lingerTimer = nil
	set.releaseLocked(hb)
}

// releaseLocked forgets the hub and ends its upstream request.
func (set *hubSet) releaseLocked(hb *hub) {
	if set.hubs[hb.key] == hb {
		delete(set.hubs, hb.key)
	}
	if !hb.released {
		hb.released = true
		if hb.lingerTimer != nil {
			hb.lingerTimer.Stop()
			hb.lingerTimer = nil
		}
	}
	hb.cancel(errHubGone)
}

// drain releases the hubs that have no clients at once and every hub at the
// drain's hard stop at the latest; their clients drain as streams.
func (set *hubSet) drain(window time.Duration) {
	set.mu.Lock()
	defer set.mu.Unlock()
	if set.draining {
		return
	}
	set.draining = true
	for _, hb := range set.hubs {
		hb.mu.Lock()
		if len(hb.subs) == 0 {
			set.releaseLocked(hb)
		}
		hb.mu.Unlock()
	}
	set.h.clock.AfterFunc(window+cutAfter, set.stopAll)
}

// stopAll releases every hub.
func (set *hubSet) stopAll() {
	set.mu.Lock()
	defer set.mu.Unlock()
	for _, hb := range set.hubs {
		hb.mu.Lock()
		set.releaseLocked(hb)
		hb.mu.Unlock()
	}
}

// serve is one client of a shared stream, inside its stream (s, w).
func (set *hubSet) serve(s *stream, w http.ResponseWriter, r *http.Request, next caddyhttp.Handler) error {
	sub := &subscriber{s: s}
	hb, starter := set.join(set.key(r), sub, r, next)
	select {
	case <-hb.ready:
	case <-r.Context().Done():
		hb.leave(sub)
		return nil
	}
	hb.mu.Lock()
	state := hb.state
	hb.mu.Unlock()
	if state == hubRelay || state == hubEnded && hb.header == nil {
		if !starter {
			// Not shared after all: this request goes on its own.
			hb.leave(sub)
			return next.ServeHTTP(w, r)
		}
		// The starter stays until the relay is over: its leaving would
		// release the upstream request.
		defer hb.leave(sub)
		return hb.relayTo(w, r)
	}
	return hb.feed(sub, w, r)
}

// relayTo gives the starter the response that turned out not to be an event
// stream, as the next handler wrote it.
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

// feed writes the shared stream to one client: the header, then every event
// from its position on, until the stream or the hub ends.
func (hb *hub) feed(sub *subscriber, w http.ResponseWriter, r *http.Request) error {
	defer hb.leave(sub)
	hb.mu.Lock()
	if lastID := r.Header.Get("Last-Event-ID"); lastID != "" && !hb.positionLocked(sub, lastID) {
		w.Header().Set(replayHeader, "miss")
		sseMetrics.replayMisses.Inc()
	}
	for k, v := range hb.header {
		w.Header()[k] = append([]string(nil), v...) // each client's own: Caddy may add to them
	}
	status := hb.status
	hb.mu.Unlock()
	w.WriteHeader(status)
	// Every client reads the hub at once when an event comes: under the read
	// lock, so that they do not queue up on the hub's lock. Each writes only
	// its own position.
	for {
		hb.mu.RLock()
		for sub.pos >= hb.nextSeq && hb.state != hubEnded {
			ch := hb.notify
			hb.mu.RUnlock()
			select {
			case <-ch:
			case <-r.Context().Done():
				return nil
			}
			hb.mu.RLock()
		}
		if sub.pos < hb.firstSeq || hb.lastStart-sub.posStart > sub.allow || sub.dropped.Load() {
			hb.mu.RUnlock()
			sseMetrics.slowDrops.Inc()
			sub.s.closeShared(reasonSlowClient)
			return nil
		}
		if sub.pos >= hb.nextSeq {
			reason := hb.endReason
			hb.mu.RUnlock()
			sub.s.closeShared(reason)
			return nil
		}
		ev := hb.events[sub.pos-hb.firstSeq]
		sub.pos++
		sub.posStart = ev.start + int64(len(ev.data))
		sub.writing.Store(true)
		hb.mu.RUnlock()
		_, err := w.Write(ev.data)
		sub.writing.Store(false)
		if err != nil {
			if sub.dropped.Load() {
				sseMetrics.slowDrops.Inc()
			}
			return nil
		}
	}
}

// closeShared closes a client of a shared stream for reason, from its
// feeder: it stands at an event boundary, so the close sequence goes out
// at once.
func (s *stream) closeShared(reason endReason) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return
	}
	now := s.sinceStart()
	s.stopLocked(reason, now)
	if !s.closed {
		s.armLocked(now)
	}
}

// run is the hub's upstream: the first request, and the reconnects.
func (hb *hub) run(next caddyhttp.Handler) {
	defer sseMetrics.hubs.Dec()
	failures := 0
	for attempt := 0; ; attempt++ {
		hw := &hubWriter{hub: hb, header: make(http.Header), first: attempt == 0, state: newEventState()}
		hb.mu.Lock()
		hw.dedup = hb.upstreamLastID != ""
		req := hb.request()
		hb.mu.Unlock()
		err, panicked := callNext(next, hw, req)
		hb.mu.Lock()
		if hb.inFlight {
			// The half event is dropped: those who were to start after it
			// start with the next one.
			hb.inFlight = false
			for sub := range hb.subs {
				if sub.pos == hb.nextSeq+1 {
					sub.pos--
				}
			}
		}
		hb.mu.Unlock()
		if hw.first && hw.mode != hwLive {
			hb.endFirst(hw, err, panicked)
			return
		}
		if hb.ctx.Err() != nil {
			hb.end(reasonDrain)
			return
		}
		if hw.events > 0 {
			failures = 0
		}
		if failures++; failures > reconnectTries {
			hb.set.h.logger.Warn("shared stream's upstream failed every retry; its clients are closed",
				zap.String("uri", hb.base.RequestURI), zap.Int("tries", reconnectTries), zap.Error(err))
			hb.end(reasonUpstreamError)
			return
		}
		backoff := min(reconnectBase<<(failures-1), reconnectMax)
		backoff = backoff/2 + rand.N(backoff/2+1)
		sseMetrics.reconnects.Inc()
		if c := hb.set.h.logger.Check(zapcore.DebugLevel, "shared stream's upstream ended; asking again"); c != nil {
			c.Write(zap.String("uri", hb.base.RequestURI), zap.Int("try", failures),
				zap.Duration("backoff", backoff), zap.String("last_event_id", hb.lastIDForLog()), zap.Any("panic", panicked))
		}
		wake := make(chan struct{})
		t := hb.set.h.clock.AfterFunc(backoff, func() { close(wake) })
		select {
		case <-wake:
		case <-hb.ctx.Done():
			t.Stop()
			hb.end(reasonDrain)
			return
		}
	}
}

func (hb *hub) lastIDForLog() string {
	hb.mu.Lock()
	defer hb.mu.Unlock()
	return hb.upstreamLastID
}

// request is the hub's request to the upstream: the first client's,
// without its Last-Event-ID, or with the last id the upstream sent when
// the hub asks again.
func (hb *hub) request() *http.Request {
	req := hb.base.Clone(hb.ctx)
	req.Body, req.ContentLength = http.NoBody, 0
	req.Header.Del("Last-Event-ID")
	if hb.upstreamLastID != "" {
		req.Header.Set("Last-Event-ID", hb.upstreamLastID)
	}
	return req
}

func callNext(next caddyhttp.Handler, w http.ResponseWriter, r *http.Request) (err error, panicked any) {
	defer func() { panicked = recover() }()
	return next.ServeHTTP(w, r), nil
}

// endFirst settles a first attempt that brought no event stream.
func (hb *hub) endFirst(hw *hubWriter, err error, panicked any) {
	hb.runErr, hb.panicked = err, panicked
	hb.mu.Lock()
	if hb.state == hubStarting {
		hb.state = hubEnded // no header at all
	}
	hb.mu.Unlock()
	hb.set.mu.Lock()
	hb.mu.Lock()
	hb.set.releaseLocked(hb)
	hb.mu.Unlock()
	hb.set.mu.Unlock()
	hw.decide()
	close(hb.done)
}

// end ends the hub: its clients get the events they have not had, then the
// close sequence with reason.
func (hb *hub) end(reason endReason) {
	hb.set.mu.Lock()
	hb.mu.Lock()
	hb.state = hubEnded
	hb.endReason = reason
	close(hb.notify)
	hb.notify = make(chan struct{})
	hb.set.releaseLocked(hb)
	hb.mu.Unlock()
	hb.set.mu.Unlock()
}

// appendEvent adds a whole event to the ring and wakes the clients.
func (hb *hub) appendEvent(data []byte, id string, ownID bool) {
	hb.mu.Lock()
	defer hb.mu.Unlock()
	seq := hb.nextSeq
	if id == "" && hb.set.conf.AssignIDs {
		id = hb.idPrefix + strconv.FormatUint(seq, 10)
		data = append([]byte("id: "+id+"\n"), data...)
	}
	if ownID {
		hb.upstreamLastID = id
	}
	hb.events = append(hb.events, hubEvent{data: data, id: id, start: hb.bytesTotal})
	if id != "" {
		hb.ids[id] = seq
	}
	hb.lastStart = hb.bytesTotal
	hb.bytesTotal += int64(len(data))
	hb.nextSeq++
	// Keep the last replay events, and whatever a client not yet too far
	// behind still needs.
	replay := uint64(*hb.set.conf.Replay)
	maxBacklog := hb.set.conf.MaxBacklog
	for len(hb.events) > 1 && hb.nextSeq-hb.firstSeq > replay && hb.lastStart-hb.events[0].start > maxBacklog {
		if old := hb.events[0]; old.id != "" && hb.ids[old.id] == hb.firstSeq {
			delete(hb.ids, old.id)
		}
		hb.events[0] = hubEvent{}
		hb.events = hb.events[1:]
		hb.firstSeq++
	}
	close(hb.notify)
	hb.notify = make(chan struct{})
	// A client stuck in a write too far behind is cut; the others notice
	// their backlog themselves.
	for sub := range hb.subs {
		if sub.writing.Load() && hb.lastStart-sub.posStart > sub.allow && !sub.dropped.Swap(true) {
			sub.s.cutSlowClient()
		}
	}
}

// hubWriter is the response writer the hub gives the next handler.
type hubWriter struct {
	hub         *hub
	header      http.Header
	first       bool
	wroteHeader bool
	mode        hwMode
	state       eventState
	pending     []byte
	endedCR     bool // the last event ended with CR: a leading LF is its CRLF's
	dedup       bool // skip events whose id the hub has, until a new one
	events      int
	decided     bool
}

type hwMode uint8

const (
	hwWaiting hwMode = iota
	hwLive
	hwRelay
	hwDiscard
)

func (hw *hubWriter) Header() http.Header { return hw.header }

func (hw *hubWriter) WriteHeader(status int) {
	if hw.wroteHeader || status >= 100 && status <= 199 {
		return
	}
	hw.wroteHeader = true
	enc := hw.header.Get("Content-Encoding")
	stream := status == http.StatusOK && isEventStream(hw.header) && (enc == "" || strings.EqualFold(enc, "identity"))
	hb := hw.hub
	switch {
	case stream:
		hw.mode = hwLive
		if hw.first {
			hb.mu.Lock()
			hb.state, hb.status, hb.header = hubLive, status, hw.header.Clone()
			hb.header.Del("Content-Length")
			hb.mu.Unlock()
			hw.decide()
		}
	case hw.first:
		hw.mode = hwRelay
		hb.mu.Lock()
		hb.state, hb.status, hb.header = hubRelay, status, hw.header.Clone()
		hb.mu.Unlock()
		hb.set.mu.Lock()
		hb.mu.Lock()
		if hb.set.hubs[hb.key] == hb {
			delete(hb.set.hubs, hb.key) // the next request tries afresh
		}
		hb.mu.Unlock()
		hb.set.mu.Unlock()
		hw.decide()
	default:
		hw.mode = hwDiscard
	}
}

// decide tells the waiting clients that the first header is in.
func (hw *hubWriter) decide() {
	if !hw.decided && hw.first {
		hw.decided = true
		close(hw.hub.ready)
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
		case <-hb.ctx.Done():
			return 0, context.Cause(hb.ctx)
		}
	case hwLive:
		if err := hb.ctx.Err(); err != nil {
			return 0, context.Cause(hb.ctx)
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
		case <-hw.hub.ctx.Done():
		}
	}
}

// errEventTooLarge ends an upstream attempt whose event in flight grew past
// max_backlog: no client could be sent it without falling that far behind,
// and the hub must not hold an unbounded event. The hub asks again, as for
// any broken upstream.
var errEventTooLarge = errors.New("sse: a shared stream's event is larger than max_backlog")

// split cuts the upstream's bytes into whole events.
func (hw *hubWriter) split(p []byte) error {
	prefix, rest := hw.state.takeBOM(p, true)
	hw.pending = append(hw.pending, prefix...)
	for len(rest) > 0 {
		n := hw.state.scan(rest, true)
		if !hw.state.atBoundary() {
			if int64(len(hw.pending)+n) > hw.hub.set.h.Share.MaxBacklog {
				hw.pending = nil
				return errEventTooLarge
			}
			hw.pending = append(hw.pending, rest[:n]...)
			rest = rest[n:]
			continue
		}
		var chunk []byte
		if len(hw.pending) > 0 {
			chunk = append(hw.pending, rest[:n]...)
			hw.pending = nil
		} else {
			chunk = rest[:n]
		}
		rest = rest[n:]
		if hw.endedCR && len(chunk) > 0 && chunk[0] == '\n' {
			chunk = chunk[1:]
		}
		if len(chunk) == 0 {
			continue
		}
		hw.endedCR = chunk[len(chunk)-1] == '\r'
		hw.event(chunk)
	}
	inFlight := !hw.state.atBoundary()
	hb := hw.hub
	hb.mu.Lock()
	hb.inFlight = inFlight
	hb.mu.Unlock()
	return nil
}

// event takes one chunk that ends at an event boundary: an event, or
// comments and blank lines between events, which are not shared (every
// client gets its own heartbeats).
func (hw *hubWriter) event(chunk []byte) {
	hasField, id, hasID := eventFields(chunk)
	if !hasField {
		return
	}
	hb := hw.hub
	if hw.dedup {
		if hasID {
			hb.mu.Lock()
			_, seen := hb.ids[id]
			hb.mu.Unlock()
			if seen {
				return
			}
		}
		hw.dedup = false
	}
	hw.events++
	hb.appendEvent(append([]byte(nil), chunk...), id, hasID)
}

// eventFields reads a whole event: whether it has any field, and its own
// id, if it has one the client would take (no NUL).
func eventFields(chunk []byte) (hasField bool, id string, hasID bool) {
	for len(chunk) > 0 {
		end := indexLineEnd(chunk)
		line := chunk[:end]
		chunk = chunk[end:]
		if len(chunk) > 0 {
			chunk = chunk[1:]
		}
		if len(line) == 0 || line[0] == ':' {
			continue
		}
		hasField = true
		name, value, _ := strings.Cut(string(line), ":")
		value = strings.TrimPrefix(value, " ")
		if name == "id" && !strings.Contains(value, "\x00") {
			id, hasID = value, true
		}
	}
	return hasField, id, hasID
}
