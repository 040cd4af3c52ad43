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

type cachedProtocol struct {
	value   map[string]any
	expires time.Time
}

// withProtocol returns the ASes that list protocol ("" for every AS that
// lists any), that have a URL.
func withProtocol(set *registry.Set, protocol string) []*registry.AppService {
	var out []*registry.AppService
	for _, as := range set.All() {
		if as.HasURL && len(as.Protocols) > 0 && (protocol == "" || slices.Contains(as.Protocols, protocol)) {
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
// "<as_id>|<network_id>" so the homeserver knows whom to ask. Cached.
func (s *Service) Protocol(ctx context.Context, protocol string) (map[string]any, bool) {
	s.mu.Lock()
	if c, ok := s.protos[protocol]; ok && time.Now().Before(c.expires) {
		s.mu.Unlock()
		return c.value, true
	}
	s.mu.Unlock()
	ases := withProtocol(s.cfg.Registry.Current(), protocol)
	var merged map[string]any
	var instances []any
	for i, raw := range s.fanOut(ctx, ases, "protocol/"+url.PathEscape(protocol), nil) {
		var meta map[string]any
		if raw == nil || json.Unmarshal(raw, &meta) != nil || meta == nil {
			continue
		}
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
		return nil, false
	}
	if instances == nil {
		instances = []any{}
	}
	merged["instances"] = instances
	s.mu.Lock()
	s.protos[protocol] = cachedProtocol{value: merged, expires: time.Now().Add(s.cfg.ProtocolTTL)}
	s.mu.Unlock()
	return merged, true
}

// Protocols returns the metadata of every protocol some AS lists.
func (s *Service) Protocols(ctx context.Context) map[string]map[string]any {
	out := map[string]map[string]any{}
	for _, as := range withProtocol(s.cfg.Registry.Current(), "") {
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

// Users looks up third-party users of protocol matching fields.
func (s *Service) Users(ctx context.Context, protocol string, fields url.Values) []json.RawMessage {
	return s.rows(ctx, withProtocol(s.cfg.Registry.Current(), protocol), "user/"+url.PathEscape(protocol), fields, "userid")
}

// Locations looks up third-party locations of protocol matching fields.
func (s *Service) Locations(ctx context.Context, protocol string, fields url.Values) []json.RawMessage {
	return s.rows(ctx, withProtocol(s.cfg.Registry.Current(), protocol), "location/"+url.PathEscape(protocol), fields, "alias")
}

// UsersByID looks up the third-party users behind a Matrix user ID.
func (s *Service) UsersByID(ctx context.Context, userID string) []json.RawMessage {
	return s.rows(ctx, withProtocol(s.cfg.Registry.Current(), ""), "user", url.Values{"userid": {userID}}, "userid")
}

// LocationsByAlias looks up the third-party locations behind a room alias.
func (s *Service) LocationsByAlias(ctx context.Context, alias string) []json.RawMessage {
	return s.rows(ctx, withProtocol(s.cfg.Registry.Current(), ""), "location", url.Values{"alias": {alias}}, "alias")
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
