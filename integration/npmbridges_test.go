package integration

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"os"
	"os/exec"
	"strings"
	"sync"
	"testing"
	"time"

	"maunium.net/go/mautrix"
	"maunium.net/go/mautrix/event"
	"maunium.net/go/mautrix/id"
)

// nodeAS is one of the scripts in npm/ running as an application service.
type nodeAS struct {
	mu     sync.Mutex
	failed []string // the script's FAILED lines: a library call that threw
	exited chan struct{}
}

// startNodeAS runs npm/script with env and waits for its LISTENING line. The
// test fails if the script reports a failure or dies before the test ends.
func startNodeAS(t *testing.T, script string, env ...string) *nodeAS {
	t.Helper()
	if _, err := os.Stat("npm/node_modules/matrix-bot-sdk"); err != nil {
		t.Fatal("npm/node_modules is incomplete: run `npm ci` in integration/npm (.ci/run does)")
	}
	node, err := exec.LookPath("node")
	if err != nil {
		t.Fatal("node is not installed (.ci/run installs it)")
	}
	cmd := exec.Command(node, script)
	cmd.Dir = "npm"
	cmd.Env = append(os.Environ(), env...)
	logs := logFile(t, script)
	cmd.Stderr = logs
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	a := &nodeAS{exited: make(chan struct{})}
	listening := make(chan struct{})
	var stopping sync.Once
	stopped := make(chan struct{})
	go func() {
		sc := bufio.NewScanner(io.TeeReader(stdout, logs))
		for sc.Scan() {
			line := sc.Text()
			switch {
			case line == "LISTENING":
				close(listening)
			case strings.HasPrefix(line, "FAILED "):
				a.mu.Lock()
				a.failed = append(a.failed, strings.TrimPrefix(line, "FAILED "))
				a.mu.Unlock()
			}
		}
		err := cmd.Wait()
		select {
		case <-stopped:
		default:
			a.mu.Lock()
			a.failed = append(a.failed, fmt.Sprintf("%s exited during the test: %v", script, err))
			a.mu.Unlock()
		}
		close(a.exited)
	}()
	t.Cleanup(func() {
		stopping.Do(func() { close(stopped) })
		cmd.Process.Kill()
		<-a.exited
		a.mu.Lock()
		defer a.mu.Unlock()
		if len(a.failed) > 0 {
			t.Errorf("%s failed:\n  %s", script, strings.Join(a.failed, "\n  "))
		}
	})
	select {
	case <-listening:
	case <-a.exited:
		t.Fatalf("%s exited before it listened", script)
	case <-time.After(60 * time.Second):
		t.Fatalf("%s did not start", script)
	}
	return a
}

// TestMatrixAppserviceBridge runs a bridge on matrix-appservice-bridge
// 11.2.0: a room created lazily on an alias query, its bot invited and
// echoing, a ghost created on a user query with its displayname, invited.
func TestMatrixAppserviceBridge(t *testing.T) {
	s := newStub(t)
	port := freePort(t)
	reg := s.addRegistration(t, "mab", fmt.Sprintf(`id: mab
url: http://127.0.0.1:%d
as_token: as-mab
hs_token: hs-mab
sender_localpart: mabbot
rate_limited: false
namespaces:
  users: [{exclusive: true, regex: "@mab_.*:localhost"}]
  aliases: [{exclusive: true, regex: "#mab_.*:localhost"}]
  rooms: []
`, port))
	s.start(t)
	startNodeAS(t, "appservice-bridge.js", "REGISTRATION="+reg, "HS_URL="+s.URL, fmt.Sprintf("PORT=%d", port), "DATA_DIR="+t.TempDir())
	bot := id.UserID("@mabbot:localhost")
	alice := newMatrixUser(t, s.URL, "alice")
	ctx := context.Background()

	// Lazy room creation: the alias does not exist until the bridge is asked.
	lazy, err := alice.JoinRoom(ctx, "#mab_lazy:localhost", nil)
	if err != nil {
		t.Fatalf("join #mab_lazy:localhost (created on the alias query): %v", err)
	}
	alice.waitEvent(t, lazy.RoomID, "the bridge bot as the lazy room's creator", membership(bot, event.MembershipJoin))
	alice.waitEvent(t, lazy.RoomID, "the lazy room's name", func(evt *event.Event) bool {
		return evt.Type == event.StateRoomName && evt.Content.AsRoomName().Name == "Lazy mab_lazy"
	})
	if _, err := alice.SendText(ctx, lazy.RoomID, "hello lazy room"); err != nil {
		t.Fatal(err)
	}
	alice.waitEvent(t, lazy.RoomID, "the bot's echo", messageFrom(bot, "echo: hello lazy room"))

	// The bot, invited to a user's room, joins and echoes.
	room, err := alice.CreateRoom(ctx, &mautrix.ReqCreateRoom{Name: "with the bridge", Invite: []id.UserID{bot}})
	if err != nil {
		t.Fatalf("create a room inviting %s: %v", bot, err)
	}
	alice.waitEvent(t, room.RoomID, "the bot's join", membership(bot, event.MembershipJoin))
	if _, err := alice.SendText(ctx, room.RoomID, "hello bridge"); err != nil {
		t.Fatal(err)
	}
	alice.waitEvent(t, room.RoomID, "the bot's echo", messageFrom(bot, "echo: hello bridge"))

	// A ghost nobody registered yet: the invite makes the stub query the
	// bridge, which registers it and sets its displayname; then it joins.
	ghost := id.UserID("@mab_carol:localhost")
	if _, err := alice.InviteUser(ctx, room.RoomID, &mautrix.ReqInviteUser{UserID: ghost}); err != nil {
		t.Fatalf("invite %s (created on the user query): %v", ghost, err)
	}
	joined := alice.waitEvent(t, room.RoomID, "the ghost's join", membership(ghost, event.MembershipJoin))
	if name := joined.Content.AsMember().Displayname; name != "Ghost mab_carol" {
		t.Errorf("the ghost's join carries displayname %q, want %q", name, "Ghost mab_carol")
	}
	alice.waitEvent(t, room.RoomID, "the ghost's message", messageFrom(ghost, "ghost @mab_carol:localhost is here"))
	if name, err := alice.GetDisplayName(ctx, ghost); err != nil || name.DisplayName != "Ghost mab_carol" {
		t.Errorf("displayname of %s: %v, %v", ghost, name, err)
	}
}

// TestMatrixBotSDK runs an application service bot on matrix-bot-sdk 0.8.0
// (no encryption): it joins on invite, echoes, and brings in ghosts, both on
// its own and on a user query.
func TestMatrixBotSDK(t *testing.T) {
	s := newStub(t)
	port := freePort(t)
	s.addRegistration(t, "botsdk", fmt.Sprintf(`id: botsdk
url: http://127.0.0.1:%d
as_token: as-botsdk
hs_token: hs-botsdk
sender_localpart: botsdkbot
namespaces:
  users: [{exclusive: true, regex: "@botsdk_.*:localhost"}]
  aliases: []
  rooms: []
`, port))
	s.start(t)
	startNodeAS(t, "bot-sdk.js", "HS_URL="+s.URL, fmt.Sprintf("PORT=%d", port), "AS_TOKEN=as-botsdk", "HS_TOKEN=hs-botsdk")
	bot := id.UserID("@botsdkbot:localhost")
	alice := newMatrixUser(t, s.URL, "alice")
	ctx := context.Background()

	// trusted_private_chat gives the invited bot the power to invite its ghosts.
	room, err := alice.CreateRoom(ctx, &mautrix.ReqCreateRoom{Name: "with the bot", Preset: "trusted_private_chat", Invite: []id.UserID{bot}})
	if err != nil {
		t.Fatalf("create a room inviting %s: %v", bot, err)
	}
	alice.waitEvent(t, room.RoomID, "the bot's join", membership(bot, event.MembershipJoin))
	if _, err := alice.SendText(ctx, room.RoomID, "hello bot"); err != nil {
		t.Fatal(err)
	}
	alice.waitEvent(t, room.RoomID, "the bot's echo", messageFrom(bot, "echo: hello bot"))

	// The bot registers a ghost, names it, invites it and has it talk.
	if _, err := alice.SendText(ctx, room.RoomID, "ghost dave"); err != nil {
		t.Fatal(err)
	}
	dave := id.UserID("@botsdk_dave:localhost")
	alice.waitEvent(t, room.RoomID, "the ghost's message", messageFrom(dave, "hello from dave"))
	if name, err := alice.GetDisplayName(ctx, dave); err != nil || name.DisplayName != "Ghost dave" {
		t.Errorf("displayname of %s: %v, %v", dave, name, err)
	}

	// A ghost created on the stub's user query, with its displayname.
	erin := id.UserID("@botsdk_erin:localhost")
	if _, err := alice.InviteUser(ctx, room.RoomID, &mautrix.ReqInviteUser{UserID: erin}); err != nil {
		t.Fatalf("invite %s (created on the user query): %v", erin, err)
	}
	alice.waitEvent(t, room.RoomID, "the ghost's invite", membership(erin, event.MembershipInvite))
	if name, err := alice.GetDisplayName(ctx, erin); err != nil || name.DisplayName != "Ghost botsdk_erin" {
		t.Errorf("displayname of %s: %v, %v", erin, name, err)
	}
}
