package bench

import (
	"bytes"
	"context"
	"image/png"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"

	"github.com/asdispatch/asdispatch/namespace"
	"github.com/asdispatch/asdispatch/registry"
	"github.com/asdispatch/asdispatch/txnstore/pgtest"
)

func tiny() Config {
	return Config{ASes: 3, Rooms: 5, Interest: 0.5, Events: 400, Rounds: 1, MaxEventsPerTxn: 20,
		CatchupEvents: 300, BaselineCatchupEvents: 100, Churn: 0.1, AliasChurn: 0.05}
}

func TestRunSmall(t *testing.T) {
	if testing.Short() {
		t.Skip("starts servers and databases")
	}
	var last, total int
	rep, err := Run(context.Background(), tiny(), func(_ string, done, n int) {
		if done != last+1 || (total != 0 && n != total) {
			t.Errorf("progress %d/%d after %d/%d", done, n, last, total)
		}
		last, total = done, n
	})
	if err != nil {
		t.Fatal(err)
	}
	if last != total { // a bar that never ends
		t.Errorf("progress ended at %d/%d", last, total)
	}
	for _, f := range rep.Figures {
		if f.Value <= 0 {
			t.Errorf("%s has no value", f.Name)
		}
	}
	tests := []struct {
		name            string
		baseline, limit bool
	}{
		{FigMatcher, true, false},
		{FigDecisions, true, false},
		{FigSubmit, true, true},
		{FigEndToEnd, true, true},
		{FigHalfP99, false, false},
		{FigCatchup, true, true},
		{FigStored, false, false},
		{FigBacklogged, false, false},
		{FigRSS, false, false},
		{FigGoroutines, false, false},
		{FigStartup, false, false},
	}
	for _, tt := range tests {
		f, ok := rep.Figure(tt.name)
		if !ok {
			t.Errorf("no %q figure", tt.name)
			continue
		}
		if tt.baseline != (f.Baseline > 0) || tt.limit != (f.Limit > 0) {
			t.Errorf("%s: baseline %v, limit %v; want baseline %v, limit %v", tt.name, f.Baseline, f.Limit, tt.baseline, tt.limit)
		}
	}
	if f, _ := rep.Figure(FigCatchup); !strings.Contains(f.Note, "extrapolated linearly from 100 events") {
		t.Errorf("catch-up note does not say the baseline is extrapolated: %q", f.Note)
	}
}

// TestDecisionsFollowState checks, for each namespace mix, that the
// dispatcher's decision and the baseline's plain loop both give every event
// exactly the ASes the homeserver's state says, through membership churn
// and alias changes (which invalidate the room).
func TestDecisionsFollowState(t *testing.T) {
	tests := []struct {
		mix      string
		ases     int
		interest float64
	}{
		{"prefix,suffix,alternation", 10, 1},
		{"noliteral", 7, 0.3},
		{"suffix,noliteral", 20, 0.1},
		{"casefold", 7, 0.3},
		{"prefix,casefold,noliteral", 20, 0.1},
		{"alternation", 1, 1},
	}
	for _, tt := range tests {
		t.Run(tt.mix, func(t *testing.T) {
			ctx := context.Background()
			mix, err := ParseMix(tt.mix)
			if err != nil {
				t.Fatal(err)
			}
			cfg := Config{ASes: tt.ases, Rooms: 7, Interest: tt.interest, Mix: mix, Namespaces: 2, Churn: 0.2, AliasChurn: 0.1, EventSize: 1}
			cfg.defaults()
			_, set, pats := setup(t, &cfg, true)
			st, bst := newState(&cfg), newState(&cfg)
			d, err := openDispatcher(ctx, &cfg, set, &storeEnv{backend: StoreSQLite, dir: t.TempDir()}, st, "test")
			if err != nil {
				t.Fatal(err)
			}
			defer d.Close(ctx)
			plain, err := newPlainDecider(&cfg, pats, bst)
			if err != nil {
				t.Fatal(err)
			}
			g, bg := newGenerator(&cfg), newGenerator(&cfg)
			kinds := map[int]int{}
			for e := 0; e < 600; e++ {
				s := g.next(e)
				kinds[s.kind]++
				want := idsOf(st.apply(s))
				bst.apply(bg.next(e))
				ev := cfg.event(s, 1)
				if s.kind == kindAlias {
					d.InvalidateRoom(ev.RoomID)
				}
				got, err := d.Interested(ctx, ev)
				if err != nil {
					t.Fatal(err)
				}
				if !slices.Equal(got, want) {
					t.Fatalf("event %d (%s): dispatcher says %v, state says %v", e, ev.Type, got, want)
				}
				bIdx, err := plain.decide(ctx, &ev)
				if err != nil {
					t.Fatal(err)
				}
				if b := idsOf(slices.Clone(bIdx)); !slices.Equal(b, want) {
					t.Fatalf("event %d (%s): baseline says %v, state says %v", e, ev.Type, b, want)
				}
			}
			if kinds[kindMember] == 0 || kinds[kindAlias] == 0 {
				t.Errorf("workload lacks churn: %v", kinds)
			}
		})
	}
}

func idsOf(idx []int) []string {
	out := make([]string, len(idx))
	for i, as := range idx {
		out[i] = "as" + strconv.Itoa(as)
	}
	slices.Sort(out)
	return out
}

func TestParseMix(t *testing.T) {
	tests := []struct {
		in   string
		want []string
		ok   bool
	}{
		{"prefix", []string{MixPrefix}, true},
		{"prefix, noliteral", []string{MixPrefix, MixNoLiteral}, true},
		{"suffix,alternation", []string{MixSuffix, MixAlternation}, true},
		{"glob", nil, false},
		{"", nil, false},
	}
	for _, tt := range tests {
		got, err := ParseMix(tt.in)
		if (err == nil) != tt.ok || !slices.Equal(got, tt.want) {
			t.Errorf("ParseMix(%q) = %v, %v; want %v (ok %v)", tt.in, got, err, tt.want, tt.ok)
		}
	}
}

func TestParseSweep(t *testing.T) {
	tests := []struct {
		in   string
		want []int
		ok   bool
	}{
		{"ases=10,100,1000,10000", []int{10, 100, 1000, 10000}, true},
		{"ases=2", []int{2}, true},
		{"ases=0", nil, false},
		{"rooms=1,2", nil, false},
		{"ases", nil, false},
	}
	for _, tt := range tests {
		got, err := ParseSweep(tt.in)
		if (err == nil) != tt.ok || !slices.Equal(got.ASes, tt.want) {
			t.Errorf("ParseSweep(%q) = %v, %v; want %v (ok %v)", tt.in, got.ASes, err, tt.want, tt.ok)
		}
	}
}

func TestSweepPointScales(t *testing.T) {
	sw := Sweep{}
	tests := []struct {
		ases     int
		interest float64
		events   int
	}{
		{10, 1, 20000},
		{100, 0.1, 20000},
		{1000, 0.01, 20000},
		{10000, 0.001, 2000},
	}
	if c := sw.Point(Config{CatchupEvents: -1}, 10000); c.CatchupEvents > 0 {
		t.Errorf("a skipped catch-up comes back in the sweep: %d events", c.CatchupEvents)
	}
	for _, tt := range tests {
		c := sw.Point(Config{}, tt.ases)
		if c.ASes != tt.ases || c.Interest != tt.interest || c.Events != tt.events || c.perRoom() > sweepDeliveries {
			t.Errorf("%d ASes: got %d ASes, interest %v, %d events, %d a room", tt.ases, c.ASes, c.Interest, c.Events, c.perRoom())
		}
	}
}

func TestSweepTinyWritesPNG(t *testing.T) {
	if testing.Short() {
		t.Skip("starts servers and databases")
	}
	sw, err := ParseSweep("ases=2,4")
	if err != nil {
		t.Fatal(err)
	}
	base := tiny()
	base.Events, base.CatchupEvents = 200, 200
	res, err := RunSweep(context.Background(), base, sw, nil)
	if err != nil {
		t.Fatal(err)
	}
	if len(res.Reports) != 2 || res.Reports[1].Config.ASes != 4 {
		t.Fatalf("want a report for 2 and 4 ASes, got %d", len(res.Reports))
	}
	var tbl bytes.Buffer
	res.WriteTable(&tbl)
	if !strings.Contains(tbl.String(), "4 ASes") || !strings.Contains(tbl.String(), FigDecisions) {
		t.Errorf("table lacks a column or a figure:\n%s", tbl.String())
	}
	path := filepath.Join(t.TempDir(), "sweep.png")
	if err := res.Plot(path); err != nil {
		t.Fatal(err)
	}
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	img, err := png.Decode(f)
	if err != nil {
		t.Fatalf("not a PNG: %v", err)
	}
	if b := img.Bounds(); b.Dx() < 500 || b.Dy() < 300 {
		t.Errorf("plot is %v", b)
	}
}

func TestCatchupDrains(t *testing.T) {
	if testing.Short() {
		t.Skip("starts servers and databases")
	}
	ctx := context.Background()
	cfg := tiny()
	cfg.defaults()
	srv, set, _ := setup(t, &cfg, false)
	res, err := catchup(ctx, &cfg, set, srv)
	if err != nil {
		t.Fatal(err)
	}
	if res.drain <= 0 || res.bytesPerEvent < float64(cfg.EventSize)/2 {
		t.Errorf("drain %v, %.0f bytes/event", res.drain, res.bytesPerEvent)
	}
	if got := srv.as[0].events.Load(); got != int64(cfg.CatchupEvents) {
		t.Errorf("AS got %d events, want %d", got, cfg.CatchupEvents)
	}
	if _, err := baselineCatchup(ctx, &cfg, srv.as[0], 250); err != nil {
		t.Fatal(err)
	}
}

func TestSharedServerRoutesByPathAndToken(t *testing.T) {
	srv, err := startServers(3, true)
	if err != nil {
		t.Fatal(err)
	}
	defer srv.close()
	body := `{"events":[` + string(eventJSON("$1", "!r:x", "m.room.message", "@u:x", nil, "", 100, 1)) + `]}`
	tests := []struct {
		as, token int
		down      bool
		want      int
	}{
		{1, 1, false, http.StatusOK},
		{2, 1, false, http.StatusForbidden},
		{0, 0, true, http.StatusServiceUnavailable},
	}
	for _, tt := range tests {
		a := srv.as[tt.as]
		a.down.Store(tt.down)
		req, _ := http.NewRequest(http.MethodPut, a.url+"/_matrix/app/v1/transactions/1", strings.NewReader(body))
		req.Header.Set("Authorization", "Bearer "+srv.as[tt.token].token)
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != tt.want {
			t.Errorf("AS %d with AS %d's token: %s, want %d", tt.as, tt.token, resp.Status, tt.want)
		}
	}
	if srv.as[1].events.Load() != 1 || srv.as[0].events.Load() != 0 || srv.as[2].events.Load() != 0 {
		t.Errorf("counts %d %d %d, want 0 1 0", srv.as[0].events.Load(), srv.as[1].events.Load(), srv.as[2].events.Load())
	}
}

// TestRunPostgres runs the whole bench on PostgreSQL with two dispatcher
// instances sharing the store; it skips without a server unless CI is set.
func TestRunPostgres(t *testing.T) {
	if testing.Short() {
		t.Skip("starts servers and databases")
	}
	cfg := tiny()
	cfg.Store, cfg.DSN, cfg.Processes = StorePostgres, pgtest.Schema(t), []int{1, 2}
	rep, err := Run(context.Background(), cfg, nil)
	if err != nil {
		t.Fatal(err)
	}
	for _, name := range []string{FigSubmit, FigEndToEnd, FigCatchup, FigStored, "end to end, 1 process", "end to end, 2 processes"} {
		if f, ok := rep.Figure(name); !ok || f.Value <= 0 {
			t.Errorf("%s = %+v", name, f)
		}
	}
	if f, _ := rep.Figure(FigStored); !strings.Contains(f.Note, "tables") {
		t.Errorf("stored bytes note %q does not say it weighs tables", f.Note)
	}
	cfg.Store = StoreSQLite
	if _, err := Run(context.Background(), cfg, nil); err == nil {
		t.Error("two instances on one SQLite file were not refused")
	}
}

// setup starts the AS servers of cfg (one shared server if shared) and
// builds the registrations; the servers close when tb ends.
func setup(tb testing.TB, cfg *Config, shared bool) (*servers, *registry.Set, []namespace.Pattern) {
	tb.Helper()
	srv, err := startServers(cfg.ASes, shared)
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(srv.close)
	set, pats, err := cfg.buildSet(func(i int) string { return srv.as[i].url }, func(i int) string { return srv.as[i].token })
	if err != nil {
		tb.Fatal(err)
	}
	return srv, set, pats
}
