package bench

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"syscall"
	"time"

	"github.com/asdispatch/asdispatch/dispatcher"
	"github.com/asdispatch/asdispatch/queue"
	"github.com/asdispatch/asdispatch/registry"
)

// FigStartup is a server's start: the registration files read from a
// directory, and a dispatcher on its store ready to Submit.
const FigStartup = "start-up: registrations loaded and dispatcher ready"

// startupResult is one start-up measured twice: on a fresh store, where
// every AS is added, and again on that store, as a restart finds it.
// load is the restart's registry.Load alone, cpu the restart's CPU time
// (user and system, of the whole process).
type startupResult struct{ first, restart, load, cpu time.Duration }

// writeRegistrations writes the registration file of every AS of cfg to
// dir, as an operator's directory of them.
func writeRegistrations(cfg *Config, srv *servers, dir string) error {
	for i := 0; i < cfg.ASes; i++ {
		y := cfg.registrationYAML(i, srv.as[i].url, srv.as[i].token)
		if err := os.WriteFile(filepath.Join(dir, fmt.Sprintf("as%05d.yaml", i)), []byte(y), 0o600); err != nil {
			return err
		}
	}
	return nil
}

// startup times registry.Load of cfg's registration files and
// dispatcher.New on the store, as a server starts: first on a fresh store,
// then again on the same one.
func startup(ctx context.Context, cfg *Config, srv *servers) (startupResult, error) {
	dir, err := os.MkdirTemp("", "asdispatch-bench-registrations-")
	if err != nil {
		return startupResult{}, fmt.Errorf("temp dir: %w", err)
	}
	defer os.RemoveAll(dir)
	if err := writeRegistrations(cfg, srv, dir); err != nil {
		return startupResult{}, fmt.Errorf("registrations: %w", err)
	}
	env, err := newStoreEnv(ctx, cfg)
	if err != nil {
		return startupResult{}, err
	}
	defer env.close()
	var load, cpu time.Duration
	start := func() (time.Duration, error) {
		t0, c0 := time.Now(), cpuTime()
		set, _, err := registry.Load(server, dir)
		if err != nil {
			return 0, fmt.Errorf("registrations: %w", err)
		}
		load = time.Since(t0)
		d, err := dispatcher.New(ctx, dispatcher.Config{Registry: registry.NewRegistry(set), OpenStore: env.open,
			Queue: queue.Options{MaxEvents: cfg.MaxEventsPerTxn, MaxBytes: cfg.MaxTxnBytes}})
		if err != nil {
			return 0, fmt.Errorf("dispatcher: %w", err)
		}
		took := time.Since(t0)
		cpu = cpuTime() - c0
		return took, d.Close(ctx)
	}
	var r startupResult
	if r.first, err = start(); err != nil {
		return r, err
	}
	r.restart, err = start()
	r.load, r.cpu = load, cpu
	return r, err
}

// figure reports the slower of the two starts, usually the first.
func (r startupResult) figure() Figure {
	return Figure{Name: FigStartup, Unit: "s", Value: max(r.first, r.restart).Seconds(), LowerIsBetter: true,
		Note: fmt.Sprintf("the slower of a first start on an empty store (%s s) and a restart on it (%s s, of which %s s registry.Load); the registration files read from a directory",
			FormatNumber(r.first.Seconds()), FormatNumber(r.restart.Seconds()), FormatNumber(r.load.Seconds()))}
}

// cpuTime is the process's CPU time so far, user and system: on a shared
// machine a steadier measure of the work than the time it took.
func cpuTime() time.Duration {
	var ru syscall.Rusage
	if syscall.Getrusage(syscall.RUSAGE_SELF, &ru) != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}
