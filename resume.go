package caddysse

import (
	"fmt"
	"net/http"
	"net/url"
	"strings"

	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
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
	if len(value) > maxEventIDLen || strings.ContainsAny(value, "\r\n\x00") {
		return caddyhttp.Error(http.StatusBadRequest,
			fmt.Errorf("%s: a last event ID must be at most %d bytes without CR, LF or NUL", h.LastEventIDQuery, maxEventIDLen))
	}
	r.URL.RawQuery = strings.Join(kept, "&")
	if r.Header.Get("Last-Event-ID") == "" {
		r.Header.Set("Last-Event-ID", value)
	}
	return nil
}
