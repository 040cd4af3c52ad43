package bench

import (
	"context"
	"fmt"
	"os"
	"strconv"
	"testing"

	"github.com/asdispatch/asdispatch/txnstore/pgtest"
)

// BenchmarkDecisions profiles the dispatch decisions figure, e.g.
// go test -run X -bench Decisions/ases=10000 -cpuprofile cpu.out ./bench/
func BenchmarkDecisions(b *testing.B) {
	for _, n := range []int{10, 10000} {
		b.Run(fmt.Sprintf("ases=%d", n), func(b *testing.B) {
			cfg := Config{ASes: n, Interest: 10 / float64(n)}
			cfg.defaults()
			_, set, pats := setup(b, &cfg, true)
			b.ResetTimer()
			for range b.N {
				f, err := decisionsFigure(context.Background(), &cfg, set, pats[:0])
				if err != nil {
					b.Fatal(err)
				}
				b.ReportMetric(f.Value, "decisions/s")
			}
		})
	}
}

// BenchmarkCatchup profiles catch-up of one AS, at 10 ASes and at 10,000
// (each interested in 0.1% of the events), e.g.
// go test -run X -bench Catchup/ases=10000 -cpuprofile cpu.out ./bench/
// CATCHUP_MAX_EVENTS, if set, is --catchup-max-events-per-txn.
func BenchmarkCatchup(b *testing.B) {
	for _, n := range []int{10, 10000} {
		b.Run(fmt.Sprintf("ases=%d", n), func(b *testing.B) {
			cfg := Config{ASes: n, CatchupEvents: 200000}
			if n > 10 {
				cfg.Interest, cfg.CatchupEvents = 0.001, 20000
			}
			if v, err := strconv.Atoi(os.Getenv("CATCHUP_MAX_EVENTS")); err == nil {
				cfg.CatchupMaxEventsPerTxn = v
			}
			cfg.defaults()
			srv, set, _ := setup(b, &cfg, n > cfg.SharedServerAbove)
			b.ResetTimer()
			for range b.N {
				r, err := catchup(context.Background(), &cfg, set, srv)
				if err != nil {
					b.Fatal(err)
				}
				b.ReportMetric(float64(cfg.CatchupEvents)/r.drain.Seconds(), "events/s")
			}
		})
	}
}

// BenchmarkEndToEnd profiles the end-to-end figure at 10 ASes, each
// interested in every event, and at 1,000 ASes, 10 of them per event, e.g.
// go test -run X -bench EndToEnd/ases=10$ -cpuprofile cpu.out ./bench/
//
// The store=postgres case runs on ASDISPATCH_TEST_POSTGRES (or the local
// server): go test -run X -bench EndToEnd/store=postgres ./bench/
func BenchmarkEndToEnd(b *testing.B) {
	cases := []struct {
		name  string
		ases  int
		store string
	}{{"ases=10", 10, StoreSQLite}, {"ases=1000", 1000, StoreSQLite}, {"store=postgres", 10, StorePostgres}}
	for _, c := range cases {
		n := c.ases
		b.Run(c.name, func(b *testing.B) {
			cfg := Config{ASes: n, Interest: 10 / float64(n), Events: 50000, Store: c.store, DSN: pgtest.DSN()}
			cfg.defaults()
			srv, set, _ := setup(b, &cfg, n > cfg.SharedServerAbove)
			for range b.N {
				r, err := endToEnd(context.Background(), &cfg, set, srv, 0, 1)
				if err != nil {
					b.Fatal(err)
				}
				b.ReportMetric(r.submitRate, "submit/s")
				b.ReportMetric(r.e2eRate, "events/s")
			}
		})
	}
}

// BenchmarkHalfLoad measures latency at a paced 15,000 events/s, 10 ASes.
func BenchmarkHalfLoad(b *testing.B) {
	cfg := Config{Events: 45000}
	cfg.defaults()
	srv, set, _ := setup(b, &cfg, false)
	for range b.N {
		r, err := endToEnd(context.Background(), &cfg, set, srv, 15000, 1)
		if err != nil {
			b.Fatal(err)
		}
		b.ReportMetric(r.p50, "p50-ms")
		b.ReportMetric(r.p99, "p99-ms")
		b.ReportMetric(r.max, "max-ms")
	}
}
