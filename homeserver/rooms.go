package homeserver

import (
	"context"
	"database/sql"
	"encoding/json"
	"slices"
	"strings"
)

func (s *Server) roomRoutes() []route {
	return []route{
		{"POST", v3 + "/createRoom", user, typed(s.createRoom)},
		{"POST", v3 + "/join/{room}", user, typed(s.join)},
		{"POST", v3 + "/rooms/{room}/join", user, typed(s.join)},
		{"POST", v3 + "/rooms/{room}/leave", user, typed(s.leave)},
		{"POST", v3 + "/rooms/{room}/forget", user, s.forget},
		{"POST", v3 + "/rooms/{room}/invite", user, typed(s.invite)},
		{"POST", v3 + "/rooms/{room}/kick", user, typed(s.memberOp("leave", false))},
		{"POST", v3 + "/rooms/{room}/ban", user, typed(s.memberOp("ban", false))},
		{"POST", v3 + "/rooms/{room}/unban", user, typed(s.memberOp("leave", true))},
		{"PUT", v3 + "/rooms/{room}/send/{type}/{txn}", user, s.sendMessage},
		{"PUT", v3 + "/rooms/{room}/state/{type}", user, s.sendState},
		{"PUT", v3 + "/rooms/{room}/state/{type}/{key...}", user, s.sendState},
		{"PUT", v3 + "/rooms/{room}/redact/{event}/{txn}", user, typed(s.redactEvent)},
	}
}

type reqCreateRoom struct {
	Visibility    string         `json:"visibility"`
	RoomAliasName string         `json:"room_alias_name"`
	Name          *string        `json:"name"`
	Topic         *string        `json:"topic"`
	Invite        []string       `json:"invite"`
	RoomVersion   string         `json:"room_version"`
	Preset        string         `json:"preset"`
	IsDirect      bool           `json:"is_direct"`
	Creation      map[string]any `json:"creation_content"`
	InitialState  []struct {
		Type     string         `json:"type"`
		StateKey string         `json:"state_key"`
		Content  map[string]any `json:"content"`
	} `json:"initial_state"`
	PowerLevelOverride map[string]any `json:"power_level_content_override"`
}

type respCreateRoom struct {
	RoomID    string `json:"room_id"`
	RoomAlias string `json:"room_alias,omitempty"`
}

type respRoomID struct {
	RoomID string `json:"room_id"`
}

type respEventID struct {
	EventID string `json:"event_id"`
}

// validRoomUser is the shape check for a user ID given in a request.
func validRoomUser(u string) bool {
	return strings.HasPrefix(u, "@") && strings.Contains(u, ":") && len(u) <= 255
}

// createRoom validates everything first (versions, preset, invitees,
// alias, initial state, power levels), then writes the room, its alias and
// every event in one transaction: a refused request leaves nothing behind.
func (s *Server) createRoom(r *request, req *reqCreateRoom) (any, error) {
	ctx := r.Context()
	c := r.c
	if req.RoomVersion == "" {
		req.RoomVersion = defaultRoomVersion
	}
	if !slices.Contains(roomVersions, req.RoomVersion) {
		return nil, errUnsupportedRV.With("room version %q is not supported", req.RoomVersion)
	}
	switch req.Visibility {
	case "":
		req.Visibility = "private"
	case "public", "private":
	default:
		return nil, errInvalidParam.With("visibility must be public or private")
	}
	switch req.Preset {
	case "":
		req.Preset = "private_chat"
		if req.Visibility == "public" {
			req.Preset = "public_chat"
		}
	case "private_chat", "public_chat", "trusted_private_chat":
	default:
		return nil, errInvalidParam.With("unknown preset %q", req.Preset)
	}
	for _, u := range req.Invite {
		if !validRoomUser(u) {
			return nil, errInvalidParam.With("%q is not a valid user ID", u)
		}
		if u == c.userID {
			return nil, errForbidden.With("cannot invite yourself")
		}
	}
	for _, st := range req.InitialState {
		if st.Type == "" {
			return nil, errBadJSON.With("initial_state events need a type")
		}
		if st.Type == "m.room.member" || st.Type == "m.room.create" {
			return nil, errInvalidParam.With("initial_state may not hold %s", st.Type)
		}
		if st.Type == "m.room.power_levels" {
			if err := validPowerLevels(st.Content); err != nil {
				return nil, err
			}
		}
	}
	if req.PowerLevelOverride != nil {
		if err := validPowerLevels(req.PowerLevelOverride); err != nil {
			return nil, err
		}
	}
	alias := ""
	if req.RoomAliasName != "" {
		if strings.ContainsAny(req.RoomAliasName, ": \t\n") {
			return nil, errInvalidParam.With("room_alias_name may not contain ':' or whitespace")
		}
		alias = "#" + req.RoomAliasName + ":" + s.cfg.ServerName
		if len(alias) > 255 {
			return nil, errInvalidParam.With("room alias is longer than 255 bytes")
		}
		if err := s.cfg.Registry.Current().CheckAlias(c.as, alias); err != nil {
			return nil, err
		}
	}
	for _, u := range req.Invite {
		known, err := s.userKnown(r.Request, u)
		if err != nil {
			return nil, err
		}
		if !known {
			return nil, errNotFound.With("unknown user %s", u)
		}
	}

	s.mu.Lock()
	defer s.mu.Unlock()
	if alias != "" {
		var existing string
		ok, err := s.st.one(ctx, &existing, `SELECT room_id FROM aliases WHERE alias = ?`, alias)
		if err != nil {
			return nil, err
		}
		if ok {
			return nil, errRoomInUse.With("room alias already taken")
		}
	}
	roomID := "!" + randomID(12) + ":" + s.cfg.ServerName
	var evs []*event
	state := func(typ, key string, content map[string]any) {
		evs = append(evs, s.newEvent(roomID, typ, c.userID, ptr(key), content))
	}
	create := map[string]any{}
	for k, v := range req.Creation {
		create[k] = v
	}
	create["room_version"] = req.RoomVersion
	if req.RoomVersion != "11" {
		create["creator"] = c.userID
	}
	state("m.room.create", "", create)
	join, err := s.withProfile(ctx, s.st.db, c.userID, map[string]any{"membership": "join"})
	if err != nil {
		return nil, err
	}
	state("m.room.member", c.userID, join)
	users := map[string]any{c.userID: 100}
	if req.Preset == "trusted_private_chat" {
		for _, u := range req.Invite {
			users[u] = 100
		}
	}
	pl := map[string]any{
		"users": users, "users_default": 0, "events_default": 0, "state_default": 50,
		"ban": 50, "kick": 50, "redact": 50, "invite": 50, "historical": 100,
		"events": map[string]any{"m.room.name": 50, "m.room.power_levels": 100, "m.room.history_visibility": 100,
			"m.room.canonical_alias": 50, "m.room.avatar": 50, "m.room.tombstone": 100, "m.room.server_acl": 100, "m.room.encryption": 100},
	}
	if req.Preset != "public_chat" {
		pl["invite"] = 0 // Synapse's private presets let every member invite
	}
	for k, v := range req.PowerLevelOverride {
		pl[k] = v
	}
	state("m.room.power_levels", "", pl)
	if alias != "" {
		state("m.room.canonical_alias", "", map[string]any{"alias": alias})
	}
	presetState := map[string]map[string]any{
		"m.room.join_rules":         {"join_rule": "invite"},
		"m.room.history_visibility": {"history_visibility": "shared"},
	}
	if req.Preset == "public_chat" {
		presetState["m.room.join_rules"] = map[string]any{"join_rule": "public"}
	} else {
		presetState["m.room.guest_access"] = map[string]any{"guest_access": "can_join"}
	}
	initial := map[[2]string]bool{}
	for _, st := range req.InitialState {
		initial[[2]string{st.Type, st.StateKey}] = true
	}
	for _, typ := range []string{"m.room.join_rules", "m.room.history_visibility", "m.room.guest_access"} {
		if content, ok := presetState[typ]; ok && !initial[[2]string{typ, ""}] {
			state(typ, "", content)
		}
	}
	for _, st := range req.InitialState {
		state(st.Type, st.StateKey, st.Content)
	}
	if req.Name != nil {
		state("m.room.name", "", map[string]any{"name": *req.Name})
	}
	if req.Topic != nil {
		state("m.room.topic", "", map[string]any{"topic": *req.Topic})
	}
	for _, u := range req.Invite {
		content := map[string]any{"membership": "invite"}
		if req.IsDirect {
			content["is_direct"] = true
		}
		if content, err = s.withProfile(ctx, s.st.db, u, content); err != nil {
			return nil, err
		}
		state("m.room.member", u, content)
	}
	err = s.commit(ctx, evs, func(tx *sql.Tx) error {
		if _, err := tx.ExecContext(ctx, `INSERT INTO rooms (room_id, creator, visibility) VALUES (?, ?, ?)`, roomID, c.userID, req.Visibility); err != nil {
			return err
		}
		if alias != "" {
			_, err := tx.ExecContext(ctx, `INSERT INTO aliases (alias, room_id, creator) VALUES (?, ?, ?)`, alias, roomID, c.userID)
			return err
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	if alias != "" {
		s.disp.InvalidateRoom(roomID)
		s.queries.NoteAliasCreated(alias)
	}
	return &respCreateRoom{RoomID: roomID, RoomAlias: alias}, nil
}

// resolve turns a room ID or alias into a room ID. An unknown local alias
// in an AS's namespace is asked of the AS, which may create it there and
// then.
func (s *Server) resolve(ctx context.Context, idOrAlias string) (string, error) {
	if strings.HasPrefix(idOrAlias, "!") {
		return idOrAlias, nil
	}
	if !strings.HasPrefix(idOrAlias, "#") {
		return "", errInvalidParam.With("%q is neither a room ID nor an alias", idOrAlias)
	}
	lookup := func() (string, bool, error) {
		var roomID string
		ok, err := s.st.one(ctx, &roomID, `SELECT room_id FROM aliases WHERE alias = ?`, idOrAlias)
		return roomID, ok, err
	}
	roomID, ok, err := lookup()
	if err != nil || ok {
		return roomID, err
	}
	if strings.HasSuffix(idOrAlias, ":"+s.cfg.ServerName) {
		res, err := s.queries.QueryAlias(ctx, idOrAlias)
		if err != nil {
			return "", err
		}
		if res.Exists {
			if roomID, ok, err = lookup(); err != nil || ok {
				return roomID, err
			}
		}
	}
	return "", errNotFound.With("room alias %s not found", idOrAlias)
}

// maxEventBytes is the spec's limit on an event's size in its federation
// format; the client format is close enough for the stub.
const maxEventBytes = 65536

type reqReason struct {
	Reason string `json:"reason"`
}

// sendChecked writes the event build makes to the log, authorized against
// the room's state, in the log writer's next group commit. build runs
// there, after the sends grouped before it, and reads (with q) the state
// the event depends on; it returns nil to write nothing.
func (s *Server) sendChecked(ctx context.Context, build func(ctx context.Context, q querier) (*event, error)) error {
	return s.writeLog(ctx, func(ctx context.Context, q querier) error {
		ev, err := build(ctx, q)
		if err != nil || ev == nil {
			return err
		}
		if err := s.authorize(ctx, q, ev); err != nil {
			return err
		}
		return s.writeEvents(ctx, q, []*event{ev})
	})
}

func (s *Server) join(r *request, req *reqReason) (any, error) {
	ctx := r.Context()
	roomID, err := s.resolve(ctx, r.PathValue("room"))
	if err != nil {
		return nil, err
	}
	err = s.sendChecked(ctx, func(ctx context.Context, q querier) (*event, error) {
		m, err := s.membership(ctx, q, roomID, r.c.userID)
		if err != nil || m == "join" {
			return nil, err
		}
		content := map[string]any{"membership": "join"}
		if req.Reason != "" {
			content["reason"] = req.Reason
		}
		if content, err = s.withProfile(ctx, q, r.c.userID, content); err != nil {
			return nil, err
		}
		return s.newEvent(roomID, "m.room.member", r.c.userID, ptr(r.c.userID), content), nil
	})
	if err != nil {
		return nil, err
	}
	return &respRoomID{RoomID: roomID}, nil
}

func (s *Server) leave(r *request, req *reqReason) (any, error) {
	roomID, err := r.roomParam()
	if err != nil {
		return nil, err
	}
	content := map[string]any{"membership": "leave"}
	if req.Reason != "" {
		content["reason"] = req.Reason
	}
	return empty, s.sendChecked(r.Context(), func(context.Context, querier) (*event, error) {
		return s.newEvent(roomID, "m.room.member", r.c.userID, ptr(r.c.userID), content), nil
	})
}

func (s *Server) forget(r *request) (any, error) {
	roomID, err := r.roomParam()
	if err != nil {
		return nil, err
	}
	m, err := s.membership(r.Context(), s.st.db, roomID, r.c.userID)
	if err != nil {
		return nil, err
	}
	if m == "join" || m == "invite" {
		return nil, errUnknown400.With("leave the room before forgetting it")
	}
	return empty, nil
}

type reqMember struct {
	UserID string `json:"user_id"`
	Reason string `json:"reason"`
}

func (s *Server) invite(r *request, req *reqMember) (any, error) {
	roomID, err := r.roomParam()
	if err != nil {
		return nil, err
	}
	if req.UserID == "" {
		return nil, errMissingParam.With("user_id is required")
	}
	if !validRoomUser(req.UserID) {
		return nil, errInvalidParam.With("%q is not a valid user ID", req.UserID)
	}
	known, err := s.userKnown(r.Request, req.UserID)
	if err != nil {
		return nil, err
	}
	if !known {
		return nil, errNotFound.With("unknown user %s", req.UserID)
	}
	return empty, s.sendChecked(r.Context(), func(ctx context.Context, q querier) (*event, error) {
		content := map[string]any{"membership": "invite"}
		if req.Reason != "" {
			content["reason"] = req.Reason
		}
		content, err := s.withProfile(ctx, q, req.UserID, content)
		if err != nil {
			return nil, err
		}
		return s.newEvent(roomID, "m.room.member", r.c.userID, ptr(req.UserID), content), nil
	})
}

// memberOp is kick (leave), ban, and unban (leave of a banned user only).
func (s *Server) memberOp(membership string, unban bool) func(*request, *reqMember) (any, error) {
	return func(r *request, req *reqMember) (any, error) {
		roomID, err := r.roomParam()
		if err != nil {
			return nil, err
		}
		if req.UserID == "" {
			return nil, errMissingParam.With("user_id is required")
		}
		if !validRoomUser(req.UserID) {
			return nil, errInvalidParam.With("%q is not a valid user ID", req.UserID)
		}
		content := map[string]any{"membership": membership}
		if req.Reason != "" {
			content["reason"] = req.Reason
		}
		return empty, s.sendChecked(r.Context(), func(ctx context.Context, q querier) (*event, error) {
			if unban {
				m, err := s.membership(ctx, q, roomID, req.UserID)
				if err != nil {
					return nil, err
				}
				if m != "ban" {
					return nil, errForbidden.With("%s is not banned", req.UserID)
				}
			}
			return s.newEvent(roomID, "m.room.member", r.c.userID, ptr(req.UserID), content), nil
		})
	}
}

func (s *Server) sendMessage(r *request) (any, error) {
	return s.sendEvent(r, r.PathValue("type"), nil, "")
}

func (s *Server) sendState(r *request) (any, error) {
	return s.sendEvent(r, r.PathValue("type"), ptr(r.PathValue("key")), "")
}

func (s *Server) redactEvent(r *request, req *reqReason) (any, error) {
	content := map[string]any{}
	if req.Reason != "" {
		content["reason"] = req.Reason
	}
	return s.sendEventContent(r, "m.room.redaction", nil, r.PathValue("event"), content)
}

func (s *Server) sendEvent(r *request, typ string, stateKey *string, redacts string) (any, error) {
	var content map[string]any
	if err := decodeJSON(r.Request, &content); err != nil {
		return nil, err
	}
	return s.sendEventContent(r, typ, stateKey, redacts, content)
}

// sendEventContent sends a message, state or redaction event. A message
// or redaction with a transaction id already used by the same token and
// user answers the event it created then.
func (s *Server) sendEventContent(r *request, typ string, stateKey *string, redacts string, content map[string]any) (any, error) {
	roomID, err := r.roomParam()
	if err != nil {
		return nil, err
	}
	if typ == "" {
		return nil, errInvalidParam.With("event type is empty")
	}
	if len(typ) > 255 || (stateKey != nil && len(*stateKey) > 255) {
		return nil, errInvalidParam.With("event type and state key are at most 255 bytes")
	}
	ctx, c, txn := r.Context(), r.c, r.PathValue("txn")
	if stateKey != nil && typ == "m.room.canonical_alias" {
		if err := s.checkCanonicalAlias(ctx, roomID, content); err != nil {
			return nil, err
		}
	}
	txnKey := c.token + "|" + c.userID
	var eventID string
	// Checked and written in the log writer's transaction, after the sends
	// grouped before it: a retry of a txnId in the same batch finds it.
	err = s.writeLog(ctx, func(ctx context.Context, tx querier) error {
		if txn != "" {
			if ok, err := one(ctx, tx, `SELECT event_id FROM send_txns WHERE token = ? AND txn_id = ?`, []any{txnKey, txn}, &eventID); err != nil || ok {
				return err
			}
		}
		content := content
		if stateKey != nil && typ == "m.room.member" {
			if m, _ := content["membership"].(string); m == "join" || m == "invite" {
				var err error
				if content, err = s.withProfile(ctx, tx, *stateKey, content); err != nil {
					return err
				}
			}
		}
		ev := s.newEvent(roomID, typ, c.userID, stateKey, content)
		ev.txnID, ev.txnToken = txn, c.token
		if redacts != "" {
			ev.Redacts = redacts
			content["redacts"] = redacts
		}
		if js, err := json.Marshal(ev); err != nil || len(js) > maxEventBytes {
			return errTooLarge.With("event is larger than %d bytes", maxEventBytes)
		}
		if err := s.authorize(ctx, tx, ev); err != nil {
			return err
		}
		if err := s.writeEvents(ctx, tx, []*event{ev}); err != nil {
			return err
		}
		if txn != "" {
			if _, err := tx.ExecContext(ctx, `INSERT INTO send_txns (token, txn_id, event_id) VALUES (?, ?, ?)`, txnKey, txn, ev.ID); err != nil {
				return err
			}
		}
		eventID = ev.ID
		if redacts == "" {
			return nil
		}
		target, err := s.eventByID(ctx, tx, redacts)
		if err != nil || target == nil {
			return err
		}
		redact(target, ev)
		js, err := json.Marshal(target)
		if err != nil {
			return err
		}
		_, err = tx.ExecContext(ctx, `UPDATE events SET json = ? WHERE event_id = ?`, js, redacts)
		return err
	})
	if err != nil {
		return nil, err
	}
	return &respEventID{EventID: eventID}, nil
}

// checkCanonicalAlias refuses aliases that do not point to the room, as
// Synapse does (400 M_BAD_ALIAS).
func (s *Server) checkCanonicalAlias(ctx context.Context, roomID string, content map[string]any) error {
	var aliases []string
	if a, ok := content["alias"]; ok && a != nil {
		as, isStr := a.(string)
		if !isStr {
			return errInvalidParam.With("alias must be a string")
		}
		aliases = append(aliases, as)
	}
	if alt, ok := content["alt_aliases"]; ok {
		list, isList := alt.([]any)
		if !isList {
			return errInvalidParam.With("alt_aliases must be a list")
		}
		for _, a := range list {
			as, isStr := a.(string)
			if !isStr {
				return errInvalidParam.With("alt_aliases must hold strings")
			}
			aliases = append(aliases, as)
		}
	}
	for _, a := range aliases {
		var target string
		ok, err := s.st.one(ctx, &target, `SELECT room_id FROM aliases WHERE alias = ?`, a)
		if err != nil {
			return err
		}
		if !ok || target != roomID {
			return (&mxError{Status: 400, Code: "M_BAD_ALIAS"}).With("alias %s does not point to this room", a)
		}
	}
	return nil
}
