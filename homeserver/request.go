package homeserver

import (
	"bytes"
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"strconv"
	"strings"
	"unicode/utf8"
)

// access is who may call a route.
type access uint8

const (
	public access = iota // no token needed
	user                 // an access token or an as_token
)

// route is one endpoint of the table. pattern is a Go 1.22 ServeMux path
// pattern without the method.
type route struct {
	method  string
	pattern string
	access  access
	serve   func(*request) (any, error)
}

// request is what a handler gets: the HTTP request, who calls (nil on a
// public route) and the server.
type request struct {
	*http.Request
	c *caller
}

// rawAnswer is a handler result that writes itself (media downloads).
type rawAnswer interface {
	writeTo(w http.ResponseWriter)
}

// maxJSONBody bounds a request body decoded as JSON.
const maxJSONBody = 1 << 20

// typed adapts a handler taking a decoded JSON body. An empty body decodes
// as {}.
func typed[Req any](f func(*request, *Req) (any, error)) func(*request) (any, error) {
	return func(r *request) (any, error) {
		var req Req
		if err := decodeJSON(r.Request, &req); err != nil {
			return nil, err
		}
		return f(r, &req)
	}
}

// decodeJSON decodes the body into v. It rejects what encoding/json lets
// through silently: invalid UTF-8 (which it would turn into U+FFFD) and
// data after the JSON value. Syntax errors answer M_NOT_JSON, a value of the
// wrong shape M_BAD_JSON.
func decodeJSON(r *http.Request, v any) error {
	body, err := io.ReadAll(http.MaxBytesReader(nil, r.Body, maxJSONBody))
	if err != nil {
		var mbe *http.MaxBytesError
		if errors.As(err, &mbe) {
			return errTooLarge.With("request body is larger than %d bytes", maxJSONBody)
		}
		return errNotJSON.With("reading the request body failed")
	}
	if len(bytes.TrimSpace(body)) == 0 {
		body = []byte("{}")
	}
	if !utf8.Valid(body) {
		return errNotJSON.With("request body is not valid UTF-8")
	}
	if !json.Valid(body) {
		return errNotJSON.With("request body is not valid JSON")
	}
	if t := bytes.TrimSpace(body); t[0] != '{' {
		return errBadJSON.With("request body must be a JSON object")
	}
	dec := json.NewDecoder(bytes.NewReader(body))
	if err := dec.Decode(v); err != nil {
		var ute *json.UnmarshalTypeError
		if errors.As(err, &ute) {
			return errBadJSON.With("field %q has the wrong type (want %s)", ute.Field, ute.Type)
		}
		return errBadJSON.With("request body does not match the endpoint")
	}
	return nil
}

// query returns a query parameter.
func (r *request) query(name string) string { return r.URL.Query().Get(name) }

// intParam parses an optional non-negative integer query parameter.
func (r *request) intParam(name string, def int) (int, error) {
	v := r.query(name)
	if v == "" {
		return def, nil
	}
	n, err := strconv.Atoi(v)
	if err != nil || n < 0 {
		return 0, errInvalidParam.With("%s must be a non-negative integer", name)
	}
	return n, nil
}

// roomParam is the {room} path value, which must look like a room ID.
func (r *request) roomParam() (string, error) {
	id := r.PathValue("room")
	if !strings.HasPrefix(id, "!") {
		return "", errInvalidParam.With("%q is not a room ID", id)
	}
	return id, nil
}

// userParam is the {user} path value, which must look like a user ID.
func (r *request) userParam() (string, error) {
	id := r.PathValue("user")
	if !strings.HasPrefix(id, "@") || !strings.Contains(id, ":") {
		return "", errInvalidParam.With("%q is not a user ID", id)
	}
	return id, nil
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(v)
}
