// Command dendrite-bench runs the same workload against stock Dendrite and
// dendrite-asdispatch (same version, same dependencies, same generated
// config and registrations), alternating, and prints what each delivered.
//
// Workload "fanout": --ases application services on one loopback HTTP
// server (each its own URL path and hs_token), all interested in one
// user's messages (a non-exclusive users namespace); the user sends
// --events messages in one room, --senders at a time; the run ends when
// every AS has every message.
//
// Workload "catchup": the same, but the ASes answer 503 while the messages
// are sent, then come back and ping the homeserver; measured from their
// return until each has every message (the figure: 5,000 events
// for one AS, --ases 1 --events 5000).
//
// Still to come (issue 19): 1,000 ASes with 200 events spread over them,
// and order after a SIGKILL.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/matrix-org/dendrite/contrib/asdispatch/internal/harness"
)

func main() {
	ases := flag.Int("ases", 10, "application services, each interested in every message")
	events := flag.Int("events", 200, "messages sent")
	senders := flag.Int("senders", 4, "concurrent client sends (catchup: 1 unless set, so that the send order is the stream order and out-of-order counts are exact)")
	rounds := flag.Int("rounds", 1, "alternating rounds of stock and asdispatch")
	which := flag.String("servers", "dendrite,dendrite-asdispatch", "binaries to run, in order")
	timeout := flag.Duration("timeout", 10*time.Minute, "give up on one run after this long")
	asJSON := flag.Bool("json", false, "print results as JSON lines")
	logPath := flag.String("server-log", "", "append the servers' logs to this file")
	workload := flag.String("workload", "fanout", "fanout (ASes get messages as they are sent) or catchup (ASes down while they are sent, then up)")
	flag.Parse()
	if *workload != "fanout" && *workload != "catchup" {
		fmt.Fprintf(os.Stderr, "unknown -workload %q\n", *workload)
		os.Exit(2)
	}
	if *workload == "catchup" {
		set := false
		flag.Visit(func(f *flag.Flag) { set = set || f.Name == "senders" })
		if !set {
			*senders = 1
		}
	}
	var logw io.Writer
	if *logPath != "" {
		f, err := os.OpenFile(*logPath, os.O_CREATE|os.O_APPEND|os.O_WRONLY, 0o644)
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		defer f.Close()
		logw = f
	}
	ctx := context.Background()
	var results []result
	for r := 0; r < *rounds; r++ {
		for _, name := range strings.Split(*which, ",") {
			bin, err := harness.Build(ctx, harness.Binary(name))
			if err != nil {
				fmt.Fprintln(os.Stderr, err)
				os.Exit(1)
			}
			run := fanout
			if *workload == "catchup" {
				run = catchup
			}
			res, err := run(ctx, name, bin, *ases, *events, *senders, *timeout, logw)
			if err != nil {
				fmt.Fprintf(os.Stderr, "%s: %v\n", name, err)
				os.Exit(1)
			}
			results = append(results, res)
			if *asJSON {
				b, _ := json.Marshal(res)
				fmt.Println(string(b))
			} else {
				fmt.Println(res)
			}
		}
	}
}

type result struct {
	Server        string  `json:"server"`
	Workload      string  `json:"workload"`
	ASes          int     `json:"ases"`
	Events        int     `json:"events"`
	StartupS      float64 `json:"startup_s"`
	AcceptedPerS  float64 `json:"accepted_events_per_s"`
	DeliveredPerS float64 `json:"delivered_events_per_s"` // AS-events per second, first send to last delivery
	P50LatencyMS  float64 `json:"p50_latency_ms"`
	P99LatencyMS  float64 `json:"p99_latency_ms"`
	Transactions  int     `json:"transactions"`
	Duplicates    int     `json:"duplicate_events"`
	OutOfOrder    int     `json:"out_of_order_events"`
	// catch-up only: from the ASes' return to the last delivery, to the
	// first transaction accepted, and from that one to the last.
	CatchupS      float64 `json:"catchup_s,omitempty"`
	FirstAfterUpS float64 `json:"first_after_up_s,omitempty"`
	DrainS        float64 `json:"drain_s,omitempty"`
	Refused       int     `json:"refused_transactions,omitempty"`
	PingStatus    int     `json:"ping_status,omitempty"`
}

func (r result) String() string {
	if r.Workload == "catchup" {
		return fmt.Sprintf("%-20s catchup ases=%d events=%d accepted=%.1f ev/s catch-up=%.2fs (first txn after %.2fs, drain %.2fs) ping=%d refused=%d txns=%d dup=%d out-of-order=%d",
			r.Server, r.ASes, r.Events, r.AcceptedPerS, r.CatchupS, r.FirstAfterUpS, r.DrainS, r.PingStatus, r.Refused, r.Transactions, r.Duplicates, r.OutOfOrder)
	}
	return fmt.Sprintf("%-20s ases=%d events=%d startup=%.1fs accepted=%.1f ev/s delivered=%.1f AS-ev/s p50=%.0fms p99=%.0fms txns=%d dup=%d out-of-order=%d",
		r.Server, r.ASes, r.Events, r.StartupS, r.AcceptedPerS, r.DeliveredPerS, r.P50LatencyMS, r.P99LatencyMS, r.Transactions, r.Duplicates, r.OutOfOrder)
}

// sink is the ASes' HTTP server: /asN/... is AS N.
type sink struct {
	mu       sync.Mutex
	got      []map[string]time.Time // per AS: message body -> first receipt
	txns     int
	dups     int
	complete chan struct{}
	want     int
	done     int
	// down makes every AS answer 503 (catch-up: the AS is away).
	down bool
	// refused counts the transactions answered 503.
	refused int
	// last is each AS's highest message number so far; outOfOrder counts
	// messages that arrived after a higher one (exact with one sender; with
	// several, concurrent sends may be persisted in either order).
	last       []int
	outOfOrder int
	// upAt is when down was cleared; firstAfterUp the first delivery after.
	firstAfterUp time.Time
}

func (s *sink) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	rest, ok := strings.CutPrefix(r.URL.Path, "/as")
	n, err := strconv.Atoi(strings.SplitN(rest, "/", 2)[0])
	if !ok || err != nil || n >= len(s.got) || r.Header.Get("Authorization") != "Bearer hs-"+strconv.Itoa(n) {
		w.WriteHeader(403)
		return
	}
	if r.Method == "POST" && strings.HasSuffix(r.URL.Path, "/_matrix/app/v1/ping") {
		w.Write([]byte("{}"))
		return
	}
	if r.Method != "PUT" || !strings.Contains(r.URL.Path, "/_matrix/app/v1/transactions/") {
		w.WriteHeader(404)
		w.Write([]byte(`{"errcode":"M_NOT_FOUND"}`))
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
	if err := json.NewDecoder(r.Body).Decode(&txn); err != nil {
		w.WriteHeader(400)
		return
	}
	now := time.Now()
	s.mu.Lock()
	if s.down {
		s.refused++
		s.mu.Unlock()
		w.WriteHeader(503)
		return
	}
	s.txns++
	if s.firstAfterUp.IsZero() {
		s.firstAfterUp = now
	}
	for _, e := range txn.Events {
		if e.Type != "m.room.message" {
			continue
		}
		if _, seen := s.got[n][e.Content.Body]; seen {
			s.dups++
			continue
		}
		s.got[n][e.Content.Body] = now
		if i, err := strconv.Atoi(strings.TrimPrefix(e.Content.Body, "m")); err == nil {
			if i < s.last[n] {
				s.outOfOrder++
			}
			s.last[n] = max(s.last[n], i)
		}
		if len(s.got[n]) == s.want {
			s.done++
			if s.done == len(s.got) {
				close(s.complete)
			}
		}
	}
	s.mu.Unlock()
	w.Write([]byte("{}"))
}

// run is one server with its ASes, a user and a room, ready to send.
type run struct {
	dir  string
	sk   *sink
	srv  *httptest.Server
	hs   *harness.Server
	cs   string // client-server API base
	tok  string
	room string
}

func (r *run) close() {
	if r.hs != nil {
		r.hs.Kill()
	}
	if r.srv != nil {
		r.srv.Close()
	}
	os.RemoveAll(r.dir)
}

// start writes ases registrations (each interested in @bench_ users) and
// the config, starts bin, and registers bench_alice with a public room.
func start(ctx context.Context, bin string, ases, events int, logw io.Writer, res *result) (*run, error) {
	dir, err := os.MkdirTemp("", "dendrite-bench-")
	if err != nil {
		return nil, err
	}
	r := &run{dir: dir}
	r.sk = &sink{got: make([]map[string]time.Time, ases), last: make([]int, ases), complete: make(chan struct{}), want: events}
	for i := range r.sk.got {
		r.sk.got[i] = map[string]time.Time{}
		r.sk.last[i] = -1
	}
	r.srv = httptest.NewServer(r.sk)
	var regs []string
	for i := 0; i < ases; i++ {
		p := filepath.Join(dir, fmt.Sprintf("as%d.yaml", i))
		body := fmt.Sprintf("id: as%d\nurl: %q\nas_token: as-%d\nhs_token: hs-%d\nsender_localpart: bot%d\nnamespaces:\n  users: [{exclusive: false, regex: \"@bench_.*\"}]\n",
			i, fmt.Sprintf("%s/as%d", r.srv.URL, i), i, i, i)
		if err := os.WriteFile(p, []byte(body), 0o600); err != nil {
			return r, err
		}
		regs = append(regs, p)
	}
	cfg, err := harness.WriteConfig(dir, harness.Options{Registrations: regs,
		AsDispatch: "data_dir: " + filepath.Join(dir, "asdispatch") + "\n"})
	if err != nil {
		return r, err
	}
	t0 := time.Now()
	r.hs, err = harness.Start(ctx, bin, cfg, logw)
	if err != nil {
		return r, err
	}
	res.StartupS = time.Since(t0).Seconds()
	r.tok, err = harness.Register(ctx, r.hs.URL, "bench_alice", "bench password")
	if err != nil {
		return r, err
	}
	r.cs = r.hs.URL + "/_matrix/client/v3"
	out, err := harness.Call(ctx, "POST", r.cs+"/createRoom", r.tok, map[string]any{"preset": "public_chat"})
	if err != nil {
		return r, err
	}
	r.room, _ = out["room_id"].(string)
	return r, nil
}

// send sends messages m0..m<events-1>, senders at a time, and returns when
// each was sent and when sending began.
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
				u := fmt.Sprintf("%s/rooms/%s/send/m.room.message/t%d", r.cs, url.PathEscape(r.room), i)
				if _, err := harness.Call(ctx, "PUT", u, r.tok, map[string]any{"msgtype": "m.text", "body": "m" + strconv.Itoa(i)}); err != nil {
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

// wait returns once every AS has every message, or an error after timeout.
func (r *run) wait(timeout time.Duration, ases, events int) error {
	select {
	case <-r.sk.complete:
		return nil
	case <-time.After(timeout):
		r.sk.mu.Lock()
		defer r.sk.mu.Unlock()
		return fmt.Errorf("after %s only %d of %d ASes had all %d events", timeout, r.sk.done, ases, events)
	}
}

// fanout: every AS gets every message while they are sent.
func fanout(ctx context.Context, name, bin string, ases, events, senders int, timeout time.Duration, logw io.Writer) (result, error) {
	res := result{Server: name, Workload: "fanout", ASes: ases, Events: events}
	r, err := start(ctx, bin, ases, events, logw, &res)
	defer r.close()
	if err != nil {
		return res, err
	}
	sent, begin, err := r.send(ctx, events, senders)
	if err != nil {
		return res, err
	}
	res.AcceptedPerS = float64(events) / time.Since(begin).Seconds()
	if err := r.wait(timeout, ases, events); err != nil {
		return res, err
	}
	sk := r.sk
	sk.mu.Lock()
	defer sk.mu.Unlock()
	var last time.Time
	var lat []float64
	for _, got := range sk.got {
		for body, at := range got {
			i, _ := strconv.Atoi(strings.TrimPrefix(body, "m"))
			lat = append(lat, float64(at.Sub(sent[i]).Microseconds())/1000)
			if at.After(last) {
				last = at
			}
		}
	}
	slices.Sort(lat)
	res.DeliveredPerS = float64(events*ases) / last.Sub(begin).Seconds()
	res.P50LatencyMS = lat[len(lat)/2]
	res.P99LatencyMS = lat[len(lat)*99/100]
	res.Transactions, res.Duplicates, res.OutOfOrder = sk.txns, sk.dups, sk.outOfOrder
	if err := r.hs.Stop(20 * time.Second); err != nil {
		return res, fmt.Errorf("stop: %w", err)
	}
	return res, nil
}

// catchup: the ASes answer 503 while the messages are sent, then come back;
// measured from their return until each has every message.
func catchup(ctx context.Context, name, bin string, ases, events, senders int, timeout time.Duration, logw io.Writer) (result, error) {
	res := result{Server: name, Workload: "catchup", ASes: ases, Events: events}
	r, err := start(ctx, bin, ases, events, logw, &res)
	defer r.close()
	if err != nil {
		return res, err
	}
	r.sk.mu.Lock()
	r.sk.down = true
	r.sk.mu.Unlock()
	_, begin, err := r.send(ctx, events, senders)
	if err != nil {
		return res, err
	}
	res.AcceptedPerS = float64(events) / time.Since(begin).Seconds()
	r.sk.mu.Lock()
	r.sk.down = false
	r.sk.firstAfterUp = time.Time{}
	up := time.Now()
	r.sk.mu.Unlock()
	// A returning AS pings the homeserver (Matrix 1.7), as bridges do at
	// start-up; stock Dendrite v0.13.8 has no such endpoint (404).
	for i := 0; i < ases; i++ {
		u := fmt.Sprintf("%s/_matrix/client/v1/appservice/as%d/ping", r.hs.URL, i)
		_, err := harness.Call(ctx, "POST", u, "as-"+strconv.Itoa(i), map[string]any{"transaction_id": "bench"})
		var se *harness.StatusError
		switch {
		case err == nil:
			res.PingStatus = 200
		case errors.As(err, &se):
			res.PingStatus = se.Status
		default:
			return res, fmt.Errorf("ping: %w", err)
		}
	}
	if err := r.wait(timeout, ases, events); err != nil {
		return res, err
	}
	sk := r.sk
	sk.mu.Lock()
	defer sk.mu.Unlock()
	var last time.Time
	for _, got := range sk.got {
		for _, at := range got {
			if at.After(last) {
				last = at
			}
		}
	}
	res.CatchupS = last.Sub(up).Seconds()
	res.FirstAfterUpS = sk.firstAfterUp.Sub(up).Seconds()
	res.DrainS = last.Sub(sk.firstAfterUp).Seconds()
	res.DeliveredPerS = float64(events*ases) / res.CatchupS
	res.Refused = sk.refused
	res.Transactions, res.Duplicates, res.OutOfOrder = sk.txns, sk.dups, sk.outOfOrder
	if err := r.hs.Stop(20 * time.Second); err != nil {
		return res, fmt.Errorf("stop: %w", err)
	}
	return res, nil
}
