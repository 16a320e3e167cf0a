package caddysse

import (
	"bytes"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/klauspost/compress/flate"
	"github.com/klauspost/compress/gzip"
	"github.com/klauspost/compress/zlib"
	"github.com/klauspost/compress/zstd"
	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"
)

// flushingCompressor is a legacy server's compressing writer: it flushes
// after every event, as a streaming server must.
type flushingCompressor interface {
	io.WriteCloser
	Flush() error
}

var testEncodings = map[string]func(io.Writer) flushingCompressor{
	"gzip": func(w io.Writer) flushingCompressor { return gzip.NewWriter(w) },
	"deflate": func(w io.Writer) flushingCompressor { // zlib, as HTTP defines it
		return zlib.NewWriter(w)
	},
	"deflate-raw": func(w io.Writer) flushingCompressor { // as some servers send it
		fw, _ := flate.NewWriter(w, flate.DefaultCompression)
		return fw
	},
	"zstd": func(w io.Writer) flushingCompressor {
		zw, _ := zstd.NewWriter(w)
		return zw
	},
}

// TestCompressedStreamIsDecodedAndManaged checks that an upstream that
// compresses its event stream despite Accept-Encoding: identity gets what
// any stream gets: events reach the client decoded, each as soon as the
// upstream flushed it, with heartbeats only between events, and the last
// event id known.
func TestCompressedStreamIsDecodedAndManaged(t *testing.T) {
	events := []string{"id: 1\ndata: one\n\n", "id: 2\ndata: t", "wo\n\n", "id: 3\ndata: three\n\n"}
	for name, compressor := range testEncodings {
		t.Run(name, func(t *testing.T) {
			h := &Handler{Heartbeat: seconds(1)}
			clock, logs := provisionTest(t, h)
			up := newScriptedUpstream()
			up.header = http.Header{"Content-Encoding": {strings.TrimSuffix(name, "-raw")}}
			run := startStream(t, h, clock, up)
			if got := run.w.Header().Get("Content-Encoding"); got != "" {
				t.Fatalf("Content-Encoding %q reached the client of a decoded stream", got)
			}
			var compressed bytes.Buffer
			cw := compressor(&compressed)
			var want strings.Builder
			for i, e := range events {
				cw.Write([]byte(e))
				cw.Flush()
				// Split each flushed piece in two writes, to cut the
				// compressed stream anywhere.
				piece := compressed.Bytes()
				mustSend(t, run, string(piece[:len(piece)/2]))
				mustSend(t, run, string(piece[len(piece)/2:]))
				compressed.Reset()
				want.WriteString(e)
				if got := run.w.received(); got != want.String() {
					t.Fatalf("after event %d the client has %q, want %q", i, got, want.String())
				}
				clock.Advance(time.Second) // a heartbeat, where the stream allows one
				if i != 1 {
					want.WriteString(":\n\n")
				}
			}
			// The upstream ends its response, and its compressed stream.
			cw.Close()
			mustSend(t, run, compressed.String())
			run.endUpstream()
			run.wait()
			wantReceived(t, run, want.String())
			wantReason(t, logs, reasonUpstreamEnd)
			if id := endField(t, logs, "last_event_id"); id != "3" {
				t.Fatalf("last event id %q, want 3", id)
			}
		})
	}
}

// gzipStream starts a stream whose upstream says it sends gzip.
func gzipStream(t *testing.T) (*streamRun, *observer.ObservedLogs) {
	h := &Handler{Heartbeat: seconds(1)}
	clock, logs := provisionTest(t, h)
	up := newScriptedUpstream()
	up.header = http.Header{"Content-Encoding": {"gzip"}}
	return startStream(t, h, clock, up), logs
}

// TestTruncatedCompressedStreamEndsAsUpstreamError checks an upstream whose
// response ends in the middle of its compressed stream: that is a broken
// stream, not a clean end.
func TestTruncatedCompressedStreamEndsAsUpstreamError(t *testing.T) {
	run, logs := gzipStream(t)
	var compressed bytes.Buffer
	gw := gzip.NewWriter(&compressed)
	gw.Write([]byte("data: one\n\n"))
	gw.Flush()
	mustSend(t, run, compressed.String())
	run.endUpstream()
	run.wait()
	wantReceived(t, run, "data: one\n\n")
	wantReason(t, logs, reasonUpstreamError)
}

func TestCorruptCompressedStreamEndsAsUpstreamError(t *testing.T) {
	run, logs := gzipStream(t)
	if err := run.send([]byte("this is not gzip, but long enough for a header")); err == nil {
		t.Fatal("an undecodable write was taken")
	}
	run.waitUpstreamGone()
	run.wait()
	wantReason(t, logs, reasonUpstreamError)
}

// TestUnreadableEncodingIsOpaqueButLimited checks a stream in an encoding
// the gateway cannot read: it passes through byte for byte with nothing
// added, warns once, and is still ended by the idle limit (at any byte:
// there is no boundary to find).
func TestUnreadableEncodingIsOpaqueButLimited(t *testing.T) {
	h := &Handler{Heartbeat: seconds(1), IdleTimeout: seconds(5), Retry: seconds(1)}
	clock, logs := provisionTest(t, h)
	for range 2 {
		up := newScriptedUpstream()
		up.header = http.Header{"Content-Encoding": {"br"}}
		run := startStream(t, h, clock, up)
		mustSend(t, run, "\x1b\x2a opaque bytes")
		clock.Advance(5 * time.Second)
		run.waitUpstreamGone()
		run.wait()
		wantReceived(t, run, "\x1b\x2a opaque bytes")
		if got := run.w.Header().Get("Content-Encoding"); got != "br" {
			t.Fatalf("Content-Encoding %q, want br kept", got)
		}
	}
	if n := logs.FilterMessageSnippet("cannot read").Len(); n != 1 {
		t.Fatalf("warned %d times, want once", n)
	}
	if n := logs.FilterMessage("stream ended").FilterField(reasonField(reasonIdleTimeout)).Len(); n != 2 {
		t.Fatalf("%d streams ended by idle_timeout, want 2", n)
	}
}

func reasonField(r endReason) zap.Field { return zap.String("reason", string(r)) }
