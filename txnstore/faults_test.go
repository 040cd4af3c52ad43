package txnstore

import (
	"bytes"
	"context"
	"database/sql"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"
	"unicode/utf8"

	"github.com/asdispatch/asdispatch/internal/storehook"
	"github.com/asdispatch/asdispatch/txnstore/pgtest"
)

// faults injects one fault into the next commit holding an op of kind.
type faults struct {
	mu    sync.Mutex
	kind  storehook.Op
	fault storehook.Fault
}

func (f *faults) arm(kind storehook.Op, fault storehook.Fault) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.kind, f.fault = kind, fault
}

func (f *faults) hooks() *storehook.Hooks {
	return &storehook.Hooks{Commit: func(ops []storehook.Op) storehook.Fault {
		f.mu.Lock()
		defer f.mu.Unlock()
		if f.fault == storehook.None || !slices.Contains(ops, f.kind) {
			return storehook.None
		}
		fault := f.fault
		f.fault = storehook.None
		return fault
	}}
}

// TestAmbiguousFreezeRepeats: a Freeze whose commit landed but failed
// (lost COMMIT answer) is repeated as it was and gets the ids it landed
// with, plain and split; another store freezing the same ranges is still
// refused.
func TestAmbiguousFreezeRepeats(t *testing.T) { forEach(t, testAmbiguousFreezeRepeats) }

func testAmbiguousFreezeRepeats(t *testing.T, be backend) {
	ctx := context.Background()
	var f faults
	loc := be.newLoc(t)
	s := be.openHooked(t, loc, Options{}, f.hooks())
	defer s.Close()
	a := ensure(t, s, "a")
	seqs := appendN(t, s, 6, KindEvent, a)
	txns := []Txn{{Range: Range{0, seqs[1]}, Format: 1, Len: 10, Checksum: 7}, {Range: Range{seqs[1], seqs[3]}, Format: 1, Len: 20, Checksum: 8}}

	f.arm(storehook.Freeze, storehook.Ambiguous)
	if _, err := s.Freeze(ctx, a, 0, txns); !errors.Is(err, storehook.ErrInjected) {
		t.Fatalf("ambiguous freeze: %v", err)
	}
	if fr, _ := s.Frozen(ctx, a); len(fr) != 2 {
		t.Fatalf("the ambiguous freeze did not land: %+v", fr)
	}
	changed := slices.Clone(txns)
	changed[1].Checksum = 9
	if _, err := s.Freeze(ctx, a, 0, changed); !errors.Is(err, ErrBadRange) {
		t.Errorf("a different freeze over the landed one: %v, want ErrBadRange", err)
	}
	ids, err := s.Freeze(ctx, a, 0, txns)
	if err != nil || !slices.Equal(ids, []int64{1, 2}) {
		t.Fatalf("repeated freeze = %v, %v; want [1 2], nil", ids, err)
	}

	// A split (413) whose commit landed ambiguously.
	split := []Txn{{Range: Range{0, seqs[0]}, Format: 1, Len: 5, Checksum: 1}, {Range: Range{seqs[0], seqs[1]}, Format: 1, Len: 5, Checksum: 2}}
	f.arm(storehook.Freeze, storehook.Ambiguous)
	if _, err := s.Freeze(ctx, a, 1, split); !errors.Is(err, storehook.ErrInjected) {
		t.Fatalf("ambiguous split: %v", err)
	}
	if _, err := s.Freeze(ctx, a, 0, split); err == nil {
		t.Error("the split repeated without its replace was taken")
	}
	ids, err = s.Freeze(ctx, a, 1, split)
	if err != nil || !slices.Equal(ids, []int64{3, 4}) {
		t.Fatalf("repeated split = %v, %v; want [3 4], nil", ids, err)
	}
	fr, err := s.Frozen(ctx, a)
	if err != nil || len(fr) != 3 || fr[0].ID != 3 || fr[1].ID != 4 || fr[2].ID != 2 {
		t.Fatalf("Frozen after the split = %+v, %v; want 3, 4, 2", fr, err)
	}
	next, err := s.Freeze(ctx, a, 0, []Txn{{Range: Range{seqs[3], seqs[5]}}})
	if err != nil || next[0] != 5 {
		t.Errorf("next freeze = %v, %v; want [5]: repeats take no ids", next, err)
	}

	// Another store (process) freezing ranges already frozen is refused:
	// only a repeat of its own unsure freeze is answered with ids.
	other := be.openAt(t, loc, Options{})
	defer other.Close()
	if ids, err := other.Freeze(ctx, a, 0, []Txn{{Range: Range{seqs[3], seqs[5]}}}); !errors.Is(err, ErrBadRange) {
		t.Errorf("another store's freeze of a frozen range = %v, %v; want ErrBadRange", ids, err)
	}
}

// TestAmbiguousCompleteAndSaveBody: a Complete or SaveBody whose commit
// landed but failed succeeds when repeated.
func TestAmbiguousCompleteAndSaveBody(t *testing.T) { forEach(t, testAmbiguousCompleteAndSaveBody) }

func testAmbiguousCompleteAndSaveBody(t *testing.T, be backend) {
	ctx := context.Background()
	var f faults
	s := be.openHooked(t, be.newLoc(t), Options{}, f.hooks())
	defer s.Close()
	a := ensure(t, s, "a")
	seqs := appendN(t, s, 4, KindEvent, a)
	if _, err := s.Freeze(ctx, a, 0, []Txn{{Range: Range{0, seqs[1]}}, {Range: Range{seqs[1], seqs[3]}}}); err != nil {
		t.Fatal(err)
	}
	body := []byte(`{"events":[1,2]}`)
	f.arm(storehook.SaveBody, storehook.Ambiguous)
	if err := s.SaveBody(ctx, a, 1, body); !errors.Is(err, storehook.ErrInjected) {
		t.Fatalf("ambiguous SaveBody: %v", err)
	}
	if err := s.SaveBody(ctx, a, 1, body); err != nil {
		t.Errorf("repeated SaveBody: %v", err)
	}
	if err := s.SaveBody(ctx, a, 1, []byte(`{"events":[]}`)); !errors.Is(err, ErrBodyConflict) {
		t.Errorf("SaveBody of other bytes: %v, want ErrBodyConflict", err)
	}
	f.arm(storehook.Complete, storehook.Ambiguous)
	if err := s.Complete(ctx, a, 1); !errors.Is(err, storehook.ErrInjected) {
		t.Fatalf("ambiguous Complete: %v", err)
	}
	if err := s.Complete(ctx, a, 1); err != nil {
		t.Errorf("repeated Complete: %v, want nil", err)
	}
	if d, _ := s.Delivered(ctx, a); d != seqs[1] {
		t.Errorf("delivered %d, want %d", d, seqs[1])
	}
	// A failure before the commit changes nothing; the repeat does it.
	f.arm(storehook.Complete, storehook.Fail)
	if err := s.Complete(ctx, a, 2); !errors.Is(err, storehook.ErrInjected) {
		t.Fatalf("failed Complete: %v", err)
	}
	if d, _ := s.Delivered(ctx, a); d != seqs[1] {
		t.Errorf("delivered %d after a failed Complete, want %d", d, seqs[1])
	}
	if err := s.Complete(ctx, a, 2); err != nil {
		t.Fatal(err)
	}
	if err := s.Complete(ctx, a, 3); !errors.Is(err, ErrUnknownTxn) {
		t.Errorf("Complete of an id never issued: %v, want ErrUnknownTxn", err)
	}
	// Lease calls fail as injected, and a repeat works.
	f.arm(storehook.Lease, storehook.Ambiguous)
	if ok, err := s.Acquire(ctx, a, "p1", time.Minute); ok || !errors.Is(err, storehook.ErrInjected) {
		t.Errorf("ambiguous Acquire = %v, %v", ok, err)
	}
	if ok, err := s.Acquire(ctx, a, "p1", time.Minute); !ok || err != nil {
		t.Errorf("repeated Acquire = %v, %v", ok, err)
	}
}

// TestCursorNeverPassesFrozen: Complete of a transaction while an earlier
// one is frozen is refused, so the cursor never passes a transaction whose
// completion is not recorded (issue 13, item 1).
func TestCursorNeverPassesFrozen(t *testing.T) { forEach(t, testCursorNeverPassesFrozen) }

func testCursorNeverPassesFrozen(t *testing.T, be backend) {
	ctx := context.Background()
	s := be.fresh(t, Options{})
	a := ensure(t, s, "a")
	seqs := appendN(t, s, 6, KindEvent, a)
	// 1: (0, s3], 2: (s3, s5]; then 1 splits into 3: (0, s1], 4: (s1, s3].
	if _, err := s.Freeze(ctx, a, 0, []Txn{{Range: Range{0, seqs[3]}}, {Range: Range{seqs[3], seqs[5]}}}); err != nil {
		t.Fatal(err)
	}
	if err := s.Complete(ctx, a, 2); !errors.Is(err, ErrOutOfOrder) {
		t.Fatalf("Complete of 2 before 1: %v, want ErrOutOfOrder", err)
	}
	if _, err := s.Freeze(ctx, a, 1, []Txn{{Range: Range{0, seqs[1]}}, {Range: Range{seqs[1], seqs[3]}}}); err != nil {
		t.Fatal(err)
	}
	steps := []struct {
		ids       []int64
		want      error
		delivered int64
		frozen    []int64
	}{
		{[]int64{2}, ErrOutOfOrder, 0, []int64{3, 4, 2}},
		{[]int64{1}, ErrUnknownTxn, 0, []int64{3, 4, 2}}, // split: never completed itself
		{[]int64{4}, ErrOutOfOrder, 0, []int64{3, 4, 2}},
		{[]int64{4, 3, 2}, nil, seqs[5], nil},                  // any order within one call
		{[]int64{1, 2, 3}, nil, seqs[5], nil},                  // all at or below the cursor now
		{[]int64{6}, ErrUnknownTxn, seqs[5], nil},              // never issued
		{[]int64{2, 9}, ErrUnknownTxn, seqs[5], nil},           // the known one still succeeds
		{[]int64{-1, 0}, ErrUnknownTxn, seqs[5], []int64(nil)}, // not ids
	}
	for i, st := range steps {
		err := s.CompleteMany(ctx, a, st.ids)
		if (st.want == nil) != (err == nil) || (st.want != nil && !errors.Is(err, st.want)) {
			t.Errorf("step %d: CompleteMany(%v) = %v, want %v", i, st.ids, err, st.want)
		}
		if d, _ := s.Delivered(ctx, a); d != st.delivered {
			t.Errorf("step %d: delivered %d, want %d", i, d, st.delivered)
		}
		fr, err := s.Frozen(ctx, a)
		if err != nil {
			t.Fatal(err)
		}
		var got []int64
		for _, x := range fr {
			got = append(got, x.ID)
		}
		if !slices.Equal(got, st.frozen) {
			t.Errorf("step %d: frozen %v, want %v", i, got, st.frozen)
		}
	}
	if n := count(t, s, "txns"); n != 0 {
		t.Errorf("%d txn rows left (tombstones of splits included) once all is delivered", n)
	}
	// A partial prefix: with 1 and 2 frozen, CompleteMany(1, 2 ... ) of
	// [1] moves the cursor to 1's end only.
	more := appendN(t, s, 2, KindEvent, a)
	ids, err := s.Freeze(ctx, a, 0, []Txn{{Range: Range{seqs[5], more[0]}}, {Range: Range{more[0], more[1]}}})
	if err != nil {
		t.Fatal(err)
	}
	if err := s.CompleteMany(ctx, a, []int64{ids[0]}); err != nil {
		t.Fatal(err)
	}
	if d, _ := s.Delivered(ctx, a); d != more[0] {
		t.Errorf("delivered %d, want %d", d, more[0])
	}
}

// TestOpenFromVersion2 opens a store whose data was written by the
// previous schema (version 2, as main left it): queues and frozen
// transactions are intact, and a frozen transaction the cursor has passed
// (left by a lost completion) is gone and never returned by Frozen.
func TestOpenFromVersion2(t *testing.T) { forEach(t, testOpenFromVersion2) }

// atVersion begins a transaction on a new store at loc whose schema is at
// version, as an older release left it; the test fills and commits it.
func atVersion(t *testing.T, be backend, loc string, version int) (*sql.Tx, *dialect) {
	t.Helper()
	ctx := context.Background()
	var db *sql.DB
	d := sqliteSQL
	if be.name == "sqlite" {
		var err error
		if db, err = sql.Open("sqlite3", "file:"+loc); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { db.Close() })
	} else {
		db, d = pgtest.Open(t, loc), postgresSQL
	}
	tx, err := db.BeginTx(ctx, nil)
	if err != nil {
		t.Fatal(err)
	}
	if err := migrateTo(ctx, tx, d, version); err != nil {
		t.Fatal(err)
	}
	return tx, d
}

func testOpenFromVersion2(t *testing.T, be backend) {
	ctx := context.Background()
	loc := be.newLoc(t)
	tx, d := atVersion(t, be, loc, 2)
	// AS "a" (key 1): items 1..6, delivered 2, txn 3 (0, 2] left frozen by a
	// lost completion, txn 4 (2, 4] frozen with a saved body, next txn 5.
	stmts := []struct {
		q    string
		args []any
	}{
		{`UPDATE meta SET value = 7 WHERE key = 'next_seq'`, nil},
		{`INSERT INTO appservices (id, next_txn, delivered, up, failures, last_error) VALUES ('a', 5, 2, 0, 3, 'down')`, nil},
		{`INSERT INTO streams (as_key, last_seq, first_seq, seqs) VALUES (1, 6, 1, ?)`, []any{encodeSeqs([]int64{1, 2, 3, 4, 5, 6})}},
		{`INSERT INTO txns (as_key, txn_id, after_seq, last_seq, format, len, checksum) VALUES (1, 3, 0, 2, 1, 10, 77)`, nil},
		{`INSERT INTO txns (as_key, txn_id, after_seq, last_seq, format, len, checksum, body) VALUES (1, 4, 2, 4, 1, 11, 78, ?)`, []any{[]byte("body4")}},
	}
	for q := 1; q <= 6; q++ {
		stmts = append(stmts, struct {
			q    string
			args []any
		}{`INSERT INTO items (seq, kind, data, created_ms) VALUES (?, 1, ?, 1000)`, []any{q, []byte(fmt.Sprintf(`{"n":%d}`, q))}})
	}
	for _, st := range stmts {
		if _, err := tx.ExecContext(ctx, d.q(st.q), st.args...); err != nil {
			t.Fatalf("%s: %v", st.q, err)
		}
	}
	if err := tx.Commit(); err != nil {
		t.Fatal(err)
	}

	// `asdispatch status` of the new version before the store is migrated.
	if sts, err := be.status(ctx, loc); err != nil || len(sts) != 1 || sts[0].PendingTxns != 1 || sts[0].PendingItems != 4 {
		t.Errorf("status before the upgrade = %+v, %v", sts, err)
	}

	s := be.openAt(t, loc, Options{})
	defer s.Close()
	var v int
	if err := rdb(s).QueryRow(`SELECT MAX(version) FROM schema_version`).Scan(&v); err != nil || v != len(migrations) {
		t.Fatalf("schema version %d, %v; want %d", v, err, len(migrations))
	}
	a := ensure(t, s, "a")
	fr, err := s.Frozen(ctx, a)
	if err != nil || len(fr) != 1 || fr[0].ID != 4 || fr[0].Range != (Range{2, 4}) || fr[0].Format != 1 || fr[0].Len != 11 ||
		fr[0].Checksum != 78 || string(fr[0].Body) != "body4" {
		t.Fatalf("Frozen = %+v, %v; want txn 4 intact", fr, err)
	}
	if n := count(t, s, "txns"); n != 1 {
		t.Errorf("%d txn rows, want 1: the one below the cursor is dropped at open", n)
	}
	items, err := s.Read(ctx, a, 2, 100, 0)
	if err != nil || len(items) != 4 || items[0].Seq != 3 || string(items[3].Data) != `{"n":6}` {
		t.Fatalf("Read = %+v, %v", items, err)
	}
	if err := s.Complete(ctx, a, 3); err != nil {
		t.Errorf("Complete of the dropped txn 3: %v, want nil (it was delivered)", err)
	}
	if err := s.Complete(ctx, a, 4); err != nil {
		t.Fatal(err)
	}
	ids, err := s.Freeze(ctx, a, 0, []Txn{{Range: Range{4, 6}}})
	if err != nil || ids[0] != 5 {
		t.Errorf("freeze after the upgrade = %v, %v; want txn 5", ids, err)
	}
	if next := appendN(t, s, 1, KindEvent, a); next[0] != 7 {
		t.Errorf("seq after the upgrade %d, want 7", next[0])
	}
	sts, err := s.Statuses(ctx)
	if err != nil || len(sts) != 1 || sts[0].Up || sts[0].Failures != 3 || sts[0].LastError != "down" || sts[0].PendingTxns != 1 {
		t.Errorf("Statuses = %+v, %v", sts, err)
	}

	// A stale row, however it got there, is never returned.
	if _, err := rdb(s).Exec(d.q(`INSERT INTO txns (as_key, txn_id, after_seq, last_seq, format, len, checksum) VALUES (?, 99, 0, 4, 0, 0, 0)`), a); err != nil {
		t.Fatal(err)
	}
	if fr, _ := s.Frozen(ctx, a); len(fr) != 1 || fr[0].ID != 5 {
		t.Errorf("Frozen = %+v; want txn 5 only (not one below the cursor)", fr)
	}
}

// doRaw queues fn as one op of s's writer, of kind, and waits for it.
func doRaw(ctx context.Context, s Store, kind storehook.Op, fn func(ctx context.Context, tx *sql.Tx) error) error {
	switch s := s.(type) {
	case *SQLite:
		return s.do(ctx, kind, 0, func(tx *sql.Tx, _ *batch) error { return fn(ctx, tx) })
	case *Postgres:
		return s.do(ctx, kind, 0, func(ctx context.Context, tx *sql.Tx, _ *pgBatch) error { return fn(ctx, tx) })
	}
	panic(fmt.Sprintf("unknown store %T", s))
}

func queued(s Store) int {
	switch s := s.(type) {
	case *SQLite:
		return len(s.w.ops)
	case *Postgres:
		return len(s.w.ops)
	}
	panic(fmt.Sprintf("unknown store %T", s))
}

// holdWriter blocks s's writer in a commit until the returned func is
// called; ops queued meanwhile share the next commit.
func holdWriter(t *testing.T, s Store) (release func()) {
	t.Helper()
	started, hold := make(chan struct{}), make(chan struct{})
	go func() {
		_ = doRaw(context.Background(), s, 0, func(context.Context, *sql.Tx) error {
			close(started)
			<-hold
			return nil
		})
	}()
	<-started
	return func() { close(hold) }
}

// waitQueued waits until n ops wait for s's writer.
func waitQueued(t *testing.T, s Store, n int) {
	t.Helper()
	for deadline := time.Now().Add(10 * time.Second); queued(s) < n; {
		if time.Now().After(deadline) {
			t.Fatalf("%d ops queued, want %d", queued(s), n)
		}
		time.Sleep(time.Millisecond)
	}
}

// TestBadInputFailsItsOpAlone: in one group commit, an op whose statement
// is refused for its input (a constraint; on PostgreSQL also text that is
// not UTF-8) fails alone; the Appends, Freeze, Complete and SetState of
// other callers in that commit succeed (issue 13: one AS's error text
// failed everyone's writes).
func TestBadInputFailsItsOpAlone(t *testing.T) { forEach(t, testBadInputFailsItsOpAlone) }

func testBadInputFailsItsOpAlone(t *testing.T, be backend) {
	ctx := context.Background()
	var mu sync.Mutex
	var commits [][]storehook.Op
	s := be.openHooked(t, be.newLoc(t), Options{}, &storehook.Hooks{Commit: func(ops []storehook.Op) storehook.Fault {
		mu.Lock()
		defer mu.Unlock()
		commits = append(commits, ops)
		return storehook.None
	}})
	defer s.Close()
	a, b := ensure(t, s, "a"), ensure(t, s, "b")
	seqs := appendN(t, s, 2, KindEvent, a)
	if _, err := s.Freeze(ctx, a, 0, []Txn{{Range: Range{0, seqs[0]}}}); err != nil {
		t.Fatal(err)
	}
	bad := []struct {
		name string
		fn   func(ctx context.Context, tx *sql.Tx) error
	}{
		{"duplicate AS id", func(ctx context.Context, tx *sql.Tx) error {
			_, err := tx.ExecContext(ctx, `INSERT INTO appservices (id, next_txn, delivered) VALUES ('a', 1, 0)`)
			return err
		}},
	}
	if be.name == "postgres" {
		// What SetState sent before it cleaned LastError: SQLSTATE 22021.
		bad = append(bad, struct {
			name string
			fn   func(ctx context.Context, tx *sql.Tx) error
		}{"text not UTF-8", func(ctx context.Context, tx *sql.Tx) error {
			_, err := tx.ExecContext(ctx, `UPDATE appservices SET last_error = $1 WHERE as_key = $2`, "cut \xc3", b)
			return err
		}})
	}
	for round, bt := range bad {
		mu.Lock()
		commits = nil
		mu.Unlock()
		release := holdWriter(t, s)
		const appenders = 6
		errs := make(chan error, appenders+4)
		var wg sync.WaitGroup
		run := func(fn func() error) {
			wg.Add(1)
			go func() { defer wg.Done(); errs <- fn() }()
		}
		for i := 0; i < appenders; i++ {
			run(func() error {
				_, err := s.Append(ctx, []Entry{{Kind: KindEvent, Data: []byte(`{}`), Targets: []ASKey{a, b}}})
				return err
			})
		}
		badErr := make(chan error, 1)
		wg.Add(1)
		go func() { defer wg.Done(); badErr <- doRaw(ctx, s, storehook.State, bt.fn) }()
		run(func() error { return s.SetState(ctx, b, State{Failures: round + 1, LastError: "x"}) })
		run(func() error {
			if round == 0 {
				return s.Complete(ctx, a, 1)
			}
			return nil
		})
		want := appenders + 2 // and the bad op
		if round == 0 {
			want++ // the Complete
		}
		waitQueued(t, s, want)
		release()
		wg.Wait()
		close(errs)
		for err := range errs {
			if err != nil {
				t.Errorf("%s: another op of the commit failed: %v", bt.name, err)
			}
		}
		if err := <-badErr; err == nil || !isInputError(err) {
			t.Errorf("%s: the bad op got %v, want its input refused", bt.name, err)
		}
		mu.Lock()
		shared := false
		for _, c := range commits {
			shared = shared || len(c) == want-1
		}
		mu.Unlock()
		if !shared {
			t.Errorf("%s: the ops did not share a commit attempt (%v): the test proves nothing", bt.name, commits)
		}
	}
	items, err := s.Read(ctx, b, 0, 100, 0)
	if err != nil || len(items) != 6*len(bad) {
		t.Errorf("b has %d items, %v; want %d", len(items), err, 6*len(bad))
	}
	if d, _ := s.Delivered(ctx, a); d != seqs[0] {
		t.Errorf("a delivered %d, want %d", d, seqs[0])
	}
}

// TestLastErrorCleaned: an AS's error text cut inside a UTF-8 character or
// holding NUL is stored cleaned on every backend, and the Appends sharing
// its commit succeed.
func TestLastErrorCleaned(t *testing.T) { forEach(t, testLastErrorCleaned) }

func testLastErrorCleaned(t *testing.T, be backend) {
	ctx := context.Background()
	s := be.fresh(t, Options{})
	a := ensure(t, s, "a")
	long := strings.Repeat("é", 2000) // 4000 bytes
	tests := []struct {
		name, in, want string
	}{
		{"cut in a character", "AS said: " + strings.Repeat("é", 300)[:511], "AS said: " + strings.Repeat("é", 255)},
		{"NUL", "bad\x00body", "badbody"},
		{"invalid bytes", "a\xffb\xc3", "ab"},
		{"too long", long, long[:maxLastError]},
		{"too long, cut on a boundary", "x" + long, "x" + long[:maxLastError-2]},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			release := holdWriter(t, s)
			var wg sync.WaitGroup
			errs := make(chan error, 4)
			for i := 0; i < 3; i++ {
				wg.Add(1)
				go func() {
					defer wg.Done()
					_, err := s.Append(ctx, []Entry{{Kind: KindEvent, Data: []byte(`{}`), Targets: []ASKey{a}}})
					errs <- err
				}()
			}
			wg.Add(1)
			go func() { defer wg.Done(); errs <- s.SetState(ctx, a, State{Failures: 1, LastError: tt.in}) }()
			waitQueued(t, s, 4)
			release()
			wg.Wait()
			close(errs)
			for err := range errs {
				if err != nil {
					t.Errorf("a write failed: %v", err)
				}
			}
			sts, err := s.Statuses(ctx)
			if err != nil {
				t.Fatal(err)
			}
			got := sts[0].LastError
			if got != tt.want || !utf8.ValidString(got) || strings.ContainsRune(got, 0) || len(got) > maxLastError {
				t.Errorf("LastError = %q (%d bytes), want %q", got, len(got), tt.want)
			}
		})
	}
}

// TestReadByteBudget: Read stops before maxBytes, but always returns the
// first item; dense and sparse streams.
func TestReadByteBudget(t *testing.T) { forEach(t, testReadByteBudget) }

func testReadByteBudget(t *testing.T, be backend) {
	ctx := context.Background()
	s := be.fresh(t, Options{})
	a, b := ensure(t, s, "a"), ensure(t, s, "b")
	var es []Entry
	for i := 0; i < 40; i++ {
		targets := []ASKey{a}
		if i%5 == 0 {
			targets = []ASKey{a, b} // b's stream is sparse
		}
		es = append(es, Entry{Kind: KindEvent, Data: bytes.Repeat([]byte{'x'}, 100), Targets: targets})
	}
	if _, err := s.Append(ctx, es); err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name     string
		as       ASKey
		maxItems int
		maxBytes int
		want     int
	}{
		{"no byte limit", a, 10, 0, 10},
		{"bytes bind first", a, 10, 250, 3},
		{"exact fit", a, 10, 300, 3},
		{"just under", a, 10, 299, 3},
		{"just over", a, 10, 301, 4},
		{"items bind first", a, 2, 1000, 2},
		{"one item over the budget", a, 10, 50, 1},
		{"sparse", b, 10, 350, 4},
		{"sparse, no limit", b, 10, 0, 8},
	}
	for _, tt := range tests {
		items, err := s.Read(ctx, tt.as, 0, tt.maxItems, tt.maxBytes)
		if err != nil || len(items) != tt.want {
			t.Errorf("%s: %d items, %v; want %d", tt.name, len(items), err, tt.want)
		}
		for i := 1; i < len(items); i++ {
			if items[i].Seq <= items[i-1].Seq {
				t.Errorf("%s: out of order", tt.name)
			}
		}
	}
}

// TestLargeAppendsBoundedByBytes: large concurrent appends are written in
// statements and commits bounded by bytes (on PostgreSQL one batch in one
// array passed its 1 GiB message limit); everything is stored intact.
func TestLargeAppendsBoundedByBytes(t *testing.T) { forEach(t, testLargeAppendsBoundedByBytes) }

func testLargeAppendsBoundedByBytes(t *testing.T, be backend) {
	ctx := context.Background()
	const stmt, batch, size = 64 << 10, 256 << 10, 25 << 10
	s := be.openHooked(t, be.newLoc(t), Options{}, &storehook.Hooks{StmtBytes: stmt, BatchBytes: batch})
	defer s.Close()
	a := ensure(t, s, "a")
	const writers, per = 12, 4
	var wg sync.WaitGroup
	for w := 0; w < writers; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			es := make([]Entry, per)
			for i := range es {
				es[i] = Entry{Kind: KindEvent, Data: bytes.Repeat([]byte{byte('a' + w)}, size), Targets: []ASKey{a}}
			}
			if _, err := s.Append(ctx, es); err != nil {
				t.Error(err)
			}
		}()
	}
	// One entry over the statement bound still goes, alone.
	huge := bytes.Repeat([]byte{'z'}, 3*stmt)
	if _, err := s.Append(ctx, []Entry{{Kind: KindEvent, Data: huge, Targets: []ASKey{a}}}); err != nil {
		t.Fatal(err)
	}
	wg.Wait()
	items, err := s.Read(ctx, a, 0, 1000, 0)
	if err != nil || len(items) != writers*per+1 {
		t.Fatalf("%d items, %v; want %d", len(items), err, writers*per+1)
	}
	for _, it := range items {
		if len(it.Data) != size && !bytes.Equal(it.Data, huge) {
			t.Fatalf("item %d has %d bytes", it.Seq, len(it.Data))
		}
	}
	// Two 25 KiB items share a statement, three would pass its bound; an
	// op of 100 KiB and the 192 KiB one never share a commit.
	st := s.stats()
	if st.stmtBytes != 2*size {
		t.Errorf("a statement of several items bound %d bytes, want %d (bound %d)", st.stmtBytes, 2*size, stmt)
	}
	if st.batchBytes > batch || st.batchBytes < 2*per*size {
		t.Errorf("the largest commit wrote %d bytes, want at least two appends (%d) and at most %d", st.batchBytes, 2*per*size, batch)
	}
}
