package integration

import (
	"bufio"
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// buildBinary builds cmd/asdispatch once per test into a temp dir.
func buildBinary(t *testing.T) string {
	t.Helper()
	bin := filepath.Join(t.TempDir(), "asdispatch")
	cmd := exec.Command("go", "build", "-o", bin, "./cmd/asdispatch")
	cmd.Dir = ".."
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	return bin
}

// startServe runs `asdispatch serve --config` and returns the base URL it
// prints.
func startServe(t *testing.T, bin, config string) (string, *exec.Cmd) {
	t.Helper()
	hs, _, cmd := startServeAdmin(t, bin, config)
	return hs, cmd
}

// startServeAdmin is startServe that also returns the admin listener's URL
// (the operator endpoints and /metrics).
func startServeAdmin(t *testing.T, bin, config string) (hs, admin string, cmd *exec.Cmd) {
	t.Helper()
	cmd = exec.Command(bin, "serve", "--config", config)
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
	addr, adminAddr := make(chan string, 1), make(chan string, 1)
	go func() {
		for lines.Scan() {
			if a, ok := strings.CutPrefix(lines.Text(), "listening on "); ok {
				addr <- a
			} else if a, ok := strings.CutPrefix(lines.Text(), "admin listening on "); ok {
				adminAddr <- a
			}
		}
	}()
	timeout := time.After(30 * time.Second)
	for hs == "" || admin == "" {
		select {
		case hs = <-addr:
		case admin = <-adminAddr:
		case <-timeout:
			t.Fatal("serve did not print its listening lines")
		}
	}
	return hs, admin, cmd
}

func call(t *testing.T, method, u, token string, body any) map[string]any {
	t.Helper()
	var rd io.Reader
	if body != nil {
		js, _ := json.Marshal(body)
		rd = bytes.NewReader(js)
	}
	req, _ := http.NewRequest(method, u, rd)
	if token != "" {
		req.Header.Set("Authorization", "Bearer "+token)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var out map[string]any
	json.NewDecoder(resp.Body).Decode(&out)
	if resp.StatusCode != 200 {
		t.Fatalf("%s %s: %d %v", method, u, resp.StatusCode, out)
	}
	return out
}

// TestSeedWalkthrough runs the seed's walkthrough against the built binary:
// a logging AS for #logged_* rooms, messages delivered, and a join of a
// room that does not exist until the AS creates it from the alias query.
func TestSeedWalkthrough(t *testing.T) {
	bin := buildBinary(t)
	var mu sync.Mutex
	var hsURL string
	bodies := map[string]bool{}
	as := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Header.Get("Authorization") != "Bearer hs-logging" || (r.Method == "PUT" && r.Header.Get("Content-Type") != "application/json") {
			w.WriteHeader(403)
			return
		}
		switch {
		case strings.HasPrefix(r.URL.Path, "/_matrix/app/v1/transactions/"):
			var txn struct {
				Events []struct {
					Content struct{ Body string } `json:"content"`
				} `json:"events"`
			}
			json.NewDecoder(r.Body).Decode(&txn)
			mu.Lock()
			for _, e := range txn.Events {
				bodies[e.Content.Body] = true
			}
			mu.Unlock()
			w.Write([]byte("{}"))
		case strings.HasPrefix(r.URL.Path, "/_matrix/app/v1/rooms/"):
			alias := strings.TrimPrefix(r.URL.Path, "/_matrix/app/v1/rooms/")
			local := strings.TrimPrefix(strings.SplitN(alias, ":", 2)[0], "#")
			mu.Lock()
			u := hsURL
			mu.Unlock()
			call(t, "POST", u+"/_matrix/client/v3/createRoom", "as-logging", map[string]any{"room_alias_name": local, "preset": "public_chat"})
			w.Write([]byte("{}"))
		default:
			w.WriteHeader(404)
		}
	}))
	defer as.Close()
	dir := t.TempDir()
	reg := filepath.Join(dir, "registration.yaml")
	os.WriteFile(reg, []byte(fmt.Sprintf(`id: "something-good"
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
`, as.URL)), 0o600)
	config := filepath.Join(dir, "homeserver.yaml")
	os.WriteFile(config, []byte(fmt.Sprintf("server_name: localhost\nlisten: 127.0.0.1:0\ndata_dir: %s\napp_service_config_files:\n  - %s\nappservice:\n  retry_initial: 100ms\n", filepath.Join(dir, "data"), reg)), 0o600)

	addr, admin, cmd := startServeAdmin(t, bin, config)
	hs := addr
	mu.Lock()
	hsURL = hs
	mu.Unlock()

	tok := call(t, "POST", hs+"/_matrix/client/v3/register", "", map[string]any{"username": "alice", "password": "pw"})["access_token"].(string)
	room := call(t, "POST", hs+"/_matrix/client/v3/createRoom", tok, map[string]any{"room_alias_name": "logged_test"})["room_id"].(string)
	call(t, "PUT", hs+"/_matrix/client/v3/rooms/"+url.PathEscape(room)+"/send/m.room.message/1", tok, map[string]any{"msgtype": "m.text", "body": "first"})
	lazy := call(t, "POST", hs+"/_matrix/client/v3/join/"+url.PathEscape("#logged_test2:localhost"), tok, nil)["room_id"].(string)
	call(t, "PUT", hs+"/_matrix/client/v3/rooms/"+url.PathEscape(lazy)+"/send/m.room.message/2", tok, map[string]any{"msgtype": "m.text", "body": "second"})

	deadline := time.Now().Add(20 * time.Second)
	for {
		mu.Lock()
		done := bodies["first"] && bodies["second"]
		mu.Unlock()
		if done {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the AS got %v", bodies)
		}
		time.Sleep(20 * time.Millisecond)
	}
	status := call(t, "GET", admin+"/_asdispatch/v1/appservices", "", nil)
	if s := fmt.Sprint(status); !strings.Contains(s, "something-good") || strings.Contains(s, "hs-logging") {
		t.Errorf("admin status %s", s)
	}
	cmd.Process.Signal(syscall.SIGTERM)
	errc := make(chan error, 1)
	go func() { errc <- cmd.Wait() }()
	select {
	case err := <-errc:
		if err != nil {
			t.Errorf("serve did not exit cleanly on SIGTERM: %v", err)
		}
	case <-time.After(15 * time.Second):
		t.Error("serve did not stop within 15s of SIGTERM")
	}
}
