package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"go.uber.org/zap"
)

// The seed's registration, pointing at the in-process logging AS.
const demoRegistration = `id: "something-good"
url: %q
as_token: wfghWEGh3wgWHEf3478sHFWE
hs_token: ugw8243igya57aaABGFfgeyu
sender_localpart: logging
namespaces:
  users: []
  rooms: []
  aliases:
    - exclusive: false
      regex: "#logged_.*"
`

// loggingAS is the seed's Flask app: it prints every event it is pushed and
// creates #logged_* rooms lazily when the homeserver asks for them.
type loggingAS struct {
	out     io.Writer
	hsURL   string
	asToken string
	hsToken string
	mu      sync.Mutex
	seen    map[string]bool // event bodies received
	txns    map[string]bool
}

func (a *loggingAS) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if r.Header.Get("Authorization") != "Bearer "+a.hsToken {
		w.WriteHeader(http.StatusForbidden)
		w.Write([]byte(`{"errcode":"M_FORBIDDEN"}`))
		return
	}
	switch {
	case r.Method == http.MethodPut && strings.HasPrefix(r.URL.Path, "/_matrix/app/v1/transactions/"):
		var txn struct {
			Events []struct {
				Sender  string          `json:"sender"`
				RoomID  string          `json:"room_id"`
				Type    string          `json:"type"`
				Content json.RawMessage `json:"content"`
			} `json:"events"`
		}
		json.NewDecoder(r.Body).Decode(&txn)
		a.mu.Lock()
		if !a.txns[r.URL.Path] {
			a.txns[r.URL.Path] = true
			for _, e := range txn.Events {
				fmt.Fprintf(a.out, "    [AS] User: %s Room: %s\n    [AS] Event Type: %s\n    [AS] Content: %s\n", e.Sender, e.RoomID, e.Type, e.Content)
				var c struct {
					Body string `json:"body"`
				}
				json.Unmarshal(e.Content, &c)
				if c.Body != "" {
					a.seen[c.Body] = true
				}
			}
		}
		a.mu.Unlock()
		w.Write([]byte("{}"))
	case r.Method == http.MethodGet && strings.HasPrefix(r.URL.Path, "/_matrix/app/v1/rooms/"):
		alias := strings.TrimPrefix(r.URL.Path, "/_matrix/app/v1/rooms/")
		localpart := strings.TrimPrefix(strings.SplitN(alias, ":", 2)[0], "#")
		fmt.Fprintf(a.out, "    [AS] the homeserver asks about %s: creating it\n", alias)
		a.mu.Lock()
		hs := a.hsURL
		a.mu.Unlock()
		_, err := call(http.MethodPost, hs+"/_matrix/client/v3/createRoom", a.asToken, map[string]any{"room_alias_name": localpart, "preset": "public_chat"})
		if err != nil {
			fmt.Fprintf(a.out, "    [AS] creating %s failed: %v\n", alias, err)
			w.WriteHeader(http.StatusInternalServerError)
			return
		}
		w.Write([]byte("{}"))
	default:
		w.WriteHeader(http.StatusNotFound)
		w.Write([]byte(`{"errcode":"M_NOT_FOUND"}`))
	}
}

func (a *loggingAS) received(body string) bool {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.seen[body]
}

// call makes one client-server API request and decodes the answer.
func call(method, url, token string, body any) (map[string]any, error) {
	var rd io.Reader
	if body != nil {
		js, _ := json.Marshal(body)
		rd = bytes.NewReader(js)
	}
	req, err := http.NewRequest(method, url, rd)
	if err != nil {
		return nil, err
	}
	if token != "" {
		req.Header.Set("Authorization", "Bearer "+token)
	}
	req.Header.Set("Content-Type", "application/json")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	var out map[string]any
	json.NewDecoder(resp.Body).Decode(&out)
	if resp.StatusCode != http.StatusOK {
		return out, fmt.Errorf("%s %s: %d %v", method, url, resp.StatusCode, out)
	}
	return out, nil
}

func runDemo(args []string, stdout, stderr io.Writer) int {
	if len(args) > 0 {
		fmt.Fprintln(stderr, "usage: asdispatch demo (no arguments)")
		return 2
	}
	// The AS prints from its own goroutines: one lock for all output.
	stdout = &syncWriter{w: stdout}
	step := func(format string, a ...any) { fmt.Fprintf(stdout, "==> "+format+"\n", a...) }
	fail := func(what string, err error) int {
		fmt.Fprintf(stderr, "demo failed at step %q: %v\n", what, err)
		return 1
	}
	dir, err := os.MkdirTemp("", "asdispatch-demo-")
	if err != nil {
		return fail("make a temporary data dir", err)
	}
	defer os.RemoveAll(dir)

	asLn, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return fail("start the logging AS", err)
	}
	as := &loggingAS{out: stdout, asToken: "wfghWEGh3wgWHEf3478sHFWE", hsToken: "ugw8243igya57aaABGFfgeyu", seen: map[string]bool{}, txns: map[string]bool{}}
	asSrv := &http.Server{Handler: as}
	go asSrv.Serve(asLn)
	defer func() {
		// Let handlers in flight finish their output before returning.
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		asSrv.Shutdown(ctx)
	}()
	regPath := filepath.Join(dir, "registration.yaml")
	if err := os.WriteFile(regPath, []byte(fmt.Sprintf(demoRegistration, "http://"+asLn.Addr().String())), 0o600); err != nil {
		return fail("write the registration", err)
	}
	step("The logging application service listens on http://%s; its registration is the seed's (aliases #logged_.*)", asLn.Addr())

	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	ready := make(chan string, 1)
	done := make(chan error, 1)
	cfg := serveConfig{ServerName: "localhost", Listen: "127.0.0.1:0", DataDir: filepath.Join(dir, "data"), AppServiceConfigFiles: []string{regPath}}
	cfg.AppService.RetryInitial = 200 * time.Millisecond
	go func() { done <- serve(ctx, cfg, zap.NewNop(), io.Discard, ready) }()
	var hs string
	select {
	case addr := <-ready:
		hs = "http://" + addr
	case err := <-done:
		return fail("start the homeserver", err)
	}
	defer func() { cancel(); <-done }()
	as.mu.Lock()
	as.hsURL = hs
	as.mu.Unlock()
	step("The stub homeserver listens on %s", hs)

	reg, err := call(http.MethodPost, hs+"/_matrix/client/v3/register", "", map[string]any{"username": "alice", "password": "demo-password"})
	if err != nil {
		return fail("register @alice", err)
	}
	tok := reg["access_token"].(string)
	step("Registered %s", reg["user_id"])

	room, err := call(http.MethodPost, hs+"/_matrix/client/v3/createRoom", tok, map[string]any{"room_alias_name": "logged_test", "name": "Logged"})
	if err != nil {
		return fail("create #logged_test", err)
	}
	roomID := room["room_id"].(string)
	step("Created #logged_test:localhost (%s); the AS is interested because of the alias", roomID)

	wait := func(body string) error {
		deadline := time.Now().Add(15 * time.Second)
		for !as.received(body) {
			if time.Now().After(deadline) {
				return fmt.Errorf("the AS did not receive %q within 15s", body)
			}
			time.Sleep(20 * time.Millisecond)
		}
		return nil
	}
	for i, body := range []string{"Hello, logging bot!", "Is anyone logging this?"} {
		step("Alice says %q", body)
		path := fmt.Sprintf("%s/_matrix/client/v3/rooms/%s/send/m.room.message/demo%d", hs, url.PathEscape(roomID), i)
		if _, err := call(http.MethodPut, path, tok, map[string]any{"msgtype": "m.text", "body": body}); err != nil {
			return fail("send a message", err)
		}
		if err := wait(body); err != nil {
			return fail("deliver the message to the AS", err)
		}
	}

	step("Alice joins #logged_test2:localhost, which does not exist yet")
	joined, err := call(http.MethodPost, hs+"/_matrix/client/v3/join/"+url.PathEscape("#logged_test2:localhost"), tok, nil)
	if err != nil {
		return fail("join #logged_test2 (the AS creates it from the alias query)", err)
	}
	step("The join succeeded: the AS created %s on the spot", joined["room_id"])
	body := "Hello from the lazily created room!"
	path := fmt.Sprintf("%s/_matrix/client/v3/rooms/%s/send/m.room.message/demo-lazy", hs, url.PathEscape(joined["room_id"].(string)))
	if _, err := call(http.MethodPut, path, tok, map[string]any{"msgtype": "m.text", "body": body}); err != nil {
		return fail("send in the new room", err)
	}
	if err := wait(body); err != nil {
		return fail("deliver the message in the new room", err)
	}
	step("Done: every message reached the logging AS")
	return 0
}

// syncWriter serializes writes from several goroutines.
type syncWriter struct {
	mu sync.Mutex
	w  io.Writer
}

func (s *syncWriter) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.w.Write(p)
}
