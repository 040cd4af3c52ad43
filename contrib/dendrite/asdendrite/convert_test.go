package asdendrite

import (
	"context"
	"encoding/json"
	"testing"

	roomserverAPI "github.com/matrix-org/dendrite/roomserver/api"
	"github.com/matrix-org/dendrite/roomserver/types"
	"github.com/matrix-org/dendrite/setup/jetstream"
	"github.com/matrix-org/gomatrixserverlib"
	"github.com/matrix-org/gomatrixserverlib/spec"
	"github.com/nats-io/nats.go"
	"go.uber.org/zap"
)

// senderRS maps sender IDs to user IDs as in a room without pseudo IDs.
type senderRS struct {
	roomserverAPI.AppserviceRoomserverAPI
}

func (senderRS) QueryUserIDForSender(_ context.Context, _ spec.RoomID, s spec.SenderID) (*spec.UserID, error) {
	return spec.NewUserID(string(s), true)
}

func pdu(t *testing.T, js string) gomatrixserverlib.PDU {
	t.Helper()
	ev, err := gomatrixserverlib.MustGetRoomVersion(gomatrixserverlib.RoomVersionV10).NewEventFromTrustedJSON([]byte(js), false)
	if err != nil {
		t.Fatal(err)
	}
	return ev
}

func outputMsg(t *testing.T, typ roomserverAPI.OutputType, ev gomatrixserverlib.PDU, adds, removes []string) *nats.Msg {
	t.Helper()
	out := roomserverAPI.OutputEvent{Type: typ}
	if typ == roomserverAPI.OutputTypeNewRoomEvent {
		out.NewRoomEvent = &roomserverAPI.OutputNewRoomEvent{Event: &types.HeaderedEvent{PDU: ev},
			AddsStateEventIDs: adds, RemovesStateEventIDs: removes}
	}
	data, err := json.Marshal(out)
	if err != nil {
		t.Fatal(err)
	}
	msg := nats.NewMsg("x")
	msg.Header.Set(jetstream.RoomEventType, string(typ))
	msg.Data = data
	return msg
}

const base = `"room_id":"!r:example.org","sender":"@alice:example.org","origin_server_ts":1,"depth":3,"prev_events":[],"auth_events":[],"hashes":{"sha256":"x"},"signatures":{}`

func TestConvert(t *testing.T) {
	a := &API{log: zap.NewNop(), rsAPI: senderRS{}}
	msgEv := pdu(t, `{"type":"m.room.message","content":{"body":"hi","msgtype":"m.text"},`+base+`}`)
	join := pdu(t, `{"type":"m.room.member","state_key":"@irc_bob:example.org","content":{"membership":"join"},`+base+`}`)
	for _, tc := range []struct {
		name       string
		msg        *nats.Msg
		ok         bool
		typ        string
		membership string
		stateRoom  string
	}{
		{"message", outputMsg(t, roomserverAPI.OutputTypeNewRoomEvent, msgEv, nil, nil), true, "m.room.message", "", ""},
		{"join, its own state delta", outputMsg(t, roomserverAPI.OutputTypeNewRoomEvent, join, []string{join.EventID()}, nil), true, "m.room.member", "join", ""},
		{"state resolution removed state", outputMsg(t, roomserverAPI.OutputTypeNewRoomEvent, msgEv, nil, []string{"$old"}), true, "m.room.message", "", "!r:example.org"},
		{"state resolution added more", outputMsg(t, roomserverAPI.OutputTypeNewRoomEvent, join, []string{join.EventID(), "$other"}, nil), true, "m.room.member", "join", "!r:example.org"},
		{"not a new room event", outputMsg(t, roomserverAPI.OutputTypeRetireInviteEvent, nil, nil, nil), false, "", "", ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			it, stateRoom, ok := a.convert(context.Background(), tc.msg)
			if ok != tc.ok || stateRoom != tc.stateRoom {
				t.Fatalf("ok %v stateRoom %q", ok, stateRoom)
			}
			if !ok {
				return
			}
			ev := it.ev
			if ev.Type != tc.typ || ev.Membership != tc.membership || ev.RoomID != "!r:example.org" || ev.Sender != "@alice:example.org" || ev.ID == "" {
				t.Fatalf("event %+v", ev)
			}
			var client map[string]any
			if err := json.Unmarshal(ev.JSON, &client); err != nil {
				t.Fatal(err)
			}
			for _, f := range []string{"hashes", "signatures", "depth", "prev_events", "auth_events"} {
				if _, ok := client[f]; ok {
					t.Errorf("federation field %s in client-format JSON: %s", f, ev.JSON)
				}
			}
			if client["event_id"] != ev.ID || client["sender"] != "@alice:example.org" {
				t.Errorf("client JSON %s", ev.JSON)
			}
			if tc.typ == "m.room.member" && (ev.StateKey == nil || *ev.StateKey != "@irc_bob:example.org") {
				t.Errorf("state key %v", ev.StateKey)
			}
		})
	}
}
