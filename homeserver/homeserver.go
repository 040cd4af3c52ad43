// Package homeserver is a small Matrix homeserver on top of the dispatcher:
// the client-server API a bridge, a bot and their test clients need, with
// real HTTP, real SQLite state that survives restarts, authorization as
// the spec and Synapse apply it, and every accepted event handed to the
// real dispatcher. It is for bridge developers, the demo and the end-to-end
// tests, not for production.
package homeserver

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"go.uber.org/zap"

	"github.com/asdispatch/asdispatch/asapi"
	"github.com/asdispatch/asdispatch/asws"
	"github.com/asdispatch/asdispatch/dispatcher"
	"github.com/asdispatch/asdispatch/metrics"
	"github.com/asdispatch/asdispatch/queries"
	"github.com/asdispatch/asdispatch/queue"
	"github.com/asdispatch/asdispatch/registry"
	"github.com/asdispatch/asdispatch/txnstore"
)

// Config configures a Server.
type Config struct {
	// BeforeHandOver, if set, is called before each hand-over of events
	// from the log to the dispatcher; an error fails that attempt, which
	// is retried. A test seam: serve sets it only in a binary built with
	// the asdispatch_faults tag, to kill itself between log and hand-over.
	BeforeHandOver func(ctx context.Context, evs []dispatcher.Event) error

	ServerName string
	DataDir    string
	Registry   *registry.Registry
	Queue      queue.Options
	// QueryTimeout bounds user and alias queries to ASes.
	QueryTimeout time.Duration
	// TxnTimeout bounds one transaction to an AS (default 90 s). On a
	// shared store a sender's lease outlasts it, so after a crash mid-send
	// another process takes over only once the AS must have given up.
	TxnTimeout time.Duration
	Logger     *zap.Logger
	// Metrics, if set, is recorded into (dispatcher, queues, queries).
	Metrics *metrics.Metrics
	// OpenStore, if set, opens the dispatcher's store instead of SQLite in
	// DataDir (dispatcher.Config.OpenStore). The homeserver's own state
	// stays in DataDir: it is per process even when the store is shared.
	OpenStore func(ctx context.Context, opts txnstore.Options) (txnstore.Store, error)
	// MaxUploadBytes bounds an uploaded file (default 50 MiB); above it
	// uploads answer 413 M_TOO_LARGE.
	MaxUploadBytes int64
	// Websocket accepts appservice websockets (GET
	// /_matrix/client/unstable/fi.mau.as_sync, package asws): an AS with
	// one open gets its transactions, queries, pings and third-party
	// lookups over it, and an AS registered with `url: null` gets its
	// events queued and sent while one is open. It needs the client the
	// homeserver builds: Queue.Client must be nil.
	Websocket bool
	// WebsocketPingInterval is how often an open socket is pinged at the
	// websocket level (default 30s).
	WebsocketPingInterval time.Duration
	// Password sets the cost of the argon2id password hash; zero fields
	// take the defaults (PasswordParams).
	Password PasswordParams
	// Keys, if set, is told about device list changes and one-time key
	// counts after they are committed (for MSC3202 transactions).
	Keys KeyObserver
}

// Server is the stub homeserver.
type Server struct {
	cfg     Config
	log     *zap.Logger
	st      *state
	disp    *dispatcher.Dispatcher
	queries *queries.Service
	// mu serializes writes (one writer, like the SQLite file): events of a
	// room are authorized against the state they are committed on, and
	// submitted in order.
	mu sync.Mutex
	// plCache is authorize's power levels per room (authPowerLevels),
	// under mu.
	plCache map[string]powerLevels
	// memberNews are membership changes written but not yet committed
	// (writeEvents), under mu.
	memberNews []membershipChange
	mux        *http.ServeMux
	// hub holds the appservice websockets (nil unless Config.Websocket).
	hub      *asws.Hub
	table    []route
	mediaDir string

	typers typingState
	uia    uiaSessions

	notifyMu sync.Mutex
	notifyCh chan struct{} // closed and replaced on every commit; /sync waits on it

	// lw groups sends into commits to the log; ho hands the events table
	// over to the dispatcher.
	lw *logWriter
	ho *handover
	// Test seams: beforeHandOver, if set, runs before each hand-over (an
	// error fails it, as a dispatcher store that is down would);
	// logFault, if set, runs before each commit to the log (an error fails
	// it, as a full disk would).
	beforeHandOver atomic.Pointer[func(ctx context.Context, evs []dispatcher.Event) error]
	logFault       atomic.Pointer[func() error]
}

// New opens the homeserver's state and the dispatcher in cfg.DataDir and
// registers the sender user of every AS, as Synapse does at startup.
func New(ctx context.Context, cfg Config) (*Server, error) {
	if cfg.Logger == nil {
		cfg.Logger = zap.NewNop()
	}
	if cfg.ServerName == "" {
		cfg.ServerName = "localhost"
	}
	if cfg.MaxUploadBytes <= 0 {
		cfg.MaxUploadBytes = 50 << 20
	}
	cfg.Password = cfg.Password.withDefaults()
	st, err := openState(ctx, filepath.Join(cfg.DataDir, "homeserver.db"))
	if err != nil {
		return nil, err
	}
	s := &Server{cfg: cfg, log: cfg.Logger, st: st, notifyCh: make(chan struct{}), mediaDir: filepath.Join(cfg.DataDir, "media")}
	var sockets asapi.Sockets
	if cfg.Websocket {
		if cfg.Queue.Client != nil {
			st.db.Close()
			return nil, errors.New("homeserver: Websocket needs the client the homeserver builds (Queue.Client set)")
		}
		s.hub = asws.New(asws.Options{
			Auth: func(tok string) (string, bool) {
				as, err := cfg.Registry.Current().ByASToken(tok)
				if err != nil {
					return "", false
				}
				return as.ID, true
			},
			// A socket opened: the AS's backlog goes out at once instead
			// of after its backoff.
			OnConnect:    func(id string) { s.disp.Wake(id) },
			PingInterval: cfg.WebsocketPingInterval,
			Logger:       cfg.Logger, Metrics: cfg.Metrics,
		})
		sockets = s.hub
	}
	if cfg.Queue.Client == nil {
		cfg.Queue.Client = asapi.New(asapi.Options{QueryTimeout: cfg.QueryTimeout, TxnTimeout: cfg.TxnTimeout, Logger: cfg.Logger, Sockets: sockets})
	}
	s.cfg = cfg
	if err := os.MkdirAll(s.mediaDir, 0o700); err != nil {
		st.db.Close()
		return nil, err
	}
	if err := s.registerSenders(ctx, cfg.Registry.Current()); err != nil {
		st.db.Close()
		return nil, err
	}
	s.disp, err = dispatcher.New(ctx, dispatcher.Config{
		Registry: cfg.Registry, DataDir: cfg.DataDir, OpenStore: cfg.OpenStore, RoomState: s, Queue: cfg.Queue, Logger: cfg.Logger, Metrics: cfg.Metrics,
		Websocket: cfg.Websocket,
	})
	if err != nil {
		st.db.Close()
		return nil, err
	}
	s.queries = queries.New(queries.Config{Registry: cfg.Registry, Client: cfg.Queue.Client, Wake: s.disp.Wake, Logger: cfg.Logger, Metrics: cfg.Metrics})
	s.routes()
	if f := cfg.BeforeHandOver; f != nil {
		s.beforeHandOver.Store(&f)
	}
	if err := s.startHandover(ctx); err != nil {
		_ = s.disp.Close(ctx)
		st.db.Close()
		return nil, err
	}
	s.startLogWriter()
	return s, nil
}

// startHandover hands over every event of the log the dispatcher does not
// have yet, before the server takes requests, then keeps handing over.
func (s *Server) startHandover(ctx context.Context) error {
	if err := s.openHandover(ctx); err != nil {
		return err
	}
	return s.replay(ctx)
}

// Reload registers the sender users of set's ASes, then swaps set in.
func (s *Server) Reload(ctx context.Context, set *registry.Set) error {
	if err := s.registerSenders(ctx, set); err != nil {
		return err
	}
	if err := s.disp.Reload(ctx, set); err != nil {
		return err
	}
	if s.hub != nil {
		s.hub.Revalidate()
	}
	return nil
}

// registerSenders registers each AS's sender user, without a password and
// with its localpart as displayname, if it does not exist yet.
func (s *Server) registerSenders(ctx context.Context, set *registry.Set) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, as := range set.All() {
		if _, err := s.st.db.ExecContext(ctx, `INSERT OR IGNORE INTO users (user_id, password, appservice, displayname) VALUES (?, '', ?, ?)`,
			as.SenderUserID, as.ID, localpart(as.SenderUserID)); err != nil {
			return err
		}
	}
	return nil
}

// Dispatcher is the dispatcher the server feeds.
func (s *Server) Dispatcher() *dispatcher.Dispatcher { return s.disp }

// ServeHTTP implements http.Handler: the client-server and media APIs.
// Answers carry the CORS headers the spec asks for, so web clients work;
// a preflight OPTIONS answers 204.
func (s *Server) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	h := w.Header()
	h.Set("Access-Control-Allow-Origin", "*")
	h.Set("Access-Control-Allow-Methods", "GET, HEAD, POST, PUT, DELETE, OPTIONS")
	h.Set("Access-Control-Allow-Headers", "X-Requested-With, Content-Type, Authorization")
	if r.Method == http.MethodOptions {
		w.WriteHeader(http.StatusNoContent)
		return
	}
	s.mux.ServeHTTP(w, r)
}

// Close closes the dispatcher (draining sends until ctx ends), then the
// appservice websockets (1012: bridges reconnect to the next start), and
// the state.
func (s *Server) Close(ctx context.Context) error {
	// What is not handed over yet is at the next start.
	s.stopLogWriter()
	s.stopHandover()
	err := s.disp.Close(ctx)
	if s.hub != nil {
		s.hub.Close()
	}
	s.st.stmts.close()
	if cerr := s.st.db.Close(); err == nil {
		err = cerr
	}
	return err
}

// JoinedLocalMembers implements dispatcher.RoomState: the members as of
// the last event handed over, read from the log, not the current state,
// which may already hold membership changes still waiting to be handed
// over after the events the dispatcher is deciding.
func (s *Server) JoinedLocalMembers(ctx context.Context, roomID string) ([]string, error) {
	return s.st.list(ctx, `SELECT user_id FROM (SELECT state_key AS user_id, json_extract(json, '$.content.membership') AS m,
		ROW_NUMBER() OVER (PARTITION BY state_key ORDER BY seq DESC) AS rn
		FROM events WHERE room_id = ? AND type = 'm.room.member' AND seq <= ?)
		WHERE rn = 1 AND m = 'join' AND user_id LIKE ?`, roomID, s.ho.pos.Load(), "%:"+s.cfg.ServerName)
}

// LocalAliases implements dispatcher.RoomState.
func (s *Server) LocalAliases(ctx context.Context, roomID string) ([]string, error) {
	return s.st.list(ctx, `SELECT alias FROM aliases WHERE room_id = ?`, roomID)
}

// IsLocalUser implements dispatcher.RoomState.
func (s *Server) IsLocalUser(userID string) bool {
	return strings.HasSuffix(userID, ":"+s.cfg.ServerName)
}

// wake tells waiting /sync requests that something was committed.
func (s *Server) wake() {
	s.notifyMu.Lock()
	close(s.notifyCh)
	s.notifyCh = make(chan struct{})
	s.notifyMu.Unlock()
}

// changed returns a channel closed at the next commit.
func (s *Server) changed() <-chan struct{} {
	s.notifyMu.Lock()
	defer s.notifyMu.Unlock()
	return s.notifyCh
}

func randomID(n int) string {
	b := make([]byte, n)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}

// caller is who a request acts as.
type caller struct {
	userID   string
	deviceID string
	// token is the hash of the access token: it keys send transaction ids
	// in the database, which must not hold live tokens.
	token string
	as    *registry.AppService // set when authenticated by an as_token
}

func accessToken(r *http.Request) string {
	if h := r.Header.Get("Authorization"); h != "" {
		tok, ok := strings.CutPrefix(h, "Bearer ")
		if ok {
			return tok
		}
		return ""
	}
	return r.URL.Query().Get("access_token")
}

// auth resolves the access token (header or ?access_token=). An as_token
// acts as its sender user or, with ?user_id=, as a registered user of its
// namespaces: as on Synapse, an unregistered ghost is refused.
func (s *Server) auth(r *http.Request) (*caller, error) {
	tok := accessToken(r)
	if tok == "" {
		return nil, errMissingToken.With("missing access token")
	}
	ctx := r.Context()
	set := s.cfg.Registry.Current()
	if as, err := set.ByASToken(tok); err == nil {
		c := &caller{userID: as.SenderUserID, token: tokenHash(tok), as: as}
		q := r.URL.Query()
		if u := q.Get("user_id"); u != "" && u != as.SenderUserID {
			if err := set.CanMasquerade(as, u); err != nil {
				return nil, err
			}
			ok, err := s.registered(ctx, u)
			if err != nil {
				return nil, err
			}
			if !ok {
				return nil, errForbidden.With("application service %s has not registered %s", as.ID, u)
			}
			c.userID = u
		}
		dev := q.Get("device_id")
		if dev == "" {
			dev = q.Get("org.matrix.msc3202.device_id")
		}
		if dev != "" {
			var x string
			ok, err := s.st.one(ctx, &x, `SELECT device_id FROM devices WHERE user_id = ? AND device_id = ?`, c.userID, dev)
			if err != nil {
				return nil, err
			}
			if !ok {
				return nil, errUnknownDevice.With("%s has no device %s", c.userID, dev)
			}
			c.deviceID = dev
		}
		return c, nil
	}
	hash := tokenHash(tok)
	c := &caller{token: hash}
	ok, err := one(ctx, s.st.db, `SELECT user_id, device_id FROM tokens WHERE token = ?`, []any{hash}, &c.userID, &c.deviceID)
	if err != nil {
		return nil, err
	}
	if !ok {
		return nil, errUnknownToken.With("unknown access token")
	}
	return c, nil
}

// tokenHash is what is stored of an access token: a leaked database does
// not leak live tokens. Tokens are random, so a fast hash suffices.
func tokenHash(tok string) string {
	h := sha256.Sum256([]byte(tok))
	return hex.EncodeToString(h[:])
}
