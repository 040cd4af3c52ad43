package homeserver

import (
	"net/url"
)

func (s *Server) thirdPartyRoutes() []route {
	return []route{
		{"GET", v3 + "/thirdparty/protocols", user, s.tpProtocols},
		{"GET", v3 + "/thirdparty/protocol/{protocol}", user, s.tpProtocol},
		{"GET", v3 + "/thirdparty/location/{protocol}", user, s.tpLookup("location_fields")},
		{"GET", v3 + "/thirdparty/user/{protocol}", user, s.tpLookup("user_fields")},
		{"GET", v3 + "/thirdparty/location", user, s.tpLocationByAlias},
		{"GET", v3 + "/thirdparty/user", user, s.tpUserByID},
	}
}

func (s *Server) tpProtocols(r *request) (any, error) {
	return s.queries.Protocols(r.Context()), nil
}

func (s *Server) tpProtocol(r *request) (any, error) {
	meta, ok := s.queries.Protocol(r.Context(), r.PathValue("protocol"))
	if !ok {
		return nil, errNotFound.With("unknown protocol")
	}
	return meta, nil
}

// tpLookup asks the ASes of a protocol for users or locations matching the
// query. Only the protocol's declared fields are forwarded: never the
// client's access_token or any other parameter.
func (s *Server) tpLookup(fieldsKey string) func(*request) (any, error) {
	return func(r *request) (any, error) {
		protocol := r.PathValue("protocol")
		meta, ok := s.queries.Protocol(r.Context(), protocol)
		if !ok {
			return nil, errNotFound.With("unknown protocol")
		}
		fields := url.Values{}
		q := r.URL.Query()
		names, _ := meta[fieldsKey].([]any)
		for _, n := range names {
			if name, ok := n.(string); ok && q.Has(name) {
				fields[name] = q[name]
			}
		}
		if fieldsKey == "user_fields" {
			return s.queries.Users(r.Context(), protocol, fields), nil
		}
		return s.queries.Locations(r.Context(), protocol, fields), nil
	}
}

func (s *Server) tpLocationByAlias(r *request) (any, error) {
	alias := r.query("alias")
	if alias == "" {
		return nil, errMissingParam.With("alias is required")
	}
	return s.queries.LocationsByAlias(r.Context(), alias), nil
}

func (s *Server) tpUserByID(r *request) (any, error) {
	userID := r.query("userid")
	if userID == "" {
		return nil, errMissingParam.With("userid is required")
	}
	return s.queries.UsersByID(r.Context(), userID), nil
}
