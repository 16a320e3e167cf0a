package caddysse

import (
	"errors"
	"math/rand/v2"
	"net/http"
	"sync"
	"time"
)

// This file is the stream's sense of time: heartbeats, the idle limit, the
// maximum lifetime, draining, the wait for an event boundary before a close,
// the close grace, and the write deadline. Each stream has one timer, armed for the earliest moment
// something may be due. Writes only record when they happened; the timer
// re-arms itself lazily when it fires, so the hot path never touches it.

// clock is the source of time; tests replace it with a fake.
type clock interface {
	Now() time.Time
	AfterFunc(d time.Duration, f func()) timer
}

// timer is the part of *time.Timer the stream uses.
type timer interface {
	Reset(d time.Duration) bool
	Stop() bool
}

type realClock struct{}

func (realClock) Now() time.Time { return time.Now() }

func (realClock) AfterFunc(d time.Duration, f func()) timer { return time.AfterFunc(d, f) }

// streamTimes holds a stream's moments, as durations since it started. All
// fields are guarded by the stream's mutex.
type streamTimes struct {
	start time.Time
	timer timer
	// callbacks counts scheduled and running timer callbacks, so that the
	// stream can wait for them when it ends.
	callbacks sync.WaitGroup

	// lastUpstream is when the upstream last sent body bytes (or the
	// stream began): the idle limit counts from it.
	lastUpstream time.Duration
	// quietSince is when the client last received bytes, or when a
	// heartbeat was due but the stream was inside an event: the next
	// heartbeat is due a heartbeat period after it.
	quietSince time.Duration
	// lifetimeEnd is when the stream has lived long enough; 0 means never.
	lifetimeEnd time.Duration
	// drainAt is when a draining stream closes, if draining.
	draining bool
	drainAt  time.Duration
	// closing is the reason of a close that waits for the event in flight
	// to end; closingSince is when it began waiting.
	closing      endReason
	closingSince time.Duration
}

func (sw *streamWriter) sinceStart() time.Duration {
	return sw.h.clock.Now().Sub(sw.times.start)
}

// age is how long the stream has lived: 0 if its clock never started
// (the client could not even take the header).
func (sw *streamWriter) age() time.Duration {
	if sw.times.start.IsZero() {
		return 0
	}
	return sw.sinceStart()
}

// startClockLocked starts the stream's clock when its header has been sent.
func (sw *streamWriter) startClockLocked() {
	t := &sw.times
	t.start = sw.h.clock.Now()
	if max := time.Duration(sw.h.MaxLifetime); max > 0 {
		t.lifetimeEnd = max - time.Duration(rand.Float64()*sw.h.jitter*float64(max))
	}
	sw.armLocked(0)
}

// stopClockLocked stops the stream's timer for good.
func (sw *streamWriter) stopClockLocked() {
	if t := sw.times.timer; t != nil && t.Stop() {
		sw.times.callbacks.Done() // the pending callback will not run
	}
}

// armLocked (re-)arms the timer for the next moment something is due, or
// leaves it stopped when nothing ever will be. The timer is created the
// first time it is needed.
func (sw *streamWriter) armLocked(now time.Duration) {
	due, ok := sw.nextDueLocked()
	if !ok {
		return
	}
	t := &sw.times
	t.callbacks.Add(1)
	if t.timer == nil {
		t.timer = sw.h.clock.AfterFunc(max(due-now, 0), sw.onTimer)
	} else if t.timer.Reset(max(due-now, 0)) {
		t.callbacks.Done() // replaced a pending callback
	}
}

// nextDueLocked returns the earliest moment at which the timer must look at
// the stream.
func (sw *streamWriter) nextDueLocked() (time.Duration, bool) {
	t := &sw.times
	var due time.Duration
	found := false
	consider := func(at time.Duration) {
		if !found || at < due {
			due, found = at, true
		}
	}
	if at, armed := sw.idleDeadlineDue(); armed {
		consider(at)
	}
	if t.closing != "" {
		consider(t.closingSince + time.Duration(sw.h.WriteTimeout))
		return due, found
	}
	if hb := time.Duration(sw.h.Heartbeat); hb > 0 {
		consider(t.quietSince + hb)
	}
	if idle := time.Duration(sw.h.IdleTimeout); idle > 0 {
		consider(t.lastUpstream + idle)
	}
	if t.lifetimeEnd > 0 {
		consider(t.lifetimeEnd)
	}
	if t.draining {
		consider(t.drainAt)
	}
	return due, found
}

// clientActiveLocked records that the client received bytes at now.
func (sw *streamWriter) clientActiveLocked(now time.Time) {
	if !sw.times.start.IsZero() {
		sw.times.quietSince = now.Sub(sw.times.start)
	}
}

// upstreamActiveLocked records that the upstream's bytes were just
// forwarded, at the moment clientActiveLocked recorded.
func (sw *streamWriter) upstreamActiveLocked() {
	sw.times.lastUpstream = sw.times.quietSince
}

// onTimer is the stream's timer callback: it acts on whatever is due and
// re-arms the timer.
func (sw *streamWriter) onTimer() {
	defer sw.times.callbacks.Done()
	sw.mu.Lock()
	defer sw.mu.Unlock()
	if sw.closed {
		return
	}
	t := &sw.times
	now := sw.sinceStart()
	if at, armed := sw.idleDeadlineDue(); armed && now >= at {
		// No write is under way (this holds the lock): clear the deadline
		// before it could reset the idle stream.
		sw.deadline = time.Time{}
		sw.setWriteDeadline(time.Time{})
	}
	switch {
	case t.closing != "":
		if now >= t.closingSince+time.Duration(sw.h.WriteTimeout) {
			// The event in flight never ended: close without adding
			// anything, which makes the client discard it.
			sw.endLocked(t.closing, errGatewayClosed)
		}
	case t.draining && now >= t.drainAt:
		sw.beginCloseLocked(reasonDrain, now)
	case t.lifetimeEnd > 0 && now >= t.lifetimeEnd:
		sw.beginCloseLocked(reasonMaxLifetime, now)
	case sw.h.IdleTimeout > 0 && now >= t.lastUpstream+time.Duration(sw.h.IdleTimeout):
		sw.beginCloseLocked(reasonIdleTimeout, now)
	case sw.h.Heartbeat > 0 && now >= t.quietSince+time.Duration(sw.h.Heartbeat):
		sw.heartbeatLocked(now)
	}
	if !sw.closed {
		sw.armLocked(now)
	}
}

// beginCloseLocked closes the stream for reason at the next event boundary.
func (sw *streamWriter) beginCloseLocked(reason endReason, now time.Duration) {
	switch {
	case sw.state.atBoundary():
		sw.closeLocked(reason)
	case reason == reasonIdleTimeout:
		// A silent upstream will not finish its event: end without adding
		// anything, so the client discards the unfinished event.
		sw.endLocked(reason, errGatewayClosed)
	default:
		sw.times.closing, sw.times.closingSince = reason, now
	}
}

// heartbeatLocked writes a heartbeat comment if the stream is between
// events; inside an event it tries again a heartbeat period later.
func (sw *streamWriter) heartbeatLocked(now time.Duration) {
	if !sw.state.atBoundary() {
		sw.times.quietSince = now
		return
	}
	if sw.writeLocked(nil, sw.h.heartbeatLine) {
		sw.state.wroteAtBoundary()
		sw.heartbeats++
		sseMetrics.heartbeats.Inc()
	}
}

// drainWithin closes the stream at a random moment within window from now,
// through the close sequence, as the server it belongs to goes away.
func (sw *streamWriter) drainWithin(window time.Duration) {
	sw.mu.Lock()
	defer sw.mu.Unlock()
	if sw.closed || sw.times.draining {
		return
	}
	now := sw.sinceStart()
	sw.times.draining = true
	sw.times.drainAt = now + rand.N(window+1)
	sw.armLocked(now)
}

// armWriteDeadline bounds the write about to start by write_timeout.
//
// The deadline stays armed between writes and is renewed only once a tenth
// of write_timeout has passed since it was set, so most writes set none and
// each must finish within 90 to 100 % of write_timeout. Over HTTP/1.1 and
// HTTP/3 a deadline only affects writes, and the next write renews it
// first. Over HTTP/2 an expired deadline resets the stream even while it is
// idle, so there the stream's timer clears it before it runs out unused
// (see onTimer).
func (sw *streamWriter) armWriteDeadline(now time.Time) {
	timeout := time.Duration(sw.h.WriteTimeout)
	if sw.deadline.Sub(now) >= timeout-timeout/10 {
		return
	}
	sw.deadline = now.Add(timeout)
	sw.setWriteDeadline(sw.deadline)
	if sw.clearIdleDeadline && !sw.times.start.IsZero() {
		sw.armLocked(now.Sub(sw.times.start))
	}
}

// idleDeadlineDue returns when the timer must clear an unused HTTP/2 write
// deadline, and whether one is armed.
func (sw *streamWriter) idleDeadlineDue() (time.Duration, bool) {
	if !sw.clearIdleDeadline || sw.deadline.IsZero() {
		return 0, false
	}
	timeout := time.Duration(sw.h.WriteTimeout)
	return sw.deadline.Sub(sw.times.start) - timeout/10, true
}

func (sw *streamWriter) setWriteDeadline(t time.Time) {
	if sw.noDeadline {
		return
	}
	if err := sw.rc.SetWriteDeadline(t); errors.Is(err, http.ErrNotSupported) {
		sw.noDeadline = true
	}
}

// awaitClientClose gives the client up to grace to hang up by itself after
// the close sequence.
func (sw *streamWriter) awaitClientClose(grace time.Duration) {
	expired := make(chan struct{})
	t := sw.h.clock.AfterFunc(grace, func() { close(expired) })
	defer t.Stop()
	select {
	case <-sw.req.Context().Done():
	case <-expired:
	}
}
