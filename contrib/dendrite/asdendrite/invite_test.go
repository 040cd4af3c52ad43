package asdendrite

import (
	"context"
	"testing"

	roomserverAPI "github.com/matrix-org/dendrite/roomserver/api"
	"github.com/matrix-org/gomatrixserverlib/spec"
)

// inviteRS records the order of calls; the rest of the interface is nil.
type inviteRS struct {
	roomserverAPI.RoomserverInternalAPI
	calls *[]string
}

func (r inviteRS) PerformInvite(ctx context.Context, req *roomserverAPI.PerformInviteRequest) error {
	*r.calls = append(*r.calls, "invite "+req.InviteInput.Invitee.String())
	return nil
}

func TestAliasWatcherAsksBeforeInvite(t *testing.T) {
	invitee, err := spec.NewUserID("@mx_new:localhost", true)
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name string
		hook bool
		want []string
	}{
		{"with hook", true, []string{"ask @mx_new:localhost", "invite @mx_new:localhost"}},
		{"without hook", false, []string{"invite @mx_new:localhost"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var calls []string
			w := AliasWatcher{RoomserverInternalAPI: inviteRS{calls: &calls}}
			if tc.hook {
				w.BeforeInvite = func(_ context.Context, u spec.UserID) { calls = append(calls, "ask "+u.String()) }
			}
			if err := w.PerformInvite(context.Background(), &roomserverAPI.PerformInviteRequest{
				InviteInput: roomserverAPI.InviteInput{Invitee: *invitee}}); err != nil {
				t.Fatal(err)
			}
			if len(calls) != len(tc.want) {
				t.Fatalf("calls %q, want %q", calls, tc.want)
			}
			for i := range calls {
				if calls[i] != tc.want[i] {
					t.Fatalf("calls %q, want %q", calls, tc.want)
				}
			}
		})
	}
}
