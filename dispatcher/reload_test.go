package dispatcher

import (
	"context"
	"fmt"
	"net/http"
	"net/http/httptest"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/asdispatch/asdispatch/registry"
)

func setOf(t *testing.T, regs ...string) *registry.Set {
	t.Helper()
	var parsed []*registry.Registration
	for i, y := range regs {
		r, _, err := registry.Parse(fmt.Sprintf("reg%d.yaml", i), []byte(y))
		if err != nil {
			t.Fatal(err)
		}
		parsed = append(parsed, r)
	}
	set, _, err := registry.NewSet("hs", parsed)
	if err != nil {
		t.Fatal(err)
	}
	return set
}

// tokenAS accepts transactions only with its current token.
type tokenAS struct {
	mu    sync.Mutex
	token string
	ids   []string
	seen  map[string]bool
	srv   *httptest.Server
}

func newTokenAS(t *testing.T, token string) *tokenAS {
	a := &tokenAS{token: token, seen: map[string]bool{}}
	a.srv = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		a.mu.Lock()
		defer a.mu.Unlock()
		if r.Header.Get("Authorization") != "Bearer "+a.token {
			w.WriteHeader(http.StatusForbidden)
			return
		}
		var txn struct {
			Events []struct {
				EventID string `json:"event_id"`
			} `json:"events"`
		}
		decodeJSON(r, &txn)
		if !a.seen[r.URL.Path] {
			a.seen[r.URL.Path] = true
			for _, e := range txn.Events {
				a.ids = append(a.ids, e.EventID)
			}
		}
		w.Write([]byte("{}"))
	}))
	t.Cleanup(a.srv.Close)
	return a
}

func (a *tokenAS) got() []string {
	a.mu.Lock()
	defer a.mu.Unlock()
	return slices.Clone(a.ids)
}

func waitIDs(t *testing.T, a *tokenAS, want []string) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !slices.Equal(a.got(), want) {
		if time.Now().After(deadline) {
			t.Fatalf("AS got %v, want %v", a.got(), want)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func TestReload(t *testing.T) {
	ctx := context.Background()
	oldAS, newAS := newTokenAS(t, "hs-irc"), newTokenAS(t, "hs-irc")
	other := newTokenAS(t, "hs-other")
	irc := func(url, hsToken string) string {
		return fmt.Sprintf("id: irc\nurl: %s\nas_token: as-irc\nhs_token: %s\nsender_localpart: ircbot\nnamespaces:\n  users: [{exclusive: true, regex: '@irc_.*'}]\n", url, hsToken)
	}
	otherReg := "id: other\nurl: " + other.srv.URL + "\nas_token: as-other\nhs_token: hs-other\nsender_localpart: otherbot\nnamespaces:\n  users: [{exclusive: true, regex: '@irc_.*'}]\n"
	d := newTestDispatcher(t, &roomState{}, irc(oldAS.srv.URL, "hs-irc"))
	msg := func(id string) Event { return ev(id, "!r:hs", "m.room.message", "@irc_x:hs", nil, "") }

	d.Submit(ctx, msg("$1"))
	waitIDs(t, oldAS, []string{"$1"})

	// A new URL is used from the next attempt.
	if err := d.Reload(ctx, setOf(t, irc(newAS.srv.URL, "hs-irc"))); err != nil {
		t.Fatal(err)
	}
	d.Submit(ctx, msg("$2"))
	waitIDs(t, newAS, []string{"$2"})

	// A new hs_token: the AS still expects the old one, so it refuses until
	// it is reconfigured too; nothing is lost meanwhile.
	if err := d.Reload(ctx, setOf(t, irc(newAS.srv.URL, "hs-irc-2"))); err != nil {
		t.Fatal(err)
	}
	d.Submit(ctx, msg("$3"))
	time.Sleep(50 * time.Millisecond)
	newAS.mu.Lock()
	newAS.token = "hs-irc-2"
	newAS.mu.Unlock()
	waitIDs(t, newAS, []string{"$2", "$3"})

	// A new AS starts from now: it gets $4, not the history.
	if err := d.Reload(ctx, setOf(t, irc(newAS.srv.URL, "hs-irc-2"), otherReg)); err != nil {
		t.Fatal(err)
	}
	d.Submit(ctx, msg("$4"))
	waitIDs(t, other, []string{"$4"})
	waitIDs(t, newAS, []string{"$2", "$3", "$4"}) // before it starts refusing

	// Removed while it has a backlog: the queue stays on disk, paused;
	// back: it resumes with it.
	newAS.mu.Lock()
	newAS.token = "refuse-for-now"
	newAS.mu.Unlock()
	d.Submit(ctx, msg("$5"))
	waitIDs(t, other, []string{"$4", "$5"})
	if err := d.Reload(ctx, setOf(t, otherReg)); err != nil {
		t.Fatal(err)
	}
	d.Submit(ctx, msg("$6")) // not for irc: it is not registered now
	waitIDs(t, other, []string{"$4", "$5", "$6"})
	sts, _ := d.Statuses(ctx)
	for _, st := range sts {
		if st.ID == "irc" && (st.Registered || st.PendingItems != 1) {
			t.Errorf("removed AS status %+v, want unregistered with 1 pending", st)
		}
	}
	if err := d.Reload(ctx, setOf(t, irc(newAS.srv.URL, "hs-irc-2"), otherReg)); err != nil {
		t.Fatal(err)
	}
	newAS.mu.Lock()
	newAS.token = "hs-irc-2"
	newAS.mu.Unlock()
	d.Submit(ctx, msg("$7"))
	waitIDs(t, newAS, []string{"$2", "$3", "$4", "$5", "$7"})
}
