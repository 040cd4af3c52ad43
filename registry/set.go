package registry

import (
	"crypto/sha256"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"sort"
	"strings"

	"github.com/asdispatch/asdispatch/namespace"
)

// Set is an immutable, validated set of application services. All methods
// are safe for concurrent use.
type Set struct {
	serverName string
	ases       []*AppService
	byID       map[string]*AppService
	byToken    map[[32]byte]*AppService
	senders    map[string]int // sender user ID -> AS index
	matcher    *namespace.Matcher
}

// DuplicateError reports a value two files both claim.
type DuplicateError struct {
	Field       string
	Value       string // empty for tokens
	File, Other string
}

func (e *DuplicateError) Error() string {
	if e.Value == "" {
		return fmt.Sprintf("%s: %s is the same as in %s; each AS needs its own", e.File, e.Field, e.Other)
	}
	return fmt.Sprintf("%s: %s %q is already used by %s", e.File, e.Field, e.Value, e.Other)
}

// Load parses every registration in paths (files, or directories of
// *.yaml / *.yml files) and builds a Set. All errors of all files are
// returned together.
func Load(serverName string, paths ...string) (*Set, []Warning, error) {
	var files []string
	var errs []error
	for _, p := range paths {
		fi, err := os.Stat(p)
		if err != nil {
			errs = append(errs, fmt.Errorf("registration %w", err))
			continue
		}
		if !fi.IsDir() {
			files = append(files, p)
			continue
		}
		entries, err := os.ReadDir(p)
		if err != nil {
			errs = append(errs, fmt.Errorf("registration dir: %w", err))
			continue
		}
		var found []string
		for _, e := range entries {
			if !e.IsDir() && (strings.HasSuffix(e.Name(), ".yaml") || strings.HasSuffix(e.Name(), ".yml")) {
				found = append(found, filepath.Join(p, e.Name()))
			}
		}
		sort.Strings(found)
		files = append(files, found...)
	}
	var regs []*Registration
	var warns []Warning
	for _, f := range files {
		data, err := os.ReadFile(f)
		if err != nil {
			errs = append(errs, fmt.Errorf("registration: %w", err))
			continue
		}
		r, w, err := Parse(f, data)
		warns = append(warns, w...)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		regs = append(regs, r)
	}
	if len(errs) > 0 {
		return nil, warns, errors.Join(errs...)
	}
	set, w, err := NewSet(serverName, regs)
	return set, append(warns, w...), err
}

// NewSet builds a Set from parsed registrations.
func NewSet(serverName string, regs []*Registration) (*Set, []Warning, error) {
	s := &Set{
		serverName: serverName,
		byID:       make(map[string]*AppService, len(regs)),
		byToken:    make(map[[32]byte]*AppService, len(regs)),
		senders:    make(map[string]int, len(regs)),
	}
	var errs []error
	var warns []Warning
	hsTokens := map[[32]byte]*Registration{}
	var pats []namespace.Pattern
	for _, r := range regs {
		if o := s.byID[r.ID]; o != nil {
			errs = append(errs, &DuplicateError{Field: "id", Value: r.ID, File: r.File, Other: o.File})
			continue
		}
		tok := sha256.Sum256([]byte(r.ASToken.Reveal()))
		if o := s.byToken[tok]; o != nil {
			errs = append(errs, &DuplicateError{Field: "as_token", File: r.File, Other: o.File})
			continue
		}
		hs := sha256.Sum256([]byte(r.HSToken.Reveal()))
		if o := hsTokens[hs]; o != nil {
			warns = append(warns, Warning{File: r.File, Field: "hs_token", Message: "same as in " + o.File + "; each AS should have its own"})
		}
		hsTokens[hs] = r
		as := &AppService{Registration: r, Index: len(s.ases), SenderUserID: "@" + r.SenderLocalpart + ":" + serverName}
		s.ases = append(s.ases, as)
		s.byID[r.ID], s.byToken[tok] = as, as
		s.senders[as.SenderUserID] = as.Index
		for _, k := range []namespace.Kind{namespace.Users, namespace.Aliases, namespace.Rooms} {
			for _, n := range r.Namespaces.Of(k) {
				pats = append(pats, namespace.Pattern{Kind: k, Owner: as.Index, Regex: n.Regex, Exclusive: n.Exclusive})
			}
		}
	}
	if len(errs) > 0 {
		return nil, warns, errors.Join(errs...)
	}
	m, err := namespace.Compile(pats)
	if err != nil {
		return nil, warns, fmt.Errorf("registry: %w", err)
	}
	s.matcher = m
	warns = append(warns, s.overlaps(pats)...)
	return s, warns, nil
}

// overlaps warns about exclusive namespaces of two ASes that claim the same
// IDs: identical regexes, or literal prefixes of which one starts the other
// (`@irc_.*` and `@irc_libera_.*`). Sorting the prefixes finds such pairs
// without comparing every pattern with every other.
func (s *Set) overlaps(pats []namespace.Pattern) []Warning {
	type lit struct {
		prefix string
		p      namespace.Pattern
	}
	var lits []lit
	for _, p := range pats {
		if !p.Exclusive {
			continue
		}
		re, err := regexp.Compile(p.Regex)
		if err != nil {
			continue
		}
		prefix, _ := re.LiteralPrefix()
		if len(prefix) > 1 {
			lits = append(lits, lit{prefix, p})
		}
	}
	sort.Slice(lits, func(i, j int) bool {
		if lits[i].p.Kind != lits[j].p.Kind {
			return lits[i].p.Kind < lits[j].p.Kind
		}
		return lits[i].prefix < lits[j].prefix
	})
	var warns []Warning
	for i := 1; i < len(lits); i++ {
		a, b := lits[i-1], lits[i]
		if a.p.Kind != b.p.Kind || a.p.Owner == b.p.Owner || !strings.HasPrefix(b.prefix, a.prefix) {
			continue
		}
		as, other := s.ases[b.p.Owner], s.ases[a.p.Owner]
		warns = append(warns, Warning{File: as.File, Field: "namespaces." + b.p.Kind.String(),
			Message: fmt.Sprintf("exclusive regex %q overlaps exclusive regex %q of %s (%s)", b.p.Regex, a.p.Regex, other.ID, other.File)})
	}
	return warns
}

// ServerName is the homeserver's name the Set was built for.
func (s *Set) ServerName() string { return s.serverName }

// Len is the number of ASes.
func (s *Set) Len() int { return len(s.ases) }

// All returns the ASes by Index. The slice must not be modified.
func (s *Set) All() []*AppService { return s.ases }

// ByID returns the AS with this id, or nil.
func (s *Set) ByID(id string) *AppService { return s.byID[id] }

// ByASToken returns the AS whose as_token this is. The lookup is by hash and
// the final comparison constant-time, so timing reveals nothing of a token.
func (s *Set) ByASToken(token string) (*AppService, error) {
	if token != "" {
		if as := s.byToken[sha256.Sum256([]byte(token))]; as != nil && as.ASToken.Equal(token) {
			return as, nil
		}
	}
	return nil, newError(ErrUnknownToken, "unknown access token")
}

// UsersInterested appends the ASes whose users namespaces (or sender user)
// match userID. It does not allocate when dst has room.
func (s *Set) UsersInterested(dst []namespace.Hit, userID string) []namespace.Hit {
	start := len(dst)
	dst = s.matcher.AppendMatch(dst, namespace.Users, userID)
	if i, ok := s.senders[userID]; ok {
		for j := start; j < len(dst); j++ {
			if dst[j].Owner == i {
				dst[j].Exclusive = true
				return dst
			}
		}
		dst = append(dst, namespace.Hit{Owner: i, Exclusive: true})
		sort.Slice(dst[start:], func(a, b int) bool { return dst[start+a].Owner < dst[start+b].Owner })
	}
	return dst
}

// AliasesInterested appends the ASes whose alias namespaces match alias.
func (s *Set) AliasesInterested(dst []namespace.Hit, alias string) []namespace.Hit {
	return s.matcher.AppendMatch(dst, namespace.Aliases, alias)
}

// RoomsInterested appends the ASes whose room namespaces match roomID.
func (s *Set) RoomsInterested(dst []namespace.Hit, roomID string) []namespace.Hit {
	return s.matcher.AppendMatch(dst, namespace.Rooms, roomID)
}

func exclusiveOwner(hits []namespace.Hit, ases []*AppService) *AppService {
	for _, h := range hits {
		if h.Exclusive {
			return ases[h.Owner] // hits are sorted: the lowest index wins
		}
	}
	return nil
}

// ExclusiveUserOwner returns the AS holding userID exclusively, or nil.
func (s *Set) ExclusiveUserOwner(userID string) *AppService {
	var buf [8]namespace.Hit
	return exclusiveOwner(s.UsersInterested(buf[:0], userID), s.ases)
}

// ExclusiveAliasOwner returns the AS holding alias exclusively, or nil.
func (s *Set) ExclusiveAliasOwner(alias string) *AppService {
	var buf [8]namespace.Hit
	return exclusiveOwner(s.AliasesInterested(buf[:0], alias), s.ases)
}

func holds(hits []namespace.Hit, as *AppService) bool {
	for _, h := range hits {
		if h.Owner == as.Index {
			return true
		}
	}
	return false
}

// CanMasquerade reports whether as may act as userID (?user_id=): its sender
// user or a user in its users namespaces. Otherwise M_FORBIDDEN.
func (s *Set) CanMasquerade(as *AppService, userID string) error {
	// Only local users: a namespace like "@irc_.*" also matches users of
	// other servers, whom no AS may act as.
	_, server, _ := strings.Cut(userID, ":")
	if server == s.serverName && holds(s.UsersInterested(nil, userID), as) {
		return nil
	}
	return newError(ErrForbidden, "application service %s cannot masquerade as %s", as.ID, userID)
}

// CheckRegister reports whether userID may be registered by as (nil: an
// ordinary user). Ordinary users stay out of every exclusive namespace; an
// AS registers only inside its own namespaces and outside others' exclusive
// ones. Otherwise M_EXCLUSIVE.
func (s *Set) CheckRegister(as *AppService, userID string) error {
	hits := s.UsersInterested(nil, userID)
	return s.check(as, hits, "user ID", userID)
}

// CheckAlias is CheckRegister for creating or deleting a room alias.
func (s *Set) CheckAlias(as *AppService, alias string) error {
	return s.check(as, s.AliasesInterested(nil, alias), "alias", alias)
}

func (s *Set) check(as *AppService, hits []namespace.Hit, what, id string) error {
	if owner := exclusiveOwner(hits, s.ases); owner != nil && (as == nil || owner != as) {
		return newError(ErrExclusive, "this %s is reserved by an application service", what)
	}
	if as != nil && !holds(hits, as) {
		return newError(ErrExclusive, "%s %s is outside the namespaces of application service %s", what, id, as.ID)
	}
	return nil
}
