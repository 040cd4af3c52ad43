package txnstore

import (
	"context"
	"database/sql"
	"encoding/binary"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"time"
)

// The schema, the reads and garbage collection are shared by the backends:
// written once in SQLite's SQL, adapted to PostgreSQL by a dialect.

// dialect adapts the shared SQL to one backend.
type dialect struct {
	// ddl rewrites the column types of migrations; nil keeps them.
	ddl *strings.Replacer
	// dollar numbers placeholders ($1, $2, ...) instead of ?.
	dollar bool
}

var (
	sqliteSQL = &dialect{}
	// as_key of appservices is SQLite's rowid alias; PostgreSQL needs a
	// sequence for it. Everything else is 64-bit or bytes.
	postgresSQL = &dialect{
		ddl:    strings.NewReplacer("as_key INTEGER PRIMARY KEY", "as_key SERIAL PRIMARY KEY", "INTEGER", "BIGINT", "BLOB", "BYTEA"),
		dollar: true,
	}
)

// q returns query with the dialect's placeholders.
func (d *dialect) q(query string) string {
	if !d.dollar {
		return query
	}
	var b strings.Builder
	b.Grow(len(query) + 8)
	n := 0
	for i := 0; i < len(query); i++ {
		if query[i] == '?' {
			n++
			b.WriteByte('$')
			b.WriteString(strconv.Itoa(n))
			continue
		}
		b.WriteByte(query[i])
	}
	return b.String()
}

// migrations are applied in order, each once, recorded in schema_version.
// Never edit one that has shipped: add another.
var migrations = []string{
	`CREATE TABLE meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
	INSERT INTO meta (key, value) VALUES ('next_seq', 1);
	CREATE TABLE items (seq INTEGER PRIMARY KEY, kind INTEGER NOT NULL, data BLOB NOT NULL, created_ms INTEGER NOT NULL);
	CREATE TABLE streams (as_key INTEGER NOT NULL, last_seq INTEGER NOT NULL, first_seq INTEGER NOT NULL, seqs BLOB NOT NULL,
		PRIMARY KEY (as_key, last_seq));
	CREATE TABLE appservices (as_key INTEGER PRIMARY KEY, id TEXT NOT NULL UNIQUE, next_txn INTEGER NOT NULL,
		delivered INTEGER NOT NULL, up INTEGER NOT NULL DEFAULT 1, failures INTEGER NOT NULL DEFAULT 0,
		last_success_ms INTEGER NOT NULL DEFAULT 0, last_error TEXT NOT NULL DEFAULT '',
		last_error_ms INTEGER NOT NULL DEFAULT 0, next_retry_ms INTEGER NOT NULL DEFAULT 0);
	CREATE TABLE txns (as_key INTEGER NOT NULL, txn_id INTEGER NOT NULL, after_seq INTEGER NOT NULL, last_seq INTEGER NOT NULL,
		format INTEGER NOT NULL, len INTEGER NOT NULL, checksum INTEGER NOT NULL, body BLOB,
		PRIMARY KEY (as_key, txn_id));`,
	// Sender leases of a shared store (PostgreSQL); unused by SQLite, which
	// one process owns, but kept in its schema so versions mean the same.
	`CREATE TABLE leases (as_key INTEGER NOT NULL, owner TEXT NOT NULL, expires_ms INTEGER NOT NULL, PRIMARY KEY (as_key));`,
}

// migrate brings the schema up to date inside tx.
func migrate(ctx context.Context, tx *sql.Tx, d *dialect) error {
	if _, err := tx.ExecContext(ctx, `CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)`); err != nil {
		return err
	}
	var v int
	if err := tx.QueryRowContext(ctx, `SELECT COALESCE(MAX(version), 0) FROM schema_version`).Scan(&v); err != nil {
		return err
	}
	if v > len(migrations) {
		return fmt.Errorf("schema version %d is newer than this program knows (%d)", v, len(migrations))
	}
	for i := v; i < len(migrations); i++ {
		m := migrations[i]
		if d.ddl != nil {
			m = d.ddl.Replace(m)
		}
		for _, stmt := range strings.Split(m, ";") {
			if strings.TrimSpace(stmt) == "" {
				continue
			}
			if _, err := tx.ExecContext(ctx, stmt); err != nil {
				return fmt.Errorf("migration %d: %w", i+1, err)
			}
		}
		if _, err := tx.ExecContext(ctx, d.q(`INSERT INTO schema_version (version) VALUES (?)`), i+1); err != nil {
			return err
		}
	}
	return nil
}

// Garbage collection: stream rows every cursor has passed, then items no
// stream row needs. Items at or past next_seq are not committed yet. Both
// walk the streams primary key (as_key, last_seq) per AS instead of the
// whole table: with a large backlog a scan would cost every collection as
// much as the backlog. An AS's rows are disjoint ranges in order, so its
// lowest first_seq is that of its lowest last_seq.
const (
	gcStreams = `DELETE FROM streams WHERE (as_key, last_seq) IN (SELECT s.as_key, s.last_seq FROM appservices a
		JOIN streams s ON s.as_key = a.as_key AND s.last_seq <= a.delivered)`
	// SQLite plans the join with streams outside without statistics;
	// CROSS JOIN makes it walk the ASes and search streams by range.
	gcStreamsSQLite = `DELETE FROM streams WHERE (as_key, last_seq) IN (SELECT s.as_key, s.last_seq FROM appservices a
		CROSS JOIN streams s ON s.as_key = a.as_key AND s.last_seq <= a.delivered)`
	gcItems = `DELETE FROM items WHERE seq < COALESCE((SELECT MIN((SELECT s.first_seq FROM streams s WHERE s.as_key = a.as_key
		ORDER BY s.last_seq LIMIT 1)) FROM appservices a), (SELECT value FROM meta WHERE key = 'next_seq'))`
)

func encodeSeqs(seqs []int64) []byte {
	out := make([]byte, 0, len(seqs)*2)
	prev := int64(0)
	for _, q := range seqs {
		out = binary.AppendUvarint(out, uint64(q-prev))
		prev = q
	}
	return out
}

func decodeSeqs(b []byte) ([]int64, error) {
	var out []int64
	prev := int64(0)
	for len(b) > 0 {
		d, n := binary.Uvarint(b)
		if n <= 0 {
			return nil, errors.New("txnstore: corrupt stream row")
		}
		prev += int64(d)
		out = append(out, prev)
		b = b[n:]
	}
	return out, nil
}

func ms(t time.Time) int64 {
	if t.IsZero() {
		return 0
	}
	return t.UnixMilli()
}

func fromMS(v int64) time.Time {
	if v == 0 {
		return time.Time{}
	}
	return time.UnixMilli(v)
}

// pendingSeqs calls fn with each seq of as's stream after `after`, in
// order, until fn returns false.
func pendingSeqs(ctx context.Context, db *sql.DB, d *dialect, as ASKey, after int64, fn func(seq int64) bool) error {
	rows, err := db.QueryContext(ctx, d.q(`SELECT seqs FROM streams WHERE as_key = ? AND last_seq > ? ORDER BY last_seq`), as, after)
	if err != nil {
		return err
	}
	defer rows.Close()
	for rows.Next() {
		var blob []byte
		if err := rows.Scan(&blob); err != nil {
			return err
		}
		seqs, err := decodeSeqs(blob)
		if err != nil {
			return err
		}
		for _, q := range seqs {
			if q > after && !fn(q) {
				return nil
			}
		}
	}
	return rows.Err()
}

// readStream implements Store.Read.
func readStream(ctx context.Context, db *sql.DB, d *dialect, as ASKey, after int64, max int) ([]Item, error) {
	if max <= 0 {
		return nil, nil
	}
	var want []int64
	err := pendingSeqs(ctx, db, d, as, after, func(q int64) bool {
		want = append(want, q)
		return len(want) < max
	})
	if err != nil {
		return nil, fmt.Errorf("txnstore: read: %w", err)
	}
	if len(want) == 0 {
		return nil, nil
	}
	return readItems(ctx, db, d, want)
}

// readItems loads the items of want (ascending seqs).
func readItems(ctx context.Context, db *sql.DB, d *dialect, want []int64) ([]Item, error) {
	out := make([]Item, 0, len(want))
	idx := make(map[int64]int, len(want))
	for i, q := range want {
		idx[q] = i
	}
	got := make([]*Item, len(want))
	scan := func(rows *sql.Rows) error {
		defer rows.Close()
		for rows.Next() {
			var it Item
			var kind int
			if err := rows.Scan(&it.Seq, &kind, &it.Data); err != nil {
				return err
			}
			it.Kind = Kind(kind)
			if i, ok := idx[it.Seq]; ok {
				got[i] = &it
			}
		}
		return rows.Err()
	}
	lo, hi := want[0], want[len(want)-1]
	if hi-lo+1 <= int64(4*len(want)) {
		rows, err := db.QueryContext(ctx, d.q(`SELECT seq, kind, data FROM items WHERE seq BETWEEN ? AND ?`), lo, hi)
		if err != nil {
			return nil, fmt.Errorf("txnstore: read items: %w", err)
		}
		if err := scan(rows); err != nil {
			return nil, fmt.Errorf("txnstore: read items: %w", err)
		}
	} else {
		for i := 0; i < len(want); i += 500 {
			chunk := want[i:min(i+500, len(want))]
			args := make([]any, len(chunk))
			for j, q := range chunk {
				args[j] = q
			}
			rows, err := db.QueryContext(ctx, d.q(`SELECT seq, kind, data FROM items WHERE seq IN (?`+strings.Repeat(",?", len(chunk)-1)+`)`), args...)
			if err != nil {
				return nil, fmt.Errorf("txnstore: read items: %w", err)
			}
			if err := scan(rows); err != nil {
				return nil, fmt.Errorf("txnstore: read items: %w", err)
			}
		}
	}
	for i, it := range got {
		if it == nil {
			return nil, fmt.Errorf("txnstore: item %d of a stream is missing", want[i])
		}
		out = append(out, *it)
	}
	return out, nil
}

// readDelivered implements Store.Delivered.
func readDelivered(ctx context.Context, db *sql.DB, d *dialect, as ASKey) (int64, error) {
	var v int64
	err := db.QueryRowContext(ctx, d.q(`SELECT delivered FROM appservices WHERE as_key = ?`), as).Scan(&v)
	if errors.Is(err, sql.ErrNoRows) {
		return 0, fmt.Errorf("%w: key %d", ErrUnknownAS, as)
	}
	if err != nil {
		return 0, fmt.Errorf("txnstore: delivered: %w", err)
	}
	return v, nil
}

// readFrozen implements Store.Frozen.
func readFrozen(ctx context.Context, db *sql.DB, d *dialect, as ASKey) ([]Txn, error) {
	rows, err := db.QueryContext(ctx, d.q(`SELECT txn_id, after_seq, last_seq, format, len, checksum, body
		FROM txns WHERE as_key = ? ORDER BY after_seq`), as)
	if err != nil {
		return nil, fmt.Errorf("txnstore: frozen: %w", err)
	}
	defer rows.Close()
	var out []Txn
	for rows.Next() {
		t := Txn{AS: as}
		var format, checksum int64
		if err := rows.Scan(&t.ID, &t.Range.After, &t.Range.Last, &format, &t.Len, &checksum, &t.Body); err != nil {
			return nil, fmt.Errorf("txnstore: frozen: %w", err)
		}
		t.Format, t.Checksum = uint32(format), uint32(checksum)
		out = append(out, t)
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("txnstore: frozen: %w", err)
	}
	return out, nil
}

// statuses implements Store.Statuses.
func statuses(ctx context.Context, db *sql.DB, d *dialect) ([]Status, error) {
	rows, err := db.QueryContext(ctx, `SELECT as_key, id, delivered, up, failures, last_success_ms, last_error, last_error_ms, next_retry_ms,
		(SELECT COUNT(*) FROM txns t WHERE t.as_key = a.as_key) FROM appservices a ORDER BY id`)
	if err != nil {
		return nil, fmt.Errorf("txnstore: statuses: %w", err)
	}
	var out []Status
	for rows.Next() {
		var st Status
		var up int
		var ls, le, nr int64
		if err := rows.Scan(&st.Key, &st.ID, &st.Delivered, &up, &st.Failures, &ls, &st.LastError, &le, &nr, &st.PendingTxns); err != nil {
			rows.Close()
			return nil, fmt.Errorf("txnstore: statuses: %w", err)
		}
		st.Up, st.LastSuccess, st.LastErrorAt, st.NextRetry = up == 1, fromMS(ls), fromMS(le), fromMS(nr)
		out = append(out, st)
	}
	rows.Close()
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("txnstore: statuses: %w", err)
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
			return nil, fmt.Errorf("txnstore: statuses: %w", err)
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

// checkFreeze checks that txns follow each other from start, the end of
// what is delivered or frozen, or, when replace is set, that they exactly
// cover the transaction they replace, which it then deletes.
func checkFreeze(ctx context.Context, tx *sql.Tx, d *dialect, as ASKey, replace, start int64, txns []Txn) error {
	if len(txns) == 0 {
		return callError{fmt.Errorf("%w: no transactions", ErrBadRange)}
	}
	end := int64(-1)
	if replace != 0 {
		err := tx.QueryRowContext(ctx, d.q(`SELECT after_seq, last_seq FROM txns WHERE as_key = ? AND txn_id = ?`), as, replace).Scan(&start, &end)
		if errors.Is(err, sql.ErrNoRows) {
			return callError{fmt.Errorf("%w: %d", ErrUnknownTxn, replace)}
		}
		if err != nil {
			return err
		}
	}
	prev := start
	for _, t := range txns {
		if t.Range.After != prev || t.Range.Last <= t.Range.After {
			return callError{fmt.Errorf("%w: (%d, %d] after %d", ErrBadRange, t.Range.After, t.Range.Last, prev)}
		}
		prev = t.Range.Last
	}
	if replace == 0 {
		return nil
	}
	if prev != end {
		return callError{fmt.Errorf("%w: split ends at %d, not %d", ErrBadRange, prev, end)}
	}
	_, err := tx.ExecContext(ctx, d.q(`DELETE FROM txns WHERE as_key = ? AND txn_id = ?`), as, replace)
	return err
}
