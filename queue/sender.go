package queue

import (
	"context"
	"errors"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/cenkalti/backoff/v4"
	"go.uber.org/zap"

	"github.com/asdispatch/asdispatch/asapi"
	"github.com/asdispatch/asdispatch/txnstore"
)

// txn is a frozen transaction ready to send.
type txn struct {
	txnstore.Txn
	items []txnstore.Item
	body  []byte
	saved bool // body stored in the txnstore
}

// sender delivers one AS's stream. Three goroutines: build freezes
// transactions ahead into ready, run sends them one at a time, and storeOps
// applies completions and state changes in order without holding up run.
//
// On a shared store the sender works in terms: it sends only while its
// process holds the AS's lease, and a term ends (every goroutine of it
// stopped) when the lease is lost or cannot be renewed in time.
type sender struct {
	q   *Queues
	key txnstore.ASKey
	as  atomic.Pointer[AS]
	log *zap.Logger

	mu            sync.Mutex
	mem           []txnstore.Item // items pushed by OnCommit, seq ascending
	completeAfter int64           // mem holds every item with seq > completeAfter
	overflows     uint64

	signal chan struct{} // new items
	wake   chan struct{} // retry now
	sent   chan struct{} // a transaction was delivered
	// sending is set while run delivers a transaction.
	sending atomic.Bool

	liveMu    sync.Mutex
	live      Live
	downSince time.Time

	// ops is the current term's storeOps queue; only run's goroutine uses it.
	ops chan storeOp
	// lost ends the current term; nil without leases.
	lost func()
	// leading is set while this process holds the AS's lease.
	leading atomic.Bool

	buildCtx   context.Context // ends on stop: no new transactions
	stopBuild  context.CancelFunc
	sendCtx    context.Context // ends when stop's ctx ends: abandon the send in flight
	cancelSend context.CancelFunc
	done       chan struct{}
	// predecessor, if set, is a stopping sender of the same AS to wait for.
	predecessor *sender
}

func newSender(q *Queues, as AS) *sender {
	s := &sender{
		q:             q,
		key:           as.Key,
		log:           q.log.With(zap.String("appservice", as.ID)),
		completeAfter: unknown,
		signal:        make(chan struct{}, 1),
		wake:          make(chan struct{}, 1),
		sent:          make(chan struct{}, 1),
		done:          make(chan struct{}),
		live:          Live{Up: true},
	}
	s.as.Store(&as)
	s.buildCtx, s.stopBuild = context.WithCancel(context.Background())
	s.sendCtx, s.cancelSend = context.WithCancel(context.Background())
	return s
}

func (s *sender) poke(ch chan struct{}) {
	select {
	case ch <- struct{}{}:
	default:
	}
}

// push appends committed items to the sender's memory. On a shared store
// memory is never complete (other processes commit too): the sender reads
// the store and push only wakes it.
func (s *sender) push(items []txnstore.Item) {
	if s.q.leaser != nil {
		s.poke(s.signal)
		return
	}
	s.mu.Lock()
	if len(s.mem)+len(items) > memLimit {
		// The AS is far behind: forget, and read the backlog from the store.
		s.mem = nil
		s.completeAfter = unknown
		s.overflows++
	} else {
		s.mem = append(s.mem, items...)
	}
	s.mu.Unlock()
	s.poke(s.signal)
}

func (s *sender) stop(ctx context.Context) error {
	s.stopBuild()
	select {
	case <-s.done:
		return nil
	case <-ctx.Done():
		s.cancelSend()
		<-s.done
		return ctx.Err()
	}
}

func (s *sender) run() {
	defer close(s.done)
	if p := s.predecessor; p != nil {
		select {
		case <-p.done:
		case <-s.buildCtx.Done():
			return
		}
		s.predecessor = nil
	}
	if s.q.leaser == nil {
		s.term(s.buildCtx, s.sendCtx)
		return
	}
	for {
		since, ok := s.acquire()
		if !ok {
			return
		}
		s.leaseTerm(since)
	}
}

// term delivers until bctx ends; sctx ending abandons a send in flight.
func (s *sender) term(bctx, sctx context.Context) {
	ops := make(chan storeOp, 64)
	s.ops = ops
	var opsDone sync.WaitGroup
	opsDone.Add(1)
	go func() {
		defer opsDone.Done()
		s.storeOps(sctx, ops)
	}()
	defer func() {
		close(ops)
		opsDone.Wait()
	}()

	frozen, after, ok := s.recover(bctx)
	if !ok {
		return
	}
	ready := make(chan *txn, pipelineDepth)
	go s.build(bctx, ready, frozen, after)
	for t := range ready {
		if bctx.Err() != nil {
			// Stopping: what is frozen stays frozen for the next run.
			continue
		}
		s.sending.Store(true)
		s.deliver(bctx, sctx, t)
		s.sending.Store(false)
		s.poke(s.sent)
	}
}

// acquire waits until this process holds the AS's lease and returns when it
// asked for it; false when the sender stops first.
func (s *sender) acquire() (time.Time, bool) {
	ttl := s.q.opts.LeaseTTL
	warned := false
	for {
		start := time.Now()
		ctx, cancel := context.WithTimeout(s.buildCtx, ttl/2)
		ok, err := s.q.leaser.Acquire(ctx, s.key, s.q.owner, ttl)
		cancel()
		if ok {
			s.log.Info("sending for this appservice: lease acquired", zap.String("owner", s.q.owner))
			return start, true
		}
		if err != nil && s.buildCtx.Err() == nil && !warned {
			s.log.Warn("acquiring the sender lease failed; retrying", zap.Error(err))
			warned = true
		}
		t := time.NewTimer(s.q.acquireEvery())
		select {
		case <-t.C:
		case <-s.buildCtx.Done():
			t.Stop()
			return time.Time{}, false
		}
	}
}

// leaseTerm runs one term under the lease acquired at since, renewing it,
// and releases it after.
func (s *sender) leaseTerm(since time.Time) {
	bctx, cancelB := context.WithCancel(s.buildCtx)
	sctx, cancelS := context.WithCancel(s.sendCtx)
	end := func() { cancelB(); cancelS() }
	s.lost = end
	s.leading.Store(true)
	defer s.leading.Store(false)
	kept := make(chan struct{})
	go func() {
		defer close(kept)
		s.keepLease(bctx, since, end)
	}()
	s.term(bctx, sctx)
	end()
	<-kept
	// Another process may take over at once instead of after the ttl. A
	// lease already lost is someone else's row and stays.
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := s.q.leaser.Release(ctx, s.key, s.q.owner); err != nil {
		s.log.Warn("releasing the sender lease failed; another process takes over when it expires", zap.Error(err))
	}
}

// keepLease renews the lease every ttl/3 until ctx ends. If it is lost, or
// not renewed by ttl/4 before it could expire, it ends the term: sends stop
// before another process can take the lease.
func (s *sender) keepLease(ctx context.Context, since time.Time, end func()) {
	ttl := s.q.opts.LeaseTTL
	// The database counts the expiry from a moment after since.
	safe := ttl - ttl/4
	deadline := time.NewTimer(time.Until(since.Add(safe)))
	defer deadline.Stop()
	tick := time.NewTicker(ttl / 3)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-deadline.C:
			s.log.Warn("sender lease not renewed in time; stopping sends for another process to take over")
			end()
			return
		case <-tick.C:
		}
		start := time.Now()
		rctx, cancel := context.WithDeadline(ctx, since.Add(safe))
		ok, err := s.q.leaser.Renew(rctx, s.key, s.q.owner, ttl)
		cancel()
		switch {
		case ok:
			since = start
			deadline.Reset(time.Until(since.Add(safe)))
		case err == nil:
			s.log.Warn("sender lease lost to another process; stopping sends")
			end()
			return
		case ctx.Err() == nil:
			s.log.Warn("renewing the sender lease failed; retrying", zap.Error(err))
		}
	}
}

// recover loads the AS's frozen transactions and where new ones start.
func (s *sender) recover(ctx context.Context) ([]txnstore.Txn, int64, bool) {
	var frozen []txnstore.Txn
	var delivered int64
	err := s.retryStore(ctx, "recover", func(ctx context.Context) error {
		var err error
		if frozen, err = s.q.store.Frozen(ctx, s.key); err != nil {
			return err
		}
		delivered, err = s.q.store.Delivered(ctx, s.key)
		return err
	})
	if err != nil {
		return nil, 0, false
	}
	after := delivered
	if n := len(frozen); n > 0 && frozen[n-1].Range.Last > after {
		after = frozen[n-1].Range.Last
	}
	return frozen, after, true
}

// build feeds ready: first the transactions frozen by an earlier run, then
// new ones cut from the stream after `after`.
func (s *sender) build(ctx context.Context, ready chan<- *txn, frozen []txnstore.Txn, after int64) {
	defer close(ready)
	for _, ft := range frozen {
		t, err := s.rebuild(ctx, ft)
		if err != nil {
			return
		}
		select {
		case ready <- t:
		case <-ctx.Done():
			return
		}
	}
	lim := s.q.limits()
	// carry is what the last read brought beyond the transactions frozen
	// from it: the items right after `after`, so the next round starts from
	// them instead of reading them again (a read brings up to three times
	// what a transaction of events takes).
	var carry []txnstore.Item
	for {
		room := cap(ready) - len(ready)
		if room < 1 {
			room = 1
		}
		readMax := room * (lim.events + lim.ephemeral + lim.toDevice)
		items := carry
		if len(items) == 0 {
			var err error
			if items, err = s.next(ctx, after, readMax, nil); err != nil {
				return
			}
		}
		f := s.as.Load().Format
		// Hold a partial transaction back while another is queued or in
		// flight: what arrives meanwhile joins it, so a trickle of events
		// does not become a transaction (and two commits) per event. Full
		// transactions are still frozen ahead.
		for len(items) < readMax && cut(items, lim, f) == len(items) && (len(ready) > 0 || s.sending.Load()) {
			more, err := s.next(ctx, items[len(items)-1].Seq, readMax-len(items), s.sent)
			if err != nil {
				return
			}
			items = append(items, more...)
		}
		var txns []*txn
		var recs []txnstore.Txn
		prev := after
		for len(items) > 0 && len(txns) < room {
			n := cut(items, lim, f)
			body := encode(items[:n], f)
			last := items[n-1].Seq
			t := &txn{
				Txn: txnstore.Txn{
					AS: s.key, Range: txnstore.Range{After: prev, Last: last}, Format: uint32(f),
					Len: len(body), Checksum: checksum(body),
				},
				items: items[:n:n],
				body:  body,
			}
			txns = append(txns, t)
			recs = append(recs, t.Txn)
			items = items[n:]
			prev = last
		}
		carry = items
		var ids []int64
		err := s.retryStore(ctx, "freeze", func(ctx context.Context) error {
			var err error
			ids, err = s.q.store.Freeze(ctx, s.key, 0, recs)
			return err
		})
		if err != nil {
			return
		}
		for i, t := range txns {
			t.ID = ids[i]
			select {
			case ready <- t:
			case <-ctx.Done():
				return
			}
		}
		after = prev
	}
}

// next returns up to max items after seq `after`, waiting for at least
// one, or returns none when wake fires first (nil: never).
func (s *sender) next(ctx context.Context, after int64, max int, wake <-chan struct{}) ([]txnstore.Item, error) {
	if s.q.leaser != nil {
		return s.poll(ctx, after, max, wake)
	}
	for {
		s.mu.Lock()
		if after >= s.completeAfter {
			i := 0
			for i < len(s.mem) && s.mem[i].Seq <= after {
				i++
			}
			s.mem = s.mem[i:]
			if n := len(s.mem); n > 0 {
				if n > max {
					n = max
				}
				items := append([]txnstore.Item(nil), s.mem[:n]...)
				s.mu.Unlock()
				return items, nil
			}
			if cap(s.mem) > 4*memLimit/5 {
				s.mem = nil // let a large drained buffer go
			}
			s.mu.Unlock()
			select {
			case <-s.signal:
				continue
			case <-wake:
				return nil, nil
			case <-ctx.Done():
				return nil, ctx.Err()
			}
		}
		gen := s.overflows
		s.mu.Unlock()

		var items []txnstore.Item
		err := s.retryStore(ctx, "read", func(ctx context.Context) error {
			var err error
			items, err = s.q.store.Read(ctx, s.key, after, max, 0)
			return err
		})
		if err != nil {
			return nil, err
		}
		if len(items) < max {
			// The read saw every committed item of the stream; anything
			// committed after it was pushed to memory since this sender
			// exists, unless memory overflowed meanwhile.
			last := after
			if len(items) > 0 {
				last = items[len(items)-1].Seq
			}
			s.mu.Lock()
			if s.overflows == gen {
				s.completeAfter = last
			}
			s.mu.Unlock()
		}
		if len(items) > 0 {
			return items, nil
		}
	}
}

// poll is next on a shared store: read, and when nothing is there, wait for
// a local commit or the poll interval (commits of other processes).
func (s *sender) poll(ctx context.Context, after int64, max int, wake <-chan struct{}) ([]txnstore.Item, error) {
	for {
		var items []txnstore.Item
		err := s.retryStore(ctx, "read", func(ctx context.Context) error {
			var err error
			items, err = s.q.store.Read(ctx, s.key, after, max, 0)
			return err
		})
		if err != nil || len(items) > 0 {
			return items, err
		}
		t := time.NewTimer(s.q.opts.PollInterval)
		select {
		case <-s.signal:
			t.Stop()
		case <-wake:
			t.Stop()
			return nil, nil
		case <-t.C:
		case <-ctx.Done():
			t.Stop()
			return nil, ctx.Err()
		}
	}
}

// rebuild turns a transaction frozen by an earlier run back into a body: the
// stored one if a send had failed, else rebuilt from the immutable items of
// its range, laid out in its recorded format.
func (s *sender) rebuild(ctx context.Context, ft txnstore.Txn) (*txn, error) {
	t := &txn{Txn: ft}
	var items []txnstore.Item
	err := s.retryStore(ctx, "read", func(ctx context.Context) error {
		items = items[:0]
		after := ft.Range.After
		for after < ft.Range.Last {
			got, err := s.q.store.Read(ctx, s.key, after, 1000, 0)
			if err != nil {
				return err
			}
			if len(got) == 0 {
				break
			}
			for _, it := range got {
				if it.Seq <= ft.Range.Last {
					items = append(items, it)
				}
			}
			after = got[len(got)-1].Seq
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	t.items = items
	if ft.Body != nil {
		t.body, t.saved = ft.Body, true
		return t, nil
	}
	t.body = encode(items, Format(ft.Format))
	if len(t.body) != ft.Len || checksum(t.body) != ft.Checksum {
		s.log.Error("rebuilt transaction differs from the one first sent; sending the rebuilt body",
			zap.Int64("txn_id", ft.ID), zap.Int("len", len(t.body)), zap.Int("first_len", ft.Len))
	}
	return t, nil
}

// maxPDUBytes is Matrix's limit on an event's size. A single item the AS
// refuses with 413 is dropped only above it: such an item can never be
// delivered, while a smaller one refused is the AS misbehaving.
const maxPDUBytes = 65536

// deliver sends t until the AS accepts it or the sender stops.
func (s *sender) deliver(bctx, ctx context.Context, t *txn) {
	bo := s.newBackoff()
	attempt := 0
	for {
		as := s.as.Load()
		if as.Target.URL == "" {
			s.completed(t, attempt, time.Time{})
			return
		}
		attempt++
		s.setInFlight(t.ID)
		start := time.Now()
		err := s.q.client.PutTransaction(ctx, as.Target, strconv.FormatInt(t.ID, 10), t.body)
		s.setInFlight(0)
		if err == nil {
			s.completed(t, attempt, start)
			return
		}
		if ctx.Err() != nil {
			return
		}
		if errors.Is(err, asapi.ErrTooLarge) {
			if len(t.items) > 1 {
				if parts, ok := s.split(ctx, t); ok {
					for _, p := range parts {
						s.deliver(bctx, ctx, p)
					}
					return
				}
			} else if len(t.items[0].Data) > maxPDUBytes {
				s.log.Error("appservice refuses a single item larger than Matrix's 64 KiB event limit; dropping it",
					zap.Int64("txn_id", t.ID), zap.Int("bytes", len(t.body)))
				s.q.opts.Metrics.Dropped(as.ID, 1)
				s.completed(t, attempt, time.Time{})
				return
			}
			// A single event within Matrix's limits refused as too large is
			// the AS misbehaving: retried like any failure, never dropped.
		}
		wait := bo.NextBackOff()
		var se *asapi.StatusError
		if errors.As(err, &se) && se.RetryAfter > wait {
			wait = min(se.RetryAfter, s.q.opts.RetryMax) // the AS asked for a pause
		}
		s.failed(t, err, attempt, wait)
		timer := time.NewTimer(wait)
		select {
		case <-timer.C:
		case <-s.wake:
			timer.Stop()
		case <-ctx.Done():
			timer.Stop()
			return
		case <-bctx.Done():
			// Stopping while the AS is down: leave t frozen.
			timer.Stop()
			return
		}
	}
}

// split replaces t, refused as too large, by two transactions of half its
// items each.
func (s *sender) split(ctx context.Context, t *txn) ([]*txn, bool) {
	mid := len(t.items) / 2
	f := Format(t.Format)
	halves := [][]txnstore.Item{t.items[:mid], t.items[mid:]}
	parts := make([]*txn, 2)
	recs := make([]txnstore.Txn, 2)
	after := t.Range.After
	for i, items := range halves {
		body := encode(items, f)
		last := items[len(items)-1].Seq
		if i == 1 {
			last = t.Range.Last
		}
		parts[i] = &txn{
			Txn:   txnstore.Txn{AS: s.key, Range: txnstore.Range{After: after, Last: last}, Format: t.Format, Len: len(body), Checksum: checksum(body)},
			items: items,
			body:  body,
		}
		recs[i] = parts[i].Txn
		after = last
	}
	var ids []int64
	err := s.retryStore(ctx, "split", func(ctx context.Context) error {
		var err error
		ids, err = s.q.store.Freeze(ctx, s.key, t.ID, recs)
		return err
	})
	if err != nil {
		return nil, false
	}
	for i := range parts {
		parts[i].ID = ids[i]
	}
	s.log.Info("transaction too large for the appservice; split in two",
		zap.Int64("txn_id", t.ID), zap.Int64s("new_txn_ids", ids), zap.Int("events", len(t.items)))
	return parts, true
}

func (s *sender) newBackoff() backoff.BackOff {
	b := backoff.NewExponentialBackOff()
	b.InitialInterval = s.q.opts.RetryInitial
	b.MaxInterval = s.q.opts.RetryMax
	b.Multiplier = 2
	b.RandomizationFactor = 0.5
	b.MaxElapsedTime = 0 // never give up: nothing is dropped
	b.Reset()
	return b
}

func (s *sender) setInFlight(id int64) {
	s.liveMu.Lock()
	s.live.InFlight = id
	s.liveMu.Unlock()
}

// completed records an accepted (or never sendable) transaction.
func (s *sender) completed(t *txn, attempts int, sentAt time.Time) {
	now := time.Now()
	s.liveMu.Lock()
	wasDown := !s.live.Up
	failures := s.live.Failures
	downFor := now.Sub(s.downSince)
	s.live.Up, s.live.Failures, s.live.NextRetry = true, 0, time.Time{}
	s.live.LastSuccess = now
	st := txnstore.State{Up: true, LastSuccess: now, LastError: s.live.LastError}
	s.liveMu.Unlock()
	id := t.ID
	asID := s.as.Load().ID
	if !sentAt.IsZero() {
		var ev, eph, td int
		for _, it := range t.items {
			switch it.Kind {
			case txnstore.KindEphemeral:
				eph++
			case txnstore.KindToDevice:
				td++
			default:
				ev++
			}
		}
		s.q.opts.Metrics.TxnSent(asID, now.Sub(sentAt), ev, eph, td)
	}
	s.q.opts.Metrics.State(asID, true, 0)
	if wasDown {
		s.log.Info("appservice up again", zap.Int64("txn_id", t.ID), zap.Int("attempt", attempts),
			zap.Int("failures", failures), zap.Int("events", len(t.items)), zap.Duration("down_for", downFor))
	} else if !sentAt.IsZero() {
		s.log.Debug("transaction sent", zap.Int64("txn_id", t.ID), zap.Int("events", len(t.items)),
			zap.Duration("took", now.Sub(sentAt)))
	}
	op := storeOp{complete: id}
	if wasDown {
		op.state = &st
	}
	s.ops <- op
}

// storeOp is one store write of a sender, applied in order by storeOps:
// fn, or the completion of a transaction (after setting state, if set).
type storeOp struct {
	fn       func(context.Context)
	complete int64
	state    *txnstore.State
}

// manyCompleter is a store that records several completions in one write.
type manyCompleter interface {
	CompleteMany(ctx context.Context, as txnstore.ASKey, ids []int64) error
}

// maxCompleteBatch bounds the completions recorded in one write.
const maxCompleteBatch = 64

// storeOps applies the sender's store writes in order until ops is closed.
// Completions already queued behind one another are recorded in one write
// when the store can: one at a time, each waiting for its commit, they
// bound a catching-up AS to one transaction per commit.
func (s *sender) storeOps(ctx context.Context, ops <-chan storeOp) {
	var pending *storeOp
	for {
		var op storeOp
		if pending != nil {
			op, pending = *pending, nil
		} else {
			var ok bool
			if op, ok = <-ops; !ok {
				return
			}
		}
		if op.complete == 0 {
			op.fn(ctx)
			continue
		}
		if op.state != nil {
			_ = s.q.store.SetState(ctx, s.key, *op.state)
		}
		ids := []int64{op.complete}
		closed := false
	gather:
		for len(ids) < maxCompleteBatch {
			select {
			case o, ok := <-ops:
				if !ok {
					closed = true
					break gather
				}
				if o.complete == 0 || o.state != nil {
					pending = &o
					break gather
				}
				ids = append(ids, o.complete)
			default:
				break gather
			}
		}
		var err error
		if mc, ok := s.q.store.(manyCompleter); ok && len(ids) > 1 {
			err = mc.CompleteMany(ctx, s.key, ids)
		} else {
			for _, id := range ids {
				err = errors.Join(err, s.q.store.Complete(ctx, s.key, id))
			}
		}
		if err != nil && ctx.Err() == nil {
			// The transactions stay frozen and are resent, same ids and
			// bodies, after a restart: the AS drops them as duplicates.
			s.log.Warn("recording delivered transactions failed", zap.Int64s("txn_ids", ids), zap.Error(err))
		}
		if closed {
			return
		}
	}
}

// failed records a failed attempt and the wait before the next.
func (s *sender) failed(t *txn, err error, attempt int, wait time.Duration) {
	now := time.Now()
	s.liveMu.Lock()
	wasUp := s.live.Up
	if wasUp {
		s.downSince = now
	}
	s.live.Up = false
	s.live.Failures++
	s.live.LastError = err.Error()
	s.live.NextRetry = now.Add(wait)
	st := txnstore.State{Up: false, Failures: s.live.Failures, LastSuccess: s.live.LastSuccess,
		LastError: s.live.LastError, LastErrorAt: now, NextRetry: s.live.NextRetry}
	s.liveMu.Unlock()

	asID := s.as.Load().ID
	s.q.opts.Metrics.TxnFailed(asID)
	s.q.opts.Metrics.State(asID, false, st.Failures)
	fields := []zap.Field{zap.Int64("txn_id", t.ID), zap.Int("events", len(t.items)),
		zap.Int("attempt", attempt), zap.Duration("backoff", wait), zap.Error(err)}
	var se *asapi.StatusError
	if errors.As(err, &se) {
		fields = append(fields, zap.Int("status", se.Status))
	}
	switch {
	case errors.Is(err, asapi.ErrTokenMismatch) && wasUp:
		s.log.Error("appservice rejected our hs_token (token mismatch); check its registration", fields...)
	case wasUp:
		s.log.Warn("appservice down", fields...)
	default:
		s.log.Debug("appservice still down", fields...)
	}

	body, needSave := t.body, !t.saved
	t.saved = true
	id := t.ID
	s.ops <- storeOp{fn: func(ctx context.Context) {
		if needSave {
			if err := s.q.store.SaveBody(ctx, s.key, id, body); err != nil && ctx.Err() == nil {
				s.log.Warn("storing a transaction body failed", zap.Int64("txn_id", id), zap.Error(err))
			}
		}
		_ = s.q.store.SetState(ctx, s.key, st)
	}}
}

// retryStore runs op until it succeeds or ctx ends: a store error (disk
// full, locked) must not lose the queue, only delay it.
func (s *sender) retryStore(ctx context.Context, what string, op func(context.Context) error) error {
	bo := backoff.NewExponentialBackOff()
	bo.InitialInterval = 50 * time.Millisecond
	bo.MaxInterval = 5 * time.Second
	bo.MaxElapsedTime = 0
	for {
		err := op(ctx)
		if errors.Is(err, txnstore.ErrLeaseLost) {
			// Another process sends for this AS now: end the term.
			if s.lost != nil {
				s.lost()
			}
			return err
		}
		if err == nil || ctx.Err() != nil {
			if err != nil {
				return err
			}
			return nil
		}
		wait := bo.NextBackOff()
		s.log.Warn("store operation failed; retrying", zap.String("op", what), zap.Duration("backoff", wait), zap.Error(err))
		select {
		case <-time.After(wait):
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}
