package namespace

import (
	"errors"
	"fmt"
	"regexp"
	"regexp/syntax"
	"sort"
	"strings"
)

// Matcher answers which owners' patterns match an ID, with one index per
// kind. Safe for concurrent use.
type Matcher struct {
	kinds [numKinds]*index
}

// Compile builds a matcher from patterns. Every bad pattern is reported, as a
// *PatternError joined with errors.Join.
func Compile(patterns []Pattern) (*Matcher, error) { return CompileParsed(patterns, nil) }

// CompileParsed is Compile for patterns of which some are parsed already:
// parsed[i], when not nil, is Parse(patterns[i].Regex), which is then not
// parsed again. parsed may be shorter than patterns, or nil.
func CompileParsed(patterns []Pattern, parsed []*Parsed) (*Matcher, error) {
	// Only checked and analyzed here: each regex is compiled when a lookup
	// first needs it (see entry).
	var errs []error
	all := make([]literals, len(patterns))
	for i, pat := range patterns {
		if i < len(parsed) && parsed[i] != nil && parsed[i].regex == pat.Regex {
			all[i] = parsed[i].lits
			continue
		}
		re, err := parseChecked(pat.Regex)
		if err != nil {
			errs = append(errs, &PatternError{Index: i, Regex: pat.Regex, Reason: err.Error(), Err: err})
			continue
		}
		all[i] = analyzeTree(re.Simplify())
	}
	if len(errs) > 0 {
		return nil, errors.Join(errs...)
	}
	var counts [numKinds]int
	for _, pat := range patterns {
		if pat.Kind < numKinds {
			counts[pat.Kind]++
		}
	}
	m := &Matcher{}
	for k := Kind(0); k < numKinds; k++ {
		// Sized once: an entry holds an atomic pointer and is not copied.
		pats := make([]entry, counts[k])
		lits := make([]literals, 0, counts[k])
		for i, pat := range patterns {
			if pat.Kind == k {
				e := &pats[len(lits)]
				e.owner, e.exclusive, e.regex = pat.Owner, pat.Exclusive, pat.Regex
				lits = append(lits, all[i])
			}
		}
		m.kinds[k] = buildIndex(pats, lits)
	}
	return m, nil
}

// Match returns the owners whose patterns of kind match id, sorted by owner.
func (m *Matcher) Match(kind Kind, id string) []Hit { return m.AppendMatch(nil, kind, id) }

// AppendMatch appends the hits for id to dst and returns it; it does not
// allocate when dst has room.
func (m *Matcher) AppendMatch(dst []Hit, kind Kind, id string) []Hit {
	if kind >= numKinds {
		return dst
	}
	return m.kinds[kind].lookup(dst, id)
}

// AppendCandidates appends to dst every owner with a pattern of kind that
// may match id, a superset of AppendMatch's hits (Exclusive: one of those
// patterns is exclusive), without running or compiling any regex. It is for
// callers that check each pattern themselves, once, such as a registration
// linter: AppendMatch keeps every program it compiles.
func (m *Matcher) AppendCandidates(dst []Hit, kind Kind, id string) []Hit {
	if kind >= numKinds {
		return dst
	}
	return m.kinds[kind].candidates(dst, id)
}

// Plain is the reference matcher: every regex tried one by one. It is what
// the indexed Matcher is checked and benchmarked against.
type Plain struct {
	pats []Pattern
	res  []*regexp.Regexp
}

// NewPlain compiles patterns for the plain loop.
func NewPlain(patterns []Pattern) (*Plain, error) {
	p := &Plain{pats: patterns, res: make([]*regexp.Regexp, len(patterns))}
	var errs []error
	for i, pat := range patterns {
		re, err := compileAnchored(pat.Regex)
		if err != nil {
			errs = append(errs, &PatternError{Index: i, Regex: pat.Regex, Reason: err.Error(), Err: err})
			continue
		}
		p.res[i] = re
	}
	if len(errs) > 0 {
		return nil, errors.Join(errs...)
	}
	return p, nil
}

// AppendMatch is Matcher.AppendMatch done the slow way.
func (p *Plain) AppendMatch(dst []Hit, kind Kind, id string) []Hit {
	start := len(dst)
	for i, pat := range p.pats {
		if pat.Kind != kind || !p.res[i].MatchString(id) {
			continue
		}
		found := false
		for j := start; j < len(dst); j++ {
			if dst[j].Owner == pat.Owner {
				dst[j].Exclusive = dst[j].Exclusive || pat.Exclusive
				found = true
				break
			}
		}
		if !found {
			dst = append(dst, Hit{Owner: pat.Owner, Exclusive: pat.Exclusive})
		}
	}
	sort.Slice(dst[start:], func(a, b int) bool { return dst[start+a].Owner < dst[start+b].Owner })
	return dst
}

// Validate reports whether regex is a usable namespace pattern.
func Validate(regex string) error { return check(regex) }

// maxPatternLen bounds a pattern: RE2 is linear in the input, but its
// program grows with the pattern.
const maxPatternLen = 4096

func compileAnchored(regex string) (*regexp.Regexp, error) {
	if err := check(regex); err != nil {
		return nil, err
	}
	return regexp.Compile(`^(?:` + regex + `)`)
}

// check is compileAnchored without building the program: regexp.Compile
// fails exactly when parsing with syntax.Perl does.
func check(regex string) error {
	_, err := parseChecked(regex)
	return err
}

// parseChecked parses regex for the checks and the analyses. The pattern
// must parse as written, as Synapse (Python's re) needs it to: inside the
// compiled `^(?:...)`, `a)|(b` would parse (and match b anywhere). Only a
// pattern that may differ there (a \Q quote, a counted repetition near the
// size limit, nesting near the depth limit) is parsed wrapped too.
func parseChecked(regex string) (*syntax.Regexp, error) {
	if len(regex) > maxPatternLen {
		return nil, fmt.Errorf("pattern is %d bytes, more than %d", len(regex), maxPatternLen)
	}
	for _, la := range []string{"(?=", "(?!", "(?<=", "(?<!"} {
		if strings.Contains(regex, la) {
			return nil, fmt.Errorf("lookaround %s is not supported (Go's RE2 has no lookaround)", la)
		}
	}
	re, err := syntax.Parse(regex, syntax.Perl)
	if err == nil && mayFailWrapped(regex) {
		_, err = syntax.Parse(`^(?:`+regex+`)`, syntax.Perl)
	}
	if err == nil {
		return re, nil
	}
	var se *syntax.Error
	if errors.As(err, &se) {
		switch {
		case se.Code == syntax.ErrInvalidEscape && len(se.Expr) == 2 && se.Expr[1] >= '1' && se.Expr[1] <= '9':
			return nil, fmt.Errorf("backreference %s is not supported (Go's RE2 has no backreferences): %w", se.Expr, err)
		}
	}
	return nil, err
}

// mayFailWrapped reports whether regex, which parses, might not parse
// inside `^(?:...)`: a \Q quote runs over the closing parenthesis; the
// wrapper adds an instruction to a counted repetition's size and a level
// to the tree's height, which each group adds at most 3 to (capture,
// alternation, concatenation) and each repetition 1.
func mayFailWrapped(regex string) bool {
	if strings.Contains(regex, `\Q`) || strings.Contains(regex, "{") {
		return true
	}
	return 3*strings.Count(regex, "(")+strings.Count(regex, "*")+strings.Count(regex, "+")+strings.Count(regex, "?")+8 >= maxHeight
}

// maxHeight is regexp/syntax's bound on a parse tree's height.
const maxHeight = 1000
