package homeserver

import (
	"context"
	"database/sql"
	"encoding/json"
	"net/http"
	"strconv"
	"strings"
	"time"
)

func (s *Server) accountRoutes() []route {
	return []route{
		{"GET", "/_matrix/client/versions", public, s.versions},
		{"GET", v3 + "/capabilities", user, s.capabilities},
		{"POST", v3 + "/register", public, typed(s.register)},
		{"GET", v3 + "/register/available", public, s.registerAvailable},
		{"GET", v3 + "/login", public, s.loginFlows},
		{"POST", v3 + "/login", public, typed(s.login)},
		{"POST", v3 + "/logout", user, s.logout},
		{"POST", v3 + "/logout/all", user, s.logoutAll},
		{"GET", v3 + "/account/whoami", user, s.whoami},
		{"GET", v3 + "/devices", user, s.devices},
		{"GET", v3 + "/devices/{device}", user, s.device},
		{"PUT", v3 + "/devices/{device}", user, typed(s.putDevice)},
		{"DELETE", v3 + "/devices/{device}", user, typed(s.deleteDevice)},
		{"POST", v3 + "/delete_devices", user, typed(s.deleteDevices)},
		{"POST", v3 + "/user/{user}/filter", user, s.postFilter},
		{"GET", v3 + "/user/{user}/filter/{filter}", user, s.getFilter},
		{"GET", v3 + "/user/{user}/account_data/{type}", user, s.getAccountData},
		{"PUT", v3 + "/user/{user}/account_data/{type}", user, s.putAccountData},
		{"GET", v3 + "/user/{user}/rooms/{room}/account_data/{type}", user, s.getAccountData},
		{"PUT", v3 + "/user/{user}/rooms/{room}/account_data/{type}", user, s.putAccountData},
		{"GET", v3 + "/presence/{user}/status", user, s.getPresence},
		{"PUT", v3 + "/presence/{user}/status", user, typed(s.putPresence)},
	}
}

// supportedVersions are the spec versions /versions lists. mautrix-go
// bridgev2 wants v1.4 or later and uses authenticated media (v1.11) when
// listed; matrix-bot-sdk 0.8 uses v3 paths and authenticated media too.
var supportedVersions = []string{"r0.5.0", "r0.6.0", "r0.6.1", "v1.1", "v1.2", "v1.3", "v1.4", "v1.5", "v1.6",
	"v1.7", "v1.8", "v1.9", "v1.10", "v1.11", "v1.12", "v1.13"}

func (s *Server) versions(*request) (any, error) {
	return map[string]any{"versions": supportedVersions, "unstable_features": map[string]bool{}}, nil
}

// roomVersions are the room versions createRoom accepts (the stub applies
// the same rules to all of them).
var roomVersions = []string{"1", "2", "3", "4", "5", "6", "7", "8", "9", "10", "11"}

const defaultRoomVersion = "10"

func (s *Server) capabilities(*request) (any, error) {
	available := map[string]string{}
	for _, v := range roomVersions {
		available[v] = "stable"
	}
	on, off := map[string]bool{"enabled": true}, map[string]bool{"enabled": false}
	return map[string]any{"capabilities": map[string]any{
		"m.change_password": off, // no /account/password here
		"m.room_versions":   map[string]any{"default": defaultRoomVersion, "available": available},
		"m.set_displayname": on,
		"m.set_avatar_url":  on,
		"m.3pid_changes":    off,
		"m.get_login_token": off,
	}}, nil
}

// validUserID applies Matrix's rules for a new user ID: local, at most 255
// bytes, and a localpart of a-z, 0-9 and "._=-/+" only (as Synapse does).
func (s *Server) validUserID(userID string) error {
	local, server, _ := strings.Cut(strings.TrimPrefix(userID, "@"), ":")
	if server != s.cfg.ServerName {
		return errInvalidUser.With("user ID must be on %s", s.cfg.ServerName)
	}
	if len(userID) > 255 {
		return errInvalidUser.With("user ID is longer than 255 bytes")
	}
	if local == "" || strings.TrimLeft(local, "abcdefghijklmnopqrstuvwxyz0123456789._=-/+") != "" {
		return errInvalidUser.With("user ID can only contain a-z, 0-9 and ._=-/+")
	}
	return nil
}

// fullUserID turns a localpart or user ID into a user ID.
func (s *Server) fullUserID(name string) string {
	if strings.HasPrefix(name, "@") {
		return name
	}
	return "@" + name + ":" + s.cfg.ServerName
}

type reqRegister struct {
	Username                 string `json:"username"`
	Password                 string `json:"password"`
	Type                     string `json:"type"`
	InhibitLogin             bool   `json:"inhibit_login"`
	DeviceID                 string `json:"device_id"`
	InitialDeviceDisplayName string `json:"initial_device_display_name"`
	Auth                     struct {
		Type string `json:"type"`
	} `json:"auth"`
}

type respLogin struct {
	UserID      string `json:"user_id"`
	AccessToken string `json:"access_token,omitempty"`
	DeviceID    string `json:"device_id,omitempty"`
	HomeServer  string `json:"home_server,omitempty"`
}

// register creates a user. With type m.login.application_service (or
// auth.type) and an as_token, inside the AS's namespaces and without a
// password, as Synapse; otherwise with a password, outside every exclusive
// namespace.
func (s *Server) register(r *request, req *reqRegister) (any, error) {
	asType := req.Type == "m.login.application_service" || req.Auth.Type == "m.login.application_service"
	if req.Username == "" {
		if asType {
			return nil, errMissingParam.With("username is required")
		}
		req.Username = "user" + randomID(4)
	}
	userID := s.fullUserID(req.Username)
	if err := s.validUserID(userID); err != nil {
		return nil, err
	}
	set := s.cfg.Registry.Current()
	asID, hash := "", ""
	if asType {
		as, err := set.ByASToken(accessToken(r.Request))
		if err != nil {
			return nil, err
		}
		if err := set.CheckRegister(as, userID); err != nil {
			return nil, err
		}
		asID = as.ID
	} else {
		if req.Password == "" {
			return nil, errMissingParam.With("password is required")
		}
		if err := set.CheckRegister(nil, userID); err != nil {
			return nil, err
		}
		hash = hashPassword(req.Password, s.cfg.Password)
	}
	ctx := r.Context()
	s.mu.Lock()
	defer s.mu.Unlock()
	res, err := s.st.db.ExecContext(ctx, `INSERT OR IGNORE INTO users (user_id, password, appservice, displayname) VALUES (?, ?, ?, ?)`,
		userID, hash, asID, localpart(userID))
	if err != nil {
		return nil, err
	}
	if n, _ := res.RowsAffected(); n == 0 {
		return nil, errUserInUse.With("user ID already taken")
	}
	if asID != "" {
		s.queries.NoteUserRegistered(userID)
	}
	out := &respLogin{UserID: userID, HomeServer: s.cfg.ServerName}
	if !req.InhibitLogin {
		out.AccessToken, out.DeviceID, err = s.newToken(ctx, userID, req.DeviceID, req.InitialDeviceDisplayName)
		if err != nil {
			return nil, err
		}
	}
	return out, nil
}

func (s *Server) registerAvailable(r *request) (any, error) {
	userID := s.fullUserID(r.query("username"))
	if err := s.validUserID(userID); err != nil {
		return nil, err
	}
	if err := s.cfg.Registry.Current().CheckRegister(nil, userID); err != nil {
		return nil, err
	}
	ok, err := s.registered(r.Context(), userID)
	if err != nil {
		return nil, err
	}
	if ok {
		return nil, errUserInUse.With("user ID already taken")
	}
	return map[string]bool{"available": true}, nil
}

// newToken issues an access token for a device: the requested one (created
// if new) or a fresh one. The caller holds s.mu.
func (s *Server) newToken(ctx context.Context, userID, deviceID, displayName string) (string, string, error) {
	if deviceID == "" {
		deviceID = strings.ToUpper(randomID(5))
	}
	tok := "syt_" + randomID(16)
	err := s.deviceListTx(ctx, func(tx *sql.Tx) ([]string, error) {
		res, err := tx.ExecContext(ctx, `INSERT OR IGNORE INTO devices (user_id, device_id, display_name) VALUES (?, ?, ?)`, userID, deviceID, nullable(displayName))
		if err != nil {
			return nil, err
		}
		if _, err := tx.ExecContext(ctx, `INSERT INTO tokens (token, user_id, device_id) VALUES (?, ?, ?)`, tokenHash(tok), userID, deviceID); err != nil {
			return nil, err
		}
		if n, _ := res.RowsAffected(); n == 0 {
			return nil, nil
		}
		return []string{userID}, nil
	})
	if err != nil {
		return "", "", err
	}
	return tok, deviceID, nil
}

func (s *Server) loginFlows(*request) (any, error) {
	return map[string]any{"flows": []map[string]string{{"type": "m.login.password"}, {"type": "m.login.application_service"}}}, nil
}

type reqLogin struct {
	Type       string `json:"type"`
	Identifier struct {
		Type string `json:"type"`
		User string `json:"user"`
	} `json:"identifier"`
	User                     string `json:"user"`
	Password                 string `json:"password"`
	DeviceID                 string `json:"device_id"`
	InitialDeviceDisplayName string `json:"initial_device_display_name"`
}

func (s *Server) login(r *request, req *reqLogin) (any, error) {
	name := req.Identifier.User
	if name == "" {
		name = req.User
	}
	if name == "" {
		return nil, errMissingParam.With("identifier.user is required")
	}
	if req.Identifier.Type != "" && req.Identifier.Type != "m.id.user" {
		return nil, errUnknown400.With("unsupported identifier type %q", req.Identifier.Type)
	}
	userID := s.fullUserID(name)
	ctx := r.Context()
	var stored string
	exists, err := s.st.one(ctx, &stored, `SELECT password FROM users WHERE user_id = ?`, userID)
	if err != nil {
		return nil, err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	switch req.Type {
	case "m.login.password":
		ok, rehash := checkPassword(stored, req.Password, s.cfg.Password)
		if !exists || !ok {
			return nil, errForbidden.With("invalid username or password")
		}
		if rehash {
			if _, err := s.st.db.ExecContext(ctx, `UPDATE users SET password = ? WHERE user_id = ?`, hashPassword(req.Password, s.cfg.Password), userID); err != nil {
				return nil, err
			}
		}
	case "m.login.application_service":
		set := s.cfg.Registry.Current()
		as, err := set.ByASToken(accessToken(r.Request))
		if err != nil {
			return nil, err
		}
		if userID != as.SenderUserID {
			if err := set.CanMasquerade(as, userID); err != nil {
				return nil, err
			}
		}
		if !exists {
			return nil, errForbidden.With("%s is not registered", userID)
		}
	default:
		return nil, errUnknown400.With("unsupported login type %q", req.Type)
	}
	tok, dev, err := s.newToken(ctx, userID, req.DeviceID, req.InitialDeviceDisplayName)
	if err != nil {
		return nil, err
	}
	return &respLogin{UserID: userID, AccessToken: tok, DeviceID: dev, HomeServer: s.cfg.ServerName}, nil
}

// logout ends the calling token and its device (with its keys), as
// Synapse does. An as_token is not a session: logging it out changes
// nothing.
func (s *Server) logout(r *request) (any, error) {
	if r.c.as != nil {
		return empty, nil
	}
	return empty, s.removeDevices(r.Context(), r.c.userID, []string{r.c.deviceID})
}

func (s *Server) logoutAll(r *request) (any, error) {
	ctx := r.Context()
	devs, err := s.st.list(ctx, `SELECT device_id FROM devices WHERE user_id = ? UNION SELECT device_id FROM tokens WHERE user_id = ?`, r.c.userID, r.c.userID)
	if err != nil {
		return nil, err
	}
	return empty, s.removeDevices(ctx, r.c.userID, devs)
}

type respWhoami struct {
	UserID   string `json:"user_id"`
	DeviceID string `json:"device_id,omitempty"`
	IsGuest  bool   `json:"is_guest"`
}

func (s *Server) whoami(r *request) (any, error) {
	return &respWhoami{UserID: r.c.userID, DeviceID: r.c.deviceID}, nil
}

type respDevice struct {
	DeviceID    string  `json:"device_id"`
	DisplayName *string `json:"display_name,omitempty"`
}

func (s *Server) listDevices(ctx context.Context, userID, deviceID string) ([]respDevice, error) {
	rows, err := s.st.db.QueryContext(ctx, `SELECT device_id, display_name FROM devices WHERE user_id = ? AND (? = '' OR device_id = ?) ORDER BY device_id`, userID, deviceID, deviceID)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	out := []respDevice{}
	for rows.Next() {
		var d respDevice
		var name sql.NullString
		if err := rows.Scan(&d.DeviceID, &name); err != nil {
			return nil, err
		}
		if name.Valid {
			d.DisplayName = &name.String
		}
		out = append(out, d)
	}
	return out, rows.Err()
}

func (s *Server) devices(r *request) (any, error) {
	ds, err := s.listDevices(r.Context(), r.c.userID, "")
	if err != nil {
		return nil, err
	}
	return map[string]any{"devices": ds}, nil
}

func (s *Server) device(r *request) (any, error) {
	ds, err := s.listDevices(r.Context(), r.c.userID, r.PathValue("device"))
	if err != nil {
		return nil, err
	}
	if len(ds) == 0 {
		return nil, errNotFound.With("no such device")
	}
	return ds[0], nil
}

// ownUser checks that the {user} path value is the caller.
func ownUser(r *request, what string) (string, error) {
	u, err := r.userParam()
	if err != nil {
		return "", err
	}
	if u != r.c.userID {
		return "", errForbidden.With("cannot %s for another user", what)
	}
	return u, nil
}

// rawObject decodes a body that must be a JSON object and returns it
// compacted.
func rawObject(r *request) (json.RawMessage, map[string]any, error) {
	var obj map[string]any
	if err := decodeJSON(r.Request, &obj); err != nil {
		return nil, nil, err
	}
	js, err := json.Marshal(obj)
	return js, obj, err
}

func (s *Server) postFilter(r *request) (any, error) {
	u, err := ownUser(r, "create a filter")
	if err != nil {
		return nil, err
	}
	js, _, err := rawObject(r)
	if err != nil {
		return nil, err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	ctx := r.Context()
	var id int64
	if _, err := one(ctx, s.st.db, `SELECT COALESCE(MAX(filter_id), -1) + 1 FROM filters WHERE user_id = ?`, []any{u}, &id); err != nil {
		return nil, err
	}
	if _, err := s.st.db.ExecContext(ctx, `INSERT INTO filters (user_id, filter_id, json) VALUES (?, ?, ?)`, u, id, js); err != nil {
		return nil, err
	}
	return map[string]string{"filter_id": strconv.FormatInt(id, 10)}, nil
}

func (s *Server) getFilter(r *request) (any, error) {
	u, err := ownUser(r, "read a filter")
	if err != nil {
		return nil, err
	}
	js, err := s.filterJSON(r.Context(), u, r.PathValue("filter"))
	if err != nil {
		return nil, err
	}
	return js, nil
}

func (s *Server) filterJSON(ctx context.Context, userID, id string) (json.RawMessage, error) {
	n, err := strconv.ParseInt(id, 10, 64)
	if err != nil {
		return nil, errNotFound.With("no such filter")
	}
	var js []byte
	ok, err := s.st.one(ctx, &js, `SELECT json FROM filters WHERE user_id = ? AND filter_id = ?`, userID, n)
	if err != nil {
		return nil, err
	}
	if !ok {
		return nil, errNotFound.With("no such filter")
	}
	return js, nil
}

// accountDataPath checks the path of an account data request: the caller's
// own {user} and, on the room variant, a {room} that is a room ID.
func accountDataPath(r *request, what string) (userID, roomID, typ string, err error) {
	if userID, err = ownUser(r, what); err != nil {
		return "", "", "", err
	}
	roomID, typ = r.PathValue("room"), r.PathValue("type")
	if roomID != "" {
		if _, err := r.roomParam(); err != nil {
			return "", "", "", err
		}
	}
	return userID, roomID, typ, nil
}

func (s *Server) getAccountData(r *request) (any, error) {
	u, roomID, typ, err := accountDataPath(r, "read account data")
	if err != nil {
		return nil, err
	}
	var js []byte
	ok, err := s.st.one(r.Context(), &js, `SELECT json FROM account_data WHERE user_id = ? AND room_id = ? AND type = ?`, u, roomID, typ)
	if err != nil {
		return nil, err
	}
	if !ok {
		return nil, errNotFound.With("account data not found")
	}
	return json.RawMessage(js), nil
}

func (s *Server) putAccountData(r *request) (any, error) {
	u, roomID, typ, err := accountDataPath(r, "set account data")
	if err != nil {
		return nil, err
	}
	if typ == "m.fully_read" || typ == "m.push_rules" {
		return nil, errServerOwned.With("cannot set %s through this API", typ)
	}
	js, _, err := rawObject(r)
	if err != nil {
		return nil, err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	return empty, s.setAccountData(r.Context(), s.st.db, u, roomID, typ, js)
}

// setAccountData stores account data at the next account-data position.
// The caller holds s.mu.
func (s *Server) setAccountData(ctx context.Context, q querier, userID, roomID, typ string, js []byte) error {
	_, err := q.ExecContext(ctx, `INSERT OR REPLACE INTO account_data (user_id, room_id, type, json, pos) VALUES (?, ?, ?, ?, (SELECT COALESCE(MAX(pos), 0) + 1 FROM account_data))`,
		userID, roomID, typ, js)
	if err == nil {
		s.wake()
	}
	return err
}

func (s *Server) getPresence(r *request) (any, error) {
	u, err := r.userParam()
	if err != nil {
		return nil, err
	}
	ctx := r.Context()
	known, err := s.registered(ctx, u)
	if err != nil {
		return nil, err
	}
	if !known {
		return nil, errNotFound.With("unknown user %s", u)
	}
	var presence string
	var msg sql.NullString
	var last int64
	ok, err := one(ctx, s.st.db, `SELECT presence, status_msg, last_active FROM presence WHERE user_id = ?`, []any{u}, &presence, &msg, &last)
	if err != nil {
		return nil, err
	}
	if !ok {
		return map[string]any{"presence": "offline"}, nil
	}
	out := map[string]any{"presence": presence, "last_active_ago": max(time.Now().UnixMilli()-last, 0), "currently_active": presence == "online"}
	if msg.Valid {
		out["status_msg"] = msg.String
	}
	return out, nil
}

func (s *Server) putPresence(r *request, req *struct {
	Presence  string  `json:"presence"`
	StatusMsg *string `json:"status_msg"`
}) (any, error) {
	u, err := ownUser(r, "set presence")
	if err != nil {
		return nil, err
	}
	switch req.Presence {
	case "online", "offline", "unavailable":
	case "":
		return nil, errMissingParam.With("presence is required")
	default:
		return nil, errInvalidParam.With("presence must be online, offline or unavailable")
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	_, err = s.st.db.ExecContext(r.Context(), `INSERT OR REPLACE INTO presence (user_id, presence, status_msg, last_active) VALUES (?, ?, ?, ?)`,
		u, req.Presence, req.StatusMsg, time.Now().UnixMilli())
	return empty, err
}

// registered reports whether userID is a registered local user.
func (s *Server) registered(ctx context.Context, userID string) (bool, error) {
	var x string
	return s.st.one(ctx, &x, `SELECT user_id FROM users WHERE user_id = ?`, userID)
}

// userKnown reports whether userID exists: registered here, or remote; an
// unknown user in an AS's namespace is asked of the AS first.
func (s *Server) userKnown(r *http.Request, userID string) (bool, error) {
	if !s.IsLocalUser(userID) {
		return true, nil
	}
	ok, err := s.registered(r.Context(), userID)
	if err != nil || ok {
		return ok, err
	}
	res, err := s.queries.QueryUser(r.Context(), userID)
	if err != nil || !res.Exists {
		return false, err
	}
	return s.registered(r.Context(), userID)
}
