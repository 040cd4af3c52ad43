package namespace

import (
	"regexp"
	"regexp/syntax"
	"strings"
	"sync/atomic"
	"unicode"
	"unicode/utf8"
)

// Parsed is one pattern parsed once: checked as Validate does, analyzed for
// a Matcher's index (see CompileParsed), and what a linter asks of it.
// Parsing is most of the cost of loading many namespaces, so whoever needs
// several of these parses once; the parse tree itself is dropped (it
// weighs more than all the rest). Safe for concurrent use.
type Parsed struct {
	regex string
	lits  literals // the index's keys, case-folded when that selects more
	plain literals // unfolded keys: sound on an ID as it is
	// prefix is regexp's LiteralPrefix of the unanchored regex; when
	// prefixSure is false it is that or "" (which one, only a compiled
	// program's one-pass analysis says).
	prefix     string
	prefixSure bool
	samples    []string
	// sure: every sample matches (no assertion can fail on one).
	sure bool
	re   atomic.Pointer[regexp.Regexp] // anchored, compiled on first need
}

// Parse checks regex as Validate does and analyzes it, from one parse.
func Parse(regex string) (*Parsed, error) {
	re, err := parseChecked(regex)
	if err != nil {
		return nil, err
	}
	re = re.Simplify()
	p := &Parsed{regex: regex}
	p.plain = extract(re, false)
	p.lits = p.plain
	if hasFoldCase(re) {
		if f := extract(re, true); f.keyLen() > p.lits.keyLen() {
			p.lits = f
		}
	}
	p.prefix, p.prefixSure = literalPrefix(re)
	p.samples = sampleOf(re)
	p.sure = samplesSure(re)
	return p, nil
}

// Regex is the pattern as given.
func (p *Parsed) Regex() string { return p.regex }

// compiled returns the anchored program, compiling it on first use.
func (p *Parsed) compiled() *regexp.Regexp {
	if re := p.re.Load(); re != nil {
		return re
	}
	re, err := regexp.Compile(`^(?:` + p.regex + `)`)
	if err != nil {
		return nil // unreachable: Parse checked it
	}
	p.re.Store(re)
	return re
}

// Match reports whether the pattern matches id (anchored at the start, as
// a Matcher matches), without compiling it when its literals decide.
func (p *Parsed) Match(id string) bool {
	if !p.plain.admits(id) {
		return false
	}
	if p.plain.exact {
		return true
	}
	re := p.compiled()
	return re != nil && re.MatchString(id)
}

// admits reports whether an ID may match by l's unfolded keys: it starts
// with one of the prefixes and holds the factor.
func (l *literals) admits(id string) bool {
	if !strings.Contains(id, l.factor) {
		return false
	}
	for _, pre := range l.prefixes {
		if strings.HasPrefix(id, pre) {
			return true
		}
	}
	return false
}

// LiteralPrefix is what regexp.MustCompile(regex).LiteralPrefix() returns as
// its prefix (the regex unanchored), computed without compiling it. When
// sure is false the regex starts with a begin-text anchor and the answer
// is prefix or "": only a one-pass program (which a compile tells) has
// one.
func (p *Parsed) LiteralPrefix() (prefix string, sure bool) { return p.prefix, p.prefixSure }

// Samples returns short IDs the pattern matches (anchored, as a Matcher
// does): the shortest choice for every repetition, each alternative of an
// alternation (up to maxSamples), the first rune of every class. It
// compiles the regex only when an assertion may refuse one of them.
func (p *Parsed) Samples() []string {
	if p.sure {
		return p.samples
	}
	var out []string
	for _, s := range p.samples {
		if p.Match(s) {
			out = append(out, s)
		}
	}
	return out
}

// maxSamples bounds the sample IDs drawn from one pattern.
const maxSamples = 16

// sampleOf returns short strings re may match; assertions are taken as
// always true, so a sample may not match (see samplesSure).
func sampleOf(re *syntax.Regexp) []string {
	switch re.Op {
	case syntax.OpLiteral:
		return []string{string(re.Rune)}
	case syntax.OpCharClass:
		if len(re.Rune) == 0 {
			return nil
		}
		return []string{string(re.Rune[0])}
	case syntax.OpAnyChar, syntax.OpAnyCharNotNL:
		return []string{"x"}
	case syntax.OpCapture:
		return sampleOf(re.Sub[0])
	case syntax.OpStar, syntax.OpQuest:
		return []string{""}
	case syntax.OpPlus:
		return sampleOf(re.Sub[0])
	case syntax.OpRepeat:
		if re.Min == 0 {
			return []string{""}
		}
		sub := sampleOf(re.Sub[0])
		for i := range sub {
			sub[i] = strings.Repeat(sub[i], re.Min)
		}
		return sub
	case syntax.OpAlternate:
		var out []string
		for _, sub := range re.Sub {
			out = append(out, sampleOf(sub)...)
			if len(out) >= maxSamples {
				return out[:maxSamples]
			}
		}
		return out
	case syntax.OpConcat:
		cur := []string{""}
		for _, sub := range re.Sub {
			next := sampleOf(sub)
			if len(next) == 0 {
				return nil
			}
			var out []string
			for _, a := range cur {
				for _, b := range next {
					if len(out) < maxSamples {
						out = append(out, a+b)
					}
				}
			}
			cur = out
		}
		return cur
	case syntax.OpNoMatch:
		return nil
	}
	return []string{""} // empty match and the assertions
}

// samplesSure reports whether every sample of re is a match of it: no
// assertion but a begin-text first and an end-text last (which every
// sample, a whole match, meets), and every class's first rune one that
// string() keeps.
func samplesSure(re *syntax.Regexp) bool {
	subs := []*syntax.Regexp{re}
	if re.Op == syntax.OpConcat {
		subs = re.Sub
		if len(subs) > 0 && subs[0].Op == syntax.OpBeginText {
			subs = subs[1:]
		}
		if len(subs) > 0 && subs[len(subs)-1].Op == syntax.OpEndText {
			subs = subs[:len(subs)-1]
		}
	}
	for _, s := range subs {
		if !noAssertion(s) {
			return false
		}
	}
	return true
}

func noAssertion(re *syntax.Regexp) bool {
	switch re.Op {
	case syntax.OpBeginLine, syntax.OpEndLine, syntax.OpBeginText, syntax.OpEndText,
		syntax.OpWordBoundary, syntax.OpNoWordBoundary, syntax.OpRepeat:
		return false
	case syntax.OpCharClass:
		if len(re.Rune) > 0 && (!utf8.ValidRune(re.Rune[0]) || re.Rune[0] == utf8.RuneError) {
			return false
		}
	}
	for _, s := range re.Sub {
		if !noAssertion(s) {
			return false
		}
	}
	return true
}

// literalPrefix follows regexp's compilation of re (syntax.Compile, then
// Prog.Prefix, or onePassPrefix for a one-pass program) to the literal
// prefix it reports; sure is false when the program starts with a
// begin-text anchor, where only a one-pass program has a prefix.
func literalPrefix(re *syntax.Regexp) (string, bool) {
	if compilesToFail(re) {
		return "", true
	}
	if startsWithBeginText(re) {
		w := prefixWalker{onePass: true}
		w.walk(re)
		return w.b.String(), w.b.Len() == 0
	}
	var w prefixWalker
	w.walk(re)
	return w.b.String(), true
}

// compilesToFail reports whether syntax.Compile makes re a failure (its
// concatenation with a failure fails, an alternation drops failed
// branches).
func compilesToFail(re *syntax.Regexp) bool {
	switch re.Op {
	case syntax.OpNoMatch:
		return true
	case syntax.OpCapture, syntax.OpPlus:
		return compilesToFail(re.Sub[0])
	case syntax.OpConcat:
		for _, s := range re.Sub {
			if compilesToFail(s) {
				return true
			}
		}
	case syntax.OpAlternate:
		for _, s := range re.Sub {
			if !compilesToFail(s) {
				return false
			}
		}
		return true
	}
	return false
}

// alive returns the one branch of an alternation that does not compile to
// a failure (syntax.Compile then emits it alone), or nil.
func alive(re *syntax.Regexp) *syntax.Regexp {
	var one *syntax.Regexp
	for _, s := range re.Sub {
		if !compilesToFail(s) {
			if one != nil {
				return nil
			}
			one = s
		}
	}
	return one
}

// startsWithBeginText reports whether the program's first instruction is a
// begin-text assertion, which a one-pass program needs.
func startsWithBeginText(re *syntax.Regexp) bool {
	switch re.Op {
	case syntax.OpBeginText:
		return true
	case syntax.OpConcat:
		return len(re.Sub) > 0 && startsWithBeginText(re.Sub[0])
	case syntax.OpPlus:
		return startsWithBeginText(re.Sub[0])
	case syntax.OpAlternate:
		a := alive(re)
		return a != nil && startsWithBeginText(a)
	}
	return false
}

// prefixWalker gathers the literal prefix in program order. Prog.Prefix
// skips no-ops and capture instructions everywhere; onePassPrefix skips
// only the no-ops right after the begin-text anchor.
type prefixWalker struct {
	b       strings.Builder
	onePass bool
	started bool // onePass: the anchor is behind
}

// walk adds re's part of the prefix and reports whether the prefix may go
// on past it.
func (w *prefixWalker) walk(re *syntax.Regexp) bool {
	switch re.Op {
	case syntax.OpBeginText:
		if w.onePass && !w.started {
			w.started = true
			return true
		}
		return false
	case syntax.OpEmptyMatch:
		return w.nop()
	case syntax.OpLiteral:
		if len(re.Rune) == 0 {
			return w.nop()
		}
		for _, r := range re.Rune {
			if r == utf8.RuneError || (re.Flags&syntax.FoldCase != 0 && unicode.SimpleFold(r) != r) {
				return false
			}
			w.b.WriteRune(r)
		}
		return true
	case syntax.OpCapture:
		return !w.onePass && w.walk(re.Sub[0])
	case syntax.OpConcat:
		if len(re.Sub) == 0 {
			return w.nop()
		}
		for _, s := range re.Sub {
			if !w.walk(s) {
				return false
			}
		}
		return true
	case syntax.OpPlus:
		w.walk(re.Sub[0])
		return false // the loop's alternation follows
	case syntax.OpAlternate:
		if a := alive(re); a != nil {
			return w.walk(a)
		}
	}
	return false
}

// nop reports whether the prefix goes on past a no-op instruction.
func (w *prefixWalker) nop() bool { return !w.onePass || w.b.Len() == 0 }
