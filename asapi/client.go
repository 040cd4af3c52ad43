package asapi

// PLACEHOLDER until the real client lands.

import (
	"context"
	"time"

	"go.uber.org/zap"
	"net/http"

	"github.com/asdispatch/asdispatch/secret"
)

// Target is the AS a request goes to.
type Target struct {
	ID      string
	URL     string
	HSToken secret.Token
	Legacy  bool
}

// Options configure a Client.
type Options struct {
	TxnTimeout, QueryTimeout, PingTimeout, DialTimeout time.Duration
	Logger                                             *zap.Logger
	Transport                                          http.RoundTripper
}

// Client talks to application services.
type Client struct{ opts Options }

// New returns a client.
func New(opts Options) *Client { return &Client{opts: opts} }

// PutTransaction sends one transaction.
func (c *Client) PutTransaction(ctx context.Context, t Target, txnID string, body []byte) error {
	panic("asapi: PutTransaction not implemented yet")
}
