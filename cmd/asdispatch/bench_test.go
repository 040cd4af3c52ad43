package main

import (
	"bytes"
	"io"
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
		{"tiny run", append([]string{"--ases", "2", "--mix", "suffix,casefold,noliteral"}, tiny...), 0,
			[]string{"dispatch decisions", "catch-up", "latency at half load, p99", "peak RSS", "suffix,casefold,noliteral", "[1/"}},
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
			if strings.Contains(out.String()+errOut.String(), "\r") {
				t.Errorf("a carriage return written to a non-terminal:\n%q", errOut.String())
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

// TestProgress: a bar redrawn with carriage returns on a terminal, plain
// lines anywhere else (a file, a pipe, a buffer).
func TestProgress(t *testing.T) {
	f, err := os.Create(filepath.Join(t.TempDir(), "stderr"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	defer w.Close()
	for _, out := range []io.Writer{f, w, &bytes.Buffer{}} {
		if p := newProgress(out); p.tty {
			t.Errorf("%T is taken for a terminal", out)
		}
	}
	tests := []struct {
		tty   bool
		steps int // of 3; fewer: the run failed there
		want  string
	}{
		{false, 3, "asdispatch bench: [1/3] matcher\nasdispatch bench: [2/3] end to end\nasdispatch bench: [3/3] done\n"},
		{false, 1, "asdispatch bench: [1/3] matcher\n"},
		{true, 3, "\r[##########....................] 1/3 matcher" + strings.Repeat(" ", 43) +
			"\r[####################..........] 2/3 end to end" + strings.Repeat(" ", 40) +
			"\r[##############################] 3/3 done" + strings.Repeat(" ", 46) + "\n"},
		// A failed run ends the bar's line before the error is written.
		{true, 1, "\r[##########....................] 1/3 matcher" + strings.Repeat(" ", 43) + "\n"},
	}
	for _, tt := range tests {
		var b bytes.Buffer
		p := &progress{w: &b, tty: tt.tty}
		for i, stage := range []string{"matcher", "end to end", "done"}[:tt.steps] {
			p.update(stage, i+1, 3)
		}
		p.end()
		p.end() // once is enough
		if b.String() != tt.want {
			t.Errorf("tty %v, %d steps: wrote\n%q, want\n%q", tt.tty, tt.steps, b.String(), tt.want)
		}
	}
}
