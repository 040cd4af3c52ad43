package homeserver

import "strings"

func (s *Server) miscRoutes() []route {
	return []route{
		{"GET", v3 + "/pushrules/", user, s.pushRules},
		{"GET", v3 + "/publicRooms", public, s.publicRooms},
		{"POST", v3 + "/publicRooms", user, typed(s.publicRoomsPost)},
		{"GET", v3 + "/rooms/{room}/context/{event}", user, s.eventContext},
		{"GET", "/.well-known/matrix/client", public, s.wellKnown},
	}
}

// wellKnown points clients at the address they reached: the stub serves
// the client API itself.
func (s *Server) wellKnown(r *request) (any, error) {
	scheme := "http"
	if r.TLS != nil {
		scheme = "https"
	}
	return map[string]any{"m.homeserver": map[string]string{"base_url": scheme + "://" + r.Host}}, nil
}

// pushRules answers an empty rule set: the stub sends no notifications.
func (s *Server) pushRules(*request) (any, error) {
	empty := []any{}
	return map[string]any{"global": map[string]any{"content": empty, "override": empty, "room": empty, "sender": empty, "underride": empty}}, nil
}

type publicRoom struct {
	RoomID           string  `json:"room_id"`
	Name             *string `json:"name,omitempty"`
	Topic            *string `json:"topic,omitempty"`
	CanonicalAlias   *string `json:"canonical_alias,omitempty"`
	NumJoinedMembers int     `json:"num_joined_members"`
	WorldReadable    bool    `json:"world_readable"`
	GuestCanJoin     bool    `json:"guest_can_join"`
	JoinRule         string  `json:"join_rule"`
}

func (s *Server) publicRooms(r *request) (any, error) {
	limit, err := r.intParam("limit", 100)
	if err != nil {
		return nil, err
	}
	return s.listPublicRooms(r, limit, "")
}

func (s *Server) publicRoomsPost(r *request, req *struct {
	Limit  int `json:"limit"`
	Filter struct {
		GenericSearchTerm string `json:"generic_search_term"`
	} `json:"filter"`
}) (any, error) {
	if req.Limit <= 0 {
		req.Limit = 100
	}
	return s.listPublicRooms(r, req.Limit, req.Filter.GenericSearchTerm)
}

// listPublicRooms lists the rooms published to the directory (visibility
// public), with their name, topic, alias and joined members.
func (s *Server) listPublicRooms(r *request, limit int, search string) (any, error) {
	ctx := r.Context()
	ids, err := s.st.list(ctx, `SELECT room_id FROM rooms WHERE visibility = 'public' ORDER BY room_id LIMIT ?`, min(limit, 1000))
	if err != nil {
		return nil, err
	}
	chunk := []publicRoom{}
	for _, id := range ids {
		pr := publicRoom{RoomID: id}
		for _, f := range []struct {
			typ, key string
			dst      **string
		}{{"m.room.name", "name", &pr.Name}, {"m.room.topic", "topic", &pr.Topic}, {"m.room.canonical_alias", "alias", &pr.CanonicalAlias}} {
			ev, err := s.stateEvent(ctx, s.st.db, id, f.typ, "")
			if err != nil {
				return nil, err
			}
			if ev != nil {
				if v, ok := ev.Content[f.key].(string); ok {
					*f.dst = &v
				}
			}
		}
		if pr.JoinRule, err = s.joinRule(ctx, s.st.db, id); err != nil {
			return nil, err
		}
		if _, err := one(ctx, s.st.db, `SELECT COUNT(*) FROM memberships WHERE room_id = ? AND membership = 'join'`, []any{id}, &pr.NumJoinedMembers); err != nil {
			return nil, err
		}
		if search != "" && !matches(search, pr.Name, pr.Topic, pr.CanonicalAlias) {
			continue
		}
		chunk = append(chunk, pr)
	}
	return map[string]any{"chunk": chunk, "total_room_count_estimate": len(chunk)}, nil
}

func matches(term string, fields ...*string) bool {
	for _, f := range fields {
		if f != nil && containsFold(*f, term) {
			return true
		}
	}
	return false
}

// eventContext answers an event with up to `limit` events before and after
// it and the room's current state.
func (s *Server) eventContext(r *request) (any, error) {
	roomID, err := s.joinedRoom(r)
	if err != nil {
		return nil, err
	}
	limit, err := r.intParam("limit", 10)
	if err != nil {
		return nil, err
	}
	limit = min(limit, 100)
	ctx := r.Context()
	ev, err := s.eventByID(ctx, s.st.db, r.PathValue("event"))
	if err != nil {
		return nil, err
	}
	if ev == nil || ev.RoomID != roomID {
		return nil, errNotFound.With("event not found")
	}
	before, err := queryEvents(ctx, s.st.db, `SELECT `+eventCols+` FROM events WHERE room_id = ? AND seq < ? ORDER BY seq DESC LIMIT ?`, roomID, ev.seq, limit/2)
	if err != nil {
		return nil, err
	}
	after, err := queryEvents(ctx, s.st.db, `SELECT `+eventCols+` FROM events WHERE room_id = ? AND seq > ? ORDER BY seq LIMIT ?`, roomID, ev.seq, limit-limit/2)
	if err != nil {
		return nil, err
	}
	state, err := s.roomState(ctx, s.st.db, roomID)
	if err != nil {
		return nil, err
	}
	start, end := ev.seq-1, ev.seq
	if len(before) > 0 {
		start = before[len(before)-1].seq - 1
	}
	if len(after) > 0 {
		end = after[len(after)-1].seq
	}
	return map[string]any{"event": ev.viewFor(r.c), "events_before": views(before, r.c), "events_after": views(after, r.c),
		"state": views(state, r.c), "start": posToken(start), "end": posToken(end)}, nil
}

func containsFold(s, sub string) bool {
	return strings.Contains(strings.ToLower(s), strings.ToLower(sub))
}
