package queue

import (
	"bytes"
	"container/heap"
	"errors"
	"flag"
	"fmt"
	"math/rand/v2"
	"os"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zaptest"

	"github.com/asdispatch/asdispatch/queue/internal/core"
	"github.com/asdispatch/asdispatch/txnstore"
)

// The simulation: the sender's core under a seeded, single-threaded world
// with virtual time. The world holds an in-memory store (memStore), one or
// two processes (two share the store under leases), a scripted AS per key
// and a workload, and injects faults drawn per seed ("swarm"). Invariants
// are checked as the world runs; then faults stop and every backlog must
// drain within a virtual time budget.
//
//	go test ./queue -run 'TestSim$'                      # CI: 2,000 seeds
//	ASDISPATCH_SIM_SEEDS=100000 go test ./queue -run 'TestSim$' -timeout 0
//	go test ./queue -run 'TestSim$' -sim.seed=N -v       # replay one, with logs
//	ASDISPATCH_SIM_BUG=split-order go test ./queue -run 'TestSim$'  # a known bug back
var simSeed = flag.Uint64("sim.seed", 0, "replay this one simulation seed")

var simBugs = map[string]core.Bug{
	"drop-completion": core.BugDropCompletion,
	"split-order":     core.BugSplitOrder,
	"no-reconcile":    core.BugNoReconcile,
	"no-lease-check":  core.BugNoLeaseCheck,
	"stale-end":       core.BugStaleEnd,
	"two-owners":      core.NoBug, // a process model bug, not a core one: see world.twoOwners
}

func TestSim(t *testing.T) {
	seeds, base := uint64(2000), uint64(1)
	if n, err := strconv.ParseUint(os.Getenv("ASDISPATCH_SIM_SEEDS"), 10, 64); err == nil {
		seeds = n
	}
	if n, err := strconv.ParseUint(os.Getenv("ASDISPATCH_SIM_BASE"), 10, 64); err == nil {
		base = n
	}
	one := *simSeed
	if n, err := strconv.ParseUint(os.Getenv("ASDISPATCH_SIM_SEED"), 10, 64); err == nil {
		one = n
	}
	bugName := os.Getenv("ASDISPATCH_SIM_BUG")
	bug, ok := simBugs[bugName]
	if bugName != "" && !ok {
		t.Fatalf("unknown ASDISPATCH_SIM_BUG %q", bugName)
	}
	if testing.Short() && one == 0 {
		seeds = 200
	}
	run := func(seed uint64, log *zap.Logger) error { return simRun(seed, bugName, bug, log) }
	if one != 0 {
		if err := run(one, zaptest.NewLogger(t)); err != nil {
			t.Fatalf("seed %d: %v", one, err)
		}
		return
	}
	start := time.Now()
	for i := uint64(0); i < seeds; i++ {
		seed := base + i
		if err := run(seed, nil); err != nil {
			env := ""
			if bugName != "" {
				env = "ASDISPATCH_SIM_BUG=" + bugName + " "
			}
			t.Fatalf("seed %d failed after %d seeds passed: %v\nreplay: %sgo test ./queue -run 'TestSim$' -sim.seed=%d -v", seed, i, err, env, seed)
		}
	}
	t.Logf("%d seeds from %d in %v", seeds, base, time.Since(start).Round(time.Millisecond))
}

func simRun(seed uint64, bugName string, bug core.Bug, log *zap.Logger) error {
	w := newWorld(seed, log)
	w.bug, w.twoOwners = bug, bugName == "two-owners"
	return w.run()
}

// TestSimBites: with each bug of issue 13 brought back, the simulation
// fails within the CI seeds. It keeps the simulation sharp: a change that
// blinds it to one of them fails here.
func TestSimBites(t *testing.T) {
	if testing.Short() {
		t.Skip("bites: skipped in -short")
	}
	// no-lease-check is left out: the machine's own expiry check still
	// stops a stalled owner, and what remains (a send started just before
	// the lease's end while renewals fail) is rarer than 2,000 seeds find;
	// TestLeaseCheckedAtSend in the core covers it.
	// Each bug must break the invariant it is about, not just any; also
	// names another symptom of the same bug, passed over in the search.
	for _, tc := range []struct{ bug, breaks, also string }{
		// Its dropped completions also leave frozen transactions in the
		// store that no sender resends: the AS never drains.
		{"drop-completion", "two bodies", "liveness"},
		{"split-order", "duplicate, gap or disorder", ""},
		{"no-reconcile", "liveness", ""},
		{"two-owners", "in flight", ""},
		// Items committed before a memory overflow during a recover are
		// neither read nor remembered: the AS gets the later ones first.
		{"stale-end", "duplicate, gap or disorder", "liveness"},
	} {
		t.Run(tc.bug, func(t *testing.T) {
			for seed := uint64(1); seed <= 2000; seed++ {
				if err := simRun(seed, tc.bug, simBugs[tc.bug], nil); err != nil {
					if tc.also != "" && strings.Contains(err.Error(), tc.also) {
						continue
					}
					if !strings.Contains(err.Error(), tc.breaks) {
						t.Fatalf("seed %d failed for another reason than %q: %.300s", seed, tc.breaks, err)
					}
					t.Logf("first failing seed %d: %.200s", seed, err)
					return
				}
			}
			t.Errorf("bug %s not found in 2,000 seeds", tc.bug)
		})
	}
}

// --- the world ---

const (
	simTTL     = 10 * time.Second
	simTimeout = 30 * time.Second // an AS's answer, when no lease bounds it
)

type simEvent struct {
	at  time.Time
	seq uint64
	fn  func()
	// p, if set, is the process the event belongs to: it is dropped when
	// that incarnation is gone and postponed while it is stalled.
	p *simProc
}

type eventHeap []*simEvent

func (h eventHeap) Len() int { return len(h) }
func (h eventHeap) Less(i, j int) bool {
	if !h[i].at.Equal(h[j].at) {
		return h[i].at.Before(h[j].at)
	}
	return h[i].seq < h[j].seq
}
func (h eventHeap) Swap(i, j int) { h[i], h[j] = h[j], h[i] }
func (h *eventHeap) Push(x any)   { *h = append(*h, x.(*simEvent)) }
func (h *eventHeap) Pop() any {
	old := *h
	e := old[len(old)-1]
	*h = old[:len(old)-1]
	return e
}

// faults is one seed's fault mix: probabilities per op kind.
type faults struct {
	on                       bool
	storeBefore, storeAfter  [opKinds]float64
	storeSlow                float64
	as500, as429, asTimeout  float64
	asReset, asSlow, as413On float64
	stall, dbJump            float64
}

const (
	opAppend = iota
	opFreeze
	opSaveBody
	opComplete
	opState
	opLease
	opRead
	opKinds
)

type regState struct {
	registered bool
	hasURL     bool
	tokenGen   int // the hs_token the processes send
}

type simAS struct {
	key      txnstore.ASKey
	maxItems int // a body with more items gets 413 (0: no limit)
	// maxEvents is the highest events cap of its senders so far: frozen
	// transactions outlive the sender that cut them.
	maxEvents int
	tokenGen  int              // the token the AS accepts
	history   []int64          // every seq committed to its stream, in order
	accepted  []int64          // what it took, in order, one copy per txn id
	took      map[int64]bool   // txn ids accepted
	bodies    map[int64][]byte // every body sent under each id
	open      *simSend
	// socket: the AS is connected by websocket (asws) instead of
	// listening for HTTP: while it is not connected every send fails at
	// once, a drop fails the send in flight (the AS may have handled
	// it), and each (re)connection wakes its senders.
	socket    bool
	connected bool
}

type simSend struct {
	p  *simProc
	id int64
}

type world struct {
	seed      uint64
	rnd       *rand.Rand
	log       *zap.Logger
	bug       core.Bug
	twoOwners bool

	now    time.Time
	dbSkew time.Duration
	events eventHeap
	evSeq  uint64
	steps  int

	store  *memStore
	shared bool
	// sendTimeout is the transport's timeout: shorter than the lease
	// (a deadline cuts sends) or, on odd seeds, three times longer (each
	// send renews the lease to outlast it).
	sendTimeout time.Duration
	// srnd draws the websocket ASes and their connections, apart from rnd
	// so the other draws of a seed stay as they were.
	srnd *rand.Rand
	// recoverer: the store answers a recover with the stream's end
	// (txnstore.Recoverer); preload: on an unshared store a process
	// reads every AS's recovery before it starts them (Queues.Preload),
	// and a commit it announces meanwhile voids it. Drawn from prnd.
	recoverer, preload bool
	prnd               *rand.Rand
	f                  faults
	ases               []*simAS
	reg                map[txnstore.ASKey]*regState
	procs              []*simProc
	nextP              int
	err                error
}

type simProc struct {
	name         string
	alive        bool
	closing      bool
	stalledUntil time.Time
	cores        map[txnstore.ASKey]*simCore
	// announced counts the commits the process was told of (OnCommit).
	announced int
	// old are cores a broken process model (twoOwners) left running.
	old []*simCore
}

type simCore struct {
	p      *simProc
	key    txnstore.ASKey
	m      *core.Sender
	next   time.Time
	halted bool
	dead   bool
	send   *core.SendOp
	sendAt time.Time
	// canTake: the AS would take this send (token and size fit).
	canTake bool
}

func newWorld(seed uint64, log *zap.Logger) *world {
	if log == nil {
		log = zap.NewNop()
	}
	w := &world{seed: seed, rnd: rand.New(rand.NewPCG(seed, 0x5eed)), log: log,
		now: time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC), reg: map[txnstore.ASKey]*regState{}}
	r := w.rnd
	w.shared = r.Float64() < 0.35
	w.srnd = rand.New(rand.NewPCG(seed, 0x50c7e7))
	w.prnd = rand.New(rand.NewPCG(seed, 0x9e10ad))
	w.recoverer = w.prnd.IntN(4) > 0
	w.preload = w.recoverer && w.prnd.IntN(2) == 0
	w.sendTimeout = simTTL * 2 / 5
	if seed%2 == 1 {
		w.sendTimeout = 3 * simTTL
	}
	w.store = newMemStore(w.shared)
	// Swarm: each seed its own fault mix, some seeds nearly none.
	w.f.on = true
	level := []float64{0, 0.02, 0.1, 0.25}[r.IntN(4)]
	for k := range opKinds {
		if r.IntN(3) > 0 {
			w.f.storeBefore[k] = level * r.Float64()
		}
		if r.IntN(3) > 0 {
			w.f.storeAfter[k] = level * r.Float64()
		}
	}
	pick := func(p float64) float64 {
		if r.IntN(2) == 0 {
			return 0
		}
		return p * r.Float64()
	}
	w.f.storeSlow = pick(0.2)
	w.f.as500, w.f.as429, w.f.asTimeout = pick(0.4), pick(0.2), pick(0.15)
	w.f.asReset, w.f.asSlow, w.f.as413On = pick(0.15), pick(0.3), pick(1)
	w.f.stall, w.f.dbJump = pick(1), pick(1)
	n := 1 + r.IntN(3)
	for i := 1; i <= n; i++ {
		k := txnstore.ASKey(i)
		w.store.ensureAS(k)
		a := &simAS{key: k, took: map[int64]bool{}, bodies: map[int64][]byte{}}
		if r.Float64() < w.f.as413On {
			a.maxItems = 1 + r.IntN(4)
		}
		if w.srnd.IntN(3) == 0 {
			a.socket, a.connected = true, w.srnd.IntN(2) == 0
		}
		w.ases = append(w.ases, a)
		w.reg[k] = &regState{registered: true, hasURL: true}
	}
	return w
}

func (w *world) failf(format string, args ...any) {
	if w.err == nil {
		w.err = fmt.Errorf("t=%v step %d: %s", w.now.Sub(time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)), w.steps, fmt.Sprintf(format, args...))
	}
}

func (w *world) trace(format string, args ...any) {
	if ce := w.log.Check(zap.InfoLevel, "sim"); ce != nil {
		ce.Write(zap.Duration("t", w.now.Sub(time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC))), zap.String("what", fmt.Sprintf(format, args...)))
	}
}

func (w *world) at(d time.Duration, p *simProc, fn func()) {
	w.evSeq++
	heap.Push(&w.events, &simEvent{at: w.now.Add(d), seq: w.evSeq, fn: fn, p: p})
}

func (w *world) dbNow() time.Time { return w.now.Add(w.dbSkew) }

func (w *world) lat() time.Duration {
	d := time.Duration(1+w.rnd.IntN(20)) * time.Millisecond
	if w.f.on && w.rnd.Float64() < w.f.storeSlow {
		d += time.Duration(w.rnd.IntN(3000)) * time.Millisecond
	}
	return d
}

func (w *world) config(p *simProc, k txnstore.ASKey) core.Config {
	// Catch-up batching on for half the machines: transactions of up to 16
	// events while a backlog waits, still within Bytes.
	catchup := 0
	if w.rnd.IntN(2) == 0 {
		catchup = 5 + w.rnd.IntN(12)
	}
	depth := simDepth(w.rnd.IntN(9)) // drawn in the order they always were
	mem := 5 + w.rnd.IntN(40)
	if w.prnd.IntN(4) == 0 {
		// Memory that overflows at a burst, even while a recover is out.
		mem = 1 + w.prnd.IntN(3)
	}
	return core.Config{
		Key:        k,
		Limits:     core.Limits{Events: 4, Ephemeral: 3, ToDevice: 3, Bytes: 600, CatchupEvents: catchup},
		Retry:      Schedule(time.Second, 16*time.Second),
		RetryMax:   16 * time.Second,
		StoreRetry: Schedule(50*time.Millisecond, 2*time.Second),
		Shared:     w.shared, LeaseTTL: simTTL, AcquireEvery: 2 * time.Second,
		PollInterval: time.Second, SendTimeout: w.sendTimeout,
		Depth: depth, MemItems: mem, MemBytes: 4000,
		Log: w.log.With(zap.String("proc", p.name), zap.Int32("as", int32(k))),
		Bug: w.bug,
	}
}

// simDepth is a pipeline depth from 1 to 8, or (one in nine) one far
// deeper than the bytes allowed ahead, as the queue's default is.
func simDepth(n int) int {
	if n == 8 {
		return 64
	}
	return 1 + n
}

// --- processes ---

func (w *world) startProc() *simProc {
	w.nextP++
	p := &simProc{name: fmt.Sprintf("p%d", w.nextP), alive: true, cores: map[txnstore.ASKey]*simCore{}}
	w.procs = append(w.procs, p)
	if w.preload && !w.shared {
		// Every recovery read at once; the senders start a little later,
		// each from its recovery unless the process announced a commit
		// in between (an AS without a sender yet is not told of it).
		recs := map[txnstore.ASKey]*core.RecoverDone{}
		for _, a := range w.ases {
			rec := w.store.recovery(a.key)
			recs[a.key] = &rec
		}
		before := p.announced
		w.at(w.lat(), p, func() {
			for _, a := range w.ases {
				if w.reg[a.key].registered && p.cores[a.key] == nil {
					var rec *core.RecoverDone
					if p.announced == before {
						rec = recs[a.key]
					}
					w.startCore(p, a.key, rec)
				}
			}
		})
		return p
	}
	for _, a := range w.ases {
		if w.reg[a.key].registered {
			w.startCore(p, a.key, nil)
		}
	}
	return p
}

// restart starts a process if fewer run than the store allows: one on an
// unshared store (it is owned by one process), two on a shared one.
func (w *world) restart() {
	want := 1
	if w.shared {
		want = 2
	}
	if len(w.procs) < want {
		w.startProc()
	}
}

func (w *world) target(k txnstore.ASKey) core.Target {
	return core.Target{HasURL: w.reg[k].hasURL}
}

func (w *world) startCore(p *simProc, k txnstore.ASKey, rec *core.RecoverDone) {
	if p.closing {
		return
	}
	c := p.cores[k]
	if c != nil && w.twoOwners && c.halted && !c.m.Stopped() {
		// The broken process model: a new sender while the old one is
		// still stopping (issue 13, 3).
		p.old = append(p.old, c)
		c = nil
	}
	if c == nil {
		cfg := w.config(p, k)
		c = &simCore{p: p, key: k, m: core.New(cfg, rand.New(rand.NewPCG(w.seed, uint64(k)<<8|uint64(w.nextP))))}
		a := w.ases[k-1]
		a.maxEvents = max(a.maxEvents, cfg.Events, cfg.CatchupEvents)
		p.cores[k] = c
	}
	c.halted = false
	w.step(c, core.Start{Target: w.target(k), Recovered: rec})
}

func (w *world) haltCore(c *simCore) {
	c.halted = true
	w.step(c, core.Stop{})
	if w.rnd.IntN(3) == 0 {
		// The stop's context ends before the send in flight does.
		w.at(time.Duration(w.rnd.IntN(5000))*time.Millisecond, c.p, func() {
			if c.halted && !c.m.Stopped() {
				w.step(c, core.Abort{})
			}
		})
	}
}

func (p *simProc) all() []*simCore {
	out := make([]*simCore, 0, len(p.cores)+len(p.old))
	for k := txnstore.ASKey(1); k <= 3; k++ {
		if c := p.cores[k]; c != nil {
			out = append(out, c)
		}
	}
	return append(out, p.old...)
}

// crash drops every in-memory structure of p. A send in flight dies with
// it: the AS took it or not.
func (w *world) crash(p *simProc) {
	if !p.alive {
		return
	}
	p.alive = false
	for _, c := range p.all() {
		c.dead = true
		if c.send != nil {
			w.endSend(c, c.canTake && w.rnd.IntN(2) == 0)
		}
	}
	w.procs = slices.DeleteFunc(w.procs, func(q *simProc) bool { return q == p })
}

// --- stepping a core and carrying out its Ready ---

func (w *world) step(c *simCore, in core.Input) {
	if c.dead || w.err != nil {
		return
	}
	func() {
		defer func() {
			if r := recover(); r != nil {
				w.failf("panic in core: %v", r)
			}
		}()
		c.m.Step(w.now, in)
	}()
	w.carryOut(c, c.m.Ready())
}

func (w *world) storeFault(kind int) (before, after bool) {
	if !w.f.on {
		return false, false
	}
	r := w.rnd.Float64()
	return r < w.f.storeBefore[kind], r >= w.f.storeBefore[kind] && r < w.f.storeBefore[kind]+w.f.storeAfter[kind]
}

var errSimStore = errors.New("sim: store fault")

// storeOp runs op against the store after a latency; its answer goes back
// to c. op returns the input to deliver; a fault before the commit skips
// op, one after it runs op and replaces its answer by an error.
func (w *world) storeOp(c *simCore, kind int, fenced bool, op func() core.Input, failed func(error) core.Input) {
	w.storeOps(c, kind, fenced, func() []core.Input { return []core.Input{op()} },
		func(err error) []core.Input { return []core.Input{failed(err)} })
}

// storeOps is storeOp for one commit that answers several ops, each
// answer reaching the core on its own.
func (w *world) storeOps(c *simCore, kind int, fenced bool, op func() []core.Input, failed func(error) []core.Input) {
	w.at(w.lat(), c.p, func() {
		before, after := w.storeFault(kind)
		var ins []core.Input
		switch {
		case before:
			ins = failed(errSimStore)
		case fenced && w.store.fence(c.key, c.p.name, w.dbNow()) != nil:
			ins = failed(txnstore.ErrLeaseLost)
		default:
			ins = op()
			if after {
				ins = failed(errSimStore)
			}
		}
		for _, in := range ins {
			w.trace("%s as %d store op %d: %T%+v before=%v after=%v", c.p.name, c.key, kind, in, in, before, after)
			w.at(w.lat(), c.p, func() { w.step(c, in) })
		}
	})
}

func (w *world) carryOut(c *simCore, r core.Ready) {
	c.next = r.Next
	k := c.key
	if op := r.Recover; op != nil {
		w.storeOp(c, opRead, false, func() core.Input {
			if w.recoverer {
				rec := w.store.recovery(k)
				rec.Tok = op.Tok
				return rec
			}
			return core.RecoverDone{Tok: op.Tok, Frozen: w.store.frozenOf(k), Delivered: w.store.ases[k].delivered}
		}, func(err error) core.Input { return core.RecoverDone{Tok: op.Tok, Err: err} })
	}
	if op := r.Read; op != nil {
		w.storeOp(c, opRead, false, func() core.Input {
			return core.ReadDone{Tok: op.Tok, Items: w.store.read(k, op.After, op.MaxItems, op.MaxBytes)}
		}, func(err error) core.Input { return core.ReadDone{Tok: op.Tok, Err: err} })
	}
	writes := r.Writes
	if op := r.Freeze; op != nil && len(writes) == 1 && writes[0].Complete != nil && k%2 == 0 {
		// What the driver does on a store with CompleteFreeze (SQLite):
		// one commit, the completion first; half of the ASes get it.
		wr := writes[0]
		writes = nil
		w.storeOps(c, opFreeze, true, func() []core.Input {
			cerr := w.store.complete(k, wr.Complete)
			ids, ferr := w.store.freeze(k, op.Replace, op.Txns)
			return []core.Input{core.WriteDone{Tok: wr.Tok, Err: cerr}, core.FreezeDone{Tok: op.Tok, IDs: ids, Err: ferr}}
		}, func(err error) []core.Input {
			return []core.Input{core.WriteDone{Tok: wr.Tok, Err: err}, core.FreezeDone{Tok: op.Tok, Err: err}}
		})
	} else if op := r.Freeze; op != nil {
		w.storeOp(c, opFreeze, true, func() core.Input {
			ids, err := w.store.freeze(k, op.Replace, op.Txns)
			return core.FreezeDone{Tok: op.Tok, IDs: ids, Err: err}
		}, func(err error) core.Input { return core.FreezeDone{Tok: op.Tok, Err: err} })
	}
	for _, op := range writes {
		kind, fenced := opComplete, true
		switch {
		case op.SaveBody != nil:
			kind = opSaveBody
		case op.State != nil:
			kind, fenced = opState, false
		}
		w.storeOp(c, kind, fenced, func() core.Input {
			var err error
			switch {
			case op.SaveBody != nil:
				err = w.store.saveBody(k, op.SaveBody.ID, op.SaveBody.Body)
			case op.State != nil:
				w.store.ases[k].state = *op.State
			default:
				err = w.store.complete(k, op.Complete)
			}
			return core.WriteDone{Tok: op.Tok, Err: err}
		}, func(err error) core.Input { return core.WriteDone{Tok: op.Tok, Err: err} })
	}
	if op := r.Lease; op != nil {
		w.storeOp(c, opLease, false, func() core.Input {
			switch op.Kind {
			case core.Acquire:
				return core.LeaseDone{Tok: op.Tok, OK: w.store.acquire(k, c.p.name, op.TTL, w.dbNow())}
			case core.Renew:
				return core.LeaseDone{Tok: op.Tok, OK: w.store.renew(k, c.p.name, op.TTL, w.dbNow())}
			}
			w.store.release(k, c.p.name)
			return core.LeaseDone{Tok: op.Tok, OK: true}
		}, func(err error) core.Input { return core.LeaseDone{Tok: op.Tok, Err: err} })
	}
	if r.CancelSend && c.send != nil {
		id := c.send.ID
		w.at(w.lat(), c.p, func() {
			if c.send != nil && c.send.ID == id {
				w.endSend(c, c.canTake && w.rnd.IntN(2) == 0)
				w.step(c, core.SendDone{ID: id, Err: errors.New("canceled"), Aborted: true})
			}
		})
	}
	if op := r.Send; op != nil {
		w.send(c, op)
	}
}

// --- the AS ---

func (w *world) send(c *simCore, op *core.SendOp) {
	a := w.ases[c.key-1]
	reg := w.reg[c.key]
	switch {
	case c.send != nil:
		w.failf("as %d: a second send from one core", c.key)
	case a.open != nil:
		w.failf("as %d: txn %d sent by %s while txn %d is in flight from %s", c.key, op.ID, c.p.name, a.open.id, a.open.p.name)
	case !reg.registered || c.halted:
		w.failf("as %d: txn %d sent to a removed or stopped AS", c.key, op.ID)
	case !reg.hasURL:
		w.failf("as %d: txn %d sent to an AS without url", c.key, op.ID)
	}
	if ev := eventsOf(op.Body); ev > a.maxEvents {
		w.failf("as %d: txn %d holds %d events, over every cap its senders had (%d)", c.key, op.ID, ev, a.maxEvents)
	}
	if prev, ok := a.bodies[op.ID]; ok && !bytes.Equal(prev, op.Body) {
		w.failf("as %d: txn %d sent with two bodies:\n%s\n%s", c.key, op.ID, prev, op.Body)
	}
	a.bodies[op.ID] = slices.Clone(op.Body)
	w.trace("%s sends as %d txn %d %v", c.p.name, c.key, op.ID, seqsOf(op.Body))
	a.open = &simSend{p: c.p, id: op.ID}
	c.send, c.sendAt = op, w.now
	tokenGen := reg.tokenGen

	// The AS's answer.
	r := w.rnd.Float64()
	f := w.f
	if !f.on {
		f = faults{}
	}
	took := false
	done := core.SendDone{ID: op.ID}
	d := time.Duration(5+w.rnd.IntN(50)) * time.Millisecond
	n := len(seqsOf(op.Body))
	c.canTake = a.tokenGen == tokenGen && (a.maxItems == 0 || n <= a.maxItems || a.took[op.ID])
	switch {
	case a.socket && !a.connected:
		done.Err, d = errors.New("not connected"), time.Millisecond
	case a.tokenGen != tokenGen:
		done.Err, done.Status, done.TokenMismatch = errors.New("403"), 403, true
	case a.took[op.ID]:
		took = true // a txn id it already took: acknowledged again, as the spec asks
	case a.maxItems > 0 && n > a.maxItems:
		done.Err, done.Status, done.TooLarge = errors.New("413"), 413, true
	case r < f.as500:
		done.Err, done.Status = errors.New("500"), 500
	case r < f.as500+f.as429:
		done.Err, done.Status, done.RetryAfter = errors.New("429"), 429, time.Duration(w.rnd.IntN(30000))*time.Millisecond
	case r < f.as500+f.as429+f.asTimeout:
		d, took = simTimeout, w.rnd.IntN(2) == 0
		done.Err = errors.New("timeout")
	case r < f.as500+f.as429+f.asTimeout+f.asReset:
		took = true // took the body; the answer is lost
		done.Err = errors.New("connection reset")
	default:
		took = true
		if w.rnd.Float64() < f.asSlow {
			d += time.Duration(w.rnd.IntN(8000)) * time.Millisecond
		}
	}
	if !op.Deadline.IsZero() && w.now.Add(d).After(op.Deadline) {
		// The client gives up at the deadline; the AS may have taken it.
		d = op.Deadline.Sub(w.now)
		if done.Err == nil {
			done.Err = errors.New("deadline")
		}
	}
	// The AS finishes on its own time; a stalled sender hears of it when
	// it runs again.
	w.at(d, nil, func() {
		if c.send != op || c.dead {
			return
		}
		w.endSend(c, took)
		w.at(0, c.p, func() { w.step(c, done) })
	})
}

// connect connects or drops a websocket AS. A drop fails the send in
// flight at once, the AS having handled it or not; a connection wakes
// the AS's senders, as the hub does.
func (w *world) connect(a *simAS, up bool) {
	if a.connected == up {
		return
	}
	a.connected = up
	w.trace("as %d socket connected=%v", a.key, up)
	for _, p := range w.procs {
		for _, c := range p.all() {
			if c.key != a.key || c.dead {
				continue
			}
			if !up && c.send != nil {
				op := c.send
				w.endSend(c, w.srnd.IntN(2) == 0)
				w.at(0, c.p, func() { w.step(c, core.SendDone{ID: op.ID, Err: errors.New("websocket closed")}) })
			}
			if up && !c.halted {
				w.at(0, c.p, func() { w.step(c, core.Wake{}) })
			}
		}
	}
}

// endSend closes c's send; took: the AS accepted it.
func (w *world) endSend(c *simCore, took bool) {
	op := c.send
	a := w.ases[c.key-1]
	c.send = nil
	if a.open != nil && a.open.p == c.p && a.open.id == op.ID {
		a.open = nil
	}
	if !took || a.took[op.ID] {
		return
	}
	a.took[op.ID] = true
	got := seqsOf(op.Body)
	w.trace("as %d took txn %d %v", c.key, op.ID, got)
	slices.Sort(got)
	n := len(a.accepted)
	a.accepted = append(a.accepted, got...)
	for i, q := range got {
		if n+i >= len(a.history) || a.history[n+i] != q {
			w.failf("as %d: txn %d delivers %v after %d items; the stream there is %v (duplicate, gap or disorder)",
				c.key, op.ID, got, n, a.history[n:min(len(a.history), n+len(got)+2)])
			return
		}
	}
}

// eventsOf counts the items of a body's "events", its first array (the
// simulation's items hold no brackets).
func eventsOf(body []byte) int {
	end := bytes.IndexByte(body, ']')
	if end < 0 {
		return 0
	}
	return bytes.Count(body[:end], []byte(`{"q":`))
}

// seqsOf reads the seqs of a body's items: each item is {"q":N,...}.
func seqsOf(body []byte) []int64 {
	var out []int64
	for i := 0; ; {
		j := bytes.Index(body[i:], []byte(`{"q":`))
		if j < 0 {
			return out
		}
		i += j + 5
		k := i
		for k < len(body) && body[k] >= '0' && body[k] <= '9' {
			k++
		}
		n, _ := strconv.ParseInt(string(body[i:k]), 10, 64)
		out = append(out, n)
		i = k
	}
}

// --- workload and lifecycle ---

func (w *world) appendSome() {
	if len(w.procs) == 0 {
		return
	}
	var entries []txnstore.Entry
	for range 1 + w.rnd.IntN(3) {
		var targets []txnstore.ASKey
		for _, a := range w.ases {
			if r := w.reg[a.key]; r.registered && r.hasURL && w.rnd.IntN(3) > 0 {
				targets = append(targets, a.key)
			}
		}
		if len(targets) == 0 {
			continue
		}
		kind := txnstore.KindEvent
		switch w.rnd.IntN(8) {
		case 0:
			kind = txnstore.KindEphemeral
		case 1:
			kind = txnstore.KindToDevice
		}
		pad := bytes.Repeat([]byte("x"), w.rnd.IntN(3)*w.rnd.IntN(300))
		data := fmt.Appendf(nil, `{"q":%d,"p":"%s"}`, w.store.nextSeq+int64(len(entries)), pad)
		entries = append(entries, txnstore.Entry{Kind: kind, Data: data, Targets: targets})
	}
	p := w.procs[w.rnd.IntN(len(w.procs))]
	if !p.alive || p.now(w).Before(p.stalledUntil) {
		return
	}
	before, _ := w.storeFault(opAppend)
	if before {
		return // refused: nothing stored, nothing acknowledged
	}
	// A fault after the commit refuses the Submit, but the items are
	// stored and the committing process is told, as OnCommit does.
	committed := w.store.append(entries)
	for _, cm := range committed {
		w.trace("%s appends %d for %v", p.name, cm.Item.Seq, cm.Targets)
	}
	byAS := map[txnstore.ASKey][]txnstore.Item{}
	for _, cm := range committed {
		for _, k := range cm.Targets {
			w.ases[k-1].history = append(w.ases[k-1].history, cm.Item.Seq)
			byAS[k] = append(byAS[k], cm.Item)
		}
	}
	p.announced++
	for k := txnstore.ASKey(1); k <= 3; k++ {
		if c := p.cores[k]; c != nil && len(byAS[k]) > 0 {
			w.step(c, core.Committed{Items: byAS[k]})
		}
	}
}

func (p *simProc) now(w *world) time.Time { return w.now }

func (w *world) lifecycle() {
	r := w.rnd
	a := w.ases[r.IntN(len(w.ases))]
	reg := w.reg[a.key]
	op := r.IntN(10)
	w.trace("lifecycle %d on as %d", op, a.key)
	switch op {
	case 0, 1: // reload: remove or re-add
		reg.registered = !reg.registered
		for _, p := range w.procs {
			if reg.registered {
				w.startCore(p, a.key, nil)
			} else if c := p.cores[a.key]; c != nil {
				w.haltCore(c)
			}
		}
	case 2: // url null and back
		reg.hasURL = !reg.hasURL
		w.retarget(a.key)
	case 3: // hs_token changed; the AS follows a little later
		reg.tokenGen++
		gen := reg.tokenGen
		w.retarget(a.key)
		w.at(time.Duration(r.IntN(20000))*time.Millisecond, nil, func() { a.tokenGen = max(a.tokenGen, gen) })
	case 4: // crash and restart
		if len(w.procs) > 0 {
			p := w.procs[r.IntN(len(w.procs))]
			w.crash(p)
			w.at(time.Duration(r.IntN(5000))*time.Millisecond, nil, w.restart)
		}
	case 5: // clean close and restart
		if len(w.procs) > 0 {
			w.closeProc(w.procs[r.IntN(len(w.procs))])
		}
	case 6: // a stall (GC pause, descheduled VM)
		if len(w.procs) > 0 && r.Float64() < w.f.stall {
			p := w.procs[r.IntN(len(w.procs))]
			p.stalledUntil = w.now.Add(time.Duration(r.IntN(int(2*simTTL/time.Millisecond))) * time.Millisecond)
		}
	case 7: // the database clock jumps (within the margin leases keep)
		if r.Float64() < w.f.dbJump {
			w.dbSkew = time.Duration(r.IntN(int(simTTL/5/time.Millisecond)))*time.Millisecond - simTTL/10
		}
	default: // wake
		for _, p := range w.procs {
			if c := p.cores[a.key]; c != nil {
				w.step(c, core.Wake{})
			}
		}
	}
}

func (w *world) retarget(k txnstore.ASKey) {
	for _, p := range w.procs {
		if c := p.cores[k]; c != nil && !c.halted {
			w.step(c, core.Retarget{Target: w.target(k)})
		}
	}
}

// closeProc stops every core of p and, once they are stopped (or a
// deadline aborted them), drops it and starts a new process.
func (w *world) closeProc(p *simProc) {
	if p.closing || !p.alive {
		return
	}
	p.closing = true
	for _, c := range p.all() {
		if !c.halted {
			w.haltCore(c)
		}
	}
	var check func()
	tries := 0
	check = func() {
		tries++
		if tries == 20 {
			for _, c := range p.all() {
				if !c.m.Stopped() {
					w.step(c, core.Abort{})
				}
			}
		}
		for _, c := range p.all() {
			if !c.m.Stopped() {
				if tries < 40 {
					w.at(500*time.Millisecond, p, check)
					return
				}
				w.failf("%s: as %d does not stop: %s", p.name, c.key, c.m)
				return
			}
		}
		w.crash(p) // nothing runs: dropping it loses nothing
		w.at(time.Duration(w.rnd.IntN(3000))*time.Millisecond, nil, w.restart)
	}
	w.at(100*time.Millisecond, p, check)
}

// --- the run ---

func (w *world) run() error {
	w.startProc()
	if w.shared {
		w.startProc()
	}
	faultFor := time.Duration(30+w.rnd.IntN(90)) * time.Second
	nItems := 10 + w.rnd.IntN(50)
	for range nItems {
		w.at(time.Duration(w.rnd.Int64N(int64(faultFor))), nil, w.appendSome)
	}
	for range w.rnd.IntN(12) {
		w.at(time.Duration(w.rnd.Int64N(int64(faultFor))), nil, w.lifecycle)
	}
	for _, a := range w.ases {
		if !a.socket {
			continue
		}
		// Drops, reconnects and replacements (a drop and a connection at
		// once) while faults last.
		for range w.srnd.IntN(8) {
			up := w.srnd.IntN(2) == 0
			w.at(time.Duration(w.srnd.Int64N(int64(faultFor))), nil, func() {
				if up && a.connected { // replaced by a new connection
					w.connect(a, false)
				}
				w.connect(a, up)
			})
		}
	}
	healed := false
	w.at(faultFor, nil, func() { w.heal(); healed = true })
	deadline := w.now.Add(faultFor + 20*time.Minute)
	for w.err == nil {
		if healed && w.drained() {
			break
		}
		if !w.next() || w.now.After(deadline) {
			w.failf("liveness: not drained %v after faults stopped: %s", w.now.Sub(deadline.Add(-20*time.Minute)), w.backlog())
			break
		}
	}
	if w.err != nil {
		return w.err
	}
	for _, a := range w.ases {
		if !slices.Equal(a.accepted, a.history) {
			w.failf("as %d got %v, stream %v", a.key, a.accepted, a.history)
		}
	}
	return w.err
}

// heal stops the faults: everything registered with a url, the tokens
// agreed, no stalls, the clocks agreed, every process up.
func (w *world) heal() {
	w.f = faults{}
	w.dbSkew = 0
	for _, a := range w.ases {
		reg := w.reg[a.key]
		a.tokenGen = reg.tokenGen
		if a.socket {
			w.connect(a, true)
		}
		if !reg.hasURL {
			reg.hasURL = true
			w.retarget(a.key)
		}
		if !reg.registered {
			reg.registered = true
			for _, p := range w.procs {
				w.startCore(p, a.key, nil)
			}
		}
		for _, p := range w.procs {
			if c := p.cores[a.key]; c != nil {
				w.step(c, core.Wake{})
			}
		}
	}
	for _, p := range w.procs {
		p.stalledUntil = time.Time{}
	}
	want := 1
	if w.shared {
		want = 2
	}
	for len(w.procs) < want {
		w.startProc()
	}
}

func (w *world) drained() bool {
	for _, a := range w.ases {
		if w.store.pending(a.key) || len(a.accepted) != len(a.history) {
			return false
		}
	}
	return true
}

func (w *world) backlog() string {
	s := ""
	for _, a := range w.ases {
		m := w.store.ases[a.key]
		s += fmt.Sprintf("\n[as %d: delivered %d, frozen %d, stream %d, accepted %d/%d]", a.key, m.delivered, len(m.frozen), len(m.stream), len(a.accepted), len(a.history))
		for _, p := range w.procs {
			if c := p.cores[a.key]; c != nil {
				s += fmt.Sprintf("\n  %s: %s", p.name, c.m)
			}
		}
	}
	return s
}

// next runs the earliest event or core deadline; false when nothing is
// left to run.
func (w *world) next() bool {
	w.steps++
	if w.steps > 2_000_000 {
		w.failf("livelock: %d steps", w.steps)
		return false
	}
	var due *simCore
	var dueAt time.Time
	for _, p := range w.procs {
		for _, c := range p.all() {
			if c.next.IsZero() {
				continue
			}
			at := c.next
			if at.Before(p.stalledUntil) {
				at = p.stalledUntil
			}
			if due == nil || at.Before(dueAt) {
				due, dueAt = c, at
			}
		}
	}
	if len(w.events) > 0 && (due == nil || !w.events[0].at.After(dueAt)) {
		e := heap.Pop(&w.events).(*simEvent)
		if e.at.After(w.now) {
			w.now = e.at
		}
		if e.p != nil {
			if !e.p.alive {
				return true
			}
			if w.now.Before(e.p.stalledUntil) {
				e.at = e.p.stalledUntil
				heap.Push(&w.events, e)
				return true
			}
		}
		e.fn()
		return true
	}
	if due == nil {
		return false
	}
	if dueAt.After(w.now) {
		w.now = dueAt
	}
	due.next = time.Time{}
	w.step(due, core.Tick{})
	return true
}
