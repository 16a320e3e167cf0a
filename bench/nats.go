//go:build linux

package main

import (
	"errors"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/nats-io/nats-server/v2/server"
)

// The fleet target's NATS server (with JetStream) is nats-server's own code,
// linked into this harness from its Go module, so nothing needs installing.
// The harness runs it in a child process of its own binary (os.Args[1] ==
// natsServerCommand) rather than in its own process: its memory and CPU
// are then measured apart from the gateways' and from the harness's clients
// and upstream, and its collector and scheduler do not share a Go runtime
// with thousands of client readers.

// natsServerCommand is the first argument that makes this binary the NATS
// server instead of the harness.
const natsServerCommand = "nats-server"

// natsVersion is the NATS server's version, for the report.
const natsVersion = server.VERSION

// runNATSServer serves NATS with JetStream on 127.0.0.1:port, keeping
// JetStream's files under the store directory, until SIGTERM or SIGINT.
func runNATSServer(args []string) error {
	fs := flag.NewFlagSet(natsServerCommand, flag.ContinueOnError)
	port := fs.Int("port", 0, "client port on 127.0.0.1")
	store := fs.String("store", "", "JetStream's store directory")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *port <= 0 || *store == "" {
		return errors.New("want -port and -store")
	}
	s, err := server.NewServer(&server.Options{
		Host:      "127.0.0.1",
		Port:      *port,
		JetStream: true,
		StoreDir:  *store,
		// The harness stops it with SIGTERM, handled below.
		NoSigs: true,
	})
	if err != nil {
		return err
	}
	s.ConfigureLogger()
	s.Start()
	if !s.ReadyForConnections(15 * time.Second) {
		s.Shutdown()
		return errors.New("not ready for connections after 15s")
	}
	if !s.JetStreamEnabled() {
		s.Shutdown()
		return errors.New("JetStream is not enabled")
	}
	fmt.Fprintf(os.Stderr, "nats-server %s with JetStream on %s, store %s\n", server.VERSION, s.Addr(), *store)
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGTERM, syscall.SIGINT)
	<-sig
	s.Shutdown()
	s.WaitForShutdown()
	return nil
}
