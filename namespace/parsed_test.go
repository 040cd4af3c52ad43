package namespace

import (
	"math/rand"
	"reflect"
	"regexp"
	"regexp/syntax"
	"slices"
	"testing"
)

// parsedSeeds are patterns with every shape the one-parse analyses follow
// regexp through: anchors, one-pass programs, captures, failing branches,
// case folding, U+FFFD, and the usual namespaces.
var parsedSeeds = []string{
	`@_as5_.*`, `@.*:as5\.bridge\.example\.org`, `@(tg|sig)5_n1_.*`, `#_as5_.*:bench\.example\.org`,
	`(?i)@_bot5_.*`, `@(?i:_bot)5_.*`, `@(?:_bot5_|\d+_bot5_).*`, `irc_.*`, `@.*`, ``, `.*`, `@`,
	`^@whatsapp_.*:example\.com$`, `^@bot:example\.com$`, `^irc_.*$`, `^(@a)$`, `(^@a)`, `^^@a`, `\A@a`,
	`^(?:)@a$`, `^@a(b)c$`, `(?m)^@a`, `@a(^b)`, `@a[^\x00-\x{10FFFF}]`, `@a|[^\x00-\x{10FFFF}]`,
	`[^\x00-\x{10FFFF}]|@b`, `(?:[^\x00-\x{10FFFF}])*@`, `(ab)+c`, `(?:)+a`, `a+b`, `@\x{fffd}x`,
	`(?i)kx`, `(?i)@k`, `@[a]`, `[@]a`, `@a{2}b`, `@a{0}b`, `(a|b)c`, `ab|ac`, `@a$|@b`, `x*@`,
	`@a\b`, `@[\x{D800}-\x{E000}]x`, `\Q@a.b\E.*`, `@a(?:b|c)+`, `(?i:@)a`, `@(a)(b)`, `^$`, `$`,
	`^@a|^@b`, `(?s)@.x`, `@a\z`, `@\pL+_x`, `(?U)@a+?b`, `@[a-c]x`, `@a??b`,
}

// TestParsedLiteralPrefix: LiteralPrefix says what a compiled regexp's
// LiteralPrefix does, or, unsure, that or "".
func TestParsedLiteralPrefix(t *testing.T) {
	for _, re := range allParsedPatterns() {
		checkLiteralPrefix(t, re)
	}
}

func checkLiteralPrefix(t *testing.T, regex string) {
	t.Helper()
	p, err := Parse(regex)
	if err != nil {
		return
	}
	want, _ := regexp.MustCompile(regex).LiteralPrefix()
	got, sure := p.LiteralPrefix()
	if got != want && (sure || want != "") {
		t.Errorf("LiteralPrefix(%q) = %q (sure %v), regexp says %q", regex, got, sure, want)
	}
}

// TestParsedAsBefore: the one parse gives the index the keys that parsing
// the pattern again gave, and the samples and matches the compiled regex
// does.
func TestParsedAsBefore(t *testing.T) {
	r := rand.New(rand.NewSource(7))
	for _, re := range allParsedPatterns() {
		ids := []string{"", "@", "@a:b", "@zz_9:other.example", randomID(r), randomID(r)}
		checkParsed(t, re, ids)
	}
}

func checkParsed(t *testing.T, regex string, ids []string) {
	t.Helper()
	p, err := Parse(regex)
	wantErr := func() error {
		if _, err := syntax.Parse(regex, syntax.Perl); err != nil {
			return err
		}
		_, err := compileAnchored(regex)
		return err
	}()
	if (err == nil) != (wantErr == nil) {
		t.Fatalf("Parse(%q) error %v; want %v", regex, err, wantErr)
	}
	if err != nil {
		return
	}
	if got, want := p.lits, analyze(regex); !reflect.DeepEqual(got, want) {
		t.Errorf("Parse(%q) keys %+v; analyzing it again gives %+v", regex, got, want)
	}
	anchored := regexp.MustCompile(`^(?:` + regex + `)`)
	var want []string
	for _, s := range sampleOf(mustSimplify(regex)) {
		if anchored.MatchString(s) {
			want = append(want, s)
		}
	}
	if got := p.Samples(); !slices.Equal(got, want) {
		t.Errorf("Samples(%q) = %q; want %q", regex, got, want)
	}
	for _, id := range append(ids, want...) {
		if got, want := p.Match(id), anchored.MatchString(id); got != want {
			t.Errorf("Parse(%q).Match(%q) = %v; want %v", regex, id, got, want)
		}
	}
}

func mustSimplify(regex string) *syntax.Regexp {
	re, err := syntax.Parse(regex, syntax.Perl)
	if err != nil {
		panic(err)
	}
	return re.Simplify()
}

// TestParseRefusesUnbalanced: a pattern must parse on its own, as Python's
// re needs; inside the compiled `^(?:...)` `a)|(b` would parse.
func TestParseRefusesUnbalanced(t *testing.T) {
	for _, re := range []string{`@a)(b`, `@a)|(b`, `a)|(?:b`} {
		if err := Validate(re); err == nil {
			t.Errorf("Validate(%q) accepted it", re)
		}
	}
	// Valid alone but not wrapped: the quote swallows the wrapper's ')'.
	if err := Validate(`@\Qa`); err == nil {
		t.Errorf(`Validate("@\Qa") accepted it`)
	}
}

func allParsedPatterns() []string {
	r := rand.New(rand.NewSource(3))
	out := slices.Clone(parsedSeeds)
	for range 2000 {
		out = append(out, randomPattern(r))
	}
	return out
}

// FuzzParsed checks the one-parse analyses against the regexp package.
func FuzzParsed(f *testing.F) {
	for _, re := range parsedSeeds {
		f.Add(re, "@a:b")
	}
	f.Fuzz(func(t *testing.T, regex, id string) {
		if len(regex) > 200 {
			return
		}
		checkLiteralPrefix(t, regex)
		checkParsed(t, regex, []string{id})
	})
}
