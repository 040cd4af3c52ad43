package txnstore

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/asdispatch/asdispatch/txnstore/pgtest"
)

// twoPG opens two stores on one fresh schema, as two processes would.
func twoPG(t *testing.T, opts1, opts2 Options) (*Postgres, *Postgres, string) {
	t.Helper()
	dsn := pgtest.Schema(t)
	ctx := context.Background()
	var s [2]*Postgres
	for i, o := range []Options{opts1, opts2} {
		st, err := OpenPostgres(ctx, dsn, o)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { st.Close() })
		s[i] = st
	}
	return s[0], s[1], dsn
}

// TestPostgresSeqOrderAcrossStores: two stores append concurrently; seqs
// are unique and each store's commits come in order, and a reader never
// sees a seq before every smaller one is visible.
func TestPostgresSeqOrderAcrossStores(t *testing.T) {
	var mu sync.Mutex
	seen := [2][]int64{}
	onCommit := func(i int) func([]Committed) {
		return func(c []Committed) {
			mu.Lock()
			defer mu.Unlock()
			for _, x := range c {
				seen[i] = append(seen[i], x.Item.Seq)
			}
		}
	}
	s1, s2, _ := twoPG(t, Options{OnCommit: onCommit(0)}, Options{OnCommit: onCommit(1)})
	a := ensure(t, s1, "a")
	if k := ensure(t, s2, "a"); k != a {
		t.Fatalf("the second store gave key %d to the AS the first created as %d", k, a)
	}
	ctx := context.Background()
	const writers, per = 4, 30
	var done atomic.Bool
	readerErr := make(chan error, 1)
	go func() {
		// Every item targets a, so a's stream must always be 1..n, no holes.
		for !done.Load() {
			items, err := s2.Read(ctx, a, 0, 1<<20, 0)
			if err != nil {
				readerErr <- err
				return
			}
			for i, it := range items {
				if it.Seq != int64(i+1) {
					readerErr <- fmt.Errorf("reader saw seq %d at position %d: a later commit became visible first", it.Seq, i)
					return
				}
			}
		}
		readerErr <- nil
	}()
	var wg sync.WaitGroup
	for w := 0; w < writers; w++ {
		for _, s := range []*Postgres{s1, s2} {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for i := 0; i < per; i++ {
					if _, err := s.Append(ctx, []Entry{{Kind: KindEvent, Data: []byte(`{}`), Targets: []ASKey{a}}}); err != nil {
						t.Error(err)
						return
					}
				}
			}()
		}
	}
	wg.Wait()
	done.Store(true)
	if err := <-readerErr; err != nil {
		t.Fatal(err)
	}
	mu.Lock()
	defer mu.Unlock()
	all := map[int64]bool{}
	for i, ss := range seen {
		for j, q := range ss {
			if j > 0 && q <= ss[j-1] {
				t.Fatalf("store %d: OnCommit seq %d after %d", i+1, q, ss[j-1])
			}
			if all[q] {
				t.Fatalf("seq %d assigned twice", q)
			}
			all[q] = true
		}
	}
	const total = 2 * writers * per
	if len(all) != total {
		t.Fatalf("%d seqs, want %d", len(all), total)
	}
	for q := int64(1); q <= total; q++ {
		if !all[q] {
			t.Fatalf("seq %d missing", q)
		}
	}
}

// TestPostgresTxnIDsUniqueAcrossStores: two stores freeze for one AS at
// once; the per-AS counter hands each id out once and ranges stay a chain.
func TestPostgresTxnIDsUniqueAcrossStores(t *testing.T) {
	s1, s2, _ := twoPG(t, Options{}, Options{})
	ctx := context.Background()
	a := ensure(t, s1, "a")
	seqs := appendN(t, s1, 40, KindEvent, a)
	var mu sync.Mutex
	ids := map[int64]bool{}
	var wg sync.WaitGroup
	for _, s := range []*Postgres{s1, s2} {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for tries := 0; tries < 200; tries++ {
				frozen, err := s.Frozen(ctx, a)
				if err != nil {
					t.Error(err)
					return
				}
				after := int64(0)
				if n := len(frozen); n > 0 {
					after = frozen[n-1].Range.Last
				}
				if after >= seqs[len(seqs)-1] {
					return
				}
				got, err := s.Freeze(ctx, a, 0, []Txn{{Range: Range{after, after + 1}}})
				if errors.Is(err, ErrBadRange) {
					continue // the other store froze that range first
				}
				if err != nil {
					t.Error(err)
					return
				}
				mu.Lock()
				if ids[got[0]] {
					t.Errorf("txn id %d handed out twice", got[0])
				}
				ids[got[0]] = true
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	frozen, err := s2.Frozen(ctx, a)
	if err != nil {
		t.Fatal(err)
	}
	if len(frozen) != len(seqs) || len(ids) != len(seqs) {
		t.Fatalf("%d frozen, %d ids, want %d each", len(frozen), len(ids), len(seqs))
	}
	for i, f := range frozen {
		if f.Range.After != int64(i) || f.Range.Last != int64(i+1) {
			t.Fatalf("frozen ranges broken at %d: %+v", i, f.Range)
		}
	}
}

// TestPostgresLeaseHandover: one owner at a time; when the owner stops
// renewing, another store takes the lease after the ttl, and the old owner's
// writes for that AS are refused from then on.
func TestPostgresLeaseHandover(t *testing.T) {
	s1, s2, _ := twoPG(t, Options{}, Options{})
	ctx := context.Background()
	a := ensure(t, s1, "a")
	seqs := appendN(t, s1, 4, KindEvent, a)
	const ttl = 400 * time.Millisecond
	if ok, err := s1.Acquire(ctx, a, "p1", ttl); !ok || err != nil {
		t.Fatalf("first acquire = %v, %v", ok, err)
	}
	if ok, err := s2.Acquire(ctx, a, "p2", ttl); ok || err != nil {
		t.Fatalf("second owner acquired a held lease: %v, %v", ok, err)
	}
	// Renewing keeps it past the ttl.
	var renewed time.Time
	for i := 0; i < 3; i++ {
		time.Sleep(ttl / 2)
		renewed = time.Now()
		if ok, err := s1.Renew(ctx, a, "p1", ttl); !ok || err != nil {
			t.Fatalf("renew = %v, %v", ok, err)
		}
		if ok, _ := s2.Acquire(ctx, a, "p2", ttl); ok {
			t.Fatal("lease taken while renewed")
		}
	}
	if _, err := s1.Freeze(ctx, a, 0, []Txn{{Range: Range{0, seqs[1]}}}); err != nil {
		t.Fatalf("owner's freeze: %v", err)
	}
	// p1 stops renewing (a dead process): p2 gets it after the ttl.
	for {
		ok, err := s2.Acquire(ctx, a, "p2", ttl)
		if err != nil {
			t.Fatal(err)
		}
		if ok {
			break
		}
		if time.Since(renewed) > 5*ttl {
			t.Fatal("the lease was not taken over")
		}
		time.Sleep(20 * time.Millisecond)
	}
	// The expiry counts from when the database ran the renewal, after
	// renewed: taking over sooner would mean two owners. (The database
	// clock is in whole milliseconds; this assumes it is this host's.)
	if took := time.Since(renewed); took < ttl-2*time.Millisecond {
		t.Errorf("lease taken over %v after its last renewal, before its ttl %v", took, ttl)
	}
	if ok, err := s1.Renew(ctx, a, "p1", ttl); ok || err != nil {
		t.Errorf("old owner renewed a lease it lost: %v, %v", ok, err)
	}
	if _, err := s1.Freeze(ctx, a, 0, []Txn{{Range: Range{seqs[1], seqs[3]}}}); !errors.Is(err, ErrLeaseLost) {
		t.Errorf("old owner's freeze: %v, want ErrLeaseLost", err)
	}
	if err := s1.Complete(ctx, a, 1); !errors.Is(err, ErrLeaseLost) {
		t.Errorf("old owner's complete: %v, want ErrLeaseLost", err)
	}
	if _, err := s2.Freeze(ctx, a, 0, []Txn{{Range: Range{seqs[1], seqs[3]}}}); err != nil {
		t.Errorf("new owner's freeze: %v", err)
	}
	// Releasing what one does not own changes nothing; the owner's release
	// frees it at once.
	if err := s1.Release(ctx, a, "p1"); err != nil {
		t.Fatal(err)
	}
	if ok, _ := s1.Acquire(ctx, a, "p1", ttl); ok {
		t.Fatal("acquired a lease another owner holds after releasing one's own")
	}
	if err := s2.Release(ctx, a, "p2"); err != nil {
		t.Fatal(err)
	}
	if ok, err := s1.Acquire(ctx, a, "p1", ttl); !ok || err != nil {
		t.Fatalf("acquire after release = %v, %v", ok, err)
	}
	if err := s1.Complete(ctx, a, 1); err != nil {
		t.Errorf("complete after taking the lease back: %v", err)
	}
}
