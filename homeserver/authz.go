package homeserver

import (
	"context"
	"encoding/json"
	"math"
	"strconv"
	"strings"
)

// powerLevels is the content of m.room.power_levels with its defaults.
type powerLevels struct {
	users         map[string]int64
	usersDefault  int64
	events        map[string]int64
	eventsDefault int64
	stateDefault  int64
	ban, kick     int64
	redact        int64
	invite        int64
}

// plInt reads a power level: a number, or a string of one as old room
// versions allow.
func plInt(v any) (int64, bool) {
	switch x := v.(type) {
	case float64:
		if x != math.Trunc(x) {
			return 0, false
		}
		return int64(x), true
	case json.Number:
		n, err := x.Int64()
		return n, err == nil
	case string:
		n, err := strconv.ParseInt(strings.TrimSpace(x), 10, 64)
		return n, err == nil
	}
	return 0, false
}

func parsePowerLevels(content map[string]any) powerLevels {
	pl := powerLevels{users: map[string]int64{}, events: map[string]int64{}, stateDefault: 50, ban: 50, kick: 50, redact: 50}
	num := func(key string, dst *int64) {
		if n, ok := plInt(content[key]); ok {
			*dst = n
		}
	}
	num("users_default", &pl.usersDefault)
	num("events_default", &pl.eventsDefault)
	num("state_default", &pl.stateDefault)
	num("ban", &pl.ban)
	num("kick", &pl.kick)
	num("redact", &pl.redact)
	num("invite", &pl.invite)
	for _, m := range []struct {
		key string
		dst map[string]int64
	}{{"users", pl.users}, {"events", pl.events}} {
		obj, _ := content[m.key].(map[string]any)
		for k, v := range obj {
			if n, ok := plInt(v); ok {
				m.dst[k] = n
			}
		}
	}
	return pl
}

func (pl powerLevels) user(id string) int64 {
	if n, ok := pl.users[id]; ok {
		return n
	}
	return pl.usersDefault
}

func (pl powerLevels) event(typ string, state bool) int64 {
	if n, ok := pl.events[typ]; ok {
		return n
	}
	if state {
		return pl.stateDefault
	}
	return pl.eventsDefault
}

// validPowerLevels checks that every level in content is an integer.
func validPowerLevels(content map[string]any) error {
	for _, k := range []string{"users_default", "events_default", "state_default", "ban", "kick", "redact", "invite"} {
		if v, ok := content[k]; ok {
			if _, ok := plInt(v); !ok {
				return errBadJSON.With("power level %s must be an integer", k)
			}
		}
	}
	for _, k := range []string{"users", "events", "notifications"} {
		v, ok := content[k]
		if !ok {
			continue
		}
		obj, isObj := v.(map[string]any)
		if !isObj {
			return errBadJSON.With("power level %s must be an object", k)
		}
		for name, x := range obj {
			if _, ok := plInt(x); !ok {
				return errBadJSON.With("power level %s.%s must be an integer", k, name)
			}
		}
	}
	return nil
}

// powerLevels returns the room's power levels. A room without the event
// gives its creator 100 (the spec's rule for that case).
func (s *Server) powerLevels(ctx context.Context, q querier, roomID string) (powerLevels, error) {
	ev, err := s.stateEvent(ctx, q, roomID, "m.room.power_levels", "")
	if err != nil {
		return powerLevels{}, err
	}
	if ev != nil {
		return parsePowerLevels(ev.Content), nil
	}
	pl := parsePowerLevels(map[string]any{"state_default": 0})
	var creator string
	if _, err := one(ctx, q, `SELECT creator FROM rooms WHERE room_id = ?`, []any{roomID}, &creator); err != nil {
		return powerLevels{}, err
	}
	pl.users[creator] = 100
	return pl, nil
}

// authPowerLevels is powerLevels for authorize, kept per room between
// writes: most sends are messages into rooms whose power levels have not
// changed, and parsing them again is most of a send's authorization. The
// caller holds s.mu; writeEvents forgets a room's entry on any state event
// in it, a redaction on any redaction in it, and a failed write to the
// log forgets all (what it read may have been rolled back).
func (s *Server) authPowerLevels(ctx context.Context, q querier, roomID string) (powerLevels, error) {
	if pl, ok := s.plCache[roomID]; ok {
		return pl, nil
	}
	pl, err := s.powerLevels(ctx, q, roomID)
	if err != nil {
		return pl, err
	}
	if s.plCache == nil || len(s.plCache) >= plCacheSize {
		s.plCache = make(map[string]powerLevels)
	}
	s.plCache[roomID] = pl
	return pl, nil
}

// plCacheSize bounds the rooms whose power levels authorize keeps.
const plCacheSize = 4096

// forgetPowerLevels drops cached power levels: of roomID, or all if "".
// The caller holds s.mu.
func (s *Server) forgetPowerLevels(roomID string) {
	if roomID == "" {
		s.plCache = nil
		return
	}
	delete(s.plCache, roomID)
}

func (s *Server) joinRule(ctx context.Context, q querier, roomID string) (string, error) {
	ev, err := s.stateEvent(ctx, q, roomID, "m.room.join_rules", "")
	if err != nil || ev == nil {
		return "invite", err
	}
	r, _ := ev.Content["join_rule"].(string)
	return r, nil
}

// authorize applies the spec's authorization rules for ev against the
// room's current state: membership transitions (invite, join, leave, kick,
// ban, unban; public and invite join rules), power levels for sends, state
// events and redactions, and changes to the power levels themselves.
// The caller holds s.mu.
func (s *Server) authorize(ctx context.Context, q querier, ev *event) error {
	// A room whose power levels are kept exists: rooms are never deleted.
	_, exists := s.plCache[ev.RoomID]
	if !exists {
		var err error
		if exists, err = s.roomExists(ctx, q, ev.RoomID); err != nil {
			return err
		}
	}
	if !exists {
		// As Synapse: joining an unknown room is "not found", anything
		// else in it is "not in the room".
		if ev.membership() == "join" {
			return errNotFound.With("room %s not found", ev.RoomID)
		}
		return errForbidden.With("%s is not in the room", ev.Sender)
	}
	pl, err := s.authPowerLevels(ctx, q, ev.RoomID)
	if err != nil {
		return err
	}
	senderM, err := s.membership(ctx, q, ev.RoomID, ev.Sender)
	if err != nil {
		return err
	}
	if ev.Type == "m.room.member" {
		return s.authorizeMember(ctx, q, ev, pl, senderM)
	}
	if senderM != "join" {
		return errForbidden.With("%s is not in the room", ev.Sender)
	}
	level := pl.user(ev.Sender)
	if need := pl.event(ev.Type, ev.isState()); level < need {
		return errForbidden.With("sending %s needs power level %d; %s has %d", ev.Type, need, ev.Sender, level)
	}
	if ev.isState() && strings.HasPrefix(*ev.StateKey, "@") && *ev.StateKey != ev.Sender {
		return errForbidden.With("a state key that is a user ID must be the sender's")
	}
	switch ev.Type {
	case "m.room.power_levels":
		return authorizePowerLevels(ev, pl, level)
	case "m.room.redaction":
		target, err := s.eventByID(ctx, q, ev.Redacts)
		if err != nil {
			return err
		}
		if target == nil || target.RoomID != ev.RoomID {
			return errNotFound.With("event %s not found in the room", ev.Redacts)
		}
		if target.Sender != ev.Sender && level < pl.redact {
			return errForbidden.With("redacting another user's event needs power level %d", pl.redact)
		}
	}
	return nil
}

func (s *Server) authorizeMember(ctx context.Context, q querier, ev *event, pl powerLevels, senderM string) error {
	target := *ev.StateKey
	if !strings.HasPrefix(target, "@") || !strings.Contains(target, ":") {
		return errBadJSON.With("the state key of m.room.member must be a user ID")
	}
	targetM, err := s.membership(ctx, q, ev.RoomID, target)
	if err != nil {
		return err
	}
	senderLevel, targetLevel := pl.user(ev.Sender), pl.user(target)
	switch m := ev.membership(); m {
	case "join":
		if ev.Sender != target {
			return errForbidden.With("cannot join another user to a room")
		}
		if targetM == "ban" {
			return errForbidden.With("%s is banned from the room", target)
		}
		if targetM == "join" || targetM == "invite" {
			return nil
		}
		rule, err := s.joinRule(ctx, q, ev.RoomID)
		if err != nil {
			return err
		}
		if rule != "public" {
			return errForbidden.With("you are not invited to this room")
		}
		return nil
	case "invite":
		if senderM != "join" {
			return errForbidden.With("%s is not in the room", ev.Sender)
		}
		switch targetM {
		case "join":
			return errForbidden.With("%s is already in the room", target)
		case "ban":
			return errForbidden.With("%s is banned from the room", target)
		}
		if senderLevel < pl.invite {
			return errForbidden.With("inviting needs power level %d; %s has %d", pl.invite, ev.Sender, senderLevel)
		}
		return nil
	case "leave":
		if ev.Sender == target {
			if targetM != "join" && targetM != "invite" {
				return errForbidden.With("%s is not in the room", target)
			}
			return nil
		}
		if senderM != "join" {
			return errForbidden.With("%s is not in the room", ev.Sender)
		}
		if targetM == "ban" {
			if senderLevel < pl.ban {
				return errForbidden.With("unbanning needs power level %d; %s has %d", pl.ban, ev.Sender, senderLevel)
			}
			return nil
		}
		if targetM != "join" && targetM != "invite" {
			return errForbidden.With("%s is not in the room", target)
		}
		if senderLevel < pl.kick || targetLevel >= senderLevel {
			return errForbidden.With("%s may not kick %s", ev.Sender, target)
		}
		return nil
	case "ban":
		if senderM != "join" {
			return errForbidden.With("%s is not in the room", ev.Sender)
		}
		if senderLevel < pl.ban || (target != ev.Sender && targetLevel >= senderLevel) {
			return errForbidden.With("%s may not ban %s", ev.Sender, target)
		}
		return nil
	case "knock":
		return errForbidden.With("knocking is not supported by this homeserver")
	default:
		return errBadJSON.With("unknown membership %q", m)
	}
}

// authorizePowerLevels: the sender may not grant more than it has, nor
// change a level at or above its own (other than its own user level).
func authorizePowerLevels(ev *event, old powerLevels, level int64) error {
	if err := validPowerLevels(ev.Content); err != nil {
		return err
	}
	nw := parsePowerLevels(ev.Content)
	scalars := []struct {
		name     string
		old, new int64
	}{
		{"users_default", old.usersDefault, nw.usersDefault}, {"events_default", old.eventsDefault, nw.eventsDefault},
		{"state_default", old.stateDefault, nw.stateDefault}, {"ban", old.ban, nw.ban}, {"kick", old.kick, nw.kick},
		{"redact", old.redact, nw.redact}, {"invite", old.invite, nw.invite},
	}
	for _, sc := range scalars {
		if sc.old != sc.new && (sc.old > level || sc.new > level) {
			return errForbidden.With("changing %s from %d to %d needs power level %d", sc.name, sc.old, sc.new, max(sc.old, sc.new))
		}
	}
	check := func(kind string, o, n map[string]int64, isUsers bool) error {
		keys := map[string]bool{}
		for k := range o {
			keys[k] = true
		}
		for k := range n {
			keys[k] = true
		}
		for k := range keys {
			ov, hadOld := o[k]
			nv, hasNew := n[k]
			if hadOld == hasNew && ov == nv {
				continue
			}
			if hadOld && ov > level || hasNew && nv > level {
				return errForbidden.With("changing %s[%s] needs a higher power level", kind, k)
			}
			if isUsers && hadOld && k != ev.Sender && ov >= level {
				return errForbidden.With("cannot change the power level of %s, who is at or above yours", k)
			}
		}
		return nil
	}
	if err := check("users", old.users, nw.users, true); err != nil {
		return err
	}
	return check("events", old.events, nw.events, false)
}
