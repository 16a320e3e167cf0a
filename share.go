package caddysse

import (
	"crypto/sha256"
	"encoding/json"
	"fmt"
	"net/http"
	"slices"
	"strings"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
)

// Shared streams (the share option): one upstream request per key, its
// events fanned out to every client that asks for the same stream. This
// file is a client's side: the key, joining a hub, and the feed that writes
// the hub's events to the client. The parts:
//
//   - hubs.go: the registry of hubs, kept across reloads in a UsagePool;
//   - hub.go: one hub, its upstream requests and their backoff, the
//     splitting of the upstream's bytes into events, the relay of a
//     response that is not shared;
//   - ring.go: the kept events, their ids and positions.
//
// Every client is an ordinary stream (stream.go) whose next handler is
// serveShared: the feed writes the response header the hub got, then each
// event from the ring through the stream's own Write, so heartbeats, the
// close sequence, write timeouts, idle_timeout, max_lifetime, drain,
// limits, metrics and the debug line all work per client. All clients
// write the same event bytes; nothing is copied per client.

// ShareConfig makes the handler share one upstream stream among all the
// clients that ask for the same one (see README, "Shared streams").
type ShareConfig struct {
	// Key names the shared stream; requests with the same key share one
	// upstream request. It takes placeholders, replaced per request, and is
	// used exactly as given (plus the host and path), so a key that leaves out who
	// the user is shares one user's stream with everyone: use it only for
	// broadcast streams. A request for which any placeholder of the key is
	// unknown or empty is not shared: it gets an upstream request of its
	// own. The path is always part of the key. Default: empty, which keys
	// by host, path and query plus a digest of every request header but
	// those browsers vary without naming anyone (see keyIgnores), of the
	// TLS client certificate and of the client's IP address, so requests
	// that could be of different users never share.
	// Last-Event-ID (and the last_event_id_query parameter) is never part
	// of the key.
	Key string `json:"key,omitempty"`

	// Replay is how many of the latest events are kept (within
	// MaxBacklog bytes) so that a client that comes back with
	// Last-Event-ID gets the events it missed before going live. A client
	// whose id is not among them goes live at once and gets the response
	// header `X-SSE-Replay: miss`. Default: 256. 0 disables replay.
	Replay *int `json:"replay,omitempty"`

	// Linger is how long the upstream request is kept after the last
	// client left, so that a client that reconnects (after `retry`) finds
	// it running and replays what it missed. Default: twice the handler's
	// retry, and at least 10s. A negative value releases the upstream as
	// soon as the last client leaves.
	Linger caddy.Duration `json:"linger,omitempty"`

	// AssignIDs gives each event that has no id field of the upstream's
	// an id of the gateway's (a random prefix per shared stream and a
	// sequence number), inserted as an `id:` line at the start of the
	// event, so clients of an upstream without ids can resume too. Events
	// with the upstream's own id field, even an empty one, keep it.
	// Gateway ids are never sent upstream. Default: false.
	AssignIDs bool `json:"assign_ids,omitempty"`

	// MaxBacklog is how many bytes of events (not counting the newest) a
	// client may be behind the upstream before it is closed with reason
	// slow_client; it can come back and replay what it missed. A slow
	// client never slows the others or the upstream. It also bounds what a
	// shared stream keeps for replay, and one event: an event in flight
	// that grows past it ends the upstream request, which is asked again.
	// In bytes. Default: 1 MiB.
	MaxBacklog int64 `json:"max_backlog,omitempty"`

	// StoreRaw is where the shared streams' events are kept: a module in
	// the namespace http.handlers.sse.stores, named by its "backend" key.
	// memory keeps them in this gateway alone; a store such as nats
	// (github.com/ssegateway/caddy-sse/natsstore) shares each stream, its
	// upstream request and its ids among a fleet of gateways (see README,
	// "Running a fleet"). Default: memory.
	StoreRaw json.RawMessage `json:"store,omitempty" caddy:"namespace=http.handlers.sse.stores inline_key=backend"`

	store Store // nil for memory
}

const (
	defaultReplay     = 256
	defaultMaxBacklog = 1 << 20
	minDefaultLinger  = 10 * time.Second

	// replayHeader says that a client's Last-Event-ID was not among the
	// kept events: it went live from now on.
	replayHeader = "X-SSE-Replay"
)

// provision sets the share defaults, retry being the handler's, and loads
// the store.
func (c *ShareConfig) provision(ctx caddy.Context, retry time.Duration) error {
	if c.Replay == nil {
		n := defaultReplay
		c.Replay = &n
	}
	if c.MaxBacklog == 0 {
		c.MaxBacklog = defaultMaxBacklog
	}
	if c.Linger == 0 {
		c.Linger = caddy.Duration(max(2*retry, minDefaultLinger))
	}
	if c.StoreRaw != nil {
		mod, err := ctx.LoadModule(c, "StoreRaw")
		if err != nil {
			return fmt.Errorf("share: loading store: %v", err)
		}
		if _, memory := mod.(*MemoryStore); !memory {
			c.store = mod.(Store)
		}
	}
	return nil
}

// validate checks the share options.
func (c *ShareConfig) validate() error {
	if c.Replay != nil && *c.Replay < 0 {
		return fmt.Errorf("share: replay must not be negative, got %d", *c.Replay)
	}
	if c.MaxBacklog < 0 {
		return fmt.Errorf("share: max_backlog must not be negative, got %d", c.MaxBacklog)
	}
	return nil
}

// keyIgnores reports whether the default key leaves out a request header
// (in canonical form): headers browsers and proxies vary without naming
// anyone. Everything else a request carries could name its user (an API
// key under any name, a header that forward_auth copied in), so it is part
// of the key: the key fails closed. X-Forwarded-User and its kind are not
// left out: auth proxies set them.
func keyIgnores(name string) bool {
	switch name {
	case "Accept", "Accept-Charset", "Accept-Encoding", "Accept-Language",
		"Cache-Control", "Pragma", "Priority", "User-Agent", "Referer", "Origin",
		"Last-Event-Id", "Dnt", "Upgrade-Insecure-Requests",
		"Connection", "Keep-Alive", "Te", "Upgrade", "Via",
		"Forwarded", "X-Forwarded-For", "X-Forwarded-Host", "X-Forwarded-Proto", "X-Forwarded-Port", "X-Real-Ip":
		return true
	}
	return strings.HasPrefix(name, "Sec-") // set by browsers alone (fetch metadata, client hints)
}

// shareKey is the request's shared-stream key, or false when the request
// is not to be shared: its configured key has a placeholder that is
// unknown or empty for it.
func (h *Handler) shareKey(r *http.Request) (string, bool) {
	if key := h.Share.Key; key != "" {
		repl, _ := r.Context().Value(caddy.ReplacerCtxKey).(*caddy.Replacer)
		if repl == nil {
			repl = caddy.NewReplacer()
		}
		key, err := repl.ReplaceOrErr(key, true, true)
		if err != nil {
			return "", false
		}
		return r.Host + "\x00" + routePath(r) + "\x00" + key, true
	}
	names := make([]string, 0, len(r.Header))
	for name := range r.Header {
		if !keyIgnores(name) {
			names = append(names, name)
		}
	}
	slices.Sort(names)
	digest := sha256.New()
	for _, name := range names {
		digest.Write([]byte(name))
		for _, v := range r.Header[name] {
			digest.Write([]byte{0})
			digest.Write([]byte(v))
		}
		digest.Write([]byte{1})
	}
	if r.TLS != nil && len(r.TLS.PeerCertificates) > 0 {
		digest.Write([]byte{2})
		digest.Write(r.TLS.PeerCertificates[0].Raw)
	}
	// The client's address too: a handler after sse (a remote_ip
	// matcher, an upstream that checks X-Forwarded-For) may decide on it.
	digest.Write([]byte{3})
	if ip := clientIP(r); ip != "" {
		digest.Write([]byte(ip))
	} else {
		digest.Write([]byte(r.RemoteAddr))
	}
	return r.Host + "\x00" + routePath(r) + "\x00" + r.URL.RawQuery + "\x00" + string(digest.Sum(nil)), true
}

// routePath is the request's path as it came and as it is now (after
// handle_path, strip_prefix or rewrite): part of every key, it keeps routes
// apart, so that a route never joins another's shared stream, even when a
// reload reorders them (hubs.go).
func routePath(r *http.Request) string {
	if orig, ok := r.Context().Value(caddyhttp.OriginalRequestCtxKey).(http.Request); ok && orig.URL != nil {
		return orig.URL.Path + "\x00" + r.URL.Path
	}
	return r.URL.Path
}

// serveShared is one client of a shared stream, inside its stream (s, w):
// the stream's next handler.
func (h *Handler) serveShared(s *stream, w http.ResponseWriter, r *http.Request, next caddyhttp.Handler) error {
	key, ok := h.shareKey(r)
	if !ok {
		sseMetrics.unshared.WithLabelValues(string(unsharedKeyUnknown)).Inc()
		if c := h.logger.Check(zapcore.DebugLevel, "not shared: a placeholder of the share key is unknown or empty"); c != nil {
			c.Write(zap.String("uri", r.RequestURI), zap.String("key", h.Share.Key))
		}
		return h.serveAlone(s, w, r, next)
	}
	sub := &subscriber{s: s}
	hb, starter, refused := h.hubs.join(key, sub, h, r, next)
	if refused != "" {
		s.refuseNow(refused)
		return nil
	}
	select {
	case <-hb.ready:
	case <-r.Context().Done():
		hb.leave(sub)
		return nil
	}
	hb.mu.RLock()
	state, header, refusal := hb.state, hb.header, hb.refusal
	hb.mu.RUnlock()
	switch {
	case state == hubFailed:
		hb.leave(sub)
		s.refuseNow(refusal)
		return nil
	case state == hubLive || state == hubEnded && header != nil:
		return hb.feed(sub, w, r)
	case !starter:
		// Not shared after all: this request goes on its own.
		hb.leave(sub)
		return h.serveAlone(s, w, r, next)
	}
	// The starter stays until the relay is over: its leaving would release
	// the upstream request.
	defer hb.leave(sub)
	return hb.relayTo(w, r)
}

// unsharedReason says why a request of a shared route got an upstream
// request of its own.
type unsharedReason string

const (
	unsharedKeyUnknown unsharedReason = "key_unknown"
	unsharedPerUser    unsharedReason = "per_user_response"
	unsharedNotAStream unsharedReason = "not_a_stream"
)

var unsharedReasons = []unsharedReason{unsharedKeyUnknown, unsharedPerUser, unsharedNotAStream}

// serveAlone serves a request of a shared route with an upstream request of
// its own, which max_stream_rate counts.
func (h *Handler) serveAlone(s *stream, w http.ResponseWriter, r *http.Request, next caddyhttp.Handler) error {
	if reason := h.streams.takeRate(); reason != "" {
		s.refuseNow(reason)
		return nil
	}
	return next.ServeHTTP(w, r)
}

// refuseNow turns away a request whose next handler has not answered: the
// stream refuses it once its next handler returns (stream.serve).
func (s *stream) refuseNow(reason endReason) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.mode == waiting && !s.closed {
		s.refuseLocked(reason)
	}
}

// addLocked adds a client, from the next event on; feed places it at its
// Last-Event-ID, if any.
func (hb *hub) addLocked(sub *subscriber) {
	if hb.lingerTimer != nil {
		hb.lingerTimer.Stop()
		hb.lingerTimer = nil
		hb.lingerGen++
	}
	hb.subs[sub] = struct{}{}
	sseMetrics.subscribers.Inc()
	sub.pos, sub.posStart = hb.ring.next, hb.ring.total
}

// positionLocked places a client that came back with lastID, and tells
// whether its id was found among the kept events.
func (hb *hub) positionLocked(sub *subscriber, lastID string) bool {
	seq, ok := hb.ring.after(lastID)
	if !ok {
		return false
	}
	if seq < sub.pos {
		sseMetrics.replayed.Add(float64(sub.pos - seq))
		sub.pos, sub.posStart = seq, hb.ring.startOf(seq)
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
		hb.reg.idle(hb, 0)
	}
}

// feed writes the shared stream to one client: the header, then every event
// from its position on, until the stream or the hub ends.
func (hb *hub) feed(sub *subscriber, w http.ResponseWriter, r *http.Request) error {
	defer hb.leave(sub)
	sub.s.shared = true
	lastID := r.Header.Get("Last-Event-ID")
	if lastID != "" && hb.fleetPrefix != "" {
		hb.awaitLogged(r.Context(), lastID)
	}
	hb.mu.Lock()
	if lastID != "" && !hb.positionLocked(sub, lastID) {
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
	maxBacklog := hb.handler().Share.MaxBacklog
	for {
		hb.mu.RLock()
		rg := hb.ring
		for sub.pos >= rg.next && hb.state != hubEnded {
			ch := hb.notify
			hb.mu.RUnlock()
			select {
			case <-ch:
			case <-r.Context().Done():
				return nil
			}
			hb.mu.RLock()
		}
		if sub.pos < rg.first || rg.newestStart()-sub.posStart > maxBacklog || sub.dropped.Load() {
			hb.mu.RUnlock()
			sseMetrics.slowDrops.Inc()
			sub.s.stopNow(reasonSlowClient)
			return nil
		}
		if sub.pos >= rg.next {
			reason := hb.endReason
			hb.mu.RUnlock()
			sub.s.stopNow(reason)
			return nil
		}
		ev := rg.at(sub.pos)
		data := ev.data
		sub.pos++
		sub.posStart = ev.start + int64(len(data))
		sub.writing.Store(true)
		hb.mu.RUnlock()
		_, err := w.Write(data)
		sub.writing.Store(false)
		if err != nil {
			if sub.dropped.Load() {
				sseMetrics.slowDrops.Inc()
			}
			return nil
		}
	}
}
