package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/matrix-org/dendrite/contrib/asdispatch/internal/harness"
)

// loggingAS is the seed's logging application service: it records every
// transaction and, asked about a #logged_* alias, creates the room.
type loggingAS struct {
	t  *testing.T
	mu sync.Mutex
	hs string // homeserver URL, set once it runs
	// txns maps txnId to body: a retry must repeat the same body.
	txns   map[string]string
	order  []string // txnIds in arrival order, first arrival only
	bodies []string // message bodies in delivery order
	events []map[string]any
}

func (a *loggingAS) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if r.Header.Get("Authorization") != "Bearer hs-logging" {
		w.WriteHeader(403)
		return
	}
	switch {
	case r.Method == "PUT" && strings.HasPrefix(r.URL.Path, "/_matrix/app/v1/transactions/"):
		id := strings.TrimPrefix(r.URL.Path, "/_matrix/app/v1/transactions/")
		var raw json.RawMessage
		if err := json.NewDecoder(r.Body).Decode(&raw); err != nil {
			w.WriteHeader(400)
			return
		}
		var txn struct {
			Events []map[string]any `json:"events"`
		}
		_ = json.Unmarshal(raw, &txn)
		a.mu.Lock()
		defer a.mu.Unlock()
		if prev, ok := a.txns[id]; ok {
			if prev != string(raw) {
				a.t.Errorf("txn %s resent with another body:\n%s\n%s", id, prev, raw)
			}
			w.Write([]byte("{}"))
			return
		}
		a.txns[id] = string(raw)
		a.order = append(a.order, id)
		for _, e := range txn.Events {
			a.events = append(a.events, e)
			if c, ok := e["content"].(map[string]any); ok && e["type"] == "m.room.message" {
				b, _ := c["body"].(string)
				a.bodies = append(a.bodies, b)
			}
		}
		w.Write([]byte("{}"))
	case r.Method == "GET" && strings.HasPrefix(r.URL.Path, "/_matrix/app/v1/rooms/"):
		alias := strings.TrimPrefix(r.URL.Path, "/_matrix/app/v1/rooms/")
		local := strings.TrimPrefix(strings.SplitN(alias, ":", 2)[0], "#")
		a.mu.Lock()
		hs := a.hs
		a.mu.Unlock()
		if _, err := harness.Call(r.Context(), "POST", hs+"/_matrix/client/v3/createRoom", "as-logging",
			map[string]any{"room_alias_name": local, "preset": "public_chat"}); err != nil {
			a.t.Errorf("the AS could not create %s: %v", alias, err)
			w.WriteHeader(404)
			return
		}
		w.Write([]byte("{}"))
	default:
		w.WriteHeader(404)
		w.Write([]byte(`{"errcode":"M_NOT_FOUND"}`))
	}
}

func (a *loggingAS) snapshot() (bodies []string, events []map[string]any) {
	a.mu.Lock()
	defer a.mu.Unlock()
	return append([]string(nil), a.bodies...), append([]map[string]any(nil), a.events...)
}

// TestSeedWalkthrough: the seed's walkthrough through dendrite-asdispatch.
// A logging AS for #logged_*; a user creates #logged_test and talks in it;
// then joins #logged_test2, which does not exist until the AS, asked by
// the alias query, creates it; both messages reach the AS in order.
func TestSeedWalkthrough(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	bin, err := harness.Build(ctx, harness.AsDispatch)
	if err != nil {
		t.Fatal(err)
	}
	as := &loggingAS{t: t, txns: map[string]string{}}
	srv := httptest.NewServer(as)
	defer srv.Close()

	dir := t.TempDir()
	reg := filepath.Join(dir, "logging.yaml")
	if err := os.WriteFile(reg, []byte(fmt.Sprintf(`id: "something-good"
url: %q
as_token: as-logging
hs_token: hs-logging
sender_localpart: logging
namespaces:
  users: []
  rooms: []
  aliases:
    - exclusive: false
      regex: "#logged_.*"
`, srv.URL)), 0o600); err != nil {
		t.Fatal(err)
	}
	cfg, err := harness.WriteConfig(dir, harness.Options{Registrations: []string{reg},
		AsDispatch: fmt.Sprintf("data_dir: %s\nappservice:\n  retry_initial: 100ms\n", filepath.Join(dir, "asdispatch"))})
	if err != nil {
		t.Fatal(err)
	}
	hs, err := harness.Start(ctx, bin, cfg, testLog{t})
	if err != nil {
		t.Fatal(err)
	}
	defer hs.Kill()
	as.mu.Lock()
	as.hs = hs.URL
	as.mu.Unlock()

	must := func(out map[string]any, err error) map[string]any {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
		return out
	}
	tok, err := harness.Register(ctx, hs.URL, "alice", "correct horse battery")
	if err != nil {
		t.Fatal(err)
	}
	c := hs.URL + "/_matrix/client/v3"
	room := must(harness.Call(ctx, "POST", c+"/createRoom", tok, map[string]any{"room_alias_name": "logged_test"}))["room_id"].(string)
	must(harness.Call(ctx, "PUT", c+"/rooms/"+url.PathEscape(room)+"/send/m.room.message/1", tok,
		map[string]any{"msgtype": "m.text", "body": "first"}))
	lazy := must(harness.Call(ctx, "POST", c+"/join/"+url.PathEscape("#logged_test2:localhost"), tok, nil))["room_id"].(string)
	must(harness.Call(ctx, "PUT", c+"/rooms/"+url.PathEscape(lazy)+"/send/m.room.message/2", tok,
		map[string]any{"msgtype": "m.text", "body": "second"}))

	deadline := time.Now().Add(30 * time.Second)
	for {
		bodies, _ := as.snapshot()
		if len(bodies) >= 2 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("after 30s the AS got messages %q", bodies)
		}
		time.Sleep(20 * time.Millisecond)
	}
	bodies, events := as.snapshot()
	if strings.Join(bodies, ",") != "first,second" {
		t.Errorf("messages %q, want first, second in order", bodies)
	}
	var aliceJoinedLazy bool
	for _, e := range events {
		if e["type"] == "m.room.member" && e["room_id"] == lazy && e["state_key"] == "@alice:localhost" {
			aliceJoinedLazy = true
		}
		for _, f := range []string{"event_id", "room_id", "sender", "type", "origin_server_ts", "content"} {
			if _, ok := e[f]; !ok {
				t.Errorf("event without %s (not client format): %v", f, e)
			}
		}
	}
	if !aliceJoinedLazy {
		t.Errorf("the AS did not get alice's join of the lazily created %s", lazy)
	}
	if err := hs.Stop(20 * time.Second); err != nil {
		t.Errorf("SIGTERM: %v", err)
	}
}

// testLog passes the server's output to the test log.
type testLog struct{ t *testing.T }

func (l testLog) Write(p []byte) (int, error) {
	l.t.Logf("%s", strings.TrimRight(string(p), "\n"))
	return len(p), nil
}

// With Dendrite's metrics endpoint enabled, ours are on it beside Dendrite's.
func TestMetricsOnDendritesEndpoint(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	bin, err := harness.Build(ctx, harness.AsDispatch)
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	reg := filepath.Join(dir, "m.yaml")
	os.WriteFile(reg, []byte("id: m\nurl: null\nas_token: as-m\nhs_token: hs-m\nsender_localpart: mbot\nnamespaces:\n  users: [{exclusive: true, regex: \"@m_.*\"}]\n"), 0o600)
	cfg, err := harness.WriteConfig(dir, harness.Options{Registrations: []string{reg}, Metrics: true,
		AsDispatch: "data_dir: " + filepath.Join(dir, "asdispatch") + "\n"})
	if err != nil {
		t.Fatal(err)
	}
	hs, err := harness.Start(ctx, bin, cfg, testLog{t})
	if err != nil {
		t.Fatal(err)
	}
	defer hs.Kill()
	req, _ := http.NewRequest("GET", hs.URL+"/metrics", nil)
	req.SetBasicAuth("metrics", "metrics")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	for _, want := range []string{"dendrite_up", "asdispatch_queued_deliveries_total"} {
		if !strings.Contains(string(b), want) {
			t.Errorf("/metrics (%d) has no %s", resp.StatusCode, want)
		}
	}
}
