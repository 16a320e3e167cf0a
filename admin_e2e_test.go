package caddysse

import (
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2/caddytest"
)

// The admin API through a real Caddy (caddytest, admin on localhost:2995,
// HTTP on 29480, apart from the other end-to-end tests' ports), with the
// real reverse_proxy in front of a real upstream on loopback: its numbers
// against the traffic driven through the gateway, a reconnect, and what
// its answers must never hold.

const (
	adminE2EHost  = "http://localhost:29480"
	adminE2EAdmin = "http://localhost:2995"
)

func adminE2EConfig(target string) string {
	return fmt.Sprintf(`{
	admin localhost:2995
	http_port 29480
	https_port 29843
	grace_period 1s
	skip_install_trust
}
http://localhost:29480 {
	handle /limited* {
		sse {
			heartbeat 100ms
			max_streams 1
		}
		reverse_proxy %[1]s
	}
	handle /shared* {
		sse {
			heartbeat 100ms
			share {
				linger off
			}
		}
		reverse_proxy %[1]s
	}
	handle {
		sse {
			heartbeat 100ms
		}
		reverse_proxy %[1]s
	}
}`, target)
}

// adminE2E reads the admin API and keeps every answer, to look for what
// none may hold.
type adminE2E struct {
	t       *testing.T
	answers []string
}

func (a *adminE2E) do(method, path string) (*http.Response, string) {
	a.t.Helper()
	req, _ := http.NewRequest(method, adminE2EAdmin+path, nil)
	resp, err := plainClient.Do(req)
	if err != nil {
		a.t.Fatalf("%s %s: %v", method, path, err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		a.t.Fatalf("%s %s: %v", method, path, err)
	}
	a.answers = append(a.answers, string(body))
	return resp, string(body)
}

func (a *adminE2E) get(path string, v any) {
	a.t.Helper()
	resp, body := a.do(http.MethodGet, path)
	if resp.StatusCode != http.StatusOK || resp.Header.Get("Content-Type") != "application/json" {
		a.t.Fatalf("GET %s: %d %q %s", path, resp.StatusCode, resp.Header.Get("Content-Type"), body)
	}
	if err := json.Unmarshal([]byte(body), v); err != nil {
		a.t.Fatalf("GET %s: %v in %s", path, err, body)
	}
}

// handlers reads GET /sse/streams: the plain route's handler, the limited
// one's and the shared one's, each found by its options.
func (a *adminE2E) handlers() (plain, limited, shared handlerStatus) {
	a.t.Helper()
	var list []handlerStatus
	a.get("/sse/streams", &list)
	if len(list) != 3 {
		a.t.Fatalf("%d handlers, want 3: %+v", len(list), list)
	}
	indexes := map[int]bool{}
	for _, st := range list {
		if st.Server != "srv0" || len(st.Config) != 12 || st.Draining {
			a.t.Errorf("handler %+v", st)
		}
		indexes[st.Index] = true
		switch {
		case st.Shared:
			shared = st
		case st.MaxStreams == 1:
			limited = st
		default:
			plain = st
		}
	}
	if !indexes[1] || !indexes[2] || !indexes[3] {
		a.t.Errorf("handler indexes %v, want 1, 2 and 3", indexes)
	}
	return plain, limited, shared
}

// waitHandlers polls GET /sse/streams until ok holds.
func (a *adminE2E) waitHandlers(what string, ok func(plain, limited, shared handlerStatus) bool) (plain, limited, shared handlerStatus) {
	a.t.Helper()
	deadline := time.Now().Add(e2eWait)
	for {
		plain, limited, shared = a.handlers()
		if ok(plain, limited, shared) {
			return plain, limited, shared
		}
		if time.Now().After(deadline) {
			a.t.Fatalf("%s: never; plain %+v, limited %+v, shared %+v", what, plain, limited, shared)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func (a *adminE2E) hubs() []hubStatus {
	a.t.Helper()
	var list []hubStatus
	a.get("/sse/hubs", &list)
	return list
}

// waitHub polls GET /sse/hubs until there is one hub, for which ok holds.
func (a *adminE2E) waitHub(what string, ok func(hubStatus) bool) hubStatus {
	a.t.Helper()
	deadline := time.Now().Add(e2eWait)
	for {
		hubs := a.hubs()
		if len(hubs) == 1 && ok(hubs[0]) {
			return hubs[0]
		}
		if time.Now().After(deadline) {
			a.t.Fatalf("%s: never; hubs %+v", what, hubs)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func TestAdminE2E(t *testing.T) {
	if os.Getenv("CI") == "true" {
		t.Cleanup(func() {
			if t.Skipped() {
				t.Error("caddytest could not start Caddy; in CI that is a failure")
			}
		})
	}
	up := newShareUpstream(t)
	tester := caddytest.NewTester(t).WithDefaultOverrides(caddytest.Config{AdminPort: 2995})
	tester.InitServer(adminE2EConfig(strings.TrimPrefix(up.srv.URL, "http://")), "caddyfile")
	admin := &adminE2E{t: t}
	// Every request carries a credential and a cookie, on a path and query
	// that could name a user: none of it may reach an admin answer.
	const token, cookie = "secret-token", "session=c00k1e-v4lue"
	secrets := []string{token, cookie, "c00k1e-v4lue", "acct-7731", "room=r-4242", "tab=t-5150",
		"/acct-7731/events?tab=t-5150", "/limited/acct-7731?tab=t-5150", "/shared/acct-7731?room=r-4242"}
	who := []string{"Authorization", "Bearer " + token, "Cookie", cookie}
	open := func(pathQuery string) *clientStream {
		t.Helper()
		return openStreamAt(t, adminE2EHost+pathQuery, who...)
	}

	if plain, limited, shared := admin.handlers(); plain.Streams != (streamCounts{}) || limited.Streams != (streamCounts{}) ||
		shared.Streams != (streamCounts{}) || sum(plain.Ended)+sum(plain.Refused)+sum(limited.Ended)+sum(limited.Refused) != 0 {
		t.Fatalf("freshly loaded handlers: %+v %+v %+v", plain, limited, shared)
	}

	t.Run("streams held, ended and refused", func(t *testing.T) {
		const n = 5
		var clients []*clientStream
		var reqs []*shareUpReq
		for i := range n {
			c := open(fmt.Sprintf("/acct-7731/events?tab=t-5150&i=%d", i))
			req := up.next(t)
			req.send(t, "data: hello\n\n")
			c.waitFor(t, "data: hello\n\n")
			clients, reqs = append(clients, c), append(reqs, req)
		}
		plain, _, _ := admin.handlers()
		if plain.Streams != (streamCounts{Open: n}) {
			t.Errorf("%d streams held: the admin API says %+v", n, plain.Streams)
		}
		// Two leave.
		for i := range 2 {
			clients[i].cancel()
			reqs[i].waitGone(t)
		}
		plain, _, _ = admin.waitHandlers("two streams ended", func(plain, _, _ handlerStatus) bool {
			return plain.Ended["client_gone"] == 2
		})
		if plain.Streams != (streamCounts{Open: n - 2}) || sum(plain.Ended) != 2 || sum(plain.Refused) != 0 {
			t.Errorf("after two left: %+v", plain)
		}
		// max_streams 1: the second stream is refused, before the upstream.
		held := open("/limited/acct-7731?tab=t-5150")
		req := up.next(t)
		req.send(t, "data: hi\n\n")
		held.waitFor(t, "data: hi\n\n")
		refused := open("/limited/acct-7731?tab=t-5150")
		if body, err := refused.waitEnd(t); err != io.EOF || !strings.HasPrefix(body, "retry: ") {
			t.Errorf("the stream over max_streams got %q, %v; want a refusal", body, err)
		}
		up.none(t)
		_, limited, _ := admin.waitHandlers("one refused", func(_, limited, _ handlerStatus) bool {
			return limited.Refused["max_streams"] == 1
		})
		if limited.Streams != (streamCounts{Open: 1}) || sum(limited.Refused) != 1 || sum(limited.Ended) != 0 {
			t.Errorf("limited handler: %+v", limited)
		}
		for _, c := range append(clients[2:], held) {
			c.cancel()
		}
		for _, r := range append(reqs[2:], req) {
			r.waitGone(t)
		}
		plain, limited, _ = admin.waitHandlers("all ended", func(plain, limited, _ handlerStatus) bool {
			return plain.Ended["client_gone"] == n && limited.Ended["client_gone"] == 1
		})
		if plain.Streams != (streamCounts{}) || limited.Streams != (streamCounts{}) || sum(plain.Ended) != n || sum(limited.Ended) != 1 {
			t.Errorf("after all left: plain %+v, limited %+v", plain, limited)
		}
	})

	t.Run("a hub's clients, and a reconnect", func(t *testing.T) {
		const n = 4
		var clients []*clientStream
		for range n {
			clients = append(clients, open("/shared/acct-7731?room=r-4242"))
		}
		req := up.next(t)
		req.send(t, "id: 1\ndata: one\n\n")
		for _, c := range clients {
			c.waitFor(t, "data: one\n\n")
		}
		up.none(t)
		hb := admin.waitHub("a hub with every client", func(hb hubStatus) bool { return hb.Clients == n })
		_, _, shared := admin.handlers()
		if hb.State != "live" || hb.Handler != shared.handlerID || hb.Upstream.State != "connected" || hb.Upstream.Via != shared.handlerID ||
			hb.Upstream.ConnectedSince == nil || hb.Upstream.Reconnects != 0 || hb.Upstream.LastEventID == nil || *hb.Upstream.LastEventID != "1" ||
			hb.Kept != (keptStatus{Events: 1, Bytes: int64(len("id: 1\ndata: one\n\n"))}) {
			t.Errorf("hub %+v", hb)
		}
		if shared.Streams != (streamCounts{Open: n}) {
			t.Errorf("the shared handler's streams: %+v, want %d open", shared.Streams, n)
		}

		// Renewed: the upstream request ends, exactly one new one asks
		// from the last id, and every client goes on with no gap and no
		// duplicate, though the upstream sends its last event again.
		resp, body := admin.do(http.MethodPost, "/sse/hubs/"+hb.Hub+"/reconnect")
		if resp.StatusCode != http.StatusAccepted {
			t.Fatalf("reconnect: %d %s", resp.StatusCode, body)
		}
		req.waitGone(t)
		req = up.next(t)
		if got := req.r.Header.Get("Last-Event-ID"); got != "1" {
			t.Errorf("the new upstream request has Last-Event-ID %q, want 1", got)
		}
		req.send(t, "id: 1\ndata: one\n\nid: 2\ndata: two\n\n")
		req.send(t, "id: 3\ndata: three\n\n")
		for _, c := range clients {
			body := c.waitFor(t, "data: three\n\n")
			if got := strings.Join(eventData(body), ","); got != "one,two,three" {
				t.Errorf("a client got %s across the reconnect", got)
			}
			if _, err := c.snapshot(); err != nil {
				t.Errorf("a client's response ended: %v", err)
			}
		}
		time.Sleep(100 * time.Millisecond)
		up.none(t)
		hb = admin.waitHub("connected again", func(hb hubStatus) bool {
			return hb.Upstream.State == "connected" && hb.Upstream.Reconnects == 1
		})
		if hb.Clients != n || *hb.Upstream.LastEventID != "3" || hb.Kept.Events != 3 {
			t.Errorf("after the reconnect: %+v", hb)
		}

		// Wrong methods, unknown hubs, through Caddy's admin endpoint.
		for _, c := range []struct {
			method, path string
			status       int
			allow        string
		}{
			{http.MethodGet, "/sse/hubs/" + hb.Hub + "/reconnect", http.StatusMethodNotAllowed, "POST"},
			{http.MethodPost, "/sse/streams", http.StatusMethodNotAllowed, "GET"},
			{http.MethodPut, "/sse/hubs", http.StatusMethodNotAllowed, "GET"},
			{http.MethodPost, "/sse/hubs/0123456789abcdef/reconnect", http.StatusNotFound, ""},
			{http.MethodPost, "/sse/hubs/" + hb.Hub, http.StatusNotFound, ""},
		} {
			resp, body := admin.do(c.method, c.path)
			if resp.StatusCode != c.status || resp.Header.Get("Allow") != c.allow || !strings.Contains(body, `"error"`) {
				t.Errorf("%s %s: %d, Allow %q, %s; want %d, Allow %q", c.method, c.path, resp.StatusCode, resp.Header.Get("Allow"), body, c.status, c.allow)
			}
		}
		up.none(t)

		for _, c := range clients {
			c.cancel()
		}
		req.waitGone(t)
		admin.waitHandlers("the hub's clients ended", func(_, _, shared handlerStatus) bool {
			return shared.Streams == streamCounts{} && shared.Ended["client_gone"] == n
		})
		if hubs := admin.hubs(); len(hubs) != 0 {
			t.Errorf("hubs left: %+v", hubs)
		}
	})

	for _, answer := range admin.answers {
		for _, secret := range secrets {
			if strings.Contains(answer, secret) {
				t.Errorf("an admin answer holds %q: %s", secret, answer)
			}
		}
	}
	t.Logf("%d admin answers, none with a credential, cookie, path or query", len(admin.answers))
	checkNoStreamGoroutines(t)
}
