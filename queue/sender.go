package queue

import (
	"context"
	"errors"
	"strconv"
	"sync"
	"time"

	"go.uber.org/zap"

	"github.com/asdispatch/asdispatch/asapi"
	"github.com/asdispatch/asdispatch/queue/internal/core"
	"github.com/asdispatch/asdispatch/txnstore"
)

// slot drives one AS's machine: one goroutine feeds it inputs and carries
// out what it asks for. Store calls and the send run in short-lived
// goroutines that post their results back; the machine decides everything
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
	signal   chan struct{}
	done     chan struct{}
}

func newSlot(q *Queues, as AS) *slot {
	return &slot{q: q, key: as.Key, as: as, signal: make(chan struct{}, 1), done: make(chan struct{})}
}

func (s *slot) post(in core.Input) {
	s.mu.Lock()
	s.inbox = append(s.inbox, in)
	s.mu.Unlock()
	s.poke()
}

func (s *slot) poke() {
	select {
	case s.signal <- struct{}{}:
	default:
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

func (s *slot) start(as AS) {
	s.mu.Lock()
	s.as = as
	s.running = true
	s.inbox = append(s.inbox, core.Start{Target: machineTarget(as)})
	s.mu.Unlock()
	s.poke()
}

// halt asks the machine to stop, in order with start, and returns a wait
// that returns once it has stopped (or was started again), or when ctx
// ends: then the send in flight and queued writes are abandoned.
func (s *slot) halt() func(context.Context) error {
	ch := make(chan struct{})
	s.mu.Lock()
	s.waiters = append(s.waiters, ch)
	s.inbox = append(s.inbox, core.Stop{})
	s.mu.Unlock()
	s.poke()
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

// quit ends the slot's goroutine once its machine is stopped.
func (s *slot) quit() {
	s.mu.Lock()
	s.quitting = true
	s.mu.Unlock()
	s.poke()
	<-s.done
}

// run is the slot's goroutine.
func (s *slot) run() {
	defer s.q.wg.Done()
	defer close(s.done)
	m := core.New(s.q.coreConfig(s.target()), s.q.newRand(s.key))
	var ops sync.WaitGroup
	defer ops.Wait()
	d := &driver{slot: s, m: m, ops: &ops}
	d.ctx, d.cancel = context.WithCancel(context.Background())
	defer func() { d.cancel() }()
	timer := time.NewTimer(time.Hour)
	timer.Stop()
	var inbox []core.Input
	for {
		s.mu.Lock()
		inbox, s.inbox = s.inbox, inbox[:0]
		quitting := s.quitting
		s.mu.Unlock()
		now := time.Now()
		started := false
		for _, in := range inbox {
			switch in.(type) {
			case core.Abort:
				// Abandon the ops in flight; answers still come back.
				d.cancel()
			case core.Start:
				started = true
				if d.ctx.Err() != nil {
					d.ctx, d.cancel = context.WithCancel(context.Background())
				}
			}
			m.Step(now, in)
		}
		clear(inbox)
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
		s.mu.Unlock()
		for _, ch := range release {
			close(ch)
		}
		if quitting && stopped {
			return
		}
		timer.Stop()
		if !r.Next.IsZero() {
			timer.Reset(time.Until(r.Next))
		}
		select {
		case <-s.signal:
		case <-timer.C:
		}
	}
}

// driver carries out a machine's Ready against the store and the AS.
type driver struct {
	*slot
	m      *core.Sender
	ops    *sync.WaitGroup
	ctx    context.Context // ends on Abort
	cancel context.CancelFunc

	sendMu     sync.Mutex
	cancelSend context.CancelFunc
	aborted    bool
}

func (d *driver) async(f func() core.Input) {
	d.ops.Add(1)
	go func() {
		defer d.ops.Done()
		d.post(f())
	}()
}

func (d *driver) carryOut(r core.Ready) {
	q, key, ctx := d.q, d.key, d.ctx
	if r.Recover != nil {
		tok := r.Recover.Tok
		d.async(func() core.Input {
			frozen, err := q.store.Frozen(ctx, key)
			if err != nil {
				return core.RecoverDone{Tok: tok, Err: err}
			}
			delivered, err := q.store.Delivered(ctx, key)
			return core.RecoverDone{Tok: tok, Frozen: frozen, Delivered: delivered, Err: err}
		})
	}
	if op := r.Read; op != nil {
		d.async(func() core.Input {
			items, err := d.read(ctx, op)
			return core.ReadDone{Tok: op.Tok, Items: items, Err: err}
		})
	}
	if op := r.Freeze; op != nil {
		d.async(func() core.Input {
			ids, err := q.store.Freeze(ctx, key, op.Replace, op.Txns)
			return core.FreezeDone{Tok: op.Tok, IDs: ids, Err: err}
		})
	}
	for _, w := range r.Writes {
		d.async(func() core.Input { return core.WriteDone{Tok: w.Tok, Err: d.write(ctx, w)} })
	}
	if op := r.Lease; op != nil {
		d.async(func() core.Input { return d.lease(ctx, op) })
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
	base := d.ctx
	ctx, cancel := context.WithCancel(base)
	if !op.Deadline.IsZero() {
		ctx, cancel = context.WithDeadline(base, op.Deadline)
	}
	d.sendMu.Lock()
	d.cancelSend, d.aborted = cancel, false
	d.sendMu.Unlock()
	d.async(func() core.Input {
		err := d.q.client.PutTransaction(ctx, as.Target, strconv.FormatInt(op.ID, 10), op.Body)
		d.sendMu.Lock()
		aborted := d.aborted || base.Err() != nil
		d.cancelSend = nil
		d.sendMu.Unlock()
		cancel()
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
		return done
	})
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
