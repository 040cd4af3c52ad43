// Package pgtest gives tests a fresh PostgreSQL schema each.
//
// The server is ASDISPATCH_TEST_POSTGRES (a libpq URL), by default the
// local one: postgres://postgres@127.0.0.1:5432/test. When it is not
// reachable the test is skipped, unless CI is set: then it fails.
package pgtest

import (
	"context"
	"crypto/rand"
	"database/sql"
	"encoding/hex"
	"os"
	"strconv"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/stdlib"

	"github.com/asdispatch/asdispatch/internal/pgdsn"
)

// DefaultDSN is the server used when ASDISPATCH_TEST_POSTGRES is unset.
const DefaultDSN = "postgres://postgres@127.0.0.1:5432/test?sslmode=disable"

// DSN returns the server's DSN.
func DSN() string {
	if v := os.Getenv("ASDISPATCH_TEST_POSTGRES"); v != "" {
		return v
	}
	return DefaultDSN
}

// Schema creates an empty schema for t, drops it when t ends, and returns
// a DSN whose search_path is that schema.
func Schema(t testing.TB) string {
	t.Helper()
	base := DSN()
	cfg, err := pgx.ParseConfig(base)
	if err != nil {
		t.Fatalf("pgtest: ASDISPATCH_TEST_POSTGRES does not parse as a DSN")
	}
	where := cfg.Host + ":" + strconv.Itoa(int(cfg.Port)) + "/" + cfg.Database
	db := stdlib.OpenDB(*cfg)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := db.PingContext(ctx); err != nil {
		db.Close()
		if os.Getenv("CI") == "" {
			t.Skipf("PostgreSQL not reachable at %s (%v); set ASDISPATCH_TEST_POSTGRES, or CI=1 to make this a failure", where, err)
		}
		t.Fatalf("PostgreSQL not reachable at %s and CI is set: %v", where, err)
	}
	b := make([]byte, 6)
	_, _ = rand.Read(b)
	name := "t_" + hex.EncodeToString(b)
	if _, err := db.ExecContext(ctx, `CREATE SCHEMA `+name); err != nil {
		db.Close()
		t.Fatalf("pgtest: create schema: %v", err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if _, err := db.ExecContext(ctx, `DROP SCHEMA `+name+` CASCADE`); err != nil {
			t.Logf("pgtest: drop schema %s: %v", name, err)
		}
		db.Close()
	})
	return WithSearchPath(base, name)
}

// WithSearchPath returns dsn with its search_path set to schema.
func WithSearchPath(dsn, schema string) string { return pgdsn.WithSearchPath(dsn, schema) }

// Open returns a connection pool on dsn for a test's own queries.
func Open(t testing.TB, dsn string) *sql.DB {
	t.Helper()
	cfg, err := pgx.ParseConfig(dsn)
	if err != nil {
		t.Fatal(err)
	}
	db := stdlib.OpenDB(*cfg)
	t.Cleanup(func() { db.Close() })
	return db
}
