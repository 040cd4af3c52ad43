package homeserver

import (
	"context"
	"fmt"
	"sync"
	"testing"
)

// TestGroupedSendsStayIdempotent: concurrent sends of the same txnIds,
// grouped into shared commits, make one event per txnId, and every send
// of a txnId is answered with that event.
func TestGroupedSendsStayIdempotent(t *testing.T) {
	e := start(t, t.TempDir(), notFoundAS())
	e.ghost("br_ghost")
	roomID := e.createRoom("as-bridge", map[string]any{"invite": []string{"@br_ghost:hs"}})
	if status, out := e.do("POST", room(roomID)+"/join"+"?user_id=%40br_ghost%3Ahs", "as-bridge", map[string]any{}); status != 200 {
		t.Fatalf("join: %d %v", status, out)
	}
	const txns, copies = 40, 4
	ids := make([][copies]string, txns)
	var wg sync.WaitGroup
	for c := range copies {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range txns {
				status, id, _, err := send(e.hs.URL, roomID, fmt.Sprintf("same-%d", i))
				if err != nil || status != 200 {
					t.Errorf("send same-%d: %d %s %v", i, status, id, err)
					return
				}
				ids[i][c] = id
			}
		}()
	}
	wg.Wait()
	for i, got := range ids {
		for c := 1; c < copies; c++ {
			if got[c] != got[0] {
				t.Errorf("txn same-%d answered %s and %s", i, got[0], got[c])
			}
		}
	}
	var n int
	if err := e.srv.st.db.QueryRow(`SELECT COUNT(*) FROM events WHERE room_id = ? AND type = 'm.room.message'`, roomID).Scan(&n); err != nil {
		t.Fatal(err)
	}
	if n != txns {
		t.Errorf("the log holds %d messages; want %d", n, txns)
	}
}

// TestPowerLevelChangeReachesGroupedSends: authorization keeps a room's
// power levels between sends; a change to them (or a failed write) must
// drop what it kept, so the next send is checked against the new levels.
func TestPowerLevelChangeReachesGroupedSends(t *testing.T) {
	e := start(t, t.TempDir(), notFoundAS())
	e.ghost("br_ghost")
	roomID := e.createRoom("as-bridge", map[string]any{"invite": []string{"@br_ghost:hs"}})
	if status, out := e.do("POST", room(roomID)+"/join"+"?user_id=%40br_ghost%3Ahs", "as-bridge", map[string]any{}); status != 200 {
		t.Fatalf("join: %d %v", status, out)
	}
	if status, id, _, err := send(e.hs.URL, roomID, "before"); err != nil || status != 200 {
		t.Fatalf("send before: %d %s %v", status, id, err)
	}
	var pl map[string]any
	if status := e.get("GET", room(roomID)+"/state/m.room.power_levels/", "as-bridge", nil, &pl); status != 200 {
		t.Fatalf("get power levels: %d", status)
	}
	pl["events_default"] = 50
	if status, out := e.do("PUT", room(roomID)+"/state/m.room.power_levels/", "as-bridge", pl); status != 200 {
		t.Fatalf("set power levels: %d %v", status, out)
	}
	if status, code, _, err := send(e.hs.URL, roomID, "after"); err != nil || status != 403 {
		t.Errorf("send after events_default 50 = %d %s %v; want 403", status, code, err)
	}
}

// TestLogWriterContainsPanic: a send that panics in the log writer fails
// alone (503) and the writer goes on taking sends.
func TestLogWriterContainsPanic(t *testing.T) {
	e := start(t, t.TempDir(), notFoundAS())
	err := e.srv.writeLog(context.Background(), func(context.Context, querier) error { panic("boom") })
	if mx, ok := asMatrixError(err); !ok || mx.Status != 503 {
		t.Fatalf("a panicking send = %v; want 503", err)
	}
	roomID := ghostRoom(t, e)
	if status, id, _, err := send(e.hs.URL, roomID, "after"); err != nil || status != 200 {
		t.Fatalf("send after the panic: %d %s %v", status, id, err)
	}
}
