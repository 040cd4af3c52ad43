package homeserver

import (
	"encoding/json"
	"net/http"
	"net/url"
	"testing"
	"time"
)

// TestWhatBridgesCallFirst walks what mautrix bridgev2, matrix-bot-sdk and
// matrix-appservice-bridge call first, with the answers Synapse gives.
func TestWhatBridgesCallFirst(t *testing.T) {
	e := start(t, t.TempDir(), notFoundAS())
	alice := e.register("alice")
	bot := "@bridgebot:hs"
	asGhost := e.ghost("br_ghost")

	// The sender user exists from startup: invites need no query, and it
	// has a profile.
	roomID := e.createRoom(alice, map[string]any{"name": "mgmt", "topic": "t", "invite": []string{bot}, "is_direct": true})
	r := room(roomID)
	e.run(t, []call{
		{"masquerade as a registered ghost", "GET", "/_matrix/client/v3/account/whoami" + asGhost, "as-bridge", nil, 200, ""},
		{"masquerade as an unregistered ghost", "GET", "/_matrix/client/v3/account/whoami?user_id=" + url.QueryEscape("@br_nobody:hs"), "as-bridge", nil, 403, "M_FORBIDDEN"},
		{"masquerade as the sender user", "GET", "/_matrix/client/v3/account/whoami?user_id=" + url.QueryEscape(bot), "as-bridge", nil, 200, ""},
		{"masquerade outside the namespace", "GET", "/_matrix/client/v3/account/whoami?user_id=" + url.QueryEscape("@alice:hs"), "as-bridge", nil, 403, "M_FORBIDDEN"},
		{"masquerade with an unknown device", "GET", "/_matrix/client/v3/account/whoami?device_id=NOPE", "as-bridge", nil, 400, "M_UNKNOWN_DEVICE"},
		{"bot's displayname", "GET", "/_matrix/client/v3/profile/" + url.PathEscape(bot) + "/displayname", "", nil, 200, ""},
		{"bot joins on invite", "POST", "/_matrix/client/v3/join/" + url.PathEscape(roomID), "as-bridge", nil, 200, ""},
		{"state", "GET", r + "/state", "as-bridge", nil, 200, ""},
		{"power levels, trailing slash", "GET", r + "/state/m.room.power_levels/", "as-bridge", nil, 200, ""},
		{"power levels, no slash", "GET", r + "/state/m.room.power_levels", "as-bridge", nil, 200, ""},
		{"missing state", "GET", r + "/state/m.room.avatar/", "as-bridge", nil, 404, "M_NOT_FOUND"},
		{"members", "GET", r + "/members", "as-bridge", nil, 200, ""},
		{"joined members", "GET", r + "/joined_members", "as-bridge", nil, 200, ""},
		{"messages", "GET", r + "/messages?dir=b&limit=5", "as-bridge", nil, 200, ""},
		{"messages with a bad dir", "GET", r + "/messages?dir=x", "as-bridge", nil, 400, "M_INVALID_PARAM"},
		{"aliases", "GET", r + "/aliases", "as-bridge", nil, 200, ""},
		{"state by a non-member", "GET", r + "/state" + asGhost, "as-bridge", nil, 403, "M_FORBIDDEN"},
		{"media config", "GET", "/_matrix/client/v1/media/config", "as-bridge", nil, 200, ""},
		{"login flows", "GET", "/_matrix/client/v3/login", "", nil, 200, ""},
		{"well-known", "GET", "/.well-known/matrix/client", "", nil, 200, ""},
		{"capabilities", "GET", "/_matrix/client/v3/capabilities", alice, nil, 200, ""},
		{"devices", "GET", "/_matrix/client/v3/devices", alice, nil, 200, ""},
		{"presence put", "PUT", "/_matrix/client/v3/presence/" + url.PathEscape("@alice:hs") + "/status", alice, map[string]any{"presence": "online"}, 200, ""},
		{"presence of another", "PUT", "/_matrix/client/v3/presence/" + url.PathEscape(bot) + "/status", alice, map[string]any{"presence": "online"}, 403, "M_FORBIDDEN"},
		{"presence get", "GET", "/_matrix/client/v3/presence/" + url.PathEscape("@alice:hs") + "/status", alice, nil, 200, ""},
		{"presence bad value", "PUT", "/_matrix/client/v3/presence/" + url.PathEscape("@alice:hs") + "/status", alice, map[string]any{"presence": "busy"}, 400, "M_INVALID_PARAM"},
		{"account data put", "PUT", "/_matrix/client/v3/user/" + url.PathEscape("@alice:hs") + "/account_data/m.direct", alice, map[string]any{"@bridgebot:hs": []string{roomID}}, 200, ""},
		{"account data get", "GET", "/_matrix/client/v3/user/" + url.PathEscape("@alice:hs") + "/account_data/m.direct", alice, nil, 200, ""},
		{"account data of another", "GET", "/_matrix/client/v3/user/" + url.PathEscape(bot) + "/account_data/m.direct", alice, nil, 403, "M_FORBIDDEN"},
		{"account data missing", "GET", "/_matrix/client/v3/user/" + url.PathEscape("@alice:hs") + "/account_data/x", alice, nil, 404, "M_NOT_FOUND"},
		{"room account data", "PUT", "/_matrix/client/v3/user/" + url.PathEscape("@alice:hs") + "/rooms/" + url.PathEscape(roomID) + "/account_data/x", alice, map[string]any{"a": 1}, 200, ""},
		{"server-controlled account data", "PUT", "/_matrix/client/v3/user/" + url.PathEscape("@alice:hs") + "/rooms/" + url.PathEscape(roomID) + "/account_data/m.fully_read", alice, map[string]any{"event_id": "$x:hs"}, 405, "M_BAD_JSON"},
		{"server-controlled global account data", "PUT", "/_matrix/client/v3/user/" + url.PathEscape("@alice:hs") + "/account_data/m.push_rules", alice, map[string]any{}, 405, "M_BAD_JSON"},
		{"room account data of a bad room ID", "GET", "/_matrix/client/v3/user/" + url.PathEscape("@alice:hs") + "/rooms/nope/account_data/x", alice, nil, 400, "M_INVALID_PARAM"},
		{"read markers", "POST", r + "/read_markers", alice, map[string]any{"m.fully_read": "$x:hs"}, 200, ""},
		{"filter", "POST", "/_matrix/client/v3/user/" + url.PathEscape("@alice:hs") + "/filter", alice, map[string]any{"room": map[string]any{"timeline": map[string]any{"limit": 5}}}, 200, ""},
		{"filter get", "GET", "/_matrix/client/v3/user/" + url.PathEscape("@alice:hs") + "/filter/0", alice, nil, 200, ""},
		{"filter missing", "GET", "/_matrix/client/v3/user/" + url.PathEscape("@alice:hs") + "/filter/9", alice, nil, 404, "M_NOT_FOUND"},
	})

	var state []map[string]any
	e.get("GET", r+"/state", alice, nil, &state)
	types := map[string]bool{}
	for _, ev := range state {
		types[ev["type"].(string)] = true
		for _, k := range []string{"event_id", "sender", "origin_server_ts", "room_id", "state_key", "content", "unsigned"} {
			if _, ok := ev[k]; !ok {
				t.Errorf("state event without %s: %v", k, ev)
			}
		}
	}
	for _, want := range []string{"m.room.create", "m.room.power_levels", "m.room.join_rules", "m.room.name", "m.room.topic", "m.room.history_visibility"} {
		if !types[want] {
			t.Errorf("state lacks %s: %v", want, types)
		}
	}
	var invite map[string]any
	e.get("GET", r+"/state/m.room.member/"+url.PathEscape(bot)+"?format=event", alice, nil, &invite)
	if c := invite["content"].(map[string]any); c["membership"] != "join" || c["displayname"] != "bridgebot" {
		t.Errorf("bot member event %v", invite)
	}

	// Members filtered by membership.
	e.do("POST", r+"/invite", alice, map[string]any{"user_id": "@br_ghost:hs"})
	var members struct {
		Chunk []map[string]any `json:"chunk"`
	}
	e.get("GET", r+"/members?membership=invite", alice, nil, &members)
	if len(members.Chunk) != 1 || members.Chunk[0]["state_key"] != "@br_ghost:hs" {
		t.Errorf("invited members %v", members.Chunk)
	}
	e.get("GET", r+"/members?not_membership=invite", alice, nil, &members)
	if len(members.Chunk) != 2 {
		t.Errorf("not-invited members %v", members.Chunk)
	}
	var joined struct {
		Joined map[string]map[string]any `json:"joined"`
	}
	e.get("GET", r+"/joined_members", alice, nil, &joined)
	if len(joined.Joined) != 2 || joined.Joined["@alice:hs"]["display_name"] != "alice" {
		t.Errorf("joined members %v", joined)
	}
	var jr struct {
		Rooms []string `json:"joined_rooms"`
	}
	e.get("GET", "/_matrix/client/v3/joined_rooms", "as-bridge", nil, &jr)
	if len(jr.Rooms) != 1 || jr.Rooms[0] != roomID {
		t.Errorf("joined_rooms %v", jr)
	}

	// Sends: the sender sees its transaction id, others do not; /event and
	// /messages agree.
	_, sent := e.do("PUT", r+"/send/m.room.message/txn1", alice, map[string]any{"msgtype": "m.text", "body": "help"})
	evID := sent["event_id"].(string)
	var mine, theirs map[string]any
	e.get("GET", r+"/event/"+url.PathEscape(evID), alice, nil, &mine)
	e.get("GET", r+"/event/"+url.PathEscape(evID), "as-bridge", nil, &theirs)
	e.run(t, []call{
		{"event by a non-member", "GET", r + "/event/" + url.PathEscape(evID) + asGhost, "as-bridge", nil, 404, "M_NOT_FOUND"},
		{"event not in the room", "GET", r + "/event/" + url.PathEscape("$nope:hs"), alice, nil, 404, "M_NOT_FOUND"},
	})
	if u := mine["unsigned"].(map[string]any); u["transaction_id"] != "txn1" || u["age"] == nil {
		t.Errorf("sender's view %v", mine)
	}
	if u := theirs["unsigned"].(map[string]any); u["transaction_id"] != nil || u["age"] == nil {
		t.Errorf("another's view %v", theirs)
	}
	var page struct {
		Chunk []map[string]any `json:"chunk"`
		Start string           `json:"start"`
		End   string           `json:"end"`
	}
	e.get("GET", r+"/messages?dir=b&limit=1", alice, nil, &page)
	if len(page.Chunk) != 1 || page.Chunk[0]["event_id"] != evID || page.End == "" {
		t.Fatalf("messages page 1: %v", page)
	}
	seen := map[string]bool{evID: true}
	for from := page.End; from != ""; {
		page.End = ""
		e.get("GET", r+"/messages?dir=b&limit=3&from="+from, alice, nil, &page)
		for _, ev := range page.Chunk {
			if seen[ev["event_id"].(string)] {
				t.Fatalf("event twice while paginating: %v", ev)
			}
			seen[ev["event_id"].(string)] = true
		}
		from = page.End
	}
	var all struct {
		Chunk []map[string]any `json:"chunk"`
	}
	e.get("GET", r+"/messages?dir=f&limit=100", alice, nil, &all)
	if len(all.Chunk) != len(seen) || all.Chunk[0]["type"] != "m.room.create" {
		t.Errorf("forward %d events, backward %d; first %v", len(all.Chunk), len(seen), all.Chunk[0])
	}

	// Profiles: a change shows in the member events of joined rooms.
	e.run(t, []call{
		{"ghost sets its displayname", "PUT", "/_matrix/client/v3/profile/" + url.PathEscape("@br_ghost:hs") + "/displayname" + asGhost, "as-bridge", map[string]any{"displayname": "Ghost"}, 200, ""},
		{"bot sets its avatar", "PUT", "/_matrix/client/v3/profile/" + url.PathEscape(bot) + "/avatar_url", "as-bridge", map[string]any{"avatar_url": "mxc://hs/abc"}, 200, ""},
		{"someone else's profile", "PUT", "/_matrix/client/v3/profile/" + url.PathEscape(bot) + "/displayname", alice, map[string]any{"displayname": "x"}, 403, "M_FORBIDDEN"},
		{"displayname missing", "PUT", "/_matrix/client/v3/profile/" + url.PathEscape("@alice:hs") + "/displayname", alice, map[string]any{}, 400, "M_MISSING_PARAM"},
		{"unknown field", "PUT", "/_matrix/client/v3/profile/" + url.PathEscape("@alice:hs") + "/x", alice, map[string]any{"x": "y"}, 404, "M_NOT_FOUND"},
	})
	var prof map[string]any
	e.get("GET", "/_matrix/client/v3/profile/"+url.PathEscape(bot), "", nil, &prof)
	if prof["displayname"] != "bridgebot" || prof["avatar_url"] != "mxc://hs/abc" {
		t.Errorf("bot profile %v", prof)
	}
	var member map[string]any
	e.get("GET", r+"/state/m.room.member/"+url.PathEscape(bot), alice, nil, &member)
	if member["avatar_url"] != "mxc://hs/abc" || member["membership"] != "join" {
		t.Errorf("bot member event after the avatar change: %v", member)
	}
	e.get("GET", r+"/state/m.room.member/"+url.PathEscape("@br_ghost:hs"), alice, nil, &member)
	if member["membership"] != "invite" || member["displayname"] != "br_ghost" {
		t.Errorf("an invite is not a joined room: %v", member)
	}
}

func TestDirectoryAndContext(t *testing.T) {
	e := start(t, t.TempDir(), notFoundAS())
	alice := e.register("alice")
	pub := e.createRoom(alice, map[string]any{"visibility": "public", "name": "Lobby", "room_alias_name": "lobby"})
	e.createRoom(alice, map[string]any{"name": "Hidden"})
	var list struct {
		Chunk []map[string]any `json:"chunk"`
	}
	e.get("GET", "/_matrix/client/v3/publicRooms", "", nil, &list)
	if len(list.Chunk) != 1 || list.Chunk[0]["room_id"] != pub || list.Chunk[0]["canonical_alias"] != "#lobby:hs" || list.Chunk[0]["join_rule"] != "public" {
		t.Errorf("publicRooms %v", list)
	}
	e.get("POST", "/_matrix/client/v3/publicRooms", alice, map[string]any{"filter": map[string]any{"generic_search_term": "nothing"}}, &list)
	if len(list.Chunk) != 0 {
		t.Errorf("search %v", list)
	}
	var ids []string
	for i := range 5 {
		_, out := e.do("PUT", room(pub)+"/send/m.room.message/c"+string(rune('0'+i)), alice, map[string]any{"body": i})
		ids = append(ids, out["event_id"].(string))
	}
	var c struct {
		Event  map[string]any   `json:"event"`
		Before []map[string]any `json:"events_before"`
		After  []map[string]any `json:"events_after"`
	}
	e.get("GET", room(pub)+"/context/"+url.PathEscape(ids[2])+"?limit=4", alice, nil, &c)
	if c.Event["event_id"] != ids[2] || len(c.Before) != 2 || c.Before[0]["event_id"] != ids[1] || len(c.After) != 2 || c.After[0]["event_id"] != ids[3] {
		t.Errorf("context %v", c)
	}
	var rules map[string]any
	if e.get("GET", "/_matrix/client/v3/pushrules/", alice, nil, &rules) != 200 || rules["global"] == nil {
		t.Errorf("pushrules %v", rules)
	}
}

// TestPrevContent: a state event carries what it replaced, in answers and
// in AS transactions.
func TestPrevContent(t *testing.T) {
	got := make(chan map[string]any, 100)
	e := start(t, t.TempDir(), http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		var txn struct {
			Events []map[string]any `json:"events"`
		}
		json.NewDecoder(r.Body).Decode(&txn)
		for _, ev := range txn.Events {
			got <- ev
		}
		w.Write([]byte("{}"))
	}))
	alice := e.register("alice")
	roomID := e.createRoom(alice, map[string]any{"invite": []string{"@bridgebot:hs"}})
	e.do("POST", room(roomID)+"/join", "as-bridge", nil)
	var ev map[string]any
	e.get("GET", room(roomID)+"/state/m.room.member/"+url.PathEscape("@bridgebot:hs")+"?format=event", alice, nil, &ev)
	u := ev["unsigned"].(map[string]any)
	if u["prev_content"].(map[string]any)["membership"] != "invite" || u["replaces_state"] == nil || u["prev_sender"] != "@alice:hs" {
		t.Errorf("join without prev_content: %v", ev)
	}
	deadline := time.After(10 * time.Second)
	for {
		select {
		case ev := <-got:
			if ev["type"] == "m.room.member" && ev["state_key"] == "@bridgebot:hs" && ev["content"].(map[string]any)["membership"] == "join" {
				if u := ev["unsigned"].(map[string]any); u["prev_content"] == nil || u["age"] == nil {
					t.Errorf("AS got the join without prev_content or age: %v", ev)
				}
				return
			}
		case <-deadline:
			t.Fatal("the AS never got the join")
		}
	}
}
