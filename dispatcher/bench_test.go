package dispatcher

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"

	"github.com/asdispatch/asdispatch/registry"
	"github.com/asdispatch/asdispatch/txnstore"
)

// benchSet builds n ASes with the namespace mix bridges use: a literal
// prefix, a server suffix and an alternation each.
func benchSet(b *testing.B, n int) *registry.Set {
	b.Helper()
	regs := make([]*registry.Registration, n)
	for i := range regs {
		y := fmt.Sprintf(`id: as%d
url: http://127.0.0.1:1
as_token: as-%d
hs_token: hs-%d
sender_localpart: bot%d
namespaces:
  users:
    - {exclusive: true, regex: "@_as%d_.*"}
    - {exclusive: false, regex: "@.*:as%d\\.bridge\\.example\\.org"}
    - {exclusive: true, regex: "@(tg|sig)%d_.*"}
  aliases:
    - {exclusive: true, regex: "#_as%d_.*"}
`, i, i, i, i, i, i, i, i)
		r, _, err := registry.Parse(fmt.Sprintf("as%d.yaml", i), []byte(y))
		if err != nil {
			b.Fatal(err)
		}
		regs[i] = r
	}
	set, _, err := registry.NewSet("hs", regs)
	if err != nil {
		b.Fatal(err)
	}
	return set
}

// BenchmarkDecide measures the interest decision alone (no store): the
// per-event cost that must not grow with the number of ASes.
func BenchmarkDecide(b *testing.B) {
	for _, n := range []int{10, 10000} {
		b.Run(fmt.Sprintf("ases=%d", n), func(b *testing.B) {
			set := benchSet(b, n)
			st := &roomState{members: map[string][]string{}}
			const rooms = 1000
			for r := 0; r < rooms; r++ {
				st.members[fmt.Sprintf("!room%d:hs", r)] = []string{"@alice:hs", fmt.Sprintf("@_as%d_ghost:hs", r%n)}
			}
			d := &Dispatcher{}
			v := &view{set: set, rooms: newRooms(set, st, 100000, newRoomLocks())}
			v.keys, v.push, v.eph = make([]txnstore.ASKey, n), make([]bool, n), make([]bool, n)
			for i := range v.keys {
				v.keys[i], v.push[i] = txnstore.ASKey(i+1), true
			}
			d.view.Store(v)
			events := make([]Event, 4096)
			for i := range events {
				sender := "@alice:hs"
				if i%3 == 0 {
					sender = fmt.Sprintf("@_as%d_user%d:hs", i%n, i)
				}
				events[i] = Event{ID: fmt.Sprintf("$%d", i), RoomID: fmt.Sprintf("!room%d:hs", i%rooms), Type: "m.room.message", Sender: sender}
			}
			ctx := context.Background()
			var sc scratch
			for i := range events { // warm the room cache
				d.decide(ctx, v, &events[i], &sc)
			}
			b.ReportAllocs()
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				if _, err := d.decide(ctx, v, &events[i%len(events)], &sc); err != nil {
					b.Fatal(err)
				}
			}
			b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "events/s")
		})
	}
}

// BenchmarkSubmit measures durable Submit with 10 ASes each interested in
// every event, while their senders deliver to a real HTTP AS on 127.0.0.1.
// Compare with txnstore's BenchmarkRawInsert (the same bytes, no dispatch).
// positions=on hands each event over with its position, each writer on a
// stream of its own (as a sharded homeserver's event persisters); the two
// runs of one invocation compare their cost.
func BenchmarkSubmit(b *testing.B) {
	for _, positions := range []bool{false, true} {
		name := "positions=off"
		if positions {
			name = "positions=on"
		}
		b.Run(name, func(b *testing.B) { benchSubmit(b, positions) })
	}
}

func benchSubmit(b *testing.B, positions bool) {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.Copy(io.Discard, r.Body)
		w.Write([]byte("{}"))
	}))
	defer srv.Close()
	var regs []*registry.Registration
	for i := 0; i < 10; i++ {
		r, _, err := registry.Parse("b.yaml", []byte(registration(fmt.Sprintf("as%d", i), srv.URL, `@irc_.*`, "", "", false)))
		if err != nil {
			b.Fatal(err)
		}
		regs = append(regs, r)
	}
	set, _, err := registry.NewSet("hs", regs)
	if err != nil {
		b.Fatal(err)
	}
	d, err := New(context.Background(), Config{Registry: registry.NewRegistry(set), DataDir: b.TempDir()})
	if err != nil {
		b.Fatal(err)
	}
	defer d.Close(context.Background())
	body := strings.Repeat("x", 400)
	const writers, batch = 8, 50
	per := (b.N + writers - 1) / writers
	b.ResetTimer()
	var wg sync.WaitGroup
	for w := 0; w < writers; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			evs := make([]Event, batch)
			stream := fmt.Sprintf("events/w%d", w)
			for done := 0; done < per; done += batch {
				n := min(batch, per-done)
				for i := range evs[:n] {
					id := fmt.Sprintf("$w%d_%d", w, done+i)
					evs[i] = Event{ID: id, RoomID: fmt.Sprintf("!r%d:hs", i%20), Type: "m.room.message", Sender: "@irc_x:hs",
						JSON: []byte(`{"event_id":"` + id + `","type":"m.room.message","content":{"body":"` + body + `"}}`)}
					if positions {
						evs[i].At = Position{Stream: stream, Pos: int64(done + i + 1)}
					}
				}
				if err := d.Submit(context.Background(), evs[:n]...); err != nil {
					b.Error(err)
					return
				}
			}
		}()
	}
	wg.Wait()
	b.ReportMetric(float64(per*writers)/b.Elapsed().Seconds(), "events/s")
}
