package homeserver

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"strings"
	"testing"

	"github.com/asdispatch/asdispatch/registry"
)

// fuzzPath fills a route pattern's variables with values that reach the
// handler: a room that exists, users inside and outside the AS namespace.
func fuzzPath(pattern, roomID string) string {
	vals := map[string]string{
		"{room}": url.PathEscape(roomID), "{user}": url.PathEscape("@br_a:hs"), "{alias}": url.PathEscape("#br_x:hs"),
		"{type}": "m.room.message", "{txn}": "t1", "{key...}": "", "{event}": url.PathEscape("$e:hs"), "{id}": "bridge",
		"{filter}": "0", "{device}": "D", "{field}": "displayname", "{protocol}": "irc", "{server}": "hs",
		"{media}": "abc", "{name}": "f.png",
	}
	for k, v := range vals {
		pattern = strings.ReplaceAll(pattern, k, v)
	}
	return pattern
}

// FuzzClientJSON throws arbitrary bodies at every route of the table:
// every answer is below 500, JSON unless it is a file, and never a panic.
func FuzzClientJSON(f *testing.F) {
	// The AS answers pings (a 502 there is the AS's failure, not ours) and
	// knows no users or rooms.
	as := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if strings.HasSuffix(r.URL.Path, "/ping") || strings.Contains(r.URL.Path, "/transactions/") {
			w.Write([]byte("{}"))
			return
		}
		w.WriteHeader(404)
	}))
	defer as.Close()
	r, _, err := registry.Parse("bridge.yaml", []byte(fmt.Sprintf(bridgeReg, as.URL)))
	if err != nil {
		f.Fatal(err)
	}
	set, _, _ := registry.NewSet("hs", []*registry.Registration{r})
	srv, err := New(context.Background(), Config{ServerName: "hs", DataDir: f.TempDir(), Registry: registry.NewRegistry(set), Password: cheapPasswords})
	if err != nil {
		f.Fatal(err)
	}
	defer srv.Close(context.Background())
	do := func(method, path string, body []byte) *httptest.ResponseRecorder {
		req := httptest.NewRequest(method, path, bytes.NewReader(body))
		req.Header.Set("Authorization", "Bearer as-bridge")
		rec := httptest.NewRecorder()
		srv.ServeHTTP(rec, req)
		return rec
	}
	rec := do("POST", "/_matrix/client/v3/createRoom", []byte(`{}`))
	var created struct {
		RoomID string `json:"room_id"`
	}
	json.Unmarshal(rec.Body.Bytes(), &created)
	if created.RoomID == "" {
		f.Fatalf("createRoom: %s", rec.Body)
	}
	table := srv.table
	for _, seed := range []string{`{}`, `{"username":"a","password":"b"}`, `{"room_alias_name":"br_x"}`, `[`, `{"messages":{"@a:hs":{"D":{}}}}`,
		`{"user_id":5}`, `{"membership":"join"}`, `{"users":{"@br_a:hs":"x"}}`, "\xff", `{} x`, `{"invite":["@` + strings.Repeat("a", 300) + `:hs"]}`,
		`{"device_keys":{"@bridgebot:hs":[]}}`, `{"one_time_keys":{"@bridgebot:hs":{"D":"signed_curve25519"}}}`,
		`{"master_key":{"user_id":"@bridgebot:hs","usage":["master"],"keys":{"ed25519:X":"X"}}}`, `{"@bridgebot:hs":{"X":{"signatures":{}}}}`,
		`{"devices":["D"]}`} {
		for i := range table {
			f.Add(uint16(i), seed)
		}
	}
	f.Fuzz(func(t *testing.T, which uint16, body string) {
		rt := table[int(which)%len(table)]
		path := fuzzPath(rt.pattern, created.RoomID)
		rec := do(rt.method, path, []byte(body))
		if rec.Code >= 500 {
			t.Fatalf("%s %s with %q: %d %s", rt.method, path, body, rec.Code, rec.Body.String())
		}
		if ct := rec.Header().Get("Content-Type"); ct == "application/json" && !json.Valid(rec.Body.Bytes()) {
			t.Fatalf("%s %s: invalid JSON answer %q", rt.method, path, rec.Body.String())
		}
	})
}

// TestRouteTable: every route answers (no 404 M_UNRECOGNIZED or 405 for
// its own method), and every path is served under r0 too.
func TestRouteTable(t *testing.T) {
	e := start(t, t.TempDir(), notFoundAS())
	roomID := e.createRoom("as-bridge", map[string]any{})
	seen := map[string]bool{}
	for _, rt := range e.srv.table {
		seen[rt.method+" "+rt.pattern] = true
		status, out := e.raw(rt.method, fuzzPath(rt.pattern, roomID), "as-bridge", []byte(`{}`))
		var m map[string]any
		json.Unmarshal(out, &m)
		if status == 405 || (status == 404 && m["errcode"] == "M_UNRECOGNIZED") || status >= 500 {
			t.Errorf("%s %s: %d %s", rt.method, rt.pattern, status, out)
		}
	}
	for k := range seen {
		if rest, ok := strings.CutPrefix(k, "GET /_matrix/client/v3/"); ok && !seen["GET /_matrix/client/r0/"+rest] {
			t.Errorf("%s not under r0", k)
		}
	}
	if len(seen) < 60 {
		t.Errorf("only %d routes", len(seen))
	}
}

// TestDocsListEveryRoute: docs/stub-api.md lists every route of the table.
func TestDocsListEveryRoute(t *testing.T) {
	doc, err := os.ReadFile("../docs/stub-api.md")
	if err != nil {
		t.Fatal(err)
	}
	e := start(t, t.TempDir(), notFoundAS())
	for _, rt := range e.srv.table {
		if strings.Contains(rt.pattern, "/r0/") {
			continue
		}
		a := "public"
		if rt.access == user {
			a = "token"
		}
		if line := rt.method + " " + rt.pattern + " " + a; !bytes.Contains(doc, []byte("\n"+line+"\n")) {
			t.Errorf("docs/stub-api.md does not list %q", line)
		}
	}
}
