package txnstore

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"path/filepath"
	"testing"

	"github.com/asdispatch/asdispatch/internal/storehook"
)

// TestGCWalksOnlyMovedCursors: after the first collection, one collects
// the stream rows of the ASes whose cursor moved without walking every AS
// (that walk was most of a commit's cost at 10,000 ASes), and leaves the
// others' rows.
func TestGCWalksOnlyMovedCursors(t *testing.T) {
	ctx := context.Background()
	s := openSQLite(t)
	var keys []ASKey
	for i := 0; i < 40; i++ {
		keys = append(keys, ensure(t, s, fmt.Sprintf("as%d", i)))
	}
	seqs := appendN(t, s, 4, KindEvent, keys...)
	collectGarbage(s)
	walks := s.stats().gcWalks
	if walks == 0 {
		t.Fatal("the first collection did not walk every AS")
	}
	before := count(t, s, "streams")
	for _, k := range keys[:2] {
		if _, err := s.Freeze(ctx, k, 0, []Txn{{Range: Range{0, seqs[3]}}}); err != nil {
			t.Fatal(err)
		}
		if err := s.Complete(ctx, k, 1); err != nil {
			t.Fatal(err)
		}
	}
	collectGarbage(s)
	if got := s.stats().gcWalks; got != walks {
		t.Errorf("a collection after 2 of 40 cursors moved walked every AS (%d walks, want %d)", got, walks)
	}
	after := count(t, s, "streams")
	if after >= before || after == 0 {
		t.Errorf("stream rows %d before, %d after 2 of 40 ASes delivered everything; want fewer, not none", before, after)
	}
	// An AS whose cursor did not move still reads its backlog.
	if items, err := s.Read(ctx, keys[2], 0, 100, 0); err != nil || len(items) != 4 {
		t.Errorf("an undelivered AS reads %d items after the collection (%v), want 4", len(items), err)
	}
}

// TestIdleWriterCollectsEveryFewCommits: one caller at a time leaves the
// writer idle at every commit; it still collects only every gcIdleEvery-th
// commit, not every other one (a fifth of its time at 10,000 ASes).
func TestIdleWriterCollectsEveryFewCommits(t *testing.T) {
	s := openSQLite(t)
	a := ensure(t, s, "a")
	st0 := s.stats()
	const n = 80
	for range n {
		appendN(t, s, 1, KindEvent, a)
	}
	st := s.stats()
	commits, gcs := int(st.commits-st0.commits), st.gcs-st0.gcs
	if want := commits / gcIdleEvery; gcs < want-1 || gcs > want+1 {
		t.Errorf("%d collections in %d commits of an idle writer, want about %d", gcs, commits, want)
	}
}

// TestFailedCollectionLeavesNextCommitDue: a commit that carried a
// collection and failed collected nothing, so the next commit collects;
// it used to wait gcEvery more commits with the garbage in place.
func TestFailedCollectionLeavesNextCommitDue(t *testing.T) {
	ctx := context.Background()
	f := &faults{}
	s, err := Open(storehook.With(ctx, f.hooks()), filepath.Join(t.TempDir(), "s.db"), Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	a := ensure(t, s, "a")
	b := ensure(t, s, "b")
	collectGarbage(s)
	seqs := appendN(t, s, 4, KindEvent, a, b)
	if _, err := s.Freeze(ctx, a, 0, []Txn{{Range: Range{0, seqs[3]}}}); err != nil {
		t.Fatal(err)
	}
	if err := s.Complete(ctx, a, 1); err != nil {
		t.Fatal(err)
	}
	before := count(t, s, "streams")
	// A commit due to collect a's stream row fails.
	f.arm(storehook.State, storehook.Fail)
	err = s.do(ctx, storehook.State, 0, func(*sql.Tx, *batch) error { s.sinceGC = 1 << 20; return nil })
	if !errors.Is(err, storehook.ErrInjected) {
		t.Fatalf("the failing commit: %v", err)
	}
	if got := count(t, s, "streams"); got != before {
		t.Fatalf("stream rows %d after the failed collection, want %d", got, before)
	}
	gcs := s.stats().gcs // this commit is the next one
	if got := count(t, s, "streams"); got != before-1 {
		t.Errorf("stream rows %d after the commit that followed the failed collection, want %d (a's collected)", got, before-1)
	}
	if got := s.stats().gcs; got != gcs+1 {
		t.Errorf("%d collections in the commit after the failed one, want 1", got-gcs)
	}
}
