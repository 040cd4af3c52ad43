package e2e

import (
	"context"
	"fmt"
	"net/url"
	"os"
	"path/filepath"
	"strconv"
	"testing"
	"time"

	"github.com/matrix-org/dendrite/contrib/asdispatch/internal/harness"
)

// TestStreamCutShortByKill: dendrite-asdispatch killed, and its JetStream
// stream of appservice events comes back without its messages (as it did
// once after a SIGKILL: "could not locate msg block"); the messages sent
// after the restart take sequences that were handed over before and still
// reach the AS, once each, in order.
func TestStreamCutShortByKill(t *testing.T) {
	if testing.Short() {
		t.Skip("starts dendrite-asdispatch twice")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	bin, err := harness.Build(ctx, harness.AsDispatch)
	if err != nil {
		t.Fatal(err)
	}
	as, dir, cfg := startCrashAS(t, true, "")
	hs, err := harness.Start(ctx, bin, cfg, testLog{t})
	if err != nil {
		t.Fatal(err)
	}
	tok, err := harness.Register(ctx, hs.URL, "crash_alice", "crash password")
	if err != nil {
		t.Fatal(err)
	}
	out, err := harness.Call(ctx, "POST", hs.URL+"/_matrix/client/v3/createRoom", tok, map[string]any{"preset": "public_chat"})
	if err != nil {
		t.Fatal(err)
	}
	room := out["room_id"].(string)
	send := func(from, to int) {
		for i := from; i < to; i++ {
			if _, err := harness.Call(ctx, "PUT", fmt.Sprintf("%s/_matrix/client/v3/rooms/%s/send/m.room.message/c%d", hs.URL, url.PathEscape(room), i), tok,
				map[string]any{"msgtype": "m.text", "body": "m" + strconv.Itoa(i)}); err != nil {
				t.Fatal(err)
			}
		}
	}
	const n = 10
	send(0, n)
	waitFor(t, 60*time.Second, func() bool { as.mu.Lock(); defer as.mu.Unlock(); return len(as.bodies) >= n })
	hs.Kill()

	msgs, err := filepath.Glob(filepath.Join(dir, "jetstream", "jetstream", "*", "streams", "DendriteOutputAppserviceEvent", "msgs"))
	if err != nil || len(msgs) != 1 {
		t.Fatalf("the stream's messages: %v %v", msgs, err)
	}
	if err := os.RemoveAll(msgs[0]); err != nil {
		t.Fatal(err)
	}
	hs, err = harness.Start(ctx, bin, cfg, testLog{t})
	if err != nil {
		t.Fatal(err)
	}
	defer hs.Kill()
	send(n, 2*n)
	waitFor(t, 60*time.Second, func() bool { as.mu.Lock(); defer as.mu.Unlock(); return len(as.bodies) >= 2*n })
	time.Sleep(time.Second) // a duplicate would arrive by now
	as.mu.Lock()
	defer as.mu.Unlock()
	for i, b := range as.bodies {
		if b != "m"+strconv.Itoa(i) {
			t.Fatalf("out of order at %d: %q", i, as.bodies)
		}
	}
	if as.dups > 0 {
		t.Errorf("%d messages delivered twice: %q", as.dups, as.bodies)
	}
}
