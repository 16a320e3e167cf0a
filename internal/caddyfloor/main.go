// Command caddyfloor is Caddy with one extra handler, bench_floor, for the
// benchmark's fan-out scenario (bench/): the least a Caddy HTTP handler can
// hold per subscriber. It keeps each GET's response open as an event
// stream and writes every body POSTed to it to all of them as one event,
// with nothing else: no heartbeats, limits, replay or metrics. Whatever it
// costs per subscriber, every Caddy handler that keeps a response open
// costs too: net/http's connection buffers and goroutines, and Caddy's
// per-request state.
package main

import (
	"io"
	"net/http"
	"sync"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/caddyserver/caddy/v2/caddyconfig/httpcaddyfile"
	caddycmd "github.com/caddyserver/caddy/v2/cmd"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"

	_ "github.com/caddyserver/caddy/v2/modules/standard"
)

func init() {
	caddy.RegisterModule(new(Floor))
	httpcaddyfile.RegisterHandlerDirective("bench_floor", func(h httpcaddyfile.Helper) (caddyhttp.MiddlewareHandler, error) {
		f := new(Floor)
		return f, f.UnmarshalCaddyfile(h.Dispenser)
	})
	httpcaddyfile.RegisterDirectiveOrder("bench_floor", httpcaddyfile.Before, "respond")
}

func main() {
	caddycmd.Main()
}

// Floor broadcasts each POSTed body to every open GET as one event.
type Floor struct {
	mu   sync.Mutex
	next *published // the event to be published next
}

// published is one event in the order published; subscribers walk the
// chain, so none misses an event however late it wakes.
type published struct {
	event []byte
	after *published
	ready chan struct{} // closed once event and after are set
}

// CaddyModule returns the Caddy module information.
func (*Floor) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{ID: "http.handlers.bench_floor", New: func() caddy.Module { return new(Floor) }}
}

// Provision prepares the first event.
func (f *Floor) Provision(caddy.Context) error {
	f.next = &published{ready: make(chan struct{})}
	return nil
}

// UnmarshalCaddyfile takes the directive alone: bench_floor.
func (f *Floor) UnmarshalCaddyfile(d *caddyfile.Dispenser) error {
	d.Next()
	if d.NextArg() {
		return d.ArgErr()
	}
	return nil
}

// ServeHTTP publishes a POST's body, or holds a GET open and writes it
// every event published while it is open.
func (f *Floor) ServeHTTP(w http.ResponseWriter, r *http.Request, _ caddyhttp.Handler) error {
	if r.Method == http.MethodPost {
		body, err := io.ReadAll(io.LimitReader(r.Body, 64<<10))
		if err != nil {
			return caddyhttp.Error(http.StatusBadRequest, err)
		}
		f.mu.Lock()
		p := f.next
		p.event = append(append([]byte("data: "), body...), "\n\n"...)
		p.after = &published{ready: make(chan struct{})}
		f.next = p.after
		close(p.ready)
		f.mu.Unlock()
		w.WriteHeader(http.StatusNoContent)
		return nil
	}
	w.Header().Set("Content-Type", "text/event-stream")
	w.Header().Set("Cache-Control", "no-cache")
	w.WriteHeader(http.StatusOK)
	rc := http.NewResponseController(w)
	if err := rc.Flush(); err != nil {
		return nil
	}
	f.mu.Lock()
	p := f.next
	f.mu.Unlock()
	for {
		select {
		case <-r.Context().Done():
			return nil
		case <-p.ready:
		}
		if _, err := w.Write(p.event); err != nil {
			return nil
		}
		if err := rc.Flush(); err != nil {
			return nil
		}
		p = p.after
	}
}

// Interface guards
var (
	_ caddy.Provisioner           = (*Floor)(nil)
	_ caddyfile.Unmarshaler       = (*Floor)(nil)
	_ caddyhttp.MiddlewareHandler = (*Floor)(nil)
)
