// Command dendrite-bench runs the same workload against stock Dendrite and
// dendrite-asdispatch (same version, same dependencies, same generated
// config and registrations), alternating, and prints what each delivered.
//
// All ASes are served by one loopback HTTP server, AS N under /asN with its
// own hs_token. Users bench_g0..bench_g<groups-1> each create a room; AS N
// is interested in user bench_g<N mod groups> (a non-exclusive users
// namespace), so in that user's room. Before anything is timed every AS has
// its group's warm-up message, so the set-up events are behind every
// server's appservice consumers.
//
// Workloads:
//
//   - fanout: one group (every AS gets every message); --events messages
//     are sent, --senders at a time; the run ends when every AS has every
//     message.
//   - spread: the same with --groups groups, message i sent by group
//     i mod groups: each message reaches ases/groups ASes (the issue's
//     1,000 ASes with 200 events spread over them).
//   - catchup: the ASes answer 503 while the messages are sent, then come
//     back and ping the homeserver; measured from their return until each
//     has every message (the figure: --ases 1 --events 5000).
//   - crash: the ASes answer 503 while the messages are sent; once each AS
//     has refused a transaction the server is SIGKILLed, the ASes come back,
//     the server restarts (same data) and the ASes ping it. Reported: every
//     message delivered?, duplicates, out-of-order deliveries, txnIds sent
//     with differing bodies (over every attempt, refused ones included).
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"os"
	"strings"
	"time"

	"github.com/matrix-org/dendrite/contrib/asdispatch/internal/harness"
)

// options are one run's workload parameters.
type options struct {
	ases, events, senders, groups int
	timeout, settle, stall        time.Duration
	logw                          io.Writer
	logLevel                      string
}

func main() {
	var o options
	flag.IntVar(&o.ases, "ases", 10, "application services")
	flag.IntVar(&o.events, "events", 200, "messages sent")
	flag.IntVar(&o.senders, "senders", 4, "concurrent client sends (catchup, crash: 1 unless set, so that the send order is the stream order and out-of-order counts are exact)")
	flag.IntVar(&o.groups, "groups", 10, "spread: sending users, each with its own room; AS n follows user n mod groups")
	rounds := flag.Int("rounds", 1, "alternating rounds of stock and asdispatch")
	which := flag.String("servers", "dendrite,dendrite-asdispatch", "binaries to run, in order")
	flag.DurationVar(&o.timeout, "timeout", 10*time.Minute, "give up on one run (its start-up, its warm-up) after this long")
	flag.DurationVar(&o.settle, "settle", 35*time.Second, "crash: keep listening this long once every message arrived, for late replays (JetStream redelivers an unacknowledged message after 30 s)")
	flag.DurationVar(&o.stall, "stall", 2*time.Minute, "fanout, spread: stop waiting once no message arrived for this long and report the missing ones")
	asJSON := flag.Bool("json", false, "print results as JSON lines")
	logPath := flag.String("server-log", "", "append the servers' logs to this file")
	flag.StringVar(&o.logLevel, "server-log-level", "warn", "Dendrite's log level (info shows the start-up steps)")
	workload := flag.String("workload", "fanout", "fanout, spread, catchup or crash")
	flag.Parse()
	workloads := map[string]func(context.Context, string, string, options) (result, error){
		"fanout": fanout, "spread": fanout, "catchup": catchup, "crash": crash,
	}
	run, ok := workloads[*workload]
	if !ok {
		fmt.Fprintf(os.Stderr, "unknown -workload %q\n", *workload)
		os.Exit(2)
	}
	if *workload != "spread" {
		o.groups = 1
	}
	if o.groups < 1 || o.ases < 1 || o.events < 1 {
		fmt.Fprintln(os.Stderr, "-ases, -events and -groups must be positive")
		os.Exit(2)
	}
	if *workload == "catchup" || *workload == "crash" {
		set := false
		flag.Visit(func(f *flag.Flag) { set = set || f.Name == "senders" })
		if !set {
			o.senders = 1
		}
	}
	logw, closeLog, err := logTo(*logPath)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	defer closeLog()
	o.logw = logw
	ctx := context.Background()
	for r := 0; r < *rounds; r++ {
		for _, name := range strings.Split(*which, ",") {
			bin, err := harness.Build(ctx, harness.Binary(name))
			if err != nil {
				fmt.Fprintln(os.Stderr, err)
				os.Exit(1)
			}
			res, err := run(ctx, name, bin, o)
			res.Workload = *workload
			if err != nil {
				fmt.Fprintf(os.Stderr, "%s: %v\n", name, err)
				os.Exit(1)
			}
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
	Server   string  `json:"server"`
	Workload string  `json:"workload"`
	ASes     int     `json:"ases"`
	Groups   int     `json:"groups"`
	Events   int     `json:"events"`
	StartupS float64 `json:"startup_s"`
	// WarmupS: from the first warm-up message until every AS had its own.
	WarmupS      float64 `json:"warmup_s"`
	AcceptedPerS float64 `json:"accepted_events_per_s"`
	// DeliveredPerS is AS-events per second, EventsPerS events (each to
	// all its ASes) per second, both from the first send to the last
	// delivery.
	DeliveredPerS float64 `json:"delivered_events_per_s"`
	EventsPerS    float64 `json:"events_fully_delivered_per_s"`
	P50LatencyMS  float64 `json:"p50_latency_ms"`
	P99LatencyMS  float64 `json:"p99_latency_ms"`
	Transactions  int     `json:"transactions"`
	Duplicates    int     `json:"duplicate_events"`
	OutOfOrder    int     `json:"out_of_order_events"`
	// PeakFDs of the server and of this driver, sampled every 200 ms.
	PeakFDs       int `json:"peak_server_fds"`
	PeakDriverFDs int `json:"peak_driver_fds"`
	// catch-up and crash: from the ASes' return to the last delivery, to
	// the first transaction accepted, and from that one to the last.
	CatchupS      float64 `json:"catchup_s,omitempty"`
	FirstAfterUpS float64 `json:"first_after_up_s,omitempty"`
	DrainS        float64 `json:"drain_s,omitempty"`
	Refused       int     `json:"refused_transactions,omitempty"`
	PingStatus    int     `json:"ping_status,omitempty"`
	// Missing AS-messages (never delivered: a stall, or crash's end).
	Missing int `json:"missing_events"`
	// SendRetries: client sends answered 5xx and sent again.
	SendRetries int `json:"send_retries"`
	// Resent: AS-messages that came again as a second event, made by a
	// send retry after a 5xx (the first attempt had been persisted).
	Resent int `json:"resent_as_new_events"`
	// crash only. TxnRepeats: PUTs of a txnId the AS had already taken
	// (a legal retry, not a duplicate).
	TxnRepeats int     `json:"txn_repeats"`
	TxnReused  int     `json:"txn_ids_with_differing_bodies"`
	Disorder   string  `json:"first_disorder,omitempty"`
	RestartS   float64 `json:"restart_s,omitempty"`
}

func (r result) String() string {
	switch r.Workload {
	case "catchup":
		return fmt.Sprintf("%-20s catchup ases=%d events=%d accepted=%.1f ev/s catch-up=%.2fs (first txn after %.2fs, drain %.2fs) ping=%d refused=%d txns=%d dup=%d out-of-order=%d",
			r.Server, r.ASes, r.Events, r.AcceptedPerS, r.CatchupS, r.FirstAfterUpS, r.DrainS, r.PingStatus, r.Refused, r.Transactions, r.Duplicates, r.OutOfOrder)
	case "crash":
		return fmt.Sprintf("%-20s crash ases=%d events=%d all-delivered=%t missing=%d dup=%d out-of-order=%d txnIds-with-differing-bodies=%d txn-repeats=%d startup=%.1fs restart=%.1fs first-txn-after=%.2fs catch-up=%.2fs ping=%d refused=%d txns=%d %s",
			r.Server, r.ASes, r.Events, r.Missing == 0, r.Missing, r.Duplicates, r.OutOfOrder, r.TxnReused, r.TxnRepeats, r.StartupS, r.RestartS, r.FirstAfterUpS, r.CatchupS, r.PingStatus, r.Refused, r.Transactions, r.Disorder)
	}
	return fmt.Sprintf("%-20s %s ases=%d groups=%d events=%d startup=%.1fs warm-up=%.1fs accepted=%.1f ev/s delivered=%.2f ev/s (%.1f AS-ev/s) p50=%.0fms p99=%.0fms txns=%d dup=%d out-of-order=%d missing=%d send-retries=%d resent-as-new-event=%d peak-fds server=%d driver=%d",
		r.Server, r.Workload, r.ASes, r.Groups, r.Events, r.StartupS, r.WarmupS, r.AcceptedPerS, r.EventsPerS, r.DeliveredPerS, r.P50LatencyMS, r.P99LatencyMS, r.Transactions, r.Duplicates, r.OutOfOrder, r.Missing, r.SendRetries, r.Resent, r.PeakFDs, r.PeakDriverFDs)
}
