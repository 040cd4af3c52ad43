package homeserver

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/asdispatch/asdispatch/queue"
	"github.com/asdispatch/asdispatch/registry"
)

const bridgeReg = `id: bridge
url: %s
as_token: as-bridge
hs_token: hs-bridge
sender_localpart: bridgebot
namespaces:
  users: [{exclusive: true, regex: "@br_.*"}]
  aliases: [{exclusive: true, regex: "#br_.*"}]
`

type env struct {
	t   *testing.T
	hs  *httptest.Server
	srv *Server
	dir string
	as  *httptest.Server
	// answers, if set, gets the body of every answer do receives.
	answers io.Writer
}

func start(t *testing.T, dir string, asHandler http.Handler) *env {
	return startWith(t, dir, asHandler, bridgeReg, Config{})
}

// startWith starts the stub with a registration (a format with one %s, the
// AS's URL) and extra config (Keys).
func startWith(t *testing.T, dir string, asHandler http.Handler, reg string, extra Config) *env {
	e := &env{t: t, dir: dir}
	e.as = httptest.NewServer(asHandler)
	t.Cleanup(e.as.Close)
	r, _, err := registry.Parse("bridge.yaml", []byte(fmt.Sprintf(reg, e.as.URL)))
	if err != nil {
		t.Fatal(err)
	}
	set, _, err := registry.NewSet("hs", []*registry.Registration{r})
	if err != nil {
		t.Fatal(err)
	}
	e.srv, err = New(context.Background(), Config{ServerName: "hs", DataDir: dir, Registry: registry.NewRegistry(set),
		Queue:    queue.Options{RetryInitial: 10 * time.Millisecond, RetryMax: 50 * time.Millisecond},
		Password: cheapPasswords, Keys: extra.Keys, Logger: extra.Logger})
	if err != nil {
		t.Fatal(err)
	}
	e.hs = httptest.NewServer(e.srv)
	t.Cleanup(e.stop)
	return e
}

func (e *env) stop() {
	if e.hs == nil {
		return
	}
	e.hs.Close()
	e.srv.Close(context.Background())
	e.hs = nil
}

func (e *env) do(method, path, token string, body any) (int, map[string]any) {
	e.t.Helper()
	var rd io.Reader
	if body != nil {
		js, _ := json.Marshal(body)
		rd = bytes.NewReader(js)
	}
	req, _ := http.NewRequest(method, e.hs.URL+path, rd)
	if token != "" {
		req.Header.Set("Authorization", "Bearer "+token)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		e.t.Fatal(err)
	}
	defer resp.Body.Close()
	raw, _ := io.ReadAll(resp.Body)
	if e.answers != nil {
		e.answers.Write(raw)
	}
	var out map[string]any
	json.Unmarshal(raw, &out)
	return resp.StatusCode, out
}

func TestClientAPIErrors(t *testing.T) {
	e := start(t, t.TempDir(), http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { w.WriteHeader(404) }))
	_, alice := e.do("POST", "/_matrix/client/v3/register", "", map[string]any{"username": "alice", "password": "pw"})
	tok, _ := alice["access_token"].(string)
	if tok == "" {
		t.Fatalf("register: %v", alice)
	}
	tests := []struct {
		name, method, path, token string
		body                      any
		status                    int
		errcode                   string
	}{
		{"versions", "GET", "/_matrix/client/versions", "", nil, 200, ""},
		{"user in exclusive namespace", "POST", "/_matrix/client/v3/register", "", map[string]any{"username": "br_x", "password": "pw"}, 400, "M_EXCLUSIVE"},
		{"user on another server", "POST", "/_matrix/client/v3/register", "", map[string]any{"username": "@mallory:elsewhere", "password": "pw"}, 400, "M_INVALID_USERNAME"},
		{"user with capitals", "POST", "/_matrix/client/v3/register", "", map[string]any{"username": "Mallory", "password": "pw"}, 400, "M_INVALID_USERNAME"},
		{"user ID over 255 bytes", "POST", "/_matrix/client/v3/register", "", map[string]any{"username": strings.Repeat("m", 260), "password": "pw"}, 400, "M_INVALID_USERNAME"},
		{"user in use", "POST", "/_matrix/client/v3/register", "", map[string]any{"username": "alice", "password": "pw"}, 400, "M_USER_IN_USE"},
		{"AS registers own ghost", "POST", "/_matrix/client/v3/register", "as-bridge", map[string]any{"username": "br_ghost", "type": "m.login.application_service"}, 200, ""},
		{"AS registers outside", "POST", "/_matrix/client/v3/register", "as-bridge", map[string]any{"username": "bob", "type": "m.login.application_service"}, 400, "M_EXCLUSIVE"},
		{"whoami", "GET", "/_matrix/client/v3/account/whoami", tok, nil, 200, ""},
		{"unknown token", "GET", "/_matrix/client/v3/account/whoami", "nope", nil, 401, "M_UNKNOWN_TOKEN"},
		{"missing token", "GET", "/_matrix/client/v3/account/whoami", "", nil, 401, "M_MISSING_TOKEN"},
		{"masquerade in namespace", "GET", "/_matrix/client/v3/account/whoami?user_id=" + url.QueryEscape("@br_ghost:hs"), "as-bridge", nil, 200, ""},
		{"masquerade outside", "GET", "/_matrix/client/v3/account/whoami?user_id=" + url.QueryEscape("@alice:hs"), "as-bridge", nil, 403, "M_FORBIDDEN"},
		{"alias in exclusive namespace", "POST", "/_matrix/client/v3/createRoom", tok, map[string]any{"room_alias_name": "br_chan"}, 400, "M_EXCLUSIVE"},
		{"unknown alias", "POST", "/_matrix/client/v3/join/" + url.PathEscape("#nothing:hs"), tok, nil, 404, "M_NOT_FOUND"},
		{"ping by another token", "POST", "/_matrix/client/v1/appservice/bridge/ping", tok, map[string]any{}, 403, "M_FORBIDDEN"},
		{"ping answered 404", "POST", "/_matrix/client/v1/appservice/bridge/ping", "as-bridge", map[string]any{"transaction_id": "t"}, 502, "M_BAD_STATUS"},
		{"unknown endpoint", "GET", "/_matrix/client/v3/nope", tok, nil, 404, "M_UNRECOGNIZED"},
		{"profile of a known user", "GET", "/_matrix/client/v3/profile/" + url.PathEscape("@alice:hs"), "", nil, 200, ""},
		{"profile the AS does not know", "GET", "/_matrix/client/v3/profile/" + url.PathEscape("@br_nobody:hs"), "", nil, 404, "M_NOT_FOUND"},
		{"invite of a user the AS does not know", "POST", "/_matrix/client/v3/rooms/" + url.PathEscape("!r:hs") + "/invite", tok, map[string]any{"user_id": "@br_nobody:hs"}, 404, "M_NOT_FOUND"},
		{"send outside a room", "PUT", "/_matrix/client/v3/rooms/" + url.PathEscape("!r:hs") + "/send/m.room.message/x", tok, map[string]any{"body": "x"}, 403, "M_FORBIDDEN"},
		{"typing for someone else", "PUT", "/_matrix/client/v3/rooms/" + url.PathEscape("!r:hs") + "/typing/" + url.PathEscape("@bob:hs"), tok, map[string]any{"typing": true}, 403, "M_FORBIDDEN"},
		{"not an object", "POST", "/_matrix/client/v3/createRoom", tok, "not an object", 400, "M_BAD_JSON"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			status, out := e.do(tt.method, tt.path, tt.token, tt.body)
			if status != tt.status || (tt.errcode != "" && out["errcode"] != tt.errcode) {
				t.Errorf("%s %s = %d %v, want %d %s", tt.method, tt.path, status, out, tt.status, tt.errcode)
			}
		})
	}
}

func TestRoomsPersistAndSendIsIdempotent(t *testing.T) {
	dir := t.TempDir()
	got := make(chan string, 100)
	as := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		var txn struct {
			Events []struct {
				Type string `json:"type"`
			} `json:"events"`
		}
		json.NewDecoder(r.Body).Decode(&txn)
		for _, ev := range txn.Events {
			got <- ev.Type
		}
		w.Write([]byte("{}"))
	})
	e := start(t, dir, as)
	_, alice := e.do("POST", "/_matrix/client/v3/register", "", map[string]any{"username": "alice", "password": "pw"})
	tok := alice["access_token"].(string)
	// The bridge creates a room with an alias in its namespace as its ghost.
	e.do("POST", "/_matrix/client/v3/register", "as-bridge", map[string]any{"username": "br_ghost", "type": "m.login.application_service"})
	status, room := e.do("POST", "/_matrix/client/v3/createRoom?user_id="+url.QueryEscape("@br_ghost:hs"), "as-bridge", map[string]any{"room_alias_name": "br_chan#x", "preset": "public_chat"})
	if status != 200 {
		t.Fatalf("createRoom: %d %v", status, room)
	}
	roomID := room["room_id"].(string)
	path := "/_matrix/client/v3/join/" + url.PathEscape("#br_chan#x:hs")
	if status, out := e.do("POST", path, tok, nil); status != 200 || out["room_id"] != roomID {
		t.Fatalf("join by escaped alias: %d %v", status, out)
	}
	send := "/_matrix/client/v3/rooms/" + url.PathEscape(roomID) + "/send/m.room.message/t1"
	_, first := e.do("PUT", send, tok, map[string]any{"body": "hi"})
	_, again := e.do("PUT", send, tok, map[string]any{"body": "hi"})
	if first["event_id"] == nil || first["event_id"] != again["event_id"] {
		t.Errorf("send not idempotent: %v then %v", first, again)
	}
	messages := 0
	deadline := time.After(10 * time.Second)
	for messages < 1 {
		select {
		case typ := <-got:
			if typ == "m.room.message" {
				messages++
			}
		case <-deadline:
			t.Fatal("the bridge never got the message")
		}
	}
	// State, receipts, directory and leave.
	state := "/_matrix/client/v3/rooms/" + url.PathEscape(roomID) + "/state/m.room.topic/"
	if status, out := e.do("PUT", state, tok, map[string]any{"topic": "t"}); status != 403 {
		t.Errorf("state by a member without the power level: %d %v", status, out)
	}
	if status, out := e.do("PUT", state+"?user_id="+url.QueryEscape("@br_ghost:hs"), "as-bridge", map[string]any{"topic": "t"}); status != 200 || out["event_id"] == nil {
		t.Errorf("state by the room's creator: %d %v", status, out)
	}
	if status, out := e.do("POST", "/_matrix/client/v3/rooms/"+url.PathEscape(roomID)+"/receipt/m.read/"+url.PathEscape(first["event_id"].(string)), tok, map[string]any{}); status != 200 {
		t.Errorf("receipt: %d %v", status, out)
	}
	dirPath := "/_matrix/client/v3/directory/room/" + url.PathEscape("#lobby:hs")
	if status, out := e.do("PUT", dirPath, tok, map[string]any{"room_id": roomID}); status != 200 {
		t.Errorf("directory put: %d %v", status, out)
	}
	if status, out := e.do("GET", dirPath, "", nil); status != 200 || out["room_id"] != roomID {
		t.Errorf("directory get: %d %v", status, out)
	}
	if status, out := e.do("PUT", "/_matrix/client/v3/directory/room/"+url.PathEscape("#br_taken:hs"), tok, map[string]any{"room_id": roomID}); status != 400 || out["errcode"] != "M_EXCLUSIVE" {
		t.Errorf("directory put in an exclusive namespace: %d %v", status, out)
	}
	if status, _ := e.do("DELETE", dirPath, tok, nil); status != 200 {
		t.Errorf("directory delete: %d", status)
	}
	if status, _ := e.do("GET", dirPath, "", nil); status != 404 {
		t.Errorf("alias still resolves after delete: %d", status)
	}
	if status, out := e.do("POST", "/_matrix/client/v3/rooms/"+url.PathEscape(roomID)+"/leave", tok, nil); status != 200 {
		t.Errorf("leave: %d %v", status, out)
	}
	e.stop()

	// Restart on the same data dir: users, tokens, rooms and aliases remain.
	e2 := start(t, dir, as)
	if status, out := e2.do("GET", "/_matrix/client/v3/directory/room/"+url.PathEscape("#br_chan#x:hs"), "", nil); status != 200 || out["room_id"] != roomID {
		t.Errorf("alias after restart: %d %v", status, out)
	}
	if status, out := e2.do("POST", "/_matrix/client/v3/rooms/"+url.PathEscape(roomID)+"/join", tok, nil); status != 200 {
		t.Errorf("rejoin after restart (the token must survive): %d %v", status, out)
	}
	if status, out := e2.do("PUT", "/_matrix/client/v3/rooms/"+url.PathEscape(roomID)+"/send/m.room.message/t2", tok, map[string]any{"body": "after"}); status != 200 {
		t.Errorf("send after restart: %d %v", status, out)
	}
	_, again2 := e2.do("PUT", send, tok, map[string]any{"body": "hi"})
	if again2["event_id"] != first["event_id"] {
		t.Errorf("txn id forgotten across restart: %v", again2)
	}
}

// cheapPasswords keeps argon2id fast under -race; hashes carry their
// parameters, so the code path is the production one.
var cheapPasswords = PasswordParams{Time: 1, MemoryKiB: 64, Threads: 1}
