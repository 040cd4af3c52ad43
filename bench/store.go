package bench

import (
	"context"
	"crypto/rand"
	"database/sql"
	"encoding/hex"
	"fmt"
	"os"
	"path/filepath"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/stdlib"

	"github.com/asdispatch/asdispatch/txnstore"
)

// Store backends for Config.Store.
const (
	StoreSQLite   = "sqlite"
	StorePostgres = "postgres"
)

// storeEnv is a fresh, empty store for one phase of the bench: a temporary
// directory for SQLite, a new schema for PostgreSQL (dropped by close).
type storeEnv struct {
	backend string
	dir     string
	dsn     string // with search_path set to schema
	schema  string
	admin   *sql.DB
}

func newStoreEnv(ctx context.Context, cfg *Config) (*storeEnv, error) {
	if cfg.Store != StorePostgres {
		dir, err := os.MkdirTemp("", "asdispatch-bench-")
		if err != nil {
			return nil, fmt.Errorf("temp dir: %w", err)
		}
		return &storeEnv{backend: StoreSQLite, dir: dir}, nil
	}
	pcfg, err := pgx.ParseConfig(cfg.DSN)
	if err != nil {
		return nil, fmt.Errorf("--dsn does not parse: %w", err) // the DSN may hold a password: not echoed
	}
	admin := stdlib.OpenDB(*pcfg)
	b := make([]byte, 6)
	_, _ = rand.Read(b)
	schema := "asdispatch_bench_" + hex.EncodeToString(b)
	if _, err := admin.ExecContext(ctx, `CREATE SCHEMA `+schema); err != nil {
		admin.Close()
		return nil, fmt.Errorf("postgres: create schema: %w", err)
	}
	return &storeEnv{backend: StorePostgres, dsn: txnstore.WithSearchPath(cfg.DSN, schema), schema: schema, admin: admin}, nil
}

// open opens one more store on the environment: on PostgreSQL each is a
// dispatcher instance with its own connections, as a process would have.
func (e *storeEnv) open(ctx context.Context, opts txnstore.Options) (txnstore.Store, error) {
	if e.backend == StorePostgres {
		return txnstore.OpenPostgres(ctx, e.dsn, opts)
	}
	return txnstore.Open(ctx, filepath.Join(e.dir, "dispatcher.db"), opts)
}

// size is the bytes the store takes: db + wal files, or the schema's
// tables with their indexes and TOAST.
func (e *storeEnv) size(ctx context.Context) int64 {
	if e.backend == StorePostgres {
		var n sql.NullInt64
		_ = e.admin.QueryRowContext(ctx, `SELECT SUM(pg_total_relation_size(c.oid)) FROM pg_class c
			JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = $1 AND c.relkind = 'r'`, e.schema).Scan(&n)
		return n.Int64
	}
	return dirSize(e.dir)
}

func (e *storeEnv) close() {
	if e.backend == StorePostgres {
		_, _ = e.admin.Exec(`DROP SCHEMA ` + e.schema + ` CASCADE`)
		e.admin.Close()
		return
	}
	os.RemoveAll(e.dir)
}
