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
	// The prefix trie, flattened: node n's edges are keys and next
	// [trie[n].edges, trie[n+1].edges), its patterns cands[trie[n].cands,
	// trie[n+1].cands); the last node is a sentinel. A node costs 8 bytes
	// rather than three slices.
	trie  []trieNode
	keys  []byte
	next  []int32
	cands []cand
	ac    *automaton
	scan  []int32 // patterns with no literal worth indexing
}

type trieNode struct{ edges, cands int32 }

// trieBuilder is the prefix trie while patterns are added.
type trieBuilder []builderNode

type builderNode struct {
	keys  []byte
	next  []int32
	cands []cand
}

func (tb *trieBuilder) addPrefix(p string, c cand) {
	n := int32(0)
	for i := 0; i < len(p); i++ {
		node := &(*tb)[n]
		j := sort.Search(len(node.keys), func(k int) bool { return node.keys[k] >= p[i] })
		if j < len(node.keys) && node.keys[j] == p[i] {
			n = node.next[j]
			continue
		}
		*tb = append(*tb, builderNode{})
		child := int32(len(*tb) - 1)
		node = &(*tb)[n] // append may have moved it
		node.keys = append(node.keys, 0)
		node.next = append(node.next, 0)
		copy(node.keys[j+1:], node.keys[j:])
		copy(node.next[j+1:], node.next[j:])
		node.keys[j], node.next[j] = p[i], child
		n = child
	}
	(*tb)[n].cands = append((*tb)[n].cands, c)
}

// flatten sets ix's trie from tb.
func (ix *index) flatten(tb trieBuilder) {
	edges, cands := 0, 0
	for _, n := range tb {
		edges += len(n.keys)
		cands += len(n.cands)
	}
	ix.trie = make([]trieNode, 0, len(tb)+1)
	ix.keys = make([]byte, 0, edges)
	ix.next = make([]int32, 0, edges)
	ix.cands = make([]cand, 0, cands)
	for _, n := range tb {
		ix.trie = append(ix.trie, trieNode{edges: int32(len(ix.keys)), cands: int32(len(ix.cands))})
		ix.keys = append(ix.keys, n.keys...)
		ix.next = append(ix.next, n.next...)
		ix.cands = append(ix.cands, n.cands...)
	}
	ix.trie = append(ix.trie, trieNode{edges: int32(len(ix.keys)), cands: int32(len(ix.cands))})
}

// minUseful is how long a literal must be (beyond an ID's sigil) to be worth
// indexing rather than scanning.
const minUseful = 2

// maxFactor is how much of a factor the automaton holds.
const maxFactor = 12

func buildIndex(pats []entry, lits []literals) *index {
	ix := &index{pats: pats}
	tb := trieBuilder{{}}
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
				tb.addPrefix(p, cand{pat: pi, exact: l.exact})
			}
		case usefulPrefix && (l.exact || pre >= len(l.factor)):
			for _, p := range l.prefixes {
				tb.addPrefix(p, cand{pat: pi, exact: l.exact})
			}
		case len(l.factor) >= 3:
			// Any part of a required literal is required too: the
			// automaton's table grows with the bytes it holds, and a
			// factor's first dozen bytes select about as well.
			factors = append(factors, l.factor[:min(len(l.factor), maxFactor)])
			factorPats = append(factorPats, pi)
		case usefulPrefix:
			for _, p := range l.prefixes {
				tb.addPrefix(p, cand{pat: pi, exact: l.exact})
			}
		default:
			ix.scan = append(ix.scan, pi)
		}
	}
	if len(factors) > 0 {
		ix.ac = newAutomaton(factors, factorPats)
	}
	ix.flatten(tb)
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
		node, end := ix.trie[n], ix.trie[n+1]
		for _, c := range ix.cands[node.cands:end.cands] {
			add(c.pat, c.exact)
		}
		keys := ix.keys[node.edges:end.edges]
		if i == len(id) || len(keys) == 0 {
			break
		}
		b := id[i]
		j := sort.Search(len(keys), func(k int) bool { return keys[k] >= b })
		if j == len(keys) || keys[j] != b {
			break
		}
		n = ix.next[int(node.edges)+j]
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
