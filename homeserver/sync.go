package homeserver

import (
	"context"
	"encoding/json"
	"fmt"
	"strconv"
	"strings"
	"time"
)

func (s *Server) syncRoutes() []route {
	return []route{
		{"GET", v3 + "/sync", user, s.sync},
	}
}

// syncPos is a /sync token: positions in the events, account data,
// to-device, receipt and device list streams, and the typing serial. Its
// text is "s<events>_<account data>_<to-device>_<receipts>_<typing>_<device
// lists>"; tokens of earlier versions (the first three or five parts) are
// accepted too, the missing positions read as 0.
type syncPos struct {
	events, accountData, toDevice, receipts, typing, deviceLists int64
}

func (p syncPos) String() string {
	return fmt.Sprintf("s%d_%d_%d_%d_%d_%d", p.events, p.accountData, p.toDevice, p.receipts, p.typing, p.deviceLists)
}

func parseSince(tok string) (syncPos, bool) {
	parts := strings.Split(strings.TrimPrefix(tok, "s"), "_")
	if !strings.HasPrefix(tok, "s") || (len(parts) != 3 && len(parts) != 5 && len(parts) != 6) {
		return syncPos{}, false
	}
	var n [6]int64
	for i, p := range parts {
		v, err := strconv.ParseInt(p, 10, 64)
		if err != nil || v < 0 {
			return syncPos{}, false
		}
		n[i] = v
	}
	return syncPos{n[0], n[1], n[2], n[3], n[4], n[5]}, true
}

// syncFilter is the part of a filter the stub applies; unknown fields are
// ignored, as the spec asks.
type syncFilter struct {
	Room struct {
		Timeline struct {
			Limit *int `json:"limit"`
		} `json:"timeline"`
		IncludeLeave bool `json:"include_leave"`
	} `json:"room"`
}

type eventList struct {
	Events []*event `json:"events"`
}

type timeline struct {
	Events    []*event `json:"events"`
	Limited   bool     `json:"limited"`
	PrevBatch string   `json:"prev_batch,omitempty"`
}

type joinedRoomSync struct {
	Timeline            timeline       `json:"timeline"`
	State               eventList      `json:"state"`
	AccountData         rawEventList   `json:"account_data"`
	Ephemeral           rawEventList   `json:"ephemeral"`
	UnreadNotifications map[string]int `json:"unread_notifications"`
	Summary             map[string]any `json:"summary"`
}

type leftRoomSync struct {
	Timeline    timeline     `json:"timeline"`
	State       eventList    `json:"state"`
	AccountData rawEventList `json:"account_data"`
}

type strippedEvent struct {
	Type     string         `json:"type"`
	StateKey string         `json:"state_key"`
	Sender   string         `json:"sender"`
	Content  map[string]any `json:"content"`
}

type invitedRoomSync struct {
	InviteState struct {
		Events []strippedEvent `json:"events"`
	} `json:"invite_state"`
}

type rawEventList struct {
	Events []json.RawMessage `json:"events"`
}

type respSync struct {
	NextBatch string `json:"next_batch"`
	Rooms     struct {
		Join   map[string]*joinedRoomSync  `json:"join"`
		Invite map[string]*invitedRoomSync `json:"invite"`
		Leave  map[string]*leftRoomSync    `json:"leave"`
	} `json:"rooms"`
	AccountData rawEventList   `json:"account_data"`
	ToDevice    rawEventList   `json:"to_device"`
	Presence    rawEventList   `json:"presence"`
	DeviceLists deviceLists    `json:"device_lists"`
	OTKCount    map[string]int `json:"device_one_time_keys_count"`
	// UnusedFallback is set for a caller with a device: [] says "no unused
	// fallback key" (clients then upload one), absent says "not supported".
	UnusedFallback []string `json:"device_unused_fallback_key_types,omitzero"`
}

func (r *respSync) empty() bool {
	return len(r.Rooms.Join) == 0 && len(r.Rooms.Invite) == 0 && len(r.Rooms.Leave) == 0 &&
		len(r.AccountData.Events) == 0 && len(r.ToDevice.Events) == 0 &&
		len(r.DeviceLists.Changed) == 0 && len(r.DeviceLists.Left) == 0
}

// sync answers /sync for any local user, AS users included: rooms joined
// (timeline with limited and prev_batch, state), invited and left, global
// and room account data, and to-device messages. With since and timeout
// it waits until something arrives or the timeout passes.
func (s *Server) sync(r *request) (any, error) {
	var f syncFilter
	if fs := r.query("filter"); fs != "" {
		js := []byte(fs)
		if !strings.HasPrefix(strings.TrimSpace(fs), "{") {
			var err error
			if js, err = s.filterJSON(r.Context(), r.c.userID, fs); err != nil {
				return nil, errInvalidParam.With("unknown filter %s", fs)
			}
		}
		if err := json.Unmarshal(js, &f); err != nil {
			return nil, errBadJSON.With("invalid filter")
		}
	}
	limit := 10
	if f.Room.Timeline.Limit != nil {
		limit = min(max(*f.Room.Timeline.Limit, 1), 1000)
	}
	var since *syncPos
	if tok := r.query("since"); tok != "" {
		p, ok := parseSince(tok)
		if !ok {
			return nil, errInvalidParam.With("invalid since token")
		}
		since = &p
	}
	timeout, err := r.intParam("timeout", 0)
	if err != nil {
		return nil, err
	}
	fullState := r.query("full_state") == "true"
	ctx := r.Context()
	deadline := time.NewTimer(time.Duration(timeout) * time.Millisecond)
	defer deadline.Stop()
	for {
		changed := s.changed()
		out, err := s.syncOnce(ctx, r.c, since, limit, fullState, f.Room.IncludeLeave)
		if err != nil {
			return nil, err
		}
		if since == nil || fullState || !out.empty() || timeout == 0 {
			return out, nil
		}
		select {
		case <-changed:
		case <-deadline.C:
			return out, nil
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
}

func (s *Server) syncOnce(ctx context.Context, c *caller, since *syncPos, limit int, fullState, includeLeave bool) (*respSync, error) {
	db := s.st.db
	var now syncPos
	now.typing = s.typers.current()
	if _, err := one(ctx, db, `SELECT (SELECT COALESCE(MAX(seq), 0) FROM events), (SELECT COALESCE(MAX(pos), 0) FROM account_data),
		(SELECT COALESCE(MAX(seq), 0) FROM to_device), (SELECT COALESCE(MAX(pos), 0) FROM receipts), (SELECT COALESCE(MAX(pos), 0) FROM device_lists)`,
		nil, &now.events, &now.accountData, &now.toDevice, &now.receipts, &now.deviceLists); err != nil {
		return nil, err
	}
	from := syncPos{}
	if since != nil {
		from = *since
	}
	out := &respSync{NextBatch: now.String(), DeviceLists: deviceLists{Changed: []string{}, Left: []string{}}, OTKCount: map[string]int{}}
	// Device lists are news since the token; an initial sync has none.
	if since != nil {
		dl, err := s.deviceListsBetween(ctx, c.userID, from, now)
		if err != nil {
			return nil, err
		}
		out.DeviceLists = dl
	}
	if c.deviceID != "" {
		kc, err := keyCounts(ctx, db, c.userID, c.deviceID)
		if err != nil {
			return nil, err
		}
		out.OTKCount, out.UnusedFallback = kc.OneTimeKeys, kc.UnusedFallback
	}
	out.Rooms.Join, out.Rooms.Invite, out.Rooms.Leave = map[string]*joinedRoomSync{}, map[string]*invitedRoomSync{}, map[string]*leftRoomSync{}
	out.AccountData.Events, out.ToDevice.Events, out.Presence.Events = []json.RawMessage{}, []json.RawMessage{}, []json.RawMessage{}

	rows, err := db.QueryContext(ctx, `SELECT room_id, membership FROM memberships WHERE user_id = ? ORDER BY room_id`, c.userID)
	if err != nil {
		return nil, err
	}
	memberships := map[string]string{}
	var order []string
	for rows.Next() {
		var room, m string
		if err := rows.Scan(&room, &m); err != nil {
			rows.Close()
			return nil, err
		}
		memberships[room] = m
		order = append(order, room)
	}
	rows.Close()
	if err := rows.Err(); err != nil {
		return nil, err
	}
	for _, roomID := range order {
		m := memberships[roomID]
		// The user's latest membership event in the window, if any.
		var memberSeq int64
		if _, err := one(ctx, db, `SELECT COALESCE(MAX(seq), 0) FROM events WHERE room_id = ? AND type = 'm.room.member' AND state_key = ? AND seq > ? AND seq <= ?`,
			[]any{roomID, c.userID, from.events, now.events}, &memberSeq); err != nil {
			return nil, err
		}
		switch m {
		case "join":
			jr, err := s.syncJoined(ctx, c, roomID, since, from, now, limit, fullState || since == nil || memberSeq > 0)
			if err != nil {
				return nil, err
			}
			eph, err := s.ephemeralFor(ctx, c.userID, roomID, from, now, since == nil)
			if err != nil {
				return nil, err
			}
			if jr == nil && len(eph) > 0 {
				jr = newJoinedRoomSync()
			}
			if jr != nil {
				jr.Ephemeral.Events = append(jr.Ephemeral.Events, eph...)
				out.Rooms.Join[roomID] = jr
			}
		case "invite":
			if since != nil && memberSeq == 0 {
				continue
			}
			ir, err := s.syncInvited(ctx, roomID, c.userID)
			if err != nil {
				return nil, err
			}
			out.Rooms.Invite[roomID] = ir
		case "leave", "ban":
			if (since == nil && !includeLeave) || (since != nil && memberSeq == 0) {
				continue
			}
			upto := memberSeq
			if upto == 0 {
				if _, err := one(ctx, db, `SELECT COALESCE(MAX(seq), 0) FROM events WHERE room_id = ? AND type = 'm.room.member' AND state_key = ?`, []any{roomID, c.userID}, &upto); err != nil {
					return nil, err
				}
			}
			tl, err := s.syncTimeline(ctx, c, roomID, from.events, upto, limit)
			if err != nil {
				return nil, err
			}
			out.Rooms.Leave[roomID] = &leftRoomSync{Timeline: tl, State: eventList{Events: []*event{}}, AccountData: rawEventList{Events: []json.RawMessage{}}}
		}
	}

	// Account data: global at the top, per room in each joined room.
	adRows, err := db.QueryContext(ctx, `SELECT room_id, type, json FROM account_data WHERE user_id = ? AND pos > ? AND pos <= ? ORDER BY pos`, c.userID, from.accountData, now.accountData)
	if err != nil {
		return nil, err
	}
	type ad struct {
		room string
		js   json.RawMessage
	}
	var ads []ad
	for adRows.Next() {
		var room, typ string
		var content json.RawMessage
		if err := adRows.Scan(&room, &typ, &content); err != nil {
			adRows.Close()
			return nil, err
		}
		js, _ := json.Marshal(map[string]any{"type": typ, "content": content})
		ads = append(ads, ad{room, js})
	}
	adRows.Close()
	if err := adRows.Err(); err != nil {
		return nil, err
	}
	for _, a := range ads {
		if a.room == "" {
			out.AccountData.Events = append(out.AccountData.Events, a.js)
			continue
		}
		if memberships[a.room] != "join" {
			continue
		}
		jr := out.Rooms.Join[a.room]
		if jr == nil {
			jr = newJoinedRoomSync()
			out.Rooms.Join[a.room] = jr
		}
		jr.AccountData.Events = append(jr.AccountData.Events, a.js)
	}

	tdRows, err := db.QueryContext(ctx, `SELECT json FROM to_device WHERE user_id = ? AND (device_id = ? OR device_id = '*') AND seq > ? AND seq <= ? ORDER BY seq`,
		c.userID, c.deviceID, from.toDevice, now.toDevice)
	if err != nil {
		return nil, err
	}
	for tdRows.Next() {
		var js json.RawMessage
		if err := tdRows.Scan(&js); err != nil {
			tdRows.Close()
			return nil, err
		}
		out.ToDevice.Events = append(out.ToDevice.Events, js)
	}
	tdRows.Close()
	return out, tdRows.Err()
}

func newJoinedRoomSync() *joinedRoomSync {
	return &joinedRoomSync{
		Timeline: timeline{Events: []*event{}}, State: eventList{Events: []*event{}},
		AccountData: rawEventList{Events: []json.RawMessage{}}, Ephemeral: rawEventList{Events: []json.RawMessage{}},
		UnreadNotifications: map[string]int{"highlight_count": 0, "notification_count": 0}, Summary: map[string]any{},
	}
}

// syncTimeline returns the last `limit` events of a room in (after, upto],
// limited if there were more.
func (s *Server) syncTimeline(ctx context.Context, c *caller, roomID string, after, upto int64, limit int) (timeline, error) {
	evs, err := queryEvents(ctx, s.st.db, `SELECT `+eventCols+` FROM events WHERE room_id = ? AND seq > ? AND seq <= ? ORDER BY seq DESC LIMIT ?`,
		roomID, after, upto, limit+1)
	if err != nil {
		return timeline{}, err
	}
	tl := timeline{Events: []*event{}}
	if len(evs) > limit {
		tl.Limited = true
		evs = evs[:limit]
	}
	for i := len(evs) - 1; i >= 0; i-- {
		tl.Events = append(tl.Events, evs[i].viewFor(c))
	}
	if len(evs) > 0 {
		tl.PrevBatch = posToken(evs[len(evs)-1].seq - 1)
	} else {
		tl.PrevBatch = posToken(upto)
	}
	return tl, nil
}

// syncJoined is a joined room's part of a sync; nil when nothing changed.
// withState sends the room's state (on an initial sync, a fresh join, or
// full_state), minus what the timeline holds.
func (s *Server) syncJoined(ctx context.Context, c *caller, roomID string, since *syncPos, from, now syncPos, limit int, withState bool) (*joinedRoomSync, error) {
	tl, err := s.syncTimeline(ctx, c, roomID, from.events, now.events, limit)
	if err != nil {
		return nil, err
	}
	if since != nil && len(tl.Events) == 0 && !withState {
		return nil, nil
	}
	jr := newJoinedRoomSync()
	jr.Timeline = tl
	if withState {
		state, err := s.roomState(ctx, s.st.db, roomID)
		if err != nil {
			return nil, err
		}
		inTimeline := map[string]bool{}
		for _, ev := range tl.Events {
			inTimeline[ev.ID] = true
		}
		for _, ev := range state {
			if !inTimeline[ev.ID] && ev.seq <= now.events {
				jr.State.Events = append(jr.State.Events, ev.viewFor(c))
			}
		}
	}
	return jr, nil
}

// syncInvited is an invite: stripped state of the room and the invite.
func (s *Server) syncInvited(ctx context.Context, roomID, userID string) (*invitedRoomSync, error) {
	ir := &invitedRoomSync{}
	ir.InviteState.Events = []strippedEvent{}
	for _, key := range [][2]string{{"m.room.create", ""}, {"m.room.join_rules", ""}, {"m.room.name", ""}, {"m.room.avatar", ""},
		{"m.room.canonical_alias", ""}, {"m.room.encryption", ""}, {"m.room.topic", ""}, {"m.room.member", userID}} {
		ev, err := s.stateEvent(ctx, s.st.db, roomID, key[0], key[1])
		if err != nil {
			return nil, err
		}
		if ev != nil {
			ir.InviteState.Events = append(ir.InviteState.Events, strippedEvent{Type: ev.Type, StateKey: *ev.StateKey, Sender: ev.Sender, Content: ev.Content})
		}
	}
	// The inviter's member event, so clients can show who invited.
	if n := len(ir.InviteState.Events); n > 0 {
		if inviter := ir.InviteState.Events[n-1].Sender; inviter != userID {
			if ev, err := s.stateEvent(ctx, s.st.db, roomID, "m.room.member", inviter); err != nil {
				return nil, err
			} else if ev != nil {
				ir.InviteState.Events = append(ir.InviteState.Events, strippedEvent{Type: ev.Type, StateKey: *ev.StateKey, Sender: ev.Sender, Content: ev.Content})
			}
		}
	}
	return ir, nil
}
