package natsstore

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/nats-io/nats-server/v2/server"

	caddysse "github.com/ssegateway/caddy-sse"
)

// startServer runs a NATS server with JetStream on a random port for the
// test, and returns it with its client URL.
func startServer(t *testing.T) (*server.Server, string) {
	t.Helper()
	srv, err := server.NewServer(&server.Options{
		Host:      "127.0.0.1",
		Port:      -1,
		JetStream: true,
		StoreDir:  t.TempDir(),
		NoSigs:    true,
		NoLog:     true,
	})
	if err != nil {
		t.Fatal(err)
	}
	srv.Start()
	if !srv.ReadyForConnections(10 * time.Second) {
		t.Fatal("NATS server not ready within 10s")
	}
	t.Cleanup(func() {
		srv.Shutdown()
		srv.WaitForShutdown()
	})
	return srv, srv.ClientURL()
}

// gatewayURL spells the server's URL differently for each gateway, so
// that each gets a connection of its own from the pool (the pool shares
// one per setting, as gateways in one process would).
func gatewayURL(url string, gateway int) string {
	if gateway == 0 {
		return url
	}
	return strings.Replace(url, "nats://", fmt.Sprintf("nats://gw%d@", gateway), 1)
}

// provision makes a Store as Caddy would, cleaned up with the test.
func provision(t *testing.T, s *Store) *Store {
	t.Helper()
	ctx, cancel := caddy.NewContext(caddy.Context{Context: context.Background()})
	if err := s.Provision(ctx); err != nil {
		cancel()
		t.Fatalf("Provision: %v", err)
	}
	if err := s.Validate(); err != nil {
		cancel()
		t.Fatalf("Validate: %v", err)
	}
	t.Cleanup(func() {
		if err := s.Cleanup(); err != nil {
			t.Errorf("Cleanup: %v", err)
		}
		cancel()
	})
	return s
}

// gateway is one gateway's store on the server at url.
func gateway(t *testing.T, url string, n int, lease time.Duration) *Store {
	t.Helper()
	return provision(t, &Store{URLs: []string{gatewayURL(url, n)}, Lease: caddy.Duration(lease)})
}

// openLog opens a log, closed with the test.
func openLog(t *testing.T, s *Store, name string, events int) *natsLog {
	t.Helper()
	l, err := s.OpenLog(context.Background(), name, caddysse.LogLimits{Events: events, Bytes: 1 << 20})
	if err != nil {
		t.Fatalf("OpenLog: %v", err)
	}
	t.Cleanup(func() { _ = l.Close() })
	return l.(*natsLog)
}

func TestCaddyfile(t *testing.T) {
	for _, tc := range []struct {
		name, input string
		want        string // JSON, or "" for an error
		line        int    // the line an error names
	}{
		{"bare", `nats`, `{}`, 0},
		{"empty block", "nats {\n}", `{}`, 0},
		{"all", `nats {
			url nats://10.0.0.5:4222 nats://10.0.0.6:4222
			credentials /etc/caddy/sse.creds
			replicas 3
			lease 1500ms
		}`, `{"urls":["nats://10.0.0.5:4222","nats://10.0.0.6:4222"],"credentials":"/etc/caddy/sse.creds","replicas":3,"lease":1500000000}`, 0},
		{"argument after name", `nats nats://x`, "", 1},
		{"unknown option", "nats {\n\turl nats://x\n\tbogus 1\n}", "", 3},
		{"url without args", "nats {\n\turl\n}", "", 2},
		{"credentials without args", "nats {\n\tcredentials\n}", "", 2},
		{"credentials twice in a line", "nats {\n\tcredentials a b\n}", "", 2},
		{"replicas without args", "nats {\n\treplicas\n}", "", 2},
		{"replicas zero", "nats {\n\treplicas 0\n}", "", 2},
		{"replicas six", "nats {\n\treplicas 6\n}", "", 2},
		{"replicas not a number", "nats {\n\treplicas three\n}", "", 2},
		{"lease bad", "nats {\n\tlease soon\n}", "", 2},
		{"lease zero", "nats {\n\tlease 0s\n}", "", 2},
		{"lease negative", "nats {\n\tlease -1s\n}", "", 2},
		{"lease without args", "nats {\n\tlease\n}", "", 2},
		{"option twice", "nats {\n\tlease 1s\n\treplicas 1\n\tlease 2s\n}", "", 4},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var s Store
			err := s.UnmarshalCaddyfile(caddyfile.NewTestDispenser(tc.input))
			if tc.want == "" {
				if err == nil {
					t.Fatalf("no error, want one on line %d", tc.line)
				}
				if want := fmt.Sprintf("Testfile:%d", tc.line); !strings.HasSuffix(err.Error(), want) {
					t.Fatalf("error %q does not name line %d", err, tc.line)
				}
				return
			}
			if err != nil {
				t.Fatalf("error: %v", err)
			}
			got, _ := json.Marshal(&s)
			if string(got) != tc.want {
				t.Fatalf("got %s, want %s", got, tc.want)
			}
		})
	}
}

func TestValidate(t *testing.T) {
	for _, s := range []Store{
		{Replicas: 0, Lease: caddy.Duration(time.Second)},
		{Replicas: 6, Lease: caddy.Duration(time.Second)},
		{Replicas: 1, Lease: caddy.Duration(time.Millisecond)},
	} {
		if err := s.Validate(); err == nil {
			t.Errorf("%+v: no error", s)
		}
	}
}

// freeURL is a NATS URL nobody listens on.
func freeURL(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	return "nats://" + addr
}

func TestUnreachableProvisionsAndFailsFast(t *testing.T) {
	s := provision(t, &Store{URLs: []string{freeURL(t)}})
	start := time.Now()
	_, err := s.OpenLog(context.Background(), caddysse.LogName("k"), caddysse.LogLimits{Events: 8, Bytes: 1 << 20})
	if err == nil {
		t.Fatal("OpenLog: no error while NATS is unreachable")
	}
	if took := time.Since(start); took > time.Second {
		t.Fatalf("OpenLog took %v to fail", took)
	}
	t.Logf("OpenLog: %v", err)
}

// TestUnreachableAfterOpen: once the server is gone, every call fails at
// once, and a running Follow returns.
func TestUnreachableAfterOpen(t *testing.T) {
	srv, url := startServer(t)
	s := gateway(t, url, 0, time.Second)
	l := openLog(t, s, caddysse.LogName("k"), 8)

	followed := make(chan error, 1)
	caught := make(chan struct{})
	go func() {
		followed <- l.Follow(context.Background(), 0, func(caddysse.LogEvent) {}, func() { close(caught) })
	}()
	waitFor(t, caught, 3*time.Second, "caughtUp")
	ls := lead(t, l)

	srv.Shutdown()
	srv.WaitForShutdown()
	start := time.Now()
	select {
	case err := <-followed:
		if err == nil {
			t.Fatal("Follow returned nil")
		}
		t.Logf("Follow: %v after %v", err, time.Since(start))
	case <-time.After(3 * time.Second):
		t.Fatal("Follow did not return within 3s of the server's end")
	}

	// The holder cannot renew: it knows the lease lost within Lease.
	waitFor(t, ls.Lost(), time.Second+500*time.Millisecond, "Lost while NATS is down")
	if _, err := ls.Append(context.Background(), event("x")); !errors.Is(err, caddysse.ErrLeaseLost) {
		t.Fatalf("Append on a lost lease: %v", err)
	}

	for name, call := range map[string]func() error{
		"Lead":   func() error { _, err := l.Lead(context.Background()); return err },
		"Header": func() error { _, err := l.Header(context.Background()); return err },
		"Follow": func() error {
			return l.Follow(context.Background(), 0, func(caddysse.LogEvent) {}, func() {})
		},
		"OpenLog": func() error {
			_, err := s.OpenLog(context.Background(), caddysse.LogName("k2"), caddysse.LogLimits{Events: 8})
			return err
		},
	} {
		start := time.Now()
		err := call()
		took := time.Since(start)
		if err == nil {
			t.Errorf("%s: no error while NATS is down", name)
			continue
		}
		if took > 500*time.Millisecond {
			t.Errorf("%s took %v to fail", name, took)
		}
		if !strings.Contains(err.Error(), "unreachable") {
			t.Errorf("%s: %v, want it to say NATS is unreachable", name, err)
		}
	}
}

// TestEmbedded runs the store with no URLs: a server in the process, its
// data in the data directory, so that replay survives a restart.
func TestEmbedded(t *testing.T) {
	dir := t.TempDir()
	name := caddysse.LogName("embedded")
	var seqs []uint64
	{
		s := provision(t, &Store{dataDir: dir})
		if s.conn.srv == nil {
			t.Fatal("no embedded server")
		}
		l := openLog(t, s, name, 8)
		ls := lead(t, l)
		for i := range 3 {
			appendEvent(t, ls, fmt.Sprint(i))
		}
		evs := follow(t, l, 0, 3)
		for _, ev := range evs {
			seqs = append(seqs, ev.Seq)
		}
		ls.Release()
		l.Close()
		s.Cleanup()
		s.conn = nil // cleaned up here, not again with the test
	}
	if _, ok := pool.References("embedded\x00" + dir); ok {
		t.Fatal("the embedded server is still pooled after its last user went")
	}
	s := provision(t, &Store{dataDir: dir})
	l := openLog(t, s, name, 8)
	evs := follow(t, l, 0, 3)
	for i, ev := range evs {
		if ev.Seq != seqs[i] || string(ev.Data) != fmt.Sprintf("data: %d\n\n", i) {
			t.Fatalf("after restart, event %d is %d %q, want %d", i, ev.Seq, ev.Data, seqs[i])
		}
	}
	ls := lead(t, l)
	if ls.ResumeID() != "2" {
		t.Fatalf("ResumeID after restart = %q, want 2", ls.ResumeID())
	}
}

// TestPoolOutlivesConfig: a log keeps the connection after the config that
// opened it is cleaned up, and a reloaded config shares it.
func TestPoolOutlivesConfig(t *testing.T) {
	_, url := startServer(t)
	ctx, cancel := caddy.NewContext(caddy.Context{Context: context.Background()})
	defer cancel()
	old := &Store{URLs: []string{url}}
	if err := old.Provision(ctx); err != nil {
		t.Fatal(err)
	}
	l, err := old.OpenLog(context.Background(), caddysse.LogName("k"), caddysse.LogLimits{Events: 4})
	if err != nil {
		t.Fatal(err)
	}
	reloaded := provision(t, &Store{URLs: []string{url}})
	if reloaded.conn != old.conn {
		t.Fatal("a reloaded config with the same settings got a connection of its own")
	}
	if err := old.Cleanup(); err != nil {
		t.Fatal(err)
	}
	ls, err := l.Lead(context.Background())
	if err != nil || ls == nil {
		t.Fatalf("Lead after the config went: %v, %v", ls, err)
	}
	ls.Release()
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
	if n, _ := pool.References(reloaded.poolKey); n != 1 {
		t.Fatalf("%d references left, want the reloaded config's", n)
	}
}
