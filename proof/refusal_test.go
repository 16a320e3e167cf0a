package proof

import (
	"context"
	"fmt"
	"io"
	"math"
	"net/http"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"
)

// Options of the header-wait test's routes.
const (
	waitIdleTimeout = 500 * time.Millisecond
	// waitMargin is how late after idle_timeout a refusal may reach the
	// client: the timer's lateness, the upstream request's cancellation
	// and the answer's way back, on a busy machine.
	waitMargin = 250 * time.Millisecond
	waitRetry  = time.Second
)

// TestHeaderWaitIdleTimeout sends requests through the gateway to an
// upstream that accepts them and never sends a header. With idle_timeout
// 500ms, past it the gateway must cancel the upstream request and answer:
// a request that asked for a stream gets the refusal a browser survives,
// with reason upstream_timeout (with refuse_with status: 504), any other
// request 504, each between 500 ms and 500 ms + waitMargin after it was
// sent. A header that comes in time is not affected.
func TestHeaderWaitIdleTimeout(t *testing.T) {
	rec := report.start(t, "header-wait")
	up := newUpstream(t)
	up.handle("hang", hangBehavior)
	g := startGateway(t, up, gatewayConfig{profiles: map[string]profile{
		"idle":       {sse: fmt.Sprintf("idle_timeout %s\nretry %s\nclose_event bye", waitIdleTimeout, waitRetry)},
		"idlestatus": {sse: fmt.Sprintf("idle_timeout %s\nrefuse_with status", waitIdleTimeout)},
	}})
	client := newHTTPClient(t, &http.Transport{})
	accept := http.Header{"Accept": {"text/event-stream"}}
	refusal := regexp.MustCompile(`^retry: (\d+)\nevent: bye\ndata: upstream_timeout\n\n$`)

	const rounds = 5
	var answered, released []time.Duration
	refusals := 0
	for i := range rounds {
		for _, c := range []struct {
			name, route string
			header      http.Header
			status      int
		}{
			{"stream request", "idle", accept, http.StatusOK},
			{"other request", "idle", nil, http.StatusGatewayTimeout},
			{"stream request with refuse_with status", "idlestatus", accept, http.StatusGatewayTimeout},
		} {
			what := fmt.Sprintf("%s #%d", c.name, i+1)
			key := up.key("hang")
			sent := time.Now()
			r := fetchAll(client, g.httpURL+"/p/"+c.route+"/hang?k="+key, c.header, 5*time.Second).wait(t, 10*time.Second)
			if r.err != nil {
				t.Fatalf("%s: %v", what, r.err)
			}
			took := r.at.Sub(sent)
			if took < waitIdleTimeout || took > waitIdleTimeout+waitMargin {
				t.Errorf("%s: answered %s after it was sent, want between %s and %s", what, took, waitIdleTimeout, waitIdleTimeout+waitMargin)
			}
			answered = append(answered, took)
			req := up.request(t, key, 1, time.Second)
			ended := req.waitEnded(t, slack).Sub(sent)
			if ended < waitIdleTimeout || ended > waitIdleTimeout+waitMargin {
				t.Errorf("%s: the upstream saw its request end %s after it was sent, want between %s and %s", what, ended, waitIdleTimeout, waitIdleTimeout+waitMargin)
			}
			released = append(released, ended)
			if c.status == http.StatusOK {
				checkStreamRefusal(t, what, r, refusal, waitRetry)
			} else if r.status != c.status || r.header.Get("Retry-After") == "" {
				t.Errorf("%s: %d with Retry-After %q, want %d with Retry-After", what, r.status, r.header.Get("Retry-After"), c.status)
			}
			refusals++
		}
	}
	logged := 0
	for _, line := range g.sseLog(t) {
		if strings.Contains(string(line), `"stream refused"`) && strings.Contains(string(line), `"reason":"upstream_timeout"`) {
			logged++
		}
	}
	if logged != refusals {
		t.Errorf("the handler logged %d refusals with reason upstream_timeout, want %d", logged, refusals)
	}

	// A header that comes in time (300 ms) starts a stream as usual.
	key := up.key("ticker")
	s := openStream(t, client, g.httpURL+"/p/idle/ticker?pre=300ms&every=100ms&k="+key, accept)
	s.waitContains(t, "data: tick 5\n\n", 0, 5*time.Second)
	s.hangUp()
	up.request(t, key, 1, time.Second).waitEnded(t, slack)

	figure(t, rec, "idle_timeout %s, %d requests: answered %s–%s after being sent (p50 %s); upstream request ended %s–%s after",
		waitIdleTimeout, len(answered), ms(slicesMin(answered)), ms(slicesMax(answered)), ms(percentile(answered, 50)),
		ms(slicesMin(released)), ms(slicesMax(released)))
	up.waitQuiet(t, 5*time.Second)
}

// TestLimitCountsAcceptlessStreams fills max_streams 2 with two streams,
// then sends requests whose response is an event stream although they did
// not ask for one (no Accept header, Accept: */*): each must be refused at
// its header with 503 (429 for max_streams_per_client) and its upstream
// request released; a request that asks for a stream gets the refusal a
// browser survives, before the upstream is contacted. A response that is
// no stream still passes; once a slot frees, a stream without Accept gets
// it and then counts like any other.
func TestLimitCountsAcceptlessStreams(t *testing.T) {
	rec := report.start(t, "limit-acceptless")
	up := newUpstream(t)
	up.handle("status", statusBehavior)
	g := startGateway(t, up, gatewayConfig{profiles: map[string]profile{
		"limit":     {sse: "max_streams 2\nretry 1s\nclose_event bye"},
		"perclient": {sse: "max_streams_per_client 1\nretry 1s\nclose_event bye"},
	}})
	client := newHTTPClient(t, &http.Transport{})
	accept := http.Header{"Accept": {"text/event-stream"}}

	open := func(route string, header http.Header) (*clientStream, *upstreamRequest) {
		t.Helper()
		key := up.key("push")
		s := openStream(t, client, g.httpURL+"/p/"+route+"/push?k="+key, header)
		if ct := s.resp.Header.Get("Content-Type"); s.resp.StatusCode != http.StatusOK || ct != "text/event-stream" {
			t.Fatalf("stream %s: %d %q, want 200 text/event-stream", key, s.resp.StatusCode, ct)
		}
		req := up.request(t, key, 1, 5*time.Second)
		req.send(t, "data: "+key+"\n\n")
		s.waitContains(t, "data: "+key+"\n\n", 0, slack)
		return s, req
	}
	var teardowns []time.Duration
	// refusedAtHeader sends a request the upstream answers with a stream
	// and checks it is refused with status, its upstream released.
	refusedAtHeader := func(route string, header http.Header, status int) {
		t.Helper()
		what := fmt.Sprintf("%s with Accept %q", route, header.Get("Accept"))
		key := up.key("push")
		r := fetchAll(client, g.httpURL+"/p/"+route+"/push?k="+key, header, 5*time.Second).wait(t, 10*time.Second)
		if r.err != nil {
			t.Fatalf("%s: %v", what, r.err)
		}
		if r.status != status || r.header.Get("Retry-After") == "" || r.header.Get("Content-Type") == "text/event-stream" {
			t.Errorf("%s: %d, Content-Type %q, Retry-After %q; want %d with Retry-After and no event stream",
				what, r.status, r.header.Get("Content-Type"), r.header.Get("Retry-After"), status)
		}
		// The upstream got the request and answered with a stream, which
		// the gateway must not leave running.
		req := up.request(t, key, 1, time.Second)
		d := req.waitEnded(t, teardownBound+slack).Sub(r.at)
		if d > teardownBound {
			t.Errorf("%s: the upstream saw its request end %s after the refusal, want at most %s", what, d, teardownBound)
		}
		teardowns = append(teardowns, d)
		rec.teardown(max(d, 0))
	}

	first, firstReq := open("limit", accept)
	open("limit", accept)
	refusedAtHeader("limit", nil, http.StatusServiceUnavailable)
	refusedAtHeader("limit", http.Header{"Accept": {"*/*"}}, http.StatusServiceUnavailable)

	// A stream request is refused before the upstream, the browser-safe way.
	key := up.key("push")
	r := fetchAll(client, g.httpURL+"/p/limit/push?k="+key, accept, 5*time.Second).wait(t, 10*time.Second)
	if r.err != nil {
		t.Fatal(r.err)
	}
	checkStreamRefusal(t, "stream request over max_streams", r,
		regexp.MustCompile(`^retry: (\d+)\nevent: bye\ndata: max_streams\n\n$`), time.Second)
	if n := up.requestsWithKey(key); n != 0 {
		t.Errorf("the refused stream request reached the upstream (%d requests)", n)
	}

	// A response that is no stream passes while the streams are full.
	r = fetchAll(client, g.httpURL+"/p/limit/status?status=200&k="+up.key("status"), nil, 5*time.Second).wait(t, 10*time.Second)
	if r.err != nil || r.status != http.StatusOK || string(r.body) != statusBody(http.StatusOK) {
		t.Errorf("a JSON response through the full handler: %d %q (%v), want it passed through", r.status, r.body, r.err)
	}

	// A slot frees: a stream without Accept takes it, and counts. The slot
	// is given back when the handler returns, just after the upstream
	// request ended: requests in between are still refused (and counted
	// below), for at most a second.
	first.hangUp()
	freed := firstReq.waitEnded(t, teardownBound+slack)
	var taken time.Duration
	early := 0
	for deadline := time.Now().Add(time.Second); ; early++ {
		key := up.key("push")
		s := openStream(t, client, g.httpURL+"/p/limit/push?k="+key, nil)
		if s.resp.StatusCode == http.StatusOK {
			taken = time.Since(freed)
			up.request(t, key, 1, time.Second).send(t, "data: "+key+"\n\n")
			s.waitContains(t, "data: "+key+"\n\n", 0, slack)
			break
		}
		if s.resp.StatusCode != http.StatusServiceUnavailable || time.Now().After(deadline) {
			t.Fatalf("a stream without Accept after a slot was freed: %d (%d refused since)", s.resp.StatusCode, early+1)
		}
	}
	refusedAtHeader("limit", nil, http.StatusServiceUnavailable)

	// max_streams_per_client counts them the same way.
	open("perclient", accept)
	refusedAtHeader("perclient", nil, http.StatusTooManyRequests)

	reasons := map[string]int{}
	for _, line := range g.sseLog(t) {
		l := string(line)
		if !strings.Contains(l, `"stream refused"`) {
			continue
		}
		for _, reason := range []string{"max_streams", "max_streams_per_client"} {
			if strings.Contains(l, `"reason":"`+reason+`"`) {
				reasons[reason]++
			}
		}
	}
	if want := map[string]int{"max_streams": 4 + early, "max_streams_per_client": 1}; !mapsEqual(reasons, want) {
		t.Errorf("the handler logged refusals %v, want %v", reasons, want)
	}
	figure(t, rec, "4 streams without `Accept: text/event-stream` refused at their header (503 ×3, 429 ×1), each upstream request ended between %s and %s after the client had the refusal (negative: before)",
		ms(slicesMin(teardowns)), ms(slicesMax(teardowns)))
	figure(t, rec, "a freed slot was taken by a stream without Accept %s after the freed stream's upstream request ended (%d requests refused in between)", ms(taken), early)
}

func mapsEqual(a, b map[string]int) bool {
	if len(a) != len(b) {
		return false
	}
	for k, v := range a {
		if b[k] != v {
			return false
		}
	}
	return true
}

// figure records a figure of the case and logs it, so that a verbose run
// shows what the report will say.
func figure(t *testing.T, rec *caseRecorder, format string, args ...any) {
	t.Helper()
	t.Logf(format, args...)
	rec.figure(format, args...)
}

func slicesMin(ds []time.Duration) time.Duration {
	m := ds[0]
	for _, d := range ds {
		m = min(m, d)
	}
	return m
}

func slicesMax(ds []time.Duration) time.Duration {
	m := ds[0]
	for _, d := range ds {
		m = max(m, d)
	}
	return m
}

// checkStreamRefusal checks a refusal a browser survives: 200
// text/event-stream whose body matches re, its retry hint between 1× and
// 2× base, and Retry-After saying the same in whole seconds.
func checkStreamRefusal(t *testing.T, what string, r *fullResponse, re *regexp.Regexp, base time.Duration) time.Duration {
	t.Helper()
	if r.status != http.StatusOK || r.header.Get("Content-Type") != "text/event-stream" {
		t.Errorf("%s: %d %q, want 200 text/event-stream", what, r.status, r.header.Get("Content-Type"))
		return 0
	}
	match := re.FindSubmatch(r.body)
	if match == nil {
		t.Errorf("%s: body %q, want it to match %s", what, r.body, re)
		return 0
	}
	retryMS, _ := strconv.Atoi(string(match[1]))
	retry := time.Duration(retryMS) * time.Millisecond
	if retry < base || retry > 2*base {
		t.Errorf("%s: retry %s, want between %s and %s", what, retry, base, 2*base)
	}
	if got, want := r.header.Get("Retry-After"), strconv.Itoa(int(math.Ceil(retry.Seconds()))); got != want {
		t.Errorf("%s: Retry-After %q, want %q (the retry hint rounded up)", what, got, want)
	}
	return retry
}

// fullResponse is a request whose whole response is read in the
// background, for requests whose header may come late or never.
type fullResponse struct {
	done   chan struct{}
	status int
	header http.Header
	body   []byte
	err    error
	at     time.Time // when the body ended, or the request failed
}

// fetchAll sends a GET and reads the whole response, giving up after within.
func fetchAll(client *http.Client, url string, header http.Header, within time.Duration) *fullResponse {
	r := &fullResponse{done: make(chan struct{})}
	go func() {
		defer close(r.done)
		ctx, cancel := context.WithTimeout(context.Background(), within)
		defer cancel()
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
		if err != nil {
			r.err = err
			return
		}
		for k, v := range header {
			req.Header[k] = v
		}
		resp, err := client.Do(req)
		if err != nil {
			r.err, r.at = err, time.Now()
			return
		}
		defer resp.Body.Close()
		r.status, r.header = resp.StatusCode, resp.Header
		r.body, r.err = io.ReadAll(resp.Body)
		r.at = time.Now()
	}()
	return r
}

// wait waits for the response to be read.
func (r *fullResponse) wait(t *testing.T, within time.Duration) *fullResponse {
	t.Helper()
	select {
	case <-r.done:
		return r
	case <-time.After(within):
		t.Fatalf("no whole response within %s", within)
		return nil
	}
}

// hangBehavior never answers: no header, no body, until the request ends.
func hangBehavior(w http.ResponseWriter, r *http.Request, req *upstreamRequest) {
	<-r.Context().Done()
}
