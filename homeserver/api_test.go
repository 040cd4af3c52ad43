package homeserver

import (
	"bytes"
	"encoding/json"
	"io"
	"net/http"
	"net/url"
	"strings"
	"testing"
)

// raw sends a raw body and returns the status and body of the answer.
func (e *env) raw(method, path, token string, body []byte, header ...string) (int, []byte) {
	e.t.Helper()
	req, _ := http.NewRequest(method, e.hs.URL+path, bytes.NewReader(body))
	if token != "" {
		req.Header.Set("Authorization", "Bearer "+token)
	}
	for i := 0; i+1 < len(header); i += 2 {
		req.Header.Set(header[i], header[i+1])
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		e.t.Fatal(err)
	}
	defer resp.Body.Close()
	out, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, out
}

// get decodes a JSON answer of any shape into v and returns the status.
func (e *env) get(method, path, token string, body any, v any) int {
	e.t.Helper()
	var js []byte
	if body != nil {
		js, _ = json.Marshal(body)
	}
	status, out := e.raw(method, path, token, js)
	if v != nil {
		if err := json.Unmarshal(out, v); err != nil {
			e.t.Fatalf("%s %s: %d %s: %v", method, path, status, out, err)
		}
	}
	return status
}

func (e *env) register(name string) string {
	e.t.Helper()
	status, out := e.do("POST", "/_matrix/client/v3/register", "", map[string]any{"username": name, "password": "pw-" + name})
	tok, _ := out["access_token"].(string)
	if status != 200 || tok == "" {
		e.t.Fatalf("register %s: %d %v", name, status, out)
	}
	return tok
}

// ghost registers an AS user and returns the query suffix to act as it.
func (e *env) ghost(localpart string) string {
	e.t.Helper()
	status, out := e.do("POST", "/_matrix/client/v3/register", "as-bridge", map[string]any{"username": localpart, "type": "m.login.application_service"})
	if status != 200 {
		e.t.Fatalf("register ghost %s: %d %v", localpart, status, out)
	}
	return "?user_id=" + url.QueryEscape("@"+localpart+":hs")
}

func (e *env) createRoom(token string, body map[string]any) string {
	e.t.Helper()
	status, out := e.do("POST", "/_matrix/client/v3/createRoom", token, body)
	id, _ := out["room_id"].(string)
	if status != 200 || id == "" {
		e.t.Fatalf("createRoom: %d %v", status, out)
	}
	return id
}

func room(id string) string { return "/_matrix/client/v3/rooms/" + url.PathEscape(id) }

func notFoundAS() http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if strings.Contains(r.URL.Path, "/transactions/") || strings.HasSuffix(r.URL.Path, "/ping") {
			w.Write([]byte("{}"))
			return
		}
		w.WriteHeader(404)
	})
}

type call struct {
	name, method, path, token string
	body                      any
	status                    int
	errcode                   string
}

func (e *env) run(t *testing.T, calls []call) {
	t.Helper()
	for _, tt := range calls {
		var js []byte
		switch b := tt.body.(type) {
		case nil:
		case []byte:
			js = b
		default:
			js, _ = json.Marshal(b)
		}
		status, out := e.raw(tt.method, tt.path, tt.token, js)
		var m map[string]any
		json.Unmarshal(out, &m)
		if status != tt.status || (tt.errcode != "" && m["errcode"] != tt.errcode) {
			t.Errorf("%s: %s %s = %d %s, want %d %s", tt.name, tt.method, tt.path, status, out, tt.status, tt.errcode)
		}
	}
}

func TestRequestParsing(t *testing.T) {
	e := start(t, t.TempDir(), notFoundAS())
	tok := e.register("alice")
	e.run(t, []call{
		{"unknown endpoint", "GET", "/_matrix/client/v3/nope", tok, nil, 404, "M_UNRECOGNIZED"},
		{"unknown prefix", "GET", "/nope", "", nil, 404, "M_UNRECOGNIZED"},
		{"wrong method", "DELETE", "/_matrix/client/v3/createRoom", tok, nil, 405, "M_UNRECOGNIZED"},
		{"wrong method on a path with variables", "POST", room("!r:hs") + "/state", tok, nil, 405, "M_UNRECOGNIZED"},
		{"syntax error", "POST", "/_matrix/client/v3/createRoom", tok, []byte(`{"name":`), 400, "M_NOT_JSON"},
		{"invalid UTF-8", "POST", "/_matrix/client/v3/createRoom", tok, []byte("{\"name\":\"\xff\"}"), 400, "M_NOT_JSON"},
		{"trailing data", "POST", "/_matrix/client/v3/createRoom", tok, []byte(`{"name":"a"} {}`), 400, "M_NOT_JSON"},
		{"not an object", "POST", "/_matrix/client/v3/createRoom", tok, []byte(`[1]`), 400, "M_BAD_JSON"},
		{"wrong field type", "POST", "/_matrix/client/v3/createRoom", tok, []byte(`{"invite":"@a:hs"}`), 400, "M_BAD_JSON"},
		{"missing user_id", "POST", room("!r:hs") + "/invite", tok, map[string]any{}, 400, "M_MISSING_PARAM"},
		{"missing typing", "PUT", room("!r:hs") + "/typing/" + url.PathEscape("@alice:hs"), tok, map[string]any{}, 400, "M_MISSING_PARAM"},
		{"room ID that is not one", "GET", room("nope") + "/state", tok, nil, 400, "M_INVALID_PARAM"},
		{"CORS preflight", "OPTIONS", "/_matrix/client/v3/createRoom", "", nil, 204, ""},
		{"r0 path", "GET", "/_matrix/client/r0/account/whoami", tok, nil, 200, ""},
		{"token in the query", "GET", "/_matrix/client/v3/account/whoami?access_token=" + tok, "", nil, 200, ""},
	})
}

// TestUnexpectedErrorIsBare: a failing database answers a bare 500
// M_UNKNOWN; its text (paths, hosts, users) stays in the log.
func TestUnexpectedErrorIsBare(t *testing.T) {
	e := start(t, t.TempDir(), notFoundAS())
	tok := e.register("alice")
	e.srv.st.db.Close()
	status, out := e.raw("GET", "/_matrix/client/v3/account/whoami", tok, nil)
	if status != 500 || string(bytes.TrimSpace(out)) != `{"errcode":"M_UNKNOWN","error":"internal server error"}` {
		t.Fatalf("got %d %s", status, out)
	}
}
