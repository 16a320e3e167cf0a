package caddysse

import (
	"errors"
	"sync"

	"github.com/prometheus/client_golang/prometheus"
)

// sseMetrics are the module's Prometheus collectors. They are shared by all
// handlers and configs of the process, so counters stay monotonic across
// reloads, and registered with each config's registry, which is what Caddy's
// metrics endpoints serve. Labels are a closed set: no URL, host or client.
var sseMetrics = struct {
	once       sync.Once
	active     prometheus.Gauge
	ended      *prometheus.CounterVec
	refused    *prometheus.CounterVec
	events     prometheus.Counter
	bytes      prometheus.Counter
	heartbeats prometheus.Counter
	duration   prometheus.Histogram
	teardown   prometheus.Histogram
	quirks     *prometheus.CounterVec

	// Shared streams (share.go).
	hubs         prometheus.Gauge
	subscribers  prometheus.Gauge
	reconnects   prometheus.Counter
	replayed     prometheus.Counter
	replayMisses prometheus.Counter
	slowDrops    prometheus.Counter
	unshared     *prometheus.CounterVec

	// Stores that share streams among a fleet of gateways (fleet.go).
	leasesHeld     prometheus.Gauge
	leasesTaken    prometheus.Counter
	storePublished prometheus.Counter
	storeConsumed  prometheus.Counter
	storeErrors    prometheus.Counter
}{}

func initMetrics(registry *prometheus.Registry) error {
	const ns, sub = "caddy", "sse"
	m := &sseMetrics
	m.once.Do(func() {
		m.active = prometheus.NewGauge(prometheus.GaugeOpts{
			Namespace: ns, Subsystem: sub, Name: "streams_active",
			Help: "Event streams currently open through the sse handler.",
		})
		m.ended = prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: ns, Subsystem: sub, Name: "streams_ended_total",
			Help: "Event streams ended, by reason.",
		}, []string{"reason"})
		m.refused = prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: ns, Subsystem: sub, Name: "streams_refused_total",
			Help: "Requests turned away instead of being served a stream, by reason (max_streams, max_streams_per_client, upstream_timeout, drain).",
		}, []string{"reason"})
		m.events = prometheus.NewCounter(prometheus.CounterOpts{
			Namespace: ns, Subsystem: sub, Name: "events_total",
			Help: "Events forwarded from upstreams to clients.",
		})
		m.bytes = prometheus.NewCounter(prometheus.CounterOpts{
			Namespace: ns, Subsystem: sub, Name: "bytes_total",
			Help: "Bytes written to clients on event streams, heartbeats and close sequences included.",
		})
		m.heartbeats = prometheus.NewCounter(prometheus.CounterOpts{
			Namespace: ns, Subsystem: sub, Name: "heartbeats_total",
			Help: "Heartbeat comments written to clients.",
		})
		m.duration = prometheus.NewHistogram(prometheus.HistogramOpts{
			Namespace: ns, Subsystem: sub, Name: "stream_duration_seconds",
			Help:    "How long event streams lasted.",
			Buckets: prometheus.ExponentialBuckets(1, 4, 10), // 1s to ~3d
		})
		m.teardown = prometheus.NewHistogram(prometheus.HistogramOpts{
			Namespace: ns, Subsystem: sub, Name: "teardown_seconds",
			Help:    "Time from the client being gone to the upstream request being released.",
			Buckets: prometheus.ExponentialBuckets(0.0001, 4, 10), // 100µs to ~26s
		})
		m.quirks = prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: ns, Subsystem: sub, Name: "upstream_quirks_total",
			Help: "Streams whose upstream showed a legacy server's quirk (content_type_params, content_length, id_control_chars, buffered).",
		}, []string{"quirk"})
		m.hubs = prometheus.NewGauge(prometheus.GaugeOpts{
			Namespace: ns, Subsystem: sub, Name: "shared_upstreams_open",
			Help: "Shared streams (share) with an upstream request open or being retried.",
		})
		m.subscribers = prometheus.NewGauge(prometheus.GaugeOpts{
			Namespace: ns, Subsystem: sub, Name: "shared_subscribers",
			Help: "Clients of shared streams.",
		})
		m.reconnects = prometheus.NewCounter(prometheus.CounterOpts{
			Namespace: ns, Subsystem: sub, Name: "shared_upstream_reconnects_total",
			Help: "Times a shared stream asked its upstream again after it ended or broke.",
		})
		m.replayed = prometheus.NewCounter(prometheus.CounterOpts{
			Namespace: ns, Subsystem: sub, Name: "shared_replayed_events_total",
			Help: "Events replayed to clients of shared streams that came back with Last-Event-ID.",
		})
		m.replayMisses = prometheus.NewCounter(prometheus.CounterOpts{
			Namespace: ns, Subsystem: sub, Name: "shared_replay_misses_total",
			Help: "Clients of shared streams whose Last-Event-ID was not among the kept events.",
		})
		m.slowDrops = prometheus.NewCounter(prometheus.CounterOpts{
			Namespace: ns, Subsystem: sub, Name: "shared_slow_drops_total",
			Help: "Clients of shared streams closed for falling more than max_backlog behind.",
		})
		m.unshared = prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: ns, Subsystem: sub, Name: "shared_unshared_total",
			Help: "Requests of shared routes that got an upstream request of their own, by reason (key_unknown, per_user_response, not_a_stream).",
		}, []string{"reason"})
		m.leasesHeld = prometheus.NewGauge(prometheus.GaugeOpts{
			Namespace: ns, Subsystem: sub, Name: "store_leases_held",
			Help: "Shared streams whose upstream lease this gateway holds in the fleet's store.",
		})
		m.leasesTaken = prometheus.NewCounter(prometheus.CounterOpts{
			Namespace: ns, Subsystem: sub, Name: "store_lease_changes_total",
			Help: "Times this gateway took a shared stream's upstream lease in the fleet's store.",
		})
		m.storePublished = prometheus.NewCounter(prometheus.CounterOpts{
			Namespace: ns, Subsystem: sub, Name: "store_events_published_total",
			Help: "Events this gateway's upstream requests appended to the fleet's store.",
		})
		m.storeConsumed = prometheus.NewCounter(prometheus.CounterOpts{
			Namespace: ns, Subsystem: sub, Name: "store_events_consumed_total",
			Help: "Events this gateway read from the fleet's store for its clients.",
		})
		m.storeErrors = prometheus.NewCounter(prometheus.CounterOpts{
			Namespace: ns, Subsystem: sub, Name: "store_errors_total",
			Help: "Times the fleet's store failed or could not be reached; the shared stream went on with an upstream request of this gateway's own.",
		})
		for _, r := range unsharedReasons {
			m.unshared.WithLabelValues(string(r))
		}
		for _, q := range allQuirks {
			m.quirks.WithLabelValues(string(q))
		}
		// Every reason appears from the start, so rates work before the first end.
		for _, r := range streamEndReasons {
			m.ended.WithLabelValues(string(r))
		}
		for _, r := range refusalReasons {
			m.refused.WithLabelValues(string(r))
		}
	})
	for _, c := range []prometheus.Collector{m.active, m.ended, m.refused, m.events, m.bytes, m.heartbeats, m.duration, m.teardown, m.quirks,
		m.hubs, m.subscribers, m.reconnects, m.replayed, m.replayMisses, m.slowDrops, m.unshared,
		m.leasesHeld, m.leasesTaken, m.storePublished, m.storeConsumed, m.storeErrors} {
		var already prometheus.AlreadyRegisteredError
		if err := registry.Register(c); err != nil && !errors.As(err, &already) {
			return err
		}
	}
	return nil
}
