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
// Still to come (issue 19): catch-up of 5,000 events for one AS that was
// down, 1,000 ASes with 200 events spread over them, and order after a
// SIGKILL.
package main

import (
	"context"
	"encoding/json"
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
	senders := flag.Int("senders", 4, "concurrent client sends")
	rounds := flag.Int("rounds", 1, "alternating rounds of stock and asdispatch")
	which := flag.String("servers", "dendrite,dendrite-asdispatch", "binaries to run, in order")
	timeout := flag.Duration("timeout", 10*time.Minute, "give up on one run after this long")
	asJSON := flag.Bool("json", false, "print results as JSON lines")
	logPath := flag.String("server-log", "", "append the servers' logs to this file")
	flag.Parse()
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
			res, err := fanout(ctx, name, bin, *ases, *events, *senders, *timeout, logw)
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
	ASes          int     `json:"ases"`
	Events        int     `json:"events"`
	StartupS      float64 `json:"startup_s"`
	AcceptedPerS  float64 `json:"accepted_events_per_s"`
	DeliveredPerS float64 `json:"delivered_events_per_s"` // AS-events per second, first send to last delivery
	P50LatencyMS  float64 `json:"p50_latency_ms"`
	P99LatencyMS  float64 `json:"p99_latency_ms"`
	Transactions  int     `json:"transactions"`
	Duplicates    int     `json:"duplicate_events"`
}

func (r result) String() string {
	return fmt.Sprintf("%-20s ases=%d events=%d startup=%.1fs accepted=%.1f ev/s delivered=%.1f AS-ev/s p50=%.0fms p99=%.0fms txns=%d dup=%d",
		r.Server, r.ASes, r.Events, r.StartupS, r.AcceptedPerS, r.DeliveredPerS, r.P50LatencyMS, r.P99LatencyMS, r.Transactions, r.Duplicates)
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
}

func (s *sink) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	rest, ok := strings.CutPrefix(r.URL.Path, "/as")
	n, err := strconv.Atoi(strings.SplitN(rest, "/", 2)[0])
	if !ok || err != nil || n >= len(s.got) || r.Header.Get("Authorization") != "Bearer hs-"+strconv.Itoa(n) {
		w.WriteHeader(403)
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
	s.txns++
	for _, e := range txn.Events {
		if e.Type != "m.room.message" {
			continue
		}
		if _, seen := s.got[n][e.Content.Body]; seen {
			s.dups++
			continue
		}
		s.got[n][e.Content.Body] = now
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

func fanout(ctx context.Context, name, bin string, ases, events, senders int, timeout time.Duration, logw io.Writer) (result, error) {
	res := result{Server: name, ASes: ases, Events: events}
	dir, err := os.MkdirTemp("", "dendrite-bench-")
	if err != nil {
		return res, err
	}
	defer os.RemoveAll(dir)
	sk := &sink{got: make([]map[string]time.Time, ases), complete: make(chan struct{}), want: events}
	for i := range sk.got {
		sk.got[i] = map[string]time.Time{}
	}
	srv := httptest.NewServer(sk)
	defer srv.Close()
	var regs []string
	for i := 0; i < ases; i++ {
		p := filepath.Join(dir, fmt.Sprintf("as%d.yaml", i))
		body := fmt.Sprintf("id: as%d\nurl: %q\nas_token: as-%d\nhs_token: hs-%d\nsender_localpart: bot%d\nnamespaces:\n  users: [{exclusive: false, regex: \"@bench_.*\"}]\n",
			i, fmt.Sprintf("%s/as%d", srv.URL, i), i, i, i)
		if err := os.WriteFile(p, []byte(body), 0o600); err != nil {
			return res, err
		}
		regs = append(regs, p)
	}
	cfg, err := harness.WriteConfig(dir, harness.Options{Registrations: regs,
		AsDispatch: "data_dir: " + filepath.Join(dir, "asdispatch") + "\n"})
	if err != nil {
		return res, err
	}
	t0 := time.Now()
	hs, err := harness.Start(ctx, bin, cfg, logw)
	if err != nil {
		return res, err
	}
	defer hs.Kill()
	res.StartupS = time.Since(t0).Seconds()
	tok, err := harness.Register(ctx, hs.URL, "bench_alice", "bench password")
	if err != nil {
		return res, err
	}
	c := hs.URL + "/_matrix/client/v3"
	out, err := harness.Call(ctx, "POST", c+"/createRoom", tok, map[string]any{"preset": "public_chat"})
	if err != nil {
		return res, err
	}
	room, _ := out["room_id"].(string)

	sent := make([]time.Time, events)
	jobs := make(chan int)
	errc := make(chan error, senders)
	var wg sync.WaitGroup
	start := time.Now()
	for w := 0; w < senders; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range jobs {
				sent[i] = time.Now()
				u := fmt.Sprintf("%s/rooms/%s/send/m.room.message/t%d", c, url.PathEscape(room), i)
				if _, err := harness.Call(ctx, "PUT", u, tok, map[string]any{"msgtype": "m.text", "body": "m" + strconv.Itoa(i)}); err != nil {
					errc <- err
					return
				}
			}
		}()
	}
	for i := 0; i < events; i++ {
		jobs <- i
	}
	close(jobs)
	wg.Wait()
	select {
	case err := <-errc:
		return res, err
	default:
	}
	accepted := time.Since(start)
	res.AcceptedPerS = float64(events) / accepted.Seconds()
	select {
	case <-sk.complete:
	case <-time.After(timeout):
		sk.mu.Lock()
		defer sk.mu.Unlock()
		return res, fmt.Errorf("after %s only %d of %d ASes had all %d events", timeout, sk.done, ases, events)
	}
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
	res.DeliveredPerS = float64(events*ases) / last.Sub(start).Seconds()
	res.P50LatencyMS = lat[len(lat)/2]
	res.P99LatencyMS = lat[len(lat)*99/100]
	res.Transactions, res.Duplicates = sk.txns, sk.dups
	if err := hs.Stop(20 * time.Second); err != nil {
		return res, fmt.Errorf("stop: %w", err)
	}
	return res, nil
}
