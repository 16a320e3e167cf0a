package caddysse

import (
	"math/rand/v2"
	"net/http"
	"strings"
	"sync"
	"time"

	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"golang.org/x/time/rate"
)

// streamSet is a handler's open requests: every request from its arrival
// until it turns out not to be a stream or ends. It holds the stream slots
// the limits count, and reaches every open request when they must drain.
type streamSet struct {
	clock     clock
	rate      *rate.Limiter // new streams per second, if capped
	mu        sync.Mutex
	slots     int              // streams in progress or asked for, and shared upstream requests
	perClient map[string]int   // the streams, by client IP
	open      map[*stream]bool // true once a stream, false while waiting for its header
	// ended and refused count ends and refusals by reason, for the admin API.
	ended, refused reasonCounts
	// evict, when set, releases a shared stream that only lingers, so that
	// its slot can serve a request (hubRegistry.evictLingering). Called
	// without mu held.
	evict func() bool

	draining bool
	drainEnd time.Time // when the drain window closes
	cuts     int       // how many hard stops are left to make
}

// The drain's hard stop: whatever is still open this long after the drain
// window (a client that stopped reading holds its last write) is cut, and
// again every cutRepeat while anything is left, at most cutTries times.
const (
	cutAfter  = 500 * time.Millisecond
	cutRepeat = 100 * time.Millisecond
	cutTries  = 5
)

func newStreamSet(c clock, perSecond int) *streamSet {
	set := &streamSet{clock: c, perClient: make(map[string]int), open: make(map[*stream]bool)}
	if perSecond > 0 {
		set.rate = rate.NewLimiter(rate.Limit(perSecond), perSecond)
	}
	return set
}

// wantsStream reports whether the request asks for an event stream: those
// are counted, and refused if need be, before the upstream is contacted.
func wantsStream(r *http.Request) bool {
	for _, accept := range r.Header.Values("Accept") {
		if strings.Contains(accept, "text/event-stream") {
			return true
		}
	}
	return false
}

// clientIP is the client's address as Caddy determined it, honouring
// trusted_proxies.
func clientIP(r *http.Request) string {
	ip, _ := caddyhttp.GetVar(r.Context(), caddyhttp.ClientIPVarKey).(string)
	return ip
}

// acquire takes a stream slot for s, or names the limit that refuses it.
// A stream that already holds one keeps it. rate tells whether s starts an
// upstream request of its own, which max_stream_rate counts; a client of a
// shared stream is counted when it does (takeRate, acquireHubSlot).
func (set *streamSet) acquire(s *stream, rate bool) (refusedBy endReason) {
	h := s.h
	if h.MaxStreams == 0 && h.MaxStreamsPerClient == 0 && (set.rate == nil || !rate) {
		return ""
	}
	client := clientIP(s.req)
	for evicted := false; ; evicted = true {
		set.mu.Lock()
		switch {
		case s.holdsSlot:
			set.mu.Unlock()
			return ""
		case h.MaxStreams > 0 && set.slots >= h.MaxStreams:
			set.mu.Unlock()
			if !evicted && set.evict != nil && set.evict() {
				continue
			}
			return reasonMaxStreams
		case h.MaxStreamsPerClient > 0 && set.perClient[client] >= h.MaxStreamsPerClient:
			set.mu.Unlock()
			return reasonMaxStreamsPerClient
		case rate && set.rate != nil && !set.rate.AllowN(set.clock.Now(), 1):
			set.mu.Unlock()
			return reasonMaxStreamRate
		}
		set.slots++
		set.perClient[client]++
		s.holdsSlot = true
		set.mu.Unlock()
		return ""
	}
}

// acquireHubSlot takes a slot for a shared stream's upstream request, which
// holds it as long as the hub exists, linger included, and counts it
// against max_stream_rate; or names the limit that refuses it.
func (set *streamSet) acquireHubSlot(max int) endReason {
	for evicted := false; ; evicted = true {
		set.mu.Lock()
		if max > 0 && set.slots >= max {
			set.mu.Unlock()
			if !evicted && set.evict != nil && set.evict() {
				continue
			}
			return reasonMaxStreams
		}
		if set.rate != nil && !set.rate.AllowN(set.clock.Now(), 1) {
			set.mu.Unlock()
			return reasonMaxStreamRate
		}
		set.slots++
		set.mu.Unlock()
		return ""
	}
}

// releaseHubSlot gives back a shared stream's slot.
func (set *streamSet) releaseHubSlot() {
	set.mu.Lock()
	set.slots--
	set.mu.Unlock()
}

// moveHubSlot moves a shared stream's slot to the new configuration's set,
// which counts it even past its max_streams.
func (set *streamSet) moveHubSlot(to *streamSet) {
	if set == to {
		return
	}
	set.releaseHubSlot()
	to.mu.Lock()
	to.slots++
	to.mu.Unlock()
}

// takeRate counts a request of a shared route that goes upstream on its own
// against max_stream_rate.
func (set *streamSet) takeRate() endReason {
	if set.rate != nil && !set.rate.AllowN(set.clock.Now(), 1) {
		return reasonMaxStreamRate
	}
	return ""
}

// release gives back s's slot, if it holds one.
func (set *streamSet) release(s *stream) {
	set.mu.Lock()
	defer set.mu.Unlock()
	if !s.holdsSlot {
		return
	}
	s.holdsSlot = false
	set.slots--
	client := clientIP(s.req)
	if set.perClient[client]--; set.perClient[client] <= 0 {
		delete(set.perClient, client)
	}
}

// add registers a request as it arrives. One that arrives while the set
// drains drains too, within what is left of the window.
func (set *streamSet) add(s *stream) {
	set.mu.Lock()
	defer set.mu.Unlock()
	set.open[s] = false
	if set.draining {
		set.drainLocked(s, max(set.drainEnd.Sub(set.clock.Now()), 0))
	}
}

// remove unregisters a request that is done or not a stream.
func (set *streamSet) remove(s *stream) {
	set.mu.Lock()
	defer set.mu.Unlock()
	delete(set.open, s)
	if s.drainTimer != nil {
		s.drainTimer.Stop()
		s.drainTimer = nil
	}
}

// drain ends every open request, and every request that arrives from now
// on, at a random moment within window (stream.stopNow), then cuts what is
// still open shortly after the window. Only the first call acts.
func (set *streamSet) drain(window time.Duration) {
	set.mu.Lock()
	defer set.mu.Unlock()
	if set.draining {
		return
	}
	set.draining = true
	set.drainEnd = set.clock.Now().Add(window)
	for s := range set.open {
		set.drainLocked(s, window)
	}
	set.cuts = cutTries
	set.clock.AfterFunc(window+cutAfter, set.cut)
}

// drainLocked schedules s's drain at a random moment within window.
func (set *streamSet) drainLocked(s *stream, window time.Duration) {
	if s.drainTimer == nil {
		s.drainTimer = set.clock.AfterFunc(rand.N(window+1), func() { s.stopNow(reasonDrain) })
	}
}

// cut ends whatever is still open at once (stream.cut).
func (set *streamSet) cut() {
	set.mu.Lock()
	defer set.mu.Unlock()
	for s := range set.open {
		s.cut(reasonDrain)
	}
	if set.cuts--; set.cuts > 0 && len(set.open) > 0 {
		set.clock.AfterFunc(cutRepeat, set.cut)
	}
}
