//go:build linux

package proof

import (
	"bytes"
	"context"
	crand "crypto/rand"
	"encoding/hex"
	"fmt"
	"net/http"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/ssegateway/caddy-sse/internal/ssespec"
)

// Shared streams attacked the way a user who wants another user's stream,
// or wants to tie up the upstream, would: two users, one key. Each subtest
// is one row of the report, saying what crossed between users (it must be
// nothing) and how many upstream requests were held at most.
//
// The test runs a Caddy process (as TestMetricsCountEveryEvent does) for
// the admin API's /metrics, which the per-user-response case reads.

// Options of the adversarial routes.
const (
	attackLinger     = 2 * time.Second
	attackMaxStreams = 5
	attackFlood      = 20
	attackCrowd      = 50
	// attackMaxAttempts is how many upstream requests 50 clients of one
	// failing key may cause: the hub's attempts, not one per client.
	attackMaxAttempts = 5
	// renumberEvents is how many events the renumbering upstream sends
	// after it was asked again, 100 ms apart.
	renumberEvents = 10
	// renumberBound is how soon after the upstream was asked again the
	// clients must have its first new event.
	renumberBound = 2 * time.Second
)

// TestShareAdversarial is the adversarial case for shared streams.
func TestShareAdversarial(t *testing.T) {
	up := newUpstream(t)
	p := startCaddyProcess(t, buildCaddy(t), up, map[string]profile{
		// linger off where the case waits for the upstream requests to end
		// after their clients left.
		"key":     {sse: "share {\nlinger off\n}"},
		"tenant":  {sse: "share {http.request.header.X-Tenant} {\nlinger off\n}"},
		"flood":   {sse: fmt.Sprintf("max_streams %d\nretry 1s\nshare {\nlinger %s\n}", attackMaxStreams, attackLinger)},
		"restart": {sse: "share {\nlinger off\n}"},
		"failing": {sse: "retry 1s\nshare"},
	})
	client := newHTTPClient(t, &http.Transport{})

	t.Run("custom header", func(t *testing.T) {
		rec := report.start(t, "share-header")
		held := &heldCount{}
		up.handle("apikey", held.wrap(whoamiBehavior))
		k := up.key("apikey")
		url := p.httpURL + "/p/key/apikey?k=" + k
		as := func(apiKey string) http.Header {
			return http.Header{"Accept": {"text/event-stream"}, "X-Api-Key": {apiKey}}
		}
		alice := openStream(t, client, url, as("alice"))
		waitParsed(t, alice, 3, 5*time.Second)
		bob := openStream(t, client, url, as("bob"))
		waitParsed(t, bob, 3, 5*time.Second)
		alice2 := openStream(t, client, url, as("alice"))
		waitParsed(t, alice2, 3, 5*time.Second)

		crossed := 0
		crossed += checkOwnEvents(t, "alice", alice, whoIs(as("alice")))
		crossed += checkOwnEvents(t, "bob", bob, whoIs(as("bob")))
		crossed += checkOwnEvents(t, "alice's second client", alice2, whoIs(as("alice")))
		seen := upstreamUsers(up, k)
		if want := []string{whoIs(as("alice")), whoIs(as("bob"))}; !slices.Equal(seen, want) {
			t.Errorf("the upstream got requests from %q, want exactly one from alice and one from bob (%q): "+
				"users who differ only by X-Api-Key must not share, two clients of one user must", seen, want)
		}
		for _, s := range []*clientStream{alice, bob, alice2} {
			s.hangUp()
		}
		up.waitFor(t, "end of every request of "+k, 5*time.Second, func() bool { return allEndedLocked(up, k) })
		recordCrossing(t, rec, crossed, 0, held, len(seen))
	})

	t.Run("per-user response", func(t *testing.T) {
		rec := report.start(t, "share-per-user")
		held := &heldCount{}
		up.handle("session", held.wrap(sessionBehavior))
		const quirk = `caddy_sse_upstream_quirks_total{quirk="per_user_response"}`
		crossedEvents, crossedCookies, requests := 0, 0, 0
		for _, mode := range []string{"cookie", "private"} {
			before := p.metrics(t)[quirk]
			k := up.key("session")
			url := p.httpURL + "/p/key/session?mode=" + mode + "&k=" + k
			accept := http.Header{"Accept": {"text/event-stream"}}
			a := openStream(t, client, url, accept)
			waitParsed(t, a, 2, 5*time.Second)
			b := openStream(t, client, url, accept)
			waitParsed(t, b, 2, 5*time.Second)

			tokenA, tokenB := sessionOf(a), sessionOf(b)
			if tokenA == "" || tokenB == "" {
				t.Fatalf("%s: sessions named by the events: A %q, B %q", mode, tokenA, tokenB)
			}
			if mode == "cookie" && !slices.Contains(a.resp.Header.Values("Set-Cookie"), sessionCookie(tokenA)) {
				t.Errorf("%s: A's Set-Cookie %q, want its own %q", mode, a.resp.Header.Values("Set-Cookie"), sessionCookie(tokenA))
			}
			for _, c := range b.resp.Header.Values("Set-Cookie") {
				if strings.Contains(c, tokenA) {
					crossedCookies++
					t.Errorf("%s: B got A's Set-Cookie %q (session fixation)", mode, c)
				}
			}
			if tokenB == tokenA {
				t.Errorf("%s: B's events name A's session %q: B got A's per-user stream", mode, tokenA)
			}
			for _, e := range parseEvents(b) {
				if strings.Contains(e.Data, tokenA) {
					crossedEvents++
				}
			}
			if n := up.requestsWithKey(k); n != 2 {
				t.Errorf("%s: the upstream got %d requests, want 2: a per-user response goes to its starter alone", mode, n)
			}
			requests += up.requestsWithKey(k)
			a.hangUp()
			b.hangUp()
			up.waitFor(t, "end of every request of "+k, 5*time.Second, func() bool { return allEndedLocked(up, k) })
			if grew := p.metrics(t)[quirk] - before; grew < 1 {
				t.Errorf("%s: %s grew by %v, want at least 1", mode, quirk, grew)
			}
		}
		if crossedEvents > 0 {
			t.Errorf("B got %d events of A's session", crossedEvents)
		}
		recordCrossing(t, rec, crossedEvents, crossedCookies, held, requests)
	})

	t.Run("missing key header", func(t *testing.T) {
		rec := report.start(t, "share-missing-key")
		held := &heldCount{}
		up.handle("tenant", held.wrap(whoamiBehavior))
		withAuth := func(auth string) http.Header {
			return http.Header{"Accept": {"text/event-stream"}, "Authorization": {auth}}
		}
		k := up.key("tenant")
		url := p.httpURL + "/p/tenant/tenant?k=" + k
		alice := openStream(t, client, url, withAuth("Bearer alice"))
		waitParsed(t, alice, 3, 5*time.Second)
		bob := openStream(t, client, url, withAuth("Bearer bob"))
		waitParsed(t, bob, 3, 5*time.Second)
		crossed := checkOwnEvents(t, "alice (no X-Tenant)", alice, whoIs(withAuth("Bearer alice")))
		crossed += checkOwnEvents(t, "bob (no X-Tenant)", bob, whoIs(withAuth("Bearer bob")))
		seen := upstreamUsers(up, k)
		if want := []string{whoIs(withAuth("Bearer alice")), whoIs(withAuth("Bearer bob"))}; !slices.Equal(seen, want) {
			t.Errorf("without X-Tenant the upstream got requests from %q, want one from each user (%q): "+
				"a key whose placeholder is empty must not share", seen, want)
		}
		alice.hangUp()
		bob.hangUp()

		// The same tenant shares.
		tenant := http.Header{"Accept": {"text/event-stream"}, "X-Tenant": {"acme"}}
		kt := up.key("tenant")
		urlT := p.httpURL + "/p/tenant/tenant?k=" + kt
		t1 := openStream(t, client, urlT, tenant)
		waitParsed(t, t1, 3, 5*time.Second)
		t2 := openStream(t, client, urlT, tenant)
		waitParsed(t, t2, 3, 5*time.Second)
		checkOwnEvents(t, "acme's first client", t1, whoIs(tenant))
		checkOwnEvents(t, "acme's second client", t2, whoIs(tenant))
		if n := up.requestsWithKey(kt); n != 1 {
			t.Errorf("two clients with the same X-Tenant caused %d upstream requests, want 1 (shared)", n)
		}
		t1.hangUp()
		t2.hangUp()
		up.waitFor(t, "end of every request", 5*time.Second, func() bool {
			return allEndedLocked(up, k) && allEndedLocked(up, kt)
		})
		recordCrossing(t, rec, crossed, 0, held, len(seen)+up.requestsWithKey(kt))
	})

	t.Run("flood of keys", func(t *testing.T) {
		rec := report.start(t, "share-flood")
		held := &heldCount{}
		up.handle("one", held.wrap(oneEventBehavior))
		accept := http.Header{"Accept": {"text/event-stream"}}
		streams, refused, crossed := 0, 0, 0
		var retries []int64
		for i := range attackFlood {
			k := up.key("flood")
			s := openStream(t, client, p.httpURL+"/p/flood/one?k="+k, accept)
			own := "data: " + k + "\n\n"
			s.waitFor(t, fmt.Sprintf("client %d's event or its refusal", i+1), 5*time.Second, func(body []byte, done bool) bool {
				return done || bytes.Contains(body, []byte(own))
			})
			body, _ := s.snapshot()
			parsed := ssespec.Parse(body)
			for _, e := range parsed.Events {
				if e.Data != k {
					crossed++
					t.Errorf("client %d (%s) got an event of another key: %q", i+1, k, e.Data)
				}
			}
			switch {
			case bytes.Contains(body, []byte(own)):
				streams++
			case s.resp.StatusCode == http.StatusOK && s.resp.Header.Get("Content-Type") == "text/event-stream" && len(parsed.Retries) > 0:
				refused++
				retries = append(retries, parsed.Retries...)
			default:
				t.Errorf("client %d (%s): %d %q %q: neither its stream nor the browser-safe refusal (200 text/event-stream with retry)",
					i+1, k, s.resp.StatusCode, s.resp.Header.Get("Content-Type"), body)
			}
			s.hangUp()
		}
		lastLeft := time.Now()
		if m := held.maxHeld(); m > attackMaxStreams {
			t.Errorf("the upstream held %d requests at once, want at most %d (max_streams): "+
				"a lingering shared upstream must count against the limit", m, attackMaxStreams)
		}
		waitUntil(t, "0 requests held at the upstream after linger", attackLinger+3*time.Second, func() bool {
			return held.current() == 0
		})
		hints := "none refused"
		if len(retries) > 0 {
			hints = fmt.Sprintf("retry %d–%d ms", slices.Min(retries), slices.Max(retries))
		}
		figure(t, rec, "crossed between keys: %d events; the upstream held at most %d requests at once (%d in all); %d clients got their stream, %d the refusal (%s); the upstream held none %s after the last client left (linger %s)",
			crossed, held.maxHeld(), held.totalSeen(), streams, refused, hints, ms(time.Since(lastLeft)), attackLinger)
	})

	t.Run("ids restart", func(t *testing.T) {
		rec := report.start(t, "share-renumber")
		held := &heldCount{}
		ru := &renumberUpstream{attempts: make(map[string]int)}
		up.handle("renumber", held.wrap(ru.behave))
		accept := http.Header{"Accept": {"text/event-stream"}}
		k := up.key("renumber")
		url := p.httpURL + "/p/restart/renumber?k=" + k
		c1 := openStream(t, client, url, accept)
		first := up.request(t, k, 1, 5*time.Second)
		first.send(t, "id: 1\ndata: gen1 1\n\n")
		c1.waitContains(t, "data: gen1 1\n\n", 0, 5*time.Second)
		// The second client has the header: it has joined.
		c2 := openStream(t, client, url, accept)
		first.send(t, "id: 2\ndata: gen1 2\n\nid: 3\ndata: gen1 3\n\n")
		clients := []*clientStream{c1, c2}
		for _, c := range clients {
			c.waitContains(t, "data: gen1 3\n\n", 0, 5*time.Second)
		}
		close(first.push) // the upstream breaks the connection
		again := up.request(t, k, 2, 5*time.Second)
		lastID := again.Header.Get("Last-Event-ID")

		last := fmt.Sprintf("data: gen2 %d\n\n", renumberEvents)
		var figures []string
		for i, c := range clients {
			name := fmt.Sprintf("client %d", i+1)
			pollStream(c, again.Started.Add(renumberEvents*100*time.Millisecond+renumberBound), func(body []byte, done bool) bool {
				return done || bytes.Contains(body, []byte(last))
			})
			body, done := c.snapshot()
			var gen1, gen2 []string
			for _, e := range ssespec.Parse(body).Events {
				switch {
				case strings.HasPrefix(e.Data, "gen1 "):
					gen1 = append(gen1, e.Data)
				case strings.HasPrefix(e.Data, "gen2 "):
					gen2 = append(gen2, e.Data)
				}
			}
			var want []string
			for n := 1; n <= renumberEvents; n++ {
				want = append(want, fmt.Sprintf("gen2 %d", n))
			}
			if !slices.Equal(gen2, want) {
				t.Errorf("%s: after the reconnect got %q (stream ended: %v), want every new event %q: "+
					"an upstream that restarts its ids sends new events under old ids", name, gen2, done, want)
			}
			wantGen1 := []string{"gen1 1", "gen1 2", "gen1 3"}
			if i == 1 {
				wantGen1 = wantGen1[1:] // it joined after the first
			}
			if !slices.Equal(gen1, wantGen1) {
				t.Errorf("%s: events from before the break %q, want %q, each once", name, gen1, wantGen1)
			}
			firstAfter := "never"
			if at := firstArrival(c, "data: gen2 "); !at.IsZero() {
				d := at.Sub(again.Started)
				firstAfter = ms(d)
				if d > renumberBound {
					t.Errorf("%s: the first new event came %s after the upstream was asked again, want within %s", name, ms(d), renumberBound)
				}
			} else {
				t.Errorf("%s: no new event within %s of the reconnect: the stream stalled", name, renumberEvents*100*time.Millisecond+renumberBound)
			}
			figures = append(figures, fmt.Sprintf("%s %d of %d (first %s after the reconnect)", name, len(gen2), renumberEvents, firstAfter))
		}
		for _, c := range clients {
			c.hangUp()
		}
		up.waitFor(t, "end of every request of "+k, 5*time.Second, func() bool { return allEndedLocked(up, k) })
		figure(t, rec, "reconnect asked with Last-Event-ID %q; new events received after it: %s; upstream requests held at most %d at once (%d in all)",
			lastID, strings.Join(figures, ", "), held.maxHeld(), held.totalSeen())
	})

	t.Run("failing upstream", func(t *testing.T) {
		rec := report.start(t, "share-failing")
		held := &heldCount{}
		up.handle("failing", held.wrap(statusBehavior))
		k := up.key("failing")
		url := p.httpURL + "/p/failing/failing?status=503&k=" + k
		accept := http.Header{"Accept": {"text/event-stream"}}
		responses := make([]*fullResponse, attackCrowd)
		for i := range responses {
			responses[i] = fetchAll(client, url, accept, 15*time.Second)
		}
		var retries []int64
		refusals := 0
		for i, r := range responses {
			r.wait(t, 20*time.Second)
			parsed := ssespec.Parse(r.body)
			if r.err != nil || r.status != http.StatusOK || r.header.Get("Content-Type") != "text/event-stream" || len(parsed.Retries) == 0 {
				t.Errorf("client %d: %d %q %q (%v), want the browser-safe refusal: 200 text/event-stream with retry",
					i+1, r.status, r.header.Get("Content-Type"), r.body, r.err)
				continue
			}
			refusals++
			retries = append(retries, parsed.Retries[0])
		}
		n := up.requestsWithKey(k)
		if n > attackMaxAttempts {
			t.Errorf("%d clients of one failing shared stream caused %d upstream requests, want at most %d (the hub's attempts, not one per client)",
				attackCrowd, n, attackMaxAttempts)
		}
		distinct := len(slices.Compact(slices.Sorted(slices.Values(retries))))
		if len(retries) > 1 && distinct == 1 {
			t.Errorf("every refusal says retry %d ms: refused clients would all come back together", retries[0])
		}
		spread := "none"
		if len(retries) > 0 {
			spread = fmt.Sprintf("%d–%d ms, %d distinct", slices.Min(retries), slices.Max(retries), distinct)
		}
		up.waitFor(t, "end of every request of "+k, 5*time.Second, func() bool { return allEndedLocked(up, k) })
		figure(t, rec, "%d of %d clients refused the browser-safe way; the upstream got %d requests (at most %d at once); retry hints %s",
			refusals, attackCrowd, n, held.maxHeld(), spread)
	})
}

// whoIs is how the upstream names the user of a request: every header
// these cases tell users apart by.
func whoIs(h http.Header) string {
	return fmt.Sprintf("key=%q auth=%q tenant=%q", h.Get("X-Api-Key"), h.Get("Authorization"), h.Get("X-Tenant"))
}

// whoamiBehavior sends, every 50 ms, an event naming the user it saw.
func whoamiBehavior(w http.ResponseWriter, r *http.Request, req *upstreamRequest) {
	who := whoIs(r.Header)
	if startEventStream(w, req) != nil {
		return
	}
	ticker := time.NewTicker(50 * time.Millisecond)
	defer ticker.Stop()
	for n := 1; ; n++ {
		if req.writeFlush(w, fmt.Appendf(nil, "id: %d\ndata: %s #%d\n\n", n, who, n)) != nil {
			return
		}
		select {
		case <-ticker.C:
		case <-r.Context().Done():
			return
		}
	}
}

func sessionCookie(token string) string { return "session=" + token + "; Path=/; HttpOnly" }

// sessionBehavior gives each request a session of its own, named by every
// event it sends (every 50 ms): with mode=cookie it sets the session's
// cookie on a request that has none, with mode=private it says
// Cache-Control: private.
func sessionBehavior(w http.ResponseWriter, r *http.Request, req *upstreamRequest) {
	var b [12]byte
	_, _ = crand.Read(b[:])
	token := hex.EncodeToString(b[:])
	switch req.Query["mode"] {
	case "cookie":
		if r.Header.Get("Cookie") == "" {
			w.Header().Add("Set-Cookie", sessionCookie(token))
		}
	case "private":
		w.Header().Set("Cache-Control", "private")
	}
	if startEventStream(w, req) != nil {
		return
	}
	ticker := time.NewTicker(50 * time.Millisecond)
	defer ticker.Stop()
	for n := 1; ; n++ {
		if req.writeFlush(w, fmt.Appendf(nil, "data: session %s #%d\n\n", token, n)) != nil {
			return
		}
		select {
		case <-ticker.C:
		case <-r.Context().Done():
			return
		}
	}
}

// sessionOf returns the session the stream's first event names.
func sessionOf(s *clientStream) string {
	for _, e := range parseEvents(s) {
		if f := strings.Fields(e.Data); len(f) == 3 && f[0] == "session" {
			return f[1]
		}
	}
	return ""
}

// oneEventBehavior sends one event naming its key, then holds the request
// open until it ends.
func oneEventBehavior(w http.ResponseWriter, r *http.Request, req *upstreamRequest) {
	if startEventStream(w, req) != nil || req.writeFlush(w, []byte("data: "+req.Key+"\n\n")) != nil {
		return
	}
	<-r.Context().Done()
}

// renumberUpstream forgets its ids when it restarts: its first request of
// a key sends what the test pushes and, when the test closes push, breaks
// the connection mid-stream; asked again, it ignores Last-Event-ID and
// sends ids 1, 2, 3, … with new data ("gen<attempt> <n>"), 100 ms apart.
type renumberUpstream struct {
	mu       sync.Mutex
	attempts map[string]int
}

func (u *renumberUpstream) behave(w http.ResponseWriter, r *http.Request, req *upstreamRequest) {
	u.mu.Lock()
	u.attempts[req.Key]++
	attempt := u.attempts[req.Key]
	u.mu.Unlock()
	if startEventStream(w, req) != nil {
		return
	}
	if attempt == 1 {
		for {
			select {
			case p, ok := <-req.push:
				if !ok {
					// Break the connection: no end of the chunked body.
					conn, _, err := http.NewResponseController(w).Hijack()
					if err != nil {
						panic(http.ErrAbortHandler)
					}
					conn.Close()
					return
				}
				if req.writeFlush(w, p) != nil {
					return
				}
				req.pushed <- time.Now()
			case <-r.Context().Done():
				return
			}
		}
	}
	ticker := time.NewTicker(100 * time.Millisecond)
	defer ticker.Stop()
	for n := 1; n <= renumberEvents; n++ {
		if req.writeFlush(w, fmt.Appendf(nil, "id: %d\ndata: gen%d %d\n\n", n, attempt, n)) != nil {
			return
		}
		select {
		case <-ticker.C:
		case <-r.Context().Done():
			return
		}
	}
	<-r.Context().Done()
}

// heldCount counts the requests a behavior holds open at the upstream,
// from their arrival to the moment the upstream sees their end.
type heldCount struct {
	mu                sync.Mutex
	open, most, total int
}

func (h *heldCount) wrap(b behavior) behavior {
	return func(w http.ResponseWriter, r *http.Request, req *upstreamRequest) {
		h.mu.Lock()
		h.open++
		h.total++
		h.most = max(h.most, h.open)
		h.mu.Unlock()
		context.AfterFunc(r.Context(), func() {
			h.mu.Lock()
			h.open--
			h.mu.Unlock()
		})
		b(w, r, req)
	}
}

func (h *heldCount) maxHeld() int {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.most
}

func (h *heldCount) current() int {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.open
}

func (h *heldCount) totalSeen() int {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.total
}

// recordCrossing writes a row's figures: what crossed between users and
// how many upstream requests were held.
func recordCrossing(t *testing.T, rec *caseRecorder, events, cookies int, held *heldCount, requests int) {
	t.Helper()
	crossed := "nothing"
	if events > 0 || cookies > 0 {
		crossed = fmt.Sprintf("%d events and %d Set-Cookie headers of another user", events, cookies)
	}
	figure(t, rec, "crossed between users: %s; %d upstream requests, at most %d held at once", crossed, requests, held.maxHeld())
}

// parseEvents returns the events a client dispatched so far.
func parseEvents(s *clientStream) []ssespec.Event {
	body, _ := s.snapshot()
	return ssespec.Parse(body).Events
}

// waitParsed waits until the client dispatched n events.
func waitParsed(t *testing.T, s *clientStream, n int, within time.Duration) {
	t.Helper()
	s.waitFor(t, fmt.Sprintf("%d events", n), within, func(body []byte, _ bool) bool {
		return len(ssespec.Parse(body).Events) >= n
	})
}

// checkOwnEvents checks that every event the client got names who, and
// returns how many named someone else.
func checkOwnEvents(t *testing.T, name string, s *clientStream, who string) int {
	t.Helper()
	var foreign []string
	events := parseEvents(s)
	for _, e := range events {
		if !strings.HasPrefix(e.Data, who+" #") {
			foreign = append(foreign, e.Data)
		}
	}
	if len(foreign) > 0 {
		t.Errorf("%s (%s) got %d of %d events of another user, first %q", name, who, len(foreign), len(events), foreign[0])
	}
	return len(foreign)
}

// upstreamUsers returns the users of the upstream's requests with key k,
// in order of arrival.
func upstreamUsers(up *upstream, k string) []string {
	up.mu.Lock()
	defer up.mu.Unlock()
	var users []string
	for _, r := range up.requests {
		if r.Key == k {
			users = append(users, whoIs(r.Header))
		}
	}
	return users
}

// allEndedLocked reports whether every request with key k has ended.
func allEndedLocked(up *upstream, k string) bool {
	for _, r := range up.requests {
		if r.Key == k && !r.hasEnded() {
			return false
		}
	}
	return true
}

// pollStream waits until cond holds for the body read so far, or until
// deadline, and reports which.
func pollStream(s *clientStream, deadline time.Time, cond func(body []byte, done bool) bool) bool {
	timer := time.NewTimer(time.Until(deadline))
	defer timer.Stop()
	for {
		s.mu.Lock()
		ok := cond(s.body, s.done)
		changed := s.changed
		s.mu.Unlock()
		if ok {
			return true
		}
		select {
		case <-changed:
		case <-timer.C:
			return false
		}
	}
}

// firstArrival returns when the first occurrence of sub in the body
// arrived, or zero.
func firstArrival(s *clientStream, sub string) time.Time {
	body, _ := s.snapshot()
	i := bytes.Index(body, []byte(sub))
	if i < 0 {
		return time.Time{}
	}
	return s.arrivedAt(i + len(sub))
}
