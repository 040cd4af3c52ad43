package asdendrite

import (
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"net/url"
	"strings"

	"go.uber.org/zap"

	"github.com/asdispatch/asdispatch/queries"
)

// PingPath is the client-server route of the appservice ping (Matrix 1.7,
// POST /_matrix/client/v1/appservice/{appserviceId}/ping) relative to
// Dendrite's client router, which is mounted at /_matrix/client. Dendrite
// v0.13.8 has no such route.
const PingPath = "/v1/appservice/{appserviceId}/ping"

// PingHandler answers the appservice ping: the AS, authenticated by its
// as_token, asks the homeserver to call its /_matrix/app/v1/ping. A
// successful ping also wakes the AS's sender, so an AS that comes back and
// pings gets its backlog at once instead of after the current backoff.
func (a *API) PingHandler() http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method != http.MethodPost {
			matrixError(w, http.StatusMethodNotAllowed, "M_UNRECOGNIZED", "use POST")
			return
		}
		id, ok := pingTarget(r.URL)
		if !ok {
			matrixError(w, http.StatusNotFound, "M_UNRECOGNIZED", "unrecognized request")
			return
		}
		token := bearer(r)
		if token == "" {
			matrixError(w, http.StatusUnauthorized, "M_MISSING_TOKEN", "missing access token")
			return
		}
		as, err := a.reg.Current().ByASToken(token)
		if err != nil {
			matrixError(w, http.StatusUnauthorized, "M_UNKNOWN_TOKEN", "unknown access token")
			return
		}
		if as.ID != id {
			matrixError(w, http.StatusForbidden, "M_FORBIDDEN", "an application service may only ping itself")
			return
		}
		var body struct {
			TransactionID string `json:"transaction_id"`
		}
		if b, _ := io.ReadAll(io.LimitReader(r.Body, 64<<10)); len(b) > 0 {
			if err := json.Unmarshal(b, &body); err != nil {
				matrixError(w, http.StatusBadRequest, "M_NOT_JSON", "body is not a JSON object")
				return
			}
		}
		d, err := a.q.Ping(r.Context(), id, body.TransactionID)
		var pe *queries.PingError
		switch {
		case err == nil:
			writeJSON(w, http.StatusOK, map[string]any{"duration_ms": d.Milliseconds()})
		case errors.As(err, &pe):
			a.log.Info("appservice ping failed", zap.String("appservice", id), zap.String("errcode", pe.Code))
			out := map[string]any{"errcode": pe.Code, "error": "ping failed: " + pe.Code}
			if pe.Code == "M_BAD_STATUS" {
				out["status"], out["body"] = pe.ASStatus, pe.ASBody
			}
			writeJSON(w, pe.Status, out)
		default:
			matrixError(w, http.StatusInternalServerError, "M_UNKNOWN", "ping failed")
		}
	})
}

// pingTarget takes the appservice id out of .../appservice/{id}/ping.
func pingTarget(u *url.URL) (string, bool) {
	rest, ok := strings.CutSuffix(u.EscapedPath(), "/ping")
	if !ok {
		return "", false
	}
	i := strings.LastIndex(rest, "/appservice/")
	if i < 0 {
		return "", false
	}
	id, err := url.PathUnescape(rest[i+len("/appservice/"):])
	if err != nil || id == "" || strings.Contains(id, "/") {
		return "", false
	}
	return id, true
}

// bearer is the access token of the request: the Authorization header, or
// the deprecated access_token query parameter.
func bearer(r *http.Request) string {
	if h, ok := strings.CutPrefix(r.Header.Get("Authorization"), "Bearer "); ok {
		return h
	}
	return r.URL.Query().Get("access_token")
}

func matrixError(w http.ResponseWriter, status int, code, msg string) {
	writeJSON(w, status, map[string]string{"errcode": code, "error": msg})
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(v)
}
