package bench

import (
	"bytes"
	"context"
	"database/sql"
	"fmt"
	"io"
	"net/http"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/stdlib"
	_ "github.com/mattn/go-sqlite3" // the baseline's and the limit's own tables

	"github.com/asdispatch/asdispatch/dispatcher"
	"github.com/asdispatch/asdispatch/namespace"
)

// baselineBudget bounds the time the baseline spends on one figure: at
// 10,000 ASes it handles a few hundred events a second, and its rate is
// what is reported.
const baselineBudget = 2 * time.Second

// plainDecider is the interest decision as Synapse and Dendrite make it:
// every AS's regexes tried one by one on the sender, the state_key and the
// room ID, and on each local member and alias of the room; what the members
// and aliases give is cached per room until a membership or alias change.
type plainDecider struct {
	plain *namespace.Plain
	state dispatcher.RoomState
	rooms map[string][]int
	hits  []namespace.Hit
	seen  []bool
	out   []int
}

func newPlainDecider(cfg *Config, pats []namespace.Pattern, state dispatcher.RoomState) (*plainDecider, error) {
	plain, err := namespace.NewPlain(pats)
	if err != nil {
		return nil, err
	}
	return &plainDecider{plain: plain, state: state, rooms: map[string][]int{}, seen: make([]bool, cfg.ASes)}, nil
}

func (p *plainDecider) add(hits []namespace.Hit) {
	for _, h := range hits {
		if !p.seen[h.Owner] {
			p.seen[h.Owner] = true
			p.out = append(p.out, h.Owner)
		}
	}
}

// prefill warms the room cache with what the plain loop would find: at
// 10,000 ASes, finding it costs a minute of regexes for 100 rooms.
func (p *plainDecider) prefill(st *state) {
	for r := range st.rooms {
		p.rooms[roomID(r)] = slices.Clone(st.rooms[r].interest)
	}
}

// decide returns the interested ASes, valid until the next call.
func (p *plainDecider) decide(ctx context.Context, ev *dispatcher.Event) ([]int, error) {
	for _, as := range p.out {
		p.seen[as] = false
	}
	p.out = p.out[:0]
	p.hits = p.plain.AppendMatch(p.hits[:0], namespace.Users, ev.Sender)
	if ev.StateKey != nil && ev.Type == "m.room.member" {
		p.hits = p.plain.AppendMatch(p.hits, namespace.Users, *ev.StateKey)
	}
	p.hits = p.plain.AppendMatch(p.hits, namespace.Rooms, ev.RoomID)
	p.add(p.hits)
	if ev.Type == "m.room.member" || ev.Type == "m.room.canonical_alias" {
		delete(p.rooms, ev.RoomID)
	}
	members, ok := p.rooms[ev.RoomID]
	if !ok {
		ms, err := p.state.JoinedLocalMembers(ctx, ev.RoomID)
		if err != nil {
			return nil, err
		}
		as, err := p.state.LocalAliases(ctx, ev.RoomID)
		if err != nil {
			return nil, err
		}
		var hits []namespace.Hit
		for _, m := range ms {
			hits = p.plain.AppendMatch(hits, namespace.Users, m)
		}
		for _, a := range as {
			hits = p.plain.AppendMatch(hits, namespace.Aliases, a)
		}
		members = []int{}
		seen := map[int]bool{}
		for _, h := range hits {
			if !seen[h.Owner] {
				seen[h.Owner] = true
				members = append(members, h.Owner)
			}
		}
		p.rooms[ev.RoomID] = members
	}
	for _, as := range members {
		if !p.seen[as] {
			p.seen[as] = true
			p.out = append(p.out, as)
		}
	}
	return p.out, nil
}

// baselineTxns stores, syncs and sends one AS's 100-event transactions one
// at a time, awaiting each before the next, and deletes them once sent.
type baselineTxns struct {
	db     *baselineDB
	client *http.Client
	srv    *servers
	txnID  int
}

// baselineDB is the references' own database on the bench's store: a
// SQLite file (WAL, synchronous=FULL) or a fresh PostgreSQL schema, one
// connection, each statement its own durable commit unless in a tx.
type baselineDB struct {
	*sql.DB
	env *storeEnv
}

// openBaselineDB creates the tables of ddl (SQLite syntax, ";"-separated)
// in a fresh store of cfg's backend.
func openBaselineDB(ctx context.Context, cfg *Config, ddl string) (*baselineDB, error) {
	env, err := newStoreEnv(ctx, cfg)
	if err != nil {
		return nil, err
	}
	var db *sql.DB
	if env.backend == StorePostgres {
		pcfg, err := pgx.ParseConfig(env.dsn)
		if err != nil {
			env.close()
			return nil, err
		}
		db = stdlib.OpenDB(*pcfg)
		ddl = strings.NewReplacer("INTEGER PRIMARY KEY", "BIGSERIAL PRIMARY KEY", "INTEGER", "BIGINT", "BLOB", "BYTEA").Replace(ddl)
	} else {
		db, err = sql.Open("sqlite3", "file:"+filepath.Join(env.dir, "baseline.db")+"?_journal_mode=WAL&_synchronous=FULL")
		if err != nil {
			env.close()
			return nil, err
		}
	}
	db.SetMaxOpenConns(1)
	b := &baselineDB{DB: db, env: env}
	for _, stmt := range strings.Split(ddl, ";") {
		if _, err := db.ExecContext(ctx, stmt); err != nil {
			b.Close()
			return nil, err
		}
	}
	return b, nil
}

// q writes a query's "?" placeholders as the backend wants them.
func (b *baselineDB) q(query string) string {
	if b.env.backend != StorePostgres {
		return query
	}
	var out strings.Builder
	n := 0
	for _, r := range query {
		if r == '?' {
			n++
			fmt.Fprintf(&out, "$%d", n)
			continue
		}
		out.WriteRune(r)
	}
	return out.String()
}

func (b *baselineDB) Close() error {
	err := b.DB.Close()
	b.env.close()
	return err
}

const txnSchema = `CREATE TABLE txns (as_id INTEGER, txn_id INTEGER, body BLOB, PRIMARY KEY (as_id, txn_id))`

func (b *baselineTxns) send(ctx context.Context, as int, events [][]byte) error {
	body := bytes.NewBufferString(`{"events":[`)
	for i, ev := range events {
		if i > 0 {
			body.WriteByte(',')
		}
		body.Write(ev)
	}
	body.WriteString(`]}`)
	b.txnID++
	if _, err := b.db.ExecContext(ctx, b.db.q(`INSERT INTO txns (as_id, txn_id, body) VALUES (?, ?, ?)`), as, b.txnID, body.Bytes()); err != nil {
		return err
	}
	a := b.srv.as[as]
	req, err := http.NewRequestWithContext(ctx, http.MethodPut, a.url+"/_matrix/app/v1/transactions/b"+strconv.Itoa(b.txnID), bytes.NewReader(body.Bytes()))
	if err != nil {
		return err
	}
	req.Header.Set("Authorization", "Bearer "+a.token)
	req.Header.Set("Content-Type", "application/json")
	resp, err := b.client.Do(req)
	if err != nil {
		return err
	}
	io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("baseline: AS answered %s", resp.Status)
	}
	_, err = b.db.ExecContext(ctx, b.db.q(`DELETE FROM txns WHERE as_id = ? AND txn_id = ?`), as, b.txnID)
	return err
}

// baseline is what a homeserver does without asdispatch, as Synapse and
// Dendrite do it: the plain decision per event, then per AS a 100-event
// transaction built, stored and synced on its own, sent and awaited before
// the next. It runs the same workload for at most baselineBudget and
// returns its events/s.
func baseline(ctx context.Context, cfg *Config, pats []namespace.Pattern, srv *servers) (float64, error) {
	db, err := openBaselineDB(ctx, cfg, txnSchema)
	if err != nil {
		return 0, err
	}
	defer db.Close()
	st := newState(cfg)
	dec, err := newPlainDecider(cfg, pats, st)
	if err != nil {
		return 0, err
	}
	dec.prefill(st)
	g := newGenerator(cfg)
	txns := &baselineTxns{db: db, client: &http.Client{}, srv: srv}
	pending := make([][][]byte, cfg.ASes)
	start := time.Now()
	n := 0
	for ; n < cfg.Events && time.Since(start) < baselineBudget; n++ {
		s := g.next(n)
		st.apply(s)
		ev := cfg.event(s, time.Now().UnixNano())
		interested, err := dec.decide(ctx, &ev)
		if err != nil {
			return 0, err
		}
		for _, as := range interested {
			pending[as] = append(pending[as], ev.JSON)
			if len(pending[as]) == cfg.MaxEventsPerTxn {
				if err := txns.send(ctx, as, pending[as]); err != nil {
					return 0, err
				}
				pending[as] = pending[as][:0]
			}
		}
	}
	for as := range pending {
		if len(pending[as]) > 0 {
			if err := txns.send(ctx, as, pending[as]); err != nil {
				return 0, err
			}
		}
	}
	return float64(n) / time.Since(start).Seconds(), nil
}

// baselineCatchup is the baseline draining n events queued for AS a while
// it was down: 100 events read, built into a transaction, stored and
// synced, sent and awaited, then deleted, one transaction at a time.
// Filling the backlog is not timed.
func baselineCatchup(ctx context.Context, cfg *Config, a *asServer, n int) (time.Duration, error) {
	db, err := openBaselineDB(ctx, cfg, txnSchema+`; CREATE TABLE backlog (seq INTEGER PRIMARY KEY, data BLOB)`)
	if err != nil {
		return 0, err
	}
	defer db.Close()
	for done := 0; done < n; {
		tx, err := db.BeginTx(ctx, nil)
		if err != nil {
			return 0, err
		}
		for i := 0; i < 1000 && done < n; i, done = i+1, done+1 {
			id := "$c" + strconv.Itoa(done)
			if _, err := tx.Exec(db.q(`INSERT INTO backlog (data) VALUES (?)`), eventJSON(id, "!catchup:"+server, "m.room.message", "@u:"+server, nil, "", cfg.EventSize, 0)); err != nil {
				tx.Rollback()
				return 0, err
			}
		}
		if err := tx.Commit(); err != nil {
			return 0, err
		}
	}
	a.reset()
	one := &servers{as: []*asServer{a}}
	txns := &baselineTxns{db: db, client: &http.Client{}, srv: one}
	start := time.Now()
	var after int64
	events := make([][]byte, 0, cfg.MaxEventsPerTxn)
	for {
		rows, err := db.QueryContext(ctx, db.q(`SELECT seq, data FROM backlog WHERE seq > ? ORDER BY seq LIMIT ?`), after, cfg.MaxEventsPerTxn)
		if err != nil {
			return 0, err
		}
		events = events[:0]
		for rows.Next() {
			var data []byte
			if err := rows.Scan(&after, &data); err != nil {
				rows.Close()
				return 0, err
			}
			events = append(events, data)
		}
		rows.Close()
		if err := rows.Err(); err != nil {
			return 0, err
		}
		if len(events) == 0 {
			break
		}
		if err := txns.send(ctx, 0, events); err != nil {
			return 0, err
		}
		if _, err := db.ExecContext(ctx, db.q(`DELETE FROM backlog WHERE seq <= ?`), after); err != nil {
			return 0, err
		}
	}
	elapsed := time.Since(start)
	if got := a.events.Load(); got != int64(n) {
		return 0, fmt.Errorf("baseline catch-up: AS got %d of %d events", got, n)
	}
	return elapsed, nil
}

// limit measures what this machine can do with the same bytes and nothing
// else: raw inserts into the bench's store (same durability, 1000 rows a
// commit: row by row in SQLite, one array insert in PostgreSQL, the fastest
// plain way of each) and raw loopback PUTs of each AS's share of a round in
// as few bodies as MaxEventsPerTxn allows (100-event bodies at 10 ASes; at
// 10,000 ASes with interest 0.001 each AS gets 20 events a round, so one
// 20-event body: full bodies would count deliveries the workload never
// has), to the same servers, one in flight per AS, at most 64 at once.
// Both are in events/s of the workload.
func limit(ctx context.Context, cfg *Config, srv *servers) (insertRate, putRate float64, err error) {
	db, err := openBaselineDB(ctx, cfg, `CREATE TABLE raw (seq INTEGER PRIMARY KEY, data BLOB)`)
	if err != nil {
		return 0, 0, err
	}
	defer db.Close()
	data := eventJSON("$x", roomID(0), "m.room.message", sender(0), nil, "", cfg.EventSize, 0)
	pg := db.env.backend == StorePostgres
	rows := make([][]byte, 1000)
	for i := range rows {
		rows[i] = data
	}
	start := time.Now()
	for done := 0; done < cfg.Events; {
		tx, err := db.BeginTx(ctx, nil)
		if err != nil {
			return 0, 0, err
		}
		n := min(1000, cfg.Events-done)
		if pg {
			if _, err := tx.Exec(`INSERT INTO raw (data) SELECT unnest($1::BYTEA[])`, rows[:n]); err != nil {
				tx.Rollback()
				return 0, 0, err
			}
		} else {
			for i := 0; i < n; i++ {
				if _, err := tx.Exec(`INSERT INTO raw (data) VALUES (?)`, data); err != nil {
					tx.Rollback()
					return 0, 0, err
				}
			}
		}
		done += n
		if err := tx.Commit(); err != nil {
			return 0, 0, err
		}
	}
	insertRate = float64(cfg.Events) / time.Since(start).Seconds()

	share := max(1, cfg.Events*cfg.perRoom()/cfg.ASes) // events each AS gets a round
	bodyEvents := min(cfg.MaxEventsPerTxn, share)
	body := rawBody(cfg, bodyEvents)
	perAS := (share + bodyEvents - 1) / bodyEvents
	client := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: 64}}
	defer client.CloseIdleConnections()
	work := make(chan *asServer)
	start = time.Now()
	var wg sync.WaitGroup
	for range min(64, len(srv.as)) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for a := range work {
				for i := 0; i < perAS; i++ {
					req, _ := http.NewRequestWithContext(ctx, http.MethodPut, a.url+"/_matrix/app/v1/transactions/limit"+strconv.Itoa(i), bytes.NewReader(body.Bytes()))
					req.Header.Set("Authorization", "Bearer "+a.token)
					req.Header.Set("Content-Type", "application/json")
					if resp, err := client.Do(req); err == nil {
						io.Copy(io.Discard, resp.Body)
						resp.Body.Close()
					}
				}
			}
		}()
	}
	for _, a := range srv.as {
		work <- a
	}
	close(work)
	wg.Wait()
	deliveries := float64(perAS * len(srv.as) * bodyEvents)
	putRate = deliveries / time.Since(start).Seconds() / float64(cfg.perRoom())
	return insertRate, putRate, nil
}

// rawBody is a transaction body of n of the workload's events, for the
// raw PUTs of the limits.
func rawBody(cfg *Config, n int) *bytes.Buffer {
	body := bytes.NewBufferString(`{"events":[`)
	for i := 0; i < n; i++ {
		if i > 0 {
			body.WriteByte(',')
		}
		body.Write(eventJSON("$"+strconv.Itoa(i), "!r:x", "m.room.message", "@u:x", nil, "", cfg.EventSize, 0))
	}
	body.WriteString(`]}`)
	return body
}

// catchupLimit is the least a catch-up of n events to one AS can take here:
// n/MaxEventsPerTxn raw PUTs of a 100-event body, one at a time (the
// order the AS must see), nothing stored.
func catchupLimit(ctx context.Context, cfg *Config, a *asServer, n int) (time.Duration, error) {
	body := rawBody(cfg, cfg.MaxEventsPerTxn)
	client := &http.Client{Transport: &http.Transport{}}
	defer client.CloseIdleConnections()
	start := time.Now()
	for i := 0; i < (n+cfg.MaxEventsPerTxn-1)/cfg.MaxEventsPerTxn; i++ {
		req, err := http.NewRequestWithContext(ctx, http.MethodPut, a.url+"/_matrix/app/v1/transactions/l"+strconv.Itoa(i), bytes.NewReader(body.Bytes()))
		if err != nil {
			return 0, err
		}
		req.Header.Set("Authorization", "Bearer "+a.token)
		resp, err := client.Do(req)
		if err != nil {
			return 0, err
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
	}
	return time.Since(start), nil
}
