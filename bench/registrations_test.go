package bench

import (
	"context"
	"runtime"
	"testing"
	"time"
)

// BenchmarkRegistrations builds the registrations of 10,000 ASes as the
// bench does (3 user namespaces, an alias and a room namespace each) and
// reports the heap the parsed set keeps after a GC, and the build time:
//
//	go test -run '^$' -bench Registrations -benchtime 1x ./bench/
func BenchmarkRegistrations(b *testing.B) {
	for _, tc := range []struct {
		name string
		mix  []string
	}{
		{"mix=default", nil},
		{"mix=casefold", []string{MixPrefix, MixSuffix, MixAlternation, MixCasefold}},
	} {
		b.Run(tc.name, func(b *testing.B) {
			c := &Config{ASes: 10000, Namespaces: 3, Mix: tc.mix}
			c.defaults()
			var kept float64
			var took time.Duration
			for range b.N {
				var before, after runtime.MemStats
				runtime.GC()
				runtime.ReadMemStats(&before)
				t0 := time.Now()
				set, _, err := c.buildSet(func(int) string { return "http://127.0.0.1:1" }, func(int) string { return "hs" })
				took += time.Since(t0)
				if err != nil {
					b.Fatal(err)
				}
				runtime.GC()
				runtime.ReadMemStats(&after)
				kept += float64(after.HeapAlloc-before.HeapAlloc) / (1 << 20)
				runtime.KeepAlive(set)
			}
			b.ReportMetric(kept/float64(b.N), "MiB-kept")
			b.ReportMetric(took.Seconds()/float64(b.N), "s-build")
		})
	}
}

// BenchmarkStartup times a server's start at 10,000 ASes: the
// registration files read from a directory and a dispatcher ready on a
// fresh SQLite store (s-first), then on the same store again (s-restart,
// of which s-load is registry.Load; s-cpu-restart is its CPU time):
//
//	go test -run '^$' -bench Startup -benchtime 1x ./bench/
func BenchmarkStartup(b *testing.B) {
	cfg := Config{ASes: 10000}
	cfg.defaults()
	srv, err := startServers(cfg.ASes, true)
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(srv.close)
	var first, restart, load, cpu time.Duration
	for range b.N {
		r, err := startup(context.Background(), &cfg, srv)
		if err != nil {
			b.Fatal(err)
		}
		first, restart, load, cpu = first+r.first, restart+r.restart, load+r.load, cpu+r.cpu
	}
	b.ReportMetric(load.Seconds()/float64(b.N), "s-load")
	b.ReportMetric(cpu.Seconds()/float64(b.N), "s-cpu-restart")
	b.ReportMetric(first.Seconds()/float64(b.N), "s-first")
	b.ReportMetric(restart.Seconds()/float64(b.N), "s-restart")
}
