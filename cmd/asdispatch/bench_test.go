package main

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestBenchFlags(t *testing.T) {
	plot := filepath.Join(t.TempDir(), "sweep.png")
	tiny := []string{"--rooms", "4", "--events", "200", "--rounds", "1", "--catchup-events", "200", "--baseline-catchup-events", "100"}
	tests := []struct {
		name string
		args []string
		code int
		want []string
	}{
		{"bad mix", []string{"--mix", "prefix,glob"}, 2, []string{"unknown namespace kind"}},
		{"bad sweep", []string{"--sweep", "rooms=1"}, 2, []string{"want ases="}},
		{"bad store", []string{"--store", "mysql"}, 2, []string{"neither sqlite nor postgres"}},
		{"bad processes", []string{"--store", "postgres", "--processes", "1,0"}, 2, []string{"not a count"}},
		{"sweep of two stores", []string{"--store", "sqlite,postgres", "--sweep", "ases=1,3"}, 2, []string{"one --store at a time"}},
		{"tiny run", append([]string{"--ases", "2", "--mix", "suffix,noliteral"}, tiny...), 0,
			[]string{"dispatch decisions", "catch-up", "latency at half load, p99", "peak RSS", "suffix,noliteral"}},
		{"tiny sweep", append([]string{"--sweep", "ases=1,3", "--plot", plot}, tiny...), 0,
			[]string{"1 ASes", "3 ASes", "plot: " + plot}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if tt.code == 0 && testing.Short() {
				t.Skip("starts servers and databases")
			}
			var out, errOut bytes.Buffer
			code := run(append([]string{"bench"}, tt.args...), &out, &errOut)
			if code != tt.code {
				t.Fatalf("exit %d, want %d:\n%s\n%s", code, tt.code, out.String(), errOut.String())
			}
			for _, w := range tt.want {
				if !strings.Contains(out.String()+errOut.String(), w) {
					t.Errorf("output lacks %q:\n%s\n%s", w, out.String(), errOut.String())
				}
			}
		})
	}
	if testing.Short() {
		return
	}
	if b, err := os.ReadFile(plot); err != nil || !bytes.HasPrefix(b, []byte("\x89PNG")) {
		t.Errorf("plot: %v, starts %q", err, b[:min(8, len(b))])
	}
}
