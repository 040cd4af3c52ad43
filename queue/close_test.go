package queue

import (
	"net"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"sync/atomic"
	"testing"

	"github.com/asdispatch/asdispatch/txnstore"
)

// TestCloseClosesIdleConnections checks that Close leaves no keep-alive
// connection to an AS open: each holds a goroutine and buffers on both
// ends until the transport's IdleConnTimeout, and a process that closes
// and opens its Queues again (a reload, the bench's phases) piled them up.
func TestCloseClosesIdleConnections(t *testing.T) {
	h := newHarness(t, filepath.Join(t.TempDir(), "q.db"), Options{})
	as := &fakeAS{t: t, token: "hs-" + t.Name(), got: make(chan struct{}, 1)}
	as.srv = httptest.NewUnstartedServer(http.HandlerFunc(as.serve))
	t.Cleanup(as.srv.Close)
	var open atomic.Int64
	as.srv.Config.ConnState = func(_ net.Conn, s http.ConnState) {
		switch s {
		case http.StateNew:
			open.Add(1)
		case http.StateClosed, http.StateHijacked:
			open.Add(-1)
		}
	}
	as.srv.Start()
	key := h.start(as, "a")
	h.appendEvents(txnstore.KindEvent, []txnstore.ASKey{key}, "e1")
	waitFor(t, "the event", func() bool { return len(as.delivered()) == 1 })
	if open.Load() == 0 {
		t.Fatal("no connection to the AS after a send")
	}
	h.close()
	waitFor(t, "the connection closed", func() bool { return open.Load() == 0 })
}
