package txnstore

import (
	"context"
	"errors"
	"reflect"
	"testing"
)

func TestRecover(t *testing.T) { forEach(t, testRecover) }

// testRecover checks that Recover and RecoverAll say what Frozen and
// Delivered say, with the end of each stream: after freezes, a split, a
// saved body, completions and garbage collection.
func testRecover(t *testing.T, be backend) {
	ctx := context.Background()
	s := be.fresh(t, Options{})
	r, ok := s.(Recoverer)
	if !ok {
		t.Fatalf("%T is not a Recoverer", s)
	}
	a, b, c, d := ensure(t, s, "a"), ensure(t, s, "b"), ensure(t, s, "c"), ensure(t, s, "d")
	seqs := appendN(t, s, 6, KindEvent, a, b, d)
	last := appendN(t, s, 1, KindEvent, b)[0]
	if _, err := s.Freeze(ctx, a, 0, []Txn{{Range: Range{0, seqs[1]}, Len: 3, Checksum: 9}, {Range: Range{seqs[1], seqs[5]}}}); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Freeze(ctx, a, 2, []Txn{{Range: Range{seqs[1], seqs[3]}}, {Range: Range{seqs[3], seqs[5]}}}); err != nil {
		t.Fatal(err)
	}
	if err := s.SaveBody(ctx, a, 3, []byte(`{"events":[]}`)); err != nil {
		t.Fatal(err)
	}
	if err := s.Complete(ctx, a, 1); err != nil {
		t.Fatal(err)
	}
	ids, err := s.Freeze(ctx, d, 0, []Txn{{Range: Range{0, seqs[5]}}})
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Complete(ctx, d, ids[0]); err != nil {
		t.Fatal(err)
	}
	collectGarbage(s)

	ends := map[ASKey]int64{a: seqs[5], b: last, d: seqs[5]}
	all, err := r.RecoverAll(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(all) != 4 {
		t.Errorf("RecoverAll has %d ASes, want 4", len(all))
	}
	for _, k := range []ASKey{a, b, c, d} {
		frozen, err := s.Frozen(ctx, k)
		if err != nil {
			t.Fatal(err)
		}
		delivered, err := s.Delivered(ctx, k)
		if err != nil {
			t.Fatal(err)
		}
		want := Recovery{Frozen: frozen, Delivered: delivered, End: max(ends[k], delivered)}
		got, err := r.Recover(ctx, k)
		if err != nil || !reflect.DeepEqual(got, want) {
			t.Errorf("Recover(%d) = %+v, %v; want %+v", k, got, err, want)
		}
		if !reflect.DeepEqual(all[k], want) {
			t.Errorf("RecoverAll()[%d] = %+v; want %+v", k, all[k], want)
		}
	}
	if got := all[a]; len(got.Frozen) != 2 || got.Frozen[0].ID != 3 || string(got.Frozen[0].Body) != `{"events":[]}` {
		t.Errorf("a's frozen = %+v, want the split's two halves, the first with its body", got.Frozen)
	}
	if got := all[d]; got.End != got.Delivered || len(got.Frozen) != 0 {
		t.Errorf("d, all delivered and collected: %+v, want End = Delivered", got)
	}
	if _, err := r.Recover(ctx, 99); !errors.Is(err, ErrUnknownAS) {
		t.Errorf("Recover of an unknown AS: %v, want ErrUnknownAS", err)
	}
}

// TestEnsureASes: EnsureASes gives the keys EnsureAS gives, adds the new
// ASes at the end of the log, and an id twice gets one key.
func TestEnsureASes(t *testing.T) {
	ctx := context.Background()
	s := openSQLite(t)
	a := ensure(t, s, "a")
	seqs := appendN(t, s, 2, KindEvent, a)
	keys, err := s.EnsureASes(ctx, []string{"b", "a", "c", "b"})
	if err != nil {
		t.Fatal(err)
	}
	if keys[1] != a || keys[0] != keys[3] || keys[0] == a || keys[2] == keys[0] || keys[2] == a {
		t.Fatalf("keys %v (a is %d)", keys, a)
	}
	for _, k := range keys {
		if d, err := s.Delivered(ctx, k); err != nil || (k != a && d != seqs[1]) {
			t.Errorf("AS %d: delivered %d, %v; a new AS starts at the end of the log (%d)", k, d, err, seqs[1])
		}
	}
	if k := ensure(t, s, "c"); k != keys[2] {
		t.Errorf("EnsureAS(c) = %d after EnsureASes gave %d", k, keys[2])
	}
}
