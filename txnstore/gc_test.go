package txnstore

import (
	"context"
	"fmt"
	"path/filepath"
	"testing"
)

// TestGCWalksOnlyMovedCursors: after the first collection, one collects
// the stream rows of the ASes whose cursor moved without walking every AS
// (that walk was most of a commit's cost at 10,000 ASes), and leaves the
// others' rows.
func TestGCWalksOnlyMovedCursors(t *testing.T) {
	ctx := context.Background()
	s, err := Open(ctx, filepath.Join(t.TempDir(), "s.db"), Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
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
	s, err := Open(context.Background(), filepath.Join(t.TempDir(), "s.db"), Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
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
