// Package dispatcher is the module's entry point for a homeserver: it decides
// which application services are interested in each event and queues the
// event durably for each of them.
//
// A room's aliases count for interest only as the room directory has them
// (RoomState.LocalAliases, read again after InvalidateRoom), as in Synapse
// and Dendrite; the content of m.room.canonical_alias and m.room.aliases
// events is ignored, so that interest never depends on what a cache happened
// to hold. The homeserver calls InvalidateRoom after each directory change.
package dispatcher

import "context"

// Event is a room event (PDU) as the homeserver hands it over: the few fields
// interest needs, plus the client-format JSON serialized once by the
// homeserver. The JSON goes into transaction bodies as is.
type Event struct {
	ID       string
	RoomID   string
	Type     string
	Sender   string
	StateKey *string
	// Membership is content.membership of an m.room.member event.
	Membership string
	// JSON is the event in client format.
	JSON []byte
	// At is the event's position in the homeserver's event stream (its
	// stream ordering): replayed events at or below the stream's position
	// are skipped. The zero Position hands the event over without one.
	At Position
}

// Ephemeral is an ephemeral event (EDU): m.typing, m.receipt or m.presence.
type Ephemeral struct {
	Type string
	// RoomID is the room of a typing notification or receipt.
	RoomID string
	// Users are the users the EDU is about: who is typing, whose receipt,
	// whose presence.
	Users []string
	// Private marks an m.read.private receipt: it goes only to ASes whose
	// users namespace covers one of Users.
	Private bool
	// Rooms, for presence, are the rooms the user is joined to: ASes
	// interested in any of them get the presence.
	Rooms []string
	// JSON is the EDU as it goes into the "ephemeral" array.
	JSON []byte
	// At is the EDU's position in its stream (receipts, typing,
	// presence), as Event.At.
	At Position
}

// ToDevice is a to-device message for one device of one user.
type ToDevice struct {
	Sender   string
	Type     string
	ToUser   string
	ToDevice string
	// JSON is the message as it goes into the "to_device" array, including
	// to_user_id and to_device_id.
	JSON []byte
	// At is the message's position in the to-device stream, as Event.At;
	// the messages of one send may share one.
	At Position
}

// RoomState is what the dispatcher asks the homeserver about a room it has
// not seen yet, or whose cached interest was evicted or invalidated. After
// that it follows the room's local membership from the m.room.member events
// it is given; aliases change only through InvalidateRoom, never through
// alias events.
type RoomState interface {
	// JoinedLocalMembers returns the joined members of the room that are
	// users of this homeserver.
	JoinedLocalMembers(ctx context.Context, roomID string) ([]string, error)
	// LocalAliases returns the room's aliases in this homeserver's room
	// directory: the only aliases that make an AS interested in the room.
	LocalAliases(ctx context.Context, roomID string) ([]string, error)
	// IsLocalUser reports whether userID belongs to this homeserver.
	IsLocalUser(userID string) bool
}
