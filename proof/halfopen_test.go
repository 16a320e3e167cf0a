//go:build linux

package proof

import (
	"context"
	"crypto/rand"
	"crypto/tls"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"runtime"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/quic-go/quic-go"
	"github.com/quic-go/quic-go/http3"
	"golang.org/x/sys/unix"
)

// TestHalfOpenClient puts clients in a network namespace of their own,
// joined to this one by a veth pair, and takes the clients' side of the
// link down mid-stream: they neither read nor close nor reset, they are
// simply gone. Over TCP (HTTP/1.1, HTTP/2) heartbeats then stay
// unacknowledged, and TCP_USER_TIMEOUT (set by the handler to
// write_timeout) must end the connection, and the upstream with it, within
// heartbeat + write_timeout. Over HTTP/3 nothing in the handler's reach sees
// unacknowledged data: the stream ends when QUIC's idle timeout (30 s,
// quic-go's default, which Caddy keeps) closes the connection; the test
// measures that and holds it to that bound.
func TestHalfOpenClient(t *testing.T) {
	const (
		heartbeat, writeTimeout = 500 * time.Millisecond, time.Second
		quicIdleTimeout         = 30 * time.Second
	)
	rec := report.start(t, "half-open")
	if os.Geteuid() != 0 {
		requireTool(t, "the half-open test needs root to create a network namespace")
	}
	if _, err := exec.LookPath("ip"); err != nil {
		requireTool(t, "the half-open test needs iproute2's ip command: %v", err)
	}
	link := newVethNamespace(t)

	up := newUpstream(t)
	g := startGateway(t, up, gatewayConfig{
		profiles: map[string]profile{
			"halfopen": {sse: fmt.Sprintf("heartbeat %s\nwrite_timeout %s", heartbeat, writeTimeout)},
		},
		extraBind: link.hostAddr,
	})
	// Clients whose sockets live in the namespace and reach the gateway at
	// its address on the veth pair.
	httpAddr := net.JoinHostPort(link.hostAddr, strconv.Itoa(g.httpPort))
	httpsAddr := net.JoinHostPort(link.hostAddr, strconv.Itoa(g.httpsPort))
	h1 := newHTTPClient(t, &http.Transport{
		DisableKeepAlives: true,
		DialContext: func(ctx context.Context, network, _ string) (net.Conn, error) {
			return dialInNamespace(link.nsPath, network, httpAddr)
		},
	})
	h2 := newHTTPClient(t, &http.Transport{
		TLSClientConfig:   g.tlsConfig(),
		ForceAttemptHTTP2: true,
		DialContext: func(ctx context.Context, network, _ string) (net.Conn, error) {
			return dialInNamespace(link.nsPath, network, httpsAddr)
		},
	})
	var packetConns []net.PacketConn
	t.Cleanup(func() {
		for _, pc := range packetConns {
			pc.Close()
		}
	})
	h3 := &http3.Transport{
		TLSClientConfig: g.tlsConfig(),
		Dial: func(ctx context.Context, _ string, tlsCfg *tls.Config, cfg *quic.Config) (*quic.Conn, error) {
			pc, err := listenUDPInNamespace(link.nsPath)
			if err != nil {
				return nil, err
			}
			packetConns = append(packetConns, pc)
			remote, err := net.ResolveUDPAddr("udp", httpsAddr)
			if err != nil {
				return nil, err
			}
			return quic.DialEarly(ctx, pc, remote, tlsCfg, cfg)
		},
	}
	t.Cleanup(func() { h3.Close() })

	type halfOpen struct {
		proto string
		s     *clientStream
		req   *upstreamRequest
	}
	var streams []halfOpen
	for _, c := range []struct {
		proto  string
		major  int
		client *http.Client
		base   string
		n      int
	}{
		{"HTTP/1.1", 1, h1, g.httpURL, 3},
		{"HTTP/2", 2, h2, g.httpsURL, 2},
		{"HTTP/3", 3, &http.Client{Transport: h3}, g.httpsURL, 2},
	} {
		for i := range c.n {
			key := up.key("halfopen")
			s := openStream(t, c.client, c.base+"/p/halfopen/push?k="+key, nil)
			if s.resp.ProtoMajor != c.major {
				t.Fatalf("the response came over %s, want %s", s.resp.Proto, c.proto)
			}
			req := up.request(t, key, 1, 5*time.Second)
			req.send(t, fmt.Sprintf("id: %d\ndata: hello from across the veth\n\n", i))
			s.waitContains(t, "data: hello from across the veth\n\n", 0, 2*time.Second)
			streams = append(streams, halfOpen{c.proto, s, req})
		}
	}
	// A heartbeat on each, to see the path works both ways before cutting it.
	for _, h := range streams {
		h.s.waitContains(t, "\n:\n\n", 0, heartbeat+slack)
	}

	down := time.Now()
	link.run(t, "ip", "-n", link.ns, "link", "set", link.nsDev, "down")
	tcpBound := heartbeat + writeTimeout + slack
	quicBound := quicIdleTimeout + heartbeat + slack
	worst := map[string]time.Duration{}
	for _, h := range streams {
		bound := tcpBound
		if h.proto == "HTTP/3" {
			bound = quicBound
		}
		d := h.req.waitEnded(t, bound+5*time.Second).Sub(down)
		if d > bound {
			t.Errorf("%s: an upstream's connection ended %s after the client's link went down, want at most %s", h.proto, d, bound)
		}
		worst[h.proto] = max(worst[h.proto], d)
		if h.proto != "HTTP/3" {
			rec.teardown(d)
		}
	}
	reasons := map[string]int{}
	for _, e := range g.waitStreamEnds(t, len(streams), 2*time.Second) {
		reasons[e.Reason]++
	}
	rec.figure("teardown samples are the %d TCP streams (heartbeat %s, write_timeout %s); worst HTTP/1.1 %s, HTTP/2 %s",
		len(streams)-2, heartbeat, writeTimeout, ms(worst["HTTP/1.1"]), ms(worst["HTTP/2"]))
	rec.figure("HTTP/3 (limitation: ended by QUIC's %s idle timeout, not write_timeout): %s", quicIdleTimeout, ms(worst["HTTP/3"]))
	rec.figure("logged reasons %v", reasons)
	up.waitQuiet(t, 5*time.Second)
	waitNoModuleGoroutines(t, 5*time.Second)
}

// vethNamespace is a network namespace joined to this one by a veth pair,
// with a /30 of 10.x addresses used only on that pair.
type vethNamespace struct {
	ns, nsPath       string
	hostDev, nsDev   string
	hostAddr, nsAddr string
}

// newVethNamespace creates the namespace and the pair, removed when the
// test ends.
func newVethNamespace(t *testing.T) *vethNamespace {
	t.Helper()
	var r [2]byte
	if _, err := rand.Read(r[:]); err != nil {
		t.Fatal(err)
	}
	suffix := fmt.Sprintf("%02x%02x", r[0], r[1])
	third := 1 + int(r[0])%254
	l := &vethNamespace{
		ns:       "sseproof" + suffix,
		hostDev:  "sspr" + suffix + "h",
		nsDev:    "sspr" + suffix + "n",
		hostAddr: fmt.Sprintf("10.213.%d.1", third),
		nsAddr:   fmt.Sprintf("10.213.%d.2", third),
	}
	l.nsPath = "/var/run/netns/" + l.ns
	if out, err := exec.Command("ip", "netns", "add", l.ns).CombinedOutput(); err != nil {
		requireTool(t, "cannot create a network namespace: %v: %s", err, out)
	}
	t.Cleanup(func() {
		// Deleting the namespace destroys the veth end in it, and so its
		// peer; the explicit delete covers a failure half-way.
		_ = exec.Command("ip", "netns", "del", l.ns).Run()
		_ = exec.Command("ip", "link", "del", l.hostDev).Run()
	})
	l.run(t, "ip", "link", "add", l.hostDev, "type", "veth", "peer", "name", l.nsDev)
	l.run(t, "ip", "link", "set", l.nsDev, "netns", l.ns)
	l.run(t, "ip", "addr", "add", l.hostAddr+"/30", "dev", l.hostDev)
	l.run(t, "ip", "link", "set", l.hostDev, "up")
	l.run(t, "ip", "-n", l.ns, "addr", "add", l.nsAddr+"/30", "dev", l.nsDev)
	l.run(t, "ip", "-n", l.ns, "link", "set", l.nsDev, "up")
	l.run(t, "ip", "-n", l.ns, "link", "set", "lo", "up")
	return l
}

func (l *vethNamespace) run(t *testing.T, name string, args ...string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if out, err := exec.CommandContext(ctx, name, args...).CombinedOutput(); err != nil {
		t.Fatalf("%s %s: %v: %s", name, strings.Join(args, " "), err, out)
	}
}

// inNamespace runs f on a thread that has entered the network namespace
// at nsPath. Sockets f creates stay in that namespace after the thread
// returns to this process's namespace.
func inNamespace(nsPath string, f func()) error {
	done := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		// If the thread cannot return to its namespace it stays locked,
		// and the runtime discards it when this goroutine ends.
		home, err := os.Open("/proc/thread-self/ns/net")
		if err != nil {
			done <- err
			return
		}
		defer home.Close()
		target, err := os.Open(nsPath)
		if err != nil {
			done <- err
			return
		}
		defer target.Close()
		if err := unix.Setns(int(target.Fd()), unix.CLONE_NEWNET); err != nil {
			done <- fmt.Errorf("entering %s: %w", nsPath, err)
			return
		}
		f()
		if unix.Setns(int(home.Fd()), unix.CLONE_NEWNET) == nil {
			runtime.UnlockOSThread()
		}
		done <- nil
	}()
	return <-done
}

// dialInNamespace dials TCP from inside the network namespace at nsPath.
func dialInNamespace(nsPath, network, addr string) (conn net.Conn, err error) {
	if nsErr := inNamespace(nsPath, func() { conn, err = net.DialTimeout(network, addr, 5*time.Second) }); nsErr != nil {
		return nil, nsErr
	}
	return conn, err
}

// listenUDPInNamespace opens a UDP socket inside the network namespace at
// nsPath.
func listenUDPInNamespace(nsPath string) (pc net.PacketConn, err error) {
	if nsErr := inNamespace(nsPath, func() { pc, err = net.ListenPacket("udp4", "0.0.0.0:0") }); nsErr != nil {
		return nil, nsErr
	}
	return pc, err
}
