package homeserver

import (
	"net/http"
	"strings"
	"time"
)

func (s *Server) directoryRoutes() []route {
	return []route{
		{"GET", v3 + "/directory/room/{alias}", public, s.getAlias},
		{"PUT", v3 + "/directory/room/{alias}", user, typed(s.putAlias)},
		{"DELETE", v3 + "/directory/room/{alias}", user, s.deleteAlias},
		{"GET", v3 + "/directory/list/room/{room}", public, s.getVisibility},
		{"PUT", v3 + "/directory/list/room/{room}", user, typed(s.putVisibility)},
	}
}

func (s *Server) aliasParam(r *request) (string, error) {
	alias := r.PathValue("alias")
	if !strings.HasPrefix(alias, "#") || !strings.Contains(alias, ":") {
		return "", errInvalidParam.With("%q is not a room alias", alias)
	}
	return alias, nil
}

func (s *Server) getAlias(r *request) (any, error) {
	alias, err := s.aliasParam(r)
	if err != nil {
		return nil, err
	}
	roomID, err := s.resolve(r.Context(), alias)
	if err != nil {
		return nil, err
	}
	return map[string]any{"room_id": roomID, "servers": []string{s.cfg.ServerName}}, nil
}

// putAlias creates an alias. Outside an AS's own namespace the caller must
// be in the target room (as on Synapse); exclusive namespaces of ASes are
// theirs alone.
func (s *Server) putAlias(r *request, req *struct {
	RoomID string `json:"room_id"`
}) (any, error) {
	alias, err := s.aliasParam(r)
	if err != nil {
		return nil, err
	}
	if req.RoomID == "" {
		return nil, errMissingParam.With("room_id is required")
	}
	if !strings.HasSuffix(alias, ":"+s.cfg.ServerName) {
		return nil, errInvalidParam.With("alias must be on %s", s.cfg.ServerName)
	}
	set := s.cfg.Registry.Current()
	if err := set.CheckAlias(r.c.as, alias); err != nil {
		return nil, err
	}
	ctx := r.Context()
	s.mu.Lock()
	defer s.mu.Unlock()
	if ok, err := s.roomExists(ctx, s.st.db, req.RoomID); err != nil || !ok {
		if err != nil {
			return nil, err
		}
		return nil, errNotFound.With("no such room")
	}
	if r.c.as == nil {
		m, err := s.membership(ctx, s.st.db, req.RoomID, r.c.userID)
		if err != nil {
			return nil, err
		}
		if m != "join" {
			return nil, errForbidden.With("you must be in the room to create an alias for it")
		}
	}
	res, err := s.st.db.ExecContext(ctx, `INSERT OR IGNORE INTO aliases (alias, room_id, creator) VALUES (?, ?, ?)`, alias, req.RoomID, r.c.userID)
	if err != nil {
		return nil, err
	}
	if n, _ := res.RowsAffected(); n == 0 {
		return nil, errConflict.With("room alias already exists")
	}
	s.disp.InvalidateRoom(req.RoomID)
	s.queries.NoteAliasCreated(alias)
	return empty, nil
}

// deleteAlias removes an alias: only its creator, a user who may change
// the room's canonical alias, or the AS whose namespace holds it.
func (s *Server) deleteAlias(r *request) (any, error) {
	alias, err := s.aliasParam(r)
	if err != nil {
		return nil, err
	}
	set := s.cfg.Registry.Current()
	for _, owner := range set.ExclusiveAliasOwners(nil, alias) {
		if r.c.as == nil || owner != r.c.as {
			return nil, errExclusive.With("this alias is reserved by an application service")
		}
	}
	ctx := r.Context()
	s.mu.Lock()
	defer s.mu.Unlock()
	var roomID, creator string
	ok, err := one(ctx, s.st.db, `SELECT room_id, creator FROM aliases WHERE alias = ?`, []any{alias}, &roomID, &creator)
	if err != nil {
		return nil, err
	}
	if !ok {
		return nil, errNotFound.With("room alias not found")
	}
	allowed := creator == r.c.userID || (r.c.as != nil && set.CheckAlias(r.c.as, alias) == nil)
	if !allowed {
		pl, err := s.powerLevels(ctx, s.st.db, roomID)
		if err != nil {
			return nil, err
		}
		m, err := s.membership(ctx, s.st.db, roomID, r.c.userID)
		if err != nil {
			return nil, err
		}
		allowed = m == "join" && pl.user(r.c.userID) >= pl.event("m.room.canonical_alias", true)
	}
	if !allowed {
		return nil, errForbidden.With("you may not delete this alias")
	}
	if _, err := s.st.db.ExecContext(ctx, `DELETE FROM aliases WHERE alias = ?`, alias); err != nil {
		return nil, err
	}
	s.disp.InvalidateRoom(roomID)
	return empty, nil
}

func (s *Server) getVisibility(r *request) (any, error) {
	roomID, err := r.roomParam()
	if err != nil {
		return nil, err
	}
	var vis string
	ok, err := s.st.one(r.Context(), &vis, `SELECT visibility FROM rooms WHERE room_id = ?`, roomID)
	if err != nil {
		return nil, err
	}
	if !ok {
		return nil, errNotFound.With("no such room")
	}
	return map[string]string{"visibility": vis}, nil
}

func (s *Server) putVisibility(r *request, req *struct {
	Visibility string `json:"visibility"`
}) (any, error) {
	if req.Visibility != "public" && req.Visibility != "private" {
		return nil, errInvalidParam.With("visibility must be public or private")
	}
	roomID, err := s.joinedRoom(r)
	if err != nil {
		return nil, err
	}
	ctx := r.Context()
	s.mu.Lock()
	defer s.mu.Unlock()
	pl, err := s.powerLevels(ctx, s.st.db, roomID)
	if err != nil {
		return nil, err
	}
	if pl.user(r.c.userID) < pl.event("m.room.canonical_alias", true) {
		return nil, errForbidden.With("you may not change the room's visibility")
	}
	_, err = s.st.db.ExecContext(ctx, `UPDATE rooms SET visibility = ? WHERE room_id = ?`, req.Visibility, roomID)
	return empty, err
}

func (s *Server) appserviceRoutes() []route {
	return []route{
		{"POST", v1 + "/appservice/{id}/ping", user, typed(s.ping)},
	}
}

func (s *Server) ping(r *request, req *struct {
	TransactionID string `json:"transaction_id"`
}) (any, error) {
	id := r.PathValue("id")
	if r.c.as == nil || r.c.as.ID != id {
		return nil, errForbidden.With("only the application service %s may ping itself", id)
	}
	d, err := s.queries.Ping(r.Context(), id, req.TransactionID)
	if err != nil {
		return nil, err
	}
	return map[string]any{"duration_ms": d.Milliseconds()}, nil
}

// AdminHandler serves the operator's endpoints (GET
// /_asdispatch/v1/appservices). They are not part of the client API:
// serve them on a loopback listener, behind a token (cmd/asdispatch).
func (s *Server) AdminHandler() http.Handler {
	m := http.NewServeMux()
	m.HandleFunc("GET /_asdispatch/v1/appservices", func(w http.ResponseWriter, r *http.Request) {
		v, err := s.appservices(r)
		if err != nil {
			writeError(w, r, s.log, err)
			return
		}
		writeJSON(w, http.StatusOK, v)
	})
	m.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		writeError(w, r, s.log, errUnrecognized.With("unrecognized request"))
	})
	return m
}

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
