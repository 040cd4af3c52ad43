package integration

import (
	"bytes"
	"crypto/sha256"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

// crashAS is an AS that records every transaction it is sent and fails or
// stalls some of them at random, so that kills land mid-send and retries
// carry saved bodies.
type crashAS struct {
	name, token string
	rng         func(n int) int

	mu     sync.Mutex
	bodies map[string][32]byte // txnId -> body hash
	seenIn map[string]string   // event_id -> txnId it first came in
	order  map[string][]int    // room -> crash_n in order of first receipt
	dupTxn []string            // event ids seen again under another txnId
	diff   []string            // txnIds seen with two bodies
	events map[string]bool     // "room|n" delivered
}

func newCrashAS(name string, rng func(int) int) *crashAS {
	return &crashAS{name: name, token: "hs-" + name, rng: rng, bodies: map[string][32]byte{}, seenIn: map[string]string{},
		order: map[string][]int{}, events: map[string]bool{}}
}

func (a *crashAS) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if r.Header.Get("Authorization") != "Bearer "+a.token {
		w.WriteHeader(http.StatusForbidden)
		return
	}
	txn, ok := strings.CutPrefix(r.URL.Path, "/_matrix/app/v1/transactions/")
	if !ok || r.Method != http.MethodPut {
		w.WriteHeader(http.StatusNotFound)
		w.Write([]byte(`{"errcode":"M_UNRECOGNIZED"}`))
		return
	}
	var buf bytes.Buffer
	buf.ReadFrom(r.Body)
	sum := sha256.Sum256(buf.Bytes())
	var body struct {
		Events []struct {
			ID      string `json:"event_id"`
			Room    string `json:"room_id"`
			Content struct {
				N int `json:"crash_n"`
			} `json:"content"`
		} `json:"events"`
	}
	if err := json.Unmarshal(buf.Bytes(), &body); err != nil {
		w.WriteHeader(http.StatusBadRequest)
		return
	}
	a.mu.Lock()
	if prev, ok := a.bodies[txn]; ok && prev != sum {
		a.diff = append(a.diff, txn)
	}
	a.bodies[txn] = sum
	fail := a.rng(20) == 0 // 5% of attempts fail after the body arrived
	stall := time.Duration(a.rng(15)) * time.Millisecond
	if !fail {
		for _, e := range body.Events {
			if first, ok := a.seenIn[e.ID]; ok {
				if first != txn {
					a.dupTxn = append(a.dupTxn, e.ID)
				}
				continue
			}
			a.seenIn[e.ID] = txn
			if e.Content.N > 0 {
				a.order[e.Room] = append(a.order[e.Room], e.Content.N)
				a.events[e.Room+"|"+strconv.Itoa(e.Content.N)] = true
			}
		}
	}
	a.mu.Unlock()
	time.Sleep(stall)
	if fail {
		w.WriteHeader(http.StatusInternalServerError)
		return
	}
	w.Write([]byte("{}"))
}

// crashClient sends numbered messages into one room, one at a time, and
// records which sends were acknowledged with 200.
type crashClient struct {
	user, room string
	token      string
	acked      []int
	sent       int
}

// TestCrashServeKillNine SIGKILLs the built `asdispatch serve` at random
// moments while two clients send continuously to four ASes with different
// interests, restarts it each time, and checks at the end: every send that
// returned 200 reached every interested AS, per AS and room in send order,
// no txnId with two bodies, and an event repeated only as a retry of the
// same txnId. ASDISPATCH_CRASH_SEED replays a run.
func TestCrashServeKillNine(t *testing.T) {
	if testing.Short() {
		t.Skip("crash test: skipped in -short")
	}
	seed := uint64(time.Now().UnixNano())
	if s := os.Getenv("ASDISPATCH_CRASH_SEED"); s != "" {
		v, err := strconv.ParseUint(s, 10, 64)
		if err != nil {
			t.Fatalf("ASDISPATCH_CRASH_SEED: %v", err)
		}
		seed = v
	}
	t.Logf("seed %d (replay with ASDISPATCH_CRASH_SEED=%d)", seed, seed)
	kills := 20
	if s := os.Getenv("ASDISPATCH_CRASH_KILLS"); s != "" {
		kills, _ = strconv.Atoi(s)
	}
	rng := rand.New(rand.NewPCG(seed, seed^0x9e3779b97f4a7c15))
	var rngMu sync.Mutex
	intn := func(n int) int { rngMu.Lock(); defer rngMu.Unlock(); return rng.IntN(n) }

	bin := buildBinary(t)
	dir := t.TempDir()
	// alice's room (#crash_one) interests alice, aliases and all; bob's
	// room interests bob and all.
	ases := map[string]*crashAS{}
	regs := map[string]string{
		"alice":   "users: [{exclusive: false, regex: '@alice:localhost'}]",
		"aliases": "aliases: [{exclusive: false, regex: '#crash_.*'}]",
		"bob":     "users: [{exclusive: false, regex: '@bob:localhost'}]",
		"all":     "users: [{exclusive: false, regex: '@.*:localhost'}]",
	}
	var files []string
	for name, ns := range regs {
		a := newCrashAS(name, intn)
		srv := httptest.NewServer(a)
		t.Cleanup(srv.Close)
		ases[name] = a
		f := filepath.Join(dir, name+".yaml")
		os.WriteFile(f, []byte(fmt.Sprintf("id: %s\nurl: %s\nas_token: as-%s\nhs_token: %s\nsender_localpart: %s_bot\nnamespaces:\n  %s\n",
			name, srv.URL, name, a.token, name, ns)), 0o600)
		files = append(files, f)
	}
	config := filepath.Join(dir, "homeserver.yaml")
	os.WriteFile(config, []byte(fmt.Sprintf("server_name: localhost\nlisten: 127.0.0.1:0\ndata_dir: %s\nlog_level: error\napp_service_config_files: [%s]\nappservice:\n  retry_initial: 20ms\n  retry_max: 200ms\n",
		filepath.Join(dir, "data"), strings.Join(files, ", "))), 0o600)

	hs, cmd := startServe(t, bin, config)
	alice := &crashClient{user: "alice"}
	bob := &crashClient{user: "bob"}
	for _, c := range []*crashClient{alice, bob} {
		c.token = call(t, "POST", hs+"/_matrix/client/v3/register", "", map[string]any{"username": c.user, "password": "pw"})["access_token"].(string)
	}
	alice.room = call(t, "POST", hs+"/_matrix/client/v3/createRoom", alice.token, map[string]any{"room_alias_name": "crash_one"})["room_id"].(string)
	bob.room = call(t, "POST", hs+"/_matrix/client/v3/createRoom", bob.token, map[string]any{})["room_id"].(string)
	interested := map[string][]string{alice.room: {"alice", "aliases", "all"}, bob.room: {"bob", "all"}}

	var base atomic.Value
	base.Store(hs)
	stop := make(chan struct{})
	var wg sync.WaitGroup
	httpc := &http.Client{Timeout: 5 * time.Second}
	for _, c := range []*crashClient{alice, bob} {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for n := 1; ; n++ {
				select {
				case <-stop:
					return
				default:
				}
				c.sent = n
				js, _ := json.Marshal(map[string]any{"msgtype": "m.text", "body": "hello", "crash_n": n})
				req, _ := http.NewRequest(http.MethodPut, base.Load().(string)+"/_matrix/client/v3/rooms/"+url.PathEscape(c.room)+"/send/m.room.message/t"+strconv.Itoa(n), bytes.NewReader(js))
				req.Header.Set("Authorization", "Bearer "+c.token)
				resp, err := httpc.Do(req)
				if err != nil {
					time.Sleep(5 * time.Millisecond) // the server is down: this n may or may not exist
					continue
				}
				resp.Body.Close()
				if resp.StatusCode == http.StatusOK {
					c.acked = append(c.acked, n)
				}
			}
		}()
	}

	for k := 0; k < kills; k++ {
		time.Sleep(time.Duration(150+intn(600)) * time.Millisecond)
		cmd.Process.Signal(syscall.SIGKILL)
		cmd.Wait()
		if intn(4) == 0 {
			time.Sleep(time.Duration(intn(300)) * time.Millisecond) // down a while
		}
		hs, cmd = startServe(t, bin, config)
		base.Store(hs)
	}
	time.Sleep(300 * time.Millisecond)
	close(stop)
	wg.Wait()

	// Every acknowledged send must reach every interested AS.
	missing := func() []string {
		var out []string
		for _, c := range []*crashClient{alice, bob} {
			for _, name := range interested[c.room] {
				a := ases[name]
				a.mu.Lock()
				for _, n := range c.acked {
					if !a.events[c.room+"|"+strconv.Itoa(n)] {
						out = append(out, fmt.Sprintf("%s: %s #%d", name, c.user, n))
					}
				}
				a.mu.Unlock()
			}
		}
		return out
	}
	deadline := time.Now().Add(60 * time.Second)
	for m := missing(); len(m) > 0; m = missing() {
		if time.Now().After(deadline) {
			t.Fatalf("seed %d: %d acknowledged deliveries never arrived, e.g. %v", seed, len(m), m[:min(len(m), 10)])
		}
		time.Sleep(50 * time.Millisecond)
	}
	var deliveries, txns int
	for name, a := range ases {
		a.mu.Lock()
		txns += len(a.bodies)
		if len(a.diff) > 0 {
			t.Errorf("seed %d: %s saw txnIds with two different bodies: %v", seed, name, a.diff)
		}
		if len(a.dupTxn) > 0 {
			t.Errorf("seed %d: %s got events again under a new txnId: %v", seed, name, a.dupTxn[:min(len(a.dupTxn), 10)])
		}
		for room, ns := range a.order {
			deliveries += len(ns)
			for i := 1; i < len(ns); i++ {
				if ns[i] <= ns[i-1] {
					t.Errorf("seed %d: %s got %s's #%d after #%d", seed, name, room, ns[i], ns[i-1])
					break
				}
			}
		}
		for room := range a.order {
			ok := false
			for _, r := range interested[room] {
				ok = ok || r == name
			}
			if !ok {
				t.Errorf("%s got events of %s, which it is not interested in", name, room)
			}
		}
		a.mu.Unlock()
	}
	t.Logf("%d kills; sent %d+%d, acknowledged %d+%d; %d deliveries in %d transactions; nothing lost",
		kills, alice.sent, bob.sent, len(alice.acked), len(bob.acked), deliveries, txns)
}
