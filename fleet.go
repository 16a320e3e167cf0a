package caddysse

import (
	"context"
	"errors"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"time"

	"go.uber.org/zap"
)

// A fleet is several gateways that share their shared streams through a
// store with a log (store.go). A hub then follows the key's log into its
// ring, whoever appends to it, and its clients are fed from the ring as
// with the memory store (share.go, feed). When no gateway holds the key's
// lease, the hub takes it and runs the upstream requests (hub.upstream),
// appending each whole event to the log; its own clients get the events
// back from the log too, so that every gateway gives an event the same id:
// with assign_ids, the log's sequence number. A new holder asks the
// upstream from the last id in the log. While the store cannot be reached
// the hub serves its clients with an upstream request of its own (alone),
// and rejoins the fleet once the store is back.

// leaseAsksPerTerm is how many times a lease's term a hub that follows
// another gateway's upstream asks for the lease: the lease moves within
// about a term and a quarter of its holder's end.
const leaseAsksPerTerm = 4

// rejoinLookBack is how many of the newest events a hub back from serving
// alone compares an event without id from the log with.
const rejoinLookBack = 8

// storeProbeEvery is how often a hub that serves its clients alone checks
// whether the store is back.
const storeProbeEvery = time.Second

// runFleet is the hub of a store with a log: it follows the log, leads
// when it may, and serves its clients alone while the store is
// unreachable, until the hub ends.
func (hb *hub) runFleet(store Store) {
	defer close(hb.finished)
	defer sseMetrics.hubs.Dec()
	defer hb.settleUnready()
	conf := hb.handler().Share
	limits := LogLimits{Events: max(*conf.Replay, 1), Bytes: conf.MaxBacklog}
	log, err := store.OpenLog(hb.ctx, hb.logName, limits)
	for {
		if err == nil {
			var ended bool
			if ended, err = hb.fleet(log); ended {
				log.Close()
				return
			}
		}
		if log != nil {
			log.Close()
			log = nil
		}
		if hb.ctx.Err() != nil {
			hb.end(reasonDrain)
			return
		}
		hb.storeFailed(err)
		if log = hb.alone(store, limits); log == nil {
			return
		}
		err = nil
		hb.storeBack()
	}
}

// fleet follows the log into the ring and leads when no other gateway
// does, until the hub ends (true) or the store fails (its error).
func (hb *hub) fleet(log Log) (ended bool, err error) {
	ctx, stopFollowing := context.WithCancel(hb.ctx)
	defer stopFollowing()
	caughtUp := make(chan struct{})
	failed := make(chan struct{}) // closed when following ends, with followErr
	var followErr error
	hb.mu.Lock()
	after := hb.logSeq
	hb.catchingUp = true
	hb.mu.Unlock()
	go func() {
		defer close(failed)
		followErr = log.Follow(ctx, after, hb.appendFromLog, func() {
			hb.mu.Lock()
			hb.catchingUp = false
			hb.mu.Unlock()
			close(caughtUp)
		})
	}()
	select {
	case <-caughtUp:
	case <-failed:
		return false, followErr
	}
	if after == 0 && !hb.decided.Load() {
		// The clients that came before the log was read get what comes
		// next, as they would from a new upstream request; the kept
		// events are for those that come back with Last-Event-ID. (Not
		// those of a hub that served alone first: they have been fed.)
		hb.mu.Lock()
		for sub := range hb.subs {
			sub.pos, sub.posStart = hb.ring.next, hb.ring.total
		}
		hb.mu.Unlock()
	}
	every := max(log.LeaseTerm()/leaseAsksPerTerm, 10*time.Millisecond)
	for {
		var lease Lease
		if hb.hasClients() {
			// A hub that only lingers keeps following, but starts no
			// upstream request: that is for a gateway with clients.
			if lease, err = log.Lead(hb.ctx); err != nil {
				return false, err
			}
		}
		if lease != nil {
			if ended, err := hb.lead(lease, failed); ended || err != nil {
				return ended, err
			}
			select {
			case <-failed:
				return false, followErr
			default:
				continue // the lease was lost: follow
			}
		}
		if !hb.decided.Load() {
			header, err := log.Header(hb.ctx)
			if err != nil {
				return false, err
			}
			if header != nil {
				hb.goLive(header)
			}
		}
		wake := make(chan struct{})
		t := hb.handler().clock.AfterFunc(every, func() { close(wake) })
		select {
		case <-wake:
		case <-failed:
			t.Stop()
			if hb.ctx.Err() == nil {
				return false, followErr
			}
			hb.end(reasonDrain)
			return true, nil
		case <-hb.ctx.Done():
			t.Stop()
			hb.end(reasonDrain)
			return true, nil
		}
	}
}

// lead runs the upstream requests while this gateway holds lease; it
// returns when the hub ends (true), the lease is lost (false, nil), or the
// store fails.
func (hb *hub) lead(lease Lease, followingFailed <-chan struct{}) (ended bool, err error) {
	sseMetrics.leasesTaken.Inc()
	sseMetrics.leasesHeld.Inc()
	defer sseMetrics.leasesHeld.Dec()
	defer lease.Release()
	defer func() {
		hb.mu.Lock()
		hb.leading = false
		hb.mu.Unlock()
	}()
	if err := hb.appendUnlogged(lease); err != nil {
		if errors.Is(err, ErrLeaseLost) {
			return false, nil
		}
		return false, err
	}
	return hb.upstream(lease, followingFailed)
}

// appendUnlogged starts a lead. A hub back from serving alone first appends
// to the log the events with ids the upstream gave it meanwhile, for the
// gateways that are behind it (those ahead tell them by their ids), and
// then asks the upstream from there; any other asks from the last id in
// the log. Events without ids are not appended: a gateway that had them
// could not tell, and an upstream without ids cannot resume anyway.
func (hb *hub) appendUnlogged(lease Lease) error {
	hb.mu.Lock()
	defer hb.mu.Unlock() // held while appending: the events are in the ring already
	hb.leading = true
	unlogged := hb.unlogged
	hb.unlogged = nil
	if len(unlogged) == 0 {
		if id := lease.ResumeID(); id != "" {
			hb.upstreamID = id
		}
		return nil
	}
	for i, ev := range unlogged {
		seq, err := lease.Append(hb.ctx, ev)
		if err != nil {
			return err
		}
		if i == 0 {
			hb.ownFrom = seq
		}
		hb.ownTo = seq
		sseMetrics.storePublished.Inc()
	}
	return nil
}

// keepUnloggedLocked keeps an event the upstream gave a fleet's hub that
// serves alone: at most replay of them, like the log.
func (hb *hub) keepUnloggedLocked(ev LogEvent) {
	if n := max(*hb.handler().Share.Replay, 1); len(hb.unlogged) >= n {
		hb.unlogged = append(hb.unlogged[:0], hb.unlogged[len(hb.unlogged)-n+1:]...)
	}
	hb.unlogged = append(hb.unlogged, ev)
}

// hasClients reports whether the hub has clients, rather than lingering.
func (hb *hub) hasClients() bool {
	hb.mu.RLock()
	defer hb.mu.RUnlock()
	return len(hb.subs) > 0
}

// appendFromLog adds an event of the log to the ring, with the log's
// sequence number for its gateway id: the same on every gateway.
func (hb *hub) appendFromLog(ev LogEvent) {
	hb.mu.Lock()
	defer hb.mu.Unlock()
	if ev.Seq <= hb.logSeq {
		return
	}
	hb.logSeq = ev.Seq
	sseMetrics.storeConsumed.Inc()
	if hb.ownFrom <= ev.Seq && ev.Seq <= hb.ownTo {
		return // appended by this hub from its ring (appendUnlogged)
	}
	// The log is read as a leader writes it: one whole event, its id as
	// its id field says. Anything else (a broken or hostile store, or a
	// publisher that is no gateway) would break the clients' framing or
	// give them events behind the one the log numbers: left out.
	hasID, id, whole := logEventFields(ev.Data)
	if !whole || int64(len(ev.Data)) > hb.handler().Share.MaxBacklog {
		sseMetrics.storeErrors.Inc()
		return
	}
	ev.HasID = hasID
	if hasID {
		ev.ID = id
	}
	hb.unlogged = nil // another gateway leads: the log has what it needs
	if hb.rejoined {
		// Back from serving alone: what the upstream gave this gateway
		// meanwhile, the log may give again. An event with an id is
		// known by it; one without cannot be told apart, so those the log
		// got while this gateway served alone are left out: it had its
		// own.
		switch {
		case ev.HasID && ev.ID != "":
			if _, seen := hb.ring.after(ev.ID); seen {
				return
			}
			hb.rejoined = false
		case hb.catchingUp:
			return
		case hb.ring.endsRecently(ev.Data, rejoinLookBack):
			// The same event, from the upstream request this gateway
			// made alone as the new holder asked: the two overlap.
			return
		default:
			hb.rejoined = false
		}
	}
	if ev.HasID && !hb.leading {
		hb.upstreamID = ev.ID // asked from if this gateway leads or goes alone
	}
	data, id := ev.Data, ev.ID
	if !ev.HasID && hb.handler().Share.AssignIDs {
		data, id = hb.withID(hb.fleetPrefix, data, ev.Seq)
	}
	hb.addEventLocked(data, id, ev.HasID)
}

// logEventFields reads an event of the log: whether it is one whole event
// (its blank line ends it, nothing after), and whether it has an id field
// of the upstream's, with its value, as the leader's hubWriter found them.
func logEventFields(data []byte) (hasID bool, id string, whole bool) {
	st := newEventState()
	for n := 0; n < len(data); {
		ended := st.ended
		n += st.scan(data[n:], true)
		if st.ended == ended {
			continue
		}
		if n != len(data) {
			return false, "", false
		}
		if st.idFields == 0 {
			return false, "", true
		}
		if last, known := st.lastID(); known {
			return true, string(last), true
		}
		return true, unknownID, true
	}
	return false, "", false
}

// A client that comes back to a fleet's gateway with Last-Event-ID may
// have had its event from another gateway, which read the log a moment
// ahead of this one: before it is told its id is not kept, the hub waits
// for the log, up to awaitLoggedSeq for one of the fleet's ids beyond what
// it read, and up to awaitLoggedUpstream for an upstream's id it does not
// know, which may be an old one.
const (
	awaitLoggedSeq      = time.Second
	awaitLoggedUpstream = 250 * time.Millisecond
)

// awaitLogged waits until the ring has the event lastID names, or it is
// clear it will not come, within those bounds.
func (hb *hub) awaitLogged(ctx context.Context, lastID string) {
	wait := awaitLoggedUpstream
	seq, fleetID := uint64(0), false
	if n, ok := strings.CutPrefix(lastID, hb.fleetPrefix); ok {
		if v, err := strconv.ParseUint(n, 10, 64); err == nil {
			seq, fleetID, wait = v, true, awaitLoggedSeq
		}
	}
	deadline := make(chan struct{})
	t := hb.handler().clock.AfterFunc(wait, func() { close(deadline) })
	defer t.Stop()
	for {
		hb.mu.RLock()
		_, found := hb.ring.after(lastID)
		read, state, notify := hb.logSeq, hb.state, hb.notify
		hb.mu.RUnlock()
		if found || state == hubEnded || fleetID && seq <= read {
			return
		}
		select {
		case <-notify:
		case <-deadline:
			return
		case <-ctx.Done():
			return
		}
	}
}

// goLive makes a hub that follows another gateway's upstream a shared
// stream, with the header that upstream gave.
func (hb *hub) goLive(header *LogHeader) {
	// A leader shares only a 200 event stream not marked as one user's,
	// without what was its own request's: another header in the log is
	// not the fleet's, and the hub goes on waiting for one that is.
	if header.Status != http.StatusOK || !isEventStream(header.Header) ||
		perUser(header.Header, hb.handler().Share.Key == "") {
		return
	}
	h := header.Header.Clone()
	for _, name := range startersOwnHeaders {
		h.Del(name)
	}
	for _, name := range []string{"Connection", "Keep-Alive", "Proxy-Connection", "Te", "Trailer", "Transfer-Encoding", "Upgrade"} {
		h.Del(name) // hop-by-hop: the log's header came over no connection of ours
	}
	hb.mu.Lock()
	if hb.state == hubStarting {
		hb.state, hb.status, hb.header = hubLive, header.Status, h
	}
	hb.mu.Unlock()
	hb.markReady()
}

// settleUnready lets the clients that wait for a hub that ended before
// any header go on (share.go, serveShared).
func (hb *hub) settleUnready() {
	if !hb.decided.Load() {
		hb.mu.Lock()
		hb.state = hubEnded
		hb.mu.Unlock()
		close(hb.done)
		hb.markReady()
	}
}

// alone serves the hub's clients with upstream requests of this gateway's
// own while the store cannot be reached. It returns the log once the store
// is back, or nil when the hub ended.
func (hb *hub) alone(store Store, limits LogLimits) Log {
	back := make(chan struct{})
	ctx, stopProbing := context.WithCancel(hb.ctx)
	var log Log
	var wg sync.WaitGroup
	wg.Go(func() {
		for {
			wake := make(chan struct{})
			t := hb.handler().clock.AfterFunc(storeProbeEvery, func() { close(wake) })
			select {
			case <-wake:
			case <-ctx.Done():
				t.Stop()
				return
			}
			if l, err := store.OpenLog(ctx, hb.logName, limits); err == nil {
				if _, err = l.Header(ctx); err == nil {
					log = l
					close(back)
					return
				}
				l.Close()
			}
		}
	})
	ended, _ := hb.upstream(nil, back)
	stopProbing()
	wg.Wait()
	if ended {
		if log != nil {
			log.Close()
		}
		return nil
	}
	hb.mu.Lock()
	hb.rejoined = true
	hb.mu.Unlock()
	return log
}

// storeFailed counts a store's failure, and logs the first of an outage.
func (hb *hub) storeFailed(err error) {
	sseMetrics.storeErrors.Inc()
	if hb.reg.storeDown.CompareAndSwap(false, true) {
		hb.handler().logger.Warn("share store unreachable: each shared stream runs an upstream request of this gateway's own until it is back",
			zap.Error(err))
	}
}

// storeBack logs the end of an outage, once.
func (hb *hub) storeBack() {
	if hb.reg.storeDown.CompareAndSwap(true, false) {
		hb.handler().logger.Info("share store is back: shared streams rejoin the fleet")
	}
}

// errFleetMove ends an upstream request of a hub that moves between the
// fleet and serving alone: the store is back, or following the log failed.
var errFleetMove = errors.New("sse: the shared stream moves between the fleet and this gateway alone")
