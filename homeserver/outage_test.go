package homeserver

import (
	"context"
	"encoding/json"
	"fmt"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/asdispatch/asdispatch/txnstore"
	"github.com/asdispatch/asdispatch/txnstore/pgtest"
)

// TestSendsThroughPostgresOutage: the dispatcher's store is a PostgreSQL
// cluster the test owns, stopped (as a crash) and started again twice while
// 8 clients send through the stub. Every send is answered 200 (it is in
// the log) or, at worst, 503 M_UNKNOWN with Retry-After, retried with the
// same txnId; never a raw database error. Once the database is back the
// hand-over resumes, and the AS gets every acknowledged send exactly once,
// each client's in the order it sent them.
func TestSendsThroughPostgresOutage(t *testing.T) {
	if testing.Short() {
		t.Skip("starts a PostgreSQL cluster")
	}
	pg := pgtest.NewCluster(t)
	as := &asLog{}
	e := startStubOn(t, t.TempDir(), as, func(ctx context.Context, opts txnstore.Options) (txnstore.Store, error) {
		return txnstore.OpenPostgres(ctx, pg.DSN(), opts)
	})
	roomID := ghostRoom(t, e)

	const clients = 8
	var (
		stop     atomic.Bool
		sent     = make([][]string, clients)
		wg       sync.WaitGroup
		errs     = make(chan error, clients)
		retries  atomic.Int64
		progress atomic.Int64
	)
	for c := range clients {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; !stop.Load(); i++ {
				txn := fmt.Sprintf("c%d-%d", c, i)
				for {
					status, id, hdr, err := send(e.hs.URL, roomID, txn)
					if err != nil {
						errs <- fmt.Errorf("send %s: %w", txn, err)
						return
					}
					if status == 200 {
						sent[c] = append(sent[c], id)
						progress.Add(1)
						break
					}
					if status != 503 || id != "M_UNKNOWN" || hdr.Get("Retry-After") == "" {
						errs <- fmt.Errorf("send %s: %d %s (Retry-After %q); want 200, or 503 M_UNKNOWN with Retry-After", txn, status, id, hdr.Get("Retry-After"))
						return
					}
					retries.Add(1)
					time.Sleep(20 * time.Millisecond)
				}
				time.Sleep(2 * time.Millisecond)
			}
		}()
	}
	// waitSends waits until the clients have n more sends acknowledged.
	waitSends := func(n int64) {
		t.Helper()
		want := progress.Load() + n
		for deadline := time.Now().Add(30 * time.Second); progress.Load() < want; time.Sleep(5 * time.Millisecond) {
			if time.Now().After(deadline) {
				t.Fatalf("the clients got %d sends acknowledged in 30 s; want %d", progress.Load(), want)
			}
		}
	}
	// lastInLog is the last event of the stub's log.
	lastInLog := func() int64 {
		t.Helper()
		var seq int64
		if err := e.srv.st.db.QueryRow(`SELECT MAX(seq) FROM events`).Scan(&seq); err != nil {
			t.Fatal(err)
		}
		return seq
	}
	// A membership change made while the store is down (the soak of issue
	// 16: a ghost's join answered 500, retried, answered 200 as already
	// joined, and never dispatched).
	member := func(path, body string) {
		t.Helper()
		status, out := e.do("POST", room(roomID)+path, "as-bridge", json.RawMessage(body))
		if status != 200 {
			t.Fatalf("POST %s: %d %v", path, status, out)
		}
	}
	e.ghost("br_other")
	waitSends(100)
	for n := range 2 {
		pg.Stop()
		if n == 0 {
			member("/invite?user_id=%40br_ghost%3Ahs", `{"user_id":"@br_other:hs"}`)
			member("/join?user_id=%40br_other%3Ahs", `{}`)
		} else {
			member("/leave?user_id=%40br_other%3Ahs", `{}`)
		}
		waitSends(100) // acknowledged while the store is down
		if pos, last := e.srv.ho.pos.Load(), lastInLog(); pos >= last {
			t.Fatalf("with the store down the hand-over is at %d, the log at %d: the outage did not hold it up", pos, last)
		}
		pg.Start()
		waitSends(100)
		// The hand-over resumes: it reaches what the log held at the restart.
		last := lastInLog()
		for deadline := time.Now().Add(20 * time.Second); e.srv.ho.pos.Load() < last; time.Sleep(10 * time.Millisecond) {
			if time.Now().After(deadline) {
				t.Fatalf("the hand-over is at %d 20 s after the store came back; the log was at %d", e.srv.ho.pos.Load(), last)
			}
		}
	}
	stop.Store(true)
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	total := 0
	for _, ids := range sent {
		total += len(ids)
	}
	got := as.waitFor(t, total)
	t.Logf("%d sends acknowledged, %d answered 503 and retried, %d delivered", total, retries.Load(), len(got))
	if len(got) != total {
		t.Fatalf("the AS got %d of %d acknowledged sends", len(got), total)
	}
	for deadline := time.Now().Add(20 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		as.mu.Lock()
		members := slices.Clone(as.members)
		as.mu.Unlock()
		want := []string{"@br_other:hs invite", "@br_other:hs join", "@br_other:hs leave"}
		got := slices.DeleteFunc(members, func(m string) bool { return !strings.HasPrefix(m, "@br_other:hs ") })
		if slices.Equal(got, want) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the AS got the membership changes %v; want %v, once each", got, want)
		}
	}
	seen := map[string]int{}
	for i, id := range got {
		if _, dup := seen[id]; dup {
			t.Errorf("event %s delivered twice", id)
		}
		seen[id] = i
	}
	for c, ids := range sent {
		for i, id := range ids {
			if _, ok := seen[id]; !ok {
				t.Errorf("client %d: acknowledged %s never delivered", c, id)
			}
			if i > 0 && seen[ids[i-1]] >= seen[id] {
				t.Errorf("client %d: %s delivered after %s", c, ids[i-1], id)
			}
		}
	}
}
