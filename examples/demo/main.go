// Command demo shows what the sse handler is for, in one process: a
// deliberately legacy SSE server on loopback, Caddy with the sse handler in
// front of it (configured from examples/demo/Caddyfile), and a page that
// makes visible what the gateway adds: heartbeats, closes with a reason and a
// retry hint, reconnects with Last-Event-ID, upstream connections that go
// away as soon as the browser does, and a shared stream: one upstream
// connection for every tab, which survives an upstream restart unnoticed and
// replays what a returning tab missed.
//
// Run it from the repository root:
//
//	go run ./examples/demo
package main

import (
	"bytes"
	"context"
	_ "embed"
	"errors"
	"flag"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"os"
	"os/signal"
	"strconv"
	"syscall"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig"

	_ "github.com/caddyserver/caddy/v2/modules/standard"
	_ "github.com/ssegateway/caddy-sse"
)

// caddyfileTemplate is the gateway's configuration. Its {$SSE_DEMO_*}
// placeholders are filled in by run before it is adapted.
//
//go:embed Caddyfile
var caddyfileTemplate []byte

// pageHTML is the demo page, served by the upstream behind Caddy.
//
//go:embed page/index.html
var pageHTML []byte

// config is what run needs to start the demo.
type config struct {
	// Listen is the host:port the gateway listens on; port 0 picks a free one.
	Listen string
	// HonourLastEventID makes the legacy upstream resume after the
	// Last-Event-ID it receives instead of ignoring it.
	HonourLastEventID bool
	// EventInterval is the time between two upstream events.
	EventInterval time.Duration
	// Out receives the banner and the upstream's log lines.
	Out io.Writer
	// Ready, when set, is called with the page's URL once everything runs.
	Ready func(pageURL string)
}

func main() {
	cfg := config{Out: os.Stdout, EventInterval: time.Second}
	flag.StringVar(&cfg.Listen, "listen", "127.0.0.1:8080", "`host:port` for the gateway (port 0 picks a free port)")
	flag.BoolVar(&cfg.HonourLastEventID, "honour-last-event-id", false, "make the upstream resume after Last-Event-ID instead of ignoring it")
	flag.Parse()

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := run(ctx, cfg); err != nil {
		fmt.Fprintln(os.Stderr, "demo:", err)
		os.Exit(1)
	}
}

// run starts the upstream and the gateway, and stops both when ctx ends.
func run(ctx context.Context, cfg config) error {
	logger := log.New(cfg.Out, "", log.Ltime)

	gatewayHost, gatewayPort, err := pickGatewayAddress(cfg.Listen)
	if err != nil {
		return err
	}

	// The upstream listens on a free loopback port that it keeps, so
	// nothing else can take it between choosing and serving.
	upstreamListener, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return fmt.Errorf("upstream listener: %w", err)
	}
	stopping, stopUpstream := context.WithCancel(context.Background())
	defer stopUpstream()
	upstream := newLegacyUpstream(stopping, cfg.EventInterval, cfg.HonourLastEventID, logger)
	upstreamServer := &http.Server{
		Handler:           upstream.handler(pageHTML),
		ReadHeaderTimeout: 5 * time.Second,
		ErrorLog:          logger,
	}
	upstreamDone := make(chan error, 1)
	go func() { upstreamDone <- upstreamServer.Serve(upstreamListener) }()

	if err := startGateway(gatewayHost, gatewayPort, upstreamListener.Addr().String(), logger); err != nil {
		stopUpstream()
		_ = upstreamServer.Close()
		<-upstreamDone
		return err
	}

	pageURL := "http://" + net.JoinHostPort(gatewayHost, gatewayPort) + "/"
	printBanner(cfg.Out, pageURL, "http://"+upstreamListener.Addr().String()+"/events", cfg.HonourLastEventID)
	if cfg.Ready != nil {
		cfg.Ready(pageURL)
	}

	select {
	case <-ctx.Done():
	case err := <-upstreamDone:
		_ = caddy.Stop()
		return fmt.Errorf("upstream stopped: %w", err)
	}
	logger.Printf("demo: stopping")

	// Caddy first: it stops accepting connections and starts its graceful
	// shutdown in the background. The upstream then ends its streams, which
	// ends the gateway's streams, so that shutdown completes at once
	// instead of waiting out the grace period for browsers that never leave.
	if err := caddy.Stop(); err != nil {
		logger.Printf("demo: stopping Caddy: %v", err)
	}
	stopUpstream()
	shutdownCtx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := upstreamServer.Shutdown(shutdownCtx); err != nil {
		_ = upstreamServer.Close()
	}
	if err := <-upstreamDone; err != nil && !errors.Is(err, http.ErrServerClosed) {
		return fmt.Errorf("upstream: %w", err)
	}
	logger.Printf("demo: stopped")
	return nil
}

// pickGatewayAddress splits listen into host and port, replacing port 0 by
// a port that is free right now.
func pickGatewayAddress(listen string) (host, port string, err error) {
	host, port, err = net.SplitHostPort(listen)
	if err != nil {
		return "", "", fmt.Errorf("listen address %q: %w", listen, err)
	}
	if host == "" {
		host = "127.0.0.1"
	}
	if port != "0" {
		return host, port, nil
	}
	// Caddy cannot report the port it picked for ":0", so pick one here and
	// hand it over; another process could take it in between, which is
	// acceptable for a demo and its test.
	l, err := net.Listen("tcp", net.JoinHostPort(host, "0"))
	if err != nil {
		return "", "", fmt.Errorf("finding a free port: %w", err)
	}
	port = strconv.Itoa(l.Addr().(*net.TCPAddr).Port)
	if err := l.Close(); err != nil {
		return "", "", err
	}
	return host, port, nil
}

// startGateway adapts the demo's Caddyfile and runs it in this process.
func startGateway(bindHost, port, upstreamAddr string, logger *log.Logger) error {
	caddyfile, err := fillPlaceholders(caddyfileTemplate, map[string]string{
		"SSE_DEMO_BIND":     bindHost,
		"SSE_DEMO_PORT":     port,
		"SSE_DEMO_UPSTREAM": upstreamAddr,
	})
	if err != nil {
		return err
	}
	adapter := caddyconfig.GetAdapter("caddyfile")
	if adapter == nil {
		return errors.New("the caddyfile adapter is not registered")
	}
	cfgJSON, warnings, err := adapter.Adapt(caddyfile, map[string]any{"filename": "examples/demo/Caddyfile"})
	if err != nil {
		return fmt.Errorf("adapting the demo Caddyfile: %w", err)
	}
	for _, w := range warnings {
		logger.Printf("demo: Caddyfile warning: %s", w.String())
	}
	if err := caddy.Load(cfgJSON, true); err != nil {
		return fmt.Errorf("starting Caddy: %w", err)
	}
	return nil
}

// fillPlaceholders replaces the Caddyfile's {$NAME} environment placeholders
// with values, so that the demo does not have to change its own environment.
// Every value must be used, and the result must have no {$SSE_DEMO_ left.
func fillPlaceholders(caddyfile []byte, values map[string]string) ([]byte, error) {
	out := caddyfile
	for name, value := range values {
		placeholder := []byte("{$" + name + "}")
		if !bytes.Contains(out, placeholder) {
			return nil, fmt.Errorf("the demo Caddyfile has no %s placeholder", placeholder)
		}
		out = bytes.ReplaceAll(out, placeholder, []byte(value))
	}
	if i := bytes.Index(out, []byte("{$SSE_DEMO_")); i >= 0 {
		return nil, fmt.Errorf("the demo Caddyfile has an unknown placeholder at byte %d", i)
	}
	return out, nil
}

func printBanner(w io.Writer, pageURL, upstreamURL string, honour bool) {
	mode := "ignores Last-Event-ID, counts from 1 on every connection\n            (-honour-last-event-id or the page's ?resume=1 changes that)"
	if honour {
		mode = "honours Last-Event-ID: resumes after it"
	}
	fmt.Fprintf(w, `
caddy-sse demo: a legacy SSE server made well-behaved by Caddy's sse handler

  Open      %s
  Gateway   examples/demo/Caddyfile: heartbeat 2s, idle_timeout 6s,
            max_lifetime 20s (18-20s), retry 1s, close_event gateway-close;
            /shared/*: share (replay 256, linger 2s, assign_ids)
  Upstream  %s (direct, without the gateway)
            %s

What to watch:
  - a numbered event every second, straight through the gateway;
  - "Silence upstream": heartbeat comments every 2s on the raw tap, then after
    6s of silence the gateway ends the stream with reason idle_timeout;
  - every 18-20s the gateway ends each stream (max_lifetime): "retry: 1000",
    then event gateway-close with the reason; the browser reconnects 1s later
    and sends Last-Event-ID, which the page shows as the upstream received it;
  - the shared section: tabs A and B make one upstream connection; "Restart
    upstream" drops it and the server answers 503 for 3s, the gateway
    reconnects and the tabs see no error; "Close tab B for 5 s" brings B back
    with the events it missed;
  - close the tab: this terminal shows the upstream noticing each connection
    is gone, and "open connections: 0" (the shared one 2s later).

Ctrl-C stops everything.

`, pageURL, upstreamURL, mode)
}
