package homeserver

import (
	"context"
	"database/sql"
	"net/http"
	"sync"
)

// created is the 201 {} answer of a PUT that created what it names.
type created struct{}

func (created) writeTo(w http.ResponseWriter) { writeJSON(w, http.StatusCreated, empty) }

// putDevice renames a device of the caller. An AS acting with its as_token
// (as itself or, with ?user_id=, as one of its users) also creates the
// device if it does not exist (MSC4190, spec v1.17): 201, with the display
// name as its initial name. Anyone else gets 404 for an unknown device.
func (s *Server) putDevice(r *request, req *struct {
	DisplayName *string `json:"display_name"`
}) (any, error) {
	dev := r.PathValue("device")
	ctx := r.Context()
	s.mu.Lock()
	defer s.mu.Unlock()
	res, err := s.st.db.ExecContext(ctx, `UPDATE devices SET display_name = COALESCE(?, display_name) WHERE user_id = ? AND device_id = ?`, req.DisplayName, r.c.userID, dev)
	if err != nil {
		return nil, err
	}
	if n, _ := res.RowsAffected(); n > 0 {
		return empty, nil
	}
	if r.c.as == nil {
		return nil, errNotFound.With("no such device")
	}
	if dev == "" || len(dev) > 255 {
		return nil, errInvalidParam.With("invalid device ID")
	}
	err = s.deviceListTx(ctx, func(tx *sql.Tx) ([]string, error) {
		_, err := tx.ExecContext(ctx, `INSERT INTO devices (user_id, device_id, display_name) VALUES (?, ?, ?)`, r.c.userID, dev, req.DisplayName)
		return []string{r.c.userID}, err
	})
	if err != nil {
		return nil, err
	}
	return created{}, nil
}

type reqDeleteDevices struct {
	Devices []string `json:"devices"`
	Auth    *uiaAuth `json:"auth"`
}

// deleteDevice deletes one device of the caller with its tokens and keys.
// A user authenticates with the password stage; an AS with its as_token
// needs no user-interactive auth (MSC4190).
func (s *Server) deleteDevice(r *request, req *reqDeleteDevices) (any, error) {
	dev := r.PathValue("device")
	ctx := r.Context()
	var x string
	ok, err := s.st.one(ctx, &x, `SELECT device_id FROM devices WHERE user_id = ? AND device_id = ?`, r.c.userID, dev)
	if err != nil {
		return nil, err
	}
	if !ok {
		return nil, errNotFound.With("no such device")
	}
	if r.c.as == nil {
		if err := s.checkUIA(ctx, r.c.userID, req.Auth); err != nil {
			return nil, err
		}
	}
	return empty, s.removeDevices(ctx, r.c.userID, []string{dev})
}

// deleteDevices deletes several devices of the caller; unknown ones are
// skipped, as on Synapse.
func (s *Server) deleteDevices(r *request, req *reqDeleteDevices) (any, error) {
	if req.Devices == nil {
		return nil, errMissingParam.With("devices is required")
	}
	if r.c.as == nil {
		if err := s.checkUIA(r.Context(), r.c.userID, req.Auth); err != nil {
			return nil, err
		}
	}
	return empty, s.removeDevices(r.Context(), r.c.userID, req.Devices)
}

// removeDevices deletes devices of userID: tokens, device keys, one-time
// and fallback keys and pending to-device messages; the device list
// stream records one change if any device existed.
func (s *Server) removeDevices(ctx context.Context, userID string, devs []string) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.deviceListTx(ctx, func(tx *sql.Tx) ([]string, error) {
		removed := false
		for _, dev := range devs {
			res, err := tx.ExecContext(ctx, `DELETE FROM devices WHERE user_id = ? AND device_id = ?`, userID, dev)
			if err != nil {
				return nil, err
			}
			if n, _ := res.RowsAffected(); n > 0 {
				removed = true
			}
			for _, q := range []string{
				`DELETE FROM tokens WHERE user_id = ? AND device_id = ?`,
				`DELETE FROM device_keys WHERE user_id = ? AND device_id = ?`,
				`DELETE FROM one_time_keys WHERE user_id = ? AND device_id = ?`,
				`DELETE FROM fallback_keys WHERE user_id = ? AND device_id = ?`,
				`DELETE FROM to_device WHERE user_id = ? AND device_id = ?`,
				`DELETE FROM key_signatures WHERE target_user = ? AND target_key = ?`,
			} {
				if _, err := tx.ExecContext(ctx, q, userID, dev); err != nil {
					return nil, err
				}
			}
		}
		if !removed {
			return nil, nil
		}
		return []string{userID}, nil
	})
}

// uiaAuth is the auth object of a request under user-interactive auth.
// The stub offers one flow: the password stage.
type uiaAuth struct {
	Type       string `json:"type"`
	Session    string `json:"session"`
	Password   string `json:"password"`
	User       string `json:"user"`
	Identifier struct {
		Type string `json:"type"`
		User string `json:"user"`
	} `json:"identifier"`
}

// uiaSessions are the sessions handed out in 401 challenges, by session ID,
// with the user each belongs to. They live as long as the process: a
// restart only makes a client start over.
type uiaSessions struct {
	mu sync.Mutex
	m  map[string]string
}

func (u *uiaSessions) open(userID string) string {
	u.mu.Lock()
	defer u.mu.Unlock()
	if u.m == nil {
		u.m = map[string]string{}
	}
	id := randomID(12)
	u.m[id] = userID
	return id
}

func (u *uiaSessions) owner(session string) (string, bool) {
	u.mu.Lock()
	defer u.mu.Unlock()
	v, ok := u.m[session]
	return v, ok
}

func (u *uiaSessions) close(session string) {
	u.mu.Lock()
	defer u.mu.Unlock()
	delete(u.m, session)
}

// challenge is the 401 answer that starts (or, with code, retries) a
// user-interactive auth session.
func (s *Server) challenge(userID, session string, fail *mxError) *mxError {
	if session == "" {
		session = s.uia.open(userID)
	}
	e := &mxError{Status: http.StatusUnauthorized, Extra: map[string]any{
		"flows":   []map[string]any{{"stages": []string{"m.login.password"}}},
		"params":  map[string]any{},
		"session": session,
	}}
	if fail != nil {
		e.Code, e.Msg = fail.Code, fail.Msg
		e.Extra["completed"] = []string{}
	}
	return e
}

// checkUIA passes when auth completes the password stage for userID in a
// session the server handed out; otherwise it answers the 401 challenge.
// A password failure is 401 M_FORBIDDEN within the same session, as the
// spec shows.
func (s *Server) checkUIA(ctx context.Context, userID string, auth *uiaAuth) error {
	if auth == nil || auth.Type == "" {
		return s.challenge(userID, "", nil)
	}
	owner, ok := s.uia.owner(auth.Session)
	if !ok || owner != userID {
		return s.challenge(userID, "", nil)
	}
	if auth.Type != "m.login.password" {
		return s.challenge(userID, auth.Session, errUnknown400.With("unsupported stage %q", auth.Type))
	}
	name := auth.Identifier.User
	if name == "" {
		name = auth.User
	}
	if name != "" && s.fullUserID(name) != userID {
		return s.challenge(userID, auth.Session, errForbidden.With("authenticate as yourself"))
	}
	var stored string
	if _, err := s.st.one(ctx, &stored, `SELECT password FROM users WHERE user_id = ?`, userID); err != nil {
		return err
	}
	if good, _ := checkPassword(stored, auth.Password, s.cfg.Password); !good {
		return s.challenge(userID, auth.Session, errForbidden.With("invalid password"))
	}
	s.uia.close(auth.Session)
	return nil
}
