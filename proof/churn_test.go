package proof

import (
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net/http"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// TestChurn opens 10,000 streams, at most 200 at a time, and drops each at
// a random moment: before the response header, inside an event, between
// events, during a heartbeat. Afterwards nothing of them may be left: no
// goroutine of the handler, no extra file descriptor, no upstream request
// or connection, no heap.
func TestChurn(t *testing.T) {
	const (
		streams     = 10000
		concurrency = 200
		maxDrop     = 60 * time.Millisecond
		runBound    = 100 * time.Second
	)
	const churnKeepAlive = 2 * time.Second
	rec := report.start(t, "churn")
	up := newUpstream(t)
	up.forget = true
	g := startGateway(t, up, gatewayConfig{profiles: map[string]profile{
		// A short keep-alive, so that the pool's idle connections to the
		// upstream (the default keeps up to 32 for 2 minutes) are closed
		// within the test and can be counted out.
		"churn": {sse: "heartbeat 20ms\nwrite_timeout 2s", proxy: fmt.Sprintf("transport http {\nkeepalive %s\n}", churnKeepAlive)},
	}})
	transport := &http.Transport{DisableKeepAlives: true}
	client := newHTTPClient(t, transport)
	// When each stream was dropped by its client and when its upstream saw
	// its end (Unix ns, 0 for never), for the teardown latencies.
	droppedAt := make([]atomic.Int64, streams)
	upstreamEndedAt := make([]atomic.Int64, streams)
	up.handle("churn", func(w http.ResponseWriter, r *http.Request, req *upstreamRequest) {
		var i int
		if _, err := fmt.Sscan(req.Query["i"], &i); err == nil && i >= 0 && i < streams {
			context.AfterFunc(r.Context(), func() { upstreamEndedAt[i].Store(time.Now().UnixNano()) })
		}
		tickerBehavior(w, r, req)
	})

	// One stream first, so that what the process sets up once (pools,
	// log files, the proxy's transport) exists before the baseline.
	warm := openStream(t, client, g.httpURL+"/p/churn/ticker?every=5ms", nil)
	warm.waitContains(t, "data: tick 2\n\n", 0, 5*time.Second)
	warm.hangUp()
	up.waitFor(t, "the warm-up stream's end", 5*time.Second, func() bool { return up.open == 0 })
	waitNoModuleGoroutines(t, 5*time.Second)
	_, warmRequests, _, _ := up.counts()
	endsBefore := len(g.streamEnds(t))
	baseFDs, baseHeap := openFDs(t), liveHeap()

	// Each stream's shape and drop moment come from one seeded generator,
	// drawn up front, so a failing run can be replayed from its seed.
	seed := uint64(time.Now().UnixNano())
	t.Logf("seed %d", seed)
	rng := rand.New(rand.NewPCG(seed, 0x5e5e))
	// A fifth of the streams are dropped at a random moment after the
	// request is sent, mostly before the header; the others at a random
	// moment after the header, inside or between events.
	urls := make([]string, streams)
	drops := make([]time.Duration, streams)
	afterHeader := make([]bool, streams)
	for i := range streams {
		every := []string{"2ms", "30ms"}[rng.IntN(2)] // busy, or quiet enough for heartbeats
		urls[i] = fmt.Sprintf("%s/p/churn/churn?i=%d&every=%s&split=1&pre=%dms", g.httpURL, i, every, rng.IntN(15))
		drops[i] = time.Duration(rng.Int64N(int64(maxDrop)))
		afterHeader[i] = rng.IntN(5) != 0
	}

	runCtx, cancelRun := context.WithTimeout(context.Background(), runBound)
	defer cancelRun()
	var beforeHeader, gotHeader, failed, bytesRead atomic.Int64
	var firstFailure atomic.Value
	work := make(chan int)
	var wg sync.WaitGroup
	start := time.Now()
	for range concurrency {
		wg.Add(1)
		go func() {
			defer wg.Done()
			buf := make([]byte, 4<<10)
			for i := range work {
				ctx, cancel := context.WithCancel(runCtx)
				dropNow := func() {
					droppedAt[i].Store(time.Now().UnixNano())
					cancel()
				}
				drop := time.AfterFunc(drops[i], dropNow)
				if afterHeader[i] {
					drop.Stop()
				}
				req, _ := http.NewRequestWithContext(ctx, http.MethodGet, urls[i], nil)
				resp, err := client.Do(req)
				if err == nil && afterHeader[i] {
					drop.Reset(drops[i])
				}
				switch {
				case err != nil && ctx.Err() != nil:
					beforeHeader.Add(1)
				case err != nil:
					failed.Add(1)
					firstFailure.CompareAndSwap(nil, err.Error())
				default:
					gotHeader.Add(1)
					n, err := io.CopyBuffer(io.Discard, resp.Body, buf)
					bytesRead.Add(n)
					resp.Body.Close()
					if err == nil || !errors.Is(err, context.Canceled) {
						failed.Add(1)
						firstFailure.CompareAndSwap(nil, fmt.Sprintf("stream %d ended by itself: %v", i, err))
					}
				}
				drop.Stop()
				cancel()
			}
		}()
	}
	for i := range streams {
		select {
		case work <- i:
		case <-runCtx.Done():
		}
	}
	close(work)
	wg.Wait()
	elapsed := time.Since(start)
	t.Logf("churn done in %s", elapsed)
	if runCtx.Err() != nil {
		t.Fatalf("the churn did not finish within %s", runBound)
	}
	if n := failed.Load(); n > 0 {
		t.Errorf("%d streams failed other than by being dropped; first: %v", n, firstFailure.Load())
	}
	transport.CloseIdleConnections()

	// Everything must be released: bounded waits, since the last teardowns
	// run concurrently with these checks.
	up.waitQuiet(t, 10*time.Second)
	_, _, _, pooled := up.counts()
	t.Logf("upstream quiet after %s, %d connections in the gateway's pool", time.Since(start), pooled)
	up.waitFor(t, "0 upstream connections after the pool's keep-alive", churnKeepAlive+5*time.Second, func() bool {
		return len(up.conns) == 0
	})
	t.Logf("no upstream connection after %s", time.Since(start))
	waitNoModuleGoroutines(t, 10*time.Second)
	t.Logf("no handler goroutines after %s", time.Since(start))
	var fds int
	deadline := time.Now().Add(10 * time.Second)
	for fds = openFDs(t); fds > baseFDs && time.Now().Before(deadline); fds = openFDs(t) {
		time.Sleep(20 * time.Millisecond)
	}
	if fds > baseFDs {
		t.Errorf("%d file descriptors open after the churn, %d before", fds, baseFDs)
	}
	t.Logf("descriptors back after %s", time.Since(start))
	heapGrowth := int64(liveHeap()) - int64(baseHeap)
	if heapGrowth > 4<<20 {
		t.Errorf("the live heap grew by %d KiB over the churn", heapGrowth>>10)
	}
	open, total, busy, left := up.counts()
	var teardowns []time.Duration
	for i := range streams {
		dropped, ended := droppedAt[i].Load(), upstreamEndedAt[i].Load()
		if dropped != 0 && ended != 0 {
			teardowns = append(teardowns, time.Duration(ended-dropped))
		}
	}
	for _, d := range teardowns {
		rec.teardown(d)
	}
	if p99 := percentile(teardowns, 99); p99 > teardownBound {
		t.Errorf("teardown p99 %s over %d streams, want at most %s", p99, len(teardowns), teardownBound)
	}
	ends := g.streamEnds(t)[endsBefore:]
	reasons := map[string]int{}
	var heartbeats int64
	for _, e := range ends {
		reasons[e.Reason]++
		heartbeats += e.Heartbeats
	}
	if reasons["client_gone"] != len(ends) {
		t.Errorf("stream end reasons %v, want client_gone only", reasons)
	}

	t.Logf("%d streams in %s: %d dropped before the header, %d after; %d upstream requests", streams, elapsed, beforeHeader.Load(), gotHeader.Load(), total-warmRequests)
	rec.figure("%d streams in %s (concurrency %d, seed %d)", streams, elapsed.Round(time.Millisecond), concurrency, seed)
	rec.figure("dropped before the header %d, after %d; %d upstream requests; %.1f MiB read", beforeHeader.Load(), gotHeader.Load(), total-warmRequests, float64(bytesRead.Load())/(1<<20))
	rec.figure("%d streams logged as ended (reasons %v), %d heartbeats written", len(ends), reasons, heartbeats)
	rec.figure("after: %d handler goroutines, %+d file descriptors (%d before), %d open upstream requests, %d busy upstream connections (%d left in the gateway's keep-alive pool when the last stream ended, closed by its %s idle timeout: %d left), live heap %+d KiB",
		len(moduleGoroutines()), fds-baseFDs, baseFDs, open, busy, pooled, churnKeepAlive, left, heapGrowth>>10)
}
