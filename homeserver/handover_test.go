package homeserver

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"net/url"
	"path/filepath"
	"slices"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/asdispatch/asdispatch/dispatcher"
	"github.com/asdispatch/asdispatch/internal/storehook"
	"github.com/asdispatch/asdispatch/queue"
	"github.com/asdispatch/asdispatch/registry"
	"github.com/asdispatch/asdispatch/txnstore"
)

// asLog is an AS that records the message events it gets, once per
// transaction id (as an AS dedups a retried transaction).
type asLog struct {
	mu      sync.Mutex
	txns    map[string]bool
	ids     []string
	members []string // "user membership" of each m.room.member event
}

func (a *asLog) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	var txn struct {
		Events []struct {
			ID       string `json:"event_id"`
			Type     string `json:"type"`
			StateKey string `json:"state_key"`
			Content  struct {
				Membership string `json:"membership"`
			} `json:"content"`
		} `json:"events"`
	}
	_ = json.NewDecoder(r.Body).Decode(&txn)
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.txns == nil {
		a.txns = map[string]bool{}
	}
	if !a.txns[r.URL.Path] {
		a.txns[r.URL.Path] = true
		for _, ev := range txn.Events {
			switch ev.Type {
			case "m.room.message":
				a.ids = append(a.ids, ev.ID)
			case "m.room.member":
				a.members = append(a.members, ev.StateKey+" "+ev.Content.Membership)
			}
		}
	}
	w.Write([]byte("{}"))
}

func (a *asLog) got() []string {
	a.mu.Lock()
	defer a.mu.Unlock()
	return slices.Clone(a.ids)
}

// waitFor waits until the AS got n messages.
func (a *asLog) waitFor(t *testing.T, n int) []string {
	t.Helper()
	for deadline := time.Now().Add(20 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		if got := a.got(); len(got) >= n || time.Now().After(deadline) {
			return got
		}
	}
}

// startStub starts the stub on dir with the bridge AS at as and the
// dispatcher's store opened through hooks (nil: none).
func startStub(t *testing.T, dir string, as http.Handler, hooks *storehook.Hooks) *env {
	t.Helper()
	return startStubOn(t, dir, as, func(ctx context.Context, opts txnstore.Options) (txnstore.Store, error) {
		if hooks != nil {
			ctx = storehook.With(ctx, hooks)
		}
		return txnstore.Open(ctx, filepath.Join(dir, "dispatcher.db"), opts)
	})
}

// startStubOn starts the stub on dir with the bridge AS at as and the
// dispatcher's store opened by open.
func startStubOn(t *testing.T, dir string, as http.Handler, open func(ctx context.Context, opts txnstore.Options) (txnstore.Store, error)) *env {
	t.Helper()
	e := &env{t: t, dir: dir}
	e.as = httptest.NewServer(as)
	t.Cleanup(e.as.Close)
	r, _, err := registry.Parse("bridge.yaml", []byte(fmt.Sprintf(bridgeReg, e.as.URL)))
	if err != nil {
		t.Fatal(err)
	}
	set, _, err := registry.NewSet("hs", []*registry.Registration{r})
	if err != nil {
		t.Fatal(err)
	}
	e.srv, err = New(context.Background(), Config{ServerName: "hs", DataDir: dir, Registry: registry.NewRegistry(set),
		OpenStore: open,
		Queue:     queue.Options{RetryInitial: 10 * time.Millisecond, RetryMax: 50 * time.Millisecond},
		Password:  cheapPasswords})
	if err != nil {
		t.Fatal(err)
	}
	e.hs = httptest.NewServer(e.srv)
	t.Cleanup(e.stop)
	return e
}

// ghostRoom registers the bridge's ghost and makes it create a room.
func ghostRoom(t *testing.T, e *env) string {
	t.Helper()
	e.do("POST", "/_matrix/client/v3/register", "as-bridge", map[string]any{"username": "br_ghost", "type": "m.login.application_service"})
	status, room := e.do("POST", "/_matrix/client/v3/createRoom?user_id="+url.QueryEscape("@br_ghost:hs"), "as-bridge", map[string]any{})
	if status != 200 {
		t.Fatalf("createRoom: %d %v", status, room)
	}
	return room["room_id"].(string)
}

// send sends a message as the ghost with transaction id txn; safe from
// any goroutine.
func send(base, roomID, txn string) (status int, eventID string, hdr http.Header, err error) {
	return sendWith(http.DefaultClient, base, roomID, txn)
}

func sendWith(client *http.Client, base, roomID, txn string) (status int, eventID string, hdr http.Header, err error) {
	js, _ := json.Marshal(map[string]any{"msgtype": "m.text", "body": txn})
	req, _ := http.NewRequest("PUT", base+"/_matrix/client/v3/rooms/"+url.PathEscape(roomID)+"/send/m.room.message/"+txn+
		"?user_id="+url.QueryEscape("@br_ghost:hs"), bytes.NewReader(js))
	req.Header.Set("Authorization", "Bearer as-bridge")
	resp, err := client.Do(req)
	if err != nil {
		return 0, "", nil, err
	}
	defer resp.Body.Close()
	raw, _ := io.ReadAll(resp.Body)
	var out struct {
		EventID string `json:"event_id"`
		Errcode string `json:"errcode"`
	}
	_ = json.Unmarshal(raw, &out)
	if resp.StatusCode != 200 {
		return resp.StatusCode, out.Errcode, resp.Header, nil
	}
	return resp.StatusCode, out.EventID, resp.Header, nil
}

// TestSendsSurviveDispatcherStoreOutage: while the dispatcher's store
// refuses every append, clients' sends are still answered 200 (they are in
// the log) and a retry with the same txnId is idempotent; once the store
// is back, the AS gets every acknowledged event exactly once, each
// client's in the order it sent them (issue 16: a send whose Submit failed
// was answered 500 and its event never dispatched).
func TestSendsSurviveDispatcherStoreOutage(t *testing.T) {
	var down atomic.Bool
	hooks := &storehook.Hooks{Commit: func(ops []storehook.Op) storehook.Fault {
		if down.Load() && slices.Contains(ops, storehook.Append) {
			return storehook.Fail
		}
		return storehook.None
	}}
	as := &asLog{}
	e := startStub(t, t.TempDir(), as, hooks)
	roomID := ghostRoom(t, e)
	down.Store(true)
	const clients, each = 8, 10
	sent := make([][]string, clients)
	var wg sync.WaitGroup
	errs := make(chan error, clients)
	for c := range clients {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range each {
				txn := fmt.Sprintf("c%d-%d", c, i)
				status, id, _, err := send(e.hs.URL, roomID, txn)
				if err == nil && status != 200 {
					err = fmt.Errorf("send %s: %d %s", txn, status, id)
				}
				if err != nil {
					errs <- err
					return
				}
				sent[c] = append(sent[c], id)
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	// A client's retry of an acknowledged send: the same event.
	if status, id, _, err := send(e.hs.URL, roomID, "c3-4"); err != nil || status != 200 || id != sent[3][4] {
		t.Errorf("retry of c3-4 = %d %s %v; want 200 %s", status, id, err, sent[3][4])
	}
	if got := as.got(); len(got) != 0 {
		t.Fatalf("the AS got %v while the store was down", got)
	}
	down.Store(false)
	got := as.waitFor(t, clients*each)
	if len(got) != clients*each {
		t.Fatalf("the AS got %d of %d events", len(got), clients*each)
	}
	seen := map[string]int{}
	for i, id := range got {
		if _, dup := seen[id]; dup {
			t.Errorf("event %s delivered twice", id)
		}
		seen[id] = i
	}
	for c, ids := range sent {
		for i := 1; i < len(ids); i++ {
			if seen[ids[i-1]] >= seen[ids[i]] {
				t.Errorf("client %d: %s delivered after %s", c, ids[i-1], ids[i])
			}
		}
	}
}

// TestCrashBetweenLogAndHandOver: the process dies after events are in the
// log but before they reach the dispatcher (the hand-over fails at that
// point, then the stub stops). The next start hands them over before New
// returns, so before the stub listens, and the AS gets each once, in order.
func TestCrashBetweenLogAndHandOver(t *testing.T) {
	dir := t.TempDir()
	as := &asLog{}
	e := startStub(t, dir, as, nil)
	roomID := ghostRoom(t, e)
	crashed := errors.New("the process died here")
	die := func(context.Context, []dispatcher.Event) error { return crashed }
	e.srv.beforeHandOver.Store(&die)
	var sent []string
	for i := range 5 {
		status, id, _, err := send(e.hs.URL, roomID, fmt.Sprintf("t%d", i))
		if err != nil || status != 200 {
			t.Fatalf("send %d: %d %s %v", i, status, id, err)
		}
		sent = append(sent, id)
	}
	e.stop()
	if got := as.got(); len(got) != 0 {
		t.Fatalf("the AS got %v before the restart", got)
	}

	e = startStub(t, dir, as, nil)
	var last int64
	if err := e.srv.st.db.QueryRow(`SELECT MAX(seq) FROM events`).Scan(&last); err != nil {
		t.Fatal(err)
	}
	if p, err := e.srv.disp.Position(context.Background(), e.srv.ho.stream); err != nil || p != last {
		t.Errorf("dispatcher position after New = %d, %v; want the log's end %d", p, err, last)
	}
	if got := as.waitFor(t, len(sent)); !slices.Equal(got, sent) {
		t.Errorf("the AS got %v, want %v", got, sent)
	}
	// A second restart hands over nothing again.
	e.stop()
	e = startStub(t, dir, as, nil)
	if _, id, _, err := send(e.hs.URL, roomID, "after"); err != nil {
		t.Fatal(err)
	} else if got := as.waitFor(t, len(sent)+1); !slices.Equal(got, append(slices.Clone(sent), id)) {
		t.Errorf("the AS got %v, want %v and %s once each", got, sent, id)
	}
}

// TestLogWriteFailureIs503: a send the log cannot take is answered 503
// M_UNKNOWN with Retry-After, never a raw database error; the client's
// retry with the same txnId then makes the event once.
func TestLogWriteFailureIs503(t *testing.T) {
	as := &asLog{}
	e := startStub(t, t.TempDir(), as, nil)
	roomID := ghostRoom(t, e)
	full := func() error { return errors.New("disk I/O error: /var/lib/secret/homeserver.db") }
	e.srv.logFault.Store(&full)
	status, code, hdr, err := send(e.hs.URL, roomID, "x1")
	if err != nil || status != 503 || code != "M_UNKNOWN" || hdr.Get("Retry-After") != "1" {
		t.Fatalf("send while the log fails = %d %s Retry-After %q %v; want 503 M_UNKNOWN Retry-After 1", status, code, hdr.Get("Retry-After"), err)
	}
	e.srv.logFault.Store(nil)
	_, first, _, err := send(e.hs.URL, roomID, "x1")
	if err != nil {
		t.Fatal(err)
	}
	_, again, _, err := send(e.hs.URL, roomID, "x1")
	if err != nil || again != first {
		t.Errorf("retry = %s %v, want %s", again, err, first)
	}
	if got := as.waitFor(t, 1); !slices.Equal(got, []string{first}) {
		t.Errorf("the AS got %v, want [%s]", got, first)
	}
}

// TestRoomStateAsOfTheHandOver: a message and then the ghost's leave wait
// together to be handed over (here after a restart, so the dispatcher has
// no cached interest for the room): the ghost's AS still gets the message
// it was in the room for, as the room state the dispatcher reads is that
// of the last event handed over, not the current one.
func TestRoomStateAsOfTheHandOver(t *testing.T) {
	dir := t.TempDir()
	as := &asLog{}
	e := startStub(t, dir, as, nil)
	_, alice := e.do("POST", "/_matrix/client/v3/register", "", map[string]any{"username": "alice", "password": "pw"})
	tok := alice["access_token"].(string)
	_, room := e.do("POST", "/_matrix/client/v3/createRoom", tok, map[string]any{"preset": "public_chat"})
	roomID := room["room_id"].(string)
	e.do("POST", "/_matrix/client/v3/register", "as-bridge", map[string]any{"username": "br_ghost", "type": "m.login.application_service"})
	ghost := "?user_id=" + url.QueryEscape("@br_ghost:hs")
	if status, out := e.do("POST", "/_matrix/client/v3/join/"+url.PathEscape(roomID)+ghost, "as-bridge", nil); status != 200 {
		t.Fatalf("ghost join: %d %v", status, out)
	}
	// Wait until the join is handed over, then hold the hand-over.
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(5 * time.Millisecond) {
		var last int64
		e.srv.st.db.QueryRow(`SELECT MAX(seq) FROM events`).Scan(&last)
		if e.srv.ho.pos.Load() == last {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the join was never handed over")
		}
	}
	hold := func(context.Context, []dispatcher.Event) error { return errors.New("held") }
	e.srv.beforeHandOver.Store(&hold)
	_, msg := e.do("PUT", "/_matrix/client/v3/rooms/"+url.PathEscape(roomID)+"/send/m.room.message/m1", tok, map[string]any{"body": "hi"})
	if status, out := e.do("POST", "/_matrix/client/v3/rooms/"+url.PathEscape(roomID)+"/leave"+ghost, "as-bridge", map[string]any{}); status != 200 {
		t.Fatalf("ghost leave: %d %v", status, out)
	}
	e.stop()
	startStub(t, dir, as, nil)
	if got := as.waitFor(t, 1); !slices.Equal(got, []string{msg["event_id"].(string)}) {
		t.Errorf("the AS got %v, want alice's message from before the ghost left", got)
	}
}

// BenchmarkSends measures the stub's send path beside the same workload
// straight into the dispatcher, in one run: 8 clients each sending one
// message at a time as the bridge's ghost, into one shared room or a room
// each. "stub" is a client-server API send over HTTP (keep-alive), answered
// once it is in the log, the hand-over to the dispatcher behind it;
// "submit" is dispatcher.Submit of one event with its position (one stream
// per client) into the same dispatcher. Both report sends/s; run them
// interleaved with -count and compare the same run's figures:
//
//	go test -run XXX -bench Sends -benchtime 20000x -count 3 ./homeserver/
func BenchmarkSends(b *testing.B) {
	for _, rooms := range []int{1, 8} {
		for _, path := range []string{"stub", "submit"} {
			b.Run(fmt.Sprintf("%s/rooms=%d", path, rooms), func(b *testing.B) { benchSends(b, path == "stub", rooms) })
		}
	}
}

func benchSends(b *testing.B, stub bool, rooms int) {
	dir := b.TempDir()
	r, _, err := registry.Parse("bridge.yaml", []byte(fmt.Sprintf(bridgeReg, "http://127.0.0.1:1")))
	if err != nil {
		b.Fatal(err)
	}
	set, _, err := registry.NewSet("hs", []*registry.Registration{r})
	if err != nil {
		b.Fatal(err)
	}
	srv, err := New(context.Background(), Config{ServerName: "hs", DataDir: dir, Registry: registry.NewRegistry(set), Password: cheapPasswords})
	if err != nil {
		b.Fatal(err)
	}
	defer srv.Close(context.Background())
	hs := httptest.NewServer(srv)
	defer hs.Close()
	const clients = 8
	// Clients keep their connections, as a bridge does.
	client := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: clients}}
	defer client.CloseIdleConnections()
	do := func(method, path string, body any) map[string]any {
		js, _ := json.Marshal(body)
		req, _ := http.NewRequest(method, hs.URL+path, bytes.NewReader(js))
		req.Header.Set("Authorization", "Bearer as-bridge")
		resp, err := client.Do(req)
		if err != nil {
			b.Fatal(err)
		}
		defer resp.Body.Close()
		var out map[string]any
		json.NewDecoder(resp.Body).Decode(&out)
		return out
	}
	do("POST", "/_matrix/client/v3/register", map[string]any{"username": "br_ghost", "type": "m.login.application_service"})
	roomIDs := make([]string, rooms)
	for i := range roomIDs {
		roomIDs[i] = do("POST", "/_matrix/client/v3/createRoom?user_id="+url.QueryEscape("@br_ghost:hs"), map[string]any{})["room_id"].(string)
	}
	if err := waitHandedOver(srv); err != nil {
		b.Fatal(err)
	}
	body := []byte(`{"msgtype":"m.text","body":"hello"}`)
	var next atomic.Int64
	cpu0 := cpuTime(b)
	b.ResetTimer()
	var wg sync.WaitGroup
	for i := range clients {
		wg.Add(1)
		go func() {
			defer wg.Done()
			roomID := roomIDs[i%rooms]
			stream := fmt.Sprintf("bench/%d", i)
			for n := next.Add(1); n <= int64(b.N); n = next.Add(1) {
				if !stub {
					ev := dispatcher.Event{ID: fmt.Sprintf("$b%d:hs", n), RoomID: roomID, Type: "m.room.message", Sender: "@br_ghost:hs",
						JSON: body, At: dispatcher.Position{Stream: stream, Pos: n}}
					if err := srv.Dispatcher().Submit(context.Background(), ev); err != nil {
						b.Error(err)
						return
					}
					continue
				}
				if status, id, _, err := sendWith(client, hs.URL, roomID, fmt.Sprintf("b%d", n)); err != nil || status != 200 {
					b.Errorf("send: %d %s %v", status, id, err)
					return
				}
			}
		}()
	}
	wg.Wait()
	b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "sends/s")
	// The process's CPU time per send (clients, HTTP, log, hand-over,
	// dispatcher and its store): what the send costs whatever else the
	// machine runs; cores/(CPU per send) is its ceiling on an idle machine.
	b.ReportMetric(float64((cpuTime(b)-cpu0).Microseconds())/float64(b.N), "cpu-µs/send")
}

// cpuTime is the process's user and system CPU time so far.
func cpuTime(b *testing.B) time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		b.Fatal(err)
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// waitHandedOver waits until the log is handed over to the dispatcher.
func waitHandedOver(srv *Server) error {
	for range 500 {
		var last int64
		if err := srv.st.db.QueryRow(`SELECT COALESCE(MAX(seq), 0) FROM events`).Scan(&last); err != nil {
			return err
		}
		if srv.ho.pos.Load() >= last {
			return nil
		}
		time.Sleep(10 * time.Millisecond)
	}
	return errors.New("the log was not handed over in 5 s")
}
