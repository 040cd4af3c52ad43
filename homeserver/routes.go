package homeserver

import (
	"crypto/subtle"
	"encoding/json"
	"errors"
	"net/http"
	"strings"
	"time"

	"github.com/asdispatch/asdispatch/dispatcher"
	"github.com/asdispatch/asdispatch/queries"
)

const v3 = "/_matrix/client/v3"

// handler is an endpoint that answers with a JSON value or an error.
type handler func(r *http.Request, c *caller) (any, error)

func (s *Server) routes() {
	m := http.NewServeMux()
	open := func(pattern string, h func(r *http.Request) (any, error)) {
		m.HandleFunc(pattern, func(w http.ResponseWriter, r *http.Request) {
			v, err := h(r)
			if err != nil {
				writeError(w, err)
				return
			}
			writeJSON(w, http.StatusOK, v)
		})
	}
	authed := func(pattern string, h handler) {
		open(pattern, func(r *http.Request) (any, error) {
			c, err := s.auth(r)
			if err != nil {
				return nil, err
			}
			return h(r, c)
		})
	}
	open("GET /_matrix/client/versions", func(*http.Request) (any, error) {
		return map[string]any{"versions": []string{"v1.11", "v1.12", "v1.13"}}, nil
	})
	open("POST "+v3+"/register", s.register)
	open("POST "+v3+"/login", s.login)
	authed("GET "+v3+"/account/whoami", func(r *http.Request, c *caller) (any, error) {
		return map[string]any{"user_id": c.userID}, nil
	})
	authed("POST "+v3+"/createRoom", s.createRoom)
	authed("POST "+v3+"/join/{room}", s.join)
	authed("POST "+v3+"/rooms/{room}/join", s.join)
	authed("POST "+v3+"/rooms/{room}/leave", s.leave)
	authed("POST "+v3+"/rooms/{room}/invite", s.invite)
	authed("PUT "+v3+"/rooms/{room}/send/{type}/{txn}", s.sendMessage)
	authed("PUT "+v3+"/rooms/{room}/state/{type}/{key...}", s.sendState)
	authed("PUT "+v3+"/directory/room/{alias}", s.putAlias)
	authed("DELETE "+v3+"/directory/room/{alias}", s.deleteAlias)
	open("GET "+v3+"/directory/room/{alias}", s.getAlias)
	open("GET "+v3+"/profile/{user}", s.profile)
	authed("PUT "+v3+"/rooms/{room}/typing/{user}", s.typing)
	authed("POST "+v3+"/rooms/{room}/receipt/{type}/{event}", s.receipt)
	authed("PUT "+v3+"/sendToDevice/{type}/{txn}", s.sendToDevice)
	authed("POST /_matrix/client/v1/appservice/{id}/ping", s.ping)
	open("GET /_asdispatch/v1/appservices", s.appservices)
	m.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		writeError(w, errorf(http.StatusNotFound, "M_UNRECOGNIZED", "unrecognized request"))
	})
	s.mux = m
}

func decode(r *http.Request, v any) error {
	if r.ContentLength == 0 {
		return nil
	}
	dec := json.NewDecoder(http.MaxBytesReader(nil, r.Body, 1<<20))
	if err := dec.Decode(v); err != nil {
		return errorf(http.StatusBadRequest, "M_NOT_JSON", "request body: %v", err)
	}
	return nil
}

// validUserID applies Matrix's rules for a new user ID: local, at most 255
// bytes, and a localpart of a-z, 0-9 and "._=-/+" only (as Synapse does).
func (s *Server) validUserID(userID string) error {
	local, server, _ := strings.Cut(strings.TrimPrefix(userID, "@"), ":")
	if server != s.cfg.ServerName {
		return errorf(http.StatusBadRequest, "M_INVALID_USERNAME", "user ID must be on %s", s.cfg.ServerName)
	}
	if len(userID) > 255 {
		return errorf(http.StatusBadRequest, "M_INVALID_USERNAME", "user ID is longer than 255 bytes")
	}
	if local == "" || strings.TrimLeft(local, "abcdefghijklmnopqrstuvwxyz0123456789._=-/+") != "" {
		return errorf(http.StatusBadRequest, "M_INVALID_USERNAME", "user ID can only contain a-z, 0-9 and ._=-/+")
	}
	return nil
}

func (s *Server) register(r *http.Request) (any, error) {
	var req struct {
		Username     string `json:"username"`
		Password     string `json:"password"`
		Type         string `json:"type"`
		InhibitLogin bool   `json:"inhibit_login"`
	}
	if err := decode(r, &req); err != nil {
		return nil, err
	}
	if req.Username == "" {
		req.Username = "user" + randomID(4)
	}
	userID := req.Username
	if !strings.HasPrefix(userID, "@") {
		userID = "@" + req.Username + ":" + s.cfg.ServerName
	}
	if err := s.validUserID(userID); err != nil {
		return nil, err
	}
	set := s.cfg.Registry.Current()
	asID := ""
	if req.Type == "m.login.application_service" {
		tok := strings.TrimPrefix(r.Header.Get("Authorization"), "Bearer ")
		if tok == "" {
			tok = r.URL.Query().Get("access_token")
		}
		as, err := set.ByASToken(tok)
		if err != nil {
			return nil, err
		}
		if err := set.CheckRegister(as, userID); err != nil {
			return nil, err
		}
		asID = as.ID
	} else {
		if req.Password == "" {
			return nil, errorf(http.StatusBadRequest, "M_MISSING_PARAM", "password required")
		}
		if err := set.CheckRegister(nil, userID); err != nil {
			return nil, err
		}
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	res, err := s.st.db.ExecContext(r.Context(), `INSERT OR IGNORE INTO users (user_id, password, appservice) VALUES (?, ?, ?)`,
		userID, tokenHash(req.Password), asID)
	if err != nil {
		return nil, err
	}
	if n, _ := res.RowsAffected(); n == 0 {
		return nil, errorf(http.StatusBadRequest, "M_USER_IN_USE", "user ID already taken")
	}
	if asID != "" {
		s.queries.NoteUserRegistered(userID)
	}
	out := map[string]any{"user_id": userID}
	if !req.InhibitLogin {
		tok, dev, err := s.newToken(r, userID)
		if err != nil {
			return nil, err
		}
		out["access_token"], out["device_id"] = tok, dev
	}
	return out, nil
}

func (s *Server) newToken(r *http.Request, userID string) (string, string, error) {
	tok, dev := "syt_"+randomID(16), strings.ToUpper(randomID(5))
	_, err := s.st.db.ExecContext(r.Context(), `INSERT INTO tokens (token, user_id, device_id) VALUES (?, ?, ?)`, tokenHash(tok), userID, dev)
	return tok, dev, err
}

func (s *Server) login(r *http.Request) (any, error) {
	var req struct {
		Type       string `json:"type"`
		Identifier struct {
			User string `json:"user"`
		} `json:"identifier"`
		User     string `json:"user"`
		Password string `json:"password"`
	}
	if err := decode(r, &req); err != nil {
		return nil, err
	}
	user := req.Identifier.User
	if user == "" {
		user = req.User
	}
	if !strings.HasPrefix(user, "@") {
		user = "@" + user + ":" + s.cfg.ServerName
	}
	switch req.Type {
	case "m.login.password":
		var hash string
		ok, err := s.st.one(r.Context(), &hash, `SELECT password FROM users WHERE user_id = ?`, user)
		if err != nil {
			return nil, err
		}
		if !ok || subtle.ConstantTimeCompare([]byte(hash), []byte(tokenHash(req.Password))) != 1 {
			return nil, errorf(http.StatusForbidden, "M_FORBIDDEN", "invalid username or password")
		}
	case "m.login.application_service":
		set := s.cfg.Registry.Current()
		as, err := set.ByASToken(strings.TrimPrefix(r.Header.Get("Authorization"), "Bearer "))
		if err != nil {
			return nil, err
		}
		if err := set.CanMasquerade(as, user); err != nil {
			return nil, err
		}
	default:
		return nil, errorf(http.StatusBadRequest, "M_UNKNOWN", "unsupported login type %q", req.Type)
	}
	tok, dev, err := s.newToken(r, user)
	if err != nil {
		return nil, err
	}
	return map[string]any{"user_id": user, "access_token": tok, "device_id": dev}, nil
}

func (s *Server) createRoom(r *http.Request, c *caller) (any, error) {
	var req struct {
		RoomAliasName string   `json:"room_alias_name"`
		Name          string   `json:"name"`
		Invite        []string `json:"invite"`
		Preset        string   `json:"preset"`
	}
	if err := decode(r, &req); err != nil {
		return nil, err
	}
	ctx := r.Context()
	alias := ""
	if req.RoomAliasName != "" {
		alias = "#" + req.RoomAliasName + ":" + s.cfg.ServerName
		if err := s.cfg.Registry.Current().CheckAlias(c.as, alias); err != nil {
			return nil, err
		}
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if alias != "" {
		var existing string
		if ok, err := s.st.one(ctx, &existing, `SELECT room_id FROM aliases WHERE alias = ?`, alias); err != nil || ok {
			if err != nil {
				return nil, err
			}
			return nil, errorf(http.StatusBadRequest, "M_ROOM_IN_USE", "room alias already taken")
		}
	}
	roomID := "!" + randomID(9) + ":" + s.cfg.ServerName
	if _, err := s.st.db.ExecContext(ctx, `INSERT INTO rooms (room_id, creator) VALUES (?, ?)`, roomID, c.userID); err != nil {
		return nil, err
	}
	joinRule := "invite"
	if req.Preset == "public_chat" || alias != "" {
		joinRule = "public"
	}
	steps := []struct {
		typ     string
		key     string
		content map[string]any
	}{
		{"m.room.create", "", map[string]any{"creator": c.userID, "room_version": "10"}},
		{"m.room.member", c.userID, map[string]any{"membership": "join"}},
		{"m.room.power_levels", "", map[string]any{"users": map[string]any{c.userID: 100}}},
		{"m.room.join_rules", "", map[string]any{"join_rule": joinRule}},
	}
	if req.Name != "" {
		steps = append(steps, struct {
			typ     string
			key     string
			content map[string]any
		}{"m.room.name", "", map[string]any{"name": req.Name}})
	}
	if alias != "" {
		if _, err := s.st.db.ExecContext(ctx, `INSERT INTO aliases (alias, room_id, creator) VALUES (?, ?, ?)`, alias, roomID, c.userID); err != nil {
			return nil, err
		}
		steps = append(steps, struct {
			typ     string
			key     string
			content map[string]any
		}{"m.room.canonical_alias", "", map[string]any{"alias": alias}})
	}
	for _, st := range steps {
		if _, err := s.send(ctx, roomID, st.typ, c.userID, ptr(st.key), st.content); err != nil {
			return nil, err
		}
	}
	for _, u := range req.Invite {
		if _, err := s.send(ctx, roomID, "m.room.member", c.userID, ptr(u), map[string]any{"membership": "invite"}); err != nil {
			return nil, err
		}
	}
	if alias != "" && c.as != nil {
		s.queries.NoteAliasCreated(alias)
	}
	out := map[string]any{"room_id": roomID}
	if alias != "" {
		out["room_alias"] = alias
	}
	return out, nil
}

// resolve turns a room ID or alias into a room ID. An unknown local alias
// in an AS's namespace is asked of the AS, which may create it there and
// then.
func (s *Server) resolve(r *http.Request, idOrAlias string) (string, error) {
	if !strings.HasPrefix(idOrAlias, "#") {
		return idOrAlias, nil
	}
	ctx := r.Context()
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
	return "", errorf(http.StatusNotFound, "M_NOT_FOUND", "room alias %s not found", idOrAlias)
}

func (s *Server) join(r *http.Request, c *caller) (any, error) {
	roomID, err := s.resolve(r, r.PathValue("room"))
	if err != nil {
		return nil, err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if ok, err := s.roomExists(r.Context(), roomID); err != nil || !ok {
		if err != nil {
			return nil, err
		}
		return nil, errorf(http.StatusNotFound, "M_NOT_FOUND", "no such room")
	}
	if m, err := s.membership(r.Context(), roomID, c.userID); err != nil || m == "join" {
		if err != nil {
			return nil, err
		}
		return map[string]any{"room_id": roomID}, nil
	}
	if _, err := s.send(r.Context(), roomID, "m.room.member", c.userID, ptr(c.userID), map[string]any{"membership": "join"}); err != nil {
		return nil, err
	}
	return map[string]any{"room_id": roomID}, nil
}

func (s *Server) leave(r *http.Request, c *caller) (any, error) {
	roomID := r.PathValue("room")
	s.mu.Lock()
	defer s.mu.Unlock()
	if m, err := s.membership(r.Context(), roomID, c.userID); err != nil || m == "" || m == "leave" {
		if err != nil {
			return nil, err
		}
		return nil, errorf(http.StatusForbidden, "M_FORBIDDEN", "not in the room")
	}
	_, err := s.send(r.Context(), roomID, "m.room.member", c.userID, ptr(c.userID), map[string]any{"membership": "leave"})
	return map[string]any{}, err
}

// userKnown reports whether userID is registered here; an unknown user in an
// AS's namespace is asked of the AS first.
func (s *Server) userKnown(r *http.Request, userID string) (bool, error) {
	var x string
	ok, err := s.st.one(r.Context(), &x, `SELECT user_id FROM users WHERE user_id = ?`, userID)
	if err != nil || ok || !s.IsLocalUser(userID) {
		return ok || !s.IsLocalUser(userID), err
	}
	res, err := s.queries.QueryUser(r.Context(), userID)
	if err != nil || !res.Exists {
		return false, err
	}
	return s.st.one(r.Context(), &x, `SELECT user_id FROM users WHERE user_id = ?`, userID)
}

func (s *Server) invite(r *http.Request, c *caller) (any, error) {
	var req struct {
		UserID string `json:"user_id"`
	}
	if err := decode(r, &req); err != nil {
		return nil, err
	}
	known, err := s.userKnown(r, req.UserID)
	if err != nil {
		return nil, err
	}
	if !known {
		return nil, errorf(http.StatusNotFound, "M_NOT_FOUND", "unknown user %s", req.UserID)
	}
	roomID := r.PathValue("room")
	s.mu.Lock()
	defer s.mu.Unlock()
	if m, err := s.membership(r.Context(), roomID, c.userID); err != nil || m != "join" {
		if err != nil {
			return nil, err
		}
		return nil, errorf(http.StatusForbidden, "M_FORBIDDEN", "not in the room")
	}
	_, err = s.send(r.Context(), roomID, "m.room.member", c.userID, ptr(req.UserID), map[string]any{"membership": "invite"})
	return map[string]any{}, err
}

func (s *Server) sendMessage(r *http.Request, c *caller) (any, error) {
	return s.sendEvent(r, c, nil)
}

func (s *Server) sendState(r *http.Request, c *caller) (any, error) {
	return s.sendEvent(r, c, ptr(r.PathValue("key")))
}

func (s *Server) sendEvent(r *http.Request, c *caller, stateKey *string) (any, error) {
	var content map[string]any
	if err := decode(r, &content); err != nil {
		return nil, err
	}
	roomID, txn := r.PathValue("room"), r.PathValue("txn")
	ctx := r.Context()
	s.mu.Lock()
	defer s.mu.Unlock()
	if m, err := s.membership(ctx, roomID, c.userID); err != nil || m != "join" {
		if err != nil {
			return nil, err
		}
		return nil, errorf(http.StatusForbidden, "M_FORBIDDEN", "%s is not in the room", c.userID)
	}
	txnKey := c.token + "|" + c.userID
	if stateKey == nil {
		var prev string
		if ok, err := s.st.one(ctx, &prev, `SELECT event_id FROM send_txns WHERE token = ? AND txn_id = ?`, txnKey, txn); err != nil || ok {
			return map[string]any{"event_id": prev}, err
		}
	}
	eventID, err := s.send(ctx, roomID, r.PathValue("type"), c.userID, stateKey, content)
	if err != nil {
		return nil, err
	}
	if stateKey == nil {
		if _, err := s.st.db.ExecContext(ctx, `INSERT INTO send_txns (token, txn_id, event_id) VALUES (?, ?, ?)`, txnKey, txn, eventID); err != nil {
			return nil, err
		}
	}
	return map[string]any{"event_id": eventID}, nil
}

func (s *Server) getAlias(r *http.Request) (any, error) {
	roomID, err := s.resolve(r, r.PathValue("alias"))
	if err != nil {
		return nil, err
	}
	return map[string]any{"room_id": roomID, "servers": []string{s.cfg.ServerName}}, nil
}

func (s *Server) putAlias(r *http.Request, c *caller) (any, error) {
	var req struct {
		RoomID string `json:"room_id"`
	}
	if err := decode(r, &req); err != nil {
		return nil, err
	}
	alias := r.PathValue("alias")
	if !strings.HasSuffix(alias, ":"+s.cfg.ServerName) {
		return nil, errorf(http.StatusBadRequest, "M_INVALID_PARAM", "alias must be on %s", s.cfg.ServerName)
	}
	if err := s.cfg.Registry.Current().CheckAlias(c.as, alias); err != nil {
		return nil, err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if ok, err := s.roomExists(r.Context(), req.RoomID); err != nil || !ok {
		if err != nil {
			return nil, err
		}
		return nil, errorf(http.StatusNotFound, "M_NOT_FOUND", "no such room")
	}
	res, err := s.st.db.ExecContext(r.Context(), `INSERT OR IGNORE INTO aliases (alias, room_id, creator) VALUES (?, ?, ?)`, alias, req.RoomID, c.userID)
	if err != nil {
		return nil, err
	}
	if n, _ := res.RowsAffected(); n == 0 {
		return nil, errorf(http.StatusConflict, "M_UNKNOWN", "room alias already exists")
	}
	s.disp.InvalidateRoom(req.RoomID)
	s.queries.NoteAliasCreated(alias)
	return map[string]any{}, nil
}

func (s *Server) deleteAlias(r *http.Request, c *caller) (any, error) {
	alias := r.PathValue("alias")
	if err := s.cfg.Registry.Current().CheckAlias(c.as, alias); err != nil {
		return nil, err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	var roomID string
	ok, err := s.st.one(r.Context(), &roomID, `SELECT room_id FROM aliases WHERE alias = ?`, alias)
	if err != nil || !ok {
		if err != nil {
			return nil, err
		}
		return nil, errorf(http.StatusNotFound, "M_NOT_FOUND", "room alias not found")
	}
	if _, err := s.st.db.ExecContext(r.Context(), `DELETE FROM aliases WHERE alias = ?`, alias); err != nil {
		return nil, err
	}
	s.disp.InvalidateRoom(roomID)
	return map[string]any{}, nil
}

func (s *Server) profile(r *http.Request) (any, error) {
	user := r.PathValue("user")
	known, err := s.userKnown(r, user)
	if err != nil {
		return nil, err
	}
	if !known {
		return nil, errorf(http.StatusNotFound, "M_NOT_FOUND", "profile not found")
	}
	return map[string]any{"displayname": strings.TrimPrefix(strings.SplitN(user, ":", 2)[0], "@")}, nil
}

func (s *Server) typing(r *http.Request, c *caller) (any, error) {
	var req struct {
		Typing bool `json:"typing"`
	}
	if err := decode(r, &req); err != nil {
		return nil, err
	}
	roomID, user := r.PathValue("room"), r.PathValue("user")
	if user != c.userID {
		return nil, errorf(http.StatusForbidden, "M_FORBIDDEN", "cannot set another user's typing state")
	}
	users := []string{}
	if req.Typing {
		users = append(users, user)
	}
	js, _ := json.Marshal(map[string]any{"type": "m.typing", "room_id": roomID, "content": map[string]any{"user_ids": users}})
	return map[string]any{}, s.disp.SubmitEphemeral(r.Context(), dispatcher.Ephemeral{Type: "m.typing", RoomID: roomID, Users: []string{user}, JSON: js})
}

func (s *Server) receipt(r *http.Request, c *caller) (any, error) {
	roomID, typ, eventID := r.PathValue("room"), r.PathValue("type"), r.PathValue("event")
	content := map[string]any{eventID: map[string]any{typ: map[string]any{c.userID: map[string]any{"ts": time.Now().UnixMilli()}}}}
	js, _ := json.Marshal(map[string]any{"type": "m.receipt", "room_id": roomID, "content": content})
	return map[string]any{}, s.disp.SubmitEphemeral(r.Context(), dispatcher.Ephemeral{
		Type: "m.receipt", RoomID: roomID, Users: []string{c.userID}, Private: typ == "m.read.private", JSON: js,
	})
}

func (s *Server) sendToDevice(r *http.Request, c *caller) (any, error) {
	var req struct {
		Messages map[string]map[string]json.RawMessage `json:"messages"`
	}
	if err := decode(r, &req); err != nil {
		return nil, err
	}
	typ := r.PathValue("type")
	var msgs []dispatcher.ToDevice
	for user, devices := range req.Messages {
		for dev, content := range devices {
			js, _ := json.Marshal(map[string]any{"type": typ, "sender": c.userID, "content": content, "to_user_id": user, "to_device_id": dev})
			msgs = append(msgs, dispatcher.ToDevice{Sender: c.userID, Type: typ, ToUser: user, ToDevice: dev, JSON: js})
		}
	}
	return map[string]any{}, s.disp.SubmitToDevice(r.Context(), msgs...)
}

func (s *Server) ping(r *http.Request, c *caller) (any, error) {
	id := r.PathValue("id")
	if c.as == nil || c.as.ID != id {
		return nil, errorf(http.StatusForbidden, "M_FORBIDDEN", "only the application service %s may ping itself", id)
	}
	var req struct {
		TransactionID string `json:"transaction_id"`
	}
	if err := decode(r, &req); err != nil {
		return nil, err
	}
	d, err := s.queries.Ping(r.Context(), id, req.TransactionID)
	var pe *queries.PingError
	if errors.As(err, &pe) {
		out := map[string]any{"errcode": pe.Code, "error": pe.Error()}
		if pe.Code == "M_BAD_STATUS" {
			out["status"], out["body"] = pe.ASStatus, pe.ASBody
		}
		return nil, &jsonError{status: pe.Status, body: out}
	}
	if err != nil {
		return nil, err
	}
	return map[string]any{"duration_ms": d.Milliseconds()}, nil
}

// jsonError is an error answered with a body of its own.
type jsonError struct {
	status int
	body   map[string]any
}

func (e *jsonError) Error() string { return e.body["errcode"].(string) }

func (s *Server) appservices(r *http.Request) (any, error) {
	sts, err := s.disp.Statuses(r.Context())
	if err != nil {
		return nil, err
	}
	out := make([]map[string]any, 0, len(sts))
	now := time.Now()
	for _, st := range sts {
		state := "up"
		if !st.Up {
			state = "down"
		}
		if !st.Registered {
			state = "removed (paused)"
		}
		row := map[string]any{"id": st.ID, "state": state, "backlog_events": st.PendingItems, "backlog_txns": st.PendingTxns,
			"consecutive_failures": st.Failures, "last_error": st.LastError}
		if !st.OldestPending.IsZero() {
			row["oldest_pending_age_ms"] = now.Sub(st.OldestPending).Milliseconds()
		}
		if !st.LastSuccess.IsZero() {
			row["last_success"] = st.LastSuccess.UTC().Format(time.RFC3339)
		}
		if !st.NextRetry.IsZero() {
			row["next_retry"] = st.NextRetry.UTC().Format(time.RFC3339)
		}
		out = append(out, row)
	}
	return map[string]any{"appservices": out}, nil
}
