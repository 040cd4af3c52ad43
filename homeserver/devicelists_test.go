package homeserver

import (
	"encoding/json"
	"io"
	"net/http"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"
)

// TestMembershipFeedsDeviceLists: the stub hands membership changes to the
// dispatcher as device list news for an MSC3202 AS: a join of a room with
// its user is "changed", the leave that ends the last shared room is
// "left", an invite is neither; key uploads of the AS's users bring counts.
func TestMembershipFeedsDeviceLists(t *testing.T) {
	var mu sync.Mutex
	var changed, left, counts []string
	as := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if !strings.Contains(r.URL.Path, "/transactions/") {
			w.WriteHeader(404)
			return
		}
		raw, _ := io.ReadAll(r.Body)
		var body struct {
			DL *struct {
				Changed, Left []string
			} `json:"org.matrix.msc3202.device_lists"`
			OTK map[string]map[string]map[string]int `json:"org.matrix.msc3202.device_one_time_keys_count"`
		}
		if err := json.Unmarshal(raw, &body); err != nil {
			t.Errorf("body %s: %v", raw, err)
		}
		mu.Lock()
		if body.DL != nil {
			changed = append(changed, body.DL.Changed...)
			left = append(left, body.DL.Left...)
		}
		for u, devs := range body.OTK {
			for d, c := range devs {
				counts = append(counts, u+"/"+d+"="+strings.Repeat("k", c["signed_curve25519"]))
			}
		}
		mu.Unlock()
		w.Write([]byte("{}"))
	})
	e := startWith(t, t.TempDir(), as, bridgeReg+"org.matrix.msc3202: true\n", Config{})
	alice, bob := e.register("alice"), e.register("bob")
	e.register("carol")
	st, out := e.do("POST", "/_matrix/client/v3/register", "as-bridge", map[string]any{"type": "m.login.application_service", "username": "br_1"})
	ghostDev, _ := out["device_id"].(string)
	if st != 200 || ghostDev == "" {
		t.Fatalf("register the ghost: %d %v", st, out)
	}
	roomID := e.createRoom(alice, map[string]any{"preset": "public_chat"})
	for _, step := range []struct {
		token, path string
	}{
		{"as-bridge", room(roomID) + "/join?user_id=@br_1:hs"},
		{bob, room(roomID) + "/join"},
		{alice, room(roomID) + "/invite"},
		{bob, room(roomID) + "/leave"},
		{"as-bridge", "/_matrix/client/v3/keys/upload?user_id=@br_1:hs&device_id=" + ghostDev},
	} {
		var body any = map[string]any{}
		if strings.HasSuffix(step.path, "/invite") {
			body = map[string]any{"user_id": "@carol:hs"}
		}
		if strings.Contains(step.path, "/keys/upload") {
			body = map[string]any{"one_time_keys": map[string]any{"signed_curve25519:A": signedKey("a"), "signed_curve25519:B": signedKey("b")}}
		}
		if st, out := e.do("POST", step.path, step.token, body); st != 200 {
			t.Fatalf("POST %s: %d %v", step.path, st, out)
		}
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		mu.Lock()
		done := slices.Contains(left, "@bob:hs") && len(counts) > 0
		c, l, k := slices.Clone(changed), slices.Clone(left), slices.Clone(counts)
		mu.Unlock()
		if done {
			if !slices.Contains(c, "@bob:hs") || !slices.Contains(c, "@alice:hs") || slices.Contains(c, "@carol:hs") || slices.Contains(l, "@carol:hs") || slices.Contains(l, "@alice:hs") {
				t.Errorf("changed %v, left %v: want alice and bob changed, bob left, carol (only invited) in neither", c, l)
			}
			if !strings.HasSuffix(k[len(k)-1], "=kk") {
				t.Errorf("counts %v, want 2 keys last", k)
			}
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("timed out: changed %v, left %v, counts %v", c, l, k)
		}
		time.Sleep(10 * time.Millisecond)
	}
}
