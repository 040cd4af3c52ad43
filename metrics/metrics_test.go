package metrics

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
)

func TestNilRecordsNothing(t *testing.T) {
	var m *Metrics
	m.TxnSent("a", time.Second, 1, 2, 3)
	m.TxnFailed("a")
	m.Dropped("a", 1)
	m.State("a", true, 0)
	m.Query("a", "user", "found", time.Millisecond)
	m.Submitted("event", 1, 2)
	m.WatchBacklog(nil)
}

func TestRecords(t *testing.T) {
	reg := prometheus.NewRegistry()
	m := New(reg)
	m.TxnSent("a", 10*time.Millisecond, 3, 1, 0)
	m.State("a", false, 4)
	m.WatchBacklog(func(context.Context) ([]Backlog, error) {
		return []Backlog{{AS: "a", Events: 5, Txns: 1, OldestPending: time.Now().Add(-time.Minute)}}, nil
	})
	tests := []struct {
		c    prometheus.Collector
		want float64
	}{
		{m.txnsSent.WithLabelValues("a"), 1},
		{m.itemsSent.WithLabelValues("a", "event"), 3},
		{m.itemsSent.WithLabelValues("a", "ephemeral"), 1},
		{m.up.WithLabelValues("a"), 0},
		{m.failures.WithLabelValues("a"), 4},
	}
	for i, tt := range tests {
		if got := testutil.ToFloat64(tt.c); got != tt.want {
			t.Errorf("%d: got %v, want %v", i, got, tt.want)
		}
	}
	if n, err := testutil.GatherAndCount(reg, "asdispatch_backlog_events", "asdispatch_oldest_pending_age_seconds"); err != nil || n != 2 {
		t.Errorf("backlog gauges: %d, %v", n, err)
	}

	bad := prometheus.NewRegistry()
	New(bad).WatchBacklog(func(context.Context) ([]Backlog, error) { return nil, errors.New("store gone") })
	if _, err := bad.Gather(); err == nil {
		t.Error("a failing backlog read is not reported to the scraper")
	}
}
