package homeserver

import (
	"errors"
	"fmt"
	"net/http"
	"strconv"
	"time"

	"go.uber.org/zap"

	"github.com/asdispatch/asdispatch/queries"
	"github.com/asdispatch/asdispatch/registry"
)

// mxError is every error answer of the client-server API: the HTTP status
// and errcode travel together, so a call site cannot pair them wrongly.
type mxError struct {
	Status int
	Code   string
	Msg    string
	// Extra holds additional top-level keys of the answer (ping's status
	// and body).
	Extra map[string]any
	// RetryAfter, if set, is answered as retry_after_ms.
	RetryAfter time.Duration
}

func (e *mxError) Error() string {
	if e.Msg == "" {
		return e.Code
	}
	return e.Code + ": " + e.Msg
}

// Is matches any *mxError with the same errcode.
func (e *mxError) Is(target error) bool {
	var t *mxError
	return errors.As(target, &t) && t.Code == e.Code
}

// With returns a copy of e with a message.
func (e *mxError) With(format string, args ...any) *mxError {
	c := *e
	c.Msg = fmt.Sprintf(format, args...)
	return &c
}

// The errors the stub answers with; use With to add the message.
var (
	errBadJSON       = &mxError{Status: http.StatusBadRequest, Code: "M_BAD_JSON"}
	errNotJSON       = &mxError{Status: http.StatusBadRequest, Code: "M_NOT_JSON"}
	errMissingParam  = &mxError{Status: http.StatusBadRequest, Code: "M_MISSING_PARAM"}
	errInvalidParam  = &mxError{Status: http.StatusBadRequest, Code: "M_INVALID_PARAM"}
	errInvalidUser   = &mxError{Status: http.StatusBadRequest, Code: "M_INVALID_USERNAME"}
	errUserInUse     = &mxError{Status: http.StatusBadRequest, Code: "M_USER_IN_USE"}
	errRoomInUse     = &mxError{Status: http.StatusBadRequest, Code: "M_ROOM_IN_USE"}
	errExclusive     = &mxError{Status: http.StatusBadRequest, Code: "M_EXCLUSIVE"}
	errUnsupportedRV = &mxError{Status: http.StatusBadRequest, Code: "M_UNSUPPORTED_ROOM_VERSION"}
	errUnknown400    = &mxError{Status: http.StatusBadRequest, Code: "M_UNKNOWN"}
	errUnknownDevice = &mxError{Status: http.StatusBadRequest, Code: "M_UNKNOWN_DEVICE"}
	errMissingToken  = &mxError{Status: http.StatusUnauthorized, Code: "M_MISSING_TOKEN"}
	errUnknownToken  = &mxError{Status: http.StatusUnauthorized, Code: "M_UNKNOWN_TOKEN"}
	errForbidden     = &mxError{Status: http.StatusForbidden, Code: "M_FORBIDDEN"}
	errNotFound      = &mxError{Status: http.StatusNotFound, Code: "M_NOT_FOUND"}
	errUnrecognized  = &mxError{Status: http.StatusNotFound, Code: "M_UNRECOGNIZED"}
	errMethod        = &mxError{Status: http.StatusMethodNotAllowed, Code: "M_UNRECOGNIZED"}
	// errServerOwned answers a client write to account data the server
	// controls (m.fully_read, m.push_rules): the spec's 405 M_BAD_JSON.
	errServerOwned = &mxError{Status: http.StatusMethodNotAllowed, Code: "M_BAD_JSON"}
	errConflict    = &mxError{Status: http.StatusConflict, Code: "M_UNKNOWN"}
	errOverwrite   = &mxError{Status: http.StatusConflict, Code: "M_CANNOT_OVERWRITE_MEDIA"}
	errTooLarge    = &mxError{Status: http.StatusRequestEntityTooLarge, Code: "M_TOO_LARGE"}
	errNotYetUp    = &mxError{Status: http.StatusGatewayTimeout, Code: "M_NOT_YET_UPLOADED"}
	errInternal    = &mxError{Status: http.StatusInternalServerError, Code: "M_UNKNOWN", Msg: "internal server error"}
	// errUnavailable answers a write the log could not take (a full disk,
	// a database that is down): nothing of it happened, retry it.
	errUnavailable = &mxError{Status: http.StatusServiceUnavailable, Code: "M_UNKNOWN", Msg: "the server could not store this now; retry", RetryAfter: time.Second}
)

// asMatrixError converts the errors other packages answer with; ok is false
// for an unexpected error.
func asMatrixError(err error) (*mxError, bool) {
	var me *mxError
	var re *registry.Error
	var pe *queries.PingError
	switch {
	case errors.As(err, &me):
		return me, true
	case errors.As(err, &re):
		return &mxError{Status: re.Status, Code: re.Code, Msg: re.Message}, true
	case errors.As(err, &pe):
		out := &mxError{Status: pe.Status, Code: pe.Code, Msg: pe.Error()}
		if pe.Code == "M_BAD_STATUS" {
			out.Extra = map[string]any{"status": pe.ASStatus, "body": pe.ASBody}
		}
		return out, true
	}
	return nil, false
}

// writeError answers err. An unexpected error (a database failure, say) is
// logged with its detail and answered as a bare 500 M_UNKNOWN: its text may
// name database hosts and users, which a client must not see.
func writeError(w http.ResponseWriter, r *http.Request, log *zap.Logger, err error) {
	if r.Context().Err() != nil && errors.Is(err, r.Context().Err()) {
		// The client went away (a /sync cut short): nobody reads an answer,
		// and it is no server failure.
		return
	}
	me, ok := asMatrixError(err)
	if !ok {
		log.Error("request failed", zap.String("method", r.Method), zap.String("path", r.URL.Path), zap.Error(err))
		me = errInternal
	}
	body := make(map[string]any, 3+len(me.Extra))
	for k, v := range me.Extra {
		body[k] = v
	}
	// A user-interactive auth challenge before any attempt has no errcode.
	if me.Code != "" {
		body["errcode"], body["error"] = me.Code, me.Msg
		if me.Msg == "" {
			body["error"] = me.Code
		}
	}
	if me.RetryAfter > 0 {
		body["retry_after_ms"] = me.RetryAfter.Milliseconds()
		w.Header().Set("Retry-After", strconv.Itoa(int((me.RetryAfter+time.Second-1)/time.Second)))
	}
	writeJSON(w, me.Status, body)
}
