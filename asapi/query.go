package asapi

import (
	"context"
	"encoding/json"
	"errors"
	"net/http"
	"net/url"
	"time"
)

// QueryUser asks the AS whether userID exists (GET /users/{userId}): true on
// 200 (the AS may just have created it), false on 404, else an error.
func (c *Client) QueryUser(ctx context.Context, t Target, userID string) (bool, error) {
	return c.exists(ctx, t, "/users/"+url.PathEscape(userID))
}

// QueryAlias asks the AS whether alias exists (GET /rooms/{roomAlias}).
func (c *Client) QueryAlias(ctx context.Context, t Target, alias string) (bool, error) {
	return c.exists(ctx, t, "/rooms/"+url.PathEscape(alias))
}

func (c *Client) exists(ctx context.Context, t Target, path string) (bool, error) {
	ctx, cancel := context.WithTimeout(ctx, c.opts.QueryTimeout)
	defer cancel()
	_, _, err := c.do(ctx, t, http.MethodGet, path, nil, nil)
	var se *StatusError
	if errors.As(err, &se) && se.Status == http.StatusNotFound {
		return false, nil
	}
	return err == nil, err
}

// Ping sends POST /ping {"transaction_id"} and returns how long the AS took.
func (c *Client) Ping(ctx context.Context, t Target, txnID string) (time.Duration, error) {
	ctx, cancel := context.WithTimeout(ctx, c.opts.PingTimeout)
	defer cancel()
	body, _ := json.Marshal(map[string]string{"transaction_id": txnID})
	start := time.Now()
	_, _, err := c.do(ctx, t, http.MethodPost, "/ping", nil, body)
	return time.Since(start), err
}

// ThirdParty sends GET /thirdparty/{path} with query and returns the AS's
// JSON answer as is.
func (c *Client) ThirdParty(ctx context.Context, t Target, path string, query url.Values) (json.RawMessage, error) {
	ctx, cancel := context.WithTimeout(ctx, c.opts.QueryTimeout)
	defer cancel()
	_, data, err := c.do(ctx, t, http.MethodGet, "/thirdparty/"+path, query, nil)
	if err != nil {
		return nil, err
	}
	if !json.Valid(data) {
		return nil, &StatusError{AS: t.ID, Status: http.StatusOK, Body: "answer is not JSON"}
	}
	return data, nil
}
