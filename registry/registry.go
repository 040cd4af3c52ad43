package registry

import "sync/atomic"

// Registry holds the current Set. Reloading builds a new Set and swaps it in;
// readers keep using the Set they loaded until they load again.
type Registry struct {
	cur atomic.Pointer[Set]
}

// NewRegistry returns a Registry holding set.
func NewRegistry(set *Set) *Registry {
	r := &Registry{}
	r.cur.Store(set)
	return r
}

// Current returns the current Set.
func (r *Registry) Current() *Set { return r.cur.Load() }

// Swap makes set current and returns the previous one.
func (r *Registry) Swap(set *Set) (old *Set) { return r.cur.Swap(set) }
