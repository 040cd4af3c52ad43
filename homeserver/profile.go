package homeserver

import (
	"context"
	"database/sql"
	"unicode/utf8"
)

func (s *Server) profileRoutes() []route {
	return []route{
		{"GET", v3 + "/profile/{user}", public, s.getProfile},
		{"GET", v3 + "/profile/{user}/{field}", public, s.getProfile},
		{"PUT", v3 + "/profile/{user}/{field}", user, s.putProfile},
	}
}

type profile struct {
	DisplayName *string `json:"displayname,omitempty"`
	AvatarURL   *string `json:"avatar_url,omitempty"`
}

func (s *Server) loadProfile(ctx context.Context, q querier, userID string) (*profile, bool, error) {
	var dn, av sql.NullString
	ok, err := one(ctx, q, `SELECT displayname, avatar_url FROM users WHERE user_id = ?`, []any{userID}, &dn, &av)
	if err != nil || !ok {
		return nil, false, err
	}
	p := &profile{}
	if dn.Valid {
		p.DisplayName = &dn.String
	}
	if av.Valid {
		p.AvatarURL = &av.String
	}
	return p, true, nil
}

// getProfile answers GET /profile/{user}[/{field}]. An unknown user in an
// AS's namespace is asked of the AS first; remote users are not found.
func (s *Server) getProfile(r *request) (any, error) {
	u, err := r.userParam()
	if err != nil {
		return nil, err
	}
	field := r.PathValue("field")
	if field != "" && field != "displayname" && field != "avatar_url" {
		return nil, errNotFound.With("unknown profile field %s", field)
	}
	if !s.IsLocalUser(u) {
		return nil, errNotFound.With("profile not found")
	}
	known, err := s.userKnown(r.Request, u)
	if err != nil {
		return nil, err
	}
	if !known {
		return nil, errNotFound.With("profile not found")
	}
	p, _, err := s.loadProfile(r.Context(), s.st.db, u)
	if err != nil {
		return nil, err
	}
	switch field {
	case "displayname":
		return &profile{DisplayName: p.DisplayName}, nil
	case "avatar_url":
		return &profile{AvatarURL: p.AvatarURL}, nil
	}
	return p, nil
}

// putProfile sets the caller's displayname or avatar_url and, as Synapse
// does, sends an updated m.room.member event to each room it is joined to.
func (s *Server) putProfile(r *request) (any, error) {
	u, err := ownUser(r, "set the profile")
	if err != nil {
		return nil, err
	}
	field := r.PathValue("field")
	if field != "displayname" && field != "avatar_url" {
		return nil, errNotFound.With("unknown profile field %s", field)
	}
	var req map[string]any
	if err := decodeJSON(r.Request, &req); err != nil {
		return nil, err
	}
	raw, present := req[field]
	if !present {
		return nil, errMissingParam.With("%s is required", field)
	}
	var value *string
	switch v := raw.(type) {
	case nil:
	case string:
		limit := 256
		if field == "avatar_url" {
			limit = 1000
		}
		if utf8.RuneCountInString(v) > limit {
			return nil, errInvalidParam.With("%s is longer than %d characters", field, limit)
		}
		value = &v
	default:
		return nil, errBadJSON.With("%s must be a string", field)
	}
	ctx := r.Context()
	s.mu.Lock()
	defer s.mu.Unlock()
	col := "displayname"
	if field == "avatar_url" {
		col = "avatar_url"
	}
	// A user an AS masquerades as is registered (auth checked it); a token
	// user too. The sender user was registered at startup.
	if _, err := s.st.db.ExecContext(ctx, `UPDATE users SET `+col+` = ? WHERE user_id = ?`, value, u); err != nil {
		return nil, err
	}
	rooms, err := s.st.list(ctx, `SELECT room_id FROM memberships WHERE user_id = ? AND membership = 'join' ORDER BY room_id`, u)
	if err != nil {
		return nil, err
	}
	for _, roomID := range rooms {
		cur, err := s.stateEvent(ctx, s.st.db, roomID, "m.room.member", u)
		if err != nil {
			return nil, err
		}
		content := map[string]any{}
		if cur != nil {
			for k, v := range cur.Content {
				content[k] = v
			}
		}
		content["membership"] = "join"
		if value == nil {
			delete(content, field)
		} else {
			content[field] = *value
		}
		if err := s.commit(ctx, []*event{s.newEvent(roomID, "m.room.member", u, ptr(u), content)}, nil); err != nil {
			return nil, err
		}
	}
	return empty, nil
}

// withProfile adds the user's displayname and avatar_url to member event
// content, as Synapse does on join and invite.
func (s *Server) withProfile(ctx context.Context, q querier, userID string, content map[string]any) (map[string]any, error) {
	p, ok, err := s.loadProfile(ctx, q, userID)
	if err != nil || !ok {
		return content, err
	}
	if p.DisplayName != nil {
		if _, set := content["displayname"]; !set {
			content["displayname"] = *p.DisplayName
		}
	}
	if p.AvatarURL != nil {
		if _, set := content["avatar_url"]; !set {
			content["avatar_url"] = *p.AvatarURL
		}
	}
	return content, nil
}
