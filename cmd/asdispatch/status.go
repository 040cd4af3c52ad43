package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"text/tabwriter"
	"time"

	"github.com/asdispatch/asdispatch/txnstore"
)

// statusRow is one AS in `asdispatch status` output.
type statusRow struct {
	ID                 string `json:"id"`
	State              string `json:"state"`
	BacklogEvents      int64  `json:"backlog_events"`
	BacklogTxns        int    `json:"backlog_txns"`
	OldestPendingAgeMS int64  `json:"oldest_pending_age_ms,omitempty"`
	LastSuccess        string `json:"last_success,omitempty"`
	LastError          string `json:"last_error,omitempty"`
	NextRetry          string `json:"next_retry,omitempty"`
	Failures           int    `json:"consecutive_failures"`
}

// runStatus reads the dispatcher's store read-only, so it works while
// `serve` runs.
func runStatus(args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("status", flag.ContinueOnError)
	fs.SetOutput(stderr)
	dir := fs.String("data", "asdispatch-data", "the data_dir of `asdispatch serve`")
	dsn := fs.String("dsn", "", "read the PostgreSQL store of this DSN instead of data_dir's SQLite")
	asJSON := fs.Bool("json", false, "print JSON")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	var sts []txnstore.Status
	var err error
	if *dsn != "" {
		sts, err = txnstore.OpenPostgresStatus(context.Background(), *dsn)
	} else {
		path := filepath.Join(*dir, "dispatcher.db")
		if _, err := os.Stat(path); err != nil {
			fmt.Fprintf(stderr, "asdispatch status: %v\n", err)
			return 1
		}
		sts, err = txnstore.OpenStatus(context.Background(), path)
	}
	if err != nil {
		fmt.Fprintf(stderr, "asdispatch status: %v\n", err)
		return 1
	}
	now := time.Now()
	rows := make([]statusRow, 0, len(sts))
	for _, st := range sts {
		r := statusRow{ID: st.ID, State: "up", BacklogEvents: st.PendingItems, BacklogTxns: st.PendingTxns, LastError: st.LastError, Failures: st.Failures}
		if !st.Up {
			r.State = "down"
		}
		if !st.OldestPending.IsZero() {
			r.OldestPendingAgeMS = now.Sub(st.OldestPending).Milliseconds()
		}
		if !st.LastSuccess.IsZero() {
			r.LastSuccess = st.LastSuccess.UTC().Format(time.RFC3339)
		}
		if !st.NextRetry.IsZero() && !st.Up {
			r.NextRetry = st.NextRetry.UTC().Format(time.RFC3339)
		}
		rows = append(rows, r)
	}
	if *asJSON {
		enc := json.NewEncoder(stdout)
		enc.SetIndent("", "  ")
		enc.Encode(map[string]any{"appservices": rows})
		return 0
	}
	tw := tabwriter.NewWriter(stdout, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "APPSERVICE\tSTATE\tBACKLOG\tTXNS\tOLDEST PENDING\tLAST SUCCESS\tNEXT RETRY\tLAST ERROR")
	for _, r := range rows {
		oldest := "-"
		if r.OldestPendingAgeMS > 0 {
			oldest = (time.Duration(r.OldestPendingAgeMS) * time.Millisecond).Round(time.Second).String()
		}
		fmt.Fprintf(tw, "%s\t%s\t%d\t%d\t%s\t%s\t%s\t%s\n", r.ID, r.State, r.BacklogEvents, r.BacklogTxns, oldest, dash(r.LastSuccess), dash(r.NextRetry), dash(r.LastError))
	}
	tw.Flush()
	return 0
}

func dash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}
