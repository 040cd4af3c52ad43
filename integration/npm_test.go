package integration

import (
	"bufio"
	"encoding/json"
	"fmt"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"
)

// TestMatrixAppserviceNode runs the npm package matrix-appservice 2.0.0 as
// the receiving AS. It reads ephemeral events only under
// "de.sorunome.msc2409.ephemeral" and silently drops bodies sent without
// Content-Type: application/json, so it catches both mistakes.
func TestMatrixAppserviceNode(t *testing.T) {
	if _, err := os.Stat("npm/node_modules/matrix-appservice"); err != nil {
		if os.Getenv("CI") != "" {
			t.Fatal("npm/node_modules is missing: .ci/run must run `npm ci` in integration/npm")
		}
		t.Skip("run `npm ci` in integration/npm to enable this test")
	}
	node, err := exec.LookPath("node")
	if err != nil {
		t.Skip("node is not installed")
	}
	bin := buildBinary(t)
	recv := exec.Command(node, "receiver.js")
	recv.Dir = "npm"
	recv.Env = append(os.Environ(), "HS_TOKEN=hs-npm")
	out, err := recv.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	recv.Stderr = os.Stderr
	if err := recv.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { recv.Process.Kill(); recv.Wait() })
	var mu sync.Mutex
	var events, ephemeral []map[string]any
	listening := make(chan string, 1)
	go func() {
		sc := bufio.NewScanner(out)
		for sc.Scan() {
			line := sc.Text()
			kind, rest, _ := strings.Cut(line, " ")
			var ev map[string]any
			json.Unmarshal([]byte(rest), &ev)
			mu.Lock()
			switch kind {
			case "LISTENING":
				listening <- rest
			case "EVENT":
				events = append(events, ev)
			case "EPHEMERAL":
				ephemeral = append(ephemeral, ev)
			}
			mu.Unlock()
		}
	}()
	var asURL string
	select {
	case asURL = <-listening:
	case <-time.After(30 * time.Second):
		t.Fatal("matrix-appservice did not start")
	}

	dir := t.TempDir()
	reg := filepath.Join(dir, "npm.yaml")
	os.WriteFile(reg, []byte(fmt.Sprintf(`id: npm
url: %s
as_token: as-npm
hs_token: hs-npm
sender_localpart: npmbot
de.sorunome.msc2409.push_ephemeral: true
namespaces:
  users: []
  aliases: [{exclusive: false, regex: "#npm_.*"}]
`, asURL)), 0o600)
	config := filepath.Join(dir, "homeserver.yaml")
	os.WriteFile(config, []byte(fmt.Sprintf("server_name: localhost\nlisten: 127.0.0.1:0\ndata_dir: %s\napp_service_config_files: [%s]\nappservice:\n  retry_initial: 50ms\n", filepath.Join(dir, "data"), reg)), 0o600)
	hs, _ := startServe(t, bin, config)

	tok := call(t, "POST", hs+"/_matrix/client/v3/register", "", map[string]any{"username": "alice", "password": "pw"})["access_token"].(string)
	room := call(t, "POST", hs+"/_matrix/client/v3/createRoom", tok, map[string]any{"room_alias_name": "npm_room"})["room_id"].(string)
	call(t, "PUT", hs+"/_matrix/client/v3/rooms/"+url.PathEscape(room)+"/send/m.room.message/1", tok, map[string]any{"msgtype": "m.text", "body": "hello node"})
	call(t, "PUT", hs+"/_matrix/client/v3/rooms/"+url.PathEscape(room)+"/typing/"+url.PathEscape("@alice:localhost"), tok, map[string]any{"typing": true, "timeout": 5000})

	deadline := time.Now().Add(20 * time.Second)
	for {
		mu.Lock()
		gotMsg, gotTyping := false, false
		for _, ev := range events {
			if c, _ := ev["content"].(map[string]any); ev["type"] == "m.room.message" && c["body"] == "hello node" {
				gotMsg = true
			}
		}
		for _, ev := range ephemeral {
			if ev["type"] == "m.typing" && ev["room_id"] == room {
				gotTyping = true
			}
		}
		mu.Unlock()
		if gotMsg && gotTyping {
			return
		}
		if time.Now().After(deadline) {
			mu.Lock()
			defer mu.Unlock()
			t.Fatalf("matrix-appservice got events %v, ephemeral %v", events, ephemeral)
		}
		time.Sleep(20 * time.Millisecond)
	}
}
