package caddysse

import (
	"fmt"
	"math"
	"math/rand/v2"
	"net/http"
	"strconv"
	"strings"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
)

// refusalStatus is the status code of each refusal, for requests that did
// not ask for a stream and for refuse_with status.
var refusalStatus = map[endReason]int{
	reasonMaxStreams:          http.StatusServiceUnavailable,
	reasonMaxStreamsPerClient: http.StatusTooManyRequests,
	reasonMaxStreamRate:       http.StatusServiceUnavailable,
	reasonUpstreamTimeout:     http.StatusGatewayTimeout,
	reasonDrain:               http.StatusServiceUnavailable,
}

// jitteredRetry is a retry hint drawn between 1× and 2× the retry option
// (or 10 s), for clients turned away together.
func (h *Handler) jitteredRetry() time.Duration {
	base := time.Duration(h.Retry)
	if base == 0 {
		base = defaultRetry
	}
	return (base + rand.N(base+1)).Round(time.Millisecond)
}

// refuse answers a request the gateway turns away instead of serving it a
// stream: over a limit, past idle_timeout waiting for the upstream's header,
// caught waiting by a drain, or answered by the upstream (or the proxy)
// with an error status in RetryStatuses.
//
// An EventSource fails for good, never to reconnect, on any answer but
// `200 text/event-stream` (WHATWG HTML, server-sent events: "fail the
// connection"), whereas the clean end of such a response makes it
// reconnect after its reconnection time. So by default a request that asked
// for a stream gets a stream that says only `retry:` (and the close event,
// when configured) and ends. The retry hint is drawn between 1× and 2× the
// retry option (or 10 s), so refused clients do not all return together.
func (h *Handler) refuse(w http.ResponseWriter, r *http.Request, reason endReason) error {
	retry := h.jitteredRetry()
	w.Header().Set("Retry-After", strconv.Itoa(int(math.Ceil(retry.Seconds()))))
	// The upstream's own status, for refusals in its place.
	label, status := reason, refusalStatus[reason]
	if code, ok := strings.CutPrefix(string(reason), string(reasonUpstreamStatus)+"_"); ok {
		label = reasonUpstreamStatus
		status, _ = strconv.Atoi(code)
	}
	sseMetrics.refused.WithLabelValues(string(label)).Inc()
	h.streams.countRefused(label)
	if c := h.logger.Check(zapcore.DebugLevel, "stream refused"); c != nil {
		c.Write(zap.String("uri", r.RequestURI), zap.String("client_ip", clientIP(r)),
			zap.String("reason", string(reason)), zap.Int("status", status))
	}
	if repl, ok := r.Context().Value(caddy.ReplacerCtxKey).(*caddy.Replacer); ok {
		repl.Set(placeholderPrefix+"close_reason", string(reason))
	}
	if h.RefuseWith == refuseWithStatus || !wantsStream(r) {
		return caddyhttp.Error(status, fmt.Errorf("sse: stream refused: %s", reason))
	}
	header := w.Header()
	header.Set("Content-Type", "text/event-stream")
	header.Set("Cache-Control", "no-cache")
	header.Set("X-Accel-Buffering", "no")
	w.WriteHeader(http.StatusOK)
	// A client that cannot take even this is gone; there is nothing to add.
	_, _ = w.Write(closeSequence(retry, h.CloseEvent, reason))
	return nil
}
