package txnstore

import (
	"bytes"
	"context"
	"database/sql"
	"encoding/binary"
	"errors"
	"fmt"
	"math"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"
	"unicode/utf8"

	"github.com/jackc/pgx/v5/pgconn"
	"github.com/mattn/go-sqlite3"
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
	// A transaction split by Freeze(replace) is kept, marked with the
	// first id that replaced it, until the cursor passes it: a Complete of
	// an id whose row is gone then means it was completed before.
	`ALTER TABLE txns ADD COLUMN replaced_by INTEGER NOT NULL DEFAULT 0;`,
	// The highest position of each homeserver stream handed over, written
	// in the commit of the items it covers.
	`CREATE TABLE positions (stream TEXT PRIMARY KEY, pos INTEGER NOT NULL);`,
	// The lowest item a stream still needs, found in the index instead of
	// by a search per AS: at 10,000 ASes those searches were most of a
	// collection's cost.
	`CREATE INDEX streams_first_seq ON streams (first_seq);`,
}

// migrate brings the schema up to date inside tx, then removes frozen
// transactions at or below their AS's cursor (left by versions whose
// cursor could pass an unrecorded completion): they are delivered.
func migrate(ctx context.Context, tx *sql.Tx, d *dialect) error {
	if err := migrateTo(ctx, tx, d, len(migrations)); err != nil {
		return err
	}
	_, err := tx.ExecContext(ctx, dropDelivered)
	return err
}

// dropDelivered removes every frozen transaction the cursor has passed.
const dropDelivered = `DELETE FROM txns WHERE last_seq <= (SELECT a.delivered FROM appservices a WHERE a.as_key = txns.as_key)`

// migrateTo applies the migrations up to version n inside tx.
func migrateTo(ctx context.Context, tx *sql.Tx, d *dialect, n int) error {
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
	for i := v; i < n; i++ {
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

// maxStreamName bounds a stream name: it names a homeserver stream (and
// maybe its writer), never data.
const maxStreamName = 255

// streamAt is one stream's position, found by a linear search: a call
// names one stream or a few, and maps cost more than they save then.
type streamAt struct {
	stream   string
	pos, end int64
}

func findStream(sts []streamAt, stream string) int {
	for i := range sts {
		if sts[i].stream == stream {
			return i
		}
	}
	return -1
}

// checkPositions validates the positions of an Append's entries.
func checkPositions(entries []Entry) error {
	var last []streamAt
	for _, e := range entries {
		if e.Stream == "" {
			if e.Pos != 0 {
				return fmt.Errorf("%w: position %d without a stream", ErrBadPosition, e.Pos)
			}
			continue
		}
		i := findStream(last, e.Stream)
		if i < 0 {
			if len(e.Stream) > maxStreamName || !utf8.ValidString(e.Stream) || strings.IndexByte(e.Stream, 0) >= 0 {
				return fmt.Errorf("%w: stream name %.40q", ErrBadPosition, e.Stream)
			}
			last = append(last, streamAt{stream: e.Stream})
			i = len(last) - 1
		}
		if e.Pos <= 0 {
			return fmt.Errorf("%w: %s at %d, not above 0", ErrBadPosition, e.Stream, e.Pos)
		}
		if e.Pos < last[i].pos {
			return fmt.Errorf("%w: %s goes down from %d to %d", ErrBadPosition, e.Stream, last[i].pos, e.Pos)
		}
		last[i].pos = e.Pos
	}
	return nil
}

// admit decides which entries of one Append are new: those without a
// stream, and those above their stream's position cur reports. It sets
// live[i] and calls moved with each stream's highest new position. Every
// entry of a call is compared with the position as the call found it, so
// entries sharing a position go in or are skipped together.
func admit(entries []Entry, live []bool, cur func(stream string) (int64, error), moved func(stream string, pos int64)) error {
	var sts []streamAt // pos: as the call found it; end: the highest new
	for i, e := range entries {
		if e.Stream == "" {
			live[i] = true
			continue
		}
		j := findStream(sts, e.Stream)
		if j < 0 {
			p, err := cur(e.Stream)
			if err != nil {
				return err
			}
			sts = append(sts, streamAt{stream: e.Stream, pos: p, end: p})
			j = len(sts) - 1
		}
		live[i] = e.Pos > sts[j].pos
		sts[j].end = max(sts[j].end, e.Pos)
	}
	for _, st := range sts {
		if st.end > st.pos {
			moved(st.stream, st.end)
		}
	}
	return nil
}

// writePositions moves the stored positions up to those of pos, in one
// statement: a commit of many writers' appends touches many streams.
func writePositions(ctx context.Context, tx *sql.Tx, d *dialect, pos map[string]int64, streams []string) error {
	for len(streams) > 0 {
		chunk := streams[:min(len(streams), 256)]
		streams = streams[len(chunk):]
		args := make([]any, 0, 2*len(chunk))
		for _, st := range chunk {
			args = append(args, st, pos[st])
		}
		q := `INSERT INTO positions (stream, pos) VALUES ` + strings.TrimSuffix(strings.Repeat("(?, ?), ", len(chunk)), ", ") + `
			ON CONFLICT (stream) DO UPDATE SET pos = CASE WHEN excluded.pos > positions.pos THEN excluded.pos ELSE positions.pos END`
		if _, err := tx.ExecContext(ctx, d.q(q), args...); err != nil {
			return err
		}
	}
	return nil
}

// readPosition implements Store.Position.
func readPosition(ctx context.Context, db *sql.DB, d *dialect, stream string) (int64, error) {
	var p int64
	err := db.QueryRowContext(ctx, d.q(`SELECT pos FROM positions WHERE stream = ?`), stream).Scan(&p)
	if errors.Is(err, sql.ErrNoRows) {
		return 0, nil
	}
	if err != nil {
		return 0, fmt.Errorf("txnstore: position: %w", err)
	}
	return p, nil
}

// Garbage collection: stream rows every cursor has passed, then items no
// stream row needs. Items at or past next_seq are not committed yet.
// Neither scans the streams table: with a large backlog a scan would cost
// every collection as much as the backlog. Stream rows are found by the
// primary key (as_key, last_seq) per AS, the lowest item any row needs in
// streams_first_seq.
const (
	gcStreams = `DELETE FROM streams WHERE (as_key, last_seq) IN (SELECT s.as_key, s.last_seq FROM appservices a
		JOIN streams s ON s.as_key = a.as_key AND s.last_seq <= a.delivered)`
	// SQLite plans the join with streams outside without statistics;
	// CROSS JOIN makes it walk the ASes and search streams by range.
	gcStreamsSQLite = `DELETE FROM streams WHERE (as_key, last_seq) IN (SELECT s.as_key, s.last_seq FROM appservices a
		CROSS JOIN streams s ON s.as_key = a.as_key AND s.last_seq <= a.delivered)`
	// gcStreamsOfAS is gcStreams for one AS (its key twice).
	gcStreamsOfAS = `DELETE FROM streams WHERE as_key = ? AND last_seq <= (SELECT delivered FROM appservices WHERE as_key = ?)`
	// gcItems keeps the items from the lowest first_seq of any stream row
	// on, looked up in streams_first_seq.
	gcItems = `DELETE FROM items WHERE seq < COALESCE((SELECT MIN(first_seq) FROM streams), (SELECT value FROM meta WHERE key = 'next_seq'))`
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
func readStream(ctx context.Context, db *sql.DB, d *dialect, as ASKey, after int64, maxItems, maxBytes int) ([]Item, error) {
	if maxItems <= 0 {
		return nil, nil
	}
	var want []int64
	err := pendingSeqs(ctx, db, d, as, after, func(q int64) bool {
		want = append(want, q)
		return len(want) < maxItems
	})
	if err != nil {
		return nil, fmt.Errorf("txnstore: read: %w", err)
	}
	if len(want) == 0 {
		return nil, nil
	}
	if lo, hi := want[0], want[len(want)-1]; hi-lo+1 <= int64(4*len(want)) {
		return readDense(ctx, db, d, want, maxBytes)
	}
	if maxBytes > 0 && len(want) > 1 {
		if want, err = withinBudget(ctx, db, d, want, maxBytes); err != nil {
			return nil, fmt.Errorf("txnstore: read: %w", err)
		}
	}
	return readItems(ctx, db, d, want)
}

// readDense loads the items of want (ascending seqs, dense among the
// items: what a catching-up AS reads) in one ordered pass over their range,
// stopping at the item whose data brings the total to maxBytes (if > 0).
// The data of all items share a few allocations.
func readDense(ctx context.Context, db *sql.DB, d *dialect, want []int64, maxBytes int) ([]Item, error) {
	rows, err := db.QueryContext(ctx, d.q(`SELECT seq, kind, data FROM items WHERE seq BETWEEN ? AND ? ORDER BY seq`), want[0], want[len(want)-1])
	if err != nil {
		return nil, fmt.Errorf("txnstore: read items: %w", err)
	}
	defer rows.Close()
	out := make([]Item, 0, len(want))
	var arena []byte
	total := 0
	for rows.Next() && len(out) < len(want) && (maxBytes <= 0 || total < maxBytes) {
		var seq int64
		var kind int
		var raw sql.RawBytes
		if err := rows.Scan(&seq, &kind, &raw); err != nil {
			return nil, fmt.Errorf("txnstore: read items: %w", err)
		}
		next := want[len(out)]
		if seq < next {
			continue // another stream's
		}
		if seq > next {
			break
		}
		if cap(arena)-len(arena) < len(raw) {
			arena = make([]byte, 0, max(len(raw), 256<<10))
		}
		start := len(arena)
		arena = append(arena, raw...)
		out = append(out, Item{Seq: seq, Kind: Kind(kind), Data: arena[start:len(arena):len(arena)]})
		total += len(raw)
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("txnstore: read items: %w", err)
	}
	if len(out) < len(want) && (maxBytes <= 0 || total < maxBytes) {
		return nil, fmt.Errorf("txnstore: item %d of a stream is missing", want[len(out)])
	}
	return out, nil
}

// withinBudget returns the shortest prefix of want whose items' data reach
// maxBytes (all of want if they never do). Including the item that crosses
// the budget lets a reader tell a read cut for bytes (at least maxBytes) from
// the end of the stream (less). It reads only the lengths, which neither
// backend needs to load the data for.
func withinBudget(ctx context.Context, db *sql.DB, d *dialect, want []int64, maxBytes int) ([]int64, error) {
	size := make(map[int64]int, len(want))
	err := queryWant(ctx, db, d, want, "length(data)", func(rows *sql.Rows) error {
		defer rows.Close()
		for rows.Next() {
			var q int64
			var n int
			if err := rows.Scan(&q, &n); err != nil {
				return err
			}
			size[q] = n
		}
		return rows.Err()
	})
	if err != nil {
		return nil, err
	}
	total := 0
	for i, q := range want {
		total += size[q]
		if total >= maxBytes {
			return want[:i+1], nil
		}
	}
	return want, nil
}

// querier is a *sql.DB or a *sql.Tx.
type querier interface {
	QueryContext(ctx context.Context, query string, args ...any) (*sql.Rows, error)
	QueryRowContext(ctx context.Context, query string, args ...any) *sql.Row
}

// queryWant runs SELECT seq, cols FROM items for the seqs of want
// (ascending) and hands each result to scan: one range query when want is
// dense, else lists of seqs.
func queryWant(ctx context.Context, db querier, d *dialect, want []int64, cols string, scan func(*sql.Rows) error) error {
	lo, hi := want[0], want[len(want)-1]
	if hi-lo+1 <= int64(4*len(want)) {
		rows, err := db.QueryContext(ctx, d.q(`SELECT seq, `+cols+` FROM items WHERE seq BETWEEN ? AND ?`), lo, hi)
		if err != nil {
			return err
		}
		return scan(rows)
	}
	for i := 0; i < len(want); i += 500 {
		chunk := want[i:min(i+500, len(want))]
		args := make([]any, len(chunk))
		for j, q := range chunk {
			args[j] = q
		}
		rows, err := db.QueryContext(ctx, d.q(`SELECT seq, `+cols+` FROM items WHERE seq IN (?`+strings.Repeat(",?", len(chunk)-1)+`)`), args...)
		if err != nil {
			return err
		}
		if err := scan(rows); err != nil {
			return err
		}
	}
	return nil
}

// readItems loads the items of want (ascending seqs).
func readItems(ctx context.Context, db *sql.DB, d *dialect, want []int64) ([]Item, error) {
	out := make([]Item, 0, len(want))
	idx := make(map[int64]int, len(want))
	for i, q := range want {
		idx[q] = i
	}
	got := make([]*Item, len(want))
	err := queryWant(ctx, db, d, want, "kind, data", func(rows *sql.Rows) error {
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
	})
	if err != nil {
		return nil, fmt.Errorf("txnstore: read items: %w", err)
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

// readFrozen implements Store.Frozen: never a transaction replaced by a
// split or one the cursor has passed (delivered; a later Complete or the
// next open deletes it).
func readFrozen(ctx context.Context, db *sql.DB, d *dialect, as ASKey) ([]Txn, error) {
	rows, err := db.QueryContext(ctx, d.q(`SELECT t.txn_id, t.after_seq, t.last_seq, t.format, t.len, t.checksum, t.body
		FROM txns t JOIN appservices a ON a.as_key = t.as_key
		WHERE t.as_key = ? AND t.replaced_by = 0 AND t.last_seq > a.delivered ORDER BY t.after_seq`), as)
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

// recoverySQL reads ASes' cursors, stream ends and live frozen
// transactions (those Store.Frozen returns) in one statement, so one
// snapshot: a row per transaction, or one with NULLs for an AS without.
const recoverySQL = `SELECT a.as_key, a.delivered, COALESCE((SELECT MAX(s.last_seq) FROM streams s WHERE s.as_key = a.as_key), 0),
	t.txn_id, t.after_seq, t.last_seq, t.format, t.len, t.checksum, t.body
	FROM appservices a LEFT JOIN txns t ON t.as_key = a.as_key AND t.replaced_by = 0 AND t.last_seq > a.delivered`

// readRecovery implements Recoverer: of as, or of every AS when all.
func readRecovery(ctx context.Context, db *sql.DB, d *dialect, as ASKey, all bool) (map[ASKey]Recovery, error) {
	var rows *sql.Rows
	var err error
	if all {
		rows, err = db.QueryContext(ctx, recoverySQL+` ORDER BY a.as_key, t.after_seq`)
	} else {
		rows, err = db.QueryContext(ctx, d.q(recoverySQL+` WHERE a.as_key = ? ORDER BY t.after_seq`), as)
	}
	if err != nil {
		return nil, fmt.Errorf("txnstore: recover: %w", err)
	}
	defer rows.Close()
	out := map[ASKey]Recovery{}
	for rows.Next() {
		var k ASKey
		var r Recovery
		var id, after, last, format, length, checksum sql.NullInt64
		var body []byte
		if err := rows.Scan(&k, &r.Delivered, &r.End, &id, &after, &last, &format, &length, &checksum, &body); err != nil {
			return nil, fmt.Errorf("txnstore: recover: %w", err)
		}
		if prev, ok := out[k]; ok {
			r.Frozen = prev.Frozen
		}
		r.End = max(r.End, r.Delivered)
		if id.Valid {
			r.Frozen = append(r.Frozen, Txn{AS: k, ID: id.Int64, Range: Range{After: after.Int64, Last: last.Int64},
				Format: uint32(format.Int64), Len: int(length.Int64), Checksum: uint32(checksum.Int64), Body: body})
		}
		out[k] = r
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("txnstore: recover: %w", err)
	}
	if _, ok := out[as]; !all && !ok {
		return nil, fmt.Errorf("%w: key %d", ErrUnknownAS, as)
	}
	return out, nil
}

// statuses implements Store.Statuses in a constant number of queries, in
// one snapshot: at 10,000 ASes a query per AS made each status or metrics
// poll 10,000 queries.
func statuses(ctx context.Context, db *sql.DB, d *dialect) ([]Status, error) {
	// Repeatable read so that every query sees the cursors the first read
	// (PostgreSQL; a SQLite read transaction is one snapshot anyway).
	tx, err := db.BeginTx(ctx, &sql.TxOptions{Isolation: sql.LevelRepeatableRead, ReadOnly: true})
	if err != nil {
		return nil, fmt.Errorf("txnstore: statuses: %w", err)
	}
	defer tx.Rollback()
	out, err := readStatuses(ctx, tx, d)
	if err != nil {
		return nil, fmt.Errorf("txnstore: statuses: %w", err)
	}
	return out, nil
}

// readASStatuses reads every AS's row of Status, all but PendingItems and
// OldestPending.
func readASStatuses(ctx context.Context, q querier) ([]Status, error) {
	// A read-only status may see a store not migrated yet by the new
	// version of the program: before version 3 there are no split rows.
	var v int
	if err := q.QueryRowContext(ctx, `SELECT COALESCE(MAX(version), 0) FROM schema_version`).Scan(&v); err != nil {
		return nil, err
	}
	live := ` AND t.replaced_by = 0`
	if v < 3 {
		live = ``
	}
	rows, err := q.QueryContext(ctx, `SELECT as_key, id, delivered, up, failures, last_success_ms, last_error, last_error_ms, next_retry_ms,
		(SELECT COUNT(*) FROM txns t WHERE t.as_key = a.as_key`+live+` AND t.last_seq > a.delivered)
		FROM appservices a ORDER BY id`)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	var out []Status
	for rows.Next() {
		var st Status
		var up int
		var ls, le, nr int64
		if err := rows.Scan(&st.Key, &st.ID, &st.Delivered, &up, &st.Failures, &ls, &st.LastError, &le, &nr, &st.PendingTxns); err != nil {
			return nil, err
		}
		st.Up, st.LastSuccess, st.LastErrorAt, st.NextRetry = up == 1, fromMS(ls), fromMS(le), fromMS(nr)
		out = append(out, st)
	}
	return out, rows.Err()
}

// readStatuses is statuses inside tx: the pending items of every AS in one
// query, their oldest's times in another.
func readStatuses(ctx context.Context, tx *sql.Tx, d *dialect) ([]Status, error) {
	out, err := readASStatuses(ctx, tx)
	if err != nil {
		return nil, err
	}
	idx := make(map[ASKey]int, len(out))
	for i, st := range out {
		idx[st.Key] = i
	}
	// Every AS's pending stream rows in one query, as pendingSeqs reads
	// one AS's.
	rows, err := tx.QueryContext(ctx, `SELECT s.as_key, s.seqs FROM streams s JOIN appservices a ON a.as_key = s.as_key
		WHERE s.last_seq > a.delivered ORDER BY s.as_key, s.last_seq`)
	if err != nil {
		return nil, err
	}
	// The oldest pending seq of each AS with a backlog, to out's indexes:
	// one item may be the oldest of many ASes.
	oldest := map[int64][]int{}
	for rows.Next() {
		var k ASKey
		var blob []byte
		if err := rows.Scan(&k, &blob); err != nil {
			rows.Close()
			return nil, err
		}
		i, ok := idx[k]
		if !ok {
			continue
		}
		seqs, err := decodeSeqs(blob)
		if err != nil {
			rows.Close()
			return nil, err
		}
		st := &out[i]
		for _, q := range seqs {
			if q <= st.Delivered {
				continue
			}
			if st.PendingItems == 0 {
				oldest[q] = append(oldest[q], i)
			}
			st.PendingItems++
		}
	}
	rows.Close()
	if err := rows.Err(); err != nil {
		return nil, err
	}
	if len(oldest) == 0 {
		return out, nil
	}
	want := make([]int64, 0, len(oldest))
	for q := range oldest {
		want = append(want, q)
	}
	slices.Sort(want)
	err = queryWant(ctx, tx, d, want, "created_ms", func(rows *sql.Rows) error {
		defer rows.Close()
		for rows.Next() {
			var q, created int64
			if err := rows.Scan(&q, &created); err != nil {
				return err
			}
			for _, i := range oldest[q] {
				out[i].OldestPending = fromMS(created)
			}
		}
		return rows.Err()
	})
	return out, err
}

// freezeTxns implements Freeze inside tx for both backends: start is the
// end of what as has delivered or frozen, nextTxn its counter. It returns
// the ids and the counter after them. A repeat of a freeze of this store
// whose result was unsure gets that freeze's ids if it landed. writeRow
// false leaves the counter's write in appservices to the caller.
func freezeTxns(ctx context.Context, tx *sql.Tx, d *dialect, as ASKey, replace, start, nextTxn int64, txns []Txn, repeat, writeRow bool) ([]int64, int64, error) {
	if len(txns) == 0 {
		return nil, 0, callError{fmt.Errorf("%w: no transactions", ErrBadRange)}
	}
	if err := checkChain(ctx, tx, d, as, replace, start, txns); err != nil {
		var ce callError
		if !errors.As(err, &ce) || !repeat {
			return nil, 0, err
		}
		ids, ok, err2 := alreadyFrozen(ctx, tx, d, as, replace, txns)
		if err2 != nil {
			return nil, 0, err2
		}
		if ok {
			return ids, nextTxn, nil
		}
		return nil, 0, err
	}
	ids := make([]int64, len(txns))
	for i, t := range txns {
		ids[i] = nextTxn + int64(i)
		if _, err := tx.ExecContext(ctx, d.q(`INSERT INTO txns (as_key, txn_id, after_seq, last_seq, format, len, checksum) VALUES (?, ?, ?, ?, ?, ?, ?)`),
			as, ids[i], t.Range.After, t.Range.Last, int64(t.Format), t.Len, int64(t.Checksum)); err != nil {
			return nil, 0, err
		}
	}
	if replace != 0 {
		if _, err := tx.ExecContext(ctx, d.q(`UPDATE txns SET replaced_by = ?, body = NULL WHERE as_key = ? AND txn_id = ?`), ids[0], as, replace); err != nil {
			return nil, 0, err
		}
	}
	next := nextTxn + int64(len(txns))
	if !writeRow {
		return ids, next, nil
	}
	if _, err := tx.ExecContext(ctx, d.q(`UPDATE appservices SET next_txn = ? WHERE as_key = ?`), next, as); err != nil {
		return nil, 0, err
	}
	return ids, next, nil
}

// checkChain checks that txns follow each other from start or, when
// replace is set, that they exactly cover the live transaction they replace.
func checkChain(ctx context.Context, tx *sql.Tx, d *dialect, as ASKey, replace, start int64, txns []Txn) error {
	end := int64(-1)
	if replace != 0 {
		var replacedBy int64
		err := tx.QueryRowContext(ctx, d.q(`SELECT after_seq, last_seq, replaced_by FROM txns WHERE as_key = ? AND txn_id = ?`), as, replace).
			Scan(&start, &end, &replacedBy)
		if errors.Is(err, sql.ErrNoRows) || replacedBy != 0 {
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
	if replace != 0 && prev != end {
		return callError{fmt.Errorf("%w: split ends at %d, not %d", ErrBadRange, prev, end)}
	}
	return nil
}

// alreadyFrozen reports whether txns are exactly the live transactions one
// earlier Freeze(replace, txns) made, and their ids.
func alreadyFrozen(ctx context.Context, tx *sql.Tx, d *dialect, as ASKey, replace int64, txns []Txn) ([]int64, bool, error) {
	var first int64
	var err error
	if replace != 0 {
		err = tx.QueryRowContext(ctx, d.q(`SELECT replaced_by FROM txns WHERE as_key = ? AND txn_id = ?`), as, replace).Scan(&first)
	} else {
		err = tx.QueryRowContext(ctx, d.q(`SELECT txn_id FROM txns WHERE as_key = ? AND after_seq = ? AND last_seq = ? AND replaced_by = 0`),
			as, txns[0].Range.After, txns[0].Range.Last).Scan(&first)
		if err == nil {
			// Rows a split made (a tombstone names the first) are no plain freeze.
			var n int
			err = tx.QueryRowContext(ctx, d.q(`SELECT COUNT(*) FROM txns WHERE as_key = ? AND replaced_by = ?`), as, first).Scan(&n)
			if err == nil && n > 0 {
				return nil, false, nil
			}
		}
	}
	if errors.Is(err, sql.ErrNoRows) || first == 0 {
		return nil, false, nil
	}
	if err != nil {
		return nil, false, err
	}
	rows, err := tx.QueryContext(ctx, d.q(`SELECT txn_id, after_seq, last_seq, format, len, checksum, replaced_by FROM txns
		WHERE as_key = ? AND txn_id >= ? AND txn_id < ? ORDER BY txn_id`), as, first, first+int64(len(txns)))
	if err != nil {
		return nil, false, err
	}
	defer rows.Close()
	ids := make([]int64, 0, len(txns))
	for rows.Next() {
		var id, after, last, format, checksum, replacedBy int64
		var n int
		if err := rows.Scan(&id, &after, &last, &format, &n, &checksum, &replacedBy); err != nil {
			return nil, false, err
		}
		i := len(ids)
		if i >= len(txns) {
			return nil, false, nil
		}
		t := txns[i]
		if id != first+int64(i) || replacedBy != 0 || after != t.Range.After || last != t.Range.Last ||
			uint32(format) != t.Format || n != t.Len || uint32(checksum) != t.Checksum {
			return nil, false, nil
		}
		ids = append(ids, id)
	}
	if err := rows.Err(); err != nil {
		return nil, false, err
	}
	return ids, len(ids) == len(txns), nil
}

// completeTxns implements CompleteMany inside tx for both backends, given
// as's cursor and txn counter; it returns the new cursor.
//
// Only a prefix of as's frozen transactions (in stream order) completes:
// the cursor must never pass a transaction whose completion is not
// recorded. An id issued before whose row is gone was completed already
// (its range is at or below the cursor): that is no error, so a retried
// Complete whose first attempt landed succeeds. writeRow false leaves the
// cursor's write in appservices (with last_success_ms = now) to the caller.
// rows are as's rows of txns (readTxnRows), in stream order.
func completeTxns(ctx context.Context, tx *sql.Tx, d *dialect, as ASKey, ids []int64, rows []txnRow, delivered, nextTxn, now int64, writeRow bool) (int64, error) {
	byID := make(map[int64]txnRow, len(rows))
	var live []txnRow
	for _, r := range rows {
		byID[r.id] = r
		if r.replacedBy == 0 && r.last > delivered {
			live = append(live, r)
		}
	}
	want := make(map[int64]bool, len(ids))
	for _, id := range ids {
		want[id] = true
	}
	prefix := 0
	for prefix < len(live) && want[live[prefix].id] {
		prefix++
	}
	// Where the first live transaction not completed here starts.
	first := int64(math.MaxInt64)
	if prefix < len(live) {
		first = live[prefix].after
	}
	var errs []error
	for _, id := range ids {
		r, ok := byID[id]
		switch {
		case !ok && id > 0 && id < nextTxn:
			// Completed before.
		case !ok:
			errs = append(errs, fmt.Errorf("%w: %d", ErrUnknownTxn, id))
		case r.replacedBy != 0:
			errs = append(errs, fmt.Errorf("%w: %d was split into %d and after", ErrUnknownTxn, id, r.replacedBy))
		case r.last <= delivered:
			// Delivered (a row an older version left behind).
		case r.after >= first:
			errs = append(errs, fmt.Errorf("%w: %d is after (%d, %d]", ErrOutOfOrder, id, live[prefix].after, live[prefix].last))
		}
	}
	if prefix > 0 {
		delivered = max(delivered, live[prefix-1].last)
		if _, err := tx.ExecContext(ctx, d.q(`DELETE FROM txns WHERE as_key = ? AND last_seq <= ?`), as, delivered); err != nil {
			return 0, err
		}
		if writeRow {
			if _, err := tx.ExecContext(ctx, d.q(`UPDATE appservices SET delivered = ?, last_success_ms = ? WHERE as_key = ?`), delivered, now, as); err != nil {
				return 0, err
			}
		}
	}
	if len(errs) > 0 {
		return delivered, callError{errors.Join(errs...)}
	}
	return delivered, nil
}

// txnRow is a row of txns as the completion check needs it.
type txnRow struct{ id, after, last, replacedBy int64 }

// readTxnRows returns as's rows of txns in stream order: by after_seq,
// then txn_id (a split's tombstone before its parts).
func readTxnRows(ctx context.Context, tx *sql.Tx, d *dialect, as ASKey) ([]txnRow, error) {
	rows, err := tx.QueryContext(ctx, d.q(`SELECT txn_id, after_seq, last_seq, replaced_by FROM txns WHERE as_key = ? ORDER BY after_seq, txn_id`), as)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	var out []txnRow
	for rows.Next() {
		var r txnRow
		if err := rows.Scan(&r.id, &r.after, &r.last, &r.replacedBy); err != nil {
			return nil, err
		}
		out = append(out, r)
	}
	return out, rows.Err()
}

// saveBody implements SaveBody inside tx for both backends. The first body
// stays: saving the same bytes again is no error, other bytes are.
func saveBody(ctx context.Context, tx *sql.Tx, d *dialect, as ASKey, id int64, body []byte) error {
	res, err := tx.ExecContext(ctx, d.q(`UPDATE txns SET body = ? WHERE as_key = ? AND txn_id = ? AND replaced_by = 0 AND body IS NULL`), body, as, id)
	if err != nil {
		return err
	}
	if n, err := res.RowsAffected(); err != nil || n == 1 {
		return err
	}
	var got []byte
	var replacedBy int64
	err = tx.QueryRowContext(ctx, d.q(`SELECT body, replaced_by FROM txns WHERE as_key = ? AND txn_id = ?`), as, id).Scan(&got, &replacedBy)
	if errors.Is(err, sql.ErrNoRows) || (err == nil && replacedBy != 0) {
		return callError{fmt.Errorf("%w: %d", ErrUnknownTxn, id)}
	}
	if err != nil {
		return err
	}
	if !bytes.Equal(got, body) {
		return callError{fmt.Errorf("%w: %d", ErrBodyConflict, id)}
	}
	return nil
}

// maxLastError bounds State.LastError as stored.
const maxLastError = 2048

// cleanText makes s storable as TEXT on every backend: no NUL, valid
// UTF-8, at most max bytes cut on a rune boundary. PostgreSQL refuses
// the first two, and an AS's error body may hold anything.
func cleanText(s string, max int) string {
	s = strings.ReplaceAll(strings.ToValidUTF8(s, ""), "\x00", "")
	if len(s) > max {
		cut := max
		for cut > 0 && !utf8.RuneStart(s[cut]) {
			cut--
		}
		s = s[:cut]
	}
	return s
}

// isInputError reports whether err is a statement's refusal of the values
// it was given (a data exception or a constraint), which one op caused
// and which must fail that op alone, not the commit it shares.
func isInputError(err error) bool {
	var pe *pgconn.PgError
	if errors.As(err, &pe) {
		return strings.HasPrefix(pe.Code, "22") || strings.HasPrefix(pe.Code, "23") || pe.Code == "54000"
	}
	var se sqlite3.Error
	if errors.As(err, &se) {
		switch se.Code {
		case sqlite3.ErrConstraint, sqlite3.ErrTooBig, sqlite3.ErrMismatch, sqlite3.ErrRange:
			return true
		}
	}
	return false
}

// isolate commits ops through attempt, which runs them in one transaction
// and, when that fails, returns the index of the op whose own statement
// failed (-1 if none did or the statement was shared). An op whose input a
// statement refused gets that error alone and the others are tried again
// without it; when the refused statement was shared, each op is tried
// alone. Any other error fails every op left, through fail.
func isolate[T any](ops []T, attempt func([]T) (int, error), fail func(T, error)) {
	for len(ops) > 0 {
		i, err := attempt(ops)
		switch {
		case err == nil:
			return
		case !isInputError(err):
			for _, o := range ops {
				fail(o, fmt.Errorf("txnstore: commit: %w", err))
			}
			return
		case i >= 0:
			fail(ops[i], fmt.Errorf("txnstore: %w", err))
			ops = append(ops[:i:i], ops[i+1:]...)
		case len(ops) == 1:
			fail(ops[0], fmt.Errorf("txnstore: %w", err))
			return
		default:
			for _, o := range ops {
				isolate([]T{o}, attempt, fail)
			}
			return
		}
	}
}

// unsureFreezes remembers, per AS, the last Freeze of this store that
// failed without being refused: its commit may have landed. Only that call
// repeated gets the ids it may have been given; another process freezing
// the same ranges is still refused.
type unsureFreezes struct {
	mu sync.Mutex
	m  map[ASKey]string
}

func freezeKey(replace int64, txns []Txn) string {
	var b strings.Builder
	fmt.Fprintf(&b, "%d", replace)
	for _, t := range txns {
		fmt.Fprintf(&b, ";%d,%d,%d,%d,%d", t.Range.After, t.Range.Last, t.Format, t.Len, t.Checksum)
	}
	return b.String()
}

// repeats reports whether key is as's unsure freeze.
func (u *unsureFreezes) repeats(as ASKey, key string) bool {
	u.mu.Lock()
	defer u.mu.Unlock()
	return u.m[as] == key
}

// record notes the outcome of as's freeze key: ok (it landed), unsure
// (it may have), or neither (refused: the unsure one stays repeatable).
func (u *unsureFreezes) record(as ASKey, key string, ok, unsure bool) {
	u.mu.Lock()
	defer u.mu.Unlock()
	if ok {
		delete(u.m, as)
		return
	}
	if !unsure {
		return
	}
	if u.m == nil {
		u.m = map[ASKey]string{}
	}
	u.m[as] = key
}
