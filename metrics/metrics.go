// Package metrics holds asdispatch's Prometheus metrics. A homeserver passes
// its own prometheus.Registerer to New and hands the result to the
// dispatcher, queues and queries; a nil *Metrics records nothing.
package metrics

import (
	"context"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// Metrics are the collectors, labelled by appservice where it applies.
type Metrics struct {
	txnsSent     *prometheus.CounterVec
	txnsFailed   *prometheus.CounterVec
	itemsSent    *prometheus.CounterVec
	dropped      *prometheus.CounterVec
	txnLatency   *prometheus.HistogramVec
	up           *prometheus.GaugeVec
	failures     *prometheus.GaugeVec
	queries      *prometheus.CounterVec
	queryLatency *prometheus.HistogramVec
	submitted    *prometheus.CounterVec
	deliveries   prometheus.Counter
	reg          prometheus.Registerer

	wsOnce sync.Once
	wsm    *wsMetrics
}

// New creates the metrics and registers them with reg.
func New(reg prometheus.Registerer) *Metrics {
	as := []string{"appservice"}
	m := &Metrics{
		reg: reg,
		txnsSent: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "asdispatch_transactions_sent_total",
			Help: "Transactions the appservice accepted."}, as),
		txnsFailed: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "asdispatch_transactions_failed_total",
			Help: "Failed transaction attempts (each retry counts)."}, as),
		itemsSent: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "asdispatch_items_sent_total",
			Help: "Items delivered, by kind (event, ephemeral, to_device)."}, []string{"appservice", "kind"}),
		dropped: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "asdispatch_items_dropped_total",
			Help: "Single items the appservice refused as too large (413) and that were dropped."}, as),
		txnLatency: prometheus.NewHistogramVec(prometheus.HistogramOpts{Name: "asdispatch_transaction_duration_seconds",
			Help: "Time for the appservice to accept a transaction.", Buckets: prometheus.ExponentialBuckets(0.001, 4, 9)}, as),
		up: prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: "asdispatch_appservice_up",
			Help: "1 while the appservice accepts transactions, 0 while it is down."}, as),
		failures: prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: "asdispatch_appservice_consecutive_failures",
			Help: "Failed attempts since the last success."}, as),
		queries: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "asdispatch_queries_total",
			Help: "User and alias queries to appservices, by outcome (found, not_found, error)."}, []string{"appservice", "kind", "outcome"}),
		queryLatency: prometheus.NewHistogramVec(prometheus.HistogramOpts{Name: "asdispatch_query_duration_seconds",
			Help: "Time an appservice took to answer a query.", Buckets: prometheus.ExponentialBuckets(0.001, 4, 8)}, []string{"kind"}),
		submitted: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "asdispatch_submitted_total",
			Help: "Items the homeserver submitted that some appservice wanted, by kind."}, []string{"kind"}),
		deliveries: prometheus.NewCounter(prometheus.CounterOpts{Name: "asdispatch_queued_deliveries_total",
			Help: "Item deliveries queued (one per interested appservice)."}),
	}
	reg.MustRegister(m.txnsSent, m.txnsFailed, m.itemsSent, m.dropped, m.txnLatency, m.up, m.failures,
		m.queries, m.queryLatency, m.submitted, m.deliveries)
	return m
}

// TxnSent records an accepted transaction and its items by kind.
func (m *Metrics) TxnSent(as string, took time.Duration, events, ephemeral, toDevice int) {
	if m == nil {
		return
	}
	m.txnsSent.WithLabelValues(as).Inc()
	m.txnLatency.WithLabelValues(as).Observe(took.Seconds())
	m.itemsSent.WithLabelValues(as, "event").Add(float64(events))
	m.itemsSent.WithLabelValues(as, "ephemeral").Add(float64(ephemeral))
	m.itemsSent.WithLabelValues(as, "to_device").Add(float64(toDevice))
}

// TxnFailed records a failed attempt.
func (m *Metrics) TxnFailed(as string) {
	if m != nil {
		m.txnsFailed.WithLabelValues(as).Inc()
	}
}

// Dropped records an item dropped as too large.
func (m *Metrics) Dropped(as string, n int) {
	if m != nil {
		m.dropped.WithLabelValues(as).Add(float64(n))
	}
}

// State records whether the AS is up and its consecutive failures.
func (m *Metrics) State(as string, up bool, failures int) {
	if m == nil {
		return
	}
	v := 0.0
	if up {
		v = 1
	}
	m.up.WithLabelValues(as).Set(v)
	m.failures.WithLabelValues(as).Set(float64(failures))
}

// Query records one query to one AS; outcome is found, not_found or error.
func (m *Metrics) Query(as, kind, outcome string, took time.Duration) {
	if m == nil {
		return
	}
	m.queries.WithLabelValues(as, kind, outcome).Inc()
	m.queryLatency.WithLabelValues(kind).Observe(took.Seconds())
}

// Submitted records items queued for n deliveries in all.
func (m *Metrics) Submitted(kind string, items, deliveries int) {
	if m == nil {
		return
	}
	m.submitted.WithLabelValues(kind).Add(float64(items))
	m.deliveries.Add(float64(deliveries))
}

// Backlog is one AS's queue as the store sees it.
type Backlog struct {
	AS            string
	Events        int64
	Txns          int
	OldestPending time.Time
}

// WatchBacklog registers gauges of every AS's backlog, read from the store
// at scrape time only (nothing on the hot path).
func (m *Metrics) WatchBacklog(read func(context.Context) ([]Backlog, error)) {
	if m != nil {
		m.reg.MustRegister(&backlogCollector{read: read})
	}
}

var (
	backlogEvents = prometheus.NewDesc("asdispatch_backlog_events", "Items queued for the appservice and not yet accepted.", []string{"appservice"}, nil)
	backlogTxns   = prometheus.NewDesc("asdispatch_backlog_transactions", "Frozen transactions not yet accepted.", []string{"appservice"}, nil)
	oldestAge     = prometheus.NewDesc("asdispatch_oldest_pending_age_seconds", "Age of the oldest item not yet accepted (0 if none).", []string{"appservice"}, nil)
)

type backlogCollector struct {
	read func(context.Context) ([]Backlog, error)
}

func (c *backlogCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- backlogEvents
	ch <- backlogTxns
	ch <- oldestAge
}

func (c *backlogCollector) Collect(ch chan<- prometheus.Metric) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	rows, err := c.read(ctx)
	if err != nil {
		ch <- prometheus.NewInvalidMetric(backlogEvents, err)
		return
	}
	now := time.Now()
	for _, r := range rows {
		age := 0.0
		if !r.OldestPending.IsZero() {
			age = now.Sub(r.OldestPending).Seconds()
		}
		ch <- prometheus.MustNewConstMetric(backlogEvents, prometheus.GaugeValue, float64(r.Events), r.AS)
		ch <- prometheus.MustNewConstMetric(backlogTxns, prometheus.GaugeValue, float64(r.Txns), r.AS)
		ch <- prometheus.MustNewConstMetric(oldestAge, prometheus.GaugeValue, age, r.AS)
	}
}

// wsMetrics count appservice websocket traffic; created on first use so
// that a homeserver without websockets exports none.
type wsMetrics struct {
	frames, acks, connects *prometheus.CounterVec
	connected              *prometheus.GaugeVec
}

func (m *Metrics) ws() *wsMetrics {
	m.wsOnce.Do(func() {
		as := []string{"appservice"}
		w := &wsMetrics{
			frames: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "asdispatch_websocket_frames_total",
				Help: "Appservice websocket frames, by direction (in: from the bridge, out: to it)."}, []string{"appservice", "direction"}),
			acks: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "asdispatch_websocket_acks_total",
				Help: "Transactions the bridge acknowledged over its websocket."}, as),
			connects: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "asdispatch_websocket_connections_total",
				Help: "Appservice websockets accepted; more than one per AS counts reconnects and replacements."}, as),
			connected: prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: "asdispatch_websocket_connected",
				Help: "1 while the appservice has a websocket open."}, as),
		}
		m.reg.MustRegister(w.frames, w.acks, w.connects, w.connected)
		m.wsm = w
	})
	return m.wsm
}

// WSFrame records one websocket frame; direction is in or out.
func (m *Metrics) WSFrame(as, direction string) {
	if m != nil {
		m.ws().frames.WithLabelValues(as, direction).Inc()
	}
}

// WSAck records a transaction acknowledged over a websocket.
func (m *Metrics) WSAck(as string) {
	if m != nil {
		m.ws().acks.WithLabelValues(as).Inc()
	}
}

// WSConnect records an accepted websocket.
func (m *Metrics) WSConnect(as string) {
	if m != nil {
		m.ws().connects.WithLabelValues(as).Inc()
	}
}

// WSConnected records whether the AS has a websocket open.
func (m *Metrics) WSConnected(as string, open bool) {
	if m == nil {
		return
	}
	v := 0.0
	if open {
		v = 1
	}
	m.ws().connected.WithLabelValues(as).Set(v)
}
