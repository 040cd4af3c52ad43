package bench

import (
	"context"
	"fmt"
	"strconv"
	"sync"
	"time"

	"github.com/asdispatch/asdispatch/dispatcher"
	"github.com/asdispatch/asdispatch/registry"
)

type catchupResult struct {
	drain         time.Duration
	drainCPU      time.Duration // the process's CPU time while draining
	bytesPerEvent float64
}

// catchup takes AS 0 down (its server answers 503), submits
// cfg.CatchupEvents events only it is interested in (sent by its ghost in a
// room no other AS is in), brings it back and times until it has them all.
// Bringing it back includes Wake, as a homeserver does on a successful ping;
// without it the sender would first wait out its backoff.
func catchup(ctx context.Context, cfg *Config, set *registry.Set, srv *servers) (*catchupResult, error) {
	env, err := newStoreEnv(ctx, cfg)
	if err != nil {
		return nil, err
	}
	defer env.close()
	a := srv.as[0]
	srv.reset()
	a.down.Store(true)
	defer a.down.Store(false)
	d, err := openDispatcher(ctx, cfg, set, env, newState(cfg), "bench")
	if err != nil {
		return nil, err
	}
	defer d.Close(context.Background())
	empty := env.size(ctx)
	n := cfg.CatchupEvents
	const writers, batch = 4, 200
	room := "!catchup:" + server
	ghost := cfg.ghost(0, 0)
	var wg sync.WaitGroup
	errc := make(chan error, writers)
	for w := 0; w < writers; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			evs := make([]dispatcher.Event, 0, batch)
			for e := w; e < n; e += writers {
				id := "$c" + strconv.Itoa(e)
				evs = append(evs, dispatcher.Event{ID: id, RoomID: room, Type: "m.room.message", Sender: ghost,
					JSON: eventJSON(id, room, "m.room.message", ghost, nil, "", cfg.EventSize, 0)})
				if len(evs) == batch || e+writers >= n {
					if err := d.Submit(ctx, evs...); err != nil {
						errc <- err
						return
					}
					evs = evs[:0]
				}
			}
		}()
	}
	wg.Wait()
	select {
	case err := <-errc:
		return nil, fmt.Errorf("submit: %w", err)
	default:
	}
	res := &catchupResult{bytesPerEvent: float64(env.size(ctx)-empty) / float64(n)}
	if got := a.events.Load(); got != 0 {
		return nil, fmt.Errorf("a down AS accepted %d events", got)
	}
	a.down.Store(false)
	if cfg.profile != nil {
		defer cfg.profile()()
	}
	d.Wake(set.All()[0].ID)
	cpu0 := cpuTime()
	start := time.Now()
	deadline := start.Add(30 * time.Minute)
	for a.events.Load() < int64(n) {
		if time.Now().After(deadline) {
			return nil, fmt.Errorf("%d of %d events after %s", a.events.Load(), n, time.Since(start))
		}
		time.Sleep(time.Millisecond)
	}
	res.drain = time.Since(start)
	res.drainCPU = cpuTime() - cpu0
	if got := a.events.Load(); got != int64(n) {
		return nil, fmt.Errorf("AS got %d events, want %d", got, n)
	}
	return res, nil
}
