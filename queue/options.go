// Package queue runs one sender per application service: it batches the
// AS's pending items into transactions, strictly oldest first with one
// transaction in flight, freezes each transaction in the txnstore before it
// is first sent, and retries the same id and body with backoff until the AS
// accepts it.
package queue

import (
	"time"

	"go.uber.org/zap"

	"github.com/asdispatch/asdispatch/asapi"
	"github.com/asdispatch/asdispatch/metrics"
)

// Options configure the senders. Zero values take the defaults.
type Options struct {
	// RetryInitial and RetryMax bound the exponential backoff (with jitter)
	// between attempts while an AS is down. Defaults 2s and 512s.
	RetryInitial time.Duration
	RetryMax     time.Duration
	// MaxEvents, MaxEphemeral and MaxToDevice cap the items of each kind in
	// one transaction (default 100 each); MaxEphemeral also caps the device
	// list items and, apart, the key counts items (MSC3202), counted before
	// they are coalesced. MaxBytes caps the body size (default 4 MiB).
	MaxEvents    int
	MaxEphemeral int
	MaxToDevice  int
	MaxBytes     int
	// CatchupMaxEvents, when above MaxEvents, lets the transactions of an
	// AS with a backlog grow to that many events, MaxBytes still capping
	// them. An AS has a backlog when, as its next transaction is cut, more
	// items wait for it than one transaction of the other caps holds. A
	// 413 still splits a transaction. Zero (default): off, MaxEvents
	// always, for receivers with small request body limits.
	CatchupMaxEvents int
	// Client sends the transactions; nil builds one with default options.
	// Close closes its idle connections.
	Client *asapi.Client
	Logger *zap.Logger
	// Metrics, if set, records deliveries, failures and AS state.
	Metrics *metrics.Metrics

	// On a store shared by several processes (txnstore.Leaser.Shared), a
	// process sends for an AS only while it holds the AS's lease.
	// LeaseTTL is how long a lease outlives its owner's last renewal
	// (default 10s): a dead owner is replaced after about that long.
	LeaseTTL time.Duration
	// Owner names this process in leases (default host/pid/random).
	Owner string
	// PollInterval is how often the owner of an AS with nothing to send
	// looks for items other processes committed (default 200ms).
	PollInterval time.Duration
}
