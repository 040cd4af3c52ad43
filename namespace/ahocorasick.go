package namespace

import "slices"

// automaton finds every occurrence of a set of literals in one pass
// (Aho-Corasick), as a full DFA over a compressed alphabet: one table read
// per input byte.
type automaton struct {
	class   [256]uint8 // byte -> alphabet class (0: no literal has it)
	classes int
	delta   []int32 // state*classes + class -> state
	// The patterns of state s are outPats[outStart[s]:outStart[s+1]]:
	// 4 bytes a state rather than a slice header, most states having none.
	outStart []int32
	outPats  []int32
	dict     []int32 // next state on the failure chain with output (-1: none)
}

func newAutomaton(lits []string, pats []int32) *automaton {
	a := &automaton{classes: 1}
	for _, l := range lits {
		for i := 0; i < len(l); i++ {
			if a.class[l[i]] == 0 {
				if a.classes == 256 {
					break
				}
				a.class[l[i]] = uint8(a.classes)
				a.classes++
			}
		}
	}
	// Trie of the literals, -1 for no edge yet; sized for the most states
	// the literals can make, then trimmed (the table is the automaton's
	// bulk: tens of MiB for 10,000 ASes).
	most := 1
	for _, l := range lits {
		most += len(l)
	}
	delta := make([]int32, a.classes, most*a.classes)
	for i := range delta {
		delta[i] = -1
	}
	n := 1
	end := make([]int32, len(lits)) // the state each literal ends in
	for k, l := range lits {
		s := int32(0)
		for i := 0; i < len(l); i++ {
			c := int32(a.class[l[i]])
			nx := delta[s*int32(a.classes)+c]
			if nx < 0 {
				nx = int32(n)
				n++
				for j := 0; j < a.classes; j++ {
					delta = append(delta, -1)
				}
				delta[s*int32(a.classes)+c] = nx
			}
			s = nx
		}
		end[k] = s
	}
	a.delta = slices.Clip(append([]int32(nil), delta...))
	delta = nil
	a.outStart = make([]int32, n+1)
	for _, s := range end {
		a.outStart[s+1]++
	}
	for s := 0; s < n; s++ {
		a.outStart[s+1] += a.outStart[s]
	}
	a.outPats = make([]int32, len(lits))
	fill := slices.Clone(a.outStart[:n])
	for k, s := range end {
		a.outPats[fill[s]] = pats[k]
		fill[s]++
	}
	// Breadth-first: failure links become DFA edges.
	fail := make([]int32, n)
	a.dict = make([]int32, n)
	for i := range a.dict {
		a.dict[i] = -1
	}
	queue := make([]int32, 0, n)
	for c := 0; c < a.classes; c++ {
		if nx := a.delta[c]; nx > 0 {
			fail[nx] = 0
			queue = append(queue, nx)
		} else {
			a.delta[c] = 0
		}
	}
	for len(queue) > 0 {
		s := queue[0]
		queue = queue[1:]
		f := fail[s]
		if a.outStart[f+1] > a.outStart[f] {
			a.dict[s] = f
		} else {
			a.dict[s] = a.dict[f]
		}
		for c := 0; c < a.classes; c++ {
			i := s*int32(a.classes) + int32(c)
			if nx := a.delta[i]; nx > 0 {
				fail[nx] = a.delta[f*int32(a.classes)+int32(c)]
				queue = append(queue, nx)
			} else {
				a.delta[i] = a.delta[f*int32(a.classes)+int32(c)]
			}
		}
	}
	return a
}

// each calls fn for the patterns of every literal occurring in s (a pattern
// once per occurrence; callers deduplicate).
func (a *automaton) each(s string, fn func(int32)) { acEach(a, s, fn) }

// acEach is each over a string or the bytes of a folded ID.
func acEach[S ~string | ~[]byte](a *automaton, s S, fn func(int32)) {
	st := int32(0)
	for i := 0; i < len(s); i++ {
		st = a.delta[st*int32(a.classes)+int32(a.class[s[i]])]
		for o := st; o > 0; o = a.dict[o] {
			for _, p := range a.outPats[a.outStart[o]:a.outStart[o+1]] {
				fn(p)
			}
		}
	}
}
