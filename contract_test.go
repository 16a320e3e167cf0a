package caddysse

import (
	"fmt"
	"math/rand/v2"
	"os"
	"reflect"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"go.uber.org/zap/zaptest/observer"

	"github.com/ssegateway/caddy-sse/internal/ssespec"
)

// contractCases are upstream bodies covering the event-stream syntax a
// gateway must not disturb, in the order the test runs them.
var contractCases = []struct{ name, body string }{
	{"lf", "data: a\n\ndata: b\n\n"},
	{"crlf", "event: t\r\ndata: 1\r\n\r\ndata: 2\r\n\r\n"},
	{"lone cr", "data: a\r\rid: 7\rdata: b\r\r"},
	{"mixed endings", "data: a\r\n\rdata: b\n\r\ndata: c\r\r\n"},
	{"bom", "\xEF\xBB\xBFdata: first\n\ndata: second\n\n"},
	{"bom then id", "\xEF\xBB\xBFid: 1\ndata: x\n\n"},
	{"not quite a bom", "\xEF\xBBdata: x\n\ndata: y\n\n"},
	{"comments", ": hello\ndata: a\n: inside\ndata: b\n\n:bye\n\n"},
	{"multi-line data", "data: one\ndata: two\ndata:\ndata: four\n\n"},
	{"id and retry", "id: 1\nretry: 500\ndata: x\n\nid: 2\ndata: y\n\nid\ndata: z\n\n"},
	{"id only", "id: 42\n\ndata: after\n\n"},
	{"id with nul", "id: 1\ndata: a\n\nid: 2\x003\ndata: b\n\n"},
	{"no colon", "data\n\ndata\ndata\n\n"},
	{"event types", "event: add\ndata: 1\n\nevent: remove\ndata: 2\n\ndata: 3\n\n"},
	{"unterminated last", "data: kept\n\ndata: dropped\n"},
	{"unterminated line", "data: kept\n\ndata: dropped"},
	{"extra blank lines", "\n\ndata: a\n\n\n\n\ndata: b\n\n"},
	{"leading space values", "data:  two spaces\n\nid:  x\ndata:\n\n"},
	{"empty", ""},
	{"utf8", "data: héllo wörld ✓\n\ndata: \xff\xfe bad\n\n"},
	{"ends with cr", "data: a\r"},
	{"cr then lf apart", "data: a\r\n\r\ndata: b\r\n\r"},
}

// contractSeedEnv names the environment variable that fixes the seed of
// the contract test's random cuts, to rerun a failure; without it each case
// draws a seed of its own on every run.
const contractSeedEnv = "SSE_CONTRACT_SEED"

// TestContractHeartbeatsNeverChangeEvents is the gateway's central promise:
// whatever the upstream's bytes and however they are split into writes, a
// spec-compliant client parser reads the same events, ids and retry values
// from the gateway's output, heartbeats included, as from the upstream.
// Heartbeats are forced before every write. The oracle is ssespec, a parser
// written from the spec independently of the gateway's boundary tracking.
//
// Each case is cut at every point, at every pair of points (short bodies)
// and at every byte, which is the same on every run, and at random points
// drawn from a seed of its own, which a failure prints with the command
// that reruns it.
func TestContractHeartbeatsNeverChangeEvents(t *testing.T) {
	var fixedSeed *uint64
	if v := os.Getenv(contractSeedEnv); v != "" {
		seed, err := strconv.ParseUint(v, 10, 64)
		if err != nil {
			t.Fatalf("%s=%q: %v", contractSeedEnv, v, err)
		}
		fixedSeed = &seed
	}
	injected := 0
	for _, tc := range contractCases {
		t.Run(tc.name, func(t *testing.T) {
			seed := rand.Uint64()
			if fixedSeed != nil {
				seed = *fixedSeed
			}
			rerun := fmt.Sprintf("case %q, seed %d; rerun with %s=%d go test -run '^%s$' .",
				tc.name, seed, contractSeedEnv, seed, strings.ReplaceAll(t.Name(), "/", "$/^"))
			want := ssespec.Parse([]byte(tc.body))
			for _, split := range splitsOf(len(tc.body), rand.New(rand.NewPCG(seed, 0))) {
				chunks := cut(tc.body, split)
				got, beats, ids := runContract(t, chunks)
				injected += beats
				parsed := ssespec.Parse([]byte(got))
				if !reflect.DeepEqual(parsed, want) {
					t.Fatalf("split %v: client reads\n  %+v\nfrom the gateway's %q\nbut\n  %+v\nfrom the upstream's %q\n%s",
						split, parsed, got, want, tc.body, rerun)
				}
				if ids != want.LastEventID {
					t.Fatalf("split %v: gateway tracked last event id %q, client has %q\n%s", split, ids, want.LastEventID, rerun)
				}
			}
		})
	}
	if injected == 0 && !t.Failed() {
		t.Fatal("no heartbeat was ever injected: the contract was not exercised")
	}
}

// runContract streams chunks through the handler with a heartbeat forced
// before each write and once at the end, and returns what the client got.
func runContract(t *testing.T, chunks []string) (out string, heartbeats int, lastID string) {
	h := &Handler{Heartbeat: caddy.Duration(time.Second)}
	clock, logs := provisionTest(t, h)
	run := startStream(t, h, clock, newScriptedUpstream())
	for _, c := range chunks {
		clock.Advance(time.Second)
		if err := run.send([]byte(c)); err != nil {
			t.Fatalf("upstream write: %v", err)
		}
	}
	clock.Advance(time.Second)
	run.endUpstream()
	if err := run.wait(); err != nil {
		t.Fatalf("ServeHTTP: %v", err)
	}
	return run.w.received(), countHeartbeats(run.w.received()), endField(t, logs, "last_event_id")
}

// endField returns a field of the line a stream leaves as it ends: "stream
// ended", or "upstream broke the stream".
func endField(t *testing.T, logs *observer.ObservedLogs, key string) string {
	t.Helper()
	ended := logs.Filter(func(e observer.LoggedEntry) bool {
		return e.Message == "stream ended" || e.Message == "upstream broke the stream"
	}).All()
	if len(ended) != 1 {
		t.Fatalf("want one line for the stream's end, got %d", len(ended))
	}
	v, ok := ended[0].ContextMap()[key]
	if !ok {
		t.Fatalf("log line has no %s: %v", key, ended[0].ContextMap())
	}
	return fmt.Sprint(v)
}

func countHeartbeats(out string) int {
	n := 0
	for i := 0; i+2 < len(out); i++ {
		if out[i] == ':' && out[i+1] == '\n' && out[i+2] == '\n' && (i == 0 || out[i-1] == '\n') {
			n++
		}
	}
	return n
}

// splitsOf lists the ways a body of n bytes is cut into writes: whole, at
// every single point, at every pair of points for short bodies, byte by
// byte, and a few random cuts.
func splitsOf(n int, rng *rand.Rand) [][]int {
	splits := [][]int{nil}
	for i := 1; i < n; i++ {
		splits = append(splits, []int{i})
	}
	if n <= 40 {
		for i := 1; i < n; i++ {
			for j := i + 1; j < n; j++ {
				splits = append(splits, []int{i, j})
			}
		}
	}
	if n > 1 {
		every := make([]int, 0, n-1)
		for i := 1; i < n; i++ {
			every = append(every, i)
		}
		splits = append(splits, every)
		for range 20 {
			var s []int
			for i := 1; i < n; i++ {
				if rng.IntN(4) == 0 {
					s = append(s, i)
				}
			}
			splits = append(splits, s)
		}
	}
	return splits
}

func cut(body string, at []int) []string {
	chunks := make([]string, 0, len(at)+1)
	prev := 0
	for _, i := range at {
		chunks = append(chunks, body[prev:i])
		prev = i
	}
	return append(chunks, body[prev:])
}
