package txnstore

import (
	"cmp"
	"context"
	"database/sql"
	"errors"
	"fmt"
	"maps"
	"net/url"
	"slices"
	"strings"
	"time"

	_ "github.com/mattn/go-sqlite3" // the embedded default backend

	"github.com/asdispatch/asdispatch/internal/storehook"
)

// Errors of individual calls; they fail only the call that caused them.
var (
	ErrUnknownAS  = errors.New("txnstore: unknown appservice")
	ErrUnknownTxn = errors.New("txnstore: unknown transaction")
	ErrBadRange   = errors.New("txnstore: transaction ranges do not follow the stream")
	// ErrOutOfOrder refuses a Complete while an earlier transaction of the
	// AS is frozen.
	ErrOutOfOrder = errors.New("txnstore: an earlier transaction is not completed")
	// ErrBodyConflict refuses a SaveBody of other bytes than those saved.
	ErrBodyConflict = errors.New("txnstore: transaction already has another body")
	// ErrBadPosition refuses an Append whose positions are not valid: a
	// stream name empty (with a Pos), longer than 255 bytes or not UTF-8,
	// a Pos not above 0, or one stream's positions going down in the call.
	ErrBadPosition = errors.New("txnstore: bad stream position")
)

// callError marks an error found before an op wrote anything: it fails
// that op alone, not the commit it shares.
type callError struct{ error }

func (e callError) Unwrap() error { return e.error }

// SQLite is the embedded Store: one file, WAL, synchronous=FULL so a write
// that returned survives power loss. One writer goroutine merges the writes
// of all callers into shared commits.
type SQLite struct {
	opts      Options
	hooks     *storehook.Hooks
	stmtBytes int
	wdb       *sql.DB // one connection, used only by the writer goroutine
	rdb       *sql.DB

	unsure unsureFreezes

	w *writer[*op]

	// Owned by the writer goroutine.
	nextSeq int64
	// positions caches the positions table: one process owns the file.
	positions map[string]int64
	ases      map[ASKey]*asRow
	ids       map[string]ASKey
	st        stats
	sinceGC   int
	// unannounced are the items of commits that landed but failed (an
	// ambiguous result): OnCommit gets them with the next commit, so the
	// senders, which learn of new items only from OnCommit, still see them.
	unannounced []Committed
	// gcDirty are the ASes whose cursor moved since the last collection
	// committed: only their stream rows can have become collectable, and
	// walking every AS per collection cost most of a commit at 10,000
	// ASes. gcAll: collect for every AS (after opening, and until a
	// collection commits).
	gcDirty map[ASKey]struct{}
	gcAll   bool
}

// asRow is the writer's cache of an appservices row.
type asRow struct {
	nextTxn    int64
	delivered  int64
	lastFrozen int64
	// txns mirrors the AS's rows of txns, in stream order, once loaded
	// (by its first completion since open): the completion check reads it
	// instead of the table, a query per completion that was half the
	// writer's time in completions at 10,000 ASes. A commit that fails
	// unloads it.
	txns   []txnRow
	loaded bool
}

// txnRows returns the rows of as (r) in txns, loading them in tx first.
func (s *SQLite) txnRows(tx *sql.Tx, as ASKey, r *asRow) ([]txnRow, error) {
	if !r.loaded {
		rows, err := readTxnRows(context.Background(), tx, sqliteSQL, as)
		if err != nil {
			return nil, err
		}
		r.txns, r.loaded = rows, true
	}
	return r.txns, nil
}

// stats are counters for tests.
type stats struct {
	commits    int64
	stmtBytes  int // most bytes one statement of several items bound
	batchBytes int // most bytes one commit wrote
	gcWalks    int // collections that walked every AS
	gcs        int // collections
}

type op struct {
	kind storehook.Op // 0 for test-internal ops
	size int          // bytes the op writes
	fn   func(tx *sql.Tx, b *batch) error
	done chan error
}

func opSize(o *op) int { return o.size }

// batch is what the ops of one commit add up to.
type batch struct {
	now       int64
	committed []Committed
	streams   map[ASKey][]int64
	// undo restores the writer's caches if the commit fails.
	undo   map[ASKey]asRow
	newIDs []string
	// posUndo holds each stream's position before the batch moved it
	// (-1: it had none); its keys are the positions to write.
	posUndo map[string]int64
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
	hooks := storehook.From(ctx)
	// Statements are kept prepared: an AS's freeze or completion is a few
	// small statements, and preparing them again cost about as much as
	// running them.
	dsn := "file:" + url.PathEscape(path) + "?_journal_mode=WAL&_synchronous=FULL&_busy_timeout=10000&_foreign_keys=off&_stmt_cache_size=256"
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
	s := &SQLite{opts: opts, hooks: hooks, stmtBytes: defaultStmtBytes, wdb: wdb, rdb: rdb,
		ases: map[ASKey]*asRow{}, ids: map[string]ASKey{}, positions: map[string]int64{},
		gcDirty: map[ASKey]struct{}{}, gcAll: true}
	batchBytes := 0
	if hooks != nil {
		batchBytes = hooks.BatchBytes
		if hooks.StmtBytes > 0 {
			s.stmtBytes = hooks.StmtBytes
		}
	}
	s.w = newWriter(opSize, batchBytes)
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
		FROM appservices a LEFT JOIN txns t ON t.as_key = a.as_key AND t.replaced_by = 0
		GROUP BY a.as_key, a.id, a.next_txn, a.delivered`)
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
	prows, err := tx.QueryContext(ctx, `SELECT stream, pos FROM positions`)
	if err != nil {
		return err
	}
	defer prows.Close()
	for prows.Next() {
		var st string
		var p int64
		if err := prows.Scan(&st, &p); err != nil {
			return err
		}
		s.positions[st] = p
	}
	if err := prows.Err(); err != nil {
		return err
	}
	return tx.Commit()
}

// do hands fn, an op of kind writing size bytes, to the writer and waits
// for its commit.
func (s *SQLite) do(ctx context.Context, kind storehook.Op, size int, fn func(tx *sql.Tx, b *batch) error) error {
	o := &op{kind: kind, size: size, fn: fn, done: make(chan error, 1)}
	if err := s.w.queue(ctx, o); err != nil {
		return err
	}
	return <-o.done
}

func (s *SQLite) commit(ops []*op) {
	isolate(ops, s.attempt, func(o *op, err error) { o.done <- err })
}

// attempt commits ops in one transaction and answers each; on failure it
// answers none, undoes the writer's caches, and returns the index of the
// op whose statement failed (-1 if none did).
func (s *SQLite) attempt(ops []*op) (int, error) {
	seq0 := s.nextSeq
	errs := make([]error, len(ops))
	b := &batch{now: time.Now().UnixMilli(), streams: map[ASKey][]int64{}, undo: map[ASKey]asRow{}, posUndo: map[string]int64{}}
	culprit, landed, due, collected := -1, false, false, false
	err := func() error {
		tx, err := s.wdb.Begin()
		if err != nil {
			return err
		}
		defer tx.Rollback()
		if culprit, err = runOps(ops, errs, func(o *op) error { return o.fn(tx, b) }); err != nil {
			return err
		}
		if err := s.flushStreams(tx, b, seq0); err != nil {
			return err
		}
		// Before the collection below, which reads the cursors.
		if err := s.flushRows(tx, b); err != nil {
			return err
		}
		if len(b.posUndo) > 0 {
			if err := writePositions(context.Background(), tx, sqliteSQL, s.positions, slices.Collect(maps.Keys(b.posUndo))); err != nil {
				return err
			}
		}
		for k, r := range b.undo {
			if s.ases[k] != nil && s.ases[k].delivered != r.delivered {
				s.gcDirty[k] = struct{}{}
			}
		}
		if due = s.gcDue(); due {
			// In the commit, not after it: its own commit would cost another
			// fsync. A failed commit leaves the garbage for the next one.
			if err := s.gcStreams(tx); err != nil {
				return err
			}
			collected = true
			if _, err := tx.Exec(gcItems); err != nil {
				return err
			}
		}
		landed, err = commitOps(tx, s.hooks, ops, func(o *op) storehook.Op { return o.kind })
		return err
	}()
	if err != nil && !landed {
		// Nothing of this attempt happened: restore the writer's caches.
		s.nextSeq = seq0
		for k, r := range b.undo {
			*s.ases[k] = r
			// Whatever the statements did is unknown: read again.
			s.ases[k].txns, s.ases[k].loaded = nil, false
		}
		for _, id := range b.newIDs {
			delete(s.ases, s.ids[id])
			delete(s.ids, id)
		}
		for st, p := range b.posUndo {
			if p < 0 {
				delete(s.positions, st)
			} else {
				s.positions[st] = p
			}
		}
		if due {
			// The collection did not happen either: the next commit is due,
			// not the one gcEvery commits later.
			s.sinceGC = gcEvery - 1
		}
		return culprit, err
	}
	if collected && !landed {
		s.gcAll = false
		clear(s.gcDirty)
	}
	s.st.commits++
	s.st.batchBytes = max(s.st.batchBytes, batchSize(ops, func(o *op) int { return o.size }))
	if err != nil {
		s.unannounced = append(s.unannounced, b.committed...)
		return -1, err
	}
	committed := b.committed
	if len(s.unannounced) > 0 {
		committed = append(s.unannounced, committed...)
		s.unannounced = nil
	}
	if len(committed) > 0 && s.opts.OnCommit != nil {
		s.opts.OnCommit(committed)
	}
	for i, o := range ops {
		o.done <- errs[i]
	}
	return -1, nil
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

// flushRows writes the counters and cursors the batch's freezes and
// completions moved, from the writer's cache: one statement for up to
// rowsPerInsert ASes instead of one per freeze and per completion, each of
// which dirtied a page of appservices at 10,000 ASes. A cursor that moved
// records the batch's time as the last success.
func (s *SQLite) flushRows(tx *sql.Tx, b *batch) error {
	args := make([]any, 0, 4*rowsPerInsert)
	n := 0
	flush := func() error {
		if n == 0 {
			return nil
		}
		_, err := tx.Exec(rowsUpdate(n), args...)
		args, n = args[:0], 0
		return err
	}
	for k, old := range b.undo {
		r := s.ases[k]
		if r == nil || (r.nextTxn == old.nextTxn && r.delivered == old.delivered) {
			continue
		}
		success := int64(0)
		if r.delivered != old.delivered {
			success = b.now
		}
		args = append(args, k, r.nextTxn, r.delivered, success)
		if n++; n == rowsPerInsert {
			if err := flush(); err != nil {
				return err
			}
		}
	}
	return flush()
}

// rowsUpdate is flushRows' statement for n ASes.
func rowsUpdate(n int) string {
	return `UPDATE appservices SET next_txn = v.column2, delivered = v.column3,
		last_success_ms = CASE WHEN v.column4 > 0 THEN v.column4 ELSE last_success_ms END
		FROM (VALUES ` + strings.TrimSuffix(strings.Repeat("(?, ?, ?, ?), ", n), ", ") + `) AS v WHERE appservices.as_key = v.column1`
}

func streamsInsert(n int) string {
	return "INSERT INTO streams (as_key, last_seq, first_seq, seqs) VALUES " + strings.TrimSuffix(strings.Repeat("(?, ?, ?, ?), ", n), ", ")
}

// gcStreams deletes the stream rows the cursors of the ASes in gcDirty
// (every AS if gcAll) have passed.
func (s *SQLite) gcStreams(tx *sql.Tx) error {
	if s.gcAll || len(s.gcDirty) > len(s.ases)/4 {
		s.st.gcWalks++
		_, err := tx.Exec(gcStreamsSQLite)
		return err
	}
	for k := range s.gcDirty {
		if _, err := tx.Exec(gcStreamsOfAS, k, k); err != nil {
			return err
		}
	}
	return nil
}

// gcEvery is how many commits a busy writer makes per collection.
const gcEvery = 64

// gcIdleEvery is how many commits an idle writer lets pass between
// collections.
const gcIdleEvery = 8

// gcDue says whether this commit also deletes the stream rows and items
// nothing needs any more: every gcEvery-th commit, or every gcIdleEvery-th when
// the writer is idle, so the cost is spread thin. Not more often: an idle
// writer is no idle CPU, and at 10,000 ASes a collection every other
// commit (the writer was idle between most of them) cost a fifth of its
// time.
func (s *SQLite) gcDue() bool {
	s.sinceGC++
	if s.sinceGC < gcEvery && !(s.w.idle() && s.sinceGC >= gcIdleEvery) {
		return false
	}
	s.sinceGC = 0
	s.st.gcs++
	return true
}

// EnsureAS implements Store.
func (s *SQLite) EnsureAS(ctx context.Context, id string) (ASKey, error) {
	keys, err := s.EnsureASes(ctx, []string{id})
	if err != nil {
		return 0, err
	}
	return keys[0], nil
}

// EnsureASes implements ManyEnsurer: one commit for all, where 10,000
// EnsureAS calls cost one commit (and fsync) per few hundred.
func (s *SQLite) EnsureASes(ctx context.Context, ids []string) ([]ASKey, error) {
	keys := make([]ASKey, len(ids))
	err := s.do(ctx, storehook.EnsureAS, 0, func(tx *sql.Tx, b *batch) error {
		for i, id := range ids {
			if k, ok := s.ids[id]; ok {
				keys[i] = k
				continue
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
			keys[i] = ASKey(k)
			b.newIDs = append(b.newIDs, id)
			s.ids[id] = keys[i]
			s.ases[keys[i]] = &asRow{nextTxn: 1, delivered: s.nextSeq - 1}
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	return keys, nil
}

const rowsPerInsert = 64

var insertMany = "INSERT INTO items (seq, kind, data, created_ms) VALUES " + strings.TrimSuffix(strings.Repeat("(?, ?, ?, ?), ", rowsPerInsert), ", ")

// Append implements Store.
func (s *SQLite) Append(ctx context.Context, entries []Entry) ([]int64, error) {
	if err := checkPositions(entries); err != nil {
		return nil, err
	}
	seqs := make([]int64, len(entries))
	live := make([]bool, len(entries))
	size := batchSize(entries, func(e Entry) int { return len(e.Data) })
	err := s.do(ctx, storehook.Append, size, func(tx *sql.Tx, b *batch) error {
		for _, e := range entries {
			for _, k := range e.Targets {
				if s.ases[k] == nil {
					return callError{fmt.Errorf("%w: key %d", ErrUnknownAS, k)}
				}
			}
		}
		clear(seqs) // of an attempt that failed
		_ = admit(entries, live, func(st string) (int64, error) { return s.positions[st], nil }, func(st string, p int64) {
			if _, saved := b.posUndo[st]; !saved {
				old, ok := s.positions[st]
				if !ok {
					old = -1
				}
				b.posUndo[st] = old
			}
			s.positions[st] = p
		})
		args := make([]any, 0, 4*rowsPerInsert)
		n, bound := 0, 0
		// A statement takes up to rowsPerInsert rows and, past one row,
		// up to stmtBytes bytes.
		flush := func() error {
			if n == 0 {
				return nil
			}
			q := insertMany
			if n < rowsPerInsert {
				q = "INSERT INTO items (seq, kind, data, created_ms) VALUES " + strings.TrimSuffix(strings.Repeat("(?, ?, ?, ?), ", n), ", ")
			}
			if n > 1 {
				s.st.stmtBytes = max(s.st.stmtBytes, bound)
			}
			_, err := tx.Exec(q, args...)
			args, n, bound = args[:0], 0, 0
			return err
		}
		for i, e := range entries {
			if len(e.Targets) == 0 || !live[i] {
				continue
			}
			if n > 0 && bound+len(e.Data) > s.stmtBytes {
				if err := flush(); err != nil {
					return err
				}
			}
			seq := s.nextSeq
			s.nextSeq++
			seqs[i] = seq
			args = append(args, seq, int(e.Kind), e.Data, b.now)
			n, bound = n+1, bound+len(e.Data)
			if n == rowsPerInsert {
				if err := flush(); err != nil {
					return err
				}
			}
			for _, k := range e.Targets {
				b.streams[k] = append(b.streams[k], seq)
			}
			b.committed = append(b.committed, Committed{Item: Item{Seq: seq, Kind: e.Kind, Data: e.Data}, Targets: e.Targets})
		}
		return flush()
	})
	if err != nil {
		return nil, err
	}
	return seqs, nil
}

// Position implements Store.
func (s *SQLite) Position(ctx context.Context, stream string) (int64, error) {
	return readPosition(ctx, s.rdb, sqliteSQL, stream)
}

// Read implements Store.
func (s *SQLite) Read(ctx context.Context, as ASKey, after int64, maxItems, maxBytes int) ([]Item, error) {
	return readStream(ctx, s.rdb, sqliteSQL, as, after, maxItems, maxBytes)
}

// Delivered implements Store.
func (s *SQLite) Delivered(ctx context.Context, as ASKey) (int64, error) {
	return readDelivered(ctx, s.rdb, sqliteSQL, as)
}

// Freeze implements Store.
func (s *SQLite) Freeze(ctx context.Context, as ASKey, replace int64, txns []Txn) ([]int64, error) {
	f := s.freezeOp(as, replace, txns)
	err := s.do(ctx, storehook.Freeze, 0, f.run)
	return f.done(err)
}

// CompleteFreeze is CompleteMany(complete) then Freeze(replace, txns) in
// one commit, each with its own answer as if called alone: a catching-up
// sender records what the AS took and freezes what goes next with one
// fsync instead of two.
func (s *SQLite) CompleteFreeze(ctx context.Context, as ASKey, complete []int64, replace int64, txns []Txn) (ids []int64, completeErr, freezeErr error) {
	f := s.freezeOp(as, replace, txns)
	c := s.completeOp(as, complete)
	var cerr error
	err := s.do(ctx, storehook.Freeze, 0, func(tx *sql.Tx, b *batch) error {
		cerr, f.ids, f.refused = nil, nil, false
		if err := c(tx, b); err != nil {
			var ce callError
			if !errors.As(err, &ce) {
				return err
			}
			cerr = ce.error
		}
		return f.run(tx, b)
	})
	ids, freezeErr = f.done(err)
	if err != nil && !f.refused {
		// The commit failed (or landed unanswered): both are unsure.
		return nil, err, err
	}
	return ids, cerr, freezeErr
}

// freezing is one Freeze's op and its answer.
type freezing struct {
	s       *SQLite
	as      ASKey
	replace int64
	txns    []Txn
	key     string
	ids     []int64
	refused bool
}

func (s *SQLite) freezeOp(as ASKey, replace int64, txns []Txn) *freezing {
	return &freezing{s: s, as: as, replace: replace, txns: txns, key: freezeKey(replace, txns)}
}

func (f *freezing) run(tx *sql.Tx, b *batch) error {
	s, as := f.s, f.as
	f.ids, f.refused = nil, false
	r := b.touch(s, as)
	if r == nil {
		f.refused = true
		return callError{fmt.Errorf("%w: key %d", ErrUnknownAS, as)}
	}
	got, next, err := freezeTxns(context.Background(), tx, sqliteSQL, as, f.replace, max(r.delivered, r.lastFrozen), r.nextTxn, f.txns,
		s.unsure.repeats(as, f.key), false)
	if err != nil {
		var ce callError
		f.refused = errors.As(err, &ce)
		return err
	}
	if r.loaded && next != r.nextTxn {
		// Inserted (not the repeat of a freeze that landed).
		r.txns = frozeRows(r.txns, f.replace, f.txns, got)
	}
	f.ids, r.nextTxn = got, next
	r.lastFrozen = max(r.lastFrozen, f.txns[len(f.txns)-1].Range.Last)
	return nil
}

// frozeRows is rows after a freeze inserted txns with ids, replacing the
// row replace (if non-zero): a new slice, in stream order.
func frozeRows(rows []txnRow, replace int64, txns []Txn, ids []int64) []txnRow {
	out := make([]txnRow, 0, len(rows)+len(txns))
	for _, r := range rows {
		if replace != 0 && r.id == replace {
			r.replacedBy = ids[0]
		}
		out = append(out, r)
	}
	for i, t := range txns {
		out = append(out, txnRow{id: ids[i], after: t.Range.After, last: t.Range.Last})
	}
	slices.SortFunc(out, func(a, b txnRow) int {
		if c := cmp.Compare(a.after, b.after); c != 0 {
			return c
		}
		return cmp.Compare(a.id, b.id)
	})
	return out
}

// done records the outcome of a freeze that returned err.
func (f *freezing) done(err error) ([]int64, error) {
	// A failed freeze that was not refused may have landed all the same.
	f.s.unsure.record(f.as, f.key, err == nil, err != nil && !f.refused)
	if err != nil {
		return nil, err
	}
	return f.ids, nil
}

// SaveBody implements Store.
func (s *SQLite) SaveBody(ctx context.Context, as ASKey, id int64, body []byte) error {
	return s.do(ctx, storehook.SaveBody, len(body), func(tx *sql.Tx, b *batch) error {
		return saveBody(context.Background(), tx, sqliteSQL, as, id, body)
	})
}

// Frozen implements Store.
func (s *SQLite) Frozen(ctx context.Context, as ASKey) ([]Txn, error) {
	return readFrozen(ctx, s.rdb, sqliteSQL, as)
}

// Recover implements Recoverer.
func (s *SQLite) Recover(ctx context.Context, as ASKey) (Recovery, error) {
	m, err := readRecovery(ctx, s.rdb, sqliteSQL, as, false)
	return m[as], err
}

// RecoverAll implements Recoverer.
func (s *SQLite) RecoverAll(ctx context.Context) (map[ASKey]Recovery, error) {
	return readRecovery(ctx, s.rdb, sqliteSQL, 0, true)
}

// Complete implements Store.
func (s *SQLite) Complete(ctx context.Context, as ASKey, id int64) error {
	return s.CompleteMany(ctx, as, []int64{id})
}

// CompleteMany is Complete for several transactions of as, in one write:
// what a catching-up sender has acknowledged while its last completion
// committed. An id it does not know, or one after a transaction not
// completed, is an error; the others are still recorded.
func (s *SQLite) CompleteMany(ctx context.Context, as ASKey, ids []int64) error {
	return s.do(ctx, storehook.Complete, 0, s.completeOp(as, ids))
}

func (s *SQLite) completeOp(as ASKey, ids []int64) func(tx *sql.Tx, b *batch) error {
	return func(tx *sql.Tx, b *batch) error {
		r := b.touch(s, as)
		if r == nil {
			return callError{fmt.Errorf("%w: key %d", ErrUnknownAS, as)}
		}
		rows, err := s.txnRows(tx, as, r)
		if err != nil {
			return err
		}
		d, err := completeTxns(context.Background(), tx, sqliteSQL, as, ids, rows, r.delivered, r.nextTxn, b.now, false)
		var ce callError
		if err != nil && !errors.As(err, &ce) {
			return err
		}
		if d != r.delivered {
			// completeTxns deleted the rows the cursor passed.
			r.txns = slices.DeleteFunc(slices.Clone(rows), func(t txnRow) bool { return t.last <= d })
			if len(r.txns) == 0 {
				r.txns = nil // an AS that caught up keeps no buffer
			}
		}
		r.delivered = d
		return err
	}
}

// SetState implements Store.
func (s *SQLite) SetState(ctx context.Context, as ASKey, st State) error {
	up := 0
	if st.Up {
		up = 1
	}
	lastError := cleanText(st.LastError, maxLastError)
	return s.do(ctx, storehook.State, len(lastError), func(tx *sql.Tx, b *batch) error {
		_, err := tx.Exec(`UPDATE appservices SET up = ?, failures = ?, last_success_ms = MAX(last_success_ms, ?),
			last_error = ?, last_error_ms = ?, next_retry_ms = ? WHERE as_key = ?`,
			up, st.Failures, ms(st.LastSuccess), lastError, ms(st.LastErrorAt), ms(st.NextRetry), as)
		return err
	})
}

// Statuses implements Store.
func (s *SQLite) Statuses(ctx context.Context) ([]Status, error) {
	return statuses(ctx, s.rdb, sqliteSQL)
}

// stats returns counters of the store's work, for tests.
func (s *SQLite) stats() stats {
	var st stats
	_ = s.do(context.Background(), 0, 0, func(*sql.Tx, *batch) error { st = s.st; return nil })
	return st
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
	if err := leaseFault(s.hooks); err != nil {
		return false, fmt.Errorf("txnstore: acquire lease: %w", err)
	}
	return true, nil
}

// Renew implements Leaser: always granted.
func (s *SQLite) Renew(context.Context, ASKey, string, time.Duration) (bool, error) {
	if err := leaseFault(s.hooks); err != nil {
		return false, fmt.Errorf("txnstore: renew lease: %w", err)
	}
	return true, nil
}

// Release implements Leaser.
func (s *SQLite) Release(context.Context, ASKey, string) error {
	if err := leaseFault(s.hooks); err != nil {
		return fmt.Errorf("txnstore: release lease: %w", err)
	}
	return nil
}

var (
	_ Store  = (*SQLite)(nil)
	_ Leaser = (*SQLite)(nil)
)
