package integration

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// buildFaultBinary builds asdispatch with the asdispatch_faults tag, which
// compiles in the fault points ASDISPATCH_FAULT names.
func buildFaultBinary(t *testing.T) string {
	t.Helper()
	bin := filepath.Join(t.TempDir(), "asdispatch-faults")
	cmd := exec.Command("go", "build", "-tags", "asdispatch_faults", "-o", bin, "./cmd/asdispatch")
	cmd.Dir = ".."
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	return bin
}

// startServeEnv is startServe with extra environment variables.
func startServeEnv(t *testing.T, bin, config string, env ...string) (string, *exec.Cmd) {
	t.Helper()
	cmd := exec.Command(bin, "serve", "--config", config)
	cmd.Env = append(os.Environ(), env...)
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	lines := bufio.NewScanner(stdout)
	addr := make(chan string, 1)
	go func() {
		for lines.Scan() {
			if a, ok := strings.CutPrefix(lines.Text(), "listening on "); ok {
				addr <- a
			}
		}
	}()
	select {
	case a := <-addr:
		return a, cmd
	case <-time.After(30 * time.Second):
		t.Fatal("serve did not print its listening line")
	}
	return "", nil
}

// onceAS records the bodies of the messages it gets and every event id
// that came again under another transaction id.
type onceAS struct {
	mu     sync.Mutex
	txnOf  map[string]string // event id -> txn id it first came in
	bodies []string
	dups   []string
}

func (a *onceAS) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	txn, ok := strings.CutPrefix(r.URL.Path, "/_matrix/app/v1/transactions/")
	if !ok {
		w.WriteHeader(http.StatusNotFound)
		w.Write([]byte(`{"errcode":"M_UNRECOGNIZED"}`))
		return
	}
	var body struct {
		Events []struct {
			ID      string `json:"event_id"`
			Type    string `json:"type"`
			Content struct {
				Body string `json:"body"`
			} `json:"content"`
		} `json:"events"`
	}
	_ = json.NewDecoder(r.Body).Decode(&body)
	a.mu.Lock()
	defer a.mu.Unlock()
	for _, e := range body.Events {
		if first, ok := a.txnOf[e.ID]; ok {
			if first != txn {
				a.dups = append(a.dups, e.ID)
			}
			continue
		}
		a.txnOf[e.ID] = txn
		if e.Type == "m.room.message" {
			a.bodies = append(a.bodies, e.Content.Body)
		}
	}
	w.Write([]byte("{}"))
}

// TestKillBetweenLogAndHandOver SIGKILLs serve at the one moment the stub
// has an event in its log that the dispatcher has never seen (a fault
// point compiled in with the asdispatch_faults tag, not a sleep). The
// restarted serve hands it over before it listens: the AS gets every
// message once, in order (issue 16).
func TestKillBetweenLogAndHandOver(t *testing.T) {
	if testing.Short() {
		t.Skip("builds a binary: skipped in -short")
	}
	bin := buildFaultBinary(t)
	dir := t.TempDir()
	as := &onceAS{txnOf: map[string]string{}}
	srv := httptest.NewServer(as)
	t.Cleanup(srv.Close)
	reg := filepath.Join(dir, "all.yaml")
	os.WriteFile(reg, []byte(fmt.Sprintf("id: all\nurl: %s\nas_token: as-all\nhs_token: hs-all\nsender_localpart: all_bot\nnamespaces:\n  users: [{exclusive: false, regex: '@.*:localhost'}]\n", srv.URL)), 0o600)
	config := filepath.Join(dir, "homeserver.yaml")
	os.WriteFile(config, []byte(fmt.Sprintf("server_name: localhost\nlisten: 127.0.0.1:0\ndata_dir: %s\nlog_level: error\napp_service_config_files: [%s]\nappservice:\n  retry_initial: 20ms\n  retry_max: 200ms\n",
		filepath.Join(dir, "data"), reg)), 0o600)

	hs, cmd := startServeEnv(t, bin, config, "ASDISPATCH_FAULT=kill-before-handover:die-here")
	tok := call(t, "POST", hs+"/_matrix/client/v3/register", "", map[string]any{"username": "alice", "password": "pw"})["access_token"].(string)
	room := call(t, "POST", hs+"/_matrix/client/v3/createRoom", tok, map[string]any{})["room_id"].(string)
	sendURL := func(base, txn string) string {
		return base + "/_matrix/client/v3/rooms/" + url.PathEscape(room) + "/send/m.room.message/" + txn
	}
	call(t, "PUT", sendURL(hs, "t1"), tok, map[string]any{"msgtype": "m.text", "body": "one"})
	// The answer to this send races with the kill: the event is in the log
	// either way.
	js, _ := json.Marshal(map[string]any{"msgtype": "m.text", "body": "die-here"})
	req, _ := http.NewRequest("PUT", sendURL(hs, "t2"), bytes.NewReader(js))
	req.Header.Set("Authorization", "Bearer "+tok)
	if resp, err := (&http.Client{Timeout: 10 * time.Second}).Do(req); err == nil {
		resp.Body.Close()
	}
	err := cmd.Wait()
	var exit *exec.ExitError
	if !errors.As(err, &exit) || exit.Sys().(syscall.WaitStatus).Signal() != syscall.SIGKILL {
		t.Fatalf("serve ended with %v, want killed by SIGKILL at the fault point", err)
	}

	hs, _ = startServeEnv(t, bin, config)
	call(t, "PUT", sendURL(hs, "t3"), tok, map[string]any{"msgtype": "m.text", "body": "three"})
	want := []string{"one", "die-here", "three"}
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		as.mu.Lock()
		got, dups := slices.Clone(as.bodies), slices.Clone(as.dups)
		as.mu.Unlock()
		if len(dups) > 0 {
			t.Fatalf("events delivered again under another txnId: %v", dups)
		}
		if slices.Equal(got, want) {
			break
		}
		if len(got) > len(want) || time.Now().After(deadline) {
			t.Fatalf("the AS got %q, want %q", got, want)
		}
	}
}
