package homeserver

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"

	"github.com/asdispatch/asdispatch/metrics"
	"github.com/asdispatch/asdispatch/queue"
	"github.com/asdispatch/asdispatch/registry"
)

// tokenAS records every request it gets; until accept is set it refuses
// transactions with an error that echoes both its tokens back.
type tokenAS struct {
	id, hsToken, asToken string
	accept               atomic.Bool
	mu                   sync.Mutex
	reqs                 []string // method, URL, headers and body of each request
	srv                  *httptest.Server
}

func newTokenAS(t *testing.T, id string, refuse int) *tokenAS {
	a := &tokenAS{id: id, hsToken: "hs-secret-" + id, asToken: "as-secret-" + id}
	a.srv = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		body, _ := io.ReadAll(r.Body)
		a.mu.Lock()
		a.reqs = append(a.reqs, fmt.Sprintf("%s %s %v %s", r.Method, r.URL, r.Header, body))
		a.mu.Unlock()
		if r.Header.Get("Authorization") != "Bearer "+a.hsToken {
			w.WriteHeader(http.StatusForbidden)
			return
		}
		if !a.accept.Load() && (strings.Contains(r.URL.Path, "/transactions/") || strings.Contains(r.URL.Path, "/ping")) {
			w.WriteHeader(refuse)
			fmt.Fprintf(w, `{"errcode":"M_FORBIDDEN","error":"you sent %s, I am %s"}`, a.hsToken, a.asToken)
			return
		}
		if strings.Contains(r.URL.Path, "/users/") || strings.Contains(r.URL.Path, "/rooms/") {
			w.WriteHeader(http.StatusNotFound)
		}
		w.Write([]byte("{}"))
	}))
	t.Cleanup(a.srv.Close)
	return a
}

func (a *tokenAS) registration() string {
	return fmt.Sprintf(`id: %s
url: %s
as_token: %s
hs_token: %s
sender_localpart: %sbot
receive_ephemeral: true
namespaces:
  users: [{exclusive: true, regex: "@%s_.*"}]
  aliases: [{exclusive: true, regex: "#%s_.*"}]
`, a.id, a.srv.URL, a.asToken, a.hsToken, a.id, a.id, a.id)
}

// TestTokenBoundaries: an as_token acts only inside its own namespaces,
// each AS only ever receives its own hs_token, and no token reaches logs,
// errors, the admin status or metrics, even when an AS echoes its tokens in
// its error answers.
func TestTokenBoundaries(t *testing.T) {
	br, tg := newTokenAS(t, "br", http.StatusUnauthorized), newTokenAS(t, "tg", http.StatusInternalServerError)
	var regs []*registry.Registration
	for _, a := range []*tokenAS{br, tg} {
		r, _, err := registry.Parse(a.id+".yaml", []byte(a.registration()))
		if err != nil {
			t.Fatal(err)
		}
		regs = append(regs, r)
	}
	set, _, err := registry.NewSet("hs", regs)
	if err != nil {
		t.Fatal(err)
	}
	core, logs := observer.New(zap.DebugLevel)
	promReg := prometheus.NewRegistry()
	srv, err := New(context.Background(), Config{ServerName: "hs", DataDir: t.TempDir(), Registry: registry.NewRegistry(set),
		Logger: zap.New(core), Metrics: metrics.New(promReg),
		Queue: queue.Options{RetryInitial: 10 * time.Millisecond, RetryMax: 20 * time.Millisecond}, Password: cheapPasswords})
	if err != nil {
		t.Fatal(err)
	}
	var answers strings.Builder // every answer the client API gave
	e := &env{t: t, hs: httptest.NewServer(srv), srv: srv, answers: &answers}
	defer e.stop()
	do := e.do
	as := func(user string) string { return "?user_id=" + url.QueryEscape(user) }
	admin := func() { // the admin status, on its own handler; its answers are checked too
		rec := httptest.NewRecorder()
		srv.AdminHandler().ServeHTTP(rec, httptest.NewRequest("GET", "/_asdispatch/v1/appservices", nil))
		if rec.Code != 200 {
			t.Errorf("admin status: %d %s", rec.Code, rec.Body)
		}
		answers.Write(rec.Body.Bytes())
	}

	_, alice := do("POST", "/_matrix/client/v3/register", "", map[string]any{"username": "alice", "password": "alice-password"})
	aliceTok := alice["access_token"].(string)
	for _, a := range []*tokenAS{br, tg} {
		if st, out := do("POST", "/_matrix/client/v3/register", a.asToken, map[string]any{"username": a.id + "_ghost", "type": "m.login.application_service"}); st != 200 {
			t.Fatalf("%s registers its ghost: %d %v", a.id, st, out)
		}
	}
	_, room := do("POST", "/_matrix/client/v3/createRoom", aliceTok, map[string]any{})
	roomID := room["room_id"].(string)
	for _, a := range []*tokenAS{br, tg} {
		do("POST", "/_matrix/client/v3/rooms/"+url.PathEscape(roomID)+"/invite", aliceTok, map[string]any{"user_id": "@" + a.id + "_ghost:hs"})
		do("POST", "/_matrix/client/v3/rooms/"+url.PathEscape(roomID)+"/join"+as("@"+a.id+"_ghost:hs"), a.asToken, nil)
	}

	answers.Reset() // registration answered alice her token, as it should

	// br's as_token outside br's namespaces, and in another AS's.
	tests := []struct {
		name, method, path string
		body               any
		status             int
		errcode            string
	}{
		{"register in another AS's namespace", "POST", "/_matrix/client/v3/register", map[string]any{"username": "tg_x", "type": "m.login.application_service"}, 400, "M_EXCLUSIVE"},
		{"register outside any namespace", "POST", "/_matrix/client/v3/register", map[string]any{"username": "carol", "type": "m.login.application_service"}, 400, "M_EXCLUSIVE"},
		{"masquerade as another AS's ghost", "GET", "/_matrix/client/v3/account/whoami" + as("@tg_ghost:hs"), nil, 403, "M_FORBIDDEN"},
		{"masquerade as a plain user", "GET", "/_matrix/client/v3/account/whoami" + as("@alice:hs"), nil, 403, "M_FORBIDDEN"},
		{"masquerade as a remote user", "GET", "/_matrix/client/v3/account/whoami" + as("@br_ghost:elsewhere"), nil, 403, "M_FORBIDDEN"},
		{"send as another AS's ghost", "PUT", "/_matrix/client/v3/rooms/" + url.PathEscape(roomID) + "/send/m.room.message/x" + as("@tg_ghost:hs"), map[string]any{"body": "x"}, 403, "M_FORBIDDEN"},
		{"alias in another AS's namespace", "PUT", "/_matrix/client/v3/directory/room/" + url.PathEscape("#tg_room:hs"), map[string]any{"room_id": roomID}, 400, "M_EXCLUSIVE"},
		{"ping another AS", "POST", "/_matrix/client/v1/appservice/tg/ping", map[string]any{}, 403, "M_FORBIDDEN"},
		{"typing as another AS's ghost", "PUT", "/_matrix/client/v3/rooms/" + url.PathEscape(roomID) + "/typing/" + url.PathEscape("@tg_ghost:hs"), map[string]any{"typing": true}, 403, "M_FORBIDDEN"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if st, out := do(tt.method, tt.path, br.asToken, tt.body); st != tt.status || out["errcode"] != tt.errcode {
				t.Errorf("%s %s with br's token = %d %v, want %d %s", tt.method, tt.path, st, out, tt.status, tt.errcode)
			}
		})
	}
	if st, _ := do("GET", "/_matrix/client/v3/account/whoami"+as("@tg_ghost:hs")+"&access_token="+url.QueryEscape(br.asToken), "", nil); st != 403 {
		t.Errorf("masquerade through ?access_token= = %d, want 403", st)
	}

	// Traffic to both ASes while they refuse us and echo their tokens.
	for i := range 3 {
		do("PUT", fmt.Sprintf("/_matrix/client/v3/rooms/%s/send/m.room.message/m%d", url.PathEscape(roomID), i), aliceTok, map[string]any{"body": "hi"})
	}
	do("PUT", "/_matrix/client/v3/rooms/"+url.PathEscape(roomID)+"/typing/"+url.PathEscape("@alice:hs"), aliceTok, map[string]any{"typing": true})
	do("GET", "/_matrix/client/v3/profile/"+url.PathEscape("@br_unknown:hs"), "", nil)
	do("GET", "/_matrix/client/v3/profile/"+url.PathEscape("@tg_unknown:hs"), "", nil)
	do("POST", "/_matrix/client/v3/join/"+url.PathEscape("#br_lazy:hs"), aliceTok, nil)
	for _, a := range []*tokenAS{br, tg} {
		do("POST", "/_matrix/client/v1/appservice/"+a.id+"/ping", a.asToken, map[string]any{"transaction_id": "p"})
	}
	time.Sleep(100 * time.Millisecond)
	admin() // last_error is the echo
	br.accept.Store(true)
	tg.accept.Store(true)
	deadline := time.Now().Add(10 * time.Second)
	for {
		sts, _ := srv.Dispatcher().Statuses(context.Background())
		drained := len(sts) == 2
		for _, st := range sts {
			drained = drained && st.PendingItems == 0 && st.Up
		}
		if drained {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the ASes never caught up: %+v", sts)
		}
		time.Sleep(10 * time.Millisecond)
	}
	admin()
	var scrape strings.Builder
	rec := httptest.NewRecorder()
	promhttp.HandlerFor(promReg, promhttp.HandlerOpts{}).ServeHTTP(rec, httptest.NewRequest("GET", "/metrics", nil))
	scrape.Write(rec.Body.Bytes())

	secrets := []string{br.hsToken, br.asToken, tg.hsToken, tg.asToken, aliceTok, "alice-password"}
	// Each AS hears only its own hs_token, and no other secret.
	for _, a := range []*tokenAS{br, tg} {
		a.mu.Lock()
		if len(a.reqs) == 0 {
			t.Errorf("%s got no requests", a.id)
		}
		for _, r := range a.reqs {
			if !strings.Contains(r, "Bearer "+a.hsToken) {
				t.Errorf("%s got a request without its hs_token: %.200s", a.id, r)
			}
			for _, s := range secrets {
				if s != a.hsToken && strings.Contains(r, s) {
					t.Errorf("%s was sent the secret %q: %.200s", a.id, s, r)
				}
			}
		}
		a.mu.Unlock()
	}
	var logText strings.Builder
	for _, e := range logs.All() {
		fmt.Fprintf(&logText, "%s %v\n", e.Message, e.ContextMap())
	}
	if !strings.Contains(logText.String(), "appservice down") {
		t.Error("the refusals were not logged")
	}
	for where, text := range map[string]string{"logs": logText.String(), "client API answers and admin status": answers.String(), "metrics": scrape.String()} {
		for _, s := range secrets {
			if strings.Contains(text, s) {
				i := strings.Index(text, s)
				t.Errorf("%s contain the secret %q: ...%s...", where, s, text[max(0, i-100):min(len(text), i+50)])
			}
		}
	}
}
