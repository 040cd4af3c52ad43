package namespace

import (
	"regexp/syntax"
	"slices"
	"strings"
	"unicode"
	"unicode/utf8"
)

// maxPrefixes bounds the expansion of alternations and classes into
// literal prefixes.
const maxPrefixes = 64

// literals is what the index learns of one pattern (matched anchored at the
// start, not at the end).
type literals struct {
	// prefixes: every match starts with one of these.
	prefixes []string
	// exact: a string matches iff it starts with one of prefixes (the rest
	// of the pattern matches the empty string anywhere), so no regex runs.
	exact bool
	// factor: every match contains this literal.
	factor string
	// folded: prefixes and factor are case-folded (foldKey), to be looked
	// for in the case-folded ID. exact then also needs every literal and
	// class of the prefixes to match whole fold orbits ((?i) ones do).
	folded bool
}

// useful reports whether the index can key a pattern on l.
func (l *literals) useful() bool {
	return usefulPrefix(l.prefixes) || len(l.factor) >= minFactor
}

// keyLen is how long the key the index would use for l is (0: none).
func (l *literals) keyLen() int {
	n := 0
	if usefulPrefix(l.prefixes) {
		n = shortest(l.prefixes)
	}
	if len(l.factor) >= minFactor {
		n = max(n, len(l.factor))
	}
	return n
}

// analyze extracts the literals of pattern. A pattern with (?i) parts is
// analyzed again with every literal case-folded: matched against the
// folded ID, a folded key is found wherever the regex could match. The
// folded keys are used when they are longer: `@(?i:_bot)17_.*` is keyed on
// "@_BOT17_", not on the "17_" of hundreds of ASes.
func analyze(pattern string) literals {
	re, err := syntax.Parse(pattern, syntax.Perl)
	if err != nil {
		return literals{}
	}
	return analyzeTree(re.Simplify())
}

// analyzeTree is analyze of a parsed, simplified pattern.
func analyzeTree(re *syntax.Regexp) literals {
	l := extract(re, false)
	if !hasFoldCase(re) {
		return l
	}
	if f := extract(re, true); f.keyLen() > l.keyLen() {
		return f
	}
	return l
}

// hasFoldCase reports whether any part of re is case-insensitive.
func hasFoldCase(re *syntax.Regexp) bool {
	if re.Flags&syntax.FoldCase != 0 {
		return true
	}
	for _, s := range re.Sub {
		if hasFoldCase(s) {
			return true
		}
	}
	return false
}

func extract(re *syntax.Regexp, fold bool) literals {
	x := &extractor{fold: fold}
	l := literals{folded: fold}
	l.prefixes, l.exact = x.prefixesOf(re, true)
	if x.lossy {
		// A case-sensitive 'k' folded to the key "K": the key no longer
		// says the regex matches.
		l.exact = false
	}
	l.factor = x.factorOf(re)
	if fold { // folding may have made prefixes equal
		slices.Sort(l.prefixes)
		l.prefixes = slices.Compact(l.prefixes)
	}
	return l
}

// extractor walks a parsed pattern. With fold, every literal is folded
// (FoldCase or not, which only makes the key less selective); without,
// a FoldCase literal is no literal.
type extractor struct {
	fold bool
	// lossy: a folded literal or class matches less than its key, so a
	// key found does not mean a match.
	lossy bool
}

// lit returns the key of a literal's runes, or false when it has none. A
// literal U+FFFD is never a key: the regex matches it against any invalid
// UTF-8 byte of the ID, which holds no U+FFFD bytes.
func (x *extractor) lit(runes []rune, flags syntax.Flags) (string, bool) {
	if flags&syntax.FoldCase != 0 && !x.fold {
		return "", false
	}
	var b []byte
	for _, r := range runes {
		if r == utf8.RuneError {
			return "", false
		}
		if x.fold {
			if flags&syntax.FoldCase == 0 && unicode.SimpleFold(r) != r {
				x.lossy = true
			}
			r = foldRune(r)
		}
		b = utf8.AppendRune(b, r)
	}
	return string(b), true
}

// finite returns the exact, small, finite language of re, if it has one
// (folded: each string's fold).
func (x *extractor) finite(re *syntax.Regexp) ([]string, bool) {
	switch re.Op {
	case syntax.OpLiteral:
		s, ok := x.lit(re.Rune, re.Flags)
		if !ok {
			return nil, false
		}
		return []string{s}, true
	case syntax.OpEmptyMatch:
		return []string{""}, true
	case syntax.OpCharClass:
		set := x.expandClass(re)
		return set, set != nil
	case syntax.OpCapture:
		return x.finite(re.Sub[0])
	case syntax.OpAlternate:
		var out []string
		for _, sub := range re.Sub {
			fs, ok := x.finite(sub)
			if !ok || len(out)+len(fs) > maxPrefixes {
				return nil, false
			}
			out = append(out, fs...)
		}
		return out, true
	case syntax.OpConcat:
		cur := []string{""}
		for _, sub := range re.Sub {
			fs, ok := x.finite(sub)
			if !ok || len(cur)*len(fs) > maxPrefixes {
				return nil, false
			}
			cur = cross(cur, fs)
		}
		return cur, true
	}
	return nil, false
}

func cross(a, b []string) []string {
	out := make([]string, 0, len(a)*len(b))
	for _, x := range a {
		for _, y := range b {
			out = append(out, x+y)
		}
	}
	return out
}

// prefixesOf returns literal prefixes every match starts with, and whether
// the pattern is exactly "starts with one of them" (start-anchored, not
// end-anchored matching). atStart says re begins at the start of the whole
// pattern: only there may a begin-of-text anchor be dropped (matching is
// anchored there anyway). Anywhere else it can only match at position 0, so
// "@a(^b)" matches nothing and must not index as the prefix "@ab"; any
// assertion not at the start keeps the extraction conservative (finite does
// not take assertions, and nullableAnywhere calls none of them nullable).
func (x *extractor) prefixesOf(re *syntax.Regexp, atStart bool) ([]string, bool) {
	if fs, ok := x.finite(re); ok {
		return fs, true
	}
	switch re.Op {
	case syntax.OpCapture:
		return x.prefixesOf(re.Sub[0], atStart)
	case syntax.OpAlternate:
		var out []string
		exact := true
		for _, sub := range re.Sub {
			ps, ex := x.prefixesOf(sub, atStart)
			out = append(out, ps...)
			exact = exact && ex
			if len(out) > maxPrefixes {
				return []string{""}, false
			}
		}
		return out, exact
	case syntax.OpConcat:
		cur := []string{""}
		for i, sub := range re.Sub {
			if sub.Op == syntax.OpBeginText && atStart {
				continue // still nothing consumed: ^ at the start of the pattern
			}
			subAtStart := atStart
			atStart = false
			if fs, ok := x.finite(sub); ok && len(cur)*len(fs) <= maxPrefixes {
				cur = cross(cur, fs)
				continue
			}
			ps, ex := x.prefixesOf(sub, subAtStart)
			if len(cur)*len(ps) > maxPrefixes {
				return cur, false
			}
			cur = cross(cur, ps)
			rest := true
			for _, r := range re.Sub[i+1:] {
				rest = rest && nullableAnywhere(r)
			}
			return cur, ex && rest
		}
		return cur, true
	}
	return []string{""}, nullableAnywhere(re)
}

// nullableAnywhere reports whether re matches the empty string at any
// position, whatever surrounds it.
func nullableAnywhere(re *syntax.Regexp) bool {
	switch re.Op {
	case syntax.OpEmptyMatch, syntax.OpStar, syntax.OpQuest:
		return true
	case syntax.OpRepeat:
		return re.Min == 0
	case syntax.OpCapture:
		return nullableAnywhere(re.Sub[0])
	case syntax.OpConcat:
		for _, s := range re.Sub {
			if !nullableAnywhere(s) {
				return false
			}
		}
		return true
	case syntax.OpAlternate:
		for _, s := range re.Sub {
			if nullableAnywhere(s) {
				return true
			}
		}
	}
	return false
}

// expandClass returns the runes of a small class (folded: their distinct
// folds, so (?i)[ab] gives "A", "B").
func (x *extractor) expandClass(re *syntax.Regexp) []string {
	var out []string
	n := 0
	for i := 0; i+1 < len(re.Rune); i += 2 {
		n += int(re.Rune[i+1]-re.Rune[i]) + 1
		if n > 8 {
			return nil
		}
		for r := re.Rune[i]; r <= re.Rune[i+1]; r++ {
			if !utf8.ValidRune(r) || r == utf8.RuneError {
				return nil
			}
			k := r
			if x.fold {
				k = foldRune(r)
				for f := unicode.SimpleFold(r); f != r && !x.lossy; f = unicode.SimpleFold(f) {
					x.lossy = !classHas(re.Rune, f)
				}
			}
			if s := string(k); !x.fold || !slices.Contains(out, s) {
				out = append(out, s)
			}
		}
	}
	return out
}

// factorOf returns the longest literal every match contains ("" if none).
func (x *extractor) factorOf(re *syntax.Regexp) string {
	switch re.Op {
	case syntax.OpLiteral:
		// The longest run without U+FFFD (see lit).
		best := ""
		for _, part := range splitRuneError(re.Rune) {
			if f, ok := x.lit(part, re.Flags); ok && len(f) > len(best) {
				best = f
			}
		}
		return best
	case syntax.OpCapture:
		return x.factorOf(re.Sub[0])
	case syntax.OpPlus:
		return x.factorOf(re.Sub[0])
	case syntax.OpRepeat:
		if re.Min > 0 {
			return x.factorOf(re.Sub[0])
		}
	case syntax.OpConcat:
		best := ""
		for _, s := range re.Sub {
			if f := x.factorOf(s); len(f) > len(best) {
				best = f
			}
		}
		return best
	}
	return ""
}

// classHas reports whether the ranges of a class hold r.
func classHas(ranges []rune, r rune) bool {
	for i := 0; i+1 < len(ranges); i += 2 {
		if ranges[i] <= r && r <= ranges[i+1] {
			return true
		}
	}
	return false
}

func splitRuneError(rs []rune) [][]rune {
	var out [][]rune
	start := 0
	for i, r := range rs {
		if r == utf8.RuneError {
			out = append(out, rs[start:i])
			start = i + 1
		}
	}
	return append(out, rs[start:])
}

// foldRune is the key of r's simple case-folding orbit, the orbit's
// smallest rune, as regexp/syntax folds a (?i) literal: 'k', 'K' and
// U+212A KELVIN SIGN all give 'K', 's' and U+017F give 'S'. Being the
// smallest, it is never longer in UTF-8 than r.
func foldRune(r rune) rune {
	if r < utf8.RuneSelf {
		if 'a' <= r && r <= 'z' {
			r -= 'a' - 'A'
		}
		return r
	}
	m := r
	for f := unicode.SimpleFold(r); f != r; f = unicode.SimpleFold(f) {
		m = min(m, f)
	}
	return m
}

// foldKey appends the case-folded id to dst: every rune replaced by
// foldRune, every invalid UTF-8 byte by 0xff (which no key holds, as a
// regex matches it only as U+FFFD). It is never longer than id.
func foldKey(dst []byte, id string) []byte {
	for i := 0; i < len(id); {
		c := id[i]
		if c < utf8.RuneSelf {
			if 'a' <= c && c <= 'z' {
				c -= 'a' - 'A'
			}
			dst = append(dst, c)
			i++
			continue
		}
		r, n := utf8.DecodeRuneInString(id[i:])
		if r == utf8.RuneError && n == 1 {
			dst = append(dst, 0xff)
		} else {
			dst = utf8.AppendRune(dst, foldRune(r))
		}
		i += n
	}
	return dst
}

// minFactor is how long a factor must be to be indexed.
const minFactor = 3

// usefulPrefix reports prefixes worth a trie key: long enough and saying
// more than the sigil.
func usefulPrefix(ps []string) bool { return shortest(ps) >= minUseful && !sigilOnly(ps) }

// shortest returns the length of the shortest string of ss.
func shortest(ss []string) int {
	n := -1
	for _, s := range ss {
		if n < 0 || len(s) < n {
			n = len(s)
		}
	}
	return n
}

// sigilOnly reports prefixes that say nothing but the ID's sigil.
func sigilOnly(ss []string) bool {
	for _, s := range ss {
		if len(strings.TrimLeft(s, "@#!")) > 0 {
			return false
		}
	}
	return true
}
