//go:build asdispatch_faults

package main

import (
	"bytes"
	"context"
	"os"
	"strings"
	"syscall"

	"github.com/asdispatch/asdispatch/dispatcher"
	"github.com/asdispatch/asdispatch/homeserver"
)

// Fault points for the end-to-end tests, compiled in only with the
// asdispatch_faults tag. ASDISPATCH_FAULT=kill-before-handover:MARKER makes
// serve SIGKILL itself when it is about to hand an event whose JSON holds
// MARKER over to the dispatcher: the event is in the stub's log, the
// dispatcher has never seen it.
func init() {
	serveFaults = func(cfg *homeserver.Config) {
		marker, ok := strings.CutPrefix(os.Getenv("ASDISPATCH_FAULT"), "kill-before-handover:")
		if !ok || marker == "" {
			return
		}
		cfg.BeforeHandOver = func(_ context.Context, evs []dispatcher.Event) error {
			for _, ev := range evs {
				if bytes.Contains(ev.JSON, []byte(marker)) {
					_ = syscall.Kill(os.Getpid(), syscall.SIGKILL)
					select {} // the signal is on its way
				}
			}
			return nil
		}
	}
}
