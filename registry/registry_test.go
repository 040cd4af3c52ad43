package registry

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"testing"
	"time"
)

const valid = `id: irc
url: "http://127.0.0.1:9999"
as_token: as-secret-irc
hs_token: hs-secret-irc
sender_localpart: ircbot
namespaces:
  users:
    - exclusive: true
      regex: "@irc_.*"
    - exclusive: false
      regex: "@shared_.*"
  aliases:
    - exclusive: true
      regex: "#irc_.*"
  rooms: []
`

func TestParseValid(t *testing.T) {
	r, _, err := Parse("irc.yaml", []byte(valid+"receive_ephemeral: true\nextra_key: {a: 1}\n"))
	if err != nil {
		t.Fatal(err)
	}
	if r.ID != "irc" || !r.HasURL || r.URL != "http://127.0.0.1:9999" || r.SenderLocalpart != "ircbot" ||
		!r.RateLimited || !r.ReceiveEphemeral || r.EphemeralUnstable || len(r.Namespaces.Users) != 2 ||
		r.Namespaces.Users[0].Line != 8 || r.Extra["extra_key"] == nil {
		t.Errorf("parsed %+v", r)
	}
	if !r.ASToken.Equal("as-secret-irc") || !r.HSToken.Equal("hs-secret-irc") {
		t.Error("tokens not kept")
	}
}

func TestParseVariants(t *testing.T) {
	tests := []struct {
		name  string
		yaml  string
		check func(*Registration) bool
	}{
		{"url null", strings.Replace(valid, `url: "http://127.0.0.1:9999"`, "url: null", 1), func(r *Registration) bool { return !r.HasURL }},
		{"unstable ephemeral", valid + "de.sorunome.msc2409.push_ephemeral: true\n", func(r *Registration) bool { return r.ReceiveEphemeral && r.EphemeralUnstable }},
		{"push_ephemeral", valid + "push_ephemeral: true\n", func(r *Registration) bool { return r.ReceiveEphemeral && r.EphemeralUnstable }},
		{"mautrix omits lists", "id: t\nurl: http://x:1\nas_token: a\nhs_token: h\nsender_localpart: b\nnamespaces:\n  users:\n    - regex: '@t_.*'\n      exclusive: true\n",
			func(r *Registration) bool { return len(r.Namespaces.Aliases) == 0 && len(r.Namespaces.Users) == 1 }},
		{"flags", valid + "rate_limited: false\norg.matrix.msc3202: true\nio.element.msc4190: true\nasdispatch.legacy: true\nprotocols: [irc]\n",
			func(r *Registration) bool {
				return !r.RateLimited && r.MSC3202 && r.MSC4190 && r.Legacy && r.Protocols[0] == "irc"
			}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r, _, err := Parse("f.yaml", []byte(tt.yaml))
			if err != nil {
				t.Fatal(err)
			}
			if !tt.check(r) {
				t.Errorf("unexpected %+v", r)
			}
		})
	}
}

func TestParseErrors(t *testing.T) {
	tests := []struct {
		name string
		yaml string
		want []string // "line: field: reason-substring"
	}{
		{"missing url", strings.Replace(valid, `url: "http://127.0.0.1:9999"`+"\n", "", 1), []string{"1: url: required"}},
		{"missing everything", "foo: 1\n", []string{"id: required", "as_token: required", "hs_token: required", "sender_localpart: required", "namespaces: required"}},
		{"pipe in id", strings.Replace(valid, "id: irc", "id: a|b", 1), []string{"1: id: must not contain '|'"}},
		{"url type", strings.Replace(valid, `url: "http://127.0.0.1:9999"`, "url: [1]", 1), []string{"2: url: must be a string"}},
		{"url scheme", strings.Replace(valid, `"http://127.0.0.1:9999"`, "ftp://x", 1), []string{"2: url: must be an http(s) URL"}},
		{"bad regex and missing exclusive", strings.Replace(valid, "    - exclusive: false\n      regex: \"@shared_.*\"", "    - regex: \"@(?!x)\"", 1),
			[]string{"10: namespaces.users[1].regex: ", "lookaround", "namespaces.users[1].exclusive: required"}},
		{"backreference", strings.Replace(valid, `"#irc_.*"`, `'(a)\1'`, 1), []string{"namespaces.aliases[0].regex", "backreference"}},
		{"exclusive not bool", strings.Replace(valid, "exclusive: true\n      regex: \"#irc", "exclusive: yes-please\n      regex: \"#irc", 1), []string{"namespaces.aliases[0].exclusive: must be true or false"}},
		{"bool type", valid + "receive_ephemeral: maybe\n", []string{"receive_ephemeral: must be true or false"}},
		{"namespaces type", strings.Replace(valid, "namespaces:\n", "namespaces: 3\nx:\n", 1), []string{"namespaces: must be a mapping"}},
		{"not yaml", "id: [\n", []string{"not valid YAML"}},
		{"bad localpart", strings.Replace(valid, "sender_localpart: ircbot", "sender_localpart: \"irc bot\"", 1), []string{"5: sender_localpart: "}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, _, err := Parse("bad.yaml", []byte(tt.yaml))
			var fe *FileError
			if !errors.As(err, &fe) || fe.File != "bad.yaml" {
				t.Fatalf("error %v is not a *FileError for bad.yaml", err)
			}
			for _, w := range tt.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error lacks %q:\n%v", w, err)
				}
			}
			if strings.Contains(err.Error(), "secret") {
				t.Errorf("error leaks a token: %v", err)
			}
		})
	}
}

func TestLintWarnings(t *testing.T) {
	tests := []struct {
		name, yaml, want string
	}{
		{"wrong sigil", strings.Replace(valid, `"@irc_.*"`, `"irc_.*"`, 1), "can never match"},
		{"matches every user", strings.Replace(valid, `"@irc_.*"`, `"@.*"`, 1), "matches every users"},
		{"room with server", strings.Replace(valid, "rooms: []", "rooms:\n    - {exclusive: false, regex: '!.*:example.org'}", 1), "room version 12"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, warns, err := Parse("w.yaml", []byte(tt.yaml))
			if err != nil {
				t.Fatal(err)
			}
			var all []string
			for _, w := range warns {
				all = append(all, w.String())
			}
			if !strings.Contains(strings.Join(all, "\n"), tt.want) {
				t.Errorf("warnings %v lack %q", all, tt.want)
			}
		})
	}
}

func writeRegs(t *testing.T, regs map[string]string) string {
	dir := t.TempDir()
	for name, y := range regs {
		if err := os.WriteFile(filepath.Join(dir, name), []byte(y), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	return dir
}

func tg(id, asTok, hsTok string) string {
	return "id: " + id + "\nurl: http://x:1\nas_token: " + asTok + "\nhs_token: " + hsTok + "\nsender_localpart: " + id + "bot\nnamespaces:\n  users:\n    - {exclusive: true, regex: '@" + id + "_.*'}\n    - {exclusive: false, regex: '@any_.*'}\n  aliases:\n    - {exclusive: true, regex: '#" + id + "_.*'}\n"
}

func TestLoadDuplicates(t *testing.T) {
	tests := []struct {
		name string
		regs map[string]string
		want []string
	}{
		{"same id", map[string]string{"a.yaml": tg("tg", "t1", "h1"), "b.yaml": tg("tg", "t2", "h2")}, []string{"b.yaml", "a.yaml", `id "tg"`}},
		{"same as_token", map[string]string{"a.yaml": tg("one", "secret-tok", "h1"), "b.yaml": tg("two", "secret-tok", "h2")}, []string{"b.yaml", "a.yaml", "as_token"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, _, err := Load("hs", writeRegs(t, tt.regs))
			if err == nil {
				t.Fatal("no error")
			}
			for _, w := range tt.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error lacks %q: %v", w, err)
				}
			}
			if strings.Contains(err.Error(), "secret-tok") {
				t.Errorf("error leaks the token: %v", err)
			}
		})
	}
	_, warns, err := Load("hs", writeRegs(t, map[string]string{"a.yaml": tg("one", "t1", "same-hs"), "b.yml": tg("two", "t2", "same-hs"), "ignored.txt": "junk"}))
	if err != nil {
		t.Fatal(err)
	}
	if len(warns) != 1 || !strings.Contains(warns[0].Message, "a.yaml") || strings.Contains(warns[0].String(), "same-hs") {
		t.Errorf("shared hs_token warnings = %v", warns)
	}
}

func TestOverlapWarning(t *testing.T) {
	_, warns, err := Load("hs", writeRegs(t, map[string]string{
		"a.yaml": tg("irc", "t1", "h1"),
		"b.yaml": strings.Replace(tg("libera", "t2", "h2"), "'@libera_.*'", "'@irc_libera_.*'", 1),
	}))
	if err != nil {
		t.Fatal(err)
	}
	if len(warns) != 1 || !strings.Contains(warns[0].Message, "overlaps") || !strings.Contains(warns[0].String(), "a.yaml") || !strings.Contains(warns[0].String(), "b.yaml") {
		t.Errorf("warnings = %v", warns)
	}
}

func TestSetQuestions(t *testing.T) {
	set, _, err := Load("hs", writeRegs(t, map[string]string{"a.yaml": tg("tg", "tok-tg", "h1"), "b.yaml": tg("sig", "tok-sig", "h2")}))
	if err != nil {
		t.Fatal(err)
	}
	tg, sig := set.ByID("tg"), set.ByID("sig")
	if as, err := set.ByASToken("tok-tg"); err != nil || as != tg {
		t.Fatalf("ByASToken = %v, %v", as, err)
	}
	for _, bad := range []string{"", "tok-t", "tok-tgx", "TOK-TG"} {
		if _, err := set.ByASToken(bad); !errors.Is(err, ErrUnknownToken) {
			t.Errorf("ByASToken(%q) = %v, want M_UNKNOWN_TOKEN", bad, err)
		}
	}
	tests := []struct {
		name string
		err  error
		want error
	}{
		{"masquerade own ns", set.CanMasquerade(tg, "@tg_bob:hs"), nil},
		{"masquerade sender", set.CanMasquerade(tg, "@tgbot:hs"), nil},
		{"masquerade shared ns", set.CanMasquerade(tg, "@any_x:hs"), nil},
		{"masquerade other", set.CanMasquerade(tg, "@sig_bob:hs"), ErrForbidden},
		{"masquerade outside", set.CanMasquerade(tg, "@alice:hs"), ErrForbidden},
		{"masquerade remote user in ns", set.CanMasquerade(tg, "@tg_bob:elsewhere"), ErrForbidden},
		{"masquerade server name suffix", set.CanMasquerade(tg, "@tg_bob:evilhs"), ErrForbidden},
		{"masquerade server with our name as port", set.CanMasquerade(tg, "@tg_bob:evil:hs"), ErrForbidden},
		{"user registers free", set.CheckRegister(nil, "@alice:hs"), nil},
		{"user registers shared", set.CheckRegister(nil, "@any_x:hs"), nil},
		{"user registers exclusive", set.CheckRegister(nil, "@tg_bob:hs"), ErrExclusive},
		{"user registers sender", set.CheckRegister(nil, "@sigbot:hs"), ErrExclusive},
		{"as registers own", set.CheckRegister(tg, "@tg_bob:hs"), nil},
		{"as registers other's", set.CheckRegister(tg, "@sig_bob:hs"), ErrExclusive},
		{"as registers outside", set.CheckRegister(tg, "@alice:hs"), ErrExclusive},
		{"alias own", set.CheckAlias(sig, "#sig_room:hs"), nil},
		{"alias other's", set.CheckAlias(sig, "#tg_room:hs"), ErrExclusive},
		{"alias by user", set.CheckAlias(nil, "#tg_room:hs"), ErrExclusive},
		{"alias free", set.CheckAlias(nil, "#lobby:hs"), nil},
	}
	for _, tt := range tests {
		if !errors.Is(tt.err, tt.want) || (tt.want == nil && tt.err != nil) {
			t.Errorf("%s: err = %v, want %v", tt.name, tt.err, tt.want)
		}
	}
	if o := set.ExclusiveUserOwners(nil, "@tg_x:hs"); len(o) != 1 || o[0] != tg {
		t.Errorf("ExclusiveUserOwners = %v", o)
	}
	if o := set.ExclusiveUserOwners(nil, "@any_x:hs"); len(o) != 0 {
		t.Errorf("shared user has exclusive owners %v", o)
	}
	if o := set.ExclusiveAliasOwners(nil, "#sig_x:hs"); len(o) != 1 || o[0] != sig {
		t.Errorf("ExclusiveAliasOwners = %v", o)
	}
	if hits := set.UsersInterested(nil, "@any_x:hs"); len(hits) != 2 || hits[0].Exclusive {
		t.Errorf("UsersInterested(shared) = %v", hits)
	}
	var e *Error
	if err := set.CheckRegister(nil, "@tg_x:hs"); !errors.As(err, &e) || e.Status != 400 || e.Code != "M_EXCLUSIVE" {
		t.Errorf("error %v does not map to 400 M_EXCLUSIVE", err)
	}
}

func TestRegistrySwap(t *testing.T) {
	a, _, _ := NewSet("hs", nil)
	b, _, _ := NewSet("hs", nil)
	r := NewRegistry(a)
	if r.Current() != a || r.Swap(b) != a || r.Current() != b {
		t.Error("swap did not replace the set")
	}
}

func FuzzParse(f *testing.F) {
	f.Add([]byte(valid))
	f.Add([]byte("id: x\nurl: null\n"))
	f.Add([]byte("namespaces: {users: [{regex: '(', exclusive: 1}]}"))
	f.Fuzz(func(t *testing.T, data []byte) {
		r, _, err := Parse("fuzz.yaml", data)
		if err == nil && (r.ID == "" || strings.Contains(r.ID, "|") || r.SenderLocalpart == "") {
			t.Fatalf("accepted invalid registration %+v", r)
		}
	})
}

// TestExclusiveConflictOrderIndependent: when two ASes both hold an ID
// exclusively, file order must not pick a winner. As in Synapse, an AS may
// not register an ID another AS holds exclusively, so neither may, nor may
// a plain user; the overlap is reported at load, the same in both orders.
func TestExclusiveConflictOrderIndependent(t *testing.T) {
	dir := writeRegs(t, map[string]string{
		"a.yaml": strings.Replace(tg("irc", "t1", "h1"), "'@any_.*'", "'@any_.*'}\n    - {exclusive: true, regex: '@shared_.*'", 1),
		"b.yaml": strings.Replace(tg("libera", "t2", "h2"), "'@any_.*'", "'@any_.*'}\n    - {exclusive: true, regex: '@shared_.*'", 1),
	})
	a, b := filepath.Join(dir, "a.yaml"), filepath.Join(dir, "b.yaml")
	var warnings [2]string
	for i, order := range [][]string{{a, b}, {b, a}} {
		set, warns, err := Load("hs", order...)
		if err != nil {
			t.Fatal(err)
		}
		irc, libera := set.ByID("irc"), set.ByID("libera")
		tests := []struct {
			name string
			err  error
			want error
		}{
			{"irc registers contested", set.CheckRegister(irc, "@shared_x:hs"), ErrExclusive},
			{"libera registers contested", set.CheckRegister(libera, "@shared_x:hs"), ErrExclusive},
			{"user registers contested", set.CheckRegister(nil, "@shared_x:hs"), ErrExclusive},
			{"irc registers own", set.CheckRegister(irc, "@irc_x:hs"), nil},
			{"libera registers own", set.CheckRegister(libera, "@libera_x:hs"), nil},
			{"libera registers irc's", set.CheckRegister(libera, "@irc_x:hs"), ErrExclusive},
		}
		for _, tt := range tests {
			if !errors.Is(tt.err, tt.want) || (tt.want == nil && tt.err != nil) {
				t.Errorf("order %d: %s: err = %v, want %v", i, tt.name, tt.err, tt.want)
			}
		}
		if got := set.ExclusiveUserOwners(nil, "@shared_x:hs"); len(got) != 2 || !slices.Contains(got, irc) || !slices.Contains(got, libera) {
			t.Errorf("order %d: ExclusiveUserOwners = %v, want irc and libera", i, got)
		}
		if got := set.ExclusiveUserOwners(nil, "@irc_x:hs"); len(got) != 1 || got[0] != irc {
			t.Errorf("order %d: ExclusiveUserOwners(@irc_x) = %v, want irc", i, got)
		}
		var all []string
		for _, w := range warns {
			all = append(all, w.String())
		}
		warnings[i] = strings.Join(all, "\n")
		for _, want := range []string{"a.yaml", "b.yaml", `"@shared_.*"`, "namespaces.users[2].regex", "overlaps"} {
			if !strings.Contains(warnings[i], want) {
				t.Errorf("order %d: warnings lack %q:\n%s", i, want, warnings[i])
			}
		}
	}
	if warnings[0] != warnings[1] {
		t.Errorf("warnings depend on file order:\n%s\n--- vs ---\n%s", warnings[0], warnings[1])
	}
}

// TestOverlapDetection: overlaps are reported only with an ID both regexes
// match, so a shared literal prefix alone is not an overlap.
func TestOverlapDetection(t *testing.T) {
	tests := []struct {
		a, b    string
		overlap bool
	}{
		{`@irc_.*`, `@irc_.*`, true},             // identical
		{`@irc_.*`, `@irc_libera_.*`, true},      // one's prefix starts the other
		{`@(tg|sig)_.*`, `@sig_.*:hs`, true},     // an alternative
		{`@bot`, `@bot`, true},                   // identical literal
		{`@irc_[0-9]+`, `@irc_libera_.*`, false}, // same prefix, disjoint
		{`@irc_.*`, `@tg_.*`, false},
	}
	for _, tt := range tests {
		regA := strings.Replace(tg("one", "t1", "h1"), "'@one_.*'", "'"+tt.a+"'", 1)
		regB := strings.Replace(tg("two", "t2", "h2"), "'@two_.*'", "'"+tt.b+"'", 1)
		_, warns, err := Load("hs", writeRegs(t, map[string]string{"a.yaml": regA, "b.yaml": regB}))
		if err != nil {
			t.Fatal(err)
		}
		n := 0
		for _, w := range warns {
			if strings.Contains(w.Message, "overlaps") {
				n++
			}
		}
		if want := map[bool]int{true: 1, false: 0}[tt.overlap]; n != want {
			t.Errorf("%q vs %q: %d overlap warnings, want %d: %v", tt.a, tt.b, n, want, warns)
		}
	}
}

// TestSharedSender: two ASes with one sender user both hold it; neither may
// register it, each may act as it, and the warning names both files.
func TestSharedSender(t *testing.T) {
	dir := writeRegs(t, map[string]string{"a.yaml": tg("one", "t1", "h1"), "b.yaml": strings.Replace(tg("two", "t2", "h2"), "sender_localpart: twobot", "sender_localpart: onebot", 1)})
	a, b := filepath.Join(dir, "a.yaml"), filepath.Join(dir, "b.yaml")
	for _, order := range [][]string{{a, b}, {b, a}} {
		set, warns, err := Load("hs", order...)
		if err != nil {
			t.Fatal(err)
		}
		one, two := set.ByID("one"), set.ByID("two")
		if !errors.Is(set.CheckRegister(one, "@onebot:hs"), ErrExclusive) || !errors.Is(set.CheckRegister(two, "@onebot:hs"), ErrExclusive) {
			t.Error("an AS may register a sender user another AS shares")
		}
		if set.CanMasquerade(one, "@onebot:hs") != nil || set.CanMasquerade(two, "@onebot:hs") != nil {
			t.Error("an AS may not act as its own sender user")
		}
		if len(warns) != 1 || warns[0].File != a || !strings.Contains(warns[0].Message, b) {
			t.Errorf("warnings = %v", warns)
		}
	}
}

// TestManyOverlapsBounded: a thousand ASes claiming one namespace load
// fast, with a bounded list of overlap warnings.
func TestManyOverlapsBounded(t *testing.T) {
	var regs []*Registration
	for i := range 1000 {
		r, _, err := Parse(fmt.Sprintf("as%04d.yaml", i), []byte(fmt.Sprintf("id: as%d\nurl: null\nas_token: t%d\nhs_token: h%d\nsender_localpart: bot%d\nnamespaces:\n  users: [{exclusive: true, regex: '@.*'}]\n", i, i, i, i)))
		if err != nil {
			t.Fatal(err)
		}
		regs = append(regs, r)
	}
	start := time.Now()
	set, warns, err := NewSet("hs", regs)
	if err != nil {
		t.Fatal(err)
	}
	if len(warns) != maxOverlapWarnings+1 || !strings.Contains(warns[len(warns)-1].Message, "only the first") {
		t.Errorf("%d warnings, want %d and a last one saying more were left out", len(warns), maxOverlapWarnings+1)
	}
	if err := set.CheckRegister(set.ByID("as7"), "@x:hs"); !errors.Is(err, ErrExclusive) {
		t.Errorf("CheckRegister = %v, want M_EXCLUSIVE", err)
	}
	t.Logf("NewSet of 1000 overlapping ASes: %v", time.Since(start))
}

// TestSetMemory: a set keeps no compiled regex program per exclusive
// namespace (about 2 KiB each) after checking overlaps: 2,000 ASes whose
// exclusive aliases the matcher cannot decide without its regex.
func TestSetMemory(t *testing.T) {
	const ases = 2000
	regs := make([]*Registration, ases)
	for i := range regs {
		r, _, err := Parse(fmt.Sprintf("as%d.yaml", i), []byte(fmt.Sprintf("id: as%d\nurl: null\nas_token: t%d\nhs_token: h%d\nsender_localpart: bot%d\nnamespaces:\n  aliases: [{exclusive: true, regex: '#_as%d_.*:hs\\.example\\.org'}]\n  rooms: [{exclusive: true, regex: '!_as%d_[a-z]+:hs'}]\n", i, i, i, i, i, i)))
		if err != nil {
			t.Fatal(err)
		}
		regs[i] = r
	}
	var before, after runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&before)
	set, _, err := NewSet("hs.example.org", regs)
	if err != nil {
		t.Fatal(err)
	}
	runtime.GC()
	runtime.ReadMemStats(&after)
	per := float64(int64(after.HeapAlloc)-int64(before.HeapAlloc)) / ases
	if per > 1500 {
		t.Errorf("the set holds %.0f bytes per AS; want at most 1500", per)
	} else {
		t.Logf("%.0f bytes per AS", per)
	}
	if hits := set.AliasesInterested(nil, "#_as7_x:hs.example.org"); len(hits) != 1 || !hits[0].Exclusive {
		t.Errorf("hits %v, want AS 7's, exclusive", hits)
	}
	runtime.KeepAlive(set)
}
