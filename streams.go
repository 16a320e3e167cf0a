package caddysse

import (
	"fmt"
	"math"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
)

// streamSet is a handler's open streams. It holds the stream slots the
// limits count, and reaches every live stream when they must drain.
type streamSet struct {
	mu        sync.Mutex
	slots     int            // stream requests in progress
	perClient map[string]int // the same, by client IP
	live      map[*streamWriter]struct{}
	draining  bool
}

// Limit names, as in the refused-streams metric.
const (
	limitGlobal    = "max_streams"
	limitPerClient = "max_streams_per_client"
)

func newStreamSet() *streamSet {
	return &streamSet{perClient: make(map[string]int), live: make(map[*streamWriter]struct{})}
}

// wantsStream reports whether the request asks for an event stream; only
// those count against the limits.
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

// acquire takes a stream slot for client, or names the limit that refuses it.
func (s *streamSet) acquire(client string, max, maxPerClient int) (refusedBy string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	switch {
	case max > 0 && s.slots >= max:
		return limitGlobal
	case maxPerClient > 0 && s.perClient[client] >= maxPerClient:
		return limitPerClient
	}
	s.slots++
	s.perClient[client]++
	return ""
}

// release gives back client's slot.
func (s *streamSet) release(client string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.slots--
	if s.perClient[client]--; s.perClient[client] <= 0 {
		delete(s.perClient, client)
	}
}

// add registers a live stream and reports whether the set is draining, in
// which case the stream must drain too.
func (s *streamSet) add(sw *streamWriter) (draining bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.live[sw] = struct{}{}
	return s.draining
}

func (s *streamSet) remove(sw *streamWriter) {
	s.mu.Lock()
	defer s.mu.Unlock()
	delete(s.live, sw)
}

// drain closes every live stream, and every stream that starts from now on,
// at a random moment within window. Only the first call acts.
func (s *streamSet) drain(window time.Duration) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.draining {
		return
	}
	s.draining = true
	for sw := range s.live {
		sw.drainWithin(window)
	}
}

// refuse answers a stream request that a limit does not let through, before
// anything reaches the upstream.
func (h *Handler) refuse(w http.ResponseWriter, limit, client string) error {
	status := http.StatusServiceUnavailable
	if limit == limitPerClient {
		status = http.StatusTooManyRequests
	}
	retryAfter := defaultRetryAfter
	if h.Retry > 0 {
		retryAfter = time.Duration(h.Retry)
	}
	w.Header().Set("Retry-After", strconv.Itoa(int(math.Ceil(retryAfter.Seconds()))))
	sseMetrics.refused.WithLabelValues(limit).Inc()
	if c := h.logger.Check(zapcore.DebugLevel, "stream refused"); c != nil {
		c.Write(zap.String("limit", limit), zap.String("client_ip", client))
	}
	return caddyhttp.Error(status, fmt.Errorf("sse: %s reached", limit))
}
