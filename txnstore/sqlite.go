package txnstore

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"net/url"
	"strings"
	"time"

	_ "github.com/mattn/go-sqlite3" // the embedded default backend
)

// Errors of individual calls; they fail only the call that caused them.
var (
	ErrUnknownAS  = errors.New("txnstore: unknown appservice")
	ErrUnknownTxn = errors.New("txnstore: unknown transaction")
	ErrBadRange   = errors.New("txnstore: transaction ranges do not follow the stream")
)

// callError marks an error found before an op wrote anything: it fails
// that op alone, not the commit it shares.
type callError struct{ error }

func (e callError) Unwrap() error { return e.error }

// SQLite is the embedded Store: one file, WAL, synchronous=FULL so a write
// that returned survives power loss. One writer goroutine merges the writes
// of all callers into shared commits.
type SQLite struct {
	opts Options
	wdb  *sql.DB // one connection, used only by the writer goroutine
	rdb  *sql.DB

	w *writer[*op]

	// Owned by the writer goroutine.
	nextSeq int64
	ases    map[ASKey]*asRow
	ids     map[string]ASKey
	commits int64
	sinceGC int
}

// asRow is the writer's cache of an appservices row.
type asRow struct {
	nextTxn    int64
	delivered  int64
	lastFrozen int64
}

// Stats are counters for tests and benchmarks.
type Stats struct {
	Commits int64
}

type op struct {
	fn   func(tx *sql.Tx, b *batch) error
	done chan error
}

// batch is what the ops of one commit add up to.
type batch struct {
	now       int64
	committed []Committed
	streams   map[ASKey][]int64
	// undo restores the writer's caches if the commit fails.
	undo   map[ASKey]asRow
	newIDs []string
}

// touch returns the cached row of as, saving it for undo first.
func (b *batch) touch(s *SQLite, as ASKey) *asRow {
	r := s.ases[as]
	if r == nil {
		return nil
	}
	if _, saved := b.undo[as]; !saved {
		b.undo[as] = *r
	}
	return r
}

// Open opens (creating if needed) the store at path.
func Open(ctx context.Context, path string, opts Options) (*SQLite, error) {
	dsn := "file:" + url.PathEscape(path) + "?_journal_mode=WAL&_synchronous=FULL&_busy_timeout=10000&_foreign_keys=off"
	wdb, err := sql.Open("sqlite3", dsn+"&_txlock=immediate")
	if err != nil {
		return nil, fmt.Errorf("txnstore: open %s: %w", path, err)
	}
	wdb.SetMaxOpenConns(1)
	rdb, err := sql.Open("sqlite3", dsn)
	if err != nil {
		wdb.Close()
		return nil, fmt.Errorf("txnstore: open %s: %w", path, err)
	}
	rdb.SetMaxOpenConns(4)
	s := &SQLite{opts: opts, wdb: wdb, rdb: rdb, w: newWriter[*op](),
		ases: map[ASKey]*asRow{}, ids: map[string]ASKey{}}
	if err := s.migrate(ctx); err != nil {
		wdb.Close()
		rdb.Close()
		return nil, fmt.Errorf("txnstore: %s: %w", path, err)
	}
	s.w.start(s.commit)
	return s, nil
}

func (s *SQLite) migrate(ctx context.Context) error {
	tx, err := s.wdb.BeginTx(ctx, nil)
	if err != nil {
		return err
	}
	defer tx.Rollback()
	if err := migrate(ctx, tx, sqliteSQL); err != nil {
		return err
	}
	if err := tx.QueryRowContext(ctx, `SELECT value FROM meta WHERE key = 'next_seq'`).Scan(&s.nextSeq); err != nil {
		return err
	}
	rows, err := tx.QueryContext(ctx, `SELECT a.as_key, a.id, a.next_txn, a.delivered, COALESCE(MAX(t.last_seq), 0)
		FROM appservices a LEFT JOIN txns t ON t.as_key = a.as_key GROUP BY a.as_key, a.id, a.next_txn, a.delivered`)
	if err != nil {
		return err
	}
	defer rows.Close()
	for rows.Next() {
		var k ASKey
		var id string
		r := &asRow{}
		if err := rows.Scan(&k, &id, &r.nextTxn, &r.delivered, &r.lastFrozen); err != nil {
			return err
		}
		s.ases[k], s.ids[id] = r, k
	}
	if err := rows.Err(); err != nil {
		return err
	}
	return tx.Commit()
}

// do hands fn to the writer and waits for its commit.
func (s *SQLite) do(ctx context.Context, fn func(tx *sql.Tx, b *batch) error) error {
	o := &op{fn: fn, done: make(chan error, 1)}
	if err := s.w.queue(ctx, o); err != nil {
		return err
	}
	return <-o.done
}

func (s *SQLite) commit(ops []*op) {
	seq0 := s.nextSeq
	errs := make([]error, len(ops))
	b := &batch{now: time.Now().UnixMilli(), streams: map[ASKey][]int64{}, undo: map[ASKey]asRow{}}
	err := func() error {
		tx, err := s.wdb.Begin()
		if err != nil {
			return err
		}
		defer tx.Rollback()
		for i, o := range ops {
			if err := o.fn(tx, b); err != nil {
				var ce callError
				if errors.As(err, &ce) {
					errs[i] = ce.error
					continue
				}
				return err
			}
		}
		if err := s.flushStreams(tx, b, seq0); err != nil {
			return err
		}
		if s.gcDue() {
			// In the commit, not after it: its own commit would cost another
			// fsync. A failed commit leaves the garbage for the next one.
			if _, err := tx.Exec(gcStreamsSQLite); err != nil {
				return err
			}
			if _, err := tx.Exec(gcItems); err != nil {
				return err
			}
		}
		if s.opts.BeforeCommit != nil {
			if err := s.opts.BeforeCommit(); err != nil {
				return err
			}
		}
		return tx.Commit()
	}()
	if err != nil {
		// Nothing of this batch happened: restore the writer's caches.
		s.nextSeq = seq0
		for k, r := range b.undo {
			*s.ases[k] = r
		}
		for _, id := range b.newIDs {
			delete(s.ases, s.ids[id])
			delete(s.ids, id)
		}
		for _, o := range ops {
			o.done <- fmt.Errorf("txnstore: commit: %w", err)
		}
		return
	}
	s.commits++
	if len(b.committed) > 0 && s.opts.OnCommit != nil {
		s.opts.OnCommit(b.committed)
	}
	for i, o := range ops {
		o.done <- errs[i]
	}
}

func (s *SQLite) flushStreams(tx *sql.Tx, b *batch, seq0 int64) error {
	if s.nextSeq == seq0 {
		return nil
	}
	// Many rows a statement: a commit touching 1,000 ASes writes 1,000
	// stream rows, and one statement each was most of its cost.
	args := make([]any, 0, 4*rowsPerInsert)
	n := 0
	flush := func() error {
		if n == 0 {
			return nil
		}
		q := insertStreams
		if n < rowsPerInsert {
			q = streamsInsert(n)
		}
		_, err := tx.Exec(q, args...)
		args, n = args[:0], 0
		return err
	}
	for k, seqs := range b.streams {
		args = append(args, k, seqs[len(seqs)-1], seqs[0], encodeSeqs(seqs))
		if n++; n == rowsPerInsert {
			if err := flush(); err != nil {
				return err
			}
		}
	}
	if err := flush(); err != nil {
		return err
	}
	_, err := tx.Exec(`UPDATE meta SET value = ? WHERE key = 'next_seq'`, s.nextSeq)
	return err
}

var insertStreams = streamsInsert(rowsPerInsert)

func streamsInsert(n int) string {
	return "INSERT INTO streams (as_key, last_seq, first_seq, seqs) VALUES " + strings.TrimSuffix(strings.Repeat("(?, ?, ?, ?), ", n), ", ")
}

// gcDue says whether this commit also deletes the stream rows and items
// nothing needs any more: every 64th commit, or sooner when the writer is
// idle, so the cost is spread thin.
func (s *SQLite) gcDue() bool {
	s.sinceGC++
	if s.sinceGC < 64 && !(s.w.idle() && s.sinceGC > 1) {
		return false
	}
	s.sinceGC = 0
	return true
}

// EnsureAS implements Store.
func (s *SQLite) EnsureAS(ctx context.Context, id string) (ASKey, error) {
	var key ASKey
	err := s.do(ctx, func(tx *sql.Tx, b *batch) error {
		if k, ok := s.ids[id]; ok {
			key = k
			return nil
		}
		// A new AS starts at the end of the log.
		res, err := tx.Exec(`INSERT INTO appservices (id, next_txn, delivered) VALUES (?, 1, ?)`, id, s.nextSeq-1)
		if err != nil {
			return err
		}
		k, err := res.LastInsertId()
		if err != nil {
			return err
		}
		key = ASKey(k)
		b.newIDs = append(b.newIDs, id)
		s.ids[id] = key
		s.ases[key] = &asRow{nextTxn: 1, delivered: s.nextSeq - 1}
		return nil
	})
	return key, err
}

const rowsPerInsert = 64

var insertMany = "INSERT INTO items (seq, kind, data, created_ms) VALUES " + strings.TrimSuffix(strings.Repeat("(?, ?, ?, ?), ", rowsPerInsert), ", ")

// Append implements Store.
func (s *SQLite) Append(ctx context.Context, entries []Entry) ([]int64, error) {
	seqs := make([]int64, len(entries))
	err := s.do(ctx, func(tx *sql.Tx, b *batch) error {
		for _, e := range entries {
			for _, k := range e.Targets {
				if s.ases[k] == nil {
					return callError{fmt.Errorf("%w: key %d", ErrUnknownAS, k)}
				}
			}
		}
		args := make([]any, 0, 4*rowsPerInsert)
		flush := func(n int) error {
			if n == 0 {
				return nil
			}
			q := insertMany
			if n < rowsPerInsert {
				q = "INSERT INTO items (seq, kind, data, created_ms) VALUES " + strings.TrimSuffix(strings.Repeat("(?, ?, ?, ?), ", n), ", ")
			}
			_, err := tx.Exec(q, args...)
			args = args[:0]
			return err
		}
		n := 0
		for i, e := range entries {
			if len(e.Targets) == 0 {
				continue
			}
			seq := s.nextSeq
			s.nextSeq++
			seqs[i] = seq
			args = append(args, seq, int(e.Kind), e.Data, b.now)
			n++
			if n == rowsPerInsert {
				if err := flush(n); err != nil {
					return err
				}
				n = 0
			}
			for _, k := range e.Targets {
				b.streams[k] = append(b.streams[k], seq)
			}
			b.committed = append(b.committed, Committed{Item: Item{Seq: seq, Kind: e.Kind, Data: e.Data}, Targets: e.Targets})
		}
		return flush(n)
	})
	if err != nil {
		return nil, err
	}
	return seqs, nil
}

// Read implements Store.
func (s *SQLite) Read(ctx context.Context, as ASKey, after int64, max int) ([]Item, error) {
	return readStream(ctx, s.rdb, sqliteSQL, as, after, max)
}

// Delivered implements Store.
func (s *SQLite) Delivered(ctx context.Context, as ASKey) (int64, error) {
	return readDelivered(ctx, s.rdb, sqliteSQL, as)
}

// Freeze implements Store.
func (s *SQLite) Freeze(ctx context.Context, as ASKey, replace int64, txns []Txn) ([]int64, error) {
	ids := make([]int64, len(txns))
	err := s.do(ctx, func(tx *sql.Tx, b *batch) error {
		r := b.touch(s, as)
		if r == nil {
			return callError{fmt.Errorf("%w: key %d", ErrUnknownAS, as)}
		}
		if err := checkFreeze(context.Background(), tx, sqliteSQL, as, replace, max(r.delivered, r.lastFrozen), txns); err != nil {
			return err
		}
		for i, t := range txns {
			id := r.nextTxn
			r.nextTxn++
			if _, err := tx.Exec(`INSERT INTO txns (as_key, txn_id, after_seq, last_seq, format, len, checksum) VALUES (?, ?, ?, ?, ?, ?, ?)`,
				as, id, t.Range.After, t.Range.Last, t.Format, t.Len, t.Checksum); err != nil {
				return err
			}
			ids[i] = id
		}
		if last := txns[len(txns)-1].Range.Last; last > r.lastFrozen {
			r.lastFrozen = last
		}
		_, err := tx.Exec(`UPDATE appservices SET next_txn = ? WHERE as_key = ?`, r.nextTxn, as)
		return err
	})
	if err != nil {
		return nil, err
	}
	return ids, nil
}

// SaveBody implements Store.
func (s *SQLite) SaveBody(ctx context.Context, as ASKey, id int64, body []byte) error {
	return s.do(ctx, func(tx *sql.Tx, b *batch) error {
		res, err := tx.Exec(`UPDATE txns SET body = ? WHERE as_key = ? AND txn_id = ? AND body IS NULL`, body, as, id)
		if err != nil {
			return err
		}
		if n, _ := res.RowsAffected(); n == 0 {
			var one int
			if tx.QueryRow(`SELECT 1 FROM txns WHERE as_key = ? AND txn_id = ?`, as, id).Scan(&one) != nil {
				return callError{fmt.Errorf("%w: %d", ErrUnknownTxn, id)}
			}
		}
		return nil
	})
}

// Frozen implements Store.
func (s *SQLite) Frozen(ctx context.Context, as ASKey) ([]Txn, error) {
	return readFrozen(ctx, s.rdb, sqliteSQL, as)
}

// Complete implements Store.
func (s *SQLite) Complete(ctx context.Context, as ASKey, id int64) error {
	return s.do(ctx, func(tx *sql.Tx, b *batch) error { return s.complete(tx, b, as, id) })
}

// CompleteMany is Complete for several transactions of as, in one write:
// what a catching-up sender has acknowledged while its last completion
// committed. A transaction it does not know is an error, the others are
// still recorded.
func (s *SQLite) CompleteMany(ctx context.Context, as ASKey, ids []int64) error {
	return s.do(ctx, func(tx *sql.Tx, b *batch) error {
		var errs []error
		for _, id := range ids {
			err := s.complete(tx, b, as, id)
			var ce callError
			if errors.As(err, &ce) {
				errs = append(errs, ce.error)
				continue
			}
			if err != nil {
				return err
			}
		}
		if len(errs) > 0 {
			return callError{errors.Join(errs...)}
		}
		return nil
	})
}

func (s *SQLite) complete(tx *sql.Tx, b *batch, as ASKey, id int64) error {
	r := b.touch(s, as)
	if r == nil {
		return callError{fmt.Errorf("%w: key %d", ErrUnknownAS, as)}
	}
	var last int64
	err := tx.QueryRow(`SELECT last_seq FROM txns WHERE as_key = ? AND txn_id = ?`, as, id).Scan(&last)
	if errors.Is(err, sql.ErrNoRows) {
		return callError{fmt.Errorf("%w: %d", ErrUnknownTxn, id)}
	}
	if err != nil {
		return err
	}
	if _, err := tx.Exec(`DELETE FROM txns WHERE as_key = ? AND txn_id = ?`, as, id); err != nil {
		return err
	}
	if last > r.delivered {
		r.delivered = last
	}
	_, err = tx.Exec(`UPDATE appservices SET delivered = ?, last_success_ms = ? WHERE as_key = ?`, r.delivered, b.now, as)
	return err
}

// SetState implements Store.
func (s *SQLite) SetState(ctx context.Context, as ASKey, st State) error {
	up := 0
	if st.Up {
		up = 1
	}
	return s.do(ctx, func(tx *sql.Tx, b *batch) error {
		_, err := tx.Exec(`UPDATE appservices SET up = ?, failures = ?, last_success_ms = MAX(last_success_ms, ?),
			last_error = ?, last_error_ms = ?, next_retry_ms = ? WHERE as_key = ?`,
			up, st.Failures, ms(st.LastSuccess), st.LastError, ms(st.LastErrorAt), ms(st.NextRetry), as)
		return err
	})
}

// Statuses implements Store.
func (s *SQLite) Statuses(ctx context.Context) ([]Status, error) {
	return statuses(ctx, s.rdb, sqliteSQL)
}

// Stats returns counters of the store's work.
func (s *SQLite) Stats() Stats {
	var n int64
	_ = s.do(context.Background(), func(*sql.Tx, *batch) error { n = s.commits; return nil })
	return Stats{Commits: n}
}

// Close implements Store.
func (s *SQLite) Close() error {
	if !s.w.close() {
		return nil
	}
	return errors.Join(s.wdb.Close(), s.rdb.Close())
}

// OpenStatus opens the store at path read-only, for `asdispatch status`
// while another process writes, and returns every AS's status.
func OpenStatus(ctx context.Context, path string) ([]Status, error) {
	db, err := sql.Open("sqlite3", "file:"+url.PathEscape(path)+"?mode=ro&_busy_timeout=10000")
	if err != nil {
		return nil, fmt.Errorf("txnstore: open %s: %w", path, err)
	}
	defer db.Close()
	return statuses(ctx, db, sqliteSQL)
}

// Shared implements Leaser: one process owns a SQLite store.
func (s *SQLite) Shared() bool { return false }

// Acquire implements Leaser: always granted, there is no other process.
func (s *SQLite) Acquire(context.Context, ASKey, string, time.Duration) (bool, error) {
	return true, nil
}

// Renew implements Leaser: always granted.
func (s *SQLite) Renew(context.Context, ASKey, string, time.Duration) (bool, error) { return true, nil }

// Release implements Leaser.
func (s *SQLite) Release(context.Context, ASKey, string) error { return nil }

var (
	_ Store  = (*SQLite)(nil)
	_ Leaser = (*SQLite)(nil)
)
