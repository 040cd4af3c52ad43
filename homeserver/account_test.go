package homeserver

import (
	"context"
	"database/sql"
	"encoding/json"
	"fmt"
	"net/http"
	"net/url"
	"path/filepath"
	"strings"
	"testing"

	"github.com/asdispatch/asdispatch/registry"
)

// oldSchema is the unversioned stub's schema (main before migrations).
const oldSchema = `
CREATE TABLE IF NOT EXISTS users (user_id TEXT PRIMARY KEY, password TEXT NOT NULL, appservice TEXT NOT NULL DEFAULT '');
CREATE TABLE IF NOT EXISTS tokens (token TEXT PRIMARY KEY, user_id TEXT NOT NULL, device_id TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS rooms (room_id TEXT PRIMARY KEY, creator TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS memberships (room_id TEXT NOT NULL, user_id TEXT NOT NULL, membership TEXT NOT NULL, PRIMARY KEY (room_id, user_id));
CREATE TABLE IF NOT EXISTS aliases (alias TEXT PRIMARY KEY, room_id TEXT NOT NULL, creator TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS events (seq INTEGER PRIMARY KEY AUTOINCREMENT, event_id TEXT NOT NULL UNIQUE, room_id TEXT NOT NULL, json BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS room_state (room_id TEXT NOT NULL, type TEXT NOT NULL, state_key TEXT NOT NULL, event_id TEXT NOT NULL, PRIMARY KEY (room_id, type, state_key));
CREATE TABLE IF NOT EXISTS send_txns (token TEXT NOT NULL, txn_id TEXT NOT NULL, event_id TEXT NOT NULL, PRIMARY KEY (token, txn_id));
`

// TestUpgradeFromUnversionedStub: a data dir written by the stub before
// migrations opens with its users, tokens, rooms, aliases and events; old
// password hashes still verify and are rehashed on login; the AS user's
// empty-password hash no longer logs anyone in.
func TestUpgradeFromUnversionedStub(t *testing.T) {
	dir := t.TempDir()
	db, err := sql.Open("sqlite3", "file:"+filepath.Join(dir, "homeserver.db"))
	if err != nil {
		t.Fatal(err)
	}
	ev := func(id, typ, sender string, key *string, content string) string {
		m := map[string]any{"event_id": id, "room_id": "!old:hs", "type": typ, "sender": sender, "origin_server_ts": 1700000000000, "unsigned": map[string]any{}}
		var c any
		json.Unmarshal([]byte(content), &c)
		m["content"] = c
		if key != nil {
			m["state_key"] = *key
		}
		js, _ := json.Marshal(m)
		return string(js)
	}
	stmts := []struct {
		q    string
		args []any
	}{
		{oldSchema, nil},
		{`INSERT INTO users VALUES ('@alice:hs', ?, ''), ('@br_old:hs', ?, 'bridge')`, []any{tokenHash("alice-pw"), tokenHash("")}},
		{`INSERT INTO tokens VALUES (?, '@alice:hs', 'OLDDEV')`, []any{tokenHash("old-token")}},
		{`INSERT INTO rooms VALUES ('!old:hs', '@alice:hs')`, nil},
		{`INSERT INTO memberships VALUES ('!old:hs', '@alice:hs', 'join')`, nil},
		{`INSERT INTO aliases VALUES ('#old:hs', '!old:hs', '@alice:hs')`, nil},
		{`INSERT INTO events (event_id, room_id, json) VALUES ('$c:hs', '!old:hs', ?), ('$m:hs', '!old:hs', ?), ('$x:hs', '!old:hs', ?)`, []any{
			ev("$c:hs", "m.room.create", "@alice:hs", ptr(""), `{"creator":"@alice:hs"}`),
			ev("$m:hs", "m.room.member", "@alice:hs", ptr("@alice:hs"), `{"membership":"join"}`),
			ev("$x:hs", "m.room.message", "@alice:hs", nil, `{"body":"from before"}`)}},
		{`INSERT INTO room_state VALUES ('!old:hs', 'm.room.create', '', '$c:hs'), ('!old:hs', 'm.room.member', '@alice:hs', '$m:hs')`, nil},
	}
	for _, s := range stmts {
		if _, err := db.Exec(s.q, s.args...); err != nil {
			t.Fatal(err)
		}
	}
	db.Close()

	e := start(t, dir, notFoundAS())
	var version int
	e.srv.st.db.QueryRow(`PRAGMA user_version`).Scan(&version)
	if version != len(migrations) {
		t.Errorf("user_version %d, want %d", version, len(migrations))
	}
	e.run(t, []call{
		{"old token", "GET", "/_matrix/client/v3/account/whoami", "old-token", nil, 200, ""},
		{"old alias", "GET", "/_matrix/client/v3/directory/room/" + url.PathEscape("#old:hs"), "", nil, 200, ""},
		{"old state", "GET", room("!old:hs") + "/state/m.room.create/", "old-token", nil, 200, ""},
		{"old device", "GET", "/_matrix/client/v3/devices/OLDDEV", "old-token", nil, 200, ""},
		{"AS user with the old empty password", "POST", "/_matrix/client/v3/login", "", map[string]any{"type": "m.login.password", "user": "br_old", "password": ""}, 403, "M_FORBIDDEN"},
		{"old password, wrong", "POST", "/_matrix/client/v3/login", "", map[string]any{"type": "m.login.password", "user": "alice", "password": "nope"}, 403, "M_FORBIDDEN"},
		{"old password", "POST", "/_matrix/client/v3/login", "", map[string]any{"type": "m.login.password", "user": "alice", "password": "alice-pw"}, 200, ""},
		{"old password after the rehash", "POST", "/_matrix/client/v3/login", "", map[string]any{"type": "m.login.password", "user": "alice", "password": "alice-pw"}, 200, ""},
	})
	var stored string
	e.srv.st.db.QueryRow(`SELECT password FROM users WHERE user_id = '@alice:hs'`).Scan(&stored)
	if !strings.HasPrefix(stored, "$argon2id$") {
		t.Errorf("old hash not rehashed: %q", stored)
	}
	var msgs struct {
		Chunk []map[string]any `json:"chunk"`
	}
	e.get("GET", room("!old:hs")+"/messages?dir=b", "old-token", nil, &msgs)
	if len(msgs.Chunk) != 3 || msgs.Chunk[0]["content"].(map[string]any)["body"] != "from before" {
		t.Errorf("old events: %v", msgs.Chunk)
	}
	if status, out := e.do("PUT", room("!old:hs")+"/send/m.room.message/new", "old-token", map[string]any{"body": "after"}); status != 200 {
		t.Errorf("send in an old room: %d %v", status, out)
	}
	// Reopening the upgraded dir runs no migration again.
	e.stop()
	e = start(t, dir, notFoundAS())
	e.run(t, []call{{"token after a second open", "GET", "/_matrix/client/v3/account/whoami", "old-token", nil, 200, ""}})
}

func TestPasswordsAndSessions(t *testing.T) {
	e := start(t, t.TempDir(), notFoundAS())
	e.register("alice")
	e.ghost("br_ghost")
	var stored string
	e.srv.st.db.QueryRow(`SELECT password FROM users WHERE user_id = '@alice:hs'`).Scan(&stored)
	if !strings.HasPrefix(stored, "$argon2id$") || strings.Contains(stored, "pw-alice") {
		t.Errorf("stored password %q", stored)
	}
	e.srv.st.db.QueryRow(`SELECT password FROM users WHERE user_id = '@br_ghost:hs'`).Scan(&stored)
	if stored != "" {
		t.Errorf("an AS user has a password hash: %q", stored)
	}
	login := "/_matrix/client/v3/login"
	e.run(t, []call{
		{"AS user with an empty password", "POST", login, "", map[string]any{"type": "m.login.password", "user": "br_ghost", "password": ""}, 403, "M_FORBIDDEN"},
		{"sender user with an empty password", "POST", login, "", map[string]any{"type": "m.login.password", "user": "bridgebot", "password": ""}, 403, "M_FORBIDDEN"},
		{"unknown user", "POST", login, "", map[string]any{"type": "m.login.password", "user": "nobody", "password": "x"}, 403, "M_FORBIDDEN"},
		{"AS login of an unregistered ghost", "POST", login, "as-bridge", map[string]any{"type": "m.login.application_service", "identifier": map[string]any{"type": "m.id.user", "user": "br_nobody"}}, 403, "M_FORBIDDEN"},
		{"AS login outside its namespace", "POST", login, "as-bridge", map[string]any{"type": "m.login.application_service", "identifier": map[string]any{"type": "m.id.user", "user": "alice"}}, 403, "M_FORBIDDEN"},
		{"AS login without a token", "POST", login, "", map[string]any{"type": "m.login.application_service", "identifier": map[string]any{"type": "m.id.user", "user": "br_ghost"}}, 401, "M_UNKNOWN_TOKEN"},
		{"AS login of its ghost", "POST", login, "as-bridge", map[string]any{"type": "m.login.application_service", "identifier": map[string]any{"type": "m.id.user", "user": "br_ghost"}}, 200, ""},
		{"unknown login type", "POST", login, "", map[string]any{"type": "m.login.magic", "user": "alice"}, 400, "M_UNKNOWN"},
		{"AS registration without a username", "POST", "/_matrix/client/v3/register", "as-bridge", map[string]any{"type": "m.login.application_service"}, 400, "M_MISSING_PARAM"},
	})
	// A requested device_id is honoured; logout ends that device only.
	_, a1 := e.do("POST", login, "", map[string]any{"type": "m.login.password", "identifier": map[string]any{"type": "m.id.user", "user": "@alice:hs"}, "password": "pw-alice", "device_id": "PHONE"})
	_, a2 := e.do("POST", login, "", map[string]any{"type": "m.login.password", "user": "alice", "password": "pw-alice"})
	if a1["device_id"] != "PHONE" {
		t.Fatalf("device_id not honoured: %v", a1)
	}
	t1, t2 := a1["access_token"].(string), a2["access_token"].(string)
	var who map[string]any
	e.get("GET", "/_matrix/client/v3/account/whoami", t1, nil, &who)
	if who["device_id"] != "PHONE" || who["user_id"] != "@alice:hs" {
		t.Errorf("whoami %v", who)
	}
	var devs struct {
		Devices []map[string]any `json:"devices"`
	}
	e.get("GET", "/_matrix/client/v3/devices", t1, nil, &devs)
	if len(devs.Devices) != 3 { // registration, PHONE, the second login
		t.Errorf("devices %v", devs)
	}
	e.run(t, []call{
		{"logout", "POST", "/_matrix/client/v3/logout", t1, nil, 200, ""},
		{"logged out token", "GET", "/_matrix/client/v3/account/whoami", t1, nil, 401, "M_UNKNOWN_TOKEN"},
		{"other session lives", "GET", "/_matrix/client/v3/account/whoami", t2, nil, 200, ""},
		{"logout all", "POST", "/_matrix/client/v3/logout/all", t2, nil, 200, ""},
		{"all sessions end", "GET", "/_matrix/client/v3/account/whoami", t2, nil, 401, "M_UNKNOWN_TOKEN"},
		{"logout with an as_token", "POST", "/_matrix/client/v3/logout", "as-bridge", nil, 200, ""},
		{"as_token still works", "GET", "/_matrix/client/v3/account/whoami", "as-bridge", nil, 200, ""},
	})
}

// TestSenderRegisteredAtStartup: the AS sender user exists before anyone
// asks; a reload registers the sender of a new AS.
func TestSenderRegisteredAtStartup(t *testing.T) {
	e := start(t, t.TempDir(), http.NotFoundHandler())
	var n int
	e.srv.st.db.QueryRow(`SELECT COUNT(*) FROM users WHERE user_id = '@bridgebot:hs' AND password = '' AND appservice = 'bridge'`).Scan(&n)
	if n != 1 {
		t.Fatal("sender user not registered at startup")
	}
	tok := e.register("alice")
	roomID := e.createRoom(tok, map[string]any{})
	if status, out := e.do("POST", room(roomID)+"/invite", tok, map[string]any{"user_id": "@bridgebot:hs"}); status != 200 {
		t.Errorf("invite the sender user: %d %v", status, out)
	}
	if status, out := e.do("GET", "/_matrix/client/v3/profile/"+url.PathEscape("@bridgebot:hs"), "", nil); status != 200 || out["displayname"] != "bridgebot" {
		t.Errorf("sender profile: %d %v", status, out)
	}
	// A reload that adds an AS registers its sender before it is live.
	r1, _, err := registry.Parse("bridge.yaml", []byte(fmt.Sprintf(bridgeReg, e.as.URL)))
	if err != nil {
		t.Fatal(err)
	}
	r2, _, err := registry.Parse("other.yaml", []byte(strings.NewReplacer("id: bridge", "id: other", "as-bridge", "as-other", "hs-bridge", "hs-other",
		"bridgebot", "otherbot", "@br_", "@ot_", "#br_", "#ot_").Replace(fmt.Sprintf(bridgeReg, e.as.URL))))
	if err != nil {
		t.Fatal(err)
	}
	set, _, err := registry.NewSet("hs", []*registry.Registration{r1, r2})
	if err != nil {
		t.Fatal(err)
	}
	if err := e.srv.Reload(context.Background(), set); err != nil {
		t.Fatal(err)
	}
	if status, out := e.do("GET", "/_matrix/client/v3/account/whoami", "as-other", nil); status != 200 || out["user_id"] != "@otherbot:hs" {
		t.Errorf("new AS after reload: %d %v", status, out)
	}
	if status, out := e.do("POST", room(roomID)+"/invite", tok, map[string]any{"user_id": "@otherbot:hs"}); status != 200 {
		t.Errorf("invite the new AS's sender: %d %v", status, out)
	}
}
