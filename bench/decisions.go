package bench

import (
	"context"
	"fmt"
	"time"

	"github.com/asdispatch/asdispatch/dispatcher"
	"github.com/asdispatch/asdispatch/namespace"
	"github.com/asdispatch/asdispatch/registry"
)

// decisionBudget is how long each side of the decisions figure runs.
const decisionBudget = 500 * time.Millisecond

// decisionRun feeds the workload's events, with the homeserver's state
// changes and alias invalidations, to decide for at least budget, and
// returns decisions/s. Generating the events is not timed.
func decisionRun(ctx context.Context, cfg *Config, st *state, budget time.Duration, warm int, invalidate func(room string), decide func(*dispatcher.Event) error) (float64, error) {
	// Small chunks: the baseline takes milliseconds an event at 10,000 ASes.
	const chunk = 16
	g := newGenerator(cfg)
	steps := make([]step, chunk)
	evs := make([]dispatcher.Event, chunk)
	var timed time.Duration
	n, e := 0, 0
	for timed < budget {
		for i := range steps {
			steps[i] = g.next(e)
			evs[i] = cfg.event(steps[i], 1)
			e++
		}
		start := time.Now()
		for i := range steps {
			st.apply(steps[i])
			if steps[i].kind == kindAlias {
				invalidate(evs[i].RoomID)
			}
			if err := decide(&evs[i]); err != nil {
				return 0, err
			}
		}
		if e > warm { // a first pass loads the rooms
			timed += time.Since(start)
			n += chunk
		}
	}
	return float64(n) / timed.Seconds(), nil
}

// decisionsFigure times the dispatcher's whole interest decision per event
// (Dispatcher.Interested: sender, state_key, room ID, members, aliases)
// beside the plain per-AS regex loop on the same events.
func decisionsFigure(ctx context.Context, cfg *Config, set *registry.Set, pats []namespace.Pattern) (Figure, error) {
	dcfg := *cfg
	dcfg.EventSize = 0 // only aliases are read from the JSON
	env, err := newStoreEnv(ctx, &dcfg)
	if err != nil {
		return Figure{}, err
	}
	defer env.close()
	st := newState(&dcfg)
	d, err := openDispatcher(ctx, &dcfg, set, env, st, "bench")
	if err != nil {
		return Figure{}, err
	}
	defer d.Close(context.Background())
	rate, err := decisionRun(ctx, &dcfg, st, decisionBudget, dcfg.Rooms, d.InvalidateRoom, func(ev *dispatcher.Event) error {
		_, err := d.Interested(ctx, *ev)
		return err
	})
	if err != nil {
		return Figure{}, fmt.Errorf("decisions: %w", err)
	}
	bst := newState(&dcfg)
	plain, err := newPlainDecider(&dcfg, pats, bst)
	if err != nil {
		return Figure{}, err
	}
	plain.prefill(bst)
	base, err := decisionRun(ctx, &dcfg, bst, decisionBudget, 0, func(string) {}, func(ev *dispatcher.Event) error {
		_, err := plain.decide(ctx, ev)
		return err
	})
	if err != nil {
		return Figure{}, fmt.Errorf("baseline decisions: %w", err)
	}
	return Figure{Name: FigDecisions, Unit: "decisions/s", Value: rate, Baseline: base,
		Note: fmt.Sprintf("%s membership and %s alias changes", formatShare(cfg.Churn), formatShare(cfg.AliasChurn))}, nil
}
