package main

import (
	"bytes"
	"context"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/asdispatch/asdispatch/dispatcher"
	"github.com/asdispatch/asdispatch/queue"
	"github.com/asdispatch/asdispatch/registry"
	"github.com/asdispatch/asdispatch/txnstore"
	"github.com/asdispatch/asdispatch/txnstore/pgtest"
)

func TestStatusWhileAnASIsDown(t *testing.T) {
	dir := t.TempDir()
	testStatusWhileAnASIsDown(t, dispatcher.Config{DataDir: dir}, "--data", dir)
	var missing bytes.Buffer
	if code := run([]string{"status", "--data", t.TempDir()}, &missing, &missing); code != 1 {
		t.Errorf("status of an empty dir exited %d", code)
	}
}

func TestStatusPostgres(t *testing.T) {
	dsn := pgtest.Schema(t)
	testStatusWhileAnASIsDown(t, dispatcher.Config{OpenStore: func(ctx context.Context, opts txnstore.Options) (txnstore.Store, error) {
		return txnstore.OpenPostgres(ctx, dsn, opts)
	}}, "--dsn", dsn)
}

// testStatusWhileAnASIsDown runs `status` with where (the store's flags)
// beside a dispatcher of cfg whose only AS fails.
func testStatusWhileAnASIsDown(t *testing.T, cfg dispatcher.Config, where ...string) {
	down := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { w.WriteHeader(500) }))
	defer down.Close()
	r, _, err := registry.Parse("down.yaml", []byte("id: flaky\nurl: "+down.URL+"\nas_token: as-secret-x\nhs_token: hs-secret-x\nsender_localpart: flakybot\nnamespaces:\n  users: [{exclusive: true, regex: '@f_.*'}]\n"))
	if err != nil {
		t.Fatal(err)
	}
	set, _, _ := registry.NewSet("hs", []*registry.Registration{r})
	cfg.Registry = registry.NewRegistry(set)
	cfg.Queue = queue.Options{RetryInitial: time.Hour, RetryMax: time.Hour}
	d, err := dispatcher.New(context.Background(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close(context.Background())
	ev := dispatcher.Event{ID: "$1", RoomID: "!r:hs", Type: "m.room.message", Sender: "@f_bob:hs", JSON: []byte(`{"event_id":"$1"}`)}
	if err := d.Submit(context.Background(), ev); err != nil {
		t.Fatal(err)
	}
	// Wait for the first failure to be recorded.
	deadline := time.Now().Add(10 * time.Second)
	for {
		var out bytes.Buffer
		run(append([]string{"status", "--json"}, where...), &out, &out)
		var got struct {
			AppServices []statusRow `json:"appservices"`
		}
		json.Unmarshal(out.Bytes(), &got)
		if len(got.AppServices) == 1 && got.AppServices[0].State == "down" {
			row := got.AppServices[0]
			if row.ID != "flaky" || row.BacklogEvents != 1 || row.BacklogTxns != 1 || row.NextRetry == "" || !strings.Contains(row.LastError, "500") {
				t.Errorf("status row %+v", row)
			}
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("status never showed the AS down: %s", out.String())
		}
		time.Sleep(20 * time.Millisecond)
	}
	var table bytes.Buffer
	if code := run(append([]string{"status"}, where...), &table, &table); code != 0 {
		t.Fatalf("status exited %d: %s", code, table.String())
	}
	if !strings.Contains(table.String(), "flaky") || !strings.Contains(table.String(), "down") || strings.Contains(table.String(), "secret") {
		t.Errorf("table:\n%s", table.String())
	}
}

func TestBenchJSON(t *testing.T) {
	if testing.Short() {
		t.Skip("starts servers and databases")
	}
	var out, errOut bytes.Buffer
	if code := run([]string{"bench", "--ases", "2", "--events", "200", "--rounds", "1", "--rooms", "3", "--json"}, &out, &errOut); code != 0 {
		t.Fatalf("bench exited %d: %s", code, errOut.String())
	}
	var rep struct {
		Figures []struct {
			Name  string
			Value float64
		}
	}
	if err := json.Unmarshal(out.Bytes(), &rep); err != nil || len(rep.Figures) < 3 {
		t.Fatalf("bench --json: %v %s", err, out.String())
	}
}
