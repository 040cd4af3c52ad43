package integration

import (
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

// keysAS is an AS with end-to-bridge encryption (MSC3202, to-device) that
// answers 503 while down and records what it accepted, once per txnId.
type keysAS struct {
	token string
	down  atomic.Bool

	mu       sync.Mutex
	seen     map[string]bool
	toDevice map[string]int            // content.n -> times received
	changed  []string                  // device_lists.changed, in order of receipt
	left     []string                  // device_lists.left
	counts   map[string]map[string]int // "user|device" -> latest counts
	bodies   []string
}

func (a *keysAS) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	txn, ok := strings.CutPrefix(r.URL.Path, "/_matrix/app/v1/transactions/")
	if !ok || r.Method != http.MethodPut || r.Header.Get("Authorization") != "Bearer "+a.token {
		w.WriteHeader(http.StatusNotFound)
		w.Write([]byte(`{"errcode":"M_UNRECOGNIZED"}`))
		return
	}
	if a.down.Load() {
		w.WriteHeader(http.StatusServiceUnavailable)
		return
	}
	raw, _ := io.ReadAll(r.Body)
	var body struct {
		ToDevice []struct {
			Type     string `json:"type"`
			ToDevice string `json:"to_device_id"`
			Content  struct {
				N string `json:"n"`
			} `json:"content"`
		} `json:"de.sorunome.msc2409.to_device"`
		DeviceLists *struct{ Changed, Left []string }    `json:"org.matrix.msc3202.device_lists"`
		OTK         map[string]map[string]map[string]int `json:"org.matrix.msc3202.device_one_time_keys_count"`
	}
	if err := json.Unmarshal(raw, &body); err != nil {
		w.WriteHeader(http.StatusBadRequest)
		return
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.seen[txn] {
		w.Write([]byte("{}"))
		return
	}
	a.seen[txn] = true
	a.bodies = append(a.bodies, string(raw))
	for _, m := range body.ToDevice {
		a.toDevice[m.ToDevice+"/"+m.Content.N]++
	}
	if dl := body.DeviceLists; dl != nil {
		a.changed = append(a.changed, dl.Changed...)
		a.left = append(a.left, dl.Left...)
	}
	for u, devs := range body.OTK {
		for d, c := range devs {
			a.counts[u+"|"+d] = c
		}
	}
	w.Write([]byte("{}"))
}

// TestKeysSurviveKillNine: while an encrypted bridge is down, device list
// changes, one-time key counts and to-device messages pile up; the stub is
// killed with SIGKILL and restarted; once the bridge is up it gets every
// to-device message once, the changes, and the latest counts.
func TestKeysSurviveKillNine(t *testing.T) {
	bin := buildBinary(t)
	dir := t.TempDir()
	as := &keysAS{token: "hs-bridge", seen: map[string]bool{}, toDevice: map[string]int{}, counts: map[string]map[string]int{}}
	srv := httptest.NewServer(as)
	t.Cleanup(srv.Close)
	reg := filepath.Join(dir, "bridge.yaml")
	os.WriteFile(reg, []byte(fmt.Sprintf(`id: bridge
url: %s
as_token: as-bridge
hs_token: %s
sender_localpart: br_bot
receive_ephemeral: true
org.matrix.msc3202: true
io.element.msc4190: true
namespaces:
  users: [{exclusive: true, regex: '@br_.*:localhost'}]
`, srv.URL, as.token)), 0o600)
	config := filepath.Join(dir, "homeserver.yaml")
	os.WriteFile(config, []byte(fmt.Sprintf("server_name: localhost\nlisten: 127.0.0.1:0\ndata_dir: %s\nlog_level: error\napp_service_config_files: [%s]\nappservice:\n  retry_initial: 20ms\n  retry_max: 200ms\n",
		filepath.Join(dir, "data"), reg)), 0o600)
	hs, cmd := startServe(t, bin, config)

	const ghost, ghostDev = "@br_1:localhost", "BRDEV"
	asGhost := func(path string) string {
		sep := "?"
		if strings.Contains(path, "?") {
			sep = "&"
		}
		return hs + path + sep + "user_id=" + url.QueryEscape(ghost)
	}
	call(t, "POST", hs+"/_matrix/client/v3/register", "as-bridge", map[string]any{"type": "m.login.application_service", "username": "br_1"})
	// MSC4190: the bridge creates its device (201 Created).
	js, _ := json.Marshal(map[string]any{"display_name": "bridge"})
	req, _ := http.NewRequest(http.MethodPut, asGhost("/_matrix/client/v3/devices/"+ghostDev), strings.NewReader(string(js)))
	req.Header.Set("Authorization", "Bearer as-bridge")
	if resp, err := http.DefaultClient.Do(req); err != nil || resp.StatusCode/100 != 2 {
		t.Fatalf("create the bridge's device: %v %v", resp, err)
	} else {
		resp.Body.Close()
	}
	withDev := func(path string) string { return asGhost(path) + "&device_id=" + ghostDev }
	register := func(name string) (token, device string) {
		r := call(t, "POST", hs+"/_matrix/client/v3/register", "", map[string]any{"username": name, "password": "pw", "auth": map[string]any{"type": "m.login.dummy"}})
		return r["access_token"].(string), r["device_id"].(string)
	}
	alice, aliceDev := register("alice")
	carol, _ := register("carol")
	room := call(t, "POST", hs+"/_matrix/client/v3/createRoom", alice, map[string]any{"preset": "public_chat", "invite": []string{ghost}})["room_id"].(string)
	roomPath := "/_matrix/client/v3/rooms/" + url.PathEscape(room)
	call(t, "POST", asGhost(roomPath+"/join"), "as-bridge", map[string]any{})
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		as.mu.Lock()
		n := len(as.seen)
		as.mu.Unlock()
		if n > 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the bridge got no transaction")
		}
	}

	as.down.Store(true)
	otks := func(from, n int) map[string]any {
		keys := map[string]any{}
		for i := from; i < from+n; i++ {
			keys[fmt.Sprintf("signed_curve25519:K%d", i)] = map[string]any{"key": fmt.Sprintf("key%d", i), "signatures": map[string]any{}}
		}
		return keys
	}
	// Key counts: 5, then 8, then a claim leaves 7.
	call(t, "POST", withDev("/_matrix/client/v3/keys/upload"), "as-bridge", map[string]any{"one_time_keys": otks(0, 5)})
	call(t, "POST", withDev("/_matrix/client/v3/keys/upload"), "as-bridge", map[string]any{"one_time_keys": otks(5, 3)})
	call(t, "POST", hs+"/_matrix/client/v3/keys/claim", alice, map[string]any{"one_time_keys": map[string]any{ghost: map[string]string{ghostDev: "signed_curve25519"}}})
	// Device lists: alice's new keys (changed); carol joins and leaves
	// (left, her latest news).
	call(t, "POST", hs+"/_matrix/client/v3/keys/upload", alice, map[string]any{"device_keys": map[string]any{
		"user_id": "@alice:localhost", "device_id": aliceDev, "algorithms": []string{"m.olm.v1.curve25519-aes-sha2"},
		"keys": map[string]string{"curve25519:" + aliceDev: "c", "ed25519:" + aliceDev: "e"}, "signatures": map[string]any{}}})
	call(t, "POST", hs+roomPath+"/join", carol, map[string]any{})
	call(t, "POST", hs+roomPath+"/leave", carol, map[string]any{})
	// To-device: three to the bridge's device, one to all its devices.
	for i, dev := range []string{ghostDev, ghostDev, ghostDev, "*"} {
		call(t, "PUT", fmt.Sprintf("%s/_matrix/client/v3/sendToDevice/m.room.encrypted/td%d", hs, i), alice,
			map[string]any{"messages": map[string]any{ghost: map[string]any{dev: map[string]any{"n": fmt.Sprint(i)}}}})
	}

	cmd.Process.Signal(syscall.SIGKILL)
	cmd.Wait()
	hs, cmd = startServe(t, bin, config)
	_ = hs
	as.down.Store(false)

	want := []string{ghostDev + "/0", ghostDev + "/1", ghostDev + "/2", ghostDev + "/3"}
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		as.mu.Lock()
		if len(as.toDevice) >= len(want) && slices.Contains(as.left, "@carol:localhost") &&
			as.counts[ghost+"|"+ghostDev]["signed_curve25519"] == 7 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("timed out: to-device %v, changed %v, left %v, counts %v; bodies:\n%s",
				as.toDevice, as.changed, as.left, as.counts, strings.Join(as.bodies, "\n"))
		}
		as.mu.Unlock()
	}
	defer as.mu.Unlock()
	for _, m := range want {
		if as.toDevice[m] != 1 {
			t.Errorf("to-device %s received %d times, want once (all: %v)", m, as.toDevice[m], as.toDevice)
		}
	}
	for m, n := range as.toDevice { // "*" also reached the device /register made
		if n != 1 || (!slices.Contains(want, m) && !strings.HasSuffix(m, "/3")) {
			t.Errorf("to-device %s received %d times, want only the messages sent, once", m, n)
		}
	}
	if !slices.Contains(as.changed, "@alice:localhost") {
		t.Errorf("device_lists.changed %v lacks alice, whose keys changed", as.changed)
	}
	t.Logf("bodies:\n%s", strings.Join(as.bodies, "\n"))
}
