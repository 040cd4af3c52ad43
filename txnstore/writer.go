package txnstore

import (
	"context"
	"database/sql"
	"errors"
	"sync"

	"github.com/asdispatch/asdispatch/internal/storehook"
)

const (
	// maxOpsPerCommit bounds the ops one commit serves.
	maxOpsPerCommit = 4096
	// defaultBatchBytes bounds the bytes one commit writes (an op larger
	// than that commits alone): 500 callers appending 2 MiB each must not
	// make one commit of a gigabyte.
	defaultBatchBytes = 128 << 20
	// defaultStmtBytes bounds the bytes one statement binds: PostgreSQL
	// refuses a message over 1 GiB.
	defaultStmtBytes = 16 << 20
)

// writer is a store's one writing goroutine: callers queue ops, and every
// op queued by the time a commit starts goes into that commit (group
// commit), so concurrent callers share its fsync.
type writer[T any] struct {
	mu     sync.RWMutex // guards closed against sends on ops
	closed bool
	ops    chan T
	done   chan struct{}

	// Owned by the writing goroutine.
	size     func(T) int // bytes an op writes
	maxBytes int
	held     []T // an op taken that did not fit the last batch
}

func newWriter[T any](size func(T) int, maxBytes int) *writer[T] {
	if maxBytes <= 0 {
		maxBytes = defaultBatchBytes
	}
	return &writer[T]{ops: make(chan T, 1024), done: make(chan struct{}), size: size, maxBytes: maxBytes}
}

// start runs commit on each batch of queued ops until close.
func (w *writer[T]) start(commit func([]T)) {
	go func() {
		defer close(w.done)
		for {
			ops, ok := w.next()
			if !ok {
				return
			}
			commit(ops)
		}
	}()
}

// next waits for an op and takes every op already queued behind it, up to
// maxOpsPerCommit ops and maxBytes bytes. False once the writer is closed
// and drained.
func (w *writer[T]) next() ([]T, bool) {
	var o T
	if len(w.held) > 0 {
		o, w.held = w.held[0], w.held[:0]
	} else {
		var ok bool
		if o, ok = <-w.ops; !ok {
			return nil, false
		}
	}
	batch := []T{o}
	bytes := w.size(o)
	for len(batch) < maxOpsPerCommit {
		select {
		case o, ok := <-w.ops:
			if !ok {
				return batch, true
			}
			n := w.size(o)
			if bytes+n > w.maxBytes {
				w.held = append(w.held, o)
				return batch, true
			}
			bytes += n
			batch = append(batch, o)
		default:
			return batch, true
		}
	}
	return batch, true
}

// queue hands o to the writer: ErrClosed after close, ctx's error if ctx
// ends first. Once queued, the op is committed or failed whatever ctx says:
// a caller that gave up must not leave a write it believes undone.
func (w *writer[T]) queue(ctx context.Context, o T) error {
	w.mu.RLock()
	defer w.mu.RUnlock()
	if w.closed {
		return ErrClosed
	}
	select {
	case w.ops <- o:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// idle reports whether no op is waiting for a commit.
func (w *writer[T]) idle() bool { return len(w.ops) == 0 && len(w.held) == 0 }

// close stops taking ops and waits until the queued ones are committed.
// False if it was closed already.
func (w *writer[T]) close() bool {
	w.mu.Lock()
	if w.closed {
		w.mu.Unlock()
		return false
	}
	w.closed = true
	close(w.ops)
	w.mu.Unlock()
	<-w.done
	return true
}

// decide asks h what happens to the commit of ops.
func decide[T any](h *storehook.Hooks, ops []T, kind func(T) storehook.Op) storehook.Fault {
	if h == nil || h.Commit == nil {
		return storehook.None
	}
	ks := make([]storehook.Op, 0, len(ops))
	for _, o := range ops {
		if k := kind(o); k != 0 {
			ks = append(ks, k)
		}
	}
	return h.Commit(ks)
}

// leaseFault is the injected error of a lease call of a store with
// nothing to write for it (nil if none).
func leaseFault(h *storehook.Hooks) error {
	if h.Decide([]storehook.Op{storehook.Lease}) != storehook.None {
		return storehook.ErrInjected
	}
	return nil
}

// batchSize adds up the bytes ops write.
func batchSize[T any](ops []T, size func(T) int) int {
	n := 0
	for _, o := range ops {
		n += size(o)
	}
	return n
}

// runOps runs each op of a commit: an op's refused call (a callError) is
// its answer in errs, any other error ends the commit and returns the
// index of the op that failed.
func runOps[T any](ops []T, errs []error, run func(T) error) (int, error) {
	for i, o := range ops {
		if err := run(o); err != nil {
			var ce callError
			if errors.As(err, &ce) {
				errs[i] = ce.error
				continue
			}
			return i, err
		}
	}
	return -1, nil
}

// commitOps commits tx, the transaction of ops, unless h fails it. landed
// reports a commit that happened although an error is returned (an
// injected ambiguous failure).
func commitOps[T any](tx *sql.Tx, h *storehook.Hooks, ops []T, kind func(T) storehook.Op) (landed bool, err error) {
	fault := decide(h, ops, kind)
	if fault == storehook.Fail {
		return false, storehook.ErrInjected
	}
	if err := tx.Commit(); err != nil {
		return false, err
	}
	if fault == storehook.Ambiguous {
		return true, storehook.ErrInjected
	}
	return false, nil
}
