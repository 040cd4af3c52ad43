package bench

import (
	"bytes"
	"context"
	"database/sql"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"time"

	"github.com/asdispatch/asdispatch/namespace"
)

// baseline is what a homeserver does without asdispatch, as Synapse and
// Dendrite do it: each event tested against every AS's regexes one by one
// (room membership cached per room), and per AS a 100-event transaction
// built, stored and synced on its own, then sent and awaited before the
// next. It returns events/s of the same workload.
func baseline(ctx context.Context, cfg Config, pats []namespace.Pattern, servers []*asServer) (float64, error) {
	dir, err := os.MkdirTemp("", "asdispatch-baseline-")
	if err != nil {
		return 0, err
	}
	defer os.RemoveAll(dir)
	db, err := sql.Open("sqlite3", "file:"+filepath.Join(dir, "baseline.db")+"?_journal_mode=WAL&_synchronous=FULL")
	if err != nil {
		return 0, err
	}
	defer db.Close()
	db.SetMaxOpenConns(1)
	if _, err := db.ExecContext(ctx, `CREATE TABLE txns (as_id INTEGER, txn_id INTEGER, body BLOB, PRIMARY KEY (as_id, txn_id))`); err != nil {
		return 0, err
	}
	plain, err := namespace.NewPlain(pats)
	if err != nil {
		return 0, err
	}
	client := &http.Client{}
	rooms := map[int][]int{} // room -> interested ASes, learnt once per room
	pending := make([][][]byte, cfg.ASes)
	txnID := 0
	flush := func(as int) error {
		body := bytes.NewBufferString(`{"events":[`)
		for i, ev := range pending[as] {
			if i > 0 {
				body.WriteByte(',')
			}
			body.Write(ev)
		}
		body.WriteString(`]}`)
		pending[as] = pending[as][:0]
		txnID++
		if _, err := db.ExecContext(ctx, `INSERT INTO txns (as_id, txn_id, body) VALUES (?, ?, ?)`, as, txnID, body.Bytes()); err != nil {
			return err
		}
		req, _ := http.NewRequestWithContext(ctx, http.MethodPut, fmt.Sprintf("%s/_matrix/app/v1/transactions/b%d", servers[as].url, txnID), bytes.NewReader(body.Bytes()))
		req.Header.Set("Authorization", "Bearer "+servers[as].token)
		req.Header.Set("Content-Type", "application/json")
		resp, err := client.Do(req)
		if err != nil {
			return err
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		_, err = db.ExecContext(ctx, `DELETE FROM txns WHERE as_id = ? AND txn_id = ?`, as, txnID)
		return err
	}
	n := min(cfg.Events, 20000)
	var hits []namespace.Hit
	start := time.Now()
	for e := 0; e < n; e++ {
		r := e % cfg.Rooms
		sender := fmt.Sprintf("@user%d_%d:bench.example.org", r, cfg.ASes)
		interested := map[int]bool{}
		hits = plain.AppendMatch(hits[:0], namespace.Users, sender)
		for _, h := range hits {
			interested[h.Owner] = true
		}
		members, ok := rooms[r]
		if !ok {
			ms, _ := roomState{&cfg}.JoinedLocalMembers(ctx, fmt.Sprintf("!room%d:bench.example.org", r))
			seen := map[int]bool{}
			for _, m := range ms {
				for _, h := range plain.AppendMatch(nil, namespace.Users, m) {
					if !seen[h.Owner] {
						seen[h.Owner] = true
						members = append(members, h.Owner)
					}
				}
			}
			rooms[r] = members
		}
		for _, as := range members {
			interested[as] = true
		}
		ev := eventJSON(fmt.Sprintf("$b%d", e), fmt.Sprintf("!room%d:bench.example.org", r), sender, cfg.EventSize, time.Now().UnixNano())
		for as := range interested {
			pending[as] = append(pending[as], ev)
			if len(pending[as]) == cfg.MaxEventsPerTxn {
				if err := flush(as); err != nil {
					return 0, err
				}
			}
		}
	}
	for as := range pending {
		if len(pending[as]) > 0 {
			if err := flush(as); err != nil {
				return 0, err
			}
		}
	}
	return float64(n) / time.Since(start).Seconds(), nil
}
