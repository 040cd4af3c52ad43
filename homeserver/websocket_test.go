package homeserver

import (
	"context"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/coder/websocket"

	"github.com/asdispatch/asdispatch/asws"
)

// An AS with a URL gets its transactions over its websocket while one is
// open, and over HTTP again once it closes; the admin status says which.
func TestWebsocketTransport(t *testing.T) {
	var mu sync.Mutex
	var overHTTP []string
	e := startWith(t, t.TempDir(), http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if strings.Contains(r.URL.Path, "/transactions/") {
			mu.Lock()
			overHTTP = append(overHTTP, r.URL.Path)
			mu.Unlock()
		}
		w.Write([]byte(`{}`))
	}), bridgeReg, Config{Websocket: true})
	admin := httptest.NewServer(e.srv.AdminHandler())
	t.Cleanup(admin.Close)
	transport := func() string {
		resp, err := http.Get(admin.URL + "/_asdispatch/v1/appservices")
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		var out struct{ Appservices []map[string]any }
		json.NewDecoder(resp.Body).Decode(&out)
		if len(out.Appservices) == 0 {
			return ""
		}
		s, _ := out.Appservices[0]["transport"].(string)
		return s
	}

	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	ws, _, err := websocket.Dial(ctx, "ws"+strings.TrimPrefix(e.hs.URL, "http")+asws.Path, &websocket.DialOptions{
		HTTPHeader: http.Header{"Authorization": {"Bearer as-bridge"}, "X-Mautrix-Websocket-Version": {"3"}}})
	if err != nil {
		t.Fatal(err)
	}
	defer ws.CloseNow()
	read := func() map[string]any {
		t.Helper()
		_, data, err := ws.Read(ctx)
		if err != nil {
			t.Fatal(err)
		}
		var m map[string]any
		json.Unmarshal(data, &m)
		return m
	}
	if f := read(); f["command"] != "connect" {
		t.Fatalf("first frame %v", f)
	}
	if got := transport(); got != "websocket" {
		t.Fatalf("transport %q while connected", got)
	}
	if st, _ := e.do("POST", "/_matrix/client/v3/createRoom", "as-bridge", map[string]any{}); st != 200 {
		t.Fatalf("createRoom: %d", st)
	}
	f := read()
	if f["command"] != "transaction" || f["events"] == nil {
		t.Fatalf("frame %v", f)
	}
	ack, _ := json.Marshal(map[string]any{"id": f["id"], "command": "response", "data": map[string]any{"txn_id": f["txn_id"]}})
	if err := ws.Write(ctx, websocket.MessageText, ack); err != nil {
		t.Fatal(err)
	}
	ws.Close(websocket.StatusNormalClosure, "")
	for e.srv.hub.Conn("bridge") != nil {
		time.Sleep(10 * time.Millisecond)
	}
	if got := transport(); got != "http" {
		t.Fatalf("transport %q after the socket closed", got)
	}
	if st, _ := e.do("POST", "/_matrix/client/v3/createRoom", "as-bridge", map[string]any{}); st != 200 {
		t.Fatalf("createRoom: %d", st)
	}
	for {
		mu.Lock()
		n := len(overHTTP)
		mu.Unlock()
		if n > 0 {
			break
		}
		if ctx.Err() != nil {
			t.Fatal("no transaction over HTTP after the socket closed")
		}
		time.Sleep(10 * time.Millisecond)
	}
	mu.Lock()
	defer mu.Unlock()
	if strings.HasSuffix(overHTTP[0], "/"+f["txn_id"].(string)) {
		t.Fatalf("the acknowledged transaction %v was sent again over HTTP", f["txn_id"])
	}
}

// Without Config.Websocket the endpoint does not exist.
func TestWebsocketDisabled(t *testing.T) {
	e := start(t, t.TempDir(), http.NotFoundHandler())
	st, out := e.do("GET", asws.Path, "as-bridge", nil)
	if st != 404 || out["errcode"] != "M_UNRECOGNIZED" {
		t.Fatalf("got %d %v", st, out)
	}
}
