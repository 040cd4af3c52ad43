package txnstore

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"testing"

	"github.com/asdispatch/asdispatch/internal/storehook"
)

func at(stream string, pos int64, targets ...ASKey) Entry {
	return Entry{Kind: KindEvent, Data: []byte(fmt.Sprintf(`{"%s":%d}`, stream, pos)), Targets: targets, Stream: stream, Pos: pos}
}

func position(t testing.TB, s Store, stream string) int64 {
	t.Helper()
	p, err := s.Position(context.Background(), stream)
	if err != nil {
		t.Fatal(err)
	}
	return p
}

// stored reports, per entry, whether Append gave it a seq.
func stored(seqs []int64) string {
	var b strings.Builder
	for _, q := range seqs {
		if q > 0 {
			b.WriteByte('+')
		} else {
			b.WriteByte('-')
		}
	}
	return b.String()
}

// TestPositions: entries at or below their stream's position are skipped,
// a replay that overlaps stores only what is new, entries without targets
// move the position too, entries sharing a position go together, streams
// are independent, and the position survives a reopen.
func TestPositions(t *testing.T) { forEach(t, testPositions) }

func testPositions(t *testing.T, be backend) {
	ctx := context.Background()
	loc := be.newLoc(t)
	s := be.openAt(t, loc, Options{})
	a := ensure(t, s, "a")
	if p := position(t, s, "events"); p != 0 {
		t.Fatalf("Position of a new stream = %d, want 0", p)
	}
	steps := []struct {
		name    string
		entries []Entry
		want    string // + stored, - not
		pos     map[string]int64
	}{
		{"first", []Entry{at("events", 1, a), at("events", 2, a), at("events", 3, a)}, "+++", map[string]int64{"events": 3}},
		{"replay overlapping", []Entry{at("events", 2, a), at("events", 3, a), at("events", 4, a), at("events", 5, a)}, "--++", map[string]int64{"events": 5}},
		{"no targets moves it", []Entry{at("events", 6)}, "-", map[string]int64{"events": 6}},
		{"shared position", []Entry{at("events", 8, a), at("events", 8, a)}, "++", map[string]int64{"events": 8}},
		{"shared position replayed", []Entry{at("events", 8, a), at("events", 8, a)}, "--", map[string]int64{"events": 8}},
		{"streams apart", []Entry{at("receipts", 2, a), at("events", 9, a), Entry{Kind: KindEvent, Data: []byte(`{}`), Targets: []ASKey{a}}},
			"+++", map[string]int64{"events": 9, "receipts": 2}},
		{"no position is never skipped", []Entry{{Kind: KindEvent, Data: []byte(`{}`), Targets: []ASKey{a}}}, "+", map[string]int64{"events": 9}},
	}
	for _, st := range steps {
		seqs, err := s.Append(ctx, st.entries)
		if err != nil {
			t.Fatalf("%s: %v", st.name, err)
		}
		if got := stored(seqs); got != st.want {
			t.Errorf("%s: stored %s, want %s", st.name, got, st.want)
		}
		for stream, want := range st.pos {
			if p := position(t, s, stream); p != want {
				t.Errorf("%s: Position(%s) = %d, want %d", st.name, stream, p, want)
			}
		}
	}
	items, err := s.Read(ctx, a, 0, 100, 0)
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, it := range items {
		got = append(got, string(it.Data))
	}
	want := `{"events":1} {"events":2} {"events":3} {"events":4} {"events":5} {"events":8} {"events":8} {"receipts":2} {"events":9} {} {}`
	if strings.Join(got, " ") != want {
		t.Errorf("stream = %s\nwant %s", strings.Join(got, " "), want)
	}
	s.Close()

	s = be.openAt(t, loc, Options{})
	defer s.Close()
	if p := position(t, s, "events"); p != 9 {
		t.Errorf("Position after reopen = %d, want 9", p)
	}
	if seqs, err := s.Append(ctx, []Entry{at("events", 9, a), at("events", 10, a)}); err != nil || stored(seqs) != "-+" {
		t.Errorf("replay after reopen stored %s, %v; want -+", stored(seqs), err)
	}
}

// TestBadPositions: positions that cannot be right fail the call, store
// nothing and move nothing.
func TestBadPositions(t *testing.T) { forEach(t, testBadPositions) }

func testBadPositions(t *testing.T, be backend) {
	ctx := context.Background()
	s := be.fresh(t, Options{})
	a := ensure(t, s, "a")
	for name, es := range map[string][]Entry{
		"going down":      {at("events", 5, a), at("events", 4, a)},
		"zero":            {at("events", 0, a)},
		"negative":        {at("events", -1, a)},
		"pos, no stream":  {{Kind: KindEvent, Data: []byte(`{}`), Targets: []ASKey{a}, Pos: 3}},
		"long name":       {at(strings.Repeat("s", 256), 1, a)},
		"not UTF-8":       {at("ev\xffents", 1, a)},
		"NUL in the name": {at("ev\x00ents", 1, a)},
	} {
		if _, err := s.Append(ctx, es); !errors.Is(err, ErrBadPosition) {
			t.Errorf("%s: %v, want ErrBadPosition", name, err)
		}
	}
	if p := position(t, s, "events"); p != 0 || count(t, s, "items") != 0 {
		t.Errorf("after refused appends: position %d, %d items; want 0, 0", p, count(t, s, "items"))
	}
}

// TestPositionsExactlyOnceAfterFaults: an Append with positions whose
// commit failed is repeated and stores its entries (the position did not
// move, on SQLite not in its cache either); one whose commit landed but
// failed (a lost COMMIT answer) is repeated and stores nothing again.
func TestPositionsExactlyOnceAfterFaults(t *testing.T) {
	forEach(t, testPositionsExactlyOnceAfterFaults)
}

func testPositionsExactlyOnceAfterFaults(t *testing.T, be backend) {
	ctx := context.Background()
	var f faults
	s := be.openHooked(t, be.newLoc(t), Options{}, f.hooks())
	defer s.Close()
	a := ensure(t, s, "a")

	f.arm(storehook.Append, storehook.Fail)
	batch := []Entry{at("events", 1, a), at("events", 2, a)}
	if _, err := s.Append(ctx, batch); !errors.Is(err, storehook.ErrInjected) {
		t.Fatalf("failed append: %v", err)
	}
	if p := position(t, s, "events"); p != 0 {
		t.Fatalf("Position after a failed commit = %d, want 0", p)
	}
	if seqs, err := s.Append(ctx, batch); err != nil || stored(seqs) != "++" {
		t.Fatalf("repeat of a failed append stored %s, %v; want ++", stored(seqs), err)
	}

	f.arm(storehook.Append, storehook.Ambiguous)
	batch = []Entry{at("events", 3, a), at("events", 4, a)}
	if _, err := s.Append(ctx, batch); !errors.Is(err, storehook.ErrInjected) {
		t.Fatalf("ambiguous append: %v", err)
	}
	if seqs, err := s.Append(ctx, batch); err != nil || stored(seqs) != "--" {
		t.Fatalf("repeat of an append that landed stored %s, %v; want -- (exactly once)", stored(seqs), err)
	}
	if n := count(t, s, "items"); n != 4 {
		t.Errorf("%d items, want 4", n)
	}
	if p := position(t, s, "events"); p != 4 {
		t.Errorf("Position = %d, want 4", p)
	}
}

// TestPositionsInOneCommit: appends of several callers sharing a commit
// are judged in queue order against the position as the earlier ones
// leave it, and each stream's row ends at its highest position.
func TestPositionsInOneCommit(t *testing.T) { forEach(t, testPositionsInOneCommit) }

func testPositionsInOneCommit(t *testing.T, be backend) {
	ctx := context.Background()
	s := be.fresh(t, Options{})
	a := ensure(t, s, "a")
	release := holdWriter(t, s)
	calls := [][]Entry{
		{at("events", 1, a), at("events", 2, a)},
		{at("events", 2, a), at("events", 3, a)}, // overlaps the first
		{at("typing", 7)},
	}
	results := make([]chan string, len(calls))
	for i, es := range calls {
		results[i] = make(chan string, 1)
		go func() {
			seqs, err := s.Append(ctx, es)
			if err != nil {
				results[i] <- err.Error()
				return
			}
			results[i] <- stored(seqs)
		}()
		waitQueued(t, s, i+1)
	}
	release()
	for i, want := range []string{"++", "-+", "-"} {
		if got := <-results[i]; got != want {
			t.Errorf("call %d stored %s, want %s", i, got, want)
		}
	}
	if p, q := position(t, s, "events"), position(t, s, "typing"); p != 3 || q != 7 {
		t.Errorf("positions events %d typing %d, want 3 and 7", p, q)
	}
}

// TestOpenFromVersion3 opens a store of schema 3 (as main had it before
// positions): it is migrated in place to schema 4, its queue intact, every
// stream at position 0.
func TestOpenFromVersion3(t *testing.T) { forEach(t, testOpenFromVersion3) }

func testOpenFromVersion3(t *testing.T, be backend) {
	ctx := context.Background()
	loc := be.newLoc(t)
	tx, d := atVersion(t, be, loc, 3)
	for _, q := range []string{
		`UPDATE meta SET value = 3 WHERE key = 'next_seq'`,
		`INSERT INTO appservices (id, next_txn, delivered) VALUES ('a', 1, 0)`,
		`INSERT INTO items (seq, kind, data, created_ms) VALUES (1, 1, '{"n":1}', 1000), (2, 1, '{"n":2}', 1000)`,
	} {
		if _, err := tx.ExecContext(ctx, q); err != nil {
			t.Fatalf("%s: %v", q, err)
		}
	}
	if _, err := tx.ExecContext(ctx, d.q(`INSERT INTO streams (as_key, last_seq, first_seq, seqs) VALUES (1, 2, 1, ?)`), encodeSeqs([]int64{1, 2})); err != nil {
		t.Fatal(err)
	}
	if err := tx.Commit(); err != nil {
		t.Fatal(err)
	}

	s := be.openAt(t, loc, Options{})
	defer s.Close()
	var v int
	if err := rdb(s).QueryRow(`SELECT MAX(version) FROM schema_version`).Scan(&v); err != nil || v != len(migrations) {
		t.Fatalf("schema version %d, %v; want %d", v, err, len(migrations))
	}
	a := ensure(t, s, "a")
	if p := position(t, s, "events"); p != 0 {
		t.Errorf("Position after the upgrade = %d, want 0", p)
	}
	if seqs, err := s.Append(ctx, []Entry{at("events", 1, a)}); err != nil || seqs[0] != 3 {
		t.Fatalf("append after the upgrade = %v, %v; want seq 3", seqs, err)
	}
	items, err := s.Read(ctx, a, 0, 10, 0)
	if err != nil || len(items) != 3 || string(items[0].Data) != `{"n":1}` {
		t.Errorf("Read = %+v, %v; want the 2 old items and the new one", items, err)
	}
}
