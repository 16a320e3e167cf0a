// Package natsstore is a share store for the sse handler that keeps shared
// streams' events and upstream leases in NATS JetStream, so that a fleet of
// gateways runs one upstream request per shared stream and replays the same
// events with the same sequence numbers on every gateway.
package natsstore

import (
	"context"
	"errors"
	"fmt"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"go.uber.org/zap"

	caddysse "github.com/ssegateway/caddy-sse"
)

func init() {
	caddy.RegisterModule(Store{})
}

const (
	defaultReplicas = 1
	defaultLease    = 3 * time.Second
	minLease        = 100 * time.Millisecond
	// maxCallTimeout bounds each JetStream call, so that a slow or
	// vanished server gives the hub an error quickly (it then serves its
	// clients on its own).
	maxCallTimeout = 2 * time.Second
	// embeddedMaxPayload lets the embedded server take events as large as
	// the default max_backlog (1 MiB) with their headers; NATS' own
	// default is 1 MB.
	embeddedMaxPayload = 8 << 20
)

// Store keeps shared streams' events and upstream leases in NATS
// JetStream: the share option `store nats`. Each shared stream is one
// subject of a JetStream stream, which keeps its latest events for replay
// (as many as the share's replay option) for up to 24 hours after the last
// one; its upstream lease is a key of a JetStream key-value bucket, held by
// one gateway at a time and renewed while it runs the upstream request.
// Nothing stored names a user: streams are known by a digest of their key.
//
// Without URLs, the store runs a NATS server inside Caddy, listening on
// nothing, with its data in Caddy's data directory: one gateway whose
// shared streams' replay survives a restart.
type Store struct {
	// URLs of the NATS servers to connect to, such as
	// "nats://10.0.0.5:4222". The client connects to one of them and moves
	// to another when it is lost. Default: none, which runs an embedded
	// server in this process, reachable by nothing else.
	URLs []string `json:"urls,omitempty"`

	// Credentials is the path of a NATS credentials file (a user JWT and
	// its NKey seed) to connect with. Optional.
	Credentials string `json:"credentials,omitempty"`

	// Replicas is how many copies of the JetStream stream and key-value
	// bucket the NATS cluster keeps, from 1 to 5. Default: 1.
	Replicas int `json:"replicas,omitempty"`

	// Lease is how long a gateway holds a shared stream's upstream lease
	// without renewing it; it renews it every third of that. When a
	// gateway dies, another one takes its streams' upstream requests over
	// within about this long. All gateways of a fleet should have the
	// same. Default: 3s.
	Lease caddy.Duration `json:"lease,omitempty"`

	dataDir string // the embedded server's, set in Provision unless already (tests)
	poolKey string
	conn    *conn
	logger  *zap.Logger
}

// CaddyModule returns the Caddy module information.
func (Store) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "http.handlers.sse.stores.nats",
		New: func() caddy.Module { return new(Store) },
	}
}

// Provision sets the defaults and connects to NATS, or starts the embedded
// server. Unreachable servers do not fail it: the client keeps trying in
// the background while the store's calls return errors.
func (s *Store) Provision(ctx caddy.Context) error {
	s.logger = ctx.Logger()
	if s.Replicas == 0 {
		s.Replicas = defaultReplicas
	}
	if s.Lease == 0 {
		s.Lease = caddy.Duration(defaultLease)
	}
	if len(s.URLs) == 0 && s.dataDir == "" {
		s.dataDir = filepath.Join(caddy.AppDataDir(), "sse", "nats")
	}
	s.poolKey = s.connKey()
	c, err := s.loadConn()
	if err != nil {
		return err
	}
	s.conn = c
	return nil
}

// Validate checks the options.
func (s *Store) Validate() error {
	if s.Replicas < 1 || s.Replicas > 5 {
		return fmt.Errorf("nats store: replicas must be from 1 to 5, got %d", s.Replicas)
	}
	if time.Duration(s.Lease) < minLease {
		return fmt.Errorf("nats store: lease must be at least %v, got %v", minLease, time.Duration(s.Lease))
	}
	return nil
}

// Cleanup drops this config's use of the connection: it is closed when no
// config and no open log uses it any more.
func (s *Store) Cleanup() error {
	if s.conn == nil {
		return nil
	}
	s.conn = nil
	_, err := pool.Delete(s.poolKey)
	return err
}

// OpenLog opens the log of one shared stream, creating its JetStream
// stream and the lease bucket on first use. It fails at once when NATS
// cannot be reached.
func (s *Store) OpenLog(ctx context.Context, name string, limits caddysse.LogLimits) (caddysse.Log, error) {
	// The log takes its own reference, so that a hub that outlives this
	// config keeps a working connection.
	c, err := s.loadConn()
	if err != nil {
		return nil, err
	}
	l, err := c.openLog(ctx, s, name, max(limits.Events, 1))
	if err != nil {
		_, _ = pool.Delete(s.poolKey)
		return nil, err
	}
	return l, nil
}

// UnmarshalCaddyfile sets up the store from Caddyfile tokens. Syntax:
//
//	store nats {
//	    url         <nats url>...
//	    credentials <file>
//	    replicas    <n>
//	    lease       <duration>
//	}
//
// Every option may appear once. Without a block (or without url), the
// store runs an embedded NATS server with all defaults.
func (s *Store) UnmarshalCaddyfile(d *caddyfile.Dispenser) error {
	d.Next() // the store's name
	if d.NextArg() {
		return d.ArgErr()
	}
	seen := make(map[string]bool)
	for nesting := d.Nesting(); d.NextBlock(nesting); {
		option := d.Val()
		if seen[option] {
			return d.Errf("store nats: %s: option given more than once", option)
		}
		seen[option] = true
		switch option {
		case "url":
			s.URLs = d.RemainingArgs()
			if len(s.URLs) == 0 {
				return d.ArgErr()
			}
		case "credentials":
			if !d.NextArg() {
				return d.ArgErr()
			}
			s.Credentials = d.Val()
		case "replicas":
			if !d.NextArg() {
				return d.ArgErr()
			}
			n, err := strconv.Atoi(d.Val())
			if err != nil || n < 1 || n > 5 {
				return d.Errf("store nats: replicas must be a number from 1 to 5, got %q", d.Val())
			}
			s.Replicas = n
		case "lease":
			if !d.NextArg() {
				return d.ArgErr()
			}
			dur, err := caddy.ParseDuration(d.Val())
			if err != nil {
				return d.Errf("store nats: lease: bad duration %q: %v", d.Val(), err)
			}
			if dur <= 0 {
				return d.Errf("store nats: lease must be positive, got %q", d.Val())
			}
			s.Lease = caddy.Duration(dur)
		default:
			return d.Errf("store nats: unrecognized option %q", option)
		}
		if d.NextArg() {
			return d.ArgErr()
		}
	}
	return nil
}

// pool keeps connections (and embedded servers) across config reloads,
// keyed by the settings they are made with.
var pool = caddy.NewUsagePool()

// conn is a pooled NATS connection, with the embedded server it talks to
// when there are no URLs.
type conn struct {
	nc  *nats.Conn
	js  jetstream.JetStream
	srv *server.Server // nil for remote servers

	mu      sync.Mutex
	streams map[string]jetstream.Stream   // ensured streams, by config
	buckets map[string]jetstream.KeyValue // ensured lease buckets, by config
	// leaseTTL is the lease bucket's TTL as this process last set it: a
	// config with a shorter lease shortens it for the leases of an older
	// one too, which then renew within it (natsLease.renew).
	leaseTTL   atomic.Int64
	ttlChanged chan struct{} // closed and replaced when leaseTTL changes; under mu
}

// setLeaseTTL records the lease bucket's TTL that this process set, and
// has the leases renew at once if it changed. Called with mu held.
func (c *conn) setLeaseTTLLocked(ttl time.Duration) {
	if c.leaseTTL.Swap(int64(ttl)) != int64(ttl) {
		close(c.ttlChanged)
		c.ttlChanged = make(chan struct{})
	}
}

// leaseTTLChanged is closed when the lease bucket's TTL changes next.
func (c *conn) leaseTTLChanged() <-chan struct{} {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.ttlChanged
}

// connKey names the connection settings in the pool.
func (s *Store) connKey() string {
	if len(s.URLs) == 0 {
		return "embedded\x00" + s.dataDir
	}
	return "urls\x00" + strings.Join(s.URLs, ",") + "\x00creds\x00" + s.Credentials
}

// loadConn takes a reference on the pooled connection, making it first.
func (s *Store) loadConn() (*conn, error) {
	v, _, err := pool.LoadOrNew(s.poolKey, s.newConn)
	if err != nil {
		return nil, err
	}
	return v.(*conn), nil
}

// newConn connects, starting the embedded server first when there are no
// URLs.
func (s *Store) newConn() (caddy.Destructor, error) {
	logger := s.logger
	opts := []nats.Option{
		nats.Name("caddy-sse"),
		nats.MaxReconnects(-1),
		nats.ReconnectWait(250 * time.Millisecond),
		// Publishing while disconnected fails at once instead of waiting
		// in a buffer: the hub then knows the store is gone.
		nats.ReconnectBufSize(-1),
		// Without this, Provision would fail while NATS is down; the
		// gateway must serve on its own until it is back.
		nats.RetryOnFailedConnect(true),
		// A server that vanished without closing the connection is noticed
		// within seconds, not minutes.
		nats.PingInterval(2 * time.Second),
		nats.MaxPingsOutstanding(2),
		nats.DisconnectErrHandler(func(_ *nats.Conn, err error) {
			if err != nil { // nil: closed by us
				logger.Warn("NATS connection lost", zap.Error(err))
			}
		}),
		nats.ReconnectHandler(func(nc *nats.Conn) {
			logger.Info("NATS connection back", zap.String("server", nc.ConnectedUrlRedacted()))
		}),
	}
	if s.Credentials != "" {
		opts = append(opts, nats.UserCredentials(s.Credentials))
	}
	c := &conn{streams: make(map[string]jetstream.Stream), buckets: make(map[string]jetstream.KeyValue), ttlChanged: make(chan struct{})}
	url := strings.Join(s.URLs, ",")
	if len(s.URLs) == 0 {
		srv, err := server.NewServer(&server.Options{
			ServerName: "caddy-sse",
			JetStream:  true,
			StoreDir:   s.dataDir,
			DontListen: true,
			NoSigs:     true,
			NoLog:      true,
			MaxPayload: embeddedMaxPayload,
		})
		if err != nil {
			return nil, fmt.Errorf("nats store: embedded server: %v", err)
		}
		srv.Start()
		if !srv.ReadyForConnections(10 * time.Second) {
			srv.Shutdown()
			srv.WaitForShutdown()
			return nil, errors.New("nats store: the embedded server did not start within 10s")
		}
		c.srv = srv
		url = ""
		opts = append(opts, nats.InProcessServer(srv))
	}
	nc, err := nats.Connect(url, opts...)
	if err != nil {
		c.Destruct()
		return nil, fmt.Errorf("nats store: connecting: %v", err)
	}
	c.nc = nc
	c.js, err = jetstream.New(nc, jetstream.WithDefaultTimeout(maxCallTimeout))
	if err != nil {
		c.Destruct()
		return nil, fmt.Errorf("nats store: %v", err)
	}
	return c, nil
}

// Destruct closes the connection and shuts the embedded server down. The
// store's calls wait for their acks, so nothing is left to drain.
func (c *conn) Destruct() error {
	if c.nc != nil {
		c.nc.Close()
	}
	if c.srv != nil {
		c.srv.Shutdown()
		c.srv.WaitForShutdown()
	}
	return nil
}

// errUnreachable is what the store's calls return while the connection is
// down.
var errUnreachable = errors.New("NATS is unreachable")

// ready fails at once when the connection is not up, rather than after a
// timeout.
func (c *conn) ready() error {
	if !c.nc.IsConnected() {
		return fmt.Errorf("nats store: %w (connection %s)", errUnreachable, strings.ToLower(c.nc.Status().String()))
	}
	return nil
}

// Interface guards
var (
	_ caddy.Module          = (*Store)(nil)
	_ caddy.Provisioner     = (*Store)(nil)
	_ caddy.Validator       = (*Store)(nil)
	_ caddy.CleanerUpper    = (*Store)(nil)
	_ caddyfile.Unmarshaler = (*Store)(nil)
	_ caddysse.Store        = (*Store)(nil)
)
