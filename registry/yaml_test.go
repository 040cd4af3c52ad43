package registry

import (
	"errors"
	"fmt"
	"reflect"
	"regexp"
	"strings"
	"testing"

	"gopkg.in/yaml.v3"
)

// TestPyTag: plain scalars get the type PyYAML's safe_load gives them (the
// table was made by running PyYAML 6.0.3).
func TestPyTag(t *testing.T) {
	want := map[string]string{
		"1e3": "str", "0x1F": "int", "yes": "bool", "No": "bool", "ON": "bool", "off": "bool", "y": "str",
		"1_000": "int", "0o17": "str", "017": "int", "08": "str", "0b101": "int", "+1": "int", "-0": "int",
		"1.5e3": "str", "1.0e+3": "float", ".5": "float", "1.": "float", ".inf": "float", "-.Inf": "float",
		".NaN": "float", "1:30": "int", "190:20:30": "int", "1:30.5": "float", "2001-12-14": "timestamp",
		"2001-12-14t21:59:43.10-05:00": "timestamp", "2001-1-1 1:00:00": "timestamp", "~": "null",
		"null": "null", "Null": "null", "nULL": "str", "": "null", "true": "bool", "tRue": "str", "abc": "str",
		"0x": "str", "0b": "str", "+.5": "str", "1__0": "int", "0_7": "int", "12e": "str", "1:60": "str",
		"-1:30": "int", "<<": "merge",
	}
	for v, tag := range want {
		if got := pyTag(v); got != "!!"+tag {
			t.Errorf("pyTag(%q) = %s, want !!%s", v, got, tag)
		}
	}
}

// TestPyTagWords: resolveTag's null and bool words are PyYAML's resolvers.
func TestPyTagWords(t *testing.T) {
	pyBool := regexp.MustCompile(`^(?:yes|Yes|YES|no|No|NO|true|True|TRUE|false|False|FALSE|on|On|ON|off|Off|OFF)$`)
	pyNull := regexp.MustCompile(`^(?:~|null|Null|NULL|)$`)
	words := []string{"", "~", "~~", " ", "null", "nulL", "NULL", "NuLL", "null ", "yes", "yEs", "YES", "Yes", "y", "n", "no", "No",
		"nO", "NO", "true", "True", "TRUE", "TRue", "false", "False", "FALSE", "fALSE", "on", "On", "ON", "oN", "off", "Off", "OFF", "oFF", "0", "1"}
	for _, w := range words {
		want := "!!str"
		switch {
		case pyNull.MatchString(w):
			want = "!!null"
		case pyBool.MatchString(w):
			want = "!!bool"
		case pyInt.MatchString(w):
			want = "!!int"
		}
		if got := resolveTag(w); got != want {
			t.Errorf("resolveTag(%q) = %s, PyYAML's resolvers say %s", w, got, want)
		}
	}
}

// TestPyTagShortcut: the first-byte shortcut answers as the resolvers do.
func TestPyTagShortcut(t *testing.T) {
	for c := 0; c < 256; c++ {
		for _, rest := range []string{"", "0", "1:30", "es", "ull", "rue", "alse", "n", "ff", "x1F", ".5", "<", "_1", "b1", "\n"} {
			v := string([]byte{byte(c)}) + rest
			if got, want := pyTag(v), resolveTag(v); got != want {
				t.Errorf("pyTag(%q) = %s, the resolvers say %s", v, got, want)
			}
		}
	}
}

const base = "id: irc\nurl: http://127.0.0.1:9999\nas_token: as-secret\nhs_token: hs-secret\nsender_localpart: ircbot\n"

// TestYAMLParity: what PyYAML (and so Synapse) reads, the parser reads the
// same way: merge keys, aliases as keys, YAML 1.1 scalar types.
func TestYAMLParity(t *testing.T) {
	tests := []struct {
		name  string
		yaml  string
		check func(*Registration) bool
	}{
		{"merge key in a namespace", base + "defaults: &d {exclusive: true, regex: '@x_.*'}\nnamespaces:\n  users:\n    - <<: *d\n      regex: '@irc_.*'\n",
			func(r *Registration) bool {
				return len(r.Namespaces.Users) == 1 && r.Namespaces.Users[0] == Namespace{Regex: "@irc_.*", Exclusive: true, Line: 9}
			}},
		{"merge list: the first mapping wins", base + "a: &a {regex: '@a_.*'}\nb: &b {regex: '@b_.*', exclusive: false}\nc: &c {exclusive: true}\nnamespaces:\n  users:\n    - <<: [*a, *b, *c]\n",
			func(r *Registration) bool {
				return len(r.Namespaces.Users) == 1 && r.Namespaces.Users[0].Regex == "@a_.*" && !r.Namespaces.Users[0].Exclusive
			}},
		{"merge at the top", "common: &common\n  url: http://x:1\n  sender_localpart: bot\n  rate_limited: false\nid: a\nas_token: t\nhs_token: h\n<<: *common\nurl: http://own:2\nnamespaces: {}\n",
			func(r *Registration) bool {
				return r.URL == "http://own:2" && r.SenderLocalpart == "bot" && !r.RateLimited
			}},
		{"alias as a key", "x: &k id\n*k : irc\nurl: null\nas_token: t\nhs_token: h\nsender_localpart: b\nnamespaces: {}\n",
			func(r *Registration) bool { return r.ID == "irc" }},
		{"alias as a value", "t: &tok shared-secret\nid: a\nurl: null\nas_token: *tok\nhs_token: h\nsender_localpart: b\nnamespaces: {}\n",
			func(r *Registration) bool { return r.ASToken.Equal("shared-secret") }},
		{"1e3 is a string to PyYAML", strings.Replace(base, "hs-secret", "1e3", 1) + "namespaces: {}\n",
			func(r *Registration) bool { return r.HSToken.Equal("1e3") }},
		{"a quoted number is a string", strings.Replace(base, "as-secret", `"0x1F"`, 1) + "namespaces: {}\n",
			func(r *Registration) bool { return r.ASToken.Equal("0x1F") }},
		{"an explicit !!str tag", strings.Replace(base, "as-secret", "!!str 0x1F", 1) + "namespaces: {}\n",
			func(r *Registration) bool { return r.ASToken.Equal("0x1F") }},
		{"yes and on are booleans", base + "rate_limited: off\nnamespaces:\n  users:\n    - {regex: '@irc_.*', exclusive: yes}\n",
			func(r *Registration) bool { return !r.RateLimited && r.Namespaces.Users[0].Exclusive }},
		{"a quoted '<<' is a plain key", base + "'<<': {url: http://no:1}\nnamespaces: {}\n",
			func(r *Registration) bool { return r.URL == "http://127.0.0.1:9999" && r.Extra["<<"] != nil }},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r, _, err := Parse("p.yaml", []byte(tt.yaml))
			if err != nil {
				t.Fatal(err)
			}
			if !tt.check(r) {
				t.Errorf("parsed %+v", r)
			}
		})
	}
}

// TestYAMLRefused: what Synapse refuses, or what PyYAML would silently
// change, is refused with file, line, field and reason; no token leaks.
func TestYAMLRefused(t *testing.T) {
	ns := "namespaces:\n  users:\n    - {regex: '@irc_.*', exclusive: true}\n"
	tests := []struct {
		name string
		yaml string
		want []string
	}{
		{"two users lists", base + "namespaces:\n  users:\n    - {regex: '@a_.*', exclusive: true}\n  users:\n    - {regex: '@b_.*', exclusive: true}\n",
			[]string{"p.yaml:9: namespaces.users: key written twice (first on line 7)"}},
		{"two ids", base + "id: other\n" + ns, []string{"p.yaml:6: id: key written twice (first on line 1)"}},
		{"all problems at once", base + "id: other\nprotocols: [1]\n" + ns, []string{"id: key written twice", "protocols[0]: must be a string"}},
		{"two merge keys", base + "a: &a {x: 1}\n" + "m:\n  <<: *a\n  <<: *a\n" + ns, []string{"m.<<: key written twice"}},
		{"hex as_token", strings.Replace(base, "as-secret", "0x1F", 1) + ns, []string{"p.yaml:3: as_token: must be a string, got int (quote it"}},
		{"int hs_token", strings.Replace(base, "hs-secret", "123", 1) + ns, []string{"p.yaml:4: hs_token: must be a string, got int"}},
		{"numeric id", strings.Replace(base, "id: irc", "id: 123", 1) + ns, []string{"p.yaml:1: id: must be a string, got int \"123\""}},
		{"boolean id", strings.Replace(base, "id: irc", "id: yes", 1) + ns, []string{"id: must be a string, got bool"}},
		{"date sender", strings.Replace(base, "ircbot", "2001-12-14", 1) + ns, []string{"sender_localpart: must be a string, got timestamp"}},
		{"numeric url", strings.Replace(base, "http://127.0.0.1:9999", "8080", 1) + ns, []string{"url: must be a string, got int"}},
		{"numeric regex", base + "namespaces:\n  users:\n    - {regex: 123, exclusive: true}\n", []string{"p.yaml:8: namespaces.users[0].regex: must be a string, got int \"123\""}},
		{"null regex", base + "namespaces:\n  users:\n    - {regex: null, exclusive: true}\n", []string{"namespaces.users[0].regex: must be a string, got null"}},
		{"numeric protocol", base + "protocols: [irc, 1]\n" + ns, []string{"p.yaml:6: protocols[1]: must be a string, got int"}},
		{"protocols not a list", base + "protocols: irc\n" + ns, []string{"protocols: must be a list of strings"}},
		{"recursive alias", base + "a: &a [*a]\n" + ns, []string{"p.yaml:6: a[0]: alias *a refers to a node that contains it"}},
		{"merge of a scalar", base + "a: &a 1\nm:\n  <<: *a\n" + ns, []string{"m.<<: a merge key takes a mapping or a list of mappings, got int"}},
		{"merge of a token", "t: &t as-secret\n" + base + "m:\n  <<: [*t]\n" + ns, []string{"m.<<[0]: a merge key takes mappings, got str"}},
		{"unknown tag", base + "x: !custom 1\n" + ns, []string{"x: tag !custom is not one PyYAML's safe_load knows"}},
		{"mapping as key", base + "? {a: 1}\n: 2\n" + ns, []string{"a key must be a scalar"}},
		{"two documents", base + ns + "---\nid: other\n", []string{"a second YAML document"}},
		{"billion laughs", base + "a: &a [x, x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a, *a]\nc: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b, *b]\nd: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c, *c]\ne: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d, *d]\nf: [*e, *e, *e, *e, *e, *e, *e, *e, *e, *e]\n" + ns,
			[]string{"more than 100000 nodes once aliases are expanded"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, _, err := Parse("p.yaml", []byte(tt.yaml))
			var fe *FileError
			if !errors.As(err, &fe) {
				t.Fatalf("error %v is not a *FileError", err)
			}
			for _, w := range tt.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error lacks %q:\n%v", w, err)
				}
			}
			if strings.Contains(err.Error(), "secret") || strings.Contains(err.Error(), "0x1F") {
				t.Errorf("error leaks a token: %v", err)
			}
		})
	}
}

// TestLenientAsSynapse: what Synapse loads with a shrug loads here, with a
// lint warning.
func TestLenientAsSynapse(t *testing.T) {
	ns := "namespaces:\n  users:\n    - {regex: '@irc_.*', exclusive: true}\n"
	tests := []struct {
		name, yaml, warn string
		check            func(*Registration) bool
	}{
		{"rate_limited not a boolean", base + "rate_limited: maybe\n" + ns, `p.yaml:6: rate_limited: not true or false (got str "maybe"); ignored`,
			func(r *Registration) bool { return r.RateLimited }},
		{"rate_limited a number", base + "rate_limited: 0\n" + ns, "rate_limited: not true or false (got int", func(r *Registration) bool { return r.RateLimited }},
		{"protocols an empty string", base + "protocols: ''\n" + ns, "protocols: str \"\" is not a list; ignored", func(r *Registration) bool { return len(r.Protocols) == 0 }},
		{"protocols false", base + "protocols: false\n" + ns, "protocols: bool \"false\" is not a list", func(r *Registration) bool { return len(r.Protocols) == 0 }},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r, warns, err := Parse("p.yaml", []byte(tt.yaml))
			if err != nil {
				t.Fatal(err)
			}
			var all []string
			for _, w := range warns {
				all = append(all, w.String())
			}
			if !strings.Contains(strings.Join(all, "\n"), tt.warn) || !tt.check(r) {
				t.Errorf("warnings %q lack %q, or parsed %+v", all, tt.warn, r)
			}
		})
	}
}

// FuzzResolveInPlace: a tree without anchors resolved in place is the
// tree the copying resolver makes, with the same problems.
func FuzzResolveInPlace(f *testing.F) {
	f.Add([]byte(valid))
	f.Add([]byte("a: {<<: {b: 1, c: 2}, b: 3}\nl: [yes, '1', !!str 2, [x, {y: z}]]\n"))
	f.Add([]byte("a: 1\na: 2\n<<: [{x: 1}, {x: 2}]\n=: 3\n"))
	f.Fuzz(func(t *testing.T, data []byte) {
		decode := func() *yaml.Node {
			var doc yaml.Node
			if yaml.Unmarshal(data, &doc) != nil {
				return nil
			}
			return &doc
		}
		a, b := decode(), decode()
		if a == nil || anchored(a) {
			return
		}
		pc, pi := &parser{file: "f"}, &parser{file: "f"}
		copied := (&resolver{p: pc, active: map[*yaml.Node]bool{}}).node(a, "(file)")
		inPlace := (&resolver{p: pi, active: map[*yaml.Node]bool{}, inPlace: true}).node(b, "(file)")
		if d := nodeDiff(copied, inPlace, "(file)"); d != "" {
			t.Fatalf("in place differs from copied at %s", d)
		}
		if !reflect.DeepEqual(pc.problems, pi.problems) {
			t.Fatalf("problems: copied %v, in place %v", pc.problems, pi.problems)
		}
	})
}

// nodeDiff names the first place where the resolved trees a and b differ
// in what the parser reads of them ("" if nowhere).
func nodeDiff(a, b *yaml.Node, at string) string {
	if a == nil || b == nil {
		if a != b {
			return at + ": one is nil"
		}
		return ""
	}
	if a.Kind != b.Kind || a.Tag != b.Tag || a.Value != b.Value || a.Line != b.Line || a.Column != b.Column ||
		a.Style != b.Style || len(a.Content) != len(b.Content) {
		return fmt.Sprintf("%s: %+v vs %+v", at, *a, *b)
	}
	for i := range a.Content {
		if d := nodeDiff(a.Content[i], b.Content[i], fmt.Sprintf("%s[%d]", at, i)); d != "" {
			return d
		}
	}
	return ""
}

// TestKeyTwiceInLargeMapping: a key written twice is refused in a mapping
// of more keys than keysSeen keeps in its array too.
func TestKeyTwiceInLargeMapping(t *testing.T) {
	for _, n := range []int{3, 16, 17, 40} {
		var b strings.Builder
		b.WriteString(valid)
		for i := range n {
			fmt.Fprintf(&b, "x%d: 1\n", i)
		}
		b.WriteString("x1: 2\n")
		_, _, err := Parse("f.yaml", []byte(b.String()))
		if err == nil || !strings.Contains(err.Error(), "x1: key written twice") {
			t.Errorf("%d extra keys: err = %v, want x1 written twice", n, err)
		}
	}
}
