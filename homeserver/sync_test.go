package homeserver

import (
	"encoding/json"
	"net/url"
	"testing"
	"time"
)

type syncResp struct {
	NextBatch string `json:"next_batch"`
	Rooms     struct {
		Join map[string]struct {
			Timeline struct {
				Events    []map[string]any `json:"events"`
				Limited   bool             `json:"limited"`
				PrevBatch string           `json:"prev_batch"`
			} `json:"timeline"`
			State struct {
				Events []map[string]any `json:"events"`
			} `json:"state"`
			AccountData struct {
				Events []map[string]any `json:"events"`
			} `json:"account_data"`
		} `json:"join"`
		Invite map[string]struct {
			InviteState struct {
				Events []map[string]any `json:"events"`
			} `json:"invite_state"`
		} `json:"invite"`
		Leave map[string]json.RawMessage `json:"leave"`
	} `json:"rooms"`
	AccountData struct {
		Events []map[string]any `json:"events"`
	} `json:"account_data"`
	ToDevice struct {
		Events []map[string]any `json:"events"`
	} `json:"to_device"`
}

func TestSync(t *testing.T) {
	e := start(t, t.TempDir(), notFoundAS())
	alice, bob := e.register("alice"), e.register("bob")
	roomID := e.createRoom(alice, map[string]any{"name": "r"})
	r := room(roomID)
	for i := range 12 {
		e.do("PUT", r+"/send/m.room.message/m"+string(rune('a'+i)), alice, map[string]any{"body": i})
	}
	// Initial sync with an inline filter: a limited timeline, the state
	// before it, the sender's own transaction ids.
	var s1 syncResp
	filter := url.QueryEscape(`{"room":{"timeline":{"limit":5}},"unknown_field":1}`)
	if status := e.get("GET", "/_matrix/client/v3/sync?filter="+filter, alice, nil, &s1); status != 200 {
		t.Fatalf("sync %d", status)
	}
	j := s1.Rooms.Join[roomID]
	if len(j.Timeline.Events) != 5 || !j.Timeline.Limited || j.Timeline.PrevBatch == "" {
		t.Fatalf("timeline %d events, limited %v, prev_batch %q", len(j.Timeline.Events), j.Timeline.Limited, j.Timeline.PrevBatch)
	}
	if u := j.Timeline.Events[4]["unsigned"].(map[string]any); u["transaction_id"] != "ml" {
		t.Errorf("own event without transaction_id: %v", j.Timeline.Events[4])
	}
	stateTypes := map[string]bool{}
	for _, ev := range j.State.Events {
		stateTypes[ev["type"].(string)] = true
	}
	if !stateTypes["m.room.create"] || !stateTypes["m.room.name"] {
		t.Errorf("state %v", stateTypes)
	}
	// prev_batch continues with /messages.
	var older struct {
		Chunk []map[string]any `json:"chunk"`
	}
	e.get("GET", r+"/messages?dir=b&limit=3&from="+j.Timeline.PrevBatch, alice, nil, &older)
	if len(older.Chunk) != 3 || older.Chunk[0]["content"].(map[string]any)["body"] != float64(6) {
		t.Errorf("messages from prev_batch: %v", older.Chunk)
	}

	// Filter by id; an invite shows up for bob, then the join.
	var f map[string]any
	e.get("POST", "/_matrix/client/v3/user/"+url.PathEscape("@bob:hs")+"/filter", bob, map[string]any{"room": map[string]any{"timeline": map[string]any{"limit": 2}}}, &f)
	var b1 syncResp
	e.get("GET", "/_matrix/client/v3/sync?filter="+f["filter_id"].(string), bob, nil, &b1)
	e.do("POST", r+"/invite", alice, map[string]any{"user_id": "@bob:hs"})
	var b2 syncResp
	e.get("GET", "/_matrix/client/v3/sync?timeout=5000&since="+b1.NextBatch, bob, nil, &b2)
	if _, ok := b2.Rooms.Invite[roomID]; !ok || len(b2.Rooms.Invite[roomID].InviteState.Events) == 0 {
		t.Fatalf("invite not in sync: %+v", b2.Rooms)
	}
	e.do("POST", r+"/join", bob, nil)
	var b3 syncResp
	e.get("GET", "/_matrix/client/v3/sync?timeout=5000&since="+b2.NextBatch, bob, nil, &b3)
	if jb, ok := b3.Rooms.Join[roomID]; !ok || len(jb.State.Events) == 0 {
		t.Fatalf("join without state: %+v", b3.Rooms)
	}

	// Long poll: a message sent while bob waits wakes him.
	done := make(chan syncResp, 1)
	go func() {
		var s syncResp
		e.get("GET", "/_matrix/client/v3/sync?timeout=10000&since="+b3.NextBatch, bob, nil, &s)
		done <- s
	}()
	time.Sleep(100 * time.Millisecond)
	e.do("PUT", r+"/send/m.room.message/late", alice, map[string]any{"body": "late"})
	select {
	case s := <-done:
		evs := s.Rooms.Join[roomID].Timeline.Events
		if len(evs) != 1 || evs[0]["content"].(map[string]any)["body"] != "late" {
			t.Errorf("long poll answer %v", evs)
		}
		if u := evs[0]["unsigned"].(map[string]any); u["transaction_id"] != nil {
			t.Errorf("another user's transaction id leaked: %v", u)
		}
		b3.NextBatch = s.NextBatch
	case <-time.After(5 * time.Second):
		t.Fatal("long poll not woken")
	}
	// Nothing new: the timeout passes and the same position comes back.
	var idle syncResp
	t0 := time.Now()
	e.get("GET", "/_matrix/client/v3/sync?timeout=200&since="+b3.NextBatch, bob, nil, &idle)
	if time.Since(t0) < 150*time.Millisecond || len(idle.Rooms.Join) != 0 || idle.NextBatch != b3.NextBatch {
		t.Errorf("idle sync after %v: %+v", time.Since(t0), idle)
	}

	// Account data and to-device messages.
	e.do("PUT", "/_matrix/client/v3/user/"+url.PathEscape("@bob:hs")+"/account_data/x.global", bob, map[string]any{"a": 1})
	e.do("PUT", "/_matrix/client/v3/user/"+url.PathEscape("@bob:hs")+"/rooms/"+url.PathEscape(roomID)+"/account_data/x.room", bob, map[string]any{"b": 2})
	e.do("PUT", "/_matrix/client/v3/sendToDevice/x.ping/t1", alice, map[string]any{"messages": map[string]any{"@bob:hs": map[string]any{"*": map[string]any{"hi": true}}}})
	var s4 syncResp
	e.get("GET", "/_matrix/client/v3/sync?since="+idle.NextBatch, bob, nil, &s4)
	if len(s4.AccountData.Events) != 1 || s4.AccountData.Events[0]["type"] != "x.global" {
		t.Errorf("global account data %v", s4.AccountData)
	}
	if ad := s4.Rooms.Join[roomID].AccountData.Events; len(ad) != 1 || ad[0]["type"] != "x.room" {
		t.Errorf("room account data %v", ad)
	}
	if len(s4.ToDevice.Events) != 1 || s4.ToDevice.Events[0]["sender"] != "@alice:hs" {
		t.Errorf("to_device %v", s4.ToDevice)
	}

	// Leaving shows under rooms.leave.
	e.do("POST", r+"/leave", bob, nil)
	var s5 syncResp
	e.get("GET", "/_matrix/client/v3/sync?since="+s4.NextBatch, bob, nil, &s5)
	if _, ok := s5.Rooms.Leave[roomID]; !ok {
		t.Errorf("leave not in sync: %+v", s5.Rooms)
	}

	// AS users sync too.
	e.ghost("br_ghost")
	var g syncResp
	if status := e.get("GET", "/_matrix/client/v3/sync?user_id="+url.QueryEscape("@br_ghost:hs"), "as-bridge", nil, &g); status != 200 || g.NextBatch == "" {
		t.Errorf("AS user sync %d %+v", status, g)
	}
	e.run(t, []call{
		{"bad since", "GET", "/_matrix/client/v3/sync?since=garbage", bob, nil, 400, "M_INVALID_PARAM"},
		{"unknown filter id", "GET", "/_matrix/client/v3/sync?filter=77", bob, nil, 400, "M_INVALID_PARAM"},
	})
}
