package queue

import "sync"

// maxReads bounds the store reads (recoveries and reads of the stream) in
// flight at once, across every AS. The stores answer a few at a time
// (SQLite has 4 read connections, PostgreSQL 10): past that, a read in
// flight is only a goroutine and its stack parked on the pool. At start
// every AS recovers at once; unbounded, 10,000 ASes parked ~10,000
// goroutines and 60 MiB of stacks there.
const maxReads = 64

// compactReads is how many run reads the FIFO's head may hold before
// the waiting ones move down.
const compactReads = 1024

// reads runs store reads on at most max short-lived goroutines; the others
// wait in a FIFO as closures. No goroutine is left once it is empty.
type reads struct {
	mu      sync.Mutex
	waiting []func()
	head    int // waiting[head:] wait
	running int
	max     int
}

// do runs f once fewer than max reads run.
func (r *reads) do(f func()) {
	r.mu.Lock()
	if r.running >= r.max {
		r.waiting = append(r.waiting, f)
		r.mu.Unlock()
		return
	}
	r.running++
	r.mu.Unlock()
	go r.run(f)
}

// run runs f, then the waiting reads, until none is left.
func (r *reads) run(f func()) {
	for f != nil {
		f()
		r.mu.Lock()
		f = nil
		if r.head < len(r.waiting) {
			f = r.waiting[r.head]
			r.waiting[r.head] = nil
			r.head++
		} else {
			r.running--
		}
		if r.head == len(r.waiting) {
			// Drained: the backing array of a burst is not kept.
			r.waiting, r.head = nil, 0
		} else if r.head >= compactReads && 2*r.head >= len(r.waiting) {
			// Never drained under a steady load: the slots already run
			// are let go, or the array would grow with every read.
			n := copy(r.waiting, r.waiting[r.head:])
			clear(r.waiting[n:])
			r.waiting, r.head = r.waiting[:n], 0
		}
		r.mu.Unlock()
	}
}
