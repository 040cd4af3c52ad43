package dispatcher

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/asdispatch/asdispatch/registry"
	"github.com/asdispatch/asdispatch/txnstore"
)

// hookedStore is a real store whose Append first calls hook.
type hookedStore struct {
	txnstore.Store
	hook func(entries []txnstore.Entry) error
}

func (s *hookedStore) Append(ctx context.Context, entries []txnstore.Entry) ([]int64, error) {
	if err := s.hook(entries); err != nil {
		return nil, err
	}
	return s.Store.Append(ctx, entries)
}

// hookedDispatcher is a dispatcher on SQLite in a temp dir whose appends go
// through hook.
func hookedDispatcher(t *testing.T, state RoomState, cacheSize int, hook func([]txnstore.Entry) error, regs ...string) *Dispatcher {
	t.Helper()
	dir := t.TempDir()
	return startTestDispatcher(t, Config{
		Registry:      registry.NewRegistry(setOf(t, regs...)),
		RoomState:     state,
		RoomCacheSize: cacheSize,
		OpenStore: func(ctx context.Context, opts txnstore.Options) (txnstore.Store, error) {
			st, err := txnstore.Open(ctx, filepath.Join(dir, "d.db"), opts)
			if err != nil {
				return nil, err
			}
			return &hookedStore{Store: st, hook: hook}, nil
		},
	})
}

func carries(entries []txnstore.Entry, id string) bool {
	return slices.ContainsFunc(entries, func(e txnstore.Entry) bool {
		return bytes.Contains(e.Data, []byte(`"event_id":"`+id+`"`))
	})
}

// TestSubmitAllOrNothing: a refused Submit changes nothing, room interest
// included: a join refused with its batch does not make the room's later
// messages go to the joined user's AS.
func TestSubmitAllOrNothing(t *testing.T) {
	join := ev("$join", "!r:hs", "m.room.member", "@irc_bob:hs", sk("@irc_bob:hs"), "join")
	bad := ev("$bad", "!r:hs", "m.room.message", "@alice:hs", nil, "")
	bad.JSON = []byte(`{"not":"closed"`)
	long := ev("$long", "!r:hs", "m.room.message", "@"+strings.Repeat("a", 300)+":hs", nil, "")
	tests := []struct {
		name       string
		batch      []Event
		failAppend bool
		want       error
	}{
		{"invalid JSON after a join", []Event{join, bad}, false, ErrInvalidJSON},
		{"identifier too long after a join", []Event{join, long}, false, ErrInvalidID},
		{"append fails", []Event{join}, true, errDiskFull},
		{"append fails after a join in another room", []Event{ev("$other", "!o:hs", "m.room.message", "@irc_x:hs", nil, ""), join}, true, errDiskFull},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			rec := newRecorder(t)
			d := hookedDispatcher(t, &roomState{}, 0, func(entries []txnstore.Entry) error {
				if tt.failAppend && carries(entries, "$join") {
					return errDiskFull
				}
				return nil
			}, registration("irc", rec.srv.URL, `@irc_.*`, "", "", false))
			ctx := context.Background()
			if err := d.Submit(ctx, tt.batch...); !errors.Is(err, tt.want) {
				t.Fatalf("Submit: %v, want %v", err, tt.want)
			}
			if err := d.Submit(ctx, ev("$msg", "!r:hs", "m.room.message", "@alice:hs", nil, ""),
				ev("$marker", "!plain:hs", "m.room.message", "@irc_marker:hs", nil, "")); err != nil {
				t.Fatal(err)
			}
			if got := waitGot(t, rec, 1); !slices.Equal(got, []string{"$marker"}) {
				t.Errorf("AS got %v, want only the marker", got)
			}
		})
	}
}

var errDiskFull = errors.New("no space left on device")

// TestSubmitBatchSeesItsOwnChanges: each event of a call is decided with the
// room as the call's earlier events leave it.
func TestSubmitBatchSeesItsOwnChanges(t *testing.T) {
	rec := newRecorder(t)
	d := newTestDispatcher(t, &roomState{}, registration("irc", rec.srv.URL, `@irc_.*`, "", "", false))
	if err := d.Submit(context.Background(),
		ev("$join", "!r:hs", "m.room.member", "@irc_bob:hs", sk("@irc_bob:hs"), "join"),
		ev("$msg1", "!r:hs", "m.room.message", "@alice:hs", nil, ""),
		ev("$elsewhere", "!s:hs", "m.room.message", "@alice:hs", nil, ""),
		ev("$leave", "!r:hs", "m.room.member", "@irc_bob:hs", sk("@irc_bob:hs"), "leave"),
		ev("$msg2", "!r:hs", "m.room.message", "@alice:hs", nil, ""),
		ev("$marker", "!plain:hs", "m.room.message", "@irc_marker:hs", nil, ""),
	); err != nil {
		t.Fatal(err)
	}
	want := []string{"$join", "$msg1", "$leave", "$marker"}
	if got := waitGot(t, rec, len(want)); !slices.Equal(got, want) {
		t.Errorf("AS got %v, want %v", got, want)
	}
}

// TestSubmitRoomOrderFollowsCommits: while a join's append is in progress, a
// concurrent Submit of the same room waits for it, so its message is decided
// with the join and committed after it; if the join's append fails, the
// message is decided without it. InvalidateRoom does not wait meanwhile.
func TestSubmitRoomOrderFollowsCommits(t *testing.T) {
	for _, fail := range []bool{false, true} {
		name := map[bool]string{false: "join commits", true: "join fails"}[fail]
		t.Run(name, func(t *testing.T) {
			rec := newRecorder(t)
			reached, release := make(chan struct{}), make(chan struct{})
			d := hookedDispatcher(t, &roomState{}, 0, func(entries []txnstore.Entry) error {
				if carries(entries, "$join") {
					close(reached)
					<-release
					if fail {
						return errDiskFull
					}
				}
				return nil
			}, registration("irc", rec.srv.URL, `@irc_.*`, "", "", false))
			ctx := context.Background()
			joinDone, msgDone := make(chan error, 1), make(chan error, 1)
			go func() {
				joinDone <- d.Submit(ctx, ev("$join", "!r:hs", "m.room.member", "@irc_bob:hs", sk("@irc_bob:hs"), "join"))
			}()
			<-reached
			go func() { msgDone <- d.Submit(ctx, ev("$msg", "!r:hs", "m.room.message", "@alice:hs", nil, "")) }()
			select {
			case err := <-msgDone:
				t.Fatalf("the message's Submit returned (%v) before the join's append ended", err)
			case <-time.After(100 * time.Millisecond):
			}
			invalidated := make(chan struct{})
			go func() {
				d.Interested(ctx, Event{ID: "$x", RoomID: "!unrelated:hs"}) // other rooms are not held
				close(invalidated)
			}()
			select {
			case <-invalidated:
			case <-time.After(5 * time.Second):
				t.Fatal("a call on another room waited for the held one")
			}
			close(release)
			if err := <-joinDone; (err != nil) != fail {
				t.Fatalf("join: %v", err)
			}
			if err := <-msgDone; err != nil {
				t.Fatal(err)
			}
			if err := d.Submit(ctx, ev("$marker", "!plain:hs", "m.room.message", "@irc_marker:hs", nil, "")); err != nil {
				t.Fatal(err)
			}
			want := []string{"$join", "$msg", "$marker"}
			if fail {
				want = []string{"$marker"}
			}
			if got := waitGot(t, rec, len(want)); !slices.Equal(got, want) {
				t.Errorf("AS got %v, want %v", got, want)
			}
		})
	}
}

// TestInvalidateRoomDuringSubmit: InvalidateRoom does not wait for a Submit
// holding the room, and that Submit does not put back the interest it read
// before: the next event of the room sees the directory's new alias.
func TestInvalidateRoomDuringSubmit(t *testing.T) {
	irc, tg := newRecorder(t), newRecorder(t)
	state := &roomState{aliases: map[string][]string{}}
	reached, release := make(chan struct{}), make(chan struct{})
	d := hookedDispatcher(t, state, 0, func(entries []txnstore.Entry) error {
		if carries(entries, "$join") {
			close(reached)
			<-release
		}
		return nil
	}, registration("irc", irc.srv.URL, `@irc_.*`, `#irc_.*`, "", false),
		registration("tg", tg.srv.URL, `@tg_.*`, "", "", false))
	ctx := context.Background()
	done := make(chan error, 1)
	go func() {
		done <- d.Submit(ctx, ev("$join", "!r:hs", "m.room.member", "@tg_bob:hs", sk("@tg_bob:hs"), "join"))
	}()
	<-reached
	// The homeserver records the join and adds an alias to the directory.
	state.mu.Lock()
	state.aliases["!r:hs"] = []string{"#irc_chan:hs"}
	state.members = map[string][]string{"!r:hs": {"@tg_bob:hs"}}
	state.mu.Unlock()
	invalidated := make(chan struct{})
	go func() { d.InvalidateRoom("!r:hs"); close(invalidated) }()
	select {
	case <-invalidated:
	case <-time.After(5 * time.Second):
		t.Fatal("InvalidateRoom waited for a Submit")
	}
	close(release)
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if err := d.Submit(ctx, ev("$msg", "!r:hs", "m.room.message", "@alice:hs", nil, "")); err != nil {
		t.Fatal(err)
	}
	if got := waitGot(t, irc, 1); !slices.Equal(got, []string{"$msg"}) {
		t.Errorf("irc got %v, want [$msg]: the Submit put back the room it read before the invalidation", got)
	}
	if got := waitGot(t, tg, 2); !slices.Equal(got, []string{"$join", "$msg"}) {
		t.Errorf("tg got %v", got)
	}
}

// TestAliasInterestFromDirectoryOnly: aliases count only as the room
// directory has them (RoomState, InvalidateRoom), never from
// m.room.canonical_alias content, so eviction from a one-room cache changes
// nothing.
func TestAliasInterestFromDirectoryOnly(t *testing.T) {
	canonical := func(id, alias string) Event {
		e := ev(id, "!r:hs", "m.room.canonical_alias", "@alice:hs", sk(""), "")
		e.JSON = []byte(`{"event_id":"` + id + `","room_id":"!r:hs","type":"m.room.canonical_alias","sender":"@alice:hs","state_key":"","content":{"alias":"` + alias + `","alt_aliases":["` + alias + `"]}}`)
		return e
	}
	for _, size := range []int{1, 100} {
		t.Run(map[int]string{1: "one-room cache", 100: "large cache"}[size], func(t *testing.T) {
			rec := newRecorder(t)
			state := &roomState{aliases: map[string][]string{}}
			d := hookedDispatcher(t, state, size, func([]txnstore.Entry) error { return nil },
				registration("irc", rec.srv.URL, `@irc_.*`, `#irc_.*`, "", false))
			ctx := context.Background()
			setAliases := func(a ...string) {
				state.mu.Lock()
				state.aliases["!r:hs"] = a
				state.mu.Unlock()
				d.InvalidateRoom("!r:hs")
			}
			steps := []func() error{
				// Named by the event, absent from the directory: no interest.
				func() error { return d.Submit(ctx, canonical("$c1", "#irc_chan:hs")) },
				func() error { return d.Submit(ctx, ev("$m1", "!r:hs", "m.room.message", "@alice:hs", nil, "")) },
				func() error { return d.Submit(ctx, ev("$o1", "!other:hs", "m.room.message", "@alice:hs", nil, "")) },
				func() error { return d.Submit(ctx, ev("$m2", "!r:hs", "m.room.message", "@alice:hs", nil, "")) },
				// In the directory: interest, whatever the event says.
				func() error { setAliases("#irc_chan:hs"); return nil },
				func() error { return d.Submit(ctx, canonical("$c2", "#elsewhere:hs")) },
				func() error { return d.Submit(ctx, ev("$m3", "!r:hs", "m.room.message", "@alice:hs", nil, "")) },
				func() error { return d.Submit(ctx, ev("$o2", "!other:hs", "m.room.message", "@alice:hs", nil, "")) },
				func() error { return d.Submit(ctx, ev("$m4", "!r:hs", "m.room.message", "@alice:hs", nil, "")) },
				// Gone from the directory: no interest.
				func() error { setAliases(); return nil },
				func() error { return d.Submit(ctx, canonical("$c3", "#irc_chan:hs")) },
				func() error { return d.Submit(ctx, ev("$m5", "!r:hs", "m.room.message", "@alice:hs", nil, "")) },
				func() error {
					return d.Submit(ctx, ev("$marker", "!plain:hs", "m.room.message", "@irc_marker:hs", nil, ""))
				},
			}
			for i, step := range steps {
				if err := step(); err != nil {
					t.Fatalf("step %d: %v", i, err)
				}
			}
			want := []string{"$c2", "$m3", "$m4", "$marker"}
			if got := waitGot(t, rec, len(want)); !slices.Equal(got, want) {
				t.Errorf("AS got %v, want %v", got, want)
			}
		})
	}
}

// TestRoomLocksUnderContention: Submits of several rooms each, Interested,
// ephemeral events and InvalidateRoom on a few rooms at once, some with a
// context that ends while they wait, neither deadlock nor leave a room lock
// behind.
func TestRoomLocksUnderContention(t *testing.T) {
	rec := newRecorder(t)
	d := newTestDispatcher(t, &roomState{}, registration("irc", rec.srv.URL, `@irc_.*`, "", "", true))
	rooms := []string{"!a:hs", "!b:hs", "!c:hs"}
	var wg sync.WaitGroup
	for w := 0; w < 6; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; i < 60; i++ {
				ctx, cancel := context.WithTimeout(context.Background(), time.Duration(i%4)*time.Millisecond)
				r1, r2 := rooms[(w+i)%3], rooms[(w+2*i+1)%3]
				user := fmt.Sprintf("@irc_%d:hs", w)
				switch i % 4 {
				case 0:
					d.Submit(ctx, ev(fmt.Sprintf("$%d-%d", w, i), r1, "m.room.member", user, sk(user), "join"),
						ev(fmt.Sprintf("$%d-%d-m", w, i), r2, "m.room.message", "@alice:hs", nil, ""))
				case 1:
					d.Interested(ctx, ev("$x", r2, "m.room.member", user, sk(user), "leave"))
				case 2:
					d.SubmitEphemeral(ctx, Ephemeral{Type: "m.presence", Users: []string{"@alice:hs"}, Rooms: rooms, JSON: []byte(`{"type":"m.presence"}`)})
				case 3:
					d.InvalidateRoom(r1)
				}
				cancel()
			}
		}()
	}
	done := make(chan struct{})
	go func() { wg.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(60 * time.Second):
		t.Fatal("deadlock")
	}
	d.locks.mu.Lock()
	defer d.locks.mu.Unlock()
	if len(d.locks.m) != 0 {
		t.Errorf("%d room locks left behind", len(d.locks.m))
	}
}

// TestLegacyTokenNotInStatus: a legacy AS's hs_token, which goes in
// ?access_token=, shows in no form in LastError when the AS cannot be
// reached or answers with an error quoting the request.
func TestLegacyTokenNotInStatus(t *testing.T) {
	const token = "Zm9v+YmFy/YmF6== ü%"
	echo := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.WriteHeader(500)
		fmt.Fprintf(w, "%s %s", r.RequestURI, r.URL.Query().Get("access_token"))
	}))
	defer echo.Close()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	refused := "http://" + ln.Addr().String()
	ln.Close()
	for name, asURL := range map[string]string{"refused": refused, "error echoing the request": echo.URL} {
		t.Run(name, func(t *testing.T) {
			reg := fmt.Sprintf("id: old\nurl: %s\nas_token: as-old\nhs_token: %q\nsender_localpart: oldbot\nasdispatch.legacy: true\nnamespaces:\n  users: [{exclusive: true, regex: \"@old_.*\"}]\n", asURL, token)
			d := newTestDispatcher(t, &roomState{}, reg)
			if err := d.Submit(context.Background(), ev("$1", "!r:hs", "m.room.message", "@old_x:hs", nil, "")); err != nil {
				t.Fatal(err)
			}
			deadline := time.Now().Add(10 * time.Second)
			for {
				sts, err := d.Statuses(context.Background())
				if err != nil {
					t.Fatal(err)
				}
				if len(sts) == 1 && sts[0].LastError != "" {
					for _, f := range []string{token, url.QueryEscape(token), url.PathEscape(token), strings.ToLower(url.QueryEscape(token))} {
						if strings.Contains(sts[0].LastError, f) {
							t.Fatalf("LastError shows the token as %q: %s", f, sts[0].LastError)
						}
					}
					return
				}
				if time.Now().After(deadline) {
					t.Fatalf("no LastError: %+v", sts)
				}
				time.Sleep(10 * time.Millisecond)
			}
		})
	}
}
