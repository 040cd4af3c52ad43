package dispatcher

import (
	"context"
	"fmt"
	"slices"
	"sync"

	lru "github.com/hashicorp/golang-lru/v2"

	"github.com/asdispatch/asdispatch/namespace"
	"github.com/asdispatch/asdispatch/registry"
)

// room is what the dispatcher knows of one room: which ASes are interested in
// it because of a local directory alias or a local joined member in their
// namespaces. It changes only with membership events and InvalidateRoom, so
// it is kept, not recomputed per event.
//
// A room in the cache is never modified: a Submit that changes it works on
// its own copy and puts the copy in the cache once its append has committed.
type room struct {
	// members maps each local joined member that some AS's users namespace
	// covers to those ASes.
	members map[string][]int32
	aliases map[string][]int32
	// interested is the sorted union of the ASes of members and aliases.
	interested []int32
}

// roomLocks serializes the calls that read or change one room's interest.
// A Submit holds the locks of its rooms from its decision until its append
// has committed, so that a room's events are decided and committed in the
// same order. The table is the Dispatcher's, shared by the room caches of
// every registration Set, so a reload does not open a second way in.
type roomLocks struct {
	mu sync.Mutex
	m  map[string]*roomLock
	// free recycles unused locks: most calls find their room unlocked, and
	// deciding an event should not allocate.
	free []*roomLock
}

const maxFreeRoomLocks = 64

type roomLock struct {
	ch chan struct{} // holds a value while locked; a channel, so a wait can end with ctx
	// refs counts holders and waiters; gen counts InvalidateRoom calls.
	// Both are guarded by roomLocks.mu.
	refs int
	gen  uint64
}

func newRoomLocks() *roomLocks { return &roomLocks{m: map[string]*roomLock{}} }

// lock locks the room, then calls read under ls.mu, so that read sees the
// room's gen and cache entry as one.
func (ls *roomLocks) lock(ctx context.Context, roomID string, read func(*roomLock)) (*roomLock, error) {
	ls.mu.Lock()
	l := ls.m[roomID]
	if l == nil {
		if n := len(ls.free); n > 0 {
			l, ls.free = ls.free[n-1], ls.free[:n-1]
		} else {
			l = &roomLock{ch: make(chan struct{}, 1)}
		}
		ls.m[roomID] = l
	}
	l.refs++
	select {
	case l.ch <- struct{}{}: // free: the usual case, one critical section
		read(l)
		ls.mu.Unlock()
		return l, nil
	default:
	}
	ls.mu.Unlock()
	select {
	case l.ch <- struct{}{}:
	case <-ctx.Done():
		ls.drop(roomID, l)
		return nil, ctx.Err()
	}
	ls.mu.Lock()
	read(l)
	ls.mu.Unlock()
	return l, nil
}

func (ls *roomLocks) unlock(roomID string, l *roomLock) {
	<-l.ch
	ls.drop(roomID, l)
}

func (ls *roomLocks) drop(roomID string, l *roomLock) {
	ls.mu.Lock()
	if l.refs--; l.refs == 0 {
		delete(ls.m, roomID)
		if len(ls.free) < maxFreeRoomLocks {
			ls.free = append(ls.free, l) // gen need not restart: it is compared within one hold
		}
	}
	ls.mu.Unlock()
}

// rooms caches room interest for one registration Set: AS indices are only
// meaningful within it, so a reload starts a new cache.
type rooms struct {
	set   *registry.Set
	state RoomState
	locks *roomLocks
	cache *lru.Cache[string, *room] // written under locks.mu, see store
}

func newRooms(set *registry.Set, state RoomState, size int, locks *roomLocks) *rooms {
	c, err := lru.New[string, *room](size)
	if err != nil {
		panic(err) // only for size <= 0, which the caller never passes
	}
	return &rooms{set: set, state: state, locks: locks, cache: c}
}

// heldRoom is a room locked by one call, and its state as the call's events
// change it.
type heldRoom struct {
	id   string
	lock *roomLock
	// gen is the lock's gen when r was read: if it moved, InvalidateRoom
	// ran since and r must not go back into the cache.
	gen uint64
	r   *room
	// own is set once r is the call's private copy.
	own bool
}

// acquire locks the room and reads its interest, loading it from RoomState
// if the cache does not hold it.
func (rs *rooms) acquire(ctx context.Context, roomID string) (heldRoom, error) {
	h := heldRoom{id: roomID}
	var r *room
	var ok bool
	// Read gen and the cache entry together, as InvalidateRoom changes them.
	l, err := rs.locks.lock(ctx, roomID, func(l *roomLock) {
		h.gen = l.gen
		r, ok = rs.cache.Get(roomID)
	})
	if err != nil {
		return heldRoom{}, err
	}
	h.lock = l
	if !ok {
		if r, err = rs.load(ctx, roomID); err != nil {
			rs.locks.unlock(roomID, l)
			return heldRoom{}, err
		}
		rs.store(&h, r)
	}
	h.r = r
	return h, nil
}

// release unlocks a room acquire returned.
func (rs *rooms) release(h *heldRoom) { rs.locks.unlock(h.id, h.lock) }

// store puts r in the cache as the room's interest, unless InvalidateRoom
// ran since h's room was read. The caller holds the room's lock.
func (rs *rooms) store(h *heldRoom, r *room) {
	rs.locks.mu.Lock()
	if h.lock.gen == h.gen {
		rs.cache.Add(h.id, r)
	}
	rs.locks.mu.Unlock()
}

// forget drops a room so the next event reloads it from RoomState, and
// keeps the calls holding it from putting back what they read before.
func (rs *rooms) forget(roomID string) {
	rs.locks.mu.Lock()
	if l := rs.locks.m[roomID]; l != nil {
		l.gen++
	}
	rs.cache.Remove(roomID)
	rs.locks.mu.Unlock()
}

func (rs *rooms) load(ctx context.Context, roomID string) (*room, error) {
	r := &room{members: make(map[string][]int32), aliases: make(map[string][]int32)}
	if rs.state != nil {
		members, err := rs.state.JoinedLocalMembers(ctx, roomID)
		if err != nil {
			return nil, fmt.Errorf("joined members of %s: %w", roomID, err)
		}
		aliases, err := rs.state.LocalAliases(ctx, roomID)
		if err != nil {
			return nil, fmt.Errorf("aliases of %s: %w", roomID, err)
		}
		for _, m := range members {
			if o := owners(rs.set.UsersInterested(nil, m)); o != nil {
				r.members[m] = o
			}
		}
		for _, a := range aliases {
			if o := owners(rs.set.AliasesInterested(nil, a)); o != nil {
				r.aliases[a] = o
			}
		}
	}
	r.recompute()
	return r, nil
}

func owners(hits []namespace.Hit) []int32 {
	if len(hits) == 0 {
		return nil
	}
	out := make([]int32, len(hits))
	for i, h := range hits {
		out[i] = int32(h.Owner)
	}
	return out
}

// apply updates h's room from an event of it, copying the room before its
// first change. Only local membership changes interest: aliases come from
// the room directory alone (RoomState, refreshed by InvalidateRoom), never
// from m.room.canonical_alias content, so that interest does not depend on
// whether the room happened to be cached when the event went by.
func (rs *rooms) apply(h *heldRoom, ev *Event) {
	if ev.Type != "m.room.member" || ev.StateKey == nil {
		return
	}
	user := *ev.StateKey
	if rs.state != nil && !rs.state.IsLocalUser(user) {
		return // only local members count (MSC3905)
	}
	_, had := h.r.members[user]
	var o []int32
	switch join := ev.Membership == "join"; {
	case join && !had:
		if o = owners(rs.set.UsersInterested(nil, user)); o == nil {
			return
		}
	case !join && had:
	default:
		return
	}
	if !h.own {
		h.r, h.own = h.r.clone(), true
	}
	if o != nil {
		h.r.members[user] = o
	} else {
		delete(h.r.members, user)
	}
	h.r.recompute()
}

func (r *room) clone() *room {
	return &room{members: clonedMap(r.members), aliases: r.aliases, interested: slices.Clone(r.interested)}
}

func clonedMap(m map[string][]int32) map[string][]int32 {
	out := make(map[string][]int32, len(m)+1)
	for k, v := range m {
		out[k] = v
	}
	return out
}

func (r *room) recompute() {
	r.interested = r.interested[:0]
	for _, o := range r.members {
		r.interested = append(r.interested, o...)
	}
	for _, o := range r.aliases {
		r.interested = append(r.interested, o...)
	}
	slices.Sort(r.interested)
	r.interested = slices.Compact(r.interested)
}
