package homeserver

import (
	"context"
	"database/sql"
	"sync"
)

// Prepared statements, kept by SQL text: preparing a statement was a third
// of the SQLite time of a send (each of its few queries prepared afresh).
// database/sql prepares a kept statement once per connection and reuses it
// there, in transactions too.

// maxStmts bounds the statements kept; past it queries are prepared each
// time, as before.
const maxStmts = 128

type stmtCache struct {
	db *sql.DB
	mu sync.Mutex
	m  map[string]*sql.Stmt
}

// get returns the kept statement for query, preparing it on first use;
// nil if it cannot be kept.
func (c *stmtCache) get(ctx context.Context, query string) *sql.Stmt {
	c.mu.Lock()
	defer c.mu.Unlock()
	if st, ok := c.m[query]; ok {
		return st
	}
	if len(c.m) >= maxStmts {
		return nil
	}
	st, err := c.db.PrepareContext(ctx, query)
	if err != nil {
		// The query itself fails the same way when run: let it say so.
		return nil
	}
	if c.m == nil {
		c.m = map[string]*sql.Stmt{}
	}
	c.m[query] = st
	return st
}

func (c *stmtCache) close() {
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, st := range c.m {
		st.Close()
	}
	c.m = nil
}

// cachedTx is a querier running tx's queries as kept statements.
type cachedTx struct {
	tx *sql.Tx
	c  *stmtCache
}

func (q cachedTx) ExecContext(ctx context.Context, query string, args ...any) (sql.Result, error) {
	if st := q.c.get(ctx, query); st != nil {
		return q.tx.StmtContext(ctx, st).ExecContext(ctx, args...)
	}
	return q.tx.ExecContext(ctx, query, args...)
}

func (q cachedTx) QueryContext(ctx context.Context, query string, args ...any) (*sql.Rows, error) {
	if st := q.c.get(ctx, query); st != nil {
		return q.tx.StmtContext(ctx, st).QueryContext(ctx, args...)
	}
	return q.tx.QueryContext(ctx, query, args...)
}

func (q cachedTx) QueryRowContext(ctx context.Context, query string, args ...any) *sql.Row {
	if st := q.c.get(ctx, query); st != nil {
		return q.tx.StmtContext(ctx, st).QueryRowContext(ctx, args...)
	}
	return q.tx.QueryRowContext(ctx, query, args...)
}

// cachedDB is a querier running queries on the state's connections as
// kept statements.
type cachedDB struct{ s *state }

func (q cachedDB) ExecContext(ctx context.Context, query string, args ...any) (sql.Result, error) {
	if st := q.s.stmts.get(ctx, query); st != nil {
		return st.ExecContext(ctx, args...)
	}
	return q.s.db.ExecContext(ctx, query, args...)
}

func (q cachedDB) QueryContext(ctx context.Context, query string, args ...any) (*sql.Rows, error) {
	if st := q.s.stmts.get(ctx, query); st != nil {
		return st.QueryContext(ctx, args...)
	}
	return q.s.db.QueryContext(ctx, query, args...)
}

func (q cachedDB) QueryRowContext(ctx context.Context, query string, args ...any) *sql.Row {
	if st := q.s.stmts.get(ctx, query); st != nil {
		return st.QueryRowContext(ctx, args...)
	}
	return q.s.db.QueryRowContext(ctx, query, args...)
}
