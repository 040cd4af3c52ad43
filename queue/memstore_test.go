package queue

import (
	"fmt"
	"slices"
	"time"

	"github.com/asdispatch/asdispatch/queue/internal/core"
	"github.com/asdispatch/asdispatch/txnstore"
)

// memStore is the simulation's durable store: what it holds survives a
// crash of every process. It follows the txnstore.Store contract (ranges
// checked as the real stores check them, Complete moves the cursor to the
// transaction's end and collects garbage at once, leases fence Freeze,
// SaveBody and Complete), without I/O or locks: the simulation is
// single-threaded. Every method applies atomically at the moment it is
// called.
type memStore struct {
	nextSeq int64
	items   map[int64]txnstore.Item
	refs    map[int64]int
	ases    map[txnstore.ASKey]*memAS
	leases  map[txnstore.ASKey]*memLease
	shared  bool
}

type memAS struct {
	stream    []int64 // seqs after the cursor (and some before, until collected)
	delivered int64
	nextTxn   int64
	frozen    []txnstore.Txn // by Range.After
	state     txnstore.State
}

type memLease struct {
	owner  string
	expiry time.Time // by the store's clock
}

func newMemStore(shared bool) *memStore {
	return &memStore{nextSeq: 1, items: map[int64]txnstore.Item{}, refs: map[int64]int{},
		ases: map[txnstore.ASKey]*memAS{}, leases: map[txnstore.ASKey]*memLease{}, shared: shared}
}

func (s *memStore) ensureAS(k txnstore.ASKey) {
	if s.ases[k] == nil {
		s.ases[k] = &memAS{delivered: s.nextSeq - 1, nextTxn: 1}
	}
}

func (s *memStore) append(entries []txnstore.Entry) []txnstore.Committed {
	var out []txnstore.Committed
	for _, e := range entries {
		if len(e.Targets) == 0 {
			continue
		}
		seq := s.nextSeq
		s.nextSeq++
		it := txnstore.Item{Seq: seq, Kind: e.Kind, Data: e.Data}
		s.items[seq] = it
		for _, k := range e.Targets {
			a := s.ases[k]
			a.stream = append(a.stream, seq)
			s.refs[seq]++
		}
		out = append(out, txnstore.Committed{Item: it, Targets: e.Targets})
	}
	return out
}

// read returns items after `after`; it stops once maxItems are taken, or
// once what it took reaches maxBytes (the item crossing it included).
func (s *memStore) read(k txnstore.ASKey, after int64, maxItems, maxBytes int) []txnstore.Item {
	a := s.ases[k]
	var out []txnstore.Item
	bytes := 0
	i, _ := slices.BinarySearch(a.stream, after+1)
	for ; i < len(a.stream) && len(out) < maxItems; i++ {
		if maxBytes > 0 && bytes >= maxBytes {
			break
		}
		it := s.items[a.stream[i]]
		out = append(out, it)
		bytes += len(it.Data)
	}
	return out
}

func (s *memStore) fence(k txnstore.ASKey, owner string, now time.Time) error {
	if !s.shared {
		return nil
	}
	l := s.leases[k]
	if l == nil || l.owner != owner || !now.Before(l.expiry) {
		return txnstore.ErrLeaseLost
	}
	return nil
}

func (s *memStore) lastFrozen(a *memAS) int64 {
	start := a.delivered
	if n := len(a.frozen); n > 0 {
		start = max(start, a.frozen[n-1].Range.Last)
	}
	return start
}

func (s *memStore) find(a *memAS, id int64) int {
	for i, t := range a.frozen {
		if t.ID == id {
			return i
		}
	}
	return -1
}

func (s *memStore) freeze(k txnstore.ASKey, replace int64, txns []txnstore.Txn) ([]int64, error) {
	a := s.ases[k]
	if len(txns) == 0 {
		return nil, fmt.Errorf("%w: no transactions", txnstore.ErrBadRange)
	}
	start, end, at := s.lastFrozen(a), int64(-1), -1
	if replace != 0 {
		if at = s.find(a, replace); at < 0 {
			return nil, fmt.Errorf("%w: %d", txnstore.ErrUnknownTxn, replace)
		}
		start, end = a.frozen[at].Range.After, a.frozen[at].Range.Last
	}
	prev := start
	for _, t := range txns {
		if t.Range.After != prev || t.Range.Last <= t.Range.After {
			return nil, fmt.Errorf("%w: (%d, %d] after %d", txnstore.ErrBadRange, t.Range.After, t.Range.Last, prev)
		}
		prev = t.Range.Last
	}
	if replace != 0 && prev != end {
		return nil, fmt.Errorf("%w: split ends at %d, not %d", txnstore.ErrBadRange, prev, end)
	}
	ids := make([]int64, len(txns))
	recs := make([]txnstore.Txn, len(txns))
	for i, t := range txns {
		t.ID, t.AS, t.Body = a.nextTxn, k, nil
		a.nextTxn++
		ids[i], recs[i] = t.ID, t
	}
	if replace != 0 {
		a.frozen = slices.Delete(a.frozen, at, at+1)
	}
	a.frozen = append(a.frozen, recs...)
	slices.SortFunc(a.frozen, func(x, y txnstore.Txn) int { return int(x.Range.After - y.Range.After) })
	return ids, nil
}

func (s *memStore) saveBody(k txnstore.ASKey, id int64, body []byte) error {
	a := s.ases[k]
	i := s.find(a, id)
	if i < 0 {
		return fmt.Errorf("%w: %d", txnstore.ErrUnknownTxn, id)
	}
	if a.frozen[i].Body == nil {
		a.frozen[i].Body = slices.Clone(body)
	}
	return nil
}

// complete records each of ids (one write); an unknown one is an error,
// the others are still recorded.
func (s *memStore) complete(k txnstore.ASKey, ids []int64) error {
	a := s.ases[k]
	var err error
	for _, id := range ids {
		i := s.find(a, id)
		if i < 0 {
			err = fmt.Errorf("%w: %d", txnstore.ErrUnknownTxn, id)
			continue
		}
		last := a.frozen[i].Range.Last
		a.frozen = slices.Delete(a.frozen, i, i+1)
		a.delivered = max(a.delivered, last)
	}
	// Garbage: stream entries at or below the cursor, items no stream needs.
	n := 0
	for n < len(a.stream) && a.stream[n] <= a.delivered {
		q := a.stream[n]
		if s.refs[q]--; s.refs[q] == 0 {
			delete(s.items, q)
			delete(s.refs, q)
		}
		n++
	}
	a.stream = a.stream[n:]
	return err
}

// recovery is what txnstore.Recoverer.Recover returns, as a RecoverDone.
func (s *memStore) recovery(k txnstore.ASKey) core.RecoverDone {
	a := s.ases[k]
	end := a.delivered
	if n := len(a.stream); n > 0 {
		end = max(end, a.stream[n-1])
	}
	return core.RecoverDone{Frozen: s.frozenOf(k), Delivered: a.delivered, End: end, HasEnd: true}
}

func (s *memStore) frozenOf(k txnstore.ASKey) []txnstore.Txn {
	out := slices.Clone(s.ases[k].frozen)
	for i := range out {
		out[i].Body = slices.Clone(out[i].Body)
	}
	return out
}

func (s *memStore) acquire(k txnstore.ASKey, owner string, ttl time.Duration, now time.Time) bool {
	l := s.leases[k]
	if l == nil || l.owner == owner || !now.Before(l.expiry) {
		s.leases[k] = &memLease{owner: owner, expiry: now.Add(ttl)}
		return true
	}
	return false
}

func (s *memStore) renew(k txnstore.ASKey, owner string, ttl time.Duration, now time.Time) bool {
	l := s.leases[k]
	if l == nil || l.owner != owner || !now.Before(l.expiry) {
		return false
	}
	l.expiry = now.Add(ttl)
	return true
}

func (s *memStore) release(k txnstore.ASKey, owner string) {
	if l := s.leases[k]; l != nil && l.owner == owner {
		delete(s.leases, k)
	}
}

// pending reports whether k has anything left to deliver.
func (s *memStore) pending(k txnstore.ASKey) bool {
	a := s.ases[k]
	i, _ := slices.BinarySearch(a.stream, a.delivered+1)
	return i < len(a.stream) || len(a.frozen) > 0
}
