package caddysse

import (
	"fmt"
	"net/http"
	"sync"
	"sync/atomic"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
)

// Shared streams outlive a config reload, the way reverse_proxy's upstream
// hosts do (reverseproxy/hosts.go): the hubs of a server's sse handler live
// in a registry kept in hubPool, reference-counted by the handler instances
// that use it. A reload provisions the new configuration's handler, which
// finds the same registry and adopts its hubs (their max_streams slots and
// options), before the old one is cleaned up; the old configuration's
// clients drain and come back to the same hubs, with replay from the same
// rings. When no loaded configuration uses a registry any more, it drains
// and releases its hubs (Destruct).
var hubPool = caddy.NewUsagePool()

// hubRegistry is the hubs of one server's sse handler with one share key,
// by key.
type hubRegistry struct {
	// current is the newest handler that uses the registry: its options
	// apply to every hub, and its clock and logger serve them.
	current atomic.Pointer[Handler]

	// Lock order: stream.mu, then hubRegistry.mu, then hub.mu, then
	// streamSet.mu. A stream's lock is never taken under the others (a
	// stream refused at its header, under its lock, may release a lingering
	// hub for its slot), and a streamSet's lock is never held while taking
	// the others (streamSet.evict is called without it).
	mu       sync.Mutex
	owners   []*Handler // the handlers that use it, oldest first
	hubs     map[string]*hub
	failures map[string]hubFailure
	draining bool
	adminKey []byte // of the hubs' digests in the admin API (admin.go)
	// storeDown is set while the store fails, so that an outage is
	// logged once (fleet.go).
	storeDown atomic.Bool
	// scope is the registry's key in hubPool (its server, its place among
	// the server's share handlers, its share key), set when it is made: a
	// store's log names hold it, so that two routes never share a log,
	// as they never share a hub (logName).
	scope string
}

// hubFailure is a key whose upstream failed: requests for it are refused
// until retryAt, and the next attempt waits longer if it fails too.
type hubFailure struct {
	reason  endReason
	count   int
	retryAt time.Time
}

// hubPoolKey names the registry of a handler: its server's name, its
// place among the server's sse handlers with share (the order Caddy
// provisions them in, which a reload that keeps the routes keeps), and its
// share key. handlerCount is the pool's count of those handlers for this
// loaded server, which the handler gives back at Cleanup.
func hubPoolKey(srv *caddyhttp.Server, key string) (poolKey string, handlerCount any) {
	handlerCount = shareHandlersOf{srv}
	count, _ := hubPool.LoadOrStore(handlerCount, new(atomic.Int32))
	n := count.(*atomic.Int32).Add(1)
	return fmt.Sprintf("sse.share\x00%s\x00%d\x00%s", srv.Name(), n, key), handlerCount
}

// shareHandlersOf keys, in hubPool, the count of a loaded server's sse
// handlers with share.
type shareHandlersOf struct{ srv *caddyhttp.Server }

func newHubRegistry() *hubRegistry {
	return &hubRegistry{hubs: make(map[string]*hub), failures: make(map[string]hubFailure)}
}

// logName is the name a store knows the shared stream of key by: a digest
// of the registry's scope and the key.
func (reg *hubRegistry) logName(key string) string {
	if reg.scope == "" {
		return LogName(key)
	}
	return LogName(reg.scope + "\x00" + key)
}

// handler is the newest configuration's handler.
func (reg *hubRegistry) handler() *Handler { return reg.current.Load() }

// adopt makes h the registry's newest handler: its options apply to the
// hubs, whose upstream requests count against its max_streams from now on.
func (reg *hubRegistry) adopt(h *Handler) {
	reg.mu.Lock()
	defer reg.mu.Unlock()
	reg.owners = append(reg.owners, h)
	reg.current.Store(h)
	for _, hb := range reg.hubs {
		hb.slots.moveHubSlot(h.streams)
		hb.slots = h.streams
	}
	h.streams.evict = reg.evictLingering
}

// leave is h's Cleanup: the newest handler left takes over.
func (reg *hubRegistry) leave(h *Handler) {
	reg.mu.Lock()
	defer reg.mu.Unlock()
	for i, o := range reg.owners {
		if o == h {
			reg.owners = append(reg.owners[:i], reg.owners[i+1:]...)
			break
		}
	}
	if len(reg.owners) == 0 {
		return // h's options serve the drain (Destruct)
	}
	newest := reg.owners[len(reg.owners)-1]
	reg.current.Store(newest)
	for _, hb := range reg.hubs {
		if hb.slots == h.streams {
			hb.slots.moveHubSlot(newest.streams)
			hb.slots = newest.streams
		}
	}
}

// Destruct drains the registry once no configuration uses it: hubs without
// clients are released at once, the others as their last client leaves
// (the handlers drain their clients) and at the drain's hard stop at the
// latest, so that nothing outlives a stop.
func (reg *hubRegistry) Destruct() error {
	h := reg.handler()
	reg.mu.Lock()
	defer reg.mu.Unlock()
	if reg.draining {
		return nil
	}
	reg.draining = true
	for _, hb := range reg.hubs {
		hb.mu.RLock()
		idle := len(hb.subs) == 0
		hb.mu.RUnlock()
		if idle {
			reg.releaseLocked(hb)
		}
	}
	h.clock.AfterFunc(time.Duration(h.DrainWindow)+cutAfter, reg.releaseAll)
	return nil
}

func (reg *hubRegistry) releaseAll() {
	reg.mu.Lock()
	defer reg.mu.Unlock()
	for _, hb := range reg.hubs {
		reg.releaseLocked(hb)
	}
}

// join adds sub, a client of h whose request is r, to the hub of key,
// starting one if there is none. A key whose upstream failed a moment ago,
// or a new upstream request over h's limits, refuses it instead.
func (reg *hubRegistry) join(key string, sub *subscriber, h *Handler, r *http.Request, next caddyhttp.Handler) (hb *hub, starter bool, refused endReason) {
	reg.mu.Lock()
	if hb, refused, found := reg.joinLocked(key, sub, h, next); found {
		reg.mu.Unlock()
		return hb, false, refused
	}
	if f, ok := reg.failures[key]; ok && h.clock.Now().Before(f.retryAt) {
		reg.mu.Unlock()
		return nil, false, f.reason
	}
	if reg.draining {
		reg.mu.Unlock()
		return nil, false, reasonDrain
	}
	reg.mu.Unlock()
	// A slot for the upstream request, which may release a lingering hub.
	if reason := h.streams.acquireHubSlot(h.MaxStreams); reason != "" {
		return nil, false, reason
	}
	reg.mu.Lock()
	defer reg.mu.Unlock()
	if hb, refused, found := reg.joinLocked(key, sub, h, next); found {
		// Another client started one meanwhile.
		h.streams.releaseHubSlot()
		return hb, false, refused
	}
	hb = reg.newHub(key, h, r, next)
	hb.slots = h.streams
	hb.mu.Lock()
	hb.addLocked(sub)
	hb.mu.Unlock()
	reg.hubs[key] = hb
	if store := h.Share.store; store != nil {
		go hb.runFleet(store)
	} else {
		go hb.run()
	}
	return hb, true, ""
}

// joinLocked adds sub to the running hub of key, or refuses it if that
// hub's first attempt failed a moment ago (nobody asks again before the
// backoff, recordFailure); found is false when there is no such hub (none,
// or one that is ending, whose place a new one takes).
func (reg *hubRegistry) joinLocked(key string, sub *subscriber, h *Handler, next caddyhttp.Handler) (hb *hub, refused endReason, found bool) {
	hb = reg.hubs[key]
	if hb == nil || hb.released {
		return nil, "", false
	}
	hb.mu.Lock()
	defer hb.mu.Unlock()
	switch hb.state {
	case hubFailed:
		return nil, hb.refusal, true
	case hubStarting, hubLive:
		if h == reg.handler() && hb.nextOwner != h {
			// The newest configuration's next handler serves the hub's
			// next upstream request.
			hb.next, hb.nextOwner = next, h
		}
		hb.addLocked(sub)
		return hb, "", true
	}
	return nil, "", false
}

// recordFailure refuses key's requests for a backoff, longer for each
// failure in a row.
func (reg *hubRegistry) recordFailure(key string, reason endReason) {
	now := reg.handler().clock.Now()
	reg.mu.Lock()
	defer reg.mu.Unlock()
	f := reg.failures[key]
	if now.After(f.retryAt.Add(reconnectMax)) {
		f.count = 0 // an old failure
	}
	f.count++
	f.reason, f.retryAt = reason, now.Add(backoff(f.count))
	if len(reg.failures) >= 64 {
		for k, old := range reg.failures {
			if now.After(old.retryAt.Add(reconnectMax)) {
				delete(reg.failures, k)
			}
		}
	}
	reg.failures[key] = f
}

// clearFailure forgets key's failures once its upstream sends a stream.
func (reg *hubRegistry) clearFailure(key string) {
	reg.mu.Lock()
	defer reg.mu.Unlock()
	delete(reg.failures, key)
}

// forget removes a hub whose first response goes to its starter alone: the
// next request for the key tries afresh, and the starter's own stream slot
// counts the upstream request from now on.
func (reg *hubRegistry) forget(hb *hub) {
	reg.mu.Lock()
	defer reg.mu.Unlock()
	if reg.hubs[hb.key] == hb {
		delete(reg.hubs, hb.key)
	}
	if hb.slots != nil {
		hb.slots.releaseHubSlot()
		hb.slots = nil
	}
}

// release forgets the hub and ends its upstream request.
func (reg *hubRegistry) release(hb *hub) {
	reg.mu.Lock()
	defer reg.mu.Unlock()
	reg.releaseLocked(hb)
}

func (reg *hubRegistry) releaseLocked(hb *hub) {
	if reg.hubs[hb.key] == hb {
		delete(reg.hubs, hb.key)
	}
	if hb.slots != nil {
		hb.slots.releaseHubSlot()
		hb.slots = nil
	}
	hb.mu.Lock()
	if !hb.released {
		hb.released = true
		if hb.lingerTimer != nil {
			hb.lingerTimer.Stop()
			hb.lingerTimer = nil
		}
	}
	hb.mu.Unlock()
	hb.cancel(errHubGone)
}

// idle releases a hub that has no clients left, after linger unless the
// registry drains. gen is 0 from a client leaving, or the linger timer's
// generation when it fires.
func (reg *hubRegistry) idle(hb *hub, gen uint64) {
	h := reg.handler()
	reg.mu.Lock()
	hb.mu.Lock()
	if len(hb.subs) > 0 || hb.released || gen != 0 && gen != hb.lingerGen {
		hb.mu.Unlock()
		reg.mu.Unlock()
		return // back in use, gone, or a linger a client's return cancelled
	}
	linger := time.Duration(h.Share.Linger)
	if gen == 0 && linger > 0 && !reg.draining && hb.state == hubLive {
		if hb.lingerTimer == nil {
			hb.lingerGen++
			g := hb.lingerGen
			hb.lingerTimer = h.clock.AfterFunc(linger, func() { reg.idle(hb, g) })
		}
		hb.mu.Unlock()
		evicted := reg.boundLingerLocked(hb, h.MaxStreamsPerClient)
		reg.mu.Unlock()
		if evicted != nil {
			awaitUpstreamEnd(evicted)
		}
		return
	}
	hb.lingerTimer = nil
	hb.mu.Unlock()
	reg.releaseLocked(hb)
	reg.mu.Unlock()
}

// boundLingerLocked keeps one client from holding more lingering hubs
// than max_streams_per_client (when set), which would otherwise let it hold
// an upstream request open for every key it ever asked for: past it,
// another lingering hub it started is released, and returned.
func (reg *hubRegistry) boundLingerLocked(hb *hub, perClient int) *hub {
	if perClient <= 0 {
		return nil
	}
	var another *hub
	lingering := 0
	for _, other := range reg.hubs {
		if other.clientIP != hb.clientIP {
			continue
		}
		other.mu.RLock()
		if len(other.subs) == 0 && other.lingerTimer != nil {
			lingering++
			if other != hb {
				another = other
			}
		}
		other.mu.RUnlock()
	}
	if lingering <= perClient || another == nil {
		return nil
	}
	reg.releaseLocked(another)
	return another
}

// awaitUpstreamEnd waits, briefly, for a released hub's upstream request to
// end, so that a slot it gave up is free at the upstream too.
func awaitUpstreamEnd(hb *hub) {
	select {
	case <-hb.finished:
	case <-time.After(time.Second):
	}
}

// evictLingering releases a hub that only lingers (no clients), so that its
// max_streams slot serves a request that needs one; it reports whether it
// found one.
func (reg *hubRegistry) evictLingering() bool {
	reg.mu.Lock()
	var evicted *hub
	for _, hb := range reg.hubs {
		hb.mu.RLock()
		lingering := len(hb.subs) == 0 && hb.lingerTimer != nil
		hb.mu.RUnlock()
		if lingering {
			reg.releaseLocked(hb)
			evicted = hb
			break
		}
	}
	reg.mu.Unlock()
	if evicted == nil {
		return false
	}
	awaitUpstreamEnd(evicted)
	return true
}
