package txnstore

import (
	"context"
	"sync"
)

// maxOpsPerCommit bounds the ops one commit serves.
const maxOpsPerCommit = 4096

// writer is a store's one writing goroutine: callers queue ops, and every
// op queued by the time a commit starts goes into that commit (group
// commit), so concurrent callers share its fsync.
type writer[T any] struct {
	mu     sync.RWMutex // guards closed against sends on ops
	closed bool
	ops    chan T
	done   chan struct{}
}

func newWriter[T any]() *writer[T] {
	return &writer[T]{ops: make(chan T, 1024), done: make(chan struct{})}
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
// maxOpsPerCommit. False once the writer is closed and drained.
func (w *writer[T]) next() ([]T, bool) {
	o, ok := <-w.ops
	if !ok {
		return nil, false
	}
	batch := []T{o}
	for len(batch) < maxOpsPerCommit {
		select {
		case o, ok := <-w.ops:
			if !ok {
				return batch, true
			}
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
func (w *writer[T]) idle() bool { return len(w.ops) == 0 }

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
