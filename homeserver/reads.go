package homeserver

import (
	"errors"
	"strconv"
	"strings"
)

func (s *Server) roomReadRoutes() []route {
	return []route{
		{"GET", v3 + "/joined_rooms", user, s.joinedRooms},
		{"GET", v3 + "/rooms/{room}/state", user, s.getState},
		{"GET", v3 + "/rooms/{room}/state/{type}", user, s.getStateEvent},
		{"GET", v3 + "/rooms/{room}/state/{type}/{key...}", user, s.getStateEvent},
		{"GET", v3 + "/rooms/{room}/members", user, s.members},
		{"GET", v3 + "/rooms/{room}/joined_members", user, s.joinedMembers},
		{"GET", v3 + "/rooms/{room}/event/{event}", user, s.getEvent},
		{"GET", v3 + "/rooms/{room}/messages", user, s.messages},
		{"GET", v3 + "/rooms/{room}/aliases", user, s.roomAliases},
	}
}

// historyRoom checks that the caller may read the {room}'s history and
// returns the last position it may see: everything while joined; up to
// its leave (or ban) after it left, as with Synapse's "shared" history.
func (s *Server) historyRoom(r *request) (string, int64, error) {
	roomID, err := r.roomParam()
	if err != nil {
		return "", 0, err
	}
	ctx := r.Context()
	m, err := s.membership(ctx, s.st.db, roomID, r.c.userID)
	if err != nil {
		return "", 0, err
	}
	switch m {
	case "join":
		return roomID, 1 << 62, nil
	case "leave", "ban":
		var upto int64
		if _, err := one(ctx, s.st.db, `SELECT COALESCE(MAX(seq), 0) FROM events WHERE room_id = ? AND type = 'm.room.member' AND state_key = ?`,
			[]any{roomID, r.c.userID}, &upto); err != nil {
			return "", 0, err
		}
		// A user who never joined (rejected an invite, banned before
		// joining) sees nothing.
		var joined int
		if _, err := one(ctx, s.st.db, `SELECT COUNT(*) FROM events WHERE room_id = ? AND type = 'm.room.member' AND state_key = ? AND json_extract(json, '$.content.membership') = 'join'`,
			[]any{roomID, r.c.userID}, &joined); err != nil {
			return "", 0, err
		}
		if joined > 0 {
			return roomID, upto, nil
		}
	}
	return "", 0, errForbidden.With("%s is not in the room", r.c.userID)
}

func (s *Server) joinedRooms(r *request) (any, error) {
	rooms, err := s.st.list(r.Context(), `SELECT room_id FROM memberships WHERE user_id = ? AND membership = 'join' ORDER BY room_id`, r.c.userID)
	if err != nil {
		return nil, err
	}
	if rooms == nil {
		rooms = []string{}
	}
	return map[string]any{"joined_rooms": rooms}, nil
}

// views returns events as the caller sees them.
func views(evs []*event, c *caller) []*event {
	out := make([]*event, len(evs))
	for i, ev := range evs {
		out[i] = ev.viewFor(c)
	}
	return out
}

func (s *Server) getState(r *request) (any, error) {
	roomID, err := s.joinedRoom(r)
	if err != nil {
		return nil, err
	}
	evs, err := s.roomState(r.Context(), s.st.db, roomID)
	if err != nil {
		return nil, err
	}
	return views(evs, r.c), nil
}

// getStateEvent answers the content of one state event; the state key may
// be empty, with or without the trailing slash. ?format=event answers the
// whole event.
func (s *Server) getStateEvent(r *request) (any, error) {
	roomID, err := s.joinedRoom(r)
	if err != nil {
		return nil, err
	}
	typ, key := r.PathValue("type"), r.PathValue("key")
	ev, err := s.stateEvent(r.Context(), s.st.db, roomID, typ, key)
	if err != nil {
		return nil, err
	}
	if ev == nil {
		return nil, errNotFound.With("no %s state event with key %q", typ, key)
	}
	if r.query("format") == "event" {
		return ev.viewFor(r.c), nil
	}
	return ev.Content, nil
}

func (s *Server) members(r *request) (any, error) {
	roomID, err := s.joinedRoom(r)
	if err != nil {
		return nil, err
	}
	only, not := r.query("membership"), r.query("not_membership")
	evs, err := queryEvents(r.Context(), s.st.db, `SELECT `+eventCols+` FROM events WHERE event_id IN
		(SELECT event_id FROM room_state WHERE room_id = ? AND type = 'm.room.member') ORDER BY seq`, roomID)
	if err != nil {
		return nil, err
	}
	chunk := []*event{}
	for _, ev := range evs {
		m := ev.membership()
		if (only != "" && m != only) || (not != "" && m == not) {
			continue
		}
		chunk = append(chunk, ev.viewFor(r.c))
	}
	return map[string]any{"chunk": chunk}, nil
}

type joinedMember struct {
	DisplayName *string `json:"display_name,omitempty"`
	AvatarURL   *string `json:"avatar_url,omitempty"`
}

func (s *Server) joinedMembers(r *request) (any, error) {
	roomID, err := s.joinedRoom(r)
	if err != nil {
		return nil, err
	}
	evs, err := queryEvents(r.Context(), s.st.db, `SELECT `+eventCols+` FROM events WHERE event_id IN
		(SELECT event_id FROM room_state WHERE room_id = ? AND type = 'm.room.member') ORDER BY seq`, roomID)
	if err != nil {
		return nil, err
	}
	joined := map[string]joinedMember{}
	for _, ev := range evs {
		if ev.membership() != "join" {
			continue
		}
		var jm joinedMember
		if v, ok := ev.Content["displayname"].(string); ok {
			jm.DisplayName = &v
		}
		if v, ok := ev.Content["avatar_url"].(string); ok {
			jm.AvatarURL = &v
		}
		joined[*ev.StateKey] = jm
	}
	return map[string]any{"joined": joined}, nil
}

// getEvent answers 404 to a caller who may not read the room, as the spec
// (and Synapse) do: an event it may not see is one not found.
func (s *Server) getEvent(r *request) (any, error) {
	roomID, upto, err := s.historyRoom(r)
	if errors.Is(err, errForbidden) {
		return nil, errNotFound.With("event not found")
	}
	if err != nil {
		return nil, err
	}
	ev, err := s.eventByID(r.Context(), s.st.db, r.PathValue("event"))
	if err != nil {
		return nil, err
	}
	if ev == nil || ev.RoomID != roomID || ev.seq > upto {
		return nil, errNotFound.With("event not found")
	}
	return ev.viewFor(r.c), nil
}

// Pagination tokens: "t<N>" is the position after event N of the events
// table; a /sync token ("s<N>_...") works too.
func parsePos(tok string) (int64, bool) {
	switch {
	case strings.HasPrefix(tok, "t"):
		n, err := strconv.ParseInt(tok[1:], 10, 64)
		return n, err == nil && n >= 0
	case strings.HasPrefix(tok, "s"):
		p, ok := parseSince(tok)
		return p.events, ok
	}
	return 0, false
}

func posToken(n int64) string { return "t" + strconv.FormatInt(n, 10) }

// messages pages through a room's timeline: dir=b (default) backwards from
// `from` (default: the newest event), dir=f forwards (default: the start),
// stopping at `to`; at most `limit` events (default 10, at most 1000).
func (s *Server) messages(r *request) (any, error) {
	roomID, upto, err := s.historyRoom(r)
	if err != nil {
		return nil, err
	}
	dir := r.query("dir")
	if dir == "" {
		dir = "b"
	}
	if dir != "b" && dir != "f" {
		return nil, errInvalidParam.With("dir must be b or f")
	}
	limit, err := r.intParam("limit", 10)
	if err != nil {
		return nil, err
	}
	limit = min(max(limit, 1), 1000)
	ctx := r.Context()
	var from int64
	if f := r.query("from"); f != "" {
		var ok bool
		if from, ok = parsePos(f); !ok {
			return nil, errInvalidParam.With("invalid from token")
		}
	} else if dir == "b" {
		if _, err := one(ctx, s.st.db, `SELECT COALESCE(MAX(seq), 0) FROM events`, nil, &from); err != nil {
			return nil, err
		}
	}
	to := int64(-1)
	if t := r.query("to"); t != "" {
		var ok bool
		if to, ok = parsePos(t); !ok {
			return nil, errInvalidParam.With("invalid to token")
		}
	}
	var evs []*event
	if dir == "b" {
		evs, err = queryEvents(ctx, s.st.db, `SELECT `+eventCols+` FROM events WHERE room_id = ? AND seq <= ? AND seq > ? ORDER BY seq DESC LIMIT ?`,
			roomID, min(from, upto), max(to, 0), limit+1)
	} else {
		upper := to
		if upper < 0 {
			upper = 1 << 62
		}
		upper = min(upper, upto)
		evs, err = queryEvents(ctx, s.st.db, `SELECT `+eventCols+` FROM events WHERE room_id = ? AND seq > ? AND seq <= ? ORDER BY seq LIMIT ?`,
			roomID, from, upper, limit+1)
	}
	if err != nil {
		return nil, err
	}
	more := len(evs) > limit
	if more {
		evs = evs[:limit]
	}
	out := map[string]any{"chunk": views(evs, r.c), "start": posToken(from)}
	if more && len(evs) > 0 {
		last := evs[len(evs)-1].seq
		if dir == "b" {
			last--
		}
		out["end"] = posToken(last)
	}
	return out, nil
}

func (s *Server) roomAliases(r *request) (any, error) {
	roomID, err := s.joinedRoom(r)
	if err != nil {
		return nil, err
	}
	aliases, err := s.st.list(r.Context(), `SELECT alias FROM aliases WHERE room_id = ? ORDER BY alias`, roomID)
	if err != nil {
		return nil, err
	}
	if aliases == nil {
		aliases = []string{}
	}
	return map[string]any{"aliases": aliases}, nil
}

// joinedRoom checks that the caller is joined to the {room} of the path.
func (s *Server) joinedRoom(r *request) (string, error) {
	roomID, err := r.roomParam()
	if err != nil {
		return "", err
	}
	m, err := s.membership(r.Context(), s.st.db, roomID, r.c.userID)
	if err != nil {
		return "", err
	}
	if m != "join" {
		return "", errForbidden.With("%s is not in the room", r.c.userID)
	}
	return roomID, nil
}
