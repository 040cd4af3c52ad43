package asdendrite

import (
	"context"
	"database/sql"
	"fmt"
	"net/url"

	_ "github.com/mattn/go-sqlite3" // the seen store
)

// Dendrite's sync API publishes a new event to OutputAppserviceEvent, then
// acknowledges the roomserver's message: killed between the two, it
// publishes the event again after the restart, at a new sequence the
// dispatcher's positions do not cover. seenStore remembers the event IDs
// handed over recently with their sequence, durably before Submit, so such
// a copy is dropped: a copy is an event whose recorded sequence differs
// from its own and was handed over (at or below the stored position).

// seenWindow is how many sequences back an event ID is remembered: copies
// come right after a restart, within the sync API's unacknowledged batch.
const seenWindow = 100_000

type seenStore struct {
	db *sql.DB
}

func openSeen(ctx context.Context, path string) (*seenStore, error) {
	db, err := sql.Open("sqlite3", "file:"+url.PathEscape(path)+"?_journal_mode=WAL&_synchronous=FULL&_busy_timeout=10000")
	if err != nil {
		return nil, fmt.Errorf("seen store %s: %w", path, err)
	}
	db.SetMaxOpenConns(1)
	if _, err := db.ExecContext(ctx, `CREATE TABLE IF NOT EXISTS seen (event_id TEXT PRIMARY KEY, stream TEXT NOT NULL, seq INTEGER NOT NULL);
		CREATE INDEX IF NOT EXISTS seen_seq ON seen (seq);`); err != nil {
		db.Close()
		return nil, fmt.Errorf("seen store %s: %w", path, err)
	}
	return &seenStore{db: db}, nil
}

// dropCopies returns items without the copies of events handed over
// already (see seenStore), nor a second sequence of one event in items.
func (s *seenStore) dropCopies(ctx context.Context, stream string, handed int64, items []item) ([]item, []item, error) {
	out := items[:0:0]
	var dropped []item
	inBatch := map[string]bool{}
	for _, it := range items {
		if it.seq == 0 {
			out = append(out, it)
			continue
		}
		if inBatch[it.ev.ID] {
			dropped = append(dropped, it)
			continue
		}
		var st string
		var seq int64
		err := s.db.QueryRowContext(ctx, `SELECT stream, seq FROM seen WHERE event_id = ?`, it.ev.ID).Scan(&st, &seq)
		switch {
		case err == sql.ErrNoRows:
		case err != nil:
			return nil, nil, fmt.Errorf("seen store: %w", err)
		case st == stream && seq != int64(it.seq) && seq <= handed:
			dropped = append(dropped, it)
			continue
		}
		inBatch[it.ev.ID] = true
		out = append(out, it)
	}
	return out, dropped, nil
}

// record stores the items' event IDs at their sequences before they are
// handed over; an ID stays at its earlier sequence if that one was handed
// over. It forgets what is seenWindow sequences behind.
func (s *seenStore) record(ctx context.Context, stream string, handed int64, items []item) error {
	tx, err := s.db.BeginTx(ctx, nil)
	if err != nil {
		return fmt.Errorf("seen store: %w", err)
	}
	defer tx.Rollback()
	top := handed
	for _, it := range items {
		if it.seq == 0 {
			continue
		}
		top = max(top, int64(it.seq))
		if _, err := tx.ExecContext(ctx, `INSERT INTO seen (event_id, stream, seq) VALUES (?, ?, ?)
			ON CONFLICT (event_id) DO UPDATE SET stream = excluded.stream, seq = excluded.seq
			WHERE seen.stream != excluded.stream OR seen.seq > ?`, it.ev.ID, stream, it.seq, handed); err != nil {
			return fmt.Errorf("seen store: %w", err)
		}
	}
	if _, err := tx.ExecContext(ctx, `DELETE FROM seen WHERE stream != ? OR seq <= ?`, stream, top-seenWindow); err != nil {
		return fmt.Errorf("seen store: %w", err)
	}
	if err := tx.Commit(); err != nil {
		return fmt.Errorf("seen store: %w", err)
	}
	return nil
}

func (s *seenStore) close() error { return s.db.Close() }
