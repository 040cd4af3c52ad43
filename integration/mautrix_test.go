package integration

import (
	"context"
	"fmt"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"maunium.net/go/mautrix"
	"maunium.net/go/mautrix/appservice"
	"maunium.net/go/mautrix/event"
	"maunium.net/go/mautrix/id"
)

// bridgeQueries is the bridge's QueryHandler: it creates what it is asked
// about, as a real bridge would.
type bridgeQueries struct {
	as      *appservice.AppService
	aliases atomic.Int32
	users   atomic.Int32
}

func (q *bridgeQueries) QueryAlias(alias id.RoomAlias) bool {
	q.aliases.Add(1)
	_, err := q.as.BotIntent().CreateRoom(context.Background(), &mautrix.ReqCreateRoom{RoomAliasName: strings.TrimPrefix(strings.SplitN(string(alias), ":", 2)[0], "#"), Preset: "public_chat"})
	return err == nil
}

func (q *bridgeQueries) QueryUser(userID id.UserID) bool {
	q.users.Add(1)
	return q.as.Intent(userID).EnsureRegistered(context.Background()) == nil
}

func newMautrix(t *testing.T, hsToken string) *appservice.AppService {
	mas := appservice.Create()
	reg := appservice.CreateRegistration()
	reg.ID, reg.AppToken, reg.ServerToken, reg.SenderLocalpart = "mx", "as-mx", hsToken, "mxbot"
	reg.EphemeralEvents = true
	reg.Namespaces.UserIDs.Register(regexp.MustCompile(`@mx_.*`), true)
	reg.Namespaces.RoomAliases.Register(regexp.MustCompile(`#mx_.*`), true)
	mas.Registration = reg
	mas.HomeserverDomain = "localhost"
	mas.QueryHandler = &bridgeQueries{as: mas}
	return mas
}

// TestMautrixBridge drives the stub homeserver with mautrix-go's appservice
// package on the receiving end and its client on the sending end.
func TestMautrixBridge(t *testing.T) {
	bin := buildBinary(t)
	// mautrix with the wrong hs_token first: it rejects our transactions
	// until the bridge is "fixed", then the same transactions get through.
	wrong, right := newMautrix(t, "not-our-token"), newMautrix(t, "hs-mx")
	var fixed atomic.Bool
	var rejected atomic.Int32
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if fixed.Load() {
			right.Router.ServeHTTP(w, r)
			return
		}
		rejected.Add(1)
		wrong.Router.ServeHTTP(w, r)
	}))
	defer srv.Close()

	dir := t.TempDir()
	reg := *right.Registration
	reg.URL = srv.URL
	regPath := filepath.Join(dir, "mx-registration.yaml")
	if err := reg.Save(regPath); err != nil { // the registration file as mautrix writes it
		t.Fatal(err)
	}
	config := filepath.Join(dir, "homeserver.yaml")
	os.WriteFile(config, []byte(fmt.Sprintf("server_name: localhost\nlisten: 127.0.0.1:0\ndata_dir: %s\napp_service_config_files: [%s]\nappservice:\n  retry_initial: 50ms\n  retry_max: 200ms\n", filepath.Join(dir, "data"), regPath)), 0o600)
	hs, _ := startServe(t, bin, config)
	for _, m := range []*appservice.AppService{wrong, right} {
		if err := m.SetHomeserverURL(hs); err != nil {
			t.Fatal(err)
		}
		m.BotIntent() // made lazily and without a lock: make it before handlers run
	}

	var mu sync.Mutex
	seen := map[string]bool{}
	record := func(ch chan *event.Event, prefix string) {
		for evt := range ch {
			mu.Lock()
			seen[prefix+evt.Type.Type] = true
			if evt.Type == event.EventMessage {
				seen["msg:"+evt.Content.AsMessage().Body] = true
			}
			mu.Unlock()
		}
	}
	go record(right.Events, "")
	go record(right.ToDeviceEvents, "todevice:")
	waitSeen := func(key string) {
		t.Helper()
		deadline := time.Now().Add(20 * time.Second)
		for {
			mu.Lock()
			ok := seen[key]
			mu.Unlock()
			if ok {
				return
			}
			if time.Now().After(deadline) {
				mu.Lock()
				defer mu.Unlock()
				t.Fatalf("mautrix never received %s; got %v", key, seen)
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
	ctx := context.Background()

	// The bridge registers a ghost, creates a room with an alias and talks
	// in it as the ghost (?user_id= masquerading).
	ghost := right.Intent("@mx_ghost:localhost")
	if err := ghost.EnsureRegistered(ctx); err != nil {
		t.Fatal(err)
	}
	room, err := ghost.CreateRoom(ctx, &mautrix.ReqCreateRoom{RoomAliasName: "mx_chan", Name: "bridged", Preset: "public_chat"})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := ghost.SendText(ctx, room.RoomID, "from the ghost"); err != nil {
		t.Fatal(err)
	}
	// Our transactions are being refused (wrong token): fix the bridge.
	deadline := time.Now().Add(10 * time.Second)
	for rejected.Load() == 0 && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	if rejected.Load() == 0 {
		t.Fatal("the wrongly configured bridge was never sent anything")
	}
	fixed.Store(true)
	waitSeen("msg:from the ghost")

	// A Matrix user joins by alias and talks, types, sends to-device.
	alice, err := mautrix.NewClient(hs, "", "")
	if err != nil {
		t.Fatal(err)
	}
	// The stub takes password registration without interactive auth.
	reg2, _, err := alice.Register(ctx, &mautrix.ReqRegister[any]{Username: "alice", Password: "pw"})
	if err != nil {
		t.Fatalf("register alice: %v", err)
	}
	alice.SetCredentials(reg2.UserID, reg2.AccessToken)
	if _, err := alice.JoinRoom(ctx, "#mx_chan:localhost", nil); err != nil {
		t.Fatal(err)
	}
	if _, err := alice.SendText(ctx, room.RoomID, "from alice"); err != nil {
		t.Fatal(err)
	}
	waitSeen("msg:from alice")
	if _, err := alice.UserTyping(ctx, room.RoomID, true, 5*time.Second); err != nil {
		t.Fatal(err)
	}
	waitSeen("m.typing")
	if _, err := alice.SendToDevice(ctx, event.NewEventType("org.example.ping"), &mautrix.ReqSendToDevice{
		Messages: map[id.UserID]map[id.DeviceID]*event.Content{"@mx_ghost:localhost": {"DEV": {Raw: map[string]any{"hello": "ghost"}}}},
	}); err != nil {
		t.Fatal(err)
	}
	waitSeen("todevice:org.example.ping")

	// Lazy creation through mautrix's QueryHandler: an alias and a user.
	q := right.QueryHandler.(*bridgeQueries)
	if _, err := alice.JoinRoom(ctx, "#mx_lazy:localhost", nil); err != nil {
		t.Fatalf("join of a lazily created alias: %v", err)
	}
	if q.aliases.Load() == 0 {
		t.Error("mautrix was not asked about #mx_lazy")
	}
	// Alice invites into her own room: in the ghost's public room she is
	// below the invite level, as she would be on Synapse.
	own, err := alice.CreateRoom(ctx, &mautrix.ReqCreateRoom{})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := alice.InviteUser(ctx, own.RoomID, &mautrix.ReqInviteUser{UserID: "@mx_new:localhost"}); err != nil {
		t.Fatalf("invite of a lazily created user: %v", err)
	}
	if q.users.Load() == 0 {
		t.Error("mautrix was not asked about @mx_new")
	}

	// Ping, as a bridge does at start-up.
	resp, err := right.BotClient().AppservicePing(ctx, "mx", "ping-txn")
	if err != nil {
		t.Fatalf("ping: %v", err)
	}
	if resp.DurationMS < 0 {
		t.Errorf("ping duration %d", resp.DurationMS)
	}
}
