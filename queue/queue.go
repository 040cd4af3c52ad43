package queue

import (
	crand "crypto/rand"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"slices"
	"sync"
	"time"

	"context"

	"github.com/cenkalti/backoff/v4"
	"go.uber.org/zap"

	"github.com/asdispatch/asdispatch/asapi"
	"github.com/asdispatch/asdispatch/queue/internal/core"
	"github.com/asdispatch/asdispatch/txnstore"
)

// Format says how a transaction body is laid out for one AS. It is stored
// with each frozen transaction so that a body rebuilt after a restart is laid
// out exactly as the first one, whatever the registration says by then.
type Format = core.Format

// Format bits.
const (
	// EphemeralStable puts ephemeral items under "ephemeral" (Matrix v1.13).
	EphemeralStable = core.EphemeralStable
	// EphemeralUnstable puts them under "de.sorunome.msc2409.ephemeral" too,
	// for ASes registered with an unstable flag (matrix-appservice-node reads
	// only that key).
	EphemeralUnstable = core.EphemeralUnstable
)

// maxPDUBytes is Matrix's limit on an event's size.
const maxPDUBytes = core.MaxPDUBytes

// AS describes one application service to its sender.
type AS struct {
	ID  string
	Key txnstore.ASKey
	// Target is where transactions go; an empty Target.URL is `url: null`:
	// nothing is sent and the backlog stays paused, kept for when a URL
	// comes back.
	Target asapi.Target
	Format Format
}

// Live is the in-memory state of one sender.
type Live struct {
	Up          bool
	Failures    int
	LastSuccess time.Time
	LastError   string
	NextRetry   time.Time
	// InFlight is the id of the transaction being sent (0 if none).
	InFlight int64
}

// Queues runs one sender per application service on top of a store. Each
// AS has one slot for the life of the Queues: its sender machine and its
// driver, stepped by a shared scheduler, so one AS never has two senders.
type Queues struct {
	store  txnstore.Store
	opts   Options
	client *asapi.Client
	log    *zap.Logger

	// leaser is set when the store is shared: senders then hold a lease.
	leaser txnstore.Leaser
	owner  string

	retry, storeRetry []time.Duration
	seed              uint64

	mu    sync.Mutex
	slots map[txnstore.ASKey]*slot
	// byID finds the slots of an AS id for Wake without a scan of every
	// slot (O(n) per ping at 10,000 ASes): kept by Start, the only writer
	// of a slot's target.
	byID   map[string][]*slot
	closed bool
	wg     sync.WaitGroup // the scheduler's workers
	sched  *sched
	reads  reads

	// OnCommit's grouping, on the store's single committing goroutine:
	// the slots in the order first met, their index there, and their
	// items. Emptied after each call: kept per slot, the buffers held
	// ~150 B for every AS that ever received an item.
	index  map[*slot]int
	order  []*slot
	counts []int
	groups [][]txnstore.Item

	// preload holds recoveries Preload read, for the Start of each AS;
	// the first commit announced afterwards drops them (a machine
	// started from one must get every item committed since as Committed).
	preload map[txnstore.ASKey]txnstore.Recovery
	// announced counts OnCommit calls.
	announced uint64
}

const (
	defaultRetryInitial = 2 * time.Second
	defaultRetryMax     = 512 * time.Second
	defaultMaxItems     = 100
	defaultMaxBytes     = 4 << 20
	// pipelineDepth is how many transactions a sender freezes ahead, the
	// one in flight included: enough that the AS keeps receiving while a
	// commit freezes the next ones (a catch-up freezes what it sent during
	// one commit in the next). An AS takes a 100-event transaction in
	// about 0.2 ms and a commit that also collects delivered items can take
	// tens of ms: 16 ran dry within each. The bodies frozen ahead stay
	// bounded by 4 transactions of MaxBytes (core.readTxns), whatever the
	// depth; at the default caps it is the depth that bounds them (and
	// their items), and that memory is held by every AS with a backlog at
	// once. A catch-up of 1,000,000 events of one AS, quiet machine,
	// alternated: 3.97 and 4.63 s at 64 (peak RSS 81-84 MiB), 3.90 and
	// 3.53 s at 256 (201-203 MiB); on a loaded machine 256 drained faster
	// (2.8-5.1 s against 4.7-10.9 s) but holds about 20 MiB per
	// backlogged AS of 500-byte events against 4.
	pipelineDepth = 64
	// memLimit bounds the items a sender keeps in memory (and memBytes
	// times MaxBytes their size); past it, the sender reads its backlog
	// from the store instead.
	memLimit = 20000
	memBytes = 8

	defaultLeaseTTL     = 10 * time.Second
	defaultPollInterval = 200 * time.Millisecond
)

// New returns Queues sending from store. Feed it the store's commits by
// setting txnstore.Options.OnCommit to OnCommit.
func New(store txnstore.Store, opts Options) *Queues {
	if opts.RetryInitial <= 0 {
		opts.RetryInitial = defaultRetryInitial
	}
	if opts.RetryMax <= 0 {
		opts.RetryMax = defaultRetryMax
	}
	if opts.RetryMax < opts.RetryInitial {
		opts.RetryMax = opts.RetryInitial
	}
	for _, p := range []*int{&opts.MaxEvents, &opts.MaxEphemeral, &opts.MaxToDevice} {
		if *p <= 0 {
			*p = defaultMaxItems
		}
	}
	if opts.MaxBytes <= 0 {
		opts.MaxBytes = defaultMaxBytes
	}
	if opts.Logger == nil {
		opts.Logger = zap.NewNop()
	}
	if opts.LeaseTTL <= 0 {
		opts.LeaseTTL = defaultLeaseTTL
	}
	if opts.PollInterval <= 0 {
		opts.PollInterval = defaultPollInterval
	}
	var rb [8]byte
	_, _ = crand.Read(rb[:])
	owner := opts.Owner
	if owner == "" {
		host, _ := os.Hostname()
		owner = fmt.Sprintf("%s/%d/%s", host, os.Getpid(), hex.EncodeToString(rb[:4]))
	}
	var leaser txnstore.Leaser
	if l, ok := store.(txnstore.Leaser); ok && l.Shared() {
		leaser = l
	}
	client := opts.Client
	if client == nil {
		client = asapi.New(asapi.Options{Logger: opts.Logger})
	}
	q := &Queues{
		store:      store,
		opts:       opts,
		leaser:     leaser,
		owner:      owner,
		client:     client,
		log:        opts.Logger,
		retry:      Schedule(opts.RetryInitial, opts.RetryMax),
		storeRetry: Schedule(50*time.Millisecond, 5*time.Second),
		seed:       binary.LittleEndian.Uint64(rb[:]),
		slots:      make(map[txnstore.ASKey]*slot),
		byID:       make(map[string][]*slot),
		index:      make(map[*slot]int),
	}
	q.sched = newSched(&q.wg)
	q.reads.max = maxReads
	return q
}

// Schedule is the exponential backoff schedule (doubling from initial,
// capped at max) the senders jitter, as cenkalti/backoff computes it.
func Schedule(initial, max time.Duration) []time.Duration {
	b := backoff.NewExponentialBackOff()
	b.InitialInterval = initial
	b.MaxInterval = max
	b.Multiplier = 2
	b.RandomizationFactor = 0 // the machine jitters, from its own source
	b.MaxElapsedTime = 0
	b.Reset()
	var out []time.Duration
	for len(out) < 64 {
		d := b.NextBackOff()
		out = append(out, d)
		if d >= max {
			break
		}
	}
	return out
}

// coreConfig is the machine's configuration for one AS.
func (q *Queues) coreConfig(as AS) core.Config {
	ttl := q.opts.LeaseTTL
	return core.Config{
		Key: as.Key,
		Limits: core.Limits{Events: q.opts.MaxEvents, Ephemeral: q.opts.MaxEphemeral, ToDevice: q.opts.MaxToDevice, Bytes: q.opts.MaxBytes,
			CatchupEvents: q.opts.CatchupMaxEvents},
		Retry:        q.retry,
		RetryMax:     q.opts.RetryMax,
		StoreRetry:   q.storeRetry,
		Shared:       q.leaser != nil,
		LeaseTTL:     ttl,
		AcquireEvery: min(ttl/5, time.Second),
		PollInterval: q.opts.PollInterval,
		SendTimeout:  q.client.TxnTimeout(),
		Depth:        pipelineDepth,
		MemItems:     memLimit,
		MemBytes:     memBytes * q.opts.MaxBytes,
		Log:          q.log,
		ID:           as.ID,
	}
}

// OnCommit hands freshly committed items to the senders of their targets, in
// commit order. It is meant for txnstore.Options.OnCommit.
func (q *Queues) OnCommit(committed []txnstore.Committed) {
	// Two passes: each slot's items counted, then copied into a slice of
	// their own, which the slot keeps.
	q.mu.Lock()
	q.announced++
	q.preload = nil
	for _, c := range committed {
		for _, k := range c.Targets {
			if s := q.slots[k]; s != nil {
				i, ok := q.index[s]
				if !ok {
					i = len(q.order)
					q.index[s] = i
					q.order = append(q.order, s)
					q.counts = append(q.counts, 0)
				}
				q.counts[i]++
			}
		}
	}
	for _, n := range q.counts {
		q.groups = append(q.groups, make([]txnstore.Item, 0, n))
	}
	for _, c := range committed {
		for _, k := range c.Targets {
			if s := q.slots[k]; s != nil {
				i := q.index[s]
				q.groups[i] = append(q.groups[i], c.Item)
			}
		}
	}
	q.mu.Unlock()
	for i, s := range q.order {
		s.post(core.Committed{Items: q.groups[i]})
		q.groups[i] = nil
	}
	clear(q.index)
	q.order, q.counts, q.groups = q.order[:0], q.counts[:0], q.groups[:0]
}

// Start starts the sender of as, or updates a running one (a changed URL,
// token or format is used from its next attempt, which happens at once).
func (q *Queues) Start(as AS) {
	q.mu.Lock()
	defer q.mu.Unlock()
	if q.closed {
		return
	}
	s := q.slots[as.Key]
	if s == nil {
		s = newSlot(q, as)
		q.slots[as.Key] = s
		q.byID[as.ID] = append(q.byID[as.ID], s)
	} else if old := s.target().ID; old != as.ID {
		q.byID[old] = slices.DeleteFunc(q.byID[old], func(o *slot) bool { return o == s })
		if len(q.byID[old]) == 0 {
			delete(q.byID, old)
		}
		q.byID[as.ID] = append(q.byID[as.ID], s)
	}
	var rec *core.RecoverDone
	if r, ok := q.preload[as.Key]; ok {
		delete(q.preload, as.Key)
		rec = &core.RecoverDone{Frozen: r.Frozen, Delivered: r.Delivered, End: r.End, HasEnd: true}
	}
	s.start(as, rec)
}

// Preload reads the recovery of every AS in one query, for the Starts
// that follow (at a process's start, where each sender would otherwise
// ask the store on its own: 10,000 queries, then a read each). A commit
// announced to OnCommit afterwards drops what is left: a sender started
// from a recovery must learn of every item committed since from OnCommit.
// It does nothing on a shared store, whose senders recover once they hold
// their lease, or on a store that is not a txnstore.Recoverer.
func (q *Queues) Preload(ctx context.Context) error {
	rs, ok := q.store.(txnstore.Recoverer)
	if !ok || q.leaser != nil {
		return nil
	}
	q.mu.Lock()
	before := q.announced
	q.mu.Unlock()
	recs, err := rs.RecoverAll(ctx)
	if err != nil {
		return fmt.Errorf("queue: preload: %w", err)
	}
	q.mu.Lock()
	defer q.mu.Unlock()
	if q.announced == before && !q.closed {
		q.preload = recs
	}
	return nil
}

// Stop stops the sender of key, leaving its queue in the store. A send in
// flight finishes or is abandoned by ctx; its transaction stays frozen.
func (q *Queues) Stop(ctx context.Context, key txnstore.ASKey) error {
	return q.Halt(key)(ctx)
}

// Halt is Stop in two steps: the stop is ordered now, before any later
// Start of the same AS, and wait waits for it. A Start before the stop
// completes resumes the same sender: an AS never has two.
func (q *Queues) Halt(key txnstore.ASKey) (wait func(context.Context) error) {
	q.mu.Lock()
	s := q.slots[key]
	q.mu.Unlock()
	if s == nil {
		return func(context.Context) error { return nil }
	}
	return s.halt()
}

// Wake makes the sender of the AS with this id retry at once, if it is
// waiting out a backoff.
func (q *Queues) Wake(id string) {
	q.mu.Lock()
	defer q.mu.Unlock()
	for _, s := range q.byID[id] {
		s.post(core.Wake{})
	}
}

// Live returns the in-memory state of the sender of key. On a shared store
// only the process holding the AS's lease has one: the others know no more
// than the store.
func (q *Queues) Live(key txnstore.ASKey) (Live, bool) {
	q.mu.Lock()
	s := q.slots[key]
	q.mu.Unlock()
	if s == nil {
		return Live{}, false
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if !s.running || !s.live.Leading {
		return Live{}, false
	}
	l := s.live
	return Live{Up: l.Up, Failures: l.Failures, LastSuccess: l.LastSuccess, LastError: l.LastError,
		NextRetry: l.NextRetry, InFlight: l.InFlight}, true
}

// Close stops every sender, those a Reload is still stopping included: no
// new transaction is started, sends in flight finish unless ctx ends first.
// Their transactions stay frozen in the store either way and are resent
// with the same id after a restart. When Close returns, no sender touches
// the store any more, and the client's idle connections are closed (each
// holds a goroutine and buffers on both ends, until IdleConnTimeout).
func (q *Queues) Close(ctx context.Context) error {
	q.mu.Lock()
	q.closed = true
	q.preload = nil
	slots := make([]*slot, 0, len(q.slots))
	for _, s := range q.slots {
		slots = append(slots, s)
	}
	q.mu.Unlock()
	// Every stop is ordered before any is waited for: they run together.
	waits := make([]func(context.Context) error, len(slots))
	for i, s := range slots {
		waits[i] = s.halt()
	}
	var errs []error
	for _, wait := range waits {
		if err := wait(ctx); err != nil {
			errs = append(errs, err)
		}
	}
	for _, s := range slots {
		s.quit()
	}
	q.sched.close()
	q.wg.Wait()
	q.client.CloseIdleConnections()
	return errors.Join(errs...)
}

// Owner is the name this process holds sender leases under.
func (q *Queues) Owner() string { return q.owner }

func (q *Queues) newRand(key txnstore.ASKey) *rand.Rand {
	return rand.New(rand.NewPCG(q.seed, uint64(key)))
}
