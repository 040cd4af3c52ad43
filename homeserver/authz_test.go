package homeserver

import (
	"context"
	"net/url"
	"strings"
	"testing"
)

// TestAuthorization: who may do what, as the spec's authorization rules and
// Synapse enforce them.
func TestAuthorization(t *testing.T) {
	e := start(t, t.TempDir(), notFoundAS())
	alice, bob, carol := e.register("alice"), e.register("bob"), e.register("carol")
	ghost := e.ghost("br_ghost")
	private := e.createRoom(alice, map[string]any{})
	public := e.createRoom(alice, map[string]any{"preset": "public_chat"})
	p, pub := room(private), room(public)
	member := func(u string) string { return "/state/m.room.member/" + url.PathEscape(u) }
	e.run(t, []call{
		{"join an invite-only room uninvited", "POST", p + "/join", bob, nil, 403, "M_FORBIDDEN"},
		{"join an unknown room", "POST", room("!nope:hs") + "/join", bob, nil, 404, "M_NOT_FOUND"},
		{"join a public room", "POST", pub + "/join", bob, nil, 200, ""},
		{"a member below the invite level invites", "POST", pub + "/invite", bob, map[string]any{"user_id": "@carol:hs"}, 403, "M_FORBIDDEN"},
		{"a member joins someone else", "PUT", pub + member("@br_ghost:hs"), bob, map[string]any{"membership": "join"}, 403, "M_FORBIDDEN"},
		{"a member kicks through the state API", "PUT", pub + member("@alice:hs"), bob, map[string]any{"membership": "leave"}, 403, "M_FORBIDDEN"},
		{"a member without power kicks", "POST", pub + "/kick", bob, map[string]any{"user_id": "@alice:hs"}, 403, "M_FORBIDDEN"},
		{"a non-member invites", "POST", p + "/invite", bob, map[string]any{"user_id": "@carol:hs"}, 403, "M_FORBIDDEN"},
		{"invite bob", "POST", p + "/invite", alice, map[string]any{"user_id": "@bob:hs"}, 200, ""},
		{"invited bob joins", "POST", p + "/join", bob, nil, 200, ""},
		{"inviting a joined member", "POST", p + "/invite", alice, map[string]any{"user_id": "@bob:hs"}, 403, "M_FORBIDDEN"},
		{"a member sends a message", "PUT", p + "/send/m.room.message/1", bob, map[string]any{"body": "x"}, 200, ""},
		{"an event over 64 KiB", "PUT", p + "/send/m.room.message/big", bob, map[string]any{"body": strings.Repeat("x", 65536)}, 413, "M_TOO_LARGE"},
		{"a state key over 255 bytes", "PUT", p + "/state/x.y/" + strings.Repeat("k", 256), alice, map[string]any{}, 400, "M_INVALID_PARAM"},
		{"a member sets the name below state_default", "PUT", p + "/state/m.room.name/", bob, map[string]any{"name": "x"}, 403, "M_FORBIDDEN"},
		{"a member raises itself", "PUT", p + "/state/m.room.power_levels/", bob, map[string]any{"users": map[string]any{"@bob:hs": 100}}, 403, "M_FORBIDDEN"},
		{"a state key of another user", "PUT", p + "/state/x.y/" + url.PathEscape("@bob:hs"), alice, map[string]any{}, 403, "M_FORBIDDEN"},
		{"the creator grants bob 50", "PUT", p + "/state/m.room.power_levels/", alice, map[string]any{"users": map[string]any{"@alice:hs": 100, "@bob:hs": 50}, "invite": 50}, 200, ""},
		{"bob may not demote alice", "PUT", p + "/state/m.room.power_levels/", bob, map[string]any{"users": map[string]any{"@alice:hs": 0, "@bob:hs": 50}, "invite": 50}, 403, "M_FORBIDDEN"},
		{"bob may not grant more than he has", "PUT", p + "/state/m.room.power_levels/", bob, map[string]any{"users": map[string]any{"@alice:hs": 100, "@bob:hs": 50, "@carol:hs": 60}, "invite": 50}, 403, "M_FORBIDDEN"},
		{"power levels that are not integers", "PUT", p + "/state/m.room.power_levels/", alice, map[string]any{"users": map[string]any{"@alice:hs": "lots"}}, 400, "M_BAD_JSON"},
		{"bob invites carol now", "POST", p + "/invite", bob, map[string]any{"user_id": "@carol:hs"}, 200, ""},
		{"bob may not kick alice", "POST", p + "/kick", bob, map[string]any{"user_id": "@alice:hs"}, 403, "M_FORBIDDEN"},
		{"bob kicks carol's invite", "POST", p + "/kick", bob, map[string]any{"user_id": "@carol:hs"}, 200, ""},
		{"kicking someone not in the room", "POST", p + "/kick", alice, map[string]any{"user_id": "@carol:hs"}, 403, "M_FORBIDDEN"},
		{"alice bans carol", "POST", p + "/ban", alice, map[string]any{"user_id": "@carol:hs"}, 200, ""},
		{"a banned user is invited", "POST", p + "/invite", alice, map[string]any{"user_id": "@carol:hs"}, 403, "M_FORBIDDEN"},
		{"bob may not ban alice", "POST", p + "/ban", bob, map[string]any{"user_id": "@alice:hs"}, 403, "M_FORBIDDEN"},
		{"unban someone not banned", "POST", p + "/unban", alice, map[string]any{"user_id": "@bob:hs"}, 403, "M_FORBIDDEN"},
		{"alice unbans carol", "POST", p + "/unban", alice, map[string]any{"user_id": "@carol:hs"}, 200, ""},
		{"leave a room one is not in", "POST", p + "/leave", carol, nil, 403, "M_FORBIDDEN"},
		{"typing as a non-member", "PUT", p + "/typing/" + url.PathEscape("@carol:hs"), carol, map[string]any{"typing": true}, 403, "M_FORBIDDEN"},
		{"receipt as a non-member", "POST", p + "/receipt/m.read/" + url.PathEscape("$x:hs"), carol, map[string]any{}, 403, "M_FORBIDDEN"},
		{"read markers as a non-member", "POST", p + "/read_markers", carol, map[string]any{"m.read": "$x:hs"}, 403, "M_FORBIDDEN"},
		{"typing as a member", "PUT", p + "/typing/" + url.PathEscape("@bob:hs"), bob, map[string]any{"typing": true}, 200, ""},
		{"bob leaves", "POST", p + "/leave", bob, nil, 200, ""},
		{"a left user sends", "PUT", p + "/send/m.room.message/2", bob, map[string]any{"body": "x"}, 403, "M_FORBIDDEN"},
		{"a left user reads state", "GET", p + "/state", bob, nil, 403, "M_FORBIDDEN"},
		{"a left user reads history up to the leave", "GET", p + "/messages", bob, nil, 200, ""},
		{"a user who never joined reads history", "GET", p + "/messages", carol, nil, 403, "M_FORBIDDEN"},
	})

	e.do("PUT", p+"/send/m.room.message/after", alice, map[string]any{"body": "after bob left"})
	var hist struct {
		Chunk []map[string]any `json:"chunk"`
	}
	e.get("GET", p+"/messages?dir=b&limit=1", bob, nil, &hist)
	if len(hist.Chunk) != 1 || hist.Chunk[0]["type"] != "m.room.member" || hist.Chunk[0]["state_key"] != "@bob:hs" {
		t.Errorf("a left user's newest visible event is his leave: %v", hist.Chunk)
	}

	// Aliases: only the creator, someone with power over the canonical
	// alias, or the namespace's AS deletes one; you alias only rooms you
	// are in.
	alias := "/_matrix/client/v3/directory/room/" + url.PathEscape("#lobby:hs")
	e.run(t, []call{
		{"alias a room one is not in", "PUT", alias, carol, map[string]any{"room_id": public}, 403, "M_FORBIDDEN"},
		{"bob aliases the public room", "PUT", alias, bob, map[string]any{"room_id": public}, 200, ""},
		{"alias taken", "PUT", alias, alice, map[string]any{"room_id": public}, 409, "M_UNKNOWN"},
		{"carol deletes bob's alias", "DELETE", alias, carol, nil, 403, "M_FORBIDDEN"},
		{"the room's admin deletes it", "DELETE", alias, alice, nil, 200, ""},
		{"the AS creates a room in its namespace", "POST", "/_matrix/client/v3/createRoom" + ghost, "as-bridge", map[string]any{"room_alias_name": "br_x"}, 200, ""},
		{"a user deletes the AS's alias", "DELETE", "/_matrix/client/v3/directory/room/" + url.PathEscape("#br_x:hs"), alice, nil, 400, "M_EXCLUSIVE"},
		{"the AS deletes its alias", "DELETE", "/_matrix/client/v3/directory/room/" + url.PathEscape("#br_x:hs"), "as-bridge", nil, 200, ""},
	})

	// Redactions: own events always, others' with the redact level.
	_, sent := e.do("PUT", pub+"/send/m.room.message/r1", bob, map[string]any{"body": "secret"})
	evID := sent["event_id"].(string)
	redact := pub + "/redact/" + url.PathEscape(evID) + "/"
	e.run(t, []call{
		{"join carol", "POST", pub + "/join", carol, nil, 200, ""},
		{"carol redacts bob's event", "PUT", redact + "c1", carol, map[string]any{}, 403, "M_FORBIDDEN"},
		{"redact an unknown event", "PUT", pub + "/redact/" + url.PathEscape("$nope:hs") + "/b0", bob, map[string]any{}, 404, "M_NOT_FOUND"},
		{"bob redacts his own", "PUT", redact + "b1", bob, map[string]any{"reason": "oops"}, 200, ""},
	})
	var ev map[string]any
	e.get("GET", pub+"/event/"+url.PathEscape(evID), alice, nil, &ev)
	if len(ev["content"].(map[string]any)) != 0 || ev["unsigned"].(map[string]any)["redacted_because"] == nil {
		t.Errorf("redacted event %v", ev)
	}
}

// TestCreateRoomValidatesFirst: a refused createRoom leaves no room, alias
// or event behind.
func TestCreateRoomValidatesFirst(t *testing.T) {
	e := start(t, t.TempDir(), notFoundAS())
	alice := e.register("alice")
	count := func() (n int) {
		e.srv.st.db.QueryRowContext(context.Background(), `SELECT (SELECT COUNT(*) FROM rooms) + (SELECT COUNT(*) FROM aliases) + (SELECT COUNT(*) FROM events)`).Scan(&n)
		return n
	}
	before := count()
	long := "@" + strings.Repeat("x", 300) + ":hs"
	e.run(t, []call{
		{"over-long invitee", "POST", "/_matrix/client/v3/createRoom", alice, map[string]any{"room_alias_name": "a1", "invite": []string{long}}, 400, "M_INVALID_PARAM"},
		{"unknown invitee", "POST", "/_matrix/client/v3/createRoom", alice, map[string]any{"room_alias_name": "a2", "invite": []string{"@nobody:hs"}}, 404, "M_NOT_FOUND"},
		{"unknown room version", "POST", "/_matrix/client/v3/createRoom", alice, map[string]any{"room_version": "99"}, 400, "M_UNSUPPORTED_ROOM_VERSION"},
		{"unknown preset", "POST", "/_matrix/client/v3/createRoom", alice, map[string]any{"preset": "x"}, 400, "M_INVALID_PARAM"},
		{"bad power level override", "POST", "/_matrix/client/v3/createRoom", alice, map[string]any{"power_level_content_override": map[string]any{"ban": "x"}}, 400, "M_BAD_JSON"},
		{"alias in an exclusive namespace", "POST", "/_matrix/client/v3/createRoom", alice, map[string]any{"room_alias_name": "br_a"}, 400, "M_EXCLUSIVE"},
		{"alias with a colon", "POST", "/_matrix/client/v3/createRoom", alice, map[string]any{"room_alias_name": "a:b"}, 400, "M_INVALID_PARAM"},
	})
	if after := count(); after != before {
		t.Errorf("refused createRoom left %d rows behind", after-before)
	}
	// Every option, honoured.
	bob := e.register("bob")
	_ = bob
	roomID := e.createRoom(alice, map[string]any{
		"preset": "trusted_private_chat", "name": "N", "topic": "T", "invite": []string{"@bob:hs"}, "is_direct": true,
		"initial_state":                []map[string]any{{"type": "m.room.join_rules", "content": map[string]any{"join_rule": "public"}}, {"type": "x.custom", "state_key": "k", "content": map[string]any{"a": 1}}},
		"power_level_content_override": map[string]any{"events_default": 10},
		"creation_content":             map[string]any{"m.federate": false},
		"room_version":                 "9", "visibility": "public", "room_alias_name": "opts",
	})
	r := room(roomID)
	checks := []struct {
		path, key string
		want      any
	}{
		{"/state/m.room.name/", "name", "N"},
		{"/state/m.room.topic/", "topic", "T"},
		{"/state/m.room.join_rules/", "join_rule", "public"},
		{"/state/x.custom/k", "a", float64(1)},
		{"/state/m.room.power_levels/", "events_default", float64(10)},
		{"/state/m.room.create/", "m.federate", false},
		{"/state/m.room.create/", "room_version", "9"},
		{"/state/m.room.canonical_alias/", "alias", "#opts:hs"},
		{"/state/m.room.member/" + url.PathEscape("@bob:hs"), "is_direct", true},
		{"/state/m.room.member/" + url.PathEscape("@bob:hs"), "membership", "invite"},
	}
	for _, c := range checks {
		var content map[string]any
		e.get("GET", r+c.path, alice, nil, &content)
		if content[c.key] != c.want {
			t.Errorf("%s: %s = %v, want %v (%v)", c.path, c.key, content[c.key], c.want, content)
		}
	}
	var pl map[string]any
	e.get("GET", r+"/state/m.room.power_levels/", alice, nil, &pl)
	if pl["invite"] != float64(0) {
		t.Errorf("private presets let members invite (invite 0), as Synapse: %v", pl)
	}
	if pl["users"].(map[string]any)["@bob:hs"] != float64(100) {
		t.Errorf("trusted_private_chat: invitees get 100: %v", pl)
	}
	var vis map[string]any
	e.get("GET", "/_matrix/client/v3/directory/list/room/"+url.PathEscape(roomID), "", nil, &vis)
	if vis["visibility"] != "public" {
		t.Errorf("visibility %v", vis)
	}
}
