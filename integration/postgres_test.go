package integration

import (
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/asdispatch/asdispatch/txnstore/pgtest"
)

// recordingAS is an AS that checks hs_token and records, per txn id, the
// body first accepted and the message bodies in the order first delivered.
type recordingAS struct {
	t     *testing.T
	token string
	srv   *httptest.Server

	mu      sync.Mutex
	txns    map[string]string // txn id -> body
	inTxn   map[string]string // message body -> txn id that delivered it
	order   []string          // message bodies, in order of first delivery
	retries int
}

func newRecordingAS(t *testing.T, token string) *recordingAS {
	a := &recordingAS{t: t, token: token, txns: map[string]string{}, inTxn: map[string]string{}}
	a.srv = httptest.NewServer(http.HandlerFunc(a.serve))
	t.Cleanup(a.srv.Close)
	return a
}

func (a *recordingAS) serve(w http.ResponseWriter, r *http.Request) {
	if r.Header.Get("Authorization") != "Bearer "+a.token {
		a.t.Errorf("request without our hs_token: %s %s", r.Method, r.URL.Path)
		w.WriteHeader(http.StatusForbidden)
		return
	}
	id, ok := strings.CutPrefix(r.URL.Path, "/_matrix/app/v1/transactions/")
	if r.Method != http.MethodPut || !ok {
		w.WriteHeader(http.StatusNotFound)
		return
	}
	var raw json.RawMessage
	if err := json.NewDecoder(r.Body).Decode(&raw); err != nil {
		a.t.Errorf("txn %s: body is not JSON: %v", id, err)
		w.WriteHeader(http.StatusBadRequest)
		return
	}
	var txn struct {
		Events []struct {
			Type    string `json:"type"`
			Content struct {
				Body string `json:"body"`
			} `json:"content"`
		} `json:"events"`
	}
	_ = json.Unmarshal(raw, &txn)
	a.mu.Lock()
	defer a.mu.Unlock()
	if prev, seen := a.txns[id]; seen {
		a.retries++
		if prev != string(raw) {
			a.t.Errorf("txn %s sent again with a different body:\nfirst %s\nnow   %s", id, prev, raw)
		}
		w.Write([]byte("{}"))
		return
	}
	a.txns[id] = string(raw)
	for _, e := range txn.Events {
		if e.Type != "m.room.message" {
			continue
		}
		if other, dup := a.inTxn[e.Content.Body]; dup {
			a.t.Errorf("message %q delivered in txn %s and again in txn %s", e.Content.Body, other, id)
			continue
		}
		a.inTxn[e.Content.Body] = id
		a.order = append(a.order, e.Content.Body)
	}
	w.Write([]byte("{}"))
}

func (a *recordingAS) delivered() []string {
	a.mu.Lock()
	defer a.mu.Unlock()
	return append([]string(nil), a.order...)
}

// TestMultiProcessPostgres runs three serve processes on one PostgreSQL
// database with two ASes, submits messages through all three, kills the
// process sending for the first AS with SIGKILL midway, and checks that
// the sending moved to a survivor and, once the killed process is back
// (a 200 means "in that process's log": it hands over on restart what it
// had not), that every acknowledged message reaches each interested AS
// once (a retry repeats its txn id and body), in each process's order.
//
// The stub homeserver's own state (users, rooms) is per process, so each
// process gets its own user and room; the ASes are interested by sender.
func TestMultiProcessPostgres(t *testing.T) {
	dsn := pgtest.Schema(t)
	db := pgtest.Open(t, dsn)
	bin := buildBinary(t)
	dir := t.TempDir()

	all := newRecordingAS(t, "hs-all")   // every user
	even := newRecordingAS(t, "hs-even") // u0 and u2
	var regs []string
	for _, r := range []struct {
		id, regex string
		as        *recordingAS
	}{{"all", `@u[0-9]:localhost`, all}, {"even", `@u[02]:localhost`, even}} {
		path := filepath.Join(dir, r.id+".yaml")
		reg := fmt.Sprintf("id: %s\nurl: %q\nas_token: as-%s\nhs_token: %s\nsender_localpart: %sbot\nnamespaces:\n  users:\n    - exclusive: false\n      regex: %q\n",
			r.id, r.as.srv.URL, r.id, r.as.token, r.id, r.regex)
		if err := os.WriteFile(path, []byte(reg), 0o600); err != nil {
			t.Fatal(err)
		}
		regs = append(regs, path)
	}

	const procs = 3
	type proc struct {
		url    string
		config string
		pid    int
		kill   func()
		token  string
		room   string
	}
	ps := make([]*proc, procs)
	for i := range ps {
		config := filepath.Join(dir, fmt.Sprintf("hs%d.yaml", i))
		cfg := fmt.Sprintf("server_name: localhost\nlisten: 127.0.0.1:0\ndata_dir: %s\napp_service_config_files:\n  - %s\n  - %s\n"+
			"appservice:\n  retry_initial: 100ms\n  txn_timeout: 3s\ndatabase:\n  backend: postgres\n  dsn: %q\n  lease_ttl: 2s\n",
			filepath.Join(dir, fmt.Sprintf("data%d", i)), regs[0], regs[1], dsn)
		if err := os.WriteFile(config, []byte(cfg), 0o600); err != nil {
			t.Fatal(err)
		}
		addr, cmd := startServe(t, bin, config)
		p := &proc{url: addr, config: config, pid: cmd.Process.Pid, kill: func() { cmd.Process.Signal(syscall.SIGKILL); cmd.Wait() }}
		p.token = call(t, "POST", addr+"/_matrix/client/v3/register", "", map[string]any{"username": fmt.Sprintf("u%d", i), "password": "pw"})["access_token"].(string)
		p.room = call(t, "POST", addr+"/_matrix/client/v3/createRoom", p.token, map[string]any{"name": "r"})["room_id"].(string)
		ps[i] = p
	}

	// owner returns the pid of the process holding as's sender lease.
	owner := func(as string) int {
		t.Helper()
		var o string
		err := db.QueryRow(`SELECT l.owner FROM leases l JOIN appservices a ON a.as_key = l.as_key WHERE a.id = $1`, as).Scan(&o)
		if err != nil {
			return 0
		}
		parts := strings.Split(o, "/")
		pid, _ := strconv.Atoi(parts[len(parts)-2])
		return pid
	}
	victim := -1
	for deadline := time.Now().Add(10 * time.Second); victim < 0; time.Sleep(50 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("no process took the lease of AS all")
		}
		for i, p := range ps {
			if owner("all") == p.pid {
				victim = i
			}
		}
	}
	t.Logf("process %d (pid %d) sends for AS all; it will be killed", victim, ps[victim].pid)

	const perProc = 40
	acked := make([][]string, procs)
	killed := make(chan struct{})
	var wg sync.WaitGroup
	for i, p := range ps {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for n := 0; n < perProc; n++ {
				body := fmt.Sprintf("p%d-%d", i, n)
				u := p.url + "/_matrix/client/v3/rooms/" + url.PathEscape(p.room) + "/send/m.room.message/" + strconv.Itoa(n)
				js, _ := json.Marshal(map[string]any{"msgtype": "m.text", "body": body})
				req, _ := http.NewRequest("PUT", u, strings.NewReader(string(js)))
				req.Header.Set("Authorization", "Bearer "+p.token)
				resp, err := http.DefaultClient.Do(req)
				if err != nil {
					if i == victim {
						return // killed: what it acknowledged is what counts
					}
					t.Errorf("process %d: %v", i, err)
					return
				}
				resp.Body.Close()
				if resp.StatusCode != 200 {
					t.Errorf("process %d: send %s: %d", i, body, resp.StatusCode)
					return
				}
				acked[i] = append(acked[i], body)
				if i == victim && n == perProc/2 {
					p.kill()
					close(killed)
				}
				time.Sleep(10 * time.Millisecond)
			}
		}()
	}
	wg.Wait()
	select {
	case <-killed:
	default:
		t.Fatal("the victim was never killed")
	}
	// Once a survivor sends for AS all, the victim comes back and hands
	// over what its log has and the dispatcher does not.
	for deadline := time.Now().Add(15 * time.Second); ; time.Sleep(50 * time.Millisecond) {
		if pid := owner("all"); pid != 0 && pid != ps[victim].pid {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("no survivor took over AS all")
		}
	}
	startServe(t, bin, ps[victim].config)

	wants := map[*recordingAS]map[int]bool{all: {0: true, 1: true, 2: true}, even: {0: true, 2: true}}
	for as, from := range wants {
		want := 0
		for i := range ps {
			if from[i] {
				want += len(acked[i])
			}
		}
		deadline := time.Now().Add(30 * time.Second)
		for {
			got := map[string]bool{}
			for _, b := range as.delivered() {
				got[b] = true
			}
			missing := 0
			for i := range ps {
				if from[i] {
					for _, b := range acked[i] {
						if !got[b] {
							missing++
						}
					}
				}
			}
			if missing == 0 {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("AS %s: %d of %d acknowledged messages never delivered", as.token, missing, want)
			}
			time.Sleep(50 * time.Millisecond)
		}
		// Each process's messages arrive in the order it committed them.
		pos := map[string]int{}
		for i, b := range as.delivered() {
			pos[b] = i
		}
		for i := range ps {
			if !from[i] {
				continue
			}
			for n := 1; n < len(acked[i]); n++ {
				if pos[acked[i][n]] < pos[acked[i][n-1]] {
					t.Errorf("AS %s: %s delivered before %s", as.token, acked[i][n], acked[i][n-1])
				}
			}
		}
		as.mu.Lock()
		t.Logf("AS %s: %d messages in %d txns, %d retried txns", as.token, len(as.order), len(as.txns), as.retries)
		as.mu.Unlock()
	}
	if pid := owner("all"); pid == ps[victim].pid || pid == 0 {
		t.Errorf("AS all's lease is with pid %d, not with a survivor", pid)
	}
	for i, p := range ps {
		if i != victim && owner("all") == p.pid {
			t.Logf("process %d (pid %d) took over AS all", i, p.pid)
		}
	}
}
