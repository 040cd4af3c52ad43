package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"strings"
	"text/tabwriter"

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
	asJSON := fs.Bool("json", false, "print the report as JSON")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	progress := func(stage string, done, total int) {
		const width = 30
		n := width * done / total
		fmt.Fprintf(stderr, "\r[%s%s] %d/%d %-40s", strings.Repeat("#", n), strings.Repeat(".", width-n), done, total, stage)
		if done == total {
			fmt.Fprintln(stderr)
		}
	}
	rep, err := bench.Run(context.Background(), cfg, progress)
	if err != nil {
		fmt.Fprintf(stderr, "\nasdispatch bench: %v\n", err)
		return 1
	}
	if *asJSON {
		enc := json.NewEncoder(stdout)
		enc.SetIndent("", "  ")
		enc.Encode(rep)
		return 0
	}
	c := rep.Config
	fmt.Fprintf(stdout, "%d ASes, %d rooms, interest %.0f%%, %d-byte events, %d events a round, median of %d rounds\n\n",
		c.ASes, c.Rooms, c.Interest*100, c.EventSize, c.Events, c.Rounds)
	tw := tabwriter.NewWriter(stdout, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "figure\tasdispatch\tbaseline\tlimit\tvs baseline\tof limit\t")
	for _, f := range rep.Figures {
		fmt.Fprintf(tw, "%s (%s)\t%s\t%s\t%s\t%s\t%s\t\n", f.Name, f.Unit, num(f.Value), num(f.Baseline), num(f.Limit), ratio(f.Value, f.Baseline, "x"), ratio(100*f.Value, f.Limit, "%"))
	}
	tw.Flush()
	return 0
}

func num(v float64) string {
	switch {
	case v == 0:
		return "-"
	case v >= 1e6:
		return fmt.Sprintf("%.2f M", v/1e6)
	case v >= 1e4:
		return fmt.Sprintf("%.1f k", v/1e3)
	default:
		return fmt.Sprintf("%.2f", v)
	}
}

func ratio(a, b float64, unit string) string {
	if a == 0 || b == 0 {
		return "-"
	}
	return fmt.Sprintf("%.1f%s", a/b, unit)
}
