package homeserver

import (
	"context"
	"database/sql"
	"encoding/json"
	"net/http"
	"net/url"
	"path/filepath"
	"reflect"
	"sync"
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zaptest"
	"go.uber.org/zap/zaptest/observer"
)

// device is the device ID of a token.
func (e *env) device(tok string) string {
	e.t.Helper()
	_, out := e.do("GET", "/_matrix/client/v3/account/whoami", tok, nil)
	d, _ := out["device_id"].(string)
	if d == "" {
		e.t.Fatalf("no device for token: %v", out)
	}
	return d
}

func deviceKeys(userID, deviceID, curve string) map[string]any {
	return map[string]any{
		"user_id": userID, "device_id": deviceID,
		"algorithms": []string{"m.olm.v1.curve25519-aes-sha2", "m.megolm.v1.aes-sha2"},
		"keys":       map[string]string{"curve25519:" + deviceID: curve, "ed25519:" + deviceID: "ed-" + deviceID},
		"signatures": map[string]any{userID: map[string]string{"ed25519:" + deviceID: "sig"}},
	}
}

func signedKey(k string) map[string]any {
	return map[string]any{"key": k, "signatures": map[string]any{"@x:hs": map[string]string{"ed25519:X": "s"}}}
}

var keysPath = "/_matrix/client/v3/keys/"

// TestDevicesMSC4190 covers device creation and deletion by an AS without
// user-interactive auth, device masquerading and a user's password stage.
func TestDevicesMSC4190(t *testing.T) {
	e := start(t, t.TempDir(), notFoundAS())
	asGhost := e.ghost("br_ghost")
	alice := e.register("alice")
	aliceDev := e.device(alice)
	devs := "/_matrix/client/v3/devices"
	e.run(t, []call{
		{"AS creates a device for its user", "PUT", devs + "/BRDEV" + asGhost, "as-bridge", map[string]any{"display_name": "bridge"}, 201, ""},
		{"AS renames it", "PUT", devs + "/BRDEV" + asGhost, "as-bridge", map[string]any{"display_name": "bridge 2"}, 200, ""},
		{"AS creates a device for its sender", "PUT", devs + "/BOTDEV", "as-bridge", nil, 201, ""},
		{"a user cannot create a device", "PUT", devs + "/NEW", alice, nil, 404, "M_NOT_FOUND"},
		{"AS gets it", "GET", devs + "/BRDEV" + asGhost, "as-bridge", nil, 200, ""},
		{"masquerade as the device", "GET", "/_matrix/client/v3/account/whoami" + asGhost + "&device_id=BRDEV", "as-bridge", nil, 200, ""},
		{"masquerade, unstable name", "GET", "/_matrix/client/v3/account/whoami" + asGhost + "&org.matrix.msc3202.device_id=BRDEV", "as-bridge", nil, 200, ""},
		{"masquerade as another user's device", "GET", "/_matrix/client/v3/account/whoami" + asGhost + "&device_id=BOTDEV", "as-bridge", nil, 400, "M_UNKNOWN_DEVICE"},
		{"masquerade as no device", "GET", "/_matrix/client/v3/account/whoami" + asGhost + "&device_id=NOPE", "as-bridge", nil, 400, "M_UNKNOWN_DEVICE"},
		{"AS deletes without UIA", "DELETE", devs + "/BRDEV" + asGhost, "as-bridge", nil, 200, ""},
		{"deleted", "DELETE", devs + "/BRDEV" + asGhost, "as-bridge", nil, 404, "M_NOT_FOUND"},
		{"device gone for masquerading", "GET", "/_matrix/client/v3/account/whoami" + asGhost + "&device_id=BRDEV", "as-bridge", nil, 400, "M_UNKNOWN_DEVICE"},
		{"delete_devices needs devices", "POST", "/_matrix/client/v3/delete_devices", "as-bridge", map[string]any{}, 400, "M_MISSING_PARAM"},
		{"AS delete_devices without UIA", "POST", "/_matrix/client/v3/delete_devices", "as-bridge", map[string]any{"devices": []string{"BOTDEV", "UNKNOWN"}}, 200, ""},
		{"a user deletes an unknown device", "DELETE", devs + "/NOPE", alice, nil, 404, "M_NOT_FOUND"},
	})
	var ds struct {
		Devices []respDevice `json:"devices"`
	}
	e.get("GET", devs, "as-bridge", nil, &ds)
	if len(ds.Devices) != 0 {
		t.Errorf("bot devices after delete_devices: %+v", ds.Devices)
	}

	// A user goes through the password stage.
	status, ch := e.do("DELETE", devs+"/"+aliceDev, alice, nil)
	session, _ := ch["session"].(string)
	if status != 401 || session == "" || ch["flows"] == nil || ch["errcode"] != nil {
		t.Fatalf("challenge: %d %v", status, ch)
	}
	pw := func(p string) map[string]any {
		return map[string]any{"auth": map[string]any{"type": "m.login.password", "session": session, "password": p,
			"identifier": map[string]any{"type": "m.id.user", "user": "alice"}}}
	}
	e.run(t, []call{
		{"wrong password", "DELETE", devs + "/" + aliceDev, alice, pw("wrong"), 401, "M_FORBIDDEN"},
		{"unknown session", "DELETE", devs + "/" + aliceDev, alice, map[string]any{"auth": map[string]any{"type": "m.login.password", "session": "made-up", "password": "pw-alice"}}, 401, ""},
		{"right password", "DELETE", devs + "/" + aliceDev, alice, pw("pw-alice"), 200, ""},
		{"token of the deleted device", "GET", "/_matrix/client/v3/account/whoami", alice, nil, 401, "M_UNKNOWN_TOKEN"},
	})
}

// keyObserver records what the homeserver reports.
type keyObserver struct {
	mu     sync.Mutex
	lists  []string // "user rooms..."
	counts []KeyCounts
}

func (o *keyObserver) DeviceListChanged(_ context.Context, userID string, pos int64, rooms []string) error {
	o.mu.Lock()
	defer o.mu.Unlock()
	o.lists = append(o.lists, userID+" "+string(mustJSON(rooms)))
	return nil
}

func (o *keyObserver) KeyCountsChanged(_ context.Context, kc KeyCounts) error {
	o.mu.Lock()
	defer o.mu.Unlock()
	o.counts = append(o.counts, kc)
	return nil
}

func mustJSON(v any) []byte {
	js, _ := json.Marshal(v)
	return js
}

func TestKeysUploadQueryClaim(t *testing.T) {
	obs := &keyObserver{}
	e := startWith(t, t.TempDir(), notFoundAS(), bridgeReg, Config{Keys: obs})
	alice, bob := e.register("alice"), e.register("bob")
	aDev := e.device(alice)
	e.do("PUT", "/_matrix/client/v3/devices/"+aDev, alice, map[string]any{"display_name": "alice's phone"})
	roomID := e.createRoom(alice, map[string]any{"invite": []string{"@bob:hs"}})
	e.do("POST", room(roomID)+"/join", bob, nil)
	obs.mu.Lock()
	obs.lists = nil
	obs.mu.Unlock()

	upload := map[string]any{
		"device_keys":   deviceKeys("@alice:hs", aDev, "curveA"),
		"one_time_keys": map[string]any{"signed_curve25519:AAAA": signedKey("otk1"), "signed_curve25519:AAAB": signedKey("otk2")},
		"fallback_keys": map[string]any{"signed_curve25519:FFFF": map[string]any{"key": "fb1", "fallback": true}},
	}
	var up respUploadKeys
	if st := e.get("POST", keysPath+"upload", alice, upload, &up); st != 200 || up.Counts["signed_curve25519"] != 2 {
		t.Fatalf("upload: %d %+v", st, up)
	}
	e.run(t, []call{
		{"same upload again", "POST", keysPath + "upload", alice, upload, 200, ""},
		{"keys of another device", "POST", keysPath + "upload", alice, map[string]any{"device_keys": deviceKeys("@alice:hs", "OTHER", "c")}, 400, "M_INVALID_PARAM"},
		{"keys of another user", "POST", keysPath + "upload", alice, map[string]any{"device_keys": deviceKeys("@bob:hs", aDev, "c")}, 400, "M_INVALID_PARAM"},
		{"a key ID with other content", "POST", keysPath + "upload", alice, map[string]any{"one_time_keys": map[string]any{"signed_curve25519:AAAA": signedKey("other")}}, 400, "M_INVALID_PARAM"},
		{"a key ID without algorithm", "POST", keysPath + "upload", alice, map[string]any{"one_time_keys": map[string]any{"AAAC": "k"}}, 400, "M_INVALID_PARAM"},
		{"device keys of the wrong shape", "POST", keysPath + "upload", alice, map[string]any{"device_keys": []int{1}}, 400, "M_BAD_JSON"},
		{"an as_token without device", "POST", keysPath + "upload", "as-bridge", map[string]any{"one_time_keys": map[string]any{"signed_curve25519:B": "k"}}, 400, "M_UNKNOWN"},
		{"query with a bad user ID", "POST", keysPath + "query", bob, map[string]any{"device_keys": map[string]any{"alice": []string{}}}, 400, "M_INVALID_PARAM"},
		{"claim of the wrong shape", "POST", keysPath + "claim", bob, map[string]any{"one_time_keys": []int{}}, 400, "M_BAD_JSON"},
		{"changes without to", "GET", keysPath + "changes?from=s0_0_0", bob, nil, 400, "M_MISSING_PARAM"},
		{"changes with a bad token", "GET", keysPath + "changes?from=x&to=y", bob, nil, 400, "M_INVALID_PARAM"},
		{"changes by POST", "POST", keysPath + "changes?from=s0_0_0&to=s0_0_0", bob, nil, 405, "M_UNRECOGNIZED"},
	})

	var q struct {
		DeviceKeys map[string]map[string]map[string]any `json:"device_keys"`
		Failures   map[string]any                       `json:"failures"`
	}
	e.get("POST", keysPath+"query", bob, map[string]any{"device_keys": map[string]any{"@alice:hs": []string{}, "@nobody:hs": []string{}}}, &q)
	got := q.DeviceKeys["@alice:hs"][aDev]
	if got == nil || got["keys"].(map[string]any)["curve25519:"+aDev] != "curveA" || got["unsigned"].(map[string]any)["device_display_name"] != "alice's phone" {
		t.Errorf("query: %+v", q)
	}
	if q.DeviceKeys["@nobody:hs"] == nil || len(q.DeviceKeys["@nobody:hs"]) != 0 || q.Failures == nil {
		t.Errorf("query of an unknown user: %+v", q)
	}
	e.get("POST", keysPath+"query", bob, map[string]any{"device_keys": map[string]any{"@alice:hs": []string{"OTHER"}}}, &q)
	if len(q.DeviceKeys["@alice:hs"]) != 0 {
		t.Errorf("query of one unknown device: %+v", q)
	}

	// Claims: the two one-time keys, then the fallback key, which stays.
	claim := map[string]any{"one_time_keys": map[string]any{"@alice:hs": map[string]any{aDev: "signed_curve25519"}}}
	for _, id := range []string{"signed_curve25519:AAAA", "signed_curve25519:AAAB", "signed_curve25519:FFFF", "signed_curve25519:FFFF"} {
		var c respClaimKeys
		e.get("POST", keysPath+"claim", bob, claim, &c)
		if _, ok := c.OneTimeKeys["@alice:hs"][aDev][id]; !ok {
			t.Errorf("claim: want %s, got %+v", id, c.OneTimeKeys)
		}
	}
	var c respClaimKeys
	e.get("POST", keysPath+"claim", bob, map[string]any{"one_time_keys": map[string]any{"@alice:hs": map[string]any{"NODEV": "signed_curve25519"}}}, &c)
	if len(c.OneTimeKeys) != 0 || c.Failures == nil {
		t.Errorf("claim for an unknown device: %+v", c)
	}

	// /sync tells alice her counts: none left, the fallback key used.
	var s struct {
		OTK      map[string]int `json:"device_one_time_keys_count"`
		Fallback []string       `json:"device_unused_fallback_key_types"`
	}
	e.get("GET", "/_matrix/client/v3/sync", alice, nil, &s)
	if s.OTK["signed_curve25519"] != 0 || s.Fallback == nil || len(s.Fallback) != 0 {
		t.Errorf("sync after the claims: %+v", s)
	}
	e.do("POST", keysPath+"upload", alice, map[string]any{"fallback_keys": map[string]any{"signed_curve25519:FFFG": map[string]any{"key": "fb2", "fallback": true}}})
	e.get("GET", "/_matrix/client/v3/sync", alice, nil, &s)
	if !reflect.DeepEqual(s.Fallback, []string{"signed_curve25519"}) {
		t.Errorf("sync after a new fallback key: %+v", s)
	}

	// The observer saw one device list change (the device keys) with
	// alice's rooms, and the counts after each upload and claim.
	obs.mu.Lock()
	defer obs.mu.Unlock()
	if wantList := []string{"@alice:hs " + string(mustJSON([]string{roomID}))}; !reflect.DeepEqual(obs.lists, wantList) {
		t.Errorf("device list changes %v, want %v", obs.lists, wantList)
	}
	var seq []int
	for _, kc := range obs.counts {
		if kc.UserID != "@alice:hs" || kc.DeviceID != aDev {
			t.Errorf("counts for %s %s", kc.UserID, kc.DeviceID)
		}
		seq = append(seq, kc.OneTimeKeys["signed_curve25519"])
	}
	// upload, same upload, claim ×4, new fallback key.
	if !reflect.DeepEqual(seq, []int{2, 2, 1, 0, 0, 0, 0}) {
		t.Errorf("observed counts %v", seq)
	}
}

type dlSync struct {
	NextBatch   string      `json:"next_batch"`
	DeviceLists deviceLists `json:"device_lists"`
}

// TestDeviceListsInSync: key changes of room-mates, new room-mates and
// users no longer sharing a room reach /sync and /keys/changes, and wake a
// waiting /sync.
func TestDeviceListsInSync(t *testing.T) {
	e := start(t, t.TempDir(), notFoundAS())
	alice, bob, carol, dave := e.register("alice"), e.register("bob"), e.register("carol"), e.register("dave")
	roomID := e.createRoom(alice, map[string]any{"preset": "public_chat"})
	e.do("POST", room(roomID)+"/join", bob, nil)
	var s0 dlSync
	e.get("GET", "/_matrix/client/v3/sync", bob, nil, &s0)
	if len(s0.DeviceLists.Changed) != 0 {
		t.Errorf("initial sync has device lists: %+v", s0.DeviceLists)
	}

	// alice uploads keys while bob waits; dave (no shared room) too.
	done := make(chan dlSync)
	t0 := time.Now()
	go func() {
		var s dlSync
		e.get("GET", "/_matrix/client/v3/sync?timeout=5000&since="+s0.NextBatch, bob, nil, &s)
		done <- s
	}()
	time.Sleep(100 * time.Millisecond)
	e.do("POST", keysPath+"upload", dave, map[string]any{"device_keys": deviceKeys("@dave:hs", e.device(dave), "d")})
	e.do("POST", keysPath+"upload", alice, map[string]any{"device_keys": deviceKeys("@alice:hs", e.device(alice), "a")})
	var s1 dlSync
	select {
	case s1 = <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("sync never returned")
	}
	if time.Since(t0) > 4*time.Second {
		t.Errorf("a key upload did not wake /sync (%v)", time.Since(t0))
	}
	// The wake may come with dave's upload, before alice's: sync again.
	var s1b dlSync
	e.get("GET", "/_matrix/client/v3/sync?since="+s1.NextBatch, bob, nil, &s1b)
	if got := append(s1.DeviceLists.Changed, s1b.DeviceLists.Changed...); !reflect.DeepEqual(got, []string{"@alice:hs"}) {
		t.Errorf("changed %v, want alice only", got)
	}
	var kc respKeyChanges
	e.get("GET", keysPath+"changes?from="+url.QueryEscape(s0.NextBatch)+"&to="+url.QueryEscape(s1b.NextBatch), bob, nil, &kc)
	if !reflect.DeepEqual(kc.Changed, []string{"@alice:hs"}) || len(kc.Left) != 0 {
		t.Errorf("keys/changes %+v", kc)
	}

	// An invite starts no sharing: neither dave (invited) nor, for dave,
	// the room's members are news.
	var d0 dlSync
	e.get("GET", "/_matrix/client/v3/sync", dave, nil, &d0)
	e.do("POST", room(roomID)+"/invite", alice, map[string]any{"user_id": "@dave:hs"})
	var sInv, dInv dlSync
	e.get("GET", "/_matrix/client/v3/sync?since="+s1b.NextBatch, bob, nil, &sInv)
	e.get("GET", "/_matrix/client/v3/sync?since="+d0.NextBatch, dave, nil, &dInv)
	if len(sInv.DeviceLists.Left)+len(sInv.DeviceLists.Changed)+len(dInv.DeviceLists.Left)+len(dInv.DeviceLists.Changed) != 0 {
		t.Errorf("after an invite: bob %+v, dave %+v", sInv.DeviceLists, dInv.DeviceLists)
	}
	s1b = sInv

	// carol joins: changed for bob; carol leaves: left.
	e.do("POST", room(roomID)+"/join", carol, nil)
	var s2 dlSync
	e.get("GET", "/_matrix/client/v3/sync?since="+s1b.NextBatch, bob, nil, &s2)
	if !reflect.DeepEqual(s2.DeviceLists.Changed, []string{"@carol:hs"}) {
		t.Errorf("after carol joined: %+v", s2.DeviceLists)
	}
	var c2 dlSync
	e.get("GET", "/_matrix/client/v3/sync", carol, nil, &c2)
	e.do("POST", room(roomID)+"/leave", carol, nil)
	var s3 dlSync
	e.get("GET", "/_matrix/client/v3/sync?since="+s2.NextBatch, bob, nil, &s3)
	if !reflect.DeepEqual(s3.DeviceLists.Left, []string{"@carol:hs"}) || len(s3.DeviceLists.Changed) != 0 {
		t.Errorf("after carol left: %+v", s3.DeviceLists)
	}
	// carol, who left, no longer shares a room with alice and bob.
	var c3 dlSync
	e.get("GET", "/_matrix/client/v3/sync?since="+c2.NextBatch, carol, nil, &c3)
	if !reflect.DeepEqual(c3.DeviceLists.Left, []string{"@alice:hs", "@bob:hs"}) {
		t.Errorf("carol after leaving: %+v", c3.DeviceLists)
	}
	// A deleted device is a change too (logout deletes the device).
	alice2 := e.loginAs("alice")
	var s4 dlSync
	e.get("GET", "/_matrix/client/v3/sync?since="+s3.NextBatch, bob, nil, &s4)
	e.do("POST", "/_matrix/client/v3/logout", alice2, nil)
	var s5 dlSync
	e.get("GET", "/_matrix/client/v3/sync?since="+s4.NextBatch, bob, nil, &s5)
	if !reflect.DeepEqual(s4.DeviceLists.Changed, []string{"@alice:hs"}) || !reflect.DeepEqual(s5.DeviceLists.Changed, []string{"@alice:hs"}) {
		t.Errorf("new device %+v, logout %+v", s4.DeviceLists, s5.DeviceLists)
	}
	// Tokens of earlier versions (five parts) still parse.
	e.run(t, []call{{"five-part since", "GET", "/_matrix/client/v3/sync?since=s1_0_0_0_0", bob, nil, 200, ""}})
}

func (e *env) loginAs(name string) string {
	e.t.Helper()
	status, out := e.do("POST", "/_matrix/client/v3/login", "", map[string]any{"type": "m.login.password", "user": name, "password": "pw-" + name})
	tok, _ := out["access_token"].(string)
	if status != 200 || tok == "" {
		e.t.Fatalf("login %s: %d %v", name, status, out)
	}
	return tok
}

func crossKey(userID, usage, pub string) map[string]any {
	return map[string]any{"user_id": userID, "usage": []string{usage}, "keys": map[string]string{"ed25519:" + pub: pub}}
}

func TestCrossSigning(t *testing.T) {
	e := start(t, t.TempDir(), notFoundAS())
	asGhost := e.ghost("br_ghost")
	alice, bob := e.register("alice"), e.register("bob")
	aDev := e.device(alice)
	e.do("POST", keysPath+"upload", alice, map[string]any{"device_keys": deviceKeys("@alice:hs", aDev, "a")})
	first := map[string]any{"master_key": crossKey("@alice:hs", "master", "AM"), "self_signing_key": crossKey("@alice:hs", "self_signing", "AS"),
		"user_signing_key": crossKey("@alice:hs", "user_signing", "AU")}
	second := map[string]any{"master_key": crossKey("@alice:hs", "master", "AM2")}
	up := keysPath + "device_signing/upload"
	e.run(t, []call{
		{"first keys without UIA", "POST", up, alice, first, 200, ""},
		{"the same keys again without UIA", "POST", up, alice, first, 200, ""},
		{"a new master key needs UIA", "POST", up, alice, second, 401, ""},
		{"the same self-signing key without the master key needs UIA", "POST", up, alice, map[string]any{"self_signing_key": first["self_signing_key"]}, 401, ""},
		{"a key of another user", "POST", up, bob, map[string]any{"master_key": crossKey("@alice:hs", "master", "X")}, 400, "M_INVALID_PARAM"},
		{"wrong usage", "POST", up, bob, map[string]any{"master_key": crossKey("@bob:hs", "self_signing", "X")}, 400, "M_INVALID_PARAM"},
		{"self-signing before master", "POST", up, bob, map[string]any{"self_signing_key": crossKey("@bob:hs", "self_signing", "X")}, 400, "M_MISSING_PARAM"},
		{"nothing", "POST", up, bob, map[string]any{}, 400, "M_MISSING_PARAM"},
		{"AS user first keys", "POST", up + asGhost, "as-bridge", map[string]any{"master_key": crossKey("@br_ghost:hs", "master", "G1")}, 200, ""},
		{"AS user replaces keys without UIA", "POST", up + asGhost, "as-bridge", map[string]any{"master_key": crossKey("@br_ghost:hs", "master", "G2")}, 200, ""},
	})
	_, ch := e.do("POST", up, alice, second)
	withAuth := map[string]any{"master_key": second["master_key"], "auth": map[string]any{"type": "m.login.password", "session": ch["session"], "user": "alice", "password": "pw-alice"}}
	e.run(t, []call{{"a new master key with the password", "POST", up, alice, withAuth, 200, ""}})

	// alice signs her device with her self-signing key, and bob's master
	// key with her user-signing key.
	e.do("POST", up, bob, map[string]any{"master_key": crossKey("@bob:hs", "master", "BM")})
	var res struct {
		Failures map[string]map[string]any `json:"failures"`
	}
	e.get("POST", keysPath+"signatures/upload", alice, map[string]any{
		"@alice:hs": map[string]any{aDev: map[string]any{"signatures": map[string]any{"@alice:hs": map[string]string{"ed25519:AS": "dev-sig"}}}},
		"@bob:hs":   map[string]any{"BM": map[string]any{"signatures": map[string]any{"@alice:hs": map[string]string{"ed25519:AU": "bob-sig"}}}, "NOKEY": map[string]any{"signatures": map[string]any{}}},
	}, &res)
	if len(res.Failures["@bob:hs"]) != 1 || res.Failures["@bob:hs"]["NOKEY"] == nil {
		t.Errorf("signature failures %+v", res.Failures)
	}
	type qresp struct {
		DeviceKeys      map[string]map[string]map[string]any `json:"device_keys"`
		MasterKeys      map[string]map[string]any            `json:"master_keys"`
		SelfSigningKeys map[string]map[string]any            `json:"self_signing_keys"`
		UserSigningKeys map[string]map[string]any            `json:"user_signing_keys"`
	}
	both := map[string]any{"device_keys": map[string]any{"@alice:hs": []string{}, "@bob:hs": []string{}}}
	var byBob, byAlice qresp
	e.get("POST", keysPath+"query", bob, both, &byBob)
	e.get("POST", keysPath+"query", alice, both, &byAlice)
	sig := func(obj map[string]any, signer, key string) any {
		s, _ := obj["signatures"].(map[string]any)
		m, _ := s[signer].(map[string]any)
		return m[key]
	}
	if sig(byBob.DeviceKeys["@alice:hs"][aDev], "@alice:hs", "ed25519:AS") != "dev-sig" {
		t.Errorf("bob does not see alice's device signature: %+v", byBob.DeviceKeys["@alice:hs"])
	}
	if byBob.MasterKeys["@alice:hs"]["keys"].(map[string]any)["ed25519:AM2"] != "AM2" || byBob.SelfSigningKeys["@alice:hs"] == nil {
		t.Errorf("bob's view of alice's keys: %+v", byBob)
	}
	if byBob.UserSigningKeys["@alice:hs"] != nil || byAlice.UserSigningKeys["@alice:hs"] == nil {
		t.Errorf("user-signing keys shown to bob %v, to alice %v", byBob.UserSigningKeys, byAlice.UserSigningKeys)
	}
	if sig(byBob.MasterKeys["@bob:hs"], "@alice:hs", "ed25519:AU") != nil || sig(byAlice.MasterKeys["@bob:hs"], "@alice:hs", "ed25519:AU") != "bob-sig" {
		t.Errorf("alice's signature of bob: to bob %v, to alice %v", byBob.MasterKeys["@bob:hs"], byAlice.MasterKeys["@bob:hs"])
	}
}

// TestToDeviceStar: "*" reaches every device of the user, through /sync
// and in AS transactions as one message per device.
func TestToDeviceStar(t *testing.T) {
	txns := make(chan []map[string]any, 100)
	reg := bridgeReg + "de.sorunome.msc2409.push_ephemeral: true\n"
	e := startWith(t, t.TempDir(), http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		var txn struct {
			ToDevice []map[string]any `json:"de.sorunome.msc2409.to_device"`
		}
		json.NewDecoder(r.Body).Decode(&txn)
		if len(txn.ToDevice) > 0 {
			txns <- txn.ToDevice
		}
		w.Write([]byte("{}"))
	}), reg, Config{})
	alice, bob1 := e.register("alice"), e.register("bob")
	bob2 := e.loginAs("bob")
	asGhost := e.ghost("br_ghost")
	e.run(t, []call{
		{"ghost device 1", "PUT", "/_matrix/client/v3/devices/G1" + asGhost, "as-bridge", nil, 201, ""},
		{"ghost device 2", "PUT", "/_matrix/client/v3/devices/G2" + asGhost, "as-bridge", nil, 201, ""},
		{"to every device", "PUT", "/_matrix/client/v3/sendToDevice/x.ping/t1", alice, map[string]any{"messages": map[string]any{
			"@bob:hs": map[string]any{"*": map[string]any{"hi": true}}, "@br_ghost:hs": map[string]any{"*": map[string]any{"hi": true}, "G2": map[string]any{"own": true}}}}, 200, ""},
	})
	// The same transaction again is not sent again.
	e.run(t, []call{{"a retry", "PUT", "/_matrix/client/v3/sendToDevice/x.ping/t1", alice, map[string]any{"messages": map[string]any{"@bob:hs": map[string]any{"*": map[string]any{"hi": true}}}}, 200, ""}})
	for _, tok := range []string{bob1, bob2} {
		var s syncResp
		e.get("GET", "/_matrix/client/v3/sync", tok, nil, &s)
		if len(s.ToDevice.Events) != 1 || s.ToDevice.Events[0]["type"] != "x.ping" {
			t.Errorf("device %s got %v", e.device(tok), s.ToDevice.Events)
		}
	}
	var ghostDevs struct {
		Devices []respDevice `json:"devices"`
	}
	e.get("GET", "/_matrix/client/v3/devices"+asGhost, "as-bridge", nil, &ghostDevs)
	want := map[string]any{}
	for _, d := range ghostDevs.Devices {
		want[d.DeviceID] = map[string]any{"hi": true}
	}
	want["G2"] = map[string]any{"own": true}
	got := map[string]any{}
	deadline := time.After(10 * time.Second)
	for len(got) < len(want) {
		select {
		case msgs := <-txns:
			for _, m := range msgs {
				if m["to_user_id"] == "@br_ghost:hs" {
					got[m["to_device_id"].(string)] = m["content"]
				}
			}
		case <-deadline:
			t.Fatalf("AS got to-device %v, want %v", got, want)
		}
	}
	if len(want) != 3 || !reflect.DeepEqual(got, want) {
		t.Errorf("AS to-device %v", got)
	}
}

// TestUpgradeFromVersion3: a data dir of the stub before the keys
// migration opens with its users, devices and tokens, and takes keys.
func TestUpgradeFromVersion3(t *testing.T) {
	dir := t.TempDir()
	db, err := sql.Open("sqlite3", "file:"+filepath.Join(dir, "homeserver.db"))
	if err != nil {
		t.Fatal(err)
	}
	for _, q := range append(append([]string{}, migrations[:3]...),
		`PRAGMA user_version = 3`,
		`INSERT INTO users (user_id, password, appservice) VALUES ('@alice:hs', '', '')`,
		`INSERT INTO devices (user_id, device_id, display_name) VALUES ('@alice:hs', 'OLDDEV', 'old phone')`,
		`INSERT INTO tokens VALUES ('`+tokenHash("old-token")+`', '@alice:hs', 'OLDDEV')`,
	) {
		if _, err := db.Exec(q); err != nil {
			t.Fatalf("%s: %v", q, err)
		}
	}
	if _, err := db.Exec(`INSERT INTO to_device (user_id, device_id, json) VALUES ('@alice:hs', '*', ?)`, []byte(`{"type":"x.old","sender":"@b:hs","content":{}}`)); err != nil {
		t.Fatal(err)
	}
	db.Close()
	e := startWith(t, dir, notFoundAS(), bridgeReg, Config{Logger: zaptest.NewLogger(t)})
	var version int
	e.srv.st.db.QueryRow(`PRAGMA user_version`).Scan(&version)
	if version != len(migrations) {
		t.Errorf("user_version %d, want %d", version, len(migrations))
	}
	e.run(t, []call{
		{"old device", "GET", "/_matrix/client/v3/devices/OLDDEV", "old-token", nil, 200, ""},
		{"keys for the old device", "POST", keysPath + "upload", "old-token", map[string]any{"device_keys": deviceKeys("@alice:hs", "OLDDEV", "c"),
			"one_time_keys": map[string]any{"signed_curve25519:A": "k"}}, 200, ""},
		{"old-style since token", "GET", "/_matrix/client/v3/sync?since=s0_0_0_0_0", "old-token", nil, 200, ""},
	})
	// A "*" message stored before expansion still reaches the device.
	var s syncResp
	e.get("GET", "/_matrix/client/v3/sync", "old-token", nil, &s)
	if len(s.ToDevice.Events) != 1 || s.ToDevice.Events[0]["type"] != "x.old" {
		t.Errorf("old to-device %v", s.ToDevice.Events)
	}
}

// TestClientGoneIsNoError: a /sync the client abandons is not logged as a
// failed request.
func TestClientGoneIsNoError(t *testing.T) {
	core, logs := observer.New(zap.DebugLevel)
	e := startWith(t, t.TempDir(), notFoundAS(), bridgeReg, Config{Logger: zap.New(core)})
	alice := e.register("alice")
	var s syncResp
	e.get("GET", "/_matrix/client/v3/sync", alice, nil, &s)
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	req, _ := http.NewRequestWithContext(ctx, "GET", e.hs.URL+"/_matrix/client/v3/sync?timeout=5000&since="+s.NextBatch, nil)
	req.Header.Set("Authorization", "Bearer "+alice)
	if resp, err := http.DefaultClient.Do(req); err == nil {
		resp.Body.Close()
		t.Fatal("the sync returned before the client gave up")
	}
	time.Sleep(300 * time.Millisecond)
	if n := logs.FilterMessage("request failed").Len(); n != 0 {
		t.Errorf("%d abandoned requests logged as failures: %v", n, logs.FilterMessage("request failed").All()[0].ContextMap())
	}
}
