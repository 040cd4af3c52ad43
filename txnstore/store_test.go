package txnstore

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/asdispatch/asdispatch/internal/storehook"
	"github.com/asdispatch/asdispatch/txnstore/pgtest"
)

// backend opens stores of one kind for the shared suite: newLoc makes a
// fresh, empty place for a store, open opens (or reopens) the store there.
type backend struct {
	name   string
	newLoc func(t testing.TB) string
	open   func(ctx context.Context, loc string, opts Options) (testStore, error)
	status func(ctx context.Context, loc string) ([]Status, error)
}

// testStore is what the suite needs of a store beyond Store.
type testStore interface {
	Store
	Leaser
	CompleteMany(ctx context.Context, as ASKey, ids []int64) error
	stats() stats
}

var backends = []backend{
	{
		name:   "sqlite",
		newLoc: func(t testing.TB) string { return filepath.Join(t.TempDir(), "s.db") },
		open: func(ctx context.Context, loc string, opts Options) (testStore, error) {
			return Open(ctx, loc, opts)
		},
		status: OpenStatus,
	},
	{
		name:   "postgres",
		newLoc: func(t testing.TB) string { return pgtest.Schema(t) },
		open: func(ctx context.Context, loc string, opts Options) (testStore, error) {
			return OpenPostgres(ctx, loc, opts)
		},
		status: OpenPostgresStatus,
	},
}

// forEach runs test against every backend.
func forEach(t *testing.T, test func(t *testing.T, be backend)) {
	for _, be := range backends {
		t.Run(be.name, func(t *testing.T) { test(t, be) })
	}
}

func (be backend) openAt(t testing.TB, loc string, opts Options) testStore {
	t.Helper()
	return be.openHooked(t, loc, opts, nil)
}

// openHooked opens the store at loc with test hooks h (nil: none).
func (be backend) openHooked(t testing.TB, loc string, opts Options, h *storehook.Hooks) testStore {
	t.Helper()
	ctx := context.Background()
	if h != nil {
		ctx = storehook.With(ctx, h)
	}
	s, err := be.open(ctx, loc, opts)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// fresh opens a store in a new place, closed when t ends.
func (be backend) fresh(t testing.TB, opts Options) testStore {
	t.Helper()
	s := be.openAt(t, be.newLoc(t), opts)
	t.Cleanup(func() { s.Close() })
	return s
}

// openSQLite opens a SQLite store in a new place, closed when t ends.
func openSQLite(t testing.TB) *SQLite {
	t.Helper()
	return backends[0].fresh(t, Options{}).(*SQLite)
}

func ensure(t testing.TB, s Store, id string) ASKey {
	t.Helper()
	k, err := s.EnsureAS(context.Background(), id)
	if err != nil {
		t.Fatal(err)
	}
	return k
}

func appendN(t testing.TB, s Store, n int, kind Kind, targets ...ASKey) []int64 {
	t.Helper()
	es := make([]Entry, n)
	for i := range es {
		es[i] = Entry{Kind: kind, Data: []byte(fmt.Sprintf(`{"n":%d}`, i)), Targets: targets}
	}
	seqs, err := s.Append(context.Background(), es)
	if err != nil {
		t.Fatal(err)
	}
	return seqs
}

func rdb(s Store) *sql.DB {
	switch s := s.(type) {
	case *SQLite:
		return s.rdb
	case *Postgres:
		return s.db
	}
	panic(fmt.Sprintf("unknown store %T", s))
}

func count(t testing.TB, s Store, table string) int {
	var n int
	if err := rdb(s).QueryRow("SELECT COUNT(*) FROM " + table).Scan(&n); err != nil {
		t.Fatal(err)
	}
	return n
}

// collectGarbage asks the writer to collect garbage after its next commit
// and waits for the commit after that, which sees the result.
func collectGarbage(s Store) {
	ctx := context.Background()
	switch s := s.(type) {
	case *SQLite:
		_ = s.do(ctx, 0, 0, func(*sql.Tx, *batch) error { s.sinceGC = 1 << 20; return nil })
		_ = s.stats()
	case *Postgres:
		_ = s.do(ctx, 0, 0, func(context.Context, *sql.Tx, *pgBatch) error { s.sinceGC = 1 << 20; return nil })
		_ = s.stats()
	}
}

func TestAppendReadStreams(t *testing.T) { forEach(t, testAppendReadStreams) }

func testAppendReadStreams(t *testing.T, be backend) {
	ctx := context.Background()
	s := be.fresh(t, Options{})
	a, b := ensure(t, s, "a"), ensure(t, s, "b")
	seqs := appendN(t, s, 10, KindEvent, a, b)
	appendN(t, s, 5, KindEphemeral, b) // only b
	more := appendN(t, s, 3, KindToDevice, a)
	none, err := s.Append(ctx, []Entry{{Kind: KindEvent, Data: []byte("{}")}})
	if err != nil || none[0] != 0 {
		t.Fatalf("entry without targets: %v %v", none, err)
	}
	tests := []struct {
		name  string
		as    ASKey
		after int64
		max   int
		want  int
		first int64
	}{
		{"all of a", a, 0, 100, 13, seqs[0]},
		{"a after 5 events", a, seqs[4], 100, 8, seqs[5]},
		{"a capped", a, 0, 4, 4, seqs[0]},
		{"a sparse tail", a, seqs[9], 100, 3, more[0]},
		{"all of b", b, 0, 100, 15, seqs[0]},
		{"nothing after the end", b, 1000, 100, 0, 0},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			items, err := s.Read(ctx, tt.as, tt.after, tt.max, 0)
			if err != nil {
				t.Fatal(err)
			}
			if len(items) != tt.want {
				t.Fatalf("got %d items, want %d", len(items), tt.want)
			}
			for i := 1; i < len(items); i++ {
				if items[i].Seq <= items[i-1].Seq {
					t.Fatalf("items out of order: %v", items)
				}
			}
			if len(items) > 0 && items[0].Seq != tt.first {
				t.Errorf("first seq %d, want %d", items[0].Seq, tt.first)
			}
		})
	}
	if got := count(t, s, "items"); got != 18 {
		t.Errorf("%d item rows, want 18: each item stored once", got)
	}
}

func TestFreezeCompleteAndGC(t *testing.T) { forEach(t, testFreezeCompleteAndGC) }

func testFreezeCompleteAndGC(t *testing.T, be backend) {
	ctx := context.Background()
	path := be.newLoc(t)
	s := be.openAt(t, path, Options{})
	a := ensure(t, s, "a")
	seqs := appendN(t, s, 6, KindEvent, a)
	ids, err := s.Freeze(ctx, a, 0, []Txn{
		{Range: Range{0, seqs[2]}, Len: 10, Checksum: 7},
		{Range: Range{seqs[2], seqs[5]}},
	})
	if err != nil || ids[0] != 1 || ids[1] != 2 {
		t.Fatalf("Freeze = %v, %v", ids, err)
	}
	bad := []struct {
		name    string
		replace int64
		txns    []Txn
		want    error
	}{
		{"gap", 0, []Txn{{Range: Range{seqs[5] + 1, seqs[5] + 2}}}, ErrBadRange},
		{"overlap", 0, []Txn{{Range: Range{seqs[4], seqs[5]}}}, ErrBadRange},
		{"empty", 0, []Txn{{Range: Range{seqs[5], seqs[5]}}}, ErrBadRange},
		{"split short", 2, []Txn{{Range: Range{seqs[2], seqs[3]}}}, ErrBadRange},
		{"unknown txn", 99, []Txn{{Range: Range{0, 1}}}, ErrUnknownTxn},
	}
	for _, tt := range bad {
		if _, err := s.Freeze(ctx, a, tt.replace, tt.txns); !errors.Is(err, tt.want) {
			t.Errorf("%s: err = %v, want %v", tt.name, err, tt.want)
		}
	}
	// Split txn 2 in two: new ids, stream order kept.
	split, err := s.Freeze(ctx, a, 2, []Txn{{Range: Range{seqs[2], seqs[3]}}, {Range: Range{seqs[3], seqs[5]}}})
	if err != nil || split[0] != 3 || split[1] != 4 {
		t.Fatalf("split = %v, %v", split, err)
	}
	if err := s.SaveBody(ctx, a, 3, []byte(`{"events":[]}`)); err != nil {
		t.Fatal(err)
	}
	frozen, err := s.Frozen(ctx, a)
	if err != nil || len(frozen) != 3 || frozen[0].ID != 1 || frozen[1].ID != 3 || frozen[2].ID != 4 ||
		string(frozen[1].Body) != `{"events":[]}` || frozen[0].Body != nil || frozen[0].Len != 10 || frozen[0].Checksum != 7 {
		t.Fatalf("Frozen = %+v, %v", frozen, err)
	}
	for _, id := range []int64{1, 3, 4} {
		if err := s.Complete(ctx, a, id); err != nil {
			t.Fatal(err)
		}
	}
	if err := s.Complete(ctx, a, 1); err != nil {
		t.Errorf("completing twice: %v, want nil (a retried Complete)", err)
	}
	if err := s.Complete(ctx, a, 5); !errors.Is(err, ErrUnknownTxn) {
		t.Errorf("completing an id never issued: %v, want ErrUnknownTxn", err)
	}
	if d, _ := s.Delivered(ctx, a); d != seqs[5] {
		t.Errorf("delivered %d, want %d", d, seqs[5])
	}
	s.Close()

	// Reopen: ids go on from 5, seqs from where they were, GC cleans up.
	s = be.openAt(t, path, Options{})
	defer s.Close()
	a = ensure(t, s, "a")
	next := appendN(t, s, 1, KindEvent, a)
	if next[0] != seqs[5]+1 {
		t.Errorf("seq after reopen %d, want %d", next[0], seqs[5]+1)
	}
	ids, err = s.Freeze(ctx, a, 0, []Txn{{Range: Range{seqs[5], next[0]}}})
	if err != nil || ids[0] != 5 {
		t.Fatalf("txn id after reopen = %v, %v; want 5", ids, err)
	}
	if err := s.Complete(ctx, a, 5); err != nil {
		t.Fatal(err)
	}
	collectGarbage(s)
	if n := count(t, s, "items"); n != 0 {
		t.Errorf("%d items left after everything was delivered", n)
	}
	if n := count(t, s, "streams"); n != 0 {
		t.Errorf("%d stream rows left after everything was delivered", n)
	}
	after := appendN(t, s, 1, KindEvent, a)
	if after[0] != next[0]+1 {
		t.Errorf("seq reused after GC: %d", after[0])
	}
}

func TestNewASStartsFromNow(t *testing.T) { forEach(t, testNewASStartsFromNow) }

func testNewASStartsFromNow(t *testing.T, be backend) {
	ctx := context.Background()
	s := be.fresh(t, Options{})
	a := ensure(t, s, "a")
	appendN(t, s, 5, KindEvent, a)
	b := ensure(t, s, "b")
	if d, _ := s.Delivered(ctx, b); d != 5 {
		t.Errorf("new AS starts at %d, want 5", d)
	}
	if again := ensure(t, s, "a"); again != a {
		t.Errorf("EnsureAS gave a new key for an existing id")
	}
}

func TestGroupCommitAndOnCommitOrder(t *testing.T) { forEach(t, testGroupCommitAndOnCommitOrder) }

func testGroupCommitAndOnCommitOrder(t *testing.T, be backend) {
	var mu sync.Mutex
	var seen []int64
	s := be.fresh(t, Options{OnCommit: func(c []Committed) {
		mu.Lock()
		defer mu.Unlock()
		for _, x := range c {
			seen = append(seen, x.Item.Seq)
		}
	}})
	defer s.Close()
	a := ensure(t, s, "a")
	before := s.stats().commits
	const writers, per = 16, 25
	var wg sync.WaitGroup
	for w := 0; w < writers; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; i < per; i++ {
				appendN(t, s, 1, KindEvent, a)
			}
		}()
	}
	wg.Wait()
	commits := s.stats().commits - before
	if commits >= writers*per {
		t.Errorf("%d appends took %d commits: no group commit", writers*per, commits)
	}
	mu.Lock()
	defer mu.Unlock()
	if len(seen) != writers*per {
		t.Fatalf("OnCommit saw %d items, want %d", len(seen), writers*per)
	}
	for i := 1; i < len(seen); i++ {
		if seen[i] != seen[i-1]+1 {
			t.Fatalf("OnCommit order broken at %d: %d after %d", i, seen[i], seen[i-1])
		}
	}
	t.Logf("%d appends in %d commits", writers*per, commits)
}

func TestFailedOpFailsAloneAndStatus(t *testing.T) { forEach(t, testFailedOpFailsAloneAndStatus) }

func testFailedOpFailsAloneAndStatus(t *testing.T, be backend) {
	ctx := context.Background()
	path := be.newLoc(t)
	s := be.openAt(t, path, Options{})
	defer s.Close()
	a := ensure(t, s, "a")
	if _, err := s.Append(ctx, []Entry{{Kind: KindEvent, Data: []byte("{}"), Targets: []ASKey{99}}}); !errors.Is(err, ErrUnknownAS) {
		t.Errorf("append to unknown AS: %v", err)
	}
	appendN(t, s, 3, KindEvent, a)
	if err := s.SetState(ctx, a, State{Up: false, Failures: 2, LastError: "boom"}); err != nil {
		t.Fatal(err)
	}
	sts, err := be.status(ctx, path) // a read-only reader beside the writer
	if err != nil {
		t.Fatal(err)
	}
	if len(sts) != 1 || sts[0].ID != "a" || sts[0].Up || sts[0].Failures != 2 || sts[0].LastError != "boom" ||
		sts[0].PendingItems != 3 || sts[0].OldestPending.IsZero() {
		t.Errorf("status = %+v", sts)
	}
	s.Close()
	if _, err := s.Append(ctx, nil); !errors.Is(err, ErrClosed) {
		t.Errorf("after Close: %v", err)
	}
}

// BenchmarkAppend measures durable appends of 8 writers; positions=on
// gives each writer a stream of its own and each entry its position, to
// compare the cost of positions in one run.
func BenchmarkAppend(b *testing.B) {
	for _, positions := range []bool{false, true} {
		name := "positions=off"
		if positions {
			name = "positions=on"
		}
		b.Run(name, func(b *testing.B) {
			s := openSQLite(b)
			targets := make([]ASKey, 10)
			for i := range targets {
				targets[i] = ensure(b, s, fmt.Sprintf("as%d", i))
			}
			data := make([]byte, 500)
			var writer atomic.Int64
			next := sync.Pool{New: func() any { w := writer.Add(1); return &streamPos{name: fmt.Sprintf("events/w%d", w)} }}
			benchWriters(b, func(n int) error {
				sp := next.Get().(*streamPos)
				defer next.Put(sp)
				es := make([]Entry, n)
				for i := range es {
					es[i] = Entry{Kind: KindEvent, Data: data, Targets: targets}
					if positions {
						sp.pos++
						es[i].Stream, es[i].Pos = sp.name, sp.pos
					}
				}
				_, err := s.Append(context.Background(), es)
				return err
			})
		})
	}
}

// streamPos is one benchmark writer's stream.
type streamPos struct {
	name string
	pos  int64
}

// BenchmarkRawInsert is the limit Append is measured against: the same
// bytes into a bare table, same durability, same group commit.
func BenchmarkRawInsert(b *testing.B) {
	s := openSQLite(b)
	if _, err := s.wdb.Exec(`CREATE TABLE raw (seq INTEGER PRIMARY KEY, data BLOB)`); err != nil {
		b.Fatal(err)
	}
	data := make([]byte, 500)
	benchWriters(b, func(n int) error {
		return s.do(context.Background(), storehook.Append, n*len(data), func(tx *sql.Tx, _ *batch) error {
			for i := 0; i < n; i++ {
				if _, err := tx.Exec(`INSERT INTO raw (data) VALUES (?)`, data); err != nil {
					return err
				}
			}
			return nil
		})
	})
}

// benchWriters runs b.N events through write from 8 concurrent writers in
// batches of 50 and reports events/s.
func benchWriters(b *testing.B, write func(n int) error) {
	const writers, batchSize = 8, 50
	b.ResetTimer()
	var wg sync.WaitGroup
	per := (b.N + writers - 1) / writers
	for w := 0; w < writers; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for done := 0; done < per; done += batchSize {
				if err := write(min(batchSize, per-done)); err != nil {
					b.Error(err)
					return
				}
			}
		}()
	}
	wg.Wait()
	b.ReportMetric(float64(per*writers)/b.Elapsed().Seconds(), "events/s")
}

// TestFailedCommitLosesNothing: a commit that fails (disk full, read-only)
// fails every op of it, changes nothing, and the store works again after.
func TestFailedCommitLosesNothing(t *testing.T) { forEach(t, testFailedCommitLosesNothing) }

func testFailedCommitLosesNothing(t *testing.T, be backend) {
	ctx := context.Background()
	var failing sync.Mutex
	fail := false
	var seen []int64
	s := be.openHooked(t, be.newLoc(t), Options{
		OnCommit: func(c []Committed) {
			for _, x := range c {
				seen = append(seen, x.Item.Seq)
			}
		},
	}, &storehook.Hooks{Commit: func([]storehook.Op) storehook.Fault {
		failing.Lock()
		defer failing.Unlock()
		if fail {
			return storehook.Fail // a full disk
		}
		return storehook.None
	}})
	defer s.Close()
	a := ensure(t, s, "a")
	first := appendN(t, s, 2, KindEvent, a)
	failing.Lock()
	fail = true
	failing.Unlock()
	if _, err := s.Append(ctx, []Entry{{Kind: KindEvent, Data: []byte("{}"), Targets: []ASKey{a}}}); err == nil {
		t.Fatal("append succeeded on a full disk")
	}
	if _, err := s.Freeze(ctx, a, 0, []Txn{{Range: Range{first[0] - 1, first[1]}}}); err == nil {
		t.Fatal("freeze succeeded on a full disk")
	}
	failing.Lock()
	fail = false
	failing.Unlock()
	next := appendN(t, s, 1, KindEvent, a)
	if next[0] != first[1]+1 {
		t.Errorf("seq after a failed commit %d, want %d (nothing of the failed commit may remain)", next[0], first[1]+1)
	}
	ids, err := s.Freeze(ctx, a, 0, []Txn{{Range: Range{first[0] - 1, next[0]}}})
	if err != nil || ids[0] != 1 {
		t.Errorf("freeze after recovery = %v, %v; want txn 1 (the failed freeze took no id)", ids, err)
	}
	items, _ := s.Read(ctx, a, 0, 10, 0)
	if len(items) != 3 || len(seen) != 3 {
		t.Errorf("stream has %d items, OnCommit saw %d; want 3 each", len(items), len(seen))
	}
}

// TestCompleteMany checks that several completions in one write are the
// same as one at a time, and that an unknown id does not stop the others.
func TestCompleteMany(t *testing.T) { forEach(t, testCompleteMany) }

func testCompleteMany(t *testing.T, be backend) {
	ctx := context.Background()
	s := be.fresh(t, Options{})
	a := ensure(t, s, "a")
	seqs := appendN(t, s, 6, KindEvent, a)
	ids, err := s.Freeze(ctx, a, 0, []Txn{{Range: Range{0, seqs[1]}}, {Range: Range{seqs[1], seqs[3]}}, {Range: Range{seqs[3], seqs[5]}}})
	if err != nil {
		t.Fatal(err)
	}
	if err := s.CompleteMany(ctx, a, ids[:2]); err != nil {
		t.Fatal(err)
	}
	if d, _ := s.Delivered(ctx, a); d != seqs[3] {
		t.Errorf("delivered %d, want %d", d, seqs[3])
	}
	if err := s.CompleteMany(ctx, a, []int64{ids[0], ids[2], 99}); !errors.Is(err, ErrUnknownTxn) {
		t.Errorf("completing %d twice and 99 never issued: %v, want ErrUnknownTxn for 99 only", ids[0], err)
	}
	if d, _ := s.Delivered(ctx, a); d != seqs[5] {
		t.Errorf("delivered %d after the known one, want %d", d, seqs[5])
	}
	if frozen, err := s.Frozen(ctx, a); err != nil || len(frozen) != 0 {
		t.Errorf("Frozen = %v, %v; want none", frozen, err)
	}
}

// TestCompleteFreeze: each half of a CompleteFreeze answers as if called
// alone, and a refused half does not hold the other back.
func TestCompleteFreeze(t *testing.T) {
	tests := []struct {
		name                string
		complete            func(ids []int64) []int64
		after               int // index into seqs the new transaction starts after
		wantCompleteErr     error
		wantFreezeErr       error
		wantDelivered, last int // indexes into seqs (-1: the start, none frozen)
	}{
		{"both land", func(ids []int64) []int64 { return ids[:1] }, 3, nil, nil, 1, 5},
		{"unknown id refused, freeze lands", func(ids []int64) []int64 { return []int64{99} }, 3, ErrUnknownTxn, nil, -1, 5},
		{"bad range refused, complete lands", func(ids []int64) []int64 { return ids[:2] }, 2, nil, ErrBadRange, 3, -1},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ctx := context.Background()
			s := openSQLite(t)
			a := ensure(t, s, "a")
			seqs := appendN(t, s, 6, KindEvent, a)
			start, _ := s.Delivered(ctx, a)
			ids, err := s.Freeze(ctx, a, 0, []Txn{{Range: Range{start, seqs[1]}}, {Range: Range{seqs[1], seqs[3]}}})
			if err != nil {
				t.Fatal(err)
			}
			got, cerr, ferr := s.CompleteFreeze(ctx, a, tt.complete(ids), 0, []Txn{{Range: Range{seqs[tt.after], seqs[5]}}})
			if !errors.Is(cerr, tt.wantCompleteErr) || !errors.Is(ferr, tt.wantFreezeErr) {
				t.Fatalf("errors %v, %v; want %v, %v", cerr, ferr, tt.wantCompleteErr, tt.wantFreezeErr)
			}
			if ferr == nil && (len(got) != 1 || got[0] != ids[1]+1) {
				t.Errorf("ids %v, want [%d]", got, ids[1]+1)
			}
			want := start
			if tt.wantDelivered >= 0 {
				want = seqs[tt.wantDelivered]
			}
			if d, _ := s.Delivered(ctx, a); d != want {
				t.Errorf("delivered %d, want %d", d, want)
			}
			frozen, err := s.Frozen(ctx, a)
			switch {
			case err != nil:
				t.Error(err)
			case tt.last < 0 && len(frozen) != 0:
				t.Errorf("Frozen = %v, want none", frozen)
			case tt.last >= 0 && (len(frozen) == 0 || frozen[len(frozen)-1].Range.Last != seqs[tt.last]):
				t.Errorf("Frozen = %v, want the last ending at %d", frozen, seqs[tt.last])
			}
		})
	}
}
