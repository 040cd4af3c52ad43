package dispatcher

import (
	"context"
	"fmt"
	"testing"
)

// TestReloadRemoveReAddKeepsSender (issue 13, 4): an AS removed and at once
// re-added keeps a sender: what is submitted after is delivered. The
// removal's stop used to run in a goroutine that could land after the
// re-add's start and stop the only sender.
func TestReloadRemoveReAddKeepsSender(t *testing.T) {
	ctx := context.Background()
	as := newTokenAS(t, "hs-irc")
	irc := fmt.Sprintf("id: irc\nurl: %s\nas_token: as-irc\nhs_token: hs-irc\nsender_localpart: ircbot\nnamespaces:\n  users: [{exclusive: true, regex: '@irc_.*'}]\n", as.srv.URL)
	other := registration("other", "", "@other_.*", "", "", false)
	d := newTestDispatcher(t, &roomState{}, irc, other)
	var want []string
	for i := 0; i < 30; i++ {
		if err := d.Reload(ctx, setOf(t, other)); err != nil {
			t.Fatal(err)
		}
		if err := d.Reload(ctx, setOf(t, irc, other)); err != nil {
			t.Fatal(err)
		}
		id := fmt.Sprintf("$%d", i)
		if err := d.Submit(ctx, ev(id, "!r:hs", "m.room.message", "@irc_x:hs", nil, "")); err != nil {
			t.Fatal(err)
		}
		want = append(want, id)
		waitIDs(t, as, want)
	}
}
