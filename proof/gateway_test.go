package proof

import (
	"bufio"
	"bytes"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig"
	caddyfileformat "github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"

	_ "github.com/caddyserver/caddy/v2/modules/standard"
	_ "github.com/ssegateway/caddy-sse"
)

// profile is one route of the gateway: requests under /p/<name>/ go through
// an sse handler with these options to reverse_proxy to the test upstream.
type profile struct {
	// sse is the body of the sse directive's block, one option per line.
	sse string
	// proxy is the body of reverse_proxy's block, if any.
	proxy string
}

// gatewayConfig is what a test needs from its gateway.
type gatewayConfig struct {
	profiles map[string]profile
	// extraBind, when set, is one more address (host only) both sites are
	// served on, on the same ports as on 127.0.0.1.
	extraBind string
}

// gateway is a Caddy running in this process for one test.
type gateway struct {
	// httpURL is the plain HTTP/1.1 site, httpsURL the TLS site (HTTP/1.1,
	// HTTP/2 and HTTP/3 on the same port), both ending without a slash.
	httpURL, httpsURL string
	httpPort          int
	httpsPort         int
	dir               string
	// rootCAs trusts Caddy's local CA, which issued the TLS site's
	// certificate.
	rootCAs *x509.CertPool
}

// startGateway adapts a Caddyfile with the given routes and loads it into
// this process's Caddy, which is stopped when the test ends. The admin
// endpoint is off (the root package's tests use one; packages run in
// parallel) and nothing is persisted outside the test's directory.
func startGateway(t *testing.T, up *upstream, cfg gatewayConfig) *gateway {
	t.Helper()
	dir := t.TempDir()
	httpPort := freePort(t, "127.0.0.1", false)
	httpsPort := freePort(t, "127.0.0.1", true)
	g := &gateway{
		httpURL:   "http://127.0.0.1:" + strconv.Itoa(httpPort),
		httpsURL:  "https://localhost:" + strconv.Itoa(httpsPort),
		httpPort:  httpPort,
		httpsPort: httpsPort,
		dir:       dir,
	}

	var routes strings.Builder
	names := make([]string, 0, len(cfg.profiles))
	for name := range cfg.profiles {
		names = append(names, name)
	}
	sort.Strings(names)
	for _, name := range names {
		p := cfg.profiles[name]
		fmt.Fprintf(&routes, "\thandle /p/%s/* {\n\t\tsse {\n%s\n\t\t}\n", name, indent(p.sse, "\t\t\t"))
		fmt.Fprintf(&routes, "\t\treverse_proxy %s {\n%s\n\t\t}\n\t}\n", up.addr, indent(p.proxy, "\t\t\t"))
	}
	// Everything else (pages) goes to the upstream without the sse handler.
	fmt.Fprintf(&routes, "\thandle {\n\t\treverse_proxy %s\n\t}\n", up.addr)

	binds := "127.0.0.1"
	if cfg.extraBind != "" {
		binds += " " + cfg.extraBind
	}
	caddyfile := fmt.Sprintf(`{
	admin off
	persist_config off
	skip_install_trust
	local_certs
	storage file_system %[1]s
	http_port %[2]d
	https_port %[3]d
	grace_period 1s
	auto_https disable_redirects
	servers {
		protocols h1 h2 h3
	}
	log default {
		output file %[4]s
		level INFO
		exclude http.handlers.sse
	}
	log sse {
		output file %[5]s
		format json
		level DEBUG
		include http.handlers.sse
	}
}

http://:%[2]d {
	bind %[6]s
%[7]s}

https://localhost:%[3]d {
	bind %[6]s
	tls internal
%[7]s}
`, filepath.Join(dir, "storage"), httpPort, httpsPort,
		filepath.Join(dir, "caddy.log"), filepath.Join(dir, "sse.log"), binds, routes.String())

	caddyfile = string(caddyfileformat.Format([]byte(caddyfile)))
	adapter := caddyconfig.GetAdapter("caddyfile")
	cfgJSON, warnings, err := adapter.Adapt([]byte(caddyfile), map[string]any{"filename": "proof.Caddyfile"})
	if err != nil {
		t.Fatalf("adapting the test Caddyfile: %v\n%s", err, caddyfile)
	}
	for _, w := range warnings {
		t.Logf("Caddyfile warning: %s", w.String())
	}
	if err := caddy.Load(cfgJSON, true); err != nil {
		t.Fatalf("starting Caddy: %v\n%s", err, caddyfile)
	}
	t.Cleanup(func() {
		if err := caddy.Stop(); err != nil {
			t.Errorf("stopping Caddy: %v", err)
		}
		if t.Failed() {
			t.Logf("Caddyfile:\n%s\nCaddy log (tail):\n%s", caddyfile, tail(filepath.Join(dir, "caddy.log"), 4000))
		}
	})

	// The TLS site's certificate is issued by Caddy's local CA when the
	// site starts; trust that CA like a client told about it would.
	rootPEM, err := os.ReadFile(filepath.Join(dir, "storage", "pki", "authorities", "local", "root.crt"))
	if err != nil {
		t.Fatalf("reading Caddy's local CA: %v", err)
	}
	g.rootCAs = x509.NewCertPool()
	if !g.rootCAs.AppendCertsFromPEM(rootPEM) {
		t.Fatal("Caddy's local CA root is not a PEM certificate")
	}
	// The site's certificate is obtained in the background: wait until a
	// handshake succeeds.
	waitUntil(t, "a TLS handshake with the HTTPS site", 10*time.Second, func() bool {
		d := tls.Dialer{Config: g.tlsConfig(), NetDialer: &net.Dialer{Timeout: time.Second}}
		conn, err := d.Dial("tcp", net.JoinHostPort("127.0.0.1", strconv.Itoa(httpsPort)))
		if err != nil {
			return false
		}
		conn.Close()
		return true
	})
	return g
}

// tlsConfig is a client TLS configuration that trusts the gateway's CA.
func (g *gateway) tlsConfig() *tls.Config {
	return &tls.Config{RootCAs: g.rootCAs, ServerName: "localhost"}
}

// streamEnd is the handler's "stream ended" log line.
type streamEnd struct {
	Reason      string  `json:"reason"`
	Duration    float64 `json:"duration"`
	Events      int64   `json:"events"`
	Bytes       int64   `json:"bytes"`
	Heartbeats  int64   `json:"heartbeats"`
	LastEventID string  `json:"last_event_id"`
}

// streamEnds returns the handler's "stream ended" log lines so far.
func (g *gateway) streamEnds(t *testing.T) []streamEnd {
	t.Helper()
	var ends []streamEnd
	for _, line := range g.sseLog(t) {
		if !bytes.Contains(line, []byte(`"stream ended"`)) && !bytes.Contains(line, []byte(`"upstream broke the stream"`)) {
			continue
		}
		var e streamEnd
		if err := json.Unmarshal(line, &e); err != nil {
			t.Fatalf("log line %q: %v", line, err)
		}
		ends = append(ends, e)
	}
	return ends
}

// sseLog returns the lines the sse handler logged so far.
func (g *gateway) sseLog(t *testing.T) [][]byte {
	t.Helper()
	f, err := os.Open(filepath.Join(g.dir, "sse.log"))
	if os.IsNotExist(err) {
		return nil
	}
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var lines [][]byte
	scanner := bufio.NewScanner(f)
	scanner.Buffer(make([]byte, 64<<10), 1<<20)
	for scanner.Scan() {
		lines = append(lines, bytes.Clone(scanner.Bytes()))
	}
	if err := scanner.Err(); err != nil {
		t.Fatal(err)
	}
	return lines
}

// waitStreamEnds waits until the handler has logged at least n ended
// streams and returns them.
func (g *gateway) waitStreamEnds(t *testing.T, n int, within time.Duration) []streamEnd {
	t.Helper()
	var ends []streamEnd
	waitUntil(t, fmt.Sprintf("%d \"stream ended\" log lines", n), within, func() bool {
		ends = g.streamEnds(t)
		return len(ends) >= n
	})
	return ends
}

// freePort returns a loopback port that is free right now, for TCP and,
// when udp is set, for UDP too (HTTP/3 shares the HTTPS port). Caddy cannot
// report the port it picked for ":0", so the tests pick one and hand it
// over; another process could take it in between, which is unlikely on
// loopback and makes the test fail loudly rather than wrongly.
func freePort(t *testing.T, host string, udp bool) int {
	t.Helper()
	for range 20 {
		l, err := net.Listen("tcp", net.JoinHostPort(host, "0"))
		if err != nil {
			t.Fatal(err)
		}
		port := l.Addr().(*net.TCPAddr).Port
		ok := true
		if udp {
			pc, err := net.ListenPacket("udp", net.JoinHostPort(host, strconv.Itoa(port)))
			if err != nil {
				ok = false
			} else {
				pc.Close()
			}
		}
		l.Close()
		if ok {
			return port
		}
	}
	t.Fatal("no free port found in 20 tries")
	return 0
}

func indent(s, prefix string) string {
	lines := strings.Split(strings.TrimSpace(s), "\n")
	for i, l := range lines {
		lines[i] = prefix + strings.TrimSpace(l)
	}
	return strings.Join(lines, "\n")
}

// tail returns the last n bytes of a file, for failure messages.
func tail(path string, n int) string {
	b, err := os.ReadFile(path)
	if err != nil {
		return err.Error()
	}
	if len(b) > n {
		b = b[len(b)-n:]
	}
	return string(b)
}

// newHTTPClient returns a client for one test, closed when it ends. It
// never decompresses on its own, so tests see the bytes as sent.
func newHTTPClient(t *testing.T, transport *http.Transport) *http.Client {
	if transport == nil {
		transport = &http.Transport{}
	}
	transport.DisableCompression = true
	t.Cleanup(transport.CloseIdleConnections)
	return &http.Client{Transport: transport}
}
