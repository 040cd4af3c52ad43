package homeserver

import (
	"context"
	"encoding/json"
	"sort"
	"sync"
	"time"
)

// typingState is who types where. It is in memory, as on Synapse: typing
// does not survive a restart. Each change takes the next serial, at least
// the wall clock in milliseconds, so serials handed out in /sync tokens
// before a restart stay below the ones after it.
type typingState struct {
	mu     sync.Mutex
	serial int64
	rooms  map[string]*roomTyping
}

type roomTyping struct {
	until   map[string]time.Time
	changed int64
}

func (t *typingState) bump() int64 {
	t.serial = max(t.serial+1, time.Now().UnixMilli())
	return t.serial
}

// set records a typing change and returns who types in the room now.
func (t *typingState) set(roomID, userID string, on bool, until time.Time) []string {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.rooms == nil {
		t.rooms = map[string]*roomTyping{}
	}
	rt := t.rooms[roomID]
	if rt == nil {
		rt = &roomTyping{until: map[string]time.Time{}}
		t.rooms[roomID] = rt
	}
	if on {
		rt.until[userID] = until
	} else {
		delete(rt.until, userID)
	}
	rt.changed = t.bump()
	return rt.users(time.Now())
}

// expire ends a typing notice that was not renewed since.
func (t *typingState) expire(roomID, userID string, until time.Time) bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	rt := t.rooms[roomID]
	if rt == nil || !rt.until[userID].Equal(until) {
		return false
	}
	delete(rt.until, userID)
	rt.changed = t.bump()
	return true
}

func (rt *roomTyping) users(now time.Time) []string {
	out := []string{}
	for u, until := range rt.until {
		if now.Before(until) {
			out = append(out, u)
		}
	}
	sort.Strings(out)
	return out
}

func (t *typingState) current() int64 {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.serial
}

// since returns who types in roomID and whether that changed after serial
// (initial: whether anyone types).
func (t *typingState) since(roomID string, serial int64, initial bool) ([]string, bool) {
	t.mu.Lock()
	defer t.mu.Unlock()
	rt := t.rooms[roomID]
	if rt == nil {
		return nil, false
	}
	users := rt.users(time.Now())
	if initial {
		return users, len(users) > 0
	}
	return users, rt.changed > serial
}

// setTyping records a typing notice, wakes /sync, and ends it at its
// timeout (default 30 s, at most 2 min) unless renewed.
func (s *Server) setTyping(roomID, userID string, on bool, timeout time.Duration) []string {
	if timeout <= 0 {
		timeout = 30 * time.Second
	}
	timeout = min(timeout, 2*time.Minute)
	until := time.Now().Add(timeout)
	users := s.typers.set(roomID, userID, on, until)
	s.wake()
	if on {
		time.AfterFunc(timeout, func() {
			if s.typers.expire(roomID, userID, until) {
				s.wake()
			}
		})
	}
	return users
}

// ephemeralFor returns a joined room's ephemeral events for viewer between
// two sync positions: receipts (private ones only to their owner) and the
// typing state if it changed.
func (s *Server) ephemeralFor(ctx context.Context, viewer, roomID string, from, now syncPos, initial bool) ([]json.RawMessage, error) {
	var out []json.RawMessage
	rows, err := s.st.db.QueryContext(ctx, `SELECT user_id, type, event_id, ts FROM receipts WHERE room_id = ? AND pos > ? AND pos <= ? ORDER BY pos`,
		roomID, from.receipts, now.receipts)
	if err != nil {
		return nil, err
	}
	content := map[string]map[string]map[string]any{}
	for rows.Next() {
		var user, typ, eventID string
		var ts int64
		if err := rows.Scan(&user, &typ, &eventID, &ts); err != nil {
			rows.Close()
			return nil, err
		}
		if typ == "m.read.private" && user != viewer {
			continue
		}
		if content[eventID] == nil {
			content[eventID] = map[string]map[string]any{}
		}
		if content[eventID][typ] == nil {
			content[eventID][typ] = map[string]any{}
		}
		content[eventID][typ][user] = map[string]int64{"ts": ts}
	}
	rows.Close()
	if err := rows.Err(); err != nil {
		return nil, err
	}
	if len(content) > 0 {
		js, _ := json.Marshal(map[string]any{"type": "m.receipt", "content": content})
		out = append(out, js)
	}
	if users, changed := s.typers.since(roomID, from.typing, initial); changed {
		js, _ := json.Marshal(map[string]any{"type": "m.typing", "content": map[string]any{"user_ids": users}})
		out = append(out, js)
	}
	return out, nil
}
