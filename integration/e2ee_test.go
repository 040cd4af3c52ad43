//go:build goolm

// Run with -tags goolm: mautrix-go's crypto in pure Go, no libolm needed.

package integration

import (
	"context"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"maunium.net/go/mautrix"
	"maunium.net/go/mautrix/crypto"
	"maunium.net/go/mautrix/crypto/cryptohelper"
	"maunium.net/go/mautrix/event"
	"maunium.net/go/mautrix/id"
)

// cryptoUser is a regular user on the stub with mautrix-go's crypto: it
// uploads keys, tracks device lists and key counts through /sync, and
// decrypts what arrives.
type cryptoUser struct {
	*mautrix.Client
	helper *cryptohelper.CryptoHelper
	mu     sync.Mutex
	plain  []*event.Event // decrypted messages
}

// newCryptoUser registers localpart and gives its client crypto.
func newCryptoUser(t *testing.T, hs, localpart string) *cryptoUser {
	t.Helper()
	ctx := context.Background()
	cli, err := mautrix.NewClient(hs, "", "")
	if err != nil {
		t.Fatal(err)
	}
	resp, _, err := cli.Register(ctx, &mautrix.ReqRegister[any]{Username: localpart, Password: "correct horse " + localpart})
	if err != nil {
		t.Fatalf("register %s: %v", localpart, err)
	}
	cli.SetCredentials(resp.UserID, resp.AccessToken)
	cli.DeviceID = resp.DeviceID
	return withCrypto(t, cli)
}

// waitDecrypted waits for a decrypted message from sender whose body
// contains body.
func (u *cryptoUser) waitDecrypted(t *testing.T, room id.RoomID, sender id.UserID, body string) {
	t.Helper()
	deadline := time.Now().Add(60 * time.Second)
	for time.Now().Before(deadline) {
		u.mu.Lock()
		for _, evt := range u.plain {
			if evt.RoomID == room && evt.Sender == sender && strings.Contains(evt.Content.AsMessage().Body, body) {
				u.mu.Unlock()
				return
			}
		}
		u.mu.Unlock()
		time.Sleep(50 * time.Millisecond)
	}
	t.Fatalf("%s never decrypted %q from %s", u.UserID, body, sender)
}

// waitJoined waits until u's state store knows room is encrypted and has
// every one of the users joined.
func (u *cryptoUser) waitJoined(t *testing.T, room id.RoomID, users ...id.UserID) {
	t.Helper()
	ctx := context.Background()
	deadline := time.Now().Add(30 * time.Second)
	for time.Now().Before(deadline) {
		enc, _ := u.StateStore.IsEncrypted(ctx, room)
		all := enc
		for _, other := range users {
			if !u.StateStore.IsMembership(ctx, room, other, event.MembershipJoin) {
				all = false
			}
		}
		if all {
			return
		}
		time.Sleep(50 * time.Millisecond)
	}
	t.Fatalf("%s never saw %s encrypted with %v joined", u.UserID, room, users)
}

// TestEncryptedRoom: two mautrix-go clients with crypto exchange encrypted
// messages through `asdispatch serve`: keys upload, query and claim, Olm
// to-device messages for the room keys, device lists and key counts in
// /sync; every request answered without 404, 405 or 5xx.
func TestEncryptedRoom(t *testing.T) {
	s := newStub(t)
	s.addRegistration(t, "none", "id: none\nurl: null\nas_token: as-none\nhs_token: hs-none\nsender_localpart: nonebot\nnamespaces:\n  users: [{exclusive: true, regex: \"@none_.*\"}]\n")
	s.start(t)
	ctx := context.Background()
	alice := newCryptoUser(t, s.URL, "alice")
	bob := newCryptoUser(t, s.URL, "bob")

	created, err := alice.CreateRoom(ctx, &mautrix.ReqCreateRoom{
		Invite: []id.UserID{bob.UserID}, Preset: "private_chat",
		InitialState: []*event.Event{{Type: event.StateEncryption, StateKey: new(string),
			Content: event.Content{Parsed: &event.EncryptionEventContent{Algorithm: id.AlgorithmMegolmV1}}}},
	})
	if err != nil {
		t.Fatal(err)
	}
	room := created.RoomID
	// Joined with a plain request, not JoinRoomByID: mautrix-go v0.32.0's
	// JoinRoomByID writes the member content its MemoryStateStore shares
	// with the event the sync goroutine's crypto machine is reading
	// (statestore.go SetMembership, crypto/machine.go HandleMemberEvent),
	// a race of its own under -race. The sync loop records the join.
	if _, err := bob.MakeRequest(ctx, http.MethodPost, bob.BuildClientURL("v3", "rooms", room, "join"), struct{}{}, nil); err != nil {
		t.Fatal(err)
	}
	alice.waitJoined(t, room, alice.UserID, bob.UserID)
	bob.waitJoined(t, room, alice.UserID, bob.UserID)

	sent, err := alice.SendMessageEvent(ctx, room, event.EventMessage, &event.MessageEventContent{MsgType: event.MsgText, Body: "hello bob"})
	if err != nil {
		t.Fatalf("alice sends: %v", err)
	}
	// What the server stored is ciphertext.
	raw, err := bob.GetEvent(ctx, room, sent.EventID)
	if err != nil {
		t.Fatal(err)
	}
	if raw.Type != event.EventEncrypted {
		t.Fatalf("the server holds a %s, not m.room.encrypted", raw.Type)
	}
	bob.waitDecrypted(t, room, alice.UserID, "hello bob")

	if _, err := bob.SendMessageEvent(ctx, room, event.EventMessage, &event.MessageEventContent{MsgType: event.MsgText, Body: "hello alice"}); err != nil {
		t.Fatalf("bob answers: %v", err)
	}
	alice.waitDecrypted(t, room, bob.UserID, "hello alice")

	// A second device of bob's logs in: alice learns of it through
	// device_lists and encrypts her next message for it too.
	bob2 := loginCryptoUser(t, s.URL, "bob")
	bob2.waitJoined(t, room, alice.UserID, bob.UserID)
	deadline := time.Now().Add(30 * time.Second)
	for {
		devs, err := alice.helper.Machine().CryptoStore.GetDevices(ctx, bob.UserID)
		if err != nil {
			t.Fatal(err)
		}
		if _, ok := devs[bob2.DeviceID]; ok {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("alice never learned of bob's second device (has %d)", len(devs))
		}
		time.Sleep(100 * time.Millisecond)
	}
	if _, err := alice.SendMessageEvent(ctx, room, event.EventMessage, &event.MessageEventContent{MsgType: event.MsgText, Body: "to both"}); err != nil {
		t.Fatal(err)
	}
	bob2.waitDecrypted(t, room, alice.UserID, "to both")
	bob.waitDecrypted(t, room, alice.UserID, "to both")
}

// loginCryptoUser logs an existing user in on a new device with crypto.
func loginCryptoUser(t *testing.T, hs, localpart string) *cryptoUser {
	t.Helper()
	ctx := context.Background()
	cli, err := mautrix.NewClient(hs, "", "")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := cli.Login(ctx, &mautrix.ReqLogin{Type: mautrix.AuthTypePassword, Identifier: mautrix.UserIdentifier{Type: mautrix.IdentifierTypeUser, User: localpart},
		Password: "correct horse " + localpart, StoreCredentials: true}); err != nil {
		t.Fatal(err)
	}
	return withCrypto(t, cli)
}

// withCrypto gives a logged-in client crypto in memory and runs its /sync
// loop until the test ends.
func withCrypto(t *testing.T, cli *mautrix.Client) *cryptoUser {
	t.Helper()
	ctx := context.Background()
	cli.StateStore = mautrix.NewMemoryStateStore()
	helper, err := cryptohelper.NewCryptoHelper(cli, []byte("pickle "+cli.DeviceID), crypto.NewMemoryStore(nil))
	if err != nil {
		t.Fatal(err)
	}
	u := &cryptoUser{Client: cli, helper: helper}
	helper.DecryptErrorCallback = func(evt *event.Event, err error) {
		t.Logf("%s could not decrypt %s: %v", cli.UserID, evt.ID, err)
	}
	syncer := cli.Syncer.(*mautrix.DefaultSyncer)
	syncer.OnEvent(cli.StateStoreSyncHandler)
	if err := helper.Init(ctx); err != nil {
		t.Fatalf("crypto init for %s: %v", cli.UserID, err)
	}
	cli.Crypto = helper
	syncer.OnEventType(event.EventMessage, func(_ context.Context, evt *event.Event) {
		if evt.Mautrix.WasEncrypted {
			u.mu.Lock()
			u.plain = append(u.plain, evt)
			u.mu.Unlock()
		}
	})
	ctx, cancel := context.WithCancel(ctx)
	done := make(chan struct{})
	go func() {
		defer close(done)
		for ctx.Err() == nil {
			if err := cli.SyncWithContext(ctx); err != nil && ctx.Err() == nil {
				t.Logf("%s sync: %v", cli.UserID, err)
				time.Sleep(200 * time.Millisecond)
			}
		}
	}()
	t.Cleanup(func() { cancel(); <-done })
	return u
}
