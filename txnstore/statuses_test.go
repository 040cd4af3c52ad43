package txnstore

import (
	"context"
	"database/sql"
	"fmt"
	"reflect"
	"testing"

	"golang.org/x/sync/errgroup"
)

// statusesPerAS is Statuses as it was before it read every AS's stream in
// one query: after the AS rows, a pendingSeqs and an items query per AS.
// It is the reference the grouped reads must match.
func statusesPerAS(ctx context.Context, db *sql.DB, d *dialect) ([]Status, error) {
	out, err := readASStatuses(ctx, db)
	if err != nil {
		return nil, err
	}
	for i := range out {
		st := &out[i]
		oldest := int64(0)
		err := pendingSeqs(ctx, db, d, st.Key, st.Delivered, func(q int64) bool {
			st.PendingItems++
			if oldest == 0 {
				oldest = q
			}
			return true
		})
		if err != nil {
			return nil, err
		}
		if oldest != 0 {
			var created int64
			if err := db.QueryRowContext(ctx, d.q(`SELECT created_ms FROM items WHERE seq = ?`), oldest).Scan(&created); err == nil {
				st.OldestPending = fromMS(created)
			}
		}
	}
	return out, nil
}

func TestStatusesMatchPerAS(t *testing.T) { forEach(t, testStatusesMatchPerAS) }

func testStatusesMatchPerAS(t *testing.T, be backend) {
	ctx := context.Background()
	loc := be.newLoc(t)
	s := be.openAt(t, loc, Options{})
	defer s.Close()
	d := sqliteSQL
	if _, ok := s.(*Postgres); ok {
		d = postgresSQL
	}
	var keys []ASKey
	for _, id := range []string{"backlog", "frozen", "split", "partial", "drained", "idle", "shared1", "shared2"} {
		keys = append(keys, ensure(t, s, id))
	}
	backlog, frozen, split, partial, drained, shared1, shared2 := keys[0], keys[1], keys[2], keys[3], keys[4], keys[6], keys[7]
	// Several commits, so several stream rows per AS, items shared by
	// many ASes (one item the oldest of several) and some not.
	var seqs []int64
	for i := range 5 {
		seqs = append(seqs, appendN(t, s, 3, KindEvent, backlog, frozen, split, partial, drained)...)
		appendN(t, s, i+1, KindEvent, shared1, shared2)
		appendN(t, s, 2, KindEvent, backlog)
	}
	if _, err := s.Freeze(ctx, frozen, 0, []Txn{{Range: Range{0, seqs[4]}}, {Range: Range{seqs[4], seqs[8]}}}); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Freeze(ctx, split, 0, []Txn{{Range: Range{0, seqs[6]}}}); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Freeze(ctx, split, 1, []Txn{{Range: Range{0, seqs[2]}}, {Range: Range{seqs[2], seqs[6]}}}); err != nil {
		t.Fatal(err)
	}
	// partial's cursor inside a stream row; drained's past everything.
	if _, err := s.Freeze(ctx, partial, 0, []Txn{{Range: Range{0, seqs[4]}}}); err != nil {
		t.Fatal(err)
	}
	if err := s.Complete(ctx, partial, 1); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Freeze(ctx, drained, 0, []Txn{{Range: Range{0, seqs[len(seqs)-1]}}}); err != nil {
		t.Fatal(err)
	}
	if err := s.Complete(ctx, drained, 1); err != nil {
		t.Fatal(err)
	}
	if err := s.SetState(ctx, backlog, State{Up: false, Failures: 3, LastError: "down"}); err != nil {
		t.Fatal(err)
	}
	got, err := s.Statuses(ctx)
	if err != nil {
		t.Fatal(err)
	}
	want, err := statusesPerAS(ctx, rdb(s), d)
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("Statuses =\n%s\nper AS =\n%s", fmtStatuses(got), fmtStatuses(want))
	}
	// The cases are what they claim to be.
	byID := map[string]Status{}
	for _, st := range got {
		byID[st.ID] = st
	}
	for _, c := range []struct {
		id           string
		items        int64
		txns         int
		oldestUnseen bool
	}{
		{"backlog", 25, 0, false}, {"frozen", 15, 2, false}, {"split", 15, 2, false}, {"partial", 10, 0, false},
		{"drained", 0, 0, true}, {"idle", 0, 0, true}, {"shared1", 15, 0, false}, {"shared2", 15, 0, false},
	} {
		st := byID[c.id]
		if st.PendingItems != c.items || st.PendingTxns != c.txns || st.OldestPending.IsZero() != c.oldestUnseen {
			t.Errorf("%s: %+v, want %d items, %d txns", c.id, st, c.items, c.txns)
		}
	}
	if sts, err := be.status(ctx, loc); err != nil || !reflect.DeepEqual(sts, want) {
		t.Errorf("read-only status = %s, %v", fmtStatuses(sts), err)
	}
}

func fmtStatuses(sts []Status) string {
	var b []byte
	for _, st := range sts {
		b = fmt.Appendf(b, "%+v\n", st)
	}
	return string(b)
}

// BenchmarkStatuses is a status or metrics poll at 10,000 ASes, each with
// a backlog: grouped is Statuses, perAS the query per AS it replaced.
func BenchmarkStatuses(b *testing.B) {
	for _, be := range backends {
		b.Run(be.name, func(b *testing.B) { benchStatuses(b, be) })
	}
}

func benchStatuses(b *testing.B, be backend) {
	ctx := context.Background()
	s := be.fresh(b, Options{})
	d := sqliteSQL
	if _, ok := s.(*Postgres); ok {
		d = postgresSQL
	}
	ids := make([]string, 10000)
	for i := range ids {
		ids[i] = fmt.Sprintf("as%05d", i)
	}
	keys := make([]ASKey, len(ids))
	if me, ok := s.(ManyEnsurer); ok {
		var err error
		if keys, err = me.EnsureASes(ctx, ids); err != nil {
			b.Fatal(err)
		}
	} else {
		// Concurrent callers share the writer's commits.
		var g errgroup.Group
		g.SetLimit(64)
		for i, id := range ids {
			g.Go(func() (err error) { keys[i], err = s.EnsureAS(ctx, id); return err })
		}
		if err := g.Wait(); err != nil {
			b.Fatal(err)
		}
	}
	for range 3 {
		appendN(b, s, 2, KindEvent, keys...)
	}
	for _, bc := range []struct {
		name string
		fn   func() ([]Status, error)
	}{
		{"grouped", func() ([]Status, error) { return s.Statuses(ctx) }},
		{"perAS", func() ([]Status, error) { return statusesPerAS(ctx, rdb(s), d) }},
	} {
		b.Run(bc.name, func(b *testing.B) {
			for b.Loop() {
				sts, err := bc.fn()
				if err != nil || len(sts) != len(keys) || sts[0].PendingItems != 6 {
					b.Fatalf("%d statuses, %v", len(sts), err)
				}
			}
		})
	}
}
