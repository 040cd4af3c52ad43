package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"strconv"
	"strings"

	"golang.org/x/term"

	"github.com/asdispatch/asdispatch/bench"
)

func runBench(args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("bench", flag.ContinueOnError)
	fs.SetOutput(stderr)
	var cfg bench.Config
	fs.IntVar(&cfg.ASes, "ases", 10, "number of application services")
	fs.IntVar(&cfg.Rooms, "rooms", 100, "rooms the events are sent in")
	fs.IntVar(&cfg.MembersPerRoom, "members", 20, "members per room (ghosts of the interested ASes included)")
	fs.Float64Var(&cfg.Interest, "interest", 1, "share of events each AS is interested in (0..1]")
	fs.IntVar(&cfg.EventSize, "event-size", 500, "bytes per event")
	fs.IntVar(&cfg.Events, "events", 20000, "events per round")
	fs.IntVar(&cfg.Rounds, "rounds", 3, "rounds; each figure is their median")
	fs.IntVar(&cfg.MaxEventsPerTxn, "max-events-per-txn", 100, "events per transaction")
	fs.IntVar(&cfg.MaxTxnBytes, "max-txn-bytes", 4<<20, "bytes per transaction")
	fs.IntVar(&cfg.CatchupMaxEventsPerTxn, "catchup-max-events-per-txn", 0, "events per transaction while an AS has a backlog, up to --max-txn-bytes (0: off)")
	fs.IntVar(&cfg.Namespaces, "namespaces", 3, "users regexes per AS (plus one aliases and one rooms regex)")
	mix := fs.String("mix", "prefix,suffix,alternation", "kinds of the users regexes, in turn: prefix, suffix, alternation, casefold, noliteral")
	fs.Float64Var(&cfg.Churn, "churn", 0.05, "share of events that are a ghost joining or leaving (negative: none)")
	fs.Float64Var(&cfg.AliasChurn, "alias-churn", 0.01, "share of events that move the room's alias (negative: none)")
	fs.IntVar(&cfg.CatchupEvents, "catchup-events", 100000, "backlog of one AS while it is down (negative: skip catch-up)")
	fs.IntVar(&cfg.BaselineCatchupEvents, "baseline-catchup-events", 100000, "most events the baseline drains; more are extrapolated")
	stores := fs.String("store", bench.StoreSQLite, "store backend(s): sqlite, postgres, or sqlite,postgres for both side by side")
	fs.StringVar(&cfg.DSN, "dsn", "postgres://postgres@127.0.0.1:5432/test?sslmode=disable", "PostgreSQL DSN for --store postgres (each phase uses a new schema, dropped after)")
	processes := fs.String("processes", "1,2,3", "with --store postgres: dispatcher instances sharing the store, end to end measured for each")
	halfLoad := fs.Bool("half-load", true, "measure latency at half the measured end-to-end throughput")
	sweep := fs.String("sweep", "", "run each figure for several values, e.g. ases=10,100,1000,10000")
	plot := fs.String("plot", "bench-sweep.png", "PNG plot of the sweep")
	asJSON := fs.Bool("json", false, "print the report as JSON")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	var err error
	if cfg.Mix, err = bench.ParseMix(*mix); err != nil {
		fmt.Fprintf(stderr, "asdispatch bench: --mix: %v\n", err)
		return 2
	}
	cfg.SkipHalfLoad = !*halfLoad
	var backends []string
	for _, b := range strings.Split(*stores, ",") {
		if b != bench.StoreSQLite && b != bench.StorePostgres {
			fmt.Fprintf(stderr, "asdispatch bench: --store: %q is neither sqlite nor postgres\n", b)
			return 2
		}
		backends = append(backends, b)
	}
	var procs []int
	for _, p := range strings.Split(*processes, ",") {
		n, err := strconv.Atoi(strings.TrimSpace(p))
		if err != nil || n < 1 || n > 16 {
			fmt.Fprintf(stderr, "asdispatch bench: --processes: %q is not a count from 1 to 16\n", p)
			return 2
		}
		procs = append(procs, n)
	}
	progress := newProgress(stderr)
	if *sweep != "" && len(backends) > 1 {
		fmt.Fprintln(stderr, "asdispatch bench: --sweep runs one --store at a time")
		return 2
	}
	if *sweep != "" {
		cfg.Store = backends[0]
		sw, err := bench.ParseSweep(*sweep)
		if err != nil {
			fmt.Fprintf(stderr, "asdispatch bench: --sweep: %v\n", err)
			return 2
		}
		res, err := bench.RunSweep(context.Background(), cfg, sw, progress.update)
		progress.end()
		if err != nil {
			fmt.Fprintf(stderr, "asdispatch bench: %v\n", err)
			return 1
		}
		if *plot != "" {
			if err := res.Plot(*plot); err != nil {
				fmt.Fprintf(stderr, "asdispatch bench: plot: %v\n", err)
				return 1
			}
		}
		if *asJSON {
			printJSON(stdout, res)
			return 0
		}
		res.WriteTable(stdout)
		if *plot != "" {
			fmt.Fprintf(stdout, "\nplot: %s\n", *plot)
		}
		return 0
	}
	var reps []*bench.Report
	for _, b := range backends {
		c := cfg
		c.Store = b
		if b == bench.StorePostgres {
			c.Processes = procs
		}
		rep, err := bench.Run(context.Background(), c, progress.update)
		progress.end()
		if err != nil {
			fmt.Fprintf(stderr, "asdispatch bench: %s: %v\n", b, err)
			return 1
		}
		reps = append(reps, rep)
	}
	if *asJSON {
		if len(reps) == 1 {
			printJSON(stdout, reps[0])
		} else {
			printJSON(stdout, map[string]any{"reports": reps})
		}
		return 0
	}
	for i, rep := range reps {
		if i > 0 {
			fmt.Fprintln(stdout)
		}
		rep.WriteTable(stdout)
	}
	if len(reps) > 1 {
		fmt.Fprintln(stdout)
		bench.WriteSideBySide(stdout, reps)
	}
	return 0
}

func printJSON(w io.Writer, v any) {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	enc.Encode(v)
}

// progress shows how far the bench is: a bar redrawn in place on a
// terminal, else one line per stage, so a pipe or a CI log gets no
// carriage returns.
type progress struct {
	w    io.Writer
	tty  bool
	open bool // a bar is drawn and its line not ended
}

// newProgress writes to w, drawing a bar when w is a terminal.
func newProgress(w io.Writer) *progress {
	f, ok := w.(interface{ Fd() uintptr })
	return &progress{w: w, tty: ok && term.IsTerminal(int(f.Fd()))}
}

func (p *progress) update(stage string, done, total int) {
	if !p.tty {
		fmt.Fprintf(p.w, "asdispatch bench: [%d/%d] %s\n", done, total, stage)
		return
	}
	const width = 30
	n := width * done / max(total, 1)
	fmt.Fprintf(p.w, "\r[%s%s] %d/%d %-50s", strings.Repeat("#", n), strings.Repeat(".", width-n), done, total, stage)
	p.open = true
	if done == total {
		p.end()
	}
}

// end ends the bar's line, if one is drawn, before anything else is
// written.
func (p *progress) end() {
	if p.open {
		fmt.Fprintln(p.w)
		p.open = false
	}
}
