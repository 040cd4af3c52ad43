// Package bench is the fan-out benchmark behind `asdispatch bench`: a
// generated bridge workload run through the real module, beside the
// baseline a user would otherwise get and this machine's limit, measured in
// the same run.
package bench

import (
	"fmt"
	"strings"

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
	// MaxEventsPerTxn and MaxTxnBytes are the transaction caps.
	MaxEventsPerTxn int
	MaxTxnBytes     int
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
	if c.Interest <= 0 || c.Interest > 1 {
		c.Interest = 1
	}
}

// registrationYAML is AS i with the namespace mix bridges use: a literal
// prefix, a server suffix and an alternation.
func registrationYAML(i int, url, hsToken string) string {
	return fmt.Sprintf(`id: as%d
url: %s
as_token: bench-as-%d
hs_token: %s
sender_localpart: bot%d
rate_limited: false
namespaces:
  users:
    - {exclusive: true, regex: "@_as%d_.*"}
    - {exclusive: false, regex: "@.*:as%d\\.bridge\\.example\\.org"}
    - {exclusive: true, regex: "@(tg|sig)%d_.*"}
`, i, url, i, hsToken, i, i, i, i)
}

// buildSet parses the generated registrations.
func buildSet(n int, url func(i int) string, hsToken func(i int) string) (*registry.Set, []namespace.Pattern, error) {
	regs := make([]*registry.Registration, n)
	var pats []namespace.Pattern
	for i := range regs {
		r, _, err := registry.Parse(fmt.Sprintf("as%d.yaml", i), []byte(registrationYAML(i, url(i), hsToken(i))))
		if err != nil {
			return nil, nil, err
		}
		regs[i] = r
		for _, ns := range r.Namespaces.Users {
			pats = append(pats, namespace.Pattern{Kind: namespace.Users, Owner: i, Regex: ns.Regex, Exclusive: ns.Exclusive})
		}
	}
	set, _, err := registry.NewSet("bench.example.org", regs)
	return set, pats, err
}

// roomASes returns the ASes that have a ghost in room r: ceil(Interest*ASes)
// of them, rotating with r so every AS gets its share.
func (c *Config) roomASes(r int) []int {
	k := int(float64(c.ASes)*c.Interest + 0.999)
	out := make([]int, k)
	for j := range out {
		out[j] = (r + j) % c.ASes
	}
	return out
}

// eventJSON is a client-format event of about size bytes carrying the time
// it was submitted, for latency.
func eventJSON(id, room, sender string, size int, nanos int64) []byte {
	head := fmt.Sprintf(`{"event_id":%q,"room_id":%q,"type":"m.room.message","sender":%q,"origin_server_ts":0,"content":{"t":%d,"body":"`, id, room, sender, nanos)
	pad := size - len(head) - 3
	if pad < 0 {
		pad = 0
	}
	return []byte(head + strings.Repeat("x", pad) + `"}}`)
}
