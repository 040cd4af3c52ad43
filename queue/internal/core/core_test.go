package core

import (
	"go/ast"
	"go/parser"
	"go/token"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
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
		af, err := parser.ParseFile(token.NewFileSet(), f, src, 0)
		if err != nil {
			t.Fatal(err)
		}
		ast.Inspect(af, func(n ast.Node) bool {
			if _, ok := n.(*ast.GoStmt); ok {
				t.Errorf("%s starts a goroutine", f)
			}
			return true
		})
		for _, im := range af.Imports {
			if p, _ := strconv.Unquote(im.Path.Value); banned[p] {
				t.Errorf("%s imports %s", f, p)
			}
		}
		for _, bad := range []string{"time.Now(", "time.Since(", "time.Until(", "time.After(", "time.NewTimer("} {
			if strings.Contains(string(src), bad) {
				t.Errorf("%s uses %s", f, bad)
			}
		}
	}
}

func testConfig(shared bool) Config {
	return Config{Key: 1, Limits: Limits{Events: 100, Ephemeral: 100, ToDevice: 100, Bytes: 1 << 20},
		Retry: []time.Duration{time.Second, 2 * time.Second}, RetryMax: 2 * time.Second,
		StoreRetry: []time.Duration{10 * time.Millisecond}, Shared: shared, LeaseTTL: 10 * time.Second,
		AcquireEvery: time.Second, PollInterval: 200 * time.Millisecond, SendTimeout: 4 * time.Second,
		Depth: 4, MemItems: 1000, MemBytes: 1 << 20}
}

// TestLeaseCheckedAtSend (issue 13, also fix): on a shared store nothing is
// sent unless the lease stays valid, by the machine's clock, for the whole
// send timeout; the send's deadline ends within the lease.
func TestLeaseCheckedAtSend(t *testing.T) {
	m, t0, now, r := stallBeforeSend(t, NoBug)
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

// TestLeaseCheckBites: with BugNoLeaseCheck, TestLeaseCheckedAtSend's
// stalled machine sends at once (the simulation leaves this bug out).
func TestLeaseCheckBites(t *testing.T) {
	if _, _, _, r := stallBeforeSend(t, BugNoLeaseCheck); r.Send == nil {
		t.Fatalf("BugNoLeaseCheck did not send: %+v", r)
	}
}

// stallBeforeSend leads a shared machine to its first send, the process
// stalled past the renewal meanwhile, and returns what it then asks for.
func stallBeforeSend(t *testing.T, bug Bug) (m *Sender, t0, now time.Time, r Ready) {
	t.Helper()
	cfg := testConfig(true)
	cfg.Bug = bug
	m = New(cfg, rand.New(rand.NewPCG(1, 2)))
	t0 = time.Unix(1000, 0)
	m.Step(t0, Start{Target: Target{HasURL: true}})
	r = m.Ready()
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
	now = t0.Add(5 * time.Second)
	m.Step(now, FreezeDone{Tok: r.Freeze.Tok, IDs: []int64{1}})
	return m, t0, now, m.Ready()
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

// TestLeaseOutlastsSend: with a transaction timeout longer than the lease
// (90 s against 10 s, as HTTP to mautrix-go on PostgreSQL), the lease is
// renewed to outlast the whole send before it starts and while it runs, so
// no other process takes over and resends that id beside it; idle, the
// renewals go back to the plain lease length.
func TestLeaseOutlastsSend(t *testing.T) {
	cfg := testConfig(true)
	cfg.SendTimeout = 90 * time.Second
	m := New(cfg, rand.New(rand.NewPCG(1, 2)))
	t0 := time.Unix(1000, 0)
	m.Step(t0, Start{Target: Target{HasURL: true}})
	r := m.Ready()
	if r.Lease == nil || r.Lease.Kind != Acquire || r.Lease.TTL != cfg.LeaseTTL {
		t.Fatalf("acquire: %+v", r.Lease)
	}
	m.Step(t0, LeaseDone{Tok: r.Lease.Tok, OK: true})
	r = m.Ready()
	m.Step(t0, RecoverDone{Tok: r.Recover.Tok, Frozen: []txnstore.Txn{}, Delivered: 0})
	r = m.Ready()
	m.Step(t0, ReadDone{Tok: r.Read.Tok, Items: []txnstore.Item{{Seq: 1, Kind: txnstore.KindEvent, Data: []byte(`{}`)}}})
	r = m.Ready()
	m.Step(t0, FreezeDone{Tok: r.Freeze.Tok, IDs: []int64{1}})
	r = m.Ready()
	if r.Send != nil {
		t.Fatalf("sent under a lease valid for 7.5 s with a 90 s timeout")
	}
	if r.Lease == nil || r.Lease.Kind != Renew || r.Lease.TTL < cfg.SendTimeout+cfg.LeaseTTL/2 {
		t.Fatalf("renewal before the send: %+v", r.Lease)
	}
	now := t0.Add(time.Second)
	m.Step(now, LeaseDone{Tok: r.Lease.Tok, OK: true})
	r = m.Ready()
	if r.Send == nil {
		t.Fatalf("no send after the lease was renewed for it: %+v", r)
	}
	if want := now.Add(cfg.SendTimeout); !r.Send.Deadline.Equal(want) {
		t.Fatalf("deadline %v, want %v", r.Send.Deadline.Sub(t0), want.Sub(t0))
	}
	// Renewals while the send runs keep covering it.
	now = now.Add(cfg.LeaseTTL / 4)
	m.Step(now, Tick{})
	r = m.Ready()
	if r.Lease == nil || r.Lease.Kind != Renew || r.Lease.TTL < cfg.SendTimeout+cfg.LeaseTTL/2 {
		t.Fatalf("renewal during the send: %+v", r.Lease)
	}
	m.Step(now, LeaseDone{Tok: r.Lease.Tok, OK: true})
	m.Ready()
	m.Step(now, SendDone{ID: 1, Status: 200})
	r = m.Ready()
	for _, w := range r.Writes {
		m.Step(now, WriteDone{Tok: w.Tok})
	}
	// Idle: the next renewal asks for the plain length again.
	for i := 0; i < 20; i++ {
		now = now.Add(cfg.LeaseTTL / 4)
		m.Step(now, Tick{})
		r = m.Ready()
		for _, w := range r.Writes {
			m.Step(now, WriteDone{Tok: w.Tok})
		}
		if r.Lease != nil {
			if r.Lease.Kind == Renew && r.Lease.TTL == cfg.LeaseTTL {
				return
			}
			m.Step(now, LeaseDone{Tok: r.Lease.Tok, OK: true})
		}
	}
	t.Fatal("idle renewals still ask for a lease outlasting a send")
}

// TestCatchupBatching: with CatchupEvents set, a transaction cut while more
// items wait than one of the other limits holds grows to CatchupEvents
// events (Bytes still capping it); without a backlog, or with it off,
// transactions keep Events.
func TestCatchupBatching(t *testing.T) {
	tests := []struct {
		name           string
		catchup, bytes int
		waiting        int
		want           []int // events of the transactions frozen (a partial one waits)
	}{
		{"off", 0, 1 << 20, 250, []int{100, 100}},
		{"no backlog", 1000, 1 << 20, 80, []int{80}},
		{"one normal transaction is no backlog", 1000, 1 << 20, 100, []int{100}},
		{"backlog", 1000, 1 << 20, 250, []int{250}},
		{"backlog over the catch-up cap", 150, 1 << 20, 250, []int{150}},
		{"bytes still cap", 1000, 128 + 150*14, 250, []int{150}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cfg := testConfig(false)
			cfg.CatchupEvents, cfg.Bytes = tt.catchup, tt.bytes
			m, read := readingEmpty(t, cfg)
			freeze := freezeOfRead(t, m, read, tt.waiting)
			var got []int
			for _, tx := range freeze.Txns {
				got = append(got, int(tx.Range.Last-tx.Range.After))
			}
			if !slices.Equal(got, tt.want) {
				t.Errorf("transactions of %v events, want %v", got, tt.want)
			}
		})
	}
}

// TestRecoverEnd: on an unshared store, a recovery that gives the
// stream's end spares an AS with nothing past its cursor any read, and a
// preloaded one the recover too; items committed afterwards go out from
// memory, and a backlog is read from the store up to End only.
func TestRecoverEnd(t *testing.T) {
	t0 := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	item := func(seq int64) txnstore.Item {
		return txnstore.Item{Seq: seq, Kind: txnstore.KindEvent, Data: []byte(`{}`)}
	}
	for _, tc := range []struct {
		name      string
		preload   bool
		hasEnd    bool
		delivered int64
		end       int64
		wantRead  bool // a read after the recovery
	}{
		{"idle, end known", false, true, 7, 7, false},
		{"idle, preloaded", true, true, 7, 7, false},
		{"idle, end unknown", false, false, 7, 0, true},
		{"backlog", false, true, 7, 9, true},
		{"backlog, preloaded", true, true, 7, 9, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			m := New(testConfig(false), rand.New(rand.NewPCG(1, 2)))
			rec := RecoverDone{Delivered: tc.delivered, End: tc.end, HasEnd: tc.hasEnd}
			start := Start{Target: Target{HasURL: true}}
			if tc.preload {
				start.Recovered = &rec
			}
			m.Step(t0, start)
			r := m.Ready()
			if tc.preload != (r.Recover == nil) {
				t.Fatalf("preload %v, recover op %+v", tc.preload, r.Recover)
			}
			if r.Recover != nil {
				// An item committed while the recover is out, after the
				// store was read.
				m.Step(t0, Committed{Items: []txnstore.Item{item(tc.end + 1)}})
				rec.Tok = r.Recover.Tok
				m.Step(t0, rec)
				r = m.Ready()
			}
			if (r.Read != nil) != tc.wantRead {
				t.Fatalf("read %+v, want a read: %v", r.Read, tc.wantRead)
			}
			if r.Read != nil && tc.hasEnd {
				items := []txnstore.Item{}
				for q := tc.delivered + 1; q <= tc.end; q++ {
					items = append(items, item(q))
				}
				m.Step(t0, ReadDone{Tok: r.Read.Tok, Items: items})
				r = m.Ready()
			}
			if r.Freeze == nil && tc.hasEnd && (tc.end > tc.delivered || !tc.preload) {
				t.Fatalf("nothing frozen: %+v", r)
			}
			if r.Freeze != nil && tc.hasEnd {
				want := tc.end
				if !tc.preload {
					want++ // the committed item, from memory
				}
				if last := r.Freeze.Txns[len(r.Freeze.Txns)-1].Range.Last; last != want {
					t.Fatalf("froze up to %d, want %d", last, want)
				}
			}
		})
	}
}

// TestDeepPipeline: a catch-up of small transactions reads enough to
// freeze many of them in one freeze (Depth/8 transactions' worth of items,
// ephemeral headroom included: 160 of 100 events, the last held back as
// more may join it), while the bodies frozen ahead stay under readTxns
// transactions of Bytes however deep the pipeline.
func TestDeepPipeline(t *testing.T) {
	const item = 14 // bytes of an item with its comma
	tests := []struct {
		name       string
		depth      int
		bytes      int
		wantFrozen int
	}{
		{"small transactions", 256, 1 << 20, 159},
		{"bytes bound what is ahead", 256, bodyOverhead + 100*item, readTxns},
		{"a shallow pipeline", 4, 1 << 20, 4},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cfg := testConfig(false)
			cfg.Depth, cfg.Bytes = tt.depth, tt.bytes
			m, read := readingEmpty(t, cfg)
			if min(read.MaxItems, read.MaxBytes/item) <= tt.wantFrozen*cfg.Events {
				t.Fatalf("read of %d items, %d bytes: not enough for %d transactions of %d events", read.MaxItems, read.MaxBytes, tt.wantFrozen, cfg.Events)
			}
			// The store returns what it was asked for: a backlog of more.
			freeze := freezeOfRead(t, m, read, min(read.MaxItems, read.MaxBytes/item+1))
			ahead := 0
			for _, tx := range freeze.Txns {
				ahead += tx.Len
			}
			if len(freeze.Txns) != tt.wantFrozen {
				t.Errorf("froze %d transactions, want %d", len(freeze.Txns), tt.wantFrozen)
			}
			if limit := readTxns * cfg.Bytes; ahead-freeze.Txns[len(freeze.Txns)-1].Len >= limit {
				t.Errorf("%d bytes frozen ahead before the last transaction, over %d", ahead, limit)
			}
		})
	}
}

// readingEmpty starts a machine of cfg on an empty queue and returns it
// with the read of the stream it then asks for.
func readingEmpty(t *testing.T, cfg Config) (*Sender, *ReadOp) {
	t.Helper()
	m := New(cfg, rand.New(rand.NewPCG(1, 2)))
	now := time.Unix(0, 0)
	m.Step(now, Start{Target: Target{HasURL: true}})
	m.Step(now, RecoverDone{Tok: m.Ready().Recover.Tok})
	r := m.Ready()
	if r.Read == nil {
		t.Fatalf("no read after recovery: %+v", r)
	}
	return m, r.Read
}

// freezeOfRead answers read with n events of 14 bytes each (with their
// comma), seqs 1 to n, and returns the freeze the machine then asks for.
func freezeOfRead(t *testing.T, m *Sender, read *ReadOp, n int) *FreezeOp {
	t.Helper()
	items := make([]txnstore.Item, n)
	for i := range items {
		items[i] = txnstore.Item{Seq: int64(i + 1), Kind: txnstore.KindEvent, Data: []byte(`{"a":"12345"}`)}
	}
	m.Step(time.Unix(0, 0), ReadDone{Tok: read.Tok, Items: items})
	r := m.Ready()
	if r.Freeze == nil {
		t.Fatalf("nothing frozen: %+v", r)
	}
	return r.Freeze
}
