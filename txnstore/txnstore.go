// Package txnstore is the durable state of the dispatcher: every item
// (event, ephemeral event, to-device message, device list change, key
// counts) stored once, one ordered
// stream per application service referencing it, the transactions frozen for
// each AS, and each AS's delivery state.
//
// Sequence numbers (Seq) are assigned at commit, strictly increasing in
// commit order, and never reused, even after garbage collection. An AS's
// stream is the ordered set of seqs appended for it. A transaction covers
// every item of one AS's stream in a half-open range (After, Last]; because
// items are immutable and the range is fixed when the transaction is frozen,
// the transaction's content is fixed too.
//
// SQLite (Open) is the embedded default, owned by one process. PostgreSQL
// (OpenPostgres) is shared by several processes: seqs stay in commit order
// across all of them, and a Leaser decides which process sends for each AS.
package txnstore

import (
	"context"
	"errors"
	"time"
)

// Kind says which part of a transaction body an item goes into.
type Kind uint8

// Item kinds.
const (
	KindEvent     Kind = 1 // "events": PDUs in client format
	KindEphemeral Kind = 2 // "ephemeral": typing, receipts, presence
	KindToDevice  Kind = 3 // "to_device": to-device messages
	// KindDeviceList is one user's device list news (MSC3202 "changed" or
	// "left"); a body carries each user once, as the latest item says.
	KindDeviceList Kind = 4
	// KindKeyCounts is one device's one-time key counts and unused
	// fallback key types (MSC3202); a body carries the latest per device.
	KindKeyCounts Kind = 5
)

// ASKey is the store's compact, stable number for an application service id.
type ASKey int32

// Item is one stored unit of delivery.
type Item struct {
	Seq  int64
	Kind Kind
	// Data is the item's JSON exactly as it goes into a transaction body.
	// Callers must not modify it.
	Data []byte
}

// Entry asks Append to store one item and add it to the streams of Targets.
type Entry struct {
	Kind Kind
	Data []byte
	// Targets are the ASes whose streams get the item, sorted ascending,
	// without duplicates. An entry without targets is not stored.
	Targets []ASKey
	// Stream and Pos, when Stream is set, place the entry in one of the
	// homeserver's streams (see Store.Position): an entry at or below the
	// stream's stored position is skipped, and the position moves to the
	// highest Pos of the commit, in the commit, targets or not. Pos is
	// above 0 and does not decrease along one stream's entries of a call.
	Stream string
	Pos    int64
}

// Committed is an entry as committed: its seq and targets. It is what
// Options.OnCommit receives, in commit order.
type Committed struct {
	Item    Item
	Targets []ASKey
}

// Range is the half-open seq range (After, Last] of one AS's stream.
type Range struct {
	After int64
	Last  int64
}

// Txn is a frozen transaction of one AS.
type Txn struct {
	AS ASKey
	// ID is unique per AS forever: a per-AS counter that is durably advanced
	// before the transaction is first sent.
	ID    int64
	Range Range
	// Format is the body layout the transaction was built with (opaque to
	// the store), so a rebuild after a restart lays the body out the same way.
	Format uint32
	// Len and Checksum (CRC-32C) describe the body sent the first time.
	Len      int
	Checksum uint32
	// Body is the exact body, stored after the first failed attempt so every
	// retry, across restarts too, repeats it byte for byte. Nil until then.
	Body []byte
}

// State is an AS's delivery state as last recorded.
type State struct {
	Up bool
	// Failures counts consecutive failed attempts (0 when up).
	Failures    int
	LastSuccess time.Time
	LastError   string
	LastErrorAt time.Time
	NextRetry   time.Time
}

// Status is a snapshot of one AS for operators.
type Status struct {
	ID  string
	Key ASKey
	State
	// Delivered is the last seq the AS acknowledged (its cursor).
	Delivered int64
	// PendingItems counts stream items after Delivered (including those in
	// frozen transactions); PendingTxns counts frozen transactions.
	PendingItems int64
	PendingTxns  int
	// OldestPending is when the oldest pending item was committed (zero if none).
	OldestPending time.Time
}

// ErrClosed is returned by every call after Close.
var ErrClosed = errors.New("txnstore: closed")

// Store is the durable state. All methods are safe for concurrent use.
// Writes of concurrent callers are merged into shared commits (group commit);
// a method that writes returns once its write is durable. An error of one
// call's input fails that call alone, never the others sharing its commit.
//
// A write can fail ambiguously: its commit landed but the caller got an
// error (a lost answer to COMMIT, the commit timeout). Each writing method
// says what repeating it then does; every one but Append may be repeated
// as it was until it succeeds.
type Store interface {
	// EnsureAS returns the key for an AS id, creating its stream if it is new.
	// A new AS starts at the current end of the log: it receives nothing
	// committed before it existed. Repeating it returns the same key.
	EnsureAS(ctx context.Context, id string) (ASKey, error)

	// Append durably stores the entries and appends each to its targets'
	// streams, in order. It returns the seq assigned to each entry (0 for an
	// entry without targets or skipped for its position). After an
	// ambiguous failure the entries may be stored: repeating the call
	// stores again those without a position (at least once) and skips
	// those with one (exactly once).
	Append(ctx context.Context, entries []Entry) ([]int64, error)

	// Position returns the highest position of stream that an Append
	// recorded, 0 if none did.
	Position(ctx context.Context, stream string) (int64, error)

	// Read returns as's stream items with seq > after, oldest first: at most
	// maxItems, and, if maxBytes > 0, it stops at the item whose Data brings
	// the total to maxBytes or over (that item included). So a read that
	// returns fewer than maxItems items holding under maxBytes reached the
	// end of the stream.
	Read(ctx context.Context, as ASKey, after int64, maxItems, maxBytes int) ([]Item, error)

	// Delivered returns as's cursor: every item up to it was acknowledged.
	Delivered(ctx context.Context, as ASKey) (int64, error)

	// Freeze durably records new transactions for as, taking the next ids of
	// its counter in order, and retires the transaction replace (if non-zero)
	// in the same commit (used to split a transaction the AS refused as too
	// large). The ranges must follow each other and every frozen one
	// (ErrBadRange), or exactly cover replace. Repeating a Freeze that
	// landed, with the same replace and the same transactions (ranges,
	// format, length and checksum), returns the ids it gave them.
	Freeze(ctx context.Context, as ASKey, replace int64, txns []Txn) ([]int64, error)

	// SaveBody stores the exact body of a frozen transaction. The first
	// body stays: saving the same bytes again succeeds, other bytes fail
	// with ErrBodyConflict.
	SaveBody(ctx context.Context, as ASKey, id int64, body []byte) error

	// Frozen returns as's frozen transactions in stream order (by
	// Range.After), which after a split is not id order. It never returns
	// one the cursor has passed or one a split replaced.
	Frozen(ctx context.Context, as ASKey) ([]Txn, error)

	// Complete records that the AS acknowledged transaction id: it is
	// deleted, the AS's cursor moves to its Range.Last, and stream entries
	// and items no stream needs any more become garbage. It fails with
	// ErrOutOfOrder while an earlier transaction of as is frozen: the
	// cursor never passes a transaction whose completion is not recorded.
	// Completing a transaction completed before succeeds and changes
	// nothing, so a Complete is repeated until it succeeds.
	Complete(ctx context.Context, as ASKey, id int64) error

	// SetState records as's delivery state. LastError is stored cleaned:
	// without NUL or invalid UTF-8, cut on a character boundary to 2 KiB.
	// Repeating it records the same state.
	SetState(ctx context.Context, as ASKey, st State) error

	// Statuses returns a snapshot of every AS the store knows.
	Statuses(ctx context.Context) ([]Status, error)

	// Close waits for pending writes and closes the store.
	Close() error
}

// Recovery is what a sender starts from, read in one snapshot: an AS's
// frozen transactions (as Store.Frozen returns them), its cursor (as
// Store.Delivered) and the end of its stream.
type Recovery struct {
	Frozen    []Txn
	Delivered int64
	// End is the last seq of the AS's stream, at least Delivered: an AS
	// whose End is its Delivered has nothing to send, and every item
	// appended for it later has a higher seq.
	End int64
}

// Recoverer is implemented by stores that read a sender's recovery in one
// query: for one AS, or for every AS at once when a process starts (one
// query where there were two per AS).
type Recoverer interface {
	// Recover returns as's recovery.
	Recover(ctx context.Context, as ASKey) (Recovery, error)
	// RecoverAll returns the recovery of every AS the store knows.
	RecoverAll(ctx context.Context) (map[ASKey]Recovery, error)
}

// ManyEnsurer is implemented by stores that add many ASes in one write.
type ManyEnsurer interface {
	// EnsureASes is EnsureAS of each id, keys[i] for ids[i], all in one
	// commit: what a process starting with thousands of new ASes needs.
	EnsureASes(ctx context.Context, ids []string) (keys []ASKey, err error)
}

// ErrLeaseLost fails a write for an AS whose sender lease this store took
// and no longer holds: another process may be sending for it now.
var ErrLeaseLost = errors.New("txnstore: sender lease lost")

// Leaser is implemented by stores that say which process sends for an AS.
// A lease is held by owner until it expires ttl after its last Acquire or
// Renew; a store that leased an AS refuses that AS's Freeze, Complete and
// SaveBody with ErrLeaseLost once the lease is gone, so a process that lost
// it cannot change what the new owner works from.
type Leaser interface {
	// Shared reports whether other processes write to the store: then a
	// sender must hold the lease of its AS and watch the store for items
	// committed elsewhere.
	Shared() bool
	// Acquire takes the lease of as for owner if it is free, expired or
	// already owner's, and reports whether owner holds it now.
	Acquire(ctx context.Context, as ASKey, owner string, ttl time.Duration) (bool, error)
	// Renew extends owner's lease by ttl from now; false means owner lost it.
	// After an error (ambiguous too), Acquire and Renew may be repeated:
	// the answer then is the lease as it is.
	Renew(ctx context.Context, as ASKey, owner string, ttl time.Duration) (bool, error)
	// Release gives up owner's lease so another process can take it at once.
	Release(ctx context.Context, as ASKey, owner string) error
}

// Options configure a store.
type Options struct {
	// OnCommit, if set, is called from the committing goroutine after each
	// commit that appended items, with those items in seq order, before the
	// Append calls of that commit return. It must be fast and must not call
	// the store.
	OnCommit func([]Committed)
}
