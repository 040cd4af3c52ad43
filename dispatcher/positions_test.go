package dispatcher

import (
	"context"
	"errors"
	"fmt"
	"path/filepath"
	"slices"
	"sync"
	"testing"
	"time"

	"go.uber.org/zap/zaptest"

	"github.com/asdispatch/asdispatch/internal/storehook"
	"github.com/asdispatch/asdispatch/queue"
	"github.com/asdispatch/asdispatch/registry"
	"github.com/asdispatch/asdispatch/txnstore"
	"github.com/asdispatch/asdispatch/txnstore/pgtest"
)

// storeBackend opens the dispatcher's store at a place made once per test.
type storeBackend struct {
	name string
	open func(t *testing.T) func(ctx context.Context, opts txnstore.Options) (txnstore.Store, error)
}

var storeBackends = []storeBackend{
	{"sqlite", func(t *testing.T) func(context.Context, txnstore.Options) (txnstore.Store, error) {
		path := filepath.Join(t.TempDir(), "d.db")
		return func(ctx context.Context, opts txnstore.Options) (txnstore.Store, error) {
			return txnstore.Open(ctx, path, opts)
		}
	}},
	{"postgres", func(t *testing.T) func(context.Context, txnstore.Options) (txnstore.Store, error) {
		dsn := pgtest.Schema(t)
		return func(ctx context.Context, opts txnstore.Options) (txnstore.Store, error) {
			return txnstore.OpenPostgres(ctx, dsn, opts)
		}
	}},
}

func forEachStore(t *testing.T, test func(t *testing.T, open func(context.Context, txnstore.Options) (txnstore.Store, error))) {
	for _, be := range storeBackends {
		t.Run(be.name, func(t *testing.T) { test(t, be.open(t)) })
	}
}

// openWith starts a dispatcher on open's store, its commits judged by
// fault (nil: none); the caller closes it.
func openWith(t *testing.T, open func(context.Context, txnstore.Options) (txnstore.Store, error), fault func([]storehook.Op) storehook.Fault, regs ...string) *Dispatcher {
	t.Helper()
	d, err := New(context.Background(), Config{
		Registry: registry.NewRegistry(setOf(t, regs...)),
		OpenStore: func(ctx context.Context, opts txnstore.Options) (txnstore.Store, error) {
			if fault != nil {
				ctx = storehook.With(ctx, &storehook.Hooks{Commit: fault})
			}
			return open(ctx, opts)
		},
		Logger: zaptest.NewLogger(t),
		Queue:  queue.Options{RetryInitial: 10 * time.Millisecond, RetryMax: 50 * time.Millisecond},
	})
	if err != nil {
		t.Fatal(err)
	}
	return d
}

func closeNow(t *testing.T, d *Dispatcher) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := d.Close(ctx); err != nil {
		t.Error(err)
	}
}

// msgAt is a message of @irc_x (the "irc" AS's) at pos of the events stream.
func msgAt(pos int64) Event {
	e := ev(fmt.Sprintf("$%d", pos), "!r:hs", "m.room.message", "@irc_x:hs", nil, "")
	e.At = Position{Stream: "events", Pos: pos}
	return e
}

func ids(from, to int64) []string {
	var out []string
	for p := from; p <= to; p++ {
		out = append(out, fmt.Sprintf("$%d", p))
	}
	return out
}

// TestReplayAfterRestart: a homeserver hands events over with positions,
// restarts, and replays its log from an older point than Position: the AS
// gets every event once, in order; events no AS wants move the position
// too; ephemeral and to-device streams keep positions of their own.
func TestReplayAfterRestart(t *testing.T) {
	forEachStore(t, func(t *testing.T, open func(context.Context, txnstore.Options) (txnstore.Store, error)) {
		rec := newRecorder(t)
		reg := registration("irc", rec.srv.URL, `@irc_.*`, "", "", true)
		ctx := context.Background()
		d := openWith(t, open, nil, reg)
		if err := d.Submit(ctx, msgAt(1), msgAt(2), msgAt(3)); err != nil {
			t.Fatal(err)
		}
		nobody := ev("$nobody", "!other:hs", "m.room.message", "@alice:hs", nil, "")
		nobody.At = Position{Stream: "events", Pos: 4}
		if err := d.Submit(ctx, nobody); err != nil {
			t.Fatal(err)
		}
		if p, err := d.Position(ctx, "events"); err != nil || p != 4 {
			t.Fatalf("Position = %d, %v; want 4 (an event no AS wants moves it)", p, err)
		}
		typing := Ephemeral{Type: "m.typing", RoomID: "!r:hs", Users: []string{"@irc_x:hs"}, JSON: []byte(`{"type":"m.typing"}`),
			At: Position{Stream: "typing", Pos: 7}}
		key := ToDevice{Type: "m.room_key", ToUser: "@irc_x:hs", ToDevice: "D", JSON: []byte(`{"type":"m.room_key"}`),
			At: Position{Stream: "to_device", Pos: 3}}
		if err := d.SubmitEphemeral(ctx, typing); err != nil {
			t.Fatal(err)
		}
		if err := d.SubmitToDevice(ctx, key, key); err != nil { // one send, one position
			t.Fatal(err)
		}
		closeNow(t, d)

		d = openWith(t, open, nil, reg)
		defer closeNow(t, d)
		// Replay from before the position, overlapping it.
		if err := d.Submit(ctx, msgAt(2), msgAt(3), nobody, msgAt(5), msgAt(6)); err != nil {
			t.Fatal(err)
		}
		if err := d.SubmitEphemeral(ctx, typing); err != nil {
			t.Fatal(err)
		}
		if err := d.SubmitToDevice(ctx, key, key); err != nil {
			t.Fatal(err)
		}
		if err := d.Submit(ctx, msgAt(7)); err != nil {
			t.Fatal(err)
		}
		want := ids(1, 3)
		want = append(want, ids(5, 7)...)
		if got := waitGot(t, rec, len(want)); !slices.Equal(got, want) {
			t.Errorf("AS got %v, want %v", got, want)
		}
		_, eph, todv := rec.got()
		if !slices.Equal(eph, []string{"m.typing"}) || !slices.Equal(todv, []string{"m.room_key", "m.room_key"}) {
			t.Errorf("AS got ephemeral %v, to-device %v; want each once", eph, todv)
		}
		for stream, want := range map[string]int64{"events": 7, "typing": 7, "to_device": 3, "receipts": 0} {
			if p, err := d.Position(ctx, stream); err != nil || p != want {
				t.Errorf("Position(%s) = %d, %v; want %d", stream, p, err, want)
			}
		}
	})
}

// TestReplayDoesNotReapplyMembership: a replayed join, already handed over,
// does not make a ghost who left count for the room again.
func TestReplayDoesNotReapplyMembership(t *testing.T) {
	rec := newRecorder(t)
	d := newTestDispatcher(t, &roomState{}, registration("irc", rec.srv.URL, `@irc_.*`, "", "", false))
	ctx := context.Background()
	at := func(e Event, pos int64) Event { e.At = Position{Stream: "events", Pos: pos}; return e }
	join := at(ev("$join", "!r:hs", "m.room.member", "@irc_bob:hs", sk("@irc_bob:hs"), "join"), 1)
	leave := at(ev("$leave", "!r:hs", "m.room.member", "@irc_bob:hs", sk("@irc_bob:hs"), "leave"), 2)
	if err := d.Submit(ctx, join, leave); err != nil {
		t.Fatal(err)
	}
	if err := d.Submit(ctx, join, at(ev("$msg", "!r:hs", "m.room.message", "@alice:hs", nil, ""), 3),
		at(ev("$marker", "!plain:hs", "m.room.message", "@irc_marker:hs", nil, ""), 4)); err != nil {
		t.Fatal(err)
	}
	if got := waitGot(t, rec, 3); !slices.Equal(got, []string{"$join", "$leave", "$marker"}) {
		t.Errorf("AS got %v; want the join, the leave and the marker, not the message after the replayed join", got)
	}
}

// TestHandOverAfterFailedCommits: a Submit whose commit failed is repeated
// and queues its events; one whose commit landed but failed (a lost COMMIT
// answer) is repeated and queues nothing again: the AS gets each event once.
func TestHandOverAfterFailedCommits(t *testing.T) {
	forEachStore(t, func(t *testing.T, open func(context.Context, txnstore.Options) (txnstore.Store, error)) {
		rec := newRecorder(t)
		var mu sync.Mutex
		next := storehook.None
		d := openWith(t, open, func(ops []storehook.Op) storehook.Fault {
			mu.Lock()
			defer mu.Unlock()
			if !slices.Contains(ops, storehook.Append) {
				return storehook.None
			}
			f := next
			next = storehook.None
			return f
		}, registration("irc", rec.srv.URL, `@irc_.*`, "", "", false))
		defer closeNow(t, d)
		ctx := context.Background()
		arm := func(f storehook.Fault) { mu.Lock(); next = f; mu.Unlock() }
		arm(storehook.Fail)
		if err := d.Submit(ctx, msgAt(1), msgAt(2)); !errors.Is(err, storehook.ErrInjected) {
			t.Fatalf("Submit with a failing commit: %v", err)
		}
		if err := d.Submit(ctx, msgAt(1), msgAt(2)); err != nil {
			t.Fatal(err)
		}
		arm(storehook.Ambiguous)
		if err := d.Submit(ctx, msgAt(3), msgAt(4)); !errors.Is(err, storehook.ErrInjected) {
			t.Fatalf("Submit with an ambiguous commit: %v", err)
		}
		if err := d.Submit(ctx, msgAt(3), msgAt(4)); err != nil {
			t.Fatal(err)
		}
		if err := d.Submit(ctx, msgAt(5)); err != nil {
			t.Fatal(err)
		}
		if got := waitGot(t, rec, 5); !slices.Equal(got, ids(1, 5)) {
			t.Errorf("AS got %v, want %v", got, ids(1, 5))
		}
	})
}

// TestConcurrentCallsOnOneStream: the homeserver broke the rule and made two
// calls on one stream at once, the lower position committing second. The
// calls take turns; the overtaken event is queued all the same (not lost),
// and the position stays at the highest.
func TestConcurrentCallsOnOneStream(t *testing.T) {
	rec := newRecorder(t)
	inCommit, release := make(chan struct{}), make(chan struct{})
	d := hookedDispatcher(t, &roomState{}, 0, func(entries []txnstore.Entry) error {
		if carries(entries, "$10") {
			close(inCommit)
			<-release
		}
		return nil
	}, registration("irc", rec.srv.URL, `@irc_.*`, "", "", false))
	ctx := context.Background()
	ten := msgAt(10)
	ten.RoomID = "!ten:hs" // another room: only the stream makes them take turns
	errs := make(chan error, 2)
	go func() { errs <- d.Submit(ctx, ten) }()
	<-inCommit
	go func() { errs <- d.Submit(ctx, msgAt(9)) }()
	// Let the second call find the stream at 0 and wait for it; if it were
	// late, it would find 10 and skip 9 as a replay, and the test fail.
	time.Sleep(100 * time.Millisecond)
	close(release)
	for range 2 {
		if err := <-errs; err != nil {
			t.Fatal(err)
		}
	}
	if got := waitGot(t, rec, 2); !slices.Equal(got, []string{"$10", "$9"}) {
		t.Errorf("AS got %v, want $10 then $9", got)
	}
	if p, err := d.Position(ctx, "events"); err != nil || p != 10 {
		t.Errorf("Position = %d, %v; want 10", p, err)
	}
	// A later replay of both is skipped.
	if err := d.Submit(ctx, msgAt(9), ten, msgAt(11)); err != nil {
		t.Fatal(err)
	}
	if got := waitGot(t, rec, 3); !slices.Equal(got, []string{"$10", "$9", "$11"}) {
		t.Errorf("AS got %v, want $10 $9 $11", got)
	}
}

// TestInvalidPositions: a call whose positions cannot be right queues nothing.
func TestInvalidPositions(t *testing.T) {
	rec := newRecorder(t)
	d := newTestDispatcher(t, &roomState{}, registration("irc", rec.srv.URL, `@irc_.*`, "", "", true))
	ctx := context.Background()
	noStream := msgAt(1)
	noStream.At.Stream = ""
	for name, batch := range map[string][]Event{
		"going down":       {msgAt(5), msgAt(4)},
		"zero":             {msgAt(0)},
		"negative":         {msgAt(-3)},
		"pos, no stream":   {msgAt(1), noStream},
		"down after other": {msgAt(5), {ID: "$e", RoomID: "!r:hs", JSON: []byte(`{}`), At: Position{"typing", 9}}, msgAt(4)},
	} {
		if err := d.Submit(ctx, batch...); !errors.Is(err, ErrInvalidPosition) {
			t.Errorf("%s: %v, want ErrInvalidPosition", name, err)
		}
	}
	bad := ToDevice{Type: "m.x", ToUser: "@irc_x:hs", JSON: []byte(`{}`), At: Position{"to_device", 0}}
	if err := d.SubmitToDevice(ctx, bad); !errors.Is(err, ErrInvalidPosition) {
		t.Errorf("to-device at 0: %v, want ErrInvalidPosition", err)
	}
	if err := d.Submit(ctx, msgAt(1)); err != nil {
		t.Fatal(err)
	}
	if got := waitGot(t, rec, 1); !slices.Equal(got, []string{"$1"}) {
		t.Errorf("AS got %v, want only $1", got)
	}
}
