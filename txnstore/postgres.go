package txnstore

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"maps"
	"slices"
	"sync"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/stdlib"

	"github.com/asdispatch/asdispatch/internal/pgdsn"
	"github.com/asdispatch/asdispatch/internal/storehook"
)

// Postgres is the Store several processes share. Each process runs one
// writer goroutine that merges the writes of its callers into shared
// commits, as SQLite does, but keeps no cached copy of rows other processes
// write: seqs, txn ids and cursors are read and advanced inside each commit.
//
// Appends of all processes are serialized by a row lock on next_seq held
// until commit, so commit order is seq order: a reader that sees seq N+1
// also sees N. Only the end of each commit holds that lock.
type Postgres struct {
	opts      Options
	hooks     *storehook.Hooks
	stmtBytes int
	db        *sql.DB

	unsure unsureFreezes

	w *writer[*pgOp]

	leaseMu sync.Mutex
	leased  map[ASKey]string // owner of each lease Acquired here, until Released

	// Owned by the writer goroutine. Keys and ids never change once
	// committed, so caching them is safe across processes.
	ids     map[string]ASKey
	known   map[ASKey]bool
	st      stats
	sinceGC int
}

type pgOp struct {
	kind storehook.Op // 0 for test-internal ops
	size int          // bytes the op writes
	fn   func(ctx context.Context, tx *sql.Tx, b *pgBatch) error
	done chan error
}

func pgOpSize(o *pgOp) int { return o.size }

// pgBatch is what the ops of one commit add up to.
type pgBatch struct {
	now     int64
	appends []*pgAppend
	newIDs  map[string]ASKey
	known   []ASKey
	// positions are the streams' positions as the batch leaves them,
	// read (and row-locked) at their first use in the batch.
	positions map[string]int64
	moved     map[string]bool
}

type pgAppend struct {
	entries []Entry
	live    []bool // entries above their stream's position
	seqs    []int64
}

const (
	// commitTimeout bounds one commit, so a hung connection fails the
	// callers instead of blocking the writer for good.
	commitTimeout = 30 * time.Second
	// pgNowMS is the database's clock: lease expiry is judged by one clock
	// for all processes.
	pgNowMS = `(EXTRACT(EPOCH FROM clock_timestamp()) * 1000)::BIGINT`
	// migrationLock serializes schema migrations of processes starting at
	// once (pg_advisory_xact_lock key, "asdm").
	migrationLock = 0x6173646d
)

// WithSearchPath returns dsn (a URL or key=value DSN) with its search_path
// set to schema: the way to keep the dispatcher's tables in a schema of
// their own in the homeserver's database.
func WithSearchPath(dsn, schema string) string { return pgdsn.WithSearchPath(dsn, schema) }

// OpenPostgres connects to the database of dsn (a libpq URL or key=value
// string; its search_path picks the schema) and brings the schema up to date.
func OpenPostgres(ctx context.Context, dsn string, opts Options) (*Postgres, error) {
	db, err := openPG(ctx, dsn, false)
	if err != nil {
		return nil, err
	}
	hooks := storehook.From(ctx)
	s := &Postgres{opts: opts, hooks: hooks, stmtBytes: defaultStmtBytes, db: db,
		leased: map[ASKey]string{}, ids: map[string]ASKey{}, known: map[ASKey]bool{}}
	batchBytes := 0
	if hooks != nil {
		batchBytes = hooks.BatchBytes
		if hooks.StmtBytes > 0 {
			s.stmtBytes = hooks.StmtBytes
		}
	}
	s.w = newWriter(pgOpSize, batchBytes)
	if err := s.migrate(ctx); err != nil {
		db.Close()
		return nil, fmt.Errorf("txnstore: postgres: %w", err)
	}
	s.w.start(func(ops []*pgOp) {
		s.commit(ops)
		s.maybeGC(s.w.idle())
	})
	return s, nil
}

// openPG opens a pool on dsn. The DSN is never put in errors: it may hold
// a password.
func openPG(ctx context.Context, dsn string, readOnly bool) (*sql.DB, error) {
	cfg, err := pgx.ParseConfig(dsn)
	if err != nil {
		return nil, errors.New("txnstore: postgres: the DSN does not parse")
	}
	if readOnly {
		cfg.RuntimeParams["default_transaction_read_only"] = "on"
	}
	db := stdlib.OpenDB(*cfg)
	db.SetMaxOpenConns(10)
	db.SetMaxIdleConns(10)
	if err := db.PingContext(ctx); err != nil {
		db.Close()
		return nil, fmt.Errorf("txnstore: postgres: connect: %w", err)
	}
	return db, nil
}

func (s *Postgres) migrate(ctx context.Context) error {
	tx, err := s.db.BeginTx(ctx, nil)
	if err != nil {
		return err
	}
	defer tx.Rollback()
	if _, err := tx.ExecContext(ctx, `SELECT pg_advisory_xact_lock($1)`, migrationLock); err != nil {
		return err
	}
	if err := migrate(ctx, tx, postgresSQL); err != nil {
		return err
	}
	if err := tx.Commit(); err != nil {
		return err
	}
	rows, err := s.db.QueryContext(ctx, `SELECT as_key, id FROM appservices`)
	if err != nil {
		return err
	}
	defer rows.Close()
	for rows.Next() {
		var k ASKey
		var id string
		if err := rows.Scan(&k, &id); err != nil {
			return err
		}
		s.ids[id], s.known[k] = k, true
	}
	return rows.Err()
}

// do hands fn, an op of kind writing size bytes, to the writer and waits
// for its commit.
func (s *Postgres) do(ctx context.Context, kind storehook.Op, size int, fn func(ctx context.Context, tx *sql.Tx, b *pgBatch) error) error {
	o := &pgOp{kind: kind, size: size, fn: fn, done: make(chan error, 1)}
	if err := s.w.queue(ctx, o); err != nil {
		return err
	}
	return <-o.done
}

func (s *Postgres) commit(ops []*pgOp) {
	isolate(ops, s.attempt, func(o *pgOp, err error) { o.done <- err })
}

// attempt commits ops in one transaction and answers each; on failure it
// answers none and returns the index of the op whose statement failed (-1
// if none did).
func (s *Postgres) attempt(ops []*pgOp) (int, error) {
	ctx, cancel := context.WithTimeout(context.Background(), commitTimeout)
	defer cancel()
	errs := make([]error, len(ops))
	b := &pgBatch{now: time.Now().UnixMilli(), newIDs: map[string]ASKey{}, positions: map[string]int64{}, moved: map[string]bool{}}
	var committed []Committed
	culprit, landed := -1, false
	err := func() error {
		tx, err := s.db.BeginTx(ctx, nil)
		if err != nil {
			return err
		}
		defer tx.Rollback()
		if culprit, err = runOps(ops, errs, func(o *pgOp) error { return o.fn(ctx, tx, b) }); err != nil {
			return err
		}
		if len(b.moved) > 0 {
			// In a fixed order: two commits of one process never wait
			// for each other, but another process may write these rows.
			streams := slices.Sorted(maps.Keys(b.moved))
			if err := writePositions(ctx, tx, postgresSQL, b.positions, streams); err != nil {
				return err
			}
		}
		if committed, err = s.flushAppends(ctx, tx, b); err != nil {
			return err
		}
		landed, err = commitOps(tx, s.hooks, ops, func(o *pgOp) storehook.Op { return o.kind })
		return err
	}()
	if err != nil && !landed {
		return culprit, err
	}
	for id, k := range b.newIDs {
		s.ids[id], s.known[k] = k, true
	}
	for _, k := range b.known {
		s.known[k] = true
	}
	s.st.commits++
	s.st.batchBytes = max(s.st.batchBytes, batchSize(ops, func(o *pgOp) int { return o.size }))
	if err != nil {
		return -1, err
	}
	if len(committed) > 0 && s.opts.OnCommit != nil {
		s.opts.OnCommit(committed)
	}
	for i, o := range ops {
		o.done <- errs[i]
	}
	return -1, nil
}

// flushAppends assigns the seqs of the batch's appends and writes their
// items and stream rows. It runs last in the commit so that the next_seq
// lock, which every appending process waits for, is held only for the
// inserts and the commit itself.
func (s *Postgres) flushAppends(ctx context.Context, tx *sql.Tx, b *pgBatch) ([]Committed, error) {
	n := 0
	for _, a := range b.appends {
		for i, e := range a.entries {
			if len(e.Targets) > 0 && a.live[i] {
				n++
			}
		}
	}
	if n == 0 {
		return nil, nil
	}
	var next int64
	if err := tx.QueryRowContext(ctx, `SELECT value FROM meta WHERE key = 'next_seq' FOR UPDATE`).Scan(&next); err != nil {
		return nil, err
	}
	seqs := make([]int64, 0, n)
	kinds := make([]int64, 0, n)
	data := make([][]byte, 0, n)
	committed := make([]Committed, 0, n)
	streams := map[ASKey][]int64{}
	var order []ASKey
	for _, a := range b.appends {
		for i, e := range a.entries {
			if len(e.Targets) == 0 || !a.live[i] {
				continue
			}
			seq := next
			next++
			a.seqs[i] = seq
			seqs, kinds, data = append(seqs, seq), append(kinds, int64(e.Kind)), append(data, e.Data)
			for _, k := range e.Targets {
				if streams[k] == nil {
					order = append(order, k)
				}
				streams[k] = append(streams[k], seq)
			}
			committed = append(committed, Committed{Item: Item{Seq: seq, Kind: e.Kind, Data: e.Data}, Targets: e.Targets})
		}
	}
	// Several statements when the data is large: one message to the
	// server must stay well under its 1 GiB limit.
	for lo := 0; lo < len(seqs); {
		hi, bound := lo+1, len(data[lo])
		for hi < len(seqs) && bound+len(data[hi]) <= s.stmtBytes {
			bound += len(data[hi])
			hi++
		}
		if hi-lo > 1 {
			s.st.stmtBytes = max(s.st.stmtBytes, bound)
		}
		if _, err := tx.ExecContext(ctx, `INSERT INTO items (seq, kind, data, created_ms)
			SELECT u.seq, u.kind, u.data, $4 FROM unnest($1::BIGINT[], $2::BIGINT[], $3::BYTEA[]) AS u(seq, kind, data)`,
			seqs[lo:hi], kinds[lo:hi], data[lo:hi], b.now); err != nil {
			return nil, err
		}
		lo = hi
	}
	keys := make([]int64, len(order))
	lasts := make([]int64, len(order))
	firsts := make([]int64, len(order))
	blobs := make([][]byte, len(order))
	for i, k := range order {
		q := streams[k]
		keys[i], lasts[i], firsts[i], blobs[i] = int64(k), q[len(q)-1], q[0], encodeSeqs(q)
	}
	if _, err := tx.ExecContext(ctx, `INSERT INTO streams (as_key, last_seq, first_seq, seqs)
		SELECT * FROM unnest($1::BIGINT[], $2::BIGINT[], $3::BIGINT[], $4::BYTEA[])`, keys, lasts, firsts, blobs); err != nil {
		return nil, err
	}
	if _, err := tx.ExecContext(ctx, `UPDATE meta SET value = $1 WHERE key = 'next_seq'`, next); err != nil {
		return nil, err
	}
	return committed, nil
}

// maybeGC collects garbage now and then, as SQLite does. Any process may:
// the statements only remove what every cursor has passed.
func (s *Postgres) maybeGC(idle bool) {
	s.sinceGC++
	if s.sinceGC < 256 && !(idle && s.sinceGC > 1) {
		return
	}
	s.sinceGC = 0
	ctx, cancel := context.WithTimeout(context.Background(), commitTimeout)
	defer cancel()
	_, _ = s.db.ExecContext(ctx, gcStreams)
	_, _ = s.db.ExecContext(ctx, gcItems)
}

// knownAS reports whether key is an AS, from the cache or the database.
func (s *Postgres) knownAS(ctx context.Context, tx *sql.Tx, b *pgBatch, k ASKey) (bool, error) {
	if s.known[k] {
		return true, nil
	}
	var one int
	err := tx.QueryRowContext(ctx, `SELECT 1 FROM appservices WHERE as_key = $1`, k).Scan(&one)
	if errors.Is(err, sql.ErrNoRows) {
		return false, nil
	}
	if err != nil {
		return false, err
	}
	b.known = append(b.known, k)
	return true, nil
}

// fence refuses a write for as if this store leased it and the lease is no
// longer held. The row stays share-locked until commit, so a process taking
// the lease over waits for this commit and then sees it.
func (s *Postgres) fence(ctx context.Context, tx *sql.Tx, as ASKey) error {
	s.leaseMu.Lock()
	owner, ok := s.leased[as]
	s.leaseMu.Unlock()
	if !ok {
		return nil
	}
	var one int
	err := tx.QueryRowContext(ctx, `SELECT 1 FROM leases WHERE as_key = $1 AND owner = $2 AND expires_ms > `+pgNowMS+` FOR SHARE`,
		as, owner).Scan(&one)
	if errors.Is(err, sql.ErrNoRows) {
		return callError{fmt.Errorf("%w: key %d", ErrLeaseLost, as)}
	}
	return err
}

// EnsureAS implements Store.
func (s *Postgres) EnsureAS(ctx context.Context, id string) (ASKey, error) {
	var key ASKey
	err := s.do(ctx, storehook.EnsureAS, 0, func(ctx context.Context, tx *sql.Tx, b *pgBatch) error {
		if k, ok := s.ids[id]; ok {
			key = k
			return nil
		}
		if k, ok := b.newIDs[id]; ok {
			key = k
			return nil
		}
		// A new AS starts at the end of the log; another process may be
		// creating it at the same moment.
		err := tx.QueryRowContext(ctx, `INSERT INTO appservices (id, next_txn, delivered)
			SELECT $1, 1, value - 1 FROM meta WHERE key = 'next_seq' ON CONFLICT (id) DO NOTHING RETURNING as_key`, id).Scan(&key)
		if errors.Is(err, sql.ErrNoRows) {
			err = tx.QueryRowContext(ctx, `SELECT as_key FROM appservices WHERE id = $1`, id).Scan(&key)
		}
		if err != nil {
			return err
		}
		b.newIDs[id] = key
		return nil
	})
	return key, err
}

// Append implements Store.
func (s *Postgres) Append(ctx context.Context, entries []Entry) ([]int64, error) {
	if err := checkPositions(entries); err != nil {
		return nil, err
	}
	a := &pgAppend{entries: entries, live: make([]bool, len(entries)), seqs: make([]int64, len(entries))}
	size := batchSize(entries, func(e Entry) int { return len(e.Data) })
	err := s.do(ctx, storehook.Append, size, func(ctx context.Context, tx *sql.Tx, b *pgBatch) error {
		for _, e := range entries {
			for _, k := range e.Targets {
				ok, err := s.knownAS(ctx, tx, b, k)
				if err != nil {
					return err
				}
				if !ok {
					return callError{fmt.Errorf("%w: key %d", ErrUnknownAS, k)}
				}
			}
		}
		clear(a.seqs) // of an attempt that failed
		err := admit(entries, a.live, func(st string) (int64, error) {
			if p, ok := b.positions[st]; ok {
				return p, nil
			}
			// The row lock makes a second writer of the stream (there
			// should be none) wait for this commit and then see it.
			var p int64
			err := tx.QueryRowContext(ctx, `SELECT pos FROM positions WHERE stream = $1 FOR UPDATE`, st).Scan(&p)
			if errors.Is(err, sql.ErrNoRows) {
				err = nil
			}
			b.positions[st] = p
			return p, err
		}, func(st string, p int64) { b.positions[st], b.moved[st] = p, true })
		if err != nil {
			return err
		}
		b.appends = append(b.appends, a)
		return nil
	})
	if err != nil {
		return nil, err
	}
	return a.seqs, nil
}

// Position implements Store.
func (s *Postgres) Position(ctx context.Context, stream string) (int64, error) {
	return readPosition(ctx, s.db, postgresSQL, stream)
}

// Read implements Store.
func (s *Postgres) Read(ctx context.Context, as ASKey, after int64, maxItems, maxBytes int) ([]Item, error) {
	return readStream(ctx, s.db, postgresSQL, as, after, maxItems, maxBytes)
}

// Delivered implements Store.
func (s *Postgres) Delivered(ctx context.Context, as ASKey) (int64, error) {
	return readDelivered(ctx, s.db, postgresSQL, as)
}

// Freeze implements Store.
func (s *Postgres) Freeze(ctx context.Context, as ASKey, replace int64, txns []Txn) ([]int64, error) {
	var ids []int64
	key, refused := freezeKey(replace, txns), false
	err := s.do(ctx, storehook.Freeze, 0, func(ctx context.Context, tx *sql.Tx, b *pgBatch) (err error) {
		defer func() {
			var ce callError
			refused = errors.As(err, &ce)
		}()
		if err := s.fence(ctx, tx, as); err != nil {
			return err
		}
		// The row lock serializes freezes of one AS across processes: the
		// counter hands out each id once.
		delivered, nextTxn, err := lockAS(ctx, tx, as)
		if err != nil {
			return err
		}
		var lastFrozen int64
		if err := tx.QueryRowContext(ctx, `SELECT COALESCE(MAX(last_seq), 0) FROM txns WHERE as_key = $1 AND replaced_by = 0`, as).Scan(&lastFrozen); err != nil {
			return err
		}
		ids, _, err = freezeTxns(ctx, tx, postgresSQL, as, replace, max(delivered, lastFrozen), nextTxn, txns, s.unsure.repeats(as, key), true)
		return err
	})
	// A failed freeze that was not refused may have landed all the same.
	s.unsure.record(as, key, err == nil, err != nil && !refused)
	if err != nil {
		return nil, err
	}
	return ids, nil
}

// lockAS locks as's row until commit and returns its cursor and txn counter.
func lockAS(ctx context.Context, tx *sql.Tx, as ASKey) (delivered, nextTxn int64, err error) {
	err = tx.QueryRowContext(ctx, `SELECT delivered, next_txn FROM appservices WHERE as_key = $1 FOR UPDATE`, as).Scan(&delivered, &nextTxn)
	if errors.Is(err, sql.ErrNoRows) {
		return 0, 0, callError{fmt.Errorf("%w: key %d", ErrUnknownAS, as)}
	}
	return delivered, nextTxn, err
}

// SaveBody implements Store.
func (s *Postgres) SaveBody(ctx context.Context, as ASKey, id int64, body []byte) error {
	return s.do(ctx, storehook.SaveBody, len(body), func(ctx context.Context, tx *sql.Tx, b *pgBatch) error {
		if err := s.fence(ctx, tx, as); err != nil {
			return err
		}
		return saveBody(ctx, tx, postgresSQL, as, id, body)
	})
}

// Frozen implements Store.
func (s *Postgres) Frozen(ctx context.Context, as ASKey) ([]Txn, error) {
	return readFrozen(ctx, s.db, postgresSQL, as)
}

// Recover implements Recoverer.
func (s *Postgres) Recover(ctx context.Context, as ASKey) (Recovery, error) {
	m, err := readRecovery(ctx, s.db, postgresSQL, as, false)
	return m[as], err
}

// RecoverAll implements Recoverer.
func (s *Postgres) RecoverAll(ctx context.Context) (map[ASKey]Recovery, error) {
	return readRecovery(ctx, s.db, postgresSQL, 0, true)
}

// Complete implements Store.
func (s *Postgres) Complete(ctx context.Context, as ASKey, id int64) error {
	return s.CompleteMany(ctx, as, []int64{id})
}

// CompleteMany is Complete for several transactions of as, in one write. An
// id it does not know, or one after a transaction not completed, is an
// error; the others are still recorded.
func (s *Postgres) CompleteMany(ctx context.Context, as ASKey, ids []int64) error {
	return s.do(ctx, storehook.Complete, 0, func(ctx context.Context, tx *sql.Tx, b *pgBatch) error {
		if err := s.fence(ctx, tx, as); err != nil {
			return err
		}
		delivered, nextTxn, err := lockAS(ctx, tx, as)
		if err != nil {
			return err
		}
		rows, err := readTxnRows(ctx, tx, postgresSQL, as)
		if err != nil {
			return err
		}
		_, err = completeTxns(ctx, tx, postgresSQL, as, ids, rows, delivered, nextTxn, b.now, true)
		return err
	})
}

// SetState implements Store.
func (s *Postgres) SetState(ctx context.Context, as ASKey, st State) error {
	up := 0
	if st.Up {
		up = 1
	}
	lastError := cleanText(st.LastError, maxLastError)
	return s.do(ctx, storehook.State, len(lastError), func(ctx context.Context, tx *sql.Tx, b *pgBatch) error {
		_, err := tx.ExecContext(ctx, `UPDATE appservices SET up = $1, failures = $2, last_success_ms = GREATEST(last_success_ms, $3),
			last_error = $4, last_error_ms = $5, next_retry_ms = $6 WHERE as_key = $7`,
			up, st.Failures, ms(st.LastSuccess), lastError, ms(st.LastErrorAt), ms(st.NextRetry), as)
		return err
	})
}

// Statuses implements Store.
func (s *Postgres) Statuses(ctx context.Context) ([]Status, error) {
	return statuses(ctx, s.db, postgresSQL)
}

// Shared implements Leaser: other processes write to the same database.
func (s *Postgres) Shared() bool { return true }

// Acquire implements Leaser.
func (s *Postgres) Acquire(ctx context.Context, as ASKey, owner string, ttl time.Duration) (bool, error) {
	fault := s.hooks.Decide([]storehook.Op{storehook.Lease})
	if fault == storehook.Fail {
		return false, fmt.Errorf("txnstore: acquire lease: %w", storehook.ErrInjected)
	}
	var got string
	err := s.db.QueryRowContext(ctx, `INSERT INTO leases (as_key, owner, expires_ms) VALUES ($1, $2, `+pgNowMS+` + $3)
		ON CONFLICT (as_key) DO UPDATE SET owner = EXCLUDED.owner, expires_ms = EXCLUDED.expires_ms
		WHERE leases.owner = EXCLUDED.owner OR leases.expires_ms <= `+pgNowMS+`
		RETURNING owner`, as, owner, ttl.Milliseconds()).Scan(&got)
	if errors.Is(err, sql.ErrNoRows) {
		return false, nil
	}
	if err != nil {
		return false, fmt.Errorf("txnstore: acquire lease: %w", err)
	}
	s.leaseMu.Lock()
	s.leased[as] = owner
	s.leaseMu.Unlock()
	if fault == storehook.Ambiguous {
		return false, fmt.Errorf("txnstore: acquire lease: %w", storehook.ErrInjected)
	}
	return true, nil
}

// Renew implements Leaser. An expired lease is lost even if nobody took it:
// the writes it fenced may have been refused meanwhile, so the sender starts
// over from Acquire.
func (s *Postgres) Renew(ctx context.Context, as ASKey, owner string, ttl time.Duration) (bool, error) {
	fault := s.hooks.Decide([]storehook.Op{storehook.Lease})
	if fault == storehook.Fail {
		return false, fmt.Errorf("txnstore: renew lease: %w", storehook.ErrInjected)
	}
	res, err := s.db.ExecContext(ctx, `UPDATE leases SET expires_ms = `+pgNowMS+` + $3
		WHERE as_key = $1 AND owner = $2 AND expires_ms > `+pgNowMS, as, owner, ttl.Milliseconds())
	if err != nil {
		return false, fmt.Errorf("txnstore: renew lease: %w", err)
	}
	n, err := res.RowsAffected()
	if err != nil {
		return false, fmt.Errorf("txnstore: renew lease: %w", err)
	}
	if fault == storehook.Ambiguous {
		return false, fmt.Errorf("txnstore: renew lease: %w", storehook.ErrInjected)
	}
	return n == 1, nil
}

// Release implements Leaser.
func (s *Postgres) Release(ctx context.Context, as ASKey, owner string) error {
	fault := s.hooks.Decide([]storehook.Op{storehook.Lease})
	if fault == storehook.Fail {
		return fmt.Errorf("txnstore: release lease: %w", storehook.ErrInjected)
	}
	s.leaseMu.Lock()
	delete(s.leased, as)
	s.leaseMu.Unlock()
	if _, err := s.db.ExecContext(ctx, `DELETE FROM leases WHERE as_key = $1 AND owner = $2`, as, owner); err != nil {
		return fmt.Errorf("txnstore: release lease: %w", err)
	}
	if fault == storehook.Ambiguous {
		return fmt.Errorf("txnstore: release lease: %w", storehook.ErrInjected)
	}
	return nil
}

// stats returns counters of this process's work on the store, for tests.
func (s *Postgres) stats() stats {
	var st stats
	_ = s.do(context.Background(), 0, 0, func(context.Context, *sql.Tx, *pgBatch) error { st = s.st; return nil })
	return st
}

// Close implements Store.
func (s *Postgres) Close() error {
	if !s.w.close() {
		return nil
	}
	return s.db.Close()
}

// OpenPostgresStatus reads every AS's status from the database of dsn in
// read-only transactions, for `asdispatch status`.
func OpenPostgresStatus(ctx context.Context, dsn string) ([]Status, error) {
	db, err := openPG(ctx, dsn, true)
	if err != nil {
		return nil, err
	}
	defer db.Close()
	return statuses(ctx, db, postgresSQL)
}

var (
	_ Store  = (*Postgres)(nil)
	_ Leaser = (*Postgres)(nil)
)
