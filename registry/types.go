// Package registry loads and validates application service registration
// files and answers the homeserver's questions about them: which AS owns an
// as_token, may it act as a user, is a user ID or alias reserved.
//
// A loaded Set is immutable; reloading builds a new Set, and Registry swaps
// the current one atomically.
package registry

import (
	"github.com/asdispatch/asdispatch/namespace"
	"github.com/asdispatch/asdispatch/secret"
)

// Namespace is one entry of a registration's namespaces.
type Namespace struct {
	Regex     string
	Exclusive bool
	// Line is the line of the entry in its file, for messages.
	Line int
}

// Namespaces are a registration's user, alias and room namespaces.
type Namespaces struct {
	Users   []Namespace
	Aliases []Namespace
	Rooms   []Namespace
}

// Of returns the namespaces of kind k.
func (n *Namespaces) Of(k namespace.Kind) []Namespace {
	switch k {
	case namespace.Users:
		return n.Users
	case namespace.Aliases:
		return n.Aliases
	case namespace.Rooms:
		return n.Rooms
	}
	return nil
}

// Registration is one parsed registration file.
type Registration struct {
	// File is the path the registration was loaded from ("" if parsed from memory).
	File string
	ID   string
	// URL is the AS's base URL; HasURL is false for an explicit `url: null`
	// (no pushes, no queries).
	URL             string
	HasURL          bool
	ASToken         secret.Token
	HSToken         secret.Token
	SenderLocalpart string
	Namespaces      Namespaces
	// RateLimited defaults to true.
	RateLimited bool
	Protocols   []string
	// ReceiveEphemeral is set by receive_ephemeral or one of its unstable
	// spellings; EphemeralUnstable records that an unstable spelling was
	// used, so transactions carry the unstable body keys that AS reads.
	ReceiveEphemeral  bool
	EphemeralUnstable bool
	// MSC3202 is org.matrix.msc3202 (device lists, OTK counts for E2EE ASes).
	MSC3202 bool
	// MSC4190 is io.element.msc4190 (device management for ASes).
	MSC4190 bool
	// Legacy (`asdispatch.legacy: true`) also sends ?access_token= and falls
	// back to the unprefixed legacy paths on 404/405.
	Legacy bool
	// Extra holds keys this version does not know, kept as parsed.
	Extra map[string]any
}

// AppService is a registration as part of a loaded Set.
type AppService struct {
	*Registration
	// Index is the AS's position in its Set (0..Len-1): the owner number in
	// the namespace matcher and the bit in dispatcher interest sets. It is
	// only meaningful within one Set.
	Index int
	// SenderUserID is @sender_localpart:server_name.
	SenderUserID string
}
