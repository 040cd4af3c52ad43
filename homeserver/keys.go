package homeserver

import (
	"bytes"
	"context"
	"database/sql"
	"encoding/json"
	"sort"
	"strings"

	"go.uber.org/zap"

	"github.com/asdispatch/asdispatch/dispatcher"
)

func (s *Server) keyRoutes() []route {
	return []route{
		{"POST", v3 + "/keys/upload", user, typed(s.uploadKeys)},
		{"POST", v3 + "/keys/query", user, typed(s.queryKeys)},
		{"POST", v3 + "/keys/claim", user, typed(s.claimKeys)},
		{"GET", v3 + "/keys/changes", user, s.keyChanges},
		{"POST", v3 + "/keys/device_signing/upload", user, typed(s.uploadCrossSigning)},
		{"POST", v3 + "/keys/signatures/upload", user, typed(s.uploadSignatures)},
	}
}

// KeyObserver is told what changed in the end-to-end encryption state, after
// the change is committed and handed to the dispatcher (which queues it for
// the MSC3202 ASes: Dispatcher.SubmitDeviceLists and SubmitKeyCounts). It is
// for observers beside the dispatcher, such as tests. Calls come in commit
// order, one at a time. An error is logged; the client's request has
// succeeded by then.
type KeyObserver interface {
	// DeviceListChanged: userID's devices or keys changed; pos is its row in
	// the device list stream, rooms the rooms userID is joined to (whose
	// members see the change).
	DeviceListChanged(ctx context.Context, userID string, pos int64, rooms []string) error
	// KeyCountsChanged: the counts of one device after an upload or a claim.
	KeyCountsChanged(ctx context.Context, counts KeyCounts) error
}

// KeyCounts are a device's unclaimed one-time keys per algorithm and the
// algorithms of its unused fallback keys.
type KeyCounts struct {
	UserID, DeviceID string
	OneTimeKeys      map[string]int
	UnusedFallback   []string
}

// needDevice is the caller's device: keys belong to a device, which an
// as_token caller names with ?device_id= (MSC4326).
func needDevice(r *request) (string, error) {
	if r.c.deviceID == "" {
		return "", errUnknown400.With("uploading keys needs a device: pass device_id with the as_token")
	}
	return r.c.deviceID, nil
}

type reqUploadKeys struct {
	DeviceKeys           json.RawMessage            `json:"device_keys"`
	OneTimeKeys          map[string]json.RawMessage `json:"one_time_keys"`
	FallbackKeys         map[string]json.RawMessage `json:"fallback_keys"`
	FallbackKeysUnstable map[string]json.RawMessage `json:"org.matrix.msc2732.fallback_keys"`
}

type respUploadKeys struct {
	Counts map[string]int `json:"one_time_key_counts"`
}

// deviceKeysHead is what the stub reads of uploaded device keys.
type deviceKeysHead struct {
	UserID     string            `json:"user_id"`
	DeviceID   string            `json:"device_id"`
	Algorithms []string          `json:"algorithms"`
	Keys       map[string]string `json:"keys"`
}

// keyAlgorithm is the algorithm of a key ID "algorithm:id".
func keyAlgorithm(keyID string) (string, error) {
	alg, id, ok := strings.Cut(keyID, ":")
	if !ok || alg == "" || id == "" {
		return "", errInvalidParam.With("key ID %q is not algorithm:id", keyID)
	}
	return alg, nil
}

func compactJSON(raw json.RawMessage) ([]byte, error) {
	var b bytes.Buffer
	if err := json.Compact(&b, raw); err != nil {
		return nil, errBadJSON.With("invalid key JSON")
	}
	return b.Bytes(), nil
}

// uploadKeys stores the caller device's identity keys, one-time keys and
// fallback keys, and answers the device's one-time key counts. A key ID
// uploaded again with other content is refused, as Synapse does.
func (s *Server) uploadKeys(r *request, req *reqUploadKeys) (any, error) {
	dev, err := needDevice(r)
	if err != nil {
		return nil, err
	}
	var devKeys []byte
	if len(req.DeviceKeys) > 0 && string(req.DeviceKeys) != "null" {
		var head deviceKeysHead
		if err := json.Unmarshal(req.DeviceKeys, &head); err != nil {
			return nil, errBadJSON.With("device_keys must be an object")
		}
		if head.UserID != r.c.userID || head.DeviceID != dev {
			return nil, errInvalidParam.With("device_keys are for %s %s, not the caller's device", head.UserID, head.DeviceID)
		}
		if len(head.Algorithms) == 0 || len(head.Keys) == 0 {
			return nil, errMissingParam.With("device_keys need algorithms and keys")
		}
		if devKeys, err = compactJSON(req.DeviceKeys); err != nil {
			return nil, err
		}
	}
	fallback := req.FallbackKeys
	if fallback == nil {
		fallback = req.FallbackKeysUnstable
	}
	ctx := r.Context()
	s.mu.Lock()
	defer s.mu.Unlock()
	var counts KeyCounts
	err = s.deviceListTx(ctx, func(tx *sql.Tx) ([]string, error) {
		changed := false
		if devKeys != nil {
			var old []byte
			if _, err := one(ctx, tx, `SELECT json FROM device_keys WHERE user_id = ? AND device_id = ?`, []any{r.c.userID, dev}, &old); err != nil {
				return nil, err
			}
			if !bytes.Equal(old, devKeys) {
				if _, err := tx.ExecContext(ctx, `INSERT OR REPLACE INTO device_keys (user_id, device_id, json) VALUES (?, ?, ?)`, r.c.userID, dev, devKeys); err != nil {
					return nil, err
				}
				changed = true
			}
		}
		for _, keyID := range sortedKeys(req.OneTimeKeys) {
			alg, err := keyAlgorithm(keyID)
			if err != nil {
				return nil, err
			}
			js, err := compactJSON(req.OneTimeKeys[keyID])
			if err != nil {
				return nil, err
			}
			var old []byte
			found, err := one(ctx, tx, `SELECT json FROM one_time_keys WHERE user_id = ? AND device_id = ? AND key_id = ?`, []any{r.c.userID, dev, keyID}, &old)
			if err != nil {
				return nil, err
			}
			if found {
				if !bytes.Equal(old, js) {
					return nil, errInvalidParam.With("one-time key %s already exists with other content", keyID)
				}
				continue
			}
			if _, err := tx.ExecContext(ctx, `INSERT INTO one_time_keys (user_id, device_id, key_id, algorithm, json) VALUES (?, ?, ?, ?, ?)`, r.c.userID, dev, keyID, alg, js); err != nil {
				return nil, err
			}
		}
		for _, keyID := range sortedKeys(fallback) {
			alg, err := keyAlgorithm(keyID)
			if err != nil {
				return nil, err
			}
			js, err := compactJSON(fallback[keyID])
			if err != nil {
				return nil, err
			}
			// A new fallback key replaces the algorithm's old one, used or not;
			// the same key again keeps its used flag.
			if _, err := tx.ExecContext(ctx, `INSERT INTO fallback_keys (user_id, device_id, algorithm, key_id, json) VALUES (?, ?, ?, ?, ?)
			ON CONFLICT (user_id, device_id, algorithm) DO UPDATE SET key_id = excluded.key_id, json = excluded.json,
			used = CASE WHEN fallback_keys.key_id = excluded.key_id AND fallback_keys.json = excluded.json THEN fallback_keys.used ELSE 0 END`,
				r.c.userID, dev, alg, keyID, js); err != nil {
				return nil, err
			}
		}
		var err error
		if counts, err = keyCounts(ctx, tx, r.c.userID, dev); err != nil || !changed {
			return nil, err
		}
		return []string{r.c.userID}, nil
	})
	if err != nil {
		return nil, err
	}
	if len(req.OneTimeKeys) > 0 || len(fallback) > 0 {
		s.notifyCounts(ctx, counts)
	}
	return &respUploadKeys{Counts: counts.OneTimeKeys}, nil
}

// keyCounts reads a device's counts. signed_curve25519 is always listed,
// as Synapse does: clients read a missing count as "upload more".
func keyCounts(ctx context.Context, q querier, userID, deviceID string) (KeyCounts, error) {
	kc := KeyCounts{UserID: userID, DeviceID: deviceID, OneTimeKeys: map[string]int{"signed_curve25519": 0}, UnusedFallback: []string{}}
	rows, err := q.QueryContext(ctx, `SELECT algorithm, COUNT(*) FROM one_time_keys WHERE user_id = ? AND device_id = ? GROUP BY algorithm`, userID, deviceID)
	if err != nil {
		return kc, err
	}
	defer rows.Close()
	for rows.Next() {
		var alg string
		var n int
		if err := rows.Scan(&alg, &n); err != nil {
			return kc, err
		}
		kc.OneTimeKeys[alg] = n
	}
	if err := rows.Err(); err != nil {
		return kc, err
	}
	algs, err := list(ctx, q, `SELECT algorithm FROM fallback_keys WHERE user_id = ? AND device_id = ? AND used = 0 ORDER BY algorithm`, userID, deviceID)
	if err != nil {
		return kc, err
	}
	if algs != nil {
		kc.UnusedFallback = algs
	}
	return kc, nil
}

// deviceListChanged appends a change of userID's devices to the device
// list stream; the caller holds s.mu and commits tx.
func (s *Server) deviceListChanged(ctx context.Context, tx querier, userID string) (int64, error) {
	res, err := tx.ExecContext(ctx, `INSERT INTO device_lists (user_id) VALUES (?)`, userID)
	if err != nil {
		return 0, err
	}
	return res.LastInsertId()
}

// deviceListTx runs f in a transaction; f returns the users whose devices
// or keys it changed. Each gets a device list stream entry in the same
// transaction and, once it is committed, a notification. The caller holds
// s.mu.
func (s *Server) deviceListTx(ctx context.Context, f func(tx *sql.Tx) ([]string, error)) error {
	tx, err := s.st.db.BeginTx(ctx, nil)
	if err != nil {
		return err
	}
	defer tx.Rollback()
	users, err := f(tx)
	if err != nil {
		return err
	}
	positions := make([]int64, len(users))
	for i, u := range users {
		if positions[i], err = s.deviceListChanged(ctx, tx, u); err != nil {
			return err
		}
	}
	if err := tx.Commit(); err != nil {
		return err
	}
	if len(users) > 0 {
		s.wake()
	}
	for i, u := range users {
		s.notifyDeviceList(ctx, u, positions[i])
	}
	return nil
}

// notifyDeviceList hands a committed change of userID's devices or keys to
// the dispatcher and the KeyObserver, if any. A failure is logged: the
// change is committed, and the AS learns of it at the next one.
func (s *Server) notifyDeviceList(ctx context.Context, userID string, pos int64) {
	rooms, err := s.st.list(ctx, `SELECT room_id FROM memberships WHERE user_id = ? AND membership = 'join' ORDER BY room_id`, userID)
	if err == nil {
		err = s.disp.SubmitDeviceLists(ctx, dispatcher.DeviceList{UserID: userID, Rooms: rooms})
	}
	if err == nil && s.cfg.Keys != nil {
		err = s.cfg.Keys.DeviceListChanged(ctx, userID, pos, rooms)
	}
	if err != nil {
		s.log.Error("device list change not passed on", zap.String("user_id", userID), zap.Error(err))
	}
}

// notifyMembership hands the device list news of committed membership
// changes to the dispatcher: a join is a "changed" for the ASes sharing a
// room with the user now, a leave a "left" for those that no longer do.
// When the user is an AS's, the AS also hears of the room's other members:
// "changed" after a join, "left" after a leave for those it no longer
// shares a room with.
func (s *Server) notifyMembership(ctx context.Context, changes []membershipChange) {
	set := s.cfg.Registry.Current()
	joinedRooms := func(user string) ([]string, error) {
		return s.st.list(ctx, `SELECT room_id FROM memberships WHERE user_id = ? AND membership = 'join' ORDER BY room_id`, user)
	}
	var news []dispatcher.DeviceList
	err := func() error {
		for _, c := range changes {
			rooms, err := joinedRooms(c.user)
			if err != nil {
				return err
			}
			n := dispatcher.DeviceList{UserID: c.user, Rooms: rooms}
			if !c.joined {
				n.Left = []string{c.room}
			}
			news = append(news, n)
			if len(set.UsersInterested(nil, c.user)) == 0 {
				continue
			}
			members, err := s.st.list(ctx, `SELECT user_id FROM memberships WHERE room_id = ? AND membership = 'join' AND user_id != ? ORDER BY user_id`, c.room, c.user)
			if err != nil {
				return err
			}
			for _, m := range members {
				n := dispatcher.DeviceList{UserID: m, Viewer: c.user}
				if !c.joined {
					if n.Rooms, err = joinedRooms(m); err != nil {
						return err
					}
					n.Left = []string{c.room}
				}
				news = append(news, n)
			}
		}
		return s.disp.SubmitDeviceLists(ctx, news...)
	}()
	if err != nil {
		s.log.Error("device list changes not passed on", zap.Int("changes", len(changes)), zap.Error(err))
	}
}

// membershipChange is a join, or the end of one (leave, kick, ban), of
// user in room.
type membershipChange struct {
	room, user string
	joined     bool
}

func (s *Server) notifyCounts(ctx context.Context, kc KeyCounts) {
	err := s.disp.SubmitKeyCounts(ctx, dispatcher.KeyCounts{UserID: kc.UserID, DeviceID: kc.DeviceID, OneTimeKeys: kc.OneTimeKeys, UnusedFallback: kc.UnusedFallback})
	if err == nil && s.cfg.Keys != nil {
		err = s.cfg.Keys.KeyCountsChanged(ctx, kc)
	}
	if err != nil {
		s.log.Error("key counts not passed on", zap.String("user_id", kc.UserID), zap.Error(err))
	}
}

type reqQueryKeys struct {
	DeviceKeys map[string][]string `json:"device_keys"`
	Timeout    int                 `json:"timeout"`
}

type respQueryKeys struct {
	Failures        map[string]any                        `json:"failures"`
	DeviceKeys      map[string]map[string]json.RawMessage `json:"device_keys"`
	MasterKeys      map[string]json.RawMessage            `json:"master_keys"`
	SelfSigningKeys map[string]json.RawMessage            `json:"self_signing_keys"`
	UserSigningKeys map[string]json.RawMessage            `json:"user_signing_keys"`
}

// queryKeys answers the device keys and cross-signing keys of users (all
// local: the stub has no federation). Signatures others uploaded are shown
// when the signer is the key's owner or the caller, as on Synapse: a
// user-signing key's signatures are private to its owner. A user-signing
// key is only ever shown to its owner.
func (s *Server) queryKeys(r *request, req *reqQueryKeys) (any, error) {
	ctx := r.Context()
	out := &respQueryKeys{Failures: map[string]any{}, DeviceKeys: map[string]map[string]json.RawMessage{},
		MasterKeys: map[string]json.RawMessage{}, SelfSigningKeys: map[string]json.RawMessage{}, UserSigningKeys: map[string]json.RawMessage{}}
	for _, u := range sortedKeys(req.DeviceKeys) {
		if !strings.HasPrefix(u, "@") || !strings.Contains(u, ":") {
			return nil, errInvalidParam.With("%q is not a user ID", u)
		}
		want := req.DeviceKeys[u]
		devs := map[string]json.RawMessage{}
		rows, err := s.st.db.QueryContext(ctx, `SELECT k.device_id, k.json, d.display_name FROM device_keys k
			LEFT JOIN devices d ON d.user_id = k.user_id AND d.device_id = k.device_id WHERE k.user_id = ? ORDER BY k.device_id`, u)
		if err != nil {
			return nil, err
		}
		type devRow struct {
			id   string
			js   []byte
			name sql.NullString
		}
		var found []devRow
		for rows.Next() {
			var d devRow
			if err := rows.Scan(&d.id, &d.js, &d.name); err != nil {
				rows.Close()
				return nil, err
			}
			found = append(found, d)
		}
		rows.Close()
		if err := rows.Err(); err != nil {
			return nil, err
		}
		for _, d := range found {
			if len(want) > 0 && !contains(want, d.id) {
				continue
			}
			var obj map[string]any
			if err := json.Unmarshal(d.js, &obj); err != nil {
				return nil, err
			}
			if err := s.addSignatures(ctx, obj, u, d.id, r.c.userID); err != nil {
				return nil, err
			}
			unsigned, _ := obj["unsigned"].(map[string]any)
			if unsigned == nil {
				unsigned = map[string]any{}
			}
			if d.name.Valid {
				unsigned["device_display_name"] = d.name.String
			}
			obj["unsigned"] = unsigned
			js, _ := json.Marshal(obj)
			devs[d.id] = js
		}
		out.DeviceKeys[u] = devs
		for _, k := range []struct {
			usage string
			dst   map[string]json.RawMessage
		}{{"master", out.MasterKeys}, {"self_signing", out.SelfSigningKeys}, {"user_signing", out.UserSigningKeys}} {
			if k.usage == "user_signing" && u != r.c.userID {
				continue
			}
			js, err := s.crossSigningKey(ctx, u, k.usage, r.c.userID)
			if err != nil {
				return nil, err
			}
			if js != nil {
				k.dst[u] = js
			}
		}
	}
	return out, nil
}

// crossSigningKey is a user's key of one usage with the signatures viewer
// may see; nil if there is none.
func (s *Server) crossSigningKey(ctx context.Context, userID, usage, viewer string) (json.RawMessage, error) {
	var raw []byte
	ok, err := s.st.one(ctx, &raw, `SELECT json FROM cross_signing_keys WHERE user_id = ? AND usage = ?`, userID, usage)
	if err != nil || !ok {
		return nil, err
	}
	var obj map[string]any
	if err := json.Unmarshal(raw, &obj); err != nil {
		return nil, err
	}
	if pub := publicKeyOf(obj); pub != "" {
		if err := s.addSignatures(ctx, obj, userID, pub, viewer); err != nil {
			return nil, err
		}
	}
	return json.Marshal(obj)
}

// publicKeyOf is the unpadded base64 public key of a cross-signing key:
// its keys object has one entry "ed25519:<key>": "<key>".
func publicKeyOf(obj map[string]any) string {
	keys, _ := obj["keys"].(map[string]any)
	for _, v := range keys {
		if s, ok := v.(string); ok {
			return s
		}
	}
	return ""
}

// addSignatures merges the stored signatures on (userID, keyID) that viewer
// may see into obj["signatures"].
func (s *Server) addSignatures(ctx context.Context, obj map[string]any, userID, keyID, viewer string) error {
	rows, err := s.st.db.QueryContext(ctx, `SELECT signer_user, signer_key, signature FROM key_signatures
		WHERE target_user = ? AND target_key = ? AND (signer_user = ? OR signer_user = ?) ORDER BY signer_user, signer_key`, userID, keyID, userID, viewer)
	if err != nil {
		return err
	}
	defer rows.Close()
	sigs, _ := obj["signatures"].(map[string]any)
	if sigs == nil {
		sigs = map[string]any{}
	}
	for rows.Next() {
		var signer, key, sig string
		if err := rows.Scan(&signer, &key, &sig); err != nil {
			return err
		}
		m, _ := sigs[signer].(map[string]any)
		if m == nil {
			m = map[string]any{}
			sigs[signer] = m
		}
		m[key] = sig
	}
	if len(sigs) > 0 {
		obj["signatures"] = sigs
	}
	return rows.Err()
}

type reqClaimKeys struct {
	OneTimeKeys map[string]map[string]string `json:"one_time_keys"`
	Timeout     int                          `json:"timeout"`
}

type respClaimKeys struct {
	Failures    map[string]any                                   `json:"failures"`
	OneTimeKeys map[string]map[string]map[string]json.RawMessage `json:"one_time_keys"`
}

// claimKeys hands out one one-time key per requested device and consumes
// it; a device out of one-time keys gives its fallback key, which stays
// (marked used) until the device uploads a new one.
func (s *Server) claimKeys(r *request, req *reqClaimKeys) (any, error) {
	ctx := r.Context()
	out := &respClaimKeys{Failures: map[string]any{}, OneTimeKeys: map[string]map[string]map[string]json.RawMessage{}}
	s.mu.Lock()
	defer s.mu.Unlock()
	tx, err := s.st.db.BeginTx(ctx, nil)
	if err != nil {
		return nil, err
	}
	defer tx.Rollback()
	var touched []KeyCounts
	for _, u := range sortedKeys(req.OneTimeKeys) {
		for _, dev := range sortedKeys(req.OneTimeKeys[u]) {
			alg := req.OneTimeKeys[u][dev]
			var keyID string
			var js []byte
			ok, err := one(ctx, tx, `SELECT key_id, json FROM one_time_keys WHERE user_id = ? AND device_id = ? AND algorithm = ? ORDER BY key_id LIMIT 1`, []any{u, dev, alg}, &keyID, &js)
			if err != nil {
				return nil, err
			}
			if ok {
				if _, err := tx.ExecContext(ctx, `DELETE FROM one_time_keys WHERE user_id = ? AND device_id = ? AND key_id = ?`, u, dev, keyID); err != nil {
					return nil, err
				}
			} else {
				ok, err = one(ctx, tx, `SELECT key_id, json FROM fallback_keys WHERE user_id = ? AND device_id = ? AND algorithm = ?`, []any{u, dev, alg}, &keyID, &js)
				if err != nil {
					return nil, err
				}
				if !ok {
					continue
				}
				if _, err := tx.ExecContext(ctx, `UPDATE fallback_keys SET used = 1 WHERE user_id = ? AND device_id = ? AND algorithm = ?`, u, dev, alg); err != nil {
					return nil, err
				}
			}
			if out.OneTimeKeys[u] == nil {
				out.OneTimeKeys[u] = map[string]map[string]json.RawMessage{}
			}
			out.OneTimeKeys[u][dev] = map[string]json.RawMessage{keyID: js}
			kc, err := keyCounts(ctx, tx, u, dev)
			if err != nil {
				return nil, err
			}
			touched = append(touched, kc)
		}
	}
	if err := tx.Commit(); err != nil {
		return nil, err
	}
	for _, kc := range touched {
		s.notifyCounts(ctx, kc)
	}
	return out, nil
}

type respKeyChanges struct {
	Changed []string `json:"changed"`
	Left    []string `json:"left"`
}

// keyChanges answers the users whose device lists changed between two
// /sync tokens, as /sync's device_lists would have.
func (s *Server) keyChanges(r *request) (any, error) {
	fromTok, toTok := r.query("from"), r.query("to")
	if fromTok == "" || toTok == "" {
		return nil, errMissingParam.With("from and to are required")
	}
	from, ok1 := parseSince(fromTok)
	to, ok2 := parseSince(toTok)
	if !ok1 || !ok2 {
		return nil, errInvalidParam.With("from and to must be /sync tokens")
	}
	dl, err := s.deviceListsBetween(r.Context(), r.c.userID, from, to)
	if err != nil {
		return nil, err
	}
	return &respKeyChanges{Changed: dl.Changed, Left: dl.Left}, nil
}

type deviceLists struct {
	Changed []string `json:"changed"`
	Left    []string `json:"left"`
}

// deviceListsBetween is what the caller's device tracking must learn
// between two positions: users sharing a room with them whose devices
// changed, users they newly share a room with (changed), and users they no
// longer share any room with (left).
func (s *Server) deviceListsBetween(ctx context.Context, userID string, from, to syncPos) (deviceLists, error) {
	db := s.st.db
	changed := map[string]bool{}
	left := map[string]bool{}
	shares := func(other string) (bool, error) {
		var x int
		return one(ctx, db, `SELECT 1 FROM memberships a JOIN memberships b ON a.room_id = b.room_id
			WHERE a.user_id = ? AND a.membership = 'join' AND b.user_id = ? AND b.membership = 'join' LIMIT 1`, []any{userID, other}, &x)
	}
	users, err := list(ctx, db, `SELECT DISTINCT user_id FROM device_lists WHERE pos > ? AND pos <= ?`, from.deviceLists, to.deviceLists)
	if err != nil {
		return deviceLists{}, err
	}
	for _, u := range users {
		ok := u == userID
		if !ok {
			if ok, err = shares(u); err != nil {
				return deviceLists{}, err
			}
		}
		if ok {
			changed[u] = true
		}
	}
	// Membership changes in the caller's rooms.
	type change struct{ room, user, membership string }
	rows, err := db.QueryContext(ctx, `SELECT room_id, state_key, COALESCE(json_extract(json, '$.content.membership'), '') FROM events
		WHERE type = 'm.room.member' AND seq > ? AND seq <= ? AND room_id IN (SELECT room_id FROM memberships WHERE user_id = ?) ORDER BY seq`,
		from.events, to.events, userID)
	if err != nil {
		return deviceLists{}, err
	}
	var changes []change
	for rows.Next() {
		var c change
		if err := rows.Scan(&c.room, &c.user, &c.membership); err != nil {
			rows.Close()
			return deviceLists{}, err
		}
		changes = append(changes, c)
	}
	rows.Close()
	if err := rows.Err(); err != nil {
		return deviceLists{}, err
	}
	for _, c := range changes {
		// Only joins start sharing a room and only leaves and bans end
		// it; an invite, a knock or a profile change does neither.
		joined := c.membership == "join"
		if !joined && c.membership != "leave" && c.membership != "ban" {
			continue
		}
		affected := []string{c.user}
		if c.user == userID {
			// The caller joined or left: everyone in the room is affected.
			if affected, err = list(ctx, db, `SELECT user_id FROM memberships WHERE room_id = ? AND membership = 'join' AND user_id != ?`, c.room, userID); err != nil {
				return deviceLists{}, err
			}
		}
		for _, u := range affected {
			if u == userID {
				continue
			}
			ok, err := shares(u)
			if err != nil {
				return deviceLists{}, err
			}
			switch {
			case ok && joined:
				changed[u] = true
			case !ok && !joined:
				left[u] = true
			}
		}
	}
	for u := range left {
		delete(changed, u)
	}
	return deviceLists{Changed: setList(changed), Left: setList(left)}, nil
}

type reqCrossSigning struct {
	MasterKey      json.RawMessage `json:"master_key"`
	SelfSigningKey json.RawMessage `json:"self_signing_key"`
	UserSigningKey json.RawMessage `json:"user_signing_key"`
	Auth           *uiaAuth        `json:"auth"`
}

type crossSigningHead struct {
	UserID string            `json:"user_id"`
	Usage  []string          `json:"usage"`
	Keys   map[string]string `json:"keys"`
}

// uploadCrossSigning stores the caller's cross-signing keys. As the spec
// asks (v1.11, MSC3967), no user-interactive auth is needed while the user
// has no master key or when the request repeats the stored master key and
// adds nothing new; an AS acting with its as_token never needs it
// (MSC4190). Otherwise the password stage is required.
// Signatures inside the keys are stored, not verified.
func (s *Server) uploadCrossSigning(r *request, req *reqCrossSigning) (any, error) {
	ctx := r.Context()
	keys := map[string][]byte{}
	for _, k := range []struct {
		usage string
		raw   json.RawMessage
	}{{"master", req.MasterKey}, {"self_signing", req.SelfSigningKey}, {"user_signing", req.UserSigningKey}} {
		if len(k.raw) == 0 || string(k.raw) == "null" {
			continue
		}
		var head crossSigningHead
		if err := json.Unmarshal(k.raw, &head); err != nil {
			return nil, errBadJSON.With("%s_key must be an object", k.usage)
		}
		if head.UserID != r.c.userID {
			return nil, errInvalidParam.With("%s_key is for %s, not the caller", k.usage, head.UserID)
		}
		if !contains(head.Usage, k.usage) {
			return nil, errInvalidParam.With("%s_key must list usage %q", k.usage, k.usage)
		}
		if len(head.Keys) != 1 {
			return nil, errInvalidParam.With("%s_key must have exactly one key", k.usage)
		}
		js, err := compactJSON(k.raw)
		if err != nil {
			return nil, err
		}
		keys[k.usage] = js
	}
	if len(keys) == 0 {
		return nil, errMissingParam.With("no cross-signing key given")
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	var master []byte
	hasMaster, err := s.st.one(ctx, &master, `SELECT json FROM cross_signing_keys WHERE user_id = ? AND usage = 'master'`, r.c.userID)
	if err != nil {
		return nil, err
	}
	if _, ok := keys["master"]; !ok && !hasMaster {
		return nil, errMissingParam.With("upload a master key first")
	}
	if r.c.as == nil && hasMaster {
		// The spec's exception: the request carries the stored master key
		// and nothing new.
		_, same := keys["master"]
		for usage, js := range keys {
			var old []byte
			if _, err := s.st.one(ctx, &old, `SELECT json FROM cross_signing_keys WHERE user_id = ? AND usage = ?`, r.c.userID, usage); err != nil {
				return nil, err
			}
			same = same && bytes.Equal(old, js)
		}
		if !same {
			if err := s.checkUIA(ctx, r.c.userID, req.Auth); err != nil {
				return nil, err
			}
		}
	}
	err = s.deviceListTx(ctx, func(tx *sql.Tx) ([]string, error) {
		for usage, js := range keys {
			if _, err := tx.ExecContext(ctx, `INSERT OR REPLACE INTO cross_signing_keys (user_id, usage, json) VALUES (?, ?, ?)`, r.c.userID, usage, js); err != nil {
				return nil, err
			}
		}
		return []string{r.c.userID}, nil
	})
	if err != nil {
		return nil, err
	}
	return empty, nil
}

// uploadSignatures stores signatures on device keys and cross-signing
// keys: {user: {keyID: signed object}}, keyID a device ID or a
// cross-signing public key. Signatures by the caller only; an unknown key
// is a failure for that key, not for the request.
func (s *Server) uploadSignatures(r *request, req *map[string]map[string]json.RawMessage) (any, error) {
	ctx := r.Context()
	failures := map[string]map[string]any{}
	fail := func(u, k, code, msg string) {
		if failures[u] == nil {
			failures[u] = map[string]any{}
		}
		failures[u][k] = map[string]string{"errcode": code, "error": msg}
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	err := s.deviceListTx(ctx, func(tx *sql.Tx) ([]string, error) {
		targets := map[string]bool{}
		for _, u := range sortedKeys(*req) {
			for _, keyID := range sortedKeys((*req)[u]) {
				var obj struct {
					Signatures map[string]map[string]string `json:"signatures"`
				}
				if err := json.Unmarshal((*req)[u][keyID], &obj); err != nil {
					fail(u, keyID, "M_BAD_JSON", "not a signed object")
					continue
				}
				known, err := keyExists(ctx, tx, u, keyID)
				if err != nil {
					return nil, err
				}
				if !known {
					fail(u, keyID, "M_NOT_FOUND", "no such key")
					continue
				}
				sigs := obj.Signatures[r.c.userID]
				if len(sigs) == 0 {
					fail(u, keyID, "M_INVALID_SIGNATURE", "no signature by the caller")
					continue
				}
				for signerKey, sig := range sigs {
					if _, err := tx.ExecContext(ctx, `INSERT OR REPLACE INTO key_signatures (target_user, target_key, signer_user, signer_key, signature) VALUES (?, ?, ?, ?, ?)`,
						u, keyID, r.c.userID, signerKey, sig); err != nil {
						return nil, err
					}
				}
				targets[u] = true
			}
		}
		return setList(targets), nil
	})
	if err != nil {
		return nil, err
	}
	return map[string]any{"failures": failures}, nil
}

// keyExists: keyID is a device of userID with keys, or the public key of
// one of userID's cross-signing keys.
func keyExists(ctx context.Context, q querier, userID, keyID string) (bool, error) {
	var x int
	ok, err := one(ctx, q, `SELECT 1 FROM device_keys WHERE user_id = ? AND device_id = ?`, []any{userID, keyID}, &x)
	if ok || err != nil {
		return ok, err
	}
	rows, err := q.QueryContext(ctx, `SELECT json FROM cross_signing_keys WHERE user_id = ?`, userID)
	if err != nil {
		return false, err
	}
	defer rows.Close()
	for rows.Next() {
		var raw []byte
		if err := rows.Scan(&raw); err != nil {
			return false, err
		}
		var obj map[string]any
		if json.Unmarshal(raw, &obj) == nil && publicKeyOf(obj) == keyID {
			return true, nil
		}
	}
	return false, rows.Err()
}

func sortedKeys[V any](m map[string]V) []string {
	out := make([]string, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	sort.Strings(out)
	return out
}

func setList(m map[string]bool) []string {
	out := make([]string, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	sort.Strings(out)
	return out
}

func contains(list []string, v string) bool {
	for _, x := range list {
		if x == v {
			return true
		}
	}
	return false
}
