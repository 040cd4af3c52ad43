package e2e

import (
	"context"
	"fmt"
	"net/url"
	"strconv"
	"testing"
	"time"

	"github.com/matrix-org/dendrite/contrib/asdispatch/internal/harness"
)

// TestPingWakesSender: an AS that was down and pings the homeserver when it
// is back gets its backlog at once, not after the sender's backoff (30 s
// here). Dendrite v0.13.8 has no ping endpoint; dendrite-asdispatch adds it.
func TestPingWakesSender(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	bin, err := harness.Build(ctx, harness.AsDispatch)
	if err != nil {
		t.Fatal(err)
	}
	as, _, cfg := startCrashAS(t, false, "appservice:\n  retry_initial: 30s\n  retry_max: 30s\n")
	hs, err := harness.Start(ctx, bin, cfg, testLog{t})
	if err != nil {
		t.Fatal(err)
	}
	defer hs.Kill()
	tok, err := harness.Register(ctx, hs.URL, "crash_alice", "crash password")
	if err != nil {
		t.Fatal(err)
	}
	c := hs.URL + "/_matrix/client/v3"
	out, err := harness.Call(ctx, "POST", c+"/createRoom", tok, map[string]any{"preset": "public_chat"})
	if err != nil {
		t.Fatal(err)
	}
	room := out["room_id"].(string)
	const n = 5
	for i := 0; i < n; i++ {
		if _, err := harness.Call(ctx, "PUT", fmt.Sprintf("%s/rooms/%s/send/m.room.message/p%d", c, url.PathEscape(room), i), tok,
			map[string]any{"msgtype": "m.text", "body": "m" + strconv.Itoa(i)}); err != nil {
			t.Fatal(err)
		}
	}
	waitFor(t, 30*time.Second, func() bool { as.mu.Lock(); defer as.mu.Unlock(); return as.attempts > 0 })
	as.mu.Lock()
	as.up = true
	as.mu.Unlock()

	ping := hs.URL + "/_matrix/client/v1/appservice/crash/ping"
	if _, err := harness.Call(ctx, "POST", ping, tok, map[string]any{}); err == nil {
		t.Fatal("a user's token pinged the AS")
	}
	res, err := harness.Call(ctx, "POST", ping, "as-crash", map[string]any{"transaction_id": "back"})
	if err != nil {
		t.Fatal(err)
	}
	if _, ok := res["duration_ms"]; !ok {
		t.Fatalf("ping answered %v", res)
	}
	waitFor(t, 10*time.Second, func() bool { as.mu.Lock(); defer as.mu.Unlock(); return len(as.bodies) >= n })
}
