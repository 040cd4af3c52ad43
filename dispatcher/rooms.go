package dispatcher

import (
	"context"
	"encoding/json"
	"fmt"
	"slices"
	"strings"
	"sync"

	lru "github.com/hashicorp/golang-lru/v2"

	"github.com/asdispatch/asdispatch/namespace"
	"github.com/asdispatch/asdispatch/registry"
)

// room is what the dispatcher knows of one room: which ASes are interested in
// it because of a local alias or a local joined member in their namespaces.
// It changes only with membership and alias events, so it is kept, not
// recomputed per event.
type room struct {
	mu     sync.Mutex
	loaded bool
	// members maps each local joined member that some AS's users namespace
	// covers to those ASes.
	members map[string][]int32
	aliases map[string][]int32
	// interested is the sorted union of the ASes of members and aliases.
	interested []int32
}

// rooms caches room interest for one registration Set: AS indices are only
// meaningful within it, so a reload starts a new cache.
type rooms struct {
	set   *registry.Set
	state RoomState
	mu    sync.Mutex
	cache *lru.Cache[string, *room]
}

func newRooms(set *registry.Set, state RoomState, size int) *rooms {
	c, err := lru.New[string, *room](size)
	if err != nil {
		panic(err) // only for size <= 0, which the caller never passes
	}
	return &rooms{set: set, state: state, cache: c}
}

// lock returns the room, loaded from RoomState if it is cold, and locked.
func (rs *rooms) lock(ctx context.Context, roomID string) (*room, error) {
	rs.mu.Lock()
	r, ok := rs.cache.Get(roomID)
	if !ok {
		r = &room{}
		rs.cache.Add(roomID, r)
	}
	rs.mu.Unlock()
	r.mu.Lock()
	if !r.loaded {
		if err := rs.load(ctx, roomID, r); err != nil {
			r.mu.Unlock()
			return nil, err
		}
	}
	return r, nil
}

func (rs *rooms) load(ctx context.Context, roomID string, r *room) error {
	r.members = make(map[string][]int32)
	r.aliases = make(map[string][]int32)
	if rs.state != nil {
		members, err := rs.state.JoinedLocalMembers(ctx, roomID)
		if err != nil {
			return fmt.Errorf("joined members of %s: %w", roomID, err)
		}
		aliases, err := rs.state.LocalAliases(ctx, roomID)
		if err != nil {
			return fmt.Errorf("aliases of %s: %w", roomID, err)
		}
		for _, m := range members {
			rs.addMember(r, m)
		}
		for _, a := range aliases {
			rs.addAlias(r, a)
		}
	}
	r.loaded = true
	r.recompute()
	return nil
}

// forget drops a room so the next event reloads it from RoomState.
func (rs *rooms) forget(roomID string) {
	rs.mu.Lock()
	rs.cache.Remove(roomID)
	rs.mu.Unlock()
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

func (rs *rooms) addMember(r *room, userID string) {
	if o := owners(rs.set.UsersInterested(nil, userID)); o != nil {
		r.members[userID] = o
	}
}

func (rs *rooms) addAlias(r *room, alias string) {
	if o := owners(rs.set.AliasesInterested(nil, alias)); o != nil {
		r.aliases[alias] = o
	}
}

// apply updates the room from an event of it. The caller holds r.mu.
func (rs *rooms) apply(ctx context.Context, r *room, roomID string, ev *Event) {
	switch {
	case ev.Type == "m.room.member" && ev.StateKey != nil:
		user := *ev.StateKey
		if rs.state != nil && !rs.state.IsLocalUser(user) {
			return // only local members count (MSC3905)
		}
		_, had := r.members[user]
		if ev.Membership == "join" {
			if !had {
				rs.addMember(r, user)
				r.recompute()
			}
		} else if had {
			delete(r.members, user)
			r.recompute()
		}
	case ev.Type == "m.room.canonical_alias" || ev.Type == "m.room.aliases":
		// The directory is the authority on local aliases; the event may
		// name ones it has not recorded yet.
		r.aliases = make(map[string][]int32)
		if rs.state != nil {
			if aliases, err := rs.state.LocalAliases(ctx, roomID); err == nil {
				for _, a := range aliases {
					rs.addAlias(r, a)
				}
			} else {
				r.loaded = false // ask again on the next event
			}
		}
		suffix := ":" + rs.set.ServerName()
		for _, a := range aliasesOf(ev.JSON) {
			if strings.HasSuffix(a, suffix) {
				rs.addAlias(r, a)
			}
		}
		r.recompute()
	}
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

// aliasesOf reads the aliases named by an m.room.canonical_alias
// (alias, alt_aliases) or m.room.aliases (aliases) event.
func aliasesOf(eventJSON []byte) []string {
	var ev struct {
		Content struct {
			Alias      string   `json:"alias"`
			AltAliases []string `json:"alt_aliases"`
			Aliases    []string `json:"aliases"`
		} `json:"content"`
	}
	if json.Unmarshal(eventJSON, &ev) != nil {
		return nil
	}
	out := append(ev.Content.AltAliases, ev.Content.Aliases...)
	if ev.Content.Alias != "" {
		out = append(out, ev.Content.Alias)
	}
	return out
}
