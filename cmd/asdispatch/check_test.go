package main

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestCheck(t *testing.T) {
	bad := t.TempDir()
	os.WriteFile(filepath.Join(bad, "bad.yaml"), []byte("id: a|b\nurl: 42\nas_token: s3cr3t-as\nhs_token: s3cr3t-hs\nsender_localpart: bot\nnamespaces:\n  users:\n    - regex: '(?=x)'\n"), 0o600)
	tests := []struct {
		name     string
		args     []string
		wantCode int
		wantOut  []string
	}{
		{"examples", []string{"check", "../../examples"}, 0, []string{"3 application services OK", "@logging:localhost", "#logged_.*",
			"transaction fields: events, ephemeral, de.sorunome.msc2409.to_device\n",
			"transaction fields: events\n",
			"transaction fields: events, de.sorunome.msc2409.ephemeral, de.sorunome.msc2409.to_device, org.matrix.msc3202.device_lists, org.matrix.msc3202.device_one_time_keys_count, org.matrix.msc3202.device_one_time_key_counts, org.matrix.msc3202.device_unused_fallback_key_types\n"}},
		{"bad file", []string{"check", bad}, 1, []string{"bad.yaml:1: id:", "bad.yaml:8: namespaces.users[0].regex: ", "lookaround", "exclusive: required"}},
		{"missing", []string{"check", filepath.Join(bad, "nope.yaml")}, 1, []string{"no such file"}},
		{"no args", []string{"check"}, 2, []string{"usage"}},
		{"unknown command", []string{"frobnicate"}, 2, []string{"unknown command"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var out bytes.Buffer
			code := run(tt.args, &out, &out)
			if code != tt.wantCode {
				t.Errorf("exit %d, want %d; output:\n%s", code, tt.wantCode, out.String())
			}
			for _, w := range tt.wantOut {
				if !strings.Contains(out.String(), w) {
					t.Errorf("output lacks %q:\n%s", w, out.String())
				}
			}
			for _, tok := range []string{"s3cr3t", "wfghWEGh3wgWHEf3478sHFWE", "ugw8243igya57aaABGFfgeyu", "change-me"} {
				if strings.Contains(out.String(), tok) {
					t.Errorf("output leaks a token (%s):\n%s", tok, out.String())
				}
			}
		})
	}
}
