package queue

import (
	"context"
	"fmt"
	"path/filepath"
	"runtime"
	"testing"
	"time"

	"go.uber.org/zap"

	"github.com/asdispatch/asdispatch/txnstore"
)

// settledGoroutines returns the goroutine count once it has stopped
// changing for a while.
func settledGoroutines() int {
	n, stable := runtime.NumGoroutine(), 0
	for deadline := time.Now().Add(10 * time.Second); stable < 10 && time.Now().Before(deadline); {
		time.Sleep(10 * time.Millisecond)
		if m := runtime.NumGoroutine(); m != n {
			n, stable = m, 0
		} else {
			stable++
		}
	}
	return n
}

// TestIdleASesCostNoGoroutines: an AS with nothing to send is its struct,
// not a goroutine or a timer, before and after it delivered something; the
// senders of a few busy ASes are not held up by the idle ones and Close
// still stops everything.
func TestIdleASesCostNoGoroutines(t *testing.T) {
	const ases = 300
	h := newHarness(t, filepath.Join(t.TempDir(), "q.db"), Options{Logger: zap.NewNop()})
	defer h.close()
	// The busy ASes (0, the middle one and the last) have a server each:
	// the fake dedups by txn id.
	idleAS, busyAS := newFakeAS(t, nil), []*fakeAS{newFakeAS(t, nil), newFakeAS(t, nil), newFakeAS(t, nil)}
	before := settledGoroutines()
	keys := make([]txnstore.ASKey, ases)
	for i := range keys {
		as := idleAS
		if b, ok := map[int]int{0: 0, ases / 2: 1, ases - 1: 2}[i]; ok {
			as = busyAS[b]
		}
		keys[i] = h.start(as, fmt.Sprintf("as%d", i))
	}
	// The machines recover from the store once started; then they idle.
	idle := settledGoroutines()
	if idle-before > 10 {
		t.Fatalf("%d idle ASes added %d goroutines; want none per AS", ases, idle-before)
	}
	busy := []txnstore.ASKey{keys[0], keys[ases/2], keys[ases-1]}
	h.appendEvents(txnstore.KindEvent, busy, "a", "b", "c")
	for _, as := range busyAS {
		waitFor(t, "the busy ASes' events", func() bool { return equal(as.delivered(), []string{"a", "b", "c"}) })
	}
	if n := len(idleAS.attempts()); n > 0 {
		t.Errorf("the idle ASes were sent %d transactions", n)
	}
	// Idle keep-alive connections to the AS server hold a few goroutines
	// of net/http's; the senders hold none.
	if after := settledGoroutines(); after-before > 20 {
		t.Fatalf("after delivering, %d ASes hold %d goroutines", ases, after-before)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := h.q.Stop(ctx, keys[1]); err != nil {
		t.Fatal(err)
	}
	if _, ok := h.q.Live(keys[1]); ok {
		t.Error("a stopped sender has a live state")
	}
}

// TestStopAfterClose: stopping an AS of closed Queues returns at once (its
// sender is stopped for good) instead of waiting for a sender that is gone.
func TestStopAfterClose(t *testing.T) {
	h := newHarness(t, filepath.Join(t.TempDir(), "q.db"), Options{})
	as := newFakeAS(t, nil)
	key := h.start(as, "a")
	h.close()
	done := make(chan error, 1)
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		defer cancel()
		done <- h.q.Stop(ctx, key)
	}()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("Stop after Close: %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Stop after Close hangs")
	}
}
