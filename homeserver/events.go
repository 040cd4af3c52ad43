package homeserver

import (
	"context"
	"encoding/json"
	"fmt"
	"time"

	"github.com/asdispatch/asdispatch/dispatcher"
)

// send persists one event and hands it to the dispatcher, which returns
// once it is durably queued for every interested AS. The caller holds s.mu.
func (s *Server) send(ctx context.Context, roomID, typ, sender string, stateKey *string, content map[string]any) (string, error) {
	if content == nil {
		content = map[string]any{}
	}
	eventID := "$" + randomID(12) + ":" + s.cfg.ServerName
	ev := map[string]any{
		"event_id": eventID, "room_id": roomID, "type": typ, "sender": sender, "content": content,
		"origin_server_ts": time.Now().UnixMilli(), "unsigned": map[string]any{},
	}
	if stateKey != nil {
		ev["state_key"] = *stateKey
	}
	js, err := json.Marshal(ev)
	if err != nil {
		return "", fmt.Errorf("encode event: %w", err)
	}
	membership, _ := content["membership"].(string)
	tx, err := s.st.db.BeginTx(ctx, nil)
	if err != nil {
		return "", err
	}
	defer tx.Rollback()
	if _, err := tx.Exec(`INSERT INTO events (event_id, room_id, json) VALUES (?, ?, ?)`, eventID, roomID, js); err != nil {
		return "", err
	}
	if stateKey != nil {
		if _, err := tx.Exec(`INSERT OR REPLACE INTO room_state (room_id, type, state_key, event_id) VALUES (?, ?, ?, ?)`, roomID, typ, *stateKey, eventID); err != nil {
			return "", err
		}
		if typ == "m.room.member" {
			if _, err := tx.Exec(`INSERT OR REPLACE INTO memberships (room_id, user_id, membership) VALUES (?, ?, ?)`, roomID, *stateKey, membership); err != nil {
				return "", err
			}
		}
	}
	if err := tx.Commit(); err != nil {
		return "", err
	}
	err = s.disp.Submit(ctx, dispatcher.Event{
		ID: eventID, RoomID: roomID, Type: typ, Sender: sender, StateKey: stateKey, Membership: membership, JSON: js,
	})
	if err != nil {
		return "", fmt.Errorf("dispatch: %w", err)
	}
	return eventID, nil
}

func (s *Server) membership(ctx context.Context, roomID, userID string) (string, error) {
	var m string
	_, err := s.st.one(ctx, &m, `SELECT membership FROM memberships WHERE room_id = ? AND user_id = ?`, roomID, userID)
	return m, err
}

func (s *Server) roomExists(ctx context.Context, roomID string) (bool, error) {
	var creator string
	return s.st.one(ctx, &creator, `SELECT creator FROM rooms WHERE room_id = ?`, roomID)
}

func ptr(s string) *string { return &s }
