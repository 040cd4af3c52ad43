package namespace

import (
	"regexp"
	"sort"
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
// it; either program does.
func (e *entry) match(id string) bool {
	re := e.re.Load()
	if re == nil {
		var err error
		if re, err = compileAnchored(e.regex); err != nil {
			return false // unreachable: Compile checked every pattern
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
// with the number of patterns.
type index struct {
	pats []entry
	trie []trieNode
	ac   *automaton
	scan []int32 // patterns with no literal worth indexing
}

type trieNode struct {
	keys  []byte
	next  []int32
	cands []cand
}

func (ix *index) addPrefix(p string, c cand) {
	n := int32(0)
	for i := 0; i < len(p); i++ {
		node := &ix.trie[n]
		j := sort.Search(len(node.keys), func(k int) bool { return node.keys[k] >= p[i] })
		if j < len(node.keys) && node.keys[j] == p[i] {
			n = node.next[j]
			continue
		}
		ix.trie = append(ix.trie, trieNode{})
		child := int32(len(ix.trie) - 1)
		node = &ix.trie[n] // append may have moved it
		node.keys = append(node.keys, 0)
		node.next = append(node.next, 0)
		copy(node.keys[j+1:], node.keys[j:])
		copy(node.next[j+1:], node.next[j:])
		node.keys[j], node.next[j] = p[i], child
		n = child
	}
	ix.trie[n].cands = append(ix.trie[n].cands, c)
}

// minUseful is how long a literal must be (beyond an ID's sigil) to be worth
// indexing rather than scanning.
const minUseful = 2

func buildIndex(pats []entry, lits []literals) *index {
	ix := &index{pats: pats, trie: []trieNode{{}}}
	// How many patterns share each literal: a literal every AS has (a
	// server name like ":example.org") selects nothing, however long.
	factorShare := map[string]int{}
	prefixShare := map[string]int{}
	for _, l := range lits {
		factorShare[l.factor]++
		for _, p := range l.prefixes {
			prefixShare[p]++
		}
	}
	var factors []string
	var factorPats []int32
	for i, l := range lits {
		pi := int32(i)
		pre := shortest(l.prefixes)
		usefulPrefix := pre >= minUseful && !sigilOnly(l.prefixes)
		prefixShared := 0
		for _, p := range l.prefixes {
			prefixShared = max(prefixShared, prefixShare[p])
		}
		switch {
		case usefulPrefix && len(l.factor) >= 3 && prefixShared < factorShare[l.factor]:
			// The prefix is the more selective key.
			for _, p := range l.prefixes {
				ix.addPrefix(p, cand{pat: pi, exact: l.exact})
			}
		case usefulPrefix && (l.exact || pre >= len(l.factor)):
			for _, p := range l.prefixes {
				ix.addPrefix(p, cand{pat: pi, exact: l.exact})
			}
		case len(l.factor) >= 3:
			factors = append(factors, l.factor)
			factorPats = append(factorPats, pi)
		case usefulPrefix:
			for _, p := range l.prefixes {
				ix.addPrefix(p, cand{pat: pi, exact: l.exact})
			}
		default:
			ix.scan = append(ix.scan, pi)
		}
	}
	if len(factors) > 0 {
		ix.ac = newAutomaton(factors, factorPats)
	}
	return ix
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
	n := int32(0)
	for i := 0; ; i++ {
		node := &ix.trie[n]
		for _, c := range node.cands {
			add(c.pat, c.exact)
		}
		if i == len(id) || len(node.keys) == 0 {
			break
		}
		b := id[i]
		j := sort.Search(len(node.keys), func(k int) bool { return node.keys[k] >= b })
		if j == len(node.keys) || node.keys[j] != b {
			break
		}
		n = node.next[j]
	}
	if ix.ac != nil {
		ix.ac.each(id, func(pi int32) { add(pi, false) })
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
