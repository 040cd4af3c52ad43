package asdendrite

import (
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"

	"go.uber.org/zap"

	"github.com/asdispatch/asdispatch/queries"
	"github.com/asdispatch/asdispatch/registry"
)

func TestPingHandler(t *testing.T) {
	var pings atomic.Int32
	var lastTxn atomic.Value
	as := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != "/_matrix/app/v1/ping" || r.Header.Get("Authorization") != "Bearer hs-irc" {
			w.WriteHeader(404)
			return
		}
		var b struct {
			TransactionID string `json:"transaction_id"`
		}
		json.NewDecoder(r.Body).Decode(&b)
		lastTxn.Store(b.TransactionID)
		pings.Add(1)
		w.Write([]byte("{}"))
	}))
	defer as.Close()
	set, _, err := registry.Load("example.org", writeReg(t, t.TempDir(), "irc.yaml", ircReg(as.URL)))
	if err != nil {
		t.Fatal(err)
	}
	reg := registry.NewRegistry(set)
	a := &API{reg: reg, log: zap.NewNop(), q: queries.New(queries.Config{Registry: reg})}
	h := a.PingHandler()
	for _, tc := range []struct {
		name, method, path, token, body string
		status                          int
		errcode                         string
		pinged                          bool
	}{
		{"ok", "POST", "/_matrix/client/v1/appservice/irc/ping", "as-irc", `{"transaction_id":"t1"}`, 200, "", true},
		{"ok without body", "POST", "/_matrix/client/v1/appservice/irc/ping", "as-irc", ``, 200, "", true},
		{"no token", "POST", "/_matrix/client/v1/appservice/irc/ping", "", `{}`, 401, "M_MISSING_TOKEN", false},
		{"user token", "POST", "/_matrix/client/v1/appservice/irc/ping", "syt_user", `{}`, 401, "M_UNKNOWN_TOKEN", false},
		{"other AS", "POST", "/_matrix/client/v1/appservice/slack/ping", "as-irc", `{}`, 403, "M_FORBIDDEN", false},
		{"not JSON", "POST", "/_matrix/client/v1/appservice/irc/ping", "as-irc", `{`, 400, "M_NOT_JSON", false},
		{"GET", "GET", "/_matrix/client/v1/appservice/irc/ping", "as-irc", ``, 405, "M_UNRECOGNIZED", false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			before := pings.Load()
			req := httptest.NewRequest(tc.method, tc.path, strings.NewReader(tc.body))
			if tc.token != "" {
				req.Header.Set("Authorization", "Bearer "+tc.token)
			}
			rec := httptest.NewRecorder()
			h.ServeHTTP(rec, req)
			var out map[string]any
			json.Unmarshal(rec.Body.Bytes(), &out)
			if rec.Code != tc.status || (tc.errcode != "" && out["errcode"] != tc.errcode) {
				t.Fatalf("%d %s, want %d %s", rec.Code, rec.Body, tc.status, tc.errcode)
			}
			if tc.status == 200 {
				if _, ok := out["duration_ms"]; !ok {
					t.Errorf("no duration_ms in %s", rec.Body)
				}
			}
			if got := pings.Load() > before; got != tc.pinged {
				t.Errorf("AS pinged = %v, want %v", got, tc.pinged)
			}
			if tc.name == "ok" && lastTxn.Load() != "t1" {
				t.Errorf("AS got transaction_id %v, want t1", lastTxn.Load())
			}
		})
	}
}

func TestPingTarget(t *testing.T) {
	for _, tc := range []struct {
		path string
		id   string
		ok   bool
	}{
		{"/_matrix/client/v1/appservice/irc/ping", "irc", true},
		{"/_matrix/client/v1/appservice/a%20b/ping", "a b", true},
		{"/_matrix/client/v1/appservice//ping", "", false},
		{"/_matrix/client/v1/appservice/a%2Fb/ping", "", false},
		{"/_matrix/client/v1/appservice/irc", "", false},
	} {
		req := httptest.NewRequest("POST", tc.path, nil)
		id, ok := pingTarget(req.URL)
		if id != tc.id || ok != tc.ok {
			t.Errorf("%s: %q %v, want %q %v", tc.path, id, ok, tc.id, tc.ok)
		}
	}
}
