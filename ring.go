package caddysse

import "bytes"

// ring is a shared stream's store of whole events, oldest first, each with
// its sequence number, its place in the byte stream and the last event ID
// a client holds once it has it (WHATWG HTML: an event without `id:` keeps
// the previous one, an empty `id:` resets it). It answers where a client
// that comes back with Last-Event-ID resumes, and keeps only what replay or
// a client not yet too far behind still needs, within hard bounds in events
// and bytes. It is not safe for concurrent use: the hub's lock guards it.
type ring struct {
	events []ringEvent
	first  uint64 // the sequence number of events[0]
	next   uint64 // the sequence number the next event gets
	total  int64  // bytes of every event appended so far: positions in the byte stream
	kept   int64  // bytes of the kept events
	lastID string // the last event ID a client holds after the newest event

	// resume maps a last event ID to the event a client that holds it
	// resumes from: the one after the first event that gave it that ID,
	// so that a client gets an event again rather than miss one when
	// several events in a row leave it the same ID (events without `id:`,
	// or a repeated id). A later run of the same ID replaces an earlier
	// one: an upstream that restarted its numbering is resumed in its
	// newest run.
	resume map[string]uint64
	// trimmedID is the last event ID of the newest event trimmed: its
	// entry in resume, if it points at the event being trimmed next, goes
	// with it.
	trimmedID string
}

// ringEvent is one whole event, as clients are sent it.
type ringEvent struct {
	data   []byte
	lastID string // the client's last event ID once it has this event
	start  int64  // where it starts in the byte stream
	// upstreamID is true when the upstream gave the event an id of its
	// own (possibly empty); false when it had none or the gateway's.
	upstreamID bool
}

// unknownID stands for an id the gateway did not keep (longer than
// maxEventIDLen): no Last-Event-ID can name it, since NUL is not allowed in
// a header.
const unknownID = "\x00"

func newRing() *ring {
	return &ring{resume: make(map[string]uint64)}
}

// startFrom records that the upstream was first asked from lastID: a
// client that holds it resumes from the first event.
func (rg *ring) startFrom(lastID string) {
	rg.lastID = lastID
	rg.resume[lastID] = 0
	rg.trimmedID = lastID // its entry goes with the first event
}

// add appends an event, with the last event ID a client holds after it.
func (rg *ring) add(data []byte, lastID string, upstreamID bool) {
	seq := rg.next
	if lastID != rg.lastID && lastID != "" && lastID != unknownID {
		rg.resume[lastID] = seq + 1
	}
	rg.events = append(rg.events, ringEvent{data: data, lastID: lastID, start: rg.total, upstreamID: upstreamID})
	rg.lastID = lastID
	rg.total += int64(len(data))
	rg.kept += int64(len(data))
	rg.next++
}

// at returns the event with sequence number seq, which must be kept.
func (rg *ring) at(seq uint64) *ringEvent {
	return &rg.events[seq-rg.first]
}

// newestStart is where the newest event starts in the byte stream.
func (rg *ring) newestStart() int64 {
	if len(rg.events) == 0 {
		return rg.total
	}
	return rg.events[len(rg.events)-1].start
}

// startOf is where the event seq starts in the byte stream: the end of the
// stream so far for the next event to come.
func (rg *ring) startOf(seq uint64) int64 {
	if seq >= rg.next {
		return rg.total
	}
	return rg.at(seq).start
}

// after returns the event a client holding lastID resumes from, and whether
// that event and every later one are still kept.
func (rg *ring) after(lastID string) (uint64, bool) {
	seq, ok := rg.resume[lastID]
	if !ok || seq < rg.first {
		return 0, false
	}
	return seq, true
}

// trim drops the oldest events while there are more than maxEvents or
// their bytes, the newest event's aside, exceed maxBytes, and then while
// they are beyond the latest keep events and no client needs them (needed
// is the oldest position a client reads from).
func (rg *ring) trim(keep, maxEvents int, maxBytes int64, needed uint64) {
	for len(rg.events) > 1 {
		over := len(rg.events) > maxEvents || rg.kept-int64(len(rg.events[len(rg.events)-1].data)) > maxBytes
		if !over && (len(rg.events) <= keep || needed <= rg.first) {
			return
		}
		rg.dropOldest()
	}
	if len(rg.events) == 1 && keep == 0 && needed > rg.first {
		rg.dropOldest()
	}
}

func (rg *ring) dropOldest() {
	old := &rg.events[0]
	if seq, ok := rg.resume[rg.trimmedID]; ok && seq == rg.first {
		delete(rg.resume, rg.trimmedID) // it resumed from the event going now
	}
	rg.trimmedID = old.lastID
	rg.kept -= int64(len(old.data))
	*old = ringEvent{}
	rg.events = rg.events[1:]
	rg.first++
	if len(rg.events) == 0 {
		rg.events = nil // let the backing array go
		if seq, ok := rg.resume[rg.trimmedID]; ok && seq < rg.first {
			delete(rg.resume, rg.trimmedID)
		}
	}
}

// replays reports whether data is the event seq, byte for byte, with an id
// of the upstream's: after a reconnect, the upstream sending exactly the
// events the hub has.
func (rg *ring) replays(seq uint64, data []byte) bool {
	if seq < rg.first || seq >= rg.next {
		return false
	}
	ev := rg.at(seq)
	return ev.upstreamID && string(ev.data) == string(data)
}

// endsRecently reports whether one of the newest n events ends with data:
// is it, or it with an id line of the gateway's before it.
func (rg *ring) endsRecently(data []byte, n int) bool {
	for i := len(rg.events) - 1; i >= 0 && i >= len(rg.events)-n; i-- {
		if bytes.HasSuffix(rg.events[i].data, data) {
			return true
		}
	}
	return false
}

// find returns the newest kept event that is data, byte for byte, with an
// id of the upstream's.
func (rg *ring) find(data []byte) (uint64, bool) {
	for i := len(rg.events) - 1; i >= 0; i-- {
		if ev := &rg.events[i]; ev.upstreamID && string(ev.data) == string(data) {
			return rg.first + uint64(i), true
		}
	}
	return 0, false
}
