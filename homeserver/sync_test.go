package homeserver

import (
	"encoding/json"
	"net/url"
	"strconv"
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

// TestConcurrentSendsAndSync: parallel senders and a long-polling reader;
// the reader sees every message once, in the order /messages has them.
func TestConcurrentSendsAndSync(t *testing.T) {
	e := start(t, t.TempDir(), notFoundAS())
	alice := e.register("alice")
	roomID := e.createRoom(alice, map[string]any{"preset": "public_chat"})
	toks := []string{alice}
	for _, n := range []string{"bob", "carol", "dave"} {
		tok := e.register(n)
		e.do("POST", room(roomID)+"/join", tok, nil)
		toks = append(toks, tok)
	}
	var initial syncResp
	e.get("GET", "/_matrix/client/v3/sync", alice, nil, &initial)
	const each = 10
	done := make(chan struct{})
	for i, tok := range toks {
		go func() {
			defer func() { done <- struct{}{} }()
			for j := range each {
				e.do("PUT", room(roomID)+"/send/m.room.message/c"+string(rune('a'+j)), tok, map[string]any{"body": i*100 + j})
			}
		}()
	}
	var seen []string
	since := initial.NextBatch
	deadline := time.Now().Add(20 * time.Second)
	for len(seen) < len(toks)*each && time.Now().Before(deadline) {
		var s syncResp
		e.get("GET", "/_matrix/client/v3/sync?timeout=2000&filter="+url.QueryEscape(`{"room":{"timeline":{"limit":1000}}}`)+"&since="+since, alice, nil, &s)
		for _, ev := range s.Rooms.Join[roomID].Timeline.Events {
			seen = append(seen, ev["event_id"].(string))
		}
		since = s.NextBatch
	}
	for range toks {
		<-done
	}
	if len(seen) != len(toks)*each {
		t.Fatalf("sync saw %d messages, want %d", len(seen), len(toks)*each)
	}
	var page struct {
		Chunk []map[string]any `json:"chunk"`
	}
	e.get("GET", room(roomID)+"/messages?dir=b&limit="+strconv.Itoa(len(seen)), alice, nil, &page)
	for i, ev := range page.Chunk {
		if want := seen[len(seen)-1-i]; ev["event_id"] != want {
			t.Fatalf("order differs at %d: /messages %v, /sync %s", i, ev["event_id"], want)
		}
	}
}

// TestSyncEphemeral: typing and read receipts reach other members through
// /sync; private receipts only their owner.
func TestSyncEphemeral(t *testing.T) {
	e := start(t, t.TempDir(), notFoundAS())
	alice, bob := e.register("alice"), e.register("bob")
	roomID := e.createRoom(alice, map[string]any{"preset": "public_chat"})
	e.do("POST", room(roomID)+"/join", bob, nil)
	_, sent := e.do("PUT", room(roomID)+"/send/m.room.message/1", alice, map[string]any{"body": "x"})
	evID := sent["event_id"].(string)
	type ephSync struct {
		NextBatch string `json:"next_batch"`
		Rooms     struct {
			Join map[string]struct {
				Ephemeral struct {
					Events []map[string]any `json:"events"`
				} `json:"ephemeral"`
			} `json:"join"`
		} `json:"rooms"`
	}
	var s0 ephSync
	e.get("GET", "/_matrix/client/v3/sync", alice, nil, &s0)
	ephemeral := func(since string) (map[string]any, string) {
		var s ephSync
		e.get("GET", "/_matrix/client/v3/sync?timeout=3000&since="+since, alice, nil, &s)
		out := map[string]any{}
		for _, ev := range s.Rooms.Join[roomID].Ephemeral.Events {
			out[ev["type"].(string)] = ev["content"]
		}
		return out, s.NextBatch
	}
	e.do("PUT", room(roomID)+"/typing/"+url.PathEscape("@bob:hs"), bob, map[string]any{"typing": true, "timeout": 10000})
	got, next := ephemeral(s0.NextBatch)
	if ids := got["m.typing"].(map[string]any)["user_ids"].([]any); len(ids) != 1 || ids[0] != "@bob:hs" {
		t.Errorf("typing %v", got)
	}
	e.do("PUT", room(roomID)+"/typing/"+url.PathEscape("@bob:hs"), bob, map[string]any{"typing": false})
	got, next = ephemeral(next)
	if ids := got["m.typing"].(map[string]any)["user_ids"].([]any); len(ids) != 0 {
		t.Errorf("typing stopped %v", got)
	}
	e.do("POST", room(roomID)+"/receipt/m.read.private/"+url.PathEscape(evID), bob, map[string]any{})
	e.do("POST", room(roomID)+"/receipt/m.read/"+url.PathEscape(evID), bob, map[string]any{})
	got, _ = ephemeral(next)
	rc, _ := got["m.receipt"].(map[string]any)
	byType, _ := rc[evID].(map[string]any)
	if byType["m.read"] == nil || byType["m.read.private"] != nil {
		t.Errorf("receipts %v", got)
	}
	// A typing notice ends at its timeout.
	e.do("PUT", room(roomID)+"/typing/"+url.PathEscape("@bob:hs"), bob, map[string]any{"typing": true, "timeout": 100})
	time.Sleep(300 * time.Millisecond)
	var s1 ephSync
	e.get("GET", "/_matrix/client/v3/sync", alice, nil, &s1)
	for _, ev := range s1.Rooms.Join[roomID].Ephemeral.Events {
		if ev["type"] == "m.typing" {
			t.Errorf("expired typing notice still shown: %v", ev)
		}
	}
}
