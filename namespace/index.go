package namespace

import (
	"regexp"
	"slices"
	"sort"
	"strings"
	"sync/atomic"
)

// entry is one pattern of an index. Its regex is compiled by the first
// lookup that runs it: the index decides exact patterns alone and reaches
// most others rarely, while a compiled program weighs about 2 KiB (90 MiB
// for 10,000 ASes' namespaces).
type entry struct {
	owner     int
	exclusive bool
	regex     string
	re        atomic.Pointer[regexp.Regexp]
}

// match runs the entry's regex. Concurrent first lookups may both compile
// it; either program does, and the pointer makes the publication safe.
func (e *entry) match(id string) bool {
	re := e.re.Load()
	if re == nil {
		// Compile checked every pattern: compile without checking again.
		var err error
		if re, err = regexp.Compile(`^(?:` + e.regex + `)`); err != nil {
			return false // unreachable
		}
		e.re.Store(re)
	}
	return re.MatchString(id)
}

// cand is a pattern reached through the index: exact ones match without
// running their regex.
type cand struct {
	pat   int32
	exact bool
}

// index answers one kind's lookups. A lookup walks the ID once down a
// prefix trie and once through an Aho-Corasick automaton of required
// factors; only the few patterns reached there, plus those with no literal
// to index, run a regex. Its cost grows with the ID and the matches, not
// with the number of patterns. Case-insensitive patterns have keys of their
// own, looked up in the case-folded ID, so the usual (case-sensitive)
// lookup folds nothing.
type index struct {
	pats  []entry
	exact keySet  // looked up in the ID as it is
	fold  *keySet // case-folded keys, looked up in foldKey(ID); nil if none
	scan  []int32 // patterns with no literal worth indexing
}

// keySet is a prefix trie and a factor automaton over one form of the ID.
type keySet struct {
	// The prefix trie, flattened: node n's edges are keys and next
	// [trie[n].edges, trie[n+1].edges), its patterns cands[trie[n].cands,
	// trie[n+1].cands); the last node is a sentinel. A node costs 8 bytes
	// rather than three slice headers.
	trie  []trieNode
	keys  []byte
	next  []int32
	cands []cand
	ac    *automaton
}

type trieNode struct{ edges, cands int32 }

// keyed is one prefix key of a pattern, before the trie is built.
type keyed struct {
	key string
	c   cand
}

// buildTrie sets ks's trie to hold every key, each array at its exact
// size. The keys are sorted, so each node's keys form a run at its depth:
// nodes are laid out breadth first, in one pass, rather than inserted key
// by key into a trie of per-node slices (10,000 ASes' keys made 400,000
// of them).
func (ks *keySet) buildTrie(all []keyed) {
	slices.SortStableFunc(all, func(a, b keyed) int { return strings.Compare(a.key, b.key) })
	nodes := 1 // the root; then each key's bytes past the previous key's
	for i, k := range all {
		common := 0
		if i > 0 {
			prev := all[i-1].key
			for common < len(prev) && common < len(k.key) && prev[common] == k.key[common] {
				common++
			}
		}
		nodes += len(k.key) - common
	}
	ks.trie = make([]trieNode, 0, nodes+1)
	ks.keys = make([]byte, 0, nodes-1)
	ks.next = make([]int32, 0, nodes-1)
	ks.cands = make([]cand, 0, len(all))
	// A node is the run of keys [lo, hi) sharing their first depth bytes;
	// queue[n] is node n, so the edges are appended in node order.
	type run struct{ lo, hi, depth int }
	queue := make([]run, 1, nodes)
	queue[0] = run{0, len(all), 0}
	for n := 0; n < len(queue); n++ {
		r := queue[n]
		ks.trie = append(ks.trie, trieNode{edges: int32(len(ks.keys)), cands: int32(len(ks.cands))})
		i := r.lo
		for ; i < r.hi && len(all[i].key) == r.depth; i++ { // sorted first: a prefix of the rest
			ks.cands = append(ks.cands, all[i].c)
		}
		for i < r.hi {
			b := all[i].key[r.depth]
			j := i + 1
			for j < r.hi && all[j].key[r.depth] == b {
				j++
			}
			ks.keys = append(ks.keys, b)
			ks.next = append(ks.next, int32(len(queue)))
			queue = append(queue, run{i, j, r.depth + 1})
			i = j
		}
	}
	ks.trie = append(ks.trie, trieNode{edges: int32(len(ks.keys)), cands: int32(len(ks.cands))})
}

// minUseful is how long a literal must be (beyond an ID's sigil) to be worth
// indexing rather than scanning.
const minUseful = 2

// maxFactor is how much of a factor the automaton holds: any part of a
// required literal is required too, the automaton's table grows with the
// bytes it holds, and a factor's first dozen bytes select about as well.
// (Cutting inside a UTF-8 sequence only weakens the filter: the cut bytes
// still occur in any ID, or folded ID, the regex matches.)
const maxFactor = 12

func buildIndex(pats []entry, lits []literals) *index {
	ix := &index{pats: pats}
	var exact, folded []int32
	for i := range lits {
		switch {
		case !lits[i].useful():
			ix.scan = append(ix.scan, int32(i))
		case lits[i].folded:
			folded = append(folded, int32(i))
		default:
			exact = append(exact, int32(i))
		}
	}
	ix.exact.build(lits, exact)
	if len(folded) > 0 {
		ix.fold = &keySet{}
		ix.fold.build(lits, folded)
	}
	return ix
}

// build keys each of the patterns which (all useful) on its prefixes or its
// factor, whichever selects more.
func (ks *keySet) build(lits []literals, which []int32) {
	// How many patterns share each literal: a literal every AS has (a
	// server name like ":example.org") selects nothing, however long.
	factorShare := map[string]int{}
	prefixShare := map[string]int{}
	for _, pi := range which {
		l := &lits[pi]
		factorShare[l.factor]++
		for _, p := range l.prefixes {
			prefixShare[p]++
		}
	}
	var factors []string
	var factorPats []int32
	var prefixes []keyed
	for _, pi := range which {
		l := &lits[pi]
		pre := shortest(l.prefixes)
		useful := usefulPrefix(l.prefixes)
		prefixShared := 0
		for _, p := range l.prefixes {
			prefixShared = max(prefixShared, prefixShare[p])
		}
		switch {
		case useful && len(l.factor) >= minFactor && prefixShared < factorShare[l.factor],
			// The prefix is the more selective key.
			useful && (l.exact || pre >= len(l.factor)),
			useful && len(l.factor) < minFactor:
			for _, p := range l.prefixes {
				prefixes = append(prefixes, keyed{p, cand{pat: pi, exact: l.exact}})
			}
		default:
			factors = append(factors, l.factor[:min(len(l.factor), maxFactor)])
			factorPats = append(factorPats, pi)
		}
	}
	ks.buildTrie(prefixes)
	if len(factors) > 0 {
		ks.ac = newAutomaton(factors, factorPats)
	}
}

// each calls fn for the patterns whose keys occur in s: prefixes s starts
// with, factors anywhere in it (a pattern once per occurrence).
func each[S ~string | ~[]byte](ks *keySet, s S, fn func(pat int32, exact bool)) {
	n := int32(0)
	for i := 0; ; i++ {
		node, end := ks.trie[n], ks.trie[n+1]
		for _, c := range ks.cands[node.cands:end.cands] {
			fn(c.pat, c.exact)
		}
		keys := ks.keys[node.edges:end.edges]
		if i == len(s) || len(keys) == 0 {
			break
		}
		b := s[i]
		j := sort.Search(len(keys), func(k int) bool { return keys[k] >= b })
		if j == len(keys) || keys[j] != b {
			break
		}
		n = ks.next[int(node.edges)+j]
	}
	if ks.ac != nil {
		acEach(ks.ac, s, func(pi int32) { fn(pi, false) })
	}
}

// lookup appends the hits for id to dst (deduplicated per owner, sorted).
func (ix *index) lookup(dst []Hit, id string) []Hit {
	start := len(dst)
	add := func(pi int32, exact bool) {
		e := &ix.pats[pi]
		for j := start; j < len(dst); j++ {
			if dst[j].Owner == e.owner {
				if e.exclusive && !dst[j].Exclusive && (exact || e.match(id)) {
					dst[j].Exclusive = true
				}
				return
			}
		}
		if exact || e.match(id) {
			dst = append(dst, Hit{Owner: e.owner, Exclusive: e.exclusive})
		}
	}
	each(&ix.exact, id, add)
	if ix.fold != nil {
		var buf [256]byte // a Matrix ID's most; a longer one allocates
		each(ix.fold, foldKey(buf[:0], id), add)
	}
	for _, pi := range ix.scan {
		add(pi, false)
	}
	// Insertion sort: hits are few.
	for i := start + 1; i < len(dst); i++ {
		for j := i; j > start && dst[j].Owner < dst[j-1].Owner; j-- {
			dst[j], dst[j-1] = dst[j-1], dst[j]
		}
	}
	return dst
}

// candidates is lookup without running any regex: the owners of every
// pattern the index reaches for id, Exclusive when one of those is. It
// compiles nothing, so a caller that checks the candidates itself leaves
// no program behind in the matcher.
func (ix *index) candidates(dst []Hit, id string) []Hit {
	start := len(dst)
	add := func(pi int32, _ bool) {
		e := &ix.pats[pi]
		for j := start; j < len(dst); j++ {
			if dst[j].Owner == e.owner {
				dst[j].Exclusive = dst[j].Exclusive || e.exclusive
				return
			}
		}
		dst = append(dst, Hit{Owner: e.owner, Exclusive: e.exclusive})
	}
	each(&ix.exact, id, add)
	if ix.fold != nil {
		each(ix.fold, foldKey(nil, id), add)
	}
	for _, pi := range ix.scan {
		add(pi, false)
	}
	slices.SortFunc(dst[start:], func(a, b Hit) int { return a.Owner - b.Owner })
	return dst
}
