package dispatcher

import (
	"context"
	"crypto/sha256"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zaptest"

	"github.com/asdispatch/asdispatch/asapi"
	"github.com/asdispatch/asdispatch/queue"
	"github.com/asdispatch/asdispatch/registry"
)

// faultAS is an AS on 127.0.0.1 that misbehaves in one way while faulty is
// set and records what it accepts: events in order of first acceptance,
// their latency from Submit, and every txnId's body.
type faultAS struct {
	t      *testing.T
	token  string
	mode   string
	faulty atomic.Bool

	mu       sync.Mutex
	ln       net.Listener
	srv      *http.Server
	addr     string
	seen     map[string]bool     // event ids accepted
	order    []int               // event numbers in order of first acceptance
	latency  []time.Duration     // per accepted event
	bodies   map[string][32]byte // txnId -> body hash
	twoBody  []string
	attempts int
}

func newFaultAS(t *testing.T, name, mode string) *faultAS {
	a := &faultAS{t: t, token: "hs-" + name, mode: mode, seen: map[string]bool{}, bodies: map[string][32]byte{}}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	a.addr = ln.Addr().String()
	a.serve(ln)
	t.Cleanup(func() {
		a.faulty.Store(false)
		a.mu.Lock()
		srv := a.srv
		a.mu.Unlock()
		if srv != nil {
			srv.Close()
		}
	})
	return a
}

func (a *faultAS) serve(ln net.Listener) {
	srv := &http.Server{Handler: a}
	a.mu.Lock()
	a.ln, a.srv = ln, srv
	a.mu.Unlock()
	go srv.Serve(ln)
}

// down closes the listener (connection refused) until up is called.
func (a *faultAS) down() {
	a.mu.Lock()
	srv := a.srv
	a.srv = nil
	a.mu.Unlock()
	srv.Close()
}

func (a *faultAS) up() {
	for i := 0; ; i++ {
		ln, err := net.Listen("tcp", a.addr)
		if err == nil {
			a.serve(ln)
			return
		}
		if i == 100 {
			a.t.Errorf("listen again on %s: %v", a.addr, err)
			return
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func (a *faultAS) url() string { return "http://" + a.addr }

// registration is the AS's YAML: interested in everything @alice:hs sends.
func (a *faultAS) registration() string {
	id := strings.TrimPrefix(a.token, "hs-")
	return fmt.Sprintf("id: %s\nurl: %s\nas_token: as-%s\nhs_token: %s\nsender_localpart: bot_%s\nnamespaces:\n  users: [{exclusive: false, regex: '@alice:hs'}]\n",
		id, a.url(), id, a.token, id)
}

// aliceEvent is @alice:hs's message number n in !r:hs, stamped with the
// time it is made (for the latency at the AS), padded with pad.
func aliceEvent(n int, pad string) Event {
	id := "$" + strconv.Itoa(n)
	js, _ := json.Marshal(map[string]any{"event_id": id, "room_id": "!r:hs", "type": "m.room.message",
		"sender": "@alice:hs", "content": map[string]any{"n": n, "ts": time.Now().UnixNano(), "pad": pad}})
	return Event{ID: id, RoomID: "!r:hs", Type: "m.room.message", Sender: "@alice:hs", JSON: js}
}

func (a *faultAS) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	body, err := io.ReadAll(r.Body)
	if err != nil {
		return
	}
	now := time.Now()
	if r.Header.Get("Authorization") != "Bearer "+a.token {
		a.t.Errorf("%s: wrong hs_token", a.mode)
		w.WriteHeader(http.StatusForbidden)
		return
	}
	txn := strings.TrimPrefix(r.URL.Path, "/_matrix/app/v1/transactions/")
	sum := sha256.Sum256(body)
	a.mu.Lock()
	a.attempts++
	if prev, ok := a.bodies[txn]; ok && prev != sum {
		a.twoBody = append(a.twoBody, txn)
	}
	a.bodies[txn] = sum
	a.mu.Unlock()
	if a.faulty.Load() {
		if a.misbehave(w, r) {
			return
		}
	}
	var parsed struct {
		Events []struct {
			ID      string `json:"event_id"`
			Content struct {
				N  int   `json:"n"`
				TS int64 `json:"ts"`
			} `json:"content"`
		} `json:"events"`
	}
	if err := json.Unmarshal(body, &parsed); err != nil {
		a.t.Errorf("%s: body is not JSON: %v", a.mode, err)
	}
	a.mu.Lock()
	for _, e := range parsed.Events {
		if a.seen[e.ID] {
			continue // only ever as a retry of the same txnId: checked by bodies
		}
		a.seen[e.ID] = true
		a.order = append(a.order, e.Content.N)
		a.latency = append(a.latency, now.Sub(time.Unix(0, e.Content.TS)))
	}
	a.mu.Unlock()
	if a.mode == "empty 200" && a.faulty.Load() {
		return // 200 without a body: accepted all the same
	}
	w.Write([]byte("{}"))
}

// misbehave answers as the fault mode says; false lets the request through.
func (a *faultAS) misbehave(w http.ResponseWriter, r *http.Request) bool {
	hijack := func() net.Conn {
		c, _, err := w.(http.Hijacker).Hijack()
		if err != nil {
			a.t.Errorf("hijack: %v", err)
			return nil
		}
		return c
	}
	switch a.mode {
	case "500":
		w.WriteHeader(http.StatusInternalServerError)
		w.Write([]byte(`{"errcode":"M_UNKNOWN","error":"boom"}`))
	case "429":
		w.Header().Set("Retry-After", "0")
		w.WriteHeader(http.StatusTooManyRequests)
		w.Write([]byte(`{"errcode":"M_LIMIT_EXCEEDED","retry_after_ms":20}`))
	case "413":
		w.WriteHeader(http.StatusRequestEntityTooLarge)
	case "401":
		w.WriteHeader(http.StatusUnauthorized)
		w.Write([]byte(`{"errcode":"M_UNKNOWN_TOKEN"}`))
	case "garbage":
		if c := hijack(); c != nil {
			c.Write([]byte("\x00\xffnot http at all\r\n\r\n{{{"))
			c.Close()
		}
	case "empty 200":
		return false
	case "reset":
		if c := hijack(); c != nil {
			if tc, ok := c.(*net.TCPConn); ok {
				tc.SetLinger(0) // RST, not FIN
			}
			c.Close()
		}
	case "hang":
		for a.faulty.Load() && r.Context().Err() == nil {
			time.Sleep(10 * time.Millisecond)
		}
		// Still connected when the fault ends: answer it properly.
		return r.Context().Err() != nil
	case "1 byte/s":
		if c := hijack(); c != nil {
			defer c.Close()
			for _, b := range []byte("HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}") {
				if _, err := c.Write([]byte{b}); err != nil || !a.faulty.Load() {
					return true
				}
				time.Sleep(time.Second)
			}
		}
	default:
		a.t.Fatalf("unknown fault %q", a.mode)
	}
	return true
}

// faultRun submits events at a steady pace to the healthy ASes and, if
// mode is set, to one AS misbehaving in that way for window, then behaving.
// It returns the healthy ASes' median latency.
func faultRun(t *testing.T, mode string, window time.Duration, events int) time.Duration {
	healthy := []*faultAS{newFaultAS(t, "ok1", ""), newFaultAS(t, "ok2", "")}
	ases := slices.Clone(healthy)
	var faulty *faultAS
	if mode != "" {
		faulty = newFaultAS(t, "bad", mode)
		ases = append(ases, faulty)
	}
	var regs []string
	for _, a := range ases {
		regs = append(regs, a.registration())
	}
	set := setOf(t, regs...)
	d, err := New(context.Background(), Config{
		Registry: registry.NewRegistry(set),
		DataDir:  t.TempDir(),
		Logger:   zaptest.NewLogger(t, zaptest.Level(zap.ErrorLevel)),
		Queue: queue.Options{RetryInitial: 10 * time.Millisecond, RetryMax: 100 * time.Millisecond,
			Client: asapi.New(asapi.Options{TxnTimeout: 300 * time.Millisecond})},
	})
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close(context.Background())

	if faulty != nil {
		faulty.faulty.Store(true)
		if mode == "down" {
			faulty.down()
		}
	}
	start := time.Now()
	pace := window / time.Duration(events)
	for i := 1; i <= events; i++ {
		if faulty != nil && faulty.faulty.Load() && time.Since(start) > window {
			faulty.faulty.Store(false)
			if mode == "down" {
				faulty.up()
			}
		}
		if err := d.Submit(context.Background(), aliceEvent(i, "")); err != nil {
			t.Fatal(err)
		}
		time.Sleep(pace - time.Since(start)%pace)
	}
	if faulty != nil && faulty.faulty.Swap(false) && mode == "down" {
		faulty.up()
	}

	// Every AS, the faulty one included, ends with every event once, in order.
	deadline := time.Now().Add(30 * time.Second)
	for _, a := range ases {
		for {
			a.mu.Lock()
			n := len(a.order)
			a.mu.Unlock()
			if n >= events {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("%q: AS %s got %d of %d events", mode, a.token, n, events)
			}
			time.Sleep(10 * time.Millisecond)
		}
		a.mu.Lock()
		for i, n := range a.order {
			if n != i+1 {
				t.Errorf("%q: AS %s got event %d at position %d", mode, a.token, n, i+1)
				break
			}
		}
		if len(a.twoBody) > 0 {
			t.Errorf("%q: AS %s saw txnIds with two bodies: %v", mode, a.token, a.twoBody)
		}
		a.mu.Unlock()
	}
	if faulty != nil {
		faulty.mu.Lock()
		t.Logf("%q: the faulty AS got %d attempts for %d events, every event delivered once it behaved", mode, faulty.attempts, events)
		faulty.mu.Unlock()
	}
	var lat []time.Duration
	for _, a := range healthy {
		a.mu.Lock()
		lat = append(lat, a.latency...)
		a.mu.Unlock()
	}
	slices.Sort(lat)
	return lat[len(lat)/2]
}

// TestASFaults runs each way an AS can misbehave: the faulty AS gets every
// event once it behaves, in order, each txnId with one body, and the other
// ASes' median latency stays within 2x of a run without it, measured just
// before (plus 10 ms for scheduling noise; a loaded machine gets two more
// tries before this counts as a slowdown).
func TestASFaults(t *testing.T) {
	if testing.Short() {
		t.Skip("AS fault matrix: skipped in -short")
	}
	const events = 200
	window := 500 * time.Millisecond
	tests := []struct {
		mode   string
		window time.Duration
	}{
		{"500", window}, {"429", window}, {"413", window}, {"401", window}, {"garbage", window},
		{"empty 200", window}, {"reset", window}, {"hang", window}, {"1 byte/s", window},
		{"down", 3 * window}, // a long outage: a backlog builds up and drains
	}
	for _, tt := range tests {
		t.Run(tt.mode, func(t *testing.T) {
			n := int(events * tt.window / window)
			for try := 1; ; try++ {
				base := faultRun(t, "", tt.window, n)
				p50 := faultRun(t, tt.mode, tt.window, n)
				t.Logf("healthy median latency with a %q AS: %v, without: %v", tt.mode, p50, base)
				if p50 <= 2*base+10*time.Millisecond {
					return
				}
				if try == 3 {
					t.Errorf("a %q AS slowed the healthy ASes: median %v, more than 2x %v + 10ms", tt.mode, p50, base)
					return
				}
			}
		})
	}
}
