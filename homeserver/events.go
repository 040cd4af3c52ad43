package homeserver

import (
	"context"
	"database/sql"
	"encoding/json"
	"fmt"
	"slices"
	"strings"
	"time"

	"go.uber.org/zap"
)

// event is a room event in the client format.
type event struct {
	ID       string         `json:"event_id"`
	RoomID   string         `json:"room_id"`
	Type     string         `json:"type"`
	Sender   string         `json:"sender"`
	StateKey *string        `json:"state_key,omitempty"`
	Content  map[string]any `json:"content"`
	TS       int64          `json:"origin_server_ts"`
	Redacts  string         `json:"redacts,omitempty"`
	Unsigned map[string]any `json:"unsigned"`

	seq      int64  // position in the events table; 0 until stored
	txnID    string // the client's transaction id, for the sender's own view
	txnToken string // hash of the token that sent it
}

func (e *event) isState() bool { return e.StateKey != nil }

func (e *event) membership() string {
	if e.Type != "m.room.member" {
		return ""
	}
	m, _ := e.Content["membership"].(string)
	return m
}

// newEvent builds an event to be committed; its ID is random.
func (s *Server) newEvent(roomID, typ, sender string, stateKey *string, content map[string]any) *event {
	if content == nil {
		content = map[string]any{}
	}
	return &event{ID: "$" + randomID(16) + ":" + s.cfg.ServerName, RoomID: roomID, Type: typ, Sender: sender,
		StateKey: stateKey, Content: content, TS: time.Now().UnixMilli(), Unsigned: map[string]any{}}
}

// viewFor is the event as viewer (nil: nobody in particular, an AS
// transaction) sees it: with its age, and the transaction id it was sent
// with when viewer sent it with the same token.
func (e *event) viewFor(c *caller) *event {
	v := *e
	v.Unsigned = make(map[string]any, len(e.Unsigned)+2)
	for k, x := range e.Unsigned {
		v.Unsigned[k] = x
	}
	v.Unsigned["age"] = max(time.Now().UnixMilli()-e.TS, 0)
	if c != nil && e.txnID != "" && e.Sender == c.userID && e.txnToken == c.token {
		v.Unsigned["transaction_id"] = e.txnID
	}
	return &v
}

// commit stores events in the log in one transaction (with extra, if set,
// run inside it). Once it returns they are the homeserver's: the hand-over
// goroutine gives them to the dispatcher, retrying until that lands. A
// failure to write the log is answered 503, to be retried (with the same
// txnId, which stays idempotent). The caller holds s.mu.
func (s *Server) commit(ctx context.Context, evs []*event, extra func(tx *sql.Tx) error) error {
	mark := len(s.memberNews)
	if err := s.commitLog(ctx, evs, extra); err != nil {
		s.memberNews = s.memberNews[:mark]
		if _, ok := asMatrixError(err); ok {
			return err
		}
		s.log.Error("writing to the event log failed", zap.Error(err))
		return errUnavailable
	}
	s.wake()
	s.kickHandover()
	s.announceMembers(ctx, mark)
	return nil
}

// announceMembers passes on the membership changes written since mark,
// once their commit landed: device list news for encrypted ASes (who now
// shares a room with whom). Under s.mu.
func (s *Server) announceMembers(ctx context.Context, mark int) {
	news := slices.Clone(s.memberNews[mark:])
	s.memberNews = s.memberNews[:mark]
	if len(news) > 0 {
		s.notifyMembership(ctx, news)
	}
}

func (s *Server) commitLog(ctx context.Context, evs []*event, extra func(tx *sql.Tx) error) (err error) {
	defer func() {
		if err != nil {
			s.forgetPowerLevels("")
		}
	}()
	tx, err := s.st.db.BeginTx(ctx, nil)
	if err != nil {
		return err
	}
	defer tx.Rollback()
	if err := s.writeEvents(ctx, tx, evs); err != nil {
		return err
	}
	if extra != nil {
		if err := extra(tx); err != nil {
			return err
		}
	}
	if err := s.checkLogFault(); err != nil {
		return err
	}
	return tx.Commit()
}

// checkLogFault runs the test seam that fails a commit to the log.
func (s *Server) checkLogFault() error {
	if f := s.logFault.Load(); f != nil {
		return (*f)()
	}
	return nil
}

// writeEvents appends evs to the log inside tx and updates the current
// state they change. Membership changes that start or end sharing a room
// are noted in s.memberNews, for the caller to announce once its commit
// lands (or to drop if it does not). Under s.mu.
func (s *Server) writeEvents(ctx context.Context, tx querier, evs []*event) error {
	for _, ev := range evs {
		if ev.isState() || ev.Redacts != "" {
			s.forgetPowerLevels(ev.RoomID)
		}
		if ev.isState() {
			// As Synapse: a state event says what it replaced, so clients
			// and bridges see transitions (invite to join, name changes).
			old, err := s.stateEvent(ctx, tx, ev.RoomID, ev.Type, *ev.StateKey)
			if err != nil {
				return err
			}
			if old != nil {
				ev.Unsigned["replaces_state"], ev.Unsigned["prev_content"], ev.Unsigned["prev_sender"] = old.ID, old.Content, old.Sender
			}
			// Only a join starts sharing a room and only the end of a
			// join ends it; an invite or a profile change does neither.
			if was := old != nil && old.membership() == "join"; ev.Type == "m.room.member" && was != (ev.membership() == "join") {
				s.memberNews = append(s.memberNews, membershipChange{room: ev.RoomID, user: *ev.StateKey, joined: !was})
			}
		}
		js, err := json.Marshal(ev)
		if err != nil {
			return fmt.Errorf("encode event: %w", err)
		}
		res, err := tx.ExecContext(ctx, `INSERT INTO events (event_id, room_id, json, sender, type, state_key, ts, txn_id, txn_token) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)`,
			ev.ID, ev.RoomID, js, ev.Sender, ev.Type, ev.StateKey, ev.TS, nullable(ev.txnID), nullable(ev.txnToken))
		if err != nil {
			return err
		}
		if ev.seq, err = res.LastInsertId(); err != nil {
			return err
		}
		if ev.isState() {
			if _, err := tx.ExecContext(ctx, `INSERT OR REPLACE INTO room_state (room_id, type, state_key, event_id) VALUES (?, ?, ?, ?)`, ev.RoomID, ev.Type, *ev.StateKey, ev.ID); err != nil {
				return err
			}
			if ev.Type == "m.room.member" {
				if _, err := tx.ExecContext(ctx, `INSERT OR REPLACE INTO memberships (room_id, user_id, membership) VALUES (?, ?, ?)`, ev.RoomID, *ev.StateKey, ev.membership()); err != nil {
					return err
				}
			}
		}
	}
	return nil
}

func nullable(s string) any {
	if s == "" {
		return nil
	}
	return s
}

const eventCols = `seq, json, COALESCE(txn_id, ''), COALESCE(txn_token, '')`

// scanEvents reads rows of eventCols.
func scanEvents(rows *sql.Rows) ([]*event, error) {
	defer rows.Close()
	var out []*event
	for rows.Next() {
		var js []byte
		ev := &event{}
		if err := rows.Scan(&ev.seq, &js, &ev.txnID, &ev.txnToken); err != nil {
			return nil, err
		}
		if err := json.Unmarshal(js, ev); err != nil {
			return nil, fmt.Errorf("stored event: %w", err)
		}
		if ev.Unsigned == nil {
			ev.Unsigned = map[string]any{}
		}
		if ev.Content == nil {
			ev.Content = map[string]any{}
		}
		out = append(out, ev)
	}
	return out, rows.Err()
}

func queryEvents(ctx context.Context, q querier, query string, args ...any) ([]*event, error) {
	rows, err := q.QueryContext(ctx, query, args...)
	if err != nil {
		return nil, err
	}
	return scanEvents(rows)
}

// eventByID returns a stored event, or nil.
func (s *Server) eventByID(ctx context.Context, q querier, eventID string) (*event, error) {
	evs, err := queryEvents(ctx, q, `SELECT `+eventCols+` FROM events WHERE event_id = ?`, eventID)
	if err != nil || len(evs) == 0 {
		return nil, err
	}
	return evs[0], nil
}

// stateEvent returns the current state event (type, key) of a room, or nil.
func (s *Server) stateEvent(ctx context.Context, q querier, roomID, typ, key string) (*event, error) {
	evs, err := queryEvents(ctx, q, `SELECT `+eventCols+` FROM events WHERE event_id = (SELECT event_id FROM room_state WHERE room_id = ? AND type = ? AND state_key = ?)`, roomID, typ, key)
	if err != nil || len(evs) == 0 {
		return nil, err
	}
	return evs[0], nil
}

// roomState returns the current state of a room.
func (s *Server) roomState(ctx context.Context, q querier, roomID string) ([]*event, error) {
	return queryEvents(ctx, q, `SELECT `+eventCols+` FROM events WHERE event_id IN (SELECT event_id FROM room_state WHERE room_id = ?) ORDER BY seq`, roomID)
}

func (s *Server) membership(ctx context.Context, q querier, roomID, userID string) (string, error) {
	var m string
	_, err := one(ctx, q, `SELECT membership FROM memberships WHERE room_id = ? AND user_id = ?`, []any{roomID, userID}, &m)
	return m, err
}

func (s *Server) roomExists(ctx context.Context, q querier, roomID string) (bool, error) {
	var creator string
	return one(ctx, q, `SELECT creator FROM rooms WHERE room_id = ?`, []any{roomID}, &creator)
}

// redact strips an event's content down to what the redaction algorithm
// keeps (room versions up to 11) and records what redacted it.
func redact(ev *event, because *event) {
	keep := map[string][]string{
		"m.room.member":             {"membership", "join_authorised_via_users_server"},
		"m.room.join_rules":         {"join_rule", "allow"},
		"m.room.power_levels":       {"ban", "events", "events_default", "invite", "kick", "redact", "state_default", "users", "users_default"},
		"m.room.history_visibility": {"history_visibility"},
	}[ev.Type]
	content := map[string]any{}
	if ev.Type == "m.room.create" {
		content = ev.Content
	}
	for _, k := range keep {
		if v, ok := ev.Content[k]; ok {
			content[k] = v
		}
	}
	ev.Content = content
	b := *because
	b.Unsigned = map[string]any{}
	ev.Unsigned = map[string]any{"redacted_because": &b}
}

func ptr(s string) *string { return &s }

// localpart is the localpart of a user ID.
func localpart(userID string) string {
	l, _, _ := strings.Cut(strings.TrimPrefix(userID, "@"), ":")
	return l
}
