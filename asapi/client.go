package asapi

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"time"
	"unicode/utf8"

	"go.uber.org/zap"

	"github.com/asdispatch/asdispatch/secret"
)

// Target is the AS a request goes to.
type Target struct {
	// ID names the AS in errors and logs.
	ID string
	// URL is the AS's base URL; empty for `url: null`.
	URL     string
	HSToken secret.Token
	// ASToken is never sent; like HSToken it is redacted from the AS's
	// answers and from errors, should the AS echo it.
	ASToken secret.Token
	// Legacy also sends ?access_token= and falls back to the unprefixed
	// paths when the v1 path is not recognised.
	Legacy bool
}

// Options configure a Client. Zero values take the defaults.
type Options struct {
	// TxnTimeout bounds one transaction (default 90s: mautrix-go handles a
	// transaction synchronously, and a short timeout turns slowness into
	// duplicates).
	TxnTimeout time.Duration
	// QueryTimeout bounds user and alias queries (default 5s).
	QueryTimeout time.Duration
	// PingTimeout bounds a ping (default 10s).
	PingTimeout time.Duration
	// DialTimeout bounds connecting (default 5s).
	DialTimeout time.Duration
	Logger      *zap.Logger
	// Transport replaces the pooled default transport (tests).
	Transport http.RoundTripper
	// Sockets, if set, are the ASes' open websockets: an AS with one open
	// gets its transactions, queries, pings and third-party lookups over
	// it instead of HTTP, and one whose URL is SocketURL only over it.
	Sockets Sockets
}

// Sentinel errors, matched with errors.Is.
var (
	// ErrNoURL: the AS is registered with `url: null`.
	ErrNoURL = errors.New("appservice has no url")
	// ErrTokenMismatch: the AS answered 401 or 403, i.e. it does not accept
	// our hs_token (mautrix-go answers 401 where the spec says 403).
	ErrTokenMismatch = errors.New("appservice rejected the hs_token")
	// ErrTooLarge: the AS answered 413.
	ErrTooLarge = errors.New("appservice refused the request as too large")
	// ErrConnection: the AS could not be reached (refused, reset, DNS).
	ErrConnection = errors.New("appservice connection failed")
	// ErrTimeout: the AS did not answer in time.
	ErrTimeout = errors.New("appservice timed out")
)

// StatusError is a non-2xx answer of an AS.
type StatusError struct {
	AS     string
	Status int
	// Body is the start of the AS's answer.
	Body string
	// RetryAfter is how long the AS asked us to wait (429 with Retry-After
	// or M_LIMIT_EXCEEDED's retry_after_ms); zero if it did not say.
	RetryAfter time.Duration
}

// retryAfter reads a rate-limited answer's wait: the Retry-After header in
// seconds, else the Matrix error's retry_after_ms.
func retryAfter(h http.Header, body []byte) time.Duration {
	if s, err := strconv.Atoi(strings.TrimSpace(h.Get("Retry-After"))); err == nil && s > 0 {
		return time.Duration(s) * time.Second
	}
	var m struct {
		RetryAfterMS int64 `json:"retry_after_ms"`
	}
	if json.Unmarshal(body, &m) == nil && m.RetryAfterMS > 0 {
		return time.Duration(m.RetryAfterMS) * time.Millisecond
	}
	return 0
}

func (e *StatusError) Error() string {
	return fmt.Sprintf("appservice %s answered %d: %s", e.AS, e.Status, e.Body)
}

// Is makes errors.Is(err, ErrTokenMismatch) and ErrTooLarge work.
func (e *StatusError) Is(target error) bool {
	switch target {
	case ErrTokenMismatch:
		return e.Status == http.StatusUnauthorized || e.Status == http.StatusForbidden
	case ErrTooLarge:
		return e.Status == http.StatusRequestEntityTooLarge
	}
	return false
}

// Client talks to application services. Safe for concurrent use.
type Client struct {
	opts Options
	http *http.Client
}

// New returns a client with a pooled keep-alive transport.
func New(opts Options) *Client {
	if opts.TxnTimeout <= 0 {
		opts.TxnTimeout = 90 * time.Second
	}
	if opts.QueryTimeout <= 0 {
		opts.QueryTimeout = 5 * time.Second
	}
	if opts.PingTimeout <= 0 {
		opts.PingTimeout = 10 * time.Second
	}
	if opts.DialTimeout <= 0 {
		opts.DialTimeout = 5 * time.Second
	}
	if opts.Logger == nil {
		opts.Logger = zap.NewNop()
	}
	tr := opts.Transport
	if tr == nil {
		tr = &http.Transport{
			Proxy:               nil, // ASes are reached directly, never via a proxy
			DialContext:         (&net.Dialer{Timeout: opts.DialTimeout, KeepAlive: 30 * time.Second}).DialContext,
			MaxIdleConnsPerHost: 8,
			IdleConnTimeout:     90 * time.Second,
		}
	}
	return &Client{opts: opts, http: &http.Client{Transport: tr}}
}

// maxErrorBody bounds what is kept of an error answer.
const maxErrorBody = 512

// TxnTimeout is how long PutTransaction waits for the AS.
func (c *Client) TxnTimeout() time.Duration { return c.opts.TxnTimeout }

// CloseIdleConnections closes the keep-alive connections not in use, with
// their buffers; the next request dials again.
func (c *Client) CloseIdleConnections() { c.http.CloseIdleConnections() }

// PutTransaction sends one transaction: PUT /_matrix/app/v1/transactions/{txnID}
// with body exactly as given, or, while the AS has a websocket open, the
// same body as a transaction frame that the AS must acknowledge within
// TxnTimeout.
func (c *Client) PutTransaction(ctx context.Context, t Target, txnID string, body []byte) error {
	ctx, cancel := context.WithTimeout(ctx, c.opts.TxnTimeout)
	defer cancel()
	if s := c.socket(t); s != nil {
		if err := s.Transaction(ctx, txnID, body); err != nil {
			return socketError(ctx, t, err)
		}
		return nil
	}
	_, _, err := c.do(ctx, t, http.MethodPut, "/transactions/"+url.PathEscape(txnID), nil, body)
	return err
}

// do sends a request to the AS's v1 path (falling back to the legacy path
// in legacy mode) and returns the status and body of a 2xx answer, or an
// error for anything else.
func (c *Client) do(ctx context.Context, t Target, method, path string, query url.Values, body []byte) (int, []byte, error) {
	once := c.once
	if s := c.socket(t); s != nil {
		once = func(ctx context.Context, t Target, method, path string, query url.Values, body []byte) (int, []byte, error) {
			return c.onceSocket(ctx, s, t, method, path, query, body)
		}
	} else if t.URL == "" {
		return 0, nil, fmt.Errorf("appservice %s: %w", t.ID, ErrNoURL)
	} else if t.URL == SocketURL {
		return 0, nil, fmt.Errorf("appservice %s: %w", t.ID, ErrNotConnected)
	}
	status, resp, err := once(ctx, t, method, "/_matrix/app/v1"+path, query, body)
	if t.Legacy && err != nil && unrecognised(status, resp) {
		status, resp, err = once(ctx, t, method, path, query, body)
	}
	return status, resp, err
}

// unrecognised reports an answer meaning "no such endpoint" (the spec's
// rule for falling back to legacy paths): 405, or 404 with M_UNRECOGNIZED
// or without a Matrix error body.
func unrecognised(status int, body []byte) bool {
	if status == http.StatusMethodNotAllowed {
		return true
	}
	return status == http.StatusNotFound && (bytes.Contains(body, []byte("M_UNRECOGNIZED")) || !bytes.Contains(body, []byte("errcode")))
}

func (c *Client) once(ctx context.Context, t Target, method, path string, query url.Values, body []byte) (int, []byte, error) {
	// u never carries the token: it is the only URL errors may quote. The
	// legacy ?access_token= is added to the request alone, and every error
	// net/http returns quoting the request's URL is rebuilt with u.
	u := strings.TrimRight(t.URL, "/") + path
	if len(query) > 0 {
		u += "?" + query.Encode()
	}
	var rd io.Reader
	if body != nil {
		rd = bytes.NewReader(body)
	}
	req, err := http.NewRequestWithContext(ctx, method, u, rd)
	if err != nil {
		return 0, nil, fmt.Errorf("appservice %s: bad url: %w", t.ID, redact(err, t))
	}
	shown := u
	if t.Legacy {
		tok := "access_token=" + url.QueryEscape(t.HSToken.Reveal())
		shown = withQuery(u, "access_token="+secret.Redacted)
		if req.URL.RawQuery != "" {
			tok = req.URL.RawQuery + "&" + tok
		}
		req.URL.RawQuery = tok
	}
	req.Header.Set("Authorization", "Bearer "+t.HSToken.Reveal())
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	resp, err := c.http.Do(req)
	if err != nil {
		// Classify on the original error, then keep only its redacted form.
		timeout := errors.Is(err, context.DeadlineExceeded) || isTimeout(err)
		err = redactURL(err, shown, t)
		if timeout {
			return 0, nil, fmt.Errorf("appservice %s: %w: %w", t.ID, ErrTimeout, err)
		}
		if ctx.Err() != nil {
			return 0, nil, fmt.Errorf("appservice %s: %w", t.ID, ctx.Err())
		}
		return 0, nil, fmt.Errorf("appservice %s: %w: %w", t.ID, ErrConnection, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode/100 == 2 {
		data, err := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
		if err != nil {
			return resp.StatusCode, nil, fmt.Errorf("appservice %s: reading answer: %w", t.ID, redactURL(err, shown, t))
		}
		return resp.StatusCode, data, nil
	}
	// Read past the cut by the longest form of a token, so that a token
	// straddling it is scrubbed whole before the text is cut.
	data, _ := io.ReadAll(io.LimitReader(resp.Body, int64(maxErrorBody+t.longestSecret())))
	_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, 64<<10)) // reuse the connection
	return resp.StatusCode, data, statusError(t, resp.StatusCode, resp.Header, data)
}

// statusError is the error for a non-2xx answer, over HTTP or a websocket:
// its body scrubbed of the tokens, then cut to maxErrorBody. data must be
// cut to maxErrorBody+t.longestSecret() already.
func statusError(t Target, status int, h http.Header, data []byte) *StatusError {
	se := &StatusError{AS: t.ID, Status: status, Body: CleanText(t.scrub(string(data)), maxErrorBody)}
	if status == http.StatusTooManyRequests {
		se.RetryAfter = retryAfter(h, data)
	}
	return se
}

// withQuery appends a raw query parameter to u.
func withQuery(u, param string) string {
	if strings.Contains(u, "?") {
		return u + "&" + param
	}
	return u + "?" + param
}

// CleanText makes an AS's error text safe to log and store: valid UTF-8,
// no NUL, at most max bytes, cut on a character boundary.
func CleanText(s string, max int) string {
	s = strings.ToValidUTF8(s, "")
	s = strings.ReplaceAll(s, "\x00", "")
	if len(s) <= max {
		return s
	}
	cut := max
	for cut > 0 && !utf8.RuneStart(s[cut]) {
		cut--
	}
	return s[:cut]
}

func isTimeout(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}

// redactedError is an error whose text quoted a token: it keeps only the
// scrubbed text, and does not unwrap, so the original cannot be printed
// through errors.As either.
type redactedError struct{ msg string }

func (e *redactedError) Error() string { return e.msg }

// redact returns err, or an opaque copy with the tokens scrubbed if its text
// quotes one in any form.
func redact(err error, t Target) error {
	msg := err.Error()
	if s := t.scrub(msg); s != msg {
		return &redactedError{msg: s}
	}
	return err
}

// redactURL rebuilds a *url.Error (net/http's, which quotes the request URL,
// legacy token included) with the URL shown instead, and redacts the rest.
func redactURL(err error, shown string, t Target) error {
	var ue *url.Error
	if errors.As(err, &ue) {
		return &url.Error{Op: ue.Op, URL: shown, Err: redact(ue.Err, t)}
	}
	return redact(err, t)
}

// forms are the ways a token may appear in text: raw, percent-encoded for a
// query or a path (with upper or lower case hex, as an AS may echo it), and
// as Go's %q quotes it.
func forms(tok string) []string {
	q := strconv.Quote(tok)
	qe, pe := url.QueryEscape(tok), url.PathEscape(tok)
	return []string{tok, qe, pe, lowerHex(qe), lowerHex(pe), q[1 : len(q)-1]}
}

// lowerHex lower-cases the two hex digits after each % of an escaped string.
func lowerHex(s string) string {
	b := []byte(s)
	for i := 0; i+2 < len(b); i++ {
		if b[i] == '%' {
			b[i+1], b[i+2] = lowerASCII(b[i+1]), lowerASCII(b[i+2])
			i += 2
		}
	}
	return string(b)
}

func lowerASCII(c byte) byte {
	if 'A' <= c && c <= 'Z' {
		return c + 'a' - 'A'
	}
	return c
}

func (t Target) longestSecret() int {
	n := 0
	for _, tok := range []secret.Token{t.HSToken, t.ASToken} {
		for _, f := range forms(tok.Reveal()) {
			n = max(n, len(f))
		}
	}
	return n
}

// scrub replaces the AS's tokens in s, in each form they may take.
func (t Target) scrub(s string) string {
	for _, tok := range []secret.Token{t.HSToken, t.ASToken} {
		if tok.IsZero() {
			continue
		}
		for _, f := range forms(tok.Reveal()) {
			s = strings.ReplaceAll(s, f, secret.Redacted)
		}
	}
	return s
}
