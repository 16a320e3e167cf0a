package caddysse

import (
	"fmt"
	"net/http"
	"net/url"
	"strings"

	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"golang.org/x/net/http/httpguts"
)

// lastEventIDFromQuery moves the last event ID from the configured query
// parameter into the Last-Event-ID header, where upstreams look for it.
func (h *Handler) lastEventIDFromQuery(r *http.Request) error {
	var value string
	found := false
	kept := make([]string, 0, 4)
	for _, pair := range strings.Split(r.URL.RawQuery, "&") {
		key, v, _ := strings.Cut(pair, "=")
		if k, err := url.QueryUnescape(key); err == nil && k == h.LastEventIDQuery {
			if !found {
				value, err = url.QueryUnescape(v)
				if err != nil {
					return caddyhttp.Error(http.StatusBadRequest, fmt.Errorf("%s: %v", h.LastEventIDQuery, err))
				}
				found = true
			}
			continue
		}
		if pair != "" {
			kept = append(kept, pair)
		}
	}
	if !found {
		return nil
	}
	// A value Go's transport would refuse to send as a header makes
	// reverse_proxy answer 502, which retry_statuses turns into a refusal
	// the client retries with the same value, for ever. 400 stops it.
	if len(value) > maxEventIDLen || !httpguts.ValidHeaderFieldValue(value) {
		return caddyhttp.Error(http.StatusBadRequest,
			fmt.Errorf("%s: a last event ID must be at most %d bytes, with no control character but tab", h.LastEventIDQuery, maxEventIDLen))
	}
	r.URL.RawQuery = strings.Join(kept, "&")
	if r.Header.Get("Last-Event-ID") == "" {
		r.Header.Set("Last-Event-ID", value)
	}
	return nil
}
