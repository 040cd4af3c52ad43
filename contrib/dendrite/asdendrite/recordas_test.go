package asdendrite

import (
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/asdispatch/asdispatch/registry"
)

// recordAS is the "irc" AS of ircReg: it accepts every transaction and
// records its events in order, by content body or, if byID, by event ID.
type recordAS struct {
	mu  sync.Mutex
	got []string
}

// startRecordAS starts a recordAS and loads its registration.
func startRecordAS(t *testing.T, byID bool) (*registry.Set, *recordAS) {
	t.Helper()
	as := &recordAS{}
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		var txn struct {
			Events []struct {
				EventID string                `json:"event_id"`
				Content struct{ Body string } `json:"content"`
			} `json:"events"`
		}
		json.NewDecoder(r.Body).Decode(&txn)
		as.mu.Lock()
		for _, e := range txn.Events {
			if byID {
				as.got = append(as.got, e.EventID)
			} else {
				as.got = append(as.got, e.Content.Body)
			}
		}
		as.mu.Unlock()
		w.Write([]byte("{}"))
	}))
	t.Cleanup(srv.Close)
	set, _, err := registry.Load("example.org", writeReg(t, t.TempDir(), "irc.yaml", ircReg(srv.URL)))
	if err != nil {
		t.Fatal(err)
	}
	return set, as
}

// String is what the AS got, comma-separated.
func (as *recordAS) String() string {
	as.mu.Lock()
	defer as.mu.Unlock()
	return strings.Join(as.got, ",")
}

// wait fails t unless the AS gets exactly want (comma-separated) within
// 10 s; it fails at once once it got more.
func (as *recordAS) wait(t *testing.T, want string) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		s := as.String()
		if s == want {
			return
		}
		if time.Now().After(deadline) || len(s) > len(want) {
			t.Fatalf("the AS got %q, want %s", s, want)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// settle fails t if the AS got more than want once a duplicate would have
// arrived.
func (as *recordAS) settle(t *testing.T, want string) {
	t.Helper()
	time.Sleep(200 * time.Millisecond)
	if s := as.String(); s != want {
		t.Fatalf("the AS got %q, want %s", s, want)
	}
}
