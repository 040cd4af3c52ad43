package core

import (
	"go/parser"
	"go/token"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/asdispatch/asdispatch/txnstore"
)

// TestNoIO: the machine has no goroutines, clocks, locks or I/O of its own.
func TestNoIO(t *testing.T) {
	banned := map[string]bool{"net/http": true, "database/sql": true, "os": true, "sync": true, "sync/atomic": true, "context": true, "math/rand": true}
	files, _ := filepath.Glob("*.go")
	for _, f := range files {
		if strings.HasSuffix(f, "_test.go") {
			continue
		}
		src, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		af, err := parser.ParseFile(token.NewFileSet(), f, src, parser.ImportsOnly)
		if err != nil {
			t.Fatal(err)
		}
		for _, im := range af.Imports {
			if p, _ := strconv.Unquote(im.Path.Value); banned[p] {
				t.Errorf("%s imports %s", f, p)
			}
		}
		for _, bad := range []string{"time.Now(", "time.Since(", "time.Until(", "time.After(", "time.NewTimer(", "go func"} {
			if strings.Contains(string(src), bad) {
				t.Errorf("%s uses %s", f, bad)
			}
		}
	}
}

func testConfig(shared bool) Config {
	return Config{Key: 1, ID: "a", Limits: Limits{Events: 100, Ephemeral: 100, ToDevice: 100, Bytes: 1 << 20},
		Retry: []time.Duration{time.Second, 2 * time.Second}, RetryMax: 2 * time.Second,
		StoreRetry: []time.Duration{10 * time.Millisecond}, Shared: shared, LeaseTTL: 10 * time.Second,
		AcquireEvery: time.Second, PollInterval: 200 * time.Millisecond, SendTimeout: 4 * time.Second,
		Depth: 4, MemItems: 1000, MemBytes: 1 << 20}
}

// TestLeaseCheckedAtSend (issue 13, also fix): on a shared store nothing is
// sent unless the lease stays valid, by the machine's clock, for the whole
// send timeout; the send's deadline ends within the lease.
func TestLeaseCheckedAtSend(t *testing.T) {
	m := New(testConfig(true), rand.New(rand.NewPCG(1, 2)))
	t0 := time.Unix(1000, 0)
	m.Step(t0, Start{Target: Target{HasURL: true}})
	r := m.Ready()
	if r.Lease == nil || r.Lease.Kind != Acquire {
		t.Fatalf("no acquire: %+v", r)
	}
	m.Step(t0, LeaseDone{Tok: r.Lease.Tok, OK: true})
	r = m.Ready()
	m.Step(t0, RecoverDone{Tok: r.Recover.Tok, Frozen: []txnstore.Txn{}, Delivered: 0})
	r = m.Ready()
	m.Step(t0, ReadDone{Tok: r.Read.Tok, Items: []txnstore.Item{{Seq: 1, Kind: txnstore.KindEvent, Data: []byte(`{}`)}}})
	r = m.Ready()
	if r.Freeze == nil {
		t.Fatalf("no freeze: %+v", r)
	}
	// The process stalls past the renewal: by its own clock the lease
	// (valid until t0+7.5s) no longer covers a 4s send at t0+5s.
	now := t0.Add(5 * time.Second)
	m.Step(now, FreezeDone{Tok: r.Freeze.Tok, IDs: []int64{1}})
	r = m.Ready()
	if r.Send != nil {
		t.Fatalf("sent at %v with the lease valid until %v and a %v send timeout", now.Sub(t0), 7500*time.Millisecond, 4*time.Second)
	}
	if r.Lease == nil || r.Lease.Kind != Renew {
		t.Fatalf("no renewal before the send: %+v", r)
	}
	m.Step(now, LeaseDone{Tok: r.Lease.Tok, OK: true})
	r = m.Ready()
	if r.Send == nil || r.Send.Deadline.After(now.Add(7500*time.Millisecond)) {
		t.Fatalf("after renewal: send %+v", r.Send)
	}
}

// TestBackoffBounds: waits stay within [Retry[0]/2, RetryMax] and depend
// only on the attempt and the injected source.
func TestBackoffBounds(t *testing.T) {
	cfg := testConfig(false)
	cfg.Retry = []time.Duration{time.Second, 2 * time.Second, 4 * time.Second, 8 * time.Second}
	cfg.RetryMax = 8 * time.Second
	a, b := New(cfg, rand.New(rand.NewPCG(7, 7))), New(cfg, rand.New(rand.NewPCG(7, 7)))
	for n := 1; n < 40; n++ {
		wa, wb := a.backoff(cfg.Retry, cfg.RetryMax, n), b.backoff(cfg.Retry, cfg.RetryMax, n)
		if wa != wb {
			t.Fatalf("attempt %d: %v and %v from the same seed", n, wa, wb)
		}
		if wa < cfg.Retry[0]/2 || wa > cfg.RetryMax {
			t.Fatalf("attempt %d: wait %v outside [%v, %v]", n, wa, cfg.Retry[0]/2, cfg.RetryMax)
		}
	}
}
