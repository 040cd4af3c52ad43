package asws

import (
	"context"
	"encoding/json"
	"errors"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/coder/websocket"

	"github.com/asdispatch/asdispatch/asapi"
	"github.com/asdispatch/asdispatch/secret"
)

const (
	asToken = "as-secret-token"
	hsToken = "hs-secret-token"
)

type env struct {
	token  atomic.Value // the as_token Auth accepts
	hub    *Hub
	srv    *httptest.Server
	client *asapi.Client
	target asapi.Target

	mu        sync.Mutex
	connected []string
}

func newEnv(t *testing.T, opts Options) *env {
	t.Helper()
	e := &env{}
	e.token.Store(asToken)
	opts.Auth = func(tok string) (string, bool) {
		if secret.New(e.token.Load().(string)).Equal(tok) {
			return "bridge", true
		}
		return "", false
	}
	opts.OnConnect = func(id string) {
		e.mu.Lock()
		e.connected = append(e.connected, id)
		e.mu.Unlock()
	}
	e.hub = New(opts)
	mux := http.NewServeMux()
	mux.Handle(Path, e.hub)
	e.srv = httptest.NewServer(mux)
	t.Cleanup(func() {
		e.hub.Close()
		e.srv.Close()
	})
	e.client = asapi.New(asapi.Options{Sockets: e.hub, TxnTimeout: 500 * time.Millisecond, QueryTimeout: 2 * time.Second, PingTimeout: 2 * time.Second})
	e.target = asapi.Target{ID: "bridge", URL: asapi.SocketURL, HSToken: secret.New(hsToken), ASToken: secret.New(asToken)}
	return e
}

// bridge is a minimal bridge end: it dials and hands over every frame.
type bridge struct {
	t      *testing.T
	ws     *websocket.Conn
	frames chan map[string]any
	raw    chan []byte
	closed chan error
}

func (e *env) dial(t *testing.T, header http.Header) (*bridge, *http.Response, error) {
	t.Helper()
	if header == nil {
		header = http.Header{"Authorization": {"Bearer " + asToken}, "X-Mautrix-Websocket-Version": {"3"}, "X-Mautrix-Process-ID": {"proc-1"}}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	ws, resp, err := websocket.Dial(ctx, "ws"+strings.TrimPrefix(e.srv.URL, "http")+Path, &websocket.DialOptions{HTTPHeader: header})
	if err != nil {
		return nil, resp, err
	}
	b := &bridge{t: t, ws: ws, frames: make(chan map[string]any, 64), raw: make(chan []byte, 64), closed: make(chan error, 1)}
	go func() {
		for {
			_, data, err := ws.Read(context.Background())
			if err != nil {
				b.closed <- err
				return
			}
			var m map[string]any
			if err := json.Unmarshal(data, &m); err != nil {
				b.closed <- err
				return
			}
			b.raw <- data
			b.frames <- m
		}
	}()
	t.Cleanup(func() { ws.CloseNow() })
	if f := b.next(); f["command"] != "connect" || f["status"] != "connected" {
		t.Fatalf("first frame %v, want connect", f)
	}
	<-b.raw
	return b, resp, nil
}

func (b *bridge) next() map[string]any {
	b.t.Helper()
	// The reader hands over every frame before the close: take frames
	// first, so a close right after the awaited frame does not win.
	select {
	case f := <-b.frames:
		return f
	default:
	}
	select {
	case f := <-b.frames:
		return f
	case err := <-b.closed:
		select {
		case f := <-b.frames:
			b.closed <- err
			return f
		default:
		}
		b.t.Fatalf("socket closed while waiting for a frame: %v", err)
	case <-time.After(5 * time.Second):
		b.t.Fatal("no frame within 5s")
	}
	return nil
}

func (b *bridge) send(v any) {
	b.t.Helper()
	data, _ := json.Marshal(v)
	if err := b.ws.Write(context.Background(), websocket.MessageText, data); err != nil {
		b.t.Fatal(err)
	}
}

// closeError waits for the server to close the socket and returns how.
func (b *bridge) closeError() websocket.CloseError {
	b.t.Helper()
	for {
		select {
		case <-b.frames:
			<-b.raw
		case err := <-b.closed:
			var ce websocket.CloseError
			if !errors.As(err, &ce) {
				b.t.Fatalf("socket ended with %v, want a close frame", err)
			}
			return ce
		case <-time.After(5 * time.Second):
			b.t.Fatal("socket not closed within 5s")
		}
	}
}

func TestRefusedDial(t *testing.T) {
	e := newEnv(t, Options{})
	for _, tc := range []struct {
		name   string
		header http.Header
		status int
		code   string
	}{
		{"no token", http.Header{"X-Mautrix-Websocket-Version": {"3"}}, 401, "M_MISSING_TOKEN"},
		{"wrong token", http.Header{"Authorization": {"Bearer nope"}, "X-Mautrix-Websocket-Version": {"3"}}, 401, "M_UNKNOWN_TOKEN"},
		{"old version", http.Header{"Authorization": {"Bearer " + asToken}, "X-Mautrix-Websocket-Version": {"2"}}, 400, "M_UNRECOGNIZED"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, resp, err := e.dial(t, tc.header)
			if err == nil || resp == nil {
				t.Fatalf("dial succeeded (%v)", err)
			}
			var m struct{ Errcode string }
			if err := json.NewDecoder(resp.Body).Decode(&m); err != nil || resp.StatusCode != tc.status || m.Errcode != tc.code {
				t.Fatalf("got %d %q (%v), want %d %s", resp.StatusCode, m.Errcode, err, tc.status, tc.code)
			}
		})
	}
	// A plain GET is a Matrix error too, not the library's text.
	resp, err := http.Get(e.srv.URL + Path + "?access_token=" + asToken)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != 400 || !strings.HasPrefix(resp.Header.Get("Content-Type"), "application/json") {
		t.Fatalf("plain GET: %d %s", resp.StatusCode, resp.Header.Get("Content-Type"))
	}
	if e.hub.Conn("bridge") != nil {
		t.Fatal("a refused dial left a connection")
	}
}

func TestTransactionAck(t *testing.T) {
	e := newEnv(t, Options{})
	b, _, err := e.dial(t, nil)
	if err != nil {
		t.Fatal(err)
	}
	if st := e.hub.Status("bridge"); !st.Connected || st.ProcessID != "proc-1" || st.Connections != 1 {
		t.Fatalf("status %+v", st)
	}
	// OnConnect runs once the connect frame is out.
	waitFor(t, func() bool {
		e.mu.Lock()
		defer e.mu.Unlock()
		return len(e.connected) == 1 && e.connected[0] == "bridge"
	})
	body := []byte(`{"events":[{"event_id":"$1","type":"m.room.message"}],"ephemeral":[]}`)
	errc := make(chan error, 1)
	go func() { errc <- e.client.PutTransaction(context.Background(), e.target, "17", body) }()
	f := b.next()
	raw := <-b.raw
	if f["command"] != "transaction" || f["status"] != "ok" || f["txn_id"] != "17" || f["id"] == nil {
		t.Fatalf("frame %s", raw)
	}
	if !strings.HasSuffix(string(raw), `"events":[{"event_id":"$1","type":"m.room.message"}],"ephemeral":[]}`) {
		t.Fatalf("body not spliced byte for byte: %s", raw)
	}
	b.send(map[string]any{"id": f["id"], "command": "response", "data": map[string]any{"txn_id": "17"}})
	if err := <-errc; err != nil {
		t.Fatalf("acked transaction failed: %v", err)
	}

	// An ack naming another txn id is no ack.
	go func() { errc <- e.client.PutTransaction(context.Background(), e.target, "18", body) }()
	f = b.next()
	<-b.raw
	b.send(map[string]any{"id": f["id"], "command": "response", "data": map[string]any{"txn_id": "17"}})
	if err := <-errc; err == nil {
		t.Fatal("an ack for another txn id counted")
	}
	// An error answer fails the attempt.
	go func() { errc <- e.client.PutTransaction(context.Background(), e.target, "18", body) }()
	f = b.next()
	<-b.raw
	b.send(map[string]any{"id": f["id"], "command": "error", "data": map[string]any{"code": "FAIL", "message": "nope " + hsToken}})
	if err := <-errc; err == nil {
		t.Fatal("an error answer counted as an ack")
	} else if strings.Contains(err.Error(), hsToken) {
		t.Fatalf("error quotes the hs_token: %v", err)
	}
}

func TestNoAckTimesOutThenCloses4002(t *testing.T) {
	e := newEnv(t, Options{MaxMisses: 2})
	b, _, err := e.dial(t, nil)
	if err != nil {
		t.Fatal(err)
	}
	for i := range 2 {
		err := e.client.PutTransaction(context.Background(), e.target, "5", []byte(`{"events":[]}`))
		if !errors.Is(err, asapi.ErrTimeout) {
			t.Fatalf("attempt %d: %v, want ErrTimeout", i, err)
		}
		if f := b.next(); f["txn_id"] != "5" {
			t.Fatalf("retry %d sent %v", i, f)
		}
		<-b.raw
	}
	ce := b.closeError()
	if ce.Code != CloseNotAcknowledged || !strings.Contains(ce.Reason, "transactions_not_acknowledged") {
		t.Fatalf("closed with %v", ce)
	}
	waitFor(t, func() bool { return e.hub.Conn("bridge") == nil })
	err = e.client.PutTransaction(context.Background(), e.target, "5", []byte(`{"events":[]}`))
	if !errors.Is(err, asapi.ErrNotConnected) || !errors.Is(err, asapi.ErrConnection) {
		t.Fatalf("after close: %v, want ErrNotConnected", err)
	}
}

func TestReplacement(t *testing.T) {
	e := newEnv(t, Options{})
	first, _, err := e.dial(t, nil)
	if err != nil {
		t.Fatal(err)
	}
	errc := make(chan error, 1)
	go func() {
		errc <- e.client.PutTransaction(context.Background(), e.target, "1", []byte(`{"events":[]}`))
	}()
	first.next()
	<-first.raw
	second, _, err := e.dial(t, nil)
	if err != nil {
		t.Fatal(err)
	}
	ce := first.closeError()
	if ce.Code != CloseReplaced || !strings.Contains(ce.Reason, `"conn_replaced"`) || !strings.Contains(ce.Reason, `"disconnect"`) {
		t.Fatalf("old socket closed with %v", ce)
	}
	if err := <-errc; !errors.Is(err, asapi.ErrConnection) {
		t.Fatalf("transaction on the replaced socket: %v, want ErrConnection", err)
	}
	// The retry goes over the new socket, same txn id.
	go func() {
		errc <- e.client.PutTransaction(context.Background(), e.target, "1", []byte(`{"events":[]}`))
	}()
	f := second.next()
	<-second.raw
	second.send(map[string]any{"id": f["id"], "command": "response", "data": map[string]any{"txn_id": f["txn_id"]}})
	if err := <-errc; err != nil || f["txn_id"] != "1" {
		t.Fatalf("retry over the new socket: %v %v", err, f)
	}
	if st := e.hub.Status("bridge"); st.Connections != 2 || !st.Connected {
		t.Fatalf("status %+v", st)
	}
}

func TestShutdownCloses1012(t *testing.T) {
	e := newEnv(t, Options{})
	b, _, err := e.dial(t, nil)
	if err != nil {
		t.Fatal(err)
	}
	e.hub.Close()
	ce := b.closeError()
	if ce.Code != websocket.StatusServiceRestart || !strings.Contains(ce.Reason, "server_shutting_down") {
		t.Fatalf("closed with %v", ce)
	}
	_, resp, err := e.dial(t, nil)
	if err == nil || resp == nil || resp.StatusCode != http.StatusServiceUnavailable {
		t.Fatalf("dial after Close: %v", err)
	}
}

func TestBridgeCommands(t *testing.T) {
	e := newEnv(t, Options{})
	b, _, err := e.dial(t, nil)
	if err != nil {
		t.Fatal(err)
	}
	before := time.Now().UnixMilli()
	b.send(map[string]any{"id": 7, "command": "ping", "data": map[string]any{"timestamp": before}})
	f := b.next()
	<-b.raw
	data, _ := f["data"].(map[string]any)
	ts, _ := data["timestamp"].(float64)
	if f["command"] != "response" || f["id"] != float64(7) || int64(ts) < before {
		t.Fatalf("ping answer %v", f)
	}
	b.send(map[string]any{"command": "bridge_status", "data": map[string]any{"state_event": "CONNECTED"}})
	b.send(map[string]any{"command": "message_checkpoint", "data": map[string]any{"checkpoints": []any{}}})
	b.send(map[string]any{"id": 8, "command": "frobnicate"})
	f = b.next()
	<-b.raw
	if f["command"] != "error" || f["id"] != float64(8) {
		t.Fatalf("unknown command answered %v", f)
	}
	waitFor(t, func() bool { return strings.Contains(string(e.hub.Status("bridge").BridgeStatus), "CONNECTED") })
}

func TestHTTPProxy(t *testing.T) {
	e := newEnv(t, Options{})
	b, _, err := e.dial(t, nil)
	if err != nil {
		t.Fatal(err)
	}
	// The bridge's router: users exist, aliases do not, ping echoes the
	// hs_token in an error (it must come back redacted).
	go func() {
		for {
			var f map[string]any
			select {
			case f = <-b.frames:
				<-b.raw
			case <-b.closed:
				return
			}
			if f["command"] != "http_proxy" {
				continue
			}
			req := f["data"].(map[string]any)
			hdr, _ := req["headers"].(map[string]any)
			auth, _ := hdr["Authorization"].([]any)
			status, body := 404, any(map[string]any{"errcode": "M_NOT_FOUND"})
			switch p := req["path"].(string); {
			case len(auth) != 1 || auth[0] != "Bearer "+hsToken:
				status = 403
			case req["method"] == "GET" && p == "/_matrix/app/v1/users/@irc_bob:hs" && req["escaped_path"] == true:
				status, body = 200, map[string]any{}
			case req["method"] == "POST" && p == "/_matrix/app/v1/ping":
				status, body = 500, map[string]any{"error": "bad token " + hsToken}
			case req["method"] == "GET" && p == "/_matrix/app/v1/thirdparty/protocol/irc":
				status, body = 200, map[string]any{"user_fields": []string{"nick"}}
			}
			b.send(map[string]any{"id": f["id"], "command": "response", "data": map[string]any{"status": status, "headers": map[string]any{}, "body": body}})
		}
	}()
	ctx := context.Background()
	if ok, err := e.client.QueryUser(ctx, e.target, "@irc_bob:hs"); !ok || err != nil {
		t.Fatalf("user query: %v %v", ok, err)
	}
	if ok, err := e.client.QueryAlias(ctx, e.target, "#irc_#nope:hs"); ok || err != nil {
		t.Fatalf("alias query: %v %v", ok, err)
	}
	if data, err := e.client.ThirdParty(ctx, e.target, "protocol/irc", nil); err != nil || !strings.Contains(string(data), "nick") {
		t.Fatalf("third party: %s %v", data, err)
	}
	_, err = e.client.Ping(ctx, e.target, "p1")
	var se *asapi.StatusError
	if !errors.As(err, &se) || se.Status != 500 {
		t.Fatalf("ping: %v", err)
	}
	if strings.Contains(err.Error(), hsToken) || strings.Contains(err.Error(), asToken) {
		t.Fatalf("error quotes a token: %v", err)
	}
}

func TestTxnFrame(t *testing.T) {
	for _, tc := range []struct{ body, want string }{
		{`{"events":[]}`, `{"id":3,"command":"transaction","status":"ok","txn_id":"9","events":[]}`},
		{` {} `, `{"id":3,"command":"transaction","status":"ok","txn_id":"9"}`},
		{"{\n \"events\": [] }", `{"id":3,"command":"transaction","status":"ok","txn_id":"9","events": [] }`},
		{`[]`, ``},
		{``, ``},
	} {
		got, err := txnFrame(3, "9", []byte(tc.body))
		if string(got) != tc.want || (err == nil) != (tc.want != "") {
			t.Errorf("txnFrame(%q) = %s, %v; want %s", tc.body, got, err, tc.want)
		}
		if err == nil && !json.Valid(got) {
			t.Errorf("txnFrame(%q) is not JSON: %s", tc.body, got)
		}
	}
}

func waitFor(t *testing.T, ok func() bool) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !ok() {
		if time.Now().After(deadline) {
			t.Fatal("condition not met within 5s")
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func TestRevalidateClosesRevokedSockets(t *testing.T) {
	e := newEnv(t, Options{})
	b, _, err := e.dial(t, nil)
	if err != nil {
		t.Fatal(err)
	}
	e.hub.Revalidate() // the token still holds: nothing happens
	if e.hub.Conn("bridge") == nil {
		t.Fatal("Revalidate closed a valid socket")
	}
	e.token.Store("rotated")
	e.hub.Revalidate()
	if ce := b.closeError(); ce.Code != websocket.StatusPolicyViolation || !strings.Contains(ce.Reason, "token_revoked") {
		t.Fatalf("closed with %v", ce)
	}
	waitFor(t, func() bool { return e.hub.Conn("bridge") == nil })
}
