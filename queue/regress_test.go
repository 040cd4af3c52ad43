package queue

import (
	"context"
	"errors"
	"net/http"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/asdispatch/asdispatch/txnstore"
)

// Regression tests for the sender bugs of issue 13. Each fails on the
// sender before the state machine (checked when written).

var errInjected = errors.New("injected store fault")

// faultStore fails chosen calls of a real store: before their commit
// (nothing happened) or after it (it happened, the caller is told not).
type faultStore struct {
	txnstore.Store
	mu              sync.Mutex
	failComplete    int // fail the next n Complete calls before commit
	ambiguousFreeze int // the next n Freeze calls commit, then fail
}

func (f *faultStore) take(n *int) bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	if *n > 0 {
		*n--
		return true
	}
	return false
}

func (f *faultStore) Complete(ctx context.Context, as txnstore.ASKey, id int64) error {
	if f.take(&f.failComplete) {
		return errInjected
	}
	return f.Store.Complete(ctx, as, id)
}

func (f *faultStore) Freeze(ctx context.Context, as txnstore.ASKey, replace int64, txns []txnstore.Txn) ([]int64, error) {
	ids, err := f.Store.Freeze(ctx, as, replace, txns)
	if err == nil && f.take(&f.ambiguousFreeze) {
		return nil, errInjected
	}
	return ids, err
}

func (h *harness) pending(key txnstore.ASKey) (items int64, txns int) {
	h.t.Helper()
	sts, err := h.store.Statuses(context.Background())
	if err != nil {
		h.t.Fatal(err)
	}
	for _, s := range sts {
		if s.Key == key {
			return s.PendingItems, s.PendingTxns
		}
	}
	return -1, -1
}

func waitShort(t *testing.T, what string, d time.Duration, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func twoBodies(t *testing.T, at []attempt) {
	t.Helper()
	bodies := map[string]string{}
	for _, a := range at {
		if b, ok := bodies[a.id]; ok && b != string(a.body) {
			t.Fatalf("txn %s sent with two bodies: %s and %s", a.id, b, a.body)
		}
		bodies[a.id] = string(a.body)
	}
}

// TestFailedCompletionIsRetried (issue 13, 1): a Complete that fails is
// retried until it lands, so the cursor never passes a transaction whose
// completion is unrecorded, nothing stays frozen, and after a restart no
// txn id goes out with another body.
func TestFailedCompletionIsRetried(t *testing.T) {
	path := filepath.Join(t.TempDir(), "q.db")
	as := newFakeAS(t, nil)
	h := newHarness(t, path, Options{})
	fs := &faultStore{Store: h.store, failComplete: 1}
	h.q = New(fs, h.opts)
	key := h.start(as, "a")
	h.appendEvents(txnstore.KindEvent, []txnstore.ASKey{key}, "a")
	waitFor(t, "a", func() bool { return len(as.delivered()) == 1 })
	for _, b := range seqBodies("b", 40) { // enough commits for a garbage collection
		h.appendEvents(txnstore.KindEvent, []txnstore.ASKey{key}, b)
	}
	waitFor(t, "everything", func() bool { return len(as.delivered()) == 41 })
	waitShort(t, "no transaction left frozen", 3*time.Second, func() bool {
		items, txns := h.pending(key)
		return items == 0 && txns == 0
	})
	h.close()
	h2 := newHarness(t, path, Options{})
	defer h2.close()
	h2.start(as, "a")
	time.Sleep(100 * time.Millisecond)
	twoBodies(t, as.attempts())
}

// TestChecksumMismatchPauses (issue 13, 1): a frozen transaction whose
// rebuilt body fails its checksum is never sent under its id: the AS is
// paused, with the error in its live state.
func TestChecksumMismatchPauses(t *testing.T) {
	h := newHarness(t, filepath.Join(t.TempDir(), "q.db"), Options{})
	defer h.close()
	ctx := context.Background()
	key, err := h.store.EnsureAS(ctx, "a")
	if err != nil {
		t.Fatal(err)
	}
	h.appendEvents(txnstore.KindEvent, []txnstore.ASKey{key}, "a", "b")
	if _, err := h.store.Freeze(ctx, key, 0, []txnstore.Txn{{AS: key, Range: txnstore.Range{After: 0, Last: 2}, Len: 13, Checksum: 12345}}); err != nil {
		t.Fatal(err)
	}
	as := newFakeAS(t, nil)
	h.start(as, "a")
	waitShort(t, "the AS paused", 3*time.Second, func() bool {
		l, ok := h.q.Live(key)
		return ok && !l.Up && strings.Contains(l.LastError, "checksum")
	})
	time.Sleep(50 * time.Millisecond)
	if n := len(as.attempts()); n != 0 {
		t.Fatalf("%d attempts of a transaction whose body fails its checksum", n)
	}
}

// TestSplitThenStopKeepsOrder (issue 13, 2): a stop while the first part of
// a 413 split waits out its backoff sends nothing more; after a restart the
// parts go in stream order.
func TestSplitThenStopKeepsOrder(t *testing.T) {
	path := filepath.Join(t.TempDir(), "q.db")
	var fixed atomic.Bool
	as := newFakeAS(t, func(_ int, a attempt) int {
		switch {
		case len(a.events) > 1:
			return http.StatusRequestEntityTooLarge
		case len(a.events) == 1 && a.events[0] == "a" && !fixed.Load():
			return http.StatusInternalServerError
		}
		return http.StatusOK
	})
	h := newHarness(t, path, Options{RetryInitial: time.Hour, RetryMax: time.Hour})
	key := h.start(as, "a")
	h.appendEvents(txnstore.KindEvent, []txnstore.ASKey{key}, "a", "b")
	waitFor(t, "part 1 refused", func() bool {
		for _, a := range as.attempts() {
			if len(a.events) == 1 {
				return true
			}
		}
		return false
	})
	h.close()
	for _, a := range as.attempts() {
		if len(a.events) == 1 && a.events[0] == "b" {
			t.Fatalf("part 2 [b] sent while part 1 [a] was not delivered")
		}
	}
	fixed.Store(true)
	h2 := newHarness(t, path, Options{})
	defer h2.close()
	h2.start(as, "a")
	waitFor(t, "both", func() bool { return len(as.delivered()) == 2 })
	if got := as.delivered(); !equal(got, []string{"a", "b"}) {
		t.Fatalf("delivered %v, want [a b]", got)
	}
}

// gateAS holds every request until released and records how many were
// in flight at once.
type gateAS struct {
	*fakeAS
	gate     chan struct{}
	inFlight atomic.Int32
	maxIn    atomic.Int32
}

func newGateAS(t *testing.T) *gateAS {
	g := &gateAS{gate: make(chan struct{})}
	g.fakeAS = newFakeAS(t, nil)
	g.hold = func() {
		n := g.inFlight.Add(1)
		defer g.inFlight.Add(-1)
		for {
			m := g.maxIn.Load()
			if n <= m || g.maxIn.CompareAndSwap(m, n) {
				break
			}
		}
		<-g.gate
	}
	return g
}

// TestStopStartNeverTwoInFlight (issue 13, 3): stop, start, stop, start
// while a send is in flight never puts a second transaction in flight.
func TestStopStartNeverTwoInFlight(t *testing.T) {
	h := newHarness(t, filepath.Join(t.TempDir(), "q.db"), Options{})
	defer h.close()
	as := newGateAS(t)
	key := h.start(as.fakeAS, "a")
	h.appendEvents(txnstore.KindEvent, []txnstore.ASKey{key}, "a")
	waitFor(t, "a send in flight", func() bool { return as.inFlight.Load() == 1 })
	var wg sync.WaitGroup
	for i := 0; i < 2; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			h.q.Stop(ctx, key)
		}()
		time.Sleep(20 * time.Millisecond)
		h.start(as.fakeAS, "a")
	}
	time.Sleep(200 * time.Millisecond)
	close(as.gate)
	wg.Wait()
	waitFor(t, "a", func() bool { return len(as.delivered()) >= 1 })
	if m := as.maxIn.Load(); m > 1 {
		t.Fatalf("%d transactions in flight at once for one AS", m)
	}
}

// TestAmbiguousFreezeReconciles (issue 13, 5): a Freeze that committed but
// reported an error is reconciled by re-reading the store; the AS does not
// wedge.
func TestAmbiguousFreezeReconciles(t *testing.T) {
	h := newHarness(t, filepath.Join(t.TempDir(), "q.db"), Options{})
	defer h.close()
	h.q = New(&faultStore{Store: h.store, ambiguousFreeze: 1}, h.opts)
	as := newFakeAS(t, nil)
	key := h.start(as, "a")
	h.appendEvents(txnstore.KindEvent, []txnstore.ASKey{key}, "a", "b")
	waitShort(t, "delivery after an ambiguous freeze", 5*time.Second, func() bool { return len(as.delivered()) == 2 })
	h.appendEvents(txnstore.KindEvent, []txnstore.ASKey{key}, "c")
	waitShort(t, "delivery after it", 5*time.Second, func() bool { return equal(as.delivered(), []string{"a", "b", "c"}) })
	twoBodies(t, as.attempts())
}

// TestBatchingBoundary (issue 13, also fix): with one transaction in
// flight, 200 events enqueued one at a time go as 100 and 99, not 100, 1
// and 98.
func TestBatchingBoundary(t *testing.T) {
	h := newHarness(t, filepath.Join(t.TempDir(), "q.db"), Options{})
	defer h.close()
	as := newGateAS(t)
	key := h.start(as.fakeAS, "a")
	h.appendEvents(txnstore.KindEvent, []txnstore.ASKey{key}, "first")
	waitFor(t, "the first in flight", func() bool { return as.inFlight.Load() == 1 })
	for _, b := range seqBodies("e", 199) {
		h.appendEvents(txnstore.KindEvent, []txnstore.ASKey{key}, b)
	}
	time.Sleep(100 * time.Millisecond)
	close(as.gate)
	waitFor(t, "everything", func() bool { return len(as.delivered()) == 200 })
	var sizes []int
	for _, a := range as.attempts() {
		sizes = append(sizes, len(a.events))
	}
	if len(sizes) != 3 || sizes[0] != 1 || sizes[1] != 100 || sizes[2] != 99 {
		t.Fatalf("transaction sizes %v, want [1 100 99]", sizes)
	}
}
