package caddysse

import (
	"bufio"
	"errors"
	"io"
	"strings"

	"github.com/klauspost/compress/flate"
	"github.com/klauspost/compress/gzip"
	"github.com/klauspost/compress/zlib"
	"github.com/klauspost/compress/zstd"
)

// The gateway asks the upstream for `Accept-Encoding: identity`, but some
// legacy servers compress whatever the request says. Their event streams
// are decoded here, with the decoders Caddy itself uses, so the stream gets
// everything an uncompressed one gets; `encode` in front of the gateway
// still compresses toward the client. An encoding not listed here leaves
// the stream opaque (see stream.go).

// decoders open a decoding reader for each content coding the gateway reads.
var decoders = map[string]func(io.Reader) (io.Reader, error){
	"gzip":    openGzip,
	"x-gzip":  openGzip,
	"deflate": openDeflate,
	"zstd":    openZstd,
}

func openGzip(r io.Reader) (io.Reader, error) { return gzip.NewReader(r) }

// openDeflate reads "deflate" as HTTP defines it (zlib, RFC 9110) and as
// some servers send it (raw deflate), told apart by the zlib header.
func openDeflate(r io.Reader) (io.Reader, error) {
	br := bufio.NewReader(r)
	head, err := br.Peek(2)
	if err != nil {
		return nil, err
	}
	if head[0]&0x0f == 8 && (uint16(head[0])<<8|uint16(head[1]))%31 == 0 {
		return zlib.NewReader(br)
	}
	return flate.NewReader(br), nil
}

func openZstd(r io.Reader) (io.Reader, error) {
	// One goroutine-free decoder per stream, with a bounded window.
	d, err := zstd.NewReader(r, zstd.WithDecoderConcurrency(1), zstd.WithDecoderLowmem(true),
		zstd.WithDecoderMaxWindow(8<<20))
	if err != nil {
		return nil, err
	}
	return d.IOReadCloser(), nil
}

// decoder decodes one compressed event stream. A goroutine reads the next
// handler's writes through the decoding reader and forwards what comes out;
// each write returns once everything it made decodable has been forwarded,
// so the upstream is read at the client's pace, as an uncompressed stream
// is. The goroutine exits when the upstream's response ends (stopDecoding)
// or the stream does.
type decoder struct {
	input    chan []byte   // the next handler's writes
	consumed chan struct{} // a write's bytes are all decoded and forwarded
	done     chan struct{} // the goroutine has exited
	// err is why decoding failed, if it did; ended is whether the
	// compressed stream ended cleanly. Both are set before done is closed.
	err   error
	ended bool

	// Owned by the goroutine: what is left of the write being decoded.
	pending     []byte
	outstanding bool
}

// startDecoder starts decoding s in encoding, or returns nil if the
// gateway cannot read that encoding.
func startDecoder(s *stream, encoding string) *decoder {
	open, ok := decoders[strings.ToLower(strings.TrimSpace(encoding))]
	if !ok {
		return nil
	}
	d := &decoder{input: make(chan []byte), consumed: make(chan struct{}), done: make(chan struct{})}
	go d.run(s, open)
	return d
}

// Write hands compressed bytes to the decoding goroutine.
func (d *decoder) Write(p []byte) (int, error) {
	select {
	case d.input <- p:
	case <-d.done:
		return 0, errStreamClosed
	}
	select {
	case <-d.consumed:
		return len(p), nil
	case <-d.done:
		if d.ended && len(d.pending) == 0 {
			return len(p), nil // the write ended the compressed stream
		}
		return 0, errStreamClosed
	}
}

// Read gives the decoding reader the compressed bytes of the next handler's
// writes; asking for more than is left means the last write is done with.
func (d *decoder) Read(p []byte) (int, error) {
	if len(d.pending) == 0 {
		if d.outstanding {
			d.outstanding = false
			d.consumed <- struct{}{}
		}
		chunk, ok := <-d.input
		if !ok {
			return 0, io.EOF
		}
		d.pending, d.outstanding = chunk, true
	}
	n := copy(p, d.pending)
	d.pending = d.pending[n:]
	return n, nil
}

func (d *decoder) run(s *stream, open func(io.Reader) (io.Reader, error)) {
	defer close(d.done)
	err := d.decode(s, open)
	d.ended = err == nil
	if err != nil && !errors.Is(err, errStreamClosed) && !errors.Is(err, errClientGone) {
		// The upstream sent something that does not decode: end the
		// stream as an upstream error, adding nothing.
		d.err = err
		s.mu.Lock()
		s.endLocked(reasonUpstreamError, err)
		s.mu.Unlock()
	}
}

func (d *decoder) decode(s *stream, open func(io.Reader) (io.Reader, error)) error {
	r, err := open(d)
	if err != nil {
		return err
	}
	if c, ok := r.(io.Closer); ok {
		defer c.Close()
	}
	buf := make([]byte, 16<<10)
	for {
		n, err := r.Read(buf)
		if n > 0 {
			if ferr := s.forward(buf[:n]); ferr != nil {
				return ferr
			}
		}
		if err == io.EOF {
			return nil
		}
		if err != nil {
			return err
		}
	}
}

// stopDecoding tells the decoding goroutine that the upstream's response
// has ended, and waits for it to finish.
func (s *stream) stopDecoding() {
	if s.decoder == nil {
		return
	}
	close(s.decoder.input)
	<-s.decoder.done
}
