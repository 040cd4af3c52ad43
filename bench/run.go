package bench

import (
	"bytes"
	"context"
	"database/sql"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	_ "github.com/mattn/go-sqlite3" // the limit's raw inserts

	"github.com/asdispatch/asdispatch/dispatcher"
	"github.com/asdispatch/asdispatch/namespace"
	"github.com/asdispatch/asdispatch/queue"
	"github.com/asdispatch/asdispatch/registry"
)

// Figure is one measured quantity, beside its references where it has them
// (0 when it has none).
type Figure struct {
	Name     string  `json:"name"`
	Unit     string  `json:"unit"`
	Value    float64 `json:"value"`
	Baseline float64 `json:"baseline,omitempty"`
	Limit    float64 `json:"limit,omitempty"`
}

// Report is a whole run.
type Report struct {
	Config  Config   `json:"config"`
	Figures []Figure `json:"figures"`
}

// Progress is told what the run is doing; done of total steps.
type Progress func(stage string, done, total int)

// asServer is one AS on 127.0.0.1 that checks the hs_token and counts the
// events it accepts, sampling their latency.
type asServer struct {
	token    string
	events   atomic.Int64
	mu       sync.Mutex
	latency  []time.Duration
	srv      *http.Server
	url      string
	maxDelay time.Duration
}

var tMarker = []byte(`"t":`)

func (a *asServer) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if r.Header.Get("Authorization") != "Bearer "+a.token {
		w.WriteHeader(http.StatusForbidden)
		return
	}
	body, _ := io.ReadAll(r.Body)
	now := time.Now().UnixNano()
	var n int64
	var sample []time.Duration
	for rest := body; ; {
		i := bytes.Index(rest, tMarker)
		if i < 0 {
			break
		}
		rest = rest[i+len(tMarker):]
		j := bytes.IndexByte(rest, ',')
		if j < 0 {
			break
		}
		if n%8 == 0 {
			if t, err := strconv.ParseInt(string(rest[:j]), 10, 64); err == nil {
				sample = append(sample, time.Duration(now-t))
			}
		}
		n++
	}
	a.events.Add(n)
	a.mu.Lock()
	a.latency = append(a.latency, sample...)
	a.mu.Unlock()
	w.Write([]byte("{}"))
}

func startAS(i int) (*asServer, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	a := &asServer{token: fmt.Sprintf("bench-hs-%d", i), url: "http://" + ln.Addr().String()}
	a.srv = &http.Server{Handler: a}
	go a.srv.Serve(ln)
	return a, nil
}

// roomState serves the generated rooms to the dispatcher.
type roomState struct{ c *Config }

func (s roomState) JoinedLocalMembers(_ context.Context, roomID string) ([]string, error) {
	var r int
	fmt.Sscanf(roomID, "!room%d:", &r)
	var out []string
	for _, i := range s.c.roomASes(r) {
		out = append(out, fmt.Sprintf("@_as%d_ghost%d:bench.example.org", i, r))
	}
	for m := len(out); m < s.c.MembersPerRoom; m++ {
		out = append(out, fmt.Sprintf("@user%d_%d:bench.example.org", r, m))
	}
	return out, nil
}

func (roomState) LocalAliases(context.Context, string) ([]string, error) { return nil, nil }
func (roomState) IsLocalUser(u string) bool                              { return true }

// Run measures cfg and reports every figure.
func Run(ctx context.Context, cfg Config, progress Progress) (*Report, error) {
	cfg.defaults()
	if progress == nil {
		progress = func(string, int, int) {}
	}
	servers := make([]*asServer, cfg.ASes)
	for i := range servers {
		a, err := startAS(i)
		if err != nil {
			return nil, fmt.Errorf("bench: start AS: %w", err)
		}
		servers[i] = a
		defer a.srv.Close()
	}
	set, pats, err := buildSet(cfg.ASes, func(i int) string { return servers[i].url }, func(i int) string { return servers[i].token })
	if err != nil {
		return nil, fmt.Errorf("bench: registrations: %w", err)
	}
	rep := &Report{Config: cfg}
	steps := 2 + 3*cfg.Rounds
	step := 0
	next := func(stage string) { step++; progress(stage, step, steps) }

	next("matcher")
	rep.Figures = append(rep.Figures, matcherFigure(set, pats, cfg))

	var submit, e2e, p50, p99, pmax, limInsert, limPut, base []float64
	for round := 0; round < cfg.Rounds; round++ {
		next(fmt.Sprintf("end to end, round %d", round+1))
		r, err := endToEnd(ctx, cfg, set, servers)
		if err != nil {
			return nil, err
		}
		submit, e2e = append(submit, r.submitRate), append(e2e, r.e2eRate)
		p50, p99, pmax = append(p50, r.p50), append(p99, r.p99), append(pmax, r.max)
		next(fmt.Sprintf("limit, round %d", round+1))
		ins, put, err := limit(ctx, cfg, servers)
		if err != nil {
			return nil, err
		}
		limInsert, limPut = append(limInsert, ins), append(limPut, put)
		next(fmt.Sprintf("baseline, round %d", round+1))
		b, err := baseline(ctx, cfg, pats, servers)
		if err != nil {
			return nil, err
		}
		base = append(base, b)
	}
	next("done")
	limitE2E := min(median(limInsert), median(limPut))
	rep.Figures = append(rep.Figures,
		Figure{Name: "durable Submit", Unit: "events/s", Value: median(submit), Baseline: median(base), Limit: median(limInsert)},
		Figure{Name: "end to end (acknowledged by every interested AS)", Unit: "events/s", Value: median(e2e), Baseline: median(base), Limit: limitE2E},
		Figure{Name: "latency Submit to AS, p50", Unit: "ms", Value: median(p50)},
		Figure{Name: "latency Submit to AS, p99", Unit: "ms", Value: median(p99)},
		Figure{Name: "latency Submit to AS, max", Unit: "ms", Value: median(pmax)},
	)
	return rep, nil
}

func median(v []float64) float64 {
	if len(v) == 0 {
		return 0
	}
	s := slices.Clone(v)
	slices.Sort(s)
	return s[len(s)/2]
}

// matcherFigure times lookups of the indexed matcher and of the plain
// per-regex loop on the same IDs.
func matcherFigure(set *registry.Set, pats []namespace.Pattern, cfg Config) Figure {
	ids := make([]string, 1024)
	for i := range ids {
		switch i % 3 {
		case 0:
			ids[i] = fmt.Sprintf("@_as%d_ghost:bench.example.org", i%cfg.ASes)
		case 1:
			ids[i] = fmt.Sprintf("@u%d:as%d.bridge.example.org", i, i%cfg.ASes)
		default:
			ids[i] = fmt.Sprintf("@alice%d:bench.example.org", i)
		}
	}
	var buf []namespace.Hit
	rate := func(n int, f func(id string)) float64 {
		start := time.Now()
		for i := 0; i < n; i++ {
			f(ids[i%len(ids)])
		}
		return float64(n) / time.Since(start).Seconds()
	}
	indexed := rate(500000, func(id string) { buf = set.UsersInterested(buf[:0], id) })
	plain, _ := namespace.NewPlain(pats)
	base := rate(max(20, 1000000/len(pats)), func(id string) { buf = plain.AppendMatch(buf[:0], namespace.Users, id) })
	return Figure{Name: "matcher lookups", Unit: "lookups/s", Value: indexed, Baseline: base}
}

type e2eResult struct {
	submitRate, e2eRate, p50, p99, max float64
}

func endToEnd(ctx context.Context, cfg Config, set *registry.Set, servers []*asServer) (*e2eResult, error) {
	dir, err := os.MkdirTemp("", "asdispatch-bench-")
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(dir)
	for _, s := range servers {
		s.events.Store(0)
		s.mu.Lock()
		s.latency = s.latency[:0]
		s.mu.Unlock()
	}
	d, err := dispatcher.New(ctx, dispatcher.Config{Registry: registry.NewRegistry(set), DataDir: dir, RoomState: roomState{&cfg},
		Queue: queue.Options{MaxEvents: cfg.MaxEventsPerTxn, MaxBytes: cfg.MaxTxnBytes, RetryInitial: 100 * time.Millisecond}})
	if err != nil {
		return nil, err
	}
	defer d.Close(context.Background())
	var want int64
	for e := 0; e < cfg.Events; e++ {
		want += int64(len(cfg.roomASes(e % cfg.Rooms)))
	}
	const writers, batch = 8, 50
	start := time.Now()
	var wg sync.WaitGroup
	errc := make(chan error, writers)
	for w := 0; w < writers; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			evs := make([]dispatcher.Event, 0, batch)
			for e := w; e < cfg.Events; e += writers {
				room := fmt.Sprintf("!room%d:bench.example.org", e%cfg.Rooms)
				id := fmt.Sprintf("$e%d", e)
				sender := fmt.Sprintf("@user%d_%d:bench.example.org", e%cfg.Rooms, cfg.ASes)
				evs = append(evs, dispatcher.Event{ID: id, RoomID: room, Type: "m.room.message", Sender: sender,
					JSON: eventJSON(id, room, sender, cfg.EventSize, time.Now().UnixNano())})
				if len(evs) == batch || e+writers >= cfg.Events {
					if err := d.Submit(ctx, evs...); err != nil {
						errc <- err
						return
					}
					evs = evs[:0]
				}
			}
		}()
	}
	wg.Wait()
	submitted := time.Since(start)
	select {
	case err := <-errc:
		return nil, fmt.Errorf("bench: submit: %w", err)
	default:
	}
	deadline := time.Now().Add(10 * time.Minute)
	for {
		var got int64
		for _, s := range servers {
			got += s.events.Load()
		}
		if got >= want {
			break
		}
		if time.Now().After(deadline) {
			return nil, fmt.Errorf("bench: only %d of %d deliveries arrived", got, want)
		}
		time.Sleep(time.Millisecond)
	}
	total := time.Since(start)
	var lat []time.Duration
	for _, s := range servers {
		s.mu.Lock()
		lat = append(lat, s.latency...)
		s.mu.Unlock()
	}
	slices.Sort(lat)
	ms := func(q float64) float64 {
		if len(lat) == 0 {
			return 0
		}
		return float64(lat[min(len(lat)-1, int(q*float64(len(lat))))]) / 1e6
	}
	return &e2eResult{
		submitRate: float64(cfg.Events) / submitted.Seconds(),
		e2eRate:    float64(cfg.Events) / total.Seconds(),
		p50:        ms(0.50), p99: ms(0.99), max: ms(1),
	}, nil
}

// limit measures what this machine can do with the same bytes and nothing
// else: raw SQLite inserts (same durability, 1000 rows a commit) and raw
// loopback PUTs of 100-event bodies to the same servers, one in flight per
// AS. Both are in events/s of the workload.
func limit(ctx context.Context, cfg Config, servers []*asServer) (insertRate, putRate float64, err error) {
	dir, err := os.MkdirTemp("", "asdispatch-limit-")
	if err != nil {
		return 0, 0, err
	}
	defer os.RemoveAll(dir)
	db, err := sql.Open("sqlite3", "file:"+filepath.Join(dir, "raw.db")+"?_journal_mode=WAL&_synchronous=FULL")
	if err != nil {
		return 0, 0, err
	}
	defer db.Close()
	db.SetMaxOpenConns(1)
	if _, err := db.ExecContext(ctx, `CREATE TABLE raw (seq INTEGER PRIMARY KEY, data BLOB)`); err != nil {
		return 0, 0, err
	}
	data := eventJSON("$x", "!room0:bench.example.org", "@u:bench.example.org", cfg.EventSize, 0)
	start := time.Now()
	for done := 0; done < cfg.Events; {
		tx, err := db.BeginTx(ctx, nil)
		if err != nil {
			return 0, 0, err
		}
		for i := 0; i < 1000 && done < cfg.Events; i, done = i+1, done+1 {
			if _, err := tx.Exec(`INSERT INTO raw (data) VALUES (?)`, data); err != nil {
				tx.Rollback()
				return 0, 0, err
			}
		}
		if err := tx.Commit(); err != nil {
			return 0, 0, err
		}
	}
	insertRate = float64(cfg.Events) / time.Since(start).Seconds()

	body := bytes.NewBufferString(`{"events":[`)
	for i := 0; i < cfg.MaxEventsPerTxn; i++ {
		if i > 0 {
			body.WriteByte(',')
		}
		body.Write(eventJSON(fmt.Sprintf("$%d", i), "!r:x", "@u:x", cfg.EventSize, 0))
	}
	body.WriteString(`]}`)
	perAS := cfg.Events * len(cfg.roomASes(0)) / cfg.ASes / cfg.MaxEventsPerTxn
	client := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: 2}}
	start = time.Now()
	var wg sync.WaitGroup
	for _, s := range servers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; i < max(1, perAS); i++ {
				req, _ := http.NewRequestWithContext(ctx, http.MethodPut, fmt.Sprintf("%s/_matrix/app/v1/transactions/limit%d", s.url, i), bytes.NewReader(body.Bytes()))
				req.Header.Set("Authorization", "Bearer "+s.token)
				req.Header.Set("Content-Type", "application/json")
				if resp, err := client.Do(req); err == nil {
					io.Copy(io.Discard, resp.Body)
					resp.Body.Close()
				}
			}
		}()
	}
	wg.Wait()
	deliveries := float64(max(1, perAS) * len(servers) * cfg.MaxEventsPerTxn)
	putRate = deliveries / time.Since(start).Seconds() / float64(len(cfg.roomASes(0)))
	return insertRate, putRate, nil
}
