package registry

import (
	"errors"
	"fmt"
	"net/http"
)

// Matrix error codes the registry answers with.
const (
	CodeExclusive    = "M_EXCLUSIVE"
	CodeForbidden    = "M_FORBIDDEN"
	CodeUnknownToken = "M_UNKNOWN_TOKEN"
)

// Sentinel errors, matched with errors.Is against an *Error of the same code.
var (
	ErrExclusive    = &Error{Code: CodeExclusive, Status: http.StatusBadRequest}
	ErrForbidden    = &Error{Code: CodeForbidden, Status: http.StatusForbidden}
	ErrUnknownToken = &Error{Code: CodeUnknownToken, Status: http.StatusUnauthorized}
)

// Error is an answer to a homeserver question that maps straight to a Matrix
// error response: HTTP Status and JSON {"errcode": Code, "error": Message}.
type Error struct {
	Code    string
	Status  int
	Message string
}

func (e *Error) Error() string {
	if e.Message == "" {
		return e.Code
	}
	return fmt.Sprintf("%s: %s", e.Code, e.Message)
}

// Is matches any *Error with the same Code, so errors.Is(err, ErrExclusive) works.
func (e *Error) Is(target error) bool {
	var t *Error
	return errors.As(target, &t) && t.Code == e.Code
}

func newError(base *Error, format string, args ...any) *Error {
	return &Error{Code: base.Code, Status: base.Status, Message: fmt.Sprintf(format, args...)}
}
