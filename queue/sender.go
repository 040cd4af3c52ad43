package queue

import (
	"context"
	"errors"
	"slices"
	"strconv"
	"sync"
	"time"

	"go.uber.org/zap"

	"github.com/asdispatch/asdispatch/asapi"
	"github.com/asdispatch/asdispatch/queue/internal/core"
	"github.com/asdispatch/asdispatch/txnstore"
)

// slot is one AS's machine and what drives it. Idle, it is only this
// struct: the Queues' scheduler steps it on a worker when it has inputs or
// a deadline passes, and store calls and the send run in short-lived
// goroutines that post their results back. The machine decides everything
// else.
type slot struct {
	q   *Queues
	key txnstore.ASKey

	mu      sync.Mutex
	inbox   []core.Input
	as      AS
	live    core.Live
	running bool // started and not stopped since
	// waiters are Stop calls waiting for the machine to stop (or to be
	// started again).
	waiters  []chan struct{}
	quitting bool
	// scheduled: on the ready queue or being stepped; inputs posted
	// meanwhile are seen before the slot leaves the worker.
	scheduled bool
	kicked    bool // step even without inputs (a deadline, a quit)
	finished  bool // quit: stopped for good, inputs are dropped
	done      chan struct{}

	// Owned by the scheduler (under its lock).
	hidx int
	due  time.Time

	// Owned by the worker stepping the slot.
	d     *driver
	batch []core.Input
}

func newSlot(q *Queues, as AS) *slot {
	s := &slot{q: q, key: as.Key, as: as, done: make(chan struct{}), hidx: -1}
	s.d = &driver{slot: s, m: core.New(q.coreConfig(as), q.newRand(as.Key))}
	return s
}

func (s *slot) post(in core.Input) {
	s.mu.Lock()
	if s.finished {
		s.mu.Unlock()
		return
	}
	s.inbox = append(s.inbox, in)
	s.scheduleLocked()
}

// kick has the slot stepped even without an input.
func (s *slot) kick() {
	s.mu.Lock()
	if s.finished {
		s.mu.Unlock()
		return
	}
	s.kicked = true
	s.scheduleLocked()
}

// scheduleLocked puts the slot on the ready queue unless it is there or
// being stepped, and unlocks s.mu.
func (s *slot) scheduleLocked() {
	enqueue := !s.scheduled
	s.scheduled = true
	s.mu.Unlock()
	if enqueue {
		s.q.sched.enqueue(s)
	}
}

func (s *slot) target() AS {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.as
}

func machineTarget(as AS) core.Target {
	return core.Target{HasURL: as.Target.URL != "", Format: as.Format}
}

// start starts the machine; rec, if not nil, is its recovery read
// before any commit since was announced (Queues.Preload).
func (s *slot) start(as AS, rec *core.RecoverDone) {
	s.mu.Lock()
	s.as = as
	s.running = true
	s.inbox = append(s.inbox, core.Start{Target: machineTarget(as), Recovered: rec})
	s.scheduleLocked()
}

// halt asks the machine to stop, in order with start, and returns a wait
// that returns once it has stopped (or was started again), or when ctx
// ends: then the send in flight and queued writes are abandoned.
func (s *slot) halt() func(context.Context) error {
	ch := make(chan struct{})
	s.mu.Lock()
	if s.finished {
		// Closed: stopped for good.
		s.mu.Unlock()
		return func(context.Context) error { return nil }
	}
	s.waiters = append(s.waiters, ch)
	s.inbox = append(s.inbox, core.Stop{})
	s.scheduleLocked()
	return func(ctx context.Context) error {
		select {
		case <-ch:
			return nil
		case <-ctx.Done():
		}
		s.post(core.Abort{})
		<-ch
		return ctx.Err()
	}
}

// quit retires the slot once its machine is stopped, and waits for its ops
// in flight to end.
func (s *slot) quit() {
	s.mu.Lock()
	s.quitting = true
	s.mu.Unlock()
	s.kick()
	<-s.done
	s.d.ops.Wait()
}

// step feeds the machine what was posted, carries out its Ready and
// reschedules it: the scheduler's workers call it, one at a time per slot.
// Inputs posted meanwhile put it back at the end of the ready queue, so a
// busy AS does not hold a worker from the others.
func (s *slot) step() {
	d, m := s.d, s.d.m
	{
		s.mu.Lock()
		if s.finished {
			s.inbox, s.kicked, s.scheduled = nil, false, false
			s.mu.Unlock()
			return
		}
		s.batch, s.inbox = s.inbox, s.batch[:0]
		s.kicked = false
		quitting := s.quitting
		s.mu.Unlock()

		now := time.Now()
		started := false
		for _, in := range s.batch {
			switch in.(type) {
			case core.Abort:
				// Abandon the ops in flight; answers still come back.
				d.abortOps()
			case core.Start:
				started = true
				d.reviveOps()
			}
			m.Step(now, in)
		}
		clear(s.batch)
		if cap(s.batch) > 64 {
			s.batch = nil // a burst's buffer is not kept while idle
		}
		m.Step(now, core.Tick{})
		r := m.Ready()
		d.carryOut(r)
		stopped := m.Stopped()
		s.mu.Lock()
		if stopped {
			s.running = false
		}
		var release []chan struct{}
		if stopped || started {
			release, s.waiters = s.waiters, nil
		}
		finish := quitting && stopped
		if finish {
			s.finished = true
		}
		s.mu.Unlock()
		for _, ch := range release {
			close(ch)
		}
		if finish {
			d.abortOps()
			s.q.sched.setDeadline(s, time.Time{})
			close(s.done)
		} else {
			s.q.sched.setDeadline(s, r.Next)
		}
	}
	s.mu.Lock()
	if s.finished {
		s.inbox, s.kicked = nil, false
	}
	if len(s.inbox) > 0 || s.kicked {
		s.mu.Unlock()
		s.q.sched.enqueue(s)
		return
	}
	s.scheduled = false
	s.mu.Unlock()
}

// driver carries out a machine's Ready against the store and the AS.
type driver struct {
	*slot
	m   *core.Sender
	ops sync.WaitGroup

	// Each op in flight has a context of its own, cancelled on Abort. One
	// context for the AS's life grew a children map (go-sqlite3 watches the
	// context of every query) and a done channel with its first store
	// call, ~450 bytes an AS kept for good.
	opMu      sync.Mutex
	opsDead   bool // aborted: ops start cancelled until the next Start
	opSeq     uint64
	opCancels []opCancel

	sendMu     sync.Mutex
	cancelSend context.CancelFunc
	aborted    bool
}

type opCancel struct {
	seq    uint64
	cancel context.CancelFunc
}

// opContext returns the context of an op and the func to call once it
// ended.
func (d *driver) opContext() (context.Context, func()) {
	ctx, cancel := context.WithCancel(context.Background())
	d.opMu.Lock()
	if d.opsDead {
		d.opMu.Unlock()
		cancel()
		return ctx, func() {}
	}
	d.opSeq++
	seq := d.opSeq
	d.opCancels = append(d.opCancels, opCancel{seq, cancel})
	d.opMu.Unlock()
	return ctx, func() {
		d.opMu.Lock()
		for i, c := range d.opCancels {
			if c.seq == seq {
				d.opCancels = slices.Delete(d.opCancels, i, i+1)
				break
			}
		}
		if len(d.opCancels) == 0 {
			d.opCancels = nil
		}
		d.opMu.Unlock()
		cancel()
	}
}

// abortOps cancels the ops in flight and those started until reviveOps.
func (d *driver) abortOps() {
	d.opMu.Lock()
	cancels := d.opCancels
	d.opsDead, d.opCancels = true, nil
	d.opMu.Unlock()
	for _, c := range cancels {
		c.cancel()
	}
}

func (d *driver) reviveOps() {
	d.opMu.Lock()
	d.opsDead = false
	d.opMu.Unlock()
}

// async runs f on a goroutine of its own and posts what it returns.
func (d *driver) async(f func(ctx context.Context) core.Input) {
	ctx, done := d.opContext()
	d.ops.Add(1)
	go func() {
		defer d.ops.Done()
		in := f(ctx)
		done()
		d.post(in)
	}()
}

// asyncRead is async for a store read: it waits its turn among the
// reads of every AS (see maxReads).
func (d *driver) asyncRead(f func(ctx context.Context) core.Input) {
	ctx, done := d.opContext()
	d.ops.Add(1)
	d.q.reads.do(func() {
		defer d.ops.Done()
		in := f(ctx)
		done()
		d.post(in)
	})
}

func (d *driver) carryOut(r core.Ready) {
	q, key := d.q, d.key
	if r.Recover != nil {
		tok := r.Recover.Tok
		d.asyncRead(func(ctx context.Context) core.Input {
			if rs, ok := q.store.(txnstore.Recoverer); ok {
				// One query, and the stream's end: an AS with nothing
				// past its cursor reads nothing more.
				rec, err := rs.Recover(ctx, key)
				return core.RecoverDone{Tok: tok, Frozen: rec.Frozen, Delivered: rec.Delivered, End: rec.End, HasEnd: err == nil, Err: err}
			}
			frozen, err := q.store.Frozen(ctx, key)
			if err != nil {
				return core.RecoverDone{Tok: tok, Err: err}
			}
			delivered, err := q.store.Delivered(ctx, key)
			return core.RecoverDone{Tok: tok, Frozen: frozen, Delivered: delivered, Err: err}
		})
	}
	if op := r.Read; op != nil {
		d.asyncRead(func(ctx context.Context) core.Input {
			items, err := d.read(ctx, op)
			return core.ReadDone{Tok: op.Tok, Items: items, Err: err}
		})
	}
	writes, combined := r.Writes, false
	if op := r.Freeze; op != nil && len(writes) == 1 && writes[0].Complete != nil {
		if cf, ok := q.store.(completeFreezer); ok {
			// One commit, one fsync, for both.
			w := writes[0]
			writes, combined = nil, true
			d.async(func(ctx context.Context) core.Input {
				ids, cerr, ferr := cf.CompleteFreeze(ctx, key, w.Complete, op.Replace, op.Txns)
				d.post(core.WriteDone{Tok: w.Tok, Err: cerr})
				return core.FreezeDone{Tok: op.Tok, IDs: ids, Err: ferr}
			})
		}
	}
	if op := r.Freeze; op != nil && !combined {
		d.async(func(ctx context.Context) core.Input {
			ids, err := q.store.Freeze(ctx, key, op.Replace, op.Txns)
			return core.FreezeDone{Tok: op.Tok, IDs: ids, Err: err}
		})
	}
	for _, w := range writes {
		d.async(func(ctx context.Context) core.Input { return core.WriteDone{Tok: w.Tok, Err: d.write(ctx, w)} })
	}
	if op := r.Lease; op != nil {
		d.async(func(ctx context.Context) core.Input { return d.lease(ctx, op) })
	}
	if r.CancelSend {
		d.sendMu.Lock()
		if d.cancelSend != nil {
			d.aborted = true
			d.cancelSend()
		}
		d.sendMu.Unlock()
	}
	if op := r.Send; op != nil {
		d.send(op)
	}
	if r.Live != nil {
		d.mu.Lock()
		d.live = *r.Live
		d.mu.Unlock()
	}
	if len(r.Notes) > 0 {
		d.notes(r.Notes)
	}
}

// read is the one place the sender reads its stream.
func (d *driver) read(ctx context.Context, op *core.ReadOp) ([]txnstore.Item, error) {
	return d.q.store.Read(ctx, d.key, op.After, op.MaxItems, op.MaxBytes)
}

// completeFreezer is a store that records completions and freezes the
// next transactions in one commit.
type completeFreezer interface {
	CompleteFreeze(ctx context.Context, as txnstore.ASKey, complete []int64, replace int64, txns []txnstore.Txn) (ids []int64, completeErr, freezeErr error)
}

// manyCompleter is a store that records several completions in one write.
type manyCompleter interface {
	CompleteMany(ctx context.Context, as txnstore.ASKey, ids []int64) error
}

func (d *driver) write(ctx context.Context, w core.WriteOp) error {
	st := d.q.store
	switch {
	case w.SaveBody != nil:
		return st.SaveBody(ctx, d.key, w.SaveBody.ID, w.SaveBody.Body)
	case w.State != nil:
		return st.SetState(ctx, d.key, *w.State)
	}
	if mc, ok := st.(manyCompleter); ok && len(w.Complete) > 1 {
		return mc.CompleteMany(ctx, d.key, w.Complete)
	}
	for _, id := range w.Complete {
		if err := st.Complete(ctx, d.key, id); err != nil {
			return err
		}
	}
	return nil
}

func (d *driver) lease(ctx context.Context, op *core.LeaseOp) core.Input {
	q := d.q
	ttl := q.opts.LeaseTTL
	switch op.Kind {
	case core.Acquire, core.Renew:
		ctx, cancel := context.WithTimeout(ctx, ttl/2)
		defer cancel()
		f := q.leaser.Acquire
		if op.Kind == core.Renew {
			f = q.leaser.Renew
		}
		ok, err := f(ctx, d.key, q.owner, op.TTL)
		return core.LeaseDone{Tok: op.Tok, OK: ok, Err: err}
	default:
		// Another process may take over at once instead of after the
		// ttl; Release runs even after an abort.
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		err := q.leaser.Release(ctx, d.key, q.owner)
		if err != nil {
			d.q.log.Warn("releasing the sender lease failed; another process takes over when it expires",
				zap.String("appservice", d.target().ID), zap.Error(err))
		}
		return core.LeaseDone{Tok: op.Tok, OK: err == nil, Err: err}
	}
}

func (d *driver) send(op *core.SendOp) {
	as := d.target()
	base, opDone := d.opContext()
	var ctx context.Context
	var cancel context.CancelFunc
	if op.Deadline.IsZero() {
		ctx, cancel = context.WithCancel(base)
	} else {
		ctx, cancel = context.WithDeadline(base, op.Deadline)
	}
	d.sendMu.Lock()
	d.cancelSend, d.aborted = cancel, false
	d.sendMu.Unlock()
	d.ops.Add(1)
	go func() {
		defer d.ops.Done()
		err := d.q.client.PutTransaction(ctx, as.Target, strconv.FormatInt(op.ID, 10), op.Body)
		d.sendMu.Lock()
		aborted := d.aborted || base.Err() != nil
		d.cancelSend = nil
		d.sendMu.Unlock()
		cancel()
		opDone()
		done := core.SendDone{ID: op.ID, Err: err}
		if err != nil {
			done.Aborted = aborted && ctx.Err() != nil
			var se *asapi.StatusError
			if errors.As(err, &se) {
				done.Status, done.RetryAfter = se.Status, se.RetryAfter
			}
			done.TooLarge = errors.Is(err, asapi.ErrTooLarge)
			done.TokenMismatch = errors.Is(err, asapi.ErrTokenMismatch)
		}
		d.post(done)
	}()
}

func (d *driver) notes(notes []core.Note) {
	m := d.q.opts.Metrics
	id := d.target().ID
	for _, n := range notes {
		switch n.Kind {
		case core.NoteSent:
			m.TxnSent(id, n.Took, n.Events, n.Ephemeral, n.ToDevice)
			m.State(id, true, 0)
		case core.NoteFailed:
			m.TxnFailed(id)
			m.State(id, false, n.Failures)
		case core.NoteDropped:
			m.Dropped(id, n.Events)
			m.State(id, true, 0)
		case core.NoteBroken:
			m.TxnFailed(id)
			m.State(id, false, max(n.Failures, 1))
		}
	}
}
