package caddysse

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"net/http"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
)

// A store keeps shared streams' events where several gateways can read
// them: share's `store` option, a guest module in the namespace
// http.handlers.sse.stores (loaded the way reverse_proxy loads its
// transport). The default, memory, keeps each hub's events in the hub
// itself (hub.go): one gateway, nothing shared beyond it. A store with a
// log (natsstore) makes a fleet: one gateway at a time holds a key's lease
// and runs its upstream request, appending each whole event to the log;
// every gateway with clients on the key follows the log into its hub's
// ring and feeds them from there (fleet.go). Stores live in Go modules of
// their own, so that a Caddy built without one gains no dependency.

func init() {
	caddy.RegisterModule(MemoryStore{})
}

// Store is a share store: a guest module in http.handlers.sse.stores.
type Store interface {
	// OpenLog opens the log of one shared stream on this gateway. name is a
	// digest of the share key (LogName): nothing a store keeps names a
	// user. It is called once per hub; the hub closes the log when it ends.
	// A store that keeps nothing beyond the hub (memory) returns nil, nil.
	OpenLog(ctx context.Context, name string, limits LogLimits) (Log, error)
}

// LogLimits bound what a log keeps of one shared stream: the share
// options replay and max_backlog.
type LogLimits struct {
	Events int   // the latest events kept for replay; at least 1
	Bytes  int64 // their size in bytes, at most
}

// Log is one shared stream's log, as one gateway's hub sees it. Its methods
// may be called from several goroutines.
type Log interface {
	// Follow calls add with each kept event whose Seq is greater than
	// after, oldest first, then with each new one as it is appended, until
	// ctx ends or the store cannot be reached; it calls caughtUp once, when
	// the kept events are all given. Events come in log order, each once,
	// with Seq increasing. It returns why it stopped: ctx's error, or the
	// store's, at once when the store is unreachable (the hub then serves
	// its clients on its own until it is back, fleet.go).
	Follow(ctx context.Context, after uint64, add func(LogEvent), caughtUp func()) error

	// Lead takes the stream's upstream lease when no gateway holds it,
	// and returns it; it returns nil, nil when another gateway holds it.
	Lead(ctx context.Context) (Lease, error)

	// LeaseTerm is how long a lease lasts unrenewed: a gateway whose hub
	// follows asks for the lease a few times a term.
	LeaseTerm() time.Duration

	// Header is the response header of the lease holder's upstream, as
	// its last SetHeader left it, or nil while there is none.
	Header(ctx context.Context) (*LogHeader, error)

	// Close gives up what the log holds on this gateway (its lease
	// included).
	Close() error
}

// Lease is the right to run a shared stream's upstream request and append
// its events, held by one gateway at a time. It is kept alive by its
// store until Release, or until it cannot be (then Lost is closed).
type Lease interface {
	// Append adds a whole event to the log, after every event appended
	// before, while the lease is held: it fails once another gateway
	// could have appended (ErrLeaseLost), and then the holder must stop.
	// A store may retry an append it is not sure of: the event is added
	// once. It returns the event's Seq.
	Append(ctx context.Context, ev LogEvent) (uint64, error)

	// SetHeader makes the upstream's response header the stream's, for the
	// other gateways' clients.
	SetHeader(ctx context.Context, h LogHeader) error

	// ResumeID is the last event ID, as the upstream's own ids left it,
	// that the log held when the lease was taken ("" for none): the new
	// holder asks the upstream from it.
	ResumeID() string

	// Lost is closed once the lease is no longer held.
	Lost() <-chan struct{}

	// Release gives the lease up, so that another gateway takes it at
	// once.
	Release()
}

// LogEvent is one whole event of a shared stream, as the upstream sent it
// (without a gateway id).
type LogEvent struct {
	// Seq is the event's number in the log, the same on every gateway and
	// after any restart; set by the log (Follow), ignored by Append.
	Seq uint64
	// Data is the event's bytes, ending with its blank line.
	Data []byte
	// HasID tells whether the event has an id field of the upstream's.
	HasID bool
	// ID is the last event ID a client holds after the event, as the
	// upstream's ids leave it (WHATWG: an event without an id keeps the
	// previous one).
	ID string
}

// LogHeader is the status and header of the response that a shared
// stream's clients are sent.
type LogHeader struct {
	Status int         `json:"status"`
	Header http.Header `json:"header"`
}

// ErrLeaseLost is what Lease.Append returns once another gateway could
// hold the lease.
var ErrLeaseLost = errors.New("sse: the shared stream's lease is lost")

// LogName is the name a store knows a shared stream by: a digest of its
// key, which holds digests of users' credentials.
func LogName(key string) string {
	sum := sha256.Sum256([]byte("sse.store\x00" + key))
	return hex.EncodeToString(sum[:])
}

// MemoryStore keeps each shared stream's events in its hub, on this
// gateway alone: the default store. It has no options.
type MemoryStore struct{}

// CaddyModule returns the Caddy module information.
func (MemoryStore) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "http.handlers.sse.stores.memory",
		New: func() caddy.Module { return new(MemoryStore) },
	}
}

// OpenLog returns no log: the hub keeps its events.
func (MemoryStore) OpenLog(context.Context, string, LogLimits) (Log, error) { return nil, nil }

// UnmarshalCaddyfile reads `store memory`, which takes no options.
func (MemoryStore) UnmarshalCaddyfile(d *caddyfile.Dispenser) error {
	d.Next() // the store's name
	if d.NextArg() {
		return d.ArgErr()
	}
	for nesting := d.Nesting(); d.NextBlock(nesting); {
		return d.Errf("store memory: unrecognized option %q", d.Val())
	}
	return nil
}

// Interface guards
var (
	_ Store                 = MemoryStore{}
	_ caddyfile.Unmarshaler = (*MemoryStore)(nil)
)
