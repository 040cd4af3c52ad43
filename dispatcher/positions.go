package dispatcher

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sync"
	"sync/atomic"

	"go.uber.org/zap"

	"github.com/asdispatch/asdispatch/txnstore"
)

// Position is where an item stands in one of the homeserver's streams: its
// event stream (Synapse's stream ordering), receipts, typing, to-device,
// device lists. Positions grow along a stream; an item handed over with a
// position at or below the stream's stored one (see Dispatcher.Position) is
// skipped, so a homeserver replays its log after a crash without duplicates.
//
// Stream names the stream and, when several processes write one kind of
// stream, its writer ("events/worker1"): each name has one writer, which
// hands its items over in position order, a call starting after the
// previous call on that stream returned. The zero Position hands an item
// over without one: it is never skipped.
type Position struct {
	Stream string
	Pos    int64
}

// ErrInvalidPosition rejects a call whose positions cannot be right: a Pos
// not above 0, a Pos without a Stream, or one stream's positions going
// down along the call's items (items sharing a position are fine).
var ErrInvalidPosition = errors.New("invalid stream position")

// streamState is what this process knows of one stream.
type streamState struct {
	lock chan struct{} // held by the call handing the stream's items over
	// pos is the stored position as this process last committed or read
	// it; -1 when unknown (never read, or a commit failed: it may have
	// landed).
	pos atomic.Int64
}

// streamTable holds the streams the dispatcher has seen. Streams are few
// (a homeserver has a handful per writer) and never forgotten.
type streamTable struct {
	m sync.Map // string → *streamState
}

func (t *streamTable) get(name string) *streamState {
	if s, ok := t.m.Load(name); ok {
		return s.(*streamState)
	}
	s := &streamState{lock: make(chan struct{}, 1)}
	s.pos.Store(-1)
	got, _ := t.m.LoadOrStore(name, s)
	return got.(*streamState)
}

// handover is one call's hand-over of positioned items: the streams it
// holds and, per item, whether it is skipped and the position it is
// stored with.
type handover struct {
	d      *Dispatcher
	names  []string
	states []*streamState
	cur    []int64 // each held stream's position when the call got it
	high   []int64 // each held stream's highest position in the call
	skip   []bool
	keep   []Position
}

// begin checks the positions ats of a call's items, takes the streams
// they name (in name order, the one lock order) and decides each item:
//
//   - at or below the stream's position when the call began: handed over
//     before (a replay), skipped;
//   - above it but at or below the position a concurrent call on the
//     stream committed meanwhile (the homeserver broke the one-writer,
//     in-order rule): queued without its position, so it is not lost
//     (a warning says so);
//   - above both: queued with its position.
//
// It returns nil when no item has a position. The caller must call end.
func (d *Dispatcher) begin(ctx context.Context, ats []Position) (*handover, error) {
	var names []string
	for i, at := range ats {
		if at.Stream == "" {
			if at.Pos != 0 {
				return nil, fmt.Errorf("%w: position %d without a stream", ErrInvalidPosition, at.Pos)
			}
			continue
		}
		if at.Pos <= 0 {
			return nil, fmt.Errorf("%w: %.100s at %d, not above 0", ErrInvalidPosition, at.Stream, at.Pos)
		}
		for j := i - 1; j >= 0; j-- {
			if ats[j].Stream == at.Stream {
				if ats[j].Pos > at.Pos {
					return nil, fmt.Errorf("%w: %.100s goes down from %d to %d", ErrInvalidPosition, at.Stream, ats[j].Pos, at.Pos)
				}
				break
			}
		}
		if !slices.Contains(names, at.Stream) {
			names = append(names, at.Stream)
		}
	}
	if len(names) == 0 {
		return nil, nil
	}
	slices.Sort(names)
	h := &handover{d: d, names: names, states: make([]*streamState, len(names)),
		cur: make([]int64, len(names)), high: make([]int64, len(names)),
		skip: make([]bool, len(ats)), keep: make([]Position, len(ats))}
	// Where each stream stood when the call began, before waiting for a
	// concurrent call: what that call commits meanwhile is not a replay.
	began := make([]int64, len(names))
	for i, name := range names {
		h.states[i] = d.streams.get(name)
		p, err := h.states[i].load(ctx, d.store, name)
		if err != nil {
			return nil, err
		}
		began[i] = p
	}
	for i, st := range h.states {
		select {
		case st.lock <- struct{}{}:
		case <-ctx.Done():
			h.states = h.states[:i]
			h.end(ctx.Err())
			return nil, ctx.Err()
		}
		p, err := st.load(ctx, d.store, names[i])
		if err != nil {
			h.states = h.states[:i+1]
			h.end(err)
			return nil, err
		}
		h.cur[i], h.high[i] = p, p
	}
	overtaken := 0
	for j, at := range ats {
		if at.Stream == "" {
			continue
		}
		i, _ := slices.BinarySearch(names, at.Stream)
		switch {
		case at.Pos <= began[i]:
			h.skip[j] = true
		case at.Pos <= h.cur[i]:
			overtaken++
		default:
			h.keep[j] = at
			h.high[i] = max(h.high[i], at.Pos)
		}
	}
	if overtaken > 0 {
		d.log.Warn("items handed over below their stream's position, which a concurrent call moved: queued, but the homeserver must hand each stream over from one writer, in order",
			zap.Int("items", overtaken), zap.Strings("streams", names))
	}
	return h, nil
}

// load returns the stream's position, reading it from the store if this
// process does not know it.
func (s *streamState) load(ctx context.Context, store txnstore.Store, name string) (int64, error) {
	if p := s.pos.Load(); p >= 0 {
		return p, nil
	}
	p, err := store.Position(ctx, name)
	if err != nil {
		return 0, fmt.Errorf("dispatcher: %w", err)
	}
	// A call holding the stream may have committed meanwhile: keep its.
	s.pos.CompareAndSwap(-1, p)
	return s.pos.Load(), nil
}

// end releases the streams: on success each moves to the call's highest
// position; after an error it is unknown, since the commit may have landed.
func (h *handover) end(err error) {
	if h == nil {
		return
	}
	for i, st := range h.states {
		if err != nil {
			st.pos.Store(-1)
		} else {
			st.pos.Store(h.high[i])
		}
		<-st.lock
	}
}

// skipped reports whether item i is skipped.
func (h *handover) skipped(i int) bool { return h != nil && h.skip[i] }

// entry returns e with item i's position, if it keeps one.
func (h *handover) entry(i int, e txnstore.Entry) txnstore.Entry {
	if h != nil {
		e.Stream, e.Pos = h.keep[i].Stream, h.keep[i].Pos
	}
	return e
}

// Position returns the highest position of stream handed over: durable,
// committed with the items it covers. On start a homeserver hands over
// every item of its log after it, in order.
func (d *Dispatcher) Position(ctx context.Context, stream string) (int64, error) {
	if d.closed.Load() {
		return 0, ErrClosed
	}
	p, err := d.store.Position(ctx, stream)
	if err != nil {
		return 0, fmt.Errorf("dispatcher: %w", err)
	}
	return p, nil
}
