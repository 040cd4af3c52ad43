// Package core is the sender of one application service as a deterministic
// state machine: no goroutines, clocks, locks or I/O of its own. A driver
// feeds it inputs with Step(now, input) and carries out what Ready returns:
// store reads and writes, at most one HTTP send, lease operations. The same
// machine runs under the queue package's driver and under its simulation.
//
// The machine, not the driver, enforces the delivery rules: a transaction is
// frozen before it is first sent, one transaction is in flight at a time, a
// txn id always carries the same bytes, completions are recorded in order
// and retried until they land, and on a shared store nothing is sent unless
// the lease stays valid, by the machine's own clock, for the whole send.
package core

import (
	"errors"
	"fmt"
	"math/rand/v2"
	"time"

	"go.uber.org/zap"

	"github.com/asdispatch/asdispatch/txnstore"
)

// MaxPDUBytes is Matrix's limit on an event's size. A single item the AS
// refuses with 413 is dropped only above it.
const MaxPDUBytes = 65536

// Limits caps one transaction.
type Limits struct {
	Events, Ephemeral, ToDevice, Bytes int
	// CatchupEvents, when above Events, caps the events of a transaction
	// cut while the AS has a backlog: when, at the moment the transaction
	// is cut, more items wait to go out than one transaction of the other
	// limits holds. Bytes still caps it, and a 413 still splits it. Zero
	// (or not above Events): Events always.
	CatchupEvents int
}

// Config configures one machine.
type Config struct {
	Key txnstore.ASKey
	Limits
	// Retry is the backoff schedule between attempts while the AS is down:
	// Retry[n-1] after the n-th failure (the last value repeats), jittered
	// by ±50% and capped at RetryMax.
	Retry    []time.Duration
	RetryMax time.Duration
	// StoreRetry is the schedule between retries of a failed store op.
	StoreRetry []time.Duration
	// Shared: other processes write to the store. The machine then holds
	// the AS's lease to send and reads the store instead of trusting the
	// commits it is told about.
	Shared       bool
	LeaseTTL     time.Duration
	AcquireEvery time.Duration
	PollInterval time.Duration
	// SendTimeout bounds a send on a shared store (the transport's own
	// timeout, 90 s for HTTP): before a send the lease is renewed to
	// outlast it, so no other process can take the AS over, and resend its
	// transaction, while the AS may still be working on this one.
	SendTimeout time.Duration
	// Depth is how many transactions are frozen ahead, the one in flight
	// included, as long as their bodies add up to less than readTxns
	// transactions of Bytes. MemItems and MemBytes bound the committed
	// items kept in memory; past them the backlog is read from the store.
	Depth    int
	MemItems int
	MemBytes int
	// Log, with ID as its "appservice" field (when set), is the machine's
	// logger.
	Log *zap.Logger
	ID  string
	// Bug is for tests only: it brings back one bug fixed since, so the
	// simulation can show it would find it.
	Bug Bug
}

// Bug names a deliberately broken variant (tests only).
type Bug uint8

// Broken variants for the simulation's bite tests.
const (
	NoBug Bug = iota
	// BugDropCompletion: issue 13's item 1 as it was: a failed Complete is
	// dropped, frozen transactions at or below the cursor are kept, and a
	// rebuilt body that fails its checksum is sent anyway.
	BugDropCompletion
	// BugSplitOrder: after a 413 split, the second part goes first (2).
	BugSplitOrder
	// BugNoReconcile: a failed Freeze is retried as is, never re-read (5).
	BugNoReconcile
	// BugNoLeaseCheck: sends without checking the lease's validity.
	BugNoLeaseCheck
	// BugStaleEnd: a recovery's End is trusted even when memory was
	// reset since the recover was issued, or on a shared store.
	BugStaleEnd
)

// Input is what the driver feeds to Step.
type Input interface{ isInput() }

// Start (re)starts the machine, with the AS's target.
type Start struct {
	Target Target
	// Recovered, if set, is the AS's recovery (Tok unused) as the store
	// held it before this Start, read by a driver that guarantees every
	// item committed since that read reaches the machine as Committed
	// after this Start. A machine started from stopped on an unshared
	// store then starts from it instead of asking with a RecoverOp: a
	// process reads every AS's recovery in one query.
	Recovered *RecoverDone
}

// Retarget changes the AS's target (a reload changed url, token or format).
type Retarget struct{ Target Target }

// Stop asks the machine to stop: no new sends, freezes or reads; a send in
// flight and the completions queued are let finish. Sender.Stopped reports
// when nothing runs any more.
type Stop struct{}

// Abort ends a Stop at once: the send in flight is cancelled and queued
// writes are given up (what they would have recorded is redone later).
type Abort struct{}

// Committed brings items freshly committed to the AS's stream, in order.
type Committed struct{ Items []txnstore.Item }

// Tick is a timer firing (Ready.Next has passed).
type Tick struct{}

// Wake makes a backoff end now.
type Wake struct{}

// RecoverDone answers a RecoverOp.
type RecoverDone struct {
	Tok       uint64
	Frozen    []txnstore.Txn
	Delivered int64
	// End, if HasEnd, is the last seq of the AS's stream when the store
	// was read (txnstore.Recovery.End): on an unshared store the machine
	// then reads nothing past it, the later items being those Committed
	// brings, and an AS with nothing pending reads nothing at all.
	End    int64
	HasEnd bool
	Err    error
}

// ReadDone answers a ReadOp.
type ReadDone struct {
	Tok   uint64
	Items []txnstore.Item
	Err   error
}

// FreezeDone answers a FreezeOp.
type FreezeDone struct {
	Tok uint64
	IDs []int64
	Err error
}

// WriteDone answers a WriteOp.
type WriteDone struct {
	Tok uint64
	Err error
}

// LeaseDone answers a LeaseOp.
type LeaseDone struct {
	Tok uint64
	OK  bool
	Err error
}

// SendDone answers a SendOp.
type SendDone struct {
	ID  int64
	Err error
	// Status is the AS's HTTP status (0: no answer).
	Status     int
	RetryAfter time.Duration
	TooLarge   bool
	// TokenMismatch: the AS refused our hs_token.
	TokenMismatch bool
	// Aborted: the driver cancelled the send as asked (CancelSend).
	Aborted bool
}

func (Start) isInput()       {}
func (Retarget) isInput()    {}
func (Stop) isInput()        {}
func (Abort) isInput()       {}
func (Committed) isInput()   {}
func (Tick) isInput()        {}
func (Wake) isInput()        {}
func (RecoverDone) isInput() {}
func (ReadDone) isInput()    {}
func (FreezeDone) isInput()  {}
func (WriteDone) isInput()   {}
func (LeaseDone) isInput()   {}
func (SendDone) isInput()    {}

// Target is what the machine knows of where transactions go.
type Target struct {
	// HasURL is false for `url: null`: the backlog stays paused.
	HasURL bool
	Format Format
}

// RecoverOp asks for the AS's frozen transactions (Store.Frozen), then its
// cursor (Store.Delivered).
type RecoverOp struct{ Tok uint64 }

// ReadOp asks for items of the stream after After (Store.Read), at most
// MaxItems and about MaxBytes (at least one item if there is any).
type ReadOp struct {
	Tok      uint64
	After    int64
	MaxItems int
	MaxBytes int
}

// FreezeOp asks for Store.Freeze(Replace, Txns).
type FreezeOp struct {
	Tok     uint64
	Replace int64
	Txns    []txnstore.Txn
}

// SendOp asks for one PUT of the transaction.
type SendOp struct {
	ID   int64
	Body []byte
	// Deadline, if set, must end the send (the lease's validity).
	Deadline time.Time
}

// WriteOp is one store write; exactly one field is set.
type WriteOp struct {
	Tok      uint64
	Complete []int64 // Store.Complete of each, in order, in one write if possible
	SaveBody *SaveBody
	State    *txnstore.State
}

// SaveBody asks for Store.SaveBody.
type SaveBody struct {
	ID   int64
	Body []byte
}

// LeaseKind says which lease call a LeaseOp is.
type LeaseKind uint8

// Lease calls.
const (
	Acquire LeaseKind = iota + 1
	Renew
	Release
)

// LeaseOp asks for a Leaser call.
type LeaseOp struct {
	Tok  uint64
	Kind LeaseKind
	// TTL is the lease's length to ask for (Acquire and Renew): the
	// configured LeaseTTL, longer while a send needs the lease to outlast it.
	TTL time.Duration
}

// NoteKind says what a Note reports.
type NoteKind uint8

// Notes for metrics.
const (
	NoteSent NoteKind = iota + 1
	NoteFailed
	NoteDropped
	NoteBroken
)

// Note reports a delivery outcome for metrics.
type Note struct {
	Kind                        NoteKind
	Took                        time.Duration
	Events, Ephemeral, ToDevice int
	Failures                    int
}

// Live is the machine's delivery state for operators.
type Live struct {
	Up          bool
	Failures    int
	LastSuccess time.Time
	LastError   string
	NextRetry   time.Time
	InFlight    int64
	// Leading: the machine holds the AS's lease (always true unshared).
	Leading bool
}

// Ready is what the driver must carry out. Ops of one Ready are
// independent: the machine never asks for an op that must wait for another.
type Ready struct {
	Recover    *RecoverOp
	Read       *ReadOp
	Freeze     *FreezeOp
	Send       *SendOp
	CancelSend bool
	Writes     []WriteOp
	Lease      *LeaseOp
	// Live is set when the live state changed.
	Live  *Live
	Notes []Note
	// Next is when to Step(Tick) at the latest; zero: only on input.
	Next time.Time
}

type mode uint8

const (
	stopped mode = iota
	running
	stopping
)

// txn is a frozen transaction (or one about to be).
type txn struct {
	txnstore.Txn
	items []txnstore.Item
	body  []byte // nil until known (rebuilt or encoded)
	saved bool   // body stored (or its SaveBody queued)
}

type write struct {
	complete []int64
	save     *SaveBody
	state    *txnstore.State
	fails    int
}

// unknown marks memory as not known to be complete.
const unknown = int64(1<<63 - 1)

// Sender is one AS's machine. Not safe for concurrent use.
type Sender struct {
	cfg Config
	rnd *rand.Rand
	log *zap.Logger
	now time.Time
	out Ready

	mode    mode
	aborted bool
	target  Target
	tok     uint64

	// lease (Shared)
	leading     bool
	leaseOp     *LeaseOp
	leaseAt     time.Time // when leaseOp was issued
	leaseValid  time.Time // by our clock, the lease holds until then
	nextRenew   time.Time
	nextAcquire time.Time
	warnedLease bool

	// what the store holds
	recovered  bool
	recoverTok uint64 // outstanding recover (0: none)
	// recoverGen is overflows when the recover was issued: unchanged at
	// its answer, memory holds every item committed since.
	recoverGen uint64
	// preload is Start's Recovered, used by the first recover of a start
	// from stopped; a reset of memory drops it.
	preload *RecoverDone

	reconcile bool // a write failed: re-read before going on
	retryAt   time.Time
	delivered int64
	q         []*txn // frozen, undelivered, stream order; q[0] is next to send
	unbuilt   int    // q[len(q)-unbuilt:] await their items (rebuild)
	frozenEnd int64
	broken    bool

	// items after frozenEnd
	carry      []txnstore.Item
	carryBytes int
	fetchedTo  int64 // last seq taken into q or carry
	readTok    uint64
	readGen    uint64
	readAfter  int64
	readMax    int
	readLimit  int  // bytes
	exhausted  bool // the last read saw the end of the stream
	dirty      bool // shared: items were committed since the last read
	pollAt     time.Time

	// memory of committed items (unshared)
	mem           []txnstore.Item
	memBytes      int
	completeAfter int64
	overflows     uint64

	// freezes: one in flight
	freezing   *FreezeOp
	frozenAs   []*txn // the txns of freezing
	pending    *FreezeOp
	pendingTx  []*txn // a freeze that failed, awaiting reconciliation
	split      *txn   // q[0], being split
	splitParts []*txn // its halves, until their freeze is issued
	bugRetry   bool

	// writes: one in flight, in order
	writes    []*write
	writing   *write
	writeTok  uint64
	opsOut    int // freeze and write ops in flight (any term)
	storeFail int

	// send
	inflight *txn
	sendTerm uint64
	term     uint64
	sentAt   time.Time
	// cover: the next renewal must make the lease outlast a send.
	cover     bool
	attempt   int
	nextSend  time.Time
	live      Live
	liveDirty bool
	downSince time.Time
}

// New returns a stopped machine; Step(Start) starts it.
func New(cfg Config, rnd *rand.Rand) *Sender {
	if cfg.Log == nil {
		cfg.Log = zap.NewNop()
	}
	if cfg.Depth < 1 {
		cfg.Depth = 1
	}
	return &Sender{cfg: cfg, rnd: rnd, completeAfter: unknown, live: Live{Up: true, Leading: !cfg.Shared}, liveDirty: true}
}

// Stopped reports whether nothing of the machine runs.
func (s *Sender) Stopped() bool { return s.mode == stopped }

// Ready drains what Step decided.
func (s *Sender) Ready() Ready {
	r := s.out
	s.out = Ready{}
	if s.liveDirty {
		l := s.live
		r.Live = &l
		s.liveDirty = false
	}
	r.Next = s.next()
	return r
}

// logger is Log with the AS's field, made on first use: zap's With copies
// the logger's core and encoder, about 1.3 KiB with a JSON encoder, which
// every AS paid at start though most never log.
func (s *Sender) logger() *zap.Logger {
	if s.log == nil {
		s.log = s.cfg.Log
		if s.cfg.ID != "" {
			s.log = s.log.With(zap.String("appservice", s.cfg.ID))
		}
	}
	return s.log
}

func (s *Sender) nextTok() uint64 { s.tok++; return s.tok }

// Step feeds one input at time now; in may be nil (same as Tick).
func (s *Sender) Step(now time.Time, in Input) {
	if now.After(s.now) {
		s.now = now
	}
	switch in := in.(type) {
	case Start:
		s.target = in.Target
		s.nextSend = s.now
		if s.mode == stopped {
			s.mode = running
			s.aborted = false
			s.recovered = false
			s.resetMem()
			s.nextAcquire = s.now
			if !s.cfg.Shared {
				s.preload = in.Recovered
			}
		} else if s.mode == stopping {
			// Back before it stopped: what it dropped while stopping is
			// recovered from the store.
			s.mode = running
			s.aborted = false
			s.recovered = false
			s.preload = nil
		}
	case Retarget:
		s.target = in.Target
		s.nextSend = s.now // a changed target is tried at once
	case Stop:
		if s.mode == running {
			s.mode = stopping
		}
	case Abort:
		if s.mode == stopping {
			s.aborted = true
			s.writes = nil
			if s.inflight != nil {
				s.out.CancelSend = true
			}
		}
	case Committed:
		s.committed(in.Items)
	case Wake:
		s.nextSend = s.now
	case RecoverDone:
		s.recoverDone(in)
	case ReadDone:
		s.readDone(in)
	case FreezeDone:
		s.freezeDone(in)
	case WriteDone:
		s.writeDone(in)
	case LeaseDone:
		s.leaseDone(in)
	case SendDone:
		s.sendDone(in)
	}
	s.advance()
}

func (s *Sender) resetMem() {
	s.mem, s.memBytes, s.completeAfter = nil, 0, unknown
	s.overflows++
	if s.cfg.Bug != BugStaleEnd {
		// Items committed since the preload was read are gone.
		s.preload = nil
	}
}

func (s *Sender) committed(items []txnstore.Item) {
	if s.cfg.Shared || s.mode == stopped {
		s.dirty = true
		return
	}
	for _, it := range items {
		if n := len(s.mem); n > 0 && it.Seq <= s.mem[n-1].Seq {
			continue
		}
		s.mem = append(s.mem, it)
		s.memBytes += len(it.Data)
	}
	if len(s.mem) > s.cfg.MemItems || s.memBytes > s.cfg.MemBytes {
		// Far behind: forget, read the backlog from the store instead.
		s.resetMem()
	}
}

// active reports whether the machine may work on the AS's queue now.
func (s *Sender) active() bool {
	return s.mode == running && (!s.cfg.Shared || s.leading)
}

// advance decides the ops to run after an input.
func (s *Sender) advance() {
	if s.mode == stopped {
		return
	}
	s.advanceLease()
	s.advanceWrites()
	if s.active() && s.target.HasURL && !s.broken {
		if !s.recovered {
			if s.recoverTok == 0 && s.opsOut == 0 && len(s.writes) == 0 && s.inflight == nil && !s.now.Before(s.retryAt) {
				s.recoverTok = s.nextTok()
				s.recoverGen = s.overflows
				pre := s.preload
				s.preload = nil
				if pre != nil {
					// Memory holds every item committed since the
					// preload was read: it came after the Start.
					in := *pre
					in.Tok = s.recoverTok
					s.recoverDone(in)
					s.advanceWrites() // what the recovery queued
				} else {
					s.out.Recover = &RecoverOp{Tok: s.recoverTok}
				}
			}
		}
		if s.recovered {
			s.advanceRead()
			s.advanceFreeze()
			s.advanceSend()
		}
	}
	s.advanceStop()
}

func (s *Sender) advanceStop() {
	if s.mode != stopping {
		return
	}
	if s.inflight != nil || s.opsOut > 0 || s.recoverTok != 0 || s.readTok != 0 || s.leaseOp != nil {
		return
	}
	if len(s.writes) > 0 && !s.aborted {
		return
	}
	if s.cfg.Shared && s.leading {
		s.leaseAt = s.now
		s.leaseOp = &LeaseOp{Tok: s.nextTok(), Kind: Release}
		s.out.Lease = s.leaseOp
		// Another process may take over as soon as the release lands:
		// nothing more goes out under this lease, even if started again
		// meanwhile.
		s.endTerm()
		return
	}
	s.mode = stopped
	s.endTerm()
}

// endTerm forgets what the machine knew of the store: the next term
// recovers it afresh. A send still in flight is left to finish.
func (s *Sender) endTerm() {
	s.term++
	s.recovered = false
	s.reconcile = false
	s.q, s.unbuilt, s.split = nil, 0, nil
	s.carry, s.carryBytes = nil, 0
	s.pending, s.pendingTx, s.bugRetry = nil, nil, false
	s.splitParts = nil
	s.writes = nil
	// Answers to ops of the ended term are ignored (opsOut still counts
	// them: a new term recovers only once they are all back).
	s.freezing, s.frozenAs, s.writing = nil, nil, nil
	s.readTok = 0
	s.broken = false
	if s.cfg.Shared {
		s.leading = false
		s.live.Leading = false
		s.liveDirty = true
	}
}

func (s *Sender) advanceLease() {
	if !s.cfg.Shared {
		return
	}
	if s.leading && !s.now.Before(s.leaseValid) {
		s.logger().Warn("sender lease not renewed in time; stopping sends for another process to take over")
		s.loseLease()
	}
	if s.leaseOp != nil || s.mode == stopped {
		return
	}
	switch {
	case !s.leading && s.mode == running && !s.now.Before(s.nextAcquire):
		s.leaseAt = s.now
		s.leaseOp = &LeaseOp{Tok: s.nextTok(), Kind: Acquire, TTL: s.cfg.LeaseTTL}
	case s.leading && !s.now.Before(s.nextRenew):
		s.leaseAt = s.now
		s.leaseOp = &LeaseOp{Tok: s.nextTok(), Kind: Renew, TTL: s.renewTTL()}
	default:
		return
	}
	s.out.Lease = s.leaseOp
}

// renewTTL is the length of the next renewal. While the AS has
// transactions to send, the lease must outlast a send started before the
// following renewal (a quarter of LeaseTTL later): SendTimeout plus half a
// LeaseTTL. Idle, it is LeaseTTL, so a process that dies idle is replaced
// within LeaseTTL; one that dies sending holds the AS until the AS must have
// given up on its transaction, as a resend under the same id could
// otherwise run beside it.
func (s *Sender) renewTTL() time.Duration {
	ttl := s.cfg.LeaseTTL
	if s.inflight == nil && !s.cover && len(s.q) == 0 {
		return ttl
	}
	return max(ttl, s.cfg.SendTimeout+ttl/2)
}

func (s *Sender) loseLease() {
	if s.inflight != nil {
		s.out.CancelSend = true
	}
	s.endTerm()
	s.nextAcquire = s.now
}

func (s *Sender) leaseDone(in LeaseDone) {
	op := s.leaseOp
	if op == nil || op.Tok != in.Tok {
		return
	}
	s.leaseOp = nil
	ttl := s.cfg.LeaseTTL
	switch op.Kind {
	case Acquire:
		if in.OK {
			s.logger().Info("sending for this appservice: lease acquired")
			s.leading, s.live.Leading, s.liveDirty = true, true, true
			s.warnedLease = false
			s.term++
			s.leaseValid = s.leaseAt.Add(op.TTL - ttl/4)
			s.nextRenew = s.leaseAt.Add(ttl / 4)
			s.recovered = false
			return
		}
		if in.Err != nil && !s.warnedLease {
			s.logger().Warn("acquiring the sender lease failed; retrying", zap.Error(in.Err))
			s.warnedLease = true
		}
		s.nextAcquire = s.now.Add(s.cfg.AcquireEvery)
	case Renew:
		if !s.leading {
			return
		}
		switch {
		case in.OK:
			// The store's expiry is now this renewal's, longer or shorter
			// than the last: trusting a longer earlier one would outlive it.
			s.leaseValid = s.leaseAt.Add(op.TTL - ttl/4)
			s.nextRenew = s.leaseAt.Add(ttl / 4)
		case in.Err == nil:
			s.logger().Warn("sender lease lost to another process; stopping sends")
			s.loseLease()
		default:
			s.logger().Warn("renewing the sender lease failed; retrying", zap.Error(in.Err))
			s.nextRenew = s.now.Add(ttl / 20)
		}
	case Release:
		// The term ended when the release was asked for.
	}
}

// --- recovery and reconciliation ---

func (s *Sender) recoverDone(in RecoverDone) {
	if in.Tok != s.recoverTok {
		return
	}
	s.recoverTok = 0
	if in.Err != nil {
		if errors.Is(in.Err, txnstore.ErrLeaseLost) && s.cfg.Shared {
			s.loseLease()
			return
		}
		s.storeFailed("recover", in.Err)
		return
	}
	s.storeFail = 0
	if s.reconcile {
		s.reconciled(in.Frozen, in.Delivered)
		return
	}
	if s.mode != running {
		return
	}
	s.recovered = true
	s.delivered = in.Delivered
	s.q, s.unbuilt, s.split = nil, 0, nil
	s.carry, s.carryBytes = nil, 0
	s.frozenEnd = in.Delivered
	var stale []int64
	for _, ft := range in.Frozen {
		if ft.Range.Last <= in.Delivered && s.cfg.Bug != BugDropCompletion {
			// Completed, its completion not yet applied: the cursor already
			// covers it, and its items may be gone.
			stale = append(stale, ft.ID)
			continue
		}
		s.q = append(s.q, &txn{Txn: ft})
		s.frozenEnd = max(s.frozenEnd, ft.Range.Last)
	}
	if len(stale) > 0 && s.cfg.Bug != BugDropCompletion {
		s.logger().Warn("dropping frozen transactions the cursor already covers", zap.Int64s("txn_ids", stale))
		s.writes = append(s.writes, &write{complete: stale})
	}
	s.unbuilt = len(s.q)
	s.fetchedTo = in.Delivered
	if len(s.q) > 0 {
		s.fetchedTo = s.q[0].Range.After
	}
	s.exhausted = false
	s.dirty = true
	s.readTok = 0 // a read still out was from the old position
	trust := in.HasEnd && !s.cfg.Shared && s.recoverGen == s.overflows
	if s.cfg.Bug == BugStaleEnd {
		trust = in.HasEnd && !s.cfg.Shared
	}
	if trust {
		// Every item committed after the store was read came as Committed
		// since the recover was issued and is in memory; those up to End
		// are read from the store. An AS with nothing past its cursor
		// reads nothing.
		s.trimMem(in.End)
		s.completeAfter = in.End
		return
	}
	// Memory was trimmed up to where the last term had read: from the
	// recovered position the store is read until it is caught up again.
	s.resetMem()
}

// reconciled settles the writes whose result was unknown against what the
// store holds: what landed is done, the rest is redone.
func (s *Sender) reconciled(frozen []txnstore.Txn, delivered int64) {
	s.reconcile = false
	byID := make(map[int64]*txnstore.Txn, len(frozen))
	for i := range frozen {
		byID[frozen[i].ID] = &frozen[i]
	}
	kept := s.writes[:0]
	for _, w := range s.writes {
		switch {
		case w.complete != nil:
			var left []int64
			for _, id := range w.complete {
				if _, ok := byID[id]; ok {
					left = append(left, id)
				}
			}
			if left == nil {
				continue
			}
			w.complete = left
		case w.save != nil:
			if t, ok := byID[w.save.ID]; !ok || t.Body != nil {
				continue
			}
		}
		kept = append(kept, w)
	}
	s.writes = kept
	if s.pending == nil {
		return
	}
	op, txns := s.pending, s.pendingTx
	s.pending, s.pendingTx = nil, nil
	// Did the freeze land? Its ranges are in the store, with ids we have
	// not seen, and the transaction it replaced is gone.
	var ids []int64
	for _, t := range txns {
		for _, f := range frozen {
			if f.Range == t.Range && f.Checksum == t.Checksum && f.Len == t.Len {
				ids = append(ids, f.ID)
				break
			}
		}
	}
	_, replacedLeft := byID[op.Replace]
	if len(ids) == len(txns) && (op.Replace == 0 || !replacedLeft) {
		s.logger().Info("a freeze reported failed had landed; going on with it", zap.Int64s("txn_ids", ids))
		s.frozeOK(op, txns, ids)
		return
	}
	if s.mode != running {
		if op.Replace != 0 {
			s.split = nil
		}
		return
	}
	s.issueFreeze(op.Replace, txns)
}

// storeFailed schedules a retry of a failed store op after a backoff.
func (s *Sender) storeFailed(what string, err error) {
	s.storeFail++
	wait := s.backoff(s.cfg.StoreRetry, s.cfg.StoreRetry[len(s.cfg.StoreRetry)-1], s.storeFail)
	s.retryAt = s.now.Add(wait)
	s.logger().Warn("store operation failed; retrying", zap.String("op", what), zap.Duration("backoff", wait), zap.Error(err))
}

// --- reading the stream ---

func (s *Sender) advanceRead() {
	if s.readTok != 0 || s.reconcile {
		return
	}
	// Read ahead: while the transactions frozen ahead go out, the next
	// read is on its way, not started once carry runs dry.
	need := s.unbuilt > 0 || (s.split == nil &&
		(len(s.q) < s.cfg.Depth && cut(s.carry, s.cutLimits(s.carry), s.target.Format) == len(s.carry) && s.carryBytes < s.readBytes() ||
			len(s.carry) < s.readItems()/2 && s.carryBytes < s.readBytes()/2))
	if !need {
		return
	}
	if !s.cfg.Shared && s.unbuilt == 0 && s.fetchedTo >= s.completeAfter {
		s.takeMem()
		return
	}
	if s.cfg.Shared && s.unbuilt == 0 && s.exhausted && !s.dirty && s.now.Before(s.pollAt) {
		return
	}
	if !s.now.Before(s.retryAt) {
		s.readTok = s.nextTok()
		s.readGen = s.overflows
		s.readAfter = s.fetchedTo
		s.dirty = false
		s.readMax = s.readItems()
		s.readLimit = s.readBytes()
		s.out.Read = &ReadOp{Tok: s.readTok, After: s.fetchedTo, MaxItems: s.readMax, MaxBytes: s.readLimit}
	}
}

// trimMem forgets the remembered items up to seq; an emptied memory lets
// go of its array.
func (s *Sender) trimMem(seq int64) {
	i := 0
	for i < len(s.mem) && s.mem[i].Seq <= seq {
		s.memBytes -= len(s.mem[i].Data)
		i++
	}
	s.mem = s.mem[i:]
	if len(s.mem) == 0 {
		s.mem = nil
	}
}

// takeMem takes the remembered items after fetchedTo.
func (s *Sender) takeMem() {
	s.trimMem(s.fetchedTo)
	if len(s.mem) == 0 {
		s.exhausted = true
		return
	}
	n := 0
	bytes := 0
	for n < len(s.mem) && (n == 0 || bytes < 2*s.readBytes()) {
		bytes += len(s.mem[n].Data)
		n++
	}
	s.take(s.mem[:n:n])
	s.exhausted = n == len(s.mem)
}

func (s *Sender) readDone(in ReadDone) {
	if in.Tok != s.readTok || s.readTok == 0 {
		return
	}
	s.readTok = 0
	if in.Err != nil {
		s.storeFailed("read", in.Err)
		return
	}
	if s.readAfter != s.fetchedTo {
		return // read from a position since given up
	}
	s.storeFail = 0
	// A read below both limits saw the end of the stream. The store stops
	// for bytes once its items reach MaxBytes; the margin also covers a
	// store that stops before the item that would cross it (unless that
	// item alone is over half of MaxBytes).
	bytes := 0
	for _, it := range in.Items {
		bytes += len(it.Data)
	}
	short := len(in.Items) < s.readMax && (s.readLimit <= 0 || 2*bytes < s.readLimit)
	if short && !s.cfg.Shared && s.readGen == s.overflows {
		// The read saw every committed item; later ones are in memory.
		last := s.readAfter
		if n := len(in.Items); n > 0 {
			last = in.Items[n-1].Seq
		}
		s.completeAfter = last
	}
	s.exhausted = short
	if s.cfg.Shared {
		s.pollAt = s.now.Add(s.cfg.PollInterval)
	}
	s.take(in.Items)
	if short && s.unbuilt > 0 {
		// The stream has nothing more: the transactions left to rebuild
		// lost items.
		s.finishRebuild()
	}
}

// take appends items (ascending, possibly overlapping what was taken) to
// the transactions being rebuilt, then to carry.
func (s *Sender) take(items []txnstore.Item) {
	for _, it := range items {
		if it.Seq <= s.fetchedTo {
			continue
		}
		s.fetchedTo = it.Seq
		for s.unbuilt > 0 {
			t := s.q[len(s.q)-s.unbuilt]
			if it.Seq > t.Range.Last {
				s.rebuilt(t)
				continue
			}
			t.items = append(t.items, it)
			if it.Seq == t.Range.Last {
				s.rebuilt(t)
			}
			break
		}
		if s.unbuilt == 0 && it.Seq > s.frozenEnd {
			s.carry = append(s.carry, it)
			s.carryBytes += len(it.Data)
		}
	}
}

func (s *Sender) finishRebuild() {
	for s.unbuilt > 0 {
		s.rebuilt(s.q[len(s.q)-s.unbuilt])
	}
}

// rebuilt finishes a transaction frozen by an earlier term: the body it was
// first sent with, or nothing ever goes out under its id.
func (s *Sender) rebuilt(t *txn) {
	s.unbuilt--
	if t.Body != nil {
		t.body, t.saved = t.Body, true
	} else {
		t.body = encode(t.items, Format(t.Format))
	}
	if len(t.body) != t.Len || checksum(t.body) != t.Checksum {
		if s.cfg.Bug == BugDropCompletion {
			s.logger().Error("rebuilt transaction differs from the one first sent; sending the rebuilt body", zap.Int64("txn_id", t.ID))
			return
		}
		s.broken = true
		msg := fmt.Sprintf("transaction %d cannot be rebuilt as first sent (%d bytes, want %d, checksum mismatch): its items are gone; delivery is paused, an operator must act", t.ID, len(t.body), t.Len)
		s.logger().Error("frozen transaction fails its checksum; never sending another body under its id; appservice paused",
			zap.Int64("txn_id", t.ID), zap.Int("len", len(t.body)), zap.Int("first_len", t.Len), zap.Int("items", len(t.items)))
		s.live.Up = false
		s.live.LastError = msg
		s.liveDirty = true
		s.out.Notes = append(s.out.Notes, Note{Kind: NoteBroken, Failures: s.live.Failures})
		st := txnstore.State{Up: false, Failures: s.live.Failures, LastSuccess: s.live.LastSuccess, LastError: msg, LastErrorAt: s.now}
		s.writes = append(s.writes, &write{state: &st})
	}
}

// --- freezing ---

func (s *Sender) limits() limits {
	return limits{events: s.cfg.Events, ephemeral: s.cfg.Ephemeral, toDevice: s.cfg.ToDevice, bytes: s.cfg.Bytes, keys: s.cfg.Ephemeral}
}

// cutLimits are the limits of the next transaction cut from items: the
// catch-up ones while items hold more than one transaction of the others.
func (s *Sender) cutLimits(items []txnstore.Item) limits {
	lim := s.limits()
	if s.cfg.CatchupEvents > lim.events && cut(items, lim, s.target.Format) < len(items) {
		lim.events = s.cfg.CatchupEvents
	}
	return lim
}

// readTxns is how many of the largest transactions one read fetches, and
// how many transactions of Bytes the frozen ones ahead may add up to.
const readTxns = 4

// readItems and readBytes bound one read of the stream: readTxns of the
// largest transactions, or Depth/8 transactions of the usual size if more,
// so that a catch-up of small transactions freezes many at once while a
// commit is slow (readBytes still bounds what a read holds). Reads of
// Depth/2 were no faster; reads of readTxns (2,000 items at the defaults)
// left each freeze about 20 transactions.
func (s *Sender) readItems() int {
	other := 3*s.cfg.Ephemeral + s.cfg.ToDevice // ephemeral, device lists, key counts
	return max(readTxns*(max(s.cfg.Events, s.cfg.CatchupEvents)+other), s.cfg.Depth/8*(s.cfg.Events+other))
}

func (s *Sender) readBytes() int { return readTxns * s.cfg.Bytes }

// aheadBytes adds up the bodies of the transactions frozen ahead.
func (s *Sender) aheadBytes() int {
	n := 0
	for _, t := range s.q {
		n += t.Len
	}
	return n
}

func (s *Sender) advanceFreeze() {
	if s.freezing != nil || s.pending != nil || s.reconcile || s.unbuilt > 0 || s.split != nil || len(s.carry) == 0 {
		return
	}
	f := s.target.Format
	var txns []*txn
	prev := s.frozenEnd
	carry := s.carry
	ahead := s.aheadBytes()
	for len(s.q)+len(txns) < s.cfg.Depth && len(carry) > 0 && (len(s.q)+len(txns) == 0 || ahead < s.readBytes()) {
		n := cut(carry, s.cutLimits(carry), f)
		// More items may join a partial transaction unless the stream was
		// read to its end or carry is full.
		more := s.readTok != 0 || (!s.exhausted && s.carryBytes < s.readBytes())
		if n == len(carry) && (len(s.q)+len(txns) > 0 || more) {
			// Hold a partial transaction back while another is queued or
			// in flight, or more items are on their way: what arrives
			// meanwhile joins it.
			break
		}
		body := encode(carry[:n], f)
		last := carry[n-1].Seq
		txns = append(txns, &txn{
			Txn:   txnstore.Txn{AS: s.cfg.Key, Range: txnstore.Range{After: prev, Last: last}, Format: uint32(f), Len: len(body), Checksum: checksum(body)},
			items: carry[:n:n], body: body,
		})
		carry = carry[n:]
		prev = last
		ahead += len(body)
	}
	if len(txns) == 0 {
		return
	}
	for _, t := range txns {
		for _, it := range t.items {
			s.carryBytes -= len(it.Data)
		}
	}
	s.carry = carry
	if len(s.carry) == 0 {
		s.carry = nil
	}
	s.frozenEnd = prev
	s.issueFreeze(0, txns)
}

func (s *Sender) issueFreeze(replace int64, txns []*txn) {
	recs := make([]txnstore.Txn, len(txns))
	for i, t := range txns {
		recs[i] = t.Txn
	}
	s.freezing = &FreezeOp{Tok: s.nextTok(), Replace: replace, Txns: recs}
	s.frozenAs = txns
	s.opsOut++
	s.out.Freeze = s.freezing
}

func (s *Sender) freezeDone(in FreezeDone) {
	s.opsOut--
	op, txns := s.freezing, s.frozenAs
	if op == nil || op.Tok != in.Tok {
		return
	}
	s.freezing, s.frozenAs = nil, nil
	if in.Err != nil {
		if errors.Is(in.Err, txnstore.ErrLeaseLost) && s.cfg.Shared {
			s.loseLease()
			return
		}
		if s.cfg.Bug == BugNoReconcile {
			s.storeFailed("freeze", in.Err)
			s.issueFreezeLater(op, txns)
			return
		}
		// Whether it landed is unknown: re-read before going on.
		s.pending, s.pendingTx = op, txns
		s.reconcile = true
		s.storeFailed("freeze", in.Err)
		return
	}
	s.storeFail = 0
	s.frozeOK(op, txns, in.IDs)
}

// issueFreezeLater is BugNoReconcile's retry: the same freeze, as is.
func (s *Sender) issueFreezeLater(op *FreezeOp, txns []*txn) {
	s.pending, s.pendingTx = op, txns
	s.reconcile = true
	s.bugRetry = true
}

func (s *Sender) frozeOK(op *FreezeOp, txns []*txn, ids []int64) {
	for i, t := range txns {
		t.ID = ids[i]
	}
	if op.Replace == 0 {
		s.q = append(s.q, txns...)
		return
	}
	s.split = nil
	if len(s.q) == 0 || s.q[0].ID != op.Replace {
		return
	}
	s.logger().Info("transaction too large for the appservice; split in two",
		zap.Int64("txn_id", op.Replace), zap.Int64s("new_txn_ids", ids), zap.Int("events", len(s.q[0].items)))
	if s.cfg.Bug == BugSplitOrder {
		txns = []*txn{txns[1], txns[0]}
	}
	s.q = append(append([]*txn(nil), txns...), s.q[1:]...)
}

// --- sending ---

func (s *Sender) advanceSend() {
	if s.inflight != nil || len(s.q) == 0 || s.split != nil || s.now.Before(s.nextSend) {
		return
	}
	t := s.q[0]
	if t.body == nil || t.ID == 0 {
		return
	}
	var deadline time.Time
	if s.cfg.Shared {
		deadline = s.now.Add(s.cfg.SendTimeout)
		if deadline.After(s.leaseValid) && s.cfg.Bug != BugNoLeaseCheck {
			// Not valid long enough for a whole send: renew first, for
			// long enough.
			s.cover = true
			if s.leaseOp == nil {
				s.nextRenew = s.now
				s.advanceLease()
			}
			return
		}
		s.cover = false
	}
	s.attempt++
	s.inflight, s.sendTerm, s.sentAt = t, s.term, s.now
	s.live.InFlight, s.liveDirty = t.ID, true
	s.out.Send = &SendOp{ID: t.ID, Body: t.body, Deadline: deadline}
}

func counts(items []txnstore.Item) (ev, eph, td int) {
	for _, it := range items {
		switch it.Kind {
		case txnstore.KindEphemeral:
			eph++
		case txnstore.KindToDevice:
			td++
		case txnstore.KindEvent:
			ev++
		}
	}
	return
}

func (s *Sender) sendDone(in SendDone) {
	t := s.inflight
	if t == nil || t.ID != in.ID {
		return
	}
	s.inflight = nil
	s.live.InFlight, s.liveDirty = 0, true
	if s.sendTerm != s.term || len(s.q) == 0 || s.q[0] != t {
		// The term ended meanwhile: the next one resends it, same id and
		// bytes.
		return
	}
	if in.Aborted {
		s.attempt--
		return
	}
	if in.Err == nil {
		s.delivered1(t, true)
		return
	}
	if in.TooLarge {
		if len(t.items) > 1 {
			s.splitTxn(t)
			return
		}
		if len(t.items) == 1 && len(t.items[0].Data) > MaxPDUBytes {
			s.logger().Error("appservice refuses a single item larger than Matrix's 64 KiB event limit; dropping it",
				zap.Int64("txn_id", t.ID), zap.Int("bytes", len(t.body)))
			s.out.Notes = append(s.out.Notes, Note{Kind: NoteDropped, Events: 1})
			s.delivered1(t, false)
			return
		}
		// A single event within Matrix's limits refused as too large is
		// the AS misbehaving: retried like any failure, never dropped.
	}
	s.failed(t, in)
}

// delivered1 records that the AS took q[0] (or that it can never be sent).
func (s *Sender) delivered1(t *txn, sent bool) {
	s.q = popFront(s.q)
	wasDown := !s.live.Up
	failures, attempt := s.live.Failures, s.attempt
	s.attempt = 0
	s.nextSend = time.Time{}
	s.live.Up, s.live.Failures, s.live.NextRetry = true, 0, time.Time{}
	s.live.LastSuccess = s.now
	s.liveDirty = true
	if sent {
		ev, eph, td := counts(t.items)
		s.out.Notes = append(s.out.Notes, Note{Kind: NoteSent, Took: s.now.Sub(s.sentAt), Events: ev, Ephemeral: eph, ToDevice: td})
	}
	if wasDown {
		s.logger().Info("appservice up again", zap.Int64("txn_id", t.ID), zap.Int("attempt", attempt), zap.Int("failures", failures),
			zap.Int("events", len(t.items)), zap.Duration("down_for", s.now.Sub(s.downSince)))
		st := txnstore.State{Up: true, LastSuccess: s.now, LastError: s.live.LastError}
		s.writes = append(s.writes, &write{state: &st})
	}
	s.queueComplete(t.ID)
}

// popFront drops q[0]. The array behind an idle AS's empty queue kept its
// last transaction, body and items, or its last write alive; it is let go.
func popFront[T any](q []*T) []*T {
	q[0] = nil
	if len(q) == 1 {
		return nil
	}
	return q[1:]
}

func (s *Sender) queueComplete(id int64) {
	if n := len(s.writes); n > 0 && s.writes[n-1] != s.writing && s.writes[n-1].complete != nil && len(s.writes[n-1].complete) < maxCompleteBatch {
		s.writes[n-1].complete = append(s.writes[n-1].complete, id)
		return
	}
	s.writes = append(s.writes, &write{complete: []int64{id}})
}

// maxCompleteBatch bounds the completions recorded in one write.
const maxCompleteBatch = 64

func (s *Sender) splitTxn(t *txn) {
	mid := len(t.items) / 2
	f := Format(t.Format)
	halves := [][]txnstore.Item{t.items[:mid:mid], t.items[mid:]}
	parts := make([]*txn, 2)
	after := t.Range.After
	for i, items := range halves {
		body := encode(items, f)
		last := items[len(items)-1].Seq
		if i == 1 {
			last = t.Range.Last
		}
		parts[i] = &txn{Txn: txnstore.Txn{AS: s.cfg.Key, Range: txnstore.Range{After: after, Last: last}, Format: t.Format, Len: len(body), Checksum: checksum(body)},
			items: items, body: body}
		after = last
	}
	s.split = t
	s.splitParts = parts
}

func (s *Sender) failed(t *txn, in SendDone) {
	if s.live.Up {
		s.downSince = s.now
	}
	wasUp := s.live.Up
	s.live.Failures++
	wait := s.backoff(s.cfg.Retry, s.cfg.RetryMax, s.live.Failures)
	if in.RetryAfter > wait {
		wait = min(in.RetryAfter, s.cfg.RetryMax) // the AS asked for a pause
	}
	s.nextSend = s.now.Add(wait)
	s.live.Up = false
	s.live.LastError = in.Err.Error()
	s.live.NextRetry = s.nextSend
	s.liveDirty = true
	s.out.Notes = append(s.out.Notes, Note{Kind: NoteFailed, Failures: s.live.Failures})
	fields := []zap.Field{zap.Int64("txn_id", t.ID), zap.Int("events", len(t.items)),
		zap.Int("attempt", s.attempt), zap.Duration("backoff", wait), zap.Error(in.Err)}
	if in.Status != 0 {
		fields = append(fields, zap.Int("status", in.Status))
	}
	switch {
	case in.TokenMismatch && wasUp:
		s.logger().Error("appservice rejected our hs_token (token mismatch); check its registration", fields...)
	case wasUp:
		s.logger().Warn("appservice down", fields...)
	default:
		s.logger().Debug("appservice still down", fields...)
	}
	if !t.saved {
		// Every retry, across restarts too, repeats these exact bytes.
		t.saved = true
		s.writes = append(s.writes, &write{save: &SaveBody{ID: t.ID, Body: t.body}})
	}
	st := txnstore.State{Up: false, Failures: s.live.Failures, LastSuccess: s.live.LastSuccess,
		LastError: s.live.LastError, LastErrorAt: s.now, NextRetry: s.nextSend}
	s.writes = append(s.writes, &write{state: &st})
}

// backoff is the wait after the n-th failure: a pure function of n and the
// injected random source.
func (s *Sender) backoff(sched []time.Duration, maxWait time.Duration, n int) time.Duration {
	b := sched[min(n, len(sched))-1]
	d := b/2 + time.Duration(s.rnd.Int64N(int64(b)+1))
	return max(min(d, maxWait), sched[0]/2)
}

// --- writes ---

func (s *Sender) advanceWrites() {
	if s.split != nil && s.freezing == nil && s.pending == nil && !s.reconcile && s.active() {
		if s.splitParts != nil {
			parts := s.splitParts
			s.splitParts = nil
			s.issueFreeze(s.split.ID, parts)
		}
	}
	if s.reconcile {
		if s.opsOut == 0 && s.recoverTok == 0 && !s.now.Before(s.retryAt) {
			if s.bugRetry {
				s.bugRetry = false
				s.reconcile = false
				op, txns := s.pending, s.pendingTx
				s.pending, s.pendingTx = nil, nil
				s.issueFreeze(op.Replace, txns)
				return
			}
			if !s.cfg.Shared || s.leading {
				s.recoverTok = s.nextTok()
				s.out.Recover = &RecoverOp{Tok: s.recoverTok}
			}
		}
		return
	}
	if s.writing != nil || len(s.writes) == 0 || s.now.Before(s.retryAt) || s.aborted {
		return
	}
	if s.freezing != nil {
		// Wait for the freeze: the writes queued meanwhile then go out
		// with the next one, and share its commit.
		return
	}
	if s.cfg.Shared && !s.leading {
		return
	}
	w := s.writes[0]
	s.writing = w
	s.writeTok = s.nextTok()
	s.opsOut++
	s.out.Writes = append(s.out.Writes, WriteOp{Tok: s.writeTok, Complete: w.complete, SaveBody: w.save, State: w.state})
}

func (s *Sender) writeDone(in WriteDone) {
	s.opsOut--
	w := s.writing
	if w == nil || in.Tok != s.writeTok {
		return
	}
	s.writing = nil
	if len(s.writes) == 0 || s.writes[0] != w {
		return // the term ended meanwhile
	}
	if in.Err == nil {
		s.storeFail = 0
		s.writes = popFront(s.writes)
		return
	}
	if errors.Is(in.Err, txnstore.ErrLeaseLost) && s.cfg.Shared {
		s.loseLease()
		return
	}
	w.fails++
	switch {
	case w.state != nil && w.fails >= 3:
		// Status only: not worth holding completions up for.
		s.logger().Warn("recording the appservice's state failed; giving up on this update", zap.Error(in.Err))
		s.writes = popFront(s.writes)
		return
	case w.complete != nil && s.cfg.Bug == BugDropCompletion:
		s.logger().Warn("recording delivered transactions failed", zap.Int64s("txn_ids", w.complete), zap.Error(in.Err))
		s.writes = popFront(s.writes)
		return
	}
	// Whether it landed is unknown: re-read, then redo what did not.
	s.reconcile = true
	s.storeFailed("write", in.Err)
}

// next is the earliest deadline the machine waits for.
func (s *Sender) next() time.Time {
	var t time.Time
	at := func(d time.Time) {
		// A deadline already passed was acted on when it passed, or waits
		// for an input: only future ones wake the machine.
		if d.After(s.now) && (t.IsZero() || d.Before(t)) {
			t = d
		}
	}
	if s.mode == stopped {
		return t
	}
	if s.cfg.Shared {
		if s.leading {
			at(s.leaseValid)
			if s.leaseOp == nil {
				at(s.nextRenew)
			}
		} else if s.leaseOp == nil && s.mode == running {
			at(s.nextAcquire)
		}
		if s.leading && s.readTok == 0 && s.exhausted && !s.dirty {
			at(s.pollAt)
		}
	}
	if s.now.Before(s.retryAt) {
		at(s.retryAt)
	}
	if s.inflight == nil && len(s.q) > 0 && s.now.Before(s.nextSend) {
		at(s.nextSend)
	}
	return t
}

// String describes the machine's state, for failing tests.
func (s *Sender) String() string {
	return fmt.Sprintf("mode=%d leading=%v recovered=%v recoverTok=%d reconcile=%v q=%d unbuilt=%d split=%v carry=%d fetchedTo=%d frozenEnd=%d readTok=%d exhausted=%v dirty=%v pollAt=%v freezing=%v pending=%v writes=%d writing=%v opsOut=%d inflight=%v broken=%v retryAt=%v nextSend=%v now=%v",
		s.mode, s.leading, s.recovered, s.recoverTok, s.reconcile, len(s.q), s.unbuilt, s.split != nil, len(s.carry), s.fetchedTo, s.frozenEnd,
		s.readTok, s.exhausted, s.dirty, s.pollAt, s.freezing != nil, s.pending != nil, len(s.writes), s.writing != nil, s.opsOut, s.inflight != nil, s.broken, s.retryAt, s.nextSend, s.now)
}
