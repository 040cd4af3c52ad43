package integration

import (
	"os"
	"testing"

	"gopkg.in/yaml.v3"
)

// TestMautrixBridgev2Websocket runs mautrix-gmessages, unmodified, in
// websocket mode with `url: null` in its registration and no listener of
// its own: everything the homeserver sends it goes over the socket it
// dialled (through the recorder, which fails the test on 404, 405, 5xx).
func TestMautrixBridgev2Websocket(t *testing.T) {
	bin := gmessagesBinary(t)
	s := newStub(t)
	config, registration := gmessagesConfig(t, bin, s.URL, func(cfg map[string]any) {
		hs := cfg["homeserver"].(map[string]any)
		hs["websocket"] = true
		hs["ping_interval_seconds"] = 1
	})
	raw, err := os.ReadFile(registration)
	if err != nil {
		t.Fatal(err)
	}
	var reg map[string]any
	if err := yaml.Unmarshal(raw, &reg); err != nil {
		t.Fatal(err)
	}
	reg["url"] = nil
	if raw, err = yaml.Marshal(reg); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(registration, raw, 0o600); err != nil {
		t.Fatal(err)
	}
	s.regs = append(s.regs, registration)
	s.start(t)
	gmessagesHelp(t, bin, s, config)
	s.rec.mu.Lock()
	dials := s.rec.counts["GET /_matrix/client/unstable/fi.mau.as_sync 101"]
	s.rec.mu.Unlock()
	if dials == 0 {
		t.Fatalf("the bridge never opened the websocket: %v", s.rec.counts)
	}
}
