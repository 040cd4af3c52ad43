package asapi

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"net/url"
)

// SocketURL is the URL of a Target that is reached only over its websocket
// (an AS registered with `url: null` on a homeserver that accepts
// appservice websockets). A request to it fails with ErrNotConnected while
// no socket is open, which the sender treats as an AS that is down: its
// backlog waits, durably, for the next connection.
const SocketURL = "websocket:"

// ErrNotConnected: the AS is reached only over a websocket and none is open.
// It wraps ErrConnection.
var ErrNotConnected = fmt.Errorf("%w: no websocket connected", ErrConnection)

// Socket is an open websocket of one AS that carries its requests instead
// of HTTP (package asws implements it). Errors follow Client's: ErrTimeout
// for no answer in time, ErrConnection for a socket that closed; they never
// contain a token.
type Socket interface {
	// Transaction sends one transaction and returns nil once the AS has
	// acknowledged it.
	Transaction(ctx context.Context, txnID string, body []byte) error
	// Request proxies one HTTP request to the AS's own router and returns
	// its status, headers and body, whatever the status.
	Request(ctx context.Context, method, path string, query url.Values, header http.Header, body []byte) (int, http.Header, []byte, error)
}

// Sockets finds the open websocket of an AS.
type Sockets interface {
	// Socket returns the AS's open socket, or nil if none is open.
	Socket(asID string) Socket
}

// socket returns the open socket of t's AS, if Client has Sockets.
func (c *Client) socket(t Target) Socket {
	if c.opts.Sockets == nil {
		return nil
	}
	return c.opts.Sockets.Socket(t.ID)
}

// Connected reports whether the AS asID has a websocket open: its requests
// then go over it, whatever its URL.
func (c *Client) Connected(asID string) bool {
	return c.opts.Sockets != nil && c.opts.Sockets.Socket(asID) != nil
}

// HasSockets reports whether the client was given Sockets.
func (c *Client) HasSockets() bool { return c.opts.Sockets != nil }

// onceSocket is once over a websocket: the same answer classification and
// redaction as over HTTP.
func (c *Client) onceSocket(ctx context.Context, s Socket, t Target, method, path string, query url.Values, body []byte) (int, []byte, error) {
	h := http.Header{"Authorization": {"Bearer " + t.HSToken.Reveal()}}
	if body != nil {
		h.Set("Content-Type", "application/json")
	}
	status, rh, data, err := s.Request(ctx, method, path, query, h, body)
	if err != nil {
		return 0, nil, socketError(ctx, t, err)
	}
	if status/100 == 2 {
		return status, data, nil
	}
	if n := maxErrorBody + t.longestSecret(); len(data) > n {
		data = data[:n]
	}
	return status, data, statusError(t, status, rh, data)
}

// socketError classifies a socket failure like an HTTP one.
func socketError(ctx context.Context, t Target, err error) error {
	err = redact(err, t)
	switch {
	case errors.Is(err, ErrTimeout), errors.Is(err, ErrConnection):
		return fmt.Errorf("appservice %s: %w", t.ID, err)
	case errors.Is(err, context.DeadlineExceeded):
		return fmt.Errorf("appservice %s: %w: %w", t.ID, ErrTimeout, err)
	case ctx.Err() != nil:
		return fmt.Errorf("appservice %s: %w", t.ID, ctx.Err())
	}
	return fmt.Errorf("appservice %s: %w: %w", t.ID, ErrConnection, err)
}
