package asdendrite

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"net/url"

	_ "github.com/mattn/go-sqlite3" // the seen store
)

// Dendrite's sync API publishes a new event to OutputAppserviceEvent, then
// acknowledges the roomserver's message: killed between the two, it
// publishes the event again after the restart, at a new sequence the
// dispatcher's positions do not cover. seenStore remembers the event IDs
// handed over recently with their position stream and sequence, durably
// before Submit, so such a copy is dropped: a copy is an event whose
// recorded sequence is not its own and was handed over (at or below the
// stored position of the recorded position stream, which may be an
// earlier epoch's: see epoch).
//
// It also keeps, per JetStream stream, the epoch of its position stream
// (see Start): bumped when the stream came back behind what was handed
// over, so the sequences JetStream hands out again are new positions.

// seenWindow is how many event IDs are remembered (in the order they were
// first recorded): copies come right after a restart, within the sync
// API's unacknowledged batch.
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
	// The window is kept by rowid now (records of earlier epochs stay):
	// the seq index of the first version is no longer used.
	if _, err := db.ExecContext(ctx, `CREATE TABLE IF NOT EXISTS seen (event_id TEXT PRIMARY KEY, stream TEXT NOT NULL, seq INTEGER NOT NULL);
		DROP INDEX IF EXISTS seen_seq;
		CREATE TABLE IF NOT EXISTS epochs (base TEXT PRIMARY KEY, epoch INTEGER NOT NULL, floor INTEGER NOT NULL);`); err != nil {
		db.Close()
		return nil, fmt.Errorf("seen store %s: %w", path, err)
	}
	return &seenStore{db: db}, nil
}

// epoch returns the epoch of base's position stream and its floor: the
// JetStream sequence up to which the stream held, when the epoch began,
// only messages handed over in earlier epochs. 0, 0 if never reset.
func (s *seenStore) epoch(ctx context.Context, base string) (epoch int64, floor uint64, err error) {
	err = s.db.QueryRowContext(ctx, `SELECT epoch, floor FROM epochs WHERE base = ?`, base).Scan(&epoch, &floor)
	if errors.Is(err, sql.ErrNoRows) {
		return 0, 0, nil
	}
	if err != nil {
		return 0, 0, fmt.Errorf("seen store: %w", err)
	}
	return epoch, floor, nil
}

// setEpoch durably records base's new epoch and its floor.
func (s *seenStore) setEpoch(ctx context.Context, base string, epoch int64, floor uint64) error {
	if _, err := s.db.ExecContext(ctx, `INSERT INTO epochs (base, epoch, floor) VALUES (?, ?, ?)
		ON CONFLICT (base) DO UPDATE SET epoch = excluded.epoch, floor = excluded.floor`, base, epoch, floor); err != nil {
		return fmt.Errorf("seen store: %w", err)
	}
	return nil
}

// dropCopies returns items without the copies of events handed over
// already (see seenStore), nor a second sequence of one event in items.
// handedIn returns how far a position stream was handed over.
func (s *seenStore) dropCopies(ctx context.Context, stream string, handedIn func(context.Context, string) (int64, error), items []item) ([]item, []item, error) {
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
		case errors.Is(err, sql.ErrNoRows):
		case err != nil:
			return nil, nil, fmt.Errorf("seen store: %w", err)
		case st != stream || seq != int64(it.seq):
			// Recorded elsewhere: a copy if that one was handed over. The
			// same stream and sequence is a redelivery, which the
			// dispatcher skips at its position if it was handed over.
			h, err := handedIn(ctx, st)
			if err != nil {
				return nil, nil, err
			}
			if seq <= h {
				dropped = append(dropped, it)
				continue
			}
		}
		inBatch[it.ev.ID] = true
		out = append(out, it)
	}
	return out, dropped, nil
}

// record stores the items' event IDs at their sequences before they are
// handed over; an ID stays at its earlier sequence of the same stream if
// that one was handed over. It forgets all but the last seenWindow IDs.
func (s *seenStore) record(ctx context.Context, stream string, handed int64, items []item) error {
	tx, err := s.db.BeginTx(ctx, nil)
	if err != nil {
		return fmt.Errorf("seen store: %w", err)
	}
	defer tx.Rollback()
	for _, it := range items {
		if it.seq == 0 {
			continue
		}
		if _, err := tx.ExecContext(ctx, `INSERT INTO seen (event_id, stream, seq) VALUES (?, ?, ?)
			ON CONFLICT (event_id) DO UPDATE SET stream = excluded.stream, seq = excluded.seq
			WHERE seen.stream != excluded.stream OR seen.seq > ?`, it.ev.ID, stream, it.seq, handed); err != nil {
			return fmt.Errorf("seen store: %w", err)
		}
	}
	if _, err := tx.ExecContext(ctx, `DELETE FROM seen WHERE rowid <= (SELECT max(rowid) FROM seen) - ?`, seenWindow); err != nil {
		return fmt.Errorf("seen store: %w", err)
	}
	if err := tx.Commit(); err != nil {
		return fmt.Errorf("seen store: %w", err)
	}
	return nil
}

func (s *seenStore) close() error { return s.db.Close() }
