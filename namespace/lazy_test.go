package namespace

import (
	"fmt"
	"runtime"
	"slices"
	"sync"
	"testing"
)

// TestRegexCompiledOnDemand: building a matcher compiles no regex (10,000
// ASes' programs weigh about 90 MiB); a lookup compiles only the patterns
// it must run, and matches as the plain loop does.
func TestRegexCompiledOnDemand(t *testing.T) {
	var pats []Pattern
	for i := 0; i < 200; i++ {
		pats = append(pats,
			Pattern{Kind: Users, Owner: i, Regex: fmt.Sprintf(`@_bridge%d_.*`, i), Exclusive: true},
			Pattern{Kind: Users, Owner: i, Regex: fmt.Sprintf(`@[a-z]+_chan%d:example\.org`, i)},
			Pattern{Kind: Rooms, Owner: i, Regex: fmt.Sprintf(`!room%d:example\.org`, i)})
	}
	m, err := Compile(pats)
	if err != nil {
		t.Fatal(err)
	}
	compiled := func() int {
		n := 0
		for _, ix := range m.kinds {
			for i := range ix.pats {
				if ix.pats[i].re.Load() != nil {
					n++
				}
			}
		}
		return n
	}
	if n := compiled(); n != 0 {
		t.Fatalf("Compile compiled %d regexes; want none before a lookup needs one", n)
	}
	ids := []string{"@_bridge7_alice:example.org", "@bob_chan42:example.org", "@Bob_chan42:example.org", "!room3:example.org"}
	p, err := NewPlain(pats)
	if err != nil {
		t.Fatal(err)
	}
	for _, id := range ids {
		for k := Kind(0); k < numKinds; k++ {
			if got, want := m.Match(k, id), p.AppendMatch(nil, k, id); !slices.Equal(got, want) {
				t.Errorf("kind %v id %q: indexed %v, plain %v", k, id, got, want)
			}
		}
	}
	if n := compiled(); n == 0 || n > 4 {
		t.Errorf("%d lookups compiled %d regexes; want only the few they ran", len(ids), n)
	}
}

// TestMatcherMemory: a matcher holds well under a kilobyte per pattern of a
// large host's usual mix (prefix, suffix and alternation namespaces, aliases
// and rooms with a server name); compiled programs alone took about 2 KiB.
func TestMatcherMemory(t *testing.T) {
	const ases = 2000
	var pats []Pattern
	for i := 0; i < ases; i++ {
		pats = append(pats,
			Pattern{Kind: Users, Owner: i, Regex: fmt.Sprintf(`@_as%d_.*`, i), Exclusive: true},
			Pattern{Kind: Users, Owner: i, Regex: fmt.Sprintf(`@.*:as%d-n1\.bridge\.example\.org`, i)},
			Pattern{Kind: Users, Owner: i, Regex: fmt.Sprintf(`@(tg|sig)%d_n2_.*`, i), Exclusive: true},
			Pattern{Kind: Aliases, Owner: i, Regex: fmt.Sprintf(`#_as%d_.*:bench\.example\.org`, i), Exclusive: true},
			Pattern{Kind: Rooms, Owner: i, Regex: fmt.Sprintf(`!_as%d_.*:bench\.example\.org`, i)})
	}
	var before, after runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&before)
	m, err := Compile(pats)
	if err != nil {
		t.Fatal(err)
	}
	runtime.GC()
	runtime.ReadMemStats(&after)
	per := float64(after.HeapAlloc-before.HeapAlloc) / float64(len(pats))
	if per > 500 {
		t.Errorf("the matcher holds %.0f bytes per pattern; want at most 500", per)
	} else {
		t.Logf("%.0f bytes per pattern", per)
	}
	if hits := m.Match(Users, "@g1:as7-n1.bridge.example.org"); len(hits) != 1 || hits[0].Owner != 7 {
		t.Errorf("hits %v, want AS 7's", hits)
	}
	runtime.KeepAlive(m)
}

// TestRegexCompiledConcurrently: first lookups racing to compile the same
// regexes agree with the plain loop (run with -race).
func TestRegexCompiledConcurrently(t *testing.T) {
	var pats []Pattern
	for i := 0; i < 50; i++ {
		pats = append(pats,
			Pattern{Kind: Users, Owner: i, Regex: fmt.Sprintf(`@[a-z]+_chan%d:example\.org`, i)},
			Pattern{Kind: Users, Owner: i, Regex: fmt.Sprintf(`(?i)@_BOT%d_[0-9]+:.*`, i), Exclusive: true})
	}
	m, err := Compile(pats)
	if err != nil {
		t.Fatal(err)
	}
	p, err := NewPlain(pats)
	if err != nil {
		t.Fatal(err)
	}
	ids := []string{"@bob_chan42:example.org", "@_bot7_12:hs", "@_Bot42_1:x", "@x_chan7:example.org"}
	var wg sync.WaitGroup
	errs := make(chan string, 8*len(ids))
	for g := 0; g < 8; g++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for _, id := range ids {
				if got, want := m.Match(Users, id), p.AppendMatch(nil, Users, id); !slices.Equal(got, want) {
					errs <- fmt.Sprintf("id %q: indexed %v, plain %v", id, got, want)
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for e := range errs {
		t.Error(e)
	}
}

// TestCandidatesCompileNothing: AppendCandidates holds every owner
// AppendMatch finds (exclusive ones as exclusive) and leaves no compiled
// program behind.
func TestCandidatesCompileNothing(t *testing.T) {
	var pats []Pattern
	for i := 0; i < 100; i++ {
		pats = append(pats,
			Pattern{Kind: Aliases, Owner: i, Regex: fmt.Sprintf(`#_as%d_.*:bench\.example\.org`, i), Exclusive: true},
			Pattern{Kind: Aliases, Owner: i, Regex: fmt.Sprintf(`(?i)#_CHAN%d_[a-z]+`, i)},
			Pattern{Kind: Aliases, Owner: i, Regex: `#[a-z]+_x`})
	}
	m, err := Compile(pats)
	if err != nil {
		t.Fatal(err)
	}
	ids := []string{"#_as7_a:bench.example.org", "#_as7_a:other.org", "#_chan42_abc", "#_Chan4_b", "#ab_x", "#"}
	all := make([][]Hit, len(ids))
	for i, id := range ids {
		all[i] = m.AppendCandidates(nil, Aliases, id)
		if !slices.IsSortedFunc(all[i], func(a, b Hit) int { return a.Owner - b.Owner }) {
			t.Errorf("id %q: candidates %v not sorted", id, all[i])
		}
	}
	for k := range m.kinds[Aliases].pats {
		if m.kinds[Aliases].pats[k].re.Load() != nil {
			t.Fatalf("AppendCandidates compiled pattern %d", k)
		}
	}
	for i, id := range ids {
		cands := all[i]
		for _, h := range m.Match(Aliases, id) {
			i := slices.IndexFunc(cands, func(c Hit) bool { return c.Owner == h.Owner })
			if i < 0 || h.Exclusive && !cands[i].Exclusive {
				t.Errorf("id %q: hit %v missing from candidates %v", id, h, cands)
			}
		}
	}
}
