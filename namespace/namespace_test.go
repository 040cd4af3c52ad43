package namespace

import (
	"errors"
	"fmt"
	"math/rand"
	"regexp/syntax"
	"slices"
	"strings"
	"testing"
	"time"
)

func TestMatchSemantics(t *testing.T) {
	tests := []struct {
		regex string
		id    string
		want  bool
	}{
		{`#logged_.*`, "#logged_test:localhost", true},
		{`#logged_`, "#logged_test:localhost", true}, // not end-anchored
		{`@irc_.*`, "@x_irc_1:hs", false},            // start-anchored
		{`@irc_.*`, "@IRC_bob:hs", false},            // case-sensitive
		{`@irc_.*:hs$`, "@irc_bob:hs", true},
		{`@irc_.*:hs$`, "@irc_bob:hs.evil", false},
		{`@.*:bridge\.example\.org`, "@x:bridge.example.org", true},
		{`@.*:bridge\.example\.org`, "@x:bridge.example.org.evil", true}, // contains, as Synapse
		{`@.*:bridge\.example\.org`, "@x:bridgeXexample.org", false},
		{`@(telegram|signal)_.*`, "@signal_1:hs", true},
		{`@(telegram|signal)_.*`, "@whatsapp_1:hs", false},
		{`@a_.*|@b_.*`, "@b_x:hs", true},
		{`^@anchored_`, "@anchored_x", true},
		{`(?i)@CaSe_`, "@case_x", true},
		{``, "@anything", true},
		{`@`, "@x", true},
		{`@[ab]c_`, "@bc_1", true},
		{`@[ab]c_`, "@cc_1", false},
		{`@ü_.*`, "@ü_x", true},
		{`@_t_\d+:hs`, "@_t_123:hs", true},
		{`@_t_\d+:hs`, "@_t_:hs", false},
		{`.*_bot:hs`, "@my_bot:hs", true},
		{`@x.y`, "@x\ny", false}, // . does not match newline
	}
	for _, tt := range tests {
		m, err := Compile([]Pattern{{Kind: Users, Owner: 7, Regex: tt.regex, Exclusive: true}})
		if err != nil {
			t.Fatalf("%q: %v", tt.regex, err)
		}
		got := m.Match(Users, tt.id)
		if (len(got) == 1) != tt.want {
			t.Errorf("%q on %q = %v, want match %v", tt.regex, tt.id, got, tt.want)
		}
		if len(m.Match(Aliases, tt.id)) != 0 {
			t.Errorf("%q matched the wrong kind", tt.regex)
		}
	}
}

func TestHitsPerOwner(t *testing.T) {
	m, err := Compile([]Pattern{
		{Kind: Users, Owner: 2, Regex: `@a_.*`},
		{Kind: Users, Owner: 2, Regex: `@a_b.*`, Exclusive: true},
		{Kind: Users, Owner: 0, Regex: `@.*`},
		{Kind: Users, Owner: 1, Regex: `@z_.*`, Exclusive: true},
	})
	if err != nil {
		t.Fatal(err)
	}
	got := m.Match(Users, "@a_bc:hs")
	want := []Hit{{Owner: 0}, {Owner: 2, Exclusive: true}}
	if !slices.Equal(got, want) {
		t.Errorf("got %v, want %v", got, want)
	}
	buf := make([]Hit, 0, 8)
	if allocs := testing.AllocsPerRun(100, func() { buf = m.AppendMatch(buf[:0], Users, "@a_bc:hs") }); allocs > 0 {
		t.Logf("AppendMatch allocates %.0f times per lookup", allocs)
	}
}

func TestCompileErrors(t *testing.T) {
	tests := []struct {
		regex, want string
	}{
		{`@(?=x)`, "lookaround"},
		{`@(?<!x)y`, "lookaround"},
		{`(a)\1`, "backreference"},
		{`@(unclosed`, "missing closing"},
		{strings.Repeat("a", 5000), "more than"},
		{`(a{1000}){1000}`, "invalid repeat count"},
	}
	for _, tt := range tests {
		_, err := Compile([]Pattern{{Regex: `@ok`}, {Regex: tt.regex}})
		var pe *PatternError
		if !errors.As(err, &pe) || pe.Index != 1 || !strings.Contains(err.Error(), tt.want) || len(err.Error()) > 300 {
			t.Errorf("Compile(%.20q) = %v, want a PatternError at index 1 with %q", tt.regex, err, tt.want)
		}
	}
}

// randomPatterns makes the mixes the index has to get right: prefixes,
// suffix-like factors, alternations, classes, anchors, case folding.
func randomPattern(r *rand.Rand) string {
	words := []string{"a", "ab", "irc", "tg", "x_y", "é", ".", "Bot", "k", "s", "ſ", "\u212a", "ß", "ω", "µ", "\ufffd"}
	w := func() string { return words[r.Intn(len(words))] }
	switch r.Intn(6) {
	case 0, 1:
		return randomTricky(r, w)
	case 2:
		return randomFolded(r, w)
	}
	switch r.Intn(10) {
	case 0:
		return "@" + w() + "_.*"
	case 1:
		return "@.*:" + w() + `\.org`
	case 2:
		return "@(" + w() + "|" + w() + ")_.*"
	case 3:
		return "@[ab]" + w() + ".*"
	case 4:
		return "@" + w() + "_.*:hs$"
	case 5:
		return "(?i)@" + w()
	case 6:
		return ".*" + w() + w()
	case 7:
		return "@" + w() + `\d+`
	case 8:
		return "^@" + w() + "(_x)?" + w()
	default:
		return w() + w()
	}
}

// randomTricky builds patterns around what makes literal extraction
// unsound: anchors and word boundaries inside groups after a literal, flags
// scoped to a group, empty alternation branches and character classes.
func randomTricky(r *rand.Rand, w func() string) string {
	anchors := []string{"^", `\A`, "$", `\z`, `\b`, `\B`, "(?m:^)", "(?m:$)"}
	a := func() string { return anchors[r.Intn(len(anchors))] }
	atoms := []string{
		"(" + a() + w() + ")", "(" + a() + w() + "|" + w() + ")", "(" + w() + "|" + a() + ")",
		"(|" + w() + ")", "(" + w() + "|)", "(?i:" + w() + ")", "(?s:.)", "(?s).", "[ab_]", "[^a]", `[\n:]`,
		"(?i)" + w(), w(), w() + a(), "(" + w() + ")?", "(" + a() + ")*", `\n`, ".*", ":hs",
	}
	var b strings.Builder
	if r.Intn(3) == 0 {
		b.WriteString([]string{"^", `\A`, "(?i)", "(?s)", "(?m)"}[r.Intn(5)])
	}
	b.WriteString([]string{"@", "#", ""}[r.Intn(3)])
	for n := r.Intn(4); n >= 0; n-- {
		b.WriteString(atoms[r.Intn(len(atoms))])
	}
	return b.String()
}

// randomFolded builds case-insensitive patterns, whole or scoped, keyed on
// their folded literals: prefixes, factors, classes, and words whose fold
// orbit mixes UTF-8 lengths (k and the Kelvin sign, s and ſ, ß and ẞ).
func randomFolded(r *rand.Rand, w func() string) string {
	switch r.Intn(8) {
	case 0:
		return "(?i)@" + w() + w() + "_.*"
	case 1:
		return "@(?i:" + w() + w() + ")_.*"
	case 2:
		return "@(?i:" + w() + ")" + w() + ".*:hs"
	case 3:
		return ".*(?i:" + w() + w() + w() + ")"
	case 4:
		return "(?i)@.*_" + w() + w() + "$"
	case 5:
		return "(?i)@[ab" + w() + "]" + w() + w()
	case 6:
		return "(?i)(@" + w() + "|#" + w() + ")" + w() + "_"
	default:
		return "@(?i)" + w() + "(?-i:" + w() + ")" + w()
	}
}

func randomID(r *rand.Rand) string {
	parts := []string{"@", "#", "a", "ab", "irc", "tg", "_", "x_y", "é", ":hs", ".org", "1", "IRC", "\n", "A",
		"Tg", "BOT", "bot", "K", "k", "\u212a", "s", "S", "ſ", "ß", "ẞ", "ω", "Ω", "\u2126", "µ", "Μ", "É", "\xff", "\ufffd", "\xc3"}
	var b strings.Builder
	for n := r.Intn(8); n >= 0; n-- {
		b.WriteString(parts[r.Intn(len(parts))])
	}
	return b.String()
}

func checkAgainstPlain(t *testing.T, pats []Pattern, ids []string) {
	t.Helper()
	m, err := Compile(pats)
	if err != nil {
		t.Fatal(err)
	}
	p, err := NewPlain(pats)
	if err != nil {
		t.Fatal(err)
	}
	for _, id := range ids {
		for k := Kind(0); k < numKinds; k++ {
			got, want := m.Match(k, id), p.AppendMatch(nil, k, id)
			if !slices.Equal(got, want) {
				t.Fatalf("kind %v id %q: indexed %v, plain %v (patterns %v)", k, id, got, want, pats)
			}
		}
	}
}

func TestIndexedEqualsPlainRandomized(t *testing.T) {
	r := rand.New(rand.NewSource(1))
	for round := 0; round < 200; round++ {
		var pats []Pattern
		for i := r.Intn(40); i >= 0; i-- {
			pats = append(pats, Pattern{Kind: Kind(r.Intn(2)), Owner: r.Intn(10), Regex: randomPattern(r), Exclusive: r.Intn(2) == 0})
		}
		ids := make([]string, 50)
		for i := range ids {
			ids[i] = randomID(r)
		}
		checkAgainstPlain(t, pats, ids)
	}
}

// FuzzMatcherMatchesPlain checks the index against the plain loop on
// patterns drawn from seed, plus pattern itself when it is a valid one (so
// the fuzzer also mutates patterns directly).
func FuzzMatcherMatchesPlain(f *testing.F) {
	f.Add(int64(1), "@irc_bob:hs", "")
	f.Add(int64(2), "@x:a.org", "")
	f.Add(int64(3), "", "")
	// Anchors inside a group after a literal never match there (issue 13).
	for _, c := range []struct{ pattern, id string }{
		{`@a(^b)`, "@ab:hs"}, {`@bridge_(^x|y).*`, "@bridge_x1:hs"}, {`#irc_(^chan)`, "#irc_chan:hs"},
		{`@a(\Ab)`, "@ab"}, {`@a(?m:^b)`, "@a\nb"}, {`@a\n(?m:^b)`, "@a\nb"}, {`@a(\bb)`, "@ab"},
		{`@a(\Bb)`, "@ab"}, {`@a($|b)`, "@ab"}, {`(^@a|^@b)c`, "@bc"}, {`@a(|^)b`, "@ab"}, {`@(?i:A)b`, "@ab"},
		// Case folding, and orbits whose runes differ in UTF-8 length.
		{`(?i)@irc_.*`, "@IRC_1:hs"}, {`@(?i:tg)_.*`, "@tG_1:hs"}, {`(?i)@kelvin`, "@\u212aelvin"},
		{`(?i)@\x{212a}x`, "@kx"}, {`(?i)@sig`, "@\u017fig"}, {`(?i)@ß_`, "@\u1e9e_"}, {`(?i)@ω`, "@\u2126"},
		{`.*(?i:bridge)`, "@x_BRIDGE"}, {`@\x{fffd}x`, "@\xffx"}, {`(?i)@\x{fffd}ab`, "@\xc3AB"},
	} {
		f.Add(int64(4), c.id, c.pattern)
	}
	f.Fuzz(func(t *testing.T, seed int64, id, pattern string) {
		r := rand.New(rand.NewSource(seed))
		var pats []Pattern
		for i := r.Intn(20); i >= 0; i-- {
			pats = append(pats, Pattern{Kind: Users, Owner: r.Intn(5), Regex: randomPattern(r), Exclusive: r.Intn(2) == 0})
		}
		if pattern != "" && Validate(pattern) == nil {
			pats = append(pats, Pattern{Kind: Users, Owner: 5, Regex: pattern, Exclusive: true})
		}
		checkAgainstPlain(t, pats, []string{id, randomID(r)})
	})
}

// TestAnchorInsideGroup: a begin-of-text anchor after a literal can never
// match, so the literal before it must not become an exact prefix.
func TestAnchorInsideGroup(t *testing.T) {
	tests := []struct{ regex, id string }{
		{`@a(^b)`, "@ab:hs"},
		{`@bridge_(^x|y).*`, "@bridge_x1:hs"},
		{`#irc_(^chan)`, "#irc_chan:hs"},
		{`@a(\Ab)`, "@ab:hs"},
		{`@a(?m:^b)`, "@ab:hs"},
		{`@a(\Bb)`, "@ab:hs"},
		{`(@a|^@b)(^c)`, "@bc:hs"},
	}
	for _, tt := range tests {
		checkAgainstPlain(t, []Pattern{{Kind: Users, Owner: 1, Regex: tt.regex, Exclusive: true}}, []string{tt.id})
	}
	// Anchors at the start of the whole pattern are dropped, and the
	// pattern stays an exact prefix that runs no regex.
	for _, re := range []string{`^@irc_.*`, `\A@irc_`, `(^@irc_|^@tg_)`, `^(?:^@irc_)`} {
		if l := analyze(re); !l.exact || !slices.Contains(l.prefixes, "@irc_") {
			t.Errorf("analyze(%q) = %+v, want the exact prefix @irc_", re, l)
		}
	}
}

// TestCaseInsensitiveIndexed: (?i) patterns, whole or scoped, are keyed on
// their case-folded literals, and the folded lookup finds every ID Go's
// regexp matches, Unicode simple folds included.
func TestCaseInsensitiveIndexed(t *testing.T) {
	tests := []struct {
		regex string
		key   string // the prefix or factor the pattern is keyed on, before folding
		exact bool   // a key found is a match: no regex runs
		ids   []string
	}{
		{`(?i)@irc_.*`, "@irc_", true, []string{"@irc_a:hs", "@IRC_b:hs", "@IrC_c:hs", "@x_irc_1:hs", "@irk_1:hs"}},
		{`@(?i:tg)_.*`, "@tg_", true, []string{"@tg_1:hs", "@TG_1:hs", "@tG_1:hs", "@TG-1:hs", "#tg_1:hs"}},
		{`(?i)@[ab]c_`, "@ac_", true, []string{"@Ac_1", "@bC_1", "@cc_1"}},
		// 'k' matches U+212A KELVIN SIGN (3 bytes), 's' U+017F LONG S (2 bytes).
		{`(?i)@kelvin_`, "@kelvin_", true, []string{"@\u212Aelvin_1", "@kelvin_1", "@KELVIN_1", "@\u212A", "@elvin_1"}},
		{`(?i)@\x{212A}x_`, "@kx_", true, []string{"@kx_1", "@Kx_1", "@\u212AX_1", "@x_1"}},
		{`(?i)@sig_`, "@sig_", true, []string{"@\u017Fig_1", "@SIG_1", "@\u017Fi"}},
		// ß and U+1E9E: 2 and 3 bytes; no full folding to "ss".
		{`(?i)@straße_`, "@straße_", true, []string{"@STRA\u1E9EE_1", "@strasse_1", "@STRAßE_1", "@straße_1"}},
		// ω, Ω and U+2126 OHM SIGN; å, Å and U+212B ANGSTROM SIGN; µ (U+00B5), μ and Μ.
		{`(?i)@ωmega_`, "@ωmega_", true, []string{"@\u2126mega_1", "@ΩMEGA_1", "@ωmega_1", "@wmega_1"}},
		{`(?i)@åsa_`, "@åsa_", true, []string{"@\u212Bsa_1", "@Åsa_1", "@asa_1"}},
		{`(?i)@\x{b5}_`, "@µ_", true, []string{"@μ_1", "@Μ_1", "@\u00B5_1", "@m_1"}},
		{`@.*(?i:_bot_bridge)`, "_bot_bridge", false, []string{"@x_BOT_Bridge:hs", "@x_bot_bridge", "@_bot_brid"}},
		// The folded prefix is longer than the case-sensitive factor "17_"
		// (which hundreds of ASes' IDs hold).
		{`@(?i:_bot)17_.*`, "@_bot17_", true, []string{"@_BOT17_g1", "@_bot117_g1", "@_as17_g1", "@_BOT17-"}},
		// A case-sensitive literal or class that folding widens: keyed, not exact.
		{`@(?i:xy)k_`, "@xyk_", false, []string{"@XYk_1", "@xyK_1", "@xy\u212a_1"}},
		{`@(?i:xy)[ab]_`, "@xya_", false, []string{"@XYa_1", "@xyA_1", "@xyb_"}},
		{`(?i:@[ab])|@[cd]`, "@a", false, []string{"@A", "@c", "@C"}},
		{`(?i)@[ab]|@[cd]`, "@c", true, []string{"@A", "@c", "@C", "@e"}}, // (?i) holds in both branches
	}
	for _, tt := range tests {
		l := analyze(tt.regex)
		key := foldString(tt.key)
		if !l.folded || (!slices.Contains(l.prefixes, key) && l.factor != key) || l.exact != tt.exact {
			t.Errorf("analyze(%q) = %+v, want keyed on %q, exact %v", tt.regex, l, key, tt.exact)
		}
		var pats []Pattern
		for i := range 50 { // others' patterns around it
			pats = append(pats, Pattern{Kind: Users, Owner: i, Regex: fmt.Sprintf(`(?i)@other%d_.*`, i)})
		}
		pats = append(pats, Pattern{Kind: Users, Owner: 50, Regex: tt.regex, Exclusive: true})
		m, err := Compile(pats)
		if err != nil {
			t.Fatal(err)
		}
		if ix := m.kinds[Users]; len(ix.scan) != 0 || ix.fold == nil {
			t.Errorf("%q: %d patterns scanned, fold keys %v; want none scanned", tt.regex, len(ix.scan), ix.fold != nil)
		}
		checkAgainstPlain(t, pats, tt.ids)
	}
}

func foldString(s string) string { return string(foldKey(nil, s)) }

// TestFoldKey: the ID's fold is the fold regexp/syntax gives a (?i)
// literal, and never longer than the ID.
func TestFoldKey(t *testing.T) {
	tests := []struct{ in, want string }{
		{"@irc_Bob:HS", "@IRC_BOB:HS"},
		{"k\u212AK", "KKK"},
		{"s\u017FS", "SSS"},
		{"ω\u2126Ω", "ΩΩΩ"},
		{"ß\u1E9E", "ßß"},
		{"é\xff\uFFFD", "É\xff\uFFFD"}, // an invalid byte is kept apart from U+FFFD
	}
	for _, tt := range tests {
		if got := foldString(tt.in); got != tt.want || len(got) > len(tt.in) {
			t.Errorf("foldKey(%q) = %q, want %q", tt.in, got, tt.want)
		}
	}
	for _, r := range []rune{'a', 'K', '\u212A', '\u017F', 'ß', '\u1E9E', 'Ω', '\u2126', 'µ', 'ǅ', 'é'} {
		re, err := syntax.Parse("(?i)"+string(r), syntax.Perl)
		if err != nil {
			t.Fatal(err)
		}
		if re.Op != syntax.OpLiteral || foldRune(r) != re.Rune[0] {
			t.Errorf("foldRune(%q) = %q, regexp/syntax folds it to %v", r, foldRune(r), re)
		}
	}
}

// TestReplacementCharNotKey: a literal U+FFFD matches any invalid UTF-8
// byte of the ID, so it is never part of a key.
func TestReplacementCharNotKey(t *testing.T) {
	ids := []string{"@\xffx_1", "@y:\xfexyz", "@\xc3AB_", "@\xffxy", "@a\x80bcd", "@\uFFFDx_"}
	for _, re := range []string{"@\uFFFDx_", "@.*:\uFFFDxyz", "(?i)@\uFFFDab_", "@[\uFFFD]xy", "@a\uFFFDbcd"} {
		checkAgainstPlain(t, []Pattern{{Kind: Users, Owner: 1, Regex: re}}, ids)
	}
}

// benchPatterns is the mix of issue #2: per AS a literal prefix, a server
// suffix and an alternation.
func benchPatterns(n int) []Pattern {
	pats := make([]Pattern, 0, 3*n)
	for i := 0; i < n; i++ {
		pats = append(pats,
			Pattern{Kind: Users, Owner: i, Regex: fmt.Sprintf(`@_as%d_.*`, i), Exclusive: true},
			Pattern{Kind: Users, Owner: i, Regex: fmt.Sprintf(`@.*:as%d\.bridge\.example\.org`, i)},
			Pattern{Kind: Users, Owner: i, Regex: fmt.Sprintf(`@(tg|sig)%d_.*`, i), Exclusive: i%2 == 0})
	}
	return pats
}

func benchIDs(n int) []string {
	ids := make([]string, 1024)
	for i := range ids {
		switch i % 4 {
		case 0:
			ids[i] = fmt.Sprintf("@_as%d_user%d:example.org", i%n, i)
		case 1:
			ids[i] = fmt.Sprintf("@user%d:as%d.bridge.example.org", i, i%n)
		case 2:
			ids[i] = fmt.Sprintf("@sig%d_%d:example.org", i%n, i)
		default:
			ids[i] = fmt.Sprintf("@alice%d:example.org", i) // nobody's
		}
	}
	return ids
}

// benchIndexed measures the indexed matcher's user lookups of ids.
func benchIndexed(b *testing.B, pats []Pattern, ids []string) {
	m, err := Compile(pats)
	if err != nil {
		b.Fatal(err)
	}
	buf := make([]Hit, 0, 16)
	b.ReportAllocs()
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		buf = m.AppendMatch(buf[:0], Users, ids[i%len(ids)])
	}
	b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "lookups/s")
}

func BenchmarkMatch(b *testing.B) {
	for _, n := range []int{10, 100, 1000, 10000} {
		pats, ids := benchPatterns(n), benchIDs(n)
		b.Run(fmt.Sprintf("ases=%d/indexed", n), func(b *testing.B) { benchIndexed(b, pats, ids) })
		b.Run(fmt.Sprintf("ases=%d/plain", n), func(b *testing.B) {
			p, err := NewPlain(pats)
			if err != nil {
				b.Fatal(err)
			}
			// The plain loop is slow at scale: a fixed number of lookups
			// keeps the run short whatever -benchtime says.
			lookups := max(10, 2_000_000/len(pats))
			buf := make([]Hit, 0, 16)
			b.ResetTimer()
			for i := 0; i < lookups; i++ {
				buf = p.AppendMatch(buf[:0], Users, ids[i%len(ids)])
			}
			b.ReportMetric(float64(lookups)/b.Elapsed().Seconds(), "lookups/s")
		})
	}
}

// benchCasefoldPatterns is the usual mix plus, per AS, a case-insensitive
// pattern: whole-pattern (?i) for even ASes, a scoped (?i:...) for odd ones.
func benchCasefoldPatterns(n int) []Pattern {
	pats := benchPatterns(n)
	for i := 0; i < n; i++ {
		re := fmt.Sprintf(`(?i)@_bot%d_.*`, i)
		if i%2 == 1 {
			re = fmt.Sprintf(`@(?i:_bot)%d_.*`, i)
		}
		pats = append(pats, Pattern{Kind: Users, Owner: i, Regex: re})
	}
	return pats
}

// benchCasefoldIDs adds ghosts of the case-insensitive namespaces, in
// other cases than the pattern's, to the usual IDs.
func benchCasefoldIDs(n int) []string {
	ids := benchIDs(n)
	for i := range ids {
		switch i % 8 {
		case 1:
			ids[i] = fmt.Sprintf("@_BOT%d_user%d:example.org", i%n, i)
		case 5:
			ids[i] = fmt.Sprintf("@_Bot%d_user%d:example.org", i%n, i)
		}
	}
	return ids
}

// BenchmarkMatchCasefold is BenchmarkMatch with a quarter of the patterns
// case-insensitive.
func BenchmarkMatchCasefold(b *testing.B) {
	for _, n := range []int{10, 100, 1000, 10000} {
		pats, ids := benchCasefoldPatterns(n), benchCasefoldIDs(n)
		b.Run(fmt.Sprintf("ases=%d/indexed", n), func(b *testing.B) { benchIndexed(b, pats, ids) })
	}
}

func BenchmarkCompile(b *testing.B) {
	pats := benchPatterns(10000)
	for i := 0; i < b.N; i++ {
		if _, err := Compile(pats); err != nil {
			b.Fatal(err)
		}
	}
}

// TestPathologicalPatterns: patterns that make backtracking engines blow
// up compile and match in linear time here (RE2), and the literal index
// stays bounded; the deadline only catches a hang.
func TestPathologicalPatterns(t *testing.T) {
	patterns := []string{
		`(a|aa)*b`, `(.*)*x`, `((((((((((a*)*)*)*)*)*)*)*)*)*)*`, `(x+x+)+y`,
		`[a-z]{1000}`, `.{1000}`, `(a|b|c|d|e|f|g|h){100}`, `(?i)` + strings.Repeat("[a-z]", 500),
		`@` + strings.Repeat("(a|b)", 400), `(@a|@b|@c|@d){1,100}`, `(ab|cd|ef|gh|ij){20}:hs`,
	}
	input := "@" + strings.Repeat("a", 254) // Matrix's longest ID; the dispatcher refuses longer ones
	for _, re := range patterns {
		t.Run(fmt.Sprintf("%.30s", re), func(t *testing.T) {
			done := make(chan error, 1)
			go func() {
				var ps []Pattern
				for i := range 100 { // as if 100 ASes all registered it
					ps = append(ps, Pattern{Kind: Users, Owner: i, Regex: re})
				}
				m, err := Compile(ps)
				if err == nil {
					m.Match(Users, input)
				}
				done <- err
			}()
			select {
			case err := <-done:
				if err != nil {
					t.Logf("refused: %v", err)
				}
			case <-time.After(20 * time.Second):
				t.Fatal("compile and match did not finish in 20s")
			}
		})
	}
}

// TestSharedFactorNotIndexed: when every AS's pattern ends in the same
// server name, that literal selects nothing; the distinct prefixes are
// indexed instead, so a lookup runs only the regexes whose prefix matches.
func TestSharedFactorNotIndexed(t *testing.T) {
	var pats []Pattern
	for i := range 1000 {
		pats = append(pats, Pattern{Kind: Rooms, Owner: i, Regex: fmt.Sprintf(`!_as%d_.*:example\.org`, i)})
	}
	pats = append(pats, Pattern{Kind: Rooms, Owner: 1000, Regex: `!.*:bridge\.example\.org`}) // a distinct factor stays a factor
	m, err := Compile(pats)
	if err != nil {
		t.Fatal(err)
	}
	ix := m.kinds[Rooms]
	if ix.exact.ac == nil || len(ix.scan) != 0 {
		t.Fatalf("want one factor in the automaton and nothing scanned, got ac=%v scan=%d", ix.exact.ac != nil, len(ix.scan))
	}
	for id, want := range map[string]int{"!_as7_abc:example.org": 0, "!x:bridge.example.org": 1} {
		n := 0
		ix.exact.ac.each(id, func(int32) { n++ })
		if n != want {
			t.Errorf("the automaton reports %d patterns for %s, want %d (the shared suffix must not be a key)", n, id, want)
		}
	}
	if got := m.Match(Rooms, "!_as7_abc:example.org"); len(got) != 1 || got[0].Owner != 7 {
		t.Errorf("Match = %v, want AS 7", got)
	}
}
