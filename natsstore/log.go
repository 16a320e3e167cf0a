package natsstore

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"strconv"
	"sync"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	caddysse "github.com/ssegateway/caddy-sse"
)

const (
	leaseBucket = "sse-leases"

	// Each event is one message: its data, and its id in headers.
	headerID    = "Sse-Id"
	headerHasID = "Sse-Has-Id"

	// eventsMaxAge lets the events of streams nobody follows any more
	// vanish.
	eventsMaxAge = 24 * time.Hour
	// dupWindow is how long a retried append is recognised as one.
	dupWindow = 2 * time.Minute
)

// streamFor names the JetStream stream of a replay limit and its subject
// for one shared stream. A stream keeps as many messages per subject as one
// limit says, so each distinct limit has its own.
func streamFor(events int, name string) (stream, subject, leaseKey string) {
	n := strconv.Itoa(events)
	// The lease guards the subject the holder appends to: gateways whose
	// replay differs (a rolling change of it) follow different subjects,
	// and each has a holder, rather than one following a subject nobody
	// appends to.
	return "SSE_EVENTS_R" + n, "sse.r" + n + "." + name, "r" + n + "." + name
}

// openLog ensures the log's JetStream stream and the lease bucket, once per
// connection and config.
func (c *conn) openLog(ctx context.Context, s *Store, name string, events int) (*natsLog, error) {
	if err := c.ready(); err != nil {
		return nil, err
	}
	timeout := min(time.Duration(s.Lease), maxCallTimeout)
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	streamName, subject, leaseKey := streamFor(events, name)
	c.mu.Lock()
	defer c.mu.Unlock()
	streamKey := fmt.Sprintf("%s/%d", streamName, s.Replicas)
	st := c.streams[streamKey]
	if st == nil {
		// An event larger than the server's max_payload cannot be
		// published anyway; up to it, any event fits.
		maxMsg := int32(min(c.nc.MaxPayload(), 1<<30))
		var err error
		st, err = c.js.CreateOrUpdateStream(ctx, jetstream.StreamConfig{
			Name:              streamName,
			Description:       "caddy-sse: the latest events of shared streams, " + strconv.Itoa(events) + " per stream",
			Subjects:          []string{"sse.r" + strconv.Itoa(events) + ".*"},
			Storage:           jetstream.FileStorage,
			Replicas:          s.Replicas,
			MaxMsgsPerSubject: int64(events),
			MaxMsgSize:        maxMsg,
			Discard:           jetstream.DiscardOld,
			Duplicates:        dupWindow,
			MaxAge:            eventsMaxAge,
		})
		if err != nil {
			return nil, fmt.Errorf("nats store: stream %s: %w", streamName, err)
		}
		c.streams[streamKey] = st
	}
	bucketKey := fmt.Sprintf("%v/%d", time.Duration(s.Lease), s.Replicas)
	kv := c.buckets[bucketKey]
	if kv == nil {
		var err error
		// A lease is a key that vanishes Lease after its last renewal.
		kv, err = c.js.CreateOrUpdateKeyValue(ctx, jetstream.KeyValueConfig{
			Bucket:      leaseBucket,
			Description: "caddy-sse: upstream leases of shared streams",
			TTL:         time.Duration(s.Lease),
			Storage:     jetstream.FileStorage,
			Replicas:    s.Replicas,
		})
		if err != nil {
			return nil, fmt.Errorf("nats store: bucket %s: %w", leaseBucket, err)
		}
		c.buckets[bucketKey] = kv
		c.setLeaseTTLLocked(time.Duration(s.Lease))
	}
	return &natsLog{
		conn:       c,
		poolKey:    s.poolKey,
		name:       leaseKey,
		stream:     st,
		streamName: streamName,
		subject:    subject,
		kv:         kv,
		lease:      time.Duration(s.Lease),
		timeout:    timeout,
	}, nil
}

// natsLog is one shared stream's log: a subject of a JetStream stream and a
// key of the lease bucket.
type natsLog struct {
	conn       *conn
	poolKey    string
	name       string // the key, in the bucket
	stream     jetstream.Stream
	streamName string
	subject    string
	kv         jetstream.KeyValue
	lease      time.Duration
	timeout    time.Duration // of each JetStream call

	mu     sync.Mutex
	held   *natsLease // the lease taken through this log, if still held
	closed bool
}

// call bounds one JetStream call by the log's timeout.
func (l *natsLog) call(ctx context.Context) (context.Context, context.CancelFunc) {
	return context.WithTimeout(ctx, l.timeout)
}

// Follow delivers the subject's messages through an ordered consumer. It
// returns ctx's error when ctx ends, and an error wrapping errUnreachable
// as soon as the connection is lost: it does not wait for it to come back.
func (l *natsLog) Follow(ctx context.Context, after uint64, add func(caddysse.LogEvent), caughtUp func()) error {
	nc := l.conn.nc
	// Listen before checking, so that no loss goes unnoticed.
	status := nc.StatusChanged(nats.DISCONNECTED, nats.RECONNECTING, nats.CLOSED)
	defer nc.RemoveStatusListener(status)
	if err := l.conn.ready(); err != nil {
		return err
	}
	// A consumer left behind (its delete below failed) goes within a
	// minute rather than the default five.
	cfg := jetstream.OrderedConsumerConfig{FilterSubjects: []string{l.subject}, InactiveThreshold: time.Minute}
	if after > 0 {
		cfg.DeliverPolicy = jetstream.DeliverByStartSequencePolicy
		cfg.OptStartSeq = after + 1
	}
	cctx, cancel := l.call(ctx)
	cons, err := l.conn.js.OrderedConsumer(cctx, l.streamName, cfg)
	cancel()
	if err != nil {
		return l.fail(ctx, "follow", err)
	}
	defer l.deleteConsumer(cons)
	// What is pending at the start is what was kept: caught up once that
	// many are given, or once the server says nothing is pending.
	var pending uint64
	if info := cons.CachedInfo(); info != nil {
		pending = info.NumPending
	}
	it, err := cons.Messages()
	if err != nil {
		return l.fail(ctx, "follow", err)
	}
	defer it.Stop()

	fctx, stop := context.WithCancel(ctx)
	defer stop()
	lost := make(chan struct{})
	go func() {
		select {
		case <-status:
			close(lost)
			stop()
		case <-fctx.Done():
		}
	}()

	caught := pending == 0
	if caught {
		caughtUp()
	}
	var given uint64
	for {
		msg, err := it.Next(jetstream.NextContext(fctx))
		if err != nil {
			select {
			case <-lost:
				return fmt.Errorf("nats store: follow: %w (connection lost)", errUnreachable)
			default:
			}
			return l.fail(ctx, "follow", err)
		}
		meta, err := msg.Metadata()
		if err != nil {
			return fmt.Errorf("nats store: follow: %w", err)
		}
		given++
		seq := meta.Sequence.Stream
		if seq <= after {
			continue // a safety net: each event once, none before after
		}
		after = seq
		h := msg.Headers()
		add(caddysse.LogEvent{
			Seq:   seq,
			Data:  msg.Data(),
			HasID: h.Get(headerHasID) == "1",
			ID:    h.Get(headerID),
		})
		if !caught && (given >= pending || meta.NumPending == 0) {
			caught = true
			caughtUp()
		}
	}
}

// deleteConsumer removes the ordered consumer's current server consumer,
// which would otherwise linger after Follow returns.
func (l *natsLog) deleteConsumer(cons jetstream.Consumer) {
	info := cons.CachedInfo()
	if info == nil || l.conn.ready() != nil {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), l.timeout)
	defer cancel()
	_ = l.conn.js.DeleteConsumer(ctx, l.streamName, info.Name)
}

// fail names the failed operation, prefers ctx's error, and says when the
// connection is down.
func (l *natsLog) fail(ctx context.Context, op string, err error) error {
	if ctx.Err() != nil {
		return ctx.Err()
	}
	if !l.conn.nc.IsConnected() {
		return fmt.Errorf("nats store: %s: %w: %w", op, errUnreachable, err)
	}
	return fmt.Errorf("nats store: %s: %w", op, err)
}

// leaseValue is what the lease key holds.
type leaseValue struct {
	Holder string      `json:"holder"`
	Status int         `json:"status"`
	Header http.Header `json:"header"`
}

// Lead creates the stream's lease key: only one gateway can, until it is
// deleted (Release) or vanishes (not renewed within Lease).
func (l *natsLog) Lead(ctx context.Context) (caddysse.Lease, error) {
	if err := l.conn.ready(); err != nil {
		return nil, err
	}
	var token [16]byte
	_, _ = rand.Read(token[:])
	ls := &natsLease{
		log:   l,
		value: leaseValue{Holder: hex.EncodeToString(token[:])},
		lost:  make(chan struct{}),
		stop:  make(chan struct{}),
	}
	value, _ := json.Marshal(ls.value)
	cctx, cancel := l.call(ctx)
	defer cancel()
	sent := time.Now()
	rev, err := l.kv.Create(cctx, l.name, value)
	if errors.Is(err, jetstream.ErrKeyExists) {
		return nil, nil
	}
	if err != nil {
		return nil, l.fail(ctx, "lead", err)
	}
	ls.rev = rev
	// The last event appended is where the holder appends after, and
	// where its upstream resumes from.
	last, err := l.stream.GetLastMsgForSubject(cctx, l.subject)
	switch {
	case errors.Is(err, jetstream.ErrMsgNotFound):
	case err != nil:
		ls.release()
		return nil, l.fail(ctx, "lead: last event", err)
	default:
		ls.lastSeq = last.Sequence
		ls.resumeID = last.Header.Get(headerID)
	}
	l.mu.Lock()
	if l.closed {
		l.mu.Unlock()
		ls.release()
		return nil, errors.New("nats store: lead: the log is closed")
	}
	l.held = ls
	l.mu.Unlock()
	go ls.renew(sent)
	return ls, nil
}

// LeaseTerm is how long a lease lasts unrenewed: the store's Lease. (The
// core's Log interface gains it on main; it is here so that the merge
// builds.)
func (l *natsLog) LeaseTerm() time.Duration { return l.lease }

// Header reads the lease key's header: nil while no holder set one.
func (l *natsLog) Header(ctx context.Context) (*caddysse.LogHeader, error) {
	if err := l.conn.ready(); err != nil {
		return nil, err
	}
	cctx, cancel := l.call(ctx)
	defer cancel()
	e, err := l.kv.Get(cctx, l.name)
	if errors.Is(err, jetstream.ErrKeyNotFound) || errors.Is(err, jetstream.ErrKeyDeleted) {
		return nil, nil
	}
	if err != nil {
		return nil, l.fail(ctx, "header", err)
	}
	var v leaseValue
	if err := json.Unmarshal(e.Value(), &v); err != nil {
		return nil, fmt.Errorf("nats store: header: %w", err)
	}
	if v.Status == 0 {
		return nil, nil
	}
	return &caddysse.LogHeader{Status: v.Status, Header: v.Header}, nil
}

// Close releases a lease taken through the log and drops its reference on
// the connection.
func (l *natsLog) Close() error {
	l.mu.Lock()
	if l.closed {
		l.mu.Unlock()
		return nil
	}
	l.closed = true
	held := l.held
	l.held = nil
	l.mu.Unlock()
	if held != nil {
		held.Release()
	}
	_, err := pool.Delete(l.poolKey)
	return err
}

// natsLease is a held lease key, renewed until released or lost.
type natsLease struct {
	log      *natsLog
	resumeID string

	mu      sync.Mutex // serialises the key's updates and the appends
	value   leaseValue
	rev     uint64 // the key's revision, for the next update
	lastSeq uint64 // the subject's last sequence: the append guard
	msgs    uint64 // appends made, for their message ids

	lost     chan struct{}
	lostOnce sync.Once
	stop     chan struct{} // closed by Release, under mu
	stopOnce sync.Once
}

// renew updates the key every third of its term: the lease, or the
// bucket's TTL if a later config on this connection set a shorter one. The
// key vanishes a term after the server wrote it, which is after the update
// was sent: without a successful renewal sent within it, another gateway
// may hold it.
func (ls *natsLease) renew(lastOK time.Time) {
	l := ls.log
	term := func() time.Duration {
		if ttl := time.Duration(l.conn.leaseTTL.Load()); ttl > 0 {
			return min(l.lease, ttl)
		}
		return l.lease
	}
	changed := l.conn.leaseTTLChanged()
	tick := time.NewTimer(term() / 3)
	defer tick.Stop()
	deadline := time.NewTimer(time.Until(lastOK.Add(term())))
	defer deadline.Stop()
	for {
		select {
		case <-ls.stop:
			return
		case <-ls.lost:
			return
		case <-deadline.C:
			ls.markLost()
			return
		case <-tick.C:
			tick.Reset(term() / 3)
		case <-changed:
			// The key's TTL changed under it: renew now, within the new one.
			changed = l.conn.leaseTTLChanged()
			tick.Reset(term() / 3)
		}
		sent := time.Now()
		err := ls.update(context.Background())
		switch {
		case err == nil:
			deadline.Reset(time.Until(sent.Add(term())))
		case errors.Is(err, errReleased):
			return
		case errors.Is(err, jetstream.ErrKeyRevisionMismatch), errors.Is(err, jetstream.ErrKeyNotFound),
			errors.Is(err, jetstream.ErrKeyDeleted), isWrongLastSeq(err):
			ls.markLost() // another gateway took it, or it vanished
			return
		}
		// Other errors (NATS unreachable, a timeout): try again until the
		// deadline.
	}
}

// update writes the lease value, guarded by the revision last written.
func (ls *natsLease) update(ctx context.Context) error {
	l := ls.log
	if err := l.conn.ready(); err != nil {
		return err
	}
	ls.mu.Lock()
	defer ls.mu.Unlock()
	select {
	case <-ls.stop:
		return errReleased // its key is being deleted with the revision it has
	default:
	}
	value, _ := json.Marshal(ls.value)
	cctx, cancel := l.call(ctx)
	defer cancel()
	rev, err := l.kv.Update(cctx, l.name, value, ls.rev)
	if err != nil {
		return err
	}
	ls.rev = rev
	return nil
}

// Append publishes the event, expecting the subject's last message to be
// the one this holder saw last: if another gateway appended since, the
// lease is lost. The message id makes a retried publish count once.
func (ls *natsLease) Append(ctx context.Context, ev caddysse.LogEvent) (uint64, error) {
	select {
	case <-ls.lost:
		return 0, caddysse.ErrLeaseLost
	default:
	}
	l := ls.log
	if err := l.conn.ready(); err != nil {
		return 0, err
	}
	ls.mu.Lock()
	defer ls.mu.Unlock()
	ls.msgs++
	msg := nats.NewMsg(l.subject)
	msg.Data = ev.Data
	msg.Header.Set(headerID, ev.ID)
	if ev.HasID {
		msg.Header.Set(headerHasID, "1")
	}
	id := ls.value.Holder + "-" + strconv.FormatUint(ls.msgs, 10)
	opts := []jetstream.PublishOpt{
		jetstream.WithExpectLastSequencePerSubject(ls.lastSeq),
		jetstream.WithMsgID(id),
	}
	var ack *jetstream.PubAck
	var err error
	for try := 0; try < 2; try++ {
		cctx, cancel := l.call(ctx)
		ack, err = l.conn.js.PublishMsg(cctx, msg, opts...)
		cancel()
		// Only a publish whose ack did not come may have been added; it
		// is published again with its id.
		if !errors.Is(err, context.DeadlineExceeded) && !errors.Is(err, nats.ErrTimeout) || ctx.Err() != nil {
			break
		}
	}
	switch {
	case isWrongLastSeq(err):
		// The server checks the guard before the message id: a retry
		// whose first publish was added fails it. Then the subject's
		// last message is that first publish.
		if seq, ok := ls.appended(ctx, id); ok {
			ls.lastSeq = seq
			return seq, nil
		}
		ls.markLost()
		return 0, caddysse.ErrLeaseLost
	case err != nil:
		return 0, fmt.Errorf("nats store: append: %w", err)
	}
	ls.lastSeq = ack.Sequence
	return ack.Sequence, nil
}

// appended tells whether the subject's last message is the one published
// with the message id, and its sequence.
func (ls *natsLease) appended(ctx context.Context, id string) (uint64, bool) {
	l := ls.log
	cctx, cancel := l.call(ctx)
	defer cancel()
	last, err := l.stream.GetLastMsgForSubject(cctx, l.subject)
	if err != nil || last.Header.Get(jetstream.MsgIDHeader) != id {
		return 0, false
	}
	return last.Sequence, true
}

// SetHeader writes the header into the lease key, where Header reads it.
func (ls *natsLease) SetHeader(ctx context.Context, h caddysse.LogHeader) error {
	select {
	case <-ls.lost:
		return caddysse.ErrLeaseLost
	default:
	}
	ls.mu.Lock()
	ls.value.Status, ls.value.Header = h.Status, h.Header
	ls.mu.Unlock()
	err := ls.update(ctx)
	if errors.Is(err, jetstream.ErrKeyRevisionMismatch) || isWrongLastSeq(err) {
		ls.markLost()
		return caddysse.ErrLeaseLost
	}
	if err != nil {
		return fmt.Errorf("nats store: set header: %w", err)
	}
	return nil
}

// ResumeID is the Sse-Id of the subject's last message when the lease was
// taken.
func (ls *natsLease) ResumeID() string { return ls.resumeID }

// Lost is closed once the lease is no longer held.
func (ls *natsLease) Lost() <-chan struct{} { return ls.lost }

// Release stops the renewals and deletes the key, so that another gateway
// takes it at once.
func (ls *natsLease) Release() {
	ls.release()
	l := ls.log
	l.mu.Lock()
	if l.held == ls {
		l.held = nil
	}
	l.mu.Unlock()
}

// errReleased is what an update gives once Release began.
var errReleased = errors.New("nats store: the lease is released")

// release stops the renewals and deletes the key, unless the lease was
// lost, and marks it lost. The delete is made under mu, guarded by the
// revision last written: no renewal comes between.
func (ls *natsLease) release() {
	ls.mu.Lock()
	defer ls.mu.Unlock()
	ls.stopOnce.Do(func() { close(ls.stop) })
	select {
	case <-ls.lost:
		return // the key is another's, or gone
	default:
	}
	l := ls.log
	if l.conn.ready() == nil {
		ctx, cancel := context.WithTimeout(context.Background(), l.timeout)
		_ = l.kv.Delete(ctx, l.name, jetstream.LastRevision(ls.rev))
		cancel()
	}
	ls.markLost()
}

func (ls *natsLease) markLost() {
	ls.lostOnce.Do(func() { close(ls.lost) })
}

// isWrongLastSeq tells a failed sequence guard: another writer came first.
// Replicated streams report it with another code.
func isWrongLastSeq(err error) bool {
	var apiErr *jetstream.APIError
	if !errors.As(err, &apiErr) {
		return false
	}
	return apiErr.ErrorCode == jetstream.JSErrCodeStreamWrongLastSequence ||
		apiErr.ErrorCode == jetstream.JSErrCodeStreamWrongLastSequenceConstant
}
