package asdendrite

import (
	"context"
	"fmt"
	"path/filepath"
	"testing"
	"time"

	"go.uber.org/zap"

	"github.com/asdispatch/asdispatch/dispatcher"
	"github.com/asdispatch/asdispatch/registry"
)

// An event the dispatcher can never take does not block the stream: the
// batch is retried one by one, the bad event dropped, the others queued.
func TestSubmitDropsOnlyTheUnqueueable(t *testing.T) {
	set, as := startRecordAS(t, true)
	ctx := context.Background()
	d, err := dispatcher.New(ctx, dispatcher.Config{Registry: registry.NewRegistry(set), DataDir: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close(ctx)
	a := &API{d: d, log: zap.NewNop()}
	ev := func(id, js string) item {
		return item{ev: dispatcher.Event{ID: id, RoomID: "!r:example.org", Type: "m.room.message", Sender: "@irc_bob:example.org", JSON: []byte(js)}}
	}
	items := []item{ev("$1", `{"event_id":"$1"}`), ev("$bad", `{"event_id":`), ev("$2", `{"event_id":"$2"}`)}
	if err := a.submit(ctx, items); err != nil {
		t.Fatal(err)
	}
	as.wait(t, "$1,$2")
}

// A batch redelivered by JetStream (crash between Submit and the ack) is
// skipped at its positions: the AS gets every event once, in sequence
// order, even when a fetch returned them out of order.
func TestSubmitReplayAtPositions(t *testing.T) {
	set, as := startRecordAS(t, true)
	ctx := context.Background()
	d, err := dispatcher.New(ctx, dispatcher.Config{Registry: registry.NewRegistry(set), DataDir: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close(ctx)
	stream := positionStream("DendriteOutputAppserviceEvent", time.Unix(1700000000, 0))
	a := &API{d: d, log: zap.NewNop(), stream: stream}
	ev := func(seq uint64) item {
		id := fmt.Sprintf("$%d", seq)
		return item{seq: seq, ev: dispatcher.Event{ID: id, RoomID: "!r:example.org", Type: "m.room.message",
			Sender: "@irc_bob:example.org", JSON: []byte(fmt.Sprintf(`{"event_id":%q}`, id))}}
	}
	for _, batch := range [][]item{
		{ev(2), ev(1), ev(3)},        // out of order within a fetch
		{ev(1), ev(2), ev(3)},        // redelivered
		{ev(2), ev(3), ev(4), ev(5)}, // overlapping
		{ev(6), ev(7), ev(6)},        // one message twice in a fetch
	} {
		if err := a.submit(ctx, batch); err != nil {
			t.Fatal(err)
		}
	}
	if p, err := d.Position(ctx, stream); err != nil || p != 7 {
		t.Fatalf("Position = %d, %v; want 7", p, err)
	}
	want := "$1,$2,$3,$4,$5,$6,$7"
	as.wait(t, want)
	as.settle(t, want) // a duplicate would arrive by now
}

// A copy Dendrite's sync API publishes again after a kill (the same event
// at a new sequence) is dropped once the original was handed over, also
// across a restart; an original whose hand-over never landed still goes.
func TestSubmitDropsRepublishedCopies(t *testing.T) {
	set, as := startRecordAS(t, true)
	ctx := context.Background()
	dir := t.TempDir()
	stream := positionStream("DendriteOutputAppserviceEvent", time.Unix(1700000000, 0))
	ev := func(id string, seq uint64) item {
		return item{seq: seq, ev: dispatcher.Event{ID: id, RoomID: "!r:example.org", Type: "m.room.message",
			Sender: "@irc_bob:example.org", JSON: []byte(fmt.Sprintf(`{"event_id":%q}`, id))}}
	}
	// open is a (re)start: dispatcher and seen store on dir, at the stored position.
	open := func() *API {
		d, err := dispatcher.New(ctx, dispatcher.Config{Registry: registry.NewRegistry(set), DataDir: dir})
		if err != nil {
			t.Fatal(err)
		}
		seen, err := openSeen(ctx, filepath.Join(dir, "dendrite-seen.db"))
		if err != nil {
			t.Fatal(err)
		}
		a := &API{d: d, log: zap.NewNop(), stream: stream, seen: seen}
		if a.handed, err = d.Position(ctx, stream); err != nil {
			t.Fatal(err)
		}
		return a
	}
	a := open()
	for _, batch := range [][]item{
		{ev("$1", 1), ev("$2", 2)},
		{ev("$1", 3), ev("$3", 4)},              // $1 published again
		{ev("$4", 5), ev("$3", 6), ev("$4", 7)}, // copies in the same fetch
	} {
		if err := a.submit(ctx, batch); err != nil {
			t.Fatal(err)
		}
	}
	// $5 recorded at 8, then killed before its hand-over landed.
	if err := a.seen.record(ctx, stream, a.handed, []item{ev("$5", 8)}); err != nil {
		t.Fatal(err)
	}
	a.Close(ctx)
	a = open()
	defer a.Close(ctx)
	for _, batch := range [][]item{
		{ev("$2", 9), ev("$5", 10)}, // $2 again after the restart; $5's first hand-over
		{ev("$5", 8)},               // the original $5 redelivered: skipped at its position
	} {
		if err := a.submit(ctx, batch); err != nil {
			t.Fatal(err)
		}
	}
	want := "$1,$2,$3,$4,$5"
	as.wait(t, want)
	as.settle(t, want) // a duplicate would arrive by now
}
