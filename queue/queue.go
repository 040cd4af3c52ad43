package queue

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"math"
	"os"
	"sync"
	"time"

	"go.uber.org/zap"

	"github.com/asdispatch/asdispatch/asapi"
	"github.com/asdispatch/asdispatch/txnstore"
)

// AS describes one application service to its sender.
type AS struct {
	ID  string
	Key txnstore.ASKey
	// Target is where transactions go; an empty Target.URL is `url: null`:
	// nothing is sent and pending transactions count as delivered.
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

// Queues runs one sender per application service on top of a store.
type Queues struct {
	store  txnstore.Store
	opts   Options
	client *asapi.Client
	log    *zap.Logger

	// leaser is set when the store is shared: senders then hold a lease.
	leaser txnstore.Leaser
	owner  string

	mu       sync.Mutex
	senders  map[txnstore.ASKey]*sender
	stopping map[txnstore.ASKey]*sender
	closed   bool

	// scratch is OnCommit's per-sender grouping; OnCommit runs on the
	// store's single committing goroutine.
	scratch map[*sender][]txnstore.Item
}

const (
	defaultRetryInitial = 2 * time.Second
	defaultRetryMax     = 512 * time.Second
	defaultMaxItems     = 100
	defaultMaxBytes     = 4 << 20
	// pipelineDepth is how many transactions a sender freezes ahead of the
	// one in flight: enough to keep one commit in flight while the AS works.
	pipelineDepth = 4
	// memLimit bounds the items a sender keeps in memory; past it, the
	// sender reads its backlog from the store instead.
	memLimit = 20000

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
	owner := opts.Owner
	if owner == "" {
		host, _ := os.Hostname()
		b := make([]byte, 4)
		_, _ = rand.Read(b)
		owner = fmt.Sprintf("%s/%d/%s", host, os.Getpid(), hex.EncodeToString(b))
	}
	var leaser txnstore.Leaser
	if l, ok := store.(txnstore.Leaser); ok && l.Shared() {
		leaser = l
	}
	client := opts.Client
	if client == nil {
		client = asapi.New(asapi.Options{Logger: opts.Logger})
	}
	return &Queues{
		store:    store,
		opts:     opts,
		leaser:   leaser,
		owner:    owner,
		client:   client,
		log:      opts.Logger,
		senders:  make(map[txnstore.ASKey]*sender),
		stopping: make(map[txnstore.ASKey]*sender),
		scratch:  make(map[*sender][]txnstore.Item),
	}
}

// OnCommit hands freshly committed items to the senders of their targets, in
// commit order. It is meant for txnstore.Options.OnCommit.
func (q *Queues) OnCommit(committed []txnstore.Committed) {
	q.mu.Lock()
	for _, c := range committed {
		for _, k := range c.Targets {
			if s := q.senders[k]; s != nil {
				q.scratch[s] = append(q.scratch[s], c.Item)
			}
		}
	}
	q.mu.Unlock()
	for s, items := range q.scratch {
		if len(items) > 0 {
			s.push(items)
			q.scratch[s] = items[:0]
		}
	}
}

// Start starts the sender of as, or updates a running one (a changed URL,
// token or format is used from its next attempt, which happens at once).
func (q *Queues) Start(as AS) {
	q.mu.Lock()
	defer q.mu.Unlock()
	if q.closed {
		return
	}
	if s := q.senders[as.Key]; s != nil {
		s.as.Store(&as)
		s.poke(s.wake)
		return
	}
	s := newSender(q, as)
	// A sender of the same AS that is still stopping must finish first: one
	// transaction in flight per AS, and one writer of its frozen set.
	s.predecessor = q.stopping[as.Key]
	q.senders[as.Key] = s
	go s.run()
}

// Stop stops the sender of key, leaving its queue in the store. A send in
// flight finishes or is abandoned by ctx; its transaction stays frozen.
func (q *Queues) Stop(ctx context.Context, key txnstore.ASKey) error {
	q.mu.Lock()
	s := q.senders[key]
	delete(q.senders, key)
	if s != nil {
		q.stopping[key] = s
	}
	q.mu.Unlock()
	if s == nil {
		return nil
	}
	err := s.stop(ctx)
	q.mu.Lock()
	if q.stopping[key] == s {
		delete(q.stopping, key)
	}
	q.mu.Unlock()
	return err
}

// Wake makes the sender of the AS with this id retry at once, if it is
// waiting out a backoff.
func (q *Queues) Wake(id string) {
	q.mu.Lock()
	defer q.mu.Unlock()
	for _, s := range q.senders {
		if s.as.Load().ID == id {
			s.poke(s.wake)
		}
	}
}

// Live returns the in-memory state of the sender of key. On a shared store
// only the process holding the AS's lease has one: the others know no more
// than the store.
func (q *Queues) Live(key txnstore.ASKey) (Live, bool) {
	q.mu.Lock()
	s := q.senders[key]
	q.mu.Unlock()
	if s == nil || (q.leaser != nil && !s.leading.Load()) {
		return Live{}, false
	}
	s.liveMu.Lock()
	defer s.liveMu.Unlock()
	return s.live, true
}

// Close stops every sender: no new transaction is started, sends in flight
// finish unless ctx ends first. Their transactions stay frozen in the store
// either way and are resent with the same id after a restart.
func (q *Queues) Close(ctx context.Context) error {
	q.mu.Lock()
	q.closed = true
	senders := make([]*sender, 0, len(q.senders))
	for k, s := range q.senders {
		senders = append(senders, s)
		delete(q.senders, k)
	}
	q.mu.Unlock()
	var errs []error
	var mu sync.Mutex
	var wg sync.WaitGroup
	for _, s := range senders {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := s.stop(ctx); err != nil {
				mu.Lock()
				errs = append(errs, err)
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	return errors.Join(errs...)
}

// acquireEvery is how often a process that does not send for an AS tries
// to take its lease: a dead owner is replaced within ttl plus this.
func (q *Queues) acquireEvery() time.Duration {
	return min(q.opts.LeaseTTL/5, time.Second)
}

// Owner is the name this process holds sender leases under.
func (q *Queues) Owner() string { return q.owner }

func (q *Queues) limits() limits {
	return limits{events: q.opts.MaxEvents, ephemeral: q.opts.MaxEphemeral, toDevice: q.opts.MaxToDevice, bytes: q.opts.MaxBytes}
}

// unknown marks a sender's memory as not known to be complete.
const unknown = math.MaxInt64
