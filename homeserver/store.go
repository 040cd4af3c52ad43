package homeserver

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"net/url"
)

// state is the stub homeserver's own tables: users, devices and tokens,
// rooms, memberships, aliases, events, account data, filters, media and
// to-device messages. Writes are few and serialized by the caller; SQLite
// keeps them across restarts.
type state struct {
	db    *sql.DB
	stmts stmtCache // for the log writer's queries and one and list
}

// migrations upgrade the schema one version at a time; PRAGMA user_version
// records how many ran. Never edit a migration that shipped: append one.
// A data dir written before versioning (user_version 0, the tables of
// migration 1) goes through migration 1 unharmed, as its statements are
// idempotent, and keeps its users, tokens, rooms and events.
var migrations = []string{
	// 1: the schema of the unversioned stub.
	`CREATE TABLE IF NOT EXISTS users (user_id TEXT PRIMARY KEY, password TEXT NOT NULL, appservice TEXT NOT NULL DEFAULT '');
CREATE TABLE IF NOT EXISTS tokens (token TEXT PRIMARY KEY, user_id TEXT NOT NULL, device_id TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS rooms (room_id TEXT PRIMARY KEY, creator TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS memberships (room_id TEXT NOT NULL, user_id TEXT NOT NULL, membership TEXT NOT NULL, PRIMARY KEY (room_id, user_id));
CREATE TABLE IF NOT EXISTS aliases (alias TEXT PRIMARY KEY, room_id TEXT NOT NULL, creator TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS events (seq INTEGER PRIMARY KEY AUTOINCREMENT, event_id TEXT NOT NULL UNIQUE, room_id TEXT NOT NULL, json BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS room_state (room_id TEXT NOT NULL, type TEXT NOT NULL, state_key TEXT NOT NULL, event_id TEXT NOT NULL, PRIMARY KEY (room_id, type, state_key));
CREATE TABLE IF NOT EXISTS send_txns (token TEXT NOT NULL, txn_id TEXT NOT NULL, event_id TEXT NOT NULL, PRIMARY KEY (token, txn_id));`,
	// 2: profiles, devices, event columns for reads and /sync, account
	// data, filters, presence, media, to-device inboxes. Users an AS
	// registered lose the password hash the unversioned stub stored for
	// them (the hash of the empty string, which let anyone log in as them).
	`ALTER TABLE users ADD COLUMN displayname TEXT;
ALTER TABLE users ADD COLUMN avatar_url TEXT;
UPDATE users SET password = '' WHERE appservice != '';
UPDATE users SET displayname = substr(user_id, 2, instr(user_id, ':') - 2);
CREATE TABLE devices (user_id TEXT NOT NULL, device_id TEXT NOT NULL, display_name TEXT, PRIMARY KEY (user_id, device_id));
INSERT OR IGNORE INTO devices (user_id, device_id) SELECT user_id, device_id FROM tokens;
ALTER TABLE rooms ADD COLUMN visibility TEXT NOT NULL DEFAULT 'private';
ALTER TABLE events ADD COLUMN sender TEXT NOT NULL DEFAULT '';
ALTER TABLE events ADD COLUMN type TEXT NOT NULL DEFAULT '';
ALTER TABLE events ADD COLUMN state_key TEXT;
ALTER TABLE events ADD COLUMN ts INTEGER NOT NULL DEFAULT 0;
ALTER TABLE events ADD COLUMN txn_id TEXT;
ALTER TABLE events ADD COLUMN txn_token TEXT;
UPDATE events SET sender = json_extract(json, '$.sender'), type = json_extract(json, '$.type'),
	state_key = json_extract(json, '$.state_key'), ts = json_extract(json, '$.origin_server_ts');
CREATE INDEX events_room ON events (room_id, seq);
CREATE INDEX events_member ON events (state_key, seq) WHERE type = 'm.room.member';
CREATE TABLE filters (user_id TEXT NOT NULL, filter_id INTEGER NOT NULL, json BLOB NOT NULL, PRIMARY KEY (user_id, filter_id));
CREATE TABLE account_data (user_id TEXT NOT NULL, room_id TEXT NOT NULL, type TEXT NOT NULL, json BLOB NOT NULL, pos INTEGER NOT NULL, PRIMARY KEY (user_id, room_id, type));
CREATE TABLE presence (user_id TEXT PRIMARY KEY, presence TEXT NOT NULL, status_msg TEXT, last_active INTEGER NOT NULL);
CREATE TABLE media (media_id TEXT PRIMARY KEY, uploader TEXT NOT NULL, content_type TEXT NOT NULL DEFAULT '', filename TEXT NOT NULL DEFAULT '', size INTEGER NOT NULL DEFAULT 0, uploaded INTEGER NOT NULL DEFAULT 0, created INTEGER NOT NULL);
CREATE TABLE to_device (seq INTEGER PRIMARY KEY AUTOINCREMENT, user_id TEXT NOT NULL, device_id TEXT NOT NULL, json BLOB NOT NULL);`,
	// 3: read receipts, for /sync.
	`CREATE TABLE receipts (room_id TEXT NOT NULL, user_id TEXT NOT NULL, type TEXT NOT NULL, event_id TEXT NOT NULL, ts INTEGER NOT NULL, pos INTEGER NOT NULL, PRIMARY KEY (room_id, user_id, type));
CREATE INDEX receipts_pos ON receipts (room_id, pos);`,
	// 4: end-to-end encryption keys and the device list stream. Keys are
	// kept as the signed JSON the client uploaded; signatures others add
	// later (keys/signatures/upload) live apart, so that a re-upload by the
	// owner does not drop them. device_lists has a row per change of a
	// user's devices or cross-signing keys, for /sync and /keys/changes.
	`CREATE TABLE device_keys (user_id TEXT NOT NULL, device_id TEXT NOT NULL, json BLOB NOT NULL, PRIMARY KEY (user_id, device_id));
CREATE TABLE one_time_keys (user_id TEXT NOT NULL, device_id TEXT NOT NULL, key_id TEXT NOT NULL, algorithm TEXT NOT NULL, json BLOB NOT NULL, PRIMARY KEY (user_id, device_id, key_id));
CREATE TABLE fallback_keys (user_id TEXT NOT NULL, device_id TEXT NOT NULL, algorithm TEXT NOT NULL, key_id TEXT NOT NULL, json BLOB NOT NULL, used INTEGER NOT NULL DEFAULT 0, PRIMARY KEY (user_id, device_id, algorithm));
CREATE TABLE cross_signing_keys (user_id TEXT NOT NULL, usage TEXT NOT NULL, json BLOB NOT NULL, PRIMARY KEY (user_id, usage));
CREATE TABLE key_signatures (target_user TEXT NOT NULL, target_key TEXT NOT NULL, signer_user TEXT NOT NULL, signer_key TEXT NOT NULL, signature TEXT NOT NULL, PRIMARY KEY (target_user, target_key, signer_user, signer_key));
CREATE TABLE device_lists (pos INTEGER PRIMARY KEY AUTOINCREMENT, user_id TEXT NOT NULL);
CREATE INDEX device_lists_user ON device_lists (user_id, pos);`,
	// 5: the events table is the log handed over to the dispatcher; its
	// stream there is named once per data dir. floor is the last event
	// of a data dir older than that (handed over as it was made).
	`CREATE TABLE log_streams (name TEXT PRIMARY KEY, stream TEXT NOT NULL, floor INTEGER NOT NULL);`,
}

// stateConns bounds the connections to the state: one writer at a time,
// the rest reading.
const stateConns = 4

func openState(ctx context.Context, path string) (*state, error) {
	// Transactions begin IMMEDIATE: each takes the write lock first, so
	// writers queue on the busy timeout instead of failing a snapshot
	// upgrade. Reads (token lookups, /sync, the hand-over) use the other
	// connections and, in WAL, never wait behind the log writer.
	db, err := sql.Open("sqlite3", "file:"+url.PathEscape(path)+"?_journal_mode=WAL&_synchronous=FULL&_busy_timeout=10000&_txlock=immediate")
	if err != nil {
		return nil, fmt.Errorf("homeserver: open %s: %w", path, err)
	}
	db.SetMaxOpenConns(stateConns)
	db.SetMaxIdleConns(stateConns)
	if err := migrate(ctx, db); err != nil {
		db.Close()
		return nil, fmt.Errorf("homeserver: %s: %w", path, err)
	}
	return &state{db: db, stmts: stmtCache{db: db}}, nil
}

// migrate runs the migrations the database has not seen, each in its own
// transaction with the version bump, so a crash leaves a whole version.
func migrate(ctx context.Context, db *sql.DB) error {
	var version int
	if err := db.QueryRowContext(ctx, `PRAGMA user_version`).Scan(&version); err != nil {
		return fmt.Errorf("schema version: %w", err)
	}
	if version > len(migrations) {
		return fmt.Errorf("schema version %d is newer than this binary knows (%d): refusing to touch it", version, len(migrations))
	}
	for v := version; v < len(migrations); v++ {
		tx, err := db.BeginTx(ctx, nil)
		if err != nil {
			return err
		}
		if _, err := tx.ExecContext(ctx, migrations[v]); err != nil {
			tx.Rollback()
			return fmt.Errorf("migration %d: %w", v+1, err)
		}
		if _, err := tx.ExecContext(ctx, fmt.Sprintf(`PRAGMA user_version = %d`, v+1)); err != nil {
			tx.Rollback()
			return fmt.Errorf("migration %d: %w", v+1, err)
		}
		if err := tx.Commit(); err != nil {
			return fmt.Errorf("migration %d: %w", v+1, err)
		}
	}
	return nil
}

// querier is a *sql.DB or a *sql.Tx.
type querier interface {
	ExecContext(ctx context.Context, query string, args ...any) (sql.Result, error)
	QueryContext(ctx context.Context, query string, args ...any) (*sql.Rows, error)
	QueryRowContext(ctx context.Context, query string, args ...any) *sql.Row
}

// one scans the single row of query into dst; false if there is none.
func one(ctx context.Context, q querier, query string, args []any, dst ...any) (bool, error) {
	err := q.QueryRowContext(ctx, query, args...).Scan(dst...)
	if errors.Is(err, sql.ErrNoRows) {
		return false, nil
	}
	return err == nil, err
}

func (s *state) one(ctx context.Context, dst any, query string, args ...any) (bool, error) {
	return one(ctx, cachedDB{s}, query, args, dst)
}

func (s *state) list(ctx context.Context, query string, args ...any) ([]string, error) {
	return list(ctx, cachedDB{s}, query, args...)
}

func list(ctx context.Context, q querier, query string, args ...any) ([]string, error) {
	rows, err := q.QueryContext(ctx, query, args...)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	var out []string
	for rows.Next() {
		var v string
		if err := rows.Scan(&v); err != nil {
			return nil, err
		}
		out = append(out, v)
	}
	return out, rows.Err()
}
