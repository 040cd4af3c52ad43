package asdendrite

import (
	"strings"
	"testing"
	"time"

	"github.com/matrix-org/dendrite/setup/config"

	"github.com/matrix-org/dendrite/contrib/asdispatch/internal/harness"
)

func TestLoadSettings(t *testing.T) {
	for _, tc := range []struct {
		name, section string
		wantErr       string
		check         func(Settings) bool
	}{
		{"no section: defaults", "", "", func(s Settings) bool { return s.DataDir == "./asdispatch" && s.PostgresDSN == "" }},
		{"values", "data_dir: /var/lib/asd\nappservice:\n  retry_initial: 250ms\n  max_events_per_txn: 7\n", "",
			func(s Settings) bool {
				return s.DataDir == "/var/lib/asd" && s.AppService.RetryInitial == 250*time.Millisecond && s.AppService.MaxEventsPerTxn == 7
			}},
		{"typo refused", "appservice:\n  retry_inital: 1s\n", "retry_inital", nil},
		{"catch-up batching", "appservice:\n  catchup_max_events_per_txn: 5000\n", "",
			func(s Settings) bool { return s.AppService.CatchupMaxEventsPerTxn == 5000 }},
		{"catch-up below the cap refused", "appservice:\n  max_events_per_txn: 200\n  catchup_max_events_per_txn: 150\n",
			"catchup_max_events_per_txn (150) must be 0 (off) or at least max_events_per_txn (200)", nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			path, err := harness.WriteConfig(t.TempDir(), harness.Options{AsDispatch: tc.section})
			if err != nil {
				t.Fatal(err)
			}
			s, err := LoadSettings(path)
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("err %v, want one naming %q", err, tc.wantErr)
				}
				return
			}
			if err != nil || !tc.check(s) {
				t.Fatalf("%+v %v", s, err)
			}
		})
	}
}

// A registration Dendrite v0.13.8 loads without complaint but that would go
// wrong (here: no url key, so pushes are silently off) is refused by name.
func TestLoadRegistrationsRefusesWhatDendriteAccepts(t *testing.T) {
	dir := t.TempDir()
	reg := writeReg(t, dir, "forgot-url.yaml", `id: forgot
as_token: as-f
hs_token: hs-f
sender_localpart: fbot
namespaces:
  users: [{exclusive: true, regex: "@f_.*"}]
`)
	path, err := harness.WriteConfig(dir, harness.Options{Registrations: []string{reg}})
	if err != nil {
		t.Fatal(err)
	}
	cfg, err := config.Load(path)
	if err != nil {
		t.Fatalf("Dendrite itself refuses it, the test is moot: %v", err)
	}
	if len(cfg.Derived.ApplicationServices) != 1 {
		t.Fatalf("Dendrite loaded %d ASes", len(cfg.Derived.ApplicationServices))
	}
	_, _, err = LoadRegistrations(cfg)
	if err == nil || !strings.Contains(err.Error(), "forgot-url.yaml") || !strings.Contains(err.Error(), "url") {
		t.Fatalf("err %v, want one naming the file and the url key", err)
	}

	good := writeReg(t, dir, "good.yaml", ircReg("http://127.0.0.1:1"))
	cfg.AppServiceAPI.ConfigFiles = []string{good}
	set, _, err := LoadRegistrations(cfg)
	if err != nil || set.Len() != 1 || set.ByID("irc") == nil {
		t.Fatalf("good registration: %v", err)
	}
}
