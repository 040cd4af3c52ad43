package registry

import (
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"runtime"
	"sort"
	"strings"
	"sync"
	"sync/atomic"

	"github.com/asdispatch/asdispatch/namespace"
)

// Set is an immutable, validated set of application services. All methods
// are safe for concurrent use.
type Set struct {
	serverName string
	ases       []*AppService
	byID       map[string]*AppService
	byToken    map[[32]byte]*AppService
	senders    map[string][]int // sender user ID -> AS indexes (two ASes may share one)
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
	var parsed [][]*namespace.Parsed
	var warns []Warning
	for _, f := range parseFiles(files) {
		warns = append(warns, f.warns...)
		if f.err != nil {
			errs = append(errs, f.err)
			continue
		}
		regs, parsed = append(regs, f.reg), append(parsed, f.parsed)
	}
	if len(errs) > 0 {
		return nil, warns, errors.Join(errs...)
	}
	set, w, err := newSet(serverName, regs, parsed)
	return set, append(warns, w...), err
}

// parsedFile is one registration file read and parsed.
type parsedFile struct {
	reg    *Registration
	warns  []Warning
	parsed []*namespace.Parsed
	err    error
}

// parseFiles reads and parses files, on every CPU: a host with thousands
// of ASes has as many files, and parsing YAML is most of their load.
func parseFiles(files []string) []parsedFile {
	out := make([]parsedFile, len(files))
	var next atomic.Int64
	var wg sync.WaitGroup
	for range min(runtime.GOMAXPROCS(0), len(files)) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			cache := map[string]*namespace.Parsed{} // one per worker: no lock
			var buf []byte                          // parse keeps nothing of it
			for {
				i := int(next.Add(1) - 1)
				if i >= len(files) {
					return
				}
				var err error
				if buf, err = readFile(files[i], buf[:0]); err != nil {
					out[i].err = fmt.Errorf("registration: %w", err)
					continue
				}
				f := &out[i]
				f.reg, f.warns, f.parsed, f.err = parse(files[i], buf, cache)
			}
		}()
	}
	wg.Wait()
	return out
}

// readFile is os.ReadFile into buf, without its stat: a registration is
// small, and the buffer is reused for the next.
func readFile(name string, buf []byte) ([]byte, error) {
	f, err := os.Open(name)
	if err != nil {
		return buf, err
	}
	defer f.Close()
	for {
		if len(buf) == cap(buf) {
			buf = append(buf, 0)[:len(buf)]
		}
		n, err := f.Read(buf[len(buf):cap(buf)])
		buf = buf[:len(buf)+n]
		if err == io.EOF {
			return buf, nil
		}
		if err != nil {
			return buf, err
		}
	}
}

// NewSet builds a Set from parsed registrations.
func NewSet(serverName string, regs []*Registration) (*Set, []Warning, error) {
	return newSet(serverName, regs, nil)
}

// newSet is NewSet given, when parsed is not nil, the parsed regexes of
// each registration's namespaces (parsed[i] for regs[i], in setPatterns
// order), which are then not parsed again.
func newSet(serverName string, regs []*Registration, parsed [][]*namespace.Parsed) (*Set, []Warning, error) {
	s := &Set{
		serverName: serverName,
		byID:       make(map[string]*AppService, len(regs)),
		byToken:    make(map[[32]byte]*AppService, len(regs)),
		senders:    make(map[string][]int, len(regs)),
	}
	var errs []error
	var warns []Warning
	hsTokens := map[[32]byte]*Registration{}
	var pats []namespace.Pattern
	var refs []nsRef // refs[i] says where pats[i] comes from
	var pps []*namespace.Parsed
	for ri, r := range regs {
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
		s.senders[as.SenderUserID] = append(s.senders[as.SenderUserID], as.Index)
		j := 0
		for _, k := range []namespace.Kind{namespace.Users, namespace.Aliases, namespace.Rooms} {
			for i, n := range r.Namespaces.Of(k) {
				pats = append(pats, namespace.Pattern{Kind: k, Owner: as.Index, Regex: n.Regex, Exclusive: n.Exclusive})
				refs = append(refs, nsRef{as: as, kind: k, index: i})
				var pp *namespace.Parsed
				if parsed != nil && j < len(parsed[ri]) {
					pp = parsed[ri][j]
				} else {
					pp, _ = namespace.Parse(n.Regex) // nil if bad: Compile reports it
				}
				pps = append(pps, pp)
				j++
			}
		}
	}
	if len(errs) > 0 {
		return nil, warns, errors.Join(errs...)
	}
	m, err := namespace.CompileParsed(pats, pps)
	if err != nil {
		return nil, warns, fmt.Errorf("registry: %w", err)
	}
	s.matcher = m
	warns = append(warns, s.sharedSenders()...)
	warns = append(warns, s.overlaps(pats, pps, refs)...)
	return s, warns, nil
}

// sharedSenders warns about ASes with the same sender user: each holds it
// exclusively, so none may register it (as in Synapse, which loads them).
// Filed under the first file by name, so file order does not matter.
func (s *Set) sharedSenders() []Warning {
	var warns []Warning
	for user, idx := range s.senders {
		if len(idx) < 2 {
			continue
		}
		ases := make([]*AppService, len(idx))
		for i, x := range idx {
			ases[i] = s.ases[x]
		}
		sort.Slice(ases, func(a, b int) bool { return ases[a].File < ases[b].File })
		var others []string
		for _, as := range ases[1:] {
			others = append(others, fmt.Sprintf("AS %s (%s)", as.ID, as.File))
		}
		warns = append(warns, Warning{File: ases[0].File, Field: "sender_localpart",
			Message: fmt.Sprintf("%s is also the sender of %s: each holds it exclusively, so none may register it", user, strings.Join(others, ", "))})
	}
	sort.Slice(warns, func(a, b int) bool { return warns[a].File < warns[b].File })
	return warns
}

// nsRef names one namespace entry of a registration, for messages.
type nsRef struct {
	as    *AppService
	kind  namespace.Kind
	index int
}

func (r nsRef) field() string { return fmt.Sprintf("namespaces.%s[%d].regex", r.kind, r.index) }

func (r nsRef) entry() Namespace { return r.as.Namespaces.Of(r.kind)[r.index] }

// overlaps warns about exclusive namespaces of two ASes that claim the same
// IDs: neither AS may then register those IDs (see CheckRegister). Finding
// every intersection of two regexes is out of reach; instead each exclusive
// pattern's sample IDs (see namespace.Parsed.Samples) are looked up in the matcher, so a
// warning always comes with an ID both claim. That covers identical regexes
// and literal prefixes of which one starts the other (`@irc_.*` and
// `@irc_libera_.*`), at one lookup per sample rather than a comparison of
// every pattern with every other. The warnings do not depend on file order.
func (s *Set) overlaps(pats []namespace.Pattern, parsed []*namespace.Parsed, refs []nsRef) []Warning {
	type pair struct{ a, b int }
	seen := map[pair]bool{}
	// Exclusive patterns per owner and kind, to name the one that matched.
	type ownerKind struct {
		owner int
		kind  namespace.Kind
	}
	excl := map[ownerKind][]int{}
	for i, p := range pats {
		if p.Exclusive {
			excl[ownerKind{p.Owner, p.Kind}] = append(excl[ownerKind{p.Owner, p.Kind}], i)
		}
	}
	var warns []Warning
	var hits []namespace.Hit
	for i, p := range pats {
		if !p.Exclusive {
			continue
		}
		for _, id := range parsed[i].Samples() {
			// Candidates, not matches: each pattern is checked below with
			// its parse, dropped when NewSet returns, where AppendMatch
			// would leave one compiled in the matcher for every pattern a
			// sample reaches (18 MiB at 10,000 ASes).
			hits = s.matcher.AppendCandidates(hits[:0], p.Kind, id)
			for _, h := range hits {
				if !h.Exclusive || h.Owner == p.Owner {
					continue
				}
				for _, j := range excl[ownerKind{h.Owner, p.Kind}] {
					k := pair{min(i, j), max(i, j)}
					if seen[k] || !parsed[j].Match(id) {
						continue
					}
					seen[k] = true
					warns = append(warns, overlapWarning(refs[i], refs[j], id))
					if len(warns) == maxOverlapWarnings {
						// Many ASes claiming one namespace: say so once
						// rather than for every pair of them.
						sortWarnings(warns)
						return append(warns, Warning{File: refs[i].as.File, Field: refs[i].field(),
							Message: fmt.Sprintf("more exclusive namespaces overlap; only the first %d overlaps are listed", maxOverlapWarnings)})
					}
				}
			}
		}
	}
	sortWarnings(warns)
	return warns
}

// maxOverlapWarnings bounds the overlap warnings, and the work of finding
// them when many ASes claim the same namespace.
const maxOverlapWarnings = 50

func sortWarnings(warns []Warning) {
	sort.Slice(warns, func(i, j int) bool {
		if warns[i].File != warns[j].File {
			return warns[i].File < warns[j].File
		}
		if warns[i].Line != warns[j].Line {
			return warns[i].Line < warns[j].Line
		}
		return warns[i].Message < warns[j].Message
	})
}

// overlapWarning is filed under the earlier of the two files (by name and
// line), so it reads the same whatever order the files were loaded in.
func overlapWarning(a, b nsRef, id string) Warning {
	if b.as.File < a.as.File || (b.as.File == a.as.File && b.entry().Line < a.entry().Line) {
		a, b = b, a
	}
	return Warning{File: a.as.File, Line: a.entry().Line, Field: a.field(),
		Message: fmt.Sprintf("exclusive regex %q of AS %s overlaps exclusive regex %q of AS %s (%s:%d %s): both claim IDs like %q, which neither AS may then register",
			a.entry().Regex, a.as.ID, b.entry().Regex, b.as.ID, b.as.File, b.entry().Line, b.field(), id)}
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
	for _, i := range s.senders[userID] {
		found := false
		for j := start; j < len(dst); j++ {
			if dst[j].Owner == i {
				dst[j].Exclusive, found = true, true
				break
			}
		}
		if !found {
			// Insert in owner order: hits are few.
			dst = append(dst, namespace.Hit{Owner: i, Exclusive: true})
			for j := len(dst) - 1; j > start && dst[j].Owner < dst[j-1].Owner; j-- {
				dst[j], dst[j-1] = dst[j-1], dst[j]
			}
		}
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

// exclusiveOwners appends the ASes of hits that hold the ID exclusively,
// sorted by AS id so the answer does not depend on file order.
func exclusiveOwners(dst []*AppService, hits []namespace.Hit, ases []*AppService) []*AppService {
	start := len(dst)
	for _, h := range hits {
		if h.Exclusive {
			dst = append(dst, ases[h.Owner])
		}
	}
	sort.Slice(dst[start:], func(a, b int) bool { return dst[start+a].ID < dst[start+b].ID })
	return dst
}

// ExclusiveUserOwners appends the ASes holding userID exclusively (its
// namespaces or its sender user). Usually there is at most one; when
// several ASes' exclusive namespaces overlap (warned about at load), all
// of them, sorted by AS id.
func (s *Set) ExclusiveUserOwners(dst []*AppService, userID string) []*AppService {
	var buf [8]namespace.Hit
	return exclusiveOwners(dst, s.UsersInterested(buf[:0], userID), s.ases)
}

// ExclusiveAliasOwners is ExclusiveUserOwners for a room alias.
func (s *Set) ExclusiveAliasOwners(dst []*AppService, alias string) []*AppService {
	var buf [8]namespace.Hit
	return exclusiveOwners(dst, s.AliasesInterested(buf[:0], alias), s.ases)
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
// AS registers only inside its own namespaces and outside every other AS's
// exclusive ones, as in Synapse: an ID two ASes both hold exclusively can
// be registered by neither, whatever the order of their files. Otherwise
// M_EXCLUSIVE.
func (s *Set) CheckRegister(as *AppService, userID string) error {
	hits := s.UsersInterested(nil, userID)
	return s.check(as, hits, "user ID", userID)
}

// CheckAlias is CheckRegister for creating or deleting a room alias.
func (s *Set) CheckAlias(as *AppService, alias string) error {
	return s.check(as, s.AliasesInterested(nil, alias), "alias", alias)
}

func (s *Set) check(as *AppService, hits []namespace.Hit, what, id string) error {
	for _, h := range hits {
		if h.Exclusive && (as == nil || h.Owner != as.Index) {
			return newError(ErrExclusive, "this %s is reserved by an application service", what)
		}
	}
	if as != nil && !holds(hits, as) {
		return newError(ErrExclusive, "%s %s is outside the namespaces of application service %s", what, id, as.ID)
	}
	return nil
}
