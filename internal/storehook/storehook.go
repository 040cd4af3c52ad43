// Package storehook holds the test seams of txnstore: fault injection
// into its commits and lease calls, and smaller byte bounds. It is
// internal so that only this module's tests can reach it; a store opened
// with a context carrying Hooks uses them for its whole life.
package storehook

import (
	"context"
	"errors"
)

// Op is the kind of a store write.
type Op uint8

// Op kinds.
const (
	EnsureAS Op = iota + 1
	Append
	Freeze
	SaveBody
	Complete
	State
	Lease // Acquire, Renew and Release
)

var opNames = [...]string{"", "ensureas", "append", "freeze", "savebody", "complete", "state", "lease"}

func (o Op) String() string {
	if int(o) < len(opNames) {
		return opNames[o]
	}
	return "op?"
}

// Fault is what happens to one commit (or one lease call).
type Fault uint8

// Faults.
const (
	// None lets the commit go through.
	None Fault = iota
	// Fail fails the commit before it is made, as a full disk would:
	// nothing of it lands and each of its ops gets ErrInjected.
	Fail
	// Ambiguous makes the commit and then reports a failure, as a lost
	// answer to COMMIT or a commit timeout would: everything of it landed,
	// each of its ops gets ErrInjected, and OnCommit is not called for it
	// (SQLite, which knows what landed, passes its items to the next one).
	Ambiguous
)

// ErrInjected is the error of an injected fault.
var ErrInjected = errors.New("storehook: injected fault")

// Hooks are the seams of one store.
type Hooks struct {
	// Commit, if set, is called before each commit with the kind of each of
	// its ops (one entry per op, in order; test-internal ops are absent),
	// and before each lease call with []Op{Lease}. It may block to make
	// the commit slow. It is called from the store's writing goroutine
	// for commits and from the caller's for lease calls.
	Commit func(ops []Op) Fault
	// StmtBytes bounds the bytes one statement binds, BatchBytes those of
	// one group commit (an op larger than it still commits, alone); zero
	// keeps the store's default.
	StmtBytes, BatchBytes int
}

type ctxKey struct{}

// With returns ctx carrying h: pass it to txnstore.Open or OpenPostgres.
func With(ctx context.Context, h *Hooks) context.Context {
	return context.WithValue(ctx, ctxKey{}, h)
}

// From returns the hooks of ctx, nil if none.
func From(ctx context.Context) *Hooks {
	h, _ := ctx.Value(ctxKey{}).(*Hooks)
	return h
}

// Decide calls h.Commit for ops; None if h or h.Commit is nil.
func (h *Hooks) Decide(ops []Op) Fault {
	if h == nil || h.Commit == nil {
		return None
	}
	return h.Commit(ops)
}
