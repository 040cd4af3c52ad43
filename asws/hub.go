// Package asws serves the appservice websocket: the bridge dials the
// homeserver (GET /_matrix/client/unstable/fi.mau.as_sync, version 3 of the
// protocol mautrix-go speaks) and receives its transactions, queries and
// pings over that socket, so a bridge with no open port needs no proxy.
//
// A Hub holds at most one socket per AS and implements asapi.Sockets: give
// it to asapi.Options.Sockets and the client routes an AS's requests over
// its socket while one is open. The delivery promises are the client's:
// a transaction counts as delivered only once the bridge acknowledges it;
// no acknowledgement in time is a failed attempt, and the sender retries the
// same txn id with the same body.
package asws

import (
	"encoding/json"
	"fmt"
	"net/http"
	"strings"
	"sync"
	"time"

	"github.com/coder/websocket"
	"go.uber.org/zap"

	"github.com/asdispatch/asdispatch/asapi"
	"github.com/asdispatch/asdispatch/metrics"
	"github.com/asdispatch/asdispatch/secret"
)

// Path is where bridges dial the socket.
const Path = "/_matrix/client/unstable/fi.mau.as_sync"

// Close codes and the disconnect statuses sent with them, as mautrix-go
// reads them.
const (
	CloseReplaced        websocket.StatusCode = 4001
	CloseNotAcknowledged websocket.StatusCode = 4002
	CloseShutdown                             = websocket.StatusServiceRestart // 1012
)

// Options configure a Hub. Zero values take the defaults.
type Options struct {
	// Auth maps an as_token to the id of its AS; false refuses the dial.
	// It must compare in constant time. Required.
	Auth func(token string) (asID string, ok bool)
	// OnConnect, if set, is called with the AS id once its socket is open
	// (dispatcher.Wake: the backlog goes out at once).
	OnConnect func(asID string)
	// MaxMisses is how many transactions in a row may go unacknowledged
	// before the socket is closed with 4002 (default 3).
	MaxMisses int
	// PingInterval is how often the server pings the socket at the
	// websocket level to find dead peers (default 30s).
	PingInterval time.Duration
	// ReadLimit bounds one frame from the bridge (default 16 MiB).
	ReadLimit int64
	Logger    *zap.Logger
	Metrics   *metrics.Metrics
}

// Status is what the hub knows of one AS's socket.
type Status struct {
	// Connected is whether a socket is open, since ConnectedAt.
	Connected   bool
	ConnectedAt time.Time
	// ProcessID is the bridge's X-Mautrix-Process-ID.
	ProcessID string
	// Connections counts the sockets accepted since the process started.
	Connections int
	// BridgeStatus is the last bridge_status the bridge sent (kept after a
	// disconnect), received at BridgeStatusAt.
	BridgeStatus   json.RawMessage
	BridgeStatusAt time.Time
}

// Hub accepts and holds the ASes' sockets. Safe for concurrent use.
type Hub struct {
	opts Options
	log  *zap.Logger

	mu     sync.Mutex
	conns  map[string]*Conn
	info   map[string]*Status
	closed bool
	wg     sync.WaitGroup
}

// New returns a Hub.
func New(opts Options) *Hub {
	if opts.MaxMisses <= 0 {
		opts.MaxMisses = 3
	}
	if opts.PingInterval <= 0 {
		opts.PingInterval = 30 * time.Second
	}
	if opts.ReadLimit <= 0 {
		opts.ReadLimit = 16 << 20
	}
	if opts.Logger == nil {
		opts.Logger = zap.NewNop()
	}
	return &Hub{opts: opts, log: opts.Logger, conns: map[string]*Conn{}, info: map[string]*Status{}}
}

// Socket implements asapi.Sockets.
func (h *Hub) Socket(asID string) asapi.Socket {
	if c := h.Conn(asID); c != nil {
		return c
	}
	return nil
}

// Conn returns the open socket of asID, or nil.
func (h *Hub) Conn(asID string) *Conn {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.conns[asID]
}

// Status returns what the hub knows of asID's socket.
func (h *Hub) Status(asID string) Status {
	h.mu.Lock()
	defer h.mu.Unlock()
	st := Status{}
	if i := h.info[asID]; i != nil {
		st = *i
	}
	if c := h.conns[asID]; c != nil {
		st.Connected, st.ConnectedAt, st.ProcessID = true, c.since, c.process
	}
	return st
}

// Close closes every socket with 1012 (the server restarts; bridges
// reconnect) and refuses new ones. Transactions waiting for an ack fail.
func (h *Hub) Close() {
	h.mu.Lock()
	h.closed = true
	conns := make([]*Conn, 0, len(h.conns))
	for _, c := range h.conns {
		conns = append(conns, c)
	}
	h.mu.Unlock()
	for _, c := range conns {
		go c.close(CloseShutdown, "server_shutting_down")
	}
	h.wg.Wait()
}

// Revalidate closes the sockets whose as_token no longer authenticates
// their AS (the AS was removed or its token changed in a reload), with 1008
// and the status token_revoked; the bridge's redial is then refused.
func (h *Hub) Revalidate() {
	h.mu.Lock()
	var stale []*Conn
	for _, c := range h.conns {
		if id, ok := h.opts.Auth(c.token.Reveal()); !ok || id != c.as {
			stale = append(stale, c)
		}
	}
	h.mu.Unlock()
	for _, c := range stale {
		h.log.Info("closing an appservice websocket whose token no longer holds", zap.String("appservice", c.as))
		go c.close(websocket.StatusPolicyViolation, "token_revoked")
	}
}

// matrixError writes a Matrix JSON error: a refused dial must be one, as
// mautrix-go decodes it to report why.
func matrixError(w http.ResponseWriter, status int, code, msg string) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(map[string]string{"errcode": code, "error": msg})
}

// bearer returns the request's token from the header (or ?access_token=).
func bearer(r *http.Request) string {
	if a := r.Header.Get("Authorization"); a != "" {
		if tok, ok := strings.CutPrefix(a, "Bearer "); ok {
			return tok
		}
		return ""
	}
	return r.URL.Query().Get("access_token")
}

// ServeHTTP accepts a socket: GET Path with the AS's as_token.
func (h *Hub) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	tok := bearer(r)
	if tok == "" {
		matrixError(w, http.StatusUnauthorized, "M_MISSING_TOKEN", "missing access token")
		return
	}
	id, ok := h.opts.Auth(tok)
	if !ok {
		matrixError(w, http.StatusUnauthorized, "M_UNKNOWN_TOKEN", "unknown access token")
		return
	}
	if r.Method != http.MethodGet {
		w.Header().Set("Allow", http.MethodGet)
		matrixError(w, http.StatusMethodNotAllowed, "M_UNRECOGNIZED", r.Method+" is not allowed here")
		return
	}
	if r.Header.Get("X-Mautrix-Websocket-Version") != "3" {
		matrixError(w, http.StatusBadRequest, "M_UNRECOGNIZED", "only version 3 of the appservice websocket is served (X-Mautrix-Websocket-Version: 3)")
		return
	}
	if !strings.EqualFold(r.Header.Get("Upgrade"), "websocket") {
		matrixError(w, http.StatusBadRequest, "M_UNRECOGNIZED", "this endpoint needs a websocket upgrade")
		return
	}
	h.mu.Lock()
	closed := h.closed
	if !closed {
		h.wg.Add(1)
	}
	h.mu.Unlock()
	if closed {
		matrixError(w, http.StatusServiceUnavailable, "M_UNKNOWN", "the server is shutting down")
		return
	}
	defer h.wg.Done()
	ws, err := websocket.Accept(w, r, &websocket.AcceptOptions{CompressionMode: websocket.CompressionDisabled})
	if err != nil {
		h.log.Info("appservice websocket upgrade failed", zap.String("appservice", id), zap.Error(err))
		return
	}
	ws.SetReadLimit(h.opts.ReadLimit)
	c := newConn(h, id, r.Header.Get("X-Mautrix-Process-ID"), ws)
	c.token = secret.New(tok)
	if !h.attach(c) {
		_ = ws.Close(CloseShutdown, disconnect("server_shutting_down"))
		return
	}
	c.run()
}

// attach makes c the socket of its AS, closing the one it replaces.
func (h *Hub) attach(c *Conn) bool {
	h.mu.Lock()
	if h.closed {
		h.mu.Unlock()
		return false
	}
	old := h.conns[c.as]
	h.conns[c.as] = c
	i := h.info[c.as]
	if i == nil {
		i = &Status{}
		h.info[c.as] = i
	}
	i.Connections++
	n := i.Connections
	h.mu.Unlock()
	h.opts.Metrics.WSConnected(c.as, true)
	h.opts.Metrics.WSConnect(c.as)
	if old != nil {
		// The old socket's waiters fail at once; its close handshake may
		// take a while and must not hold up the new one.
		go old.close(CloseReplaced, "conn_replaced")
	}
	h.log.Info("appservice websocket connected", zap.String("appservice", c.as),
		zap.String("process_id", c.process), zap.Int("connections", n), zap.Bool("replaced", old != nil))
	return true
}

// detach forgets c if it is still its AS's socket.
func (h *Hub) detach(c *Conn) {
	h.mu.Lock()
	cur := h.conns[c.as] == c
	if cur {
		delete(h.conns, c.as)
	}
	h.mu.Unlock()
	if cur {
		h.opts.Metrics.WSConnected(c.as, false)
	}
}

func (h *Hub) bridgeStatus(as string, data json.RawMessage) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if i := h.info[as]; i != nil {
		i.BridgeStatus, i.BridgeStatusAt = append(json.RawMessage(nil), data...), time.Now()
	}
}

// disconnect is the close reason mautrix-go parses into its CloseCommand.
func disconnect(status string) string {
	b, _ := json.Marshal(frame{Command: "disconnect", Status: status})
	return string(b)
}

// ErrClosed is the error of a request on a socket that closed before the
// answer came; it wraps asapi.ErrConnection.
var ErrClosed = fmt.Errorf("%w: appservice websocket closed", asapi.ErrConnection)
