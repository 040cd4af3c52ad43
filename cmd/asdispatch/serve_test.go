package main

import (
	"bytes"
	"context"
	"encoding/json"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"go.uber.org/zap"

	"gopkg.in/yaml.v3"
)

func TestStoreOpener(t *testing.T) {
	tests := []struct {
		yaml    string
		wantNil bool
		err     string
	}{
		{"server_name: hs\n", true, ""},
		{"database: {backend: sqlite}\n", true, ""},
		{"database: {backend: postgres, dsn: 'postgres://u@h/db', lease_ttl: 3s}\n", false, ""},
		{"database: {backend: postgres}\n", true, "needs a dsn"},
		{"database: {backend: mysql, dsn: x}\n", true, "unknown backend"},
	}
	for _, tt := range tests {
		var cfg serveConfig
		if err := yaml.Unmarshal([]byte(tt.yaml), &cfg); err != nil {
			t.Fatalf("%q: %v", tt.yaml, err)
		}
		open, err := storeOpener(cfg)
		if tt.err != "" {
			if err == nil || !strings.Contains(err.Error(), tt.err) {
				t.Errorf("%q: err = %v, want %q", tt.yaml, err, tt.err)
			}
			continue
		}
		if err != nil || (open == nil) != tt.wantNil {
			t.Errorf("%q: opener nil = %v, err = %v", tt.yaml, open == nil, err)
		}
	}
}

func TestCheckTxnCaps(t *testing.T) {
	tests := []struct {
		yaml string
		err  string
	}{
		{"server_name: hs\n", ""},
		{"appservice: {catchup_max_events_per_txn: 5000}\n", ""},
		{"appservice: {max_events_per_txn: 20, catchup_max_events_per_txn: 20}\n", ""},
		{"appservice: {catchup_max_events_per_txn: 50}\n", "at least max_events_per_txn (100)"},
		{"appservice: {max_events_per_txn: 500, catchup_max_events_per_txn: 200}\n", "at least max_events_per_txn (500)"},
		{"appservice: {catchup_max_events_per_txn: -1}\n", "catchup_max_events_per_txn must not be negative"},
		{"appservice: {max_txn_bytes: -1}\n", "max_txn_bytes must not be negative"},
	}
	for _, tt := range tests {
		var cfg serveConfig
		if err := yaml.Unmarshal([]byte(tt.yaml), &cfg); err != nil {
			t.Fatalf("%q: %v", tt.yaml, err)
		}
		a := cfg.AppService
		err := checkTxnCaps(a.MaxEventsPerTxn, a.MaxTxnBytes, a.CatchupMaxEventsPerTxn)
		if tt.err == "" && err != nil || tt.err != "" && (err == nil || !strings.Contains(err.Error(), tt.err)) {
			t.Errorf("%q: err = %v, want %q", tt.yaml, err, tt.err)
		}
	}
}

// TestAdminListener: the admin endpoints and /metrics are served on
// admin_listen only, behind admin_token; the client listener does not
// know them.
func TestAdminListener(t *testing.T) {
	cfg := serveConfig{ServerName: "hs", Listen: "127.0.0.1:0", AdminListen: "127.0.0.1:0", AdminToken: "s3cret+/=", DataDir: t.TempDir(), LogLevel: "error"}
	ctx, cancel := context.WithCancel(context.Background())
	var out bytes.Buffer
	ready := make(chan string, 1)
	done := make(chan error, 1)
	go func() { done <- serve(ctx, cfg, zap.NewNop(), &out, ready) }()
	var client string
	select {
	case client = <-ready:
	case err := <-done:
		t.Fatal(err)
	}
	defer func() {
		cancel()
		if err := <-done; err != nil {
			t.Error(err)
		}
	}()
	var admin string
	for _, line := range strings.Split(out.String(), "\n") {
		if a, ok := strings.CutPrefix(line, "admin listening on http://"); ok {
			admin = a
		}
	}
	if admin == "" || admin == client {
		t.Fatalf("admin address %q (client %s) in %q", admin, client, out.String())
	}
	get := func(addr, path, token string) (int, string) {
		req, _ := http.NewRequest("GET", "http://"+addr+path, nil)
		if token != "" {
			req.Header.Set("Authorization", "Bearer "+token)
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		var e struct {
			Errcode string `json:"errcode"`
		}
		if resp.StatusCode == 401 {
			if err := json.Unmarshal(body, &e); err != nil {
				t.Errorf("GET %s%s: 401 body %q: %v", addr, path, body, err)
			}
		}
		return resp.StatusCode, e.Errcode
	}
	tests := []struct {
		addr, path, token string
		want              int
		errcode           string
	}{
		{client, "/_asdispatch/v1/appservices", "", 404, ""},
		{client, "/_asdispatch/v1/appservices", "s3cret+/=", 404, ""},
		{client, "/metrics", "", 404, ""},
		{admin, "/_asdispatch/v1/appservices", "", 401, "M_MISSING_TOKEN"},
		{admin, "/_asdispatch/v1/appservices", "wrong", 401, "M_UNKNOWN_TOKEN"},
		{admin, "/metrics", "", 401, "M_MISSING_TOKEN"},
		{admin, "/_asdispatch/v1/appservices", "s3cret+/=", 200, ""},
		{admin, "/metrics", "s3cret+/=", 200, ""},
		{client, "/_matrix/client/versions", "", 200, ""},
	}
	for _, tt := range tests {
		got, code := get(tt.addr, tt.path, tt.token)
		if got != tt.want || code != tt.errcode {
			t.Errorf("GET %s%s (token %q) = %d %s, want %d %s", tt.addr, tt.path, tt.token, got, code, tt.want, tt.errcode)
		}
	}
}

// TestAppServiceConfigFiles: a bad app_service_config_files is refused with
// an error that names the key (Synapse requires a list of strings).
func TestAppServiceConfigFiles(t *testing.T) {
	tests := []struct {
		yaml string
		want string // "" for accepted
		n    int
	}{
		{"app_service_config_files: [a.yaml, 'b.yaml']\n", "", 2},
		{"app_service_config_files:\n", "", 0},
		{"server_name: hs\n", "", 0},
		{"app_service_config_files: a.yaml\n", `line 1: app_service_config_files must be a list of registration file paths, got the string "a.yaml"`, 0},
		{"app_service_config_files: 42\n", "app_service_config_files must be a list of registration file paths, got 42 (not a string in YAML; quote it)", 0},
		{"app_service_config_files: {a: b}\n", "app_service_config_files must be a list of registration file paths, got a mapping", 0},
		{"app_service_config_files:\n  - a.yaml\n  - 1\n", "line 3: app_service_config_files[1] must be a file path (a string), got 1", 0},
		{"app_service_config_files: [a.yaml, [b.yaml]]\n", "app_service_config_files[1] must be a file path (a string), got a list", 0},
		{"app_service_config_files: [yes]\n", "app_service_config_files[0] must be a file path (a string), got yes", 0},
	}
	for _, tt := range tests {
		var cfg serveConfig
		err := yaml.Unmarshal([]byte(tt.yaml), &cfg)
		if tt.want == "" {
			if err != nil || len(cfg.AppServiceConfigFiles) != tt.n {
				t.Errorf("%q: files %v, err %v", tt.yaml, cfg.AppServiceConfigFiles, err)
			}
			continue
		}
		if err == nil || !strings.Contains(err.Error(), tt.want) {
			t.Errorf("%q: err = %v, want %q", tt.yaml, err, tt.want)
		}
	}
	// Through the command: the file is named too.
	cfgPath := filepath.Join(t.TempDir(), "homeserver.yaml")
	if err := os.WriteFile(cfgPath, []byte("server_name: hs\napp_service_config_files: 7\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	var stdout, stderr bytes.Buffer
	if code := runServe([]string{"-config", cfgPath}, &stdout, &stderr); code != 1 || !strings.Contains(stderr.String(), cfgPath+": line 2: app_service_config_files must be") {
		t.Errorf("runServe = %d, stderr %q", code, stderr.String())
	}
}
