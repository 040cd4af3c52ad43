package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/matrix-org/dendrite/contrib/asdispatch/internal/harness"
)

// downAS refuses transactions until up is set, then records them.
type downAS struct {
	t        *testing.T
	mu       sync.Mutex
	up       bool
	attempts int
	txns     map[string]string
	bodies   []string // first delivery of each message, in order
	dups     int
}

func (a *downAS) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if r.URL.Path == "/_matrix/app/v1/ping" && r.Header.Get("Authorization") == "Bearer hs-crash" {
		w.Write([]byte("{}"))
		return
	}
	id, ok := strings.CutPrefix(r.URL.Path, "/_matrix/app/v1/transactions/")
	if !ok || r.Header.Get("Authorization") != "Bearer hs-crash" {
		w.WriteHeader(404)
		w.Write([]byte(`{"errcode":"M_NOT_FOUND"}`))
		return
	}
	var raw json.RawMessage
	json.NewDecoder(r.Body).Decode(&raw)
	a.mu.Lock()
	defer a.mu.Unlock()
	a.attempts++
	if !a.up {
		w.WriteHeader(503)
		return
	}
	if prev, seen := a.txns[id]; seen {
		if prev != string(raw) {
			a.t.Errorf("txn %s resent with another body", id)
		}
		w.Write([]byte("{}"))
		return
	}
	a.txns[id] = string(raw)
	var txn struct {
		Events []struct {
			Type    string                `json:"type"`
			Content struct{ Body string } `json:"content"`
		} `json:"events"`
	}
	json.Unmarshal(raw, &txn)
	for _, e := range txn.Events {
		if e.Type != "m.room.message" {
			continue
		}
		if slices.Contains(a.bodies, e.Content.Body) {
			a.dups++
			continue
		}
		a.bodies = append(a.bodies, e.Content.Body)
	}
	w.Write([]byte("{}"))
}

// TestSIGKILLWhileASDown: messages acknowledged to the client while the AS
// is down survive a SIGKILL of dendrite-asdispatch (whether they were in the
// dispatcher's store or still unacknowledged in JetStream) and reach the AS
// in order once it is back, each txnId always with the same body.
func TestSIGKILLWhileASDown(t *testing.T) {
	if testing.Short() {
		t.Skip("starts dendrite-asdispatch twice")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	bin, err := harness.Build(ctx, harness.AsDispatch)
	if err != nil {
		t.Fatal(err)
	}
	as, _, cfg := startCrashAS(t, false, "appservice:\n  retry_initial: 100ms\n  retry_max: 500ms\n")
	hs, err := harness.Start(ctx, bin, cfg, testLog{t})
	if err != nil {
		t.Fatal(err)
	}
	tok, err := harness.Register(ctx, hs.URL, "crash_alice", "crash password")
	if err != nil {
		t.Fatal(err)
	}
	c := hs.URL + "/_matrix/client/v3"
	out, err := harness.Call(ctx, "POST", c+"/createRoom", tok, map[string]any{"preset": "public_chat"})
	if err != nil {
		t.Fatal(err)
	}
	room := out["room_id"].(string)
	const n = 30
	for i := 0; i < n; i++ {
		if _, err := harness.Call(ctx, "PUT", fmt.Sprintf("%s/rooms/%s/send/m.room.message/c%d", c, url.PathEscape(room), i), tok,
			map[string]any{"msgtype": "m.text", "body": "m" + strconv.Itoa(i)}); err != nil {
			t.Fatal(err)
		}
	}
	// Let the AS refuse at least one attempt, then kill.
	waitFor(t, 30*time.Second, func() bool { as.mu.Lock(); defer as.mu.Unlock(); return as.attempts > 0 })
	hs.Kill()

	as.mu.Lock()
	as.up = true
	as.mu.Unlock()
	hs, err = harness.Start(ctx, bin, cfg, testLog{t})
	if err != nil {
		t.Fatal(err)
	}
	defer hs.Kill()
	waitFor(t, 60*time.Second, func() bool { as.mu.Lock(); defer as.mu.Unlock(); return len(as.bodies) >= n })
	// A replayed batch would come after the originals: give it time to.
	time.Sleep(time.Second)
	as.mu.Lock()
	defer as.mu.Unlock()
	for i, b := range as.bodies {
		if b != "m"+strconv.Itoa(i) {
			t.Fatalf("out of order at %d: %q", i, as.bodies)
		}
	}
	if as.dups > 0 {
		// A kill between Submit and the JetStream ack replays the batch;
		// the dispatcher must skip it at its positions.
		t.Errorf("%d messages delivered twice: %q", as.dups, as.bodies)
	}
}

// startCrashAS starts a downAS (up or not yet), registered as "crash", and
// writes a dendrite-asdispatch config for it in a new temp dir, with extra
// after asdispatch's data_dir. It returns the AS, the dir and the config.
func startCrashAS(t *testing.T, up bool, extra string) (*downAS, string, string) {
	t.Helper()
	as := &downAS{t: t, up: up, txns: map[string]string{}}
	srv := httptest.NewServer(as)
	t.Cleanup(srv.Close)
	dir := t.TempDir()
	reg := filepath.Join(dir, "crash.yaml")
	if err := os.WriteFile(reg, []byte(fmt.Sprintf("id: crash\nurl: %q\nas_token: as-crash\nhs_token: hs-crash\nsender_localpart: crashbot\nnamespaces:\n  users: [{exclusive: false, regex: \"@crash_.*\"}]\n", srv.URL)), 0o600); err != nil {
		t.Fatal(err)
	}
	cfg, err := harness.WriteConfig(dir, harness.Options{Registrations: []string{reg},
		AsDispatch: fmt.Sprintf("data_dir: %s\n", filepath.Join(dir, "asdispatch")) + extra})
	if err != nil {
		t.Fatal(err)
	}
	return as, dir, cfg
}

func waitFor(t *testing.T, d time.Duration, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("condition not met within %s", d)
		}
		time.Sleep(20 * time.Millisecond)
	}
}
