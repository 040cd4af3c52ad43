package queries

import (
	"context"
	"encoding/json"
	"net/url"
	"slices"
	"sync"
	"time"

	"go.uber.org/zap"

	"github.com/asdispatch/asdispatch/registry"
)

// cachedProtocol is a protocol's merged metadata, kept as JSON so that
// every caller decodes its own copy.
type cachedProtocol struct {
	json []byte
	// userFields and locationFields are the fields any AS declared for
	// lookups: the only query parameters forwarded to the ASes.
	userFields, locationFields []string
	expires                    time.Time
}

// withProtocol returns the ASes that list protocol ("" for every AS that
// lists any), that can be reached.
func (s *Service) withProtocol(set *registry.Set, protocol string) []*registry.AppService {
	var out []*registry.AppService
	for _, as := range set.All() {
		if s.reachable(as) && len(as.Protocols) > 0 && (protocol == "" || slices.Contains(as.Protocols, protocol)) {
			out = append(out, as)
		}
	}
	return out
}

// fanOut asks every AS in parallel and returns the answers that came, in
// AS order; failures are logged and left out.
func (s *Service) fanOut(ctx context.Context, ases []*registry.AppService, path string, q url.Values) []json.RawMessage {
	out := make([]json.RawMessage, len(ases))
	var wg sync.WaitGroup
	for i, as := range ases {
		wg.Add(1)
		go func() {
			defer wg.Done()
			data, err := s.client.ThirdParty(ctx, Target(as), path, q)
			if err != nil {
				s.logFailure(as.ID, "thirdparty", err)
				return
			}
			out[i] = data
		}()
	}
	wg.Wait()
	return out
}

// Protocol returns the merged metadata of protocol from every AS listing it:
// the first AS's fields, every AS's instances, each instance_id rewritten to
// "<as_id>|<network_id>" so the homeserver knows whom to ask. Cached; the
// map is the caller's own.
func (s *Service) Protocol(ctx context.Context, protocol string) (map[string]any, bool) {
	c, ok := s.protocol(ctx, protocol)
	if !ok {
		return nil, false
	}
	var meta map[string]any
	if err := json.Unmarshal(c.json, &meta); err != nil {
		s.log.Error("cached protocol metadata does not decode", zap.String("protocol", protocol), zap.Error(err))
		return nil, false
	}
	return meta, true
}

// protocol returns protocol's cached metadata, asking the ASes if it is
// missing or stale.
func (s *Service) protocol(ctx context.Context, protocol string) (cachedProtocol, bool) {
	s.mu.Lock()
	if c, ok := s.protos[protocol]; ok && time.Now().Before(c.expires) {
		s.mu.Unlock()
		return c, true
	}
	s.mu.Unlock()
	ases := s.withProtocol(s.cfg.Registry.Current(), protocol)
	var merged map[string]any
	var instances []any
	var c cachedProtocol
	for i, raw := range s.fanOut(ctx, ases, "protocol/"+url.PathEscape(protocol), nil) {
		var meta map[string]any
		if raw == nil || json.Unmarshal(raw, &meta) != nil || meta == nil {
			continue
		}
		c.userFields = addFields(c.userFields, meta["user_fields"])
		c.locationFields = addFields(c.locationFields, meta["location_fields"])
		list, _ := meta["instances"].([]any)
		for _, in := range list {
			inst, ok := in.(map[string]any)
			netID, _ := inst["network_id"].(string)
			if !ok || netID == "" {
				s.log.Debug("dropping a protocol instance without network_id", zap.String("appservice", ases[i].ID))
				continue
			}
			inst["instance_id"] = ases[i].ID + "|" + netID
			instances = append(instances, inst)
		}
		if merged == nil {
			merged = meta
		}
	}
	if merged == nil {
		return cachedProtocol{}, false
	}
	if instances == nil {
		instances = []any{}
	}
	merged["instances"] = instances
	js, err := json.Marshal(merged)
	if err != nil {
		s.log.Error("protocol metadata does not encode", zap.String("protocol", protocol), zap.Error(err))
		return cachedProtocol{}, false
	}
	c.json, c.expires = js, time.Now().Add(s.cfg.ProtocolTTL)
	s.mu.Lock()
	s.protos[protocol] = c
	s.mu.Unlock()
	return c, true
}

// addFields adds the strings of a metadata field list to fields, once each.
func addFields(fields []string, list any) []string {
	l, _ := list.([]any)
	for _, f := range l {
		if name, ok := f.(string); ok && name != "" && !slices.Contains(fields, name) {
			fields = append(fields, name)
		}
	}
	return fields
}

// neverForwarded are query parameters of the client's request that are
// never passed on to an AS, even if an AS declares them as fields.
var neverForwarded = []string{"access_token", "user_id"}

// onlyFields returns the parameters of q named in fields.
func onlyFields(q url.Values, fields []string) url.Values {
	out := url.Values{}
	for _, f := range fields {
		if v := q[f]; len(v) > 0 && !slices.Contains(neverForwarded, f) {
			out[f] = slices.Clone(v)
		}
	}
	return out
}

// Protocols returns the metadata of every protocol some AS lists.
func (s *Service) Protocols(ctx context.Context) map[string]map[string]any {
	out := map[string]map[string]any{}
	for _, as := range s.withProtocol(s.cfg.Registry.Current(), "") {
		for _, p := range as.Protocols {
			if _, done := out[p]; done {
				continue
			}
			if meta, ok := s.Protocol(ctx, p); ok {
				out[p] = meta
			}
		}
	}
	return out
}

// Users looks up third-party users of protocol matching fields. Only the
// user_fields the protocol's metadata declares are passed on (never the
// client's access_token or user_id); without metadata nobody is asked.
func (s *Service) Users(ctx context.Context, protocol string, fields url.Values) []json.RawMessage {
	c, ok := s.protocol(ctx, protocol)
	if !ok {
		return []json.RawMessage{}
	}
	return s.rows(ctx, s.withProtocol(s.cfg.Registry.Current(), protocol), "user/"+url.PathEscape(protocol), onlyFields(fields, c.userFields), "userid")
}

// Locations looks up third-party locations of protocol matching fields,
// passing on only the declared location_fields, like Users.
func (s *Service) Locations(ctx context.Context, protocol string, fields url.Values) []json.RawMessage {
	c, ok := s.protocol(ctx, protocol)
	if !ok {
		return []json.RawMessage{}
	}
	return s.rows(ctx, s.withProtocol(s.cfg.Registry.Current(), protocol), "location/"+url.PathEscape(protocol), onlyFields(fields, c.locationFields), "alias")
}

// UsersByID looks up the third-party users behind a Matrix user ID.
func (s *Service) UsersByID(ctx context.Context, userID string) []json.RawMessage {
	return s.rows(ctx, s.withProtocol(s.cfg.Registry.Current(), ""), "user", url.Values{"userid": {userID}}, "userid")
}

// LocationsByAlias looks up the third-party locations behind a room alias.
func (s *Service) LocationsByAlias(ctx context.Context, alias string) []json.RawMessage {
	return s.rows(ctx, s.withProtocol(s.cfg.Registry.Current(), ""), "location", url.Values{"alias": {alias}}, "alias")
}

// rows merges the answers of the ASes, keeping only well-formed rows: an
// object with a string key, a string protocol and an object of fields.
func (s *Service) rows(ctx context.Context, ases []*registry.AppService, path string, q url.Values, key string) []json.RawMessage {
	out := []json.RawMessage{}
	for i, raw := range s.fanOut(ctx, ases, path, q) {
		if raw == nil {
			continue
		}
		var rows []json.RawMessage
		if json.Unmarshal(raw, &rows) != nil {
			s.log.Warn("third-party answer is not a list", zap.String("appservice", ases[i].ID))
			continue
		}
		for _, r := range rows {
			var row map[string]any
			if json.Unmarshal(r, &row) != nil {
				continue
			}
			k, ok1 := row[key].(string)
			_, ok2 := row["protocol"].(string)
			_, ok3 := row["fields"].(map[string]any)
			if !ok1 || !ok2 || !ok3 || k == "" {
				continue
			}
			out = append(out, r)
		}
	}
	return out
}
