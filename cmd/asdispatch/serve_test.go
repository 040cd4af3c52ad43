package main

import (
	"strings"
	"testing"

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
