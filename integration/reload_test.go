package integration

import (
	"fmt"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"path/filepath"
	"sync"
	"syscall"
	"testing"
	"time"
)

// TestSighupReload changes a registration under a running serve: an invalid
// file is refused as a whole (the old set keeps running), a new url is used
// once the file is valid again.
func TestSighupReload(t *testing.T) {
	bin := buildBinary(t)
	var mu sync.Mutex
	got := map[string]int{}
	asServer := func(name string) *httptest.Server {
		s := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			mu.Lock()
			got[name]++
			mu.Unlock()
			w.Write([]byte("{}"))
		}))
		t.Cleanup(s.Close)
		return s
	}
	first, second := asServer("first"), asServer("second")
	dir := t.TempDir()
	reg := filepath.Join(dir, "reg.yaml")
	write := func(url string) {
		os.WriteFile(reg, []byte(fmt.Sprintf("id: r\nurl: %s\nas_token: as-r\nhs_token: hs-r\nsender_localpart: rbot\nnamespaces:\n  aliases: [{exclusive: false, regex: '#r_.*'}]\n", url)), 0o600)
	}
	write(first.URL)
	config := filepath.Join(dir, "homeserver.yaml")
	os.WriteFile(config, []byte(fmt.Sprintf("server_name: localhost\nlisten: 127.0.0.1:0\ndata_dir: %s\napp_service_config_files: [%s]\n", filepath.Join(dir, "data"), reg)), 0o600)
	hs, cmd := startServe(t, bin, config)
	tok := call(t, "POST", hs+"/_matrix/client/v3/register", "", map[string]any{"username": "alice", "password": "pw"})["access_token"].(string)
	room := call(t, "POST", hs+"/_matrix/client/v3/createRoom", tok, map[string]any{"room_alias_name": "r_room"})["room_id"].(string)
	send := func(txn string) {
		call(t, "PUT", hs+"/_matrix/client/v3/rooms/"+url.PathEscape(room)+"/send/m.room.message/"+txn, tok, map[string]any{"body": txn})
	}
	waitFor := func(name string, n int) {
		t.Helper()
		deadline := time.Now().Add(15 * time.Second)
		for {
			mu.Lock()
			c := got[name]
			mu.Unlock()
			if c >= n {
				return
			}
			if time.Now().After(deadline) {
				t.Fatalf("%s got %d transactions, want %d", name, c, n)
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
	send("1")
	waitFor("first", 1)

	os.WriteFile(reg, []byte("id: r|broken\n"), 0o600)
	cmd.Process.Signal(syscall.SIGHUP)
	time.Sleep(300 * time.Millisecond)
	mu.Lock()
	before := got["first"]
	mu.Unlock()
	send("2")
	waitFor("first", before+1) // the old set still runs

	write(second.URL)
	cmd.Process.Signal(syscall.SIGHUP)
	// The reload is asynchronous: keep talking until the new url hears.
	deadline := time.Now().Add(15 * time.Second)
	for i := 3; ; i++ {
		send(fmt.Sprint(i))
		mu.Lock()
		n := got["second"]
		mu.Unlock()
		if n > 0 {
			return
		}
		if time.Now().After(deadline) {
			t.Fatal("the new url never got a transaction after SIGHUP")
		}
		time.Sleep(100 * time.Millisecond)
	}
}
