package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http/httptest"
	"net/url"
	"os"
	"path/filepath"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/matrix-org/dendrite/contrib/asdispatch/internal/harness"
)

// group is one sending user with its own room; the ASes of the group are
// interested in that user (and so in its room, where it is the only member).
type group struct {
	tok  string
	room string
}

// run is one server with its ASes, users and rooms, ready to send.
type run struct {
	dir    string
	cfg    string
	sk     *sink
	srv    *httptest.Server
	hs     *harness.Server
	cs     string // client-server API base
	groups []group
	fds    *fdWatch
	// retries counts client sends answered 5xx and sent again.
	retries atomic.Int64
}

func (r *run) close() {
	if r == nil {
		return
	}
	if r.fds != nil {
		r.fds.stop()
	}
	if r.hs != nil {
		r.hs.Kill()
	}
	if r.srv != nil {
		r.srv.Close()
	}
	os.RemoveAll(r.dir)
}

// wants is how many of events messages, sent round-robin by groups users,
// each of ases ASes gets (AS n follows user n mod groups).
func wants(ases, groups, events int) []int {
	w := make([]int, ases)
	for n := range w {
		g := n % groups
		if g < events {
			w[n] = (events - g + groups - 1) / groups
		}
	}
	return w
}

// start sets up a server with ases registrations, AS n interested in user
// bench_g<n mod groups>, each user with a room of its own.
//
// The users and rooms are created first, by the server without
// registrations (stopped after): the ASes are added to a server that
// already has its users, as an operator adds bridges. Then the server
// starts with the registrations (the start-up timed) and each user sends a
// warm-up message; once every AS has its group's, nothing of the set-up is
// left in any server's appservice consumers and the clock can start.
// (Creating the rooms with stock Dendrite's 1,000 consumers already running
// failed here: JetStream publishes timed out and createRoom answered 500.)
func start(ctx context.Context, bin string, o options, res *result) (*run, error) {
	dir, err := os.MkdirTemp("", "dendrite-bench-")
	if err != nil {
		return nil, err
	}
	r := &run{dir: dir}
	r.sk = newSink(wants(o.ases, o.groups, o.events))
	r.srv = httptest.NewServer(r.sk)
	var regs []string
	for i := 0; i < o.ases; i++ {
		p := filepath.Join(dir, fmt.Sprintf("as%d.yaml", i))
		body := fmt.Sprintf("id: as%d\nurl: %q\nas_token: as-%d\nhs_token: hs-%d\nsender_localpart: bot%d\nnamespaces:\n  users: [{exclusive: false, regex: \"@bench_g%d:.*\"}]\n",
			i, fmt.Sprintf("%s/as%d", r.srv.URL, i), i, i, i, i%o.groups)
		if err := os.WriteFile(p, []byte(body), 0o600); err != nil {
			return r, err
		}
		regs = append(regs, p)
	}
	hopts := harness.Options{LogLevel: o.logLevel, AsDispatch: "data_dir: " + filepath.Join(dir, "asdispatch") + "\n"}
	if r.cfg, err = harness.WriteConfig(dir, hopts); err != nil {
		return r, err
	}
	if r.hs, err = harness.StartWithin(ctx, bin, r.cfg, o.logw, o.timeout); err != nil {
		return r, fmt.Errorf("set-up start: %w", err)
	}
	r.cs = r.hs.URL + "/_matrix/client/v3"
	for g := 0; g < o.groups; g++ {
		tok, err := harness.Register(ctx, r.hs.URL, "bench_g"+strconv.Itoa(g), "bench password")
		if err != nil {
			return r, err
		}
		out, err := harness.Call(ctx, "POST", r.cs+"/createRoom", tok, map[string]any{"preset": "public_chat"})
		if err != nil {
			return r, err
		}
		room, _ := out["room_id"].(string)
		r.groups = append(r.groups, group{tok: tok, room: room})
	}
	if err := r.hs.Stop(time.Minute); err != nil {
		return r, fmt.Errorf("set-up stop: %w", err)
	}

	hopts.Registrations = regs
	if r.cfg, err = harness.WriteConfig(dir, hopts); err != nil {
		return r, err
	}
	t0 := time.Now()
	if r.hs, err = harness.StartWithin(ctx, bin, r.cfg, o.logw, o.timeout); err != nil {
		return r, err
	}
	res.StartupS = time.Since(t0).Seconds()
	r.fds = watchFDs()
	r.fds.pid.Store(int64(r.hs.Cmd.Process.Pid))
	r.cs = r.hs.URL + "/_matrix/client/v3"
	t1 := time.Now()
	for g := range r.groups {
		if err := r.sendOne(ctx, g, "w", "w"); err != nil {
			return r, err
		}
	}
	select {
	case <-r.sk.warmed:
	case <-time.After(o.timeout):
		r.sk.mu.Lock()
		defer r.sk.mu.Unlock()
		return r, fmt.Errorf("warm-up: after %s only %d of %d ASes had their group's first message", o.timeout, r.sk.warmN, o.ases)
	}
	res.WarmupS = time.Since(t1).Seconds()
	return r, nil
}

// sendOne sends one message from group g's user into its room. A 5xx
// answer is retried with the same txnId after a second, as clients do
// (stock Dendrite with 1,000 ASes answers 500 when its JetStream publish
// times out); up to 10 times.
func (r *run) sendOne(ctx context.Context, g int, txnID, body string) error {
	u := fmt.Sprintf("%s/rooms/%s/send/m.room.message/%s", r.cs, url.PathEscape(r.groups[g].room), txnID)
	for try := 0; ; try++ {
		_, err := harness.Call(ctx, "PUT", u, r.groups[g].tok, map[string]any{"msgtype": "m.text", "body": body})
		var se *harness.StatusError
		if err == nil || try == 10 || !errors.As(err, &se) || se.Status < 500 {
			return err
		}
		r.retries.Add(1)
		time.Sleep(time.Second)
	}
}

// send sends messages m0..m<events-1>, message i by group i mod groups,
// senders at a time, and returns when each was sent and when sending began.
func (r *run) send(ctx context.Context, events, senders int) ([]time.Time, time.Time, error) {
	sent := make([]time.Time, events)
	jobs := make(chan int)
	errc := make(chan error, senders)
	var wg sync.WaitGroup
	begin := time.Now()
	for w := 0; w < senders; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range jobs {
				sent[i] = time.Now()
				if err := r.sendOne(ctx, i%len(r.groups), "t"+strconv.Itoa(i), "m"+strconv.Itoa(i)); err != nil {
					errc <- err
					return
				}
			}
		}()
	}
	for i := 0; i < events; i++ {
		select {
		case jobs <- i:
		case err := <-errc:
			close(jobs)
			wg.Wait()
			return nil, begin, err
		}
	}
	close(jobs)
	wg.Wait()
	select {
	case err := <-errc:
		return nil, begin, err
	default:
	}
	return sent, begin, nil
}

// errStalled: nothing new arrived for the stall time; what is missing is a
// result (a server that lost events), not a failure of the run.
var errStalled = errors.New("stalled")

// wait returns once every AS has every message; errStalled once no
// message arrived for stall; an error after timeout.
func (r *run) wait(timeout, stall time.Duration) error {
	deadline := time.After(timeout)
	t := time.NewTicker(time.Second)
	defer t.Stop()
	for {
		select {
		case <-r.sk.complete:
			return nil
		case <-deadline:
			r.sk.mu.Lock()
			defer r.sk.mu.Unlock()
			return fmt.Errorf("after %s only %d of %d ASes had all their messages (%d AS-messages missing)", timeout, r.sk.done, len(r.sk.got), r.sk.missing())
		case <-t.C:
			r.sk.mu.Lock()
			idle := time.Since(r.sk.lastNew)
			r.sk.mu.Unlock()
			if idle > stall {
				return errStalled
			}
		}
	}
}

// fdWatch samples the open file descriptors of the server (pid, which a
// restart changes) and of this driver.
type fdWatch struct {
	pid          atomic.Int64
	mu           sync.Mutex
	server, self int
	quit         chan struct{}
	done         chan struct{}
}

func watchFDs() *fdWatch {
	w := &fdWatch{quit: make(chan struct{}), done: make(chan struct{})}
	go func() {
		defer close(w.done)
		t := time.NewTicker(200 * time.Millisecond)
		defer t.Stop()
		for {
			s, m := countFDs(strconv.FormatInt(w.pid.Load(), 10)), countFDs("self")
			w.mu.Lock()
			w.server, w.self = max(w.server, s), max(w.self, m)
			w.mu.Unlock()
			select {
			case <-w.quit:
				return
			case <-t.C:
			}
		}
	}()
	return w
}

func (w *fdWatch) stop() {
	select {
	case <-w.quit:
	default:
		close(w.quit)
	}
	<-w.done
}

// peaks returns the highest counts seen (0 where /proc is not there).
func (w *fdWatch) peaks() (server, self int) {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.server, w.self
}

func countFDs(pid string) int {
	es, err := os.ReadDir("/proc/" + pid + "/fd")
	if err != nil {
		return 0
	}
	return len(es)
}

// logTo opens the --server-log file (nil: discard).
func logTo(path string) (io.Writer, func(), error) {
	if path == "" {
		return nil, func() {}, nil
	}
	f, err := os.OpenFile(path, os.O_CREATE|os.O_APPEND|os.O_WRONLY, 0o644)
	if err != nil {
		return nil, nil, err
	}
	return f, func() { f.Close() }, nil
}
