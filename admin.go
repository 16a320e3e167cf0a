package caddysse

import (
	"cmp"
	"context"
	"crypto/hmac"
	crand "crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
)

// The admin API (admin.api.sse), on Caddy's admin endpoint and behind its
// access control, the way reverse_proxy serves /reverse_proxy/upstreams:
//
//   - GET /sse/streams: each loaded sse handler's requests (open, waiting
//     for a header, draining) and its ends and refusals by reason since it
//     was loaded;
//   - GET /sse/hubs: each shared stream: clients, upstream, kept events;
//   - POST /sse/hubs/<hub>/reconnect: a shared stream asks its upstream
//     again at once, with Last-Event-ID, its clients staying.
//
// The admin module holds nothing: each provisioned handler registers itself
// in hubPool (adminKey) until its Cleanup, and the hub registries are there
// already. Nothing in an answer names a user: no key, path, query, header,
// client address or credential; a shared stream is named by a keyed digest
// of its key (hubDigest), which no one can test a guess against.

func init() {
	caddy.RegisterModule(adminAPI{})
}

// adminAPI is the admin.api.sse module.
type adminAPI struct{}

// CaddyModule returns the Caddy module information.
func (adminAPI) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "admin.api.sse",
		New: func() caddy.Module { return new(adminAPI) },
	}
}

const hubsPath = "/sse/hubs"

// Routes returns the admin API's routes.
func (a adminAPI) Routes() []caddy.AdminRoute {
	return []caddy.AdminRoute{
		{Pattern: "/sse/streams", Handler: caddy.AdminHandlerFunc(a.serveStreams)},
		{Pattern: hubsPath, Handler: caddy.AdminHandlerFunc(a.serveHubs)},
		{Pattern: hubsPath + "/", Handler: caddy.AdminHandlerFunc(a.serveHub)},
	}
}

// handlerID names a loaded sse handler: its server, its place among the
// server's sse handlers (from 1, in the order Caddy provisions them, which
// is the config's; a reload that keeps the routes keeps it), and a digest
// of its configuration, defaults filled in.
type handlerID struct {
	Server string `json:"server"`
	Index  int    `json:"index"`
	Config string `json:"config"`
}

// adminEntry is a provisioned handler as the admin API finds it, in hubPool
// under adminKey from its Provision to its Cleanup.
type adminEntry struct {
	h        *Handler
	id       handlerID
	loaded   time.Time
	countKey sseHandlersOf
}

// adminKey keys a handler's adminEntry in hubPool.
type adminKey struct{ h *Handler }

// sseHandlersOf keys, in hubPool, the count of a loaded server's sse
// handlers, which gives each its index.
type sseHandlersOf struct{ srv *caddyhttp.Server }

// registerAdmin makes h known to the admin API, as a handler of srv.
func (h *Handler) registerAdmin(srv *caddyhttp.Server) error {
	conf, err := json.Marshal(h)
	if err != nil {
		return err
	}
	sum := sha256.Sum256(conf)
	e := &adminEntry{h: h, loaded: h.clock.Now(), countKey: sseHandlersOf{srv}}
	count, _ := hubPool.LoadOrStore(e.countKey, new(atomic.Int32))
	e.id = handlerID{Server: srv.Name(), Index: int(count.(*atomic.Int32).Add(1)), Config: hex.EncodeToString(sum[:])[:12]}
	h.admin = e
	hubPool.LoadOrStore(adminKey{h}, e)
	return nil
}

// unregisterAdmin is h's Cleanup for the admin API.
func (h *Handler) unregisterAdmin() {
	if h.admin == nil {
		return
	}
	_, _ = hubPool.Delete(adminKey{h})
	_, _ = hubPool.Delete(h.admin.countKey)
}

// loaded is what hubPool holds for the admin API: the handlers and the hub
// registries. The pool's lock is not held while they are read.
func loaded() (handlers []*adminEntry, registries []*hubRegistry) {
	hubPool.Range(func(_, value any) bool {
		switch v := value.(type) {
		case *adminEntry:
			handlers = append(handlers, v)
		case *hubRegistry:
			registries = append(registries, v)
		}
		return true
	})
	return handlers, registries
}

// The handlers' counts.

// reasonCounts counts ends or refusals by reason.
type reasonCounts struct {
	mu sync.Mutex
	n  map[endReason]uint64
}

func (c *reasonCounts) add(reason endReason) {
	c.mu.Lock()
	if c.n == nil {
		c.n = make(map[endReason]uint64)
	}
	c.n[reason]++
	c.mu.Unlock()
}

// snapshot is the counts, with 0 for each known reason not seen.
func (c *reasonCounts) snapshot(known []endReason) map[string]uint64 {
	out := make(map[string]uint64, len(known))
	for _, r := range known {
		out[string(r)] = 0
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	for r, n := range c.n {
		out[string(r)] = n
	}
	return out
}

// countEnded counts a stream's end, as sseMetrics.ended does.
func (set *streamSet) countEnded(reason endReason) {
	if set != nil {
		set.ended.add(reason)
	}
}

// countRefused counts a refusal, as sseMetrics.refused does.
func (set *streamSet) countRefused(reason endReason) {
	if set != nil {
		set.refused.add(reason)
	}
}

// engage marks s, still open, as a stream (no longer waiting for its
// header). Called with s.mu held, which comes before set.mu.
func (set *streamSet) engage(s *stream) {
	set.mu.Lock()
	defer set.mu.Unlock()
	if _, ok := set.open[s]; ok {
		set.open[s] = true
	}
}

// streamCounts are a handler's open requests.
type streamCounts struct {
	Open     int `json:"open"`     // streams being served
	Waiting  int `json:"waiting"`  // requests waiting for the upstream's header
	Draining int `json:"draining"` // of those, the ones a drain has reached
}

// counts tells the set's open requests apart, under its lock alone: no
// stream's lock, which a write to a slow client may hold for long.
func (set *streamSet) counts() (c streamCounts, draining bool) {
	set.mu.Lock()
	defer set.mu.Unlock()
	for s, engaged := range set.open {
		if engaged {
			c.Open++
		} else {
			c.Waiting++
		}
		if s.drainTimer != nil {
			c.Draining++
		}
	}
	return c, set.draining
}

// handlerStatus is one handler in GET /sse/streams.
type handlerStatus struct {
	handlerID
	Loaded     time.Time         `json:"loaded"`
	Draining   bool              `json:"draining"`
	Shared     bool              `json:"shared"`
	MaxStreams int               `json:"max_streams"`
	Streams    streamCounts      `json:"streams"`
	Ended      map[string]uint64 `json:"ended"`
	Refused    map[string]uint64 `json:"refused"`
}

func (e *adminEntry) status() handlerStatus {
	h := e.h
	counts, draining := h.streams.counts()
	return handlerStatus{
		handlerID:  e.id,
		Loaded:     e.loaded.UTC(),
		Draining:   draining,
		Shared:     h.Share != nil,
		MaxStreams: h.MaxStreams,
		Streams:    counts,
		Ended:      h.streams.ended.snapshot(streamEndReasons),
		Refused:    h.streams.refused.snapshot(refusalReasons),
	}
}

// streamsStatus is GET /sse/streams: the handlers by server and index, an
// older instance (still draining after a reload) before a newer one.
func streamsStatus(handlers []*adminEntry) []handlerStatus {
	out := make([]handlerStatus, 0, len(handlers))
	for _, e := range handlers {
		out = append(out, e.status())
	}
	slices.SortFunc(out, func(a, b handlerStatus) int {
		return cmp.Or(cmp.Compare(a.Server, b.Server), cmp.Compare(a.Index, b.Index), a.Loaded.Compare(b.Loaded))
	})
	return out
}

// Shared streams.

// errHubReconnect ends a shared stream's upstream request that the admin
// API asked to renew: it is asked again at once, not counted as a failure.
var errHubReconnect = errors.New("sse: shared stream's upstream renewed through the admin API")

// hubAdmin is a hub's upstream as the admin API sees and steers it.
// Guarded by the hub's lock.
type hubAdmin struct {
	cancel      context.CancelCauseFunc // the upstream request in flight
	via         *Handler                // whose route it goes through
	attempt     int                     // how many times the hub asked again
	connectedAt time.Time               // when its response header came
	now         bool                    // asked to renew at once
	kick        chan struct{}           // closed to end a backoff at once
	retryAt     time.Time
	backoff     time.Duration
	failures    int
}

// startAttemptLocked records the upstream request the hub makes.
func (hb *hub) startAttemptLocked(cancel context.CancelCauseFunc, via *Handler, attempt int) {
	hb.admin = hubAdmin{cancel: cancel, via: via, attempt: attempt}
}

// connectedLocked records that the request's response header came.
func (hb *hub) connectedLocked() {
	hb.admin.connectedAt = hb.handler().clock.Now()
}

// connected is connectedLocked without the lock held.
func (hb *hub) connected() {
	hb.mu.Lock()
	defer hb.mu.Unlock()
	hb.connectedLocked()
}

// attemptEnded records that the upstream request is over, and says whether
// the admin API asked for another at once.
func (hb *hub) attemptEnded() (now bool) {
	hb.mu.Lock()
	defer hb.mu.Unlock()
	a := &hb.admin
	a.cancel, a.connectedAt = nil, time.Time{}
	now, a.now = a.now, false
	return now
}

// retrying records a backoff of wait after failures in a row; the channel
// it returns is closed if the admin API asks for the upstream at once.
func (hb *hub) retrying(wait time.Duration, failures int) <-chan struct{} {
	hb.mu.Lock()
	defer hb.mu.Unlock()
	a := &hb.admin
	a.kick = make(chan struct{})
	if a.now {
		a.now = false
		close(a.kick)
	}
	a.retryAt, a.backoff, a.failures = hb.handler().clock.Now().Add(wait), wait, failures
	return a.kick
}

// errHubNotLive is a reconnect asked of a shared stream that has no
// upstream request to renew: its first is still waiting for its header,
// or it is over.
var errHubNotLive = errors.New("the shared stream is not live: it waits for its first response, or it is over")

// reconnect ends the hub's upstream request, or its backoff, so that it
// asks again at once with the last event ID. Its clients stay.
func (hb *hub) reconnect() error {
	hb.mu.Lock()
	if hb.released || hb.state != hubLive {
		hb.mu.Unlock()
		return errHubNotLive
	}
	a := &hb.admin
	a.now = true
	cancel := a.cancel
	if a.kick != nil {
		select {
		case <-a.kick:
		default:
			close(a.kick)
		}
	}
	hb.mu.Unlock()
	if cancel != nil {
		cancel(errHubReconnect)
	}
	return nil
}

// hubDigest names a shared stream in the admin API: an HMAC of its key
// under the registry's own random key, so that the name is the same for as
// long as the registry lives (across reloads) but tells nothing of the key
// (which holds a path, a query and digests of credentials) to anyone
// trying guesses. Called with reg.mu held.
func (reg *hubRegistry) hubDigestLocked(key string) string {
	if reg.adminKey == nil {
		reg.adminKey = make([]byte, 32)
		_, _ = crand.Read(reg.adminKey)
	}
	mac := hmac.New(sha256.New, reg.adminKey)
	mac.Write([]byte(key))
	return hex.EncodeToString(mac.Sum(nil))[:16]
}

// hubStatus is one shared stream in GET /sse/hubs.
type hubStatus struct {
	Hub      string            `json:"hub"`
	Handler  handlerID         `json:"handler"`
	State    string            `json:"state"`
	Clients  int               `json:"clients"`
	Upstream hubUpstreamStatus `json:"upstream"`
	Kept     keptStatus        `json:"kept"`
}

// hubUpstreamStatus is a shared stream's upstream request.
type hubUpstreamStatus struct {
	State          string     `json:"state"`
	Via            handlerID  `json:"via"`
	ConnectedSince *time.Time `json:"connected_since"`
	Reconnects     int        `json:"reconnects"`
	LastEventID    *string    `json:"last_event_id"`
	Failures       int        `json:"failures,omitempty"`
	BackoffMS      int64      `json:"backoff_ms,omitempty"`
	RetryAt        *time.Time `json:"retry_at,omitempty"`
}

// keptStatus is what a shared stream's ring keeps.
type keptStatus struct {
	Events int   `json:"events"`
	Bytes  int64 `json:"bytes"`
}

func (e *adminEntry) identity() handlerID {
	if e == nil {
		return handlerID{}
	}
	return e.id
}

// status reads the hub under its read lock.
func (hb *hub) adminStatus(digest string, owner *Handler) hubStatus {
	hb.mu.RLock()
	defer hb.mu.RUnlock()
	st := hubStatus{Hub: digest, Handler: owner.admin.identity(), Clients: len(hb.subs)}
	switch {
	case hb.released || hb.state == hubEnded:
		st.State = "ended"
	case hb.state == hubStarting:
		st.State = "starting"
	case hb.state == hubFailed:
		st.State = "failed"
	case hb.state == hubAlone:
		st.State = "unshared"
	case len(hb.subs) == 0 && hb.lingerTimer != nil:
		st.State = "lingering"
	default:
		st.State = "live"
	}
	a := &hb.admin
	up := &st.Upstream
	up.Reconnects = a.attempt
	if a.via != nil {
		up.Via = a.via.admin.identity()
	}
	switch {
	case a.cancel != nil && !a.connectedAt.IsZero():
		up.State = "connected"
		since := a.connectedAt.UTC()
		up.ConnectedSince = &since
	case a.cancel != nil:
		up.State = "connecting"
	case a.kick != nil:
		up.State = "retrying"
		at := a.retryAt.UTC()
		up.Failures, up.BackoffMS, up.RetryAt = a.failures, a.backoff.Milliseconds(), &at
	case st.State == "ended":
		up.State = "closed"
	default:
		up.State = "connecting"
	}
	if id := hb.upstreamID; id != "" && id != unknownID {
		up.LastEventID = &id
	}
	st.Kept = keptStatus{Events: len(hb.ring.events), Bytes: hb.ring.kept}
	return st
}

// namedHub is a hub with its digest and its registry's newest handler.
type namedHub struct {
	hb     *hub
	digest string
	owner  *Handler
}

// hubsOf lists the registries' hubs. Each registry's lock is held only to
// list them; each hub's only to read it.
func hubsOf(registries []*hubRegistry) []namedHub {
	var out []namedHub
	for _, reg := range registries {
		owner := reg.handler()
		reg.mu.Lock()
		for key, hb := range reg.hubs {
			out = append(out, namedHub{hb: hb, digest: reg.hubDigestLocked(key), owner: owner})
		}
		reg.mu.Unlock()
	}
	return out
}

// hubsStatus is GET /sse/hubs, by handler and digest.
func hubsStatus(registries []*hubRegistry) []hubStatus {
	hubs := hubsOf(registries)
	out := make([]hubStatus, 0, len(hubs))
	for _, n := range hubs {
		out = append(out, n.hb.adminStatus(n.digest, n.owner))
	}
	slices.SortFunc(out, func(a, b hubStatus) int {
		return cmp.Or(cmp.Compare(a.Handler.Server, b.Handler.Server), cmp.Compare(a.Handler.Index, b.Handler.Index),
			cmp.Compare(a.Hub, b.Hub))
	})
	return out
}

// The endpoints.

func (adminAPI) serveStreams(w http.ResponseWriter, r *http.Request) error {
	if err := allowMethod(w, r, http.MethodGet); err != nil {
		return err
	}
	handlers, _ := loaded()
	return writeJSON(w, http.StatusOK, streamsStatus(handlers))
}

func (adminAPI) serveHubs(w http.ResponseWriter, r *http.Request) error {
	if err := allowMethod(w, r, http.MethodGet); err != nil {
		return err
	}
	_, registries := loaded()
	return writeJSON(w, http.StatusOK, hubsStatus(registries))
}

// serveHub is POST /sse/hubs/<hub>/reconnect.
func (adminAPI) serveHub(w http.ResponseWriter, r *http.Request) error {
	rest := strings.TrimPrefix(r.URL.Path, hubsPath+"/")
	digest, action, ok := strings.Cut(rest, "/")
	if !ok || action != "reconnect" || !isHubDigest(digest) {
		return caddy.APIError{HTTPStatus: http.StatusNotFound, Err: fmt.Errorf("not found: want %s/<hub>/reconnect", hubsPath)}
	}
	if err := allowMethod(w, r, http.MethodPost); err != nil {
		return err
	}
	_, registries := loaded()
	for _, n := range hubsOf(registries) {
		if n.digest != digest {
			continue
		}
		if err := n.hb.reconnect(); err != nil {
			return caddy.APIError{HTTPStatus: http.StatusConflict, Err: err}
		}
		return writeJSON(w, http.StatusAccepted, struct {
			Hub    string `json:"hub"`
			Status string `json:"status"`
		}{digest, "reconnecting"})
	}
	return caddy.APIError{HTTPStatus: http.StatusNotFound, Err: fmt.Errorf("no shared stream %s", digest)}
}

// isHubDigest reports whether s has the form of a hub's digest.
func isHubDigest(s string) bool {
	if len(s) != 16 {
		return false
	}
	for _, c := range []byte(s) {
		if (c < '0' || c > '9') && (c < 'a' || c > 'f') {
			return false
		}
	}
	return true
}

// allowMethod refuses a request whose method is not method, with 405.
func allowMethod(w http.ResponseWriter, r *http.Request, method string) error {
	if r.Method == method {
		return nil
	}
	w.Header().Set("Allow", method)
	return caddy.APIError{HTTPStatus: http.StatusMethodNotAllowed, Err: fmt.Errorf("method not allowed: want %s", method)}
}

func writeJSON(w http.ResponseWriter, status int, v any) error {
	body, err := json.Marshal(v)
	if err != nil {
		return caddy.APIError{HTTPStatus: http.StatusInternalServerError, Err: err}
	}
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	_, _ = w.Write(append(body, '\n'))
	return nil
}

// Interface guards
var (
	_ caddy.Module      = adminAPI{}
	_ caddy.AdminRouter = adminAPI{}
)
