package dispatcher_test

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"os"
	"sync"
	"time"

	"github.com/asdispatch/asdispatch/dispatcher"
	"github.com/asdispatch/asdispatch/registry"
)

// A homeserver's event log is the source of truth: it hands each event over
// with its stream ordering as the position, and on start replays its log
// after Position before it takes new events. Here it crashes after
// persisting event 5 but before handing it over; on restart the replay
// hands it over, and the AS gets every event once.
func Example_replay() {
	ctx := context.Background()

	// The AS: it prints each event once per transaction id, as an AS
	// dedups a retried transaction.
	var mu sync.Mutex
	seen := map[string]bool{}
	var got []string
	as := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		var txn struct {
			Events []struct {
				ID string `json:"event_id"`
			} `json:"events"`
		}
		_ = json.NewDecoder(r.Body).Decode(&txn)
		mu.Lock()
		if !seen[r.URL.Path] {
			seen[r.URL.Path] = true
			for _, e := range txn.Events {
				got = append(got, e.ID)
			}
		}
		mu.Unlock()
		w.Write([]byte("{}"))
	}))
	defer as.Close()

	reg, _, err := registry.Parse("bridge.yaml", []byte(`id: bridge
url: `+as.URL+`
as_token: as_secret
hs_token: hs_secret
sender_localpart: bridgebot
namespaces:
  users: [{exclusive: true, regex: "@bridge_.*"}]
`))
	if err != nil {
		panic(err)
	}
	set, _, err := registry.NewSet("example.org", []*registry.Registration{reg})
	if err != nil {
		panic(err)
	}
	dir, err := os.MkdirTemp("", "example")
	if err != nil {
		panic(err)
	}
	defer os.RemoveAll(dir)

	// The homeserver's log: event stream ordering 1..3 so far.
	var hsLog []dispatcher.Event
	persist := func(pos int64) dispatcher.Event {
		id := fmt.Sprintf("$ev%d", pos)
		hsLog = append(hsLog, dispatcher.Event{
			ID: id, RoomID: "!room:example.org", Type: "m.room.message", Sender: "@bridge_alice:example.org",
			JSON: []byte(`{"event_id":"` + id + `","type":"m.room.message","content":{"body":"hi"}}`),
			At:   dispatcher.Position{Stream: "events", Pos: pos},
		})
		return hsLog[len(hsLog)-1]
	}
	for pos := int64(1); pos <= 3; pos++ {
		persist(pos)
	}

	// start opens the dispatcher and replays the log after its position,
	// before the homeserver takes new events.
	start := func() *dispatcher.Dispatcher {
		d, err := dispatcher.New(ctx, dispatcher.Config{Registry: registry.NewRegistry(set), DataDir: dir})
		if err != nil {
			panic(err)
		}
		after, err := d.Position(ctx, "events")
		if err != nil {
			panic(err)
		}
		var replay []dispatcher.Event
		for _, ev := range hsLog {
			if ev.At.Pos > after {
				replay = append(replay, ev)
			}
		}
		fmt.Printf("handed over up to %d; replaying %d events\n", after, len(replay))
		if err := d.Submit(ctx, replay...); err != nil {
			panic(err)
		}
		return d
	}

	d := start()
	// Running: each event is persisted, then handed over.
	if err := d.Submit(ctx, persist(4)); err != nil {
		panic(err)
	}
	// Handing over again what the dispatcher has is harmless: skipped.
	if err := d.Submit(ctx, hsLog[2:4]...); err != nil {
		panic(err)
	}
	// Event 5 is persisted; the homeserver crashes before handing it
	// over (a clean Close stands in for the crash).
	persist(5)
	_ = d.Close(ctx)

	d = start()
	defer d.Close(ctx)
	for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(10 * time.Millisecond) {
		mu.Lock()
		n := len(got)
		mu.Unlock()
		if n >= 5 {
			break
		}
	}
	mu.Lock()
	fmt.Println("the AS got", got)
	mu.Unlock()
	// Output:
	// handed over up to 0; replaying 3 events
	// handed over up to 4; replaying 1 events
	// the AS got [$ev1 $ev2 $ev3 $ev4 $ev5]
}
