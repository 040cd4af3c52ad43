package txnstore

import (
	"context"
	"database/sql"
	"math/rand/v2"
	"slices"
	"testing"

	"github.com/asdispatch/asdispatch/internal/storehook"
)

// TestTxnRowsCacheMatchesTable: the SQLite writer's copy of each AS's txns
// rows, which the completion check reads instead of the table, stays equal
// to the table through random freezes, splits and completions, with
// commits failing and landing unanswered at random.
func TestTxnRowsCacheMatchesTable(t *testing.T) {
	ctx := context.Background()
	for seed := range uint64(20) {
		rnd := rand.New(rand.NewPCG(seed, 17))
		f := &faults{}
		s := backends[0].openHooked(t, t.TempDir()+"/db", Options{}, f.hooks()).(*SQLite)
		as := []ASKey{ensure(t, s, "a"), ensure(t, s, "b")}
		end := map[ASKey]int64{}
		for step := 0; step < 150; step++ {
			a := as[rnd.IntN(len(as))]
			if rnd.IntN(5) == 0 {
				kinds := []storehook.Op{storehook.Freeze, storehook.Complete}
				f.arm(kinds[rnd.IntN(2)], []storehook.Fault{storehook.Fail, storehook.Ambiguous}[rnd.IntN(2)])
			}
			switch rnd.IntN(3) {
			case 0: // freeze one to three more
				seqs := appendN(t, s, 6, KindEvent, a)
				var txns []Txn
				prev := end[a]
				for i := 0; i < 1+rnd.IntN(3); i++ {
					txns = append(txns, Txn{Range: Range{prev, seqs[2*i+1]}})
					prev = seqs[2*i+1]
				}
				if _, err := s.Freeze(ctx, a, 0, txns); err != nil {
					// Repeated until it is known to have landed.
					if _, err := s.Freeze(ctx, a, 0, txns); err != nil {
						t.Fatalf("seed %d step %d: freeze repeated: %v", seed, step, err)
					}
				}
				end[a] = prev
			case 1: // split the first
				fr, err := s.Frozen(ctx, a)
				if err != nil || len(fr) == 0 || fr[0].Range.Last-fr[0].Range.After < 2 {
					continue
				}
				x := fr[0]
				mid := x.Range.After + 1
				_, _ = s.Freeze(ctx, a, x.ID, []Txn{{Range: Range{x.Range.After, mid}}, {Range: Range{mid, x.Range.Last}}})
			case 2: // complete some, in any order, known or not
				fr, err := s.Frozen(ctx, a)
				if err != nil {
					t.Fatal(err)
				}
				var ids []int64
				for _, x := range fr {
					if rnd.IntN(3) > 0 {
						ids = append(ids, x.ID)
					}
				}
				if rnd.IntN(4) == 0 {
					ids = append(ids, int64(rnd.IntN(40)))
				}
				rnd.Shuffle(len(ids), func(i, j int) { ids[i], ids[j] = ids[j], ids[i] })
				_ = s.CompleteMany(ctx, a, ids)
			}
			checkTxnRows(t, s, as)
		}
		s.Close()
	}
}

// checkTxnRows fails t if a loaded copy of txns rows differs from the table.
func checkTxnRows(t *testing.T, s *SQLite, as []ASKey) {
	t.Helper()
	err := s.do(context.Background(), 0, 0, func(tx *sql.Tx, b *batch) error {
		for _, a := range as {
			r := s.ases[a]
			if !r.loaded {
				continue
			}
			want, err := readTxnRows(context.Background(), tx, sqliteSQL, a)
			if err != nil {
				return err
			}
			if !slices.Equal(r.txns, want) {
				t.Errorf("AS %d: cached rows %v, table %v", a, r.txns, want)
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
}
