// Package namespace compiles the namespace regexes of every application
// service into one matcher per kind (users, aliases, rooms).
//
// Semantics are Synapse's (Python re.match): a pattern is anchored at the
// start of the ID but not at the end, and matching is case-sensitive, so
// "#logged_" matches "#logged_test:localhost" and "@irc_.*" does not match
// "@x_irc_1:hs". Patterns are compiled by Go's RE2 engine (linear time), which
// has no lookaround and no backreferences; Validate rejects those with a
// readable reason.
package namespace

import "fmt"

// Kind is the kind of identifier a namespace covers.
type Kind uint8

// The three namespace kinds of a registration.
const (
	Users Kind = iota
	Aliases
	Rooms
	numKinds
)

// String returns the registration key for k ("users", "aliases", "rooms").
func (k Kind) String() string {
	switch k {
	case Users:
		return "users"
	case Aliases:
		return "aliases"
	case Rooms:
		return "rooms"
	}
	return fmt.Sprintf("Kind(%d)", uint8(k))
}

// Pattern is one namespace entry of one owner (an application service index).
type Pattern struct {
	Kind      Kind
	Owner     int
	Regex     string
	Exclusive bool
}

// Hit is one owner that matched an ID. Exclusive is true when any exclusive
// pattern of that owner matched it (order of namespaces does not matter).
type Hit struct {
	Owner     int
	Exclusive bool
}

// PatternError reports a pattern that cannot be compiled. Index is the
// position of the pattern in the slice given to Compile.
type PatternError struct {
	Index  int
	Regex  string
	Reason string
	Err    error
}

func (e *PatternError) Error() string {
	re := e.Regex
	if len(re) > 80 { // a huge pattern must not flood the error
		re = re[:60] + fmt.Sprintf("…(%d bytes)", len(e.Regex))
	}
	return fmt.Sprintf("regex %q: %s", re, e.Reason)
}

func (e *PatternError) Unwrap() error { return e.Err }
