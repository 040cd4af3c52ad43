package dispatcher

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"go.uber.org/zap/zaptest"

	"github.com/asdispatch/asdispatch/internal/storehook"
	"github.com/asdispatch/asdispatch/queue"
	"github.com/asdispatch/asdispatch/registry"
	"github.com/asdispatch/asdispatch/txnstore"
)

// roomState is a RoomState over fixed maps.
type roomState struct {
	members map[string][]string
	aliases map[string][]string
	calls   int
	mu      sync.Mutex
}

func (r *roomState) JoinedLocalMembers(_ context.Context, roomID string) ([]string, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.calls++
	return r.members[roomID], nil
}

func (r *roomState) LocalAliases(_ context.Context, roomID string) ([]string, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.aliases[roomID], nil
}

func (r *roomState) IsLocalUser(userID string) bool { return strings.HasSuffix(userID, ":hs") }

// recorder is an AS on 127.0.0.1 that records the events it accepts.
type recorder struct {
	srv  *httptest.Server
	mu   sync.Mutex
	ids  []string
	eph  []string
	todv []string
	seen map[string]bool
}

func newRecorder(t *testing.T) *recorder {
	r := &recorder{seen: map[string]bool{}}
	r.srv = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, req *http.Request) {
		body, _ := io.ReadAll(req.Body)
		var txn struct {
			Events []struct {
				EventID string `json:"event_id"`
			} `json:"events"`
			Ephemeral []struct{ Type string } `json:"ephemeral"`
			Unstable  []struct{ Type string } `json:"de.sorunome.msc2409.ephemeral"`
			ToDevice  []struct{ Type string } `json:"de.sorunome.msc2409.to_device"`
		}
		if err := json.Unmarshal(body, &txn); err != nil {
			t.Errorf("bad body %s: %v", body, err)
		}
		r.mu.Lock()
		defer r.mu.Unlock()
		id := req.URL.Path
		if !r.seen[id] {
			r.seen[id] = true
			for _, e := range txn.Events {
				r.ids = append(r.ids, e.EventID)
			}
			for _, e := range append(txn.Ephemeral, txn.Unstable...) {
				r.eph = append(r.eph, e.Type)
			}
			for _, e := range txn.ToDevice {
				r.todv = append(r.todv, e.Type)
			}
		}
		w.Write([]byte("{}"))
	}))
	t.Cleanup(r.srv.Close)
	return r
}

func (r *recorder) got() (ids, eph, todv []string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	return slices.Clone(r.ids), slices.Clone(r.eph), slices.Clone(r.todv)
}

func registration(id, url, users, aliases, rooms string, ephemeral bool) string {
	ns := func(re string) string {
		if re == "" {
			return "[]"
		}
		return fmt.Sprintf("[{exclusive: true, regex: %q}]", re)
	}
	return fmt.Sprintf(`id: %s
url: %s
as_token: as-%s
hs_token: hs-%s
sender_localpart: %sbot
receive_ephemeral: %v
namespaces:
  users: %s
  aliases: %s
  rooms: %s
`, id, url, id, id, id, ephemeral, ns(users), ns(aliases), ns(rooms))
}

func newTestDispatcher(t *testing.T, state RoomState, regs ...string) *Dispatcher {
	t.Helper()
	return startTestDispatcher(t, Config{
		Registry:  registry.NewRegistry(setOf(t, regs...)),
		DataDir:   t.TempDir(),
		RoomState: state,
	})
}

// startTestDispatcher starts a dispatcher with cfg, the test's logger and
// quick retries, and closes it when the test ends.
func startTestDispatcher(t *testing.T, cfg Config) *Dispatcher {
	t.Helper()
	cfg.Logger = zaptest.NewLogger(t)
	cfg.Queue = queue.Options{RetryInitial: 10 * time.Millisecond, RetryMax: 50 * time.Millisecond}
	d, err := New(context.Background(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { closeNow(t, d) })
	return d
}

func ev(id, room, typ, sender string, stateKey *string, membership string) Event {
	m := map[string]any{"event_id": id, "room_id": room, "type": typ, "sender": sender, "content": map[string]any{}}
	if stateKey != nil {
		m["state_key"] = *stateKey
	}
	if membership != "" {
		m["content"] = map[string]any{"membership": membership}
	}
	js, _ := json.Marshal(m)
	return Event{ID: id, RoomID: room, Type: typ, Sender: sender, StateKey: stateKey, Membership: membership, JSON: js}
}

func sk(s string) *string { return &s }

func waitGot(t *testing.T, r *recorder, want int) []string {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		ids, _, _ := r.got()
		if len(ids) >= want {
			return ids
		}
		if time.Now().After(deadline) {
			t.Fatalf("got %v, want %d events", ids, want)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// TestInterestRules checks each rule by submitting one event that should
// reach the "irc" AS (or not) followed by a marker that always does.
func TestInterestRules(t *testing.T) {
	state := &roomState{
		members: map[string][]string{
			"!withghost:hs":  {"@alice:hs", "@irc_bob:hs"},
			"!remoteonly:hs": {"@alice:hs"},
		},
		aliases: map[string][]string{"!aliased:hs": {"#irc_chan:hs"}},
	}
	tests := []struct {
		name string
		ev   Event
		want bool
	}{
		{"sender in users namespace", ev("$sender", "!plain:hs", "m.room.message", "@irc_bob:hs", nil, ""), true},
		{"sender_localpart user", ev("$bot", "!plain:hs", "m.room.message", "@ircbot:hs", nil, ""), true},
		{"member state_key in namespace", ev("$invite", "!plain:hs", "m.room.member", "@alice:hs", sk("@irc_carol:hs"), "invite"), true},
		{"state_key of a non-member event ignored", ev("$state", "!plain:hs", "m.room.topic", "@alice:hs", sk("@irc_carol:hs"), ""), false},
		{"room id in rooms namespace", ev("$room", "!ircroom_1:hs", "m.room.message", "@alice:hs", nil, ""), true},
		{"room alias in aliases namespace", ev("$alias", "!aliased:hs", "m.room.message", "@alice:hs", nil, ""), true},
		{"local member in users namespace", ev("$member", "!withghost:hs", "m.room.message", "@alice:hs", nil, ""), true},
		{"remote member ignored", ev("$remote", "!remoteonly:hs", "m.room.message", "@alice:hs", nil, ""), false},
		{"unrelated", ev("$none", "!plain:hs", "m.room.message", "@alice:hs", nil, ""), false},
		{"prefix is start-anchored", ev("$anchored", "!plain:hs", "m.room.message", "@x_irc_bob:hs", nil, ""), false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			rec := newRecorder(t)
			d := newTestDispatcher(t, state, registration("irc", rec.srv.URL, `@irc_.*`, `#irc_.*`, `!ircroom_.*`, false))
			ctx := context.Background()
			if err := d.Submit(ctx, tt.ev, ev("$marker", "!plain:hs", "m.room.message", "@irc_marker:hs", nil, "")); err != nil {
				t.Fatal(err)
			}
			want := []string{"$marker"}
			if tt.want {
				want = []string{tt.ev.ID, "$marker"}
			}
			if got := waitGot(t, rec, len(want)); !slices.Equal(got, want) {
				t.Errorf("AS got %v, want %v", got, want)
			}
		})
	}
}

func TestMembershipChangesInterest(t *testing.T) {
	rec := newRecorder(t)
	state := &roomState{}
	d := newTestDispatcher(t, state, registration("irc", rec.srv.URL, `@irc_.*`, "", "", false))
	ctx := context.Background()
	steps := []Event{
		ev("$1", "!r:hs", "m.room.message", "@alice:hs", nil, ""),                        // no
		ev("$2", "!r:hs", "m.room.member", "@irc_bob:hs", sk("@irc_bob:hs"), "join"),     // yes (state_key)
		ev("$3", "!r:hs", "m.room.message", "@alice:hs", nil, ""),                        // yes (member)
		ev("$4", "!r:hs", "m.room.member", "@irc_bob:hs", sk("@irc_bob:hs"), "leave"),    // yes (state_key)
		ev("$5", "!r:hs", "m.room.message", "@alice:hs", nil, ""),                        // no
		ev("$6", "!r:hs", "m.room.member", "@irc_x:remote", sk("@irc_x:remote"), "join"), // yes (state_key)
		ev("$7", "!r:hs", "m.room.message", "@alice:hs", nil, ""),                        // no: remote member
		ev("$8", "!r:hs", "m.room.message", "@irc_marker:hs", nil, ""),                   // yes
	}
	for _, e := range steps {
		if err := d.Submit(ctx, e); err != nil {
			t.Fatal(err)
		}
	}
	want := []string{"$2", "$3", "$4", "$6", "$8"}
	if got := waitGot(t, rec, len(want)); !slices.Equal(got, want) {
		t.Errorf("got %v, want %v", got, want)
	}
	if state.calls != 1 {
		t.Errorf("RoomState asked %d times for one room, want once", state.calls)
	}
}

func TestOrderAcrossRoomsAndConcurrentSubmits(t *testing.T) {
	rec := newRecorder(t)
	d := newTestDispatcher(t, &roomState{}, registration("irc", rec.srv.URL, `@irc_.*`, "", "", false))
	ctx := context.Background()
	const writers, per = 4, 60
	var wg sync.WaitGroup
	for w := 0; w < writers; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; i < per; i++ {
				e := ev(fmt.Sprintf("$w%d-%03d", w, i), fmt.Sprintf("!room%d:hs", i%5), "m.room.message", "@irc_x:hs", nil, "")
				if err := d.Submit(ctx, e); err != nil {
					t.Error(err)
					return
				}
			}
		}()
	}
	wg.Wait()
	got := waitGot(t, rec, writers*per)
	// Each writer's events arrive in its submission order.
	last := map[string]string{}
	for _, id := range got {
		w := id[:3]
		if id <= last[w] {
			t.Fatalf("%s arrived after %s", id, last[w])
		}
		last[w] = id
	}
	if len(got) != writers*per {
		t.Errorf("got %d events, want %d", len(got), writers*per)
	}
}

func TestEphemeralAndToDeviceOnlyForOptedIn(t *testing.T) {
	yes := newRecorder(t)
	no := newRecorder(t)
	d := newTestDispatcher(t, &roomState{members: map[string][]string{"!r:hs": {"@irc_bob:hs", "@tg_bob:hs"}}},
		registration("irc", yes.srv.URL, `@irc_.*`, "", "", true),
		registration("tg", no.srv.URL, `@tg_.*`, "", "", false))
	ctx := context.Background()
	js := func(typ string) []byte { return []byte(fmt.Sprintf(`{"type":%q}`, typ)) }
	if err := d.SubmitEphemeral(ctx,
		Ephemeral{Type: "m.typing", RoomID: "!r:hs", Users: []string{"@alice:hs"}, JSON: js("m.typing")},
		Ephemeral{Type: "m.receipt.private", RoomID: "!r:hs", Users: []string{"@alice:hs"}, Private: true, JSON: js("m.receipt.private")},
		Ephemeral{Type: "m.receipt", RoomID: "!r:hs", Users: []string{"@irc_bob:hs"}, Private: true, JSON: js("m.receipt.own")},
		Ephemeral{Type: "m.presence", Users: []string{"@alice:hs"}, Rooms: []string{"!r:hs"}, JSON: js("m.presence")},
	); err != nil {
		t.Fatal(err)
	}
	if err := d.SubmitToDevice(ctx,
		ToDevice{Type: "m.room_key", ToUser: "@irc_bob:hs", ToDevice: "D", JSON: js("m.room_key")},
		ToDevice{Type: "m.other", ToUser: "@alice:hs", ToDevice: "D", JSON: js("m.other")},
	); err != nil {
		t.Fatal(err)
	}
	// A marker PDU for both, so we know everything before it was delivered.
	if err := d.Submit(ctx, ev("$m", "!r:hs", "m.room.message", "@alice:hs", nil, "")); err != nil {
		t.Fatal(err)
	}
	waitGot(t, yes, 1)
	waitGot(t, no, 1)
	_, eph, todv := yes.got()
	if want := []string{"m.typing", "m.receipt.own", "m.presence"}; !slices.Equal(eph, want) {
		t.Errorf("opted-in AS got ephemeral %v, want %v", eph, want)
	}
	if want := []string{"m.room_key"}; !slices.Equal(todv, want) {
		t.Errorf("opted-in AS got to-device %v, want %v", todv, want)
	}
	if _, eph, todv := no.got(); len(eph)+len(todv) > 0 {
		t.Errorf("AS without receive_ephemeral got %v %v", eph, todv)
	}
}

func TestNullURLGetsNothing(t *testing.T) {
	d := newTestDispatcher(t, &roomState{}, registration("nourl", "null", `@irc_.*`, "", "", false))
	ctx := context.Background()
	if err := d.Submit(ctx, ev("$1", "!r:hs", "m.room.message", "@irc_x:hs", nil, "")); err != nil {
		t.Fatal(err)
	}
	sts, err := d.Statuses(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(sts) != 1 || sts[0].PendingItems != 0 {
		t.Errorf("statuses = %+v, want one AS with nothing pending", sts)
	}
}

func decodeJSON(r *http.Request, v any) {
	body, _ := io.ReadAll(r.Body)
	json.Unmarshal(body, v)
}

func TestHostileInput(t *testing.T) {
	rec := newRecorder(t)
	d := newTestDispatcher(t, &roomState{}, registration("irc", rec.srv.URL, `@irc_.*`, "", "", true))
	ctx := context.Background()
	deep := strings.Repeat(`{"a":`, 5000) + "1" + strings.Repeat("}", 5000)
	huge := `{"event_id":"$huge","content":{"body":"` + strings.Repeat("x", 2<<20) + `"}}`
	tests := []struct {
		name    string
		ev      Event
		wantErr error
	}{
		{"invalid JSON", Event{ID: "$bad", RoomID: "!r:hs", Sender: "@irc_x:hs", JSON: []byte(`{"broken":`)}, ErrInvalidJSON},
		{"not an object", Event{ID: "$arr", RoomID: "!r:hs", Sender: "@irc_x:hs", JSON: []byte(`[1,2]`)}, ErrInvalidJSON},
		{"empty", Event{ID: "$empty", RoomID: "!r:hs", Sender: "@irc_x:hs"}, ErrInvalidJSON},
		{"invalid UTF-8", Event{ID: "$utf", RoomID: "!r:hs", Sender: "@irc_x:hs", JSON: []byte("{\"event_id\":\"$utf\",\"b\":\"\xff\"}")}, ErrInvalidJSON},
		{"deep JSON", Event{ID: "$deep", RoomID: "!r:hs", Sender: "@irc_x:hs", JSON: []byte(deep)}, nil},
		{"huge content", Event{ID: "$huge", RoomID: "!r:hs", Sender: "@irc_x:hs", JSON: []byte(huge)}, nil},
		{"odd ids", ev("$odd/?#%é", "!r/?#%é:hs", "m.room.message", "@irc_é/?#%:hs", nil, ""), nil},
		{"sender over 255 bytes", ev("$long", "!r:hs", "m.room.message", "@irc_"+strings.Repeat("x", 250)+":hs", nil, ""), ErrInvalidID},
		{"member state_key over 255 bytes", ev("$longsk", "!r:hs", "m.room.member", "@irc_x:hs", sk("@irc_"+strings.Repeat("x", 250)+":hs"), "join"), ErrInvalidID},
		{"room ID over 255 bytes", ev("$longroom", "!"+strings.Repeat("r", 255)+":hs", "m.room.message", "@irc_x:hs", nil, ""), ErrInvalidID},
	}
	want := []string{}
	for _, tt := range tests {
		err := d.Submit(ctx, tt.ev)
		if !errors.Is(err, tt.wantErr) || (tt.wantErr == nil && err != nil) {
			t.Errorf("%s: err = %v, want %v", tt.name, err, tt.wantErr)
		}
		if tt.wantErr == nil && tt.name != "deep JSON" {
			want = append(want, tt.ev.ID)
		}
	}
	if err := d.SubmitEphemeral(ctx, Ephemeral{Type: "m.typing", RoomID: "!r:hs", JSON: []byte("nope")}); !errors.Is(err, ErrInvalidJSON) {
		t.Errorf("ephemeral: %v", err)
	}
	if err := d.SubmitToDevice(ctx, ToDevice{Type: "x", ToUser: "@irc_x:hs", JSON: []byte("nope")}); !errors.Is(err, ErrInvalidJSON) {
		t.Errorf("to-device: %v", err)
	}
	if err := d.SubmitToDevice(ctx, ToDevice{Type: "x", ToUser: "@irc_x:hs", ToDevice: "*", JSON: []byte(`{"to_device_id":"*"}`)}); !errors.Is(err, ErrAllDevices) {
		t.Errorf("to-device for every device: %v", err)
	}
	// The valid ones all arrive (the deep one has no event_id to list).
	if got := waitGot(t, rec, len(want)+1); !slices.Contains(got, "$huge") || !slices.Contains(got, "$odd/?#%é") {
		t.Errorf("got %v", got)
	}
}

// TestStorageFaultRecovers: while the disk refuses writes Submit fails (the
// homeserver knows the event is not queued); senders wait; once writes work
// again everything acknowledged is delivered.
func TestStorageFaultRecovers(t *testing.T) {
	rec := newRecorder(t)
	var mu sync.Mutex
	full := false
	set := setOf(t, registration("irc", rec.srv.URL, `@irc_.*`, "", "", false))
	dir := t.TempDir()
	d, err := New(context.Background(), Config{
		Registry: registry.NewRegistry(set),
		OpenStore: func(ctx context.Context, opts txnstore.Options) (txnstore.Store, error) {
			ctx = storehook.With(ctx, &storehook.Hooks{Commit: func([]storehook.Op) storehook.Fault {
				mu.Lock()
				defer mu.Unlock()
				if full {
					return storehook.Fail // as a full disk would
				}
				return storehook.None
			}})
			return txnstore.Open(ctx, filepath.Join(dir, "d.db"), opts)
		},
		Queue: queue.Options{RetryInitial: 10 * time.Millisecond, RetryMax: 50 * time.Millisecond},
	})
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close(context.Background())
	ctx := context.Background()
	var acked []string
	for i := 0; i < 30; i++ {
		if i == 10 || i == 20 {
			mu.Lock()
			full = i == 10
			mu.Unlock()
		}
		id := fmt.Sprintf("$%02d", i)
		err := d.Submit(ctx, ev(id, "!r:hs", "m.room.message", "@irc_x:hs", nil, ""))
		if (err != nil) != (i >= 10 && i < 20) {
			t.Fatalf("event %d: err = %v", i, err)
		}
		if err == nil {
			acked = append(acked, id)
		}
	}
	if got := waitGot(t, rec, len(acked)); !slices.Equal(got, acked) {
		t.Errorf("delivered %v, want %v", got, acked)
	}
}

// TestInterestedFollowsTheRoom checks that Interested makes Submit's
// decision (members, aliases, state_key) and applies membership like Submit.
func TestInterestedFollowsTheRoom(t *testing.T) {
	state := &roomState{
		members: map[string][]string{"!r:hs": {"@alice:hs"}},
		aliases: map[string][]string{"!a:hs": {"#irc_chan:hs"}},
	}
	d := newTestDispatcher(t, state,
		registration("irc", "http://127.0.0.1:1", `@irc_.*`, `#irc_.*`, "", false),
		registration("tg", "http://127.0.0.1:1", `@tg_.*`, "", `!tg_.*`, false),
		registration("nourl", "", `@irc_.*`, "", "", false))
	ctx := context.Background()
	tests := []struct {
		ev   Event
		want []string
	}{
		{ev("$1", "!r:hs", "m.room.message", "@alice:hs", nil, ""), nil},
		{ev("$2", "!r:hs", "m.room.message", "@irc_x:hs", nil, ""), []string{"irc"}},
		{ev("$3", "!r:hs", "m.room.member", "@tg_bob:hs", sk("@tg_bob:hs"), "join"), []string{"tg"}},
		{ev("$4", "!r:hs", "m.room.message", "@alice:hs", nil, ""), []string{"tg"}},
		{ev("$5", "!r:hs", "m.room.member", "@tg_bob:hs", sk("@tg_bob:hs"), "leave"), []string{"tg"}},
		{ev("$6", "!r:hs", "m.room.message", "@alice:hs", nil, ""), nil},
		{ev("$7", "!a:hs", "m.room.message", "@alice:hs", nil, ""), []string{"irc"}},
		{ev("$8", "!tg_room:hs", "m.room.message", "@irc_y:hs", nil, ""), []string{"irc", "tg"}},
	}
	for _, tt := range tests {
		got, err := d.Interested(ctx, tt.ev)
		if err != nil {
			t.Fatal(err)
		}
		if !slices.Equal(got, tt.want) {
			t.Errorf("%s: got %v, want %v", tt.ev.ID, got, tt.want)
		}
	}
}
