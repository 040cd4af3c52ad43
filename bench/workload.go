// Package bench is the fan-out benchmark behind `asdispatch bench`: a
// generated bridge workload run through the real module, beside the
// baseline a user would otherwise get and this machine's limit, measured in
// the same run.
package bench

import (
	"context"
	"fmt"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"

	"github.com/asdispatch/asdispatch/dispatcher"
	"github.com/asdispatch/asdispatch/namespace"
	"github.com/asdispatch/asdispatch/registry"
)

// Config describes one workload.
type Config struct {
	// ASes is the number of application services (default 10).
	ASes int
	// Rooms and MembersPerRoom shape the rooms events are sent in.
	Rooms          int
	MembersPerRoom int
	// Interest is the share of events each AS is interested in (0..1].
	Interest float64
	// EventSize is the size of each event's JSON in bytes.
	EventSize int
	// Events is how many events one round submits.
	Events int
	// Rounds is how many rounds each figure is the median of.
	Rounds int
	// MaxEventsPerTxn and MaxTxnBytes are the transaction caps;
	// CatchupMaxEventsPerTxn is queue.Options.CatchupMaxEvents (0: off).
	MaxEventsPerTxn        int
	MaxTxnBytes            int
	CatchupMaxEventsPerTxn int
	// Namespaces is the number of users regexes per AS (default 3), their
	// kinds taken in turn from Mix (default prefix, suffix, alternation).
	Namespaces int
	Mix        []string
	// Churn is the share of events that are a ghost joining or leaving a
	// room (default 0.05); AliasChurn the share that change the room's
	// alias (default 0.01). Negative means none.
	Churn      float64
	AliasChurn float64
	// CatchupEvents is the backlog one AS builds up while down (default
	// 100,000; negative skips catch-up).
	CatchupEvents int
	// BaselineCatchupEvents caps the backlog the baseline drains; a larger
	// CatchupEvents is extrapolated linearly from it (default 100,000).
	BaselineCatchupEvents int
	// SkipHalfLoad skips the second end-to-end run, paced at half the
	// measured throughput, that gives the latency at half load.
	SkipHalfLoad bool
	// SharedServerAbove serves the ASes from one HTTP server, routing by
	// path, when there are more of them than this (default 100): each AS
	// still has its own URL and hs_token.
	SharedServerAbove int
	// Store is the backend, StoreSQLite (default) or StorePostgres on DSN.
	Store string
	DSN   string
	// Processes lists the dispatcher instance counts the end-to-end
	// figure is also measured with on a shared (PostgreSQL) store, e.g.
	// 1, 2, 3; empty measures one.
	Processes []int

	// profile, set by benchmarks, runs from the first Submit of an
	// end-to-end run until its return.
	profile func() (stop func())
}

// Namespace kinds for Config.Mix.
const (
	MixPrefix      = "prefix"      // @_as7_.*: a literal prefix
	MixSuffix      = "suffix"      // @.*:as7\.bridge\.example\.org: a literal server suffix
	MixAlternation = "alternation" // @(tg|sig)7_.*
	MixCasefold    = "casefold"    // (?i)@_bot7_.* or @(?i:_bot)7_.*: keyed on its folded literal
	MixNoLiteral   = "noliteral"   // @(?:_bot7_|\d+_bot7_).*: no literal the index can use
)

// ParseMix parses a comma-separated list of namespace kinds.
func ParseMix(s string) ([]string, error) {
	var out []string
	for _, k := range strings.Split(s, ",") {
		k = strings.TrimSpace(k)
		switch k {
		case MixPrefix, MixSuffix, MixAlternation, MixCasefold, MixNoLiteral:
			out = append(out, k)
		default:
			return nil, fmt.Errorf("unknown namespace kind %q (want %s, %s, %s, %s or %s)", k, MixPrefix, MixSuffix, MixAlternation, MixCasefold, MixNoLiteral)
		}
	}
	return out, nil
}

func (c *Config) defaults() {
	def := func(p *int, v int) {
		if *p <= 0 {
			*p = v
		}
	}
	def(&c.ASes, 10)
	def(&c.Rooms, 100)
	def(&c.MembersPerRoom, 20)
	def(&c.EventSize, 500)
	def(&c.Events, 20000)
	def(&c.Rounds, 3)
	def(&c.MaxEventsPerTxn, 100)
	def(&c.MaxTxnBytes, 4<<20)
	def(&c.Namespaces, 3)
	def(&c.BaselineCatchupEvents, 100000)
	def(&c.SharedServerAbove, 100)
	if c.CatchupEvents == 0 {
		c.CatchupEvents = 100000
	}
	if len(c.Mix) == 0 {
		c.Mix = []string{MixPrefix, MixSuffix, MixAlternation}
	}
	if c.Interest <= 0 || c.Interest > 1 {
		c.Interest = 1
	}
	if c.Churn == 0 {
		c.Churn = 0.05
	}
	if c.AliasChurn == 0 {
		c.AliasChurn = 0.01
	}
	c.Churn, c.AliasChurn = max(c.Churn, 0), max(c.AliasChurn, 0)
	if c.Store == "" {
		c.Store = StoreSQLite
	}
}

const server = "bench.example.org"

// userRegex is AS i's j-th users namespace.
func (c *Config) userRegex(i, j int) (regex string, exclusive bool) {
	n := ""
	if j > 0 {
		n = fmt.Sprintf("n%d_", j)
	}
	switch c.Mix[(i+j)%len(c.Mix)] {
	case MixSuffix:
		if j > 0 {
			n = fmt.Sprintf("-n%d", j)
		}
		return fmt.Sprintf(`@.*:as%d%s\.bridge\.example\.org`, i, n), false
	case MixAlternation:
		return fmt.Sprintf(`@(tg|sig)%d_%s.*`, i, n), true
	case MixCasefold:
		if i%2 == 1 { // a scoped flag
			return fmt.Sprintf(`@(?i:_bot)%d_%s.*`, i, n), false
		}
		return fmt.Sprintf(`(?i)@_bot%d_%s.*`, i, n), false
	case MixNoLiteral:
		// The literal is only in one branch of an alternation.
		return fmt.Sprintf(`@(?:_bot%d_%s|\d+_bot%d_%s).*`, i, n, i, n), false
	default:
		return fmt.Sprintf(`@_as%d_%s.*`, i, n), true
	}
}

// ghost is a user of AS i (in its first namespace) in room r.
func (c *Config) ghost(i, r int) string {
	switch c.Mix[i%len(c.Mix)] {
	case MixSuffix:
		return fmt.Sprintf("@g%d:as%d.bridge.example.org", r, i)
	case MixAlternation:
		return fmt.Sprintf("@tg%d_g%d:%s", i, r, server)
	case MixCasefold:
		return fmt.Sprintf("@_BOT%d_g%d:%s", i, r, server)
	case MixNoLiteral:
		return fmt.Sprintf("@_bot%d_g%d:%s", i, r, server)
	default:
		return fmt.Sprintf("@_as%d_g%d:%s", i, r, server)
	}
}

// registrationYAML is AS i: Namespaces users regexes of the kinds of Mix,
// one aliases and one rooms regex.
func (c *Config) registrationYAML(i int, url, hsToken string) string {
	var b strings.Builder
	fmt.Fprintf(&b, "id: as%d\nurl: %s\nas_token: bench-as-%d\nhs_token: %s\nsender_localpart: bot%d\nrate_limited: false\nnamespaces:\n  users:\n", i, url, i, hsToken, i)
	for j := 0; j < c.Namespaces; j++ {
		re, ex := c.userRegex(i, j)
		fmt.Fprintf(&b, "    - {exclusive: %v, regex: %s}\n", ex, strconv.Quote(re))
	}
	fmt.Fprintf(&b, "  aliases:\n    - {exclusive: true, regex: %s}\n", strconv.Quote(fmt.Sprintf("#_as%d_.*:%s", i, regexp.QuoteMeta(server))))
	// The server suffix every AS shares: the index must key on the prefix.
	fmt.Fprintf(&b, "  rooms:\n    - {exclusive: false, regex: %s}\n", strconv.Quote(fmt.Sprintf("!_as%d_.*:%s", i, regexp.QuoteMeta(server))))
	return b.String()
}

// buildSet parses the generated registrations; it also returns every
// pattern for the plain loop of the baseline.
func (c *Config) buildSet(url func(i int) string, hsToken func(i int) string) (*registry.Set, []namespace.Pattern, error) {
	regs := make([]*registry.Registration, c.ASes)
	var pats []namespace.Pattern
	for i := range regs {
		r, _, err := registry.Parse(fmt.Sprintf("as%d.yaml", i), []byte(c.registrationYAML(i, url(i), hsToken(i))))
		if err != nil {
			return nil, nil, err
		}
		regs[i] = r
		for _, k := range []namespace.Kind{namespace.Users, namespace.Aliases, namespace.Rooms} {
			for _, ns := range r.Namespaces.Of(k) {
				pats = append(pats, namespace.Pattern{Kind: k, Owner: i, Regex: ns.Regex, Exclusive: ns.Exclusive})
			}
		}
	}
	set, _, err := registry.NewSet(server, regs)
	return set, pats, err
}

// roomASes returns the ASes that have a ghost in room r at the start:
// ceil(Interest*ASes) of them, rotating with r so every AS gets its share.
func (c *Config) roomASes(r int) []int {
	k := c.perRoom()
	out := make([]int, k)
	for j := range out {
		out[j] = (r + j) % c.ASes
	}
	return out
}

func (c *Config) perRoom() int { return min(c.ASes, int(float64(c.ASes)*c.Interest+0.999)) }

func roomID(r int) string { return fmt.Sprintf("!room%d:%s", r, server) }

func roomIndex(id string) int {
	s := strings.TrimPrefix(id, "!room")
	n, err := strconv.Atoi(s[:max(0, strings.IndexByte(s, ':'))])
	if err != nil {
		return -1
	}
	return n
}

// Event kinds of the workload.
const (
	kindMessage = iota
	kindMember  // a ghost joins or leaves
	kindAlias   // the room's alias moves to another AS's namespace
)

// step is one generated event and the homeserver state change it brings.
type step struct {
	e, room, kind int
	as            int  // the ghost's or the alias's AS
	join          bool // kindMember
	alias         string
}

// generator produces the events of the rooms it owns, in order. Several
// generators split the rooms between them so that each room's events keep
// their order across concurrent submitters.
type generator struct {
	c      *Config
	member []int // per room, member changes so far
}

func newGenerator(c *Config) *generator {
	return &generator{c: c, member: make([]int, c.Rooms)}
}

// mix64 is splitmix64: a deterministic, well spread event kind per event.
func mix64(x uint64) uint64 {
	x += 0x9e3779b97f4a7c15
	x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9
	x = (x ^ (x >> 27)) * 0x94d049bb133111eb
	return x ^ (x >> 31)
}

func (g *generator) next(e int) step {
	r := e % g.c.Rooms
	u := float64(mix64(uint64(e))>>11) / (1 << 53)
	k := g.c.perRoom()
	switch {
	case u < g.c.Churn:
		// The AS just past the room's own ones joins, then leaves, then
		// joins again: interest moves between k and k+1 ASes.
		n := g.member[r]
		g.member[r]++
		return step{e: e, room: r, kind: kindMember, as: (r + k) % g.c.ASes, join: n%2 == 0}
	case u < g.c.Churn+g.c.AliasChurn:
		as := (r + k + 1 + e) % g.c.ASes
		return step{e: e, room: r, kind: kindAlias, as: as, alias: fmt.Sprintf("#_as%d_r%d_%d:%s", as, r, e, server)}
	}
	return step{e: e, room: r, kind: kindMessage}
}

// state is the homeserver's side of the rooms: who is joined, which alias
// the directory has. It is the dispatcher's RoomState and the reference the
// deliveries are checked against.
type state struct {
	c     *Config
	mu    sync.RWMutex
	rooms []roomModel
}

type roomModel struct {
	joined   []int // ASes with a ghost joined, sorted
	aliasAS  int   // -1: no alias
	alias    string
	interest []int // joined plus aliasAS, sorted, unique
}

func newState(c *Config) *state {
	s := &state{c: c, rooms: make([]roomModel, c.Rooms)}
	for r := range s.rooms {
		m := &s.rooms[r]
		m.joined = c.roomASes(r)
		slices.Sort(m.joined)
		m.joined = slices.Compact(m.joined)
		m.aliasAS = -1
		m.interest = slices.Clone(m.joined)
	}
	return s
}

// apply makes the homeserver's change of st and returns the ASes that must
// receive its event, sorted. Only the generator owning st.room calls it, so
// the result stays valid until its next call for that room.
func (s *state) apply(st step) []int {
	m := &s.rooms[st.room]
	if st.kind == kindMessage {
		return m.interest
	}
	s.mu.Lock()
	switch st.kind {
	case kindMember:
		i, found := slices.BinarySearch(m.joined, st.as)
		if st.join && !found {
			m.joined = slices.Insert(m.joined, i, st.as)
		} else if !st.join && found {
			m.joined = slices.Delete(m.joined, i, i+1)
		}
	case kindAlias:
		m.aliasAS, m.alias = st.as, st.alias
	}
	m.interest = append(m.interest[:0], m.joined...)
	if m.aliasAS >= 0 {
		m.interest = append(m.interest, m.aliasAS)
	}
	slices.Sort(m.interest)
	m.interest = slices.Compact(m.interest)
	out := m.interest
	if st.kind == kindMember {
		// The ghost's AS gets its own leave too (state_key).
		out = append(slices.Clone(out), st.as)
		slices.Sort(out)
		out = slices.Compact(out)
	}
	s.mu.Unlock()
	return out
}

// JoinedLocalMembers implements dispatcher.RoomState: the ghosts joined and
// plain users up to MembersPerRoom.
func (s *state) JoinedLocalMembers(_ context.Context, id string) ([]string, error) {
	r := roomIndex(id)
	if r < 0 || r >= len(s.rooms) {
		return nil, nil
	}
	s.mu.RLock()
	joined := slices.Clone(s.rooms[r].joined)
	s.mu.RUnlock()
	out := make([]string, 0, max(len(joined), s.c.MembersPerRoom))
	for _, i := range joined {
		out = append(out, s.c.ghost(i, r))
	}
	for m := len(out); m < s.c.MembersPerRoom; m++ {
		out = append(out, fmt.Sprintf("@user%d_%d:%s", r, m, server))
	}
	return out, nil
}

// LocalAliases implements dispatcher.RoomState.
func (s *state) LocalAliases(_ context.Context, id string) ([]string, error) {
	r := roomIndex(id)
	if r < 0 || r >= len(s.rooms) {
		return nil, nil
	}
	s.mu.RLock()
	defer s.mu.RUnlock()
	if a := s.rooms[r].alias; a != "" {
		return []string{a}, nil
	}
	return nil, nil
}

// IsLocalUser implements dispatcher.RoomState: the bridges' ghosts are
// local users whatever their server part.
func (*state) IsLocalUser(string) bool { return true }

// sender is the plain user who sends the messages of room r.
func sender(r int) string { return fmt.Sprintf("@user%d_0:%s", r, server) }

// event builds the dispatcher event of st, stamped with nanos for latency.
func (c *Config) event(st step, nanos int64) dispatcher.Event {
	id := "$e" + strconv.Itoa(st.e)
	room := roomID(st.room)
	switch st.kind {
	case kindMember:
		g := c.ghost(st.as, st.room)
		m := "leave"
		if st.join {
			m = "join"
		}
		return dispatcher.Event{ID: id, RoomID: room, Type: "m.room.member", Sender: g, StateKey: &g, Membership: m,
			JSON: eventJSON(id, room, "m.room.member", g, &g, `"membership":"`+m+`",`, c.EventSize, nanos)}
	case kindAlias:
		s := sender(st.room)
		empty := ""
		return dispatcher.Event{ID: id, RoomID: room, Type: "m.room.canonical_alias", Sender: s, StateKey: &empty,
			JSON: eventJSON(id, room, "m.room.canonical_alias", s, &empty, `"alias":"`+st.alias+`",`, c.EventSize, nanos)}
	}
	s := sender(st.room)
	return dispatcher.Event{ID: id, RoomID: room, Type: "m.room.message", Sender: s,
		JSON: eventJSON(id, room, "m.room.message", s, nil, "", c.EventSize, nanos)}
}

// eventJSON is a client-format event of about size bytes carrying the time
// it was submitted, for latency.
func eventJSON(id, room, typ, sender string, stateKey *string, content string, size int, nanos int64) []byte {
	sk := ""
	if stateKey != nil {
		sk = `"state_key":` + strconv.Quote(*stateKey) + `,`
	}
	head := fmt.Sprintf(`{"event_id":%q,"room_id":%q,"type":%q,"sender":%q,%s"origin_server_ts":0,"content":{%s"t":%d,"body":"`, id, room, typ, sender, sk, content, nanos)
	pad := max(0, size-len(head)-3)
	return []byte(head + strings.Repeat("x", pad) + `"}}`)
}
