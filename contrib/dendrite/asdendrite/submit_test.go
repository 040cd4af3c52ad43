package asdendrite

import (
	"context"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	"go.uber.org/zap"

	"github.com/asdispatch/asdispatch/dispatcher"
	"github.com/asdispatch/asdispatch/registry"
)

// An event the dispatcher can never take does not block the stream: the
// batch is retried one by one, the bad event dropped, the others queued.
func TestSubmitDropsOnlyTheUnqueueable(t *testing.T) {
	var mu sync.Mutex
	var got []string
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		var txn struct {
			Events []struct {
				EventID string `json:"event_id"`
			} `json:"events"`
		}
		json.NewDecoder(r.Body).Decode(&txn)
		mu.Lock()
		for _, e := range txn.Events {
			got = append(got, e.EventID)
		}
		mu.Unlock()
		w.Write([]byte("{}"))
	}))
	defer srv.Close()
	set, _, err := registry.Load("example.org", writeReg(t, t.TempDir(), "irc.yaml", ircReg(srv.URL)))
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	d, err := dispatcher.New(ctx, dispatcher.Config{Registry: registry.NewRegistry(set), DataDir: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close(ctx)
	a := &API{d: d, log: zap.NewNop()}
	ev := func(id, js string) item {
		return item{ev: dispatcher.Event{ID: id, RoomID: "!r:example.org", Type: "m.room.message", Sender: "@irc_bob:example.org", JSON: []byte(js)}}
	}
	items := []item{ev("$1", `{"event_id":"$1"}`), ev("$bad", `{"event_id":`), ev("$2", `{"event_id":"$2"}`)}
	if err := a.submit(ctx, items); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		mu.Lock()
		s := strings.Join(got, ",")
		mu.Unlock()
		if s == "$1,$2" {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the AS got %q, want $1,$2", s)
		}
		time.Sleep(10 * time.Millisecond)
	}
}
