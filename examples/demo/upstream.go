package main

import (
	"context"
	"encoding/json"
	"fmt"
	"log"
	"net/http"
	"sort"
	"strconv"
	"sync"
	"time"
)

// legacyUpstream is a deliberately old-fashioned SSE server, in the spirit of
// the classic Node.js example: it pushes a numbered event every interval,
// starts counting at 1 on every connection unless it was asked to honour
// Last-Event-ID, never sends a heartbeat, a retry hint or an end of stream,
// and only learns that a client left when its request context ends.
//
// /shared/events is the same stream without ids: the gateway shares it
// among its clients and numbers the events itself (see the Caddyfile). A
// legacy server's per-connection ids would start again at 1 after every
// reconnect and collide with the ones the gateway already passed on.
//
// It also serves the demo page and a small JSON view of its own state
// (/demo/stats), which is how the page can show what the upstream sees, and
// can pretend to restart (/demo/restart): it drops every connection and
// answers 503 for a moment.
type legacyUpstream struct {
	// interval is the time between two numbered events.
	interval time.Duration
	// honourLastEventID makes every stream resume after the Last-Event-ID
	// the client sent, like a well-behaved server would. A request can also
	// ask for it with the query parameter resume=1.
	honourLastEventID bool
	// stopping ends when the demo shuts down; streams watch it so that a
	// shutdown does not wait for clients that never leave.
	stopping context.Context
	logger   *log.Logger

	mu                sync.Mutex
	nextConnID        int
	open              map[int]*upstreamConn
	totalOpened       int
	totalOpenedShared int
	quietUntil        time.Time
	restartingUntil   time.Time
}

// upstreamConn describes one stream the upstream is serving.
type upstreamConn struct {
	ID int `json:"id"`
	// Client is the label the page puts in the query (eventsource or raw),
	// so that the two connections a tab opens can be told apart.
	Client string `json:"client"`
	// Path is /events or /shared/events.
	Path string `json:"path"`
	// LastEventID is the Last-Event-ID header as the upstream received it.
	LastEventID string    `json:"last_event_id"`
	Honoured    bool      `json:"honoured"`
	OpenedAt    time.Time `json:"opened_at"`
	EventsSent  int       `json:"events_sent"`
	LastSentID  int       `json:"last_sent_id"`

	// resumeAfter is the id after which the stream starts counting.
	resumeAfter int
	// drop ends the stream, for a restart.
	drop context.CancelFunc
}

// upstreamStats is the body of /demo/stats.
type upstreamStats struct {
	Open              int            `json:"open"`
	TotalOpened       int            `json:"total_opened"`
	OpenShared        int            `json:"open_shared"`
	TotalOpenedShared int            `json:"total_opened_shared"`
	HonourLastEventID bool           `json:"honour_last_event_id"`
	QuietForMillis    int64          `json:"quiet_for_ms"`
	RestartingForMs   int64          `json:"restarting_for_ms"`
	Connections       []upstreamConn `json:"connections"`
}

// tickEvent is the data of every numbered event. It carries what the
// upstream received on this connection, so a client can see the
// Last-Event-ID that reached the upstream through the gateway.
type tickEvent struct {
	N           int    `json:"n"`
	Conn        int    `json:"conn"`
	LastEventID string `json:"last_event_id"`
	Honoured    bool   `json:"honoured"`
}

func newLegacyUpstream(stopping context.Context, interval time.Duration, honour bool, logger *log.Logger) *legacyUpstream {
	return &legacyUpstream{
		interval:          interval,
		honourLastEventID: honour,
		stopping:          stopping,
		logger:            logger,
		open:              make(map[int]*upstreamConn),
	}
}

// handler routes the upstream's endpoints; page is the demo page's HTML.
func (u *legacyUpstream) handler(page []byte) http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /{$}", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/html; charset=utf-8")
		w.Header().Set("Cache-Control", "no-store")
		_, _ = w.Write(page)
	})
	mux.HandleFunc("GET /events", func(w http.ResponseWriter, r *http.Request) { u.serveEvents(w, r, true) })
	mux.HandleFunc("GET /shared/events", func(w http.ResponseWriter, r *http.Request) { u.serveEvents(w, r, false) })
	mux.HandleFunc("GET /demo/stats", u.serveStats)
	mux.HandleFunc("POST /demo/quiet", u.serveQuiet)
	mux.HandleFunc("POST /demo/restart", u.serveRestart)
	return mux
}

// serveEvents is the legacy stream: headers, then a numbered event every
// interval, for as long as the connection lives. withIDs puts the number in
// an id line too.
func (u *legacyUpstream) serveEvents(w http.ResponseWriter, r *http.Request, withIDs bool) {
	if u.isRestarting() {
		// What a server that is coming back up answers (through the
		// gateway: a refusal the browser survives).
		http.Error(w, "restarting", http.StatusServiceUnavailable)
		return
	}
	ctx, drop := context.WithCancel(r.Context())
	defer drop()
	conn := u.register(r, drop)
	reason := "stream ended"
	defer func() { u.unregister(conn, reason) }()

	// A legacy server sets the content type and nothing else: no
	// Cache-Control, no retry hint, no heartbeat.
	w.Header().Set("Content-Type", "text/event-stream")
	w.WriteHeader(http.StatusOK)
	rc := http.NewResponseController(w)
	if err := rc.Flush(); err != nil {
		reason = "noticed it is gone: flush failed: " + err.Error()
		return
	}

	// A legacy server counts from 1 on every connection; an honouring one
	// continues after the id the client last saw.
	next := conn.resumeAfter + 1
	ticker := time.NewTicker(u.interval)
	defer ticker.Stop()
	for {
		select {
		case <-u.stopping.Done():
			reason = "upstream shutting down"
			return
		case <-ctx.Done():
			reason = "noticed it is gone: request context ended"
			if r.Context().Err() == nil {
				reason = "dropped by the restart"
			}
			return
		case <-ticker.C:
		}
		if u.isQuiet() {
			continue
		}
		data, _ := json.Marshal(tickEvent{N: next, Conn: conn.ID, LastEventID: conn.LastEventID, Honoured: conn.Honoured})
		idLine := ""
		if withIDs {
			idLine = fmt.Sprintf("id: %d\n", next)
		}
		if _, err := fmt.Fprintf(w, "%sdata: %s\n\n", idLine, data); err != nil {
			reason = "noticed it is gone: write failed: " + err.Error()
			return
		}
		if err := rc.Flush(); err != nil {
			reason = "noticed it is gone: flush failed: " + err.Error()
			return
		}
		u.mu.Lock()
		conn.EventsSent++
		conn.LastSentID = next
		u.mu.Unlock()
		next++
	}
}

// register counts a new stream and logs it.
func (u *legacyUpstream) register(r *http.Request, drop context.CancelFunc) *upstreamConn {
	lastEventID := r.Header.Get("Last-Event-ID")
	lastSeen, numeric := atoi(lastEventID)
	client := r.URL.Query().Get("client")
	if client == "" {
		client = "unlabelled"
	}
	honour := (u.honourLastEventID || r.URL.Query().Get("resume") == "1") && numeric

	u.mu.Lock()
	u.nextConnID++
	u.totalOpened++
	if r.URL.Path == "/shared/events" {
		u.totalOpenedShared++
	}
	conn := &upstreamConn{
		ID:          u.nextConnID,
		Client:      client,
		Path:        r.URL.Path,
		drop:        drop,
		LastEventID: lastEventID,
		Honoured:    honour,
		OpenedAt:    time.Now(),
	}
	if honour {
		conn.resumeAfter = lastSeen
	}
	u.open[conn.ID] = conn
	open := len(u.open)
	u.mu.Unlock()

	treatment := "ignored, counting from 1"
	switch {
	case lastEventID == "":
		treatment = "none sent"
	case honour:
		treatment = "honoured, resuming after it"
	}
	u.logger.Printf("upstream: connection #%d opened (%s, client=%s, from %s, Last-Event-ID=%q: %s); open connections: %d",
		conn.ID, r.URL.Path, client, r.RemoteAddr, lastEventID, treatment, open)
	return conn
}

// unregister forgets a stream and logs how it ended.
func (u *legacyUpstream) unregister(conn *upstreamConn, reason string) {
	u.mu.Lock()
	delete(u.open, conn.ID)
	open := len(u.open)
	sent := conn.EventsSent
	u.mu.Unlock()
	u.logger.Printf("upstream: connection #%d closed after %s, %d events sent (%s); open connections: %d",
		conn.ID, time.Since(conn.OpenedAt).Round(100*time.Millisecond), sent, reason, open)
}

func (u *legacyUpstream) isQuiet() bool {
	u.mu.Lock()
	defer u.mu.Unlock()
	return time.Now().Before(u.quietUntil)
}

// serveQuiet makes every stream go silent (connection open, nothing sent)
// for the duration in the query parameter "for" (default 10s), which is what
// lets the page show heartbeats and the idle timeout.
func (u *legacyUpstream) serveQuiet(w http.ResponseWriter, r *http.Request) {
	quietFor := 10 * time.Second
	if v := r.URL.Query().Get("for"); v != "" {
		d, err := time.ParseDuration(v)
		if err != nil || d < 0 || d > time.Minute {
			http.Error(w, "for must be a duration between 0 and 1m", http.StatusBadRequest)
			return
		}
		quietFor = d
	}
	u.mu.Lock()
	u.quietUntil = time.Now().Add(quietFor)
	u.mu.Unlock()
	u.logger.Printf("upstream: going quiet for %s (connections stay open, nothing is sent)", quietFor)
	u.serveStats(w, r)
}

func (u *legacyUpstream) isRestarting() bool {
	u.mu.Lock()
	defer u.mu.Unlock()
	return time.Now().Before(u.restartingUntil)
}

// serveRestart plays a restart of the legacy server: every open stream is
// dropped, and for the duration in the query parameter "for" (default 3s)
// new streams get 503.
func (u *legacyUpstream) serveRestart(w http.ResponseWriter, r *http.Request) {
	downFor := 3 * time.Second
	if v := r.URL.Query().Get("for"); v != "" {
		d, err := time.ParseDuration(v)
		if err != nil || d < 0 || d > 10*time.Second {
			http.Error(w, "for must be a duration between 0 and 10s", http.StatusBadRequest)
			return
		}
		downFor = d
	}
	u.mu.Lock()
	u.restartingUntil = time.Now().Add(downFor)
	for _, c := range u.open {
		c.drop()
	}
	u.mu.Unlock()
	u.logger.Printf("upstream: restarting: dropping every connection, answering 503 for %s", downFor)
	u.serveStats(w, r)
}

func (u *legacyUpstream) serveStats(w http.ResponseWriter, _ *http.Request) {
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Cache-Control", "no-store")
	_ = json.NewEncoder(w).Encode(u.stats())
}

func (u *legacyUpstream) stats() upstreamStats {
	u.mu.Lock()
	defer u.mu.Unlock()
	s := upstreamStats{
		Open:              len(u.open),
		TotalOpened:       u.totalOpened,
		HonourLastEventID: u.honourLastEventID,
		Connections:       make([]upstreamConn, 0, len(u.open)),
	}
	if quiet := time.Until(u.quietUntil); quiet > 0 {
		s.QuietForMillis = quiet.Milliseconds()
	}
	if down := time.Until(u.restartingUntil); down > 0 {
		s.RestartingForMs = down.Milliseconds()
	}
	s.TotalOpenedShared = u.totalOpenedShared
	for _, c := range u.open {
		if c.Path == "/shared/events" {
			s.OpenShared++
		}
		s.Connections = append(s.Connections, *c)
	}
	sort.Slice(s.Connections, func(i, j int) bool { return s.Connections[i].ID < s.Connections[j].ID })
	return s
}

// atoi parses a non-negative event id; ok is false for anything else.
func atoi(s string) (n int, ok bool) {
	n, err := strconv.Atoi(s)
	return n, err == nil && n >= 0
}
