package queue

import (
	"runtime"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// TestReadsBound checks that reads run at most max at a time, all of them,
// in the order they came, and leave no goroutine behind.
func TestReadsBound(t *testing.T) {
	for _, tc := range []struct{ max, n int }{{1, 50}, {4, 1000}, {64, 200}} {
		r := &reads{max: tc.max}
		before := runtime.NumGoroutine()
		var running, peak atomic.Int64
		var mu sync.Mutex
		var order []int
		var wg sync.WaitGroup
		release := make(chan struct{})
		for i := range tc.n {
			wg.Add(1)
			r.do(func() {
				defer wg.Done()
				n := running.Add(1)
				for p := peak.Load(); n > p && !peak.CompareAndSwap(p, n); p = peak.Load() {
				}
				<-release
				mu.Lock()
				order = append(order, i)
				mu.Unlock()
				running.Add(-1)
			})
		}
		if g := runtime.NumGoroutine() - before; g > tc.max {
			t.Errorf("max %d: %d goroutines for %d reads waiting", tc.max, g, tc.n)
		}
		close(release)
		wg.Wait()
		if p := peak.Load(); p > int64(tc.max) {
			t.Errorf("max %d: %d reads ran at once", tc.max, p)
		}
		if len(order) != tc.n {
			t.Fatalf("max %d: %d of %d reads ran", tc.max, len(order), tc.n)
		}
		if tc.max == 1 {
			for i, v := range order {
				if v != i {
					t.Fatalf("max 1: read %d ran %dth", v, i)
				}
			}
		}
		// The last goroutines end just after their read.
		drained := func() bool {
			r.mu.Lock()
			defer r.mu.Unlock()
			return r.running == 0 && r.waiting == nil
		}
		deadline := time.Now().Add(5 * time.Second)
		for (!drained() || runtime.NumGoroutine() > before) && time.Now().Before(deadline) {
			time.Sleep(time.Millisecond)
		}
		if !drained() {
			t.Errorf("max %d: reads still running or waiting once every read ran", tc.max)
		}
		if g := runtime.NumGoroutine() - before; g > 0 {
			t.Errorf("max %d: %d goroutines left once every read ran", tc.max, g)
		}
	}
}

// TestReadsSteadyLoad: under a load that never lets the FIFO drain, its
// array stays bounded by what waits, not by every read since it was
// last empty.
func TestReadsSteadyLoad(t *testing.T) {
	r := &reads{max: 1}
	const waiting, total = 100, 50000
	var wg sync.WaitGroup
	release := make(chan struct{})
	n, longest := 0, 0
	var read func()
	read = func() {
		defer wg.Done()
		<-release
		r.mu.Lock()
		longest = max(longest, len(r.waiting))
		r.mu.Unlock()
		if n++; n+waiting <= total {
			wg.Add(1)
			r.do(read) // one in for one out: never drained
		}
	}
	for range waiting {
		wg.Add(1)
		r.do(read)
	}
	close(release)
	wg.Wait()
	if n != total {
		t.Fatalf("%d reads ran, want %d", n, total)
	}
	if longest > 2*compactReads+waiting {
		t.Errorf("the FIFO's array reached %d slots for %d waiting reads", longest, waiting)
	}
}
