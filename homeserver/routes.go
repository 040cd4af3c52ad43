package homeserver

import (
	"net/http"
	"sort"
	"strings"
)

const (
	v3      = "/_matrix/client/v3"
	v1      = "/_matrix/client/v1"
	mediaV3 = "/_matrix/media/v3"
)

// routeTable is every endpoint the stub serves, by spec section. Paths
// under /_matrix/client/v3 are served under /_matrix/client/r0 too, for
// older clients.
func (s *Server) routeTable() []route {
	var t []route
	for _, section := range [][]route{
		s.accountRoutes(), s.profileRoutes(), s.roomRoutes(), s.roomReadRoutes(), s.directoryRoutes(),
		s.ephemeralRoutes(), s.syncRoutes(), s.keyRoutes(), s.appserviceRoutes(), s.thirdPartyRoutes(), s.mediaRoutes(), s.miscRoutes(),
	} {
		t = append(t, section...)
	}
	for _, r := range t {
		if rest, ok := strings.CutPrefix(r.pattern, v3+"/"); ok {
			r.pattern = "/_matrix/client/r0/" + rest
			t = append(t, r)
		}
	}
	return t
}

func (s *Server) routes() {
	m := http.NewServeMux()
	s.table = s.routeTable()
	methods := map[string][]string{}
	for _, rt := range s.table {
		m.HandleFunc(rt.method+" "+rt.pattern, s.handle(rt))
		methods[rt.pattern] = append(methods[rt.pattern], rt.method)
	}
	// A known path with another method: 405 M_UNRECOGNIZED, with Allow.
	for pattern, ms := range methods {
		sort.Strings(ms)
		allow := strings.Join(ms, ", ")
		m.HandleFunc(pattern, func(w http.ResponseWriter, r *http.Request) {
			w.Header().Set("Allow", allow)
			writeError(w, r, s.log, errMethod.With("%s is not allowed here", r.Method))
		})
	}
	m.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		writeError(w, r, s.log, errUnrecognized.With("unrecognized request"))
	})
	s.mux = m
}

// handle runs one route: authentication for its access, the handler, and
// the answer (JSON, or what a raw answer writes).
func (s *Server) handle(rt route) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		rq := &request{Request: r}
		if rt.access == user {
			c, err := s.auth(r)
			if err != nil {
				writeError(w, r, s.log, err)
				return
			}
			rq.c = c
		}
		v, err := rt.serve(rq)
		if err != nil {
			writeError(w, r, s.log, err)
			return
		}
		if raw, ok := v.(rawAnswer); ok {
			raw.writeTo(w)
			return
		}
		writeJSON(w, http.StatusOK, v)
	}
}

// empty is the {} answer.
var empty = struct{}{}
