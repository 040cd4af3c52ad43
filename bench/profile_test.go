package bench

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"runtime/pprof"
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
			cfg.profile = phaseProfile(b)
			b.ResetTimer()
			for range b.N {
				r, err := catchup(context.Background(), &cfg, set, srv)
				if err != nil {
					b.Fatal(err)
				}
				b.ReportMetric(float64(cfg.CatchupEvents)/r.drain.Seconds(), "events/s")
				b.ReportMetric(float64(r.drainCPU.Nanoseconds())/float64(cfg.CatchupEvents), "cpu-ns/event")
			}
		})
	}
}

// BenchmarkEndToEnd profiles the end-to-end figure at 10 ASes, each
// interested in every event, and at 1,000 and 10,000 ASes, 10 of them per
// event, e.g.
// go test -run X -bench EndToEnd/ases=10$ -cpuprofile cpu.out ./bench/
//
// The store=postgres case runs on ASDISPATCH_TEST_POSTGRES (or the local
// server): go test -run X -bench EndToEnd/store=postgres ./bench/
func BenchmarkEndToEnd(b *testing.B) {
	cases := []struct {
		name   string
		ases   int
		events int
		store  string
	}{
		{"ases=10", 10, 50000, StoreSQLite},
		{"ases=1000", 1000, 50000, StoreSQLite},
		{"ases=10000", 10000, 20000, StoreSQLite},
		{"store=postgres", 10, 50000, StorePostgres},
	}
	for _, c := range cases {
		n := c.ases
		b.Run(c.name, func(b *testing.B) {
			cfg := Config{ASes: n, Interest: 10 / float64(n), Events: c.events, Store: c.store, DSN: pgtest.DSN()}
			cfg.defaults()
			srv, set, _ := setup(b, &cfg, n > cfg.SharedServerAbove)
			cfg.profile = phaseProfile(b)
			for range b.N {
				cpu0 := cpuTime()
				r, err := endToEnd(context.Background(), &cfg, set, srv, 0, 1)
				if err != nil {
					b.Fatal(err)
				}
				// On a shared machine the CPU an event costs is steadier
				// than the rates.
				b.ReportMetric(float64((cpuTime()-cpu0).Microseconds())/float64(cfg.Events), "cpu-µs/event")
				b.ReportMetric(r.submitRate, "submit/s")
				b.ReportMetric(r.e2eRate, "events/s")
				b.ReportMetric(float64(r.txns), "txns")
			}
		})
	}
}

// BenchmarkHalfLoad measures latency at a paced rate: 15,000 events/s to
// 10 ASes, 1,000 events/s to 10,000 ASes, 10 of them per event.
func BenchmarkHalfLoad(b *testing.B) {
	cases := []struct {
		ases, events int
		rate         float64
	}{{10, 45000, 15000}, {10000, 10000, 1000}}
	for _, c := range cases {
		b.Run(fmt.Sprintf("ases=%d", c.ases), func(b *testing.B) {
			cfg := Config{ASes: c.ases, Interest: 10 / float64(c.ases), Events: c.events}
			cfg.defaults()
			srv, set, _ := setup(b, &cfg, c.ases > cfg.SharedServerAbove)
			cfg.profile = phaseProfile(b)
			for range b.N {
				r, err := endToEnd(context.Background(), &cfg, set, srv, c.rate, 1)
				if err != nil {
					b.Fatal(err)
				}
				b.ReportMetric(r.p50, "p50-ms")
				b.ReportMetric(r.p99, "p99-ms")
				b.ReportMetric(r.max, "max-ms")
				b.ReportMetric(float64(r.txns), "txns")
			}
		})
	}
}

// phaseProfile profiles the end-to-end phase alone (the setup of 10,000
// registrations would swamp it) when ASDISPATCH_BENCH_PROFILE names a
// directory: cpu.out, block.out, mutex.out and heap.out (written as the
// phase ends, its dispatcher still open; inuse_space is as of the last
// GC), e.g.
// ASDISPATCH_BENCH_PROFILE=/tmp/p go test -run X -bench EndToEnd/ases=10000 ./bench/
func phaseProfile(b *testing.B) func() func() {
	dir := os.Getenv("ASDISPATCH_BENCH_PROFILE")
	if dir == "" {
		return nil
	}
	return func() func() {
		f, err := os.Create(filepath.Join(dir, "cpu.out"))
		if err != nil {
			b.Fatal(err)
		}
		if err := pprof.StartCPUProfile(f); err != nil {
			b.Fatal(err)
		}
		runtime.SetBlockProfileRate(10000) // ns
		runtime.SetMutexProfileFraction(10)
		return func() {
			pprof.StopCPUProfile()
			f.Close()
			for _, name := range []string{"block", "mutex", "heap"} {
				w, err := os.Create(filepath.Join(dir, name+".out"))
				if err != nil {
					b.Fatal(err)
				}
				if err := pprof.Lookup(name).WriteTo(w, 0); err != nil {
					b.Fatal(err)
				}
				w.Close()
			}
			runtime.SetBlockProfileRate(0)
			runtime.SetMutexProfileFraction(0)
		}
	}
}
