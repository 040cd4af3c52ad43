package asws

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"strconv"
	"sync"
	"time"

	"github.com/coder/websocket"
	"go.uber.org/zap"

	"github.com/asdispatch/asdispatch/asapi"
	"github.com/asdispatch/asdispatch/secret"
)

// frame is one JSON message either way. Transactions are written spliced
// from their frozen body (txnFrame), never through this type.
type frame struct {
	ID      int64           `json:"id,omitempty"`
	Command string          `json:"command"`
	Status  string          `json:"status,omitempty"`
	Data    json.RawMessage `json:"data,omitempty"`
}

// Conn is one AS's open socket. Requests on it are safe for concurrent
// use; transactions go one at a time, each after the previous one's ack.
type Conn struct {
	h       *Hub
	as      string
	process string
	token   secret.Token // the as_token it authenticated with (Revalidate)
	since   time.Time
	ws      *websocket.Conn

	// txn holds the one transaction in flight; misses (guarded by it)
	// counts transactions in a row that got no ack in time.
	txn    chan struct{}
	misses int

	mu      sync.Mutex
	nextID  int64
	waiters map[int64]chan frame

	done     chan struct{} // closed once the socket is unusable
	doneOnce sync.Once
}

func newConn(h *Hub, as, process string, ws *websocket.Conn) *Conn {
	return &Conn{h: h, as: as, process: process, since: time.Now(), ws: ws,
		txn: make(chan struct{}, 1), waiters: map[int64]chan frame{}, done: make(chan struct{})}
}

// Since is when the socket was accepted.
func (c *Conn) Since() time.Time { return c.since }

// fail makes every waiting and later request fail with ErrClosed.
func (c *Conn) fail() {
	c.doneOnce.Do(func() { close(c.done) })
}

// close closes the socket with code and a disconnect status the bridge
// reads. Requests waiting on it fail at once.
func (c *Conn) close(code websocket.StatusCode, status string) {
	c.h.detach(c)
	c.fail()
	if err := c.ws.Close(code, disconnect(status)); err != nil {
		c.ws.CloseNow()
	}
}

// run reads the socket until it closes. It runs on the handler's goroutine.
func (c *Conn) run() {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	log := c.h.log.With(zap.String("appservice", c.as))
	defer func() {
		c.h.detach(c)
		c.fail()
		c.ws.CloseNow()
	}()
	if err := c.write(ctx, []byte(`{"command":"connect","status":"connected"}`)); err != nil {
		log.Info("appservice websocket closed before connect", zap.Error(err))
		return
	}
	if f := c.h.opts.OnConnect; f != nil {
		f(c.as)
	}
	go c.pinger(ctx)
	for {
		typ, data, err := c.ws.Read(ctx)
		if err != nil {
			log.Info("appservice websocket disconnected", zap.Error(err),
				zap.Duration("connected_for", time.Since(c.since)))
			return
		}
		c.h.opts.Metrics.WSFrame(c.as, "in")
		if typ != websocket.MessageText {
			continue
		}
		var f frame
		if err := json.Unmarshal(data, &f); err != nil {
			log.Info("appservice websocket sent a frame that is not JSON; ignored", zap.Error(err))
			continue
		}
		c.handle(ctx, log, f)
	}
}

// handle answers one frame from the bridge.
func (c *Conn) handle(ctx context.Context, log *zap.Logger, f frame) {
	switch f.Command {
	case "response", "error":
		c.mu.Lock()
		ch := c.waiters[f.ID]
		c.mu.Unlock()
		if ch == nil {
			log.Debug("appservice websocket answered an unknown or abandoned request", zap.Int64("req_id", f.ID))
			return
		}
		select {
		case ch <- f:
		default:
		}
	case "ping":
		ts, _ := json.Marshal(map[string]int64{"timestamp": time.Now().UnixMilli()})
		c.reply(ctx, log, frame{ID: f.ID, Command: "response", Data: ts})
	case "bridge_status":
		c.h.bridgeStatus(c.as, f.Data)
		c.reply(ctx, log, frame{ID: f.ID, Command: "response", Data: json.RawMessage(`{}`)})
	case "message_checkpoint":
		c.reply(ctx, log, frame{ID: f.ID, Command: "response", Data: json.RawMessage(`{}`)})
	default:
		log.Debug("appservice websocket sent an unknown command", zap.String("command", f.Command))
		c.reply(ctx, log, frame{ID: f.ID, Command: "error",
			Data: json.RawMessage(`{"code":"M_UNRECOGNIZED","message":"unknown command"}`)})
	}
}

// reply answers a request of the bridge; one without an id gets none.
func (c *Conn) reply(ctx context.Context, log *zap.Logger, f frame) {
	if f.ID == 0 {
		return
	}
	b, _ := json.Marshal(f)
	go func() {
		ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		defer cancel()
		if err := c.write(ctx, b); err != nil {
			log.Debug("answering the appservice websocket failed", zap.Error(err))
		}
	}()
}

// pinger pings at the websocket level, so a peer that vanished without a
// close is found and its socket let go.
func (c *Conn) pinger(ctx context.Context) {
	t := time.NewTicker(c.h.opts.PingInterval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-c.done:
			return
		case <-t.C:
		}
		pctx, cancel := context.WithTimeout(ctx, c.h.opts.PingInterval)
		err := c.ws.Ping(pctx)
		cancel()
		if err != nil && ctx.Err() == nil {
			c.h.log.Info("appservice websocket did not answer a ping; closing it", zap.String("appservice", c.as), zap.Error(err))
			c.close(websocket.StatusGoingAway, "ping_timeout")
			return
		}
	}
}

func (c *Conn) write(ctx context.Context, b []byte) error {
	select {
	case <-c.done:
		return ErrClosed
	default:
	}
	if err := c.ws.Write(ctx, websocket.MessageText, b); err != nil {
		c.fail()
		return fmt.Errorf("%w: %w", ErrClosed, err)
	}
	c.h.opts.Metrics.WSFrame(c.as, "out")
	return nil
}

// register returns a fresh request id and the channel its answer comes on.
func (c *Conn) register() (int64, chan frame) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.nextID++
	ch := make(chan frame, 1)
	c.waiters[c.nextID] = ch
	return c.nextID, ch
}

func (c *Conn) unregister(id int64) {
	c.mu.Lock()
	delete(c.waiters, id)
	c.mu.Unlock()
}

// txnFrame splices a frozen transaction body into a transaction frame: the
// body's fields are sent byte for byte, after id, command, status and
// txn_id.
func txnFrame(id int64, txnID string, body []byte) ([]byte, error) {
	b := bytes.TrimSpace(body)
	if len(b) < 2 || b[0] != '{' || b[len(b)-1] != '}' {
		return nil, errors.New("transaction body is not a JSON object")
	}
	q, _ := json.Marshal(txnID)
	out := make([]byte, 0, len(b)+64+len(q))
	out = append(out, `{"id":`...)
	out = strconv.AppendInt(out, id, 10)
	out = append(out, `,"command":"transaction","status":"ok","txn_id":`...)
	out = append(out, q...)
	rest := bytes.TrimSpace(b[1:])
	if rest[0] != '}' {
		out = append(out, ',')
	}
	return append(out, rest...), nil
}

// Transaction implements asapi.Socket: it sends one transaction frame and
// waits for the bridge's response naming the same txn id. Without one
// before ctx ends, the attempt fails with asapi.ErrTimeout, and after
// MaxMisses such attempts in a row the socket is closed with 4002.
func (c *Conn) Transaction(ctx context.Context, txnID string, body []byte) error {
	select {
	case c.txn <- struct{}{}:
	case <-ctx.Done():
		return ctx.Err()
	case <-c.done:
		return ErrClosed
	}
	defer func() { <-c.txn }()
	id, ch := c.register()
	defer c.unregister(id)
	b, err := txnFrame(id, txnID, body)
	if err != nil {
		return err
	}
	if err := c.write(ctx, b); err != nil {
		return err
	}
	select {
	case f := <-ch:
		if f.Command == "error" {
			return fmt.Errorf("appservice websocket refused transaction %s: %s", txnID, errorText(f.Data))
		}
		var ack struct {
			TxnID string `json:"txn_id"`
		}
		if json.Unmarshal(f.Data, &ack) != nil || ack.TxnID != txnID {
			return fmt.Errorf("appservice websocket acknowledged transaction %s with a response for %q", txnID, ack.TxnID)
		}
		c.misses = 0
		c.h.opts.Metrics.WSAck(c.as)
		return nil
	case <-c.done:
		return ErrClosed
	case <-ctx.Done():
		if !errors.Is(ctx.Err(), context.DeadlineExceeded) {
			return ctx.Err()
		}
		c.misses++
		if c.misses >= c.h.opts.MaxMisses {
			c.h.log.Warn("appservice websocket acknowledged no transaction in a row; closing it",
				zap.String("appservice", c.as), zap.Int("misses", c.misses))
			go c.close(CloseNotAcknowledged, "transactions_not_acknowledged")
		}
		return fmt.Errorf("%w: transaction %s not acknowledged", asapi.ErrTimeout, txnID)
	}
}

// proxyRequest and proxyResponse are mautrix-go's http_proxy command.
type proxyRequest struct {
	Method      string          `json:"method"`
	Path        string          `json:"path"`
	Query       string          `json:"query"`
	Headers     http.Header     `json:"headers"`
	Body        json.RawMessage `json:"body,omitempty"`
	EscapedPath bool            `json:"escaped_path,omitempty"`
}

type proxyResponse struct {
	Status  int             `json:"status"`
	Headers http.Header     `json:"headers"`
	Body    json.RawMessage `json:"body"`
}

// Request implements asapi.Socket with an http_proxy command, answered by
// the bridge's own router. path is escaped, as on the wire.
func (c *Conn) Request(ctx context.Context, method, path string, query url.Values, header http.Header, body []byte) (int, http.Header, []byte, error) {
	if len(body) > 0 && !json.Valid(body) {
		return 0, nil, nil, errors.New("http_proxy carries JSON bodies only")
	}
	data, err := json.Marshal(proxyRequest{Method: method, Path: path, Query: query.Encode(), Headers: header, Body: body, EscapedPath: true})
	if err != nil {
		return 0, nil, nil, err
	}
	id, ch := c.register()
	defer c.unregister(id)
	b, _ := json.Marshal(frame{ID: id, Command: "http_proxy", Data: data})
	if err := c.write(ctx, b); err != nil {
		return 0, nil, nil, err
	}
	select {
	case f := <-ch:
		if f.Command == "error" {
			return 0, nil, nil, fmt.Errorf("appservice websocket refused http_proxy: %s", errorText(f.Data))
		}
		var resp proxyResponse
		if err := json.Unmarshal(f.Data, &resp); err != nil || resp.Status == 0 {
			return 0, nil, nil, fmt.Errorf("appservice websocket sent a malformed http_proxy answer")
		}
		return resp.Status, resp.Headers, resp.Body, nil
	case <-c.done:
		return 0, nil, nil, ErrClosed
	case <-ctx.Done():
		if errors.Is(ctx.Err(), context.DeadlineExceeded) {
			return 0, nil, nil, fmt.Errorf("%w: http_proxy not answered", asapi.ErrTimeout)
		}
		return 0, nil, nil, ctx.Err()
	}
}

// errorText is the message of a bridge's error answer, short.
func errorText(data json.RawMessage) string {
	var e struct {
		Code    string `json:"code"`
		Message string `json:"message"`
	}
	_ = json.Unmarshal(data, &e)
	return asapi.CleanText(e.Code+": "+e.Message, 200)
}
