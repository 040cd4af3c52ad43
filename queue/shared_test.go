package queue

import (
	"context"
	"fmt"
	"slices"
	"testing"
	"time"

	"go.uber.org/zap/zaptest"

	"github.com/asdispatch/asdispatch/asapi"
	"github.com/asdispatch/asdispatch/txnstore"
	"github.com/asdispatch/asdispatch/txnstore/pgtest"
)

// TestSharedStoreLeases: two processes' queues on one PostgreSQL store.
// Items committed by either are delivered once, in commit order, by the one
// lease owner; when the owner closes, the other takes over at once; when the
// owner loses its database, the other takes over after the ttl.
func TestSharedStoreLeases(t *testing.T) {
	dsn := pgtest.Schema(t)
	ctx := context.Background()
	as := newFakeAS(t, nil)
	const ttl = 600 * time.Millisecond
	var stores [2]*txnstore.Postgres
	var qs [2]*Queues
	var key txnstore.ASKey
	for i := range qs {
		var q *Queues
		s, err := txnstore.OpenPostgres(ctx, dsn, txnstore.Options{OnCommit: func(c []txnstore.Committed) { q.OnCommit(c) }})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { s.Close() })
		// The lease outlasts a transaction's timeout while there is one
		// to send: keep both short for a quick takeover.
		q = New(s, Options{RetryInitial: 20 * time.Millisecond, LeaseTTL: ttl, PollInterval: 30 * time.Millisecond,
			Owner: fmt.Sprintf("p%d", i), Logger: zaptest.NewLogger(t), Client: asapi.New(asapi.Options{TxnTimeout: ttl})})
		stores[i], qs[i] = s, q
		if key, err = s.EnsureAS(ctx, "a"); err != nil {
			t.Fatal(err)
		}
		target := as.target("a")
		target.Key = key
		q.Start(target)
	}
	t.Cleanup(func() {
		for _, q := range qs {
			ctx, cancel := context.WithTimeout(context.Background(), time.Second)
			q.Close(ctx)
			cancel()
		}
	})
	var want []string
	send := func(s *txnstore.Postgres, n int, tag string) {
		t.Helper()
		for i := 0; i < n; i++ {
			body := fmt.Sprintf("%s-%d", tag, i)
			data := fmt.Sprintf(`{"type":"m.room.message","content":{"body":%q}}`, body)
			if _, err := s.Append(ctx, []txnstore.Entry{{Kind: txnstore.KindEvent, Data: []byte(data), Targets: []txnstore.ASKey{key}}}); err != nil {
				t.Fatal(err)
			}
			want = append(want, body)
		}
	}
	wait := func(stage string) {
		t.Helper()
		deadline := time.Now().Add(10 * time.Second)
		for len(as.delivered()) < len(want) && time.Now().Before(deadline) {
			time.Sleep(10 * time.Millisecond)
		}
		if got := as.delivered(); !slices.Equal(got, want) {
			t.Fatalf("%s: delivered %v\nwant %v", stage, got, want)
		}
		bodies := map[string]string{}
		for _, a := range as.attempts() {
			if b, ok := bodies[a.id]; ok && b != string(a.body) {
				t.Fatalf("%s: txn %s sent with two bodies", stage, a.id)
			}
			bodies[a.id] = string(a.body)
		}
	}
	owner := func() int {
		t.Helper()
		var o string
		if err := pgtest.Open(t, dsn).QueryRow(`SELECT owner FROM leases WHERE as_key = $1`, key).Scan(&o); err != nil {
			t.Fatal(err)
		}
		return int(o[1] - '0')
	}

	for round := 0; round < 3; round++ {
		send(stores[0], 5, fmt.Sprintf("p0r%d", round))
		send(stores[1], 5, fmt.Sprintf("p1r%d", round))
	}
	wait("both commit")
	first := owner()
	other := 1 - first
	if _, ok := qs[other].Live(key); ok {
		t.Error("a process without the lease reports live sender state")
	}
	if _, ok := qs[first].Live(key); !ok {
		t.Error("the lease holder reports no live sender state")
	}

	// A clean close releases the lease: the other takes over at once.
	closeCtx, cancel := context.WithTimeout(ctx, 2*time.Second)
	qs[first].Close(closeCtx)
	cancel()
	var left string
	err := pgtest.Open(t, dsn).QueryRow(`SELECT owner FROM leases WHERE as_key = $1`, key).Scan(&left)
	if err == nil && left == fmt.Sprintf("p%d", first) {
		t.Errorf("the closed queue did not release its lease")
	}
	send(stores[first], 5, "after-close")
	wait("after the owner closed")
	if owner() != other {
		t.Fatalf("lease still with the closed queue")
	}

	// Restart the first; then the owner loses its database (as a process
	// that hangs or dies would): the first takes over after the ttl.
	qs[first] = New(stores[first], Options{RetryInitial: 20 * time.Millisecond, LeaseTTL: ttl, PollInterval: 30 * time.Millisecond,
		Owner: fmt.Sprintf("p%d", first), Logger: zaptest.NewLogger(t), Client: asapi.New(asapi.Options{TxnTimeout: ttl})})
	target := as.target("a")
	target.Key = key
	qs[first].Start(target)
	stores[other].Close()
	start := time.Now()
	send(stores[first], 5, "after-loss")
	wait("after the owner lost its database")
	if owner() != first {
		t.Fatal("lease not taken over")
	}
	t.Logf("takeover after the owner lost its database: %v (ttl %v)", time.Since(start), ttl)
}
