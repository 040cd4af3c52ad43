package bench

import (
	"context"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"sync"
	"time"

	"github.com/asdispatch/asdispatch/asapi"
	"github.com/asdispatch/asdispatch/dispatcher"
	"github.com/asdispatch/asdispatch/namespace"
	"github.com/asdispatch/asdispatch/queue"
	"github.com/asdispatch/asdispatch/registry"
	"github.com/asdispatch/asdispatch/txnstore"
)

// Figure is one measured quantity, beside its references where it has them
// (0 when it has none).
type Figure struct {
	Name     string  `json:"name"`
	Unit     string  `json:"unit"`
	Value    float64 `json:"value"`
	Baseline float64 `json:"baseline,omitempty"`
	Limit    float64 `json:"limit,omitempty"`
	// LowerIsBetter turns the ratios around (seconds, bytes).
	LowerIsBetter bool `json:"lower_is_better,omitempty"`
	// Note says how the figure was obtained when that is not obvious.
	Note string `json:"note,omitempty"`
}

// VsBaseline is how many times better than the baseline the figure is.
func (f Figure) VsBaseline() float64 {
	if f.Value == 0 || f.Baseline == 0 {
		return 0
	}
	if f.LowerIsBetter {
		return f.Baseline / f.Value
	}
	return f.Value / f.Baseline
}

// OfLimit is the figure as a share of the limit (0..1).
func (f Figure) OfLimit() float64 {
	if f.Value == 0 || f.Limit == 0 {
		return 0
	}
	if f.LowerIsBetter {
		return f.Limit / f.Value
	}
	return f.Value / f.Limit
}

// Report is a whole run.
type Report struct {
	Config  Config   `json:"config"`
	Figures []Figure `json:"figures"`
}

// Figure returns the figure called name, if the report has it.
func (r *Report) Figure(name string) (Figure, bool) {
	for _, f := range r.Figures {
		if f.Name == name {
			return f, true
		}
	}
	return Figure{}, false
}

// Figure names.
const (
	FigMatcher    = "matcher lookups"
	FigDecisions  = "dispatch decisions"
	FigSubmit     = "durable Submit"
	FigEndToEnd   = "end to end (acknowledged by every interested AS)"
	FigP50        = "latency Submit to AS at full load, p50"
	FigP99        = "latency Submit to AS at full load, p99"
	FigMax        = "latency Submit to AS at full load, max"
	FigHalfRate   = "half load, paced submits"
	FigHalfP50    = "latency at half load, p50"
	FigHalfP99    = "latency at half load, p99"
	FigHalfMax    = "latency at half load, max"
	FigCatchup    = "catch-up: backlog of one AS drained after it comes back"
	FigStored     = "stored per event after Submit"
	FigBacklogged = "stored per backlogged event"
	FigRSS        = "peak RSS"
	FigGoroutines = "goroutines with every AS idle"
)

// Progress is told what the run is doing; done of total steps.
type Progress func(stage string, done, total int)

// Run measures cfg and reports every figure.
func Run(ctx context.Context, cfg Config, progress Progress) (*Report, error) {
	cfg.defaults()
	for _, n := range cfg.Processes {
		if n > 1 && cfg.Store != StorePostgres {
			return nil, fmt.Errorf("bench: %d dispatcher instances need a shared store (--store postgres)", n)
		}
	}
	if progress == nil {
		progress = func(string, int, int) {}
	}
	srv, err := startServers(cfg.ASes, cfg.ASes > cfg.SharedServerAbove)
	if err != nil {
		return nil, err
	}
	defer srv.close()
	set, pats, err := cfg.buildSet(func(i int) string { return srv.as[i].url }, func(i int) string { return srv.as[i].token })
	if err != nil {
		return nil, fmt.Errorf("bench: registrations: %w", err)
	}
	rep := &Report{Config: cfg}
	steps := 3 + 3*cfg.Rounds + len(cfg.Processes) // matcher, decisions, done; end to end, limit, baseline a round
	steps++                                        // start-up
	if !cfg.SkipHalfLoad {
		steps++
	}
	if cfg.CatchupEvents > 0 {
		steps += 2
	}
	step := 0
	next := func(stage string) { step++; progress(stage, step, steps) }

	next("matcher")
	rep.Figures = append(rep.Figures, matcherFigure(set, pats, &cfg))
	next("dispatch decisions")
	dec, err := decisionsFigure(ctx, &cfg, set, pats)
	if err != nil {
		return nil, fmt.Errorf("bench: %w", err)
	}
	rep.Figures = append(rep.Figures, dec)
	next("start-up")
	su, err := startup(ctx, &cfg, srv)
	if err != nil {
		return nil, fmt.Errorf("bench: start-up: %w", err)
	}
	rep.Figures = append(rep.Figures, su.figure())

	var rss float64 // the highest peak of the asdispatch phases
	var goroutines float64
	var submit, e2e, p50, p99, pmax, stored, limInsert, limPut, base []float64
	for round := 0; round < cfg.Rounds; round++ {
		next(fmt.Sprintf("end to end, round %d", round+1))
		resetPeakRSS()
		r, err := endToEnd(ctx, &cfg, set, srv, 0, 1)
		if err != nil {
			return nil, fmt.Errorf("bench: end to end: %w", err)
		}
		rss = max(rss, peakRSS())
		goroutines = max(goroutines, float64(r.goroutines))
		submit, e2e = append(submit, r.submitRate), append(e2e, r.e2eRate)
		p50, p99, pmax = append(p50, r.p50), append(p99, r.p99), append(pmax, r.max)
		stored = append(stored, r.bytesPerEvent)
		next(fmt.Sprintf("limit, round %d", round+1))
		ins, put, err := limit(ctx, &cfg, srv)
		if err != nil {
			return nil, fmt.Errorf("bench: limit: %w", err)
		}
		limInsert, limPut = append(limInsert, ins), append(limPut, put)
		next(fmt.Sprintf("baseline, round %d", round+1))
		b, err := baseline(ctx, &cfg, pats, srv)
		if err != nil {
			return nil, fmt.Errorf("bench: baseline: %w", err)
		}
		base = append(base, b)
	}
	limitE2E := min(median(limInsert), median(limPut))
	rep.Figures = append(rep.Figures,
		Figure{Name: FigSubmit, Unit: "events/s", Value: median(submit), Baseline: median(base), Limit: median(limInsert)},
		Figure{Name: FigEndToEnd, Unit: "events/s", Value: median(e2e), Baseline: median(base), Limit: limitE2E},
		Figure{Name: FigP50, Unit: "ms", Value: median(p50)},
		Figure{Name: FigP99, Unit: "ms", Value: median(p99)},
		Figure{Name: FigMax, Unit: "ms", Value: median(pmax)},
	)
	for _, n := range cfg.Processes {
		next(fmt.Sprintf("end to end, %d dispatcher instances", n))
		var rates []float64
		for round := 0; round < cfg.Rounds; round++ {
			r, err := endToEnd(ctx, &cfg, set, srv, 0, n)
			if err != nil {
				return nil, fmt.Errorf("bench: end to end with %d processes: %w", n, err)
			}
			rates = append(rates, r.e2eRate)
		}
		name := fmt.Sprintf("end to end, %d processes", n)
		if n == 1 {
			name = "end to end, 1 process"
		}
		rep.Figures = append(rep.Figures, Figure{Name: name, Unit: "events/s",
			Value: median(rates), Baseline: median(base), Limit: limitE2E,
			Note: "dispatcher instances on the one PostgreSQL store, each with its own connections and sender leases; a room always goes through the same one"})
	}
	if !cfg.SkipHalfLoad {
		next("end to end at half load")
		rate := median(e2e) / 2
		resetPeakRSS()
		r, err := endToEnd(ctx, &cfg, set, srv, rate, 1)
		if err != nil {
			return nil, fmt.Errorf("bench: half load: %w", err)
		}
		rss = max(rss, peakRSS())
		rep.Figures = append(rep.Figures,
			Figure{Name: FigHalfRate, Unit: "events/s", Value: r.e2eRate, Note: "paced at " + FormatNumber(rate) + " events/s"},
			Figure{Name: FigHalfP50, Unit: "ms", Value: r.p50},
			Figure{Name: FigHalfP99, Unit: "ms", Value: r.p99},
			Figure{Name: FigHalfMax, Unit: "ms", Value: r.max})
	}
	if cfg.CatchupEvents > 0 {
		next(fmt.Sprintf("catch-up, %d events", cfg.CatchupEvents))
		resetPeakRSS()
		c, err := catchup(ctx, &cfg, set, srv)
		if err != nil {
			return nil, fmt.Errorf("bench: catch-up: %w", err)
		}
		rss = max(rss, peakRSS())
		next("catch-up, baseline")
		n := min(cfg.CatchupEvents, cfg.BaselineCatchupEvents)
		b, err := baselineCatchup(ctx, &cfg, srv.as[0], n)
		if err != nil {
			return nil, fmt.Errorf("bench: baseline catch-up: %w", err)
		}
		lim, err := catchupLimit(ctx, &cfg, srv.as[0], n)
		if err != nil {
			return nil, fmt.Errorf("bench: catch-up limit: %w", err)
		}
		f := Figure{Name: FigCatchup, Unit: "s", Value: c.drain.Seconds(), LowerIsBetter: true,
			Note: fmt.Sprintf("%d events; %s events/s", cfg.CatchupEvents, FormatNumber(float64(cfg.CatchupEvents)/c.drain.Seconds()))}
		if cfg.CatchupMaxEventsPerTxn > cfg.MaxEventsPerTxn {
			f.Note += fmt.Sprintf("; catch-up batching: up to %d events a transaction (baseline and limit: %d)", cfg.CatchupMaxEventsPerTxn, cfg.MaxEventsPerTxn)
		}
		scale := float64(cfg.CatchupEvents) / float64(n)
		f.Baseline, f.Limit = b.Seconds()*scale, lim.Seconds()*scale
		if n < cfg.CatchupEvents {
			f.Note += fmt.Sprintf("; baseline and limit (sequential raw PUTs) extrapolated linearly from %d events (%s s, %s s)", n, FormatNumber(b.Seconds()), FormatNumber(lim.Seconds()))
		} else {
			f.Note += "; limit: the same transactions as raw PUTs, one at a time"
		}
		rep.Figures = append(rep.Figures, f,
			Figure{Name: FigBacklogged, Unit: "bytes/event", Value: c.bytesPerEvent, LowerIsBetter: true,
				Note: fmt.Sprintf("%d-byte events; %s; the empty store with its ASes not counted", cfg.EventSize, storeMeasure(cfg.Store))})
	}
	next("done")
	rep.Figures = append(rep.Figures,
		Figure{Name: FigStored, Unit: "bytes/event", Value: median(stored), LowerIsBetter: true,
			Note: fmt.Sprintf("%d-byte events, deliveries still in flight; %s; the empty store with its ASes not counted", cfg.EventSize, storeMeasure(cfg.Store))},
		Figure{Name: FigRSS, Unit: "MiB", Value: rss / (1 << 20), LowerIsBetter: true,
			Note: "highest of the end-to-end, half-load and catch-up phases; the process includes the AS servers"},
		Figure{Name: FigGoroutines, Unit: "goroutines", Value: goroutines, LowerIsBetter: true,
			Note: "added by the dispatcher once started, before any event; the AS servers' not counted"})
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

func sortDurations(d []time.Duration) { slices.Sort(d) }

// matcherFigure times lookups of the indexed matcher and of the plain
// per-regex loop on the same IDs.
func matcherFigure(set *registry.Set, pats []namespace.Pattern, cfg *Config) Figure {
	ids := make([]string, 1024)
	for i := range ids {
		if i%3 == 2 {
			ids[i] = fmt.Sprintf("@alice%d:%s", i, server)
		} else {
			ids[i] = cfg.ghost(int(mix64(uint64(i))%uint64(cfg.ASes)), i)
		}
	}
	var buf []namespace.Hit
	rate := func(budget time.Duration, f func(id string)) float64 {
		start := time.Now()
		n := 0
		for time.Since(start) < budget {
			for range 16 {
				f(ids[n%len(ids)])
				n++
			}
		}
		return float64(n) / time.Since(start).Seconds()
	}
	indexed := rate(300*time.Millisecond, func(id string) { buf = set.UsersInterested(buf[:0], id) })
	plain, _ := namespace.NewPlain(pats)
	base := rate(300*time.Millisecond, func(id string) { buf = plain.AppendMatch(buf[:0], namespace.Users, id) })
	return Figure{Name: FigMatcher, Unit: "lookups/s", Value: indexed, Baseline: base}
}

// openDispatcher starts a dispatcher on a fresh store in dir. The ASes are
// registered in the store concurrently first: one commit for many instead
// of one each, which a 10,000-AS start would otherwise spend minutes on.
func openDispatcher(ctx context.Context, cfg *Config, set *registry.Set, env *storeEnv, state dispatcher.RoomState, owner string) (*dispatcher.Dispatcher, error) {
	q := queue.Options{MaxEvents: cfg.MaxEventsPerTxn, MaxBytes: cfg.MaxTxnBytes, CatchupMaxEvents: cfg.CatchupMaxEventsPerTxn,
		RetryInitial: 100 * time.Millisecond, RetryMax: time.Second, Owner: owner}
	if cfg.ASes > cfg.SharedServerAbove {
		// One server for every AS: let more than 8 connections to it idle.
		q.Client = asapi.New(asapi.Options{Transport: &http.Transport{MaxIdleConnsPerHost: 256, MaxConnsPerHost: 256, IdleConnTimeout: 90 * time.Second}})
	}
	open := func(ctx context.Context, opts txnstore.Options) (txnstore.Store, error) {
		st, err := env.open(ctx, opts)
		if err != nil {
			return nil, err
		}
		var wg sync.WaitGroup
		errc := make(chan error, 1)
		const workers = 256
		for w := 0; w < workers; w++ {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for i := w; i < len(set.All()); i += workers {
					if _, err := st.EnsureAS(ctx, set.All()[i].ID); err != nil {
						select {
						case errc <- err:
						default:
						}
						return
					}
				}
			}()
		}
		wg.Wait()
		select {
		case err := <-errc:
			st.Close()
			return nil, err
		default:
		}
		return st, nil
	}
	d, err := dispatcher.New(ctx, dispatcher.Config{Registry: registry.NewRegistry(set), OpenStore: open, RoomState: state, Queue: q})
	if err != nil {
		return nil, fmt.Errorf("dispatcher: %w", err)
	}
	return d, nil
}

// storeMeasure says what the stored-bytes figures weigh.
func storeMeasure(store string) string {
	if store == StorePostgres {
		return "the schema's tables with indexes and TOAST"
	}
	return "db + wal files"
}

func dirSize(dir string) int64 {
	var n int64
	for _, f := range []string{"dispatcher.db", "dispatcher.db-wal"} {
		if fi, err := os.Stat(filepath.Join(dir, f)); err == nil {
			n += fi.Size()
		}
	}
	return n
}

type e2eResult struct {
	submitRate, e2eRate, p50, p99, max, bytesPerEvent float64
	// txns is how many transactions the ASes accepted.
	txns int64
	// goroutines is how many the dispatchers added once started, every AS
	// idle (the AS servers' own not counted).
	goroutines int
}

// settledGoroutines returns the goroutine count once it stops changing
// for a quarter second (senders finish starting up), or after 60 s.
func settledGoroutines() int {
	n, stable := runtime.NumGoroutine(), 0
	for deadline := time.Now().Add(60 * time.Second); stable < 12 && time.Now().Before(deadline); {
		time.Sleep(20 * time.Millisecond)
		if m := runtime.NumGoroutine(); m != n {
			n, stable = m, 0
		} else {
			stable++
		}
	}
	return n
}

// endToEnd submits cfg.Events generated events from 8 writers, each owning
// a share of the rooms so every room's events keep their order, and waits
// until every AS has exactly the events the homeserver's state says it
// must get. rate > 0 paces the submits at rate events/s.
//
// instances > 1 (PostgreSQL only) runs that many dispatchers on the one
// store, each with its own connections and sender leases, as homeserver
// processes would; writer w submits through instance w % instances, so a
// room always goes through the same one (as Synapse shards event
// persistence by room).
func endToEnd(ctx context.Context, cfg *Config, set *registry.Set, srv *servers, rate float64, instances int) (*e2eResult, error) {
	env, err := newStoreEnv(ctx, cfg)
	if err != nil {
		return nil, err
	}
	defer env.close()
	srv.reset()
	st := newState(cfg)
	before := settledGoroutines()
	ds := make([]*dispatcher.Dispatcher, max(instances, 1))
	for i := range ds {
		d, err := openDispatcher(ctx, cfg, set, env, st, fmt.Sprintf("bench-%d", i))
		if err != nil {
			return nil, err
		}
		defer d.Close(context.Background())
		ds[i] = d
	}
	goroutines := settledGoroutines() - before
	empty := env.size(ctx) // the registered ASes, before any event
	const writers, batch = 8, 50
	wants := make([][]int64, writers)
	if cfg.profile != nil {
		defer cfg.profile()()
	}
	start := time.Now()
	var wg sync.WaitGroup
	errc := make(chan error, writers)
	for w := 0; w < writers; w++ {
		wg.Add(1)
		wants[w] = make([]int64, cfg.ASes)
		go func() {
			defer wg.Done()
			if err := submitShare(ctx, cfg, ds[w%len(ds)], st, w, writers, batch, start, rate, wants[w]); err != nil {
				errc <- err
			}
		}()
	}
	wg.Wait()
	submitted := time.Since(start)
	select {
	case err := <-errc:
		return nil, fmt.Errorf("submit: %w", err)
	default:
	}
	stored := env.size(ctx) - empty
	want := make([]int64, cfg.ASes)
	var total int64
	for _, ws := range wants {
		for i, n := range ws {
			want[i] += n
			total += n
		}
	}
	deadline := time.Now().Add(10 * time.Minute)
	for i := 0; i < len(want); {
		if srv.as[i].events.Load() >= want[i] {
			i++
			continue
		}
		if time.Now().After(deadline) {
			return nil, fmt.Errorf("only %d of %d deliveries arrived", srv.total(), total)
		}
		time.Sleep(time.Millisecond)
	}
	elapsed := time.Since(start)
	if got := srv.total(); got != total {
		return nil, fmt.Errorf("%d deliveries arrived, the homeserver's state says %d", got, total)
	}
	lat := srv.latencies()
	ms := func(q float64) float64 {
		if len(lat) == 0 {
			return 0
		}
		return float64(lat[min(len(lat)-1, int(q*float64(len(lat))))]) / 1e6
	}
	return &e2eResult{
		submitRate:    float64(cfg.Events) / submitted.Seconds(),
		e2eRate:       float64(cfg.Events) / elapsed.Seconds(),
		p50:           ms(0.50),
		p99:           ms(0.99),
		max:           ms(1),
		bytesPerEvent: float64(stored) / float64(cfg.Events),
		goroutines:    goroutines,
		txns:          srv.txns(),
	}, nil
}

// submitShare submits writer w's rooms' events in batches, adding to want
// the deliveries each AS must receive. The homeserver's state is never
// ahead of what the dispatcher has been given for a room it may (re)load:
// the batch holding the room's earlier events is submitted first.
func submitShare(ctx context.Context, cfg *Config, d *dispatcher.Dispatcher, st *state, w, writers, batch int, start time.Time, rate float64, want []int64) error {
	g := newGenerator(cfg)
	warm := make([]bool, cfg.Rooms)
	evs := make([]dispatcher.Event, 0, batch)
	var rooms []int
	flush := func() error {
		if len(evs) == 0 {
			return nil
		}
		if err := d.Submit(ctx, evs...); err != nil {
			return err
		}
		for _, r := range rooms {
			warm[r] = true
		}
		evs, rooms = evs[:0], rooms[:0]
		return nil
	}
	for e := 0; e < cfg.Events; e++ {
		r := e % cfg.Rooms
		if r%writers != w {
			continue
		}
		if rate > 0 {
			if wait := time.Until(start.Add(time.Duration(float64(e) / rate * 1e9))); wait > 0 {
				if err := flush(); err != nil {
					return err
				}
				time.Sleep(wait)
			}
		}
		s := g.next(e)
		// A (re)load of the room while this batch is submitted would see
		// the change before the batch's earlier events of the room.
		if s.kind != kindMessage && (!warm[r] || s.kind == kindAlias) && slices.Contains(rooms, r) {
			if err := flush(); err != nil {
				return err
			}
		}
		for _, as := range st.apply(s) {
			want[as]++
		}
		if s.kind == kindAlias {
			// A directory change: the homeserver tells the dispatcher.
			d.InvalidateRoom(roomID(r))
			warm[r] = false
		}
		evs = append(evs, cfg.event(s, time.Now().UnixNano()))
		rooms = append(rooms, r)
		if len(evs) == batch {
			if err := flush(); err != nil {
				return err
			}
		}
	}
	return flush()
}
