package caddysse

import (
	"math/rand/v2"
	"sync"
	"time"
)

// This file is a request's sense of time: the wait for the upstream's
// header, heartbeats, the idle limit, the maximum lifetime, the wait for an
// event boundary before a close, draining and the close grace. Each request
// has one timer, armed for the earliest moment something may be due. Writes
// only record when they happened; the timer re-arms itself lazily when it
// fires, so the hot path never touches it. Write deadlines are Caddy's
// (see boundWritesLocked).

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

// streamTimes holds a request's moments, as durations since it arrived.
// All fields are guarded by the stream's mutex.
type streamTimes struct {
	start time.Time
	timer timer
	// callbacks counts scheduled and running timer callbacks, so that the
	// stream can wait for them when it ends.
	callbacks sync.WaitGroup

	// lastUpstream is when the upstream last sent body bytes, or its
	// header (0 while waiting for it): the idle limit counts from it.
	lastUpstream time.Duration
	// quietSince is when the client last received bytes, or when a
	// heartbeat was due but the stream was inside an event: the next
	// heartbeat is due a heartbeat period after it.
	quietSince time.Duration
	// lifetimeEnd is when the stream has lived long enough; 0 means never.
	lifetimeEnd time.Duration
	// closing is the reason of a close that waits for the event in flight
	// to end; closingSince is when it began waiting.
	closing      endReason
	closingSince time.Duration
}

func (s *stream) sinceStart() time.Duration {
	return s.h.clock.Now().Sub(s.times.start)
}

// age is how long the request has lived.
func (s *stream) age() time.Duration {
	if s.times.start.IsZero() {
		return 0
	}
	return s.sinceStart()
}

// startClockLocked starts the request's clock as it arrives.
func (s *stream) startClockLocked() {
	t := &s.times
	t.start = s.h.clock.Now()
	if max := time.Duration(s.h.MaxLifetime); max > 0 {
		t.lifetimeEnd = max - time.Duration(rand.Float64()*s.h.jitter*float64(max))
	}
	s.armLocked(0)
}

// stopClockLocked stops the stream's timer for good.
func (s *stream) stopClockLocked() {
	if t := s.times.timer; t != nil && t.Stop() {
		s.times.callbacks.Done() // the pending callback will not run
	}
}

// armLocked (re-)arms the timer for the next moment something is due, or
// leaves it stopped when nothing ever will be. The timer is created the
// first time it is needed.
func (s *stream) armLocked(now time.Duration) {
	due, ok := s.nextDueLocked()
	if !ok {
		return
	}
	t := &s.times
	t.callbacks.Add(1)
	if t.timer == nil {
		t.timer = s.h.clock.AfterFunc(max(due-now, 0), s.onTimer)
	} else if t.timer.Reset(max(due-now, 0)) {
		t.callbacks.Done() // replaced a pending callback
	}
}

// nextDueLocked returns the earliest moment at which the timer must look at
// the request.
func (s *stream) nextDueLocked() (time.Duration, bool) {
	t := &s.times
	var due time.Duration
	found := false
	consider := func(at time.Duration) {
		if !found || at < due {
			due, found = at, true
		}
	}
	idle := time.Duration(s.h.IdleTimeout)
	switch {
	case s.mode == waiting:
		if idle > 0 {
			consider(idle)
		}
		return due, found
	case t.closing != "":
		consider(t.closingSince + s.h.eventWait())
		return due, found
	}
	if hb := time.Duration(s.h.Heartbeat); hb > 0 && s.mode == events {
		consider(t.quietSince + hb)
	}
	if idle > 0 {
		consider(t.lastUpstream + idle)
	}
	if t.lifetimeEnd > 0 {
		consider(t.lifetimeEnd)
	}
	return due, found
}

// clientActiveLocked records that the client received bytes at now.
func (s *stream) clientActiveLocked(now time.Time) {
	if !s.times.start.IsZero() {
		s.times.quietSince = now.Sub(s.times.start)
	}
}

// upstreamActiveLocked records that the upstream's bytes were just
// forwarded, at the moment clientActiveLocked recorded.
func (s *stream) upstreamActiveLocked() {
	s.times.lastUpstream = s.times.quietSince
}

// onTimer is the request's timer callback: it acts on whatever is due and
// re-arms the timer.
func (s *stream) onTimer() {
	defer s.times.callbacks.Done()
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed || s.mode == passThrough {
		return
	}
	t := &s.times
	now := s.sinceStart()
	idle := time.Duration(s.h.IdleTimeout)
	switch {
	case s.mode == waiting:
		if idle > 0 && now >= idle {
			s.stopLocked(reasonUpstreamTimeout, now)
		}
	case t.closing != "":
		if now >= t.closingSince+s.h.eventWait() {
			// The event in flight never ended: close without adding
			// anything, which makes the client discard it.
			s.endLocked(t.closing, errGatewayClosed)
		}
	case t.lifetimeEnd > 0 && now >= t.lifetimeEnd:
		s.stopLocked(reasonMaxLifetime, now)
	case idle > 0 && now >= t.lastUpstream+idle:
		s.stopLocked(reasonIdleTimeout, now)
	case s.mode == events && s.h.Heartbeat > 0 && now >= t.quietSince+time.Duration(s.h.Heartbeat):
		s.heartbeatLocked(now)
	}
	if !s.closed {
		s.armLocked(now)
	}
}

// heartbeatLocked writes a heartbeat comment if the stream is between
// events; inside an event it tries again a heartbeat period later.
func (s *stream) heartbeatLocked(now time.Duration) {
	if !s.state.atBoundary() {
		s.times.quietSince = now
		return
	}
	if s.writeLocked(nil, s.h.heartbeatLine) {
		s.state.wroteAtBoundary()
		s.heartbeats++
		sseMetrics.heartbeats.Inc()
	}
}

// stopNow ends the request for reason from outside its timer: a drain, at
// the moment it drew for the request (streamSet.drain), or a shared
// stream's feed (share.go).
func (s *stream) stopNow(reason endReason) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed || s.mode == passThrough {
		return
	}
	now := s.sinceStart()
	s.stopLocked(reason, now)
	if !s.closed {
		s.armLocked(now) // for the wait for an event boundary
	}
}

// awaitClientClose gives the client up to grace to hang up by itself after
// the close sequence.
func (s *stream) awaitClientClose(grace time.Duration) {
	expired := make(chan struct{})
	t := s.h.clock.AfterFunc(grace, func() { close(expired) })
	defer t.Stop()
	select {
	case <-s.req.Context().Done():
	case <-expired:
	}
}
