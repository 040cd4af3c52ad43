package namespace

import (
	"regexp/syntax"
	"strings"
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
}

func analyze(pattern string) literals {
	re, err := syntax.Parse(pattern, syntax.Perl)
	if err != nil {
		return literals{}
	}
	re = re.Simplify()
	var l literals
	l.prefixes, l.exact = prefixesOf(re, true)
	l.factor = factorOf(re)
	return l
}

// finite returns the exact, small, finite language of re, if it has one.
func finite(re *syntax.Regexp) ([]string, bool) {
	switch re.Op {
	case syntax.OpLiteral:
		if re.Flags&syntax.FoldCase != 0 {
			return nil, false
		}
		return []string{string(re.Rune)}, true
	case syntax.OpEmptyMatch:
		return []string{""}, true
	case syntax.OpCharClass:
		set := expandClass(re)
		return set, set != nil
	case syntax.OpCapture:
		return finite(re.Sub[0])
	case syntax.OpAlternate:
		var out []string
		for _, sub := range re.Sub {
			fs, ok := finite(sub)
			if !ok || len(out)+len(fs) > maxPrefixes {
				return nil, false
			}
			out = append(out, fs...)
		}
		return out, true
	case syntax.OpConcat:
		cur := []string{""}
		for _, sub := range re.Sub {
			fs, ok := finite(sub)
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
func prefixesOf(re *syntax.Regexp, atStart bool) ([]string, bool) {
	if fs, ok := finite(re); ok {
		return fs, true
	}
	switch re.Op {
	case syntax.OpCapture:
		return prefixesOf(re.Sub[0], atStart)
	case syntax.OpAlternate:
		var out []string
		exact := true
		for _, sub := range re.Sub {
			ps, ex := prefixesOf(sub, atStart)
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
			if fs, ok := finite(sub); ok && len(cur)*len(fs) <= maxPrefixes {
				cur = cross(cur, fs)
				continue
			}
			ps, ex := prefixesOf(sub, subAtStart)
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

func expandClass(re *syntax.Regexp) []string {
	var out []string
	for i := 0; i+1 < len(re.Rune); i += 2 {
		if int(re.Rune[i+1]-re.Rune[i])+1+len(out) > 8 {
			return nil
		}
		for r := re.Rune[i]; r <= re.Rune[i+1]; r++ {
			if !utf8.ValidRune(r) {
				return nil
			}
			out = append(out, string(r))
		}
	}
	return out
}

// factorOf returns the longest literal every match contains ("" if none).
func factorOf(re *syntax.Regexp) string {
	switch re.Op {
	case syntax.OpLiteral:
		if re.Flags&syntax.FoldCase == 0 {
			return string(re.Rune)
		}
	case syntax.OpCapture:
		return factorOf(re.Sub[0])
	case syntax.OpPlus:
		return factorOf(re.Sub[0])
	case syntax.OpRepeat:
		if re.Min > 0 {
			return factorOf(re.Sub[0])
		}
	case syntax.OpConcat:
		best := ""
		for _, s := range re.Sub {
			if f := factorOf(s); len(f) > len(best) {
				best = f
			}
		}
		return best
	}
	return ""
}

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
