// Package homeserver is a small Matrix homeserver on top of the dispatcher:
// the client-server API subset a bridge and its users need, with real HTTP,
// real SQLite state that survives restarts, and every accepted event handed
// to the real dispatcher. It is for bridge developers, the demo and the
// end-to-end tests, not for production.
package homeserver

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"go.uber.org/zap"

	"github.com/asdispatch/asdispatch/asapi"
	"github.com/asdispatch/asdispatch/dispatcher"
	"github.com/asdispatch/asdispatch/metrics"
	"github.com/asdispatch/asdispatch/queries"
	"github.com/asdispatch/asdispatch/queue"
	"github.com/asdispatch/asdispatch/registry"
	"github.com/asdispatch/asdispatch/txnstore"
)

// Config configures a Server.
type Config struct {
	ServerName string
	DataDir    string
	Registry   *registry.Registry
	Queue      queue.Options
	// QueryTimeout bounds user and alias queries to ASes.
	QueryTimeout time.Duration
	Logger       *zap.Logger
	// Metrics, if set, is recorded into (dispatcher, queues, queries).
	Metrics *metrics.Metrics
	// OpenStore, if set, opens the dispatcher's store instead of SQLite in
	// DataDir (dispatcher.Config.OpenStore). The homeserver's own state
	// stays in DataDir: it is per process even when the store is shared.
	OpenStore func(ctx context.Context, opts txnstore.Options) (txnstore.Store, error)
}

// Server is the stub homeserver.
type Server struct {
	cfg     Config
	log     *zap.Logger
	st      *state
	disp    *dispatcher.Dispatcher
	queries *queries.Service
	mu      sync.Mutex // serializes writes to rooms, so events of a room are submitted in order
	mux     *http.ServeMux
}

// New opens the homeserver's state and the dispatcher in cfg.DataDir.
func New(ctx context.Context, cfg Config) (*Server, error) {
	if cfg.Logger == nil {
		cfg.Logger = zap.NewNop()
	}
	if cfg.ServerName == "" {
		cfg.ServerName = "localhost"
	}
	st, err := openState(ctx, filepath.Join(cfg.DataDir, "homeserver.db"))
	if err != nil {
		return nil, err
	}
	if cfg.Queue.Client == nil {
		cfg.Queue.Client = asapi.New(asapi.Options{QueryTimeout: cfg.QueryTimeout, Logger: cfg.Logger})
	}
	s := &Server{cfg: cfg, log: cfg.Logger, st: st}
	s.disp, err = dispatcher.New(ctx, dispatcher.Config{
		Registry: cfg.Registry, DataDir: cfg.DataDir, OpenStore: cfg.OpenStore, RoomState: s, Queue: cfg.Queue, Logger: cfg.Logger, Metrics: cfg.Metrics,
	})
	if err != nil {
		st.db.Close()
		return nil, err
	}
	s.queries = queries.New(queries.Config{Registry: cfg.Registry, Client: cfg.Queue.Client, Wake: s.disp.Wake, Logger: cfg.Logger, Metrics: cfg.Metrics})
	s.routes()
	return s, nil
}

// Dispatcher is the dispatcher the server feeds.
func (s *Server) Dispatcher() *dispatcher.Dispatcher { return s.disp }

// ServeHTTP implements http.Handler.
func (s *Server) ServeHTTP(w http.ResponseWriter, r *http.Request) { s.mux.ServeHTTP(w, r) }

// Close closes the dispatcher (draining sends until ctx ends) and the state.
func (s *Server) Close(ctx context.Context) error {
	err := s.disp.Close(ctx)
	if cerr := s.st.db.Close(); err == nil {
		err = cerr
	}
	return err
}

// JoinedLocalMembers implements dispatcher.RoomState.
func (s *Server) JoinedLocalMembers(ctx context.Context, roomID string) ([]string, error) {
	return s.st.list(ctx, `SELECT user_id FROM memberships WHERE room_id = ? AND membership = 'join' AND user_id LIKE ?`, roomID, "%:"+s.cfg.ServerName)
}

// LocalAliases implements dispatcher.RoomState.
func (s *Server) LocalAliases(ctx context.Context, roomID string) ([]string, error) {
	return s.st.list(ctx, `SELECT alias FROM aliases WHERE room_id = ?`, roomID)
}

// IsLocalUser implements dispatcher.RoomState.
func (s *Server) IsLocalUser(userID string) bool {
	return strings.HasSuffix(userID, ":"+s.cfg.ServerName)
}

func randomID(n int) string {
	b := make([]byte, n)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}

// matrixError is a client-server API error answer.
type matrixError struct {
	status  int
	code    string
	message string
}

func (e *matrixError) Error() string { return e.code + ": " + e.message }

func errorf(status int, code, format string, args ...any) *matrixError {
	return &matrixError{status: status, code: code, message: fmt.Sprintf(format, args...)}
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(v)
}

func writeError(w http.ResponseWriter, err error) {
	var me *matrixError
	var re *registry.Error
	var je *jsonError
	switch {
	case errors.As(err, &je):
		writeJSON(w, je.status, je.body)
	case errors.As(err, &me):
		writeJSON(w, me.status, map[string]string{"errcode": me.code, "error": me.message})
	case errors.As(err, &re):
		writeJSON(w, re.Status, map[string]string{"errcode": re.Code, "error": re.Message})
	default:
		writeJSON(w, http.StatusInternalServerError, map[string]string{"errcode": "M_UNKNOWN", "error": err.Error()})
	}
}

// caller is who a request acts as.
type caller struct {
	userID string
	// token is the hash of the access token: it keys send transaction ids
	// in the database, which must not hold live tokens.
	token string
	as    *registry.AppService // set when authenticated by an as_token
}

// auth resolves the access token (header or ?access_token=); an as_token
// acts as its sender user or, with ?user_id=, as a user of its namespaces.
func (s *Server) auth(r *http.Request) (*caller, error) {
	tok := strings.TrimPrefix(r.Header.Get("Authorization"), "Bearer ")
	if tok == "" {
		tok = r.URL.Query().Get("access_token")
	}
	if tok == "" {
		return nil, errorf(401, "M_MISSING_TOKEN", "missing access token")
	}
	set := s.cfg.Registry.Current()
	if as, err := set.ByASToken(tok); err == nil {
		user := r.URL.Query().Get("user_id")
		if user == "" {
			user = as.SenderUserID
		}
		if err := set.CanMasquerade(as, user); err != nil {
			return nil, err
		}
		return &caller{userID: user, token: tokenHash(tok), as: as}, nil
	}
	var user string
	hash := tokenHash(tok)
	ok, err := s.st.one(r.Context(), &user, `SELECT user_id FROM tokens WHERE token = ?`, hash)
	if err != nil {
		return nil, err
	}
	if !ok {
		return nil, errorf(401, "M_UNKNOWN_TOKEN", "unknown access token")
	}
	return &caller{userID: user, token: hash}, nil
}

// tokenHash is what is stored of an access token: a leaked database does
// not leak live tokens.
func tokenHash(tok string) string {
	h := sha256.Sum256([]byte(tok))
	return hex.EncodeToString(h[:])
}
