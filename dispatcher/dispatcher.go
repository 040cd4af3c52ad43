package dispatcher

// PLACEHOLDER API: the implementation is being written.

import (
	"context"
	"errors"

	"go.uber.org/zap"

	"github.com/asdispatch/asdispatch/queue"
	"github.com/asdispatch/asdispatch/registry"
	"github.com/asdispatch/asdispatch/txnstore"
)

// Config configures a Dispatcher.
type Config struct {
	// Registry holds the current registration set.
	Registry *registry.Registry
	// DataDir holds the SQLite store (dispatcher.db); ignored when Store is set.
	DataDir string
	// OpenStore, if set, opens the store instead of SQLite in DataDir.
	OpenStore func(ctx context.Context, opts txnstore.Options) (txnstore.Store, error)
	// RoomState answers for rooms the dispatcher has not seen yet.
	RoomState RoomState
	Queue     queue.Options
	Logger    *zap.Logger
}

// Status is one AS's delivery state for operators.
type Status = txnstore.Status

// Dispatcher is safe for concurrent use.
type Dispatcher struct{}

var errTODO = errors.New("dispatcher: not implemented yet")

// New opens the store and starts a sender per AS.
func New(ctx context.Context, cfg Config) (*Dispatcher, error) { return nil, errTODO }

// Submit decides interest and returns once the events are durably queued for
// every interested AS.
func (d *Dispatcher) Submit(ctx context.Context, events ...Event) error { return errTODO }

// SubmitEphemeral queues ephemeral events for the ASes that asked for them.
func (d *Dispatcher) SubmitEphemeral(ctx context.Context, evs ...Ephemeral) error { return errTODO }

// SubmitToDevice queues to-device messages for the ASes that asked for them.
func (d *Dispatcher) SubmitToDevice(ctx context.Context, msgs ...ToDevice) error { return errTODO }

// InvalidateRoom forgets what the dispatcher knows about a room, for changes
// it does not see as events (aliases added in the room directory).
func (d *Dispatcher) InvalidateRoom(roomID string) {}

// Wake makes the AS's sender retry at once (after a successful ping).
func (d *Dispatcher) Wake(asID string) {}

// Statuses reports every AS's delivery state.
func (d *Dispatcher) Statuses(ctx context.Context) ([]Status, error) { return nil, errTODO }

// Close stops accepting events, drains in-flight sends and closes the store.
func (d *Dispatcher) Close(ctx context.Context) error { return errTODO }
