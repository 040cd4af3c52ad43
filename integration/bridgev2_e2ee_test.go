//go:build goolm

package integration

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"gopkg.in/yaml.v3"
	"maunium.net/go/mautrix"
	"maunium.net/go/mautrix/event"
	"maunium.net/go/mautrix/id"
)

// TestMautrixBridgev2Encrypted runs mautrix-gmessages with encryption on
// against serve, in login mode (the bot logs in with
// m.login.application_service and syncs) and in MSC4190 mode (the bridge
// creates its device with PUT /devices and masquerades with device_id). A
// user with crypto opens an encrypted DM with the bot, sends an encrypted
// "help" and must decrypt the bot's encrypted answer.
func TestMautrixBridgev2Encrypted(t *testing.T) {
	for _, mode := range []struct {
		name string
		enc  map[string]any
	}{
		{"login", map[string]any{"allow": true, "default": true, "require": false, "appservice": false, "msc4190": false}},
		{"msc4190", map[string]any{"allow": true, "default": true, "require": false, "appservice": true, "msc4190": true}},
	} {
		t.Run(mode.name, func(t *testing.T) {
			bin := gmessagesBinary(t)
			s := newStub(t)
			config, registration := gmessagesConfig(t, bin, s.URL, func(cfg map[string]any) {
				enc := cfg["encryption"].(map[string]any)
				for k, v := range mode.enc {
					enc[k] = v
				}
			})
			s.regs = append(s.regs, registration)
			s.start(t)
			var cfg struct {
				AppService struct {
					Bot struct{ Username string } `yaml:"bot"`
				} `yaml:"appservice"`
			}
			raw, _ := os.ReadFile(config)
			if err := yaml.Unmarshal(raw, &cfg); err != nil {
				t.Fatal(err)
			}
			bot := id.NewUserID(cfg.AppService.Bot.Username, "localhost")
			reg, _ := os.ReadFile(registration)
			t.Logf("registration flags: msc3202=%v msc4190=%v", strings.Contains(string(reg), "org.matrix.msc3202: true"), strings.Contains(string(reg), "io.element.msc4190: true"))

			bridge := exec.Command(bin, "-c", config, "-n")
			bridge.Dir = filepath.Dir(config)
			out := logFile(t, "mautrix-gmessages")
			bridge.Stdout, bridge.Stderr = out, out
			if err := bridge.Start(); err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { stopProcess(bridge) })
			waitLog(t, out.Name(), `"Bridge started"`, 60*time.Second)

			alice := newCryptoUser(t, s.URL, "alice")
			ctx := context.Background()
			dm, err := alice.CreateRoom(ctx, &mautrix.ReqCreateRoom{
				Preset: "trusted_private_chat", Invite: []id.UserID{bot}, IsDirect: true,
				InitialState: []*event.Event{{Type: event.StateEncryption, StateKey: new(string),
					Content: event.Content{Parsed: &event.EncryptionEventContent{Algorithm: id.AlgorithmMegolmV1}}}},
			})
			if err != nil {
				t.Fatal(err)
			}
			alice.waitJoined(t, dm.RoomID, alice.UserID, bot)
			alice.waitDecrypted(t, dm.RoomID, bot, "Hello, I'm a Google Messages bridge bot")
			if _, err := alice.SendMessageEvent(ctx, dm.RoomID, event.EventMessage, &event.MessageEventContent{MsgType: event.MsgText, Body: "help"}); err != nil {
				t.Fatal(err)
			}
			alice.waitDecrypted(t, dm.RoomID, bot, "This is your management room")
		})
	}
}
