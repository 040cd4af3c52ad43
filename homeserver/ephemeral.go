package homeserver

import (
	"context"
	"encoding/json"
	"sort"
	"sync"
	"time"

	"github.com/asdispatch/asdispatch/dispatcher"
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

func (s *Server) ephemeralRoutes() []route {
	return []route{
		{"PUT", v3 + "/rooms/{room}/typing/{user}", user, typed(s.typing)},
		{"POST", v3 + "/rooms/{room}/receipt/{type}/{event}", user, s.receipt},
		{"POST", v3 + "/rooms/{room}/read_markers", user, typed(s.readMarkers)},
		{"PUT", v3 + "/sendToDevice/{type}/{txn}", user, typed(s.sendToDevice)},
	}
}

func (s *Server) typing(r *request, req *struct {
	Typing  *bool `json:"typing"`
	Timeout int64 `json:"timeout"`
}) (any, error) {
	u, err := ownUser(r, "set the typing state")
	if err != nil {
		return nil, err
	}
	if req.Typing == nil {
		return nil, errMissingParam.With("typing is required")
	}
	roomID, err := s.joinedRoom(r)
	if err != nil {
		return nil, err
	}
	// ASes get who types in the room now, as Synapse sends it.
	users := s.setTyping(roomID, u, *req.Typing, time.Duration(req.Timeout)*time.Millisecond)
	js, _ := json.Marshal(map[string]any{"type": "m.typing", "room_id": roomID, "content": map[string]any{"user_ids": users}})
	return empty, s.disp.SubmitEphemeral(r.Context(), dispatcher.Ephemeral{Type: "m.typing", RoomID: roomID, Users: []string{u}, JSON: js})
}

func (s *Server) receipt(r *request) (any, error) {
	var body map[string]any
	if err := decodeJSON(r.Request, &body); err != nil {
		return nil, err
	}
	roomID, err := s.joinedRoom(r)
	if err != nil {
		return nil, err
	}
	typ, eventID := r.PathValue("type"), r.PathValue("event")
	return empty, s.sendReceipt(r, roomID, typ, eventID)
}

func (s *Server) sendReceipt(r *request, roomID, typ, eventID string) error {
	switch typ {
	case "m.read", "m.read.private":
	case "m.fully_read":
		js, _ := json.Marshal(map[string]string{"event_id": eventID})
		s.mu.Lock()
		defer s.mu.Unlock()
		return s.setAccountData(r.Context(), s.st.db, r.c.userID, roomID, "m.fully_read", js)
	default:
		return errInvalidParam.With("unknown receipt type %q", typ)
	}
	ev, err := s.eventByID(r.Context(), s.st.db, eventID)
	if err != nil {
		return err
	}
	if ev == nil || ev.RoomID != roomID {
		return errNotFound.With("event %s not found in the room", eventID)
	}
	ts := time.Now().UnixMilli()
	s.mu.Lock()
	_, err = s.st.db.ExecContext(r.Context(), `INSERT OR REPLACE INTO receipts (room_id, user_id, type, event_id, ts, pos) VALUES (?, ?, ?, ?, ?, (SELECT COALESCE(MAX(pos), 0) + 1 FROM receipts))`,
		roomID, r.c.userID, typ, eventID, ts)
	s.mu.Unlock()
	if err != nil {
		return err
	}
	s.wake()
	content := map[string]any{eventID: map[string]any{typ: map[string]any{r.c.userID: map[string]any{"ts": ts}}}}
	js, _ := json.Marshal(map[string]any{"type": "m.receipt", "room_id": roomID, "content": content})
	return s.disp.SubmitEphemeral(r.Context(), dispatcher.Ephemeral{
		Type: "m.receipt", RoomID: roomID, Users: []string{r.c.userID}, Private: typ == "m.read.private", JSON: js,
	})
}

func (s *Server) readMarkers(r *request, req *struct {
	FullyRead   string `json:"m.fully_read"`
	Read        string `json:"m.read"`
	ReadPrivate string `json:"m.read.private"`
}) (any, error) {
	roomID, err := s.joinedRoom(r)
	if err != nil {
		return nil, err
	}
	for _, m := range []struct{ typ, id string }{{"m.fully_read", req.FullyRead}, {"m.read", req.Read}, {"m.read.private", req.ReadPrivate}} {
		if m.id == "" {
			continue
		}
		if err := s.sendReceipt(r, roomID, m.typ, m.id); err != nil {
			return nil, err
		}
	}
	return empty, nil
}

func (s *Server) sendToDevice(r *request, req *struct {
	Messages map[string]map[string]json.RawMessage `json:"messages"`
}) (any, error) {
	typ := r.PathValue("type")
	ctx := r.Context()
	// A retried request (same token, user and transaction ID) is answered
	// without sending again: a repeated Olm message fails to decrypt.
	txnKey, txnID := r.c.token+"|"+r.c.userID, "sendToDevice|"+r.PathValue("txn")
	s.mu.Lock()
	defer s.mu.Unlock()
	var prev string
	if ok, err := s.st.one(ctx, &prev, `SELECT event_id FROM send_txns WHERE token = ? AND txn_id = ?`, txnKey, txnID); err != nil || ok {
		return empty, err
	}
	var msgs []dispatcher.ToDevice
	type inbox struct {
		user, dev string
		js        []byte
	}
	var local []inbox
	for _, u := range sortedKeys(req.Messages) {
		devices := req.Messages[u]
		// "*" is every device of a local user, expanded now: a bridge
		// reading to_device_id "*" in a transaction drops the message.
		// A device named beside "*" gets its own content.
		if content, ok := devices["*"]; ok && s.IsLocalUser(u) {
			all, err := s.st.list(ctx, `SELECT device_id FROM devices WHERE user_id = ? ORDER BY device_id`, u)
			if err != nil {
				return nil, err
			}
			expanded := make(map[string]json.RawMessage, len(all))
			for _, d := range all {
				expanded[d] = content
			}
			for d, c := range devices {
				if d != "*" {
					expanded[d] = c
				}
			}
			devices = expanded
		}
		for _, dev := range sortedKeys(devices) {
			content := devices[dev]
			js, _ := json.Marshal(map[string]any{"type": typ, "sender": r.c.userID, "content": content, "to_user_id": u, "to_device_id": dev})
			msgs = append(msgs, dispatcher.ToDevice{Sender: r.c.userID, Type: typ, ToUser: u, ToDevice: dev, JSON: js})
			if s.IsLocalUser(u) {
				cj, _ := json.Marshal(map[string]any{"type": typ, "sender": r.c.userID, "content": content})
				local = append(local, inbox{u, dev, cj})
			}
		}
	}
	// Handed to the dispatcher first: if the commit below fails, the
	// client's retry may send twice, but nothing is lost.
	if err := s.disp.SubmitToDevice(ctx, msgs...); err != nil {
		return nil, err
	}
	tx, err := s.st.db.BeginTx(ctx, nil)
	if err != nil {
		return nil, err
	}
	defer tx.Rollback()
	for _, m := range local {
		if _, err := tx.ExecContext(ctx, `INSERT INTO to_device (user_id, device_id, json) VALUES (?, ?, ?)`, m.user, m.dev, m.js); err != nil {
			return nil, err
		}
	}
	if _, err := tx.ExecContext(ctx, `INSERT INTO send_txns (token, txn_id, event_id) VALUES (?, ?, '')`, txnKey, txnID); err != nil {
		return nil, err
	}
	if err := tx.Commit(); err != nil {
		return nil, err
	}
	if len(local) > 0 {
		s.wake()
	}
	return empty, nil
}
