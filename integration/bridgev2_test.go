package integration

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"gopkg.in/yaml.v3"
	"maunium.net/go/mautrix"
	"maunium.net/go/mautrix/event"
	"maunium.net/go/mautrix/id"
)

// A production mautrix-go bridgev2 bridge, pinned. goolm is mautrix's pure-Go
// olm, so the build needs no C olm library.
const (
	gmessagesModule  = "go.mau.fi/mautrix-gmessages"
	gmessagesVersion = "v0.2601.0"
)

var gmessagesOnce struct {
	sync.Once
	path string
	err  error
}

// gmessagesBinary returns the bridge binary, built once into the user's cache
// directory (keyed by bridge and Go version) and reused by later runs: a cold
// build takes minutes on two cores, a warm cache nothing.
func gmessagesBinary(t *testing.T) string {
	t.Helper()
	if bin := os.Getenv("ASDISPATCH_GMESSAGES_BIN"); bin != "" { // a build of one's own
		return bin
	}
	gmessagesOnce.Do(func() {
		gmessagesOnce.path, gmessagesOnce.err = buildGmessages()
	})
	if gmessagesOnce.err != nil {
		t.Fatal(gmessagesOnce.err)
	}
	return gmessagesOnce.path
}

func buildGmessages() (string, error) {
	cache, err := os.UserCacheDir()
	if err != nil {
		return "", err
	}
	dir := filepath.Join(cache, "asdispatch", "mautrix-gmessages-"+gmessagesVersion+"-"+runtime.Version())
	bin := filepath.Join(dir, "mautrix-gmessages")
	if _, err := os.Stat(bin); err == nil {
		return bin, nil
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return "", err
	}
	// `go install module@version` asks the proxy for the version list, which
	// it may refuse; downloading the exact version does not.
	out, err := exec.Command("go", "mod", "download", "-json", gmessagesModule+"@"+gmessagesVersion).Output()
	if err != nil {
		return "", fmt.Errorf("go mod download %s@%s: %w", gmessagesModule, gmessagesVersion, err)
	}
	var mod struct{ Dir string }
	if err := json.Unmarshal(out, &mod); err != nil || mod.Dir == "" {
		return "", fmt.Errorf("go mod download %s@%s answered %s: %v", gmessagesModule, gmessagesVersion, out, err)
	}
	tmp := bin + ".tmp"
	build := exec.Command("go", "build", "-tags", "goolm", "-trimpath", "-o", tmp, "./cmd/mautrix-gmessages")
	build.Dir = mod.Dir
	build.Env = append(os.Environ(), "GOWORK=off", "GOFLAGS=-buildvcs=false -mod=readonly")
	if out, err := build.CombinedOutput(); err != nil {
		return "", fmt.Errorf("build %s: %w\n%s", gmessagesModule, err, out)
	}
	return bin, os.Rename(tmp, bin)
}

// gmessagesConfig writes the bridge's config: its own example config (-e)
// with the homeserver, the listener, the database and the permissions set,
// and what tweak changes, then has the bridge generate its registration
// (-g) from it.
func gmessagesConfig(t *testing.T, bin, hs string, tweak ...func(cfg map[string]any)) (config, registration string) {
	t.Helper()
	dir := t.TempDir()
	config = filepath.Join(dir, "config.yaml")
	registration = filepath.Join(dir, "registration.yaml")
	run := func(args ...string) {
		t.Helper()
		cmd := exec.Command(bin, args...)
		cmd.Dir = dir
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("mautrix-gmessages %v: %v\n%s", args, err, out)
		}
	}
	run("-e", "-c", config)
	raw, err := os.ReadFile(config)
	if err != nil {
		t.Fatal(err)
	}
	var cfg map[string]any
	if err := yaml.Unmarshal(raw, &cfg); err != nil {
		t.Fatal(err)
	}
	section := func(name string) map[string]any { return cfg[name].(map[string]any) }
	port := freePort(t)
	section("homeserver")["address"] = hs
	section("homeserver")["domain"] = "localhost"
	as := section("appservice")
	as["address"] = fmt.Sprintf("http://127.0.0.1:%d", port)
	as["hostname"] = "127.0.0.1"
	as["port"] = port
	// The example avatar is media on maunium.net, which serve, federating
	// with nobody, cannot fetch; "remove" sets an empty avatar instead.
	as["bot"].(map[string]any)["avatar"] = "remove"
	db := section("database")
	db["type"] = "sqlite3-fk-wal"
	db["uri"] = "file:" + filepath.Join(dir, "bridge.db") + "?_txlock=immediate"
	section("bridge")["permissions"] = map[string]any{"*": "relay", "localhost": "user", "@alice:localhost": "admin"}
	cfg["logging"] = map[string]any{"min_level": "debug", "writers": []any{map[string]any{"type": "stdout", "format": "json"}}}
	for _, f := range tweak {
		f(cfg)
	}
	if raw, err = yaml.Marshal(cfg); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(config, raw, 0o600); err != nil {
		t.Fatal(err)
	}
	run("-g", "-c", config, "-r", registration)
	return config, registration
}

// TestMautrixBridgev2 runs mautrix-gmessages, unmodified, against serve: its
// bot accepts a DM from a user, marks it as the management room, greets and
// answers `help`. No Google login is needed for that.
func TestMautrixBridgev2(t *testing.T) {
	bin := gmessagesBinary(t)
	s := newStub(t)
	config, registration := gmessagesConfig(t, bin, s.URL)
	s.regs = append(s.regs, registration)
	s.start(t)

	// The bot is appservice.bot.username from the config; the registration's
	// sender_localpart is a random string mautrix never uses.
	var cfg struct {
		AppService struct {
			Bot struct{ Username, Displayname string } `yaml:"bot"`
		} `yaml:"appservice"`
	}
	raw, _ := os.ReadFile(config)
	if err := yaml.Unmarshal(raw, &cfg); err != nil || cfg.AppService.Bot.Username == "" || cfg.AppService.Bot.Displayname == "" {
		t.Fatalf("config %s: %v", config, err)
	}
	bot := id.NewUserID(cfg.AppService.Bot.Username, "localhost")

	bridge := exec.Command(bin, "-c", config, "-n")
	bridge.Dir = filepath.Dir(config)
	out := logFile(t, "mautrix-gmessages")
	bridge.Stdout, bridge.Stderr = out, out
	if err := bridge.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { stopProcess(bridge) })
	waitLog(t, out.Name(), `"Bridge started"`, 60*time.Second)

	alice := newMatrixUser(t, s.URL, "alice")
	ctx := context.Background()
	dm, err := alice.CreateRoom(ctx, &mautrix.ReqCreateRoom{
		Preset:   "trusted_private_chat",
		Invite:   []id.UserID{bot},
		IsDirect: true,
	})
	if err != nil {
		t.Fatalf("create the DM with %s: %v", bot, err)
	}
	invite := alice.waitEvent(t, dm.RoomID, "the bot's invite", membership(bot, event.MembershipInvite))
	if !invite.Content.AsMember().IsDirect {
		t.Errorf("the bot's invite lacks is_direct: %s", invite.Content.VeryRaw)
	}
	alice.waitEvent(t, dm.RoomID, "the bot's join", membership(bot, event.MembershipJoin))
	alice.waitEvent(t, dm.RoomID, "the bot's welcome", messageFrom(bot, "Hello, I'm a Google Messages bridge bot", "management room"))
	if _, err := alice.SendText(ctx, dm.RoomID, "help"); err != nil {
		t.Fatal(err)
	}
	answer := alice.waitEvent(t, dm.RoomID, "the bot's answer to help", messageFrom(bot, "This is your management room"))
	if msg := answer.Content.AsMessage(); msg.MsgType != event.MsgNotice || !strings.Contains(msg.Body, "login") {
		t.Errorf("answer to help: %s %q", msg.MsgType, msg.Body)
	}
	// The bridge set its bot's profile at startup.
	if name, err := alice.GetDisplayName(ctx, bot); err != nil || name.DisplayName != cfg.AppService.Bot.Displayname {
		t.Errorf("displayname of %s: %v, %v; want %q", bot, name, err, cfg.AppService.Bot.Displayname)
	}
}

// waitLog waits for a line containing want in a child's log file.
func waitLog(t *testing.T, path, want string, timeout time.Duration) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		b, _ := os.ReadFile(path)
		if strings.Contains(string(b), want) {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s never logged %s", filepath.Base(path), want)
		}
		time.Sleep(100 * time.Millisecond)
	}
}
