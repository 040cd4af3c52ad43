package mautrix

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"maps"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/rs/zerolog"
	"maunium.net/go/mautrix"
	"maunium.net/go/mautrix/appservice"
	"maunium.net/go/mautrix/event"
	"maunium.net/go/mautrix/id"

	"github.com/matrix-org/dendrite/contrib/asdispatch/internal/harness"
)

// buildTimeout covers a cold build of dendrite-asdispatch (about 7 minutes
// on a shared 2-core machine); CI builds it in contrib/dendrite's e2e
// tests first, so this module finds it cached.
const buildTimeout = 20 * time.Minute

var binary string

func TestMain(m *testing.M) {
	ctx, cancel := context.WithTimeout(context.Background(), buildTimeout)
	start := time.Now()
	bin, err := harness.Build(ctx, harness.AsDispatch)
	cancel()
	if err != nil {
		fmt.Fprintln(os.Stderr, "mautrix: building dendrite-asdispatch:", err)
		os.Exit(1)
	}
	if d := time.Since(start); d > time.Second {
		fmt.Fprintf(os.Stderr, "mautrix: built %s in %s\n", bin, d.Round(time.Second))
	}
	binary = bin
	os.Exit(m.Run())
}

// wire sits in front of mautrix's router, as a reverse proxy would: it
// records what the homeserver sent and what mautrix answered, and loses
// mautrix's answer to one transaction so that the homeserver has to retry
// it under the same txnId.
type wire struct {
	t    *testing.T
	next http.Handler

	mu       sync.Mutex
	bodies   map[string][]byte // txnId → body of its first attempt
	attempts map[string]int
	answers  map[answer]int
	pings    []string // transaction_id of the homeserver's pings
	dropOn   []byte   // the first transaction containing this loses its answer
	dropped  string   // txnId whose answer was lost
}

func (w *wire) ServeHTTP(rw http.ResponseWriter, r *http.Request) {
	body, err := io.ReadAll(r.Body)
	if err != nil {
		rw.WriteHeader(http.StatusBadRequest)
		return
	}
	r.Body = io.NopCloser(bytes.NewReader(body))
	kind := r.Method + " " + r.URL.Path
	if i := strings.LastIndexByte(r.URL.Path, '/'); i > 0 {
		kind = r.Method + " " + r.URL.Path[:i]
	}
	drop := false
	w.mu.Lock()
	switch {
	case r.Method == http.MethodPut && strings.HasPrefix(r.URL.Path, "/_matrix/app/v1/transactions/"):
		txn := strings.TrimPrefix(r.URL.Path, "/_matrix/app/v1/transactions/")
		if prev, ok := w.bodies[txn]; !ok {
			w.bodies[txn] = body
		} else if !bytes.Equal(prev, body) {
			w.t.Errorf("txn %s resent with another body:\n%s\n%s", txn, prev, body)
		}
		w.attempts[txn]++
		if w.dropped == "" && w.dropOn != nil && bytes.Contains(body, w.dropOn) {
			w.dropped, drop = txn, true
		}
	case r.URL.Path == "/_matrix/app/v1/ping":
		var p struct {
			TxnID string `json:"transaction_id"`
		}
		_ = json.Unmarshal(body, &p)
		w.pings = append(w.pings, p.TxnID)
	}
	w.mu.Unlock()

	status := http.StatusOK
	if drop {
		// mautrix handles the transaction; its answer never arrives.
		lost := httptest.NewRecorder()
		w.next.ServeHTTP(lost, r)
		status = lost.Code
		rw.WriteHeader(http.StatusBadGateway)
	} else {
		sw := &statusWriter{ResponseWriter: rw, status: http.StatusOK}
		w.next.ServeHTTP(sw, r)
		status = sw.status
	}
	w.mu.Lock()
	w.answers[answer{kind, status}]++
	w.mu.Unlock()
}

// answer is one kind of answer mautrix gave: method, path without its last
// segment, status.
type answer struct {
	route  string
	status int
}

type statusWriter struct {
	http.ResponseWriter
	status int
}

func (s *statusWriter) WriteHeader(code int) {
	s.status = code
	s.ResponseWriter.WriteHeader(code)
}

// queries is the bridge's QueryHandler: it creates what it is asked about,
// as a bridge does.
type queries struct {
	as             *appservice.AppService
	aliases, users atomic.Int32
}

func (q *queries) QueryAlias(alias id.RoomAlias) bool {
	q.aliases.Add(1)
	local := strings.TrimPrefix(strings.SplitN(string(alias), ":", 2)[0], "#")
	_, err := q.as.BotIntent().CreateRoom(context.Background(), &mautrix.ReqCreateRoom{RoomAliasName: local, Preset: "public_chat"})
	return err == nil
}

func (q *queries) QueryUser(userID id.UserID) bool {
	q.users.Add(1)
	return q.as.Intent(userID).EnsureRegistered(context.Background()) == nil
}

// received is what came out of mautrix's Events channel, in order.
type received struct {
	mu      sync.Mutex
	events  []*event.Event
	changed chan struct{} // closed and replaced on every event
}

func (r *received) consume(ctx context.Context, ch <-chan *event.Event) {
	for {
		select {
		case <-ctx.Done():
			return
		case evt := <-ch:
			r.mu.Lock()
			r.events = append(r.events, evt)
			close(r.changed)
			r.changed = make(chan struct{})
			r.mu.Unlock()
		}
	}
}

// waitFor waits until ok holds for the events received so far.
func (r *received) waitFor(ctx context.Context, timeout time.Duration, ok func([]*event.Event) bool) bool {
	deadline := time.NewTimer(timeout)
	defer deadline.Stop()
	for {
		r.mu.Lock()
		evs, changed := slices.Clone(r.events), r.changed
		r.mu.Unlock()
		if ok(evs) {
			return true
		}
		select {
		case <-changed:
		case <-deadline.C:
			return false
		case <-ctx.Done():
			return false
		}
	}
}

func (r *received) inRoom(room id.RoomID) []*event.Event {
	r.mu.Lock()
	defer r.mu.Unlock()
	var out []*event.Event
	for _, e := range r.events {
		if e.RoomID == room {
			out = append(out, e)
		}
	}
	return out
}

func has(evs []*event.Event, want ...id.EventID) bool {
	for _, w := range want {
		if !slices.ContainsFunc(evs, func(e *event.Event) bool { return e.ID == w }) {
			return false
		}
	}
	return true
}

// timeline is the room's whole timeline as a member sees it, oldest first.
// It pages backwards: Dendrite v0.13.8 answers dir=f without a from token
// (optional since Matrix 1.3) with 400 "malformed sync token" (it formats
// its default start token as ""). Its last backward page repeats the
// oldest event of the page before: kept once.
func timeline(ctx context.Context, c *mautrix.Client, room id.RoomID) ([]*event.Event, error) {
	var out []*event.Event
	seen := map[id.EventID]bool{}
	from := ""
	for {
		resp, err := c.Messages(ctx, room, from, "", mautrix.DirectionBackward, nil, 100)
		if err != nil {
			return nil, fmt.Errorf("from %q: %w", from, err)
		}
		for _, e := range resp.Chunk {
			if !seen[e.ID] {
				seen[e.ID] = true
				out = append(out, e)
			}
		}
		if len(resp.Chunk) == 0 || resp.End == "" {
			slices.Reverse(out)
			return out, nil
		}
		from = resp.End
	}
}

func ids(evs []*event.Event) []id.EventID {
	out := make([]id.EventID, len(evs))
	for i, e := range evs {
		out[i] = e.ID
	}
	return out
}

// TestMautrixReceiver runs an unmodified mautrix-go appservice.AppService
// (its router on an HTTP server on 127.0.0.1, a registration it generated,
// its QueryHandler, its transaction handling) against dendrite-asdispatch,
// driven by real client-server calls: mautrix's intents (as_token and
// ?user_id= masquerading) and a Matrix user with a mautrix client.
func TestMautrixReceiver(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()

	mas := appservice.Create()
	mas.Log = zerolog.New(zerolog.NewTestWriter(t)).Level(zerolog.WarnLevel)
	reg := appservice.CreateRegistration() // random as_token and hs_token
	reg.ID, reg.SenderLocalpart = "mx", "mxbot"
	reg.Namespaces.UserIDs.Register(regexp.MustCompile(`^@mx_.+:localhost$`), true)
	reg.Namespaces.RoomAliases.Register(regexp.MustCompile(`^#mx_.+:localhost$`), true)
	mas.Registration = reg
	mas.HomeserverDomain = "localhost"
	q := &queries{as: mas}
	mas.QueryHandler = q

	// Deferred in this order so that, on a failure, the homeserver stops
	// first, then mautrix's server, then the reader of its channel (a
	// handler may be blocked on it).
	rec := &received{changed: make(chan struct{})}
	consumeCtx, stopConsume := context.WithCancel(ctx)
	defer stopConsume()
	go rec.consume(consumeCtx, mas.Events)
	w := &wire{t: t, next: mas.Router, bodies: map[string][]byte{}, attempts: map[string]int{},
		answers: map[answer]int{}, dropOn: []byte(`"body":"alice 3"`)}
	srv := httptest.NewUnstartedServer(w) // listens on 127.0.0.1 already
	defer srv.Close()
	reg.URL = "http://" + srv.Listener.Addr().String()

	dir := t.TempDir()
	regPath := filepath.Join(dir, "mx-registration.yaml")
	if err := reg.Save(regPath); err != nil { // the file as mautrix writes it
		t.Fatal(err)
	}
	cfg, err := harness.WriteConfig(dir, harness.Options{Registrations: []string{regPath},
		AsDispatch: fmt.Sprintf("data_dir: %s\nappservice:\n  retry_initial: 100ms\n  retry_max: 1s\n", filepath.Join(dir, "asdispatch"))})
	if err != nil {
		t.Fatal(err)
	}
	hs, err := harness.Start(ctx, binary, cfg, testLog{t})
	if err != nil {
		t.Fatal(err)
	}
	defer hs.Kill()
	if err := mas.SetHomeserverURL(hs.URL); err != nil {
		t.Fatal(err)
	}
	// Both are made lazily without a lock: make them before handlers run.
	bot := mas.BotIntent()
	mas.BotClient()
	srv.Start()

	must := func(err error, what string) {
		t.Helper()
		if err != nil {
			t.Fatalf("%s: %v", what, err)
		}
	}

	// The homeserver can reach mautrix: its ping helper, as bridges call it
	// at start-up (Matrix 1.7; dendrite-asdispatch adds the endpoint).
	if !bot.EnsureAppserviceConnection(ctx) {
		t.Fatal("mautrix's EnsureAppserviceConnection failed")
	}
	pong, err := bot.AppservicePing(ctx, reg.ID, "mx-ping")
	must(err, "ping")
	if pong.DurationMS < 0 {
		t.Errorf("ping duration_ms %d", pong.DurationMS)
	}

	// The sender_localpart bot: Dendrite-asdispatch created it at start-up.
	who, err := bot.Whoami(ctx)
	must(err, "bot whoami (?user_id=)")
	plain, err := mautrix.NewClient(hs.URL, "", reg.AppToken)
	must(err, "client")
	whoPlain, err := plain.Whoami(ctx)
	must(err, "whoami with the bare as_token")
	if who.UserID != "@mxbot:localhost" || whoPlain.UserID != "@mxbot:localhost" {
		t.Errorf("whoami: %s and %s, want @mxbot:localhost", who.UserID, whoPlain.UserID)
	}
	wrong, _ := mautrix.NewClient(hs.URL, "", "not-the-as-token")
	if _, err := wrong.Whoami(ctx); !errors.Is(err, mautrix.MUnknownToken) {
		t.Errorf("whoami with a wrong as_token: %v, want M_UNKNOWN_TOKEN", err)
	}

	// A ghost registers (m.login.application_service), creates a room with
	// an alias and talks; the bot joins and talks.
	ghost := mas.Intent("@mx_ghost:localhost")
	must(ghost.EnsureRegistered(ctx), "register the ghost")
	chanRoom, err := ghost.CreateRoom(ctx, &mautrix.ReqCreateRoom{RoomAliasName: "mx_chan", Name: "bridged", Preset: "public_chat"})
	must(err, "ghost creates #mx_chan")
	r1 := chanRoom.RoomID
	_, err = ghost.SendText(ctx, r1, "from the ghost")
	must(err, "ghost sends")
	must(bot.EnsureJoined(ctx, r1), "bot joins")
	_, err = bot.SendText(ctx, r1, "from the bot")
	must(err, "bot sends")

	// A Matrix user: her own registration (Dendrite's dummy auth), refused
	// in the AS's exclusive namespace.
	alice, err := mautrix.NewClient(hs.URL, "", "")
	must(err, "client")
	if _, err := alice.RegisterDummy(ctx, &mautrix.ReqRegister[any]{Username: "mx_squatter", Password: "pw pw pw"}); !errors.Is(err, mautrix.MExclusive) {
		t.Errorf("registering in the AS's exclusive namespace: %v, want M_EXCLUSIVE", err)
	}
	r, err := alice.RegisterDummy(ctx, &mautrix.ReqRegister[any]{Username: "alice", Password: "correct horse"})
	must(err, "register alice")
	alice.SetCredentials(r.UserID, r.AccessToken)
	_, err = alice.JoinRoom(ctx, "#mx_chan:localhost", nil)
	must(err, "alice joins #mx_chan")
	const n = 10
	for i := 0; i < n; i++ {
		_, err := alice.SendText(ctx, r1, fmt.Sprintf("alice %d", i))
		must(err, "alice sends")
	}

	// Lazy creation: an alias nobody has made yet (the QueryHandler's bot
	// creates the room while Dendrite waits) ...
	lazy, err := alice.JoinRoom(ctx, "#mx_lazy:localhost", nil)
	must(err, "join of a lazily created alias")
	r2 := lazy.RoomID
	_, err = alice.SendText(ctx, r2, "in the lazy room")
	must(err, "alice sends")
	// ... and users nobody registered yet: Dendrite asks the AS when it
	// looks up a profile, dendrite-asdispatch also before an invite.
	prof, err := alice.GetProfile(ctx, "@mx_looked_up:localhost")
	must(err, "profile of a lazily created ghost")
	if q.users.Load() != 1 {
		t.Errorf("the profile of @mx_looked_up (%+v): mautrix asked %d times, want 1", prof, q.users.Load())
	}
	own, err := alice.CreateRoom(ctx, &mautrix.ReqCreateRoom{})
	must(err, "alice creates a room")
	r3 := own.RoomID
	_, err = alice.SendText(ctx, r3, "before the ghost")
	must(err, "alice sends")
	_, err = alice.InviteUser(ctx, r3, &mautrix.ReqInviteUser{UserID: "@mx_new:localhost"})
	must(err, "invite of a lazily created ghost")
	if q.users.Load() != 2 {
		t.Errorf("invite of @mx_new: mautrix asked about %d users, want 2", q.users.Load())
	}
	newGhost := mas.Intent("@mx_new:localhost")
	// The invite reaches mautrix's state store through a transaction.
	if !rec.waitFor(ctx, 20*time.Second, func(evs []*event.Event) bool {
		return slices.ContainsFunc(evs, func(e *event.Event) bool {
			return e.RoomID == r3 && e.Type == event.StateMember && e.GetStateKey() == "@mx_new:localhost"
		})
	}) {
		t.Fatal("mautrix never received the invite of @mx_new")
	}
	must(newGhost.EnsureJoined(ctx, r3), "the new ghost joins")
	_, err = alice.SendText(ctx, r3, "after the ghost")
	must(err, "alice sends")

	// The end of each room, sent last.
	var ends []id.EventID
	for _, room := range []id.RoomID{r1, r2, r3} {
		resp, err := alice.SendText(ctx, room, "end")
		must(err, "alice sends the end")
		ends = append(ends, resp.EventID)
	}
	if !rec.waitFor(ctx, 30*time.Second, func(evs []*event.Event) bool { return has(evs, ends...) }) {
		t.Fatalf("after 30s mautrix has not received the last messages; %d events", len(rec.inRoom(r1))+len(rec.inRoom(r2))+len(rec.inRoom(r3)))
	}

	// Every event of the AS's rooms once, in the room's order: the rooms of
	// its ghosts and aliases from their creation, alice's own room from the
	// invite of the ghost on (before it, nothing there concerned the AS).
	for _, c := range []struct {
		name   string
		room   id.RoomID
		reader *mautrix.Client
	}{
		{"#mx_chan", r1, ghost.Client},
		{"#mx_lazy", r2, bot.Client},
		{"alice's room", r3, alice},
	} {
		tl, err := timeline(ctx, c.reader, c.room)
		must(err, "timeline of "+c.name)
		if c.room == r3 {
			i := slices.IndexFunc(tl, func(e *event.Event) bool {
				return e.Type == event.StateMember && e.GetStateKey() == "@mx_new:localhost"
			})
			if i < 0 {
				t.Fatalf("no invite of @mx_new in %s's timeline", c.name)
			}
			tl = tl[i:]
		}
		want, got := ids(tl), ids(rec.inRoom(c.room))
		if !slices.Equal(got, want) {
			t.Errorf("%s: mautrix got %d events\n%v\nthe timeline has %d\n%v", c.name, len(got), got, len(want), want)
		}
	}

	rec.mu.Lock()
	total := len(rec.events)
	rec.mu.Unlock()
	if in := len(rec.inRoom(r1)) + len(rec.inRoom(r2)) + len(rec.inRoom(r3)); total != in {
		t.Errorf("mautrix got %d events, %d of them in the three rooms", total, in)
	}

	// Message bodies as mautrix parsed them, in order.
	var bodies []string
	for _, e := range rec.inRoom(r1) {
		if e.Type == event.EventMessage {
			bodies = append(bodies, e.Content.AsMessage().Body)
		}
	}
	wantBodies := []string{"from the ghost", "from the bot"}
	for i := 0; i < n; i++ {
		wantBodies = append(wantBodies, fmt.Sprintf("alice %d", i))
	}
	wantBodies = append(wantBodies, "end")
	if !slices.Equal(bodies, wantBodies) {
		t.Errorf("messages in #mx_chan %q, want %q", bodies, wantBodies)
	}

	// The lost answer: the homeserver retried that txnId with the same
	// body (checked on arrival) and mautrix's txnId cache dropped the
	// repeat, so no event came out twice (checked by the comparison above).
	w.mu.Lock()
	dropped, attempts := w.dropped, w.attempts[w.dropped]
	answers, pings := maps.Clone(w.answers), slices.Clone(w.pings)
	w.mu.Unlock()
	if dropped == "" || attempts < 2 {
		t.Errorf("txn with alice 3: %q, %d attempts; want a retry of the same txnId", dropped, attempts)
	}
	// mautrix checks hs_token on every request: it answered all with 200.
	for a, n := range answers {
		if a.status != http.StatusOK {
			t.Errorf("mautrix answered %d× %d to %s", n, a.status, a.route)
		}
	}
	if !slices.Contains(pings, "mx-ping") {
		t.Errorf("the homeserver's pings carried %q, want mx-ping among them", pings)
	}
	if q.aliases.Load() == 0 || q.users.Load() == 0 {
		t.Errorf("QueryHandler asked about %d aliases, %d users; want both", q.aliases.Load(), q.users.Load())
	}
	t.Logf("txns %d (one answer lost, retried %d times), mautrix answered %v, queries: %d alias %d user",
		len(w.bodies), attempts-1, answers, q.aliases.Load(), q.users.Load())

	// And mautrix rejects a homeserver without its hs_token, so the 200s
	// above mean the homeserver sent the right one.
	req, _ := http.NewRequestWithContext(ctx, http.MethodPut, reg.URL+"/_matrix/app/v1/transactions/forged", strings.NewReader(`{"events":[]}`))
	req.Header.Set("Authorization", "Bearer not-the-hs-token")
	resp, err := http.DefaultClient.Do(req)
	must(err, "forged transaction")
	resp.Body.Close()
	if resp.StatusCode != http.StatusUnauthorized {
		t.Errorf("a transaction with the wrong hs_token got %d", resp.StatusCode)
	}
	if err := hs.Stop(20 * time.Second); err != nil {
		t.Errorf("SIGTERM: %v", err)
	}
}

// testLog passes the server's output to the test log.
type testLog struct{ t *testing.T }

func (l testLog) Write(p []byte) (int, error) {
	l.t.Logf("%s", strings.TrimRight(string(p), "\n"))
	return len(p), nil
}
