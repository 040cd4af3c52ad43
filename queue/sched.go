package queue

import (
	"container/heap"
	"runtime"
	"sync"
	"time"
)

// sched runs every slot's machine on shared resources, so that an idle AS
// costs its slot and nothing more: no goroutine, no timer. Slots with work
// (an input, a kick, a deadline passed) wait in a FIFO ready queue that at
// most maxWorkers short-lived goroutines drain; the machines' deadlines sit
// in one heap behind one timer armed for the earliest. A slot is stepped by
// one worker at a time.
type sched struct {
	wg *sync.WaitGroup // counts the workers

	mu         sync.Mutex
	ready      []*slot
	head       int // ready[head:] wait
	workers    int
	maxWorkers int
	deadlines  deadlineHeap
	timer      *time.Timer // fires at deadlines[0].due
	armed      time.Time   // when timer fires; zero: stopped
	closed     bool
}

func newSched(wg *sync.WaitGroup) *sched {
	s := &sched{wg: wg, maxWorkers: max(2, runtime.GOMAXPROCS(0))}
	s.timer = time.AfterFunc(time.Hour, s.fire)
	s.timer.Stop()
	return s
}

// enqueue puts sl on the ready queue; its caller has just marked it
// scheduled, so it is not there already.
func (s *sched) enqueue(sl *slot) {
	s.mu.Lock()
	if s.head > 0 && s.head == len(s.ready) {
		clear(s.ready)
		s.ready, s.head = s.ready[:0], 0
	}
	s.ready = append(s.ready, sl)
	spawn := s.workers < s.maxWorkers
	if spawn {
		s.workers++
		s.wg.Add(1)
	}
	s.mu.Unlock()
	if spawn {
		go s.work()
	}
}

// work steps ready slots until there are none, then ends.
func (s *sched) work() {
	defer s.wg.Done()
	for {
		s.mu.Lock()
		if s.head == len(s.ready) {
			s.workers--
			s.mu.Unlock()
			return
		}
		sl := s.ready[s.head]
		s.ready[s.head] = nil
		s.head++
		s.mu.Unlock()
		sl.step()
	}
}

// setDeadline makes sl due at t (zero: never).
func (s *sched) setDeadline(sl *slot, t time.Time) {
	s.mu.Lock()
	defer s.mu.Unlock()
	switch {
	case t.IsZero() && sl.hidx >= 0:
		heap.Remove(&s.deadlines, sl.hidx)
	case t.IsZero():
		return
	case sl.hidx >= 0:
		sl.due = t
		heap.Fix(&s.deadlines, sl.hidx)
	default:
		sl.due = t
		heap.Push(&s.deadlines, sl)
	}
	s.arm()
}

// arm sets the timer for the earliest deadline; s.mu is held.
func (s *sched) arm() {
	if s.closed || len(s.deadlines) == 0 {
		if !s.armed.IsZero() {
			s.timer.Stop()
			s.armed = time.Time{}
		}
		return
	}
	first := s.deadlines[0].due
	if s.armed.IsZero() || first.Before(s.armed) {
		s.armed = first
		s.timer.Reset(time.Until(first))
	}
}

// fire kicks the slots whose deadline has passed.
func (s *sched) fire() {
	now := time.Now()
	var due []*slot
	s.mu.Lock()
	s.armed = time.Time{}
	for len(s.deadlines) > 0 && !s.deadlines[0].due.After(now) {
		due = append(due, heap.Pop(&s.deadlines).(*slot))
	}
	s.arm()
	s.mu.Unlock()
	for _, sl := range due {
		sl.kick()
	}
}

// close stops the timer for good.
func (s *sched) close() {
	s.mu.Lock()
	s.closed = true
	s.arm()
	s.mu.Unlock()
}

// deadlineHeap orders slots by due; each knows its index (-1: not in it).
type deadlineHeap []*slot

func (h deadlineHeap) Len() int           { return len(h) }
func (h deadlineHeap) Less(i, j int) bool { return h[i].due.Before(h[j].due) }
func (h deadlineHeap) Swap(i, j int) {
	h[i], h[j] = h[j], h[i]
	h[i].hidx, h[j].hidx = i, j
}

func (h *deadlineHeap) Push(x any) {
	sl := x.(*slot)
	sl.hidx = len(*h)
	*h = append(*h, sl)
}

func (h *deadlineHeap) Pop() any {
	old := *h
	sl := old[len(old)-1]
	old[len(old)-1] = nil
	*h = old[:len(old)-1]
	sl.hidx = -1
	return sl
}
