package namespace

import (
	"fmt"
	"slices"
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
